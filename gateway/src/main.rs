//! `trellis-gateway`: the per-node WireGuard agent.

// Under `mock-time` boringtun's clock stands still unless a test moves it: a gateway built so
// would never complete a handshake. The feature is for the library's timer tests (`--lib`
// builds no binary).
#[cfg(all(feature = "mock-time", not(test)))]
compile_error!(
    "the mock-time feature is for `cargo test -p trellis-gateway --lib --features mock-time`, never a binary"
);

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use trellis_core::agent::GatewayRegistration;
use trellis_gateway::controller::{ControllerSource, follow_controller};
use trellis_gateway::device::DeviceConfig;
use trellis_gateway::flows::directory::NodeIdentity;
use trellis_gateway::flows::kernel::KernelSources;
use trellis_gateway::flows::recorder::Recorder;
use trellis_gateway::flows::{Names, Pipeline};
use trellis_gateway::gateway::{DEFAULT_ROUTE_PROTOCOL, follow_file, follow_stream};
use trellis_gateway::keys::KeyPair;
use trellis_gateway::peer_config::PeerConfigArgs;
use trellis_gateway::plan_store::PlanStore;
use trellis_gateway::routes::RouteMetrics;
use trellis_gateway::{Gateway, GatewayConfig};

#[derive(Parser, Debug)]
#[command(
    name = "trellis-gateway",
    version,
    about = "Trellis per-node WireGuard gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway: TUN, UDP, peers and routes from the desired state.
    Run(Box<RunArgs>),
    /// Print this node's public key (generating the key pair on first use).
    PublicKey {
        #[arg(long, default_value = "/var/lib/trellis-gateway")]
        state_dir: PathBuf,
    },
    /// Rotate the running gateway's WireGuard key now (it must follow a controller, which
    /// announces the new public key): signals the gateway whose PID file is in the state
    /// directory (SIGUSR1) and prints the new public key once it is stored.
    RotateKey {
        #[arg(long, default_value = "/var/lib/trellis-gateway")]
        state_dir: PathBuf,
        /// How long to wait for the new key.
        #[arg(long, default_value_t = 10)]
        timeout_seconds: u64,
    },
    /// Print a wg-quick config for an external machine joining through this gateway, with a
    /// freshly generated key for it; its public key is printed as a comment to add to the
    /// desired state.
    PeerConfig(PeerConfigArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[arg(long, default_value = "/var/lib/trellis-gateway")]
    state_dir: PathBuf,
    #[arg(long, default_value = "trellis0")]
    interface: String,
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    #[arg(long, default_value_t = 1420)]
    mtu: u16,
    /// Packets processed per wake-up on each side.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Handshake initiations answered per second before cookies are demanded.
    #[arg(long, default_value_t = DeviceConfig::default().handshake_rate_limit)]
    handshake_rate_limit: u64,
    /// Do not ask for TUN (TSO/USO) or UDP (GSO/GRO) offloads: one packet per read and
    /// write. Also set by the environment variable TRELLIS_GATEWAY_NO_OFFLOAD=1.
    #[arg(long)]
    no_offload: bool,
    /// Device workers: threads with a TUN queue and UDP socket each, pinned to the CPUs the
    /// kernel steers their packets from. 0 means one per CPU (at most 8); 1 is one thread.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// JSON desired state to follow (trellis_core::gateway::GatewayState): a file, polled,
    /// or `-` for one JSON document per line on stdin.
    #[arg(long, conflicts_with = "controller")]
    desired_state: Option<PathBuf>,
    /// Follow the cluster's controller instead: its agent address (HOST:PORT).
    #[arg(long)]
    controller: Option<SocketAddr>,
    /// Deprecated (a controller without agent TLS): a file holding its shared agent token.
    #[arg(long, requires = "controller", conflicts_with = "agent_ca")]
    controller_token_file: Option<PathBuf>,
    /// The cluster's agent CA (PEM): the controller must present `agent.<cluster>.trellis`
    /// signed by it. Re-read when it changes, as are the certificate and key.
    #[arg(long, requires_all = ["controller", "agent_cert", "agent_key"])]
    agent_ca: Option<PathBuf>,
    /// This node's certificate (`<node>.node.<cluster>.trellis`, from `trellis certs agent
    /// --node`): the node it may register.
    #[arg(long, requires = "agent_ca")]
    agent_cert: Option<PathBuf>,
    /// This node's agent private key.
    #[arg(long, requires = "agent_ca")]
    agent_key: Option<PathBuf>,
    /// On Kubernetes: the projected ServiceAccount token (audience `trellis-agent`) this
    /// gateway proves its node with to get (and renew, before it expires) its node
    /// certificate from the controller, written to --agent-cert and --agent-key.
    /// The controller is any `agent.<id>.trellis` signed by --agent-ca (one agent CA per
    /// cluster), the ID learnt from it, unless --cluster-id pins it.
    #[arg(long, requires = "agent_ca")]
    agent_bootstrap_token: Option<PathBuf>,
    /// The cluster's ID (the controller's agent certificate names it): when given, a
    /// bootstrap accepts only that cluster's controller.
    #[arg(long)]
    cluster_id: Option<String>,
    /// This node's name, as the controller knows it (a Kubernetes Node name).
    #[arg(long, requires = "controller")]
    node_name: Option<String>,
    /// The UDP endpoint other gateways reach this one at (this node's address and the port).
    #[arg(long, requires = "controller")]
    advertise_endpoint: Option<SocketAddr>,
    /// Serve /metrics, /healthz and /status (JSON: tunnel peers, applied state, drops) here.
    #[arg(long, default_value = "127.0.0.1:9586")]
    metrics_addr: SocketAddr,
    /// Routing protocol number marking the gateway's routes.
    #[arg(long, default_value_t = DEFAULT_ROUTE_PROTOCOL)]
    route_protocol: u8,
    /// Seconds between full re-applications of the desired state.
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Rotate the WireGuard key when the stored one is this old (e.g. 720h, 30d; 0 or off:
    /// never). Only with --controller, which announces the new key; the schedule follows the
    /// key file's age, so restarts do not postpone it. SIGUSR1 (`trellis-gateway rotate-key`)
    /// rotates at once.
    #[arg(long, default_value = "30d", value_parser = parse_interval)]
    key_rotation_interval: Duration,
    /// Seconds the replaced key still answers handshakes after a rotation (peers that have
    /// not initiated to the new key by then are moved to it).
    #[arg(long, default_value_t = trellis_gateway::rotation::DEFAULT_GRACE.as_secs())]
    key_rotation_grace_seconds: u64,
    /// Write this file once the first plan (tunnels, routes, unreachable backstops) is in
    /// place, and with NetworkPolicy on, the first policy table; the CNI plugin's
    /// `gatewayReadyFile` wires no pod before it exists. Put it on a
    /// tmpfs (e.g. /run/trellis/gateway.ready) so a reboot removes it.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Record flows (every connection of the node's pods, and the packets NetworkPolicy
    /// drops) from the kernel's conntrack events and the policy table's NFLOG, and serve them
    /// to the controller (`trellis observe`). Needs root; without it, or when the kernel
    /// refuses, the gateway runs without flows.
    #[arg(long, default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set)]
    flows: bool,
    /// The CNI conflist the chart installs, as mounted into this container: `GET /node`
    /// (`trellis diagnose`) says whether it is there and the pod MTU in it.
    #[arg(long)]
    cni_conflist: Option<PathBuf>,
    /// How many recent flows the node keeps (the oldest go first, counted in
    /// trellis_flows_buffer_overwritten_total).
    #[arg(long, default_value_t = trellis_gateway::flows::recorder::DEFAULT_CAPACITY)]
    flow_buffer: usize,
}

/// The largest `--flow-buffer`: about a gigabyte of flows at worst.
const MAX_FLOW_BUFFER: usize = 1 << 20;

/// `on` or `off`.
fn parse_switch(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{text:?}: want on or off")),
    }
}

