//! A worker's loop, and its batches in each direction. Packets are read in batches (up to
//! `batch` per wake-up), processed, then written. The cryptography runs in synchronous
//! steps, under the peers' locks; the sends between them run with no lock held.

use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};

use super::demux::{
    COOKIE_REPLY, DATA, DATA_MIN_LEN, Demux, HANDSHAKE_INIT, HANDSHAKE_RESPONSE, demux,
    drop_reason, unknown_session,
};
use super::nudge::note_unknown_session;
use super::peers::{PeerState, PeerTable};
use super::{Device, Role, Shared, commands::next_command};
use crate::Error;
use crate::io::{TUN_HEADROOM, Tun, Udp};
use crate::metrics::DropReason;
use crate::offload::{
    Feature, MAX_SPLIT_SEGMENTS, Offloads, UDP_MAX_GSO_BYTES, UDP_MAX_SEGMENTS, gro_segments,
    plan_gso_groups,
};

/// Consecutive failed TUN reads (10 ms apart) after which the TUN is considered gone (its
/// interface deleted): the loop stops with an error rather than spin.
const MAX_TUN_FAILURES: u32 = 100;
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

/// What the decrypting step needs sent before it goes on.
enum Pending {
    /// A cookie reply of `len` bytes in the scratch buffer.
    Cookie { len: usize, to: SocketAddr },
    /// A handshake message or cookie reply of `len` bytes in `tun_out[buf]`, after the
    /// headroom; with `flush`, the packets peer `slot` queued for the handshake go next.
    Reply {
        buf: usize,
        len: usize,
        to: SocketAddr,
        slot: u32,
        flush: bool,
    },
}

/// One peer's lock, kept over a run of packets for that peer.
struct Held<'t> {
    slot: u32,
    state: MutexGuard<'t, PeerState>,
}

