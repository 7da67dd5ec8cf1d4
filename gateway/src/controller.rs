//! Following the cluster's controller: register (node name, endpoint, public key — never the
//! private key), then apply the desired state it streams (a snapshot, then deltas). When the
//! controller goes away the data plane keeps running on the last state, and the gateway
//! reconnects with backoff; after a reconnect it gets a fresh snapshot.
//!
//! On the same stream the gateway reports its tunnels (an `AgentReport`) right after the
//! hello, after each plan it applies, and every `report_interval`, for the controller's
//! `GET /status`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_core::agent::{
    AgentHello, AgentReport, GatewayDesired, GatewayRegistration, GatewayUpdate, MAX_REPORT_FRAME,
};
use trellis_core::framing::{FrameDecoder, encode_json_frame};
use trellis_netns::Netns;

use crate::gateway::Reconciler;
use crate::routes::RouteTable;

/// The largest desired-state frame accepted (a mesh of thousands of nodes fits easily).
const MAX_FRAME: usize = 16 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A report the controller does not take within this long ends the connection.
const REPORT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the controller is and what to tell it.
#[derive(Debug, Clone)]
pub struct ControllerSource {
    pub address: SocketAddr,
    pub token: Option<String>,
    /// What to register with; when it changes (a key rotation) the gateway registers again
    /// on a new connection.
    pub registration: tokio::sync::watch::Receiver<GatewayRegistration>,
    /// How often to report the tunnels' status
    /// ([`trellis_core::status::REPORT_INTERVAL_SECONDS`] by default).
    pub report_interval: Duration,
}

