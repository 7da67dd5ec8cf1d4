//! Anti-spoofing for pods: a packet that arrives from a pod's host veth with a source the
//! node would not route back through that veth (not one of that pod's addresses) is dropped,
//! IPv4 and IPv6, before connection tracking, and counted.
//!
//! One nftables table per node, owned by the node agent: strict reverse-path filtering with
//! `fib saddr . iif oif missing` on interfaces named like the CNI plugin's host veths. The
//! kernel's own `rp_filter` cannot do it: it is IPv4 only, and a node's `all` setting of 2
//! (loose, common) would override a strict per-interface value.

use std::io::Write;
use std::process::{Command, Stdio};

use trellis_netns::Netns;

/// The table's name (family `inet`).
pub const TABLE: &str = "trellis_antispoof";

/// Why the rules could not be installed or read.
#[derive(Debug, thiserror::Error)]
pub enum AntispoofError {
    #[error("run nft")]
    Run(#[source] std::io::Error),
    #[error("enter the node's namespace")]
    Netns(#[source] trellis_netns::Error),
    #[error("nft refused the rules: {0}")]
    Refused(String),
    #[error("nft's counters are not the JSON expected")]
    Parse(#[source] serde_json::Error),
}

/// The table, replacing any earlier one in the same transaction (`nft -f`): counters named per
/// family, and the rules for every interface starting with `veth_prefix`.
pub fn ruleset(veth_prefix: &str) -> String {
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tcounter spoofed_ipv4 {{ }}\n\
         \tcounter spoofed_ipv6 {{ }}\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\t# Duplicate address detection sends from the unspecified address.\n\
         \t\tiifname \"{veth_prefix}*\" ip6 saddr :: accept\n\
         \t\tiifname \"{veth_prefix}*\" meta nfproto ipv4 fib saddr . iif oif missing counter name \"spoofed_ipv4\" drop\n\
         \t\tiifname \"{veth_prefix}*\" meta nfproto ipv6 fib saddr . iif oif missing counter name \"spoofed_ipv6\" drop\n\
         \t}}\n\
         }}\n"
    )
}

/// Runs `nft` with `args` (and `input` on its stdin) inside `netns`, or here.
fn nft(
    netns: Option<&Netns>,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, AntispoofError> {
    let mut command = Command::new("nft");
    command
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match netns {
        Some(netns) => netns
            .spawn(&mut command)
            .map_err(AntispoofError::Netns)?
            .map_err(AntispoofError::Run)?,
        None => command.spawn().map_err(AntispoofError::Run)?,
    };
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .map_err(AntispoofError::Run)?;
    }
    let output = child.wait_with_output().map_err(AntispoofError::Run)?;
    if !output.status.success() {
        return Err(AntispoofError::Refused(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Installs (or replaces) the table.
pub fn install(netns: Option<&Netns>, veth_prefix: &str) -> Result<(), AntispoofError> {
    nft(netns, &["-f", "-"], Some(&ruleset(veth_prefix))).map(|_| ())
}

/// Packets dropped so far: (IPv4, IPv6).
pub fn dropped(netns: Option<&Netns>) -> Result<(u64, u64), AntispoofError> {
    let json = nft(
        netns,
        &["-j", "list", "counters", "table", "inet", TABLE],
        None,
    )?;
    parse_counters(&json)
}

/// The packet counts of `spoofed_ipv4` and `spoofed_ipv6` in `nft -j list counters` output.
pub fn parse_counters(json: &str) -> Result<(u64, u64), AntispoofError> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(AntispoofError::Parse)?;
    let mut counts = (0, 0);
    for item in value["nftables"].as_array().into_iter().flatten() {
        let counter = &item["counter"];
        let packets = counter["packets"].as_u64().unwrap_or(0);
        match counter["name"].as_str() {
            Some("spoofed_ipv4") => counts.0 = packets,
            Some("spoofed_ipv6") => counts.1 = packets,
            _ => {}
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_replaces_itself_and_filters_only_pod_veths() {
        let rules = ruleset("trl");
        assert!(
            rules
                .starts_with("table inet trellis_antispoof\ndelete table inet trellis_antispoof\n")
        );
        assert_eq!(rules.matches("iifname \"trl*\"").count(), 3);
        assert!(rules.contains("fib saddr . iif oif missing counter name \"spoofed_ipv4\" drop"));
        assert!(rules.contains("priority raw"));
    }

    #[test]
    fn reads_the_counters_nft_prints() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"counter": {"family": "inet", "name": "spoofed_ipv4", "table": "trellis_antispoof", "handle": 1, "packets": 7, "bytes": 420}},
            {"counter": {"family": "inet", "name": "spoofed_ipv6", "table": "trellis_antispoof", "handle": 2, "packets": 2, "bytes": 160}}]}"#;
        assert_eq!(parse_counters(json).unwrap(), (7, 2));
        assert!(parse_counters("nope").is_err());
    }

    #[tokio::test]
    async fn the_kernel_takes_the_rules_and_counts_nothing_yet() {
        trellis_test_support::skip_unless_root!();
        let ns = crate::io::tests::loopback_netns("gw-spoof").await;
        install(Some(&ns), "trl").unwrap();
        // Installing again replaces the table (a restarted gateway).
        install(Some(&ns), "trl").unwrap();
        assert_eq!(dropped(Some(&ns)).unwrap(), (0, 0));
    }
}
