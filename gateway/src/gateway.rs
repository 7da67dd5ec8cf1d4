//! Putting it together: open the TUN and UDP socket in the node's namespace, start the device
//! loop, and reconcile desired states (peers, then routes, then peer removals).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use trellis_core::gateway::{GatewayPlan, GatewayState, TunnelPeer};
use trellis_core::wgkey::PublicKey;
use trellis_netns::{Netlink, Netns, sysctl};

use crate::Error;
use crate::cpus;
use crate::device::{Device, DeviceConfig, DeviceHandle};
use crate::io::{Tun, Udp, open_worker_io};
use crate::keys::{KeyPair, OwnKeys};
use crate::metrics::{Metrics, unix_now};
use crate::plan_store::{PlanStore, StoredPlan};
use crate::policy::{Action, Enforcer, InKernel, IncrementalCompiler, NftKernel, NodePolicy};
use crate::routes::{self, NetlinkRoutes, RouteMetrics, RouteTable};
use crate::steering::SteeringControl;

/// The routing protocol number tagging the gateway's routes (`ip route show proto 212`).
pub const DEFAULT_ROUTE_PROTOCOL: u8 = 212;

/// The gateway's settings, validated by the binary before start.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub interface: String,
    pub listen_port: u16,
    pub state_dir: PathBuf,
    pub route_protocol: u8,
    pub route_metrics: RouteMetrics,
    pub device: DeviceConfig,
    /// Device workers, one TUN queue and socket each; 0 means one per CPU.
    pub workers: usize,
    /// Written once the first plan is applied (restored or from the source); on a tmpfs
    /// (`/run`) so a reboot removes it. The CNI plugin refuses to wire pods until it exists.
    pub ready_file: Option<PathBuf>,
    /// The policy table logs every packet it drops to NFLOG (the flows' DROPPED records).
    pub log_policy_drops: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            interface: "trellis0".into(),
            listen_port: 51820,
            state_dir: "/var/lib/trellis-gateway".into(),
            route_protocol: DEFAULT_ROUTE_PROTOCOL,
            route_metrics: RouteMetrics::default(),
            device: DeviceConfig::default(),
            workers: 0,
            ready_file: None,
            log_policy_drops: false,
        }
    }
}

/// Applies desired states: peers first, then routes, then peer removals, so a CIDR switched
/// to the tunnel always finds its peer there, and a peer leaves only after no route uses it.
pub struct Reconciler<R: RouteTable> {
    /// This gateway's public keys (two during a key rotation): a plan entry with one is left
    /// out, the rest of the plan applied.
    pub own_keys: OwnKeys,
    /// The entries the last plan applied left out, so each is logged and counted once.
    pub refused: std::sync::Mutex<Vec<RefusedPeer>>,
    pub device: DeviceHandle,
    pub routes: R,
    pub tun_index: u32,
    pub route_metrics: RouteMetrics,
    pub metrics: Metrics,
    /// Where each plan applied goes to be stored (see [`crate::plan_store`]); `None` keeps
    /// nothing.
    pub saved: Option<tokio::sync::watch::Sender<Option<StoredPlan>>>,
    /// Written once the first plan is applied, for the CNI plugin (`gatewayReadyFile`), which
    /// wires no pod before it exists: see [`GatewayConfig::ready_file`].
    pub ready_file: Option<ReadyFile>,
    /// Keeps the node's policy table equal to the desired policy; `None` leaves policy alone.
    pub policy: Option<SharedEnforcer>,
    /// The names flows are given, renewed with each desired state applied; `None` while the
    /// node records no flows.
    pub flow_names: Option<std::sync::Arc<crate::flows::Names>>,
}

/// The node's policy [`Enforcer`], used from blocking tasks (`nft` runs a process).
pub type SharedEnforcer = std::sync::Arc<std::sync::Mutex<Enforcer>>;

/// What the status report says of the policy in the kernel (drop counts filled in later).
fn policy_report(in_kernel: &InKernel) -> Option<trellis_core::status::PolicyReport> {
    let InKernel::Enforced(applied) = in_kernel else {
        return None;
    };
    Some(trellis_core::status::PolicyReport {
        revision: applied.revision,
        digest: applied.digest.clone(),
        local_pods: applied.ruleset.local_pods.iter().copied().collect(),
        rules: applied.ruleset.rule_count(),
        dropped_ingress: 0,
        dropped_egress: 0,
    })
}

/// A plan entry that does not become a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPeer {
    pub name: String,
    pub public_key: PublicKey,
    /// `own_key` or `duplicate_key`: the label of `trellis_gateway_plan_peers_refused_total`.
    pub reason: &'static str,
}

