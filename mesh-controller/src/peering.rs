//! Peering over QUIC: one endpoint that accepts peers and dials the configured ones, one
//! bidirectional stream per connection carrying the `trellis/1` protocol, driven by the sans-IO
//! [`Session`]; beside it, either side may open short-lived streams asking the other for
//! flows ([`crate::flows::peer`]). A failing connection (bad certificate, malformed or oversized frame, revision
//! gap, silence) is closed alone; other peers never notice.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rustls_pki_types::CertificateDer;
use tokio::task::JoinSet;
use trellis_core::admission::SourceSlots;
use trellis_core::cluster::ClusterId;
use trellis_core::peering::{Event, PeeringError, Session, SessionConfig, Version};

use crate::certs::identity_name;
use crate::hub::Hub;
use crate::sessions::SessionRefusal;
use crate::tls::{AllowedPeers, TlsMaterial, identity_of};
use crate::{Error, QuicCause, TlsCause};

/// Application close codes on the QUIC connection.
pub mod close_code {
    pub const DONE: u32 = 0;
    pub const PROTOCOL: u32 = 1;
    pub const DUPLICATE: u32 = 2;
    pub const LEASE_EXPIRED: u32 = 3;
    pub const SHUTDOWN: u32 = 4;
    pub const REPLACED: u32 = 5;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: ClusterId,
    /// Where to dial the peer; `None` if only the peer dials us.
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct PeeringConfig {
    pub listen: SocketAddr,
    pub peers: Vec<PeerConfig>,
    pub heartbeat: Duration,
    pub lease: Duration,
    pub max_frame: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// At most this many handshakes in flight from unauthenticated senders.
    pub max_pending_handshakes: usize,
    pub tls: TlsMaterial,
}

/// Exponential backoff with ±20 % jitter, reset after a session that lasted.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay before the next attempt, without jitter applied.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// The next delay with jitter; doubles the following one up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let mut h = RandomState::new().build_hasher();
        h.write_u64(0);
        let unit = (h.finish() % 1000) as f64 / 1000.0; // [0, 1)
        base.mul_f64(0.8 + 0.4 * unit)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A running peering endpoint.
#[derive(Debug)]
pub struct Peering {
    endpoint: quinn::Endpoint,
    tasks: JoinSet<()>,
    allowed: AllowedPeers,
    /// Read by both QUIC configurations at every handshake; replaced on reload.
    creds: Arc<crate::tls::PeeringCredentials>,
    id: ClusterId,
}

fn quic_err<E: Into<QuicCause>>(operation: &'static str) -> impl Fn(E) -> Error {
    move |e| Error::Quic {
        operation,
        source: e.into(),
    }
}

/// The certificate in `material` must be this cluster's.
fn check_own_identity(material: &TlsMaterial, id: &ClusterId) -> Result<(), Error> {
    let own = crate::tls::parse_certs(&material.cert_pem)?;
    let certified = own
        .first()
        .map(identity_of)
        .transpose()?
        .ok_or(Error::Tls {
            operation: "reading this cluster's certificate",
            source: TlsCause::NoCertificate,
        })?;
    if &certified != id {
        return Err(Error::Tls {
            operation: "checking this cluster's certificate",
            source: TlsCause::OtherCluster {
                certified,
                configured: id.clone(),
            },
        });
    }
    Ok(())
}

/// The QUIC server and client configurations for `material`.
fn quic_configs(
    creds: &Arc<crate::tls::PeeringCredentials>,
    allowed: &AllowedPeers,
    metrics: &crate::metrics::Metrics,
    transport: Arc<quinn::TransportConfig>,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), Error> {
    let server = crate::tls::server_config_with(creds, allowed.clone(), metrics.clone())?;
    let client = crate::tls::client_config_with(creds, metrics.clone())?;
    let server_crypto =
        QuicServerConfig::try_from(server).map_err(quic_err("QUIC server crypto"))?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_cfg.transport_config(transport.clone());
    let client_crypto =
        QuicClientConfig::try_from(client).map_err(quic_err("QUIC client crypto"))?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_cfg.transport_config(transport);
    Ok((server_cfg, client_cfg))
}

impl Peering {
    /// Binds the endpoint and starts accepting and dialing.
    pub fn start(cfg: PeeringConfig, hub: Hub) -> Result<Self, Error> {
        let socket =
            std::net::UdpSocket::bind(cfg.listen).map_err(|source| Error::BindPeering {
                addr: cfg.listen,
                source,
            })?;
        Self::start_on(cfg, hub, socket)
    }

