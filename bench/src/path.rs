//! The real path: pod to pod through the lab's gateways, as users run it, beside the bare
//! tunnel and plain routing in the same run.
//!
//! Two labs (2 clusters × 2 nodes × 2 pods, made with `trellis lab up`): one without
//! NetworkPolicy enforcement, one with it and a policy admitting the client to the server.
//! Each round measures, both directions (`iperf3 -R` is the server sending), 1 and 4 flows:
//!
//! - `veth`: two namespaces joined by one veth, no tunnel (the ceiling);
//! - `tunnel`: trellis-gateway between the same two namespaces (`trellis-bench tunnel`'s
//!   path: iperf3 runs where the gateways run, nothing routed);
//! - `pod-plain`: c1/pod-0 → c1/pod-2 on the other node, node encryption off (routing only);
//! - `pod-node-encrypted`: the same pods with node encryption on;
//! - `pod-cross-cluster`: c1/pod-0 → c2/pod-0;
//! - `pod-encrypted-netpol`: the node-encrypted pair in the lab enforcing NetworkPolicy.
//!
//! and for each path ICMP round trips (p50, p99) and the gateways' CPU seconds per gigabit
//! (user + system of every gateway process of the path).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use trellis_netns::Netns;

use crate::propagation::trellis;
use crate::stats::percentiles;
use crate::tunnel::{self, Iperf, Pair, Running};

#[derive(clap::Args)]
pub struct Options {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Repeat the whole set, alternating the order, this many times.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// ICMP echoes per path and round (10 ms apart).
    #[arg(long, default_value_t = 200)]
    pings: u32,
    /// Leave out the lab that enforces NetworkPolicy (and its path).
    #[arg(long)]
    no_netpol: bool,
}

const LAB: &str = "bench-path";
const LAB_NETPOL: &str = "bench-path-np";

/// Admits c1/pod-0 to c1/pod-2 (every port and protocol): the server is isolated, and every
/// packet of the measured connection passes the node's policy table.
const ADMIT_CLIENT: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bench-admit-pod-0, namespace: default}
spec:
  podSelector: {matchLabels: {app: pod-2}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: pod-0}}}]
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Veth,
    Tunnel,
    PodPlain,
    PodNodeEncrypted,
    PodCrossCluster,
    PodEncryptedNetpol,
}

impl PathKind {
    const ALL: [PathKind; 6] = [
        Self::Veth,
        Self::Tunnel,
        Self::PodPlain,
        Self::PodNodeEncrypted,
        Self::PodCrossCluster,
        Self::PodEncryptedNetpol,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Veth => "veth",
            Self::Tunnel => "tunnel",
            Self::PodPlain => "pod-plain",
            Self::PodNodeEncrypted => "pod-node-encrypted",
            Self::PodCrossCluster => "pod-cross-cluster",
            Self::PodEncryptedNetpol => "pod-encrypted-netpol",
        }
    }

    /// The lab the path runs in, and whether it needs node encryption on.
    fn lab(self) -> Option<(&'static str, bool)> {
        match self {
            Self::Veth | Self::Tunnel => None,
            Self::PodPlain => Some((LAB, false)),
            Self::PodNodeEncrypted | Self::PodCrossCluster => Some((LAB, true)),
            Self::PodEncryptedNetpol => Some((LAB_NETPOL, true)),
        }
    }

    /// Client and server pods in the lab.
    fn pods(self) -> (&'static str, &'static str) {
        match self {
            Self::PodCrossCluster => ("c1-pod-0", "c2-pod-0"),
            _ => ("c1-pod-0", "c1-pod-2"),
        }
    }
}

/// One throughput run.
#[derive(Debug, Clone)]
struct Throughput {
    path: PathKind,
    flows: u32,
    reverse: bool,
    gbps: f64,
    retransmits: u64,
    /// The path's gateways' CPU seconds per gigabit moved (none for plain routing).
    gateway_cpu_per_gbit: Option<f64>,
}

/// One path's round trips in one round.
#[derive(Debug, Clone)]
struct RoundTrips {
    path: PathKind,
    samples: Vec<Duration>,
}

/// Where a measurement runs: the client's and server's namespaces, the server's address,
/// and the gateway processes whose CPU is counted.
struct Endpoints {
    namespaces: Namespaces,
    target: Ipv4Addr,
    source: Option<Ipv4Addr>,
    gateways: Vec<u32>,
}

