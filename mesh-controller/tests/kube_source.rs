//! The Kubernetes source against a scripted API server (kube-rs controller-rs's
//! `ApiServerVerifier` pattern over `tower-test`), answering with real Kubernetes JSON
//! (`testdata/k8s/`): initial lists, watch events, a `410 Gone` that forces a re-list, and an
//! API server that goes away and comes back. Every request is checked against the chart's
//! RBAC, and "nothing happened" is asserted only once a counter proves the event was seen.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use trellis_controller::source::SourceState;
use trellis_controller::static_source::StateSink;
use trellis_core::cluster::{ServiceKey, ServiceKind};
use trellis_test_support::eventually_async;

/// Long enough for a loaded two-core machine; a passing test never waits for it.
const WAIT: Duration = Duration::from_secs(20);

const NODES: &str = "/api/v1/nodes";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const EXPORTS: &str = "/apis/multicluster.x-k8s.io/v1beta1/serviceexports";
const PROPS: &str = "/apis/about.k8s.io/v1alpha1/clusterproperties";
const CIDRS: &str = "/apis/networking.k8s.io/v1/servicecidrs";
const SETTINGS: &str = "/api/v1/namespaces/trellis-system/configmaps";
const REQUIRED: [&str; 4] = [NODES, SERVICES, SLICES, EXPORTS];
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
const PEERS: &str = "/apis/trellis.dev/v1alpha1/peers";
const SECRETS: &str = "/api/v1/namespaces/trellis-system/secrets";

