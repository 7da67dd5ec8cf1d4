//! Clusterset VIPs for a cluster without an API server to allocate them (the lab, a
//! controller given `clusterset_ip_ranges`): each ClusterSetIP import gets one address per
//! family its ranges cover.
//!
//! The allocation is a pure function of the ranges, the previous assignment and the imports,
//! so it is tested without a controller. An address once given stays with its service while
//! the service is imported and inside a range; a new service's first choice is derived from a
//! hash of `namespace/name`, so a restarted controller (which remembers nothing) usually gives
//! every service the address it had, and collisions probe onwards to the next free address.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::cluster::ServiceKey;

/// An IP family, as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        if addr.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    /// `IPv4` or `IPv6` (a ServiceImport's `ipFamilies`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service that got no address of a family: every usable address of its ranges is taken.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Exhausted {
    pub service: ServiceKey,
    pub family: Family,
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no {} clusterset IP left for {}: every address of the configured ranges is taken",
            self.family, self.service
        )
    }
}

/// The outcome of [`allocate`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Every wanted service's addresses, IPv4 first; a service whose every family is
    /// exhausted is absent.
    pub assigned: BTreeMap<ServiceKey, Vec<IpAddr>>,
    /// What could not be given, in service order.
    pub exhausted: Vec<Exhausted>,
}

/// One family's ranges as one pool of usable addresses, numbered from 0 in range order.
struct Pool {
    /// Each range's first usable address (as a number) and how many usable addresses it has.
    spans: Vec<(u128, u128)>,
    size: u128,
}

