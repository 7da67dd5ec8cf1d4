//! The peering protocol between the controllers of two clusters, sans IO.
//!
//! * **Version.** The protocol version travels in the TLS ALPN: both `trellis/2` and `trellis/1`
//!   are offered, the highest both speak is chosen; a peer that speaks neither fails the
//!   handshake instead of misreading frames. Version 2 differs only in how a snapshot travels:
//!   in parts (`SnapshotBegin`, `SnapshotPart`s of at most [`SNAPSHOT_PART_OBJECTS`] nodes,
//!   services, policy identities and pods, `SnapshotEnd`), so a state of 100,000 endpoints
//!   needs no giant frame; the assembled snapshot is still bounded by the frame limit in total.
//! * **Framing.** Each message is one frame of [`crate::framing`] (a length, then JSON); a
//!   length above the limit closes the connection before any of its body is buffered.
//! * **Exchange.** Both sides send `Hello` (their cluster ID, which must match the identity in
//!   their certificate), then a full `Snapshot` of their state, then `Delta`s with revision
//!   numbers as it changes, and a `Heartbeat` carrying their current revision whenever they
//!   have sent nothing for a heartbeat interval.
//! * **Lease.** A peer that sends nothing for a lease is expired: the caller withdraws its state
//!   and closes the connection.
//!
//! [`Session`] is the whole per-connection logic: bytes and `now` in, events out.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, ClusterState, Delta, ExportedService, NodeState};
use crate::framing::{FrameDecoder, FrameError, encode_json_frame};
use crate::keyed::Keyed;
use crate::policy::{Identity, PolicyEndpoint};

/// The ALPN protocol ID of version 1.
pub const ALPN_V1: &[u8] = b"trellis/1";
/// The ALPN protocol ID of version 2 (snapshots in parts).
pub const ALPN_V2: &[u8] = b"trellis/2";
/// The versions a controller offers, preferred first.
pub const ALPN_OFFERED: &[&[u8]] = &[ALPN_V2, ALPN_V1];
/// Nodes plus services per snapshot part (version 2).
pub const SNAPSHOT_PART_OBJECTS: usize = 500;

/// A negotiated protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    /// The version an ALPN protocol ID names.
    pub fn from_alpn(alpn: &[u8]) -> Option<Self> {
        match alpn {
            a if a == ALPN_V1 => Some(Version::V1),
            a if a == ALPN_V2 => Some(Version::V2),
            _ => None,
        }
    }
}
/// Frame bodies above this are refused unless configured otherwise.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PeeringError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("peer's certificate says cluster {certified} but it claims to be cluster {claimed}")]
    HelloIdentityMismatch {
        certified: ClusterId,
        claimed: ClusterId,
    },
    #[error("peer claims the local cluster's own ID {id}")]
    HelloDuplicateClusterId { id: ClusterId },
    #[error("unexpected {message} while {state}")]
    UnexpectedMessage {
        state: &'static str,
        message: &'static str,
    },
    #[error("{what} names cluster {named}, but the peer is cluster {peer}")]
    WrongCluster {
        what: &'static str,
        named: ClusterId,
        peer: ClusterId,
    },
    #[error("peer {peer} skipped revisions: at {at}, received {from}->{to}")]
    RevisionGap {
        peer: ClusterId,
        at: u64,
        from: u64,
        to: u64,
    },
    #[error("peer {peer}'s snapshot exceeds the limit of {limit} bytes in total")]
    StateTooLarge { peer: ClusterId, limit: usize },
    #[error("peer {peer}'s snapshot parts do not add up to what it announced")]
    SnapshotMismatch { peer: ClusterId },
    #[error("peer {peer} silent for {silent:?}, past its lease of {lease:?}")]
    LeaseExpired {
        peer: ClusterId,
        silent: Duration,
        lease: Duration,
    },
}

impl PeeringError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PeeringError::Frame(frame) => frame.kind(),
            PeeringError::HelloIdentityMismatch { .. } => "identity_mismatch",
            PeeringError::HelloDuplicateClusterId { .. } => "duplicate_cluster_id",
            PeeringError::UnexpectedMessage { .. } => "unexpected_message",
            PeeringError::WrongCluster { .. } => "wrong_cluster",
            PeeringError::RevisionGap { .. } => "revision_gap",
            PeeringError::LeaseExpired { .. } => "lease_expired",
            PeeringError::StateTooLarge { .. } => "state_too_large",
            PeeringError::SnapshotMismatch { .. } => "snapshot_mismatch",
        }
    }
}

/// The messages of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello {
        cluster: ClusterId,
        name: String,
    },
    Snapshot {
        state: ClusterState,
    },
    Delta {
        delta: Delta,
    },
    Heartbeat {
        revision: u64,
    },
    /// Version 2: a snapshot's header; `nodes` and `services` parts follow, then
    /// `SnapshotEnd`.
    SnapshotBegin {
        cluster: ClusterId,
        name: String,
        revision: u64,
        service_cidrs: Vec<ipnet::IpNet>,
        nodes: usize,
        services: usize,
        /// NetworkPolicy identities and pod endpoints (absent from peers that share none).
        #[serde(default, skip_serializing_if = "is_zero")]
        identities: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        pods: usize,
    },
    SnapshotPart {
        #[serde(default)]
        nodes: Vec<NodeState>,
        #[serde(default)]
        services: Vec<ExportedService>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        identities: Vec<Identity>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pods: Vec<PolicyEndpoint>,
    },
    SnapshotEnd,
}

