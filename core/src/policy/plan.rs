//! What the compiler derives from one policy alone, and the per-pod questions both the full
//! and the incremental compiler ask: which policies select a pod, which peers match an
//! identity, which (address, protocol, port) triples a pod gives a named-port rule.
//!
//! A policy direction becomes one chain of rules that never depends on pods: the pods are in
//! the rules' sets (one address set of peers and one service set of named ports per rule and
//! family), so a pod coming or going changes set elements, not rules.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::blocks::block_prefixes;
use super::model::{
    CLUSTER_LABEL, IdentityKey, IdentityLabels, LabelSelector, NetworkPolicy, PolicyEndpoint,
    PolicyKey, PolicyPeer, PolicyRule, PortSpec,
};
use super::names;
use super::ruleset::{Direction, Family, Match, Name, Rule, Verdict};
use crate::cluster::{ClusterId, Protocol};

pub const FAMILIES: [Family; 2] = [Family::Ipv4, Family::Ipv6];

/// What a pod selector sees: the pod's labels and the implicit cluster label.
fn pod_view<'a>(
    labels: &'a IdentityLabels,
    cluster: &'a ClusterId,
) -> impl Fn(&str) -> Option<&'a str> + Copy {
    move |key| {
        if key == CLUSTER_LABEL {
            Some(cluster.as_str())
        } else {
            labels.pod_labels.get(key).map(String::as_str)
        }
    }
}

/// What a namespace selector sees: the namespace's labels and the implicit cluster label.
fn namespace_view<'a>(
    labels: &'a IdentityLabels,
    cluster: &'a ClusterId,
) -> impl Fn(&str) -> Option<&'a str> + Copy {
    move |key| {
        if key == CLUSTER_LABEL {
            Some(cluster.as_str())
        } else {
            labels.namespace_labels.get(key).map(String::as_str)
        }
    }
}

/// Whether `policy` (of `cluster`) applies to pods of identity `id`: its own cluster and
/// namespace, and its pod selector.
pub fn policy_selects(
    policy: &NetworkPolicy,
    cluster: &ClusterId,
    id: &IdentityKey,
    labels: &IdentityLabels,
) -> bool {
    &id.cluster == cluster
        && labels.namespace == policy.namespace
        && policy
            .pod_selector
            .matches_with(pod_view(labels, &id.cluster))
}

/// Whether a `Pods` peer of `policy` (of `cluster`) matches pods of identity `id`. Without
/// the cluster label in either selector, only the policy's own cluster is in reach.
pub fn pods_peer_selects(
    namespace_selector: Option<&LabelSelector>,
    pod_selector: Option<&LabelSelector>,
    policy: &NetworkPolicy,
    cluster: &ClusterId,
    id: &IdentityKey,
    labels: &IdentityLabels,
) -> bool {
    let names_clusters = namespace_selector.is_some_and(|s| s.mentions(CLUSTER_LABEL))
        || pod_selector.is_some_and(|s| s.mentions(CLUSTER_LABEL));
    if !names_clusters && &id.cluster != cluster {
        return false;
    }
    let namespace_ok = match namespace_selector {
        Some(selector) => selector.matches_with(namespace_view(labels, &id.cluster)),
        None => labels.namespace == policy.namespace,
    };
    namespace_ok && pod_selector.is_none_or(|s| s.matches_with(pod_view(labels, &id.cluster)))
}

/// Whether any `Pods` peer of `rule` matches identity `id`.
pub fn rule_selects(
    rule: &PolicyRule,
    policy: &NetworkPolicy,
    cluster: &ClusterId,
    id: &IdentityKey,
    labels: &IdentityLabels,
) -> bool {
    rule.peers.iter().any(|peer| match peer {
        PolicyPeer::Pods {
            namespace_selector,
            pod_selector,
        } => pods_peer_selects(
            namespace_selector.as_ref(),
            pod_selector.as_ref(),
            policy,
            cluster,
            id,
            labels,
        ),
        PolicyPeer::IpBlock { .. } => false,
    })
}

pub fn rules_of(policy: &NetworkPolicy, direction: Direction) -> Option<&Vec<PolicyRule>> {
    match direction {
        Direction::Ingress => policy.ingress.as_ref(),
        Direction::Egress => policy.egress.as_ref(),
    }
}

pub fn direction_word(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// The ports of one protocol a rule allows by number.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Numbered {
    All,
    Ranges(Vec<(u16, u16)>),
}

/// One rule of one policy direction, planned.
#[derive(Debug, Clone)]
pub struct RulePlan {
    pub direction: Direction,
    /// No peers: every peer, so no address set.
    pub any_peer: bool,
    /// The families the rule's sets exist in: both when any pod may be a peer (or any peer
    /// is), else those of its ipBlocks.
    pub families: Vec<Family>,
    /// The ipBlock addresses per family, as disjoint prefixes.
    pub blocks: BTreeMap<Family, Vec<IpNet>>,
    /// The named ports (name, protocol) the rule allows.
    pub named: Vec<(String, Protocol)>,
    /// The peers' address set per family (none when `any_peer`).
    pub peer_sets: BTreeMap<Family, Name>,
    /// The named ports' service set per family (none without named ports).
    pub port_sets: BTreeMap<Family, Name>,
}

