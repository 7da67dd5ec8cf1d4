//! The streams inside the cluster: each node's gateway and the cluster's DNS subscribe to the
//! controller and receive a snapshot, then deltas, whenever the mesh view changes.
//!
//! In-process, [`GatewaySubscription`] and [`ImportsSubscription`] are the API (the DNS crate
//! can embed or mirror them). Over the network, [`serve`] speaks the peering framing (4-byte
//! big-endian length + JSON) on TCP: the client's first frame is an [`AgentHello`]; the
//! controller then sends [`GatewayUpdate`]s or [`ImportsUpdate`]s. A gateway also sends
//! [`AgentReport`]s on its stream, which the hub keeps for `GET /status`; a report that does
//! not parse or validate is counted and skipped.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use trellis_core::admission::{SourceSlot, SourceSlots};
use trellis_core::framing::{FrameDecoder, FrameError, encode_json_frame};
use trellis_core::imports::{Imports, ImportsUpdate};

pub use trellis_core::agent::{AgentHello, AgentReport, AgentRole, MAX_REPORT_FRAME};

use crate::gateway::{GatewayDesired, GatewayRegistration, GatewayUpdate, desired_for};
use crate::hub::{Hub, MeshView};

/// Compares tokens in time independent of where they differ.
fn token_matches(expected: &str, got: Option<&str>) -> bool {
    let Some(got) = got else { return false };
    let (a, b) = (expected.as_bytes(), got.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Pure: turns successive mesh views into one node's gateway updates.
#[derive(Debug)]
pub struct GatewayFeed {
    node: String,
    last: Option<GatewayDesired>,
}

impl GatewayFeed {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            last: None,
        }
    }

    /// The update this view means for the gateway: a snapshot first, then deltas; `None` if
    /// nothing changed for this node.
    pub fn next(&mut self, view: &MeshView) -> Option<GatewayUpdate> {
        let desired = desired_for(
            &self.node,
            &view.local,
            &view.remote_refs(),
            view.node_encryption,
            view.revision,
        );
        let update = match &self.last {
            None => Some(GatewayUpdate::Snapshot(desired.clone())),
            Some(last) => last.delta_to(&desired),
        };
        if update.is_some() {
            self.last = Some(desired);
        }
        update
    }
}

/// Pure: turns successive mesh views into DNS updates.
#[derive(Debug, Default)]
pub struct ImportsFeed {
    last: Option<Arc<Imports>>,
}

impl ImportsFeed {
    pub fn next(&mut self, view: &MeshView) -> Option<ImportsUpdate> {
        let update = match &self.last {
            None => Some(ImportsUpdate::Snapshot((*view.imports).clone())),
            Some(last) => last.delta_to(&view.imports),
        };
        if update.is_some() {
            self.last = Some(view.imports.clone());
        }
        update
    }
}

async fn next_view(rx: &mut watch::Receiver<Option<Arc<MeshView>>>) -> Option<Arc<MeshView>> {
    loop {
        if let Some(v) = rx.borrow_and_update().clone() {
            return Some(v);
        }
        rx.changed().await.ok()?;
    }
}

/// Waits for the next mesh view that `step` turns into an update (the first call looks at the
/// current view; later ones wait for a change). `None` when the controller shuts down.
async fn next_update<U>(
    rx: &mut watch::Receiver<Option<Arc<MeshView>>>,
    started: &mut bool,
    mut step: impl FnMut(&MeshView) -> Option<U>,
) -> Option<U> {
    loop {
        if *started {
            rx.changed().await.ok()?;
        }
        *started = true;
        let view = next_view(rx).await?;
        if let Some(update) = step(&view) {
            return Some(update);
        }
    }
}

/// A gateway's stream of desired states. Registering it puts the node's key and endpoint into
/// the cluster state that peers receive.
#[derive(Debug)]
pub struct GatewaySubscription {
    hub: Hub,
    node: String,
    rx: watch::Receiver<Option<Arc<MeshView>>>,
    feed: GatewayFeed,
    started: bool,
}

