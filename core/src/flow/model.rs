//! A flow record, Hubble's essentials (`cilium/api/v1/flow/flow.proto`) under its names: when,
//! where it was seen, the verdict and why, addresses and ports, both ends named (cluster,
//! namespace, pod, labels, identity), the direction, the policies behind the verdict, and
//! whether it crossed a WireGuard tunnel.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One observation on one node: a connection opened or closed (conntrack), or a packet the
/// policy table dropped (NFLOG).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// Where it was seen: `<cluster>/<node>` (Hubble's `node_name` in a cluster mesh).
    pub node_name: String,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<DropReason>,
    pub event: FlowEvent,
    pub ip: Ip,
    pub l4: L4,
    /// Shared: the same pod's name and labels are not copied into every flow it makes.
    pub source: Arc<Endpoint>,
    pub destination: Arc<Endpoint>,
    /// Relative to the local pod the node saw it for: leaving it (egress) or reaching it
    /// (ingress). A connection between two pods of one node is seen twice, once each way.
    pub traffic_direction: TrafficDirection,
    /// The policy rules that allowed it in `traffic_direction` (empty: the pod is not isolated
    /// that way).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_by: Vec<PolicyRef>,
    /// The policies that isolate the pod and of which no rule allowed it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_by: Vec<PolicyRef>,
    /// The WireGuard peer the connection goes through on this node, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Tunnel>,
    /// Packets and bytes each way, on [`FlowEvent::ConnectionClosed`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Counters>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Forwarded,
    Dropped,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "FORWARDED",
            Verdict::Dropped => "DROPPED",
        }
    }
}

impl std::str::FromStr for Verdict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "FORWARDED" => Ok(Verdict::Forwarded),
            "DROPPED" => Ok(Verdict::Dropped),
            _ => Err(format!("{s:?} is not a verdict (FORWARDED or DROPPED)")),
        }
    }
}

/// Why a packet was dropped (Hubble's `drop_reason_desc` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DropReason {
    /// Its pod is isolated in that direction and no policy rule allows it.
    PolicyDenied,
    /// On a pod interface whose pod the node was not told about.
    UnknownPod,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::PolicyDenied => "POLICY_DENIED",
            DropReason::UnknownPod => "UNKNOWN_POD",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowEvent {
    /// Conntrack confirmed a new connection: its first packet passed every check.
    ConnectionNew,
    /// Conntrack removed the connection; [`Flow::counters`] say how much went each way.
    ConnectionClosed,
    /// The policy table dropped a packet.
    PacketDropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrafficDirection {
    Ingress,
    Egress,
}

impl TrafficDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficDirection::Ingress => "INGRESS",
            TrafficDirection::Egress => "EGRESS",
        }
    }
}

/// The connection's addresses as its first packet carried them, after any DNAT (a Service's
/// address is shown as the backend pod it was translated to, as Hubble does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ip {
    pub source: IpAddr,
    pub destination: IpAddr,
    /// It crossed this node in a WireGuard tunnel ([`Flow::tunnel`] names the peer).
    pub encrypted: bool,
}

/// Layer 4: ports for TCP, UDP and SCTP, type and code for ICMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4 {
    pub protocol: L4Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u16>,
    /// The flags of the packet seen (a dropped packet's, or the opening SYN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<TcpFlags>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<Icmp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum L4Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
    #[serde(rename = "ICMPv4")]
    Icmpv4,
    #[serde(rename = "ICMPv6")]
    Icmpv6,
    /// Any other IP protocol, by number.
    #[serde(rename = "other")]
    Other(u8),
}

impl L4Protocol {
    /// From the IP protocol number.
    pub fn from_number(number: u8) -> Self {
        match number {
            6 => L4Protocol::Tcp,
            17 => L4Protocol::Udp,
            132 => L4Protocol::Sctp,
            1 => L4Protocol::Icmpv4,
            58 => L4Protocol::Icmpv6,
            n => L4Protocol::Other(n),
        }
    }

    pub fn number(self) -> u8 {
        match self {
            L4Protocol::Tcp => 6,
            L4Protocol::Udp => 17,
            L4Protocol::Sctp => 132,
            L4Protocol::Icmpv4 => 1,
            L4Protocol::Icmpv6 => 58,
            L4Protocol::Other(n) => n,
        }
    }

    /// Lower case, as `--protocol` takes it and the compact line prints it.
    pub fn name(self) -> String {
        match self {
            L4Protocol::Tcp => "tcp".into(),
            L4Protocol::Udp => "udp".into(),
            L4Protocol::Sctp => "sctp".into(),
            L4Protocol::Icmpv4 => "icmp".into(),
            L4Protocol::Icmpv6 => "icmpv6".into(),
            L4Protocol::Other(n) => format!("proto-{n}"),
        }
    }
}

/// The TCP flags Hubble shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub struct TcpFlags {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub syn: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fin: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rst: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub psh: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub urg: bool,
}

impl TcpFlags {
    /// From the flags byte of a TCP header (FIN is bit 0).
    pub fn from_byte(byte: u8) -> Self {
        Self {
            fin: byte & 0x01 != 0,
            syn: byte & 0x02 != 0,
            rst: byte & 0x04 != 0,
            psh: byte & 0x08 != 0,
            ack: byte & 0x10 != 0,
            urg: byte & 0x20 != 0,
        }
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (self.syn, "SYN"),
            (self.ack, "ACK"),
            (self.fin, "FIN"),
            (self.rst, "RST"),
            (self.psh, "PSH"),
            (self.urg, "URG"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect();
        f.write_str(&set.join(","))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub kind: u8,
    pub code: u8,
}

/// What an address is, as far as the node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    /// A pod of the mesh (this cluster or an admitted peer's).
    Pod,
    /// A node of the mesh, or an address in a node's pod range that is no known pod.
    Node,
    /// Anything else (Hubble's `reserved:world`).
    World,
}

/// One end of a flow, named as the mesh's identities name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub kind: EndpointKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The pod's node (for a pod), or the node itself (for [`EndpointKind::Node`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The identity's number in its cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
}

impl Endpoint {
    /// An end nothing is known of.
    pub fn world() -> Self {
        Self {
            kind: EndpointKind::World,
            cluster: None,
            namespace: None,
            pod_name: None,
            node_name: None,
            labels: BTreeMap::new(),
            identity: None,
        }
    }

    /// `cluster/namespace/pod` for a pod, `cluster/node` for a node, `world` otherwise
    /// (what the compact line prints before the port).
    pub fn display_name(&self) -> String {
        match (self.kind, &self.cluster, &self.namespace, &self.pod_name) {
            (EndpointKind::Pod, Some(c), Some(ns), Some(pod)) => format!("{c}/{ns}/{pod}"),
            (EndpointKind::Node, Some(c), _, _) => match &self.node_name {
                Some(node) => format!("{c}/{node}"),
                None => format!("{c}/node"),
            },
            _ => "world".into(),
        }
    }
}

/// A NetworkPolicy by name, and the rule of it that allowed (when known).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyRef {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    /// The rule's index in the policy's `ingress` or `egress` list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The WireGuard peer a flow went through on this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tunnel {
    pub peer_cluster: String,
    pub peer_node: String,
}

/// Conntrack's accounting: `sent` is what the connection's source sent, `received` what it
/// got back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets_sent: u64,
    pub bytes_sent: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
}

/// `time` as RFC 3339 with nanoseconds in UTC (Hubble's JSON form).
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_nanos(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}