/// Pure: the peers of a plan this gateway may have, and the entries left out. An entry with
/// one of its own keys is left out (a gateway cannot peer with itself; the controller should
/// never send one, but a peer cluster could announce it). Of entries sharing a key (which
/// the controller should refuse too) the first by name is kept, whatever the order of the
/// plan. The order of the rest is kept. Routes are not touched: a CIDR routed into the
/// tunnel with no peer left for it is dropped by the device, never sent in plaintext.
pub fn screen_peers(
    peers: &[TunnelPeer],
    is_own: impl Fn(&PublicKey) -> bool,
) -> (Vec<TunnelPeer>, Vec<RefusedPeer>) {
    let mut first_by_key: std::collections::HashMap<PublicKey, &str> =
        std::collections::HashMap::new();
    for peer in peers {
        let first = first_by_key.entry(peer.public_key).or_insert(&peer.name);
        if peer.name.as_str() < *first {
            *first = &peer.name;
        }
    }
    let mut kept = Vec::with_capacity(peers.len());
    let mut refused = Vec::new();
    let mut taken = std::collections::HashSet::new();
    for peer in peers {
        let reason = if is_own(&peer.public_key) {
            Some("own_key")
        } else if first_by_key.get(&peer.public_key) != Some(&peer.name.as_str())
            || !taken.insert(peer.public_key)
        {
            Some("duplicate_key")
        } else {
            None
        };
        match reason {
            Some(reason) => refused.push(RefusedPeer {
                name: peer.name.clone(),
                public_key: peer.public_key,
                reason,
            }),
            None => kept.push(peer.clone()),
        }
    }
    (kept, refused)
}

/// The node's "tunnels and backstops are in place" marker.
#[derive(Debug)]
pub struct ReadyFile {
    pub path: PathBuf,
    written: std::sync::atomic::AtomicBool,
}

impl ReadyFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            written: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Writes the marker unless done already; a failure is logged and tried again with the
    /// next plan (meanwhile the CNI plugin keeps refusing pods, which is the safe side).
    fn mark(&self, revision: u64) {
        use std::sync::atomic::Ordering;
        if self.written.load(Ordering::Relaxed) {
            return;
        }
        let written = self
            .path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                trellis_files::write_atomically(
                    &self.path,
                    format!("revision {revision}\n").as_bytes(),
                    0o600,
                )
            });
        match written {
            Ok(()) => {
                self.written.store(true, Ordering::Relaxed);
                tracing::info!(path = %self.path.display(), "plan in place: pods may be wired");
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "write the ready file: {}", trellis_core::error_chain(&e))
            }
        }
    }
}

impl<R: RouteTable> Reconciler<R> {
    /// Brings peers and routes to `state`. Idempotent: run it again to repair drift or
    /// retry failures. An invalid state changes nothing.
    pub async fn apply(&self, state: &GatewayState) -> Result<(), Error> {
        match state.validate() {
            Ok(()) => {
                if let Some(names) = &self.flow_names {
                    names.learn_cluster(&state.cluster);
                }
                self.apply_plan(&state.plan()).await
            }
            Err(invalid) => {
                self.metrics.reconcile_errors.inc();
                Err(invalid.into())
            }
        }
    }

    /// Brings peers and routes to `plan`, with no policy (a desired-state file has none).
    pub async fn apply_plan(&self, plan: &GatewayPlan) -> Result<(), Error> {
        self.apply_desired(plan, None).await
    }

    /// Brings the node's policy table, peers and routes to the desired state, whatever its
    /// source: the policy first (on a node that enforces policy, a pod's rules matter before
    /// its routes), then the plan, each whatever the other's outcome. Ready once both are in
    /// place.
    pub async fn apply_desired(
        &self,
        plan: &GatewayPlan,
        policy: Option<&NodePolicy>,
    ) -> Result<(), Error> {
        let enforced = self.enforce_policy(plan.revision, policy).await;
        if let Err(e) = &enforced {
            tracing::warn!(
                revision = plan.revision,
                "the policy table keeps its previous rules: {}",
                trellis_core::error_chain(e)
            );
        }
        let result = self.apply_inner(plan).await;
        // Flows are named after what the node was told, whether or not it is all in place;
        // a large mesh's directory is built off the async threads.
        if let Some(names) = &self.flow_names
            && let Some(policy) = policy
        {
            names.learn_node(&policy.node);
        }
        if let Some(names) = &self.flow_names
            && !names.is_current(plan, policy.map(|p| &p.inputs))
        {
            let names = names.clone();
            let plan = plan.clone();
            let inputs = policy.map(|p| std::sync::Arc::new(p.inputs.clone()));
            if tokio::task::spawn_blocking(move || names.replace(&plan, inputs))
                .await
                .is_err()
            {
                tracing::warn!("building the flows' directory failed; flows keep the last names");
            }
        }
        match &result {
            Ok(()) => {
                self.metrics.last_reconcile.set(unix_now());
                self.metrics
                    .state_revision
                    .set(i64::try_from(plan.revision).unwrap_or(i64::MAX));
                self.metrics.plan_restored.set(0);
                if enforced.is_ok() {
                    self.metrics.ready.set(1);
                    if let Some(ready_file) = &self.ready_file {
                        ready_file.mark(plan.revision);
                    }
                }
                if let Some(saved) = &self.saved {
                    saved.send_if_modified(|stored| {
                        let same = stored
                            .as_ref()
                            .is_some_and(|s| s.plan == *plan && s.policy.as_ref() == policy);
                        if !same {
                            *stored = Some(StoredPlan {
                                plan: plan.clone(),
                                policy: policy.cloned(),
                            });
                        }
                        !same
                    });
                }
            }
            Err(_) => self.metrics.reconcile_errors.inc(),
        }
        result.and(enforced)
    }

