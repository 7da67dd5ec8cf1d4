//! The peering stream from another cluster's controller: `FrameDecoder` and `Session`.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

use trellis_core::claims::{self, Allowance, Limits, Peer};
use trellis_core::cluster::{ClusterState, fixture};
use trellis_core::framing::{FrameDecoder, FrameError};
use trellis_core::peering::{Event, Message, Session, SessionConfig, encode_frame};
use trellis_fuzz::chunked;

/// Small enough that oversized frames are reachable, large enough for real snapshots.
const MAX_FRAME: usize = 1 << 16;

/// Every result a decoder gives for `stream` pushed `step` bytes at a time, up to the first
/// error (after which the stream is unusable).
fn decode(stream: &[u8], step: usize) -> Vec<Result<Message, FrameError>> {
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    let mut out = Vec::new();
    for chunk in stream.chunks(step) {
        decoder.push(chunk);
        loop {
            let before = decoder.buffered();
            match decoder.next_json::<Message>() {
                Ok(None) => break,
                Ok(Some(message)) => {
                    // A frame is consumed whole: its header and exactly its declared body.
                    let consumed = before - decoder.buffered();
                    assert!(consumed >= 4);
                    out.push(Ok(message));
                }
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

/// Results in a form `assert_eq!` compares (errors carry no `PartialEq`).
fn comparable(results: &[Result<Message, FrameError>]) -> Vec<Result<&Message, String>> {
    results
        .iter()
        .map(|r| r.as_ref().map_err(|e| format!("{e:?}")))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((step, stream)) = chunked(data) else {
        return;
    };
    let whole = decode(stream, stream.len().max(1));
    // How the network cut the stream changes nothing.
    assert_eq!(comparable(&whole), comparable(&decode(stream, step)));
    for result in &whole {
        match result {
            Ok(message) => {
                // What we decoded re-encodes, decodes to itself, and encodes the same again.
                let frame = encode_frame(message, usize::MAX).expect("a decoded message encodes");
                let mut decoder = FrameDecoder::new(usize::MAX);
                decoder.push(&frame);
                assert_eq!(decoder.next_json::<Message>().ok(), Some(Some(message.clone())));
                assert_eq!(decoder.buffered(), 0);
                let again = encode_frame(message, usize::MAX).unwrap();
                assert_eq!(frame, again);
            }
            Err(FrameError::TooLarge { len, max }) => assert!(len > max),
            Err(FrameError::Malformed(_)) => {}
            Err(other) => panic!("a decoder cannot fail with {other:?}"),
        }
    }

    // The whole per-connection logic, as the controller runs it for peer "b".
    let now = Instant::now();
    let local = fixture::cluster("a", "10.1.0.0/24", "10.96.0.0/16");
    let config = SessionConfig {
        local: fixture::id("a"),
        local_name: "a".into(),
        peer: fixture::id("b"),
        heartbeat: Duration::from_secs(5),
        lease: Duration::from_secs(30),
        max_frame: MAX_FRAME,
    };
    let (mut session, _) = Session::new(config, &local, now);
    let mut mirror: Option<ClusterState> = None;
    let mut closed = false;
    for chunk in stream.chunks(step) {
        let events = session.handle_bytes(chunk, now);
        if closed {
            assert!(events.is_empty(), "a closed session says nothing more");
            continue;
        }
        for event in events {
            assert!(!closed, "nothing follows Close");
            match event {
                Event::Transmit(_) => {}
                Event::PeerSnapshot(state) => {
                    assert_eq!(state.id.as_str(), "b");
                    admitted_claims_stay_inside_the_allowance(&local, &state);
                    mirror = Some(state);
                }
                Event::PeerDelta(delta) => {
                    assert_eq!(delta.cluster.as_str(), "b");
                    assert!(delta.to > delta.from);
                    // The session checked the chain; the mirror must accept it.
                    let state = mirror.as_mut().expect("a delta only after a snapshot");
                    state.apply(&delta).expect("a checked delta applies");
                }
                Event::Close(_) => closed = true,
            }
        }
        assert_eq!(closed, session.is_closed());
        if let Some(state) = &mirror {
            assert_eq!(state.revision, session.peer_revision());
        }
    }
});

/// Whatever a peer sends, what admission lets through claims only inside the peer's allowance
/// and never a default-route-like prefix.
fn admitted_claims_stay_inside_the_allowance(local: &ClusterState, state: &ClusterState) {
    let allowance = Allowance {
        certificate: Some(vec!["10.0.0.0/8".parse().unwrap()]),
        configured: None,
    };
    let peers = [Peer {
        state,
        allowance: &allowance,
        controller_endpoints: &[],
    }];
    let admission = claims::admit(local, &[], &peers, &Limits::default(), &BTreeMap::new());
    let Some(verdict) = admission.verdicts.get(&state.id) else {
        return;
    };
    let inside = |net: &ipnet::IpNet| {
        allowance.certificate.as_ref().unwrap()[0].contains(net) && net.prefix_len() >= 8
    };
    for node in verdict.state.nodes.values() {
        assert!(node.pod_cidrs.iter().all(inside), "{node:?}");
    }
    assert!(verdict.state.service_cidrs.iter().all(inside));
    for service in verdict.state.services.values() {
        for address in service
            .cluster_ips
            .iter()
            .chain(service.endpoints.iter().flat_map(|e| e.addresses.iter()))
        {
            assert!(inside(&ipnet::IpNet::from(*address)), "{service:?}");
        }
    }
    // NetworkPolicy: an admitted pod is the peer's own, with an admitted identity, and every
    // address inside a pod CIDR of the admitted node it names.
    for pod in verdict.state.pods.values() {
        assert_eq!(pod.cluster, state.id, "{pod:?}");
        assert!(verdict.state.identities.contains_key(&pod.identity_key()), "{pod:?}");
        let node = &verdict.state.nodes[&pod.node];
        assert!(
            pod.addresses
                .iter()
                .all(|a| node.pod_cidrs.iter().any(|c| c.contains(a))),
            "{pod:?}"
        );
    }
    assert!(verdict.state.identities.keys().all(|k| k.cluster == state.id));
}
