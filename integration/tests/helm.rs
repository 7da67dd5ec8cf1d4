//! The Helm chart (`helm/trellis`) as CI checks it: `helm lint` and `helm template` for the
//! default values, a two-peer, encryption-on set and the maximal set (every workload option);
//! the manifests against Kubernetes 1.34's schemas (`kubernetes-validate --strict`; kind v0.30
//! ships 1.34, the newest both support); the values schema refusing a table of bad values; the
//! workload conventions (Linux nodes, seccomp, PodDisruptionBudgets, image digests, your own
//! ServiceAccounts) and the HA controller's wiring (leader election, RBAC) as rendered; the
//! CRDs against the controller's; the controller's configuration through the controller's own
//! parser; every container's flags through the binaries' own argument parsers; the alerts
//! through `promtool`; and the kind recipe through `shellcheck`.
//!
//! The tools come from `scripts/install-deps` (helm and kubernetes-validate into
//! target/tools, shellcheck and promtool from Debian). A test missing one skips, saying so,
//! except under `scripts/test`, where it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use trellis_integration::bin_path;

/// The Kubernetes version the manifests are validated against: kind v0.30's node image.
const KUBERNETES_VERSION: &str = "1.34.0";
const NAMESPACE: &str = "trellis-system";
const TWO_PEERS: &str = "ci/two-peers-encrypted-values.yaml";
const MAXIMAL: &str = "ci/maximal-values.yaml";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chart() -> PathBuf {
    root().join("helm/trellis")
}

/// A tool under the workspace (`scripts/install-deps` puts it there) or on PATH.
fn find_tool(name: &str) -> Option<PathBuf> {
    let local = match name {
        "helm" => Some(root().join("target/tools/helm/helm")),
        "kubernetes-validate" => Some(root().join("target/tools/venv/bin/kubernetes-validate")),
        _ => None,
    };
    if let Some(path) = local {
        return path.is_file().then_some(path);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A tool the test has checked for with `needs!`.
fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| panic!("{name} is not installed: run scripts/install-deps"))
}

/// Returns from the test, saying so, when one of the tools is missing (or fails it, under
/// `scripts/test`: see `trellis_test_support::REQUIRE_TOOLS`).
macro_rules! needs {
    ($($name:literal),+) => {
        $(
            if find_tool($name).is_none() {
                trellis_test_support::skip_for_missing_tool($name);
                return;
            }
        )+
    };
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(chart())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

/// `helm template` with extra arguments; the rendered YAML, or the failure's text.
fn template(extra: &[&str]) -> Result<String, String> {
    let mut args = vec!["template", "trellis", ".", "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    let out = run(&tool("helm"), &args);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("UTF-8 manifests"))
    } else {
        Err(text(&out))
    }
}

/// The documents of a YAML stream, as JSON values (empty documents dropped); a mapping with
/// a key twice fails (YAML parsers keep one silently, the API server may refuse it).
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    for doc in serde_norway::Deserializer::from_str(yaml) {
        if let Err(e) = NoDuplicateKeys::deserialize(doc) {
            panic!("rendered YAML: {e}");
        }
    }
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Walks a document, failing on a mapping that has a key twice.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        serde::Deserialize::deserialize(d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = std::collections::BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "key {key:?} appears twice"
                )));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(NoDuplicateKeys)
    }
}

#[test]
fn a_key_twice_in_the_rendered_yaml_is_caught() {
    let ok = "a:\n  b: 1\n  c: [x, {d: 2}]\n---\ne: f\n";
    assert_eq!(documents(ok).len(), 2);
    let twice = "metadata:\n  labels:\n    app: x\n    app: y\n";
    let caught = std::panic::catch_unwind(|| documents(twice));
    assert!(caught.is_err(), "a duplicate label went through");
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

/// `kubernetes-validate --strict` of a file for [`KUBERNETES_VERSION`].
fn kubernetes_validate(path: &Path) -> Output {
    let path = path.to_str().expect("UTF-8 path");
    run(
        &tool("kubernetes-validate"),
        &[
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
            path,
        ],
    )
}

fn value_sets() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("default values", vec![]),
        ("two peers, encryption on", vec!["-f", TWO_PEERS]),
        (
            "agent TLS with your own agent CA",
            vec![
                "-f",
                TWO_PEERS,
                "--set",
                "agent.tls.secretName=trellis-agent-tls",
            ],
        ),
        (
            "the deprecated plaintext token",
            vec!["--set", "agent.legacyToken.enabled=true"],
        ),
        (
            "flows off",
            vec!["-f", TWO_PEERS, "--set", "flows.enabled=false"],
        ),
        (
            "the largest flow buffer, another flows port",
            vec![
                "-f",
                TWO_PEERS,
                "--set",
                "flows.bufferSize=1000000",
                "--set",
                "flows.listen=127.0.0.1:14245",
            ],
        ),
        ("maximal values", vec!["-f", MAXIMAL]),
        (
            "one controller, Recreate, gateways on delete, no priority classes",
            vec![
                "--set",
                "controller.replicas=1",
                "--set",
                "controller.strategy.type=Recreate",
                "--set",
                "gateway.updateStrategy.type=OnDelete",
                "--set",
                "controller.priorityClassName=",
                "--set",
                "gateway.priorityClassName=",
                "--set",
                "dns.priorityClassName=",
            ],
        ),
    ]
}

#[test]
fn lint_and_template_pass_and_validate_strictly_for_kubernetes_1_34() {
    needs!("helm", "kubernetes-validate");
    let helm = tool("helm");
    let dir = tempfile::tempdir().unwrap();
    for (what, extra) in value_sets() {
        let mut lint = vec!["lint", ".", "--strict"];
        lint.extend_from_slice(&extra);
        let out = run(&helm, &lint);
        assert!(out.status.success(), "helm lint ({what}): {}", text(&out));

        let yaml = template(&extra).unwrap_or_else(|e| panic!("helm template ({what}): {e}"));
        let path = dir.path().join("manifests.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let out = kubernetes_validate(&path);
        let report = text(&out);
        assert!(
            out.status.success(),
            "kubernetes-validate ({what}): {report}"
        );
        // Only the Prometheus Operator's kinds have no schema here; promtool checks the
        // rules and the test below the ServiceMonitor's selection.
        for line in report.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                line.starts_with("WARN")
                    && (line.contains("kind PrometheusRule")
                        || line.contains("kind ServiceMonitor")),
                "kubernetes-validate ({what}) said: {line}"
            );
        }
        // NOTES.txt (which `helm template` leaves out) renders and says how to check.
        let mut install = vec![
            "install",
            "trellis",
            ".",
            "--namespace",
            NAMESPACE,
            "--dry-run=client",
        ];
        install.extend_from_slice(&extra);
        let out = Command::new(&helm)
            .args(&install)
            .env("KUBECONFIG", "/dev/null")
            .current_dir(chart())
            .output()
            .unwrap();
        let notes = text(&out);
        assert!(
            out.status.success(),
            "helm install --dry-run ({what}): {notes}"
        );
        for wanted in [
            "NOTES:",
            "/status",
            "trellis status",
            "clusterset.local:53 {",
            "trellis observe --controller 127.0.0.1:",
        ] {
            assert!(
                notes.contains(wanted),
                "NOTES ({what}) lack {wanted:?}: {notes}"
            );
        }
        let docs = documents(&yaml);
        for kind in [
            "DaemonSet",
            "Deployment",
            "ConfigMap",
            "ClusterRole",
            "Role",
        ] {
            assert!(
                docs.iter().any(|d| d["kind"] == kind),
                "{what}: no {kind} rendered"
            );
        }
    }
    // The CRDs the chart installs are valid too.
    let out = kubernetes_validate(&chart().join("crds/trellis-crds.yaml"));
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "{}",
        text(&out)
    );
}

