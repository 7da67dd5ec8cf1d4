//! The cost of flow recording on a node: the netpol bench's node (two pods wired by
//! trellis-cni) with the real trellis-gateway running in it, started once per measurement
//! with `--flows on` and with `--flows off`, alternating in one run: new TCP connections per
//! second between the pods, the gateway's CPU time per 1,000 connections (from
//! /proc/<pid>/stat), and with flows on, the flows it recorded and the ring buffer's
//! overwrites (from its /metrics).
//!
//! The gateway starts as after a restart, from a stored plan holding the node's policy (N
//! policies over N pods, the two measured ones among them) and follows no source: it enforces
//! the table itself either way (so conntrack tracks every connection, and with flows on the
//! table logs its drops), and with flows on names every connection's pods and the policies
//! that allowed it from those inputs, as a gateway told by its controller does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use trellis_core::gateway::GatewayState;
use trellis_core::policy::compile;
use trellis_gateway::plan_store::{PlanStore, StoredPlan};
use trellis_gateway::policy::NodePolicy;
use trellis_netns::Netns;

use crate::netpol::{Bed, connection_rate, inputs, median};

/// The node's name in its policy (the pods of the netpol bench's inputs are on it).
const NODE: &str = "bench-node";
/// The gateway's metrics inside the node namespace.
const METRICS: &str = "127.0.0.1:9586";
/// How long a gateway may take to apply its first state.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a gateway may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Options {
    /// Policies in the node's table (each selecting one pod).
    #[arg(long, default_value_t = 1000)]
    policies: usize,
    /// Pods the node's table knows (the two measured ones among them).
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Flows the gateway keeps with flows on (--flow-buffer).
    #[arg(long, default_value_t = 4096)]
    buffer: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rounds; each measures with flows off and on.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// What one measurement saw.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    connections_per_second: f64,
    /// The gateway's CPU time (user + system, all threads) per 1,000 connections.
    cpu_ms_per_thousand: f64,
    /// `trellis_flows_total` summed over its labels (flows on only).
    flows: f64,
    /// `trellis_flows_buffer_overwritten_total` (flows on only).
    overwritten: f64,
}

/// A trellis-gateway running in the node namespace; SIGTERM, then SIGKILL after
/// [`STOP_TIMEOUT`], when dropped.
struct Gateway {
    child: Child,
    _work: tempfile::TempDir,
}

