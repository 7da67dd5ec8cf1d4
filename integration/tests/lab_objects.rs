//! `trellis lab apply/delete/label/probe` as a person uses them: pods made through the CNI
//! serving their declared ports, applying twice changing nothing, relabelling in place,
//! recreating on a new spec, probes' one line and exit status, and deletion leaving nothing.

use trellis_integration::{TestLab, text};

const MANIFEST: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-1
  containers:
  - name: web
    ports:
    - {name: http, containerPort: 80}
    - {name: dns, containerPort: 53, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: c}]}
";

fn echo_pid(lab: &TestLab, pod: &str) -> Option<u64> {
    lab.state()["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == format!("{pod}/echo"))
        .map(|d| d["pid"].as_u64().unwrap())
}

#[test]
fn apply_label_probe_and_delete_pods_like_kubectl() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("obj");
    lab.up(&["--clusters", "1", "--nodes", "2", "--pods", "1"]);
    let source = lab.state_dir().join("clusters/c1/cluster.yaml");

    let first = lab.apply("c1", MANIFEST);
    assert!(first.contains("pod/shop/web created on node-1"), "{first}");
    // The client names no node: the least loaded one (both run one pod of the lab's; node-0
    // comes first), and it is in force before apply returns.
    assert!(
        first.contains("pod/shop/client created on node-0"),
        "{first}"
    );
    assert!(first.contains("in force in c1"), "{first}");
    let written = std::fs::read_to_string(&source).unwrap();
    assert!(
        written.contains("\"kubernetes.io/metadata.name\":\"shop\""),
        "{written}"
    );
    assert!(
        written.contains("\"app\":\"pod-0\""),
        "the lab's own pods are Pods too"
    );
    let web = lab
        .applied_pods()
        .into_iter()
        .find(|p| p.name.name == "web")
        .unwrap();
    assert!(
        written.contains(&format!("\"podIP\":\"{}\"", web.address)),
        "{written}"
    );
    let web_pid = echo_pid(&lab, "c1/shop/web").expect("web runs an echo server");

    // The same file again: nothing changes.
    let again = lab.apply("c1", MANIFEST);
    assert!(again.contains("unchanged"), "{again}");
    assert_eq!(std::fs::read_to_string(&source).unwrap(), written);
    assert_eq!(echo_pid(&lab, "c1/shop/web"), Some(web_pid));

    // Probes: TCP and UDP to declared ports connect; an undeclared port is refused.
    let probe = lab.trellis(&["probe", "c1/shop/client", "c1/shop/web:80/tcp"]);
    assert!(probe.status.success(), "{}", text(&probe));
    let line = text(&probe);
    assert!(
        line.starts_with(&format!(
            "c1/shop/client -> c1/shop/web {}:80/tcp connected in ",
            web.address
        )),
        "{line}"
    );
    let udp = lab.trellis(&[
        "probe",
        "c1/shop/client",
        &format!("{}:53/udp", web.address),
    ]);
    assert!(udp.status.success(), "{}", text(&udp));
    let closed = lab.trellis(&[
        "probe",
        "c1/shop/client",
        "c1/shop/web:81",
        "--timeout",
        "500ms",
    ]);
    assert_eq!(closed.status.code(), Some(1), "{}", text(&closed));
    assert!(text(&closed).contains("refused"), "{}", text(&closed));
    let from_default = lab.trellis(&["probe", "c1/pod-0", "c1/shop/web:80"]);
    assert!(from_default.status.success(), "{}", text(&from_default));

    // exec and status know pods by cluster, namespace and name.
    let exec = lab.trellis(&["exec", "c1/shop/web", "--", "true"]);
    assert!(exec.status.success(), "{}", text(&exec));
    let status = text(&lab.trellis(&["status"]));
    assert!(status.contains("c1/shop/web"), "{status}");

    // A label change relabels in place; a new port recreates the pod.
    let labelled = lab.label("c1", "pod/shop/web", &["tier=front", "app-"]);
    assert!(labelled.contains("in force"), "{labelled}");
    let relabelled = std::fs::read_to_string(&source).unwrap();
    assert!(relabelled.contains("\"tier\":\"front\"") && !relabelled.contains("\"app\":\"web\""));
    assert_eq!(echo_pid(&lab, "c1/shop/web"), Some(web_pid));
    let more_ports = MANIFEST.replace(
        "- {name: http, containerPort: 80}",
        "- {name: http, containerPort: 80}\n    - {containerPort: 81}",
    );
    let recreated = lab.apply("c1", &more_ports);
    assert!(
        recreated.contains("pod/shop/web created on node-1"),
        "{recreated}"
    );
    assert_ne!(echo_pid(&lab, "c1/shop/web"), Some(web_pid));
    let open = lab.trellis(&["probe", "c1/shop/client", "c1/shop/web:81"]);
    assert!(open.status.success(), "{}", text(&open));

    // Mistakes are refused with what is wrong.
    let refused = lab.trellis(&["label", "--cluster", "c1", "pod/shop/nobody", "a=b"]);
    assert!(!refused.status.success() && text(&refused).contains("no pod shop/nobody"));

    // Deleting the namespace deletes its pods: processes and namespaces gone.
    let web_netns = lab
        .applied_pods()
        .into_iter()
        .find(|p| p.name.name == "web")
        .unwrap()
        .netns;
    let deleted = lab.delete("c1", "kind: Namespace\nmetadata: {name: shop}\n");
    assert!(deleted.contains("namespace/shop deleted"), "{deleted}");
    assert!(lab.applied_pods().is_empty());
    assert!(echo_pid(&lab, "c1/shop/web").is_none());
    assert!(
        !lab.namespaces().contains(&web_netns),
        "{:?}",
        lab.namespaces()
    );
    let written = std::fs::read_to_string(&source).unwrap();
    assert!(!written.contains("shop"), "{written}");

    let down = lab.trellis(&["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(lab.namespaces().is_empty(), "{:?}", lab.namespaces());
}
