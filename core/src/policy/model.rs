//! NetworkPolicy as the rest of Trellis sees it: `networking.k8s.io/v1` normalised (defaults
//! applied, `policyTypes` folded into which directions exist), the identities controllers
//! share (a pod's label set and its namespace's, numbered per cluster) and the pod addresses
//! mapped to them. What a node needs to enforce policy is one [`PolicyInputs`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, Protocol};
use crate::keyed::{Keyed, KeyedDelta, keyed_seq};

/// The label implicitly on every pod and namespace: its cluster's ID. A selector that does not
/// name it matches its own cluster only; `trellis.dev/cluster: c2` (or `Exists`) reaches
/// other clusters, as Cilium's `io.cilium.k8s.policy.cluster` does.
pub const CLUSTER_LABEL: &str = "trellis.dev/cluster";

/// The label the API server puts on every namespace: its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A Kubernetes label selector; the empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: Labels,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
}

/// A policy's name in its cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A `networking.k8s.io/v1` NetworkPolicy, normalised: `ingress`/`egress` are `None` when the
/// direction is not among the policy's types (so it does not isolate that direction), and
/// `Some(rules)` when it is (`Some(vec![])` denies every connection in that direction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    /// Which pods of `namespace` (in the policy's own cluster) the policy applies to.
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<PolicyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<PolicyRule>>,
}

impl NetworkPolicy {
    pub fn key(&self) -> PolicyKey {
        PolicyKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// One ingress (`from`) or egress (`to`) rule: a connection is allowed when its peer matches
/// any of `peers` (every peer when empty) and its port any of `ports` (every port when empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PolicyPeer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
}

/// A `NetworkPolicyPeer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PolicyPeer {
    /// Pods: `pod_selector` alone selects in the policy's namespace, `namespace_selector`
    /// alone every pod of the selected namespaces, both together the selected pods of the
    /// selected namespaces (AND). At least one is `Some`.
    Pods {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace_selector: Option<LabelSelector>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod_selector: Option<LabelSelector>,
    },
    /// Addresses in `cidr` but in none of `except`.
    IpBlock {
        cidr: IpNet,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        except: Vec<IpNet>,
    },
}

/// A port by number or by name (resolved on the destination pod's container ports).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    Number(u16),
    Name(String),
}

/// A `NetworkPolicyPort`: `port` `None` means every port of `protocol`; `end_port` makes a
/// numbered port a range (inclusive).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyPort {
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
}

/// An identity: the number a cluster gives one label set, unique in the mesh with the
/// cluster's ID (no coordination between clusters needed).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdentityKey {
    pub cluster: ClusterId,
    pub number: u32,
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.cluster, self.number)
    }
}

/// What selectors see of a pod: its namespace, its labels and its namespace's labels (the
/// cluster label is implied by the identity's cluster). Pods with equal label sets share one
/// identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdentityLabels {
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: Labels,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_labels: Labels,
}

/// An identity with its labels (the wire form of the identity table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub key: IdentityKey,
    pub labels: IdentityLabels,
}

impl Keyed for Identity {
    type Key = IdentityKey;
    fn key(&self) -> IdentityKey {
        self.key.clone()
    }
}

/// A container port with a name, which rules may name instead of a number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
}

/// A pod's name in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointKey {
    pub cluster: ClusterId,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

/// A pod with an address, as policy needs it: where it runs, which identity it has, which
/// ports it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEndpoint {
    pub cluster: ClusterId,
    pub namespace: String,
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// The node it runs on (in its cluster).
    pub node: String,
    /// Its identity's number in `cluster`.
    pub identity: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPort>,
}

impl PolicyEndpoint {
    pub fn identity_key(&self) -> IdentityKey {
        IdentityKey {
            cluster: self.cluster.clone(),
            number: self.identity,
        }
    }
}

