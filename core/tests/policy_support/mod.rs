//! Meshes for the policy tests: clusters, namespaces and pods with labels and named ports,
//! policies per cluster; every node's compiled ruleset; and the path a connection takes
//! through them (the source node's egress, then the destination node's ingress).

#![allow(dead_code)] // each test file uses its part

use std::collections::BTreeMap;
use std::net::IpAddr;

use trellis_core::cluster::ClusterId;
use trellis_core::keyed::Keyed;
use trellis_core::policy::evaluate::{Connection, Mesh};
use trellis_core::policy::interpret;
use trellis_core::policy::ruleset::Ruleset;
use trellis_core::policy::{
    Identity, IdentityKey, IdentityLabels, Labels, NamedPort, NetworkPolicy, PolicyEndpoint,
    PolicyInputs, compile,
};

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn cluster(id: &str) -> ClusterId {
    id.parse().unwrap()
}

/// A mesh under construction. Identities are numbered per cluster, one per label set.
#[derive(Debug, Clone, Default)]
pub struct MeshBuilder {
    pub clusters: Vec<ClusterId>,
    pub namespace_labels: BTreeMap<(ClusterId, String), Labels>,
    pub identities: BTreeMap<IdentityKey, Identity>,
    pub endpoints: BTreeMap<trellis_core::policy::EndpointKey, PolicyEndpoint>,
    pub policies: BTreeMap<ClusterId, Vec<NetworkPolicy>>,
}

impl MeshBuilder {
    pub fn new(clusters: &[&str]) -> Self {
        Self {
            clusters: clusters.iter().map(|c| cluster(c)).collect(),
            ..Self::default()
        }
    }

    pub fn namespace(&mut self, cluster_id: &str, name: &str, extra: &[(&str, &str)]) {
        let mut ns_labels = labels(extra);
        ns_labels.insert("kubernetes.io/metadata.name".into(), name.into());
        self.namespace_labels
            .insert((cluster(cluster_id), name.into()), ns_labels);
        self.refresh_identities();
    }

    fn identity_for(&mut self, cluster_id: &ClusterId, labels: IdentityLabels) -> u32 {
        if let Some(found) = self
            .identities
            .values()
            .find(|i| &i.key.cluster == cluster_id && i.labels == labels)
        {
            return found.key.number;
        }
        let number = self
            .identities
            .keys()
            .filter(|k| &k.cluster == cluster_id)
            .map(|k| k.number + 1)
            .max()
            .unwrap_or(1);
        let key = IdentityKey {
            cluster: cluster_id.clone(),
            number,
        };
        self.identities
            .insert(key.clone(), Identity { key, labels });
        number
    }

