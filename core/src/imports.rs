//! What the cluster's DNS (and the ServiceImport writer) subscribe to: every service exported
//! anywhere in the clusterset, merged by namespace sameness (KEP-1645), with the backends each
//! cluster contributes. The controller streams a snapshot, then deltas with revisions.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, ClusterState, Endpoint, ServiceKey, ServiceKind, ServicePort};

/// One cluster's part of an imported service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub cluster: ClusterId,
    /// True for the subscriber's own cluster, which DNS prefers.
    pub local: bool,
    pub cluster_ips: Vec<IpAddr>,
    pub endpoints: Vec<Endpoint>,
}

/// A clusterset service: `<name>.<namespace>.svc.clusterset.local`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedService {
    pub namespace: String,
    pub name: String,
    /// Headless if any exporting cluster exports it headless (KEP-1645 resolves conflicts by
    /// the oldest export; without creation times we take the conservative answer).
    pub kind: ServiceKind,
    /// The union of the exporting clusters' ports.
    pub ports: Vec<ServicePort>,
    /// Backends in cluster-ID order.
    pub backends: Vec<Backend>,
}

impl ImportedService {
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.name)
    }
}

/// The full set of imported services at a revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Imports {
    pub revision: u64,
    pub services: BTreeMap<String, ImportedService>,
}

/// What a DNS subscriber receives: a snapshot first (and after any gap), then deltas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImportsUpdate {
    Snapshot(Imports),
    Delta {
        from: u64,
        to: u64,
        upsert: Vec<ImportedService>,
        remove: Vec<ServiceKey>,
    },
}

impl Imports {
    /// Merges the exports of `clusters` (local and the admitted remotes) at `revision`.
    pub fn build<'a>(
        local: &ClusterId,
        clusters: impl IntoIterator<Item = &'a ClusterState>,
        revision: u64,
    ) -> Self {
        let mut clusters: Vec<&ClusterState> = clusters.into_iter().collect();
        clusters.sort_by(|a, b| a.id.cmp(&b.id));
        let mut services: BTreeMap<String, ImportedService> = BTreeMap::new();
        for cluster in clusters {
            for svc in cluster.services.values() {
                let entry =
                    services
                        .entry(svc.key().to_string())
                        .or_insert_with(|| ImportedService {
                            namespace: svc.namespace.clone(),
                            name: svc.name.clone(),
                            kind: svc.kind,
                            ports: Vec::new(),
                            backends: Vec::new(),
                        });
                if svc.kind == ServiceKind::Headless {
                    entry.kind = ServiceKind::Headless;
                }
                for p in &svc.ports {
                    if !entry.ports.contains(p) {
                        entry.ports.push(p.clone());
                    }
                }
                entry.backends.push(Backend {
                    cluster: cluster.id.clone(),
                    local: &cluster.id == local,
                    cluster_ips: svc.cluster_ips.clone(),
                    endpoints: svc.endpoints.clone(),
                });
            }
        }
        for s in services.values_mut() {
            s.ports.sort();
        }
        Self { revision, services }
    }

    /// The update that turns `self` into `new`; `None` if nothing changed.
    pub fn delta_to(&self, new: &Imports) -> Option<ImportsUpdate> {
        let upsert: Vec<ImportedService> = new
            .services
            .iter()
            .filter(|(k, v)| self.services.get(*k) != Some(v))
            .map(|(_, v)| v.clone())
            .collect();
        let remove: Vec<ServiceKey> = self
            .services
            .iter()
            .filter(|(k, _)| !new.services.contains_key(*k))
            .map(|(_, v)| v.key())
            .collect();
        (!upsert.is_empty() || !remove.is_empty()).then_some(ImportsUpdate::Delta {
            from: self.revision,
            to: new.revision,
            upsert,
            remove,
        })
    }

    /// Applies an update; `false` (and no change) if a delta does not start at this revision,
    /// in which case the subscriber must ask for a snapshot.
    pub fn apply(&mut self, update: &ImportsUpdate) -> bool {
        match update {
            ImportsUpdate::Snapshot(s) => {
                *self = s.clone();
                true
            }
            ImportsUpdate::Delta {
                from,
                to,
                upsert,
                remove,
            } => {
                if *from != self.revision {
                    return false;
                }
                for k in remove {
                    self.services.remove(&k.to_string());
                }
                for s in upsert {
                    self.services.insert(s.key().to_string(), s.clone());
                }
                self.revision = *to;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::fixture::*;

    #[test]
    fn merges_services_by_namespace_sameness_and_marks_local() {
        let (mut a, mut b) = clusters_a_b();
        export(&mut a.services, "shop", "web", "10.96.0.10", &["10.1.0.5"]);
        export(
            &mut b.services,
            "shop",
            "web",
            "10.97.0.10",
            &["10.2.0.5", "10.2.0.6"],
        );
        export(&mut b.services, "shop", "db", "10.97.0.11", &[]);
        let imports = Imports::build(&id("b"), [&b, &a], 1);
        assert_eq!(imports.services.len(), 2);
        let web = &imports.services["shop/web"];
        assert_eq!(web.backends.len(), 2);
        assert_eq!(web.backends[0].cluster, id("a"));
        assert!(!web.backends[0].local);
        assert!(web.backends[1].local);
        assert_eq!(web.ports.len(), 1);
    }

    #[test]
    fn deltas_take_a_subscriber_to_the_new_set() {
        let mut a = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        export(&mut a.services, "shop", "web", "10.96.0.10", &["10.1.0.5"]);
        let old = Imports::build(&id("b"), [&a], 1);
        a.services.remove(&ServiceKey::new("shop", "web"));
        export(&mut a.services, "shop", "api", "10.96.0.12", &["10.1.0.7"]);
        let new = Imports::build(&id("b"), [&a], 2);
        let update = old.delta_to(&new).unwrap();
        let mut sub = old.clone();
        assert!(sub.apply(&update));
        assert_eq!(sub, new);
        // A subscriber that missed a delta refuses the next one.
        let mut stale = Imports::default();
        assert!(!stale.apply(&update));
        assert!(new.delta_to(&new).is_none());
        let json = serde_json::to_string(&update).unwrap();
        assert!(json.contains("\"type\":\"delta\""), "{json}");
    }
}
