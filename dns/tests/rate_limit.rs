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

/// What one client saw of a burst of identical queries.
#[derive(Debug)]
struct Seen {
    /// Answers in full.
    full: usize,
    /// Slips: truncated and empty.
    slipped: usize,
    /// Rate-limit windows (one second each) the burst may have spanned, from its first query to
    /// its last answer: on a loaded machine a burst is not always within one.
    windows: usize,
}

/// Sends `count` identical queries (IDs 0..count) from `socket` as fast as it can, then
/// collects answers until 300 ms pass without one; `records` is what a full answer holds.
async fn burst(
    socket: &UdpSocket,
    dns: SocketAddr,
    packet: &[u8],
    count: u16,
    records: usize,
) -> Seen {
    let started = Instant::now();
    let mut packet = packet.to_vec();
    for id in 0..count {
        packet[0..2].copy_from_slice(&id.to_be_bytes());
        socket.send_to(&packet, dns).await.unwrap();
    }
    let (mut full, mut slipped) = (0, 0);
    let mut last = Instant::now();
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok(len)) =
        tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await
    {
        last = Instant::now();
        let answer = Message::from_vec(&buf[..len]).unwrap();
        if answer.truncation {
            assert!(answer.answers.is_empty(), "a slip carries no records");
            slipped += 1;
        } else {
            assert_eq!(answer.answers.len(), records);
            full += 1;
        }
    }
    let windows = 1 + last.duration_since(started).as_secs_f64().ceil() as usize;
    Seen {
        full,
        slipped,
        windows,
    }
}

/// What rate limiting at `per_second` promises for `sent` identical queries: the first
/// `per_second` of each window answered in full (at least one window's worth, and no more than
/// the windows spanned allow), and of the others about every other one slipped.
fn assert_limited(seen: &Seen, sent: usize, per_second: usize) {
    let Seen {
        full,
        slipped,
        windows,
    } = *seen;
    assert!(
        full >= per_second && full <= per_second * windows,
        "{seen:?}: {per_second} per second answered in full"
    );
    assert!(full < sent, "{seen:?}: nothing was limited");
    let limited = sent - full;
    // Every other limited response slips; each window may start on either parity.
    assert!(
        slipped + windows >= limited / 2 && slipped <= limited.div_ceil(2) + windows,
        "{seen:?}: about half of the {limited} limited responses slip"
    );
}

/// 200 identical queries from one client in a burst: the limit answered in full per second, of
/// the others every other one slipped (TC, empty) and the rest dropped, all counted; a client
/// in another /24 and the same client over TCP are answered as usual.
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
    let per_second = trellis_dns::Config::default().rate_limit as usize;
    // A plain query for an existing name: the fast path.
    let web = burst(&socket, dns, &query(WEB, RecordType::A, None), 200, 1).await;
    assert_limited(&web, 200, per_second);
    // NXDOMAIN (the slow path) is another bucket, limited the same way.
    let nx = query("nope.shop.svc.clusterset.local.", RecordType::A, Some(1232));
    let nope = burst(&socket, dns, &nx, 50, 0).await;
    assert_limited(&nope, 50, per_second);

    // Another /24 is another client; TCP is never limited.
    let other = udp_exchange_from(
        "127.0.1.1".parse().unwrap(),
        dns,
        &query(WEB, RecordType::A, None),
        Duration::from_secs(2),
    )
    .await
    .expect("the other client is answered");
    assert_eq!(Message::from_vec(&other).unwrap().answers.len(), 1);
    for _ in 0..30 {
        let tcp = ask(dns, WEB, RecordType::A, true).await;
        assert!(!tcp.truncation && tcp.answers.len() == 1);
    }

    // Every limited response is counted: at least the slips seen, and with the drops no more
    // than what was not answered in full.
    let text = scrape(metrics).await;
    let counted = |action| {
        metric(
            &text,
            "trellis_dns_rate_limited_total",
            &[("action", action)],
        )
    };
    let (slips, drops) = (counted("slip"), counted("drop"));
    assert!(
        slips >= (web.slipped + nope.slipped) as f64,
        "{slips} slips counted"
    );
    assert!(drops >= 1.0, "{drops} drops counted");
    assert!(
        slips + drops <= (250 - web.full - nope.full) as f64,
        "{slips} + {drops} limited of 250, {} + {} answered in full",
        web.full,
        nope.full
    );
    server.running.shutdown();
}
