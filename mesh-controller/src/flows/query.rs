//! One reader's query, fanned out to every source: each registered node channel and, when
//! asked, peer clusters. The recorded flows (each source already cut to the last N) are
//! merged by time and the newest N kept; a source that has not answered in time is skipped
//! (counted), so the reader is never held up. When following, the query subscribes to every
//! source's new flows before asking for the recorded ones (nothing is missed in between; what
//! comes both ways is shown once, [`LiveGate`]), writes the merged history, then every new
//! flow as it comes, from node channels that connect later too, until the reader goes away:
//! then every source's query is cancelled (dropping its handle does).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;

use futures::stream::{self, SelectAll, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use trellis_core::cluster::ClusterId;
use trellis_core::flow::protocol::MAX_FLOWS_PER_FRAME;
use trellis_core::flow::{Flow, FlowRequest};

use super::merge::{LiveGate, NewestFlows, narrowed_for, select_peers, visible_to};
use super::node::OpenError;
use super::{FlowRelay, SkipReason, SourceKey, SubEvent};
#[cfg(doc)]
use super::{node::NodeQuery, peer::PeerQuery};

/// Who a query is for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Ask the peers the request names (a reader's query); a peer's query never goes on to
    /// other peers.
    pub ask_peers: bool,
    /// Keep only flows this peer cluster may see ([`visible_to`]).
    pub visible_to: Option<ClusterId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    History,
    Live,
}

/// Keeps a source's query open ([`NodeQuery`] or [`PeerQuery`]): held only to be dropped,
/// which cancels it.
type Handle = Box<dyn Send>;

type Events = SelectAll<Pin<Box<dyn Stream<Item = (SourceKey, Phase, SubEvent)> + Send>>>;

/// A source's replies as a stream that ends with an `End` (one is made up if the queue
/// closed without one).
fn tagged(
    source: SourceKey,
    phase: Phase,
    replies: mpsc::Receiver<SubEvent>,
) -> Pin<Box<dyn Stream<Item = (SourceKey, Phase, SubEvent)> + Send>> {
    Box::pin(stream::unfold(
        Some((source, phase, replies)),
        |state| async move {
            let (source, phase, mut replies) = state?;
            match replies.recv().await {
                Some(SubEvent::End(error)) => Some(((source, phase, SubEvent::End(error)), None)),
                Some(event) => Some((
                    (source.clone(), phase, event),
                    Some((source, phase, replies)),
                )),
                None => Some(((source, phase, SubEvent::End(None)), None)),
            }
        },
    ))
}

/// The sources' open queries and their replies.
struct Fanout {
    relay: FlowRelay,
    events: Events,
    handles: BTreeMap<(SourceKey, Phase), Handle>,
}

impl Fanout {
    fn open(&mut self, source: &SourceKey, phase: Phase, request: FlowRequest) -> bool {
        let opened = match source {
            SourceKey::Node { .. } => self
                .relay
                .open_on_node(source, request)
                .map(|(h, r)| (Box::new(h) as Handle, r)),
            SourceKey::Peer(peer) => self
                .relay
                .open_on_peer(peer, request)
                .map(|(h, r)| (Box::new(h) as Handle, r)),
        };
        match opened {
            Ok((handle, replies)) => {
                self.handles.insert((source.clone(), phase), handle);
                self.events.push(tagged(source.clone(), phase, replies));
                true
            }
            Err(e) => {
                let reason = match e {
                    OpenError::Busy => SkipReason::Busy,
                    OpenError::NotConnected => SkipReason::NotConnected,
                };
                self.relay.skipped(source, reason, &e.to_string());
                false
            }
        }
    }

    /// Cancels the source's query (a no-op once it ended).
    fn close(&mut self, source: &SourceKey, phase: Phase) {
        self.handles.remove(&(source.clone(), phase));
    }
}

/// What a query did, for its log line.
#[derive(Debug, Default)]
struct Tally {
    sources: usize,
    skipped: usize,
    written: usize,
    lost: u64,
}

