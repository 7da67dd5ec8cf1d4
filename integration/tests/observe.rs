//! A real Prometheus server (Debian's `prometheus`) scrapes every daemon of a lab; through its
//! HTTP API every target is up and the gateways' byte counters rise with traffic. `promtool
//! check metrics` passes on every endpoint.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use trellis_integration::TestLab;
use trellis_integration::mesh::{ECHO_PORT, Started, connect_in, http_get};
use trellis_netns::Netns;
use trellis_test_support::poll_until;

const PROMETHEUS: &str = "127.0.0.1:19090";

/// `GET` on Prometheus' API from inside `netns`; the JSON `data`.
fn api(netns: &str, path_and_query: &str) -> Option<Value> {
    let body = http_get(
        netns,
        PROMETHEUS.parse().unwrap(),
        path_and_query,
        Duration::from_secs(3),
    )
    .ok()?;
    let value: Value = serde_json::from_str(&body).ok()?;
    (value["status"] == "success").then(|| value["data"].clone())
}

/// The value of a PromQL expression with a single result.
fn query(netns: &str, promql: &str) -> Option<f64> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let data = api(netns, &format!("/api/v1/query?query={encoded}"))?;
    data["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_every_daemon_and_sees_tunnel_traffic() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("prom");
    lab.up(&[]);
    let nodes = lab.nodes();
    let first_nodes: Vec<_> = nodes
        .iter()
        .filter(|n| n.name.ends_with("/node-0"))
        .collect();
    let targets = |port: u16, nodes: &[&trellis_integration::mesh::LabNode]| -> Vec<String> {
        nodes
            .iter()
            .map(|n| format!("\"{}:{port}\"", n.address))
            .collect()
    };
    let all_nodes: Vec<_> = nodes.iter().collect();
    let gateways = targets(9586, &all_nodes);
    let controllers = targets(9464, &first_nodes);
    let dns = targets(9153, &first_nodes);
    let expected = gateways.len() + controllers.len() + dns.len();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\nscrape_configs:\n\
             - job_name: trellis-gateway\n  static_configs: [{{targets: [{}]}}]\n\
             - job_name: trellis-controller\n  static_configs: [{{targets: [{}]}}]\n\
             - job_name: trellis-dns\n  static_configs: [{{targets: [{}]}}]\n",
            gateways.join(", "),
            controllers.join(", "),
            dns.join(", ")
        ),
    )
    .unwrap();

    // Prometheus runs where a monitoring pod would: on a node, reaching every node's address.
    let watcher = lab.node("c1/node-0").netns;
    let mut command = Command::new("prometheus");
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap());
    let _prometheus = Started(
        Netns::open(&watcher)
            .unwrap()
            .spawn(&mut command)
            .unwrap()
            .expect("prometheus runs (install the prometheus package)"),
    );

    let up = poll_until(Duration::from_secs(40), || {
        let data = api(&watcher, "/api/v1/targets")?;
        let active = data["activeTargets"].as_array()?;
        let healthy = active.iter().filter(|t| t["health"] == "up").count();
        (active.len() == expected && healthy == expected).then_some(healthy)
    });
    assert_eq!(
        up,
        Some(expected),
        "every gateway, controller and DNS up in Prometheus: {:?}\n{}",
        api(&watcher, "/api/v1/targets"),
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );

    // Each controller reports its peer cluster ready.
    let ready = poll_until(Duration::from_secs(10), || {
        let ready = query(&watcher, "sum(trellis_controller_remote_cluster_ready)")?;
        (ready == 2.0).then_some(ready)
    });
    assert_eq!(ready, Some(2.0));

    // Traffic across clusters: 2 MB echoed from c1/pod-0 to c2/pod-2 and back.
    let sum = "sum(trellis_gateway_peer_tx_bytes_total)";
    let before = poll_until(Duration::from_secs(10), || query(&watcher, sum)).unwrap_or(0.0);
    let client = lab.pod("c1/pod-0");
    let server = lab.pod("c2/pod-2");
    let mut stream = connect_in(
        &client.netns,
        SocketAddr::new(server.address.into(), ECHO_PORT),
        Duration::from_secs(5),
    )
    .unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut back = vec![0u8; chunk.len()];
    for _ in 0..32 {
        stream.write_all(&chunk).unwrap();
        stream.read_exact(&mut back).unwrap();
    }
    let after = poll_until(Duration::from_secs(15), || {
        let after = query(&watcher, sum)?;
        (after >= before + 4.0e6).then_some(after)
    });
    assert!(
        after.is_some(),
        "gateway tx bytes rose by the 4 MB sent through tunnels: before {before}, now {:?}",
        query(&watcher, sum)
    );
}

#[test]
fn promtool_accepts_every_metrics_endpoint() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("lint");
    lab.up(&["--nodes", "1", "--pods", "1"]);
    let watcher = lab.node("c1/node-0").netns;
    let mut endpoints = Vec::new();
    for node in lab.nodes() {
        endpoints.push(SocketAddr::new(node.address.into(), 9586));
        if node.name.ends_with("/node-0") {
            endpoints.push(SocketAddr::new(node.address.into(), 9464));
            endpoints.push(SocketAddr::new(node.address.into(), 9153));
        }
    }
    for endpoint in endpoints {
        let text = http_get(&watcher, endpoint, "/metrics", Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{endpoint}/metrics: {e}"));
        assert!(text.contains("trellis_"), "{endpoint}: {text}");
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool runs (install the prometheus package)");
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = promtool.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "promtool on {endpoint}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
