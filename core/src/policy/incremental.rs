//! The incremental compiler: the same [`Ruleset`] as [`super::compile()`], kept up to date
//! from [`PolicyDelta`]s at the cost of what changed.
//!
//! Every pod's effect on the ruleset is a *contribution* it can add and take back: its
//! addresses in the peer sets of the rules whose selectors match its identity, its named-port
//! triples, and, for a pod of this node, its own chains and the policies it makes active (a
//! policy direction is compiled on a node while it selects one of the node's pods). Set
//! elements carry counts, so taking a pod back removes exactly what it alone added. A pod
//! change is then: take back, apply, add again: work in proportion to the policies in force
//! on the node, whatever the number of pods. A policy change recompiles that policy alone
//! (one pass over the identities and pods for its selectors); an identity change moves the
//! pods of that identity.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use super::blocks::host;
use super::model::{
    EndpointKey, Identity, IdentityKey, NetworkPolicy, PolicyDelta, PolicyEndpoint, PolicyInputs,
    PolicyKey,
};
use super::plan::{self, PolicyPlan};
use super::ruleset::{AddressSet, Direction, Name, Ruleset, ServiceSet};
use crate::cluster::{ClusterId, Protocol};
use crate::keyed::Keyed;

const DIRECTIONS: [Direction; 2] = [Direction::Ingress, Direction::Egress];

type Triple = (IpAddr, Protocol, u16);

/// One rule of an active policy direction: which identities its `Pods` peers match, and how
/// many pods put each element into its sets.
#[derive(Debug, Default)]
struct RuleLedger {
    members: HashSet<IdentityKey>,
    addresses: HashMap<IpAddr, u32>,
    triples: HashMap<Triple, u32>,
}

/// A policy direction compiled on this node because it selects some of the node's pods.
#[derive(Debug)]
struct Active {
    plan: PolicyPlan,
    selected: BTreeSet<EndpointKey>,
    ledgers: Vec<RuleLedger>,
}

/// Keeps a node's ruleset equal to `compile(inputs, node)` as the inputs change.
#[derive(Debug)]
pub struct Compiler {
    node: String,
    inputs: PolicyInputs,
    ruleset: Ruleset,
    by_identity: HashMap<IdentityKey, BTreeSet<EndpointKey>>,
    by_namespace: HashMap<String, BTreeSet<PolicyKey>>,
    local_addresses: HashMap<IpAddr, u32>,
    /// Every pod of this node → the policy directions selecting it.
    local: BTreeMap<EndpointKey, BTreeSet<(Direction, PolicyKey)>>,
    active: BTreeMap<(PolicyKey, Direction), Active>,
    /// Active policy directions that lost their last selected pod during this delta: they
    /// stop being enforced at its end unless a pod came back (as when a pod is replaced).
    idle: BTreeSet<(PolicyKey, Direction)>,
    /// Per direction (ingress, egress): what each isolated local pod claims, and who claims
    /// each pod chain name and each address.
    claims: [HashMap<EndpointKey, Claim>; 2],
    chain_owners: [HashMap<Name, BTreeSet<EndpointKey>>; 2],
    address_owners: [HashMap<IpAddr, BTreeSet<EndpointKey>>; 2],
}

/// The (direction, policy) pairs that isolate `endpoint` (a pod of the node): the policies of
/// its namespace whose pod selector takes its identity, in each direction they have. None when
/// its identity is unknown.
fn isolating(
    inputs: &PolicyInputs,
    by_namespace: &HashMap<String, BTreeSet<PolicyKey>>,
    endpoint: &PolicyEndpoint,
) -> BTreeSet<(Direction, PolicyKey)> {
    let mut pairs = BTreeSet::new();
    let Some(identity) = inputs.identities.get(&endpoint.identity_key()) else {
        return pairs;
    };
    for policy_key in by_namespace.get(&endpoint.namespace).into_iter().flatten() {
        let policy = &inputs.policies[policy_key];
        if !plan::policy_selects(policy, &inputs.cluster, &identity.key, &identity.labels) {
            continue;
        }
        for direction in DIRECTIONS {
            if plan::rules_of(policy, direction).is_some() {
                pairs.insert((direction, policy_key.clone()));
            }
        }
    }
    pairs
}

