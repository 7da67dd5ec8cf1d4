//! Which peering session is live for each peer cluster, and which of two connections of the
//! same peer is kept (pure bookkeeping: no IO, no clock).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use trellis_core::cluster::ClusterId;

/// Why a second session with the same peer ID is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionRefusal {
    /// The same cluster connected twice (both sides dialed): one connection is kept.
    #[error("already peered with cluster {peer} over a connection dialed by {kept_dialer}")]
    Duplicate {
        peer: ClusterId,
        kept_dialer: ClusterId,
    },
    /// Another cluster holds a certificate for the same ID.
    #[error(
        "two clusters claim the cluster ID {peer}: connected from {existing} and now from {new} \
         with a different certificate"
    )]
    DuplicateClusterId {
        peer: ClusterId,
        existing: SocketAddr,
        new: SocketAddr,
    },
}

impl SessionRefusal {
    /// A stable metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionRefusal::Duplicate { .. } => "duplicate",
            SessionRefusal::DuplicateClusterId { .. } => "duplicate_cluster_id",
        }
    }
}

/// Held by a running peering session; `cancelled` fires when another session replaces it.
#[derive(Debug)]
pub struct SessionTicket {
    pub peer: ClusterId,
    pub id: u64,
    pub cancelled: watch::Receiver<bool>,
}

#[derive(Debug)]
struct SessionSlot {
    id: u64,
    dialer: ClusterId,
    cancel: watch::Sender<bool>,
    /// The peer's leaf certificate (DER) and address.
    cert: Arc<[u8]>,
    remote: SocketAddr,
}

/// The live session of each peer.
#[derive(Debug, Default)]
pub struct Sessions {
    slots: BTreeMap<ClusterId, SessionSlot>,
    next: u64,
}

impl Sessions {
    /// Opens a session slot for `peer`. A connection presenting a different certificate for
    /// the ID of a live session is another cluster claiming that ID: refused. Between two
    /// connections of the same cluster, the one dialed by the cluster with the smaller ID wins
    /// on both sides; a reconnect by the same dialer replaces the old connection.
    pub fn start(
        &mut self,
        peer: &ClusterId,
        dialer: &ClusterId,
        cert: &[u8],
        remote: SocketAddr,
    ) -> Result<SessionTicket, SessionRefusal> {
        if let Some(existing) = self.slots.get(peer) {
            if *existing.cert != *cert {
                return Err(SessionRefusal::DuplicateClusterId {
                    peer: peer.clone(),
                    existing: existing.remote,
                    new: remote,
                });
            }
            if existing.dialer < *dialer {
                return Err(SessionRefusal::Duplicate {
                    peer: peer.clone(),
                    kept_dialer: existing.dialer.clone(),
                });
            }
        }
        self.cancel(peer);
        self.next += 1;
        let id = self.next;
        let (cancel, cancelled) = watch::channel(false);
        self.slots.insert(
            peer.clone(),
            SessionSlot {
                id,
                dialer: dialer.clone(),
                cancel,
                cert: cert.into(),
                remote,
            },
        );
        Ok(SessionTicket {
            peer: peer.clone(),
            id,
            cancelled,
        })
    }

    /// Ends `peer`'s session, if any, telling it to stop.
    pub fn cancel(&mut self, peer: &ClusterId) {
        if let Some(old) = self.slots.remove(peer) {
            let _ = old.cancel.send(true);
        }
    }

    /// Whether a session with `peer` is running.
    pub fn contains(&self, peer: &ClusterId) -> bool {
        self.slots.contains_key(peer)
    }

    /// The ticket's session ended; returns whether it was still the live one (a replaced
    /// session's ticket ends nothing).
    pub fn end(&mut self, ticket: &SessionTicket) -> bool {
        if self.slots.get(&ticket.peer).map(|s| s.id) == Some(ticket.id) {
            self.slots.remove(&ticket.peer);
            true
        } else {
            false
        }
    }
}
