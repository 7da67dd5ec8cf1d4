//! Concurrency and crashes: no address handed out twice, none leaked.

mod common;

use std::collections::HashSet;

use common::*;
use trellis_cni::failpoint;
use trellis_cni::runtime::Runtime;
use trellis_netns::Netns;

#[test]
fn hundred_concurrent_adds_then_dels_share_nothing_and_leave_nothing() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-many");
    let list = node.conflist(&["10.244.8.0/24"]);
    let mut pods: Vec<Pod> = (0..100)
        .map(|i| node.new_pod(&format!("many-{i}")))
        .collect();
    std::thread::scope(|scope| {
        for pod in pods.iter_mut() {
            let (node, list) = (&node, &list);
            scope.spawn(move || node.add(list, pod).unwrap());
        }
    });
    let addresses: HashSet<String> = pods
        .iter()
        .map(|p| pod_ip(p.result.as_ref().unwrap(), 0))
        .collect();
    assert_eq!(addresses.len(), 100, "every pod has its own address");
    assert_eq!(node.leases(), 100);
    assert_eq!(node.host_veths().len(), 100);
    assert!(ping(
        &pods[0].netns,
        &pod_ip(pods[99].result.as_ref().unwrap(), 0)
    ));

    std::thread::scope(|scope| {
        for pod in &pods {
            let (node, list) = (&node, &list);
            scope.spawn(move || {
                node.runtime
                    .del(list, &pod.attachment, pod.result.as_ref())
                    .unwrap()
            });
        }
    });
    assert_eq!(node.leases(), 0, "nothing left on disk");
    assert!(node.up_host_veths().is_empty(), "every pod is cut off");
    drop(pods);
    let left = node.host_veths_after_namespaces_go();
    assert!(
        left.is_empty(),
        "nothing left in the node namespace: {left:?}"
    );
}

fn crashing_runtime(node: &Node, point: &str) -> Runtime {
    Runtime {
        plugin_dirs: node.runtime.plugin_dirs.clone(),
        node: Some(Netns::open(node.netns.name()).unwrap()),
        env: vec![("TRELLIS_CNI_CRASH_AT".into(), point.into())],
    }
}

#[test]
fn a_crash_anywhere_in_add_leaks_and_doubles_nothing() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-crash");
    let list = node.conflist(&["10.244.9.0/24"]);
    for point in failpoint::POINTS {
        // The runtime sees ADD fail (the plugin died) and calls DEL, as the spec requires.
        let crashing = crashing_runtime(&node, point);
        let mut victim = node.new_pod(&format!("crash-{point}"));
        assert!(
            crashing.add(&list, &victim.attachment).is_err(),
            "{point}: the plugin must have died"
        );
        assert_eq!(
            node.leases(),
            1,
            "{point}: the lease names its owner until DEL"
        );

        // Meanwhile another pod comes up: it must not get the crashed pod's address.
        let mut bystander = node.new_pod(&format!("by-{point}"));
        node.add(&list, &mut bystander).unwrap();
        assert_eq!(node.leases(), 2, "{point}");

        node.runtime.del(&list, &victim.attachment, None).unwrap();
        assert_eq!(node.leases(), 1, "{point}: DEL freed the crashed lease");
        assert_eq!(
            node.up_host_veths().len(),
            1,
            "{point}: DEL cut off the half-made veth"
        );
        assert!(
            ping(&bystander.netns, common::NODE_ADDRESS),
            "{point}: the bystander works"
        );

        // The container is retried after cleanup: it comes up whole.
        node.add(&list, &mut victim).unwrap();
        assert!(
            ping(
                &victim.netns,
                &pod_ip(bystander.result.as_ref().unwrap(), 0)
            ),
            "{point}: retried pod works"
        );
        node.runtime
            .del(&list, &victim.attachment, victim.result.as_ref())
            .unwrap();
        node.runtime
            .del(&list, &bystander.attachment, bystander.result.as_ref())
            .unwrap();
        assert_eq!(node.leases(), 0, "{point}");
        assert!(node.up_host_veths().is_empty(), "{point}");
        drop((victim, bystander));
        assert!(node.host_veths_after_namespaces_go().is_empty(), "{point}");
    }
}

/// The files in the IPAM state directory.
fn ipam_files(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(node.data_dir.path().join("pods"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_crash_between_fsync_and_rename_keeps_the_old_state_and_add_retried_without_del_works() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-torn");
    let list = node.conflist(&["10.244.11.0/24"]);
    let mut keeper = node.new_pod("keeper");
    node.add(&list, &mut keeper).unwrap();
    let state = node.data_dir.path().join("pods/allocations.json");
    let before = std::fs::read(&state).unwrap();

    let victim_crash = node.new_pod("torn");
    assert!(
        crashing_runtime(&node, failpoint::IPAM_SYNCED)
            .add(&list, &victim_crash.attachment)
            .is_err(),
        "the plugin must have died"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "the state on disk is the old one, whole"
    );
    assert_eq!(
        ipam_files(&node),
        ["allocations.json", "lock"],
        "no half-written file is left behind"
    );

    // The runtime retries ADD without a DEL in between: the pod comes up whole.
    let mut victim = victim_crash;
    node.add(&list, &mut victim).unwrap();
    assert_eq!(node.leases(), 2);
    assert!(ping(
        &victim.netns,
        &pod_ip(keeper.result.as_ref().unwrap(), 0)
    ));
    for pod in [&victim, &keeper] {
        node.runtime
            .del(&list, &pod.attachment, pod.result.as_ref())
            .unwrap();
    }
    assert_eq!(node.leases(), 0);
}

#[test]
fn gc_cleans_up_after_crashes_the_runtime_never_followed_up() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-crash-gc");
    let mut list = node.conflist(&["10.244.10.0/24"]);
    list.cni_version = "1.1.0".into();
    let mut keeper = node.new_pod("keeper");
    node.add(&list, &mut keeper).unwrap();
    let victims: Vec<Pod> = failpoint::POINTS
        .iter()
        .map(|point| node.new_pod(&format!("lost-{point}")))
        .collect();
    for (point, victim) in failpoint::POINTS.iter().zip(&victims) {
        assert!(
            crashing_runtime(&node, point)
                .add(&list, &victim.attachment)
                .is_err()
        );
    }
    assert_eq!(node.leases(), 4);
    node.runtime
        .gc(&list, &[("keeper".into(), "eth0".into())])
        .unwrap();
    assert_eq!(node.leases(), 1);
    assert_eq!(node.host_veths().len(), 1);
    assert!(ping(&keeper.netns, common::NODE_ADDRESS));
}
