//! The peer table every worker encrypts and decrypts with, and its reconciliation with the
//! desired peers.
//!
//! The table itself (which peers, their keys and routes) is an immutable snapshot: the
//! reconciler builds a new one and swaps it in, so a worker reads it without a lock. What
//! changes per packet lives in each peer's [`PeerState`], behind that peer's own mutex.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use ipnet::IpNet;
use prometheus::{Gauge, IntCounter, IntGauge};
use trellis_core::external_peer::PresharedKey;
use trellis_core::gateway::TunnelPeer;
use trellis_core::wgkey::PublicKey;

use super::Shared;
use crate::allowed_ips::AllowedIps;
use crate::metrics::{DropReason, Initiation, Metrics, unix_now};

/// boringtun's per-peer queue for packets waiting on a handshake.
const MAX_QUEUED: i64 = 256;
/// WireGuard's Rekey-Timeout: a session this fresh is not replaced because of data for an
/// unknown session (packets the peer sent on the old one may still be in flight).
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer is sent at most one initiation of the gateway's own per this interval when it sends
/// data for a session we do not have, so spoofed datagrams cannot make a handshake storm.
const NUDGE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a peer's `Tunn` on a replaced key still decrypts data after the peer moved to the
/// new key: longer than any datagram stays in flight.
pub(super) const RETIRED_FOR: Duration = Duration::from_secs(3);
/// Peer slots are 24 bits: the upper bits of a 32-bit receiver index.
const MAX_SLOT: u32 = (1 << 24) - 1;

/// One peer: what never changes for it, and its state behind its own lock.
pub(super) struct Peer {
    pub(super) slot: u32,
    pub(super) public_key: PublicKey,
    state: Mutex<PeerState>,
}

impl Peer {
    /// The peer's state. Hold it for one packet or one run of packets, never across an
    /// `.await`. A worker that panicked holding it left a `Tunn` that boringtun keeps
    /// consistent between calls, so the poison is ignored.
    pub(super) fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) struct PeerState {
    pub(super) name: String,
    pub(super) tunn: Tunn,
    /// Where we send: the configured endpoint, then wherever the peer last spoke from.
    pub(super) endpoint: Option<SocketAddr>,
    /// The endpoint as last configured, so a reload of the same state keeps a roamed endpoint.
    pub(super) configured_endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    /// An external peer's preshared key (WireGuard's optional symmetric layer).
    preshared_key: Option<PresharedKey>,
    allowed_ips: Vec<IpNet>,
    pub(super) handshakes: u64,
    pub(super) tx_bytes: u64,
    pub(super) rx_bytes: u64,
    pub(super) queued: i64,
    /// When the gateway last started a handshake with this peer on its own initiative.
    last_initiation: Option<Instant>,
    /// Set when the reconciler removes the peer: a worker still holding the previous table
    /// must not send or accept anything more for it.
    pub(super) removed: bool,
    /// The `Tunn` still uses the key a rotation replaced (its sessions are kept until the
    /// peer initiates to the new key or the grace period ends).
    pub(super) on_previous: bool,
    /// The `Tunn` on the replaced key, for a moment after the peer moved to the new one: it
    /// decrypts data the peer sent on the old session before it switched, still in flight.
    pub(super) retired: Option<(Tunn, Instant)>,
    /// Since when the peer's key has been replaced by another peer of the same name: it only
    /// decrypts what the node sent on its sessions before it switched (it is in no route, and
    /// its timers send nothing), until a prune after [`RETIRED_FOR`] removes it.
    pub(super) retiring: Option<Instant>,
    pub(super) m: PeerMetrics,
}

pub(super) struct PeerMetrics {
    pub(super) tx_bytes: IntCounter,
    pub(super) rx_bytes: IntCounter,
    pub(super) tx_packets: IntCounter,
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

impl PeerState {
    pub(super) fn handshake_completed(&mut self) {
        self.handshakes += 1;
        self.m.handshakes.inc();
        if self.handshakes > 1 {
            self.m.rekeys.inc();
        }
        self.m.last_handshake.set(unix_now());
    }

