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

/// What Kubernetes defaults an unset property to, so an export that leaves a property unset
/// (a cluster without an API server, an older peer) does not conflict with one that spells
/// out the default.
struct Effective<'a> {
    session_affinity: &'a str,
    /// `timeoutSeconds` only matters (and only exists) under `ClientIP` affinity.
    session_affinity_timeout: Option<i32>,
    internal_traffic_policy: &'a str,
    traffic_distribution: Option<&'a str>,
    ip_families: std::collections::BTreeSet<&'a str>,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_SESSION_AFFINITY_TIMEOUT: i32 = 10_800;

impl<'a> Effective<'a> {
    fn of(p: &'a ExportProperties) -> Self {
        let session_affinity = p.session_affinity.as_deref().unwrap_or("None");
        Self {
            session_affinity,
            session_affinity_timeout: (session_affinity == "ClientIP").then(|| {
                p.session_affinity_timeout
                    .unwrap_or(DEFAULT_SESSION_AFFINITY_TIMEOUT)
            }),
            internal_traffic_policy: p.internal_traffic_policy.as_deref().unwrap_or("Cluster"),
            traffic_distribution: p.traffic_distribution.as_deref(),
            ip_families: p.ip_families.iter().map(String::as_str).collect(),
        }
    }

    /// The reasons `self` (a newer export) conflicts with `oldest` on.
    fn conflicts_with(&self, oldest: &Self) -> impl Iterator<Item = ConflictReason> {
        [
            (
                self.session_affinity != oldest.session_affinity,
                ConflictReason::SessionAffinityConflict,
            ),
            (
                // Only when both use ClientIP affinity: otherwise there is no config to
                // disagree on (a differing affinity is its own conflict).
                self.session_affinity_timeout.is_some()
                    && oldest.session_affinity_timeout.is_some()
                    && self.session_affinity_timeout != oldest.session_affinity_timeout,
                ConflictReason::SessionAffinityConfigConflict,
            ),
            (
                self.internal_traffic_policy != oldest.internal_traffic_policy,
                ConflictReason::InternalTrafficPolicyConflict,
            ),
            (
                self.traffic_distribution != oldest.traffic_distribution,
                ConflictReason::TrafficDistributionConflict,
            ),
            (
                // Families unknown (empty) agree with anything; the order (which family is
                // primary) does not change which backends a client can reach.
                !self.ip_families.is_empty()
                    && !oldest.ip_families.is_empty()
                    && self.ip_families != oldest.ip_families,
                ConflictReason::IpFamilyConflict,
            ),
        ]
        .into_iter()
        .filter(|(differs, _)| *differs)
        .map(|(_, reason)| reason)
    }
}

/// The clusterset IPs an import of `kind` carries: none for a headless one.
fn vips_for(kind: ServiceKind, vips: Option<&Vec<IpAddr>>) -> Vec<IpAddr> {
    match kind {
        ServiceKind::ClusterSetIP => vips.cloned().unwrap_or_default(),
        ServiceKind::Headless => Vec::new(),
    }
}

/// Whether `port` (named unlike every port of `ports`) can join them and leave a port list a
/// Service may have: port and protocol unique, and an unnamed port only as the only one.
fn fits(ports: &[ServicePort], port: &ServicePort) -> bool {
    let unnamed = port.name.is_none() || ports.iter().any(|q| q.name.is_none());
    (ports.is_empty() || !unnamed)
        && !ports
            .iter()
            .any(|q| q.port == port.port && q.protocol == port.protocol)
}

