//! Writes what the cluster imports into Kubernetes, as KEP-1645 describes: a `ServiceImport`
//! per clusterset service exported by another cluster, and per exporting cluster an
//! `EndpointSlice` labelled `multicluster.kubernetes.io/service-name` and
//! `multicluster.kubernetes.io/source-cluster`. Objects are written with server-side apply
//! (field manager `trellis-controller`), and those it manages but no longer wants are deleted,
//! but only once the grace period after start has passed (peers reconnect and resync first:
//! nothing is deleted on a restart).
//!
//! Which objects are wanted is decided purely by [`desired_objects`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::{
    Endpoint as K8sEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use trellis_core::imports::{ImportedService, Imports};

use crate::Error;
use crate::crd::{
    ClusterStatus, ServiceImport, ServiceImportPort, ServiceImportSpec, ServiceImportStatus,
};
use crate::hub::Hub;
use crate::objects::{LABEL_MCS_SERVICE_NAME, LABEL_SOURCE_CLUSTER};

pub const FIELD_MANAGER: &str = "trellis-controller";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_SLICE_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const SLICE_MANAGER: &str = "trellis-controller.trellis.dev";

/// The objects the cluster should have, keyed by (namespace, name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredObjects {
    pub imports: BTreeMap<(String, String), ServiceImport>,
    pub slices: BTreeMap<(String, String), EndpointSlice>,
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A DNS-label-safe object name: `imported-<svc>-<cluster>[-v6]`, shortened with a hash when
/// longer than 63 characters.
pub fn slice_name(service: &str, cluster: &str, ipv6: bool) -> String {
    let name = format!(
        "imported-{service}-{cluster}{}",
        if ipv6 { "-v6" } else { "" }
    );
    if name.len() <= 63 {
        return name;
    }
    // FNV-1a: stable across runs and platforms.
    let hash = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let mut short: String = name.chars().take(46).collect();
    short = short.trim_end_matches('-').to_owned();
    format!("{short}-{hash:016x}")
}

fn import_of(svc: &ImportedService) -> ServiceImport {
    let mut si = ServiceImport::new(
        &svc.name,
        ServiceImportSpec {
            ips: vec![],
            type_: match svc.kind {
                trellis_core::cluster::ServiceKind::ClusterSetIP => "ClusterSetIP".into(),
                trellis_core::cluster::ServiceKind::Headless => "Headless".into(),
            },
            ports: svc
                .ports
                .iter()
                .map(|p| ServiceImportPort {
                    name: p.name.clone(),
                    protocol: protocol_name(p.protocol).into(),
                    port: i32::from(p.port),
                })
                .collect(),
        },
    );
    si.metadata.namespace = Some(svc.namespace.clone());
    si.metadata.labels = Some(labels(&[(LABEL_MANAGED_BY, FIELD_MANAGER)]));
    si.status = Some(ServiceImportStatus {
        clusters: svc
            .backends
            .iter()
            .map(|b| ClusterStatus {
                cluster: b.cluster.to_string(),
            })
            .collect(),
    });
    si
}

fn protocol_name(p: trellis_core::cluster::Protocol) -> &'static str {
    match p {
        trellis_core::cluster::Protocol::Tcp => "TCP",
        trellis_core::cluster::Protocol::Udp => "UDP",
        trellis_core::cluster::Protocol::Sctp => "SCTP",
    }
}

/// Every ServiceImport and EndpointSlice the imports call for. Services only the local
/// cluster exports are not imported.
pub fn desired_objects(imports: &Imports, remote_endpoint_ports: &PortsOf) -> DesiredObjects {
    let mut out = DesiredObjects::default();
    for svc in imports.services.values() {
        if svc.backends.iter().all(|b| b.local) {
            continue;
        }
        out.imports
            .insert((svc.namespace.clone(), svc.name.clone()), import_of(svc));
        for backend in svc.backends.iter().filter(|b| !b.local) {
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
                            ..Default::default()
                        })
                    })
                    .collect();
                if endpoints.is_empty() && ipv6 {
                    continue;
                }
                let ports = remote_endpoint_ports(&backend.cluster, svc)
                    .into_iter()
                    .map(|p| EndpointPort {
                        name: p.name.clone(),
                        protocol: Some(protocol_name(p.protocol).into()),
                        port: Some(i32::from(p.port)),
                        ..Default::default()
                    })
                    .collect();
                let name = slice_name(&svc.name, backend.cluster.as_str(), ipv6);
                let slice = EndpointSlice {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(svc.namespace.clone()),
                        labels: Some(labels(&[
                            (LABEL_MCS_SERVICE_NAME, &svc.name),
                            (LABEL_SOURCE_CLUSTER, backend.cluster.as_str()),
                            (LABEL_SLICE_MANAGED_BY, SLICE_MANAGER),
                            (LABEL_MANAGED_BY, FIELD_MANAGER),
                        ])),
                        ..Default::default()
                    },
                    address_type: if ipv6 { "IPv6".into() } else { "IPv4".into() },
                    endpoints: Some(endpoints),
                    ports: Some(ports),
                };
                out.slices.insert((svc.namespace.clone(), name), slice);
            }
        }
    }
    out
}

