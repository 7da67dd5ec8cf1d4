//! Gateways following a controller's stream (a scripted controller speaking the agent
//! protocol): registration, snapshot, deltas, a controller that goes away and comes back, and
//! a garbage frame; the status reports gateways send on the stream. Runs as root, in
//! namespaces the test creates.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Node, two_nodes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_core::agent::{
    AgentHello, AgentReport, AgentRole, GatewayDesired, GatewayRegistration, GatewayUpdate,
    PeerSpec, RouteSpec, RouteVia,
};
use trellis_core::framing::{FrameDecoder, encode_json_frame};
use trellis_gateway::controller::{ControllerSource, follow_controller};
use trellis_test_support::eventually_async;

const SHORT: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(8);
const AGENT_PORT: u16 = 7444;

/// Accepts one gateway and reads its hello.
async fn accept(listener: &TcpListener) -> (TcpStream, GatewayRegistration, Option<String>) {
    let (stream, registration, token, _) = accept_with_decoder(listener).await;
    (stream, registration, token)
}

/// Accepts one gateway, reads its hello, and keeps the decoder for the reports that follow.
async fn accept_with_decoder(
    listener: &TcpListener,
) -> (TcpStream, GatewayRegistration, Option<String>, FrameDecoder) {
    let (mut stream, _) = tokio::time::timeout(LONG, listener.accept())
        .await
        .expect("a gateway connects")
        .unwrap();
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(hello) = decoder.next_json::<AgentHello>().unwrap() {
            let AgentRole::Gateway(registration) = hello.role else {
                panic!("not a gateway hello")
            };
            return (stream, registration, hello.token, decoder);
        }
        let n = tokio::time::timeout(LONG, stream.read(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "gateway hung up before saying hello");
        decoder.push(&buffer[..n]);
    }
}

async fn send(stream: &mut TcpStream, update: &GatewayUpdate) {
    stream
        .write_all(&encode_json_frame(update, "update", 1 << 20).unwrap())
        .await
        .unwrap();
}

fn peer(node: &Node, cluster: &str) -> PeerSpec {
    PeerSpec {
        cluster: cluster.parse().unwrap(),
        node: node.name.clone(),
        public_key: node.gateway().public_key,
        endpoint: Some(SocketAddr::new(node.underlay, 51820)),
        allowed_ips: node.pod_cidrs.clone(),
        persistent_keepalive: Some(25),
        preshared_key: None,
    }
}

fn snapshot(
    revision: u64,
    me: &Node,
    peers: Vec<PeerSpec>,
    routes: Vec<RouteSpec>,
) -> GatewayUpdate {
    GatewayUpdate::Snapshot(GatewayDesired {
        revision,
        node: me.name.clone(),
        node_encryption: true,
        peers,
        routes,
        policy: None,
    })
}

fn tunnel_to(node: &Node) -> Vec<RouteSpec> {
    node.pod_cidrs
        .iter()
        .map(|cidr| RouteSpec {
            destination: *cidr,
            via: RouteVia::Tunnel,
        })
        .collect()
}

fn source(node: &Node, controller: SocketAddr) -> ControllerSource {
    // A scripted controller speaks the deprecated plaintext mode (the same framing); the
    // registration's sender is dropped: it never changes here.
    ControllerSource {
        address: controller,
        transport: trellis_agent_client::Transport::LegacyToken(Some("s3cret".into())),
        registration: tokio::sync::watch::channel(GatewayRegistration {
            node: node.name.clone(),
            endpoint: SocketAddr::new(node.underlay, 51820),
            public_key: node.gateway().public_key,
        })
        .1,
        report_interval: Duration::from_millis(200),
    }
}

const UPDATES: &str = "trellis_gateway_controller_updates_total";

/// Waits until `node`'s gateway has applied `revision`: what proves an update was processed.
async fn applied(node: &Node, revision: u64) {
    eventually_async(
        &format!("{} applies revision {revision}", node.name),
        LONG,
        || async {
            (node.metric("trellis_gateway_desired_state_revision") == Some(revision as f64))
                .then_some(())
        },
    )
    .await;
}