    /// Brings the policy table to `policy` (see [`Enforcer::enforce`]), off the async threads.
    async fn enforce_policy(
        &self,
        revision: u64,
        policy: Option<&NodePolicy>,
    ) -> Result<(), Error> {
        let Some(enforcer) = &self.policy else {
            return Ok(());
        };
        let enforcer = enforcer.clone();
        let policy = policy.cloned();
        let metrics = self.metrics.policy.clone();
        tokio::task::spawn_blocking(move || {
            let mut enforcer = enforcer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match enforcer.enforce(revision, policy.as_ref()) {
                Ok(outcome) => {
                    let changed = outcome.action != Action::Unchanged;
                    metrics.applied(
                        changed.then_some(outcome.seconds),
                        policy_report(enforcer.in_kernel()),
                    );
                    if changed {
                        tracing::info!(
                            revision,
                            action = ?outcome.action,
                            milliseconds = outcome.seconds * 1e3,
                            "policy table changed"
                        );
                    }
                    Ok(())
                }
                Err(e) => {
                    metrics.failed();
                    Err(Error::Policy(e))
                }
            }
        })
        .await
        .map_err(|_| Error::PolicyTask)?
    }

    /// Applies the plan stored by the last run, before the gateway hears from its source: the
    /// peers (each sent a handshake at once) and routes are back within moments of a restart.
    /// The source's first plan replaces it as any plan does. A missing or unreadable file
    /// changes nothing (logged).
    pub async fn restore(&self, store: &PlanStore) -> Option<u64> {
        let stored = match store.load() {
            Ok(Some(stored)) => stored,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!("not restoring the last plan: {}", crate::chain(&e));
                return None;
            }
        };
        // The plan is on disk already: record it as stored without waking the writer, so
        // applying it does not write it again.
        if let Some(saved) = &self.saved {
            saved.send_if_modified(|slot| {
                *slot = Some(stored.clone());
                false
            });
        }
        let plan = &stored.plan;
        match self.apply_desired(plan, stored.policy.as_ref()).await {
            Ok(()) => {
                self.metrics.plan_restored.set(1);
                tracing::info!(
                    revision = plan.revision,
                    peers = plan.peers.len(),
                    routes = plan.routes.len(),
                    policy = stored.policy.is_some(),
                    "restored the last plan"
                );
                Some(plan.revision)
            }
            Err(e) => {
                tracing::warn!("restore the last plan: {}", trellis_core::error_chain(&e));
                None
            }
        }
    }

    /// Logs and counts each refused entry that the last plan did not already refuse.
    fn note_refused(&self, refused: Vec<RefusedPeer>) {
        let mut last = self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for entry in refused.iter().filter(|r| !last.contains(r)) {
            self.metrics.plan_peer_refused(entry.reason);
            match entry.reason {
                "own_key" => tracing::warn!(
                    peer = %entry.name,
                    key = %entry.public_key,
                    "the plan gives a node this gateway's own public key: not a peer; the rest of the plan applies"
                ),
                _ => tracing::warn!(
                    peer = %entry.name,
                    key = %entry.public_key,
                    "the plan gives this public key to more than one node: only the first by name is a peer"
                ),
            }
        }
        *last = refused;
    }

    async fn apply_inner(&self, plan: &GatewayPlan) -> Result<(), Error> {
        let (peers, refused) = screen_peers(&plan.peers, |key| self.own_keys.contains(key));
        self.note_refused(refused);
        self.device.set_peers(peers.clone(), false).await?;
        let desired = routes::desired_routes(&plan.routes, self.tun_index, self.route_metrics);
        let current = self.routes.list().await?;
        let ops = routes::plan(&current, &desired);
        if !ops.is_empty() {
            tracing::info!(
                changes = ops.len(),
                revision = plan.revision,
                "updating routes"
            );
        }
        routes::apply(&self.routes, &ops).await?;
        self.metrics.routes.set(desired.len() as i64);
        // Only once every route is right: a peer leaves after the last route using it.
        self.device.set_peers(peers, true).await
    }
}

