//! The streams inside the cluster: each node's gateway and the cluster's DNS subscribe to the
//! controller and receive a snapshot, then deltas, whenever the mesh view changes.
//!
//! In-process, [`GatewaySubscription`] and [`ImportsSubscription`] are the API (the DNS crate
//! can embed or mirror them). Over the network, [`serve`] speaks the peering framing (4-byte
//! big-endian length + JSON) on TCP: the client's first frame is an [`AgentHello`]; the
//! controller then sends [`GatewayUpdate`]s or [`ImportsUpdate`]s. A gateway also sends
//! [`AgentReport`]s on its stream, which the hub keeps for `GET /status`; a report that does
//! not parse or validate is counted and skipped. A gateway's second connection, hello role
//! `flows`, is its node's flow channel, served by [`crate::flows`].

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use trellis_core::admission::{SourceSlot, SourceSlots};
use trellis_core::framing::{FrameDecoder, FrameError, encode_json_frame};
use trellis_core::imports::{Imports, ImportsUpdate};

pub use trellis_agent_client::tls::ServerTls;
pub use trellis_core::agent::{
    AgentHello, AgentIdentity, AgentReport, AgentRole, MAX_AGENT_FRAME, MAX_REPORT_FRAME,
};

use crate::gateway::{GatewayDesired, GatewayRegistration, GatewayUpdate, desired_for};
use crate::hub::{Hub, MeshView};
use trellis_core::agent::PolicyUpdate;

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
    /// The last desired state sent, without its policy (held once, in `last_policy`).
    last: Option<GatewayDesired>,
    last_policy: Option<Arc<trellis_core::policy::PolicyInputs>>,
}

impl GatewayFeed {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            last: None,
            last_policy: None,
        }
    }

    /// The update this view means for the gateway: a snapshot first, then deltas; `None` if
    /// nothing changed for this node. The policy inputs are the view's shared `Arc`: compared
    /// (and diffed) only when the view holds another one.
    pub fn next(&mut self, view: &MeshView) -> Option<GatewayUpdate> {
        if view.policy_pending {
            // Nothing until the policy is known: the gateway keeps enforcing what it has.
            return None;
        }
        let desired = desired_for(
            &self.node,
            &view.local,
            &view.remote_refs(),
            view.node_encryption,
            &view.external_peers,
            view.revision,
        );
        let Some(last) = &self.last else {
            let mut snapshot = desired.clone();
            snapshot.policy = view.policy.as_deref().cloned();
            self.last = Some(desired);
            self.last_policy = view.policy.clone();
            return Some(GatewayUpdate::Snapshot(snapshot));
        };
        let policy = match (&self.last_policy, &view.policy) {
            (Some(old), Some(new)) if Arc::ptr_eq(old, new) => None,
            // The step every node up to date takes, computed once by the hub.
            (Some(old), Some(_))
                if view
                    .policy_step
                    .as_ref()
                    .is_some_and(|step| Arc::ptr_eq(&step.from, old)) =>
            {
                view.policy_step
                    .as_ref()
                    .map(|step| PolicyUpdate::Delta((*step.delta).clone()))
            }
            (old, new) => PolicyUpdate::between(old.as_deref(), new.as_deref()),
        };
        let update = match (last.delta_to(&desired), policy) {
            (None, None) => None,
            (
                Some(GatewayUpdate::Delta {
                    from,
                    to,
                    node_encryption,
                    upsert_peers,
                    remove_peers,
                    add_routes,
                    remove_routes,
                    policy: _,
                }),
                policy,
            ) => Some(GatewayUpdate::Delta {
                from,
                to,
                node_encryption,
                upsert_peers,
                remove_peers,
                add_routes,
                remove_routes,
                policy,
            }),
            // `delta_to` sends deltas; were it ever a snapshot, it carries the policy too, or
            // the gateway would take its absence for "enforce none".
            (Some(GatewayUpdate::Snapshot(mut snapshot)), _) => {
                snapshot.policy = view.policy.as_deref().cloned();
                Some(GatewayUpdate::Snapshot(snapshot))
            }
            (None, Some(policy)) => Some(GatewayUpdate::Delta {
                from: last.revision,
                to: desired.revision,
                node_encryption: desired.node_encryption,
                upsert_peers: vec![],
                remove_peers: vec![],
                add_routes: vec![],
                remove_routes: vec![],
                policy: Some(policy),
            }),
        };
        if update.is_some() {
            self.last = Some(desired);
            self.last_policy = view.policy.clone();
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

/// A hello is a few hundred bytes (node name, endpoint, key, token); a bootstrap hello about
/// 2 KiB (a ServiceAccount token and a certificate request).
const HELLO_MAX: usize = 8 * 1024;
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

/// How the agent port knows who a subscriber is.
#[derive(Debug, Clone)]
pub enum AgentAuth {
    /// Mutual TLS (1.3): clients present a certificate from the cluster's agent CA whose
    /// identity ([`AgentIdentity`]) decides what they may do ([`authorize`]); the controller
    /// presents `agent.<cluster>.trellis`. The files are re-read when they change.
    Tls(Arc<ServerTls>),
    /// [`AgentAuth::Tls`], and a client without a certificate may ask for its node's
    /// (`AgentRole::Bootstrap`, on Kubernetes): `issuer` decides. The TLS material must
    /// allow unauthenticated clients ([`ServerTls::load_allowing_bootstrap`]); any other hello
    /// without a certificate is refused.
    TlsWithBootstrap(Arc<ServerTls>, Arc<dyn NodeCertIssuer>),
    /// Deprecated: plaintext, and the shared token when given (anyone holding it can register
    /// any node). The chart uses it only behind `agent.legacyToken.enabled`.
    LegacyToken(Option<Arc<str>>),
}

/// Who decides node-certificate requests (on Kubernetes, [`crate::node_certs::NodeIssuer`]).
pub trait NodeCertIssuer: Send + Sync + std::fmt::Debug {
    /// A certificate (PEM) for the key of `csr_pem` if `token` proves its holder is
    /// `subject` (a node's gateway, or DNS).
    fn issue<'a>(
        &'a self,
        subject: &'a crate::node_certs::Subject,
        token: &'a str,
        csr_pem: &'a str,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<String, crate::node_certs::BootstrapRefusal>> + Send + 'a>,
    >;
}

impl NodeCertIssuer for crate::node_certs::NodeIssuer {
    fn issue<'a>(
        &'a self,
        subject: &'a crate::node_certs::Subject,
        token: &'a str,
        csr_pem: &'a str,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<String, crate::node_certs::BootstrapRefusal>> + Send + 'a>,
    > {
        Box::pin(crate::node_certs::NodeIssuer::issue(
            self, subject, token, csr_pem,
        ))
    }
}

/// How long a node-certificate request may take (two API calls).
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an authenticated subscriber's hello is refused; `label()` is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("its certificate names no agent identity, or several")]
    NoIdentity,
    #[error("its identity is of another cluster")]
    WrongCluster,
    #[error("a node's identity may only register that node")]
    NodeMismatch,
    #[error("the DNS identity may only read imports, never register a gateway")]
    DnsRegistersGateway,
    #[error("only the DNS identity reads imports")]
    NotDns,
    #[error("the source knows no such node (yet)")]
    UnknownNode,
    #[error("the endpoint is not one of the node's addresses")]
    EndpointNotNodeAddress,
    #[error("this controller issues no node certificates")]
    NoBootstrap,
    #[error("the node-certificate request is refused")]
    Bootstrap(crate::node_certs::BootstrapRefusal),
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NoIdentity => "agent_no_identity",
            Refusal::WrongCluster => "agent_wrong_cluster",
            Refusal::NodeMismatch => "agent_node_mismatch",
            Refusal::DnsRegistersGateway => "agent_dns_registers_gateway",
            Refusal::NotDns => "agent_not_dns",
            Refusal::UnknownNode => "agent_unknown_node",
            Refusal::EndpointNotNodeAddress => "agent_endpoint_not_node_address",
            Refusal::NoBootstrap => "agent_no_bootstrap",
            Refusal::Bootstrap(refusal) => refusal.label(),
        }
    }
}