    /// Starts on an already bound UDP socket (tests bind first to learn each other's ports).
    pub fn start_on(
        cfg: PeeringConfig,
        hub: Hub,
        socket: std::net::UdpSocket,
    ) -> Result<Self, Error> {
        let metrics = hub.metrics().clone();
        check_own_identity(&cfg.tls, hub.id())?;
        let allowed: AllowedPeers = Arc::new(std::sync::RwLock::new(
            cfg.peers.iter().map(|p| p.id.clone()).collect(),
        ));
        hub.set_configured_peers(cfg.peers.iter().map(|p| p.id.clone()).collect());
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(cfg.heartbeat));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(cfg.lease).map_err(quic_err("idle timeout"))?,
        ));
        // The session's stream, and a peer's flow queries: twice the answered ones, so that a
        // query beyond them is answered with a refusal rather than left waiting for credit.
        transport.max_concurrent_bidi_streams(VarInt::from_u32(
            1 + 2 * crate::flows::MAX_PEER_FLOW_QUERIES as u32,
        ));
        transport.max_concurrent_uni_streams(VarInt::from_u32(0));
        let transport = Arc::new(transport);
        let creds = crate::tls::PeeringCredentials::new(&cfg.tls)?;
        let (server_cfg, client_cfg) = quic_configs(&creds, &allowed, &metrics, transport)?;
        let runtime = quinn::default_runtime().ok_or(Error::Quic {
            operation: "starting the peering endpoint",
            source: QuicCause::NoRuntime,
        })?;
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_cfg),
            socket,
            runtime,
        )
        .map_err(quic_err("starting the peering endpoint"))?;
        endpoint.set_default_client_config(client_cfg);
        let cfg = Arc::new(cfg);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(endpoint.clone(), hub.clone(), cfg.clone()));
        for peer in &cfg.peers {
            if let Some(addr) = peer.endpoint {
                tasks.spawn(dial_loop(
                    endpoint.clone(),
                    hub.clone(),
                    cfg.clone(),
                    peer.id.clone(),
                    addr,
                ));
            }
        }
        tasks.spawn(hub.clone().run_expiry());
        Ok(Self {
            endpoint,
            tasks,
            allowed,
            creds,
            id: hub.id().clone(),
        })
    }

    /// From now on new handshakes, both ways, use `material` (a renewed certificate, key or
    /// mesh CA); open connections keep the one they were made with, so a peer sees no gap.
    /// Refused, and the old material kept, if it does not load or names another cluster.
    pub fn reload_tls(&self, material: &TlsMaterial) -> Result<(), Error> {
        check_own_identity(material, &self.id)?;
        self.creds.reload(material)
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.endpoint.local_addr().map_err(|e| Error::Quic {
            operation: "reading the peering address",
            source: e.into(),
        })
    }

    pub fn allowed_peers(&self) -> &AllowedPeers {
        &self.allowed
    }

    /// Closes every connection and stops all tasks.
    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.endpoint
            .close(VarInt::from_u32(close_code::SHUTDOWN), b"shutting down");
        // Bounded: peers may be gone already.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// TLS alert 120, `no_application_protocol`: the peer offered no version we speak.
fn is_alpn_refusal(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::TransportError(t)
        if t.code == quinn::TransportErrorCode::crypto(120))
}

/// The protocol version the handshake negotiated, if it is one we speak.
fn negotiated(conn: &Connection) -> Option<Version> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .and_then(|p| Version::from_alpn(&p))
}

fn alpn_ok(conn: &Connection) -> bool {
    negotiated(conn).is_some()
}

/// The peer's leaf certificate (DER), which tells two holders of the same cluster ID apart.
fn peer_cert(conn: &Connection) -> Option<Vec<u8>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    Some(certs.first()?.as_ref().to_vec())
}

fn certified_peer(conn: &Connection) -> Option<ClusterId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    identity_of(certs.first()?).ok()
}