fn fixture(name: &str) -> Value {
    let path = format!("{}/testdata/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[derive(Default)]
struct Kind {
    list: Value,
    events: VecDeque<String>,
    gone: bool,
}

/// A scripted API server: lists from fixtures, watch events queued by the test.
#[derive(Default)]
struct FakeApi {
    kinds: BTreeMap<&'static str, Kind>,
    down: bool,
    broken: BTreeSet<&'static str>,
    rv: u64,
    lists: BTreeMap<String, usize>,
    /// Watch requests per path, counted as they arrive.
    watches: BTreeMap<String, usize>,
    /// Per path, the watch count when its last queued events went out: a later watch
    /// request proves the watcher consumed them.
    delivered_on_watch: BTreeMap<String, usize>,
    /// Requests refused while the server is down, and answered 500 while broken, per path.
    refused: BTreeMap<String, usize>,
    failed: BTreeMap<String, usize>,
}

impl FakeApi {
    fn new() -> Self {
        let mut api = FakeApi {
            rv: 2000,
            ..Default::default()
        };
        for (path, file) in [
            (NODES, "nodes.json"),
            (SERVICES, "services.json"),
            (SLICES, "endpointslices.json"),
            (EXPORTS, "serviceexports.json"),
            (PROPS, "clusterproperties.json"),
            (CIDRS, "servicecidrs.json"),
            (SETTINGS, "configmaps.json"),
            (PODS, "pods.json"),
            (NAMESPACES, "namespaces.json"),
            (POLICIES, "networkpolicies.json"),
            (PEERS, "peers.json"),
            (SECRETS, "secrets.json"),
        ] {
            api.kinds.insert(
                path,
                Kind {
                    list: fixture(file),
                    ..Default::default()
                },
            );
        }
        api
    }

    /// Applies a watch event to the list (so re-lists agree) and queues it for the watcher.
    fn push(
        &mut self,
        path: &'static str,
        kind_name: &str,
        api_version: &str,
        ty: &str,
        mut obj: Value,
    ) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        obj["kind"] = json!(kind_name);
        obj["apiVersion"] = json!(api_version);
        let kind = self.kinds.get_mut(path).unwrap();
        let key = |o: &Value| {
            (
                o["metadata"]["namespace"].clone(),
                o["metadata"]["name"].clone(),
            )
        };
        let items = kind.list["items"].as_array_mut().unwrap();
        items.retain(|o| key(o) != key(&obj));
        if ty != "DELETED" {
            items.push(obj.clone());
        }
        kind.list["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        kind.events
            .push_back(json!({"type": ty, "object": obj}).to_string());
    }

    fn respond(&mut self, path: &str, watch: bool) -> Result<Option<Response<Body>>, ()> {
        if self.down {
            *self.refused.entry(path.to_string()).or_default() += 1;
            return Err(());
        }
        let ok = |v: String| {
            Response::builder()
                .status(200)
                .body(Body::from(v.into_bytes()))
                .unwrap()
        };
        let Some((&p, kind)) = self.kinds.iter_mut().find(|(p, _)| **p == path) else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
            return Ok(Some(
                Response::builder()
                    .status(404)
                    .body(Body::from(status.to_string().into_bytes()))
                    .unwrap(),
            ));
        };
        if self.broken.contains(p) {
            *self.failed.entry(p.to_string()).or_default() += 1;
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500});
            return Ok(Some(
                Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(Body::from(status.to_string().into_bytes()))
                    .unwrap(),
            ));
        }
        if !watch {
            *self.lists.entry(p.to_string()).or_default() += 1;
            return Ok(Some(ok(kind.list.to_string())));
        }
        if kind.gone {
            kind.gone = false;
            let err = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "too old resource version: 1000 (2001)", "reason": "Expired", "code": 410}});
            return Ok(Some(ok(format!("{err}\n"))));
        }
        if kind.events.is_empty() {
            return Ok(None);
        }
        let body: String = kind.events.drain(..).map(|e| e + "\n").collect();
        let watches = self.watches.get(p).copied().unwrap_or(0);
        self.delivered_on_watch.insert(p.to_string(), watches);
        Ok(Some(ok(body)))
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Answers requests until the test ends. Watches with nothing to say are held for up to
/// 300 ms (then end empty, and the watcher re-watches), as a real API server holds them open.
async fn serve(mut handle: Handle, api: Arc<Mutex<FakeApi>>, calls: common::Calls) {
    while let Some((req, send)) = handle.next_request().await {
        calls.record(&req);
        let api = api.clone();
        let path = req.uri().path().to_string();
        let watch = req.uri().query().unwrap_or("").contains("watch=true");
        if watch {
            *api.lock().unwrap().watches.entry(path.clone()).or_default() += 1;
        }
        tokio::spawn(async move {
            for _ in 0..15 {
                let r = api.lock().unwrap().respond(&path, watch);
                match r {
                    Err(()) => {
                        send.send_error(std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            "api server down",
                        ));
                        return;
                    }
                    Ok(Some(resp)) => {
                        send.send_response(resp);
                        return;
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            send.send_response(Response::builder().status(200).body(Body::empty()).unwrap());
        });
    }
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<SourceState>>>);

impl StateSink for Recorder {
    fn set_source(&self, state: SourceState) {
        self.0.lock().unwrap().push(state);
    }
}

impl Recorder {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    async fn wait(&self, what: &str, cond: impl Fn(&SourceState) -> bool) -> SourceState {
        eventually_async(what, WAIT, || async {
            self.0.lock().unwrap().last().filter(|s| cond(s)).cloned()
        })
        .await
    }
}

/// Waits until `cond` holds of the scripted server's state.
async fn until(api: &Arc<Mutex<FakeApi>>, what: &str, cond: impl Fn(&FakeApi) -> bool) {
    eventually_async(what, WAIT, || async {
        cond(&api.lock().unwrap()).then_some(())
    })
    .await
}

/// Waits until the watcher of `path` consumed the events last queued for it (it watches
/// again only after handing them on).
async fn consumed(api: &Arc<Mutex<FakeApi>>, path: &str) {
    until(
        api,
        &format!("the watcher of {path} to consume its events"),
        |a| {
            a.kinds[path].events.is_empty()
                && a.delivered_on_watch
                    .get(path)
                    .is_some_and(|at| a.watches.get(path).is_some_and(|now| now > at))
        },
    )
    .await
}

/// A client of a fake API server (`configure`d before it answers anything) that records the
/// calls made to it.
fn fake_api_server(
    configure: impl FnOnce(&mut FakeApi),
) -> (
    kube::Client,
    Arc<Mutex<FakeApi>>,
    tokio::task::JoinHandle<()>,
    common::Calls,
) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let mut api = FakeApi::new();
    configure(&mut api);
    let api = Arc::new(Mutex::new(api));
    let calls = common::Calls::default();
    let server = tokio::spawn(serve(handle, api.clone(), calls.clone()));
    (client, api, server, calls)
}

fn start() -> (
    Arc<Mutex<FakeApi>>,
    Recorder,
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
    common::Calls,
) {
    start_configured(|_| {})
}

/// The Kubernetes source on a fake API server `configure`d before the source starts.
fn start_configured(
    configure: impl FnOnce(&mut FakeApi),
) -> (
    Arc<Mutex<FakeApi>>,
    Recorder,
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
    common::Calls,
) {
    let (client, api, server, calls) = fake_api_server(configure);
    let rec = Recorder::default();
    let source = tokio::spawn(trellis_controller::kube_source::run_with(
        client,
        rec.clone(),
        Duration::from_millis(20),
    ));
    (api, rec, server, source, calls)
}

fn web() -> ServiceKey {
    ServiceKey::new("shop", "web")
}

#[tokio::test]
async fn lists_then_follows_watch_events() {
    let (api, rec, server, source, calls) = start();
    let s = rec
        .wait("the initial state", |s| s.services.contains_key(&web()))
        .await;
    assert_eq!(s.cluster_id.as_ref().map(|c| c.as_str()), Some("east"));
    assert_eq!(s.service_cidrs, vec!["10.96.0.0/16".parse().unwrap()]);
    assert_eq!(s.nodes.len(), 2);
    assert!(s.nodes["east-worker"].gateway.is_some());
    assert_eq!(s.services.len(), 1, "only web is exported");
    let w = &s.services[&web()];
    assert_eq!(
        w.cluster_ips,
        vec!["10.96.12.34".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(w.endpoints.len(), 1);
    // What the export carries to the clusterset: the Service's properties, the
    // ServiceExport's creation time and exported labels and annotations.
    let p = &w.properties;
    assert_eq!(p.exported_at, Some(1_793_611_800), "2026-11-02T09:30:00Z");
    assert_eq!(p.session_affinity.as_deref(), Some("ClientIP"));
    assert_eq!(p.session_affinity_timeout, Some(10800));
    assert_eq!(p.internal_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(p.traffic_distribution.as_deref(), Some("PreferClose"));
    assert_eq!(p.ip_families, ["IPv4"]);
    assert_eq!(p.labels["team"], "storefront");
    assert_eq!(p.annotations["owner"], "shop@example.com");
    assert!(
        !p.labels.contains_key("app"),
        "the Service's own labels stay home"
    );
    assert_eq!(w.ports[0].app_protocol.as_deref(), Some("http"));
    // The derived Service of the import shop/api gives it its clusterset IPs; a Service that
    // only claims to be one (no managed-by label) does not.
    assert_eq!(
        s.clusterset_ips,
        BTreeMap::from([(
            ServiceKey::new("shop", "api"),
            vec![
                "10.96.200.7".parse::<std::net::IpAddr>().unwrap(),
                "fd00:96::7".parse().unwrap()
            ]
        )])
    );

    // A second endpoint for web arrives as a MODIFIED EndpointSlice.
    let mut slice = fixture("endpointslices.json")["items"][0].clone();
    slice["endpoints"].as_array_mut().unwrap().push(json!({
        "addresses": ["10.10.0.7"], "conditions": {"ready": true}, "nodeName": "east-control-plane"
    }));
    api.lock().unwrap().push(
        SLICES,
        "EndpointSlice",
        "discovery.k8s.io/v1",
        "MODIFIED",
        slice,
    );
    rec.wait("two endpoints", |s| s.services[&web()].endpoints.len() == 2)
        .await;

    // db gets exported (ADDED), then web's export is deleted (DELETED).
    let export = |name: &str| json!({"metadata": {"name": name, "namespace": "shop", "uid": format!("u-{name}")}});
    api.lock().unwrap().push(
        EXPORTS,
        "ServiceExport",
        "multicluster.x-k8s.io/v1beta1",
        "ADDED",
        export("db"),
    );
    let s = rec
        .wait("db exported", |s| {
            s.services.contains_key(&ServiceKey::new("shop", "db"))
        })
        .await;
    let db = &s.services[&ServiceKey::new("shop", "db")];
    assert_eq!(db.kind, ServiceKind::Headless);
    assert_eq!(db.endpoints[0].hostname.as_deref(), Some("db-0"));
    api.lock().unwrap().push(
        EXPORTS,
        "ServiceExport",
        "multicluster.x-k8s.io/v1beta1",
        "DELETED",
        export("web"),
    );
    rec.wait("web unexported", |s| !s.services.contains_key(&web()))
        .await;
    source.abort();
    server.abort();
    calls.assert_allowed_by_the_chart();
}

#[tokio::test]
async fn a_410_gone_relists_and_picks_up_missed_changes() {
    let (api, rec, server, source, calls) = start();
    rec.wait("the initial state", |s| s.nodes.len() == 2).await;
    let lists_before = api.lock().unwrap().lists.get(NODES).copied().unwrap_or(0);
    {
        // A node joins while the watch is "expired": it is only in the list, not in an event.
        let mut api = api.lock().unwrap();
        let mut node = fixture("nodes.json")["items"][1].clone();
        node["metadata"]["name"] = json!("east-worker2");
        node["spec"]["podCIDRs"] = json!(["10.10.2.0/24"]);
        node["spec"]["podCIDR"] = json!("10.10.2.0/24");
        api.push(NODES, "Node", "v1", "ADDED", node);
        api.kinds.get_mut(NODES).unwrap().events.clear();
        api.kinds.get_mut(NODES).unwrap().gone = true;
    }
    let s = rec
        .wait("the re-listed node", |s| {
            s.nodes.contains_key("east-worker2")
        })
        .await;
    assert_eq!(
        s.nodes["east-worker2"].pod_cidrs,
        vec!["10.10.2.0/24".parse().unwrap()]
    );
    assert!(
        api.lock().unwrap().lists[NODES] > lists_before,
        "the 410 must cause a re-list"
    );
    source.abort();
    server.abort();
    calls.assert_allowed_by_the_chart();
}

#[tokio::test]
async fn an_api_server_outage_keeps_the_last_state_and_recovers() {
    let (api, rec, server, source, calls) = start();
    let before = rec
        .wait("the initial state", |s| s.services.contains_key(&web()))
        .await;
    let delivered = rec.count();
    api.lock().unwrap().down = true;
    // Every required watcher hit the outage, and retried (so handed on its error) first.
    until(&api, "every required watch refused twice", |a| {
        REQUIRED
            .iter()
            .all(|p| a.refused.get(*p).is_some_and(|n| *n >= 2))
    })
    .await;
    // Nothing was withdrawn while the API server was away.
    assert_eq!(rec.0.lock().unwrap().last().unwrap(), &before);
    assert_eq!(
        rec.count(),
        delivered,
        "nothing delivered during the outage"
    );
    api.lock().unwrap().down = false;
    let mut svc = fixture("services.json")["items"][1].clone();
    svc["spec"]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "https", "protocol": "TCP", "port": 443}));
    api.lock()
        .unwrap()
        .push(SERVICES, "Service", "v1", "MODIFIED", svc);
    rec.wait("the change after the outage", |s| {
        s.services.get(&web()).is_some_and(|w| w.ports.len() == 2)
    })
    .await;
    source.abort();
    server.abort();
    calls.assert_allowed_by_the_chart();
}

#[tokio::test]
async fn nothing_is_delivered_until_every_required_kind_has_listed() {
    let (api, rec, server, source, calls) = start_configured(|api| {
        api.broken.insert(EXPORTS);
        // The optional kinds may be missing entirely (their CRDs or APIs not installed).
        api.kinds.remove(PROPS);
    });
    // The other required kinds listed and their watchers moved on to watching (so their
    // lists were handed on), and ServiceExports failed twice (so after those lists too).
    until(&api, "the other kinds listed and exports failing", |a| {
        [NODES, SERVICES, SLICES]
            .iter()
            .all(|p| a.watches.contains_key(*p))
            && a.failed.get(EXPORTS).is_some_and(|n| *n >= 2)
    })
    .await;
    assert_eq!(
        rec.count(),
        0,
        "delivered a state before ServiceExports listed"
    );
    api.lock().unwrap().broken.clear();
    let s = rec
        .wait("the state once exports list", |s| {
            s.services.contains_key(&web())
        })
        .await;
    assert_eq!(s.cluster_id, None, "no ClusterProperty API: no ID from it");
    source.abort();
    server.abort();
    calls.assert_allowed_by_the_chart();
}

#[tokio::test]
async fn network_policy_kinds_are_required_then_followed_when_enabled() {
    let (client, api, server, calls) = fake_api_server(|api| {
        api.broken.insert(PODS);
    });
    let rec = Recorder::default();
    let source = tokio::spawn(trellis_controller::kube_source::run_with_options(
        client,
        rec.clone(),
        trellis_controller::kube_source::SourceOptions {
            debounce: Duration::from_millis(20),
            network_policy: true,
            preshared_key_namespace: None,
        },
    ));
    until(&api, "the other kinds listed and pods failing", |a| {
        REQUIRED
            .iter()
            .chain(&[NAMESPACES, POLICIES])
            .all(|p| a.watches.contains_key(*p))
            && a.failed.get(PODS).is_some_and(|n| *n >= 2)
    })
    .await;
    assert_eq!(
        rec.count(),
        0,
        "delivered a state (as if no pod existed) before Pods listed"
    );
    api.lock().unwrap().broken.clear();
    let s = rec.wait("the pods", |s| !s.policy.pods.is_empty()).await;
    // The finished Job pod is not an endpoint.
    assert_eq!(s.policy.pods.len(), 1);
    let web = &s.policy.pods[0];
    assert_eq!(
        (web.name.as_str(), web.node.as_str()),
        ("web-7d4b9c-x2k8p", "east-worker")
    );
    assert_eq!(web.named_ports[0].port, 8080);
    assert_eq!(s.policy.namespaces["shop"]["team"], "blue");
    assert_eq!(s.policy.policies.len(), 1);
    assert!(s.policy.refused.is_empty());

    // The pod is relabelled (MODIFIED), and an invalid policy arrives (ADDED).
    let mut pod = fixture("pods.json")["items"][0].clone();
    pod["metadata"]["labels"]["canary"] = json!("true");
    api.lock().unwrap().push(PODS, "Pod", "v1", "MODIFIED", pod);
    let bad = json!({"metadata": {"name": "bad", "namespace": "shop", "uid": "u-bad"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{}]}]}});
    api.lock().unwrap().push(
        POLICIES,
        "NetworkPolicy",
        "networking.k8s.io/v1",
        "ADDED",
        bad,
    );
    let s = rec
        .wait("the relabel and the refusal", |s| {
            s.policy
                .pods
                .first()
                .is_some_and(|p| p.labels.contains_key("canary"))
                && !s.policy.refused.is_empty()
        })
        .await;
    assert!(s.policy.refused[0].to_string().contains("shop/bad"));
    source.abort();
    server.abort();
    calls.assert_allowed_by_the_chart();
}

