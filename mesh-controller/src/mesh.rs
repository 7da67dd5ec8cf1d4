//! The controller's view of the remote clusters, pure: what each peer last told us, whether it
//! is connected, when it was last heard from, and whether the mesh admits it.
//!
//! A disconnected peer keeps its state until its lease runs out (a reconnect within the lease
//! does not flap routes or DNS); then it is withdrawn. A connected peer that falls silent is
//! expired by its session (`trellis_core::peering::Session`), which calls [`Mesh::withdraw`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use trellis_core::claims::{self, Allowance, Limits, LocalContext, Refusal, Screened, Verdict};
use trellis_core::cluster::{ClusterError, ClusterId, ClusterState, Delta, PublicKey};
use trellis_core::external_peer::{self, ExternalPeerSpec};

#[derive(Debug, Clone)]
pub struct Remote {
    /// What the peer announced, as it announced it.
    pub state: Arc<ClusterState>,
    /// What of it the mesh admits (see [`trellis_core::claims`]): what gateways, DNS and the
    /// import writer see.
    pub admitted: Arc<ClusterState>,
    pub connected: bool,
    pub last_heard: Instant,
    /// Wall-clock time of the last snapshot or delta, for metrics and status.
    pub last_sync: SystemTime,
    /// Nothing of the cluster is admitted (no allowance, or our own ID).
    pub whole: bool,
    /// The refused claims (the first [`claims::MAX_LISTED_REFUSALS`]).
    pub refusals: Vec<Refusal>,
    /// Every refused claim by `(object kind, reason)`.
    pub counts: BTreeMap<(&'static str, &'static str), usize>,
    /// The last screening of `state` and what it was screened against.
    screened: Option<ScreenCache>,
}

#[derive(Debug, Clone)]
struct ScreenCache {
    state: Arc<ClusterState>,
    context: Arc<LocalContext>,
    allowance: Allowance,
    limits: Limits,
    result: Screened,
}

impl Remote {
    fn new(state: ClusterState, connected: bool, now: Instant, wall: SystemTime) -> Self {
        let id = state.id.clone();
        Self {
            state: Arc::new(state),
            // Nothing is admitted before admission ran.
            admitted: Arc::new(ClusterState::new(id, String::new())),
            connected,
            last_heard: now,
            last_sync: wall,
            whole: true,
            refusals: Vec::new(),
            counts: BTreeMap::new(),
            screened: None,
        }
    }

    /// Whether anything of it is refused.
    pub fn is_refused(&self) -> bool {
        !self.counts.is_empty()
    }
}

#[derive(Debug)]
pub struct Mesh {
    lease: Duration,
    remotes: BTreeMap<ClusterId, Remote>,
    /// What each peer may claim: from its certificate (as of its last session) and from the
    /// configuration.
    allowances: BTreeMap<ClusterId, Allowance>,
    /// Where each peer's controller was reached or is configured.
    controller_endpoints: BTreeMap<ClusterId, Vec<IpAddr>>,
    /// Addresses of this cluster beyond its nodes' (the controller's own).
    local_addresses: Vec<IpAddr>,
    limits: Limits,
    /// Who holds each remote WireGuard key (first claimant wins).
    key_owners: BTreeMap<PublicKey, (ClusterId, String)>,
    /// The local context of the last admission (shared by the screening caches).
    local_context: Option<Arc<LocalContext>>,
    /// What this cluster may claim (its own certificate's ranges): the bound of its external
    /// peers' addresses.
    own_allowance: Option<Vec<IpNet>>,
}

/// The other clusters' ranges and keys the external peers may not take
/// ([`Mesh::external_peer_context`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExternalPeerContext {
    pub ranges: Vec<IpNet>,
    pub keys: BTreeSet<PublicKey>,
}

/// What changed in the admission of remote clusters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AdmissionChanges {
    /// Refusals not reported before.
    pub newly_refused: Vec<Refusal>,
    /// Clusters nothing of which is refused any more.
    pub newly_admitted: Vec<ClusterId>,
}