    pub(super) fn set_queued(&mut self, queued: i64) {
        self.queued = queued.clamp(0, MAX_QUEUED);
        self.m.queued.set(self.queued);
    }

    /// Counts `bytes` of payload sent.
    pub(super) fn sent(&mut self, bytes: u64) {
        self.tx_bytes += bytes;
        self.m.tx_bytes.inc_by(bytes);
        self.m.tx_packets.inc();
    }

    /// Formats a handshake initiation into `out` (unless one is already under way and
    /// `force` is off); its length, and where to send it.
    pub(super) fn initiate(&mut self, out: &mut [u8], force: bool) -> Option<(usize, SocketAddr)> {
        let endpoint = self.endpoint?;
        match self.tunn.format_handshake_initiation(out, force) {
            TunnResult::WriteToNetwork(init) => {
                self.last_initiation = Some(Instant::now());
                Some((init.len(), endpoint))
            }
            _ => None,
        }
    }

    /// Moves the peer (`key`, in `slot`) to `identity` (the device's new key): a new `Tunn`,
    /// and the old one kept [`RETIRED_FOR`] to decrypt what the peer sent on its sessions
    /// before it switched. (boringtun's `set_static_private` would drop those sessions at
    /// once: a packet in flight lost costs a TCP flow a retransmission timeout.)
    pub(super) fn use_key(&mut self, identity: &super::Identity, key: &PublicKey, slot: u32) {
        let fresh = Tunn::new(
            identity.keys.secret().clone(),
            boringtun::x25519::PublicKey::from(key.0),
            self.preshared_key.map(|k| k.0),
            self.keepalive,
            slot,
            Some(identity.tunn_limiter.clone()),
        );
        let old = std::mem::replace(&mut self.tunn, fresh);
        self.retired = Some((old, Instant::now()));
        self.on_previous = false;
    }

    /// Forgets the retired `Tunn` once it has served its moment.
    pub(super) fn expire_retired(&mut self, now: Instant) {
        if self
            .retired
            .as_ref()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= RETIRED_FOR)
        {
            self.retired = None;
        }
    }

    /// Whether data for a session we do not have, from this peer's address, should start a
    /// handshake now: not while a session younger than Rekey-Timeout exists (the peer's
    /// packets on the old one may still arrive), and at most once per `NUDGE_INTERVAL`.
    pub(super) fn wants_nudge(&self, now: Instant) -> bool {
        let fresh_session = matches!(self.tunn.stats().0, Some(age) if age < REKEY_TIMEOUT);
        let nudged_lately = self
            .last_initiation
            .is_some_and(|at| now.saturating_duration_since(at) < NUDGE_INTERVAL);
        !fresh_session && !nudged_lately
    }

    /// Checks a decrypted packet's source against the allowed IPs (`slot` being this peer's)
    /// and counts it; false for a keepalive or a refused packet.
    pub(super) fn accept(
        &mut self,
        slot: u32,
        allowed: &AllowedIps<u32>,
        metrics: &Metrics,
        source: IpAddr,
        len: usize,
        from: SocketAddr,
    ) -> bool {
        // Authenticated: the peer may have roamed.
        self.endpoint = Some(from);
        if len == 0 {
            return false; // keepalive
        }
        let allowed = match allowed.lookup_prefix(source) {
            Some((_, owner)) if *owner == slot => true,
            // Another peer got the very same CIDR (the table holds one owner per prefix): a
            // node whose key changed is two peers until the old one is pruned, and packets
            // still in flight on the old key's session are its own.
            Some((len, _)) => self
                .allowed_ips
                .iter()
                .any(|net| net.prefix_len() == len && net.contains(&source)),
            None => false,
        };
        if !allowed {
            metrics.drop_packet(DropReason::SourceNotAllowed);
            return false;
        }
        self.rx_bytes += len as u64;
        self.m.rx_bytes.inc_by(len as u64);
        self.m.rx_packets.inc();
        true
    }
}