#[test]
fn the_schema_and_the_chart_refuse_bad_values_saying_which_and_why() {
    needs!("helm");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--set", "cluster.id=East"],
            "at '/cluster/id': 'East' does not match pattern",
        ),
        (&["--set", "cluster.id=-east"], "at '/cluster/id'"),
        (
            &[
                "--set",
                "cluster.id=a-cluster-id-that-is-far-too-long-to-be-a-dns-label-in-any-mesh-x",
            ],
            "at '/cluster/id': maxLength",
        ),
        (
            &["--set", "encryption.node=yes"],
            "at '/encryption/node': got string, want boolean",
        ),
        (&["--set", "mtu=100"], "at '/mtu': minimum"),
        (
            &[
                "--set",
                "agent.tls.secretName=trellis-agent-tls",
                "--set",
                "agent.legacyToken.enabled=true",
            ],
            "agent.tls.secretName and agent.legacyToken.enabled exclude each other",
        ),
        // The token's old place: the token is no longer the default, nor set by accident.
        (
            &["--set", "agent.existingSecret=trellis-agent-token"],
            "at '/agent': additional properties 'existingSecret' not allowed",
        ),
        (&["--set", "mtu=65000"], "at '/mtu': maximum"),
        (
            &["--set", "flows.bufferSize=0"],
            "at '/flows/bufferSize': minimum",
        ),
        (
            &["--set", "flows.bufferSize=1000001"],
            "at '/flows/bufferSize': maximum",
        ),
        (
            &["--set", "flows.bufferSize=4k"],
            "at '/flows/bufferSize': got string, want integer",
        ),
        (
            &["--set-json", "flows.bufferSize=1.5"],
            "at '/flows/bufferSize': got number, want integer",
        ),
        (
            &["--set", "flows.enabled=yes"],
            "at '/flows/enabled': got string, want boolean",
        ),
        (
            &["--set", "flows.listen=localhost:4245"],
            "at '/flows/listen': 'localhost:4245' does not match pattern",
        ),
        (
            &["--set", "flows.ring=100"],
            "at '/flows': additional properties 'ring' not allowed",
        ),
        (
            &["--set", "peers[0].endpoint=172.18.0.5:30743"],
            "at '/peers/0': missing property 'id'",
        ),
        (
            &[
                "--set",
                "peers[0].id=c2",
                "--set",
                "peers[0].endpoint=c2.example:7443",
            ],
            "at '/peers/0/endpoint': 'c2.example:7443' does not match pattern",
        ),
        (
            &["--set", "peers[0].id=c2", "--set", "peers[0].name=west"],
            "at '/peers/0': additional properties 'name' not allowed",
        ),
        (
            &["--set", "encrytion.node=true"],
            "additional properties 'encrytion' not allowed",
        ),
        (
            &["--set", "peering.service.type=ClusterIP"],
            "at '/peering/service/type': value must be one of 'NodePort', 'LoadBalancer'",
        ),
        (
            &["--set", "peering.service.nodePort=80"],
            "at '/peering/service/nodePort': minimum",
        ),
        (
            &["--set", "cluster.serviceCIDRs[0]=10.96.0.0"],
            "at '/cluster/serviceCIDRs/0'",
        ),
        (
            &["--set", "cni.portmap=maybe"],
            "at '/cni/portmap': value must be one of 'auto', 'on', 'off'",
        ),
        (
            &["--set", "image.pullPolicy=Sometimes"],
            "at '/image/pullPolicy'",
        ),
        (
            &["--set", "gateway.interface=a-name-longer-than-15"],
            "at '/gateway/interface'",
        ),
        (
            &["--set", "tls.secretName="],
            "at '/tls/secretName': minLength",
        ),
        // The workload conventions and the HA controller.
        (
            &["--set", "image.digest=sha256:abc"],
            "at '/image/digest': 'sha256:abc' does not match pattern",
        ),
        (
            &[
                "--set",
                "image.digest=4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945",
            ],
            "at '/image/digest'",
        ),
        (
            &["--set", "controller.replicas=0"],
            "at '/controller/replicas': minimum: got 0, want 1",
        ),
        (
            &["--set", "dns.replicas=0"],
            "at '/dns/replicas': minimum: got 0, want 1",
        ),
        (
            &["--set", "controller.replica=2"],
            "at '/controller': additional properties 'replica' not allowed",
        ),
        (
            &["--set", "gateway.serviceAccount.create=no"],
            "at '/gateway/serviceAccount/create': got string, want boolean",
        ),
        (
            &["--set", "controller.serviceAccount.name=Mesh_Controller"],
            "at '/controller/serviceAccount/name': 'Mesh_Controller' does not match pattern",
        ),
        (
            &["--set", "controller.strategy.type=Surge"],
            "at '/controller/strategy/type': value must be one of 'RollingUpdate', 'Recreate'",
        ),
        // A surge gateway would bind the same host ports as the one it replaces.
        (
            &["--set", "gateway.updateStrategy.rollingUpdate.maxSurge=1"],
            "at '/gateway/updateStrategy/rollingUpdate': additional properties 'maxSurge' not allowed",
        ),
        (
            &["--set", "dns.podDisruptionBudget.minAvailable=150%"],
            "at '/dns/podDisruptionBudget/minAvailable'",
        ),
        (
            &["--set-json", "gateway.extraArgs=[\"--workers\", 2]"],
            "at '/gateway/extraArgs/1': got number, want string",
        ),
        (
            &["--set-json", "dns.extraEnv=[{\"value\": \"1\"}]"],
            "at '/dns/extraEnv/0': missing property 'name'",
        ),
        (
            &["--set", "controller.podLabels.tier=1"],
            "at '/controller/podLabels/tier': got number, want string",
        ),
        (
            &["--set", "controller.leaderElection.leaseDurationSeconds=0"],
            "at '/controller/leaderElection/leaseDurationSeconds': minimum",
        ),
        // What JSON Schema cannot say, the chart does.
        (
            &["--set", "cluster.id=c1", "--set", "peers[0].id=c1"],
            "peers: c1 is this cluster itself (cluster.id)",
        ),
        (
            &["--set", "peers[0].id=c2", "--set", "peers[1].id=c2"],
            "peers: c2 is listed twice",
        ),
        (
            &[
                "--set",
                "peering.leaseSeconds=9",
                "--set",
                "peering.heartbeatSeconds=5",
            ],
            "peering.leaseSeconds (9) must be at least twice peering.heartbeatSeconds (5)",
        ),
        (
            &["--set", "controller.leaderElection.renewDeadlineSeconds=15"],
            "controller.leaderElection: leaseDurationSeconds (15) must exceed renewDeadlineSeconds (15)",
        ),
        (
            &[
                "--set",
                "dns.replicas=2",
                "--set",
                "dns.podDisruptionBudget.minAvailable=2",
            ],
            "dns.podDisruptionBudget.minAvailable (2) must be below dns.replicas (2): no pod could ever be evicted",
        ),
        (
            &[
                "--set-json",
                "controller.podDisruptionBudget.maxUnavailable=null",
            ],
            "controller.podDisruptionBudget: set minAvailable or maxUnavailable",
        ),
        (
            &[
                "--set",
                "gateway.serviceAccount.name=mesh-agents",
                "--set",
                "dns.serviceAccount.name=mesh-agents",
            ],
            "gateway.serviceAccount.name and dns.serviceAccount.name are both mesh-agents",
        ),
    ];
    let mut failures = Vec::new();
    for (args, want) in cases {
        match template(args) {
            Ok(_) => failures.push(format!("{args:?} rendered")),
            Err(e) if e.contains(want) => {}
            Err(e) => failures.push(format!("{args:?}: wanted {want:?}, got: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The same keys with good values render.
    template(&[
        "--set",
        "cluster.id=east-1",
        "--set",
        "peers[0].id=west",
        "--set",
        "peers[0].endpoint=[fd00::5]:30743",
        "--set",
        "cluster.serviceCIDRs[0]=10.96.0.0/16",
        "--set",
        "peering.leaseSeconds=10",
        "--set",
        "peering.heartbeatSeconds=5",
    ])
    .unwrap();
}

#[test]
fn the_charts_crds_are_the_controllers() {
    let chart_crds = std::fs::read_to_string(chart().join("crds/trellis-crds.yaml")).unwrap();
    let controller_crds =
        std::fs::read_to_string(root().join("mesh-controller/crds/trellis-crds.yaml")).unwrap();
    assert!(
        chart_crds == controller_crds,
        "helm/trellis/crds/trellis-crds.yaml differs from mesh-controller/crds/trellis-crds.yaml \
         (which a test keeps equal to the types): copy it over"
    );
}

/// The chart's controller.yaml through the controller's own parser.
fn controller_config(yaml: &str) -> Result<trellis_controller::config::Config, String> {
    trellis_controller::config::Config::parse(yaml).map_err(|e| e.to_string())
}

fn config_map_data(docs: &[Value]) -> (String, k8s_openapi::api::core::v1::ConfigMap) {
    let cm = find(docs, "ConfigMap", "trellis-controller");
    let yaml = cm["data"]["controller.yaml"].as_str().unwrap().to_string();
    (yaml, serde_json::from_value(cm.clone()).unwrap())
}

#[test]
fn the_controller_reads_its_configuration_and_its_runtime_switch() {
    needs!("helm");
    use trellis_controller::config::SourceConfig;
    let docs = documents(&template(&["-f", TWO_PEERS]).unwrap());
    let (yaml, cm) = config_map_data(&docs);
    let cfg = controller_config(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(cfg.cluster_id.as_ref().map(|c| c.as_str()), Some("c1"));
    assert_eq!(cfg.cluster_name.as_deref(), Some("East"));
    assert_eq!(cfg.peers.len(), 2);
    assert_eq!(
        cfg.peers[0].endpoint,
        Some("172.18.0.5:30743".parse().unwrap())
    );
    assert_eq!(cfg.peers[1].endpoint, None);
    // What each peer may claim, and the per-peer quotas.
    assert_eq!(
        cfg.peers[0].allowance(),
        Some(vec![
            "10.12.0.0/16".parse().unwrap(),
            "10.112.0.0/16".parse().unwrap()
        ])
    );
    assert_eq!(
        cfg.peers[1].allowance(),
        None,
        "only its certificate speaks for c3"
    );
    assert_eq!(cfg.peer_limits, Default::default());
    assert!(cfg.node_encryption);
    assert!(cfg.network_policy, "NetworkPolicy is on by default");
    assert_eq!(cfg.service_cidrs, vec!["10.96.0.0/16".parse().unwrap()]);
    // The settings ConfigMap the controller watches is this one, and says the same.
    assert_eq!(
        cfg.source,
        SourceConfig::Kubernetes {
            settings_namespace: NAMESPACE.into(),
            settings_config_map: "trellis-controller".into(),
        }
    );
    assert_eq!(
        trellis_controller::kube_settings::node_encryption_of(&cm),
        Ok(Some(true))
    );
    // Every file the configuration names is mounted into the controller.
    let pod = &find(&docs, "Deployment", "trellis-controller")["spec"]["template"]["spec"];
    let mounts: Vec<&str> = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    let mut files = vec![&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key];
    files.extend(cfg.agent_token_file.as_ref());
    files.extend(cfg.state_file.as_ref());
    for file in files {
        assert!(
            mounts.iter().any(|m| file.starts_with(m)),
            "{} is in no mount of {mounts:?}",
            file.display()
        );
    }
    // Agent TLS is the default, with no cluster ID and no certificate step: the chart's agent
    // CA (ca.pem and its key) mounted into the controller only, which issues its own agent
    // certificate into its state directory, node certificates to the gateways' ServiceAccount
    // and DNS's identity to DNS's; gateways and DNS get the CA certificate alone and a token
    // for the trellis-agent audience; no token Secret anywhere.
    for (what, extra, ca_secret) in [
        ("default values", vec![], "trellis-agent-ca"),
        (
            "your own agent CA",
            vec![
                "-f",
                TWO_PEERS,
                "--set",
                "agent.tls.secretName=trellis-agent-tls",
            ],
            "trellis-agent-tls",
        ),
    ] {
        let docs = documents(&template(&extra).unwrap());
        let (yaml, _) = config_map_data(&docs);
        let cfg = controller_config(&yaml).unwrap_or_else(|e| panic!("{what}: {e}\n{yaml}"));
        assert!(cfg.agent_token_file.is_none(), "{what}");
        let (ca, cert, key, self_issued) = cfg.agent_tls_files().expect("agentTls");
        assert!(
            self_issued,
            "{what}: the controller issues its own agent certificate"
        );
        let bootstrap = cfg.node_bootstrap.as_ref().expect("nodeBootstrap");
        assert_eq!(
            bootstrap.service_account(),
            Some((NAMESPACE.to_owned(), "trellis-gateway".to_owned()))
        );
        assert_eq!(
            bootstrap.dns_service_account(),
            Some((NAMESPACE.to_owned(), "trellis-dns".to_owned()))
        );
        let pod = &find(&docs, "Deployment", "trellis-controller")["spec"]["template"]["spec"];
        let mounts: Vec<(&str, bool)> = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap(),
                    m["readOnly"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        for (file, writable) in [
            (&ca, false),
            (&bootstrap.ca_key, false),
            (&cert, true),
            (&key, true),
        ] {
            assert!(
                mounts
                    .iter()
                    .any(|(m, ro)| file.starts_with(m) && (!writable || !ro)),
                "{what}: {} is in no {} mount of {mounts:?}",
                file.display(),
                if writable { "writable" } else { "" }
            );
        }
        let items = |spec: &Value, volume: &str| -> (String, Vec<String>) {
            let v = spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == volume)
                .unwrap_or_else(|| panic!("{what}: no volume {volume}"));
            (
                v["secret"]["secretName"].as_str().unwrap().to_owned(),
                v["secret"]["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i["key"].as_str().unwrap().to_owned())
                    .collect(),
            )
        };
        assert_eq!(
            items(pod, "agent-ca"),
            (
                ca_secret.to_owned(),
                vec!["ca.pem".into(), "ca-key.pem".into()]
            )
        );
        for (kind, name, account) in [
            ("DaemonSet", "trellis-gateway", "trellis-gateway"),
            ("Deployment", "trellis-dns", "trellis-dns"),
        ] {
            let spec = &find(&docs, kind, name)["spec"]["template"]["spec"];
            assert_eq!(spec["serviceAccountName"], account);
            assert_eq!(
                items(spec, "agent-ca"),
                (ca_secret.to_owned(), vec!["ca.pem".into()]),
                "{what}: {name} gets the CA certificate, never its key"
            );
            let identity = spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "agent-identity")
                .expect("the agent token volume");
            assert_eq!(
                identity["projected"]["sources"][0]["serviceAccountToken"]["audience"],
                "trellis-agent"
            );
            let command = spec["containers"][0]["command"].to_string();
            assert!(command.contains("--agent-bootstrap-token="), "{command}");
            assert!(!command.contains("token-file"), "{command}");
            // The cluster ID pins the controller only when the chart knows it.
            assert_eq!(
                command.contains("--cluster-id="),
                cfg.cluster_id.is_some(),
                "{what}: {command}"
            );
        }
        let rendered = serde_json::to_string(&docs).unwrap();
        assert!(!rendered.contains("agent-token"), "{what}");
        assert!(!rendered.contains("agentTokenFile"), "{what}");
        // The chart makes the CA only when none is given.
        assert_eq!(
            docs.iter()
                .any(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "trellis-agent-ca"),
            ca_secret == "trellis-agent-ca",
            "{what}"
        );
    }
    // The deprecated token only when asked for, everywhere at once.
    let docs = documents(&template(&["--set", "agent.legacyToken.enabled=true"]).unwrap());
    let (yaml, _) = config_map_data(&docs);
    let cfg = controller_config(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert!(cfg.agent_tls.is_none() && cfg.node_bootstrap.is_none());
    assert!(cfg.agent_token_file.is_some());
    find(&docs, "Secret", "trellis-agent-token");
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "trellis-agent-ca")
    );
    // Default values: no ID (the ClusterProperty gives it), nobody to peer with, off.
    let (yaml, cm) = config_map_data(&documents(&template(&[]).unwrap()));
    let cfg = controller_config(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(cfg.cluster_id, None);
    assert!(cfg.peers.is_empty() && !cfg.node_encryption);
    assert_eq!(
        trellis_controller::kube_settings::node_encryption_of(&cm),
        Ok(Some(false))
    );
}

fn pod_annotations(docs: &[Value], kind: &str, name: &str) -> BTreeMap<String, String> {
    serde_json::from_value(
        find(docs, kind, name)["spec"]["template"]["metadata"]["annotations"].clone(),
    )
    .unwrap_or_default()
}

#[test]
fn switching_encryption_restarts_nothing_but_other_changes_restart_the_controller() {
    needs!("helm");
    let off = documents(&template(&["--set", "cluster.id=c1"]).unwrap());
    let on =
        documents(&template(&["--set", "cluster.id=c1", "--set", "encryption.node=true"]).unwrap());
    let other =
        documents(&template(&["--set", "cluster.id=c1", "--set", "peers[0].id=c2"]).unwrap());
    for (kind, name) in [
        ("Deployment", "trellis-controller"),
        ("DaemonSet", "trellis-gateway"),
        ("Deployment", "trellis-dns"),
    ] {
        assert_eq!(
            find(&off, kind, name)["spec"]["template"],
            find(&on, kind, name)["spec"]["template"],
            "{kind} {name}'s pods would be replaced by an encryption switch"
        );
    }
    let (off_yaml, _) = config_map_data(&off);
    let (on_yaml, on_cm) = config_map_data(&on);
    assert_ne!(off_yaml, on_yaml, "the file says the new mode too");
    assert_eq!(
        trellis_controller::kube_settings::node_encryption_of(&on_cm),
        Ok(Some(true))
    );
    let checksum = |docs: &[Value]| {
        pod_annotations(docs, "Deployment", "trellis-controller")["checksum/config"].clone()
    };
    assert_ne!(
        checksum(&off),
        checksum(&other),
        "a new peer restarts the controller"
    );
}

/// The value Kubernetes would give `$(VAR)` in a container's command, for a sample node.
fn expand(arg: &str) -> String {
    arg.replace("$(NODE_NAME)", "east-worker")
        .replace("$(HOST_IP)", "172.18.0.3")
        .replace("$(TRELLIS_CONTROLLER_SERVICE_HOST)", "10.96.12.34")
        .replace("$(TRELLIS_CONTROLLER_SERVICE_PORT_AGENT)", "7444")
}

#[test]
fn every_container_runs_a_real_command_with_real_flags() {
    needs!("helm");
    for (what, extra) in value_sets() {
        let docs = documents(&template(&extra).unwrap());
        let mut checked = 0;
        for doc in docs
            .iter()
            .filter(|d| d["kind"] == "DaemonSet" || d["kind"] == "Deployment")
        {
            let spec = &doc["spec"]["template"]["spec"];
            let env_names: Vec<String> = ["containers", "initContainers"]
                .iter()
                .flat_map(|k| spec[k].as_array().cloned().unwrap_or_default())
                .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
                .filter_map(|e| e["name"].as_str().map(String::from))
                .collect();
            for container in ["containers", "initContainers"]
                .iter()
                .flat_map(|k| spec[k].as_array().cloned().unwrap_or_default())
            {
                let command: Vec<String> = container["command"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{what}: {} has no command", container["name"]))
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect();
                // Every $(VAR) is one the pod defines or a Service variable of the controller.
                for arg in &command {
                    for var in arg.split("$(").skip(1).filter_map(|s| s.split(')').next()) {
                        assert!(
                            env_names.iter().any(|e| e == var)
                                || var.starts_with("TRELLIS_CONTROLLER_SERVICE_"),
                            "{what}: $({var}) in {} is not defined",
                            container["name"]
                        );
                    }
                }
                // The binary's own parser takes every flag and value (clap checks them all
                // before it answers --help).
                let expanded: Vec<String> = command[1..].iter().map(|a| expand(a)).collect();
                let out = Command::new(bin_path(&command[0]))
                    .args(&expanded)
                    .arg("--help")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{what}: {} {expanded:?}: {}",
                    command[0],
                    text(&out)
                );
                // The image has the binary, and the plugin the CNI installer copies.
                let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
                let mut shipped = vec![command[0].clone()];
                shipped.extend(
                    command
                        .iter()
                        .filter_map(|a| a.strip_prefix("--plugin=/usr/local/bin/"))
                        .map(String::from),
                );
                for binary in shipped {
                    assert!(
                        dockerfile.contains(&format!("target/release/{binary} "))
                            && dockerfile.contains(&format!("-p {binary} ")),
                        "the Dockerfile does not build and ship {binary}"
                    );
                }
                checked += 1;
            }
        }
        assert!(checked >= 4, "{what}: only {checked} containers");
    }
}

#[test]
fn every_pod_is_scraped_and_the_service_monitor_selects_every_metrics_port() {
    needs!("helm");
    let docs = documents(&template(&["-f", TWO_PEERS]).unwrap());
    for (kind, name) in [
        ("Deployment", "trellis-controller"),
        ("DaemonSet", "trellis-gateway"),
        ("Deployment", "trellis-dns"),
    ] {
        let annotations = pod_annotations(&docs, kind, name);
        assert_eq!(
            annotations.get("prometheus.io/scrape").map(String::as_str),
            Some("true")
        );
        let port: u16 = annotations["prometheus.io/port"].parse().unwrap();
        let container = &find(&docs, kind, name)["spec"]["template"]["spec"]["containers"][0];
        assert!(
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "metrics" && p["containerPort"] == port),
            "{name}: prometheus.io/port {port} is not its metrics port"
        );
    }
    let monitor = docs.iter().find(|d| d["kind"] == "ServiceMonitor").unwrap();
    let selector: BTreeMap<String, String> =
        serde_json::from_value(monitor["spec"]["selector"]["matchLabels"].clone()).unwrap();
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
    let selected: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Service")
        .filter(|d| {
            selector
                .iter()
                .all(|(k, v)| d["metadata"]["labels"][k].as_str() == Some(v.as_str()))
        })
        .collect();
    let mut names: Vec<&str> = selected
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "trellis-controller-metrics",
            "trellis-dns",
            "trellis-gateway-metrics"
        ],
        "every controller replica, gateways and DNS"
    );
    for service in selected {
        assert!(
            service["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == port),
            "{} has no port {port}",
            service["metadata"]["name"]
        );
    }
}

/// The names `trellis_*` a PromQL expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("trellis_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// A metric name appears in its component's source, whole or as the suffix its `name()`
/// helper prefixes (histograms without their _bucket/_sum/_count).
fn metric_exists(name: &str) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    let (dir, prefix) = if base.starts_with("trellis_controller_") {
        ("mesh-controller/src", "trellis_controller_")
    } else if base.starts_with("trellis_gateway_") {
        ("gateway/src", "trellis_gateway_")
    } else if base.starts_with("trellis_dns_") {
        ("dns/src", "trellis_dns_")
    } else if base.starts_with("trellis_flows_") {
        // The flow recorder's, in the gateway, named whole (no `trellis_gateway_`).
        ("gateway/src", "")
    } else {
        return false;
    };
    let short = &base[prefix.len()..];
    let wanted = [format!("\"{base}\""), format!("\"{short}\"")];
    source_files(&root().join(dir)).iter().any(|path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        wanted.iter().any(|w| text.contains(w.as_str()))
    })
}

