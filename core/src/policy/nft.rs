//! A node's [`Ruleset`] as nftables scripts, pure: the whole table (`render_full`), the
//! difference between two rulesets (`render_update`) and the table's removal
//! (`render_delete`). Each script is one `nft -f` transaction: the kernel applies all of it
//! or none, so a packet meets the old rules or the new ones, never a mix.
//!
//! The table `inet trellis_policy` has a fixed part around the ruleset's sets and chains:
//!
//! * base chains `_egress_forward` (hook forward) and `_egress_input` (hook input, a pod
//!   talking to its own node is subject to its egress policy) at priority `filter` jump to
//!   `_egress` for packets from a pod interface (`iifname "trl*"`); `_ingress_forward` (hook
//!   forward, priority `filter + 10`) jumps to `_ingress` for packets to one. An `accept` in
//!   one base chain does not stop the next base chain of the same hook, a `drop` does: a
//!   connection between two pods of the node passes both its client's egress and its
//!   server's ingress policy. Nothing hooks `output`: what the node itself sends (kubelet
//!   probes) is never filtered.
//! * `_egress` (by source address) and `_ingress` (by destination): ICMPv6 neighbour
//!   discovery passes, established and related packets pass, invalid ones are dropped, then
//!   the verdict map (`_egress4`/`_egress6`, `_ingress4`/`_ingress6`) sends an isolated pod's
//!   packet to its chain; a packet of an isolated pod the map did not send anywhere is dropped
//!   (`_isolated_egress4`… hold the maps' keys: the kernel's hash map may miss a key for an
//!   instant while a transaction re-points it to another chain, and that instant must fail
//!   closed, not fall through to the accept below); a packet of a pod in neither map passes
//!   when the pod is one of `local_pods` (`_local4`/`_local6`), and is dropped and counted
//!   (`drop_unknown_pod`) when it is not.
//! * named counters `drop_ingress` and `drop_egress` count the ruleset's
//!   [`Verdict::Drop`]s.
//! * with [`RenderOptions::log_drops`], every drop but the invalid packets' is also logged to
//!   NFLOG group [`NFLOG_GROUP`] with a prefix naming where it happened
//!   ([`DropPoint::nflog_prefix`]): a ruleset's [`Verdict::Drop`] (the compiler puts one at
//!   the end of each pod chain, nowhere else) names its chain, the isolated pods' and the
//!   unknown pods' drops name themselves and their direction. The node's flow listener reads
//!   them back. The log is a rule of its own before the drop, with the same matches and a
//!   `limit` of [`DROP_LOG_RATE`] packets a second: a flood of denied packets reaches
//!   userspace at that rate, while the drop rule after it drops and counts every one.
//!
//! The fixed names start with `_`, which a ruleset's names (starting with a letter) never do,
//! so the two never collide.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use super::ruleset::{
    AddressSet, Direction, Family, Match, Name, Rule, Ruleset, ServiceSet, Verdict,
};
use crate::flow::kernel::{DropPoint, NFLOG_GROUP};

/// How a ruleset is rendered, beyond the ruleset itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// Log dropped packets to NFLOG (for flows); the counters count them either way.
    pub log_drops: bool,
}

impl RenderOptions {
    /// The rule logging the drop at `point` that follows it, for a drop rule matching
    /// `matches` (nft syntax, empty for none, else ending with a space): nothing, or a rule
    /// of its own before the drop, limited to [`DROP_LOG_RATE`] packets a second. A log
    /// beyond the limit is skipped, never the drop: the drop rule after it drops and counts
    /// every packet.
    fn log_rule(&self, matches: &str, point: &DropPoint) -> Option<String> {
        self.log_drops.then(|| {
            format!(
                "{matches}limit rate {DROP_LOG_RATE}/second burst {DROP_LOG_RATE} packets log prefix \"{}\" group {NFLOG_GROUP}",
                point.nflog_prefix()
            )
        })
    }
}

/// The most dropped packets a second (and in a burst) each logging rule sends to the node's
/// flow listener: a pod flooding a denied port costs the node a bounded number of flows, not
/// one per packet. Drops beyond it are still counted by the drop counters.
pub const DROP_LOG_RATE: u32 = 1000;

/// The table's name (family `inet`).
pub const TABLE: &str = "trellis_policy";

/// The named counters, as `nft list counters` shows them.
pub const COUNTER_DROP_INGRESS: &str = "drop_ingress";
pub const COUNTER_DROP_EGRESS: &str = "drop_egress";
pub const COUNTER_DROP_UNKNOWN_POD: &str = "drop_unknown_pod";

/// The longest comment nftables keeps (128 bytes with its terminating NUL).
pub const MAX_COMMENT_BYTES: usize = 127;

/// Why a ruleset cannot be rendered: it breaks the contract of [`Ruleset`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error(
        "{0:?} is not a set or chain name ([a-z0-9_], starting with a letter, at most 64 bytes)"
    )]
    InvalidName(String),
    #[error("a rule of chain {chain} names the address set {set}, which the ruleset lacks")]
    UnknownAddressSet { chain: Name, set: Name },
    #[error("a rule of chain {chain} names the service set {set}, which the ruleset lacks")]
    UnknownServiceSet { chain: Name, set: Name },
    #[error("{from} jumps to chain {chain}, which the ruleset lacks")]
    UnknownChain { from: String, chain: Name },
    #[error("set {set} is {family:?} but holds {element}")]
    WrongFamily {
        set: Name,
        family: Family,
        element: String,
    },
    #[error("{0} is both an address set and a service set")]
    SetTwice(Name),
}

