//! Bounded peer claims: what a remote cluster may make the mesh route, pure.
//!
//! Every address a peer announces (node pod CIDRs, service CIDRs, ClusterIPs, endpoint
//! addresses, gateway endpoints) and every WireGuard key is checked here before anything of it
//! reaches a gateway, DNS or the Kubernetes API. The offending *object* is refused (a node, a
//! service CIDR, a service, one endpoint); the rest of the peer keeps working. [`admit`] takes
//! the local state, each peer's state with its [`Allowance`] (the ranges the mesh CA signed into
//! its certificate and/or the controller's configuration lists) and the peer's own endpoints,
//! and returns the sanitized states plus a [`Refusal`] for everything it took out.
//!
//! The rules, in order:
//! 1. **Authority.** With neither a certificate allowance nor a configured one, nothing of the
//!    peer is routed. Where both exist a claim must be inside both.
//! 2. **Names** are DNS-1123 (node names and endpoint node names subdomains, namespaces, service
//!    names, hostnames and port names labels) before they reach DNS or the Kubernetes API; a
//!    service's MCS properties (exported labels and annotations, ports' appProtocol, session
//!    affinity, traffic policies, IP families, creation time) are what an API server accepts,
//!    within [`MAX_EXPORTED_LABELS`] / [`MAX_EXPORTED_ANNOTATIONS`] entries and
//!    [`MAX_ANNOTATION_VALUE`] bytes a value, or the service is refused.
//! 3. **Quotas** ([`Limits`]): the first nodes / services by name are kept, endpoints counted
//!    over services in name order; the excess is refused, the same way every time.
//! 4. **Always refused:** loopback, link-local, multicast, unspecified (`0.0.0.0/8`, `::`),
//!    broadcast and IPv4-mapped IPv6 ranges; prefixes shorter than [`MIN_PREFIX_V4`] /
//!    [`MIN_PREFIX_V6`] (default-route-like, e.g. `128.0.0.0/1`); anything covering a local
//!    node address, gateway endpoint or controller address, or inside a local pod or service
//!    CIDR (the local cluster always wins); anything outside the allowance.
//! 5. **Across peers** (on what survived 1–4): a prefix covering any peer's gateway endpoint or
//!    controller endpoint is refused; two peers' overlapping claims (both inside their
//!    allowances: a CA or configuration mistake) are refused on *both* sides, so the outcome
//!    never depends on cluster IDs or connection order.
//! 6. **Keys:** a key of a local gateway is refused for any remote node; a key two remote nodes
//!    announce stays with its first claimant (the memory [`Admission::key_owners`] the caller
//!    feeds back), the later one is refused. Without memory (both new at once), the smaller
//!    `(cluster, node)` wins.
//! 7. **Policy** (NetworkPolicy identities and pods): an identity must be of the peer's own
//!    cluster, in a DNS-1123 namespace, with labels Kubernetes accepts (at most
//!    [`MAX_IDENTITY_LABELS`]); a pod of the peer's own cluster with DNS-1123 names, an admitted
//!    identity, and every address inside a pod CIDR of the admitted node it names (so a peer
//!    can never have a local pod, a local node or another cluster's pod treated as one of its
//!    own by a policy). Quotas keep the first identities by number and pods by name; pods of a
//!    node refused by rules 5–6 are refused with it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::cluster::{ClusterId, ClusterState, ExportedService, NodeState, ServiceKey};
use crate::keyed::Keyed;
use crate::wgkey::PublicKey;

/// The shortest IPv4 prefix a peer may claim: `/8`. Kubernetes' default service CIDR is
/// `10.96.0.0/12` and cluster pod CIDRs are commonly `/16`, so nothing legitimate is broader,
/// while `128.0.0.0/1`-style halves of the internet are refused.
pub const MIN_PREFIX_V4: u8 = 8;
/// The shortest IPv6 prefix a peer may claim: `/32` (an RIR allocation; cluster pod ranges are
/// `/48`–`/64`, service ranges `/108`–`/112`).
pub const MIN_PREFIX_V6: u8 = 32;
/// Refusals listed per peer (the rest are counted, see [`Admission::counts`]).
pub const MAX_LISTED_REFUSALS: usize = 50;

/// Labels an export may carry to the ServiceImport (Kubernetes has no count limit; a peer
/// must not make every cluster store thousands).
pub const MAX_EXPORTED_LABELS: usize = 64;
/// Annotations an export may carry to the ServiceImport.
pub const MAX_EXPORTED_ANNOTATIONS: usize = 64;
/// The longest annotation value admitted, in bytes (Kubernetes allows 256 KiB for all of an
/// object's annotations together; an exported one is metadata, not a payload).
pub const MAX_ANNOTATION_VALUE: usize = 4096;
/// The most bytes (keys and values) all of an export's annotations may hold: each admitted
/// export is kept in every cluster's memory and written onto its ServiceImport, whose
/// annotations Kubernetes caps at 256 KiB.
pub const MAX_ANNOTATION_BYTES: usize = 32 * 1024;
/// `sessionAffinityConfig.clientIP.timeoutSeconds`' upper bound (one day), as Kubernetes has.
pub const MAX_SESSION_AFFINITY_TIMEOUT: i32 = 86_400;

/// Per-peer quotas. The defaults fit 1,000 nodes, 10,000 services, 100,000 endpoints,
/// 100,000 pods and 10,000 identities (NetworkPolicy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub nodes: usize,
    pub services: usize,
    pub endpoints: usize,
    pub pods: usize,
    pub identities: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            nodes: 1_000,
            services: 10_000,
            endpoints: 100_000,
            pods: 100_000,
            identities: 10_000,
        }
    }
}

/// The most labels an identity's pod or namespace label set may hold (Kubernetes bounds
/// labels by the object's size only; a peer's are bounded here so one identity stays small).
pub const MAX_IDENTITY_LABELS: usize = 64;
/// The most addresses a peer's pod may have (Kubernetes: one per family).
pub const MAX_POD_ADDRESSES: usize = 2;
/// The most named ports a peer's pod may list.
pub const MAX_NAMED_PORTS: usize = 64;

/// What a peer may claim, from each authority that speaks for it. A claim must lie inside every
/// allowance present; with none present nothing is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowance {
    /// The ranges in the peer's certificate (RFC 3779 `ipAddrBlocks`, signed by the mesh CA).
    pub certificate: Option<Vec<IpNet>>,
    /// The ranges the local configuration lists for the peer (`peers[].podCIDRs/serviceCIDRs`).
    pub configured: Option<Vec<IpNet>>,
}

impl Allowance {
    fn is_empty(&self) -> bool {
        self.certificate.is_none() && self.configured.is_none()
    }

    fn allows(&self, claim: &IpNet) -> bool {
        let inside = |ranges: &Vec<IpNet>| ranges.iter().any(|r| r.contains(claim));
        !self.is_empty()
            && self.certificate.as_ref().is_none_or(inside)
            && self.configured.as_ref().is_none_or(inside)
    }
}

/// One remote cluster as admission sees it.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub state: &'a ClusterState,
    pub allowance: &'a Allowance,
    /// Where its controller is reached (the configured endpoint, the session's address).
    pub controller_endpoints: &'a [IpAddr],
}

/// The refused object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Object {
    /// The whole cluster.
    Cluster,
    Node(String),
    ServiceCidr,
    Service(ServiceKey),
    Endpoint(ServiceKey),
    /// A policy identity, by number.
    Identity(u32),
    /// A pod endpoint of policy, `namespace/name`.
    Pod(String),
}

impl Object {
    /// A metric label (bounded).
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Cluster => "cluster",
            Object::Node(_) => "node",
            Object::ServiceCidr => "service_cidr",
            Object::Service(_) => "service",
            Object::Endpoint(_) => "endpoint",
            Object::Identity(_) => "identity",
            Object::Pod(_) => "pod",
        }
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Object::Cluster => f.write_str("the cluster"),
            Object::Node(n) => write!(f, "node {n}"),
            Object::ServiceCidr => f.write_str("a service CIDR"),
            Object::Service(k) => write!(f, "service {k}"),
            Object::Endpoint(k) => write!(f, "an endpoint of service {k}"),
            Object::Identity(n) => write!(f, "identity {n}"),
            Object::Pod(p) => write!(f, "pod {p}"),
        }
    }
}

/// Every [`Object::kind`], for metrics.
pub const OBJECT_KINDS: &[&str] = &[
    "cluster",
    "node",
    "service_cidr",
    "service",
    "endpoint",
    "identity",
    "pod",
];
/// Every [`Reason::label`], for metrics.
pub const REASON_LABELS: &[&str] = &[
    "no_allowance",
    "outside_allowance",
    "special_range",
    "too_broad",
    "local_address",
    "local_range",
    "covers_endpoint",
    "overlap",
    "bad_endpoint",
    "local_key",
    "key_taken",
    "bad_name",
    "quota",
    "duplicate_cluster_id",
    "bad_labels",
    "foreign_cluster",
    "unknown_identity",
    "outside_node",
    "bad_properties",
];

/// Why a claim is refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Neither a certificate nor the configuration says what the peer may claim.
    NoAllowance,
    OutsideAllowance,
    /// Loopback, link-local, multicast, unspecified, broadcast, IPv4-mapped.
    SpecialRange(&'static str),
    /// Shorter than [`MIN_PREFIX_V4`] / [`MIN_PREFIX_V6`].
    TooBroad,
    /// Covers or equals a local node's address, gateway endpoint or the controller's address.
    LocalAddress(IpAddr),
    /// Inside (or over) a pod or service CIDR of the local cluster (`cluster`), which owns it.
    LocalRange {
        cluster: ClusterId,
        range: IpNet,
    },
    /// Covers the gateway or controller endpoint of a peer (`cluster`).
    CoversEndpoint {
        cluster: ClusterId,
        address: IpAddr,
    },
    /// Overlaps another peer's claim, both inside their allowances: both are refused.
    Overlap {
        cluster: ClusterId,
        claim: IpNet,
    },
    /// A gateway endpoint that cannot be a remote node's (port 0 or a special address).
    BadEndpoint,
    /// The key of a local gateway.
    LocalKey {
        node: String,
    },
    /// The key another remote node claimed first.
    KeyTaken {
        cluster: ClusterId,
        node: String,
    },
    /// Not DNS-1123.
    BadName,
    /// Over the per-peer quota.
    Quota {
        limit: usize,
    },
    /// The peer presents the local cluster's ID.
    DuplicateClusterId,
    /// An identity's label set is not what Kubernetes accepts (keys, values, count).
    BadLabels,
    /// An identity or pod that names another cluster than the peer's own.
    ForeignCluster,
    /// A pod whose identity the peer does not announce (or that was refused).
    UnknownIdentity,
    /// A pod address outside the pod CIDRs of the admitted node it names: a peer may only
    /// speak for addresses it routes, or a policy would treat another cluster's (or a local)
    /// pod as one of the peer's.
    OutsideNode,
    /// Exported labels or annotations, an appProtocol, session affinity, a traffic policy, IP
    /// families or a creation time Kubernetes would not accept (or over the bounds).
    BadProperties,
}