/// Every file under `dir`, subdirectories included.
fn source_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn alerts_pass_promtool_and_alerts_and_dashboard_use_real_metrics() {
    needs!("helm", "promtool");
    let docs = documents(&template(&["-f", TWO_PEERS]).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (rules, spec) = rules_file(&docs, dir.path());
    let out = Command::new(tool("promtool"))
        .args(["check", "rules", rules.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "promtool: {}", text(&out));
    let alerts: Vec<&Value> = spec["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let alert_names: Vec<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    for wanted in [
        "TrellisPeerDown",
        "TrellisHandshakeStale",
        "TrellisRemoteClusterNotSynced",
        "TrellisPolicyDropsSurge",
    ] {
        assert!(alert_names.contains(&wanted), "{alert_names:?}");
    }
    let mut exprs: Vec<String> = alerts
        .iter()
        .map(|a| a["expr"].as_str().unwrap().to_string())
        .collect();
    // Remote peers only: this cluster's own peers handshake only under traffic.
    assert!(
        exprs.iter().any(|e| e.contains(r#"peer!~"c1/.*""#)),
        "{exprs:?}"
    );

    let dashboard_cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "trellis-dashboard")
        .unwrap();
    assert_eq!(dashboard_cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value =
        serde_json::from_str(dashboard_cm["data"]["trellis.json"].as_str().unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "Policy drops by policy",
        "Flows by verdict",
        "Flow buffer overwrites",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted:?}: {titles:?}");
    }
    // No two panels overlap on Grafana's 24-column grid.
    let cells: Vec<(u64, u64, u64, u64)> = panels
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            let at = |k: &str| g[k].as_u64().unwrap();
            (at("x"), at("y"), at("w"), at("h"))
        })
        .collect();
    for (i, a) in cells.iter().enumerate() {
        assert!(
            a.0 + a.2 <= 24,
            "panel {} is wider than the grid",
            titles[i]
        );
        for (j, b) in cells.iter().enumerate().skip(i + 1) {
            let apart =
                a.0 + a.2 <= b.0 || b.0 + b.2 <= a.0 || a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1;
            assert!(apart, "panels {} and {} overlap", titles[i], titles[j]);
        }
    }
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    let mut unknown = Vec::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{expr} uses no Trellis metric");
        unknown.extend(names.into_iter().filter(|n| !metric_exists(n)));
    }
    assert!(unknown.is_empty(), "no binary exports {unknown:?}");
}

