//! The lab's demo Services and what kube-proxy would make of them.
//!
//! Every cluster runs `trellis echo-server` in each pod and exports two Services backed by all
//! of them: `echo.demo` with a ClusterIP (TCP echo on 7000, HTTP on 80 → 8080) and the headless
//! `echo-pods.demo`. A kind cluster has kube-proxy to turn a ClusterIP into a pod; the lab has
//! none, so it writes the same translation as an nftables table in every node namespace:
//! DNAT a ClusterIP to a random endpoint, and source-NAT clients from outside the cluster's pod
//! CIDR to the node — kube-proxy's `--cluster-cidr` masquerade — so the reply comes back through
//! the node that translated it, not straight from the endpoint's node to the other cluster.
//! A pod reaches the other clusters' pods of a Service through its own cluster's clusterset
//! VIP instead (`clusterset`: a table of its own, balanced on the client's node).

use std::fmt::Write;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use trellis_netns::Netns;

use super::topology::{Cluster, Node};

pub const DEMO_NAMESPACE: &str = "demo";
/// The exported Service with a ClusterIP.
pub const ECHO_SERVICE: &str = "echo";
/// The exported headless Service: DNS answers its pods' addresses.
pub const HEADLESS_SERVICE: &str = "echo-pods";
/// The echo server's TCP echo port (Service port and pod port alike).
pub const ECHO_PORT: u16 = 7000;
/// The echo server's HTTP port in the pod, and the Service port in front of it.
pub const HTTP_TARGET_PORT: u16 = 8080;
pub const HTTP_PORT: u16 = 80;

/// The nftables table of the lab's kube-proxy stand-in, in every node namespace.
const PROXY_TABLE: &str = "trellis-lab-services";

#[derive(Debug, Clone, PartialEq)]
pub struct LabService {
    pub name: String,
    /// `None`: headless.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// Its ServiceExport's `creationTimestamp` (seconds since the epoch): the oldest export
    /// wins a conflict.
    pub exported_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServicePort {
    pub name: &'static str,
    pub port: u16,
    pub target_port: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub hostname: String,
    pub node: String,
}

/// The cluster's service CIDR: 10.(100+c).0.0/16, apart from every pod CIDR.
pub fn service_cidr(cluster_index: usize) -> String {
    format!("10.{}.0.0/16", 100 + cluster_index + 1)
}

/// `echo.demo`'s ClusterIP in cluster `cluster_index`.
pub fn echo_cluster_ip(cluster_index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100 + cluster_index as u8 + 1, 0, 10)
}

/// The Services every cluster exports, backed by every pod that has an address.
pub fn demo_services(cluster: &Cluster, cluster_index: usize) -> Vec<LabService> {
    let endpoints: Vec<Endpoint> = cluster
        .nodes
        .iter()
        .flat_map(|node| {
            node.pods.iter().filter_map(move |pod| {
                Some(Endpoint {
                    address: pod.address?,
                    hostname: pod.name.clone(),
                    node: node.name.clone(),
                })
            })
        })
        .collect();
    let ports = vec![
        ServicePort {
            name: "tcp-echo",
            port: ECHO_PORT,
            target_port: ECHO_PORT,
        },
        ServicePort {
            name: "http",
            port: HTTP_PORT,
            target_port: HTTP_TARGET_PORT,
        },
    ];
    vec![
        LabService {
            name: ECHO_SERVICE.into(),
            cluster_ip: Some(echo_cluster_ip(cluster_index)),
            ports: ports.clone(),
            endpoints: endpoints.clone(),
            exported_at: cluster.exported_at,
        },
        LabService {
            name: HEADLESS_SERVICE.into(),
            cluster_ip: None,
            ports,
            endpoints,
            exported_at: cluster.exported_at,
        },
    ]
}

