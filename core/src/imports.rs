//! What the cluster's DNS (and the ServiceImport writer) subscribe to: every service exported
//! anywhere in the clusterset, merged by namespace sameness (KEP-1645), with the backends each
//! cluster contributes. The controller streams a snapshot, then deltas with revisions.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::{
    ClusterId, ClusterState, Endpoint, ExportProperties, ExportedService, ServiceKey, ServiceKind,
    ServicePort,
};

/// One cluster's part of an imported service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub cluster: ClusterId,
    /// True for the subscriber's own cluster.
    pub local: bool,
    /// The exporting cluster's own ClusterIPs (reachable only inside that cluster).
    pub cluster_ips: Vec<IpAddr>,
    /// The cluster's endpoints; a remote endpoint on a node without a gateway is not ready
    /// (no tunnel reaches it).
    pub endpoints: Vec<Endpoint>,
    /// The ports its endpoints listen on (its EndpointSlices' ports), by Service port name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_ports: Vec<ServicePort>,
    /// When its ServiceExport was created (seconds since the epoch), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_at: Option<i64>,
}

/// Why the exports of a service disagree: the `Conflict` condition's reasons (mcs-api
/// v1beta1), joined with commas when there are several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ConflictReason {
    PortConflict,
    TypeConflict,
    SessionAffinityConflict,
    SessionAffinityConfigConflict,
    InternalTrafficPolicyConflict,
    TrafficDistributionConflict,
    #[serde(rename = "IPFamilyConflict")]
    IpFamilyConflict,
    LabelsConflict,
    AnnotationsConflict,
}

impl ConflictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PortConflict => "PortConflict",
            Self::TypeConflict => "TypeConflict",
            Self::SessionAffinityConflict => "SessionAffinityConflict",
            Self::SessionAffinityConfigConflict => "SessionAffinityConfigConflict",
            Self::InternalTrafficPolicyConflict => "InternalTrafficPolicyConflict",
            Self::TrafficDistributionConflict => "TrafficDistributionConflict",
            Self::IpFamilyConflict => "IPFamilyConflict",
            Self::LabelsConflict => "LabelsConflict",
            Self::AnnotationsConflict => "AnnotationsConflict",
        }
    }
}

/// A clusterset service: `<name>.<namespace>.svc.clusterset.local`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedService {
    pub namespace: String,
    pub name: String,
    /// The oldest export's type (KEP-1645 resolves every conflict by the oldest export).
    pub kind: ServiceKind,
    /// The union of the exporting clusters' ports; where two exports define a port of the
    /// same name differently, the oldest export's definition.
    pub ports: Vec<ServicePort>,
    /// The oldest export's properties (session affinity, traffic policies, IP families,
    /// exported labels and annotations).
    #[serde(default, skip_serializing_if = "ExportProperties::is_unset")]
    pub properties: ExportProperties,
    /// The cluster whose export won (the oldest; ties go to the lowest cluster ID).
    pub oldest: ClusterId,
    /// What the exports disagree on, sorted; empty when they agree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<ConflictReason>,
    /// This cluster's clusterset IPs for the service (ClusterSetIP only): the virtual IPs its
    /// nodes balance over every cluster's endpoints; empty until allocated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<IpAddr>,
    /// Backends in cluster-ID order.
    pub backends: Vec<Backend>,
}

