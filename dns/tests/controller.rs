//! The controller as the catalog source: a scripted agent server speaking the framing, then the
//! real `trellis-controller` hub and agent server on a static file. Everything on 127.0.0.1
//! with ephemeral ports; every wait is bounded.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use trellis_agent_client::{ClientConfig, Transport};
use trellis_core::agent::AgentHello;
use trellis_core::cluster::{Endpoint, Protocol, ServiceKind, ServicePort};
use trellis_core::framing::{FrameDecoder, encode_json_frame};
use trellis_core::imports::{Backend, ImportedService, Imports, ImportsUpdate};
use trellis_dns::Catalog;
use trellis_dns::subscription;

use common::*;
use trellis_test_support::eventually_async;

const WAIT: Duration = Duration::from_secs(10);

/// The answers to `name`/`qtype`, sorted; empty when there are none (NXDOMAIN, NODATA).
async fn answers(resolver: &TokioResolver, name: &str, qtype: RecordType) -> Vec<String> {
    match resolver.lookup(name, qtype).await {
        Ok(lookup) => {
            let mut out: Vec<String> = lookup
                .answers()
                .iter()
                .map(|r| r.data.to_string())
                .collect();
            out.sort();
            out
        }
        Err(_) => Vec::new(),
    }
}

/// Whether `name` is NXDOMAIN.
async fn nxdomain(resolver: &TokioResolver, name: &str) -> bool {
    match resolver.lookup(name, RecordType::A).await {
        Err(NetError::Dns(DnsError::NoRecordsFound(no))) => {
            no.response_code == ResponseCode::NXDomain
        }
        _ => false,
    }
}

async fn a(resolver: &TokioResolver, name: &str) -> Vec<String> {
    answers(resolver, name, RecordType::A).await
}

fn service(name: &str, kind: ServiceKind, backends: Vec<Backend>) -> ImportedService {
    ImportedService {
        namespace: "shop".into(),
        name: name.into(),
        kind,
        properties: Default::default(),
        oldest: "east".parse().unwrap(),
        conflicts: vec![],
        vips: vec![],
        ports: vec![ServicePort {
            name: Some("http".into()),
            protocol: Protocol::Tcp,
            port: 80,
            app_protocol: None,
        }],
        backends,
    }
}

fn backend(cluster: &str, local: bool, ips: &[&str], endpoints: &[(&str, &str)]) -> Backend {
    Backend {
        cluster: cluster.parse().unwrap(),
        endpoint_ports: vec![],
        exported_at: None,
        local,
        cluster_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        endpoints: endpoints
            .iter()
            .map(|(address, hostname)| Endpoint {
                addresses: vec![address.parse().unwrap()],
                hostname: Some(hostname.to_string()),
                node: None,
                ready: true,
            })
            .collect(),
    }
}

/// `web.shop` exported by east (its own ClusterIP 10.96.0.10), imported with the clusterset
/// IP 10.99.0.10.
fn web() -> ImportedService {
    let mut web = service(
        "web",
        ServiceKind::ClusterSetIP,
        vec![backend("east", true, &["10.96.0.10"], &[])],
    );
    web.vips = vec!["10.99.0.10".parse().unwrap()];
    web
}

fn db(endpoints: &[(&str, &str)]) -> ImportedService {
    service(
        "db",
        ServiceKind::Headless,
        vec![backend("west", false, &[], endpoints)],
    )
}

fn imports(revision: u64, services: Vec<ImportedService>) -> ImportsUpdate {
    let services: BTreeMap<String, ImportedService> = services
        .into_iter()
        .map(|s| (s.key().to_string(), s))
        .collect();
    ImportsUpdate::Snapshot(Imports { revision, services })
}

