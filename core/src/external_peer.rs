//! External peers of a managed cluster (a laptop, a VM): a WireGuard key and a few addresses
//! that a cluster's administrator admits through one of the cluster's node gateways (on
//! Kubernetes the `Peer` custom resource, in the lab its static source), pure.
//!
//! Who may create a peer is the cluster's business (Kubernetes RBAC); what a peer may make the
//! mesh route is checked here like a peer cluster's claims ([`crate::claims`]), because the
//! cluster advertises the peer's addresses to its peer clusters as its own:
//! * its allowed IPs are canonical prefixes inside the ranges this cluster may claim (its
//!   certificate's), never a default route or a special range, and overlap no node's pod CIDR,
//!   no service CIDR, no other peer and no other cluster's range;
//! * its key is a 32-byte WireGuard key that no node (local or remote) and no other peer has;
//! * at least one of its nodes exists and runs a gateway: the first such node (in the order the
//!   spec lists them) carries it, the others stand by.
//!
//! A refused peer gets a reason and changes nothing else: the accepted ones are decided as if
//! it did not exist. Peers are checked in name order, so of two overlapping peers the one whose
//! name sorts first keeps its addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cidr::overlaps;
use crate::claims::{is_dns1123_subdomain, special_range, too_broad};
use crate::cluster::ClusterState;
use crate::wgkey::PublicKey;

/// The most external peers one cluster admits; the rest are refused (by name order).
pub const MAX_PEERS: usize = 1000;
/// The most allowed IPs one peer may have.
pub const MAX_ALLOWED_IPS: usize = 64;
/// The most nodes one peer may list.
pub const MAX_NODES: usize = 16;

/// A peer as its author wrote it: the fields are checked here, not by a parser, so a typo
/// gets a reason on the peer instead of failing the source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalPeerSpec {
    pub name: String,
    /// The object's identity where the source has one (a Kubernetes `uid`): a Peer deleted
    /// and re-created under its name is another object, whose status is written afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Base64 WireGuard public key.
    pub public_key: String,
    /// CIDRs, e.g. `10.1.200.1/32`.
    pub allowed_ips: Vec<String>,
    /// The nodes whose gateways may carry it, in order of preference.
    pub nodes: Vec<String>,
    /// Seconds; `None` or 0 for none.
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
    /// The preshared key, when the spec names one and its Secret holds a valid one.
    #[serde(default)]
    pub preshared_key: Option<PresharedKeyRef>,
}

/// Where a peer's preshared key comes from, resolved by the source (a Secret in the
/// controller's namespace, key `presharedKey`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresharedKeyRef {
    pub secret: String,
    /// The key, or why there is none usable.
    pub key: Result<PresharedKey, String>,
}

/// A WireGuard preshared key (32 bytes). Its `Debug` hides it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PresharedKey(pub [u8; 32]);

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

impl std::str::FromStr for PresharedKey {
    type Err = crate::wgkey::KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::wgkey::decode_key(s.trim()).map(Self)
    }
}

impl Serialize for PresharedKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::wgkey::encode_key(&self.0))
    }
}

impl<'de> Deserialize<'de> for PresharedKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An admitted peer: what its node's gateway gets and where the mesh routes its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedPeer {
    pub name: String,
    pub public_key: PublicKey,
    pub allowed_ips: Vec<IpNet>,
    /// The node whose gateway carries it.
    pub node: String,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<PresharedKey>,
}

/// Why a peer is not ready: the `reason` of its `Ready=False` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Refusal {
    /// Malformed: a bad name, key or CIDR, no addresses or nodes, too many of them.
    InvalidSpec,
    /// Outside the ranges this cluster may claim (or the cluster may claim none).
    OutsideAllowance,
    /// Its addresses or key collide with a node, a service range, another cluster or peer.
    Overlaps,
    /// None of its nodes exists with a registered gateway.
    NoGateway,
    /// Its preshared key Secret is missing or does not hold a key.
    PresharedKey,
    /// Past [`MAX_PEERS`].
    TooManyPeers,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::InvalidSpec => "InvalidSpec",
            Refusal::OutsideAllowance => "OutsideAllowance",
            Refusal::Overlaps => "Overlaps",
            Refusal::NoGateway => "NoGateway",
            Refusal::PresharedKey => "PresharedKeyUnavailable",
            Refusal::TooManyPeers => "TooManyPeers",
        }
    }
}

