//! Faults in a lab: a controller killed and brought back, a gateway killed and restarted, a
//! whole cluster stopped (its pods leave DNS and the clusterset VIP), a cluster whose pod CIDR overlaps another's.
//!
//! One at a time: they measure how long things take.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trellis_integration::mesh::{ECHO_PORT, LiveStream, connect_in, http_get, scrape, tcp_echo};
use trellis_integration::{TestLab, text};
use trellis_test_support::poll_until;

const TIMEOUT: Duration = Duration::from_secs(3);
const GATEWAY_METRICS: u16 = 9586;
const CONTROLLER_METRICS: u16 = 9464;
/// The lab's controllers withdraw a silent peer after this lease.
const LEASE: Duration = Duration::from_secs(10);

fn echo_addr(lab: &TestLab, pod: &str) -> SocketAddr {
    SocketAddr::new(lab.pod(pod).address.into(), ECHO_PORT)
}

/// A gateway's metric, read from inside its node.
fn gateway_metric(lab: &TestLab, node: &str, series: &str) -> Option<f64> {
    let node = lab.node(node);
    scrape(
        &node.netns,
        SocketAddr::new(node.address.into(), GATEWAY_METRICS),
        series,
    )
}

#[test]
fn a_dead_controller_leaves_the_data_plane_running_and_resyncs_without_dropping_tunnels() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("ctl");
    lab.up(&[]);
    let client = lab.pod("c1/pod-0");
    let stream =
        LiveStream::start(connect_in(&client.netns, echo_addr(&lab, "c2/pod-2"), TIMEOUT).unwrap());
    let handshakes = r#"trellis_gateway_peer_handshakes_total{peer="c2/node-1"}"#;
    let before = gateway_metric(&lab, "c1/node-0", handshakes).expect("a session with c2/node-1");
    let vip = poll_until(Duration::from_secs(10), || {
        let answer = lab.dig("c1/pod-0", "echo.demo.svc.clusterset.local");
        (answer.len() == 1).then_some(answer)
    })
    .expect("c1's clusterset VIP in DNS");

    lab.kill_daemon("c1/controller");
    std::thread::sleep(Duration::from_secs(2));
    // Without its controller the cluster's gateways keep their tunnels: new connections
    // across clusters still work, both ways.
    tcp_echo(&client.netns, echo_addr(&lab, "c2/pod-3"), TIMEOUT).unwrap();
    tcp_echo(
        &lab.pod("c2/pod-1").netns,
        echo_addr(&lab, "c1/pod-3"),
        TIMEOUT,
    )
    .unwrap();
    // DNS keeps answering from what it last had, and the VIP keeps its translations.
    assert_eq!(lab.dig("c1/pod-0", "echo.demo.svc.clusterset.local"), vip);
    tcp_echo(
        &client.netns,
        SocketAddr::new(vip[0].parse().unwrap(), ECHO_PORT),
        TIMEOUT,
    )
    .unwrap();
    let connected = r"trellis_gateway_controller_connected";
    assert_eq!(gateway_metric(&lab, "c1/node-0", connected), Some(0.0));

    let start = lab.trellis(&["start", "c1/controller"]);
    assert!(start.status.success(), "{}", text(&start));
    let back = poll_until(Duration::from_secs(15), || {
        lab.nodes()
            .iter()
            .filter(|n| n.cluster == "c1")
            .all(|n| gateway_metric(&lab, &n.name, connected) == Some(1.0))
            .then_some(())
    });
    assert!(
        back.is_some(),
        "the gateways re-registered with the new controller"
    );
    // The restarted controller peers again with c2.
    let node = lab.node("c1/node-0");
    let peered = poll_until(Duration::from_secs(15), || {
        scrape(
            &node.netns,
            SocketAddr::new(node.address.into(), CONTROLLER_METRICS),
            r#"trellis_controller_remote_cluster_ready{cluster="c2"}"#,
        )
        .filter(|ready| *ready == 1.0)
    });
    assert!(peered.is_some(), "c1's controller is ready with c2 again");
    tcp_echo(&client.netns, echo_addr(&lab, "c2/pod-0"), TIMEOUT).unwrap();
    // The resync re-applied the same plan: no tunnel was torn down and set up again.
    assert_eq!(
        gateway_metric(&lab, "c1/node-0", handshakes),
        Some(before),
        "no new handshake with c2/node-1"
    );
    let (longest, echoed) = stream.finish("the stream across clusters");
    eprintln!(
        "stream across the controller's death and restart: longest echo wait {longest:?} over {echoed} echoes"
    );
    assert!(longest < Duration::from_secs(1), "stalled {longest:?}");
}

