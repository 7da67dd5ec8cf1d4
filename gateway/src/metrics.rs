//! The gateway's metrics: one registry, owned here and passed down (never the global one).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use trellis_core::status::PolicyReport;

use crate::Error;

/// Why a packet was dropped: the `reason` label of `trellis_gateway_drops_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A packet from the TUN to an address no peer's allowed IPs cover.
    NoRoute,
    /// A datagram for an index or key we have no peer for (also unknown handshake keys).
    NoPeer,
    /// A peer without a known endpoint yet.
    NoEndpoint,
    /// Authentication of a data packet or handshake failed.
    DecryptFailed,
    /// A counter seen before or too old, or a handshake message no longer awaited.
    Replay,
    /// A handshake refused (or answered with a cookie) because we are under load.
    RateLimited,
    /// Bytes that are not a WireGuard message, or a message of the wrong size.
    Malformed,
    /// A decrypted packet whose source address the sending peer is not allowed to use.
    SourceNotAllowed,
    /// A packet from the TUN larger than the configured MTU.
    TooBig,
    TunError,
    SocketError,
    /// A handshake initiation sent to the key a rotation replaced, from a peer already
    /// moved to the new one.
    OldKey,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        Self::NoRoute,
        Self::NoPeer,
        Self::NoEndpoint,
        Self::DecryptFailed,
        Self::Replay,
        Self::RateLimited,
        Self::Malformed,
        Self::SourceNotAllowed,
        Self::TooBig,
        Self::TunError,
        Self::SocketError,
        Self::OldKey,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::NoPeer => "no_peer",
            Self::NoEndpoint => "no_endpoint",
            Self::DecryptFailed => "decrypt_failed",
            Self::Replay => "replay",
            Self::RateLimited => "rate_limited",
            Self::Malformed => "malformed",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::TooBig => "too_big",
            Self::TunError => "tun_error",
            Self::SocketError => "socket_error",
            Self::OldKey => "old_key",
        }
    }
}

/// Why the gateway started a handshake on its own, before any packet asked for one: the
/// `reason` label of `trellis_gateway_handshake_initiations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiation {
    /// A peer appeared (also every peer of a gateway that just started): the remote end
    /// switches to the new session at once instead of sending into one we no longer have.
    NewPeer,
    /// A peer's configured endpoint changed.
    EndpointChanged,
    /// A peer sent data for a session we do not have (we restarted and it has not noticed).
    UnknownSession,
}

impl Initiation {
    pub const ALL: [Initiation; 3] = [Self::NewPeer, Self::EndpointChanged, Self::UnknownSession];

    pub fn label(self) -> &'static str {
        match self {
            Self::NewPeer => "new_peer",
            Self::EndpointChanged => "endpoint_changed",
            Self::UnknownSession => "unknown_session",
        }
    }
}

/// Every metric of the gateway, registered on its own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) peer_tx_bytes: IntCounterVec,
    pub(crate) peer_rx_bytes: IntCounterVec,
    pub(crate) peer_tx_packets: IntCounterVec,
    pub(crate) peer_rx_packets: IntCounterVec,
    pub(crate) peer_last_handshake: GaugeVec,
    pub(crate) peer_handshakes: IntCounterVec,
    pub(crate) peer_rekeys: IntCounterVec,
    pub(crate) peer_queued: IntGaugeVec,
    initiations: IntCounterVec,
    drops: IntCounterVec,
    drop_handles: Vec<IntCounter>,
    pub(crate) peers_configured: IntGauge,
    pub(crate) peers_up: IntGauge,
    pub(crate) routes: IntGauge,
    pub(crate) reconcile_errors: IntCounter,
    pub(crate) last_reconcile: Gauge,
    pub(crate) state_revision: IntGauge,
    pub(crate) controller_connected: IntGauge,
    /// When the node's agent certificate (`node`) and its CA (`ca`) expire.
    pub certificate_expiry: IntGaugeVec,
    pub(crate) controller_updates: IntCounter,
    pub(crate) ready: IntGauge,
    pub(crate) antispoof_enabled: IntGauge,
    http_refused: IntCounterVec,
    spoofed: IntCounterVec,
    /// The kernel's counts last seen (IPv4, IPv6), to add only what is new.
    spoofed_seen: Arc<[AtomicU64; 2]>,
    pub(crate) plan_restored: IntGauge,
    plan_peers_refused: IntCounterVec,
    key_rotations: IntCounter,
    key_last_rotation: Gauge,
    node_encryption: IntGauge,
    /// Whether the source said anything about node encryption (a file does not).
    node_encryption_known: Arc<AtomicBool>,
    pub(crate) offload_enabled: IntGaugeVec,
    pub(crate) offload_refused: IntCounterVec,
    pub(crate) workers: IntGauge,
    pub(crate) steering_refused: IntCounter,
    pub(crate) steering_changes: IntCounterVec,
    pub(crate) steering_spread: IntGauge,
    heartbeat: Arc<AtomicU64>,
    /// NetworkPolicy's metrics and status.
    pub policy: PolicyMetrics,
    /// Flow recording's metrics (`trellis_flows_*`).
    pub flows: crate::flows::metrics::FlowMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn name(short: &str) -> String {
    format!("trellis_gateway_{short}")
}

