//! What one cluster tells the mesh about itself (`ClusterState`), and the pure logic around it:
//! diffs into incremental deltas with revision numbers, applying them, and the refusals of a
//! mesh that would route ambiguously (overlapping CIDRs, duplicate cluster IDs).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keyed::{Keyed, KeyedDelta, keyed_seq};
use crate::policy::{EndpointKey, Identity, IdentityKey, PolicyEndpoint};

/// Errors of the cluster model. Everything here comes from another cluster's bytes or from a
/// user's configuration, so every check is an error, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid cluster ID {id:?}: {reason}")]
    ParseClusterId { id: String, reason: &'static str },
    #[error("delta for cluster {delta} cannot apply to the state of cluster {state}")]
    ApplyDeltaWrongCluster { state: ClusterId, delta: ClusterId },
    #[error(
        "delta of cluster {cluster} goes from revision {from} to {to}, but the state is at \
         revision {at}"
    )]
    ApplyDeltaRevisionGap {
        cluster: ClusterId,
        at: u64,
        from: u64,
        to: u64,
    },
}

/// A cluster's identity in the mesh: a DNS label (RFC 1123, at most 63 characters), the same
/// that the cluster's certificate carries as `<id>.cluster.trellis` and that KEP-2149's
/// `cluster.clusterset.k8s.io` ClusterProperty holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterId(String);

impl ClusterId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ClusterId {
    type Err = ClusterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ClusterError::ParseClusterId {
            id: s.chars().take(80).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.len() > 63 {
            return Err(err("longer than 63 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(err("only lowercase letters, digits and '-' are allowed"));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(err("must start and end with a letter or digit"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for ClusterId {
    type Error = ClusterError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ClusterId> for String {
    fn from(id: ClusterId) -> Self {
        id.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A WireGuard public key: the one type the whole model uses (see [`crate::wgkey`]).
pub use crate::wgkey::PublicKey;

/// Where a node's gateway listens (WireGuard over UDP) and its public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeGateway {
    pub endpoint: SocketAddr,
    pub public_key: PublicKey,
}

/// One node of a cluster as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub internal_ips: Vec<IpAddr>,
    /// Absent until the node's gateway has registered with its controller.
    #[serde(default)]
    pub gateway: Option<NodeGateway>,
}

/// A Service's identity inside a cluster (and, for the clusterset, across clusters: KEP-1645's
/// namespace sameness).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A port's transport protocol, as Kubernetes spells it; TCP when not given (the Kubernetes
/// default).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// As Kubernetes spells it: `TCP`, `UDP`, `SCTP`.
    pub fn as_kubernetes(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// In lower case, as nftables and DNS SRV labels spell it.
    pub fn lowercase(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
    /// The Service port's `appProtocol` (a hint such as `http` or `kubernetes.io/h2c`),
    /// carried to the ServiceImport as KEP-1645 asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// A port without an application protocol.
    pub fn new(name: Option<String>, protocol: Protocol, port: u16) -> Self {
        Self {
            name,
            protocol,
            port,
            app_protocol: None,
        }
    }
}

/// KEP-1645's ServiceImport types: one virtual IP for the clusterset, or headless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceKind {
    ClusterSetIP,
    Headless,
}

/// An endpoint (pod) of a service. Read also in the short form a DNS catalog file uses:
/// one `address` instead of `addresses`, and `ready` true when not given.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "EndpointFields")]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub ready: bool,
}

/// What an [`Endpoint`] is read from: `addresses` or the single `address`, not both.
#[derive(Deserialize)]
struct EndpointFields {
    #[serde(default)]
    addresses: Option<Vec<IpAddr>>,
    #[serde(default)]
    address: Option<IpAddr>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default = "ready_by_default")]
    ready: bool,
}

fn ready_by_default() -> bool {
    true
}

impl TryFrom<EndpointFields> for Endpoint {
    type Error = &'static str;

    fn try_from(fields: EndpointFields) -> Result<Self, Self::Error> {
        let addresses = match (fields.addresses, fields.address) {
            (Some(addresses), None) => addresses,
            (None, Some(address)) => vec![address],
            (None, None) => return Err("an endpoint needs `addresses` (or one `address`)"),
            (Some(_), Some(_)) => return Err("an endpoint has `addresses` or `address`, not both"),
        };
        Ok(Endpoint {
            addresses,
            hostname: fields.hostname,
            node: fields.node,
            ready: fields.ready,
        })
    }
}

/// A Service this cluster exports (it has a `ServiceExport`), with its ports and endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedService {
    pub namespace: String,
    pub name: String,
    pub kind: ServiceKind,
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// The ports the endpoints listen on (the EndpointSlices' ports: the Service's target
    /// ports), which a client reaching an endpoint directly needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_ports: Vec<ServicePort>,
    /// The properties KEP-1645 carries to the ServiceImport and resolves conflicts on.
    #[serde(default, skip_serializing_if = "ExportProperties::is_unset")]
    pub properties: ExportProperties,
}

/// What a cluster's export says beyond type and ports: the Service's session affinity,
/// traffic policies and IP families, and the ServiceExport's creation time and exported
/// labels and annotations. Every exporting cluster must agree on them; where they do not,
/// the oldest export wins (KEP-1645, "Constraints and Conflict Resolution").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportProperties {
    /// The ServiceExport's `creationTimestamp`, in seconds since the Unix epoch; `None`
    /// (unknown) counts as newer than any known time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_at: Option<i64>,
    /// `ClientIP` or `None` (the Service's `sessionAffinity`); `None` here when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout: Option<i32>,
    /// `Cluster` or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// For example `PreferClose`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
    /// The Service's `ipFamilies` (`IPv4`, `IPv6`), in its order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_families: Vec<String>,
    /// The ServiceExport's `spec.exportedLabels`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The ServiceExport's `spec.exportedAnnotations`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ExportProperties {
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

impl ExportedService {
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.name)
    }
}

