//! The Kubernetes side of the MCS API conformance suite (kubernetes-sigs/mcs-api
//! `conformance/`, run against `multicluster.x-k8s.io/v1beta1`): one test per upstream spec,
//! named after it, asserting what the spec asserts. docs/mcs-conformance.md maps each spec to
//! its test.
//!
//! Two clusters, `c1` and `c2`, are each given as the Kubernetes objects their API servers
//! would return (the suite's `hello` Service, its ServiceExport and EndpointSlices). Each side
//! is built as the controller builds it: the objects through [`objects::source_state`], the
//! clusterset's imports by `Imports::build` with the other cluster as the remote, then the
//! objects the import writer wants ([`desired_objects`]) and the ServiceExports' conditions
//! ([`export_conditions`]). Where a spec expects an object to be deleted, the import writer
//! prunes against a scripted API server holding what it wrote before. Where the API server
//! would allocate something (the derived Service's ClusterIPs), the test does what it would.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::client::Body;
use serde_json::{Value, json};
use trellis_controller::crd::{ServiceImport, ServiceImportType};
use trellis_controller::import_writer::{
    DesiredObjects, ImportWriter, desired_objects, service_ports,
};
use trellis_controller::kube_source::export_conditions;
use trellis_controller::objects::{export_statuses, parse_objects, source_state};
use trellis_core::cluster::{ClusterId, ClusterState, ServiceKey};
use trellis_core::imports::Imports;

const NS: &str = "mcs-conformance-1";
const HELLO: &str = "hello";
/// What kube-proxy's EndpointSlice controller calls itself; MCS slices must not.
const K8S_SLICE_MANAGER: &str = "endpointslice-controller.k8s.io";

fn hello() -> ServiceKey {
    ServiceKey::new(NS, HELLO)
}

/// The suite's `newHelloService()` as an API server returns it once created on a dual-stack
/// cluster: ports tcp/42 and udp/42, ClientIP affinity for 10 s, PreferDualStack, its own
/// labels and annotations (which must not reach the import).
fn hello_service(cluster_ips: &[&str]) -> Value {
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": HELLO, "namespace": NS, "uid": format!("svc-{}", cluster_ips[0]),
            "resourceVersion": "100", "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {"dummy-svc": "dummy"}, "annotations": {"dummy-svc": "dummy"}},
        "spec": {
            "selector": {"app": HELLO},
            "ports": [
                {"name": "tcp", "port": 42, "protocol": "TCP", "targetPort": 42},
                {"name": "udp", "port": 42, "protocol": "UDP", "targetPort": 42},
            ],
            "type": "ClusterIP",
            "clusterIP": cluster_ips[0], "clusterIPs": cluster_ips,
            "ipFamilies": families, "ipFamilyPolicy": "PreferDualStack",
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}},
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    })
}

/// The suite's `newHelloServiceExport()`, created at `created`.
fn hello_export(created: &str) -> Value {
    json!({
        "apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
        "metadata": {"name": HELLO, "namespace": NS, "uid": format!("se-{created}"),
            "resourceVersion": "101", "creationTimestamp": created,
            "labels": {"dummy-svcexport": "dummy"}, "annotations": {"dummy-svcexport": "dummy"}},
    })
}

/// The EndpointSlices Kubernetes keeps for `hello`: one per address family of `pods`.
fn hello_slices(pods: &[&str]) -> Vec<Value> {
    ["IPv4", "IPv6"]
        .into_iter()
        .filter_map(|family| {
            let endpoints: Vec<Value> = pods
                .iter()
                .filter(|ip| ip.contains(':') == (family == "IPv6"))
                .map(|ip| {
                    json!({"addresses": [ip], "conditions": {"ready": true, "serving": true,
                        "terminating": false}, "nodeName": "worker"})
                })
                .collect();
            (!endpoints.is_empty()).then(|| {
                json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("hello-{}", family.to_lowercase()),
                        "namespace": NS, "resourceVersion": "102",
                        "labels": {"kubernetes.io/service-name": HELLO,
                            "endpointslice.kubernetes.io/managed-by": K8S_SLICE_MANAGER}},
                    "addressType": family,
                    "endpoints": endpoints,
                    "ports": [{"name": "tcp", "port": 42, "protocol": "TCP"},
                        {"name": "udp", "port": 42, "protocol": "UDP"}],
                })
            })
        })
        .collect()
}

/// One cluster: its ID and the objects its API server holds.
#[derive(Clone)]
struct Cluster {
    id: ClusterId,
    objects: Vec<Value>,
}

impl Cluster {
    fn new(id: &str) -> Self {
        Cluster {
            id: id.parse().unwrap(),
            objects: Vec::new(),
        }
    }

    /// The cluster with the suite's hello Service (dual-stack) and its endpoints deployed.
    fn with_hello(mut self, cluster_ips: &[&str], pods: &[&str]) -> Self {
        self.objects.push(hello_service(cluster_ips));
        self.objects.extend(hello_slices(pods));
        self
    }