/// A running gateway.
pub struct Gateway {
    pub public_key: PublicKey,
    pub listen_port: u16,
    pub metrics: Metrics,
    pub reconciler: Reconciler<NetlinkRoutes>,
    device_task: Option<JoinHandle<Result<(), Error>>>,
    /// The task storing each applied plan ([`PlanStore::spawn_writer`]).
    plan_writer: Option<JoinHandle<()>>,
    /// Stops the device loop (dropping it does too).
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Gateway {
    /// Loads (or creates) the key, opens the TUN and the UDP socket inside `netns` (or the
    /// current namespace), brings the TUN up and starts the device loop. Call inside a
    /// multi-threaded tokio runtime.
    pub async fn start(netns: Option<&Netns>, config: &GatewayConfig) -> Result<Self, Error> {
        let keys = KeyPair::load_or_generate(&config.state_dir)?;
        // A rotation this process did not finish: the new key is stored and is the one used.
        crate::keys::forget_previous(&config.state_dir);
        let metrics = Metrics::new()?;
        let public_key = keys.public_key();
        // One worker per CPU, each on a thread of its own pinned to the CPUs whose packets the
        // kernel steers to its TUN queue and socket, with a single-threaded runtime whose
        // reactor holds just those: a packet's wake-up stays on the CPU that handled it, and
        // no packet hops between threads. Under bulk load the first worker takes everything
        // (see `cpus::ModePolicy`).
        let allowed = cpus::allowed();
        let anywhere = allowed.clone();
        let wanted = match config.workers {
            0 => cpus::default_workers(&allowed),
            n => n,
        };
        let opened = open_worker_io(
            netns,
            &config.interface,
            config.device.mtu,
            config.listen_port,
            config.device.offload,
            wanted,
        )?;
        if opened.layout.refused.is_some() {
            metrics.steering_refused.inc();
        }
        let count = opened.workers.len();
        metrics.workers.set(count as i64);
        let listen_port = opened.workers[0]
            .local_port()
            .map_err(|source| Error::BindUdp {
                addr: ([0, 0, 0, 0], config.listen_port).into(),
                source,
            })?;
        let (opened_first, opening) = tokio::sync::oneshot::channel();
        let (finished, done) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopping) = tokio::sync::oneshot::channel();
        let switch = opened.switch;
        let mut ios = opened.workers.into_iter();
        let first_io = ios.next().ok_or(Error::DeviceStopped)?;
        let siblings_io: Vec<_> = ios.collect();
        let device_config = config.device.clone();
        let device_metrics = metrics.clone();
        let home = move |index| cpus::for_worker(&allowed, count, index);
        let first_home = home(0);
        spawn_worker(0, first_home.clone(), finished.clone(), move || {
            let (tun, udp) = first_io.into_async()?;
            let (mut device, handle) = Device::new(tun, udp, keys, device_metrics, device_config);
            if let Some(switch) = switch {
                device = device.steered(SteeringControl {
                    switch: Box::new(switch),
                    // This closure runs on the first worker's own thread.
                    first: nix::unistd::gettid(),
                    home: first_home,
                    anywhere,
                });
            }
            for (i, io) in siblings_io.into_iter().enumerate() {
                let index = i + 1;
                let sibling = device.sibling();
                spawn_worker(index, home(index), finished.clone(), move || {
                    let (tun, udp) = io.into_async()?;
                    Ok(sibling.attach(tun, udp))
                })?;
            }
            let _ = opened_first.send(handle);
            Ok(device.stop_on(stopping))
        })?;
        let handle = match opening.await {
            Ok(handle) => handle,
            Err(_) => {
                let mut done = done;
                return Err(done
                    .recv()
                    .await
                    .and_then(Result::err)
                    .unwrap_or(Error::DeviceStopped));
            }
        };
        let netlink = match netns {
            Some(netns) => Netlink::connect_in(netns)?,
            None => Netlink::connect()?,
        };
        let link = netlink.require_link(&config.interface).await?;
        netlink.set_up(link.index).await?;
        // No reverse-path filter on the TUN: every decrypted packet's source is already checked
        // against its peer's allowed IPs, which is stricter. Even loose filtering would drop a
        // node's own address arriving here (Service traffic kube-proxy masqueraded to the node,
        // forwarded to a pod on this node), because the TUN has no address of its own.
        let key = format!("net/ipv4/conf/{}/rp_filter", config.interface);
        if let Err(e) = sysctl::write(netns, &key, "0") {
            tracing::warn!("{}", trellis_core::error_chain(&e));
        }
        match crate::antispoof::install(netns, trellis_core::POD_VETH_PREFIX) {
            Ok(()) => metrics.antispoof_enabled.set(1),
            Err(e) => tracing::warn!(
                "pods can send with other sources: anti-spoofing rules not installed: {}",
                crate::chain(&e)
            ),
        }
        // The kernel applies the larger of `all` and the interface's value.
        if let Ok(all) = sysctl::read(netns, "net/ipv4/conf/all/rp_filter")
            && all.trim() != "0"
        {
            tracing::warn!(
                all = all.trim(),
                "net.ipv4.conf.all.rp_filter is on: node-sourced traffic through {} may be dropped; set it to 0",
                config.interface
            );
        }
        // The first worker to end ends the device: the others stop with the first, and a
        // sibling that failed leaves its CPU's packets unread.
        let mut done = done;
        let device_task =
            tokio::spawn(async move { done.recv().await.unwrap_or(Err(Error::DeviceStopped)) });
        let (saved, plan_writer) = PlanStore::in_dir(&config.state_dir).spawn_writer();
        tracing::info!(
            interface = %config.interface,
            port = listen_port,
            key = %public_key,
            "gateway up"
        );
        Ok(Self {
            public_key,
            listen_port,
            metrics: metrics.clone(),
            reconciler: Reconciler {
                own_keys: OwnKeys::new(public_key),
                refused: Default::default(),
                device: handle,
                routes: NetlinkRoutes {
                    netlink,
                    protocol: config.route_protocol,
                },
                tun_index: link.index,
                route_metrics: config.route_metrics,
                metrics,
                saved: Some(saved),
                ready_file: config.ready_file.clone().map(ReadyFile::new),
                policy: Some(std::sync::Arc::new(std::sync::Mutex::new(
                    Enforcer::new(
                        Box::<IncrementalCompiler>::default(),
                        Box::new(NftKernel {
                            netns: netns
                                .map(Netns::try_clone)
                                .transpose()?
                                .map(std::sync::Arc::new),
                        }),
                    )
                    .log_drops(config.log_policy_drops),
                ))),
                flow_names: None,
            },
            device_task: Some(device_task),
            plan_writer: Some(plan_writer),
            stop,
        })
    }

    pub fn device(&self) -> &DeviceHandle {
        &self.reconciler.device
    }