impl GatewaySubscription {
    pub fn new(hub: &Hub, registration: GatewayRegistration) -> Self {
        let feed = GatewayFeed::new(registration.node.clone());
        let node = registration.node.clone();
        hub.register_gateway(registration);
        Self {
            hub: hub.clone(),
            node,
            rx: hub.subscribe_view(),
            feed,
            started: false,
        }
    }

    /// The next update; `None` when the controller shuts down.
    pub async fn next(&mut self) -> Option<GatewayUpdate> {
        next_update(&mut self.rx, &mut self.started, |view| self.feed.next(view)).await
    }
}

impl Drop for GatewaySubscription {
    fn drop(&mut self) {
        self.hub.gateway_disconnected(&self.node);
    }
}

/// DNS's stream of imported services.
#[derive(Debug)]
pub struct ImportsSubscription {
    rx: watch::Receiver<Option<Arc<MeshView>>>,
    feed: ImportsFeed,
    started: bool,
}

impl ImportsSubscription {
    pub fn new(hub: &Hub) -> Self {
        Self {
            rx: hub.subscribe_view(),
            feed: ImportsFeed::default(),
            started: false,
        }
    }

    pub async fn next(&mut self) -> Option<ImportsUpdate> {
        next_update(&mut self.rx, &mut self.started, |view| self.feed.next(view)).await
    }
}

/// A hello is a few hundred bytes (node name, endpoint, key, token).
const HELLO_MAX: usize = 4 * 1024;
/// A real agent sends its hello with the connection; the deadline only bounds how long an
/// idle client holds a pending slot.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections waiting for their hello, in all and per source (an IPv4 address or IPv6 /64):
/// silent clients take at most these, never the subscribers' slots, so a real gateway still
/// gets in while thousands of idle connections are open.
const MAX_PENDING_HELLOS: usize = 256;
const MAX_PENDING_PER_SOURCE: usize = 8;
const MAX_SUBSCRIBERS: usize = 4096;
/// A subscriber that does not take an update within this long is dropped (it gets a fresh
/// snapshot when it reconnects).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves gateway and DNS subscriptions on `listener` until cancelled. With a `token`, only
/// subscribers presenting it are served; without, anyone who can reach the listener can
/// register a gateway, so bind it to a trusted address.
pub async fn serve(listener: TcpListener, hub: Hub, max_frame: usize, token: Option<Arc<str>>) {
    let subscribers = Arc::new(Semaphore::new(MAX_SUBSCRIBERS));
    let pending = SourceSlots::new(MAX_PENDING_HELLOS, MAX_PENDING_PER_SOURCE);
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a subscriber");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match pending.try_acquire(remote.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                tracing::debug!(%remote, reason = refusal.label(), "refusing a connection before its hello");
                hub.metrics()
                    .connection_refused(crate::metrics::Listener::Agent, refusal.label());
                continue;
            }
        };
        let hub = hub.clone();
        let token = token.clone();
        let subscribers = subscribers.clone();
        tokio::spawn(async move {
            if let Err(e) = subscriber(stream, hub, max_frame, token, slot, subscribers).await {
                tracing::info!(%remote, error = %trellis_core::error_chain(&e), "subscriber ended");
            }
        });
    }
}

