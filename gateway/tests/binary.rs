//! The `trellis-gateway run` binary in a node namespace: follows its desired-state file,
//! serves /metrics (checked by promtool when installed) and /healthz, keeps the last state
//! when the file goes away, and stops cleanly on SIGTERM (runs as root).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Node, metric, two_bare_nodes};
use trellis_core::gateway::GatewayState;
use trellis_netns::RouteTarget;
use trellis_test_support::eventually_async;

/// The gateway process, stopped by PID when dropped.
struct Process(Child);

impl Process {
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..250 {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` from the gateway's metrics port on 127.0.0.1:9586, inside the node.
async fn http_get(node: &Node, path: &'static str) -> trellis_http::Response {
    let ns = node.ns.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        trellis_netns::Netns::open_path(&ns)
            .unwrap()
            .run(|| {
                trellis_http::get(
                    "127.0.0.1:9586".parse().unwrap(),
                    path,
                    Duration::from_secs(5),
                )
            })
            .unwrap()
            .expect("the gateway answers on its metrics port")
    })
    .await
    .unwrap()
}

/// The binary's metrics, once every series in `want` is there (gauges such as peers_up follow
/// on the gateway's next timer tick).
async fn metrics_with(node: &Node, want: &[&str]) -> String {
    eventually_async(
        "the metrics to show the change",
        Duration::from_secs(10),
        || async {
            let body = http_get(node, "/metrics").await.body;
            want.iter()
                .all(|series| body.contains(series))
                .then_some(body)
        },
    )
    .await
}

/// The binary's last reconciliation time.
async fn last_reconcile(node: &Node) -> f64 {
    let body = http_get(node, "/metrics").await.body;
    metric(&body, "trellis_gateway_last_reconcile_timestamp_seconds").expect("last reconcile")
}

/// Waits until the binary's file-following loop has run a full round after `since` (Unix
/// seconds): it re-applies every second (`--resync-seconds 1`), after looking at the file, so
/// the second re-application after `since` comes from a round that looked at the file later.
async fn followed_since(node: &Node, since: f64) {
    let mut after = since;
    for _ in 0..2 {
        after = eventually_async(
            "the gateway to re-apply its state",
            Duration::from_secs(10),
            || async {
                let at = last_reconcile(node).await;
                (at > after).then_some(at)
            },
        )
        .await;
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn write_state(path: &std::path::Path, state: &GatewayState) {
    // Write then rename, as a controller would: the reader never sees half a file.
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, serde_json::to_vec_pretty(state).unwrap()).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_follows_its_state_file_and_serves_metrics() {
    trellis_test_support::skip_unless_root!();
    let (mut a, mut b) = two_bare_nodes("gw-bin").await;
    b.start().await;
    let _echo_b = b.echo(7000).await;
    let bin = env!("CARGO_BIN_EXE_trellis-gateway");

    // a's key exists before its gateway runs, so b can be told about it.
    let output = Command::new(bin)
        .args(["public-key", "--state-dir"])
        .arg(a.state_dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let a_key: trellis_core::wgkey::PublicKey = String::from_utf8(output.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let state_file = a.state_dir.path().join("desired.json");
    let with_b = GatewayState {
        revision: 1,
        cluster: "c1".into(),
        nodes: vec![b.as_remote("c1", true)],
    };
    write_state(&state_file, &with_b);
    let mut process = Process(
        Command::new("ip")
            .args(["netns", "exec", a.ns.name(), bin, "run", "--state-dir"])
            .arg(a.state_dir.path())
            .arg("--desired-state")
            .arg(&state_file)
            .args(["--resync-seconds", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    a.gateway = None;
    let mut a_remote = b.as_remote("c1", true);
    a_remote.name = a.name.clone();
    a_remote.public_key = a_key;
    a_remote.endpoint = Some(SocketAddr::new(a.underlay, 51820));
    a_remote.node_ip = Some(a.underlay);
    a_remote.pod_cidrs = a.pod_cidrs.clone();
    b.apply("c1", 1, vec![a_remote]).await;

    let to_b = SocketAddr::new(b.pod, 7000);
    assert!(
        a.ping(to_b, Duration::from_secs(10)).await,
        "binary tunnel up"
    );

    let health = http_get(&a, "/healthz").await;
    assert_eq!(health.status, 200, "{health:?}");
    let body = metrics_with(
        &a,
        &[
            "trellis_gateway_peer_tx_bytes_total{peer=\"c1/node-b\"}",
            "trellis_gateway_peer_rx_packets_total{peer=\"c1/node-b\"}",
            "trellis_gateway_peer_last_handshake_timestamp_seconds{peer=\"c1/node-b\"}",
            "trellis_gateway_peers_configured 1",
            "trellis_gateway_peers_up 1",
            "trellis_gateway_desired_state_revision 1",
            "trellis_gateway_drops_total{reason=\"decrypt_failed\"} 0",
        ],
    )
    .await;
    // At least one handshake (both sides may initiate at once, and each completes one).
    let handshakes = metric(
        &body,
        "trellis_gateway_peer_handshakes_total{peer=\"c1/node-b\"}",
    );
    assert!(handshakes.is_some_and(|n| n >= 1.0), "{handshakes:?}");
    {
        // scripts/install-deps installs promtool (Debian's prometheus package).
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let result = check.wait_with_output().unwrap();
        assert!(
            result.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }

    // The file goes away: once the gateway has looked, the last state keeps running.
    let removed = unix_now();
    std::fs::remove_file(&state_file).unwrap();
    followed_since(&a, removed).await;
    assert!(
        a.ping(to_b, Duration::from_secs(3)).await,
        "source gone, tunnel stays"
    );

    // A broken file changes nothing either.
    let broken = unix_now();
    std::fs::write(&state_file, "{ not json").unwrap();
    followed_since(&a, broken).await;
    assert!(
        a.ping(to_b, Duration::from_secs(3)).await,
        "bad update ignored"
    );

    // Removing b from the file stops traffic; putting it back restores it.
    write_state(
        &state_file,
        &GatewayState {
            revision: 2,
            nodes: vec![],
            ..with_b.clone()
        },
    );
    eventually_async(
        "routes removed after the file dropped b",
        Duration::from_secs(10),
        || async {
            a.netlink
                .owned_routes(212)
                .await
                .unwrap()
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert!(!a.ping(to_b, Duration::from_secs(1)).await);
    write_state(
        &state_file,
        &GatewayState {
            revision: 3,
            ..with_b.clone()
        },
    );
    assert!(
        a.ping(to_b, Duration::from_secs(10)).await,
        "restored from the file"
    );

    // SIGTERM: clean exit, TUN gone, the fail-closed backstop stays.
    let status = process.terminate().expect("gateway exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    let routes = a.netlink.owned_routes(212).await.unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0].target, RouteTarget::Unreachable);
    assert!(a.netlink.link("trellis0").await.unwrap().is_none());

    // Started again with a controller it cannot reach (nothing listens there): the plan it
    // applied last comes back from its state directory, and b is reached without any source.
    let restarted = std::time::Instant::now();
    let _process = Process(
        Command::new("ip")
            .args(["netns", "exec", a.ns.name(), bin, "run", "--state-dir"])
            .arg(a.state_dir.path())
            .args(["--controller", "198.18.0.99:7444", "--node-name", "a"])
            .arg("--advertise-endpoint")
            .arg(SocketAddr::new(a.underlay, 51820).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Pings every 20 ms from the moment the process is started: the first answer is the
    // first packet the new gateway forwarded (and its handshake done).
    assert!(
        a.ping_every(
            a.pod,
            to_b,
            Duration::from_secs(5),
            Duration::from_millis(20)
        )
        .await,
        "the restored plan's tunnel carries traffic"
    );
    let back = restarted.elapsed();
    eprintln!("restart to traffic on the restored plan: {back:?}");
    assert!(
        back < Duration::from_secs(1),
        "traffic {back:?} after the restart, not within a second"
    );
    let ready = http_get(&a, "/readyz").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    let metrics = http_get(&a, "/metrics").await.body;
    for name in [
        "trellis_gateway_plan_restored 1",
        "trellis_gateway_desired_state_revision 3",
        "trellis_gateway_controller_connected 0",
        "trellis_gateway_handshake_initiations_total{reason=\"new_peer\"} 1",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
}
