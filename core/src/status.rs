//! The status documents: what a gateway reports about its tunnels (to its controller, over
//! the agent stream, and on its own `GET /status`), and what a controller's `GET /status`
//! answers — its peer clusters and, per node, the latest report of the node's gateway.
//! `trellis status` reads the controller's document; [`problems`] is what it judges
//! unhealthy. Plain data and pure functions, shared by the gateway, the controller and the CLI.
//!
//! Every age in a document is in whole seconds as of when the document was made: a
//! controller ages the reports it serves by the time since it received them, so no clocks
//! need to agree.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterId;
use crate::wgkey::PublicKey;

/// How often a gateway reports to its controller.
pub const REPORT_INTERVAL_SECONDS: u64 = 5;
/// A report older than this (three intervals and some slack) is stale.
pub const REPORT_STALE_SECONDS: u64 = 20;
/// WireGuard's Reject-After-Time: a session whose last handshake is older carries no traffic.
pub const HANDSHAKE_STALE_SECONDS: u64 = 180;
/// Bounds on what a controller accepts in a report (10,000 peers is about 3 MB of JSON,
/// within [`crate::agent::MAX_REPORT_FRAME`]).
pub const MAX_REPORT_PEERS: usize = 10_000;
pub const MAX_REPORT_DROP_REASONS: usize = 64;
const MAX_NAME: usize = 253;

/// What a gateway says about itself: the desired state it applied and each tunnel peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayReport {
    /// The node the gateway runs on (empty for a gateway without a node name).
    pub node: String,
    /// The revision of the desired state last applied.
    pub revision: u64,
    /// Node-to-node encryption in the desired state applied; `None` when its source does not
    /// say (a desired-state file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_encryption: Option<bool>,
    pub peers: Vec<TunnelStatus>,
    /// Packets the gateway dropped since it started, by reason (only reasons with drops).
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
    /// NetworkPolicy on the node; `None` when the gateway enforces none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyReport>,
}

/// What a node enforces: enough to tell that a pod's policy is in place.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// The revision of the desired state whose policy is in the kernel.
    pub revision: u64,
    /// [`crate::policy::PolicyInputs::digest`] of the inputs in the kernel.
    pub digest: String,
    /// The node's pods the ruleset knows (traffic of any other pod on the node is dropped).
    pub local_pods: Vec<std::net::IpAddr>,
    /// Rules over all chains of the node's policy table.
    pub rules: usize,
    /// Packets dropped by policy since the table was created, by direction.
    pub dropped_ingress: u64,
    pub dropped_egress: u64,
}

/// One WireGuard peer of a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// The peer's cluster (empty when the peer's name has none, e.g. an external machine).
    pub cluster: String,
    pub node: String,
    pub public_key: PublicKey,
    /// Where the gateway sends to it (the configured endpoint, or where it last spoke from).
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last completed handshake; `None` if there was none.
    pub last_handshake_age_seconds: Option<u64>,
    pub handshakes: u64,
    /// Bytes of IP packets through the tunnel, from and to the peer.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl TunnelStatus {
    /// `<cluster>/<node>`, or the node alone when there is no cluster.
    pub fn name(&self) -> String {
        if self.cluster.is_empty() {
            self.node.clone()
        } else {
            format!("{}/{}", self.cluster, self.node)
        }
    }
}

