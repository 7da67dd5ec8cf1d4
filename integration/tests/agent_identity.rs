//! Node identity on the agent port, in a lab: the holder of c1/node-0's certificate cannot
//! register node-1 (its key on the other cluster's gateways stays), a client with the old
//! shared token or with DNS's read-only identity cannot register a gateway either; and the
//! certificates replaced under the running lab are reloaded (controller agent and peering
//! certificates, a gateway's node certificate) with no peering gap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use trellis_agent_client::{ClientConfig, ClientTls, Handler, TlsFiles, Transport};
use trellis_core::agent::{AgentIdentity, AgentRole, GatewayRegistration, MAX_AGENT_FRAME};
use trellis_core::wgkey::PublicKey;
use trellis_integration::TestLab;
use trellis_integration::mesh::{LabNode, http_get, sample};
use trellis_test_support::{eventually, poll_until};

const AGENT_PORT: u16 = 7444;
const CONTROLLER_METRICS: u16 = 9464;
const GATEWAY_METRICS: u16 = 9586;

fn certs(lab: &TestLab) -> PathBuf {
    lab.state_dir().join("certs")
}

fn files(lab: &TestLab, identity: &AgentIdentity) -> TlsFiles {
    let f = trellis_controller::agent_certs::agent_files(&certs(lab), identity);
    TlsFiles {
        ca: f.ca,
        cert: f.cert,
        key: f.key,
    }
}

fn node(cluster: &str, node: &str) -> AgentIdentity {
    AgentIdentity::Node {
        cluster: cluster.into(),
        node: node.into(),
    }
}

/// Counts the states a subscription got.
struct Count(usize);

impl Handler for Count {
    type State = trellis_core::imports::Imports;
    async fn applied(&mut self, _: &Self::State) -> bool {
        self.0 += 1;
        false
    }
}

struct GatewayCount(usize);

impl Handler for GatewayCount {
    type State = trellis_core::agent::GatewayDesired;
    async fn applied(&mut self, _: &Self::State) -> bool {
        self.0 += 1;
        false
    }
}

/// Follows c1's controller from inside `from` for `how_long` with `transport` and `role`;
/// how many states it got.
fn subscribe(
    from: &LabNode,
    controller: SocketAddr,
    transport: Transport,
    role: AgentRole,
    how_long: Duration,
) -> usize {
    let netns = trellis_netns::Netns::open(&from.netns).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let config = ClientConfig {
            address: controller.to_string(),
            transport,
            max_frame: MAX_AGENT_FRAME,
            resync: None,
            report: None,
        };
        let (_tx, rx) = watch::channel(role.clone());
        if matches!(role, AgentRole::Dns) {
            let mut count = Count(0);
            let mut state = None;
            let _ = tokio::time::timeout(
                how_long,
                trellis_agent_client::follow(&config, rx, Some(&netns), &mut count, &mut state),
            )
            .await;
            count.0
        } else {
            let mut count = GatewayCount(0);
            let mut state = None;
            let _ = tokio::time::timeout(
                how_long,
                trellis_agent_client::follow(&config, rx, Some(&netns), &mut count, &mut state),
            )
            .await;
            count.0
        }
    })
}

/// The public key `observer`'s gateway uses for the peer `peer` (`c1/node-1`).
fn key_seen_by(observer: &LabNode, peer: &str) -> Option<String> {
    let body = http_get(
        &observer.netns,
        SocketAddr::new(observer.address.into(), GATEWAY_METRICS),
        "/status",
        Duration::from_secs(3),
    )
    .ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["peers"].as_array()?.iter().find_map(|p| {
        (format!("{}/{}", p["cluster"].as_str()?, p["node"].as_str()?) == peer)
            .then(|| p["public_key"].as_str().map(str::to_owned))?
    })
}

fn metrics_of(node: &LabNode, port: u16) -> String {
    http_get(
        &node.netns,
        SocketAddr::new(node.address.into(), port),
        "/metrics",
        Duration::from_secs(3),
    )
    .unwrap_or_default()
}

#[test]
fn a_node_identity_registers_only_its_own_node_and_no_token_gets_in() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("aid");
    lab.up(&[]);
    let (c1n0, c1n1, c2n0) = (
        lab.node("c1/node-0"),
        lab.node("c1/node-1"),
        lab.node("c2/node-0"),
    );
    let controller = SocketAddr::new(c1n0.address.into(), AGENT_PORT);
    let before = eventually(
        "c2/node-0 to peer with c1/node-1",
        Duration::from_secs(20),
        || key_seen_by(&c2n0, "c1/node-1"),
    );
    let evil = AgentRole::Gateway(GatewayRegistration {
        node: "node-1".into(),
        endpoint: SocketAddr::new(c1n1.address.into(), 51820),
        public_key: PublicKey([9; 32]),
    });
    let tls = |identity: &AgentIdentity| {
        Transport::Tls(Arc::new(ClientTls::load(files(&lab, identity)).unwrap()))
    };
    // (a) node-0's identity registers node-1 with its own key.
    let got = subscribe(
        &c1n0,
        controller,
        tls(&node("c1", "node-0")),
        evil.clone(),
        Duration::from_secs(2),
    );
    assert_eq!(got, 0, "node-0's identity got a plan for node-1");
    // (b) the old shared token, in plaintext.
    let got = subscribe(
        &c1n0,
        controller,
        Transport::LegacyToken(Some("the-old-token".into())),
        evil.clone(),
        Duration::from_secs(2),
    );
    assert_eq!(got, 0, "a token got in");
    // (d) DNS's identity registers a gateway.
    let dns = AgentIdentity::Dns {
        cluster: "c1".into(),
    };
    let got = subscribe(&c1n0, controller, tls(&dns), evil, Duration::from_secs(2));
    assert_eq!(got, 0, "DNS registered a gateway");
    // DNS's identity does read imports (the refusals above were not a broken client).
    let got = subscribe(
        &c1n0,
        controller,
        tls(&dns),
        AgentRole::Dns,
        Duration::from_secs(2),
    );
    assert!(got >= 1, "DNS got no imports");
    // Over a peering heartbeat (2 s) later, c2 still uses node-1's own key.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(key_seen_by(&c2n0, "c1/node-1"), Some(before.clone()));
    assert_ne!(before, PublicKey([9; 32]).to_string());
    let text = metrics_of(&c1n0, CONTROLLER_METRICS);
    for reason in [
        "agent_node_mismatch",
        "plaintext_agent",
        "agent_dns_registers_gateway",
    ] {
        let series = format!("trellis_controller_auth_failures_total{{reason=\"{reason}\"}}");
        assert!(
            sample(&text, &series).is_some_and(|v| v >= 1.0),
            "{series}: {text}"
        );
    }
}

