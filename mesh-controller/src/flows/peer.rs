//! Flow queries between controllers, over the peering connection: the asking controller opens
//! a bidirectional QUIC stream, writes [`FLOW_STREAM_MAGIC`] and one
//! [`FlowCommand::Query`] frame, and finishes its side; the answering one checks that the
//! asker is a peer with a running session, runs the query on its own nodes (never on to its
//! own peers) and streams back [`FlowReply`] frames of only the flows one of whose ends is a
//! pod of the asking cluster ([`visible_to`](super::visible_to)); `End` closes a query that
//! does not follow. The asker cancels by stopping the stream (dropping it).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::{Semaphore, mpsc};
use trellis_core::cluster::ClusterId;
use trellis_core::flow::protocol::{FlowCommand, FlowReply, MAX_QUERIES_PER_NODE, flow_frames};
use trellis_core::flow::{Flow, FlowRequest};
use trellis_core::framing::{FrameDecoder, encode_json_frame};

use super::merge::visible_to;
use super::node::OpenError;
use super::query::{self, Scope};
use super::{FlowRelay, QueryResult, QuerySource, SourceKey, SubEvent, locked};

/// The first bytes of a flow stream: tells it from the peering session's stream, and from
/// anything else a peer might open.
pub const FLOW_STREAM_MAGIC: &[u8; 8] = b"TRFLOWS1";
/// Flow queries all peers together may have open here at once; more are answered with an
/// error (counted, `too_many`). Each holds at most two queries on each node (its new flows
/// and, a moment, its recorded ones), so peers never hold more than half of a node's
/// [`MAX_QUERIES_PER_NODE`]: the cluster's own readers always keep the rest.
pub const MAX_PEER_FLOW_QUERIES: usize = 4;
const _: () = assert!(2 * MAX_PEER_FLOW_QUERIES <= MAX_QUERIES_PER_NODE / 2);
/// How far ahead of this controller's clock a peer's flow may be dated (clocks drift); a
/// later one would outrank every real flow in a `last N`.
pub const MAX_PEER_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// A query frame is a few hundred bytes.
const MAX_QUERY_FRAME: usize = 64 * 1024;
/// The asker's query must arrive this soon after it opens the stream.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a stream may wait (the peer's stream credit, a controller from before
/// flows that allows no more streams).
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

/// QUIC application error code with which either side stops a flow stream.
const STOP_CODE: u32 = 0;

/// A peer's connection as the relay asks over it.
#[derive(Debug)]
pub(crate) struct PeerLink {
    conn: Connection,
}

/// Keeps a peer's connection registered for flow queries; dropping it (the session ended)
/// unregisters it, unless a newer connection of that peer has replaced it.
#[derive(Debug)]
pub struct PeerRegistration {
    relay: FlowRelay,
    peer: ClusterId,
    connection: usize,
}

impl Drop for PeerRegistration {
    fn drop(&mut self) {
        let mut peers = locked(&self.relay.inner.peers);
        if peers
            .get(&self.peer)
            .is_some_and(|l| l.conn.stable_id() == self.connection)
        {
            peers.remove(&self.peer);
        }
    }
}

/// Keeps a query open on a peer; dropping it stops the stream, which cancels it there.
#[derive(Debug)]
pub(crate) struct PeerQuery(tokio::task::JoinHandle<()>);

impl Drop for PeerQuery {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the answer to a peer's query was refused, as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NotAdmitted,
    TooMany,
    BadRequest,
    Disabled,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::NotAdmitted => "not_admitted",
            Refusal::TooMany => "too_many",
            Refusal::BadRequest => "bad_request",
            Refusal::Disabled => "disabled",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::NotAdmitted => "no peering session with your cluster",
            Refusal::TooMany => "too many flow queries from your cluster",
            Refusal::BadRequest => "not a flow query",
            Refusal::Disabled => "flows are not served by this cluster",
        }
    }
}

impl FlowRelay {
    /// `peer`'s session runs on `conn`: flows can be asked of it, and its flow streams are
    /// answered. Hold the registration for the session's life.
    pub fn peer_connected(&self, peer: &ClusterId, conn: &Connection) -> PeerRegistration {
        locked(&self.inner.peers).insert(peer.clone(), PeerLink { conn: conn.clone() });
        PeerRegistration {
            relay: self.clone(),
            peer: peer.clone(),
            connection: conn.stable_id(),
        }
    }

