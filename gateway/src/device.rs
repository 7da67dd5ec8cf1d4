//! The device loop. One or more workers, each on a thread of its own (pinned to its CPU by the
//! caller), each owning one TUN queue, one UDP socket and its packet buffers; all share the
//! peer table (every peer's `noise::Tunn` and the allowed IPs), locked once per batch. The
//! kernel steers a packet to the queue and socket of the CPU it was handled on, so a
//! packet's wake-up stays on that CPU: waking a sleeping thread on another (idle) vCPU is the
//! largest cost in a round trip. Packets are read in batches (up to `batch` per wake-up),
//! processed, then written; buffers are allocated once, at start, so the steady state
//! allocates nothing. The first worker also runs WireGuard's timers and the commands.
//!
//! Demultiplexing incoming datagrams to peers: a handshake initiation is checked against the
//! shared rate limiter (which answers with a cookie under load) before the one DH needed to
//! learn the sender's static key; every other message carries our receiver index, whose upper
//! 24 bits are the peer's slot (boringtun's `Tunn` uses `index << 8`).

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;
use prometheus::{Gauge, IntCounter, IntGauge};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use trellis_core::gateway::TunnelPeer;
use trellis_core::wgkey::PublicKey;

use crate::Error;
use crate::allowed_ips::AllowedIps;
use crate::cpus::{self, ModePolicy};
use crate::io::{TUN_HEADROOM, Tun, Udp};
use crate::keys::KeyPair;
use crate::metrics::{DropReason, Initiation, Metrics, unix_now};
use crate::offload::{
    Feature, GsoGroup, MAX_SPLIT_SEGMENTS, Offloads, UDP_MAX_GSO_BYTES, UDP_MAX_SEGMENTS,
    gro_segments, plan_gso_groups,
};
use crate::steering::SteeringControl;

/// How the loop is sized. Validated once by the binary's config.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The TUN MTU; packet buffers are sized from it.
    pub mtu: u16,
    /// Packets read per wake-up, on each side.
    pub batch: usize,
    /// Handshake initiations per second the gateway answers before it demands cookies
    /// (counted once, at the device's demultiplexer). A burst of this many peers comes up in
    /// one wave; past it, senders must prove their address first.
    pub handshake_rate_limit: u64,
    /// How often WireGuard's timers run (boringtun recommends 250 ms).
    pub timer_interval: Duration,
    /// Ask for TUN (TSO/USO) and UDP (GSO/GRO) offloads; each is probed and falls back.
    pub offload: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            mtu: 1420,
            batch: 64,
            handshake_rate_limit: 2000,
            timer_interval: Duration::from_millis(250),
            offload: true,
        }
    }
}

/// WireGuard's message types (first byte, little-endian u32).
pub const HANDSHAKE_INIT: u8 = 1;
pub const HANDSHAKE_RESPONSE: u8 = 2;
pub const COOKIE_REPLY: u8 = 3;
pub const DATA: u8 = 4;
pub const HANDSHAKE_INIT_LEN: usize = 148;
pub const HANDSHAKE_RESPONSE_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;
pub const DATA_MIN_LEN: usize = 32;
/// boringtun's per-peer queue for packets waiting on a handshake.
const MAX_QUEUED: i64 = 256;
/// Sessions older than this are rejected (WireGuard's Reject-After-Time).
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// WireGuard's Rekey-Timeout: a session this fresh is not replaced because of data for an
/// unknown session (packets the peer sent on the old one may still be in flight).
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer is sent at most one initiation of the gateway's own per this interval when it sends
/// data for a session we do not have, so spoofed datagrams cannot make a handshake storm.
const NUDGE_INTERVAL: Duration = Duration::from_secs(1);
/// Unknown-session senders looked up per round of received datagrams.
const MAX_NUDGES_PER_ROUND: usize = 8;
/// Consecutive failed TUN reads (10 ms apart) after which the TUN is considered gone (its
/// interface deleted): the loop stops with an error rather than spin.
const MAX_TUN_FAILURES: u32 = 100;
/// Peer slots are 24 bits: the upper bits of a 32-bit receiver index.
const MAX_SLOT: u32 = (1 << 24) - 1;

/// What the loop reports about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub since_last_handshake: Option<Duration>,
    pub handshakes: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

enum Command {
    /// Adds and updates these peers; with `prune`, removes every other peer.
    SetPeers {
        peers: Vec<TunnelPeer>,
        prune: bool,
        done: oneshot::Sender<()>,
    },
    Stats(oneshot::Sender<Vec<PeerStats>>),
}

/// Talks to a running device loop. Dropping every handle stops the loop.
#[derive(Clone, Debug)]
pub struct DeviceHandle {
    commands: mpsc::Sender<Command>,
}

impl DeviceHandle {
    /// Adds and updates `peers`; with `prune`, removes the others. Returns once applied.
    pub async fn set_peers(&self, peers: Vec<TunnelPeer>, prune: bool) -> Result<(), Error> {
        let (done, applied) = oneshot::channel();
        self.commands
            .send(Command::SetPeers { peers, prune, done })
            .await
            .map_err(|_| Error::DeviceStopped)?;
        applied.await.map_err(|_| Error::DeviceStopped)
    }

    pub async fn stats(&self) -> Result<Vec<PeerStats>, Error> {
        let (reply, stats) = oneshot::channel();
        self.commands
            .send(Command::Stats(reply))
            .await
            .map_err(|_| Error::DeviceStopped)?;
        stats.await.map_err(|_| Error::DeviceStopped)
    }
}

