//! NetworkPolicy conformance in the lab: the Kubernetes e2e model (namespaces x, y, z; pods
//! a, b, c labelled `pod=<name>`; ports 80 and 81 over TCP and UDP), each case's truth table
//! written by hand from the policy's semantics and checked against a probe of every ordered
//! pod pair. Then the same model in two clusters for the cross-cluster rules.

use trellis_integration::TestLab;
use trellis_integration::netpol::{Model, PodName, Reachability, Transport, model_yaml};

const TCP_80: (u16, Transport) = (80, Transport::Tcp);
const TCP_81: (u16, Transport) = (81, Transport::Tcp);
const UDP_80: (u16, Transport) = (80, Transport::Udp);
const UDP_81: (u16, Transport) = (81, Transport::Udp);

/// A NetworkPolicy document in `namespace` with `spec` (YAML flow mapping contents).
fn policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

/// Applies `yaml`, checks `expected` on `ports`, deletes it again and checks that every pair
/// connects once more.
fn case(
    model: &Model,
    name: &str,
    yaml: &str,
    ports: &[(u16, Transport)],
    expected: &Reachability,
) {
    model.lab.apply("c1", yaml);
    model.check_ports(name, ports, expected);
    model.lab.delete("c1", yaml);
}

#[test]
fn the_e2e_model_in_one_cluster() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("np");
    lab.up(&["--clusters", "1", "--nodes", "2", "--pods", "1"]);
    lab.apply("c1", &model_yaml(&["node-0", "node-1"]));
    let model = Model::of(&lab);
    let pods = &model.pods;
    assert_eq!(pods.len(), 9, "{pods:?}");
    let all = model.names();
    let open = Reachability::all(&all, true);

    // No policy: everything connects, on every port and protocol.
    model.check_ports("no policy", &[TCP_80, TCP_81, UDP_80, UDP_81], &open);

    // Default deny ingress in x: nothing reaches x's pods, x's pods reach everything else.
    let deny_ingress_x = policy(
        "x",
        "deny-ingress",
        "{podSelector: {}, policyTypes: [Ingress]}",
    );
    case(
        &model,
        "default deny ingress",
        &deny_ingress_x,
        &[TCP_80, UDP_81],
        &Reachability::from_fn(&all, |_, to| to.namespace != "x"),
    );

    // Default deny egress in x: x's pods reach nothing; with a second policy allowing egress
    // to UDP 53 anywhere (DNS), still nothing on port 80 or 81.
    let deny_egress_x = policy(
        "x",
        "deny-egress",
        "{podSelector: {}, policyTypes: [Egress]}",
    );
    let from_x_denied = Reachability::from_fn(&all, |from, _| from.namespace != "x");
    case(
        &model,
        "default deny egress",
        &deny_egress_x,
        &[TCP_80, UDP_80],
        &from_x_denied,
    );
    let with_dns = format!(
        "{deny_egress_x}{}",
        policy(
            "x",
            "allow-dns",
            "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{protocol: UDP, port: 53}]}]}"
        )
    );
    case(
        &model,
        "deny egress but DNS",
        &with_dns,
        &[TCP_80, UDP_81],
        &from_x_denied,
    );

    // Ingress to x from namespace y only (namespaceSelector): x's own pods are denied too.
    let from_y = policy(
        "x",
        "from-y",
        "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}",
    );
    case(
        &model,
        "allow from namespace y",
        &from_y,
        &[TCP_80],
        &Reachability::from_fn(&all, |from, to| {
            to.namespace != "x" || from.namespace == "y"
        }),
    );

    // Both selectors in one peer (AND): pod a of namespace y only.
    let and = policy(
        "x",
        "from-y-a",
        "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}, podSelector: {matchLabels: {pod: a}}}]}]}",
    );
    case(
        &model,
        "namespace AND pod selector",
        &and,
        &[TCP_80],
        &Reachability::from_fn(&all, |from, to| {
            to.namespace != "x" || (from.namespace == "y" && from.name == "a")
        }),
    );
    // As two peers (OR): every pod of y, and pod a of x (a podSelector alone selects in the
    // policy's namespace).
    let or = policy(
        "x",
        "from-y-or-a",
        "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}, {podSelector: {matchLabels: {pod: a}}}]}]}",
    );
    case(
        &model,
        "namespace OR pod selector",
        &or,
        &[TCP_80],
        &Reachability::from_fn(&all, |from, to| {
            to.namespace != "x"
                || from.namespace == "y"
                || (from.namespace == "x" && from.name == "a")
        }),
    );

    // matchExpressions: x/a takes clients from every namespace but y (NotIn); the other pods
    // of x are not selected and stay open.
    let not_in = policy(
        "x",
        "not-from-y",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}]}}]}]}",
    );
    case(
        &model,
        "matchExpressions NotIn",
        &not_in,
        &[TCP_80],
        &Reachability::from_fn(&all, |from, to| {
            !(to.namespace == "x" && to.name == "a") || from.namespace != "y"
        }),
    );
    // In: x/a takes pods b and c of every namespace.
    let in_ = policy(
        "x",
        "from-b-c",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}}]}]}",
    );
    case(
        &model,
        "matchExpressions In",
        &in_,
        &[TCP_80],
        &Reachability::from_fn(&all, |from, to| {
            !(to.namespace == "x" && to.name == "a") || from.name != "a"
        }),
    );

    // A named port: the rule allows `serve-81-tcp` (81/TCP) from anywhere into x; 80/TCP and
    // 81/UDP stay denied.
    let named = policy(
        "x",
        "named-port",
        "{podSelector: {}, ingress: [{ports: [{port: serve-81-tcp}]}]}",
    );
    lab.apply("c1", &named);
    let x_closed = Reachability::from_fn(&all, |_, to| to.namespace != "x");
    model.check("named port", 81, Transport::Tcp, &open);
    model.check_ports("named port", &[TCP_80, UDP_81], &x_closed);
    lab.delete("c1", &named);

    // endPort: 81-90/TCP into x; 80/TCP denied, 81/TCP allowed.
    let range = policy(
        "x",
        "port-range",
        "{podSelector: {}, ingress: [{ports: [{protocol: TCP, port: 81, endPort: 90}]}]}",
    );
    lab.apply("c1", &range);
    model.check("endPort", 81, Transport::Tcp, &open);
    model.check_ports("endPort", &[TCP_80, UDP_81], &x_closed);
    lab.delete("c1", &range);

    // ipBlock with except: x's pods may send to the pod network but y/b.
    let y_b = pods
        .iter()
        .find(|p| p.name.short() == "y/b")
        .unwrap()
        .address;
    let ip_block = policy(
        "x",
        "to-cidr-but-y-b",
        &format!(
            "{{podSelector: {{}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [{y_b}/32]}}}}]}}]}}"
        ),
    );
    case(
        &model,
        "ipBlock except",
        &ip_block,
        &[TCP_80, UDP_80],
        &Reachability::from_fn(&all, |from, to| {
            from.namespace != "x" || to.short() != "y/b"
        }),
    );

    // Policies add up: into x from y (one policy) and from z/c (another).
    let both = format!(
        "{from_y}{}",
        policy(
            "x",
            "from-z-c",
            "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}, podSelector: {matchLabels: {pod: c}}}]}]}"
        )
    );
    case(
        &model,
        "two policies add up",
        &both,
        &[TCP_80],
        &Reachability::from_fn(&all, |from, to| {
            to.namespace != "x" || from.namespace == "y" || from.short() == "z/c"
        }),
    );

    // Policies on both ends: x may send to y only (egress), y takes x/a only (ingress).
    let both_ends = format!(
        "{}{}",
        policy(
            "x",
            "egress-to-y",
            "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}"
        ),
        policy(
            "y",
            "ingress-from-x-a",
            "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}, podSelector: {matchLabels: {pod: a}}}]}]}"
        )
    );
    case(
        &model,
        "policies on both ends",
        &both_ends,
        &[TCP_80, UDP_81],
        &Reachability::from_fn(&all, |from, to| {
            (from.namespace != "x" || to.namespace == "y")
                && (to.namespace != "y" || from.short() == "x/a")
        }),
    );

    // An update: deny ingress to all of x, then the same policy narrowed to x/a.
    lab.apply("c1", &deny_ingress_x);
    model.check("update: before", 80, Transport::Tcp, &x_closed);
    let narrowed =
        deny_ingress_x.replace("podSelector: {}", "podSelector: {matchLabels: {pod: a}}");
    lab.apply("c1", &narrowed);
    model.check(
        "update: after",
        80,
        Transport::Tcp,
        &Reachability::from_fn(&all, |_, to| to.short() != "x/a"),
    );
    lab.delete("c1", &narrowed);

    // Pod labels: x takes pods labelled pod=a from any namespace; y/b relabelled pod=a is
    // taken too, and is not once labelled back.
    let from_a = policy(
        "x",
        "from-a",
        "{podSelector: {}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}]}]}",
    );
    lab.apply("c1", &from_a);
    let a_only = |extra: Option<&str>| {
        Reachability::from_fn(&all, move |from: &PodName, to: &PodName| {
            to.namespace != "x" || from.name == "a" || Some(from.short().as_str()) == extra
        })
    };
    model.check("pod label: before", 80, Transport::Tcp, &a_only(None));
    lab.label("c1", "pod/y/b", &["pod=a"]);
    model.check(
        "pod label: relabelled",
        80,
        Transport::Tcp,
        &a_only(Some("y/b")),
    );
    lab.label("c1", "pod/y/b", &["pod=b"]);
    model.check("pod label: back", 80, Transport::Tcp, &a_only(None));
    lab.delete("c1", &from_a);

    // Namespace labels: x takes namespaces labelled team=blue; z gets the label.
    let from_blue = policy(
        "x",
        "from-blue",
        "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]}",
    );
    lab.apply("c1", &from_blue);
    model.check("namespace label: before", 80, Transport::Tcp, &x_closed);
    lab.label("c1", "namespace/z", &["team=blue"]);
    model.check(
        "namespace label: relabelled",
        80,
        Transport::Tcp,
        &Reachability::from_fn(&all, |from, to| {
            to.namespace != "x" || from.namespace == "z"
        }),
    );
    lab.label("c1", "namespace/z", &["team-"]);
    model.check("namespace label: removed", 80, Transport::Tcp, &x_closed);

    // Deletion: back to everything allowed.
    lab.delete("c1", &from_blue);
    model.check_ports("deleted", &[TCP_80, UDP_81], &open);

    // Generated cases: random policies over every feature, the reference evaluator's table
    // (given what the nodes enforce) held against the probes.
    let (mut denied, mut cells) = (0, 0);
    for seed in 1..=GENERATED_CASES {
        let yaml = generated_policies(seed, &model);
        lab.apply("c1", &yaml);
        for (port, transport) in [TCP_80, UDP_81] {
            let expected = model.evaluated(port, transport);
            denied += expected.differences(&open).len();
            cells += all.len() * (all.len() - 1);
            trellis_integration::netpol::check(
                &format!("generated #{seed}:\n{yaml}"),
                &model.pods,
                port,
                transport,
                &expected,
            );
        }
        lab.delete("c1", &yaml);
    }
    // The generated cases mean something only if they both allow and deny.
    assert!(
        denied > cells / 10 && denied < cells * 9 / 10,
        "{denied} of {cells} generated cells denied"
    );
}