/// Why a subscriber's stream ended early (logged with its causes; not a library error: it
/// never leaves the listener).
#[derive(Debug, thiserror::Error)]
enum SubscriberError {
    #[error("reading the hello")]
    HelloFrame(#[source] FrameError),
    #[error("reading the hello")]
    HelloRead(#[source] std::io::Error),
    #[error("closed before its hello")]
    ClosedBeforeHello,
    #[error("no hello in time")]
    HelloTimeout,
    #[error("wrong or missing agent token")]
    Token,
    #[error("too many subscribers")]
    Full,
    #[error("encoding an update")]
    Encode(#[source] FrameError),
    #[error("subscriber stopped reading")]
    WriteTimeout,
    #[error("writing an update")]
    Write(#[source] std::io::Error),
    #[error("gateway {node}: reading its reports")]
    Reports {
        node: String,
        #[source]
        source: FrameError,
    },
}

/// Encodes `update` and writes it within [`WRITE_TIMEOUT`].
async fn send_update<T: serde::Serialize>(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    update: &T,
    label: &'static str,
    max_frame: usize,
) -> Result<(), SubscriberError> {
    let frame = encode_json_frame(update, label, max_frame).map_err(SubscriberError::Encode)?;
    tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&frame))
        .await
        .map_err(|_| SubscriberError::WriteTimeout)?
        .map_err(SubscriberError::Write)
}

/// The hello, and the decoder holding whatever followed it in the same reads.
async fn read_hello(stream: &mut TcpStream) -> Result<(AgentHello, FrameDecoder), SubscriberError> {
    let mut decoder = FrameDecoder::new(HELLO_MAX);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(hello) = decoder
            .next_json::<AgentHello>()
            .map_err(SubscriberError::HelloFrame)?
        {
            // What follows the hello is reports, which may be larger.
            decoder.set_max(MAX_REPORT_FRAME);
            return Ok((hello, decoder));
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(SubscriberError::HelloRead)?;
        if n == 0 {
            return Err(SubscriberError::ClosedBeforeHello);
        }
        decoder.push(&buf[..n]);
    }
}

async fn subscriber(
    mut stream: TcpStream,
    hub: Hub,
    max_frame: usize,
    token: Option<Arc<str>>,
    pending: SourceSlot,
    subscribers: Arc<Semaphore>,
) -> Result<(), SubscriberError> {
    let (hello, mut reports) = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream))
        .await
        .map_err(|_| SubscriberError::HelloTimeout)??;
    drop(pending);
    if let Some(expected) = &token
        && !token_matches(expected, hello.token.as_deref())
    {
        hub.metrics().auth_failure("agent_token");
        return Err(SubscriberError::Token);
    }
    let Ok(_subscriber) = subscribers.try_acquire_owned() else {
        hub.metrics()
            .connection_refused(crate::metrics::Listener::Agent, "subscribers_full");
        return Err(SubscriberError::Full);
    };
    let (rd, mut wr) = stream.into_split();
    match hello.role {
        AgentRole::Gateway(reg) => {
            tracing::info!(node = %reg.node, endpoint = %reg.endpoint, "gateway registered");
            let node = reg.node.clone();
            let sub = GatewaySubscription::new(&hub, reg);
            take_reports(&hub, &node, &mut reports)?;
            stream_updates(sub, rd, &mut wr, max_frame, |data| {
                reports.push(data);
                take_reports(&hub, &node, &mut reports)
            })
            .await
        }
        // DNS sends nothing after its hello: its connection is only watched for the close.
        AgentRole::Dns => {
            let sub = ImportsSubscription::new(&hub);
            stream_updates(sub, rd, &mut wr, max_frame, |_| Ok(())).await
        }
    }
}

/// A stream of updates for one kind of agent, so that both kinds are served by one loop.
trait Updates {
    type Update: serde::Serialize;
    /// What an update is called in encoding errors.
    const LABEL: &'static str;
    /// How much of what the agent sends is read at once: a gateway sends reports, DNS
    /// nothing (its connection is read only to see it close, so it holds no 64 KiB buffer).
    const READ_BUFFER: usize;
    fn recv(&mut self) -> impl Future<Output = Option<Self::Update>> + Send;
}

impl Updates for GatewaySubscription {
    type Update = GatewayUpdate;
    const LABEL: &'static str = "gateway update";
    const READ_BUFFER: usize = 64 * 1024;
    fn recv(&mut self) -> impl Future<Output = Option<GatewayUpdate>> + Send {
        self.next()
    }
}

