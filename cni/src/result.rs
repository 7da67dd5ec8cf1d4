//! The success result of ADD, in whichever spec version the config asked for.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Pods route everything through this link-local gateway; the node answers for it with a
/// static neighbour entry, as Calico and Cilium do, so no address is spent per pod on it.
pub const GATEWAY_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1));
/// The IPv6 twin of [`GATEWAY_V4`].
pub const GATEWAY_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1));

pub fn gateway_for(address: &IpAddr) -> IpAddr {
    if address.is_ipv4() {
        GATEWAY_V4
    } else {
        GATEWAY_V6
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only in 0.4.0 results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// What ADD built, to be reported.
#[derive(Debug, Clone)]
pub struct Wiring<'a> {
    pub host_ifname: &'a str,
    pub host_mac: [u8; 6],
    pub pod_ifname: &'a str,
    pub pod_mac: [u8; 6],
    pub netns: &'a str,
    pub mtu: u32,
    pub addresses: &'a [IpAddr],
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl CniResult {
    /// The result of an ADD: what came before in the chain (if anything), then our two
    /// interfaces, the pod's addresses and its default routes.
    pub fn for_pod(prev: Option<&CniResult>, wiring: &Wiring<'_>) -> Self {
        let mut result = prev.cloned().unwrap_or_default();
        let host_index = result.interfaces.len();
        result.interfaces.push(Interface {
            name: wiring.host_ifname.to_string(),
            mac: format_mac(&wiring.host_mac),
            mtu: Some(wiring.mtu),
            sandbox: None,
        });
        result.interfaces.push(Interface {
            name: wiring.pod_ifname.to_string(),
            mac: format_mac(&wiring.pod_mac),
            mtu: Some(wiring.mtu),
            sandbox: Some(wiring.netns.to_string()),
        });
        for address in wiring.addresses {
            let gateway = gateway_for(address);
            result.ips.push(IpConfig {
                version: None,
                address: IpNet::from(*address),
                gateway: Some(gateway),
                interface: Some(host_index + 1),
            });
            let default = if address.is_ipv4() {
                "0.0.0.0/0"
            } else {
                "::/0"
            };
            result.routes.push(RouteConfig {
                dst: default.parse().expect("a default route parses"),
                gw: Some(gateway),
            });
        }
        result
    }

    /// The result as the spec of `version` spells it.
    pub fn in_version(mut self, version: &str) -> Self {
        self.cni_version = version.to_string();
        let legacy = version.starts_with("0.");
        for ip in &mut self.ips {
            ip.version = legacy.then(|| {
                if ip.address.addr().is_ipv4() {
                    "4"
                } else {
                    "6"
                }
                .to_string()
            });
        }
        if version != "1.1.0" {
            for interface in &mut self.interfaces {
                interface.mtu = None;
            }
        }
        self
    }

    /// The pod addresses this result reports for the interface `ifname` in `netns`.
    pub fn addresses_of(&self, ifname: &str, netns: &str) -> Vec<IpNet> {
        let Some(index) = self
            .interfaces
            .iter()
            .position(|i| i.name == ifname && i.sandbox.as_deref() == Some(netns))
        else {
            return Vec::new();
        };
        self.ips
            .iter()
            .filter(|ip| ip.interface == Some(index))
            .map(|ip| ip.address)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wiring(addresses: &[IpAddr]) -> Wiring<'_> {
        Wiring {
            host_ifname: "trl0123456789ab",
            host_mac: [0xee, 0xee, 0xee, 0xee, 0xee, 0xee],
            pod_ifname: "eth0",
            pod_mac: [0x02, 0, 0, 0, 0, 1],
            netns: "/var/run/netns/pod",
            mtu: 1420,
            addresses,
        }
    }

    #[test]
    fn spec_1_1_result_lists_interfaces_ips_and_routes() {
        let addresses = ["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let result = CniResult::for_pod(None, &wiring(&addresses)).in_version("1.1.0");
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["cniVersion"], "1.1.0");
        assert_eq!(json["interfaces"][1]["sandbox"], "/var/run/netns/pod");
        assert_eq!(json["interfaces"][1]["mtu"], 1420);
        assert_eq!(json["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
        assert_eq!(json["ips"][0]["address"], "10.244.1.5/32");
        assert_eq!(json["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(json["ips"][0]["interface"], 1);
        assert!(json["ips"][0].get("version").is_none());
        assert_eq!(json["ips"][1]["address"], "fd00::5/128");
        assert_eq!(json["routes"][1]["dst"], "::/0");
        assert_eq!(json["routes"][1]["gw"], "fe80::1");
    }

    #[test]
    fn spec_0_4_result_carries_ip_versions_and_no_mtu() {
        let addresses = ["10.244.1.5".parse().unwrap()];
        let json =
            serde_json::to_value(CniResult::for_pod(None, &wiring(&addresses)).in_version("0.4.0"))
                .unwrap();
        assert_eq!(json["ips"][0]["version"], "4");
        assert!(json["interfaces"][1].get("mtu").is_none());
    }

    #[test]
    fn chains_after_a_previous_result() {
        let prev: CniResult = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"dummy0"}],"ips":[{"address":"192.0.2.1/24","interface":0}],"dns":{"nameservers":["192.0.2.53"]}}"#,
        )
        .unwrap();
        let addresses = ["10.244.1.5".parse().unwrap()];
        let result = CniResult::for_pod(Some(&prev), &wiring(&addresses));
        assert_eq!(result.interfaces.len(), 3);
        assert_eq!(result.ips[1].interface, Some(2));
        assert_eq!(result.dns.nameservers, vec!["192.0.2.53"]);
        assert_eq!(
            result.addresses_of("eth0", "/var/run/netns/pod"),
            vec!["10.244.1.5/32".parse::<IpNet>().unwrap()]
        );
    }
}