/// Looks up the endpoint (target) ports a remote cluster exports for a service.
pub type PortsOf = dyn Fn(
        &trellis_core::cluster::ClusterId,
        &ImportedService,
    ) -> Vec<trellis_core::cluster::ServicePort>
    + Send
    + Sync;

fn kube_err(operation: &'static str) -> impl Fn(kube::Error) -> Error {
    move |source| Error::Kubernetes { operation, source }
}

/// Applies and prunes the imported objects.
pub struct ImportWriter {
    client: Client,
    applied: DesiredObjects,
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
        }
    }

    /// Server-side applies every object that differs from what this writer last applied. A
    /// failure on one object (its namespace may not exist) does not stop the others; all
    /// failures are returned.
    pub async fn apply(&mut self, desired: &DesiredObjects) -> Vec<Error> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut errors = Vec::new();
        for ((ns, name), obj) in &desired.imports {
            if self.applied.imports.get(&(ns.clone(), name.clone())) == Some(obj) {
                continue;
            }
            let api: Api<ServiceImport> = Api::namespaced(self.client.clone(), ns);
            // The status (which clusters export it) is a subresource: applied separately.
            let applied = match api.patch(name, &pp, &Patch::Apply(obj)).await {
                Ok(_) => api
                    .patch_status(name, &pp, &Patch::Apply(obj))
                    .await
                    .map_err(kube_err("applying a ServiceImport's status")),
                Err(e) => Err(kube_err("applying a ServiceImport")(e)),
            };
            match applied {
                Ok(_) => {
                    self.applied
                        .imports
                        .insert((ns.clone(), name.clone()), obj.clone());
                }
                Err(e) => errors.push(e),
            }
        }
        for ((ns, name), obj) in &desired.slices {
            if self.applied.slices.get(&(ns.clone(), name.clone())) == Some(obj) {
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
        errors
    }

    /// Deletes the managed objects that are not desired; continues past failures and returns
    /// how many were deleted and every failure.
    pub async fn prune(&mut self, desired: &DesiredObjects) -> (usize, Vec<Error>) {
        let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={FIELD_MANAGER}"));
        let mut deleted = 0;
        let mut errors = Vec::new();
        let imports: Api<ServiceImport> = Api::all(self.client.clone());
        match imports.list(&lp).await {
            Ok(list) => {
                for obj in list.items {
                    let (Some(ns), Some(name)) = (obj.metadata.namespace, obj.metadata.name) else {
                        continue;
                    };
                    let key = (ns.clone(), name.clone());
                    if desired.imports.contains_key(&key) {
                        continue;
                    }
                    let api: Api<ServiceImport> = Api::namespaced(self.client.clone(), &ns);
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {
                            deleted += 1;
                            self.applied.imports.remove(&key);
                        }
                        Err(e) => errors.push(kube_err("deleting a ServiceImport")(e)),
                    }
                }
            }
            Err(e) => errors.push(kube_err("listing ServiceImports")(e)),
        }
        let slices: Api<EndpointSlice> = Api::all(self.client.clone());
        match slices.list(&lp).await {
            Ok(list) => {
                for obj in list.items {
                    let (Some(ns), Some(name)) = (obj.metadata.namespace, obj.metadata.name) else {
                        continue;
                    };
                    let key = (ns.clone(), name.clone());
                    if desired.slices.contains_key(&key) {
                        continue;
                    }
                    let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &ns);
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {
                            deleted += 1;
                            self.applied.slices.remove(&key);
                        }
                        Err(e) => errors.push(kube_err("deleting an EndpointSlice")(e)),
                    }
                }
            }
            Err(e) => errors.push(kube_err("listing EndpointSlices")(e)),
        }
        (deleted, errors)
    }
}

