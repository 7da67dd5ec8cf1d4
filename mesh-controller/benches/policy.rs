//! The controller's side of a NetworkPolicy change, in one process (no network): for a cluster
//! of P pods (default 1,000 and 10,000) on 100 nodes, with 100 policies, the time from a new
//! source state to the update every node's stream carries:
//!
//! 1. one pod relabelled (new identity, one endpoint record);
//! 2. one policy changed;
//! 3. the static source re-reading its whole file after such an edit (parse + convert), which
//!    a file-driven cluster (the lab) pays on top of 1 or 2.
//!
//! Each is repeated N times (default 50); p50 and p99 are printed, and the size of the update
//! a node receives (records and JSON bytes). The hub's work (compose, identities, the
//! peers' delta, the shared policy inputs and their digest) is measured once per change, the
//! per-node delta (`GatewayFeed::next`) for every node.
//!
//! `cargo bench -p trellis-controller --bench policy [-- --pods 1000,10000 --changes N --nodes M]`

use std::time::{Duration, Instant};

use trellis_controller::agent::GatewayFeed;
use trellis_controller::hub::{Hub, HubConfig};
use trellis_controller::metrics::Metrics;
use trellis_controller::policy_source::PodInfo;
use trellis_controller::source::SourceState;
use trellis_core::agent::{GatewayUpdate, PolicyUpdate};
use trellis_core::cluster::NodeState;
use trellis_core::policy::{LabelSelector, Labels, NetworkPolicy, PolicyPeer, PolicyRule};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

fn pod(i: usize, nodes: usize) -> PodInfo {
    PodInfo {
        namespace: format!("ns-{}", i % 20),
        name: format!("pod-{i}"),
        labels: Labels::from([("app".to_owned(), format!("app-{}", i % 100))]),
        node: format!("node-{}", i % nodes),
        addresses: vec![std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into()],
        named_ports: vec![],
    }
}

fn policy(i: usize, port: u16) -> NetworkPolicy {
    let selector = |app: usize| LabelSelector {
        match_labels: Labels::from([("app".to_owned(), format!("app-{app}"))]),
        match_expressions: vec![],
    };
    NetworkPolicy {
        namespace: format!("ns-{}", i % 20),
        name: format!("policy-{i}"),
        pod_selector: selector(i % 100),
        ingress: Some(vec![PolicyRule {
            peers: vec![PolicyPeer::Pods {
                namespace_selector: Some(LabelSelector::default()),
                pod_selector: Some(selector((i + 1) % 100)),
            }],
            ports: vec![trellis_core::policy::PolicyPort {
                protocol: Default::default(),
                port: Some(trellis_core::policy::PortSpec::Number(port)),
                end_port: None,
            }],
        }]),
        egress: None,
    }
}

fn source(pods: usize, nodes: usize) -> SourceState {
    let mut s = SourceState {
        nodes: (0..nodes)
            .map(|n| {
                let name = format!("node-{n}");
                let node = NodeState {
                    name: name.clone(),
                    pod_cidrs: vec![format!("10.{}.{}.0/24", n / 256, n % 256).parse().unwrap()],
                    internal_ips: vec![],
                    gateway: None,
                };
                (name, node)
            })
            .collect(),
        ..Default::default()
    };
    s.policy.pods = (0..pods).map(|i| pod(i, nodes)).collect();
    s.policy.policies = (0..100)
        .map(|i| {
            let p = policy(i, 80);
            (p.key(), p)
        })
        .collect();
    s
}

/// The same cluster as the static source's YAML (Namespaces, Pods, NetworkPolicies).
fn yaml(s: &SourceState) -> String {
    let mut out = String::new();
    for ns in 0..20 {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}}}\n---\n"
        ));
    }
    for p in &s.policy.pods {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{app: {}}}}}\n\
             spec: {{nodeName: {}, containers: [{{name: c, ports: [{{containerPort: 80, name: http}}]}}]}}\n\
             status: {{podIP: {}}}\n---\n",
            p.name, p.namespace, p.labels["app"], p.node, p.addresses[0]
        ));
    }
    for p in s.policy.policies.values() {
        out.push_str(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {}, namespace: {}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: {}}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: x}}}}}}]\n    ports: [{{port: 80}}]\n---\n",
            p.name, p.namespace, p.pod_selector.match_labels["app"]
        ));
    }
    out
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

struct Sample {
    hub: Duration,
    feeds: Duration,
    records: usize,
    bytes: usize,
}

