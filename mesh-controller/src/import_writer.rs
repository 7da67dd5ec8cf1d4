//! Writes what the cluster imports into Kubernetes, as KEP-1645 describes. For every service
//! exported anywhere in the clusterset (also one only this cluster exports: every exporting
//! cluster imports too):
//!
//! * a `ServiceImport` (`multicluster.x-k8s.io/v1beta1`) with the oldest export's type,
//!   properties and exported labels and annotations, the union of the ports, the clusterset
//!   IPs with their families, the exporting clusters and a `Ready` condition;
//! * for a ClusterSetIP import, a derived selectorless ClusterIP Service (`derived-<name>`,
//!   owned by the ServiceImport) whose ClusterIPs become the import's clusterset IPs (read
//!   back by [`crate::objects`]): kube-proxy on the client's node balances them over
//!   * per exporting cluster, the local one included, MCS EndpointSlices labelled
//!     `multicluster.kubernetes.io/service-name` and `multicluster.kubernetes.io/source-cluster`,
//!     managed by `trellis-controller.trellis.dev`, and `kubernetes.io/service-name` naming the
//!     derived Service (remote endpoints reach their pods through the tunnels).
//!
//! Objects are written with server-side apply (field manager `trellis-controller`), and
//! those it manages but no longer wants are deleted, but only once the grace period after
//! start has passed (peers reconnect and resync first: nothing is deleted on a restart).
//!
//! Which objects are wanted is decided purely by [`desired_objects`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Service, ServicePort as K8sServicePort, ServiceSpec, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as K8sEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use trellis_core::cluster::{ClusterId, ClusterState, ServiceKey, ServiceKind, ServicePort};
use trellis_core::imports::{Backend, ImportedService, Imports};

use crate::Error;
use crate::crd::{
    ClusterStatus, ServiceImport, ServiceImportPort, ServiceImportSpec, ServiceImportStatus,
    ServiceImportType,
};
use crate::hub::Hub;
use crate::objects::{
    LABEL_MCS_SERVICE_NAME, LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER, MANAGER,
    derived_service_name, short_name,
};

pub use crate::objects::LABEL_MANAGED_BY;

pub const FIELD_MANAGER: &str = MANAGER;
pub const LABEL_SLICE_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Our `endpointslice.kubernetes.io/managed-by`: not Kubernetes' own
/// (`endpointslice-controller.k8s.io`), which would take the slices over.
pub const SLICE_MANAGER: &str = "trellis-controller.trellis.dev";

/// The objects the cluster should have, keyed by (namespace, name). The derived Services'
/// owner references and the conditions' transition times are set when they are applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredObjects {
    pub imports: BTreeMap<(String, String), ServiceImport>,
    /// The derived Services of the ClusterSetIP imports.
    pub services: BTreeMap<(String, String), Service>,
    pub slices: BTreeMap<(String, String), EndpointSlice>,
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// An EndpointSlice name, `imported-<svc>.<cluster>[.v6][.<part>]` (dots: neither a service
/// name nor a cluster ID has one, so no two services' or clusters' slices share a name),
/// shortened with a hash when longer than 63 characters.
pub fn slice_name(service: &str, cluster: &str, ipv6: bool, part: usize) -> String {
    let family = if ipv6 { ".v6" } else { "" };
    let part = if part == 0 {
        String::new()
    } else {
        format!(".{part}")
    };
    short_name(format!("imported-{service}.{cluster}{family}{part}"))
}

/// How often the writer applies every object again, whether or not it changed: a
/// ServiceImport deleted with kubectl, or a namespace deleted and recreated, comes back.
pub const RESYNC: Duration = Duration::from_secs(60);

/// The most endpoints the API server takes in one EndpointSlice.
pub const MAX_SLICE_ENDPOINTS: usize = 1000;

fn family_of(ip: &IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// A condition as desired: its transition time is set by the writer.
pub(crate) fn condition(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

/// The affinity's configuration, which Kubernetes allows only with `ClientIP` affinity.
fn session_affinity_config(svc: &ImportedService) -> Option<SessionAffinityConfig> {
    if svc.properties.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    svc.properties
        .session_affinity_timeout
        .map(|timeout| SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(timeout),
            }),
        })
}

