//! Longest-prefix match from IP addresses to peers (WireGuard's "allowed IPs"), IPv4 and IPv6.
//!
//! Prefixes are bucketed by length; a lookup probes the lengths in use, longest first, so it
//! costs one hash probe per distinct prefix length, whatever the number of peers.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Buckets<u32, T>,
    v6: Buckets<u128, T>,
}

#[derive(Debug, Clone)]
struct Buckets<K, T> {
    /// (prefix length, network → value), longest prefix first.
    by_len: Vec<(u8, HashMap<K, T>)>,
}

impl<K: Copy + Eq + std::hash::Hash, T> Buckets<K, T> {
    fn insert(&mut self, len: u8, key: K, value: T) {
        let at = match self.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(at) => at,
            Err(at) => {
                self.by_len.insert(at, (len, HashMap::new()));
                at
            }
        };
        self.by_len[at].1.insert(key, value);
    }

    fn lookup(&self, mask: impl Fn(u8) -> K) -> Option<(u8, &T)> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(*len)).map(|value| (*len, value)))
    }
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Buckets { by_len: Vec::new() },
            v6: Buckets { by_len: Vec::new() },
        }
    }
}

fn mask_v4(address: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        address & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask_v6(address: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        address & (u128::MAX << (128 - u32::from(len)))
    }
}

impl<T> AllowedIps<T> {
    /// Maps `net` (host bits ignored) to `value`, replacing what it mapped to before.
    pub fn insert(&mut self, net: IpNet, value: T) {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                self.v4
                    .insert(len, mask_v4(u32::from(n.addr()), len), value);
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                self.v6
                    .insert(len, mask_v6(u128::from(n.addr()), len), value);
            }
        }
    }

    /// The value of the longest prefix containing `address`.
    pub fn lookup(&self, address: IpAddr) -> Option<&T> {
        self.lookup_prefix(address).map(|(_, value)| value)
    }

    /// The longest prefix containing `address`: its length and value.
    pub fn lookup_prefix(&self, address: IpAddr) -> Option<(u8, &T)> {
        match address {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.lookup(|len| mask_v4(a, len))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.lookup(|len| mask_v6(a, len))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let mut table = AllowedIps::default();
        table.insert("10.0.0.0/8".parse().unwrap(), 1);
        table.insert("10.1.0.0/16".parse().unwrap(), 2);
        table.insert("10.1.2.3/32".parse().unwrap(), 3);
        table.insert("0.0.0.0/0".parse().unwrap(), 0);
        table.insert("fd00::/8".parse().unwrap(), 6);
        table.insert("fd00:1::/32".parse().unwrap(), 7);
        let at = |s: &str| table.lookup(s.parse().unwrap()).copied();
        assert_eq!(at("10.1.2.3"), Some(3));
        assert_eq!(at("10.1.2.4"), Some(2));
        assert_eq!(at("10.9.9.9"), Some(1));
        assert_eq!(at("192.0.2.1"), Some(0));
        assert_eq!(at("fd00:1::5"), Some(7));
        assert_eq!(at("fd00:2::5"), Some(6));
        assert_eq!(at("2001:db8::1"), None);
    }

    #[test]
    fn host_bits_are_ignored_and_reinsert_replaces() {
        let mut table = AllowedIps::default();
        table.insert("10.1.2.77/24".parse().unwrap(), 'a');
        table.insert("10.1.2.0/24".parse().unwrap(), 'b');
        assert_eq!(table.lookup("10.1.2.1".parse().unwrap()), Some(&'b'));
    }
}