impl Message {
    fn label(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Snapshot { .. } => "snapshot",
            Message::Delta { .. } => "delta",
            Message::Heartbeat { .. } => "heartbeat",
            Message::SnapshotBegin { .. } => "snapshot_begin",
            Message::SnapshotPart { .. } => "snapshot_part",
            Message::SnapshotEnd => "snapshot_end",
        }
    }
}

/// Encodes one message as a frame.
pub fn encode_frame(msg: &Message, max: usize) -> Result<Vec<u8>, FrameError> {
    encode_json_frame(msg, msg.label(), max)
}

/// Per-connection settings.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub local: ClusterId,
    pub local_name: String,
    /// The peer's identity as its certificate proves it.
    pub peer: ClusterId,
    pub heartbeat: Duration,
    pub lease: Duration,
    pub max_frame: usize,
}

/// What the caller must do.
#[derive(Debug)]
pub enum Event {
    /// Write these bytes to the stream.
    Transmit(Vec<u8>),
    /// The peer's full state: replace whatever was known of it.
    PeerSnapshot(ClusterState),
    /// The next change of the peer's state, already checked to follow the last one.
    PeerDelta(Delta),
    /// The session is over; withdraw nothing yet if the error is transient (the caller keeps
    /// the last state until the peer's lease runs out), except for `LeaseExpired`.
    Close(PeeringError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    AwaitSnapshot,
    Established,
    Closed,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::AwaitHello => "awaiting hello",
            Phase::AwaitSnapshot => "awaiting snapshot",
            Phase::Established => "established",
            Phase::Closed => "closed",
        }
    }
}

/// A version-2 snapshot being received.
#[derive(Debug)]
struct Assembly {
    state: ClusterState,
    nodes: usize,
    services: usize,
    identities: usize,
    pods: usize,
    bytes: usize,
}

impl Assembly {
    /// More objects of a kind than the header announced.
    fn overflowing(&self) -> bool {
        self.state.nodes.len() > self.nodes
            || self.state.services.len() > self.services
            || self.state.identities.len() > self.identities
            || self.state.pods.len() > self.pods
    }

    /// Exactly the objects the header announced.
    fn complete(&self) -> bool {
        self.state.nodes.len() == self.nodes
            && self.state.services.len() == self.services
            && self.state.identities.len() == self.identities
            && self.state.pods.len() == self.pods
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One peering connection's protocol state.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    version: Version,
    assembly: Option<Assembly>,
    phase: Phase,
    decoder: FrameDecoder,
    peer_revision: u64,
    sent_revision: Option<u64>,
    last_rx: Instant,
    last_tx: Instant,
}

impl Session {
    /// Starts a version-1 session; the returned events carry our `Hello` and snapshot.
    pub fn new(cfg: SessionConfig, local: &ClusterState, now: Instant) -> (Self, Vec<Event>) {
        Self::with_version(cfg, Version::V1, local, now)
    }

    /// Starts a session of the negotiated `version`.
    pub fn with_version(
        cfg: SessionConfig,
        version: Version,
        local: &ClusterState,
        now: Instant,
    ) -> (Self, Vec<Event>) {
        let decoder = FrameDecoder::new(cfg.max_frame);
        let mut s = Self {
            cfg,
            version,
            assembly: None,
            phase: Phase::AwaitHello,
            decoder,
            peer_revision: 0,
            sent_revision: None,
            last_rx: now,
            last_tx: now,
        };
        let mut out = Vec::new();
        let hello = Message::Hello {
            cluster: s.cfg.local.clone(),
            name: s.cfg.local_name.clone(),
        };
        s.send(&hello, now, &mut out);
        s.send_snapshot(local, now, &mut out);
        (s, out)
    }

    pub fn peer(&self) -> &ClusterId {
        &self.cfg.peer
    }

    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The peer's last revision we know.
    pub fn peer_revision(&self) -> u64 {
        self.peer_revision
    }

    fn send(&mut self, msg: &Message, now: Instant, out: &mut Vec<Event>) {
        match encode_frame(msg, self.cfg.max_frame) {
            Ok(bytes) => {
                self.last_tx = now;
                out.push(Event::Transmit(bytes));
            }
            Err(e) => self.close(e.into(), out),
        }
    }

