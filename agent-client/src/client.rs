//! The one client of the agent port, for gateways and DNS: connect (inside a network
//! namespace when given), TCP keepalives and `TCP_USER_TIMEOUT` (a vanished controller is
//! found within about 30 s even while the stream is idle), TLS with the subscriber's identity,
//! the hello, then a snapshot and deltas checked for revision gaps (a gap reconnects, and a new
//! connection starts with a fresh snapshot), and reconnects with one capped exponential backoff
//! with jitter. The hello comes from a `watch` channel: when it changes (a gateway's new
//! WireGuard key) the client reconnects at once and registers the new one.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use trellis_core::agent::{AgentHello, AgentRole, GatewayDesired, GatewayUpdate};
use trellis_core::framing::{FrameDecoder, FrameError, encode_json_frame};
use trellis_core::imports::{Imports, ImportsUpdate};
use trellis_netns::Netns;

use crate::tls::ClientTls;

/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Unacknowledged data older than this ends the connection (`TCP_USER_TIMEOUT`).
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Capped exponential reconnect delays with jitter: each delay is drawn in `[d/2, d]` where
/// `d` doubles from [`BACKOFF_MIN`] up to [`BACKOFF_MAX`]. Pure.
#[derive(Debug, Clone)]
pub struct Backoff {
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            current: BACKOFF_MIN,
        }
    }
}

impl Backoff {
    /// The next delay; `random` is any `u64` (the jitter).
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let d = self.current;
        self.current = (d * 2).min(BACKOFF_MAX);
        let half = d.as_millis() as u64 / 2;
        Duration::from_millis(half + random % (half + 1))
    }

    /// Back to the shortest delay (after a connection delivered a snapshot).
    pub fn reset(&mut self) {
        self.current = BACKOFF_MIN;
    }
}

/// A replicated state: built from a snapshot, advanced by deltas.
pub trait Replica: Sized {
    type Update: DeserializeOwned;
    /// `update` as a fresh state if it is a snapshot.
    fn from_snapshot(update: &Self::Update) -> Option<Self>;
    /// Applies a delta; `false` if it does not follow this state's revision.
    fn advance(&mut self, update: &Self::Update) -> bool;
    fn revision(&self) -> u64;
}

impl Replica for GatewayDesired {
    type Update = GatewayUpdate;
    fn from_snapshot(update: &GatewayUpdate) -> Option<Self> {
        match update {
            GatewayUpdate::Snapshot(s) => Some(s.clone()),
            GatewayUpdate::Delta { .. } => None,
        }
    }
    fn advance(&mut self, update: &GatewayUpdate) -> bool {
        self.apply(update)
    }
    fn revision(&self) -> u64 {
        self.revision
    }
}

impl Replica for Imports {
    type Update = ImportsUpdate;
    fn from_snapshot(update: &ImportsUpdate) -> Option<Self> {
        match update {
            ImportsUpdate::Snapshot(_) => {
                let mut fresh = Imports::default();
                fresh.apply(update).then_some(fresh)
            }
            ImportsUpdate::Delta { .. } => None,
        }
    }
    fn advance(&mut self, update: &ImportsUpdate) -> bool {
        self.apply(update)
    }
    fn revision(&self) -> u64 {
        self.revision
    }
}

/// What the subscriber does with the stream.
#[allow(async_fn_in_trait)]
pub trait Handler {
    type State: Replica;
    /// The state after an update was applied. `true`: send a report now.
    async fn applied(&mut self, state: &Self::State) -> bool;
    /// Every `resync` interval with the last state (repair drift).
    async fn resync(&mut self, _state: &Self::State) {}
    /// A frame to send the controller (a gateway's report), every `report` interval.
    async fn report(&mut self, _hello: &AgentHello) -> Option<Vec<u8>> {
        None
    }
    /// The stream is up (`true`, after the hello) or ended (`false`, with its reason).
    fn connected(&mut self, _up: bool, _ended: Option<&Ended>) {}
}

