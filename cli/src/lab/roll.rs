//! `trellis lab roll`: restart a cluster's gateways one by one, as a DaemonSet rolling update
//! does, while pods probe each other through every restarted node, and report for each
//! restart how long traffic to and from the node's pods stopped.
//!
//! Per node, one of its pods exchanges ICMP echoes every 20 ms with a pod on another node of
//! its cluster and with a pod of another cluster, each side starting its own echoes: "to" the
//! node (the remote pod asks) and "from" it (the node's pod asks). The figures are the longest
//! silence between two answered echoes (the whole outage, including the time the gateway was
//! down), and how long after the new gateway was ready the first answer came (the part a
//! faster restart cannot hide: the time tunnels took to come back).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use trellis_netns::{Netns, probe};

use super::processes;
use super::topology::{Cluster, LabState, Node, Pod};

/// Echoes per second per flow: one every this long.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// How long one echo is waited for; the resolution of a measured gap while traffic is down.
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// Probing before the stop, so every flow is seen working first.
const WARM_UP: Duration = Duration::from_millis(600);
/// The longest a flow may take to answer again after the gateway is ready before it counts
/// as not recovered.
const RECOVERY_LIMIT: Duration = Duration::from_secs(20);
/// Probing goes on this long after every flow answered again (a relapse would show).
const SETTLE: Duration = Duration::from_millis(500);

/// How a gateway is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StopSignal {
    /// SIGTERM, what the kubelet sends in a rolling update (SIGKILL after a grace period).
    Term,
    /// SIGKILL, a crash or an OOM kill.
    Kill,
}

/// Which way a flow's echoes start, seen from the restarted node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A pod elsewhere asks a pod on the node.
    To,
    /// A pod on the node asks a pod elsewhere.
    From,
}

/// One probed flow: its ends (`cluster/pod`) and what it crosses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub direction: Direction,
    /// `cross-node` (within the cluster) or `cross-cluster`.
    pub path: &'static str,
    pub source: String,
    pub target: String,
    #[serde(skip)]
    source_netns: String,
    #[serde(skip)]
    target_address: Ipv4Addr,
}

/// What one flow saw of one restart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowResult {
    #[serde(flatten)]
    pub flow: Flow,
    /// The longest time between two answered echoes, in seconds.
    pub longest_gap_seconds: f64,
    /// From the new gateway being ready to the flow's first answer after it, in seconds (0
    /// when it never stopped answering); `None`: it did not answer again.
    pub after_ready_seconds: Option<f64>,
    pub sent: usize,
    pub answered: usize,
}

/// One gateway's restart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Restart {
    pub gateway: String,
    pub signal: StopSignal,
    /// From the stop signal to the new process being ready, in seconds.
    pub down_seconds: f64,
    pub flows: Vec<FlowResult>,
}

impl Restart {
    /// The worst flow in `direction`: (longest gap, longest time to answer after ready,
    /// every flow recovered).
    pub fn worst(&self, direction: Direction) -> (f64, Option<f64>) {
        let flows = self.flows.iter().filter(|f| f.flow.direction == direction);
        let gap = flows
            .clone()
            .map(|f| f.longest_gap_seconds)
            .fold(0.0, f64::max);
        let after = flows
            .map(|f| f.after_ready_seconds)
            .try_fold(0.0, |worst: f64, after| after.map(|a| worst.max(a)));
        (gap, after)
    }

    pub fn recovered(&self) -> bool {
        self.flows.iter().all(|f| f.after_ready_seconds.is_some())
    }
}

/// An echo's outcome: when it was sent, and whether it was answered.
type Sample = (Instant, bool);

/// The longest time between two answered echoes, counting from the first sample (a flow that
/// never answered is silent for the whole window).
pub fn longest_gap(samples: &[Sample]) -> Duration {
    let Some(&(first, _)) = samples.first() else {
        return Duration::ZERO;
    };
    let mut last_answer = first;
    let mut longest = Duration::ZERO;
    for &(at, answered) in samples {
        if answered {
            longest = longest.max(at.saturating_duration_since(last_answer));
            last_answer = at;
        }
    }
    if let Some(&(end, _)) = samples.last() {
        longest = longest.max(end.saturating_duration_since(last_answer));
    }
    longest
}

