//! The pure parts of relaying flows: the newest N of many sources merged by time, the rule of
//! what a peer cluster may see, the line between a source's recorded flows and its new ones,
//! and the NDJSON encoding (reply frames are `trellis_core::flow::protocol::flow_frames`, the
//! same the nodes use).

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::time::SystemTime;

use trellis_core::cluster::ClusterId;
use trellis_core::flow::model::EndpointKind;
use trellis_core::flow::{Flow, FlowFilter};

use super::SourceKey;

/// A flow with its arrival order, which breaks ties of time (stable output).
struct Keyed {
    time: SystemTime,
    seq: u64,
    flow: Flow,
}

impl PartialEq for Keyed {
    fn eq(&self, other: &Self) -> bool {
        (self.time, self.seq) == (other.time, other.seq)
    }
}

impl Eq for Keyed {}

impl PartialOrd for Keyed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Keyed {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.time, self.seq).cmp(&(other.time, other.seq))
    }
}

/// The newest `limit` flows of everything pushed, whatever the order they come in: memory is
/// `limit` flows however many sources answer with however many.
pub struct NewestFlows {
    limit: usize,
    seq: u64,
    /// A min-heap: the oldest kept flow on top, the first to go.
    heap: BinaryHeap<Reverse<Keyed>>,
}

