//! Flows, the controller's side: it relays the flow channels of its cluster's nodes (as
//! hubble-relay does), serves `GET /flows` to readers as NDJSON, and asks and answers the
//! controllers of peer clusters over peering.
//!
//! * [`node`]: a node's flow channel (a second agent connection, hello role `flows`): queries
//!   go out as [`FlowCommand`](trellis_core::flow::protocol::FlowCommand)s, replies come back
//!   routed by query id to each query's own bounded queue; a flow naming another node than
//!   the channel's is relabelled as the channel's node's (counted).
//! * [`query`]: one reader's query fanned out to every source (node channels, and peers when
//!   asked): the recorded flows merged by time (the newest N kept), then, when following, new
//!   flows as they come.
//! * [`serve`]: the flows listener (`GET /flows?...`, `GET /flows/nodes`).
//! * [`peer`]: the same query over a QUIC stream of the peering connection; the answering
//!   controller keeps only the flows one of whose ends is a pod of the asking cluster, and
//!   the asking one checks that again, with the flow seen on one of that peer's nodes and not
//!   dated ahead ([`peer::peer_flow_refusal`]). Peers share [`MAX_PEER_FLOW_QUERIES`], so
//!   they hold at most half of a node's query slots and the cluster's own readers the rest.
//! * [`merge`]: the pure parts (newest-N merge, the peer identity rule, live deduplication).
//!
//! Bounded throughout: a query's replies wait in a queue of [`FlowSettings::queue_frames`]
//! frames; when its reader is slower than the nodes, further frames are dropped and counted
//! (`trellis_controller_flows_dropped_total`), never queued without limit and never waited
//! for, so one slow reader cannot hold up a node's other queries. Recorded flows held for a
//! query are at most [`FlowSettings::max_history`]; reply frames at most
//! [`FlowSettings::max_reply_frame`] bytes; commands are written within
//! [`FlowSettings::write_timeout`] or the channel is closed.

pub mod merge;
pub mod node;
pub mod peer;
pub mod query;
pub mod serve;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use trellis_core::cluster::ClusterId;
use trellis_core::flow::Flow;
use trellis_core::flow::protocol::MAX_FLOW_FRAME;

use crate::metrics::Metrics;

pub use merge::{NewestFlows, visible_to};
pub use peer::{FLOW_STREAM_MAGIC, MAX_PEER_FLOW_QUERIES};
pub use query::Scope;
pub use serve::serve;

/// How the relay waits and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSettings {
    /// A node's recorded flows must all arrive within this, or the node is skipped (counted)
    /// for that query: a reader is never held up by a node that does not answer.
    pub history_timeout: Duration,
    /// The same for a peer cluster (which waits for its own nodes first).
    pub peer_history_timeout: Duration,
    /// A command to a node, or a frame to a peer, is written within this or the stream is
    /// closed.
    pub write_timeout: Duration,
    /// The most recorded flows one query holds (a larger `last`, or none, is cut to it).
    pub max_history: usize,
    /// Reply frames queued for one query from one source before more are dropped.
    pub queue_frames: usize,
    /// The largest reply frame accepted from a node or a peer, and sent to a peer: by default
    /// [`MAX_FLOW_FRAME`], the limit the nodes split their replies to. A larger one ends that
    /// channel, its framing lost.
    pub max_reply_frame: usize,
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            history_timeout: Duration::from_secs(5),
            peer_history_timeout: Duration::from_secs(8),
            write_timeout: Duration::from_secs(5),
            max_history: 10_000,
            queue_frames: 64,
            max_reply_frame: MAX_FLOW_FRAME,
        }
    }
}

/// Who asked for flows, as the `source` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuerySource {
    Http,
    Peer,
}

impl QuerySource {
    pub fn label(self) -> &'static str {
        match self {
            QuerySource::Http => "http",
            QuerySource::Peer => "peer",
        }
    }
}

/// What became of a flow query, as the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryResult {
    Ok,
    BadRequest,
    Refused,
}

impl QueryResult {
    pub fn label(self) -> &'static str {
        match self {
            QueryResult::Ok => "ok",
            QueryResult::BadRequest => "bad_request",
            QueryResult::Refused => "refused",
        }
    }
}

/// Why a query went without one of its sources, as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Timeout,
    Busy,
    Error,
    NotConnected,
}

impl SkipReason {
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::Timeout => "timeout",
            SkipReason::Busy => "busy",
            SkipReason::Error => "error",
            SkipReason::NotConnected => "not_connected",
        }
    }
}

/// Where a query's flows come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKey {
    /// A node's flow channel; the generation tells a reconnected channel from the one before.
    Node {
        node: String,
        generation: u64,
    },
    Peer(ClusterId),
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceKey::Node { node, .. } => write!(f, "node {node}"),
            SourceKey::Peer(cluster) => write!(f, "peer {cluster}"),
        }
    }
}

