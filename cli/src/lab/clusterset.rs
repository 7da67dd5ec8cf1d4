//! The lab's kube-proxy for clusterset services: what kube-proxy does on a Kubernetes node
//! for the derived Service behind each ClusterSetIP ServiceImport.
//!
//! Each cluster's controller gives every ClusterSetIP import a VIP from the cluster's
//! `clustersetIPRanges` (the lab's: [`clusterset_ip_range`]). One `trellis lab proxy` per
//! cluster follows the controller's imports stream as DNS does (read-only, with DNS's agent
//! certificate) and, on every change, replaces a table in every node namespace of the cluster
//! that DNATs each VIP and port to a random ready endpoint of *any* exporting cluster, on that
//! cluster's endpoint port of the same port name. The translation happens on the client's own
//! node: a remote endpoint is then reached pod to pod through the tunnels, with no first-node
//! funnel and no masquerade, so the server sees the client pod's address. Only the hairpin
//! (a pod sent to itself) is masqueraded, as kube-proxy does.
//!
//! [`clusterset_ruleset`] is pure; [`run`] is the IO loop.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use tokio::sync::watch;
use trellis_agent_client::{ClientConfig, ClientTls, Ended, Handler, TlsFiles, Transport};
use trellis_core::agent::{AgentIdentity, AgentRole};
use trellis_core::cluster::{Protocol, ServiceKind};
use trellis_core::imports::{Backend, ImportedService, Imports};
use trellis_netns::Netns;

use super::control;
use super::services;
use super::topology::LabState;

/// The nftables table of the clusterset services, in every node namespace (apart from the
/// static table of the cluster's own Services, `services`).
pub const CLUSTERSET_TABLE: &str = "trellis-lab-clusterset";

/// How often the proxy re-applies the last imports, repairing a node whose rules failed.
const RESYNC: Duration = Duration::from_secs(5);

/// Cluster `index`'s clusterset VIP range (cluster `c<n>`: `10.(100+n).240.0/20`): inside the
/// cluster's service CIDR (`10.(100+n).0.0/16`), so no other cluster routes it, and apart from
/// the cluster's own ClusterIPs (`10.(100+n).0.x`).
pub fn clusterset_ip_range(cluster_index: usize) -> String {
    format!("10.{}.240.0/20", 100 + cluster_index + 1)
}

/// What a node needs to know to render its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node's own address: where a hairpin is masqueraded to.
    pub address: Ipv4Addr,
    /// The node's pod CIDR: only its pods can be the client of a hairpin here.
    pub pod_cidr: IpNet,
}

/// One VIP port's translation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Translation {
    vip: Ipv4Addr,
    protocol: Protocol,
    port: u16,
    /// Every ready endpoint of every cluster, on its cluster's endpoint port; sorted.
    targets: Vec<(Ipv4Addr, u16)>,
}

/// The port `backend`'s endpoints serve the import's port `name`/`protocol` on: its
/// EndpointSlices' port of the same name (a single unnamed port matches an unnamed one).
fn endpoint_port(backend: &Backend, name: Option<&str>, protocol: Protocol) -> Option<u16> {
    backend
        .endpoint_ports
        .iter()
        .find(|p| p.name.as_deref() == name && p.protocol == protocol)
        .map(|p| p.port)
}