impl RulePlan {
    /// Whether `address` is in one of the rule's ipBlocks (minus excepts).
    pub fn in_blocks(&self, address: IpAddr) -> bool {
        self.blocks
            .get(&Family::of(&address))
            .is_some_and(|blocks| blocks.iter().any(|b| b.contains(&address)))
    }

    /// The addresses `endpoint` puts into the rule's peer sets, given whether its identity
    /// matches one of the rule's `Pods` peers.
    pub fn peer_addresses<'e>(
        &'e self,
        endpoint: &'e PolicyEndpoint,
        member: bool,
    ) -> impl Iterator<Item = (&'e Name, IpAddr)> + 'e {
        endpoint
            .addresses
            .iter()
            .filter(move |_| member)
            .filter_map(|a| self.peer_sets.get(&Family::of(a)).map(|set| (set, *a)))
    }

    /// The triples `endpoint` puts into the rule's named-port sets. Egress: the destination
    /// is a peer (every pod when the rule has no peers; a pod whose address is in an ipBlock
    /// counts for that address). Ingress: the destination is a local pod the policy selects.
    pub fn port_triples<'e>(
        &'e self,
        endpoint: &'e PolicyEndpoint,
        member: bool,
        selected: bool,
    ) -> impl Iterator<Item = (&'e Name, (IpAddr, Protocol, u16))> + 'e {
        endpoint
            .addresses
            .iter()
            .filter_map(|a| self.port_sets.get(&Family::of(a)).map(|set| (set, *a)))
            .filter(move |(_, a)| match self.direction {
                Direction::Egress => self.any_peer || member || self.in_blocks(*a),
                Direction::Ingress => selected,
            })
            .flat_map(move |(set, a)| {
                endpoint
                    .named_ports
                    .iter()
                    .filter(|p| {
                        self.named
                            .iter()
                            .any(|(name, protocol)| *name == p.name && *protocol == p.protocol)
                    })
                    .map(move |p| (set, (a, p.protocol, p.port)))
            })
    }
}

/// One direction of one policy, planned: its chain and its rules' sets.
#[derive(Debug, Clone)]
pub struct PolicyPlan {
    pub key: PolicyKey,
    pub direction: Direction,
    pub chain_name: Name,
    pub chain: Vec<Rule>,
    pub rules: Vec<RulePlan>,
}

impl PolicyPlan {
    /// `None` when the policy does not isolate `direction`.
    pub fn new(policy: &NetworkPolicy, direction: Direction) -> Option<Self> {
        let key = policy.key();
        let rules = rules_of(policy, direction)?;
        let mut plan = PolicyPlan {
            chain_name: names::policy_chain(&key, direction),
            key,
            direction,
            chain: Vec::new(),
            rules: Vec::with_capacity(rules.len()),
        };
        for (index, rule) in rules.iter().enumerate() {
            plan.add_rule(policy, index, rule);
        }
        Some(plan)
    }