/// The service the exports (oldest first) make, KEP-1645's way: the oldest export's type and
/// properties, the union of the ports (a port named alike but defined differently: the oldest
/// export's), and a conflict named for everything a newer export disagrees on.
fn merge(
    local: &ClusterId,
    exports: &[(&ClusterState, &ExportedService)],
    vips: Option<&Vec<IpAddr>>,
) -> ImportedService {
    let (oldest_cluster, oldest) = exports[0];
    let oldest_effective = Effective::of(&oldest.properties);
    let sorted = |ports: &[ServicePort]| {
        let mut ports = ports.to_vec();
        ports.sort();
        ports
    };
    let oldest_ports = sorted(&oldest.ports);
    let mut conflicts = Vec::new();
    let mut ports: Vec<ServicePort> = Vec::new();
    for (_, svc) in exports {
        for p in &svc.ports {
            match ports.iter().find(|q| q.name == p.name) {
                Some(q) if q != p => conflicts.push(ConflictReason::PortConflict),
                Some(_) => {}
                None if fits(&ports, p) => ports.push(p.clone()),
                None => conflicts.push(ConflictReason::PortConflict),
            }
        }
        // A port only some exports have is a conflict too (the upstream conformance suite
        // expects one): clients of the union may reach a cluster without that port.
        if sorted(&svc.ports) != oldest_ports {
            conflicts.push(ConflictReason::PortConflict);
        }
        if svc.kind != oldest.kind {
            conflicts.push(ConflictReason::TypeConflict);
        }
        conflicts.extend(Effective::of(&svc.properties).conflicts_with(&oldest_effective));
        if svc.properties.labels != oldest.properties.labels {
            conflicts.push(ConflictReason::LabelsConflict);
        }
        if svc.properties.annotations != oldest.properties.annotations {
            conflicts.push(ConflictReason::AnnotationsConflict);
        }
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
        vips: vips_for(oldest.kind, vips),
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

    /// The ClusterSetIP imports: the services that need clusterset IPs.
    pub fn clusterset_ip_services(&self) -> std::collections::BTreeSet<ServiceKey> {
        self.services
            .values()
            .filter(|s| s.kind == ServiceKind::ClusterSetIP)
            .map(|s| s.key())
            .collect()
    }

    /// Sets every import's clusterset IPs from `vips` (a headless import gets none), for a
    /// controller that allocates them after seeing which imports need them.
    pub fn assign_vips(&mut self, vips: &BTreeMap<ServiceKey, Vec<IpAddr>>) {
        for service in self.services.values_mut() {
            service.vips = vips_for(service.kind, vips.get(&service.key()));
        }
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

    use crate::cluster::{NodeGateway, Protocol};

    fn port(name: &str, protocol: Protocol, number: u16) -> ServicePort {
        ServicePort::new(Some(name.into()), protocol, number)
    }

    /// Clusters a and b both exporting shop/web (a at `a_at`, b at `b_at`), each changed by
    /// its closure; b's view (b is local) of the merged service.
    fn merged(
        a_at: Option<i64>,
        b_at: Option<i64>,
        change_a: impl FnOnce(&mut ExportedService),
        change_b: impl FnOnce(&mut ExportedService),
    ) -> ImportedService {
        let (mut a, mut b) = clusters_a_b();
        let mut web_a = service("shop", "web", "10.96.0.10", &["10.1.0.5"]);
        web_a.properties.exported_at = a_at;
        change_a(&mut web_a);
        let mut web_b = service("shop", "web", "10.97.0.10", &["10.2.0.5"]);
        web_b.properties.exported_at = b_at;
        change_b(&mut web_b);
        a.services.insert(web_a.key(), web_a);
        b.services.insert(web_b.key(), web_b);
        let vips = BTreeMap::from([(
            ServiceKey::new("shop", "web"),
            vec!["10.255.0.7".parse().unwrap()],
        )]);
        let mut imports = Imports::build(&id("b"), [&a, &b], &vips, 1);
        imports
            .services
            .remove("shop/web")
            .expect("shop/web imported")
    }

    #[test]
    fn identical_exports_merge_without_conflict() {
        let web = merged(Some(100), Some(200), |_| {}, |_| {});
        assert!(web.conflicts.is_empty(), "{:?}", web.conflicts);
        assert_eq!(web.conflict_reason(), None);
        assert_eq!(web.oldest, id("a"));
        assert_eq!(web.vips, vec!["10.255.0.7".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn type_conflict_the_oldest_exports_type_wins() {
        // The conformance case: an older ClusterIP export, a newer headless one.
        let web = merged(
            Some(100),
            Some(200),
            |_| {},
            |b| {
                b.kind = ServiceKind::Headless;
                b.cluster_ips.clear();
            },
        );
        assert_eq!(web.kind, ServiceKind::ClusterSetIP);
        assert_eq!(web.conflicts, [ConflictReason::TypeConflict]);
        assert_eq!(web.vips.len(), 1, "a ClusterSetIP import keeps its VIP");
        // The other way round: the older headless one wins, and no VIP is given.
        let web = merged(
            Some(300),
            Some(200),
            |_| {},
            |b| b.kind = ServiceKind::Headless,
        );
        assert_eq!(web.kind, ServiceKind::Headless);
        assert_eq!(web.oldest, id("b"));
        assert_eq!(web.conflicts, [ConflictReason::TypeConflict]);
        assert!(web.vips.is_empty(), "{:?}", web.vips);
    }

    #[test]
    fn an_extra_port_makes_the_union_and_a_port_conflict() {
        let web = merged(
            Some(100),
            Some(200),
            |_| {},
            |b| b.ports.push(port("stcp", Protocol::Sctp, 142)),
        );
        assert_eq!(
            web.ports,
            [
                port("http", Protocol::Tcp, 80),
                port("stcp", Protocol::Sctp, 142)
            ]
        );
        assert_eq!(web.conflicts, [ConflictReason::PortConflict]);
        assert_eq!(web.conflict_reason().as_deref(), Some("PortConflict"));
    }

    #[test]
    fn a_port_named_alike_but_different_is_the_oldest_exports() {
        for (a_at, b_at, winner) in [(Some(100), Some(200), 80), (Some(300), Some(200), 81)] {
            let web = merged(a_at, b_at, |_| {}, |b| b.ports[0].port = 81);
            assert_eq!(web.ports, [port("http", Protocol::Tcp, winner)], "{a_at:?}");
            assert_eq!(web.conflicts, [ConflictReason::PortConflict]);
        }
        // An appProtocol is part of a port's definition.
        let web = merged(
            Some(100),
            Some(200),
            |a| a.ports[0].app_protocol = Some("http".into()),
            |b| b.ports[0].app_protocol = Some("kubernetes.io/h2c".into()),
        );
        assert_eq!(web.ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(web.conflicts, [ConflictReason::PortConflict]);
    }

    #[test]
    fn the_union_stays_a_port_list_a_service_may_have() {
        // Another name for the same port and protocol: the oldest export's name only.
        let web = merged(
            Some(100),
            Some(200),
            |_| {},
            |b| b.ports = vec![port("web", Protocol::Tcp, 80)],
        );
        assert_eq!(web.ports, [port("http", Protocol::Tcp, 80)]);
        assert_eq!(web.conflicts, [ConflictReason::PortConflict]);
        // The same number over UDP is another port.
        let web = merged(
            Some(100),
            Some(200),
            |_| {},
            |b| b.ports.push(port("quic", Protocol::Udp, 80)),
        );
        assert_eq!(web.ports.len(), 2);
        // An unnamed port is only ever alone: the oldest export's single unnamed port stays
        // alone, and a newer unnamed one does not join named ones.
        let unnamed = || ServicePort::new(None, Protocol::Tcp, 8080);
        let web = merged(Some(100), Some(200), |a| a.ports = vec![unnamed()], |_| {});
        assert_eq!(web.ports, [unnamed()]);
        assert_eq!(web.conflicts, [ConflictReason::PortConflict]);
        let web = merged(Some(100), Some(200), |_| {}, |b| b.ports = vec![unnamed()]);
        assert_eq!(web.ports, [port("http", Protocol::Tcp, 80)]);
        assert_eq!(web.conflicts, [ConflictReason::PortConflict]);
        // Both unnamed and alike: one port, no conflict.
        let web = merged(
            Some(100),
            Some(200),
            |a| a.ports = vec![unnamed()],
            |b| b.ports = vec![unnamed()],
        );
        assert_eq!(web.ports, [unnamed()]);
        assert!(web.conflicts.is_empty(), "{:?}", web.conflicts);
    }

    #[test]
    fn the_same_ports_listed_in_another_order_agree() {
        let two = || {
            vec![
                port("http", Protocol::Tcp, 80),
                port("dns", Protocol::Udp, 53),
            ]
        };
        let web = merged(
            Some(100),
            Some(200),
            |a| a.ports = two(),
            |b| b.ports = two().into_iter().rev().collect(),
        );
        assert!(web.conflicts.is_empty(), "{:?}", web.conflicts);
        assert_eq!(web.ports.len(), 2);
    }

    #[test]
    fn session_affinity_and_its_config_follow_the_oldest_export() {
        let client_ip = |timeout: Option<i32>| {
            move |s: &mut ExportedService| {
                s.properties.session_affinity = Some("ClientIP".into());
                s.properties.session_affinity_timeout = timeout;
            }
        };
        let web = merged(Some(100), Some(200), client_ip(Some(60)), |_| {});
        assert_eq!(web.properties.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(web.properties.session_affinity_timeout, Some(60));
        assert_eq!(web.conflicts, [ConflictReason::SessionAffinityConflict]);

        let web = merged(
            Some(100),
            Some(200),
            client_ip(Some(60)),
            client_ip(Some(120)),
        );
        assert_eq!(web.properties.session_affinity_timeout, Some(60));
        assert_eq!(
            web.conflicts,
            [ConflictReason::SessionAffinityConfigConflict]
        );

        // Unset means Kubernetes' defaults: None affinity, a 3-hour timeout under ClientIP.
        let web = merged(
            Some(100),
            Some(200),
            |a| a.properties.session_affinity = Some("None".into()),
            |_| {},
        );
        assert!(web.conflicts.is_empty(), "{:?}", web.conflicts);
        let web = merged(
            Some(100),
            Some(200),
            client_ip(Some(DEFAULT_SESSION_AFFINITY_TIMEOUT)),
            client_ip(None),
        );
        assert!(web.conflicts.is_empty(), "{:?}", web.conflicts);
    }

    #[test]
    fn traffic_policy_distribution_and_families_conflicts_are_named() {
        let web = merged(
            Some(100),
            Some(200),
            |a| a.properties.internal_traffic_policy = Some("Local".into()),
            |b| b.properties.internal_traffic_policy = Some("Cluster".into()),
        );
        assert_eq!(
            web.properties.internal_traffic_policy.as_deref(),
            Some("Local")
        );
        assert_eq!(
            web.conflicts,
            [ConflictReason::InternalTrafficPolicyConflict]
        );
        // Unset is Kubernetes' default, Cluster.
        let web = merged(
            Some(100),
            Some(200),
            |a| a.properties.internal_traffic_policy = Some("Cluster".into()),
            |_| {},
        );
        assert!(web.conflicts.is_empty(), "{:?}", web.conflicts);

        let web = merged(
            Some(100),
            Some(200),
            |_| {},
            |b| b.properties.traffic_distribution = Some("PreferClose".into()),
        );
        assert_eq!(web.properties.traffic_distribution, None);
        assert_eq!(web.conflicts, [ConflictReason::TrafficDistributionConflict]);

        let families = |f: &[&str]| {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            move |s: &mut ExportedService| s.properties.ip_families = f
        };
        let web = merged(
            Some(100),
            Some(200),
            families(&["IPv4"]),
            families(&["IPv6"]),
        );
        assert_eq!(web.properties.ip_families, ["IPv4"]);
        assert_eq!(web.conflicts, [ConflictReason::IpFamilyConflict]);
        assert_eq!(web.conflict_reason().as_deref(), Some("IPFamilyConflict"));
        // The same families, primary first or second, reach the same backends.
        let web = merged(
            Some(100),
            Some(200),
            families(&["IPv4", "IPv6"]),
            families(&["IPv6", "IPv4"]),
        );
        assert!(web.conflicts.is_empty(), "{:?}", web.conflicts);
    }

    #[test]
    fn labels_and_annotations_are_the_oldest_exports_and_differences_conflict() {
        let meta = |label: &'static str, annotation: &'static str| {
            move |s: &mut ExportedService| {
                s.properties.labels = BTreeMap::from([(label.into(), "true".into())]);
                s.properties.annotations = BTreeMap::from([(annotation.into(), "true".into())]);
            }
        };
        let web = merged(
            Some(100),
            Some(200),
            meta("dummy-label", "dummy-annotation"),
            meta("dummy-label2", "dummy-annotation2"),
        );
        assert_eq!(
            web.properties.labels.keys().collect::<Vec<_>>(),
            ["dummy-label"]
        );
        assert_eq!(
            web.properties.annotations.keys().collect::<Vec<_>>(),
            ["dummy-annotation"]
        );
        assert_eq!(
            web.conflicts,
            [
                ConflictReason::LabelsConflict,
                ConflictReason::AnnotationsConflict
            ]
        );
        assert_eq!(
            web.conflict_reason().as_deref(),
            Some("LabelsConflict,AnnotationsConflict")
        );
    }

    #[test]
    fn an_unknown_creation_time_counts_as_the_newest_and_ties_go_to_the_lower_id() {
        let change = |b: &mut ExportedService| b.ports[0].port = 81;
        // b's creation time is known, a's is not: b is the oldest.
        let web = merged(None, Some(200), |_| {}, change);
        assert_eq!(web.oldest, id("b"));
        assert_eq!(web.ports[0].port, 81);
        // Both unknown, or the same second: the lower cluster ID, a.
        for at in [None, Some(200)] {
            let web = merged(at, at, |_| {}, change);
            assert_eq!(web.oldest, id("a"), "{at:?}");
            assert_eq!(web.ports[0].port, 80);
        }
    }

    #[test]
    fn remote_endpoints_on_a_gateway_less_node_are_not_ready_local_ones_are() {
        let (mut a, mut b) = clusters_a_b();
        export(&mut a.services, "shop", "web", "10.96.0.10", &["10.1.0.5"]);
        export(&mut b.services, "shop", "web", "10.97.0.10", &["10.2.0.5"]);
        // Neither node-0 has a gateway (the fixture's default).
        let imports = Imports::build(&id("b"), [&a, &b], &BTreeMap::new(), 1);
        let web = &imports.services["shop/web"];
        let ready = |cluster: &str| -> Vec<bool> {
            web.backends
                .iter()
                .find(|be| be.cluster == id(cluster))
                .unwrap()
                .endpoints
                .iter()
                .map(|e| e.ready)
                .collect()
        };
        assert_eq!(ready("a"), [false], "remote, no tunnel reaches it");
        assert_eq!(ready("b"), [true], "local endpoints need no tunnel");

        a.nodes.get_mut("node-0").unwrap().gateway = Some(NodeGateway {
            endpoint: "192.0.2.1:51820".parse().unwrap(),
            public_key: crate::cluster::PublicKey([7; 32]),
        });
        let imports = Imports::build(&id("b"), [&a, &b], &BTreeMap::new(), 2);
        let web = &imports.services["shop/web"];
        assert!(web.backends.iter().all(|be| be.endpoints[0].ready));
        // An endpoint its cluster reports not ready stays so.
        a.services
            .get_mut(&ServiceKey::new("shop", "web"))
            .unwrap()
            .endpoints[0]
            .ready = false;
        let imports = Imports::build(&id("b"), [&a, &b], &BTreeMap::new(), 3);
        assert!(!imports.services["shop/web"].backends[0].endpoints[0].ready);
    }

    #[test]
    fn vips_assigned_after_the_build_go_to_clusterset_ip_imports_only() {
        let mut a = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        export(&mut a.services, "shop", "web", "10.96.0.10", &["10.1.0.5"]);
        let mut db = service("shop", "db", "10.96.0.11", &["10.1.0.9"]);
        db.kind = ServiceKind::Headless;
        a.services.insert(db.key(), db);
        let mut imports = Imports::build(&id("b"), [&a], &BTreeMap::new(), 1);
        let wanted = imports.clusterset_ip_services();
        assert_eq!(wanted, [ServiceKey::new("shop", "web")].into());
        let vip: IpAddr = "10.255.0.3".parse().unwrap();
        let vips = BTreeMap::from([
            (ServiceKey::new("shop", "web"), vec![vip]),
            (ServiceKey::new("shop", "db"), vec![vip]),
        ]);
        imports.assign_vips(&vips);
        assert_eq!(imports.services["shop/web"].vips, [vip]);
        assert!(imports.services["shop/db"].vips.is_empty());
        assert_eq!(imports, Imports::build(&id("b"), [&a], &vips, 1));
    }

    #[test]
    fn headless_imports_get_no_vip_even_when_one_is_known() {
        let mut a = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
        let mut db = service("shop", "db", "10.96.0.11", &["10.1.0.9"]);
        db.kind = ServiceKind::Headless;
        db.cluster_ips.clear();
        a.services.insert(db.key(), db);
        let vips = BTreeMap::from([(
            ServiceKey::new("shop", "db"),
            vec!["10.255.0.1".parse().unwrap()],
        )]);
        let imports = Imports::build(&id("b"), [&a], &vips, 1);
        let db = &imports.services["shop/db"];
        assert_eq!(db.kind, ServiceKind::Headless);
        assert!(db.vips.is_empty(), "{:?}", db.vips);
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
