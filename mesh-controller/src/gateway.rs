//! What each node's gateway is told, decided purely from the mesh view.
//!
//! The types are `trellis_core::agent`'s, shared with the gateway: a [`PeerSpec`] is
//! a WireGuard peer (public key, endpoint, allowed IPs, keepalive), a [`RouteSpec`] a route
//! into the tunnel or via another node, and `node_encryption` the cluster-wide mode.
//!
//! Rules:
//! * every node of every admitted remote cluster with a registered gateway is a peer, with its
//!   pod CIDRs as allowed IPs; the remote's service CIDRs go to its first such node (by name);
//! * the other nodes of the local cluster are peers in both modes (their pod CIDRs and own
//!   addresses as allowed IPs), so a switch of node encryption loses nothing while the two ends
//!   of a pair disagree; with it on their pod CIDRs are routed into the tunnel, with it off
//!   via their internal address;
//! * every remote pod and service CIDR is routed into the tunnel whether or not a peer for it is
//!   known yet, so traffic fails closed instead of leaking to the default route;
//! * an accepted external peer is a peer of the node that carries it (no endpoint: it dials
//!   in), its addresses routed into the tunnel there; the cluster's other nodes and the peer
//!   clusters reach them through that node, where the local state advertises them.

use trellis_core::cluster::ClusterState;
use trellis_core::external_peer::Admission;

pub use trellis_core::agent::{
    GatewayDesired, GatewayRegistration, GatewayUpdate, PeerSpec, RouteSpec, RouteVia,
};

/// How an external peer is named among a gateway's peers (`<cluster>/peer:<name>`): a node
/// name cannot hold `:`, so it never passes for a node.
pub fn external_peer_name(peer: &str) -> String {
    format!("peer:{peer}")
}

/// Remote clusters keep NAT mappings alive with this keepalive (seconds).
pub const REMOTE_KEEPALIVE: u16 = 25;

/// What a node of the local cluster may send through its tunnel: its pods, and its own
/// addresses, because a node forwards traffic it has source-NATed to itself (kube-proxy
/// masquerades clients from other clusters reaching a Service, as it does for NodePorts) to pods
/// on the other nodes, and with encryption on that traffic rides the tunnel.
fn local_peer_allowed_ips(node: &trellis_core::cluster::NodeState) -> Vec<ipnet::IpNet> {
    let mut allowed = node.pod_cidrs.clone();
    allowed.extend(node.internal_ips.iter().map(|ip| ipnet::IpNet::from(*ip)));
    allowed
}

