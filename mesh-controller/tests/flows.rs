//! The controller's flow relay end to end on loopback: fake nodes speak real frames on the
//! agent port (its plaintext mode), readers ask the real flows listener over HTTP, and two
//! controllers ask each other over real QUIC peering with mutual TLS.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use trellis_controller::agent::{self, AgentAuth};
use trellis_controller::certs::{self, CertifiedKey, Validity};
use trellis_controller::flows::{self, FlowSettings, FlowSources};
use trellis_controller::hub::{Hub, HubConfig};
use trellis_controller::metrics::Metrics;
use trellis_controller::peering::{PeerConfig, Peering, PeeringConfig};
use trellis_controller::source::SourceState;
use trellis_controller::tls::TlsMaterial;
use trellis_core::agent::{AgentHello, AgentRole, FlowChannel};
use trellis_core::cluster::fixture::{cluster, id};
use trellis_core::flow::protocol::{FlowCommand, FlowReply, MAX_FLOWS_PER_FRAME};
use trellis_core::flow::{Flow, FlowRequest};
use trellis_core::framing::{FrameDecoder, encode_json_frame};

const WAIT: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// The fixtures' seconds count from here: in the past, as a peer's flows must be (a controller
/// shows none dated ahead of its clock).
const BASE_SECOND: u64 = 1_700_000_000;

/// A connection at second `at` from `from` to `to` (`cluster/namespace/pod`), seen on `node`.
fn flow(at: u64, node: &str, from: &str, to: &str) -> Flow {
    trellis_core::flow::fixture::connection(BASE_SECOND, at, node, from, to)
}

fn second(f: &Flow) -> u64 {
    f.time.duration_since(UNIX_EPOCH).unwrap().as_secs() - BASE_SECOND
}

/// How a fake node answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As a gateway does: its recorded flows, then (following) new ones.
    Answer,
    /// Never answers anything.
    Silent,
    /// As `Answer`, and a follower is sent the latest recorded flow at once: a flow recorded
    /// between the controller's subscription and its history query, which comes both ways.
    RecordedWhileSubscribing,
}

async fn send_reply(wr: &mut tokio::net::tcp::OwnedWriteHalf, reply: FlowReply) {
    let _ = wr
        .write_all(&encode_json_frame(&reply, "reply", 4 << 20).unwrap())
        .await;
}

