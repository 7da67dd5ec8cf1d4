//! The plugin driven as a container runtime drives it, in namespaces these tests create.

mod common;

use common::*;
use ipnet::IpNet;
use trellis_netns::{Netlink, Route};

#[test]
fn two_pods_reach_each_other_and_the_node_then_check_and_del() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-node");
    let list = node.conflist(&["10.244.1.0/24", "fd00:10:244:1::/64"]);
    let mut a = node.new_pod("pod-a");
    let mut b = node.new_pod("pod-b");
    let result_a = node.add(&list, &mut a).unwrap();
    let result_b = node.add(&list, &mut b).unwrap();
    assert_eq!(result_a["cniVersion"], "1.0.0");
    assert_eq!(result_a["interfaces"][1]["name"], "eth0");
    let (a4, b4, b6) = (
        pod_ip(&result_a, 0),
        pod_ip(&result_b, 0),
        pod_ip(&result_b, 1),
    );
    assert_ne!(a4, b4);

    assert!(ping(&a.netns, &b4), "pod a -> pod b over IPv4");
    assert!(ping(&b.netns, &a4), "pod b -> pod a over IPv4");
    assert!(ping(&a.netns, &b6), "pod a -> pod b over IPv6");
    assert!(ping(&a.netns, NODE_ADDRESS), "pod a -> node");
    assert!(ping(&node.netns, &a4), "node -> pod a");

    // The pod's MTU leaves room for WireGuard.
    common::block_on(async {
        let netlink = Netlink::connect_in(&a.netns).unwrap();
        assert_eq!(netlink.require_link("eth0").await.unwrap().mtu, Some(1420));
    });

    node.runtime
        .check(&list, &a.attachment, a.result.as_ref().unwrap())
        .unwrap();

    // Someone deletes the pod's default route by hand: CHECK notices.
    common::block_on(async {
        let netlink = Netlink::connect_in(&a.netns).unwrap();
        let eth0 = netlink.require_link("eth0").await.unwrap();
        let route = Route::via_gateway(
            "0.0.0.0/0".parse::<IpNet>().unwrap(),
            "169.254.1.1".parse().unwrap(),
            Some(eth0.index),
        );
        netlink.delete_route(&route).await.unwrap();
    });
    let error = node
        .runtime
        .check(&list, &a.attachment, a.result.as_ref().unwrap())
        .unwrap_err();
    assert_eq!(error.code(), Some(104), "{error}");

    node.runtime
        .del(&list, &a.attachment, a.result.as_ref())
        .unwrap();
    node.runtime
        .del(&list, &b.attachment, b.result.as_ref())
        .unwrap();
    // DEL cuts the pods off at once: no lease, no route, no neighbour, veths down.
    assert_eq!(node.leases(), 0);
    assert!(
        node.up_host_veths().is_empty(),
        "veths still up: {:?}",
        node.up_host_veths()
    );
    assert!(!ping(&node.netns, &a4), "node still reaches a deleted pod");
    common::block_on(async {
        let node_netlink = Netlink::connect_in(&node.netns).unwrap();
        let routes = node_netlink.routes().await.unwrap();
        let stale = routes
            .iter()
            .any(|r| r.destination.addr().to_string() == a4);
        assert!(!stale, "route to the deleted pod remains");
    });
    // DEL again, and DEL of a container never added: both succeed.
    node.runtime
        .del(&list, &a.attachment, a.result.as_ref())
        .unwrap();
    let stranger = node.new_pod("never-added");
    node.runtime.del(&list, &stranger.attachment, None).unwrap();
    // The runtime removes the pod namespaces: the kernel destroys the veths with them.
    drop((a, b, stranger));
    let left = node.host_veths_after_namespaces_go();
    assert!(
        left.is_empty(),
        "veths left after the pods' namespaces went: {left:?}"
    );
}

#[test]
fn add_after_del_into_a_kept_namespace_replaces_the_old_veth() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-readd");
    let list = node.conflist(&["10.244.6.0/24"]);
    let mut pod = node.new_pod("readd");
    node.add(&list, &mut pod).unwrap();
    node.runtime
        .del(&list, &pod.attachment, pod.result.as_ref())
        .unwrap();
    // The runtime kept the namespace and adds the same attachment again.
    let result = node.add(&list, &mut pod).unwrap();
    assert!(ping(&pod.netns, NODE_ADDRESS), "the re-added pod works");
    assert_eq!(
        node.host_veths().len(),
        1,
        "the old veth was replaced, not kept beside"
    );
    node.runtime
        .del(&list, &pod.attachment, Some(&result))
        .unwrap();
    // GC (nothing valid) deletes the disconnected veth of a kept namespace.
    let mut gc_list = list.clone();
    gc_list.cni_version = "1.1.0".into();
    node.runtime.gc(&gc_list, &[]).unwrap();
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
}

