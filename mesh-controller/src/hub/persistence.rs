//! The hub's side of persistence: what [`crate::store`] saves, and serving it after a
//! restart.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use ipnet::IpNet;

use super::{Hub, LocalPublish};
use crate::store::{Persisted, STORE_VERSION};

impl Hub {
    /// Serves the state saved before a restart until the sources and peers resync: the local
    /// state goes to peers, the view to gateways and DNS, remotes count as disconnected. Only
    /// before the first source sync, and only a state of this cluster.
    pub fn restore(&self, p: Persisted) {
        let mut inner = self.lock();
        if inner.source.is_some() || p.local.id != self.cfg.id {
            tracing::warn!(saved = %p.local.id, "not restoring a saved state of another cluster or after the sources synced");
            return;
        }
        tracing::info!(
            revision = p.local.revision,
            remotes = p.remotes.len(),
            "serving the state saved before the restart until the sources resync"
        );
        // Identities keep their numbers across the restart (no renumbering churn for peers
        // and nodes once the source resyncs).
        inner.identities = crate::identities::IdentityAllocator::resume(
            p.local
                .identities
                .values()
                .map(|i| (i.labels.clone(), i.key.number)),
        );
        inner.local = Arc::new(p.local);
        inner.gateways.restore(
            p.registrations
                .into_iter()
                .map(|r| (r.node.clone(), r))
                .collect(),
            Instant::now(),
        );
        inner.node_encryption = p.node_encryption;
        // The saved state is not signed: a peer's restored certificate allowance is kept only
        // where the configuration also allows it (until the peer reconnects and its
        // certificate speaks again); with no configured allowance it is trusted as the rest
        // of the saved state is.
        for (peer, ranges) in p.certificate_allowances {
            let configured = inner
                .mesh
                .allowance(&peer)
                .and_then(|a| a.configured.as_deref());
            let ranges = match configured {
                Some(configured) => within(&ranges, configured),
                None => ranges,
            };
            inner.mesh.set_certificate_allowance(&peer, Some(ranges));
        }
        let now = Instant::now();
        for remote in p.remotes {
            inner.seen_since_start.insert(remote.id.clone());
            inner.mesh.restore(remote, now, SystemTime::now());
        }
        inner.restored = true;
        self.local_tx.send_replace(Some(Arc::new(LocalPublish {
            state: inner.local.clone(),
            recent: Vec::new(),
        })));
        self.republish(&mut inner);
    }

    /// What [`crate::store`] saves; `None` until there is something real to save.
    pub fn persisted(&self) -> Option<Persisted> {
        let inner = self.lock();
        if inner.source.is_none() && !inner.restored {
            return None;
        }
        Some(Persisted {
            version: STORE_VERSION,
            local: (*inner.local).clone(),
            registrations: inner.gateways.registrations.values().cloned().collect(),
            remotes: inner
                .mesh
                .remotes()
                .values()
                .map(|r| (*r.state).clone())
                .collect(),
            node_encryption: inner.node_encryption,
            certificate_allowances: inner
                .mesh
                .remotes()
                .keys()
                .filter_map(|id| {
                    let ranges = inner.mesh.allowance(id)?.certificate.clone()?;
                    Some((id.clone(), ranges))
                })
                .collect(),
        })
    }
}

/// The part of `ranges` inside `bound`: two prefixes either nest or are apart, so their
/// intersection is the narrower one or nothing.
fn within(ranges: &[IpNet], bound: &[IpNet]) -> Vec<IpNet> {
    let mut inside: Vec<IpNet> = ranges
        .iter()
        .flat_map(|r| {
            bound.iter().filter_map(move |b| {
                if b.contains(r) {
                    Some(*r)
                } else if r.contains(b) {
                    Some(*b)
                } else {
                    None
                }
            })
        })
        .collect();
    inside.sort();
    inside.dedup();
    inside
}