    fn with(mut self, object: Value) -> Self {
        self.objects.push(object);
        self
    }

    /// Changes the (first) object of `kind` named `hello`.
    fn change(mut self, kind: &str, edit: impl Fn(&mut Value)) -> Self {
        let obj = self
            .objects
            .iter_mut()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == HELLO)
            .unwrap_or_else(|| panic!("no {kind} hello"));
        edit(obj);
        self
    }

    fn export(self, created: &str) -> Self {
        self.with(hello_export(created))
    }

    fn unexport(mut self) -> Self {
        self.objects.retain(|o| o["kind"] != "ServiceExport");
        self
    }

    fn yaml(&self) -> String {
        self.objects.iter().map(|o| format!("---\n{o}\n")).collect()
    }

    fn state(&self) -> ClusterState {
        let source = source_state(&parse_objects(&self.yaml()).unwrap());
        source.compose(
            &self.id,
            self.id.as_str(),
            &["10.96.0.0/16".parse().unwrap()],
            &BTreeMap::new(),
            &Default::default(),
            None,
        )
    }

    /// What this cluster's controller makes of its objects with `remote` in the clusterset.
    fn sync(&self, remote: &Cluster) -> Seen {
        let objects = parse_objects(&self.yaml()).unwrap();
        let source = source_state(&objects);
        let local = self.state();
        let remote = remote.state();
        let imports = Imports::build(&self.id, [&local, &remote], &source.clusterset_ips, 1);
        let conditions = export_statuses(&objects)
            .iter()
            .map(|(key, status)| {
                (
                    key.clone(),
                    export_conditions(&self.id, key, status, Some(&imports)),
                )
            })
            .collect();
        Seen {
            desired: desired_objects(&imports, &service_ports([&local, &remote])),
            conditions,
        }
    }

    /// Does what the API server does with the derived Service the controller applies: keeps
    /// it, with the ClusterIPs it allocates.
    fn allocate(mut self, seen: &Seen, cluster_ips: &[&str]) -> Self {
        let (_, derived) = seen
            .desired
            .services
            .iter()
            .next()
            .expect("a derived Service");
        let mut svc = serde_json::to_value(derived).unwrap();
        svc["metadata"]["uid"] = json!("derived-uid");
        svc["spec"]["clusterIP"] = json!(cluster_ips[0]);
        svc["spec"]["clusterIPs"] = json!(cluster_ips);
        svc["spec"]["ipFamilies"] = json!(
            cluster_ips
                .iter()
                .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
                .collect::<Vec<_>>()
        );
        self.objects.push(svc);
        self
    }
}

/// What one cluster's controller wants and reports.
struct Seen {
    desired: DesiredObjects,
    conditions: BTreeMap<ServiceKey, Vec<Condition>>,
}

impl Seen {
    fn import(&self) -> Option<&ServiceImport> {
        self.desired.imports.get(&(NS.to_owned(), HELLO.to_owned()))
    }

    fn expect_import(&self, cluster: &str) -> &ServiceImport {
        self.import()
            .unwrap_or_else(|| panic!("ServiceImport was not found on cluster {cluster:?}"))
    }

    fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions
            .get(&hello())?
            .iter()
            .find(|c| c.type_ == type_)
    }

    fn condition_status(&self, type_: &str) -> Option<&str> {
        self.condition(type_).map(|c| c.status.as_str())
    }

    /// The MCS EndpointSlices as the suite finds them: both MCS labels and some endpoints.
    fn mcs_slices(&self) -> Vec<&EndpointSlice> {
        self.desired
            .slices
            .values()
            .filter(|s| {
                let labels = s.metadata.labels.clone().unwrap_or_default();
                labels.contains_key("multicluster.kubernetes.io/service-name")
                    && labels.contains_key("multicluster.kubernetes.io/source-cluster")
                    && s.endpoints.as_ref().is_some_and(|e| !e.is_empty())
            })
            .collect()
    }
}

/// The two clusters, c1 exporting hello first (the suite's `newTestDriver`: the first
/// cluster is the "remote" one that deploys and exports).
fn c1_exporting() -> Cluster {
    Cluster::new("c1")
        .with_hello(&["10.96.0.42", "fd00:96::42"], &["10.1.0.5", "fd00:1::5"])
        .export("2026-12-01T10:00:01Z")
}

fn c2() -> Cluster {
    Cluster::new("c2")
}