impl Keyed for PolicyEndpoint {
    type Key = EndpointKey;
    fn key(&self) -> EndpointKey {
        EndpointKey {
            cluster: self.cluster.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl Keyed for NetworkPolicy {
    type Key = PolicyKey;
    fn key(&self) -> PolicyKey {
        NetworkPolicy::key(self)
    }
}

/// Everything a node needs to enforce policy for its pods: its cluster's policies, every
/// identity and every pod address of the mesh (local and admitted peer clusters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInputs {
    /// The node's cluster: the policies' cluster, and the one selectors match by default.
    pub cluster: ClusterId,
    #[serde(default, with = "keyed_seq")]
    pub policies: BTreeMap<PolicyKey, NetworkPolicy>,
    #[serde(default, with = "keyed_seq")]
    pub identities: BTreeMap<IdentityKey, Identity>,
    #[serde(default, with = "keyed_seq")]
    pub endpoints: BTreeMap<EndpointKey, PolicyEndpoint>,
}

/// The changes from one [`PolicyInputs`] to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDelta {
    #[serde(default, skip_serializing_if = "KeyedDelta::is_empty")]
    pub policies: KeyedDelta<NetworkPolicy>,
    #[serde(default, skip_serializing_if = "KeyedDelta::is_empty")]
    pub identities: KeyedDelta<Identity>,
    #[serde(default, skip_serializing_if = "KeyedDelta::is_empty")]
    pub endpoints: KeyedDelta<PolicyEndpoint>,
}

impl PolicyDelta {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.identities.is_empty() && self.endpoints.is_empty()
    }
}

impl PolicyInputs {
    pub fn new(cluster: ClusterId) -> Self {
        Self {
            cluster,
            policies: BTreeMap::new(),
            identities: BTreeMap::new(),
            endpoints: BTreeMap::new(),
        }
    }

    /// What turns `self` into `new`; `None` when the clusters differ (send `new` whole).
    pub fn delta_to(&self, new: &PolicyInputs) -> Option<PolicyDelta> {
        (self.cluster == new.cluster).then(|| PolicyDelta {
            policies: KeyedDelta::between(&self.policies, &new.policies),
            identities: KeyedDelta::between(&self.identities, &new.identities),
            endpoints: KeyedDelta::between(&self.endpoints, &new.endpoints),
        })
    }

    pub fn apply(&mut self, delta: &PolicyDelta) {
        delta.policies.apply_to(&mut self.policies);
        delta.identities.apply_to(&mut self.identities);
        delta.endpoints.apply_to(&mut self.endpoints);
    }

    /// SHA-256 (hex) of the canonical JSON: equal inputs, equal digests, in any process built
    /// from this code (maps are ordered, so the JSON is canonical).
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).expect("policy inputs always serialise");
        crate::sha256_hex(&json)
    }

    /// The pods of `node` in this cluster.
    pub fn local_endpoints<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a PolicyEndpoint> {
        self.endpoints
            .values()
            .filter(move |e| e.cluster == self.cluster && e.node == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str, identity: u32) -> PolicyEndpoint {
        PolicyEndpoint {
            cluster: "c1".parse().unwrap(),
            namespace: "x".into(),
            name: name.into(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            node: "n1".into(),
            identity,
            named_ports: vec![],
        }
    }

    #[test]
    fn a_delta_carries_only_what_changed_and_applies_back() {
        let mut old = PolicyInputs::new("c1".parse().unwrap());
        for (name, id) in [("a", 1), ("b", 2), ("c", 3)] {
            let e = endpoint(name, id);
            old.endpoints.insert(e.key(), e);
        }
        let mut new = old.clone();
        let changed = endpoint("b", 7);
        new.endpoints.insert(changed.key(), changed.clone());
        new.endpoints.remove(&endpoint("c", 3).key());

        let delta = old.delta_to(&new).unwrap();
        assert_eq!(delta.endpoints.upsert, vec![changed]);
        assert_eq!(delta.endpoints.remove, vec![endpoint("c", 3).key()]);
        assert!(delta.policies.is_empty() && delta.identities.is_empty());

        let mut replica = old.clone();
        replica.apply(&delta);
        assert_eq!(replica, new);
        assert!(new.delta_to(&new).unwrap().is_empty());
    }

    #[test]
    fn inputs_round_trip_through_json() {
        let mut inputs = PolicyInputs::new("c1".parse().unwrap());
        let e = endpoint("a", 1);
        inputs.endpoints.insert(e.key(), e);
        let json = serde_json::to_string(&inputs).unwrap();
        assert_eq!(serde_json::from_str::<PolicyInputs>(&json).unwrap(), inputs);
    }
}
