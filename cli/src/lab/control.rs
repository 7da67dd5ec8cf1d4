//! The lab's control plane: a mesh CA and a certificate per cluster (as `trellis certs`
//! makes them), per cluster an agent CA with the controller's agent certificate, DNS's and one
//! per node (as `trellis certs agent` makes them), and per cluster a `trellis-controller` on its first node, running on a static
//! source — a YAML file of Kubernetes objects describing the cluster as kind's API server
//! would: its Nodes, and the demo Services with their EndpointSlices and ServiceExports.

use std::fmt::Write;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use trellis_controller::agent_certs::{AgentFiles, write_agent_files};
use trellis_controller::certs::{Validity, write_ca_files, write_cluster_files};
use trellis_core::agent::AgentIdentity;

use super::objects;
use super::services::{self, service_cidr};
use super::topology::{Cluster, LabState};

/// QUIC peering between controllers.
pub const PEERING_PORT: u16 = 7443;
/// Where gateways and DNS subscribe.
pub const AGENT_PORT: u16 = 7444;
pub const CONTROLLER_METRICS_PORT: u16 = 9464;
pub const DNS_PORT: u16 = 53;
pub const DNS_METRICS_PORT: u16 = 9153;

/// The controller's address: the cluster's first node.
pub fn controller_address(cluster: &Cluster) -> Ipv4Addr {
    cluster.nodes[0].address
}

pub fn agent_endpoint(cluster: &Cluster) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(controller_address(cluster)), AGENT_PORT)
}

pub fn certs_dir(dir: &Path) -> PathBuf {
    dir.join("certs")
}

/// Where `identity`'s agent certificate, key and its cluster's agent CA are.
pub fn agent_files(dir: &Path, identity: &AgentIdentity) -> AgentFiles {
    trellis_controller::agent_certs::agent_files(&certs_dir(dir), identity)
}

/// The agent identity of `node` of `cluster`.
pub fn node_identity(cluster: &Cluster, node: &str) -> AgentIdentity {
    AgentIdentity::Node {
        cluster: cluster.name.clone(),
        node: node.to_owned(),
    }
}

/// The command-line flags that give a gateway or DNS its agent identity.
pub fn agent_flags(dir: &Path, identity: &AgentIdentity) -> Vec<String> {
    let files = agent_files(dir, identity);
    vec![
        "--agent-ca".into(),
        files.ca.display().to_string(),
        "--agent-cert".into(),
        files.cert.display().to_string(),
        "--agent-key".into(),
        files.key.display().to_string(),
    ]
}

pub fn cluster_dir(dir: &Path, cluster: &Cluster) -> PathBuf {
    dir.join("clusters").join(&cluster.name)
}

/// The mesh CA, every cluster's certificate (carrying the ranges the cluster may claim), and
/// per cluster its agent CA with the controller's, DNS's and every node's agent certificate.
pub fn write_credentials(dir: &Path, state: &LabState) -> anyhow::Result<()> {
    let certs = certs_dir(dir);
    fs::create_dir_all(&certs)?;
    write_ca_files(
        &certs,
        &format!("trellis-lab-{}", state.lab),
        Validity::days_from_now(30),
        false,
    )?;
    for (index, cluster) in state.clusters.iter().enumerate() {
        let id = cluster.name.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        // What the cluster may claim, signed by the lab's CA: its pod and service CIDRs
        // (peers route nothing else of it).
        let ranges = [cluster.pod_cidr, service_cidr(index).parse()?];
        write_cluster_files(&certs, &id, &ranges, Validity::days_from_now(30), false)?;
        let mut identities = vec![
            AgentIdentity::Controller {
                cluster: cluster.name.clone(),
            },
            AgentIdentity::Dns {
                cluster: cluster.name.clone(),
            },
        ];
        identities.extend(
            cluster
                .nodes
                .iter()
                .map(|n| node_identity(cluster, &n.name)),
        );
        for identity in &identities {
            write_agent_files(&certs, identity, 30)
                .with_context(|| format!("issuing {}", identity.dns_name()))?;
        }
    }
    Ok(())
}

/// The cluster as Kubernetes objects: its own (ClusterProperty, ServiceCIDR, Nodes, the demo
/// Services), its namespaces and pods (the lab's pods in `default`) and what `trellis lab
/// apply` added.
pub fn cluster_yaml(cluster: &Cluster, index: usize) -> String {
    let mut yaml = lab_objects_yaml(cluster, index);
    yaml.push_str(&objects::documents_yaml(&applied_documents(cluster)));
    yaml
}

