//! Generated meshes (several clusters, namespaces and pods with random labels on random
//! nodes, random policies using every feature) checked three ways: every node's compiled
//! ruleset, run through the interpreter on the connection's path, agrees with the reference
//! evaluator on a sample of connections; the incremental compiler, fed the mesh's changes one
//! after another, always equals a compilation from scratch; and the names and sets obey
//! nftables' rules (disjoint interval sets, valid names, every reference resolves).
//!
//! `TRELLIS_POLICY_CASES` sets the number of meshes (default 100).

mod policy_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use trellis_core::cluster::Protocol;
use trellis_core::policy::evaluate::Connection;
use trellis_core::policy::ruleset::{Match, Ruleset, Verdict};
use trellis_core::policy::{
    CLUSTER_LABEL, Compiler, LabelRequirement, LabelSelector, NamedPort, NetworkPolicy,
    PolicyInputs, PolicyPeer, PolicyPort, PolicyRule, PortSpec, SelectorOperator, compile,
};

use policy_support::{MeshBuilder, compile_all, compiled_allows, evaluator_allows};

const CLUSTERS: [&str; 3] = ["c1", "c2", "c3"];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const POD_KEYS: [(&str, &[&str]); 3] = [
    ("pod", &["a", "b", "c"]),
    ("tier", &["web", "db"]),
    ("app", &["p", "q"]),
];
const NS_KEYS: [(&str, &[&str]); 2] = [("team", &["red", "blue"]), ("env", &["prod", "dev"])];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];
const EXTERNAL: [&str; 3] = ["192.168.7.7", "10.250.0.9", "fd99::9"];

fn cases() -> u64 {
    std::env::var("TRELLIS_POLICY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn one(rng: &mut StdRng, items: &[&'static str]) -> &'static str {
    items[rng.random_range(0..items.len())]
}

fn random_protocol(rng: &mut StdRng) -> Protocol {
    *pick(
        rng,
        &[Protocol::Tcp, Protocol::Tcp, Protocol::Udp, Protocol::Sctp],
    )
}

fn random_labels(rng: &mut StdRng, keys: &[(&str, &[&str])]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, values) in keys {
        if rng.random_bool(0.6) {
            out.insert(k.to_string(), pick(rng, values).to_string());
        }
    }
    out
}

fn random_selector(
    rng: &mut StdRng,
    keys: &[(&str, &[&str])],
    cluster_label: bool,
) -> LabelSelector {
    let mut selector = LabelSelector::default();
    if rng.random_bool(0.3) {
        return selector; // {} selects everything
    }
    for _ in 0..rng.random_range(0..=1) {
        let (k, values) = pick(rng, keys);
        selector
            .match_labels
            .insert(k.to_string(), pick(rng, values).to_string());
    }
    for _ in 0..rng.random_range(0..=2) {
        let (k, values) = pick(rng, keys);
        let operator = *pick(
            rng,
            &[
                SelectorOperator::In,
                SelectorOperator::NotIn,
                SelectorOperator::Exists,
                SelectorOperator::DoesNotExist,
            ],
        );
        let values = match operator {
            SelectorOperator::In | SelectorOperator::NotIn => {
                let mut chosen = BTreeSet::from([pick(rng, values).to_string()]);
                for v in values.iter() {
                    if rng.random_bool(0.5) {
                        chosen.insert(v.to_string());
                    }
                }
                chosen.into_iter().collect()
            }
            _ => Vec::new(),
        };
        selector.match_expressions.push(LabelRequirement {
            key: k.to_string(),
            operator,
            values,
        });
    }
    if cluster_label && rng.random_bool(0.3) {
        let (operator, values) = match rng.random_range(0..4) {
            0 => (SelectorOperator::Exists, vec![]),
            1 => (SelectorOperator::NotIn, vec!["c1".to_string()]),
            2 => (
                SelectorOperator::In,
                vec!["c2".to_string(), "c3".to_string()],
            ),
            _ => {
                selector
                    .match_labels
                    .insert(CLUSTER_LABEL.into(), pick(rng, &CLUSTERS).to_string());
                return selector;
            }
        };
        selector.match_expressions.push(LabelRequirement {
            key: CLUSTER_LABEL.into(),
            operator,
            values,
        });
    }
    selector
}

