//! Putting it together: open the TUN and UDP socket in the node's namespace, start the device
//! loop, and reconcile desired states (peers, then routes, then peer removals).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use trellis_core::gateway::GatewayState;
use trellis_core::wgkey::PublicKey;
use trellis_netns::{Netlink, Netns, sysctl};

use crate::Error;
use crate::device::{Device, DeviceConfig, DeviceHandle};
use crate::io::{RealTun, RealUdp};
use crate::keys::KeyPair;
use crate::metrics::{Metrics, unix_now};
use crate::routes::{self, NetlinkRoutes, RouteMetrics, RouteTable};

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
        }
    }
}

/// Applies desired states: peers first, then routes, then peer removals, so a CIDR switched
/// to the tunnel always finds its peer there, and a peer leaves only after no route uses it.
pub struct Reconciler<R: RouteTable> {
    pub device: DeviceHandle,
    pub routes: R,
    pub tun_index: u32,
    pub route_metrics: RouteMetrics,
    pub metrics: Metrics,
}

impl<R: RouteTable> Reconciler<R> {
    /// Brings peers and routes to `state`. Idempotent: run it again to repair drift or
    /// retry failures. An invalid state changes nothing.
    pub async fn apply(&self, state: &GatewayState) -> Result<(), Error> {
        let result = self.apply_inner(state).await;
        match &result {
            Ok(()) => {
                self.metrics.last_reconcile.set(unix_now());
                self.metrics
                    .state_revision
                    .set(i64::try_from(state.revision).unwrap_or(i64::MAX));
            }
            Err(_) => self.metrics.reconcile_errors.inc(),
        }
        result
    }

    async fn apply_inner(&self, state: &GatewayState) -> Result<(), Error> {
        state.validate()?;
        let peers = state.tunnel_peers();
        self.device.set_peers(peers.clone(), false).await?;
        let desired =
            routes::desired_routes(&state.pod_routes(), self.tun_index, self.route_metrics);
        let current = self.routes.list().await?;
        let ops = routes::plan(&current, &desired);
        if !ops.is_empty() {
            tracing::info!(
                changes = ops.len(),
                revision = state.revision,
                "updating routes"
            );
        }
        routes::apply(&self.routes, &ops).await?;
        self.metrics.routes.set(desired.len() as i64);
        // Only once every route is right: a failed switch to plain keeps its peer.
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
    abort: tokio::task::AbortHandle,
}

impl Gateway {
    /// Loads (or creates) the key, opens the TUN and the UDP socket inside `netns` (or the
    /// current namespace), brings the TUN up and starts the device loop. Call inside a
    /// multi-threaded tokio runtime.
    pub async fn start(netns: Option<&Netns>, config: &GatewayConfig) -> Result<Self, Error> {
        let keys = KeyPair::load_or_generate(&config.state_dir)?;
        let metrics = Metrics::new()?;
        let tun = RealTun::open(netns, &config.interface, config.device.mtu)?;
        let udp = RealUdp::bind(netns, config.listen_port)?;
        let listen_port = udp.local_port().map_err(|source| Error::BindUdp {
            addr: ([0, 0, 0, 0], config.listen_port).into(),
            source,
        })?;
        let netlink = match netns {
            Some(netns) => Netlink::connect_in(netns)?,
            None => Netlink::connect()?,
        };
        let link = netlink.require_link(&config.interface).await?;
        netlink.set_up(link.index).await?;
        // Replies to tunnelled traffic may leave by another path while encryption is being
        // switched: loose reverse-path filtering on the TUN.
        let key = format!("net/ipv4/conf/{}/rp_filter", config.interface);
        if let Err(e) = sysctl::write(netns, &key, "2") {
            tracing::warn!("{e}");
        }
        let public_key = keys.public_key();
        let (device, handle) = Device::new(tun, udp, keys, metrics.clone(), config.device.clone());
        let device_task = tokio::spawn(device.run());
        let abort = device_task.abort_handle();
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
                device: handle,
                routes: NetlinkRoutes {
                    netlink,
                    protocol: config.route_protocol,
                },
                tun_index: link.index,
                route_metrics: config.route_metrics,
                metrics,
            },
            device_task: Some(device_task),
            abort,
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

    /// Stops the device loop; the TUN (and with it the tunnel routes) goes away, the
    /// unreachable backstops stay.
    pub fn stop(self) {
        self.abort.abort();
    }
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
                Err(e) => tracing::warn!("keeping the last desired state: {e}"),
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
                    tracing::warn!("apply desired state revision {}: {e}", state.revision);
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}