/// The translations of one import: every IPv4 VIP and port, to every ready IPv4 endpoint of
/// every cluster that serves that port (the lab is IPv4 only).
fn translations(service: &ImportedService) -> Vec<Translation> {
    if service.kind != ServiceKind::ClusterSetIP {
        return Vec::new();
    }
    let vips = service.vips.iter().filter_map(|vip| match vip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let mut out = Vec::new();
    for vip in vips {
        for port in &service.ports {
            let mut targets: Vec<(Ipv4Addr, u16)> = service
                .backends
                .iter()
                .filter_map(|backend| {
                    let target = endpoint_port(backend, port.name.as_deref(), port.protocol)?;
                    Some(
                        backend
                            .endpoints
                            .iter()
                            .filter(|e| e.ready)
                            // kube-proxy takes an endpoint's first address: all of them are the
                            // same pod.
                            .filter_map(|e| {
                                e.addresses.iter().find_map(|a| match a {
                                    IpAddr::V4(v4) => Some(*v4),
                                    IpAddr::V6(_) => None,
                                })
                            })
                            .map(move |address| (address, target)),
                    )
                })
                .flatten()
                .collect();
            targets.sort();
            targets.dedup();
            out.push(Translation {
                vip,
                protocol: port.protocol,
                port: port.port,
                targets,
            });
        }
    }
    out
}

/// The table on `node`, replacing the last one atomically (one `nft -f` transaction): each
/// VIP port DNATed to a random ready endpoint of any cluster, refused (TCP reset, ICMP port
/// unreachable otherwise) when there is none, and the hairpin masqueraded.
pub fn clusterset_ruleset(imports: &Imports, node: &NodeView) -> String {
    let mut rules = String::new();
    let mut hairpins: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for translation in imports.services.values().flat_map(translations) {
        let Translation {
            vip,
            protocol,
            port,
            targets,
        } = translation;
        let proto = protocol.lowercase();
        if targets.is_empty() {
            // kube-proxy refuses a connection to a Service without endpoints rather than let
            // it time out.
            let reject = if protocol == Protocol::Tcp {
                "reject with tcp reset"
            } else {
                "reject"
            };
            let _ = writeln!(rules, "    ip daddr {vip} {proto} dport {port} {reject}");
            continue;
        }
        let choices: Vec<String> = targets
            .iter()
            .enumerate()
            .map(|(i, (address, port))| format!("{i} : {address} . {port}"))
            .collect();
        let _ = writeln!(
            rules,
            "    ip daddr {vip} {proto} dport {port} dnat ip to numgen random mod {} map {{ {} }}",
            targets.len(),
            choices.join(", ")
        );
        hairpins.extend(
            targets
                .iter()
                .map(|(address, _)| *address)
                .filter(|address| node.pod_cidr.contains(&IpAddr::V4(*address))),
        );
    }
    // A pod sent to itself would answer itself directly, past the translation: masquerade
    // that hairpin, and nothing else — every other client keeps its own address, also on a
    // remote endpoint (the reply comes back through this node's tunnel, to this conntrack).
    let hairpin_rule = if hairpins.is_empty() {
        String::new()
    } else {
        let pairs: Vec<String> = hairpins.iter().map(|a| format!("{a} . {a}")).collect();
        format!(
            " ct status dnat ip saddr . ip daddr {{ {} }} snat to {};",
            pairs.join(", "),
            node.address
        )
    };
    super::services::nat_table(CLUSTERSET_TABLE, &rules, hairpin_rule.trim_start())
}

/// A node the proxy writes to.
struct NodeTarget {
    name: String,
    netns: String,
    view: NodeView,
    /// The ruleset in force, when the last write succeeded.
    applied: Option<String>,
}

/// Rewrites every node's table on each change of the imports.
struct Rewriter {
    nodes: Vec<NodeTarget>,
    ready_file: PathBuf,
    ready: bool,
}

impl Rewriter {
    async fn write_all(&mut self, imports: &Imports) {
        let mut all_ok = true;
        for node in &mut self.nodes {
            let ruleset = clusterset_ruleset(imports, &node.view);
            if node.applied.as_ref() == Some(&ruleset) {
                continue;
            }
            let netns = node.netns.clone();
            let text = ruleset.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                services::apply_ruleset(&Netns::open(&netns)?, &text)
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|applied| applied);
            match outcome {
                Ok(()) => {
                    tracing::info!(
                        node = %node.name,
                        revision = imports.revision,
                        "clusterset services applied"
                    );
                    node.applied = Some(ruleset);
                }
                Err(error) => {
                    all_ok = false;
                    node.applied = None;
                    tracing::warn!(node = %node.name, error = format!("{error:#}"), "clusterset services not applied; retrying on the next resync");
                }
            }
        }
        if all_ok && !self.ready {
            match std::fs::write(&self.ready_file, b"") {
                Ok(()) => self.ready = true,
                Err(error) => tracing::warn!(
                    file = %self.ready_file.display(),
                    %error,
                    "cannot write the ready file"
                ),
            }
        }
    }
}

impl Handler for Rewriter {
    type State = Imports;

    async fn applied(&mut self, imports: &Imports) -> bool {
        self.write_all(imports).await;
        false
    }

    async fn resync(&mut self, imports: &Imports) {
        self.write_all(imports).await;
    }

    fn connected(&mut self, up: bool, ended: Option<&Ended>) {
        if up {
            tracing::info!("following the controller's imports");
        } else if let Some(ended) = ended {
            tracing::warn!(error = %trellis_core::error_chain(ended), "imports stream ended; the last rules stay");
        }
    }
}

/// Where `trellis lab proxy` writes that its first rules are in force.
pub fn ready_file(dir: &std::path::Path, cluster: &super::topology::Cluster) -> PathBuf {
    control::cluster_dir(dir, cluster).join("proxy.ready")
}