/// The suite's `newTwoClusterTestDriver`: c2 deploys `hello` too and exports it 1.1 s
/// later (creation times have whole seconds).
fn c2_exporting() -> Cluster {
    c2().with_hello(&["10.97.0.42", "fd00:97::42"], &["10.2.0.5", "fd00:2::5"])
        .export("2026-12-01T10:00:03Z")
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// c1 unexports the service: its ServiceImport is gone from what both clusters want, and the
/// writer's prune deletes it in both.
async fn assert_import_deleted_on_unexport(c1: Cluster, c2: &Cluster, on_c1: &Seen, on_c2: &Seen) {
    let c1 = c1.unexport();
    for (cluster, before, after) in [("c1", on_c1, c1.sync(c2)), ("c2", on_c2, c2.sync(&c1))] {
        assert!(after.import().is_none(), "{cluster}");
        assert!(
            pruned(&before.desired, &after.desired)
                .await
                .contains(&HELLO_IMPORT_PATH.to_owned()),
            "the ServiceImport still exists on cluster {cluster:?} after unexporting the service"
        );
    }
}

/// The paths the import writer deletes when it prunes towards `desired` a cluster that holds
/// what it wrote for `before` (a scripted API server; every call checked against the chart).
async fn pruned(before: &DesiredObjects, desired: &DesiredObjects) -> Vec<String> {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let calls = common::Calls::default();
    let deleted = Arc::new(Mutex::new(Vec::new()));
    let listed = |items: Vec<Value>, kind: &str, api_version: &str| {
        let items: Vec<Value> = items
            .into_iter()
            .map(|mut o| {
                o["metadata"]["resourceVersion"] = json!("7");
                o
            })
            .collect();
        json!({"apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": "9"}, "items": items})
    };
    let imports = listed(
        before
            .imports
            .values()
            .map(|o| serde_json::to_value(o).unwrap())
            .collect(),
        "ServiceImport",
        "multicluster.x-k8s.io/v1beta1",
    );
    let services = listed(
        before
            .services
            .values()
            .map(|o| serde_json::to_value(o).unwrap())
            .collect(),
        "Service",
        "v1",
    );
    let slices = listed(
        before
            .slices
            .values()
            .map(|o| serde_json::to_value(o).unwrap())
            .collect(),
        "EndpointSlice",
        "discovery.k8s.io/v1",
    );
    let server = {
        let (calls, deleted) = (calls.clone(), deleted.clone());
        tokio::spawn(async move {
            let mut handle: Handle = handle;
            while let Some((req, send)) = handle.next_request().await {
                calls.record(&req);
                let path = req.uri().path().to_owned();
                let body = match (req.method().clone(), path.as_str()) {
                    (Method::GET, "/apis/multicluster.x-k8s.io/v1beta1/serviceimports") => {
                        imports.clone()
                    }
                    (Method::GET, "/api/v1/services") => services.clone(),
                    (Method::GET, "/apis/discovery.k8s.io/v1/endpointslices") => slices.clone(),
                    (Method::DELETE, _) => {
                        deleted.lock().unwrap().push(path.clone());
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})
                    }
                    (method, path) => panic!("unexpected {method} {path}"),
                };
                send.send_response(
                    Response::builder()
                        .status(200)
                        .body(Body::from(body.to_string().into_bytes()))
                        .unwrap(),
                );
            }
        })
    };
    let mut writer = ImportWriter::new(client);
    let (_, errors) = tokio::time::timeout(Duration::from_secs(10), writer.prune(desired))
        .await
        .expect("the prune to finish");
    assert!(errors.is_empty(), "{errors:?}");
    server.abort();
    calls.assert_allowed_by_the_chart();
    let mut deleted = deleted.lock().unwrap().clone();
    deleted.sort();
    deleted
}

const HELLO_IMPORT_PATH: &str =
    "/apis/multicluster.x-k8s.io/v1beta1/namespaces/mcs-conformance-1/serviceimports/hello";

fn ports_of(si: &ServiceImport) -> Vec<(String, String, i32, Option<String>)> {
    let mut ports: Vec<_> = si
        .spec
        .ports
        .iter()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.protocol.clone().unwrap_or_default(),
                p.port,
                p.app_protocol.clone(),
            )
        })
        .collect();
    ports.sort_by_key(|p| p.0.to_lowercase());
    ports
}

fn port(name: &str, protocol: &str, port: i32) -> (String, String, i32, Option<String>) {
    (name.to_owned(), protocol.to_owned(), port, None)
}

// ---- service_import.go: testGeneralServiceImport ----

/// "A ServiceImport should only exist as long as there's at least one exporting cluster"
/// (Required).
#[tokio::test]
async fn a_service_import_exists_as_long_as_one_cluster_exports() {
    let (c1, c2) = (c1_exporting(), c2());
    let seen = c1.sync(&c2);
    seen.expect_import("c1");
    // c2 exports too: still there.
    let c2 = c2_exporting();
    let both = c1.sync(&c2);
    both.expect_import("c1");
    // c1 unexports while c2 still exports: still there (and nothing pruned).
    let c1 = c1.unexport();
    let after_c1 = c1.sync(&c2);
    after_c1.expect_import("c1");
    assert!(
        !pruned(&both.desired, &after_c1.desired)
            .await
            .contains(&HELLO_IMPORT_PATH.to_owned()),
        "the ServiceImport was deleted while c2 still exports"
    );
    // c2 unexports: gone.
    let c2 = c2.unexport();
    let none = c1.sync(&c2);
    assert!(none.import().is_none());
    assert!(
        pruned(&after_c1.desired, &none.desired)
            .await
            .contains(&HELLO_IMPORT_PATH.to_owned()),
        "the ServiceImport still exists after unexporting the service on all clusters"
    );
}