struct Peer {
    slot: u32,
    name: String,
    public_key: PublicKey,
    tunn: Tunn,
    /// Where we send: the configured endpoint, then wherever the peer last spoke from.
    endpoint: Option<SocketAddr>,
    /// The endpoint as last configured, so a reload of the same state keeps a roamed endpoint.
    configured_endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    allowed_ips: Vec<IpNet>,
    handshakes: u64,
    tx_bytes: u64,
    rx_bytes: u64,
    queued: i64,
    /// When the gateway last started a handshake with this peer on its own initiative.
    last_initiation: Option<Instant>,
    m: PeerMetrics,
}

struct PeerMetrics {
    tx_bytes: IntCounter,
    rx_bytes: IntCounter,
    tx_packets: IntCounter,
    rx_packets: IntCounter,
    handshakes: IntCounter,
    rekeys: IntCounter,
    last_handshake: Gauge,
    queued: IntGauge,
}

impl PeerMetrics {
    fn new(metrics: &Metrics, name: &str) -> Self {
        let labels = [name];
        Self {
            tx_bytes: metrics.peer_tx_bytes.with_label_values(&labels),
            rx_bytes: metrics.peer_rx_bytes.with_label_values(&labels),
            tx_packets: metrics.peer_tx_packets.with_label_values(&labels),
            rx_packets: metrics.peer_rx_packets.with_label_values(&labels),
            handshakes: metrics.peer_handshakes.with_label_values(&labels),
            rekeys: metrics.peer_rekeys.with_label_values(&labels),
            last_handshake: metrics.peer_last_handshake.with_label_values(&labels),
            queued: metrics.peer_queued.with_label_values(&labels),
        }
    }
}

impl Peer {
    fn handshake_completed(&mut self) {
        self.handshakes += 1;
        self.m.handshakes.inc();
        if self.handshakes > 1 {
            self.m.rekeys.inc();
        }
        self.m.last_handshake.set(unix_now());
    }

    fn set_queued(&mut self, queued: i64) {
        self.queued = queued.clamp(0, MAX_QUEUED);
        self.m.queued.set(self.queued);
    }

    /// Formats a handshake initiation into `out` (unless one is already under way and
    /// `force` is off); its length, and where to send it.
    fn initiate(&mut self, out: &mut [u8], force: bool) -> Option<(usize, SocketAddr)> {
        let endpoint = self.endpoint?;
        match self.tunn.format_handshake_initiation(out, force) {
            TunnResult::WriteToNetwork(init) => {
                self.last_initiation = Some(Instant::now());
                Some((init.len(), endpoint))
            }
            _ => None,
        }
    }

    /// Whether data for a session we do not have, from this peer's address, should start a
    /// handshake now: not while a session younger than Rekey-Timeout exists (the peer's
    /// packets on the old one may still arrive), and at most once per `NUDGE_INTERVAL`.
    fn wants_nudge(&self, now: Instant) -> bool {
        let fresh_session = matches!(self.tunn.stats().0, Some(age) if age < REKEY_TIMEOUT);
        let nudged_lately = self
            .last_initiation
            .is_some_and(|at| now.saturating_duration_since(at) < NUDGE_INTERVAL);
        !fresh_session && !nudged_lately
    }
}

/// Room for one receive: a GRO read holds up to 64 KiB of datagrams.
const MAX_UDP_READ: usize = 65_536;
/// Receive buffer: several GRO reads, or many single datagrams, per wake-up.
const NET_IN_BYTES: usize = 8 * MAX_UDP_READ;
/// Rounds of read, process, write per wake-up before the loop looks at its other sources.
const ROUNDS_PER_WAKE: usize = 4;

/// `count` packet buffers of `len` bytes each, allocated once.
fn buffers(count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count).map(|_| vec![0; len]).collect()
}

/// The peers every worker encrypts and decrypts for, and the routes to them.
struct PeerTable {
    peers: HashMap<u32, Peer>,
    by_key: HashMap<PublicKey, u32>,
    allowed: AllowedIps<u32>,
    next_slot: u32,
}

/// What the workers share.
struct Shared {
    table: Mutex<PeerTable>,
    keys: KeyPair,
    limiter: Arc<RateLimiter>,
    /// What every `Tunn` checks again (MAC1, cookies) after the device's limiter admitted a
    /// message: unlimited, so the policy is counted once, by `limiter`.
    tunn_limiter: Arc<RateLimiter>,
    metrics: Metrics,
    config: DeviceConfig,
    /// Time every worker has spent working, in nanoseconds.
    busy_nanos: AtomicU64,
    /// The device's steering and its policy, revisited by whichever worker ends a window
    /// (the first worker may be asleep while another carries the load).
    steering: std::sync::Mutex<Option<(SteeringControl, ModePolicy)>>,
}

/// What ends a worker's loop.
enum Role {
    /// Runs the timers and commands; stops when every handle is dropped or `stop` fires, and
    /// then (by dropping `siblings`) stops the other workers.
    First {
        commands: mpsc::Receiver<Command>,
        stop: Option<oneshot::Receiver<()>>,
        siblings: watch::Sender<()>,
    },
    /// Stops when the first worker does.
    Sibling { first: watch::Receiver<()> },
}

