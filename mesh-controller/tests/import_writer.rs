//! The import writer against a scripted API server: server-side apply of ServiceImports,
//! derived Services (owned by their ServiceImport) and EndpointSlices, nothing re-applied when
//! nothing changed, failures that do not stop the rest, and pruning of managed objects no
//! longer exported (only once the grace period after
//! start has passed). Every object written is validated against its schema, and every request
//! against the chart's RBAC.

mod common;

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use trellis_controller::import_writer::{ImportWriter, desired_objects};
use trellis_core::cluster::fixture::{cluster, clusters_a_b, export, id, service};
use trellis_core::cluster::{ServiceKey, ServicePort};
use trellis_core::imports::Imports;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn imports() -> Imports {
    let (a, mut b) = clusters_a_b();
    export(&mut b.services, "shop", "web", "10.97.0.10", &["10.2.0.5"]);
    export(
        &mut b.services,
        "nowhere",
        "api",
        "10.97.0.11",
        &["10.2.0.6"],
    );
    Imports::build(&id("a"), [&a, &b], &Default::default(), 1)
}

/// The next request, recorded in `calls`; a written object (a PATCH body) must validate
/// against its schema.
async fn next(
    handle: &mut Handle,
    calls: &common::Calls,
) -> (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request")
        .expect("the client is alive");
    calls.record(&req);
    let (parts, body) = req.into_parts();
    let bytes = body.collect_bytes().await.unwrap();
    if parts.method == Method::PATCH {
        let written: Value = serde_json::from_slice(&bytes).unwrap();
        let errors = common::validate_written(&written);
        assert!(errors.is_empty(), "{written}: {errors:#?}");
    }
    (Request::from_parts(parts, Body::from(bytes.to_vec())), send)
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, status: u16, body: Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(body.to_string().into_bytes()))
            .unwrap(),
    );
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("namespaces \"{what}\" not found"), "reason": "NotFound", "code": 404})
}