/// Everything one cluster exports to the mesh. `revision` grows by one with every change the
/// owning controller makes; peers apply [`Delta`]s only in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub id: ClusterId,
    pub name: String,
    pub revision: u64,
    #[serde(default)]
    pub service_cidrs: Vec<IpNet>,
    #[serde(default, with = "node_seq")]
    pub nodes: BTreeMap<String, NodeState>,
    #[serde(default, with = "service_seq")]
    pub services: BTreeMap<ServiceKey, ExportedService>,
    /// The identities of the cluster's pods (NetworkPolicy: one per distinct label set),
    /// empty unless the controller enforces policy. Absent from the JSON of a controller that
    /// predates policy, and omitted when empty, so both versions read each other's states.
    #[serde(
        default,
        with = "keyed_seq",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub identities: BTreeMap<IdentityKey, Identity>,
    /// The cluster's pods with an address, as policy sees them (see `identities`).
    #[serde(
        default,
        with = "keyed_seq",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub pods: BTreeMap<EndpointKey, PolicyEndpoint>,
}

/// One change of a cluster's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// The cluster's display name or service CIDRs changed.
    Meta {
        name: String,
        service_cidrs: Vec<IpNet>,
    },
    UpsertNode(NodeState),
    RemoveNode {
        name: String,
    },
    UpsertService(ExportedService),
    RemoveService {
        namespace: String,
        name: String,
    },
    /// Only sent by a controller enforcing NetworkPolicy (a peer that predates policy cannot
    /// read these four: enable policy once every controller of the mesh knows them).
    UpsertIdentity(Identity),
    RemoveIdentity(IdentityKey),
    UpsertPod(PolicyEndpoint),
    RemovePod(EndpointKey),
}

/// The changes that take a cluster's state from revision `from` to revision `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub cluster: ClusterId,
    pub from: u64,
    pub to: u64,
    pub changes: Vec<Change>,
}

impl ClusterState {
    pub fn new(id: ClusterId, name: impl Into<String>) -> Self {
        Self {
            id,
            name: name.into(),
            revision: 0,
            service_cidrs: Vec::new(),
            nodes: BTreeMap::new(),
            services: BTreeMap::new(),
            identities: BTreeMap::new(),
            pods: BTreeMap::new(),
        }
    }