/// "Only labels and annotations specified as exported in the ServiceExport should be
/// propagated to the ServiceImport" (Optional, ExportedLabels).
#[test]
fn only_exported_labels_and_annotations_reach_the_service_import() {
    let c1 = c1_exporting().change("ServiceExport", |se| {
        se["spec"] = json!({"exportedAnnotations": {"dummy-annotation": "true"},
            "exportedLabels": {"dummy-label": "true"}});
    });
    for seen in [c1.sync(&c2()), c2().sync(&c1)] {
        let si = seen.expect_import("either");
        let labels = si.metadata.labels.clone().unwrap_or_default();
        let annotations = si.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(labels.get("dummy-label").map(String::as_str), Some("true"));
        assert_eq!(
            annotations.get("dummy-annotation").map(String::as_str),
            Some("true")
        );
        // Neither the Service's nor the ServiceExport's own metadata.
        for key in ["dummy-svc", "dummy-svcexport"] {
            assert!(!labels.contains_key(key), "{labels:?}");
            assert!(!annotations.contains_key(key), "{annotations:?}");
        }
    }
}

/// "A service exported on two clusters with conflicting annotations and labels should apply
/// the conflict resolution policy and report a Conflict condition on each ServiceExport"
/// (Optional, ExportedLabels).
#[test]
fn conflicting_exported_labels_resolve_to_the_oldest_and_conflict_on_each_export() {
    let c1 = c1_exporting().change("ServiceExport", |se| {
        se["spec"] = json!({"exportedAnnotations": {"dummy-annotation": "true"},
            "exportedLabels": {"dummy-label": "true"}});
    });
    let c2 = c2_exporting().change("ServiceExport", |se| {
        se["spec"] = json!({"exportedAnnotations": {"dummy-annotation2": "true"},
            "exportedLabels": {"dummy-label2": "true"}});
    });
    let (on_c1, on_c2) = (c1.sync(&c2), c2.sync(&c1));
    for seen in [&on_c1, &on_c2] {
        assert_eq!(seen.condition_status("Conflict"), Some("True"));
        let reason = &seen.condition("Conflict").unwrap().reason;
        assert!(
            reason.contains("LabelsConflict") && reason.contains("AnnotationsConflict"),
            "{reason}"
        );
    }
    let si = on_c1.expect_import("c1");
    let labels = si.metadata.labels.clone().unwrap_or_default();
    let annotations = si.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(labels.get("dummy-label").map(String::as_str), Some("true"));
    assert!(!labels.contains_key("dummy-label2"));
    assert_eq!(
        annotations.get("dummy-annotation").map(String::as_str),
        Some("true")
    );
    assert!(!annotations.contains_key("dummy-annotation2"));
}

// ---- service_import.go: testClusterIPServiceImport ----

/// "Exporting a ClusterIP service should create a ServiceImport of type ClusterSetIP in the
/// service's namespace in each cluster. Unexporting should delete the ServiceImport"
/// (Required).
#[tokio::test]
async fn a_cluster_ip_service_is_imported_as_cluster_set_ip_in_each_cluster_until_unexported() {
    let (c1, c2) = (c1_exporting(), c2());
    let (on_c1, on_c2) = (c1.sync(&c2), c2.sync(&c1));
    assert_eq!(on_c1.condition_status("Valid"), Some("True"));
    for (cluster, seen) in [("c1", &on_c1), ("c2", &on_c2)] {
        let si = seen.expect_import(cluster);
        assert_eq!(si.spec.type_, ServiceImportType::ClusterSetIP, "{cluster}");
        assert_eq!(si.metadata.namespace.as_deref(), Some(NS));
    }
    assert_import_deleted_on_unexport(c1, &c2, &on_c1, &on_c2).await;
}

/// "The SessionAffinity for a ClusterSetIP ServiceImport should match the exported
/// service's SessionAffinity" (Required), with its SessionAffinityConfig.
#[test]
fn session_affinity_and_its_config_are_the_exported_services() {
    let c1 = c1_exporting();
    for seen in [c1.sync(&c2()), c2().sync(&c1)] {
        let si = seen.expect_import("either");
        assert_eq!(si.spec.session_affinity.as_deref(), Some("ClientIP"));
        let timeout = si
            .spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        assert_eq!(timeout, Some(10));
    }
}