/// How long after `ready` the flow answered again: zero when it was answering right before
/// `ready` and right after (it was back already, or never stopped), `None` when nothing after
/// `ready` was answered.
pub fn answered_after(samples: &[Sample], ready: Instant) -> Option<Duration> {
    let first_after = samples
        .iter()
        .find(|(at, answered)| *answered && *at >= ready)
        .map(|(at, _)| *at)?;
    let last_before_answered = samples
        .iter()
        .rev()
        .find(|(at, _)| *at < ready)
        .is_some_and(|(_, answered)| *answered);
    let first_at_or_after_answered = samples
        .iter()
        .find(|(at, _)| *at >= ready)
        .is_some_and(|(_, answered)| *answered);
    if last_before_answered && first_at_or_after_answered {
        return Some(Duration::ZERO);
    }
    Some(first_after.saturating_duration_since(ready))
}

/// The flows that cross `node`'s gateway: between its first pod and a pod on another node
/// of its cluster, and a pod of another cluster, each way. Where the lab has more than one
/// such node, the two directions go to different ones: traffic the node's pod starts makes
/// its gateway start a handshake with that one peer, which would hide a peer that keeps
/// sending into a lost session.
pub fn flows_through(state: &LabState, cluster: &Cluster, node: &Node) -> Vec<Flow> {
    let Some(local) = pod_on(node) else {
        return Vec::new();
    };
    let same_cluster: Vec<(&Cluster, &Pod)> = cluster
        .nodes
        .iter()
        .filter(|other| other.name != node.name)
        .filter_map(|other| pod_on(other).map(|p| (cluster, p)))
        .collect();
    let other_clusters: Vec<(&Cluster, &Pod)> = state
        .clusters
        .iter()
        .filter(|other| other.name != cluster.name)
        .flat_map(|other| {
            other
                .nodes
                .iter()
                .filter_map(move |n| pod_on(n).map(|p| (other, p)))
        })
        .collect();
    let local_name = format!("{}/{}", cluster.name, local.name);
    let mut flows = Vec::new();
    for (path, remotes) in [
        ("cross-node", same_cluster),
        ("cross-cluster", other_clusters),
    ] {
        let (Some(first), Some(last)) = (remotes.first(), remotes.last()) else {
            continue;
        };
        for (direction, (remote_cluster, remote)) in
            [(Direction::To, first), (Direction::From, last)]
        {
            let (Some(local_address), Some(remote_address)) = (local.address, remote.address)
            else {
                continue;
            };
            let remote_name = format!("{}/{}", remote_cluster.name, remote.name);
            flows.push(match direction {
                Direction::To => Flow {
                    direction,
                    path,
                    source: remote_name,
                    target: local_name.clone(),
                    source_netns: remote.netns.clone(),
                    target_address: local_address,
                },
                Direction::From => Flow {
                    direction,
                    path,
                    source: local_name.clone(),
                    target: remote_name,
                    source_netns: local.netns.clone(),
                    target_address: remote_address,
                },
            });
        }
    }
    flows
}

/// A node's first pod with an address.
fn pod_on(node: &Node) -> Option<&Pod> {
    node.pods.iter().find(|p| p.address.is_some())
}

