//! The node's side of the flow channel, driven as the controller drives it: real frames over
//! an in-memory duplex stream.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use trellis_core::flow::protocol::{
    FlowCommand, FlowReply, MAX_FLOW_FRAME, MAX_FLOWS_PER_FRAME, MAX_QUERIES_PER_NODE,
};
use trellis_core::flow::{
    Endpoint, EndpointKind, Flow, FlowEvent, FlowRequest, Ip, L4, L4Protocol, TrafficDirection,
    Verdict,
};
use trellis_core::framing::{FrameDecoder, encode_json_frame};
use trellis_gateway::flows::channel::{ChannelError, MAX_COMMAND_FRAME, serve};
use trellis_gateway::flows::recorder::Recorder;
use trellis_test_support::eventually_async;

fn flow(port: u16, verdict: Verdict) -> Flow {
    Flow {
        time: SystemTime::now(),
        node_name: "c1/n1".into(),
        verdict,
        drop_reason: None,
        event: FlowEvent::ConnectionNew,
        ip: Ip {
            source: "10.1.1.5".parse().unwrap(),
            destination: "10.1.2.7".parse().unwrap(),
            encrypted: true,
        },
        l4: L4 {
            protocol: L4Protocol::Tcp,
            source_port: Some(port),
            destination_port: Some(80),
            tcp_flags: None,
            icmp: None,
        },
        source: Arc::new(Endpoint {
            kind: EndpointKind::Pod,
            cluster: Some("c1".into()),
            namespace: Some("x".into()),
            pod_name: Some("client".into()),
            ..Endpoint::world()
        }),
        destination: Arc::new(Endpoint::world()),
        traffic_direction: TrafficDirection::Egress,
        allowed_by: vec![],
        denied_by: vec![],
        tunnel: None,
        counters: None,
    }
}

/// The controller's end of a channel served on the other.
struct Controller {
    stream: DuplexStream,
    decoder: FrameDecoder,
    served: tokio::task::JoinHandle<ChannelError>,
}

impl Controller {
    fn start(recorder: &Arc<Recorder>) -> Self {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        Self {
            stream: ours,
            decoder: FrameDecoder::new(64 << 20),
            served: tokio::spawn(serve(theirs, recorder.clone())),
        }
    }