/// The rendered PrometheusRule's spec (its groups), written where promtool can read it.
fn rules_file(docs: &[Value], dir: &Path) -> (PathBuf, Value) {
    let rule = docs.iter().find(|d| d["kind"] == "PrometheusRule").unwrap();
    let path = dir.join("rules.json");
    std::fs::write(&path, serde_json::to_string(&rule["spec"]).unwrap()).unwrap();
    (path, rule["spec"].clone())
}

/// `promtool test rules` on synthetic series: the surge alert fires on a sudden rise of
/// policy drops (after a quiet hour, and from no series at all) and stays silent on a steady
/// rate, low or high.
#[test]
fn the_policy_drops_alert_fires_on_a_surge_and_not_on_a_steady_rate() {
    needs!("helm", "promtool");
    let docs = documents(&template(&["-f", TWO_PEERS]).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (rules, spec) = rules_file(&docs, dir.path());
    let alert = spec["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alert"] == "TrellisPolicyDropsSurge")
        .expect("the surge alert");
    let summary = alert["annotations"]["summary"].as_str().unwrap();
    assert!(summary.contains("c1"), "{summary}");
    let description = alert["annotations"]["description"].as_str().unwrap();
    assert!(
        description.contains("trellis observe") && description.contains("--verdict DROPPED"),
        "the alert says how to see the drops: {description}"
    );
    // 50 drops/s at the firing evaluation: a constant slope, so rate() is exact.
    let fired = serde_json::json!([{
        "exp_labels": {"severity": "warning"},
        "exp_annotations": {
            "summary": summary,
            "description": description.replace("{{ $value | humanize }}", "50"),
        },
    }]);
    let series = |values: &str| {
        serde_json::json!([{
            "series": r#"trellis_flows_policy_drops_total{instance="10.0.0.1:9586",policy="default/deny-all"}"#,
            "values": values,
        }])
    };
    let silent_at = |minutes: &[u32]| -> Vec<Value> {
        minutes
            .iter()
            .map(|m| {
                serde_json::json!({
                    "eval_time": format!("{m}m"),
                    "alertname": "TrellisPolicyDropsSurge",
                    "exp_alerts": [],
                })
            })
            .collect()
    };
    let firing_at = |minute: u32| {
        serde_json::json!({
            "eval_time": format!("{minute}m"),
            "alertname": "TrellisPolicyDropsSurge",
            "exp_alerts": fired,
        })
    };
    let mut after_a_quiet_hour = silent_at(&[60, 120, 125]);
    after_a_quiet_hour.push(firing_at(130));
    let mut from_nothing = silent_at(&[60, 125]);
    // Firing 5 minutes after the surge began: a missing baseline counts as 0 (without the
    // floor, the alert would wait until the baseline window has two samples of the surge).
    from_nothing.push(firing_at(128));
    let tests = serde_json::json!({
        "rule_files": [rules.file_name().unwrap().to_str().unwrap()],
        "evaluation_interval": "1m",
        "tests": [
            // 0.1 drops/s for two hours, then 50/s.
            {"interval": "1m", "input_series": series("0+6x120 726+3000x30"),
             "alert_rule_test": after_a_quiet_hour},
            // Nothing dropped (no series) for two hours, then 50/s.
            {"interval": "1m", "input_series": series("_x120 0+3000x30"),
             "alert_rule_test": from_nothing},
            // A steady 0.1/s, and a steady 20/s: above the floor, but no rise once an hour
            // of it is the baseline (its first minutes are a rise from nothing).
            {"interval": "1m", "input_series": series("0+6x180"),
             "alert_rule_test": silent_at(&[10, 60, 120, 180])},
            {"interval": "1m", "input_series": series("0+1200x240"),
             "alert_rule_test": silent_at(&[70, 120, 180, 240])},
            // From nothing to a steady 0.1/s.
            {"interval": "1m", "input_series": series("_x120 0+6x60"),
             "alert_rule_test": silent_at(&[125, 130, 180])},
        ],
    });
    let test_file = dir.path().join("tests.json");
    std::fs::write(&test_file, serde_json::to_string(&tests).unwrap()).unwrap();
    let out = Command::new(tool("promtool"))
        .args(["test", "rules", test_file.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "promtool test rules: {}", text(&out));
}

/// The gateway's container command, one argument a string.
fn gateway_command(docs: &[Value]) -> Vec<String> {
    let spec = &find(docs, "DaemonSet", "trellis-gateway")["spec"]["template"]["spec"];
    let container = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gateway")
        .expect("the gateway container");
    container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn flows_reach_the_gateways_and_the_controller_and_off_turns_both_off() {
    needs!("helm");
    for (what, extra, enabled, buffer, listen) in [
        (
            "default values",
            vec![],
            true,
            Some("4096"),
            "127.0.0.1:4245",
        ),
        (
            "the largest buffer, another port",
            vec![
                "--set",
                "flows.bufferSize=1000000",
                "--set",
                "flows.listen=127.0.0.1:14245",
            ],
            true,
            // Written out whole: Helm reads 1000000 as a float, which would print 1e+06.
            Some("1000000"),
            "127.0.0.1:14245",
        ),
        (
            "flows off",
            vec!["--set", "flows.enabled=false"],
            false,
            None,
            "127.0.0.1:4245",
        ),
    ] {
        let docs = documents(&template(&extra).unwrap());
        let command = gateway_command(&docs);
        let flows: Vec<&String> = command.iter().filter(|a| a.starts_with("--flow")).collect();
        let mut wanted = vec![format!("--flows={}", if enabled { "on" } else { "off" })];
        wanted.extend(buffer.map(|b| format!("--flow-buffer={b}")));
        assert_eq!(flows, wanted.iter().collect::<Vec<_>>(), "{what}");
        // The netlink groups flows come from (conntrack events, NFLOG) need NET_ADMIN.
        let spec = &find(&docs, "DaemonSet", "trellis-gateway")["spec"]["template"]["spec"];
        let gateway = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "gateway")
            .unwrap();
        let added = &gateway["securityContext"]["capabilities"]["add"];
        assert!(
            added.as_array().unwrap().iter().any(|c| c == "NET_ADMIN"),
            "{what}: {added}"
        );

        let (yaml, _) = config_map_data(&docs);
        let config: Value = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(
            config["flows"],
            serde_json::json!({"enabled": enabled, "listen": listen}),
            "{what}"
        );
        // The controller's own parser takes the keys.
        controller_config(&yaml).unwrap_or_else(|e| panic!("{what}: {e}\n{yaml}"));
        // Loopback by design: no Service or container port publishes the flows endpoint.
        let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
        for doc in &docs {
            let published = doc["spec"]["ports"]
                .as_array()
                .into_iter()
                .chain(
                    doc["spec"]["template"]["spec"]["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c["ports"].as_array()),
                )
                .flatten()
                .any(|p| p["port"] == port || p["containerPort"] == port);
            assert!(
                !published,
                "{what}: {} {} publishes the flows port",
                doc["kind"], doc["metadata"]["name"]
            );
        }
    }
}

#[test]
fn the_kind_recipe_and_the_scripts_are_shellcheck_clean() {
    needs!("shellcheck");
    let scripts = [
        "integration/kind/kind-mesh.sh",
        "scripts/install-deps",
        "scripts/test",
        "scripts/test-unprivileged",
        "scripts/test-soak",
        "scripts/lab",
    ];
    let out = Command::new(tool("shellcheck"))
        .args(["--severity=style", "--external-sources"])
        .args(scripts.iter().map(|s| root().join(s)))
        .output()
        .unwrap();
    assert!(out.status.success(), "shellcheck: {}", text(&out));
}

/// The agent CA the chart generates (Helm's genCA: RSA, its key PKCS#1) is one the controller
/// can use: it issues its own agent.<id>.trellis from it (the ID known only at runtime), and
/// DNS, pinning only that CA, bootstraps its identity and learns the cluster from the
/// controller's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_agent_ca_serves_the_controller_and_bootstraps_dns_without_a_cluster_id() {
    needs!("helm");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use trellis_agent_client::bootstrap::Subject;
    use trellis_core::agent::{AgentHello, AgentIdentity, AgentRole, BootstrapIssued};
    let docs = documents(&template(&[]).unwrap());
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(find(&docs, "Secret", "trellis-agent-ca").clone()).unwrap();
    let data = secret.data.unwrap();
    let ca_pem = String::from_utf8(data["ca.pem"].0.clone()).unwrap();
    let key_pem = String::from_utf8(data["ca-key.pem"].0.clone()).unwrap();
    assert!(key_pem.contains("RSA PRIVATE KEY"), "genCA's PKCS#1 key");
    let ca = trellis_controller::certs::CertifiedKey {
        cert_pem: ca_pem.clone(),
        key_pem: trellis_controller::agent_certs::ca_key_pem(&key_pem).unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let files = trellis_agent_client::TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("agent.pem"),
        key: dir.path().join("agent-key.pem"),
    };
    std::fs::write(&files.ca, &ca_pem).unwrap();
    trellis_controller::agent_certs::write_controller_cert(&ca, "c1", &files.cert, &files.key)
        .unwrap();
    let server = trellis_agent_client::ServerTls::load_allowing_bootstrap(files.clone()).unwrap();
    assert_eq!(
        server.material().identity,
        AgentIdentity::Controller {
            cluster: "c1".into()
        }
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let signer = ca.clone();
    // The controller's side of one bootstrap (the token checks are node_certs', tested
    // against a scripted API server): DNS's identity for DNS's request.
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = server.acceptor().accept(tcp).await.unwrap();
        let mut decoder = trellis_core::framing::FrameDecoder::new(1 << 20);
        let mut buf = vec![0u8; 16 * 1024];
        let hello = loop {
            if let Some(hello) = decoder.next_json::<AgentHello>().unwrap() {
                break hello;
            }
            let n = tls.read(&mut buf).await.unwrap();
            decoder.push(&buf[..n]);
        };
        let AgentRole::Bootstrap(request) = hello.role else {
            panic!("not a bootstrap")
        };
        assert!(request.dns);
        let certificate_pem = trellis_controller::node_certs::sign_identity_certificate(
            &signer,
            &AgentIdentity::Dns {
                cluster: "c1".into(),
            },
            &request.csr_pem,
        )
        .unwrap();
        let answer = BootstrapIssued {
            certificate_pem,
            ca_pem: signer.cert_pem.clone(),
        };
        let frame = trellis_core::framing::encode_json_frame(&answer, "answer", 1 << 20).unwrap();
        tls.write_all(&frame).await.unwrap();
        let _ = tls.shutdown().await;
    });
    let issued = trellis_agent_client::bootstrap::bootstrap_as(
        &addr.to_string(),
        &files.ca,
        None,
        &Subject::Dns,
        "a projected token",
        None,
    )
    .await
    .unwrap();
    assert_eq!(issued.cluster, "c1");
    let (cert, key) = (dir.path().join("dns.pem"), dir.path().join("dns-key.pem"));
    std::fs::write(&cert, &issued.certificate_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    let client = trellis_agent_client::ClientTls::load(trellis_agent_client::TlsFiles {
        ca: files.ca.clone(),
        cert,
        key,
    })
    .unwrap();
    assert_eq!(
        client.material().identity,
        AgentIdentity::Dns {
            cluster: "c1".into()
        }
    );
}

/// The three workloads: (kind, name, component).
const WORKLOADS: [(&str, &str, &str); 3] = [
    ("Deployment", "trellis-controller", "controller"),
    ("DaemonSet", "trellis-gateway", "gateway"),
    ("Deployment", "trellis-dns", "dns"),
];

fn pod_spec<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    &find(docs, kind, name)["spec"]["template"]["spec"]
}

