//! Bulk TCP through two real gateways, with the offloads (TUN TSO/USO, UDP GSO/GRO) on, off,
//! and on one side only: every byte arrives intact and in order (runs as root).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Node, two_bare_nodes};
use trellis_gateway::metrics::DropReason;
use trellis_test_support::eventually_async;

const BYTES: usize = 24 << 20;
const LONG: Duration = Duration::from_secs(10);

async fn start(node: &mut Node, offload: bool) {
    let mut config = node.config();
    config.device.offload = offload;
    node.start_with(&config).await;
}

fn offload_gauge(node: &Node, feature: &str) -> Option<f64> {
    node.metric(&format!(
        "trellis_gateway_offload_enabled{{feature=\"{feature}\"}}"
    ))
}

/// Packets and bytes the gateway has written into its TUN so far (the kernel counts each
/// write as one received packet, a coalesced super-packet included), from the node's
/// `/proc/net/dev`.
fn tun_received(node: &Node) -> (u64, u64) {
    let interface = node.config().interface;
    let table = node
        .ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .unwrap()
        .unwrap();
    let line = table
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(&format!("{interface}:")))
        .unwrap_or_else(|| panic!("no {interface} in /proc/net/dev:\n{table}"));
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|field| field.parse().unwrap())
        .collect();
    (fields[1], fields[0])
}

async fn run(prefix: &str, offload_a: bool, offload_b: bool) {
    let (mut a, mut b) = two_bare_nodes(prefix).await;
    start(&mut a, offload_a).await;
    start(&mut b, offload_b).await;
    a.apply("c1", 1, vec![b.as_remote("c2", true)]).await;
    b.apply("c2", 1, vec![a.as_remote("c1", true)]).await;
    let _echo = b.echo(7000).await;
    assert!(
        a.ping(SocketAddr::new(b.pod, 7000), Duration::from_secs(8))
            .await,
        "tunnel up"
    );
    // The gauges follow within a timer tick.
    for (node, offload) in [(&a, offload_a), (&b, offload_b)] {
        // This machine's kernel (6.18) takes all of them; older ones fall back and say so.
        let expected = if offload { 1.0 } else { 0.0 };
        for feature in ["tun_tso", "tun_uso", "udp_gso", "udp_gro"] {
            let gauge = eventually_async(&format!("the {feature} gauge"), LONG, || async {
                offload_gauge(node, feature)
            })
            .await;
            assert_eq!(gauge, expected, "{feature}");
        }
    }
    let (packets_before, bytes_before) = tun_received(&b);
    common::bulk_echo(&a, &b, BYTES).await;
    // With offloads, the receiving gateway hands a flow's decrypted segments to its TUN as
    // one super-packet (as the kernel's GRO would): one write, one trip through routing and
    // the pod's veth, instead of one per 1,420 bytes. Without, one write per segment.
    let (packets, bytes) = tun_received(&b);
    let bytes_per_write = (bytes - bytes_before) / (packets - packets_before).max(1);
    if offload_b {
        assert!(
            bytes_per_write > 4 * 1420,
            "{bytes_per_write} bytes per TUN write on the receiving side: segments not coalesced"
        );
    } else {
        assert!(
            bytes_per_write <= 1420,
            "{bytes_per_write} bytes per TUN write"
        );
    }
    // The bulk load went to each gateway's first worker (this machine has 2 CPUs, so 2
    // workers); idle again, the packets are spread by CPU once more.
    for node in [&a, &b] {
        if node.metric("trellis_gateway_device_workers") == Some(1.0) {
            continue;
        }
        let first = "trellis_gateway_steering_changes_total{to=\"first\"}";
        eventually_async("steering to the first worker under load", LONG, || async {
            node.metric(first).is_some_and(|n| n > 0.0).then_some(())
        })
        .await;
        eventually_async("steering back to spread when idle", LONG, || async {
            (node.metric("trellis_gateway_steering_spread") == Some(1.0)).then_some(())
        })
        .await;
    }
    for node in [&a, &b] {
        for reason in [
            DropReason::Malformed,
            DropReason::DecryptFailed,
            DropReason::TooBig,
            DropReason::TunError,
        ] {
            assert_eq!(
                node.gateway().metrics.drops(reason),
                0,
                "{reason:?} drops on {} (offloads a {offload_a}, b {offload_b})",
                node.name
            );
        }
        let stats = node.gateway().device().stats().await.unwrap();
        assert!(stats[0].rx_bytes > BYTES as u64 && stats[0].tx_bytes > BYTES as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tcp_with_offloads_arrives_intact() {
    trellis_test_support::skip_unless_root!();
    run("gw-off-on", true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tcp_without_offloads_arrives_intact() {
    trellis_test_support::skip_unless_root!();
    run("gw-off-none", false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tcp_between_an_offloading_and_a_plain_gateway_arrives_intact() {
    trellis_test_support::skip_unless_root!();
    run("gw-off-mix", true, false).await;
}