impl ImportedService {
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.name)
    }

    /// The `Conflict` condition's reason: the reasons joined with commas.
    pub fn conflict_reason(&self) -> Option<String> {
        (!self.conflicts.is_empty()).then(|| {
            self.conflicts
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
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

/// Orders exports oldest first: a known creation time before an unknown one, then the lower
/// cluster ID.
fn age_order(
    a: &(&ClusterState, &ExportedService),
    b: &(&ClusterState, &ExportedService),
) -> std::cmp::Ordering {
    let at = |s: &ExportedService| s.properties.exported_at.unwrap_or(i64::MAX);
    at(a.1).cmp(&at(b.1)).then_with(|| a.0.id.cmp(&b.0.id))
}

/// The endpoints of `svc` as a cluster other than `cluster` sees them: an endpoint on a node
/// `cluster` knows without a gateway cannot be reached through any tunnel, so it is not ready.
fn reachable_endpoints(
    cluster: &ClusterState,
    svc: &ExportedService,
    local: bool,
) -> Vec<Endpoint> {
    svc.endpoints
        .iter()
        .map(|e| {
            let unreachable = !local
                && e.node
                    .as_ref()
                    .and_then(|n| cluster.nodes.get(n))
                    .is_some_and(|n| n.gateway.is_none());
            let mut e = e.clone();
            e.ready &= !unreachable;
            e
        })
        .collect()
}

/// The service the exports (oldest first) make, KEP-1645's way.
fn merge(
    local: &ClusterId,
    exports: &[(&ClusterState, &ExportedService)],
    vips: Option<&Vec<IpAddr>>,
) -> ImportedService {
    let (oldest_cluster, oldest) = exports[0];
    let mut conflicts = Vec::new();
    let mut ports: Vec<ServicePort> = Vec::new();
    for (_, svc) in exports {
        for p in &svc.ports {
            match ports.iter().find(|q| q.name == p.name) {
                Some(q) if q != p => conflicts.push(ConflictReason::PortConflict),
                Some(_) => {}
                None => ports.push(p.clone()),
            }
        }
        if svc.ports != oldest.ports {
            conflicts.push(ConflictReason::PortConflict);
        }
        if svc.kind != oldest.kind {
            conflicts.push(ConflictReason::TypeConflict);
        }
        let (a, b) = (&svc.properties, &oldest.properties);
        let checks = [
            (
                a.session_affinity != b.session_affinity,
                ConflictReason::SessionAffinityConflict,
            ),
            (
                a.session_affinity_timeout != b.session_affinity_timeout,
                ConflictReason::SessionAffinityConfigConflict,
            ),
            (
                a.internal_traffic_policy != b.internal_traffic_policy,
                ConflictReason::InternalTrafficPolicyConflict,
            ),
            (
                a.traffic_distribution != b.traffic_distribution,
                ConflictReason::TrafficDistributionConflict,
            ),
            (
                a.ip_families != b.ip_families,
                ConflictReason::IpFamilyConflict,
            ),
            (a.labels != b.labels, ConflictReason::LabelsConflict),
            (
                a.annotations != b.annotations,
                ConflictReason::AnnotationsConflict,
            ),
        ];
        conflicts.extend(
            checks
                .into_iter()
                .filter(|(differs, _)| *differs)
                .map(|(_, r)| r),
        );
    }
    conflicts.sort();
    conflicts.dedup();
    ports.sort();
    let mut by_cluster: Vec<&(&ClusterState, &ExportedService)> = exports.iter().collect();
    by_cluster.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    let backends = by_cluster
        .into_iter()
        .map(|(cluster, svc)| {
            let is_local = &cluster.id == local;
            Backend {
                cluster: cluster.id.clone(),
                local: is_local,
                cluster_ips: svc.cluster_ips.clone(),
                endpoints: reachable_endpoints(cluster, svc, is_local),
                endpoint_ports: svc.endpoint_ports.clone(),
                exported_at: svc.properties.exported_at,
            }
        })
        .collect();
    ImportedService {
        namespace: oldest.namespace.clone(),
        name: oldest.name.clone(),
        kind: oldest.kind,
        ports,
        properties: oldest.properties.clone(),
        oldest: oldest_cluster.id.clone(),
        conflicts,
        vips: match oldest.kind {
            ServiceKind::ClusterSetIP => vips.cloned().unwrap_or_default(),
            ServiceKind::Headless => Vec::new(),
        },
        backends,
    }
}

impl Imports {
    /// Merges the exports of `clusters` (local and the admitted remotes) at `revision`;
    /// `vips` holds the local clusterset IPs allocated so far, by service.
    pub fn build<'a>(
        local: &ClusterId,
        clusters: impl IntoIterator<Item = &'a ClusterState>,
        vips: &BTreeMap<ServiceKey, Vec<IpAddr>>,
        revision: u64,
    ) -> Self {
        let mut exports: BTreeMap<ServiceKey, Vec<(&ClusterState, &ExportedService)>> =
            BTreeMap::new();
        for cluster in clusters {
            for svc in cluster.services.values() {
                exports.entry(svc.key()).or_default().push((cluster, svc));
            }
        }
        let services = exports
            .into_iter()
            .map(|(key, mut exports)| {
                exports.sort_by(age_order);
                (key.to_string(), merge(local, &exports, vips.get(&key)))
            })
            .collect();
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
        let imports = Imports::build(&id("b"), [&b, &a], &BTreeMap::new(), 1);
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
        let old = Imports::build(&id("b"), [&a], &BTreeMap::new(), 1);
        a.services.remove(&ServiceKey::new("shop", "web"));
        export(&mut a.services, "shop", "api", "10.96.0.12", &["10.1.0.7"]);
        let new = Imports::build(&id("b"), [&a], &BTreeMap::new(), 2);
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
