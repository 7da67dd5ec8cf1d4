//! Flows in the lab, as a user sees them with `trellis lab observe`: a connection a policy
//! denies shows DROPPED with both pods named and the policy that isolates the server; an
//! allowed one across clusters shows FORWARDED, encrypted, through which peer; `--follow`
//! prints a new connection within a second; a storm of connections keeps each node's buffer
//! at its size and counts what it overwrote.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_integration::TestLab;
use trellis_integration::mesh::{ECHO_PORT, connect_in, scrape, tcp_echo};

/// Where the lab's gateways serve `/metrics`.
const GATEWAY_METRICS_PORT: u16 = 9586;

/// `trellis lab observe -o json <args>`: the flows printed, one JSON object per line.
fn observe(lab: &TestLab, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["observe", "-o", "json"];
    all.extend_from_slice(args);
    let output = lab.trellis(&all);
    let text = trellis_integration::text(&output);
    assert!(output.status.success(), "lab observe failed:\n{text}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Polls `observe` until a flow satisfies `wanted`.
fn wait_for_flow(lab: &TestLab, args: &[&str], wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let flows = observe(lab, args);
        if let Some(flow) = flows.iter().find(|f| wanted(f)) {
            return flow.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no such flow within 15 s; observed:\n{}",
            flows
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_pod(end: &Value, cluster: &str, namespace: &str, pod: &str) -> bool {
    end["kind"] == "pod"
        && end["cluster"] == cluster
        && end["namespace"] == namespace
        && end["pod_name"] == pod
}

fn echo_addr(lab: &TestLab, pod: &str) -> SocketAddr {
    SocketAddr::new(lab.pod(pod).address.into(), ECHO_PORT)
}

/// `trellis lab observe --follow -o json <args>` running, its lines arriving on a channel.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Follower {
    fn start(lab: &TestLab, args: &[&str]) -> Self {
        let mut child = Command::new(trellis_test_support::bin_path("trellis"))
            .args([
                "lab", "--name", &lab.name, "observe", "--follow", "-o", "json",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("trellis lab observe --follow starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(flow) = serde_json::from_str(&line)
                    && tx.send(flow).is_err()
                {
                    break;
                }
            }
        });
        Self { child, lines }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn denied_and_allowed_connections_across_clusters_and_a_follower() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("fl");
    lab.up(&["--clusters", "2", "--nodes", "2", "--pods", "1"]);

    // c2's pod-1 takes no connection from anyone.
    let deny = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-pod-1, namespace: default}\nspec: {podSelector: {matchLabels: {app: pod-1}}, policyTypes: [Ingress]}\n";
    lab.apply("c2", deny);
    assert!(
        tcp_echo(
            &lab.pod("c1/pod-0").netns,
            echo_addr(&lab, "c2/pod-1"),
            Duration::from_millis(500)
        )
        .is_err(),
        "the policy denies c1/pod-0 → c2/pod-1"
    );
    let dropped = wait_for_flow(
        &lab,
        &["--verdict", "DROPPED", "--to-pod", "c2/default/pod-1"],
        |f| is_pod(&f["source"], "c1", "default", "pod-0"),
    );
    assert!(
        is_pod(&dropped["destination"], "c2", "default", "pod-1"),
        "{dropped}"
    );
    assert_eq!(dropped["l4"]["destination_port"], ECHO_PORT, "{dropped}");
    assert_eq!(dropped["l4"]["protocol"], "TCP", "{dropped}");
    assert_eq!(dropped["l4"]["tcp_flags"]["SYN"], true, "{dropped}");
    assert_eq!(dropped["drop_reason"], "POLICY_DENIED", "{dropped}");
    assert_eq!(dropped["traffic_direction"], "INGRESS", "{dropped}");
    assert_eq!(
        dropped["node_name"], "c2/node-1",
        "seen where the server runs: {dropped}"
    );
    assert_eq!(dropped["denied_by"][0]["name"], "deny-pod-1", "{dropped}");
    assert_eq!(dropped["denied_by"][0]["namespace"], "default", "{dropped}");
    assert_eq!(dropped["source"]["labels"]["app"], "pod-0", "{dropped}");

    // Allowed across clusters: FORWARDED, through the tunnel to c2's node, both ends named.
    tcp_echo(
        &lab.pod("c1/pod-0").netns,
        echo_addr(&lab, "c2/pod-0"),
        Duration::from_secs(3),
    )
    .expect("c1/pod-0 → c2/pod-0 is allowed");
    let forwarded = wait_for_flow(
        &lab,
        &[
            "--verdict",
            "FORWARDED",
            "--from-pod",
            "c1/default/pod-0",
            "--to-pod",
            "c2/default/pod-0",
        ],
        |f| f["event"] == "connection_new" && f["traffic_direction"] == "EGRESS",
    );
    assert_eq!(forwarded["node_name"], "c1/node-0", "{forwarded}");
    assert_eq!(forwarded["ip"]["encrypted"], true, "{forwarded}");
    assert_eq!(forwarded["tunnel"]["peer_cluster"], "c2", "{forwarded}");
    assert_eq!(forwarded["tunnel"]["peer_node"], "node-0", "{forwarded}");
    assert_eq!(
        forwarded["destination"]["node_name"], "node-0",
        "{forwarded}"
    );
    let arrived = wait_for_flow(
        &lab,
        &[
            "--from-pod",
            "c1/default/pod-0",
            "--to-pod",
            "c2/default/pod-0",
            "--node",
            "c2/node-0",
        ],
        |f| f["event"] == "connection_new",
    );
    assert_eq!(arrived["traffic_direction"], "INGRESS", "{arrived}");
    assert_eq!(arrived["verdict"], "FORWARDED", "{arrived}");
    assert_eq!(arrived["ip"]["encrypted"], true, "{arrived}");

    // Asked of c1's controller alone, c2's flows come over peering: those of c1's pods, never
    // what c2's pods say among themselves (which c2 itself shows).
    let via_peer = observe(
        &lab,
        &["--in", "c1", "--peer", "c2", "--node", "c2/node-0", "--all"],
    );
    assert!(
        via_peer
            .iter()
            .any(|f| is_pod(&f["source"], "c1", "default", "pod-0")
                && is_pod(&f["destination"], "c2", "default", "pod-0")),
        "c2's record of c1/pod-0's connection, through c1's controller: {via_peer:?}"
    );
    let involves_c1 =
        |f: &Value| f["source"]["cluster"] == "c1" || f["destination"]["cluster"] == "c1";
    assert!(via_peer.iter().all(involves_c1), "{via_peer:?}");
    let direct = observe(&lab, &["--in", "c2", "--node", "c2/node-0", "--all"]);
    assert!(
        direct.iter().any(|f| !involves_c1(f)),
        "c2 holds flows of its own pods (the lab's first checks): the peer rule is what hid them"
    );

    // A follower sees a new connection within a second of it being made.
    let follower = Follower::start(
        &lab,
        &[
            "--from-pod",
            "c1/default/pod-1",
            "--to-pod",
            "c2/default/pod-0",
        ],
    );
    let (from, to) = (lab.pod("c1/pod-1").netns, echo_addr(&lab, "c2/pod-0"));
    // Until the follower prints anything it may not be listening yet: connect until it does,
    // then let it go quiet.
    let warm = Instant::now();
    loop {
        tcp_echo(&from, to, Duration::from_secs(3)).expect("c1/pod-1 → c2/pod-0");
        if follower
            .lines
            .recv_timeout(Duration::from_millis(300))
            .is_ok()
        {
            break;
        }
        assert!(
            warm.elapsed() < Duration::from_secs(20),
            "the follower printed nothing"
        );
    }
    while follower
        .lines
        .recv_timeout(Duration::from_millis(500))
        .is_ok()
    {}
    let made = Instant::now();
    let stream = connect_in(&from, to, Duration::from_secs(3)).expect("connects");
    let flow = follower
        .lines
        .recv_timeout(Duration::from_secs(5))
        .expect("the follower printed the new connection");
    let latency = made.elapsed();
    drop(stream);
    assert_eq!(flow["event"], "connection_new", "{flow}");
    eprintln!("the follower printed the connection {latency:?} after it was made");
    assert!(
        latency < Duration::from_secs(1),
        "printed {latency:?} after the connection was made"
    );
}

#[test]
fn a_storm_of_connections_keeps_each_buffer_at_its_size_and_counts_the_overwritten() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("fs");
    lab.up(&[
        "--clusters",
        "1",
        "--nodes",
        "2",
        "--pods",
        "1",
        "--flow-buffer",
        "256",
    ]);
    let node = lab.node("c1/node-0");
    let metrics = SocketAddr::new(node.address.into(), GATEWAY_METRICS_PORT);
    let gateway = lab.daemon_pid("c1/node-0/gateway");
    let rss = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{gateway}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let (from, to) = (lab.pod("c1/pod-0").netns, echo_addr(&lab, "c1/pod-1"));
    tcp_echo(&from, to, Duration::from_secs(3)).expect("c1/pod-0 → c1/pod-1");
    let before = rss();

    // 3,000 connections, each opened and closed, within 60 s.
    let started = Instant::now();
    let mut made = 0;
    while made < 3000 && started.elapsed() < Duration::from_secs(60) {
        if connect_in(&from, to, Duration::from_secs(2)).is_ok() {
            made += 1;
        }
    }
    assert_eq!(made, 3000, "3,000 connections within 60 s");
    tcp_echo(&from, to, Duration::from_secs(3)).expect("the data path still answers");

    let overwritten = trellis_test_support::poll_until(Duration::from_secs(10), || {
        scrape(
            &node.netns,
            metrics,
            "trellis_flows_buffer_overwritten_total",
        )
        .filter(|n| *n >= 2000.0)
    })
    .expect("the node's buffer overwrote the oldest flows, counted");
    let kept = observe(&lab, &["--node", "c1/node-0", "--last", "100000"]);
    assert!(
        !kept.is_empty() && kept.len() <= 256,
        "the node keeps at most its buffer's 256 flows, kept {} (overwritten {overwritten})",
        kept.len()
    );
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "the gateway grew by {grown} KiB over 3,000 connections"
    );
}
