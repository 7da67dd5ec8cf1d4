//! `trellis lab` as a person uses it: up, exec, status, a refused second up, down.

use trellis_integration::{TestLab, text};

#[test]
fn lab_up_meshes_two_clusters_and_down_removes_everything() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("lab");
    // The default lab: 2 clusters x 2 nodes x 2 pods, controllers peered over QUIC + mTLS,
    // gateways following them.
    let up = lab.trellis(&["up"]);
    let output = text(&up);
    assert!(up.status.success(), "{output}");
    assert!(
        output
            .lines()
            .any(|l| l.trim_start().starts_with("c1/pod-0 ") && l.contains("-> c1/pod-1")),
        "{output}"
    );
    assert!(output.contains("c2/pod-3"), "{output}");
    assert!(
        !output.contains("FAIL"),
        "every pod reaches every other: {output}"
    );
    assert_eq!(
        lab.namespaces().len(),
        13,
        "the switch, four nodes and eight pods"
    );

    let ping = lab.trellis(&[
        "exec", "c1/pod-2", "--", "ping", "-c", "1", "-W", "3", "10.2.1.2",
    ]);
    assert!(ping.status.success(), "{}", text(&ping));
    // DNS from inside a pod: the demo service exported by both clusters is one address, the
    // client cluster's clusterset VIP (from c1's range, 10.101.240.0/20).
    let mut answer = String::new();
    for _ in 0..50 {
        let dig = lab.trellis(&[
            "exec",
            "c1/pod-0",
            "--",
            "dig",
            "+short",
            "@198.18.1.10",
            "echo.demo.svc.clusterset.local",
        ]);
        answer = String::from_utf8_lossy(&dig.stdout).to_string();
        if answer.lines().count() == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let vips: Vec<std::net::Ipv4Addr> = answer.lines().filter_map(|l| l.parse().ok()).collect();
    assert!(
        matches!(vips.as_slice(), [vip] if vip.octets()[..2] == [10, 101] && vip.octets()[2] >= 240),
        "{answer}"
    );
    // The summary says how to reach it.
    assert!(
        output
            .contains("curl -s http://$(dig +short @198.18.1.10 echo.demo.svc.clusterset.local)/"),
        "{output}"
    );

    let failing = lab.trellis(&["exec", "c1/pod-0", "--", "false"]);
    assert_eq!(
        failing.status.code(),
        Some(1),
        "exec passes the command's exit status on"
    );
    let unknown = lab.trellis(&["exec", "c9/pod-0", "--", "true"]);
    assert!(
        !unknown.status.success() && text(&unknown).contains("no pod or node"),
        "{}",
        text(&unknown)
    );

    let again = lab.trellis(&["up"]);
    assert!(!again.status.success(), "a second up is refused");
    assert!(text(&again).contains("already up"), "{}", text(&again));
    assert_eq!(lab.namespaces().len(), 13, "the refused up built nothing");

    // Healthy once every gateway has reported its handshakes (they report every 5 s).
    let mut status = lab.trellis(&["status"]);
    for _ in 0..15 {
        if status.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        status = lab.trellis(&["status"]);
    }
    assert!(
        status.status.success() && text(&status).contains("10.2.1.2"),
        "{}",
        text(&status)
    );
    assert!(text(&status).contains("TUNNEL PEER"), "{}", text(&status));

    assert_eq!(
        lab.processes().len(),
        18,
        "a controller, a DNS and a clusterset proxy per cluster, a gateway per node, an echo server per pod"
    );

    let down = lab.trellis(&["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        lab.namespaces().is_empty(),
        "namespaces left: {:?}",
        lab.namespaces()
    );
    assert!(
        lab.processes().is_empty(),
        "processes left: {:?}",
        lab.processes()
    );
    assert!(!lab.state_dir().exists(), "state directory left");
    assert!(lab.mounts().is_empty(), "mounts left: {:?}", lab.mounts());
}

#[test]
fn down_cleans_up_after_a_lab_whose_state_was_lost() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("lost");
    assert!(
        lab.trellis(&["up", "--pods", "1", "--nodes", "2"])
            .status
            .success()
    );
    let before = lab.processes();
    assert_eq!(
        before.len(),
        14,
        "10 daemons and 4 echo servers: {before:?}"
    );
    // As after a crash that lost the state file: down still finds the namespaces by name,
    // and the processes by the namespaces they run in.
    std::fs::remove_dir_all(lab.state_dir()).unwrap();
    let down = lab.trellis(&["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(lab.namespaces().is_empty());
    assert!(
        lab.processes().is_empty(),
        "processes left: {:?}",
        lab.processes()
    );
    // A process that exited may linger as a zombie until init reaps it; that is not running.
    let survivors: Vec<&u32> = before
        .iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
        })
        .collect();
    assert!(survivors.is_empty(), "still running: {survivors:?}");
    assert!(lab.mounts().is_empty(), "mounts left: {:?}", lab.mounts());
}

/// Waits until node c1/node-0 routes c1/node-1's pods through `want` (a route fragment such as
/// "dev trellis0" or "via 198.18.1.11").
fn wait_for_route(lab: &TestLab, want: &str) -> String {
    lab.wait_for_route("c1/node-0", "10.1.1.0/24", want)
}

#[test]
fn node_encryption_switches_at_runtime_without_restarts() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("enc");
    let up = lab.trellis(&["up", "--pods", "1"]);
    assert!(up.status.success(), "{}", text(&up));
    let daemons_before = lab.processes();
    // Off by default: the other node's pods are routed plainly over the underlay.
    wait_for_route(&lab, "via 198.18.1.11");

    let on = lab.trellis(&["encryption", "on"]);
    assert!(on.status.success(), "{}", text(&on));
    let route = wait_for_route(&lab, "dev trellis0");
    assert!(
        route.contains("unreachable"),
        "fail-closed backstop missing: {route}"
    );
    let ping = lab.trellis(&[
        "exec", "c1/pod-0", "--", "ping", "-c", "1", "-W", "3", "10.1.1.1",
    ]);
    assert!(
        ping.status.success(),
        "pods reach each other through the tunnel: {}",
        text(&ping)
    );

    let off = lab.trellis(&["encryption", "off"]);
    assert!(off.status.success(), "{}", text(&off));
    wait_for_route(&lab, "via 198.18.1.11");
    let ping = lab.trellis(&[
        "exec", "c1/pod-0", "--", "ping", "-c", "1", "-W", "3", "10.1.1.1",
    ]);
    assert!(ping.status.success(), "{}", text(&ping));
    assert_eq!(lab.processes(), daemons_before, "no process was restarted");
}