#[test]
fn a_killed_gateway_fails_closed_and_its_tunnels_come_back_after_restart() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("gw");
    lab.up(&[]);
    let local = lab.pod("c1/pod-2");
    assert_eq!(local.node, "c1/node-1");
    let remote = lab.pod("c2/pod-0");
    tcp_echo(&local.netns, echo_addr(&lab, "c2/pod-0"), TIMEOUT).unwrap();

    lab.kill_daemon("c1/node-1/gateway");
    std::thread::sleep(Duration::from_millis(500));
    // With its gateway gone the node has no tunnel; the backstop routes refuse the traffic
    // rather than let it out in plaintext.
    let refused = tcp_echo(&local.netns, echo_addr(&lab, "c2/pod-0"), TIMEOUT);
    assert!(
        refused.is_err(),
        "cross-cluster traffic must not flow without the gateway"
    );
    let route = lab.routes("c1/node-1", "10.2.0.0/24");
    assert!(route.contains("unreachable"), "{route}");

    let restarted = Instant::now();
    let start = lab.trellis(&["start", "c1/node-1/gateway"]);
    assert!(start.status.success(), "{}", text(&start));
    let both_ways = poll_until(Duration::from_secs(10), || {
        (tcp_echo(
            &local.netns,
            echo_addr(&lab, "c2/pod-0"),
            Duration::from_secs(1),
        )
        .is_ok()
            && tcp_echo(
                &remote.netns,
                echo_addr(&lab, "c1/pod-2"),
                Duration::from_secs(1),
            )
            .is_ok())
        .then(|| restarted.elapsed())
    });
    let took = both_ways.expect("tunnels back within 10 s of the restart");
    eprintln!("gateway restart to traffic both ways: {took:?}");
}

/// Who answered each of `rounds` HTTP requests to `vip`:80 from `netns` (the first word of
/// the echo server's answer, `c2/pod-3`), or the first failure.
fn vip_servers(netns: &str, vip: &str, rounds: usize) -> Result<Vec<String>, String> {
    let at = SocketAddr::new(vip.parse().unwrap(), 80);
    (0..rounds)
        .map(|round| {
            http_get(netns, at, "/", TIMEOUT)
                .map(|body| {
                    body.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string()
                })
                .map_err(|e| format!("request {round}: {e}"))
        })
        .collect()
}

#[test]
fn a_stopped_cluster_leaves_dns_and_the_vip_within_the_lease_and_returns_when_started() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("gone");
    lab.up(&[]);
    let client = lab.pod("c1/pod-0");
    let c2_pods = |answer: &[String]| answer.iter().filter(|ip| ip.starts_with("10.2.")).count();
    let both = poll_until(Duration::from_secs(10), || {
        let headless = lab.dig("c1/pod-0", "echo-pods.demo.svc.clusterset.local");
        let vip = lab.dig("c1/pod-0", "echo.demo.svc.clusterset.local");
        (c2_pods(&headless) == 4 && vip.len() == 1).then_some(vip)
    });
    let vip = both.expect("c2's pods in c1's DNS, and c1's VIP")[0].clone();
    let served_by_c2 = poll_until(Duration::from_secs(10), || {
        let served = vip_servers(&client.netns, &vip, 30).ok()?;
        served.iter().any(|s| s.starts_with("c2/")).then_some(())
    });
    assert!(served_by_c2.is_some(), "c1's VIP reaches c2's pods");

    let stopped = Instant::now();
    let stop = lab.trellis(&["stop", "c2"]);
    assert!(stop.status.success(), "{}", text(&stop));
    let gone = poll_until(LEASE + Duration::from_secs(6), || {
        let headless = lab.dig("c1/pod-0", "echo-pods.demo.svc.clusterset.local");
        (!headless.is_empty() && c2_pods(&headless) == 0).then(|| stopped.elapsed())
    });
    let took = gone.expect("c2's pods left c1's DNS within the lease");
    eprintln!("c2 stopped -> gone from c1's DNS in {took:?} (lease {LEASE:?})");
    // c1 still exports the service: its VIP stays, now served by c1's own pods only.
    assert_eq!(
        lab.dig("c1/pod-0", "echo.demo.svc.clusterset.local"),
        std::slice::from_ref(&vip)
    );
    let mut last = Err(String::new());
    let own_only = poll_until(Duration::from_secs(5), || {
        last = vip_servers(&client.netns, &vip, 30);
        let served = last.as_ref().ok()?;
        served
            .iter()
            .all(|s| s.starts_with("c1/"))
            .then(|| stopped.elapsed())
    });
    let took = own_only.unwrap_or_else(|| panic!("c1's VIP never left c2: {last:?}"));
    eprintln!("c2 stopped -> c1's VIP served by c1's pods only in {took:?}");

    let start = lab.trellis(&["start", "c2"]);
    assert!(start.status.success(), "{}", text(&start));
    let back = poll_until(Duration::from_secs(15), || {
        let served = vip_servers(&client.netns, &vip, 30).ok()?;
        served.iter().any(|s| s.starts_with("c2/")).then_some(())
    });
    assert!(
        back.is_some(),
        "c2's pods serve c1's VIP once c2 runs again"
    );
}

