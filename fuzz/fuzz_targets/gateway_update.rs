//! The controller's stream to a node's gateway (gateway/src/controller.rs): `GatewayUpdate`s
//! applied to the desired state, and the plan the gateway builds from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_core::agent::{GatewayDesired, GatewayUpdate, PolicyUpdate};
use trellis_core::framing::{FrameDecoder, FrameError, encode_json_frame};
use trellis_fuzz::chunked;

const MAX_FRAME: usize = 1 << 16;

fn round_trips(update: &GatewayUpdate) {
    let frame = encode_json_frame(update, "gateway update", usize::MAX).expect("encodes");
    let mut decoder = FrameDecoder::new(usize::MAX);
    decoder.push(&frame);
    assert_eq!(
        decoder.next_json::<GatewayUpdate>().unwrap().as_ref(),
        Some(update)
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((step, stream)) = chunked(data) else {
        return;
    };
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    let mut current: Option<GatewayDesired> = None;
    for chunk in stream.chunks(step) {
        decoder.push(chunk);
        loop {
            let update = match decoder.next_json::<GatewayUpdate>() {
                Ok(Some(update)) => update,
                Ok(None) => break,
                Err(FrameError::Malformed(_) | FrameError::TooLarge { .. }) => {
                    return; // the gateway ends the session and reconnects
                }
                Err(other) => panic!("a decoder cannot fail with {other:?}"),
            };
            round_trips(&update);
            match (&update, current.as_mut()) {
                (GatewayUpdate::Snapshot(snapshot), _) => current = Some(snapshot.clone()),
                (
                    GatewayUpdate::Delta {
                        from,
                        to,
                        node_encryption,
                        upsert_peers,
                        remove_peers,
                        add_routes,
                        remove_routes,
                        policy,
                    },
                    Some(state),
                ) => {
                    let before = state.clone();
                    let applied = state.apply(&update);
                    // A policy delta needs policy inputs to apply to.
                    let policy_follows = !matches!(
                        (policy, &before.policy),
                        (Some(PolicyUpdate::Delta(_)), None)
                    );
                    assert_eq!(applied, *from == before.revision && policy_follows);
                    if !applied {
                        assert_eq!(*state, before, "a refused delta changes nothing");
                        return; // a gap: the gateway reconnects for a snapshot
                    }
                    assert_eq!(state.revision, *to);
                    match policy {
                        None => assert_eq!(state.policy, before.policy, "policy untouched"),
                        Some(PolicyUpdate::Replace(inputs)) => {
                            assert_eq!(state.policy.as_ref(), Some(inputs))
                        }
                        Some(PolicyUpdate::Disable) => assert_eq!(state.policy, None),
                        Some(PolicyUpdate::Delta(delta)) => {
                            let mut expected = before.policy.clone().expect("checked above");
                            expected.apply(delta);
                            assert_eq!(state.policy, Some(expected), "delta applied");
                        }
                    }
                    assert_eq!(state.node_encryption, *node_encryption);
                    assert!(state.peers.is_sorted() && state.routes.is_sorted());
                    for peer in upsert_peers {
                        assert!(state.peers.contains(peer), "upserted peer present");
                    }
                    for key in remove_peers {
                        let upserted = upsert_peers.iter().any(|p| p.public_key == *key);
                        let present = state.peers.iter().any(|p| p.public_key == *key);
                        assert_eq!(present, upserted, "removed peer gone unless upserted");
                    }
                    for route in add_routes {
                        assert!(state.routes.contains(route), "added route present");
                    }
                    for route in remove_routes {
                        if !add_routes.contains(route) {
                            assert!(!state.routes.contains(route), "removed route gone");
                        }
                    }
                }
                (GatewayUpdate::Delta { .. }, None) => return, // a gap before any snapshot
            }
            // What the gateway applies: one tunnel peer per peer, one route per route
            // destination (the last one wins).
            let state = current.as_ref().expect("set above");
            let plan = state.plan();
            assert_eq!(plan.revision, state.revision);
            assert_eq!(plan.peers.len(), state.peers.len());
            for route in &state.routes {
                assert!(plan.routes.contains_key(&route.destination));
            }
        }
    }
});
