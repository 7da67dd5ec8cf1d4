//! Controller failover in a lab with two controller processes per cluster
//! (`--controller-replicas 2`, a lease file, lease 4 s / renew 3 s / retry 1 s): the leader is
//! SIGKILLed; the other leads within the lease duration of when it saw the last renewal, on
//! the same addresses; no tunnel is rebuilt (the gateways' handshake counters do not move) and
//! DNS answers clusterset names all through. The figures are printed for the notes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trellis_integration::mesh::{ECHO_PORT, LiveStream, connect_in, http_get, scrape, tcp_echo};
use trellis_integration::{TestLab, text};
use trellis_test_support::poll_until;

const TIMEOUT: Duration = Duration::from_secs(3);
const GATEWAY_METRICS: u16 = 9586;
const CONTROLLER_METRICS: u16 = 9464;
const LEASE_DURATION: Duration = Duration::from_secs(4);

fn echo_addr(lab: &TestLab, pod: &str) -> SocketAddr {
    SocketAddr::new(lab.pod(pod).address.into(), ECHO_PORT)
}

fn gateway_metric(lab: &TestLab, node: &str, series: &str) -> Option<f64> {
    let node = lab.node(node);
    scrape(
        &node.netns,
        SocketAddr::new(node.address.into(), GATEWAY_METRICS),
        series,
    )
}

/// Whether c1's replica `index` says it leads (`/leader` 200).
fn leads(lab: &TestLab, index: u16) -> bool {
    let node = lab.node("c1/node-0");
    let addr = SocketAddr::new(node.address.into(), CONTROLLER_METRICS + index);
    http_get(&node.netns, addr, "/leader", Duration::from_millis(500)).is_ok()
}

#[test]
fn a_killed_leader_is_replaced_within_the_lease_without_a_tunnel_rebuilt_or_dns_gap() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("fo");
    lab.up(&["--controller-replicas", "2"]);
    // The first replica started first and leads; the second follows.
    assert!(leads(&lab, 0), "c1/controller leads");
    assert!(!leads(&lab, 1), "c1/controller/1 follows");
    let status = lab.trellis(&["status"]);
    assert!(
        text(&status).contains("c1/controller leads"),
        "{}",
        text(&status)
    );

    let client = lab.pod("c1/pod-0");
    let stream =
        LiveStream::start(connect_in(&client.netns, echo_addr(&lab, "c2/pod-2"), TIMEOUT).unwrap());
    let nodes = ["c1/node-0", "c1/node-1"];
    let counters = |lab: &TestLab| -> Vec<Option<f64>> {
        nodes
            .iter()
            .flat_map(|node| {
                [
                    r#"trellis_gateway_peer_handshakes_total{peer="c2/node-0"}"#,
                    r#"trellis_gateway_peer_handshakes_total{peer="c2/node-1"}"#,
                    "trellis_gateway_handshake_initiations_total",
                    "trellis_gateway_peers_configured",
                ]
                .map(|series| gateway_metric(lab, node, series))
            })
            .collect()
    };
    let before = counters(&lab);
    assert!(before[0].is_some(), "a session with c2/node-0: {before:?}");
    let name = "echo.demo.svc.clusterset.local";
    let vip = poll_until(Duration::from_secs(10), || {
        let answer = lab.dig("c1/pod-0", name);
        (answer.len() == 1).then_some(answer)
    })
    .expect("c1's clusterset VIP in DNS");

    // DNS asked in a loop: answered records, and how many queries needed dig's second try
    // (";; communications error ... timed out": a try unanswered within its second).
    let ask_dns = |for_how_long: Duration| -> (usize, usize) {
        let started = Instant::now();
        let (mut answered, mut retried) = (0, 0);
        while started.elapsed() < for_how_long {
            let answer = lab.dig("c1/pod-0", name);
            let (comments, records): (Vec<String>, Vec<String>) =
                answer.into_iter().partition(|line| line.starts_with(";;"));
            assert_eq!(records, vip, "DNS at {:?}: {comments:?}", started.elapsed());
            answered += 1;
            retried += usize::from(!comments.is_empty());
        }
        (answered, retried)
    };
    // The same loop with both replicas up, for comparison.
    let baseline = ask_dns(Duration::from_secs(5));

    lab.kill_daemon("c1/controller");
    let killed = Instant::now();
    let (took, during) = std::thread::scope(|s| {
        let dns = s.spawn(|| ask_dns(LEASE_DURATION + Duration::from_secs(6)));
        let led = poll_until(Duration::from_secs(20), || {
            leads(&lab, 1).then(|| killed.elapsed())
        });
        (led, dns.join().unwrap())
    });
    let took = took.expect("c1/controller/1 leads");
    println!(
        "failover (lab, lease {LEASE_DURATION:?} / renew 3 s / retry 1 s): c1/controller/1 led \
         {took:?} after the kill; DNS answered all {} queries in the 10 s after the kill ({} \
         needed dig's second try), {} of {} with both replicas up ({} retried)",
        during.0, during.1, baseline.0, baseline.0, baseline.1
    );
    // The follower times the lease from when it read the last renewal (client-go's rule), at
    // most a retry period (1 s) after it.
    assert!(
        took <= LEASE_DURATION + Duration::from_millis(1_500),
        "led {took:?} after the kill"
    );
    // The gateways reconnect to the same address and register with the new leader.
    let connected = "trellis_gateway_controller_connected";
    let back = poll_until(Duration::from_secs(15), || {
        nodes
            .iter()
            .all(|n| gateway_metric(&lab, n, connected) == Some(1.0))
            .then_some(())
    });
    assert!(back.is_some(), "the gateways follow the new leader");
    let status = lab.trellis(&["status"]);
    assert!(
        text(&status).contains("c1/controller/1 leads"),
        "{}",
        text(&status)
    );
    tcp_echo(&client.netns, echo_addr(&lab, "c2/pod-3"), TIMEOUT).unwrap();
    tcp_echo(
        &lab.pod("c2/pod-1").netns,
        echo_addr(&lab, "c1/pod-3"),
        TIMEOUT,
    )
    .unwrap();
    // The same plan: no tunnel torn down and set up again, no handshake started.
    assert_eq!(
        counters(&lab),
        before,
        "gateway counters across the failover"
    );
    let (longest, echoed) = stream.finish("the stream across the failover");
    println!("stream across the failover: longest echo wait {longest:?} over {echoed} echoes");
    assert!(longest < Duration::from_secs(1), "stalled {longest:?}");
}
