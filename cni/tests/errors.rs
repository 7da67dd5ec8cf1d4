//! Every kind of bad input gets the spec's error JSON, a non-zero exit, and leaves nothing.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};
use trellis_netns::{Netlink, VethSpec};

/// Runs the plugin in the node namespace with exactly `env` and `stdin`.
fn invoke(node: &Node, env: &[(&str, &str)], stdin: &[u8]) -> (bool, Value) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trellis-cni"));
    command
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = node.netns.spawn(&mut command).unwrap().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    let json = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {output:?}"));
    (output.status.success(), json)
}

fn config(node: &Node, version: &str, cidr: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "cniVersion": version, "name": "pods", "type": "trellis-cni",
        "podCIDRs": [cidr], "dataDir": node.data_dir.path()
    }))
    .unwrap()
}

fn assert_error(outcome: (bool, Value), code: u64) -> Value {
    let (success, json) = outcome;
    assert!(!success, "must exit non-zero: {json}");
    assert_eq!(json["code"], code, "{json}");
    assert!(
        !json["msg"].as_str().unwrap_or("").is_empty(),
        "msg must say what failed: {json}"
    );
    json
}

#[test]
fn each_bad_input_gets_its_code_and_leaves_nothing_behind() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-err");
    let pod = node.new_pod("err-pod");
    let netns = pod.netns.path().to_str().unwrap().to_string();
    let add_env = |netns: &str| -> Vec<(&str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".into()),
            ("CNI_CONTAINERID", "err-1".into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_NETNS", netns.to_string()),
            ("CNI_PATH", "/opt/cni/bin".into()),
        ]
    };
    let run = |env: Vec<(&str, String)>, stdin: &[u8]| {
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        invoke(&node, &pairs, stdin)
    };
    let good = config(&node, "1.1.0", "10.244.4.0/30");

    // Malformed JSON: code 6, reported in the plugin's own version.
    let json = assert_error(run(add_env(&netns), b"{\"cniVersion\": \"1.1.0\", oops"), 6);
    assert_eq!(json["cniVersion"], "1.1.0");
    // Missing environment: code 4.
    assert_error(run(vec![("CNI_COMMAND", "ADD".into())], &good), 4);
    let mut no_ifname = add_env(&netns);
    no_ifname.retain(|(k, _)| *k != "CNI_IFNAME");
    assert_error(run(no_ifname, &good), 4);
    // An unknown version: code 1.
    assert_error(
        run(add_env(&netns), &config(&node, "9.9.9", "10.244.4.0/30")),
        1,
    );
    // A network namespace that does not exist: code 3.
    assert_error(
        run(add_env("/run/netns/no-such-namespace-trellis"), &good),
        3,
    );
    assert_eq!(node.leases(), 0, "a failed ADD keeps no lease");

    // The interface name is taken in the pod: code 101, and the pod's own interface survives.
    common::block_on(async {
        let netlink = Netlink::connect_in(&pod.netns).unwrap();
        netlink
            .add_veth(&VethSpec {
                name: "eth0",
                peer_name: "other",
                peer_netns: None,
                mtu: None,
            })
            .await
            .unwrap();
    });
    assert_error(run(add_env(&netns), &good), 101);
    common::block_on(async {
        let netlink = Netlink::connect_in(&pod.netns).unwrap();
        assert!(
            netlink.link("eth0").await.unwrap().is_some(),
            "the pod's existing eth0 must be left alone"
        );
    });
    assert_eq!(node.leases(), 0);
    assert!(node.host_veths().is_empty());

    // An exhausted pool: /30 holds two pods; the third gets code 102 and STATUS says 51.
    let list = {
        let mut list = node.conflist(&["10.244.4.0/30"]);
        list.cni_version = "1.1.0".into();
        list
    };
    let mut pods: Vec<Pod> = (0..3).map(|i| node.new_pod(&format!("full-{i}"))).collect();
    node.add(&list, &mut pods[0]).unwrap();
    node.add(&list, &mut pods[1]).unwrap();
    let error = node.add(&list, &mut pods[2]).unwrap_err();
    assert_eq!(error.code(), Some(102), "{error}");
    assert_eq!(node.runtime.status(&list).unwrap_err().code(), Some(51));
    assert_eq!(node.leases(), 2);
    assert_eq!(node.host_veths().len(), 2, "the failed ADD left no veth");
    common::block_on(async {
        let netlink = Netlink::connect_in(&pods[2].netns).unwrap();
        assert!(netlink.link("eth0").await.unwrap().is_none());
    });
    for pod in &pods[..2] {
        node.runtime
            .del(&list, &pod.attachment, pod.result.as_ref())
            .unwrap();
    }
    assert_eq!(node.leases(), 0);
}

#[test]
fn version_answers_without_a_config() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-ver");
    let (success, json) = invoke(
        &node,
        &[("CNI_COMMAND", "VERSION")],
        b"{\"cniVersion\":\"1.0.0\"}",
    );
    assert!(success);
    assert_eq!(
        json["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn a_busy_lease_state_answers_try_again_later_and_changes_nothing() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-busy");
    let mut list = node.conflist(&["10.244.7.0/24"]);
    list.plugins[0]["ipamLockTimeoutMs"] = json!(200);
    let state_dir = node.data_dir.path().join("pods");
    std::fs::create_dir_all(&state_dir).unwrap();
    // Another invocation holds the state's lock and does not let go.
    let held = std::fs::File::create(state_dir.join("lock")).unwrap();
    held.lock().unwrap();

    let mut pod = node.new_pod("busy");
    let error = node.add(&list, &mut pod).unwrap_err();
    assert_eq!(error.code(), Some(11), "{error}");
    assert_eq!(node.leases(), 0);
    assert!(node.host_veths().is_empty());

    drop(held);
    node.add(&list, &mut pod).unwrap();
    assert_eq!(node.leases(), 1);
}
