//! The kernel side of [`super::Enforcer`]: `nft` in the node's namespace.

use std::collections::BTreeMap;
use std::sync::Arc;

use trellis_core::policy::nft::{ExistingTable, TABLE};
use trellis_netns::Netns;

use super::PolicyKernel;
use crate::nft::{self, NftError};

/// `nft` here (`netns` `None`) or in a namespace (tests, an in-process gateway).
#[derive(Debug, Clone, Default)]
pub struct NftKernel {
    pub netns: Option<Arc<Netns>>,
}

impl PolicyKernel for NftKernel {
    fn apply(&mut self, script: &str) -> Result<(), NftError> {
        nft::apply(self.netns.as_deref(), script)
    }

    fn counters(&mut self) -> Result<BTreeMap<String, u64>, NftError> {
        nft::counters(self.netns.as_deref(), TABLE)
    }

    fn existing(&mut self) -> Result<Option<ExistingTable>, NftError> {
        existing(self.netns.as_deref())
    }
}

/// The policy table's sets, maps and chains as the kernel has them; `None` when there is no
/// table. Terse (`-t`): no set elements, however many.
pub fn existing(netns: Option<&Netns>) -> Result<Option<ExistingTable>, NftError> {
    match nft::run(netns, &["-j", "-t", "list", "table", "inet", TABLE], None) {
        Ok(json) => parse_existing(&json).map(Some),
        // nft says "No such file or directory" for a table that is not there.
        Err(NftError::Refused(message)) if message.contains("No such file") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The names in `nft -j list table` output.
pub fn parse_existing(json: &str) -> Result<ExistingTable, NftError> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(NftError::Parse)?;
    let mut table = ExistingTable::default();
    for item in value["nftables"].as_array().into_iter().flatten() {
        let Some(object) = item.as_object() else {
            continue;
        };
        for (kind, names) in [
            ("set", &mut table.sets),
            ("map", &mut table.maps),
            ("chain", &mut table.chains),
        ] {
            if let Some(name) = object.get(kind).and_then(|o| o["name"].as_str()) {
                names.insert(name.to_string());
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_names_of_sets_maps_and_chains() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "trellis_policy", "handle": 1}},
            {"counter": {"family": "inet", "name": "drop_egress", "table": "trellis_policy"}},
            {"set": {"family": "inet", "name": "clients", "table": "trellis_policy", "type": "ipv4_addr"}},
            {"map": {"family": "inet", "name": "_egress4", "table": "trellis_policy", "type": "ipv4_addr", "map": "verdict"}},
            {"chain": {"family": "inet", "table": "trellis_policy", "name": "_egress_forward", "hook": "forward"}},
            {"rule": {"family": "inet", "table": "trellis_policy", "chain": "_egress", "expr": []}}]}"#;
        let table = parse_existing(json).unwrap();
        assert_eq!(table.sets, ["clients".to_string()].into());
        assert_eq!(table.maps, ["_egress4".to_string()].into());
        assert_eq!(table.chains, ["_egress_forward".to_string()].into());
        assert!(parse_existing("[").is_err());
    }

    #[test]
    fn reads_the_table_the_kernel_has_or_none() {
        trellis_test_support::skip_unless_root!();
        let ns = trellis_netns::testing::TempNetns::new("gw-pol-names").unwrap();
        assert_eq!(existing(Some(&ns)).unwrap(), None);
        let mut ruleset = trellis_core::policy::ruleset::Ruleset::default();
        ruleset.chains.insert("pod_a".into(), vec![]);
        nft::apply(
            Some(&ns),
            &trellis_core::policy::nft::render_full(&ruleset).unwrap(),
        )
        .unwrap();
        let table = existing(Some(&ns)).unwrap().unwrap();
        assert!(table.chains.contains("pod_a") && table.chains.contains("_ingress_forward"));
        assert!(table.maps.contains("_ingress6") && table.sets.contains("_local4"));
    }
}
