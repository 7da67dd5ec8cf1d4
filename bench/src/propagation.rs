//! How long a NetworkPolicy change takes to be enforced on every node of a cluster, as a user
//! of the lab sees it: a lab cluster with N pods, then the same policy changed back and forth;
//! each `trellis lab apply` returns once the controller has loaded the file and every node's
//! gateway enforces the new inputs (their digests match), and says how long that took from
//! the write of the file.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::stats::percentiles;

#[derive(clap::Args)]
pub struct Options {
    /// Pods in the cluster (spread over its nodes, in ten namespaces).
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Nodes of the cluster.
    #[arg(long, default_value_t = 2)]
    nodes: u32,
    /// Policy changes measured.
    #[arg(long, default_value_t = 40)]
    changes: usize,
}

const LAB: &str = "bench-prop";

fn trellis(bin_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
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

/// The milliseconds of the command's `in force in c1 (N ms)` line.
fn in_force_ms(output: &str) -> anyhow::Result<f64> {
    output
        .lines()
        .filter_map(|line| line.strip_prefix("in force in c1 ("))
        .filter_map(|rest| rest.strip_suffix(" ms)"))
        .next_back()
        .context("no `in force` line in the output")?
        .parse::<f64>()
        .context("in force time")
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
    apply(bin_dir, &policy_yaml(80))?;
    let mut times = Vec::new();
    for change in 0..options.changes {
        let port = if change % 2 == 0 { 81 } else { 80 };
        times.push(in_force_ms(&apply(bin_dir, &policy_yaml(port))?)?);
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