/// What one source says about one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubEvent {
    Flows(Vec<Flow>),
    /// Flows the source's follower missed (its ring overwrote them).
    Lost(u64),
    /// The source is done with the query (`Some`: it refused or failed).
    End(Option<String>),
}

/// The relay: every node's flow channel and every peer connection flows can be asked over.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct FlowRelay {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    metrics: Metrics,
    /// This controller's cluster: the prefix of its nodes' `node_name`s.
    cluster: ClusterId,
    settings: Mutex<FlowSettings>,
    /// Serve readers and peers (`flows.enabled`); node channels are kept either way.
    enabled: AtomicBool,
    /// Query ids, unique in this controller (each node sees its own subset).
    next_id: AtomicU64,
    next_generation: AtomicU64,
    nodes: Mutex<BTreeMap<String, node::NodeChannel>>,
    /// Bumped whenever a node channel registers: followers subscribe to it.
    channels: watch::Sender<u64>,
    peers: Mutex<BTreeMap<ClusterId, peer::PeerLink>>,
    /// Peer-originated queries open now, all peers together ([`MAX_PEER_FLOW_QUERIES`]).
    peer_queries: Arc<tokio::sync::Semaphore>,
    /// Why queries went without each source, by source and reason (`GET /flows/nodes`).
    skips: Mutex<BTreeMap<String, BTreeMap<String, u64>>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these; keep serving if something ever did.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which nodes and peers can be asked for flows now (`GET /flows/nodes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowSources {
    /// Nodes whose flow channel is connected, by name.
    pub nodes: Vec<String>,
    /// Peer clusters connected over peering, by ID.
    pub peers: Vec<String>,
    /// How often queries went without a source since the controller started, by source
    /// (`node NAME`, `peer ID`) and reason (`busy`, `timeout`, `error`, `not_connected`): a
    /// reader whose answer came without a source learns it here (the NDJSON answer is flows
    /// only, its status sent before any source has answered).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The most sources whose skips are kept for `GET /flows/nodes` (a reader may name peers that
/// do not exist); the metric counts every skip regardless.
const MAX_SKIPPED_SOURCES: usize = 256;

impl FlowRelay {
    pub fn new(metrics: Metrics, cluster: ClusterId) -> Self {
        Self {
            inner: Arc::new(Inner {
                metrics,
                cluster,
                settings: Mutex::new(FlowSettings::default()),
                enabled: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                next_generation: AtomicU64::new(1),
                nodes: Mutex::new(BTreeMap::new()),
                channels: watch::channel(0).0,
                peers: Mutex::new(BTreeMap::new()),
                peer_queries: Arc::new(tokio::sync::Semaphore::new(MAX_PEER_FLOW_QUERIES)),
                skips: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// Serve readers and answer peers (`flows.enabled`).
    pub fn set_enabled(&self, enabled: bool) {
        self.inner.enabled.store(enabled, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Relaxed)
    }

    pub fn settings(&self) -> FlowSettings {
        *locked(&self.inner.settings)
    }

    /// Takes effect for queries and channels that start afterwards.
    pub fn set_settings(&self, settings: FlowSettings) {
        *locked(&self.inner.settings) = settings;
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The nodes and peers flows can be asked of now.
    pub fn sources(&self) -> FlowSources {
        FlowSources {
            nodes: locked(&self.inner.nodes).keys().cloned().collect(),
            peers: locked(&self.inner.peers)
                .keys()
                .map(ToString::to_string)
                .collect(),
            skipped: locked(&self.inner.skips).clone(),
        }
    }

    pub(crate) fn skipped(&self, source: &dyn std::fmt::Display, reason: SkipReason, why: &str) {
        tracing::info!(%source, reason = reason.label(), why, "a flow query goes without a source");
        {
            let mut skips = locked(&self.inner.skips);
            let name = source.to_string();
            if skips.len() < MAX_SKIPPED_SOURCES || skips.contains_key(&name) {
                *skips
                    .entry(name)
                    .or_default()
                    .entry(reason.label().to_owned())
                    .or_default() += 1;
            }
        }
        self.metrics()
            .flow_sources_skipped
            .with_label_values(&[reason.label()])
            .inc();
    }

    pub(crate) fn query_done(&self, source: QuerySource, result: QueryResult) {
        self.metrics()
            .flow_queries
            .with_label_values(&[source.label(), result.label()])
            .inc();
    }

    /// Counts flows a source sent that it cannot speak for (dropped, or for a node's channel
    /// relabelled).
    pub(crate) fn refused_flows(&self, source: &SourceKey, reason: &'static str, count: usize) {
        if count == 0 {
            return;
        }
        tracing::warn!(%source, reason, count, "flows the source cannot speak for");
        self.metrics()
            .flows_refused
            .with_label_values(&[reason])
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    pub(crate) fn relayed(&self, reader: QuerySource, count: usize) {
        self.metrics()
            .flows_relayed
            .with_label_values(&[reader.label()])
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }
}
