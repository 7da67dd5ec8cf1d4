//! Who an address is, as far as this node was told: the mesh's pods (from the policy inputs:
//! identities with labels, every pod endpoint with its addresses and node), the mesh's nodes
//! (the peers' endpoints and next hops), the pod ranges behind each WireGuard peer, and which
//! of those ranges go into the tunnel. Built whole from a plan and the policy inputs, then
//! only read: the enricher names both ends of a kernel event with one hash lookup each.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use trellis_core::flow::{Endpoint, EndpointKind, Tunnel};
use trellis_core::gateway::{GatewayPlan, PodRoute};
use trellis_core::policy::PolicyInputs;

use super::enrich::PolicyCache;

/// This node, as it was told at start (`--cluster-id` or its certificate, `--node-name`,
/// the address it advertises); the policy inputs' cluster wins when there are inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub cluster: Option<String>,
    pub node: Option<String>,
    /// The node's own addresses (named as the node).
    pub addresses: Vec<IpAddr>,
}

/// How traffic to an address leaves this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Routed into the WireGuard tunnel (rather than plainly, or not through the mesh).
    pub encrypted: bool,
    /// The peer whose allowed IPs hold the address, when it goes into the tunnel.
    pub tunnel: Option<Tunnel>,
}

impl Path {
    const PLAIN: Path = Path {
        encrypted: false,
        tunnel: None,
    };
}

/// What the directory knows of one address.
#[derive(Debug, Clone)]
pub struct Known {
    pub endpoint: Arc<Endpoint>,
    /// A pod of this node.
    pub local: bool,
    /// Reached through a peer of the mesh (a remote pod range or node).
    pub remote: bool,
    pub path: Arc<Path>,
}

/// Prefixes looked up by longest match: one hash lookup per distinct prefix length.
#[derive(Debug, Clone)]
struct PrefixMap<T> {
    /// Distinct lengths per family, longest first.
    lengths_v4: Vec<u8>,
    lengths_v6: Vec<u8>,
    entries: HashMap<IpNet, T>,
}

impl<T> Default for PrefixMap<T> {
    fn default() -> Self {
        Self {
            lengths_v4: Vec::new(),
            lengths_v6: Vec::new(),
            entries: HashMap::new(),
        }
    }
}

impl<T> PrefixMap<T> {
    fn insert(&mut self, prefix: IpNet, value: T) {
        let prefix = prefix.trunc();
        let lengths = match prefix {
            IpNet::V4(_) => &mut self.lengths_v4,
            IpNet::V6(_) => &mut self.lengths_v6,
        };
        if !lengths.contains(&prefix.prefix_len()) {
            lengths.push(prefix.prefix_len());
            lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.entries.insert(prefix, value);
    }

    fn longest_match(&self, address: IpAddr) -> Option<&T> {
        let lengths = match address {
            IpAddr::V4(_) => &self.lengths_v4,
            IpAddr::V6(_) => &self.lengths_v6,
        };
        lengths.iter().find_map(|len| {
            let prefix = IpNet::new(address, *len).ok()?.trunc();
            self.entries.get(&prefix)
        })
    }
}

/// One pod range behind a peer.
#[derive(Debug, Clone)]
struct Range {
    /// The range's addresses that are no known pod: named by the peer's cluster and node.
    endpoint: Arc<Endpoint>,
    path: Arc<Path>,
}

/// Address → who it is, which pods are local, and how each address is reached.
#[derive(Debug)]
pub struct Directory {
    cluster: Option<String>,
    node: Option<String>,
    /// `<cluster>/<node>`: every flow's `node_name`.
    node_name: String,
    addresses: HashMap<IpAddr, Known>,
    ranges: PrefixMap<Range>,
    /// Pods of this node are known (policy inputs given); otherwise the local end of a flow
    /// is the one not reached through the mesh.
    knows_local_pods: bool,
    world: Known,
    own_pod_range: Known,
    /// What it was built from, to rebuild only when that changes.
    plan: GatewayPlan,
    inputs: Option<Arc<PolicyInputs>>,
    pub(crate) policy_cache: Mutex<PolicyCache>,
}

fn split_peer_name(name: &str) -> (Option<String>, String) {
    match name.split_once('/') {
        Some((cluster, node)) => (Some(cluster.to_owned()), node.to_owned()),
        None => (None, name.to_owned()),
    }
}

fn node_endpoint(cluster: Option<String>, node: Option<String>) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        kind: EndpointKind::Node,
        cluster,
        node_name: node,
        ..Endpoint::world()
    })
}