enum Namespaces {
    /// The bare pair, and what runs between them while measured (held, never read: dropping
    /// it stops the tunnel).
    Bare(Pair, #[allow(dead_code)] Running),
    Lab {
        client: Netns,
        server: Netns,
    },
}

impl Endpoints {
    fn client(&self) -> &Netns {
        match &self.namespaces {
            Namespaces::Bare(pair, _) => pair.a.netns(),
            Namespaces::Lab { client, .. } => client,
        }
    }
    fn server(&self) -> &Netns {
        match &self.namespaces {
            Namespaces::Bare(pair, _) => pair.b.netns(),
            Namespaces::Lab { server, .. } => server,
        }
    }
}

fn lab_up(bin_dir: &Path, lab: &str, network_policy: bool) -> anyhow::Result<()> {
    trellis(
        bin_dir,
        &[
            "lab",
            "up",
            "--name",
            lab,
            "--node-encryption",
            "on",
            "--network-policy",
            if network_policy { "on" } else { "off" },
            "--bin-dir",
            &bin_dir.to_string_lossy(),
        ],
    )?;
    Ok(())
}

/// The pod's address: the first IPv4 address of its eth0.
fn pod_address(pod: &Netns) -> anyhow::Result<Ipv4Addr> {
    let json = tunnel::run_in(pod, "ip", &["-j", "-4", "addr", "show", "dev", "eth0"])?;
    let links: serde_json::Value = serde_json::from_str(&json)?;
    links[0]["addr_info"][0]["local"]
        .as_str()
        .context("pod eth0 has no IPv4 address")?
        .parse()
        .context("pod address")
}

/// Every trellis-gateway process whose network namespace is one of the lab's nodes.
fn lab_gateway_pids(lab: &str) -> anyhow::Result<Vec<u32>> {
    use std::os::unix::fs::MetadataExt;
    let prefix = format!("tl-{lab}-");
    let mut nodes = Vec::new();
    for entry in std::fs::read_dir("/run/netns")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.contains("-node-") {
            nodes.push(entry.metadata()?.ino());
        }
    }
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "trellis-gateway" {
            continue;
        }
        if let Ok(net) = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            && nodes.contains(&net.ino())
        {
            pids.push(pid);
        }
    }
    if pids.is_empty() {
        bail!("no trellis-gateway runs in lab {lab}");
    }
    Ok(pids)
}

/// Switches the lab's node encryption (the command returns once every node has it).
fn set_encryption(bin_dir: &Path, lab: &str, on: bool) -> anyhow::Result<()> {
    trellis(
        bin_dir,
        &[
            "lab",
            "encryption",
            if on { "on" } else { "off" },
            "--name",
            lab,
        ],
    )?;
    Ok(())
}

fn endpoints(path: PathKind) -> anyhow::Result<Endpoints> {
    let Some((lab, _)) = path.lab() else {
        let pair = Pair::new()?;
        let contender = if path == PathKind::Veth {
            "veth"
        } else {
            "trellis"
        };
        let running = tunnel::start_passing(&pair, contender, None)?;
        return Ok(Endpoints {
            target: running.target,
            source: Some(running.source),
            gateways: running.processes.iter().map(|c| c.id()).collect(),
            namespaces: Namespaces::Bare(pair, running),
        });
    };
    let (client, server) = path.pods();
    let client = Netns::open(&format!("tl-{lab}-{client}"))?;
    let server = Netns::open(&format!("tl-{lab}-{server}"))?;
    let target = pod_address(&server)?;
    Ok(Endpoints {
        namespaces: Namespaces::Lab { client, server },
        target,
        source: None,
        gateways: if path == PathKind::PodPlain {
            Vec::new()
        } else {
            lab_gateway_pids(lab)?
        },
    })
}

fn measure_path(
    path: PathKind,
    options: &Options,
    throughput: &mut Vec<Throughput>,
    round_trips: &mut Vec<RoundTrips>,
) -> anyhow::Result<()> {
    let at = endpoints(path)?;
    tunnel::wait_for(
        &format!("{} to pass traffic", path.label()),
        Duration::from_secs(10),
        || {
            trellis_netns::probe::icmp_echo(at.client(), at.target, Duration::from_millis(300))
                .ok()
                .flatten()
                .is_some()
        },
    )?;
    let samples = tunnel::ping_from(
        at.client(),
        at.target,
        options.pings,
        Duration::from_millis(10),
    )?;
    if samples.is_empty() {
        bail!("{}: no echo came back", path.label());
    }
    round_trips.push(RoundTrips { path, samples });
    for flows in [1, 4] {
        for reverse in [false, true] {
            let cpu_before = tunnel::pids_cpu_seconds(&at.gateways)?;
            let result = Iperf {
                client: at.client(),
                server: at.server(),
                target: at.target,
                source: at.source,
                flows,
                seconds: options.seconds,
                reverse,
            }
            .measure()
            .with_context(|| format!("{}, {flows} flow(s)", path.label()))?;
            let cpu = tunnel::pids_cpu_seconds(&at.gateways)? - cpu_before;
            let gbits = result.gbps * f64::from(options.seconds);
            let measured = Throughput {
                path,
                flows,
                reverse,
                gbps: result.gbps,
                retransmits: result.retransmits,
                gateway_cpu_per_gbit: (!at.gateways.is_empty())
                    .then(|| cpu / gbits.max(f64::EPSILON)),
            };
            println!(
                "  {:<21} {} flow(s) {}: {:>6.2} Gb/s  retransmits {:>6}  gateways' cpu {}",
                path.label(),
                flows,
                if reverse { "<-" } else { "->" },
                measured.gbps,
                measured.retransmits,
                measured
                    .gateway_cpu_per_gbit
                    .map_or("-".to_string(), |c| format!("{c:.2} s/Gb")),
            );
            throughput.push(measured);
        }
    }
    Ok(())
}