/// Runs `request` for `scope` and sends its flows, in batches, oldest first, on `out` until
/// the query is done (it does not follow) or `out` is closed (the reader went away).
pub async fn run(
    relay: FlowRelay,
    request: FlowRequest,
    scope: Scope,
    out: mpsc::Sender<Vec<Flow>>,
) {
    let settings = relay.settings();
    let limit = request
        .last
        .map_or(settings.max_history, |n| n.min(settings.max_history));
    // `hubble observe --follow` without `--last` or `--since` shows only new flows.
    let wants_history = request.wants_history();
    let filter = match &scope.visible_to {
        Some(asker) => narrowed_for(&request.filter, asker),
        None => request.filter.clone(),
    };
    let keep = |flow: &Flow| {
        request.filter.matches(flow)
            && scope
                .visible_to
                .as_ref()
                .is_none_or(|asker| visible_to(flow, asker))
    };
    let history_request = FlowRequest {
        filter: filter.clone(),
        last: Some(limit),
        follow: false,
        peers: Vec::new(),
    };
    let live_request = FlowRequest {
        filter,
        last: None,
        follow: true,
        peers: Vec::new(),
    };
    // Subscribed before the channels are listed: one that registers in between is followed.
    let mut channels = relay.inner.channels.subscribe();
    let mut sources = relay.node_sources();
    if scope.ask_peers && !request.peers.is_empty() {
        let (peers, missing) = select_peers(&request.peers, &relay.connected_peers());
        for name in missing {
            relay.skipped(
                &format!("peer {name:?}"),
                SkipReason::NotConnected,
                "not connected",
            );
        }
        sources.extend(peers.into_iter().map(SourceKey::Peer));
    }
    let mut fanout = Fanout {
        relay: relay.clone(),
        events: SelectAll::new(),
        handles: BTreeMap::new(),
    };
    let mut tally = Tally {
        sources: sources.len(),
        ..Tally::default()
    };
    // New flows first, so that none recorded while the history is read is missed.
    if request.follow {
        for source in &sources {
            fanout.open(source, Phase::Live, live_request.clone());
        }
    }
    let started = Instant::now();
    let mut pending: BTreeMap<SourceKey, Instant> = BTreeMap::new();
    if wants_history {
        for source in &sources {
            if fanout.open(source, Phase::History, history_request.clone()) {
                let timeout = match source {
                    SourceKey::Node { .. } => settings.history_timeout,
                    SourceKey::Peer(_) => settings.peer_history_timeout,
                };
                pending.insert(source.clone(), started + timeout);
            } else {
                tally.skipped += 1;
            }
        }
    }
    let mut newest = NewestFlows::new(limit);
    let mut gate = LiveGate::default();
    let mut early: VecDeque<(SourceKey, Flow)> = VecDeque::new();
    while let Some(deadline) = pending.values().min().copied() {
        tokio::select! {
            event = fanout.events.next() => {
                let Some((source, phase, event)) = event else { break };
                match (phase, event) {
                    (Phase::History, SubEvent::Flows(flows)) => {
                        for flow in flows.into_iter().filter(|f| keep(f)) {
                            gate.recorded(&source, &flow);
                            newest.push(flow);
                        }
                    }
                    (Phase::History, SubEvent::End(error)) => {
                        pending.remove(&source);
                        fanout.close(&source, Phase::History);
                        if let Some(error) = error {
                            tally.skipped += 1;
                            relay.skipped(&source, SkipReason::Error, &error);
                        }
                    }
                    (Phase::Live, SubEvent::Flows(flows)) => {
                        for flow in flows.into_iter().filter(|f| keep(f)) {
                            // Held until the history is written; bounded like it.
                            if early.len() >= settings.max_history {
                                early.pop_front();
                                tally.lost += 1;
                                relay.dropped(&source, 1);
                            }
                            early.push_back((source.clone(), flow));
                        }
                    }
                    (Phase::Live, SubEvent::End(error)) => {
                        fanout.close(&source, Phase::Live);
                        if let Some(error) = error {
                            relay.skipped(&source, SkipReason::Error, &error);
                        }
                    }
                    (_, SubEvent::Lost(count)) => tally.lost += count,
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                let late: Vec<SourceKey> = pending
                    .iter()
                    .filter(|(_, d)| **d <= now)
                    .map(|(s, _)| s.clone())
                    .collect();
                for source in late {
                    pending.remove(&source);
                    fanout.close(&source, Phase::History);
                    tally.skipped += 1;
                    relay.skipped(&source, SkipReason::Timeout, "no complete answer in time");
                }
            }
            () = out.closed() => return,
        }
    }
    let history = newest.into_sorted();
    for batch in history.chunks(MAX_FLOWS_PER_FRAME) {
        if out.send(batch.to_vec()).await.is_err() {
            return;
        }
        tally.written += batch.len();
    }
    if !request.follow {
        tracing::debug!(?tally, "flow query answered");
        return;
    }
    let early: Vec<Flow> = early
        .into_iter()
        .filter(|(source, flow)| gate.admit(source, flow))
        .map(|(_, flow)| flow)
        .collect();
    if !early.is_empty() {
        tally.written += early.len();
        if out.send(early).await.is_err() {
            return;
        }
    }
    let mut following: BTreeSet<SourceKey> = sources.into_iter().collect();
    let mut channels_open = true;
    loop {
        tokio::select! {
            event = fanout.events.next(), if !fanout.events.is_empty() => {
                let Some((source, phase, event)) = event else { continue };
                if phase == Phase::History {
                    // A late answer of a source skipped for its history: not new flows.
                    continue;
                }
                match event {
                    SubEvent::Flows(flows) => {
                        let new: Vec<Flow> = flows
                            .into_iter()
                            .filter(|f| keep(f) && gate.admit(&source, f))
                            .collect();
                        if new.is_empty() {
                            continue;
                        }
                        tally.written += new.len();
                        if out.send(new).await.is_err() {
                            break;
                        }
                    }
                    SubEvent::Lost(count) => tally.lost += count,
                    SubEvent::End(error) => {
                        fanout.close(&source, Phase::Live);
                        if let Some(error) = error {
                            relay.skipped(&source, SkipReason::Error, &error);
                        }
                    }
                }
            }
            // A node connected its flow channel (or reconnected it): follow it too.
            changed = channels.changed(), if channels_open => {
                if changed.is_err() {
                    channels_open = false;
                    continue;
                }
                for source in relay.node_sources() {
                    if following.insert(source.clone()) {
                        tally.sources += 1;
                        fanout.open(&source, Phase::Live, live_request.clone());
                    }
                }
            }
            () = out.closed() => break,
        }
    }
    tracing::debug!(?tally, "flow follower gone");
}
