//! The Kubernetes e2e NetworkPolicy model in a lab, and its reachability truth tables.
//!
//! As upstream's `test/e2e/network/netpol`: namespaces x, y and z (labelled with their name,
//! `kubernetes.io/metadata.name`, as the API server does), pods a, b and c in each, labelled
//! `pod=<name>`, each serving ports 80 and 81 over TCP and UDP (container ports named
//! `serve-80-tcp`, `serve-80-udp`, `serve-81-tcp`, `serve-81-udp`). A case writes its expected
//! table by hand from the policy's semantics ([`Reachability`]), probes every ordered pair of
//! pods at once ([`probe_table`], `trellis_probe::probe_all` inside each client's namespace)
//! and fails with the expected, observed and differing tables side by side ([`check`]).

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use trellis_probe::Transport;
use trellis_probe::{Outcome, Probe, probe_all};

use crate::{TestLab, text};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// The ports every model pod serves, over TCP and UDP.
pub const PORTS: [u16; 2] = [80, 81];

/// Where a lab controller serves `/status` (and metrics), on its cluster's first node.
const CONTROLLER_STATUS_PORT: u16 = 9464;

/// How long a probe waits: the denied ones all wait this long, at once.
pub const DENIED_AFTER: Duration = Duration::from_millis(400);
/// A pair that did not answer as expected is probed once more, waiting this long, so a lost
/// first packet does not fail an allowed pair (a denied pair that connects fails either way).
pub const RETRY_AFTER: Duration = Duration::from_millis(1500);

/// A pod of the model: `c1/x/a`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodName {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
}