    fn send_snapshot(&mut self, local: &ClusterState, now: Instant, out: &mut Vec<Event>) {
        self.sent_revision = Some(local.revision);
        if self.version == Version::V1 {
            self.send(
                &Message::Snapshot {
                    state: local.clone(),
                },
                now,
                out,
            );
            return;
        }
        self.send(
            &Message::SnapshotBegin {
                cluster: local.id.clone(),
                name: local.name.clone(),
                revision: local.revision,
                service_cidrs: local.service_cidrs.clone(),
                nodes: local.nodes.len(),
                services: local.services.len(),
                identities: local.identities.len(),
                pods: local.pods.len(),
            },
            now,
            out,
        );
        let mut nodes = local.nodes.values();
        let mut services = local.services.values();
        let mut identities = local.identities.values();
        let mut pods = local.pods.values();
        loop {
            let part_nodes: Vec<NodeState> = nodes
                .by_ref()
                .take(SNAPSHOT_PART_OBJECTS)
                .cloned()
                .collect();
            let mut room = SNAPSHOT_PART_OBJECTS - part_nodes.len();
            let part_services: Vec<ExportedService> =
                services.by_ref().take(room).cloned().collect();
            room -= part_services.len();
            let part_identities: Vec<Identity> = identities.by_ref().take(room).cloned().collect();
            room -= part_identities.len();
            let part_pods: Vec<PolicyEndpoint> = pods.by_ref().take(room).cloned().collect();
            if part_nodes.is_empty()
                && part_services.is_empty()
                && part_identities.is_empty()
                && part_pods.is_empty()
            {
                break;
            }
            self.send(
                &Message::SnapshotPart {
                    nodes: part_nodes,
                    services: part_services,
                    identities: part_identities,
                    pods: part_pods,
                },
                now,
                out,
            );
            if self.phase == Phase::Closed {
                return;
            }
        }
        self.send(&Message::SnapshotEnd, now, out);
    }

    fn close(&mut self, err: PeeringError, out: &mut Vec<Event>) {
        if self.phase != Phase::Closed {
            self.phase = Phase::Closed;
            out.push(Event::Close(err));
        }
    }

    /// Our state changed: send the deltas from what this peer last received up to `local`'s
    /// revision, taken from `recent` (the latest deltas, oldest first); if they do not form an
    /// unbroken chain, send a full snapshot instead.
    pub fn local_changed<D: std::borrow::Borrow<Delta>>(
        &mut self,
        local: &ClusterState,
        recent: &[D],
        now: Instant,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        let Some(sent) = self.sent_revision else {
            return out;
        };
        if self.phase == Phase::Closed || sent == local.revision {
            return out;
        }
        let start = recent.iter().position(|d| d.borrow().from == sent);
        let chain = start.map(|i| &recent[i..]).filter(|chain| {
            chain
                .windows(2)
                .all(|w| w[0].borrow().to == w[1].borrow().from)
                && chain
                    .last()
                    .is_some_and(|d| d.borrow().to == local.revision)
        });
        match chain {
            Some([one]) => {
                let d = one.borrow();
                self.sent_revision = Some(d.to);
                self.send(&Message::Delta { delta: d.clone() }, now, &mut out);
            }
            Some(chain) => {
                // Several pending deltas go out as one: changes apply in order, so their
                // concatenation takes the peer from the first `from` to the last `to`.
                let first = chain[0].borrow();
                let merged = Delta {
                    cluster: first.cluster.clone(),
                    from: first.from,
                    to: local.revision,
                    changes: chain
                        .iter()
                        .flat_map(|d| d.borrow().changes.iter().cloned())
                        .collect(),
                };
                self.sent_revision = Some(merged.to);
                self.send(&Message::Delta { delta: merged }, now, &mut out);
            }
            None => self.send_snapshot(local, now, &mut out),
        }
        out
    }