/// "The InternalTrafficPolicy for a ClusterSetIP ServiceImport should match the exported
/// service's InternalTrafficPolicy" (Required).
#[test]
fn internal_traffic_policy_is_the_exported_services() {
    for policy in ["Cluster", "Local"] {
        let c1 = c1_exporting().change("Service", |s| {
            s["spec"]["internalTrafficPolicy"] = json!(policy)
        });
        for seen in [c1.sync(&c2()), c2().sync(&c1)] {
            let si = seen.expect_import("either");
            assert_eq!(si.spec.internal_traffic_policy.as_deref(), Some(policy));
        }
    }
}

/// "The TrafficDistribution for a ClusterSetIP ServiceImport should match the exported
/// service's TrafficDistribution" (Required).
#[test]
fn traffic_distribution_is_the_exported_services() {
    let c1 = c1_exporting().change("Service", |s| {
        s["spec"]["trafficDistribution"] = json!("PreferClose")
    });
    for seen in [c1.sync(&c2()), c2().sync(&c1)] {
        let si = seen.expect_import("either");
        assert_eq!(si.spec.traffic_distribution.as_deref(), Some("PreferClose"));
    }
    // Unset stays unset.
    let si_unset = c1_exporting().sync(&c2());
    assert_eq!(si_unset.expect_import("c1").spec.traffic_distribution, None);
}

/// "An IP should be allocated for a ClusterSetIP ServiceImport for each IP family"
/// (Required): the derived Service's ClusterIPs, one per family, in `ipFamilies`' order.
#[test]
fn a_clusterset_ip_is_allocated_for_each_ip_family() {
    let c1 = c1_exporting();
    let c2 = c2();
    let first = c2.sync(&c1);
    // Until the derived Service has its ClusterIPs, the import waits for them.
    let pending = first.expect_import("c2");
    assert!(pending.spec.ips.is_empty());
    let ready = &pending.status.as_ref().unwrap().conditions[0];
    assert_eq!(
        (ready.type_.as_str(), ready.reason.as_str()),
        ("Ready", "Pending")
    );
    let derived = first.desired.services.values().next().unwrap();
    let spec = derived.spec.as_ref().unwrap();
    // A VIP for each family this cluster has: its own, not the exports' (which another
    // cluster decided, and a primary family the API server never lets change).
    assert_eq!(spec.ip_families, None);
    assert_eq!(spec.ip_family_policy.as_deref(), Some("PreferDualStack"));
    // The API server allocates them; the controller reads them back.
    let c2 = c2.allocate(&first, &["10.97.100.1", "fd00:97::100:1"]);
    let si = c2.sync(&c1);
    let si = si.expect_import("c2");
    assert!(!si.spec.ips.is_empty());
    assert_eq!(
        si.spec.ips.len(),
        si.spec.ip_families.len(),
        "The ServiceImport IPs field must have the same number of IPs as ServiceImport IPFamilies"
    );
    for (ip, family) in si.spec.ips.iter().zip(&si.spec.ip_families) {
        let ip: std::net::IpAddr = ip.parse().expect("a valid IP");
        let of = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        assert_eq!(of, family, "{ip}");
    }
    assert_eq!(si.spec.ips, ["10.97.100.1", "fd00:97::100:1"]);
    assert_eq!(si.status.as_ref().unwrap().conditions[0].status, "True");
    // The VIP is this cluster's own, not the exporting cluster's ClusterIP.
    assert!(!si.spec.ips.contains(&"10.96.0.42".to_string()));
}

/// "The ports for a ClusterSetIP ServiceImport should match those of the exported service"
/// (Required).
#[test]
fn the_ports_are_the_exported_services() {
    let c1 = c1_exporting().change("Service", |s| {
        s["spec"]["ports"][0]["appProtocol"] = json!("kubernetes.io/h2c")
    });
    for seen in [c1.sync(&c2()), c2().sync(&c1)] {
        let si = seen.expect_import("either");
        assert_eq!(
            ports_of(si),
            [
                (
                    "tcp".to_owned(),
                    "TCP".to_owned(),
                    42,
                    Some("kubernetes.io/h2c".to_owned())
                ),
                port("udp", "UDP", 42),
            ]
        );
    }
}

/// "A ClusterIP service exported on two clusters should expose the union of the constituent
/// service ports and raise a conflict" (Required).
#[test]
fn two_exports_expose_the_union_of_their_ports_and_raise_a_conflict() {
    let c1 = c1_exporting();
    let c2 = c2_exporting().change("Service", |s| {
        s["spec"]["ports"] = json!([
            {"name": "tcp", "port": 42, "protocol": "TCP", "targetPort": 42},
            {"name": "stcp", "port": 142, "protocol": "SCTP", "targetPort": 142},
        ])
    });
    let (on_c1, on_c2) = (c1.sync(&c2), c2.sync(&c1));
    for seen in [&on_c1, &on_c2] {
        assert_eq!(seen.condition_status("Conflict"), Some("True"));
    }
    assert_eq!(
        ports_of(on_c1.expect_import("c1")),
        [
            port("stcp", "SCTP", 142),
            port("tcp", "TCP", 42),
            port("udp", "UDP", 42)
        ]
    );
    assert_eq!(
        ports_of(on_c2.expect_import("c2")),
        ports_of(on_c1.expect_import("c1"))
    );
}