#[test]
fn spec_versions_0_4_and_1_1_are_served_in_their_own_format() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-versions");
    for (version, has_ip_version) in [("0.4.0", true), ("1.1.0", false)] {
        let mut list = node.conflist(&["10.244.2.0/24"]);
        list.cni_version = version.into();
        let mut pod = node.new_pod(&format!("v{}", version.replace('.', "")));
        let result = node.add(&list, &mut pod).unwrap();
        assert_eq!(result["cniVersion"], version);
        assert_eq!(
            result["ips"][0].get("version").is_some(),
            has_ip_version,
            "{result}"
        );
        node.runtime.check(&list, &pod.attachment, &result).unwrap();
        node.runtime
            .del(&list, &pod.attachment, Some(&result))
            .unwrap();
    }
    let list = {
        let mut list = node.conflist(&["10.244.2.0/24"]);
        list.cni_version = "1.1.0".into();
        list
    };
    node.runtime.status(&list).unwrap();
    assert_eq!(node.leases(), 0);
}

#[test]
fn gc_frees_what_the_runtime_no_longer_knows() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-gc");
    let mut list = node.conflist(&["10.244.3.0/24"]);
    list.cni_version = "1.1.0".into();
    let mut pods: Vec<_> = (0..3).map(|i| node.new_pod(&format!("gc-{i}"))).collect();
    for pod in &mut pods {
        node.add(&list, pod).unwrap();
    }
    node.runtime
        .gc(&list, &[("gc-1".into(), "eth0".into())])
        .unwrap();
    assert_eq!(node.leases(), 1);
    assert_eq!(node.host_veths().len(), 1);
    assert!(
        ping(&node.netns, &pod_ip(pods[1].result.as_ref().unwrap(), 0)),
        "the valid pod still works"
    );
    node.runtime.gc(&list, &[]).unwrap();
    assert_eq!(node.leases(), 0);
    assert!(node.host_veths().is_empty());
}

#[test]
fn pod_mtu_defaults_to_the_underlay_minus_wireguard_overhead() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-mtu");
    // A jumbo-frame underlay carries the node's default route.
    common::block_on(async {
        let netlink = Netlink::connect_in(&node.netns).unwrap();
        let spec = trellis_netns::VethSpec {
            name: "underlay",
            peer_name: "underlay-peer",
            peer_netns: None,
            mtu: Some(9000),
        };
        netlink.add_veth(&spec).await.unwrap();
        let underlay = netlink.require_link("underlay").await.unwrap();
        netlink
            .add_address(underlay.index, "198.18.2.1/24".parse().unwrap())
            .await
            .unwrap();
        netlink.set_up(underlay.index).await.unwrap();
        let default = Route::via_gateway(
            "0.0.0.0/0".parse::<IpNet>().unwrap(),
            "198.18.2.254".parse().unwrap(),
            Some(underlay.index),
        );
        netlink.add_route(&default).await.unwrap();
    });
    let mut list = node.conflist(&["10.244.11.0/24"]);
    list.plugins[0].as_object_mut().unwrap().remove("mtu");
    let mut pod = node.new_pod("mtu");
    let result = node.add(&list, &mut pod).unwrap();
    common::block_on(async {
        let netlink = Netlink::connect_in(&pod.netns).unwrap();
        assert_eq!(netlink.require_link("eth0").await.unwrap().mtu, Some(8920));
    });
    node.runtime
        .del(&list, &pod.attachment, Some(&result))
        .unwrap();
}

#[test]
fn a_pod_can_send_the_moment_add_returns() {
    trellis_test_support::skip_unless_root!();
    // The kernel attaches a new link's queue a moment after it comes up and drops what is sent
    // before; a pod's first SYN lost there costs a second. ADD must return only once the path
    // carries packets, so one echo with no retry must always make it.
    let node = Node::new("cni-first");
    let list = node.conflist(&["10.244.12.0/24"]);
    for i in 0..20 {
        let mut pod = node.new_pod(&format!("first-{i}"));
        node.add(&list, &mut pod).unwrap();
        let sent = std::time::Instant::now();
        let rtt = trellis_netns::probe::icmp_echo(
            &pod.netns,
            NODE_ADDRESS.parse().unwrap(),
            std::time::Duration::from_secs(3),
        )
        .unwrap();
        assert!(
            rtt.is_some(),
            "pod {i}: first packet lost ({:?} after ADD)",
            sent.elapsed()
        );
    }
}