/// A node's flow channel, spoken by hand on the agent port.
struct FakeNode {
    record: mpsc::UnboundedSender<Flow>,
    commands: Arc<Mutex<Vec<FlowCommand>>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    async fn connect(agent: SocketAddr, node: &str, recorded: Vec<Flow>, mode: Mode) -> FakeNode {
        let mut tcp = TcpStream::connect(agent).await.unwrap();
        let hello = AgentHello {
            token: None,
            role: AgentRole::Flows(FlowChannel { node: node.into() }),
        };
        tcp.write_all(&encode_json_frame(&hello, "hello", 1 << 20).unwrap())
            .await
            .unwrap();
        let (record, mut new_flows) = mpsc::unbounded_channel::<Flow>();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log, gone) = (commands.clone(), closed.clone());
        let task = tokio::spawn(async move {
            let (mut rd, mut wr) = tcp.into_split();
            let mut recorded = recorded;
            let mut followers: BTreeMap<u64, FlowRequest> = BTreeMap::new();
            let mut decoder = FrameDecoder::new(1 << 20);
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    n = rd.read(&mut buf) => {
                        let n = n.unwrap_or(0);
                        if n == 0 {
                            gone.store(true, std::sync::atomic::Ordering::SeqCst);
                            return;
                        }
                        decoder.push(&buf[..n]);
                        while let Some(command) = decoder.next_json::<FlowCommand>().unwrap() {
                            log.lock().unwrap().push(command.clone());
                            if mode == Mode::Silent {
                                continue;
                            }
                            match command {
                                FlowCommand::Query { id, request } => {
                                    let matching: Vec<Flow> = recorded
                                        .iter()
                                        .filter(|f| request.filter.matches(f))
                                        .cloned()
                                        .collect();
                                    if request.follow {
                                        if mode == Mode::RecordedWhileSubscribing
                                            && let Some(latest) = matching.last()
                                        {
                                            send_reply(&mut wr, FlowReply::Flows { id, flows: vec![latest.clone()] }).await;
                                        }
                                        followers.insert(id, *request.clone());
                                    }
                                    if !request.follow || request.last.is_some() {
                                        let n = request.last.unwrap_or(usize::MAX).min(matching.len());
                                        for batch in matching[matching.len() - n..].chunks(MAX_FLOWS_PER_FRAME) {
                                            send_reply(&mut wr, FlowReply::Flows { id, flows: batch.to_vec() }).await;
                                        }
                                    }
                                    if !request.follow {
                                        send_reply(&mut wr, FlowReply::End { id, error: None }).await;
                                    }
                                }
                                FlowCommand::Cancel { id } => {
                                    followers.remove(&id);
                                }
                            }
                        }
                    }
                    Some(flow) = new_flows.recv() => {
                        for (id, request) in &followers {
                            if request.filter.matches(&flow) {
                                send_reply(&mut wr, FlowReply::Flows { id: *id, flows: vec![flow.clone()] }).await;
                            }
                        }
                        recorded.push(flow);
                    }
                }
            }
        });
        FakeNode {
            record,
            commands,
            closed,
            task,
        }
    }

    fn queries(&self) -> Vec<(u64, FlowRequest)> {
        self.commands
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| match c {
                FlowCommand::Query { id, request } => Some((*id, (**request).clone())),
                FlowCommand::Cancel { .. } => None,
            })
            .collect()
    }

    fn cancelled(&self) -> Vec<u64> {
        self.commands
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| match c {
                FlowCommand::Cancel { id } => Some(*id),
                FlowCommand::Query { .. } => None,
            })
            .collect()
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A controller's agent port (plaintext) and flows listener on loopback.
struct Relay {
    hub: Hub,
    agent: SocketAddr,
    http: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn new_hub(name: &str) -> Hub {
    Hub::new(
        HubConfig {
            id: id(name),
            name: format!("cluster {name}"),
            service_cidrs: vec![],
            lease: Duration::from_secs(30),
            node_encryption: false,
            recent_deltas: 16,
            startup_grace: Duration::ZERO,
        },
        Metrics::new().unwrap(),
    )
}

async fn relay_on(hub: Hub, settings: FlowSettings) -> Relay {
    hub.flows().set_enabled(true);
    hub.flows().set_settings(settings);
    let agent_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (agent, http) = (
        agent_listener.local_addr().unwrap(),
        http_listener.local_addr().unwrap(),
    );
    let tasks = vec![
        tokio::spawn(agent::serve(
            agent_listener,
            hub.clone(),
            1 << 20,
            AgentAuth::LegacyToken(None),
        )),
        tokio::spawn(flows::serve(http_listener, hub.flows().clone())),
    ];
    Relay {
        hub,
        agent,
        http,
        tasks,
    }
}

impl Relay {
    async fn wait_for_nodes(&self, nodes: &[&str]) {
        let want: Vec<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
        let http = self.http;
        trellis_test_support::eventually_async("the nodes' flow channels", WAIT, || {
            let want = want.clone();
            async move {
                let body = get(http, "/flows/nodes").await.ok_body().ok()?;
                let sources: FlowSources = serde_json::from_str(&body).ok()?;
                (sources.nodes == want).then_some(())
            }
        })
        .await;
    }

    fn metric(&self, needle: &str) -> bool {
        self.hub.metrics().render().contains(needle)
    }
}

async fn get(addr: SocketAddr, path: &str) -> trellis_http::Response {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        trellis_http::get(addr, &path, Duration::from_secs(30)).unwrap()
    })
    .await
    .unwrap()
}

