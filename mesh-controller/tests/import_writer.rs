//! The import writer against a scripted API server: server-side apply of ServiceImports and
//! EndpointSlices, nothing re-applied when nothing changed, failures that do not stop the
//! rest, and pruning of managed objects no longer exported.

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use trellis_controller::import_writer::{ImportWriter, desired_objects};
use trellis_core::cluster::fixture::{cluster, id, service};
use trellis_core::cluster::{ClusterId, ServiceKey, ServicePort};
use trellis_core::imports::{ImportedService, Imports};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn imports() -> Imports {
    let a = cluster("a", "10.1.0.0/24", "10.96.0.0/16");
    let mut b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
    b.services.insert(
        ServiceKey::new("shop", "web"),
        service("shop", "web", "10.97.0.10", &["10.2.0.5"]),
    );
    b.services.insert(
        ServiceKey::new("nowhere", "api"),
        service("nowhere", "api", "10.97.0.11", &["10.2.0.6"]),
    );
    Imports::build(&id("a"), [&a, &b], 1)
}

fn no_ports(_: &ClusterId, _: &ImportedService) -> Vec<ServicePort> {
    vec![]
}

async fn next(
    handle: &mut Handle,
) -> (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request")
        .expect("the client is alive")
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
    let desired = desired_objects(&imports(), &no_ports);
    assert_eq!(desired.imports.len(), 2);

    let writer = tokio::spawn(async move {
        let mut w = ImportWriter::new(client);
        let first = w.apply(&desired).await;
        let second = w.apply(&desired).await;
        let pruned = w.prune(&desired).await;
        (first, second, pruned)
    });

    // ServiceImports first, in key order: nowhere/api (its namespace is missing), shop/web.
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::PATCH);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/nowhere/serviceimports/api"
    );
    respond(send, 404, not_found("nowhere"));
    let (req, send) = next(&mut handle).await;
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports/web"
    );
    let query = req.uri().query().unwrap().to_string();
    assert!(query.contains("fieldManager=trellis-controller"), "{query}");
    assert!(query.contains("force=true"), "{query}");
    assert_eq!(
        req.headers()["content-type"],
        "application/apply-patch+yaml"
    );
    let body = body_json(req).await;
    assert_eq!(body["kind"], "ServiceImport");
    assert_eq!(body["spec"]["type"], "ClusterSetIP");
    respond(send, 200, body);
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::PATCH);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports/web/status"
    );
    let body = body_json(req).await;
    assert_eq!(body["status"]["clusters"][0]["cluster"], "b");
    respond(send, 200, body);
    // Then the slices: nowhere's fails too, shop's succeeds.
    let (req, send) = next(&mut handle).await;
    assert!(
        req.uri()
            .path()
            .ends_with("/namespaces/nowhere/endpointslices/imported-api-b")
    );
    respond(send, 404, not_found("nowhere"));
    let (req, send) = next(&mut handle).await;
    assert_eq!(
        req.uri().path(),
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/imported-web-b"
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
    respond(send, 200, body);

    // The second apply re-sends only what failed (the missing namespace), nothing for shop.
    for _ in 0..2 {
        let (req, send) = next(&mut handle).await;
        assert!(
            req.uri().path().contains("/namespaces/nowhere/"),
            "{}",
            req.uri()
        );
        respond(send, 404, not_found("nowhere"));
    }

    // Prune: list what we manage, delete what is no longer wanted.
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::GET);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1alpha1/serviceimports"
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
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"}, "spec": {"type": "ClusterSetIP", "ports": []}})
    };
    respond(
        send,
        200,
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImportList",
        "metadata": {"resourceVersion": "9"}, "items": [si("shop", "web"), si("shop", "old")]}),
    );
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::DELETE);
    assert_eq!(
        req.uri().path(),
        "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports/old"
    );
    respond(send, 200, si("shop", "old"));
    let (req, send) = next(&mut handle).await;
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
        "metadata": {"resourceVersion": "9"}, "items": [slice("imported-web-b"), slice("imported-old-b")]}),
    );
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::DELETE);
    assert_eq!(
        req.uri().path(),
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/imported-old-b"
    );
    respond(send, 200, slice("imported-old-b"));

    let (first, second, (deleted, prune_errors)) = writer.await.unwrap();
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(
        first[0].to_string().contains("applying a ServiceImport"),
        "{}",
        first[0]
    );
    assert_eq!(second.len(), 2);
    assert_eq!(deleted, 2);
    assert!(prune_errors.is_empty(), "{prune_errors:?}");
}