    #[allow(clippy::too_many_arguments)]
    pub fn pod(
        &mut self,
        cluster_id: &str,
        namespace: &str,
        name: &str,
        pod_labels: Labels,
        node: &str,
        addresses: &[&str],
        named_ports: Vec<NamedPort>,
    ) {
        let c = cluster(cluster_id);
        let identity_labels = IdentityLabels {
            namespace: namespace.into(),
            pod_labels,
            namespace_labels: self
                .namespace_labels
                .get(&(c.clone(), namespace.to_string()))
                .cloned()
                .unwrap_or_default(),
        };
        let identity = self.identity_for(&c, identity_labels);
        let endpoint = PolicyEndpoint {
            cluster: c,
            namespace: namespace.into(),
            name: name.into(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            node: node.into(),
            identity,
            named_ports,
        };
        self.endpoints.insert(endpoint.key(), endpoint);
    }

    /// Relabels a pod (a new identity, as the controller would give it).
    pub fn relabel_pod(&mut self, cluster_id: &str, namespace: &str, name: &str, new: Labels) {
        let key = trellis_core::policy::EndpointKey {
            cluster: cluster(cluster_id),
            namespace: namespace.into(),
            name: name.into(),
        };
        let mut endpoint = self.endpoints[&key].clone();
        let mut identity_labels = self.identities[&endpoint.identity_key()].labels.clone();
        identity_labels.pod_labels = new;
        endpoint.identity = self.identity_for(&key.cluster, identity_labels);
        self.endpoints.insert(key, endpoint);
        self.drop_unused_identities();
    }

    /// Relabels a namespace: its pods move to identities with the new namespace labels.
    pub fn relabel_namespace(&mut self, cluster_id: &str, name: &str, extra: &[(&str, &str)]) {
        self.namespace(cluster_id, name, extra);
    }

    fn refresh_identities(&mut self) {
        let endpoints: Vec<_> = self.endpoints.values().cloned().collect();
        for mut endpoint in endpoints {
            let mut identity_labels = self.identities[&endpoint.identity_key()].labels.clone();
            identity_labels.namespace_labels = self
                .namespace_labels
                .get(&(endpoint.cluster.clone(), endpoint.namespace.clone()))
                .cloned()
                .unwrap_or_default();
            endpoint.identity = self.identity_for(&endpoint.cluster, identity_labels);
            self.endpoints.insert(endpoint.key(), endpoint);
        }
        self.drop_unused_identities();
    }

    fn drop_unused_identities(&mut self) {
        let used: std::collections::BTreeSet<IdentityKey> =
            self.endpoints.values().map(|e| e.identity_key()).collect();
        self.identities.retain(|k, _| used.contains(k));
    }

    pub fn policy(&mut self, cluster_id: &str, policy: NetworkPolicy) {
        let list = self.policies.entry(cluster(cluster_id)).or_default();
        list.retain(|p| p.key() != policy.key());
        list.push(policy);
    }

    pub fn clear_policies(&mut self) {
        self.policies.clear();
    }

    /// One [`PolicyInputs`] per cluster.
    pub fn inputs(&self) -> Vec<PolicyInputs> {
        self.clusters
            .iter()
            .map(|c| {
                let mut inputs = PolicyInputs::new(c.clone());
                inputs.identities = self.identities.clone();
                inputs.endpoints = self.endpoints.clone();
                for policy in self.policies.get(c).into_iter().flatten() {
                    inputs.policies.insert(policy.key(), policy.clone());
                }
                inputs
            })
            .collect()
    }
}

/// Every node's ruleset, by (cluster, node).
pub fn compile_all(mesh: &[PolicyInputs]) -> BTreeMap<(ClusterId, String), Ruleset> {
    let mut out = BTreeMap::new();
    for inputs in mesh {
        let nodes: std::collections::BTreeSet<&String> = inputs
            .endpoints
            .values()
            .filter(|e| e.cluster == inputs.cluster)
            .map(|e| &e.node)
            .collect();
        for node in nodes {
            out.insert(
                (inputs.cluster.clone(), node.clone()),
                compile(inputs, node),
            );
        }
    }
    out
}

fn node_of(mesh: &[PolicyInputs], address: IpAddr) -> Option<(ClusterId, String)> {
    mesh.first()?
        .endpoints
        .values()
        .find(|e| e.addresses.contains(&address))
        .map(|e| (e.cluster.clone(), e.node.clone()))
}

/// Whether the compiled rulesets let `connection` through: the source pod's node's egress,
/// then the destination pod's node's ingress (an end that is not a pod is not filtered).
pub fn compiled_allows(
    mesh: &[PolicyInputs],
    rulesets: &BTreeMap<(ClusterId, String), Ruleset>,
    connection: &Connection,
) -> bool {
    let pass = |address: IpAddr, egress: bool| match node_of(mesh, address) {
        None => true,
        Some(node) => {
            let ruleset = &rulesets[&node];
            let outcome = if egress {
                interpret::egress(ruleset, connection)
            } else {
                interpret::ingress(ruleset, connection)
            };
            outcome.expect("a consistent ruleset").passes()
        }
    };
    pass(connection.source, true) && pass(connection.destination, false)
}

pub fn evaluator_allows(mesh: &[PolicyInputs], connection: &Connection) -> bool {
    Mesh::new(mesh).decide(connection).allowed()
}