/// Splits a gateway peer name (`<cluster>/<node>`, as controllers name peers) into cluster and
/// node; a name without `/` is a node of no cluster.
pub fn split_peer_name(name: &str) -> (String, String) {
    match name.split_once('/') {
        Some((cluster, node)) => (cluster.to_string(), node.to_string()),
        None => (String::new(), name.to_string()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("a gateway registered as node {registered:?} reported as node {reported:?}")]
    WrongNode {
        registered: String,
        reported: String,
    },
    #[error("the report lists {0} peers, more than {MAX_REPORT_PEERS}")]
    TooManyPeers(usize),
    #[error("the report lists {0} drop reasons, more than {MAX_REPORT_DROP_REASONS}")]
    TooManyDropReasons(usize),
    #[error("a name in the report is empty or longer than {MAX_NAME} characters")]
    BadName,
}

fn name_ok(name: &str, may_be_empty: bool) -> bool {
    (may_be_empty || !name.is_empty()) && name.len() <= MAX_NAME
}

impl GatewayReport {
    /// Checks a report a gateway registered as `registered` sent: its own node, bounded sizes.
    pub fn validate(&self, registered: &str) -> Result<(), ReportError> {
        if self.node != registered {
            return Err(ReportError::WrongNode {
                registered: registered.to_string(),
                reported: self.node.clone(),
            });
        }
        if self.peers.len() > MAX_REPORT_PEERS {
            return Err(ReportError::TooManyPeers(self.peers.len()));
        }
        if self.drops.len() > MAX_REPORT_DROP_REASONS {
            return Err(ReportError::TooManyDropReasons(self.drops.len()));
        }
        let names_ok = name_ok(&self.node, false)
            && self
                .peers
                .iter()
                .all(|p| name_ok(&p.cluster, true) && name_ok(&p.node, false))
            && self.drops.keys().all(|r| name_ok(r, false));
        if !names_ok {
            return Err(ReportError::BadName);
        }
        Ok(())
    }

    /// The report as it stands `seconds` after it was made: every age grows by that much.
    pub fn aged(&self, seconds: u64) -> GatewayReport {
        let mut report = self.clone();
        for peer in &mut report.peers {
            peer.last_handshake_age_seconds = peer
                .last_handshake_age_seconds
                .map(|age| age.saturating_add(seconds));
        }
        report
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.values().fold(0, |a, b| a.saturating_add(*b))
    }
}

/// A controller's `GET /status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerStatus {
    pub cluster: ClusterId,
    pub name: String,
    /// The source (Kubernetes or the static file) has been read at least once.
    pub source_synced: bool,
    /// The local cluster state's revision (what peer clusters hold of it).
    pub revision: u64,
    /// The revision of the mesh view gateways and DNS follow. A gateway's plan revision is
    /// the view revision that last changed its desired state, so it may be lower.
    #[serde(default)]
    pub mesh_revision: u64,
    pub node_encryption: bool,
    /// Gateway streams open now.
    pub gateways_connected: usize,
    /// Every configured peer cluster.
    pub remotes: Vec<RemoteStatus>,
    /// Every node the source knows or a gateway registered for, in name order.
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
    /// SHA-256 (hex) of the static source file last loaded; `None` for Kubernetes. Lets a
    /// writer of the file (the lab) tell that the controller has read what it wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    /// NetworkPolicy as the controller streams it; `None` when it enforces none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ControllerPolicyStatus>,
    /// The clusterset services imported here (the first [`MAX_STATUS_IMPORTS`] by
    /// namespace and name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imports: Vec<ImportStatus>,
    /// How many services are imported in all (the list may be cut).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub imports_total: usize,
    /// The pod and service CIDRs of this cluster and of every admitted peer cluster: what an
    /// external peer routes into the mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mesh_cidrs: Vec<IpNet>,
    /// External peers (`Peer` objects), each with its verdict, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_peers: Vec<crate::external_peer::PeerStatus>,
}

/// Imports listed in a status document at most (all are counted).
pub const MAX_STATUS_IMPORTS: usize = 1000;

/// One clusterset service as this cluster imports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportStatus {
    pub namespace: String,
    pub name: String,
    /// `ClusterSetIP` or `Headless` (the oldest export's).
    #[serde(rename = "type")]
    pub kind: crate::cluster::ServiceKind,
    /// This cluster's clusterset IPs (ClusterSetIP only; empty until allocated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<std::net::IpAddr>,
    /// Every exporting cluster, in ID order.
    pub clusters: Vec<ImportClusterStatus>,
    /// The cluster whose export wins conflicts (the oldest).
    pub oldest: ClusterId,
    /// What the exports disagree on: the `Conflict` condition's reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
}

/// One exporting cluster's part of an import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportClusterStatus {
    pub cluster: ClusterId,
    /// Its endpoints ready as seen from here (a remote one on a node without a gateway is not).
    pub ready_endpoints: usize,
    pub endpoints: usize,
}

impl ImportStatus {
    /// The import as a status row.
    pub fn of(service: &crate::imports::ImportedService) -> Self {
        Self {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            kind: service.kind,
            vips: service.vips.clone(),
            clusters: service
                .backends
                .iter()
                .map(|b| ImportClusterStatus {
                    cluster: b.cluster.clone(),
                    ready_endpoints: b.endpoints.iter().filter(|e| e.ready).count(),
                    endpoints: b.endpoints.len(),
                })
                .collect(),
            oldest: service.oldest.clone(),
            conflicts: service
                .conflicts
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect(),
        }
    }
}

