//! The controller's view of the remote clusters, pure: what each peer last told us, whether it
//! is connected, when it was last heard from, and whether the mesh admits it.
//!
//! A disconnected peer keeps its state until its lease runs out (a reconnect within the lease
//! does not flap routes or DNS); then it is withdrawn. A connected peer that falls silent is
//! expired by its session (`trellis_core::peering::Session`), which calls [`Mesh::withdraw`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use trellis_core::cluster::{self, ClusterError, ClusterId, ClusterState, Conflict, Delta};

#[derive(Debug, Clone)]
pub struct Remote {
    pub state: Arc<ClusterState>,
    pub connected: bool,
    pub last_heard: Instant,
    /// Wall-clock time of the last snapshot or delta, for metrics and status.
    pub last_sync: SystemTime,
    /// `Some` when the mesh refuses this cluster.
    pub refused: Option<Vec<Conflict>>,
}

#[derive(Debug)]
pub struct Mesh {
    lease: Duration,
    remotes: BTreeMap<ClusterId, Remote>,
}

/// What changed in the admission of remote clusters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AdmissionChanges {
    pub newly_refused: Vec<(ClusterId, Vec<Conflict>)>,
    pub newly_admitted: Vec<ClusterId>,
}

impl Mesh {
    pub fn new(lease: Duration) -> Self {
        Self {
            lease,
            remotes: BTreeMap::new(),
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn set_lease(&mut self, lease: Duration) {
        self.lease = lease;
    }

    pub fn remotes(&self) -> &BTreeMap<ClusterId, Remote> {
        &self.remotes
    }

    pub fn get(&self, id: &ClusterId) -> Option<&Remote> {
        self.remotes.get(id)
    }

    /// The remote states the mesh admits, in cluster-ID order.
    pub fn admitted(&self) -> impl Iterator<Item = &Arc<ClusterState>> {
        self.remotes
            .values()
            .filter(|r| r.refused.is_none())
            .map(|r| &r.state)
    }

    /// A peer sent its full state.
    pub fn snapshot(&mut self, state: ClusterState, now: Instant, wall: SystemTime) {
        let id = state.id.clone();
        let entry = Remote {
            state: Arc::new(state),
            connected: true,
            last_heard: now,
            last_sync: wall,
            refused: self.remotes.get(&id).and_then(|r| r.refused.clone()),
        };
        self.remotes.insert(id, entry);
    }

    /// A state remembered from before a restart: disconnected, heard from `now`, so it expires
    /// a lease from now unless its peer reconnects.
    pub fn restore(&mut self, state: ClusterState, now: Instant, wall: SystemTime) {
        let id = state.id.clone();
        self.remotes.insert(
            id,
            Remote {
                state: Arc::new(state),
                connected: false,
                last_heard: now,
                last_sync: wall,
                refused: None,
            },
        );
    }

    /// A peer sent a change; refused if it does not follow the state we hold.
    pub fn delta(
        &mut self,
        delta: &Delta,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), ClusterError> {
        let Some(remote) = self.remotes.get_mut(&delta.cluster) else {
            return Err(ClusterError::ApplyDeltaRevisionGap {
                cluster: delta.cluster.clone(),
                at: 0,
                from: delta.from,
                to: delta.to,
            });
        };
        Arc::make_mut(&mut remote.state).apply(delta)?;
        remote.connected = true;
        remote.last_heard = now;
        remote.last_sync = wall;
        Ok(())
    }

    /// Any message (a heartbeat too) from the peer.
    pub fn heard(&mut self, id: &ClusterId, now: Instant) {
        if let Some(r) = self.remotes.get_mut(id) {
            r.connected = true;
            r.last_heard = now;
        }
    }

    /// The peer's session ended; its state stays until a lease after it was last heard from
    /// (the same rule as for a silent connected peer).
    pub fn disconnected(&mut self, id: &ClusterId) {
        if let Some(r) = self.remotes.get_mut(id) {
            r.connected = false;
        }
    }

    /// Drops a peer's state at once (its lease expired while connected, or it was removed
    /// from the configuration).
    pub fn withdraw(&mut self, id: &ClusterId) -> bool {
        self.remotes.remove(id).is_some()
    }

    /// Withdraws every disconnected peer not heard from within the lease; returns their IDs.
    pub fn expire(&mut self, now: Instant) -> Vec<ClusterId> {
        let lease = self.lease;
        let expired: Vec<ClusterId> = self
            .remotes
            .iter()
            .filter(|(_, r)| !r.connected && now.saturating_duration_since(r.last_heard) >= lease)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.remotes.remove(id);
        }
        expired
    }

    /// When the next disconnected peer's lease runs out.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.remotes
            .values()
            .filter(|r| !r.connected)
            .map(|r| r.last_heard + self.lease)
            .min()
    }

