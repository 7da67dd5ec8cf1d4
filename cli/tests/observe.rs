//! `trellis observe` against a small fake flows listener: what it asks for (the query string
//! the server receives), what it prints (compact lines, the JSON as served, lines of a
//! followed stream as they come) and how it fails (a refused query, nobody listening, a bad
//! flag), with exit code 1. And `trellis lab observe` against fakes in namespaces of a lab's
//! shape.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::StatusCode;
use tokio::sync::mpsc;
use trellis_http::{Limits, Reply, Routes};
use trellis_netns::Netlink;
use trellis_netns::testing::TempNetns;

const DROPPED: &str = r#"{"time":"2026-12-07T05:40:00.123000000Z","node_name":"c2/c2-node-0","verdict":"DROPPED","drop_reason":"POLICY_DENIED","event":"packet_dropped","ip":{"source":"10.1.0.5","destination":"10.2.0.7","encrypted":true},"l4":{"protocol":"TCP","source_port":41234,"destination_port":80,"tcp_flags":{"SYN":true}},"source":{"kind":"pod","cluster":"c1","namespace":"x","pod_name":"a","labels":{"app":"a"}},"destination":{"kind":"pod","cluster":"c2","namespace":"y","pod_name":"b"},"traffic_direction":"INGRESS","denied_by":[{"cluster":"c2","namespace":"y","name":"deny-all"}],"tunnel":{"peer_cluster":"c1","peer_node":"c1-node-0"}}"#;

const CLOSED: &str = r#"{"time":"2026-12-07T05:40:01.500000000Z","node_name":"c1/c1-node-0","verdict":"FORWARDED","event":"connection_closed","ip":{"source":"10.1.0.5","destination":"10.1.1.9","encrypted":false},"l4":{"protocol":"UDP","source_port":5353,"destination_port":53},"source":{"kind":"pod","cluster":"c1","namespace":"x","pod_name":"a"},"destination":{"kind":"pod","cluster":"c1","namespace":"kube-system","pod_name":"dns-0"},"traffic_direction":"EGRESS","allowed_by":[{"cluster":"c1","namespace":"x","name":"allow-dns","rule":0}],"counters":{"packets_sent":2,"bytes_sent":140,"packets_received":2,"bytes_received":2300}}"#;

const DROPPED_LINE: &str = "Dec  7 05:40:00.123 c2/c2-node-0: c1/x/a:41234 -> c2/y/b:80 tcp SYN \
     DROPPED POLICY_DENIED (denied by y/deny-all) INGRESS encrypted via c1/c1-node-0";

const CLOSED_LINE: &str = "Dec  7 05:40:01.500 c1/c1-node-0: c1/x/a:5353 -> c1/kube-system/dns-0:53 \
     udp FORWARDED (x/allow-dns) EGRESS closed: 2 pkts 140 B -> / 2 pkts 2.2 KiB <-";

/// Answers `/flows` with `recorded` (NDJSON), refuses `namespace=nowhere` as a controller
/// refuses a bad query, and for `follow=true` sends the first recorded line at once and the
/// rest through `follow`.
struct FakeController {
    recorded: String,
    queries: Mutex<Vec<String>>,
    follow: Mutex<Option<mpsc::Sender<Bytes>>>,
    looks: std::sync::atomic::AtomicU64,
}

impl FakeController {
    fn new(recorded: String) -> Self {
        Self {
            recorded,
            queries: Mutex::default(),
            follow: Mutex::default(),
            looks: Default::default(),
        }
    }

    fn queries(&self) -> Vec<String> {
        self.queries.lock().unwrap().clone()
    }

    /// `GET /flows/nodes`: a query for `namespace=busy` finds node n1 busy (its skip count
    /// grows with each look); otherwise no skips.
    fn sources(&self) -> Reply {
        let busy = self.queries().iter().any(|q| q.contains("namespace=busy"));
        let looks = self.looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let skipped = if busy {
            format!(r#","skipped":{{"node n1":{{"busy":{looks}}}}}"#)
        } else {
            String::new()
        };
        Reply::json(format!(r#"{{"nodes":["n1"],"peers":[]{skipped}}}"#).into_bytes())
    }
}

impl Routes for FakeController {
    async fn get(&self, _path: &str) -> Reply {
        Reply::not_found()
    }

    async fn get_with_query<'a>(&'a self, path: &'a str, query: &'a str) -> Reply {
        if path == "/flows/nodes" {
            return self.sources();
        }
        self.queries.lock().unwrap().push(query.to_string());
        if path != "/flows" {
            Reply::not_found()
        } else if query.contains("namespace=nowhere") {
            Reply::error(
                StatusCode::BAD_REQUEST,
                "flow query parameter namespace:\nno cluster has a namespace \"nowhere\"\n",
            )
        } else if query.contains("follow=true") {
            let (sender, receiver) = mpsc::channel(4);
            let first = self.recorded.lines().next().unwrap_or_default();
            sender
                .send(Bytes::from(format!("{first}\n")))
                .await
                .unwrap();
            *self.follow.lock().unwrap() = Some(sender);
            Reply::streaming("application/x-ndjson", receiver)
        } else {
            Reply::new(
                StatusCode::OK,
                "application/x-ndjson",
                self.recorded.clone(),
            )
        }
    }
}

/// The two flows above, with a blank line between (which is skipped).
fn recorded() -> String {
    format!("{DROPPED}\n\n{CLOSED}\n")
}

/// The fake on 127.0.0.1 (a free port), served on a thread of its own for the test's life.
fn start() -> (Arc<FakeController>, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (serve(listener, recorded()), addr)
}

fn serve(listener: std::net::TcpListener, recorded: String) -> Arc<FakeController> {
    listener.set_nonblocking(true).unwrap();
    let fake = Arc::new(FakeController::new(recorded));
    let routes = fake.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            trellis_http::serve(listener, routes, Limits::default(), |_| {}).await
        });
    });
    fake
}

