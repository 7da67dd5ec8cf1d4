//! What a lab is made of: names, namespaces and address plans. Plain data, no IO but the
//! state file.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, bail};
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use trellis_core::cidr::node_block;

const STATE_FILE: &str = "state.json";

/// Where each node's gateway serves /metrics and /healthz (on the node's underlay address).
pub const GATEWAY_METRICS_PORT: u16 = 9586;

/// The underlay prefix: every node of every cluster on one segment.
pub const UNDERLAY_PREFIX: u8 = 15;

/// Pod CIDR sizes, as kube-controller-manager's defaults (`/16` per cluster, `/24` per node).
const NODE_PREFIX: u8 = 24;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    pub lab: String,
    /// The underlay: one bridge all nodes attach to, as kind's Docker network is.
    pub switch_netns: String,
    pub clusters: Vec<Cluster>,
    /// Where the Trellis binaries the lab runs are.
    #[serde(default)]
    pub bin_dir: Option<std::path::PathBuf>,
    /// Node-to-node encryption inside each cluster (cross-cluster traffic is always encrypted).
    #[serde(default)]
    pub node_encryption: bool,
    /// The controllers enforce NetworkPolicy (`networkPolicy: true`): every node drops the
    /// traffic of pods its controller has not told it about.
    #[serde(default)]
    pub network_policy: bool,
    /// Each gateway's `--flow-buffer` (the gateway's default when unset).
    #[serde(default)]
    pub flow_buffer: Option<u32>,
    /// Controller processes per cluster; with two, they elect a leader through a lease file
    /// (`trellis lab up --controller-replicas 2`).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub controller_replicas: u32,
    /// The processes the lab started, recorded as each starts.
    #[serde(default)]
    pub daemons: Vec<super::processes::Daemon>,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// The lab as recorded on disk.
pub type LabState = Topology;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub pod_cidr: IpNet,
    pub nodes: Vec<Node>,
    /// What `trellis lab apply` added.
    #[serde(default)]
    pub objects: super::objects::ClusterObjects,
    /// When `up` exported the demo Services (seconds since the epoch): their ServiceExports'
    /// `creationTimestamp`. Every cluster exports at the same second, so the oldest-export
    /// rule falls to its tie-break, the lowest cluster ID.
    #[serde(default)]
    pub exported_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub pod_cidr: IpNet,
    /// The node's own address on the underlay (198.18.0.0/15, only inside the lab's namespaces).
    pub address: Ipv4Addr,
    /// The switch-side end of the node's uplink.
    pub switch_port: String,
    pub pods: Vec<Pod>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub container_id: String,
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// The CNI result of ADD, kept for CHECK and DEL as a runtime keeps it.
    #[serde(default)]
    pub cni_result: Option<serde_json::Value>,
}

pub fn validate_lab_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!("lab name {name:?} must be 1-20 characters of a-z, 0-9 and '-'");
    }
    Ok(())
}

/// Every namespace of lab `lab` starts with this, so `down` can find them all from the name.
pub fn namespace_prefix(lab: &str) -> String {
    format!("tl-{lab}-")
}

impl Topology {
    pub fn new(lab: &str, clusters: u32, nodes: u32, pods: u32) -> anyhow::Result<Self> {
        validate_lab_name(lab)?;
        if !(1..=20).contains(&clusters) || !(1..=50).contains(&nodes) || !(1..=50).contains(&pods)
        {
            bail!("a lab has 1-20 clusters, 1-50 nodes per cluster and 1-50 pods per node");
        }
        let prefix = namespace_prefix(lab);
        let clusters = (1..=clusters)
            .map(|c| {
                let cluster_name = format!("c{c}");
                // Non-overlapping per cluster: 10.<c>.0.0/16.
                let pod_cidr = IpNet::V4(Ipv4Net::new(Ipv4Addr::new(10, c as u8, 0, 0), 16)?);
                let mut pod_index = 0;
                let nodes = (0..nodes)
                    .map(|n| {
                        let node_name = format!("node-{n}");
                        let pods = (0..pods)
                            .map(|_| {
                                let name = format!("pod-{pod_index}");
                                pod_index += 1;
                                Pod {
                                    netns: format!("{prefix}{cluster_name}-{name}"),
                                    container_id: format!("{lab}-{cluster_name}-{name}"),
                                    name,
                                    address: None,
                                    cni_result: None,
                                }
                            })
                            .collect();
                        Ok(Node {
                            switch_port: format!("{cluster_name}n{n}"),
                            netns: format!("{prefix}{cluster_name}-{node_name}"),
                            name: node_name,
                            pod_cidr: node_block(pod_cidr, NODE_PREFIX, n)?,
                            address: Ipv4Addr::new(198, 18, c as u8, 10 + n as u8),
                            pods,
                        })
                    })
                    .collect::<anyhow::Result<Vec<Node>>>()?;
                Ok(Cluster {
                    name: cluster_name,
                    pod_cidr,
                    nodes,
                    objects: Default::default(),
                    exported_at: None,
                })
            })
            .collect::<anyhow::Result<Vec<Cluster>>>()?;
        Ok(Self {
            lab: lab.to_string(),
            switch_netns: format!("{prefix}switch"),
            clusters,
            bin_dir: None,
            node_encryption: false,
            network_policy: true,
            flow_buffer: None,
            controller_replicas: 1,
            daemons: Vec::new(),
        })
    }