impl Directory {
    /// Builds the directory of `plan` and `inputs` for the node `identity`.
    pub fn build(
        identity: &NodeIdentity,
        plan: &GatewayPlan,
        inputs: Option<Arc<PolicyInputs>>,
    ) -> Self {
        let cluster = inputs
            .as_ref()
            .map(|i| i.cluster.as_str().to_owned())
            .or_else(|| identity.cluster.clone());
        let node = identity.node.clone();
        let node_name = format!(
            "{}/{}",
            cluster.as_deref().unwrap_or("unknown"),
            node.as_deref().unwrap_or("unknown")
        );
        let plain = Arc::new(Path::PLAIN);

        // The pod ranges behind each peer, and the path into them.
        let mut routes: PrefixMap<PodRoute> = PrefixMap::default();
        for (prefix, route) in &plan.routes {
            routes.insert(*prefix, *route);
        }
        let mut ranges = PrefixMap::default();
        let mut addresses: HashMap<IpAddr, Known> = HashMap::new();
        let mut via_addresses = Vec::new();
        for peer in &plan.peers {
            let (peer_cluster, peer_node) = split_peer_name(&peer.name);
            let endpoint = node_endpoint(peer_cluster.clone(), Some(peer_node.clone()));
            for prefix in &peer.allowed_ips {
                let route = routes.longest_match(prefix.network());
                let path = match route {
                    Some(PodRoute::Tunnel) => Arc::new(Path {
                        encrypted: true,
                        tunnel: Some(Tunnel {
                            peer_cluster: peer_cluster.clone().unwrap_or_default(),
                            peer_node: peer_node.clone(),
                        }),
                    }),
                    Some(PodRoute::Via(next_hop)) => {
                        via_addresses.push((*next_hop, endpoint.clone()));
                        plain.clone()
                    }
                    None => plain.clone(),
                };
                ranges.insert(
                    *prefix,
                    Range {
                        endpoint: endpoint.clone(),
                        path,
                    },
                );
            }
            if let Some(socket) = peer.endpoint {
                addresses.insert(
                    socket.ip(),
                    Known {
                        endpoint: endpoint.clone(),
                        local: false,
                        remote: true,
                        path: plain.clone(),
                    },
                );
            }
        }
        // A plain route's next hop is the node whose range it serves.
        for (address, endpoint) in via_addresses {
            addresses.entry(address).or_insert_with(|| Known {
                endpoint,
                local: false,
                remote: true,
                path: plain.clone(),
            });
        }
        let own = node_endpoint(cluster.clone(), node.clone());
        for address in &identity.addresses {
            addresses.insert(
                *address,
                Known {
                    endpoint: own.clone(),
                    local: false,
                    remote: false,
                    path: plain.clone(),
                },
            );
        }

        // Every pod of the mesh, named by its identity.
        if let Some(inputs) = &inputs {
            let mut shared_labels: HashMap<(String, u32), Arc<BTreeMap<String, String>>> =
                HashMap::new();
            for pod in inputs.endpoints.values() {
                let labels = shared_labels
                    .entry((pod.cluster.as_str().to_owned(), pod.identity))
                    .or_insert_with(|| {
                        Arc::new(
                            inputs
                                .identities
                                .get(&pod.identity_key())
                                .map(|i| i.labels.pod_labels.clone())
                                .unwrap_or_default(),
                        )
                    });
                let local = pod.cluster == inputs.cluster && Some(&pod.node) == node.as_ref();
                let endpoint = Arc::new(Endpoint {
                    kind: EndpointKind::Pod,
                    cluster: Some(pod.cluster.as_str().to_owned()),
                    namespace: Some(pod.namespace.clone()),
                    pod_name: Some(pod.name.clone()),
                    node_name: Some(pod.node.clone()),
                    labels: (**labels).clone(),
                    identity: Some(pod.identity),
                });
                for address in &pod.addresses {
                    let range = ranges.longest_match(*address);
                    addresses.insert(
                        *address,
                        Known {
                            endpoint: endpoint.clone(),
                            local,
                            remote: !local && range.is_some(),
                            path: if local {
                                plain.clone()
                            } else {
                                range.map_or_else(|| plain.clone(), |r| r.path.clone())
                            },
                        },
                    );
                }
            }
        }
        Self {
            world: Known {
                endpoint: Arc::new(Endpoint::world()),
                local: false,
                remote: false,
                path: plain.clone(),
            },
            own_pod_range: Known {
                endpoint: own,
                local: true,
                remote: false,
                path: plain,
            },
            cluster,
            node,
            node_name,
            addresses,
            ranges,
            knows_local_pods: inputs.is_some(),
            plan: plan.clone(),
            inputs,
            policy_cache: Mutex::new(PolicyCache::default()),
        }
    }

