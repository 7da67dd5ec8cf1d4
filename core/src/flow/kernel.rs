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
    /// On a pod interface whose pod the node was not told about.
    UnknownPod,
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
