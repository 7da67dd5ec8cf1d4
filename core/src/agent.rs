//! The streams inside a cluster: what a node's gateway and the cluster's DNS say to their
//! controller when they subscribe, and what the controller sends a gateway. Framed like the
//! peering protocol (4-byte big-endian length + JSON, [`crate::framing`]).
//! DNS receives [`crate::imports::ImportsUpdate`]s.
//!
//! After its hello a gateway sends an [`AgentReport`] every few seconds (its tunnels, see
//! [`crate::status`]). The extension is backward compatible both ways: a controller that
//! predates it reads and discards whatever a subscriber sends after the hello, and a gateway
//! that predates it simply never reports (its node shows no report). A controller ignores
//! (and counts) a report it cannot parse or that fails validation; only a broken frame
//! (oversized length) ends the stream, since the framing is then lost.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterId;
use crate::gateway::{GatewayPlan, PodRoute, TunnelPeer};
use crate::policy::{PolicyDelta, PolicyInputs};
use crate::status::GatewayReport;
use crate::wgkey::PublicKey;

/// The largest frame on an agent stream, both ways of the limit: the controller never sends a
/// larger one (it ends that subscriber's stream instead, and says so), and gateways and DNS
/// accept up to this. One constant so the two ends cannot drift (they once did: 64 MiB sent,
/// 16 MiB accepted). A 100,000-endpoint imports snapshot is about 5 MiB of JSON (tested).
pub const MAX_AGENT_FRAME: usize = 64 << 20;

/// The suffix of every identity on the agent port (certificate DNS SANs).
pub const AGENT_IDENTITY_SUFFIX: &str = ".trellis";

/// Who a certificate on the agent port says its holder is; the names are DNS SANs signed by
/// the cluster's agent CA:
/// * `agent.<cluster>.trellis`: the controller's agent port (what gateways and DNS dial);
/// * `<node>.node.<cluster>.trellis`: the gateway of `<node>`: it may register that node only;
/// * `dns.<cluster>.trellis`: the cluster's DNS: it may only read imports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentIdentity {
    Controller { cluster: String },
    Node { cluster: String, node: String },
    Dns { cluster: String },
}

impl AgentIdentity {
    /// The DNS name a certificate for this identity carries.
    pub fn dns_name(&self) -> String {
        match self {
            AgentIdentity::Controller { cluster } => {
                format!("agent.{cluster}{AGENT_IDENTITY_SUFFIX}")
            }
            AgentIdentity::Node { cluster, node } => {
                format!("{node}.node.{cluster}{AGENT_IDENTITY_SUFFIX}")
            }
            AgentIdentity::Dns { cluster } => format!("dns.{cluster}{AGENT_IDENTITY_SUFFIX}"),
        }
    }

    /// The identity a DNS name stands for, if it is one (node names are DNS-1123 labels, so
    /// they hold no dot; a cluster ID holds none either).
    pub fn from_dns_name(name: &str) -> Option<Self> {
        let rest = name.strip_suffix(AGENT_IDENTITY_SUFFIX)?;
        let labels: Vec<&str> = rest.split('.').collect();
        let ok = |l: &str| !l.is_empty();
        match labels.as_slice() {
            ["agent", cluster] if ok(cluster) => Some(AgentIdentity::Controller {
                cluster: (*cluster).into(),
            }),
            ["dns", cluster] if ok(cluster) => Some(AgentIdentity::Dns {
                cluster: (*cluster).into(),
            }),
            [node, "node", cluster] if ok(node) && ok(cluster) => Some(AgentIdentity::Node {
                cluster: (*cluster).into(),
                node: (*node).into(),
            }),
            _ => None,
        }
    }

    pub fn cluster(&self) -> &str {
        match self {
            AgentIdentity::Controller { cluster }
            | AgentIdentity::Node { cluster, .. }
            | AgentIdentity::Dns { cluster } => cluster,
        }
    }
}