#[tokio::test]
async fn applies_with_ssa_skips_unchanged_and_prunes_the_rest() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let calls = common::Calls::default();
    let desired = desired_objects(&imports(), &Default::default());
    assert_eq!(desired.imports.len(), 2);

    let writer = tokio::spawn(async move {
        let mut w = ImportWriter::new(client);
        let first = w.apply(&desired).await;
        let second = w.apply(&desired).await;
        let pruned = w.prune(&desired).await;
        (first, second, pruned)
    });

    // ServiceImports first, in key order: nowhere/api (its namespace is missing), shop/web.
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::PATCH);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1beta1/namespaces/nowhere/serviceimports/api"
    );
    respond(send, 404, not_found("nowhere"));
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceimports/web"
    );
    let query = req.uri().query().unwrap().to_string();
    assert!(query.contains("fieldManager=trellis-controller"), "{query}");
    assert!(query.contains("force=true"), "{query}");
    assert_eq!(
        req.headers()["content-type"],
        "application/apply-patch+yaml"
    );
    let mut body = body_json(req).await;
    assert_eq!(body["kind"], "ServiceImport");
    assert_eq!(body["spec"]["type"], "ClusterSetIP");
    body["metadata"]["uid"] = json!("uid-web");
    respond(send, 200, body);
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::PATCH);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceimports/web/status"
    );
    let body = body_json(req).await;
    assert_eq!(body["status"]["clusters"][0]["cluster"], "b");
    assert_eq!(body["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(body["status"]["conditions"][0]["reason"], "Pending");
    respond(send, 200, body);
    // Then the derived Services: api's waits for its ServiceImport (it failed); web's is
    // owned by the ServiceImport just applied.
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(
        req.uri().path(),
        "/api/v1/namespaces/shop/services/derived-web"
    );
    let query = req.uri().query().unwrap().to_string();
    assert!(
        !query.contains("force=true"),
        "a Service of that name someone else manages is never taken over: {query}"
    );
    let body = body_json(req).await;
    assert_eq!(body["spec"]["type"], "ClusterIP");
    assert!(body["spec"].get("selector").is_none(), "{body}");
    assert_eq!(body["spec"]["ports"][0]["port"], 80);
    assert_eq!(
        body["metadata"]["labels"]["multicluster.kubernetes.io/service-name"],
        "web"
    );
    let owner = &body["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "ServiceImport");
    assert_eq!(owner["apiVersion"], "multicluster.x-k8s.io/v1beta1");
    assert_eq!(owner["name"], "web");
    assert_eq!(owner["uid"], "uid-web");
    respond(send, 200, body);
    // Then the slices: nowhere's fails too, shop's succeeds.
    let (req, send) = next(&mut handle, &calls).await;
    assert!(
        req.uri()
            .path()
            .ends_with("/namespaces/nowhere/endpointslices/imported-api.b")
    );
    respond(send, 404, not_found("nowhere"));
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(
        req.uri().path(),
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/imported-web.b"
    );
    let body = body_json(req).await;
    assert_eq!(
        body["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"],
        "b"
    );
    assert_eq!(
        body["metadata"]["labels"]["multicluster.kubernetes.io/service-name"],
        "web"
    );
    assert_eq!(
        body["metadata"]["labels"]["kubernetes.io/service-name"],
        "derived-web"
    );
    assert_ne!(
        body["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io"
    );
    respond(send, 200, body);

    // The second apply re-sends only what failed (the missing namespace), nothing for shop.
    for _ in 0..2 {
        let (req, send) = next(&mut handle, &calls).await;
        assert!(
            req.uri().path().contains("/namespaces/nowhere/"),
            "{}",
            req.uri()
        );
        respond(send, 404, not_found("nowhere"));
    }

    // Prune: list what we manage, delete what is no longer wanted.
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::GET);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1beta1/serviceimports"
    );
    assert!(
        req.uri()
            .query()
            .unwrap()
            .contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dtrellis-controller"),
        "{}",
        req.uri()
    );
    let si = |ns: &str, name: &str| {
        json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"}, "spec": {"type": "ClusterSetIP", "ports": []}})
    };
    respond(
        send,
        200,
        json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImportList",
        "metadata": {"resourceVersion": "9"}, "items": [si("shop", "web"), si("shop", "old")]}),
    );
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::DELETE);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceimports/old"
    );
    respond(send, 200, si("shop", "old"));
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/api/v1/services");
    assert!(
        req.uri().query().unwrap().contains(
            "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dtrellis-controller%2Cmulticluster.kubernetes.io%2Fservice-name"
        ),
        "only derived Services are listed: {}",
        req.uri()
    );
    respond(send, 200, derived_list(&["derived-web", "derived-old"]));
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::DELETE);
    assert_eq!(
        req.uri().path(),
        "/api/v1/namespaces/shop/services/derived-old"
    );
    respond(
        send,
        200,
        derived_list(&["derived-old"])["items"][0].clone(),
    );
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.uri().path(), "/apis/discovery.k8s.io/v1/endpointslices");
    let slice = |name: &str| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": "8",
            "labels": {"app.kubernetes.io/managed-by": "trellis-controller"}},
        "addressType": "IPv4", "endpoints": []})
    };
    respond(
        send,
        200,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
        "metadata": {"resourceVersion": "9"}, "items": [slice("imported-web.b"), slice("imported-old.b")]}),
    );
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::DELETE);
    assert_eq!(
        req.uri().path(),
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/imported-old.b"
    );
    respond(send, 200, slice("imported-old.b"));

    let (first, second, (deleted, prune_errors)) = writer.await.unwrap();
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(
        first[0].to_string().contains("applying a ServiceImport"),
        "{}",
        first[0]
    );
    assert_eq!(second.len(), 2);
    assert_eq!(deleted, 3);
    assert!(prune_errors.is_empty(), "{prune_errors:?}");
    calls.assert_allowed_by_the_chart();
}

fn hub_importing(services: &[&str]) -> trellis_controller::hub::Hub {
    use trellis_controller::hub::{Hub, HubConfig};
    let hub = Hub::new(
        HubConfig {
            id: id("a"),
            name: "a".into(),
            service_cidrs: vec![],
            lease: Duration::from_secs(3600),
            node_encryption: false,
            recent_deltas: 4,
            startup_grace: Duration::ZERO,
        },
        trellis_controller::metrics::Metrics::new().unwrap(),
    );
    hub.set_configured_peers(vec![id("b")]);
    hub.set_configured_allowance(&id("b"), Some(vec!["10.0.0.0/8".parse().unwrap()]));
    let a = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
    hub.set_source(trellis_controller::source::SourceState {
        nodes: a.nodes,
        ..Default::default()
    });
    set_exports(&hub, services);
    hub
}

/// Peer b (re)sends its snapshot exporting `services` of namespace shop.
fn set_exports(hub: &trellis_controller::hub::Hub, services: &[&str]) {
    let mut b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
    for (i, name) in services.iter().enumerate() {
        b.services.insert(
            ServiceKey::new("shop", *name),
            service(
                "shop",
                name,
                &format!("10.97.0.{}", 10 + i),
                &[&format!("10.2.0.{}", 5 + i)],
            ),
        );
    }
    hub.peer_snapshot(b);
}

