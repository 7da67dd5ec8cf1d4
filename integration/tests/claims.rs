//! Bounded peer claims in a lab (issue 13): a peer cluster announces ranges that are not its
//! own; none of them is routed on any node of the other clusters, the real owner keeps its
//! routes, the rest of the peer keeps working, and `trellis lab status` names the refusal.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_integration::mesh::{ECHO_PORT, http_get, tcp_echo};
use trellis_integration::{TestLab, text};
use trellis_test_support::poll_until;

const TIMEOUT: Duration = Duration::from_secs(3);
const CONTROLLER_METRICS: u16 = 9464;

/// What c2's node-1 claims besides its own 10.2.1.0/24: half of IPv4, the cloud metadata
/// address, the IPv6 default route, the lab's underlay, and c3's real pod CIDR.
const ATTACKS: &[&str] = &[
    "128.0.0.0/1",
    "169.254.169.254/32",
    "::/0",
    "198.18.0.0/15",
    "10.3.0.0/24",
];

#[test]
fn a_peer_announcing_ranges_not_its_own_gets_none_of_them_routed() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("claims");
    lab.up(&["--clusters", "3", "--pods", "1"]);
    let c1_pod = lab.pod("c1/pod-0");
    let echo = |pod: &str| SocketAddr::new(lab.pod(pod).address.into(), ECHO_PORT);
    // Before: c1 reaches c2's and c3's pods.
    for to in ["c2/pod-0", "c3/pod-0"] {
        tcp_echo(&c1_pod.netns, echo(to), TIMEOUT).unwrap_or_else(|e| panic!("{to}: {e}"));
    }

    // Where c1 stands on c2: the revision of c2's state it holds.
    let node = lab.node("c1/node-0");
    let status_at = SocketAddr::new(node.address.into(), CONTROLLER_METRICS);
    let c2_on_c1 = || -> Option<serde_json::Value> {
        let status = http_get(&node.netns, status_at, "/status", TIMEOUT).ok()?;
        let status: serde_json::Value = serde_json::from_str(&status).ok()?;
        status["remotes"]
            .as_array()?
            .iter()
            .find(|r| r["cluster"] == "c2")
            .cloned()
    };
    let before = c2_on_c1()
        .and_then(|r| r["revision"].as_u64())
        .expect("c1 holds c2");

    // c2's source: node-1 (whose gateway is registered) now claims the attacks too.
    let objects = lab.state_dir().join("clusters/c2/cluster.yaml");
    let yaml = std::fs::read_to_string(&objects).unwrap();
    let honest = "podCIDRs: [\"10.2.1.0/24\"]";
    assert!(yaml.contains(honest), "{yaml}");
    let claimed: Vec<String> = std::iter::once("10.2.1.0/24")
        .chain(ATTACKS.iter().copied())
        .map(|c| format!("\"{c}\""))
        .collect();
    let evil = format!("podCIDRs: [{}]", claimed.join(", "));
    std::fs::write(&objects, yaml.replace(honest, &evil)).unwrap();

    // c1 holds c2's new state; its gateways get a moment to apply whatever came of it.
    poll_until(Duration::from_secs(20), || {
        (c2_on_c1()?["revision"].as_u64()? > before).then_some(())
    })
    .expect("c1 got c2's change");
    std::thread::sleep(Duration::from_secs(3));

    // No node of c1 or c3 routes any attack into the tunnel.
    let mut routed = Vec::new();
    for n in lab.nodes().iter().filter(|n| n.cluster != "c2") {
        for attack in ATTACKS.iter().filter(|a| **a != "10.3.0.0/24") {
            let family = if attack.contains(':') { "-6" } else { "-4" };
            let output = lab.trellis(&[
                "exec", &n.name, "--", "ip", family, "-o", "route", "show", attack,
            ]);
            let routes = String::from_utf8_lossy(&output.stdout).to_string();
            if routes.contains("trellis0") || routes.contains("unreachable") {
                routed.push(format!("{}: {attack}: {}", n.name, routes.trim()));
            }
        }
    }
    assert!(
        routed.is_empty(),
        "ATTACK SUCCEEDED:\n{}",
        routed.join("\n")
    );

    // c1's controller refused it, naming the claim, in /status.
    let refusals: Vec<String> = c2_on_c1().expect("c1 holds c2")["refused_claims"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        refusals.iter().any(|r| r.contains("node node-1 refused")),
        "{refusals:?}"
    );

    // The real owner keeps its range: on c1, 10.3.0.0/24 still leads to c3 and its pod answers.
    for n in ["c1/node-0", "c1/node-1"] {
        lab.wait_for_route(n, "10.3.0.0/24", "dev trellis0");
    }
    tcp_echo(&c1_pod.netns, echo("c3/pod-0"), TIMEOUT)
        .unwrap_or_else(|e| panic!("ATTACK SUCCEEDED: c1 lost c3's pods: {e}"));
    // The rest of c2 keeps working: its node-0's pod is reached, its export resolves.
    tcp_echo(&c1_pod.netns, echo("c2/pod-0"), TIMEOUT)
        .unwrap_or_else(|e| panic!("c1 lost the rest of c2: {e}"));

    // `trellis lab status` names the refusal (and calls the lab unhealthy for it).
    let status = lab.trellis(&["status"]);
    let out = text(&status);
    assert!(!status.status.success(), "{out}");
    assert!(
        out.contains("claim(s) refused") && out.contains("node node-1 refused"),
        "{out}"
    );
    assert!(
        ATTACKS
            .iter()
            .filter(|a| **a != "10.3.0.0/24")
            .any(|a| out.contains(a)),
        "{out}"
    );
    for line in out.lines().filter(|l| l.contains("refused")) {
        eprintln!("lab status: {line}");
    }
    // And the log says it once.
    let log = std::fs::read_to_string(lab.state_dir().join("clusters/c1/controller.log")).unwrap();
    assert!(log.contains("refusing a peer's claim"), "{log}");
}