/// How the client proves who it is.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Mutual TLS with the identity in the certificate (the normal mode).
    Tls(Arc<ClientTls>),
    /// Deprecated: plaintext TCP with the shared token in the hello, for a controller without
    /// agent TLS (the chart's only behind `agent.legacyToken.enabled`, insecure); see
    /// `SECURITY.md` ("The agent port").
    LegacyToken(Option<String>),
}

/// Where the controller is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The agent port, `HOST:PORT`.
    pub address: String,
    pub transport: Transport,
    /// The largest frame accepted ([`trellis_core::agent::MAX_AGENT_FRAME`]).
    pub max_frame: usize,
    /// Re-apply the last state this often (`None`: never).
    pub resync: Option<Duration>,
    /// Call [`Handler::report`] this often (`None`: never).
    pub report: Option<Duration>,
}

/// Why a connection ended; [`Ended::reason`] is a bounded metric label.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("connecting")]
    Connect(#[source] std::io::Error),
    #[error(
        "TLS handshake with the controller (is it the right controller, with a certificate from this cluster's agent CA?)"
    )]
    Tls(#[source] std::io::Error),
    #[error("encoding the hello")]
    EncodeHello(#[source] FrameError),
    #[error("sending the hello")]
    Hello(#[source] std::io::Error),
    #[error("reading")]
    Read(#[source] std::io::Error),
    #[error("writing")]
    Write(#[source] std::io::Error),
    #[error("the controller closed the stream")]
    Closed,
    #[error("reading a frame")]
    Frame(#[source] FrameError),
    #[error("a delta does not follow revision {have}")]
    Gap { have: u64 },
    #[error("the registration changed")]
    HelloChanged,
}

impl Ended {
    pub fn reason(&self) -> &'static str {
        match self {
            Ended::Connect(_) => "connect",
            Ended::Tls(_) => "tls",
            Ended::EncodeHello(_) | Ended::Hello(_) => "hello",
            Ended::Read(_) => "read",
            Ended::Write(_) => "write",
            Ended::Closed => "closed",
            Ended::Frame(FrameError::TooLarge { .. }) => "oversized_frame",
            Ended::Frame(_) => "malformed_frame",
            Ended::Gap { .. } => "gap",
            Ended::HelloChanged => "hello_changed",
        }
    }
}

fn timed_out() -> std::io::Error {
    std::io::ErrorKind::TimedOut.into()
}

/// A connection to the agent port (TLS, or plain TCP in the deprecated token mode).
pub trait AgentStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AgentStream for T {}

pub(crate) async fn tcp(address: &str, netns: Option<&Netns>) -> std::io::Result<TcpStream> {
    let stream = match netns {
        Some(netns) => {
            let address = address.to_owned();
            let std_stream = netns
                .run(move || {
                    let addrs = std::net::ToSocketAddrs::to_socket_addrs(&address)?;
                    let mut last = std::io::Error::other("no address");
                    for addr in addrs {
                        match std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                            Ok(s) => return Ok(s),
                            Err(e) => last = e,
                        }
                    }
                    Err(last)
                })
                .map_err(std::io::Error::other)??;
            std_stream.set_nonblocking(true)?;
            TcpStream::from_std(std_stream)?
        }
        None => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| timed_out())??,
    };
    stream.set_nodelay(true)?;
    // The stream may be idle for long: keepalives and the user timeout find a controller
    // that vanished.
    let sock = socket2::SockRef::from(&stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "setting TCP keepalive on the controller stream");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::warn!(error = %e, "setting TCP_USER_TIMEOUT on the controller stream");
    }
    Ok(stream)
}

/// Opens the stream and proves who we are (TLS): the stream the hello goes on.
async fn open(
    config: &ClientConfig,
    netns: Option<&Netns>,
) -> Result<(Box<dyn AgentStream>, Option<String>), Ended> {
    let tcp = tcp(&config.address, netns).await.map_err(Ended::Connect)?;
    match &config.transport {
        Transport::LegacyToken(token) => Ok((Box::new(tcp), token.clone())),
        Transport::Tls(tls) => {
            let (connector, name, _) = tls.connector();
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| Ended::Tls(timed_out()))?
                .map_err(Ended::Tls)?;
            Ok((Box::new(stream), None))
        }
    }
}

