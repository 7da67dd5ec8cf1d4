//! A node's policy ruleset as plain data, in nftables' terms: address sets per selector,
//! chains of rules, and verdict maps from each local pod's address to its chains. The
//! compiler makes one from [`super::PolicyInputs`]; the node agent renders it into its own
//! nftables table and applies the difference from the last one.
//!
//! How the node's table uses it (the fixed part, owned by the renderer):
//! * a packet from a pod interface is first checked against its pod's egress chain (found in
//!   [`Ruleset::egress`] by source address), a packet to a pod interface against its pod's
//!   ingress chain ([`Ruleset::ingress`], by destination address); a pod in neither map is not
//!   isolated in that direction;
//! * connections already established (and related ones, and replies) pass first, so policy
//!   decides on a connection's first packet, as conntrack-based Calico and Cilium do;
//! * traffic on a pod interface whose pod address is not in [`Ruleset::local_pods`] (a pod not
//!   yet known to the controller) is dropped; traffic the node itself sends to its pods is
//!   never filtered.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cluster::Protocol;

/// Names of sets and chains: `[a-z0-9_]`, starting with a letter, at most 64 bytes.
pub type Name = String;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(address: &IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

/// Prefixes of one family, disjoint (no element contains another), so an nftables interval
/// set takes them as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressSet {
    pub family: Family,
    pub elements: BTreeSet<IpNet>,
}

/// (destination address, protocol, port) triples of one family: an egress rule that names a
/// port allows each selected pod on the port that pod gives that name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSet {
    pub family: Family,
    pub elements: BTreeSet<(IpAddr, Protocol, u16)>,
}

/// One condition of a rule; a rule matches when all of its conditions do.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Match {
    /// The source address is in the named address set (and of its family).
    SourceIn { set: Name },
    /// The destination address is in the named address set (and of its family).
    DestinationIn { set: Name },
    /// The layer-4 protocol.
    Protocol { protocol: Protocol },
    /// The destination port is in one of the inclusive ranges (with a [`Match::Protocol`]).
    DestinationPorts { ranges: Vec<(u16, u16)> },
    /// (destination address, protocol, destination port) is in the named service set.
    DestinationServiceIn { set: Name },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Verdict {
    Accept,
    /// Dropped and counted in the direction's drop counter.
    Drop {
        direction: Direction,
    },
    /// Into another chain; if no rule there decides, back here at the next rule.
    Jump {
        chain: Name,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub verdict: Verdict,
    /// Which policy and rule this comes from (for people reading `nft list`, and for flows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// The whole policy state of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ruleset {
    pub address_sets: BTreeMap<Name, AddressSet>,
    pub service_sets: BTreeMap<Name, ServiceSet>,
    pub chains: BTreeMap<Name, Vec<Rule>>,
    /// A local pod isolated for ingress → the chain its incoming connections go through.
    pub ingress: BTreeMap<IpAddr, Name>,
    /// A local pod isolated for egress → the chain its outgoing connections go through.
    pub egress: BTreeMap<IpAddr, Name>,
    /// Every local pod's address.
    pub local_pods: BTreeSet<IpAddr>,
}

impl Ruleset {
    /// The number of rules over all chains (the `trellis_policy_rules` figure).
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(Vec::len).sum()
    }
}