/// How long a peer's TLS handshake may take: seconds, not a lease, since each pending one
/// holds a slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pending handshakes one source (an IPv4 address or IPv6 /64) may hold: a peer cluster dials
/// from one address, once at a time.
const MAX_PENDING_PER_SOURCE: usize = 4;

async fn accept_loop(endpoint: quinn::Endpoint, hub: Hub, cfg: Arc<PeeringConfig>) {
    let pending = SourceSlots::new(cfg.max_pending_handshakes.max(1), MAX_PENDING_PER_SOURCE);
    let mut sessions = JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        while sessions.try_join_next().is_some() {}
        // A stateless retry first: the client must prove it receives at its address before
        // any state or handshake work is spent on it, so spoofed Initials cost one packet.
        if !incoming.remote_address_validated() && incoming.may_retry() {
            if let Err(e) = incoming.retry() {
                tracing::debug!(error = %e, "QUIC retry");
            }
            continue;
        }
        let permit = match pending.try_acquire(incoming.remote_address().ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                tracing::warn!(remote = %incoming.remote_address(), reason = refusal.label(), "refusing a peering handshake");
                hub.metrics()
                    .connection_refused(crate::metrics::Listener::Peering, refusal.label());
                incoming.refuse();
                continue;
            }
        };
        let hub = hub.clone();
        let cfg = cfg.clone();
        sessions.spawn(async move {
            let remote = incoming.remote_address();
            let handshake =
                tokio::time::timeout(HANDSHAKE_TIMEOUT.min(cfg.lease), async { incoming.await });
            let conn = match handshake.await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    if is_alpn_refusal(&e) {
                        hub.metrics().auth_failure("alpn");
                        tracing::warn!(%remote, "refused a peer offering no protocol version we speak");
                    } else {
                        tracing::info!(%remote, error = %trellis_core::error_chain(&e), "peering handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "peering handshake timed out");
                    return;
                }
            };
            drop(permit);
            if !alpn_ok(&conn) {
                hub.metrics().auth_failure("alpn");
                tracing::warn!(%remote, "peer negotiated none of the protocol versions we speak (trellis/2, trellis/1)");
                conn.close(VarInt::from_u32(close_code::PROTOCOL), b"alpn");
                return;
            }
            let Some(peer) = certified_peer(&conn) else {
                hub.metrics().auth_failure("no_identity");
                conn.close(VarInt::from_u32(close_code::PROTOCOL), b"no identity");
                return;
            };
            let streams = tokio::time::timeout(cfg.lease, conn.accept_bi()).await;
            let Ok(Ok((send, recv))) = streams else {
                tracing::info!(%remote, %peer, "peer opened no stream");
                conn.close(VarInt::from_u32(close_code::PROTOCOL), b"no stream");
                return;
            };
            tracing::info!(%remote, %peer, "accepted a peer");
            run_session(hub, conn, send, recv, peer.clone(), peer, cfg).await;
        });
    }
    sessions.shutdown().await;
}

