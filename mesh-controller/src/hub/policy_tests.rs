//! NetworkPolicy through the hub: what gateways are streamed, what peers receive, what
//! status says.

use std::time::{Duration, Instant};

use trellis_core::agent::PolicyUpdate;
use trellis_core::cluster::fixture::{cluster, id};
use trellis_core::cluster::{NodeGateway, PublicKey};
use trellis_core::keyed::Keyed;
use trellis_core::policy::{
    Identity, IdentityKey, IdentityLabels, LabelSelector, Labels, NetworkPolicy, PolicyEndpoint,
};

use super::*;
use crate::agent::GatewayFeed;
use crate::gateway::GatewayUpdate;
use crate::policy_source::{PodInfo, PolicyError, RefusedPolicy};

fn policy_hub() -> Hub {
    let h = Hub::new(
        HubConfig {
            id: id("a"),
            name: "a".into(),
            service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
            lease: Duration::from_secs(30),
            node_encryption: false,
            recent_deltas: 4,
            startup_grace: Duration::ZERO,
        },
        Metrics::new().unwrap(),
    );
    h.set_configured_allowance(&id("b"), Some(vec!["10.0.0.0/8".parse().unwrap()]));
    h
}

fn pod(i: usize) -> PodInfo {
    PodInfo {
        namespace: format!("ns-{}", i % 10),
        name: format!("pod-{i}"),
        labels: Labels::from([("app".to_owned(), format!("app-{}", i % 50))]),
        node: "node-0".into(),
        addresses: vec![std::net::Ipv4Addr::from(0x0a01_0000 + i as u32).into()],
        named_ports: vec![],
    }
}

/// Cluster a (pod CIDR 10.1.0.0/16) with `pods` pods and one policy in ns-0.
fn source_with_pods(pods: usize) -> SourceState {
    let c = cluster("a", "10.1.0.0/16", "10.96.0.0/16");
    let mut s = SourceState {
        nodes: c.nodes,
        ..Default::default()
    };
    s.policy.pods = (0..pods).map(pod).collect();
    let policy = NetworkPolicy {
        namespace: "ns-0".into(),
        name: "web".into(),
        pod_selector: LabelSelector {
            match_labels: Labels::from([("app".to_owned(), "app-0".to_owned())]),
            match_expressions: vec![],
        },
        ingress: Some(vec![]),
        egress: None,
    };
    s.policy.policies.insert(policy.key(), policy);
    s
}

fn view(h: &Hub) -> Arc<MeshView> {
    h.subscribe_view().borrow().clone().unwrap()
}

#[test]
fn without_network_policy_nothing_of_it_is_streamed_or_shared() {
    let h = policy_hub();
    h.set_source(source_with_pods(10));
    let v = view(&h);
    assert!(v.policy.is_none() && !v.policy_pending);
    assert!(v.local.pods.is_empty() && v.local.identities.is_empty());
    let Some(GatewayUpdate::Snapshot(s)) = GatewayFeed::new("node-0").next(&v) else {
        panic!("a snapshot first");
    };
    assert_eq!(s.policy, None);
    assert!(h.status().policy.is_none());
}

