//! `trellis lab apply`, `delete` and `label`: Kubernetes objects in a lab cluster, as kubectl
//! puts them into a kind cluster. Pods are made through the CNI plugin on their node and run
//! the echo server on their declared ports; everything goes into the cluster's static source
//! (written atomically); and each command returns once the change is in force: the controller
//! has loaded the file written, every node of the cluster enforces the policy the controller
//! now streams, and every peer cluster holds the new state and enforces it too.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use trellis_core::cluster::Protocol;
use trellis_core::status::{ControllerStatus, GatewayReport};
use trellis_netns::Netns;

use super::build::{
    block_on, conflist, pod_attachment, prepare_pod_namespace, result_address, runtime_for,
    start_daemon,
};
use super::control;
use super::objects::{self, AppliedPod, ClusterObjects, LabelChange, Manifest, PodNames, PodSpec};
use super::processes::Launch;
use super::topology::{Cluster, GATEWAY_METRICS_PORT, LabState, namespace_prefix};

/// How long a command waits for its change to be in force.
pub const IN_FORCE_WITHIN: Duration = Duration::from_secs(10);
const STATUS_TIMEOUT: Duration = Duration::from_millis(500);

struct LabNames<'a> {
    lab: &'a str,
    cluster: &'a str,
}

impl PodNames for LabNames<'_> {
    // `.` cannot be in a namespace or pod name (DNS labels), so `x.a-b` and `x-a.b` differ.
    fn netns(&self, pod: &PodSpec) -> String {
        format!(
            "{}{}-{}.{}",
            namespace_prefix(self.lab),
            self.cluster,
            pod.namespace,
            pod.name
        )
    }

    fn container_id(&self, pod: &PodSpec) -> String {
        format!(
            "{}-{}-{}.{}",
            self.lab, self.cluster, pod.namespace, pod.name
        )
    }
}