/// Answers `n` applies with their bodies (a ServiceImport gets a UID, as the API server
/// gives it); returns their paths in order.
async fn answer_applies(handle: &mut Handle, calls: &common::Calls, n: usize) -> Vec<String> {
    let mut paths = Vec::new();
    for _ in 0..n {
        let (req, send) = next(handle, calls).await;
        assert_eq!(req.method(), Method::PATCH);
        paths.push(req.uri().path().to_owned());
        let mut body = body_json(req).await;
        if body["kind"] == "ServiceImport" {
            body["metadata"]["uid"] = json!(format!("uid-{}", body["metadata"]["name"]));
        }
        respond(send, 200, body);
    }
    paths
}

/// A list of derived Services, as the API server returns them.
fn derived_list(names: &[&str]) -> Value {
    let items: Vec<Value> = names
        .iter()
        .map(|name| {
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "shop", "resourceVersion": "8",
                    "labels": {"app.kubernetes.io/managed-by": "trellis-controller",
                        "multicluster.kubernetes.io/service-name": name.trim_start_matches("derived-")}},
                "spec": {"type": "ClusterIP", "clusterIP": "10.96.5.5", "ports": [{"port": 80}]}})
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "9"}, "items": items})
}

fn managed_list(kind: &str, api_version: &str, names: &[&str]) -> Value {
    let items: Vec<Value> = names
        .iter()
        .map(|name| {
            json!({"apiVersion": api_version, "kind": kind,
                "metadata": {"name": name, "namespace": "shop", "resourceVersion": "8",
                    "labels": {"app.kubernetes.io/managed-by": "trellis-controller"}},
                "spec": {"type": "ClusterSetIP", "ports": []},
                "addressType": "IPv4", "endpoints": []})
        })
        .collect();
    json!({"apiVersion": api_version, "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": "9"}, "items": items})
}

/// `run` applies at once but deletes nothing before the grace period (a restarted controller
/// waits for its peers to resync); once it has passed it prunes what is no longer exported.
/// On tokio's paused clock: the grace period passes only when the test lets it.
#[tokio::test(start_paused = true)]
async fn the_run_loop_prunes_only_after_the_grace_period() {
    const GRACE: Duration = Duration::from_secs(30);
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let calls = common::Calls::default();
    let hub = hub_importing(&["web", "api"]);
    let started = tokio::time::Instant::now();
    let writer = tokio::spawn(trellis_controller::import_writer::run(
        client,
        hub.clone(),
        GRACE,
    ));

    // The first view: both services applied at once, api before web.
    let imports = "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceimports";
    let slices = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";
    let services = "/api/v1/namespaces/shop/services";
    assert_eq!(
        answer_applies(&mut handle, &calls, 8).await,
        [
            format!("{imports}/api"),
            format!("{imports}/api/status"),
            format!("{imports}/web"),
            format!("{imports}/web/status"),
            format!("{services}/derived-api"),
            format!("{services}/derived-web"),
            format!("{slices}/imported-api.b"),
            format!("{slices}/imported-web.b"),
        ]
    );

    // b stops exporting api well inside the grace period: nothing is listed or deleted.
    tokio::time::sleep(Duration::from_secs(10)).await;
    set_exports(&hub, &["web"]);
    let quiet = tokio::time::timeout_at(
        started + GRACE - Duration::from_millis(1),
        handle.next_request(),
    )
    .await;
    assert!(
        quiet.is_err(),
        "a request before the grace period ended: {:?}",
        quiet.map(|r| r.map(|(req, _)| req.uri().clone()))
    );
    assert_eq!(calls.count("list", "serviceimports"), 0);
    assert_eq!(calls.count("delete", "serviceimports"), 0);

    // The grace period ends: what is managed but no longer wanted goes.
    let (req, send) = next(&mut handle, &calls).await;
    assert!(tokio::time::Instant::now() >= started + GRACE);
    assert_eq!(req.method(), Method::GET);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1beta1/serviceimports"
    );
    respond(
        send,
        200,
        managed_list(
            "ServiceImport",
            "multicluster.x-k8s.io/v1beta1",
            &["web", "api"],
        ),
    );
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::DELETE);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceimports/api"
    );
    respond(
        send,
        200,
        managed_list("ServiceImport", "multicluster.x-k8s.io/v1beta1", &["api"])["items"][0]
            .clone(),
    );
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.uri().path(), "/api/v1/services");
    respond(send, 200, derived_list(&["derived-web", "derived-api"]));
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::DELETE);
    assert_eq!(
        req.uri().path(),
        "/api/v1/namespaces/shop/services/derived-api"
    );
    respond(
        send,
        200,
        derived_list(&["derived-api"])["items"][0].clone(),
    );
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.uri().path(), "/apis/discovery.k8s.io/v1/endpointslices");
    respond(
        send,
        200,
        managed_list(
            "EndpointSlice",
            "discovery.k8s.io/v1",
            &["imported-web.b", "imported-api.b"],
        ),
    );
    let (req, send) = next(&mut handle, &calls).await;
    assert_eq!(req.method(), Method::DELETE);
    assert_eq!(
        req.uri().path(),
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/imported-api.b"
    );
    respond(
        send,
        200,
        managed_list("EndpointSlice", "discovery.k8s.io/v1", &["imported-api.b"])["items"][0]
            .clone(),
    );
    assert_eq!(calls.count("delete", "serviceimports"), 1);
    assert_eq!(calls.count("delete", "services"), 1);
    assert_eq!(calls.count("delete", "endpointslices"), 1);
    writer.abort();
    calls.assert_allowed_by_the_chart();
}