/// Echoes on one flow until told to stop; what each echo saw.
fn probe_flow(flow: &Flow, stop: &AtomicBool) -> anyhow::Result<Vec<Sample>> {
    let netns = Netns::open(&flow.source_netns)?;
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let answered = probe::icmp_echo(&netns, flow.target_address, PROBE_TIMEOUT)?.is_some();
        samples.push((sent, answered));
        if let Some(rest) = PROBE_EVERY.checked_sub(sent.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    Ok(samples)
}

/// Every gateway the selectors name (`c1`, `c1/node-0`, several separated by commas; every
/// gateway when empty), in the lab's order.
pub fn gateways<'a>(state: &'a LabState, selectors: &str) -> Vec<(&'a Cluster, &'a Node)> {
    let selectors: Vec<&str> = selectors.split(',').filter(|s| !s.is_empty()).collect();
    state
        .clusters
        .iter()
        .flat_map(|c| c.nodes.iter().map(move |n| (c, n)))
        .filter(|(c, n)| {
            let name = format!("{}/{}/gateway", c.name, n.name);
            selectors.is_empty() || selectors.iter().any(|s| processes::selects(s, &name))
        })
        .collect()
}

/// Restarts a group of gateways together (one, in a rolling update) under probing traffic
/// through each, and measures what the flows saw.
pub fn restart_together(
    dir: &std::path::Path,
    state: &mut LabState,
    group: &[(Cluster, Node)],
    signal: StopSignal,
    pause: Duration,
) -> anyhow::Result<Restart> {
    let names: Vec<String> = group
        .iter()
        .map(|(c, n)| format!("{}/{}/gateway", c.name, n.name))
        .collect();
    let mut indices = Vec::new();
    for name in &names {
        let index = state
            .daemons
            .iter()
            .position(|d| &d.launch.name == name)
            .with_context(|| format!("lab {:?} has no daemon {name}", state.lab))?;
        if !state.daemons[index].is_running() {
            bail!("{name} is not running; start it first (trellis lab start {name})");
        }
        indices.push(index);
    }
    let mut flows: Vec<Flow> = Vec::new();
    for (cluster, node) in group {
        for flow in flows_through(state, cluster, node) {
            if !flows
                .iter()
                .any(|f| f.source == flow.source && f.target == flow.target)
            {
                flows.push(flow);
            }
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let probers: Vec<_> = flows
        .iter()
        .cloned()
        .map(|flow| {
            let stop = stop.clone();
            std::thread::spawn(move || probe_flow(&flow, &stop))
        })
        .collect();
    std::thread::sleep(WARM_UP);

    let outcome = (|| -> anyhow::Result<(Instant, Instant)> {
        let stopped = Instant::now();
        for &index in &indices {
            match signal {
                StopSignal::Term => state.daemons[index].stop(Duration::from_secs(10))?,
                StopSignal::Kill => state.daemons[index].kill()?,
            }
        }
        std::thread::sleep(pause);
        let mut launches = Vec::new();
        for &index in &indices {
            let launch = state.daemons[index].launch.clone();
            state.daemons[index] = processes::spawn(&launch)?;
            state.save(dir)?;
            launches.push(launch);
        }
        for launch in &launches {
            processes::wait_ready(launch, Duration::from_secs(15))?;
        }
        Ok((stopped, Instant::now()))
    })();
    // Probe until every flow answered again after the restart (or the limit), then settle.
    let deadline = Instant::now() + RECOVERY_LIMIT;
    if outcome.is_ok() {
        std::thread::sleep(SETTLE);
        while Instant::now() < deadline && !all_answer(&flows) {
            std::thread::sleep(PROBE_EVERY);
        }
        std::thread::sleep(SETTLE);
    }
    stop.store(true, Ordering::Relaxed);
    let mut sampled = Vec::new();
    for prober in probers {
        sampled.push(
            prober
                .join()
                .map_err(|_| anyhow::anyhow!("a prober panicked"))??,
        );
    }
    let (stopped, ready) = outcome?;
    let results = flows
        .into_iter()
        .zip(sampled)
        .map(|(flow, samples)| FlowResult {
            longest_gap_seconds: longest_gap(&samples).as_secs_f64(),
            after_ready_seconds: answered_after(&samples, ready).map(|d| d.as_secs_f64()),
            sent: samples.len(),
            answered: samples.iter().filter(|(_, a)| *a).count(),
            flow,
        })
        .collect();
    Ok(Restart {
        gateway: names.join(","),
        signal,
        down_seconds: ready.saturating_duration_since(stopped).as_secs_f64(),
        flows: results,
    })
}

/// Whether every flow answers one echo now.
fn all_answer(flows: &[Flow]) -> bool {
    flows.iter().all(|flow| {
        Netns::open(&flow.source_netns)
            .ok()
            .and_then(|netns| probe::icmp_echo(&netns, flow.target_address, PROBE_TIMEOUT).ok())
            .flatten()
            .is_some()
    })
}

/// The report as a table, one row per restart.
pub fn render(restarts: &[Restart]) -> String {
    let seconds = |s: f64| format!("{s:.2} s");
    let after = |a: Option<f64>| a.map_or_else(|| "never".to_string(), seconds);
    let mut rows = vec![[
        "GATEWAY".to_string(),
        "SIGNAL".to_string(),
        "DOWN".to_string(),
        "TO NODE: GAP".to_string(),
        "AFTER READY".to_string(),
        "FROM NODE: GAP".to_string(),
        "AFTER READY".to_string(),
    ]];
    for restart in restarts {
        let (to_gap, to_after) = restart.worst(Direction::To);
        let (from_gap, from_after) = restart.worst(Direction::From);
        rows.push([
            restart.gateway.clone(),
            format!("{:?}", restart.signal).to_uppercase(),
            seconds(restart.down_seconds),
            seconds(to_gap),
            after(to_after),
            seconds(from_gap),
            after(from_after),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline(start: Instant, pattern: &str) -> Vec<Sample> {
        pattern
            .chars()
            .enumerate()
            .map(|(i, c)| (start + PROBE_EVERY * i as u32, c == '+'))
            .collect()
    }

    #[test]
    fn the_longest_gap_runs_between_answers_and_to_the_end() {
        let t = Instant::now();
        assert_eq!(longest_gap(&timeline(t, "++++")), PROBE_EVERY);
        assert_eq!(longest_gap(&timeline(t, "++----++")), PROBE_EVERY * 5);
        assert_eq!(longest_gap(&timeline(t, "++---")), PROBE_EVERY * 3);
        assert_eq!(longest_gap(&timeline(t, "----")), PROBE_EVERY * 3);
        assert_eq!(longest_gap(&[]), Duration::ZERO);
    }

    #[test]
    fn recovery_counts_from_ready_to_the_first_answer() {
        let t = Instant::now();
        let samples = timeline(t, "+++-----------+++");
        let ready = t + PROBE_EVERY * 8;
        assert_eq!(answered_after(&samples, ready), Some(PROBE_EVERY * 6));
        let never = timeline(t, "+++--------------");
        assert_eq!(answered_after(&never, ready), None);
        let through = timeline(t, "+++++++++++++++++");
        assert_eq!(answered_after(&through, ready), Some(Duration::ZERO));
        let back_before_ready = timeline(t, "+++---+++++++++++");
        assert_eq!(
            answered_after(&back_before_ready, ready),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn the_worst_flow_decides_each_direction() {
        let flow = |direction, gap, after| FlowResult {
            flow: Flow {
                direction,
                path: "cross-cluster",
                source: "c1/pod-0".into(),
                target: "c2/pod-0".into(),
                source_netns: String::new(),
                target_address: Ipv4Addr::LOCALHOST,
            },
            longest_gap_seconds: gap,
            after_ready_seconds: after,
            sent: 10,
            answered: 5,
        };
        let restart = Restart {
            gateway: "c2/node-1/gateway".into(),
            signal: StopSignal::Kill,
            down_seconds: 1.2,
            flows: vec![
                flow(Direction::To, 1.5, Some(0.1)),
                flow(Direction::To, 1.3, Some(0.3)),
                flow(Direction::From, 1.4, None),
            ],
        };
        assert_eq!(restart.worst(Direction::To), (1.5, Some(0.3)));
        assert_eq!(restart.worst(Direction::From), (1.4, None));
        assert!(!restart.recovered());
        let table = render(&[restart]);
        assert!(table.contains("c2/node-1/gateway  KILL"), "{table}");
        assert!(table.contains("never"), "{table}");
    }
}