impl Reason {
    /// A metric label (bounded).
    pub fn label(&self) -> &'static str {
        match self {
            Reason::NoAllowance => "no_allowance",
            Reason::OutsideAllowance => "outside_allowance",
            Reason::SpecialRange(_) => "special_range",
            Reason::TooBroad => "too_broad",
            Reason::LocalAddress(_) => "local_address",
            Reason::LocalRange { .. } => "local_range",
            Reason::CoversEndpoint { .. } => "covers_endpoint",
            Reason::Overlap { .. } => "overlap",
            Reason::BadEndpoint => "bad_endpoint",
            Reason::LocalKey { .. } => "local_key",
            Reason::KeyTaken { .. } => "key_taken",
            Reason::BadName => "bad_name",
            Reason::Quota { .. } => "quota",
            Reason::DuplicateClusterId => "duplicate_cluster_id",
            Reason::BadLabels => "bad_labels",
            Reason::ForeignCluster => "foreign_cluster",
            Reason::UnknownIdentity => "unknown_identity",
            Reason::OutsideNode => "outside_node",
            Reason::BadProperties => "bad_properties",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoAllowance => f.write_str(
                "no allowance: nothing says what this peer may claim; issue its certificate \
                 with `trellis certs cluster --pod-cidr .. --service-cidr ..` or list \
                 `podCIDRs`/`serviceCIDRs` for it under `peers` in this controller's \
                 configuration",
            ),
            Reason::OutsideAllowance => {
                f.write_str("outside the ranges its certificate / configuration allow")
            }
            Reason::SpecialRange(what) => write!(f, "a {what} range is never routed"),
            Reason::TooBroad => write!(
                f,
                "broader than /{MIN_PREFIX_V4} (IPv4) or /{MIN_PREFIX_V6} (IPv6): \
                 default-route-like"
            ),
            Reason::LocalAddress(a) => write!(f, "covers the local address {a}"),
            Reason::LocalRange { cluster, range } => {
                write!(f, "overlaps {range} of this cluster, {cluster}")
            }
            Reason::CoversEndpoint { cluster, address } => {
                write!(f, "covers the endpoint {address} of cluster {cluster}")
            }
            Reason::Overlap { cluster, claim } => write!(
                f,
                "overlaps {claim} of cluster {cluster} (both allowed: a CA or configuration \
                 mistake; both refused)"
            ),
            Reason::BadEndpoint => f.write_str("not a usable gateway endpoint"),
            Reason::LocalKey { node } => {
                write!(f, "the WireGuard key of local node {node}")
            }
            Reason::KeyTaken { cluster, node } => {
                write!(
                    f,
                    "the WireGuard key node {node} of cluster {cluster} claimed first"
                )
            }
            Reason::BadName => f.write_str("not a DNS-1123 name"),
            Reason::Quota { limit } => write!(f, "over the per-peer quota of {limit}"),
            Reason::DuplicateClusterId => f.write_str("it presents this cluster's own ID"),
            Reason::BadLabels => f.write_str(
                "labels Kubernetes would not accept (key or value syntax, length, or more than \
                 64)",
            ),
            Reason::ForeignCluster => f.write_str("names another cluster than the peer's own"),
            Reason::UnknownIdentity => f.write_str("its identity is not an admitted one"),
            Reason::OutsideNode => f.write_str(
                "outside the pod CIDRs of the admitted node it names (a peer speaks only for \
                 its own pods)",
            ),
            Reason::BadProperties => write!(
                f,
                "properties Kubernetes would not accept (exported labels or annotations: key \
                 or value syntax, length, more than {MAX_EXPORTED_LABELS} or a value over \
                 {MAX_ANNOTATION_VALUE} bytes; appProtocol, session affinity, traffic policy \
                 or IP families)"
            ),
        }
    }
}

/// One refused claim.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Refusal {
    pub cluster: ClusterId,
    pub object: Object,
    /// What was claimed, as text (a CIDR, an address, a key, a name, a count).
    pub claim: String,
    pub reason: Reason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster {}: {} refused: {} {}",
            self.cluster, self.object, self.claim, self.reason
        )
    }
}

/// What admission decided for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What of the peer is routed and served (shared with the screening cache while nothing
    /// across peers took anything out of it).
    pub state: Arc<ClusterState>,
    /// The first [`MAX_LISTED_REFUSALS`] refusals, sorted.
    pub refusals: Vec<Refusal>,
    /// All refusals by `(object kind, reason label)`.
    pub counts: BTreeMap<(&'static str, &'static str), usize>,
    /// Nothing of the peer is admitted (no allowance, or it is the local cluster's ID).
    pub whole: bool,
}

impl Verdict {
    pub fn refused_total(&self) -> usize {
        self.counts.values().sum()
    }
}

/// One peer after the rules that depend on it alone (1–4): what [`decide`] starts from. Cache
/// it while the peer's state, its allowance, the limits and the [`LocalContext`] stay the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screened {
    pub state: Arc<ClusterState>,
    refusals: Vec<Refusal>,
    counts: BTreeMap<(&'static str, &'static str), usize>,
    whole: bool,
}

/// Rules 1–4 for one peer (linear in its objects).
pub fn screen(peer: &Peer<'_>, local: &LocalContext, limits: &Limits) -> Screened {
    let mut refusals = Refusals {
        cluster: &peer.state.id,
        all: Vec::new(),
        counts: BTreeMap::new(),
    };
    let state = screen_peer(peer, local, limits, &mut refusals);
    let whole = refusals.all.iter().any(|r| r.object == Object::Cluster);
    Screened {
        state: Arc::new(state),
        refusals: refusals.all,
        counts: refusals.counts,
        whole,
    }
}

/// The decision over all peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub verdicts: BTreeMap<ClusterId, Verdict>,
    /// Who holds each remote key now; pass it back in next time.
    pub key_owners: BTreeMap<PublicKey, (ClusterId, String)>,
}

/// Everything of the local cluster a peer may not claim (built once per decision; compare two
/// to know whether screened peers must be screened again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalContext {
    id: ClusterId,
    addresses: Vec<IpAddr>,
    ranges: Vec<IpNet>,
    keys: BTreeMap<PublicKey, String>,
}

type Local = LocalContext;

impl LocalContext {
    /// From the local state and this cluster's addresses beyond its nodes' (the controller's).
    pub fn new(state: &ClusterState, extra: &[IpAddr]) -> Self {
        let mut addresses: Vec<IpAddr> = extra.to_vec();
        let mut keys = BTreeMap::new();
        for node in state.nodes.values() {
            addresses.extend(node.internal_ips.iter().copied());
            if let Some(gw) = &node.gateway {
                addresses.push(gw.endpoint.ip());
                keys.insert(gw.public_key, node.name.clone());
            }
        }
        addresses.sort();
        addresses.dedup();
        Self {
            id: state.id.clone(),
            addresses,
            ranges: state.cidrs().collect(),
            keys,
        }
    }
}

/// The special range `net` touches, if any.
pub(crate) fn special_range(net: &IpNet) -> Option<&'static str> {
    const V4: &[(&str, &str)] = &[
        ("0.0.0.0/8", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
    ];
    const V6: &[(&str, &str)] = &[
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    ];
    let table = match net {
        IpNet::V4(_) => V4,
        IpNet::V6(_) => V6,
    };
    table.iter().find_map(|(range, what)| {
        let range: IpNet = range.parse().expect("a valid constant");
        crate::cidr::overlaps(&range, net).then_some(*what)
    })
}

pub(crate) fn too_broad(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.prefix_len() < MIN_PREFIX_V4,
        IpNet::V6(n) => n.prefix_len() < MIN_PREFIX_V6,
    }
}

/// The checks every claimed prefix or address goes through (rules 4 of the module).
fn check_claim(net: &IpNet, allowance: &Allowance, local: &Local) -> Result<(), Reason> {
    if too_broad(net) {
        return Err(Reason::TooBroad);
    }
    if let Some(what) = special_range(net) {
        return Err(Reason::SpecialRange(what));
    }
    if let Some(a) = local.addresses.iter().find(|a| net.contains(*a)) {
        return Err(Reason::LocalAddress(*a));
    }
    if let Some(r) = local.ranges.iter().find(|r| crate::cidr::overlaps(r, net)) {
        return Err(Reason::LocalRange {
            cluster: local.id.clone(),
            range: *r,
        });
    }
    if !allowance.allows(net) {
        return Err(Reason::OutsideAllowance);
    }
    Ok(())
}

/// A gateway endpoint a remote node may announce: a routable unicast address that is not one
/// of the local cluster's, and a port.
fn check_endpoint(endpoint: &SocketAddr, local: &Local) -> Result<(), Reason> {
    let ip = endpoint.ip();
    let v6_mapped = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
        IpAddr::V4(_) => false,
    };
    if endpoint.port() == 0
        || ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip == IpAddr::V4(Ipv4Addr::BROADCAST)
        || v6_mapped
    {
        return Err(Reason::BadEndpoint);
    }
    if local.addresses.binary_search(&ip).is_ok() {
        return Err(Reason::LocalAddress(ip));
    }
    Ok(())
}

