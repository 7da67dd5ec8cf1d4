//! Who gets forwarding, and how big forwarded answers may be: loopback only (127.0.0.0/8 is
//! all local, so 127.0.0.1 and 127.0.0.2 are two clients), ephemeral ports, the upstream stub.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

use common::*;

const CLIENT: &str = "127.0.0.1";
const OTHER: &str = "127.0.0.2";

async fn rcode_from(server: std::net::SocketAddr, from: &str, name: &str) -> ResponseCode {
    let answer = udp_exchange_from(
        from.parse::<IpAddr>().unwrap(),
        server,
        &query(name, RecordType::A, Some(1232)),
        Duration::from_secs(2),
    )
    .await
    .expect("an answer");
    Message::from_vec(&answer).unwrap().response_code
}

/// By default nobody gets forwarding: REFUSED over UDP and TCP, in-zone names still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_is_off_by_default() {
    let (upstream, _udp, _tcp) = upstream_stub().await;
    let server = start_config(test_config(vec![upstream]), Some(&shop())).await;
    let dns = server.addr();
    assert_eq!(
        rcode_from(dns, CLIENT, "www.example.test.").await,
        ResponseCode::Refused
    );
    let tcp = Message::from_vec(
        &tcp_exchange(dns, &query("www.example.test.", RecordType::A, None)).await,
    )
    .unwrap();
    assert_eq!(tcp.response_code, ResponseCode::Refused);
    assert!(tcp.answers.is_empty() && !tcp.recursion_available);
    assert_eq!(
        rcode_from(dns, CLIENT, "web.shop.svc.clusterset.local.").await,
        ResponseCode::NoError
    );
    let text = scrape(server.running.metrics_addr.unwrap()).await;
    assert_eq!(
        metric(&text, "trellis_dns_forwarded_queries_total", &[]),
        0.0
    );
    assert_eq!(metric(&text, "trellis_dns_forward_refused_total", &[]), 2.0);
    server.running.shutdown();
}

/// `forward_for` lists the clients that get forwarding: one allowed address is forwarded (UDP
/// and TCP), its neighbour is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_for_allowed_clients_only() {
    let (upstream, _udp, _tcp) = upstream_stub().await;
    let config = trellis_dns::Config {
        forward_for: trellis_dns::acl::ForwardAcl::new(vec![
            format!("{CLIENT}/32").parse().unwrap(),
        ]),
        ..test_config(vec![upstream])
    };
    let server = start_config(config, Some(&shop())).await;
    let dns = server.addr();
    assert_eq!(
        rcode_from(dns, CLIENT, "www.example.test.").await,
        ResponseCode::NoError
    );
    assert_eq!(
        ask(dns, "www.example.test.", RecordType::A, true)
            .await
            .answers
            .len(),
        1,
        "forwarded over TCP"
    );
    assert_eq!(
        rcode_from(dns, CLIENT, "missing.org.").await,
        ResponseCode::NXDomain,
        "the upstream's answer"
    );
    assert_eq!(
        rcode_from(dns, OTHER, "www.example.test.").await,
        ResponseCode::Refused
    );
    assert_eq!(
        rcode_from(dns, OTHER, "web.shop.svc.clusterset.local.").await,
        ResponseCode::NoError
    );
    let text = scrape(server.running.metrics_addr.unwrap()).await;
    assert_eq!(
        metric(&text, "trellis_dns_forwarded_queries_total", &[]),
        3.0
    );
    assert_eq!(metric(&text, "trellis_dns_forward_refused_total", &[]), 1.0);
    server.running.shutdown();
}

/// An upstream on 127.0.0.1 (UDP and TCP) that records the EDNS payload size of each query it
/// gets (0 without EDNS) and answers `big.example.test.` with 150 A records whatever that size
/// (as a broken or hostile upstream might), anything else with one; it advertises 4096.
async fn recording_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<u16>>>,
) {
    use hickory_proto::op::{Edns, MessageType, OpCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (udp, tcp, addr) = udp_and_tcp_on_one_port().await;
    let answer = {
        let seen = seen.clone();
        move |bytes: &[u8]| -> Vec<u8> {
            let query = Message::from_vec(bytes).unwrap();
            seen.lock()
                .unwrap()
                .push(query.edns.as_ref().map_or(0, |e| e.max_payload()));
            let question = query.queries[0].clone();
            let mut response = Message::new(query.id, MessageType::Response, OpCode::Query);
            response.metadata.recursion_available = true;
            response.add_query(question.clone());
            let count = if question.name().to_ascii() == "big.example.test." {
                150
            } else {
                1
            };
            for i in 0..count {
                response.add_answer(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A::new(192, 0, 2, i as u8)),
                ));
            }
            if query.edns.is_some() {
                let mut edns = Edns::new();
                edns.set_max_payload(4096);
                response.set_edns(edns);
            }
            response.to_vec().unwrap()
        }
    };
    let udp_answer = answer.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((len, peer)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&udp_answer(&buf[..len]), peer).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                while let Ok(len) = stream.read_u16().await {
                    let mut query = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    let reply = answer(&query);
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// The EDNS cap (1232, the 2020 flag day value) holds for forwarded queries both ways: the
/// upstream is never offered more, a client offering 4096 gets at most 1232 bytes over UDP
/// (truncated, TC, when the upstream sends more) and the full answer over TCP; the OPT record
/// relayed advertises 1232.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_answers_respect_the_edns_cap() {
    let (upstream, seen) = recording_upstream().await;
    let config = trellis_dns::Config {
        forward_for: trellis_dns::acl::ForwardAcl::new(vec!["127.0.0.0/8".parse().unwrap()]),
        ..test_config(vec![upstream])
    };
    let server = start_config(config, Some(&shop())).await;
    let dns = server.addr();
    let exchange = |name: &'static str, edns: Option<u16>| async move {
        udp_exchange(
            dns,
            &query(name, RecordType::A, edns),
            Duration::from_secs(2),
        )
        .await
        .expect("an answer")
    };

    let small = Message::from_vec(&exchange("www.example.test.", Some(4096)).await).unwrap();
    assert_eq!(small.answers.len(), 1);
    assert_eq!(small.edns.unwrap().max_payload(), 1232);

    let big = exchange("big.example.test.", Some(4096)).await;
    assert!(big.len() <= 1232, "{} bytes", big.len());
    let big = Message::from_vec(&big).unwrap();
    assert!(big.truncation && big.answers.is_empty(), "{big:?}");
    assert_eq!(big.edns.unwrap().max_payload(), 1232);
    // Without EDNS: 512 bytes at most.
    let plain = exchange("big.example.test.", None).await;
    assert!(plain.len() <= 512 && Message::from_vec(&plain).unwrap().truncation);

    let full = ask(dns, "big.example.test.", RecordType::A, true).await;
    assert_eq!((full.truncation, full.answers.len()), (false, 150));

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "three over UDP, one over TCP: {seen:?}");
    assert!(seen.iter().all(|size| *size <= 1232), "{seen:?}");
    assert!(
        seen.contains(&1232),
        "a 4096 offer goes out as 1232: {seen:?}"
    );
    server.running.shutdown();
}

