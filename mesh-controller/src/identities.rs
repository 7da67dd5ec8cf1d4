//! The local cluster's policy identities, pure: every distinct label set (namespace, pod
//! labels, namespace labels) gets a number, Cilium's model, so pods that look alike to every
//! selector share one identity and peers receive label sets once, not once per pod.
//!
//! A number stays with its label set for as long as some pod has it, whatever else changes
//! (renumbering would rewrite the address sets of pods that did not change). A new label set
//! gets a number never used before; numbers are reused only once all 2^32 − 1 were handed
//! out, oldest released first, so a number does not change meaning while a node may still
//! hold the old one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use trellis_core::cluster::ClusterId;
use trellis_core::keyed::Keyed;
use trellis_core::policy::{
    EndpointKey, Identity, IdentityKey, IdentityLabels, Labels, NAMESPACE_NAME_LABEL,
    PolicyEndpoint,
};

use crate::policy_source::PolicySource;

#[derive(Debug, Clone)]
pub struct IdentityAllocator {
    numbers: BTreeMap<IdentityLabels, u32>,
    next: u32,
    released: VecDeque<u32>,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self {
            numbers: BTreeMap::new(),
            next: 1,
            released: VecDeque::new(),
        }
    }
}

impl IdentityAllocator {
    /// Numbers exactly the label sets in `wanted`: the ones already numbered keep their
    /// number, the others get one, and numbered sets no longer wanted are released.
    pub fn assign(&mut self, wanted: &BTreeSet<&IdentityLabels>) -> &BTreeMap<IdentityLabels, u32> {
        let gone: Vec<IdentityLabels> = self
            .numbers
            .keys()
            .filter(|l| !wanted.contains(l))
            .cloned()
            .collect();
        for labels in gone {
            if let Some(n) = self.numbers.remove(&labels) {
                self.released.push_back(n);
            }
        }
        for labels in wanted {
            if !self.numbers.contains_key(*labels) {
                let n = self.fresh();
                self.numbers.insert((*labels).clone(), n);
            }
        }
        &self.numbers
    }

    /// An allocator holding the numbers a previous run gave (from its saved local state);
    /// new numbers start after the largest.
    pub fn resume(numbers: impl IntoIterator<Item = (IdentityLabels, u32)>) -> Self {
        let numbers: BTreeMap<IdentityLabels, u32> = numbers.into_iter().collect();
        let next = numbers.values().max().map_or(1, |n| n.saturating_add(1));
        Self {
            numbers,
            next,
            released: VecDeque::new(),
        }
    }

    fn fresh(&mut self) -> u32 {
        if self.next < u32::MAX {
            self.next += 1;
            return self.next - 1;
        }
        // Every number was handed out once: reuse the one released longest ago (there are
        // at most as many label sets as pods, far fewer than 2^32, so one is free).
        if let Some(n) = self.released.pop_front() {
            return n;
        }
        let used: BTreeSet<u32> = self.numbers.values().copied().collect();
        (1..u32::MAX)
            .find(|n| !used.contains(n))
            .unwrap_or(u32::MAX)
    }

    #[cfg(test)]
    fn exhausted_after(&mut self, next: u32) {
        self.next = next;
    }
}

