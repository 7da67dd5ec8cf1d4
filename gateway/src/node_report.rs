//! `GET /node`: the facts of this node that decide whether the mesh can work on it, for
//! `trellis diagnose` and `trellis sysdump` (read through the API server's pod proxy): the
//! reverse-path filter, the CNI conflist, the MTUs of the underlay, the tunnel and the pods,
//! the node's clock, its links and its main routing table.
//!
//! Reading is at the edge ([`read`]: `/proc/sys`, the conflist file, rtnetlink); turning what
//! was read into the report is the pure [`report`]. Nothing read is trusted to be small: the
//! conflist, the links and the routes are capped.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use trellis_netns::{Link, Netlink, Route, sysctl};

/// Routes listed in a report; a node with more (a full BGP table) says how many there were.
pub const MAX_ROUTES: usize = 4096;
/// Links listed in a report (a node runs a veth per pod).
pub const MAX_LINKS: usize = 1024;
/// Links whose addresses are read to find the underlay (pod veths and the tunnel are skipped).
const MAX_ADDRESS_LOOKUPS: usize = 64;
/// A conflist is a few hundred bytes; more is not a conflist.
const MAX_CONFLIST_BYTES: u64 = 64 * 1024;

/// What the gateway knows about where to look.
#[derive(Debug, Clone)]
pub struct NodeSource {
    pub node: String,
    /// The tunnel (TUN) interface.
    pub interface: String,
    /// The tunnel MTU the gateway was started with.
    pub configured_mtu: u16,
    /// The address other gateways reach this node at (its underlay address).
    pub advertised: Option<IpAddr>,
    /// The CNI conflist the chart installs, as mounted into the gateway; `None`: not told.
    pub cni_conflist: Option<PathBuf>,
}

/// The node's facts, as `GET /node` serves them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    /// The node's clock when the report was made (Unix milliseconds).
    pub clock_unix_ms: u64,
    /// The device the node's underlay traffic uses: the one holding the advertised address,
    /// else the default route's.
    pub underlay: Option<String>,
    pub tunnel: String,
    pub rp_filter: RpFilter,
    pub cni_conflist: CniConflist,
    pub mtu: Mtus,
    pub links: Vec<LinkFact>,
    pub links_total: usize,
    pub routes: Vec<RouteFact>,
    pub routes_total: usize,
    /// What could not be read, one line each.
    pub errors: Vec<String>,
}

/// `net.ipv4.conf.*.rp_filter` (0 off, 1 strict, 2 loose); `None` where unreadable or, for a
/// device, absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RpFilter {
    pub all: Option<u8>,
    pub default: Option<u8>,
    pub tunnel: Option<u8>,
    pub underlay: Option<u8>,
}

impl RpFilter {
    /// What the kernel applies to packets arriving on the tunnel: the larger of `all` and the
    /// device's value (a device not there yet will start with `default`). `None` when either
    /// side is unknown.
    pub fn effective_on_tunnel(&self) -> Option<u8> {
        Some(self.all?.max(self.tunnel.or(self.default)?))
    }
}

/// The CNI conflist as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CniConflist {
    /// Where the gateway looked; `None`: the gateway was not told (`--cni-conflist`).
    pub path: Option<String>,
    /// `None` when not told or unreadable for another reason than absence.
    pub present: Option<bool>,
    /// The trellis-cni plugin's `mtu` in it (without one, the plugin takes the default route
    /// device's MTU minus WireGuard's overhead).
    pub pod_mtu: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Mtus {
    pub underlay: Option<u32>,
    /// The tunnel device's MTU as the kernel has it.
    pub tunnel: Option<u32>,
    /// The tunnel MTU the gateway was started with (`--mtu`).
    pub configured_tunnel: u32,
    /// The device of the default route (the CNI plugin's reference without a conflist MTU).
    pub default_route_device: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkFact {
    pub name: String,
    pub mtu: Option<u32>,
    pub up: bool,
    pub kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteFact {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    pub device: Option<String>,
}

impl std::fmt::Display for RouteFact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(device) = &self.device {
            write!(f, " dev {device}")?;
        }
        Ok(())
    }
}

