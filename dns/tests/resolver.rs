//! In-process tests: the server on 127.0.0.1 (ephemeral ports), hickory-resolver as client.

mod common;

use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_resolver::net::{DnsError, NetError};

use common::*;
use trellis_test_support::eventually_async;

const WAIT: Duration = Duration::from_secs(10);

fn ips(lookup: &hickory_resolver::lookup::Lookup) -> Vec<String> {
    lookup
        .answers()
        .iter()
        .map(|r| r.data.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_aaaa_srv_and_headless() {
    let server = start(&shop(), vec![]).await;
    let resolver = resolver(server.addr(), false);

    let a = resolver
        .lookup("web.shop.svc.clusterset.local.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(ips(&a), ["10.96.0.10"], "the clusterset IP");
    assert!(a.answers().iter().all(|r| r.ttl == 5));
    // Name, type, the answers' data in order.
    let cases: [(&str, RecordType, &[&str]); 7] = [
        (
            "web.shop.svc.clusterset.local.",
            RecordType::AAAA,
            &["fd00::10"],
        ),
        (
            "web.shop.svc.clusterset.local.",
            RecordType::SRV,
            &[
                "0 50 80 web.shop.svc.clusterset.local.",
                "0 50 53 web.shop.svc.clusterset.local.",
            ],
        ),
        (
            "_http._tcp.web.shop.svc.clusterset.local.",
            RecordType::SRV,
            &["0 100 80 web.shop.svc.clusterset.local."],
        ),
        (
            "_dns._udp.web.shop.svc.clusterset.local.",
            RecordType::SRV,
            &["0 100 53 web.shop.svc.clusterset.local."],
        ),
        (
            "db.shop.svc.clusterset.local.",
            RecordType::A,
            &["10.2.1.5", "10.2.1.6"],
        ),
        (
            "db-1.west.db.shop.svc.clusterset.local.",
            RecordType::A,
            &["10.2.1.6"],
        ),
        (
            "_pg._tcp.db.shop.svc.clusterset.local.",
            RecordType::SRV,
            &[
                "0 50 5432 db-0.west.db.shop.svc.clusterset.local.",
                "0 50 5432 db-1.west.db.shop.svc.clusterset.local.",
            ],
        ),
    ];
    for (name, rtype, want) in cases {
        assert_eq!(
            lookup_ips(&resolver, name, rtype).await,
            want,
            "{name} {rtype}"
        );
    }

    // The same over TCP only.
    let tcp = resolver_tcp(&server);
    assert_eq!(
        lookup_ips(&tcp, "web.shop.svc.clusterset.local.", RecordType::A).await,
        ["10.96.0.10"]
    );
    server.running.shutdown();
}

/// The answers' data for `name`/`rtype`, which must resolve: what most checks here compare.
async fn lookup_ips(
    resolver: &hickory_resolver::TokioResolver,
    name: &str,
    rtype: RecordType,
) -> Vec<String> {
    ips(&resolver.lookup(name, rtype).await.unwrap())
}

/// The response code, and whether an SOA came with it, for `name`/`rtype`, which must have
/// no records.
async fn lookup_none(
    resolver: &hickory_resolver::TokioResolver,
    name: &str,
    rtype: RecordType,
) -> (ResponseCode, bool) {
    no_records(&resolver.lookup(name, rtype).await.unwrap_err())
}

/// One raw UDP exchange of `query` (2 s wait), the answer parsed: for checks on what the
/// resolver library would hide (header bits, spelling, EDNS).
async fn raw_exchange(server: std::net::SocketAddr, query: &Message) -> Message {
    let answer = udp_exchange(server, &query.to_vec().unwrap(), Duration::from_secs(2))
        .await
        .unwrap();
    Message::from_vec(&answer).unwrap()
}

fn resolver_tcp(server: &TestServer) -> hickory_resolver::TokioResolver {
    resolver(server.addr(), true)
}

fn no_records(error: &NetError) -> (ResponseCode, bool) {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no)) => (no.response_code, no.soa.is_some()),
        other => panic!("expected no records, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_nodata_and_case() {
    let server = start(&shop(), vec![]).await;
    let resolver = resolver(server.addr(), false);
    // Name, type, the response code; each with the zone's SOA for negative caching.
    let cases = [
        (
            "nope.shop.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "web.shop.svc.clusterset.local.",
            RecordType::TXT,
            ResponseCode::NoError,
        ),
        (
            "db.shop.svc.clusterset.local.",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
        // An empty non-terminal exists.
        (
            "shop.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NoError,
        ),
        // No name picks one cluster's backends.
        (
            "east.web.shop.svc.clusterset.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
    ];
    for (name, rtype, rcode) in cases {
        assert_eq!(
            lookup_none(&resolver, name, rtype).await,
            (rcode, true),
            "{name} {rtype}"
        );
    }

    assert_eq!(
        lookup_ips(&resolver, "WeB.SHOP.svc.ClusterSet.LOCAL.", RecordType::A).await,
        ["10.96.0.10"]
    );
    // On the wire the question and answers keep the client's spelling (0x20 randomisation).
    for edns in [false, true] {
        let mut query = Message::new(9, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(
            Name::from_ascii("WeB.SHOP.svc.ClusterSet.LOCAL.").unwrap(),
            RecordType::A,
        ));
        if edns {
            query.set_edns(Edns::new());
        }
        let answer = raw_exchange(server.addr(), &query).await;
        assert_eq!(
            answer.queries[0].name().to_ascii(),
            "WeB.SHOP.svc.ClusterSet.LOCAL."
        );
        assert_eq!(
            answer.answers[0].name.to_ascii(),
            "WeB.SHOP.svc.ClusterSet.LOCAL."
        );
        assert_eq!(answer.edns.is_some(), edns);
    }
    assert_eq!(
        lookup_ips(
            &resolver,
            "DB-0.West.db.shop.svc.clusterset.local.",
            RecordType::A
        )
        .await,
        ["10.2.1.5"]
    );
    server.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_fallback_on_a_large_answer() {
    let server = start(&with_big(200), vec![]).await;
    // Raw UDP without EDNS: truncated, TC set, no partial answer.
    let mut query = Message::new(7, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(
        Name::from_ascii("big.shop.svc.clusterset.local.").unwrap(),
        RecordType::A,
    ));
    let answer = raw_exchange(server.addr(), &query).await;
    assert!(answer.truncation && answer.answers.is_empty());
    // With EDNS 4096: still too big for our 1232, truncated within 1232 bytes.
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    query.set_edns(edns);
    let bytes = udp_exchange(
        server.addr(),
        &query.to_vec().unwrap(),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert!(bytes.len() <= 1232 && Message::from_vec(&bytes).unwrap().truncation);

    // The resolver retries over TCP and gets all 200.
    let resolver = resolver(server.addr(), false);
    let big = resolver
        .lookup("big.shop.svc.clusterset.local.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(big.answers().len(), 200);
    let text = scrape(server.running.metrics_addr.unwrap()).await;
    assert!(metric(&text, "trellis_dns_truncated_answers_total", &[]) >= 2.0);
    server.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_and_servfails_when_upstream_fails() {
    let (upstream, udp_task, tcp_task) = upstream_stub().await;
    let server = start(&shop(), vec![upstream]).await;
    let resolver = resolver(server.addr(), false);
    assert_eq!(
        lookup_ips(&resolver, "www.example.test.", RecordType::A).await,
        ["192.0.2.1"]
    );
    assert_eq!(
        lookup_none(&resolver, "missing.org.", RecordType::A)
            .await
            .0,
        ResponseCode::NXDomain
    );
    let tcp = resolver_tcp(&server);
    assert_eq!(
        lookup_ips(&tcp, "tcp.example.test.", RecordType::A).await,
        ["192.0.2.1"]
    );
    // In-zone names are never forwarded.
    let a = resolver
        .lookup("web.shop.svc.clusterset.local.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(ips(&a), ["10.96.0.10"]);

    // The upstream goes silent: SERVFAIL within the upstream timeout, over UDP and TCP.
    udp_task.abort();
    tcp_task.abort();
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server2 = start(&shop(), vec![silent.local_addr().unwrap()]).await;
    for resolver in [
        resolver_tcp(&server2),
        common::resolver(server2.addr(), false),
    ] {
        let started = Instant::now();
        let error = resolver
            .lookup("www.example.test.", RecordType::A)
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))
            ),
            "{error:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // No upstream at all: SERVFAIL at once.
    let server3 = start(&shop(), vec![]).await;
    let error = common::resolver(server3.addr(), false)
        .lookup("www.example.test.", RecordType::A)
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))
    ));
    let text = scrape(server2.running.metrics_addr.unwrap()).await;
    // The resolver may retry a SERVFAIL over its other transport.
    assert!(
        metric(
            &text,
            "trellis_dns_upstream_failures_total",
            &[("reason", "timeout")]
        ) >= 2.0
    );
    assert!(metric(&text, "trellis_dns_forwarded_queries_total", &[]) >= 2.0);
    let text = scrape(server.running.metrics_addr.unwrap()).await;
    assert!(metric(&text, "trellis_dns_forwarded_queries_total", &[]) >= 3.0);
    server.running.shutdown();
    server2.running.shutdown();
    server3.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_endpoint_disappears_at_once() {
    let server = start(&shop(), vec![]).await;
    let resolver = resolver(server.addr(), false);
    assert_eq!(
        lookup_ips(&resolver, "db.shop.svc.clusterset.local.", RecordType::A).await,
        ["10.2.1.5", "10.2.1.6"]
    );

    let mut catalog = shop();
    catalog.revision = 2;
    catalog.services[1].clusters[0].endpoints.remove(1);
    server.handle.publish(&catalog);
    assert_eq!(
        lookup_ips(&resolver, "db.shop.svc.clusterset.local.", RecordType::A).await,
        ["10.2.1.5"]
    );
    assert_eq!(
        lookup_none(
            &resolver,
            "db-1.west.db.shop.svc.clusterset.local.",
            RecordType::A
        )
        .await
        .0,
        ResponseCode::NXDomain
    );

    // A cluster whose lease expired is left out by the controller: its endpoints are gone,
    // and a headless service without a ready endpoint has no name at all.
    catalog.services[1].clusters.retain(|c| c.cluster != "west");
    server.handle.publish(&catalog);
    for (name, rtype) in [
        ("db.shop.svc.clusterset.local.", RecordType::A),
        ("_pg._tcp.db.shop.svc.clusterset.local.", RecordType::SRV),
        ("db-0.west.db.shop.svc.clusterset.local.", RecordType::A),
    ] {
        assert_eq!(
            lookup_none(&resolver, name, rtype).await,
            (ResponseCode::NXDomain, true),
            "{name}"
        );
    }
    server.running.shutdown();
}

/// Whether the server (one UDP worker: it answers a socket's packets in order) leaves `packet`
/// unanswered: a good query sent right after it from the same socket is answered first, so
/// no answer to `packet` was sent before it (rather than none within some wait).
async fn unanswered(server: std::net::SocketAddr, packet: &[u8]) -> bool {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut probe = query("web.shop.svc.clusterset.local.", RecordType::A, None);
    probe[0..2].copy_from_slice(&0x7777u16.to_be_bytes());
    socket.send_to(&probe, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let len = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("the probe is answered")
        .unwrap();
    buf[..len].starts_with(&[0x77, 0x77])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_kills_the_server() {
    let server = start(&shop(), vec![]).await;
    let addr = server.addr();
    let mut query = Message::new(0x4242, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        Name::from_ascii("web.shop.svc.clusterset.local.").unwrap(),
        RecordType::A,
    ));
    let good = query.to_vec().unwrap();

    // Truncated query: FORMERR with the ID.
    let answer = udp_exchange(addr, &good[..good.len() - 2], Duration::from_secs(2))
        .await
        .unwrap();
    let answer = Message::from_vec(&answer).unwrap();
    assert_eq!(
        (answer.id, answer.response_code),
        (0x4242, ResponseCode::FormErr)
    );
    // Too short, a response, oversized: dropped (a good query is not: the check can fail).
    assert!(!unanswered(addr, &good).await);
    assert!(unanswered(addr, &[1, 2, 3]).await);
    let mut response = good.clone();
    response[2] |= 0x80;
    assert!(unanswered(addr, &response).await);
    let mut oversized = good.clone();
    oversized.resize(5000, 0);
    assert!(unanswered(addr, &oversized).await);
    // Random bytes, bounded in count.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..2000 {
        let len = 12 + (i % 300);
        let packet: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let mut packet = packet;
        packet[2] &= 0x7f; // mostly queries, so they are parsed
        let _ = socket.send_to(&packet, addr).await;
    }
    // Garbage over TCP: a bad frame closes the connection, nothing else.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(&[0, 3, 1, 2, 3, 0xff, 0xff, 9])
        .await
        .unwrap();
    drop(stream);

    let resolver = resolver(addr, false);
    let a = resolver
        .lookup("web.shop.svc.clusterset.local.", RecordType::A)
        .await
        .unwrap();
    assert_eq!(ips(&a), ["10.96.0.10"]);
    let text = scrape(server.running.metrics_addr.unwrap()).await;
    assert!(
        metric(
            &text,
            "trellis_dns_dropped_packets_total",
            &[("reason", "short")]
        ) >= 1.0
    );
    assert!(
        metric(
            &text,
            "trellis_dns_dropped_packets_total",
            &[("reason", "not_a_query")]
        ) >= 1.0
    );
    assert!(
        metric(
            &text,
            "trellis_dns_dropped_packets_total",
            &[("reason", "oversized")]
        ) >= 1.0
    );
    assert!(
        metric(
            &text,
            "trellis_dns_queries_total",
            &[("type", "NONE"), ("rcode", "FORMERR")]
        ) >= 1.0
    );
    server.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exposed_and_valid() {
    let server = start(&shop(), vec![]).await;
    let resolver = resolver(server.addr(), false);
    for _ in 0..3 {
        resolver
            .lookup("web.shop.svc.clusterset.local.", RecordType::A)
            .await
            .unwrap();
    }
    let _ = resolver
        .lookup("x.shop.svc.clusterset.local.", RecordType::A)
        .await;
    // The fast path flushes its counters when idle (100 ms): wait until all four answers are
    // counted, then check what they were counted as.
    let addr = server.running.metrics_addr.unwrap();
    let text = eventually_async("the answers counted", WAIT, || async {
        let text = scrape(addr).await;
        let count = metric(
            &text,
            "trellis_dns_answer_duration_seconds_count",
            &[("source", "zone")],
        );
        (count >= 4.0).then_some(text)
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "trellis_dns_queries_total",
            &[("type", "A"), ("rcode", "NOERROR"), ("source", "zone")]
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            "trellis_dns_queries_total",
            &[("type", "A"), ("rcode", "NXDOMAIN"), ("source", "zone")]
        ),
        1.0
    );
    assert_eq!(metric(&text, "trellis_dns_records_served_total", &[]), 3.0);
    assert_eq!(
        metric(
            &text,
            "trellis_dns_answer_duration_seconds_count",
            &[("source", "zone")]
        ),
        4.0
    );
    assert_eq!(metric(&text, "trellis_dns_catalog_services", &[]), 2.0);
    // promtool (Debian's prometheus package, from scripts/install-deps) agrees.
    if !missing_tool(
        "the promtool check of the metrics",
        "promtool",
        "--version",
        "prometheus",
    ) {
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    server.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_file_is_watched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.json");
    std::fs::write(&path, serde_json::to_string(&shop()).unwrap()).unwrap();
    let server = start(&Default::default(), vec![]).await;
    let watcher = tokio::spawn(trellis_dns::catalog::watch_file(
        server.handle.clone(),
        path.clone(),
        Duration::from_millis(20),
        server.metrics.clone(),
    ));
    let resolver = resolver(server.addr(), false);
    let answers = |name: &'static str| {
        let resolver = resolver.clone();
        async move {
            resolver
                .lookup(name, RecordType::A)
                .await
                .map(|l| l.answers().len())
                .unwrap_or(0)
        }
    };
    let wait_for = |name: &'static str, want: usize| {
        eventually_async(name, WAIT, move || async move {
            (answers(name).await == want).then_some(())
        })
    };
    wait_for("web.shop.svc.clusterset.local.", 1).await;
    // Invalid JSON keeps the last catalog: once the watcher has read it (counted as invalid).
    std::fs::write(&path, "{not json").unwrap();
    let invalid = || {
        server
            .metrics
            .catalog_loads
            .with_label_values(&["invalid"])
            .get()
    };
    eventually_async("the invalid file read", WAIT, || async {
        (invalid() >= 1).then_some(())
    })
    .await;
    assert_eq!(answers("web.shop.svc.clusterset.local.").await, 1);
    // Replaced atomically by rename, as the controller should write it.
    let mut catalog = shop();
    catalog.services.remove(0);
    let tmp = dir.path().join("catalog.json.tmp");
    std::fs::write(&tmp, serde_json::to_string(&catalog).unwrap()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for("web.shop.svc.clusterset.local.", 0).await;
    watcher.abort();
    server.running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_udp_workers_share_the_port() {
    let server = start_with(&shop(), vec![], 3).await;
    let mut query = Message::new(1, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(
        Name::from_ascii("web.shop.svc.clusterset.local.").unwrap(),
        RecordType::A,
    ));
    // Many source ports spread over the SO_REUSEPORT sockets; every one is answered.
    for id in 0..60u16 {
        query.metadata.id = id;
        let answer = raw_exchange(server.addr(), &query).await;
        assert_eq!((answer.id, answer.answers.len()), (id, 1));
    }
    server.running.shutdown();
}
