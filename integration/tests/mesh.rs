//! The whole mesh end to end, in labs: the workload reached over TCP and HTTP from every pod,
//! services found through DNS and reached across clusters, the encryption toggle under a live
//! stream as the underlay sees it.
//!
//! The tests run one at a time: they measure stalls, and two labs building at once on a small
//! machine would measure each other.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_integration::mesh::{
    ECHO_PORT, HTTP_PORT, LiveStream, capture_and_count, connect_in, http_get, tcp_echo,
};
use trellis_integration::{TestLab, text};
use trellis_test_support::poll_until;

const TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn every_pod_reaches_every_pod_over_tcp_and_http() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("tcp");
    lab.up(&[]);
    let pods = lab.pods();
    assert_eq!(pods.len(), 8);
    let mut failures = Vec::new();
    for from in &pods {
        for to in pods.iter().filter(|p| p.name != from.name) {
            if let Err(e) = tcp_echo(
                &from.netns,
                SocketAddr::new(to.address.into(), ECHO_PORT),
                TIMEOUT,
            ) {
                failures.push(format!("{} -> {} tcp: {e}", from.name, to.name));
            }
            match http_get(
                &from.netns,
                SocketAddr::new(to.address.into(), HTTP_PORT),
                "/",
                TIMEOUT,
            ) {
                // Pod to pod is routed, never translated: the server sees the client's own
                // address, across nodes and clusters alike.
                Ok(body) => {
                    let want = format!("{} answered {}:", to.name, from.address);
                    if !body.starts_with(&want) {
                        failures.push(format!("{} -> {} http: {body:?}", from.name, to.name));
                    }
                }
                Err(e) => failures.push(format!("{} -> {} http: {e}", from.name, to.name)),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn dns_names_lead_to_the_other_clusters_services_and_pods() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("svc");
    lab.up(&[]);
    for (client, own, remote) in [("c1/pod-0", "c1", "c2"), ("c2/pod-3", "c2", "c1")] {
        let client_netns = lab.pod(client).netns;
        // The ClusterIP Service exported by both clusters: one address, the client cluster's
        // own clusterset VIP (10.(100+N).240.0/20 for cluster cN).
        let vip = poll_until(Duration::from_secs(10), || {
            let answer = lab.dig(client, "echo.demo.svc.clusterset.local");
            match answer.as_slice() {
                [one] => one.parse::<std::net::Ipv4Addr>().ok(),
                _ => None,
            }
        })
        .expect("one VIP for echo.demo");
        let own_octet = 100 + own[1..].parse::<u8>().unwrap();
        assert!(
            vip.octets()[1] == own_octet && vip.octets()[2] >= 240,
            "{client}: {vip} is not {own}'s VIP"
        );

        // The VIP, as an application would use the answer: translated on the client's own
        // node to a pod of either cluster; several connections reach the remote cluster's
        // pods on both of its nodes.
        let service = std::net::IpAddr::V4(vip);
        tcp_echo(&client_netns, SocketAddr::new(service, ECHO_PORT), TIMEOUT)
            .unwrap_or_else(|e| panic!("{client} -> {vip}:{ECHO_PORT}: {e}"));
        let mut served: Vec<String> = Vec::new();
        let spread = poll_until(Duration::from_secs(10), || {
            served = (0..40)
                .filter_map(|_| {
                    http_get(&client_netns, SocketAddr::new(service, 80), "/", TIMEOUT).ok()
                })
                .filter_map(|body| body.split_whitespace().next().map(str::to_string))
                .filter(|server| server.starts_with(remote))
                .collect();
            served.sort();
            served.dedup();
            (served.len() >= 3).then_some(())
        });
        assert!(
            spread.is_some(),
            "{client} -> {vip}: remote servers {served:?}"
        );

        // The headless export resolves to every pod of both clusters; a remote one answers.
        let pods = poll_until(Duration::from_secs(10), || {
            let answer = lab.dig(client, "echo-pods.demo.svc.clusterset.local");
            (answer.len() == 8).then_some(answer)
        })
        .expect("echo-pods.demo resolves to all 8 pods");
        let remote_pod = lab
            .pods()
            .into_iter()
            .find(|p| p.cluster == remote && pods.contains(&p.address.to_string()))
            .expect("a remote pod in the headless answer");
        let body = http_get(
            &client_netns,
            SocketAddr::new(remote_pod.address.into(), HTTP_PORT),
            "/",
            TIMEOUT,
        )
        .unwrap();
        assert!(body.starts_with(&remote_pod.name), "{body}");
        // A pod's own hostname under its cluster.
        let hostname = remote_pod.name.split('/').nth(1).unwrap();
        let named = lab.dig(
            client,
            &format!("{hostname}.{remote}.echo-pods.demo.svc.clusterset.local"),
        );
        assert_eq!(named, [remote_pod.address.to_string()]);
    }
}

/// Waits until c1/node-0 routes c1/node-1's pods as `want` says, and gives the other node a
/// moment to apply the same push.
fn wait_for_route(lab: &TestLab, want: &str) {
    lab.wait_for_route("c1/node-0", "10.1.1.0/24", want);
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn the_encryption_toggle_keeps_live_streams_and_the_underlay_shows_it() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("wire");
    lab.up(&[]);
    let client = lab.pod("c1/pod-0");
    let same_cluster = lab.pod("c1/pod-2");
    let other_cluster = lab.pod("c2/pod-2");
    assert_ne!(client.node, same_cluster.node);
    wait_for_route(&lab, "via 198.18.1.11");

    let within = connect_in(
        &client.netns,
        SocketAddr::new(same_cluster.address.into(), ECHO_PORT),
        TIMEOUT,
    )
    .unwrap();
    let across = connect_in(
        &client.netns,
        SocketAddr::new(other_cluster.address.into(), ECHO_PORT),
        TIMEOUT,
    )
    .unwrap();
    let within = LiveStream::start(within);
    let across = LiveStream::start(across);
    let dir = tempfile::tempdir().unwrap();
    let plain_within = format!(
        "tcp and host {} and host {}",
        client.address, same_cluster.address
    );
    let plain_across = "tcp and net 10.2.0.0/16";
    let tunnel_within = "udp port 51820 and host 198.18.1.10 and host 198.18.1.11";

    let filters = [plain_within.as_str(), tunnel_within, plain_across];
    let phase = |name: &str| {
        let file = dir.path().join(format!("{name}.pcap"));
        capture_and_count(&lab, &file, Duration::from_secs(2), &filters)
    };
    let switch = |mode: &str, route: &str| {
        let output = lab.trellis(&["encryption", mode]);
        assert!(output.status.success(), "{}", text(&output));
        wait_for_route(&lab, route);
    };

    // Off: the pods' TCP crosses the underlay as it is; cross-cluster traffic never does.
    let off = phase("off");
    assert!(off[0] > 50, "plaintext pod TCP seen while off: {off:?}");
    assert_eq!(
        off[2], 0,
        "cross-cluster traffic is always encrypted: {off:?}"
    );

    switch("on", "dev trellis0");
    let on = phase("on");
    assert_eq!(
        on[0], 0,
        "no plaintext pod TCP between nodes once on: {on:?}"
    );
    assert!(
        on[1] > 50,
        "the stream rides WireGuard between the nodes: {on:?}"
    );
    assert_eq!(
        on[2], 0,
        "cross-cluster traffic is always encrypted: {on:?}"
    );

    switch("off", "via 198.18.1.11");
    let again = phase("off-again");
    assert!(again[0] > 50, "plaintext again once off: {again:?}");
    assert_eq!(
        again[1], 0,
        "no tunnel traffic between the nodes once off: {again:?}"
    );
    assert_eq!(
        again[2], 0,
        "cross-cluster traffic is always encrypted: {again:?}"
    );

    let (longest_within, echoed_within) = within.finish("the stream within c1");
    let (longest_across, echoed_across) = across.finish("the stream to c2");
    assert!(
        longest_within < Duration::from_secs(1),
        "the stream within c1 stalled {longest_within:?} (of {echoed_within} echoes)"
    );
    assert!(
        longest_across < Duration::from_secs(1),
        "the stream to c2 stalled {longest_across:?} (of {echoed_across} echoes)"
    );
}