/// The first frame a subscriber sends: who it is. `token` is the shared agent token of the
/// deprecated plaintext mode (a controller without agent TLS); a controller with agent TLS
/// ignores it and authorizes by the client certificate alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(flatten)]
    pub role: AgentRole,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentRole {
    Gateway(GatewayRegistration),
    Dns,
    /// A gateway without a node certificate (yet) asks for one, or DNS for its
    /// `dns.<cluster>.trellis` (`dns: true`): the controller answers one [`BootstrapIssued`]
    /// frame, or closes.
    Bootstrap(NodeBootstrap),
    /// A gateway's flow channel (`crate::flow::protocol`): the controller asks for the node's
    /// flows on it. Authorized like the node's registration: its certificate must name `node`.
    Flows(FlowChannel),
}

/// The hello of a node's flow channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowChannel {
    pub node: String,
}

/// What a gateway sends to get its node's certificate on Kubernetes: its projected
/// ServiceAccount token (audience `trellis-agent`) and a PKCS#10 request for a key it
/// generated (the private half never leaves the node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBootstrap {
    /// The node asked for (empty when `dns`).
    pub node: String,
    /// Not `token`: the hello's own (deprecated) `token` field shares the object.
    pub service_account_token: String,
    pub csr_pem: String,
    /// DNS asks for its read-only identity with the DNS ServiceAccount's token (not a node's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dns: bool,
}

/// The controller's answer to a [`NodeBootstrap`]: the node's certificate and the agent CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapIssued {
    pub certificate_pem: String,
    pub ca_pem: String,
}

impl AgentHello {
    pub fn gateway(reg: GatewayRegistration, token: Option<String>) -> Self {
        Self {
            token,
            role: AgentRole::Gateway(reg),
        }
    }

    pub fn dns(token: Option<String>) -> Self {
        Self {
            token,
            role: AgentRole::Dns,
        }
    }
}

impl From<GatewayRegistration> for AgentRole {
    fn from(registration: GatewayRegistration) -> Self {
        AgentRole::Gateway(registration)
    }
}

/// What a subscriber sends after its hello, tagged like the hello (`"type"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentReport {
    /// A gateway's tunnels and applied state, every
    /// [`crate::status::REPORT_INTERVAL_SECONDS`].
    Gateway(GatewayReport),
}

/// The largest report frame a controller accepts (a gateway with thousands of peers fits).
pub const MAX_REPORT_FRAME: usize = 4 * 1024 * 1024;

/// Sent by a gateway when it connects: never the private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRegistration {
    pub node: String,
    pub endpoint: SocketAddr,
    pub public_key: PublicKey,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerSpec {
    pub cluster: ClusterId,
    pub node: String,
    pub public_key: PublicKey,
    /// Where to send; `None` for an external peer, which dials in (its endpoint is where it
    /// last spoke from).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; set for remote clusters (NAT on the way), unset inside the cluster.
    pub persistent_keepalive: Option<u16>,
    /// An external peer's preshared key (`Peer.spec.presharedKeySecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<crate::external_peer::PresharedKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RouteVia {
    /// Into the gateway's TUN device: encrypted to the peer whose allowed IPs match.
    Tunnel,
    /// A plain route via another node of the cluster (node encryption off).
    Node { address: IpAddr },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteSpec {
    pub destination: IpNet,
    pub via: RouteVia,
}

/// The full desired state of one node's gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayDesired {
    pub revision: u64,
    pub node: String,
    pub node_encryption: bool,
    pub peers: Vec<PeerSpec>,
    pub routes: Vec<RouteSpec>,
    /// What the node enforces NetworkPolicy from; `None` when the controller does not
    /// enforce policy (then the node loads no policy table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyInputs>,
}

impl PolicyUpdate {
    /// What takes a replica holding `old` to `new`; `None` when they are equal.
    pub fn between(old: Option<&PolicyInputs>, new: Option<&PolicyInputs>) -> Option<Self> {
        match (old, new) {
            (None, None) => None,
            (Some(_), None) => Some(PolicyUpdate::Disable),
            (None, Some(inputs)) => Some(PolicyUpdate::Replace(inputs.clone())),
            (Some(old), Some(inputs)) => match old.delta_to(inputs) {
                None => Some(PolicyUpdate::Replace(inputs.clone())),
                Some(delta) if delta.is_empty() => None,
                Some(delta) => Some(PolicyUpdate::Delta(delta)),
            },
        }
    }
}

/// How a delta changes the policy inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PolicyUpdate {
    /// Replace them whole (enforcement switched on, or the cluster changed).
    Replace(PolicyInputs),
    Delta(PolicyDelta),
    /// Stop enforcing.
    Disable,
}