/// The local cluster's identities and pod endpoints from the source's pods and namespaces
/// (a pod in a namespace the source does not list gets the namespace's name label alone).
pub fn local_identities(
    cluster: &ClusterId,
    source: &PolicySource,
    allocator: &mut IdentityAllocator,
) -> (
    BTreeMap<IdentityKey, Identity>,
    BTreeMap<EndpointKey, PolicyEndpoint>,
) {
    let labels_of: Vec<IdentityLabels> = source
        .pods
        .iter()
        .map(|pod| IdentityLabels {
            namespace: pod.namespace.clone(),
            pod_labels: pod.labels.clone(),
            namespace_labels: source
                .namespaces
                .get(&pod.namespace)
                .cloned()
                .unwrap_or_else(|| {
                    Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), pod.namespace.clone())])
                }),
        })
        .collect();
    let wanted: BTreeSet<&IdentityLabels> = labels_of.iter().collect();
    let numbers = allocator.assign(&wanted);
    let identities = numbers
        .iter()
        .map(|(labels, number)| {
            let identity = Identity {
                key: IdentityKey {
                    cluster: cluster.clone(),
                    number: *number,
                },
                labels: labels.clone(),
            };
            (identity.key(), identity)
        })
        .collect();
    let endpoints = source
        .pods
        .iter()
        .zip(&labels_of)
        .map(|(pod, labels)| {
            let endpoint = PolicyEndpoint {
                cluster: cluster.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                addresses: pod.addresses.clone(),
                node: pod.node.clone(),
                identity: numbers[labels],
                named_ports: pod.named_ports.clone(),
            };
            (endpoint.key(), endpoint)
        })
        .collect();
    (identities, endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_source::PodInfo;

    fn labels(ns: &str, pod: &str) -> IdentityLabels {
        IdentityLabels {
            namespace: ns.into(),
            pod_labels: Labels::from([("pod".to_owned(), pod.to_owned())]),
            namespace_labels: Labels::new(),
        }
    }

    #[test]
    fn numbers_are_stable_and_never_reused_while_fresh_ones_remain() {
        let mut a = IdentityAllocator::default();
        let (x_a, x_b, y_a) = (labels("x", "a"), labels("x", "b"), labels("y", "a"));
        let first = a.assign(&BTreeSet::from([&x_a, &x_b])).clone();
        assert_eq!((first[&x_a], first[&x_b]), (1, 2));
        // x/b goes, y/a comes: x/a keeps 1, y/a gets a new number, not 2.
        let second = a.assign(&BTreeSet::from([&x_a, &y_a])).clone();
        assert_eq!((second[&x_a], second[&y_a]), (1, 3));
        assert!(!second.contains_key(&x_b));
        // x/b back: a new number again.
        let third = a.assign(&BTreeSet::from([&x_a, &y_a, &x_b])).clone();
        assert_eq!(third[&x_b], 4);
    }

    #[test]
    fn a_resumed_allocator_keeps_the_saved_numbers() {
        let (x_a, x_b) = (labels("x", "a"), labels("x", "b"));
        let mut a = IdentityAllocator::resume([(x_a.clone(), 7)]);
        let got = a.assign(&BTreeSet::from([&x_a, &x_b])).clone();
        assert_eq!((got[&x_a], got[&x_b]), (7, 8));
    }

    #[test]
    fn released_numbers_are_reused_oldest_first_once_the_space_is_used_up() {
        let mut a = IdentityAllocator::default();
        let sets: Vec<IdentityLabels> = (0..3).map(|i| labels("x", &i.to_string())).collect();
        a.assign(&sets.iter().collect());
        a.assign(&BTreeSet::from([&sets[2]]));
        a.exhausted_after(u32::MAX);
        let new = labels("x", "new");
        let got = a.assign(&BTreeSet::from([&sets[2], &new])).clone();
        assert_eq!(got[&new], 1, "the oldest released");
        assert_eq!(got[&sets[2]], 3);
    }

    fn pod(ns: &str, name: &str, pod_label: &str) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: Labels::from([("pod".to_owned(), pod_label.to_owned())]),
            node: "n1".into(),
            addresses: vec!["10.1.0.1".parse().unwrap()],
            named_ports: vec![],
        }
    }

    #[test]
    fn pods_alike_share_an_identity_and_namespace_labels_tell_them_apart() {
        let cluster: ClusterId = "c1".parse().unwrap();
        let mut source = PolicySource::default();
        source.namespaces.insert(
            "x".into(),
            Labels::from([
                (NAMESPACE_NAME_LABEL.to_owned(), "x".to_owned()),
                ("team".to_owned(), "blue".to_owned()),
            ]),
        );
        source.pods = vec![
            pod("x", "a1", "a"),
            pod("x", "a2", "a"),
            pod("y", "a3", "a"),
        ];
        let mut alloc = IdentityAllocator::default();
        let (identities, endpoints) = local_identities(&cluster, &source, &mut alloc);
        assert_eq!(identities.len(), 2);
        let id_of = |name: &str| {
            endpoints
                .values()
                .find(|e| e.name == name)
                .map(|e| e.identity)
                .unwrap()
        };
        assert_eq!(id_of("a1"), id_of("a2"));
        assert_ne!(id_of("a1"), id_of("a3"));
        let y = &identities[&IdentityKey {
            cluster: cluster.clone(),
            number: id_of("a3"),
        }];
        assert_eq!(y.labels.namespace_labels[NAMESPACE_NAME_LABEL], "y");
        // Relabelling a namespace changes its pods' identity and no other.
        source
            .namespaces
            .get_mut("x")
            .unwrap()
            .insert("team".into(), "red".into());
        let (_, after) = local_identities(&cluster, &source, &mut alloc);
        let after_of = |name: &str| after.values().find(|e| e.name == name).unwrap().identity;
        assert_ne!(after_of("a1"), id_of("a1"));
        assert_eq!(after_of("a1"), after_of("a2"));
        assert_eq!(after_of("a3"), id_of("a3"));
    }
}
