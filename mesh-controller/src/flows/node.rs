//! A node's flow channel: the second agent connection a gateway opens (hello role `flows`,
//! authorized by the agent port for the node's own identity). The controller writes
//! [`FlowCommand`]s and reads [`FlowReply`]s, routed by query id to each query's own bounded
//! queue. One channel per node: a newer one replaces the older, and a channel going away
//! ends its part of every query open on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use trellis_core::cluster::ClusterId;
use trellis_core::flow::protocol::{FlowCommand, FlowReply, MAX_QUERIES_PER_NODE};
use trellis_core::flow::{Flow, FlowRequest};
use trellis_core::framing::{FrameDecoder, FrameError, encode_json_frame};

use super::{FlowRelay, SourceKey, SubEvent, locked};

/// Commands waiting to be written to one node (queries and cancels are rare and small).
const COMMAND_QUEUE: usize = 256;
/// The largest command frame (a request is a few hundred bytes).
const MAX_COMMAND_FRAME: usize = 64 * 1024;

/// Each open query's queue on a channel, by query id.
type Routes = Arc<Mutex<HashMap<u64, mpsc::Sender<SubEvent>>>>;

/// A registered channel, as the relay holds it.
#[derive(Debug)]
pub(crate) struct NodeChannel {
    pub(crate) generation: u64,
    commands: mpsc::Sender<FlowCommand>,
    routes: Routes,
    /// Dropped when the channel is replaced: its task sees it and ends.
    _current: watch::Sender<()>,
}

/// Why a node's flow channel ended early.
#[derive(Debug, thiserror::Error)]
pub enum FlowChannelError {
    #[error("writing a command to the node")]
    Write(#[source] std::io::Error),
    #[error("the node did not take a command within {0:?}")]
    WriteTimeout(std::time::Duration),
    #[error("encoding a command")]
    Encode(#[source] FrameError),
    #[error("reading the node's replies")]
    Read(#[source] std::io::Error),
    #[error("reading the node's replies")]
    Frame(#[source] FrameError),
}

/// Why a query could not be opened on a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("no such source is connected")]
    NotConnected,
    #[error("the source is serving as many queries as it takes")]
    Busy,
}

/// Keeps a query open on a node; dropping it cancels the query there (unless it ended).
#[derive(Debug)]
pub(crate) struct NodeQuery {
    id: u64,
    routes: Routes,
    commands: mpsc::Sender<FlowCommand>,
}

impl Drop for NodeQuery {
    fn drop(&mut self) {
        if locked(&self.routes).remove(&self.id).is_some() {
            // Best effort: a node whose command queue is full is stuck, and its write
            // deadline closes the channel soon.
            let _ = self.commands.try_send(FlowCommand::Cancel { id: self.id });
        }
    }
}

/// Unregisters a channel when its task ends, however it ends.
struct Registration {
    relay: FlowRelay,
    node: String,
    generation: u64,
    routes: Routes,
}

impl Drop for Registration {
    fn drop(&mut self) {
        {
            let mut nodes = locked(&self.relay.inner.nodes);
            if nodes
                .get(&self.node)
                .is_some_and(|c| c.generation == self.generation)
            {
                nodes.remove(&self.node);
            }
            self.relay
                .metrics()
                .flow_channels
                .set(i64::try_from(nodes.len()).unwrap_or(i64::MAX));
        }
        // Every query open here ends its part: its queue is told and closed.
        let open: Vec<_> = locked(&self.routes).drain().collect();
        for (_, queue) in open {
            let _ = queue.try_send(SubEvent::End(Some("the node's flow channel closed".into())));
        }
        tracing::info!(node = %self.node, "flow channel closed");
    }
}

impl FlowRelay {
    /// Serves `node`'s flow channel until it closes, is replaced by a newer one, or fails.
    /// `received` holds what the node sent after its hello. The caller has authorized the
    /// node (its certificate names it).
    pub async fn serve_node<R, W>(
        &self,
        node: String,
        mut rd: R,
        mut wr: W,
        mut received: FrameDecoder,
    ) -> Result<(), FlowChannelError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let settings = self.settings();
        received.set_max(settings.max_reply_frame);
        let (commands, mut to_write) = mpsc::channel(COMMAND_QUEUE);
        let routes: Routes = Arc::default();
        let (current, mut replaced) = watch::channel(());
        let generation = self
            .inner
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let registration = Registration {
            relay: self.clone(),
            node: node.clone(),
            generation,
            routes: routes.clone(),
        };
        {
            let mut nodes = locked(&self.inner.nodes);
            if nodes.contains_key(&node) {
                tracing::info!(%node, "a newer flow channel replaces the node's older one");
            }
            nodes.insert(
                node.clone(),
                NodeChannel {
                    generation,
                    commands,
                    routes: routes.clone(),
                    _current: current,
                },
            );
            self.metrics()
                .flow_channels
                .set(i64::try_from(nodes.len()).unwrap_or(i64::MAX));
        }
        self.inner.channels.send_modify(|n| *n += 1);
        tracing::info!(%node, "flow channel connected");
        let source = SourceKey::Node {
            node: node.clone(),
            generation,
        };
        self.route_replies(&source, &routes, &mut received)?;
        let mut buf = vec![0u8; 64 * 1024];
        let outcome = loop {
            tokio::select! {
                command = to_write.recv() => {
                    // The relay holds a sender while the channel is registered.
                    let Some(command) = command else { break Ok(()) };
                    if let Err(e) = write_command(&mut wr, &command, settings.write_timeout).await {
                        break Err(e);
                    }
                }
                read = rd.read(&mut buf) => match read {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        received.push(&buf[..n]);
                        if let Err(e) = self.route_replies(&source, &routes, &mut received) {
                            break Err(e);
                        }
                    }
                    Err(e) => break Err(FlowChannelError::Read(e)),
                },
                // Replaced by a newer channel of the node.
                _ = replaced.changed() => break Ok(()),
            }
        };
        drop(registration);
        outcome
    }

    /// Hands every complete reply in `received` to its query. A frame that does not parse is
    /// counted and skipped; an oversized one ends the channel (the framing is lost).
    fn route_replies(
        &self,
        source: &SourceKey,
        routes: &Routes,
        received: &mut FrameDecoder,
    ) -> Result<(), FlowChannelError> {
        loop {
            match received.next_json::<FlowReply>() {
                Ok(Some(reply)) => self.route(source, routes, reply),
                Ok(None) => return Ok(()),
                Err(FrameError::Malformed(e)) => {
                    self.metrics().flow_replies_rejected.inc();
                    tracing::warn!(%source, error = %e, "skipped an unreadable flow reply");
                }
                Err(e) => {
                    self.metrics().flow_replies_rejected.inc();
                    return Err(FlowChannelError::Frame(e));
                }
            }
        }
    }

    fn route(&self, source: &SourceKey, routes: &Routes, reply: FlowReply) {
        let mut routes = locked(routes);
        match reply {
            FlowReply::Flows { id, mut flows } => {
                let Some(queue) = routes.get(&id) else {
                    // Cancelled a moment ago: the node had not seen it yet.
                    return;
                };
                // A node's channel speaks for that node only: a flow naming another node (a
                // compromised node inventing its neighbours' traffic, or a gateway started
                // without its cluster's name) is shown as the channel's node's, counted.
                if let SourceKey::Node { node, .. } = source {
                    let mut renamed = 0;
                    for flow in &mut flows {
                        if !seen_on(flow, &self.inner.cluster, node) {
                            flow.node_name = format!("{}/{node}", self.inner.cluster);
                            renamed += 1;
                        }
                    }
                    self.refused_flows(source, "other_node", renamed);
                }
                let count = flows.len();
                match queue.try_send(SubEvent::Flows(flows)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => self.dropped(source, count),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        routes.remove(&id);
                    }
                }
            }
            FlowReply::Lost { id, count } => {
                if let Some(queue) = routes.get(&id) {
                    let _ = queue.try_send(SubEvent::Lost(count));
                }
            }
            FlowReply::End { id, error } => {
                // Closing the queue ends the query's part here even when it is full.
                if let Some(queue) = routes.remove(&id) {
                    let _ = queue.try_send(SubEvent::End(error));
                }
            }
        }
    }