fn import_of(svc: &ImportedService) -> ServiceImport {
    let headless = svc.kind == ServiceKind::Headless;
    let ips: Vec<IpAddr> = if headless { vec![] } else { svc.vips.clone() };
    let mut si = ServiceImport::new(
        &svc.name,
        ServiceImportSpec {
            ports: svc
                .ports
                .iter()
                .map(|p| ServiceImportPort {
                    name: p.name.clone(),
                    protocol: Some(p.protocol.as_kubernetes().into()),
                    app_protocol: p.app_protocol.clone(),
                    port: i32::from(p.port),
                })
                .collect(),
            ips: ips.iter().map(IpAddr::to_string).collect(),
            type_: if headless {
                ServiceImportType::Headless
            } else {
                ServiceImportType::ClusterSetIP
            },
            session_affinity: svc.properties.session_affinity.clone(),
            session_affinity_config: session_affinity_config(svc),
            // The families of the clusterset IPs, in order; a headless import has none, and
            // takes the oldest export's.
            ip_families: if headless {
                svc.properties.ip_families.clone()
            } else {
                ips.iter().map(|ip| family_of(ip).to_owned()).collect()
            },
            internal_traffic_policy: svc.properties.internal_traffic_policy.clone(),
            traffic_distribution: svc.properties.traffic_distribution.clone(),
        },
    );
    si.metadata.namespace = Some(svc.namespace.clone());
    let mut import_labels = svc.properties.labels.clone();
    import_labels.insert(LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned());
    si.metadata.labels = Some(import_labels);
    si.metadata.annotations =
        (!svc.properties.annotations.is_empty()).then(|| svc.properties.annotations.clone());
    let ready = if headless {
        condition(
            "Ready",
            true,
            "Ready",
            "the headless import is served by DNS".into(),
        )
    } else if ips.is_empty() {
        condition(
            "Ready",
            false,
            "Pending",
            "waiting for the clusterset IP of the derived Service".into(),
        )
    } else {
        condition(
            "Ready",
            true,
            "Ready",
            format!(
                "clusterset IPs allocated from Service {}",
                derived_service_name(&svc.name)
            ),
        )
    };
    si.status = Some(ServiceImportStatus {
        clusters: svc
            .backends
            .iter()
            .map(|b| ClusterStatus {
                cluster: b.cluster.to_string(),
            })
            .collect(),
        conditions: vec![ready],
    });
    si
}