impl Compiler {
    /// A compiler for `node` of `cluster`, with no inputs yet (an empty ruleset).
    pub fn new(cluster: ClusterId, node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            inputs: PolicyInputs::new(cluster),
            ruleset: Ruleset::default(),
            by_identity: HashMap::new(),
            by_namespace: HashMap::new(),
            local_addresses: HashMap::new(),
            local: BTreeMap::new(),
            active: BTreeMap::new(),
            idle: BTreeSet::new(),
            claims: Default::default(),
            chain_owners: Default::default(),
            address_owners: Default::default(),
        }
    }

    pub fn ruleset(&self) -> &Ruleset {
        &self.ruleset
    }

    pub fn inputs(&self) -> &PolicyInputs {
        &self.inputs
    }

    /// Brings the ruleset to `inputs` (from scratch when the cluster differs).
    pub fn update(&mut self, inputs: &PolicyInputs) -> &Ruleset {
        let fresh = self.inputs.policies.is_empty()
            && self.inputs.identities.is_empty()
            && self.inputs.endpoints.is_empty();
        match self.inputs.delta_to(inputs) {
            Some(delta) if !fresh => self.apply(&delta),
            _ => self.rebuild(inputs),
        }
    }

    /// Compiles `inputs` whole (a new compiler, or another cluster): every enforced policy is
    /// activated once, over its members, instead of pod after pod.
    fn rebuild(&mut self, inputs: &PolicyInputs) -> &Ruleset {
        *self = Compiler::new(inputs.cluster.clone(), std::mem::take(&mut self.node));
        self.inputs = inputs.clone();
        for (key, endpoint) in &self.inputs.endpoints {
            self.by_identity
                .entry(endpoint.identity_key())
                .or_default()
                .insert(key.clone());
        }
        for (key, policy) in &self.inputs.policies {
            self.by_namespace
                .entry(policy.namespace.clone())
                .or_default()
                .insert(key.clone());
        }
        let mut selected: BTreeMap<(PolicyKey, Direction), BTreeSet<EndpointKey>> = BTreeMap::new();
        for (key, endpoint) in &self.inputs.endpoints {
            if !(endpoint.cluster == self.inputs.cluster && endpoint.node == self.node) {
                continue;
            }
            for address in &endpoint.addresses {
                *self.local_addresses.entry(*address).or_default() += 1;
                self.ruleset.local_pods.insert(*address);
            }
            let pairs = isolating(&self.inputs, &self.by_namespace, endpoint);
            for (direction, policy_key) in &pairs {
                selected
                    .entry((policy_key.clone(), *direction))
                    .or_default()
                    .insert(key.clone());
            }
            self.local.insert(key.clone(), pairs);
        }
        for ((policy_key, direction), pods) in selected {
            self.activate(&policy_key, direction, pods);
        }
        let locals: Vec<EndpointKey> = self.local.keys().cloned().collect();
        for key in &locals {
            self.write_pod_chains(key);
        }
        &self.ruleset
    }

    /// Applies one delta of the inputs; the cost follows what the delta touches.
    pub fn apply(&mut self, delta: &PolicyDelta) -> &Ruleset {
        for key in &delta.policies.remove {
            self.remove_policy(key);
        }
        for policy in &delta.policies.upsert {
            self.remove_policy(&policy.key());
            self.add_policy(policy.clone());
        }
        for key in &delta.identities.remove {
            self.change_identity(key, None);
        }
        for identity in &delta.identities.upsert {
            self.change_identity(&identity.key, Some(identity.clone()));
        }
        for key in &delta.endpoints.remove {
            self.remove_endpoint(key);
        }
        for endpoint in &delta.endpoints.upsert {
            self.remove_endpoint(&endpoint.key());
            self.add_endpoint(endpoint.clone());
        }
        for (key, direction) in std::mem::take(&mut self.idle) {
            let unused = self
                .active
                .get(&(key.clone(), direction))
                .is_some_and(|active| active.selected.is_empty());
            if unused {
                self.deactivate(&key, direction);
            }
        }
        &self.ruleset
    }

    fn is_local(&self, endpoint: &PolicyEndpoint) -> bool {
        endpoint.cluster == self.inputs.cluster && endpoint.node == self.node
    }

    // ---- policies ----

    fn add_policy(&mut self, policy: NetworkPolicy) {
        let key = policy.key();
        self.by_namespace
            .entry(policy.namespace.clone())
            .or_default()
            .insert(key.clone());
        let mut selected: BTreeMap<Direction, BTreeSet<EndpointKey>> = BTreeMap::new();
        for (endpoint_key, pairs) in &mut self.local {
            if endpoint_key.namespace != policy.namespace {
                continue;
            }
            let Some(endpoint) = self.inputs.endpoints.get(endpoint_key) else {
                continue;
            };
            let Some(identity) = self.inputs.identities.get(&endpoint.identity_key()) else {
                continue;
            };
            if !plan::policy_selects(
                &policy,
                &self.inputs.cluster,
                &identity.key,
                &identity.labels,
            ) {
                continue;
            }
            for direction in DIRECTIONS {
                if plan::rules_of(&policy, direction).is_some() {
                    pairs.insert((direction, key.clone()));
                    selected
                        .entry(direction)
                        .or_default()
                        .insert(endpoint_key.clone());
                }
            }
        }
        self.inputs.policies.insert(key.clone(), policy);
        let mut touched = BTreeSet::new();
        for (direction, pods) in selected {
            touched.extend(pods.iter().cloned());
            self.activate(&key, direction, pods);
        }
        for endpoint_key in touched {
            self.write_pod_chains(&endpoint_key);
        }
    }

    fn remove_policy(&mut self, key: &PolicyKey) {
        let Some(policy) = self.inputs.policies.remove(key) else {
            return;
        };
        if let Some(keys) = self.by_namespace.get_mut(&policy.namespace) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_namespace.remove(&policy.namespace);
            }
        }
        let mut touched = BTreeSet::new();
        for direction in DIRECTIONS {
            if let Some(active) = self.deactivate(key, direction) {
                for endpoint_key in active.selected {
                    if let Some(pairs) = self.local.get_mut(&endpoint_key) {
                        pairs.remove(&(direction, key.clone()));
                    }
                    touched.insert(endpoint_key);
                }
            }
        }
        for endpoint_key in touched {
            self.write_pod_chains(&endpoint_key);
        }
    }

    /// Compiles a policy direction now selecting `selected` of the node's pods: its chain,
    /// its sets, and every pod's contribution to them.
    fn activate(&mut self, key: &PolicyKey, direction: Direction, selected: BTreeSet<EndpointKey>) {
        let policy = &self.inputs.policies[key];
        let Some(plan) = PolicyPlan::new(policy, direction) else {
            return;
        };
        let rules = plan::rules_of(policy, direction).expect("planned, so present");
        let mut ledgers = Vec::with_capacity(rules.len());
        for (rule_plan, rule) in plan.rules.iter().zip(rules) {
            for (family, name) in &rule_plan.peer_sets {
                self.ruleset.address_sets.insert(
                    name.clone(),
                    AddressSet {
                        family: *family,
                        elements: rule_plan.blocks[family].iter().copied().collect(),
                    },
                );
            }
            for (family, name) in &rule_plan.port_sets {
                self.ruleset.service_sets.insert(
                    name.clone(),
                    ServiceSet {
                        family: *family,
                        elements: BTreeSet::new(),
                    },
                );
            }
            let members = if rule_plan.peer_sets.is_empty() {
                HashSet::new()
            } else {
                self.inputs
                    .identities
                    .values()
                    .filter(|i| {
                        plan::rule_selects(rule, policy, &self.inputs.cluster, &i.key, &i.labels)
                    })
                    .map(|i| i.key.clone())
                    .collect()
            };
            ledgers.push(RuleLedger {
                members,
                ..RuleLedger::default()
            });
        }
        self.ruleset
            .chains
            .insert(plan.chain_name.clone(), plan.chain.clone());
        let mut active = Active {
            plan,
            selected,
            ledgers,
        };
        // Only members' pods and the selected pods contribute, unless an egress named-port
        // rule may reach any pod (no peers, or an ipBlock holding pods).
        let every_pod = active.plan.rules.iter().any(|r| {
            r.direction == Direction::Egress
                && !r.named.is_empty()
                && (r.any_peer || r.blocks.values().any(|b| !b.is_empty()))
        });
        if every_pod {
            for (key, endpoint) in &self.inputs.endpoints {
                let identity = endpoint.identity_key();
                contribute(
                    &mut self.ruleset,
                    &mut active,
                    key,
                    &identity,
                    endpoint,
                    true,
                );
            }
        } else {
            let mut contributors: BTreeSet<EndpointKey> = active.selected.clone();
            for ledger in &active.ledgers {
                for identity in &ledger.members {
                    contributors.extend(
                        self.by_identity
                            .get(identity)
                            .into_iter()
                            .flatten()
                            .cloned(),
                    );
                }
            }
            for key in &contributors {
                let endpoint = &self.inputs.endpoints[key];
                let identity = endpoint.identity_key();
                contribute(
                    &mut self.ruleset,
                    &mut active,
                    key,
                    &identity,
                    endpoint,
                    true,
                );
            }
        }
        self.active.insert((key.clone(), direction), active);
    }

    /// Removes a policy direction's chain and sets from the ruleset.
    fn deactivate(&mut self, key: &PolicyKey, direction: Direction) -> Option<Active> {
        let active = self.active.remove(&(key.clone(), direction))?;
        self.ruleset.chains.remove(&active.plan.chain_name);
        for rule in &active.plan.rules {
            for name in rule.peer_sets.values() {
                self.ruleset.address_sets.remove(name);
            }
            for name in rule.port_sets.values() {
                self.ruleset.service_sets.remove(name);
            }
        }
        Some(active)
    }

    // ---- identities ----

    fn change_identity(&mut self, key: &IdentityKey, identity: Option<Identity>) {
        if self.inputs.identities.get(key) == identity.as_ref() {
            return;
        }
        // The pods of this identity leave, the identity changes, they come back.
        let pods: Vec<EndpointKey> = self
            .by_identity
            .get(key)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default();
        let detached: Vec<PolicyEndpoint> = pods
            .iter()
            .filter_map(|k| self.remove_endpoint(k))
            .collect();
        match identity {
            Some(identity) => {
                for ((policy_key, direction), active) in &mut self.active {
                    let policy = &self.inputs.policies[policy_key];
                    let rules = plan::rules_of(policy, *direction).expect("active, so present");
                    for (ledger, rule) in active.ledgers.iter_mut().zip(rules) {
                        if plan::rule_selects(
                            rule,
                            policy,
                            &self.inputs.cluster,
                            &identity.key,
                            &identity.labels,
                        ) {
                            ledger.members.insert(identity.key.clone());
                        } else {
                            ledger.members.remove(&identity.key);
                        }
                    }
                }
                self.inputs.identities.insert(key.clone(), identity);
            }
            None => {
                for active in self.active.values_mut() {
                    for ledger in &mut active.ledgers {
                        ledger.members.remove(key);
                    }
                }
                self.inputs.identities.remove(key);
            }
        }
        for endpoint in detached {
            self.add_endpoint(endpoint);
        }
    }

    // ---- pods ----

    /// Takes a pod and its whole contribution out; returns it.
    fn remove_endpoint(&mut self, key: &EndpointKey) -> Option<PolicyEndpoint> {
        let endpoint = self.inputs.endpoints.remove(key)?;
        if let Some(keys) = self.by_identity.get_mut(&endpoint.identity_key()) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_identity.remove(&endpoint.identity_key());
            }
        }
        let identity = endpoint.identity_key();
        for active in self.active.values_mut() {
            contribute(&mut self.ruleset, active, key, &identity, &endpoint, false);
        }
        if self.is_local(&endpoint) {
            let pairs = self.local.remove(key).unwrap_or_default();
            self.erase_pod_chains(key);
            for (direction, policy_key) in pairs {
                let pair = (policy_key, direction);
                let now_empty = self.active.get_mut(&pair).is_some_and(|active| {
                    active.selected.remove(key);
                    active.selected.is_empty()
                });
                if now_empty {
                    self.idle.insert(pair);
                }
            }
            for address in &endpoint.addresses {
                if let Some(count) = self.local_addresses.get_mut(address) {
                    *count -= 1;
                    if *count == 0 {
                        self.local_addresses.remove(address);
                        self.ruleset.local_pods.remove(address);
                    }
                }
            }
        }
        Some(endpoint)
    }

    fn add_endpoint(&mut self, endpoint: PolicyEndpoint) {
        let key = endpoint.key();
        self.by_identity
            .entry(endpoint.identity_key())
            .or_default()
            .insert(key.clone());
        let local = self.is_local(&endpoint);
        self.inputs.endpoints.insert(key.clone(), endpoint);
        let endpoint = &self.inputs.endpoints[&key];
        let mut activated: Vec<(Direction, PolicyKey)> = Vec::new();
        let mut already: Vec<(PolicyKey, Direction)> = Vec::new();
        let mut pairs = BTreeSet::new();
        if local {
            for address in &endpoint.addresses {
                *self.local_addresses.entry(*address).or_default() += 1;
                self.ruleset.local_pods.insert(*address);
            }
            pairs = isolating(&self.inputs, &self.by_namespace, endpoint);
            for (direction, policy_key) in &pairs {
                let pair = (policy_key.clone(), *direction);
                if self.active.contains_key(&pair) {
                    already.push(pair);
                } else {
                    activated.push((*direction, policy_key.clone()));
                }
            }
        }
        for pair in already {
            if let Some(active) = self.active.get_mut(&pair) {
                active.selected.insert(key.clone());
            }
        }
        let skip: BTreeSet<(PolicyKey, Direction)> = activated
            .iter()
            .map(|(direction, policy_key)| (policy_key.clone(), *direction))
            .collect();
        // Activation counts this pod in already, through its pass over every pod.
        for (direction, policy_key) in activated {
            self.activate(&policy_key, direction, BTreeSet::from([key.clone()]));
        }
        let endpoint = &self.inputs.endpoints[&key];
        let identity = endpoint.identity_key();
        for (pair, active) in &mut self.active {
            if !skip.contains(pair) {
                contribute(&mut self.ruleset, active, &key, &identity, endpoint, true);
            }
        }
        if local {
            self.local.insert(key.clone(), pairs);
            self.write_pod_chains(&key);
        }
    }

    /// Re-derives what a local pod claims in the ruleset (its chain per direction, named by
    /// its lowest address, and its addresses in the verdict maps) after its endpoint or its
    /// policies changed. Two pods of the node may claim one address for a while (a pod
    /// replaced before its predecessor is gone): each chain name and address goes to its
    /// claimant with the greatest key, as in `compile`, and is released only when no pod
    /// claims it any more, so the surviving pod never loses its chain.
    fn write_pod_chains(&mut self, key: &EndpointKey) {
        for direction in DIRECTIONS {
            let claim = self.claim_of(key, direction);
            self.reclaim(key, direction, claim);
        }
    }

    fn erase_pod_chains(&mut self, key: &EndpointKey) {
        for direction in DIRECTIONS {
            self.reclaim(key, direction, None);
        }
    }

    fn claim_of(&self, key: &EndpointKey, direction: Direction) -> Option<Claim> {
        let endpoint = self.inputs.endpoints.get(key)?;
        let pairs = self.local.get(key)?;
        if !pairs.iter().any(|(d, _)| *d == direction) {
            return None;
        }
        Some(Claim {
            chain: plan::pod_chain_name(endpoint, direction)?,
            addresses: endpoint.addresses.clone(),
        })
    }

    fn reclaim(&mut self, key: &EndpointKey, direction: Direction, claim: Option<Claim>) {
        let claims = &mut self.claims[slot(direction)];
        let old = match &claim {
            Some(claim) => claims.insert(key.clone(), claim.clone()),
            None => claims.remove(key),
        };
        let mut chains = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        if let Some(old) = old {
            release(&mut self.chain_owners[slot(direction)], &old.chain, key);
            for address in &old.addresses {
                release(&mut self.address_owners[slot(direction)], address, key);
            }
            chains.insert(old.chain);
            addresses.extend(old.addresses);
        }
        if let Some(claim) = claim {
            self.chain_owners[slot(direction)]
                .entry(claim.chain.clone())
                .or_default()
                .insert(key.clone());
            for address in &claim.addresses {
                self.address_owners[slot(direction)]
                    .entry(*address)
                    .or_default()
                    .insert(key.clone());
            }
            chains.insert(claim.chain);
            addresses.extend(claim.addresses);
        }
        for chain in chains {
            self.refresh_pod_chain(direction, chain);
        }
        for address in addresses {
            self.refresh_map_entry(direction, address);
        }
    }

    fn refresh_pod_chain(&mut self, direction: Direction, chain: Name) {
        let owner = self.chain_owners[slot(direction)]
            .get(&chain)
            .and_then(|owners| owners.last());
        match owner {
            Some(owner) => {
                let endpoint = &self.inputs.endpoints[owner];
                let policies = self.local[owner]
                    .iter()
                    .filter(|(d, _)| *d == direction)
                    .map(|(_, p)| p);
                let rules = plan::pod_chain(endpoint, direction, policies);
                self.ruleset.chains.insert(chain, rules);
            }
            None => {
                self.ruleset.chains.remove(&chain);
            }
        }
    }

    fn refresh_map_entry(&mut self, direction: Direction, address: IpAddr) {
        let chain = self.address_owners[slot(direction)]
            .get(&address)
            .and_then(|owners| owners.last())
            .map(|owner| self.claims[slot(direction)][owner].chain.clone());
        let map = match direction {
            Direction::Ingress => &mut self.ruleset.ingress,
            Direction::Egress => &mut self.ruleset.egress,
        };
        match chain {
            Some(chain) => {
                map.insert(address, chain);
            }
            None => {
                map.remove(&address);
            }
        }
    }
}

