//! Response rate limiting over real sockets on loopback: 127.0.0.0/8 is all local, so
//! 127.0.0.1 and 127.0.1.1 are clients in two /24 networks.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use tokio::net::UdpSocket;

use common::*;

const WEB: &str = "web.shop.svc.clusterset.local.";

/// Sends `count` identical queries (IDs 0..count) from `socket` as fast as it can, then
/// collects answers until 300 ms pass without one: (full answers, slipped answers).
async fn burst(socket: &UdpSocket, dns: SocketAddr, packet: &[u8], count: u16) -> (usize, usize) {
    let started = Instant::now();
    let mut packet = packet.to_vec();
    for id in 0..count {
        packet[0..2].copy_from_slice(&id.to_be_bytes());
        socket.send_to(&packet, dns).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the burst must fit in one second"
    );
    let (mut full, mut slipped) = (0, 0);
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok(len)) =
        tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await
    {
        let answer = Message::from_vec(&buf[..len]).unwrap();
        if answer.truncation {
            assert!(answer.answers.is_empty(), "a slip carries no records");
            slipped += 1;
        } else {
            assert_eq!(answer.answers.len(), 2);
            full += 1;
        }
    }
    (full, slipped)
}

/// 200 identical queries from one client within a second: 20 answered in full, of the other
/// 180 every other one slipped (TC, empty) and the rest dropped, all counted; a client in
/// another /24 and the same client over TCP are answered as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_responses_to_one_client_are_limited() {
    let config = trellis_dns::Config {
        rate_limit: trellis_dns::Config::default().rate_limit,
        ..test_config(vec![])
    };
    let server = start_config(config, Some(&shop())).await;
    let dns = server.addr();
    let metrics = server.running.metrics_addr.unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A plain query for an existing name: the fast path.
    let (full, slipped) = burst(&socket, dns, &query(WEB, RecordType::A, None), 200).await;
    assert_eq!((full, slipped), (20, 90));
    // NXDOMAIN (the slow path) is another bucket, limited the same way.
    let nx = query("nope.shop.svc.clusterset.local.", RecordType::A, Some(1232));
    let mut packet = nx.clone();
    let mut answered = 0;
    for id in 0..50u16 {
        packet[0..2].copy_from_slice(&id.to_be_bytes());
        socket.send_to(&packet, dns).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let mut nxdomain = 0;
    while let Ok(Ok(len)) =
        tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await
    {
        answered += 1;
        let m = Message::from_vec(&buf[..len]).unwrap();
        if !m.truncation {
            nxdomain += 1;
        }
    }
    assert_eq!((nxdomain, answered), (20, 35));

    // Another /24 is another client; TCP is never limited.
    let other = udp_exchange_from(
        "127.0.1.1".parse().unwrap(),
        dns,
        &query(WEB, RecordType::A, None),
        Duration::from_secs(2),
    )
    .await
    .expect("the other client is answered");
    assert_eq!(Message::from_vec(&other).unwrap().answers.len(), 2);
    for _ in 0..30 {
        let tcp = ask(dns, WEB, RecordType::A, true).await;
        assert!(!tcp.truncation && tcp.answers.len() == 2);
    }

    let text = scrape(metrics).await;
    assert_eq!(
        metric(
            &text,
            "trellis_dns_rate_limited_total",
            &[("action", "slip")]
        ),
        90.0 + 15.0
    );
    assert_eq!(
        metric(
            &text,
            "trellis_dns_rate_limited_total",
            &[("action", "drop")]
        ),
        90.0 + 15.0
    );
    server.running.shutdown();
}