/// The selectorless ClusterIP Service whose ClusterIPs are the import's clusterset IPs;
/// `None` for a headless import or one without ports (a ClusterIP Service needs one).
fn derived_service_of(svc: &ImportedService) -> Option<Service> {
    if svc.kind != ServiceKind::ClusterSetIP || svc.ports.is_empty() {
        return None;
    }
    Some(Service {
        metadata: ObjectMeta {
            name: Some(derived_service_name(&svc.name)),
            namespace: Some(svc.namespace.clone()),
            labels: Some(labels(&[
                (LABEL_MCS_SERVICE_NAME, &svc.name),
                (LABEL_MANAGED_BY, MANAGER),
            ])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(
                svc.ports
                    .iter()
                    .map(|p| K8sServicePort {
                        name: p.name.clone(),
                        protocol: Some(p.protocol.as_kubernetes().into()),
                        port: i32::from(p.port),
                        app_protocol: p.app_protocol.clone(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            // This cluster's families, not an export's (often another cluster's, which this
            // one may not have, and a primary family can never change once allocated): a VIP
            // per family this cluster has, whatever the exports say.
            ip_families: None,
            ip_family_policy: Some("PreferDualStack".to_owned()),
            session_affinity: svc.properties.session_affinity.clone(),
            session_affinity_config: session_affinity_config(svc),
            ..Default::default()
        }),
        status: None,
    })
}

/// Each exporting cluster's own Service ports, by cluster and service.
pub type ServicePorts = BTreeMap<(ClusterId, ServiceKey), Vec<ServicePort>>;

/// The Service ports every service of `clusters` (the local one and the remotes) has.
pub fn service_ports<'a>(clusters: impl IntoIterator<Item = &'a ClusterState>) -> ServicePorts {
    clusters
        .into_iter()
        .flat_map(|c| {
            c.services
                .values()
                .map(|s| ((c.id.clone(), s.key()), s.ports.clone()))
        })
        .collect()
}

/// Whether the endpoints of a cluster whose Service has `own` ports serve the import's port
/// named `name`: not when the cluster defines that port differently from the import (a
/// newer export that lost a port conflict), so the VIP's port reaches only the clusters
/// that expose it as the import does. Unknown ports serve.
fn serves(svc: &ImportedService, own: Option<&Vec<ServicePort>>, name: &Option<String>) -> bool {
    let Some(own) = own.and_then(|ports| ports.iter().find(|p| &p.name == name)) else {
        return true;
    };
    svc.ports
        .iter()
        .any(|p| &p.name == name && p.protocol == own.protocol && p.port == own.port)
}

/// The MCS EndpointSlices of one exporting cluster: IPv4, and IPv6 when it has such
/// endpoints. `own_ports` are the cluster's own Service ports, if known.
fn slices_of(
    svc: &ImportedService,
    backend: &Backend,
    own_ports: Option<&Vec<ServicePort>>,
) -> Vec<EndpointSlice> {
    let derived = (svc.kind == ServiceKind::ClusterSetIP && !svc.ports.is_empty())
        .then(|| derived_service_name(&svc.name));
    let mut out = Vec::new();
    for ipv6 in [false, true] {
        let endpoints: Vec<K8sEndpoint> = backend
            .endpoints
            .iter()
            .filter_map(|e| {
                let addrs: Vec<String> = e
                    .addresses
                    .iter()
                    .filter(|a| matches!(a, IpAddr::V6(_)) == ipv6)
                    .map(|a| a.to_string())
                    .collect();
                (!addrs.is_empty()).then(|| K8sEndpoint {
                    addresses: addrs,
                    hostname: e.hostname.clone(),
                    conditions: Some(EndpointConditions {
                        ready: Some(e.ready),
                        ..Default::default()
                    }),
                    // Only this cluster's node names mean anything to kube-proxy here.
                    node_name: if backend.local { e.node.clone() } else { None },
                    ..Default::default()
                })
            })
            .collect();
        if endpoints.is_empty() && ipv6 {
            continue;
        }
        let mut ports: Vec<EndpointPort> = Vec::new();
        // One port per name: a rollout changing a target port briefly shows both, and the
        // API server refuses a slice naming a port twice.
        for p in backend
            .endpoint_ports
            .iter()
            .filter(|p| serves(svc, own_ports, &p.name))
        {
            if ports.iter().any(|q| q.name == p.name) {
                continue;
            }
            ports.push(EndpointPort {
                name: p.name.clone(),
                protocol: Some(p.protocol.as_kubernetes().into()),
                port: Some(i32::from(p.port)),
                app_protocol: p.app_protocol.clone(),
            });
        }
        let mut slice_labels = labels(&[
            (LABEL_MCS_SERVICE_NAME, &svc.name),
            (LABEL_SOURCE_CLUSTER, backend.cluster.as_str()),
            (LABEL_SLICE_MANAGED_BY, SLICE_MANAGER),
            (LABEL_MANAGED_BY, MANAGER),
        ]);
        if let Some(derived) = &derived {
            slice_labels.insert(LABEL_SERVICE_NAME.to_owned(), derived.clone());
        }
        let parts: Vec<Vec<K8sEndpoint>> = if endpoints.is_empty() {
            vec![Vec::new()]
        } else {
            endpoints
                .chunks(MAX_SLICE_ENDPOINTS)
                .map(<[K8sEndpoint]>::to_vec)
                .collect()
        };
        for (part, endpoints) in parts.into_iter().enumerate() {
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(slice_name(&svc.name, backend.cluster.as_str(), ipv6, part)),
                    namespace: Some(svc.namespace.clone()),
                    labels: Some(slice_labels.clone()),
                    ..Default::default()
                },
                address_type: if ipv6 { "IPv6".into() } else { "IPv4".into() },
                endpoints: Some(endpoints),
                ports: Some(ports.clone()),
            });
        }
    }
    out
}

