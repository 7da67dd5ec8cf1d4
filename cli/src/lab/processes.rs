//! The lab's daemons: started inside a namespace with their output in a log file, recorded by
//! PID and start time so `down` stops exactly them, also after `up` itself was killed.

use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use trellis_netns::Netns;

/// How to start one of the lab's daemons, kept so `trellis lab start` can start it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// What it is, e.g. `c1/node-0/gateway`.
    pub name: String,
    pub netns: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Its output, appended.
    pub log: PathBuf,
    /// It is ready once this accepts TCP connections (from inside `netns`)...
    pub ready: SocketAddr,
    /// ...and, when set, answers `GET` of this path there with 200 (a gateway's `/readyz`:
    /// its plan applied, its handshakes started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_path: Option<String>,
    /// When set, it is ready once this file exists instead (an echo server writes it once
    /// every port it serves is bound, TCP or not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_file: Option<PathBuf>,
}

/// A process the lab started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Daemon {
    pub pid: u32,
    /// The kernel's start time of the process (clock ticks since boot): a PID reused by some
    /// other process after ours died will not match, so it is never signalled.
    pub start_time: u64,
    #[serde(flatten)]
    pub launch: Launch,
}

/// Starts the daemon inside its namespace, detached from the terminal (its own process group,
/// so a Ctrl-C of `trellis lab up` does not take it down), output appended to its log.
pub fn spawn(launch: &Launch) -> anyhow::Result<Daemon> {
    let netns = Netns::open(&launch.netns)?;
    if let Some(ready) = &launch.ready_file {
        // A file left by an earlier run would say ready too soon.
        let _ = fs::remove_file(ready);
    }
    let output = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log)
        .with_context(|| format!("open {}", launch.log.display()))?;
    let mut command = Command::new(&launch.program);
    command
        .args(&launch.args)
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output)
        .process_group(0);
    let child = netns
        .spawn(&mut command)?
        .with_context(|| format!("start {} ({})", launch.name, launch.program.display()))?;
    let pid = child.id();
    let start_time = start_time(pid).with_context(|| {
        format!(
            "{} exited at once; see {}",
            launch.name,
            launch.log.display()
        )
    })?;
    Ok(Daemon {
        pid,
        start_time,
        launch: launch.clone(),
    })
}

/// Waits until the daemon accepts connections on its ready address.
pub fn wait_ready(launch: &Launch, within: Duration) -> anyhow::Result<()> {
    let netns = Netns::open(&launch.netns)?;
    let deadline = Instant::now() + within;
    let probe = || match &launch.ready_path {
        _ if launch.ready_file.is_some() => launch.ready_file.as_ref().is_some_and(|f| f.exists()),
        None => {
            std::net::TcpStream::connect_timeout(&launch.ready, Duration::from_millis(100)).is_ok()
        }
        Some(path) => crate::status::http_get(
            launch.ready,
            &launch.ready.to_string(),
            path,
            Duration::from_millis(200),
        )
        .is_ok(),
    };
    while !netns.run(probe)? {
        if Instant::now() > deadline {
            bail!(
                "{} did not come up:\n{}",
                launch.name,
                log_tail(&launch.log, 15)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether daemon `name` is selected by `selector`: itself, or anything under it
/// (`c2` selects all of cluster c2's daemons, `c1/node-1` that node's).
pub fn selects(selector: &str, name: &str) -> bool {
    let selector = selector.trim_end_matches('/');
    name == selector
        || name
            .strip_prefix(selector)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Field 22 of `/proc/<pid>/stat`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

impl Daemon {
    /// Still running, and still the process we started.
    pub fn is_running(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    /// SIGTERM, then SIGKILL after `grace`. Does nothing to a PID that is no longer ours.
    pub fn stop(&self, grace: Duration) -> anyhow::Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        terminate(self.pid, grace)
            .with_context(|| format!("stop {} (pid {})", self.launch.name, self.pid))
    }

    /// SIGKILL, as a crash or an OOM kill would end it; returns once it is gone.
    pub fn kill(&self) -> anyhow::Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let target = Pid::from_raw(i32::try_from(self.pid)?);
        kill(target, Signal::SIGKILL)
            .with_context(|| format!("kill {} (pid {})", self.launch.name, self.pid))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_zombie(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rfind(')')
                .map(|i| stat[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn terminate(pid: u32, grace: Duration) -> anyhow::Result<()> {
    let target = Pid::from_raw(i32::try_from(pid)?);
    kill(target, Signal::SIGTERM)?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if is_zombie(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(target, Signal::SIGKILL);
    Ok(())
}

/// Every process whose network namespace is the named one (what `ip netns pids` shows).
pub fn pids_in(netns_name: &str) -> Vec<u32> {
    let Ok(target) = fs::metadata(Path::new(trellis_netns::NETNS_RUN_DIR).join(netns_name)) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|ns| ns.ino() == target.ino() && ns.dev() == target.dev())
        })
        .filter(|pid| !is_zombie(*pid))
        .collect()
}

/// Stops every process left inside the namespace (a daemon whose record was lost, or a
/// command someone started with `trellis lab exec`).
pub fn stop_all_in(netns_name: &str, grace: Duration) -> Vec<String> {
    pids_in(netns_name)
        .into_iter()
        .filter_map(|pid| {
            terminate(pid, grace)
                .err()
                .map(|e| format!("pid {pid} in {netns_name}: {e}"))
        })
        .collect()
}

/// The last lines of a daemon's log, for error messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let Ok(text) = fs::read_to_string(log) else {
        return String::new();
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_pick_a_daemon_or_everything_under_a_prefix() {
        assert!(selects("c2", "c2/controller"));
        assert!(selects("c2/", "c2/node-1/gateway"));
        assert!(selects("c1/node-1", "c1/node-1/gateway"));
        assert!(selects("c1/controller", "c1/controller"));
        assert!(!selects("c1", "c10/controller"));
        assert!(!selects("c1/node-1", "c1/node-10/gateway"));
    }

    #[test]
    fn reads_the_start_time_of_this_process() {
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
        assert_eq!(start_time(u32::MAX), None);
    }
}
