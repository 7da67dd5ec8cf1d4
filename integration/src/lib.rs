//! Helpers for the end-to-end tests: find the workspace's binaries and run labs that clean up
//! after themselves, also when a test fails.
//!
//! The tests run the binaries as a user would, so build them first:
//! `cargo build --workspace --bins` (the README's test command does).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A binary of this workspace, from the target directory these tests were built into.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A lab with a name of its own; `trellis lab down` runs when it drops.
#[derive(Debug)]
pub struct TestLab {
    pub name: String,
}

impl TestLab {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "t{tag}{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Self { name }
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
    /// PIDs of processes started for this lab (their command lines name its directory).
    pub fn processes(&self) -> Vec<u32> {
        let marker = format!("/run/trellis/lab/{}/", self.name);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&marker))
            })
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
