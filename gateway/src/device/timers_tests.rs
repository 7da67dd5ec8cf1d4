//! WireGuard's timers on the in-memory devices, under boringtun's mock clock.
//!
//! The clock is thread-local: each test's devices run on the test's own thread (the
//! current-thread runtime of `#[tokio::test]`), and the test moves the clock there. The
//! devices' loops never run their timers by themselves here (an hour apart); the test runs a
//! round after each move of the clock, as the loop would every `timer_interval`. boringtun
//! stamps its events with the time of the last round, so rounds must come before the events
//! of each step, as they do in the real loop.

use std::net::SocketAddr;
use std::time::Duration;

use mock_instant::MockClock;

use super::*;

/// WireGuard's Rekey-After-Time, Reject-After-Time and Rekey-Timeout.
const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// The spec's bound on the jitter added to Rekey-Timeout (boringtun 0.7 adds none).
const JITTER: Duration = Duration::from_millis(333);
const SECOND: Duration = Duration::from_secs(1);

/// A node whose timers run only when the test says so.
fn node(net: &FakeNet, addr: &str) -> Node {
    let tun = FakeTun::default();
    let udp = net.bind(addr);
    let socket = udp.addr.clone();
    let keys = KeyPair::generate();
    let metrics = Metrics::new().unwrap();
    let config = DeviceConfig {
        timer_interval: Duration::from_secs(3600),
        ..DeviceConfig::default()
    };
    let (device, handle) = Device::new(tun.clone(), udp, keys.clone(), metrics.clone(), config);
    tokio::spawn(device.run());
    Node {
        keys,
        addr: addr.parse().unwrap(),
        tun,
        handle,
        metrics,
        socket,
    }
}

/// `node` as a peer whose address is unknown until it speaks: no initiation of ours can
/// cross one of its own, so which end is the initiator (the one that rekeys) is fixed.
fn unaddressed(node: &Node, name: &str, cidr: &str) -> TunnelPeer {
    TunnelPeer {
        endpoint: None,
        ..peer_of(node, name, cidr)
    }
}

/// Moves the mock clock by `by`, then runs one round of timers on each of `nodes`.
async fn step(by: Duration, nodes: &[&Node]) {
    MockClock::advance(by);
    for node in nodes {
        node.handle.run_timers().await.unwrap();
    }
}

/// Datagrams carried so far: a mark for `sent_since`.
fn wire_mark(net: &FakeNet) -> usize {
    net.wire.lock().unwrap().len()
}

/// The datagrams `from` put on the wire since `mark` (lost ones too).
fn sent_since(net: &FakeNet, mark: usize, from: SocketAddr) -> Vec<Vec<u8>> {
    net.wire.lock().unwrap()[mark..]
        .iter()
        .filter(|(f, _, _)| *f == from)
        .map(|(_, _, d)| d.clone())
        .collect()
}

fn initiations(datagrams: &[Vec<u8>]) -> usize {
    datagrams
        .iter()
        .filter(|d| d[0] == HANDSHAKE_INIT && d.len() == HANDSHAKE_INIT_LEN)
        .count()
}

/// Data messages that carry a packet (not keepalives).
fn data(datagrams: &[Vec<u8>]) -> Vec<&Vec<u8>> {
    datagrams
        .iter()
        .filter(|d| d[0] == DATA && d.len() > DATA_MIN_LEN)
        .collect()
}

/// The receiver index of a data message: which session it was sent on.
fn session_of(datagram: &[u8]) -> u32 {
    u32::from_le_bytes(datagram[4..8].try_into().unwrap())
}

/// A packet from a's pod to b's and one back, each delivered.
async fn exchange(a: &Node, b: &Node, n: u64) {
    let there = ipv4("10.1.0.5", "10.2.0.7", &n.to_be_bytes());
    a.tun.inbound.push(there.clone());
    assert_eq!(delivered(&b.tun).await, Some(there), "a to b, step {n}");
    let back = ipv4("10.2.0.7", "10.1.0.5", &n.to_be_bytes());
    b.tun.inbound.push(back.clone());
    assert_eq!(delivered(&a.tun).await, Some(back), "b to a, step {n}");
}

/// a and b with a session a initiated (at mock time zero), which has carried a packet each way.
async fn session(net: &FakeNet) -> (Node, Node) {
    let a = node(net, "198.18.0.1:51820");
    let b = node(net, "198.18.0.2:51820");
    b.handle
        .set_peers(vec![unaddressed(&a, "a", "10.1.0.0/24")], true)
        .await
        .unwrap();
    a.handle
        .set_peers(vec![peer_of(&b, "b", "10.2.0.0/24")], true)
        .await
        .unwrap();
    exchange(&a, &b, 0).await;
    assert_eq!(a.handle.stats().await.unwrap()[0].handshakes, 1);
    (a, b)
}

async fn handshakes(node: &Node) -> u64 {
    node.handle.stats().await.unwrap()[0].handshakes
}