impl Metrics {
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let peer_counter = |short: &str, help: &str| -> Result<IntCounterVec, Error> {
            let vec = IntCounterVec::new(Opts::new(name(short), help), &["peer"])?;
            registry.register(Box::new(vec.clone()))?;
            Ok(vec)
        };
        let peer_tx_bytes = peer_counter(
            "peer_tx_bytes_total",
            "Bytes of IP packets sent to the peer through the tunnel.",
        )?;
        let peer_rx_bytes = peer_counter(
            "peer_rx_bytes_total",
            "Bytes of IP packets received from the peer through the tunnel.",
        )?;
        let peer_tx_packets = peer_counter(
            "peer_tx_packets_total",
            "IP packets sent to the peer through the tunnel.",
        )?;
        let peer_rx_packets = peer_counter(
            "peer_rx_packets_total",
            "IP packets received from the peer through the tunnel.",
        )?;
        let peer_handshakes = peer_counter(
            "peer_handshakes_total",
            "Completed WireGuard handshakes with the peer.",
        )?;
        let peer_rekeys = peer_counter(
            "peer_rekeys_total",
            "Completed handshakes that replaced an earlier session (rekeys).",
        )?;
        let peer_last_handshake = GaugeVec::new(
            Opts::new(
                name("peer_last_handshake_timestamp_seconds"),
                "Unix time of the last completed handshake with the peer.",
            ),
            &["peer"],
        )?;
        registry.register(Box::new(peer_last_handshake.clone()))?;
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                name("certificate_expiry_timestamp_seconds"),
                "Unix time when the node's agent certificate (node) or its CA (ca) expires; re-read when the files change.",
            ),
            &["certificate"],
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        let peer_queued = IntGaugeVec::new(
            Opts::new(
                name("peer_queued_packets"),
                "Packets queued for the peer, waiting for a handshake to complete.",
            ),
            &["peer"],
        )?;
        registry.register(Box::new(peer_queued.clone()))?;
        let initiations = IntCounterVec::new(
            Opts::new(
                name("handshake_initiations_total"),
                "Handshakes the gateway started on its own (not for a queued packet or a timer), by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(initiations.clone()))?;
        for reason in Initiation::ALL {
            initiations.with_label_values(&[reason.label()]).inc_by(0);
        }
        let drops = IntCounterVec::new(
            Opts::new(name("drops_total"), "Packets dropped, by reason."),
            &["reason"],
        )?;
        registry.register(Box::new(drops.clone()))?;
        let drop_handles = DropReason::ALL
            .iter()
            .map(|reason| drops.with_label_values(&[reason.label()]))
            .collect();
        let gauge = |short: &str, help: &str| -> Result<IntGauge, Error> {
            let gauge = IntGauge::new(name(short), help)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok(gauge)
        };
        let peers_configured = gauge("peers_configured", "WireGuard peers configured.")?;
        let peers_up = gauge(
            "peers_up",
            "Peers with a session younger than the WireGuard reject-after time (180 s).",
        )?;
        let routes = gauge("routes", "Pod routes the gateway has installed.")?;
        let state_revision = gauge(
            "desired_state_revision",
            "Revision of the last desired state applied.",
        )?;
        let controller_connected = gauge(
            "controller_connected",
            "1 while the gateway is registered with its controller and following its stream.",
        )?;
        let ready = gauge(
            "ready",
            "1 once the gateway has applied a plan (restored from its state directory or from its source): \
             its peers and routes are in place and their handshakes started, and with NetworkPolicy on, \
             its first policy table is in the kernel.",
        )?;
        let antispoof_enabled = gauge(
            "antispoof_enabled",
            "1 while the node's anti-spoofing rules are installed (packets from a pod's veth with \
             a source that is not the pod's are dropped).",
        )?;
        let spoofed = IntCounterVec::new(
            Opts::new(
                name("spoofed_packets_dropped_total"),
                "Packets from a pod's veth dropped because their source is not one of the pod's addresses.",
            ),
            &["family"],
        )?;
        registry.register(Box::new(spoofed.clone()))?;
        for family in ["ipv4", "ipv6"] {
            spoofed.with_label_values(&[family]).inc_by(0);
        }
        let http_refused = IntCounterVec::new(
            Opts::new(
                name("http_refused_total"),
                "Connections to the metrics port closed at once: every slot taken (pending_full) \
                 or the client holding its share (source_pending_full).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(http_refused.clone()))?;
        let plan_restored = gauge(
            "plan_restored",
            "1 while the plan applied is the one restored from the state directory at start, not yet \
             replaced by one from the gateway's source.",
        )?;
        let plan_peers_refused = IntCounterVec::new(
            Opts::new(
                name("plan_peers_refused_total"),
                "Plan entries left out instead of becoming peers, by reason: own_key (the entry \
                 carries this gateway's own public key) or duplicate_key (another entry has its key; \
                 the first by name is kept). Counted once per entry while it stays in the plan.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(plan_peers_refused.clone()))?;
        for reason in ["own_key", "duplicate_key"] {
            plan_peers_refused.with_label_values(&[reason]).inc_by(0);
        }
        let key_rotations = IntCounter::new(
            name("key_rotations_total"),
            "WireGuard key rotations (new key stored, in the device and announced to the controller).",
        )?;
        registry.register(Box::new(key_rotations.clone()))?;
        let key_last_rotation = Gauge::new(
            name("key_last_rotation_timestamp_seconds"),
            "Unix time of the last WireGuard key rotation (0: none since the gateway started).",
        )?;
        registry.register(Box::new(key_last_rotation.clone()))?;
        let node_encryption = gauge(
            "node_encryption",
            "1 while the desired state applied has node-to-node encryption on (0 also when its \
             source, a desired-state file, does not say).",
        )?;
        let controller_updates = IntCounter::new(
            name("controller_updates_total"),
            "Desired-state updates (snapshots and deltas) received from the controller.",
        )?;
        registry.register(Box::new(controller_updates.clone()))?;
        let offload_enabled = IntGaugeVec::new(
            Opts::new(
                name("offload_enabled"),
                "1 while the data path uses this offload (tun_tso, tun_uso, udp_gso, udp_gro).",
            ),
            &["feature"],
        )?;
        registry.register(Box::new(offload_enabled.clone()))?;
        let offload_refused = IntCounterVec::new(
            Opts::new(
                name("offload_refused_total"),
                "Times the kernel or device refused an offload (at the start probe or a send).",
            ),
            &["feature"],
        )?;
        registry.register(Box::new(offload_refused.clone()))?;
        let workers = IntGauge::new(
            name("device_workers"),
            "Device workers (threads, each with its own TUN queue and UDP socket, one per CPU).",
        )?;
        registry.register(Box::new(workers.clone()))?;
        let steering_refused = IntCounter::new(
            name("steering_refused_total"),
            "Times per-CPU steering (multi-queue TUN, SO_REUSEPORT, BPF) was refused and one worker used.",
        )?;
        registry.register(Box::new(steering_refused.clone()))?;
        let steering_changes = IntCounterVec::new(
            Opts::new(
                name("steering_changes_total"),
                "Steering switched to spreading packets over the workers (to=spread) or to the first worker under bulk load (to=first).",
            ),
            &["to"],
        )?;
        registry.register(Box::new(steering_changes.clone()))?;
        for to in crate::steering::SteeringMode::ALL {
            steering_changes.with_label_values(&[to.label()]).inc_by(0);
        }
        let steering_spread = IntGauge::new(
            name("steering_spread"),
            "1 while packets are spread over the workers by CPU or flow, 0 while all go to the first (bulk load or one worker).",
        )?;
        registry.register(Box::new(steering_spread.clone()))?;
        for feature in crate::offload::Feature::ALL {
            offload_enabled.with_label_values(&[feature.label()]).set(0);
            offload_refused
                .with_label_values(&[feature.label()])
                .inc_by(0);
        }
        let reconcile_errors = IntCounter::new(
            name("reconcile_errors_total"),
            "Reconciliations of routes that failed (and will be retried).",
        )?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        let last_reconcile = Gauge::new(
            name("last_reconcile_timestamp_seconds"),
            "Unix time of the last successful reconciliation.",
        )?;
        registry.register(Box::new(last_reconcile.clone()))?;
        let policy = PolicyMetrics::new(&registry)?;
        let flows = crate::flows::metrics::FlowMetrics::new(&registry)?;
        Ok(Self {
            registry,
            peer_tx_bytes,
            peer_rx_bytes,
            peer_tx_packets,
            peer_rx_packets,
            peer_last_handshake,
            peer_handshakes,
            peer_rekeys,
            peer_queued,
            initiations,
            drops,
            drop_handles,
            peers_configured,
            peers_up,
            routes,
            reconcile_errors,
            last_reconcile,
            state_revision,
            controller_connected,
            certificate_expiry,
            controller_updates,
            ready,
            antispoof_enabled,
            http_refused,
            spoofed,
            spoofed_seen: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
            plan_restored,
            plan_peers_refused,
            key_rotations,
            key_last_rotation,
            node_encryption,
            node_encryption_known: Arc::new(AtomicBool::new(false)),
            offload_enabled,
            offload_refused,
            workers,
            steering_refused,
            steering_changes,
            steering_spread,
            heartbeat: Arc::new(AtomicU64::new(0)),
            policy,
            flows,
        })
    }

    pub fn drop_packet(&self, reason: DropReason) {
        self.drop_packets(reason, 1);
    }

    pub fn drop_packets(&self, reason: DropReason, count: u64) {
        let at = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.drop_handles[at].inc_by(count);
    }

    /// A plan entry left out for `reason` (`own_key`, `duplicate_key`).
    pub(crate) fn plan_peer_refused(&self, reason: &str) {
        self.plan_peers_refused.with_label_values(&[reason]).inc();
    }

    /// Whether the gateway is registered with its controller now.
    pub fn controller_connected(&self) -> bool {
        self.controller_connected.get() == 1
    }

    pub(crate) fn key_rotated(&self) {
        self.key_rotations.inc();
        self.key_last_rotation.set(unix_now());
    }

    pub fn initiated(&self, reason: Initiation) {
        self.initiations.with_label_values(&[reason.label()]).inc();
    }

    /// Handshakes started on the gateway's own initiative for `reason` so far.
    pub fn initiations(&self, reason: Initiation) -> u64 {
        self.initiations.with_label_values(&[reason.label()]).get()
    }

    pub fn http_refused(&self, reason: &str) {
        self.http_refused.with_label_values(&[reason]).inc();
    }

    /// Whether the anti-spoofing rules were installed.
    pub fn antispoof_enabled(&self) -> bool {
        self.antispoof_enabled.get() == 1
    }

    /// Records the kernel's running totals of dropped spoofed packets (IPv4, IPv6).
    pub fn record_spoofed(&self, totals: (u64, u64)) {
        for (i, (family, total)) in [("ipv4", totals.0), ("ipv6", totals.1)]
            .into_iter()
            .enumerate()
        {
            let before = self.spoofed_seen[i].swap(total, Ordering::Relaxed);
            self.spoofed
                .with_label_values(&[family])
                .inc_by(total.saturating_sub(before));
        }
    }

    /// Whether a plan has been applied since start.
    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// Dropped packets for `reason` so far.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.with_label_values(&[reason.label()]).get()
    }

    /// Records the node-encryption mode of the desired state just applied.
    pub fn set_node_encryption(&self, on: bool) {
        self.node_encryption.set(i64::from(on));
        self.node_encryption_known.store(true, Ordering::Relaxed);
    }

    /// The node-encryption mode applied; `None` when the source never said.
    pub fn node_encryption(&self) -> Option<bool> {
        self.node_encryption_known
            .load(Ordering::Relaxed)
            .then(|| self.node_encryption.get() == 1)
    }

    /// Removes every series of a peer that is gone.
    pub(crate) fn forget_peer(&self, peer: &str) {
        let labels = [peer];
        let _ = self.peer_tx_bytes.remove_label_values(&labels);
        let _ = self.peer_rx_bytes.remove_label_values(&labels);
        let _ = self.peer_tx_packets.remove_label_values(&labels);
        let _ = self.peer_rx_packets.remove_label_values(&labels);
        let _ = self.peer_handshakes.remove_label_values(&labels);
        let _ = self.peer_rekeys.remove_label_values(&labels);
        let _ = self.peer_last_handshake.remove_label_values(&labels);
        let _ = self.peer_queued.remove_label_values(&labels);
    }

    /// Called by the device loop on every timer tick.
    pub(crate) fn beat(&self) {
        self.heartbeat.store(unix_now() as u64, Ordering::Relaxed);
    }

    /// The device loop ticked within the last `max_age_seconds`.
    pub fn is_healthy(&self, max_age_seconds: u64) -> bool {
        let beat = self.heartbeat.load(Ordering::Relaxed);
        beat != 0 && (unix_now() as u64).saturating_sub(beat) <= max_age_seconds
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!("encode metrics: {e}");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn policy_drops_add_what_is_new_and_a_replaced_tables_counts_whole() {
        let metrics = super::Metrics::new().unwrap();
        let p = &metrics.policy;
        p.record_drops((5, 2, 1));
        p.record_drops((7, 2, 1));
        // Lower than last read: a table created again, counting from zero.
        p.record_drops((3, 2, 4));
        let text = metrics.render();
        for series in [
            r#"trellis_policy_dropped_packets_total{direction="ingress"} 10"#,
            r#"trellis_policy_dropped_packets_total{direction="egress"} 2"#,
            r#"trellis_policy_dropped_packets_total{direction="unknown_pod"} 4"#,
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
    }

    use super::*;

    #[test]
    fn renders_conventional_names() {
        let metrics = Metrics::new().unwrap();
        metrics.drop_packet(DropReason::Malformed);
        metrics
            .peer_tx_bytes
            .with_label_values(&["b/n1"])
            .inc_by(10);
        let text = metrics.render();
        assert!(text.contains("trellis_gateway_drops_total{reason=\"malformed\"} 1"));
        assert!(text.contains("trellis_gateway_peer_tx_bytes_total{peer=\"b/n1\"} 10"));
        assert!(text.contains("trellis_gateway_drops_total{reason=\"replay\"} 0"));
        assert!(text.contains("trellis_gateway_node_encryption 0"));
        assert_eq!(metrics.node_encryption(), None);
        metrics.set_node_encryption(true);
        assert_eq!(metrics.node_encryption(), Some(true));
        metrics.forget_peer("b/n1");
        assert!(!metrics.render().contains("b/n1"));
    }
}

/// NetworkPolicy's metrics (`trellis_policy_*`), and what the node's status report says of
/// the policy in the kernel.
#[derive(Clone)]
pub struct PolicyMetrics {
    enabled: IntGauge,
    rules: IntGauge,
    apply_duration: Histogram,
    last_apply: Gauge,
    apply_failures: IntCounter,
    dropped: IntCounterVec,
    /// The table's counts last read (ingress, egress, unknown pod), since it was created.
    seen: Arc<[AtomicU64; 3]>,
    /// The policy in the kernel (drop counts filled in when reported).
    in_kernel: Arc<Mutex<Option<PolicyReport>>>,
}

/// The `direction` labels of `trellis_policy_dropped_packets_total`.
pub const POLICY_DROP_DIRECTIONS: [&str; 3] = ["ingress", "egress", "unknown_pod"];

impl PolicyMetrics {
    fn new(registry: &Registry) -> Result<Self, Error> {
        let enabled = IntGauge::new(
            "trellis_policy_enabled",
            "1 while the node enforces NetworkPolicy (its policy table is in the kernel).",
        )?;
        let rules = IntGauge::new(
            "trellis_policy_rules",
            "Rules over all chains of the node's policy ruleset in the kernel.",
        )?;
        let apply_duration = Histogram::with_opts(
            HistogramOpts::new(
                "trellis_policy_apply_duration_seconds",
                "Time nft took to apply a change of the node's policy table (one transaction).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let last_apply = Gauge::new(
            "trellis_policy_last_apply_timestamp_seconds",
            "Unix time of the last successful change of the node's policy table.",
        )?;
        let apply_failures = IntCounter::new(
            "trellis_policy_apply_failures_total",
            "Policy changes not applied (the table keeps its previous rules; the next attempt replaces it whole).",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "trellis_policy_dropped_packets_total",
                "Packets dropped by NetworkPolicy, by direction; unknown_pod: to or from a pod the controller has not announced yet.",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(enabled.clone()))?;
        registry.register(Box::new(rules.clone()))?;
        registry.register(Box::new(apply_duration.clone()))?;
        registry.register(Box::new(last_apply.clone()))?;
        registry.register(Box::new(apply_failures.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        for direction in POLICY_DROP_DIRECTIONS {
            dropped.with_label_values(&[direction]).inc_by(0);
        }
        Ok(Self {
            enabled,
            rules,
            apply_duration,
            last_apply,
            apply_failures,
            dropped,
            seen: Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]),
            in_kernel: Arc::new(Mutex::new(None)),
        })
    }

    /// A change applied (`seconds` in the kernel; `None` when nothing had to change), and
    /// what the kernel holds now (`None`: no table).
    pub fn applied(&self, seconds: Option<f64>, in_kernel: Option<PolicyReport>) {
        if let Some(seconds) = seconds {
            self.apply_duration.observe(seconds);
            self.last_apply.set(unix_now());
        }
        self.enabled.set(i64::from(in_kernel.is_some()));
        self.rules.set(
            in_kernel
                .as_ref()
                .map_or(0, |r| i64::try_from(r.rules).unwrap_or(i64::MAX)),
        );
        if in_kernel.is_none() {
            for seen in self.seen.iter() {
                seen.store(0, Ordering::Relaxed);
            }
        }
        *self
            .in_kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = in_kernel;
    }

    pub fn failed(&self) {
        self.apply_failures.inc();
    }

    pub fn failures(&self) -> u64 {
        self.apply_failures.get()
    }

    /// Records the table's counters (ingress, egress, unknown pod). A count lower than the
    /// last one read means the table was replaced (its counters start again): all of it is new.
    pub fn record_drops(&self, totals: (u64, u64, u64)) {
        for (i, total) in [totals.0, totals.1, totals.2].into_iter().enumerate() {
            let before = self.seen[i].swap(total, Ordering::Relaxed);
            let new = if total < before {
                total
            } else {
                total - before
            };
            self.dropped
                .with_label_values(&[POLICY_DROP_DIRECTIONS[i]])
                .inc_by(new);
        }
    }

    /// What the status report says: the policy in the kernel with its table's drop counts.
    pub fn report(&self) -> Option<PolicyReport> {
        let mut report = self
            .in_kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        report.dropped_ingress = self.seen[0].load(Ordering::Relaxed);
        report.dropped_egress = self.seen[1].load(Ordering::Relaxed);
        Some(report)
    }
}