/// Every ServiceImport, derived Service and EndpointSlice the imports call for: every
/// service exported anywhere in the clusterset, here too. `service_ports` (each exporting
/// cluster's own Service ports, see [`service_ports`]) keep a port that a cluster defines
/// differently from the import off that cluster's slices.
pub fn desired_objects(imports: &Imports, service_ports: &ServicePorts) -> DesiredObjects {
    let mut out = DesiredObjects::default();
    for svc in imports.services.values() {
        out.imports
            .insert((svc.namespace.clone(), svc.name.clone()), import_of(svc));
        if let Some(derived) = derived_service_of(svc) {
            out.services.insert(
                (svc.namespace.clone(), derived_service_name(&svc.name)),
                derived,
            );
        }
        for backend in &svc.backends {
            let own = service_ports.get(&(backend.cluster.clone(), svc.key()));
            for slice in slices_of(svc, backend, own) {
                let name = slice.metadata.name.clone().unwrap_or_default();
                out.slices.insert((svc.namespace.clone(), name), slice);
            }
        }
    }
    out
}

fn kube_err(operation: &'static str) -> impl Fn(kube::Error) -> Error {
    move |source| Error::Kubernetes { operation, source }
}

/// `conditions` with their transition times: the time of the same condition in `previous`
/// if its status did not change, else `now`.
pub fn stamp_conditions(conditions: &mut [Condition], previous: &[Condition], now: Time) {
    for c in conditions {
        c.last_transition_time = previous
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
            .map(|p| p.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
    }
}

pub(crate) fn now() -> Time {
    // Conditions carry whole seconds on the wire: keep the same here, so what was applied
    // compares equal to what the API server returns.
    let t = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(t.as_second()).unwrap_or(t))
}

/// Applies and prunes the imported objects.
pub struct ImportWriter {
    client: Client,
    applied: DesiredObjects,
    /// The UIDs of the applied ServiceImports (the derived Services' owners).
    uids: BTreeMap<(String, String), String>,
    /// Apply everything once more, changed or not (the conditions' previous transition times
    /// are still read from `applied`).
    resync: bool,
}

impl std::fmt::Debug for ImportWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportWriter").finish_non_exhaustive()
    }
}