/// Reads the gateway's reports until one satisfies `want`.
async fn report_until(
    stream: &mut TcpStream,
    decoder: &mut FrameDecoder,
    want: impl Fn(&trellis_core::status::GatewayReport) -> bool,
) -> trellis_core::status::GatewayReport {
    let mut buffer = [0u8; 4096];
    loop {
        while let Some(AgentReport::Gateway(report)) = decoder.next_json::<AgentReport>().unwrap() {
            if want(&report) {
                return report;
            }
        }
        let n = tokio::time::timeout(LONG, stream.read(&mut buffer))
            .await
            .expect("the gateway reports")
            .unwrap();
        assert!(n > 0, "gateway hung up");
        decoder.push(&buffer[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_register_and_follow_the_controller_stream() {
    trellis_test_support::skip_unless_root!();
    let (a, b) = two_nodes("gw-ctl").await;
    let _echo_a = a.echo(7000).await;
    let _echo_b = b.echo(7000).await;
    let controller = SocketAddr::new(a.underlay, AGENT_PORT);
    let listener = a.ns.run(move || -> std::io::Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::bind(controller)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    });
    let listener = TcpListener::from_std(listener.unwrap().unwrap()).unwrap();
    let (source_a, source_b) = (source(&a, controller), source(&b, controller));
    let resync = Duration::from_secs(30);
    let follow_a = follow_controller(&a.gateway().reconciler, &source_a, Some(&a.ns), resync);
    let follow_b = follow_controller(&b.gateway().reconciler, &source_b, Some(&b.ns), resync);
    let to_b = SocketAddr::new(b.pod, 7000);
    let to_a = SocketAddr::new(a.pod, 7000);

    let script = async {
        // Both register: name, endpoint and public key (never a private key), with the token.
        let mut streams = std::collections::HashMap::new();
        let mut decoders = std::collections::HashMap::new();
        for _ in 0..2 {
            let (stream, registration, token, decoder) = accept_with_decoder(&listener).await;
            decoders.insert(registration.node.clone(), decoder);
            assert_eq!(token.as_deref(), Some("s3cret"));
            let node = if registration.node == a.name { &a } else { &b };
            assert_eq!(registration.public_key, node.gateway().public_key);
            assert_eq!(registration.endpoint, SocketAddr::new(node.underlay, 51820));
            streams.insert(registration.node.clone(), stream);
        }
        let mut stream_a = streams.remove(&a.name).unwrap();
        let mut stream_b = streams.remove(&b.name).unwrap();

        // Snapshots: each is the other's peer, in another cluster.
        send(
            &mut stream_a,
            &snapshot(1, &a, vec![peer(&b, "west")], tunnel_to(&b)),
        )
        .await;
        send(
            &mut stream_b,
            &snapshot(1, &b, vec![peer(&a, "east")], tunnel_to(&a)),
        )
        .await;
        assert!(a.ping(to_b, LONG).await, "a -> b after the snapshots");
        assert!(b.ping(to_a, LONG).await, "b -> a after the snapshots");
        // a reports its tunnel to b: the applied revision and mode, a handshake, traffic.
        let mut decoder_a = decoders.remove(&a.name).unwrap();
        let report = report_until(&mut stream_a, &mut decoder_a, |r| {
            r.revision == 1 && r.peers.iter().any(|p| p.rx_bytes > 0 && p.tx_bytes > 0)
        })
        .await;
        assert_eq!(report.node, a.name);
        assert_eq!(report.node_encryption, Some(true));
        assert_eq!(report.peers.len(), 1);
        let tunnel = &report.peers[0];
        assert_eq!(
            (tunnel.cluster.as_str(), tunnel.node.as_str()),
            ("west", b.name.as_str())
        );
        assert_eq!(tunnel.public_key, b.gateway().public_key);
        assert_eq!(tunnel.endpoint, Some(SocketAddr::new(b.underlay, 51820)));
        assert!(
            tunnel
                .last_handshake_age_seconds
                .is_some_and(|age| age < 10),
            "{tunnel:?}"
        );
        assert!(
            a.gateway()
                .metrics
                .render()
                .contains("trellis_gateway_controller_connected 1")
        );

        // A delta removes the peer: traffic stops; another restores it.
        let removal = GatewayUpdate::Delta {
            from: 1,
            to: 2,
            node_encryption: true,
            upsert_peers: vec![],
            remove_peers: vec![b.gateway().public_key],
            add_routes: vec![],
            remove_routes: tunnel_to(&b),
            policy: None,
        };
        send(&mut stream_a, &removal).await;
        applied(&a, 2).await;
        assert!(
            !a.ping(to_b, SHORT).await,
            "a -> b after the peer was removed"
        );
        let restore = GatewayUpdate::Delta {
            from: 2,
            to: 3,
            node_encryption: true,
            upsert_peers: vec![peer(&b, "west")],
            remove_peers: vec![],
            add_routes: tunnel_to(&b),
            remove_routes: vec![],
            policy: None,
        };
        send(&mut stream_a, &restore).await;
        assert!(a.ping(to_b, LONG).await, "a -> b after the peer came back");

        // The controller drops a's stream: a notices (it says hello again on a new connection)
        // and, until the controller sends anything on it, the data plane keeps the last state.
        drop(stream_a);
        let (mut stream_a, registration, _) = accept(&listener).await;
        assert_eq!(registration.node, a.name);
        assert!(
            a.ping(to_b, LONG).await,
            "a -> b while the controller has sent nothing new"
        );
        // The new connection's snapshot (no peers) replaces the state.
        send(&mut stream_a, &snapshot(10, &a, vec![], vec![])).await;
        applied(&a, 10).await;
        assert!(
            !a.ping(to_b, SHORT).await,
            "the new snapshot removed the peer"
        );

        // Garbage on b's stream closes only that connection: b says hello again on a new one
        // and follows it (its revision 2 can only come from the new stream).
        let updates_before = b.metric(UPDATES).unwrap();
        stream_b
            .write_all(&[0, 0, 0, 5, b'{', b'x', b'x', b'x', b'}'])
            .await
            .unwrap();
        let (mut stream_b, registration, _) = accept(&listener).await;
        assert_eq!(registration.node, b.name);
        send(
            &mut stream_b,
            &snapshot(2, &b, vec![peer(&a, "east")], tunnel_to(&a)),
        )
        .await;
        applied(&b, 2).await;
        assert_eq!(b.metric(UPDATES), Some(updates_before + 1.0));
    };
    tokio::select! {
        () = follow_a => unreachable!("following never ends"),
        () = follow_b => unreachable!("following never ends"),
        () = script => {}
    }
}