/// "A ClusterIP service exported on two clusters with conflicting ports should apply the
/// conflict resolution policy and report a Conflict condition on each ServiceExport"
/// (Required): the oldest export's port wins.
#[test]
fn conflicting_ports_resolve_to_the_oldest_export_and_conflict_on_each_export() {
    let c1 = c1_exporting();
    let c2 = c2_exporting().change("Service", |s| {
        s["spec"]["ports"] =
            json!([{"name": "tcp", "port": 43, "protocol": "TCP", "targetPort": 42}])
    });
    let (on_c1, on_c2) = (c1.sync(&c2), c2.sync(&c1));
    for seen in [&on_c1, &on_c2] {
        assert_eq!(seen.condition_status("Conflict"), Some("True"));
        let conflict = seen.condition("Conflict").unwrap();
        assert_eq!(conflict.reason, "PortConflict");
        assert!(
            conflict.message.contains("cluster c1"),
            "{}",
            conflict.message
        );
    }
    for seen in [&on_c1, &on_c2] {
        assert_eq!(
            ports_of(seen.expect_import("either")),
            [port("tcp", "TCP", 42), port("udp", "UDP", 42)],
            "The service ports were not resolved correctly"
        );
    }
}

// ---- service_import.go: testHeadlessServiceImport ----

fn c1_exporting_headless() -> Cluster {
    Cluster::new("c1")
        .with_hello(&["None"], &["10.1.0.5", "fd00:1::5"])
        .change("Service", |s| {
            s["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
        })
        .export("2026-12-01T10:00:01Z")
}

/// "Exporting a headless service should create a ServiceImport of type Headless in the
/// service's namespace in each cluster. Unexporting should delete the ServiceImport"
/// (Required).
#[tokio::test]
async fn a_headless_service_is_imported_as_headless_in_each_cluster_until_unexported() {
    let (c1, c2) = (c1_exporting_headless(), c2());
    let (on_c1, on_c2) = (c1.sync(&c2), c2.sync(&c1));
    for (cluster, seen) in [("c1", &on_c1), ("c2", &on_c2)] {
        let si = seen.expect_import(cluster);
        assert_eq!(si.spec.type_, ServiceImportType::Headless, "{cluster}");
        assert!(seen.desired.services.is_empty(), "no derived Service");
    }
    assert_import_deleted_on_unexport(c1, &c2, &on_c1, &on_c2).await;
}

/// "No clusterset IP should be allocated for a Headless ServiceImport" (Required).
#[test]
fn no_clusterset_ip_is_allocated_for_a_headless_import() {
    let c1 = c1_exporting_headless();
    // Even a clusterset IP the cluster holds for the name (a stale derived Service) is not
    // used for a headless import.
    let c2 = c2().allocate(&c1_exporting().sync(&c2()), &["10.97.100.1"]);
    for seen in [c1.sync(&c2), c2.sync(&c1)] {
        let si = seen.expect_import("either");
        assert!(si.spec.ips.is_empty(), "{:?}", si.spec.ips);
        assert!(seen.desired.services.is_empty());
    }
}

// ---- service_import.go: testExternalNameService ----

/// "Exporting an ExternalName service should set ServiceExport Valid condition to False"
/// (Required), and no ServiceImport exists.
#[test]
fn an_external_name_service_export_is_invalid_and_not_imported() {
    let c1 = Cluster::new("c1")
        .with(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": HELLO, "namespace": NS, "uid": "x", "resourceVersion": "1"},
            "spec": {"type": "ExternalName", "externalName": "example.com",
                "sessionAffinity": "None"},
        }))
        .export("2026-12-01T10:00:01Z");
    let on_c1 = c1.sync(&c2());
    let valid = on_c1.condition("Valid").unwrap();
    assert_eq!(valid.status, "False");
    assert_eq!(valid.reason, "InvalidServiceType");
    assert_eq!(on_c1.condition_status("Ready"), Some("False"));
    assert!(on_c1.import().is_none());
    assert!(c2().sync(&c1).import().is_none());
}

// ---- service_import.go: testServiceTypeConflict ----

