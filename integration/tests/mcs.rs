//! The clusterset VIP of KEP-1645 in a lab (2 clusters x 2 nodes x 2 pods): DNS answers one
//! address, the client cluster's own VIP; the client's node balances it over every cluster's
//! ready endpoints, pod to pod through the tunnels, so every server sees the client pod's own
//! address; SRV records at the bare service name; a node whose gateway stops leaves the VIP
//! to the other endpoints.
//!
//! One lab at a time: the fault part measures how long things take.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use trellis_integration::mesh::{ECHO_PORT, http_get, tcp_echo};
use trellis_integration::{TestLab, text};
use trellis_test_support::poll_until;

const TIMEOUT: Duration = Duration::from_secs(3);
/// The Service port of the echo server's HTTP (8080 in the pods).
const VIP_HTTP_PORT: u16 = 80;
/// The lab's controllers withdraw a silent peer, and a node whose gateway went away, after
/// this lease.
const LEASE: Duration = Duration::from_secs(10);
const SERVICE: &str = "echo.demo.svc.clusterset.local";

/// Whether `address` is in cluster `cN`'s VIP range, 10.(100+N).240.0/20.
fn in_vip_range(cluster: &str, address: Ipv4Addr) -> bool {
    let n: u8 = cluster.trim_start_matches('c').parse().unwrap();
    let [a, b, c, _] = address.octets();
    a == 10 && b == 100 + n && (240..=255).contains(&c)
}

/// Waits until the client's DNS answers the service with one address, its cluster's VIP.
fn vip(lab: &TestLab, client: &str) -> Ipv4Addr {
    let cluster = client.split('/').next().unwrap();
    let mut last = Vec::new();
    poll_until(Duration::from_secs(15), || {
        last = lab.dig(client, SERVICE);
        let [only] = last.as_slice() else {
            return None;
        };
        only.parse().ok().filter(|a| in_vip_range(cluster, *a))
    })
    .unwrap_or_else(|| panic!("{client}: {SERVICE} never answered one VIP of {cluster}: {last:?}"))
}

/// One HTTP request to the VIP: who served it and the client address it saw.
fn ask(netns: &str, vip: Ipv4Addr) -> std::io::Result<(String, Ipv4Addr)> {
    let body = http_get(
        netns,
        SocketAddr::new(vip.into(), VIP_HTTP_PORT),
        "/",
        TIMEOUT,
    )?;
    // "c2/pod-3 answered 10.1.0.1:40000"
    let mut words = body.split_whitespace();
    let server = words.next().unwrap_or_default().to_string();
    let seen = words
        .nth(1)
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .and_then(|a| match a.ip() {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
        .ok_or_else(|| std::io::Error::other(format!("unexpected answer {body:?}")))?;
    Ok((server, seen))
}

/// `rounds` requests to the VIP; the servers that answered, or the first failure.
fn servers(netns: &str, vip: Ipv4Addr, rounds: usize) -> Result<BTreeSet<String>, String> {
    let mut served = BTreeSet::new();
    for round in 0..rounds {
        let (server, _) = ask(netns, vip).map_err(|e| format!("request {round}: {e}"))?;
        served.insert(server);
    }
    Ok(served)
}

#[test]
fn the_clusterset_vip_balances_over_every_cluster_and_keeps_the_client_address() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("mcs");
    lab.up(&[]);
    let pods = lab.pods();
    let nodes = lab.nodes();

    for client in ["c1/pod-0", "c2/pod-3"] {
        let own = client.split('/').next().unwrap();
        let vip = vip(&lab, client);
        let client = lab.pod(client);
        let client_node = nodes.iter().find(|n| n.name == client.node).unwrap();

        // Both clusters' pods answer through the one VIP.
        let mut answers = Vec::new();
        let balanced = poll_until(Duration::from_secs(15), || {
            answers = (0..40)
                .filter_map(|_| ask(&client.netns, vip).ok())
                .collect();
            let clusters: BTreeSet<&str> = answers
                .iter()
                .filter_map(|(server, _)| server.split('/').next())
                .collect();
            (answers.len() == 40 && clusters.len() == 2).then_some(())
        });
        assert!(
            balanced.is_some(),
            "{}: {vip}:{VIP_HTTP_PORT} never answered from both clusters: {answers:?}",
            client.name
        );
        let served: BTreeSet<&str> = answers.iter().map(|(s, _)| s.as_str()).collect();
        assert!(
            served.len() >= 4,
            "{}: spread over the endpoints: {served:?}",
            client.name
        );
        // Translated on the client's node only: every server, local or remote, sees the
        // client pod's own address; a pod sent to itself is the one masqueraded (the
        // hairpin, to its node's address).
        for (server, seen) in &answers {
            let want = if *server == client.name {
                client_node.address
            } else {
                client.address
            };
            assert_eq!(
                *seen, want,
                "{} -> {vip} served by {server} saw {seen}",
                client.name
            );
        }
        for _ in 0..5 {
            tcp_echo(
                &client.netns,
                SocketAddr::new(vip.into(), ECHO_PORT),
                TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("{} -> {vip}:{ECHO_PORT}: {e}", client.name));
        }
        // The VIP is the client cluster's own: the other cluster has another.
        assert!(
            pods.iter().all(|p| p.address != vip),
            "{own}'s VIP is no pod's address"
        );
    }
    let (vip1, vip2) = (vip(&lab, "c1/pod-0"), vip(&lab, "c2/pod-0"));
    assert_ne!(vip1, vip2, "each cluster has a VIP of its own");

    // SRV at the bare service name: the service's own name on each of its ports.
    let srv = lab.trellis(&[
        "exec",
        "c1/pod-0",
        "--",
        "dig",
        "+short",
        "+time=1",
        "+tries=2",
        &format!("@{}", lab.node("c1/node-0").address),
        "SRV",
        SERVICE,
    ]);
    let srv = String::from_utf8_lossy(&srv.stdout).to_string();
    let mut ports: Vec<&str> = srv
        .lines()
        .filter(|l| l.ends_with(&format!(" {SERVICE}.")))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, ["7000", "80"], "SRV at the bare name: {srv}");

    // A conflict: the same service exported by both clusters with different ports, c2 first
    // (a second apart: creation times have seconds). The oldest, c2, wins in both clusters, and
    // both say so, though c1's cluster ID is the lower.
    let clash = |port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: clash, namespace: demo}}\n\
             spec: {{ports: [{{name: tcp, port: {port}, protocol: TCP}}]}}\n---\n\
             apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\n\
             metadata: {{name: clash, namespace: demo}}\n"
        )
    };
    lab.apply("c2", &clash(7001));
    let applied_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    poll_until(Duration::from_secs(2), || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        (now > applied_at).then_some(())
    })
    .expect("the clock moves on");
    lab.apply("c1", &clash(7000));
    for cluster in ["c1", "c2"] {
        let mut last = serde_json::Value::Null;
        let resolved = poll_until(Duration::from_secs(15), || {
            last = lab.controller_status(cluster)["imports"].clone();
            let import = last
                .as_array()?
                .iter()
                .find(|i| i["namespace"] == "demo" && i["name"] == "clash")?
                .clone();
            (import["clusters"].as_array()?.len() == 2).then_some(import)
        })
        .unwrap_or_else(|| panic!("{cluster}: demo/clash never imported from both: {last}"));
        assert_eq!(resolved["oldest"], "c2", "{cluster}: {resolved}");
        assert_eq!(
            resolved["conflicts"],
            serde_json::json!(["PortConflict"]),
            "{cluster}: {resolved}"
        );
    }
    let status = text(&lab.trellis(&["status"]));
    assert!(
        status.contains("PortConflict"),
        "trellis lab status names the conflict:\n{status}"
    );
}