impl NewestFlows {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            seq: 0,
            heap: BinaryHeap::new(),
        }
    }

    pub fn push(&mut self, flow: Flow) {
        if self.limit == 0 {
            return;
        }
        let keyed = Keyed {
            time: flow.time,
            seq: self.seq,
            flow,
        };
        self.seq += 1;
        if self.heap.len() < self.limit {
            self.heap.push(Reverse(keyed));
        } else if self.heap.peek().is_some_and(|oldest| keyed > oldest.0) {
            self.heap.pop();
            self.heap.push(Reverse(keyed));
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Oldest first.
    pub fn into_sorted(self) -> Vec<Flow> {
        let mut kept: Vec<Keyed> = self.heap.into_iter().map(|r| r.0).collect();
        kept.sort();
        kept.into_iter().map(|k| k.flow).collect()
    }
}

/// The identity rule of peer queries: a peer cluster sees a flow only if one of its ends is a
/// pod of that cluster (its own pods' traffic), never flows between other clusters' pods.
pub fn visible_to(flow: &Flow, asker: &ClusterId) -> bool {
    [&*flow.source, &*flow.destination]
        .into_iter()
        .any(|end| end.kind == EndpointKind::Pod && end.cluster.as_deref() == Some(asker.as_str()))
}

/// The filter a peer's query is asked of the nodes with: narrowed to flows with an end in the
/// asking cluster when that keeps its meaning, so that its `last N` counts flows the peer may
/// see. (The rule itself is [`visible_to`], applied to whatever comes back.)
pub fn narrowed_for(filter: &FlowFilter, asker: &ClusterId) -> FlowFilter {
    let mut narrowed = filter.clone();
    // Values of `cluster` are alternatives: any flow with an end in the asker already passes
    // a list naming it, so the list becomes the asker alone. A list without it means both
    // must hold, which one list cannot say: it is left as asked.
    if filter.cluster.is_empty() || filter.cluster.iter().any(|c| c == asker.as_str()) {
        narrowed.cluster = vec![asker.to_string()];
    }
    narrowed
}

/// Where each source's recorded flows ended, so that its new ones can be told from them.
///
/// A follower subscribes to a source's new flows first and asks for its recorded ones after,
/// so nothing recorded in between is missed; what was recorded in between then comes both
/// ways. A new flow from a source is shown only if it is newer than the newest of that
/// source's recorded ones, or as new and not one of them.
#[derive(Default)]
pub struct LiveGate {
    /// Per source: the time of its newest recorded flow and the flows at that time.
    boundary: BTreeMap<SourceKey, (SystemTime, Vec<Flow>)>,
}

impl LiveGate {
    /// `flow` is one of `source`'s recorded flows.
    pub fn recorded(&mut self, source: &SourceKey, flow: &Flow) {
        match self.boundary.get_mut(source) {
            Some((time, at)) if flow.time == *time => at.push(flow.clone()),
            Some((time, _)) if flow.time < *time => {}
            _ => {
                self.boundary
                    .insert(source.clone(), (flow.time, vec![flow.clone()]));
            }
        }
    }

    /// Whether `flow`, new from `source`, is to be shown.
    pub fn admit(&mut self, source: &SourceKey, flow: &Flow) -> bool {
        let Some((time, at)) = self.boundary.get(source) else {
            return true;
        };
        match flow.time.cmp(time) {
            Ordering::Less => false,
            Ordering::Equal => !at.contains(flow),
            Ordering::Greater => {
                // Past the recorded ones: from here on everything from it is new.
                self.boundary.remove(source);
                true
            }
        }
    }
}

/// The peers a request names that are connected (`*`: every connected one), and the names
/// asked for that are not.
pub fn select_peers(asked: &[String], connected: &[ClusterId]) -> (Vec<ClusterId>, Vec<String>) {
    if asked.iter().any(|p| p == "*") {
        return (connected.to_vec(), Vec::new());
    }
    let mut chosen = Vec::new();
    let mut missing = Vec::new();
    for name in asked {
        match connected.iter().find(|c| c.as_str() == name) {
            Some(c) if !chosen.contains(c) => chosen.push(c.clone()),
            Some(_) => {}
            None => missing.push(name.clone()),
        }
    }
    (chosen, missing)
}

/// `flows` as NDJSON: one JSON object per line.
pub fn ndjson(flows: &[Flow]) -> Vec<u8> {
    let mut out = Vec::with_capacity(flows.len() * 512);
    for flow in flows {
        // A flow is plain data (strings, numbers, maps with string keys): it always encodes.
        if serde_json::to_writer(&mut out, flow).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::time::UNIX_EPOCH;

    use trellis_core::flow::model::*;

    use super::*;

    /// A flow at second `at` from `from` to `to` (`cluster/ns/pod`), seen on `node`.
    pub(crate) fn flow(at: u64, node: &str, from: &str, to: &str) -> Flow {
        trellis_core::flow::fixture::connection(1_800_000_000, at, node, from, to)
    }

    fn seconds(flows: &[Flow]) -> Vec<u64> {
        flows
            .iter()
            .map(|f| f.time.duration_since(UNIX_EPOCH).unwrap().as_secs() - 1_800_000_000)
            .collect()
    }

    #[test]
    fn the_newest_n_of_interleaved_sources_come_out_oldest_first() {
        let mut newest = NewestFlows::new(4);
        // Two nodes' answers, each oldest first, arriving one after the other.
        for at in [1, 4, 6, 9] {
            newest.push(flow(at, "a/n1", "a/x/p", "a/x/q"));
        }
        for at in [2, 3, 7, 8] {
            newest.push(flow(at, "a/n2", "a/x/p", "a/x/q"));
        }
        assert_eq!(newest.len(), 4);
        assert_eq!(seconds(&newest.into_sorted()), [6, 7, 8, 9]);
        let mut none = NewestFlows::new(0);
        none.push(flow(1, "a/n1", "a/x/p", "a/x/q"));
        assert!(none.is_empty());
        // Ties keep their arrival order.
        let mut ties = NewestFlows::new(3);
        for node in ["a/n1", "a/n2", "a/n3"] {
            ties.push(flow(5, node, "a/x/p", "a/x/q"));
        }
        let nodes: Vec<String> = ties
            .into_sorted()
            .into_iter()
            .map(|f| f.node_name)
            .collect();
        assert_eq!(nodes, ["a/n1", "a/n2", "a/n3"]);
    }

    #[test]
    fn a_peer_sees_only_flows_with_one_of_its_own_pods() {
        let b = ClusterId::try_from("b".to_owned()).unwrap();
        assert!(visible_to(&flow(1, "a/n1", "a/x/client", "b/y/server"), &b));
        assert!(visible_to(&flow(1, "a/n1", "b/y/client", "a/x/server"), &b));
        assert!(
            !visible_to(&flow(1, "a/n1", "a/x/client", "a/x/server"), &b),
            "two pods of the answering cluster"
        );
        assert!(
            !visible_to(&flow(1, "a/n1", "a/x/client", "c/x/server"), &b),
            "a third cluster's pod"
        );
        // A node or the world named with the asker's cluster is not one of its pods.
        let mut node_end = flow(1, "a/n1", "a/x/client", "a/x/server");
        node_end.destination = Arc::new(Endpoint {
            kind: EndpointKind::Node,
            cluster: Some("b".into()),
            ..Endpoint::world()
        });
        assert!(!visible_to(&node_end, &b));
    }

    #[test]
    fn a_peers_filter_is_narrowed_to_its_cluster_only_where_that_keeps_its_meaning() {
        let b = ClusterId::try_from("b".to_owned()).unwrap();
        let asked = |clusters: &[&str]| FlowFilter {
            cluster: clusters.iter().map(|c| (*c).to_owned()).collect(),
            namespace: vec!["x".into()],
            ..FlowFilter::default()
        };
        assert_eq!(narrowed_for(&asked(&[]), &b).cluster, ["b"]);
        assert_eq!(narrowed_for(&asked(&["c", "b"]), &b).cluster, ["b"]);
        assert_eq!(narrowed_for(&asked(&["c"]), &b).cluster, ["c"]);
        assert_eq!(narrowed_for(&asked(&[]), &b).namespace, ["x"]);
    }

    #[test]
    fn new_flows_already_recorded_are_shown_once() {
        let n1 = SourceKey::Node {
            node: "n1".into(),
            generation: 1,
        };
        let n2 = SourceKey::Node {
            node: "n2".into(),
            generation: 2,
        };
        let mut gate = LiveGate::default();
        let recorded = [
            flow(1, "a/n1", "a/x/p", "a/x/q"),
            flow(5, "a/n1", "a/x/p", "a/x/q"),
            flow(5, "a/n1", "a/x/r", "a/x/q"),
        ];
        for f in &recorded {
            gate.recorded(&n1, f);
        }
        // Recorded between the subscription and the history: already shown.
        assert!(!gate.admit(&n1, &recorded[1]));
        assert!(!gate.admit(&n1, &recorded[0]));
        // Same time, another connection: new.
        assert!(gate.admit(&n1, &flow(5, "a/n1", "a/x/s", "a/x/q")));
        assert!(gate.admit(&n1, &flow(6, "a/n1", "a/x/p", "a/x/q")));
        // A source without recorded flows shows everything new.
        assert!(gate.admit(&n2, &flow(1, "a/n2", "a/x/p", "a/x/q")));
    }

    #[test]
    fn peers_are_chosen_by_name_or_all() {
        let ids: Vec<ClusterId> = ["b", "c"]
            .iter()
            .map(|c| ClusterId::try_from((*c).to_owned()).unwrap())
            .collect();
        let (all, none) = select_peers(&["*".into()], &ids);
        assert_eq!((all, none.len()), (ids.clone(), 0));
        let (chosen, missing) = select_peers(&["c".into(), "d".into(), "c".into()], &ids);
        assert_eq!(chosen, vec![ids[1].clone()]);
        assert_eq!(missing, ["d"]);
    }

    #[test]
    fn ndjson_is_one_flow_per_line() {
        let flows = [
            flow(1, "a/n1", "a/x/p", "a/x/q"),
            flow(2, "a/n1", "a/x/p", "b/x/q"),
        ];
        let text = String::from_utf8(ndjson(&flows)).unwrap();
        let back: Vec<Flow> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, flows);
        assert!(text.ends_with('\n'));
    }
}
