//! The hub's side of persistence: what [`crate::store`] saves, and serving it after a
//! restart.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

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
        for (peer, ranges) in p.certificate_allowances {
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