/// `trellis lab proxy --cluster C`: follows cluster C's controller forever, keeping every
/// node's clusterset table equal to its imports.
pub fn run(dir: &std::path::Path, state: &LabState, cluster_name: &str) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let cluster = state
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .with_context(|| format!("no cluster {cluster_name:?} in lab {:?}", state.lab))?;
    let files = control::agent_files(
        dir,
        &AgentIdentity::Dns {
            cluster: cluster.name.clone(),
        },
    );
    let tls = ClientTls::load(TlsFiles {
        ca: files.ca,
        cert: files.cert,
        key: files.key,
    })
    .map_err(|e| anyhow::anyhow!("agent TLS: {}", trellis_core::error_chain(&e)))?;
    let source = ClientConfig {
        address: control::agent_endpoint(cluster).to_string(),
        transport: Transport::Tls(std::sync::Arc::new(tls)),
        max_frame: trellis_core::agent::MAX_AGENT_FRAME,
        resync: Some(RESYNC),
        report: None,
    };
    let mut rewriter = Rewriter {
        nodes: cluster
            .nodes
            .iter()
            .map(|node| NodeTarget {
                name: format!("{}/{}", cluster.name, node.name),
                netns: node.netns.clone(),
                view: NodeView {
                    address: node.address,
                    pod_cidr: node.pod_cidr,
                },
                applied: None,
            })
            .collect(),
        ready_file: ready_file(dir, cluster),
        ready: false,
    };
    super::build::block_on(async {
        // As DNS: read-only, a constant hello.
        let (_hello, rx) = watch::channel(AgentRole::Dns);
        let mut state = None;
        trellis_agent_client::follow(&source, rx, None, &mut rewriter, &mut state).await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use trellis_core::cluster::{Endpoint, ServicePort};

    fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        ServicePort::new(Some(name.into()), protocol, port)
    }

    fn endpoint(address: &str, ready: bool) -> Endpoint {
        Endpoint {
            addresses: vec![address.parse().unwrap()],
            hostname: None,
            node: None,
            ready,
        }
    }

    fn backend(cluster: &str, local: bool, endpoints: Vec<Endpoint>) -> Backend {
        Backend {
            cluster: cluster.parse().unwrap(),
            local,
            cluster_ips: vec![],
            endpoints,
            endpoint_ports: vec![
                port("tcp-echo", Protocol::Tcp, 7000),
                port("http", Protocol::Tcp, 8080),
            ],
            exported_at: None,
        }
    }

    fn echo(backends: Vec<Backend>) -> ImportedService {
        ImportedService {
            namespace: "demo".into(),
            name: "echo".into(),
            kind: ServiceKind::ClusterSetIP,
            ports: vec![
                port("http", Protocol::Tcp, 80),
                port("tcp-echo", Protocol::Tcp, 7000),
            ],
            properties: Default::default(),
            oldest: "c1".parse().unwrap(),
            conflicts: vec![],
            vips: vec!["10.101.240.1".parse().unwrap()],
            backends,
        }
    }

    fn imports(services: Vec<ImportedService>) -> Imports {
        Imports {
            revision: 3,
            services: services
                .into_iter()
                .map(|s| (s.key().to_string(), s))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn node() -> NodeView {
        NodeView {
            address: "198.18.1.10".parse().unwrap(),
            pod_cidr: "10.1.0.0/24".parse().unwrap(),
        }
    }

    #[test]
    fn a_vip_balances_over_the_ready_endpoints_of_every_cluster_on_their_own_ports() {
        let mut remote = backend(
            "c2",
            false,
            vec![
                endpoint("10.2.0.1", true),
                endpoint("10.2.1.1", false),
                endpoint("10.2.1.2", true),
            ],
        );
        // The remote cluster serves HTTP on another port: its own endpoint port is used.
        remote.endpoint_ports[1].port = 9090;
        let rules = clusterset_ruleset(
            &imports(vec![echo(vec![
                backend(
                    "c1",
                    true,
                    vec![endpoint("10.1.0.1", true), endpoint("10.1.1.1", true)],
                ),
                remote,
            ])]),
            &node(),
        );
        assert!(
            rules.contains(
                "ip daddr 10.101.240.1 tcp dport 80 dnat ip to numgen random mod 4 map { 0 : 10.1.0.1 . 8080, 1 : 10.1.1.1 . 8080, 2 : 10.2.0.1 . 9090, 3 : 10.2.1.2 . 9090 }"
            ),
            "{rules}"
        );
        assert!(
            rules.contains(
                "ip daddr 10.101.240.1 tcp dport 7000 dnat ip to numgen random mod 4 map { 0 : 10.1.0.1 . 7000, 1 : 10.1.1.1 . 7000, 2 : 10.2.0.1 . 7000, 3 : 10.2.1.2 . 7000 }"
            ),
            "{rules}"
        );
        // Only this node's own pod can hairpin; nobody else is masqueraded.
        assert!(
            rules.contains(
                "ct status dnat ip saddr . ip daddr { 10.1.0.1 . 10.1.0.1 } snat to 198.18.1.10;"
            ),
            "{rules}"
        );
        assert_eq!(rules.matches("snat").count(), 1, "{rules}");
        assert!(!rules.contains("masquerade"), "{rules}");
        assert!(
            rules.starts_with(
                "table ip trellis-lab-clusterset\ndelete table ip trellis-lab-clusterset\n"
            ),
            "reloading replaces the table: {rules}"
        );
    }

    #[test]
    fn a_vip_without_ready_endpoints_refuses_connections() {
        let mut service = echo(vec![backend(
            "c2",
            false,
            vec![endpoint("10.2.0.1", false)],
        )]);
        service.ports.push(port("dns", Protocol::Udp, 53));
        let rules = clusterset_ruleset(&imports(vec![service]), &node());
        assert!(
            rules.contains("ip daddr 10.101.240.1 tcp dport 80 reject with tcp reset"),
            "{rules}"
        );
        assert!(
            rules.contains("ip daddr 10.101.240.1 udp dport 53 reject\n"),
            "{rules}"
        );
        assert!(!rules.contains("dnat"), "{rules}");
        assert!(!rules.contains("snat"), "{rules}");
    }

    #[test]
    fn a_cluster_without_the_named_port_serves_none_of_it() {
        let mut old = backend("c2", false, vec![endpoint("10.2.0.1", true)]);
        old.endpoint_ports
            .retain(|p| p.name.as_deref() != Some("http"));
        let rules = clusterset_ruleset(
            &imports(vec![echo(vec![
                backend("c1", true, vec![endpoint("10.1.1.1", true)]),
                old,
            ])]),
            &node(),
        );
        assert!(
            rules.contains(
                "tcp dport 80 dnat ip to numgen random mod 1 map { 0 : 10.1.1.1 . 8080 }"
            ),
            "{rules}"
        );
        assert!(
            rules.contains("tcp dport 7000 dnat ip to numgen random mod 2 map"),
            "{rules}"
        );
    }

    #[test]
    fn headless_imports_and_imports_without_a_vip_get_no_rule() {
        let mut headless = echo(vec![backend("c1", true, vec![endpoint("10.1.0.1", true)])]);
        headless.kind = ServiceKind::Headless;
        headless.vips.clear();
        let mut unallocated = echo(vec![backend("c1", true, vec![endpoint("10.1.0.1", true)])]);
        unallocated.name = "later".into();
        unallocated.vips.clear();
        let mut v6 = unallocated.clone();
        v6.name = "six".into();
        v6.vips = vec!["fd00::1".parse().unwrap()];
        let rules = clusterset_ruleset(&imports(vec![headless, unallocated, v6]), &node());
        assert!(rules.contains("  chain services {\n  }\n"), "{rules}");
        assert_eq!(
            clusterset_ruleset(&Imports::default(), &node()),
            rules,
            "nothing to translate"
        );
    }

    #[test]
    fn the_lab_ranges_sit_inside_each_service_cidr_apart_from_its_clusterips() {
        for index in 0..20 {
            let range: IpNet = clusterset_ip_range(index).parse().unwrap();
            let cidr: IpNet = services::service_cidr(index).parse().unwrap();
            assert!(cidr.contains(&range), "{range} in {cidr}");
            assert!(!range.contains(&IpAddr::V4(services::echo_cluster_ip(index))));
        }
        assert_eq!(clusterset_ip_range(0), "10.101.240.0/20");
    }

    /// nft itself takes the rendering (in a namespace of the test's own).
    #[test]
    fn nft_accepts_the_table() {
        trellis_test_support::skip_unless_root!();
        let netns = trellis_netns::testing::TempNetns::new("lab-cs").unwrap();
        let mut none = echo(vec![]);
        none.name = "none".into();
        none.vips = vec!["10.101.240.2".parse().unwrap()];
        none.ports.push(port("dns", Protocol::Udp, 53));
        let all = imports(vec![
            echo(vec![
                backend("c1", true, vec![endpoint("10.1.0.1", true)]),
                backend("c2", false, vec![endpoint("10.2.0.1", true)]),
            ]),
            none,
        ]);
        // Twice: the second replaces the first.
        for _ in 0..2 {
            services::apply_ruleset(&netns, &clusterset_ruleset(&all, &node())).unwrap();
        }
        services::apply_ruleset(&netns, &clusterset_ruleset(&Imports::default(), &node())).unwrap();
    }
}
