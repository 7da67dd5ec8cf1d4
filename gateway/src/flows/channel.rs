//! The node's side of its flow channel: a second agent connection to the controller (hello
//! role `flows`, the node's own identity), on which the controller sends [`FlowCommand`]s
//! and the node answers [`FlowReply`] frames from its [`Recorder`]. No listener on the node:
//! the node dials, as its state stream does, and reconnects with backoff forever.
//!
//! Bounded: at most [`MAX_QUERIES_PER_NODE`] queries at once (more are answered with an
//! error), replies queue for the writer in a bounded channel (a slow controller slows the
//! queries; their followers then lose flows, and are told), and a command frame larger than
//! [`MAX_COMMAND_FRAME`] ends the connection (the framing is lost). A command that does not
//! parse is logged and skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use trellis_agent_client::{Backoff, ClientConfig};
use trellis_core::agent::{AgentRole, FlowChannel};
use trellis_core::flow::Flow;
use trellis_core::flow::protocol::{
    FlowCommand, FlowReply, MAX_FLOW_FRAME, MAX_FLOWS_PER_FRAME, MAX_QUERIES_PER_NODE, flow_frames,
};
use trellis_core::framing::{FrameDecoder, FrameError, encode_json_frame};

use super::recorder::{Answer, Followed, Follower, Recorder};

/// The largest command frame accepted (a query is a few hundred bytes).
pub const MAX_COMMAND_FRAME: usize = 1 << 20;

/// Reply frames waiting for the writer.
const REPLY_QUEUE: usize = 32;

/// A controller not reading for this long ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection that lasted this long starts the next reconnect from the shortest delay.
const STABLE: Duration = Duration::from_secs(10);

/// Why a channel's connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the controller closed the flow channel")]
    Closed,
    #[error("reading the flow channel")]
    Read(#[source] std::io::Error),
    #[error("writing the flow channel")]
    Write(#[source] std::io::Error),
    #[error("the controller did not read the flow channel for {0:?}")]
    WriteTimedOut(Duration),
    #[error("a command frame")]
    Frame(#[source] FrameError),
}

fn encode_reply(reply: &FlowReply) -> Option<Vec<u8>> {
    encode_json_frame(reply, "flow reply", MAX_FLOW_FRAME)
        .inspect_err(|e| tracing::warn!("flow reply: {}", trellis_core::error_chain(e)))
        .ok()
}

/// Sends `flows` in frames the controller accepts (at most [`MAX_FLOWS_PER_FRAME`] flows and
/// [`MAX_FLOW_FRAME`] bytes each); a flow too large for a frame by itself is reported to the
/// controller as lost. `false` once the connection is gone.
async fn send_flows(id: u64, flows: &[Arc<Flow>], out: &mpsc::Sender<Vec<u8>>) -> bool {
    let encoded = flow_frames(id, flows, MAX_FLOW_FRAME);
    if encoded.left_out > 0 {
        tracing::warn!(
            query = id,
            left_out = encoded.left_out,
            "flows too large for a reply frame were reported lost"
        );
    }
    for frame in encoded.frames {
        if out.send(frame).await.is_err() {
            return false;
        }
    }
    true
}

async fn send(reply: FlowReply, out: &mpsc::Sender<Vec<u8>>) -> bool {
    match encode_reply(&reply) {
        Some(frame) => out.send(frame).await.is_ok(),
        None => true,
    }
}

/// Answers one query: its recorded flows, then `End`, or (following) new flows as they come.
async fn answer(id: u64, answer: Answer, out: mpsc::Sender<Vec<u8>>) {
    if !send_flows(id, &answer.recorded, &out).await {
        return;
    }
    drop(answer.recorded);
    match answer.follower {
        None => {
            send(FlowReply::End { id, error: None }, &out).await;
        }
        Some(follower) => follow(id, follower, &out).await,
    }
}

async fn follow(id: u64, mut follower: Follower, out: &mpsc::Sender<Vec<u8>>) {
    let mut batch = Vec::with_capacity(MAX_FLOWS_PER_FRAME);
    while let Some(first) = follower.next().await {
        // What is already waiting goes in the same frame.
        let mut lost = None;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Followed::Flow(flow) => batch.push(flow),
                Followed::Lost(count) => {
                    lost = Some(count);
                    break;
                }
            }
            if batch.len() == MAX_FLOWS_PER_FRAME {
                break;
            }
            next = follower.try_next();
        }
        if !send_flows(id, &batch, out).await {
            return;
        }
        batch.clear();
        if let Some(count) = lost
            && !send(FlowReply::Lost { id, count }, out).await
        {
            return;
        }
    }
    // The recorder is gone (the gateway is stopping).
    send(FlowReply::End { id, error: None }, out).await;
}

