use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Who holds a lease: the runtime's container ID and the interface inside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

impl Owner {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        Self {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free address left in {0}")]
pub struct Exhausted(pub IpNet);

/// Every lease of one network.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Allocations {
    #[serde(default)]
    leases: BTreeMap<IpAddr, Owner>,
    /// The last address handed out per CIDR: the search for the next one starts after it, so a
    /// freed address is not reused at once (stale ARP entries and conntrack would misdirect
    /// traffic meant for the old pod).
    #[serde(default)]
    last: BTreeMap<IpNet, IpAddr>,
}

impl Allocations {
    /// One address per CIDR for `owner`: the ones it already holds, or the next free ones.
    /// All or nothing: on exhaustion nothing changes.
    pub fn allocate(&mut self, cidrs: &[IpNet], owner: &Owner) -> Result<Vec<IpAddr>, Exhausted> {
        let mut granted = Vec::with_capacity(cidrs.len());
        let mut next = self.clone();
        for cidr in cidrs {
            let held = next
                .leases
                .iter()
                .find(|(ip, o)| *o == owner && cidr.contains(*ip))
                .map(|(ip, _)| *ip);
            let address = match held {
                Some(address) => address,
                None => {
                    let address = next.next_free(cidr).ok_or(Exhausted(*cidr))?;
                    next.leases.insert(address, owner.clone());
                    next.last.insert(*cidr, address);
                    address
                }
            };
            granted.push(address);
        }
        *self = next;
        Ok(granted)
    }

    fn next_free(&self, cidr: &IpNet) -> Option<IpAddr> {
        let (first, last) = usable_range(cidr);
        let size = last - first + 1;
        let start = match self.last.get(cidr) {
            Some(previous) if cidr.contains(previous) => {
                (to_u128(previous).saturating_sub(first) + 1) % size
            }
            _ => 0,
        };
        // Bounded by the number of leases in the CIDR plus one: a free address turns up at the
        // latest after skipping every held one.
        let held_here = self.leases.keys().filter(|ip| cidr.contains(*ip)).count() as u128;
        (0..size.min(held_here + 1))
            .map(|offset| from_u128(cidr, first + (start + offset) % size))
            .find(|candidate| !self.leases.contains_key(candidate))
    }

    /// Frees every address of `owner`, returning them.
    pub fn release(&mut self, owner: &Owner) -> Vec<IpAddr> {
        let freed: Vec<IpAddr> = self.of(owner);
        for address in &freed {
            self.leases.remove(address);
        }
        freed
    }

    /// Frees every lease whose owner is not in `valid` (CNI GC), returning what it freed.
    pub fn retain_owners(&mut self, valid: &HashSet<Owner>) -> Vec<(IpAddr, Owner)> {
        let stale: Vec<(IpAddr, Owner)> = self
            .leases
            .iter()
            .filter(|(_, owner)| !valid.contains(owner))
            .map(|(ip, o)| (*ip, o.clone()))
            .collect();
        for (address, _) in &stale {
            self.leases.remove(address);
        }
        stale
    }

    pub fn of(&self, owner: &Owner) -> Vec<IpAddr> {
        self.leases
            .iter()
            .filter(|(_, o)| *o == owner)
            .map(|(ip, _)| *ip)
            .collect()
    }

    pub fn owners(&self) -> HashSet<Owner> {
        self.leases.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// How many more addresses `cidr` can hand out.
    pub fn free_in(&self, cidr: &IpNet) -> u128 {
        let (first, last) = usable_range(cidr);
        let held = self.leases.keys().filter(|ip| cidr.contains(*ip)).count() as u128;
        (last - first + 1).saturating_sub(held)
    }
}

/// The addresses of a CIDR a pod may get: not the network address, and for IPv4 not the
/// broadcast address either.
fn usable_range(cidr: &IpNet) -> (u128, u128) {
    let network = to_u128(&cidr.network());
    let broadcast = to_u128(&cidr.broadcast());
    match cidr {
        IpNet::V4(_) => (network + 1, broadcast - 1),
        IpNet::V6(_) => (network + 1, broadcast),
    }
}

fn to_u128(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(*v4)),
        IpAddr::V6(v6) => u128::from(*v6),
    }
}

