//! `trellis status` and `trellis lab status` on a running lab: every cluster connected to
//! every other, every gateway reporting, every tunnel used; then a controller killed, which
//! its peer reports as not connected, and both commands fail.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use trellis_integration::mesh::http_get;
use trellis_integration::{TestLab, bin_path, text};

/// `trellis lab status -o json`, parsed, with its output for messages.
fn lab_status(lab: &TestLab) -> (Output, Value) {
    let output = lab.trellis(&["status", "-o", "json"]);
    let json = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("status -o json is not JSON ({e}): {}", text(&output)));
    (output, json)
}

/// Polls `lab status -o json` (up to 45 s) until `check` finds nothing missing; returns the
/// last output and document. `check` returns what is missing.
fn wait_for(lab: &TestLab, check: impl Fn(&Output, &Value) -> Vec<String>) -> (Output, Value) {
    let mut missing = Vec::new();
    for _ in 0..45 {
        let (output, json) = lab_status(lab);
        missing = check(&output, &json);
        if missing.is_empty() {
            return (output, json);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("lab status never got there; missing: {missing:#?}");
}

fn as_str(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// What keeps the lab from being fully healthy, in words.
fn unhealthy_parts(output: &Output, json: &Value) -> Vec<String> {
    let mut missing = Vec::new();
    let clusters = json["clusters"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = clusters
        .iter()
        .map(|c| as_str(&c["cluster"]).to_string())
        .collect();
    if names != ["c1", "c2"] {
        missing.push(format!("clusters {names:?}"));
    }
    for cluster in &clusters {
        let me = as_str(&cluster["cluster"]);
        let status = &cluster["status"];
        if status.is_null() {
            missing.push(format!("{me}: no status: {}", cluster["error"]));
            continue;
        }
        for other in names.iter().filter(|n| *n != me) {
            let remote = status["remotes"]
                .as_array()
                .and_then(|r| r.iter().find(|r| as_str(&r["cluster"]) == other));
            match remote {
                Some(r) if r["session"] == true && r["ready"] == true => {}
                _ => missing.push(format!("{me}: peer {other} not connected and ready")),
            }
        }
        let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.len() != 2 {
            missing.push(format!("{me}: {} nodes", nodes.len()));
        }
        for node in &nodes {
            let name = format!("{me}/{}", as_str(&node["node"]));
            if node["connected"] != true {
                missing.push(format!("{name}: gateway not connected"));
            }
            if node["report_age_seconds"]
                .as_u64()
                .is_none_or(|age| age > 20)
            {
                missing.push(format!("{name}: no fresh report"));
            }
            let peers = node["report"]["peers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let remote_peers: Vec<&Value> = peers
                .iter()
                .filter(|p| as_str(&p["cluster"]) != me)
                .collect();
            if remote_peers.len() != 2 {
                missing.push(format!(
                    "{name}: {} cross-cluster tunnel peers",
                    remote_peers.len()
                ));
            }
            for peer in remote_peers {
                let peer_name = format!("{}/{}", as_str(&peer["cluster"]), as_str(&peer["node"]));
                if peer["last_handshake_age_seconds"]
                    .as_u64()
                    .is_none_or(|age| age >= 180)
                {
                    missing.push(format!("{name} -> {peer_name}: no recent handshake"));
                }
                if !(peer["rx_bytes"].as_u64() > Some(0) && peer["tx_bytes"].as_u64() > Some(0)) {
                    missing.push(format!("{name} -> {peer_name}: no traffic both ways"));
                }
                if peer["endpoint"].is_null() {
                    missing.push(format!("{name} -> {peer_name}: no endpoint"));
                }
            }
        }
    }
    if json["problems"].as_array().is_none_or(|p| !p.is_empty()) {
        missing.push(format!("problems: {}", json["problems"]));
    }
    if !output.status.success() {
        missing.push(format!("exit status {:?}", output.status.code()));
    }
    missing
}

/// `trellis status --controller URL [args]` run inside `target`'s namespace (the controller's
/// address exists only in the lab).
fn status_inside(lab: &TestLab, target: &str, url: &str, args: &[&str]) -> Output {
    let trellis = bin_path("trellis");
    let mut command = vec!["exec", target, "--", trellis.to_str().unwrap()];
    command.extend(["status", "--controller", url]);
    command.extend(args);
    lab.trellis(&command)
}

/// A plain HTTP GET from inside a lab namespace (entered on a short-lived thread); the body.
fn http_get_inside(netns: &str, addr: &str, path: &str) -> String {
    http_get(netns, addr.parse().unwrap(), path, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"))
}

fn ping_across(lab: &TestLab) {
    // One pod per node: c<c>/pod-<n> is 10.<c>.<n>.1.
    for (from, to) in [
        ("c1/pod-0", "10.2.0.1"),
        ("c1/pod-0", "10.2.1.1"),
        ("c1/pod-1", "10.2.0.1"),
        ("c1/pod-1", "10.2.1.1"),
    ] {
        let ping = lab.trellis(&["exec", from, "--", "ping", "-c", "2", "-W", "3", to]);
        assert!(ping.status.success(), "{from} -> {to}: {}", text(&ping));
    }
}

#[test]
fn status_shows_every_cluster_gateway_and_tunnel_healthy() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("st");
    let up = lab.trellis(&["up", "--pods", "1"]);
    assert!(up.status.success(), "{}", text(&up));
    ping_across(&lab);

    let (_, json) = wait_for(&lab, unhealthy_parts);
    assert_eq!(json["lab"], lab.name.as_str());
    assert_eq!(json["connectivity"].as_array().map(Vec::len), Some(4 * 4));

    // The tables name the peer clusters, the nodes and every tunnel peer.
    let table = lab.trellis(&["status"]);
    let output = text(&table);
    assert!(table.status.success(), "{output}");
    for want in [
        "PEER CLUSTER",
        "TUNNEL PEER",
        "c2/node-0",
        "c2/node-1",
        "c1/node-0",
        "c1/node-1",
        "connectivity from each pod (ICMP echo / TCP connect to the echo server):",
        "\nhealthy\n",
    ] {
        assert!(output.contains(want), "{want:?} missing:\n{output}");
    }

    // `trellis status` against one controller, as through a port-forward.
    let json = status_inside(
        &lab,
        "c1/node-0",
        "http://198.18.1.10:9464",
        &["-o", "json"],
    );
    assert!(json.status.success(), "{}", text(&json));
    let document: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(document["cluster"], "c1");
    assert_eq!(document["remotes"][0]["cluster"], "c2");
    let table = status_inside(&lab, "c2/node-0", "198.18.2.10:9464", &[]);
    let output = text(&table);
    assert!(table.status.success(), "{output}");
    assert!(output.starts_with("cluster c2  revision"), "{output}");
    assert!(output.contains("c1/node-1"), "{output}");

    // Each gateway answers for itself too, on its metrics port.
    let gateway = http_get_inside(
        &format!("{}c1-node-1", lab.namespace_prefix()),
        "198.18.1.11:9586",
        "/status",
    );
    let report: Value = serde_json::from_str(&gateway)
        .unwrap_or_else(|e| panic!("gateway /status is not JSON ({e}): {gateway}"));
    assert_eq!(report["node"], "node-1");
    assert_eq!(report["node_encryption"], false);
    // c2's two nodes, and c1's other node: a peer also while node encryption is off.
    assert_eq!(report["peers"].as_array().map(Vec::len), Some(3));

    // Nothing answers where no controller runs: exit 2.
    let nowhere = status_inside(&lab, "c1/node-0", "http://198.18.1.10:1", &[]);
    assert_eq!(nowhere.status.code(), Some(2), "{}", text(&nowhere));
}

#[test]
fn a_killed_controller_shows_as_not_connected_and_status_fails() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("stk");
    let up = lab.trellis(&["up", "--pods", "1"]);
    assert!(up.status.success(), "{}", text(&up));
    wait_for(&lab, unhealthy_parts);

    // Kill c2's controller, found by its PID in the lab's state.
    lab.kill_daemon("c2/controller");

    // c1 sees c2 go once its lease (10 s in the lab) runs out.
    let (output, json) = wait_for(&lab, |_, json| {
        let c1 = &json["clusters"][0]["status"];
        let c2 = c1["remotes"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["cluster"] == "c2"));
        match c2 {
            Some(c2) if c2["session"] == false && c2["ready"] == false => Vec::new(),
            _ => vec![format!("c1 still sees c2 connected: {c2:?}")],
        }
    });
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let problems = json["problems"].to_string();
    assert!(
        problems.contains("c1: peer cluster c2 is not connected"),
        "{problems}"
    );
    assert!(
        problems.contains("c2: the controller at http://198.18.2.10:9464 did not answer"),
        "{problems}"
    );
    assert!(json["clusters"][1]["status"].is_null());

    let table = lab.trellis(&["status"]);
    let output = text(&table);
    assert_eq!(table.status.code(), Some(1), "{output}");
    assert!(output.contains("unhealthy ("), "{output}");
    assert!(
        output.contains("c1: peer cluster c2 is not connected"),
        "{output}"
    );

    let direct = status_inside(&lab, "c1/node-0", "http://198.18.1.10:9464", &[]);
    let output = text(&direct);
    assert_eq!(direct.status.code(), Some(1), "{output}");
    assert!(
        output
            .lines()
            .any(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["c2", "no", "no"]),
        "c2 shown as neither connected nor ready:\n{output}"
    );
}