#[test]
fn one_pod_relabelled_among_ten_thousand_reaches_nodes_as_a_handful_of_records() {
    let h = policy_hub();
    h.set_network_policy(true);
    let mut source = source_with_pods(10_000);
    h.set_source(source.clone());
    let mut feed = GatewayFeed::new("node-0");
    let Some(GatewayUpdate::Snapshot(snapshot)) = feed.next(&view(&h)) else {
        panic!("a snapshot first");
    };
    let inputs = snapshot.policy.clone().unwrap();
    assert_eq!(inputs.endpoints.len(), 10_000);
    assert_eq!(
        inputs.identities.len(),
        50,
        "10 namespaces x 5 app labels each"
    );
    assert_eq!(inputs.policies.len(), 1);
    // Peers get the identities and pods too.
    assert_eq!(h.local_state().pods.len(), 10_000);

    // pod-7 (ns-7, app-7, shared with 199 others) gets a label of its own.
    source.policy.pods[7]
        .labels
        .insert("canary".into(), "true".into());
    let started = Instant::now();
    h.set_source(source.clone());
    let update = feed.next(&view(&h)).expect("an update");
    let took = started.elapsed();
    let GatewayUpdate::Delta {
        policy: Some(PolicyUpdate::Delta(delta)),
        upsert_peers,
        add_routes,
        ..
    } = &update
    else {
        panic!("a policy delta: {update:?}");
    };
    assert!(upsert_peers.is_empty() && add_routes.is_empty());
    // The pod's record and its new identity: nothing else (its old identity stays, others
    // still have it).
    assert_eq!(delta.endpoints.upsert.len(), 1);
    assert_eq!(delta.endpoints.upsert[0].name, "pod-7");
    assert!(delta.endpoints.remove.is_empty());
    assert_eq!(delta.identities.upsert.len(), 1);
    assert!(delta.identities.remove.is_empty() && delta.policies.is_empty());
    let mut replica = snapshot.clone();
    assert!(replica.apply(&update));
    assert_eq!(
        replica.policy.as_ref().unwrap().digest(),
        h.status().policy.unwrap().digest
    );
    // The peers' delta is as small.
    let local = h.subscribe_local().borrow().clone().unwrap();
    assert_eq!(local.recent.last().unwrap().changes.len(), 2);
    eprintln!("one pod relabelled among 10,000: hub + delta in {took:?}");

    // Nothing changed: nothing sent.
    h.set_source(source.clone());
    assert!(feed.next(&view(&h)).is_none());

    // A node that missed a change (it was slow) gets the whole difference, not the last step.
    let mut slow = GatewayFeed::new("node-0");
    let Some(GatewayUpdate::Snapshot(mut slow_replica)) = slow.next(&view(&h)) else {
        panic!("a snapshot first");
    };
    for (i, version) in ["v1", "v2"].into_iter().enumerate() {
        source.policy.pods[100 + i]
            .labels
            .insert("version".into(), version.into());
        h.set_source(source.clone());
        let update = feed.next(&view(&h)).expect("each change");
        assert!(replica.apply(&update));
    }
    let caught_up = slow.next(&view(&h)).expect("the difference");
    assert!(slow_replica.apply(&caught_up));
    let digest = h.status().policy.unwrap().digest;
    assert_eq!(slow_replica.policy.as_ref().unwrap().digest(), digest);
    assert_eq!(replica.policy.as_ref().unwrap().digest(), digest);

    // A policy alone changes (the local state peers see does not): nodes get it.
    let mut deny = source.policy.policies.values().next().unwrap().clone();
    deny.name = "deny".into();
    source.policy.policies.insert(deny.key(), deny);
    h.set_source(source);
    let update = feed.next(&view(&h)).expect("the new policy");
    assert!(
        matches!(&update, GatewayUpdate::Delta { policy: Some(PolicyUpdate::Delta(d)), .. }
            if d.policies.upsert.len() == 1 && d.endpoints.is_empty()),
        "{update:?}"
    );
}

