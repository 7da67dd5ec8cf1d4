//! The Kubernetes e2e NetworkPolicy model (namespaces x, y, z labelled `ns=<name>`; pods a, b,
//! c labelled `pod=<name>`, serving 80 and 81 over TCP and UDP under the names
//! `serve-80-tcp`, …), one semantic point per test, with the reachability tables written by
//! hand from the semantics. Each table must come out of both the reference evaluator and the
//! compiled rulesets (every node's, through the interpreter).
//!
//! Tables: one row per client, one column per server, in the order x/a x/b x/c y/a … z/c;
//! `.` connects, `X` is refused, `-` is a pod to itself (never through its interface).

mod policy_support;

use std::collections::BTreeSet;
use std::net::IpAddr;

use trellis_core::cluster::Protocol;
use trellis_core::policy::evaluate::{Connection, DirectionVerdict, Mesh};
use trellis_core::policy::interpret::{self, Outcome};
use trellis_core::policy::{
    CLUSTER_LABEL, Compiler, LabelRequirement, LabelSelector, NamedPort, NetworkPolicy,
    PolicyInputs, PolicyKey, PolicyPeer, PolicyPort, PolicyRule, PortSpec, SelectorOperator,
    compile,
};

use policy_support::{MeshBuilder, compile_all, compiled_allows, evaluator_allows, labels};

const PODS: [(&str, &str); 9] = [
    ("x", "a"),
    ("x", "b"),
    ("x", "c"),
    ("y", "a"),
    ("y", "b"),
    ("y", "c"),
    ("z", "a"),
    ("z", "b"),
    ("z", "c"),
];

const TCP: Option<Protocol> = Some(Protocol::Tcp);
const UDP: Option<Protocol> = Some(Protocol::Udp);

fn address(cluster: usize, namespace: &str, pod: &str) -> String {
    let ns = ["x", "y", "z"]
        .iter()
        .position(|n| *n == namespace)
        .unwrap();
    let p = ["a", "b", "c"].iter().position(|n| *n == pod).unwrap();
    format!("10.{}.{ns}.{}", cluster + 1, p + 1)
}

fn ip(cluster: usize, namespace: &str, pod: &str) -> IpAddr {
    address(cluster, namespace, pod).parse().unwrap()
}

fn serve_ports() -> Vec<NamedPort> {
    let mut ports = Vec::new();
    for port in [80, 81] {
        for (protocol, word) in [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")] {
            ports.push(NamedPort {
                name: format!("serve-{port}-{word}"),
                protocol,
                port,
            });
        }
    }
    ports
}

/// The model in each of `clusters`: pods a and c on node n1, b on n2.
fn model(clusters: &[&str]) -> MeshBuilder {
    let mut mesh = MeshBuilder::new(clusters);
    for (c, cluster) in clusters.iter().enumerate() {
        for ns in ["x", "y", "z"] {
            mesh.namespace(cluster, ns, &[("ns", ns)]);
        }
        for (ns, pod) in PODS {
            let node = if pod == "b" { "n2" } else { "n1" };
            mesh.pod(
                cluster,
                ns,
                pod,
                labels(&[("pod", pod)]),
                node,
                &[&address(c, ns, pod)],
                serve_ports(),
            );
        }
    }
    mesh
}

fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: vec![],
    }
}

fn pods(namespace: Option<LabelSelector>, pod: Option<LabelSelector>) -> PolicyPeer {
    PolicyPeer::Pods {
        namespace_selector: namespace,
        pod_selector: pod,
    }
}