/// The lock of `slot` (taking it, after releasing any other: a worker never holds two).
fn hold<'h, 't>(
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

impl<T: Tun, U: Udp> Device<T, U> {
    pub(super) fn worker(tun: T, udp: U, shared: Arc<Shared>, role: Role) -> Self {
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

    /// Runs until every [`super::DeviceHandle`] is dropped (`Ok`) or the TUN fails for good,
    /// e.g. its interface was deleted (`Err`; routes to encrypted peers then hit their
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
            self.forget_all();
        }
        result
    }

    /// Mirrors the offloads in use, and any new refusals, into the metrics.
    pub(super) fn report_offloads(&mut self) {
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

    fn forget_all(&mut self) {
        for peer in self.shared.table.load().peers.values() {
            self.metrics.forget_peer(&peer.lock().name);
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
                let table = self.shared.table.load_full();
                self.encrypt(&table, count);
                self.send_planned().await;
            }
            if drained {
                break;
            }
        }
    }

    /// Encrypts `tun_in[..count]` into `net_out`, planning where each datagram goes.
    fn encrypt(&mut self, table: &PeerTable, count: usize) {
        self.net_plan.clear();
        let mut held = None;
        for i in 0..count {
            let packet = &self.tun_in[i][..self.tun_sizes[i]];
            let Some(&slot) = Tunn::dst_address(packet).and_then(|dst| table.allowed.lookup(dst))
            else {
                self.metrics.drop_packet(DropReason::NoRoute);
                continue;
            };
            let peer = match hold(&mut held, table, slot) {
                Some(peer) if !peer.removed => peer,
                _ => {
                    self.metrics.drop_packet(DropReason::NoRoute);
                    continue;
                }
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
                        peer.sent(packet.len() as u64);
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
        let table = self.shared.table.load_full();
        let mut next = 0;
        let mut writes = 0;
        let mut unknown_sessions: Vec<SocketAddr> = Vec::new();
        while let Some(pending) =
            self.decrypt_until_send(&table, &mut next, &mut writes, &mut unknown_sessions)
        {
            match pending {
                Pending::Cookie { len, to } => {
                    if let Err(e) = self.udp.send_to(&self.scratch[..len], to).await {
                        tracing::debug!("send cookie to {to}: {e}");
                    }
                }
                Pending::Reply {
                    buf,
                    len,
                    to,
                    slot,
                    flush,
                } => {
                    let reply = &self.tun_out[buf][TUN_HEADROOM..TUN_HEADROOM + len];
                    if let Err(e) = self.udp.send_to(reply, to).await {
                        tracing::debug!("UDP send to {to}: {e}");
                        self.metrics.drop_packet(DropReason::SocketError);
                    }
                    if flush {
                        self.flush_queued(&table, slot, to).await;
                    }
                }
            }
        }
        if !unknown_sessions.is_empty() {
            self.nudge(&table, &unknown_sessions).await;
        }
        if writes > 0
            && let Err(e) = self.tun.send_packets(&mut self.tun_out[..writes]).await
        {
            tracing::debug!("TUN write: {e}");
            self.metrics.drop_packet(DropReason::TunError);
        }
        drained
    }

    /// Decrypts `net_datagrams[*next..]` into `tun_out[*writes..]` until one needs a reply
    /// sent (returned, for the caller to send before it calls again) or none is left.
    fn decrypt_until_send(
        &mut self,
        table: &PeerTable,
        next: &mut usize,
        writes: &mut usize,
        unknown_sessions: &mut Vec<SocketAddr>,
    ) -> Option<Pending> {
        let mut held = None;
        while *next < self.net_datagrams.len() {
            let (start, len, from) = self.net_datagrams[*next];
            *next += 1;
            let datagram = &self.net_in[start..start + len];
            let slot = match demux(
                table,
                &self.shared.keys,
                &self.limiter,
                datagram,
                from,
                &mut self.scratch,
            ) {
                Demux::Peer(peer) => peer.slot,
                Demux::Drop(reason) => {
                    if reason == DropReason::NoPeer && datagram.first() == Some(&DATA) {
                        note_unknown_session(unknown_sessions, from);
                    }
                    self.metrics.drop_packet(reason);
                    continue;
                }
                Demux::Cookie(len) => {
                    self.metrics.drop_packet(DropReason::RateLimited);
                    return Some(Pending::Cookie { len, to: from });
                }
            };
            let peer = match hold(&mut held, table, slot) {
                Some(peer) if !peer.removed => peer,
                _ => {
                    self.metrics.drop_packet(DropReason::NoPeer);
                    continue;
                }
            };
            let kind = datagram[0];
            let buf = &mut self.tun_out[*writes];
            buf.resize(TUN_HEADROOM + self.stride, 0);
            match peer
                .tunn
                .decapsulate(Some(from.ip()), datagram, &mut buf[TUN_HEADROOM..])
            {
                TunnResult::WriteToNetwork(reply) => {
                    let flush = reply[0] != COOKIE_REPLY;
                    if flush {
                        // A response to an initiation, or the keepalive confirming a response.
                        if kind == HANDSHAKE_INIT || kind == HANDSHAKE_RESPONSE {
                            peer.handshake_completed();
                        }
                        peer.endpoint = Some(from);
                    } else {
                        self.metrics.drop_packet(DropReason::RateLimited);
                    }
                    return Some(Pending::Reply {
                        buf: *writes,
                        len: reply.len(),
                        to: from,
                        slot,
                        flush,
                    });
                }
                TunnResult::WriteToTunnelV4(packet, source) => {
                    let len = packet.len();
                    let source = IpAddr::V4(source);
                    if peer.accept(slot, &table.allowed, &self.metrics, source, len, from) {
                        self.tun_out[*writes].truncate(TUN_HEADROOM + len);
                        *writes += 1;
                    }
                }
                TunnResult::WriteToTunnelV6(packet, source) => {
                    let len = packet.len();
                    let source = IpAddr::V6(source);
                    if peer.accept(slot, &table.allowed, &self.metrics, source, len, from) {
                        self.tun_out[*writes].truncate(TUN_HEADROOM + len);
                        *writes += 1;
                    }
                }
                TunnResult::Done => {}
                TunnResult::Err(e) => {
                    if kind == DATA && unknown_session(&e) {
                        note_unknown_session(unknown_sessions, from);
                    }
                    self.metrics.drop_packet(drop_reason(&e));
                }
            }
        }
        None
    }

    /// Sends the packets peer `slot` queued while its handshake was under way, now that it
    /// completed: each formatted under the peer's lock, sent after it.
    async fn flush_queued(&mut self, table: &PeerTable, slot: u32, to: SocketAddr) {
        let Some(peer) = table.peers.get(&slot) else {
            return;
        };
        loop {
            let len = {
                let mut state = peer.lock();
                match state.tunn.decapsulate(None, &[], &mut self.scratch) {
                    TunnResult::WriteToNetwork(queued) => {
                        let len = queued.len();
                        state.sent(len.saturating_sub(DATA_MIN_LEN) as u64);
                        len
                    }
                    _ => {
                        state.set_queued(0);
                        break;
                    }
                }
            };
            if let Err(e) = self.udp.send_to(&self.scratch[..len], to).await {
                tracing::debug!("UDP send to {to}: {e}");
                self.metrics.drop_packet(DropReason::SocketError);
            }
        }
    }
}