async fn dial_loop(
    endpoint: quinn::Endpoint,
    hub: Hub,
    cfg: Arc<PeeringConfig>,
    peer: ClusterId,
    addr: SocketAddr,
) {
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    loop {
        if hub.is_connected(&peer) {
            tokio::time::sleep(cfg.backoff_min.max(Duration::from_millis(50))).await;
            continue;
        }
        let started = Instant::now();
        match dial(&endpoint, &peer, addr, cfg.lease).await {
            Ok((conn, send, recv)) => {
                tracing::info!(%peer, %addr, "connected to peer");
                run_session(
                    hub.clone(),
                    conn,
                    send,
                    recv,
                    peer.clone(),
                    hub.id().clone(),
                    cfg.clone(),
                )
                .await;
                if started.elapsed() > cfg.lease {
                    backoff.reset();
                }
            }
            Err(e) => {
                tracing::info!(%peer, %addr, error = %trellis_core::error_chain(&e), retry_in = ?backoff.peek(), "dialing peer failed")
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn dial(
    endpoint: &quinn::Endpoint,
    peer: &ClusterId,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(Connection, SendStream, RecvStream), Error> {
    fn err<E: Into<QuicCause>>(operation: &'static str) -> impl Fn(E) -> Error {
        move |e| Error::Quic {
            operation,
            source: e.into(),
        }
    }
    let connecting = endpoint
        .connect(addr, &identity_name(peer))
        .map_err(err("starting a connection"))?;
    let conn = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(err("connecting"))?
        .map_err(err("connecting"))?;
    if !alpn_ok(&conn) {
        conn.close(VarInt::from_u32(close_code::PROTOCOL), b"alpn");
        return Err(Error::Quic {
            operation: "negotiating the protocol",
            source: QuicCause::Alpn,
        });
    }
    let (send, recv) = conn.open_bi().await.map_err(err("opening the stream"))?;
    Ok((conn, send, recv))
}

/// Drives one connection's session until it ends, then closes the connection.
async fn run_session(
    hub: Hub,
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    peer: ClusterId,
    dialer: ClusterId,
    cfg: Arc<PeeringConfig>,
) {
    let cert = peer_cert(&conn).unwrap_or_default();
    let ticket = match hub.session_start(&peer, &dialer, &cert, conn.remote_address()) {
        Ok(t) => t,
        Err(e @ SessionRefusal::Duplicate { .. }) => {
            tracing::info!(%peer, %dialer, "{e}; closing the other connection");
            conn.close(VarInt::from_u32(close_code::DUPLICATE), b"duplicate");
            return;
        }
        Err(e @ SessionRefusal::DuplicateClusterId { .. }) => {
            hub.metrics().auth_failure(e.kind());
            tracing::error!(%peer, "refusing a peer: {e}");
            conn.close(
                VarInt::from_u32(close_code::DUPLICATE),
                e.to_string().as_bytes(),
            );
            return;
        }
    };
    // While the session runs, flows can be asked of the peer over this connection, and the
    // peer's flow queries (streams it opens beside the session's) are answered.
    let flows_registration = hub.flows().peer_connected(&peer, &conn);
    let flow_answers = tokio::spawn(
        hub.flows()
            .clone()
            .serve_peer_streams(peer.clone(), conn.clone()),
    );
    let (code, reason) = drive(
        &hub,
        &conn,
        send,
        recv,
        &peer,
        &cfg,
        ticket.cancelled.clone(),
    )
    .await;
    flow_answers.abort();
    drop(flows_registration);
    hub.session_end(&ticket);
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

async fn drive(
    hub: &Hub,
    conn: &Connection,
    send: SendStream,
    mut recv: RecvStream,
    peer: &ClusterId,
    cfg: &PeeringConfig,
    mut cancelled: tokio::sync::watch::Receiver<bool>,
) -> (u32, String) {
    let mut local_rx = hub.subscribe_local();
    let local = loop {
        if let Some(l) = local_rx.borrow_and_update().clone() {
            break l;
        }
        tokio::select! {
            r = local_rx.changed() => if r.is_err() { return (close_code::SHUTDOWN, "shutting down".into()) },
            _ = cancelled.changed() => return (close_code::REPLACED, "replaced".into()),
            _ = conn.closed() => return (close_code::DONE, "closed".into()),
        }
    };
    // Writing runs on its own task, so a large snapshot going out never stops us reading the
    // peer's (both sides send theirs at once; QUIC flow control would otherwise deadlock).
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(OUT_QUEUE);
    let mut writer = tokio::spawn(write_frames(send, out_rx, cfg.lease));
    let version = negotiated(conn).unwrap_or(Version::V1);
    let outcome = session_loop(
        hub,
        version,
        &mut recv,
        peer,
        cfg,
        &mut cancelled,
        &mut local_rx,
        &local,
        &out_tx,
        &mut writer,
    )
    .await;
    writer.abort();
    outcome
}

/// Frames queued for one peer; a peer that lets this many pile up is too slow and is
/// disconnected (it resyncs from a snapshot when it reconnects).
const OUT_QUEUE: usize = 1024;

async fn write_frames(
    mut send: SendStream,
    mut frames: tokio::sync::mpsc::Receiver<Vec<u8>>,
    stall: Duration,
) -> &'static str {
    while let Some(bytes) = frames.recv().await {
        match tokio::time::timeout(stall, send.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return "write failed",
            Err(_) => return "writing stalled past the lease",
        }
    }
    "done"
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    hub: &Hub,
    version: Version,
    recv: &mut RecvStream,
    peer: &ClusterId,
    cfg: &PeeringConfig,
    cancelled: &mut tokio::sync::watch::Receiver<bool>,
    local_rx: &mut tokio::sync::watch::Receiver<Option<Arc<crate::hub::LocalPublish>>>,
    local: &crate::hub::LocalPublish,
    out: &tokio::sync::mpsc::Sender<Vec<u8>>,
    writer: &mut tokio::task::JoinHandle<&'static str>,
) -> (u32, String) {
    let session_cfg = SessionConfig {
        local: hub.id().clone(),
        local_name: hub.config().name.clone(),
        peer: peer.clone(),
        heartbeat: cfg.heartbeat,
        lease: cfg.lease,
        max_frame: cfg.max_frame,
    };
    let (mut session, mut pending) =
        Session::with_version(session_cfg, version, &local.state, Instant::now());
    loop {
        for event in pending.drain(..) {
            match event {
                Event::Transmit(bytes) => match out.try_send(bytes) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        hub.metrics().protocol_failure("slow_peer");
                        tracing::warn!(%peer, "peer is not reading; disconnecting it");
                        return (close_code::PROTOCOL, "too slow".into());
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                        return (close_code::DONE, "write failed".into());
                    }
                },
                Event::PeerSnapshot(state) => hub.peer_snapshot(state),
                Event::PeerDelta(delta) => {
                    if let Err(e) = hub.peer_delta(&delta) {
                        hub.metrics().protocol_failure("revision_gap");
                        tracing::warn!(%peer, error = %trellis_core::error_chain(&e), "delta does not apply; reconnecting to resync");
                        return (close_code::PROTOCOL, trellis_core::error_chain(&e));
                    }
                }
                Event::Close(err) => return close_for(hub, peer, &err),
            }
        }
        let deadline = tokio::time::Instant::from_std(session.poll_timeout());
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => match chunk {
                Ok(Some(chunk)) => {
                    pending = session.handle_bytes(&chunk.bytes, Instant::now());
                    hub.peer_heard(peer);
                }
                Ok(None) => return (close_code::DONE, "stream finished".into()),
                Err(e) => {
                    tracing::info!(%peer, error = %trellis_core::error_chain(&e), "peering stream ended");
                    return (close_code::DONE, "stream ended".into());
                }
            },
            changed = local_rx.changed() => {
                if changed.is_err() {
                    return (close_code::SHUTDOWN, "shutting down".into());
                }
                let latest = local_rx.borrow_and_update().clone();
                if let Some(l) = latest {
                    pending = session.local_changed(&l.state, &l.recent, Instant::now());
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                pending = session.handle_timeout(Instant::now());
            },
            _ = cancelled.changed() => return (close_code::REPLACED, "replaced by another connection".into()),
            w = &mut *writer => {
                let why = w.unwrap_or("writer failed");
                tracing::info!(%peer, why, "peering writer ended");
                return (close_code::DONE, why.into());
            }
        }
    }
}

fn close_for(hub: &Hub, peer: &ClusterId, err: &PeeringError) -> (u32, String) {
    let kind = err.kind();
    match err {
        PeeringError::HelloIdentityMismatch { .. }
        | PeeringError::HelloDuplicateClusterId { .. } => {
            hub.metrics().auth_failure(kind);
            tracing::warn!(%peer, error = %trellis_core::error_chain(err), "refused a peer");
            (close_code::PROTOCOL, trellis_core::error_chain(err))
        }
        PeeringError::LeaseExpired { .. } => {
            hub.metrics().protocol_failure(kind);
            tracing::warn!(%peer, error = %trellis_core::error_chain(err), "peer silent past its lease");
            hub.withdraw(peer);
            (close_code::LEASE_EXPIRED, trellis_core::error_chain(err))
        }
        _ => {
            hub.metrics().protocol_failure(kind);
            tracing::warn!(%peer, error = %trellis_core::error_chain(err), "closing the peering connection");
            (close_code::PROTOCOL, trellis_core::error_chain(err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(b.next_delay());
        }
        assert!(seen[0] >= Duration::from_millis(80) && seen[0] <= Duration::from_millis(120));
        assert!(seen[1] >= Duration::from_millis(160) && seen[1] <= Duration::from_millis(240));
        assert!(seen[5] >= Duration::from_millis(800) && seen[5] <= Duration::from_millis(1200));
        assert_eq!(b.peek(), Duration::from_millis(1000));
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }
}