#[tokio::test]
async fn without_network_policy_pods_are_never_listed() {
    let (api, rec, server, source, calls) = start();
    rec.wait("the initial state", |s| s.services.contains_key(&web()))
        .await;
    let a = api.lock().unwrap();
    assert!(
        [PODS, NAMESPACES, POLICIES]
            .iter()
            .all(|p| !a.lists.contains_key(*p) && !a.watches.contains_key(*p)),
        "{:?}",
        a.lists
    );
    drop(a);
    source.abort();
    server.abort();
    calls.assert_allowed_by_the_chart();
}

#[tokio::test]
async fn the_settings_configmap_switches_node_encryption_at_runtime() {
    use trellis_controller::hub::{Hub, HubConfig};
    let (client, api, server, calls) = fake_api_server(|_| {});
    let hub = Hub::new(
        HubConfig {
            id: "east".parse().unwrap(),
            name: "east".into(),
            service_cidrs: vec![],
            lease: Duration::from_secs(30),
            node_encryption: true,
            recent_deltas: 8,
            startup_grace: Duration::ZERO,
        },
        trellis_controller::metrics::Metrics::new().unwrap(),
    );
    let task = tokio::spawn(trellis_controller::kube_settings::run(
        client,
        "trellis-system".into(),
        "trellis-controller".into(),
        hub.clone(),
    ));
    let wait = |want: bool| {
        let hub = hub.clone();
        async move {
            eventually_async(&format!("node encryption {want}"), WAIT, || async {
                (hub.status().node_encryption == want).then_some(())
            })
            .await
        }
    };
    // The listed ConfigMap says false.
    wait(false).await;
    let mut cm = fixture("configmaps.json")["items"][0].clone();
    cm["data"]["nodeEncryption"] = json!("true");
    api.lock()
        .unwrap()
        .push(SETTINGS, "ConfigMap", "v1", "MODIFIED", cm.clone());
    wait(true).await;
    // An invalid value is ignored.
    cm["data"]["nodeEncryption"] = json!("maybe");
    api.lock()
        .unwrap()
        .push(SETTINGS, "ConfigMap", "v1", "MODIFIED", cm);
    consumed(&api, SETTINGS).await;
    assert!(hub.status().node_encryption);
    task.abort();
    server.abort();
    calls.assert_allowed_by_the_chart();
}

