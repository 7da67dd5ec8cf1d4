//! A worker: its buffers, and its loop over the TUN, the socket, the timers and the commands.
//! The batches in each direction are `tx` (TUN to network) and `rx` (network to TUN).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::rx::NET_IN_BYTES;
use super::{Device, Role, Shared, commands::next_command};
use crate::Error;
use crate::io::{TUN_HEADROOM, Tun, Udp};
use crate::metrics::DropReason;
use crate::offload::{Feature, MAX_SPLIT_SEGMENTS, Offloads, UDP_MAX_SEGMENTS};

/// Consecutive failed TUN reads (10 ms apart) after which the TUN is considered gone (its
/// interface deleted): the loop stops with an error rather than spin.
const MAX_TUN_FAILURES: u32 = 100;
/// Rounds of read, process, write per wake-up before the loop looks at its other sources.
pub(super) const ROUNDS_PER_WAKE: usize = 4;

/// `count` packet buffers of `len` bytes each, allocated once.
fn buffers(count: usize, len: usize) -> Vec<Vec<u8>> {
    buffers_with_room(count, len, len)
}

/// `count` packet buffers of `len` bytes each, each with room to grow to `capacity` bytes
/// without reallocating. Pages of the room are only resident once written.
fn buffers_with_room(count: usize, len: usize, capacity: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|_| {
            let mut buffer = Vec::with_capacity(capacity.max(len));
            buffer.resize(len, 0);
            buffer
        })
        .collect()
}

/// Room a TUN write buffer needs for tun-rs to coalesce a flow's segments into it: one
/// super-packet of up to 64 KiB, and the headroom twice (tun-rs asks for that much spare
/// capacity before it appends, and skips coalescing, silently, when it is not there).
const TUN_WRITE_ROOM: usize = 2 * TUN_HEADROOM + 65_535;

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
            tun_out: buffers_with_room(net_slots, TUN_HEADROOM + stride, TUN_WRITE_ROOM),
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
                        self.shared.keys.load().reset_counts();
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

    pub(super) fn tun_failed(&mut self, error: std::io::Error) {
        if self.tun_failures == 0 {
            tracing::warn!("TUN: {error}");
        }
        self.tun_failures += 1;
        self.last_tun_error = Some(error);
        self.metrics.drop_packet(DropReason::TunError);
    }
}
