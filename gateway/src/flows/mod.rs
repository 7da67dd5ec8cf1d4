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
pub mod kernel;
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

    /// Learns the node's name from its policy (which names it), when nothing named it before.
    pub fn learn_node(&self, node: &str) {
        let mut identity = self
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if identity.node.is_none() && !node.is_empty() {
            identity.node = Some(node.to_owned());
        }
    }

    /// Whether the directory was built from this desired state already (a resync re-applies
    /// the same one), for the identity known now.
    pub fn is_current(&self, plan: &GatewayPlan, inputs: Option<&PolicyInputs>) -> bool {
        let current = self.current.load();
        let identity = self
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let same_cluster = inputs.is_some() || current.cluster() == identity.cluster.as_deref();
        same_cluster
            && current.node() == identity.node.as_deref()
            && current.built_from(plan, inputs)
    }

    /// Rebuilds the directory from a desired state applied, unless it is current. A new
    /// directory starts a new policy cache.
    pub fn update(&self, plan: &GatewayPlan, inputs: Option<&PolicyInputs>) {
        if !self.is_current(plan, inputs) {
            self.replace(plan, inputs.map(|i| Arc::new(i.clone())));
        }
    }

    /// Builds the directory of `plan` and `inputs` and swaps it in.
    pub fn replace(&self, plan: &GatewayPlan, inputs: Option<Arc<PolicyInputs>>) {
        let identity = self
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        self.current
            .store(Arc::new(Directory::build(&identity, plan, inputs)));
    }
}

/// What a kernel source is given: where its events go, and where its losses are counted.
pub type EventSink = Box<dyn FnMut(KernelEvent) + Send>;
pub type LossSink = Box<dyn FnMut(&'static str, u64) + Send>;

/// Records what a kernel source delivers until it ends: `run` is the source's run loop
/// (`KernelSources::run`), handed the pipeline's event and loss sinks. `trellis_flows_enabled`
/// is 1 while it runs.
pub async fn record<E, F, Fut>(pipeline: Pipeline, run: F) -> Result<(), E>
where
    F: FnOnce(EventSink, LossSink) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    pipeline.metrics.set_enabled(true);
    let events = pipeline.clone();
    let losses = pipeline.clone();
    let result = run(
        Box::new(move |event| events.handle(&event)),
        Box::new(move |source, count| losses.lost(source, count)),
    )
    .await;
    pipeline.metrics.set_enabled(false);
    result
}

/// Opens the kernel's sources with `open` (`KernelSources::open`) and records what they
/// deliver in a task of its own (`run`: `KernelSources::run`); `false` when they could not
/// be opened. Never fatal: a failure to open or a source that ends is logged, and flows are
/// then off (`trellis_flows_enabled 0`).
pub fn start_recording<S, E, F, Fut>(
    pipeline: Pipeline,
    open: impl FnOnce() -> Result<S, E>,
    run: F,
) -> bool
where
    E: std::error::Error + Send + Sync + 'static,
    S: Send + 'static,
    F: FnOnce(S, EventSink, LossSink) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
{
    let sources = match open() {
        Ok(sources) => sources,
        Err(e) => {
            pipeline.metrics.set_enabled(false);
            tracing::warn!(
                "no flows: the kernel's sources do not open: {}",
                trellis_core::error_chain(&e)
            );
            return false;
        }
    };
    // On from here, not from the task's first poll: a reader of the metric right after the
    // sources opened sees them on.
    pipeline.metrics.set_enabled(true);
    tokio::spawn(async move {
        if let Err(e) = record(pipeline, move |events, losses| run(sources, events, losses)).await {
            tracing::warn!(
                "no more flows: the kernel's sources stopped: {}",
                trellis_core::error_chain(&e)
            );
        }
    });
    true
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

    #[tokio::test]
    async fn a_source_feeds_the_pipeline_and_flows_are_enabled_while_it_runs() {
        let metrics = crate::metrics::Metrics::new().unwrap();
        let names = Arc::new(Names::new(identity()));
        names.update(&plan(), Some(&inputs()));
        let pipeline = Pipeline::new(names, Arc::new(Recorder::new(10)), metrics.flows.clone());
        let seen_enabled = metrics.flows.clone();
        let result: Result<(), std::io::Error> =
            record(pipeline.clone(), |mut sink, mut lost| async move {
                assert!(seen_enabled.enabled());
                sink(event("10.1.1.5", "10.2.1.9"));
                lost("conntrack", 4);
                Err(std::io::Error::other("socket closed"))
            })
            .await;
        assert!(result.is_err(), "the source's end is the caller's to log");
        assert!(!metrics.flows.enabled());
        assert_eq!(pipeline.recorder.len(), 1);
        assert!(
            metrics
                .render()
                .contains(r#"trellis_flows_kernel_lost_total{source="conntrack"} 4"#)
        );
    }

    #[tokio::test]
    async fn sources_that_do_not_open_leave_flows_off_and_open_ones_record() {
        let metrics = crate::metrics::Metrics::new().unwrap();
        let names = Arc::new(Names::new(identity()));
        names.update(&plan(), Some(&inputs()));
        let pipeline = Pipeline::new(names, Arc::new(Recorder::new(10)), metrics.flows.clone());
        let refused = start_recording(
            pipeline.clone(),
            || Err::<(), _>(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
            |(), _, _| async { Ok(()) },
        );
        assert!(!refused && !metrics.flows.enabled());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let opened = start_recording(
            pipeline.clone(),
            || Ok::<_, std::io::Error>(event("10.1.1.5", "10.2.1.9")),
            |first, mut events, _| async move {
                events(first);
                let _ = stopped.await;
                Ok(())
            },
        );
        assert!(opened);
        crate::flows::tests::wait(|| pipeline.recorder.len() == 1).await;
        assert!(metrics.flows.enabled());
        drop(stop);
        crate::flows::tests::wait(|| !metrics.flows.enabled()).await;
    }

    pub(crate) async fn wait(condition: impl Fn() -> bool) {
        trellis_test_support::eventually_async(
            "the condition",
            std::time::Duration::from_secs(5),
            || async { condition().then_some(()) },
        )
        .await
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
