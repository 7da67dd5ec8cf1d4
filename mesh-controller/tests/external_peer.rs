//! External peers through the controller: `Peer` objects of the source, checked against the
//! cluster and the mesh, streamed to the gateway that carries each, advertised to peer
//! clusters, which admit them under the ordinary claim rules.

use std::time::Duration;

use trellis_controller::gateway::{GatewayRegistration, RouteSpec, RouteVia, desired_for};
use trellis_controller::hub::{Hub, HubConfig, MeshView};
use trellis_controller::mesh::Mesh;
use trellis_controller::metrics::Metrics;
use trellis_controller::objects::{parse_objects, source_state};
use trellis_core::cluster::{ClusterState, PublicKey};
use trellis_core::wgkey::encode_key;

const CLUSTER: &str = r#"
apiVersion: about.k8s.io/v1alpha1
kind: ClusterProperty
metadata: {name: cluster.clusterset.k8s.io}
spec: {value: c1}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: ["10.101.0.0/16"]}
---
apiVersion: v1
kind: Node
metadata: {name: node-0}
spec: {podCIDRs: ["10.1.0.0/24"]}
status: {addresses: [{type: InternalIP, address: 198.18.1.10}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
spec: {podCIDRs: ["10.1.1.0/24"]}
status: {addresses: [{type: InternalIP, address: 198.18.1.11}]}
"#;

fn peer(name: &str, key: u8, address: &str, node: &str) -> String {
    format!(
        "---\napiVersion: trellis.dev/v1alpha1\nkind: Peer\nmetadata: {{name: {name}}}\n\
         spec: {{publicKey: \"{}\", allowedIPs: [\"{address}\"], nodes: [{node}], persistentKeepalive: 25}}\n",
        encode_key(&[key; 32])
    )
}

fn hub() -> Hub {
    let h = Hub::new(
        HubConfig {
            id: "c1".parse().unwrap(),
            name: "c1".into(),
            service_cidrs: vec![],
            lease: Duration::from_secs(30),
            node_encryption: false,
            recent_deltas: 4,
            startup_grace: Duration::ZERO,
        },
        Metrics::new().unwrap(),
    );
    // What the lab's certificate of c1 carries.
    h.set_own_allowance(Some(vec![
        "10.1.0.0/16".parse().unwrap(),
        "10.101.0.0/16".parse().unwrap(),
    ]));
    h
}

fn load(h: &Hub, yaml: &str) {
    h.set_source(source_state(&parse_objects(yaml).unwrap()));
}

fn register(h: &Hub, node: &str, address: &str, key: u8) {
    h.register_gateway(GatewayRegistration {
        node: node.into(),
        endpoint: format!("{address}:51820").parse().unwrap(),
        public_key: PublicKey([key; 32]),
    });
}

fn view(h: &Hub) -> std::sync::Arc<MeshView> {
    h.subscribe_view().borrow().clone().expect("a view")
}

fn verdict(h: &Hub, name: &str) -> (bool, String, String) {
    let status = h.status();
    let p = status
        .external_peers
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("{name} in /status"));
    (
        p.verdict.ready,
        p.verdict.reason.clone(),
        p.verdict.message.clone(),
    )
}

#[test]
fn a_peer_waits_for_its_gateway_then_rides_it_and_the_cluster_routes_to_it() {
    let h = hub();
    load(
        &h,
        &format!("{CLUSTER}{}", peer("laptop", 7, "10.1.200.1/32", "node-0")),
    );
    let (ready, reason, _) = verdict(&h, "laptop");
    assert!(!ready);
    assert_eq!(reason, "NoGateway");
    assert!(view(&h).external_peers.accepted.is_empty());

    register(&h, "node-0", "198.18.1.10", 0xA0);
    register(&h, "node-1", "198.18.1.11", 0xA1);
    let (ready, reason, message) = verdict(&h, "laptop");
    assert!(ready, "{message}");
    assert_eq!(reason, "Accepted");
    let laptop: ipnet::IpNet = "10.1.200.1/32".parse().unwrap();
    let local = h.local_state();
    assert!(
        local.nodes["node-0"].pod_cidrs.contains(&laptop),
        "advertised as routed by node-0"
    );

    // What `trellis peer add` reads from /status: the node gateway's key and endpoint, and
    // the ranges the machine routes.
    let status = h.status();
    let node_0 = status.nodes.iter().find(|n| n.node == "node-0").unwrap();
    assert_eq!(node_0.public_key, Some(PublicKey([0xA0; 32])));
    assert_eq!(node_0.endpoint, Some("198.18.1.10:51820".parse().unwrap()));
    assert!(
        status.mesh_cidrs.contains(&"10.1.0.0/23".parse().unwrap()),
        "{:?}",
        status.mesh_cidrs
    );
    assert!(
        status
            .mesh_cidrs
            .contains(&"10.101.0.0/16".parse().unwrap())
    );

    let v = view(&h);
    let carrier = desired_for(
        "node-0",
        &v.local,
        &v.remote_refs(),
        v.node_encryption,
        &v.external_peers,
        v.revision,
    );
    let p = carrier
        .peers
        .iter()
        .find(|p| p.public_key == PublicKey([7; 32]))
        .expect("node-0's gateway has the laptop");
    assert_eq!(p.endpoint, None);
    assert_eq!(p.persistent_keepalive, Some(25));
    let other = desired_for(
        "node-1",
        &v.local,
        &v.remote_refs(),
        v.node_encryption,
        &v.external_peers,
        v.revision,
    );
    assert!(other.routes.contains(&RouteSpec {
        destination: laptop,
        via: RouteVia::Node {
            address: "198.18.1.10".parse().unwrap()
        }
    }));

    // Removing the Peer withdraws it everywhere.
    load(&h, CLUSTER);
    assert!(h.status().external_peers.is_empty());
    assert!(!h.local_state().nodes["node-0"].pod_cidrs.contains(&laptop));
    assert!(view(&h).external_peers.accepted.is_empty());
}

#[test]
fn a_peer_claiming_a_nodes_another_clusters_or_a_service_range_is_refused_and_changes_nothing() {
    let h = hub();
    register(&h, "node-0", "198.18.1.10", 0xA0);
    load(
        &h,
        &format!("{CLUSTER}{}", peer("laptop", 7, "10.1.200.1/32", "node-0")),
    );
    let before = h.local_state();
    let attacks = [
        peer("steal-node-1", 8, "10.1.1.0/24", "node-0"),
        peer("steal-c2", 9, "10.2.0.0/24", "node-0"),
        peer("steal-services", 10, "10.101.0.10/32", "node-0"),
        peer("default-route", 11, "0.0.0.0/0", "node-0"),
        peer("node-key", 12, "10.1.201.1/32", "node-0")
            .replace(&encode_key(&[12; 32]), &encode_key(&[0xA0; 32])),
    ];
    load(
        &h,
        &format!(
            "{CLUSTER}{}{}",
            peer("laptop", 7, "10.1.200.1/32", "node-0"),
            attacks.concat()
        ),
    );
    for (name, reason) in [
        ("steal-node-1", "Overlaps"),
        ("steal-c2", "OutsideAllowance"),
        ("steal-services", "Overlaps"),
        ("default-route", "InvalidSpec"),
        ("node-key", "Overlaps"),
    ] {
        let (ready, got, message) = verdict(&h, name);
        assert!(!ready, "{name}");
        assert_eq!(got, reason, "{name}: {message}");
    }
    assert!(verdict(&h, "laptop").0);
    let after = h.local_state();
    assert_eq!(
        before.nodes, after.nodes,
        "the refused peers change nothing of the cluster"
    );
}

#[test]
fn a_peer_cluster_admits_the_peer_as_routed_by_its_node_and_routes_back_through_it() {
    let h = hub();
    register(&h, "node-0", "198.18.1.10", 0xA0);
    load(
        &h,
        &format!("{CLUSTER}{}", peer("laptop", 7, "10.1.200.1/32", "node-0")),
    );
    let c1 = (*h.local_state()).clone();

    // c2 admits what c1 announces within what the mesh CA signed for c1.
    let mut mesh = Mesh::new(Duration::from_secs(30));
    mesh.set_certificate_allowance(
        &c1.id,
        Some(vec![
            "10.1.0.0/16".parse().unwrap(),
            "10.101.0.0/16".parse().unwrap(),
        ]),
    );
    let now = std::time::Instant::now();
    mesh.snapshot(c1.clone(), now, std::time::SystemTime::now());
    let c2 = ClusterState::new("c2".parse().unwrap(), "c2".to_string());
    mesh.readmit(&c2);
    let admitted: Vec<&std::sync::Arc<ClusterState>> = mesh.admitted().collect();
    assert_eq!(admitted.len(), 1);
    let laptop: ipnet::IpNet = "10.1.200.1/32".parse().unwrap();
    assert!(admitted[0].nodes["node-0"].pod_cidrs.contains(&laptop));
    let remote_view = desired_for(
        "node-0",
        &c2,
        &[admitted[0].as_ref()],
        false,
        &Default::default(),
        1,
    );
    let to_c1 = remote_view
        .peers
        .iter()
        .find(|p| p.public_key == PublicKey([0xA0; 32]))
        .unwrap();
    assert!(
        to_c1.allowed_ips.contains(&laptop),
        "c2 sends the laptop's replies to c1/node-0"
    );

    // And c1 refuses a peer inside what c2 may claim.
    let h1 = hub();
    h1.set_configured_allowance(
        &"c2".parse().unwrap(),
        Some(vec!["10.1.250.0/24".parse().unwrap()]),
    );
    register(&h1, "node-0", "198.18.1.10", 0xA0);
    load(
        &h1,
        &format!(
            "{CLUSTER}{}",
            peer("inside-c2", 7, "10.1.250.1/32", "node-0")
        ),
    );
    assert_eq!(verdict(&h1, "inside-c2").1, "Overlaps");
}

/// c2, announcing one node with `pod_cidr` and gateway key `key`.
fn c2(pod_cidr: &str, key: u8) -> ClusterState {
    let mut c2 = trellis_core::cluster::fixture::cluster("c2", pod_cidr, "10.97.0.0/16");
    c2.revision = 1;
    c2.nodes.get_mut("node-0").unwrap().gateway = Some(trellis_core::cluster::NodeGateway {
        endpoint: "198.18.2.10:51820".parse().unwrap(),
        public_key: PublicKey([key; 32]),
    });
    c2
}

fn carried_by_node_0(h: &Hub, key: u8) -> bool {
    let v = view(h);
    desired_for(
        "node-0",
        &v.local,
        &v.remote_refs(),
        v.node_encryption,
        &v.external_peers,
        v.revision,
    )
    .peers
    .iter()
    .any(|p| p.node.starts_with("peer:") && p.public_key == PublicKey([key; 32]))
}

#[test]
fn a_peer_inside_another_clusters_claims_is_refused_as_overlapping() {
    let h = hub();
    h.set_configured_peers(vec!["c2".parse().unwrap()]);
    // c2 may claim a range inside c1's own allowance: a Peer there overlaps c2, it is not
    // outside what c1 may claim.
    h.set_configured_allowance(
        &"c2".parse().unwrap(),
        Some(vec!["10.1.128.0/17".parse().unwrap()]),
    );
    register(&h, "node-0", "198.18.1.10", 0xA0);
    h.peer_snapshot(c2("10.1.200.0/24", 0xB0));
    load(
        &h,
        &format!(
            "{CLUSTER}{}",
            peer("steal-c2", 9, "10.1.200.7/32", "node-0")
        ),
    );
    let (ready, reason, message) = verdict(&h, "steal-c2");
    assert!(!ready);
    assert_eq!(reason, "Overlaps", "{message}");
    assert!(!carried_by_node_0(&h, 9));
}

#[test]
fn an_accepted_peer_is_checked_again_when_a_remote_cluster_claims_its_range() {
    let h = hub();
    h.set_configured_peers(vec!["c2".parse().unwrap()]);
    register(&h, "node-0", "198.18.1.10", 0xA0);
    // At startup the local source comes before the remote's certificate and snapshot.
    load(
        &h,
        &format!("{CLUSTER}{}", peer("laptop", 7, "10.1.200.1/32", "node-0")),
    );
    assert!(verdict(&h, "laptop").0);
    assert!(carried_by_node_0(&h, 7));

    // c2's certificate (here: its configured allowance) lets it claim the laptop's range,
    // inside c1's own ranges, and it announces it.
    h.set_configured_allowance(
        &"c2".parse().unwrap(),
        Some(vec!["10.1.200.0/24".parse().unwrap()]),
    );
    h.peer_snapshot(c2("10.1.200.0/24", 0xB0));
    let (ready, reason, message) = verdict(&h, "laptop");
    assert!(!ready, "the laptop stays accepted over c2's range");
    assert_eq!(reason, "Overlaps", "{message}");
    assert!(!carried_by_node_0(&h, 7), "the gateway still carries it");
    let laptop: ipnet::IpNet = "10.1.200.1/32".parse().unwrap();
    assert!(!h.local_state().nodes["node-0"].pod_cidrs.contains(&laptop));
    let v = view(&h);
    assert!(
        v.remotes
            .iter()
            .any(|r| r.nodes["node-0"].pod_cidrs == ["10.1.200.0/24".parse().unwrap()]),
        "c2's claim is admitted once the laptop gave way"
    );

    // c2 withdrawn: the laptop is accepted again.
    h.set_configured_allowance(&"c2".parse().unwrap(), None);
    h.set_configured_peers(vec![]);
    assert!(verdict(&h, "laptop").0);
    assert!(carried_by_node_0(&h, 7));
}

#[test]
fn an_accepted_peer_is_checked_again_when_a_remote_node_uses_its_key() {
    let h = hub();
    h.set_configured_peers(vec!["c2".parse().unwrap()]);
    h.set_configured_allowance(
        &"c2".parse().unwrap(),
        Some(vec!["10.2.0.0/16".parse().unwrap()]),
    );
    register(&h, "node-0", "198.18.1.10", 0xA0);
    load(
        &h,
        &format!("{CLUSTER}{}", peer("laptop", 7, "10.1.200.1/32", "node-0")),
    );
    assert!(verdict(&h, "laptop").0);

    // A c2 node announces the laptop's key: node-0's gateway must not get two peers with
    // one key.
    h.peer_snapshot(c2("10.2.0.0/24", 7));
    let (ready, reason, message) = verdict(&h, "laptop");
    assert!(!ready, "the laptop stays accepted with a c2 node's key");
    assert_eq!(reason, "Overlaps", "{message}");
    let v = view(&h);
    let plan = desired_for(
        "node-0",
        &v.local,
        &v.remote_refs(),
        v.node_encryption,
        &v.external_peers,
        v.revision,
    );
    let with_key = plan
        .peers
        .iter()
        .filter(|p| p.public_key == PublicKey([7; 32]))
        .count();
    assert_eq!(with_key, 1, "{:?}", plan.peers);
}

#[test]
fn a_peer_re_created_under_its_name_reaches_the_status_writer_as_a_new_object() {
    let h = hub();
    register(&h, "node-0", "198.18.1.10", 0xA0);
    let with_uid = |uid: &str| {
        peer("laptop", 7, "10.1.200.1/32", "node-0").replace(
            "metadata: {name: laptop}",
            &format!("metadata: {{name: laptop, uid: {uid}}}"),
        )
    };
    load(&h, &format!("{CLUSTER}{}", with_uid("u-1")));
    let first = view(&h);
    assert_eq!(first.external_peers.uids["laptop"], "u-1");
    // Deleted and re-created with the same spec between two source syncs: the same verdict,
    // another object; the view says so, so its status is written again.
    load(&h, &format!("{CLUSTER}{}", with_uid("u-2")));
    let second = view(&h);
    assert!(second.revision > first.revision);
    assert_eq!(second.external_peers.uids["laptop"], "u-2");
    assert_eq!(
        first.external_peers.verdicts,
        second.external_peers.verdicts
    );
}