fn cluster_index(state: &LabState, cluster: &str) -> anyhow::Result<usize> {
    state
        .clusters
        .iter()
        .position(|c| c.name == cluster)
        .with_context(|| {
            format!(
                "no cluster {cluster:?} in lab {:?} (clusters: {})",
                state.lab,
                state
                    .clusters
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Reads `-f FILE` (`-` for stdin).
pub fn read_manifests(file: &Path) -> anyhow::Result<Vec<Manifest>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("read stdin")?
    } else {
        fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?
    };
    objects::parse_manifests(&text).with_context(|| format!("{}", file.display()))
}

/// `trellis lab apply`.
pub fn apply(
    dir: &Path,
    state: &mut LabState,
    cluster: &str,
    manifests: &[Manifest],
) -> anyhow::Result<()> {
    let index = cluster_index(state, cluster)?;
    let current = &state.clusters[index];
    let mut placement = objects::Placement {
        load: current
            .nodes
            .iter()
            .map(|node| {
                let applied = current
                    .objects
                    .pods
                    .values()
                    .filter(|p| p.node == node.name)
                    .count();
                (node.name.clone(), node.pods.len() + applied)
            })
            .collect(),
    };
    let reserved: Vec<String> = current
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter().map(|p| p.name.clone()))
        .collect();
    let names = LabNames {
        lab: &state.lab,
        cluster,
    };
    let (mut next, changes) = objects::apply(
        &current.objects,
        manifests,
        &mut placement,
        &names,
        &reserved,
    )?;
    objects::stamp_creation(&current.objects, &mut next, std::time::SystemTime::now());
    if changes.is_empty() && next == current.objects {
        println!("unchanged");
    }
    for pod in &changes.remove {
        remove_pod(dir, state, index, pod)?;
        println!("pod/{} deleted (to be created again)", pod.spec.key());
    }
    // Recorded before pods are made, so `down` finds a pod even if this command dies midway.
    state.clusters[index].objects = next;
    state.save(dir)?;
    for pod in &changes.create {
        create_pod(dir, state, index, &pod.spec.key())?;
        println!("pod/{} created on {}", pod.spec.key(), pod.node);
    }
    for manifest in manifests.iter().filter(|m| !matches!(m, Manifest::Pod(_))) {
        println!("{} applied", manifest.describe());
    }
    write_and_wait(dir, state, index)
}

/// `trellis lab delete`.
pub fn delete(
    dir: &Path,
    state: &mut LabState,
    cluster: &str,
    manifests: &[Manifest],
) -> anyhow::Result<()> {
    let index = cluster_index(state, cluster)?;
    let (next, removed, deleted) = objects::delete(&state.clusters[index].objects, manifests)?;
    for pod in &removed {
        remove_pod(dir, state, index, pod)?;
    }
    state.clusters[index].objects = next;
    state.save(dir)?;
    for what in &deleted {
        println!("{what} deleted");
    }
    if deleted.is_empty() {
        println!("nothing to delete");
    }
    write_and_wait(dir, state, index)
}

/// `trellis lab label`: `pod/NS/NAME` or `namespace/NAME`.
pub fn label(
    dir: &Path,
    state: &mut LabState,
    cluster: &str,
    target: &str,
    changes: &[String],
) -> anyhow::Result<()> {
    let index = cluster_index(state, cluster)?;
    let changes: Vec<LabelChange> = changes
        .iter()
        .map(|c| objects::parse_label_change(c))
        .collect::<anyhow::Result<_>>()?;
    let applied: &mut ClusterObjects = &mut state.clusters[index].objects;
    let labels = match target.split('/').collect::<Vec<_>>()[..] {
        ["pod", namespace, name] | ["pods", namespace, name] => applied
            .pods
            .get_mut(&format!("{namespace}/{name}"))
            .map(|pod| &mut pod.spec.labels)
            .with_context(|| {
                format!("no pod {namespace}/{name} applied in cluster {cluster} (the lab's own pods keep their labels)")
            })?,
        ["namespace", name] | ["ns", name] => {
            if objects::BUILT_IN_NAMESPACES.contains(&name) {
                bail!("namespace {name:?} is the lab's own and keeps its labels");
            }
            applied
                .namespaces
                .get_mut(name)
                .with_context(|| format!("no namespace {name} applied in cluster {cluster}"))?
        }
        _ => bail!("label what? pod/NAMESPACE/NAME or namespace/NAME, not {target:?}"),
    };
    objects::relabel(labels, &changes);
    state.save(dir)?;
    println!("{target} labeled");
    write_and_wait(dir, state, index)
}

/// Makes the recorded pod `key` of cluster `index`: its namespace, CNI ADD on its node, its
/// echo server; records its address.
fn create_pod(dir: &Path, state: &mut LabState, index: usize, key: &str) -> anyhow::Result<()> {
    let bin_dir = state
        .bin_dir
        .clone()
        .context("the lab state has no bin_dir (made by an older trellis?)")?;
    let cluster = &state.clusters[index];
    let pod = cluster.objects.pods[key].clone();
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.name == pod.node)
        .with_context(|| format!("no node {} in {}", pod.node, cluster.name))?
        .clone();
    let cluster_name = cluster.name.clone();
    block_on(prepare_pod_namespace(&pod.netns)).with_context(|| format!("pod {key}"))?;
    let (_, list) = conflist(dir, &node)?;
    let attachment = pod_attachment(
        &pod.container_id,
        &pod.netns,
        &pod.spec.namespace,
        &pod.spec.name,
    );
    let result = runtime_for(&node, &bin_dir)?
        .add(&list, &attachment)
        .with_context(|| format!("CNI ADD for {cluster_name}/{key}"))?;
    let address = result_address(&result)
        .with_context(|| format!("CNI ADD for {cluster_name}/{key} gave no IPv4 address"))?;
    {
        let recorded = state.clusters[index]
            .objects
            .pods
            .get_mut(key)
            .expect("the pod was recorded");
        recorded.address = Some(address);
        recorded.cni_result = Some(result);
    }
    state.save(dir)?;
    let pod_dir = dir.join("pods").join(&pod.netns);
    fs::create_dir_all(&pod_dir)?;
    let identity = format!("{cluster_name}/{key}");
    let mut args = vec![
        "echo-server".to_string(),
        "--identity".into(),
        identity.clone(),
    ];
    for port in &pod.spec.ports {
        if port.protocol == Protocol::Sctp && !sctp_available(&pod.netns) {
            eprintln!(
                "warning: pod {identity}: this kernel has no SCTP (try `modprobe sctp`); port {}/SCTP is not served",
                port.port
            );
            continue;
        }
        let flag = match port.protocol {
            Protocol::Tcp => "--tcp",
            Protocol::Udp => "--udp",
            Protocol::Sctp => "--sctp",
        };
        args.extend([flag.to_string(), format!("0.0.0.0:{}", port.port)]);
    }
    // Exactly the declared ports: a pod without any serves none (it is a client only).
    args.push("--no-default-ports".into());
    let ready_file = pod_dir.join("echo.ready");
    args.extend(["--ready-file".to_string(), ready_file.display().to_string()]);
    start_daemon(
        dir,
        state,
        Launch {
            netns: pod.netns.clone(),
            name: format!("{identity}/echo"),
            program: bin_dir.join("trellis"),
            args,
            log: pod_dir.join("echo.log"),
            ready: SocketAddr::new(address.into(), 0),
            ready_path: None,
            ready_file: Some(ready_file),
        },
    )
}