/// `0`/`off` (zero: never), or a duration such as `30d`, `12h` or `1h 30m`.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" || text.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?}: {e} (want 0, off, or a duration such as 30d or 12h)"))
}

/// The PID file `rotate-key` finds the running gateway by.
const PID_FILE: &str = "gateway.pid";

/// `trellis-gateway rotate-key`: signals the gateway running on `state_dir` and waits for the
/// new key. Only the public key is printed.
fn rotate_key(state_dir: &std::path::Path, timeout: Duration) -> anyhow::Result<()> {
    let pid_path = state_dir.join(PID_FILE);
    let pid: i32 = std::fs::read_to_string(&pid_path)
        .with_context(|| format!("read {} (is the gateway running?)", pid_path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no PID", pid_path.display()))?;
    // The PID file may be stale: signal only a trellis-gateway.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "trellis-gateway" {
        bail!(
            "process {pid} (from {}) is not a running trellis-gateway",
            pid_path.display()
        );
    }
    let old = KeyPair::load(state_dir)?.public_key();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .with_context(|| format!("signal the gateway (PID {pid})"))?;
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(new) = KeyPair::load(state_dir).map(|k| k.public_key())
            && new != old
        {
            println!("{new}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "the gateway (PID {pid}) did not rotate its key within {timeout:?}: its log says why (it must be registered with its controller)"
    )
}

impl RunArgs {
    fn validate(&self) -> anyhow::Result<GatewayConfig> {
        if self.interface.is_empty() || self.interface.len() > 15 {
            bail!("--interface must be 1 to 15 characters");
        }
        if !(576..=9000).contains(&self.mtu) {
            bail!("--mtu must be between 576 and 9000");
        }
        if !(1..=1024).contains(&self.batch) {
            bail!("--batch must be between 1 and 1024");
        }
        if self.workers > trellis_gateway::cpus::MAX_WORKERS {
            bail!(
                "--workers must be at most {}",
                trellis_gateway::cpus::MAX_WORKERS
            );
        }
        if self.handshake_rate_limit == 0 {
            bail!("--handshake-rate-limit must be at least 1");
        }
        if self.controller.is_some()
            && (self.node_name.is_none() || self.advertise_endpoint.is_none())
        {
            bail!("--controller needs --node-name and --advertise-endpoint");
        }
        if !(1..=MAX_FLOW_BUFFER).contains(&self.flow_buffer) {
            bail!("--flow-buffer must be between 1 and {MAX_FLOW_BUFFER}");
        }
        if matches!(self.route_protocol, 0..=4 | 255) {
            bail!(
                "--route-protocol {} is reserved by the kernel",
                self.route_protocol
            );
        }
        Ok(GatewayConfig {
            interface: self.interface.clone(),
            listen_port: self.listen_port,
            state_dir: self.state_dir.clone(),
            route_protocol: self.route_protocol,
            route_metrics: RouteMetrics::default(),
            workers: self.workers,
            ready_file: self.ready_file.clone(),
            log_policy_drops: self.flows,
            device: DeviceConfig {
                mtu: self.mtu,
                batch: self.batch,
                handshake_rate_limit: self.handshake_rate_limit,
                offload: !self.no_offload
                    && std::env::var_os("TRELLIS_GATEWAY_NO_OFFLOAD").is_none_or(|v| v != "1"),
                ..DeviceConfig::default()
            },
        })
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => {
            let config = args.validate()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the runtime")?;
            runtime.block_on(run(*args, config))
        }
        Command::PublicKey { state_dir } => {
            println!("{}", KeyPair::load_or_generate(&state_dir)?.public_key());
            Ok(())
        }
        Command::RotateKey {
            state_dir,
            timeout_seconds,
        } => rotate_key(&state_dir, Duration::from_secs(timeout_seconds)),
        Command::PeerConfig(args) => {
            print!("{}", args.render()?);
            Ok(())
        }
    }
}

/// The flow pipeline of this node: named after what it was told at start, recording into a
/// ring of `--flow-buffer` flows.
fn flow_pipeline(args: &RunArgs, gateway: &Gateway) -> Pipeline {
    let names = Names::new(NodeIdentity {
        cluster: args.cluster_id.clone(),
        node: args.node_name.clone(),
        addresses: args
            .advertise_endpoint
            .map(|e| e.ip())
            .into_iter()
            .collect(),
    });
    Pipeline::new(
        std::sync::Arc::new(names),
        std::sync::Arc::new(Recorder::new(args.flow_buffer)),
        gateway.metrics.flows.clone(),
    )
}

/// Records the kernel's events (conntrack, and the policy table's NFLOG drops) into
/// `pipeline`, in the gateway's namespace. Never fatal: without root, or when the kernel
/// refuses, the gateway runs without flows (`trellis_flows_enabled 0`).
fn record_kernel_flows(pipeline: Pipeline) {
    if !nix::unistd::Uid::effective().is_root() {
        tracing::warn!("not root: no flows are recorded (conntrack and NFLOG need it)");
        return;
    }
    trellis_gateway::flows::start_recording(
        pipeline,
        || KernelSources::open(None),
        KernelSources::run,
    );
}

async fn run(args: RunArgs, config: GatewayConfig) -> anyhow::Result<()> {
    let mut gateway = Gateway::start(None, &config).await?;
    let mut device_task = gateway
        .take_device_task()
        .context("device loop not running")?;
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("serve metrics on {}", args.metrics_addr))?;
    tokio::spawn(trellis_gateway::http::serve(
        listener,
        gateway.metrics.clone(),
        Some(trellis_gateway::http::StatusSource {
            node: args.node_name.clone().unwrap_or_default(),
            device: gateway.device().clone(),
        }),
        Some(trellis_gateway::node_report::NodeSource {
            node: args.node_name.clone().unwrap_or_default(),
            interface: args.interface.clone(),
            configured_mtu: args.mtu,
            advertised: args.advertise_endpoint.map(|e| e.ip()),
            cni_conflist: args.cni_conflist.clone(),
        }),
    ));
    // Flows are named from the first plan on, the restored one included.
    let flows = args.flows.then(|| flow_pipeline(&args, &gateway));
    if let Some(pipeline) = &flows {
        gateway.reconciler.flow_names = Some(pipeline.names.clone());
        record_kernel_flows(pipeline.clone());
    }
    // Fail closed and fast after a restart: the last plan's peers (each sent a handshake, so
    // remote gateways switch to the new session at once) and routes, before the source is
    // heard from; and its policy, which replaces the previous process's table (left in the
    // kernel, enforcing, meanwhile) in one transaction.
    let store = PlanStore::in_dir(&config.state_dir);
    gateway.reconciler.restore(&store).await;
    // The registration the controller hears; a new value re-registers (key rotation).
    let mut registration_tx = None;
    let controller = match args.controller {
        Some(address) => {
            let transport = match (&args.agent_ca, &args.agent_cert, &args.agent_key) {
                (Some(ca), Some(cert), Some(key)) => {
                    if let Some(token) = &args.agent_bootstrap_token {
                        let renewer = trellis_agent_client::bootstrap::Renewer {
                            address: address.to_string(),
                            ca: ca.clone(),
                            cert: cert.clone(),
                            key: key.clone(),
                            token: token.clone(),
                            cluster: args.cluster_id.clone(),
                            subject: trellis_agent_client::bootstrap::Subject::Node(
                                args.node_name.clone().context("--node-name")?,
                            ),
                        };
                        // The first certificate before following the controller (the data
                        // plane already runs on the restored plan); then renewals.
                        renewer.first_then_spawn().await;
                    }
                    let tls = std::sync::Arc::new(
                        trellis_agent_client::ClientTls::load(trellis_agent_client::TlsFiles {
                            ca: ca.clone(),
                            cert: cert.clone(),
                            key: key.clone(),
                        })
                        .map_err(|e| {
                            anyhow::anyhow!("agent TLS: {}", trellis_core::error_chain(&e))
                        })?,
                    );
                    let expiry = gateway.metrics.certificate_expiry.clone();
                    tokio::spawn(trellis_agent_client::tls::watch_expiry(
                        tls.clone(),
                        Duration::from_secs(5),
                        move |e| {
                            expiry.with_label_values(&["node"]).set(e.cert);
                            expiry.with_label_values(&["ca"]).set(e.ca);
                        },
                    ));
                    trellis_agent_client::Transport::Tls(tls)
                }
                _ => {
                    tracing::warn!(
                        "no --agent-ca/--agent-cert/--agent-key: the deprecated plaintext agent mode"
                    );
                    trellis_agent_client::Transport::LegacyToken(
                        match &args.controller_token_file {
                            Some(path) => Some(
                                std::fs::read_to_string(path)
                                    .with_context(|| {
                                        format!("read the controller token {}", path.display())
                                    })?
                                    .trim()
                                    .to_string(),
                            ),
                            None => None,
                        },
                    )
                }
            };
            let (tx, registration) = tokio::sync::watch::channel(GatewayRegistration {
                node: args.node_name.clone().context("--node-name")?,
                endpoint: args.advertise_endpoint.context("--advertise-endpoint")?,
                public_key: gateway.public_key,
            });
            // Kept for the process's life: the key rotation sends the new registration here.
            registration_tx = Some(tx);
            Some(ControllerSource {
                address,
                transport,
                registration,
                report_interval: Duration::from_secs(trellis_core::status::REPORT_INTERVAL_SECONDS),
            })
        }
        None => None,
    };
    if let (Some(pipeline), Some(source)) = (&flows, &controller) {
        if let trellis_agent_client::Transport::Tls(tls) = &source.transport {
            pipeline
                .names
                .learn_cluster(tls.material().identity.cluster());
        }
        let config = trellis_agent_client::ClientConfig {
            address: source.address.to_string(),
            transport: source.transport.clone(),
            max_frame: trellis_core::agent::MAX_AGENT_FRAME,
            resync: None,
            report: None,
        };
        tokio::spawn(trellis_gateway::flows::channel::run(
            config,
            args.node_name.clone().context("--node-name")?,
            pipeline.recorder.clone(),
        ));
    }
    // Key rotation: SIGUSR1 (what `rotate-key` sends; only root or this user can signal us,
    // nothing on the network or in a pod) and the schedule.
    let (rotate, rotation_requests) = tokio::sync::mpsc::channel(1);
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            let _ = rotate.try_send(());
        }
    });
    match registration_tx {
        Some(sender) => {
            let rotator = trellis_gateway::rotation::Rotator {
                state_dir: config.state_dir.clone(),
                device: gateway.device().clone(),
                own_keys: gateway.reconciler.own_keys.clone(),
                registration: sender,
                metrics: gateway.metrics.clone(),
                grace: Duration::from_secs(args.key_rotation_grace_seconds),
            };
            let metrics = gateway.metrics.clone();
            tokio::spawn(trellis_gateway::rotation::run(
                rotator,
                Some(args.key_rotation_interval).filter(|i| !i.is_zero()),
                rotation_requests,
                move || metrics.controller_connected(),
            ));
        }
        None => {
            let mut requests = rotation_requests;
            tokio::spawn(async move {
                while requests.recv().await.is_some() {
                    tracing::warn!(
                        "not rotating the WireGuard key: a desired-state source cannot announce a new key to the peers (rotation needs --controller)"
                    );
                }
            });
        }
    }
    let pid_file = config.state_dir.join(PID_FILE);
    if let Err(e) = trellis_files::write_atomically(
        &pid_file,
        format!("{}\n", std::process::id()).as_bytes(),
        0o600,
    ) {
        tracing::warn!(path = %pid_file.display(), "write the PID file (rotate-key finds the gateway by it): {e}");
    }
    if gateway.metrics.antispoof_enabled() {
        let metrics = gateway.metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                match tokio::task::spawn_blocking(|| trellis_gateway::antispoof::dropped(None))
                    .await
                {
                    Ok(Ok(totals)) => metrics.record_spoofed(totals),
                    Ok(Err(e)) => {
                        tracing::debug!("anti-spoofing counters: {}", trellis_gateway::chain(&e))
                    }
                    Err(_) => {}
                }
            }
        });
    }
    if let Some(enforcer) = gateway.reconciler.policy.clone() {
        let metrics = gateway.metrics.policy.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let (enforcer, metrics) = (enforcer.clone(), metrics.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    trellis_gateway::policy::record_drops(&enforcer, &metrics)
                })
                .await;
            }
        });
    }
    let resync = Duration::from_secs(args.resync_seconds.max(1));
    let follow = async {
        if let Some(source) = &controller {
            follow_controller(&gateway.reconciler, source, None, resync).await;
            return;
        }
        match &args.desired_state {
            Some(path) if path.as_os_str() == "-" => {
                let stdin = tokio::io::BufReader::new(tokio::io::stdin());
                follow_stream(
                    &gateway.reconciler,
                    stdin,
                    Duration::from_secs(args.resync_seconds.max(1)),
                )
                .await
            }
            Some(path) => {
                follow_file(
                    &gateway.reconciler,
                    path,
                    Duration::from_secs(1),
                    Duration::from_secs(args.resync_seconds.max(1)),
                )
                .await
            }
            None => std::future::pending().await,
        }
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = follow => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        result = &mut device_task => {
            // The TUN is gone; exit so the supervisor restarts us (backstops hold meanwhile).
            result.context("device loop")??;
            bail!("the device loop stopped");
        }
    }
    // The shutdown order: the last plan on disk first (the writer may be mid-way), so the
    // next start restores it; then the device, whose TUN takes its routes with it and leaves
    // the unreachable backstops: nothing goes out in plaintext while no gateway runs. The
    // policy table stays in the kernel, enforcing, until the next start replaces it.
    gateway.flush_plan().await;
    tracing::info!("stopping; routes to encrypted peers stay unreachable until restart");
    gateway.stop();
    Ok(())
}