#[tokio::test]
async fn the_cluster_id_comes_from_the_cluster_property() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let task = tokio::spawn(async move {
        let first = trellis_controller::kube_source::cluster_id(client.clone()).await;
        let second = trellis_controller::kube_source::cluster_id(client).await;
        (first, second)
    });
    let calls = common::Calls::default();
    let mut prop = fixture("clusterproperties.json")["items"][0].clone();
    for value in ["east", "East_1"] {
        let (req, send) = handle.next_request().await.unwrap();
        calls.record(&req);
        assert_eq!(
            req.uri().path(),
            "/apis/about.k8s.io/v1alpha1/clusterproperties/cluster.clusterset.k8s.io"
        );
        prop["spec"]["value"] = json!(value);
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(prop.to_string().into_bytes()))
                .unwrap(),
        );
    }
    let (first, second) = task.await.unwrap();
    assert_eq!(first.unwrap().as_str(), "east");
    let err = second.unwrap_err();
    assert!(
        trellis_core::error_chain(&err).contains("lowercase"),
        "{}",
        trellis_core::error_chain(&err)
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept"
    );
    calls.assert_allowed_by_the_chart();
}

/// The imports of a view in which clusters `a` (local) and `b` export shop/web, b first; with
/// `conflict`, b's port differs.
fn view_of_web(conflict: bool) -> std::sync::Arc<trellis_controller::hub::MeshView> {
    use trellis_core::cluster::fixture::{clusters_a_b, export, id};
    let (mut a, mut b) = clusters_a_b();
    export(&mut a.services, "shop", "web", "10.96.0.10", &["10.1.0.5"]);
    export(&mut b.services, "shop", "web", "10.97.0.10", &["10.2.0.5"]);
    a.services.get_mut(&web()).unwrap().properties.exported_at = Some(2_000);
    let b_web = b.services.get_mut(&web()).unwrap();
    b_web.properties.exported_at = Some(1_000);
    if conflict {
        b_web.ports[0].port = 81;
    }
    let imports = trellis_core::imports::Imports::build(&id("a"), [&a, &b], &BTreeMap::new(), 1);
    std::sync::Arc::new(trellis_controller::hub::MeshView {
        revision: 1,
        local: std::sync::Arc::new(a),
        remotes: vec![std::sync::Arc::new(b)],
        node_encryption: false,
        imports: std::sync::Arc::new(imports),
        policy: None,
        policy_pending: false,
        policy_step: None,
        external_peers: Default::default(),
    })
}

