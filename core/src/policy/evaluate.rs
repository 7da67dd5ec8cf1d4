//! The reference evaluator: whether the mesh's policies allow one connection, decided straight
//! from the `networking.k8s.io/v1` semantics (and Trellis's cluster rule), independently of the
//! compiler, so tests can hold compiled rulesets (and probes in the lab) against it.
//!
//! Egress is decided by the policies of the source pod's cluster (when the source is a pod),
//! ingress by those of the destination pod's cluster (when the destination is a pod); the
//! connection is allowed when both directions allow it.

use std::net::IpAddr;

use super::model::{
    CLUSTER_LABEL, IdentityLabels, LabelSelector, NetworkPolicy, PolicyEndpoint, PolicyInputs,
    PolicyKey, PolicyPeer, PolicyPort, PolicyRule, PortSpec,
};
use super::ruleset::Direction;
use crate::cluster::{ClusterId, Protocol};

/// A connection's first packet as policy sees it. `protocol` `None` is any other protocol
/// (ICMP, …), which only rules without ports allow; `port` is then ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Connection {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: Option<Protocol>,
    pub port: u16,
}

/// One direction's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectionVerdict {
    /// The end is not a pod of a cluster with policies, or no policy selects it in this
    /// direction.
    NotIsolated,
    /// These rules (policy, rule index) allow it.
    Allowed { by: Vec<(PolicyKey, usize)> },
    /// These policies isolate the pod and none of their rules allows it.
    Denied { isolated_by: Vec<PolicyKey> },
}

impl DirectionVerdict {
    pub fn allows(&self) -> bool {
        !matches!(self, DirectionVerdict::Denied { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// The mesh as policy sees it: one [`PolicyInputs`] per cluster (each with its cluster's
/// policies and the mesh's identities and pods as that cluster knows them).
#[derive(Debug, Clone, Copy)]
pub struct Mesh<'a> {
    pub clusters: &'a [PolicyInputs],
}

impl<'a> Mesh<'a> {
    pub fn new(clusters: &'a [PolicyInputs]) -> Self {
        Self { clusters }
    }

    /// Decides `connection`.
    pub fn decide(&self, connection: &Connection) -> Decision {
        Decision {
            egress: self.direction(connection, Direction::Egress),
            ingress: self.direction(connection, Direction::Ingress),
        }
    }

    fn direction(&self, connection: &Connection, direction: Direction) -> DirectionVerdict {
        let (own, peer) = match direction {
            Direction::Egress => (connection.source, connection.destination),
            Direction::Ingress => (connection.destination, connection.source),
        };
        // The pod at our end, and the policies of its cluster.
        let Some((view, pod)) = self.clusters.iter().find_map(|inputs| {
            pod_at(inputs, own)
                .filter(|pod| pod.cluster == inputs.cluster)
                .map(|pod| (inputs, pod))
        }) else {
            return DirectionVerdict::NotIsolated;
        };
        let Some(pod_labels) = labels_of(view, pod) else {
            return DirectionVerdict::NotIsolated;
        };
        let isolating: Vec<&NetworkPolicy> = view
            .policies
            .values()
            .filter(|policy| {
                rules_in(policy, direction).is_some()
                    && policy.namespace == pod_labels.namespace
                    && policy
                        .pod_selector
                        .matches_with(|k| pod_label(pod_labels, &pod.cluster, k))
            })
            .collect();
        if isolating.is_empty() {
            return DirectionVerdict::NotIsolated;
        }
        let peer_pod = pod_at(view, peer);
        // Named ports are resolved on the destination pod.
        let destination_pod = match direction {
            Direction::Egress => peer_pod,
            Direction::Ingress => Some(pod),
        };
        let mut by = Vec::new();
        for policy in &isolating {
            let rules = rules_in(policy, direction).expect("filtered above");
            for (index, rule) in rules.iter().enumerate() {
                if peer_allowed(view, policy, rule, peer, peer_pod)
                    && port_allowed(rule, connection, destination_pod)
                {
                    by.push((policy.key(), index));
                }
            }
        }
        if by.is_empty() {
            DirectionVerdict::Denied {
                isolated_by: isolating.iter().map(|p| p.key()).collect(),
            }
        } else {
            DirectionVerdict::Allowed { by }
        }
    }
}

fn rules_in(policy: &NetworkPolicy, direction: Direction) -> Option<&Vec<PolicyRule>> {
    match direction {
        Direction::Ingress => policy.ingress.as_ref(),
        Direction::Egress => policy.egress.as_ref(),
    }
}

fn pod_at(inputs: &PolicyInputs, address: IpAddr) -> Option<&PolicyEndpoint> {
    inputs
        .endpoints
        .values()
        .find(|e| e.addresses.contains(&address))
}

fn labels_of<'a>(inputs: &'a PolicyInputs, pod: &PolicyEndpoint) -> Option<&'a IdentityLabels> {
    inputs
        .identities
        .get(&pod.identity_key())
        .map(|identity| &identity.labels)
}

fn pod_label<'a>(labels: &'a IdentityLabels, cluster: &'a ClusterId, key: &str) -> Option<&'a str> {
    if key == CLUSTER_LABEL {
        Some(cluster.as_str())
    } else {
        labels.pod_labels.get(key).map(String::as_str)
    }
}

fn namespace_label<'a>(
    labels: &'a IdentityLabels,
    cluster: &'a ClusterId,
    key: &str,
) -> Option<&'a str> {
    if key == CLUSTER_LABEL {
        Some(cluster.as_str())
    } else {
        labels.namespace_labels.get(key).map(String::as_str)
    }
}

