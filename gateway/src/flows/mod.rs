//! Flows on the node, Hubble-like: the kernel's events (conntrack, and the packets the policy
//! table logs as it drops them) are named from what the node was told ([`directory`],
//! [`enrich`]), kept in a bounded ring with a broadcast for followers ([`recorder`]), counted
//! ([`metrics`]), and served to the controller over the node's flow channel ([`channel`]).
//!
//! The directory is rebuilt whenever the reconciler applies a desired state that changed
//! ([`Names::update`]) and swapped in whole: the event path reads it without a lock.

pub mod channel;
pub mod directory;
pub mod enrich;
// The kernel's sources (conntrack and NFLOG listeners) come from their own branch; declared
// here at merge: `pub mod kernel;`
pub mod metrics;
pub mod recorder;

use std::sync::Arc;

use arc_swap::ArcSwap;
use trellis_core::flow::kernel::KernelEvent;
use trellis_core::gateway::GatewayPlan;
use trellis_core::policy::PolicyInputs;

use self::directory::{Directory, NodeIdentity};
use self::metrics::FlowMetrics;
use self::recorder::Recorder;

/// The node's directory, current: read by the event path, replaced by the reconciler.
#[derive(Debug)]
pub struct Names {
    identity: std::sync::Mutex<NodeIdentity>,
    current: ArcSwap<Directory>,
}

impl Names {
    pub fn new(identity: NodeIdentity) -> Self {
        let current = ArcSwap::from_pointee(Directory::empty(&identity));
        Self {
            identity: std::sync::Mutex::new(identity),
            current,
        }
    }

    /// The directory now.
    pub fn directory(&self) -> Arc<Directory> {
        self.current.load_full()
    }

    /// Learns the node's cluster from a desired-state file (which names it), when nothing
    /// named it before.
    pub fn learn_cluster(&self, cluster: &str) {
        let mut identity = self
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if identity.cluster.is_none() && !cluster.is_empty() {
            identity.cluster = Some(cluster.to_owned());
        }
    }

    /// Rebuilds the directory from a desired state applied, unless it is the one the current
    /// directory was built from (a resync). A new directory starts a new policy cache.
    pub fn update(&self, plan: &GatewayPlan, inputs: Option<&PolicyInputs>) {
        let current = self.current.load();
        let identity = self
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let cluster_unchanged =
            inputs.is_some() || current.cluster() == identity.cluster.as_deref();
        if cluster_unchanged && current.built_from(plan, inputs) {
            return;
        }
        let inputs = inputs.map(|i| Arc::new(i.clone()));
        self.current
            .store(Arc::new(Directory::build(&identity, plan, inputs)));
    }
}

/// Kernel events in, named flows recorded and counted.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub names: Arc<Names>,
    pub recorder: Arc<Recorder>,
    pub metrics: FlowMetrics,
}

impl Pipeline {
    pub fn new(names: Arc<Names>, recorder: Arc<Recorder>, metrics: FlowMetrics) -> Self {
        metrics.set_capacity(recorder.capacity());
        Self {
            names,
            recorder,
            metrics,
        }
    }

    /// Names `event` and records its flows.
    pub fn handle(&self, event: &KernelEvent) {
        let directory = self.names.current.load();
        for flow in enrich::enrich(event, &directory) {
            self.metrics.observe(&flow);
            if self.recorder.record(flow) {
                self.metrics.overwritten();
            }
        }
    }

    /// `count` events of `source` the kernel could not deliver (its socket buffer overran).
    pub fn lost(&self, source: &'static str, count: u64) {
        self.metrics.kernel_lost(source, count);
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use trellis_core::flow::kernel::{ConntrackEvent, ConntrackEventKind, Tuple};
    use trellis_core::flow::{FlowRequest, L4Protocol};

    use super::directory::tests::{identity, inputs, plan};
    use super::*;

    fn event(source: &str, destination: &str) -> KernelEvent {
        let tuple = |s: &str, d: &str| Tuple {
            source: s.parse().unwrap(),
            destination: d.parse().unwrap(),
            protocol: L4Protocol::Udp,
            source_port: 5000,
            destination_port: 53,
        };
        KernelEvent::Conntrack(ConntrackEvent {
            time: UNIX_EPOCH,
            kind: ConntrackEventKind::New,
            original: tuple(source, destination),
            reply: tuple(destination, source),
            counters: None,
        })
    }

    #[test]
    fn events_become_recorded_counted_flows_named_by_the_latest_state() {
        let metrics = crate::metrics::Metrics::new().unwrap();
        let names = Arc::new(Names::new(identity()));
        let pipeline = Pipeline::new(
            names.clone(),
            Arc::new(Recorder::new(2)),
            metrics.flows.clone(),
        );
        pipeline.handle(&event("10.1.1.5", "10.1.1.6"));
        assert!(pipeline.recorder.is_empty(), "nothing is known yet");
        names.update(&plan(), Some(&inputs()));
        let before = names.directory();
        names.update(&plan(), Some(&inputs()));
        assert!(
            Arc::ptr_eq(&before, &names.directory()),
            "a resync rebuilds nothing"
        );
        pipeline.handle(&event("10.1.1.5", "10.1.1.6"));
        pipeline.handle(&event("10.1.1.5", "10.2.1.9"));
        pipeline.lost("nflog", 2);
        let recorded = pipeline.recorder.query(&FlowRequest::default()).recorded;
        assert_eq!(recorded.len(), 2);
        assert_eq!(recorded[1].destination.display_name(), "c2/z/api");
        let text = metrics.render();
        for series in [
            r#"trellis_flows_total{direction="EGRESS",verdict="FORWARDED"} 2"#,
            r#"trellis_flows_total{direction="INGRESS",verdict="FORWARDED"} 1"#,
            "trellis_flows_buffer_overwritten_total 1",
            "trellis_flows_buffer_capacity 2",
            r#"trellis_flows_kernel_lost_total{source="nflog"} 2"#,
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
    }

    #[test]
    fn a_file_source_names_the_cluster() {
        let names = Names::new(NodeIdentity {
            cluster: None,
            node: Some("n1".into()),
            addresses: vec![],
        });
        names.update(&plan(), None);
        assert_eq!(names.directory().node_name(), "unknown/n1");
        names.learn_cluster("c1");
        names.update(&plan(), None);
        assert_eq!(names.directory().node_name(), "c1/n1");
    }
}