impl ImportWriter {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            applied: DesiredObjects::default(),
            uids: BTreeMap::new(),
            resync: false,
        }
    }

    /// Server-side applies every object that differs from what this writer last applied: the
    /// ServiceImports (and their status), then the derived Services (owned by their
    /// ServiceImport, so each waits for its import's UID), then the EndpointSlices. A failure
    /// on one object (its namespace may not exist) does not stop the others; all failures are
    /// returned.
    pub async fn apply(&mut self, desired: &DesiredObjects) -> Vec<Error> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut errors = Vec::new();
        for ((ns, name), wanted) in &desired.imports {
            let key = (ns.clone(), name.clone());
            let mut obj = wanted.clone();
            let previous = self
                .applied
                .imports
                .get(&key)
                .and_then(|o| o.status.as_ref())
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            if let Some(status) = obj.status.as_mut() {
                stamp_conditions(&mut status.conditions, &previous, now());
            }
            if !self.resync
                && self.applied.imports.get(&key) == Some(&obj)
                && self.uids.contains_key(&key)
            {
                continue;
            }
            let api: Api<ServiceImport> = Api::namespaced(self.client.clone(), ns);
            // The status (which clusters export it, Ready) is a subresource: applied
            // separately.
            let applied = match api.patch(name, &pp, &Patch::Apply(&obj)).await {
                Ok(written) => {
                    if let Some(uid) = written.metadata.uid {
                        self.uids.insert(key.clone(), uid);
                    }
                    api.patch_status(name, &pp, &Patch::Apply(&obj))
                        .await
                        .map_err(kube_err("applying a ServiceImport's status"))
                }
                Err(e) => Err(kube_err("applying a ServiceImport")(e)),
            };
            match applied {
                Ok(_) => {
                    self.applied.imports.insert(key, obj);
                }
                Err(e) => errors.push(e),
            }
        }
        for ((ns, name), wanted) in &desired.services {
            let import = wanted
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_MCS_SERVICE_NAME))
                .cloned()
                .unwrap_or_default();
            // Without its owner's UID the Service would outlive the import: wait for it.
            let Some(uid) = self.uids.get(&(ns.clone(), import.clone())) else {
                continue;
            };
            let mut obj = wanted.clone();
            obj.metadata.owner_references = Some(vec![OwnerReference {
                api_version: crate::crd::API_VERSION.into(),
                kind: "ServiceImport".into(),
                name: import,
                uid: uid.clone(),
                controller: Some(true),
                block_owner_deletion: None,
            }]);
            let key = (ns.clone(), name.clone());
            if !self.resync && self.applied.services.get(&key) == Some(&obj) {
                continue;
            }
            let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
            // Not forced: a Service of that name someone else manages is a conflict (409),
            // never taken over (our owner reference would have it collected with the import).
            let unforced = PatchParams::apply(FIELD_MANAGER);
            match api.patch(name, &unforced, &Patch::Apply(&obj)).await {
                Ok(_) => {
                    self.applied.services.insert(key, obj);
                }
                Err(e) => errors.push(kube_err("applying a derived Service")(e)),
            }
        }
        for ((ns, name), obj) in &desired.slices {
            if !self.resync && self.applied.slices.get(&(ns.clone(), name.clone())) == Some(obj) {
                continue;
            }
            let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
            match api.patch(name, &pp, &Patch::Apply(obj)).await {
                Ok(_) => {
                    self.applied
                        .slices
                        .insert((ns.clone(), name.clone()), obj.clone());
                }
                Err(e) => errors.push(kube_err("applying an EndpointSlice")(e)),
            }
        }
        self.resync = false;
        errors
    }

    /// Forgets what was applied, so the next [`ImportWriter::apply`] writes everything again:
    /// objects deleted or changed behind the writer's back come back.
    pub fn forget_applied(&mut self) {
        self.resync = true;
    }

    /// Deletes the managed objects that are not desired; continues past failures and returns
    /// how many were deleted and every failure.
    pub async fn prune(&mut self, desired: &DesiredObjects) -> (usize, Vec<Error>) {
        let managed = format!("{LABEL_MANAGED_BY}={MANAGER}");
        let mut deleted = 0;
        let mut errors = Vec::new();
        let (n, mut e) = prune_kind::<ServiceImport>(
            &self.client,
            &ListParams::default().labels(&managed),
            &desired.imports.keys().cloned().collect(),
            ("listing ServiceImports", "deleting a ServiceImport"),
        )
        .await;
        deleted += n.len();
        errors.append(&mut e);
        for key in n {
            self.applied.imports.remove(&key);
            self.uids.remove(&key);
        }
        // Only Services carrying both labels are derived ones.
        let (n, mut e) = prune_kind::<Service>(
            &self.client,
            &ListParams::default().labels(&format!("{managed},{LABEL_MCS_SERVICE_NAME}")),
            &desired.services.keys().cloned().collect(),
            ("listing derived Services", "deleting a derived Service"),
        )
        .await;
        deleted += n.len();
        errors.append(&mut e);
        for key in n {
            self.applied.services.remove(&key);
        }
        let (n, mut e) = prune_kind::<EndpointSlice>(
            &self.client,
            &ListParams::default().labels(&managed),
            &desired.slices.keys().cloned().collect(),
            ("listing EndpointSlices", "deleting an EndpointSlice"),
        )
        .await;
        deleted += n.len();
        errors.append(&mut e);
        for key in n {
            self.applied.slices.remove(&key);
        }
        (deleted, errors)
    }
}

/// Lists the objects of kind `K` that `lp` selects and deletes those not in `keep`; returns
/// the deleted ones and every failure.
async fn prune_kind<K>(
    client: &Client,
    lp: &ListParams,
    keep: &BTreeSet<(String, String)>,
    (listing, deleting): (&'static str, &'static str),
) -> (Vec<(String, String)>, Vec<Error>)
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let mut deleted = Vec::new();
    let mut errors = Vec::new();
    match Api::<K>::all(client.clone()).list(lp).await {
        Ok(list) => {
            for obj in list.items {
                let meta = obj.meta();
                let (Some(ns), Some(name)) = (meta.namespace.clone(), meta.name.clone()) else {
                    continue;
                };
                let key = (ns.clone(), name.clone());
                if keep.contains(&key) {
                    continue;
                }
                let api: Api<K> = Api::namespaced(client.clone(), &ns);
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => deleted.push(key),
                    Err(e) => errors.push(kube_err(deleting)(e)),
                }
            }
        }
        Err(e) => errors.push(kube_err(listing)(e)),
    }
    (deleted, errors)
}

