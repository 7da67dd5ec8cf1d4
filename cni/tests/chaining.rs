//! trellis-cni's result feeds the reference plugins behind it: `tuning` sets a sysctl inside
//! the pod it finds in prevResult, and `portmap` forwards a node port to the pod's address.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::json;
use trellis_netns::testing::TempNetns;
use trellis_netns::{Netlink, VethSpec, sysctl};

#[test]
fn portmap_and_tuning_work_behind_trellis_cni() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-chain");
    // A client on the underlay, wired to the node.
    let client = TempNetns::new("cni-client").unwrap();
    block_on(async {
        let node_nl = Netlink::connect_in(&node.netns).unwrap();
        let client_nl = Netlink::connect_in(&client).unwrap();
        node_nl
            .add_veth(&VethSpec {
                name: "uplink",
                peer_name: "eth0",
                peer_netns: Some(&client),
                mtu: None,
            })
            .await
            .unwrap();
        let uplink = node_nl.require_link("uplink").await.unwrap();
        let eth0 = client_nl.require_link("eth0").await.unwrap();
        node_nl
            .add_address(uplink.index, "198.18.1.1/24".parse().unwrap())
            .await
            .unwrap();
        client_nl
            .add_address(eth0.index, "198.18.1.2/24".parse().unwrap())
            .await
            .unwrap();
        node_nl.set_up(uplink.index).await.unwrap();
        client_nl.set_up(eth0.index).await.unwrap();
    });

    let list = node.conflist_with(
        &["10.244.5.0/24"],
        &[
            json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "777"}}),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ],
    );
    let mut pod = node.new_pod("chained");
    pod.attachment.capabilities.insert(
        "portMappings".into(),
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
    );
    let result = node.add(&list, &mut pod).unwrap();
    // The last plugin's result still carries what trellis-cni reported.
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        pod.netns.path().to_str().unwrap()
    );
    let pod_address = pod_ip(&result, 0);

    assert_eq!(
        sysctl::read(Some(&pod.netns), "net/core/somaxconn").unwrap(),
        "777",
        "tuning found the pod"
    );

    let listen: SocketAddr = format!("{pod_address}:80").parse().unwrap();
    let listener = pod
        .netns
        .run(|| TcpListener::bind(listen))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream.write_all(b"pong").unwrap();
        peer
    });
    let node_port: SocketAddr = "198.18.1.1:8080".parse().unwrap();
    let mut stream = client
        .run(|| TcpStream::connect_timeout(&node_port, Duration::from_secs(3)))
        .unwrap()
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "pong", "portmap forwarded the node port to the pod");
    server.join().unwrap();

    // CHECK through trellis-cni and tuning. portmap 1.1.1 (Debian's) cannot pass its own CHECK:
    // it looks for its IPv4 rules in the IPv6 nat table, whatever the pod has.
    let mut checkable = list.clone();
    checkable.plugins.truncate(2);
    node.runtime
        .check(&checkable, &pod.attachment, &result)
        .unwrap();
    node.runtime
        .del(&list, &pod.attachment, Some(&result))
        .unwrap();
    assert_eq!(node.leases(), 0);
    assert!(node.up_host_veths().is_empty());
    let refused = client
        .run(|| TcpStream::connect_timeout(&node_port, Duration::from_secs(1)))
        .unwrap();
    assert!(refused.is_err(), "after DEL the port mapping is gone");
}