    /// The peers connected now.
    pub(crate) fn connected_peers(&self) -> Vec<ClusterId> {
        locked(&self.inner.peers).keys().cloned().collect()
    }

    /// Whether `conn` is `peer`'s current session's connection.
    fn admitted(&self, peer: &ClusterId, conn: &Connection) -> bool {
        locked(&self.inner.peers)
            .get(peer)
            .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
    }

    /// Opens `request` on `peer`; its replies come on the receiver, which closes when the
    /// peer is done with it (or the stream fails).
    pub(crate) fn open_on_peer(
        &self,
        peer: &ClusterId,
        request: FlowRequest,
    ) -> Result<(PeerQuery, mpsc::Receiver<SubEvent>), OpenError> {
        let conn = locked(&self.inner.peers)
            .get(peer)
            .map(|l| l.conn.clone())
            .ok_or(OpenError::NotConnected)?;
        let settings = self.settings();
        let (queue, replies) = mpsc::channel(settings.queue_frames.max(1));
        let id = self.next_id();
        let relay = self.clone();
        let source = SourceKey::Peer(peer.clone());
        let task = tokio::spawn(async move {
            if let Err(why) = relay.ask(&conn, &source, id, request, &queue).await {
                let _ = queue.try_send(SubEvent::End(Some(why)));
            }
        });
        Ok((PeerQuery(task), replies))
    }