    /// Re-decides which remotes are admitted against `local` (see [`cluster::admit`]).
    pub fn readmit(&mut self, local: &ClusterState) -> AdmissionChanges {
        let verdicts = cluster::admit(local, self.remotes.values().map(|r| r.state.as_ref()));
        let mut changes = AdmissionChanges::default();
        for (id, verdict) in verdicts {
            let Some(r) = self.remotes.get_mut(&id) else {
                continue;
            };
            match verdict {
                Ok(()) => {
                    if r.refused.take().is_some() {
                        changes.newly_admitted.push(id);
                    }
                }
                Err(conflicts) => {
                    if r.refused.as_ref() != Some(&conflicts) {
                        changes.newly_refused.push((id, conflicts.clone()));
                    }
                    r.refused = Some(conflicts);
                }
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::cluster::fixture::{cluster, export, id};

    fn wall() -> SystemTime {
        SystemTime::UNIX_EPOCH
    }

    #[test]
    fn a_disconnected_peer_keeps_its_state_until_the_lease_runs_out() {
        let t0 = Instant::now();
        let mut m = Mesh::new(Duration::from_secs(30));
        m.snapshot(cluster("b", "10.2.0.0/24", "10.97.0.0/16"), t0, wall());
        m.heard(&id("b"), t0 + Duration::from_secs(1));
        m.disconnected(&id("b"));
        assert_eq!(m.next_expiry(), Some(t0 + Duration::from_secs(31)));
        assert!(m.expire(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(m.admitted().count(), 1);
        // Reconnecting within the lease keeps it; connected peers never expire here.
        m.heard(&id("b"), t0 + Duration::from_secs(20));
        assert!(m.expire(t0 + Duration::from_secs(90)).is_empty());
        m.heard(&id("b"), t0 + Duration::from_secs(100));
        m.disconnected(&id("b"));
        assert_eq!(m.expire(t0 + Duration::from_secs(129)), vec![]);
        assert_eq!(m.expire(t0 + Duration::from_secs(130)), vec![id("b")]);
        assert_eq!(m.admitted().count(), 0);
        assert_eq!(m.next_expiry(), None);
    }

    #[test]
    fn deltas_apply_in_order_and_unknown_peers_are_refused() {
        let t0 = Instant::now();
        let mut m = Mesh::new(Duration::from_secs(30));
        let b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
        m.snapshot(b.clone(), t0, wall());
        let mut next = b.clone();
        next.revision = 1;
        export(
            &mut next.services,
            "shop",
            "web",
            "10.97.0.10",
            &["10.2.0.5"],
        );
        let d = b.delta_to(&next).unwrap();
        m.delta(&d, t0, wall()).unwrap();
        assert_eq!(*m.get(&id("b")).unwrap().state, next);
        assert!(m.delta(&d, t0, wall()).is_err(), "a replay must not apply");
        let mut stray = d.clone();
        stray.cluster = id("zz");
        assert!(m.delta(&stray, t0, wall()).is_err());
    }

    #[test]
    fn readmission_reports_refusals_once_and_recoveries() {
        let t0 = Instant::now();
        let local = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        let mut m = Mesh::new(Duration::from_secs(30));
        m.snapshot(cluster("b", "10.1.0.0/25", "10.97.0.0/16"), t0, wall());
        let ch = m.readmit(&local);
        assert_eq!(ch.newly_refused.len(), 1);
        assert!(
            ch.newly_refused[0].1[0]
                .to_string()
                .contains("cluster b refused")
        );
        assert_eq!(m.admitted().count(), 0);
        assert_eq!(m.readmit(&local), AdmissionChanges::default());
        // b renumbers: admitted again.
        m.snapshot(cluster("b", "10.2.0.0/24", "10.97.0.0/16"), t0, wall());
        let ch = m.readmit(&local);
        assert_eq!(ch.newly_admitted, vec![id("b")]);
        assert_eq!(m.admitted().count(), 1);
    }
}