/// A DNS-1123 label: 1–63 lowercase letters, digits and '-', starting and ending
/// alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: at most 253 characters of dot-separated labels.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// Refusals kept in memory per peer before the listing is cut (all are counted).
const MAX_KEPT_REFUSALS: usize = 1_000;

/// Collects the refusals of one peer: every one counted, a bounded number kept.
struct Refusals<'a> {
    cluster: &'a ClusterId,
    all: Vec<Refusal>,
    counts: BTreeMap<(&'static str, &'static str), usize>,
}

impl Refusals<'_> {
    fn push(&mut self, object: Object, claim: impl fmt::Display, reason: Reason) {
        *self
            .counts
            .entry((object.kind(), reason.label()))
            .or_insert(0) += 1;
        if self.all.len() < MAX_KEPT_REFUSALS || object == Object::Cluster {
            self.all.push(Refusal {
                cluster: self.cluster.clone(),
                object,
                claim: claim.to_string(),
                reason,
            });
        }
    }

    /// `n` objects of a kind over a quota, as one listed refusal.
    fn over_quota(&mut self, object: Object, what: &str, n: usize, limit: usize) {
        if n == 0 {
            return;
        }
        *self.counts.entry((object.kind(), "quota")).or_insert(0) += n;
        self.all.push(Refusal {
            cluster: self.cluster.clone(),
            object,
            claim: format!("{n} {what} beyond the first {limit}"),
            reason: Reason::Quota { limit },
        });
    }
}

/// Rules 1–4 for one peer, independent of the other peers.
fn screen_peer(
    peer: &Peer<'_>,
    local: &Local,
    limits: &Limits,
    out: &mut Refusals<'_>,
) -> ClusterState {
    let src = peer.state;
    let mut state = ClusterState::new(src.id.clone(), src.name.clone());
    state.revision = src.revision;
    if src.id == local.id {
        out.push(Object::Cluster, &src.id, Reason::DuplicateClusterId);
        return state;
    }
    if peer.allowance.is_empty() {
        out.push(Object::Cluster, &src.id, Reason::NoAllowance);
        return state;
    }
    for cidr in &src.service_cidrs {
        match check_claim(cidr, peer.allowance, local) {
            Ok(()) => state.service_cidrs.push(*cidr),
            Err(reason) => out.push(Object::ServiceCidr, cidr, reason),
        }
    }
    // Nodes: names, quota (the first by name), then each claim.
    let (mut kept, mut over) = (0, 0);
    for node in src.nodes.values() {
        let object = || Object::Node(node.name.clone());
        if !is_dns1123_subdomain(&node.name) {
            out.push(
                Object::Node(node.name.chars().take(80).collect()),
                "its name",
                Reason::BadName,
            );
            continue;
        }
        if kept >= limits.nodes {
            over += 1;
            continue;
        }
        if let Err((claim, reason)) = screen_node(node, peer.allowance, local) {
            out.push(object(), claim, reason);
            continue;
        }
        kept += 1;
        state.nodes.insert(node.name.clone(), node.clone());
    }
    out.over_quota(Object::Node("*".into()), "nodes", over, limits.nodes);
    // Services: names, quota, ClusterIPs; endpoints: names, addresses, quota.
    let (mut services, mut endpoints) = (0, 0);
    let (mut services_over, mut endpoints_over) = (0, 0);
    for (key, svc) in &src.services {
        let object = || Object::Service(key.clone());
        let names_ok = is_dns1123_label(&svc.namespace)
            && is_dns1123_label(&svc.name)
            && svc
                .ports
                .iter()
                .chain(&svc.endpoint_ports)
                .all(|p| p.name.as_deref().is_none_or(is_dns1123_label));
        if !names_ok {
            let shown = ServiceKey::new(
                svc.namespace.chars().take(63).collect::<String>(),
                svc.name.chars().take(63).collect::<String>(),
            );
            out.push(
                Object::Service(shown),
                "its name or a port name",
                Reason::BadName,
            );
            continue;
        }
        if let Err(what) = check_properties(svc) {
            out.push(object(), what, Reason::BadProperties);
            continue;
        }
        if services >= limits.services {
            services_over += 1;
            continue;
        }
        if let Some((ip, reason)) = svc.cluster_ips.iter().find_map(|ip| {
            check_claim(&IpNet::from(*ip), peer.allowance, local)
                .err()
                .map(|r| (*ip, r))
        }) {
            out.push(object(), ip, reason);
            continue;
        }
        services += 1;
        let mut svc = svc.clone();
        svc.endpoints.retain(|ep| {
            let object = || Object::Endpoint(key.clone());
            let names_ok = ep.hostname.as_deref().is_none_or(is_dns1123_label)
                && ep.node.as_deref().is_none_or(is_dns1123_subdomain);
            if !names_ok {
                out.push(object(), "its hostname or node", Reason::BadName);
                return false;
            }
            for a in &ep.addresses {
                if let Err(reason) = check_claim(&IpNet::from(*a), peer.allowance, local) {
                    out.push(object(), a, reason);
                    return false;
                }
            }
            if endpoints >= limits.endpoints {
                endpoints_over += 1;
                return false;
            }
            endpoints += 1;
            true
        });
        state.services.insert(key.clone(), svc);
    }
    let all = ServiceKey::new("*", "*");
    out.over_quota(
        Object::Service(all.clone()),
        "services",
        services_over,
        limits.services,
    );
    out.over_quota(
        Object::Endpoint(all),
        "endpoints",
        endpoints_over,
        limits.endpoints,
    );
    screen_policy(src, &mut state, limits, out);
    state
}

/// Rules 2–4 for what NetworkPolicy needs of a peer (after its nodes, which a pod's addresses
/// must lie in): identities with labels Kubernetes accepts, of the peer's own cluster, within
/// the quota (the first by number); pods of the peer's own cluster, DNS-1123 names, an
/// admitted identity, and every address inside a pod CIDR of the admitted node they name.
fn screen_policy(
    src: &ClusterState,
    state: &mut ClusterState,
    limits: &Limits,
    out: &mut Refusals<'_>,
) {
    let mut over = 0;
    for identity in src.identities.values() {
        let object = || Object::Identity(identity.key.number);
        if identity.key.cluster != src.id {
            out.push(object(), &identity.key, Reason::ForeignCluster);
            continue;
        }
        let labels = &identity.labels;
        if !is_dns1123_label(&labels.namespace) {
            out.push(object(), "its namespace", Reason::BadName);
            continue;
        }
        if !are_valid_labels(&labels.pod_labels) || !are_valid_labels(&labels.namespace_labels) {
            out.push(object(), "its labels", Reason::BadLabels);
            continue;
        }
        if state.identities.len() >= limits.identities {
            over += 1;
            continue;
        }
        state
            .identities
            .insert(identity.key.clone(), identity.clone());
    }
    out.over_quota(Object::Identity(0), "identities", over, limits.identities);
    let mut over = 0;
    for pod in src.pods.values() {
        let shown = format!(
            "{}/{}",
            pod.namespace.chars().take(63).collect::<String>(),
            pod.name.chars().take(253).collect::<String>()
        );
        let object = || Object::Pod(shown.clone());
        if pod.cluster != src.id {
            out.push(object(), &pod.cluster, Reason::ForeignCluster);
            continue;
        }
        let names_ok = is_dns1123_label(&pod.namespace)
            && is_dns1123_subdomain(&pod.name)
            && is_dns1123_subdomain(&pod.node)
            && pod.named_ports.len() <= MAX_NAMED_PORTS
            && pod
                .named_ports
                .iter()
                .all(|p| is_port_name(&p.name) && p.port != 0);
        if !names_ok {
            out.push(object(), "its name, node or a port name", Reason::BadName);
            continue;
        }
        if !state.identities.contains_key(&pod.identity_key()) {
            out.push(
                object(),
                format!("identity {}", pod.identity),
                Reason::UnknownIdentity,
            );
            continue;
        }
        let cidrs = state.nodes.get(&pod.node).map(|n| n.pod_cidrs.as_slice());
        let outside = pod
            .addresses
            .iter()
            .find(|a| !cidrs.is_some_and(|cidrs| cidrs.iter().any(|c| c.contains(*a))));
        if pod.addresses.is_empty() || pod.addresses.len() > MAX_POD_ADDRESSES {
            let claim = format!("{} addresses", pod.addresses.len());
            out.push(object(), claim, Reason::OutsideNode);
            continue;
        }
        if let Some(address) = outside {
            out.push(
                object(),
                format!("{address} on node {}", pod.node),
                Reason::OutsideNode,
            );
            continue;
        }
        if state.pods.len() >= limits.pods {
            over += 1;
            continue;
        }
        state.pods.insert(pod.key(), pod.clone());
    }
    out.over_quota(Object::Pod("*".into()), "pods", over, limits.pods);
}

/// The name part of a Kubernetes label key, or a non-empty label value: at most 63
/// alphanumerics, '-', '_' and '.', starting and ending alphanumeric.
fn is_qualified_name_part(s: &str) -> bool {
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    s.len() <= 63
        && alnum(s.bytes().next())
        && alnum(s.bytes().last())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A label key as Kubernetes validates it: an optional DNS-1123 subdomain prefix and '/',
/// then a name part.
pub fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(s),
    }
}

/// A label value as Kubernetes validates it: empty, or a name part.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_name_part(s)
}

/// A label set of at most [`MAX_IDENTITY_LABELS`] labels Kubernetes accepts.
pub fn are_valid_labels(labels: &crate::policy::Labels) -> bool {
    labels.len() <= MAX_IDENTITY_LABELS
        && labels
            .iter()
            .all(|(k, v)| is_label_key(k) && is_label_value(v))
}