/// The desired state of `node`'s gateway.
pub fn desired_for(
    node: &str,
    local: &ClusterState,
    remotes: &[&ClusterState],
    node_encryption: bool,
    external: &Admission,
    revision: u64,
) -> GatewayDesired {
    let mut peers = Vec::new();
    let mut routes = Vec::new();
    for (name, n) in &local.nodes {
        if name == node {
            continue;
        }
        // A peer in both modes: the two ends of a pair take a switch at different moments, and
        // the one already (or still) encrypting must find a peer at the other to decrypt. The
        // routes alone decide whether this node encrypts.
        if let Some(gw) = &n.gateway {
            peers.push(PeerSpec {
                cluster: local.id.clone(),
                node: name.clone(),
                public_key: gw.public_key,
                endpoint: Some(gw.endpoint),
                allowed_ips: local_peer_allowed_ips(n),
                persistent_keepalive: None,
                preshared_key: None,
            });
        }
        for cidr in &n.pod_cidrs {
            let via = if node_encryption {
                Some(RouteVia::Tunnel)
            } else {
                n.internal_ips
                    .iter()
                    .find(|ip| ip.is_ipv4() == cidr.addr().is_ipv4())
                    .map(|address| RouteVia::Node { address: *address })
            };
            if let Some(via) = via {
                routes.push(RouteSpec {
                    destination: *cidr,
                    via,
                });
            }
        }
    }
    for remote in remotes {
        let mut service_cidrs_placed = false;
        for (name, n) in &remote.nodes {
            if let Some(gw) = &n.gateway {
                let mut allowed = n.pod_cidrs.clone();
                if !service_cidrs_placed {
                    allowed.extend(remote.service_cidrs.iter().copied());
                    service_cidrs_placed = true;
                }
                peers.push(PeerSpec {
                    cluster: remote.id.clone(),
                    node: name.clone(),
                    public_key: gw.public_key,
                    endpoint: Some(gw.endpoint),
                    allowed_ips: allowed,
                    persistent_keepalive: Some(REMOTE_KEEPALIVE),
                    preshared_key: None,
                });
            }
        }
        for cidr in remote.cidrs() {
            routes.push(RouteSpec {
                destination: cidr,
                via: RouteVia::Tunnel,
            });
        }
    }
    for peer in external.on_node(node) {
        peers.push(PeerSpec {
            cluster: local.id.clone(),
            node: external_peer_name(&peer.name),
            public_key: peer.public_key,
            endpoint: None,
            allowed_ips: peer.allowed_ips.clone(),
            persistent_keepalive: peer.persistent_keepalive,
            preshared_key: peer.preshared_key,
        });
        for cidr in &peer.allowed_ips {
            routes.push(RouteSpec {
                destination: *cidr,
                via: RouteVia::Tunnel,
            });
        }
    }
    peers.sort();
    routes.sort();
    routes.dedup();
    GatewayDesired {
        revision,
        node: node.to_owned(),
        node_encryption,
        peers,
        routes,
        policy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::cluster::fixture::cluster;
    use trellis_core::cluster::{NodeGateway, NodeState, PublicKey};

    fn with_nodes(mut c: ClusterState, base: u8, n: u8) -> ClusterState {
        c.nodes.clear();
        for i in 0..n {
            let name = format!("node-{i}");
            c.nodes.insert(
                name.clone(),
                NodeState {
                    name,
                    pod_cidrs: vec![format!("10.{base}.{i}.0/24").parse().unwrap()],
                    internal_ips: vec![format!("192.168.{base}.{}", i + 10).parse().unwrap()],
                    gateway: Some(NodeGateway {
                        endpoint: format!("192.168.{base}.{}:51820", i + 10).parse().unwrap(),
                        public_key: PublicKey([base * 16 + i; 32]),
                    }),
                },
            );
        }
        c
    }

    #[test]
    fn every_node_is_a_peer_in_both_modes_and_the_mode_picks_the_routes() {
        let local = with_nodes(cluster("a", "10.1.0.0/24", "10.96.0.0/16"), 1, 3);
        let remote = with_nodes(cluster("b", "10.2.0.0/24", "10.97.0.0/16"), 2, 2);
        let off = desired_for(
            "node-0",
            &local,
            &[&remote],
            false,
            &Admission::default(),
            1,
        );
        let names = |d: &GatewayDesired| -> Vec<String> {
            d.peers
                .iter()
                .map(|p| format!("{}/{}", p.cluster, p.node))
                .collect()
        };
        // Local peers stay while encryption is off: the other end may not have switched yet.
        assert_eq!(
            names(&off),
            ["a/node-1", "a/node-2", "b/node-0", "b/node-1"]
        );
        let remotes: Vec<_> = off
            .peers
            .iter()
            .filter(|p| p.cluster.as_str() == "b")
            .collect();
        assert!(
            remotes
                .iter()
                .all(|p| p.persistent_keepalive == Some(REMOTE_KEEPALIVE))
        );
        assert!(
            off.peers
                .iter()
                .filter(|p| p.cluster.as_str() == "a")
                .all(|p| p.persistent_keepalive.is_none())
        );
        // The remote's service CIDR rides with its first node.
        assert!(
            remotes[0]
                .allowed_ips
                .contains(&"10.97.0.0/16".parse().unwrap())
        );
        assert!(
            !remotes[1]
                .allowed_ips
                .contains(&"10.97.0.0/16".parse().unwrap())
        );
        assert!(off.routes.contains(&RouteSpec {
            destination: "10.1.1.0/24".parse().unwrap(),
            via: RouteVia::Node {
                address: "192.168.1.11".parse().unwrap()
            },
        }));
        assert!(off.routes.contains(&RouteSpec {
            destination: "10.97.0.0/16".parse().unwrap(),
            via: RouteVia::Tunnel,
        }));
        // No route or peer for the node itself.
        assert!(
            !off.routes
                .iter()
                .any(|r| r.destination == "10.1.0.0/24".parse().unwrap())
        );

        let on = desired_for("node-0", &local, &[&remote], true, &Admission::default(), 2);
        assert_eq!(names(&on), names(&off));
        // A local peer may also send from its own address (source-NATed Service traffic).
        let node_1 = on.peers.iter().find(|p| p.node == "node-1").unwrap();
        assert_eq!(
            node_1.allowed_ips,
            vec![
                "10.1.1.0/24".parse().unwrap(),
                "192.168.1.11/32".parse().unwrap()
            ]
        );
        assert!(on.routes.iter().all(|r| r.via == RouteVia::Tunnel));

        // Toggling is a delta that a gateway can apply.
        let update = off.delta_to(&on).unwrap();
        let mut gw = off.clone();
        assert!(gw.apply(&update));
        assert_eq!(gw, on);
        assert!(on.delta_to(&on).is_none());
    }

    #[test]
    fn remote_cidrs_route_into_the_tunnel_even_without_a_known_peer() {
        let local = with_nodes(cluster("a", "10.1.0.0/24", "10.96.0.0/16"), 1, 1);
        let mut remote = with_nodes(cluster("b", "10.2.0.0/24", "10.97.0.0/16"), 2, 1);
        remote.nodes.get_mut("node-0").unwrap().gateway = None;
        let d = desired_for(
            "node-0",
            &local,
            &[&remote],
            false,
            &Admission::default(),
            1,
        );
        assert!(d.peers.is_empty());
        assert_eq!(d.routes.len(), 2);
        assert!(d.routes.iter().all(|r| r.via == RouteVia::Tunnel));
    }

    #[test]
    fn a_gateway_refuses_a_delta_that_does_not_follow() {
        let local = with_nodes(cluster("a", "10.1.0.0/24", "10.96.0.0/16"), 1, 2);
        let a = desired_for("node-0", &local, &[], false, &Admission::default(), 1);
        let b = desired_for("node-0", &local, &[], true, &Admission::default(), 2);
        let update = a.delta_to(&b).unwrap();
        let mut stale = desired_for("node-0", &local, &[], false, &Admission::default(), 0);
        assert!(!stale.apply(&update));
        let json = serde_json::to_string(&update).unwrap();
        assert!(json.contains("\"type\":\"delta\""));
    }

    #[test]
    fn an_external_peer_rides_its_node_and_the_others_route_to_that_node() {
        use trellis_core::external_peer::{Context, ExternalPeerSpec, admit};
        let mut local = with_nodes(cluster("a", "10.1.0.0/24", "10.96.0.0/16"), 1, 2);
        let remote = with_nodes(cluster("b", "10.2.0.0/24", "10.97.0.0/16"), 2, 1);
        let allowance: Vec<ipnet::IpNet> = vec!["10.1.0.0/16".parse().unwrap()];
        let admission = admit(
            &[ExternalPeerSpec {
                name: "laptop".into(),
                public_key: trellis_core::wgkey::encode_key(&[7; 32]),
                allowed_ips: vec!["10.1.200.1/32".into()],
                nodes: vec!["node-0".into()],
                persistent_keepalive: None,
                preshared_key: None,
                uid: None,
            }],
            &Context {
                local: &local,
                allowance: Some(&allowance),
                other_ranges: &[],
                other_keys: &Default::default(),
            },
        );
        admission.advertise(&mut local);
        let laptop: ipnet::IpNet = "10.1.200.1/32".parse().unwrap();

        let carrier = desired_for("node-0", &local, &[&remote], false, &admission, 1);
        let peer = carrier
            .peers
            .iter()
            .find(|p| p.node == external_peer_name("laptop"))
            .expect("the carrying node has the peer");
        assert_eq!(peer.endpoint, None, "it dials in");
        assert_eq!(peer.allowed_ips, vec![laptop]);
        assert!(carrier.routes.contains(&RouteSpec {
            destination: laptop,
            via: RouteVia::Tunnel
        }));
        assert_eq!(
            carrier
                .routes
                .iter()
                .filter(|r| r.destination == laptop)
                .count(),
            1
        );
        let plan = carrier.plan();
        assert!(
            plan.peers
                .iter()
                .any(|p| p.name == "a/peer:laptop" && p.endpoint.is_none())
        );

        // The other node: no such peer; the laptop's address goes to node-0, plain or not.
        let other = desired_for("node-1", &local, &[&remote], false, &admission, 1);
        assert!(
            other
                .peers
                .iter()
                .all(|p| p.public_key != PublicKey([7; 32]))
        );
        assert!(other.routes.contains(&RouteSpec {
            destination: laptop,
            via: RouteVia::Node {
                address: "192.168.1.10".parse().unwrap()
            }
        }));
        let on = desired_for("node-1", &local, &[&remote], true, &admission, 1);
        let node_0 = on.peers.iter().find(|p| p.node == "node-0").unwrap();
        assert!(
            node_0.allowed_ips.contains(&laptop),
            "node-0 may send from it"
        );
    }
}
