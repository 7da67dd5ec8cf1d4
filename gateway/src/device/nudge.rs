//! Data for a session we do not have, from a peer's endpoint: we lost the session (this
//! gateway restarted) and the peer keeps sending on it; a handshake from us makes it switch
//! now instead of after its own timers (15 s).

use std::net::SocketAddr;
use std::time::Instant;

use super::Device;
use super::peers::PeerTable;
use crate::io::{Tun, Udp};
use crate::metrics::{DropReason, Initiation};

/// Unknown-session senders looked up per round of received datagrams.
const MAX_NUDGES_PER_ROUND: usize = 8;

/// Records an address that sent data for an unknown session, once per round and at most
/// `MAX_NUDGES_PER_ROUND` of them (the lookups are linear in peers).
pub(super) fn note_unknown_session(senders: &mut Vec<SocketAddr>, from: SocketAddr) {
    if senders.len() < MAX_NUDGES_PER_ROUND && !senders.contains(&from) {
        senders.push(from);
    }
}

impl<T: Tun, U: Udp> Device<T, U> {
    /// Starts a handshake with the peer at each of `senders`, unless it had one lately.
    pub(super) async fn nudge(&mut self, table: &PeerTable, senders: &[SocketAddr]) {
        let now = Instant::now();
        for from in senders {
            let initiation = table.peers.values().find_map(|peer| {
                let mut state = peer.lock();
                if state.retiring.is_some()
                    || (state.endpoint != Some(*from) && state.configured_endpoint != Some(*from))
                {
                    return None;
                }
                // The first peer at that address decides, as it has a session or not.
                let initiation = if state.wants_nudge(now) {
                    state.initiate(&mut self.scratch, true)
                } else {
                    None
                };
                if initiation.is_some() {
                    tracing::debug!(peer = %state.name, "data for an unknown session: initiating a handshake");
                }
                Some(initiation)
            });
            let Some(Some((len, to))) = initiation else {
                continue;
            };
            self.metrics.initiated(Initiation::UnknownSession);
            if let Err(e) = self.udp.send_to(&self.scratch[..len], to).await {
                tracing::debug!("UDP send to {to}: {e}");
                self.metrics.drop_packet(DropReason::SocketError);
            }
        }
    }
}