/// Whether the peer (address `peer`, the pod `peer_pod` if it is one) is among the rule's.
fn peer_allowed(
    view: &PolicyInputs,
    policy: &NetworkPolicy,
    rule: &PolicyRule,
    peer: IpAddr,
    peer_pod: Option<&PolicyEndpoint>,
) -> bool {
    if rule.peers.is_empty() {
        return true;
    }
    rule.peers.iter().any(|p| match p {
        PolicyPeer::IpBlock { cidr, except } => {
            cidr.contains(&peer) && !except.iter().any(|e| e.contains(&peer))
        }
        PolicyPeer::Pods {
            namespace_selector,
            pod_selector,
        } => peer_pod.is_some_and(|pod| {
            pods_peer_matches(
                view,
                policy,
                namespace_selector.as_ref(),
                pod_selector.as_ref(),
                pod,
            )
        }),
    })
}

fn pods_peer_matches(
    view: &PolicyInputs,
    policy: &NetworkPolicy,
    namespace_selector: Option<&LabelSelector>,
    pod_selector: Option<&LabelSelector>,
    pod: &PolicyEndpoint,
) -> bool {
    let Some(labels) = labels_of(view, pod) else {
        return false;
    };
    let cluster = &pod.cluster;
    let reaches_other_clusters = [namespace_selector, pod_selector]
        .into_iter()
        .flatten()
        .any(|s| s.mentions(CLUSTER_LABEL));
    if !reaches_other_clusters && *cluster != view.cluster {
        return false;
    }
    let in_namespace = match namespace_selector {
        None => labels.namespace == policy.namespace,
        Some(selector) => selector.matches_with(|k| namespace_label(labels, cluster, k)),
    };
    let pod_matches = match pod_selector {
        None => true,
        Some(selector) => selector.matches_with(|k| pod_label(labels, cluster, k)),
    };
    in_namespace && pod_matches
}

fn port_allowed(
    rule: &PolicyRule,
    connection: &Connection,
    destination_pod: Option<&PolicyEndpoint>,
) -> bool {
    if rule.ports.is_empty() {
        return true;
    }
    let Some(protocol) = connection.protocol else {
        return false;
    };
    rule.ports
        .iter()
        .any(|p| one_port_allows(p, protocol, connection.port, destination_pod))
}

fn one_port_allows(
    port: &PolicyPort,
    protocol: Protocol,
    number: u16,
    destination_pod: Option<&PolicyEndpoint>,
) -> bool {
    if port.protocol != protocol {
        return false;
    }
    match &port.port {
        None => true,
        Some(PortSpec::Number(first)) => match port.end_port {
            Some(last) => (*first..=last).contains(&number),
            None => number == *first,
        },
        Some(PortSpec::Name(name)) => destination_pod.is_some_and(|pod| {
            pod.named_ports
                .iter()
                .any(|n| n.name == *name && n.protocol == protocol && n.port == number)
        }),
    }
}
