//! What a gateway or DNS subscriber sends the controller's agent port, read as the controller
//! reads it (mesh-controller/src/agent.rs): the hello within 8 KiB, then gateway reports up to
//! `MAX_REPORT_FRAME`, unreadable reports skipped, an oversized frame ending the stream; or, on
//! a node's flow channel, its replies up to `MAX_FLOW_FRAME`, each flow printed as
//! `trellis observe` prints it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use trellis_core::agent::{AgentHello, AgentReport, AgentRole, MAX_REPORT_FRAME};
use trellis_core::flow::format::compact;
use trellis_core::flow::protocol::{FlowReply, MAX_FLOW_FRAME};
use trellis_core::framing::{FrameDecoder, FrameError, encode_json_frame};
use trellis_fuzz::chunked;

/// The controller's limit on the hello frame (`HELLO_MAX`, private to the controller).
const HELLO_MAX: usize = 8 * 1024;

/// `value` survives the wire: encoded in our framing and decoded, it is itself.
fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let frame = encode_json_frame(value, "fuzz", usize::MAX).expect("a decoded value encodes");
    let mut decoder = FrameDecoder::new(usize::MAX);
    decoder.push(&frame);
    let back: T = decoder
        .next_json()
        .expect("re-decodes")
        .expect("one whole frame");
    assert_eq!(&back, value);
    assert_eq!(decoder.buffered(), 0);
}

fuzz_target!(|data: &[u8]| {
    let Some((step, stream)) = chunked(data) else {
        return;
    };
    let mut chunks = stream.chunks(step);
    let mut decoder = FrameDecoder::new(HELLO_MAX);
    let hello = loop {
        match decoder.next_json::<AgentHello>() {
            Ok(Some(hello)) => break hello,
            Ok(None) => match chunks.next() {
                Some(chunk) => decoder.push(chunk),
                None => return,
            },
            Err(FrameError::TooLarge { len, .. }) => {
                assert!(len > HELLO_MAX);
                return;
            }
            Err(_) => return,
        }
    };
    round_trips(&hello);
    let node = match &hello.role {
        AgentRole::Gateway(registration) => registration.node.clone(),
        AgentRole::Dns => return, // the controller reads nothing more from DNS
        AgentRole::Bootstrap(_) => return, // answered once, nothing more read
        AgentRole::Flows(_) => {
            flow_replies(decoder, chunks);
            return;
        }
    };
    decoder.set_max(MAX_REPORT_FRAME);
    loop {
        match decoder.next_json::<AgentReport>() {
            Ok(Some(AgentReport::Gateway(report))) => {
                round_trips(&AgentReport::Gateway(report.clone()));
                if report.validate(&node).is_ok() {
                    // What `GET /status` does with an accepted report.
                    let aged = report.aged(u64::MAX);
                    assert_eq!(aged.peers.len(), report.peers.len());
                    assert!(
                        report.total_drops() >= report.drops.values().copied().max().unwrap_or(0)
                    );
                    let _ = serde_json::to_vec(&aged).expect("a report serialises");
                }
            }
            // A frame that is not a report is skipped: the framing still holds.
            Err(FrameError::Malformed(_)) => {}
            Err(FrameError::TooLarge { len, max }) => {
                assert!(len > max);
                return;
            }
            Err(other) => panic!("a decoder cannot fail with {other:?}"),
            Ok(None) => match chunks.next() {
                Some(chunk) => decoder.push(chunk),
                None => return,
            },
        }
    }
});

/// A node's flow channel after its hello: reply frames, each flow's compact line free of
/// control characters whatever the names hold (a terminal must never get escapes from them).
fn flow_replies<'a>(mut decoder: FrameDecoder, mut chunks: impl Iterator<Item = &'a [u8]>) {
    decoder.set_max(MAX_FLOW_FRAME);
    loop {
        match decoder.next_json::<FlowReply>() {
            Ok(Some(reply)) => {
                round_trips(&reply);
                if let FlowReply::Flows { flows, .. } = &reply {
                    for flow in flows {
                        let line = compact(flow);
                        assert!(!line.chars().any(char::is_control), "{line:?}");
                    }
                }
            }
            Err(FrameError::Malformed(_)) => {}
            Err(FrameError::TooLarge { len, max }) => {
                assert!(len > max);
                return;
            }
            Err(other) => panic!("a decoder cannot fail with {other:?}"),
            Ok(None) => match chunks.next() {
                Some(chunk) => decoder.push(chunk),
                None => return,
            },
        }
    }
}