/// "A service exported on two clusters with conflicting headlessness should apply the
/// conflict resolution policy and report a Conflict condition on the ServiceExport"
/// (Required): c1's (older) ClusterIP export wins.
#[test]
fn conflicting_headlessness_resolves_to_the_oldest_and_conflicts_on_each_export() {
    let c1 = c1_exporting();
    let c2 = c2_exporting().change("Service", |s| {
        s["spec"]["clusterIP"] = json!("None");
        s["spec"]["clusterIPs"] = json!(["None"]);
    });
    let (on_c1, on_c2) = (c1.sync(&c2), c2.sync(&c1));
    for (cluster, seen) in [("c1", &on_c1), ("c2", &on_c2)] {
        assert_eq!(seen.condition_status("Conflict"), Some("True"), "{cluster}");
        assert!(
            seen.condition("Conflict")
                .unwrap()
                .reason
                .contains("TypeConflict")
        );
        assert_eq!(
            seen.expect_import(cluster).spec.type_,
            ServiceImportType::ClusterSetIP,
            "ServiceImport on cluster {cluster:?}"
        );
    }
}

// ---- endpoint_slice.go ----

/// "Exporting a service should create an MCS EndpointSlice in the service's namespace in
/// each cluster with the required MCS labels. Unexporting should delete the EndpointSlice."
/// (Optional, EndpointSlice).
#[tokio::test]
async fn mcs_endpoint_slices_are_created_in_each_cluster_and_deleted_on_unexport() {
    let c1 = c1_exporting();
    let first = c2().sync(&c1);
    let c2 = c2().allocate(&first, &["10.97.100.1", "fd00:97::100:1"]);
    let seen_by_c1 = c1.sync(&c2);
    let c1 = c1.allocate(&seen_by_c1, &["10.96.100.1", "fd00:96::100:1"]);
    let (on_c1, on_c2) = (c1.sync(&c2), c2.sync(&c1));
    for (cluster, seen) in [("c1", &on_c1), ("c2", &on_c2)] {
        let families = &seen.expect_import(cluster).spec.ip_families;
        assert!(
            !families.is_empty(),
            "ServiceImport on {cluster} has no IP family"
        );
        for family in families {
            let slice = seen
                .mcs_slices()
                .into_iter()
                .find(|s| &s.address_type == family)
                .unwrap_or_else(|| panic!("an {family} MCS EndpointSlice on {cluster}"));
            assert_eq!(slice.metadata.namespace.as_deref(), Some(NS));
            let labels = slice.metadata.labels.as_ref().unwrap();
            assert_eq!(labels["multicluster.kubernetes.io/service-name"], HELLO);
            assert_eq!(labels["multicluster.kubernetes.io/source-cluster"], "c1");
            let managed_by = &labels["endpointslice.kubernetes.io/managed-by"];
            assert_ne!(managed_by, K8S_SLICE_MANAGER);
            // kube-proxy balances the clusterset IP over them: they belong to the derived
            // Service.
            assert_eq!(labels["kubernetes.io/service-name"], "derived-hello");
            let ports: Vec<_> = slice
                .ports
                .iter()
                .flatten()
                .map(|p| (p.name.clone().unwrap_or_default(), p.port))
                .collect();
            assert_eq!(
                ports,
                [("tcp".to_owned(), Some(42)), ("udp".to_owned(), Some(42))]
            );
        }
    }
    // The controller's own slices (and derived Service) are never read back as an export:
    // c1's export keeps exactly its own endpoints.
    let mut c1_with_ours = c1.clone();
    c1_with_ours.objects.extend(
        on_c1
            .desired
            .slices
            .values()
            .map(|s| serde_json::to_value(s).unwrap()),
    );
    let exported = c1_with_ours.state();
    assert_eq!(
        exported.services[&hello()].endpoints,
        c1.state().services[&hello()].endpoints
    );
    assert_eq!(
        exported.services.len(),
        1,
        "the derived Service is not exported"
    );
    assert!(c2.state().services.is_empty());
    let names: Vec<String> = on_c2
        .desired
        .slices
        .keys()
        .map(|(_, n)| n.clone())
        .collect();
    let c1 = c1.unexport();
    for (cluster, before, after) in [("c1", &on_c1, c1.sync(&c2)), ("c2", &on_c2, c2.sync(&c1))] {
        assert!(after.mcs_slices().is_empty(), "{cluster}");
        let deleted = pruned(&before.desired, &after.desired).await;
        for name in &names {
            let path = format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/{name}");
            assert!(
                deleted.contains(&path),
                "the EndpointSlice {name:?} was not deleted on unexport from cluster {cluster:?}: {deleted:?}"
            );
        }
        let derived = format!("/api/v1/namespaces/{NS}/services/derived-hello");
        assert!(deleted.contains(&derived), "{deleted:?}");
    }
}

// ---- connectivity.go ----

/// "Connectivity to a service that is not exported should be inaccessible" (Required): the
/// Kubernetes side writes nothing for it anywhere (no import, no VIP, no endpoints); the lab
/// checks the traffic (docs/mcs-conformance.md).
#[test]
fn a_service_that_is_not_exported_is_not_imported_anywhere() {
    let c1 = c1_exporting().unexport();
    for seen in [c1.sync(&c2()), c2().sync(&c1)] {
        assert_eq!(seen.desired, DesiredObjects::default());
        assert!(seen.conditions.is_empty());
    }
}