/// The policy inputs the controller streams to its nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerPolicyStatus {
    /// [`crate::policy::PolicyInputs::digest`] of what the nodes are sent now: a node whose
    /// [`PolicyReport::digest`] equals it enforces the current policy.
    pub digest: String,
    /// Identities and pod endpoints, over the mesh (local and admitted peers).
    pub identities: usize,
    pub endpoints: usize,
    /// The cluster's policies in name order, with how many pods each selects.
    pub policies: Vec<PolicyStatus>,
    /// The cluster's policies refused as invalid (they isolate nothing), one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub namespace: String,
    pub name: String,
    /// `Ingress`, `Egress` or both, as the policy's types say.
    pub types: Vec<String>,
    /// Pods of the cluster the policy applies to.
    pub selected_pods: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteStatus {
    pub cluster: ClusterId,
    /// A peering session is up.
    pub session: bool,
    /// We hold its state (it may be disconnected, within its lease).
    pub synced: bool,
    /// Connected, synced and admitted: its nodes and services are in the mesh.
    #[serde(default)]
    pub ready: bool,
    /// The revision of its state we hold (a session keeps it current: the peer's heartbeats
    /// carry its revision, and a mismatch resyncs).
    pub revision: Option<u64>,
    pub last_sync_unix: Option<u64>,
    /// Seconds since its state last changed here (snapshot or delta).
    #[serde(default)]
    pub last_sync_age_seconds: Option<u64>,
    /// Seconds since it was last heard from (any message, heartbeats included).
    #[serde(default)]
    pub lag_seconds: Option<u64>,
    pub nodes: usize,
    /// Its exported services (imported here when it is admitted).
    pub services: usize,
    pub endpoints: usize,
    /// Why the mesh refuses it as a whole (no allowance, or this cluster's own ID); empty
    /// when any of it is admitted.
    pub refused: Vec<String>,
    /// The claims of it the mesh refuses (a node, a service CIDR, a service, an endpoint),
    /// each naming the object, the claim and why (at most
    /// [`crate::claims::MAX_LISTED_REFUSALS`]); the rest of the cluster works.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_claims: Vec<String>,
    /// How many claims are refused in all (the list may be cut).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused_claims_total: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    /// The cluster's source lists the node.
    pub in_source: bool,
    /// A gateway registered for it (its endpoint and key are in the cluster state).
    pub registered: bool,
    /// Its gateway's stream is open now.
    pub connected: bool,
    pub endpoint: Option<SocketAddr>,
    /// Its gateway's WireGuard public key (what an external peer of the node needs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKey>,
    /// Seconds since its gateway's last report; `None` if none arrived.
    pub report_age_seconds: Option<u64>,
    /// That report, aged to this document (see the module docs).
    pub report: Option<GatewayReport>,
}