type Send = tower_test::mock::SendResponse<Response<Body>>;

/// The next request: its method, path and JSON body.
async fn next_call(
    handle: &mut Handle,
    calls: &common::Calls,
) -> (http::Method, String, Value, Send) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request")
        .unwrap();
    calls.record(&req);
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let body: Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    if method == http::Method::PATCH && body["kind"] != "Event" {
        let errors = common::validate_written(&body);
        assert!(errors.is_empty(), "{body}: {errors:#?}");
    }
    (method, path, body, send)
}

fn reply(send: Send, status: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(body.to_string().into_bytes()))
            .unwrap(),
    );
}

fn conditions_by_type(body: &Value) -> BTreeMap<String, Value> {
    body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap().to_owned(), c.clone()))
        .collect()
}

/// Valid, Ready and Conflict follow the objects and the clusterset's imports; a condition's
/// lastTransitionTime moves only when its status does; entering conflict emits one Event.
#[tokio::test]
async fn service_exports_get_valid_ready_and_conflict_conditions() {
    use trellis_controller::kube_source::{ExportStatuses, write_export_statuses};
    use trellis_controller::objects::ExportStatus;
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (tx, rx) = tokio::sync::watch::channel(ExportStatuses::new());
    let (view_tx, view_rx) = tokio::sync::watch::channel(None);
    let writer = tokio::spawn(write_export_statuses(
        client,
        "a".parse().unwrap(),
        rx,
        view_rx,
    ));
    let calls = common::Calls::default();
    // The object already says Ready=False since 2026-01-01: that time stays.
    let since = "2026-01-01T00:00:00Z";
    let existing: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> =
        serde_json::from_value(
            json!([{"type": "Ready", "status": "False", "reason": "Pending",
            "message": "old", "lastTransitionTime": since}]),
        )
        .unwrap();
    let status = |valid: bool, reason: &'static str| ExportStatus {
        valid,
        reason,
        message: "m".into(),
        conditions: existing.clone(),
        uid: Some("ab12".into()),
    };
    let obj = fixture("serviceexports.json")["items"][0].clone();
    tx.send_replace(ExportStatuses::from([(web(), status(true, "Valid"))]));

    // Not yet in the clusterset's imports: Valid, Ready=False Pending, no Conflict.
    let (method, path, body, send) = next_call(&mut handle, &calls).await;
    assert_eq!(method, http::Method::PATCH);
    assert_eq!(
        path,
        "/apis/multicluster.x-k8s.io/v1beta1/namespaces/shop/serviceexports/web/status"
    );
    let c = conditions_by_type(&body);
    assert_eq!(c["Valid"]["status"], "True");
    assert_eq!(c["Valid"]["reason"], "Valid");
    assert_eq!(c["Ready"]["reason"], "Pending");
    assert_eq!(c["Ready"]["lastTransitionTime"], since);
    assert!(!c.contains_key("Conflict"));
    let valid_since = c["Valid"]["lastTransitionTime"].clone();
    reply(send, 200, &obj);

    // Imported, b's older export has another port: Ready=True Exported, Conflict=True naming
    // b; then one Event.
    view_tx.send_replace(Some(view_of_web(true)));
    let (_, path, body, send) = next_call(&mut handle, &calls).await;
    assert!(path.ends_with("/serviceexports/web/status"), "{path}");
    let c = conditions_by_type(&body);
    assert_eq!(c["Valid"]["lastTransitionTime"], valid_since);
    assert_eq!(
        (&c["Ready"]["status"], &c["Ready"]["reason"]),
        (&json!("True"), &json!("Exported"))
    );
    assert_ne!(c["Ready"]["lastTransitionTime"], since);
    assert_eq!(c["Conflict"]["status"], "True");
    assert_eq!(c["Conflict"]["reason"], "PortConflict");
    let message = c["Conflict"]["message"].as_str().unwrap();
    assert!(message.contains("cluster b"), "{message}");
    reply(send, 200, &obj);
    let (method, path, event, send) = next_call(&mut handle, &calls).await;
    assert_eq!(method, http::Method::POST);
    assert_eq!(path, "/apis/events.k8s.io/v1/namespaces/shop/events");
    assert_eq!(event["reason"], "ServiceExportConflict");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "ServiceExport");
    assert_eq!(event["regarding"]["name"], "web");
    assert_eq!(event["regarding"]["uid"], "ab12");
    assert!(event["note"].as_str().unwrap().contains("PortConflict"));
    reply(send, 201, &event);

    // The same view again: nothing. The conflict resolved: Conflict=False, no Event.
    view_tx.send_replace(Some(view_of_web(true)));
    view_tx.send_replace(Some(view_of_web(false)));
    let (method, _, body, send) = next_call(&mut handle, &calls).await;
    assert_eq!(method, http::Method::PATCH);
    let c = conditions_by_type(&body);
    assert_eq!(
        (&c["Conflict"]["status"], &c["Conflict"]["reason"]),
        (&json!("False"), &json!("NoConflicts"))
    );
    reply(send, 200, &obj);

    // Conflict again: the Event again (one per transition; Kubernetes counts the repeat in
    // the Event's series). Then the Service goes: Valid=False NoService, Ready=False Failed.
    view_tx.send_replace(Some(view_of_web(true)));
    let (_, _, body, send) = next_call(&mut handle, &calls).await;
    assert_eq!(conditions_by_type(&body)["Conflict"]["status"], "True");
    reply(send, 200, &obj);
    let (method, path, event, send) = next_call(&mut handle, &calls).await;
    assert_eq!(method, http::Method::PATCH);
    assert!(
        path.starts_with("/apis/events.k8s.io/v1/namespaces/shop/events/web."),
        "{path}"
    );
    assert_eq!(event["series"]["count"], 2);
    reply(send, 200, &event);
    tx.send_replace(ExportStatuses::from([(web(), status(false, "NoService"))]));
    let (_, _, body, send) = next_call(&mut handle, &calls).await;
    let c = conditions_by_type(&body);
    assert_eq!(c["Valid"]["reason"], "NoService");
    assert_eq!(c["Ready"]["reason"], "Failed");
    assert!(!c.contains_key("Conflict"));
    reply(send, 200, &obj);
    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(calls.count("create", "events"), 1);
    assert_eq!(calls.count("patch", "events"), 1);
    calls.assert_allowed_by_the_chart();
}

