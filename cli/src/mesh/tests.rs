//! `trellis mesh` against scripted API servers (real Kubernetes JSON, every request checked in
//! order) and a helm that records what it is asked to run.

use std::cell::RefCell;
use std::collections::BTreeMap;

use ipnet::IpNet;
use serde_json::{Value, json};
use trellis_controller::certs::{
    CertifiedKey, Validity, generate_ca, generate_cluster_cert_with_ranges,
};
use trellis_controller::tls::TlsMaterial;

use super::certificate::{self, read_leaf, tls_from_secret, verify};
use super::connect::{self, ConnectOptions, Side};
use super::enable::{self, CaSource, EnableOptions, Finish};
use super::helm::{Helm, HelmOutput, Target, shell_line};
use super::unix_now;
use crate::test_api::{Reply, Seen, created, not_found, ok, on, ordered as api, testdata};

const NS: &str = "/api/v1/namespaces/trellis-system";
/// Where `mesh enable` keeps the mesh CA by default: not the release namespace, whose Secrets
/// the controller may list.
const KUBE_SYSTEM: &str = "/api/v1/namespaces/kube-system";

/// A helm whose releases are canned values per context and whose changes are recorded.
#[derive(Default)]
struct RecordingHelm {
    releases: BTreeMap<String, Value>,
    changes: RefCell<Vec<String>>,
}

fn context_of(args: &[String]) -> String {
    let at = args.iter().position(|a| a == "--kube-context").unwrap();
    args[at + 1].clone()
}

impl Helm for RecordingHelm {
    fn read(&self, args: &[String]) -> anyhow::Result<HelmOutput> {
        assert_eq!(
            &args[..3],
            ["get", "values", "trellis"],
            "only reads values"
        );
        Ok(match self.releases.get(&context_of(args)) {
            Some(values) => HelmOutput::Success(format!("{values}\n")),
            None => HelmOutput::Failure("Error: release: not found".into()),
        })
    }

    fn change(&self, args: &[String]) -> anyhow::Result<()> {
        self.changes.borrow_mut().push(shell_line("helm", args));
        Ok(())
    }
}

fn nets(s: &[&str]) -> Vec<IpNet> {
    s.iter().map(|n| n.parse().unwrap()).collect()
}

fn c1_ranges() -> Vec<IpNet> {
    nets(&["10.11.0.0/16", "10.111.0.0/16"])
}

fn c2_ranges() -> Vec<IpNet> {
    nets(&["10.12.0.0/16", "10.112.0.0/16"])
}

fn target(context: &str) -> Target {
    Target {
        context: Some(context.into()),
        namespace: "trellis-system".into(),
    }
}

fn options(context: &str, finish: Finish) -> EnableOptions {
    EnableOptions {
        target: target(context),
        ca_namespace: "kube-system".into(),
        cluster_id: None,
        pod_cidrs: Vec::new(),
        service_cidrs: Vec::new(),
        peer_cidrs: None,
        finish,
        days: 365,
        chart: "helm/trellis".into(),
        value_files: Vec::new(),
        sets: vec!["image.tag=dev".into()],
        timeout: "5m".into(),
        helm_program: "helm".into(),
    }
}

/// A Secret as the API server returns it.
fn stored(mut secret: Value, name: &str) -> Value {
    secret["apiVersion"] = json!("v1");
    secret["kind"] = json!("Secret");
    secret["type"] = json!("Opaque");
    secret["metadata"]["uid"] = json!(format!("9c1d2e3f-0000-4000-8000-{:012x}", name.len()));
    secret["metadata"]["resourceVersion"] = json!("2107");
    secret["metadata"]["creationTimestamp"] = json!("2026-12-07T09:14:02Z");
    secret
}

fn ca_secret_json(ca: &CertifiedKey) -> Value {
    stored(
        serde_json::to_value(certificate::ca_secret("kube-system", ca)).unwrap(),
        "trellis-mesh-ca",
    )
}

/// A mesh CA as `trellis mesh enable` creates it on cluster `id`.
fn mesh_ca(id: &str) -> CertifiedKey {
    generate_ca(id, Validity::days_from_now(3650)).unwrap()
}

/// c1's and c2's certificates from `ca`, with their kind ranges.
fn kind_pair(ca: &CertifiedKey) -> (TlsMaterial, TlsMaterial) {
    (
        tls_material(ca, "c1", &c1_ranges()),
        tls_material(ca, "c2", &c2_ranges()),
    )
}

fn tls_material(ca: &CertifiedKey, id: &str, ranges: &[IpNet]) -> TlsMaterial {
    let leaf = generate_cluster_cert_with_ranges(
        ca,
        &id.parse().unwrap(),
        ranges,
        Validity::days_from_now(365),
    )
    .unwrap();
    TlsMaterial {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
    }
}

fn tls_secret_json(material: &TlsMaterial) -> Value {
    tls_secret_with_peers(material, &[])
}

/// The TLS Secret as `mesh enable --peer-cidr` writes it.
fn tls_secret_with_peers(material: &TlsMaterial, peer_ranges: &[IpNet]) -> Value {
    stored(
        serde_json::to_value(certificate::tls_secret(
            "trellis-system",
            material,
            peer_ranges,
        ))
        .unwrap(),
        "trellis-tls",
    )
}