#[tokio::test]
async fn the_initiator_rekeys_at_120_s_and_traffic_moves_to_the_new_session() {
    let net = FakeNet::default();
    let (a, b) = session(&net).await;
    let mark = wire_mark(&net);
    let old = session_of(data(&sent_since(&net, 0, a.addr))[0]);

    // Traffic both ways every second, as on a busy link: no keepalive or lost-peer handshake
    // is due, so the only reason left to start one is the session's age.
    let rekey_at = REKEY_AFTER_TIME.as_secs();
    for second in 1..=rekey_at {
        step(SECOND, &[&a, &b]).await;
        let started = initiations(&sent_since(&net, mark, a.addr));
        let expected = usize::from(second >= rekey_at);
        assert_eq!(started, expected, "initiations by a at {second} s");
        exchange(&a, &b, second).await;
    }
    // The responder never rekeys on time: only the initiator does.
    assert_eq!(initiations(&sent_since(&net, mark, b.addr)), 0);

    // The new session is up at both ends, and the next packets travel on it.
    eventually("the rekey counted", || {
        a.metrics
            .render()
            .contains("trellis_gateway_peer_rekeys_total{peer=\"b\"} 1")
    })
    .await;
    assert_eq!(handshakes(&a).await, 2);
    let after = wire_mark(&net);
    exchange(&a, &b, rekey_at + 1).await;
    let sent = sent_since(&net, after, a.addr);
    let new = data(&sent);
    assert_eq!(new.len(), 1, "one data message");
    assert_ne!(session_of(new[0]), old, "sent on the new session");
    assert_eq!(handshakes(&b).await, 2);
    assert_eq!(a.metrics.peers_up.get(), 1);
}

#[tokio::test]
async fn past_180_s_a_session_carries_nothing_and_the_peer_is_down() {
    let net = FakeNet::default();
    let (a, b) = session(&net).await;
    // b is cut off: nothing either end sends arrives, so no handshake can renew the session.
    // a stays idle meanwhile: data sent into the void would start handshakes whose attempts
    // give up after Rekey-Attempt-Time (90 s) and take the session with them, before 180 s.
    net.mute(a.addr, true);
    net.mute(b.addr, true);

    let reject_at = REJECT_AFTER_TIME.as_secs();
    for _ in 1..reject_at {
        step(SECOND, &[&a, &b]).await;
    }
    assert_eq!(a.metrics.peers_up.get(), 1, "up at {} s", reject_at - 1);
    // Past the limit by one round: boringtun drops a session strictly older than 180 s, when
    // its timers run.
    step(SECOND, &[&a, &b]).await;
    step(SECOND, &[&a, &b]).await;
    assert_eq!(a.metrics.peers_up.get(), 0, "down after {reject_at} s");
    assert_eq!(
        a.handle.stats().await.unwrap()[0].since_last_handshake,
        None
    );

    // A packet for b now waits for a new handshake instead of leaving on the old keys.
    let mark = wire_mark(&net);
    let late = ipv4("10.1.0.5", "10.2.0.7", b"late");
    a.tun.inbound.push(late.clone());
    eventually("a sent something", || {
        !sent_since(&net, mark, a.addr).is_empty()
    })
    .await;
    let sent = sent_since(&net, mark, a.addr);
    assert!(data(&sent).is_empty(), "data on an expired session");
    assert_eq!(initiations(&sent), sent.len(), "only an initiation");
    assert_eq!(initiations(&sent), 1);

    // b reachable again: a's retry makes a session, and the packet that waited arrives.
    net.mute(a.addr, false);
    net.mute(b.addr, false);
    step(REKEY_TIMEOUT + JITTER, &[&a, &b]).await;
    assert_eq!(delivered(&b.tun).await, Some(late));
    // The gauge is the timers' view: up again at their next round.
    step(Duration::ZERO, &[&a]).await;
    assert_eq!(a.metrics.peers_up.get(), 1);
}

#[tokio::test]
async fn a_lost_initiation_is_retried_after_rekey_timeout_and_the_queued_packet_follows() {
    let net = FakeNet::default();
    let a = node(&net, "198.18.0.1:51820");
    let b = node(&net, "198.18.0.2:51820");
    b.handle
        .set_peers(vec![unaddressed(&a, "a", "10.1.0.0/24")], true)
        .await
        .unwrap();
    // a's first initiation (sent as it gets its peer) is lost on the way.
    net.mute(a.addr, true);
    a.handle
        .set_peers(vec![peer_of(&b, "b", "10.2.0.0/24")], true)
        .await
        .unwrap();
    let ping = ipv4("10.1.0.5", "10.2.0.7", b"ping");
    a.tun.inbound.push(ping.clone());
    eventually("the packet queued behind the handshake", || {
        a.metrics
            .render()
            .contains("trellis_gateway_peer_queued_packets{peer=\"b\"} 1")
    })
    .await;
    net.mute(a.addr, false);
    assert_eq!(initiations(&sent_since(&net, 0, a.addr)), 1);

    // Not before Rekey-Timeout...
    step(REKEY_TIMEOUT - Duration::from_millis(1), &[&a, &b]).await;
    assert_eq!(
        initiations(&sent_since(&net, 0, a.addr)),
        1,
        "retried early"
    );
    // ...and by its end, jitter included.
    step(JITTER + Duration::from_millis(1), &[&a, &b]).await;
    assert_eq!(initiations(&sent_since(&net, 0, a.addr)), 2, "no retry");

    assert_eq!(delivered(&b.tun).await, Some(ping));
    assert_eq!(handshakes(&a).await, 1);
    assert!(
        a.metrics
            .render()
            .contains("trellis_gateway_peer_queued_packets{peer=\"b\"} 0")
    );
}