/// What [`read`] found, before any judgement.
#[derive(Debug, Default)]
pub struct RawFacts {
    pub clock: Option<SystemTime>,
    pub links: Vec<Link>,
    /// The addresses of the links that may be the underlay, by link name.
    pub addresses: BTreeMap<String, Vec<IpNet>>,
    pub routes: Vec<Route>,
    /// `/proc/sys` keys (`net/ipv4/conf/all/rp_filter`) and their values.
    pub sysctls: BTreeMap<String, String>,
    /// The conflist's text: `Some(None)` absent, `None` not told where.
    pub conflist: Option<Option<String>>,
    pub errors: Vec<String>,
}

fn rp_filter_key(device: &str) -> String {
    format!("net/ipv4/conf/{device}/rp_filter")
}

/// The underlay device: the link holding `advertised`, else the default route's device.
pub fn pick_underlay(
    advertised: Option<IpAddr>,
    addresses: &BTreeMap<String, Vec<IpNet>>,
    links: &[Link],
    routes: &[Route],
) -> Option<String> {
    if let Some(ip) = advertised
        && let Some((name, _)) = addresses
            .iter()
            .find(|(_, nets)| nets.iter().any(|n| n.addr() == ip))
    {
        return Some(name.clone());
    }
    let default = default_route_device(routes)?;
    links
        .iter()
        .find(|l| l.index == default)
        .map(|l| l.name.clone())
}

/// The device of the IPv4 default route, else the IPv6 one.
fn default_route_device(routes: &[Route]) -> Option<u32> {
    let defaults = || {
        routes
            .iter()
            .filter(|r| r.destination.prefix_len() == 0 && r.device.is_some())
    };
    defaults()
        .find(|r| r.destination.addr().is_ipv4())
        .or_else(|| defaults().next())
        .and_then(|r| r.device)
}

/// The trellis-cni plugin's `mtu` in a conflist; `Err` when the text is not a conflist.
pub fn conflist_pod_mtu(text: &str) -> Result<Option<u32>, String> {
    let list: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the conflist is not JSON: {e}"))?;
    let plugins = list["plugins"]
        .as_array()
        .ok_or("the conflist has no plugins list")?;
    let trellis = plugins
        .iter()
        .find(|p| p["type"] == "trellis-cni")
        .ok_or("the conflist has no trellis-cni plugin")?;
    Ok(trellis["mtu"].as_u64().and_then(|m| u32::try_from(m).ok()))
}