/// Accepts the next subscriber and checks its hello.
async fn accept(listener: &TcpListener) -> TcpStream {
    let (mut stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the subscriber reconnects")
        .unwrap();
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(hello) = decoder.next_json::<AgentHello>().unwrap() {
            assert_eq!(hello, AgentHello::dns(Some("tok".into())));
            return stream;
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("a hello")
            .unwrap();
        assert!(n > 0, "closed before its hello");
        decoder.push(&buf[..n]);
    }
}

async fn send(stream: &mut TcpStream, update: &ImportsUpdate) {
    stream
        .write_all(&encode_json_frame(update, "imports update", 1 << 20).unwrap())
        .await
        .unwrap();
}

/// A scripted controller speaks the deprecated plaintext mode (the framing is the same).
fn scripted_source(address: String) -> ClientConfig {
    ClientConfig {
        address,
        transport: Transport::LegacyToken(Some("tok".into())),
        max_frame: 1 << 16,
        resync: None,
        report: None,
    }
}

async fn errors(metrics: SocketAddr, reason: &str) -> f64 {
    metric(
        &scrape(metrics).await,
        "trellis_dns_controller_errors_total",
        &[("reason", reason)],
    )
}

/// Whether `name` exists without A records (NODATA: NOERROR, no answer).
async fn nodata(resolver: &TokioResolver, name: &str) -> bool {
    match resolver.lookup(name, RecordType::A).await {
        Err(NetError::Dns(DnsError::NoRecordsFound(no))) => {
            no.response_code == ResponseCode::NoError
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_scripted_controller() {
    let server = start(&Catalog::default(), vec![]).await;
    let metrics = server.running.metrics_addr.unwrap();
    let resolver = resolver(server.addr(), false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let subscriber = tokio::spawn(subscription::run(
        server.handle.clone(),
        scripted_source(listener.local_addr().unwrap().to_string()),
        server.metrics.clone(),
    ));
    const DB: &str = "db.shop.svc.clusterset.local.";
    const API: &str = "api.shop.svc.clusterset.local.";

    // A snapshot: the names resolve.
    let mut conn = accept(&listener).await;
    let both = [("10.2.0.5", "db-0"), ("10.2.0.6", "db-1")];
    send(&mut conn, &imports(1, vec![web(), db(&both)])).await;
    eventually_async("the snapshot", WAIT, || async {
        (a(&resolver, WEB).await == ["10.99.0.10"] && a(&resolver, DB).await.len() == 2)
            .then_some(())
    })
    .await;
    assert_eq!(
        a(&resolver, "db-1.west.db.shop.svc.clusterset.local.").await,
        ["10.2.0.6"]
    );
    // SRV at the bare name: the VIP's name for a ClusterSetIP import, each endpoint's name
    // for a headless one.
    assert_eq!(
        answers(&resolver, WEB, RecordType::SRV).await,
        ["0 100 80 web.shop.svc.clusterset.local."]
    );
    assert_eq!(
        answers(&resolver, DB, RecordType::SRV).await,
        [
            "0 50 80 db-0.west.db.shop.svc.clusterset.local.",
            "0 50 80 db-1.west.db.shop.svc.clusterset.local."
        ]
    );

    // A delta removing an endpoint: gone.
    let delta = ImportsUpdate::Delta {
        from: 1,
        to: 2,
        upsert: vec![db(&both[..1])],
        remove: vec![],
    };
    send(&mut conn, &delta).await;
    eventually_async("the delta", WAIT, || async {
        (a(&resolver, DB).await == ["10.2.0.5"]
            && nxdomain(&resolver, "db-1.west.db.shop.svc.clusterset.local.").await)
            .then_some(())
    })
    .await;

    // A garbage frame: the connection is closed, the last answers stay, a new snapshot applies.
    conn.write_all(b"\0\0\0\x05nope!").await.unwrap();
    let mut conn = accept(&listener).await;
    assert_eq!(errors(metrics, "malformed_frame").await, 1.0);
    assert_eq!(a(&resolver, WEB).await, ["10.99.0.10"]);
    let mut api = service(
        "api",
        ServiceKind::ClusterSetIP,
        vec![backend("west", false, &["10.97.0.20"], &[])],
    );
    api.vips = vec!["10.99.0.20".parse().unwrap()];
    send(&mut conn, &imports(10, vec![api.clone()])).await;
    eventually_async("the second snapshot", WAIT, || async {
        (a(&resolver, API).await == ["10.99.0.20"] && nxdomain(&resolver, WEB).await).then_some(())
    })
    .await;

    // An oversized frame, then a delta that does not follow: both reconnect.
    conn.write_all(&((1u32 << 16) + 1).to_be_bytes())
        .await
        .unwrap();
    let mut conn = accept(&listener).await;
    assert_eq!(errors(metrics, "oversized_frame").await, 1.0);
    let gap = ImportsUpdate::Delta {
        from: 3,
        to: 4,
        upsert: vec![web()],
        remove: vec![],
    };
    send(&mut conn, &gap).await;
    let mut conn = accept(&listener).await;
    assert_eq!(errors(metrics, "gap").await, 1.0);
    assert!(nxdomain(&resolver, WEB).await, "the gap was not applied");
    send(&mut conn, &imports(11, vec![api, web()])).await;
    eventually_async("the snapshot after the gap", WAIT, || async {
        (a(&resolver, WEB).await == ["10.99.0.10"]).then_some(())
    })
    .await;
    let text = scrape(metrics).await;
    assert_eq!(metric(&text, "trellis_dns_controller_connected", &[]), 1.0);
    assert_eq!(
        metric(&text, "trellis_dns_controller_updates_total", &[]),
        4.0
    );

    // The controller goes away: the last answers are still served.
    drop(conn);
    drop(listener);
    eventually_async("the disconnect", WAIT, || async {
        (metric(
            &scrape(metrics).await,
            "trellis_dns_controller_connected",
            &[],
        ) == 0.0)
            .then_some(())
    })
    .await;
    // A reconnect tried and failed (counted) before the answers are checked: what is served
    // after the controller vanished, not before.
    let failed = errors(metrics, "connect").await;
    eventually_async("a failed reconnect", WAIT, || async {
        (errors(metrics, "connect").await > failed).then_some(())
    })
    .await;
    assert_eq!(a(&resolver, WEB).await, ["10.99.0.10"]);
    assert_eq!(a(&resolver, API).await, ["10.99.0.20"]);
    subscriber.abort();
    server.running.shutdown();
}

/// The response code of `name`/A over UDP, with and without EDNS, and over TCP: all three
/// must agree (the fast path, the slow path and TCP tell the same truth).
async fn rcode(server: SocketAddr, name: &str) -> ResponseCode {
    let plain = udp_exchange(
        server,
        &query(name, RecordType::A, None),
        Duration::from_secs(2),
    )
    .await
    .expect("a UDP answer");
    let plain = hickory_proto::op::Message::from_vec(&plain).unwrap();
    let edns = ask(server, name, RecordType::A, false).await;
    let tcp = ask(server, name, RecordType::A, true).await;
    assert_eq!(plain.response_code, edns.response_code, "{name}");
    assert_eq!(plain.response_code, tcp.response_code, "{name}");
    if plain.response_code == ResponseCode::ServFail {
        // Nothing a cache could keep as the truth: not authoritative, no SOA.
        for m in [&plain, &edns, &tcp] {
            assert!(!m.authoritative && m.authorities.is_empty(), "{m:?}");
        }
    }
    plain.response_code
}

async fn readyz(metrics: SocketAddr) -> u16 {
    http_get(metrics, "/readyz").await.0
}

/// Started while its controller is unreachable, the server says SERVFAIL (not NXDOMAIN) for
/// in-zone names and is not ready; the first snapshot makes it answer and ready; a reconnect
/// later does not take that back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_and_not_ready_until_the_first_snapshot() {
    let server = start_config(test_config(vec![]), None).await;
    let (dns, metrics) = (server.addr(), server.running.metrics_addr.unwrap());
    // A port held but not listened on (yet): connections are refused, and no other test can
    // take the port before the controller comes up on it.
    let held = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    held.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let controller = held.local_addr().unwrap().as_socket().unwrap();
    let subscriber = tokio::spawn(subscription::run(
        server.handle.clone(),
        scripted_source(controller.to_string()),
        server.metrics.clone(),
    ));
    eventually_async("a failed connection", WAIT, || async {
        (errors(metrics, "connect").await >= 1.0).then_some(())
    })
    .await;
    for name in [WEB, "nope.shop.svc.clusterset.local.", "clusterset.local."] {
        assert_eq!(rcode(dns, name).await, ResponseCode::ServFail, "{name}");
    }
    assert_eq!(readyz(metrics).await, 503);
    assert_eq!(
        metric(&scrape(metrics).await, "trellis_dns_ready", &[]),
        0.0
    );

    // The controller comes up and sends its snapshot.
    held.listen(128).unwrap();
    held.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(held.into()).unwrap();
    let mut conn = accept(&listener).await;
    send(&mut conn, &imports(1, vec![web()])).await;
    eventually_async("the snapshot", WAIT, || async {
        (ask(dns, WEB, RecordType::A, false).await.response_code == ResponseCode::NoError)
            .then_some(())
    })
    .await;
    assert_eq!(rcode(dns, WEB).await, ResponseCode::NoError);
    assert_eq!(
        rcode(dns, "nope.shop.svc.clusterset.local.").await,
        ResponseCode::NXDomain
    );
    assert_eq!(readyz(metrics).await, 200);
    assert_eq!(
        metric(&scrape(metrics).await, "trellis_dns_ready", &[]),
        1.0
    );

    // The connection drops; reconnected, before any new snapshot: the last catalog, ready.
    drop(conn);
    let _conn = accept(&listener).await;
    assert_eq!(rcode(dns, WEB).await, ResponseCode::NoError);
    assert_eq!(readyz(metrics).await, 200);
    subscriber.abort();
    server.running.shutdown();
}

fn cluster_yaml(export: bool) -> String {
    let mut yaml = r#"apiVersion: about.k8s.io/v1alpha1
kind: ClusterProperty
metadata: {name: cluster.clusterset.k8s.io}
spec: {value: east}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: ["10.96.0.0/16"]}
---
apiVersion: v1
kind: Node
metadata: {name: east-node-0}
spec: {podCIDR: "10.10.0.0/24", podCIDRs: ["10.10.0.0/24"]}
status: {addresses: [{type: InternalIP, address: 127.0.0.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: "10.96.0.10", ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: ["10.10.0.5"], conditions: {ready: true}}]
ports: [{name: http, port: 8080, protocol: TCP}]
"#
    .to_string();
    if export {
        yaml.push_str(
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n\
             metadata: {name: web, namespace: shop}\n",
        );
    }
    yaml
}

/// The real controller (hub, static-file source, agent server over mutual TLS with the
/// cluster `east`'s agent certificates in `dir`) on `<dir>/east.yaml`, exporting `web.shop`.
/// Returns its agent address, the file and its tasks.
async fn real_controller(
    dir: &std::path::Path,
) -> (
    SocketAddr,
    std::path::PathBuf,
    Vec<tokio::task::JoinHandle<()>>,
) {
    real_controller_with(dir, false).await
}

/// Issues DNS's identity for the token "DNS's token" (the API checks are the controller's
/// `node_certs`, tested against a scripted API server).
#[derive(Debug)]
struct DnsIssuer(trellis_controller::certs::CertifiedKey);

impl trellis_controller::agent::NodeCertIssuer for DnsIssuer {
    fn issue<'a>(
        &'a self,
        subject: &'a trellis_controller::node_certs::Subject,
        token: &'a str,
        csr_pem: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<String, trellis_controller::node_certs::BootstrapRefusal>,
                > + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            if *subject != trellis_controller::node_certs::Subject::Dns || token != "DNS's token" {
                return Err(trellis_controller::node_certs::BootstrapRefusal::WrongServiceAccount);
            }
            trellis_controller::node_certs::sign_identity_certificate(
                &self.0,
                &dns_identity(),
                csr_pem,
            )
        })
    }
}

/// [`real_controller`], answering certificate requests when `bootstrap`.
async fn real_controller_with(
    dir: &std::path::Path,
    bootstrap: bool,
) -> (
    SocketAddr,
    std::path::PathBuf,
    Vec<tokio::task::JoinHandle<()>>,
) {
    use trellis_controller::hub::{Hub, HubConfig};

    let path = dir.join("east.yaml");
    std::fs::write(&path, cluster_yaml(true)).unwrap();
    let hub = Hub::new(
        HubConfig {
            id: "east".parse().unwrap(),
            name: "east".into(),
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
            lease: Duration::from_secs(30),
            node_encryption: false,
            recent_deltas: 16,
            startup_grace: Duration::ZERO,
        },
        trellis_controller::metrics::Metrics::new().unwrap(),
    );
    let source = tokio::spawn(trellis_controller::static_source::run(
        path.clone(),
        Duration::from_millis(100),
        hub.clone(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let files = agent_files(
        dir,
        &AgentIdentity::Controller {
            cluster: "east".into(),
        },
    );
    let auth = if bootstrap {
        let paths = trellis_controller::agent_certs::agent_files(
            dir,
            &AgentIdentity::Controller {
                cluster: "east".into(),
            },
        );
        let ca = trellis_controller::certs::CertifiedKey {
            cert_pem: std::fs::read_to_string(&paths.ca).unwrap(),
            key_pem: std::fs::read_to_string(&paths.ca_key).unwrap(),
        };
        trellis_controller::agent::AgentAuth::TlsWithBootstrap(
            std::sync::Arc::new(
                trellis_controller::agent::ServerTls::load_allowing_bootstrap(files).unwrap(),
            ),
            std::sync::Arc::new(DnsIssuer(ca)),
        )
    } else {
        trellis_controller::agent::AgentAuth::Tls(std::sync::Arc::new(
            trellis_controller::agent::ServerTls::load(files).unwrap(),
        ))
    };
    let agent = tokio::spawn(trellis_controller::agent::serve(
        listener,
        hub,
        1 << 20,
        auth,
    ));
    (addr, path, vec![source, agent])
}

const WEB: &str = "web.shop.svc.clusterset.local.";

use trellis_core::agent::AgentIdentity;

/// `identity`'s agent files in `dir`, issued (with the cluster's agent CA) on first use.
fn agent_files(dir: &std::path::Path, identity: &AgentIdentity) -> trellis_agent_client::TlsFiles {
    let files = trellis_controller::agent_certs::agent_files(dir, identity);
    if !files.cert.exists() {
        trellis_controller::agent_certs::write_agent_files(dir, identity, 1).unwrap();
    }
    trellis_agent_client::TlsFiles {
        ca: files.ca,
        cert: files.cert,
        key: files.key,
    }
}

fn dns_identity() -> AgentIdentity {
    AgentIdentity::Dns {
        cluster: "east".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_real_controller() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, path, tasks) = real_controller(dir.path()).await;
    let server = start(&Catalog::default(), vec![]).await;
    let resolver = resolver(server.addr(), false);
    let subscriber = tokio::spawn(subscription::run(
        server.handle.clone(),
        ClientConfig {
            address: addr.to_string(),
            transport: Transport::Tls(std::sync::Arc::new(
                trellis_agent_client::ClientTls::load(agent_files(dir.path(), &dns_identity()))
                    .unwrap(),
            )),
            max_frame: subscription::DEFAULT_MAX_FRAME,
            resync: None,
            report: None,
        },
        server.metrics.clone(),
    ));
    // The controller has no clusterset IP for the import (no derived Service in its file, no
    // ranges of its own): the name exists without addresses; the exporting cluster's own
    // ClusterIP (10.96.0.10) never stands in for one.
    eventually_async("the exported service", WAIT, || async {
        nodata(&resolver, WEB).await.then_some(())
    })
    .await;
    assert!(
        answers(&resolver, WEB, RecordType::SRV).await.is_empty(),
        "no SRV record points at a name without addresses"
    );

    // The export goes away: so does the name.
    std::fs::write(&path, cluster_yaml(false)).unwrap();
    eventually_async("the export removed", WAIT, || async {
        (nxdomain(&resolver, WEB).await).then_some(())
    })
    .await;
    subscriber.abort();
    for task in tasks {
        task.abort();
    }
    server.running.shutdown();
}

/// The `trellis-dns` process; killed (by its PID) and reaped on drop.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary as deployed: `--controller` and DNS's agent certificate against the real
/// controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_follows_the_real_controller() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, path, tasks) = real_controller(dir.path()).await;
    let files = agent_files(dir.path(), &dns_identity());
    binary_follows(addr, &path, tasks, |c| {
        c.arg("--agent-ca")
            .arg(&files.ca)
            .arg("--agent-cert")
            .arg(&files.cert)
            .arg("--agent-key")
            .arg(&files.key);
    })
    .await;
}

/// The binary as the chart runs it: no certificate, no cluster ID, only the agent CA and
/// DNS's token; it gets dns.east.trellis from the controller (after its server started)
/// and follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_bootstraps_its_identity_without_a_cluster_id() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, path, tasks) = real_controller_with(dir.path(), true).await;
    let ca = trellis_controller::agent_certs::agent_files(dir.path(), &dns_identity()).ca;
    let issued = tempfile::tempdir().unwrap();
    let token = issued.path().join("token");
    std::fs::write(&token, "DNS's token\n").unwrap();
    let (cert, key) = (
        issued.path().join("dns.pem"),
        issued.path().join("dns-key.pem"),
    );
    binary_follows(addr, &path, tasks, |c| {
        c.arg("--agent-ca")
            .arg(&ca)
            .arg("--agent-cert")
            .arg(&cert)
            .arg("--agent-key")
            .arg(&key)
            .arg("--agent-bootstrap-token")
            .arg(&token);
    })
    .await;
    let der =
        trellis_controller::tls::parse_certs(&std::fs::read_to_string(&cert).unwrap()).unwrap();
    assert_eq!(
        trellis_agent_client::tls::identities_of(&der[0]),
        [dns_identity()]
    );
}

/// Runs `trellis-dns` against the controller at `addr` with the agent flags `agent` adds,
/// and checks it serves the export in `path`, then its removal.
async fn binary_follows(
    addr: SocketAddr,
    path: &std::path::Path,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    agent: impl FnOnce(&mut std::process::Command),
) {
    use std::io::BufRead;

    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-dns"));
    command
        .args(["--listen", "127.0.0.1:0", "--metrics", "off"])
        .args([
            "--upstream",
            "127.0.0.1:9",
            "--controller",
            &addr.to_string(),
        ]);
    agent(&mut command);
    let child = command
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn trellis-dns");
    let mut process = Process(child);
    let stderr = process.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(common::strip_ansi(&line));
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut dns: Option<SocketAddr> = None;
    let mut log = Vec::new();
    while dns.is_none() && Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        if line.contains("serving") {
            dns = line
                .split_once("dns_addr=")
                .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok());
        }
        log.push(line);
    }
    let dns = dns.unwrap_or_else(|| panic!("trellis-dns did not start: {log:?}"));
    let resolver = resolver(dns, false);
    eventually_async("the exported service", WAIT, || async {
        nodata(&resolver, WEB).await.then_some(())
    })
    .await;
    std::fs::write(path, cluster_yaml(false)).unwrap();
    eventually_async("the export removed", WAIT, || async {
        (nxdomain(&resolver, WEB).await).then_some(())
    })
    .await;
    drop(process);
    for task in tasks {
        task.abort();
    }
}

