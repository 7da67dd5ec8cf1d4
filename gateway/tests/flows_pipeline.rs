//! The node's flows end to end against the real kernel, in a namespace the test creates: the
//! kernel's sources feed the pipeline, and a connection between two of the node's pods is
//! recorded twice (leaving one, reaching the other), named from the policy inputs, as a
//! follower's query sees it within a second or so. Runs as root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use std::sync::Arc;
use std::time::Duration;

use trellis_core::flow::{FlowEvent, FlowRequest, TrafficDirection};
use trellis_core::gateway::GatewayPlan;
use trellis_core::policy::{
    EndpointKey, Identity, IdentityKey, IdentityLabels, PolicyEndpoint, PolicyInputs,
};
use trellis_gateway::flows::directory::NodeIdentity;
use trellis_gateway::flows::kernel::KernelSources;
use trellis_gateway::flows::recorder::{Followed, Recorder};
use trellis_gateway::flows::{Names, Pipeline, start_recording};
use trellis_test_support::TempNetns;

fn pod(inputs: &mut PolicyInputs, name: &str, address: &str, identity: u32) {
    let key = IdentityKey {
        cluster: "c1".parse().unwrap(),
        number: identity,
    };
    inputs.identities.insert(
        key.clone(),
        Identity {
            key,
            labels: IdentityLabels {
                namespace: "x".into(),
                pod_labels: [("app".to_string(), name.to_string())].into(),
                namespace_labels: BTreeMap::new(),
            },
        },
    );
    inputs.endpoints.insert(
        EndpointKey {
            cluster: "c1".parse().unwrap(),
            namespace: "x".into(),
            name: name.into(),
        },
        PolicyEndpoint {
            cluster: "c1".parse().unwrap(),
            namespace: "x".into(),
            name: name.into(),
            addresses: vec![address.parse().unwrap()],
            node: "n1".into(),
            identity,
            named_ports: vec![],
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_between_two_local_pods_is_recorded_both_ways_and_followed() {
    trellis_test_support::skip_unless_root!();
    let ns = TempNetns::new("flowpipe").unwrap();
    let status = std::process::Command::new("ip")
        .args(["-n", ns.name(), "link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(status.success());
    // Conntrack tracks in a namespace only where a rule needs it.
    trellis_gateway::nft::apply(
        Some(&ns),
        "table inet track {\n\tchain out { type filter hook output priority 0; ct state new accept; }\n}\n",
    )
    .unwrap();
    for state in ["time_wait", "close", "close_wait", "fin_wait", "last_ack"] {
        trellis_netns::sysctl::write(
            Some(&ns),
            &format!("net/netfilter/nf_conntrack_tcp_timeout_{state}"),
            "1",
        )
        .unwrap();
    }
    let mut inputs = PolicyInputs::new("c1".parse().unwrap());
    pod(&mut inputs, "client", "127.0.0.2", 1);
    pod(&mut inputs, "server", "127.0.0.3", 2);
    let names = Arc::new(Names::new(NodeIdentity {
        cluster: Some("c1".into()),
        node: Some("n1".into()),
        addresses: vec![],
    }));
    names.update(&GatewayPlan::default(), Some(&inputs));
    let metrics = trellis_gateway::metrics::Metrics::new().unwrap();
    let pipeline = Pipeline::new(names, Arc::new(Recorder::new(64)), metrics.flows.clone());
    let mut follower = pipeline
        .recorder
        .query(&FlowRequest {
            follow: true,
            ..FlowRequest::default()
        })
        .follower
        .unwrap();
    assert!(start_recording(
        pipeline.clone(),
        || KernelSources::open(Some(&ns)),
        KernelSources::run,
    ));
    assert!(metrics.flows.enabled());

    let port = ns
        .run(|| {
            let server = TcpListener::bind("127.0.0.3:0").unwrap();
            let port = server.local_addr().unwrap().port();
            // From the client pod's address.
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket
                .bind(&std::net::SocketAddr::from(([127, 0, 0, 2], 0)).into())
                .unwrap();
            socket
                .connect(&std::net::SocketAddr::from(([127, 0, 0, 3], port)).into())
                .unwrap();
            let mut client: TcpStream = socket.into();
            let (mut accepted, _) = server.accept().unwrap();
            client.write_all(b"hello").unwrap();
            let mut got = [0u8; 5];
            accepted.read_exact(&mut got).unwrap();
            port
        })
        .unwrap();
    // Opened: leaving the client, then reaching the server.
    let opened = tokio::time::timeout(Duration::from_secs(5), async {
        let mut flows = Vec::new();
        while flows.len() < 2 {
            if let Some(Followed::Flow(f)) = follower.next().await
                && f.l4.destination_port == Some(port)
                && f.event == FlowEvent::ConnectionNew
            {
                flows.push(f);
            }
        }
        flows
    })
    .await
    .expect("a follower sees the new connection within 5 s");
    assert_eq!(opened[0].traffic_direction, TrafficDirection::Egress);
    assert_eq!(opened[1].traffic_direction, TrafficDirection::Ingress);
    for f in &opened {
        assert_eq!(f.source.display_name(), "c1/x/client");
        assert_eq!(f.destination.display_name(), "c1/x/server");
        assert_eq!(f.node_name, "c1/n1");
        assert!(f.l4.tcp_flags.is_some_and(|flags| flags.syn));
    }
    let text = metrics.render();
    assert!(
        text.contains(r#"trellis_flows_total{direction="INGRESS",verdict="FORWARDED"} 1"#),
        "{text}"
    );
}
