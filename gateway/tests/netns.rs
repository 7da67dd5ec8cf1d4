//! Two real gateways in two network namespaces (runs as root).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Classifier, Frame, UnderlayCapture, contains, two_nodes};
use trellis_gateway::metrics::DropReason;
use trellis_netns::RouteTarget;
use trellis_test_support::eventually_async;

const SHORT: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_traffic_both_ways_removal_and_readd() {
    trellis_test_support::skip_unless_root!();
    let (a, b) = two_nodes("gw-pair").await;
    let _echo_a = a.echo(7000).await;
    let _echo_b = b.echo(7000).await;
    a.apply("c1", 1, vec![b.as_remote("c1", true)]).await;
    b.apply("c1", 1, vec![a.as_remote("c1", true)]).await;

    let to_b = SocketAddr::new(b.pod, 7000);
    let to_a = SocketAddr::new(a.pod, 7000);
    assert!(a.ping(to_b, LONG).await, "a -> b through the tunnel");
    assert!(b.ping(to_a, LONG).await, "b -> a through the tunnel");
    let stats = a.gateway().device().stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert!(stats[0].handshakes >= 1 && stats[0].rx_bytes > 0 && stats[0].tx_bytes > 0);
    let text = a.gateway().metrics.render();
    assert!(
        text.contains("trellis_gateway_peers_configured 1"),
        "{text}"
    );

    // The routes are tagged and fail-closed.
    let routes = a.netlink.owned_routes(212).await.unwrap();
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(routes.iter().any(|r| r.target == RouteTarget::Unreachable));
    assert!(
        routes
            .iter()
            .any(|r| matches!(r.target, RouteTarget::Device(_)))
    );

    // Removal: a forgets b; traffic stops in both directions, its routes go.
    a.apply("c1", 2, vec![]).await;
    assert!(a.netlink.owned_routes(212).await.unwrap().is_empty());
    assert!(a.gateway().device().stats().await.unwrap().is_empty());
    assert!(!a.ping(to_b, SHORT).await, "a -> b after removal");
    assert!(!b.ping(to_a, SHORT).await, "b -> a after removal");
    assert!(a.gateway().metrics.drops(DropReason::NoPeer) > 0);

    // Re-adding restores it, without touching b.
    a.apply("c1", 3, vec![b.as_remote("c1", true)]).await;
    assert!(a.ping(to_b, LONG).await, "a -> b after re-adding");
    assert!(b.ping(to_a, LONG).await, "b -> a after re-adding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pod_cidrs_and_a_roaming_peer() {
    trellis_test_support::skip_unless_root!();
    let (mut a, mut b) = two_nodes("gw-v6").await;
    a.enable_ipv6(1).await;
    b.enable_ipv6(2).await;
    let b6 = SocketAddr::new(b.pod6.unwrap(), 7000);
    let a6 = SocketAddr::new(a.pod6.unwrap(), 7000);
    let _echo_a = a.echo_at(a6).await;
    let _echo_b = b.echo_at(b6).await;
    let _echo_b4 = b.echo(7000).await;
    // An IPv6 underlay too: a reaches b's gateway at [fdff::2]:51820.
    for (node, address) in [(&a, "fdff::1/64"), (&b, "fdff::2/64")] {
        let underlay = node.netlink.require_link("underlay").await.unwrap();
        node.netlink
            .add_address(underlay.index, address.parse().unwrap())
            .await
            .unwrap();
    }
    let mut b_over_v6 = b.as_remote("c1", true);
    b_over_v6.endpoint = Some("[fdff::2]:51820".parse().unwrap());
    // b first: its handshake (to a's IPv4 address) finds a without a peer; a's, over IPv6,
    // is the one that completes, and b follows a to the address it came from.
    b.apply("c1", 1, vec![a.as_remote("c1", true)]).await;
    a.apply("c1", 1, vec![b_over_v6]).await;
    assert_eq!(a.netlink.owned_routes(212).await.unwrap().len(), 4);
    assert!(
        a.ping_from(a.pod6.unwrap(), b6, LONG).await,
        "a -> b over IPv6"
    );
    assert!(
        b.ping_from(b.pod6.unwrap(), a6, LONG).await,
        "b -> a over IPv6"
    );
    let endpoint = b.gateway().device().stats().await.unwrap()[0].endpoint;
    assert_eq!(
        endpoint,
        Some("[fdff::1]:51820".parse().unwrap()),
        "b learned a's IPv6 endpoint"
    );
    // Back to IPv4 for the roaming part.
    a.apply("c1", 2, vec![b.as_remote("c1", true)]).await;

    // a's underlay address changes (a new DHCP lease, a NAT rebinding): b follows a to
    // where its authenticated packets now come from, without any new configuration.
    let run = |ns: &str, args: &str| {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", args])
            .status()
            .unwrap();
        assert!(status.success(), "{args}");
    };
    run(
        a.ns.name(),
        "ip addr del 198.18.0.1/24 dev underlay && ip addr add 198.18.0.11/24 dev underlay",
    );
    let to_b = SocketAddr::new(b.pod, 7000);
    assert!(a.ping(to_b, LONG).await, "a -> b from the new address");
    let stats = b.gateway().device().stats().await.unwrap();
    assert_eq!(
        stats[0].endpoint,
        Some("198.18.0.11:51820".parse().unwrap()),
        "b follows a"
    );
    assert!(
        b.ping_from(b.pod6.unwrap(), a6, LONG).await,
        "b -> a at a's new address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_network_is_counted_and_survived() {
    trellis_test_support::skip_unless_root!();
    let (a, b) = two_nodes("gw-junk").await;
    let _echo_b = b.echo(7000).await;
    a.apply("c1", 1, vec![b.as_remote("c1", true)]).await;
    b.apply("c1", 1, vec![a.as_remote("c1", true)]).await;
    let to_b = SocketAddr::new(b.pod, 7000);
    assert!(a.ping(to_b, LONG).await);

    // 2000 datagrams of random bytes, and every message type at wrong and right sizes,
    // from a socket on a's underlay address aimed at b's gateway.
    let attacker =
        a.ns.run(|| std::net::UdpSocket::bind("198.18.0.1:0"))
            .unwrap()
            .unwrap();
    let target: SocketAddr = "198.18.0.2:51820".parse().unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let before = DropReason::ALL
        .iter()
        .map(|r| b.gateway().metrics.drops(*r))
        .sum::<u64>();
    let mut sent = 0u64;
    for i in 0..2000u64 {
        let len = (next() % 300) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if len >= 4 && i % 2 == 0 {
            // Look like WireGuard: a valid type and zero padding.
            bytes[0] = (i % 4 + 1) as u8;
            bytes[1..4].fill(0);
        }
        if i % 7 == 0 {
            bytes.resize([148, 92, 64, 32][(i % 4) as usize], 0);
        }
        attacker.send_to(&bytes, target).unwrap();
        sent += 1;
        if i % 200 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let dropped = || {
        DropReason::ALL
            .iter()
            .map(|r| b.gateway().metrics.drops(*r))
            .sum::<u64>()
            - before
    };
    // Nothing else reaches b meanwhile: each junk datagram is one drop, counted once.
    eventually_async(
        "every junk datagram counted as a drop",
        Duration::from_secs(10),
        || async { (dropped() >= sent).then_some(()) },
    )
    .await;
    assert_eq!(dropped(), sent, "each junk datagram counted once");
    assert!(a.ping(to_b, LONG).await, "still serving the real peer");
    let text = b.gateway().metrics.render();
    assert!(text.contains("trellis_gateway_drops_total{reason=\"malformed\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_the_tunnel_and_fails_closed_while_down() {
    trellis_test_support::skip_unless_root!();
    let (mut a, b) = two_nodes("gw-restart").await;
    let _echo_b = b.echo(7000).await;
    let key_before = a.gateway().public_key;
    b.apply("c1", 1, vec![a.as_remote("c1", true)]).await;
    a.apply("c1", 1, vec![b.as_remote("c1", true)]).await;
    let to_b = SocketAddr::new(b.pod, 7000);
    assert!(a.ping(to_b, LONG).await);

    a.stop().await;
    // The tunnel route went with the TUN; the backstop refuses instead of leaking.
    let routes = a.netlink.owned_routes(212).await.unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].target, RouteTarget::Unreachable);
    let capture = UnderlayCapture::start(&a, Classifier::between(&a, &b)).await;
    assert!(!a.ping(to_b, SHORT).await);
    // A canary the capture must see, so an empty capture cannot pass for a clean one.
    let canary =
        a.ns.run(|| std::net::UdpSocket::bind("198.18.0.1:0"))
            .unwrap()
            .unwrap();
    canary.send_to(b"trellis-canary", "198.18.0.2:9").unwrap();
    capture
        .wait_for("the canary on the underlay", |f| {
            contains(&f.head, b"trellis-canary")
        })
        .await;
    let capture = capture.finish(&a);
    capture.assert_complete();
    assert_eq!(
        capture.plaintext(),
        0,
        "pod traffic left in plaintext while down"
    );
    assert_eq!(capture.count(Frame::Tunnel), 0, "no gateway, no WireGuard");

    a.start().await;
    assert_eq!(a.gateway().public_key, key_before, "same key after restart");
    a.apply("c1", 1, vec![b.as_remote("c1", true)]).await;
    assert!(a.ping(to_b, LONG).await, "tunnel resumed after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_tun_stops_the_loop_and_leaves_traffic_refused() {
    trellis_test_support::skip_unless_root!();
    let (mut a, b) = two_nodes("gw-tungone").await;
    let _echo_b = b.echo(7000).await;
    a.apply("c1", 1, vec![b.as_remote("c1", true)]).await;
    b.apply("c1", 1, vec![a.as_remote("c1", true)]).await;
    let to_b = SocketAddr::new(b.pod, 7000);
    assert!(a.ping(to_b, LONG).await);

    let task = a.gateway.as_mut().unwrap().take_device_task().unwrap();
    let tun = a.netlink.require_link("trellis0").await.unwrap();
    a.netlink.delete_link(tun.index).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("device loop ends when its TUN is deleted")
        .unwrap();
    assert!(
        matches!(result, Err(trellis_gateway::Error::TunFailed(_))),
        "{result:?}"
    );
    let routes = a.netlink.owned_routes(212).await.unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].target, RouteTarget::Unreachable);
    assert!(!a.ping(to_b, SHORT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_is_answered_with_cookies_while_the_peer_keeps_working() {
    trellis_test_support::skip_unless_root!();
    use boringtun::noise::{Tunn, TunnResult};
    let (mut a, mut b) = common::two_bare_nodes("gw-flood").await;
    a.start().await;
    // A limit of 100 initiations a second (the default is 2,000): what a small flood exceeds.
    let mut config = b.config();
    config.device.handshake_rate_limit = 100;
    b.start_with(&config).await;
    let _echo_b = b.echo(7000).await;
    a.apply("c1", 1, vec![b.as_remote("c1", true)]).await;
    b.apply("c1", 1, vec![a.as_remote("c1", true)]).await;
    let to_b = SocketAddr::new(b.pod, 7000);
    assert!(a.ping(to_b, LONG).await);

    // One valid initiation from a key b does not know (valid MAC1), sent 3000 times over
    // about a second and a half: far past the limit of 100 handshakes a second.
    let stranger = boringtun::x25519::StaticSecret::random_from_rng(rand_core::OsRng);
    let b_public = boringtun::x25519::PublicKey::from(b.gateway().public_key.0);
    let mut tunn = Tunn::new(stranger, b_public, None, None, 1, None);
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, false) else {
        panic!("no initiation");
    };
    let init = init.to_vec();
    let attacker =
        a.ns.run(|| std::net::UdpSocket::bind("198.18.0.1:40000"))
            .unwrap()
            .unwrap();
    attacker.set_nonblocking(true).unwrap();
    let target: SocketAddr = "198.18.0.2:51820".parse().unwrap();
    let flood = async {
        for _ in 0..30 {
            for _ in 0..100 {
                let _ = attacker.send_to(&init, target);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let pings = async {
        let mut ok = 0;
        for _ in 0..5 {
            if a.ping(to_b, Duration::from_secs(2)).await {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ok
    };
    let ((), ok) = tokio::join!(flood, pings);
    assert_eq!(ok, 5, "the established peer kept working during the flood");
    let mut cookies = 0;
    let mut reply = [0u8; 256];
    while let Ok((len, _)) = attacker.recv_from(&mut reply) {
        if len == 64 && reply[0] == 3 {
            cookies += 1;
        }
    }
    let limited = b.gateway().metrics.drops(DropReason::RateLimited);
    assert!(
        cookies > 0 && limited >= cookies,
        "cookies {cookies}, rate limited {limited}"
    );
    let no_peer = b.gateway().metrics.drops(DropReason::NoPeer);
    eprintln!("flood: {cookies} cookies, {limited} rate limited, {no_peer} unknown-key lookups");
    assert!(
        no_peer < 1000,
        "the expensive unknown-key path was bounded: {no_peer} DH lookups for 3000 packets"
    );
}
