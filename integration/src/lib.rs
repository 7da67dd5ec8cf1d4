//! Helpers for the end-to-end tests: find the workspace's binaries and run labs that clean up
//! after themselves, also when a test fails.
//!
//! The tests run the binaries as a user would, so build them first:
//! `cargo build --workspace --bins` (the README's test command does).

pub mod mesh;
pub mod netpol;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

pub use trellis_test_support::bin_path;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Labs of one test binary run one after another: two labs (six daemons and a dozen
/// namespaces each) side by side on a 2-core machine turn every timing bound into a flake.
/// Test binaries themselves already run one at a time under `cargo test`.
static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A lab with a name of its own; `trellis lab down` runs when it drops.
#[derive(Debug)]
pub struct TestLab {
    pub name: String,
    _turn: MutexGuard<'static, ()>,
}

impl TestLab {
    /// Waits until no other lab of this test binary is up.
    pub fn new(tag: &str) -> Self {
        // A failed test poisons the lock; the next lab may still run.
        let turn = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let name = format!(
            "t{tag}{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Self { name, _turn: turn }
    }

    /// Runs `trellis lab --name <name> <args>`.
    pub fn trellis(&self, args: &[&str]) -> Output {
        Command::new(bin_path("trellis"))
            .args(["lab", "--name", &self.name])
            .args(args)
            .output()
            .expect("trellis runs")
    }

    pub fn namespace_prefix(&self) -> String {
        format!("tl-{}-", self.name)
    }

    pub fn namespaces(&self) -> Vec<String> {
        let prefix = self.namespace_prefix();
        trellis_netns::Netns::list()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }
}

impl TestLab {
    /// PIDs of processes of this lab: those whose command line names its directory (the
    /// daemons), and any process inside one of its namespaces (the pods' workload).
    pub fn processes(&self) -> Vec<u32> {
        let marker = format!("{}/", self.state_dir().display());
        let namespaces: Vec<(u64, u64)> = self
            .namespaces()
            .iter()
            .filter_map(|n| std::fs::metadata(Path::new(trellis_netns::NETNS_RUN_DIR).join(n)).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids: Vec<u32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != std::process::id())
            .filter(|pid| {
                let named = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&marker));
                let inside = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|ns| namespaces.contains(&(ns.dev(), ns.ino())));
                named || inside
            })
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Mounts this lab left (the namespaces' bind mounts under /run/netns).
    pub fn mounts(&self) -> Vec<String> {
        let prefix = format!(
            "{}/{}",
            trellis_netns::NETNS_RUN_DIR,
            self.namespace_prefix()
        );
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(&prefix))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.trellis(&["down"]);
    }
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
