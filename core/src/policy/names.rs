//! Names of the ruleset's chains and sets. Each is derived from what it stands for alone (a
//! policy's key, a rule's index, a pod's address), never from a position among others, so a
//! change elsewhere renames nothing and the node applies only real differences. All fit
//! nftables' and the ruleset's rule: `[a-z0-9_]`, starting with a letter, at most 64 bytes.

use std::net::IpAddr;

use sha2::{Digest, Sha256};

use super::model::PolicyKey;
use super::ruleset::{Direction, Family, Name};

/// 128 bits of SHA-256 of the policy's `namespace/name`: names stay short whatever the
/// policy's name. Not fewer: whoever may create a policy chooses its name, and a name whose
/// tag equals another namespace's policy would share (and replace) that policy's chain and
/// sets on every node; finding one is a second preimage of 128 bits.
fn policy_tag(key: &PolicyKey) -> String {
    let digest = Sha256::digest(format!("{}/{}", key.namespace, key.name));
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn direction_tag(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "in",
        Direction::Egress => "eg",
    }
}

fn family_tag(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "v4",
        Family::Ipv6 => "v6",
    }
}

/// The chain holding a policy's rules for one direction.
pub fn policy_chain(key: &PolicyKey, direction: Direction) -> Name {
    format!("pol_{}_{}", policy_tag(key), direction_tag(direction))
}

/// The address set of one rule's peers (one family).
pub fn peer_set(key: &PolicyKey, direction: Direction, rule: usize, family: Family) -> Name {
    format!(
        "pol_{}_{}{rule}_{}",
        policy_tag(key),
        direction_tag(direction),
        family_tag(family)
    )
}

/// The service set of one rule's named ports (one family).
pub fn named_port_set(key: &PolicyKey, direction: Direction, rule: usize, family: Family) -> Name {
    format!(
        "pol_{}_{}{rule}_ports_{}",
        policy_tag(key),
        direction_tag(direction),
        family_tag(family)
    )
}

/// The chain one local pod's connections in `direction` go through, named by its (lowest)
/// address: `pod_in_10_0_1_7`, or 32 hex digits for IPv6.
pub fn pod_chain(address: IpAddr, direction: Direction) -> Name {
    let address = match address {
        IpAddr::V4(a) => a
            .octets()
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join("_"),
        IpAddr::V6(a) => a.octets().iter().map(|b| format!("{b:02x}")).collect(),
    };
    format!("pod_{}_{address}", direction_tag(direction))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(name: &str) -> bool {
        name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    #[test]
    fn names_are_valid_and_depend_only_on_what_they_name() {
        let key = PolicyKey {
            namespace: "a-very-long-namespace-name-that-kubernetes-allows-up-to-63-chars".into(),
            name: "x".repeat(253),
        };
        let names = [
            policy_chain(&key, Direction::Ingress),
            peer_set(&key, Direction::Egress, 12_345, Family::Ipv6),
            named_port_set(&key, Direction::Ingress, 12_345, Family::Ipv4),
            pod_chain("10.0.1.7".parse().unwrap(), Direction::Ingress),
            pod_chain("fd00::1:7".parse().unwrap(), Direction::Egress),
        ];
        for name in &names {
            assert!(valid(name), "{name}");
        }
        assert_eq!(names[3], "pod_in_10_0_1_7");
        assert_eq!(policy_chain(&key, Direction::Ingress), names[0]);
        let other = PolicyKey {
            namespace: key.namespace.clone(),
            name: "y".into(),
        };
        assert_ne!(policy_chain(&other, Direction::Ingress), names[0]);
        assert_ne!(
            policy_chain(&key, Direction::Egress),
            policy_chain(&key, Direction::Ingress)
        );
    }
}