#[test]
fn admitted_peer_pods_join_the_inputs_and_status_counts_selected_pods() {
    let h = policy_hub();
    h.set_network_policy(true);
    let mut source = source_with_pods(100);
    source.policy.refused.push(RefusedPolicy {
        key: trellis_core::policy::PolicyKey {
            namespace: "ns-1".into(),
            name: "broken".into(),
        },
        error: PolicyError::PolicyType("Sideways".into()),
    });
    h.set_source(source);
    let mut b = cluster("b", "10.2.0.0/24", "10.97.0.0/16");
    b.nodes.get_mut("node-0").unwrap().gateway = Some(NodeGateway {
        endpoint: "192.0.2.2:51820".parse().unwrap(),
        public_key: PublicKey([2; 32]),
    });
    let identity = Identity {
        key: IdentityKey {
            cluster: id("b"),
            number: 1,
        },
        labels: IdentityLabels {
            namespace: "ns-0".into(),
            ..Default::default()
        },
    };
    b.identities.insert(identity.key(), identity);
    let mut honest = PolicyEndpoint {
        cluster: id("b"),
        namespace: "ns-0".into(),
        name: "client".into(),
        addresses: vec!["10.2.0.5".parse().unwrap()],
        node: "node-0".into(),
        identity: 1,
        named_ports: vec![],
    };
    b.pods.insert(honest.key(), honest.clone());
    // An attack: b claims a pod at one of a's pod addresses.
    honest.name = "imposter".into();
    honest.addresses = vec!["10.1.0.3".parse().unwrap()];
    b.pods.insert(honest.key(), honest);
    h.peer_snapshot(b);
    let v = view(&h);
    let inputs = v.policy.as_ref().unwrap();
    let remote: Vec<&str> = inputs
        .endpoints
        .values()
        .filter(|e| e.cluster.as_str() == "b")
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(remote, ["client"]);
    let status = h.status();
    let p = status.policy.unwrap();
    assert_eq!(p.digest, inputs.digest());
    assert_eq!((p.endpoints, p.identities), (101, 51));
    // ns-0 holds pods 0, 10, .., 90; app-0 among them: 0 and 50.
    assert_eq!(p.policies.len(), 1);
    assert_eq!(p.policies[0].selected_pods, 2);
    assert_eq!(p.policies[0].types, ["Ingress"]);
    assert_eq!(p.refused.len(), 1);
    assert!(p.refused[0].contains("ns-1/broken"), "{:?}", p.refused);
    assert_eq!(h.metrics().policies_refused.get(), 1);
}

#[test]
fn a_restarted_controller_streams_no_policy_until_its_source_has_synced() {
    let before = policy_hub();
    before.set_network_policy(true);
    before.set_source(source_with_pods(20));
    before.register_gateway(crate::gateway::GatewayRegistration {
        node: "node-0".into(),
        endpoint: "192.168.1.10:51820".parse().unwrap(),
        public_key: PublicKey([1; 32]),
    });
    let numbers: Vec<u32> = before
        .local_state()
        .identities
        .keys()
        .map(|k| k.number)
        .collect();
    let saved = before.persisted().unwrap();

    let after = policy_hub();
    after.set_network_policy(true);
    after.restore(saved);
    let v = view(&after);
    assert!(v.policy_pending);
    let mut feed = GatewayFeed::new("node-0");
    assert!(
        feed.next(&v).is_none(),
        "no snapshot (without policy) before the source synced"
    );
    after.set_source(source_with_pods(20));
    let v = view(&after);
    assert!(!v.policy_pending);
    let Some(GatewayUpdate::Snapshot(s)) = feed.next(&v) else {
        panic!("a snapshot once synced");
    };
    assert_eq!(s.policy.unwrap().endpoints.len(), 20);
    let again: Vec<u32> = after
        .local_state()
        .identities
        .keys()
        .map(|k| k.number)
        .collect();
    assert_eq!(
        again, numbers,
        "identities keep their numbers across a restart"
    );
}

#[test]
fn switching_policy_on_and_off_replaces_and_disables() {
    let h = policy_hub();
    h.set_source(source_with_pods(5));
    let mut feed = GatewayFeed::new("node-0");
    feed.next(&view(&h)).unwrap();
    h.set_network_policy(true);
    let on = feed.next(&view(&h)).unwrap();
    assert!(
        matches!(&on, GatewayUpdate::Delta { policy: Some(PolicyUpdate::Replace(i)), .. } if i.endpoints.len() == 5),
        "{on:?}"
    );
    h.set_network_policy(false);
    let off = feed.next(&view(&h)).unwrap();
    assert!(
        matches!(
            off,
            GatewayUpdate::Delta {
                policy: Some(PolicyUpdate::Disable),
                ..
            }
        ),
        "{off:?}"
    );
    assert!(
        h.local_state().pods.is_empty(),
        "no longer shared with peers"
    );
}