/// The `Ready` condition a peer gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub ready: bool,
    /// `Accepted`, or a [`Refusal::reason`].
    pub reason: String,
    pub message: String,
}

/// One external peer in a controller's `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The node whose gateway carries it (when accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// What the peers are checked against.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The local cluster as the source and the gateways' registrations describe it (before
    /// any peer is added to it).
    pub local: &'a ClusterState,
    /// The ranges this cluster may claim (its certificate's RFC 3779 ranges); `None`: none.
    pub allowance: Option<&'a [IpNet]>,
    /// The other clusters of the mesh: what they may claim or claim.
    pub other_ranges: &'a [IpNet],
    /// Keys of the other clusters' nodes.
    pub other_keys: &'a BTreeSet<PublicKey>,
}

/// Every peer's verdict, and the accepted ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    pub accepted: Vec<AcceptedPeer>,
    /// By peer name.
    pub verdicts: BTreeMap<String, Verdict>,
    /// The uid of the object each verdict is about, by peer name (where the source has one).
    pub uids: BTreeMap<String, String>,
}

impl Admission {
    /// The local state with every accepted peer's addresses behind its node: peer clusters
    /// then route them there (they lie inside this cluster's certified ranges, so the claim
    /// rules admit them), and the cluster's other nodes too.
    pub fn advertise(&self, state: &mut ClusterState) {
        for peer in &self.accepted {
            if let Some(node) = state.nodes.get_mut(&peer.node) {
                node.pod_cidrs.extend(peer.allowed_ips.iter().copied());
            }
        }
    }

    /// Every peer's status line, by name.
    pub fn statuses(&self) -> Vec<PeerStatus> {
        self.verdicts
            .iter()
            .map(|(name, verdict)| PeerStatus {
                name: name.clone(),
                verdict: verdict.clone(),
                node: self
                    .accepted
                    .iter()
                    .find(|p| &p.name == name)
                    .map(|p| p.node.clone()),
            })
            .collect()
    }

    /// The peers the gateway of `node` carries.
    pub fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a AcceptedPeer> {
        self.accepted.iter().filter(move |p| p.node == node)
    }
}

fn refused(kind: Refusal, message: impl Into<String>) -> (Refusal, String) {
    (kind, message.into())
}