    async fn ask(
        &self,
        conn: &Connection,
        source: &SourceKey,
        id: u64,
        request: FlowRequest,
        queue: &mpsc::Sender<SubEvent>,
    ) -> Result<(), String> {
        let settings = self.settings();
        let (mut send, mut recv) = tokio::time::timeout(OPEN_TIMEOUT, conn.open_bi())
            .await
            .map_err(|_| "the peer allows no flow stream now".to_owned())?
            .map_err(|e| format!("opening a flow stream: {e}"))?;
        let mut bytes = FLOW_STREAM_MAGIC.to_vec();
        let command = FlowCommand::Query {
            id,
            request: Box::new(request),
        };
        bytes.extend(
            encode_json_frame(&command, "flow query", MAX_QUERY_FRAME)
                .map_err(|e| trellis_core::error_chain(&e))?,
        );
        tokio::time::timeout(settings.write_timeout, send.write_all(&bytes))
            .await
            .map_err(|_| "writing the query timed out".to_owned())?
            .map_err(|e| format!("writing the query: {e}"))?;
        let _ = send.finish();
        let mut decoder = FrameDecoder::new(settings.max_reply_frame);
        loop {
            let chunk = recv
                .read_chunk(64 * 1024, true)
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            let Some(chunk) = chunk else {
                return Ok(());
            };
            decoder.push(&chunk.bytes);
            loop {
                let reply = match decoder.next_json::<FlowReply>() {
                    Ok(Some(reply)) => reply,
                    Ok(None) => break,
                    Err(e) => {
                        self.metrics().flow_replies_rejected.inc();
                        return Err(format!(
                            "a broken answer: {}",
                            trellis_core::error_chain(&e)
                        ));
                    }
                };
                match reply {
                    FlowReply::Flows { mut flows, .. } => {
                        self.admit_peer_flows(source, &mut flows);
                        if flows.is_empty() {
                            continue;
                        }
                        let count = flows.len();
                        match queue.try_send(SubEvent::Flows(flows)) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => self.dropped(source, count),
                            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                        }
                    }
                    FlowReply::Lost { count, .. } => {
                        let _ = queue.try_send(SubEvent::Lost(count));
                    }
                    FlowReply::End { error, .. } => {
                        let _ = queue.try_send(SubEvent::End(error));
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Keeps only the flows of a peer's answer that it can speak for ([`peer_flow_refusal`]);
    /// the rest are dropped and counted.
    fn admit_peer_flows(&self, source: &SourceKey, flows: &mut Vec<Flow>) {
        let SourceKey::Peer(peer) = source else {
            return;
        };
        let now = SystemTime::now();
        let mut refused: Vec<&'static str> = Vec::new();
        flows.retain(
            |flow| match peer_flow_refusal(flow, peer, &self.inner.cluster, now) {
                Some(reason) => {
                    refused.push(reason);
                    false
                }
                None => true,
            },
        );
        for reason in refused {
            self.refused_flows(source, reason, 1);
        }
    }

    /// Answers the flow streams `peer` opens on `conn` until the connection closes. Run it for
    /// the life of the peer's session. Its queries share [`MAX_PEER_FLOW_QUERIES`] with every
    /// other peer's.
    pub async fn serve_peer_streams(self, peer: ClusterId, conn: Connection) {
        let slots = self.inner.peer_queries.clone();
        let mut answers = tokio::task::JoinSet::new();
        loop {
            let (send, recv) = tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok(streams) => streams,
                    Err(_) => break,
                },
                Some(_) = answers.join_next(), if !answers.is_empty() => continue,
            };
            let relay = self.clone();
            let peer = peer.clone();
            let conn = conn.clone();
            let slots = slots.clone();
            answers.spawn(async move { relay.answer(&peer, &conn, send, recv, &slots).await });
        }
        answers.shutdown().await;
    }

    async fn answer(
        &self,
        peer: &ClusterId,
        conn: &Connection,
        mut send: SendStream,
        mut recv: RecvStream,
        slots: &Arc<Semaphore>,
    ) {
        let settings = self.settings();
        let asked = tokio::time::timeout(QUERY_TIMEOUT, read_query(&mut recv)).await;
        let Ok(Some((id, request))) = asked else {
            self.refuse_peer(peer, Refusal::BadRequest);
            let _ = recv.stop(quinn::VarInt::from_u32(STOP_CODE));
            let _ = send.reset(quinn::VarInt::from_u32(STOP_CODE));
            return;
        };
        let refusal = if !self.enabled() {
            Some(Refusal::Disabled)
        } else if !self.admitted(peer, conn) {
            Some(Refusal::NotAdmitted)
        } else {
            None
        };
        let permit = match refusal {
            Some(refusal) => Err(refusal),
            None => slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| Refusal::TooMany),
        };
        let _permit = match permit {
            Ok(permit) => permit,
            Err(refusal) => {
                self.refuse_peer(peer, refusal);
                let end = FlowReply::End {
                    id,
                    error: Some(refusal.message().into()),
                };
                if let Ok(frame) = encode_json_frame(&end, "flow end", MAX_QUERY_FRAME) {
                    let _ =
                        tokio::time::timeout(settings.write_timeout, send.write_all(&frame)).await;
                }
                let _ = send.finish();
                return;
            }
        };
        tracing::debug!(%peer, ?request, "answering a peer's flow query");
        let (out, mut batches) = mpsc::channel(4);
        let engine = tokio::spawn(query::run(
            self.clone(),
            request,
            Scope {
                ask_peers: false,
                visible_to: Some(peer.clone()),
            },
            out,
        ));
        let stopped = send.stopped();
        tokio::pin!(stopped);
        let mut relayed = 0;
        loop {
            tokio::select! {
                batch = batches.recv() => {
                    let Some(flows) = batch else {
                        let end = FlowReply::End { id, error: None };
                        if let Ok(frame) = encode_json_frame(&end, "flow end", MAX_QUERY_FRAME) {
                            let _ = tokio::time::timeout(settings.write_timeout, send.write_all(&frame)).await;
                        }
                        let _ = send.finish();
                        break;
                    };
                    let encoded = flow_frames(id, &flows, settings.max_reply_frame);
                    if encoded.left_out > 0 {
                        tracing::warn!(%peer, left_out = encoded.left_out, "flows too large for a reply frame were reported lost");
                    }
                    let mut written = true;
                    for frame in encoded.frames {
                        match tokio::time::timeout(settings.write_timeout, send.write_all(&frame)).await {
                            Ok(Ok(())) => {}
                            _ => { written = false; break; }
                        }
                    }
                    if !written {
                        break;
                    }
                    relayed += flows.len() - encoded.left_out as usize;
                }
                // The asker went away (or cancelled).
                _ = &mut stopped => break,
            }
        }
        drop(batches);
        let _ = engine.await;
        self.relayed(QuerySource::Peer, relayed);
        self.query_done(QuerySource::Peer, QueryResult::Ok);
    }

    fn refuse_peer(&self, peer: &ClusterId, refusal: Refusal) {
        tracing::info!(%peer, reason = refusal.label(), "refused a peer's flow query");
        self.metrics()
            .peer_flow_queries_refused
            .with_label_values(&[refusal.label()])
            .inc();
        let result = if refusal == Refusal::BadRequest {
            QueryResult::BadRequest
        } else {
            QueryResult::Refused
        };
        self.query_done(QuerySource::Peer, result);
    }
}

/// Why the asking controller does not show a flow peer cluster `peer` answered, if it does
/// not: a peer speaks only for what its own nodes saw (`node_name` `<peer>/...`), only of
/// connections with an end a pod of `own` (the rule it is meant to apply, checked again
/// rather than trusted), and not from the future (which would push every real flow out of a
/// `last N`).
pub fn peer_flow_refusal(
    flow: &Flow,
    peer: &ClusterId,
    own: &ClusterId,
    now: SystemTime,
) -> Option<&'static str> {
    let on_peer_node = flow
        .node_name
        .strip_prefix(peer.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|node| !node.is_empty());
    if !on_peer_node {
        Some("peer_other_node")
    } else if !visible_to(flow, own) {
        Some("peer_not_ours")
    } else if flow.time > now + MAX_PEER_CLOCK_SKEW {
        Some("peer_future")
    } else {
        None
    }
}