    /// Bytes arrived from the peer.
    pub fn handle_bytes(&mut self, bytes: &[u8], now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        if self.phase == Phase::Closed {
            return out;
        }
        self.decoder.push(bytes);
        loop {
            let before = self.decoder.buffered();
            match self.decoder.next_json::<Message>() {
                Ok(Some(msg)) => {
                    self.last_rx = now;
                    let size = before.saturating_sub(self.decoder.buffered());
                    self.handle_message(msg, size, &mut out);
                    if self.phase == Phase::Closed {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.close(e.into(), &mut out);
                    break;
                }
            }
        }
        out
    }

    fn handle_message(&mut self, msg: Message, size: usize, out: &mut Vec<Event>) {
        let unexpected = |phase: Phase, m: &Message| PeeringError::UnexpectedMessage {
            state: phase.label(),
            message: m.label(),
        };
        let msg = if self.version == Version::V2 {
            match self.handle_part(msg, size, out) {
                Some(msg) => msg,
                None => return,
            }
        } else {
            msg
        };
        match (self.phase, msg) {
            (Phase::AwaitHello, Message::Hello { cluster, .. }) => {
                if cluster == self.cfg.local {
                    self.close(PeeringError::HelloDuplicateClusterId { id: cluster }, out);
                } else if cluster != self.cfg.peer {
                    self.close(
                        PeeringError::HelloIdentityMismatch {
                            certified: self.cfg.peer.clone(),
                            claimed: cluster,
                        },
                        out,
                    );
                } else {
                    self.phase = Phase::AwaitSnapshot;
                }
            }
            (Phase::AwaitSnapshot | Phase::Established, Message::Snapshot { state }) => {
                if state.id != self.cfg.peer {
                    let err = PeeringError::WrongCluster {
                        what: "snapshot",
                        named: state.id.clone(),
                        peer: self.cfg.peer.clone(),
                    };
                    self.close(err, out);
                } else {
                    self.phase = Phase::Established;
                    self.peer_revision = state.revision;
                    out.push(Event::PeerSnapshot(state));
                }
            }
            (Phase::Established, Message::Delta { delta }) => {
                if delta.cluster != self.cfg.peer {
                    let err = PeeringError::WrongCluster {
                        what: "delta",
                        named: delta.cluster.clone(),
                        peer: self.cfg.peer.clone(),
                    };
                    self.close(err, out);
                } else if delta.from != self.peer_revision || delta.to <= delta.from {
                    let err = PeeringError::RevisionGap {
                        peer: self.cfg.peer.clone(),
                        at: self.peer_revision,
                        from: delta.from,
                        to: delta.to,
                    };
                    self.close(err, out);
                } else {
                    self.peer_revision = delta.to;
                    out.push(Event::PeerDelta(delta));
                }
            }
            (Phase::Established, Message::Heartbeat { revision }) => {
                if revision != self.peer_revision {
                    let err = PeeringError::RevisionGap {
                        peer: self.cfg.peer.clone(),
                        at: self.peer_revision,
                        from: revision,
                        to: revision,
                    };
                    self.close(err, out);
                }
            }
            (Phase::AwaitSnapshot, Message::Heartbeat { .. }) => {}
            (phase, m) => {
                let err = unexpected(phase, &m);
                self.close(err, out);
            }
        }
    }

    /// Version 2's snapshot parts: assembles them and hands back the whole snapshot as a
    /// `Snapshot` message at its end; other messages pass through.
    fn handle_part(&mut self, msg: Message, size: usize, out: &mut Vec<Event>) -> Option<Message> {
        let unexpected = |phase: Phase, m: &Message| PeeringError::UnexpectedMessage {
            state: phase.label(),
            message: m.label(),
        };
        let peer = self.cfg.peer.clone();
        match msg {
            Message::SnapshotBegin {
                cluster,
                name,
                revision,
                service_cidrs,
                nodes,
                services,
                identities,
                pods,
            } if matches!(self.phase, Phase::AwaitSnapshot | Phase::Established)
                && self.assembly.is_none() =>
            {
                if cluster != peer {
                    let err = PeeringError::WrongCluster {
                        what: "snapshot",
                        named: cluster,
                        peer,
                    };
                    self.close(err, out);
                    return None;
                }
                let mut state = ClusterState::new(cluster, name);
                state.revision = revision;
                state.service_cidrs = service_cidrs;
                self.assembly = Some(Assembly {
                    state,
                    nodes,
                    services,
                    identities,
                    pods,
                    bytes: size,
                });
                None
            }
            Message::SnapshotPart {
                nodes,
                services,
                identities,
                pods,
            } if self.assembly.is_some() => {
                let limit = self.cfg.max_frame;
                let a = self.assembly.as_mut().expect("checked");
                a.bytes = a.bytes.saturating_add(size);
                if a.bytes > limit {
                    self.assembly = None;
                    self.close(PeeringError::StateTooLarge { peer, limit }, out);
                    return None;
                }
                for n in nodes {
                    a.state.nodes.insert(n.name.clone(), n);
                }
                for svc in services {
                    a.state.services.insert(svc.key(), svc);
                }
                for identity in identities {
                    a.state.identities.insert(identity.key.clone(), identity);
                }
                for pod in pods {
                    a.state.pods.insert(pod.key(), pod);
                }
                if a.overflowing() {
                    self.assembly = None;
                    self.close(PeeringError::SnapshotMismatch { peer }, out);
                    return None;
                }
                None
            }
            Message::SnapshotEnd if self.assembly.is_some() => {
                let a = self.assembly.take().expect("checked");
                if !a.complete() {
                    self.close(PeeringError::SnapshotMismatch { peer }, out);
                    return None;
                }
                Some(Message::Snapshot { state: a.state })
            }
            m @ (Message::SnapshotBegin { .. }
            | Message::SnapshotPart { .. }
            | Message::SnapshotEnd) => {
                let err = unexpected(self.phase, &m);
                self.close(err, out);
                None
            }
            m if self.assembly.is_some() => {
                let err = unexpected(self.phase, &m);
                self.close(err, out);
                None
            }
            m => Some(m),
        }
    }

    /// When [`Session::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Instant {
        (self.last_tx + self.cfg.heartbeat).min(self.last_rx + self.cfg.lease)
    }