/// Applies `next` and returns the hub's time, all nodes' feed time and one node's update.
fn change(h: &Hub, feeds: &mut [GatewayFeed], next: SourceState) -> Sample {
    let started = Instant::now();
    h.set_source(next);
    let view = h.subscribe_view().borrow().clone().unwrap();
    let hub = started.elapsed();
    let started = Instant::now();
    let mut first = None;
    for feed in feeds.iter_mut() {
        let update = feed.next(&view);
        first.get_or_insert(update);
    }
    let feeds_took = started.elapsed();
    let update = first.flatten().expect("every change reaches the nodes");
    let records = match &update {
        GatewayUpdate::Delta {
            policy: Some(PolicyUpdate::Delta(d)),
            ..
        } => {
            d.policies.upsert.len()
                + d.policies.remove.len()
                + d.identities.upsert.len()
                + d.identities.remove.len()
                + d.endpoints.upsert.len()
                + d.endpoints.remove.len()
        }
        other => panic!("not a policy delta: {other:?}"),
    };
    Sample {
        hub,
        feeds: feeds_took,
        records,
        bytes: serde_json::to_vec(&update).unwrap().len(),
    }
}

fn report(what: &str, samples: &mut [Sample]) {
    let mut hub: Vec<Duration> = samples.iter().map(|s| s.hub).collect();
    let mut feeds: Vec<Duration> = samples.iter().map(|s| s.feeds).collect();
    let mut total: Vec<Duration> = samples.iter().map(|s| s.hub + s.feeds).collect();
    let records = samples.iter().map(|s| s.records).max().unwrap_or(0);
    let bytes = samples.iter().map(|s| s.bytes).max().unwrap_or(0);
    println!(
        "  {what}: hub p50 {} p99 {}; all nodes' deltas p50 {} p99 {}; total p50 {} p99 {}; \
         a node's update: {records} records, {bytes} bytes of JSON",
        ms(percentile(&mut hub, 0.5)),
        ms(percentile(&mut hub, 0.99)),
        ms(percentile(&mut feeds, 0.5)),
        ms(percentile(&mut feeds, 0.99)),
        ms(percentile(&mut total, 0.5)),
        ms(percentile(&mut total, 0.99)),
    );
}

fn main() {
    let changes: usize = arg("--changes", "50").parse().unwrap();
    let nodes: usize = arg("--nodes", "100").parse().unwrap();
    for pods in arg("--pods", "1000,10000").split(',') {
        let pods: usize = pods.parse().unwrap();
        let h = Hub::new(
            HubConfig {
                id: "c1".parse().unwrap(),
                name: "c1".into(),
                service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
                lease: Duration::from_secs(30),
                node_encryption: false,
                recent_deltas: 256,
                startup_grace: Duration::ZERO,
            },
            Metrics::new().unwrap(),
        );
        h.set_network_policy(true);
        let mut s = source(pods, nodes);
        let started = Instant::now();
        h.set_source(s.clone());
        let first = started.elapsed();
        let mut feeds: Vec<GatewayFeed> = (0..nodes)
            .map(|n| GatewayFeed::new(format!("node-{n}")))
            .collect();
        let view = h.subscribe_view().borrow().clone().unwrap();
        let started = Instant::now();
        for feed in &mut feeds {
            feed.next(&view).unwrap();
        }
        let snapshots = started.elapsed();
        println!(
            "{pods} pods, 100 policies, {nodes} nodes: first build {}, {nodes} snapshots {}",
            ms(first),
            ms(snapshots)
        );

        let mut relabels: Vec<Sample> = (0..changes)
            .map(|i| {
                s.policy.pods[i % pods]
                    .labels
                    .insert("version".into(), format!("v{i}"));
                change(&h, &mut feeds, s.clone())
            })
            .collect();
        report("one pod relabelled", &mut relabels);

        let mut policy_changes: Vec<Sample> = (0..changes)
            .map(|i| {
                let p = policy(i % 100, 1000 + i as u16);
                s.policy.policies.insert(p.key(), p);
                change(&h, &mut feeds, s.clone())
            })
            .collect();
        report("one policy changed", &mut policy_changes);

        let text = yaml(&s);
        let mut parses: Vec<Duration> = (0..changes.min(20))
            .map(|_| {
                let started = Instant::now();
                let objects = trellis_controller::objects::parse_objects(&text).unwrap();
                let state = trellis_controller::objects::source_state(&objects);
                assert_eq!(state.policy.pods.len(), pods);
                started.elapsed()
            })
            .collect();
        println!(
            "  static source re-reading its file ({} KiB): p50 {} p99 {}",
            text.len() / 1024,
            ms(percentile(&mut parses, 0.5)),
            ms(percentile(&mut parses, 0.99))
        );
    }
}