    async fn send(&mut self, command: &FlowCommand) {
        let frame = encode_json_frame(command, "command", MAX_COMMAND_FRAME).unwrap();
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn query(&mut self, id: u64, request: FlowRequest) {
        self.send(&FlowCommand::Query {
            id,
            request: Box::new(request),
        })
        .await;
    }

    async fn reply(&mut self) -> FlowReply {
        let read = async {
            let mut buf = [0u8; 64 * 1024];
            loop {
                if let Some(reply) = self.decoder.next_json::<FlowReply>().unwrap() {
                    return reply;
                }
                let n = self.stream.read(&mut buf).await.unwrap();
                assert_ne!(n, 0, "the node closed the channel");
                self.decoder.push(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("a reply within 5 s")
    }
}

/// Waits until `count` queries follow the recorder.
async fn followers(recorder: &Recorder, count: usize) {
    eventually_async("the followers", Duration::from_secs(5), || async {
        (recorder.followers() == count).then_some(())
    })
    .await
}

fn follow() -> FlowRequest {
    FlowRequest {
        follow: true,
        ..FlowRequest::default()
    }
}

#[tokio::test]
async fn a_query_is_answered_in_batches_then_end() {
    let recorder = Arc::new(Recorder::new(1000));
    let total = 2 * MAX_FLOWS_PER_FRAME + 88;
    for i in 0..total {
        recorder.record(flow(i as u16, Verdict::Forwarded));
    }
    recorder.record(flow(9999, Verdict::Dropped));
    let mut controller = Controller::start(&recorder);
    let mut request = FlowRequest::default();
    request.filter.verdict = vec![Verdict::Forwarded];
    controller.query(7, request).await;
    let mut sizes = Vec::new();
    let mut ports = Vec::new();
    loop {
        match controller.reply().await {
            FlowReply::Flows { id: 7, flows } => {
                sizes.push(flows.len());
                ports.extend(flows.iter().map(|f| f.l4.source_port.unwrap()));
            }
            FlowReply::End { id: 7, error: None } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sizes, [MAX_FLOWS_PER_FRAME, MAX_FLOWS_PER_FRAME, 88]);
    assert_eq!(ports, (0..total as u16).collect::<Vec<_>>(), "oldest first");

    // The last N.
    controller
        .query(
            8,
            FlowRequest {
                last: Some(2),
                ..FlowRequest::default()
            },
        )
        .await;
    match controller.reply().await {
        FlowReply::Flows { id: 8, flows } => {
            let ports: Vec<_> = flows.iter().map(|f| f.l4.source_port.unwrap()).collect();
            assert_eq!(ports, [total as u16 - 1, 9999]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        controller.reply().await,
        FlowReply::End { id: 8, error: None }
    );
}

/// A pod with many labels (about 150, as a tenant may give it): ~15 KiB of JSON per end.
fn heavily_labelled(port: u16, labels: usize) -> Flow {
    let mut flow = flow(port, Verdict::Forwarded);
    let end = Endpoint {
        labels: (0..labels)
            .map(|i| {
                (
                    format!("team-{i:03}.example.com/annotation-like-key"),
                    format!("value-{i:03}-with-some-length-to-it-as-real-ones-have"),
                )
            })
            .collect(),
        ..(*flow.source).clone()
    };
    flow.source = Arc::new(end.clone());
    flow.destination = Arc::new(end);
    flow
}

#[tokio::test]
async fn flows_of_pods_with_many_labels_go_out_in_frames_the_controller_accepts() {
    let recorder = Arc::new(Recorder::new(1000));
    for i in 0..MAX_FLOWS_PER_FRAME {
        recorder.record(heavily_labelled(i as u16, 150));
    }
    // One flow larger than a frame by itself cannot be sent: it is reported lost.
    recorder.record(heavily_labelled(9999, 20_000));
    let mut controller = Controller::start(&recorder);
    // The controller accepts no larger frame.
    controller.decoder = FrameDecoder::new(MAX_FLOW_FRAME);
    controller.query(3, FlowRequest::default()).await;
    let mut frames = 0;
    let mut ports = Vec::new();
    let mut lost = 0;
    loop {
        match controller.reply().await {
            FlowReply::Flows { id: 3, flows } => {
                frames += 1;
                ports.extend(flows.iter().map(|f| f.l4.source_port.unwrap()));
            }
            FlowReply::Lost { id: 3, count } => lost += count,
            FlowReply::End { id: 3, error: None } => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(frames > 1, "split into several frames");
    assert_eq!(
        ports,
        (0..MAX_FLOWS_PER_FRAME as u16).collect::<Vec<_>>(),
        "every flow that fits, oldest first"
    );
    assert_eq!(lost, 1, "the one too large for a frame is reported lost");
}

#[tokio::test]
async fn a_follower_gets_a_flow_recorded_after_its_query_and_a_cancel_stops_it() {
    let recorder = Arc::new(Recorder::new(100));
    recorder.record(flow(1, Verdict::Forwarded));
    let mut controller = Controller::start(&recorder);
    controller.query(1, follow()).await;
    followers(&recorder, 1).await;
    recorder.record(flow(2, Verdict::Forwarded));
    match controller.reply().await {
        FlowReply::Flows { id: 1, flows } => {
            assert_eq!(flows.len(), 1);
            assert_eq!(flows[0].l4.source_port, Some(2), "only the new flow");
        }
        other => panic!("{other:?}"),
    }
    controller.send(&FlowCommand::Cancel { id: 1 }).await;
    followers(&recorder, 0).await;
    controller.query(2, follow()).await;
    followers(&recorder, 1).await;
    recorder.record(flow(3, Verdict::Forwarded));
    match controller.reply().await {
        FlowReply::Flows { id: 2, flows } => assert_eq!(flows[0].l4.source_port, Some(3)),
        other => panic!("the cancelled query sent on: {other:?}"),
    }
}

#[tokio::test]
async fn a_seventeenth_query_at_once_is_refused() {
    let recorder = Arc::new(Recorder::new(100));
    let mut controller = Controller::start(&recorder);
    for id in 0..MAX_QUERIES_PER_NODE as u64 {
        controller.query(id, follow()).await;
    }
    controller.query(99, follow()).await;
    match controller.reply().await {
        FlowReply::End {
            id: 99,
            error: Some(error),
        } => assert!(error.contains("at most 16"), "{error}"),
        other => panic!("{other:?}"),
    }
    // One done, one more fits.
    controller.send(&FlowCommand::Cancel { id: 0 }).await;
    controller.query(100, FlowRequest::default()).await;
    assert_eq!(
        controller.reply().await,
        FlowReply::End {
            id: 100,
            error: None
        }
    );
}

#[tokio::test]
async fn a_garbage_frame_is_skipped_and_an_oversized_one_ends_the_channel() {
    let recorder = Arc::new(Recorder::new(100));
    let mut controller = Controller::start(&recorder);
    let garbage = b"{\"type\":\"launch_missiles\"}";
    controller
        .stream
        .write_all(&(garbage.len() as u32).to_be_bytes())
        .await
        .unwrap();
    controller.stream.write_all(garbage).await.unwrap();
    controller.query(5, FlowRequest::default()).await;
    assert_eq!(
        controller.reply().await,
        FlowReply::End { id: 5, error: None },
        "the next command is answered"
    );
    controller
        .stream
        .write_all(&(MAX_COMMAND_FRAME as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), &mut controller.served)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ended, ChannelError::Frame(_)), "{ended:?}");
}

#[tokio::test]
async fn queries_end_with_the_connection() {
    let recorder = Arc::new(Recorder::new(100));
    let mut controller = Controller::start(&recorder);
    controller.query(1, follow()).await;
    followers(&recorder, 1).await;
    drop(controller.stream);
    let ended = tokio::time::timeout(Duration::from_secs(5), controller.served)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ended, ChannelError::Closed), "{ended:?}");
    followers(&recorder, 0).await;
}
