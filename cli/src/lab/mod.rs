//! `trellis lab`: up, status, exec, encryption, stop, start, down.

mod build;
mod connectivity;
mod control;
mod processes;
mod roll;
mod services;
mod status;
pub(crate) mod topology;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

pub use topology::{LabState, Topology};

/// Where labs record what they built, so `down` can find everything even after a crash.
const STATE_ROOT: &str = "/run/trellis/lab";

/// What a lab runs, all from one directory.
const LAB_PROGRAMS: [&str; 5] = [
    "trellis",
    "trellis-cni",
    "trellis-controller",
    "trellis-gateway",
    "trellis-dns",
];

#[derive(Args)]
pub struct LabArgs {
    /// The lab's name; several labs can run side by side.
    #[arg(long, global = true, default_value = "default")]
    name: String,
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab and show it working.
    Up {
        /// Clusters.
        #[arg(long, default_value_t = 2)]
        clusters: u32,
        /// Nodes per cluster.
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        /// Pods per node.
        #[arg(long, default_value_t = 2)]
        pods: u32,
        /// Node-to-node encryption inside each cluster; cross-cluster traffic is always encrypted.
        #[arg(long, value_enum, default_value_t = OnOff::Off)]
        node_encryption: OnOff,
        /// Where the Trellis binaries are; defaults to the directory of this binary.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Show what the lab is made of, each cluster's mesh as its controller reports it (peer
    /// clusters, gateways, tunnels) and whether its pods reach each other. Exits 1 when
    /// anything is unhealthy.
    Status {
        #[arg(short, long, value_enum, default_value_t = crate::status::Output::Table)]
        output: crate::status::Output,
    },
    /// Run a command inside a pod or node: `trellis lab exec c1/pod-0 -- ping 10.1.0.2`.
    Exec {
        /// `c1/pod-0` or `c1/node-0`.
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Switch node-to-node encryption in every cluster, at runtime: each controller re-reads
    /// its configuration and pushes the change to its gateways; no process restarts.
    Encryption {
        #[arg(value_enum)]
        mode: OnOff,
    },
    /// Stop daemons, to see what the mesh does without them: `c2` (a whole cluster),
    /// `c1/controller`, `c1/node-0/gateway`, `c1/pod-0/echo`.
    Stop { daemon: String },
    /// Start stopped (or crashed) daemons again, as they were started by `up`.
    Start { daemon: String },
    /// Restart gateways one by one, as a DaemonSet rolling update does, while pods on each
    /// node exchange echoes with pods on other nodes and clusters; report per restart how long
    /// traffic to and from the node stopped. Exits 1 if any flow did not come back.
    Roll {
        /// `c1` (every gateway of a cluster), `c1/node-0`, several separated by commas; every
        /// gateway when left out.
        #[arg(default_value = "")]
        selector: String,
        /// Restart every selected gateway at once (both ends of a tunnel, a node pool
        /// upgraded together) instead of one by one.
        #[arg(long)]
        together: bool,
        /// How each gateway is stopped.
        #[arg(long, value_enum, default_value_t = roll::StopSignal::Term)]
        signal: roll::StopSignal,
        /// Time between the stop and the start, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        pause_ms: u64,
        #[arg(short, long, value_enum, default_value_t = crate::status::Output::Table)]
        output: crate::status::Output,
    },
    /// Remove every namespace, process and file the lab made.
    Down,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn state_dir(name: &str) -> PathBuf {
    PathBuf::from(STATE_ROOT).join(name)
}

pub fn run(args: LabArgs) -> anyhow::Result<ExitCode> {
    topology::validate_lab_name(&args.name)?;
    let dir = state_dir(&args.name);
    match args.command {
        LabCommand::Up {
            clusters,
            nodes,
            pods,
            node_encryption,
            bin_dir,
        } => {
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => std::env::current_exe()?
                    .parent()
                    .context("trellis has no directory")?
                    .to_path_buf(),
            };
            let missing: Vec<&str> = LAB_PROGRAMS
                .into_iter()
                .filter(|program| !bin_dir.join(program).is_file())
                .collect();
            if !missing.is_empty() {
                bail!(
                    "{} not found in {} (build the workspace, or pass --bin-dir)",
                    missing.join(", "),
                    bin_dir.display()
                );
            }
            let mut topology = Topology::new(&args.name, clusters, nodes, pods)?;
            topology.node_encryption = node_encryption == OnOff::On;
            build::up(&dir, &topology, &bin_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Encryption { mode } => {
            let mut state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            build::set_node_encryption(&dir, &mut state, mode == OnOff::On)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Status { output } => {
            let state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            status::run(&state, output)
        }
        LabCommand::Exec { target, command } => {
            let state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            build::exec(&state, &target, &command)
        }
        LabCommand::Stop { daemon } => {
            let state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            build::stop(&state, &daemon)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Start { daemon } => {
            let mut state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            build::start(&dir, &mut state, &daemon)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Roll {
            selector,
            together,
            signal,
            pause_ms,
            output,
        } => {
            let mut state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            let targets: Vec<(topology::Cluster, topology::Node)> =
                roll::gateways(&state, &selector)
                    .into_iter()
                    .map(|(c, n)| (c.clone(), n.clone()))
                    .collect();
            if targets.is_empty() {
                bail!(
                    "no gateway of lab {:?} is named {selector:?} (try c1, c1/node-0)",
                    args.name
                );
            }
            let groups: Vec<Vec<_>> = if together {
                vec![targets]
            } else {
                targets.into_iter().map(|target| vec![target]).collect()
            };
            let mut restarts = Vec::new();
            for group in &groups {
                let restart = roll::restart_together(
                    &dir,
                    &mut state,
                    group,
                    signal,
                    std::time::Duration::from_millis(pause_ms),
                )?;
                if output == crate::status::Output::Json {
                    println!("{}", serde_json::to_string(&restart)?);
                }
                restarts.push(restart);
            }
            if output == crate::status::Output::Table {
                print!("{}", roll::render(&restarts));
            }
            Ok(if restarts.iter().all(roll::Restart::recovered) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Down => {
            build::down(&dir, &args.name)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