fn block(cidr: &str, except: &[&str]) -> PolicyPeer {
    PolicyPeer::IpBlock {
        cidr: cidr.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

fn port(protocol: Protocol, spec: PortSpec, end_port: Option<u16>) -> PolicyPort {
    PolicyPort {
        protocol,
        port: Some(spec),
        end_port,
    }
}

fn rule(peers: Vec<PolicyPeer>, ports: Vec<PolicyPort>) -> PolicyRule {
    PolicyRule { peers, ports }
}

fn policy(
    namespace: &str,
    name: &str,
    pod_selector: LabelSelector,
    ingress: Option<Vec<PolicyRule>>,
    egress: Option<Vec<PolicyRule>>,
) -> NetworkPolicy {
    NetworkPolicy {
        namespace: namespace.into(),
        name: name.into(),
        pod_selector,
        ingress,
        egress,
    }
}

fn connection(
    source: IpAddr,
    destination: IpAddr,
    protocol: Option<Protocol>,
    port: u16,
) -> Connection {
    Connection {
        source,
        destination,
        protocol,
        port,
    }
}

/// The table of cluster 0's pods as `allows` decides it.
fn table(protocol: Option<Protocol>, port: u16, allows: impl Fn(&Connection) -> bool) -> String {
    let mut out = String::new();
    for (from_ns, from) in PODS {
        for (to_ns, to) in PODS {
            out.push(if (from_ns, from) == (to_ns, to) {
                '-'
            } else if allows(&connection(
                ip(0, from_ns, from),
                ip(0, to_ns, to),
                protocol,
                port,
            )) {
                '.'
            } else {
                'X'
            });
        }
        out.push('\n');
    }
    out
}

fn expected(rows: &str) -> String {
    rows.split_whitespace()
        .map(|row| format!("{row}\n"))
        .collect()
}

/// Both the evaluator and the compiled rulesets give `rows` for (protocol, port).
fn assert_table(mesh: &MeshBuilder, protocol: Option<Protocol>, port: u16, rows: &str) {
    let inputs = mesh.inputs();
    let rulesets = compile_all(&inputs);
    let want = expected(rows);
    let by_evaluator = table(protocol, port, |c| evaluator_allows(&inputs, c));
    assert_eq!(by_evaluator, want, "evaluator, {protocol:?} {port}");
    let by_rulesets = table(protocol, port, |c| compiled_allows(&inputs, &rulesets, c));
    assert_eq!(by_rulesets, want, "compiled rulesets, {protocol:?} {port}");
}

const ALL_ALLOWED: &str = "
    -........
    .-.......
    ..-......
    ...-.....
    ....-....
    .....-...
    ......-..
    .......-.
    ........-";

/// Ingress to x/a from namespace y only (x/a's column), all else open.
const ONLY_Y_TO_XA: &str = "
    -........
    X-.......
    X.-......
    ...-.....
    ....-....
    .....-...
    X.....-..
    X......-.
    X.......-";

#[test]
fn without_policies_everything_connects() {
    let mesh = model(&["c1"]);
    assert_table(&mesh, TCP, 80, ALL_ALLOWED);
    assert_table(&mesh, None, 0, ALL_ALLOWED);
}

#[test]
fn default_deny_ingress_isolates_the_namespace() {
    let mut mesh = model(&["c1"]);
    mesh.policy("c1", policy("x", "deny", selector(&[]), Some(vec![]), None));
    let rows = "
        -XX......
        X-X......
        XX-......
        XXX-.....
        XXX.-....
        XXX..-...
        XXX...-..
        XXX....-.
        XXX.....-";
    assert_table(&mesh, TCP, 80, rows);
    assert_table(&mesh, UDP, 81, rows);
    assert_table(&mesh, None, 0, rows);
}

#[test]
fn default_deny_egress_isolates_the_namespace_as_client() {
    let mut mesh = model(&["c1"]);
    mesh.policy("c1", policy("x", "deny", selector(&[]), None, Some(vec![])));
    assert_table(
        &mesh,
        TCP,
        80,
        "
        -XXXXXXXX
        X-XXXXXXX
        XX-XXXXXX
        ...-.....
        ....-....
        .....-...
        ......-..
        .......-.
        ........-",
    );
}

#[test]
fn allow_from_a_namespace() {
    let mut mesh = model(&["c1"]);
    mesh.policy(
        "c1",
        policy(
            "x",
            "from-y",
            selector(&[("pod", "a")]),
            Some(vec![rule(
                vec![pods(Some(selector(&[("ns", "y")])), None)],
                vec![],
            )]),
            None,
        ),
    );
    assert_table(&mesh, TCP, 80, ONLY_Y_TO_XA);
}

#[test]
fn namespace_and_pod_selectors_in_one_peer_are_and_in_two_peers_or() {
    let mut mesh = model(&["c1"]);
    let and = rule(
        vec![pods(
            Some(selector(&[("ns", "y")])),
            Some(selector(&[("pod", "b")])),
        )],
        vec![],
    );
    mesh.policy(
        "c1",
        policy("x", "p", selector(&[("pod", "a")]), Some(vec![and]), None),
    );
    assert_table(
        &mesh,
        TCP,
        80,
        "
        -........
        X-.......
        X.-......
        X..-.....
        ....-....
        X....-...
        X.....-..
        X......-.
        X.......-",
    );
    let or = rule(
        vec![
            pods(Some(selector(&[("ns", "y")])), None),
            pods(None, Some(selector(&[("pod", "b")]))),
        ],
        vec![],
    );
    mesh.policy(
        "c1",
        policy("x", "p", selector(&[("pod", "a")]), Some(vec![or]), None),
    );
    // pod=b alone means x/b (the policy's namespace), not z/b.
    assert_table(
        &mesh,
        TCP,
        80,
        "
        -........
        .-.......
        X.-......
        ...-.....
        ....-....
        .....-...
        X.....-..
        X......-.
        X.......-",
    );
}

#[test]
fn match_expressions_select_as_kubernetes_does() {
    let mut mesh = model(&["c1"]);
    let expression = |operator, values: &[&str]| LabelSelector {
        match_labels: Default::default(),
        match_expressions: vec![LabelRequirement {
            key: "ns".into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }],
    };
    // Into x/c: from namespaces not x (NotIn), pods b or c (In).
    let peer = pods(
        Some(expression(SelectorOperator::NotIn, &["x"])),
        Some(LabelSelector {
            match_labels: Default::default(),
            match_expressions: vec![LabelRequirement {
                key: "pod".into(),
                operator: SelectorOperator::In,
                values: vec!["b".into(), "c".into()],
            }],
        }),
    );
    mesh.policy(
        "c1",
        policy(
            "x",
            "p",
            selector(&[("pod", "c")]),
            Some(vec![rule(vec![peer], vec![])]),
            None,
        ),
    );
    assert_table(
        &mesh,
        TCP,
        80,
        "
        -.X......
        .-X......
        ..-......
        ..X-.....
        ....-....
        .....-...
        ..X...-..
        .......-.
        ........-",
    );
}

#[test]
fn a_named_port_is_resolved_on_the_destination_pod_with_its_protocol() {
    let mut mesh = model(&["c1"]);
    let allow = |name: &str, protocol| {
        rule(
            vec![],
            vec![port(protocol, PortSpec::Name(name.into()), None)],
        )
    };
    mesh.policy(
        "c1",
        policy(
            "x",
            "p",
            selector(&[("pod", "a")]),
            Some(vec![
                allow("serve-81-tcp", Protocol::Tcp),
                allow("serve-80-tcp", Protocol::Udp),
            ]),
            None,
        ),
    );
    let closed = "
        -........
        X-.......
        X.-......
        X..-.....
        X...-....
        X....-...
        X.....-..
        X......-.
        X.......-";
    assert_table(&mesh, TCP, 81, ALL_ALLOWED);
    assert_table(&mesh, TCP, 80, closed);
    // serve-80-tcp is a TCP port: asked for over UDP, it names nothing.
    assert_table(&mesh, UDP, 80, closed);
    assert_table(&mesh, UDP, 81, closed);

    // Per pod: x/a serving serve-81-tcp on 8081 is reached on 8081, not 81.
    let key = trellis_core::policy::EndpointKey {
        cluster: policy_support::cluster("c1"),
        namespace: "x".into(),
        name: "a".into(),
    };
    let mut moved = mesh.endpoints[&key].clone();
    moved.named_ports = vec![NamedPort {
        name: "serve-81-tcp".into(),
        protocol: Protocol::Tcp,
        port: 8081,
    }];
    mesh.endpoints.insert(key, moved);
    assert_table(&mesh, TCP, 81, closed);
    assert_table(&mesh, TCP, 8081, ALL_ALLOWED);
}

#[test]
fn an_egress_named_port_is_resolved_on_each_destination_pod() {
    let mut mesh = model(&["c1"]);
    // x/a may reach z's pods on serve-80-udp only; z/c serves it on 5353.
    let key = trellis_core::policy::EndpointKey {
        cluster: policy_support::cluster("c1"),
        namespace: "z".into(),
        name: "c".into(),
    };
    let mut zc = mesh.endpoints[&key].clone();
    zc.named_ports[1].port = 5353;
    assert_eq!(zc.named_ports[1].name, "serve-80-udp");
    mesh.endpoints.insert(key, zc);
    mesh.policy(
        "c1",
        policy(
            "x",
            "p",
            selector(&[("pod", "a")]),
            None,
            Some(vec![rule(
                vec![pods(Some(selector(&[("ns", "z")])), None)],
                vec![port(
                    Protocol::Udp,
                    PortSpec::Name("serve-80-udp".into()),
                    None,
                )],
            )]),
        ),
    );
    assert_table(
        &mesh,
        UDP,
        80,
        "
        -XXXXX..X
        .-.......
        ..-......
        ...-.....
        ....-....
        .....-...
        ......-..
        .......-.
        ........-",
    );
    let inputs = mesh.inputs();
    let rulesets = compile_all(&inputs);
    let to_zc = connection(ip(0, "x", "a"), ip(0, "z", "c"), UDP, 5353);
    assert!(evaluator_allows(&inputs, &to_zc));
    assert!(compiled_allows(&inputs, &rulesets, &to_zc));
}

#[test]
fn end_port_makes_a_range_of_one_protocol() {
    let mut mesh = model(&["c1"]);
    mesh.policy(
        "c1",
        policy(
            "x",
            "p",
            selector(&[("pod", "a")]),
            Some(vec![rule(
                vec![],
                vec![port(Protocol::Tcp, PortSpec::Number(80), Some(81))],
            )]),
            None,
        ),
    );
    assert_table(&mesh, TCP, 80, ALL_ALLOWED);
    assert_table(&mesh, TCP, 81, ALL_ALLOWED);
    let closed = "
        -........
        X-.......
        X.-......
        X..-.....
        X...-....
        X....-...
        X.....-..
        X......-.
        X.......-";
    assert_table(&mesh, TCP, 82, closed);
    assert_table(&mesh, UDP, 80, closed);
    assert_table(&mesh, None, 0, closed);
}

#[test]
fn ip_block_except_carves_out_a_namespace() {
    let mut mesh = model(&["c1"]);
    // 10.1.0.0/16 holds every pod; y's pods are 10.1.1.0/24.
    mesh.policy(
        "c1",
        policy(
            "x",
            "p",
            selector(&[("pod", "a")]),
            Some(vec![rule(
                vec![block("10.1.0.0/16", &["10.1.1.0/24"])],
                vec![],
            )]),
            None,
        ),
    );
    assert_table(
        &mesh,
        TCP,
        80,
        "
        -........
        .-.......
        ..-......
        X..-.....
        X...-....
        X....-...
        ......-..
        .......-.
        ........-",
    );
    let inputs = mesh.inputs();
    let rulesets = compile_all(&inputs);
    for (outside, allowed) in [
        ("10.1.200.1", true),
        ("10.1.1.200", false),
        ("10.2.0.1", false),
    ] {
        let c = connection(outside.parse().unwrap(), ip(0, "x", "a"), TCP, 80);
        assert_eq!(evaluator_allows(&inputs, &c), allowed, "{outside}");
        assert_eq!(
            compiled_allows(&inputs, &rulesets, &c),
            allowed,
            "{outside}"
        );
    }
}

#[test]
fn several_policies_add_up() {
    let mut mesh = model(&["c1"]);
    mesh.policy("c1", policy("x", "deny", selector(&[]), Some(vec![]), None));
    mesh.policy(
        "c1",
        policy(
            "x",
            "from-y",
            selector(&[("pod", "a")]),
            Some(vec![rule(
                vec![pods(Some(selector(&[("ns", "y")])), None)],
                vec![],
            )]),
            None,
        ),
    );
    mesh.policy(
        "c1",
        policy(
            "x",
            "b-from-z-c",
            selector(&[("pod", "b")]),
            Some(vec![rule(
                vec![pods(
                    Some(selector(&[("ns", "z")])),
                    Some(selector(&[("pod", "c")])),
                )],
                vec![],
            )]),
            None,
        ),
    );
    assert_table(
        &mesh,
        TCP,
        80,
        "
        -XX......
        X-X......
        XX-......
        .XX-.....
        .XX.-....
        .XX..-...
        XXX...-..
        XXX....-.
        X.X.....-",
    );
}

#[test]
fn egress_deny_with_dns_allowed() {
    let mut mesh = model(&["c1"]);
    mesh.policy(
        "c1",
        policy(
            "x",
            "dns-and-z",
            selector(&[]),
            None,
            Some(vec![
                rule(
                    vec![],
                    vec![port(Protocol::Udp, PortSpec::Number(53), None)],
                ),
                rule(
                    vec![pods(Some(selector(&[("ns", "z")])), None)],
                    vec![port(Protocol::Tcp, PortSpec::Number(80), None)],
                ),
            ]),
        ),
    );
    let x_reaches_z_only = "
        -XXXXX...
        X-XXXX...
        XX-XXX...
        ...-.....
        ....-....
        .....-...
        ......-..
        .......-.
        ........-";
    assert_table(&mesh, TCP, 80, x_reaches_z_only);
    let x_reaches_nothing = "
        -XXXXXXXX
        X-XXXXXXX
        XX-XXXXXX
        ...-.....
        ....-....
        .....-...
        ......-..
        .......-.
        ........-";
    assert_table(&mesh, TCP, 81, x_reaches_nothing);
    let inputs = mesh.inputs();
    let rulesets = compile_all(&inputs);
    let dns: IpAddr = "10.96.0.10".parse().unwrap();
    for (protocol, allowed) in [(UDP, true), (TCP, false)] {
        let c = connection(ip(0, "x", "b"), dns, protocol, 53);
        assert_eq!(evaluator_allows(&inputs, &c), allowed);
        assert_eq!(compiled_allows(&inputs, &rulesets, &c), allowed);
    }
}

#[test]
fn policies_on_both_ends_must_both_allow() {
    let mut mesh = model(&["c1"]);
    // x/a accepts from everyone in x, but x/b may only talk to y.
    mesh.policy(
        "c1",
        policy(
            "x",
            "a-from-x",
            selector(&[("pod", "a")]),
            Some(vec![rule(vec![pods(None, Some(selector(&[])))], vec![])]),
            None,
        ),
    );
    mesh.policy(
        "c1",
        policy(
            "x",
            "b-to-y",
            selector(&[("pod", "b")]),
            None,
            Some(vec![rule(
                vec![pods(Some(selector(&[("ns", "y")])), None)],
                vec![],
            )]),
        ),
    );
    assert_table(
        &mesh,
        TCP,
        80,
        "
        -........
        X-X...XXX
        ..-......
        X..-.....
        X...-....
        X....-...
        X.....-..
        X......-.
        X.......-",
    );
    let inputs = mesh.inputs();
    let decision =
        Mesh::new(&inputs).decide(&connection(ip(0, "x", "b"), ip(0, "x", "a"), TCP, 80));
    let key = |name: &str| PolicyKey {
        namespace: "x".into(),
        name: name.into(),
    };
    assert_eq!(
        decision.egress,
        DirectionVerdict::Denied {
            isolated_by: vec![key("b-to-y")]
        }
    );
    assert_eq!(
        decision.ingress,
        DirectionVerdict::Allowed {
            by: vec![(key("a-from-x"), 0)]
        }
    );
    assert!(!decision.allowed());
}

/// The pods of both clusters allowed into c1's x/a on TCP 80, as the evaluator and the
/// compiled rulesets see it.
fn sources_into_c1_xa(mesh: &MeshBuilder) -> BTreeSet<String> {
    let inputs = mesh.inputs();
    let rulesets = compile_all(&inputs);
    let mut allowed = BTreeSet::new();
    for (c, cluster) in ["c1", "c2"].iter().enumerate() {
        for (ns, pod) in PODS {
            let conn = connection(ip(c, ns, pod), ip(0, "x", "a"), TCP, 80);
            let by_evaluator = evaluator_allows(&inputs, &conn);
            assert_eq!(
                compiled_allows(&inputs, &rulesets, &conn),
                by_evaluator,
                "{cluster}/{ns}/{pod}"
            );
            if by_evaluator && (c, ns, pod) != (0, "x", "a") {
                allowed.insert(format!("{cluster}/{ns}/{pod}"));
            }
        }
    }
    allowed
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn selectors_reach_other_clusters_only_by_naming_them() {
    let mut mesh = model(&["c1", "c2"]);
    let into_xa = |peers| {
        policy(
            "x",
            "p",
            selector(&[("pod", "a")]),
            Some(vec![rule(peers, vec![])]),
            None,
        )
    };
    // No cluster label: c1 only, and the pod selector's namespace is x.
    mesh.policy(
        "c1",
        into_xa(vec![pods(None, Some(selector(&[("pod", "b")])))]),
    );
    assert_eq!(sources_into_c1_xa(&mesh), set(&["c1/x/b"]));
    mesh.policy("c1", into_xa(vec![pods(Some(selector(&[])), None)]));
    assert_eq!(
        sources_into_c1_xa(&mesh).len(),
        8,
        "every pod of c1 but x/a itself"
    );

    // Naming c2: c2's x/b (the namespace of the same name).
    mesh.policy(
        "c1",
        into_xa(vec![pods(
            None,
            Some(selector(&[("pod", "b"), (CLUSTER_LABEL, "c2")])),
        )]),
    );
    assert_eq!(sources_into_c1_xa(&mesh), set(&["c2/x/b"]));

    // Exists: namespace y of every cluster.
    let every_cluster = LabelSelector {
        match_labels: labels(&[("ns", "y")]),
        match_expressions: vec![LabelRequirement {
            key: CLUSTER_LABEL.into(),
            operator: SelectorOperator::Exists,
            values: vec![],
        }],
    };
    mesh.policy("c1", into_xa(vec![pods(Some(every_cluster), None)]));
    assert_eq!(
        sources_into_c1_xa(&mesh),
        set(&["c1/y/a", "c1/y/b", "c1/y/c", "c2/y/a", "c2/y/b", "c2/y/c"])
    );

    // c2's egress policies decide for c2's clients too.
    mesh.policy(
        "c2",
        policy("y", "deny", selector(&[("pod", "c")]), None, Some(vec![])),
    );
    assert_eq!(
        sources_into_c1_xa(&mesh),
        set(&["c1/y/a", "c1/y/b", "c1/y/c", "c2/y/a", "c2/y/b"])
    );
}

#[test]
fn a_policy_selects_pods_of_its_own_cluster_only() {
    let mut mesh = model(&["c1", "c2"]);
    let names_c2 = LabelSelector {
        match_labels: labels(&[(CLUSTER_LABEL, "c2")]),
        match_expressions: vec![],
    };
    // In c1, a pod selector naming c2 selects nothing: c1's pods are c1's.
    mesh.policy("c1", policy("x", "p", names_c2, Some(vec![]), None));
    assert_eq!(sources_into_c1_xa(&mesh).len(), 17);
    let inputs = mesh.inputs();
    assert!(compile_all(&inputs).values().all(|r| r.ingress.is_empty()));
}

#[test]
fn unknown_pods_are_dropped_and_node_tables_are_consistent() {
    let mesh = model(&["c1"]);
    let inputs = mesh.inputs();
    let ruleset = compile(&inputs[0], "n1");
    let stranger = connection("10.1.9.9".parse().unwrap(), ip(0, "x", "a"), TCP, 80);
    assert_eq!(
        interpret::egress(&ruleset, &stranger),
        Ok(Outcome::UnknownPod)
    );
    assert_eq!(
        ruleset.local_pods,
        ["x", "y", "z"]
            .iter()
            .flat_map(|ns| ["a", "c"].map(|p| ip(0, ns, p)))
            .collect()
    );
}

#[test]
fn policy_chains_and_sets_keep_their_names_when_other_policies_come_and_go() {
    let mut mesh = model(&["c1"]);
    let from_y = policy(
        "x",
        "from-y",
        selector(&[("pod", "a")]),
        Some(vec![rule(
            vec![pods(Some(selector(&[("ns", "y")])), None)],
            vec![],
        )]),
        None,
    );
    mesh.policy("c1", from_y.clone());
    let before = compile(&mesh.inputs()[0], "n1");
    mesh.policy(
        "c1",
        policy("x", "aaa-first", selector(&[]), None, Some(vec![])),
    );
    let after = compile(&mesh.inputs()[0], "n1");
    for (name, set) in &before.address_sets {
        assert_eq!(after.address_sets.get(name), Some(set), "{name}");
    }
    let chain = trellis_core::policy::names::policy_chain(
        &from_y.key(),
        trellis_core::policy::ruleset::Direction::Ingress,
    );
    assert_eq!(before.chains[&chain], after.chains[&chain]);
    assert_eq!(
        before.chains[&chain][0].comment.as_deref(),
        Some("x/from-y ingress rule 0")
    );
}

#[test]
fn relabelling_pods_and_namespaces_moves_them_in_and_out_of_selections() {
    let mut mesh = model(&["c1"]);
    mesh.policy(
        "c1",
        policy(
            "x",
            "from-y",
            selector(&[("pod", "a")]),
            Some(vec![rule(
                vec![pods(Some(selector(&[("ns", "y")])), None)],
                vec![],
            )]),
            None,
        ),
    );
    let mut compilers: Vec<(String, Compiler)> = ["n1", "n2"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                Compiler::new(policy_support::cluster("c1"), *n),
            )
        })
        .collect();
    let mut check = |mesh: &MeshBuilder| {
        let inputs: Vec<PolicyInputs> = mesh.inputs();
        for (node, compiler) in &mut compilers {
            assert_eq!(
                compiler.update(&inputs[0]),
                &compile(&inputs[0], node),
                "{node}"
            );
        }
    };
    check(&mesh);
    assert_table(&mesh, TCP, 80, ONLY_Y_TO_XA);

    // x/a relabelled out of the policy's selection: open again.
    mesh.relabel_pod("c1", "x", "a", labels(&[("pod", "a2")]));
    check(&mesh);
    assert_table(&mesh, TCP, 80, ALL_ALLOWED);
    mesh.relabel_pod("c1", "x", "a", labels(&[("pod", "a")]));
    check(&mesh);

    // Namespace z becomes ns=y: its pods are let in.
    mesh.relabel_namespace("c1", "z", &[("ns", "y")]);
    check(&mesh);
    assert_table(
        &mesh,
        TCP,
        80,
        "
        -........
        X-.......
        X.-......
        ...-.....
        ....-....
        .....-...
        ......-..
        .......-.
        ........-",
    );

    // The policy deleted: open.
    mesh.clear_policies();
    check(&mesh);
    assert_table(&mesh, TCP, 80, ALL_ALLOWED);
}