/// Connects to the agent port as [`follow`] does (namespace, keepalives, TLS with the
/// subscriber's identity) and sends the hello for `role`: the stream is then the caller's,
/// for a role whose conversation is not a replicated state (a gateway's flow channel).
/// Reconnecting is the caller's too, with a [`Backoff`].
pub async fn connect(
    config: &ClientConfig,
    netns: Option<&Netns>,
    role: AgentRole,
) -> Result<Box<dyn AgentStream>, Ended> {
    let (mut stream, token) = open(config, netns).await?;
    send_hello(&mut stream, &AgentHello { token, role }, config.max_frame).await?;
    Ok(stream)
}

async fn send_hello<W: AsyncWrite + Unpin>(
    writer: &mut W,
    hello: &AgentHello,
    max_frame: usize,
) -> Result<(), Ended> {
    let frame = encode_json_frame(hello, "hello", max_frame).map_err(Ended::EncodeHello)?;
    match tokio::time::timeout(WRITE_TIMEOUT, write_flushed(writer, &frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Ended::Hello(e)),
        Err(_) => Err(Ended::Hello(timed_out())),
    }
}

/// Follows the controller forever. `state` survives reconnects (the last state is what
/// [`Handler::resync`] re-applies); each connection must start with a snapshot.
pub async fn follow<H: Handler, R: Clone + Into<AgentRole>>(
    config: &ClientConfig,
    mut hello: watch::Receiver<R>,
    netns: Option<&Netns>,
    handler: &mut H,
    state: &mut Option<H::State>,
) {
    let mut backoff = Backoff::default();
    loop {
        let ended = session(config, &mut hello, netns, handler, state, &mut backoff).await;
        handler.connected(false, Some(&ended));
        if matches!(ended, Ended::HelloChanged) {
            tracing::info!(controller = %config.address, "registration changed: reconnecting");
            backoff.reset();
            continue;
        }
        let delay = backoff.next_delay(rand_core::RngCore::next_u64(&mut rand_core::OsRng));
        tracing::warn!(
            controller = %config.address,
            error = %trellis_core::error_chain(&ended),
            retry_ms = delay.as_millis() as u64,
            "controller stream ended; keeping the last state"
        );
        tokio::time::sleep(delay).await;
    }
}

/// Waits for the hello to change; never if its sender is gone (a constant hello).
async fn hello_changed<R>(hello: &mut watch::Receiver<R>, live: &mut bool) {
    if *live && hello.changed().await.is_ok() {
        return;
    }
    *live = false;
    std::future::pending().await
}

