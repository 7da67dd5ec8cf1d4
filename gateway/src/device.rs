//! The userspace WireGuard device. One or more workers, each on a thread of its own (pinned to
//! its CPU by the caller), each owning one TUN queue, one UDP socket and its packet buffers.
//! The kernel steers a packet to the queue and socket of the CPU it was handled on, so a
//! packet's wake-up stays on that CPU: waking a sleeping thread on another (idle) vCPU is the
//! largest cost in a round trip. Buffers are allocated once, at start, so the steady state
//! allocates nothing. The first worker also runs WireGuard's timers and the commands.
//!
//! The workers share the peer table as an immutable snapshot that the reconciler replaces
//! whole; each peer's mutable state (its `noise::Tunn`, counters, endpoint) has a lock of its
//! own, held for one run of packets to or from that peer and never across an `.await`, so
//! workers serving different peers never wait on each other and no send on one socket holds
//! up another worker.
//!
//! - `demux`: which peer an incoming datagram is for.
//! - `peers`: the peer table and its reconciliation with the desired state.
//! - `worker`: a worker's buffers and loop; `tx` and `rx`: its batches in each direction.
//! - `commands`: what the handle asks of the loop.
//! - `timers`: WireGuard's timers.
//! - `nudge`: a handshake for a peer that still talks on a session we lost.
//! - `steering_policy`: when to switch the kernel's steering.

mod commands;
mod demux;
mod nudge;
mod peers;
mod rx;
mod steering_policy;
mod timers;
mod tx;
mod worker;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use tokio::sync::{mpsc, oneshot, watch};

use crate::cpus::ModePolicy;
use crate::io::{Tun, Udp};
use crate::keys::KeyPair;
use crate::metrics::Metrics;
use crate::offload::{GsoGroup, Offloads};
use crate::steering::SteeringControl;

pub use commands::{DeviceHandle, PeerStats};
pub use demux::{
    COOKIE_REPLY, COOKIE_REPLY_LEN, Classified, DATA, DATA_MIN_LEN, HANDSHAKE_INIT,
    HANDSHAKE_INIT_LEN, HANDSHAKE_RESPONSE, HANDSHAKE_RESPONSE_LEN, classify_datagram,
};

use commands::Command;
use peers::PeerTable;

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

/// One static key of the device, with the limiters that check the handshakes sent to it
/// (MAC1 is keyed with the public key).
#[derive(Clone)]
struct Identity {
    keys: KeyPair,
    /// The device's policy for initiations (cookies under load), at the demultiplexer.
    limiter: Arc<RateLimiter>,
    /// What every `Tunn` checks again (MAC1, cookies) after the device's limiter admitted a
    /// message: unlimited, so the policy is counted once, by `limiter`.
    tunn_limiter: Arc<RateLimiter>,
}

impl Identity {
    fn new(keys: KeyPair, rate: u64) -> Self {
        Self {
            limiter: Arc::new(RateLimiter::new(keys.public(), rate)),
            tunn_limiter: Arc::new(RateLimiter::new(keys.public(), u64::MAX)),
            keys,
        }
    }
}

/// The device's static keys: the current one, which new peers use, and during a key
/// rotation's grace period the one it replaced, which the peers that have not initiated to
/// the new key yet still use (see [`crate::rotation`]).
struct KeyRing {
    current: Identity,
    previous: Option<Identity>,
}

impl KeyRing {
    fn reset_counts(&self) {
        self.current.limiter.reset_count();
        if let Some(previous) = &self.previous {
            previous.limiter.reset_count();
        }
    }
}

/// What the workers share.
struct Shared {
    /// Replaced whole by the reconciler (the first worker); read without a lock.
    table: ArcSwap<PeerTable>,
    /// Replaced whole by a key rotation (the first worker).
    keys: ArcSwap<KeyRing>,
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
    config: DeviceConfig,
    /// Packet buffer length: the largest packet the TUN gives plus WireGuard's overhead.
    stride: usize,
    /// Packets from the TUN (super-packets already split) and their lengths.
    tun_in: Vec<Vec<u8>>,
    tun_sizes: Vec<usize>,
    /// The datagrams they became: `net_out[k][..net_plan[k].0]` goes to `net_plan[k].1`.
    net_out: Vec<Vec<u8>>,
    net_plan: Vec<(usize, std::net::SocketAddr)>,
    /// `net_plan` cut into GSO sends.
    groups: Vec<GsoGroup>,
    /// Datagrams from the network: (start in `net_in`, length, source).
    net_in: Vec<u8>,
    net_datagrams: Vec<(usize, usize, std::net::SocketAddr)>,
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

impl<T: Tun, U: Udp> Device<T, U> {
    pub fn new(
        tun: T,
        udp: U,
        keys: KeyPair,
        metrics: Metrics,
        config: DeviceConfig,
    ) -> (Self, DeviceHandle) {
        let (sender, commands) = mpsc::channel(16);
        let identity = Identity::new(keys, config.handshake_rate_limit);
        let config = DeviceConfig {
            batch: config.batch.max(1),
            ..config
        };
        let shared = Arc::new(Shared {
            table: ArcSwap::from_pointee(PeerTable::default()),
            keys: ArcSwap::from_pointee(KeyRing {
                current: identity,
                previous: None,
            }),
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
            DeviceHandle::new(sender),
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

    /// Stops the loop (every worker) as soon as `stop` resolves or its sender is dropped.
    pub fn stop_on(mut self, stop: oneshot::Receiver<()>) -> Self {
        if let Role::First { stop: slot, .. } = &mut self.role {
            *slot = Some(stop);
        }
        self
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

#[cfg(test)]
#[path = "device_tests.rs"]
pub(crate) mod tests;
