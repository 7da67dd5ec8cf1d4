//! Peering benchmark, two controllers over real QUIC + mTLS on 127.0.0.1 in one process:
//!
//! 1. MCS propagation: each change exports a new service in cluster A (unexporting the
//!    previous one) and changes a node's gateway key, timed until cluster B's imports stream
//!    (what DNS and the ServiceImport writer follow) carries the new import with its clusterset
//!    VIP (B allocates them: `clustersetIPRanges` configured) and A's endpoints, and until B's
//!    gateway stream carries the key; p50/p99 over N changes (default 1,000);
//! 2. full sync: A exports S services with E endpoints each (default 10,000 x 10 = 100,000
//!    endpoints); B (allocating a VIP for each) starts and the time until B's mesh view holds
//!    all of them is measured, with the process's peak RSS (both controllers and the
//!    generator: an upper bound for one).
//!
//! `cargo bench -p trellis-controller --bench mesh [-- --changes N --services S --endpoints E]`

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use trellis_controller::agent::{GatewaySubscription, ImportsSubscription};
use trellis_controller::certs::{self, Validity};
use trellis_controller::gateway::{GatewayRegistration, GatewayUpdate};
use trellis_controller::hub::{Hub, HubConfig};
use trellis_controller::metrics::Metrics;
use trellis_controller::peering::{PeerConfig, Peering, PeeringConfig};
use trellis_controller::source::SourceState;
use trellis_controller::tls::TlsMaterial;
use trellis_core::cluster::{
    ClusterId, Endpoint, ExportedService, NodeGateway, NodeState, Protocol, PublicKey, ServiceKind,
    ServicePort,
};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn id(s: &str) -> ClusterId {
    s.parse().unwrap()
}

fn node(name: &str, cidr: &str, key: u8) -> NodeState {
    NodeState {
        name: name.into(),
        pod_cidrs: vec![cidr.parse().unwrap()],
        internal_ips: vec![],
        gateway: Some(NodeGateway {
            // One address per key: a remote node at a local node's address would be refused.
            endpoint: SocketAddr::from(([192, 0, 2, key], 51820)),
            public_key: PublicKey([key; 32]),
        }),
    }
}

fn svc(i: usize, endpoints: usize, base: u32) -> ExportedService {
    ExportedService {
        namespace: format!("ns-{}", i % 100),
        name: format!("svc-{i}"),
        kind: ServiceKind::ClusterSetIP,
        cluster_ips: vec![std::net::Ipv4Addr::from(0x0a60_0000 + i as u32).into()],
        ports: vec![ServicePort::new(Some("http".into()), Protocol::Tcp, 80)],
        endpoints: (0..endpoints)
            .map(|e| Endpoint {
                addresses: vec![std::net::Ipv4Addr::from(base + (i * endpoints + e) as u32).into()],
                hostname: None,
                node: Some("a-0".into()),
                ready: true,
            })
            .collect(),
        endpoint_ports: vec![],
        properties: Default::default(),
    }
}

fn source(nodes: Vec<NodeState>, services: Vec<ExportedService>) -> SourceState {
    SourceState {
        cluster_id: None,
        service_cidrs: vec![],
        nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        services: services.into_iter().map(|s| (s.key(), s)).collect(),
        ..Default::default()
    }
}

fn hub(name: &str, svc_cidr: &str) -> Hub {
    Hub::new(
        HubConfig {
            id: id(name),
            name: name.into(),
            service_cidrs: vec![svc_cidr.parse().unwrap()],
            lease: Duration::from_secs(30),
            node_encryption: false,
            recent_deltas: 256,
            startup_grace: Duration::ZERO,
        },
        Metrics::new().unwrap(),
    )
}

