//! The policy compiler's speed: a node's full compilation at 100, 1,000 and 10,000 pods (100
//! and 1,000 policies), a policy change applied by the incremental compiler, and one pod's
//! label change at 100 and at 10,000 pods (the cost must not grow with the mesh).
//!
//! `cargo bench -p trellis-core --bench policy` prints the figures.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use trellis_core::cluster::{ClusterId, Protocol};
use trellis_core::keyed::Keyed;
use trellis_core::policy::{
    Compiler, Identity, IdentityKey, IdentityLabels, LabelSelector, Labels, NamedPort,
    NetworkPolicy, PolicyDelta, PolicyEndpoint, PolicyInputs, PolicyPeer, PolicyPort, PolicyRule,
    PortSpec, compile,
};

const NAMESPACES: usize = 20;
const PODS_PER_NODE: usize = 100;
const APPS: usize = 50;
const NODE: &str = "n0";
const TIERS: [&str; 3] = ["web", "db", "cache"];

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn selector(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: vec![],
    }
}

/// A cluster of `pods` pods (100 per node, over 20 namespaces and 50 apps) and `policies`
/// policies, each selecting one app of one namespace, with ingress from a team's web pods on
/// numbered ports and a range, and egress to an ipBlock and to named ports.
struct Scenario {
    inputs: PolicyInputs,
    identities: BTreeMap<IdentityLabels, u32>,
}

impl Scenario {
    fn new(pods: usize, policies: usize) -> Self {
        let cluster: ClusterId = "c1".parse().unwrap();
        let mut scenario = Scenario {
            inputs: PolicyInputs::new(cluster),
            identities: BTreeMap::new(),
        };
        for k in 0..pods {
            let endpoint = scenario.pod(k, k % APPS, k % 3, format!("n{}", k / PODS_PER_NODE));
            scenario.inputs.endpoints.insert(endpoint.key(), endpoint);
        }
        for i in 0..policies {
            let namespace = format!("ns{}", i % NAMESPACES);
            let policy = NetworkPolicy {
                namespace: namespace.clone(),
                name: format!("policy{i}"),
                pod_selector: selector(&[("app", format!("app{}", i % APPS))]),
                ingress: Some(vec![PolicyRule {
                    peers: vec![PolicyPeer::Pods {
                        namespace_selector: Some(selector(&[("team", format!("t{}", i % 5))])),
                        pod_selector: Some(selector(&[("tier", "web".into())])),
                    }],
                    ports: vec![
                        PolicyPort {
                            protocol: Protocol::Tcp,
                            port: Some(PortSpec::Number(80)),
                            end_port: None,
                        },
                        PolicyPort {
                            protocol: Protocol::Tcp,
                            port: Some(PortSpec::Number(8000)),
                            end_port: Some(8100),
                        },
                    ],
                }]),
                egress: Some(vec![
                    PolicyRule {
                        peers: vec![PolicyPeer::IpBlock {
                            cidr: "10.0.0.0/8".parse().unwrap(),
                            except: vec![format!("10.{}.0.0/16", i % 200).parse().unwrap()],
                        }],
                        ports: vec![],
                    },
                    PolicyRule {
                        peers: vec![PolicyPeer::Pods {
                            namespace_selector: Some(LabelSelector::default()),
                            pod_selector: Some(selector(&[("tier", "db".into())])),
                        }],
                        ports: vec![PolicyPort {
                            protocol: Protocol::Tcp,
                            port: Some(PortSpec::Name("http".into())),
                            end_port: None,
                        }],
                    },
                ]),
            };
            scenario.inputs.policies.insert(policy.key(), policy);
        }
        scenario
    }

