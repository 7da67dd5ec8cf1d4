//! The compiler: a node's [`Ruleset`] from the mesh's [`PolicyInputs`], from scratch. The
//! incremental [`super::incremental::Compiler`] keeps the same result up to date at the cost
//! of what changed; this is the plain definition it is tested against.
//!
//! The shape: a policy direction selecting at least one pod of the node becomes a chain
//! (`pol_<hash>_in` / `_eg`) of accept rules over its rules' sets; each pod of the node
//! isolated in a direction gets a chain jumping to the chains of the policies selecting it and
//! then dropping, and every address of the pod maps to that chain.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::blocks::host;
use super::model::{EndpointKey, IdentityKey, PolicyInputs, PolicyKey};
use super::plan::{self, PolicyPlan};
use super::ruleset::{AddressSet, Direction, Ruleset, ServiceSet};
use crate::keyed::Keyed;

/// The ruleset `node` enforces for its pods.
pub fn compile(inputs: &PolicyInputs, node: &str) -> Ruleset {
    let mut ruleset = Ruleset::default();
    // (policy, direction) → the node's pods it selects.
    let mut selected: BTreeMap<(PolicyKey, Direction), BTreeSet<EndpointKey>> = BTreeMap::new();
    for endpoint in inputs.local_endpoints(node) {
        ruleset
            .local_pods
            .extend(endpoint.addresses.iter().copied());
        let Some(identity) = inputs.identities.get(&endpoint.identity_key()) else {
            continue;
        };
        for direction in [Direction::Ingress, Direction::Egress] {
            let policies: Vec<&PolicyKey> = inputs
                .policies
                .iter()
                .filter(|(_, p)| {
                    plan::rules_of(p, direction).is_some()
                        && plan::policy_selects(p, &inputs.cluster, &identity.key, &identity.labels)
                })
                .map(|(key, _)| key)
                .collect();
            if policies.is_empty() {
                continue;
            }
            for key in &policies {
                selected
                    .entry(((*key).clone(), direction))
                    .or_default()
                    .insert(endpoint.key());
            }
            if let Some(name) = plan::pod_chain_name(endpoint, direction) {
                let map = match direction {
                    Direction::Ingress => &mut ruleset.ingress,
                    Direction::Egress => &mut ruleset.egress,
                };
                map.extend(endpoint.addresses.iter().map(|a| (*a, name.clone())));
                ruleset.chains.insert(
                    name,
                    plan::pod_chain(endpoint, direction, policies.iter().copied()),
                );
            }
        }
    }

    for ((key, direction), locals) in &selected {
        let policy = &inputs.policies[key];
        let Some(plan) = PolicyPlan::new(policy, *direction) else {
            continue;
        };
        let rules = plan::rules_of(policy, *direction).expect("planned, so present");
        for (rule_plan, rule) in plan.rules.iter().zip(rules) {
            for (family, name) in &rule_plan.peer_sets {
                ruleset.address_sets.insert(
                    name.clone(),
                    AddressSet {
                        family: *family,
                        elements: rule_plan.blocks[family].iter().copied().collect(),
                    },
                );
            }
            for (family, name) in &rule_plan.port_sets {
                ruleset.service_sets.insert(
                    name.clone(),
                    ServiceSet {
                        family: *family,
                        elements: BTreeSet::new(),
                    },
                );
            }
            // Selectors are asked once per identity, not once per pod.
            let members: HashSet<&IdentityKey> = inputs
                .identities
                .values()
                .filter(|identity| {
                    plan::rule_selects(
                        rule,
                        policy,
                        &inputs.cluster,
                        &identity.key,
                        &identity.labels,
                    )
                })
                .map(|identity| &identity.key)
                .collect();
            for endpoint in inputs.endpoints.values() {
                let member = members.contains(&endpoint.identity_key());
                for (set, address) in rule_plan.peer_addresses(endpoint, member) {
                    if !rule_plan.in_blocks(address) {
                        let elements = &mut ruleset
                            .address_sets
                            .get_mut(set)
                            .expect("created above")
                            .elements;
                        elements.insert(host(address));
                    }
                }
                let is_selected = locals.contains(&endpoint.key());
                for (set, triple) in rule_plan.port_triples(endpoint, member, is_selected) {
                    ruleset
                        .service_sets
                        .get_mut(set)
                        .expect("created above")
                        .elements
                        .insert(triple);
                }
            }
        }
        ruleset.chains.insert(plan.chain_name, plan.chain);
    }
    ruleset
}
