//! Anti-spoofing for pods: a packet that arrives from a pod's host veth with a source the
//! node would not route back through that veth (not one of that pod's addresses) is dropped,
//! IPv4 and IPv6, before connection tracking, and counted.
//!
//! One nftables table per node, owned by the node agent: strict reverse-path filtering with
//! `fib saddr . iif oif missing` on interfaces named like the CNI plugin's host veths. The
//! kernel's own `rp_filter` cannot do it: it is IPv4 only, and a node's `all` setting of 2
//! (loose, common) would override a strict per-interface value.

use trellis_netns::Netns;

/// The table's name (family `inet`).
pub const TABLE: &str = "trellis_antispoof";

/// Why the rules could not be installed or read.
pub type AntispoofError = crate::nft::NftError;

/// The chain's rules for every interface starting with `veth_prefix`.
fn rules(veth_prefix: &str) -> String {
    format!(
        "\t\t# Duplicate address detection sends from the unspecified address.\n\
         \t\tiifname \"{veth_prefix}*\" ip6 saddr :: accept\n\
         \t\tiifname \"{veth_prefix}*\" meta nfproto ipv4 fib saddr . iif oif missing counter name \"spoofed_ipv4\" drop\n\
         \t\tiifname \"{veth_prefix}*\" meta nfproto ipv6 fib saddr . iif oif missing counter name \"spoofed_ipv6\" drop\n"
    )
}

/// The table, replacing any earlier one in the same transaction (`nft -f`): counters named per
/// family, and the rules for every interface starting with `veth_prefix`. The table is kept
/// and its chain emptied and refilled, never deleted: deleting and creating a table in one
/// transaction re-registers its base chain's hook, and packets crossing that moment have been
/// seen to pass (the policy table's tests measured it), which here would let a spoofed packet
/// through while the agent restarts. The counters keep counting.
pub fn ruleset(veth_prefix: &str) -> String {
    format!(
        "table inet {TABLE} {{\n\
         \tcounter spoofed_ipv4 {{ }}\n\
         \tcounter spoofed_ipv6 {{ }}\n\
         \tchain prerouting {{ type filter hook prerouting priority raw; policy accept; }}\n\
         }}\n\
         flush chain inet {TABLE} prerouting\n\
         table inet {TABLE} {{\n\
         \tchain prerouting {{\n{}\t}}\n\
         }}\n",
        rules(veth_prefix)
    )
}

/// The table created from nothing (deleting any earlier one): for a table another version
/// left with another shape, which [`ruleset`] cannot refill.
pub fn fresh_ruleset(veth_prefix: &str) -> String {
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tcounter spoofed_ipv4 {{ }}\n\
         \tcounter spoofed_ipv6 {{ }}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         {}\t}}\n\
         }}\n",
        rules(veth_prefix)
    )
}

/// Installs (or replaces) the table: refilled in place, or created again when that is refused.
pub fn install(netns: Option<&Netns>, veth_prefix: &str) -> Result<(), AntispoofError> {
    match crate::nft::apply(netns, &ruleset(veth_prefix)) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::warn!(
                "refill the anti-spoofing table (creating it again instead): {}",
                crate::chain(&e)
            );
            crate::nft::apply(netns, &fresh_ruleset(veth_prefix))
        }
    }
}

/// Packets dropped so far: (IPv4, IPv6).
pub fn dropped(netns: Option<&Netns>) -> Result<(u64, u64), AntispoofError> {
    let counts = crate::nft::counters(netns, TABLE)?;
    let count = |name: &str| counts.get(name).copied().unwrap_or(0);
    Ok((count("spoofed_ipv4"), count("spoofed_ipv6")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_refills_itself_and_filters_only_pod_veths() {
        let rules = ruleset("trl");
        assert!(!rules.contains("delete table"), "{rules}");
        let flushed = rules
            .find("flush chain inet trellis_antispoof prerouting\n")
            .unwrap();
        let refilled = rules.find("fib saddr").unwrap();
        assert!(flushed < refilled, "{rules}");
        assert_eq!(rules.matches("iifname \"trl*\"").count(), 3);
        assert!(rules.contains("fib saddr . iif oif missing counter name \"spoofed_ipv4\" drop"));
        assert!(rules.contains("priority raw"));
        let fresh = fresh_ruleset("trl");
        assert!(
            fresh
                .starts_with("table inet trellis_antispoof\ndelete table inet trellis_antispoof\n")
        );
        assert_eq!(fresh.matches("iifname \"trl*\"").count(), 3);
    }

    #[tokio::test]
    async fn the_kernel_takes_the_rules_and_counts_nothing_yet() {
        trellis_test_support::skip_unless_root!();
        let ns = crate::io::tests::loopback_netns("gw-spoof").await;
        install(Some(&ns), "trl").unwrap();
        // Installing again refills the table (a restarted gateway): the rules once, not twice.
        install(Some(&ns), "trl").unwrap();
        assert_eq!(dropped(Some(&ns)).unwrap(), (0, 0));
        let listed = crate::nft::run(Some(&ns), &["list", "table", "inet", TABLE], None).unwrap();
        assert_eq!(listed.matches("fib saddr").count(), 2, "{listed}");
        // Both scripts are taken by the kernel, in either order.
        crate::nft::apply(Some(&ns), &fresh_ruleset("trl")).unwrap();
        crate::nft::apply(Some(&ns), &ruleset("trl")).unwrap();
    }
}
