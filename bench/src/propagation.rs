//! How long a NetworkPolicy change takes to be enforced on every node of a cluster: a lab
//! cluster with N pods (made with `trellis lab apply`), then the same policies changed back
//! and forth in the cluster's source file, each change timed from the file's write until every
//! node's gateway reports new policy inputs in force (its `/status` digest, polled every
//! 5 ms from inside each node). Not through `lab apply`'s own wait, which also reads
//! the controller's `/status`, a document the controller builds at most every 250 ms.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::stats::percentiles;

#[derive(clap::Args)]
pub struct Options {
    /// Pods in the cluster (spread over its nodes, in ten namespaces).
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Nodes of the cluster (a node's pod CIDR is a /24: at most 253 pods each).
    #[arg(long, default_value_t = 4)]
    nodes: u32,
    /// Policy changes measured.
    #[arg(long, default_value_t = 40)]
    changes: usize,
}

const LAB: &str = "bench-prop";
/// The policies' port, which the changes move to the next one and back (no other object of
/// the lab's source names it).
const POLICY_PORT: u16 = 8123;

/// Runs `trellis ARGS` from `bin_dir`; its stdout, or an error with what it printed.
pub(crate) fn trellis(bin_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(bin_dir.join("trellis"))
        .args(args)
        .output()
        .context("run trellis")?;
    if !output.status.success() {
        bail!(
            "trellis {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn apply(bin_dir: &Path, yaml: &str) -> anyhow::Result<String> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), yaml)?;
    let path = file.path().to_string_lossy().into_owned();
    trellis(
        bin_dir,
        &[
            "lab",
            "apply",
            "--name",
            LAB,
            "--cluster",
            "c1",
            "-f",
            &path,
        ],
    )
}

/// The pods: ten namespaces, each pod labelled with its app and a tier, no container ports
/// (the measurement is about the nodes' tables, not traffic).
fn pods_yaml(pods: usize) -> String {
    let mut yaml = String::new();
    for ns in 0..10 {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}}}\n---\n"
        ));
    }
    for index in 0..pods {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{index}, namespace: ns-{}, \
             labels: {{app: app-{}, tier: t{}}}}}\nspec: {{containers: [{{name: c, image: x}}]}}\n---\n",
            index % 10,
            index % 50,
            index % 3
        ));
    }
    yaml
}

/// A policy in every namespace selecting tier t0 (pods on every node), allowing ingress from
/// tier t1 on `port`: changing the port changes every node's table.
fn policy_yaml(port: u16) -> String {
    (0..10)
        .map(|ns| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: from-t1, namespace: ns-{ns}}}\n\
                 spec:\n  podSelector: {{matchLabels: {{tier: t0}}}}\n  ingress:\n\
                 \x20 - from: [{{podSelector: {{matchLabels: {{tier: t1}}}}}}]\n\
                 \x20   ports: [{{port: {port}, protocol: TCP}}]\n---\n"
            )
        })
        .collect()
}

/// The policy digest node `index`'s gateway reports it enforces (the lab's addresses: node
/// `i` of cluster 1 is 198.18.1.(10 + i), its gateway's status on 9586).
fn enforced_digest(node: &trellis_netns::Netns, index: u32) -> Option<String> {
    let address = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10 + index as u8)),
        9586,
    );
    let response = node
        .run(|| trellis_http::client::get(address, "/status", Duration::from_secs(1)))
        .ok()?
        .ok()?;
    let status: serde_json::Value = serde_json::from_str(&response.body).ok()?;
    status["policy"]["digest"].as_str().map(str::to_owned)
}

/// Every node's enforced digest, once they all report one.
fn digests(nodes: &[trellis_netns::Netns]) -> Option<Vec<String>> {
    (0..nodes.len())
        .map(|i| enforced_digest(&nodes[i], i as u32))
        .collect()
}

fn measure(options: &Options, bin_dir: &Path) -> anyhow::Result<Vec<f64>> {
    trellis(
        bin_dir,
        &[
            "lab",
            "up",
            "--name",
            LAB,
            "--clusters",
            "1",
            "--nodes",
            &options.nodes.to_string(),
            "--pods",
            "1",
        ],
    )?;
    apply(bin_dir, &pods_yaml(options.pods))?;
    apply(bin_dir, &policy_yaml(POLICY_PORT))?;
    let source = Path::new("/run/trellis/lab")
        .join(LAB)
        .join("clusters/c1/cluster.yaml");
    let nodes: Vec<trellis_netns::Netns> = (0..options.nodes)
        .map(|i| trellis_netns::Netns::open(&format!("tl-{LAB}-c1-node-{i}")))
        .collect::<Result<_, _>>()?;
    let mut before = digests(&nodes).context("the gateways report no policy")?;
    let mut times = Vec::new();
    for change in 0..options.changes {
        let (from, to) = if change % 2 == 0 {
            (POLICY_PORT, POLICY_PORT + 1)
        } else {
            (POLICY_PORT + 1, POLICY_PORT)
        };
        let yaml = std::fs::read_to_string(&source)?;
        // The lab writes each document as one line of JSON.
        let changed = yaml.replace(&format!("\"port\":{from}"), &format!("\"port\":{to}"));
        if changed == yaml {
            bail!("no policy port {from} in {}", source.display());
        }
        let started = Instant::now();
        trellis_files::write_atomically(&source, changed.as_bytes(), 0o644)?;
        let after = loop {
            if let Some(now) = digests(&nodes)
                && now.iter().all(|d| before.iter().all(|b| b != d))
                && now.windows(2).all(|w| w[0] == w[1])
            {
                break now;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("change {change} not enforced on every node within 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        times.push(started.elapsed().as_secs_f64() * 1e3);
        before = after;
    }
    Ok(times)
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let bin_dir: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary has no directory")?
        .to_path_buf();
    println!(
        "policy propagation: 1 cluster, {} nodes, {} pods; {} policy changes, each timed from \
         the write of the source to every node enforcing it",
        options.nodes, options.pods, options.changes
    );
    let outcome = measure(options, &bin_dir);
    let down = trellis(&bin_dir, &["lab", "down", "--name", LAB]);
    let times = outcome?;
    down?;
    let p = percentiles(
        &times
            .iter()
            .map(|ms| std::time::Duration::from_secs_f64(ms / 1e3))
            .collect::<Vec<_>>(),
    );
    println!(
        "in force on every node: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        p.p50,
        p.p99,
        times.iter().copied().fold(0.0, f64::max)
    );
    Ok(())
}