/// Whether `svc`'s MCS properties are what an API server would accept of a Service and its
/// ServiceExport (within this module's tighter bounds); `Err` names the first offending field.
pub fn check_properties(svc: &ExportedService) -> Result<(), &'static str> {
    let p = &svc.properties;
    let check = |ok: bool, what: &'static str| if ok { Ok(()) } else { Err(what) };
    check(
        p.labels.len() <= MAX_EXPORTED_LABELS
            && p.labels
                .iter()
                .all(|(k, v)| is_label_key(k) && is_label_value(v)),
        "its exported labels",
    )?;
    check(
        p.annotations.len() <= MAX_EXPORTED_ANNOTATIONS
            && p.annotations
                .iter()
                .all(|(k, v)| is_label_key(k) && v.len() <= MAX_ANNOTATION_VALUE)
            && p.annotations
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
                <= MAX_ANNOTATION_BYTES,
        "its exported annotations",
    )?;
    check(
        svc.ports
            .iter()
            .chain(&svc.endpoint_ports)
            .all(|port| port.app_protocol.as_deref().is_none_or(is_label_key)),
        "a port's appProtocol",
    )?;
    check(
        p.session_affinity
            .as_deref()
            .is_none_or(|a| matches!(a, "ClientIP" | "None")),
        "its session affinity",
    )?;
    check(
        p.session_affinity_timeout
            .is_none_or(|t| (1..=MAX_SESSION_AFFINITY_TIMEOUT).contains(&t)),
        "its session affinity timeout",
    )?;
    check(
        p.internal_traffic_policy
            .as_deref()
            .is_none_or(|t| matches!(t, "Cluster" | "Local")),
        "its internal traffic policy",
    )?;
    // Kubernetes adds values over time (PreferClose, PreferSameZone, PreferSameNode): admit
    // any that has their shape, a qualified name.
    check(
        p.traffic_distribution.as_deref().is_none_or(is_label_key),
        "its traffic distribution",
    )?;
    check(
        p.ip_families.len() <= 2
            && p.ip_families
                .iter()
                .all(|f| matches!(f.as_str(), "IPv4" | "IPv6"))
            && (p.ip_families.len() < 2 || p.ip_families[0] != p.ip_families[1]),
        "its IP families",
    )?;
    check(p.exported_at.is_none_or(|t| t >= 0), "its creation time")
}

/// A container port name (IANA service name): 1–15 lowercase letters, digits and '-', at
/// least one letter, no leading, trailing or double '-'.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn screen_node(
    node: &NodeState,
    allowance: &Allowance,
    local: &Local,
) -> Result<(), (String, Reason)> {
    for cidr in &node.pod_cidrs {
        check_claim(cidr, allowance, local).map_err(|r| (format!("pod CIDR {cidr}"), r))?;
    }
    if let Some(gw) = &node.gateway {
        check_endpoint(&gw.endpoint, local)
            .map_err(|r| (format!("gateway endpoint {}", gw.endpoint), r))?;
        if let Some(owner) = local.keys.get(&gw.public_key) {
            return Err((
                format!("key {}", gw.public_key),
                Reason::LocalKey {
                    node: owner.clone(),
                },
            ));
        }
    }
    Ok(())
}

/// Where a prefix claimed by a peer sits, for the cross-peer sweep.
#[derive(Debug, Clone)]
struct Claim {
    net: IpNet,
    cluster: ClusterId,
    /// `Some(node)` for a pod CIDR, `None` for a service CIDR.
    node: Option<String>,
}

fn range_of(net: &IpNet) -> (u128, u128, bool) {
    match net {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
            false,
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast()), true),
    }
}

fn addr_key(a: &IpAddr) -> (bool, u128) {
    match a {
        IpAddr::V4(v4) => (false, u128::from(u32::from(*v4))),
        IpAddr::V6(v6) => (true, u128::from(*v6)),
    }
}

/// Rule 5 over what survived screening: prefixes covering an endpoint, and overlaps between
/// peers. `O(n log n)` in the number of claimed prefixes (CIDRs nest or are disjoint, so a
/// sweep with a stack of enclosing prefixes finds every overlap).
fn cross_check(claims: &[Claim], endpoints: &[(IpAddr, ClusterId)]) -> Vec<(usize, Reason)> {
    let mut out = Vec::new();
    let mut sorted_eps: Vec<((bool, u128), &ClusterId, IpAddr)> = endpoints
        .iter()
        .map(|(a, c)| (addr_key(a), c, *a))
        .collect();
    sorted_eps.sort();
    for (i, claim) in claims.iter().enumerate() {
        let (lo, hi, v6) = range_of(&claim.net);
        let start = sorted_eps.partition_point(|(k, _, _)| *k < (v6, lo));
        if let Some((k, cluster, address)) = sorted_eps.get(start)
            && *k <= (v6, hi)
        {
            out.push((
                i,
                Reason::CoversEndpoint {
                    cluster: (*cluster).clone(),
                    address: *address,
                },
            ));
        }
    }
    // Sort by (family, start, end descending): an enclosing prefix comes before what it holds.
    let mut order: Vec<usize> = (0..claims.len()).collect();
    let key = |i: &usize| {
        let (lo, hi, v6) = range_of(&claims[*i].net);
        (v6, lo, std::cmp::Reverse(hi))
    };
    order.sort_by_key(key);
    let mut stack: Vec<usize> = Vec::new();
    for i in order {
        let (lo, _, v6) = range_of(&claims[i].net);
        while let Some(&top) = stack.last() {
            let (_, top_hi, top_v6) = range_of(&claims[top].net);
            if top_v6 != v6 || top_hi < lo {
                stack.pop();
            } else {
                break;
            }
        }
        for &outer in &stack {
            if claims[outer].cluster != claims[i].cluster {
                out.push((
                    i,
                    Reason::Overlap {
                        cluster: claims[outer].cluster.clone(),
                        claim: claims[outer].net,
                    },
                ));
                out.push((
                    outer,
                    Reason::Overlap {
                        cluster: claims[i].cluster.clone(),
                        claim: claims[i].net,
                    },
                ));
            }
        }
        stack.push(i);
    }
    out
}

fn count(counts: &mut BTreeMap<(&'static str, &'static str), usize>, r: &Refusal) {
    *counts
        .entry((r.object.kind(), r.reason.label()))
        .or_insert(0) += 1;
}