    /// The device loop's task, to watch for it ending on its own (its TUN failed): the
    /// process should then exit and be restarted. `None` after the first call.
    pub fn take_device_task(&mut self) -> Option<JoinHandle<Result<(), Error>>> {
        self.device_task.take()
    }

    /// Stores the last plan applied if the writer has not yet (it writes what it has not and
    /// ends once its channel closes); call before [`Self::stop`], so the next start restores
    /// it. Plans applied after this are not stored.
    pub async fn flush_plan(&mut self) {
        self.reconciler.saved = None;
        if let Some(writer) = self.plan_writer.take()
            && tokio::time::timeout(Duration::from_secs(5), writer)
                .await
                .is_err()
        {
            tracing::warn!("the last plan was not stored within 5 s");
        }
    }

    /// Stops the device loop; the TUN (and with it the tunnel routes) goes away, the
    /// unreachable backstops stay.
    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// Runs one device worker on a thread of its own, pinned to `home` (anywhere when empty), with
/// a single-threaded runtime: `build` makes the worker inside that runtime (registering its I/O with it), and
/// how the worker ends (or why it could not start) goes to `finished`.
fn spawn_worker<T, U, B>(
    index: usize,
    home: Vec<usize>,
    finished: tokio::sync::mpsc::UnboundedSender<Result<(), Error>>,
    build: B,
) -> Result<(), Error>
where
    T: Tun + 'static,
    U: Udp + 'static,
    B: FnOnce() -> Result<Device<T, U>, Error> + Send + 'static,
{
    std::thread::Builder::new()
        .name(format!("trellis-device-{index}"))
        .spawn(move || {
            if let Err(e) = cpus::pin_current_thread(&home) {
                tracing::warn!(
                    worker = index,
                    "pinning to CPUs {home:?}: {}",
                    trellis_core::error_chain(&e)
                );
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = finished.send(Err(Error::DeviceRuntime(e)));
                    return;
                }
            };
            let result = runtime.block_on(async move { build()?.run().await });
            if let Err(e) = &result {
                tracing::error!(
                    worker = index,
                    "device worker stopped: {}",
                    trellis_core::error_chain(&e)
                );
            }
            let _ = finished.send(result);
        })
        .map_err(Error::DeviceRuntime)?;
    Ok(())
}

/// Parses a desired state (JSON) from text; the file is read at the edge.
pub fn parse_state(text: &str, path: &Path) -> Result<GatewayState, Error> {
    let state: GatewayState = serde_json::from_str(text).map_err(|source| Error::ParseState {
        path: path.to_path_buf(),
        source,
    })?;
    state.validate()?;
    Ok(state)
}

pub fn read_state(path: &Path) -> Result<GatewayState, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadState {
        path: path.to_path_buf(),
        source,
    })?;
    parse_state(&text, path)
}

