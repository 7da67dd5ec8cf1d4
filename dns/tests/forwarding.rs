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
