//! The address ranges a cluster may claim in the mesh (signed into its certificate): its pod
//! and service ranges, as the user gives them or as the cluster says. Pure functions over the
//! objects read from the API server.
//!
//! Where they come from, in order: the user's `--pod-cidr`/`--service-cidr`; for services the
//! cluster's ServiceCIDR objects (`networking.k8s.io/v1`, Kubernetes 1.33+); the flags of the
//! kube-controller-manager static pod (`--cluster-cidr`, `--service-cluster-ip-range`, as
//! kubeadm and kind run it; submariner's network discovery reads the same). Nodes' pod CIDRs
//! only check the result: a cluster's range cannot be told from the slices of it nodes have
//! now, so without a source the user is asked, with the smallest range covering them offered.

use std::fmt;

use anyhow::bail;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::networking::v1::ServiceCIDR;

/// Ranges and where they were found, for the user to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub nets: Vec<IpNet>,
    pub source: String,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", list(&self.nets), self.source)
    }
}

/// `a, b` for messages.
pub fn list(nets: &[IpNet]) -> String {
    nets.iter()
        .map(IpNet::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The label of the kube-controller-manager static pods of kubeadm (and kind).
pub const CONTROLLER_MANAGER_SELECTOR: &str = "component=kube-controller-manager";

/// The value of `--flag=a,b` (or `--flag a,b`) in the first of `pods`' containers that has it.
pub fn flag_value(pods: &[Pod], flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    pods.iter()
        .filter_map(|pod| pod.spec.as_ref())
        .flat_map(|spec| &spec.containers)
        .find_map(|container| {
            let words: Vec<&String> = container
                .command
                .iter()
                .flatten()
                .chain(container.args.iter().flatten())
                .collect();
            words.iter().enumerate().find_map(|(at, word)| {
                if let Some(value) = word.strip_prefix(&prefix) {
                    Some(value.to_string())
                } else if word.as_str() == flag {
                    words.get(at + 1).map(|v| v.to_string())
                } else {
                    None
                }
            })
        })
}

/// Ranges from a kube-controller-manager flag, when it is there and every part is a CIDR.
pub fn from_controller_manager(pods: &[Pod], flag: &str) -> Option<Found> {
    let value = flag_value(pods, flag)?;
    let nets: Option<Vec<IpNet>> = value.split(',').map(|c| c.trim().parse().ok()).collect();
    let nets = nets.filter(|n| !n.is_empty())?;
    Some(Found {
        nets,
        source: format!("kube-controller-manager {flag}"),
    })
}

/// The ranges of the cluster's ServiceCIDR objects, when it has any.
pub fn from_service_cidrs(objects: &[ServiceCIDR]) -> Option<Found> {
    let mut names = Vec::new();
    let mut nets = Vec::new();
    for object in objects {
        let cidrs = object.spec.as_ref().and_then(|s| s.cidrs.as_ref());
        let parsed: Vec<IpNet> = cidrs
            .into_iter()
            .flatten()
            .filter_map(|c| c.parse().ok())
            .collect();
        if !parsed.is_empty() {
            names.push(object.metadata.name.clone().unwrap_or_default());
            nets.extend(parsed);
        }
    }
    if nets.is_empty() {
        return None;
    }
    nets.sort();
    nets.dedup();
    Some(Found {
        nets,
        source: format!("ServiceCIDR {}", names.join(", ")),
    })
}

/// Every node's pod CIDRs: `(node, cidr)`.
pub fn node_pod_cidrs(nodes: &[Node]) -> Vec<(String, IpNet)> {
    nodes
        .iter()
        .flat_map(|node| {
            let name = node.metadata.name.clone().unwrap_or_default();
            trellis_controller::objects::pod_cidrs_of(node)
                .into_iter()
                .filter_map(move |c| Some((name.clone(), c.parse().ok()?)))
        })
        .collect()
}

/// The smallest prefix per address family that holds all of `nets`.
pub fn covering(nets: &[IpNet]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let family: Vec<IpNet> = nets
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
            .copied()
            .collect();
        let Some(first) = family.first() else {
            continue;
        };
        let mut cover = first.trunc();
        while !family.iter().all(|n| cover.contains(n)) {
            match cover.supernet() {
                Some(wider) => cover = wider,
                None => break,
            }
        }
        out.push(cover);
    }
    out
}

/// Refuses pod ranges that leave a node's pods out: peers would drop what those pods send.
pub fn check_nodes_inside(pod_ranges: &[IpNet], nodes: &[(String, IpNet)]) -> anyhow::Result<()> {
    let outside: Vec<String> = nodes
        .iter()
        .filter(|(_, cidr)| !pod_ranges.iter().any(|r| r.contains(cidr)))
        .map(|(node, cidr)| format!("{node} {cidr}"))
        .collect();
    if !outside.is_empty() {
        bail!(
            "the pod ranges {} leave out nodes' pod CIDRs ({}): peers would drop their pods' \
             traffic; pass --pod-cidr covering every node",
            list(pod_ranges),
            outside.join(", ")
        );
    }
    Ok(())
}

/// Refuses pod and service ranges that overlap: a claim of one would pass for the other.
pub fn check_disjoint(pods: &[IpNet], services: &[IpNet]) -> anyhow::Result<()> {
    for p in pods {
        for s in services {
            if p.contains(s) || s.contains(p) {
                bail!("the pod range {p} and the service range {s} overlap");
            }
        }
    }
    Ok(())
}

/// Refuses peer ranges (for external machines) that are not canonical prefixes or that overlap
/// the pod or service ranges: inside the pod range is exactly where node IPAM may hand an
/// external machine's address to a new node.
pub fn check_peer_ranges(
    peers: &[IpNet],
    pods: &[IpNet],
    services: &[IpNet],
) -> anyhow::Result<()> {
    for net in peers {
        if net.trunc() != *net {
            bail!(
                "the peer range {net} has host bits set (did you mean {}?)",
                net.trunc()
            );
        }
    }
    if let Some((x, y)) = overlap(peers, pods) {
        bail!(
            "the peer range {x} overlaps the pod range {y}: node IPAM may give its addresses \
             to a new node; pick a range outside the cluster's pod and service ranges"
        );
    }
    if let Some((x, y)) = overlap(peers, services) {
        bail!("the peer range {x} overlaps the service range {y}");
    }
    if let Some((x, y)) = peers
        .iter()
        .enumerate()
        .find_map(|(i, x)| overlap(&[*x], &peers[i + 1..]))
    {
        bail!("the peer ranges {x} and {y} overlap");
    }
    Ok(())
}

/// Whether two sets of ranges share an address (the first pair that does).
pub fn overlap(a: &[IpNet], b: &[IpNet]) -> Option<(IpNet, IpNet)> {
    a.iter().find_map(|x| {
        b.iter()
            .find(|y| x.contains(*y) || y.contains(x))
            .map(|y| (*x, *y))
    })
}

/// Ranges as one canonical set (aggregated, sorted), to compare what two sources say.
pub fn canonical(nets: &[IpNet]) -> Vec<IpNet> {
    IpNet::aggregate(&nets.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::List;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn kind_pods() -> Vec<Pod> {
        let list: List<Pod> = serde_json::from_str(include_str!(
            "../../testdata/kube-controller-manager-pods.json"
        ))
        .unwrap();
        list.items
    }

    #[test]
    fn kind_s_controller_manager_gives_both_ranges() {
        let pods = kind_pods();
        assert_eq!(
            from_controller_manager(&pods, "--cluster-cidr").unwrap(),
            Found {
                nets: nets(&["10.11.0.0/16"]),
                source: "kube-controller-manager --cluster-cidr".into()
            }
        );
        assert_eq!(
            from_controller_manager(&pods, "--service-cluster-ip-range")
                .unwrap()
                .nets,
            nets(&["10.111.0.0/16"])
        );
        assert_eq!(from_controller_manager(&pods, "--no-such-flag"), None);
    }

    #[test]
    fn flags_are_read_in_both_spellings_and_dual_stack() {
        let with_args = |args: &[&str]| {
            let mut pods = kind_pods();
            let container = &mut pods[0].spec.as_mut().unwrap().containers[0];
            container.command = Some(vec!["kube-controller-manager".into()]);
            container.args = Some(args.iter().map(|a| a.to_string()).collect());
            pods
        };
        let pods = with_args(&["--cluster-cidr", "10.11.0.0/16,fd00:11::/56"]);
        assert_eq!(
            from_controller_manager(&pods, "--cluster-cidr")
                .unwrap()
                .nets,
            nets(&["10.11.0.0/16", "fd00:11::/56"])
        );
        let pods = with_args(&["--cluster-cidr=10.11.0.0/16,garbage"]);
        assert_eq!(from_controller_manager(&pods, "--cluster-cidr"), None);
    }

    #[test]
    fn service_cidr_objects_are_read() {
        let list: List<ServiceCIDR> =
            serde_json::from_str(include_str!("../../testdata/servicecidrs-kind.json")).unwrap();
        assert_eq!(
            from_service_cidrs(&list.items).unwrap(),
            Found {
                nets: nets(&["10.111.0.0/16"]),
                source: "ServiceCIDR kubernetes".into()
            }
        );
        assert_eq!(from_service_cidrs(&[]), None);
    }

    #[test]
    fn the_covering_range_is_offered_per_family() {
        assert_eq!(
            covering(&nets(&["10.11.0.0/24", "10.11.1.0/24", "fd00::/64"])),
            nets(&["10.11.0.0/23", "fd00::/64"])
        );
        assert_eq!(
            covering(&nets(&["10.11.0.0/24", "10.11.2.0/24"])),
            nets(&["10.11.0.0/22"])
        );
        assert_eq!(covering(&[]), Vec::<IpNet>::new());
    }

    #[test]
    fn ranges_must_hold_every_node_and_not_overlap_services() {
        let nodes = vec![
            (
                "c1-control-plane".to_string(),
                "10.11.0.0/24".parse().unwrap(),
            ),
            ("c1-worker".to_string(), "10.12.1.0/24".parse().unwrap()),
        ];
        let err = check_nodes_inside(&nets(&["10.11.0.0/16"]), &nodes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c1-worker 10.12.1.0/24") && !err.contains("control-plane"),
            "{err}"
        );
        check_nodes_inside(&nets(&["10.11.0.0/16", "10.12.0.0/16"]), &nodes).unwrap();
        assert!(check_disjoint(&nets(&["10.0.0.0/8"]), &nets(&["10.96.0.0/12"])).is_err());
        check_disjoint(&nets(&["10.11.0.0/16"]), &nets(&["10.111.0.0/16"])).unwrap();
        let (pods, services) = (nets(&["10.11.0.0/16"]), nets(&["10.111.0.0/16"]));
        check_peer_ranges(&nets(&["10.200.0.0/24"]), &pods, &services).unwrap();
        for (peers, refusal) in [
            (
                &["10.200.0.1/24"][..],
                "host bits set (did you mean 10.200.0.0/24?)",
            ),
            (&["10.0.0.0/8"], "overlaps the pod range 10.11.0.0/16"),
            (
                &["10.111.5.0/24"],
                "overlaps the service range 10.111.0.0/16",
            ),
            (
                &["10.200.0.0/24", "10.200.0.128/25"],
                "10.200.0.0/24 and 10.200.0.128/25 overlap",
            ),
        ] {
            let err = check_peer_ranges(&nets(peers), &pods, &services)
                .unwrap_err()
                .to_string();
            assert!(err.contains(refusal), "{err}");
        }
        assert_eq!(
            overlap(
                &nets(&["10.1.0.0/16"]),
                &nets(&["10.2.0.0/16", "10.1.2.0/24"])
            ),
            Some((
                "10.1.0.0/16".parse().unwrap(),
                "10.1.2.0/24".parse().unwrap()
            ))
        );
    }
}