impl PodName {
    pub fn new(cluster: &str, namespace: &str, name: &str) -> Self {
        Self {
            cluster: cluster.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `x/a`, as the tables label pods of one cluster.
    pub fn short(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

/// A model pod as the lab made it.
#[derive(Debug, Clone)]
pub struct ModelPod {
    pub name: PodName,
    pub node: String,
    pub netns: String,
    pub address: Ipv4Addr,
}

/// The model's namespaces and pods as one manifest, the pods spread over `nodes` in turn.
pub fn model_yaml(nodes: &[&str]) -> String {
    let mut yaml = String::new();
    let mut turn = 0;
    for namespace in NAMESPACES {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}, labels: {{kubernetes.io/metadata.name: {namespace}}}}}\n"
        );
        for pod in PODS {
            let node = nodes[turn % nodes.len()];
            turn += 1;
            let ports: Vec<String> = PORTS
                .iter()
                .flat_map(|port| {
                    ["tcp", "udp"].map(|p| {
                        format!(
                            "{{name: serve-{port}-{p}, containerPort: {port}, protocol: {}}}",
                            p.to_uppercase()
                        )
                    })
                })
                .collect();
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {namespace}, labels: {{pod: {pod}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: cont-{pod}\n    image: trellis\n    ports: [{}]\n",
                ports.join(", ")
            );
        }
    }
    yaml
}

impl TestLab {
    /// `trellis lab <command> --cluster <cluster> -f -` with `yaml` on stdin; must succeed.
    pub fn kubectl(&self, command: &str, cluster: &str, yaml: &str) -> String {
        use std::io::Write as _;
        let mut child = std::process::Command::new(crate::bin_path("trellis"))
            .args([
                "lab",
                "--name",
                &self.name,
                command,
                "--cluster",
                cluster,
                "-f",
                "-",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("trellis runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("write the manifest");
        let output = child.wait_with_output().expect("trellis runs");
        let out = text(&output);
        assert!(
            output.status.success(),
            "trellis lab {command} --cluster {cluster} failed:\n{out}\nmanifest:\n{yaml}"
        );
        out
    }

    /// `trellis lab apply --cluster <cluster> -f -`.
    pub fn apply(&self, cluster: &str, yaml: &str) -> String {
        self.kubectl("apply", cluster, yaml)
    }

    /// `trellis lab delete --cluster <cluster> -f -`.
    pub fn delete(&self, cluster: &str, yaml: &str) -> String {
        self.kubectl("delete", cluster, yaml)
    }

    /// `trellis lab label --cluster <cluster> <target> <changes>`; must succeed.
    pub fn label(&self, cluster: &str, target: &str, changes: &[&str]) -> String {
        let mut args = vec!["label", "--cluster", cluster, target];
        args.extend_from_slice(changes);
        let output = self.trellis(&args);
        let out = text(&output);
        assert!(
            output.status.success(),
            "trellis lab {args:?} failed:\n{out}"
        );
        out
    }

    /// The pods `trellis lab apply` made, from the lab's state.
    pub fn applied_pods(&self) -> Vec<ModelPod> {
        let state = self.state();
        let mut pods = Vec::new();
        for cluster in state["clusters"].as_array().expect("clusters") {
            let cluster_name = cluster["name"].as_str().expect("name");
            let Some(applied) = cluster["objects"]["pods"].as_object() else {
                continue;
            };
            for pod in applied.values() {
                pods.push(ModelPod {
                    name: PodName::new(
                        cluster_name,
                        pod["spec"]["namespace"].as_str().expect("namespace"),
                        pod["spec"]["name"].as_str().expect("name"),
                    ),
                    node: format!("{cluster_name}/{}", pod["node"].as_str().expect("node")),
                    netns: pod["netns"].as_str().expect("netns").to_string(),
                    address: pod["address"]
                        .as_str()
                        .expect("an applied pod has an address")
                        .parse()
                        .expect("an IPv4 address"),
                });
            }
        }
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods
    }

    /// `GET /status` of `cluster`'s controller (on its first node), as JSON.
    pub fn controller_status(&self, cluster: &str) -> serde_json::Value {
        let node = self.node(&format!("{cluster}/node-0"));
        let body = crate::mesh::http_get(
            &node.netns,
            SocketAddr::new(node.address.into(), CONTROLLER_STATUS_PORT),
            "/status",
            Duration::from_secs(2),
        )
        .unwrap_or_else(|e| panic!("{cluster}'s controller /status: {e}"));
        serde_json::from_str(&body).expect("the controller's /status is JSON")
    }

    /// Waits until every controller streams policy inputs holding every pod of the lab (its
    /// own and its peer clusters'), so that a policy applied next can select any of them.
    /// Peer clusters' pods arrive over peering, which no `apply` waits for. Returns at once
    /// for controllers that enforce no policy.
    pub fn wait_for_every_pod_in_policy(&self) {
        let pods = self.pods().len() + self.applied_pods().len();
        let clusters: Vec<String> = self.state()["clusters"]
            .as_array()
            .expect("clusters")
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_string())
            .collect();
        for cluster in clusters {
            trellis_test_support::eventually(
                &format!("{cluster}'s controller to hold all {pods} pods in its policy inputs"),
                Duration::from_secs(20),
                || {
                    let status = self.controller_status(&cluster);
                    match status["policy"]["endpoints"].as_u64() {
                        None if status["policy"].is_null() => Some(()),
                        Some(n) if n as usize >= pods => Some(()),
                        _ => None,
                    }
                },
            );
        }
    }

    /// The policy inputs `cluster`'s nodes enforce now: its first node's gateway's stored
    /// plan, once that holds the digest its controller streams.
    pub fn policy_inputs(&self, cluster: &str) -> trellis_core::policy::PolicyInputs {
        let node = self.node(&format!("{cluster}/node-0"));
        let plan = self
            .state_dir()
            .join("nodes")
            .join(&node.netns)
            .join("gateway")
            .join("last-plan.json");
        trellis_test_support::eventually(
            &format!(
                "{}'s stored policy inputs to be its controller's",
                node.name
            ),
            Duration::from_secs(10),
            || {
                let digest = self.controller_status(cluster)["policy"]["digest"]
                    .as_str()?
                    .to_string();
                let stored: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&plan).ok()?).ok()?;
                let inputs: trellis_core::policy::PolicyInputs =
                    serde_json::from_value(stored["policy"]["inputs"].clone()).ok()?;
                (inputs.digest() == digest).then_some(inputs)
            },
        )
    }

    /// The model's pods (x, y and z's a, b and c) in every cluster.
    pub fn model_pods(&self) -> Vec<ModelPod> {
        self.applied_pods()
            .into_iter()
            .filter(|p| NAMESPACES.contains(&p.name.namespace.as_str()))
            .filter(|p| PODS.contains(&p.name.name.as_str()))
            .collect()
    }
}

/// Which ordered pairs of pods may connect on one port and protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    pub pods: Vec<PodName>,
    /// By (client, server); loopback pairs are not in it (a pod always reaches itself).
    pub allowed: BTreeMap<(PodName, PodName), bool>,
}

