//! What a node gateway is told to do: the desired state the controller streams to it (or a file
//! holds), and the pure derivation of the WireGuard peers and pod routes that follow from it.
//!
//! The format is JSON (see the tests for an example). A state is validated as a whole before
//! anything is applied, so a bad update changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cidr::overlaps;
use crate::wgkey::PublicKey;

/// Everything one gateway should have: its remote nodes (and external peers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayState {
    /// Increases with every change the controller makes; informational for the gateway.
    #[serde(default)]
    pub revision: u64,
    /// The cluster this gateway's node belongs to.
    pub cluster: String,
    /// The other nodes (own cluster and remote clusters) and external peers.
    #[serde(default)]
    pub nodes: Vec<RemoteNode>,
}

/// A node (or an external machine) whose pods this gateway routes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteNode {
    /// Unique within the state, e.g. `<cluster>/<node>`.
    pub name: String,
    /// The node's cluster. Nodes of other clusters are always reached through the tunnel.
    pub cluster: String,
    /// The node gateway's WireGuard public key.
    pub public_key: PublicKey,
    /// Where its gateway listens (UDP); `None` for a peer that only dials in (a laptop).
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// The node's underlay address, next hop of plain (unencrypted) routes.
    #[serde(default)]
    pub node_ip: Option<IpAddr>,
    /// The pod CIDRs behind the node: WireGuard allowed IPs and route destinations.
    pub pod_cidrs: Vec<IpNet>,
    /// Whether traffic to this node's pods goes through the tunnel. Ignored (always on) for
    /// nodes of other clusters.
    #[serde(default = "yes")]
    pub encrypted: bool,
    /// WireGuard persistent keepalive, seconds.
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("node name {0:?} appears twice")]
    DuplicateName(String),
    #[error("public key {key} is used by both {first} and {second}")]
    DuplicateKey {
        key: PublicKey,
        first: String,
        second: String,
    },
    #[error("pod CIDR {a} of {a_node} overlaps {b} of {b_node}")]
    OverlappingCidrs {
        a: IpNet,
        a_node: String,
        b: IpNet,
        b_node: String,
    },
    #[error("node {0} is unencrypted but has no node_ip to route to")]
    PlainWithoutNodeIp(String),
    #[error("node {0} has no pod CIDRs")]
    NoPodCidrs(String),
    #[error("pod CIDR {cidr} of node {node} is not in canonical form (host bits set)")]
    NonCanonicalCidr { node: String, cidr: IpNet },
}

/// A WireGuard peer the gateway should have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelPeer {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// An external peer's preshared key, mixed into its handshakes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<crate::external_peer::PresharedKey>,
}

/// What a gateway applies, whichever source it came from (a desired-state file, or its
/// controller's stream): its WireGuard peers, and how each pod CIDR leaves the node. The
/// gateway keeps the last one it applied on disk, to restore before it hears from its source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPlan {
    pub revision: u64,
    pub peers: Vec<TunnelPeer>,
    pub routes: BTreeMap<IpNet, PodRoute>,
}

/// How traffic to a pod CIDR leaves the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodRoute {
    /// Into the gateway's TUN, encrypted.
    Tunnel,
    /// Plain, through the other node's underlay address.
    Via(IpAddr),
}

impl RemoteNode {
    /// Whether traffic to this node is encrypted, given the gateway's own cluster.
    pub fn is_encrypted(&self, local_cluster: &str) -> bool {
        self.encrypted || self.cluster != local_cluster
    }
}

impl GatewayState {
    /// Checks the state as a whole: unique names and keys, disjoint CIDRs, plain nodes
    /// routable.
    pub fn validate(&self) -> Result<(), StateError> {
        let mut names = BTreeSet::new();
        let mut keys: BTreeMap<PublicKey, &str> = BTreeMap::new();
        let mut cidrs: Vec<(IpNet, &str)> = Vec::new();
        for node in &self.nodes {
            if !names.insert(node.name.as_str()) {
                return Err(StateError::DuplicateName(node.name.clone()));
            }
            if let Some(first) = keys.insert(node.public_key, &node.name) {
                return Err(StateError::DuplicateKey {
                    key: node.public_key,
                    first: first.to_string(),
                    second: node.name.clone(),
                });
            }
            if node.pod_cidrs.is_empty() {
                return Err(StateError::NoPodCidrs(node.name.clone()));
            }
            if !node.is_encrypted(&self.cluster) && node.node_ip.is_none() {
                return Err(StateError::PlainWithoutNodeIp(node.name.clone()));
            }
            for cidr in &node.pod_cidrs {
                if cidr.trunc() != *cidr {
                    return Err(StateError::NonCanonicalCidr {
                        node: node.name.clone(),
                        cidr: *cidr,
                    });
                }
                if let Some((other, other_node)) = cidrs.iter().find(|(c, _)| overlaps(c, cidr)) {
                    return Err(StateError::OverlappingCidrs {
                        a: *cidr,
                        a_node: node.name.clone(),
                        b: *other,
                        b_node: other_node.to_string(),
                    });
                }
                cidrs.push((*cidr, &node.name));
            }
        }
        Ok(())
    }