/// The lab's own pods' labels: `app: <name>`.
pub fn lab_pod_labels(pod: &str) -> objects::Labels {
    objects::Labels::from([("app".to_string(), pod.to_string())])
}

/// The ports of the echo server in each of the lab's own pods.
pub fn lab_pod_ports() -> Vec<objects::ContainerPort> {
    vec![
        objects::ContainerPort {
            name: Some("tcp-echo".into()),
            port: services::ECHO_PORT,
            protocol: trellis_core::cluster::Protocol::Tcp,
        },
        objects::ContainerPort {
            name: Some("http".into()),
            port: services::HTTP_TARGET_PORT,
            protocol: trellis_core::cluster::Protocol::Tcp,
        },
    ]
}

/// Namespaces, Pods (the lab's and applied ones), and the applied NetworkPolicies,
/// Services (with the EndpointSlices of those with a selector) and ServiceExports.
fn applied_documents(cluster: &Cluster) -> Vec<serde_json::Value> {
    let applied = &cluster.objects;
    let mut documents: Vec<serde_json::Value> = objects::BUILT_IN_NAMESPACES
        .iter()
        .map(|name| objects::namespace_document(name, &objects::Labels::new()))
        .collect();
    documents.extend(
        applied
            .namespaces
            .iter()
            .map(|(name, labels)| objects::namespace_document(name, labels)),
    );
    for node in &cluster.nodes {
        documents.extend(node.pods.iter().map(|pod| {
            objects::pod_document(
                objects::DEFAULT_NAMESPACE,
                &pod.name,
                &lab_pod_labels(&pod.name),
                &node.name,
                &lab_pod_ports(),
                pod.address,
            )
        }));
    }
    documents.extend(applied.pods.values().map(|pod| {
        objects::pod_document(
            &pod.spec.namespace,
            &pod.spec.name,
            &pod.spec.labels,
            &pod.node,
            &pod.spec.ports,
            pod.address,
        )
    }));
    let running: Vec<(objects::PodSpec, String, std::net::Ipv4Addr)> = applied
        .pods
        .values()
        .filter_map(|p| Some((p.spec.clone(), p.node.clone(), p.address?)))
        .collect();
    for (kind, passed) in &applied.passed {
        for document in passed.values() {
            documents.push(document.clone());
            if *kind == objects::PassedKind::Service
                && let Some(slice) = objects::endpoint_slice(document, &running)
            {
                documents.push(slice);
            }
        }
    }
    documents
}

fn lab_objects_yaml(cluster: &Cluster, index: usize) -> String {
    let mut yaml = String::new();
    let _ = write!(
        yaml,
        "apiVersion: about.k8s.io/v1alpha1\nkind: ClusterProperty\nmetadata: {{name: cluster.clusterset.k8s.io}}\nspec: {{value: {}}}\n",
        cluster.name
    );
    let _ = write!(
        yaml,
        "---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {{name: kubernetes}}\nspec: {{cidrs: [\"{}\"]}}\n",
        service_cidr(index)
    );
    for node in &cluster.nodes {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{podCIDR: \"{}\", podCIDRs: [\"{}\"]}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
            node.name, node.pod_cidr, node.pod_cidr, node.address
        );
    }
    yaml.push_str(&services::services_yaml(&services::demo_services(
        cluster, index,
    )));
    yaml
}

/// One controller process of a cluster: `c1/controller`, and with two replicas
/// `c1/controller/1` beside it on the same node, with its own configuration (its own metrics
/// port: a follower serves metrics) and log. Both name the same peering and agent addresses:
/// only the leader binds them, so gateways and DNS reconnect to the same address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerReplica {
    pub index: u16,
    pub name: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub metrics: SocketAddr,
}

/// The lease file the replicas of a cluster elect their leader with.
pub fn leader_lease_file(dir: &Path, cluster: &Cluster) -> PathBuf {
    cluster_dir(dir, cluster).join("controller-leader.json")
}

/// The lab's election timings: a follower leads at most 4 s after the leader died.
const LAB_ELECTION: &str =
    "leaseDurationSeconds: 4, renewDeadlineSeconds: 3, retryPeriodSeconds: 1";

pub fn controller_replicas(
    dir: &Path,
    state: &LabState,
    cluster: &Cluster,
) -> Vec<ControllerReplica> {
    let own = cluster_dir(dir, cluster);
    let count = u16::try_from(state.controller_replicas.clamp(1, 2)).unwrap_or(1);
    (0..count)
        .map(|index| {
            let (name, file) = match index {
                0 => (
                    format!("{}/controller", cluster.name),
                    "controller".to_string(),
                ),
                i => (
                    format!("{}/controller/{i}", cluster.name),
                    format!("controller-{i}"),
                ),
            };
            ControllerReplica {
                index,
                name,
                config: own.join(format!("{file}.yaml")),
                log: own.join(format!("{file}.log")),
                metrics: SocketAddr::new(
                    IpAddr::V4(controller_address(cluster)),
                    CONTROLLER_METRICS_PORT + index,
                ),
            }
        })
        .collect()
}