fn random_block(rng: &mut StdRng) -> PolicyPeer {
    let c = rng.random_range(1..=3u8);
    let (cidr, except): (String, Vec<String>) = match rng.random_range(0..5) {
        0 => ("0.0.0.0/0".into(), vec![format!("10.{c}.0.0/16")]),
        1 => (
            format!("10.{c}.0.0/16"),
            vec![
                format!("10.{c}.{}.0/24", rng.random_range(0..4)),
                format!(
                    "10.{c}.{}.{}/31",
                    rng.random_range(0..4),
                    rng.random_range(0..8) * 2
                ),
            ],
        ),
        2 => (format!("10.{c}.{}.0/29", rng.random_range(0..4)), vec![]),
        3 => ("fd00::/16".into(), vec![format!("fd00::{c}:0/112")]),
        _ => ("::/0".into(), vec![]),
    };
    PolicyPeer::IpBlock {
        cidr: cidr.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

fn random_peer(rng: &mut StdRng) -> PolicyPeer {
    match rng.random_range(0..4) {
        0 => random_block(rng),
        1 => PolicyPeer::Pods {
            namespace_selector: None,
            pod_selector: Some(random_selector(rng, &POD_KEYS, true)),
        },
        2 => PolicyPeer::Pods {
            namespace_selector: Some(random_selector(rng, &NS_KEYS, true)),
            pod_selector: None,
        },
        _ => PolicyPeer::Pods {
            namespace_selector: Some(random_selector(rng, &NS_KEYS, true)),
            pod_selector: Some(random_selector(rng, &POD_KEYS, true)),
        },
    }
}

fn random_port(rng: &mut StdRng) -> PolicyPort {
    let protocol = random_protocol(rng);
    let (port, end_port) = match rng.random_range(0..5) {
        0 => (None, None),
        1 => (
            Some(PortSpec::Number(*pick(rng, &[53, 80, 81, 443, 9000]))),
            None,
        ),
        2 => {
            let first = *pick(rng, &[50, 80, 81, 8000]);
            let last = *pick(rng, &[53, 80, 85, 8080, 70]);
            (Some(PortSpec::Number(first)), Some(last))
        }
        _ => (
            Some(PortSpec::Name(pick(rng, &PORT_NAMES).to_string())),
            None,
        ),
    };
    PolicyPort {
        protocol,
        port,
        end_port,
    }
}

fn random_rules(rng: &mut StdRng) -> Option<Vec<PolicyRule>> {
    if rng.random_bool(0.35) {
        return None;
    }
    Some(
        (0..rng.random_range(0..=3))
            .map(|_| PolicyRule {
                peers: (0..rng.random_range(0..=2))
                    .map(|_| random_peer(rng))
                    .collect(),
                ports: (0..rng.random_range(0..=3))
                    .map(|_| random_port(rng))
                    .collect(),
            })
            .collect(),
    )
}

fn random_policy(rng: &mut StdRng, index: usize) -> NetworkPolicy {
    NetworkPolicy {
        namespace: pick(rng, &NAMESPACES).to_string(),
        name: format!("p{index}"),
        pod_selector: {
            let cluster_label = rng.random_bool(0.1);
            random_selector(rng, &POD_KEYS, cluster_label)
        },
        ingress: random_rules(rng),
        egress: random_rules(rng),
    }
}

fn random_named_ports(rng: &mut StdRng) -> Vec<NamedPort> {
    let mut ports = Vec::new();
    for name in PORT_NAMES {
        if rng.random_bool(0.5) {
            ports.push(NamedPort {
                name: name.into(),
                protocol: random_protocol(rng),
                port: *pick(rng, &[53, 80, 81, 8080, 9000]),
            });
        }
    }
    ports
}

fn random_mesh(rng: &mut StdRng) -> MeshBuilder {
    let mut mesh = MeshBuilder::new(&CLUSTERS);
    for (c, cluster) in CLUSTERS.iter().enumerate() {
        for ns in NAMESPACES {
            let extra = random_labels(rng, &NS_KEYS);
            let extra: Vec<(&str, &str)> = extra
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            mesh.namespace(cluster, ns, &extra);
        }
        for k in 0..rng.random_range(3..=9) {
            let v4 = format!("10.{}.{}.{}", c + 1, k / 4, (k % 4) * 2 + 1);
            let v6 = format!("fd00::{}:{}", c + 1, k + 1);
            let addresses: Vec<&str> = if rng.random_bool(0.3) {
                vec![&v4, &v6]
            } else {
                vec![&v4]
            };
            mesh.pod(
                cluster,
                one(rng, &NAMESPACES),
                &format!("pod{k}"),
                random_labels(rng, &POD_KEYS),
                one(rng, &NODES),
                &addresses,
                random_named_ports(rng),
            );
        }
        for i in 0..rng.random_range(0..=5) {
            mesh.policy(cluster, random_policy(rng, i));
        }
    }
    mesh
}

/// Connections to a sample of services between every pair of addresses (pods and outside) of a family.
fn connections(mesh: &[PolicyInputs]) -> Vec<Connection> {
    let mut addresses: Vec<IpAddr> = mesh[0]
        .endpoints
        .values()
        .flat_map(|e| e.addresses.iter().copied())
        .collect();
    addresses.extend(EXTERNAL.iter().map(|a| a.parse::<IpAddr>().unwrap()));
    let services: [(Option<Protocol>, u16); 9] = [
        (Some(Protocol::Tcp), 80),
        (Some(Protocol::Tcp), 81),
        (Some(Protocol::Tcp), 8080),
        (Some(Protocol::Udp), 53),
        (Some(Protocol::Udp), 80),
        (Some(Protocol::Sctp), 9000),
        (Some(Protocol::Tcp), 443),
        (Some(Protocol::Udp), 8001),
        (None, 0),
    ];
    let mut out = Vec::new();
    for &source in &addresses {
        for &destination in &addresses {
            if source.is_ipv4() != destination.is_ipv4() {
                continue;
            }
            for &(protocol, port) in &services {
                out.push(Connection {
                    source,
                    destination,
                    protocol,
                    port,
                });
            }
        }
    }
    out
}

/// What nftables and the renderer need of a ruleset: valid names, every chain and set a rule
/// or map names exists, interval sets without overlapping elements.
fn assert_well_formed(ruleset: &Ruleset) {
    let valid = |name: &str| {
        name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    for name in ruleset
        .chains
        .keys()
        .chain(ruleset.address_sets.keys())
        .chain(ruleset.service_sets.keys())
    {
        assert!(valid(name), "{name}");
    }
    for chain in ruleset.ingress.values().chain(ruleset.egress.values()) {
        assert!(ruleset.chains.contains_key(chain), "{chain}");
    }
    for rule in ruleset.chains.values().flatten() {
        if let Verdict::Jump { chain } = &rule.verdict {
            assert!(ruleset.chains.contains_key(chain), "{chain}");
        }
        for m in &rule.matches {
            match m {
                Match::SourceIn { set } | Match::DestinationIn { set } => {
                    assert!(ruleset.address_sets.contains_key(set), "{set}")
                }
                Match::DestinationServiceIn { set } => {
                    assert!(ruleset.service_sets.contains_key(set), "{set}")
                }
                Match::Protocol { .. } | Match::DestinationPorts { .. } => {}
            }
        }
    }
    for set in ruleset.address_sets.values() {
        let elements: Vec<_> = set.elements.iter().collect();
        for (i, a) in elements.iter().enumerate() {
            assert_eq!(
                trellis_core::policy::ruleset::Family::of(&a.addr()),
                set.family
            );
            for b in &elements[i + 1..] {
                assert!(
                    !a.contains(*b) && !b.contains(*a),
                    "{a} and {b} overlap in one set"
                );
            }
        }
    }
}

#[test]
fn compiled_rulesets_decide_as_the_reference_evaluator() {
    let mut checked = 0usize;
    let mut allowed = 0usize;
    for seed in 0..cases() {
        let mut rng = StdRng::seed_from_u64(seed);
        let mesh = random_mesh(&mut rng).inputs();
        let rulesets = compile_all(&mesh);
        for ruleset in rulesets.values() {
            assert_well_formed(ruleset);
        }
        for connection in connections(&mesh) {
            let expected = evaluator_allows(&mesh, &connection);
            let got = compiled_allows(&mesh, &rulesets, &connection);
            assert_eq!(
                got,
                expected,
                "seed {seed}: {connection:?}\n{:#?}",
                trellis_core::policy::evaluate::Mesh::new(&mesh).decide(&connection)
            );
            checked += 1;
            allowed += usize::from(expected);
        }
    }
    // The generator must produce both outcomes in earnest, or the agreement means little.
    assert!(
        allowed > checked / 10 && allowed < checked * 9 / 10,
        "{allowed} of {checked} allowed"
    );
}

/// One random change to the mesh: relabel a pod, a namespace or an identity, move, add or
/// remove a pod, add one with an address in use, add, change or remove a policy.
fn mutate(mesh: &mut MeshBuilder, rng: &mut StdRng, step: usize) {
    let cluster = *pick(rng, &CLUSTERS);
    let pods: Vec<_> = mesh
        .endpoints
        .values()
        .filter(|e| e.cluster.as_str() == cluster)
        .cloned()
        .collect();
    match rng.random_range(0..9) {
        8 if !pods.is_empty() => {
            // A pod given an address another pod still holds (a replacement seen before its
            // predecessor's deletion), on one of the nodes.
            let twin = pick(rng, &pods);
            let address = twin.addresses[0].to_string();
            mesh.pod(
                cluster,
                one(rng, &NAMESPACES),
                &format!("twin{step}"),
                random_labels(rng, &POD_KEYS),
                one(rng, &NODES),
                &[&address],
                random_named_ports(rng),
            );
        }
        7 if !mesh.identities.is_empty() => {
            // An identity's labels changed in place (same key): its pods move together.
            let keys: Vec<_> = mesh.identities.keys().cloned().collect();
            let key = pick(rng, &keys).clone();
            let identity = mesh.identities.get_mut(&key).unwrap();
            identity.labels.pod_labels = random_labels(rng, &POD_KEYS);
        }
        0 if !pods.is_empty() => {
            let pod = pick(rng, &pods);
            mesh.relabel_pod(
                cluster,
                &pod.namespace,
                &pod.name,
                random_labels(rng, &POD_KEYS),
            );
        }
        1 => {
            let extra = random_labels(rng, &NS_KEYS);
            let extra: Vec<(&str, &str)> = extra
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            mesh.relabel_namespace(cluster, one(rng, &NAMESPACES), &extra);
        }
        2 if !pods.is_empty() => {
            let mut pod = pick(rng, &pods).clone();
            pod.node = pick(rng, &NODES).to_string();
            pod.named_ports = random_named_ports(rng);
            mesh.endpoints
                .insert(trellis_core::keyed::Keyed::key(&pod), pod);
        }
        3 if !pods.is_empty() => {
            let pod = pick(rng, &pods);
            mesh.endpoints.remove(&trellis_core::keyed::Keyed::key(pod));
        }
        4 => {
            let c = CLUSTERS.iter().position(|c| *c == cluster).unwrap() + 1;
            let address = format!("10.{c}.9.{}", step % 250 + 1);
            mesh.pod(
                cluster,
                one(rng, &NAMESPACES),
                &format!("new{step}"),
                random_labels(rng, &POD_KEYS),
                one(rng, &NODES),
                &[&address],
                random_named_ports(rng),
            );
        }
        5 => {
            let policies = mesh
                .policies
                .entry(policy_support::cluster(cluster))
                .or_default();
            if !policies.is_empty() {
                let i = rng.random_range(0..policies.len());
                policies.remove(i);
            }
        }
        _ => {
            let index = rng.random_range(0..8);
            mesh.policy(cluster, random_policy(rng, index));
        }
    }
}

#[test]
fn the_incremental_compiler_always_equals_a_compilation_from_scratch() {
    for seed in 0..cases() {
        let mut rng = StdRng::seed_from_u64(1_000 + seed);
        let mut mesh = random_mesh(&mut rng);
        let mut compilers: BTreeMap<(String, String), Compiler> = BTreeMap::new();
        for cluster in CLUSTERS {
            for node in NODES {
                compilers.insert(
                    (cluster.into(), node.into()),
                    Compiler::new(policy_support::cluster(cluster), node),
                );
            }
        }
        for step in 0..25 {
            let inputs = mesh.inputs();
            for ((cluster, node), compiler) in &mut compilers {
                let cluster_inputs = inputs
                    .iter()
                    .find(|i| i.cluster.as_str() == cluster)
                    .unwrap();
                let got = compiler.update(cluster_inputs).clone();
                let expected = compile(cluster_inputs, node);
                assert_eq!(got, expected, "seed {seed} step {step} {cluster}/{node}");
                assert_eq!(compiler.inputs(), cluster_inputs);
                if step == 0 {
                    // The same from nothing, pod after pod, through the delta path.
                    let mut by_deltas = Compiler::new(cluster_inputs.cluster.clone(), node);
                    let from_nothing = PolicyInputs::new(cluster_inputs.cluster.clone())
                        .delta_to(cluster_inputs)
                        .unwrap();
                    assert_eq!(by_deltas.apply(&from_nothing), &expected, "seed {seed}");
                }
            }
            mutate(&mut mesh, &mut rng, step);
        }
    }
}