/// Peers come from the API with their preshared keys from the labelled Secrets of the
/// controller's namespace; a Peer naming a Secret that is not there gets no key (and is
/// refused for it downstream); a deleted Peer goes.
#[tokio::test]
async fn peers_and_their_preshared_keys_come_from_the_api() {
    let (client, api, server, calls) = fake_api_server(|_| {});
    let rec = Recorder::default();
    let source = tokio::spawn(trellis_controller::kube_source::run_with_options(
        client,
        rec.clone(),
        trellis_controller::kube_source::SourceOptions {
            debounce: Duration::from_millis(20),
            network_policy: false,
            preshared_key_namespace: Some(common::RELEASE_NAMESPACE.into()),
        },
    ));
    let s = rec
        .wait("both peers, the laptop with its key", |s| {
            s.external_peers.len() == 2
                && s.external_peers[0]
                    .preshared_key
                    .as_ref()
                    .is_some_and(|k| k.key.is_ok())
        })
        .await;
    let laptop = &s.external_peers[0];
    assert_eq!(laptop.name, "laptop");
    assert_eq!(
        laptop.uid.as_deref(),
        Some("5d1c0f7e-2a41-4e0b-9b8e-5a7c1d2e3f40")
    );
    assert_eq!(laptop.allowed_ips, ["10.10.250.1/32"]);
    assert_eq!(laptop.nodes, ["east-worker"]);
    assert_eq!(laptop.persistent_keepalive, Some(25));
    let key = laptop.preshared_key.as_ref().unwrap();
    assert_eq!(key.secret, "laptop-psk");
    assert_eq!(key.key.as_ref().unwrap().0, [9; 32]);
    let vm = &s.external_peers[1];
    let missing = vm.preshared_key.as_ref().unwrap().key.as_ref().unwrap_err();
    assert!(missing.contains("no Secret"), "{missing}");

    let mut gone = fixture("peers.json")["items"][1].clone();
    gone["metadata"]["deletionTimestamp"] = json!(null);
    api.lock()
        .unwrap()
        .push(PEERS, "Peer", "trellis.dev/v1alpha1", "DELETED", gone);
    let s = rec
        .wait("the vm's Peer deleted", |s| s.external_peers.len() == 1)
        .await;
    assert_eq!(s.external_peers[0].name, "laptop");
    source.abort();
    server.abort();
    calls.assert_allowed_by_the_chart();
}