impl Gateway {
    fn start(
        binary: &Path,
        node: &Netns,
        stored: &StoredPlan,
        flows: bool,
        buffer: usize,
    ) -> anyhow::Result<Self> {
        let work = tempfile::tempdir()?;
        let state_dir = work.path().join("state");
        std::fs::create_dir_all(&state_dir)?;
        PlanStore::in_dir(&state_dir).save(stored)?;
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--interface", "tbflows0", "--metrics-addr", METRICS])
            .args(["--flows", if flows { "on" } else { "off" }])
            .arg("--flow-buffer")
            .arg(buffer.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = node
            .spawn(&mut command)?
            .with_context(|| format!("start {}", binary.display()))?;
        let gateway = Self { child, _work: work };
        // Restored: the plan, the policy table, and the flows' names from its inputs.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if metrics(node).is_some_and(|text| {
                metric_sum(&text, "trellis_gateway_plan_restored") == Some(1.0)
                    && metric_sum(&text, "trellis_gateway_ready") == Some(1.0)
            }) {
                return Ok(gateway);
            }
            if Instant::now() > deadline {
                bail!(
                    "trellis-gateway did not restore its plan and policy within {START_TIMEOUT:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway's /metrics, from inside the node namespace.
fn metrics(node: &Netns) -> Option<String> {
    let address: SocketAddr = METRICS.parse().ok()?;
    node.run(move || trellis_http::get(address, "/metrics", Duration::from_millis(500)))
        .ok()?
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.body)
}

/// The sum of a metric over all its label sets in a Prometheus text exposition; `None` when
/// no sample of it is there.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name whole: `name 1` or `name{...} 1`, not `name_more 1`.
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest
            .rsplit_once('}')
            .map_or(rest, |(_, v)| v)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// User plus system CPU time of a process, in clock ticks, from its /proc/<pid>/stat.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or ')'; the fields
    // after the last ')' start with the state (field 3), so utime (14) and stime (15) are
    // the 12th and 13th of them.
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat (did the gateway exit?)"))?;
    let ticks = cpu_ticks(&stat).context("an unreadable /proc/<pid>/stat")?;
    let per_second =
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("no clock tick rate")?;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

fn gateway_binary() -> anyhow::Result<PathBuf> {
    let binary = std::env::current_exe()?
        .parent()
        .context("binary has no directory")?
        .join("trellis-gateway");
    if !binary.is_file() {
        bail!(
            "{} is missing (cargo build --release -p trellis-gateway)",
            binary.display()
        );
    }
    // A gateway without flow recording would measure nothing twice: refuse it up front.
    let help = Command::new(&binary).args(["run", "--help"]).output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    if !(help.contains("--flows") && help.contains("--flow-buffer")) {
        bail!(
            "{} has no --flows / --flow-buffer options: it cannot record flows, so there is nothing to compare",
            binary.display()
        );
    }
    Ok(binary)
}

/// One measurement: a fresh gateway with flows on or off, enforcing the node's policy.
fn measure(
    bed: &Bed,
    binary: &Path,
    stored: &StoredPlan,
    flows: bool,
    options: &Options,
) -> anyhow::Result<Sample> {
    let node = bed.node.netns();
    let gateway = Gateway::start(binary, node, stored, flows, options.buffer)?;
    bed.check_enforced()?;
    let before = process_cpu(gateway.pid())?;
    let rate = connection_rate(bed.client(), bed.target(), options.seconds)?;
    let cpu = process_cpu(gateway.pid())?.saturating_sub(before);
    let connections = rate * options.seconds as f64;
    let text = metrics(node).context("the gateway's /metrics did not answer")?;
    // Absent (never recorded) and zero alike.
    let recorded = metric_sum(&text, "trellis_flows_total").unwrap_or(0.0);
    let overwritten = metric_sum(&text, "trellis_flows_buffer_overwritten_total").unwrap_or(0.0);
    if flows && recorded == 0.0 {
        let flow_metrics: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("trellis_flows"))
            .collect();
        bail!(
            "with --flows on the gateway recorded no flow (trellis_flows_total) for {connections:.0} connections; its flow metrics: {flow_metrics:?}"
        );
    }
    if !flows && recorded > 0.0 {
        bail!("with --flows off the gateway still recorded {recorded} flows");
    }
    Ok(Sample {
        connections_per_second: rate,
        cpu_ms_per_thousand: cpu.as_secs_f64() * 1e3 / connections.max(1.0) * 1e3,
        flows: recorded,
        overwritten,
    })
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.pods < 2 || options.policies == 0 || options.rounds == 0 {
        bail!("need at least 2 pods, 1 policy and 1 round");
    }
    let binary = gateway_binary()?;
    let bed = Bed::new()?;
    let inputs = inputs(
        options.policies,
        options.pods,
        bed.client().address,
        bed.server().address,
    );
    let rules = compile(&inputs, NODE).rule_count();
    // One node, no peers: nothing to route, only the node's own pods' connections to record.
    let state = GatewayState {
        revision: 1,
        cluster: "c1".into(),
        nodes: Vec::new(),
    };
    let stored = StoredPlan {
        plan: state.plan(),
        policy: Some(NodePolicy {
            node: NODE.into(),
            inputs,
        }),
    };
    println!(
        "Flow recording: trellis-gateway with --flows on and off, {} policies over {} pods in the \
         node's table ({} rules) either way, --flow-buffer {}; {} s per measurement, {} round(s)",
        options.policies, options.pods, rules, options.buffer, options.seconds, options.rounds
    );
    // [off, on]
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for round in 0..options.rounds {
        // Alternate which goes first so drift in the machine's load hits both.
        let order = if round.is_multiple_of(2) {
            [false, true]
        } else {
            [true, false]
        };
        for flows in order {
            let sample = measure(&bed, &binary, &stored, flows, options)?;
            eprintln!(
                "round {round}, flows {}: {:.0} connections/s, gateway CPU {:.1} ms per 1,000 connections{}",
                if flows { "on" } else { "off" },
                sample.connections_per_second,
                sample.cpu_ms_per_thousand,
                if flows {
                    format!(
                        ", {:.0} flows recorded, {:.0} overwritten",
                        sample.flows, sample.overwritten
                    )
                } else {
                    String::new()
                }
            );
            samples[usize::from(flows)].push(sample);
        }
    }
    let column = |flows: bool, field: fn(&Sample) -> f64| {
        let mut values: Vec<f64> = samples[usize::from(flows)].iter().map(field).collect();
        median(&mut values)
    };
    let (off_rate, on_rate) = (
        column(false, |s| s.connections_per_second),
        column(true, |s| s.connections_per_second),
    );
    let ratio = on_rate / off_rate;
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "", "flows off", "flows on", "ratio"
    );
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>7.2}x  (target >= 0.90x: {})",
        "new TCP connections/s",
        off_rate,
        on_rate,
        ratio,
        if ratio >= 0.9 { "met" } else { "MISSED" }
    );
    println!(
        "{:<34} {:>12.1} {:>12.1}",
        "gateway CPU ms / 1,000 connections",
        column(false, |s| s.cpu_ms_per_thousand),
        column(true, |s| s.cpu_ms_per_thousand),
    );
    let on = &samples[1];
    let connections: f64 = on
        .iter()
        .map(|s| s.connections_per_second * options.seconds as f64)
        .sum();
    let recorded: f64 = on.iter().map(|s| s.flows).sum();
    let overwritten: f64 = on.iter().map(|s| s.overwritten).sum();
    println!(
        "flows on: {recorded:.0} flows recorded for {connections:.0} connections ({:.2} per connection), \
         {overwritten:.0} overwritten in the ring of {}",
        recorded / connections.max(1.0),
        options.buffer
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_summed_over_its_labels_and_only_by_its_whole_name() {
        let text = "# HELP trellis_flows_total Flows.\n\
                    # TYPE trellis_flows_total counter\n\
                    trellis_flows_total{verdict=\"FORWARDED\",direction=\"egress\"} 120\n\
                    trellis_flows_total{verdict=\"DROPPED\",direction=\"ingress\"} 3\n\
                    trellis_flows_total_extra 99\n\
                    trellis_flows_buffer_overwritten_total 7\n\
                    trellis_gateway_desired_state_revision 1\n";
        assert_eq!(metric_sum(text, "trellis_flows_total"), Some(123.0));
        assert_eq!(
            metric_sum(text, "trellis_flows_buffer_overwritten_total"),
            Some(7.0)
        );
        assert_eq!(
            metric_sum(text, "trellis_gateway_desired_state_revision"),
            Some(1.0)
        );
        assert_eq!(metric_sum(text, "trellis_flows_policy_drops_total"), None);
        // A label value holding '}' or spaces does not confuse the value.
        let odd = "trellis_flows_policy_drops_total{policy=\"a b}c\"} 2\n";
        assert_eq!(
            metric_sum(odd, "trellis_flows_policy_drops_total"),
            Some(2.0)
        );
    }

    #[test]
    fn cpu_ticks_are_user_plus_system_whatever_the_command_name() {
        let stat = "4242 (trellis-gateway) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    150 25 0 0 20 0 9 0 123456 0 0";
        assert_eq!(cpu_ticks(stat), Some(175));
        let odd_name = "4242 (a) b (c) R 1 4242 4242 0 -1 4194560 1234 0 0 0 7 3 0 0";
        assert_eq!(cpu_ticks(odd_name), Some(10));
        assert_eq!(cpu_ticks("4242 (truncated) S 1"), None);
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn the_median_is_the_middle_measurement() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0]), 4.0);
        assert!(median(&mut []).is_nan());
    }
}