/// Whether the kernel serves SCTP sockets (it may need `modprobe sctp`; the lab tries).
fn sctp_available(netns: &str) -> bool {
    let try_socket = || {
        Netns::open(netns)
            .and_then(|ns| {
                ns.run(|| {
                    socket2::Socket::new(
                        socket2::Domain::IPV4,
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::from(132)),
                    )
                    .is_ok()
                })
            })
            .unwrap_or(false)
    };
    if try_socket() {
        return true;
    }
    let _ = std::process::Command::new("modprobe")
        .arg("sctp")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    try_socket()
}

/// Takes pod down: its echo server (by PID), CNI DEL on its node, its namespace.
fn remove_pod(
    dir: &Path,
    state: &mut LabState,
    index: usize,
    pod: &AppliedPod,
) -> anyhow::Result<()> {
    let cluster = &state.clusters[index];
    let echo = format!("{}/{}/echo", cluster.name, pod.spec.key());
    if let Some(position) = state.daemons.iter().position(|d| d.launch.name == echo) {
        state.daemons[position].stop(Duration::from_secs(3))?;
        state.daemons.remove(position);
    }
    let cluster = &state.clusters[index];
    if let (Some(bin_dir), Some(node)) = (
        &state.bin_dir,
        cluster.nodes.iter().find(|n| n.name == pod.node),
    ) && pod.cni_result.is_some()
    {
        let (_, list) = conflist(dir, node)?;
        let attachment = pod_attachment(
            &pod.container_id,
            &pod.netns,
            &pod.spec.namespace,
            &pod.spec.name,
        );
        runtime_for(node, bin_dir)?
            .del(&list, &attachment, pod.cni_result.as_ref())
            .with_context(|| format!("CNI DEL for {}/{}", cluster.name, pod.spec.key()))?;
    }
    for leftover in super::processes::pids_in(&pod.netns) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(leftover as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if Netns::exists(&pod.netns) {
        Netns::delete(&pod.netns).with_context(|| format!("delete namespace {}", pod.netns))?;
    }
    let _ = fs::remove_dir_all(dir.join("pods").join(&pod.netns));
    state.save(dir)
}

/// Writes cluster `index`'s static source (atomically) and waits until it is in force, in
/// the cluster and in the peer clusters.
fn write_and_wait(dir: &Path, state: &LabState, index: usize) -> anyhow::Result<()> {
    let cluster = &state.clusters[index];
    let yaml = control::cluster_yaml(cluster, index);
    let path = control::cluster_dir(dir, cluster).join("cluster.yaml");
    let unchanged = fs::read(&path).is_ok_and(|old| old == yaml.as_bytes());
    if !unchanged {
        trellis_files::write_atomically(&path, yaml.as_bytes(), 0o644)
            .with_context(|| format!("write {}", path.display()))?;
    }
    let started = Instant::now();
    let revision = wait_in_force(
        cluster,
        &trellis_core::sha256_hex(yaml.as_bytes()),
        IN_FORCE_WITHIN,
    )?;
    // Peer clusters' policies may select this cluster's pods: they enforce the change too
    // before the command returns.
    wait_peers_in_force(state, index, revision, IN_FORCE_WITHIN)?;
    println!(
        "in force in {} ({} ms)",
        cluster.name,
        started.elapsed().as_millis()
    );
    Ok(())
}

/// What keeps a change from being in force, or `None` when it is: the controller has loaded
/// the source whose digest is `written` (when it reports digests), and when it enforces
/// policy, every node's gateway enforces the controller's policy digest and knows the node's
/// pods. Pure.
pub fn not_in_force(
    cluster: &Cluster,
    written: &str,
    controller: &ControllerStatus,
    gateways: &[(String, Result<GatewayReport, String>)],
) -> Option<String> {
    if let Some(loaded) = &controller.source_digest
        && loaded != written
    {
        return Some(format!(
            "the controller has not loaded the source written yet (it reports {loaded})"
        ));
    }
    nodes_not_enforcing(cluster, controller, gateways)
}

/// What keeps peer cluster `peer` from enforcing what `origin` is at `revision`, or `None`:
/// its controller holds that revision of `origin`'s state (pods, identities), and every node
/// of `peer` enforces the controller's policy. A peer not connected to `origin` is not
/// waited for (it gets the state when it connects). Pure.
pub fn peer_not_in_force(
    origin: &str,
    revision: u64,
    peer: &Cluster,
    controller: &ControllerStatus,
    gateways: &[(String, Result<GatewayReport, String>)],
) -> Option<String> {
    let remote = controller
        .remotes
        .iter()
        .find(|r| r.cluster.as_str() == origin && r.session)?;
    if remote.revision.unwrap_or(0) < revision {
        return Some(format!(
            "{}'s controller holds revision {:?} of {origin}, not yet {revision}",
            peer.name, remote.revision
        ));
    }
    nodes_not_enforcing(peer, controller, gateways).map(|why| format!("{}: {why}", peer.name))
}

fn nodes_not_enforcing(
    cluster: &Cluster,
    controller: &ControllerStatus,
    gateways: &[(String, Result<GatewayReport, String>)],
) -> Option<String> {
    let policy = controller.policy.as_ref()?;
    for node in &cluster.nodes {
        let report = match gateways.iter().find(|(name, _)| *name == node.name) {
            Some((_, Ok(report))) => report,
            Some((_, Err(error))) => return Some(format!("gateway of {}: {error}", node.name)),
            None => return Some(format!("no report from the gateway of {}", node.name)),
        };
        let Some(enforced) = &report.policy else {
            return Some(format!(
                "the gateway of {} enforces no policy yet",
                node.name
            ));
        };
        if enforced.digest != policy.digest {
            return Some(format!(
                "the gateway of {} enforces policy {}, the controller streams {}",
                node.name, enforced.digest, policy.digest
            ));
        }
        let pods = node.pods.iter().filter_map(|p| p.address).chain(
            cluster
                .objects
                .pods
                .values()
                .filter(|p| p.node == node.name)
                .filter_map(|p| p.address),
        );
        for address in pods {
            if !enforced.local_pods.contains(&address.into()) {
                return Some(format!(
                    "the gateway of {} does not know its pod {address} yet",
                    node.name
                ));
            }
        }
    }
    None
}

/// The controller's status and, when it enforces policy, its gateways' reports.
fn observe(cluster: &Cluster) -> anyhow::Result<(ControllerStatus, Vec<GatewayReports>)> {
    let controller = super::status::fetch(cluster)?;
    let gateways = if controller.policy.is_some() {
        cluster
            .nodes
            .iter()
            .map(|node| (node.name.clone(), gateway_report(node)))
            .collect()
    } else {
        Vec::new()
    };
    Ok((controller, gateways))
}

type GatewayReports = (String, Result<GatewayReport, String>);

/// Polls `check` until it finds nothing missing, at most until `deadline`.
fn wait_until(
    what: &str,
    deadline: Instant,
    within: Duration,
    mut check: impl FnMut() -> Option<String>,
) -> anyhow::Result<()> {
    loop {
        let Some(why) = check() else {
            return Ok(());
        };
        if Instant::now() > deadline {
            bail!(
                "not in force in {what} after {}: {why}",
                humantime::format_duration(within)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (at most `within`) until what was written to `cluster`'s source with digest
/// `written` is in force; see [`not_in_force`]. Returns the controller's revision then.
pub fn wait_in_force(cluster: &Cluster, written: &str, within: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + within;
    let mut revision = 0;
    wait_until(
        &format!("cluster {}", cluster.name),
        deadline,
        within,
        || match observe(cluster) {
            Ok((controller, gateways)) => {
                revision = controller.revision;
                not_in_force(cluster, written, &controller, &gateways)
            }
            Err(error) => Some(format!("the controller did not answer: {error:#}")),
        },
    )?;
    Ok(revision)
}

/// Waits (at most `within`) until every other cluster of the lab that peers with cluster
/// `index` holds its state at `revision` and enforces it; see [`peer_not_in_force`].
/// Controllers that enforce no policy or do not answer are not waited for.
pub fn wait_peers_in_force(
    state: &LabState,
    index: usize,
    revision: u64,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let origin = &state.clusters[index].name;
    for peer in state.clusters.iter().filter(|c| c.name != *origin) {
        wait_until(
            &format!("peer cluster {}", peer.name),
            deadline,
            within,
            || {
                let (controller, gateways) = observe(peer).ok()?;
                peer_not_in_force(origin, revision, peer, &controller, &gateways)
            },
        )?;
    }
    Ok(())
}

/// A gateway's own `GET /status`, asked from inside its node.
pub(super) fn gateway_report(node: &super::topology::Node) -> Result<GatewayReport, String> {
    let addr = SocketAddr::new(node.address.into(), GATEWAY_METRICS_PORT);
    let netns = Netns::open(&node.netns).map_err(|e| e.to_string())?;
    let body = netns
        .run(move || crate::status::http_get(addr, &addr.to_string(), "/status", STATUS_TIMEOUT))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:#}"))?;
    serde_json::from_str(&body).map_err(|e| format!("its /status: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::status::{ControllerPolicyStatus, PolicyReport};

    fn lab() -> LabState {
        let mut lab = LabState::new("t", 1, 2, 1).unwrap();
        for (i, pod) in lab.clusters[0]
            .nodes
            .iter_mut()
            .flat_map(|n| &mut n.pods)
            .enumerate()
        {
            pod.address = Some(std::net::Ipv4Addr::new(10, 1, i as u8, 2));
        }
        lab
    }

    fn controller(source: Option<&str>, policy: Option<&str>) -> ControllerStatus {
        let mut status: ControllerStatus =
            serde_json::from_str(include_str!("../../tests/fixtures/status-healthy.json")).unwrap();
        status.source_digest = source.map(str::to_string);
        status.policy = policy.map(|digest| ControllerPolicyStatus {
            digest: digest.into(),
            ..Default::default()
        });
        status
    }

    fn report(digest: &str, pods: &[&str]) -> Result<GatewayReport, String> {
        Ok(GatewayReport {
            node: String::new(),
            revision: 1,
            node_encryption: None,
            peers: vec![],
            drops: Default::default(),
            policy: Some(PolicyReport {
                digest: digest.into(),
                local_pods: pods.iter().map(|p| p.parse().unwrap()).collect(),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn in_force_once_the_controller_loaded_the_file_and_every_node_enforces_its_policy() {
        let lab = lab();
        let cluster = &lab.clusters[0];
        let both = |d0: &str, d1: &str| {
            vec![
                ("node-0".to_string(), report(d0, &["10.1.0.2"])),
                ("node-1".to_string(), report(d1, &["10.1.1.2"])),
            ]
        };
        // An older file loaded.
        let why = not_in_force(
            cluster,
            "new",
            &controller(Some("old"), Some("p")),
            &both("p", "p"),
        );
        assert!(why.unwrap().contains("not loaded"));
        // Loaded, one node behind.
        let why = not_in_force(
            cluster,
            "new",
            &controller(Some("new"), Some("p2")),
            &both("p2", "p1"),
        );
        assert!(why.unwrap().contains("node-1 enforces policy p1"));
        assert_eq!(
            not_in_force(
                cluster,
                "new",
                &controller(Some("new"), Some("p2")),
                &both("p2", "p2")
            ),
            None
        );
        // A node that does not know its pod yet.
        let why = not_in_force(
            cluster,
            "new",
            &controller(Some("new"), Some("p")),
            &[
                ("node-0".to_string(), report("p", &[])),
                ("node-1".to_string(), report("p", &["10.1.1.2"])),
            ],
        );
        assert!(why.unwrap().contains("does not know its pod 10.1.0.2"));
        // A gateway that did not answer.
        let why = not_in_force(
            cluster,
            "new",
            &controller(Some("new"), Some("p")),
            &[("node-0".to_string(), Err("refused".into()))],
        );
        assert!(why.unwrap().contains("refused"));
    }

    #[test]
    fn peers_enforce_a_change_once_they_hold_its_revision() {
        let lab = LabState::new("t", 2, 1, 1).unwrap();
        let peer = &lab.clusters[1];
        let holding = |revision: Option<u64>, session: bool| {
            let mut status = controller(None, Some("p"));
            status.remotes = vec![trellis_core::status::RemoteStatus {
                cluster: "c1".parse().unwrap(),
                session,
                synced: true,
                ready: true,
                revision,
                last_sync_unix: None,
                last_sync_age_seconds: None,
                lag_seconds: None,
                nodes: 1,
                services: 0,
                endpoints: 0,
                refused: vec![],
                refused_claims: vec![],
                refused_claims_total: 0,
            }];
            status
        };
        let enforcing = [("node-0".to_string(), report("p", &[]))];
        let why = peer_not_in_force("c1", 7, peer, &holding(Some(6), true), &enforcing);
        assert!(
            why.unwrap()
                .contains("holds revision Some(6) of c1, not yet 7")
        );
        assert_eq!(
            peer_not_in_force("c1", 7, peer, &holding(Some(7), true), &enforcing),
            None
        );
        let behind = [("node-0".to_string(), report("old", &[]))];
        let why = peer_not_in_force("c1", 7, peer, &holding(Some(8), true), &behind);
        assert!(
            why.unwrap()
                .starts_with("c2: the gateway of node-0 enforces policy old")
        );
        // Not connected to c1, or not peered at all: nothing to wait for.
        assert_eq!(
            peer_not_in_force("c1", 7, peer, &holding(Some(1), false), &behind),
            None
        );
        assert_eq!(
            peer_not_in_force("c3", 7, peer, &holding(Some(1), true), &behind),
            None
        );
    }

    #[test]
    fn without_policy_or_digests_there_is_nothing_more_to_wait_for() {
        let lab = lab();
        assert_eq!(
            not_in_force(&lab.clusters[0], "new", &controller(Some("new"), None), &[]),
            None
        );
        assert_eq!(
            not_in_force(&lab.clusters[0], "new", &controller(None, None), &[]),
            None
        );
    }

    #[test]
    fn pod_namespaces_cannot_collide() {
        let names = LabNames {
            lab: "l",
            cluster: "c1",
        };
        let pod = |namespace: &str, name: &str| PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            labels: Default::default(),
            node: None,
            ports: vec![],
        };
        assert_eq!(names.netns(&pod("x", "a")), "tl-l-c1-x.a");
        assert_ne!(names.netns(&pod("a-b", "c")), names.netns(&pod("a", "b-c")));
        assert_eq!(names.container_id(&pod("x", "a")), "l-c1-x.a");
    }
}