/// Pure: may the holder of `identity` say `role` to the agent port of `cluster`?
/// `node_addresses` is the source's addresses of the node a gateway registers (`None`: the
/// source does not know it). A gateway registers its own node only, at one of its addresses
/// (so only that node's identity ever changes its key or endpoint); DNS only reads.
pub fn authorize(
    identity: &AgentIdentity,
    cluster: &str,
    role: &AgentRole,
    node_addresses: impl FnOnce(&str) -> Option<Vec<std::net::IpAddr>>,
) -> Result<(), Refusal> {
    if identity.cluster() != cluster {
        return Err(Refusal::WrongCluster);
    }
    match (identity, role) {
        (AgentIdentity::Node { node, .. }, AgentRole::Gateway(reg)) => {
            if &reg.node != node {
                return Err(Refusal::NodeMismatch);
            }
            let addresses = node_addresses(node).ok_or(Refusal::UnknownNode)?;
            if !addresses.contains(&reg.endpoint.ip()) {
                return Err(Refusal::EndpointNotNodeAddress);
            }
            Ok(())
        }
        (AgentIdentity::Dns { .. }, AgentRole::Dns) => Ok(()),
        (AgentIdentity::Dns { .. }, AgentRole::Gateway(_)) => Err(Refusal::DnsRegistersGateway),
        (_, AgentRole::Dns) => Err(Refusal::NotDns),
        // Answered before authorization, by the node-certificate issuer when there is one.
        (_, AgentRole::Bootstrap(_)) => Err(Refusal::NoBootstrap),
        (AgentIdentity::Controller { .. }, AgentRole::Gateway(_)) => Err(Refusal::NodeMismatch),
        // A node's flows come only from that node's own identity, and only while the source
        // knows the node (a deleted node's still-valid certificate opens no channel).
        (AgentIdentity::Node { node, .. }, AgentRole::Flows(channel)) if &channel.node == node => {
            node_addresses(node).ok_or(Refusal::UnknownNode)?;
            Ok(())
        }
        (_, AgentRole::Flows(_)) => Err(Refusal::NodeMismatch),
    }
}

