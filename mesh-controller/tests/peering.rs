//! Two and three controllers peering over real QUIC with mutual TLS on 127.0.0.1, in one
//! process, on ephemeral ports; and the refusals: unknown CA, expired certificate, a cluster
//! claiming another's identity, an unconfigured cluster, malformed and oversized frames, and
//! overlapping CIDRs.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use trellis_controller::certs::{self, CertifiedKey, Validity};
use trellis_controller::gateway::GatewayRegistration;
use trellis_controller::hub::{Hub, HubConfig};
use trellis_controller::metrics::Metrics;
use trellis_controller::peering::{PeerConfig, Peering, PeeringConfig};
use trellis_controller::source::SourceState;
use trellis_controller::tls::{TlsMaterial, client_config};
use trellis_core::cluster::fixture::{cluster, export, id, service};
use trellis_core::cluster::{ClusterId, PublicKey};
use trellis_core::peering::{Message, encode_frame};

/// Long enough that no test but the one about leases sees a lease run out, however loaded
/// the machine (a large snapshot may take seconds to cross on two busy cores).
const LEASE: Duration = Duration::from_secs(30);
/// The lease of the test that waits for one to run out.
const SHORT_LEASE: Duration = Duration::from_secs(3);
/// Gateways and DNS wait this long after a start for peers that never connect.
const STARTUP_GRACE: Duration = Duration::from_millis(1500);
/// What `eventually` waits at most: far beyond what a passing test needs.
const WAIT: Duration = Duration::from_secs(30);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

struct Mesh {
    ca: CertifiedKey,
}

impl Mesh {
    fn new() -> Self {
        Self::named("test")
    }

    fn named(name: &str) -> Self {
        Self {
            ca: certs::generate_ca(name, Validity::days_from_now(1)).unwrap(),
        }
    }

    /// A cluster's certificate; it may claim anything in 10.0.0.0/8 (the tests' clusters
    /// number themselves there).
    fn material(&self, cluster: &str) -> TlsMaterial {
        let leaf = certs::generate_cluster_cert_with_ranges(
            &self.ca,
            &id(cluster),
            &["10.0.0.0/8".parse().unwrap()],
            Validity::days_from_now(1),
        )
        .unwrap();
        TlsMaterial {
            ca_pem: self.ca.cert_pem.clone(),
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
        }
    }
}

fn source(pod: &str, svc_cidr: &str) -> SourceState {
    let c = cluster("x", pod, svc_cidr);
    SourceState {
        cluster_id: None,
        service_cidrs: c.service_cidrs,
        nodes: c.nodes,
        services: BTreeMap::new(),
        ..Default::default()
    }
}

fn socket() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

struct Controller {
    hub: Hub,
    peering: Option<Peering>,
    /// Where its peering endpoint listens.
    addr: SocketAddr,
}

/// The peering configuration of every controller here: fast heartbeats and redials, so that
/// the tests wait on the mesh and not on timers.
fn peering_config(
    listen: SocketAddr,
    peers: &[(&str, Option<SocketAddr>)],
    lease: Duration,
    max_frame: usize,
    tls: TlsMaterial,
) -> PeeringConfig {
    PeeringConfig {
        listen,
        peers: peers
            .iter()
            .map(|(p, a)| PeerConfig {
                id: id(p),
                endpoint: *a,
            })
            .collect(),
        heartbeat: Duration::from_millis(200),
        lease,
        max_frame,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        max_pending_handshakes: 16,
        tls,
    }
}

/// A QUIC client endpoint on 127.0.0.1 using `cfg`: the hand-driven clients of the refusals.
fn client_endpoint(cfg: rustls::ClientConfig) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(cfg).unwrap(),
    )));
    ep
}