impl Reachability {
    /// Every pair as `allowed(client, server)` says.
    pub fn from_fn(pods: &[PodName], allowed: impl Fn(&PodName, &PodName) -> bool) -> Self {
        let mut table = BTreeMap::new();
        for from in pods {
            for to in pods.iter().filter(|to| *to != from) {
                table.insert((from.clone(), to.clone()), allowed(from, to));
            }
        }
        Self {
            pods: pods.to_vec(),
            allowed: table,
        }
    }

    pub fn all(pods: &[PodName], allowed: bool) -> Self {
        Self::from_fn(pods, |_, _| allowed)
    }

    /// The pairs where `self` and `other` differ.
    pub fn differences(&self, other: &Reachability) -> Vec<(PodName, PodName)> {
        self.allowed
            .iter()
            .filter(|(pair, allowed)| other.allowed.get(*pair) != Some(*allowed))
            .map(|(pair, _)| pair.clone())
            .collect()
    }

    fn label(&self, pod: &PodName) -> String {
        let clusters = self
            .pods
            .iter()
            .map(|p| &p.cluster)
            .collect::<std::collections::BTreeSet<_>>();
        if clusters.len() > 1 {
            pod.to_string()
        } else {
            pod.short()
        }
    }

    /// The table as upstream prints it: a row per client, a column per server, `.` for
    /// allowed, `X` for denied, `-` for the pod itself; with `mark`, only the differing
    /// cells are marked (`X`) and the rest are `.`.
    pub fn render(&self, mark: Option<&[(PodName, PodName)]>) -> String {
        let width = self
            .pods
            .iter()
            .map(|p| self.label(p).len())
            .max()
            .unwrap_or(1);
        let mut out = format!("{:width$}", "");
        for to in &self.pods {
            let _ = write!(out, " {:>width$}", self.label(to));
        }
        out.push('\n');
        for from in &self.pods {
            let _ = write!(out, "{:width$}", self.label(from));
            for to in &self.pods {
                let cell = if from == to {
                    "-"
                } else {
                    let pair = (from.clone(), to.clone());
                    match mark {
                        Some(wrong) if wrong.contains(&pair) => "X",
                        Some(_) => ".",
                        None if self.allowed[&pair] => ".",
                        None => "X",
                    }
                };
                let _ = write!(out, " {cell:>width$}");
            }
            out.push('\n');
        }
        out
    }
}

/// Probes every ordered pair of `pods` (but a pod and itself) on `port`/`transport`, all at
/// once; pairs that disagree with `expected` are probed once more with a longer wait.
pub fn probe_table(
    pods: &[ModelPod],
    port: u16,
    transport: Transport,
    expected: &Reachability,
) -> Reachability {
    let pairs: Vec<(&ModelPod, &ModelPod)> = pods
        .iter()
        .flat_map(|from| {
            pods.iter()
                .filter(move |to| to.name != from.name)
                .map(move |to| (from, to))
        })
        .collect();
    let probes = |pairs: &[(&ModelPod, &ModelPod)], timeout| {
        let probes: Vec<Probe> = pairs
            .iter()
            .map(|(from, to)| Probe {
                netns: from.netns.clone(),
                to: SocketAddr::new(to.address.into(), port),
                transport,
            })
            .collect();
        probe_all(&probes, timeout)
    };
    let outcomes = probes(&pairs, DENIED_AFTER);
    let names: Vec<PodName> = pods.iter().map(|p| p.name.clone()).collect();
    let mut observed = Reachability::all(&names, false);
    for ((from, to), outcome) in pairs.iter().zip(&outcomes) {
        assert_usable(outcome, from, to);
        observed
            .allowed
            .insert((from.name.clone(), to.name.clone()), outcome.connected());
    }
    let again: Vec<(&ModelPod, &ModelPod)> = pairs
        .iter()
        .filter(|(from, to)| {
            let pair = (from.name.clone(), to.name.clone());
            expected.allowed.get(&pair) != observed.allowed.get(&pair)
        })
        .copied()
        .collect();
    if !again.is_empty() {
        for ((from, to), outcome) in again.iter().zip(probes(&again, RETRY_AFTER)) {
            assert_usable(&outcome, from, to);
            observed
                .allowed
                .insert((from.name.clone(), to.name.clone()), outcome.connected());
        }
    }
    observed
}