fn peering(
    h: &Hub,
    tls: TlsMaterial,
    sock: UdpSocket,
    peer: &str,
    dial: Option<SocketAddr>,
) -> Peering {
    Peering::start_on(
        PeeringConfig {
            listen: sock.local_addr().unwrap(),
            peers: vec![PeerConfig {
                id: id(peer),
                endpoint: dial,
            }],
            heartbeat: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            max_frame: 256 << 20,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            max_pending_handshakes: 16,
            tls,
        },
        h.clone(),
        sock,
    )
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let changes = arg("--changes", 1000);
    let services = arg("--services", 10_000);
    let endpoints = arg("--endpoints", 10);
    let ca = certs::generate_ca("bench", Validity::days_from_now(1)).unwrap();
    let tls = |c: &str| {
        // Each cluster may claim 10.0.0.0/7 (where the bench numbers everything: the full
        // sync's endpoints are in 11.0.0.0/8).
        let leaf = certs::generate_cluster_cert_with_ranges(
            &ca,
            &id(c),
            &["10.0.0.0/7".parse().unwrap()],
            Validity::days_from_now(1),
        )
        .unwrap();
        TlsMaterial {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
        }
    };

    // 1. Change latency.
    let a = hub("a", "10.96.0.0/16");
    let b = hub("b", "10.97.0.0/16");
    let vip_range: ipnet::IpNet = "10.200.0.0/16".parse().unwrap();
    b.set_clusterset_ip_ranges(vec![vip_range]);
    a.set_source(source(
        vec![node("a-0", "10.1.0.0/24", 1)],
        vec![svc(0, 1, 0x0a01_0000)],
    ));
    b.set_source(source(vec![node("b-0", "10.2.0.0/24", 2)], vec![]));
    let (sa, aa) = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    };
    let sb = UdpSocket::bind("127.0.0.1:0").unwrap();
    let pa = peering(&a, tls("a"), sa, "b", None);
    let pb = peering(&b, tls("b"), sb, "a", Some(aa));
    let mut dns = ImportsSubscription::new(&b);
    let mut gw = GatewaySubscription::new(
        &b,
        GatewayRegistration {
            node: "b-0".into(),
            endpoint: "192.0.2.2:51820".parse().unwrap(),
            public_key: PublicKey([2; 32]),
        },
    );
    // Wait for the initial sync.
    let mut imports = trellis_core::imports::Imports::default();
    while !imports.services.contains_key("ns-0/svc-0") {
        let u = dns.next().await.unwrap();
        assert!(imports.apply(&u));
    }
    let mut desired = None;
    loop {
        let u = gw.next().await.unwrap();
        match (&mut desired, &u) {
            (None, GatewayUpdate::Snapshot(s)) => desired = Some(s.clone()),
            (Some(d), u) => assert!(d.apply(u)),
            _ => {}
        }
        if desired.as_ref().is_some_and(|d| !d.peers.is_empty()) {
            break;
        }
    }
    let mut desired = desired.unwrap();
    let mut dns_lat = Vec::with_capacity(changes);
    let mut gw_lat = Vec::with_capacity(changes);
    for i in 1..=changes {
        let key = PublicKey([(i % 250) as u8 + 3; 32]);
        let n = node("a-0", "10.1.0.0/24", (i % 250) as u8 + 3);
        // svc-0 stays; svc-i is the new export (svc-(i-1) is unexported).
        let s = svc(i, 1 + i % 5, 0x0a01_0000 + (i * 8) as u32);
        let wanted = format!("{}/{}", s.namespace, s.name);
        let want_eps = s.endpoints.clone();
        let t0 = Instant::now();
        a.set_source(source(vec![n], vec![svc(0, 1, 0x0a01_0000), s]));
        let (mut dns_done, mut gw_done) = (None, None);
        while dns_done.is_none() || gw_done.is_none() {
            tokio::select! {
                u = dns.next(), if dns_done.is_none() => {
                    let u = u.unwrap();
                    assert!(imports.apply(&u));
                    if let Some(import) = imports.services.get(&wanted)
                        && import.vips.first().is_some_and(|v| vip_range.contains(v))
                        && import.backends[0].endpoints == want_eps
                    {
                        dns_done = Some(t0.elapsed());
                    }
                }
                u = gw.next(), if gw_done.is_none() => {
                    let u = u.unwrap();
                    assert!(desired.apply(&u));
                    if desired.peers.iter().any(|p| p.public_key == key) {
                        gw_done = Some(t0.elapsed());
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("change {i} did not arrive"),
            }
        }
        dns_lat.push(dns_done.unwrap());
        gw_lat.push(gw_done.unwrap());
    }
    dns_lat.sort();
    gw_lat.sort();
    println!("change latency over {changes} changes (A's source -> B's streams):");
    println!(
        "  new export -> B's import with its VIP and endpoints:  p50 {:?}  p99 {:?}  max {:?}",
        percentile(&dns_lat, 0.5),
        percentile(&dns_lat, 0.99),
        dns_lat.last().unwrap()
    );
    println!(
        "  node key -> B's gateway stream:                         p50 {:?}  p99 {:?}  max {:?}",
        percentile(&gw_lat, 0.5),
        percentile(&gw_lat, 0.99),
        gw_lat.last().unwrap()
    );
    drop(dns);
    drop(gw);
    pb.shutdown().await;
    pa.shutdown().await;

    // 2. Full sync.
    let rss_before = rss_mb("VmRSS:");
    let a = hub("c", "10.98.0.0/16");
    let t_gen = Instant::now();
    let big: Vec<ExportedService> = (0..services)
        .map(|i| svc(i, endpoints, 0x0b00_0000))
        .collect();
    a.set_source(source(vec![node("a-0", "10.3.0.0/16", 1)], big));
    let gen_time = t_gen.elapsed();
    let rss_a = rss_mb("VmRSS:");
    let b = hub("d", "10.99.0.0/16");
    b.set_clusterset_ip_ranges(vec!["10.200.0.0/16".parse().unwrap()]);
    b.set_source(source(vec![node("d-0", "10.4.0.0/24", 2)], vec![]));
    let (sa, aa) = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    };
    let sb = UdpSocket::bind("127.0.0.1:0").unwrap();
    let pa = peering(&a, tls("c"), sa, "d", None);
    let mut view = b.subscribe_view();
    let t0 = Instant::now();
    let pb = peering(&b, tls("d"), sb, "c", Some(aa));
    loop {
        let done = view.borrow_and_update().as_ref().is_some_and(|v| {
            v.remotes
                .iter()
                .any(|r| r.services.len() == services && r.endpoint_count() == services * endpoints)
        });
        if done {
            break;
        }
        tokio::time::timeout(Duration::from_secs(60), view.changed())
            .await
            .expect("full sync within a minute")
            .unwrap();
    }
    let sync = t0.elapsed();
    let (imported, with_vip) = b.subscribe_view().borrow().as_ref().map_or((0, 0), |v| {
        (
            v.imports.services.len(),
            v.imports
                .services
                .values()
                .filter(|s| !s.vips.is_empty())
                .count(),
        )
    });
    println!(
        "full sync of {services} services / {} endpoints: {sync:?} (state built in {gen_time:?}; {imported} imported services in B's DNS view, {with_vip} with a VIP)",
        services * endpoints,
    );
    let rss_after = rss_mb("VmRSS:");
    println!(
        "process RSS: {rss_before:.0} MB before, {rss_a:.0} MB with A's state, {rss_after:.0} MB after B synced (peak {:.0} MB): A ~{:.0} MB, B ~{:.0} MB",
        rss_mb("VmHWM:"),
        rss_a - rss_before,
        rss_after - rss_a
    );
    pb.shutdown().await;
    pa.shutdown().await;
}