/// Each Peer gets its Ready condition from the controller's verdict, written only when it
/// changes; its transition time stays while the status does.
#[tokio::test]
async fn peers_get_their_ready_condition() {
    use trellis_controller::kube_source::write_peer_statuses;
    use trellis_core::external_peer::{Admission, Verdict};
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (view_tx, view_rx) = tokio::sync::watch::channel(None);
    let writer = tokio::spawn(write_peer_statuses(client, view_rx));
    let calls = common::Calls::default();
    let vm = fixture("peers.json")["items"][1].clone();
    let since = vm["status"]["conditions"][0]["lastTransitionTime"].clone();
    let known = vm["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    let view = |ready: bool, reason: &str, message: &str| {
        let mut v = std::sync::Arc::try_unwrap(view_of_web(false)).unwrap();
        let mut admission = Admission::default();
        admission.verdicts.insert(
            "vm".into(),
            Verdict {
                ready,
                reason: reason.into(),
                message: message.into(),
            },
        );
        v.external_peers = std::sync::Arc::new(admission);
        std::sync::Arc::new(v)
    };
    // The same verdict the object has: read, nothing written.
    view_tx.send_replace(Some(view(false, "NoGateway", &known)));
    let (method, path, _, send) = next_call_any(&mut handle, &calls).await;
    assert_eq!(method, http::Method::GET);
    assert_eq!(path, "/apis/trellis.dev/v1alpha1/peers/vm");
    reply(send, 200, &vm);

    // Accepted: Ready=True, a new transition time.
    view_tx.send_replace(Some(view(true, "Accepted", "attached")));
    let (method, path, body, send) = next_call_any(&mut handle, &calls).await;
    assert_eq!(method, http::Method::PATCH);
    assert_eq!(path, "/apis/trellis.dev/v1alpha1/peers/vm/status");
    // A status apply carries no spec (the API server validates it merged with the object's).
    let mut schema = common::crd_schema("peers.trellis.dev", "v1alpha1");
    schema["required"] = json!([]);
    let errors = common::validate_against_crd(&schema, &body);
    assert!(errors.is_empty(), "{body}: {errors:#?}");
    let c = conditions_by_type(&body);
    assert_eq!(
        (&c["Ready"]["status"], &c["Ready"]["reason"]),
        (&json!("True"), &json!("Accepted"))
    );
    assert_ne!(c["Ready"]["lastTransitionTime"], since);
    reply(send, 200, &vm);

    // Refused again: Ready=False with the reason and message.
    view_tx.send_replace(Some(view(false, "Overlaps", "Overlaps message")));
    let (_, _, body, send) = next_call_any(&mut handle, &calls).await;
    let c = conditions_by_type(&body);
    assert_eq!(
        (&c["Ready"]["status"], &c["Ready"]["reason"]),
        (&json!("False"), &json!("Overlaps"))
    );
    assert_eq!(c["Ready"]["message"], "Overlaps message");
    reply(send, 200, &vm);

    // The same again: nothing written.
    view_tx.send_replace(Some(view(false, "Overlaps", "Overlaps message")));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), handle.next_request())
            .await
            .is_err(),
        "an unchanged verdict writes nothing"
    );
    writer.abort();
    calls.assert_allowed_by_the_chart();
}