    fn add_rule(&mut self, policy: &NetworkPolicy, index: usize, rule: &PolicyRule) {
        let direction = self.direction;
        let any_peer = rule.peers.is_empty();
        let blocks: BTreeMap<Family, Vec<IpNet>> = FAMILIES
            .iter()
            .map(|&family| {
                let prefixes = block_prefixes(
                    family,
                    rule.peers.iter().filter_map(|peer| match peer {
                        PolicyPeer::IpBlock { cidr, except } => Some((cidr, except.as_slice())),
                        PolicyPeer::Pods { .. } => None,
                    }),
                );
                (family, prefixes)
            })
            .collect();
        let has_pods = rule
            .peers
            .iter()
            .any(|p| matches!(p, PolicyPeer::Pods { .. }));
        let block_family = |family: Family| {
            rule.peers.iter().any(|peer| match peer {
                PolicyPeer::IpBlock { cidr, .. } => Family::of(&cidr.addr()) == family,
                PolicyPeer::Pods { .. } => false,
            })
        };
        let families: Vec<Family> = FAMILIES
            .into_iter()
            .filter(|&f| any_peer || has_pods || block_family(f))
            .collect();

        let mut numbered: BTreeMap<Protocol, Numbered> = BTreeMap::new();
        let mut named: Vec<(String, Protocol)> = Vec::new();
        for port in &rule.ports {
            match &port.port {
                None => {
                    numbered.insert(port.protocol, Numbered::All);
                }
                Some(PortSpec::Number(first)) => {
                    let last = port.end_port.unwrap_or(*first);
                    if last < *first {
                        continue; // an empty range allows nothing
                    }
                    match numbered
                        .entry(port.protocol)
                        .or_insert_with(|| Numbered::Ranges(Vec::new()))
                    {
                        Numbered::All => {}
                        Numbered::Ranges(ranges) => ranges.push((*first, last)),
                    }
                }
                Some(PortSpec::Name(name)) => named.push((name.clone(), port.protocol)),
            }
        }
        named.sort();
        named.dedup();

        let peer_sets: BTreeMap<Family, Name> = if any_peer {
            BTreeMap::new()
        } else {
            families
                .iter()
                .map(|&f| (f, names::peer_set(&self.key, direction, index, f)))
                .collect()
        };
        let port_sets: BTreeMap<Family, Name> = if named.is_empty() {
            BTreeMap::new()
        } else {
            families
                .iter()
                .map(|&f| (f, names::named_port_set(&self.key, direction, index, f)))
                .collect()
        };

        let comment = Some(format!(
            "{}/{} {} rule {index}",
            policy.namespace,
            policy.name,
            direction_word(direction)
        ));
        let peer_match = |family: Option<Family>| -> Vec<Match> {
            match family.and_then(|f| peer_sets.get(&f)) {
                Some(set) => vec![match direction {
                    Direction::Ingress => Match::SourceIn { set: set.clone() },
                    Direction::Egress => Match::DestinationIn { set: set.clone() },
                }],
                None => Vec::new(),
            }
        };
        // With no peers, one rule serves both families; with peers, one per family's set.
        let peer_families: Vec<Option<Family>> = if any_peer {
            vec![None]
        } else {
            families.iter().copied().map(Some).collect()
        };
        let mut push = |matches: Vec<Match>| {
            self.chain.push(Rule {
                matches,
                verdict: Verdict::Accept,
                comment: comment.clone(),
            })
        };
        for &family in &peer_families {
            if rule.ports.is_empty() {
                push(peer_match(family));
                continue;
            }
            for (protocol, ports) in &numbered {
                let mut matches = peer_match(family);
                matches.push(Match::Protocol {
                    protocol: *protocol,
                });
                if let Numbered::Ranges(ranges) = ports {
                    matches.push(Match::DestinationPorts {
                        ranges: merge_ranges(ranges),
                    });
                }
                push(matches);
            }
        }
        // Named ports: the service set holds destination, protocol and port together. On
        // egress it holds only peer destinations, so it needs no address set beside it.
        for (&family, set) in &port_sets {
            let mut matches = match direction {
                Direction::Ingress => peer_match(Some(family)),
                Direction::Egress => Vec::new(),
            };
            matches.push(Match::DestinationServiceIn { set: set.clone() });
            push(matches);
        }

        self.rules.push(RulePlan {
            direction,
            any_peer,
            families,
            blocks,
            named,
            peer_sets,
            port_sets,
        });
    }
}

/// Port ranges sorted, with overlapping and adjacent ones joined (an nftables interval set
/// refuses overlaps); reversed ranges are read the right way round.
pub(crate) fn merge_ranges(ranges: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut sorted: Vec<(u16, u16)> = ranges.iter().map(|&(a, b)| (a.min(b), a.max(b))).collect();
    sorted.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(sorted.len());
    for (first, last) in sorted {
        match out.last_mut() {
            Some(prev) if u32::from(first) <= u32::from(prev.1) + 1 => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// A local pod's chain for one direction: into each selecting policy's chain (an accept
/// there ends the evaluation), then drop.
pub fn pod_chain<'a>(
    endpoint: &PolicyEndpoint,
    direction: Direction,
    policies: impl IntoIterator<Item = &'a PolicyKey>,
) -> Vec<Rule> {
    let mut rules: Vec<Rule> = policies
        .into_iter()
        .map(|key| Rule {
            matches: Vec::new(),
            verdict: Verdict::Jump {
                chain: names::policy_chain(key, direction),
            },
            comment: None,
        })
        .collect();
    rules.push(Rule {
        matches: Vec::new(),
        verdict: Verdict::Drop { direction },
        comment: Some(format!(
            "{}/{} {} not allowed by any policy",
            endpoint.namespace,
            endpoint.name,
            direction_word(direction)
        )),
    });
    rules
}

/// The name of a local pod's chain: from its lowest address (`None` without addresses).
pub fn pod_chain_name(endpoint: &PolicyEndpoint, direction: Direction) -> Option<Name> {
    endpoint
        .addresses
        .iter()
        .min()
        .map(|a| names::pod_chain(*a, direction))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_merge_when_they_touch_or_overlap() {
        assert_eq!(
            merge_ranges(&[(90, 95), (80, 81), (82, 85), (84, 86), (65535, 65535)]),
            vec![(80, 86), (90, 95), (65535, 65535)]
        );
    }
}