/// One worker of the loop. Build the first with [`Device::new`], further ones (one per extra
/// TUN queue and socket) with [`Device::sibling`] and [`Sibling::attach`]; run each with
/// [`Device::run`].
pub struct Device<T: Tun, U: Udp> {
    tun: T,
    udp: U,
    shared: Arc<Shared>,
    role: Role,
    /// Copies of the shared settings and handles this worker uses per packet.
    metrics: Metrics,
    limiter: Arc<RateLimiter>,
    config: DeviceConfig,
    /// Packet buffer length: the largest packet the TUN gives plus WireGuard's overhead.
    stride: usize,
    /// Packets from the TUN (super-packets already split) and their lengths.
    tun_in: Vec<Vec<u8>>,
    tun_sizes: Vec<usize>,
    /// The datagrams they became: `net_out[k][..net_plan[k].0]` goes to `net_plan[k].1`.
    net_out: Vec<Vec<u8>>,
    net_plan: Vec<(usize, SocketAddr)>,
    /// `net_plan` cut into GSO sends.
    groups: Vec<GsoGroup>,
    /// Datagrams from the network: (start in `net_in`, length, source).
    net_in: Vec<u8>,
    net_datagrams: Vec<(usize, usize, SocketAddr)>,
    /// The packets they became, each after `TUN_HEADROOM` bytes of room.
    tun_out: Vec<Vec<u8>>,
    /// The offloads last reported to the metrics.
    offloads_seen: Offloads,
    /// Handshakes, cookies, keepalives, timers.
    scratch: Vec<u8>,
    /// Consecutive TUN read failures, and the last one.
    tun_failures: u32,
    last_tun_error: Option<std::io::Error>,
}

enum Demux {
    Peer(u32),
    Drop(DropReason),
    /// A cookie reply of this length is waiting in `scratch`.
    Cookie(usize),
}

impl<T: Tun, U: Udp> Device<T, U> {
    pub fn new(
        tun: T,
        udp: U,
        keys: KeyPair,
        metrics: Metrics,
        config: DeviceConfig,
    ) -> (Self, DeviceHandle) {
        let (sender, commands) = mpsc::channel(16);
        let limiter = Arc::new(RateLimiter::new(keys.public(), config.handshake_rate_limit));
        let tunn_limiter = Arc::new(RateLimiter::new(keys.public(), u64::MAX));
        let config = DeviceConfig {
            batch: config.batch.max(1),
            ..config
        };
        let shared = Arc::new(Shared {
            table: Mutex::new(PeerTable {
                peers: HashMap::new(),
                by_key: HashMap::new(),
                allowed: AllowedIps::default(),
                next_slot: 1,
            }),
            keys,
            limiter,
            tunn_limiter,
            metrics,
            config,
            busy_nanos: AtomicU64::new(0),
            steering: std::sync::Mutex::new(None),
        });
        let role = Role::First {
            commands,
            stop: None,
            siblings: watch::channel(()).0,
        };
        (
            Self::worker(tun, udp, shared, role),
            DeviceHandle { commands: sender },
        )
    }

    /// A handle for one more worker on this device's peers, to build on its own thread.
    pub fn sibling(&self) -> Sibling {
        let first = match &self.role {
            Role::First { siblings, .. } => siblings.subscribe(),
            Role::Sibling { first } => first.clone(),
        };
        Sibling {
            shared: self.shared.clone(),
            first,
        }
    }

    fn worker(tun: T, udp: U, shared: Arc<Shared>, role: Role) -> Self {
        let config = shared.config.clone();
        // Room for the largest packet the TUN gives plus WireGuard's 32 bytes of overhead,
        // and never less than a handshake message.
        let stride = (usize::from(config.mtu) + 64).max(256);
        let batch = config.batch;
        // A read may split into a whole super-packet's segments: keep room for one beyond
        // the batch.
        let tun_slots = batch + MAX_SPLIT_SEGMENTS;
        let net_slots = batch + UDP_MAX_SEGMENTS;
        Self {
            tun,
            udp,
            metrics: shared.metrics.clone(),
            limiter: shared.limiter.clone(),
            config,
            shared,
            role,
            stride,
            tun_in: buffers(tun_slots, stride),
            tun_sizes: vec![0; tun_slots],
            net_out: buffers(tun_slots, stride),
            net_plan: Vec::with_capacity(tun_slots),
            groups: Vec::with_capacity(tun_slots),
            net_in: vec![0; NET_IN_BYTES],
            net_datagrams: Vec::with_capacity(net_slots),
            tun_out: buffers(net_slots, TUN_HEADROOM + stride),
            offloads_seen: Offloads::default(),
            scratch: vec![0; stride],
            tun_failures: 0,
            last_tun_error: None,
        }
    }

    /// Lets the workers switch the device's steering as the load asks (the first worker's
    /// thread starts on its home CPUs, spread).
    pub fn steered(self, steering: SteeringControl) -> Self {
        self.metrics.steering_spread.set(1);
        if let Ok(mut slot) = self.shared.steering.lock() {
            *slot = Some((steering, ModePolicy::new(Instant::now())));
        }
        self
    }

    /// Counts one wake-up's work, and revisits the steering.
    fn after_work(&mut self, started: Instant) {
        let now = Instant::now();
        let worked = u64::try_from(now.saturating_duration_since(started).as_nanos()).unwrap_or(0);
        self.shared.busy_nanos.fetch_add(worked, Ordering::Relaxed);
        self.revisit_steering(now);
    }

    fn revisit_steering(&self, now: Instant) {
        // Another worker revisiting it now is as good.
        let Ok(mut slot) = self.shared.steering.try_lock() else {
            return;
        };
        let Some((steering, policy)) = slot.as_mut() else {
            return;
        };
        let busy = Duration::from_nanos(self.shared.busy_nanos.load(Ordering::Relaxed));
        let Some(spread) = policy.after(now, busy) else {
            return;
        };
        if let Err(e) = steering.switch.spread(spread) {
            tracing::warn!("switching the steering (spread: {spread}): {e}");
            return;
        }
        let cpus = if spread {
            &steering.home
        } else {
            &steering.anywhere
        };
        if let Err(e) = cpus::pin_thread(steering.first, cpus) {
            tracing::debug!("pinning the first worker to {cpus:?}: {e}");
        }
        self.metrics.steering_spread.set(i64::from(spread));
        let to = if spread { "spread" } else { "first" };
        self.metrics.steering_changes.with_label_values(&[to]).inc();
        tracing::debug!("steering: {to}");
    }

