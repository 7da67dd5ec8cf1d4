//! The network configuration the runtime sends on stdin.

use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::SUPPORTED_VERSIONS;
use crate::error::{CniError, code};
use crate::ipam::{DEFAULT_LOCK_TIMEOUT, Store};
use crate::result::CniResult;

/// Where allocations live unless the config says otherwise (beside host-local's, in the
/// directory every CNI installation already has).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/trellis";

/// WireGuard's overhead on an IPv6 underlay (40 IP + 8 UDP + 32 WireGuard); pods get this much
/// less than the underlay so node encryption can be switched on under live flows.
pub const WIREGUARD_OVERHEAD: u32 = 80;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The node's pod CIDRs: at most one IPv4 and one IPv6.
    pub pod_cidrs: Vec<IpNet>,
    /// Pod MTU; `None` means "underlay MTU minus WireGuard's overhead", found at ADD.
    pub mtu: Option<u32>,
    pub data_dir: PathBuf,
    /// How long to wait for the lease state's lock before answering "try again later".
    pub lock_timeout: Duration,
    pub prev_result: Option<CniResult>,
    /// GC only: the attachments the runtime still knows, as (container ID, ifname).
    pub valid_attachments: Option<Vec<(String, String)>>,
    /// A file the node's gateway writes once its plan (tunnels, routes and their unreachable
    /// backstops) is in place, on a tmpfs so a reboot removes it: until it exists, ADD answers
    /// "try again later" and STATUS "not available", so no pod is wired whose traffic to an
    /// encrypted or remote CIDR could leave the node in plaintext.
    pub gateway_ready_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    #[serde(rename = "podCIDRs", default)]
    pod_cidrs: Vec<String>,
    mtu: Option<u32>,
    data_dir: Option<PathBuf>,
    ipam_lock_timeout_ms: Option<u64>,
    /// Delegated IPAM is not supported: trellis-cni allocates from `podCIDRs` itself.
    ipam: Option<serde_json::Value>,
    prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<RawAttachment>>,
    gateway_ready_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg, details)
}