/// How many generated cases the one-cluster model runs.
const GENERATED_CASES: u64 = 8;

/// A small deterministic generator (xorshift64*), so a failing case is reproduced by its seed.
struct Dice(u64);

impl Dice {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }

    fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
        options[self.below(options.len())]
    }
}

/// One to three policies in x, y or z, drawn from every feature the model can show: pod and
/// namespace selectors (matchLabels, In, NotIn, Exists), both in one peer, several peers,
/// ipBlock with an except of one model pod, ports by number, name and range, both protocols,
/// either or both directions, and the deny-all and allow-all forms.
fn generated_policies(seed: u64, model: &Model) -> String {
    let mut dice = Dice::new(seed);
    let pod_selectors = [
        "{}",
        "{matchLabels: {pod: a}}",
        "{matchLabels: {pod: b}}",
        "{matchExpressions: [{key: pod, operator: In, values: [a, c]}]}",
        "{matchExpressions: [{key: pod, operator: NotIn, values: [b]}]}",
        "{matchExpressions: [{key: pod, operator: Exists}]}",
    ];
    let namespace_selectors = [
        "{}",
        "{matchLabels: {kubernetes.io/metadata.name: x}}",
        "{matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y, z]}]}",
        "{matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [z]}]}",
    ];
    let ports = [
        "{port: 80, protocol: TCP}",
        "{port: 81, protocol: UDP}",
        "{port: serve-80-tcp, protocol: TCP}",
        "{port: serve-81-udp, protocol: UDP}",
        "{port: 79, endPort: 80, protocol: TCP}",
        "{port: 81, endPort: 90, protocol: UDP}",
        "{protocol: UDP}",
    ];
    let mut yaml = String::new();
    for index in 0..1 + dice.below(3) {
        let namespace = dice.pick(&["x", "y", "z"]);
        let rules = |dice: &mut Dice, direction: &str| -> String {
            let rules: Vec<String> = (0..dice.below(3))
                .map(|_| {
                    let peers: Vec<String> = (0..dice.below(3))
                        .map(|_| match dice.below(4) {
                            0 => format!("{{podSelector: {}}}", dice.pick(&pod_selectors)),
                            1 => format!(
                                "{{namespaceSelector: {}}}",
                                dice.pick(&namespace_selectors)
                            ),
                            2 => format!(
                                "{{namespaceSelector: {}, podSelector: {}}}",
                                dice.pick(&namespace_selectors),
                                dice.pick(&pod_selectors)
                            ),
                            _ => {
                                let except = &model.pods[dice.below(model.pods.len())];
                                format!(
                                    "{{ipBlock: {{cidr: 10.0.0.0/8, except: [{}/32]}}}}",
                                    except.address
                                )
                            }
                        })
                        .collect();
                    let rule_ports: Vec<&str> =
                        (0..dice.below(3)).map(|_| dice.pick(&ports)).collect();
                    let key = if direction == "ingress" { "from" } else { "to" };
                    format!(
                        "{{{key}: [{}], ports: [{}]}}",
                        peers.join(", "),
                        rule_ports.join(", ")
                    )
                })
                .collect();
            format!("[{}]", rules.join(", "))
        };
        let spec = match dice.below(3) {
            0 => format!(
                "{{podSelector: {}, policyTypes: [Ingress], ingress: {}}}",
                dice.pick(&pod_selectors),
                rules(&mut dice, "ingress")
            ),
            1 => format!(
                "{{podSelector: {}, policyTypes: [Egress], egress: {}}}",
                dice.pick(&pod_selectors),
                rules(&mut dice, "egress")
            ),
            _ => format!(
                "{{podSelector: {}, policyTypes: [Ingress, Egress], ingress: {}, egress: {}}}",
                dice.pick(&pod_selectors),
                rules(&mut dice, "ingress"),
                rules(&mut dice, "egress")
            ),
        };
        yaml.push_str(&policy(namespace, &format!("generated-{index}"), &spec));
    }
    yaml
}

