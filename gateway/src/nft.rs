//! Running `nft`, the one way the gateway changes and reads its nftables tables (anti-spoofing
//! and NetworkPolicy): a script on stdin is one transaction (`nft -f -`), which the kernel
//! applies whole or not at all.

use std::io::Write;
use std::process::{Command, Stdio};

use trellis_netns::Netns;

/// Why `nft` did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("run nft")]
    Run(#[source] std::io::Error),
    #[error("enter the node's namespace")]
    Netns(#[source] trellis_netns::Error),
    #[error("nft refused the rules: {0}")]
    Refused(String),
    #[error("nft's counters are not the JSON expected")]
    Parse(#[source] serde_json::Error),
}

/// Runs `nft` with `args` (and `input` on its stdin) inside `netns`, or here; its output.
pub fn run(netns: Option<&Netns>, args: &[&str], input: Option<&str>) -> Result<String, NftError> {
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
            .map_err(NftError::Netns)?
            .map_err(NftError::Run)?,
        None => command.spawn().map_err(NftError::Run)?,
    };
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).map_err(NftError::Run)?;
    }
    let output = child.wait_with_output().map_err(NftError::Run)?;
    if !output.status.success() {
        return Err(NftError::Refused(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Applies `script` in one transaction.
pub fn apply(netns: Option<&Netns>, script: &str) -> Result<(), NftError> {
    run(netns, &["-f", "-"], Some(script)).map(|_| ())
}

/// The packet counts of the named counters of `table` (family `inet`).
pub fn counters(
    netns: Option<&Netns>,
    table: &str,
) -> Result<std::collections::BTreeMap<String, u64>, NftError> {
    parse_counters(&run(
        netns,
        &["-j", "list", "counters", "table", "inet", table],
        None,
    )?)
}

/// Each named counter's packet count in `nft -j list counters` output.
pub fn parse_counters(json: &str) -> Result<std::collections::BTreeMap<String, u64>, NftError> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(NftError::Parse)?;
    Ok(value["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let counter = &item["counter"];
            Some((
                counter["name"].as_str()?.to_string(),
                counter["packets"].as_u64().unwrap_or(0),
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_counters_nft_prints() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"counter": {"family": "inet", "name": "spoofed_ipv4", "table": "trellis_antispoof", "handle": 1, "packets": 7, "bytes": 420}},
            {"counter": {"family": "inet", "name": "spoofed_ipv6", "table": "trellis_antispoof", "handle": 2, "packets": 2, "bytes": 160}}]}"#;
        let counts = parse_counters(json).unwrap();
        assert_eq!(counts["spoofed_ipv4"], 7);
        assert_eq!(counts["spoofed_ipv6"], 2);
        assert!(parse_counters("nope").is_err());
    }
}
