//! WireGuard's timers: handshake retries and rekeys, keepalives, session expiry.

use std::time::Duration;

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;

use super::Device;
use crate::io::{Tun, Udp};
use crate::metrics::DropReason;

/// Sessions older than this are rejected (WireGuard's Reject-After-Time).
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);

impl<T: Tun, U: Udp> Device<T, U> {
    /// Runs every peer's timers once (the first worker, every `timer_interval`).
    pub(super) async fn run_timers(&mut self) {
        self.metrics.beat();
        self.report_offloads();
        let mut up = 0;
        let table = self.shared.table.load_full();
        for peer in table.peers.values() {
            // Formatted under the peer's lock, sent after it.
            let send = {
                let mut state = peer.lock();
                state.expire_retired(std::time::Instant::now());
                if state.retiring.is_some() {
                    continue;
                }
                let send = match state.tunn.update_timers(&mut self.scratch) {
                    TunnResult::WriteToNetwork(datagram) => Some((datagram.len(), state.endpoint)),
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {
                        state.set_queued(0);
                        None
                    }
                    _ => None,
                };
                if matches!(state.tunn.stats().0, Some(age) if age < REJECT_AFTER_TIME) {
                    up += 1;
                }
                send
            };
            match send {
                Some((len, Some(endpoint))) => {
                    if let Err(e) = self.udp.send_to(&self.scratch[..len], endpoint).await {
                        tracing::debug!("UDP send to {endpoint}: {e}");
                        self.metrics.drop_packet(DropReason::SocketError);
                    }
                }
                Some((_, None)) => self.metrics.drop_packet(DropReason::NoEndpoint),
                None => {}
            }
        }
        self.metrics.peers_up.set(up);
    }
}