/// The magic and the query frame at the start of a flow stream; `None` if it is not one.
async fn read_query(recv: &mut RecvStream) -> Option<(u64, FlowRequest)> {
    let mut magic = [0u8; FLOW_STREAM_MAGIC.len()];
    recv.read_exact(&mut magic).await.ok()?;
    if &magic != FLOW_STREAM_MAGIC {
        return None;
    }
    let mut decoder = FrameDecoder::new(MAX_QUERY_FRAME);
    loop {
        match decoder.next_json::<FlowCommand>() {
            Ok(Some(FlowCommand::Query { id, request })) => return Some((id, *request)),
            Ok(Some(FlowCommand::Cancel { .. })) | Err(_) => return None,
            Ok(None) => {}
        }
        let chunk = recv.read_chunk(MAX_QUERY_FRAME, true).await.ok()??;
        decoder.push(&chunk.bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use trellis_core::cluster::fixture::id;

    use super::*;
    use crate::flows::merge::tests::flow;

    /// A peer answering `b` (this cluster) as `a`: what it may not make `b` show.
    #[test]
    fn a_peer_speaks_only_for_its_own_nodes_about_our_pods_and_not_from_the_future() {
        let (peer, own) = (id("a"), id("b"));
        let now = SystemTime::now();
        let at = |f: Flow, time: SystemTime| Flow { time, ..f };
        let fine = at(flow(1, "a/n1", "b/y/client", "a/x/server"), now);
        assert_eq!(peer_flow_refusal(&fine, &peer, &own, now), None);
        let refusal = |f: &Flow| peer_flow_refusal(f, &peer, &own, now);
        // Posing as one of our nodes, or another peer's, or no node at all.
        for node in ["b/n1", "c/n1", "a", "a/", "ab/n1"] {
            let forged = at(flow(1, node, "b/y/client", "a/x/server"), now);
            assert_eq!(refusal(&forged), Some("peer_other_node"), "{node}");
        }
        // A connection between two of its own pods: none of ours.
        let theirs = at(flow(1, "a/n1", "a/x/client", "a/x/server"), now);
        assert_eq!(refusal(&theirs), Some("peer_not_ours"));
        // Dated ahead, past the clock skew allowed: it would outrank every real flow.
        let ahead = at(
            fine.clone(),
            now + MAX_PEER_CLOCK_SKEW + Duration::from_secs(1),
        );
        assert_eq!(refusal(&ahead), Some("peer_future"));
        let drift = at(fine, now + MAX_PEER_CLOCK_SKEW - Duration::from_secs(1));
        assert_eq!(refusal(&drift), None, "clocks drift a little");
    }
}
