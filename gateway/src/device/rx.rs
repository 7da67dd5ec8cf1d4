//! Network to TUN: a batch of datagrams received (with GRO, many per receive), each
//! demultiplexed to its peer and decrypted under that peer's lock, then the packets written
//! to the TUN. A handshake reply or cookie stops the synchronous step so it can be sent with
//! no lock held.

use std::net::{IpAddr, SocketAddr};

use boringtun::noise::TunnResult;

use super::demux::{
    COOKIE_REPLY, DATA, DATA_MIN_LEN, Demux, HANDSHAKE_INIT, HANDSHAKE_RESPONSE, KeyUse, demux,
    drop_reason, unknown_session,
};
use super::nudge::note_unknown_session;
use super::peers::{PeerTable, hold};
use super::worker::ROUNDS_PER_WAKE;
use super::{Device, KeyRing};
use crate::io::{TUN_HEADROOM, Tun, Udp};
use crate::metrics::DropReason;
use crate::offload::{UDP_MAX_SEGMENTS, gro_segments};

/// Room for one receive: a GRO read holds up to 64 KiB of datagrams.
const MAX_UDP_READ: usize = 65_536;
/// Receive buffer: several GRO reads, or many single datagrams, per wake-up.
pub(super) const NET_IN_BYTES: usize = 8 * MAX_UDP_READ;

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

impl<T: Tun, U: Udp> Device<T, U> {
    /// Reads datagrams (with GRO, many per receive), decrypts each with its peer, then writes
    /// the packets to the TUN (with offloads, a flow's segments coalesced). Handshake replies
    /// and cookies go out as they arise. A few rounds per wake-up.
    pub(super) async fn on_udp_readable(&mut self) {
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
        let ring = self.shared.keys.load_full();
        let mut next = 0;
        let mut writes = 0;
        let mut unknown_sessions: Vec<SocketAddr> = Vec::new();
        while let Some(pending) =
            self.decrypt_until_send(&table, &ring, &mut next, &mut writes, &mut unknown_sessions)
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
        ring: &KeyRing,
        next: &mut usize,
        writes: &mut usize,
        unknown_sessions: &mut Vec<SocketAddr>,
    ) -> Option<Pending> {
        let mut held = None;
        while *next < self.net_datagrams.len() {
            let (start, len, from) = self.net_datagrams[*next];
            *next += 1;
            let datagram = &self.net_in[start..start + len];
            let (slot, key_use) = match demux(table, ring, datagram, from, &mut self.scratch) {
                Demux::Peer(peer, key_use) => (peer.slot, key_use),
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
            match (key_use, peer.on_previous) {
                // The peer learned our new key: move it there (its old sessions go; this
                // handshake makes the new one).
                (Some(KeyUse::Current), true) => {
                    peer.use_key(&ring.current, &table.peers[&slot].public_key, slot);
                    tracing::info!(peer = %peer.name, "the peer initiated to the new key: switched to it");
                }
                // Sent to the key this peer no longer uses (a late retry): the peer has the
                // new key already, or learns it from its controller.
                (Some(KeyUse::Previous), false) => {
                    self.metrics.drop_packet(DropReason::OldKey);
                    continue;
                }
                _ => {}
            }
            let kind = datagram[0];
            let buf = &mut self.tun_out[*writes];
            buf.resize(TUN_HEADROOM + self.stride, 0);
            let (len, source) =
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
                        (packet.len(), IpAddr::V4(source))
                    }
                    TunnResult::WriteToTunnelV6(packet, source) => {
                        (packet.len(), IpAddr::V6(source))
                    }
                    TunnResult::Done => continue,
                    // Data the peer sent on a session of the key it just moved from (its
                    // receiver index may be one the new `Tunn` uses too: any error).
                    TunnResult::Err(e)
                        if kind == DATA
                            && let Some((retired, _)) = peer.retired.as_mut() =>
                    {
                        match retired.decapsulate(
                            Some(from.ip()),
                            datagram,
                            &mut buf[TUN_HEADROOM..],
                        ) {
                            TunnResult::WriteToTunnelV4(packet, source) => {
                                (packet.len(), IpAddr::V4(source))
                            }
                            TunnResult::WriteToTunnelV6(packet, source) => {
                                (packet.len(), IpAddr::V6(source))
                            }
                            _ => {
                                if unknown_session(&e) {
                                    note_unknown_session(unknown_sessions, from);
                                }
                                self.metrics.drop_packet(drop_reason(&e));
                                continue;
                            }
                        }
                    }
                    TunnResult::Err(e) => {
                        if kind == DATA && unknown_session(&e) {
                            note_unknown_session(unknown_sessions, from);
                        }
                        self.metrics.drop_packet(drop_reason(&e));
                        continue;
                    }
                };
            if peer.accept(slot, &table.allowed, &self.metrics, source, len, from) {
                self.tun_out[*writes].truncate(TUN_HEADROOM + len);
                *writes += 1;
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