/// A GET of Secret `name` under `namespace_path`: `Some` its body, `None` 404.
fn secret_get(namespace_path: &str, name: &str, body: Option<Value>) -> Reply {
    let path = format!("{namespace_path}/secrets/{name}");
    match body {
        Some(body) => on("GET", &path, ok(body)),
        None => on("GET", &path, not_found("secrets", name)),
    }
}

fn tls_absent() -> Reply {
    secret_get(NS, "trellis-tls", None)
}

fn tls_present(tls: &TlsMaterial) -> Reply {
    secret_get(NS, "trellis-tls", Some(tls_secret_json(tls)))
}

/// The server-side apply of the TLS Secret: 201 created, 200 replaced.
fn tls_applied(code: u16) -> Reply {
    on(
        "PATCH",
        &format!("{NS}/secrets/trellis-tls"),
        created().with_code(code),
    )
}

fn ca_absent() -> Reply {
    secret_get(KUBE_SYSTEM, "trellis-mesh-ca", None)
}

fn ca_present(ca: &CertifiedKey) -> Reply {
    secret_get(KUBE_SYSTEM, "trellis-mesh-ca", Some(ca_secret_json(ca)))
}

/// `enable` against an API server answering `replies` in order, every one of them asked: its
/// outcome, the requests, what it printed.
async fn enable_against(
    replies: Vec<Reply>,
    source: CaSource,
    options: &EnableOptions,
    helm: &RecordingHelm,
) -> (anyhow::Result<()>, Vec<Seen>, String) {
    let (client, server) = api(replies);
    let mut out = Vec::new();
    let outcome = enable::enable(&client, source, options, helm, &mut out).await;
    drop(client);
    (outcome, server.await.unwrap(), text(out))
}

/// What `enable` reads first of a kind cluster: its TLS Secret, namespace and ranges.
fn first_reads(tls: Reply, namespace: Reply) -> Vec<Reply> {
    let mut replies = vec![tls, namespace];
    replies.extend(kind_ranges("nodes-kind-c1.json"));
    replies
}

fn namespace_exists() -> Reply {
    on("GET", NS, ok(namespace_json()))
}

fn namespace_absent() -> Reply {
    on("GET", NS, not_found("namespaces", "trellis-system"))
}