/// Follows a desired-state file: applies it when it changes and re-applies it every
/// `resync` (repairing drift, retrying failures). A missing or broken file keeps the last
/// good state running: the data plane never depends on its source being there.
pub async fn follow_file<R: RouteTable>(
    reconciler: &Reconciler<R>,
    path: &Path,
    poll: Duration,
    resync: Duration,
) {
    let mut last_seen: Option<(SystemTime, u64)> = None;
    let mut current: Option<GatewayState> = None;
    let mut last_apply = tokio::time::Instant::now();
    let mut ok = false;
    loop {
        let stamp = std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp.is_some() && stamp != last_seen {
            last_seen = stamp;
            match read_state(path) {
                Ok(state) => {
                    if current.as_ref() != Some(&state) {
                        current = Some(state);
                        ok = false;
                    }
                }
                Err(e) => tracing::warn!(
                    "keeping the last desired state: {}",
                    trellis_core::error_chain(&e)
                ),
            }
        }
        if let Some(state) = &current
            && (!ok || last_apply.elapsed() >= resync)
        {
            last_apply = tokio::time::Instant::now();
            match reconciler.apply(state).await {
                Ok(()) => ok = true,
                Err(e) => {
                    ok = false;
                    tracing::warn!(
                        "apply desired state revision {}: {}",
                        state.revision,
                        trellis_core::error_chain(&e)
                    );
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// Follows a stream of desired states, one JSON document per line (what a controller can
/// pipe to `--desired-state -`). Each valid line is applied; a bad line is logged and skipped.
/// The last good state is re-applied every `resync`, also after the stream ends: the data
/// plane outlives its source.
pub async fn follow_stream<R, S>(reconciler: &Reconciler<R>, stream: S, resync: Duration)
where
    R: RouteTable,
    S: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    let mut lines = stream.lines();
    let mut current: Option<GatewayState> = None;
    let mut open = true;
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            line = lines.next_line(), if open => match line {
                Ok(Some(line)) if line.trim().is_empty() => {}
                Ok(Some(line)) => match parse_state(&line, Path::new("<stream>")) {
                    Ok(state) => {
                        if let Err(e) = reconciler.apply(&state).await {
                            tracing::warn!("apply desired state revision {}: {}", state.revision, trellis_core::error_chain(&e));
                        }
                        current = Some(state);
                    }
                    Err(e) => tracing::warn!("keeping the last desired state: {}", trellis_core::error_chain(&e)),
                },
                Ok(None) | Err(_) => {
                    tracing::warn!("desired-state stream ended; keeping the last state");
                    open = false;
                }
            },
            _ = tick.tick() => {
                if let Some(state) = &current
                    && let Err(e) = reconciler.apply(state).await
                {
                    tracing::warn!("re-apply desired state revision {}: {}", state.revision, trellis_core::error_chain(&e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use trellis_core::gateway::{RemoteNode, TunnelPeer};
    use trellis_netns::{OwnedRoute, RouteTarget};

    use super::*;
    use crate::device::tests::{FakeNet, start};

    /// Records each route operation with the peers the device had at that moment.
    struct WatchingTable {
        device: DeviceHandle,
        routes: Mutex<Vec<OwnedRoute>>,
        seen: Mutex<Vec<(OwnedRoute, bool, usize)>>,
        fail_plain: bool,
    }

    impl RouteTable for WatchingTable {
        async fn list(&self) -> Result<Vec<OwnedRoute>, Error> {
            Ok(self.routes.lock().unwrap().clone())
        }
        async fn replace(&self, route: &OwnedRoute) -> Result<(), Error> {
            let peers = self.device.stats().await?.len();
            self.seen.lock().unwrap().push((*route, true, peers));
            if self.fail_plain && matches!(route.target, RouteTarget::Gateway(_)) {
                return Err(Error::Routes(Vec::new()));
            }
            let mut routes = self.routes.lock().unwrap();
            routes.retain(|r| (r.destination, r.metric) != (route.destination, route.metric));
            routes.push(*route);
            Ok(())
        }
        async fn delete(&self, route: &OwnedRoute) -> Result<(), Error> {
            let peers = self.device.stats().await?.len();
            self.seen.lock().unwrap().push((*route, false, peers));
            self.routes.lock().unwrap().retain(|r| r != route);
            Ok(())
        }
    }

    fn state(encrypted: bool, key: PublicKey) -> GatewayState {
        GatewayState {
            revision: 1,
            cluster: "c1".into(),
            nodes: vec![RemoteNode {
                name: "c1/b".into(),
                cluster: "c1".into(),
                public_key: key,
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                node_ip: Some("198.18.0.2".parse().unwrap()),
                pod_cidrs: vec!["10.2.0.0/24".parse().unwrap()],
                encrypted,
                persistent_keepalive: None,
            }],
        }
    }

    fn reconciler(fail_plain: bool) -> Reconciler<WatchingTable> {
        let node = start(&FakeNet::default(), "198.18.0.1:51820");
        Reconciler {
            own_keys: OwnKeys::new(PublicKey([0xaa; 32])),
            refused: Default::default(),
            routes: WatchingTable {
                device: node.handle.clone(),
                routes: Mutex::new(Vec::new()),
                seen: Mutex::new(Vec::new()),
                fail_plain,
            },
            device: node.handle,
            tun_index: 7,
            route_metrics: RouteMetrics::default(),
            metrics: node.metrics,
            saved: None,
            ready_file: None,
            policy: None,
            flow_names: None,
        }
    }

    #[tokio::test]
    async fn the_peer_exists_before_any_route_points_at_the_tunnel_and_leaves_after_the_last() {
        let r = reconciler(false);
        let key = PublicKey([9; 32]);
        let with_peer = |seen: &[(OwnedRoute, bool, usize)]| {
            !seen.is_empty() && seen.iter().all(|(_, _, peers)| *peers == 1)
        };
        r.apply(&state(true, key)).await.unwrap();
        let seen = std::mem::take(&mut *r.routes.seen.lock().unwrap());
        assert!(
            with_peer(&seen),
            "every route added with the peer in place: {seen:?}"
        );

        // Off: routed plainly, and the peer stays, for the node that has not switched yet.
        r.apply(&state(false, key)).await.unwrap();
        let seen = std::mem::take(&mut *r.routes.seen.lock().unwrap());
        assert!(with_peer(&seen), "{seen:?}");
        assert_eq!(r.device.stats().await.unwrap().len(), 1);
        let routes = r.routes.routes.lock().unwrap().clone();
        assert!(
            routes.iter().all(|r| r.target != RouteTarget::Device(7)),
            "nothing into the tunnel: {routes:?}"
        );

        // The node leaves: its routes go while the peer is still there, then the peer.
        let mut gone = state(true, key);
        gone.nodes.clear();
        r.apply(&gone).await.unwrap();
        let seen = std::mem::take(&mut *r.routes.seen.lock().unwrap());
        assert!(
            with_peer(&seen),
            "every route removed before the peer: {seen:?}"
        );
        assert!(seen.iter().all(|(_, added, _)| !added), "{seen:?}");
        assert!(r.device.stats().await.unwrap().is_empty(), "then it goes");
        let text = r.metrics.render();
        assert!(text.contains("trellis_gateway_routes 0"), "{text}");
    }

    #[tokio::test]
    async fn the_ready_file_appears_with_the_first_applied_plan_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/trellis/gateway.ready");
        let mut r = reconciler(false);
        r.ready_file = Some(ReadyFile::new(path.clone()));
        let mut bad = state(true, PublicKey([9; 32]));
        bad.nodes.push(bad.nodes[0].clone());
        assert!(r.apply(&bad).await.is_err());
        assert!(!path.exists(), "no plan in place, no marker");
        r.apply(&state(true, PublicKey([9; 32]))).await.unwrap();
        assert!(path.exists());
        assert!(r.metrics.is_ready());
    }

    #[tokio::test]
    async fn with_policy_on_readiness_waits_for_the_first_policy_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.ready");
        let kernel = crate::policy::fake::FakeKernel::default();
        let mut r = reconciler(false);
        r.ready_file = Some(ReadyFile::new(path.clone()));
        r.policy = Some(std::sync::Arc::new(std::sync::Mutex::new(Enforcer::new(
            Box::<IncrementalCompiler>::default(),
            Box::new(kernel.clone()),
        ))));
        let (saved, _writer) = PlanStore::in_dir(dir.path()).spawn_writer();
        let mut stored = saved.subscribe();
        r.saved = Some(saved);
        let plan = state(true, PublicKey([9; 32])).plan();
        let policy = crate::policy::tests::inputs(&["10.0.0.2"]);
        *kernel.fail.lock().unwrap() = 1;
        assert!(matches!(
            r.apply_desired(&plan, Some(&policy)).await,
            Err(Error::Policy(_))
        ));
        assert_eq!(r.device.stats().await.unwrap().len(), 1, "the plan applied");
        assert!(
            !r.metrics.is_ready() && !path.exists(),
            "not ready without the policy"
        );
        assert_eq!(r.metrics.policy.failures(), 1);
        assert_eq!(r.metrics.policy.report(), None);
        // What is stored is the desired state, plan and policy, to restore after a restart.
        assert_eq!(
            stored
                .borrow_and_update()
                .as_ref()
                .and_then(|s| s.policy.clone()),
            Some(policy.clone())
        );
        // The retry (a resync) puts the table in place: ready.
        r.apply_desired(&plan, Some(&policy)).await.unwrap();
        assert!(r.metrics.is_ready() && path.exists());
        let report = r.metrics.policy.report().unwrap();
        assert_eq!(report.digest, policy.inputs.digest());
        assert_eq!(
            report.local_pods,
            ["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        let text = r.metrics.render();
        assert!(text.contains("trellis_policy_enabled 1"), "{text}");
        assert!(
            text.contains("trellis_policy_apply_duration_seconds_count 1"),
            "{text}"
        );
        // A file source (no policy) removes the table.
        r.apply_plan(&plan).await.unwrap();
        assert_eq!(
            kernel.take().last().unwrap(),
            &trellis_core::policy::nft::render_delete()
        );
        assert!(r.metrics.render().contains("trellis_policy_enabled 0"));
    }

    #[tokio::test]
    async fn each_desired_state_applied_renames_flows_and_a_resync_keeps_the_names() {
        let mut r = reconciler(false);
        let names = std::sync::Arc::new(crate::flows::Names::new(
            crate::flows::directory::NodeIdentity {
                cluster: None,
                node: None,
                addresses: vec![],
            },
        ));
        r.flow_names = Some(names.clone());
        let state = state(true, PublicKey([9; 32]));
        r.apply(&state).await.unwrap();
        let first = names.directory();
        assert_eq!(first.node_name(), "c1/unknown", "the file's cluster");
        let b = first.lookup("10.2.0.9".parse().unwrap());
        assert_eq!(b.endpoint.display_name(), "c1/b");
        assert!(b.path.encrypted);
        r.apply(&state).await.unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&first, &names.directory()),
            "a resync keeps the directory (and its policy cache)"
        );
        let policy = crate::policy::tests::inputs(&["10.0.0.2"]);
        r.apply_desired(&state.plan(), Some(&policy)).await.unwrap();
        assert_eq!(names.directory().node_name(), "c1/n1", "the policy's node");
        assert_eq!(
            names.directory().local_pods(),
            ["10.0.0.2".parse().unwrap()].into_iter().collect()
        );
    }

    fn remote(name: &str, key: PublicKey, cidr: &str) -> RemoteNode {
        RemoteNode {
            name: name.into(),
            cluster: "c2".into(),
            public_key: key,
            endpoint: Some("198.18.1.9:51820".parse().unwrap()),
            node_ip: Some("198.18.1.9".parse().unwrap()),
            pod_cidrs: vec![cidr.parse().unwrap()],
            encrypted: true,
            persistent_keepalive: None,
        }
    }

    #[tokio::test]
    async fn a_plan_listing_the_gateways_own_key_drops_that_entry_and_applies_the_rest() {
        let r = reconciler(false);
        let key = PublicKey([9; 32]);
        r.apply(&state(true, key)).await.unwrap();
        // The next plan switches c1/b to plain (the encryption toggle), adds a new peer, and a
        // peer cluster announces this gateway's own key for one of its nodes.
        let mut next = state(false, key);
        next.revision = 2;
        next.nodes
            .push(remote("c2/own", r.own_keys.current(), "10.9.0.0/24"));
        next.nodes
            .push(remote("c2/new", PublicKey([7; 32]), "10.8.0.0/24"));
        r.apply(&next).await.unwrap();
        let peers: Vec<_> = r
            .device
            .stats()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            peers,
            ["c1/b", "c2/new"],
            "the rest applied, the own key left out"
        );
        let routes = r.routes.routes.lock().unwrap().clone();
        let to = |cidr: &str| {
            let cidr: ipnet::IpNet = cidr.parse().unwrap();
            routes
                .iter()
                .filter(|r| r.destination == cidr)
                .map(|r| r.target)
                .collect::<Vec<_>>()
        };
        assert!(
            !to("10.2.0.0/24").contains(&RouteTarget::Device(7)),
            "the toggle took effect: {routes:?}"
        );
        assert!(to("10.8.0.0/24").contains(&RouteTarget::Device(7)));
        assert_eq!(r.metrics.state_revision.get(), 2);
        let refused = r#"trellis_gateway_plan_peers_refused_total{reason="own_key"} 1"#;
        assert!(
            r.metrics.render().contains(refused),
            "{}",
            r.metrics.render()
        );
        // Applied again (a resync), the same refusal is not counted twice.
        r.apply(&next).await.unwrap();
        assert!(r.metrics.render().contains(refused));
        assert_eq!(r.metrics.reconcile_errors.get(), 0);
    }

    #[tokio::test]
    async fn a_plan_with_one_key_twice_keeps_the_first_by_name_whatever_the_order() {
        let r = reconciler(false);
        let key = PublicKey([9; 32]);
        let twice = |first: &str, second: &str| GatewayPlan {
            revision: 3,
            peers: [first, second]
                .iter()
                .enumerate()
                .map(|(i, name)| TunnelPeer {
                    name: (*name).into(),
                    public_key: key,
                    endpoint: Some("198.18.1.9:51820".parse().unwrap()),
                    allowed_ips: vec![format!("10.{}.0.0/24", 5 + i).parse().unwrap()],
                    persistent_keepalive: None,
                    preshared_key: None,
                })
                .chain(std::iter::once(TunnelPeer {
                    name: "c2/other".into(),
                    public_key: PublicKey([6; 32]),
                    endpoint: Some("198.18.1.10:51820".parse().unwrap()),
                    allowed_ips: vec!["10.7.0.0/24".parse().unwrap()],
                    persistent_keepalive: None,
                    preshared_key: None,
                }))
                .collect(),
            routes: Default::default(),
        };
        for plan in [twice("c2/a", "c2/b"), twice("c2/b", "c2/a")] {
            r.apply_plan(&plan).await.unwrap();
            let peers: Vec<_> = r
                .device
                .stats()
                .await
                .unwrap()
                .into_iter()
                .map(|p| p.name)
                .collect();
            assert_eq!(peers, ["c2/a", "c2/other"]);
        }
        let refused = r#"trellis_gateway_plan_peers_refused_total{reason="duplicate_key"} 1"#;
        assert!(
            r.metrics.render().contains(refused),
            "{}",
            r.metrics.render()
        );
    }

    #[tokio::test]
    async fn a_failed_switch_to_plain_stays_in_the_tunnel_and_counts_an_error() {
        let r = reconciler(true);
        let key = PublicKey([9; 32]);
        r.apply(&state(true, key)).await.unwrap();
        assert!(r.apply(&state(false, key)).await.is_err());
        assert_eq!(r.device.stats().await.unwrap().len(), 1, "peer kept");
        let routes = r.routes.routes.lock().unwrap().clone();
        assert!(
            routes.iter().any(|r| r.target == RouteTarget::Device(7)),
            "still routed through the tunnel: {routes:?}"
        );
        assert_eq!(r.metrics.reconcile_errors.get(), 1);
    }

    #[tokio::test]
    async fn an_invalid_state_changes_nothing() {
        let r = reconciler(false);
        let key = PublicKey([9; 32]);
        r.apply(&state(true, key)).await.unwrap();
        let mut bad = state(true, key);
        bad.nodes.push(bad.nodes[0].clone());
        assert!(matches!(r.apply(&bad).await, Err(Error::InvalidState(_))));
        assert_eq!(r.device.stats().await.unwrap().len(), 1);
        assert_eq!(r.routes.routes.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_stream_applies_each_good_line_skips_bad_ones_and_outlives_its_end() {
        let r = reconciler(false);
        let key = PublicKey([9; 32]);
        let mut text = String::new();
        text.push_str(&serde_json::to_string(&state(true, key)).unwrap());
        text.push_str("\n{ broken\n\n");
        let mut second = state(true, PublicKey([8; 32]));
        second.revision = 2;
        text.push_str(&serde_json::to_string(&second).unwrap());
        text.push('\n');
        let follow = follow_stream(
            &r,
            tokio::io::BufReader::new(text.as_bytes()),
            Duration::from_millis(50),
        );
        // The stream ends at once; the follower keeps running (and re-applying).
        let _ = tokio::time::timeout(Duration::from_millis(200), follow).await;
        let stats = r.device.stats().await.unwrap();
        assert_eq!(stats.len(), 1);
        assert_eq!(
            stats[0].public_key,
            PublicKey([8; 32]),
            "the last good line won"
        );
        assert_eq!(r.metrics.state_revision.get(), 2);
        assert_eq!(r.metrics.reconcile_errors.get(), 0);
    }

    #[test]
    fn parse_state_reports_the_path_and_validates() {
        let path = Path::new("/etc/trellis/state.json");
        let error = parse_state("{", path).unwrap_err();
        assert!(
            error.to_string().contains("/etc/trellis/state.json"),
            "{error}"
        );
        assert!(parse_state(r#"{"cluster":"c1"}"#, path).is_ok());
    }
}