impl Mesh {
    pub fn new(lease: Duration) -> Self {
        Self {
            lease,
            remotes: BTreeMap::new(),
            allowances: BTreeMap::new(),
            controller_endpoints: BTreeMap::new(),
            local_addresses: Vec::new(),
            limits: Limits::default(),
            key_owners: BTreeMap::new(),
            local_context: None,
            own_allowance: None,
        }
    }

    /// The ranges this cluster's certificate lets it claim (`None`: it carries none).
    pub fn set_own_allowance(&mut self, ranges: Option<Vec<IpNet>>) {
        self.own_allowance = ranges;
    }

    /// The external peers' verdicts against `local` (the state before any peer joins it) and
    /// the rest of the mesh: every range another cluster may claim (its certificate's and
    /// configured allowance) or has admitted claims on, and its nodes' keys.
    pub fn admit_external_peers(
        &self,
        peers: &[ExternalPeerSpec],
        local: &ClusterState,
        others: &ExternalPeerContext,
    ) -> external_peer::Admission {
        if peers.is_empty() {
            return external_peer::Admission::default();
        }
        external_peer::admit(
            peers,
            &external_peer::Context {
                local,
                allowance: self.own_allowance.as_deref(),
                other_ranges: &others.ranges,
                other_keys: &others.keys,
            },
        )
    }