    /// The changes that turn `self` into `new` (ignoring the revisions).
    pub fn diff(&self, new: &ClusterState) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.name != new.name || self.service_cidrs != new.service_cidrs {
            changes.push(Change::Meta {
                name: new.name.clone(),
                service_cidrs: new.service_cidrs.clone(),
            });
        }
        for (name, node) in &new.nodes {
            if self.nodes.get(name) != Some(node) {
                changes.push(Change::UpsertNode(node.clone()));
            }
        }
        for name in self.nodes.keys() {
            if !new.nodes.contains_key(name) {
                changes.push(Change::RemoveNode { name: name.clone() });
            }
        }
        for (key, svc) in &new.services {
            if self.services.get(key) != Some(svc) {
                changes.push(Change::UpsertService(svc.clone()));
            }
        }
        for key in self.services.keys() {
            if !new.services.contains_key(key) {
                changes.push(Change::RemoveService {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                });
            }
        }
        let identities = KeyedDelta::between(&self.identities, &new.identities);
        changes.extend(identities.upsert.into_iter().map(Change::UpsertIdentity));
        changes.extend(identities.remove.into_iter().map(Change::RemoveIdentity));
        let pods = KeyedDelta::between(&self.pods, &new.pods);
        changes.extend(pods.upsert.into_iter().map(Change::UpsertPod));
        changes.extend(pods.remove.into_iter().map(Change::RemovePod));
        changes
    }

    /// The delta from `self` (at its revision) to `new` (at its revision); `None` when nothing
    /// changed.
    pub fn delta_to(&self, new: &ClusterState) -> Option<Delta> {
        let changes = self.diff(new);
        (!changes.is_empty()).then(|| Delta {
            cluster: new.id.clone(),
            from: self.revision,
            to: new.revision,
            changes,
        })
    }

    /// Applies a delta in order; a delta that does not start at this revision is refused, so
    /// the caller resynchronises with a snapshot instead of silently diverging.
    pub fn apply(&mut self, delta: &Delta) -> Result<(), ClusterError> {
        if delta.cluster != self.id {
            return Err(ClusterError::ApplyDeltaWrongCluster {
                state: self.id.clone(),
                delta: delta.cluster.clone(),
            });
        }
        if delta.from != self.revision || delta.to <= delta.from {
            return Err(ClusterError::ApplyDeltaRevisionGap {
                cluster: self.id.clone(),
                at: self.revision,
                from: delta.from,
                to: delta.to,
            });
        }
        for change in &delta.changes {
            match change {
                Change::Meta {
                    name,
                    service_cidrs,
                } => {
                    self.name = name.clone();
                    self.service_cidrs = service_cidrs.clone();
                }
                Change::UpsertNode(node) => {
                    self.nodes.insert(node.name.clone(), node.clone());
                }
                Change::RemoveNode { name } => {
                    self.nodes.remove(name);
                }
                Change::UpsertService(svc) => {
                    self.services.insert(svc.key(), svc.clone());
                }
                Change::RemoveService { namespace, name } => {
                    self.services
                        .remove(&ServiceKey::new(namespace.clone(), name.clone()));
                }
                Change::UpsertIdentity(identity) => {
                    self.identities.insert(identity.key(), identity.clone());
                }
                Change::RemoveIdentity(key) => {
                    self.identities.remove(key);
                }
                Change::UpsertPod(pod) => {
                    self.pods.insert(pod.key(), pod.clone());
                }
                Change::RemovePod(key) => {
                    self.pods.remove(key);
                }
            }
        }
        self.revision = delta.to;
        Ok(())
    }

    /// The number of endpoints over all exported services.
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }

    /// Every CIDR this cluster routes: pod CIDRs per node and the service CIDRs.
    pub fn cidrs(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.nodes
            .values()
            .flat_map(|n| n.pod_cidrs.iter().copied())
            .chain(self.service_cidrs.iter().copied())
    }
}

mod node_seq {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, NodeState>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, NodeState>, D::Error> {
        let v: Vec<NodeState> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|n| (n.name.clone(), n)).collect())
    }
}

mod service_seq {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<ServiceKey, ExportedService>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ServiceKey, ExportedService>, D::Error> {
        let v: Vec<ExportedService> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|s| (s.key(), s)).collect())
    }
}

/// Small builders for tests across the workspace.
#[doc(hidden)]
pub mod fixture {
    use super::*;