/// A node without its gateway cannot be reached from other clusters: its cluster's controller
/// lets the gateway's registration lapse, the other clusters then hold the node's endpoints as
/// not ready (`trellis_core::imports`), and the client's node stops sending the VIP there.
#[test]
fn a_node_whose_gateway_stops_leaves_the_vip_to_the_other_endpoints_within_the_lease() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("mcsgw");
    lab.up(&[]);
    let pods = lab.pods();
    let vip1 = vip(&lab, "c1/pod-0");

    // c2/node-0's gateway stops: its pods cannot be reached from c1 any more. Once the
    // controller sees the gateway gone, c1's VIP keeps answering from every other endpoint.
    let client = lab.pod("c1/pod-0");
    let mut last = Err(String::new());
    let reaches_c2 = poll_until(Duration::from_secs(15), || {
        last = servers(&client.netns, vip1, 30);
        let served = last.as_ref().ok()?;
        served.iter().any(|s| s.starts_with("c2/")).then_some(())
    });
    assert!(reaches_c2.is_some(), "c1's VIP reaches c2's pods: {last:?}");
    let on_gone_node: BTreeSet<String> = pods
        .iter()
        .filter(|p| p.node == "c2/node-0")
        .map(|p| p.name.clone())
        .collect();
    let stopped = Instant::now();
    let stop = lab.trellis(&["stop", "c2/node-0/gateway"]);
    assert!(stop.status.success(), "{}", text(&stop));
    let recovered = poll_until(LEASE + Duration::from_secs(10), || {
        last = servers(&client.netns, vip1, 30);
        let served = last.as_ref().ok()?;
        (served.is_disjoint(&on_gone_node) && served.iter().any(|s| s.starts_with("c2/")))
            .then(|| stopped.elapsed())
    });
    let took = recovered.unwrap_or_else(|| {
        panic!("c1's VIP never left c2/node-0's pods for the others (lease {LEASE:?}): {last:?}")
    });
    eprintln!("c2/node-0's gateway stopped -> c1's VIP served by the other endpoints in {took:?}");

    // Back again: its pods serve the VIP again.
    let start = lab.trellis(&["start", "c2/node-0/gateway"]);
    assert!(start.status.success(), "{}", text(&start));
    let back = poll_until(Duration::from_secs(20), || {
        let served = servers(&client.netns, vip1, 40).ok()?;
        (!served.is_disjoint(&on_gone_node)).then_some(())
    });
    assert!(back.is_some(), "c2/node-0's pods serve c1's VIP again");
}