/// "Connectivity to a ClusterIP service existing in two clusters but exported from one
/// should only access the exporting cluster" (Optional, Connectivity): c2 runs `hello` too
/// but does not export it, so the VIP's endpoints (its MCS EndpointSlices) are c1's only.
#[test]
fn a_service_in_two_clusters_exported_from_one_has_only_the_exporting_clusters_endpoints() {
    let c1 = c1_exporting();
    let c2 = c2().with_hello(&["10.97.0.42", "fd00:97::42"], &["10.2.0.5", "fd00:2::5"]);
    for seen in [c1.sync(&c2), c2.sync(&c1)] {
        let slices = seen.mcs_slices();
        assert!(!slices.is_empty());
        for slice in slices {
            let labels = slice.metadata.labels.as_ref().unwrap();
            assert_eq!(labels["multicluster.kubernetes.io/source-cluster"], "c1");
            for endpoint in slice.endpoints.iter().flatten() {
                assert!(
                    !endpoint
                        .addresses
                        .iter()
                        .any(|a| a.contains(":2::") || a.starts_with("10.2.")),
                    "{endpoint:?}"
                );
            }
        }
        assert_eq!(
            seen.expect_import("either")
                .status
                .as_ref()
                .unwrap()
                .clusters
                .len(),
            1
        );
    }
}

/// "Connectivity to exported services with different port name on each cluster should route
/// traffic to each port only to the cluster that exposes it" (Optional, Connectivity,
/// StrictPortConflict), on the Kubernetes side: the derived Service has both ports, and each
/// cluster's MCS EndpointSlices carry only the port names its endpoints serve, so kube-proxy
/// sends `tcp` to c1 only and `tcp2` to c2 only.
#[test]
fn each_port_goes_only_to_the_clusters_that_expose_it() {
    let c1 = c1_exporting();
    let mut c2 = c2_exporting().change("Service", |s| {
        s["spec"]["ports"] =
            json!([{"name": "tcp2", "port": 4242, "protocol": "TCP", "targetPort": 42}])
    });
    for obj in c2
        .objects
        .iter_mut()
        .filter(|o| o["kind"] == "EndpointSlice")
    {
        obj["ports"] = json!([{"name": "tcp2", "port": 42, "protocol": "TCP"}]);
    }
    for seen in [c1.sync(&c2), c2.sync(&c1)] {
        let derived = seen.desired.services.values().next().unwrap();
        let mut names: Vec<String> = derived
            .spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone())
            .collect();
        names.sort();
        assert_eq!(names, ["tcp", "tcp2", "udp"]);
        for slice in seen.mcs_slices() {
            let labels = slice.metadata.labels.as_ref().unwrap();
            let mut ports: Vec<String> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.name.clone())
                .collect();
            ports.sort();
            match labels["multicluster.kubernetes.io/source-cluster"].as_str() {
                "c1" => assert_eq!(ports, ["tcp", "udp"]),
                "c2" => assert_eq!(ports, ["tcp2"]),
                other => panic!("a slice from {other}"),
            }
        }
    }
}

/// "Connectivity to exported services with same port name but different port numbers on each
/// cluster should only route traffic to the cluster that exposes the port" (Optional,
/// Connectivity, StrictPortConflict), on the Kubernetes side: c1's older `tcp` is 42, c2's
/// `tcp` is 4242, so the import's `tcp` is 42 and c2's slices leave `tcp` out: kube-proxy
/// sends the VIP's port 42 to c1's endpoints only.
#[test]
fn a_port_defined_differently_by_a_newer_export_goes_only_to_the_oldest() {
    let c1 = c1_exporting();
    let c2 = c2_exporting().change("Service", |s| {
        s["spec"]["ports"] =
            json!([{"name": "tcp", "port": 4242, "protocol": "TCP", "targetPort": 42}])
    });
    for seen in [c1.sync(&c2), c2.sync(&c1)] {
        assert_eq!(
            ports_of(seen.expect_import("either")),
            [port("tcp", "TCP", 42), port("udp", "UDP", 42)]
        );
        let mut by_cluster: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for slice in seen.desired.slices.values() {
            let cluster = slice.metadata.labels.as_ref().unwrap()
                ["multicluster.kubernetes.io/source-cluster"]
                .clone();
            let names = slice.ports.iter().flatten().filter_map(|p| p.name.clone());
            by_cluster.entry(cluster).or_default().extend(names);
        }
        for names in by_cluster.values_mut() {
            names.sort();
            names.dedup();
        }
        assert_eq!(by_cluster["c1"], ["tcp", "udp"]);
        // c2's endpoints serve udp (defined as the import has it), not tcp.
        assert_eq!(by_cluster["c2"], ["udp"]);
    }
}