fn to_number(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_number(family: Family, n: u128) -> IpAddr {
    match family {
        // A V4 pool's numbers all come from V4 ranges, so they fit.
        Family::V4 => IpAddr::V4(u32::try_from(n).unwrap_or(u32::MAX).into()),
        Family::V6 => IpAddr::V6(n.into()),
    }
}

impl Pool {
    fn new(family: Family, ranges: &[IpNet]) -> Self {
        let mut spans = Vec::new();
        let mut size: u128 = 0;
        let mut taken: Vec<IpNet> = Vec::new();
        for net in ranges.iter().filter(|n| Family::of(&n.addr()) == family) {
            // Two CIDRs overlap only by nesting: a range inside (or around) an earlier one adds
            // nothing, and counting it twice would overstate the pool.
            if taken.iter().any(|t| t.contains(net) || net.contains(t)) {
                continue;
            }
            taken.push(net.trunc());
            let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
            let total = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
            let first = to_number(net.network());
            // IPv4 ranges lose their network and broadcast addresses, IPv6 ones the
            // subnet-router anycast address, as a Kubernetes service range does; the
            // point-to-point sizes (/31, /32, /127, /128) keep every address.
            let (skip_front, skip_back) = match (family, host_bits) {
                (_, 0 | 1) => (0, 0),
                (Family::V4, _) => (1, 1),
                (Family::V6, _) => (1, 0),
            };
            let usable = total - skip_front - skip_back;
            spans.push((first + skip_front, usable));
            size = size.saturating_add(usable);
        }
        Self { spans, size }
    }

    fn contains(&self, n: u128) -> bool {
        self.spans
            .iter()
            .any(|&(first, len)| n >= first && n - first < len)
    }

    fn nth(&self, mut i: u128) -> Option<u128> {
        for &(first, len) in &self.spans {
            if i < len {
                return Some(first + i);
            }
            i -= len;
        }
        None
    }
}

/// How many addresses from a service's first choice are tried before the lowest free one is
/// taken.
const PROBES: u128 = 16;

/// Where a service's search for a free address starts: stable across restarts and builds.
fn first_choice(service: &ServiceKey, size: u128) -> u128 {
    let digest = Sha256::digest(format!("{}/{}", service.namespace, service.name).as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(bytes) % size
}

/// Gives each service of `wanted` one address per family `ranges` cover: the one `previous`
/// gave it while that is still inside a range (and not also claimed by a service earlier in
/// name order), else the first free address from its hash onwards (in a pool so crowded that
/// a few tries miss, the lowest free one). Services absent from `wanted` release theirs; a
/// service no address is left for is reported in [`Allocation::exhausted`].
pub fn allocate(
    ranges: &[IpNet],
    previous: &BTreeMap<ServiceKey, Vec<IpAddr>>,
    wanted: &BTreeSet<ServiceKey>,
) -> Allocation {
    let mut out = Allocation::default();
    for family in [Family::V4, Family::V6] {
        let pool = Pool::new(family, ranges);
        if pool.size == 0 {
            continue;
        }
        let mut used: BTreeSet<u128> = BTreeSet::new();
        let mut given: BTreeMap<&ServiceKey, u128> = BTreeMap::new();
        for service in wanted {
            let kept = previous
                .get(service)
                .into_iter()
                .flatten()
                .filter(|a| Family::of(a) == family)
                .map(|a| to_number(*a))
                .find(|n| pool.contains(*n) && !used.contains(n));
            if let Some(n) = kept {
                used.insert(n);
                given.insert(service, n);
            }
        }
        let mut sweep: u128 = 0;
        let new: Vec<&ServiceKey> = wanted.iter().filter(|s| !given.contains_key(s)).collect();
        for service in new {
            // Probe a few addresses from the hash; in a crowded pool, take the lowest free one
            // instead: that cursor only moves forward, so filling a pool stays linear.
            let start = first_choice(service, pool.size);
            let probed = (0..PROBES.min(pool.size))
                .filter_map(|step| pool.nth((start + step) % pool.size))
                .find(|n| !used.contains(n));
            let free = probed.or_else(|| {
                while let Some(n) = pool.nth(sweep) {
                    if !used.contains(&n) {
                        return Some(n);
                    }
                    sweep += 1;
                }
                None
            });
            let Some(n) = free else {
                out.exhausted.push(Exhausted {
                    service: service.clone(),
                    family,
                });
                continue;
            };
            used.insert(n);
            given.insert(service, n);
        }
        for (service, n) in given {
            out.assigned
                .entry(service.clone())
                .or_default()
                .push(from_number(family, n));
        }
    }
    out.exhausted.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn keys(names: &[&str]) -> BTreeSet<ServiceKey> {
        names.iter().map(|n| ServiceKey::new("shop", *n)).collect()
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("shop", name)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_service_gets_one_address_per_family_inside_the_ranges() {
        let ranges = nets(&["10.255.0.0/24", "fd00:255::/112"]);
        let wanted = keys(&["web", "api", "db"]);
        let a = allocate(&ranges, &BTreeMap::new(), &wanted);
        assert!(a.exhausted.is_empty());
        assert_eq!(a.assigned.len(), 3);
        let mut all = BTreeSet::new();
        for (service, addrs) in &a.assigned {
            assert_eq!(addrs.len(), 2, "{service}: {addrs:?}");
            assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{addrs:?}");
            assert!(ranges[0].contains(&addrs[0]) && ranges[1].contains(&addrs[1]));
            for addr in addrs {
                assert!(all.insert(*addr), "{addr} given twice");
            }
        }
        // A single-family configuration gives a single address.
        let a = allocate(&nets(&["10.255.0.0/24"]), &BTreeMap::new(), &wanted);
        assert!(a.assigned.values().all(|v| v.len() == 1));
        // No ranges, no addresses (and nothing to report).
        assert_eq!(
            allocate(&[], &BTreeMap::new(), &wanted),
            Allocation::default()
        );
    }

    #[test]
    fn a_restart_gives_the_same_addresses_whatever_else_is_imported() {
        let ranges = nets(&["10.255.0.0/16"]);
        let first = allocate(&ranges, &BTreeMap::new(), &keys(&["web", "api"]));
        // A controller that remembers nothing, with more services and in another order.
        let again = allocate(
            &ranges,
            &BTreeMap::new(),
            &keys(&["zeta", "web", "api", "a"]),
        );
        assert_eq!(first.assigned[&key("web")], again.assigned[&key("web")]);
        assert_eq!(first.assigned[&key("api")], again.assigned[&key("api")]);
    }

    #[test]
    fn previous_assignments_are_kept_and_removed_services_release_theirs() {
        let ranges = nets(&["10.255.0.0/24"]);
        let previous = BTreeMap::from([
            (key("web"), vec![ip("10.255.0.77")]),
            (key("gone"), vec![ip("10.255.0.78")]),
        ]);
        let a = allocate(&ranges, &previous, &keys(&["web", "api"]));
        assert_eq!(a.assigned[&key("web")], [ip("10.255.0.77")]);
        assert!(!a.assigned.contains_key(&key("gone")));
        assert_ne!(a.assigned[&key("api")], [ip("10.255.0.77")]);

        // An address no longer inside the ranges (they changed) is replaced.
        let a = allocate(&nets(&["10.254.0.0/24"]), &previous, &keys(&["web"]));
        assert!(nets(&["10.254.0.0/24"])[0].contains(&a.assigned[&key("web")][0]));
        // Two services claiming one address (a corrupted memory): the first by name keeps it.
        let clash = BTreeMap::from([
            (key("a"), vec![ip("10.255.0.9")]),
            (key("b"), vec![ip("10.255.0.9")]),
        ]);
        let a = allocate(&ranges, &clash, &keys(&["a", "b"]));
        assert_eq!(a.assigned[&key("a")], [ip("10.255.0.9")]);
        assert_ne!(a.assigned[&key("b")], [ip("10.255.0.9")]);
    }

    #[test]
    fn collisions_probe_to_the_next_free_address() {
        // Find the first choice of "web" in a tiny pool, then occupy it with another service.
        let ranges = nets(&["10.255.0.0/29"]); // 6 usable: .1 – .6
        let alone = allocate(&ranges, &BTreeMap::new(), &keys(&["web"]));
        let home = alone.assigned[&key("web")][0];
        let previous = BTreeMap::from([(key("squatter"), vec![home])]);
        let a = allocate(&ranges, &previous, &keys(&["web", "squatter"]));
        assert_eq!(a.assigned[&key("squatter")], [home]);
        let IpAddr::V4(home4) = home else {
            unreachable!()
        };
        let next = if home4.octets()[3] == 6 {
            ip("10.255.0.1")
        } else {
            IpAddr::V4((u32::from(home4) + 1).into())
        };
        assert_eq!(a.assigned[&key("web")], [next]);
    }

    #[test]
    fn ipv4_network_and_broadcast_addresses_are_never_given_and_exhaustion_is_reported() {
        let ranges = nets(&["10.255.0.0/30"]); // .1 and .2 usable
        let a = allocate(&ranges, &BTreeMap::new(), &keys(&["a", "b", "c"]));
        let given: BTreeSet<IpAddr> = a.assigned.values().flatten().copied().collect();
        assert_eq!(given, BTreeSet::from([ip("10.255.0.1"), ip("10.255.0.2")]));
        assert_eq!(a.exhausted.len(), 1);
        assert_eq!(a.exhausted[0].family, Family::V4);
        assert!(
            a.exhausted[0]
                .to_string()
                .contains("no IPv4 clusterset IP left")
        );
        // Enough services for every address of a /24: all 254 usable ones, never .0 or .255.
        let names: Vec<String> = (0..300).map(|i| format!("svc-{i}")).collect();
        let wanted: BTreeSet<ServiceKey> = names.iter().map(|n| key(n)).collect();
        let a = allocate(&nets(&["10.255.1.0/24"]), &BTreeMap::new(), &wanted);
        let given: BTreeSet<IpAddr> = a.assigned.values().flatten().copied().collect();
        assert_eq!(given.len(), 254);
        assert!(!given.contains(&ip("10.255.1.0")) && !given.contains(&ip("10.255.1.255")));
        assert_eq!(a.exhausted.len(), 300 - 254);
        // A /32 is one usable address.
        let a = allocate(&nets(&["10.255.2.7/32"]), &BTreeMap::new(), &keys(&["a"]));
        assert_eq!(a.assigned[&key("a")], [ip("10.255.2.7")]);
    }

    #[test]
    fn several_ranges_of_a_family_form_one_pool() {
        let ranges = nets(&["10.255.0.0/30", "10.255.9.0/30"]);
        let a = allocate(&ranges, &BTreeMap::new(), &keys(&["a", "b", "c", "d"]));
        assert!(a.exhausted.is_empty(), "{:?}", a.exhausted);
        let given: BTreeSet<IpAddr> = a.assigned.values().flatten().copied().collect();
        assert_eq!(
            given,
            BTreeSet::from([
                ip("10.255.0.1"),
                ip("10.255.0.2"),
                ip("10.255.9.1"),
                ip("10.255.9.2")
            ])
        );
    }

    #[test]
    fn an_ipv6_range_as_wide_as_the_address_space_does_not_overflow() {
        let a = allocate(&nets(&["::/0"]), &BTreeMap::new(), &keys(&["web"]));
        assert_eq!(a.assigned[&key("web")].len(), 1);
        assert_ne!(a.assigned[&key("web")][0], ip("::"));
    }

    #[test]
    fn a_pool_filled_to_the_last_address_gives_each_one_once() {
        // 4094 usable addresses, 4100 services: probing alone would go quadratic near the end.
        let names: Vec<String> = (0..4100).map(|i| format!("svc-{i}")).collect();
        let wanted: BTreeSet<ServiceKey> = names.iter().map(|n| key(n)).collect();
        let a = allocate(&nets(&["10.250.0.0/20"]), &BTreeMap::new(), &wanted);
        let given: BTreeSet<IpAddr> = a.assigned.values().flatten().copied().collect();
        assert_eq!(given.len(), 4094);
        assert_eq!(a.assigned.len(), 4094);
        assert_eq!(a.exhausted.len(), 6);
    }

    #[test]
    fn nested_ranges_count_once() {
        // 10.255.0.0/30 inside 10.255.0.0/29 adds nothing: still 6 usable, so the seventh
        // service is reported, and no address is given twice.
        let ranges = nets(&["10.255.0.0/29", "10.255.0.0/30"]);
        let names: Vec<String> = (0..7).map(|i| format!("s{i}")).collect();
        let wanted: BTreeSet<ServiceKey> = names.iter().map(|n| key(n)).collect();
        let a = allocate(&ranges, &BTreeMap::new(), &wanted);
        let given: BTreeSet<IpAddr> = a.assigned.values().flatten().copied().collect();
        assert_eq!(given.len(), 6);
        assert_eq!(a.exhausted.len(), 1);
    }
}