/// Clusters a (pod and service CIDRs `a_src`) and b (`b_src`) of `mesh`, b dialing a; a dials
/// b back if `a_dials`, and also accepts the clusters `a_also` (which never dial).
fn pair(
    mesh: &Mesh,
    a_dials: bool,
    a_also: &[&str],
    a_src: SourceState,
    b_src: SourceState,
) -> (Controller, Controller) {
    let (sa, aa) = socket();
    let (sb, ab) = socket();
    let mut a_peers = vec![("b", a_dials.then_some(ab))];
    a_peers.extend(a_also.iter().map(|c| (*c, None)));
    let a = start("a", mesh.material("a"), sa, &a_peers, a_src);
    let b = start("b", mesh.material("b"), sb, &[("a", Some(aa))], b_src);
    (a, b)
}

/// The CIDRs a and b use unless a test is about them.
fn source_a() -> SourceState {
    source("10.1.0.0/24", "10.96.0.0/16")
}

fn source_b() -> SourceState {
    source("10.2.0.0/24", "10.97.0.0/16")
}

fn start(
    name: &str,
    material: TlsMaterial,
    sock: UdpSocket,
    peers: &[(&str, Option<SocketAddr>)],
    src: SourceState,
) -> Controller {
    start_with_lease(name, material, sock, peers, src, LEASE)
}

fn start_with_lease(
    name: &str,
    material: TlsMaterial,
    sock: UdpSocket,
    peers: &[(&str, Option<SocketAddr>)],
    src: SourceState,
    lease: Duration,
) -> Controller {
    let hub = Hub::new(
        HubConfig {
            id: id(name),
            name: format!("cluster {name}"),
            service_cidrs: vec![],
            lease,
            node_encryption: false,
            recent_deltas: 64,
            startup_grace: STARTUP_GRACE,
        },
        Metrics::new().unwrap(),
    );
    hub.set_source(src);
    let addr = sock.local_addr().unwrap();
    let cfg = peering_config(addr, peers, lease, 64 << 20, material);
    let peering = Peering::start_on(cfg, hub.clone(), sock).unwrap();
    Controller {
        hub,
        peering: Some(peering),
        addr,
    }
}

impl Controller {
    async fn stop(&mut self) {
        if let Some(p) = self.peering.take() {
            p.shutdown().await;
        }
    }

    fn sees(&self, cluster: &str) -> bool {
        self.hub.remote_states().contains_key(&id(cluster))
    }

