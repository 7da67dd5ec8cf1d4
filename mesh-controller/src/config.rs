//! The controller's one typed configuration (YAML), with defaults, validated once at start.
//!
//! ```yaml
//! clusterId: east
//! clusterName: East            # default: the ID
//! listen: 0.0.0.0:7443         # QUIC peering (UDP)
//! serviceCidrs: [10.96.0.0/16] # when the source has no ServiceCIDR objects
//! peers:
//!   - id: west
//!     endpoint: 192.0.2.20:7443  # omit if only the peer dials
//!     podCIDRs: [10.2.0.0/16]    # what west may claim (with its certificate's ranges,
//!     serviceCIDRs: [10.97.0.0/16] #  a claim must be inside both; with neither, nothing)
//! peerLimits: {nodes: 1000, services: 10000, endpoints: 100000, pods: 100000, identities: 10000}
//!                              # per peer; the defaults
//! networkPolicy: false         # enforce NetworkPolicy (read Pods, Namespaces, NetworkPolicies)
//! leaseSeconds: 30
//! heartbeatSeconds: 5
//! nodeEncryption: false        # re-read at runtime: flipping it needs no restart
//! tls: {ca: ca.pem, cert: east.pem, key: east-key.pem}
//! source:
//!   static: {path: cluster.yaml, pollMillis: 1000}
//!   # or: kubernetes: {settingsNamespace: trellis-system, settingsConfigMap: trellis-controller}
//! metricsListen: 0.0.0.0:9464
//! agentListen: 0.0.0.0:7444    # gateways and DNS subscribe here
//! agentTls: {ca: agent-ca.pem, cert: agent.pem, key: agent-key.pem}  # mutual TLS, identities
//! nodeBootstrap: {caKey: agent-ca-key.pem, serviceAccount: trellis-system/trellis-gateway,
//!                 dnsServiceAccount: trellis-system/trellis-dns}
//!   # Kubernetes only: gateways get 24 h node certificates for their ServiceAccount token,
//!   # DNS its dns.<cluster>.trellis for its own. With caKey, a missing agentTls.cert/key is
//!   # issued by the controller itself (agent.<cluster>.trellis) and renewed before it expires.
//! # agentTokenFile: agent-token  # deprecated plaintext mode (no agentTls): any holder registers any node
//! stateFile: /var/lib/trellis/controller-state.json  # last state, served after a restart
//! stateConfigMap: trellis-controller-state  # Kubernetes: the last state in this ConfigMap
//!                              # (settingsNamespace) instead, read by whichever replica leads next
//! leaderElection: {lease: trellis-controller, namespace: trellis-system,
//!                  leaseDurationSeconds: 15, renewDeadlineSeconds: 10, retryPeriodSeconds: 2}
//!   # or {file: /run/trellis/leader.json, ...}: replicas on one machine (the lab). Only the
//!   # leader binds the peering, agent and flows listeners and writes; /leader says who
//!   # leads, /readyz is 200 on every healthy replica (a follower once its sources synced).
//!   # podSelector: "app.kubernetes.io/name=trellis,app.kubernetes.io/component=controller"
//!   # (with lease, env POD_NAME and POD_NAMESPACE): the leader labels its pod
//!   # trellis.dev/controller-leader=true and unlabels the others; Services select the label
//! flows: {enabled: false, listen: 127.0.0.1:4245}  # GET /flows: the cluster's flows (NDJSON);
//!                              # loopback only: kubectl port-forward (RBAC) reaches it
//! clustersetIPRanges: [10.255.0.0/16]  # (also clusterset_ip_ranges) without an API server:
//!                              # the controller gives each ClusterSetIP import a VIP from these
//!                              # (one per family listed); unset: the derived Services' ClusterIPs
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use trellis_core::cluster::ClusterId;
use trellis_core::peering::DEFAULT_MAX_FRAME;

use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerEntry {
    pub id: ClusterId,
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// The pod ranges the peer may claim (see [`trellis_core::claims`]).
    #[serde(default, rename = "podCIDRs", alias = "podCidrs")]
    pub pod_cidrs: Option<Vec<IpNet>>,
    /// The service ranges the peer may claim.
    #[serde(default, rename = "serviceCIDRs", alias = "serviceCidrs")]
    pub service_cidrs: Option<Vec<IpNet>>,
}

impl PeerEntry {
    /// What the configuration allows the peer: `None` when it lists neither pod nor service
    /// ranges (then only the peer's certificate speaks for it).
    pub fn allowance(&self) -> Option<Vec<IpNet>> {
        if self.pod_cidrs.is_none() && self.service_cidrs.is_none() {
            return None;
        }
        Some(
            self.pod_cidrs
                .iter()
                .chain(&self.service_cidrs)
                .flatten()
                .copied()
                .collect(),
        )
    }
}