    /// Stops the loop (every worker) as soon as `stop` resolves or its sender is dropped.
    pub fn stop_on(mut self, stop: oneshot::Receiver<()>) -> Self {
        if let Role::First { stop: slot, .. } = &mut self.role {
            *slot = Some(stop);
        }
        self
    }

    /// Runs until every [`DeviceHandle`] is dropped (`Ok`) or the TUN fails for good, e.g.
    /// its interface was deleted (`Err`; routes to encrypted peers then hit their
    /// unreachable backstops). Errors on single packets are counted as drops; nothing a
    /// packet contains ends the loop.
    pub async fn run(mut self) -> Result<(), Error> {
        let first = matches!(self.role, Role::First { .. });
        let mut timers = tokio::time::interval(self.config.timer_interval);
        timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        let ticks_per_second = (1000 / self.config.timer_interval.as_millis().max(1)).max(1) as u64;
        self.report_offloads();
        let result = loop {
            tokio::select! {
                ready = self.tun.readable() => {
                    if let Err(e) = ready {
                        self.tun_failed(e);
                    } else {
                        let started = Instant::now();
                        self.on_tun_readable().await;
                        self.after_work(started);
                    }
                    if self.tun_failures > 0 {
                        if self.tun_failures >= MAX_TUN_FAILURES {
                            break Err(Error::TunFailed(self.last_tun_error.take().unwrap_or_else(
                                || std::io::Error::other("unknown TUN error"),
                            )));
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                ready = self.udp.readable() => {
                    if let Err(e) = ready {
                        tracing::warn!("UDP readiness: {e}");
                        self.metrics.drop_packet(DropReason::SocketError);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    let started = Instant::now();
                    self.on_udp_readable().await;
                    self.after_work(started);
                }
                _ = timers.tick(), if first => {
                    ticks += 1;
                    if ticks.is_multiple_of(ticks_per_second) {
                        self.limiter.reset_count();
                    }
                    self.run_timers().await;
                    self.revisit_steering(Instant::now());
                }
                command = next_command(&mut self.role) => match command {
                    Some(command) => self.handle(command).await,
                    None => break Ok(()),
                },
            }
        };
        if first {
            self.forget_all().await;
        }
        result
    }

    /// Mirrors the offloads in use, and any new refusals, into the metrics.
    fn report_offloads(&mut self) {
        let now = self.tun.offloads().merge(self.udp.offloads());
        for (i, feature) in Feature::ALL.iter().enumerate() {
            let label = [feature.label()];
            self.metrics
                .offload_enabled
                .with_label_values(&label)
                .set(i64::from(now.enabled[i]));
            let new = now.refused[i].saturating_sub(self.offloads_seen.refused[i]);
            if new > 0 {
                self.metrics
                    .offload_refused
                    .with_label_values(&label)
                    .inc_by(new);
            }
        }
        self.offloads_seen = now;
    }

    async fn forget_all(&mut self) {
        for peer in self.shared.table.lock().await.peers.values() {
            self.metrics.forget_peer(&peer.name);
        }
        self.metrics.peers_configured.set(0);
        self.metrics.peers_up.set(0);
    }

    fn tun_failed(&mut self, error: std::io::Error) {
        if self.tun_failures == 0 {
            tracing::warn!("TUN: {error}");
        }
        self.tun_failures += 1;
        self.last_tun_error = Some(error);
        self.metrics.drop_packet(DropReason::TunError);
    }

    async fn handle(&mut self, command: Command) {
        let shared = self.shared.clone();
        let mut table = shared.table.lock().await;
        match command {
            Command::SetPeers { peers, prune, done } => {
                let initiate = table.set_peers(&self.shared, peers, prune);
                // A new peer (every peer, when the gateway just started) or a moved one gets
                // a handshake now: the remote end switches to the new session at once rather
                // than keep sending into one we no longer have until its timers give up
                // (15 s). Formatted under the lock, sent after it.
                let mut initiations = Vec::with_capacity(initiate.len());
                for (slot, reason) in initiate {
                    let Some(peer) = table.peers.get_mut(&slot) else {
                        continue;
                    };
                    if let Some((len, to)) = peer.initiate(&mut self.scratch, false) {
                        self.metrics.initiated(reason);
                        initiations.push((self.scratch[..len].to_vec(), to));
                    }
                }
                drop(table);
                let _ = done.send(());
                for (datagram, to) in initiations {
                    if let Err(e) = self.udp.send_to(&datagram, to).await {
                        tracing::debug!("UDP send to {to}: {e}");
                        self.metrics.drop_packet(DropReason::SocketError);
                    }
                }
            }
            Command::Stats(reply) => {
                let mut stats: Vec<_> = table
                    .peers
                    .values()
                    .map(|p| PeerStats {
                        name: p.name.clone(),
                        public_key: p.public_key,
                        endpoint: p.endpoint,
                        since_last_handshake: p.tunn.stats().0,
                        handshakes: p.handshakes,
                        tx_bytes: p.tx_bytes,
                        rx_bytes: p.rx_bytes,
                    })
                    .collect();
                stats.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(stats);
            }
        }
    }

    /// Reads from the TUN (with offloads, super-packets split into segments), encrypts each
    /// packet for the peer its destination routes to, then sends the datagrams, runs of one
    /// size to one endpoint together (UDP GSO). A few rounds per wake-up.
    async fn on_tun_readable(&mut self) {
        for _ in 0..ROUNDS_PER_WAKE {
            let mut count = 0;
            let mut drained = false;
            while count < self.config.batch {
                match self
                    .tun
                    .try_recv_packets(&mut self.tun_in[count..], &mut self.tun_sizes[count..])
                {
                    Ok(n) => {
                        count += n;
                        self.tun_failures = 0;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        // A read that is not a packet (a bad virtio header): counted, skipped.
                        tracing::debug!("TUN read: {e}");
                        self.metrics.drop_packet(DropReason::Malformed);
                        self.tun_failures = 0;
                    }
                    Err(e) => {
                        self.tun_failed(e);
                        drained = true;
                        break;
                    }
                }
            }
            if count > 0 {
                let shared = self.shared.clone();
                self.encrypt(&mut *shared.table.lock().await, count);
                self.send_planned().await;
            }
            if drained {
                break;
            }
        }
    }

    /// Encrypts `tun_in[..count]` into `net_out`, planning where each datagram goes.
    fn encrypt(&mut self, table: &mut PeerTable, count: usize) {
        self.net_plan.clear();
        for i in 0..count {
            let packet = &self.tun_in[i][..self.tun_sizes[i]];
            let Some(slot) = Tunn::dst_address(packet).and_then(|dst| table.allowed.lookup(dst))
            else {
                self.metrics.drop_packet(DropReason::NoRoute);
                continue;
            };
            let Some(peer) = table.peers.get_mut(slot) else {
                self.metrics.drop_packet(DropReason::NoRoute);
                continue;
            };
            let k = self.net_plan.len();
            let out = &mut self.net_out[k][..];
            if packet.len() + DATA_MIN_LEN > out.len() {
                // Larger than the MTU we sized for (someone raised the TUN's MTU): `Tunn`
                // would panic on a short buffer, so refuse it here.
                self.metrics.drop_packet(DropReason::TooBig);
                continue;
            }
            match peer.tunn.encapsulate(packet, out) {
                TunnResult::WriteToNetwork(datagram) => {
                    let len = datagram.len();
                    if datagram[0] == DATA {
                        peer.tx_bytes += packet.len() as u64;
                        peer.m.tx_bytes.inc_by(packet.len() as u64);
                        peer.m.tx_packets.inc();
                    } else {
                        // No session: the packet was queued and a handshake started.
                        let queued = peer.queued + 1;
                        peer.set_queued(queued);
                    }
                    match peer.endpoint {
                        Some(endpoint) => self.net_plan.push((len, endpoint)),
                        None => self.metrics.drop_packet(DropReason::NoEndpoint),
                    }
                }
                TunnResult::Done => {
                    // Queued behind a handshake already in progress.
                    let queued = peer.queued + 1;
                    peer.set_queued(queued);
                }
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %peer.name, "encapsulate: {e:?}");
                    self.metrics.drop_packet(drop_reason(&e));
                }
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
    }

    /// Sends `net_plan`: one `sendmsg` per run of same-sized datagrams to one endpoint.
    async fn send_planned(&mut self) {
        plan_gso_groups(
            &self.net_plan,
            self.udp.max_segments().min(UDP_MAX_SEGMENTS),
            UDP_MAX_GSO_BYTES,
            &mut self.groups,
        );
        for g in 0..self.groups.len() {
            let group = self.groups[g];
            let to = self.net_plan[group.start].1;
            let mut iov = [IoSlice::new(&[]); UDP_MAX_SEGMENTS];
            for (j, k) in group.range().enumerate() {
                iov[j] = IoSlice::new(&self.net_out[k][..self.net_plan[k].0]);
            }
            if let Err(e) = self
                .udp
                .send_segments(&iov[..group.count], group.segment, to)
                .await
            {
                tracing::debug!("UDP send to {to}: {e}");
                self.metrics.drop_packet(DropReason::SocketError);
            }
        }
    }

    /// Finds the peer a datagram is for, without trusting anything in it.
    fn demux(&mut self, table: &PeerTable, i: usize) -> Demux {
        let (start, len, from) = self.net_datagrams[i];
        let datagram = &self.net_in[start..start + len];
        match classify_datagram(datagram) {
            Err(reason) => Demux::Drop(reason),
            Ok(Classified::HandshakeInit) => {
                match self
                    .limiter
                    .verify_packet(Some(from.ip()), datagram, &mut self.scratch)
                {
                    Ok(Packet::HandshakeInit(init)) => {
                        let keys = &self.shared.keys;
                        match parse_handshake_anon(keys.secret(), keys.public(), &init) {
                            Ok(half) => match table.by_key.get(&PublicKey(half.peer_static_public))
                            {
                                Some(slot) => Demux::Peer(*slot),
                                None => Demux::Drop(DropReason::NoPeer),
                            },
                            Err(_) => Demux::Drop(DropReason::DecryptFailed),
                        }
                    }
                    Ok(_) => Demux::Drop(DropReason::Malformed),
                    Err(TunnResult::WriteToNetwork(cookie)) => Demux::Cookie(cookie.len()),
                    Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                        Demux::Drop(DropReason::RateLimited)
                    }
                    Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                        Demux::Drop(DropReason::DecryptFailed)
                    }
                    Err(_) => Demux::Drop(DropReason::Malformed),
                }
            }
            Ok(Classified::Indexed { slot, .. }) => {
                if table.peers.contains_key(&slot) {
                    Demux::Peer(slot)
                } else {
                    Demux::Drop(DropReason::NoPeer)
                }
            }
        }
    }

    /// Reads datagrams (with GRO, many per receive), decrypts each with its peer, then writes
    /// the packets to the TUN (with offloads, a flow's segments coalesced). Handshake replies
    /// and cookies go out as they arise. A few rounds per wake-up.
    async fn on_udp_readable(&mut self) {
        for _ in 0..ROUNDS_PER_WAKE {
            if self.udp_round().await {
                break;
            }
        }
    }

    /// One round of [`Self::on_udp_readable`]; true once the socket is drained.
    async fn udp_round(&mut self) -> bool {
        let mut used = 0;
        let mut drained = false;
        self.net_datagrams.clear();
        while self.net_datagrams.len() + UDP_MAX_SEGMENTS <= self.tun_out.len()
            && used + MAX_UDP_READ <= self.net_in.len()
        {
            match self
                .udp
                .try_recv_gro(&mut self.net_in[used..used + MAX_UDP_READ])
            {
                Ok((len, segment, from)) => {
                    if len == 0 {
                        self.net_datagrams.push((used, 0, from));
                    }
                    for range in gro_segments(len, segment) {
                        self.net_datagrams
                            .push((used + range.start, range.len(), from));
                    }
                    used += len;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors surface here (ECONNREFUSED); they are not fatal.
                    tracing::debug!("UDP receive: {e}");
                    self.metrics.drop_packet(DropReason::SocketError);
                    drained = true;
                    break;
                }
            }
        }
        if self.net_datagrams.is_empty() {
            return drained;
        }
        let mut writes = 0;
        let mut unknown_sessions: Vec<SocketAddr> = Vec::new();
        let shared = self.shared.clone();
        let mut guard = shared.table.lock().await;
        let table = &mut *guard;
        for i in 0..self.net_datagrams.len() {
            let from = self.net_datagrams[i].2;
            let slot = match self.demux(table, i) {
                Demux::Peer(slot) => slot,
                Demux::Drop(reason) => {
                    if reason == DropReason::NoPeer && self.is_data(i) {
                        note_unknown_session(&mut unknown_sessions, from);
                    }
                    self.metrics.drop_packet(reason);
                    continue;
                }
                Demux::Cookie(len) => {
                    self.metrics.drop_packet(DropReason::RateLimited);
                    if let Err(e) = self.udp.send_to(&self.scratch[..len], from).await {
                        tracing::debug!("send cookie to {from}: {e}");
                    }
                    continue;
                }
            };
            let Some(peer) = table.peers.get_mut(&slot) else {
                continue;
            };
            let (start, len, _) = self.net_datagrams[i];
            let datagram = &self.net_in[start..start + len];
            let kind = datagram[0];
            let buf = &mut self.tun_out[writes];
            buf.resize(TUN_HEADROOM + self.stride, 0);
            match peer
                .tunn
                .decapsulate(Some(from.ip()), datagram, &mut buf[TUN_HEADROOM..])
            {
                TunnResult::WriteToNetwork(reply) => {
                    let reply_kind = reply[0];
                    if reply_kind == COOKIE_REPLY {
                        self.metrics.drop_packet(DropReason::RateLimited);
                    } else {
                        // A response to an initiation, or the keepalive confirming a response.
                        if kind == HANDSHAKE_INIT || kind == HANDSHAKE_RESPONSE {
                            peer.handshake_completed();
                        }
                        peer.endpoint = Some(from);
                    }
                    if let Err(e) = self.udp.send_to(reply, from).await {
                        tracing::debug!("UDP send to {from}: {e}");
                        self.metrics.drop_packet(DropReason::SocketError);
                    }
                    if reply_kind != COOKIE_REPLY {
                        // Packets queued for the handshake go now.
                        while let TunnResult::WriteToNetwork(queued) =
                            peer.tunn.decapsulate(None, &[], &mut self.scratch)
                        {
                            let len = queued.len();
                            let payload = len.saturating_sub(DATA_MIN_LEN) as u64;
                            peer.tx_bytes += payload;
                            peer.m.tx_bytes.inc_by(payload);
                            peer.m.tx_packets.inc();
                            if let Err(e) = self.udp.send_to(&self.scratch[..len], from).await {
                                tracing::debug!("UDP send to {from}: {e}");
                                self.metrics.drop_packet(DropReason::SocketError);
                            }
                        }
                        peer.set_queued(0);
                    }
                }
                TunnResult::WriteToTunnelV4(packet, source) => {
                    let len = packet.len();
                    accept(
                        peer,
                        &table.allowed,
                        &self.metrics,
                        IpAddr::V4(source),
                        len,
                        from,
                    )
                    .then(|| {
                        self.tun_out[writes].truncate(TUN_HEADROOM + len);
                        writes += 1;
                    });
                }
                TunnResult::WriteToTunnelV6(packet, source) => {
                    let len = packet.len();
                    accept(
                        peer,
                        &table.allowed,
                        &self.metrics,
                        IpAddr::V6(source),
                        len,
                        from,
                    )
                    .then(|| {
                        self.tun_out[writes].truncate(TUN_HEADROOM + len);
                        writes += 1;
                    });
                }
                TunnResult::Done => {}
                TunnResult::Err(e) => {
                    if kind == DATA
                        && matches!(
                            e,
                            WireGuardError::NoCurrentSession
                                | WireGuardError::WrongIndex
                                | WireGuardError::InvalidAeadTag
                        )
                    {
                        note_unknown_session(&mut unknown_sessions, from);
                    }
                    self.metrics.drop_packet(drop_reason(&e));
                }
            }
        }
        if !unknown_sessions.is_empty() {
            self.nudge(table, &unknown_sessions).await;
        }
        drop(guard);
        if writes > 0
            && let Err(e) = self.tun.send_packets(&mut self.tun_out[..writes]).await
        {
            tracing::debug!("TUN write: {e}");
            self.metrics.drop_packet(DropReason::TunError);
        }
        drained
    }

    fn is_data(&self, i: usize) -> bool {
        let (start, len, _) = self.net_datagrams[i];
        len > 0 && self.net_in[start] == DATA
    }

    /// Data arrived for sessions we do not have, from these addresses: when one is a peer's
    /// endpoint, we lost the session (this gateway restarted) and the peer keeps sending on it;
    /// a handshake from us makes it switch now instead of after its own timers (15 s).
    async fn nudge(&mut self, table: &mut PeerTable, senders: &[SocketAddr]) {
        let now = Instant::now();
        for from in senders {
            let Some(peer) = table
                .peers
                .values_mut()
                .find(|p| p.endpoint == Some(*from) || p.configured_endpoint == Some(*from))
            else {
                continue;
            };
            if !peer.wants_nudge(now) {
                continue;
            }
            let Some((len, to)) = peer.initiate(&mut self.scratch, true) else {
                continue;
            };
            tracing::debug!(peer = %peer.name, "data for an unknown session: initiating a handshake");
            self.metrics.initiated(Initiation::UnknownSession);
            if let Err(e) = self.udp.send_to(&self.scratch[..len], to).await {
                tracing::debug!("UDP send to {to}: {e}");
                self.metrics.drop_packet(DropReason::SocketError);
            }
        }
    }

    /// WireGuard's timers: handshake retries and rekeys, keepalives, session expiry.
    async fn run_timers(&mut self) {
        self.metrics.beat();
        self.report_offloads();
        let mut up = 0;
        let shared = self.shared.clone();
        let mut table = shared.table.lock().await;
        for peer in table.peers.values_mut() {
            match peer.tunn.update_timers(&mut self.scratch) {
                TunnResult::WriteToNetwork(datagram) => match peer.endpoint {
                    Some(endpoint) => {
                        if let Err(e) = self.udp.send_to(datagram, endpoint).await {
                            tracing::debug!("UDP send to {endpoint}: {e}");
                            self.metrics.drop_packet(DropReason::SocketError);
                        }
                    }
                    None => self.metrics.drop_packet(DropReason::NoEndpoint),
                },
                TunnResult::Err(WireGuardError::ConnectionExpired) => peer.set_queued(0),
                _ => {}
            }
            if matches!(peer.tunn.stats().0, Some(age) if age < REJECT_AFTER_TIME) {
                up += 1;
            }
        }
        self.metrics.peers_up.set(up);
    }
}

impl Shared {
    fn new_tunn(&self, public_key: &PublicKey, keepalive: Option<u16>, slot: u32) -> Tunn {
        Tunn::new(
            self.keys.secret().clone(),
            boringtun::x25519::PublicKey::from(public_key.0),
            None,
            keepalive,
            slot,
            Some(self.tunn_limiter.clone()),
        )
    }
}

impl PeerTable {
    fn free_slot(&mut self) -> u32 {
        loop {
            let slot = self.next_slot;
            self.next_slot = if slot >= MAX_SLOT { 1 } else { slot + 1 };
            if !self.peers.contains_key(&slot) {
                return slot;
            }
        }
    }

    /// Applies the peer diff: new keys get a fresh `Tunn`, known keys keep their sessions
    /// (a new keepalive needs a new `Tunn`), and with `prune` the rest are removed. Returns
    /// the peers to start a handshake with now: new ones, and those whose endpoint moved.
    fn set_peers(
        &mut self,
        shared: &Shared,
        desired: Vec<TunnelPeer>,
        prune: bool,
    ) -> Vec<(u32, Initiation)> {
        let mut initiate = Vec::new();
        let wanted: std::collections::HashSet<PublicKey> =
            desired.iter().map(|p| p.public_key).collect();
        if prune {
            let gone: Vec<u32> = self
                .peers
                .values()
                .filter(|p| !wanted.contains(&p.public_key))
                .map(|p| p.slot)
                .collect();
            for slot in gone {
                if let Some(peer) = self.peers.remove(&slot) {
                    self.by_key.remove(&peer.public_key);
                    shared.metrics.forget_peer(&peer.name);
                    tracing::info!(peer = %peer.name, "removed peer");
                }
            }
        }
        for spec in desired {
            match self.by_key.get(&spec.public_key).copied() {
                Some(slot) => {
                    let rebuild = self.peers.get(&slot).map(|p| p.keepalive)
                        != Some(spec.persistent_keepalive);
                    let tunn = rebuild.then(|| {
                        shared.new_tunn(&spec.public_key, spec.persistent_keepalive, slot)
                    });
                    let Some(peer) = self.peers.get_mut(&slot) else {
                        continue;
                    };
                    if let Some(tunn) = tunn {
                        peer.tunn = tunn;
                        peer.keepalive = spec.persistent_keepalive;
                    }
                    if peer.name != spec.name {
                        shared.metrics.forget_peer(&peer.name);
                        peer.m = PeerMetrics::new(&shared.metrics, &spec.name);
                        peer.name = spec.name;
                    }
                    if peer.configured_endpoint != spec.endpoint {
                        peer.configured_endpoint = spec.endpoint;
                        if spec.endpoint.is_some() {
                            peer.endpoint = spec.endpoint;
                            initiate.push((slot, Initiation::EndpointChanged));
                        }
                    }
                    peer.allowed_ips = spec.allowed_ips;
                }
                None => {
                    let slot = self.free_slot();
                    let tunn = shared.new_tunn(&spec.public_key, spec.persistent_keepalive, slot);
                    tracing::info!(peer = %spec.name, key = %spec.public_key, "added peer");
                    let peer = Peer {
                        slot,
                        m: PeerMetrics::new(&shared.metrics, &spec.name),
                        name: spec.name,
                        public_key: spec.public_key,
                        tunn,
                        endpoint: spec.endpoint,
                        configured_endpoint: spec.endpoint,
                        keepalive: spec.persistent_keepalive,
                        allowed_ips: spec.allowed_ips,
                        handshakes: 0,
                        tx_bytes: 0,
                        rx_bytes: 0,
                        queued: 0,
                        last_initiation: None,
                    };
                    if peer.endpoint.is_some() {
                        initiate.push((slot, Initiation::NewPeer));
                    }
                    self.by_key.insert(peer.public_key, slot);
                    self.peers.insert(slot, peer);
                }
            }
        }
        let mut allowed = AllowedIps::default();
        for peer in self.peers.values() {
            for net in &peer.allowed_ips {
                allowed.insert(*net, peer.slot);
            }
        }
        self.allowed = allowed;
        shared.metrics.peers_configured.set(self.peers.len() as i64);
        initiate
    }
}

/// Records an address that sent data for an unknown session, once per round and at most
/// `MAX_NUDGES_PER_ROUND` of them (the lookups are linear in peers).
/// What the first bytes of a datagram say it is, before any cryptography.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classified {
    /// A handshake initiation of the right size: the rate limiter and one DH find its peer.
    HandshakeInit,
    /// A handshake response, cookie reply or data message addressed to our receiver `index`,
    /// whose upper 24 bits are the peer's `slot`.
    Indexed { kind: u8, index: u32, slot: u32 },
}

/// The pure first step of demultiplexing: a WireGuard message type with its exact (or, for
/// data, minimum) size and zero reserved bytes, and the receiver index where one is carried.
/// Anything else is [`DropReason::Malformed`]. Public so that it can be fuzzed on its own.
pub fn classify_datagram(datagram: &[u8]) -> Result<Classified, DropReason> {
    let Some(&kind) = datagram.first() else {
        return Err(DropReason::Malformed);
    };
    let expected_len_ok = match kind {
        HANDSHAKE_INIT => datagram.len() == HANDSHAKE_INIT_LEN,
        HANDSHAKE_RESPONSE => datagram.len() == HANDSHAKE_RESPONSE_LEN,
        COOKIE_REPLY => datagram.len() == COOKIE_REPLY_LEN,
        DATA => datagram.len() >= DATA_MIN_LEN,
        _ => false,
    };
    if !expected_len_ok || datagram[1..4] != [0, 0, 0] {
        return Err(DropReason::Malformed);
    }
    if kind == HANDSHAKE_INIT {
        return Ok(Classified::HandshakeInit);
    }
    // The receiver index follows the sender index in a response, and comes first in a
    // cookie reply or data message.
    let at = if kind == HANDSHAKE_RESPONSE { 8 } else { 4 };
    let index = u32::from_le_bytes([
        datagram[at],
        datagram[at + 1],
        datagram[at + 2],
        datagram[at + 3],
    ]);
    Ok(Classified::Indexed {
        kind,
        index,
        slot: index >> 8,
    })
}

fn note_unknown_session(senders: &mut Vec<SocketAddr>, from: SocketAddr) {
    if senders.len() < MAX_NUDGES_PER_ROUND && !senders.contains(&from) {
        senders.push(from);
    }
}

/// The next command for the first worker; `None` when the loop is to stop (every handle
/// dropped, `stop` fired, or, for a sibling, the first worker gone).
async fn next_command(role: &mut Role) -> Option<Command> {
    match role {
        Role::First { commands, stop, .. } => tokio::select! {
            command = commands.recv() => command,
            _ = async {
                match stop {
                    Some(stop) => {
                        let _ = stop.await;
                    }
                    None => std::future::pending().await,
                }
            } => None,
        },
        // Nothing is ever sent: `changed` fails once the first worker drops its sender.
        Role::Sibling { first } => {
            while first.changed().await.is_ok() {}
            None
        }
    }
}

/// A further worker's share of a device, to attach its own TUN queue and socket to (on its
/// own thread, inside its own runtime).
pub struct Sibling {
    shared: Arc<Shared>,
    first: watch::Receiver<()>,
}

impl Sibling {
    pub fn attach<T: Tun, U: Udp>(self, tun: T, udp: U) -> Device<T, U> {
        Device::worker(tun, udp, self.shared, Role::Sibling { first: self.first })
    }
}

/// Checks a decrypted packet's source against the sending peer's allowed IPs.
fn accept(
    peer: &mut Peer,
    allowed: &AllowedIps<u32>,
    metrics: &Metrics,
    source: IpAddr,
    len: usize,
    from: SocketAddr,
) -> bool {
    // Authenticated: the peer may have roamed.
    peer.endpoint = Some(from);
    if len == 0 {
        return false; // keepalive
    }
    if allowed.lookup(source) != Some(&peer.slot) {
        metrics.drop_packet(DropReason::SourceNotAllowed);
        return false;
    }
    peer.rx_bytes += len as u64;
    peer.m.rx_bytes.inc_by(len as u64);
    peer.m.rx_packets.inc();
    true
}

fn drop_reason(error: &WireGuardError) -> DropReason {
    match error {
        // A counter seen before, or a handshake initiation no newer than the last one.
        WireGuardError::DuplicateCounter
        | WireGuardError::InvalidCounter
        | WireGuardError::WrongTai64nTimestamp => DropReason::Replay,
        WireGuardError::InvalidAeadTag
        | WireGuardError::InvalidMac
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp => DropReason::DecryptFailed,
        WireGuardError::UnderLoad => DropReason::RateLimited,
        WireGuardError::NoCurrentSession
        | WireGuardError::WrongIndex
        | WireGuardError::ConnectionExpired => DropReason::NoPeer,
        _ => DropReason::Malformed,
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
pub(crate) mod tests;
