//! The node's recent flows: a ring of fixed capacity (the oldest flow goes when a new one
//! comes, counted, as Hubble's ring does) and a bounded broadcast for readers that follow.
//! Memory is bounded whatever the connection rate: the ring's capacity plus the broadcast's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use trellis_core::flow::{Flow, FlowFilter, FlowRequest};

/// Hubble's default ring size.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Flows queued for each follower; a follower further behind loses the oldest (and is told).
pub const FOLLOW_BUFFER: usize = 1024;

/// The ring and the followers' broadcast.
#[derive(Debug)]
pub struct Recorder {
    ring: Mutex<VecDeque<Arc<Flow>>>,
    capacity: usize,
    overwritten: AtomicU64,
    followers: broadcast::Sender<Arc<Flow>>,
}

/// What a follower gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    Flow(Arc<Flow>),
    /// This many flows went by while the follower was behind.
    Lost(u64),
}

/// New flows matching a filter, as they are recorded.
#[derive(Debug)]
pub struct Follower {
    filter: FlowFilter,
    receiver: broadcast::Receiver<Arc<Flow>>,
}

impl Follower {
    /// The next matching flow, or how many flows were lost; `None` once the recorder is gone.
    pub async fn next(&mut self) -> Option<Followed> {
        loop {
            match self.receiver.recv().await {
                Ok(flow) if self.filter.matches(&flow) => return Some(Followed::Flow(flow)),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(count)) => {
                    return Some(Followed::Lost(count));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next matching flow or loss already waiting, without waiting.
    pub fn try_next(&mut self) -> Option<Followed> {
        loop {
            match self.receiver.try_recv() {
                Ok(flow) if self.filter.matches(&flow) => return Some(Followed::Flow(flow)),
                Ok(_) => {}
                Err(broadcast::error::TryRecvError::Lagged(count)) => {
                    return Some(Followed::Lost(count));
                }
                Err(_) => return None,
            }
        }
    }
}

/// A request's answer: the recorded flows it selects, oldest first, then (when it follows)
/// the new ones, with no gap or repeat between the two.
#[derive(Debug)]
pub struct Answer {
    pub recorded: Vec<Arc<Flow>>,
    pub follower: Option<Follower>,
}

impl Recorder {
    /// A ring of `capacity` flows (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (followers, _) = broadcast::channel(FOLLOW_BUFFER);
        Self {
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            overwritten: AtomicU64::new(0),
            followers,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Flows pushed out of the ring before anyone asked for them, so far.
    pub fn overwritten(&self) -> u64 {
        self.overwritten.load(Ordering::Relaxed)
    }

    /// Queries following new flows now.
    pub fn followers(&self) -> usize {
        self.followers.receiver_count()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Flow>>> {
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `flow`; `true` when the oldest flow was overwritten to make room.
    pub fn record(&self, flow: Flow) -> bool {
        let flow = Arc::new(flow);
        let mut ring = self.lock();
        let overwrote = ring.len() >= self.capacity;
        if overwrote {
            ring.pop_front();
            self.overwritten.fetch_add(1, Ordering::Relaxed);
        }
        ring.push_back(flow.clone());
        // Under the ring's lock, so a query's snapshot and its subscription meet exactly.
        // No follower is no error.
        let _ = self.followers.send(flow);
        overwrote
    }

    /// The recorded flows `request` selects (the last N when it says so; none when it
    /// follows without a count or a window start, as `hubble observe --follow` does: see
    /// [`FlowRequest::wants_history`]) and, when it follows, the new ones from here on.
    pub fn query(&self, request: &FlowRequest) -> Answer {
        let ring = self.lock();
        let follower = request.follow.then(|| Follower {
            filter: request.filter.clone(),
            receiver: self.followers.subscribe(),
        });
        let wanted = match request.last {
            Some(n) => n,
            None if request.wants_history() => usize::MAX,
            None => 0,
        };
        let mut recorded: Vec<Arc<Flow>> = Vec::new();
        if wanted > 0 {
            for flow in ring.iter().rev() {
                if request.filter.matches(flow) {
                    recorded.push(flow.clone());
                    if recorded.len() == wanted {
                        break;
                    }
                }
            }
        }
        drop(ring);
        recorded.reverse();
        Answer { recorded, follower }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use trellis_core::flow::{
        Endpoint, EndpointKind, FlowEvent, Ip, L4, L4Protocol, TrafficDirection, Verdict,
    };

    use super::*;

    /// A flow at second `second` from port `port`.
    pub(crate) fn flow(second: u64, port: u16, verdict: Verdict) -> Flow {
        let pod = Arc::new(Endpoint {
            kind: EndpointKind::Pod,
            cluster: Some("c1".into()),
            namespace: Some("x".into()),
            pod_name: Some("client".into()),
            node_name: Some("n1".into()),
            ..Endpoint::world()
        });
        Flow {
            time: at(second),
            node_name: "c1/n1".into(),
            verdict,
            drop_reason: None,
            event: FlowEvent::ConnectionNew,
            ip: Ip {
                source: "10.1.1.5".parse().unwrap(),
                destination: "10.2.1.9".parse().unwrap(),
                encrypted: false,
            },
            l4: L4 {
                protocol: L4Protocol::Tcp,
                source_port: Some(port),
                destination_port: Some(80),
                tcp_flags: None,
                icmp: None,
            },
            source: pod,
            destination: Arc::new(Endpoint::world()),
            traffic_direction: TrafficDirection::Egress,
            allowed_by: vec![],
            denied_by: vec![],
            tunnel: None,
            counters: None,
        }
    }

    fn at(second: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + second)
    }

    fn ports(flows: &[Arc<Flow>]) -> Vec<u16> {
        flows.iter().map(|f| f.l4.source_port.unwrap()).collect()
    }

    fn filled(capacity: usize, count: u16) -> Recorder {
        let r = Recorder::new(capacity);
        for i in 0..count {
            let verdict = if i % 2 == 0 {
                Verdict::Forwarded
            } else {
                Verdict::Dropped
            };
            r.record(flow(u64::from(i), i, verdict));
        }
        r
    }

    #[test]
    fn the_oldest_flows_are_overwritten_and_counted() {
        let r = filled(4, 10);
        assert_eq!(r.len(), 4);
        assert_eq!(r.overwritten(), 6);
        let all = r.query(&FlowRequest::default());
        assert_eq!(ports(&all.recorded), [6, 7, 8, 9], "oldest first");
        assert!(all.follower.is_none());
        assert_eq!(Recorder::new(0).capacity(), 1);
    }

    #[test]
    fn the_last_n_within_a_window_that_match_the_filter() {
        let r = filled(100, 20);
        let mut request = FlowRequest {
            last: Some(3),
            ..FlowRequest::default()
        };
        assert_eq!(ports(&r.query(&request).recorded), [17, 18, 19]);
        request.filter.verdict = vec![Verdict::Dropped];
        assert_eq!(ports(&r.query(&request).recorded), [15, 17, 19]);
        request.last = None;
        request.filter.since = Some(at(10));
        request.filter.until = Some(at(14));
        assert_eq!(ports(&r.query(&request).recorded), [11, 13]);
    }

    #[tokio::test]
    async fn a_follower_gets_new_matching_flows_and_no_recorded_ones_without_a_count() {
        let r = filled(100, 5);
        let mut request = FlowRequest {
            follow: true,
            ..FlowRequest::default()
        };
        request.filter.verdict = vec![Verdict::Forwarded];
        let mut answer = r.query(&request);
        assert!(answer.recorded.is_empty());
        let follower = answer.follower.as_mut().unwrap();
        r.record(flow(50, 50, Verdict::Dropped));
        r.record(flow(51, 51, Verdict::Forwarded));
        match follower.next().await.unwrap() {
            Followed::Flow(f) => assert_eq!(f.l4.source_port, Some(51)),
            other => panic!("{other:?}"),
        }
        assert_eq!(follower.try_next(), None);
        request.last = Some(1);
        let answer = r.query(&request);
        assert_eq!(ports(&answer.recorded), [51], "a count with follow");
        // `--since X --follow`: the window's recorded flows, then new ones.
        request.last = None;
        request.filter.since = Some(at(3));
        let answer = r.query(&request);
        assert_eq!(
            ports(&answer.recorded),
            [4, 51],
            "a window start with follow"
        );
        assert!(answer.follower.is_some());
    }

    #[tokio::test]
    async fn a_follower_that_falls_behind_is_told_how_many_it_lost() {
        let r = Recorder::new(8);
        let request = FlowRequest {
            follow: true,
            ..FlowRequest::default()
        };
        let mut follower = r.query(&request).follower.unwrap();
        let extra = 10;
        for i in 0..(FOLLOW_BUFFER as u16 + extra) {
            r.record(flow(u64::from(i), i, Verdict::Forwarded));
        }
        assert_eq!(
            follower.next().await,
            Some(Followed::Lost(u64::from(extra)))
        );
        match follower.next().await.unwrap() {
            Followed::Flow(f) => assert_eq!(f.l4.source_port, Some(extra)),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.len(), 8, "the ring keeps its size under the storm");
        assert_eq!(r.overwritten(), FOLLOW_BUFFER as u64 + u64::from(extra) - 8);
    }
}