/// Why a connection to the controller ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("connect")]
    Connect(#[source] std::io::Error),
    #[error("the controller closed the stream")]
    Closed,
    #[error("read")]
    Read(#[source] std::io::Error),
    #[error("write")]
    Write(#[source] std::io::Error),
    #[error("the controller did not take a report within {REPORT_WRITE_TIMEOUT:?}")]
    ReportTimeout,
    #[error(transparent)]
    Frame(#[from] trellis_core::framing::FrameError),
    #[error("delta from revision {from} does not follow revision {at}")]
    Gap { from: u64, at: u64 },
}

/// Follows the controller forever. `netns`: where to open the connection (the gateway's
/// namespace when it runs in-process in another one; `None` for the caller's).
pub async fn follow_controller<R: RouteTable>(
    reconciler: &Reconciler<R>,
    source: &ControllerSource,
    netns: Option<&Netns>,
    resync: Duration,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut current: Option<GatewayDesired> = None;
    let mut registration = source.registration.clone();
    loop {
        let outcome = session(
            reconciler,
            source,
            &mut registration,
            netns,
            resync,
            &mut current,
            &mut backoff,
        )
        .await;
        reconciler.metrics.controller_connected.set(0);
        match outcome {
            // The registration changed: register again at once.
            Ok(()) => continue,
            Err(end) => {
                tracing::warn!(controller = %source.address, "controller stream ended ({}); keeping the last state, reconnecting", trellis_core::error_chain(&end));
            }
        }
        // Jitter so a restarted controller is not hit by every gateway at once.
        let jitter = Duration::from_millis(u64::from(
            rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 100,
        ));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(address: SocketAddr, netns: Option<&Netns>) -> std::io::Result<TcpStream> {
    let stream = match netns {
        Some(netns) => {
            let std_stream = netns
                .run(|| std::net::TcpStream::connect_timeout(&address, CONNECT_TIMEOUT))
                .map_err(std::io::Error::other)??;
            std_stream.set_nonblocking(true)?;
            TcpStream::from_std(std_stream)?
        }
        None => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One connection: `Ok` when it ended because the registration changed.
async fn session<R: RouteTable>(
    reconciler: &Reconciler<R>,
    source: &ControllerSource,
    registration: &mut tokio::sync::watch::Receiver<GatewayRegistration>,
    netns: Option<&Netns>,
    resync: Duration,
    current: &mut Option<GatewayDesired>,
    backoff: &mut Duration,
) -> Result<(), SessionEnd> {
    let mut stream = connect(source.address, netns)
        .await
        .map_err(SessionEnd::Connect)?;
    let registered = registration.borrow_and_update().clone();
    let hello = AgentHello::gateway(registered.clone(), source.token.clone());
    let frame = encode_json_frame(&hello, "hello", MAX_FRAME)?;
    stream.write_all(&frame).await.map_err(SessionEnd::Write)?;
    tracing::info!(controller = %source.address, node = %registered.node, key = %registered.public_key, "registered with the controller");
    reconciler.metrics.controller_connected.set(1);

    let mut decoder = FrameDecoder::new(MAX_FRAME);
    let mut buffer = vec![0u8; 64 * 1024];
    // The first snapshot of this connection replaces whatever we had.
    let mut synced = false;
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report_tick =
        tokio::time::interval(source.report_interval.max(Duration::from_millis(100)));
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut reader, mut writer) = stream.split();
    let mut followed = true;
    loop {
        tokio::select! {
            changed = registration.changed(), if followed => match changed {
                Ok(()) => return Ok(()),
                // Nobody can change it any more.
                Err(_) => followed = false,
            },
            _ = report_tick.tick() => {
                let report = match crate::status::report(
                    &registered.node,
                    &reconciler.device,
                    &reconciler.metrics,
                ).await {
                    Ok(report) => report,
                    Err(e) => {
                        tracing::warn!("status report: {}", trellis_core::error_chain(&e));
                        continue;
                    }
                };
                // A report too large for the controller is skipped, not sent to end the stream.
                let frame = match encode_json_frame(
                    &AgentReport::Gateway(report),
                    "report",
                    MAX_REPORT_FRAME,
                ) {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::warn!("status report: {}", trellis_core::error_chain(&e));
                        continue;
                    }
                };
                tokio::time::timeout(REPORT_WRITE_TIMEOUT, writer.write_all(&frame))
                    .await
                    .map_err(|_| SessionEnd::ReportTimeout)?
                    .map_err(SessionEnd::Write)?;
            }
            read = reader.read(&mut buffer) => {
                let n = read.map_err(SessionEnd::Read)?;
                if n == 0 {
                    return Err(SessionEnd::Closed);
                }
                decoder.push(&buffer[..n]);
                while let Some(update) = decoder.next_json::<GatewayUpdate>()? {
                    reconciler.metrics.controller_updates.inc();
                    match (&update, current.as_mut()) {
                        (GatewayUpdate::Snapshot(snapshot), _) => {
                            *current = Some(snapshot.clone());
                            synced = true;
                        }
                        (GatewayUpdate::Delta { from, .. }, Some(state)) if synced => {
                            if !state.apply(&update) {
                                return Err(SessionEnd::Gap { from: *from, at: state.revision });
                            }
                        }
                        (GatewayUpdate::Delta { from, .. }, state) => {
                            return Err(SessionEnd::Gap { from: *from, at: state.map_or(0, |s| s.revision) });
                        }
                    }
                    *backoff = FIRST_BACKOFF;
                    if let Some(state) = current.as_ref() {
                        match reconciler.apply_plan(&state.plan()).await {
                            Ok(()) => {
                                reconciler.metrics.set_node_encryption(state.node_encryption);
                                // The controller hears about a newly applied plan at once.
                                report_tick.reset_immediately();
                            }
                            Err(e) => tracing::warn!("apply desired state revision {}: {}", state.revision, trellis_core::error_chain(&e)),
                        }
                    }
                }
            }
            _ = tick.tick() => {
                // Repair drift and retry failures on the last state.
                if let Some(state) = current.as_ref()
                    && let Err(e) = reconciler.apply_plan(&state.plan()).await
                {
                    tracing::warn!("re-apply desired state revision {}: {}", state.revision, trellis_core::error_chain(&e));
                }
            }
        }
    }
}