/// The peers every worker encrypts and decrypts for, and the routes to them.
pub(super) struct PeerTable {
    pub(super) peers: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<PublicKey, u32>,
    pub(super) allowed: AllowedIps<u32>,
    next_slot: u32,
}

impl Default for PeerTable {
    fn default() -> Self {
        Self {
            peers: HashMap::new(),
            by_key: HashMap::new(),
            allowed: AllowedIps::default(),
            next_slot: 1,
        }
    }
}

impl Shared {
    /// A `Tunn` on the device's current key.
    fn new_tunn(&self, spec: &TunnelPeer, slot: u32) -> Tunn {
        let ring = self.keys.load();
        Tunn::new(
            ring.current.keys.secret().clone(),
            boringtun::x25519::PublicKey::from(spec.public_key.0),
            spec.preshared_key.map(|k| k.0),
            spec.persistent_keepalive,
            slot,
            Some(ring.current.tunn_limiter.clone()),
        )
    }
}

impl PeerTable {
    pub(super) fn by_key(&self, key: &PublicKey) -> Option<&Arc<Peer>> {
        self.by_key.get(key).and_then(|slot| self.peers.get(slot))
    }

    fn free_slot(&mut self) -> u32 {
        loop {
            let slot = self.next_slot;
            self.next_slot = if slot >= MAX_SLOT { 1 } else { slot + 1 };
            if !self.peers.contains_key(&slot) {
                return slot;
            }
        }
    }