/// Per-peer quotas (`peerLimits`); the defaults fit 1,000 nodes, 10,000 services and 100,000
/// endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerLimits {
    #[serde(default = "default_limit_nodes")]
    pub nodes: usize,
    #[serde(default = "default_limit_services")]
    pub services: usize,
    #[serde(default = "default_limit_endpoints")]
    pub endpoints: usize,
    /// NetworkPolicy pod endpoints.
    #[serde(default = "default_limit_pods")]
    pub pods: usize,
    /// NetworkPolicy identities (distinct label sets).
    #[serde(default = "default_limit_identities")]
    pub identities: usize,
}

fn default_limit_nodes() -> usize {
    trellis_core::claims::Limits::default().nodes
}
fn default_limit_services() -> usize {
    trellis_core::claims::Limits::default().services
}
fn default_limit_endpoints() -> usize {
    trellis_core::claims::Limits::default().endpoints
}
fn default_limit_pods() -> usize {
    trellis_core::claims::Limits::default().pods
}
fn default_limit_identities() -> usize {
    trellis_core::claims::Limits::default().identities
}

impl Default for PeerLimits {
    fn default() -> Self {
        let l = trellis_core::claims::Limits::default();
        Self {
            nodes: l.nodes,
            services: l.services,
            endpoints: l.endpoints,
            pods: l.pods,
            identities: l.identities,
        }
    }
}

impl From<PeerLimits> for trellis_core::claims::Limits {
    fn from(l: PeerLimits) -> Self {
        Self {
            nodes: l.nodes,
            services: l.services,
            endpoints: l.endpoints,
            pods: l.pods,
            identities: l.identities,
        }
    }
}

/// `nodeBootstrap`: the agent CA's key (the certificate is `agentTls.ca`), the gateways'
/// ServiceAccount and optionally DNS's, `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeBootstrapConfig {
    pub ca_key: PathBuf,
    pub service_account: String,
    /// DNS's ServiceAccount: its token gets `dns.<cluster>.trellis` (and nothing else).
    #[serde(default)]
    pub dns_service_account: Option<String>,
}

fn namespaced(s: &str) -> Option<(String, String)> {
    let (ns, name) = s.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .then(|| (ns.to_owned(), name.to_owned()))
}

impl NodeBootstrapConfig {
    /// `(namespace, name)` of the gateways' ServiceAccount.
    pub fn service_account(&self) -> Option<(String, String)> {
        namespaced(&self.service_account)
    }

    /// `(namespace, name)` of DNS's ServiceAccount, if configured (and well-formed).
    pub fn dns_service_account(&self) -> Option<(String, String)> {
        self.dns_service_account.as_deref().and_then(namespaced)
    }
}

/// `agentTls`: the cluster's agent CA, and the controller's `agent.<cluster>.trellis`
/// certificate and key. Without `cert` and `key`, the controller issues them itself from the
/// agent CA key (`nodeBootstrap.caKey`) into the directory of `stateFile`, at every start and
/// before they expire ([`AgentTlsPaths::self_issued`]): no file names the cluster in advance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTlsPaths {
    pub ca: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `flows`: the flows listener, where `trellis observe` reads the cluster's flows (`GET
/// /flows`, relayed from every node's flow channel and, when asked, from peer clusters). It
/// has no authentication of its own, so it listens on loopback only: a reader comes through
/// `kubectl port-forward` (Kubernetes RBAC decides) or from the controller's own network
/// namespace. Off by default; then peers' flow queries are refused too.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowsConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_flows_listen")]
    pub listen: SocketAddr,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_flows_listen(),
        }
    }
}

/// hubble-relay's port.
fn default_flows_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4245))
}

/// `leaderElection`: where the replicas' election record is, a Lease (`lease`, in `namespace`,
/// by default `settingsNamespace`) or a file (`file`), and client-go's timings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaderElectionConfig {
    #[serde(default)]
    pub lease: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default = "default_lease_duration")]
    pub lease_duration_seconds: u64,
    #[serde(default = "default_renew_deadline")]
    pub renew_deadline_seconds: u64,
    #[serde(default = "default_retry_period")]
    pub retry_period_seconds: u64,
    /// With `lease`: the label selector of the controller's pods (`key=value,...`, the chart's
    /// selector labels). With env POD_NAME and POD_NAMESPACE set, the leader labels its pod
    /// `trellis.dev/controller-leader: "true"` and unlabels the others found by it.
    #[serde(default)]
    pub pod_selector: Option<String>,
}