/// A probe that could not even be made (no namespace, no SCTP) says nothing about policy.
fn assert_usable(outcome: &Outcome, from: &ModelPod, to: &ModelPod) {
    if let Outcome::Failed(why) = outcome {
        panic!(
            "probe {} -> {} could not be made: {why}",
            from.name, to.name
        );
    }
}

/// Probes the table for `port`/`transport` and fails the test, showing the expected and the
/// observed tables and where they differ, unless they agree.
pub fn check(
    case: &str,
    pods: &[ModelPod],
    port: u16,
    transport: Transport,
    expected: &Reachability,
) {
    let observed = probe_table(pods, port, transport, expected);
    assert_tables_agree(
        &format!("case {case:?}, {port}/{transport}"),
        ("expected", expected),
        ("observed", &observed),
    );
}

/// Fails the test unless the two tables agree, showing both and the differing cells (as
/// upstream's e2e prints them). Also for holding a hand-written table against the reference
/// evaluator's: `Reachability::evaluated(pods, |from, to| ...)`.
pub fn assert_tables_agree(what: &str, left: (&str, &Reachability), right: (&str, &Reachability)) {
    let ((left_name, left), (right_name, right)) = (left, right);
    let wrong = left.differences(right);
    if wrong.is_empty() {
        return;
    }
    let word = |table: &Reachability, pair: &(PodName, PodName)| match table.allowed.get(pair) {
        Some(true) => "allowed",
        Some(false) => "denied",
        None => "absent",
    };
    const LISTED: usize = 30;
    let mut list: Vec<String> = wrong
        .iter()
        .take(LISTED)
        .map(|pair| {
            format!(
                "{} -> {}: {left_name} {}, {right_name} {}",
                pair.0,
                pair.1,
                word(left, pair),
                word(right, pair)
            )
        })
        .collect();
    if wrong.len() > LISTED {
        list.push(format!("(and {} more)", wrong.len() - LISTED));
    }
    panic!(
        "{what}: {} of {} pairs differ\n\n{left_name} (. allowed, X denied; rows are clients):\n{}\n{right_name}:\n{}\ndiffering cells:\n{}\n{}",
        wrong.len(),
        left.allowed.len(),
        left.render(None),
        right.render(None),
        left.render(Some(&wrong)),
        list.join("\n")
    );
}

impl Reachability {
    /// A table from a judge of addresses (the reference evaluator, given each pod's address).
    pub fn evaluated(pods: &[ModelPod], allowed: impl Fn(&ModelPod, &ModelPod) -> bool) -> Self {
        let by_name: BTreeMap<&PodName, &ModelPod> = pods.iter().map(|p| (&p.name, p)).collect();
        let names: Vec<PodName> = pods.iter().map(|p| p.name.clone()).collect();
        Self::from_fn(&names, |from, to| allowed(by_name[from], by_name[to]))
    }
}

/// [`check`] for each of `ports` (`80/tcp`, `81/udp`, ...).
pub fn check_ports(
    case: &str,
    pods: &[ModelPod],
    ports: &[(u16, Transport)],
    expected: &Reachability,
) {
    for (port, transport) in ports {
        check(case, pods, *port, *transport, expected);
    }
}

/// The model as a lab made it: where the cases' checks run.
pub struct Model<'a> {
    pub lab: &'a TestLab,
    pub pods: Vec<ModelPod>,
}

impl<'a> Model<'a> {
    /// The model pods `lab` runs now (in every cluster).
    pub fn of(lab: &'a TestLab) -> Self {
        Self {
            lab,
            pods: lab.model_pods(),
        }
    }