/// The `cniVersion` of a config, read leniently so errors can be reported in it.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    serde_json::from_slice::<Peek>(stdin)
        .ok()
        .map(|p| p.cni_version)
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "network configuration is not valid JSON",
                e.to_string(),
            )
        })?;
        let cni_version = raw
            .cni_version
            .ok_or_else(|| invalid("cniVersion is missing", ""))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "config has {cni_version}; trellis-cni supports {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let name = raw
            .name
            .ok_or_else(|| invalid("network name is missing", ""))?;
        let name_ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !name_ok {
            return Err(invalid(
                "network name is not valid",
                format!("{name:?} must be alphanumeric, '_', '.' or '-'"),
            ));
        }
        if raw.plugin_type.is_none() {
            return Err(invalid("plugin type is missing", ""));
        }
        if raw.ipam.is_some() {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "unsupported field \"ipam\"",
                "trellis-cni allocates pod addresses itself from podCIDRs; remove the ipam section",
            ));
        }
        let pod_cidrs = parse_pod_cidrs(&raw.pod_cidrs)?;
        if let Some(mtu) = raw.mtu {
            let minimum = if pod_cidrs.iter().any(|c| matches!(c, IpNet::V6(_))) {
                1280
            } else {
                576
            };
            if !(minimum..=65535).contains(&mtu) {
                return Err(invalid(
                    "mtu is out of range",
                    format!("{mtu} is not within {minimum}..=65535"),
                ));
            }
        }
        let prev_result = raw
            .prev_result
            .map(|value| {
                serde_json::from_value::<CniResult>(value).map_err(|e| {
                    CniError::new(
                        code::DECODE_FAILURE,
                        "prevResult is not a valid CNI result",
                        e.to_string(),
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            cni_version,
            name,
            pod_cidrs,
            mtu: raw.mtu,
            lock_timeout: raw
                .ipam_lock_timeout_ms
                .map_or(DEFAULT_LOCK_TIMEOUT, Duration::from_millis),
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            prev_result,
            valid_attachments: raw.valid_attachments.map(|list| {
                list.into_iter()
                    .map(|a| (a.container_id, a.ifname))
                    .collect()
            }),
            gateway_ready_file: raw.gateway_ready_file,
        })
    }

    /// The directory holding this network's allocations.
    pub fn state_dir(&self) -> PathBuf {
        self.data_dir.join(&self.name)
    }

    /// This network's lease store.
    pub fn store(&self) -> Result<Store, CniError> {
        Ok(Store::open(&self.state_dir())?.with_lock_timeout(self.lock_timeout))
    }
}

fn parse_pod_cidrs(texts: &[String]) -> Result<Vec<IpNet>, CniError> {
    if texts.is_empty() {
        return Err(invalid(
            "podCIDRs is missing",
            "give the node's pod CIDR(s), e.g. [\"10.244.1.0/24\"]",
        ));
    }
    let mut cidrs: Vec<IpNet> = Vec::new();
    for text in texts {
        let cidr: IpNet = text
            .parse()
            .map_err(|e| invalid("podCIDRs has a bad CIDR", format!("{text:?}: {e}")))?;
        if cidr.trunc() != cidr {
            return Err(invalid(
                "podCIDRs has host bits set",
                format!("{text} (did you mean {}?)", cidr.trunc()),
            ));
        }
        let usable_bits = cidr.max_prefix_len() - cidr.prefix_len();
        if usable_bits < 2 {
            return Err(invalid(
                "pod CIDR is too small",
                format!("{cidr} leaves no room for pods"),
            ));
        }
        if cidrs
            .iter()
            .any(|c| c.addr().is_ipv4() == cidr.addr().is_ipv4())
        {
            return Err(invalid(
                "podCIDRs has two CIDRs of one family",
                format!("{texts:?}: at most one IPv4 and one IPv6"),
            ));
        }
        cidrs.push(cidr);
    }
    Ok(cidrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_dual_stack_config() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"trellis","type":"trellis-cni",
                "podCIDRs":["10.244.1.0/24","fd00:10:244:1::/64"],"mtu":1420,"dataDir":"/tmp/x"}"#,
        )
        .unwrap();
        assert_eq!(conf.pod_cidrs.len(), 2);
        assert_eq!(conf.mtu, Some(1420));
        assert_eq!(conf.state_dir(), PathBuf::from("/tmp/x/trellis"));
    }

    #[test]
    fn reads_gc_attachments() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"trellis-cni","podCIDRs":["10.0.0.0/24"],
                "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            conf.valid_attachments,
            Some(vec![("a".to_string(), "eth0".to_string())])
        );
    }

    #[test]
    fn each_bad_config_gets_its_code() {
        let cases: [(&[u8], u32); 10] = [
            (b"{not json", code::DECODE_FAILURE),
            (br#"{"cniVersion":"0.2.0","name":"n","type":"t","podCIDRs":["10.0.0.0/24"]}"#, code::INCOMPATIBLE_VERSION),
            (br#"{"cniVersion":"1.0.0","type":"t","podCIDRs":["10.0.0.0/24"]}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","podCIDRs":["10.0.0.1/24"]}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","podCIDRs":["10.0.0.0/24","10.1.0.0/24"]}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","podCIDRs":["10.0.0.0/31"]}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","podCIDRs":["10.0.0.0/24"],"mtu":100}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","podCIDRs":["10.0.0.0/24"],"prevResult":{"ips":"x"}}"#, code::DECODE_FAILURE),
            (br#"{"cniVersion":"1.0.0","name":"n","type":"t","podCIDRs":["10.0.0.0/24"],"ipam":{"type":"host-local"}}"#, code::UNSUPPORTED_FIELD),
        ];
        for (stdin, expected) in cases {
            let error = NetConf::parse(stdin).unwrap_err();
            assert_eq!(
                error.code,
                expected,
                "{}: {error}",
                String::from_utf8_lossy(stdin)
            );
        }
    }
}