/// A ruleset checked against its contract: every name valid, every reference resolved.
fn validate(ruleset: &Ruleset) -> Result<(), RenderError> {
    let names = ruleset
        .address_sets
        .keys()
        .chain(ruleset.service_sets.keys())
        .chain(ruleset.chains.keys());
    for name in names {
        if !valid_name(name) {
            return Err(RenderError::InvalidName(name.clone()));
        }
    }
    if let Some(name) = ruleset
        .address_sets
        .keys()
        .find(|name| ruleset.service_sets.contains_key(*name))
    {
        return Err(RenderError::SetTwice(name.clone()));
    }
    for (name, set) in &ruleset.address_sets {
        if let Some(bad) = set
            .elements
            .iter()
            .find(|net| Family::of(&net.addr()) != set.family)
        {
            return Err(RenderError::WrongFamily {
                set: name.clone(),
                family: set.family,
                element: bad.to_string(),
            });
        }
    }
    for (name, set) in &ruleset.service_sets {
        if let Some(bad) = set
            .elements
            .iter()
            .find(|(a, _, _)| Family::of(a) != set.family)
        {
            return Err(RenderError::WrongFamily {
                set: name.clone(),
                family: set.family,
                element: bad.0.to_string(),
            });
        }
    }
    for (chain, rules) in &ruleset.chains {
        for rule in rules {
            for m in &rule.matches {
                match m {
                    Match::SourceIn { set } | Match::DestinationIn { set }
                        if !ruleset.address_sets.contains_key(set) =>
                    {
                        return Err(RenderError::UnknownAddressSet {
                            chain: chain.clone(),
                            set: set.clone(),
                        });
                    }
                    Match::DestinationServiceIn { set }
                        if !ruleset.service_sets.contains_key(set) =>
                    {
                        return Err(RenderError::UnknownServiceSet {
                            chain: chain.clone(),
                            set: set.clone(),
                        });
                    }
                    _ => {}
                }
            }
            if let Verdict::Jump { chain: target } = &rule.verdict
                && !ruleset.chains.contains_key(target)
            {
                return Err(RenderError::UnknownChain {
                    from: format!("chain {chain}"),
                    chain: target.clone(),
                });
            }
        }
    }
    for (pod, chain) in ruleset.ingress.iter().chain(&ruleset.egress) {
        if !ruleset.chains.contains_key(chain) {
            return Err(RenderError::UnknownChain {
                from: format!("pod {pod}"),
                chain: chain.clone(),
            });
        }
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The script that removes the table (enforcement off); harmless when there is none.
pub fn render_delete() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// The script that creates the table for `ruleset`, replacing any earlier one in the same
/// transaction (its counters start again from zero).
///
/// Deleting and creating a table with base chains in one transaction is atomic for the rules,
/// but the kernel re-registers the base chains' hooks, and packets crossing that moment have
/// been seen to pass (a few in a hundred replacements under load, Linux 6.18): use
/// [`render_replace`] when the table is there, and this when it is not (or as a last resort).
pub fn render_full(ruleset: &Ruleset) -> Result<String, RenderError> {
    render_full_with(ruleset, RenderOptions::default())
}

/// [`render_full`] with `options`.
pub fn render_full_with(ruleset: &Ruleset, options: RenderOptions) -> Result<String, RenderError> {
    validate(ruleset)?;
    let mut out = render_delete();
    render_body(&mut out, ruleset, options);
    Ok(out)
}

/// What a table in the kernel holds, by name (user sets, maps, chains; fixed ones included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExistingTable {
    pub sets: BTreeSet<String>,
    pub maps: BTreeSet<String>,
    pub chains: BTreeSet<String>,
}

/// The names of the table that holds `ruleset`.
fn existing_of(ruleset: &Ruleset) -> ExistingTable {
    ExistingTable {
        sets: ruleset
            .address_sets
            .keys()
            .chain(ruleset.service_sets.keys())
            .cloned()
            .chain(FIXED_SETS.map(String::from))
            .collect(),
        maps: FIXED_MAPS.map(String::from).into(),
        chains: ruleset
            .chains
            .keys()
            .cloned()
            .chain(FIXED_CHAINS.map(String::from))
            .collect(),
    }
}

/// The fixed part's maps, sets and chains.
const FIXED_MAPS: [&str; 4] = ["_egress4", "_egress6", "_ingress4", "_ingress6"];
const FIXED_SETS: [&str; 6] = [
    "_local4",
    "_local6",
    "_isolated_egress4",
    "_isolated_egress6",
    "_isolated_ingress4",
    "_isolated_ingress6",
];
const FIXED_CHAINS: [&str; 5] = [
    "_egress",
    "_ingress",
    "_egress_forward",
    "_egress_input",
    "_ingress_forward",
];

/// The script that makes the table `existing` (another process's, or one in an unknown state
/// after a failure) hold `ruleset`, in one transaction, without deleting the table: every
/// rule flushed, the fixed sets and maps emptied, the ruleset's sets deleted and the chains
/// it lacks too, then all of it created and filled again. The base chains stay registered throughout, so no packet meets a moment
/// without them. The counters keep counting.
pub fn render_replace(existing: &ExistingTable, ruleset: &Ruleset) -> Result<String, RenderError> {
    render_replace_with(existing, ruleset, RenderOptions::default())
}

/// [`render_replace`] with `options`: also how a table changes options (the fixed rules
/// change, which only a refill renders).
pub fn render_replace_with(
    existing: &ExistingTable,
    ruleset: &Ruleset,
    options: RenderOptions,
) -> Result<String, RenderError> {
    validate(ruleset)?;
    let mut out = format!("table inet {TABLE}\nflush table inet {TABLE}\n");
    for map in &existing.maps {
        let _ = writeln!(out, "flush map inet {TABLE} {map}");
    }
    for set in existing
        .sets
        .iter()
        .filter(|s| FIXED_SETS.contains(&s.as_str()))
    {
        let _ = writeln!(out, "flush set inet {TABLE} {set}");
    }
    for chain in existing
        .chains
        .iter()
        .filter(|c| !ruleset.chains.contains_key(*c) && !FIXED_CHAINS.contains(&c.as_str()))
    {
        let _ = writeln!(out, "delete chain inet {TABLE} {chain}");
    }
    // Every set of the ruleset's is created again: one of the same name may be of another
    // kind now (a set takes no new type or flags in place).
    for set in existing
        .sets
        .iter()
        .filter(|s| !FIXED_SETS.contains(&s.as_str()))
    {
        let _ = writeln!(out, "delete set inet {TABLE} {set}");
    }
    for map in existing
        .maps
        .iter()
        .filter(|m| !FIXED_MAPS.contains(&m.as_str()))
    {
        let _ = writeln!(out, "delete map inet {TABLE} {map}");
    }
    render_body(&mut out, ruleset, options);
    Ok(out)
}

/// The table's definition (added to whatever is there) and its rules and map elements.
fn render_body(out: &mut String, ruleset: &Ruleset, options: RenderOptions) {
    let _ = writeln!(out, "table inet {TABLE} {{");
    for counter in [
        COUNTER_DROP_INGRESS,
        COUNTER_DROP_EGRESS,
        COUNTER_DROP_UNKNOWN_POD,
    ] {
        let _ = writeln!(out, "\tcounter {counter} {{ }}");
    }
    for (name, set) in &ruleset.address_sets {
        let _ = writeln!(
            out,
            "\tset {name} {{ type {};{}{} }}",
            addr_type(set.family),
            interval_flag(set),
            elements_clause(address_elements(set))
        );
    }
    for (name, set) in &ruleset.service_sets {
        let _ = writeln!(
            out,
            "\tset {name} {{ type {} . inet_proto . inet_service;{} }}",
            addr_type(set.family),
            elements_clause(service_elements(set))
        );
    }
    for (family, suffix) in [(Family::Ipv4, '4'), (Family::Ipv6, '6')] {
        for map in ["_egress", "_ingress"] {
            let _ = writeln!(
                out,
                "\tmap {map}{suffix} {{ type {} : verdict; }}",
                addr_type(family)
            );
        }
        let local = local_elements(&ruleset.local_pods, family);
        let _ = writeln!(
            out,
            "\tset _local{suffix} {{ type {};{} }}",
            addr_type(family),
            elements_clause(local)
        );
        for (map, isolated) in [("egress", &ruleset.egress), ("ingress", &ruleset.ingress)] {
            let _ = writeln!(
                out,
                "\tset _isolated_{map}{suffix} {{ type {};{} }}",
                addr_type(family),
                elements_clause(key_elements(isolated, family))
            );
        }
    }
    // Every chain declared first: rules and map elements may then name any of them.
    for name in ruleset.chains.keys() {
        let _ = writeln!(out, "\tchain {name} {{ }}");
    }
    let _ = writeln!(out, "\tchain _egress {{ }}");
    let _ = writeln!(out, "\tchain _ingress {{ }}");
    let _ = writeln!(
        out,
        "\tchain _egress_forward {{ type filter hook forward priority filter; policy accept; }}"
    );
    let _ = writeln!(
        out,
        "\tchain _egress_input {{ type filter hook input priority filter; policy accept; }}"
    );
    let _ = writeln!(
        out,
        "\tchain _ingress_forward {{ type filter hook forward priority filter + 10; policy accept; }}"
    );
    out.push_str("}\n");
    for (name, rules) in &ruleset.chains {
        add_rules(out, ruleset, name, rules, options);
    }
    add_fixed_rules(out, options);
    add_map_elements(out, "_ingress", &ruleset.ingress);
    add_map_elements(out, "_egress", &ruleset.egress);
}

/// The fixed chains' rules (see the module's documentation).
fn add_fixed_rules(out: &mut String, options: RenderOptions) {
    let veths = format!("\"{}*\"", crate::POD_VETH_PREFIX);
    let fixed = [
        ("_egress_forward", format!("iifname {veths} jump _egress")),
        ("_egress_input", format!("iifname {veths} jump _egress")),
        ("_ingress_forward", format!("oifname {veths} jump _ingress")),
    ];
    for (chain, rule) in fixed {
        let _ = writeln!(out, "add rule inet {TABLE} {chain} {rule}");
    }
    for (chain, address, map, counter, direction) in [
        (
            "_egress",
            "saddr",
            "_egress",
            COUNTER_DROP_EGRESS,
            Direction::Egress,
        ),
        (
            "_ingress",
            "daddr",
            "_ingress",
            COUNTER_DROP_INGRESS,
            Direction::Ingress,
        ),
    ] {
        let isolated = DropPoint::Isolated { direction };
        let unknown = DropPoint::UnknownPod { direction };
        let isolated4 = format!("ip {address} @_isolated{map}4 ");
        let isolated6 = format!("ip6 {address} @_isolated{map}6 ");
        let rules = [
            Some("icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } accept".to_string()),
            Some("ct state established,related accept".to_string()),
            Some("ct state invalid drop".to_string()),
            Some(format!("ip {address} vmap @{map}4")),
            Some(format!("ip6 {address} vmap @{map}6")),
            options.log_rule(&isolated4, &isolated),
            Some(format!("{isolated4}counter name {counter} drop")),
            options.log_rule(&isolated6, &isolated),
            Some(format!("{isolated6}counter name {counter} drop")),
            Some(format!("ip {address} @_local4 accept")),
            Some(format!("ip6 {address} @_local6 accept")),
            options.log_rule("", &unknown),
            Some(format!("counter name {COUNTER_DROP_UNKNOWN_POD} drop")),
        ];
        for rule in rules.into_iter().flatten() {
            let _ = writeln!(out, "add rule inet {TABLE} {chain} {rule}");
        }
    }
}

fn add_rules(
    out: &mut String,
    ruleset: &Ruleset,
    chain: &str,
    rules: &[Rule],
    options: RenderOptions,
) {
    for rule in rules {
        for text in render_rule(ruleset, chain, rule, options) {
            let _ = writeln!(out, "add rule inet {TABLE} {chain} {text}");
        }
    }
}

fn add_map_elements(out: &mut String, map: &str, entries: &BTreeMap<IpAddr, Name>) {
    for (family, suffix) in [(Family::Ipv4, '4'), (Family::Ipv6, '6')] {
        let elements: Vec<String> = entries
            .iter()
            .filter(|(pod, _)| Family::of(pod) == family)
            .map(|(pod, chain)| format!("{pod} : jump {chain}"))
            .collect();
        if !elements.is_empty() {
            let _ = writeln!(
                out,
                "add element inet {TABLE} {map}{suffix} {{ {} }}",
                elements.join(", ")
            );
        }
    }
}

/// Whether an address set needs an interval set: it holds a prefix, not only addresses.
/// Sets of single addresses (every pod selector's) are hash sets: `nft` reads the elements of
/// every interval set of the table before any change of elements, so one large interval set
/// would make every update cost time in proportion to it.
fn is_interval(set: &AddressSet) -> bool {
    set.elements
        .iter()
        .any(|net| net.prefix_len() < net.max_prefix_len())
}

fn interval_flag(set: &AddressSet) -> &'static str {
    if is_interval(set) {
        " flags interval;"
    } else {
        ""
    }
}