    /// What the gateway applies for this state.
    pub fn plan(&self) -> GatewayPlan {
        GatewayPlan {
            revision: self.revision,
            peers: self.tunnel_peers(),
            routes: self.pod_routes(),
        }
    }

    /// Every node is a peer, also one this gateway sends to in plain: while encryption is
    /// switched, the two ends of a pair switch at different moments, and the end still (or
    /// already) encrypting must find a peer here to decrypt its packets. Whether this node
    /// encrypts is decided by the routes alone ([`Self::pod_routes`]); a peer nobody routes to
    /// sends nothing.
    pub fn tunnel_peers(&self) -> Vec<TunnelPeer> {
        self.nodes
            .iter()
            .map(|node| TunnelPeer {
                name: node.name.clone(),
                public_key: node.public_key,
                endpoint: node.endpoint,
                allowed_ips: node.pod_cidrs.clone(),
                persistent_keepalive: node.persistent_keepalive,
                preshared_key: None,
            })
            .collect()
    }

    /// How each pod CIDR is routed.
    pub fn pod_routes(&self) -> BTreeMap<IpNet, PodRoute> {
        let mut routes = BTreeMap::new();
        for node in &self.nodes {
            let route = match (node.is_encrypted(&self.cluster), node.node_ip) {
                (false, Some(ip)) => PodRoute::Via(ip),
                // Validation refuses plain without a node IP; fail closed if it slipped by.
                _ => PodRoute::Tunnel,
            };
            for cidr in &node.pod_cidrs {
                routes.insert(*cidr, route);
            }
        }
        routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn node(name: &str, cluster: &str, n: u8, cidr: &str, encrypted: bool) -> RemoteNode {
        RemoteNode {
            name: name.into(),
            cluster: cluster.into(),
            public_key: key(n),
            endpoint: Some(format!("198.18.0.{n}:51820").parse().unwrap()),
            node_ip: Some(format!("198.18.0.{n}").parse().unwrap()),
            pod_cidrs: vec![cidr.parse().unwrap()],
            encrypted,
            persistent_keepalive: None,
        }
    }

    fn state(nodes: Vec<RemoteNode>) -> GatewayState {
        GatewayState {
            revision: 1,
            cluster: "a".into(),
            nodes,
        }
    }

    #[test]
    fn parses_the_documented_json_with_defaults() {
        let json = r#"{
            "cluster": "a",
            "nodes": [{
                "name": "b/node1",
                "cluster": "b",
                "public_key": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
                "endpoint": "198.18.0.7:51820",
                "pod_cidrs": ["10.20.1.0/24", "fd20:0:0:1::/64"]
            }]
        }"#;
        let parsed: GatewayState = serde_json::from_str(json).unwrap();
        parsed.validate().unwrap();
        assert_eq!(parsed.nodes[0].public_key, key(7));
        assert!(parsed.nodes[0].encrypted, "encryption defaults to on");
        assert_eq!(parsed.tunnel_peers()[0].allowed_ips.len(), 2);
        assert!(serde_json::from_str::<GatewayState>(r#"{"cluster":"a","bogus":1}"#).is_err());
    }

    #[test]
    fn plain_only_inside_the_cluster() {
        let s = state(vec![
            node("a/n2", "a", 2, "10.1.2.0/24", false),
            node("b/n1", "b", 3, "10.2.1.0/24", false),
        ]);
        s.validate().unwrap();
        let routes = s.pod_routes();
        assert_eq!(
            routes[&"10.1.2.0/24".parse().unwrap()],
            PodRoute::Via("198.18.0.2".parse().unwrap())
        );
        assert_eq!(routes[&"10.2.1.0/24".parse().unwrap()], PodRoute::Tunnel);
        let peers: Vec<_> = s.tunnel_peers().into_iter().map(|p| p.name).collect();
        assert_eq!(
            peers,
            ["a/n2", "b/n1"],
            "the plain node stays a peer, so its packets still decrypt while it switches"
        );
    }

    #[test]
    fn refuses_inconsistent_states() {
        let dup_name = state(vec![
            node("x", "a", 1, "10.1.1.0/24", true),
            node("x", "a", 2, "10.1.2.0/24", true),
        ]);
        assert!(matches!(
            dup_name.validate(),
            Err(StateError::DuplicateName(_))
        ));
        let dup_key = state(vec![
            node("x", "a", 1, "10.1.1.0/24", true),
            node("y", "a", 1, "10.1.2.0/24", true),
        ]);
        assert!(matches!(
            dup_key.validate(),
            Err(StateError::DuplicateKey { .. })
        ));
        let overlap = state(vec![
            node("x", "a", 1, "10.1.0.0/16", true),
            node("y", "a", 2, "10.1.2.0/24", true),
        ]);
        assert!(matches!(
            overlap.validate(),
            Err(StateError::OverlappingCidrs { .. })
        ));
        let mut plain = node("x", "a", 1, "10.1.1.0/24", false);
        plain.node_ip = None;
        assert!(matches!(
            state(vec![plain]).validate(),
            Err(StateError::PlainWithoutNodeIp(_))
        ));
        assert!(matches!(
            state(vec![node("x", "a", 1, "10.1.1.1/24", true)]).validate(),
            Err(StateError::NonCanonicalCidr { .. })
        ));
    }
}