    pub fn pods(&self) -> impl Iterator<Item = (&Cluster, &Node, &Pod)> {
        self.clusters.iter().flat_map(|c| {
            c.nodes
                .iter()
                .flat_map(move |n| n.pods.iter().map(move |p| (c, n, p)))
        })
    }

    /// The namespace of `c1/pod-0` or `c1/node-0` (the lab's own pods and its nodes), or of
    /// `c1/x/a` (pod `a` of namespace `x`; `c1/default/pod-0` is `c1/pod-0`).
    pub fn netns_of(&self, target: &str) -> Option<&str> {
        let (cluster, member) = target.split_once('/')?;
        let cluster = self.clusters.iter().find(|c| c.name == cluster)?;
        if let Some((namespace, pod)) = member.split_once('/') {
            if let Some(applied) = cluster.objects.pods.get(member) {
                return Some(applied.netns.as_str());
            }
            if namespace != super::objects::DEFAULT_NAMESPACE {
                return None;
            }
            return cluster
                .nodes
                .iter()
                .flat_map(|n| &n.pods)
                .find(|p| p.name == pod)
                .map(|p| p.netns.as_str());
        }
        cluster.nodes.iter().find_map(|node| {
            if node.name == member {
                return Some(node.netns.as_str());
            }
            node.pods
                .iter()
                .find(|p| p.name == member)
                .map(|p| p.netns.as_str())
        })
    }

    /// The address of pod `c1/x/a` (or `c1/pod-0`, `c1/default/pod-0`).
    pub fn pod_address(&self, target: &str) -> Option<Ipv4Addr> {
        let (cluster, member) = target.split_once('/')?;
        let cluster = self.clusters.iter().find(|c| c.name == cluster)?;
        if let Some(applied) = cluster.objects.pods.get(member) {
            return applied.address;
        }
        let pod = match member.split_once('/') {
            Some((super::objects::DEFAULT_NAMESPACE, pod)) => pod,
            Some(_) => return None,
            None => member,
        };
        cluster
            .nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.name == pod)?
            .address
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        crate::cni::write_atomically(
            &dir.join(STATE_FILE),
            &serde_json::to_vec_pretty(self)?,
            0o600,
        )
        .with_context(|| format!("save lab state in {}", dir.display()))
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let bytes = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_distinct_names_and_cidrs() {
        let topology = Topology::new("t1", 2, 2, 2).unwrap();
        let node_cidrs: Vec<String> = topology
            .clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(|n| n.pod_cidr.to_string()))
            .collect();
        assert_eq!(
            node_cidrs,
            ["10.1.0.0/24", "10.1.1.0/24", "10.2.0.0/24", "10.2.1.0/24"]
        );
        let namespaces: std::collections::HashSet<_> =
            topology.pods().map(|(_, _, p)| p.netns.clone()).collect();
        assert_eq!(namespaces.len(), 8);
        assert!(namespaces.iter().all(|n| n.starts_with("tl-t1-")));
        assert_eq!(topology.netns_of("c2/pod-3"), Some("tl-t1-c2-pod-3"));
        assert_eq!(topology.netns_of("c1/node-1"), Some("tl-t1-c1-node-1"));
        assert_eq!(topology.netns_of("c3/pod-0"), None);
    }

    #[test]
    fn refuses_bad_names_and_sizes() {
        assert!(Topology::new("Bad Name", 1, 1, 1).is_err());
        assert!(Topology::new("ok", 1, 1, 0).is_err());
        assert!(Topology::new("ok", 21, 1, 1).is_err());
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let topology = Topology::new("t2", 1, 1, 2).unwrap();
        topology.save(dir.path()).unwrap();
        assert_eq!(Topology::load(dir.path()).unwrap(), topology);
    }
}
