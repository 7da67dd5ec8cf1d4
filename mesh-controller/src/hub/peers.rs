//! The hub's side of peering: session slots, remote snapshots and deltas, leases.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use trellis_core::cluster::{ClusterError, ClusterId, ClusterState, Delta};

use super::Hub;
use crate::sessions::{SessionRefusal, SessionTicket};

impl Hub {
    /// A copy of the remote states we hold, admitted or not.
    pub fn remote_states(&self) -> BTreeMap<ClusterId, Arc<ClusterState>> {
        self.lock()
            .mesh
            .remotes()
            .iter()
            .map(|(id, r)| (id.clone(), r.state.clone()))
            .collect()
    }

    /// Opens a session slot for `peer` (see [`Sessions::start`]).
    pub fn session_start(
        &self,
        peer: &ClusterId,
        dialer: &ClusterId,
        cert: &[u8],
        remote: std::net::SocketAddr,
    ) -> Result<SessionTicket, SessionRefusal> {
        let mut inner = self.lock();
        let ticket = inner.sessions.start(peer, dialer, cert, remote)?;
        // The certificate the handshake verified says what the peer may claim.
        let ranges = match crate::certs::claim_ranges_of(cert) {
            Ok(ranges) => ranges,
            Err(e) => {
                tracing::warn!(
                    cluster = %peer,
                    error = %trellis_core::error_chain(&e),
                    "the peer's certificate has an unreadable address-range extension; it allows nothing"
                );
                Some(Vec::new())
            }
        };
        let changed = inner.mesh.set_certificate_allowance(peer, ranges);
        let new_endpoint = inner.mesh.add_controller_endpoint(peer, remote.ip());
        if (changed || new_endpoint) && inner.mesh.get(peer).is_some() {
            self.republish(&mut inner);
        }
        Ok(ticket)
    }

    /// Whether a session with `peer` is running.
    pub fn is_connected(&self, peer: &ClusterId) -> bool {
        self.lock().sessions.contains(peer)
    }

    /// The session ended; the peer's state stays until its lease runs out.
    pub fn session_end(&self, ticket: &SessionTicket) {
        let mut inner = self.lock();
        if inner.sessions.end(ticket) {
            inner.mesh.disconnected(&ticket.peer);
            self.update_remote_metrics(&inner);
        }
    }

    pub fn peer_snapshot(&self, state: ClusterState) {
        let mut inner = self.lock();
        tracing::info!(
            cluster = %state.id,
            revision = state.revision,
            nodes = state.nodes.len(),
            services = state.services.len(),
            "received a snapshot"
        );
        inner.seen_since_start.insert(state.id.clone());
        inner
            .mesh
            .snapshot(state, Instant::now(), SystemTime::now());
        self.republish(&mut inner);
    }

    pub fn peer_delta(&self, delta: &Delta) -> Result<(), ClusterError> {
        let mut inner = self.lock();
        inner.mesh.delta(delta, Instant::now(), SystemTime::now())?;
        self.republish(&mut inner);
        Ok(())
    }

    pub fn peer_heard(&self, peer: &ClusterId) {
        self.lock().mesh.heard(peer, Instant::now());
    }

    /// Withdraws a peer's state at once (its lease expired while connected).
    pub fn withdraw(&self, peer: &ClusterId) {
        let mut inner = self.lock();
        if inner.mesh.withdraw(peer) {
            tracing::warn!(cluster = %peer, "withdrew a remote cluster's nodes and endpoints");
            self.republish(&mut inner);
        }
    }

    /// Withdraws disconnected peers whose lease ran out; returns when to call again.
    pub fn expire(&self, now: Instant) -> Option<Instant> {
        let mut inner = self.lock();
        if !inner.grace_over
            && now.saturating_duration_since(inner.started) >= self.cfg.startup_grace
        {
            inner.grace_over = true;
            let missing: Vec<String> = inner
                .configured
                .iter()
                .filter(|c| !inner.seen_since_start.contains(*c))
                .map(ToString::to_string)
                .collect();
            if !missing.is_empty() {
                tracing::info!(
                    missing = missing.join(","),
                    "startup grace over; serving gateways and DNS without the missing peers"
                );
                self.republish(&mut inner);
            }
        }
        let mut lapsed = inner.gateways.lapsed(now, self.cfg.lease);
        // A deleted node's gateway is silent for good: nothing to say about it.
        if let Some(source) = &inner.source {
            lapsed.retain(|node| source.nodes.contains_key(node));
        }
        if lapsed != inner.lapsed_gateways {
            for node in lapsed.difference(&inner.lapsed_gateways) {
                tracing::warn!(%node, "the node's gateway is silent past the lease; its endpoints are not ready");
            }
            inner.lapsed_gateways = lapsed;
            self.recompose(&mut inner);
        }
        let expired = inner.mesh.expire(now);
        for id in &expired {
            tracing::warn!(cluster = %id, "lease expired; withdrew its nodes and endpoints");
        }
        if !expired.is_empty() {
            self.republish(&mut inner);
        } else {
            self.update_remote_metrics(&inner);
        }
        let next_lapse = inner.gateways.next_lapse(now, self.cfg.lease);
        [
            inner.mesh.next_expiry(),
            next_lapse.map(|at| at + Duration::from_millis(1)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs [`Hub::expire`] forever, at least once a second.
    pub async fn run_expiry(self) {
        loop {
            let next = self.expire(Instant::now());
            let cap = Instant::now() + Duration::from_secs(1);
            let at = next.map_or(cap, |n| n.min(cap));
            tokio::time::sleep_until(at.into()).await;
        }
    }
}