    /// The table after the peer diff: new keys get a fresh `Tunn`, known keys keep their
    /// sessions (a new keepalive needs a new `Tunn`), and with `prune` the rest are removed.
    /// Also returns the peers to start a handshake with now: new ones, and those whose
    /// endpoint moved. Known peers are updated in place, under their own locks.
    pub(super) fn reconcile(
        &self,
        shared: &Shared,
        desired: Vec<TunnelPeer>,
        prune: bool,
    ) -> (PeerTable, Vec<(u32, Initiation)>) {
        let mut next = PeerTable {
            peers: self.peers.clone(),
            by_key: self.by_key.clone(),
            allowed: AllowedIps::default(),
            next_slot: self.next_slot,
        };
        let mut initiate = Vec::new();
        if prune {
            let wanted: HashSet<PublicKey> = desired.iter().map(|p| p.public_key).collect();
            let names: HashSet<&str> = desired.iter().map(|p| p.name.as_str()).collect();
            let now = Instant::now();
            next.peers.retain(|_, peer| {
                if wanted.contains(&peer.public_key) {
                    return true;
                }
                let mut state = peer.lock();
                let replaced = names.contains(state.name.as_str());
                // A node whose key changed (a rotation): the old key's peer only receives, for
                // a moment, what the node sent on its sessions before it switched. An
                // external peer re-added with a new key is a revocation, not a rotation:
                // whoever holds the old key is cut off at once.
                let rotated = replaced && !is_external_peer(&state.name);
                match state.retiring {
                    None if rotated => {
                        state.retiring = Some(now);
                        tracing::info!(peer = %state.name, "the peer's key changed: the old key only receives, for a moment");
                        return true;
                    }
                    Some(since) if rotated && now.saturating_duration_since(since) < RETIRED_FOR => {
                        return true;
                    }
                    _ => {}
                }
                state.removed = true;
                // Its name's series belong to the new key's peer now.
                if !replaced {
                    shared.metrics.forget_peer(&state.name);
                }
                tracing::info!(peer = %state.name, key = %peer.public_key, "removed peer");
                false
            });
            next.by_key.retain(|key, _| wanted.contains(key));
        }
        for spec in desired {
            match next.by_key(&spec.public_key).cloned() {
                Some(peer) => {
                    let mut state = peer.lock();
                    // Wanted again (its key back before it was removed).
                    state.retiring = None;
                    if state.keepalive != spec.persistent_keepalive
                        || state.preshared_key != spec.preshared_key
                    {
                        state.tunn = shared.new_tunn(&spec, peer.slot);
                        state.keepalive = spec.persistent_keepalive;
                        state.preshared_key = spec.preshared_key;
                        state.on_previous = false;
                    }
                    if state.name != spec.name {
                        shared.metrics.forget_peer(&state.name);
                        state.m = PeerMetrics::new(&shared.metrics, &spec.name);
                        state.name = spec.name;
                    }
                    if state.configured_endpoint != spec.endpoint {
                        state.configured_endpoint = spec.endpoint;
                        if spec.endpoint.is_some() {
                            state.endpoint = spec.endpoint;
                            initiate.push((peer.slot, Initiation::EndpointChanged));
                        }
                    }
                    state.allowed_ips = spec.allowed_ips;
                }
                None => {
                    let slot = next.free_slot();
                    let tunn = shared.new_tunn(&spec, slot);
                    tracing::info!(peer = %spec.name, key = %spec.public_key, "added peer");
                    if spec.endpoint.is_some() {
                        initiate.push((slot, Initiation::NewPeer));
                    }
                    let state = PeerState {
                        m: PeerMetrics::new(&shared.metrics, &spec.name),
                        name: spec.name,
                        tunn,
                        endpoint: spec.endpoint,
                        configured_endpoint: spec.endpoint,
                        keepalive: spec.persistent_keepalive,
                        preshared_key: spec.preshared_key,
                        allowed_ips: spec.allowed_ips,
                        handshakes: 0,
                        tx_bytes: 0,
                        rx_bytes: 0,
                        queued: 0,
                        last_initiation: None,
                        removed: false,
                        on_previous: false,
                        retired: None,
                        retiring: None,
                    };
                    next.by_key.insert(spec.public_key, slot);
                    next.peers.insert(
                        slot,
                        Arc::new(Peer {
                            slot,
                            public_key: spec.public_key,
                            state: Mutex::new(state),
                        }),
                    );
                }
            }
        }
        // A peer added now takes a CIDR another peer also claims: when a node's key changes
        // (a rotation), its traffic moves to the new key's peer at once (queued until its
        // handshake, which starts now), not only when the old peer is pruned after the routes,
        // while the other end may already have dropped the old key's sessions.
        let (added, known): (Vec<_>, Vec<_>) = next
            .peers
            .values()
            .partition(|peer| !self.peers.contains_key(&peer.slot));
        let mut configured = 0;
        for peer in known.into_iter().chain(added) {
            let state = peer.lock();
            // A retiring peer is sent nothing.
            if state.retiring.is_some() {
                continue;
            }
            configured += 1;
            for net in &state.allowed_ips {
                next.allowed.insert(*net, peer.slot);
            }
        }
        shared.metrics.peers_configured.set(configured);
        (next, initiate)
    }
}

/// One peer's lock, kept over a run of packets for that peer.
pub(super) struct Held<'t> {
    slot: u32,
    state: MutexGuard<'t, PeerState>,
}

/// The lock of `slot` (taking it, after releasing any other: a worker never holds two).
/// Whether `name` is a cluster's external peer (`<cluster>/peer:<name>`, as the controller
/// names the `Peer`s it streams) rather than a node.
fn is_external_peer(name: &str) -> bool {
    name.contains("/peer:")
}

pub(super) fn hold<'h, 't>(
    held: &'h mut Option<Held<'t>>,
    table: &'t PeerTable,
    slot: u32,
) -> Option<&'h mut PeerState> {
    if held.as_ref().is_none_or(|h| h.slot != slot) {
        *held = None;
        let peer = table.peers.get(&slot)?;
        *held = Some(Held {
            slot,
            state: peer.lock(),
        });
    }
    held.as_mut().map(|h| &mut *h.state)
}