/// What one local pod holds in the ruleset for one direction.
#[derive(Debug, Clone)]
struct Claim {
    chain: Name,
    addresses: Vec<IpAddr>,
}

fn slot(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn release<T: std::hash::Hash + Eq + Clone>(
    owners: &mut HashMap<T, BTreeSet<EndpointKey>>,
    item: &T,
    key: &EndpointKey,
) {
    if let Some(set) = owners.get_mut(item) {
        set.remove(key);
        if set.is_empty() {
            owners.remove(item);
        }
    }
}

/// Adds (`add`) or takes back one pod's elements in one active policy direction's sets.
fn contribute(
    ruleset: &mut Ruleset,
    active: &mut Active,
    key: &EndpointKey,
    identity: &IdentityKey,
    endpoint: &PolicyEndpoint,
    add: bool,
) {
    let mut selected = None;
    for (rule_plan, ledger) in active.plan.rules.iter().zip(&mut active.ledgers) {
        let member = !ledger.members.is_empty() && ledger.members.contains(identity);
        for (set, address) in rule_plan.peer_addresses(endpoint, member) {
            if count(&mut ledger.addresses, address, add) && !rule_plan.in_blocks(address) {
                let elements = &mut ruleset
                    .address_sets
                    .get_mut(set)
                    .expect("an active rule's set is in the ruleset")
                    .elements;
                if add {
                    elements.insert(host(address));
                } else {
                    elements.remove(&host(address));
                }
            }
        }
        if rule_plan.port_sets.is_empty() {
            continue;
        }
        let selected = *selected.get_or_insert_with(|| active.selected.contains(key));
        for (set, triple) in rule_plan.port_triples(endpoint, member, selected) {
            if count(&mut ledger.triples, triple, add) {
                let elements = &mut ruleset
                    .service_sets
                    .get_mut(set)
                    .expect("an active rule's set is in the ruleset")
                    .elements;
                if add {
                    elements.insert(triple);
                } else {
                    elements.remove(&triple);
                }
            }
        }
    }
}

/// Counts one more (or one less) of `item`; true when it appeared (or disappeared).
fn count<T: std::hash::Hash + Eq>(counts: &mut HashMap<T, u32>, item: T, add: bool) -> bool {
    if add {
        let n = counts.entry(item).or_default();
        *n += 1;
        *n == 1
    } else {
        match counts.get_mut(&item) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                counts.remove(&item);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile;
    use crate::policy::model::{IdentityLabels, LabelSelector};

    fn inputs(cluster: &str) -> PolicyInputs {
        let cluster: ClusterId = cluster.parse().unwrap();
        let mut inputs = PolicyInputs::new(cluster.clone());
        let key = IdentityKey {
            cluster: cluster.clone(),
            number: 1,
        };
        inputs.identities.insert(
            key.clone(),
            Identity {
                key,
                labels: IdentityLabels {
                    namespace: "x".into(),
                    ..IdentityLabels::default()
                },
            },
        );
        let endpoint = PolicyEndpoint {
            cluster,
            namespace: "x".into(),
            name: "a".into(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            node: "n1".into(),
            identity: 1,
            named_ports: vec![],
        };
        inputs.endpoints.insert(endpoint.key(), endpoint);
        let policy = NetworkPolicy {
            namespace: "x".into(),
            name: "deny".into(),
            pod_selector: LabelSelector::default(),
            ingress: Some(vec![]),
            egress: None,
        };
        inputs.policies.insert(policy.key(), policy);
        inputs
    }

    #[test]
    fn another_cluster_starts_from_scratch() {
        let mut compiler = Compiler::new("c1".parse().unwrap(), "n1");
        assert_eq!(
            compiler.update(&inputs("c1")),
            &compile(&inputs("c1"), "n1")
        );
        assert_eq!(compiler.ruleset().ingress.len(), 1);
        assert_eq!(
            compiler.update(&inputs("c2")),
            &compile(&inputs("c2"), "n1")
        );
        assert_eq!(compiler.inputs(), &inputs("c2"));
    }

    #[test]
    fn the_last_pod_leaving_takes_its_policies_chains_and_sets_along() {
        let mut compiler = Compiler::new("c1".parse().unwrap(), "n1");
        compiler.update(&inputs("c1"));
        assert!(!compiler.ruleset().chains.is_empty());
        let mut empty = inputs("c1");
        empty.endpoints.clear();
        assert_eq!(compiler.update(&empty), &Ruleset::default());
    }
}
