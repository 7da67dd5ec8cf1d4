//! TUN to network: a batch of packets read, encrypted for the peers their destinations route
//! to (under each peer's lock, held over a run of packets for one peer), then sent, runs of
//! one size to one endpoint together (UDP GSO), with no lock held.

use std::io::IoSlice;

use boringtun::noise::{Tunn, TunnResult};

use super::Device;
use super::demux::{DATA, DATA_MIN_LEN, drop_reason};
use super::peers::{PeerTable, hold};
use super::worker::ROUNDS_PER_WAKE;
use crate::io::{Tun, Udp};
use crate::metrics::DropReason;
use crate::offload::{UDP_MAX_GSO_BYTES, UDP_MAX_SEGMENTS, plan_gso_groups};

impl<T: Tun, U: Udp> Device<T, U> {
    /// Reads from the TUN (with offloads, super-packets split into segments), encrypts each
    /// packet for the peer its destination routes to, then sends the datagrams, runs of one
    /// size to one endpoint together (UDP GSO). A few rounds per wake-up.
    pub(super) async fn on_tun_readable(&mut self) {
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
}