/// A Peer deleted and re-created under its name with the same spec (the source may never
/// see it gone: watch events coalesce) gets its condition written on the new object: the
/// writer knows objects by uid, not by name.
#[tokio::test]
async fn a_peer_re_created_under_its_name_gets_its_condition_again() {
    use trellis_controller::kube_source::write_peer_statuses;
    use trellis_core::external_peer::{Admission, Verdict};
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (view_tx, view_rx) = tokio::sync::watch::channel(None);
    let writer = tokio::spawn(write_peer_statuses(client, view_rx));
    let calls = common::Calls::default();
    let vm = fixture("peers.json")["items"][1].clone();
    let first_uid = vm["metadata"]["uid"].as_str().unwrap().to_string();
    let view = |uid: &str| {
        let mut v = std::sync::Arc::try_unwrap(view_of_web(false)).unwrap();
        let mut admission = Admission::default();
        admission.verdicts.insert(
            "vm".into(),
            Verdict {
                ready: true,
                reason: "Accepted".into(),
                message: "attached to node east-worker with 10.10.250.2/32".into(),
            },
        );
        admission.uids.insert("vm".into(), uid.into());
        v.external_peers = std::sync::Arc::new(admission);
        std::sync::Arc::new(v)
    };
    view_tx.send_replace(Some(view(&first_uid)));
    let (method, _, _, send) = next_call_any(&mut handle, &calls).await;
    assert_eq!(method, http::Method::GET);
    reply(send, 200, &vm);
    let (method, path, _, send) = next_call_any(&mut handle, &calls).await;
    assert_eq!(method, http::Method::PATCH);
    assert_eq!(path, "/apis/trellis.dev/v1alpha1/peers/vm/status");
    reply(send, 200, &vm);

    // `trellis peer remove vm` then `add vm` with the same spec: a new object, no status.
    let mut again = vm.clone();
    again["metadata"]["uid"] = json!("7f00aa11-0000-4000-8000-000000000001");
    again["metadata"]["resourceVersion"] = json!("2107");
    again.as_object_mut().unwrap().remove("status");
    view_tx.send_replace(Some(view("7f00aa11-0000-4000-8000-000000000001")));
    let (method, path, _, send) = next_call_any(&mut handle, &calls).await;
    assert_eq!(
        (method, path.as_str()),
        (http::Method::GET, "/apis/trellis.dev/v1alpha1/peers/vm")
    );
    reply(send, 200, &again);
    let (method, path, body, send) = next_call_any(&mut handle, &calls).await;
    assert_eq!(method, http::Method::PATCH);
    assert_eq!(path, "/apis/trellis.dev/v1alpha1/peers/vm/status");
    assert_eq!(
        body["metadata"]["uid"], again["metadata"]["uid"],
        "written only to the new object"
    );
    let c = conditions_by_type(&body);
    assert_eq!(
        (&c["Ready"]["status"], &c["Ready"]["reason"]),
        (&json!("True"), &json!("Accepted"))
    );
    reply(send, 200, &again);
    writer.abort();
    calls.assert_allowed_by_the_chart();
}

/// As [`next_call`], for a GET (no body) too.
async fn next_call_any(
    handle: &mut Handle,
    calls: &common::Calls,
) -> (http::Method, String, Value, Send) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request")
        .unwrap();
    calls.record(&req);
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (method, path, body, send)
}