    pub fn id(s: &str) -> ClusterId {
        s.parse().expect("valid cluster id")
    }

    pub fn cluster(id_: &str, pod_cidr: &str, service_cidr: &str) -> ClusterState {
        let mut c = ClusterState::new(id(id_), format!("cluster {id_}"));
        c.service_cidrs = vec![service_cidr.parse().expect("cidr")];
        c.nodes.insert(
            "node-0".into(),
            NodeState {
                name: "node-0".into(),
                pod_cidrs: vec![pod_cidr.parse().expect("cidr")],
                internal_ips: vec![],
                gateway: None,
            },
        );
        c
    }

    /// Clusters a (pod CIDR 10.1.0.0/24, services 10.96.0.0/16) and b (10.2.0.0/24,
    /// 10.97.0.0/16): the pair most tests use, apart in every CIDR.
    pub fn clusters_a_b() -> (ClusterState, ClusterState) {
        (
            cluster("a", "10.1.0.0/24", "10.96.0.0/16"),
            cluster("b", "10.2.0.0/24", "10.97.0.0/16"),
        )
    }

    pub fn service(ns: &str, name: &str, ip: &str, endpoints: &[&str]) -> ExportedService {
        ExportedService {
            namespace: ns.into(),
            name: name.into(),
            kind: ServiceKind::ClusterSetIP,
            cluster_ips: vec![ip.parse().expect("ip")],
            ports: vec![ServicePort::new(Some("http".into()), Protocol::Tcp, 80)],
            endpoints: endpoints
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![a.parse().expect("ip")],
                    hostname: None,
                    node: Some("node-0".into()),
                    ready: true,
                })
                .collect(),
            endpoint_ports: vec![],
            properties: ExportProperties::default(),
        }
    }

    /// Adds [`service`]`(ns, name, ip, endpoints)` to a cluster's (or a source's) exports,
    /// under its key: how most tests set up what a cluster exports.
    pub fn export(
        services: &mut BTreeMap<ServiceKey, ExportedService>,
        ns: &str,
        name: &str,
        ip: &str,
        endpoints: &[&str],
    ) {
        let svc = service(ns, name, ip, endpoints);
        services.insert(svc.key(), svc);
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;

    #[test]
    fn cluster_ids_are_dns_labels() {
        assert!("east-1".parse::<ClusterId>().is_ok());
        for bad in ["", "East", "-a", "a-", "a.b", "a_b", &"x".repeat(64)] {
            assert!(bad.parse::<ClusterId>().is_err(), "{bad:?} accepted");
        }
        let err = serde_json::from_str::<ClusterId>("\"Bad\"").unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");
    }

    #[test]
    fn ports_and_endpoints_read_the_short_forms() {
        let port: ServicePort = serde_json::from_str(r#"{"port": 81}"#).unwrap();
        assert_eq!(port.protocol, Protocol::Tcp);
        assert_eq!(port.name, None);
        let port: ServicePort =
            serde_json::from_str(r#"{"name": "dns", "protocol": "UDP", "port": 53}"#).unwrap();
        assert_eq!(port.protocol, Protocol::Udp);

        let short: Endpoint =
            serde_json::from_str(r#"{"address": "10.1.0.5", "hostname": "web-0"}"#).unwrap();
        assert_eq!(short.addresses, vec!["10.1.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(short.hostname.as_deref(), Some("web-0"));
        assert!(short.ready, "ready unless said otherwise");
        let full: Endpoint = serde_json::from_str(
            r#"{"addresses": ["10.1.0.5", "fd00::5"], "node": "n1", "ready": false}"#,
        )
        .unwrap();
        assert_eq!(full.addresses.len(), 2);
        assert!(!full.ready);
        // What is written is the full form, and reads back the same.
        let json = serde_json::to_string(&short).unwrap();
        assert!(json.contains(r#""addresses":["10.1.0.5"]"#), "{json}");
        assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), short);

        for bad in [
            r#"{"hostname": "a"}"#,
            r#"{"address": "10.0.0.1", "addresses": ["10.0.0.2"]}"#,
            r#"{"address": "10.0.0.300"}"#,
        ] {
            assert!(
                serde_json::from_str::<Endpoint>(bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn state_serialises_maps_as_lists_and_round_trips() {
        let mut c = cluster("east", "10.1.0.0/24", "10.96.0.0/16");
        export(&mut c.services, "shop", "web", "10.96.0.10", &["10.1.0.5"]);
        let json = serde_json::to_value(&c).unwrap();
        assert!(json["nodes"].is_array());
        assert!(json["services"].is_array());
        let back: ClusterState = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn diff_then_apply_reaches_the_new_state() {
        let mut old = cluster("east", "10.1.0.0/24", "10.96.0.0/16");
        old.revision = 4;
        export(
            &mut old.services,
            "shop",
            "web",
            "10.96.0.10",
            &["10.1.0.5"],
        );
        export(&mut old.services, "shop", "gone", "10.96.0.11", &[]);
        let mut new = old.clone();
        new.revision = 5;
        new.name = "renamed".into();
        new.services.remove(&ServiceKey::new("shop", "gone"));
        export(
            &mut new.services,
            "shop",
            "web",
            "10.96.0.10",
            &["10.1.0.5", "10.1.0.6"],
        );
        new.nodes.remove("node-0");
        let delta = old.delta_to(&new).unwrap();
        assert_eq!((delta.from, delta.to), (4, 5));
        assert_eq!(delta.changes.len(), 4, "{delta:?}");
        let mut applied = old.clone();
        applied.apply(&delta).unwrap();
        assert_eq!(applied, new);
        assert!(new.delta_to(&new).is_none());
    }

    #[test]
    fn policy_identities_and_pods_travel_as_changes_and_old_states_still_read() {
        use crate::policy::IdentityLabels;
        let old = cluster("east", "10.1.0.0/24", "10.96.0.0/16");
        let mut new = old.clone();
        new.revision = 1;
        let identity = Identity {
            key: IdentityKey {
                cluster: id("east"),
                number: 1,
            },
            labels: IdentityLabels {
                namespace: "x".into(),
                ..Default::default()
            },
        };
        new.identities.insert(identity.key(), identity.clone());
        let pod = PolicyEndpoint {
            cluster: id("east"),
            namespace: "x".into(),
            name: "a".into(),
            addresses: vec!["10.1.0.5".parse().unwrap()],
            node: "node-0".into(),
            identity: 1,
            named_ports: vec![],
        };
        new.pods.insert(pod.key(), pod.clone());
        let delta = old.delta_to(&new).unwrap();
        assert_eq!(
            delta.changes,
            vec![
                Change::UpsertIdentity(identity.clone()),
                Change::UpsertPod(pod.clone())
            ]
        );
        let mut applied = old.clone();
        applied.apply(&delta).unwrap();
        assert_eq!(applied, new);
        let back = new.delta_to(&{
            let mut s = old.clone();
            s.revision = 2;
            s
        });
        let back = back.unwrap();
        assert_eq!(
            back.changes,
            vec![
                Change::RemoveIdentity(identity.key()),
                Change::RemovePod(pod.key())
            ]
        );
        // A state without policy serialises as before (a peer predating policy reads it),
        // and a state from such a peer reads with no identities or pods.
        let json = serde_json::to_value(&old).unwrap();
        assert!(json.get("identities").is_none() && json.get("pods").is_none());
        let read: ClusterState = serde_json::from_value(json).unwrap();
        assert!(read.identities.is_empty() && read.pods.is_empty());
        let json = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), new);
    }

    #[test]
    fn apply_refuses_gaps_replays_and_other_clusters() {
        let mut a = cluster("east", "10.1.0.0/24", "10.96.0.0/16");
        a.revision = 3;
        let delta = |from, to| Delta {
            cluster: id("east"),
            from,
            to,
            changes: vec![],
        };
        assert!(matches!(
            a.apply(&delta(4, 5)),
            Err(ClusterError::ApplyDeltaRevisionGap { at: 3, .. })
        ));
        assert!(a.apply(&delta(3, 3)).is_err());
        let mut other = delta(3, 4);
        other.cluster = id("west");
        assert!(matches!(
            a.apply(&other),
            Err(ClusterError::ApplyDeltaWrongCluster { .. })
        ));
        a.apply(&delta(3, 4)).unwrap();
        assert_eq!(a.revision, 4);
    }
}