/// Keeps the cluster's imported objects in line with the mesh view; prunes only after
/// `grace` (a lease, so peers have reconnected) has passed since start.
pub async fn run(client: Client, hub: Hub, grace: Duration) {
    let started = tokio::time::Instant::now();
    let mut writer = ImportWriter::new(client);
    let mut rx = hub.subscribe_view();
    let mut pruned_once = false;
    loop {
        let view = rx.borrow_and_update().clone();
        if let Some(view) = view {
            let remotes: BTreeMap<_, _> = view
                .remotes
                .iter()
                .map(|r| (r.id.clone(), r.clone()))
                .collect();
            let ports = move |cluster: &trellis_core::cluster::ClusterId, svc: &ImportedService| {
                remotes
                    .get(cluster)
                    .and_then(|r| r.services.get(&svc.key()))
                    .map(|s| s.endpoint_ports.clone())
                    .unwrap_or_default()
            };
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
        }
        // Coalesce bursts.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The set of namespaces the desired objects live in (for logs and tests).
pub fn namespaces(d: &DesiredObjects) -> BTreeSet<String> {
    d.imports
        .keys()
        .chain(d.slices.keys())
        .map(|(ns, _)| ns.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::cluster::ServicePort;
    use trellis_core::cluster::fixture::{clusters_a_b, export, id};

    fn imports() -> Imports {
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
        Imports::build(&id("a"), [&a, &b], &Default::default(), 1)
    }

    fn ports(_: &trellis_core::cluster::ClusterId, _: &ImportedService) -> Vec<ServicePort> {
        vec![ServicePort {
            name: Some("http".into()),
            protocol: trellis_core::cluster::Protocol::Tcp,
            port: 8080,
            app_protocol: None,
        }]
    }

    #[test]
    fn imports_become_service_imports_and_labelled_slices() {
        let d = desired_objects(&imports(), &ports);
        assert_eq!(d.imports.len(), 1, "local-only services are not imported");
        let si = &d.imports[&("shop".into(), "web".into())];
        assert_eq!(si.spec.type_, "ClusterSetIP");
        assert_eq!(si.spec.ports[0].port, 80);
        let clusters: Vec<&str> = si
            .status
            .as_ref()
            .unwrap()
            .clusters
            .iter()
            .map(|c| c.cluster.as_str())
            .collect();
        assert_eq!(clusters, vec!["a", "b"]);
        assert_eq!(d.slices.len(), 2, "one IPv4 and one IPv6 slice from b");
        let v4 = &d.slices[&("shop".into(), "imported-web-b".into())];
        let l = v4.metadata.labels.as_ref().unwrap();
        assert_eq!(l[LABEL_SOURCE_CLUSTER], "b");
        assert_eq!(l[LABEL_MCS_SERVICE_NAME], "web");
        assert_eq!(v4.address_type, "IPv4");
        assert_eq!(
            v4.endpoints.as_ref().unwrap()[0].addresses,
            vec!["10.2.0.5"]
        );
        assert_eq!(v4.ports.as_ref().unwrap()[0].port, Some(8080));
        assert!(
            d.slices
                .contains_key(&("shop".into(), "imported-web-b-v6".into()))
        );
        assert_eq!(namespaces(&d), BTreeSet::from(["shop".to_string()]));
        // Serialised for apply, the objects carry their apiVersion and kind.
        let json = serde_json::to_value(si).unwrap();
        assert_eq!(json["apiVersion"], "multicluster.x-k8s.io/v1alpha1");
        assert_eq!(json["kind"], "ServiceImport");
        let json = serde_json::to_value(v4).unwrap();
        assert_eq!(json["kind"], "EndpointSlice");
    }

    #[test]
    fn long_names_are_shortened_stably() {
        let long = "a".repeat(60);
        let n = slice_name(&long, "cluster-x", false);
        assert!(n.len() <= 63, "{n}");
        assert_eq!(n, slice_name(&long, "cluster-x", false));
        assert_ne!(n, slice_name(&long, "cluster-y", false));
        assert_eq!(slice_name("web", "b", true), "imported-web-b-v6");
    }
}