    pub(crate) fn dropped(&self, source: &SourceKey, count: usize) {
        tracing::debug!(%source, count, "a flow reader is too slow: dropped flows");
        self.metrics()
            .flows_dropped
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// The node channels registered now.
    pub(crate) fn node_sources(&self) -> Vec<SourceKey> {
        locked(&self.inner.nodes)
            .iter()
            .map(|(node, c)| SourceKey::Node {
                node: node.clone(),
                generation: c.generation,
            })
            .collect()
    }

    /// Opens `request` on the node channel `source` names (that generation of it); its
    /// replies come on the receiver, which closes when the node is done with it.
    pub(crate) fn open_on_node(
        &self,
        source: &SourceKey,
        request: FlowRequest,
    ) -> Result<(NodeQuery, mpsc::Receiver<SubEvent>), OpenError> {
        let SourceKey::Node { node, generation } = source else {
            return Err(OpenError::NotConnected);
        };
        let nodes = locked(&self.inner.nodes);
        let channel = nodes
            .get(node)
            .filter(|c| c.generation == *generation)
            .ok_or(OpenError::NotConnected)?;
        let mut routes = locked(&channel.routes);
        if routes.len() >= MAX_QUERIES_PER_NODE {
            return Err(OpenError::Busy);
        }
        let id = self.next_id();
        let (queue, replies) = mpsc::channel(self.settings().queue_frames.max(1));
        channel
            .commands
            .try_send(FlowCommand::Query {
                id,
                request: Box::new(request),
            })
            .map_err(|_| OpenError::Busy)?;
        routes.insert(id, queue);
        Ok((
            NodeQuery {
                id,
                routes: channel.routes.clone(),
                commands: channel.commands.clone(),
            },
            replies,
        ))
    }
}

/// Whether `flow` says it was seen on `cluster`'s node `node` (`<cluster>/<node>`).
pub(crate) fn seen_on(flow: &Flow, cluster: &ClusterId, node: &str) -> bool {
    flow.node_name
        .strip_prefix(cluster.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        == Some(node)
}

async fn write_command<W: AsyncWrite + Unpin>(
    wr: &mut W,
    command: &FlowCommand,
    timeout: std::time::Duration,
) -> Result<(), FlowChannelError> {
    let frame = encode_json_frame(command, "flow command", MAX_COMMAND_FRAME)
        .map_err(FlowChannelError::Encode)?;
    let write = async {
        wr.write_all(&frame).await?;
        // Flushed: over TLS the record could otherwise wait in the session's buffer.
        wr.flush().await
    };
    tokio::time::timeout(timeout, write)
        .await
        .map_err(|_| FlowChannelError::WriteTimeout(timeout))?
        .map_err(FlowChannelError::Write)
}