    /// What of the rest of the mesh the external peers are checked against: every range
    /// another cluster may claim (its certificate's and configured allowance) or has admitted
    /// claims on, and its admitted nodes' keys. When it changes, the peers are checked again.
    pub fn external_peer_context(&self) -> ExternalPeerContext {
        let mut ranges: Vec<IpNet> = Vec::new();
        for allowance in self.allowances.values() {
            ranges.extend(allowance.certificate.iter().flatten());
            ranges.extend(allowance.configured.iter().flatten());
        }
        let mut keys = BTreeSet::new();
        for remote in self.admitted() {
            ranges.extend(remote.cidrs());
            keys.extend(
                remote
                    .nodes
                    .values()
                    .filter_map(|n| n.gateway.as_ref().map(|g| g.public_key)),
            );
        }
        ranges.sort();
        ranges.dedup();
        ExternalPeerContext { ranges, keys }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The ranges the configuration allows `peer` (`None`: the configuration says nothing).
    pub fn set_configured_allowance(&mut self, peer: &ClusterId, ranges: Option<Vec<IpNet>>) {
        self.allowances.entry(peer.clone()).or_default().configured = ranges;
    }

    /// The ranges `peer`'s certificate allows (`None`: it carries none), as of its session.
    /// Returns whether it changed.
    pub fn set_certificate_allowance(
        &mut self,
        peer: &ClusterId,
        ranges: Option<Vec<IpNet>>,
    ) -> bool {
        let entry = self.allowances.entry(peer.clone()).or_default();
        let changed = entry.certificate != ranges;
        entry.certificate = ranges;
        changed
    }

    pub fn allowance(&self, peer: &ClusterId) -> Option<&Allowance> {
        self.allowances.get(peer)
    }

    /// An address `peer`'s controller is reached at (kept: a prefix covering it is refused).
    /// Returns whether it is new.
    pub fn add_controller_endpoint(&mut self, peer: &ClusterId, address: IpAddr) -> bool {
        let list = self.controller_endpoints.entry(peer.clone()).or_default();
        if list.contains(&address) {
            return false;
        }
        list.push(address);
        // Bounded: the configured endpoint and the latest session addresses.
        if list.len() > 8 {
            list.remove(0);
        }
        true
    }

    /// This cluster's own addresses beyond its nodes' (the controller's).
    pub fn set_local_addresses(&mut self, addresses: Vec<IpAddr>) {
        self.local_addresses = addresses;
    }

    /// Forgets a peer no longer configured.
    pub fn forget(&mut self, peer: &ClusterId) {
        self.remotes.remove(peer);
        self.allowances.remove(peer);
        self.controller_endpoints.remove(peer);
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

    /// What the mesh admits of each remote state, in cluster-ID order (clusters refused
    /// whole left out).
    pub fn admitted(&self) -> impl Iterator<Item = &Arc<ClusterState>> {
        self.remotes
            .values()
            .filter(|r| !r.whole)
            .map(|r| &r.admitted)
    }

    /// A peer sent its full state.
    pub fn snapshot(&mut self, state: ClusterState, now: Instant, wall: SystemTime) {
        let id = state.id.clone();
        let mut entry = Remote::new(state, true, now, wall);
        if let Some(old) = self.remotes.remove(&id) {
            // Keep what was reported so only new refusals are logged.
            entry.admitted = old.admitted;
            entry.whole = old.whole;
            entry.refusals = old.refusals;
            entry.counts = old.counts;
        }
        self.remotes.insert(id, entry);
    }

    /// A state remembered from before a restart: disconnected, heard from `now`, so it expires
    /// a lease from now unless its peer reconnects.
    pub fn restore(&mut self, state: ClusterState, now: Instant, wall: SystemTime) {
        let id = state.id.clone();
        self.remotes
            .insert(id, Remote::new(state, false, now, wall));
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
        // The screening cache shares the state: let go of it first, so the delta applies in
        // place instead of copying the whole state.
        remote.screened = None;
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

    /// Re-decides what of each remote is admitted against `local` (see
    /// [`trellis_core::claims::admit`]): linear in the remotes' objects plus `n log n` in
    /// their CIDRs, whatever the number of peers.
    pub fn readmit(&mut self, local: &ClusterState) -> AdmissionChanges {
        let context = LocalContext::new(local, &self.local_addresses);
        let context = match &self.local_context {
            Some(old) if **old == context => old.clone(),
            _ => Arc::new(context),
        };
        self.local_context = Some(context.clone());
        let none = Allowance::default();
        // Rules that depend on one peer alone are re-run only for peers whose state,
        // allowance, limits or local context changed (a delta from one peer does not
        // re-screen the others' services).
        let mut screened = Vec::with_capacity(self.remotes.len());
        for r in self.remotes.values_mut() {
            let allowance = self.allowances.get(&r.state.id).unwrap_or(&none);
            let fresh = r.screened.as_ref().is_some_and(|c| {
                Arc::ptr_eq(&c.state, &r.state)
                    && Arc::ptr_eq(&c.context, &context)
                    && c.allowance == *allowance
                    && c.limits == self.limits
            });
            if !fresh {
                let peer = claims::Peer {
                    state: r.state.as_ref(),
                    allowance,
                    controller_endpoints: &[],
                };
                r.screened = Some(ScreenCache {
                    state: r.state.clone(),
                    context: context.clone(),
                    allowance: allowance.clone(),
                    limits: self.limits,
                    result: claims::screen(&peer, &context, &self.limits),
                });
            }
            screened.push(r.screened.as_ref().expect("just set").result.clone());
        }
        let endpoints: Vec<(ClusterId, &[IpAddr])> = self
            .controller_endpoints
            .iter()
            .map(|(id, list)| (id.clone(), list.as_slice()))
            .collect();
        let admission = claims::decide(screened, &endpoints, &self.key_owners);
        self.key_owners = admission.key_owners;
        let mut changes = AdmissionChanges::default();
        for (id, verdict) in admission.verdicts {
            let Some(r) = self.remotes.get_mut(&id) else {
                continue;
            };
            let Verdict {
                state,
                refusals,
                counts,
                whole,
            } = verdict;
            let before: BTreeSet<&Refusal> = r.refusals.iter().collect();
            changes
                .newly_refused
                .extend(refusals.iter().filter(|x| !before.contains(x)).cloned());
            if counts.is_empty() && r.is_refused() {
                changes.newly_admitted.push(id.clone());
            }
            if !Arc::ptr_eq(&r.admitted, &state) && *r.admitted != *state {
                r.admitted = state;
            }
            r.refusals = refusals;
            r.counts = counts;
            r.whole = whole;
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

    fn allow(m: &mut Mesh, peer: &str, ranges: &[&str]) {
        m.set_configured_allowance(
            &id(peer),
            Some(ranges.iter().map(|r| r.parse().unwrap()).collect()),
        );
    }

    #[test]
    fn a_disconnected_peer_keeps_its_state_until_the_lease_runs_out() {
        let t0 = Instant::now();
        let mut m = Mesh::new(Duration::from_secs(30));
        allow(&mut m, "b", &["10.2.0.0/16", "10.97.0.0/16"]);
        m.snapshot(cluster("b", "10.2.0.0/24", "10.97.0.0/16"), t0, wall());
        m.readmit(&cluster("a", "10.1.0.0/24", "10.96.0.0/16"));
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
    fn one_peers_change_does_not_rescreen_the_others() {
        let t0 = Instant::now();
        let local = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        let mut m = Mesh::new(Duration::from_secs(30));
        allow(&mut m, "b", &["10.2.0.0/16", "10.97.0.0/16"]);
        allow(&mut m, "c", &["10.3.0.0/16", "10.98.0.0/16"]);
        let mut b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
        export(&mut b.services, "shop", "web", "10.97.0.10", &["10.2.0.5"]);
        let c = cluster("c", "10.3.0.0/24", "10.98.0.0/16");
        m.snapshot(b, t0, wall());
        m.snapshot(c.clone(), t0, wall());
        m.readmit(&local);
        let b_admitted = m.get(&id("b")).unwrap().admitted.clone();
        // c changes: b's admitted state is the very same (screened once, shared).
        let mut next = c.clone();
        next.revision = 1;
        export(&mut next.services, "shop", "db", "10.98.0.10", &[]);
        m.delta(&c.delta_to(&next).unwrap(), t0, wall()).unwrap();
        m.readmit(&local);
        assert!(Arc::ptr_eq(&m.get(&id("b")).unwrap().admitted, &b_admitted));
        assert_eq!(m.get(&id("c")).unwrap().admitted.services.len(), 1);
        // The local cluster changes: everyone is screened again.
        m.readmit(&cluster("a", "10.1.0.0/25", "10.96.0.0/16"));
        assert_eq!(*m.get(&id("b")).unwrap().admitted, *b_admitted);
    }

    #[test]
    fn readmission_reports_refusals_once_and_recoveries() {
        let t0 = Instant::now();
        let local = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        let mut m = Mesh::new(Duration::from_secs(30));
        allow(&mut m, "b", &["10.0.0.0/8"]);
        m.snapshot(cluster("b", "10.1.0.0/25", "10.97.0.0/16"), t0, wall());
        let ch = m.readmit(&local);
        assert_eq!(ch.newly_refused.len(), 1);
        assert_eq!(
            ch.newly_refused[0].to_string(),
            "cluster b: node node-0 refused: pod CIDR 10.1.0.0/25 overlaps 10.1.0.0/24 \
             of this cluster, a"
        );
        // Only the node is refused: b stays, without it.
        assert_eq!(m.admitted().count(), 1);
        assert!(m.admitted().next().unwrap().nodes.is_empty());
        assert_eq!(
            m.readmit(&local),
            AdmissionChanges::default(),
            "logged once"
        );
        // b renumbers: admitted whole again.
        m.snapshot(cluster("b", "10.2.0.0/24", "10.97.0.0/16"), t0, wall());
        let ch = m.readmit(&local);
        assert_eq!(ch.newly_admitted, vec![id("b")]);
        assert_eq!(m.admitted().next().unwrap().nodes.len(), 1);
        // Without any allowance, nothing of it is admitted, and the refusal says how to fix it.
        m.set_configured_allowance(&id("b"), None);
        let ch = m.readmit(&local);
        assert_eq!(m.admitted().count(), 0);
        assert!(
            ch.newly_refused[0]
                .to_string()
                .contains("trellis certs cluster")
        );
    }
}