#[test]
fn a_cluster_overlapping_another_is_refused_naming_both() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("clash");
    lab.up(&["--pods", "1"]);
    // c2 comes back claiming the pod CIDR of c1's node-1.
    let stop = lab.trellis(&["stop", "c2/controller"]);
    assert!(stop.status.success(), "{}", text(&stop));
    let objects = lab.state_dir().join("clusters/c2/cluster.yaml");
    let yaml = std::fs::read_to_string(&objects).unwrap();
    assert!(yaml.contains("\"10.2.1.0/24\""));
    std::fs::write(&objects, yaml.replace("\"10.2.1.0/24\"", "\"10.1.1.0/24\"")).unwrap();
    let start = lab.trellis(&["start", "c2/controller"]);
    assert!(start.status.success(), "{}", text(&start));

    let node = lab.node("c1/node-0");
    let status_at = SocketAddr::new(node.address.into(), CONTROLLER_METRICS);
    let refusal = poll_until(LEASE + Duration::from_secs(10), || {
        let status = http_get(&node.netns, status_at, "/status", TIMEOUT).ok()?;
        let status: serde_json::Value = serde_json::from_str(&status).ok()?;
        status["remotes"]
            .as_array()?
            .iter()
            .find(|r| r["cluster"] == "c2")?["refused_claims"]
            .as_array()?
            .iter()
            .filter_map(|r| r.as_str())
            .find(|r| r.contains("10.1.1.0/24"))
            .map(str::to_string)
    })
    .expect("c1 refuses c2's node with the overlapping pod CIDR");
    assert!(
        refusal.contains("c2") && refusal.contains("c1"),
        "the refusal names both clusters: {refusal}"
    );
    let log = std::fs::read_to_string(lab.state_dir().join("clusters/c1/controller.log")).unwrap();
    assert!(
        log.contains("refusing a peer's claim") && log.contains("10.1.1.0/24"),
        "the refusal is logged:\n{log}"
    );
    // c1 keeps its own node's pods: still routed to c1/node-1, still reachable.
    let route = lab.routes("c1/node-0", "10.1.1.0/24");
    assert!(
        route
            .lines()
            .next()
            .is_some_and(|r| r.contains("via 198.18.1.11")),
        "{route}"
    );
    tcp_echo(
        &lab.pod("c1/pod-0").netns,
        echo_addr(&lab, "c1/pod-1"),
        TIMEOUT,
    )
    .unwrap();
}

/// A TCP echo stream from pod `from` to the echo server of pod `to`.
fn live_stream(lab: &TestLab, from: &str, to: &str) -> LiveStream {
    let client = lab.pod(from);
    LiveStream::start(connect_in(&client.netns, echo_addr(lab, to), TIMEOUT).unwrap())
}