fn interval(period: Option<Duration>) -> tokio::time::Interval {
    // Without a period, a tick that never comes in practice.
    let period = period.unwrap_or(Duration::from_secs(86_400 * 365));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Writes `frame` and flushes it: over TLS the last records may otherwise stay in the
/// session's buffer until the next write, which may never come.
async fn write_flushed<W: AsyncWrite + Unpin>(writer: &mut W, frame: &[u8]) -> std::io::Result<()> {
    writer.write_all(frame).await?;
    writer.flush().await
}

async fn session<H: Handler, R: Clone + Into<AgentRole>>(
    config: &ClientConfig,
    hello_rx: &mut watch::Receiver<R>,
    netns: Option<&Netns>,
    handler: &mut H,
    state: &mut Option<H::State>,
    backoff: &mut Backoff,
) -> Ended {
    let (stream, token) = match open(config, netns).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let hello = AgentHello {
        token,
        role: hello_rx.borrow_and_update().clone().into(),
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    if let Err(e) = send_hello(&mut writer, &hello, config.max_frame).await {
        return e;
    }
    tracing::info!(controller = %config.address, "subscribed to the controller");
    handler.connected(true, None);
    let mut decoder = FrameDecoder::new(config.max_frame);
    let mut buf = vec![0u8; 64 * 1024];
    let mut synced = false;
    let mut live = true;
    let mut resync = interval(config.resync);
    // The first report goes right after the hello.
    let mut report = interval(config.report);
    if config.report.is_some() {
        report.reset_immediately();
    }
    loop {
        tokio::select! {
            () = hello_changed(hello_rx, &mut live) => return Ended::HelloChanged,
            _ = report.tick() => {
                if let Some(frame) = handler.report(&hello).await {
                    match tokio::time::timeout(WRITE_TIMEOUT, write_flushed(&mut writer, &frame)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Ended::Write(e),
                        Err(_) => return Ended::Write(timed_out()),
                    }
                }
            }
            _ = resync.tick() => {
                if let Some(current) = state.as_ref() {
                    handler.resync(current).await;
                }
            }
            read = reader.read(&mut buf) => {
                let n = match read {
                    Ok(0) => return Ended::Closed,
                    Ok(n) => n,
                    Err(e) => return Ended::Read(e),
                };
                decoder.push(&buf[..n]);
                loop {
                    let update = match decoder.next_json::<<H::State as Replica>::Update>() {
                        Ok(Some(u)) => u,
                        Ok(None) => break,
                        Err(e) => return Ended::Frame(e),
                    };
                    if let Some(fresh) = H::State::from_snapshot(&update) {
                        *state = Some(fresh);
                        synced = true;
                        backoff.reset();
                    } else {
                        // A connection starts with a snapshot; a delta before one is a gap.
                        match state.as_mut() {
                            Some(current) if synced => {
                                if !current.advance(&update) {
                                    return Ended::Gap { have: current.revision() };
                                }
                            }
                            current => {
                                return Ended::Gap {
                                    have: current.as_ref().map_or(0, |s| s.revision()),
                                };
                            }
                        }
                    }
                    if let Some(current) = state.as_ref()
                        && handler.applied(current).await
                    {
                        report.reset_immediately();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_sends_the_hello_and_hands_over_the_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ClientConfig {
            address: listener.local_addr().unwrap().to_string(),
            transport: Transport::LegacyToken(Some("secret".into())),
            max_frame: 1 << 20,
            resync: None,
            report: None,
        };
        let role = AgentRole::Flows(trellis_core::agent::FlowChannel { node: "n1".into() });
        let (client, server) = tokio::join!(connect(&config, None, role.clone()), async {
            listener.accept().await.unwrap().0
        });
        let mut client = client.unwrap();
        let mut server = server;
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut buf = [0u8; 1024];
        let hello = loop {
            let n = server.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "the hello comes before anything else");
            decoder.push(&buf[..n]);
            if let Some(hello) = decoder.next_json::<AgentHello>().unwrap() {
                break hello;
            }
        };
        assert_eq!(hello.role, role);
        assert_eq!(hello.token.as_deref(), Some("secret"));
        // The stream is the caller's after the hello.
        server.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn connect_to_nothing_says_connecting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let config = ClientConfig {
            address,
            transport: Transport::LegacyToken(None),
            max_frame: 1 << 20,
            resync: None,
            report: None,
        };
        let ended = connect(&config, None, AgentRole::Dns).await.err().unwrap();
        assert_eq!(ended.reason(), "connect");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::default();
        let lows: Vec<u64> = (0..8).map(|_| b.next_delay(0).as_millis() as u64).collect();
        assert_eq!(lows, [50, 100, 200, 400, 800, 1600, 2500, 2500]);
        let mut b = Backoff::default();
        for _ in 0..20 {
            let d = b.next_delay(u64::MAX);
            assert!(d >= BACKOFF_MIN / 2 && d <= BACKOFF_MAX, "{d:?}");
        }
        assert_eq!(b.next_delay(2500), BACKOFF_MAX);
        b.reset();
        assert!(b.next_delay(7) <= BACKOFF_MIN);
    }
}
