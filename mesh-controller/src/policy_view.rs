//! What nodes enforce NetworkPolicy from, and what status says of it, pure: the local
//! cluster's policies with every identity and pod of the mesh (local, and what admission
//! kept of each peer's).

use std::collections::BTreeMap;

use trellis_core::cluster::ClusterState;
use trellis_core::policy::{IdentityKey, NetworkPolicy, PolicyInputs, PolicyKey};
use trellis_core::status::{ControllerPolicyStatus, PolicyStatus};

/// The inputs every node of the local cluster is sent (the same for all of them).
pub fn policy_inputs<'a>(
    local: &ClusterState,
    remotes: impl IntoIterator<Item = &'a ClusterState>,
    policies: BTreeMap<PolicyKey, NetworkPolicy>,
) -> PolicyInputs {
    let mut inputs = PolicyInputs::new(local.id.clone());
    inputs.policies = policies;
    inputs.identities = local.identities.clone();
    inputs.endpoints = local.pods.clone();
    for remote in remotes {
        inputs.identities.extend(
            remote
                .identities
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        inputs
            .endpoints
            .extend(remote.pods.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    inputs
}

/// The policy section of the status document: the digest nodes report back when they
/// enforce these inputs, the counts, and each local policy with its types and how many local
/// pods its `podSelector` selects (counted per identity: pods alike match alike).
pub fn policy_status(
    inputs: &PolicyInputs,
    digest: &str,
    refused: Vec<String>,
) -> ControllerPolicyStatus {
    let mut pods_per_identity: BTreeMap<IdentityKey, usize> = BTreeMap::new();
    for endpoint in inputs.endpoints.values() {
        if endpoint.cluster == inputs.cluster {
            *pods_per_identity
                .entry(endpoint.identity_key())
                .or_insert(0) += 1;
        }
    }
    let policies = inputs
        .policies
        .values()
        .map(|policy| {
            let selected_pods = pods_per_identity
                .iter()
                .filter_map(|(key, n)| {
                    let identity = inputs.identities.get(key)?;
                    // The nodes' own test, the implicit cluster label included.
                    trellis_core::policy::plan::policy_selects(
                        policy,
                        &inputs.cluster,
                        &identity.key,
                        &identity.labels,
                    )
                    .then_some(*n)
                })
                .sum();
            let mut types = Vec::new();
            if policy.ingress.is_some() {
                types.push("Ingress".to_owned());
            }
            if policy.egress.is_some() {
                types.push("Egress".to_owned());
            }
            PolicyStatus {
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
                types,
                selected_pods,
            }
        })
        .collect();
    ControllerPolicyStatus {
        digest: digest.to_owned(),
        identities: inputs.identities.len(),
        endpoints: inputs.endpoints.len(),
        policies,
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::cluster::fixture::cluster;
    use trellis_core::keyed::Keyed;
    use trellis_core::policy::{Identity, IdentityLabels, LabelSelector, Labels, PolicyEndpoint};

    fn add_pod(state: &mut ClusterState, ns: &str, name: &str, pod: &str, number: u32) {
        let identity = Identity {
            key: IdentityKey {
                cluster: state.id.clone(),
                number,
            },
            labels: IdentityLabels {
                namespace: ns.into(),
                pod_labels: Labels::from([("pod".to_owned(), pod.to_owned())]),
                namespace_labels: Labels::new(),
            },
        };
        state.identities.insert(identity.key(), identity);
        let endpoint = PolicyEndpoint {
            cluster: state.id.clone(),
            namespace: ns.into(),
            name: name.into(),
            addresses: vec!["10.1.0.1".parse().unwrap()],
            node: "node-0".into(),
            identity: number,
            named_ports: vec![],
        };
        state.pods.insert(endpoint.key(), endpoint);
    }

    fn policy(ns: &str, selector: &[(&str, &str)], egress: bool) -> NetworkPolicy {
        NetworkPolicy {
            namespace: ns.into(),
            name: format!("p-{}", selector.len()),
            pod_selector: LabelSelector {
                match_labels: selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                match_expressions: vec![],
            },
            ingress: Some(vec![]),
            egress: egress.then(Vec::new),
        }
    }

    #[test]
    fn inputs_join_the_mesh_and_status_counts_local_pods_per_policy() {
        let mut a = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        add_pod(&mut a, "x", "a1", "a", 1);
        add_pod(&mut a, "x", "a2", "a", 1);
        add_pod(&mut a, "x", "b", "b", 2);
        add_pod(&mut a, "y", "a", "a", 3);
        let mut b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
        add_pod(&mut b, "x", "a", "a", 1);
        let policies: BTreeMap<PolicyKey, NetworkPolicy> =
            [policy("x", &[("pod", "a")], false), policy("x", &[], true)]
                .into_iter()
                .map(|p| (p.key(), p))
                .collect();
        let inputs = policy_inputs(&a, [&b], policies);
        assert_eq!(inputs.identities.len(), 4);
        assert_eq!(inputs.endpoints.len(), 5);
        let status = policy_status(&inputs, &inputs.digest(), vec!["x/bad refused".into()]);
        assert_eq!(status.digest, inputs.digest());
        let counts: Vec<(String, Vec<String>, usize)> = status
            .policies
            .iter()
            .map(|p| (p.name.clone(), p.types.clone(), p.selected_pods))
            .collect();
        // p-0 selects every pod of x (3, not b's pod in x), p-1 the two a pods of x.
        assert_eq!(
            counts,
            vec![
                ("p-0".into(), vec!["Ingress".into(), "Egress".into()], 3),
                ("p-1".into(), vec!["Ingress".into()], 2),
            ]
        );
        assert_eq!(status.refused, vec!["x/bad refused".to_string()]);
    }
}
