//! A node's agent restarted under policy never leaves a window where denied traffic passes:
//! the `trellis-gateway` binary, following a scripted controller that streams it policy
//! inputs, is killed (SIGKILL) and started again, with its controller reachable and without,
//! while a pod the policy denies sends new flows to another pod all the time. Not one gets
//! through; allowed traffic flows again once the gateway is back. Runs as root, in namespaces
//! the test creates.

mod policy_rig;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use policy_rig::*;
use trellis_core::agent::{AgentHello, GatewayDesired, GatewayUpdate, MAX_AGENT_FRAME};
use trellis_core::framing::{FrameDecoder, encode_json_frame};
use trellis_core::keyed::Keyed;
use trellis_core::policy::{
    Identity, IdentityKey, IdentityLabels, LabelSelector, NetworkPolicy, PolicyEndpoint,
    PolicyInputs, PolicyPeer, PolicyRule,
};
use trellis_test_support::eventually;

const CONTROLLER: &str = "127.0.0.1:7444";
const METRICS: &str = "127.0.0.1:9586";

/// A controller that answers every gateway with one snapshot, then sends it the updates
/// queued with `send`, and listens to its reports.
struct ScriptedController {
    stop: Arc<AtomicBool>,
    later: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScriptedController {
    fn start(rig: &Rig, desired: GatewayDesired) -> Self {
        let listener = rig
            .node
            .run(|| TcpListener::bind(CONTROLLER))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let running = stop.clone();
        let later = Arc::new(std::sync::Mutex::new(Vec::new()));
        let queued = later.clone();
        let frame = encode_json_frame(&GatewayUpdate::Snapshot(desired), "update", MAX_AGENT_FRAME)
            .unwrap();
        let thread = std::thread::spawn(move || {
            while !running.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (frame, running, queued) =
                            (frame.clone(), running.clone(), queued.clone());
                        std::thread::spawn(move || serve(stream, &frame, &queued, &running));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            stop,
            later,
            thread: Some(thread),
        }
    }

    /// Queues an update for the gateway connected now.
    fn send(&self, update: &GatewayUpdate) {
        self.later
            .lock()
            .unwrap()
            .push(encode_json_frame(update, "update", MAX_AGENT_FRAME).unwrap());
    }
}

/// Reads the gateway's hello (closing any other kind of connection), sends the snapshot, then reads (and drops) what it reports
/// until told to stop or the gateway goes.
fn serve(
    mut stream: std::net::TcpStream,
    snapshot: &[u8],
    later: &std::sync::Mutex<Vec<Vec<u8>>>,
    stop: &AtomicBool,
) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut buffer = [0u8; 4096];
    let mut greeted = false;
    while !stop.load(Ordering::Relaxed) {
        if greeted {
            for frame in later.lock().unwrap().drain(..) {
                if stream.write_all(&frame).is_err() {
                    return;
                }
            }
        }
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => decoder.push(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => return,
        }
        if !greeted && let Ok(Some(hello)) = decoder.next_json::<AgentHello>() {
            // The gateway's other connection, its flow channel, is not what this serves.
            if !matches!(hello.role, trellis_core::agent::AgentRole::Gateway(_)) {
                return;
            }
            greeted = true;
            if stream.write_all(snapshot).is_err() {
                return;
            }
        }
    }
}

impl Drop for ScriptedController {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The gateway process, killed when dropped.
struct Gateway(Child);

impl Gateway {
    fn start(rig: &Rig, state_dir: &std::path::Path) -> Self {
        let bin = env!("CARGO_BIN_EXE_trellis-gateway");
        // `ip netns exec` execs the gateway: the child is the gateway itself.
        Self(
            Command::new("ip")
                .args(["netns", "exec", rig.node.name(), bin, "run", "--state-dir"])
                .arg(state_dir)
                .args(["--controller", CONTROLLER, "--node-name", "a"])
                .args(["--advertise-endpoint", "198.18.0.1:51820"])
                .args(["--metrics-addr", METRICS, "--resync-seconds", "1"])
                .arg("--ready-file")
                .arg(state_dir.join("gateway.ready"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(rig: &Rig, path: &str) -> Option<trellis_http::Response> {
    rig.node
        .run(|| trellis_http::get(METRICS.parse().unwrap(), path, Duration::from_secs(2)))
        .unwrap()
        .ok()
}

/// Waits until the gateway is ready and reports `digest` as the policy in the kernel.
fn enforced(rig: &Rig, digest: &str) {
    eventually(
        "the gateway ready with the policy in the kernel",
        Duration::from_secs(15),
        || {
            let ready = get(rig, "/readyz")?.status == 200;
            let status: serde_json::Value =
                serde_json::from_str(&get(rig, "/status")?.body).ok()?;
            (ready && status["policy"]["digest"] == digest).then_some(())
        },
    );
}

fn endpoint(pod: &Pod, name: &str) -> PolicyEndpoint {
    PolicyEndpoint {
        cluster: "c1".parse().unwrap(),
        namespace: "x".into(),
        name: name.into(),
        addresses: vec![pod.v4(), pod.v6()],
        node: "a".into(),
        identity: 1,
        named_ports: vec![],
    }
}

/// Counts what arrives on `socket` until `stop`.
fn count_arrivals(socket: UdpSocket, stop: Arc<AtomicBool>) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 64];
        loop {
            if socket.recv_from(&mut buffer).is_ok() {
                counted.fetch_add(1, Ordering::Relaxed);
            } else if stop.load(Ordering::Relaxed) {
                return;
            }
        }
    });
    count
}

/// The policy inputs of node `a` with these pods on it (all in one identity).
fn inputs_with(pods: &[(&Pod, &str)]) -> PolicyInputs {
    let mut inputs = PolicyInputs::new("c1".parse().unwrap());
    let identity = Identity {
        key: IdentityKey {
            cluster: "c1".parse().unwrap(),
            number: 1,
        },
        labels: IdentityLabels {
            namespace: "x".into(),
            ..IdentityLabels::default()
        },
    };
    inputs.identities.insert(identity.key(), identity);
    for (pod, name) in pods {
        let e = endpoint(pod, name);
        inputs.endpoints.insert(e.key(), e);
    }
    inputs
}

#[test]
fn a_pod_the_controller_announces_is_let_through_by_an_update_of_the_table() {
    trellis_test_support::skip_unless_root!();
    let rig = Rig::new("pol-delta", 2);
    let (a, b) = (&rig.pods[0], &rig.pods[1]);
    let state_dir = tempfile::tempdir().unwrap();
    let before = inputs_with(&[(b, "b")]);
    let after = inputs_with(&[(a, "a"), (b, "b")]);
    let desired = GatewayDesired {
        revision: 1,
        node: "a".into(),
        node_encryption: true,
        peers: vec![],
        routes: vec![],
        policy: Some(before.clone()),
    };
    let controller = ScriptedController::start(&rig, desired.clone());
    let _gateway = Gateway::start(&rig, state_dir.path());
    enforced(&rig, &before.digest());
    assert!(!a.udp_reaches(b, b.v4(), 5000), "A not announced yet");

    // The controller announces A: a delta of the policy inputs, applied as an update.
    let mut next = desired.clone();
    next.revision = 2;
    next.policy = Some(after.clone());
    controller.send(&desired.delta_to(&next).expect("a change"));
    enforced(&rig, &after.digest());
    assert!(a.udp_reaches(b, b.v4(), 5000), "A known now");
    let status: serde_json::Value =
        serde_json::from_str(&get(&rig, "/status").unwrap().body).unwrap();
    assert_eq!(status["policy"]["revision"], 2);
    let local = status["policy"]["local_pods"].as_array().unwrap();
    assert!(
        local.contains(&serde_json::json!(a.v4().to_string())),
        "{status}"
    );
    let metrics = get(&rig, "/metrics").unwrap().body;
    assert!(
        metrics.contains("trellis_policy_apply_duration_seconds_count 2"),
        "the first table, then one update: {metrics}"
    );
    assert!(
        metrics.contains("trellis_policy_apply_failures_total 0"),
        "{metrics}"
    );
    // Stored with the plan, for the next start.
    let stored: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(state_dir.path().join("last-plan.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stored["revision"], 2);
    assert_eq!(stored["policy"]["node"], "a");
}

/// Node `a`'s three pods, each its own identity (`role: <name>`), and the NetworkPolicy
/// `b-from-c`: B takes connections from C only.
fn b_takes_only_c(pods: &[(&Pod, &str)]) -> PolicyInputs {
    let cluster: trellis_core::cluster::ClusterId = "c1".parse().unwrap();
    let mut inputs = PolicyInputs::new(cluster.clone());
    for (number, (pod, name)) in pods.iter().enumerate() {
        let identity = Identity {
            key: IdentityKey {
                cluster: cluster.clone(),
                number: number as u32 + 1,
            },
            labels: IdentityLabels {
                namespace: "x".into(),
                pod_labels: [("role".to_string(), name.to_string())].into(),
                ..IdentityLabels::default()
            },
        };
        let mut e = endpoint(pod, name);
        e.identity = identity.key.number;
        inputs.identities.insert(identity.key(), identity);
        inputs.endpoints.insert(e.key(), e);
    }
    let role = |name: &str| LabelSelector {
        match_labels: [("role".to_string(), name.to_string())].into(),
        match_expressions: vec![],
    };
    let policy = NetworkPolicy {
        namespace: "x".into(),
        name: "b-from-c".into(),
        pod_selector: role("b"),
        ingress: Some(vec![PolicyRule {
            peers: vec![PolicyPeer::Pods {
                namespace_selector: None,
                pod_selector: Some(role("c")),
            }],
            ports: vec![],
        }]),
        egress: None,
    };
    inputs.policies.insert(policy.key(), policy);
    inputs
}

#[test]
fn a_gateway_killed_and_restarted_under_policy_never_lets_denied_traffic_through() {
    trellis_test_support::skip_unless_root!();
    let rig = Rig::new("pol-restart", 3);
    let (a, b, c) = (&rig.pods[0], &rig.pods[1], &rig.pods[2]);
    let state_dir = tempfile::tempdir().unwrap();
    // A, B and C are the node's pods; a NetworkPolicy lets only C reach B.
    let inputs = b_takes_only_c(&[(a, "a"), (b, "b"), (c, "c")]);
    let digest = inputs.digest();
    let desired = GatewayDesired {
        revision: 1,
        node: "a".into(),
        node_encryption: true,
        peers: vec![],
        routes: vec![],
        policy: Some(inputs),
    };

    let controller = ScriptedController::start(&rig, desired.clone());
    let gateway = Gateway::start(&rig, state_dir.path());
    enforced(&rig, &digest);
    assert!(state_dir.path().join("gateway.ready").exists());

    // Probes: new flows A -> B (denied) and C -> B (allowed), all the time, bounded.
    let stop = Arc::new(AtomicBool::new(false));
    let denied = count_arrivals(b.udp_socket(b.v4(), 5000), stop.clone());
    let allowed = count_arrivals(b.udp_socket(b.v4(), 5001), stop.clone());
    let sent = Arc::new(AtomicU64::new(0));
    let prober = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let (a_ns, c_ns, to) = (a.ns_path(), c.ns_path(), b.v4());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                send_udp_from(&a_ns, to, 5000);
                send_udp_from(&c_ns, to, 5001);
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // While no agent runs, the probes go on meeting the table it left.
    let probed_while_down = || {
        let from = sent.load(Ordering::Relaxed);
        eventually(
            "probes while the agent is down",
            Duration::from_secs(10),
            || (sent.load(Ordering::Relaxed) > from + 100).then_some(()),
        );
    };
    let flowing = |what: &str| {
        let from = allowed.load(Ordering::Relaxed);
        eventually(what, Duration::from_secs(15), || {
            (allowed.load(Ordering::Relaxed) > from + 10).then_some(())
        });
    };
    flowing("allowed traffic flows");

    // Killed: the table stays in the kernel, enforcing; started again with the controller
    // there, the stored policy first, then the controller's.
    gateway.kill();
    assert!(
        rig.nft_list().contains("_ingress_forward"),
        "the table outlives the agent"
    );
    probed_while_down();
    let gateway = Gateway::start(&rig, state_dir.path());
    enforced(&rig, &digest);
    flowing("allowed traffic flows after a restart with the controller");

    // Killed again, and started with no controller to hear from: the stored policy alone.
    gateway.kill();
    drop(controller);
    probed_while_down();
    let started = Instant::now();
    let _gateway = Gateway::start(&rig, state_dir.path());
    enforced(&rig, &digest);
    eprintln!(
        "ready on the restored policy {:?} after the start",
        started.elapsed()
    );
    let metrics = get(&rig, "/metrics").unwrap().body;
    assert!(
        metrics.contains("trellis_gateway_plan_restored 1"),
        "{metrics}"
    );
    assert!(metrics.contains("trellis_policy_enabled 1"), "{metrics}");
    flowing("allowed traffic flows after a restart without the controller");

    stop.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    let sent = sent.load(Ordering::Relaxed);
    // No allowed probe was ever dropped: wait until the receiver has read them all.
    eventually(
        "the last allowed probes read",
        Duration::from_secs(5),
        || (allowed.load(Ordering::Relaxed) == sent).then_some(()),
    );
    let denied = denied.load(Ordering::Relaxed);
    let dropped = trellis_gateway::nft::counters(Some(&rig.node), "trellis_policy").unwrap();
    eprintln!("{sent} probe pairs: {denied} denied through, table counters {dropped:?}");
    assert!(sent > 300, "the probes ran throughout ({sent})");
    assert!(
        dropped["drop_ingress"] >= sent,
        "B's policy dropped every one of A's probes: {dropped:?}"
    );
    assert_eq!(
        denied, 0,
        "denied datagrams passed while the agent restarted"
    );
}