fn namespace_json() -> Value {
    json!({"kind": "Namespace", "apiVersion": "v1",
           "metadata": {"name": "trellis-system", "uid": "2f3e4d5c-6b7a-4988-9a0b-1c2d3e4f5a6b",
                        "resourceVersion": "1530", "creationTimestamp": "2026-12-07T09:13:40Z",
                        "labels": {"kubernetes.io/metadata.name": "trellis-system"}},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn text(out: Vec<u8>) -> String {
    String::from_utf8(out).unwrap()
}

/// The TLS Secret a request carried, read back as the controller will.
fn written_tls(seen: &Seen) -> TlsMaterial {
    let secret = serde_json::from_value(seen.body.clone().unwrap()).unwrap();
    tls_from_secret(&secret).unwrap()
}

#[tokio::test]
async fn enable_on_a_fresh_kind_cluster_creates_the_ca_and_certificate_and_installs() {
    let mut replies = vec![
        tls_absent(),
        namespace_absent(),
        on("POST", "/api/v1/namespaces", created()),
    ];
    replies.extend(kind_ranges("nodes-kind-c1.json"));
    replies.extend([
        ca_absent(),
        on("POST", &format!("{KUBE_SYSTEM}/secrets"), created()),
        tls_applied(200),
    ]);
    let helm = RecordingHelm::default();
    let mut opts = options("kind-trellis-c1", Finish::Install);
    opts.cluster_id = Some("c1".parse().unwrap());
    let (outcome, seen, out) = enable_against(replies, CaSource::Own, &opts, &helm).await;
    outcome.unwrap();

    assert_eq!(
        seen[2].body.as_ref().unwrap()["metadata"]["name"],
        "trellis-system"
    );
    assert!(
        seen[4]
            .uri
            .contains("labelSelector=component%3Dkube-controller-manager"),
        "{}",
        seen[4].uri
    );
    let ca = certificate::ca_from_secret(
        &serde_json::from_value(seen[7].body.clone().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        certificate::subject_name(&ca.cert_pem),
        "Trellis mesh CA c1"
    );
    assert!(seen[8].uri.contains("fieldManager=trellis") && seen[8].uri.contains("force=true"));
    let applied = seen[8].body.as_ref().unwrap();
    assert_eq!(
        (&applied["apiVersion"], &applied["kind"], &applied["type"]),
        (&json!("v1"), &json!("Secret"), &Value::Null),
        "a whole object for server-side apply, its type left to the API server"
    );
    let tls = written_tls(&seen[8]);
    assert_eq!(tls.ca_pem, ca.cert_pem, "the Secret carries the mesh CA");
    verify(&tls, unix_now()).unwrap();
    let leaf = read_leaf(&tls.cert_pem).unwrap();
    assert_eq!(leaf.id.as_str(), "c1");
    assert_eq!(
        leaf.ranges,
        c1_ranges(),
        "kube-controller-manager's and ServiceCIDR's ranges"
    );

    assert_eq!(
        *helm.changes.borrow(),
        vec![
            "helm upgrade --install trellis helm/trellis --kube-context kind-trellis-c1 \
             --namespace trellis-system --reset-then-reuse-values --set cluster.id=c1 \
             --set image.tag=dev --wait --timeout 5m"
        ],
        "no cluster.serviceCIDRs: the controller reads the ServiceCIDR objects"
    );
    for line in [
        "context kind-trellis-c1: cluster c1",
        "namespace trellis-system: created",
        "pod ranges: 10.11.0.0/16 (kube-controller-manager --cluster-cidr)",
        "service ranges: 10.111.0.0/16 (ServiceCIDR kubernetes)",
        "mesh CA: \"Trellis mesh CA c1\" created in Secret kube-system/trellis-mesh-ca",
        "--ca-from-context kind-trellis-c1",
        "certificate c1.cluster.trellis: issued by \"Trellis mesh CA c1\"",
        "$ helm upgrade --install trellis",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
}

#[tokio::test]
async fn enable_keeps_the_mesh_ca_in_kube_system_never_in_the_release_namespace() {
    let mut replies = first_reads(tls_absent(), namespace_exists());
    replies.extend([
        ca_absent(),
        on("POST", &format!("{KUBE_SYSTEM}/secrets"), created()),
        tls_applied(200),
    ]);
    let mut opts = options("kind-trellis-c1", Finish::Print);
    opts.cluster_id = Some("c1".parse().unwrap());
    let (outcome, seen, out) =
        enable_against(replies, CaSource::Own, &opts, &RecordingHelm::default()).await;
    outcome.unwrap();

    let created_ca = &seen[6];
    let body = created_ca.body.as_ref().unwrap();
    assert_eq!(
        (&body["metadata"]["name"], &body["metadata"]["namespace"]),
        (&json!("trellis-mesh-ca"), &json!("kube-system"))
    );
    assert!(
        body["data"]["ca.key"].is_string(),
        "the key is kept: {body}"
    );
    for request in &seen {
        let in_release = request.uri.starts_with(&format!("{NS}/"));
        let text = format!("{} {:?}", request.uri, request.body);
        assert!(
            !(in_release && (text.contains("trellis-mesh-ca") || text.contains("ca.key"))),
            "the mesh CA in the release namespace: {request:#?}"
        );
    }
    assert!(
        out.contains("created in Secret kube-system/trellis-mesh-ca"),
        "{out}"
    );

    // Asked to keep it in the release namespace: refused before any request.
    opts.ca_namespace = "trellis-system".into();
    let (outcome, seen, _) =
        enable_against(vec![], CaSource::Own, &opts, &RecordingHelm::default()).await;
    let err = outcome.unwrap_err().to_string();
    assert!(seen.is_empty());
    assert!(
        err.contains("--ca-namespace trellis-system is Trellis's namespace"),
        "{err}"
    );
}

/// What a kind cluster answers for the range lookups.
fn kind_ranges(nodes: &str) -> Vec<Reply> {
    vec![
        on("GET", "/api/v1/nodes", ok(testdata(nodes))),
        on(
            "GET",
            "/api/v1/namespaces/kube-system/pods",
            ok(testdata("kube-controller-manager-pods.json")),
        ),
        on(
            "GET",
            "/apis/networking.k8s.io/v1/servicecidrs",
            ok(testdata("servicecidrs-kind.json")),
        ),
    ]
}

#[tokio::test]
async fn enable_again_keeps_the_ca_and_the_certificate_and_writes_nothing() {
    let ca = mesh_ca("c1");
    let tls = tls_material(&ca, "c1", &c1_ranges());
    let mut replies = first_reads(tls_present(&tls), namespace_exists());
    replies.push(ca_present(&ca));
    let helm = RecordingHelm::default();
    let opts = options("kind-trellis-c1", Finish::Print);
    let (outcome, seen, out) = enable_against(replies, CaSource::Own, &opts, &helm).await;
    outcome.unwrap();
    assert!(seen.iter().all(|s| s.method == "GET"), "{seen:#?}");
    assert!(
        out.contains("cluster c1"),
        "the ID from the certificate: {out}"
    );
    assert!(out.contains("namespace trellis-system: exists"), "{out}");
    assert!(
        out.contains("certificate c1.cluster.trellis: kept (from \"Trellis mesh CA c1\""),
        "{out}"
    );
    assert!(
        out.contains(
            "\nhelm upgrade --install trellis helm/trellis --kube-context kind-trellis-c1"
        ),
        "printed, not run: {out}"
    );
    assert!(helm.changes.borrow().is_empty());
}

#[tokio::test]
async fn a_second_cluster_inherits_the_first_ones_ca_with_ranges_given() {
    let ca = mesh_ca("c1");
    // c1 holds the CA; c2 is an older cluster: no ServiceCIDR API, no visible control plane,
    // so the user gives both ranges and the chart gets the service range. The user keeps the
    // CA in a namespace of their own (--ca-namespace).
    let (first, first_server) = api(vec![on(
        "GET",
        "/api/v1/namespaces/mesh-ca/secrets/trellis-mesh-ca",
        ok(ca_secret_json(&ca)),
    )]);
    let replies = vec![
        tls_absent(),
        namespace_exists(),
        on("GET", "/api/v1/nodes", ok(testdata("nodes-kind-c2.json"))),
        tls_applied(201),
    ];
    let helm = RecordingHelm::default();
    let mut opts = options("kind-trellis-c2", Finish::Print);
    opts.cluster_id = Some("c2".parse().unwrap());
    opts.pod_cidrs = nets(&["10.12.0.0/16"]);
    opts.service_cidrs = nets(&["10.112.0.0/16"]);
    opts.ca_namespace = "mesh-ca".into();
    let source = CaSource::Context {
        name: "kind-trellis-c1".into(),
        client: first,
    };
    let (outcome, seen, out) = enable_against(replies, source, &opts, &helm).await;
    outcome.unwrap();
    first_server.await.unwrap();
    let tls = written_tls(&seen[3]);
    assert!(certificate::same_ca(&tls.ca_pem, &ca.cert_pem), "c1's CA");
    verify(&tls, unix_now()).unwrap();
    assert_eq!(read_leaf(&tls.cert_pem).unwrap().ranges, c2_ranges());
    assert!(
        out.contains("from Secret mesh-ca/trellis-mesh-ca of context kind-trellis-c1"),
        "{out}"
    );
    assert!(
        out.contains("--set cluster.id=c2 --set-json 'cluster.serviceCIDRs=[\"10.112.0.0/16\"]'"),
        "{out}"
    );
    assert!(helm.changes.borrow().is_empty());
}

#[tokio::test]
async fn enable_dry_run_reads_but_writes_nothing() {
    let mut replies = first_reads(tls_absent(), namespace_absent());
    replies.push(ca_absent());
    let helm = RecordingHelm::default();
    let opts = options("kind-trellis-c1", Finish::DryRun);
    let (outcome, seen, out) = enable_against(replies, CaSource::Own, &opts, &helm).await;
    outcome.unwrap();
    assert!(seen.iter().all(|s| s.method == "GET"));
    for line in [
        "context kind-trellis-c1: cluster kind-trellis-c1",
        "namespace trellis-system: would be created",
        "mesh CA: \"Trellis mesh CA kind-trellis-c1\" would be created",
        "certificate kind-trellis-c1.cluster.trellis: would be issued",
        "would run: helm upgrade --install trellis helm/trellis --kube-context kind-trellis-c1",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
    assert!(helm.changes.borrow().is_empty());
}

#[tokio::test]
async fn enable_asks_for_what_it_cannot_tell_and_never_changes_an_identity() {
    // No kube-controller-manager visible (a managed cluster): the covering range is offered.
    let replies = vec![
        tls_absent(),
        namespace_exists(),
        on("GET", "/api/v1/nodes", ok(testdata("nodes-kind-c1.json"))),
        on(
            "GET",
            "/api/v1/namespaces/kube-system/pods",
            Reply::status(
                403,
                "Forbidden",
                "pods is forbidden: User \"dev\" cannot list resource \"pods\" in API group \"\" in the namespace \"kube-system\"",
            ),
        ),
    ];
    let helm = RecordingHelm::default();
    let opts = options("kind-trellis-c1", Finish::DryRun);
    let (outcome, _, _) = enable_against(replies, CaSource::Own, &opts, &helm).await;
    let err = format!("{:#}", outcome.unwrap_err());
    assert!(
        err.contains("10.11.0.0/24, 10.11.1.0/24")
            && err.contains("a range covering them is 10.11.0.0/23")
            && err.contains("--pod-cidr"),
        "{err}"
    );

    // A cluster already enabled as c1 is not renamed.
    let ca = mesh_ca("c1");
    let tls = tls_material(&ca, "c1", &c1_ranges());
    let mut opts = options("kind-trellis-c1", Finish::Install);
    opts.cluster_id = Some("c9".parse().unwrap());
    let (outcome, _, _) =
        enable_against(vec![tls_present(&tls)], CaSource::Own, &opts, &helm).await;
    let err = outcome.unwrap_err().to_string();
    assert!(
        err.contains("already cluster c1") && err.contains("--cluster-id c1"),
        "{err}"
    );
    assert!(helm.changes.borrow().is_empty());
}

#[tokio::test]
async fn a_certificate_to_reissue_from_a_ca_kept_elsewhere_is_refused_not_replaced() {
    // c2 joined c1's mesh; its ranges change, but c1's CA is not in c2.
    let ca = mesh_ca("c1");
    let tls = tls_material(&ca, "c2", &c2_ranges());
    let replies = vec![
        tls_present(&tls),
        namespace_exists(),
        on("GET", "/api/v1/nodes", ok(testdata("nodes-kind-c2.json"))),
        ca_absent(),
    ];
    let mut opts = options("kind-trellis-c2", Finish::Install);
    opts.pod_cidrs = nets(&["10.12.0.0/15"]);
    opts.service_cidrs = nets(&["10.112.0.0/16"]);
    let helm = RecordingHelm::default();
    let (outcome, seen, _) = enable_against(replies, CaSource::Own, &opts, &helm).await;
    let err = outcome.unwrap_err().to_string();
    assert!(seen.iter().all(|s| s.method == "GET"));
    assert!(
        err.contains("must be reissued")
            && err.contains("carries 10.12.0.0/16, 10.112.0.0/16")
            && err.contains("\"Trellis mesh CA c1\"")
            && err.contains("--ca-from-context"),
        "{err}"
    );
    assert!(helm.changes.borrow().is_empty());
}

/// What `connect` reads of one side whose peering Service is `service`.
fn side_replies(tls: &TlsMaterial, service: &str, nodes: Option<&str>) -> Vec<Reply> {
    let mut replies = vec![
        tls_present(tls),
        on(
            "GET",
            &format!("{NS}/services/trellis-peering"),
            ok(testdata(service)),
        ),
    ];
    if let Some(nodes) = nodes {
        replies.push(on("GET", "/api/v1/nodes", ok(testdata(nodes))));
    }
    replies
}

fn side(context: &str, client: kube::Client) -> Side {
    Side {
        target: target(context),
        client,
        endpoint: None,
    }
}

fn connect_options(dry_run: bool) -> ConnectOptions {
    ConnectOptions {
        chart: "helm/trellis".into(),
        dry_run,
        helm_program: "helm".into(),
    }
}

/// What `connect` reads of kind cluster c`n` with `tls`, whose peering Service is a NodePort.
fn nodeport_side(tls: &TlsMaterial, n: u8) -> Vec<Reply> {
    side_replies(
        tls,
        "service-peering-nodeport.json",
        Some(&format!("nodes-kind-c{n}.json")),
    )
}

/// `connect` from kind-trellis-c1 (dialed at `c1_endpoint` when given) to kind-trellis-c2,
/// their API servers answering `c1` and `c2` in order, every one asked: its outcome and what
/// it printed.
async fn connect_against(
    c1: Vec<Reply>,
    c2: Vec<Reply>,
    c1_endpoint: Option<&str>,
    dry_run: bool,
    helm: &RecordingHelm,
) -> (anyhow::Result<()>, String) {
    let ((client1, server1), (client2, server2)) = (api(c1), api(c2));
    let mut a = side("kind-trellis-c1", client1);
    a.endpoint = c1_endpoint.map(|e| e.parse().unwrap());
    let b = side("kind-trellis-c2", client2);
    let mut out = Vec::new();
    let outcome = connect::connect(&a, &b, &connect_options(dry_run), helm, &mut out).await;
    drop((a, b));
    server1.await.unwrap();
    server2.await.unwrap();
    (outcome, text(out))
}

fn releases(c1: Value, c2: Value) -> RecordingHelm {
    RecordingHelm {
        releases: BTreeMap::from([
            ("kind-trellis-c1".to_string(), c1),
            ("kind-trellis-c2".to_string(), c2),
        ]),
        changes: RefCell::default(),
    }
}

#[tokio::test]
async fn connect_updates_both_peer_lists_and_a_second_run_changes_nothing() {
    let ca = mesh_ca("c1");
    let (t1, t2) = kind_pair(&ca);
    let helm = releases(
        json!({"cluster": {"id": "c1"}, "image": {"tag": "dev"}}),
        json!({"cluster": {"id": "c2"}, "peers": [{"id": "c3", "endpoint": "192.0.2.7:7443"}]}),
    );
    let (r1, r2) = (nodeport_side(&t1, 1), nodeport_side(&t2, 2));
    let (outcome, out) = connect_against(r1, r2, None, false, &helm).await;
    outcome.unwrap();
    assert_eq!(
        *helm.changes.borrow(),
        vec![
            r#"helm upgrade trellis helm/trellis --kube-context kind-trellis-c1 --namespace trellis-system --reuse-values --set-json 'peers=[{"endpoint":"172.18.0.4:30743","id":"c2"}]'"#,
            r#"helm upgrade trellis helm/trellis --kube-context kind-trellis-c2 --namespace trellis-system --reuse-values --set-json 'peers=[{"endpoint":"192.0.2.7:7443","id":"c3"},{"endpoint":"172.18.0.2:30743","id":"c1"}]'"#,
        ]
    );
    for line in [
        "cluster c1 (context kind-trellis-c1): peers dial 172.18.0.2:30743 (NodePort 30743 on node trellis-c1-control-plane); it may claim 10.11.0.0/16, 10.111.0.0/16 (signed by \"Trellis mesh CA c1\")",
        "cluster c2 (context kind-trellis-c2): peers dial 172.18.0.4:30743",
        "$ helm upgrade trellis helm/trellis --kube-context kind-trellis-c1",
        "trellis status --context kind-trellis-c1 --wait",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }

    // Both releases as the upgrades left them: nothing to do.
    let helm = releases(
        json!({"cluster": {"id": "c1"}, "peers": [{"id": "c2", "endpoint": "172.18.0.4:30743"}]}),
        json!({"peers": [{"id": "c3", "endpoint": "192.0.2.7:7443"}, {"id": "c1", "endpoint": "172.18.0.2:30743"}]}),
    );
    let (r1, r2) = (nodeport_side(&t1, 1), nodeport_side(&t2, 2));
    let (outcome, out) = connect_against(r1, r2, None, false, &helm).await;
    outcome.unwrap();
    assert!(helm.changes.borrow().is_empty());
    assert!(
        out.contains("cluster c1 already peers with c2 at 172.18.0.4:30743: unchanged"),
        "{out}"
    );
    assert!(
        out.contains("cluster c2 already peers with c1 at 172.18.0.2:30743: unchanged"),
        "{out}"
    );
}

#[tokio::test]
async fn connect_dry_run_dials_a_load_balancer_and_runs_nothing() {
    let ca = mesh_ca("c1");
    let (t1, t2) = kind_pair(&ca);
    let r2 = side_replies(&t2, "service-peering-loadbalancer.json", None);
    let helm = releases(json!({}), json!({}));
    let (outcome, out) = connect_against(nodeport_side(&t1, 1), r2, None, true, &helm).await;
    outcome.unwrap();
    assert!(helm.changes.borrow().is_empty());
    assert!(
        out.contains(r#"would run: helm upgrade trellis helm/trellis --kube-context kind-trellis-c1 --namespace trellis-system --reuse-values --set-json 'peers=[{"endpoint":"203.0.113.10:7443","id":"c2"}]'"#),
        "{out}"
    );
    assert!(
        out.contains("peers dial 203.0.113.10:7443 (LoadBalancer ingress)"),
        "{out}"
    );
    assert!(
        out.contains("would run: helm upgrade trellis helm/trellis --kube-context kind-trellis-c2"),
        "{out}"
    );
}

#[tokio::test]
async fn connect_refuses_clusters_of_two_meshes_naming_the_fix() {
    let (ca1, ca2) = (mesh_ca("c1"), mesh_ca("c2"));
    let r1 = nodeport_side(&tls_material(&ca1, "c1", &c1_ranges()), 1);
    let r2 = nodeport_side(&tls_material(&ca2, "c2", &c2_ranges()), 2);
    let helm = releases(json!({}), json!({}));
    let err = connect_against(r1, r2, None, false, &helm)
        .await
        .0
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("do not share a mesh CA")
            && err.contains("\"Trellis mesh CA c1\" and \"Trellis mesh CA c2\"")
            && err.contains(
                "trellis mesh enable --context kind-trellis-c2 --ca-from-context kind-trellis-c1 --install"
            ),
        "{err}"
    );
    assert!(helm.changes.borrow().is_empty());
}

#[tokio::test]
async fn connect_refuses_overlapping_ranges_and_clusters_not_enabled() {
    let ca = mesh_ca("c1");
    let t1 = tls_material(&ca, "c1", &c1_ranges());
    let overlapping = tls_material(&ca, "c2", &nets(&["10.11.128.0/17", "10.112.0.0/16"]));
    let (r1, r2) = (nodeport_side(&t1, 1), nodeport_side(&overlapping, 2));
    let helm = releases(json!({}), json!({}));
    let refusal = |outcome: anyhow::Result<()>| outcome.unwrap_err().to_string();
    let err = refusal(connect_against(r1, r2, None, false, &helm).await.0);
    assert!(
        err.contains("overlapping ranges (10.11.0.0/16 and 10.11.128.0/17)"),
        "{err}"
    );

    // No certificate Secret: enable first.
    let err = refusal(
        connect_against(vec![tls_absent()], vec![], None, false, &helm)
            .await
            .0,
    );
    assert!(
        err.contains("no Secret trellis-system/trellis-tls")
            && err.contains("`trellis mesh enable --context kind-trellis-c1 --install` first"),
        "{err}"
    );

    // A certificate but no release.
    let helm = RecordingHelm::default();
    let err = refusal(
        connect_against(nodeport_side(&t1, 1), vec![], None, false, &helm)
            .await
            .0,
    );
    assert!(
        err.contains("no helm release trellis in namespace trellis-system"),
        "{err}"
    );
}

#[tokio::test]
async fn disconnect_removes_each_from_the_other_and_keeps_other_peers() {
    let ca = mesh_ca("c1");
    let secret = |tls: &TlsMaterial| vec![tls_present(tls)];
    let (c1, s1) = api(secret(&tls_material(&ca, "c1", &c1_ranges())));
    let (c2, s2) = api(secret(&tls_material(&ca, "c2", &c2_ranges())));
    let helm = releases(
        json!({"peers": [{"id": "c2", "endpoint": "172.18.0.4:30743"}]}),
        json!({"peers": [{"id": "c3", "endpoint": "192.0.2.7:7443"}, {"id": "c1", "endpoint": "172.18.0.2:30743"}]}),
    );
    connect::disconnect(
        &side("kind-trellis-c1", c1),
        &side("kind-trellis-c2", c2),
        &connect_options(false),
        &helm,
        &mut Vec::new(),
    )
    .await
    .unwrap();
    s1.await.unwrap();
    s2.await.unwrap();
    assert_eq!(
        *helm.changes.borrow(),
        vec![
            "helm upgrade trellis helm/trellis --kube-context kind-trellis-c1 --namespace trellis-system --reuse-values --set-json 'peers=[]'",
            r#"helm upgrade trellis helm/trellis --kube-context kind-trellis-c2 --namespace trellis-system --reuse-values --set-json 'peers=[{"endpoint":"192.0.2.7:7443","id":"c3"}]'"#,
        ]
    );
}

#[test]
fn a_context_name_becomes_a_cluster_id() {
    let id = |c: &str| enable::cluster_id_from_context(c).map(|i| i.to_string());
    assert_eq!(id("kind-trellis-c1").as_deref(), Some("kind-trellis-c1"));
    assert_eq!(
        id("arn:aws:eks:eu-west-1:123456789012:cluster/Prod").as_deref(),
        Some("arn-aws-eks-eu-west-1-123456789012-cluster-prod")
    );
    assert_eq!(id("--").as_deref(), None);
    assert_eq!(id(&"x".repeat(70)).map(|i| i.len()), Some(63));
}

#[tokio::test]
async fn enable_takes_what_a_concurrent_run_created_and_replaces_an_unusable_secret() {
    let theirs = mesh_ca("c1");
    // A Secret that names no mesh CA (a half-written one): nothing to keep it in.
    let mut broken = tls_secret_json(&tls_material(&theirs, "c1", &c1_ranges()));
    broken["data"].as_object_mut().unwrap().remove("tls.key");
    broken["data"].as_object_mut().unwrap().remove("ca.crt");
    let mut replies = vec![
        secret_get(NS, "trellis-tls", Some(broken)),
        namespace_absent(),
        on(
            "POST",
            "/api/v1/namespaces",
            Reply::status(
                409,
                "AlreadyExists",
                "namespaces \"trellis-system\" already exists",
            ),
        ),
    ];
    replies.extend(kind_ranges("nodes-kind-c1.json"));
    replies.extend([
        ca_absent(),
        on(
            "POST",
            &format!("{KUBE_SYSTEM}/secrets"),
            Reply::status(
                409,
                "AlreadyExists",
                "secrets \"trellis-mesh-ca\" already exists",
            ),
        ),
        ca_present(&theirs),
        tls_applied(200),
    ]);
    let mut opts = options("kind-trellis-c1", Finish::Print);
    opts.cluster_id = Some("c1".parse().unwrap());
    let (outcome, seen, out) =
        enable_against(replies, CaSource::Own, &opts, &RecordingHelm::default()).await;
    outcome.unwrap();
    let tls = written_tls(&seen[9]);
    assert!(
        certificate::same_ca(&tls.ca_pem, &theirs.cert_pem),
        "the CA already there"
    );
    verify(&tls, unix_now()).unwrap();
    for line in [
        "namespace trellis-system: exists",
        "mesh CA: \"Trellis mesh CA c1\", created meanwhile",
        "the Secret there is unusable: Secret trellis-tls has no key ca.crt",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
}

#[tokio::test]
async fn enable_issues_from_a_ca_directory_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = trellis_controller::certs::write_ca_files(
        dir.path(),
        "offline",
        Validity::days_from_now(3650),
        false,
    )
    .unwrap();
    let replies = || first_reads(tls_absent(), namespace_exists());
    let mut ok_replies = replies();
    ok_replies.push(tls_applied(201));
    let mut opts = options("kind-trellis-c1", Finish::Print);
    opts.cluster_id = Some("c1".parse().unwrap());
    let from_dir = || CaSource::Dir(dir.path().to_path_buf());
    let helm = RecordingHelm::default();
    let (outcome, seen, out) = enable_against(ok_replies, from_dir(), &opts, &helm).await;
    outcome.unwrap();
    let tls = written_tls(&seen[5]);
    assert!(certificate::same_ca(&tls.ca_pem, &ca.cert_pem));
    assert!(
        out.contains("issued by \"Trellis mesh CA offline\" from /"),
        "{out}"
    );

    // A key that is not the certificate's: refused before anything is written.
    let other = generate_ca("other", Validity::days_from_now(1)).unwrap();
    std::fs::write(dir.path().join("ca-key.pem"), other.key_pem).unwrap();
    let (outcome, seen, _) = enable_against(replies(), from_dir(), &opts, &helm).await;
    assert!(seen.iter().all(|s| s.method == "GET"));
    let err = format!("{:#}", outcome.unwrap_err());
    assert!(err.contains("does not sign for its certificate"), "{err}");
}

#[tokio::test]
async fn connect_takes_a_given_endpoint_and_refuses_a_release_of_another_cluster() {
    let ca = mesh_ca("c1");
    let (t1, t2) = kind_pair(&ca);
    // c1 behind NAT: its endpoint given, its Service not read.
    let helm = releases(json!({}), json!({}));
    let (r1, r2) = (vec![tls_present(&t1)], nodeport_side(&t2, 2));
    let (outcome, out) = connect_against(r1, r2, Some("198.51.100.1:7443"), true, &helm).await;
    outcome.unwrap();
    assert!(
        out.contains("peers dial 198.51.100.1:7443 (--endpoint)"),
        "{out}"
    );
    assert!(out.contains(r#"--kube-context kind-trellis-c2 --namespace trellis-system --reuse-values --set-json 'peers=[{"endpoint":"198.51.100.1:7443","id":"c1"}]'"#), "{out}");

    // c2's release was installed as c9: refused, nothing run.
    let helm = releases(json!({}), json!({"cluster": {"id": "c9"}}));
    let (r1, r2) = (nodeport_side(&t1, 1), nodeport_side(&t2, 2));
    let err = connect_against(r1, r2, None, false, &helm)
        .await
        .0
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cluster.id c9 but its certificate is cluster c2"),
        "{err}"
    );
    assert!(helm.changes.borrow().is_empty());
}

#[tokio::test]
async fn enable_never_reroots_a_cluster_whose_unusable_secret_names_another_mesh_ca() {
    // c2 joined c1's mesh (no CA of its own in kube-system); its trellis-tls lost tls.key.
    let theirs = mesh_ca("c1");
    let mut broken = tls_secret_json(&tls_material(&theirs, "c2", &c2_ranges()));
    broken["data"].as_object_mut().unwrap().remove("tls.key");
    let replies = vec![
        secret_get(NS, "trellis-tls", Some(broken)),
        namespace_exists(),
        on("GET", "/api/v1/nodes", ok(testdata("nodes-kind-c2.json"))),
        ca_absent(),
    ];
    let mut opts = options("kind-trellis-c2", Finish::Print);
    opts.cluster_id = Some("c2".parse().unwrap());
    opts.pod_cidrs = nets(&["10.12.0.0/16"]);
    opts.service_cidrs = nets(&["10.112.0.0/16"]);
    let (outcome, seen, _) =
        enable_against(replies, CaSource::Own, &opts, &RecordingHelm::default()).await;
    let err = format!("{:#}", outcome.unwrap_err());
    assert!(
        seen.iter().all(|s| s.method == "GET"),
        "nothing created or written: {seen:#?}"
    );
    assert!(
        err.contains("must be reissued")
            && err.contains("\"Trellis mesh CA c1\"")
            && err.contains("--ca-from-context"),
        "{err}"
    );
}

#[tokio::test]
async fn peer_ranges_are_signed_recorded_kept_on_a_re_run_and_checked() {
    let ca = mesh_ca("c1");
    let peers = nets(&["10.200.0.0/24"]);
    let mut replies = first_reads(tls_absent(), namespace_exists());
    replies.extend([ca_present(&ca), tls_applied(201)]);
    let mut opts = options("kind-trellis-c1", Finish::Print);
    opts.cluster_id = Some("c1".parse().unwrap());
    opts.peer_cidrs = Some(peers.clone());
    let (outcome, seen, out) =
        enable_against(replies, CaSource::Own, &opts, &RecordingHelm::default()).await;
    outcome.unwrap();
    let written = &seen[6];
    let tls = written_tls(written);
    let leaf = read_leaf(&tls.cert_pem).unwrap();
    assert_eq!(
        leaf.ranges,
        nets(&["10.11.0.0/16", "10.111.0.0/16", "10.200.0.0/24"]),
        "pods, services and the peer range"
    );
    assert_eq!(
        written.body.as_ref().unwrap()["metadata"]["annotations"]["trellis.dev/peer-cidrs"],
        "10.200.0.0/24",
        "which of them are for external machines"
    );
    assert!(
        out.contains("peer ranges: 10.200.0.0/24 (--peer-cidr)"),
        "{out}"
    );

    // Re-run without --peer-cidr: the recorded range stays signed, nothing is written.
    let kept = tls_material(
        &ca,
        "c1",
        &nets(&["10.11.0.0/16", "10.111.0.0/16", "10.200.0.0/24"]),
    );
    let mut replies = first_reads(
        secret_get(
            NS,
            "trellis-tls",
            Some(tls_secret_with_peers(&kept, &peers)),
        ),
        namespace_exists(),
    );
    replies.push(ca_present(&ca));
    opts.peer_cidrs = None;
    let (outcome, seen, out) =
        enable_against(replies, CaSource::Own, &opts, &RecordingHelm::default()).await;
    outcome.unwrap();
    assert!(seen.iter().all(|s| s.method == "GET"), "{seen:#?}");
    assert!(
        out.contains("peer ranges: 10.200.0.0/24 (recorded in Secret trellis-system/trellis-tls)")
            && out.contains("certificate c1.cluster.trellis: kept"),
        "{out}"
    );

    // A peer range inside the pod range is what it exists to avoid: refused, nothing written.
    opts.peer_cidrs = Some(nets(&["10.11.250.0/24"]));
    let replies = first_reads(tls_absent(), namespace_exists());
    let (outcome, seen, _) =
        enable_against(replies, CaSource::Own, &opts, &RecordingHelm::default()).await;
    let err = format!("{:#}", outcome.unwrap_err());
    assert!(seen.iter().all(|s| s.method == "GET"));
    assert!(
        err.contains("peer range 10.11.250.0/24 overlaps the pod range 10.11.0.0/16"),
        "{err}"
    );
}

#[tokio::test]
async fn connect_refuses_a_peer_range_one_cluster_signed_inside_the_others_ranges() {
    let ca = mesh_ca("c1");
    let t1 = tls_material(
        &ca,
        "c1",
        &nets(&["10.11.0.0/16", "10.111.0.0/16", "10.12.250.0/24"]),
    );
    let t2 = tls_material(&ca, "c2", &c2_ranges());
    let (r1, r2) = (nodeport_side(&t1, 1), nodeport_side(&t2, 2));
    let helm = releases(json!({}), json!({}));
    let err = connect_against(r1, r2, None, false, &helm)
        .await
        .0
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("overlapping ranges (10.12.250.0/24 and 10.12.0.0/16)")
            && err.contains("peer"),
        "{err}"
    );
}
