//! `trellis lab`: up, status, exec, encryption, stop, start, roll, down; the Kubernetes
//! objects of its clusters: apply, delete, label, probe; and their flows: observe.

mod apply;
mod build;
mod clusterset;
mod connectivity;
mod control;
mod objects;
mod observe;
mod peer;
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
        /// NetworkPolicy enforced on every node (`networkPolicy` in each controller's
        /// configuration).
        #[arg(long, value_enum, default_value_t = OnOff::On)]
        network_policy: OnOff,
        /// Flows each node's gateway keeps for `trellis lab observe` (its `--flow-buffer`).
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
        flow_buffer: u32,
        /// Where the Trellis binaries are; defaults to the directory of this binary.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Controller processes per cluster: with 2 they elect a leader through a lease file
        /// and the other takes over when it dies (`trellis lab status` shows who leads).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
        controller_replicas: u32,
    },
    /// Create or update Kubernetes objects in a cluster, as `kubectl apply -f` does:
    /// Namespace, Pod (made through the CNI on its node, serving its container ports with the
    /// echo server), NetworkPolicy, Service, ServiceExport. Returns once the change is in
    /// force on every node of the cluster and of its peer clusters.
    Apply {
        /// The cluster: `c1`.
        #[arg(long)]
        cluster: String,
        /// Multi-document YAML; `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete the objects a file names (deleting a Namespace deletes what is in it); returns
    /// once the change is in force.
    Delete {
        /// The cluster: `c1`.
        #[arg(long)]
        cluster: String,
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Set (`key=value`, overwriting) or remove (`key-`) labels of `pod/NAMESPACE/NAME` or
    /// `namespace/NAME`, as `kubectl label --overwrite` does; returns once in force.
    Label {
        /// The cluster: `c1`.
        #[arg(long)]
        cluster: String,
        /// `pod/x/a` or `namespace/x`.
        target: String,
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// One fresh connection from a pod to a pod or an address: `trellis lab probe c1/x/a
    /// c2/y/b:80/tcp`. Exits 0 when it connected (UDP: the echo came back), 1 when not.
    Probe {
        /// The client: `c1/x/a` (`c1/pod-0` for the lab's own pods).
        from: String,
        /// `CLUSTER/NAMESPACE/POD:PORT[/tcp|udp|sctp]` or `IP:PORT[/...]`.
        to: String,
        /// How long to wait for the connection.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
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
        /// `c1/x/a` (pod `a` of namespace `x`), `c1/pod-0` (the lab's own) or `c1/node-0`.
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
    /// Flows from every cluster's controller, as `trellis observe` shows one cluster's:
    /// `trellis lab observe --verdict DROPPED -o json`, `trellis lab observe -f --in c2`.
    /// Without --follow the answers are merged by time (the last N overall).
    Observe {
        /// Ask only this cluster's controller (repeatable; every cluster when left out).
        /// `--cluster` is the filter on flows' ends, as in `trellis observe`.
        #[arg(long = "in", value_name = "CLUSTER")]
        in_clusters: Vec<String>,
        #[command(flatten)]
        flows: Box<crate::observe::FlowArgs>,
    },
    /// External machines (a laptop, a VM) attached through a node's gateway:
    /// `trellis lab peer add laptop --cluster c1 --node node-0`, `remove`, `list`.
    Peer(peer::LabPeerArgs),
    /// Remove every namespace, process and file the lab made.
    Down,
    /// The kube-proxy stand-in for a cluster's clusterset services (started by `up`, one per
    /// cluster): follows the controller's imports and keeps every node's VIP translations.
    #[command(hide = true)]
    Proxy {
        /// The cluster: `c1`.
        #[arg(long)]
        cluster: String,
    },
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
            network_policy,
            flow_buffer,
            bin_dir,
            controller_replicas,
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
            topology.network_policy = network_policy == OnOff::On;
            topology.flow_buffer = Some(flow_buffer);
            topology.controller_replicas = controller_replicas;
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
        LabCommand::Peer(peer_args) => {
            peer::run(&dir, &args.name, peer_args).map(|()| ExitCode::SUCCESS)
        }
        LabCommand::Apply { cluster, file } => {
            let _turn = one_change_at_a_time(&dir, &args.name)?;
            let mut state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            let manifests = apply::read_manifests(&file)?;
            apply::apply(&dir, &mut state, &cluster, &manifests)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Delete { cluster, file } => {
            let _turn = one_change_at_a_time(&dir, &args.name)?;
            let mut state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            let manifests = apply::read_manifests(&file)?;
            apply::delete(&dir, &mut state, &cluster, &manifests)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Label {
            cluster,
            target,
            changes,
        } => {
            let _turn = one_change_at_a_time(&dir, &args.name)?;
            let mut state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            apply::label(&dir, &mut state, &cluster, &target, &changes)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Probe { from, to, timeout } => {
            let state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            probe(&state, &from, &to, timeout)
        }
        LabCommand::Observe { in_clusters, flows } => {
            let state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            observe::run(&state, &in_clusters, &flows)
        }
        LabCommand::Down => {
            build::down(&dir, &args.name)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Proxy { cluster } => {
            let state =
                LabState::load(&dir).with_context(|| format!("lab {:?} is not up", args.name))?;
            clusterset::run(&dir, &state, &cluster)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Holds the lab's change lock until dropped: `apply`, `delete` and `label` each read the
/// state, make pods and write the state and the source, so two at once would lose one's work.
fn one_change_at_a_time(
    dir: &std::path::Path,
    lab: &str,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("changes.lock"))
        .with_context(|| format!("lab {lab:?} is not up"))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow::anyhow!("lock {}: {errno}", dir.display()))
}

/// `trellis lab probe`: one line, exit 0 when connected.
fn probe(
    state: &LabState,
    from: &str,
    to: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let netns = state.netns_of(from).with_context(|| {
        format!(
            "no pod {from:?} in lab {:?} (try c1/NAMESPACE/POD or c1/pod-0)",
            state.lab
        )
    })?;
    let (target, port) = to
        .rsplit_once(':')
        .with_context(|| format!("{to:?}: give a port, e.g. c2/y/b:80/tcp or 10.2.0.5:81/udp"))?;
    let (port, transport) = trellis_probe::parse_port(port).map_err(anyhow::Error::msg)?;
    let address: std::net::Ipv4Addr = match target.parse() {
        Ok(address) => address,
        Err(_) => state
            .pod_address(target)
            .with_context(|| format!("no pod {target:?} with an address in lab {:?}", state.lab))?,
    };
    let to_addr = std::net::SocketAddr::new(address.into(), port);
    let outcome = trellis_probe::probe(
        &trellis_probe::Probe {
            netns: netns.to_string(),
            to: to_addr,
            transport,
        },
        timeout,
    );
    let named = if target == address.to_string() {
        String::new()
    } else {
        format!("{target} ")
    };
    println!("{from} -> {named}{to_addr}/{transport} {outcome}");
    Ok(if outcome.connected() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