/// Each Service as the API server would hold it: the Service, its EndpointSlice (ports as the
/// pods serve them) and its ServiceExport.
pub fn services_yaml(services: &[LabService]) -> String {
    let mut yaml = String::new();
    for service in services {
        let name = &service.name;
        let cluster_ip = service
            .cluster_ip
            .map_or("None".to_string(), |ip| ip.to_string());
        let service_ports: Vec<String> = service
            .ports
            .iter()
            .map(|p| {
                format!(
                    "{{name: {}, port: {}, targetPort: {}, protocol: TCP}}",
                    p.name, p.port, p.target_port
                )
            })
            .collect();
        let endpoint_ports: Vec<String> = service
            .ports
            .iter()
            .map(|p| {
                format!(
                    "{{name: {}, port: {}, protocol: TCP}}",
                    p.name, p.target_port
                )
            })
            .collect();
        let endpoints: Vec<String> = service
            .endpoints
            .iter()
            .map(|e| {
                format!(
                    "{{addresses: [\"{}\"], hostname: {}, nodeName: {}, conditions: {{ready: true}}}}",
                    e.address, e.hostname, e.node
                )
            })
            .collect();
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {DEMO_NAMESPACE}}}\nspec: {{clusterIP: \"{cluster_ip}\", ports: [{}]}}\n",
            service_ports.join(", ")
        );
        let _ = write!(
            yaml,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {DEMO_NAMESPACE}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{}]\n",
            endpoints.join(", "),
            endpoint_ports.join(", ")
        );
        let created = service
            .exported_at
            .and_then(|at| k8s_openapi::jiff::Timestamp::from_second(at).ok())
            .map_or(String::new(), |at| format!(", creationTimestamp: \"{at}\""));
        let _ = write!(
            yaml,
            "---\napiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: {DEMO_NAMESPACE}{created}}}\n"
        );
    }
    yaml
}

/// The nftables table kube-proxy's rules amount to on `node` of `cluster`.
pub fn proxy_ruleset(cluster: &Cluster, node: &Node, services: &[LabService]) -> String {
    let mut rules = String::new();
    for service in services {
        let Some(cluster_ip) = service.cluster_ip else {
            continue;
        };
        if service.endpoints.is_empty() {
            // kube-proxy rejects connections to a Service without endpoints.
            for port in &service.ports {
                let _ = writeln!(
                    rules,
                    "    ip daddr {cluster_ip} tcp dport {} reject with tcp reset",
                    port.port
                );
            }
            continue;
        }
        let choices: Vec<String> = service
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{i} : {}", e.address))
            .collect();
        for port in &service.ports {
            let _ = writeln!(
                rules,
                "    ip daddr {cluster_ip} tcp dport {} dnat to numgen random mod {} map {{ {} }} : {}",
                port.port,
                choices.len(),
                choices.join(", "),
                port.target_port
            );
        }
    }
    // A pod sent to itself through its Service would answer itself directly, past the node's
    // translation: kube-proxy masquerades this hairpin, and so does the lab.
    let mut hairpins: Vec<String> = services
        .iter()
        .filter(|s| s.cluster_ip.is_some())
        .flat_map(|s| &s.endpoints)
        .map(|e| format!("{} . {}", e.address, e.address))
        .collect();
    hairpins.sort();
    hairpins.dedup();
    let hairpin_rule = if hairpins.is_empty() {
        String::new()
    } else {
        format!(
            "ct status dnat ip saddr . ip daddr {{ {} }} snat to {}; ",
            hairpins.join(", "),
            node.address
        )
    };
    nat_table(
        PROXY_TABLE,
        &rules,
        &format!(
            "{hairpin_rule}ct status dnat ip saddr != {pod_cidr} snat to {node_address};",
            pod_cidr = cluster.pod_cidr,
            node_address = node.address,
        ),
    )
}

/// A kube-proxy-like nat table named `table`, replaced whole when loaded: `services` rules
/// for packets from pods (prerouting) and from the node itself (output), and `postrouting`'s
/// source NAT.
pub(super) fn nat_table(table: &str, services: &str, postrouting: &str) -> String {
    format!(
        "table ip {table}\ndelete table ip {table}\n\
         table ip {table} {{\n  chain services {{\n{services}  }}\n\
         \x20 chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump services; }}\n\
         \x20 chain output {{ type nat hook output priority -100; policy accept; jump services; }}\n\
         \x20 chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; {postrouting} }}\n}}\n"
    )
}