/// What a gateway receives: a snapshot first (and after reconnecting), then deltas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GatewayUpdate {
    Snapshot(GatewayDesired),
    Delta {
        from: u64,
        to: u64,
        node_encryption: bool,
        upsert_peers: Vec<PeerSpec>,
        /// Peers to remove, by public key.
        remove_peers: Vec<PublicKey>,
        add_routes: Vec<RouteSpec>,
        remove_routes: Vec<RouteSpec>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<PolicyUpdate>,
    },
}

impl GatewayDesired {
    /// What the gateway applies: every peer (named `<cluster>/<node>`) with its allowed IPs,
    /// and every route into the tunnel or via another node.
    pub fn plan(&self) -> GatewayPlan {
        GatewayPlan {
            revision: self.revision,
            peers: self
                .peers
                .iter()
                .map(|peer| TunnelPeer {
                    name: format!("{}/{}", peer.cluster, peer.node),
                    public_key: peer.public_key,
                    endpoint: peer.endpoint,
                    allowed_ips: peer.allowed_ips.clone(),
                    persistent_keepalive: peer.persistent_keepalive,
                    preshared_key: peer.preshared_key,
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|route| {
                    let via = match route.via {
                        RouteVia::Tunnel => PodRoute::Tunnel,
                        RouteVia::Node { address } => PodRoute::Via(address),
                    };
                    (route.destination, via)
                })
                .collect(),
        }
    }

    /// The update from `self` to `new`; `None` if only the revision differs.
    pub fn delta_to(&self, new: &GatewayDesired) -> Option<GatewayUpdate> {
        let upsert_peers: Vec<PeerSpec> = new
            .peers
            .iter()
            .filter(|p| !self.peers.contains(p))
            .cloned()
            .collect();
        let remove_peers: Vec<PublicKey> = self
            .peers
            .iter()
            .filter(|p| !new.peers.iter().any(|q| q.public_key == p.public_key))
            .map(|p| p.public_key)
            .collect();
        let add_routes: Vec<RouteSpec> = new
            .routes
            .iter()
            .filter(|r| !self.routes.contains(r))
            .cloned()
            .collect();
        let remove_routes: Vec<RouteSpec> = self
            .routes
            .iter()
            .filter(|r| !new.routes.contains(r))
            .cloned()
            .collect();
        let policy = PolicyUpdate::between(self.policy.as_ref(), new.policy.as_ref());
        let unchanged = policy.is_none()
            && upsert_peers.is_empty()
            && remove_peers.is_empty()
            && add_routes.is_empty()
            && remove_routes.is_empty()
            && self.node_encryption == new.node_encryption;
        (!unchanged).then_some(GatewayUpdate::Delta {
            from: self.revision,
            to: new.revision,
            node_encryption: new.node_encryption,
            upsert_peers,
            remove_peers,
            add_routes,
            remove_routes,
            policy,
        })
    }

    /// Applies an update as a gateway would; `false` if a delta does not follow.
    pub fn apply(&mut self, update: &GatewayUpdate) -> bool {
        match update {
            GatewayUpdate::Snapshot(s) => {
                *self = s.clone();
                true
            }
            GatewayUpdate::Delta {
                from,
                to,
                node_encryption,
                upsert_peers,
                remove_peers,
                add_routes,
                remove_routes,
                policy,
            } => {
                if *from != self.revision {
                    return false;
                }
                match policy {
                    None => {}
                    Some(PolicyUpdate::Replace(inputs)) => self.policy = Some(inputs.clone()),
                    Some(PolicyUpdate::Disable) => self.policy = None,
                    Some(PolicyUpdate::Delta(delta)) => match &mut self.policy {
                        Some(inputs) => inputs.apply(delta),
                        // A delta to inputs this replica never had: resynchronise.
                        None => return false,
                    },
                }
                self.peers.retain(|p| {
                    !remove_peers.contains(&p.public_key)
                        && !upsert_peers.iter().any(|u| u.public_key == p.public_key)
                });
                self.peers.extend(upsert_peers.iter().cloned());
                self.peers.sort();
                self.routes.retain(|r| !remove_routes.contains(r));
                self.routes.extend(add_routes.iter().cloned());
                self.routes.sort();
                self.node_encryption = *node_encryption;
                self.revision = *to;
                true
            }
        }
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_strangers_are_none() {
        for id in [
            AgentIdentity::Controller {
                cluster: "c1".into(),
            },
            AgentIdentity::Node {
                cluster: "c1".into(),
                node: "c1-node-0".into(),
            },
            AgentIdentity::Dns {
                cluster: "c1".into(),
            },
        ] {
            assert_eq!(
                AgentIdentity::from_dns_name(&id.dns_name()),
                Some(id.clone())
            );
        }
        for bad in [
            "c1.cluster.trellis",
            "x.node.c1.trellis.evil",
            "a.b.node.c1.trellis",
            ".node.c1.trellis",
            "dns..trellis",
            "agent.trellis",
        ] {
            assert_eq!(AgentIdentity::from_dns_name(bad), None, "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::{FrameDecoder, FrameError, encode_json_frame};

    #[test]
    fn reports_follow_the_hello_on_one_stream_and_garbage_is_skipped() {
        let hello = AgentHello::gateway(
            GatewayRegistration {
                node: "node-0".into(),
                endpoint: "198.18.1.10:51820".parse().unwrap(),
                public_key: PublicKey([1; 32]),
            },
            None,
        );
        let report = AgentReport::Gateway(GatewayReport {
            node: "node-0".into(),
            revision: 3,
            node_encryption: Some(true),
            peers: Vec::new(),
            drops: Default::default(),
            policy: None,
        });
        let json = serde_json::to_string(&report).unwrap();
        assert!(
            json.starts_with(r#"{"type":"gateway","node":"node-0""#),
            "{json}"
        );
        // One read may carry the hello, a garbage frame and a report: each decodes in turn.
        let mut bytes = encode_json_frame(&hello, "hello", MAX_REPORT_FRAME).unwrap();
        bytes.extend(encode_json_frame(&"not a report", "junk", 1024).unwrap());
        bytes.extend(encode_json_frame(&report, "report", MAX_REPORT_FRAME).unwrap());
        let mut decoder = FrameDecoder::new(MAX_REPORT_FRAME);
        decoder.push(&bytes);
        assert_eq!(decoder.next_json::<AgentHello>().unwrap(), Some(hello));
        assert!(matches!(
            decoder.next_json::<AgentReport>(),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(decoder.next_json::<AgentReport>().unwrap(), Some(report));
        assert_eq!(decoder.buffered(), 0);
        // A report type from a newer gateway is an error to skip, not a crash.
        let unknown = encode_json_frame(&serde_json::json!({"type": "later"}), "x", 1024).unwrap();
        decoder.push(&unknown);
        assert!(decoder.next_json::<AgentReport>().is_err());
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn a_desired_state_plans_peers_and_both_kinds_of_route() {
        let desired = GatewayDesired {
            revision: 4,
            node: "node-0".into(),
            node_encryption: false,
            peers: vec![PeerSpec {
                cluster: "west".parse().unwrap(),
                node: "node-3".into(),
                public_key: PublicKey([3; 32]),
                endpoint: Some("198.18.2.13:51820".parse().unwrap()),
                allowed_ips: vec![
                    "10.2.3.0/24".parse().unwrap(),
                    "10.96.0.0/16".parse().unwrap(),
                ],
                persistent_keepalive: Some(25),
                preshared_key: None,
            }],
            routes: vec![
                RouteSpec {
                    destination: "10.2.3.0/24".parse().unwrap(),
                    via: RouteVia::Tunnel,
                },
                RouteSpec {
                    destination: "10.1.1.0/24".parse().unwrap(),
                    via: RouteVia::Node {
                        address: "198.18.1.11".parse().unwrap(),
                    },
                },
            ],
            policy: None,
        };
        let plan = desired.plan();
        assert_eq!(plan.revision, 4);
        assert_eq!(plan.peers[0].name, "west/node-3");
        assert_eq!(plan.peers[0].allowed_ips.len(), 2);
        assert_eq!(
            plan.routes[&"10.2.3.0/24".parse::<IpNet>().unwrap()],
            PodRoute::Tunnel
        );
        assert_eq!(
            plan.routes[&"10.1.1.0/24".parse::<IpNet>().unwrap()],
            PodRoute::Via("198.18.1.11".parse().unwrap())
        );
    }
}