/// Keeps the cluster's imported objects in line with the mesh view; prunes only after
/// `grace` (a lease, so peers have reconnected) has passed since start. Everything is
/// written again every [`RESYNC`].
pub async fn run(client: Client, hub: Hub, grace: Duration) {
    let started = tokio::time::Instant::now();
    let mut writer = ImportWriter::new(client);
    let mut rx = hub.subscribe_view();
    let mut pruned_once = false;
    let mut resync_at = started + RESYNC;
    loop {
        if tokio::time::Instant::now() >= resync_at {
            writer.forget_applied();
            resync_at = tokio::time::Instant::now() + RESYNC;
        }
        let view = rx.borrow_and_update().clone();
        if let Some(view) = view {
            let ports = service_ports(
                std::iter::once(&*view.local).chain(view.remotes.iter().map(|r| &**r)),
            );
            let desired = desired_objects(&view.imports, &ports);
            for e in writer.apply(&desired).await {
                tracing::warn!(error = %trellis_core::error_chain(&e), "writing an import");
            }
            if started.elapsed() >= grace {
                let (deleted, errors) = writer.prune(&desired).await;
                if deleted > 0 || !pruned_once {
                    tracing::info!(deleted, "pruned imports no longer exported");
                }
                pruned_once = true;
                for e in errors {
                    tracing::warn!(error = %trellis_core::error_chain(&e), "pruning imports");
                }
            }
        }
        let wait_grace = async {
            if pruned_once {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep_until(started + grace).await
            }
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            () = wait_grace => {},
            () = tokio::time::sleep_until(resync_at) => {},
        }
        // Coalesce bursts.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The set of namespaces the desired objects live in (for logs and tests).
pub fn namespaces(d: &DesiredObjects) -> BTreeSet<String> {
    d.imports
        .keys()
        .chain(d.services.keys())
        .chain(d.slices.keys())
        .map(|(ns, _)| ns.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::cluster::Protocol;
    use trellis_core::cluster::fixture::{clusters_a_b, export, id};

    fn imports(vips: &[&str]) -> Imports {
        let (mut a, mut b) = clusters_a_b();
        export(&mut a.services, "shop", "web", "10.96.0.10", &["10.1.0.5"]);
        export(
            &mut b.services,
            "shop",
            "web",
            "10.97.0.10",
            &["10.2.0.5", "fd00::5"],
        );
        export(
            &mut a.services,
            "shop",
            "local-only",
            "10.96.0.11",
            &["10.1.0.6"],
        );
        for c in [&mut a, &mut b] {
            for svc in c.services.values_mut() {
                svc.endpoint_ports = vec![ServicePort::new(None, Protocol::Tcp, 8080)];
            }
        }
        let vips = BTreeMap::from([(
            ServiceKey::new("shop", "web"),
            vips.iter().map(|v| v.parse().unwrap()).collect(),
        )]);
        Imports::build(&id("a"), [&a, &b], &vips, 1)
    }

    #[test]
    fn every_exported_service_is_imported_with_its_slices_per_cluster() {
        let d = desired_objects(&imports(&[]), &ServicePorts::new());
        assert_eq!(d.imports.len(), 2, "local-only services are imported too");
        let si = &d.imports[&("shop".into(), "web".into())];
        assert_eq!(si.spec.type_, ServiceImportType::ClusterSetIP);
        assert_eq!(si.spec.ports[0].port, 80);
        let status = si.status.as_ref().unwrap();
        let clusters: Vec<&str> = status.clusters.iter().map(|c| c.cluster.as_str()).collect();
        assert_eq!(clusters, vec!["a", "b"]);
        assert_eq!(
            (
                status.conditions[0].status.as_str(),
                status.conditions[0].reason.as_str()
            ),
            ("False", "Pending"),
            "no clusterset IP yet"
        );
        assert!(si.spec.ips.is_empty() && si.spec.ip_families.is_empty());
        // a's (local) slice, b's IPv4 and IPv6 slices, local-only's slice.
        assert_eq!(d.slices.len(), 4, "{:?}", d.slices.keys());
        let v4 = &d.slices[&("shop".into(), "imported-web.b".into())];
        let l = v4.metadata.labels.as_ref().unwrap();
        assert_eq!(l[LABEL_SOURCE_CLUSTER], "b");
        assert_eq!(l[LABEL_MCS_SERVICE_NAME], "web");
        assert_eq!(l[LABEL_SERVICE_NAME], "derived-web");
        assert_eq!(l[LABEL_SLICE_MANAGED_BY], SLICE_MANAGER);
        assert_eq!(v4.address_type, "IPv4");
        assert_eq!(
            v4.endpoints.as_ref().unwrap()[0].addresses,
            vec!["10.2.0.5"]
        );
        assert_eq!(v4.ports.as_ref().unwrap()[0].port, Some(8080));
        assert!(
            d.slices
                .contains_key(&("shop".into(), "imported-web.b.v6".into()))
        );
        let local = &d.slices[&("shop".into(), "imported-web.a".into())];
        assert_eq!(
            local.endpoints.as_ref().unwrap()[0].addresses,
            vec!["10.1.0.5"]
        );
        assert_eq!(namespaces(&d), BTreeSet::from(["shop".to_string()]));
        // Serialised for apply, the objects carry their apiVersion and kind.
        let json = serde_json::to_value(si).unwrap();
        assert_eq!(json["apiVersion"], "multicluster.x-k8s.io/v1beta1");
        assert_eq!(json["kind"], "ServiceImport");
        let json = serde_json::to_value(v4).unwrap();
        assert_eq!(json["kind"], "EndpointSlice");
    }

    #[test]
    fn a_clusterset_ip_import_gets_a_derived_service_and_its_ips() {
        let d = desired_objects(
            &imports(&["10.100.0.7", "fd00:100::7"]),
            &ServicePorts::new(),
        );
        let si = &d.imports[&("shop".into(), "web".into())];
        assert_eq!(si.spec.ips, ["10.100.0.7", "fd00:100::7"]);
        assert_eq!(si.spec.ip_families, ["IPv4", "IPv6"]);
        let ready = &si.status.as_ref().unwrap().conditions[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        let svc = &d.services[&("shop".into(), "derived-web".into())];
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert!(spec.selector.is_none(), "selectorless: the slices are ours");
        assert_eq!(spec.ports.as_ref().unwrap()[0].port, 80);
        let l = svc.metadata.labels.as_ref().unwrap();
        assert_eq!(l[LABEL_MCS_SERVICE_NAME], "web");
        assert_eq!(l[LABEL_MANAGED_BY], MANAGER);
    }

    #[test]
    fn the_derived_service_is_one_the_api_server_accepts_whatever_the_exports_say() {
        let mut imports = imports(&["10.100.0.7"]);
        let web = imports.services.get_mut("shop/web").unwrap();
        // An export's families (another cluster's) and a timeout without ClientIP affinity.
        web.properties.ip_families = vec!["IPv6".into()];
        web.properties.session_affinity = Some("None".into());
        web.properties.session_affinity_timeout = Some(30);
        let d = desired_objects(&imports, &ServicePorts::new());
        let spec = d.services[&("shop".into(), "derived-web".into())]
            .spec
            .clone()
            .unwrap();
        assert_eq!(
            spec.ip_families, None,
            "this cluster's families, not an export's"
        );
        assert_eq!(spec.ip_family_policy.as_deref(), Some("PreferDualStack"));
        assert!(
            spec.session_affinity_config.is_none(),
            "refused without ClientIP"
        );
        let si = &d.imports[&("shop".into(), "web".into())];
        assert!(si.spec.session_affinity_config.is_none());
    }

    #[test]
    fn slices_hold_at_most_a_thousand_endpoints_and_name_each_port_once() {
        let mut imports = imports(&[]);
        let web = imports.services.get_mut("shop/web").unwrap();
        let b = web.backends.iter_mut().find(|b| !b.local).unwrap();
        b.endpoints = (0..2500u32)
            .map(|i| trellis_core::cluster::Endpoint {
                addresses: vec![std::net::Ipv4Addr::from(0x0a02_0000 + i).into()],
                hostname: None,
                node: None,
                ready: true,
            })
            .collect();
        b.endpoint_ports = vec![
            ServicePort::new(Some("http".into()), Protocol::Tcp, 8080),
            ServicePort::new(Some("http".into()), Protocol::Tcp, 8081),
        ];
        let d = desired_objects(&imports, &ServicePorts::new());
        let parts: Vec<&EndpointSlice> = d
            .slices
            .values()
            .filter(|s| s.metadata.labels.as_ref().unwrap()[LABEL_SOURCE_CLUSTER] == "b")
            .collect();
        let sizes: Vec<usize> = parts
            .iter()
            .map(|s| s.endpoints.as_ref().unwrap().len())
            .collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        assert!(
            d.slices
                .contains_key(&("shop".into(), "imported-web.b.2".into()))
        );
        for s in parts {
            assert_eq!(s.ports.as_ref().unwrap().len(), 1, "one port per name");
        }
    }

    #[test]
    fn slices_of_different_services_or_clusters_never_share_a_name() {
        assert_ne!(
            slice_name("a-b", "c", false, 0),
            slice_name("a", "b-c", false, 0)
        );
        assert_ne!(
            slice_name("web", "east", true, 0),
            slice_name("web", "east-v6", false, 0)
        );
    }

    #[test]
    fn a_cluster_defining_a_port_unlike_the_import_does_not_serve_it() {
        let imports = imports(&[]);
        let mut web = imports.services["shop/web"].clone();
        // Named as a real slice's port is, after its Service port.
        for b in &mut web.backends {
            b.endpoint_ports[0].name = Some("http".into());
        }
        let own = |port: u16| vec![ServicePort::new(Some("http".into()), Protocol::Tcp, port)];
        let served = |cluster: &str, ports: &ServicePorts| {
            let b = web
                .backends
                .iter()
                .find(|b| b.cluster == id(cluster))
                .unwrap();
            slices_of(&web, b, ports.get(&(id(cluster), web.key())))[0]
                .ports
                .clone()
                .unwrap()
                .len()
        };
        // The import's http is 80 (the oldest export's); b defines it as 81.
        assert_eq!(web.ports[0].port, 80);
        let ports = ServicePorts::from([
            ((id("a"), web.key()), own(80)),
            ((id("b"), web.key()), own(81)),
        ]);
        assert_eq!(served("a", &ports), 1);
        assert_eq!(served("b", &ports), 0);
        // Without a cluster's own ports, nothing is left off.
        assert_eq!(served("b", &ServicePorts::new()), 1);
    }

    #[test]
    fn long_names_are_shortened_stably() {
        let long = "a".repeat(60);
        let n = slice_name(&long, "cluster-x", false, 0);
        assert!(n.len() <= 63, "{n}");
        assert_eq!(n, slice_name(&long, "cluster-x", false, 0));
        assert_ne!(n, slice_name(&long, "cluster-y", false, 0));
        assert_eq!(slice_name("web", "b", true, 0), "imported-web.b.v6");
        let d = derived_service_name(&long);
        assert!(d.len() <= 63 && d.starts_with("derived-"), "{d}");
        assert_ne!(d, derived_service_name(&"a".repeat(61)));
        assert_eq!(derived_service_name("web"), "derived-web");
    }

    #[test]
    fn transition_times_change_only_with_the_status() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).unwrap());
        let mut previous = vec![condition("Ready", false, "Pending", "m".into())];
        stamp_conditions(&mut previous, &[], t0.clone());
        let mut same = vec![condition("Ready", false, "Pending", "other".into())];
        stamp_conditions(&mut same, &previous, t1.clone());
        assert_eq!(same[0].last_transition_time, t0);
        let mut changed = vec![condition("Ready", true, "Ready", "m".into())];
        stamp_conditions(&mut changed, &previous, t1.clone());
        assert_eq!(changed[0].last_transition_time, t1);
    }
}