    /// An empty directory for `identity` (before any plan): everything is the world.
    pub fn empty(identity: &NodeIdentity) -> Self {
        Self::build(identity, &GatewayPlan::default(), None)
    }

    /// Whether this directory was built from these (a resync re-applies the same state).
    pub fn built_from(&self, plan: &GatewayPlan, inputs: Option<&PolicyInputs>) -> bool {
        self.plan == *plan && self.inputs.as_deref() == inputs
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The policy inputs, when the node enforces policy.
    pub fn inputs(&self) -> Option<&PolicyInputs> {
        self.inputs.as_deref()
    }

    /// Whether the pods of this node are known by name (policy inputs given).
    pub fn knows_local_pods(&self) -> bool {
        self.knows_local_pods
    }

    /// Who `address` is: a known pod or node, an address in a peer's pod range (named by that
    /// node), or the world.
    pub fn lookup(&self, address: IpAddr) -> Known {
        if let Some(known) = self.addresses.get(&address) {
            return known.clone();
        }
        match self.ranges.longest_match(address) {
            Some(range) => Known {
                endpoint: range.endpoint.clone(),
                local: false,
                remote: true,
                path: range.path.clone(),
            },
            None => self.world.clone(),
        }
    }

    /// Who `address` is when it is taken as a pod of this node that the directory cannot
    /// name (no policy inputs): this node's pod range.
    pub(crate) fn unnamed_local(&self) -> Known {
        self.own_pod_range.clone()
    }

    /// The local pods' addresses (for tests and status).
    pub fn local_pods(&self) -> HashSet<IpAddr> {
        self.addresses
            .iter()
            .filter(|(_, k)| k.local)
            .map(|(a, _)| *a)
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use trellis_core::gateway::TunnelPeer;
    use trellis_core::policy::{
        EndpointKey, Identity, IdentityKey, IdentityLabels, PolicyEndpoint, PolicyInputs,
    };
    use trellis_core::wgkey::PublicKey;

    use super::*;

    pub(crate) fn identity() -> NodeIdentity {
        NodeIdentity {
            cluster: Some("c1".into()),
            node: Some("n1".into()),
            addresses: vec!["198.18.0.1".parse().unwrap()],
        }
    }

    /// c1/n2 behind a tunnel (10.1.2.0/24), c2/m1 behind a tunnel (10.2.1.0/24), c1/n3 plain
    /// via 198.18.0.3 (10.1.3.0/24); this node n1 has 10.1.1.0/24.
    pub(crate) fn plan() -> GatewayPlan {
        let peer = |name: &str, key: u8, endpoint: &str, range: &str| TunnelPeer {
            name: name.into(),
            public_key: PublicKey([key; 32]),
            endpoint: Some(endpoint.parse().unwrap()),
            allowed_ips: vec![range.parse().unwrap()],
            persistent_keepalive: None,
            preshared_key: None,
        };
        let mut routes = BTreeMap::new();
        routes.insert("10.1.2.0/24".parse().unwrap(), PodRoute::Tunnel);
        routes.insert("10.2.1.0/24".parse().unwrap(), PodRoute::Tunnel);
        routes.insert(
            "10.1.3.0/24".parse().unwrap(),
            PodRoute::Via("198.18.0.3".parse().unwrap()),
        );
        GatewayPlan {
            revision: 7,
            peers: vec![
                peer("c1/n2", 2, "198.18.0.2:51820", "10.1.2.0/24"),
                peer("c2/m1", 3, "198.18.9.1:51820", "10.2.1.0/24"),
                peer("c1/n3", 4, "198.18.0.3:51820", "10.1.3.0/24"),
            ],
            routes,
        }
    }

    fn pod(
        inputs: &mut PolicyInputs,
        cluster: &str,
        namespace: &str,
        name: &str,
        address: &str,
        node: &str,
        labels: &[(&str, &str)],
    ) {
        let identity = inputs.identities.len() as u32 + 1;
        let key = IdentityKey {
            cluster: cluster.parse().unwrap(),
            number: identity,
        };
        inputs.identities.insert(
            key.clone(),
            Identity {
                key,
                labels: IdentityLabels {
                    namespace: namespace.into(),
                    pod_labels: labels
                        .iter()
                        .map(|(k, v)| ((*k).into(), (*v).into()))
                        .collect(),
                    namespace_labels: BTreeMap::new(),
                },
            },
        );
        inputs.endpoints.insert(
            EndpointKey {
                cluster: cluster.parse().unwrap(),
                namespace: namespace.into(),
                name: name.into(),
            },
            PolicyEndpoint {
                cluster: cluster.parse().unwrap(),
                namespace: namespace.into(),
                name: name.into(),
                addresses: vec![address.parse().unwrap()],
                node: node.into(),
                identity,
                named_ports: vec![],
            },
        );
    }

    /// c1/x/client (10.1.1.5 on n1, local), c1/x/local-web (10.1.1.6 on n1, local),
    /// c1/y/web (10.1.2.7 on n2), c2/z/api (10.2.1.9 on c2's m1), c1/x/plain (10.1.3.4 on n3).
    pub(crate) fn inputs() -> PolicyInputs {
        let mut inputs = PolicyInputs::new("c1".parse().unwrap());
        pod(
            &mut inputs,
            "c1",
            "x",
            "client",
            "10.1.1.5",
            "n1",
            &[("app", "client")],
        );
        pod(
            &mut inputs,
            "c1",
            "x",
            "local-web",
            "10.1.1.6",
            "n1",
            &[("app", "web")],
        );
        pod(
            &mut inputs,
            "c1",
            "y",
            "web",
            "10.1.2.7",
            "n2",
            &[("app", "web")],
        );
        pod(
            &mut inputs,
            "c2",
            "z",
            "api",
            "10.2.1.9",
            "m1",
            &[("app", "api")],
        );
        pod(
            &mut inputs,
            "c1",
            "x",
            "plain",
            "10.1.3.4",
            "n3",
            &[("app", "plain")],
        );
        inputs
    }

    pub(crate) fn directory() -> Directory {
        Directory::build(&identity(), &plan(), Some(Arc::new(inputs())))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn pods_are_named_by_their_identity_and_local_ones_are_known() {
        let dir = directory();
        assert_eq!(dir.node_name(), "c1/n1");
        let client = dir.lookup(ip("10.1.1.5"));
        assert!(client.local && !client.remote);
        assert_eq!(client.endpoint.display_name(), "c1/x/client");
        assert_eq!(client.endpoint.labels["app"], "client");
        assert_eq!(client.endpoint.node_name.as_deref(), Some("n1"));
        assert_eq!(client.endpoint.identity, Some(1));
        assert_eq!(
            dir.local_pods(),
            [ip("10.1.1.5"), ip("10.1.1.6")].into_iter().collect()
        );
        let api = dir.lookup(ip("10.2.1.9"));
        assert_eq!(api.endpoint.display_name(), "c2/z/api");
        assert!(!api.local && api.remote);
    }

    #[test]
    fn the_path_says_whether_an_address_goes_into_the_tunnel_and_to_which_peer() {
        let dir = directory();
        let api = dir.lookup(ip("10.2.1.9"));
        assert_eq!(
            *api.path,
            Path {
                encrypted: true,
                tunnel: Some(Tunnel {
                    peer_cluster: "c2".into(),
                    peer_node: "m1".into()
                })
            }
        );
        let plain = dir.lookup(ip("10.1.3.4"));
        assert_eq!(plain.endpoint.display_name(), "c1/x/plain");
        assert_eq!(*plain.path, Path::PLAIN, "routed plainly via n3");
        assert!(!dir.lookup(ip("10.1.1.5")).path.encrypted, "local");
    }

    #[test]
    fn nodes_ranges_and_the_world() {
        let dir = directory();
        let n2 = dir.lookup(ip("198.18.0.2"));
        assert_eq!(n2.endpoint.kind, EndpointKind::Node);
        assert_eq!(n2.endpoint.display_name(), "c1/n2");
        assert_eq!(
            dir.lookup(ip("198.18.0.1")).endpoint.display_name(),
            "c1/n1"
        );
        // A next hop of a plain route is its range's node.
        assert_eq!(
            dir.lookup(ip("198.18.0.3")).endpoint.display_name(),
            "c1/n3"
        );
        // In c2/m1's range but no known pod: named by its node, reached through its tunnel.
        let unknown = dir.lookup(ip("10.2.1.200"));
        assert_eq!(unknown.endpoint.kind, EndpointKind::Node);
        assert_eq!(unknown.endpoint.display_name(), "c2/m1");
        assert!(unknown.path.encrypted && unknown.remote);
        let world = dir.lookup(ip("1.1.1.1"));
        assert_eq!(world.endpoint.kind, EndpointKind::World);
        assert!(!world.local && !world.remote);
    }

    #[test]
    fn without_policy_inputs_the_plan_still_names_nodes_and_ranges() {
        let dir = Directory::build(&identity(), &plan(), None);
        assert!(!dir.knows_local_pods());
        assert!(dir.local_pods().is_empty());
        assert_eq!(dir.node_name(), "c1/n1");
        let far = dir.lookup(ip("10.2.1.9"));
        assert_eq!(far.endpoint.display_name(), "c2/m1");
        assert!(far.path.encrypted);
        assert_eq!(dir.unnamed_local().endpoint.display_name(), "c1/n1");
    }

    #[test]
    fn the_inputs_cluster_wins_and_rebuilding_is_skipped_when_nothing_changed() {
        let mut who = identity();
        who.cluster = None;
        let inputs = inputs();
        let dir = Directory::build(&who, &plan(), Some(Arc::new(inputs.clone())));
        assert_eq!(dir.cluster(), Some("c1"));
        assert!(dir.built_from(&plan(), Some(&inputs)));
        assert!(!dir.built_from(&plan(), None));
        let mut other = plan();
        other.revision += 1;
        assert!(!dir.built_from(&other, Some(&inputs)));
        assert_eq!(
            Directory::empty(&NodeIdentity::default()).node_name(),
            "unknown/unknown"
        );
    }

    #[test]
    fn longest_prefix_wins() {
        let mut map = PrefixMap::default();
        map.insert("10.0.0.0/8".parse().unwrap(), 8);
        map.insert("10.1.0.0/16".parse().unwrap(), 16);
        map.insert("fd00::/64".parse().unwrap(), 64);
        assert_eq!(map.longest_match(ip("10.1.2.3")), Some(&16));
        assert_eq!(map.longest_match(ip("10.2.2.3")), Some(&8));
        assert_eq!(map.longest_match(ip("11.0.0.1")), None);
        assert_eq!(map.longest_match(ip("fd00::5")), Some(&64));
    }
}
