//! Flow metrics (`trellis_flows_*`), of bounded cardinality: verdicts and directions are
//! fixed sets, denying policies are counted under their own names up to
//! [`MAX_POLICY_LABELS`] of them, then under `other`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use trellis_core::flow::{Flow, TrafficDirection, Verdict};

use crate::Error;

/// The most distinct `policy` label values of `trellis_flows_policy_drops_total`.
pub const MAX_POLICY_LABELS: usize = 100;

/// The `policy` label of drops past [`MAX_POLICY_LABELS`] distinct policies.
pub const OTHER_POLICY: &str = "other";

/// The `source` labels of `trellis_flows_kernel_lost_total`.
pub const KERNEL_SOURCES: [&str; 2] = ["conntrack", "nflog"];

#[derive(Clone)]
pub struct FlowMetrics {
    /// (FORWARDED, DROPPED) × (INGRESS, EGRESS), resolved once.
    by_verdict: [[IntCounter; 2]; 2],
    policy_drops: IntCounterVec,
    policy_handles: Arc<Mutex<HashMap<String, IntCounter>>>,
    overwritten: IntCounter,
    capacity: IntGauge,
    kernel_lost: IntCounterVec,
    enabled: IntGauge,
}

impl std::fmt::Debug for FlowMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlowMetrics")
    }
}

const VERDICTS: [Verdict; 2] = [Verdict::Forwarded, Verdict::Dropped];
const DIRECTIONS: [TrafficDirection; 2] = [TrafficDirection::Ingress, TrafficDirection::Egress];

fn verdict_index(verdict: Verdict) -> usize {
    match verdict {
        Verdict::Forwarded => 0,
        Verdict::Dropped => 1,
    }
}

fn direction_index(direction: TrafficDirection) -> usize {
    match direction {
        TrafficDirection::Ingress => 0,
        TrafficDirection::Egress => 1,
    }
}

impl FlowMetrics {
    pub(crate) fn new(registry: &Registry) -> Result<Self, Error> {
        let flows = IntCounterVec::new(
            Opts::new(
                "trellis_flows_total",
                "Flows recorded on the node (connections opened and closed, packets dropped by policy), by verdict and direction.",
            ),
            &["verdict", "direction"],
        )?;
        let policy_drops = IntCounterVec::new(
            Opts::new(
                "trellis_flows_policy_drops_total",
                "Dropped flows by the policy (namespace/name) that denied them; past 100 policies, under other.",
            ),
            &["policy"],
        )?;
        let overwritten = IntCounter::new(
            "trellis_flows_buffer_overwritten_total",
            "Flows pushed out of the node's flow ring by newer ones before any reader asked for them.",
        )?;
        let capacity = IntGauge::new(
            "trellis_flows_buffer_capacity",
            "How many flows the node's ring holds (--flow-buffer).",
        )?;
        let kernel_lost = IntCounterVec::new(
            Opts::new(
                "trellis_flows_kernel_lost_total",
                "Kernel events lost before the gateway read them (socket buffer overrun), by source. Drops beyond the policy table's log rate (1000/s per drop rule) are never logged, so not counted here; the policy drop counters count every drop.",
            ),
            &["source"],
        )?;
        let enabled = IntGauge::new(
            "trellis_flows_enabled",
            "1 while the node records flows from the kernel.",
        )?;
        for metric in [
            Box::new(flows.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(policy_drops.clone()),
            Box::new(overwritten.clone()),
            Box::new(capacity.clone()),
            Box::new(kernel_lost.clone()),
            Box::new(enabled.clone()),
        ] {
            registry.register(metric)?;
        }
        for source in KERNEL_SOURCES {
            kernel_lost.with_label_values(&[source]).inc_by(0);
        }
        let by_verdict = VERDICTS.map(|verdict| {
            DIRECTIONS
                .map(|direction| flows.with_label_values(&[verdict.as_str(), direction.as_str()]))
        });
        Ok(Self {
            by_verdict,
            policy_drops,
            policy_handles: Arc::new(Mutex::new(HashMap::new())),
            overwritten,
            capacity,
            kernel_lost,
            enabled,
        })
    }

    /// Counts a recorded flow.
    pub fn observe(&self, flow: &Flow) {
        self.by_verdict[verdict_index(flow.verdict)][direction_index(flow.traffic_direction)].inc();
        if flow.verdict == Verdict::Dropped {
            for policy in &flow.denied_by {
                self.policy_drop(&policy.to_string());
            }
        }
    }

    fn policy_drop(&self, policy: &str) {
        let mut handles = self
            .policy_handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(counter) = handles.get(policy) {
            counter.inc();
            return;
        }
        let label = if handles.len() < MAX_POLICY_LABELS {
            policy
        } else {
            OTHER_POLICY
        };
        let counter = self.policy_drops.with_label_values(&[label]);
        counter.inc();
        if label == policy {
            handles.insert(policy.to_owned(), counter);
        }
    }

    pub fn overwritten(&self) {
        self.overwritten.inc();
    }

    pub fn set_capacity(&self, capacity: usize) {
        self.capacity
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
    }

    /// `count` events of `source` the kernel could not deliver.
    pub fn kernel_lost(&self, source: &str, count: u64) {
        self.kernel_lost.with_label_values(&[source]).inc_by(count);
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.set(i64::from(on));
    }

    pub fn enabled(&self) -> bool {
        self.enabled.get() == 1
    }
}

#[cfg(test)]
mod tests {
    use trellis_core::flow::PolicyRef;

    use super::*;
    use crate::flows::recorder::tests::flow;
    use crate::metrics::Metrics;

    #[test]
    fn flows_are_counted_by_verdict_direction_and_denying_policy_with_bounded_labels() {
        let metrics = Metrics::new().unwrap();
        let m = &metrics.flows;
        m.observe(&flow(0, 1, Verdict::Forwarded));
        for i in 0..(MAX_POLICY_LABELS + 5) {
            let mut dropped = flow(0, 1, Verdict::Dropped);
            dropped.traffic_direction = TrafficDirection::Ingress;
            dropped.denied_by = vec![PolicyRef {
                cluster: "c1".into(),
                namespace: "x".into(),
                name: format!("p{i}"),
                rule: None,
            }];
            m.observe(&dropped);
        }
        let mut again = flow(0, 1, Verdict::Dropped);
        again.denied_by = vec![PolicyRef {
            cluster: "c1".into(),
            namespace: "x".into(),
            name: "p0".into(),
            rule: None,
        }];
        m.observe(&again);
        m.overwritten();
        m.set_capacity(4096);
        m.kernel_lost("conntrack", 3);
        m.set_enabled(true);
        let text = metrics.render();
        for series in [
            r#"trellis_flows_total{direction="EGRESS",verdict="FORWARDED"} 1"#,
            r#"trellis_flows_total{direction="INGRESS",verdict="DROPPED"} 105"#,
            r#"trellis_flows_total{direction="EGRESS",verdict="DROPPED"} 1"#,
            r#"trellis_flows_policy_drops_total{policy="x/p0"} 2"#,
            r#"trellis_flows_policy_drops_total{policy="x/p99"} 1"#,
            r#"trellis_flows_policy_drops_total{policy="other"} 5"#,
            "trellis_flows_buffer_overwritten_total 1",
            "trellis_flows_buffer_capacity 4096",
            r#"trellis_flows_kernel_lost_total{source="conntrack"} 3"#,
            r#"trellis_flows_kernel_lost_total{source="nflog"} 0"#,
            "trellis_flows_enabled 1",
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
        assert!(!text.contains("x/p100"), "past the limit: other");
        assert!(m.enabled());
    }
}