/// The binary refuses a missing or double source, and an unreadable token file, at start.
#[test]
fn the_source_is_validated_at_start() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-dns"))
            .args(["--listen", "127.0.0.1:0", "--metrics", "off"])
            .args(["--upstream", "127.0.0.1:53"])
            .args(args)
            .output()
            .expect("run trellis-dns");
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let none = run(&[]);
    assert!(
        none.contains("--catalog") && none.contains("--controller"),
        "{none}"
    );
    let both = run(&[
        "--catalog",
        "/nonexistent.json",
        "--controller",
        "127.0.0.1:1",
    ]);
    assert!(both.contains("cannot be used with"), "{both}");
    let token_alone = run(&["--catalog", "/x.json", "--controller-token-file", "/t"]);
    assert!(token_alone.contains("controller"), "{token_alone}");
    let bad_addr = run(&["--controller", "nowhere"]);
    assert!(bad_addr.contains("HOST:PORT"), "{bad_addr}");
    let no_token = run(&[
        "--controller",
        "127.0.0.1:1",
        "--controller-token-file",
        "/nonexistent/token",
    ]);
    assert!(no_token.contains("/nonexistent/token"), "{no_token}");
    let bad_cidr = run(&["--catalog", "/x.json", "--forward-for", "10.0.0.0/33"]);
    assert!(
        bad_cidr.contains("--forward-for") && bad_cidr.contains("prefix"),
        "{bad_cidr}"
    );
}