/// Checks every peer (see the module's rules); pure.
pub fn admit(peers: &[ExternalPeerSpec], ctx: &Context<'_>) -> Admission {
    let mut sorted: Vec<&ExternalPeerSpec> = peers.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut admission = Admission::default();
    let mut seen_names = BTreeSet::new();
    for (index, spec) in sorted.into_iter().enumerate() {
        if !seen_names.insert(spec.name.as_str()) {
            // A name is the peer's identity; a second one of the same name is the source's
            // mistake and refused without replacing the first's verdict.
            continue;
        }
        let verdict = if index >= MAX_PEERS {
            Err(refused(
                Refusal::TooManyPeers,
                format!("more than {MAX_PEERS} peers; the first by name are admitted"),
            ))
        } else {
            check(spec, ctx, &admission.accepted)
        };
        let verdict = match verdict {
            Ok(peer) => {
                let message = format!(
                    "attached to node {} with {}",
                    peer.node,
                    peer.allowed_ips
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                admission.accepted.push(peer);
                Verdict {
                    ready: true,
                    reason: "Accepted".into(),
                    message,
                }
            }
            Err((kind, message)) => Verdict {
                ready: false,
                reason: kind.reason().into(),
                message,
            },
        };
        admission.verdicts.insert(spec.name.clone(), verdict);
        if let Some(uid) = &spec.uid {
            admission.uids.insert(spec.name.clone(), uid.clone());
        }
    }
    admission
}

fn check(
    spec: &ExternalPeerSpec,
    ctx: &Context<'_>,
    accepted: &[AcceptedPeer],
) -> Result<AcceptedPeer, (Refusal, String)> {
    if !is_dns1123_subdomain(&spec.name) {
        return Err(refused(
            Refusal::InvalidSpec,
            "the name is not a DNS-1123 subdomain",
        ));
    }
    let public_key: PublicKey = spec.public_key.trim().parse().map_err(|_| {
        refused(
            Refusal::InvalidSpec,
            "publicKey is not a base64 WireGuard key (32 bytes)",
        )
    })?;
    if spec.allowed_ips.is_empty() || spec.allowed_ips.len() > MAX_ALLOWED_IPS {
        return Err(refused(
            Refusal::InvalidSpec,
            format!("allowedIPs must list 1 to {MAX_ALLOWED_IPS} CIDRs"),
        ));
    }
    if spec.nodes.is_empty() || spec.nodes.len() > MAX_NODES {
        return Err(refused(
            Refusal::InvalidSpec,
            format!("nodes must list 1 to {MAX_NODES} node names"),
        ));
    }
    let mut allowed_ips: Vec<IpNet> = Vec::with_capacity(spec.allowed_ips.len());
    for text in &spec.allowed_ips {
        let net: IpNet = text.trim().parse().map_err(|_| {
            refused(
                Refusal::InvalidSpec,
                format!("allowedIPs: {text:?} is not a CIDR"),
            )
        })?;
        if net.trunc() != net {
            return Err(refused(
                Refusal::InvalidSpec,
                format!(
                    "allowedIPs: {net} has host bits set (did you mean {})?",
                    net.trunc()
                ),
            ));
        }
        if too_broad(&net) {
            return Err(refused(
                Refusal::InvalidSpec,
                format!("allowedIPs: {net} is too broad (no default routes)"),
            ));
        }
        if let Some(what) = special_range(&net) {
            return Err(refused(
                Refusal::InvalidSpec,
                format!("allowedIPs: {net} touches the {what} range"),
            ));
        }
        if let Some(other) = allowed_ips.iter().find(|o| overlaps(o, &net)) {
            return Err(refused(
                Refusal::InvalidSpec,
                format!("allowedIPs: {net} overlaps {other} of the same peer"),
            ));
        }
        allowed_ips.push(net);
    }
    let Some(allowance) = ctx.allowance.filter(|a| !a.is_empty()) else {
        return Err(refused(
            Refusal::OutsideAllowance,
            "this cluster's certificate names no address ranges, so it may claim none for a peer",
        ));
    };
    for net in &allowed_ips {
        if !allowance.iter().any(|range| range.contains(net)) {
            return Err(refused(
                Refusal::OutsideAllowance,
                format!(
                    "allowedIPs: {net} is outside the ranges this cluster may claim ({})",
                    allowance
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    for net in &allowed_ips {
        for (name, node) in &ctx.local.nodes {
            if let Some(cidr) = node.pod_cidrs.iter().find(|c| overlaps(c, net)) {
                return Err(refused(
                    Refusal::Overlaps,
                    format!("allowedIPs: {net} overlaps pod CIDR {cidr} of node {name}"),
                ));
            }
            if let Some(ip) = node.internal_ips.iter().find(|ip| net.contains(*ip)) {
                return Err(refused(
                    Refusal::Overlaps,
                    format!("allowedIPs: {net} covers address {ip} of node {name}"),
                ));
            }
        }
        if let Some(cidr) = ctx.local.service_cidrs.iter().find(|c| overlaps(c, net)) {
            return Err(refused(
                Refusal::Overlaps,
                format!("allowedIPs: {net} overlaps the service CIDR {cidr}"),
            ));
        }
        if let Some(range) = ctx.other_ranges.iter().find(|r| overlaps(r, net)) {
            return Err(refused(
                Refusal::Overlaps,
                format!("allowedIPs: {net} overlaps {range} of another cluster"),
            ));
        }
        if let Some(other) = accepted
            .iter()
            .find(|p| p.allowed_ips.iter().any(|o| overlaps(o, net)))
        {
            return Err(refused(
                Refusal::Overlaps,
                format!("allowedIPs: {net} overlaps peer {}", other.name),
            ));
        }
    }
    if let Some((name, _)) = ctx.local.nodes.iter().find(|(_, n)| {
        n.gateway
            .as_ref()
            .is_some_and(|g| g.public_key == public_key)
    }) {
        return Err(refused(
            Refusal::Overlaps,
            format!("publicKey is the key of node {name}'s gateway"),
        ));
    }
    if ctx.other_keys.contains(&public_key) {
        return Err(refused(
            Refusal::Overlaps,
            "publicKey is the key of another cluster's node",
        ));
    }
    if let Some(other) = accepted.iter().find(|p| p.public_key == public_key) {
        return Err(refused(
            Refusal::Overlaps,
            format!("publicKey is also peer {}'s", other.name),
        ));
    }
    let preshared_key = match &spec.preshared_key {
        None => None,
        Some(PresharedKeyRef { key: Ok(key), .. }) => Some(*key),
        Some(PresharedKeyRef {
            secret,
            key: Err(why),
        }) => {
            return Err(refused(
                Refusal::PresharedKey,
                format!("presharedKeySecret {secret:?}: {why}"),
            ));
        }
    };
    let node = spec
        .nodes
        .iter()
        .find(|n| {
            ctx.local
                .nodes
                .get(n.as_str())
                .is_some_and(|node| node.gateway.is_some())
        })
        .ok_or_else(|| {
            refused(
                Refusal::NoGateway,
                format!(
                    "none of the nodes {} exists with a registered gateway",
                    spec.nodes.join(", ")
                ),
            )
        })?;
    Ok(AcceptedPeer {
        name: spec.name.clone(),
        public_key,
        allowed_ips,
        node: node.clone(),
        persistent_keepalive: spec.persistent_keepalive.filter(|k| *k > 0),
        preshared_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::fixture::cluster;
    use crate::cluster::{NodeGateway, NodeState};

    fn key(n: u8) -> String {
        crate::wgkey::encode_key(&[n; 32])
    }

    fn local() -> ClusterState {
        let mut c = cluster("c1", "10.1.0.0/24", "10.101.0.0/16");
        c.nodes.clear();
        for (i, name) in ["node-0", "node-1"].iter().enumerate() {
            c.nodes.insert(
                name.to_string(),
                NodeState {
                    name: name.to_string(),
                    pod_cidrs: vec![format!("10.1.{i}.0/24").parse().unwrap()],
                    internal_ips: vec![format!("198.18.1.{}", 10 + i).parse().unwrap()],
                    gateway: (i == 0).then(|| NodeGateway {
                        endpoint: "198.18.1.10:51820".parse().unwrap(),
                        public_key: PublicKey([0xAA; 32]),
                    }),
                },
            );
        }
        c
    }

    fn peer(name: &str, ip: &str, n: u8) -> ExternalPeerSpec {
        ExternalPeerSpec {
            name: name.into(),
            public_key: key(n),
            allowed_ips: vec![ip.into()],
            nodes: vec!["node-0".into()],
            persistent_keepalive: Some(25),
            preshared_key: None,
            uid: None,
        }
    }

    fn run(peers: &[ExternalPeerSpec]) -> Admission {
        let local = local();
        let allowance: Vec<IpNet> = vec![
            "10.1.0.0/16".parse().unwrap(),
            "10.101.0.0/16".parse().unwrap(),
        ];
        let others: Vec<IpNet> = vec!["10.2.0.0/16".parse().unwrap()];
        let other_keys = BTreeSet::from([PublicKey([0xBB; 32])]);
        admit(
            peers,
            &Context {
                local: &local,
                allowance: Some(&allowance),
                other_ranges: &others,
                other_keys: &other_keys,
            },
        )
    }

    fn reason(a: &Admission, name: &str) -> String {
        a.verdicts[name].reason.clone()
    }

    #[test]
    fn a_good_peer_rides_its_first_node_with_a_gateway_and_is_advertised_there() {
        let mut p = peer("laptop", "10.1.200.1/32", 1);
        p.nodes = vec!["node-9".into(), "node-1".into(), "node-0".into()];
        let a = run(&[p]);
        assert_eq!(reason(&a, "laptop"), "Accepted");
        assert!(a.verdicts["laptop"].ready);
        let accepted = &a.accepted[0];
        assert_eq!(
            accepted.node, "node-0",
            "node-9 does not exist, node-1 has no gateway"
        );
        assert_eq!(accepted.persistent_keepalive, Some(25));
        assert_eq!(a.on_node("node-0").count(), 1);
        assert_eq!(a.on_node("node-1").count(), 0);
        let mut state = local();
        a.advertise(&mut state);
        assert_eq!(
            state.nodes["node-0"].pod_cidrs,
            vec![
                "10.1.0.0/24".parse::<IpNet>().unwrap(),
                "10.1.200.1/32".parse().unwrap()
            ]
        );
    }

    #[test]
    fn claims_on_what_is_not_the_clusters_to_give_are_refused_and_change_nothing_else() {
        let good = peer("good", "10.1.200.1/32", 1);
        let cases = [
            (peer("other-cluster", "10.2.0.5/32", 2), "OutsideAllowance"),
            (peer("pods", "10.1.1.0/25", 3), "Overlaps"),
            (peer("services", "10.101.0.10/32", 4), "Overlaps"),
            (peer("default-route", "0.0.0.0/0", 5), "InvalidSpec"),
            (peer("half", "128.0.0.0/1", 6), "InvalidSpec"),
            (peer("host-bits", "10.1.200.1/24", 7), "InvalidSpec"),
            (peer("not-a-cidr", "ten", 8), "InvalidSpec"),
            (peer("same-key", "10.1.201.1/32", 1), "Overlaps"),
            (peer("zz-same-addr", "10.1.200.0/30", 9), "Overlaps"),
            (peer("node-key", "10.1.202.1/32", 0xAA), "Overlaps"),
            (peer("remote-key", "10.1.203.1/32", 0xBB), "Overlaps"),
        ];
        let mut all = vec![good.clone()];
        all.extend(cases.iter().map(|(p, _)| p.clone()));
        let a = run(&all);
        for (p, expected) in &cases {
            assert_eq!(
                reason(&a, &p.name),
                *expected,
                "{}: {}",
                p.name,
                a.verdicts[&p.name].message
            );
            assert!(!a.verdicts[&p.name].ready);
        }
        assert_eq!(a.accepted.len(), 1);
        assert_eq!(
            a.accepted,
            run(&[good]).accepted,
            "the refused change nothing"
        );
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        let mut bad_key = peer("a", "10.1.200.1/32", 1);
        bad_key.public_key = "not a key".into();
        let mut no_nodes = peer("b", "10.1.200.2/32", 2);
        no_nodes.nodes.clear();
        let mut no_ips = peer("c", "10.1.200.3/32", 3);
        no_ips.allowed_ips.clear();
        let bad_name = peer("Not_A_Name", "10.1.200.4/32", 4);
        let mut no_gateway = peer("d", "10.1.200.5/32", 5);
        no_gateway.nodes = vec!["node-1".into()];
        let mut psk = peer("e", "10.1.200.6/32", 6);
        psk.preshared_key = Some(PresharedKeyRef {
            secret: "laptop-psk".into(),
            key: Err("not found".into()),
        });
        let a = run(&[bad_key, no_nodes, no_ips, bad_name, no_gateway, psk]);
        assert!(a.verdicts["a"].message.contains("publicKey"));
        assert_eq!(reason(&a, "b"), "InvalidSpec");
        assert_eq!(reason(&a, "c"), "InvalidSpec");
        assert_eq!(reason(&a, "Not_A_Name"), "InvalidSpec");
        assert_eq!(reason(&a, "d"), "NoGateway");
        assert_eq!(reason(&a, "e"), "PresharedKeyUnavailable");
        assert!(a.accepted.is_empty());
    }

    #[test]
    fn without_an_allowance_nothing_is_admitted() {
        let local = local();
        let keys = BTreeSet::new();
        let a = admit(
            &[peer("laptop", "10.1.200.1/32", 1)],
            &Context {
                local: &local,
                allowance: None,
                other_ranges: &[],
                other_keys: &keys,
            },
        );
        assert_eq!(reason(&a, "laptop"), "OutsideAllowance");
    }

    #[test]
    fn the_peer_whose_name_sorts_first_keeps_contested_addresses_whatever_the_order() {
        let b = peer("b", "10.1.200.0/30", 2);
        let a = peer("a", "10.1.200.1/32", 1);
        let one = run(&[b.clone(), a.clone()]);
        let two = run(&[a, b]);
        assert_eq!(one, two);
        assert_eq!(reason(&one, "a"), "Accepted");
        assert_eq!(reason(&one, "b"), "Overlaps");
    }

    #[test]
    fn preshared_keys_parse_and_never_print() {
        let k: PresharedKey = key(7).parse().unwrap();
        assert_eq!(format!("{k:?}"), "PresharedKey(..)");
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<PresharedKey>(&json).unwrap(), k);
        assert!("short".parse::<PresharedKey>().is_err());
    }
}