/// The report from what was read.
pub fn report(source: &NodeSource, raw: RawFacts) -> NodeReport {
    let mut errors = raw.errors;
    let underlay = pick_underlay(source.advertised, &raw.addresses, &raw.links, &raw.routes);
    let sysctl = |key: String| -> Option<u8> { raw.sysctls.get(&key)?.trim().parse().ok() };
    let rp_filter = RpFilter {
        all: sysctl(rp_filter_key("all")),
        default: sysctl(rp_filter_key("default")),
        tunnel: sysctl(rp_filter_key(&source.interface)),
        underlay: underlay.as_deref().and_then(|u| sysctl(rp_filter_key(u))),
    };
    let cni_conflist = match (&source.cni_conflist, raw.conflist) {
        (Some(path), Some(Some(text))) => CniConflist {
            path: Some(path.display().to_string()),
            present: Some(true),
            pod_mtu: conflist_pod_mtu(&text).unwrap_or_else(|e| {
                errors.push(format!("{}: {e}", path.display()));
                None
            }),
        },
        (Some(path), Some(None)) => CniConflist {
            path: Some(path.display().to_string()),
            present: Some(false),
            pod_mtu: None,
        },
        (path, _) => CniConflist {
            path: path.as_ref().map(|p| p.display().to_string()),
            present: None,
            pod_mtu: None,
        },
    };
    let link_named = |name: &str| raw.links.iter().find(|l| l.name == name);
    let default_device = default_route_device(&raw.routes);
    let mtu = Mtus {
        underlay: underlay.as_deref().and_then(link_named).and_then(|l| l.mtu),
        tunnel: link_named(&source.interface).and_then(|l| l.mtu),
        configured_tunnel: u32::from(source.configured_mtu),
        default_route_device: raw
            .links
            .iter()
            .find(|l| Some(l.index) == default_device)
            .and_then(|l| l.mtu),
    };
    let name_of = |index: u32| {
        raw.links
            .iter()
            .find(|l| l.index == index)
            .map_or_else(|| format!("#{index}"), |l| l.name.clone())
    };
    NodeReport {
        node: source.node.clone(),
        clock_unix_ms: raw
            .clock
            .and_then(|c| c.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        underlay,
        tunnel: source.interface.clone(),
        rp_filter,
        cni_conflist,
        mtu,
        links_total: raw.links.len(),
        links: raw
            .links
            .iter()
            .take(MAX_LINKS)
            .map(|l| LinkFact {
                name: l.name.clone(),
                mtu: l.mtu,
                up: l.up,
                kind: l.kind.clone(),
            })
            .collect(),
        routes_total: raw.routes.len(),
        routes: raw
            .routes
            .iter()
            .take(MAX_ROUTES)
            .map(|r| RouteFact {
                destination: r.destination,
                gateway: r.gateway,
                device: r.device.map(name_of),
            })
            .collect(),
        errors,
    }
}

/// Reads this node's facts (the caller's network namespace: the host's, for a gateway on the
/// host network). Never fails: what cannot be read is named in `errors`.
pub async fn read(source: &NodeSource) -> RawFacts {
    let mut raw = RawFacts {
        clock: Some(SystemTime::now()),
        ..RawFacts::default()
    };
    match Netlink::connect() {
        Ok(netlink) => {
            match netlink.links().await {
                Ok(links) => raw.links = links,
                Err(e) => raw.errors.push(format!("links: {}", crate::chain(&e))),
            }
            match netlink.routes().await {
                Ok(routes) => raw.routes = routes,
                Err(e) => raw.errors.push(format!("routes: {}", crate::chain(&e))),
            }
            let candidates = raw
                .links
                .iter()
                .filter(|l| {
                    l.up && l.name != source.interface
                        && !l.name.starts_with(trellis_core::POD_VETH_PREFIX)
                })
                .take(MAX_ADDRESS_LOOKUPS);
            for link in candidates {
                match netlink.addresses(link.index).await {
                    Ok(nets) => {
                        raw.addresses.insert(link.name.clone(), nets);
                    }
                    Err(e) => raw.errors.push(format!("addresses: {}", crate::chain(&e))),
                }
            }
        }
        Err(e) => raw.errors.push(format!("netlink: {}", crate::chain(&e))),
    }
    let underlay = pick_underlay(source.advertised, &raw.addresses, &raw.links, &raw.routes);
    let devices = ["all", "default", source.interface.as_str()]
        .into_iter()
        .chain(underlay.as_deref());
    for device in devices {
        let key = rp_filter_key(device);
        match sysctl::read(None, &key) {
            Ok(value) => {
                raw.sysctls.insert(key, value);
            }
            // A device that is not there has no key; the report says unknown.
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => raw.errors.push(crate::chain(&e)),
        }
    }
    if let Some(path) = &source.cni_conflist {
        let read = std::fs::File::open(path).and_then(|file| {
            let mut text = String::new();
            file.take(MAX_CONFLIST_BYTES).read_to_string(&mut text)?;
            Ok(text)
        });
        raw.conflist = match read {
            Ok(text) => Some(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
            Err(e) => {
                raw.errors.push(format!("{}: {e}", path.display()));
                None
            }
        };
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, mtu: u32) -> Link {
        Link {
            index,
            name: name.into(),
            mac: None,
            mtu: Some(mtu),
            up: true,
            operational: true,
            kind: None,
        }
    }

    fn source() -> NodeSource {
        NodeSource {
            node: "kind-worker".into(),
            interface: "trellis0".into(),
            configured_mtu: 1420,
            advertised: Some("172.18.0.3".parse().unwrap()),
            cni_conflist: Some("/host/cni/net.d/10-trellis.conflist".into()),
        }
    }

    /// A kind node: eth0 with the node address and the default route, the tunnel, a pod veth.
    fn kind_node() -> RawFacts {
        let mut sysctls = BTreeMap::new();
        for (device, value) in [
            ("all", "0"),
            ("default", "1"),
            ("trellis0", "0"),
            ("eth0", "2"),
        ] {
            sysctls.insert(rp_filter_key(device), value.into());
        }
        RawFacts {
            clock: Some(UNIX_EPOCH + std::time::Duration::from_millis(1_795_750_867_250)),
            links: vec![
                link(1, "lo", 65536),
                link(7, "trellis0", 1420),
                link(12, "trl0a1b2c3d", 1420),
                link(23, "eth0", 1500),
            ],
            addresses: [
                ("lo".to_string(), vec!["127.0.0.1/8".parse().unwrap()]),
                ("eth0".to_string(), vec!["172.18.0.3/16".parse().unwrap()]),
            ]
            .into(),
            routes: vec![
                Route::via_gateway("0.0.0.0/0".parse().unwrap(), "172.18.0.1".parse().unwrap(), Some(23)),
                Route::via_device("10.244.2.0/24".parse().unwrap(), 7),
                Route::via_device("10.244.1.5/32".parse().unwrap(), 12),
            ],
            sysctls,
            conflist: Some(Some(
                r#"{"cniVersion":"1.1.0","name":"trellis","plugins":[{"type":"trellis-cni","podCIDRs":["10.244.1.0/24"],"mtu":1420},{"type":"portmap"}]}"#.into(),
            )),
            errors: vec![],
        }
    }

    #[test]
    fn a_kind_node_reports_its_facts_by_device_name() {
        let report = report(&source(), kind_node());
        assert_eq!(report.underlay.as_deref(), Some("eth0"));
        assert_eq!(
            report.rp_filter,
            RpFilter {
                all: Some(0),
                default: Some(1),
                tunnel: Some(0),
                underlay: Some(2)
            }
        );
        assert_eq!(report.rp_filter.effective_on_tunnel(), Some(0));
        assert_eq!(
            report.cni_conflist,
            CniConflist {
                path: Some("/host/cni/net.d/10-trellis.conflist".into()),
                present: Some(true),
                pod_mtu: Some(1420)
            }
        );
        assert_eq!(
            report.mtu,
            Mtus {
                underlay: Some(1500),
                tunnel: Some(1420),
                configured_tunnel: 1420,
                default_route_device: Some(1500)
            }
        );
        assert_eq!(report.clock_unix_ms, 1_795_750_867_250);
        let routes: Vec<String> = report.routes.iter().map(ToString::to_string).collect();
        assert_eq!(
            routes,
            [
                "0.0.0.0/0 via 172.18.0.1 dev eth0",
                "10.244.2.0/24 dev trellis0",
                "10.244.1.5/32 dev trl0a1b2c3d"
            ]
        );
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // What the CLI reads back is what was served.
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<NodeReport>(&json).unwrap(), report);
    }

    #[test]
    fn the_tunnel_takes_the_larger_of_all_and_its_own_or_the_default() {
        let rp = |all, default, tunnel| RpFilter {
            all,
            default,
            tunnel,
            underlay: None,
        };
        assert_eq!(rp(Some(2), Some(0), Some(0)).effective_on_tunnel(), Some(2));
        assert_eq!(rp(Some(0), Some(0), Some(1)).effective_on_tunnel(), Some(1));
        assert_eq!(
            rp(Some(0), Some(1), None).effective_on_tunnel(),
            Some(1),
            "a tunnel not there yet starts with default"
        );
        assert_eq!(rp(None, Some(0), Some(0)).effective_on_tunnel(), None);
    }

    #[test]
    fn without_the_advertised_address_the_default_route_names_the_underlay() {
        let mut raw = kind_node();
        raw.addresses.remove("eth0");
        let mut src = source();
        assert_eq!(report(&src, kind_node()).underlay.as_deref(), Some("eth0"));
        src.advertised = Some("10.9.9.9".parse().unwrap());
        assert_eq!(report(&src, raw).underlay.as_deref(), Some("eth0"));
        let mut raw = kind_node();
        raw.routes.remove(0);
        raw.addresses.clear();
        let none = report(&src, raw);
        assert_eq!(none.underlay, None);
        assert_eq!(none.mtu.underlay, None);
        assert_eq!(none.rp_filter.underlay, None);
    }

    #[test]
    fn an_absent_unknown_or_broken_conflist_is_said_so() {
        let mut raw = kind_node();
        raw.conflist = Some(None);
        let absent = report(&source(), raw).cni_conflist;
        assert_eq!(absent.present, Some(false));
        let mut src = source();
        src.cni_conflist = None;
        let mut raw = kind_node();
        raw.conflist = None;
        assert_eq!(
            report(&src, raw).cni_conflist,
            CniConflist::default(),
            "not told where"
        );
        let mut raw = kind_node();
        raw.conflist = Some(Some("{not json".into()));
        let broken = report(&source(), raw);
        assert_eq!(broken.cni_conflist.present, Some(true));
        assert!(broken.errors[0].contains("not JSON"), "{:?}", broken.errors);
        assert_eq!(
            conflist_pod_mtu(r#"{"plugins":[{"type":"trellis-cni"}]}"#),
            Ok(None)
        );
        assert!(conflist_pod_mtu(r#"{"plugins":[{"type":"bridge"}]}"#).is_err());
    }

    #[test]
    fn long_route_and_link_lists_are_cut_and_counted() {
        let mut raw = kind_node();
        raw.routes = (0..MAX_ROUTES as u32 + 10)
            .map(|i| Route::via_device(IpNet::new(IpAddr::V4(i.into()), 32).unwrap(), 23))
            .collect();
        raw.links = (0..MAX_LINKS as u32 + 3)
            .map(|i| link(i + 100, &format!("trl{i}"), 1420))
            .collect();
        let report = report(&source(), raw);
        assert_eq!(report.routes.len(), MAX_ROUTES);
        assert_eq!(report.routes_total, MAX_ROUTES + 10);
        assert_eq!(report.links.len(), MAX_LINKS);
        assert_eq!(report.links_total, MAX_LINKS + 3);
        assert_eq!(report.routes[0].device.as_deref(), Some("#23"));
    }

    #[tokio::test]
    async fn reads_a_real_namespace() {
        trellis_test_support::skip_unless_root!();
        let ns = trellis_netns::testing::TempNetns::new("gw-node").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let conflist = dir.path().join("10-trellis.conflist");
        std::fs::write(
            &conflist,
            r#"{"plugins":[{"type":"trellis-cni","mtu":1380}]}"#,
        )
        .unwrap();
        let src = NodeSource {
            cni_conflist: Some(conflist),
            advertised: None,
            ..source()
        };
        let reader = src.clone();
        let handle = ns.netns().try_clone().unwrap();
        let raw = tokio::task::spawn_blocking(move || {
            handle
                .run(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(read(&reader))
                })
                .unwrap()
        })
        .await
        .unwrap();
        let report = report(&src, raw);
        assert!(report.links.iter().any(|l| l.name == "lo"), "{report:?}");
        // A fresh namespace: rp_filter readable, no tunnel device, no default route.
        assert!(report.rp_filter.all.is_some(), "{report:?}");
        assert_eq!(report.rp_filter.tunnel, None);
        assert_eq!(report.underlay, None);
        assert_eq!(report.cni_conflist.pod_mtu, Some(1380));
        assert!(report.clock_unix_ms > 1_700_000_000_000);
    }
}