fn measure_all(
    options: &Options,
    bin_dir: &Path,
) -> anyhow::Result<(Vec<Throughput>, Vec<RoundTrips>)> {
    lab_up(bin_dir, LAB, false)?;
    if !options.no_netpol {
        lab_up(bin_dir, LAB_NETPOL, true)?;
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), ADMIT_CLIENT)?;
        trellis(
            bin_dir,
            &[
                "lab",
                "apply",
                "--name",
                LAB_NETPOL,
                "--cluster",
                "c1",
                "-f",
                &file.path().to_string_lossy(),
            ],
        )?;
    }
    let paths: Vec<PathKind> = PathKind::ALL
        .into_iter()
        .filter(|p| !(options.no_netpol && *p == PathKind::PodEncryptedNetpol))
        .collect();
    let mut throughput = Vec::new();
    let mut round_trips = Vec::new();
    let mut encrypted = true;
    for round in 0..options.rounds {
        let mut order = paths.clone();
        // Alternate the order each round so drift hits every path alike.
        if round % 2 == 1 {
            order.reverse();
        }
        for path in order {
            if let Some((lab, wanted)) = path.lab()
                && lab == LAB
                && wanted != encrypted
            {
                set_encryption(bin_dir, LAB, wanted)?;
                encrypted = wanted;
            }
            measure_path(path, options, &mut throughput, &mut round_trips)?;
        }
    }
    Ok((throughput, round_trips))
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let bin_dir: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary has no directory")?
        .to_path_buf();
    println!(
        "real path: {} s iperf3 per run, 1 and 4 flows, both directions, {} ping(s) per path, {} round(s)",
        options.seconds, options.pings, options.rounds
    );
    let outcome = measure_all(options, &bin_dir);
    let mut downs = vec![trellis(&bin_dir, &["lab", "down", "--name", LAB])];
    if !options.no_netpol {
        downs.push(trellis(&bin_dir, &["lab", "down", "--name", LAB_NETPOL]));
    }
    let (throughput, round_trips) = outcome?;
    for down in downs {
        down?;
    }
    print_summary(&throughput, &round_trips);
    Ok(())
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let values: Vec<f64> = values.collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn gbps(results: &[Throughput], path: PathKind, flows: u32, reverse: bool) -> Option<f64> {
    mean(
        results
            .iter()
            .filter(|m| m.path == path && m.flows == flows && m.reverse == reverse)
            .map(|m| m.gbps),
    )
}

fn print_summary(results: &[Throughput], round_trips: &[RoundTrips]) {
    let paths: Vec<PathKind> = PathKind::ALL
        .into_iter()
        .filter(|p| results.iter().any(|m| m.path == *p))
        .collect();
    println!();
    println!(
        "{:<21} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>13}",
        "path", "1 ->", "1 <-", "4 ->", "4 <-", "ping p50", "ping p99", "gw cpu s/Gb"
    );
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}G"));
    for &path in &paths {
        let samples: Vec<Duration> = round_trips
            .iter()
            .filter(|r| r.path == path)
            .flat_map(|r| r.samples.iter().copied())
            .collect();
        let p = percentiles(&samples);
        let cpu = mean(
            results
                .iter()
                .filter(|m| m.path == path)
                .filter_map(|m| m.gateway_cpu_per_gbit),
        );
        println!(
            "{:<21} {:>9} {:>9} {:>9} {:>9} {:>8.3}m {:>8.3}m {:>13}",
            path.label(),
            cell(gbps(results, path, 1, false)),
            cell(gbps(results, path, 1, true)),
            cell(gbps(results, path, 4, false)),
            cell(gbps(results, path, 4, true)),
            p.p50,
            p.p99,
            cpu.map_or("-".to_string(), |c| format!("{c:.2}")),
        );
    }
    println!();
    let ratios = [
        (
            PathKind::PodNodeEncrypted,
            PathKind::Tunnel,
            "target >= 0.9",
        ),
        (PathKind::PodCrossCluster, PathKind::Tunnel, "target >= 0.9"),
        (PathKind::Tunnel, PathKind::Veth, "stretch >= 0.25"),
        (
            PathKind::PodPlain,
            PathKind::Veth,
            "routing and veths alone",
        ),
        (
            PathKind::PodEncryptedNetpol,
            PathKind::PodNodeEncrypted,
            "target >= 0.95",
        ),
    ];
    for (ours, base, note) in ratios {
        let mut cells = Vec::new();
        for (flows, reverse, label) in [
            (1, false, "1 ->"),
            (1, true, "1 <-"),
            (4, false, "4 ->"),
            (4, true, "4 <-"),
        ] {
            if let (Some(a), Some(b)) = (
                gbps(results, ours, flows, reverse),
                gbps(results, base, flows, reverse),
            ) {
                cells.push(format!("{label} {:.2}x", a / b));
            }
        }
        if !cells.is_empty() {
            println!(
                "{} / {}: {}  ({note})",
                ours.label(),
                base.label(),
                cells.join(", ")
            );
        }
    }
}