/// Loads `ruleset` with `nft -f -` inside `netns` (atomically: one transaction).
pub fn apply_ruleset(netns: &Netns, ruleset: &str) -> anyhow::Result<()> {
    let mut command = Command::new("nft");
    command
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = netns
        .spawn(&mut command)?
        .context("run nft (install the nftables package)")?;
    child
        .stdin
        .take()
        .context("nft has no stdin")?
        .write_all(ruleset.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "nft refused the lab's service rules: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::topology::Topology;

    fn lab_with_addresses() -> Topology {
        let mut topology = Topology::new("t", 2, 2, 1).unwrap();
        for cluster in &mut topology.clusters {
            for node in &mut cluster.nodes {
                let base = match node.pod_cidr.addr() {
                    std::net::IpAddr::V4(a) => a.octets(),
                    std::net::IpAddr::V6(_) => unreachable!(),
                };
                for pod in &mut node.pods {
                    pod.address = Some(Ipv4Addr::new(base[0], base[1], base[2], 1));
                }
            }
        }
        topology
    }

    #[test]
    fn each_cluster_exports_a_clusterip_and_a_headless_service_over_every_pod() {
        let mut lab = lab_with_addresses();
        let services = demo_services(&lab.clusters[1], 1);
        assert_eq!(services[0].cluster_ip, Some("10.102.0.10".parse().unwrap()));
        assert_eq!(services[1].cluster_ip, None);
        let addresses: Vec<String> = services[1]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addresses, ["10.2.0.1", "10.2.1.1"]);

        let yaml = services_yaml(&services);
        assert!(yaml.contains("clusterIP: \"10.102.0.10\""));
        assert!(yaml.contains("clusterIP: \"None\""));
        assert!(yaml.contains("{name: http, port: 80, targetPort: 8080, protocol: TCP}"));
        assert!(yaml.contains("{name: http, port: 8080, protocol: TCP}"));
        assert_eq!(yaml.matches("kind: ServiceExport").count(), 2);
        assert_eq!(
            yaml.matches("apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\n")
                .count(),
            2
        );
        assert!(
            !yaml.contains("creationTimestamp"),
            "not known, not written"
        );

        lab.clusters[1].exported_at = Some(1_796_641_736);
        let yaml = services_yaml(&demo_services(&lab.clusters[1], 1));
        assert_eq!(
            yaml.matches(
                "kind: ServiceExport\nmetadata: {name: echo, namespace: demo, creationTimestamp: \"2026-12-07T11:08:56Z\"}"
            )
            .count(),
            1,
            "{yaml}"
        );
        // The controller reads what the lab writes.
        let parsed = trellis_controller::objects::parse_objects(&yaml).unwrap();
        assert_eq!(parsed.service_exports.len(), 2);
    }

    #[test]
    fn the_proxy_translates_clusterips_only_and_masquerades_other_clusters() {
        let lab = lab_with_addresses();
        let cluster = &lab.clusters[0];
        let rules = proxy_ruleset(cluster, &cluster.nodes[1], &demo_services(cluster, 0));
        assert!(rules.contains(
            "ip daddr 10.101.0.10 tcp dport 80 dnat to numgen random mod 2 map { 0 : 10.1.0.1, 1 : 10.1.1.1 } : 8080"
        ));
        assert!(rules.contains("tcp dport 7000 dnat to"));
        // The headless Service has no rule: its clients dial pods directly.
        assert_eq!(rules.matches("dnat to").count(), 2);
        assert!(rules.contains("ct status dnat ip saddr != 10.1.0.0/16 snat to 198.18.1.11"));
        // A pod reaching itself through the Service is masqueraded too.
        assert!(rules.contains(
            "ct status dnat ip saddr . ip daddr { 10.1.0.1 . 10.1.0.1, 10.1.1.1 . 10.1.1.1 } snat to 198.18.1.11"
        ));
        // Reloading replaces the table instead of adding to it.
        assert!(
            rules.starts_with(
                "table ip trellis-lab-services\ndelete table ip trellis-lab-services\n"
            )
        );
    }

    #[test]
    fn a_service_without_endpoints_refuses_connections() {
        let mut lab = lab_with_addresses();
        for pod in lab.clusters[0].nodes.iter_mut().flat_map(|n| &mut n.pods) {
            pod.address = None;
        }
        let cluster = &lab.clusters[0];
        let rules = proxy_ruleset(cluster, &cluster.nodes[0], &demo_services(cluster, 0));
        assert!(rules.contains("ip daddr 10.101.0.10 tcp dport 7000 reject with tcp reset"));
        assert!(!rules.contains("dnat to"));
    }
}