    fn metric(&self, needle: &str) -> bool {
        self.hub.metrics().render().contains(needle)
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    trellis_test_support::eventually_async(what, WAIT, || std::future::ready(cond().then_some(())))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_exchange_snapshots_then_deltas() {
    init_tracing();
    let mesh = Mesh::new();
    // Both dial each other: the connection dialed by "a" (the smaller ID) is kept on both sides.
    let (mut a, mut b) = pair(&mesh, true, &[], source_a(), source_b());
    eventually("a and b to see each other", || a.sees("b") && b.sees("a")).await;
    eventually("one connection each", || {
        a.metric("trellis_controller_remote_clusters_connected 1")
            && b.metric("trellis_controller_remote_clusters_connected 1")
    })
    .await;

    // A gateway registers on a: b's view gets a's node key.
    a.hub.register_gateway(GatewayRegistration {
        node: "node-0".into(),
        endpoint: "192.168.1.10:51820".parse().unwrap(),
        public_key: PublicKey([9; 32]),
    });
    // An export in a reaches b's DNS view as a delta.
    let mut src = source_a();
    export(
        &mut src.services,
        "shop",
        "web",
        "10.96.0.10",
        &["10.1.0.5"],
    );
    a.hub.set_source(src);
    let view = b.hub.subscribe_view();
    eventually("b to import shop/web with a's gateway", || {
        let v = view.borrow();
        let v = v.as_ref().unwrap();
        v.imports.services.contains_key("shop/web")
            && v.remotes
                .iter()
                .any(|r| r.nodes["node-0"].gateway.is_some())
    })
    .await;
    assert_eq!(
        b.hub.remote_states()[&id("a")].as_ref(),
        a.hub.local_state().as_ref(),
        "b's copy of a equals a's own state"
    );
    assert!(b.metric("trellis_controller_remote_cluster_ready{cluster=\"a\"} 1"));
    assert!(b.metric("trellis_controller_imported_services{cluster=\"a\"} 1"));
    a.stop().await;
    b.stop().await;
}

/// a's source with one pod per `(name, address, pod label)`, in namespace x on node-0.
fn source_a_with_pods(pods: &[(&str, &str, &str)]) -> SourceState {
    let mut src = source_a();
    src.policy.pods = pods
        .iter()
        .map(
            |(name, address, label)| trellis_controller::policy_source::PodInfo {
                namespace: "x".into(),
                name: (*name).into(),
                labels: [("pod".to_owned(), (*label).to_owned())].into(),
                node: "node-0".into(),
                addresses: vec![address.parse().unwrap()],
                named_ports: vec![],
            },
        )
        .collect();
    src
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_identities_and_pods_cross_the_mesh_and_false_ones_are_refused() {
    init_tracing();
    let mesh = Mesh::new();
    let (mut a, mut b) = pair(&mesh, true, &[], source_a(), source_b());
    a.hub.set_network_policy(true);
    b.hub.set_network_policy(true);
    eventually("a and b to see each other", || a.sees("b") && b.sees("a")).await;
    // a announces its pod "a" (an honest one) and "spoof", at one of b's own pod addresses.
    a.hub.set_source(source_a_with_pods(&[
        ("a", "10.1.0.5", "a"),
        ("spoof", "10.2.0.9", "a"),
    ]));
    let view = b.hub.subscribe_view();
    let remote_pods = |label: &str| {
        let v = view.borrow();
        let inputs = v.as_ref().unwrap().policy.clone().unwrap();
        inputs
            .endpoints
            .values()
            .filter(|e| e.cluster.as_str() == "a")
            .filter(|e| {
                inputs.identities[&e.identity_key()]
                    .labels
                    .pod_labels
                    .get("pod")
                    == Some(&label.to_owned())
            })
            .map(|e| e.name.clone())
            .collect::<Vec<_>>()
    };
    eventually("b's nodes to know a's pod", || remote_pods("a") == ["a"]).await;
    assert!(b.metric(
        "trellis_controller_refused_claims{kind=\"pod\",peer=\"a\",reason=\"outside_node\"} 1"
    ));
    // A relabel in a travels as a delta and reaches b's nodes.
    a.hub.set_source(source_a_with_pods(&[
        ("a", "10.1.0.5", "b"),
        ("spoof", "10.2.0.9", "a"),
    ]));
    eventually("b's nodes to see the relabel", || remote_pods("b") == ["a"]).await;
    assert_eq!(
        b.hub.remote_states()[&id("a")].pods,
        a.hub.local_state().pods,
        "b holds what a announced (admission filters the view, not the copy)"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_controllers_withdraw_a_silent_peer_after_its_lease_and_reconnect() {
    init_tracing();
    let mesh = Mesh::new();
    let (sa, aa) = socket();
    let (sb, ab) = socket();
    let (sc, ac) = socket();
    // Each dials the other two; c starts twice (the same configuration both times).
    let addrs = [("a", aa), ("b", ab), ("c", ac)];
    let start_one = |name: &str, sock: UdpSocket, src: SourceState| {
        let peers: Vec<_> = addrs
            .iter()
            .filter(|(peer, _)| *peer != name)
            .map(|(peer, addr)| (*peer, Some(*addr)))
            .collect();
        start_with_lease(name, mesh.material(name), sock, &peers, src, SHORT_LEASE)
    };
    let source_c = || source("10.3.0.0/24", "10.98.0.0/16");
    let mut a = start_one("a", sa, source_a());
    let mut b = start_one("b", sb, source_b());
    let mut c = start_one("c", sc, source_c());
    eventually("a full mesh", || {
        a.sees("b") && a.sees("c") && b.sees("a") && b.sees("c") && c.sees("a") && c.sees("b")
    })
    .await;

    // c goes away: a and b keep its state (disconnected) for a lease, then withdraw it.
    let stopped = tokio::time::Instant::now();
    c.stop().await;
    eventually("a to notice c is gone", || {
        a.metric("trellis_controller_remote_clusters_connected 1")
    })
    .await;
    assert!(
        a.sees("c") && b.sees("c"),
        "c's state must survive a short outage"
    );
    eventually("a and b to withdraw c", || !a.sees("c") && !b.sees("c")).await;
    // The lease counts from the last message heard (heartbeats every 200 ms).
    assert!(
        stopped.elapsed() >= SHORT_LEASE - Duration::from_millis(500),
        "withdrawn before the lease ran out: {:?}",
        stopped.elapsed()
    );
    let view = a.hub.subscribe_view();
    assert!(
        view.borrow()
            .as_ref()
            .unwrap()
            .remotes
            .iter()
            .all(|r| r.id != id("c"))
    );

    // c comes back on the same address: the others redial with backoff and resync.
    let sc = UdpSocket::bind(ac).unwrap();
    let mut c = start_one("c", sc, source_c());
    eventually("c back in the mesh", || {
        a.sees("c") && b.sees("c") && c.sees("a") && c.sees("b")
    })
    .await;
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

/// Connects with `material`, expecting the server to refuse it: with TLS 1.3 the client may
/// finish its side of the handshake before the server has checked its certificate, so wait
/// for the close too.
async fn refused(material: TlsMaterial, to: SocketAddr, server: &ClusterId) -> String {
    match rogue_connect(material, to, server).await {
        Err(e) => e.to_string(),
        Ok(conn) => {
            let closed = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = conn.open_bi().await;
                conn.closed().await
            })
            .await;
            format!("{:?}", closed.expect("the server closes the connection"))
        }
    }
}

/// A hand-driven client speaking the protocol with arbitrary bytes.
async fn rogue_connect(
    material: TlsMaterial,
    to: SocketAddr,
    server: &ClusterId,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let cfg = client_config(&material, Metrics::new().unwrap()).unwrap();
    let conn = client_endpoint(cfg)
        .connect(to, &certs::identity_name(server))
        .expect("a valid client configuration")
        .await?;
    Ok(conn)
}

/// Opens the stream, sends `bytes`, and waits for the server to close the connection.
async fn send_and_wait_close(conn: &quinn::Connection, bytes: &[u8]) -> String {
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    format!("{:?}", closed.expect("the server closes the connection"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_close_only_the_offending_connection() {
    init_tracing();
    let mesh = Mesh::new();
    let (mut a, mut b) = pair(&mesh, false, &["c"], source_a(), source_b());
    let aa = a.addr;
    eventually("a and b peered", || a.sees("b") && b.sees("a")).await;
    let before = b.hub.remote_states()[&id("a")].revision;

    // Unknown CA: a certificate for "c" from another mesh's CA (trusting a's CA).
    let other = Mesh::named("other");
    let mut foreign = other.material("c");
    foreign.ca_pem = mesh.ca.cert_pem.clone();
    let r = refused(foreign, aa, &id("a")).await;
    assert!(
        r.contains("UnknownCA") || r.contains("unknown") || r.contains("certificate"),
        "{r}"
    );
    eventually("unknown_ca counted", || {
        a.metric("trellis_controller_auth_failures_total{reason=\"unknown_ca\"} 1")
    })
    .await;

    // Expired certificate from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let old = certs::generate_cluster_cert(
        &mesh.ca,
        &id("c"),
        Validity {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
        },
    )
    .unwrap();
    let expired = TlsMaterial {
        ca_pem: mesh.ca.cert_pem.clone(),
        cert_pem: old.cert_pem,
        key_pem: old.key_pem,
    };
    refused(expired, aa, &id("a")).await;
    eventually("expired counted", || {
        a.metric("trellis_controller_auth_failures_total{reason=\"expired\"} 1")
    })
    .await;

    // A valid certificate of a cluster a does not peer with.
    refused(mesh.material("d"), aa, &id("a")).await;
    eventually("unknown_cluster counted", || {
        a.metric("trellis_controller_auth_failures_total{reason=\"unknown_cluster\"} 1")
    })
    .await;

    // A peer offering only a protocol version a does not speak.
    let mut cfg = client_config(&mesh.material("c"), Metrics::new().unwrap()).unwrap();
    cfg.alpn_protocols = vec![b"trellis/3".to_vec()];
    let err = client_endpoint(cfg)
        .connect(aa, "a.cluster.trellis")
        .unwrap()
        .await
        .unwrap_err();
    assert!(
        format!("{err}").contains("120") || format!("{err:?}").contains("crypto"),
        "{err:?}"
    );
    eventually("alpn counted", || {
        a.metric("trellis_controller_auth_failures_total{reason=\"alpn\"} 1")
    })
    .await;
    // A peer of the previous release, offering only version 1, still gets in (as version 1).
    let mut cfg = client_config(&mesh.material("c"), Metrics::new().unwrap()).unwrap();
    cfg.alpn_protocols = vec![b"trellis/1".to_vec()];
    let conn = client_endpoint(cfg)
        .connect(aa, "a.cluster.trellis")
        .unwrap()
        .await
        .expect("version 1 is still spoken");
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    assert_eq!(alpn.as_deref(), Some(&b"trellis/1"[..]));
    conn.close(0u32.into(), b"done");

    // A controller configured with another cluster's certificate refuses to start.
    let wrong = Peering::start_on(
        peering_config(
            "127.0.0.1:0".parse().unwrap(),
            &[],
            LEASE,
            1 << 20,
            mesh.material("c"),
        ),
        a.hub.clone(),
        UdpSocket::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap_err();
    let wrong = trellis_core::error_chain(&wrong);
    assert!(
        wrong.contains("the certificate is for cluster c, but this controller is cluster a"),
        "{wrong}"
    );

    // Dialing "b" but reaching a server with a's certificate: the dialer refuses.
    let dialer_metrics = Metrics::new().unwrap();
    let cfg = client_config(&mesh.material("c"), dialer_metrics.clone()).unwrap();
    let ep = client_endpoint(cfg);
    assert!(ep.connect(aa, "b.cluster.trellis").unwrap().await.is_err());
    assert!(
        dialer_metrics
            .render()
            .contains("trellis_controller_auth_failures_total{reason=\"identity_mismatch\"} 1")
    );

    // c's valid certificate, claiming to be b in its Hello.
    let conn = rogue_connect(mesh.material("c"), aa, &id("a"))
        .await
        .unwrap();
    let hello = encode_frame(
        &Message::Hello {
            cluster: id("b"),
            name: "b".into(),
        },
        1 << 20,
    )
    .unwrap();
    let closed = send_and_wait_close(&conn, &hello).await;
    assert!(closed.contains("claims to be cluster b"), "{closed}");
    assert!(a.metric("trellis_controller_auth_failures_total{reason=\"identity_mismatch\"} 1"));

    // Another cluster with its own valid certificate for "b" while b is connected.
    let twin = refused(mesh.material("b"), aa, &id("a")).await;
    assert!(
        twin.contains("two clusters claim the cluster ID b"),
        "{twin}"
    );
    assert!(a.metric("trellis_controller_auth_failures_total{reason=\"duplicate_cluster_id\"} 1"));
    assert!(
        b.metric("trellis_controller_remote_clusters_connected 1"),
        "the real b stays"
    );

    // Malformed and oversized frames from c close c's connection only.
    let conn = rogue_connect(mesh.material("c"), aa, &id("a"))
        .await
        .unwrap();
    let mut bytes = encode_frame(
        &Message::Hello {
            cluster: id("c"),
            name: "c".into(),
        },
        1 << 20,
    )
    .unwrap();
    bytes.extend_from_slice(&7u32.to_be_bytes());
    bytes.extend_from_slice(b"garbage");
    let closed = send_and_wait_close(&conn, &bytes).await;
    assert!(closed.contains("malformed frame"), "{closed}");
    let conn = rogue_connect(mesh.material("c"), aa, &id("a"))
        .await
        .unwrap();
    let closed = send_and_wait_close(&conn, &u32::MAX.to_be_bytes()).await;
    assert!(closed.contains("exceeds the limit"), "{closed}");
    assert!(a.metric("trellis_controller_protocol_failures_total{reason=\"malformed_frame\"} 1"));
    assert!(a.metric("trellis_controller_protocol_failures_total{reason=\"frame_too_large\"} 1"));

    // b never noticed: still connected, and still receiving a's deltas.
    let mut src = source_a();
    export(&mut src.services, "shop", "web", "10.96.0.10", &[]);
    a.hub.set_source(src);
    eventually("b to get a's next revision", || {
        b.hub.remote_states()[&id("a")].revision == before + 1
    })
    .await;
    assert!(
        !b.metric("trellis_controller_protocol_failures_total{"),
        "b saw a failure"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_cidrs_are_refused_with_status_and_metric() {
    init_tracing();
    let mesh = Mesh::new();
    let overlapping = source("10.1.0.128/25", "10.97.0.0/16");
    let (mut a, mut b) = pair(&mesh, false, &[], source_a(), overlapping);
    eventually("a to hold b's state", || a.sees("b")).await;
    // Only the overlapping node is refused (the local cluster keeps its range); b stays.
    let refused = |peer: &str| {
        format!(
            "trellis_controller_refused_claims{{kind=\"node\",peer=\"{peer}\",reason=\"local_range\"}} 1"
        )
    };
    eventually("b's node refused on a", || a.metric(&refused("b"))).await;
    let view = a.hub.subscribe_view();
    assert!(view.borrow().as_ref().unwrap().remotes[0].nodes.is_empty());
    let status = a.hub.status();
    assert!(
        status.remotes[0].refused_claims[0].contains("pod CIDR 10.1.0.128/25 overlaps"),
        "{status:?}"
    );
    // b refuses a's node too (it overlaps b's own CIDRs from b's point of view).
    eventually("a's node refused on b", || b.metric(&refused("a"))).await;
    // b renumbers: admitted whole.
    b.hub.set_source(source_b());
    eventually("b admitted on a", || {
        a.metric("trellis_controller_remote_cluster_ready{cluster=\"b\"} 1")
            && !a.metric(&refused("b"))
    })
    .await;
    // The metric and the view are published one after the other: wait for the view too.
    eventually("b's node in a's view", || {
        view.borrow()
            .as_ref()
            .is_some_and(|v| v.remotes.first().is_some_and(|r| r.nodes.len() == 1))
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// Both sides send multi-megabyte snapshots at once: neither may wait on the other's reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_snapshots_cross_without_deadlock() {
    init_tracing();
    let big = |pod: &str, svc_cidr: &str, base: u8| {
        let mut s = source(pod, svc_cidr);
        for i in 0..3000u32 {
            let eps: Vec<String> = (0..10u32)
                .map(|e| {
                    format!(
                        "10.{base}.{}.{}",
                        (i * 10 + e) / 250,
                        (i * 10 + e) % 250 + 1
                    )
                })
                .collect();
            let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
            let svc = service("shop", &format!("svc-{i}"), "10.96.0.10", &eps);
            s.services.insert(svc.key(), svc);
        }
        s
    };
    let mesh = Mesh::new();
    let (mut a, mut b) = pair(
        &mesh,
        true,
        &[],
        big("10.1.0.0/24", "10.96.0.0/16", 101),
        big("10.2.0.0/24", "10.97.0.0/16", 102),
    );
    eventually("both full states across", || {
        a.hub
            .remote_states()
            .get(&id("b"))
            .is_some_and(|s| s.services.len() == 3000)
            && b.hub
                .remote_states()
                .get(&id("a"))
                .is_some_and(|s| s.services.len() == 3000)
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// Initial packets as a client on a spoofed address sends them: made by a real QUIC client
/// (each connection attempt a fresh one), caught on a socket of ours, and replayed to `to`
/// from a socket that never reads, so no Retry or handshake answer reaches the "client".
async fn spoofed_initials(mesh: &Mesh, count: usize, to: SocketAddr) -> usize {
    let catcher = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let catcher_addr = catcher.local_addr().unwrap();
    let cfg = client_config(&mesh.material("c"), Metrics::new().unwrap()).unwrap();
    let client = client_endpoint(cfg);
    let attempts: Vec<_> = (0..count)
        .map(|_| client.connect(catcher_addr, "b.cluster.trellis").unwrap())
        .collect();
    let mut initials: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; 2048];
    while initials.len() < count {
        match tokio::time::timeout(Duration::from_secs(2), catcher.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => initials.push(buf[..n].to_vec()),
            _ => break,
        }
    }
    drop(attempts);
    for initial in &initials {
        catcher.send_to(initial, to).await.unwrap();
    }
    initials.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_spoofed_initials_does_not_keep_a_real_peer_out() {
    init_tracing();
    let mesh = Mesh::new();
    let (sa, _) = socket();
    let (sb, ab) = socket();
    let mut b = start("b", mesh.material("b"), sb, &[("a", None)], source_b());
    // More spoofed attempts than b has slots for pending handshakes (16 here).
    let sent = spoofed_initials(&mesh, 200, ab).await;
    assert!(sent >= 150, "only {sent} initials made");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    let mut a = start("a", mesh.material("a"), sa, &[("b", Some(ab))], source_a());
    eventually("a and b to peer", || a.sees("b") && b.sees("a")).await;
    let took = started.elapsed();
    eprintln!("peered {took:?} after {sent} spoofed initials");
    // Spoofed handshakes hold their slots for the handshake timeout (5 s, the lease being
    // longer): a real peer must get in well before they expire.
    assert!(
        took < Duration::from_millis(2500),
        "a real peer waited {took:?} behind spoofed handshakes"
    );
    a.stop().await;
    b.stop().await;
}

/// Certificates renewed under a running pair: `reload_tls` makes new handshakes use the new
/// certificate (a fresh client sees it) while the open connection stays up, so the peer never
/// loses the session (sampled every 20 ms over five heartbeats), and a change after the reload
/// still crosses. A certificate of another cluster is refused and the old one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_used_by_new_handshakes_without_a_peering_gap() {
    init_tracing();
    let mesh = Mesh::new();
    let (mut a, mut b) = pair(&mesh, false, &[], source_a(), source_b());
    let connected = |a: &Controller, b: &Controller| {
        a.metric("trellis_controller_remote_clusters_connected 1")
            && b.metric("trellis_controller_remote_clusters_connected 1")
            && a.sees("b")
            && b.sees("a")
    };
    eventually("a and b connected", || connected(&a, &b)).await;

    let renewed = mesh.material("a");
    let started = std::time::Instant::now();
    a.peering
        .as_ref()
        .unwrap()
        .reload_tls(&renewed)
        .expect("a renewed certificate loads");
    let reload = started.elapsed();
    // A new handshake gets the renewed certificate.
    let observer = refused_or_connected(mesh.material("c"), a.addr, &id("a")).await;
    let want = trellis_controller::tls::parse_certs(&renewed.cert_pem).unwrap();
    assert_eq!(
        observer,
        want[0].as_ref(),
        "a new handshake sees the new certificate"
    );
    // The open session never drops.
    for _ in 0..50 {
        assert!(connected(&a, &b), "the peering dropped after the reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And still carries changes.
    let mut src = source_a();
    export(
        &mut src.services,
        "shop",
        "web",
        "10.96.0.10",
        &["10.1.0.5"],
    );
    a.hub.set_source(src);
    let view = b.hub.subscribe_view();
    eventually("b imports shop/web after the reload", || {
        view.borrow()
            .as_ref()
            .is_some_and(|v| v.imports.services.contains_key("shop/web"))
    })
    .await;
    // Another cluster's certificate is refused; the renewed one stays.
    assert!(
        a.peering
            .as_ref()
            .unwrap()
            .reload_tls(&mesh.material("b"))
            .is_err()
    );
    let observer = refused_or_connected(mesh.material("c"), a.addr, &id("a")).await;
    assert_eq!(observer, want[0].as_ref());
    eprintln!("peering certificate reload took {reload:?}; no gap over 1 s (5 heartbeats)");
    a.stop().await;
    b.stop().await;
}

/// The certificate `server` presents to a new handshake (the client may be refused after).
async fn refused_or_connected(
    material: TlsMaterial,
    to: SocketAddr,
    server: &ClusterId,
) -> Vec<u8> {
    let cfg = client_config(&material, Metrics::new().unwrap()).unwrap();
    let endpoint = client_endpoint(cfg);
    let conn = endpoint
        .connect(to, &certs::identity_name(server))
        .unwrap()
        .await
        .expect("the handshake completes on the client's side");
    let identity = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .unwrap();
    identity[0].as_ref().to_vec()
}

/// A peer exporting 200,000 services over a real session: the quota (10,000) trips, the
/// receiving controller's memory stays bounded, and another peer's change still arrives at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_services_over_a_session_trip_the_quota_and_others_keep_flowing() {
    init_tracing();
    let mesh = Mesh::new();
    let (sa, aa) = socket();
    let (sb, _) = socket();
    let (sc, _) = socket();
    let mut flood = source_b();
    for i in 0..200_000u32 {
        let ip = format!("10.97.{}.{}", (i / 250) % 250, i % 250 + 1);
        let svc = service("load", &format!("s{i}"), &ip, &[]);
        flood.services.insert(svc.key(), svc);
    }
    let source_c = || source("10.3.0.0/24", "10.98.0.0/16");
    // b first, with its whole state built (it dials a, not yet there): what the process holds
    // after that is the flooding side's.
    let mut b = start("b", mesh.material("b"), sb, &[("a", Some(aa))], flood);
    eventually("b has composed its 200,000 services", || {
        b.hub.local_state().services.len() == 200_000
    })
    .await;
    let rss_before = trellis_test_support::rss_kib() / 1024;
    let mut a = start(
        "a",
        mesh.material("a"),
        sa,
        &[("b", None), ("c", None)],
        source_a(),
    );
    let mut c = start("c", mesh.material("c"), sc, &[("a", Some(aa))], source_c());
    let view = a.hub.subscribe_view();
    let admitted = |cluster: &str| {
        view.borrow().as_ref().and_then(|v| {
            v.remotes
                .iter()
                .find(|r| r.id == id(cluster))
                .map(|r| r.services.len())
        })
    };
    let started = std::time::Instant::now();
    eventually("a admits b's state (up to its quota) and c's", || {
        admitted("b").is_some_and(|n| n > 0) && admitted("c").is_some()
    })
    .await;
    let synced = started.elapsed();
    let kept = admitted("b").unwrap();
    assert!(
        kept <= 10_000,
        "ATTACK SUCCEEDED: {kept} services of one peer admitted"
    );
    assert!(
        a.metric(r#"reason="quota""#),
        "the quota refusal is counted"
    );
    let rss_after = trellis_test_support::rss_kib() / 1024;

    // c's next export reaches a as fast as ever.
    let mut next = source_c();
    let svc = service("shop", "new", "10.98.0.11", &["10.3.0.6"]);
    next.services.insert(svc.key(), svc);
    let changed = std::time::Instant::now();
    c.hub.set_source(next);
    eventually("c's new export reaches a", || {
        view.borrow()
            .as_ref()
            .is_some_and(|v| v.imports.services.contains_key("shop/new"))
    })
    .await;
    let latency = changed.elapsed();
    eprintln!(
        "200,000 services over a session: b synced to a in {synced:?}, {kept} admitted; \
         the process grew {} MiB ({rss_before} -> {rss_after}: a and c, and b's sending side); \
         c's change reached a in {latency:?}",
        rss_after.saturating_sub(rss_before)
    );
    assert!(
        latency < Duration::from_secs(1),
        "another peer's change took {latency:?} behind the flood"
    );
    // What a peer can make a controller hold is bounded by the snapshot byte limit (64 MiB of
    // JSON here), not by what it announces; this flood (about 24 MB) costs a few hundred MiB.
    assert!(
        rss_after.saturating_sub(rss_before) < 1536,
        "the flood grew the process from {rss_before} to {rss_after} MiB"
    );
    a.stop().await;
    b.stop().await;
    c.stop().await;
}