/// Every object `desired_objects` makes (ports, IPv4 and IPv6 slices, headless or not)
/// validates; the same objects with a wrong field do not, so the check can fail.
#[test]
fn written_objects_match_their_schemas_and_wrong_fields_are_caught() {
    let (a, mut b) = clusters_a_b();
    let mut web = service("shop", "web", "10.97.0.10", &["10.2.0.5", "fd00::5"]);
    web.endpoint_ports = vec![ServicePort {
        name: Some("http".into()),
        protocol: trellis_core::cluster::Protocol::Tcp,
        port: 8080,
        app_protocol: Some("http".into()),
    }];
    web.ports[0].app_protocol = Some("http".into());
    web.properties.session_affinity = Some("ClientIP".into());
    web.properties.session_affinity_timeout = Some(10);
    web.properties.ip_families = vec!["IPv4".into(), "IPv6".into()];
    web.properties.labels = [("team".to_string(), "a".to_string())].into();
    web.properties.annotations = [("note".to_string(), "x".to_string())].into();
    b.services.insert(ServiceKey::new("shop", "web"), web);
    let mut headless = service("shop", "db", "10.97.0.11", &["10.2.0.6"]);
    headless.kind = trellis_core::cluster::ServiceKind::Headless;
    headless.cluster_ips.clear();
    b.services.insert(ServiceKey::new("shop", "db"), headless);
    let vips = [(
        ServiceKey::new("shop", "web"),
        vec![
            "10.100.0.7".parse().unwrap(),
            "fd00:100::7".parse().unwrap(),
        ],
    )]
    .into();
    let desired = desired_objects(
        &Imports::build(&id("a"), [&a, &b], &vips, 1),
        &Default::default(),
    );
    assert_eq!(
        (
            desired.imports.len(),
            desired.services.len(),
            desired.slices.len()
        ),
        (2, 1, 3)
    );
    let objects: Vec<Value> = desired
        .imports
        .values()
        .map(|o| serde_json::to_value(o).unwrap())
        .chain(
            desired
                .services
                .values()
                .map(|o| serde_json::to_value(o).unwrap()),
        )
        .chain(
            desired
                .slices
                .values()
                .map(|o| serde_json::to_value(o).unwrap()),
        )
        .collect();
    for o in &objects {
        let errors = common::validate_written(o);
        assert!(errors.is_empty(), "{o}: {errors:#?}");
    }

    let import = objects
        .iter()
        .find(|o| o["kind"] == "ServiceImport")
        .unwrap();
    let slice = objects
        .iter()
        .find(|o| o["kind"] == "EndpointSlice")
        .unwrap();
    let service = objects.iter().find(|o| o["kind"] == "Service").unwrap();
    let broken = |base: &Value, change: &dyn Fn(&mut Value)| {
        let mut o = base.clone();
        change(&mut o);
        common::validate_written(&o)
    };
    for (what, errors) in [
        (
            "a port as a string",
            broken(import, &|o| o["spec"]["ports"][0]["port"] = json!("80")),
        ),
        (
            "an unknown spec field",
            broken(import, &|o| o["spec"]["clusterIP"] = json!("10.0.0.1")),
        ),
        (
            "no type",
            broken(import, &|o| {
                o["spec"].as_object_mut().unwrap().remove("type");
            }),
        ),
        (
            "a misspelt slice field",
            broken(slice, &|o| {
                o["endpoints"][0]["adresses"] = json!(["10.2.0.5"])
            }),
        ),
        (
            "ready as a string",
            broken(slice, &|o| {
                o["endpoints"][0]["conditions"]["ready"] = json!("yes")
            }),
        ),
        (
            "an unknown address type",
            broken(slice, &|o| o["addressType"] = json!("IPv5")),
        ),
        (
            "an unknown import type",
            broken(import, &|o| o["spec"]["type"] = json!("ClusterIP")),
        ),
        (
            "three clusterset IPs",
            broken(import, &|o| {
                o["spec"]["ips"] = json!(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
            }),
        ),
        (
            "the old version",
            broken(import, &|o| {
                o["apiVersion"] = json!("multicluster.x-k8s.io/v1alpha1")
            }),
        ),
        (
            "a misspelt Service field",
            broken(service, &|o| o["spec"]["clusterIp"] = json!("None")),
        ),
    ] {
        assert!(!errors.is_empty(), "{what} passed validation");
    }
}

/// The RBAC check refuses what the chart does not grant, so a missing rule fails the tests
/// that record the call.
#[test]
fn calls_the_chart_does_not_grant_are_refused() {
    let rbac = common::Rbac::controller();
    let call = |method: Method, uri: &str| {
        common::ApiCall::of(&Request::builder().method(method).uri(uri).body(()).unwrap())
    };
    for (uri, allowed) in [
        (
            "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceimports/web/status",
            true,
        ),
        (
            "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceexports/web",
            false,
        ),
        (
            "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceexports/web/status",
            true,
        ),
        ("/api/v1/namespaces/shop/services/derived-web", true),
        ("/api/v1/namespaces/shop/pods/web", false),
    ] {
        assert_eq!(rbac.allows(&call(Method::PATCH, uri)), allowed, "{uri}");
    }
    let settings = "/api/v1/namespaces/trellis-system/configmaps";
    assert!(rbac.allows(&call(
        Method::GET,
        &format!("{settings}?fieldSelector=metadata.name%3Dtrellis-controller&watch=true")
    )));
    assert!(!rbac.allows(&call(Method::GET, &format!("{settings}?watch=true"))));
    assert!(!rbac.allows(&call(
        Method::GET,
        "/api/v1/namespaces/default/configmaps/trellis-controller"
    )));
    // The chart without its ServiceImport rule refuses the writer's apply.
    let template = std::fs::read_to_string(format!(
        "{}/../helm/trellis/templates/rbac.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let without = template.replace("resources: [serviceimports]", "resources: [nothing]");
    assert_ne!(without, template);
    let apply = call(
        Method::PATCH,
        "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceimports/web",
    );
    assert!(rbac.allows(&apply));
    assert!(!common::Rbac::parse(&without).allows(&apply));
}

/// Every object is written again after `forget_applied` (the run loop's resync), so one
/// deleted behind the writer's back comes back; the conditions keep their transition times.
#[tokio::test]
async fn a_resync_writes_everything_again_keeping_transition_times() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let calls = common::Calls::default();
    let (a, mut b) = clusters_a_b();
    export(&mut b.services, "shop", "web", "10.97.0.10", &["10.2.0.5"]);
    let desired = desired_objects(
        &Imports::build(&id("a"), [&a, &b], &Default::default(), 1),
        &Default::default(),
    );
    let writer = tokio::spawn(async move {
        let mut w = ImportWriter::new(client);
        let mut errors = w.apply(&desired).await;
        errors.extend(w.apply(&desired).await);
        w.forget_applied();
        errors.extend(w.apply(&desired).await);
        errors
    });
    let mut transition_times = Vec::new();
    for round in 0..2 {
        let mut paths = Vec::new();
        for _ in 0..4 {
            let (req, send) = next(&mut handle, &calls).await;
            paths.push(req.uri().path().to_string());
            let mut body = body_json(req).await;
            if let Some(t) = body["status"]["conditions"][0].get("lastTransitionTime") {
                transition_times.push(t.clone());
            }
            body["metadata"]["uid"] = json!("uid-web");
            respond(send, 200, body);
        }
        assert_eq!(
            paths,
            [
                "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceimports/web",
                "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceimports/web/status",
                "/api/v1/namespaces/shop/services/derived-web",
                "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/imported-web.b",
            ],
            "round {round}: the second apply sent nothing, the resync everything"
        );
    }
    assert!(writer.await.unwrap().is_empty());
    assert_eq!(transition_times.len(), 4);
    assert_eq!(
        transition_times[0], transition_times[2],
        "{transition_times:?}"
    );
    calls.assert_allowed_by_the_chart();
}