fn from_u128(cidr: &IpNet, value: u128) -> IpAddr {
    match cidr {
        IpNet::V4(_) => IpAddr::V4((value as u32).into()),
        IpNet::V6(_) => IpAddr::V6(value.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn hands_out_distinct_addresses_skipping_network_and_broadcast() {
        let cidr = net("10.0.0.0/29");
        let mut allocations = Allocations::default();
        let granted: Vec<IpAddr> = (0..6)
            .map(|i| {
                allocations
                    .allocate(&[cidr], &Owner::new(format!("c{i}"), "eth0"))
                    .unwrap()[0]
            })
            .collect();
        assert_eq!(granted.first(), Some(&ip("10.0.0.1")));
        assert_eq!(granted.last(), Some(&ip("10.0.0.6")));
        assert_eq!(
            allocations.allocate(&[cidr], &Owner::new("c7", "eth0")),
            Err(Exhausted(cidr))
        );
        assert_eq!(allocations.len(), 6, "a failed allocation changes nothing");
    }

    #[test]
    fn same_owner_gets_the_same_address_again() {
        let cidrs = [net("10.0.0.0/24"), net("fd00::/64")];
        let mut allocations = Allocations::default();
        let owner = Owner::new("c1", "eth0");
        let first = allocations.allocate(&cidrs, &owner).unwrap();
        assert_eq!(allocations.allocate(&cidrs, &owner).unwrap(), first);
        assert_eq!(allocations.len(), 2);
        assert_eq!(first[1], ip("fd00::1"));
    }

    #[test]
    fn freed_addresses_are_not_reused_at_once() {
        let cidr = net("10.0.0.0/24");
        let mut allocations = Allocations::default();
        let a = Owner::new("a", "eth0");
        let first = allocations.allocate(&[cidr], &a).unwrap();
        assert_eq!(allocations.release(&a), first);
        let second = allocations
            .allocate(&[cidr], &Owner::new("b", "eth0"))
            .unwrap();
        assert_ne!(first, second);
        assert_eq!(allocations.free_in(&cidr), 253);
    }

    #[test]
    fn wraps_around_to_freed_addresses_when_the_end_is_reached() {
        let cidr = net("10.0.0.0/30");
        let mut allocations = Allocations::default();
        let a = Owner::new("a", "eth0");
        allocations.allocate(&[cidr], &a).unwrap();
        allocations
            .allocate(&[cidr], &Owner::new("b", "eth0"))
            .unwrap();
        allocations.release(&a);
        assert_eq!(
            allocations
                .allocate(&[cidr], &Owner::new("c", "eth0"))
                .unwrap(),
            vec![ip("10.0.0.1")]
        );
    }

    #[test]
    fn dual_stack_is_all_or_nothing() {
        let cidrs = [net("10.0.0.0/24"), net("fd00::/127")];
        let mut allocations = Allocations::default();
        allocations
            .allocate(&cidrs, &Owner::new("a", "eth0"))
            .unwrap();
        let before = allocations.clone();
        assert!(
            allocations
                .allocate(&cidrs, &Owner::new("b", "eth0"))
                .is_err()
        );
        assert_eq!(allocations, before);
    }

    #[test]
    fn gc_keeps_only_valid_owners() {
        let cidr = net("10.0.0.0/24");
        let mut allocations = Allocations::default();
        for id in ["a", "b", "c"] {
            allocations
                .allocate(&[cidr], &Owner::new(id, "eth0"))
                .unwrap();
        }
        let valid: HashSet<Owner> = [Owner::new("b", "eth0")].into();
        let freed = allocations.retain_owners(&valid);
        assert_eq!(freed.len(), 2);
        assert_eq!(allocations.owners(), valid);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut allocations = Allocations::default();
        allocations
            .allocate(
                &[net("10.0.0.0/24"), net("fd00::/64")],
                &Owner::new("a", "eth0"),
            )
            .unwrap();
        let json = serde_json::to_string(&allocations).unwrap();
        assert_eq!(
            serde_json::from_str::<Allocations>(&json).unwrap(),
            allocations
        );
    }
}