/// The configuration of one controller replica: the cluster's, with its own metrics address
/// and, with two replicas, the lease file they elect a leader with.
pub fn replica_yaml(
    dir: &Path,
    state: &LabState,
    cluster: &Cluster,
    node_encryption: bool,
    replica: &ControllerReplica,
) -> String {
    let yaml = controller_yaml(dir, state, cluster, node_encryption);
    if state.controller_replicas <= 1 {
        return yaml;
    }
    let own_metrics = format!("metricsListen: \"{}\"\n", replica.metrics);
    let first_metrics = format!(
        "metricsListen: \"{}:{CONTROLLER_METRICS_PORT}\"\n",
        controller_address(cluster)
    );
    format!(
        "{}leaderElection: {{file: {}, {LAB_ELECTION}}}\n",
        yaml.replace(&first_metrics, &own_metrics),
        leader_lease_file(dir, cluster).display()
    )
}

/// The controller's configuration for `cluster`, peered with every other cluster of the lab.
pub fn controller_yaml(
    dir: &Path,
    state: &LabState,
    cluster: &Cluster,
    node_encryption: bool,
) -> String {
    // Written only when on: `off` is the controller's default, and a controller of an
    // earlier release refuses keys it does not know.
    let network_policy = if state.network_policy {
        "networkPolicy: true\n"
    } else {
        ""
    };
    let certs = certs_dir(dir);
    let own = cluster_dir(dir, cluster);
    let address = controller_address(cluster);
    let agent = agent_files(
        dir,
        &AgentIdentity::Controller {
            cluster: cluster.name.clone(),
        },
    );
    let peers: Vec<String> = state
        .clusters
        .iter()
        .filter(|other| other.name != cluster.name)
        .map(|other| {
            format!(
                "{{id: {}, endpoint: \"{}:{PEERING_PORT}\"}}",
                other.name,
                controller_address(other)
            )
        })
        .collect();
    // The controller gives each ClusterSetIP import a VIP from the cluster's own range (the
    // lab has no API server to allocate the derived Services' ClusterIPs).
    let index = state
        .clusters
        .iter()
        .position(|c| c.name == cluster.name)
        .unwrap_or_default();
    let clusterset_ips = super::clusterset::clusterset_ip_range(index);
    format!(
        "clusterId: {id}\nlisten: \"{address}:{PEERING_PORT}\"\npeers: [{peers}]\nleaseSeconds: 10\nheartbeatSeconds: 2\n\
         nodeEncryption: {node_encryption}\n{network_policy}\
         clustersetIPRanges: [\"{clusterset_ips}\"]\n\
         tls: {{ca: {certs}/ca.pem, cert: {certs}/{id}.pem, key: {certs}/{id}-key.pem}}\n\
         source: {{static: {{path: {own}/cluster.yaml, pollMillis: 20}}}}\n\
         metricsListen: \"{address}:{CONTROLLER_METRICS_PORT}\"\nagentListen: \"{address}:{AGENT_PORT}\"\n\
         agentTls: {{ca: {agent_ca}, cert: {agent_cert}, key: {agent_key}}}\nstateFile: {own}/controller-state.json\n\
         flows: {{enabled: true}}\n",
        id = cluster.name,
        peers = peers.join(", "),
        certs = certs.display(),
        own = own.display(),
        agent_ca = agent.ca.display(),
        agent_cert = agent.cert.display(),
        agent_key = agent.key.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::topology::Topology;

    #[test]
    fn the_source_holds_every_pod_and_namespace_and_the_controller_reads_it() {
        let mut lab = Topology::new("t", 1, 2, 1).unwrap();
        lab.clusters[0].nodes[1].pods[0].address = Some("10.1.1.2".parse().unwrap());
        let manifests = objects::parse_manifests(
            "kind: Namespace\nmetadata: {name: x}\n---\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}}\nspec: {containers: [{name: c, ports: [{name: serve-80-udp, containerPort: 80, protocol: UDP}]}]}\n---\nkind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
        )
        .unwrap();
        struct Names;
        impl objects::PodNames for Names {
            fn netns(&self, pod: &objects::PodSpec) -> String {
                pod.key()
            }
            fn container_id(&self, pod: &objects::PodSpec) -> String {
                pod.key()
            }
        }
        let (mut applied, _) = objects::apply(
            &Default::default(),
            &manifests,
            &mut objects::Placement {
                load: vec![("node-0".into(), 1), ("node-1".into(), 1)],
            },
            &Names,
            &[],
        )
        .unwrap();
        applied.pods.get_mut("x/a").unwrap().address = Some("10.1.0.3".parse().unwrap());
        lab.clusters[0].objects = applied;

        let yaml = cluster_yaml(&lab.clusters[0], 0);
        // The lab's own pods: in `default`, labelled, with their address once they have one.
        assert!(
            yaml.contains(
                r#""metadata":{"labels":{"app":"pod-1"},"name":"pod-1","namespace":"default"}"#
            ),
            "{yaml}"
        );
        assert!(yaml.contains(r#""podIP":"10.1.1.2""#), "{yaml}");
        assert!(yaml.contains(r#""podIP":"10.1.0.3""#), "{yaml}");
        for namespace in ["default", "demo", "x"] {
            assert!(
                yaml.contains(&format!(r#""kubernetes.io/metadata.name":"{namespace}""#)),
                "{yaml}"
            );
        }
        assert!(yaml.contains(r#""kind":"NetworkPolicy""#), "{yaml}");
        // One file the controller parses, its nodes and services as before.
        let parsed = trellis_controller::objects::parse_objects(&yaml).unwrap();
        assert_eq!(parsed.nodes.len(), 2);
        assert_eq!(parsed.services.len(), 2);
        // The same objects, the same bytes.
        assert_eq!(cluster_yaml(&lab.clusters[0], 0), yaml);
        assert_eq!(trellis_core::sha256_hex(yaml.as_bytes()).len(), 64);
    }

    #[test]
    fn two_controller_replicas_share_addresses_but_not_metrics_and_elect_through_a_file() {
        let mut lab = Topology::new("t", 1, 1, 1).unwrap();
        let dir = Path::new("/run/trellis/lab/t");
        let single = controller_replicas(dir, &lab, &lab.clusters[0]);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].name, "c1/controller");
        // One replica: the configuration of a lab without replicas, byte for byte.
        assert_eq!(
            replica_yaml(dir, &lab, &lab.clusters[0], false, &single[0]),
            controller_yaml(dir, &lab, &lab.clusters[0], false)
        );
        lab.controller_replicas = 2;
        let replicas = controller_replicas(dir, &lab, &lab.clusters[0]);
        let names: Vec<&str> = replicas.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["c1/controller", "c1/controller/1"]);
        assert!(crate::lab::processes::selects(
            "c1/controller",
            &replicas[1].name
        ));
        let configs: Vec<trellis_controller::config::Config> = replicas
            .iter()
            .map(|r| {
                trellis_controller::config::Config::parse(&replica_yaml(
                    dir,
                    &lab,
                    &lab.clusters[0],
                    false,
                    r,
                ))
                .unwrap()
            })
            .collect();
        assert_eq!(configs[0].metrics_listen, Some(replicas[0].metrics));
        assert_eq!(configs[1].metrics_listen, Some(replicas[1].metrics));
        assert_ne!(replicas[0].metrics, replicas[1].metrics);
        assert_eq!(configs[0].agent_listen, configs[1].agent_listen);
        assert_eq!(configs[0].listen, configs[1].listen);
        assert_eq!(configs[0].state_file, configs[1].state_file);
        let lease = trellis_controller::config::LeaseLocation::File(leader_lease_file(
            dir,
            &lab.clusters[0],
        ));
        assert_eq!(configs[0].lease_location(), Some(lease.clone()));
        assert_eq!(configs[1].lease_location(), Some(lease));
    }

    #[test]
    fn controllers_enforce_policy_only_when_the_lab_says_so() {
        let mut lab = Topology::new("t", 2, 1, 1).unwrap();
        let dir = Path::new("/run/trellis/lab/t");
        let config = controller_yaml(dir, &lab, &lab.clusters[0], false);
        assert!(config.contains("networkPolicy: true\n"), "{config}");
        assert!(config.contains("pollMillis: 20"), "{config}");
        assert!(
            config.contains("clustersetIPRanges: [\"10.101.240.0/20\"]\n"),
            "{config}"
        );
        let second = controller_yaml(dir, &lab, &lab.clusters[1], false);
        assert!(
            second.contains("clustersetIPRanges: [\"10.102.240.0/20\"]\n"),
            "{second}"
        );
        lab.network_policy = false;
        let config = controller_yaml(dir, &lab, &lab.clusters[0], false);
        assert!(!config.contains("networkPolicy"), "{config}");
    }
}