/// Stops an underlay capture and checks that it saw the tunnels and no packet with a pod
/// address (plaintext pod traffic).
fn assert_only_tunnels(capture: trellis_integration::mesh::Started, file: &std::path::Path) {
    // With -U tcpdump writes each packet as it comes; a moment for the last ones.
    std::thread::sleep(Duration::from_millis(200));
    drop(capture);
    let tunnel = trellis_integration::mesh::count_matching(file, "udp port 51820");
    let plaintext = trellis_integration::mesh::count_matching(file, "ip and net 10.0.0.0/8");
    assert!(tunnel > 100, "the capture saw the tunnels: {tunnel}");
    assert_eq!(plaintext, 0, "pod packets in plaintext on the underlay");
}

/// `trellis lab roll <args> -o json`, which must succeed: one restart per line.
fn roll(lab: &TestLab, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["roll"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let output = lab.trellis(&all);
    assert!(output.status.success(), "lab roll: {}", text(&output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON restart per line"))
        .collect()
}

/// Prints each restart's flows and checks that every one answered again within `limit` of
/// the restarted gateways being ready.
fn assert_back_within(restarts: &[serde_json::Value], limit: f64) {
    for restart in restarts {
        for flow in restart["flows"].as_array().expect("flows") {
            let after = flow["after_ready_seconds"].as_f64();
            eprintln!(
                "{} {}: {} {} {} -> {}: longest gap {:.2} s, answered {after:?} s after ready",
                restart["gateway"],
                restart["signal"],
                flow["direction"],
                flow["path"],
                flow["source"],
                flow["target"],
                flow["longest_gap_seconds"].as_f64().unwrap_or(f64::NAN),
            );
            let after = after.unwrap_or_else(|| panic!("never answered again: {flow}"));
            assert!(
                after < limit,
                "{} answered {after:.2} s after the restart completed: {flow}",
                restart["gateway"]
            );
        }
    }
}

#[test]
fn a_restarted_gateway_has_every_tunnel_back_both_ways_within_a_second() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("back");
    // Three nodes per cluster: traffic to the restarted node comes from other nodes than the
    // ones its own pod talks to (which its gateway would reach on demand anyway).
    lab.up(&["--nodes", "3", "--pods", "1", "--node-encryption", "on"]);
    for signal in ["kill", "term"] {
        let restarts = roll(&lab, &["c2/node-1", "--signal", signal]);
        assert_eq!(restarts.len(), 1);
        let flows = restarts[0]["flows"].as_array().unwrap();
        assert_eq!(flows.len(), 4, "to and from, within and across clusters");
        assert_back_within(&restarts, 1.0);
    }
    // Both ends of tunnels at once: the two gateways' handshakes cross.
    let restarts = roll(
        &lab,
        &["c1/node-0,c2/node-1", "--together", "--signal", "kill"],
    );
    assert_back_within(&restarts, 1.0);
}

#[test]
fn a_rolling_update_of_every_gateway_keeps_tcp_connections_and_leaks_nothing() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("roll");
    lab.up(&["--node-encryption", "on"]);
    let stream = |from: &str, to: &str| live_stream(&lab, from, to);
    let streams = [
        ("c1/pod-0 -> c2/pod-2", stream("c1/pod-0", "c2/pod-2")),
        ("c2/pod-1 -> c1/pod-3", stream("c2/pod-1", "c1/pod-3")),
        ("c1/pod-1 -> c1/pod-2", stream("c1/pod-1", "c1/pod-2")),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("roll.pcap");
    let capture = trellis_integration::mesh::capture_underlay(&lab, &file);

    let restarts = roll(&lab, &["--signal", "term"]);
    assert_eq!(restarts.len(), 4, "every gateway of both clusters");
    assert_back_within(&restarts, 1.0);
    for (what, stream) in streams {
        let (longest, echoed) = stream.finish(what);
        eprintln!("{what}: longest stall {longest:?} over {echoed} echoes, no reset");
    }
    assert_only_tunnels(capture, &file);
}

#[test]
fn no_plaintext_leaves_a_node_while_its_gateway_dies_restarts_or_waits_for_its_controller() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("closed");
    lab.up(&["--node-encryption", "on"]);
    let stream = |from: &str, to: &str| live_stream(&lab, from, to);
    // c1/pod-2 is behind c1/node-1, the node whose gateway dies.
    let streams = [
        (
            "c1/pod-2 -> c1/pod-0 (another node)",
            stream("c1/pod-2", "c1/pod-0"),
        ),
        (
            "c1/pod-2 -> c2/pod-1 (another cluster)",
            stream("c1/pod-2", "c2/pod-1"),
        ),
        (
            "c2/pod-3 -> c1/pod-3 (into the node)",
            stream("c2/pod-3", "c1/pod-3"),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("closed.pcap");
    let capture = trellis_integration::mesh::capture_underlay(&lab, &file);

    // Killed, and started again a second later.
    lab.kill_daemon("c1/node-1/gateway");
    std::thread::sleep(Duration::from_secs(1));
    let start = lab.trellis(&["start", "c1/node-1/gateway"]);
    assert!(start.status.success(), "{}", text(&start));
    std::thread::sleep(Duration::from_secs(1));

    // Killed while its controller is gone, and started before the controller is back: it
    // runs on the plan it restores.
    let stop = lab.trellis(&["stop", "c1/controller"]);
    assert!(stop.status.success(), "{}", text(&stop));
    lab.kill_daemon("c1/node-1/gateway");
    std::thread::sleep(Duration::from_secs(1));
    let start = lab.trellis(&["start", "c1/node-1/gateway"]);
    assert!(start.status.success(), "{}", text(&start));
    std::thread::sleep(Duration::from_secs(1));
    tcp_echo(
        &lab.pod("c1/pod-3").netns,
        echo_addr(&lab, "c2/pod-0"),
        TIMEOUT,
    )
    .expect("a new connection across clusters on the restored plan");
    let start = lab.trellis(&["start", "c1/controller"]);
    assert!(start.status.success(), "{}", text(&start));
    std::thread::sleep(Duration::from_secs(1));

    for (what, stream) in streams {
        let (longest, echoed) = stream.finish(what);
        eprintln!("{what}: longest stall {longest:?} over {echoed} echoes");
    }
    assert_only_tunnels(capture, &file);
}

#[test]
fn a_pod_cannot_send_with_its_neighbours_address() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("spoof");
    // Node encryption off: what crosses between nodes is visible on the underlay as it is.
    lab.up(&[]);
    let spoofer = lab.pod("c1/pod-0");
    let neighbour = lab.pod("c1/pod-1");
    assert_eq!(spoofer.node, neighbour.node);
    let target = lab.pod("c1/pod-2");
    assert_ne!(spoofer.node, target.node);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spoof.pcap");
    let capture = trellis_integration::mesh::capture_underlay(&lab, &file);
    let to = std::net::SocketAddrV4::new(target.address, 9999);
    let across = std::net::SocketAddrV4::new(lab.pod("c2/pod-0").address, 9999);
    trellis_integration::mesh::send_udp_as(&spoofer.netns, neighbour.address, to, 20).unwrap();
    trellis_integration::mesh::send_udp_as(&spoofer.netns, "10.9.9.9".parse().unwrap(), to, 20)
        .unwrap();
    trellis_integration::mesh::send_udp_as(&spoofer.netns, neighbour.address, across, 20).unwrap();
    // The same socket with the pod's own address: these do leave.
    trellis_integration::mesh::send_udp_as(&spoofer.netns, spoofer.address, to, 20).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(capture);
    let own = format!("udp and dst port 9999 and src host {}", spoofer.address);
    let spoofed = format!(
        "udp and dst port 9999 and (src host {} or src host 10.9.9.9)",
        neighbour.address
    );
    assert!(
        trellis_integration::mesh::count_matching(&file, &own) >= 20,
        "the pod's own packets cross the underlay"
    );
    assert_eq!(
        trellis_integration::mesh::count_matching(&file, &spoofed),
        0,
        "spoofed packets left the node"
    );
    // The node's gateway counts them (it reads the kernel's counters every 5 s).
    let counted = poll_until(Duration::from_secs(8), || {
        gateway_metric(
            &lab,
            &spoofer.node,
            r#"trellis_gateway_spoofed_packets_dropped_total{family="ipv4"}"#,
        )
        .filter(|dropped| *dropped >= 60.0)
    });
    assert!(counted.is_some(), "60 spoofed packets counted on the node");
}