/// Serves gateway and DNS subscriptions on `listener` until cancelled. `max_frame` is capped
/// at [`MAX_AGENT_FRAME`], the most a gateway or DNS accepts.
pub async fn serve(listener: TcpListener, hub: Hub, max_frame: usize, auth: AgentAuth) {
    let max_frame = max_frame.min(MAX_AGENT_FRAME);
    if let AgentAuth::LegacyToken(token) = &auth {
        tracing::warn!(
            token = token.is_some(),
            "agent port without TLS (deprecated): whoever reaches it{} can register any node; configure agentTls",
            if token.is_some() {
                " with the shared token"
            } else {
                ""
            }
        );
    }
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
        let auth = auth.clone();
        let subscribers = subscribers.clone();
        tokio::spawn(async move {
            if let Err(e) = accept(stream, hub, max_frame, auth, slot, subscribers).await {
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
    #[error("no TLS handshake and hello in time")]
    HelloTimeout,
    #[error("wrong or missing agent token")]
    Token,
    #[error(
        "not a TLS client: an agent from before agent TLS (shared token)? it needs a node or DNS certificate"
    )]
    Plaintext,
    #[error("TLS handshake")]
    Handshake(#[source] std::io::Error),
    #[error("refused {identity}")]
    Refused {
        identity: String,
        #[source]
        refusal: Refusal,
    },
    #[error("too many subscribers")]
    Full,
    #[error("encoding an update")]
    Encode(#[source] FrameError),
    #[error("subscriber stopped reading")]
    WriteTimeout,
    #[error("writing an update")]
    Write(#[source] std::io::Error),
    #[error("flow channel of {node}")]
    Flows {
        node: String,
        #[source]
        source: crate::flows::node::FlowChannelError,
    },
    #[error("gateway {node}: reading its reports")]
    Reports {
        node: String,
        #[source]
        source: FrameError,
    },
}

/// Encodes `update` and writes it within [`WRITE_TIMEOUT`].
async fn send_update<T: serde::Serialize, W: AsyncWrite + Unpin>(
    wr: &mut W,
    update: &T,
    label: &'static str,
    max_frame: usize,
) -> Result<(), SubscriberError> {
    let frame = encode_json_frame(update, label, max_frame).map_err(SubscriberError::Encode)?;
    // Flushed, not only written: over TLS the last records of a large frame may still sit in
    // the session's buffer when `write_all` returns, and nothing else would push them out (a
    // DNS subscriber sends nothing back), so the agent would wait for them forever.
    let write = async {
        wr.write_all(&frame).await?;
        wr.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| SubscriberError::WriteTimeout)?
        .map_err(SubscriberError::Write)
}

/// The hello, and the decoder holding whatever followed it in the same reads.
async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(AgentHello, FrameDecoder), SubscriberError> {
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

/// The TLS handshake (when configured) and the hello, within [`HELLO_TIMEOUT`] together; then
/// the subscriber's stream.
async fn accept(
    stream: TcpStream,
    hub: Hub,
    max_frame: usize,
    auth: AgentAuth,
    pending: SourceSlot,
    subscribers: Arc<Semaphore>,
) -> Result<(), SubscriberError> {
    match auth {
        AgentAuth::LegacyToken(token) => {
            let mut stream = stream;
            let (hello, reports) = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream))
                .await
                .map_err(|_| SubscriberError::HelloTimeout)??;
            drop(pending);
            if let Some(expected) = &token
                && !token_matches(expected, hello.token.as_deref())
            {
                hub.metrics().auth_failure("agent_token");
                return Err(SubscriberError::Token);
            }
            subscriber(stream, hello, reports, hub, max_frame, subscribers).await
        }
        AgentAuth::Tls(tls) => {
            accept_tls(stream, hub, max_frame, tls, None, pending, subscribers).await
        }
        AgentAuth::TlsWithBootstrap(tls, issuer) => {
            accept_tls(
                stream,
                hub,
                max_frame,
                tls,
                Some(issuer),
                pending,
                subscribers,
            )
            .await
        }
    }
}

/// The TLS handshake and the hello, within [`HELLO_TIMEOUT`]; a bootstrap answered when
/// `issuer` is given; then the hello authorized by the client's identity.
async fn accept_tls(
    stream: TcpStream,
    hub: Hub,
    max_frame: usize,
    tls: Arc<ServerTls>,
    issuer: Option<Arc<dyn NodeCertIssuer>>,
    pending: SourceSlot,
    subscribers: Arc<Semaphore>,
) -> Result<(), SubscriberError> {
    {
        {
            let handshake = async {
                // A TLS connection starts with a handshake record (22); an old agent's
                // plaintext hello starts with its length.
                let mut first = [0u8; 1];
                if stream
                    .peek(&mut first)
                    .await
                    .map_err(SubscriberError::HelloRead)?
                    == 0
                {
                    return Err(SubscriberError::ClosedBeforeHello);
                }
                if first[0] != 0x16 {
                    hub.metrics().auth_failure("plaintext_agent");
                    return Err(SubscriberError::Plaintext);
                }
                let mut stream = tls.acceptor().accept(stream).await.map_err(|e| {
                    let reason = e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                        .map_or("tls_error", crate::tls::failure_reason);
                    hub.metrics().auth_failure(reason);
                    SubscriberError::Handshake(e)
                })?;
                let identities = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(trellis_agent_client::tls::identities_of)
                    .unwrap_or_default();
                let (hello, reports) = read_hello(&mut stream).await?;
                Ok((stream, identities, hello, reports))
            };
            let (mut stream, identities, hello, reports) =
                tokio::time::timeout(HELLO_TIMEOUT, handshake)
                    .await
                    .map_err(|_| SubscriberError::HelloTimeout)??;
            if let (AgentRole::Bootstrap(request), Some(issuer)) = (&hello.role, &issuer) {
                let subject = if request.dns {
                    crate::node_certs::Subject::Dns
                } else {
                    crate::node_certs::Subject::Node(request.node.clone())
                };
                // The pending slot is held while the API is asked: bootstraps are bounded
                // like unproven clients.
                let issued = tokio::time::timeout(
                    BOOTSTRAP_TIMEOUT,
                    issuer.issue(&subject, &request.service_account_token, &request.csr_pem),
                )
                .await
                .unwrap_or(Err(crate::node_certs::BootstrapRefusal::Api));
                drop(pending);
                let certificate_pem = issued.map_err(|refusal| {
                    let refusal = Refusal::Bootstrap(refusal);
                    tracing::warn!(%subject, reason = refusal.label(), "refused a certificate request: {refusal}");
                    hub.metrics().auth_failure(refusal.label());
                    SubscriberError::Refused {
                        identity: format!("bootstrap of {subject}"),
                        refusal,
                    }
                })?;
                tracing::info!(%subject, "issued an agent certificate");
                let answer = trellis_core::agent::BootstrapIssued {
                    certificate_pem,
                    ca_pem: tls.material().ca_pem(),
                };
                send_update(&mut stream, &answer, "node certificate", max_frame).await?;
                let _ = stream.shutdown().await;
                return Ok(());
            }
            drop(pending);
            let cluster = tls.material().identity.cluster().to_owned();
            let verdict = match identities.as_slice() {
                [identity] => authorize(identity, &cluster, &hello.role, |node| {
                    hub.node_addresses(node)
                }),
                _ => Err(Refusal::NoIdentity),
            };
            if let Err(refusal) = verdict {
                let identity = identities
                    .first()
                    .map_or_else(|| "no identity".to_owned(), |i| i.dns_name());
                tracing::warn!(%identity, reason = refusal.label(), "refused an agent's hello: {refusal}");
                hub.metrics().auth_failure(refusal.label());
                return Err(SubscriberError::Refused { identity, refusal });
            }
            subscriber(stream, hello, reports, hub, max_frame, subscribers).await
        }
    }
}

/// Serves an admitted subscriber.
async fn subscriber<S: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: S,
    hello: AgentHello,
    mut reports: FrameDecoder,
    hub: Hub,
    max_frame: usize,
    subscribers: Arc<Semaphore>,
) -> Result<(), SubscriberError> {
    let Ok(_subscriber) = subscribers.try_acquire_owned() else {
        hub.metrics()
            .connection_refused(crate::metrics::Listener::Agent, "subscribers_full");
        return Err(SubscriberError::Full);
    };
    let (rd, mut wr) = tokio::io::split(stream);
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
        // The node's flow channel: the relay asks on it and reads the answers.
        AgentRole::Flows(channel) => hub
            .flows()
            .serve_node(channel.node.clone(), rd, wr, reports)
            .await
            .map_err(|source| SubscriberError::Flows {
                node: channel.node,
                source,
            }),
        // Only an issuer answers these (before authorization); the plaintext mode has none.
        AgentRole::Bootstrap(request) => Err(SubscriberError::Refused {
            identity: format!("bootstrap of {}", request.node),
            refusal: Refusal::NoBootstrap,
        }),
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
async fn stream_updates<S: Updates, R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut sub: S,
    mut rd: R,
    wr: &mut W,
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

    /// The cluster's agent PKI in a temporary directory: the agent CA of cluster `a` and the
    /// controller's certificate; clients' certificates are issued on demand.
    pub(crate) struct Pki {
        pub(crate) dir: tempfile::TempDir,
    }

    pub(crate) fn node_id(node: &str) -> AgentIdentity {
        AgentIdentity::Node {
            cluster: "a".into(),
            node: node.into(),
        }
    }

    pub(crate) fn dns_id() -> AgentIdentity {
        AgentIdentity::Dns {
            cluster: "a".into(),
        }
    }

    impl Pki {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            crate::agent_certs::write_agent_files(
                dir.path(),
                &AgentIdentity::Controller {
                    cluster: "a".into(),
                },
                1,
            )
            .unwrap();
            Self { dir }
        }

        pub(crate) fn files(&self, identity: &AgentIdentity) -> trellis_agent_client::TlsFiles {
            let files = crate::agent_certs::agent_files(self.dir.path(), identity);
            if !files.cert.exists() {
                crate::agent_certs::write_agent_files(self.dir.path(), identity, 1).unwrap();
            }
            trellis_agent_client::TlsFiles {
                ca: files.ca,
                cert: files.cert,
                key: files.key,
            }
        }

        pub(crate) fn server(&self) -> Arc<ServerTls> {
            let files = self.files(&AgentIdentity::Controller {
                cluster: "a".into(),
            });
            Arc::new(ServerTls::load(files).unwrap())
        }

        pub(crate) fn client(&self, identity: &AgentIdentity) -> trellis_agent_client::ClientTls {
            trellis_agent_client::ClientTls::load(self.files(identity)).unwrap()
        }
    }

    pub(crate) type Conn = trellis_agent_client::tokio_rustls::client::TlsStream<TcpStream>;

    /// A TLS connection to the agent port at `addr` as `identity`, over `tcp`.
    pub(crate) async fn tls_over(tcp: TcpStream, pki: &Pki, identity: &AgentIdentity) -> Conn {
        let (connector, name, _) = pki.client(identity).connector();
        connector.connect(name, tcp).await.unwrap()
    }

    pub(crate) async fn connect_as(
        addr: std::net::SocketAddr,
        pki: &Pki,
        identity: &AgentIdentity,
    ) -> Conn {
        tls_over(TcpStream::connect(addr).await.unwrap(), pki, identity).await
    }

    /// Every refusal in `reasons` counted in the hub's metrics; the metrics text, for more
    /// checks.
    fn assert_refusals_counted(h: &Hub, reasons: &[&str]) -> String {
        let text = h.metrics().render();
        for reason in reasons {
            assert!(
                text.contains(&format!("reason=\"{reason}\"")),
                "{reason}: {text}"
            );
        }
        text
    }

    /// The stream is closed on us without an update (or with a TLS alert).
    pub(crate) async fn refused<S: AsyncRead + Unpin>(conn: &mut S) {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut sink))
            .await
            .expect("the controller closes a refused stream");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "a refused subscriber gets nothing: {read:?} {} bytes",
            sink.len()
        );
    }

    /// A hub with the local cluster's source, and the agent port serving it over mutual TLS
    /// on a loopback port.
    async fn agent_server() -> (Hub, std::net::SocketAddr, tokio::task::JoinHandle<()>, Pki) {
        let h = hub();
        h.set_source(src());
        let pki = Pki::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(
            listener,
            h.clone(),
            1 << 20,
            AgentAuth::Tls(pki.server()),
        ));
        (h, addr, server, pki)
    }

    /// Nodes `node-0` (192.168.1.10) and `node-1` (192.168.1.11).
    fn src() -> SourceState {
        let mut c = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        let mut n1 = c.nodes["node-0"].clone();
        n1.name = "node-1".into();
        n1.pod_cidrs = vec!["10.1.1.0/24".parse().unwrap()];
        n1.internal_ips = vec!["192.168.1.11".parse().unwrap()];
        c.nodes.get_mut("node-0").unwrap().internal_ips = vec!["192.168.1.10".parse().unwrap()];
        c.nodes.insert("node-1".into(), n1);
        SourceState {
            nodes: c.nodes,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn gateways_get_a_snapshot_then_deltas_over_tls() {
        let (h, addr, server, pki) = agent_server().await;
        let reg = GatewayRegistration {
            node: "node-0".into(),
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            public_key: PublicKey([3; 32]),
        };
        let mut conn = connect_as(addr, &pki, &node_id("node-0")).await;
        send_hello(&mut conn, &AgentHello::gateway(reg, None)).await;
        let mut updates = UpdateReader::new();
        let GatewayUpdate::Snapshot(mut state) = updates.next(&mut conn).await else {
            panic!("first update must be a snapshot")
        };
        // node-1 is the one peer (node encryption off: a peer all the same).
        assert!(state.peers.iter().all(|p| p.node != "node-0"));
        // The registration reached the local cluster state.
        assert!(h.local_state().nodes["node-0"].gateway.is_some());
        // A remote cluster appears: a delta adds its peer and routes.
        let before = state.peers.len();
        let mut b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
        b.nodes.get_mut("node-0").unwrap().gateway = Some(trellis_core::cluster::NodeGateway {
            endpoint: "192.168.2.10:51820".parse().unwrap(),
            public_key: PublicKey([4; 32]),
        });
        h.peer_snapshot(b);
        let update = updates.next(&mut conn).await;
        assert!(matches!(update, GatewayUpdate::Delta { .. }), "{update:?}");
        assert!(state.apply(&update));
        assert_eq!(state.peers.len(), before + 1);
        // Node encryption on is pushed too.
        h.set_node_encryption(true);
        let update = updates.next(&mut conn).await;
        assert!(state.apply(&update));
        assert!(state.node_encryption);
        server.abort();
    }

    #[tokio::test]
    async fn the_deprecated_token_mode_still_checks_its_token() {
        let h = hub();
        h.set_source(src());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(
            listener,
            h.clone(),
            1 << 20,
            AgentAuth::LegacyToken(Some("s3cret".into())),
        ));
        let reg = GatewayRegistration {
            node: "node-0".into(),
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            public_key: PublicKey([3; 32]),
        };
        let mut bad = TcpStream::connect(addr).await.unwrap();
        send_hello(
            &mut bad,
            &AgentHello::gateway(reg.clone(), Some("guess".into())),
        )
        .await;
        refused(&mut bad).await;
        assert!(h.local_state().nodes["node-0"].gateway.is_none());
        assert!(h.metrics().render().contains("reason=\"agent_token\""));
        let mut conn = TcpStream::connect(addr).await.unwrap();
        send_hello(&mut conn, &AgentHello::gateway(reg, Some("s3cret".into()))).await;
        let update = UpdateReader::new().next(&mut conn).await;
        assert!(matches!(update, GatewayUpdate::Snapshot(_)));
        server.abort();
    }

    fn registration(node: &str, endpoint: &str, key: u8) -> GatewayRegistration {
        GatewayRegistration {
            node: node.into(),
            endpoint: endpoint.parse().unwrap(),
            public_key: PublicKey([key; 32]),
        }
    }

    /// node-1's gateway registered with key [1; 32]: what an attacker tries to replace.
    async fn node_1_registered(addr: std::net::SocketAddr, pki: &Pki) -> Conn {
        let mut conn = connect_as(addr, pki, &node_id("node-1")).await;
        let reg = registration("node-1", "192.168.1.11:51820", 1);
        send_hello(&mut conn, &AgentHello::gateway(reg, None)).await;
        assert!(matches!(
            UpdateReader::new().next(&mut conn).await,
            GatewayUpdate::Snapshot(_)
        ));
        conn
    }

    fn node_1_key(h: &Hub) -> Option<PublicKey> {
        h.local_state().nodes["node-1"]
            .gateway
            .as_ref()
            .map(|g| g.public_key)
    }

    /// Attack (a): the holder of node-0's identity registers node-1 with its own key (and,
    /// as node-0, an endpoint that is not node-0's). Before node identities (one shared
    /// token) it was accepted and node-1's key changed for every peer.
    #[tokio::test]
    async fn attack_node_0_cannot_register_node_1_or_a_foreign_endpoint() {
        let (h, addr, server, pki) = agent_server().await;
        let _node_1 = node_1_registered(addr, &pki).await;
        assert_eq!(node_1_key(&h), Some(PublicKey([1; 32])));
        let mut evil = connect_as(addr, &pki, &node_id("node-0")).await;
        let reg = registration("node-1", "192.168.1.10:51820", 9);
        send_hello(&mut evil, &AgentHello::gateway(reg, None)).await;
        refused(&mut evil).await;
        assert_eq!(
            node_1_key(&h),
            Some(PublicKey([1; 32])),
            "node-1's key unchanged"
        );
        // node-0 registering itself at node-1's address (to draw its traffic) is refused too.
        let mut evil = connect_as(addr, &pki, &node_id("node-0")).await;
        let reg = registration("node-0", "192.168.1.11:51820", 9);
        send_hello(&mut evil, &AgentHello::gateway(reg, None)).await;
        refused(&mut evil).await;
        assert!(h.local_state().nodes["node-0"].gateway.is_none());
        // A node the source does not know is refused (no certificate makes a node exist).
        let mut evil = connect_as(addr, &pki, &node_id("node-7")).await;
        let reg = registration("node-7", "192.168.1.17:51820", 9);
        send_hello(&mut evil, &AgentHello::gateway(reg, None)).await;
        refused(&mut evil).await;
        assert_refusals_counted(
            &h,
            &[
                "agent_node_mismatch",
                "agent_endpoint_not_node_address",
                "agent_unknown_node",
            ],
        );
        server.abort();
    }

    /// A TLS client trusting the agent CA but presenting no certificate.
    async fn connect_without_identity(addr: std::net::SocketAddr, pki: &Pki) -> Conn {
        use rustls_pki_types::pem::PemObject;
        let ca = pki.files(&node_id("node-0")).ca;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = trellis_agent_client::tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector
            .connect("agent.a.trellis".try_into().unwrap(), tcp)
            .await
            .unwrap()
    }

    /// Attack (b): no identity, the old shared token, and a certificate from another CA
    /// (another cluster's agent CA) are refused; nothing is registered.
    #[tokio::test]
    async fn attack_no_identity_an_old_token_or_a_foreign_ca_is_refused() {
        let (h, addr, server, pki) = agent_server().await;
        let _node_1 = node_1_registered(addr, &pki).await;
        let reg = registration("node-1", "192.168.1.11:51820", 9);
        // No client certificate.
        let mut anonymous = connect_without_identity(addr, &pki).await;
        let _ = send_hello_raw(&mut anonymous, &AgentHello::gateway(reg.clone(), None)).await;
        refused(&mut anonymous).await;
        // The old shared token, in plaintext as before.
        let mut old = TcpStream::connect(addr).await.unwrap();
        let _ = send_hello_raw(
            &mut old,
            &AgentHello::gateway(reg.clone(), Some("s3cret".into())),
        )
        .await;
        refused(&mut old).await;
        // A node certificate from another CA (same names, wrong issuer).
        let other = Pki::new();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (connector, name, _) = other.client(&node_id("node-1")).connector();
        // The foreign client does not trust our controller either: give it our CA.
        drop(connector);
        let mut files = other.files(&node_id("node-1"));
        files.ca = pki.files(&node_id("node-1")).ca;
        let foreign = trellis_agent_client::ClientTls::load(files).unwrap();
        let (connector, _, _) = foreign.connector();
        if let Ok(mut conn) = connector.connect(name, tcp).await {
            let _ = send_hello_raw(&mut conn, &AgentHello::gateway(reg, None)).await;
            refused(&mut conn).await;
        }
        assert_eq!(
            node_1_key(&h),
            Some(PublicKey([1; 32])),
            "node-1's key unchanged"
        );
        let text = assert_refusals_counted(&h, &["no_certificate", "plaintext_agent"]);
        // The foreign CA has our CA's name: its signature does not verify.
        assert!(
            text.contains("reason=\"bad_signature\"") || text.contains("reason=\"unknown_ca\""),
            "{text}"
        );
        server.abort();
    }

    /// Attack (d): the DNS identity registers a gateway; a node identity reads imports.
    #[tokio::test]
    async fn attack_dns_cannot_register_a_gateway() {
        let (h, addr, server, pki) = agent_server().await;
        let _node_1 = node_1_registered(addr, &pki).await;
        let mut dns = connect_as(addr, &pki, &dns_id()).await;
        let reg = registration("node-1", "192.168.1.11:51820", 9);
        send_hello(&mut dns, &AgentHello::gateway(reg, None)).await;
        refused(&mut dns).await;
        assert_eq!(
            node_1_key(&h),
            Some(PublicKey([1; 32])),
            "node-1's key unchanged"
        );
        let mut node = connect_as(addr, &pki, &node_id("node-0")).await;
        send_hello(&mut node, &AgentHello::dns(None)).await;
        refused(&mut node).await;
        // DNS itself reads imports.
        let mut dns = connect_as(addr, &pki, &dns_id()).await;
        send_hello(&mut dns, &AgentHello::dns(None)).await;
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut buf = vec![0u8; 65536];
        let update = loop {
            if let Some(u) = decoder.next_json::<ImportsUpdate>().unwrap() {
                break u;
            }
            let n = tokio::time::timeout(Duration::from_secs(5), dns.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            decoder.push(&buf[..n]);
        };
        assert!(matches!(update, ImportsUpdate::Snapshot(_)));
        let text = h.metrics().render();
        assert!(
            text.contains("reason=\"agent_dns_registers_gateway\""),
            "{text}"
        );
        assert!(text.contains("reason=\"agent_not_dns\""), "{text}");
        server.abort();
    }

    /// A man in the middle on the agent port: a TLS listener with `cert`, asking for no
    /// client certificate; counts the hellos it managed to read.
    async fn fake_controller(
        cert: crate::certs::CertifiedKey,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                crate::tls::parse_certs(&cert.cert_pem).unwrap(),
                crate::tls::parse_key(&cert.key_pem).unwrap(),
            )
            .unwrap();
        let acceptor = trellis_agent_client::tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hellos = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = hellos.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await
                        && read_hello(&mut tls).await.is_ok()
                    {
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        (addr, hellos)
    }

    struct Counting(usize);

    impl trellis_agent_client::Handler for Counting {
        type State = trellis_core::imports::Imports;
        async fn applied(&mut self, _: &Self::State) -> bool {
            self.0 += 1;
            false
        }
    }

    /// Attack (c): a man in the middle without the right certificate (another CA's
    /// `agent.a.trellis`, this CA's certificate for another name, a node's certificate) gets
    /// no hello from the shared client, whether it follows as a gateway or as DNS; the real
    /// controller gets one.
    #[tokio::test]
    async fn attack_a_man_in_the_middle_controller_is_refused_by_the_agent_client() {
        let pki = Pki::new();
        let files = crate::agent_certs::agent_files(
            pki.dir.path(),
            &AgentIdentity::Controller {
                cluster: "a".into(),
            },
        );
        let our_ca = crate::certs::CertifiedKey {
            cert_pem: std::fs::read_to_string(&files.ca).unwrap(),
            key_pem: std::fs::read_to_string(&files.ca_key).unwrap(),
        };
        let validity = crate::certs::Validity::days_from_now(1);
        let other_ca = crate::agent_certs::generate_agent_ca("a", validity).unwrap();
        let impostor = |i: usize| match i {
            0 => crate::agent_certs::generate_agent_cert(
                &other_ca,
                &AgentIdentity::Controller {
                    cluster: "a".into(),
                },
                validity,
            )
            .unwrap(),
            1 => crate::agent_certs::generate_agent_cert(
                &our_ca,
                &AgentIdentity::Controller {
                    cluster: "b".into(),
                },
                validity,
            )
            .unwrap(),
            _ => crate::agent_certs::generate_agent_cert(&our_ca, &node_id("node-0"), validity)
                .unwrap(),
        };
        for (i, cert) in (0..3).map(|i| (i, impostor(i))) {
            let (addr, hellos) = fake_controller(cert).await;
            for identity in [node_id("node-0"), dns_id()] {
                let config = trellis_agent_client::ClientConfig {
                    address: addr.to_string(),
                    transport: trellis_agent_client::Transport::Tls(Arc::new(
                        pki.client(&identity),
                    )),
                    max_frame: MAX_AGENT_FRAME,
                    resync: None,
                    report: None,
                };
                let role = match identity {
                    AgentIdentity::Dns { .. } => AgentRole::Dns,
                    _ => AgentRole::Gateway(registration("node-0", "192.168.1.10:51820", 3)),
                };
                let (_tx, rx) = watch::channel(role);
                let mut handler = Counting(0);
                let mut state = None;
                let _ = tokio::time::timeout(
                    Duration::from_millis(700),
                    trellis_agent_client::follow(&config, rx, None, &mut handler, &mut state),
                )
                .await;
                assert_eq!(handler.0, 0);
            }
            assert_eq!(
                hellos.load(std::sync::atomic::Ordering::SeqCst),
                0,
                "impostor {i} got a hello"
            );
        }
        // A bootstrapping client (no certificate yet) refuses them too before its token
        // leaves: with the cluster ID all three; with only the agent CA pinned (no ID), the
        // other CA's controller and the node certificate posing as a server (our CA signs
        // agent.<id>.trellis for this cluster only, so the second cannot exist without its key).
        for (i, cert) in [0, 2].into_iter().map(|i| (i, impostor(i))) {
            let (addr, hellos) = fake_controller(cert).await;
            for cluster in [Some("a"), None] {
                let result = trellis_agent_client::bootstrap::bootstrap_as(
                    &addr.to_string(),
                    &files.ca,
                    cluster,
                    &trellis_agent_client::bootstrap::Subject::Node("node-0".into()),
                    "node-0's token",
                    None,
                )
                .await;
                assert!(
                    matches!(result, Err(trellis_agent_client::Ended::Tls(_))),
                    "impostor {i}, cluster {cluster:?}: {result:?}"
                );
            }
            assert_eq!(
                hellos.load(std::sync::atomic::Ordering::SeqCst),
                0,
                "impostor {i} got a bootstrap hello"
            );
        }
        let (addr, hellos) = fake_controller(impostor(1)).await;
        let result = trellis_agent_client::bootstrap::bootstrap(
            &addr.to_string(),
            &files.ca,
            "a",
            "node-0",
            "node-0's token",
            None,
        )
        .await;
        assert!(
            matches!(result, Err(trellis_agent_client::Ended::Tls(_))),
            "{result:?}"
        );
        assert_eq!(hellos.load(std::sync::atomic::Ordering::SeqCst), 0);
        // The same client reaches the real controller.
        let h = hub();
        h.set_source(src());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, h, 1 << 20, AgentAuth::Tls(pki.server())));
        let config = trellis_agent_client::ClientConfig {
            address: addr.to_string(),
            transport: trellis_agent_client::Transport::Tls(Arc::new(pki.client(&dns_id()))),
            max_frame: MAX_AGENT_FRAME,
            resync: None,
            report: None,
        };
        let (_tx, rx) = watch::channel(AgentRole::Dns);
        let mut handler = Counting(0);
        let mut state = None;
        let started = std::time::Instant::now();
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            trellis_agent_client::follow(&config, rx, None, &mut handler, &mut state),
        )
        .await;
        assert_eq!(handler.0, 1, "the real controller's snapshot");
        eprintln!(
            "connected to the real controller: snapshot within {:?}",
            started.elapsed()
        );
        server.abort();
    }

    /// The figure: what mutual TLS adds to a gateway's connect-to-snapshot time on loopback
    /// (debug build; printed, bounded loosely).
    #[tokio::test]
    async fn tls_handshake_cost_on_the_agent_port() {
        let (_h, addr, server, pki) = agent_server().await;
        let legacy_hub = hub();
        legacy_hub.set_source(src());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let legacy_addr = listener.local_addr().unwrap();
        let legacy = tokio::spawn(serve(
            listener,
            legacy_hub,
            1 << 20,
            AgentAuth::LegacyToken(None),
        ));
        let reg = registration("node-0", "192.168.1.10:51820", 3);
        const N: u32 = 50;
        let started = std::time::Instant::now();
        for _ in 0..N {
            let mut conn = connect_as(addr, &pki, &node_id("node-0")).await;
            send_hello(&mut conn, &AgentHello::gateway(reg.clone(), None)).await;
            UpdateReader::new().next(&mut conn).await;
        }
        let tls = started.elapsed() / N;
        let started = std::time::Instant::now();
        for _ in 0..N {
            let mut conn = TcpStream::connect(legacy_addr).await.unwrap();
            send_hello(&mut conn, &AgentHello::gateway(reg.clone(), None)).await;
            UpdateReader::new().next(&mut conn).await;
        }
        let plain = started.elapsed() / N;
        eprintln!("connect to snapshot, mean of {N}: mutual TLS {tls:?}, plaintext {plain:?}");
        assert!(tls < Duration::from_millis(500), "{tls:?}");
        server.abort();
        legacy.abort();
    }

    /// Sends the number of endpoints of every state it gets.
    struct Endpoints(tokio::sync::mpsc::UnboundedSender<usize>);

    impl trellis_agent_client::Handler for Endpoints {
        type State = trellis_core::imports::Imports;
        async fn applied(&mut self, state: &Self::State) -> bool {
            let endpoints = state
                .services
                .values()
                .flat_map(|s| &s.backends)
                .map(|b| b.endpoints.len())
                .sum();
            let _ = self.0.send(endpoints);
            false
        }
    }

    /// A 100,000-endpoint imports snapshot fits the one frame limit both ends use, and crosses
    /// from the controller to the shared client over TLS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hundred_thousand_endpoint_snapshot_reaches_dns() {
        let h = hub();
        let mut source = src();
        let addresses: Vec<String> = (0..1000)
            .map(|i| format!("10.1.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
        for i in 0..100 {
            trellis_core::cluster::fixture::export(
                &mut source.services,
                "shop",
                &format!("svc-{i}"),
                &format!("10.96.{}.{}", i / 200, i % 200 + 1),
                &addresses,
            );
        }
        h.set_source(source);
        let frame = encode_json_frame(
            &ImportsUpdate::Snapshot(
                (*h.subscribe_view().borrow().as_ref().unwrap().imports).clone(),
            ),
            "imports",
            MAX_AGENT_FRAME,
        )
        .expect("fits MAX_AGENT_FRAME");
        eprintln!(
            "100,000-endpoint imports snapshot: {} MiB (limit {} MiB)",
            frame.len() >> 20,
            MAX_AGENT_FRAME >> 20
        );
        let pki = Pki::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, h, usize::MAX, AgentAuth::Tls(pki.server())));
        let config = trellis_agent_client::ClientConfig {
            address: addr.to_string(),
            transport: trellis_agent_client::Transport::Tls(Arc::new(pki.client(&dns_id()))),
            max_frame: MAX_AGENT_FRAME,
            resync: None,
            report: None,
        };
        let (_tx, rx) = watch::channel(AgentRole::Dns);
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
        let mut handler = Endpoints(sender);
        let mut state = None;
        let started = std::time::Instant::now();
        let endpoints = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::select! {
                () = trellis_agent_client::follow(&config, rx, None, &mut handler, &mut state) => None,
                n = received.recv() => n,
            }
        })
        .await
        .expect("the snapshot arrives");
        eprintln!("received over TLS in {:?}", started.elapsed());
        assert_eq!(endpoints, Some(100_000));
        server.abort();
    }

    /// Issues node-0's certificate for the token "node-0's token" only (the API checks are
    /// `node_certs`', tested against a scripted API server).
    #[derive(Debug)]
    struct FakeIssuer(crate::certs::CertifiedKey);

    impl NodeCertIssuer for FakeIssuer {
        fn issue<'a>(
            &'a self,
            subject: &'a crate::node_certs::Subject,
            token: &'a str,
            csr_pem: &'a str,
        ) -> std::pin::Pin<
            Box<
                dyn Future<Output = Result<String, crate::node_certs::BootstrapRefusal>>
                    + Send
                    + 'a,
            >,
        > {
            Box::pin(async move {
                let crate::node_certs::Subject::Node(node) = subject else {
                    if token != "dns's token" {
                        return Err(crate::node_certs::BootstrapRefusal::WrongServiceAccount);
                    }
                    return crate::node_certs::sign_identity_certificate(
                        &self.0,
                        &dns_id(),
                        csr_pem,
                    );
                };
                if node != "node-0" || token != "node-0's token" {
                    return Err(crate::node_certs::BootstrapRefusal::TokenRejected);
                }
                crate::node_certs::sign_node_certificate(&self.0, "a", node, csr_pem)
            })
        }
    }

    /// A gateway without a certificate gets node-0's with node-0's token, then registers with
    /// it; a wrong token gets nothing, and a client without a certificate still cannot
    /// register (the port accepts it only to ask for a certificate).
    #[tokio::test]
    async fn a_bootstrapped_node_certificate_registers_its_node_and_nothing_else() {
        let h = hub();
        h.set_source(src());
        let pki = Pki::new();
        let files = crate::agent_certs::agent_files(
            pki.dir.path(),
            &AgentIdentity::Controller {
                cluster: "a".into(),
            },
        );
        let ca = crate::certs::CertifiedKey {
            cert_pem: std::fs::read_to_string(&files.ca).unwrap(),
            key_pem: std::fs::read_to_string(&files.ca_key).unwrap(),
        };
        let tls = ServerTls::load_allowing_bootstrap(trellis_agent_client::TlsFiles {
            ca: files.ca.clone(),
            cert: files.cert.clone(),
            key: files.key.clone(),
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(
            listener,
            h.clone(),
            1 << 20,
            AgentAuth::TlsWithBootstrap(Arc::new(tls), Arc::new(FakeIssuer(ca))),
        ));
        let address = addr.to_string();
        let bootstrap = |node: &'static str, token: &'static str| {
            let (address, ca) = (address.clone(), files.ca.clone());
            async move {
                trellis_agent_client::bootstrap::bootstrap(&address, &ca, "a", node, token, None)
                    .await
            }
        };
        assert!(bootstrap("node-0", "a stolen token").await.is_err());
        assert!(bootstrap("node-1", "node-0's token").await.is_err());
        // Without the cluster ID (the chart may not know it): the agent CA is pinned, the
        // cluster learnt from the controller's certificate; DNS's token gets DNS's identity
        // only, a node's token never DNS's.
        let unpinned = |subject: trellis_agent_client::bootstrap::Subject, token: &'static str| {
            let (address, ca) = (address.clone(), files.ca.clone());
            async move {
                trellis_agent_client::bootstrap::bootstrap_as(
                    &address, &ca, None, &subject, token, None,
                )
                .await
            }
        };
        use trellis_agent_client::bootstrap::Subject;
        let node = unpinned(Subject::Node("node-0".into()), "node-0's token")
            .await
            .expect("node-0 without a cluster ID");
        assert_eq!(node.cluster, "a");
        let dns = unpinned(Subject::Dns, "dns's token")
            .await
            .expect("DNS without a cluster ID");
        let der = crate::tls::parse_certs(&dns.certificate_pem).unwrap();
        assert_eq!(
            trellis_agent_client::tls::identities_of(&der[0]),
            [dns_id()]
        );
        assert!(unpinned(Subject::Dns, "node-0's token").await.is_err());
        assert!(
            unpinned(Subject::Node("node-0".into()), "dns's token")
                .await
                .is_err()
        );
        let started = std::time::Instant::now();
        let issued = match bootstrap("node-0", "node-0's token").await {
            Ok(issued) => issued,
            Err(e) => panic!("not issued: {e:?}: {}", h.metrics().render()),
        };
        eprintln!("bootstrap took {:?}", started.elapsed());
        // The gateway keeps its key and the certificate, and follows with them.
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("node.pem"), dir.path().join("node-key.pem"));
        std::fs::write(&cert, &issued.certificate_pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        assert!(!trellis_agent_client::bootstrap::renew_due(
            &cert,
            Duration::from_secs(3600)
        ));
        assert!(trellis_agent_client::bootstrap::renew_due(
            &cert,
            Duration::from_secs(25 * 3600)
        ));
        let client = trellis_agent_client::ClientTls::load(trellis_agent_client::TlsFiles {
            ca: files.ca.clone(),
            cert,
            key,
        })
        .unwrap();
        let (connector, name, _) = client.connector();
        let mut conn = connector
            .connect(name, TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        send_hello(
            &mut conn,
            &AgentHello::gateway(registration("node-0", "192.168.1.10:51820", 3), None),
        )
        .await;
        assert!(matches!(
            UpdateReader::new().next(&mut conn).await,
            GatewayUpdate::Snapshot(_)
        ));
        // As node-0 it still cannot register node-1.
        let (connector, name, _) = client.connector();
        let mut evil = connector
            .connect(name, TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        send_hello(
            &mut evil,
            &AgentHello::gateway(registration("node-1", "192.168.1.11:51820", 9), None),
        )
        .await;
        refused(&mut evil).await;
        // Without a certificate, only a bootstrap is answered.
        let mut anonymous = connect_without_identity(addr, &pki).await;
        let _ = send_hello_raw(
            &mut anonymous,
            &AgentHello::gateway(registration("node-1", "192.168.1.11:51820", 9), None),
        )
        .await;
        refused(&mut anonymous).await;
        assert!(h.local_state().nodes["node-1"].gateway.is_none());
        assert_refusals_counted(
            &h,
            &[
                "bootstrap_token_rejected",
                "agent_no_identity",
                "agent_node_mismatch",
            ],
        );
        server.abort();
    }

    /// Sends a hello, ignoring a write error (the server may already have refused us).
    async fn send_hello_raw<S: AsyncWrite + Unpin>(
        conn: &mut S,
        hello: &AgentHello,
    ) -> std::io::Result<()> {
        conn.write_all(&encode_json_frame(hello, "hello", 1 << 20).unwrap())
            .await?;
        conn.flush().await
    }

    #[test]
    fn authorization_is_by_identity() {
        let addrs = |node: &str| match node {
            "node-0" => Some(vec!["192.168.1.10".parse().unwrap()]),
            _ => None,
        };
        let gw = |node: &str, ep: &str| AgentRole::Gateway(registration(node, ep, 1));
        let ok = gw("node-0", "192.168.1.10:51820");
        assert_eq!(authorize(&node_id("node-0"), "a", &ok, addrs), Ok(()));
        assert_eq!(
            authorize(&node_id("node-0"), "b", &ok, addrs),
            Err(Refusal::WrongCluster)
        );
        assert_eq!(
            authorize(&node_id("node-1"), "a", &ok, addrs),
            Err(Refusal::NodeMismatch)
        );
        assert_eq!(
            authorize(
                &node_id("node-0"),
                "a",
                &gw("node-0", "10.0.0.1:51820"),
                addrs
            ),
            Err(Refusal::EndpointNotNodeAddress)
        );
        assert_eq!(
            authorize(&dns_id(), "a", &ok, addrs),
            Err(Refusal::DnsRegistersGateway)
        );
        assert_eq!(authorize(&dns_id(), "a", &AgentRole::Dns, addrs), Ok(()));
        assert_eq!(
            authorize(&node_id("node-0"), "a", &AgentRole::Dns, addrs),
            Err(Refusal::NotDns)
        );
        let controller = AgentIdentity::Controller {
            cluster: "a".into(),
        };
        assert!(authorize(&controller, "a", &ok, addrs).is_err());
        let flows =
            |node: &str| AgentRole::Flows(trellis_core::agent::FlowChannel { node: node.into() });
        assert_eq!(
            authorize(&node_id("node-0"), "a", &flows("node-0"), addrs),
            Ok(())
        );
        assert_eq!(
            authorize(&node_id("node-1"), "a", &flows("node-1"), addrs),
            Err(Refusal::UnknownNode),
            "a node the source does not know (deleted) opens no flow channel"
        );
        assert_eq!(
            authorize(&node_id("node-1"), "a", &flows("node-0"), addrs),
            Err(Refusal::NodeMismatch)
        );
    }

    /// Registers a gateway from `source` (a loopback address of its own) and waits for its
    /// snapshot; how long that took.
    async fn register_from(source: &str, addr: std::net::SocketAddr, pki: &Pki) -> Duration {
        let started = std::time::Instant::now();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let mut conn = tls_over(tcp, pki, &node_id("node-0")).await;
        let reg = GatewayRegistration {
            node: "node-0".into(),
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            public_key: PublicKey([3; 32]),
        };
        send_hello(&mut conn, &AgentHello::gateway(reg, None)).await;
        let update = UpdateReader::new().next(&mut conn).await;
        assert!(matches!(update, GatewayUpdate::Snapshot(_)));
        started.elapsed()
    }

    /// Sends `hello` as an agent does, as its first frame.
    pub(crate) async fn send_hello<S: AsyncWrite + Unpin>(conn: &mut S, hello: &AgentHello) {
        conn.write_all(&encode_json_frame(hello, "hello", 1 << 20).unwrap())
            .await
            .unwrap();
    }

    /// A gateway's side of its stream: the updates it reads.
    pub(crate) struct UpdateReader {
        decoder: FrameDecoder,
        buf: Vec<u8>,
    }

    impl UpdateReader {
        pub(crate) fn new() -> Self {
            Self {
                decoder: FrameDecoder::new(1 << 20),
                buf: vec![0u8; 65536],
            }
        }

        /// The next update, within 5 s of reading.
        pub(crate) async fn next<S: AsyncRead + Unpin>(&mut self, conn: &mut S) -> GatewayUpdate {
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
        let (h, addr, server, pki) = agent_server().await;
        // An attacker on one address opens connections and sends nothing.
        let mut silent = Vec::new();
        for _ in 0..10_000 {
            match TcpStream::connect(addr).await {
                Ok(stream) => silent.push(stream),
                Err(e) => panic!("connect {}: {e}", silent.len()),
            }
        }
        let took = tokio::time::timeout(
            Duration::from_secs(2),
            register_from("127.0.0.2", addr, &pki),
        )
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
        let pki = Pki::new();
        let agent_task = tokio::spawn(serve(
            agent,
            h.clone(),
            1 << 20,
            AgentAuth::Tls(pki.server()),
        ));
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        let status_hub = h.clone();
        let http_task = tokio::spawn(crate::metrics::serve(
            http,
            h.metrics().clone(),
            Arc::new(move || serde_json::to_string_pretty(&status_hub.status()).unwrap()),
        ));
        let rss_before = trellis_test_support::rss_kib();
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
        let grown = trellis_test_support::rss_kib().saturating_sub(rss_before);
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
            register_from("127.0.0.3", agent_addr, &pki),
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
        let (h, addr, server, pki) = agent_server().await;
        let reg = GatewayRegistration {
            node: "n".repeat(HELLO_MAX),
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            public_key: PublicKey([3; 32]),
        };
        let mut conn = connect_as(addr, &pki, &node_id("node-0")).await;
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
        let (h, addr, server, pki) = agent_server().await;
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
                policy: None,
            })
        };
        // The hello, a report in the same write, a frame that is no report and a report
        // claiming another node: the first is kept, the other two are counted and skipped.
        let mut bytes =
            encode_json_frame(&AgentHello::gateway(reg, None), "hello", 1 << 20).unwrap();
        bytes.extend(encode_json_frame(&report("node-0", 1), "r", 1 << 20).unwrap());
        bytes.extend(encode_json_frame(&[1, 2, 3], "junk", 1 << 20).unwrap());
        bytes.extend(encode_json_frame(&report("node-9", 2), "r", 1 << 20).unwrap());
        let mut conn = connect_as(addr, &pki, &node_id("node-0")).await;
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

    /// A node's flow channel is served for the node its certificate names, and relays its
    /// replies; another node's identity is refused.
    #[tokio::test]
    async fn a_nodes_flow_channel_is_served_for_its_own_identity_only() {
        use trellis_core::agent::FlowChannel;
        use trellis_core::flow::protocol::{FlowCommand, FlowReply};
        let (h, addr, server, pki) = agent_server().await;
        let flows_hello = |node: &str| AgentHello {
            token: None,
            role: AgentRole::Flows(FlowChannel { node: node.into() }),
        };
        let mut other = connect_as(addr, &pki, &node_id("node-1")).await;
        send_hello(&mut other, &flows_hello("node-0")).await;
        refused(&mut other).await;
        assert_refusals_counted(&h, &["agent_node_mismatch"]);
        let mut own = connect_as(addr, &pki, &node_id("node-0")).await;
        send_hello(&mut own, &flows_hello("node-0")).await;
        trellis_test_support::eventually_async(
            "node-0's flow channel",
            Duration::from_secs(20),
            || async { (h.flows().sources().nodes == ["node-0"]).then_some(()) },
        )
        .await;
        // The relay asks over TLS, and the node's answer comes back.
        h.flows().set_enabled(true);
        let (out, mut batches) = tokio::sync::mpsc::channel(4);
        let query = tokio::spawn(crate::flows::query::run(
            h.flows().clone(),
            trellis_core::flow::FlowRequest::default(),
            crate::flows::Scope::default(),
            out,
        ));
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut buf = vec![0u8; 4096];
        let id = loop {
            if let Some(FlowCommand::Query { id, .. }) = decoder.next_json().unwrap() {
                break id;
            }
            let n = tokio::time::timeout(Duration::from_secs(5), own.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            decoder.push(&buf[..n]);
        };
        for reply in [
            FlowReply::Flows {
                id,
                flows: vec![crate::flows::merge::tests::flow(
                    1, "a/node-0", "a/x/p", "a/x/q",
                )],
            },
            FlowReply::End { id, error: None },
        ] {
            own.write_all(&encode_json_frame(&reply, "reply", 1 << 20).unwrap())
                .await
                .unwrap();
        }
        own.flush().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), batches.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].node_name, "a/node-0");
        query.await.unwrap();
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
