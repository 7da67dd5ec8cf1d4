//! The frames of a node's flow channel: a second agent connection a gateway opens to its
//! controller (hello role `flows`, the node's own certificate), on which the controller asks
//! and the node answers, so the controller relays a whole cluster (as hubble-relay does)
//! without any listener on the node. Queries are multiplexed by `id`; the controller may
//! cancel one (a reader went away).
//!
//! The same frames carry a query between controllers over peering, where the answering
//! controller keeps only the flows one of whose ends is a pod of the asking cluster.

use serde::{Deserialize, Serialize};

use super::model::Flow;
use super::request::FlowRequest;
use crate::framing::encode_json_frame;

/// The most flows one [`FlowReply::Flows`] frame carries.
pub const MAX_FLOWS_PER_FRAME: usize = 256;

/// The largest reply frame (its JSON, after the length prefix) a node or a controller sends,
/// and the largest one the controller accepts: one limit for both ends, so a frame a sender
/// makes is never one its reader refuses. Flows of pods with many labels go in frames of fewer
/// flows ([`flow_frames`]).
pub const MAX_FLOW_FRAME: usize = 1 << 20;

/// The most queries a node serves at once on its channel (more are answered with an error).
pub const MAX_QUERIES_PER_NODE: usize = 16;

/// Controller → node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FlowCommand {
    /// Send the recorded flows `request` selects, then (when it follows) new ones as they
    /// come, until cancelled.
    Query {
        id: u64,
        request: Box<FlowRequest>,
    },
    Cancel {
        id: u64,
    },
}