#[test]
fn the_e2e_model_across_two_clusters() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("npx");
    lab.up(&["--clusters", "2", "--nodes", "2", "--pods", "1"]);
    let model = model_yaml(&["node-0", "node-1"]);
    lab.apply("c1", &model);
    lab.apply("c2", &model);
    let model = Model::of(&lab);
    let pods = &model.pods;
    assert_eq!(pods.len(), 18, "{pods:?}");
    lab.wait_for_every_pod_in_policy();
    let all = model.names();
    model.check_ports(
        "no policy",
        &[TCP_80, UDP_81],
        &Reachability::all(&all, true),
    );

    let into_c1_x = |to: &PodName, allowed_client: bool| {
        !(to.cluster == "c1" && to.namespace == "x") || allowed_client
    };

    // A selector that does not name clusters selects in its own cluster only: every
    // namespace of c1, no pod of c2.
    let own_cluster = policy(
        "x",
        "from-every-namespace",
        "{podSelector: {}, ingress: [{from: [{namespaceSelector: {}}]}]}",
    );
    lab.apply("c1", &own_cluster);
    model.check(
        "own cluster only",
        80,
        Transport::Tcp,
        &Reachability::from_fn(&all, |from, to| into_c1_x(to, from.cluster == "c1")),
    );
    lab.delete("c1", &own_cluster);

    // Naming c2: every namespace of c2, and no longer c1's.
    let from_c2 = policy(
        "x",
        "from-c2",
        "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {trellis.dev/cluster: c2}}}]}]}",
    );
    lab.apply("c1", &from_c2);
    model.check_ports(
        "cluster label c2",
        &[TCP_80, UDP_80],
        &Reachability::from_fn(&all, |from, to| into_c1_x(to, from.cluster == "c2")),
    );
    lab.delete("c1", &from_c2);

    // Exists: every namespace of every cluster.
    let from_anywhere = policy(
        "x",
        "from-every-cluster",
        "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: trellis.dev/cluster, operator: Exists}]}}]}]}",
    );
    lab.apply("c1", &from_anywhere);
    model.check(
        "cluster label Exists",
        80,
        Transport::Tcp,
        &Reachability::all(&all, true),
    );
    lab.delete("c1", &from_anywhere);

    // The server sees the real client: of c2's pods, only those labelled pod=a (in
    // namespace x, the policy's own, as a podSelector alone selects) get in, though every
    // pod of c2 sends through the same gateways.
    let from_c2_x_a = policy(
        "x",
        "from-c2-x-a",
        "{podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {pod: a, trellis.dev/cluster: c2}}}]}]}",
    );
    lab.apply("c1", &from_c2_x_a);
    let only = |clients: &'static [&'static str]| {
        Reachability::from_fn(&all, move |from, to| {
            into_c1_x(to, clients.contains(&from.to_string().as_str()))
        })
    };
    model.check(
        "real client across clusters",
        80,
        Transport::Tcp,
        &only(&["c2/x/a"]),
    );
    // A pod relabelled in c2 is selected in c1 once `label` returns (it waits for the peer
    // clusters too), and no longer once labelled back.
    lab.label("c2", "pod/x/b", &["pod=a"]);
    model.check(
        "relabelled in the peer cluster",
        80,
        Transport::Tcp,
        &only(&["c2/x/a", "c2/x/b"]),
    );
    lab.label("c2", "pod/x/b", &["pod=b"]);
    model.check(
        "labelled back in the peer cluster",
        80,
        Transport::Tcp,
        &only(&["c2/x/a"]),
    );
    lab.delete("c1", &from_c2_x_a);
}