fn trellis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn prints_compact_lines_for_the_query_the_flags_make() {
    let (fake, addr) = start();
    let out = trellis(&[
        "observe",
        "--controller",
        &addr,
        "--namespace",
        "x",
        "--pod",
        "c2/y/b",
        "--verdict",
        "dropped",
        "--port",
        "80",
        "--since",
        "2026-12-07T05:00:00Z",
        "--peer",
        "*",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{DROPPED_LINE}\n{CLOSED_LINE}\n")
    );
    assert_eq!(
        fake.queries(),
        ["namespace=x&pod=c2%2Fy%2Fb&peer=*&verdict=DROPPED&port=80\
          &since=2026-12-07T05%3A00%3A00.000000000Z"]
    );
}

#[test]
fn a_node_skipped_while_answering_is_warned_of() {
    let (_fake, addr) = start();
    let quiet = trellis(&["observe", "--controller", &addr]);
    assert!(quiet.status.success(), "{}", text(&quiet.stderr));
    assert_eq!(text(&quiet.stderr), "");
    let out = trellis(&["observe", "--controller", &addr, "--namespace", "busy"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{DROPPED_LINE}\n{CLOSED_LINE}\n"),
        "the flows that came are printed"
    );
    assert!(
        text(&out.stderr)
            .contains("flows may be missing: the controller went without node n1 (busy)"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn json_output_is_the_served_lines_and_the_default_is_the_last_20() {
    let (fake, addr) = start();
    let out = trellis(&["observe", "--controller", &addr, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{DROPPED}\n{CLOSED}\n"));
    assert_eq!(fake.queries(), ["last=20"]);
}

#[test]
fn a_followed_stream_prints_each_flow_as_it_arrives() {
    let (fake, addr) = start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["observe", "--controller", &addr, "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    // The stream is still open: the line must come before it ends.
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, format!("{DROPPED_LINE}\n"));
    assert_eq!(fake.queries(), ["follow=true"]);
    let sender = fake.follow.lock().unwrap().take().unwrap();
    sender
        .blocking_send(Bytes::from(format!("{CLOSED}\n")))
        .unwrap();
    let mut second = String::new();
    stdout.read_line(&mut second).unwrap();
    assert_eq!(second, format!("{CLOSED_LINE}\n"));
    drop(sender);
    let status = child.wait().unwrap();
    assert!(status.success(), "the stream's end ends the command");
}

#[test]
fn a_refused_query_is_the_controllers_message_and_exit_1() {
    let (_fake, addr) = start();
    let out = trellis(&["observe", "--controller", &addr, "--namespace", "nowhere"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        "error: the controller refused the query: flow query parameter namespace: no cluster \
         has a namespace \"nowhere\"\n"
    );
}

#[test]
fn nobody_listening_says_how_to_reach_the_listener() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let out = trellis(&[
        "observe",
        "--controller",
        &format!("127.0.0.1:{port}"),
        "--timeout",
        "2s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: cannot connect to 127.0.0.1:{port}: ")),
        "{stderr}"
    );
    assert!(
        stderr.contains("kubectl -n <namespace> port-forward deploy/trellis-controller 4245"),
        "{stderr}"
    );
}

#[test]
fn a_bad_flag_value_is_refused_before_asking() {
    let (fake, addr) = start();
    let out = trellis(&["observe", "--controller", &addr, "--port", "99999"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "error: --port: \"99999\" is not a port (1-65535)\n"
    );
    assert!(fake.queries().is_empty(), "nothing was sent");
}

/// A lab of two clusters whose controllers are fakes, each on 127.0.0.1:4245 inside its own
/// namespace (the cluster's first node's, as in a real lab): the state file says where they
/// are, and goes with the guard.
struct FakeLab {
    name: String,
    controllers: Vec<Arc<FakeController>>,
    _namespaces: Vec<TempNetns>,
}

impl Drop for FakeLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(format!("/run/trellis/lab/{}", self.name));
    }
}

/// A flow of `c1`/`c2` at second `at` of 2026-12-07 05:40.
fn flow_at(cluster: &str, at: u32) -> String {
    CLOSED
        .replace("05:40:01.500000000", &format!("05:40:{at:02}.000000000"))
        .replace(
            "\"c1/c1-node-0\"",
            &format!("\"{cluster}/{cluster}-node-0\""),
        )
}

fn compact_at(cluster: &str, at: u32) -> String {
    CLOSED_LINE
        .replace("05:40:01.500", &format!("05:40:{at:02}.000"))
        .replace("c1/c1-node-0:", &format!("{cluster}/{cluster}-node-0:"))
}

fn fake_lab(recorded: [&[u32]; 2]) -> FakeLab {
    let name = format!("obs-{}", std::process::id());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut namespaces = Vec::new();
    let mut controllers = Vec::new();
    let mut clusters = Vec::new();
    for (index, times) in recorded.into_iter().enumerate() {
        let cluster = format!("c{}", index + 1);
        let ns = TempNetns::new("tl-obs").unwrap();
        runtime.block_on(async {
            let netlink = Netlink::connect_in(&ns).unwrap();
            let lo = netlink.require_link("lo").await.unwrap();
            netlink.set_up(lo.index).await.unwrap();
        });
        let listener = ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:4245"))
            .unwrap()
            .unwrap();
        let lines: String = times
            .iter()
            .map(|at| format!("{}\n", flow_at(&cluster, *at)))
            .collect();
        controllers.push(serve(listener, lines));
        clusters.push(serde_json::json!({
            "name": cluster,
            "pod_cidr": format!("10.{}.0.0/16", index + 1),
            "nodes": [{
                "name": "node-0",
                "netns": ns.name(),
                "pod_cidr": format!("10.{}.0.0/24", index + 1),
                "address": format!("198.18.{}.10", index + 1),
                "switch_port": format!("{cluster}n0"),
                "pods": [],
            }],
        }));
        namespaces.push(ns);
    }
    let dir = format!("/run/trellis/lab/{name}");
    std::fs::create_dir_all(&dir).unwrap();
    let state = serde_json::json!({
        "lab": name,
        "switch_netns": format!("tl-{name}-switch"),
        "clusters": clusters,
    });
    std::fs::write(format!("{dir}/state.json"), state.to_string()).unwrap();
    FakeLab {
        name,
        controllers,
        _namespaces: namespaces,
    }
}

/// One test for the lab (the state file's name is the process's): merged answers, `--in`,
/// and following both clusters at once.
#[test]
fn lab_observe_asks_each_clusters_controller_in_its_namespace() {
    trellis_test_support::skip_unless_root!();
    let lab = fake_lab([&[10, 30, 50], &[20, 40]]);
    let [c1, c2] = [&lab.controllers[0], &lab.controllers[1]];

    let out = trellis(&["lab", "--name", &lab.name, "observe", "--last", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        [
            compact_at("c1", 30),
            compact_at("c2", 40),
            compact_at("c1", 50)
        ]
        .map(|line| format!("{line}\n"))
        .concat(),
        "merged by time, the last 3 overall"
    );
    assert_eq!(
        (c1.queries(), c2.queries()),
        (vec!["last=3".into()], vec!["last=3".into()])
    );

    let out = trellis(&[
        "lab",
        "--name",
        &lab.name,
        "observe",
        "--in",
        "c2",
        "-o",
        "json",
        "--cluster",
        "c2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{}\n{}\n", flow_at("c2", 20), flow_at("c2", 40))
    );
    assert_eq!(c1.queries().len(), 1, "--in c2 leaves c1 alone");
    assert_eq!(c2.queries()[1], "cluster=c2&last=20");

    let out = trellis(&["lab", "--name", &lab.name, "observe", "--in", "c9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--in c9: lab"),
        "{}",
        text(&out.stderr)
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["lab", "--name", &lab.name, "observe", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut read_line = || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        line.trim_end().to_string()
    };
    let mut first = [read_line(), read_line()];
    first.sort();
    assert_eq!(first, [compact_at("c1", 10), compact_at("c2", 20)]);
    let sender = lab.controllers[1].follow.lock().unwrap().take().unwrap();
    sender
        .blocking_send(Bytes::from(format!("{}\n", flow_at("c2", 59))))
        .unwrap();
    assert_eq!(read_line(), compact_at("c2", 59), "a new flow as it comes");
    child.kill().unwrap();
    child.wait().unwrap();
}