/// The queries being answered on one connection; aborted with it.
struct Queries {
    running: HashMap<u64, JoinHandle<()>>,
}

impl Queries {
    fn active(&mut self) -> usize {
        self.running.retain(|_, task| !task.is_finished());
        self.running.len()
    }
}

impl Drop for Queries {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}

/// What to do with one command.
async fn command(
    command: FlowCommand,
    queries: &mut Queries,
    recorder: &Arc<Recorder>,
    out: &mpsc::Sender<Vec<u8>>,
) {
    match command {
        FlowCommand::Query { id, request } => {
            let refusal = if queries.active() >= MAX_QUERIES_PER_NODE {
                Some(format!(
                    "the node answers at most {MAX_QUERIES_PER_NODE} queries at once"
                ))
            } else if queries.running.contains_key(&id) {
                Some(format!("query {id} is running already"))
            } else {
                None
            };
            if let Some(error) = refusal {
                tracing::debug!(query = id, "{error}");
                send(
                    FlowReply::End {
                        id,
                        error: Some(error),
                    },
                    out,
                )
                .await;
                return;
            }
            // Taken here, in the order the commands came: a controller that subscribes to new
            // flows before asking for the recorded ones misses none in between.
            let recorded = recorder.query(&request);
            let task = tokio::spawn(answer(id, recorded, out.clone()));
            queries.running.insert(id, task);
        }
        FlowCommand::Cancel { id } => {
            if let Some(task) = queries.running.remove(&id) {
                task.abort();
            }
        }
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::Receiver<Vec<u8>>,
) -> ChannelError {
    while let Some(frame) = frames.recv().await {
        let write = async {
            writer.write_all(&frame).await?;
            writer.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return ChannelError::Write(e),
            Err(_) => return ChannelError::WriteTimedOut(WRITE_TIMEOUT),
        }
    }
    ChannelError::Closed
}

/// Serves the controller's commands on `stream` (after the hello) until the connection
/// ends, and says why. Every query of the connection ends with it.
pub async fn serve<S>(stream: S, recorder: Arc<Recorder>) -> ChannelError
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let (out, frames) = mpsc::channel(REPLY_QUEUE);
    let mut writer = tokio::spawn(write_frames(writer, frames));
    let mut queries = Queries {
        running: HashMap::new(),
    };
    let mut decoder = FrameDecoder::new(MAX_COMMAND_FRAME);
    let mut buf = vec![0u8; 16 * 1024];
    let ended = loop {
        tokio::select! {
            written = &mut writer => {
                break written.unwrap_or(ChannelError::Closed);
            }
            read = reader.read(&mut buf) => {
                let n = match read {
                    Ok(0) => break ChannelError::Closed,
                    Ok(n) => n,
                    Err(e) => break ChannelError::Read(e),
                };
                decoder.push(&buf[..n]);
                let mut broken = None;
                loop {
                    match decoder.next_json::<FlowCommand>() {
                        Ok(Some(c)) => command(c, &mut queries, &recorder, &out).await,
                        Ok(None) => break,
                        // The decoder is past the bad frame: the next one is whole.
                        Err(e @ FrameError::Malformed(_)) => tracing::warn!(
                            "skipping a flow command that does not parse: {}",
                            trellis_core::error_chain(&e)
                        ),
                        Err(e) => {
                            broken = Some(ChannelError::Frame(e));
                            break;
                        }
                    }
                }
                if let Some(e) = broken {
                    break e;
                }
            }
        }
    };
    drop(queries);
    writer.abort();
    ended
}

/// Keeps the node's flow channel to its controller open forever: connect (as the state
/// stream does: TLS with the node's identity, keepalives), say hello as the node's flow
/// channel, serve commands, and reconnect with backoff whenever the connection ends.
pub async fn run(config: ClientConfig, node: String, recorder: Arc<Recorder>) {
    let mut backoff = Backoff::default();
    let role = AgentRole::Flows(FlowChannel { node });
    loop {
        let started = tokio::time::Instant::now();
        let why = match trellis_agent_client::connect(&config, None, role.clone()).await {
            Ok(stream) => {
                tracing::info!(controller = %config.address, "flow channel open");
                trellis_core::error_chain(&serve(stream, recorder.clone()).await)
            }
            Err(e) => trellis_core::error_chain(&e),
        };
        if started.elapsed() >= STABLE {
            backoff.reset();
        }
        let delay = backoff.next_delay(rand_core::RngCore::next_u64(&mut rand_core::OsRng));
        tracing::warn!(
            controller = %config.address,
            error = %why,
            retry_ms = delay.as_millis() as u64,
            "flow channel ended"
        );
        tokio::time::sleep(delay).await;
    }
}