/// What is wrong, one line each; empty when everything is healthy. Judged: the source has
/// synced; every peer cluster is connected, synced and admitted; every node of the source
/// has a connected gateway whose report is fresh; every peer in another cluster (kept alive,
/// so it must have one) has had a handshake, and a recent one.
pub fn problems(status: &ControllerStatus) -> Vec<String> {
    let mut out = Vec::new();
    let cluster = status.cluster.as_str();
    let kept_alive = |peer: &TunnelStatus| !peer.cluster.is_empty() && peer.cluster != cluster;
    if !status.source_synced {
        out.push(format!("{cluster}: the controller's source has not synced"));
    }
    for remote in &status.remotes {
        let peer = remote.cluster.as_str();
        if !remote.refused.is_empty() {
            out.push(format!(
                "{cluster}: peer cluster {peer} is refused: {}",
                remote.refused.join("; ")
            ));
        }
        if remote.refused_claims_total > 0 {
            const SHOWN: usize = 5;
            let more = remote
                .refused_claims_total
                .saturating_sub(SHOWN.min(remote.refused_claims.len()));
            let mut line = format!(
                "{cluster}: peer cluster {peer}: {} claim(s) refused: {}",
                remote.refused_claims_total,
                remote
                    .refused_claims
                    .iter()
                    .take(SHOWN)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if more > 0 {
                line.push_str(&format!(" (and {more} more)"));
            }
            out.push(line);
        }
        if !remote.session {
            out.push(format!("{cluster}: peer cluster {peer} is not connected"));
        } else if !remote.synced {
            out.push(format!(
                "{cluster}: peer cluster {peer} is connected but has not sent its state"
            ));
        }
    }
    for node in &status.nodes {
        let name = format!("{cluster}/{}", node.node);
        if node.in_source && !node.registered {
            out.push(format!("{name}: no gateway registered"));
            continue;
        }
        if !node.connected {
            out.push(format!("{name}: the gateway is not connected"));
        }
        let Some(report) = &node.report else {
            out.push(format!("{name}: no report from the gateway"));
            continue;
        };
        if report.revision == 0 {
            out.push(format!(
                "{name}: the gateway has not applied a desired state yet"
            ));
        }
        match node.report_age_seconds {
            Some(age) if age > REPORT_STALE_SECONDS => {
                out.push(format!(
                    "{name}: the gateway's last report is stale ({age}s old)"
                ));
            }
            _ => {}
        }
        for peer in &report.peers {
            match peer.last_handshake_age_seconds {
                // Only a peer kept alive must keep its session fresh: one in this cluster
                // handshakes when traffic needs it (and carries none while node encryption
                // is off), so an old handshake there means an idle pair, not a fault.
                Some(age) if age > HANDSHAKE_STALE_SECONDS && kept_alive(peer) => out.push(
                    format!("{name}: stale handshake with {} ({age}s ago)", peer.name()),
                ),
                None if kept_alive(peer) => {
                    out.push(format!("{name}: no handshake with {} yet", peer.name()));
                }
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(cluster: &str, node: &str, n: u8, age: Option<u64>) -> TunnelStatus {
        TunnelStatus {
            cluster: cluster.into(),
            node: node.into(),
            public_key: PublicKey([n; 32]),
            endpoint: Some(format!("198.18.2.{n}:51820").parse().unwrap()),
            last_handshake_age_seconds: age,
            handshakes: 1,
            rx_bytes: 1_234,
            tx_bytes: 5_678_901,
        }
    }

    fn report(node: &str) -> GatewayReport {
        GatewayReport {
            node: node.into(),
            revision: 7,
            node_encryption: Some(false),
            peers: vec![tunnel("c2", "node-0", 10, Some(3))],
            drops: BTreeMap::from([("no_route".to_string(), 2)]),
            policy: None,
        }
    }

    fn healthy() -> ControllerStatus {
        ControllerStatus {
            cluster: "c1".parse().unwrap(),
            name: "c1".into(),
            source_synced: true,
            external_peers: Vec::new(),
            mesh_cidrs: Vec::new(),
            revision: 4,
            mesh_revision: 9,
            node_encryption: false,
            gateways_connected: 1,
            remotes: vec![RemoteStatus {
                cluster: "c2".parse().unwrap(),
                session: true,
                synced: true,
                ready: true,
                revision: Some(3),
                last_sync_unix: Some(1_700_000_000),
                last_sync_age_seconds: Some(12),
                lag_seconds: Some(1),
                nodes: 2,
                services: 1,
                endpoints: 4,
                refused: Vec::new(),
                refused_claims: Vec::new(),
                refused_claims_total: 0,
            }],
            nodes: vec![NodeStatus {
                node: "node-0".into(),
                in_source: true,
                registered: true,
                connected: true,
                endpoint: Some("198.18.1.10:51820".parse().unwrap()),
                public_key: None,
                report_age_seconds: Some(2),
                report: Some(report("node-0")),
            }],
            source_digest: None,
            policy: None,
            imports: Vec::new(),
            imports_total: 0,
        }
    }

    #[test]
    fn a_healthy_mesh_has_no_problems_and_round_trips() {
        let status = healthy();
        assert_eq!(problems(&status), Vec::<String>::new());
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(
            serde_json::from_str::<ControllerStatus>(&json).unwrap(),
            status
        );
    }

    #[test]
    fn an_older_controller_document_still_parses() {
        // What controllers served before nodes, readiness and ages were added.
        let old = r#"{"cluster":"west","name":"west","source_synced":true,"revision":3,
            "node_encryption":false,"gateways_connected":0,"remotes":[{"cluster":"east",
            "session":true,"synced":true,"revision":2,"last_sync_unix":5,"nodes":1,
            "services":1,"endpoints":1,"refused":[]}]}"#;
        let status: ControllerStatus = serde_json::from_str(old).unwrap();
        assert!(status.nodes.is_empty());
        assert_eq!(status.remotes[0].lag_seconds, None);
    }

    #[test]
    fn each_unhealthy_part_is_named() {
        let mut status = healthy();
        status.remotes[0].session = false;
        status.remotes[0].refused =
            vec!["pod CIDR 10.1.0.0/16 of c1 overlaps 10.1.0.0/16 of c2".into()];
        let node = &mut status.nodes[0];
        node.connected = false;
        node.report_age_seconds = Some(REPORT_STALE_SECONDS + 1);
        let report = node.report.as_mut().unwrap();
        report.peers[0].last_handshake_age_seconds = Some(HANDSHAKE_STALE_SECONDS + 5);
        report.peers.push(tunnel("c2", "node-1", 11, None));
        // Inside the cluster a peer without traffic has no handshake, or an old one, and
        // that is fine.
        report.peers.push(tunnel("c1", "node-1", 12, None));
        report.peers.push(tunnel(
            "c1",
            "node-2",
            13,
            Some(HANDSHAKE_STALE_SECONDS + 60),
        ));
        status.nodes.push(NodeStatus {
            node: "node-1".into(),
            in_source: true,
            registered: false,
            connected: false,
            endpoint: None,
            public_key: None,
            report_age_seconds: None,
            report: None,
        });
        assert_eq!(
            problems(&status),
            [
                "c1: peer cluster c2 is refused: pod CIDR 10.1.0.0/16 of c1 overlaps 10.1.0.0/16 of c2",
                "c1: peer cluster c2 is not connected",
                "c1/node-0: the gateway is not connected",
                "c1/node-0: the gateway's last report is stale (21s old)",
                "c1/node-0: stale handshake with c2/node-0 (185s ago)",
                "c1/node-0: no handshake with c2/node-1 yet",
                "c1/node-1: no gateway registered",
            ]
        );
        let mut unsynced = healthy();
        unsynced.source_synced = false;
        unsynced.remotes[0].synced = false;
        unsynced.nodes[0].report = None;
        assert_eq!(problems(&unsynced).len(), 3, "{:?}", problems(&unsynced));
        // A gateway that registered but has applied nothing yet (revision 0) is not ready.
        let mut fresh = healthy();
        fresh.nodes[0].report.as_mut().unwrap().revision = 0;
        assert_eq!(
            problems(&fresh),
            ["c1/node-0: the gateway has not applied a desired state yet"]
        );
    }

    #[test]
    fn reports_are_validated_against_the_registration() {
        let good = report("node-0");
        assert_eq!(good.validate("node-0"), Ok(()));
        assert!(matches!(
            good.validate("node-1"),
            Err(ReportError::WrongNode { .. })
        ));
        let mut long = report("node-0");
        long.peers[0].node = "x".repeat(300);
        assert_eq!(long.validate("node-0"), Err(ReportError::BadName));
        let mut drops = report("node-0");
        for i in 0..=MAX_REPORT_DROP_REASONS {
            drops.drops.insert(format!("r{i}"), 1);
        }
        assert!(matches!(
            drops.validate("node-0"),
            Err(ReportError::TooManyDropReasons(_))
        ));
        let mut many = report("node-0");
        many.peers = vec![tunnel("c2", "n", 1, None); MAX_REPORT_PEERS + 1];
        assert!(matches!(
            many.validate("node-0"),
            Err(ReportError::TooManyPeers(_))
        ));
    }

    #[test]
    fn ageing_moves_handshakes_into_the_past() {
        let mut r = report("node-0");
        r.peers.push(tunnel("c2", "node-1", 11, None));
        let aged = r.aged(10);
        assert_eq!(aged.peers[0].last_handshake_age_seconds, Some(13));
        assert_eq!(aged.peers[1].last_handshake_age_seconds, None);
        assert_eq!(
            r.aged(u64::MAX).peers[0].last_handshake_age_seconds,
            Some(u64::MAX)
        );
        assert_eq!(r.total_drops(), 2);
    }

    #[test]
    fn peer_names_split_into_cluster_and_node() {
        assert_eq!(split_peer_name("c2/node-0"), ("c2".into(), "node-0".into()));
        assert_eq!(split_peer_name("laptop"), (String::new(), "laptop".into()));
        assert_eq!(tunnel("", "laptop", 1, None).name(), "laptop");
        assert_eq!(tunnel("c2", "node-0", 1, None).name(), "c2/node-0");
    }
}