    pub fn names(&self) -> Vec<PodName> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }

    /// [`check`]: the probes of every pair on `port`/`transport` against `expected`; and
    /// `expected` against the reference evaluator given the policy inputs the nodes enforce.
    pub fn check(&self, case: &str, port: u16, transport: Transport, expected: &Reachability) {
        check(case, &self.pods, port, transport, expected);
        let evaluated = self.evaluated(port, transport);
        assert_tables_agree(
            &format!("case {case:?}, {port}/{transport}, the reference evaluator"),
            ("expected", expected),
            ("evaluated", &evaluated),
        );
    }

    /// The table `trellis_core::policy::evaluate` gives for the policy inputs each cluster's
    /// nodes enforce now.
    pub fn evaluated(&self, port: u16, transport: Transport) -> Reachability {
        use trellis_core::policy::evaluate::{Connection, Mesh};
        let mut clusters: Vec<&str> = self.pods.iter().map(|p| p.name.cluster.as_str()).collect();
        clusters.dedup();
        let inputs: Vec<trellis_core::policy::PolicyInputs> =
            clusters.iter().map(|c| self.lab.policy_inputs(c)).collect();
        let mesh = Mesh::new(&inputs);
        let protocol = match transport {
            Transport::Tcp => trellis_core::cluster::Protocol::Tcp,
            Transport::Udp => trellis_core::cluster::Protocol::Udp,
            Transport::Sctp => trellis_core::cluster::Protocol::Sctp,
        };
        Reachability::evaluated(&self.pods, |from, to| {
            mesh.decide(&Connection {
                source: from.address.into(),
                destination: to.address.into(),
                protocol: Some(protocol),
                port,
            })
            .allowed()
        })
    }

    /// [`Model::check`] for each of `ports`.
    pub fn check_ports(&self, case: &str, ports: &[(u16, Transport)], expected: &Reachability) {
        for (port, transport) in ports {
            self.check(case, *port, *transport, expected);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<PodName> {
        NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |p| PodName::new("c1", ns, p)))
            .collect()
    }

    #[test]
    fn the_model_has_nine_pods_with_four_named_ports_each_over_the_nodes() {
        let yaml = model_yaml(&["node-0", "node-1"]);
        assert_eq!(yaml.matches("kind: Namespace").count(), 3);
        assert_eq!(yaml.matches("kind: Pod").count(), 9);
        assert_eq!(
            yaml.matches("serve-81-udp, containerPort: 81, protocol: UDP")
                .count(),
            9
        );
        assert_eq!(yaml.matches("nodeName: node-0").count(), 5);
        assert!(yaml.contains("labels: {kubernetes.io/metadata.name: y}"));
    }

    #[test]
    fn tables_leave_out_loopback_and_render_the_upstream_way() {
        let pods = names();
        let deny_x = Reachability::from_fn(&pods, |_, to| to.namespace != "x");
        assert_eq!(deny_x.allowed.len(), 72);
        assert_eq!(deny_x.allowed.values().filter(|a| !**a).count(), 24);
        let rendered = deny_x.render(None);
        let first_row = rendered.lines().nth(1).unwrap();
        assert_eq!(first_row, "x/a   -   X   X   .   .   .   .   .   .");
        let open = Reachability::all(&pods, true);
        let wrong = open.differences(&deny_x);
        assert_eq!(wrong.len(), 24);
        let marked = open.render(Some(&wrong));
        assert_eq!(
            marked.lines().nth(4).unwrap(),
            "y/a   X   X   X   -   .   .   .   .   ."
        );
    }

    #[test]
    #[should_panic(expected = "case: 1 of 72 pairs differ")]
    fn disagreeing_tables_fail_naming_the_pairs() {
        let pods = names();
        let open = Reachability::all(&pods, true);
        let one_denied = Reachability::from_fn(&pods, |from, to| {
            !(from.short() == "z/c" && to.short() == "x/a")
        });
        assert_tables_agree("case", ("expected", &open), ("observed", &open));
        assert_tables_agree("case", ("expected", &open), ("observed", &one_denied));
    }

    #[test]
    fn evaluated_tables_judge_pods_by_what_the_lab_made() {
        let pods: Vec<ModelPod> = names()
            .into_iter()
            .enumerate()
            .map(|(i, name)| ModelPod {
                name,
                node: "c1/node-0".into(),
                netns: String::new(),
                address: Ipv4Addr::new(10, 1, 0, 2 + i as u8),
            })
            .collect();
        let table =
            Reachability::evaluated(&pods, |_, to| to.address != Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(
            table,
            Reachability::from_fn(&names(), |_, to| to.short() != "x/a")
        );
    }
}