/// The flows a non-following query answers.
async fn flows_of(addr: SocketAddr, query: &str) -> Vec<Flow> {
    let response = get(addr, &format!("/flows?{query}")).await;
    assert_eq!(response.status, 200, "{}", response.body);
    response
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Follows `query` on a thread: each line's flow comes on the receiver, with when it came;
/// the reader goes away after `stop_after` lines, or at the next line once the receiver is
/// dropped.
fn follow(
    addr: SocketAddr,
    query: &str,
    stop_after: usize,
) -> (
    mpsc::UnboundedReceiver<(Flow, Instant)>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let path = format!("/flows?{query}");
    let task = tokio::task::spawn_blocking(move || {
        let mut seen = 0;
        let response = trellis_http::Get::new(addr, &path, Duration::from_secs(10))
            .lines(|line| {
                let flow: Flow = serde_json::from_str(line).unwrap();
                seen += 1;
                if tx.send((flow, Instant::now())).is_err() || seen >= stop_after {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.body);
    });
    (rx, task)
}

async fn next_line(rx: &mut mpsc::UnboundedReceiver<(Flow, Instant)>) -> (Flow, Instant) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a flow line")
        .expect("the reader still reads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_merges_every_nodes_flows_by_time_and_keeps_the_last_n() {
    init_tracing();
    let relay = relay_on(new_hub("a"), FlowSettings::default()).await;
    let n1: Vec<Flow> = [1, 4, 6, 9]
        .iter()
        .map(|s| flow(*s, "a/n1", "a/x/client", "a/x/server"))
        .collect();
    let n2: Vec<Flow> = [2, 3, 7, 8]
        .iter()
        .map(|s| flow(*s, "a/n2", "a/y/client", "a/x/server"))
        .collect();
    let _n1 = FakeNode::connect(relay.agent, "n1", n1, Mode::Answer).await;
    let _n2 = FakeNode::connect(relay.agent, "n2", n2, Mode::Answer).await;
    relay.wait_for_nodes(&["n1", "n2"]).await;
    let last4 = flows_of(relay.http, "last=4").await;
    assert_eq!(
        last4.iter().map(second).collect::<Vec<_>>(),
        [6, 7, 8, 9],
        "the newest four of both nodes, oldest first"
    );
    assert_eq!(
        last4
            .iter()
            .map(|f| f.node_name.as_str())
            .collect::<Vec<_>>(),
        ["a/n1", "a/n2", "a/n2", "a/n1"]
    );
    let all = flows_of(relay.http, "").await;
    assert_eq!(
        all.iter().map(second).collect::<Vec<_>>(),
        [1, 2, 3, 4, 6, 7, 8, 9]
    );
    // The nodes filter (as a gateway does) and the relay checks again.
    let from_y = flows_of(relay.http, "from-pod=y/client&last=2").await;
    assert_eq!(from_y.iter().map(second).collect::<Vec<_>>(), [7, 8]);
    assert!(relay.metric("trellis_controller_flow_channels 2"));
    assert!(relay.metric("trellis_controller_flow_queries_total{result=\"ok\",source=\"http\"} 3"));
    assert!(relay.metric("trellis_controller_flows_relayed_total{reader=\"http\"} 14"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_shows_the_history_then_a_new_flow_within_a_second() {
    init_tracing();
    let relay = relay_on(new_hub("a"), FlowSettings::default()).await;
    let n1 = FakeNode::connect(
        relay.agent,
        "n1",
        vec![
            flow(1, "a/n1", "a/x/client", "a/x/server"),
            flow(5, "a/n1", "a/x/client", "a/x/server"),
        ],
        Mode::RecordedWhileSubscribing,
    )
    .await;
    let n2 = FakeNode::connect(
        relay.agent,
        "n2",
        vec![flow(3, "a/n2", "a/x/client", "a/x/server")],
        Mode::Answer,
    )
    .await;
    relay.wait_for_nodes(&["n1", "n2"]).await;
    let (mut lines, reader) = follow(relay.http, "follow=true&last=2", 3);
    let history = [next_line(&mut lines).await.0, next_line(&mut lines).await.0];
    assert_eq!(history.iter().map(second).collect::<Vec<_>>(), [3, 5]);
    // Both nodes are asked for their new flows (before their history).
    trellis_test_support::eventually_async("both nodes followed", WAIT, || async {
        let followed = |n: &FakeNode| n.queries().iter().any(|(_, r)| r.follow);
        (followed(&n1) && followed(&n2)).then_some(())
    })
    .await;
    let sent = Instant::now();
    n2.record
        .send(flow(10, "a/n2", "a/x/client", "a/x/server"))
        .unwrap();
    let (new, arrived) = next_line(&mut lines).await;
    assert_eq!(
        (second(&new), new.node_name.as_str()),
        (10, "a/n2"),
        "n1's flow recorded while subscribing is shown once, in the history"
    );
    let took = arrived.duration_since(sent);
    eprintln!("a new flow reached the follower in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    reader.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_going_away_cancels_the_query_on_every_node() {
    init_tracing();
    let relay = relay_on(new_hub("a"), FlowSettings::default()).await;
    let n1 = FakeNode::connect(relay.agent, "n1", vec![], Mode::Answer).await;
    let n2 = FakeNode::connect(relay.agent, "n2", vec![], Mode::Answer).await;
    relay.wait_for_nodes(&["n1", "n2"]).await;
    let (mut lines, reader) = follow(relay.http, "follow=true", 1);
    let followed = |n: &FakeNode| {
        n.queries()
            .into_iter()
            .find(|(_, r)| r.follow)
            .map(|(id, _)| id)
    };
    let (id1, id2) =
        trellis_test_support::eventually_async("both nodes followed", WAIT, || async {
            Some((followed(&n1)?, followed(&n2)?))
        })
        .await;
    assert_ne!(id1, id2, "query ids are unique in the controller");
    // One line, and the reader leaves.
    n1.record
        .send(flow(1, "a/n1", "a/x/client", "a/x/server"))
        .unwrap();
    next_line(&mut lines).await;
    reader.await.unwrap();
    drop(lines);
    trellis_test_support::eventually_async("both nodes told to cancel", WAIT, || async {
        (n1.cancelled() == [id1] && n2.cancelled() == [id2]).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_is_skipped_and_counted() {
    init_tracing();
    let settings = FlowSettings {
        history_timeout: Duration::from_millis(800),
        ..FlowSettings::default()
    };
    let relay = relay_on(new_hub("a"), settings).await;
    let _n1 = FakeNode::connect(
        relay.agent,
        "n1",
        vec![flow(1, "a/n1", "a/x/client", "a/x/server")],
        Mode::Answer,
    )
    .await;
    let silent = FakeNode::connect(relay.agent, "n2", vec![], Mode::Silent).await;
    relay.wait_for_nodes(&["n1", "n2"]).await;
    let started = Instant::now();
    let answered = flows_of(relay.http, "last=10").await;
    let took = started.elapsed();
    assert_eq!(answered.len(), 1, "the answering node's flow");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(relay.metric("trellis_controller_flow_sources_skipped_total{reason=\"timeout\"} 1"));
    trellis_test_support::eventually_async("the silent node told to cancel", WAIT, || async {
        let asked: Vec<u64> = silent.queries().iter().map(|(id, _)| *id).collect();
        (!asked.is_empty() && silent.cancelled() == asked).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_does_not_read_loses_flows_counted_and_holds_up_nobody() {
    init_tracing();
    let relay = relay_on(new_hub("a"), FlowSettings::default()).await;
    let node = FakeNode::connect(relay.agent, "n1", vec![], Mode::Answer).await;
    relay.wait_for_nodes(&["n1"]).await;
    // A follower whose output is never taken.
    let (out, stuck) = mpsc::channel(1);
    let follower = tokio::spawn(flows::query::run(
        relay.hub.flows().clone(),
        FlowRequest {
            follow: true,
            ..FlowRequest::default()
        },
        flows::Scope::default(),
        out,
    ));
    trellis_test_support::eventually_async("the node followed", WAIT, || async {
        node.queries().iter().any(|(_, r)| r.follow).then_some(())
    })
    .await;
    // Far more frames than the follower's queue holds.
    for second in 0..5_000 {
        node.record
            .send(flow(second, "a/n1", "a/x/client", "a/x/server"))
            .unwrap();
    }
    trellis_test_support::eventually_async("flows dropped for the stuck reader", WAIT, || async {
        let text = relay.hub.metrics().render();
        let dropped: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("trellis_controller_flows_dropped_total "))?
            .parse()
            .ok()?;
        (dropped > 4_000).then_some(())
    })
    .await;
    // The node's other readers are answered as ever, every time at once, until the node has
    // recorded the last flow.
    trellis_test_support::eventually_async("the newest flow answered", WAIT, || async {
        let started = Instant::now();
        let last = flows_of(relay.http, "last=1").await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        (last.iter().map(second).collect::<Vec<_>>() == [4_999]).then_some(())
    })
    .await;
    drop(stuck);
    follower.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_query_is_answered_400_with_the_reason() {
    init_tracing();
    let relay = relay_on(new_hub("a"), FlowSettings::default()).await;
    let bad = get(relay.http, "/flows?verdict=MAYBE").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("verdict"), "{}", bad.body);
    let unknown = get(relay.http, "/flows?colour=blue").await;
    assert_eq!(unknown.status, 400);
    assert!(
        unknown.body.contains("unknown flow query parameter"),
        "{}",
        unknown.body
    );
    assert!(
        relay.metric(
            "trellis_controller_flow_queries_total{result=\"bad_request\",source=\"http\"} 2"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_channel_of_a_node_replaces_the_older() {
    init_tracing();
    let relay = relay_on(new_hub("a"), FlowSettings::default()).await;
    let old = FakeNode::connect(
        relay.agent,
        "n1",
        vec![flow(1, "a/n1", "a/x/old", "a/x/server")],
        Mode::Answer,
    )
    .await;
    relay.wait_for_nodes(&["n1"]).await;
    let new = FakeNode::connect(
        relay.agent,
        "n1",
        vec![flow(2, "a/n1", "a/x/new", "a/x/server")],
        Mode::Answer,
    )
    .await;
    trellis_test_support::eventually_async("the older channel closed", WAIT, || async {
        old.closed
            .load(std::sync::atomic::Ordering::SeqCst)
            .then_some(())
    })
    .await;
    relay.wait_for_nodes(&["n1"]).await;
    let answered = flows_of(relay.http, "").await;
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0].source.pod_name.as_deref(), Some("new"));
    assert!(relay.metric("trellis_controller_flow_channels 1"));
    assert!(!new.closed.load(std::sync::atomic::Ordering::SeqCst));
}

// Two controllers over QUIC peering.

fn material(ca: &CertifiedKey, cluster: &str) -> TlsMaterial {
    let leaf = certs::generate_cluster_cert_with_ranges(
        ca,
        &id(cluster),
        &["10.0.0.0/8".parse().unwrap()],
        Validity::days_from_now(1),
    )
    .unwrap();
    TlsMaterial {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
    }
}

fn source(pod_cidr: &str, svc_cidr: &str) -> SourceState {
    let c = cluster("x", pod_cidr, svc_cidr);
    SourceState {
        cluster_id: None,
        service_cidrs: c.service_cidrs,
        nodes: c.nodes,
        services: BTreeMap::new(),
        ..Default::default()
    }
}

fn peering(
    name: &str,
    hub: &Hub,
    ca: &CertifiedKey,
    sock: UdpSocket,
    peer: (&str, Option<SocketAddr>),
) -> Peering {
    let cfg = PeeringConfig {
        listen: sock.local_addr().unwrap(),
        peers: vec![PeerConfig {
            id: id(peer.0),
            endpoint: peer.1,
        }],
        heartbeat: Duration::from_millis(200),
        lease: Duration::from_secs(30),
        max_frame: 64 << 20,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        max_pending_handshakes: 16,
        tls: material(ca, name),
    };
    Peering::start_on(cfg, hub.clone(), sock).unwrap()
}

/// Clusters a and b peered (b dials a), each with its relay; a's node n1 records `a_flows`.
async fn peered(a_flows: Vec<Flow>) -> (Relay, Relay, Vec<Peering>, FakeNode) {
    let ca = certs::generate_ca("test", Validity::days_from_now(1)).unwrap();
    let (sa, sb) = (
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        UdpSocket::bind("127.0.0.1:0").unwrap(),
    );
    let a_addr = sa.local_addr().unwrap();
    let (ha, hb) = (new_hub("a"), new_hub("b"));
    ha.set_source(source("10.1.0.0/24", "10.96.0.0/16"));
    hb.set_source(source("10.2.0.0/24", "10.97.0.0/16"));
    let pa = peering("a", &ha, &ca, sa, ("b", None));
    let pb = peering("b", &hb, &ca, sb, ("a", Some(a_addr)));
    let a = relay_on(ha, FlowSettings::default()).await;
    let b = relay_on(hb, FlowSettings::default()).await;
    let node = FakeNode::connect(a.agent, "n1", a_flows, Mode::Answer).await;
    a.wait_for_nodes(&["n1"]).await;
    trellis_test_support::eventually_async("a and b peered for flows", WAIT, || async {
        (a.hub.flows().sources().peers == ["b"] && b.hub.flows().sources().peers == ["a"])
            .then_some(())
    })
    .await;
    (a, b, vec![pa, pb], node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sees_only_flows_of_its_own_pods() {
    init_tracing();
    let inside_a = flow(1, "a/n1", "a/x/client", "a/x/server");
    let from_b = flow(2, "a/n1", "b/y/client", "a/x/server");
    let to_c = flow(3, "a/n1", "a/x/client", "c/z/server");
    let (a, b, peerings, node) = peered(vec![inside_a.clone(), from_b.clone(), to_c.clone()]).await;

    // The attack: b asks a for the connection between two of a's own pods. Asked of a
    // directly, the query selects it (so without the rule it would be answered)...
    let attack = "from-pod=a/x/client&to-pod=a/x/server&peer=a";
    assert_eq!(
        flows_of(a.http, attack).await,
        std::slice::from_ref(&inside_a)
    );
    // ...asked by b over peering, a answers none of it.
    assert!(flows_of(b.http, attack).await.is_empty());
    assert_eq!(
        flows_of(b.http, "cluster=a&peer=a").await,
        std::slice::from_ref(&from_b)
    );
    // Everything b may see of a: only the flow with b's pod.
    assert_eq!(
        flows_of(b.http, "peer=*").await,
        std::slice::from_ref(&from_b)
    );
    assert_eq!(
        flows_of(b.http, "peer=a&cluster=c").await,
        Vec::<Flow>::new()
    );
    assert!(a.metric("trellis_controller_flow_queries_total{result=\"ok\",source=\"peer\"} 4"));
    assert!(a.metric("trellis_controller_flows_relayed_total{reader=\"peer\"} 2"));

    // Following a over peering: a flow between a's pods never comes, one with b's pod does.
    let (mut lines, reader) = follow(b.http, "follow=true&peer=a", 1);
    trellis_test_support::eventually_async("a's node followed for b", WAIT, || async {
        node.queries().iter().any(|(_, r)| r.follow).then_some(())
    })
    .await;
    node.record
        .send(flow(10, "a/n1", "a/x/client", "a/x/server"))
        .unwrap();
    let sent = Instant::now();
    node.record
        .send(flow(11, "a/n1", "a/x/client", "b/y/server"))
        .unwrap();
    let (seen, arrived) = next_line(&mut lines).await;
    assert_eq!(second(&seen), 11);
    assert!(arrived.duration_since(sent) < Duration::from_secs(1));
    reader.await.unwrap();

    // A peer that is not connected is skipped and counted.
    assert!(flows_of(b.http, "peer=zz").await.is_empty());
    assert!(b.metric("trellis_controller_flow_sources_skipped_total{reason=\"not_connected\"} 1"));
    for p in peerings {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_beyond_its_share_of_queries_is_refused() {
    init_tracing();
    let (a, b, peerings, node) = peered(vec![]).await;
    // b follows a (live only) as many times as a answers at once, and once more.
    let mut outs = Vec::new();
    for _ in 0..=flows::MAX_PEER_FLOW_QUERIES {
        let (out, batches) = mpsc::channel(4);
        tokio::spawn(flows::query::run(
            b.hub.flows().clone(),
            FlowRequest {
                follow: true,
                peers: vec!["a".into()],
                ..FlowRequest::default()
            },
            flows::Scope {
                ask_peers: true,
                visible_to: None,
            },
            out,
        ));
        outs.push(batches);
    }
    trellis_test_support::eventually_async("the one too many refused", WAIT, || async {
        a.metric("trellis_controller_peer_flow_queries_refused_total{reason=\"too_many\"} 1")
            .then_some(())
    })
    .await;
    trellis_test_support::eventually_async("the others follow a's node", WAIT, || async {
        (node.queries().len() == flows::MAX_PEER_FLOW_QUERIES).then_some(())
    })
    .await;
    // b's readers go away: a's node is told to cancel every one.
    drop(outs);
    trellis_test_support::eventually_async(
        "every follower cancelled on a's node",
        WAIT,
        || async { (node.cancelled().len() == flows::MAX_PEER_FLOW_QUERIES).then_some(()) },
    )
    .await;
    for p in peerings {
        p.shutdown().await;
    }
}

/// A hand-driven peer: cluster b's certificate, its session's hello, then raw flow streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_flow_stream_is_answered_by_the_identity_rule_and_garbage_is_refused() {
    init_tracing();
    let ca = certs::generate_ca("test", Validity::days_from_now(1)).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let a_addr = sock.local_addr().unwrap();
    let hub = new_hub("a");
    hub.set_source(source("10.1.0.0/24", "10.96.0.0/16"));
    let peering_a = peering("a", &hub, &ca, sock, ("b", None));
    let a = relay_on(hub, FlowSettings::default()).await;
    let inside_a = flow(1, "a/n1", "a/x/client", "a/x/server");
    let from_b = flow(2, "a/n1", "b/y/client", "a/x/server");
    let _node =
        FakeNode::connect(a.agent, "n1", vec![inside_a, from_b.clone()], Mode::Answer).await;
    a.wait_for_nodes(&["n1"]).await;

    let b = material(&ca, "b");
    let client = trellis_controller::tls::client_config(&b, Metrics::new().unwrap()).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap(),
    )));
    let conn = endpoint
        .connect(a_addr, &certs::identity_name(&id("a")))
        .unwrap()
        .await
        .unwrap();
    let (mut session, _session_rx) = conn.open_bi().await.unwrap();
    let hello = trellis_core::peering::encode_frame(
        &trellis_core::peering::Message::Hello {
            cluster: id("b"),
            name: "b".into(),
        },
        1 << 20,
    )
    .unwrap();
    session.write_all(&hello).await.unwrap();
    trellis_test_support::eventually_async("b's session on a", WAIT, || async {
        (a.hub.flows().sources().peers == ["b"]).then_some(())
    })
    .await;

    // Not a flow stream: refused, counted, the session untouched.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let _ = send.finish();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, async {
        while let Ok(Some(chunk)) = recv.read_chunk(4096, true).await {
            sink.extend_from_slice(&chunk.bytes);
        }
    })
    .await;
    assert!(sink.is_empty());
    assert!(
        a.metric("trellis_controller_peer_flow_queries_refused_total{reason=\"bad_request\"} 1")
    );

    // b asks for the connection between a's own two pods, and for everything.
    for (query, want) in [
        ("from-pod=a/x/client&to-pod=a/x/server", vec![]),
        ("", vec![from_b.clone()]),
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut bytes = flows::FLOW_STREAM_MAGIC.to_vec();
        bytes.extend(
            encode_json_frame(
                &FlowCommand::Query {
                    id: 7,
                    request: Box::new(FlowRequest::from_query(query).unwrap()),
                },
                "query",
                1 << 20,
            )
            .unwrap(),
        );
        send.write_all(&bytes).await.unwrap();
        let _ = send.finish();
        let mut decoder = FrameDecoder::new(4 << 20);
        let mut answered = Vec::new();
        let ended = tokio::time::timeout(WAIT, async {
            loop {
                while let Some(reply) = decoder.next_json::<FlowReply>().unwrap() {
                    match reply {
                        FlowReply::Flows { id: 7, flows } => answered.extend(flows),
                        FlowReply::End { id: 7, error } => return error,
                        other => panic!("{other:?}"),
                    }
                }
                let chunk = recv.read_chunk(65536, true).await.unwrap().unwrap();
                decoder.push(&chunk.bytes);
            }
        })
        .await
        .expect("an End");
        assert_eq!(ended, None);
        assert_eq!(answered, want, "{query}");
    }
    conn.close(0u32.into(), b"done");
    peering_a.shutdown().await;
}

/// The attack: node n1's channel sends flows naming node n7 (and another cluster's node), so
/// that `--node n7` shows invented traffic. They are shown as n1's, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_channel_cannot_speak_for_another_node() {
    init_tracing();
    let relay = relay_on(new_hub("a"), FlowSettings::default()).await;
    let own = flow(1, "a/n1", "a/x/client", "a/x/server");
    let _n1 = FakeNode::connect(
        relay.agent,
        "n1",
        vec![
            own.clone(),
            flow(2, "a/n7", "a/x/client", "a/x/server"),
            flow(3, "b/n1", "a/x/client", "a/x/server"),
            flow(4, "a/n1/x", "a/x/client", "a/x/server"),
        ],
        Mode::Answer,
    )
    .await;
    relay.wait_for_nodes(&["n1"]).await;
    let shown = flows_of(relay.http, "").await;
    assert_eq!(shown.len(), 4);
    assert!(shown.iter().all(|f| f.node_name == "a/n1"), "{shown:?}");
    assert_eq!(shown[0], own);
    assert!(flows_of(relay.http, "node=n7").await.is_empty());
    assert!(
        relay.metric("trellis_controller_flows_refused_total{reason=\"other_node\"} 4"),
        "{}",
        relay.hub.metrics().render()
    );
}

/// The attack: peer b follows a as often as a lets one peer, and a's own followers hold the
/// rest of a node's slots that b leaves: a's reader must still be answered (before, each peer
/// connection had 8 queries of a node's 16, and a query of a's own reader found every node
/// busy and answered 200 with nothing). When a's own readers do fill a node, the reader's
/// skipped node shows on `/flows/nodes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_take_the_node_slots_the_clusters_own_readers_need() {
    init_tracing();
    let recorded = flow(1, "a/n1", "b/y/client", "a/x/server");
    let (a, b, peerings, node) = peered(vec![recorded.clone()]).await;
    // New flows only: each follower holds one query on each node.
    let follow_request = |peers: Vec<String>| FlowRequest {
        follow: true,
        peers,
        ..FlowRequest::default()
    };
    let mut outs = Vec::new();
    let spawn = |relay: flows::FlowRelay, request: FlowRequest, outs: &mut Vec<_>| {
        let (out, batches) = mpsc::channel(4);
        tokio::spawn(flows::query::run(
            relay,
            request,
            flows::Scope {
                ask_peers: true,
                visible_to: None,
            },
            out,
        ));
        outs.push(batches);
    };
    // b tries 8 followers (the old per-connection share); a's own readers follow 8 times.
    for _ in 0..8 {
        spawn(
            b.hub.flows().clone(),
            follow_request(vec!["a".into()]),
            &mut outs,
        );
    }
    for _ in 0..8 {
        spawn(a.hub.flows().clone(), follow_request(Vec::new()), &mut outs);
    }
    let followers = 8 + flows::MAX_PEER_FLOW_QUERIES.min(8);
    let open_followers = |node: &FakeNode| {
        let cancelled = node.cancelled();
        node.queries()
            .iter()
            .filter(|(id, r)| r.follow && !cancelled.contains(id))
            .count()
    };
    trellis_test_support::eventually_async("every follower on a's node", WAIT, || async {
        (open_followers(&node) == followers).then_some(())
    })
    .await;
    assert_eq!(
        flows_of(a.http, "last=10").await,
        std::slice::from_ref(&recorded),
        "a's own reader is answered while b holds all it may"
    );
    let refused = 8 - flows::MAX_PEER_FLOW_QUERIES;
    assert!(a.metric(&format!(
        "trellis_controller_peer_flow_queries_refused_total{{reason=\"too_many\"}} {refused}"
    )));
    // a's own readers fill the node: the next one goes without it, and can learn so.
    for _ in followers..trellis_core::flow::protocol::MAX_QUERIES_PER_NODE {
        spawn(a.hub.flows().clone(), follow_request(Vec::new()), &mut outs);
    }
    trellis_test_support::eventually_async("a's node full", WAIT, || async {
        (open_followers(&node) == trellis_core::flow::protocol::MAX_QUERIES_PER_NODE).then_some(())
    })
    .await;
    assert!(flows_of(a.http, "last=10").await.is_empty());
    let sources: FlowSources =
        serde_json::from_str(&get(a.http, "/flows/nodes").await.ok_body().unwrap()).unwrap();
    assert_eq!(sources.skipped["node n1"]["busy"], 1, "{sources:?}");
    drop(outs);
    for p in peerings {
        p.shutdown().await;
    }
}

/// The attack: peer a answers b with a flow dated far ahead, which would push every real
/// flow out of b's `last N`, and one whose pod name is a terminal escape. b shows its own
/// real newest flow rather than the dated one (which is counted), and prints the escape
/// escaped. (Flows naming b's own nodes, or between a's own pods, which an honest a never
/// sends, are refused the same way:
/// `peer::tests::a_peer_speaks_only_for_its_own_nodes_about_our_pods_and_not_from_the_future`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_flows_from_the_future_are_not_shown() {
    init_tracing();
    let now = std::time::SystemTime::now();
    let mut escape = flow(1, "a/n1", "b/y/client", "a/x/server");
    escape.time = now - Duration::from_secs(2);
    Arc::make_mut(&mut escape.destination).pod_name = Some("\x1b[2Jserver".into());
    let future = Flow {
        time: now + Duration::from_secs(80 * 365 * 24 * 3600),
        ..flow(2, "a/n1", "b/y/client", "a/x/server")
    };
    let (a, b, peerings, _node) = peered(vec![escape.clone(), future]).await;
    let mut local = flow(3, "b/n1", "b/y/client", "b/y/server");
    local.time = now - Duration::from_secs(1);
    let _b_node = FakeNode::connect(b.agent, "n1", vec![local.clone()], Mode::Answer).await;
    b.wait_for_nodes(&["n1"]).await;
    assert_eq!(
        flows_of(b.http, "peer=a&last=1").await,
        std::slice::from_ref(&local),
        "b's own newest flow, not the one a dated ahead"
    );
    assert!(b.metric("trellis_controller_flows_refused_total{reason=\"peer_future\"} 1"));
    let shown = flows_of(b.http, "peer=a&last=2").await;
    assert_eq!(shown, [escape, local]);
    let printed = trellis_core::flow::format::compact(&shown[0]);
    assert!(!printed.contains('\x1b'), "{printed:?}");
    drop(a);
    for p in peerings {
        p.shutdown().await;
    }
}

/// `--since X --follow`, as `hubble observe --since X -f`: the recorded flows of the window
/// first, then new ones (following alone shows only new ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_since_a_time_shows_the_window_first() {
    init_tracing();
    let relay = relay_on(new_hub("a"), FlowSettings::default()).await;
    let node = FakeNode::connect(
        relay.agent,
        "n1",
        vec![
            flow(1, "a/n1", "a/x/client", "a/x/server"),
            flow(5, "a/n1", "a/x/client", "a/x/server"),
        ],
        Mode::Answer,
    )
    .await;
    relay.wait_for_nodes(&["n1"]).await;
    let mut request = FlowRequest {
        follow: true,
        ..FlowRequest::default()
    };
    request.filter.since = Some(UNIX_EPOCH + Duration::from_secs(BASE_SECOND + 3));
    let (mut lines, reader) = follow(relay.http, &request.to_query(), 2);
    assert_eq!(
        second(&next_line(&mut lines).await.0),
        5,
        "the window's flow"
    );
    trellis_test_support::eventually_async("the node followed", WAIT, || async {
        node.queries().iter().any(|(_, r)| r.follow).then_some(())
    })
    .await;
    node.record
        .send(flow(9, "a/n1", "a/x/client", "a/x/server"))
        .unwrap();
    assert_eq!(second(&next_line(&mut lines).await.0), 9, "then new ones");
    reader.await.unwrap();
}