/// In the zone too: a client offering 4096 is answered within 1232 bytes (an answer of about
/// 1.6 kB is truncated), advertising 1232, and gets it whole over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_zone_answers_respect_the_edns_cap() {
    let server = start(&with_big(100), vec![]).await;
    let dns = server.addr();
    let bytes = udp_exchange(
        dns,
        &query("big.shop.svc.clusterset.local.", RecordType::A, Some(4096)),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert!(bytes.len() <= 1232, "{} bytes", bytes.len());
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.truncation && m.answers.is_empty());
    assert_eq!(m.edns.unwrap().max_payload(), 1232);
    let full = ask(dns, "big.shop.svc.clusterset.local.", RecordType::A, true).await;
    assert_eq!((full.truncation, full.answers.len()), (false, 100));
    // A small answer advertises 1232 too (the fast path).
    let web = ask(dns, "web.shop.svc.clusterset.local.", RecordType::A, false).await;
    assert_eq!(web.edns.unwrap().max_payload(), 1232);
    server.running.shutdown();
}

/// An upstream that never answers: each forwarded query holds its slot for good.
struct Stalled(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl trellis_dns::forward::Upstream for Stalled {
    async fn exchange(
        &self,
        _query: &[u8],
        _transport: trellis_dns::answer::Transport,
    ) -> Result<Vec<u8>, trellis_dns::forward::ForwardError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::future::pending().await
    }
}

/// One forward in flight allowed and taken: the next query is refused for overload with
/// SERVFAIL, and counted with the same `overload` label whether it came over UDP or TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_has_one_label_over_udp_and_tcp() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use trellis_dns::acl::ForwardAcl;
    use trellis_dns::catalog::ZoneHandle;
    use trellis_dns::metrics::Metrics;
    use trellis_test_support::eventually_async;

    let config = trellis_dns::Config {
        max_forwards_in_flight: 1,
        forward_for: ForwardAcl::new(vec!["127.0.0.0/8".parse().unwrap()]),
        ..test_config(vec![])
    };
    let zone = config.validate().unwrap();
    let metrics = Metrics::new().unwrap();
    let handle = ZoneHandle::new(zone, config.edns_udp_size, Some(metrics.clone()));
    assert!(handle.publish(&shop()).is_empty());
    let entered = std::sync::Arc::new(AtomicUsize::new(0));
    let running =
        trellis_dns::server::start(&config, handle, metrics.clone(), Stalled(entered.clone()))
            .await
            .unwrap();
    let dns = running.dns_addr;
    let failures = |reason: &str| metrics.upstream_failures.with_label_values(&[reason]).get();

    // The one slot taken, for good.
    let holder = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    holder
        .send_to(&query("www.example.test.", RecordType::A, None), dns)
        .await
        .unwrap();
    eventually_async("the slot taken", Duration::from_secs(10), || async {
        (entered.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;

    let udp = udp_exchange(
        dns,
        &query("a.example.test.", RecordType::A, None),
        Duration::from_secs(5),
    )
    .await
    .expect("a UDP answer");
    assert_eq!(
        Message::from_vec(&udp).unwrap().response_code,
        ResponseCode::ServFail
    );
    assert_eq!((failures("overload"), failures("error")), (1, 0));

    let tcp = tcp_exchange(dns, &query("b.example.test.", RecordType::A, None)).await;
    assert_eq!(
        Message::from_vec(&tcp).unwrap().response_code,
        ResponseCode::ServFail
    );
    assert_eq!((failures("overload"), failures("error")), (2, 0));
    assert_eq!(
        entered.load(Ordering::SeqCst),
        1,
        "nothing else reached the upstream"
    );
    running.shutdown();
}