fn default_lease_duration() -> u64 {
    15
}
fn default_renew_deadline() -> u64 {
    10
}
fn default_retry_period() -> u64 {
    2
}

/// Where the election record is, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseLocation {
    Kubernetes { namespace: String, name: String },
    File(PathBuf),
}

impl LeaderElectionConfig {
    pub fn timings(&self) -> crate::leader::Timings {
        crate::leader::Timings {
            lease_duration: Duration::from_secs(self.lease_duration_seconds),
            renew_deadline: Duration::from_secs(self.renew_deadline_seconds),
            retry_period: Duration::from_secs(self.retry_period_seconds),
        }
    }

    fn check(&self, source: &SourceConfig) -> Result<(), String> {
        match (&self.lease, &self.file) {
            (Some(_), Some(_)) | (None, None) => {
                return Err("leaderElection needs exactly one of lease (a Kubernetes Lease) and file (replicas on one machine)".into());
            }
            (Some(name), None) => {
                if !matches!(source, SourceConfig::Kubernetes { .. }) {
                    return Err("leaderElection.lease needs the Kubernetes source; use leaderElection.file without an API server".into());
                }
                if !is_object_name(name) {
                    return Err(format!(
                        "leaderElection.lease {name:?} is not a Kubernetes object name (lowercase letters, digits, '-' and '.')"
                    ));
                }
                if let Some(ns) = &self.namespace
                    && !is_object_name(ns)
                {
                    return Err(format!(
                        "leaderElection.namespace {ns:?} is not a namespace name"
                    ));
                }
            }
            (None, Some(_)) => {
                if self.namespace.is_some() {
                    return Err("leaderElection.namespace goes with lease, not file".into());
                }
                if self.pod_selector.is_some() {
                    return Err("leaderElection.podSelector goes with lease: replicas on one machine have no pods to label".into());
                }
            }
        }
        if let Some(selector) = &self.pod_selector {
            check_equality_selector(selector)
                .map_err(|e| format!("leaderElection.podSelector {selector:?}: {e}"))?;
        }
        let (lease, renew, retry) = (
            self.lease_duration_seconds,
            self.renew_deadline_seconds,
            self.retry_period_seconds,
        );
        if retry == 0 {
            return Err("leaderElection.retryPeriodSeconds must be at least 1".into());
        }
        // The holder must give up before anyone may take over, and get a few tries first.
        if renew <= retry || lease <= renew {
            return Err(format!(
                "leaderElection needs leaseDurationSeconds ({lease}) > renewDeadlineSeconds ({renew}) > retryPeriodSeconds ({retry})"
            ));
        }
        if lease > i32::MAX as u64 {
            return Err("leaderElection.leaseDurationSeconds is too large".into());
        }
        Ok(())
    }
}