/// A workload's first container (the controller, the gateway, DNS).
fn main_container<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    &pod_spec(docs, kind, name)["containers"][0]
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// Whether a pod with these labels is selected by a `matchLabels` selector.
fn selects(selector: &Value, labels: &Value) -> bool {
    let wanted = selector["matchLabels"].as_object().expect("matchLabels");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| &labels[k] == v)
}

/// Whether RBAC `rules` grant `verb` on `group`/`resource`, on the object `name` (None: a
/// request that names none, such as create, which a rule with resourceNames never matches).
fn grants(rules: &Value, group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
    let has = |list: &Value, item: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|x| x == item || x == "*"))
    };
    rules.as_array().into_iter().flatten().any(|rule| {
        has(&rule["apiGroups"], group)
            && has(&rule["resources"], resource)
            && has(&rule["verbs"], verb)
            && match rule["resourceNames"].as_array() {
                None => true,
                Some(names) => name.is_some_and(|n| names.iter().any(|x| x == n)),
            }
    })
}

/// The controller's rendered configuration, as YAML values (the HA keys included).
fn rendered_controller_config(docs: &[Value]) -> Value {
    let (yaml, _) = config_map_data(docs);
    serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

#[test]
fn every_pod_lands_on_linux_under_runtime_default_seccomp_with_the_charts_defaults() {
    needs!("helm");
    let docs = documents(&template(&[]).unwrap());
    for ((kind, name, _), priority) in WORKLOADS.iter().zip([
        "system-cluster-critical",
        "system-node-critical",
        "system-cluster-critical",
    ]) {
        let spec = pod_spec(&docs, kind, name);
        assert_eq!(
            spec["nodeSelector"],
            serde_json::json!({"kubernetes.io/os": "linux"}),
            "{name} could land on a Windows node"
        );
        assert_eq!(
            spec["securityContext"]["seccompProfile"],
            serde_json::json!({"type": "RuntimeDefault"}),
            "{name}'s pod has no seccomp profile"
        );
        assert_eq!(spec["priorityClassName"], *priority, "{name}");
        for container in ["containers", "initContainers"]
            .iter()
            .flat_map(|k| spec[k].as_array().cloned().unwrap_or_default())
        {
            assert_eq!(
                container["image"], "trellis:0.1.0",
                "{name}: the appVersion tag"
            );
            // No container turns the pod's profile off.
            assert!(
                container["securityContext"]["seccompProfile"].is_null(),
                "{name}/{}",
                container["name"]
            );
        }
    }
    // The gateway keeps exactly what its tunnel, routes, policy and steering need.
    let gateway = main_container(&docs, "DaemonSet", "trellis-gateway");
    assert_eq!(
        gateway["securityContext"]["capabilities"],
        serde_json::json!({"drop": ["ALL"], "add": ["NET_ADMIN", "BPF"]})
    );
    assert_eq!(
        find(&docs, "DaemonSet", "trellis-gateway")["spec"]["updateStrategy"],
        serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}})
    );
    // DNS: a new pod is ready before an old one goes.
    assert_eq!(
        find(&docs, "Deployment", "trellis-dns")["spec"]["strategy"],
        serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    // One ServiceAccount per component, under the chart's names, each pod running as its own.
    let accounts: Vec<&Value> = of_kind(&docs, "ServiceAccount")
        .into_iter()
        .map(|a| &a["metadata"]["name"])
        .collect();
    assert_eq!(
        accounts,
        ["trellis-controller", "trellis-gateway", "trellis-dns"]
    );
    for (kind, name, _) in WORKLOADS {
        assert_eq!(pod_spec(&docs, kind, name)["serviceAccountName"], name);
    }
}