fn expiry(text: &str, component: &str, certificate: &str) -> Option<f64> {
    sample(
        text,
        &format!(
            "trellis_{component}_certificate_expiry_timestamp_seconds{{certificate=\"{certificate}\"}}"
        ),
    )
}

#[test]
fn certificates_replaced_under_a_running_lab_are_reloaded_without_a_peering_gap() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("rel");
    lab.up(&[]);
    let (c1n0, c1n1, c2n0) = (
        lab.node("c1/node-0"),
        lab.node("c1/node-1"),
        lab.node("c2/node-0"),
    );
    let c1 = metrics_of(&c1n0, CONTROLLER_METRICS);
    let (agent_before, peering_before) = (
        expiry(&c1, "controller", "agent").expect("agent expiry exported"),
        expiry(&c1, "controller", "peering").expect("peering expiry exported"),
    );
    let node_before = eventually("node-1's expiry", Duration::from_secs(10), || {
        expiry(&metrics_of(&c1n1, GATEWAY_METRICS), "gateway", "node")
    });
    // c2 watches c1 the whole time: sampled every 100 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, c2n0) = (stop.clone(), c2n0.clone());
        std::thread::spawn(move || {
            let (mut samples, mut gaps) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let text = metrics_of(&c2n0, CONTROLLER_METRICS);
                samples += 1;
                if sample(
                    &text,
                    "trellis_controller_remote_cluster_ready{cluster=\"c1\"}",
                ) != Some(1.0)
                {
                    gaps += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (samples, gaps)
        })
    };
    // Renewed for 7 days (the lab's are 30): the new expiry tells the new files are in use.
    let dir = certs(&lab);
    let replaced = Instant::now();
    trellis_controller::agent_certs::write_agent_files(
        &dir,
        &AgentIdentity::Controller {
            cluster: "c1".into(),
        },
        7,
    )
    .unwrap();
    trellis_controller::agent_certs::write_agent_files(&dir, &node("c1", "node-1"), 7).unwrap();
    // The same ranges as the lab gave c1 (read back from its certificate).
    let c1_pem = std::fs::read_to_string(dir.join("c1.pem")).unwrap();
    let c1_der = trellis_controller::tls::parse_certs(&c1_pem).unwrap();
    let ranges = trellis_controller::certs::claim_ranges_of(&c1_der[0])
        .unwrap()
        .expect("the lab's certificate carries c1's ranges");
    trellis_controller::certs::write_cluster_files(
        &dir,
        &"c1".parse().unwrap(),
        &ranges,
        trellis_controller::certs::Validity::days_from_now(7),
        true,
    )
    .unwrap();
    let week = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        + Duration::from_secs(7 * 86_400))
    .as_secs() as f64;
    let near = |v: Option<f64>| v.is_some_and(|v| (v - week).abs() < 120.0);
    let reloaded = poll_until(Duration::from_secs(20), || {
        let c1 = metrics_of(&c1n0, CONTROLLER_METRICS);
        let gw = metrics_of(&c1n1, GATEWAY_METRICS);
        (near(expiry(&c1, "controller", "agent"))
            && near(expiry(&c1, "controller", "peering"))
            && near(expiry(&gw, "gateway", "node")))
        .then(|| replaced.elapsed())
    })
    .expect("the controller and the gateway reload their certificates");
    assert!(agent_before > week && peering_before > week && node_before > week);
    // New handshakes use them: c1's DNS identity still subscribes (the controller's new agent
    // certificate verifies), and node-1's gateway reconnects with its new one.
    let dns = AgentIdentity::Dns {
        cluster: "c1".into(),
    };
    let transport = Transport::Tls(Arc::new(ClientTls::load(files(&lab, &dns)).unwrap()));
    let controller = SocketAddr::new(c1n0.address.into(), AGENT_PORT);
    assert!(
        subscribe(
            &c1n0,
            controller,
            transport,
            AgentRole::Dns,
            Duration::from_secs(2)
        ) >= 1
    );
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (samples, gaps) = watcher.join().unwrap();
    eprintln!(
        "certificates reloaded {reloaded:?} after replacement; c2 saw c1 ready in {}/{samples} samples",
        samples - gaps
    );
    assert_eq!(gaps, 0, "c2 lost c1 during the reload");
}