/// An equality-based label selector, `key=value` terms joined by commas: what the chart's
/// selector labels give, and nothing the API server would read differently.
fn check_equality_selector(selector: &str) -> Result<(), String> {
    if selector.trim().is_empty() {
        return Err("empty: it would select every pod of the namespace".into());
    }
    for term in selector.split(',') {
        let Some((key, value)) = term.split_once('=') else {
            return Err(format!("{term:?} is not key=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        let key_ok = !key.is_empty()
            && key.len() <= 316
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        let value_ok = value.len() <= 63
            && !value.starts_with('=')
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !key_ok || !value_ok {
            return Err(format!("{term:?} is not a label key=value"));
        }
    }
    Ok(())
}

/// A Kubernetes object name (DNS-1123 subdomain).
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub enum SourceConfig {
    Static {
        path: PathBuf,
        #[serde(default = "default_poll_millis")]
        poll_millis: u64,
    },
    Kubernetes {
        /// The ConfigMap with runtime settings (`nodeEncryption`).
        #[serde(default = "default_settings_namespace")]
        settings_namespace: String,
        #[serde(default = "default_settings_name")]
        settings_config_map: String,
    },
}

fn default_settings_namespace() -> String {
    "trellis-system".into()
}
fn default_settings_name() -> String {
    "trellis-controller".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Optional: without it the ID comes from the ClusterProperty `cluster.clusterset.k8s.io`
    /// (in the static file, or on the API server).
    #[serde(default)]
    pub cluster_id: Option<ClusterId>,
    #[serde(default)]
    pub cluster_name: Option<String>,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub service_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
    #[serde(default = "default_lease")]
    pub lease_seconds: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
    #[serde(default)]
    pub node_encryption: bool,
    pub tls: TlsPaths,
    pub source: SourceConfig,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub agent_listen: Option<SocketAddr>,
    /// Where the last state is kept across restarts (served until the sources resync).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Kubernetes source: keep the last state in this ConfigMap (in `settingsNamespace`)
    /// instead of `stateFile`, so a replica on another node starts from it.
    #[serde(default)]
    pub state_config_map: Option<String>,
    /// Replicas elect one leader; without it this process always leads.
    #[serde(default)]
    pub leader_election: Option<LeaderElectionConfig>,
    /// The agent port's TLS: the cluster's agent CA (clients must chain to it), and the
    /// controller's `agent.<cluster>.trellis` certificate and key. Re-read when they change.
    #[serde(default)]
    pub agent_tls: Option<AgentTlsPaths>,
    /// On Kubernetes: issue node certificates to gateways that prove their node with their
    /// projected ServiceAccount token (needs `agentTls` and the Kubernetes source).
    #[serde(default)]
    pub node_bootstrap: Option<NodeBootstrapConfig>,
    /// Deprecated (only without `agentTls`): a file holding the shared token gateways and DNS
    /// present in plaintext; whoever holds it can register any node.
    #[serde(default)]
    pub agent_token_file: Option<PathBuf>,
    /// The largest peering frame (a peer's snapshot or delta) accepted, in bytes: a peer whose
    /// state is larger is refused (its session closes; other peers are unaffected).
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    #[serde(default)]
    pub peer_limits: PeerLimits,
    /// Enforce NetworkPolicy: read NetworkPolicies, Pods and Namespaces, share the cluster's
    /// identities and pods with peers and stream every node its policy inputs. Off by
    /// default: a source that knows no pods must not stream an empty policy (nodes drop the
    /// traffic of pods they were not told about).
    #[serde(default)]
    pub network_policy: bool,
    #[serde(default)]
    pub flows: FlowsConfig,
    /// Where the controller itself allocates clusterset VIPs (one per family these cover) for
    /// its ClusterSetIP imports, on a cluster without an API server to give the derived
    /// Services ClusterIPs (the lab). CIDRs as text, checked by [`Config::validate`].
    #[serde(
        default,
        rename = "clustersetIPRanges",
        alias = "clustersetIpRanges",
        alias = "clusterset_ip_ranges"
    )]
    pub clusterset_ip_ranges: Vec<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}
fn default_lease() -> u64 {
    30
}
fn default_heartbeat() -> u64 {
    5
}
fn default_poll_millis() -> u64 {
    1000
}
fn default_max_frame() -> usize {
    DEFAULT_MAX_FRAME
}

/// `clustersetIPRanges` as networks: each a CIDR without host bits, none inside another (a
/// nested range would let two services share an address).
fn parse_clusterset_ip_ranges(ranges: &[String]) -> Result<Vec<IpNet>, String> {
    let mut nets: Vec<IpNet> = Vec::new();
    for text in ranges {
        let net: IpNet = text.trim().parse().map_err(|_| {
            format!(
                "clustersetIPRanges: {text:?} is not a CIDR (for example 10.255.0.0/16 or \
                 fd00:255::/112)"
            )
        })?;
        if net.trunc() != net {
            return Err(format!(
                "clustersetIPRanges: {net} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        if let Some(other) = nets.iter().find(|o| o.contains(&net) || net.contains(*o)) {
            return Err(format!("clustersetIPRanges: {net} overlaps {other}"));
        }
        nets.push(net);
    }
    Ok(nets)
}

impl Config {
    /// Parses and validates.
    pub fn parse(yaml: &str) -> Result<Self, Error> {
        // Through a JSON value so `source: {static: ...}` reads as a plain map (YAML
        // libraries otherwise expect `!static` tags for enums).
        let value: serde_json::Value =
            serde_norway::from_str(yaml).map_err(|source| Error::ConfigYaml { source })?;
        let cfg: Config =
            serde_json::from_value(value).map_err(|source| Error::ConfigFields { source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::Config { reason });
        if self.heartbeat_seconds == 0 {
            return bad("heartbeatSeconds must be at least 1".into());
        }
        if self.lease_seconds < 2 * self.heartbeat_seconds {
            return bad(format!(
                "leaseSeconds ({}) must be at least twice heartbeatSeconds ({})",
                self.lease_seconds, self.heartbeat_seconds
            ));
        }
        let mut seen = BTreeSet::new();
        for p in &self.peers {
            if Some(&p.id) == self.cluster_id.as_ref() {
                return bad(format!("peer {} is this cluster itself", p.id));
            }
            if !seen.insert(&p.id) {
                return bad(format!("peer {} is listed twice", p.id));
            }
        }
        if self.agent_tls.is_some() && self.agent_token_file.is_some() {
            return bad("agentTokenFile cannot be combined with agentTls: with agent TLS a client is known by its certificate, and a shared token is refused; remove agentTokenFile".into());
        }
        if let Some(agent) = &self.agent_tls {
            if agent.cert.is_some() != agent.key.is_some() {
                return bad("agentTls.cert and agentTls.key go together".into());
            }
            if agent.cert.is_none() && (self.node_bootstrap.is_none() || self.state_file.is_none())
            {
                return bad("agentTls without cert and key needs nodeBootstrap.caKey (the controller issues its own agent certificate) and stateFile (whose directory holds it)".into());
            }
        }
        if let Some(bootstrap) = &self.node_bootstrap {
            if self.agent_tls.is_none() || !matches!(self.source, SourceConfig::Kubernetes { .. }) {
                return bad("nodeBootstrap needs agentTls and the Kubernetes source (it checks gateways' tokens with the API server)".into());
            }
            if bootstrap.service_account().is_none() {
                return bad("nodeBootstrap.serviceAccount must be NAMESPACE/NAME".into());
            }
            if let Some(dns) = &bootstrap.dns_service_account {
                if bootstrap.dns_service_account().is_none() {
                    return bad("nodeBootstrap.dnsServiceAccount must be NAMESPACE/NAME".into());
                }
                if *dns == bootstrap.service_account {
                    return bad("nodeBootstrap.dnsServiceAccount must not be the gateways' ServiceAccount: each account gets only its own identities".into());
                }
            }
        }
        if self.flows.enabled {
            let listen = self.flows.listen;
            if !listen.ip().is_loopback() {
                return bad(format!(
                    "flows.listen ({listen}) must be a loopback address: the flows endpoint has no authentication of its own (readers come through kubectl port-forward, which RBAC guards)"
                ));
            }
            if self.agent_listen.is_none() {
                return bad(
                    "flows needs agentListen: nodes connect their flow channels to the agent port"
                        .into(),
                );
            }
            if [self.metrics_listen, self.agent_listen].contains(&Some(listen)) {
                return bad(format!(
                    "flows.listen ({listen}) is already another listener's address"
                ));
            }
        }
        parse_clusterset_ip_ranges(&self.clusterset_ip_ranges)
            .map_err(|reason| Error::Config { reason })?;
        if !self.clusterset_ip_ranges.is_empty()
            && matches!(self.source, SourceConfig::Kubernetes { .. })
        {
            // kube-proxy translates the derived Services' ClusterIPs only: a VIP of our own
            // would be answered by DNS and dropped by every node.
            return bad("clustersetIPRanges is for a controller without an API server: with the Kubernetes source the clusterset IPs are the derived Services' ClusterIPs".into());
        }
        if let Some(election) = &self.leader_election {
            election
                .check(&self.source)
                .map_err(|reason| Error::Config { reason })?;
        }
        if let Some(name) = &self.state_config_map {
            if !matches!(self.source, SourceConfig::Kubernetes { .. }) {
                return bad("stateConfigMap needs the Kubernetes source; use stateFile without an API server".into());
            }
            if !is_object_name(name) {
                return bad(format!(
                    "stateConfigMap {name:?} is not a Kubernetes object name"
                ));
            }
        }
        if self.max_frame_bytes < 64 * 1024 {
            return bad("maxFrameBytes must be at least 65536".into());
        }
        // A tick is one stat() of the file (it is read only when its size, time or inode
        // changed), so a short poll costs little; below 10 ms it would be a busy loop.
        if let SourceConfig::Static { poll_millis, .. } = &self.source
            && *poll_millis < 10
        {
            return bad("source.static.pollMillis must be at least 10".into());
        }
        Ok(())
    }

    /// The agent TLS files in use: `(ca, cert, key, self-issued)`; the cert and key are in
    /// the directory of `stateFile` when the controller issues them itself.
    pub fn agent_tls_files(&self) -> Option<(PathBuf, PathBuf, PathBuf, bool)> {
        let agent = self.agent_tls.as_ref()?;
        match (&agent.cert, &agent.key) {
            (Some(cert), Some(key)) => Some((agent.ca.clone(), cert.clone(), key.clone(), false)),
            _ => {
                let dir = self
                    .state_file
                    .as_ref()?
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_default();
                Some((
                    agent.ca.clone(),
                    dir.join("agent.pem"),
                    dir.join("agent-key.pem"),
                    true,
                ))
            }
        }
    }

    /// `clustersetIPRanges`, parsed (empty when unset).
    pub fn clusterset_ip_ranges(&self) -> Vec<IpNet> {
        parse_clusterset_ip_ranges(&self.clusterset_ip_ranges).unwrap_or_default()
    }

    /// The display name: `clusterName`, else the cluster ID.
    pub fn name(&self, id: &ClusterId) -> String {
        self.cluster_name.clone().unwrap_or_else(|| id.to_string())
    }

    /// Where the leader election record is, when the replicas elect one.
    pub fn lease_location(&self) -> Option<LeaseLocation> {
        let election = self.leader_election.as_ref()?;
        if let Some(file) = &election.file {
            return Some(LeaseLocation::File(file.clone()));
        }
        let namespace = election
            .namespace
            .clone()
            .unwrap_or_else(|| match &self.source {
                SourceConfig::Kubernetes {
                    settings_namespace, ..
                } => settings_namespace.clone(),
                SourceConfig::Static { .. } => default_settings_namespace(),
            });
        Some(LeaseLocation::Kubernetes {
            namespace,
            name: election.lease.clone()?,
        })
    }

    /// The controller pods' selector, when the leader labels its pod (a Lease and
    /// `leaderElection.podSelector`).
    pub fn leader_pod_selector(&self) -> Option<&str> {
        let election = self.leader_election.as_ref()?;
        election.lease.as_ref()?;
        election.pod_selector.as_deref()
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_seconds)
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "clusterId: east\ntls: {ca: ca.pem, cert: c.pem, key: k.pem}\nsource: {static: {path: c.yaml}}\n";

    const K8S: &str = "tls: {ca: ca.pem, cert: c.pem, key: k.pem}\nsource: {kubernetes: {}}\n";

    /// Without agentTls.cert/key the controller issues its own into stateFile's directory;
    /// DNS's ServiceAccount is optional and apart from the gateways'.
    #[test]
    fn a_self_issued_agent_certificate_lives_beside_the_state() {
        let c = Config::parse(&format!(
            "{K8S}agentTls: {{ca: /ca/ca.pem}}\nstateFile: /var/lib/trellis/state.json\nnodeBootstrap: {{caKey: /ca/ca-key.pem, serviceAccount: ns/gw, dnsServiceAccount: ns/dns}}\n"
        ))
        .unwrap();
        assert_eq!(
            c.agent_tls_files(),
            Some((
                "/ca/ca.pem".into(),
                "/var/lib/trellis/agent.pem".into(),
                "/var/lib/trellis/agent-key.pem".into(),
                true
            ))
        );
        let bootstrap = c.node_bootstrap.as_ref().unwrap();
        assert_eq!(
            bootstrap.dns_service_account(),
            Some(("ns".into(), "dns".into()))
        );
        let given = Config::parse(&format!(
            "{K8S}agentTls: {{ca: a.pem, cert: c.pem, key: k.pem}}\n"
        ))
        .unwrap();
        assert_eq!(
            given.agent_tls_files(),
            Some(("a.pem".into(), "c.pem".into(), "k.pem".into(), false))
        );
    }

    #[test]
    fn leader_election_reads_a_lease_or_a_file_with_client_go_timings() {
        let c = Config::parse(&format!(
            "{K8S}leaderElection: {{lease: trellis-controller}}\nstateConfigMap: trellis-controller-state\n"
        ))
        .unwrap();
        assert_eq!(
            c.lease_location(),
            Some(LeaseLocation::Kubernetes {
                namespace: "trellis-system".into(),
                name: "trellis-controller".into()
            })
        );
        let election = c.leader_election.as_ref().unwrap();
        assert_eq!(
            election.timings(),
            crate::leader::Timings {
                lease_duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                retry_period: Duration::from_secs(2),
            }
        );
        assert_eq!(
            c.state_config_map.as_deref(),
            Some("trellis-controller-state")
        );
        let other_ns = Config::parse(&format!(
            "{K8S}leaderElection: {{lease: l, namespace: ha, leaseDurationSeconds: 6, renewDeadlineSeconds: 4, retryPeriodSeconds: 1}}\n"
        ))
        .unwrap();
        assert_eq!(
            other_ns.lease_location(),
            Some(LeaseLocation::Kubernetes {
                namespace: "ha".into(),
                name: "l".into()
            })
        );
        let file = Config::parse(&format!(
            "{MIN}leaderElection: {{file: /run/lab/leader.json}}\n"
        ))
        .unwrap();
        assert_eq!(
            file.lease_location(),
            Some(LeaseLocation::File("/run/lab/leader.json".into()))
        );
        assert_eq!(Config::parse(MIN).unwrap().lease_location(), None);
        assert_eq!(c.leader_pod_selector(), None);
        let labelled = Config::parse(&format!(
            "{K8S}leaderElection: {{lease: l, podSelector: \"app.kubernetes.io/name=trellis, app.kubernetes.io/component=controller\"}}\n"
        ))
        .unwrap();
        assert_eq!(
            labelled.leader_pod_selector(),
            Some("app.kubernetes.io/name=trellis, app.kubernetes.io/component=controller")
        );
    }

    #[test]
    fn defaults_fill_in() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7443".parse().unwrap());
        assert_eq!(c.lease(), Duration::from_secs(30));
        assert_eq!(c.name(c.cluster_id.as_ref().unwrap()), "east");
        let no_id = Config::parse(&MIN.replace("clusterId: east\n", "")).unwrap();
        assert_eq!(no_id.cluster_id, None);
        assert!(!c.node_encryption);
        assert!(!c.network_policy, "policy only when asked for");
        assert_eq!(c.flows, FlowsConfig::default());
        assert!(!c.flows.enabled, "flows only when asked for");
        let flows = Config::parse(&format!(
            "{MIN}agentListen: 0.0.0.0:7444\nflows: {{enabled: true}}\n"
        ))
        .unwrap();
        assert_eq!(
            flows.flows,
            FlowsConfig {
                enabled: true,
                listen: "127.0.0.1:4245".parse().unwrap()
            }
        );
        assert_eq!(
            c.source,
            SourceConfig::Static {
                path: "c.yaml".into(),
                poll_millis: 1000
            }
        );
    }

    #[test]
    fn full_config_parses() {
        let yaml = r#"
clusterId: east
clusterName: East
listen: 127.0.0.1:17443
serviceCidrs: [10.96.0.0/16]
peers:
  - id: west
    endpoint: 127.0.0.1:27443
    podCIDRs: [10.2.0.0/16]
    serviceCIDRs: [10.97.0.0/16, "fd97::/108"]
  - id: north
peerLimits: {services: 500, pods: 7}
networkPolicy: true
leaseSeconds: 20
heartbeatSeconds: 2
nodeEncryption: true
tls: {ca: ca.pem, cert: east.pem, key: east-key.pem}
source: {kubernetes: {}}
metricsListen: 127.0.0.1:9464
agentListen: 127.0.0.1:7444
"#;
        let c = Config::parse(yaml).unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[1].endpoint, None);
        assert_eq!(
            c.peers[0].allowance(),
            Some(
                ["10.2.0.0/16", "10.97.0.0/16", "fd97::/108"]
                    .iter()
                    .map(|s| s.parse().unwrap())
                    .collect()
            )
        );
        assert_eq!(c.peers[1].allowance(), None);
        assert_eq!(
            c.peer_limits,
            PeerLimits {
                nodes: 1000,
                services: 500,
                pods: 7,
                ..PeerLimits::default()
            }
        );
        assert!(c.network_policy);
        assert_eq!(
            c.source,
            SourceConfig::Kubernetes {
                settings_namespace: "trellis-system".into(),
                settings_config_map: "trellis-controller".into()
            }
        );
        assert!(c.node_encryption);
        let c = Config::parse(&MIN.replace("{path: c.yaml}", "{path: c.yaml, pollMillis: 250}"))
            .unwrap();
        assert_eq!(
            c.source,
            SourceConfig::Static {
                path: "c.yaml".into(),
                poll_millis: 250
            }
        );
    }

    #[test]
    fn clusterset_ip_ranges_parse_under_either_spelling() {
        assert!(
            Config::parse(MIN)
                .unwrap()
                .clusterset_ip_ranges()
                .is_empty()
        );
        for key in ["clustersetIPRanges", "clusterset_ip_ranges"] {
            let c = Config::parse(&format!(
                "{MIN}{key}: [10.255.0.0/16, \"fd00:255::/112\"]\n"
            ))
            .unwrap();
            assert_eq!(
                c.clusterset_ip_ranges(),
                vec![
                    "10.255.0.0/16".parse::<IpNet>().unwrap(),
                    "fd00:255::/112".parse().unwrap()
                ],
                "{key}"
            );
        }
    }

    #[test]
    fn invalid_configs_say_why() {
        let cases = [
            (
                format!("{MIN}leaseSeconds: 5\nheartbeatSeconds: 5\n"),
                "twice",
            ),
            (format!("{MIN}peers: [{{id: east}}]\n"), "itself"),
            (format!("{MIN}peers: [{{id: w}}, {{id: w}}]\n"), "twice"),
            (format!("{MIN}bogus: 1\n"), "unknown field"),
            (MIN.replace("east", "East"), "lowercase"),
            (
                format!("{MIN}agentTls: {{ca: a.pem, cert: c.pem}}\n"),
                "go together",
            ),
            (
                format!("{K8S}agentTls: {{ca: a.pem}}\nstateFile: /s/state.json\n"),
                "needs nodeBootstrap.caKey",
            ),
            (
                format!(
                    "{K8S}agentTls: {{ca: a.pem}}\nnodeBootstrap: {{caKey: k.pem, serviceAccount: ns/gw}}\n"
                ),
                "stateFile",
            ),
            (
                format!(
                    "{K8S}agentTls: {{ca: a.pem}}\nstateFile: /s/state.json\nnodeBootstrap: {{caKey: k.pem, serviceAccount: ns/gw, dnsServiceAccount: ns/gw}}\n"
                ),
                "must not be the gateways'",
            ),
            (
                format!(
                    "{K8S}agentTls: {{ca: a.pem}}\nstateFile: /s/state.json\nnodeBootstrap: {{caKey: k.pem, serviceAccount: ns/gw, dnsServiceAccount: dns}}\n"
                ),
                "dnsServiceAccount must be NAMESPACE/NAME",
            ),
            (
                format!(
                    "{MIN}agentListen: 0.0.0.0:7444\nflows: {{enabled: true, listen: 0.0.0.0:4245}}\n"
                ),
                "must be a loopback address",
            ),
            (
                format!("{MIN}flows: {{enabled: true}}\n"),
                "flows needs agentListen",
            ),
            (
                format!(
                    "{MIN}agentListen: 127.0.0.1:7444\nflows: {{enabled: true, listen: 127.0.0.1:7444}}\n"
                ),
                "already another listener's",
            ),
            (
                format!("{MIN}flows: {{enabled: true, port: 1}}\n"),
                "unknown field",
            ),
            (
                format!("{K8S}clustersetIPRanges: [10.255.0.0/16]\n"),
                "clustersetIPRanges is for a controller without an API server",
            ),
            (
                format!("{MIN}clustersetIPRanges: [\"\"]\n"),
                "\"\" is not a CIDR",
            ),
            (
                format!("{MIN}clustersetIPRanges: [10.255.0.0]\n"),
                "\"10.255.0.0\" is not a CIDR",
            ),
            (
                format!("{MIN}clustersetIPRanges: [10.255.0.1/16]\n"),
                "did you mean 10.255.0.0/16?",
            ),
            (
                format!("{MIN}clustersetIPRanges: [10.255.0.0/16, 10.255.7.0/24]\n"),
                "10.255.7.0/24 overlaps 10.255.0.0/16",
            ),
        ];
        let election = [
            (
                format!("{MIN}leaderElection: {{}}\n"),
                "exactly one of lease",
            ),
            (
                format!("{K8S}leaderElection: {{lease: a, file: /f}}\n"),
                "exactly one of lease",
            ),
            (
                format!("{MIN}leaderElection: {{lease: a}}\n"),
                "lease needs the Kubernetes source",
            ),
            (
                format!("{K8S}leaderElection: {{lease: Trellis}}\n"),
                "not a Kubernetes object name",
            ),
            (
                format!("{MIN}leaderElection: {{file: /f, namespace: x}}\n"),
                "goes with lease",
            ),
            (
                format!("{MIN}leaderElection: {{file: /f, podSelector: a=b}}\n"),
                "podSelector goes with lease",
            ),
            (
                format!("{K8S}leaderElection: {{lease: l, podSelector: \"\"}}\n"),
                "would select every pod",
            ),
            (
                format!("{K8S}leaderElection: {{lease: l, podSelector: \"app in (x)\"}}\n"),
                "is not key=value",
            ),
            (
                format!("{K8S}leaderElection: {{lease: l, podSelector: \"app==x\"}}\n"),
                "is not a label key=value",
            ),
            (
                format!("{MIN}leaderElection: {{file: /f, renewDeadlineSeconds: 15}}\n"),
                "leaseDurationSeconds (15) > renewDeadlineSeconds (15)",
            ),
            (
                format!("{MIN}leaderElection: {{file: /f, retryPeriodSeconds: 10}}\n"),
                "> retryPeriodSeconds (10)",
            ),
            (
                format!("{MIN}leaderElection: {{file: /f, retryPeriodSeconds: 0}}\n"),
                "at least 1",
            ),
            (
                format!("{MIN}leaderElection: {{file: /f, bogus: 1}}\n"),
                "unknown field",
            ),
            (
                format!("{MIN}stateConfigMap: state\n"),
                "stateConfigMap needs the Kubernetes source",
            ),
            (
                format!("{K8S}stateConfigMap: \"-x\"\n"),
                "not a Kubernetes object name",
            ),
        ];
        for (yaml, want) in cases.into_iter().chain(election) {
            let err = trellis_core::error_chain(&Config::parse(&yaml).unwrap_err());
            assert!(err.contains(want), "{yaml}: {err}");
        }
    }
}