impl Updates for ImportsSubscription {
    type Update = ImportsUpdate;
    const LABEL: &'static str = "imports update";
    const READ_BUFFER: usize = 1;
    fn recv(&mut self) -> impl Future<Output = Option<ImportsUpdate>> + Send {
        self.next()
    }
}

/// Sends `sub`'s updates until the controller shuts down or the agent goes away, handing
/// what the agent sends to `received`.
async fn stream_updates<S: Updates>(
    mut sub: S,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    max_frame: usize,
    mut received: impl FnMut(&[u8]) -> Result<(), SubscriberError>,
) -> Result<(), SubscriberError> {
    let mut buf = vec![0u8; S::READ_BUFFER];
    loop {
        tokio::select! {
            u = sub.recv() => {
                let Some(u) = u else { return Ok(()) };
                send_update(wr, &u, S::LABEL, max_frame).await?;
            }
            r = rd.read(&mut buf) => {
                match r {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(n) => received(&buf[..n])?,
                }
            }
        }
    }
}

/// Hands every complete report in `decoder` to the hub. A frame that is not a valid report is
/// counted and skipped; an oversized frame ends the stream (the framing is lost).
fn take_reports(hub: &Hub, node: &str, decoder: &mut FrameDecoder) -> Result<(), SubscriberError> {
    loop {
        match decoder.next_json::<AgentReport>() {
            Ok(Some(AgentReport::Gateway(report))) => {
                if let Err(e) = hub.gateway_report(node, report) {
                    tracing::warn!(%node, error = %e, "refused a gateway report");
                }
            }
            Ok(None) => return Ok(()),
            Err(FrameError::Malformed(cause)) => {
                hub.metrics()
                    .gateway_report(crate::metrics::ReportResult::Rejected);
                tracing::warn!(%node, error = %cause, "skipped an unreadable gateway report");
            }
            Err(e) => {
                hub.metrics()
                    .gateway_report(crate::metrics::ReportResult::Rejected);
                return Err(SubscriberError::Reports {
                    node: node.to_owned(),
                    source: e,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::HubConfig;
    use crate::metrics::Metrics;
    use crate::source::SourceState;
    use trellis_core::cluster::PublicKey;
    use trellis_core::cluster::fixture::{cluster, export, id};

    fn hub() -> Hub {
        let h = Hub::new(
            HubConfig {
                id: id("a"),
                name: "a".into(),
                service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
                lease: Duration::from_secs(30),
                node_encryption: false,
                recent_deltas: 16,
                startup_grace: Duration::ZERO,
            },
            Metrics::new().unwrap(),
        );
        h.set_configured_peers(vec![id("b")]);
        h.set_configured_allowance(&id("b"), Some(vec!["10.0.0.0/8".parse().unwrap()]));
        h
    }

    /// A hub with the local cluster's source, and the agent port serving it (asking for
    /// `token` when given) on a loopback port.
    async fn agent_server(
        token: Option<&str>,
    ) -> (Hub, std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let h = hub();
        h.set_source(src());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, h.clone(), 1 << 20, token.map(Arc::from)));
        (h, addr, server)
    }

    fn src() -> SourceState {
        let c = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        SourceState {
            nodes: c.nodes,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn gateways_get_a_snapshot_then_deltas_over_tcp() {
        let (h, addr, server) = agent_server(Some("s3cret")).await;
        let reg = GatewayRegistration {
            node: "node-0".into(),
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            public_key: PublicKey([3; 32]),
        };
        // A wrong token is refused before anything is registered.
        let mut bad = TcpStream::connect(addr).await.unwrap();
        send_hello(
            &mut bad,
            &AgentHello::gateway(reg.clone(), Some("guess".into())),
        )
        .await;
        let mut sink = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut sink))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "a refused subscriber gets nothing");
        assert!(h.local_state().nodes["node-0"].gateway.is_none());
        assert!(h.metrics().render().contains("reason=\"agent_token\""));
        let mut conn = TcpStream::connect(addr).await.unwrap();
        send_hello(&mut conn, &AgentHello::gateway(reg, Some("s3cret".into()))).await;
        let mut updates = UpdateReader::new();
        let GatewayUpdate::Snapshot(mut state) = updates.next(&mut conn).await else {
            panic!("first update must be a snapshot")
        };
        assert!(state.peers.is_empty());
        // The registration reached the local cluster state.
        assert!(h.local_state().nodes["node-0"].gateway.is_some());
        // A remote cluster appears: a delta adds its peer and routes.
        let mut b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
        b.nodes.get_mut("node-0").unwrap().gateway = Some(trellis_core::cluster::NodeGateway {
            endpoint: "192.168.2.10:51820".parse().unwrap(),
            public_key: PublicKey([4; 32]),
        });
        h.peer_snapshot(b);
        let update = updates.next(&mut conn).await;
        assert!(matches!(update, GatewayUpdate::Delta { .. }), "{update:?}");
        assert!(state.apply(&update));
        assert_eq!(state.peers.len(), 1);
        // Node encryption on is pushed too.
        h.set_node_encryption(true);
        let update = updates.next(&mut conn).await;
        assert!(state.apply(&update));
        assert!(state.node_encryption);
        server.abort();
    }

    /// Registers a gateway from `source` (a loopback address of its own) and waits for its
    /// snapshot; how long that took.
    async fn register_from(source: &str, addr: std::net::SocketAddr) -> Duration {
        let started = std::time::Instant::now();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let mut conn = socket.connect(addr).await.unwrap();
        let reg = GatewayRegistration {
            node: "node-0".into(),
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            public_key: PublicKey([3; 32]),
        };
        send_hello(&mut conn, &AgentHello::gateway(reg, Some("s3cret".into()))).await;
        let update = UpdateReader::new().next(&mut conn).await;
        assert!(matches!(update, GatewayUpdate::Snapshot(_)));
        started.elapsed()
    }

    /// Sends `hello` as an agent does, as its first frame.
    async fn send_hello(conn: &mut TcpStream, hello: &AgentHello) {
        conn.write_all(&encode_json_frame(hello, "hello", 1 << 20).unwrap())
            .await
            .unwrap();
    }

    /// A gateway's side of its stream: the updates it reads.
    struct UpdateReader {
        decoder: FrameDecoder,
        buf: Vec<u8>,
    }

    impl UpdateReader {
        fn new() -> Self {
            Self {
                decoder: FrameDecoder::new(1 << 20),
                buf: vec![0u8; 65536],
            }
        }

        /// The next update, within 5 s of reading.
        async fn next(&mut self, conn: &mut TcpStream) -> GatewayUpdate {
            loop {
                if let Some(update) = self.decoder.next_json::<GatewayUpdate>().unwrap() {
                    return update;
                }
                let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut self.buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "the controller closed the gateway's stream");
                self.decoder.push(&self.buf[..n]);
            }
        }
    }

    /// The tests that open 10,000 connections take turns: together they would pass the
    /// process's file descriptor limit.
    static MANY_CONNECTIONS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn ten_thousand_silent_connections_do_not_keep_a_gateway_out() {
        let _turn = MANY_CONNECTIONS.lock().await;
        let (h, addr, server) = agent_server(Some("s3cret")).await;
        // An attacker on one address opens connections and sends nothing.
        let mut silent = Vec::new();
        for _ in 0..10_000 {
            match TcpStream::connect(addr).await {
                Ok(stream) => silent.push(stream),
                Err(e) => panic!("connect {}: {e}", silent.len()),
            }
        }
        let took = tokio::time::timeout(Duration::from_secs(2), register_from("127.0.0.2", addr))
            .await
            .expect("a gateway registers within 2 s while 10,000 connections sit idle");
        eprintln!(
            "registered in {took:?} beside {} silent connections",
            silent.len()
        );
        assert!(
            h.metrics().render().contains(
                "trellis_controller_connections_refused_total{listener=\"agent\",reason=\"source_pending_full\"}"
            ),
            "the silent ones beyond the source's share were refused"
        );
        // The ones that got a pending slot lose it at the hello deadline.
        let mut closed = 0;
        for stream in silent.iter_mut().take(MAX_PENDING_PER_SOURCE) {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(HELLO_TIMEOUT * 2, stream.read(&mut byte)).await;
            if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                closed += 1;
            }
        }
        assert_eq!(
            closed, MAX_PENDING_PER_SOURCE,
            "idle clients are closed after the deadline"
        );
        server.abort();
    }

    /// This process's resident memory.
    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Connections the server on `port` still holds open (established, or closed by the peer
    /// but not by the server), from the kernel's table: other tests in this process, and the
    /// connections the server has already closed, do not count.
    fn held_on(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let local = format!(":{port:04X}");
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 3 && fields[1].ends_with(&local) && matches!(fields[3], "01" | "08")
            })
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_non_reading_status_clients_cost_little_and_block_nobody() {
        let _turn = MANY_CONNECTIONS.lock().await;
        let h = hub();
        h.set_source(src());
        let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent_addr = agent.local_addr().unwrap();
        let agent_task = tokio::spawn(serve(agent, h.clone(), 1 << 20, Some("s3cret".into())));
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        let status_hub = h.clone();
        let http_task = tokio::spawn(crate::metrics::serve(
            http,
            h.metrics().clone(),
            Arc::new(move || serde_json::to_string_pretty(&status_hub.status()).unwrap()),
        ));
        let rss_before = rss_kib();
        let mut clients = Vec::new();
        for _ in 0..10_000 {
            let mut stream = TcpStream::connect(http_addr).await.unwrap();
            // Ask and never read.
            let _ = stream
                .write_all(b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")
                .await;
            clients.push(stream);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Connections the server still holds (not yet closed by it), its listener included.
        let server_side = held_on(http_addr.port());
        let grown = rss_kib().saturating_sub(rss_before);
        eprintln!("resident memory grew by {grown} KiB (clients and server together)");
        assert!(grown < 64 * 1024, "{grown} KiB");
        eprintln!(
            "10,000 non-reading /status clients: {server_side} descriptors on the server's side"
        );
        assert!(
            server_side <= 100,
            "{server_side} descriptors held for them"
        );
        // Someone else still reads the status, and a gateway still registers.
        let status = tokio::task::spawn_blocking(move || {
            trellis_http::client::get_from(
                Some("127.0.0.2:0".parse().unwrap()),
                http_addr,
                "/status",
                Duration::from_secs(2),
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(status.status, 200);
        let took = tokio::time::timeout(
            Duration::from_secs(2),
            register_from("127.0.0.3", agent_addr),
        )
        .await
        .expect("a gateway registers within 2 s");
        eprintln!("gateway registered in {took:?}");
        drop(clients);
        agent_task.abort();
        http_task.abort();
    }

    #[tokio::test]
    async fn an_oversized_hello_is_refused() {
        let (h, addr, server) = agent_server(None).await;
        let reg = GatewayRegistration {
            node: "n".repeat(HELLO_MAX),
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            public_key: PublicKey([3; 32]),
        };
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let hello = AgentHello::gateway(reg, None);
        let _ = conn
            .write_all(&encode_json_frame(&hello, "hello", 1 << 20).unwrap())
            .await;
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut sink)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        assert!(h.local_state().nodes["node-0"].gateway.is_none());
        server.abort();
    }

    #[tokio::test]
    async fn gateway_reports_reach_the_status_and_garbage_is_counted() {
        let (h, addr, server) = agent_server(None).await;
        let reg = GatewayRegistration {
            node: "node-0".into(),
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            public_key: PublicKey([3; 32]),
        };
        let report = |node: &str, revision| {
            AgentReport::Gateway(trellis_core::status::GatewayReport {
                node: node.into(),
                revision,
                node_encryption: Some(false),
                peers: Vec::new(),
                drops: Default::default(),
            })
        };
        // The hello, a report in the same write, a frame that is no report and a report
        // claiming another node: the first is kept, the other two are counted and skipped.
        let mut bytes =
            encode_json_frame(&AgentHello::gateway(reg, None), "hello", 1 << 20).unwrap();
        bytes.extend(encode_json_frame(&report("node-0", 1), "r", 1 << 20).unwrap());
        bytes.extend(encode_json_frame(&[1, 2, 3], "junk", 1 << 20).unwrap());
        bytes.extend(encode_json_frame(&report("node-9", 2), "r", 1 << 20).unwrap());
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(&bytes).await.unwrap();
        let node_status =
            async |h: &Hub, want: &dyn Fn(&trellis_core::status::NodeStatus) -> bool| {
                trellis_test_support::eventually_async(
                    "node-0 to reach the wanted status",
                    Duration::from_secs(20),
                    || async {
                        h.status()
                            .nodes
                            .into_iter()
                            .find(|n| n.node == "node-0" && want(n))
                    },
                )
                .await
            };
        let seen = node_status(&h, &|n| n.report.is_some()).await;
        assert!(seen.in_source && seen.registered && seen.connected);
        assert_eq!(seen.report.unwrap().revision, 1);
        assert_eq!(seen.report_age_seconds, Some(0));
        let text = h.metrics().render();
        assert!(
            text.contains("trellis_controller_gateway_reports_total{result=\"accepted\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("trellis_controller_gateway_reports_total{result=\"rejected\"} 2"),
            "{text}"
        );
        // A later report replaces it; the stream closing leaves the report, marked
        // disconnected.
        conn.write_all(&encode_json_frame(&report("node-0", 5), "r", 1 << 20).unwrap())
            .await
            .unwrap();
        node_status(&h, &|n| n.report.as_ref().is_some_and(|r| r.revision == 5)).await;
        // An oversized frame ends the stream.
        conn.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let gone = node_status(&h, &|n| !n.connected).await;
        assert_eq!(gone.report.unwrap().revision, 5);
        server.abort();
    }

    #[test]
    fn hellos_have_a_flat_wire_form() {
        let h = AgentHello::dns(Some("t".into()));
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"token":"t","type":"dns"}"#
        );
        let g: AgentHello = serde_json::from_str(
            r#"{"type":"gateway","node":"n","endpoint":"10.0.0.1:51820",
                "public_key":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="}"#,
        )
        .unwrap();
        assert!(matches!(g.role, AgentRole::Gateway(_)));
        assert!(g.token.is_none());
        assert!(token_matches("abc", Some("abc")));
        assert!(!token_matches("abc", Some("abd")));
        assert!(!token_matches("abc", Some("ab")));
        assert!(!token_matches("abc", None));
    }

    #[tokio::test]
    async fn dns_sees_imports_change() {
        let h = hub();
        h.set_source(src());
        let mut sub = ImportsSubscription::new(&h);
        let Some(ImportsUpdate::Snapshot(mut imports)) = sub.next().await else {
            panic!("snapshot first")
        };
        assert!(imports.services.is_empty());
        let mut b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
        export(&mut b.services, "shop", "web", "10.97.0.10", &["10.2.0.5"]);
        h.peer_snapshot(b);
        let update = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert!(imports.apply(&update));
        assert!(imports.services.contains_key("shop/web"));
        // A change that does not touch imports sends nothing to DNS.
        h.set_node_encryption(true);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), sub.next())
                .await
                .is_err()
        );
    }
}