fn addr_type(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4_addr",
        Family::Ipv6 => "ipv6_addr",
    }
}

fn ip_keyword(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ip",
        Family::Ipv6 => "ip6",
    }
}

fn elements_clause(elements: BTreeSet<String>) -> String {
    if elements.is_empty() {
        String::new()
    } else {
        format!(
            " elements = {{ {} }};",
            elements.into_iter().collect::<Vec<_>>().join(", ")
        )
    }
}

/// An interval set's elements as nft writes them: the network address (host bits cleared),
/// a single address without its prefix length.
fn address_elements(set: &AddressSet) -> BTreeSet<String> {
    set.elements.iter().map(render_net).collect()
}

fn render_net(net: &IpNet) -> String {
    let net = net.trunc();
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn service_elements(set: &ServiceSet) -> BTreeSet<String> {
    set.elements
        .iter()
        .map(|(address, protocol, port)| format!("{address} . {} . {port}", protocol.lowercase()))
        .collect()
}

/// The addresses of one family a verdict map has keys for.
fn key_elements(map: &BTreeMap<IpAddr, Name>, family: Family) -> BTreeSet<String> {
    map.keys()
        .filter(|pod| Family::of(pod) == family)
        .map(ToString::to_string)
        .collect()
}

fn local_elements(pods: &BTreeSet<IpAddr>, family: Family) -> BTreeSet<String> {
    pods.iter()
        .filter(|pod| Family::of(pod) == family)
        .map(ToString::to_string)
        .collect()
}

/// One rule of `chain` in nft syntax (a logged drop: its log rule, then the drop); none for a
/// rule that can match nothing (a port match without ports), which is left out.
fn render_rule(ruleset: &Ruleset, chain: &str, rule: &Rule, options: RenderOptions) -> Vec<String> {
    let Some(matches) = render_matches(ruleset, rule) else {
        return Vec::new();
    };
    let log = match &rule.verdict {
        Verdict::Drop { direction } => options.log_rule(
            &matches,
            &DropPoint::PodChain {
                direction: *direction,
                chain: chain.to_string(),
            },
        ),
        Verdict::Accept | Verdict::Jump { .. } => None,
    };
    let verdict = match &rule.verdict {
        Verdict::Accept => "accept".to_string(),
        Verdict::Drop { direction } => format!("counter name {} drop", drop_counter(*direction)),
        Verdict::Jump { chain } => format!("jump {chain}"),
    };
    let comment = rule
        .comment
        .as_ref()
        .map(|comment| format!(" comment \"{}\"", escape_comment(comment)))
        .unwrap_or_default();
    log.into_iter()
        .chain([format!("{matches}{verdict}{comment}")])
        .collect()
}

/// A rule's matches in nft syntax, each followed by a space; `None` for matches that can match
/// nothing.
fn render_matches(ruleset: &Ruleset, rule: &Rule) -> Option<String> {
    let mut parts = Vec::with_capacity(rule.matches.len());
    for m in &rule.matches {
        parts.push(match m {
            Match::SourceIn { set } => {
                let family = ruleset.address_sets.get(set)?.family;
                format!("{} saddr @{set}", ip_keyword(family))
            }
            Match::DestinationIn { set } => {
                let family = ruleset.address_sets.get(set)?.family;
                format!("{} daddr @{set}", ip_keyword(family))
            }
            Match::Protocol { protocol } => format!("meta l4proto {}", protocol.lowercase()),
            Match::DestinationPorts { ranges } => {
                let ranges = super::plan::merge_ranges(ranges);
                match ranges.as_slice() {
                    [] => return None,
                    [one] => format!("th dport {}", render_range(*one)),
                    many => format!(
                        "th dport {{ {} }}",
                        many.iter()
                            .map(|r| render_range(*r))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            }
            Match::DestinationServiceIn { set } => {
                let family = ruleset.service_sets.get(set)?.family;
                format!(
                    "{} daddr . meta l4proto . th dport @{set}",
                    ip_keyword(family)
                )
            }
        });
    }
    Some(parts.iter().map(|part| format!("{part} ")).collect())
}

/// The counter a [`Verdict::Drop`] in `direction` counts in.
pub fn drop_counter(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => COUNTER_DROP_INGRESS,
        Direction::Egress => COUNTER_DROP_EGRESS,
    }
}

fn render_range((first, last): (u16, u16)) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// A comment nft takes inside double quotes: printable ASCII without `"` or `\` (replaced),
/// at most [`MAX_COMMENT_BYTES`].
fn escape_comment(comment: &str) -> String {
    let mut out: String = comment
        .chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .collect();
    out.truncate(MAX_COMMENT_BYTES);
    out
}

/// The script that turns the table from `old` (what the kernel holds) into `new`, changing
/// only what differs, in one transaction; `None` when nothing does. In order: new sets and
/// elements, new chains declared, changed chains flushed and every new or changed chain
/// filled, then the verdict maps and local pods, and last the chains and sets nothing refers
/// to any more. A set whose kind (address or service, single addresses or prefixes) or
/// family changes has the whole table refilled ([`render_replace`]).
pub fn render_update(old: &Ruleset, new: &Ruleset) -> Result<Option<String>, RenderError> {
    render_update_with(old, new, RenderOptions::default())
}

/// [`render_update`] for a table rendered with `options` (both rulesets' alike: a change of
/// options is a [`render_replace_with`]).
pub fn render_update_with(
    old: &Ruleset,
    new: &Ruleset,
    options: RenderOptions,
) -> Result<Option<String>, RenderError> {
    validate(new)?;
    if old == new {
        return Ok(None);
    }
    let kind_changed = new.address_sets.iter().any(|(name, set)| {
        old.service_sets.contains_key(name)
            || old
                .address_sets
                .get(name)
                .is_some_and(|o| o.family != set.family || is_interval(o) != is_interval(set))
    }) || new.service_sets.iter().any(|(name, set)| {
        old.address_sets.contains_key(name)
            || old
                .service_sets
                .get(name)
                .is_some_and(|o| o.family != set.family)
    });
    if kind_changed {
        return render_replace_with(&existing_of(old), new, options).map(Some);
    }
    let mut out = String::new();
    // Sets: new ones whole, changed ones by element (removals first: an interval set refuses
    // an added element overlapping one still there).
    for (name, set) in &new.address_sets {
        // Untouched sets cost nothing: a one-pod change renders one pod's elements, whatever
        // the size of the other sets.
        if old.address_sets.get(name) == Some(set) {
            continue;
        }
        let elements = address_elements(set);
        match old.address_sets.get(name) {
            None => {
                let _ = writeln!(
                    out,
                    "add set inet {TABLE} {name} {{ type {};{}{} }}",
                    addr_type(set.family),
                    interval_flag(set),
                    elements_clause(elements)
                );
            }
            Some(before) => element_changes(&mut out, name, &address_elements(before), &elements),
        }
    }
    for (name, set) in &new.service_sets {
        if old.service_sets.get(name) == Some(set) {
            continue;
        }
        let elements = service_elements(set);
        match old.service_sets.get(name) {
            None => {
                let _ = writeln!(
                    out,
                    "add set inet {TABLE} {name} {{ type {} . inet_proto . inet_service;{} }}",
                    addr_type(set.family),
                    elements_clause(elements)
                );
            }
            Some(before) => element_changes(&mut out, name, &service_elements(before), &elements),
        }
    }
    // Chains: declare the new, empty the changed, then fill both.
    let added: Vec<&Name> = new
        .chains
        .keys()
        .filter(|name| !old.chains.contains_key(*name))
        .collect();
    let changed: Vec<&Name> = new
        .chains
        .iter()
        .filter(|(name, rules)| old.chains.get(*name).is_some_and(|before| before != *rules))
        .map(|(name, _)| name)
        .collect();
    // A chain unchanged in its rules still renders differently when a set it names changed
    // family; that case replaced the whole table above, so equal rules render equally.
    for name in &added {
        let _ = writeln!(out, "add chain inet {TABLE} {name}");
    }
    for name in &changed {
        let _ = writeln!(out, "flush chain inet {TABLE} {name}");
    }
    for name in added.iter().chain(&changed) {
        add_rules(&mut out, new, name, &new.chains[*name], options);
    }
    // Verdict maps and local pods.
    map_changes(&mut out, "_ingress", &old.ingress, &new.ingress);
    map_changes(&mut out, "_egress", &old.egress, &new.egress);
    for (family, suffix) in [(Family::Ipv4, '4'), (Family::Ipv6, '6')] {
        element_changes(
            &mut out,
            &format!("_local{suffix}"),
            &local_elements(&old.local_pods, family),
            &local_elements(&new.local_pods, family),
        );
        for (map, old, new) in [
            ("egress", &old.egress, &new.egress),
            ("ingress", &old.ingress, &new.ingress),
        ] {
            element_changes(
                &mut out,
                &format!("_isolated_{map}{suffix}"),
                &key_elements(old, family),
                &key_elements(new, family),
            );
        }
    }
    // What nothing refers to any more: removed chains emptied first (they may jump to each
    // other), then deleted, then removed sets.
    let removed: Vec<&Name> = old
        .chains
        .keys()
        .filter(|name| !new.chains.contains_key(*name))
        .collect();
    for name in &removed {
        let _ = writeln!(out, "flush chain inet {TABLE} {name}");
    }
    for name in &removed {
        let _ = writeln!(out, "delete chain inet {TABLE} {name}");
    }
    for name in old
        .address_sets
        .keys()
        .filter(|name| !new.address_sets.contains_key(*name))
        .chain(
            old.service_sets
                .keys()
                .filter(|name| !new.service_sets.contains_key(*name)),
        )
    {
        let _ = writeln!(out, "delete set inet {TABLE} {name}");
    }
    Ok(Some(out))
}

fn element_changes(out: &mut String, set: &str, old: &BTreeSet<String>, new: &BTreeSet<String>) {
    let gone: Vec<&str> = old.difference(new).map(String::as_str).collect();
    let came: Vec<&str> = new.difference(old).map(String::as_str).collect();
    if !gone.is_empty() {
        let _ = writeln!(
            out,
            "delete element inet {TABLE} {set} {{ {} }}",
            gone.join(", ")
        );
    }
    if !came.is_empty() {
        let _ = writeln!(
            out,
            "add element inet {TABLE} {set} {{ {} }}",
            came.join(", ")
        );
    }
}

fn map_changes(
    out: &mut String,
    map: &str,
    old: &BTreeMap<IpAddr, Name>,
    new: &BTreeMap<IpAddr, Name>,
) {
    let gone: BTreeMap<IpAddr, Name> = old
        .iter()
        .filter(|(pod, chain)| new.get(*pod) != Some(*chain))
        .map(|(pod, chain)| (*pod, chain.clone()))
        .collect();
    let came: BTreeMap<IpAddr, Name> = new
        .iter()
        .filter(|(pod, chain)| old.get(*pod) != Some(*chain))
        .map(|(pod, chain)| (*pod, chain.clone()))
        .collect();
    for (family, suffix) in [(Family::Ipv4, '4'), (Family::Ipv6, '6')] {
        let keys: Vec<String> = gone
            .keys()
            .filter(|pod| Family::of(pod) == family)
            .map(ToString::to_string)
            .collect();
        if !keys.is_empty() {
            let _ = writeln!(
                out,
                "delete element inet {TABLE} {map}{suffix} {{ {} }}",
                keys.join(", ")
            );
        }
    }
    add_map_elements(out, map, &came);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Protocol;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn address_set(family: Family, nets: &[&str]) -> AddressSet {
        AddressSet {
            family,
            elements: nets.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    fn rule(matches: Vec<Match>, verdict: Verdict) -> Rule {
        Rule {
            matches,
            verdict,
            comment: None,
        }
    }

    /// Pod 10.0.0.2 isolated for ingress: TCP 80 from the `clients` set, the rest dropped.
    fn sample() -> Ruleset {
        let mut r = Ruleset::default();
        r.address_sets.insert(
            "clients".into(),
            address_set(Family::Ipv4, &["10.0.0.1/32", "10.9.0.0/16"]),
        );
        r.chains.insert(
            "pod_b_in".into(),
            vec![
                Rule {
                    matches: vec![
                        Match::SourceIn {
                            set: "clients".into(),
                        },
                        Match::Protocol {
                            protocol: Protocol::Tcp,
                        },
                        Match::DestinationPorts {
                            ranges: vec![(80, 80)],
                        },
                    ],
                    verdict: Verdict::Accept,
                    comment: Some("x/allow-a".into()),
                },
                rule(
                    vec![],
                    Verdict::Drop {
                        direction: Direction::Ingress,
                    },
                ),
            ],
        );
        r.ingress.insert(ip("10.0.0.2"), "pod_b_in".into());
        r.local_pods
            .extend([ip("10.0.0.1"), ip("10.0.0.2"), ip("fd00::2")]);
        r
    }

    #[test]
    fn the_full_script_replaces_the_table_and_holds_the_fixed_part() {
        let script = render_full(&sample()).unwrap();
        assert!(script.starts_with(
            "table inet trellis_policy\ndelete table inet trellis_policy\ntable inet trellis_policy {\n"
        ));
        for counter in ["drop_ingress", "drop_egress", "drop_unknown_pod"] {
            assert!(
                script.contains(&format!("counter {counter} {{ }}")),
                "{script}"
            );
        }
        assert!(script.contains(
            "set clients { type ipv4_addr; flags interval; elements = { 10.0.0.1, 10.9.0.0/16 }; }"
        ));
        assert!(
            script.contains("set _local4 { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 }; }")
        );
        assert!(script.contains("set _local6 { type ipv6_addr; elements = { fd00::2 }; }"));
        assert!(script.contains("hook forward priority filter; policy accept;"));
        assert!(script.contains("hook input priority filter; policy accept;"));
        assert!(script.contains("hook forward priority filter + 10; policy accept;"));
        assert!(
            !script.contains("hook output"),
            "the node's own traffic is never filtered"
        );
        assert!(script.contains(
            "add rule inet trellis_policy _egress_forward iifname \"trl*\" jump _egress\n"
        ));
        assert!(script.contains(
            "add rule inet trellis_policy _ingress_forward oifname \"trl*\" jump _ingress\n"
        ));
        assert!(script.contains(
            "add rule inet trellis_policy pod_b_in ip saddr @clients meta l4proto tcp th dport 80 accept comment \"x/allow-a\"\n"
        ));
        assert!(
            script
                .contains("add rule inet trellis_policy pod_b_in counter name drop_ingress drop\n")
        );
        assert!(
            script.contains(
                "add element inet trellis_policy _ingress4 { 10.0.0.2 : jump pod_b_in }\n"
            )
        );
        // In each direction's chain: established, invalid, the map, an isolated pod the map
        // missed, local pods, unknown.
        assert!(
            script.contains("set _isolated_ingress4 { type ipv4_addr; elements = { 10.0.0.2 }; }")
        );
        let egress: Vec<&str> = script
            .lines()
            .filter_map(|l| l.strip_prefix("add rule inet trellis_policy _egress "))
            .collect();
        assert_eq!(
            egress[1..],
            [
                "ct state established,related accept",
                "ct state invalid drop",
                "ip saddr vmap @_egress4",
                "ip6 saddr vmap @_egress6",
                "ip saddr @_isolated_egress4 counter name drop_egress drop",
                "ip6 saddr @_isolated_egress6 counter name drop_egress drop",
                "ip saddr @_local4 accept",
                "ip6 saddr @_local6 accept",
                "counter name drop_unknown_pod drop",
            ]
        );
        assert!(egress[0].starts_with("icmpv6 type { nd-router-solicit"));
        // Chains are declared before any rule or map element names them.
        let declared = script.find("chain pod_b_in { }").unwrap();
        assert!(declared < script.find("jump pod_b_in").unwrap());
    }

    #[test]
    fn matches_and_verdicts_render_in_nft_syntax() {
        let mut r = Ruleset::default();
        r.address_sets
            .insert("v6".into(), address_set(Family::Ipv6, &["fd00::/64"]));
        r.service_sets.insert(
            "named".into(),
            ServiceSet {
                family: Family::Ipv4,
                elements: [
                    (ip("10.0.0.3"), Protocol::Udp, 53),
                    (ip("10.0.0.4"), Protocol::Sctp, 9),
                ]
                .into(),
            },
        );
        r.chains.insert("target".into(), vec![]);
        r.chains.insert(
            "c".into(),
            vec![
                rule(
                    vec![
                        Match::DestinationIn { set: "v6".into() },
                        Match::Protocol {
                            protocol: Protocol::Udp,
                        },
                        Match::DestinationPorts {
                            ranges: vec![(90, 100), (80, 80), (95, 120), (121, 121), (7, 5)],
                        },
                    ],
                    Verdict::Jump {
                        chain: "target".into(),
                    },
                ),
                rule(
                    vec![Match::DestinationServiceIn {
                        set: "named".into(),
                    }],
                    Verdict::Drop {
                        direction: Direction::Egress,
                    },
                ),
                // A port match without ports matches nothing: left out.
                rule(
                    vec![Match::DestinationPorts { ranges: vec![] }],
                    Verdict::Accept,
                ),
            ],
        );
        r.egress.insert(ip("fd00::5"), "c".into());
        let script = render_full(&r).unwrap();
        let rules: Vec<&str> = script
            .lines()
            .filter_map(|l| l.strip_prefix("add rule inet trellis_policy c "))
            .collect();
        assert_eq!(
            rules,
            [
                "ip6 daddr @v6 meta l4proto udp th dport { 5-7, 80, 90-121 } jump target",
                "ip daddr . meta l4proto . th dport @named counter name drop_egress drop",
            ]
        );
        assert!(script.contains(
            "set named { type ipv4_addr . inet_proto . inet_service; elements = { 10.0.0.3 . udp . 53, 10.0.0.4 . sctp . 9 }; }"
        ));
        assert!(
            script.contains("set v6 { type ipv6_addr; flags interval; elements = { fd00::/64 }; }")
        );
        assert!(script.contains("add element inet trellis_policy _egress6 { fd00::5 : jump c }"));
        assert!(script.contains("chain target { }"));
    }

    #[test]
    fn comments_are_quoted_safely_and_cut_to_nfts_limit() {
        assert_eq!(escape_comment("a \"b\" \\c\n\u{e9}"), "a 'b' /c??");
        assert_eq!(escape_comment(&"x".repeat(300)).len(), MAX_COMMENT_BYTES);
    }

    #[test]
    fn host_bits_are_cleared_and_single_addresses_lose_their_length() {
        assert_eq!(render_net(&"10.1.2.3/24".parse().unwrap()), "10.1.2.0/24");
        assert_eq!(render_net(&"10.1.2.3/32".parse().unwrap()), "10.1.2.3");
        assert_eq!(render_net(&"fd00::1/128".parse().unwrap()), "fd00::1");
    }

    #[test]
    fn a_ruleset_breaking_its_contract_is_refused() {
        let mut bad_name = sample();
        bad_name.chains.insert("_egress".into(), vec![]);
        assert_eq!(
            render_full(&bad_name),
            Err(RenderError::InvalidName("_egress".into()))
        );
        let mut missing_set = sample();
        missing_set.address_sets.clear();
        assert!(matches!(
            render_full(&missing_set),
            Err(RenderError::UnknownAddressSet { .. })
        ));
        let mut missing_chain = sample();
        missing_chain.egress.insert(ip("10.0.0.1"), "nope".into());
        assert!(matches!(
            render_full(&missing_chain),
            Err(RenderError::UnknownChain { .. })
        ));
        let mut wrong_family = sample();
        wrong_family
            .address_sets
            .insert("clients".into(), address_set(Family::Ipv6, &["10.0.0.0/8"]));
        assert!(matches!(
            render_full(&wrong_family),
            Err(RenderError::WrongFamily { .. })
        ));
        assert!(render_update(&sample(), &missing_set).is_err());
    }

    #[test]
    fn a_replacement_keeps_the_table_and_its_base_chains_and_clears_the_rest() {
        let existing = ExistingTable {
            sets: ["_local4", "_local6", "clients", "gone"]
                .map(String::from)
                .into(),
            maps: ["_egress4", "_ingress4", "_egress6", "_ingress6"]
                .map(String::from)
                .into(),
            chains: ["_egress", "_egress_forward", "pod_b_in", "old_chain"]
                .map(String::from)
                .into(),
        };
        let script = render_replace(&existing, &sample()).unwrap();
        assert!(!script.contains("delete table"), "{script}");
        assert!(script.starts_with(
            "table inet trellis_policy\nflush table inet trellis_policy\nflush map inet trellis_policy _egress4\n"
        ));
        let at = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle:?} in\n{script}"))
        };
        assert!(
            at("flush set inet trellis_policy _local4\n")
                < at("delete set inet trellis_policy gone\n")
        );
        assert!(
            at("flush map inet trellis_policy _ingress4\n")
                < at("delete chain inet trellis_policy old_chain\n")
        );
        assert!(!script.contains("delete chain inet trellis_policy _egress"));
        assert!(!script.contains("delete chain inet trellis_policy pod_b_in"));
        assert!(
            script.contains("delete set inet trellis_policy clients\n"),
            "made again"
        );
        assert!(!script.contains("delete set inet trellis_policy _local"));
        // Then the whole definition, as a full script has it.
        let full = render_full(&sample()).unwrap();
        assert!(script.ends_with(&full[render_delete().len()..]));
    }

    #[test]
    fn logged_drops_name_where_they_happen_and_invalid_packets_stay_silent() {
        let logged = RenderOptions { log_drops: true };
        let script = render_full_with(&sample(), logged).unwrap();
        // The log is a rule of its own, rate-limited, before the drop it names.
        assert!(script.contains(
            "add rule inet trellis_policy pod_b_in limit rate 1000/second burst 1000 packets log prefix \"trellis:pod:in:pod_b_in\" group 1616\n\
             add rule inet trellis_policy pod_b_in counter name drop_ingress drop\n"
        ), "{script}");
        let chain = |name: &str| -> Vec<String> {
            let prefix = format!("add rule inet trellis_policy {name} ");
            script
                .lines()
                .filter_map(|l| l.strip_prefix(prefix.as_str()))
                .map(str::to_owned)
                .collect()
        };
        let egress = chain("_egress");
        assert!(
            egress.contains(&"ct state invalid drop".to_owned()),
            "{script}"
        );
        assert_eq!(
            egress[5..],
            [
                "ip saddr @_isolated_egress4 limit rate 1000/second burst 1000 packets log prefix \"trellis:iso:eg\" group 1616",
                "ip saddr @_isolated_egress4 counter name drop_egress drop",
                "ip6 saddr @_isolated_egress6 limit rate 1000/second burst 1000 packets log prefix \"trellis:iso:eg\" group 1616",
                "ip6 saddr @_isolated_egress6 counter name drop_egress drop",
                "ip saddr @_local4 accept",
                "ip6 saddr @_local6 accept",
                "limit rate 1000/second burst 1000 packets log prefix \"trellis:unknown:eg\" group 1616",
                "counter name drop_unknown_pod drop",
            ]
        );
        let ingress = chain("_ingress");
        assert_eq!(
            ingress[ingress.len() - 2..],
            [
                "limit rate 1000/second burst 1000 packets log prefix \"trellis:unknown:in\" group 1616",
                "counter name drop_unknown_pod drop",
            ],
            "the unknown pod's drop says which chain dropped it"
        );
        assert!(ingress.contains(
            &"ip daddr @_isolated_ingress4 limit rate 1000/second burst 1000 packets log prefix \"trellis:iso:in\" group 1616".to_owned()
        ));
        // Every log is limited and followed by the drop it names, whose counter counts every
        // packet, logged or not: the drops are the unlogged table's, unchanged.
        let lines: Vec<&str> = script.lines().collect();
        let mut logs = 0;
        for (i, line) in lines.iter().enumerate() {
            let Some((matches, _)) =
                line.split_once("limit rate 1000/second burst 1000 packets log prefix ")
            else {
                assert!(!line.contains(" log "), "{line}");
                continue;
            };
            logs += 1;
            let next = lines[i + 1];
            assert!(
                next.starts_with(matches) && next.ends_with(" drop"),
                "{line}\n{next}"
            );
            assert!(
                next[matches.len()..].starts_with("counter name drop_"),
                "{next}"
            );
        }
        let drops = lines.iter().filter(|l| l.ends_with(" drop")).count();
        assert_eq!(
            drops,
            logs + 2,
            "all but the invalid packets' drops: {script}"
        );
        let unlogged = render_full(&sample()).unwrap();
        assert!(!unlogged.contains(" log "));
        assert_eq!(
            lines
                .iter()
                .filter(|l| !l.contains(" log "))
                .copied()
                .collect::<Vec<_>>(),
            unlogged.lines().collect::<Vec<_>>()
        );
        // An update renders its changed chains with the option too.
        let mut new = sample();
        new.chains.get_mut("pod_b_in").unwrap().remove(0);
        let update = render_update_with(&sample(), &new, logged)
            .unwrap()
            .unwrap();
        assert!(update.contains(
            "pod_b_in limit rate 1000/second burst 1000 packets log prefix \"trellis:pod:in:pod_b_in\" group 1616\n"
        ));
        let replaced = render_replace_with(&existing_of(&sample()), &sample(), logged).unwrap();
        assert_eq!(replaced.matches(" log prefix ").count(), logs);
    }

    #[test]
    fn no_change_renders_no_update() {
        assert_eq!(render_update(&sample(), &sample()), Ok(None));
    }

    #[test]
    fn one_pod_more_adds_only_its_elements() {
        let old = sample();
        let mut new = old.clone();
        new.local_pods.insert(ip("10.0.0.7"));
        new.address_sets
            .get_mut("clients")
            .unwrap()
            .elements
            .insert("10.0.0.7/32".parse().unwrap());
        let script = render_update(&old, &new).unwrap().unwrap();
        assert_eq!(
            script,
            "add element inet trellis_policy clients { 10.0.0.7 }\n\
             add element inet trellis_policy _local4 { 10.0.0.7 }\n"
        );
        // And back: the same elements deleted.
        let back = render_update(&new, &old).unwrap().unwrap();
        assert_eq!(
            back,
            "delete element inet trellis_policy clients { 10.0.0.7 }\n\
             delete element inet trellis_policy _local4 { 10.0.0.7 }\n"
        );
    }

    #[test]
    fn an_update_orders_additions_before_references_and_removals_after() {
        let old = sample();
        let mut new = old.clone();
        // A new pod isolated for egress through a new chain naming a new set; pod_b's chain
        // changes; a chain and a set only the old ruleset had go.
        new.address_sets.insert(
            "servers".into(),
            address_set(Family::Ipv4, &["10.0.0.2/32"]),
        );
        new.chains.insert(
            "pod_c_out".into(),
            vec![rule(
                vec![Match::DestinationIn {
                    set: "servers".into(),
                }],
                Verdict::Accept,
            )],
        );
        new.egress.insert(ip("10.0.0.3"), "pod_c_out".into());
        new.local_pods.insert(ip("10.0.0.3"));
        new.chains.get_mut("pod_b_in").unwrap().remove(0);
        let mut old = old;
        old.address_sets
            .insert("stale".into(), address_set(Family::Ipv4, &["10.5.0.0/16"]));
        old.chains.insert(
            "stale_chain".into(),
            vec![rule(
                vec![Match::SourceIn {
                    set: "stale".into(),
                }],
                Verdict::Accept,
            )],
        );
        old.egress.insert(ip("10.0.0.1"), "stale_chain".into());

        let script = render_update(&old, &new).unwrap().unwrap();
        let at = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle:?} missing from\n{script}"))
        };
        let new_set =
            at("add set inet trellis_policy servers { type ipv4_addr; elements = { 10.0.0.2 }; }");
        let new_chain = at("add chain inet trellis_policy pod_c_out\n");
        let new_rule = at("add rule inet trellis_policy pod_c_out ip daddr @servers accept\n");
        let flushed = at("flush chain inet trellis_policy pod_b_in\n");
        let refilled = at("add rule inet trellis_policy pod_b_in counter name drop_ingress drop\n");
        let old_entry = at("delete element inet trellis_policy _egress4 { 10.0.0.1 }\n");
        let new_entry =
            at("add element inet trellis_policy _egress4 { 10.0.0.3 : jump pod_c_out }\n");
        let stale_flushed = at("flush chain inet trellis_policy stale_chain\n");
        let stale_chain = at("delete chain inet trellis_policy stale_chain\n");
        let stale_set = at("delete set inet trellis_policy stale\n");
        assert!(new_set < new_rule && new_chain < new_rule);
        assert!(flushed < refilled);
        assert!(new_rule < new_entry);
        assert!(old_entry < stale_chain && stale_flushed < stale_chain && stale_chain < stale_set);
        assert!(
            !script.contains("clients"),
            "unchanged sets untouched:\n{script}"
        );
        assert!(!script.contains("delete table"), "{script}");
    }

    #[test]
    fn a_pod_moved_to_another_chain_has_its_map_entry_replaced() {
        let old = sample();
        let mut new = old.clone();
        new.chains.insert("other".into(), vec![]);
        new.ingress.insert(ip("10.0.0.2"), "other".into());
        let script = render_update(&old, &new).unwrap().unwrap();
        let delete = script
            .find("delete element inet trellis_policy _ingress4 { 10.0.0.2 }")
            .unwrap();
        let add = script
            .find("add element inet trellis_policy _ingress4 { 10.0.0.2 : jump other }")
            .unwrap();
        assert!(delete < add, "{script}");
    }

    #[test]
    fn a_set_changing_kind_or_family_refills_the_table() {
        let old = sample();
        for clients in [
            address_set(Family::Ipv6, &["fd00::/64"]),
            address_set(Family::Ipv4, &["10.0.0.1/32", "10.0.0.9/32"]),
        ] {
            let mut new = old.clone();
            new.address_sets.insert("clients".into(), clients);
            let script = render_update(&old, &new).unwrap().unwrap();
            assert!(!script.contains("delete table"), "{script}");
            assert_eq!(script, render_replace(&existing_of(&old), &new).unwrap());
            assert!(script.contains("delete set inet trellis_policy clients\n"));
        }
    }

    #[test]
    fn sets_of_single_addresses_are_hash_sets_and_prefixes_make_interval_sets() {
        let mut r = sample();
        r.address_sets.insert(
            "hosts".into(),
            address_set(Family::Ipv4, &["10.0.0.1/32", "10.0.0.2/32"]),
        );
        let script = render_full(&r).unwrap();
        assert!(
            script.contains("set hosts { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 }; }")
        );
        assert!(script.contains("set clients { type ipv4_addr; flags interval;"));
    }
}