    /// Pod `k` with labels `app` and `tier` on `node`: its identity is created as needed.
    fn pod(&mut self, k: usize, app: usize, tier: usize, node: String) -> PolicyEndpoint {
        let namespace = format!("ns{}", k % NAMESPACES);
        let identity_labels = IdentityLabels {
            namespace: namespace.clone(),
            pod_labels: labels(&[
                ("app", format!("app{app}")),
                ("tier", TIERS[tier].to_string()),
            ]),
            namespace_labels: labels(&[
                ("team", format!("t{}", (k % NAMESPACES) % 5)),
                ("kubernetes.io/metadata.name", namespace.clone()),
            ]),
        };
        let next = self.identities.len() as u32 + 1;
        let number = *self
            .identities
            .entry(identity_labels.clone())
            .or_insert(next);
        let key = IdentityKey {
            cluster: self.inputs.cluster.clone(),
            number,
        };
        self.inputs.identities.insert(
            key.clone(),
            Identity {
                key,
                labels: identity_labels,
            },
        );
        PolicyEndpoint {
            cluster: self.inputs.cluster.clone(),
            namespace,
            name: format!("pod{k}"),
            addresses: vec![
                format!("10.{}.{}.{}", 1 + k / 65_536, (k / 256) % 256, k % 256)
                    .parse()
                    .unwrap(),
            ],
            node,
            identity: number,
            named_ports: vec![NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080 + (k % 3) as u16,
            }],
        }
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn full_compile(pods: usize, policies: usize) {
    let scenario = Scenario::new(pods, policies);
    let runs = if pods * policies >= 5_000_000 { 3 } else { 10 };
    let mut samples = Vec::new();
    let mut ruleset = None;
    for _ in 0..runs {
        let start = Instant::now();
        ruleset = Some(black_box(compile(&scenario.inputs, NODE)));
        samples.push(start.elapsed());
    }
    let ruleset = ruleset.expect("ran");
    let elements: usize = ruleset
        .address_sets
        .values()
        .map(|s| s.elements.len())
        .sum::<usize>()
        + ruleset
            .service_sets
            .values()
            .map(|s| s.elements.len())
            .sum::<usize>();
    // The incremental compiler starting from nothing (an agent's restart).
    let start = Instant::now();
    let mut compiler = Compiler::new(scenario.inputs.cluster.clone(), NODE);
    compiler.update(&scenario.inputs);
    let from_empty = start.elapsed();
    assert_eq!(compiler.ruleset(), &ruleset);
    println!(
        "full compile  {pods:>6} pods {policies:>5} policies: median {:>11}, incremental from empty {:>11}  ({} chains, {} rules, {} set elements)",
        ms(percentile(&mut samples, 0.5)),
        ms(from_empty),
        ruleset.chains.len(),
        ruleset.rule_count(),
        elements,
    );
}

/// One policy's ports changed, applied by the incremental compiler of one node.
fn policy_change(pods: usize, policies: usize) {
    let scenario = Scenario::new(pods, policies);
    let mut compiler = Compiler::new(scenario.inputs.cluster.clone(), NODE);
    compiler.update(&scenario.inputs);
    let mut samples = Vec::new();
    for round in 0..200 {
        let mut policy = scenario
            .inputs
            .policies
            .values()
            .nth(round % policies)
            .expect("policies")
            .clone();
        if let Some(rules) = policy.ingress.as_mut() {
            rules[0].ports[0].port = Some(PortSpec::Number(81 + (round % 2) as u16));
        }
        let mut delta = PolicyDelta::default();
        delta.policies.upsert.push(policy);
        let start = Instant::now();
        black_box(compiler.apply(&delta));
        samples.push(start.elapsed());
    }
    println!(
        "policy change {pods:>6} pods {policies:>5} policies: p50 {:>11}  p99 {:>11}",
        ms(percentile(&mut samples, 0.5)),
        ms(percentile(&mut samples, 0.99)),
    );
}

#[derive(Debug, Clone, Copy)]
enum PodChange {
    /// A pod on another node changes tier: it moves between peer sets.
    ElsewhereTier,
    /// A pod of this node changes tier: peer sets change, the same policies select it.
    HereTier,
    /// A pod of this node changes app: policies stop and start selecting it, so the node
    /// stops and starts enforcing them (their sets come and go whole).
    HereApp,
}

/// One pod's label flipped back and forth (a new identity each way, as the controller would
/// give it); returns the median.
fn pod_change(pods: usize, policies: usize, change: PodChange) -> Duration {
    let mut scenario = Scenario::new(pods, policies);
    // Pod 3 runs on n0; one more pod runs on a node of its own.
    let (k, node) = match change {
        PodChange::ElsewhereTier => (pods, "elsewhere".to_string()),
        PodChange::HereTier | PodChange::HereApp => (3, NODE.to_string()),
    };
    let endpoint = scenario.pod(k, k % APPS, k % 3, node.clone());
    scenario.inputs.endpoints.insert(endpoint.key(), endpoint);
    let mut compiler = Compiler::new(scenario.inputs.cluster.clone(), NODE);
    compiler.update(&scenario.inputs);
    let mut samples = Vec::new();
    for round in 0..400 {
        let flip = round % 2 == 0;
        let (app, tier) = match change {
            PodChange::HereApp if flip => ((k + 1) % APPS, k % 3),
            PodChange::ElsewhereTier | PodChange::HereTier if flip => (k % APPS, (k + 1) % 3),
            _ => (k % APPS, k % 3),
        };
        let endpoint = scenario.pod(k, app, tier, node.clone());
        let mut delta = PolicyDelta::default();
        if round < 2 {
            // The first time each way, the identity is new to the compiler.
            delta
                .identities
                .upsert
                .push(scenario.inputs.identities[&endpoint.identity_key()].clone());
        }
        delta.endpoints.upsert.push(endpoint);
        let start = Instant::now();
        black_box(compiler.apply(&delta));
        samples.push(start.elapsed());
    }
    let median = percentile(&mut samples, 0.5);
    println!(
        "pod change    {pods:>6} pods {policies:>5} policies ({change:?}): p50 {:>10}  p99 {:>10}",
        us(median),
        us(percentile(&mut samples, 0.99)),
    );
    median
}

fn main() {
    // `TRELLIS_BENCH_ONLY=full|policy|pod` runs one part.
    let only = std::env::var("TRELLIS_BENCH_ONLY").unwrap_or_default();
    let runs = |part: &str| only.is_empty() || only == part;
    if runs("full") {
        for policies in [100, 1_000] {
            for pods in [100, 1_000, 10_000] {
                full_compile(pods, policies);
            }
        }
    }
    if runs("policy") {
        for policies in [100, 1_000] {
            policy_change(1_000, policies);
        }
    }
    if !runs("pod") {
        return;
    }
    for change in [
        PodChange::ElsewhereTier,
        PodChange::HereTier,
        PodChange::HereApp,
    ] {
        let small = pod_change(100, 1_000, change);
        let large = pod_change(10_000, 1_000, change);
        println!(
            "pod change ratio 10,000 / 100 pods ({change:?}): {:.2}",
            large.as_secs_f64() / small.as_secs_f64()
        );
    }
}