/// Node → controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FlowReply {
    /// Flows of query `id`, oldest first.
    Flows { id: u64, flows: Vec<Flow> },
    /// Flows the query missed: the follower fell behind the ring and they were overwritten, or
    /// a flow was too large for a frame by itself.
    Lost { id: u64, count: u64 },
    /// Query `id` is done: its recorded flows are all sent (a query that does not follow), or
    /// it was refused (`error`).
    End {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// [`FlowReply::Flows`] as it is encoded: the flows serialised where they are (`Flow` or
/// `Arc<Flow>`), not copied into a reply first. The JSON is the same.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Outgoing<'a, F> {
    Flows { id: u64, flows: &'a [F] },
}

/// Reply frames of one batch of flows.
#[derive(Debug, Default)]
pub struct FlowFrames {
    /// [`FlowReply::Flows`] frames, the flows in their order, then a [`FlowReply::Lost`] frame
    /// when some were left out.
    pub frames: Vec<Vec<u8>>,
    /// Flows left out: each larger than a frame by itself.
    pub left_out: u64,
}

/// `flows` as reply frames of query `id`, each at most `max` bytes after its length prefix:
/// at most [`MAX_FLOWS_PER_FRAME`] flows a frame, fewer when they are large (a chunk that does
/// not fit is halved until it does). A single flow larger than `max` is left out, counted, and
/// reported to the reader in a trailing [`FlowReply::Lost`] frame.
pub fn flow_frames<F: Serialize>(id: u64, flows: &[F], max: usize) -> FlowFrames {
    let mut out = FlowFrames::default();
    let mut pending: Vec<&[F]> = flows.chunks(MAX_FLOWS_PER_FRAME).rev().collect();
    while let Some(chunk) = pending.pop() {
        match encode_json_frame(&Outgoing::Flows { id, flows: chunk }, "flows", max) {
            Ok(frame) => out.frames.push(frame),
            Err(_) if chunk.len() > 1 => {
                let (first, second) = chunk.split_at(chunk.len() / 2);
                pending.push(second);
                pending.push(first);
            }
            Err(_) => out.left_out += 1,
        }
    }
    if out.left_out > 0 {
        let lost = FlowReply::Lost {
            id,
            count: out.left_out,
        };
        // A few dozen bytes: it fits any limit a frame of flows could.
        if let Ok(frame) = encode_json_frame(&lost, "flows lost", MAX_FLOW_FRAME) {
            out.frames.push(frame);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::flow::model::*;
    use crate::framing::{FrameDecoder, HEADER};

    /// A flow at second `at` between two pods with `labels` labels each (a tenant may give a
    /// pod about 150: ~15 KiB of JSON per end).
    fn flow(at: u64, labels: usize) -> Flow {
        let end = Arc::new(Endpoint {
            kind: EndpointKind::Pod,
            cluster: Some("a".into()),
            namespace: Some("x".into()),
            pod_name: Some("p".into()),
            node_name: Some("a-node-0".into()),
            labels: (0..labels)
                .map(|i| {
                    (
                        format!("team-{i:03}.example.com/annotation-like-key"),
                        format!("value-{i:03}-with-some-length-to-it-as-real-ones-have"),
                    )
                })
                .collect(),
            identity: Some(7),
        });
        Flow {
            time: UNIX_EPOCH + Duration::from_secs(1_800_000_000 + at),
            node_name: "a/n1".into(),
            verdict: Verdict::Forwarded,
            drop_reason: None,
            event: FlowEvent::ConnectionNew,
            ip: Ip {
                source: "10.1.0.5".parse().unwrap(),
                destination: "10.2.0.7".parse().unwrap(),
                encrypted: false,
            },
            l4: L4 {
                protocol: L4Protocol::Tcp,
                source_port: Some(40000),
                destination_port: Some(80),
                tcp_flags: Some(TcpFlags::from_byte(0x02)),
                icmp: None,
            },
            source: end.clone(),
            destination: end,
            traffic_direction: TrafficDirection::Egress,
            allowed_by: Vec::new(),
            denied_by: Vec::new(),
            tunnel: None,
            counters: None,
        }
    }

    /// What a reader limited to `max` makes of `frames`: the flows, and the count lost.
    fn read_back(frames: &[Vec<u8>], id: u64, max: usize) -> (Vec<Flow>, u64) {
        let mut decoder = FrameDecoder::new(max);
        let mut flows = Vec::new();
        let mut lost = 0;
        for frame in frames {
            assert!(frame.len() <= max + HEADER);
            decoder.push(frame);
            match decoder.next_json::<FlowReply>().unwrap().unwrap() {
                FlowReply::Flows { id: got, flows: f } if got == id => flows.extend(f),
                FlowReply::Lost { id: got, count } if got == id => lost += count,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(decoder.buffered(), 0);
        (flows, lost)
    }

    #[test]
    fn a_batch_of_flows_of_pods_with_many_labels_fits_frames_the_reader_accepts() {
        let flows: Vec<Flow> = (0..MAX_FLOWS_PER_FRAME as u64)
            .map(|at| flow(at, 150))
            .collect();
        let out = flow_frames(4, &flows, MAX_FLOW_FRAME);
        assert_eq!(out.left_out, 0);
        assert!(out.frames.len() > 1, "split: one frame would be ~7 MB");
        let (back, lost) = read_back(&out.frames, 4, MAX_FLOW_FRAME);
        assert_eq!(lost, 0);
        assert_eq!(back, flows, "all of them, in order");
        // Shared flows (as a node holds them) encode the same.
        let shared: Vec<Arc<Flow>> = flows.iter().cloned().map(Arc::new).collect();
        assert_eq!(flow_frames(4, &shared, MAX_FLOW_FRAME).frames, out.frames);
    }

    #[test]
    fn reply_frames_stay_under_the_cap_and_carry_every_flow() {
        let flows: Vec<Flow> = (0..600).map(|at| flow(at, 1)).collect();
        let one = encode_json_frame(
            &FlowReply::Flows {
                id: 9,
                flows: vec![flows[0].clone()],
            },
            "f",
            usize::MAX,
        )
        .unwrap()
        .len();
        // Room for about ten flows a frame: the 256-flow chunks are split.
        let max = one * 10;
        let out = flow_frames(9, &flows, max);
        assert_eq!(out.left_out, 0);
        assert!(out.frames.len() >= 60);
        let (back, lost) = read_back(&out.frames, 9, max);
        assert_eq!((back, lost), (flows, 0), "all of them, in order");
    }

    #[test]
    fn a_flow_too_large_for_a_frame_is_reported_lost_and_the_rest_sent() {
        let flows = [flow(1, 1), flow(2, 20_000), flow(3, 1)];
        let out = flow_frames(5, &flows, MAX_FLOW_FRAME);
        assert_eq!(out.left_out, 1);
        let (back, lost) = read_back(&out.frames, 5, MAX_FLOW_FRAME);
        assert_eq!(back, [flows[0].clone(), flows[2].clone()]);
        assert_eq!(lost, 1);
        let alone = flow_frames(5, &flows[1..2], MAX_FLOW_FRAME);
        let (back, lost) = read_back(&alone.frames, 5, MAX_FLOW_FRAME);
        assert_eq!((back.len(), lost), (0, 1), "too large alone");
        assert!(
            flow_frames::<Flow>(5, &[], MAX_FLOW_FRAME)
                .frames
                .is_empty()
        );
    }
}