    /// Time passed: send a heartbeat if due, expire the peer if it has been silent too long.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        if self.phase == Phase::Closed {
            return out;
        }
        let silent = now.saturating_duration_since(self.last_rx);
        if silent >= self.cfg.lease {
            let err = PeeringError::LeaseExpired {
                peer: self.cfg.peer.clone(),
                silent,
                lease: self.cfg.lease,
            };
            self.close(err, &mut out);
            return out;
        }
        if now.saturating_duration_since(self.last_tx) >= self.cfg.heartbeat {
            let revision = self.sent_revision.unwrap_or(0);
            self.send(&Message::Heartbeat { revision }, now, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::fixture;
    use crate::cluster::fixture::*;

    fn cfg(local: &str, peer: &str) -> SessionConfig {
        SessionConfig {
            local: id(local),
            local_name: local.into(),
            peer: id(peer),
            heartbeat: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            max_frame: 1 << 20,
        }
    }

    /// The frames a session asked to transmit, one `Vec` each.
    pub(super) fn frames(events: &[Event]) -> Vec<Vec<u8>> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Transmit(b) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    fn bytes_of(events: &[Event]) -> Vec<u8> {
        frames(events).concat()
    }

    fn close_of(events: &[Event]) -> Option<&PeeringError> {
        events.iter().find_map(|e| match e {
            Event::Close(err) => Some(err),
            _ => None,
        })
    }

    /// Two sessions wired back to back.
    fn pair(now: Instant) -> (Session, Session, ClusterState, ClusterState) {
        let (a_state, b_state) = clusters_a_b();
        let (mut a, a_out) = Session::new(cfg("a", "b"), &a_state, now);
        let (mut b, b_out) = Session::new(cfg("b", "a"), &b_state, now);
        let at_b = b.handle_bytes(&bytes_of(&a_out), now);
        let at_a = a.handle_bytes(&bytes_of(&b_out), now);
        assert!(
            matches!(&at_b[..], [Event::PeerSnapshot(got)] if *got == a_state),
            "{at_b:?}"
        );
        assert!(
            matches!(&at_a[..], [Event::PeerSnapshot(got)] if *got == b_state),
            "{at_a:?}"
        );
        assert!(a.is_established() && b.is_established());
        (a, b, a_state, b_state)
    }

    /// The v1 wire format is a contract between clusters running different versions: this
    /// golden frame must keep decoding (and encoding the same) as the code changes.
    #[test]
    fn the_v1_wire_format_is_stable() {
        let golden = r#"{"type":"delta","delta":{"cluster":"east","from":4,"to":5,"changes":[{"op":"meta","name":"East","service_cidrs":["10.96.0.0/16"]},{"op":"upsert_node","name":"n1","pod_cidrs":["10.10.1.0/24"],"internal_ips":["192.168.1.11"],"gateway":{"endpoint":"192.168.1.11:51820","public_key":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="}},{"op":"remove_node","name":"n0"},{"op":"upsert_service","namespace":"shop","name":"web","kind":"ClusterSetIP","cluster_ips":["10.96.0.10"],"ports":[{"name":"http","protocol":"TCP","port":80}],"endpoints":[{"addresses":["10.10.1.5"],"node":"n1","ready":true}],"endpoint_ports":[{"protocol":"TCP","port":8080}]},{"op":"remove_service","namespace":"shop","name":"old"}]}}"#;
        let msg: Message = serde_json::from_str(golden).unwrap();
        let mut frame = (golden.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(golden.as_bytes());
        assert_eq!(encode_frame(&msg, 1 << 20).unwrap(), frame);
        let hb = encode_frame(&Message::Heartbeat { revision: 3 }, 1 << 20).unwrap();
        assert_eq!(&hb[4..], br#"{"type":"heartbeat","revision":3}"#);
    }

    #[test]
    fn frames_round_trip_even_split_byte_by_byte() {
        let msg = Message::Heartbeat { revision: 7 };
        let frame = encode_frame(&msg, 1024).unwrap();
        let mut d = FrameDecoder::new(1024);
        for b in &frame[..frame.len() - 1] {
            d.push(std::slice::from_ref(b));
            assert_eq!(d.next_json::<Message>().unwrap(), None);
        }
        d.push(&frame[frame.len() - 1..]);
        assert_eq!(d.next_json::<Message>().unwrap(), Some(msg));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering_the_body() {
        let mut d = FrameDecoder::new(100);
        d.push(&u32::MAX.to_be_bytes());
        assert!(matches!(
            d.next_json::<Message>(),
            Err(FrameError::TooLarge { max: 100, .. })
        ));
        let big = Message::Hello {
            cluster: id("a"),
            name: "x".repeat(200),
        };
        assert!(encode_frame(&big, 100).is_err());
    }

    #[test]
    fn malformed_frames_close_the_session() {
        let now = Instant::now();
        let (mut a, _b, _, _) = pair(now);
        let mut junk = 5u32.to_be_bytes().to_vec();
        junk.extend_from_slice(b"{nope");
        let out = a.handle_bytes(&junk, now);
        assert!(matches!(
            close_of(&out),
            Some(PeeringError::Frame(FrameError::Malformed(_)))
        ));
        assert!(a.is_closed());
        // A closed session ignores anything else.
        assert!(a.handle_bytes(&junk, now).is_empty());
        let mut unknown = Vec::new();
        let body = br#"{"type":"launch_missiles"}"#;
        unknown.extend_from_slice(&(body.len() as u32).to_be_bytes());
        unknown.extend_from_slice(body);
        let (mut c, _) = Session::new(
            cfg("a", "b"),
            &cluster("a", "10.1.0.0/24", "10.96.0.0/16"),
            now,
        );
        assert!(matches!(
            close_of(&c.handle_bytes(&unknown, now)),
            Some(PeeringError::Frame(FrameError::Malformed(_)))
        ));
    }

    #[test]
    fn hello_must_match_the_certified_identity() {
        let now = Instant::now();
        let evil = cluster("c", "10.3.0.0/24", "10.98.0.0/16");
        // The certificate said "b", the peer says "c".
        let (mut a, _) = Session::new(
            cfg("a", "b"),
            &cluster("a", "10.1.0.0/24", "10.96.0.0/16"),
            now,
        );
        let (_c, c_out) = Session::new(cfg("c", "a"), &evil, now);
        let out = a.handle_bytes(&bytes_of(&c_out), now);
        let err = close_of(&out).unwrap();
        assert_eq!(
            err.to_string(),
            "peer's certificate says cluster b but it claims to be cluster c"
        );
        assert_eq!(err.kind(), "identity_mismatch");
        assert!(!out.iter().any(|e| matches!(e, Event::PeerSnapshot(_))));
    }

    #[test]
    fn a_peer_claiming_our_own_id_is_refused() {
        let now = Instant::now();
        let a_state = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        let (mut a, _) = Session::new(cfg("a", "a"), &a_state, now);
        let (_twin, out) = Session::new(cfg("a", "a"), &a_state, now);
        let events = a.handle_bytes(&bytes_of(&out), now);
        assert!(matches!(
            close_of(&events),
            Some(PeeringError::HelloDuplicateClusterId { .. })
        ));
    }

    #[test]
    fn snapshot_before_hello_is_a_protocol_error() {
        let now = Instant::now();
        let (mut a, _) = Session::new(
            cfg("a", "b"),
            &cluster("a", "10.1.0.0/24", "10.96.0.0/16"),
            now,
        );
        let snap = encode_frame(
            &Message::Snapshot {
                state: cluster("b", "10.2.0.0/24", "10.97.0.0/16"),
            },
            1 << 20,
        )
        .unwrap();
        let out = a.handle_bytes(&snap, now);
        assert!(matches!(
            close_of(&out),
            Some(PeeringError::UnexpectedMessage { .. })
        ));
    }

    #[test]
    fn deltas_flow_in_order_and_gaps_close() {
        let now = Instant::now();
        let (mut a, mut b, a_state, _) = pair(now);
        let mut next = a_state.clone();
        next.revision = 1;
        fixture::export(
            &mut next.services,
            "shop",
            "web",
            "10.96.0.10",
            &["10.1.0.5"],
        );
        let delta = a_state.delta_to(&next).unwrap();
        let out = a.local_changed(&next, std::slice::from_ref(&delta), now);
        let got = b.handle_bytes(&bytes_of(&out), now);
        assert!(
            matches!(&got[..], [Event::PeerDelta(got)] if *got == delta),
            "{got:?}"
        );
        assert_eq!(b.peer_revision(), 1);
        // No change, nothing sent.
        assert!(a.local_changed::<Delta>(&next, &[], now).is_empty());
        // A delta that does not follow what was sent becomes a snapshot.
        let mut later = next.clone();
        later.revision = 5;
        later.name = "renamed".into();
        let stale = Delta {
            cluster: id("a"),
            from: 3,
            to: 5,
            changes: vec![],
        };
        let out = a.local_changed(&later, std::slice::from_ref(&stale), now);
        let got = b.handle_bytes(&bytes_of(&out), now);
        assert!(
            matches!(&got[..], [Event::PeerSnapshot(got)] if *got == later),
            "{got:?}"
        );
        // A forged gap on the wire closes the connection.
        let gap = encode_frame(&Message::Delta { delta: stale }, 1 << 20).unwrap();
        let got = b.handle_bytes(&gap, now);
        assert!(matches!(
            close_of(&got),
            Some(PeeringError::RevisionGap { at: 5, .. })
        ));
    }

    #[test]
    fn several_pending_deltas_go_out_merged_in_one_frame() {
        let now = Instant::now();
        let (mut a, mut b, a_state, _) = pair(now);
        let mut states = vec![a_state.clone()];
        let mut deltas = Vec::new();
        for i in 1..=3u64 {
            let mut next = states.last().unwrap().clone();
            next.revision = i;
            next.name = format!("name {i}");
            deltas.push(states.last().unwrap().delta_to(&next).unwrap());
            states.push(next);
        }
        let out = a.local_changed(states.last().unwrap(), &deltas, now);
        assert_eq!(out.len(), 1, "one frame for the whole chain");
        let got = b.handle_bytes(&bytes_of(&out), now);
        assert_eq!(got.len(), 1);
        assert_eq!(b.peer_revision(), 3);
        let mut mirror = a_state.clone();
        for e in got {
            let Event::PeerDelta(d) = e else {
                panic!("{e:?}")
            };
            mirror.apply(&d).unwrap();
        }
        assert_eq!(&mirror, states.last().unwrap());
    }

    #[test]
    fn heartbeats_keep_the_lease_and_silence_expires_it() {
        let t0 = Instant::now();
        let (mut a, mut b, _, _) = pair(t0);
        assert_eq!(a.poll_timeout(), t0 + Duration::from_secs(5));
        // Both heartbeat every 5 s for a minute: nobody expires.
        let mut t = t0;
        for _ in 0..12 {
            t += Duration::from_secs(5);
            let ha = a.handle_timeout(t);
            let hb = b.handle_timeout(t);
            assert!(close_of(&ha).is_none() && close_of(&hb).is_none());
            assert!(b.handle_bytes(&bytes_of(&ha), t).is_empty());
            assert!(a.handle_bytes(&bytes_of(&hb), t).is_empty());
        }
        // Now b falls silent; a keeps sending heartbeats until the lease runs out.
        let silent_from = t;
        loop {
            t = a.poll_timeout();
            let out = a.handle_timeout(t);
            if let Some(err) = close_of(&out) {
                assert!(matches!(err, PeeringError::LeaseExpired { .. }), "{err}");
                assert_eq!(err.kind(), "lease_expired");
                break;
            }
            assert!(t - silent_from < Duration::from_secs(31));
        }
        assert_eq!(t - silent_from, Duration::from_secs(30));
        assert!(a.is_closed());
    }

    #[test]
    fn heartbeat_announcing_an_unknown_revision_forces_a_resync() {
        let now = Instant::now();
        let (_a, mut b, _, _) = pair(now);
        let hb = encode_frame(&Message::Heartbeat { revision: 9 }, 1 << 20).unwrap();
        assert!(matches!(
            close_of(&b.handle_bytes(&hb, now)),
            Some(PeeringError::RevisionGap { .. })
        ));
    }
}

#[cfg(test)]
mod v2_tests {
    use super::tests::frames;
    use super::*;
    use crate::cluster::fixture::*;

    fn cfg(local: &str, peer: &str, max_frame: usize) -> SessionConfig {
        SessionConfig {
            local: id(local),
            local_name: local.into(),
            peer: id(peer),
            heartbeat: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            max_frame,
        }
    }

    /// Cluster a with `n` services of 10 endpoints each.
    fn big(n: usize) -> ClusterState {
        let mut a = cluster("a", "10.1.0.0/16", "10.96.0.0/12");
        for i in 0..n {
            let eps: Vec<String> = (0..10)
                .map(|e| {
                    format!(
                        "10.1.{}.{}",
                        (i * 10 + e) / 250 % 250,
                        (i * 10 + e) % 250 + 1
                    )
                })
                .collect();
            let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
            export(&mut a.services, "load", &format!("s{i}"), "10.96.0.1", &eps);
        }
        a
    }

    #[test]
    fn a_large_snapshot_travels_in_bounded_parts_and_arrives_whole() {
        let now = Instant::now();
        // 10,000 services × 10 endpoints = 100,000 endpoints.
        let a_state = big(10_000);
        let b_state = cluster("b", "10.2.0.0/16", "10.97.0.0/16");
        let (_, a_out) = Session::with_version(cfg("a", "b", 64 << 20), Version::V2, &a_state, now);
        let sizes: Vec<usize> = frames(&a_out).iter().map(Vec::len).collect();
        let largest = *sizes.iter().max().unwrap();
        let total: usize = sizes.iter().sum();
        assert!(sizes.len() > 20, "{} frames", sizes.len());
        assert!(largest < 1 << 20, "largest part {largest} bytes of {total}");
        let (mut b, _) = Session::with_version(cfg("b", "a", 64 << 20), Version::V2, &b_state, now);
        // Fed in odd-sized pieces, as a stream delivers them.
        let bytes: Vec<u8> = frames(&a_out).concat();
        let mut got = Vec::new();
        for piece in bytes.chunks(65_537) {
            got.extend(b.handle_bytes(piece, now));
        }
        assert!(
            matches!(&got[..], [Event::PeerSnapshot(s)] if *s == a_state),
            "{}",
            got.len()
        );
        assert!(b.is_established());
        // The same state in version 1 is one frame of the total's size.
        let (_, v1) = Session::new(cfg("a", "b", 64 << 20), &a_state, now);
        let v1_largest = frames(&v1).iter().map(Vec::len).max().unwrap();
        assert!(v1_largest > 10 * largest, "{v1_largest} vs {largest}");
        eprintln!(
            "100,000 endpoints: v2 {} frames, largest {largest} B, {total} B in all; v1 one \
             frame of {v1_largest} B",
            sizes.len()
        );
        // Deltas still flow after it.
        let mut next = a_state.clone();
        next.revision = 1;
        next.services.clear();
        let delta = a_state.delta_to(&next).unwrap();
        let ev = b.handle_bytes(
            &encode_frame(&Message::Delta { delta }, 64 << 20).unwrap(),
            now,
        );
        assert!(matches!(&ev[..], [Event::PeerDelta(_)]), "{ev:?}");
    }

    #[test]
    fn a_snapshot_in_parts_carries_the_policy_identities_and_pods() {
        use crate::policy::{IdentityKey, IdentityLabels};
        let now = Instant::now();
        let mut a_state = big(600);
        // More pods than fit in one part, so they span parts too.
        for i in 0..1_200u32 {
            let key = IdentityKey {
                cluster: id("a"),
                number: i % 7 + 1,
            };
            a_state.identities.insert(
                key.clone(),
                Identity {
                    key: key.clone(),
                    labels: IdentityLabels {
                        namespace: "load".into(),
                        ..Default::default()
                    },
                },
            );
            let pod = PolicyEndpoint {
                cluster: id("a"),
                namespace: "load".into(),
                name: format!("p{i}"),
                addresses: vec![format!("10.1.{}.{}", i / 250, i % 250 + 1).parse().unwrap()],
                node: "n".into(),
                identity: key.number,
                named_ports: vec![],
            };
            a_state.pods.insert(pod.key(), pod);
        }
        let b_state = cluster("b", "10.2.0.0/16", "10.97.0.0/16");
        let (_, a_out) = Session::with_version(cfg("a", "b", 64 << 20), Version::V2, &a_state, now);
        let (mut b, _) = Session::with_version(cfg("b", "a", 64 << 20), Version::V2, &b_state, now);
        let got = b.handle_bytes(&frames(&a_out).concat(), now);
        match &got[..] {
            [Event::PeerSnapshot(s)] => {
                assert_eq!(s.identities.len(), 7);
                assert_eq!(s.pods.len(), 1_200);
                assert_eq!(*s, a_state);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_total_of_the_parts_is_bounded_by_the_limit() {
        let now = Instant::now();
        let a_state = big(2_000);
        let (_, a_out) = Session::with_version(cfg("a", "b", 64 << 20), Version::V2, &a_state, now);
        let (mut b, _) = Session::with_version(
            cfg("b", "a", 1 << 20),
            Version::V2,
            &cluster("b", "10.2.0.0/16", "10.97.0.0/16"),
            now,
        );
        let hello = encode_frame(
            &Message::Hello {
                cluster: id("a"),
                name: "a".into(),
            },
            1 << 20,
        )
        .unwrap();
        let mut events = b.handle_bytes(&hello, now);
        for f in frames(&a_out).iter().skip(1) {
            events.extend(b.handle_bytes(f, now));
        }
        let err = events
            .iter()
            .find_map(|e| match e {
                Event::Close(err) => Some(err),
                _ => None,
            })
            .expect("closed");
        assert_eq!(err.kind(), "state_too_large", "{err}");
        assert!(!events.iter().any(|e| matches!(e, Event::PeerSnapshot(_))));
    }

    #[test]
    fn parts_that_do_not_add_up_or_come_out_of_turn_close_the_session() {
        let now = Instant::now();
        let start = || {
            let (mut b, _) = Session::with_version(
                cfg("b", "a", 1 << 20),
                Version::V2,
                &cluster("b", "10.2.0.0/16", "10.97.0.0/16"),
                now,
            );
            let hello = Message::Hello {
                cluster: id("a"),
                name: "a".into(),
            };
            assert!(
                b.handle_bytes(&encode_frame(&hello, 1 << 20).unwrap(), now)
                    .is_empty()
            );
            b
        };
        let begin = |nodes| Message::SnapshotBegin {
            cluster: id("a"),
            name: "a".into(),
            revision: 3,
            service_cidrs: vec![],
            nodes,
            services: 0,
            identities: 0,
            pods: 0,
        };
        let node = cluster("a", "10.1.0.0/24", "10.96.0.0/16").nodes["node-0"].clone();
        let part = Message::SnapshotPart {
            nodes: vec![node],
            services: vec![],
            identities: vec![],
            pods: vec![],
        };
        let cases: Vec<(Vec<Message>, &str)> = vec![
            (
                vec![begin(2), part.clone(), Message::SnapshotEnd],
                "snapshot_mismatch",
            ),
            (vec![begin(0), part.clone()], "snapshot_mismatch"),
            (vec![part.clone()], "unexpected_message"),
            (vec![Message::SnapshotEnd], "unexpected_message"),
            (vec![begin(1), begin(1)], "unexpected_message"),
            (
                vec![begin(1), Message::Heartbeat { revision: 3 }],
                "unexpected_message",
            ),
        ];
        for (messages, want) in cases {
            let mut b = start();
            let mut events = Vec::new();
            for m in &messages {
                events.extend(b.handle_bytes(&encode_frame(m, 1 << 20).unwrap(), now));
            }
            let kind = events.iter().find_map(|e| match e {
                Event::Close(err) => Some(err.kind()),
                _ => None,
            });
            assert_eq!(kind, Some(want), "{messages:?}");
        }
        // A version-1 session knows no parts.
        let (mut v1, _) = Session::new(
            cfg("b", "a", 1 << 20),
            &cluster("b", "10.2.0.0/16", "10.97.0.0/16"),
            now,
        );
        let hello = Message::Hello {
            cluster: id("a"),
            name: "a".into(),
        };
        v1.handle_bytes(&encode_frame(&hello, 1 << 20).unwrap(), now);
        let ev = v1.handle_bytes(&encode_frame(&begin(0), 1 << 20).unwrap(), now);
        assert!(matches!(&ev[..], [Event::Close(e)] if e.kind() == "unexpected_message"));
        assert_eq!(Version::from_alpn(b"trellis/2"), Some(Version::V2));
        assert_eq!(Version::from_alpn(b"trellis/3"), None);
    }
}