/// Decides what of each peer the mesh admits (see the module documentation): [`screen`] for
/// each peer, then [`decide`].
/// `local_addresses` are addresses of the local cluster beyond its nodes' (the controller's
/// own, other underlay addresses); `key_owners` is the previous [`Admission::key_owners`].
pub fn admit(
    local: &ClusterState,
    local_addresses: &[IpAddr],
    peers: &[Peer<'_>],
    limits: &Limits,
    key_owners: &BTreeMap<PublicKey, (ClusterId, String)>,
) -> Admission {
    let local = LocalContext::new(local, local_addresses);
    let screened: Vec<Screened> = peers.iter().map(|p| screen(p, &local, limits)).collect();
    let endpoints: Vec<(ClusterId, &[IpAddr])> = peers
        .iter()
        .map(|p| (p.state.id.clone(), p.controller_endpoints))
        .collect();
    decide(screened, &endpoints, key_owners)
}

/// Rules 5 and 6 over screened peers: `n log n` in their claimed prefixes. `controller_endpoints`
/// lists where each peer's controller is reached.
pub fn decide(
    screened: Vec<Screened>,
    controller_endpoints: &[(ClusterId, &[IpAddr])],
    key_owners: &BTreeMap<PublicKey, (ClusterId, String)>,
) -> Admission {
    let mut screened: BTreeMap<ClusterId, Screened> = screened
        .into_iter()
        .map(|s| (s.state.id.clone(), s))
        .collect();
    // Rule 5.
    let mut claims = Vec::new();
    let mut endpoints = Vec::new();
    for (id, addresses) in controller_endpoints {
        for a in *addresses {
            endpoints.push((*a, id.clone()));
        }
    }
    for (id, Screened { state, .. }) in &screened {
        for node in state.nodes.values() {
            if let Some(gw) = &node.gateway {
                endpoints.push((gw.endpoint.ip(), id.clone()));
            }
            for net in &node.pod_cidrs {
                claims.push(Claim {
                    net: *net,
                    cluster: id.clone(),
                    node: Some(node.name.clone()),
                });
            }
        }
        for net in &state.service_cidrs {
            claims.push(Claim {
                net: *net,
                cluster: id.clone(),
                node: None,
            });
        }
    }
    let mut refused_nodes: BTreeSet<(ClusterId, String)> = BTreeSet::new();
    let mut refused_cidrs: BTreeSet<(ClusterId, IpNet)> = BTreeSet::new();
    let mut cross: Vec<Refusal> = Vec::new();
    for (i, reason) in cross_check(&claims, &endpoints) {
        let claim = &claims[i];
        let object = match &claim.node {
            Some(node) => {
                refused_nodes.insert((claim.cluster.clone(), node.clone()));
                Object::Node(node.clone())
            }
            None => {
                refused_cidrs.insert((claim.cluster.clone(), claim.net));
                Object::ServiceCidr
            }
        };
        let text = match &claim.node {
            Some(_) => format!("pod CIDR {}", claim.net),
            None => claim.net.to_string(),
        };
        cross.push(Refusal {
            cluster: claim.cluster.clone(),
            object,
            claim: text,
            reason,
        });
    }
    for r in cross {
        if let Some(s) = screened.get_mut(&r.cluster) {
            count(&mut s.counts, &r);
            s.refusals.push(r);
        }
    }
    for (id, s) in screened.iter_mut() {
        let touched = s
            .state
            .nodes
            .keys()
            .any(|name| refused_nodes.contains(&(id.clone(), name.clone())))
            || s.state
                .service_cidrs
                .iter()
                .any(|net| refused_cidrs.contains(&(id.clone(), *net)));
        if touched {
            let state = Arc::make_mut(&mut s.state);
            state
                .nodes
                .retain(|name, _| !refused_nodes.contains(&(id.clone(), name.clone())));
            state
                .service_cidrs
                .retain(|net| !refused_cidrs.contains(&(id.clone(), *net)));
        }
    }

    // Rule 6: remote key collisions.
    let mut claimants: BTreeMap<PublicKey, Vec<(ClusterId, String)>> = BTreeMap::new();
    for (id, Screened { state, .. }) in &screened {
        for node in state.nodes.values() {
            if let Some(gw) = &node.gateway {
                claimants
                    .entry(gw.public_key)
                    .or_default()
                    .push((id.clone(), node.name.clone()));
            }
        }
    }
    let mut owners = BTreeMap::new();
    let mut losers: Vec<(ClusterId, String, PublicKey, ClusterId, String)> = Vec::new();
    for (key, list) in claimants {
        let winner = key_owners
            .get(&key)
            .filter(|owner| list.contains(owner))
            .cloned()
            .unwrap_or_else(|| list[0].clone());
        for c in list {
            if c != winner {
                losers.push((c.0, c.1, key, winner.0.clone(), winner.1.clone()));
            }
        }
        owners.insert(key, winner);
    }
    for (cluster, node, key, owner_cluster, owner_node) in losers {
        if let Some(s) = screened.get_mut(&cluster) {
            Arc::make_mut(&mut s.state).nodes.remove(&node);
            let (refusals, counts) = (&mut s.refusals, &mut s.counts);
            let r = Refusal {
                cluster: cluster.clone(),
                object: Object::Node(node),
                claim: format!("key {key}"),
                reason: Reason::KeyTaken {
                    cluster: owner_cluster,
                    node: owner_node,
                },
            };
            count(counts, &r);
            refusals.push(r);
        }
    }

    // Pods of nodes rules 5 and 6 took out go with them: their addresses are no longer routed
    // to the peer.
    for (id, s) in screened.iter_mut() {
        let orphans: Vec<_> = s
            .state
            .pods
            .values()
            .filter(|p| !s.state.nodes.contains_key(&p.node))
            .map(|p| {
                (
                    p.key(),
                    format!("{}/{}", p.namespace, p.name),
                    p.node.clone(),
                )
            })
            .collect();
        if orphans.is_empty() {
            continue;
        }
        let state = Arc::make_mut(&mut s.state);
        for (key, shown, node) in orphans {
            state.pods.remove(&key);
            let r = Refusal {
                cluster: id.clone(),
                object: Object::Pod(shown),
                claim: format!("on refused node {node}"),
                reason: Reason::OutsideNode,
            };
            count(&mut s.counts, &r);
            s.refusals.push(r);
        }
    }

    let verdicts = screened
        .into_iter()
        .map(|(id, s)| {
            let Screened {
                state,
                mut refusals,
                counts,
                whole,
            } = s;
            refusals.sort();
            refusals.truncate(MAX_LISTED_REFUSALS);
            (
                id,
                Verdict {
                    state,
                    refusals,
                    counts,
                    whole,
                },
            )
        })
        .collect();
    Admission {
        verdicts,
        key_owners: owners,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::fixture::{cluster, export, id};
    use crate::cluster::{Endpoint, NodeGateway};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn allow(list: &[&str]) -> Allowance {
        Allowance {
            certificate: Some(nets(list)),
            configured: None,
        }
    }

    fn node(name: &str, cidr: &str, endpoint: &str, key: u8) -> NodeState {
        NodeState {
            name: name.into(),
            pod_cidrs: vec![net(cidr)],
            internal_ips: vec![],
            gateway: Some(NodeGateway {
                endpoint: endpoint.parse().unwrap(),
                public_key: PublicKey([key; 32]),
            }),
        }
    }

    /// Local a: node-0 10.1.0.0/24 at 192.168.1.10 with key 1; services 10.96.0.0/16.
    fn local() -> ClusterState {
        let mut a = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        let mut n = node("node-0", "10.1.0.0/24", "192.168.1.10:51820", 1);
        n.internal_ips = vec!["192.168.1.10".parse().unwrap()];
        a.nodes.insert("node-0".into(), n);
        a
    }

    /// b: node-0 10.2.0.0/24 at 192.168.2.10, key 2, service shop/web.
    fn peer_b() -> ClusterState {
        let mut b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
        b.nodes.insert(
            "node-0".into(),
            node("node-0", "10.2.0.0/24", "192.168.2.10:51820", 2),
        );
        export(&mut b.services, "shop", "web", "10.97.0.10", &["10.2.0.5"]);
        b
    }

    fn b_allowed() -> Allowance {
        allow(&["10.2.0.0/16", "10.97.0.0/16", "fd02::/48"])
    }

    fn run(peers: &[(ClusterState, Allowance)]) -> Admission {
        run_with(&local(), peers, &Limits::default(), &BTreeMap::new())
    }

    fn run_with(
        local: &ClusterState,
        peers: &[(ClusterState, Allowance)],
        limits: &Limits,
        owners: &BTreeMap<PublicKey, (ClusterId, String)>,
    ) -> Admission {
        let eps: Vec<IpAddr> = vec![];
        let list: Vec<Peer<'_>> = peers
            .iter()
            .map(|(s, a)| Peer {
                state: s,
                allowance: a,
                controller_endpoints: &eps,
            })
            .collect();
        admit(
            local,
            &["192.168.1.1".parse().unwrap()],
            &list,
            limits,
            owners,
        )
    }

    fn policy_identity(
        cluster: &str,
        number: u32,
        pod_labels: &[(&str, &str)],
    ) -> crate::policy::Identity {
        crate::policy::Identity {
            key: crate::policy::IdentityKey {
                cluster: id(cluster),
                number,
            },
            labels: crate::policy::IdentityLabels {
                namespace: "x".into(),
                pod_labels: pod_labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                namespace_labels: Default::default(),
            },
        }
    }

    fn policy_pod(
        name: &str,
        address: &str,
        node: &str,
        identity: u32,
    ) -> crate::policy::PolicyEndpoint {
        crate::policy::PolicyEndpoint {
            cluster: id("b"),
            namespace: "x".into(),
            name: name.into(),
            addresses: vec![address.parse().unwrap()],
            node: node.into(),
            identity,
            named_ports: vec![],
        }
    }

    /// b with identity 1 (`pod=a`) and one honest pod on node-0.
    fn peer_b_with_pods(pods: &[crate::policy::PolicyEndpoint]) -> ClusterState {
        let mut b = peer_b();
        let identity = policy_identity("b", 1, &[("pod", "a")]);
        b.identities.insert(identity.key(), identity);
        let honest = policy_pod("honest", "10.2.0.7", "node-0", 1);
        b.pods.insert(honest.key(), honest);
        for p in pods {
            b.pods.insert(p.key(), p.clone());
        }
        b
    }

    /// What of `pod` (by name) is refused, as `kind/reason` labels.
    fn pod_refusals(v: &Verdict, name: &str) -> Vec<String> {
        v.refusals
            .iter()
            .filter(|r| r.object == Object::Pod(format!("x/{name}")))
            .map(|r| format!("{}/{}", r.object.kind(), r.reason.label()))
            .collect()
    }

    #[test]
    fn attack_a_peer_cannot_claim_a_pod_at_a_local_or_another_clusters_address() {
        // b claims pods at a local pod's address, a local node's address, c's pod address, and
        // one of its own addresses but on a node whose CIDR does not hold it: each would make
        // a policy selecting b's pods (`trellis.dev/cluster: b`) admit that traffic.
        let c = cluster("c", "10.3.0.0/24", "10.98.0.0/16");
        let mut b = peer_b_with_pods(&[
            policy_pod("local-pod", "10.1.0.5", "node-0", 1),
            policy_pod("local-node", "192.168.1.10", "node-0", 1),
            policy_pod("c-pod", "10.3.0.5", "node-0", 1),
            policy_pod("wrong-node", "10.2.1.5", "node-0", 1),
            policy_pod("no-node", "10.2.0.8", "node-9", 1),
        ]);
        b.nodes.insert(
            "node-1".into(),
            node("node-1", "10.2.1.0/24", "192.168.2.11:51820", 3),
        );
        let a = run(&[
            (b, allow(&["10.0.0.0/8", "192.168.0.0/16"])),
            (c, allow(&["10.3.0.0/16", "10.98.0.0/16"])),
        ]);
        let v = &a.verdicts[&id("b")];
        let names: Vec<&str> = v.state.pods.values().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["honest"], "{:?}", v.refusals);
        for name in ["local-pod", "local-node", "c-pod", "wrong-node", "no-node"] {
            assert_eq!(pod_refusals(v, name), ["pod/outside_node"], "{name}");
        }
        assert_eq!(v.counts[&("pod", "outside_node")], 5);
    }

    #[test]
    fn pods_of_a_node_refused_across_peers_go_with_it() {
        // b's node-0 claims c's range (both allowed): both nodes are refused, and b's pods on
        // it with them.
        let mut c = cluster("c", "10.2.0.0/24", "10.98.0.0/16");
        c.nodes.get_mut("node-0").unwrap().gateway = None;
        let a = run(&[
            (peer_b_with_pods(&[]), b_allowed()),
            (c, allow(&["10.2.0.0/16", "10.98.0.0/16"])),
        ]);
        let v = &a.verdicts[&id("b")];
        assert!(v.state.nodes.is_empty() && v.state.pods.is_empty());
        assert_eq!(pod_refusals(v, "honest"), ["pod/outside_node"]);
    }

    #[test]
    fn identities_and_pods_are_refused_one_by_one() {
        let mut b = peer_b_with_pods(&[
            policy_pod("ghost-identity", "10.2.0.9", "node-0", 9),
            policy_pod("Bad_Name", "10.2.0.10", "node-0", 1),
            {
                let mut p = policy_pod("two-many", "10.2.0.11", "node-0", 1);
                p.addresses = vec!["10.2.0.11".parse().unwrap(); 3];
                p
            },
            {
                let mut p = policy_pod("bad-port", "10.2.0.12", "node-0", 1);
                p.named_ports = vec![crate::policy::NamedPort {
                    name: "this-name-is-too-long".into(),
                    protocol: Default::default(),
                    port: 80,
                }];
                p
            },
            {
                let mut p = policy_pod("foreign", "10.2.0.13", "node-0", 1);
                p.cluster = id("c");
                p
            },
        ]);
        let long_value = "v".repeat(64);
        for (number, labels) in [
            (2, vec![("bad key!", "v")]),
            (3, vec![("k", long_value.as_str())]),
            (4, vec![("example.com/k", "-v")]),
        ] {
            let identity = policy_identity("b", number, &labels);
            b.identities.insert(identity.key(), identity);
        }
        let too_many: Vec<(String, String)> = (0..65)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let mut crowded = policy_identity("b", 5, &[]);
        crowded.labels.pod_labels = too_many.into_iter().collect();
        b.identities.insert(crowded.key(), crowded);
        let foreign = policy_identity("c", 6, &[]);
        b.identities.insert(foreign.key(), foreign);
        let mut bad_ns = policy_identity("b", 7, &[]);
        bad_ns.labels.namespace = "X".into();
        b.identities.insert(bad_ns.key(), bad_ns);
        let fine = policy_identity("b", 8, &[("example.com/tier", "web.1_a"), ("empty", "")]);
        b.identities.insert(fine.key(), fine);

        let v = &run(&[(b, b_allowed())]).verdicts[&id("b")];
        let numbers: Vec<u32> = v.state.identities.keys().map(|k| k.number).collect();
        assert_eq!(numbers, [1, 8]);
        let identity_reasons: Vec<String> = v
            .refusals
            .iter()
            .filter(|r| r.object.kind() == "identity")
            .map(|r| format!("{}:{}", r.object, r.reason.label()))
            .collect();
        assert_eq!(
            identity_reasons,
            [
                "identity 2:bad_labels",
                "identity 3:bad_labels",
                "identity 4:bad_labels",
                "identity 5:bad_labels",
                "identity 6:foreign_cluster",
                "identity 7:bad_name",
            ]
        );
        assert_eq!(pod_refusals(v, "ghost-identity"), ["pod/unknown_identity"]);
        assert_eq!(pod_refusals(v, "Bad_Name"), ["pod/bad_name"]);
        assert_eq!(pod_refusals(v, "two-many"), ["pod/outside_node"]);
        assert_eq!(pod_refusals(v, "bad-port"), ["pod/bad_name"]);
        assert_eq!(pod_refusals(v, "foreign"), ["pod/foreign_cluster"]);
        let names: Vec<&str> = v.state.pods.values().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["honest"]);
    }

    #[test]
    fn policy_quotas_keep_the_first_identities_and_pods() {
        let mut b = peer_b_with_pods(&[]);
        for i in 2..=5 {
            let identity = policy_identity("b", i, &[("n", &i.to_string())]);
            b.identities.insert(identity.key(), identity);
            let pod = policy_pod(&format!("p{i}"), &format!("10.2.0.{}", 20 + i), "node-0", i);
            b.pods.insert(pod.key(), pod);
        }
        let limits = Limits {
            identities: 3,
            pods: 2,
            ..Limits::default()
        };
        let v =
            &run_with(&local(), &[(b, b_allowed())], &limits, &BTreeMap::new()).verdicts[&id("b")];
        let numbers: Vec<u32> = v.state.identities.keys().map(|k| k.number).collect();
        assert_eq!(numbers, [1, 2, 3]);
        // Pods of refused identities are refused for that; of the rest, the first two by name.
        let names: Vec<&str> = v.state.pods.values().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["honest", "p2"]);
        assert_eq!(v.counts[&("identity", "quota")], 2);
        assert_eq!(v.counts[&("pod", "quota")], 1);
        assert_eq!(v.counts[&("pod", "unknown_identity")], 2);
    }

    #[test]
    fn label_syntax_follows_kubernetes() {
        for ok in ["a", "a.b-c_d", "example.com/a", "k8s.io/x", &"a".repeat(63)] {
            assert!(is_label_key(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a/b/c",
            "/a",
            "Ex ample",
            &"a".repeat(64),
            "UP.com/a",
        ] {
            assert!(!is_label_key(bad), "{bad}");
        }
        assert!(is_label_value("") && is_label_value("A_b.9"));
        assert!(!is_label_value("a/b") && !is_label_value("_a"));
        for ok in ["http", "dns-tcp", "a1"] {
            assert!(is_port_name(ok), "{ok}");
        }
        for bad in ["", "80", "a--b", "-a", "Http", "abcdefghijklmnop"] {
            assert!(!is_port_name(bad), "{bad}");
        }
    }

    fn reasons_for(v: &Verdict, node: &str) -> Vec<String> {
        v.refusals
            .iter()
            .filter(|r| r.object == Object::Node(node.into()))
            .map(|r| r.reason.label().to_string())
            .collect()
    }

    #[test]
    fn an_honest_peer_inside_its_allowance_is_admitted_whole() {
        let a = run(&[(peer_b(), b_allowed())]);
        let v = &a.verdicts[&id("b")];
        assert_eq!(*v.state, peer_b());
        assert!(v.refusals.is_empty() && v.counts.is_empty() && !v.whole);
    }

    #[test]
    fn each_attack_prefix_refuses_only_its_node() {
        // The attacks of issue 13, one node each, next to the honest node-0.
        let cases = [
            ("half", "128.0.0.0/1", "too_broad"),
            ("default-v4", "0.0.0.0/0", "too_broad"),
            ("default-v6", "::/0", "too_broad"),
            ("short-v6", "fd00::/16", "too_broad"),
            ("metadata", "169.254.169.254/32", "special_range"),
            ("loopback", "127.0.0.0/8", "special_range"),
            ("loopback-v6", "::1/128", "special_range"),
            ("linklocal-v6", "fe80::/64", "special_range"),
            ("multicast", "224.0.0.0/8", "special_range"),
            ("multicast-v6", "ff02::/64", "special_range"),
            ("this-net", "0.0.0.0/8", "special_range"),
            ("mapped", "::ffff:0:0/96", "special_range"),
            ("broadcast", "255.255.255.255/32", "special_range"),
            ("underlay", "192.168.1.0/24", "local_address"),
            ("controller", "192.168.1.1/32", "local_address"),
            ("local-pods", "10.1.0.0/25", "local_range"),
            ("over-local", "10.0.0.0/8", "local_range"),
            ("local-svc", "10.96.5.0/24", "local_range"),
            ("elsewhere", "10.50.0.0/24", "outside_allowance"),
        ];
        let mut b = peer_b();
        for (name, cidr, _) in cases {
            b.nodes
                .insert(name.into(), node(name, cidr, "192.168.2.11:51820", 9));
        }
        // Under its real allowance, and under one of everything (a careless CA): the
        // always-refused rules do not depend on the allowance.
        let wide = allow(&["0.0.0.0/0", "::/0"]);
        for (allowance, kept) in [
            (b_allowed(), vec!["node-0"]),
            (wide, vec!["elsewhere", "node-0"]),
        ] {
            let a = run(&[(b.clone(), allowance.clone())]);
            let v = &a.verdicts[&id("b")];
            assert_eq!(
                v.state.nodes.keys().collect::<Vec<_>>(),
                kept,
                "{allowance:?}"
            );
            assert!(
                v.state
                    .services
                    .contains_key(&ServiceKey::new("shop", "web"))
            );
            for (name, cidr, want) in cases {
                if kept.contains(&name) {
                    continue;
                }
                assert_eq!(
                    reasons_for(v, name),
                    vec![want.to_string()],
                    "{name} {cidr}"
                );
            }
            assert!(!v.whole);
        }
        let text = run(&[(b, b_allowed())]).verdicts[&id("b")]
            .refusals
            .iter()
            .find(|r| r.object == Object::Node("half".into()))
            .unwrap()
            .to_string();
        assert!(
            text.starts_with("cluster b: node half refused: pod CIDR 128.0.0.0/1 broader than /8"),
            "{text}"
        );
    }

    #[test]
    fn the_prefix_bound_is_documented_and_exact() {
        let l = Local::new(&local(), &[]);
        let all = allow(&["0.0.0.0/0", "::/0"]);
        assert_eq!(check_claim(&net("11.0.0.0/8"), &all, &l), Ok(()));
        assert_eq!(
            check_claim(&net("10.0.0.0/7"), &all, &l),
            Err(Reason::TooBroad)
        );
        assert_eq!(check_claim(&net("2001:db8::/32"), &all, &l), Ok(()));
        assert_eq!(
            check_claim(&net("2001:db8::/31"), &all, &l),
            Err(Reason::TooBroad)
        );
    }

    #[test]
    fn both_allowances_must_hold_and_none_means_nothing() {
        let l = Local::new(&local(), &[]);
        let both = Allowance {
            certificate: Some(nets(&["10.2.0.0/16"])),
            configured: Some(nets(&["10.2.0.0/20"])),
        };
        assert_eq!(check_claim(&net("10.2.1.0/24"), &both, &l), Ok(()));
        assert_eq!(
            check_claim(&net("10.2.200.0/24"), &both, &l),
            Err(Reason::OutsideAllowance),
            "inside the certificate, outside the configuration"
        );
        let configured_only = Allowance {
            certificate: None,
            configured: Some(nets(&["10.2.0.0/16"])),
        };
        assert_eq!(
            check_claim(&net("10.2.1.0/24"), &configured_only, &l),
            Ok(())
        );
        let a = run(&[(peer_b(), Allowance::default())]);
        let v = &a.verdicts[&id("b")];
        assert!(v.whole);
        assert!(v.state.nodes.is_empty() && v.state.services.is_empty());
        assert_eq!(v.refusals.len(), 1);
        let text = v.refusals[0].to_string();
        assert!(
            text.contains("no allowance") && text.contains("--pod-cidr"),
            "{text}"
        );
    }

    #[test]
    fn a_peer_with_the_local_id_is_refused_whole() {
        let mut imposter = peer_b();
        imposter.id = id("a");
        let a = run(&[(imposter, b_allowed())]);
        let v = &a.verdicts[&id("a")];
        assert!(v.whole && v.state.nodes.is_empty());
        assert_eq!(v.refusals[0].reason, Reason::DuplicateClusterId);
    }

    #[test]
    fn bad_gateway_endpoints_refuse_the_node() {
        for (endpoint, want) in [
            ("127.0.0.1:51820", "bad_endpoint"),
            ("0.0.0.0:51820", "bad_endpoint"),
            ("[::]:51820", "bad_endpoint"),
            ("224.0.0.1:51820", "bad_endpoint"),
            ("192.168.2.10:0", "bad_endpoint"),
            ("192.168.1.10:51820", "local_address"),
            ("192.168.1.1:51820", "local_address"),
        ] {
            let mut b = peer_b();
            b.nodes
                .get_mut("node-0")
                .unwrap()
                .gateway
                .as_mut()
                .unwrap()
                .endpoint = endpoint.parse().unwrap();
            b.nodes.insert(
                "node-1".into(),
                node("node-1", "10.2.1.0/24", "192.168.2.11:51820", 3),
            );
            let v = &run(&[(b, b_allowed())]).verdicts[&id("b")];
            assert_eq!(reasons_for(v, "node-0"), vec![want], "{endpoint}");
            assert!(v.state.nodes.contains_key("node-1"), "the rest stays");
        }
    }

    #[test]
    fn services_and_endpoints_are_refused_one_by_one() {
        let mut b = peer_b();
        export(&mut b.services, "shop", "metadata", "169.254.169.254", &[]);
        export(&mut b.services, "shop", "outside", "10.98.0.1", &[]);
        export(&mut b.services, "shop", "local", "10.96.0.10", &[]);
        export(
            &mut b.services,
            "shop",
            "mixed",
            "10.97.0.11",
            &[
                "10.2.0.6",
                "127.0.0.1",
                "10.1.0.5",
                "192.168.1.10",
                "10.2.0.7",
            ],
        );
        let v = &run(&[(b, b_allowed())]).verdicts[&id("b")];
        let keys: Vec<String> = v.state.services.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, vec!["shop/mixed", "shop/web"]);
        let mixed = &v.state.services[&ServiceKey::new("shop", "mixed")];
        let kept: Vec<String> = mixed
            .endpoints
            .iter()
            .map(|e| e.addresses[0].to_string())
            .collect();
        assert_eq!(kept, vec!["10.2.0.6", "10.2.0.7"]);
        assert_eq!(v.counts[&("service", "special_range")], 1);
        assert_eq!(v.counts[&("service", "outside_allowance")], 1);
        assert_eq!(v.counts[&("service", "local_range")], 1);
        assert_eq!(v.counts[&("endpoint", "special_range")], 1);
        assert_eq!(v.counts[&("endpoint", "local_range")], 1);
        assert_eq!(v.counts[&("endpoint", "local_address")], 1);
    }

    /// A named change to an exported service.
    type ExportCase = (&'static str, Box<dyn Fn(&mut ExportedService)>);

    /// b exporting shop/web plus shop/<name> for each `(name, change)`; what is admitted and
    /// refused.
    fn screen_exports(cases: Vec<ExportCase>) -> (Vec<String>, Vec<String>) {
        let mut b = peer_b();
        for (name, change) in &cases {
            export(&mut b.services, "shop", name, "10.97.0.30", &["10.2.0.9"]);
            change(b.services.get_mut(&ServiceKey::new("shop", *name)).unwrap());
        }
        let v = &run(&[(b, b_allowed())]).verdicts[&id("b")];
        let admitted = v.state.services.keys().map(|k| k.name.clone()).collect();
        let refused = v
            .refusals
            .iter()
            .map(|r| {
                assert_eq!(r.reason, Reason::BadProperties, "{r}");
                assert!(r.to_string().contains("Kubernetes would not accept"), "{r}");
                match &r.object {
                    Object::Service(k) => k.name.clone(),
                    other => panic!("{other:?} refused"),
                }
            })
            .collect();
        (admitted, refused)
    }

    #[test]
    fn attack_a_peer_cannot_export_what_the_api_server_would_refuse() {
        let labels = |pairs: Vec<(String, String)>| {
            move |s: &mut ExportedService| s.properties.labels = pairs.iter().cloned().collect()
        };
        let annotations = |pairs: Vec<(String, String)>| {
            move |s: &mut ExportedService| {
                s.properties.annotations = pairs.iter().cloned().collect()
            }
        };
        let one = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let many = |n: usize| (0..n).map(|i| (format!("k{i}"), "v".to_string())).collect();
        let cases: Vec<ExportCase> = vec![
            // What Kubernetes itself accepts is admitted.
            (
                "fine",
                Box::new(|s: &mut ExportedService| {
                    s.properties.labels = [("app.kubernetes.io/name".into(), "web".into())].into();
                    s.properties.annotations =
                        [("example.com/owner".into(), "team a, room 3 ✓".into())].into();
                    s.properties.session_affinity = Some("ClientIP".into());
                    s.properties.session_affinity_timeout = Some(86_400);
                    s.properties.internal_traffic_policy = Some("Local".into());
                    s.properties.traffic_distribution = Some("PreferClose".into());
                    s.properties.ip_families = vec!["IPv6".into(), "IPv4".into()];
                    s.properties.exported_at = Some(1_700_000_000);
                    s.ports[0].app_protocol = Some("kubernetes.io/h2c".into());
                }),
            ),
            (
                "huge-annotation",
                Box::new(annotations(one("a", &"x".repeat(1 << 20)))),
            ),
            ("many-annotations", Box::new(annotations(many(65)))),
            (
                // Each value within bounds, together more than a ServiceImport may hold.
                "annotations-too-big-together",
                Box::new(annotations(
                    (0..64)
                        .map(|i| (format!("example.com/k{i}"), "x".repeat(4000)))
                        .collect(),
                )),
            ),
            (
                "bad-annotation-key",
                Box::new(annotations(one("no spaces", "v"))),
            ),
            (
                "bad-label-key",
                Box::new(labels(one("-starts-with-dash", "v"))),
            ),
            (
                "long-label-name",
                Box::new(labels(one(&"n".repeat(64), "v"))),
            ),
            (
                "long-label-prefix",
                Box::new(labels(one(&format!("{}/n", "p".repeat(254)), "v"))),
            ),
            ("bad-label-value", Box::new(labels(one("k", "has space")))),
            (
                "long-label-value",
                Box::new(labels(one("k", &"v".repeat(64)))),
            ),
            ("many-labels", Box::new(labels(many(65)))),
            (
                "affinity",
                Box::new(|s: &mut ExportedService| {
                    s.properties.session_affinity = Some("Sticky".into())
                }),
            ),
            (
                "timeout-zero",
                Box::new(|s: &mut ExportedService| s.properties.session_affinity_timeout = Some(0)),
            ),
            (
                "timeout-long",
                Box::new(|s: &mut ExportedService| {
                    s.properties.session_affinity_timeout = Some(86_401)
                }),
            ),
            (
                "policy",
                Box::new(|s: &mut ExportedService| {
                    s.properties.internal_traffic_policy = Some("Everywhere".into())
                }),
            ),
            (
                "distribution",
                Box::new(|s: &mut ExportedService| {
                    s.properties.traffic_distribution = Some("x".repeat(400))
                }),
            ),
            (
                "family",
                Box::new(|s: &mut ExportedService| s.properties.ip_families = vec!["IPv5".into()]),
            ),
            (
                "families",
                Box::new(|s: &mut ExportedService| {
                    s.properties.ip_families = vec!["IPv4".into(), "IPv4".into()]
                }),
            ),
            (
                "app-protocol",
                Box::new(|s: &mut ExportedService| {
                    s.ports[0].app_protocol = Some("h t t p".into())
                }),
            ),
            (
                "created",
                Box::new(|s: &mut ExportedService| s.properties.exported_at = Some(-1)),
            ),
        ];
        let names: Vec<String> = cases.iter().map(|(n, _)| n.to_string()).collect();
        let (admitted, mut refused) = screen_exports(cases);
        assert_eq!(admitted, ["fine", "web"]);
        refused.sort();
        let mut expected: Vec<String> = names.into_iter().filter(|n| n != "fine").collect();
        expected.sort();
        assert_eq!(refused, expected);
    }

    #[test]
    fn service_cidrs_are_refused_one_by_one() {
        let mut b = peer_b();
        b.service_cidrs = nets(&["10.97.0.0/16", "0.0.0.0/0", "10.96.0.0/12"]);
        let v = &run(&[(b, b_allowed())]).verdicts[&id("b")];
        assert_eq!(v.state.service_cidrs, nets(&["10.97.0.0/16"]));
        assert_eq!(v.counts[&("service_cidr", "too_broad")], 1);
        assert_eq!(v.counts[&("service_cidr", "local_range")], 1);
    }

    #[test]
    fn names_must_be_dns_1123() {
        assert!(is_dns1123_label("web-0"));
        assert!(is_dns1123_subdomain("ip-10-0-0-1.ec2.internal"));
        for bad in [
            "",
            "Web",
            "-a",
            "a-",
            "a_b",
            "a.b",
            &"x".repeat(64),
            "a\u{e9}",
        ] {
            assert!(!is_dns1123_label(bad), "{bad:?}");
        }
        for bad in ["", "a..b", ".a", "a.", &"a.".repeat(127)] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
        let mut b = peer_b();
        b.nodes.insert(
            "Evil Node".into(),
            node("Evil Node", "10.2.9.0/24", "192.168.2.11:51820", 9),
        );
        export(&mut b.services, "Shop", "x", "10.97.0.20", &[]);
        export(&mut b.services, "shop", "a.b", "10.97.0.21", &[]);
        let mut svc = b.services[&ServiceKey::new("shop", "web")].clone();
        svc.endpoints.push(Endpoint {
            addresses: vec!["10.2.0.9".parse().unwrap()],
            hostname: Some("bad host".into()),
            node: None,
            ready: true,
        });
        b.services.insert(svc.key(), svc);
        let v = &run(&[(b, b_allowed())]).verdicts[&id("b")];
        assert_eq!(v.state.nodes.len(), 1);
        assert_eq!(v.state.services.len(), 1);
        assert_eq!(
            v.state.services[&ServiceKey::new("shop", "web")]
                .endpoints
                .len(),
            1
        );
        assert_eq!(v.counts[&("node", "bad_name")], 1);
        assert_eq!(v.counts[&("service", "bad_name")], 2);
        assert_eq!(v.counts[&("endpoint", "bad_name")], 1);
    }

    #[test]
    fn a_peer_claiming_another_clusters_range_loses_whatever_the_ids() {
        // The thief's ID sorts before and after the owner's: the owner keeps its range.
        for thief in ["b", "z"] {
            let owner = {
                let mut c = cluster("c", "10.3.0.0/24", "10.98.0.0/16");
                c.nodes.insert(
                    "node-0".into(),
                    node("node-0", "10.3.0.0/24", "192.168.3.10:51820", 3),
                );
                c
            };
            let mut t = peer_b();
            t.id = id(thief);
            t.nodes.insert(
                "steal".into(),
                node("steal", "10.3.0.0/24", "192.168.2.11:51820", 9),
            );
            let peers = [
                (t, b_allowed()),
                (owner, allow(&["10.3.0.0/16", "10.98.0.0/16"])),
            ];
            let a = run(&peers);
            assert!(a.verdicts[&id("c")].refusals.is_empty(), "{thief}");
            assert_eq!(a.verdicts[&id("c")].state.nodes.len(), 1);
            let v = &a.verdicts[&id(thief)];
            assert_eq!(reasons_for(v, "steal"), vec!["outside_allowance"]);
            assert!(v.state.nodes.contains_key("node-0"));
        }
    }

    #[test]
    fn overlapping_allowed_claims_are_refused_on_both_sides_in_any_order() {
        // A CA mistake: b and c are both allowed 10.5.0.0/16.
        let mut b = peer_b();
        b.nodes.insert(
            "x".into(),
            node("x", "10.5.1.0/24", "192.168.2.11:51820", 5),
        );
        let mut c = cluster("c", "10.5.0.0/16", "10.98.0.0/16");
        c.nodes.insert(
            "node-0".into(),
            node("node-0", "10.5.0.0/16", "192.168.3.10:51820", 6),
        );
        c.nodes.insert(
            "node-1".into(),
            node("node-1", "10.6.0.0/24", "192.168.3.11:51820", 7),
        );
        let ab = allow(&["10.2.0.0/16", "10.5.0.0/16", "10.97.0.0/16"]);
        let ac = allow(&["10.5.0.0/16", "10.6.0.0/16", "10.98.0.0/16"]);
        let one = run(&[(b.clone(), ab.clone()), (c.clone(), ac.clone())]);
        let two = run(&[(c, ac), (b, ab)]);
        assert_eq!(one, two);
        assert_eq!(reasons_for(&one.verdicts[&id("b")], "x"), vec!["overlap"]);
        assert_eq!(
            reasons_for(&one.verdicts[&id("c")], "node-0"),
            vec!["overlap"]
        );
        assert!(one.verdicts[&id("b")].state.nodes.contains_key("node-0"));
        assert!(one.verdicts[&id("c")].state.nodes.contains_key("node-1"));
    }

    #[test]
    fn prefixes_covering_a_peer_endpoint_are_refused() {
        let mut b = peer_b();
        // Allowed to claim 192.168.3.0/24 by mistake: c's gateway and controller live there.
        b.nodes.insert(
            "cover".into(),
            node("cover", "192.168.3.0/24", "192.168.2.11:51820", 9),
        );
        // And its own gateway endpoint inside its own pod CIDR: a routing loop.
        b.nodes.insert(
            "loop".into(),
            node("loop", "10.2.7.0/24", "10.2.7.1:51820", 8),
        );
        let mut c = cluster("c", "10.3.0.0/24", "10.98.0.0/16");
        c.nodes.insert(
            "node-0".into(),
            node("node-0", "10.3.0.0/24", "192.168.3.10:51820", 3),
        );
        let ab = allow(&["10.2.0.0/16", "10.97.0.0/16", "192.168.3.0/24"]);
        let ac = allow(&["10.3.0.0/16", "10.98.0.0/16"]);
        let v = &run(&[(b, ab), (c, ac)]).verdicts[&id("b")];
        assert_eq!(reasons_for(v, "cover"), vec!["covers_endpoint"]);
        assert_eq!(reasons_for(v, "loop"), vec!["covers_endpoint"]);
        assert!(v.state.nodes.contains_key("node-0"));
        // The controller endpoint alone counts too.
        let mut b = peer_b();
        b.nodes.insert(
            "cover".into(),
            node("cover", "198.51.100.0/24", "192.168.2.11:51820", 9),
        );
        let ab = allow(&["10.2.0.0/16", "10.97.0.0/16", "198.51.100.0/24"]);
        let eps: Vec<IpAddr> = vec!["198.51.100.7".parse().unwrap()];
        let peers = [Peer {
            state: &b,
            allowance: &ab,
            controller_endpoints: &eps,
        }];
        let a = admit(&local(), &[], &peers, &Limits::default(), &BTreeMap::new());
        assert_eq!(
            reasons_for(&a.verdicts[&id("b")], "cover"),
            vec!["covers_endpoint"]
        );
    }

    #[test]
    fn keys_local_wins_and_the_first_remote_claimant_keeps_its_key() {
        let mut b = peer_b();
        b.nodes.insert(
            "local-key".into(),
            node("local-key", "10.2.1.0/24", "192.168.2.11:51820", 1),
        );
        let mut c = cluster("c", "10.3.0.0/24", "10.98.0.0/16");
        c.nodes.insert(
            "node-0".into(),
            node("node-0", "10.3.0.0/24", "192.168.3.10:51820", 3),
        );
        let ac = allow(&["10.3.0.0/16", "10.98.0.0/16"]);
        // c holds key 3 first.
        let first = run(&[(c.clone(), ac.clone()), (b.clone(), b_allowed())]);
        assert_eq!(
            reasons_for(&first.verdicts[&id("b")], "local-key"),
            vec!["local_key"]
        );
        assert_eq!(
            first.key_owners[&PublicKey([3; 32])],
            (id("c"), "node-0".into())
        );
        // Then b (whose ID sorts first) announces c's key: b loses, with memory.
        b.nodes.insert(
            "c-key".into(),
            node("c-key", "10.2.2.0/24", "192.168.2.12:51820", 3),
        );
        let peers = [(b.clone(), b_allowed()), (c.clone(), ac.clone())];
        let later = run_with(&local(), &peers, &Limits::default(), &first.key_owners);
        assert_eq!(
            reasons_for(&later.verdicts[&id("b")], "c-key"),
            vec!["key_taken"]
        );
        assert!(later.verdicts[&id("c")].refusals.is_empty());
        // And the other way round: a thief whose ID sorts after the owner.
        let mut z = b.clone();
        z.id = id("z");
        let az = b_allowed();
        let owners: BTreeMap<_, _> = [(PublicKey([2; 32]), (id("z"), "node-0".to_string()))].into();
        let mut b2 = peer_b();
        b2.nodes
            .get_mut("node-0")
            .unwrap()
            .gateway
            .as_mut()
            .unwrap()
            .public_key = PublicKey([2; 32]);
        let x = run_with(
            &local(),
            &[(z, az), (b2, allow(&["10.2.0.0/16"]))],
            &Limits::default(),
            &owners,
        );
        // z and b both claim 10.2.0.0/24 here too (both allowed): both refused by overlap;
        // the key rule then has no second claimant left, which is fine: nothing routes twice.
        assert!(
            x.verdicts[&id("b")]
                .counts
                .contains_key(&("node", "overlap"))
        );
    }

    #[test]
    fn quotas_keep_the_first_objects_by_name_and_count_the_rest() {
        let mut b = peer_b();
        for i in 0..30 {
            b.nodes.insert(
                format!("n{i:02}"),
                node(
                    &format!("n{i:02}"),
                    &format!("10.2.{}.0/24", i + 1),
                    "192.168.2.11:51820",
                    50 + i,
                ),
            );
            export(
                &mut b.services,
                "load",
                &format!("s{i:02}"),
                &format!("10.97.1.{}", i + 1),
                &["10.2.0.9", "10.2.0.10"],
            );
        }
        let limits = Limits {
            nodes: 10,
            services: 5,
            endpoints: 7,
            ..Limits::default()
        };
        let v = &run_with(
            &local(),
            &[(b.clone(), b_allowed())],
            &limits,
            &BTreeMap::new(),
        )
        .verdicts[&id("b")];
        assert_eq!(v.state.nodes.len(), 10);
        assert!(v.state.nodes.contains_key("n00") && !v.state.nodes.contains_key("node-0"));
        assert_eq!(v.state.services.len(), 5);
        assert_eq!(v.state.endpoint_count(), 7);
        assert_eq!(v.counts[&("node", "quota")], 21);
        assert_eq!(v.counts[&("service", "quota")], 26);
        assert_eq!(v.counts[&("endpoint", "quota")], 3);
        assert!(v.refusals.iter().any(|r| r.to_string()
            == "cluster b: node * refused: 21 nodes beyond the first 10 over the per-peer quota of 10"));
        // Deterministic.
        let again =
            &run_with(&local(), &[(b, b_allowed())], &limits, &BTreeMap::new()).verdicts[&id("b")];
        assert_eq!(again, v);
    }

    #[test]
    fn refusal_lists_are_bounded() {
        let mut b = peer_b();
        for i in 0..5000u32 {
            export(
                &mut b.services,
                "load",
                &format!("s{i}"),
                "169.254.169.254",
                &[],
            );
        }
        let v = &run(&[(b, b_allowed())]).verdicts[&id("b")];
        assert_eq!(v.refusals.len(), MAX_LISTED_REFUSALS);
        assert_eq!(v.refused_total(), 5000);
    }

    #[test]
    fn the_cross_check_is_not_quadratic() {
        // 100 peers × 500 nodes: pairwise that would be 1.25 billion comparisons; sorted, it
        // takes well under a second in a release build (the bound allows a loaded debug one).
        let mut peers = Vec::new();
        for p in 0..100u32 {
            let mut s = ClusterState::new(id(&format!("p{p}")), "p");
            for n in 0..500u32 {
                let name = format!("n{n}");
                let cidr = format!(
                    "{}.{}.{}.0/24",
                    11 + p / 50,
                    (p % 50) * 4 + n / 250,
                    n % 250
                );
                s.nodes.insert(
                    name.clone(),
                    node(
                        &name,
                        &cidr,
                        &format!("192.0.{}.{}:51820", p, n % 250 + 1),
                        0,
                    ),
                );
                s.nodes.get_mut(&name).unwrap().gateway = None;
            }
            let a = allow(&[&format!("{}.{}.0.0/14", 11 + p / 50, (p % 50) * 4)]);
            peers.push((s, a));
        }
        let started = std::time::Instant::now();
        let a = run(&peers);
        let took = started.elapsed();
        assert!(
            a.verdicts.values().all(|v| v.refusals.is_empty()),
            "{:?}",
            a.verdicts
                .values()
                .find(|v| !v.refusals.is_empty())
                .map(|v| &v.refusals[..1])
        );
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    }
}
