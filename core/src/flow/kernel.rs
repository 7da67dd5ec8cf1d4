//! What the kernel reports, before anything is named: conntrack's events on connections and
//! the packets the policy table logs (NFLOG) as it drops them. The node agent's listeners
//! parse netlink into these; naming them ([`super::Flow`]) is the agent's pure enricher.

use std::net::IpAddr;
use std::time::SystemTime;

use super::model::{Counters, L4Protocol, TcpFlags};

/// The addresses and ports of one direction of a connection (conntrack's tuple).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: L4Protocol,
    /// Ports for TCP, UDP and SCTP; ICMP's id as the source port, 0 otherwise.
    pub source_port: u16,
    pub destination_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConntrackEventKind {
    /// A connection was confirmed (its first packet left the node's netfilter accepted).
    New,
    /// A connection was removed (closed, or timed out).
    Destroy,
}

/// One conntrack event (`NFNLGRP_CONNTRACK_NEW` / `_DESTROY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackEvent {
    pub time: SystemTime,
    pub kind: ConntrackEventKind,
    /// As the first packet carried it.
    pub original: Tuple,
    /// As the answer comes back: its source differs from `original.destination` after DNAT
    /// (a Service), its destination from `original.source` after SNAT.
    pub reply: Tuple,
    /// With `nf_conntrack_acct` on, on [`ConntrackEventKind::Destroy`].
    pub counters: Option<Counters>,
}

/// Where in the policy table a packet was dropped: what the NFLOG prefix says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DropPoint {
    /// At the end of a local pod's chain (ingress or egress): no policy rule allowed it.
    /// `chain` is the pod chain's name (`names::pod_chain`).
    PodChain {
        direction: crate::policy::ruleset::Direction,
        chain: String,
    },
    /// A pod isolated in `direction` whose verdict-map entry was missing for an instant.
    Isolated {
        direction: crate::policy::ruleset::Direction,
    },
    /// On a pod interface whose pod the node was not told about: in the ingress chain (the
    /// packet was going to it) or the egress one (it came from it).
    UnknownPod {
        direction: crate::policy::ruleset::Direction,
    },
}

/// One packet the policy table dropped and logged (NFLOG), its headers parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketDrop {
    pub time: SystemTime,
    pub point: DropPoint,
    pub packet: Tuple,
    /// For TCP.
    pub tcp_flags: Option<TcpFlags>,
    /// For ICMP: type and code.
    pub icmp: Option<(u8, u8)>,
}

/// What the listeners hand to the enricher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Conntrack(ConntrackEvent),
    Drop(PacketDrop),
}

/// The NFLOG group the policy table logs its drops to. Far from the small numbers others
/// take (Calico's 1 and 2, ulogd's and iptables examples' 0 to 2), so a node running one of
/// them beside Trellis does not have its log group bound twice.
pub const NFLOG_GROUP: u16 = 1616;

/// What every prefix of ours starts with: other rules logging to the same group (someone's
/// debugging rule) are told apart and ignored.
const PREFIX: &str = "trellis:";

fn direction_tag(direction: crate::policy::ruleset::Direction) -> &'static str {
    match direction {
        crate::policy::ruleset::Direction::Ingress => "in",
        crate::policy::ruleset::Direction::Egress => "eg",
    }
}

fn direction_of(tag: &str) -> Option<crate::policy::ruleset::Direction> {
    match tag {
        "in" => Some(crate::policy::ruleset::Direction::Ingress),
        "eg" => Some(crate::policy::ruleset::Direction::Egress),
        _ => None,
    }
}

/// A ruleset name as the policy table takes it: `[a-z0-9_]`, starting with a letter, at most
/// 64 bytes.
fn valid_chain(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl DropPoint {
    /// The NFLOG prefix the policy table's rule dropping here logs with: `trellis:pod:in:<chain>`,
    /// `trellis:iso:eg`, `trellis:unknown:in`. At most 80 bytes (nft takes 127), only
    /// `[a-z0-9_:]`, so it needs no quoting beyond nft's double quotes.
    pub fn nflog_prefix(&self) -> String {
        match self {
            DropPoint::PodChain { direction, chain } => {
                format!("{PREFIX}pod:{}:{chain}", direction_tag(*direction))
            }
            DropPoint::Isolated { direction } => {
                format!("{PREFIX}iso:{}", direction_tag(*direction))
            }
            DropPoint::UnknownPod { direction } => {
                format!("{PREFIX}unknown:{}", direction_tag(*direction))
            }
        }
    }

    /// The drop point an NFLOG prefix names; `None` for a prefix that is not one of
    /// [`Self::nflog_prefix`]'s (another rule logging to the group).
    pub fn from_nflog_prefix(prefix: &str) -> Option<DropPoint> {
        let rest = prefix.strip_prefix(PREFIX)?;
        if let Some(tag) = rest.strip_prefix("unknown:") {
            return Some(DropPoint::UnknownPod {
                direction: direction_of(tag)?,
            });
        }
        if let Some(tag) = rest.strip_prefix("iso:") {
            return Some(DropPoint::Isolated {
                direction: direction_of(tag)?,
            });
        }
        let (tag, chain) = rest.strip_prefix("pod:")?.split_once(':')?;
        if !valid_chain(chain) {
            return None;
        }
        Some(DropPoint::PodChain {
            direction: direction_of(tag)?,
            chain: chain.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::names;
    use crate::policy::ruleset::Direction;

    #[test]
    fn every_drop_point_reads_back_from_its_prefix() {
        let longest_chain = names::pod_chain("fd00::1:7".parse().unwrap(), Direction::Egress);
        let points = [
            DropPoint::PodChain {
                direction: Direction::Ingress,
                chain: names::pod_chain("10.0.1.7".parse().unwrap(), Direction::Ingress),
            },
            DropPoint::PodChain {
                direction: Direction::Egress,
                chain: longest_chain,
            },
            DropPoint::Isolated {
                direction: Direction::Ingress,
            },
            DropPoint::Isolated {
                direction: Direction::Egress,
            },
            DropPoint::UnknownPod {
                direction: Direction::Ingress,
            },
            DropPoint::UnknownPod {
                direction: Direction::Egress,
            },
        ];
        for point in points {
            let prefix = point.nflog_prefix();
            assert!(prefix.len() <= 80, "{prefix}");
            assert!(
                prefix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_:".contains(&b)),
                "{prefix}"
            );
            assert_eq!(DropPoint::from_nflog_prefix(&prefix), Some(point));
        }
        assert_eq!(
            DropPoint::PodChain {
                direction: Direction::Ingress,
                chain: "pod_in_10_0_1_7".into()
            }
            .nflog_prefix(),
            "trellis:pod:in:pod_in_10_0_1_7"
        );
        assert_eq!(
            DropPoint::UnknownPod {
                direction: Direction::Ingress
            }
            .nflog_prefix(),
            "trellis:unknown:in"
        );
    }

    #[test]
    fn prefixes_of_others_are_not_ours() {
        for prefix in [
            "",
            "calico-drop",
            "trellis:",
            "trellis:iso:up",
            "trellis:pod:in:",
            "trellis:pod:xx:pod_in_1",
            "trellis:pod:in:Pod_In",
            "trellis:pod:in:a b",
            &format!("trellis:pod:in:{}", "a".repeat(65)),
            "trellis:unknown",
            "trellis:unknown:up",
            "trellis:unknown:in:more",
        ] {
            assert_eq!(DropPoint::from_nflog_prefix(prefix), None, "{prefix:?}");
        }
    }
}