#[test]
fn every_workload_option_renders_as_set_in_the_maximal_values() {
    needs!("helm");
    let values: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart().join(MAXIMAL)).unwrap()).unwrap();
    let docs = documents(&template(&["-f", MAXIMAL]).unwrap());
    let image = format!(
        "{}@{}",
        values["image"]["repository"].as_str().unwrap(),
        values["image"]["digest"].as_str().unwrap()
    );
    for (kind, name, component) in WORKLOADS {
        let set = &values[component];
        let workload = find(&docs, kind, name);
        let template = &workload["spec"]["template"];
        let spec = &template["spec"];
        let what = format!("{kind} {name}");
        // The digest wins over the tag, in every container.
        for container in ["containers", "initContainers"]
            .iter()
            .flat_map(|k| spec[k].as_array().cloned().unwrap_or_default())
        {
            assert_eq!(container["image"], image.as_str(), "{what}");
            assert_eq!(container["imagePullPolicy"], "Always", "{what}");
        }
        assert_eq!(
            spec["imagePullSecrets"],
            serde_json::json!([{"name": "registry-credentials"}])
        );
        assert_eq!(
            spec["priorityClassName"], set["priorityClassName"],
            "{what}"
        );
        assert_eq!(spec["nodeSelector"], set["nodeSelector"], "{what}");
        assert_eq!(spec["tolerations"], set["tolerations"], "{what}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{what}"
        );
        let strategy_key = if kind == "DaemonSet" {
            "updateStrategy"
        } else {
            "strategy"
        };
        assert_eq!(workload["spec"][strategy_key], set[strategy_key], "{what}");
        // The user's labels and annotations join the chart's, which still select the pods.
        let labels = &template["metadata"]["labels"];
        for (key, value) in set["podLabels"].as_object().unwrap() {
            assert_eq!(&labels[key], value, "{what}: label {key}");
        }
        assert!(selects(&workload["spec"]["selector"], labels), "{what}");
        let annotations = &template["metadata"]["annotations"];
        for (key, value) in set["podAnnotations"].as_object().unwrap() {
            assert_eq!(&annotations[key], value, "{what}: annotation {key}");
        }
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{what}");
        let container = &spec["containers"][0];
        assert_eq!(container["resources"], set["resources"], "{what}");
        // extraEnv after the chart's own variables, extraArgs at the end of the command.
        let env = container["env"].as_array().unwrap();
        let extra_env = set["extraEnv"].as_array().unwrap();
        assert_eq!(
            &env[env.len() - extra_env.len()..],
            extra_env.as_slice(),
            "{what}"
        );
        let chart_env = &env[..env.len() - extra_env.len()];
        assert!(chart_env.iter().any(|e| e["name"] == "RUST_LOG"), "{what}");
        if let Some(extra_args) = set["extraArgs"].as_array() {
            let command = container["command"].as_array().unwrap();
            assert_eq!(
                &command[command.len() - extra_args.len()..],
                extra_args.as_slice(),
                "{what}"
            );
        }
        // Your own ServiceAccount: the pod runs as it, the chart makes none.
        assert_eq!(
            spec["serviceAccountName"], set["serviceAccount"]["name"],
            "{what}"
        );
    }
    assert!(
        of_kind(&docs, "ServiceAccount").is_empty(),
        "serviceAccount.create=false everywhere, yet the chart made {:?}",
        of_kind(&docs, "ServiceAccount")
    );
    // Its roles are bound to the accounts given, and the controller issues node and DNS
    // certificates to those accounts' tokens.
    for (binding, account) in [
        ("ClusterRoleBinding/trellis-controller", "mesh-controller"),
        ("RoleBinding/trellis-controller", "mesh-controller"),
        ("ClusterRoleBinding/trellis-gateway", "mesh-gateway"),
    ] {
        let (kind, name) = binding.split_once('/').unwrap();
        assert_eq!(
            find(&docs, kind, name)["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]),
            "{binding}"
        );
    }
    let (yaml, _) = config_map_data(&docs);
    let cfg = controller_config(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let bootstrap = cfg.node_bootstrap.as_ref().expect("nodeBootstrap");
    assert_eq!(
        bootstrap.service_account(),
        Some((NAMESPACE.to_owned(), "mesh-gateway".to_owned()))
    );
    assert_eq!(
        bootstrap.dns_service_account(),
        Some((NAMESPACE.to_owned(), "mesh-dns".to_owned()))
    );
    // The budgets as set: maxUnavailable, or minAvailable when set (percentages stay strings).
    for (name, component, budget) in [
        (
            "trellis-controller",
            "controller",
            serde_json::json!({"maxUnavailable": 2}),
        ),
        (
            "trellis-dns",
            "dns",
            serde_json::json!({"minAvailable": "50%"}),
        ),
    ] {
        let pdb = find(&docs, "PodDisruptionBudget", name);
        let mut spec = pdb["spec"].clone();
        let selector = spec.as_object_mut().unwrap().remove("selector").unwrap();
        spec.as_object_mut()
            .unwrap()
            .remove("unhealthyPodEvictionPolicy");
        assert_eq!(spec, budget, "{name}");
        let labels = &find(&docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"];
        assert!(
            selects(&selector, labels),
            "{name}'s budget selects no pod of its"
        );
        assert_eq!(
            pdb["metadata"]["labels"]["app.kubernetes.io/component"],
            component
        );
    }
    // The controller keeps the user's node affinity and adds its one-per-node rule.
    let affinity = &pod_spec(&docs, "Deployment", "trellis-controller")["affinity"];
    assert_eq!(
        affinity["nodeAffinity"],
        values["controller"]["affinity"]["nodeAffinity"]
    );
    assert_eq!(
        affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    // Gateways and DNS: the affinity given, unchanged.
    for (kind, name, component) in &WORKLOADS[1..] {
        assert_eq!(
            pod_spec(&docs, kind, name)["affinity"],
            values[*component]["affinity"]
        );
    }
}

#[test]
fn a_strategy_without_rolling_updates_renders_without_their_parameters() {
    needs!("helm");
    let docs = documents(
        &template(&[
            "--set",
            "controller.strategy.type=Recreate",
            "--set",
            "gateway.updateStrategy.type=OnDelete",
            "--set",
            "dns.strategy.type=Recreate",
        ])
        .unwrap(),
    );
    assert_eq!(
        find(&docs, "Deployment", "trellis-controller")["spec"]["strategy"],
        serde_json::json!({"type": "Recreate"})
    );
    assert_eq!(
        find(&docs, "DaemonSet", "trellis-gateway")["spec"]["updateStrategy"],
        serde_json::json!({"type": "OnDelete"})
    );
    assert_eq!(
        find(&docs, "Deployment", "trellis-dns")["spec"]["strategy"],
        serde_json::json!({"type": "Recreate"})
    );
    // An empty priority class leaves the field out (the API server refuses "").
    let docs = documents(&template(&["--set", "gateway.priorityClassName="]).unwrap());
    assert!(pod_spec(&docs, "DaemonSet", "trellis-gateway")["priorityClassName"].is_null());
}

#[test]
fn disruption_budgets_and_one_controller_per_node_come_with_more_than_one_replica() {
    needs!("helm");
    let budgets = |docs: &[Value]| -> Vec<String> {
        of_kind(docs, "PodDisruptionBudget")
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let anti_affinity = |docs: &[Value]| {
        pod_spec(docs, "Deployment", "trellis-controller")["affinity"]["podAntiAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]
            .clone()
    };
    // Defaults: two controllers, one DNS.
    let docs = documents(&template(&[]).unwrap());
    assert_eq!(budgets(&docs), ["trellis-controller"]);
    let pdb = find(&docs, "PodDisruptionBudget", "trellis-controller");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(pdb["spec"]["minAvailable"].is_null());
    // An unready pod (crashing, starting) never blocks a drain.
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    let controller = find(&docs, "Deployment", "trellis-controller");
    assert_eq!(controller["spec"]["replicas"], 2);
    assert!(selects(
        &pdb["spec"]["selector"],
        &controller["spec"]["template"]["metadata"]["labels"]
    ));
    // Host ports: no surge, and two replicas never on one node. One at a time: a follower is
    // Ready (readiness is health; the leader is found by its pod label), so the other
    // replica stays available while one is replaced.
    assert_eq!(
        controller["spec"]["strategy"],
        serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}})
    );
    let terms = anti_affinity(&docs);
    let terms = terms.as_array().expect("a required anti-affinity");
    assert_eq!(terms.len(), 1);
    assert_eq!(terms[0]["topologyKey"], "kubernetes.io/hostname");
    assert!(
        selects(
            &terms[0]["labelSelector"],
            &controller["spec"]["template"]["metadata"]["labels"]
        ),
        "the anti-affinity does not select the controller's own pods: {}",
        terms[0]
    );
    assert!(pod_spec(&docs, "Deployment", "trellis-dns")["affinity"].is_null());

    // Two DNS replicas get their budget too.
    let docs = documents(&template(&["--set", "dns.replicas=2"]).unwrap());
    assert_eq!(budgets(&docs), ["trellis-controller", "trellis-dns"]);
    let pdb = find(&docs, "PodDisruptionBudget", "trellis-dns");
    assert!(selects(
        &pdb["spec"]["selector"],
        &find(&docs, "Deployment", "trellis-dns")["spec"]["template"]["metadata"]["labels"]
    ));
    // One replica: no budget (it would block every drain of its node), no anti-affinity.
    let docs = documents(&template(&["--set", "controller.replicas=1"]).unwrap());
    assert!(budgets(&docs).is_empty(), "{:?}", budgets(&docs));
    assert!(anti_affinity(&docs).is_null());
    // Budgets can be turned off, and the user's own anti-affinity terms are kept beside ours.
    let docs = documents(
        &template(&[
            "--set",
            "controller.podDisruptionBudget.enabled=false",
            "--set",
            "controller.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey=topology.kubernetes.io/zone",
            "--set",
            "controller.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector.matchLabels.app=other",
        ])
        .unwrap(),
    );
    assert!(budgets(&docs).is_empty());
    let keys: Vec<Value> = anti_affinity(&docs)
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topologyKey"].clone())
        .collect();
    assert_eq!(
        keys,
        ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    );
}

#[test]
fn the_controller_leads_with_a_lease_and_keeps_its_state_in_a_config_map() {
    needs!("helm");
    for (what, extra, timings) in [
        ("default values", vec![], (15, 10, 2)),
        ("maximal values", vec!["-f", MAXIMAL], (20, 12, 3)),
    ] {
        let docs = documents(&template(&extra).unwrap());
        let config = rendered_controller_config(&docs);
        let election = &config["leaderElection"];
        assert_eq!(
            election,
            &serde_json::json!({
                "lease": "trellis-controller",
                "namespace": NAMESPACE,
                "leaseDurationSeconds": timings.0,
                "renewDeadlineSeconds": timings.1,
                "retryPeriodSeconds": timings.2,
                "podSelector": "app.kubernetes.io/component=controller,app.kubernetes.io/instance=trellis,app.kubernetes.io/name=trellis",
            }),
            "{what}"
        );
        let lease = election["lease"].as_str().unwrap();
        let state = config["stateConfigMap"].as_str().expect("stateConfigMap");
        assert_eq!(state, "trellis-controller-state", "{what}");
        // The settings ConfigMap the chart owns is not the one the controller writes.
        assert_ne!(
            config["source"]["kubernetes"]["settingsConfigMap"].as_str(),
            Some(state),
            "{what}"
        );

        let spec = pod_spec(&docs, "Deployment", "trellis-controller");
        let container = &spec["containers"][0];
        // The holder identity: the pod's name.
        let pod_name = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "POD_NAME")
            .expect("POD_NAME");
        assert_eq!(
            pod_name["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        // The namespace the leader lists and labels pods in.
        let pod_namespace = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "POD_NAMESPACE")
            .expect("POD_NAMESPACE");
        assert_eq!(
            pod_namespace["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        // Ready while healthy (a synced follower too): rollouts and drains count it.
        assert_eq!(
            container["readinessProbe"],
            serde_json::json!({"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 2}),
            "{what}"
        );
        assert!(
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "metrics"),
            "{what}"
        );

        // The podSelector finds exactly the controller's pods: the Deployment's own
        // selector labels, no other component's.
        let pod_labels = &find(&docs, "Deployment", "trellis-controller")["spec"]["template"]["metadata"]
            ["labels"];
        let pod_selector: serde_json::Map<String, Value> = election["podSelector"]
            .as_str()
            .unwrap()
            .split(',')
            .map(|term| {
                let (k, v) = term.split_once('=').unwrap();
                (k.to_owned(), Value::String(v.to_owned()))
            })
            .collect();
        let pod_selector = serde_json::json!({"matchLabels": pod_selector});
        assert!(selects(&pod_selector, pod_labels), "{what}");
        for (kind, other) in [
            ("Deployment", "trellis-dns"),
            ("DaemonSet", "trellis-gateway"),
        ] {
            assert!(
                !selects(
                    &pod_selector,
                    &find(&docs, kind, other)["spec"]["template"]["metadata"]["labels"]
                ),
                "{what}: {other}"
            );
        }
        assert_eq!(
            find(&docs, "Deployment", "trellis-controller")["spec"]["selector"]["matchLabels"],
            pod_selector["matchLabels"],
            "{what}"
        );

        // The Services that must reach the leader select its pod label; no pod carries it as
        // rendered (the leader sets it), and the metrics Service selects every replica.
        let mut leader = pod_labels.clone();
        leader["trellis.dev/controller-leader"] = "true".into();
        for name in ["trellis-controller", "trellis-peering"] {
            let service = &find(&docs, "Service", name)["spec"];
            assert_eq!(
                service["selector"]["trellis.dev/controller-leader"], "true",
                "{what}: {name}"
            );
            let selector = serde_json::json!({"matchLabels": service["selector"]});
            assert!(selects(&selector, &leader), "{what}: {name}");
            assert!(
                !selects(&selector, pod_labels),
                "{what}: {name} reaches a follower"
            );
        }
        // `trellis status --context`'s defaults: Service trellis-controller, port `metrics`.
        assert!(
            find(&docs, "Service", "trellis-controller")["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "metrics" && p["targetPort"] == "metrics"),
            "{what}"
        );
        let metrics = &find(&docs, "Service", "trellis-controller-metrics")["spec"];
        assert_eq!(metrics["clusterIP"], "None", "{what}");
        assert!(
            selects(
                &serde_json::json!({"matchLabels": metrics["selector"]}),
                pod_labels
            ),
            "{what}: the metrics Service misses a follower"
        );
        assert!(
            pod_labels["trellis.dev/controller-leader"].is_null(),
            "{what}"
        );

        // RBAC in the release's namespace: the Lease and the state ConfigMap, by name.
        let role = &find(&docs, "Role", "trellis-controller")["rules"];
        // The leader lists the controller pods and patches their leader label.
        for verb in ["get", "list", "patch"] {
            assert!(grants(role, "", "pods", verb, None), "{what}: {verb} pods");
        }
        for verb in ["delete", "update", "create"] {
            assert!(!grants(role, "", "pods", verb, None), "{what}: {verb} pods");
        }
        let group = "coordination.k8s.io";
        assert!(grants(role, group, "leases", "create", None), "{what}");
        for verb in ["get", "update"] {
            assert!(
                grants(role, group, "leases", verb, Some(lease)),
                "{what}: {verb} lease"
            );
            assert!(
                !grants(role, group, "leases", verb, Some("kube-scheduler")),
                "{what}"
            );
        }
        assert!(grants(role, "", "configmaps", "create", None), "{what}");
        for verb in ["get", "update", "patch"] {
            assert!(
                grants(role, "", "configmaps", verb, Some(state)),
                "{what}: {verb} state"
            );
        }
        // Its settings (the chart's, nodeEncryption) stay read-only, other ConfigMaps and
        // Secrets out of reach.
        for verb in ["update", "patch", "delete"] {
            assert!(
                !grants(role, "", "configmaps", verb, Some("trellis-controller")),
                "{what}"
            );
        }
        assert!(
            !grants(role, "", "configmaps", "get", Some("kube-root-ca.crt")),
            "{what}"
        );
        assert!(
            !grants(role, "", "secrets", "get", Some("trellis-tls")),
            "{what}"
        );
        let binding = find(&docs, "RoleBinding", "trellis-controller");
        assert_eq!(
            binding["subjects"][0]["name"], spec["serviceAccountName"],
            "{what}"
        );
        assert_eq!(binding["roleRef"]["name"], "trellis-controller");

        // The Peer resources (external WireGuard peers): read, and their status written.
        let cluster_role = &find(&docs, "ClusterRole", "trellis-controller")["rules"];
        for verb in ["get", "list", "watch"] {
            assert!(
                grants(cluster_role, "trellis.dev", "peers", verb, None),
                "{what}: {verb}"
            );
        }
        for verb in ["patch", "update"] {
            assert!(
                grants(cluster_role, "trellis.dev", "peers/status", verb, None),
                "{what}: {verb} peers/status"
            );
        }
        for verb in ["create", "update", "patch", "delete"] {
            assert!(
                !grants(cluster_role, "trellis.dev", "peers", verb, None),
                "{what}: the controller never writes a Peer's spec ({verb})"
            );
        }
        let binding = find(&docs, "ClusterRoleBinding", "trellis-controller");
        assert_eq!(
            binding["subjects"][0]["name"], spec["serviceAccountName"],
            "{what}"
        );
    }
}

#[test]
fn the_charts_own_labels_and_annotations_win_over_the_users() {
    needs!("helm");
    let docs = documents(
        &template(&[
            "--set",
            "dns.podLabels.app\\.kubernetes\\.io/component=web",
            "--set",
            "dns.podLabels.team=net",
            "--set",
            "controller.podAnnotations.checksum/config=stale",
            "--set",
            "gateway.podAnnotations.prometheus\\.io/port=x",
        ])
        .unwrap(),
    );
    let dns = find(&docs, "Deployment", "trellis-dns");
    let labels = &dns["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/component"], "dns");
    assert_eq!(labels["team"], "net");
    assert!(selects(&dns["spec"]["selector"], labels));
    let checksum = &pod_annotations(&docs, "Deployment", "trellis-controller")["checksum/config"];
    assert_eq!(checksum.len(), 64, "the config checksum, not {checksum:?}");
    assert_eq!(
        pod_annotations(&docs, "DaemonSet", "trellis-gateway")["prometheus.io/port"],
        "9586"
    );
}
