//! Building, showing and removing a lab.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use trellis_cni::runtime::{Attachment, ConfList, Runtime};
use trellis_netns::{Netlink, Netns, VethSpec, sysctl};

use super::processes::Launch;
use super::topology::{
    GATEWAY_METRICS_PORT, LabState, Node, Topology, UNDERLAY_PREFIX, namespace_prefix,
};
use super::{connectivity, control, processes, services};
use crate::table::Table;

/// The underlay's MTU, as on most clouds and kind.
pub(super) const UNDERLAY_MTU: u32 = 1500;
/// The pod MTU: the underlay less WireGuard's 80 bytes.
const POD_MTU: u32 = UNDERLAY_MTU - 80;
/// How long the connectivity matrix waits for each probe (generous: the machine may be busy).
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The bridge inside the switch namespace.
pub(super) const SWITCH_BRIDGE: &str = "br0";

pub(super) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts")
        .block_on(future)
}

pub(super) fn conflist(dir: &Path, node: &Node) -> anyhow::Result<(PathBuf, ConfList)> {
    let list = json!({
        "cniVersion": "1.1.0",
        "name": "trellis",
        "plugins": [{
            "type": "trellis-cni",
            "podCIDRs": [node.pod_cidr],
            "mtu": POD_MTU,
            "dataDir": dir.join("cni-state").join(&node.netns),
            "gatewayReadyFile": gateway_ready_file(dir, node),
        }]
    });
    let path = dir.join("cni").join(format!("{}.conflist", node.netns));
    fs::create_dir_all(path.parent().expect("has a parent"))?;
    fs::write(&path, serde_json::to_vec_pretty(&list)?)?;
    Ok((path, serde_json::from_value(list)?))
}

/// What the node's gateway writes once its plan is in place, and the node's CNI plugin waits
/// for before it wires a pod (under the lab's directory in /run: gone after a reboot).
fn gateway_ready_file(dir: &Path, node: &Node) -> PathBuf {
    dir.join("nodes").join(&node.netns).join("gateway.ready")
}

pub(super) fn runtime_for(node: &Node, bin_dir: &Path) -> anyhow::Result<Runtime> {
    Ok(Runtime {
        plugin_dirs: vec![bin_dir.to_path_buf()],
        node: Some(Netns::open(&node.netns)?),
        env: Vec::new(),
    })
}

fn attachment(pod: &super::topology::Pod) -> Attachment {
    pod_attachment(
        &pod.container_id,
        &pod.netns,
        super::objects::DEFAULT_NAMESPACE,
        &pod.name,
    )
}

/// What a runtime tells the CNI plugin about a pod.
pub(super) fn pod_attachment(
    container_id: &str,
    netns: &str,
    namespace: &str,
    name: &str,
) -> Attachment {
    Attachment {
        container_id: container_id.to_string(),
        netns: Path::new(trellis_netns::NETNS_RUN_DIR).join(netns),
        ifname: "eth0".into(),
        args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), namespace.to_string()),
            ("K8S_POD_NAME".into(), name.to_string()),
        ],
        capabilities: Default::default(),
    }
}

/// The first IPv4 address of a CNI result.
pub(super) fn result_address(result: &serde_json::Value) -> Option<std::net::Ipv4Addr> {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
}

async fn prepare_switch(name: &str) -> anyhow::Result<()> {
    let netns = Netns::create(name)?;
    let netlink = Netlink::connect_in(&netns)?;
    let lo = netlink.require_link("lo").await?;
    netlink.set_up(lo.index).await?;
    netlink.add_bridge(SWITCH_BRIDGE).await?;
    let bridge = netlink.require_link(SWITCH_BRIDGE).await?;
    netlink.set_up(bridge.index).await?;
    Ok(())
}

/// A node namespace with its uplink `eth0` plugged into the switch's bridge.
async fn prepare_node(switch: &Netlink, node: &Node) -> anyhow::Result<()> {
    let netns = Netns::create(&node.netns)?;
    let netlink = Netlink::connect_in(&netns)?;
    let lo = netlink.require_link("lo").await?;
    netlink.set_up(lo.index).await?;
    switch
        .add_veth(&VethSpec {
            name: &node.switch_port,
            peer_name: "eth0",
            peer_netns: Some(&netns),
            mtu: Some(UNDERLAY_MTU),
        })
        .await?;
    let port = switch.require_link(&node.switch_port).await?;
    let bridge = switch.require_link(SWITCH_BRIDGE).await?;
    switch.set_master(port.index, bridge.index).await?;
    switch.set_up(port.index).await?;
    let uplink = netlink.require_link("eth0").await?;
    netlink
        .add_address(
            uplink.index,
            ipnet::IpNet::new(std::net::IpAddr::V4(node.address), UNDERLAY_PREFIX)?,
        )
        .await?;
    netlink.set_up(uplink.index).await?;
    sysctl::write(Some(&netns), "net/ipv4/ip_forward", "1")?;
    Ok(())
}

pub(super) async fn prepare_pod_namespace(name: &str) -> anyhow::Result<()> {
    let netns = Netns::create(name)?;
    let netlink = Netlink::connect_in(&netns)?;
    let lo = netlink.require_link("lo").await?;
    netlink.set_up(lo.index).await?;
    Ok(())
}

pub fn up(dir: &Path, topology: &Topology, bin_dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    if dir.exists() {
        bail!(
            "lab {:?} is already up (its state is in {}); run `trellis lab down --name {}` first",
            topology.lab,
            dir.display(),
            topology.lab
        );
    }
    let prefix = namespace_prefix(&topology.lab);
    let leftovers: Vec<String> = Netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    if !leftovers.is_empty() {
        bail!(
            "namespaces of an earlier lab {:?} remain ({}); run `trellis lab down --name {}` first",
            topology.lab,
            leftovers.join(", "),
            topology.lab
        );
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    // Recorded before anything is made, so `down` finds it all even if this process dies.
    let mut state: LabState = topology.clone();
    state.bin_dir = Some(bin_dir.to_path_buf());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64);
    for cluster in &mut state.clusters {
        cluster.exported_at = Some(now);
    }
    state.save(dir)?;

    let outcome = build(dir, &mut state, bin_dir);
    state.save(dir)?;
    if let Err(error) = outcome {
        return Err(error.context(format!(
            "building the lab failed; `trellis lab down --name {}` removes what was made",
            topology.lab
        )));
    }
    let built_in = started.elapsed();
    print_summary(&state, built_in);
    Ok(())
}

fn build(dir: &Path, state: &mut LabState, bin_dir: &Path) -> anyhow::Result<()> {
    let node_count: usize = state.clusters.iter().map(|c| c.nodes.len()).sum();
    let pod_count = state.pods().count();
    eprintln!("[1/6] underlay and nodes: a switch and {node_count} node namespace(s)");
    block_on(async {
        prepare_switch(&state.switch_netns)
            .await
            .context("the switch")?;
        let switch = Netlink::connect_in(&Netns::open(&state.switch_netns)?)?;
        for node in state.clusters.iter().flat_map(|c| &c.nodes) {
            prepare_node(&switch, node)
                .await
                .with_context(|| format!("node {}", node.netns))?;
        }
        anyhow::Ok(())
    })?;
    // As a node boots on Kubernetes: the control plane, then each node's gateway (its plan
    // in place, its ready file written), and only then pods, which the CNI plugin refuses
    // to wire before that.
    eprintln!("[2/6] control plane: mesh certificates and a trellis-controller per cluster");
    start_controllers(dir, state, bin_dir)?;
    eprintln!(
        "[3/6] gateways: trellis-gateway on {node_count} node(s), following their controllers"
    );
    start_gateways(dir, state, bin_dir)?;
    eprintln!("[4/6] pods: creating {pod_count} pod(s) through trellis-cni");
    for cluster in &mut state.clusters {
        for node in &mut cluster.nodes {
            let (_, list) = conflist(dir, node)?;
            let runtime = runtime_for(node, bin_dir)?;
            for pod in &mut node.pods {
                block_on(prepare_pod_namespace(&pod.netns))
                    .with_context(|| format!("pod {}", pod.netns))?;
                let result = runtime
                    .add(&list, &attachment(pod))
                    .with_context(|| format!("CNI ADD for {}/{}", cluster.name, pod.name))?;
                pod.address = result_address(&result);
                pod.cni_result = Some(result);
            }
        }
    }
    state.save(dir)?;
    eprintln!(
        "[5/6] workload and DNS: an echo server in every pod, the demo Services (rules on every node, endpoints to the controllers), trellis-dns and the clusterset VIPs' proxy per cluster"
    );
    start_workload(dir, state, bin_dir)?;
    start_dns(dir, state, bin_dir)?;
    start_proxies(dir, state, bin_dir)?;
    eprintln!("[6/6] waiting for the mesh to converge");
    // Under NetworkPolicy a node drops the traffic of pods it has not been told about: every
    // controller must have read its pods and every node enforce what it was sent first.
    for cluster in &state.clusters {
        let digest = trellis_core::sha256_hex(&fs::read(
            control::cluster_dir(dir, cluster).join("cluster.yaml"),
        )?);
        super::apply::wait_in_force(cluster, &digest, super::apply::IN_FORCE_WITHIN)?;
    }
    wait_for_mesh(state);
    Ok(())
}

/// How long a daemon may take to accept connections after it started.
const READY_WITHIN: Duration = Duration::from_secs(15);

/// Starts a daemon, records it at once (so `down` finds it even if `up` dies next), and waits
/// until it accepts connections on its ready address.
pub(super) fn start_daemon(dir: &Path, state: &mut LabState, launch: Launch) -> anyhow::Result<()> {
    let daemon = processes::spawn(&launch)?;
    state.daemons.push(daemon);
    state.save(dir)?;
    processes::wait_ready(&launch, READY_WITHIN)
}

/// Starts again every recorded daemon that `selector` names and that is not running, in the
/// order `up` started them (controllers before the gateways and DNS that follow them).
pub fn start(dir: &Path, state: &mut LabState, selector: &str) -> anyhow::Result<()> {
    let mut matched = 0;
    for index in 0..state.daemons.len() {
        let daemon = &state.daemons[index];
        if !processes::selects(selector, &daemon.launch.name) {
            continue;
        }
        matched += 1;
        if daemon.is_running() {
            continue;
        }
        let launch = daemon.launch.clone();
        state.daemons[index] = processes::spawn(&launch)?;
        state.save(dir)?;
        processes::wait_ready(&launch, READY_WITHIN)?;
        println!("started {} (pid {})", launch.name, state.daemons[index].pid);
    }
    if matched == 0 {
        bail!(
            "no daemon of lab {:?} is named {selector:?} (try c1, c1/controller, c1/node-0/gateway)",
            state.lab
        );
    }
    Ok(())
}

/// Stops (SIGTERM, then SIGKILL after a grace period) every running daemon `selector` names.
pub fn stop(state: &LabState, selector: &str) -> anyhow::Result<()> {
    let selected: Vec<_> = state
        .daemons
        .iter()
        .filter(|d| processes::selects(selector, &d.launch.name))
        .collect();
    if selected.is_empty() {
        bail!(
            "no daemon of lab {:?} is named {selector:?} (try c1, c1/controller, c1/node-0/gateway)",
            state.lab
        );
    }
    for daemon in selected.into_iter().filter(|d| d.is_running()) {
        daemon.stop(Duration::from_secs(3))?;
        println!("stopped {} (pid {})", daemon.launch.name, daemon.pid);
    }
    Ok(())
}

/// `trellis echo-server` in every pod, and in every node the nftables rules kube-proxy would
/// write for the cluster's Services.
fn start_workload(dir: &Path, state: &mut LabState, bin_dir: &Path) -> anyhow::Result<()> {
    let clusters = state.clusters.clone();
    for (index, cluster) in clusters.iter().enumerate() {
        // The pods' addresses become the Services' endpoints in the controller's source (it
        // polls the file, as a controller watches EndpointSlices appear).
        crate::cni::write_atomically(
            &control::cluster_dir(dir, cluster).join("cluster.yaml"),
            control::cluster_yaml(cluster, index).as_bytes(),
            0o644,
        )?;
        let demo = services::demo_services(cluster, index);
        for node in &cluster.nodes {
            services::apply_ruleset(
                &Netns::open(&node.netns)?,
                &services::proxy_ruleset(cluster, node, &demo),
            )
            .with_context(|| format!("services on {}/{}", cluster.name, node.name))?;
            for pod in &node.pods {
                let Some(address) = pod.address else {
                    continue;
                };
                let pod_dir = dir.join("pods").join(&pod.netns);
                fs::create_dir_all(&pod_dir)?;
                let identity = format!("{}/{}", cluster.name, pod.name);
                start_daemon(
                    dir,
                    state,
                    Launch {
                        netns: pod.netns.clone(),
                        name: format!("{identity}/echo"),
                        program: bin_dir.join("trellis"),
                        args: vec![
                            "echo-server".into(),
                            "--identity".into(),
                            identity,
                            "--tcp".into(),
                            format!("0.0.0.0:{}", services::ECHO_PORT),
                            "--http".into(),
                            format!("0.0.0.0:{}", services::HTTP_TARGET_PORT),
                        ],
                        log: pod_dir.join("echo.log"),
                        ready: std::net::SocketAddr::new(address.into(), services::ECHO_PORT),
                        ready_path: None,
                        ready_file: None,
                    },
                )?;
            }
        }
    }
    Ok(())
}

/// Per cluster: its objects as a static source, its controller configuration, and the
/// controller itself on the cluster's first node.
fn start_controllers(dir: &Path, state: &mut LabState, bin_dir: &Path) -> anyhow::Result<()> {
    control::write_credentials(dir, state)?;
    let clusters = state.clusters.clone();
    for (index, cluster) in clusters.iter().enumerate() {
        let own = control::cluster_dir(dir, cluster);
        fs::create_dir_all(&own)?;
        fs::write(
            own.join("cluster.yaml"),
            control::cluster_yaml(cluster, index),
        )?;
        // With two replicas the first to start leads; the other follows (ready once its
        // metrics answer).
        for replica in control::controller_replicas(dir, state, cluster) {
            fs::write(
                &replica.config,
                control::replica_yaml(dir, state, cluster, state.node_encryption, &replica),
            )?;
            start_daemon(
                dir,
                state,
                Launch {
                    netns: cluster.nodes[0].netns.clone(),
                    name: replica.name.clone(),
                    program: bin_dir.join("trellis-controller"),
                    args: vec![
                        "run".into(),
                        "--config".into(),
                        replica.config.display().to_string(),
                    ],
                    log: replica.log.clone(),
                    ready: replica.metrics,
                    ready_path: None,
                    ready_file: None,
                },
            )?;
        }
    }
    Ok(())
}

/// One trellis-dns per cluster beside its controller, answering for `clusterset.local` from the
/// controller's stream. Nothing in the lab asks it for other names and the lab has no way out,
/// so forwarding stays off (no `--forward-for`): out-of-zone names get REFUSED.
fn start_dns(dir: &Path, state: &mut LabState, bin_dir: &Path) -> anyhow::Result<()> {
    let clusters = state.clusters.clone();
    for cluster in &clusters {
        let address = std::net::IpAddr::V4(control::controller_address(cluster));
        let listen = std::net::SocketAddr::new(address, control::DNS_PORT);
        let metrics = std::net::SocketAddr::new(address, control::DNS_METRICS_PORT);
        start_daemon(
            dir,
            state,
            Launch {
                netns: cluster.nodes[0].netns.clone(),
                name: format!("{}/dns", cluster.name),
                program: bin_dir.join("trellis-dns"),
                args: [
                    "--listen".into(),
                    listen.to_string(),
                    "--metrics".into(),
                    metrics.to_string(),
                    "--controller".into(),
                    control::agent_endpoint(cluster).to_string(),
                ]
                .into_iter()
                .chain(control::agent_flags(
                    dir,
                    &trellis_core::agent::AgentIdentity::Dns {
                        cluster: cluster.name.clone(),
                    },
                ))
                .collect(),
                log: control::cluster_dir(dir, cluster).join("dns.log"),
                ready: metrics,
                ready_path: Some("/readyz".into()),
                ready_file: None,
            },
        )?;
    }
    Ok(())
}

/// Per cluster the kube-proxy stand-in of its clusterset VIPs (`trellis lab proxy`), beside
/// its controller: it follows the imports as DNS does, with DNS's agent certificate, and is
/// ready once every node has its first table.
fn start_proxies(dir: &Path, state: &mut LabState, bin_dir: &Path) -> anyhow::Result<()> {
    let clusters = state.clusters.clone();
    for cluster in &clusters {
        start_daemon(
            dir,
            state,
            Launch {
                netns: cluster.nodes[0].netns.clone(),
                name: format!("{}/proxy", cluster.name),
                program: bin_dir.join("trellis"),
                args: vec![
                    "lab".into(),
                    "--name".into(),
                    state.lab.clone(),
                    "proxy".into(),
                    "--cluster".into(),
                    cluster.name.clone(),
                ],
                log: control::cluster_dir(dir, cluster).join("proxy.log"),
                ready: control::agent_endpoint(cluster),
                ready_path: None,
                ready_file: Some(super::clusterset::ready_file(dir, cluster)),
            },
        )?;
    }
    Ok(())
}

/// One trellis-gateway per node, registered with its cluster's controller.
fn start_gateways(dir: &Path, state: &mut LabState, bin_dir: &Path) -> anyhow::Result<()> {
    let clusters = state.clusters.clone();
    for cluster in &clusters {
        for node in &cluster.nodes {
            let node_dir = dir.join("nodes").join(&node.netns);
            fs::create_dir_all(&node_dir)?;
            let metrics =
                std::net::SocketAddr::new(std::net::IpAddr::V4(node.address), GATEWAY_METRICS_PORT);
            let mut args: Vec<String> = vec![
                "run".into(),
                "--state-dir".into(),
                node_dir.join("gateway").display().to_string(),
                "--controller".into(),
                control::agent_endpoint(cluster).to_string(),
            ];
            args.extend(control::agent_flags(
                dir,
                &control::node_identity(cluster, &node.name),
            ));
            args.extend([
                "--node-name".into(),
                node.name.clone(),
                "--advertise-endpoint".into(),
                format!("{}:51820", node.address),
                "--metrics-addr".into(),
                metrics.to_string(),
                "--ready-file".into(),
                gateway_ready_file(dir, node).display().to_string(),
            ]);
            if let Some(buffer) = state.flow_buffer {
                args.extend(["--flow-buffer".into(), buffer.to_string()]);
            }
            start_daemon(
                dir,
                state,
                Launch {
                    netns: node.netns.clone(),
                    name: format!("{}/{}/gateway", cluster.name, node.name),
                    program: bin_dir.join("trellis-gateway"),
                    args,
                    log: node_dir.join("gateway.log"),
                    ready: metrics,
                    ready_path: Some("/readyz".into()),
                    ready_file: None,
                },
            )?;
        }
    }
    Ok(())
}

/// Polls the connectivity matrix until every pair answers (or a deadline passes; the summary
/// then shows what failed).
fn wait_for_mesh(state: &LabState) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if connectivity::all_ok(&connectivity::measure(state, Duration::from_millis(300))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(super) fn print_layout(state: &LabState) {
    for cluster in &state.clusters {
        println!("cluster {} (pods {})", cluster.name, cluster.pod_cidr);
        let mut table = Table::new(&["NODE/POD", "ADDRESS", "POD CIDR", "NETNS"]);
        for node in &cluster.nodes {
            table.row([
                node.name.clone(),
                node.address.to_string(),
                node.pod_cidr.to_string(),
                node.netns.clone(),
            ]);
            for pod in &node.pods {
                let address = pod.address.map_or("-".to_string(), |a| a.to_string());
                table.row([
                    format!("  {}", pod.name),
                    address,
                    String::new(),
                    pod.netns.clone(),
                ]);
            }
            for pod in cluster
                .objects
                .pods
                .values()
                .filter(|p| p.node == node.name)
            {
                let address = pod.address.map_or("-".to_string(), |a| a.to_string());
                table.row([
                    format!("  {}/{}", cluster.name, pod.spec.key()),
                    address,
                    String::new(),
                    pod.netns.clone(),
                ]);
            }
        }
        print!("{}", table.render("  "));
    }
}

fn print_summary(state: &LabState, built_in: Duration) {
    println!();
    println!(
        "lab {:?} is up ({:.1} s)",
        state.lab,
        built_in.as_secs_f64()
    );
    print_layout(state);
    let all_ok = connectivity::print(&connectivity::measure(state, PROBE_TIMEOUT));
    let example_pod = state
        .pods()
        .next()
        .map(|(c, _, p)| format!("{}/{}", c.name, p.name))
        .unwrap_or_default();
    // The last pod: in another cluster when there is one, so the example crosses the mesh.
    let example_target = state
        .pods()
        .last()
        .and_then(|(_, _, p)| p.address)
        .map_or("10.1.0.1".to_string(), |a| a.to_string());
    println!();
    print_services_and_metrics(state);
    let lab = &state.lab;
    println!();
    println!("try:   trellis lab exec --name {lab} {example_pod} -- ping -c 3 {example_target}");
    if let Some(cluster) = state.clusters.first() {
        let dns = control::controller_address(cluster);
        let (service, namespace) = (services::ECHO_SERVICE, services::DEMO_NAMESPACE);
        let name = format!("{service}.{namespace}.svc.clusterset.local");
        // One address, the cluster's clusterset VIP; each request goes to a pod of any
        // cluster, which sees the client pod's own address.
        println!("       trellis lab exec --name {lab} {example_pod} -- dig +short @{dns} {name}");
        println!(
            "       trellis lab exec --name {lab} {example_pod} -- sh -c 'curl -s http://$(dig +short @{dns} {name})/'"
        );
    }
    println!("       trellis lab encryption on --name {lab}");
    println!("       trellis lab stop c1/controller --name {lab}   (then: start)");
    println!("       trellis lab status --name {lab}");
    println!(
        "       trellis lab observe --name {lab} --last 20   (or -f: connections as they come)"
    );
    println!("       trellis lab down --name {lab}");
    if !all_ok {
        println!("warning: some pods could not reach each other (see FAIL above)");
    }
}

/// The exported Services and where every daemon serves its metrics (addresses inside the lab:
/// reach them from a node, e.g. `trellis lab exec c1/node-0 -- curl -s http://ADDRESS/metrics`).
fn print_services_and_metrics(state: &LabState) {
    println!(
        "services: {}.{} (ClusterIP; TCP echo {}, HTTP {}; from any cluster at its clusterset VIP, balanced over every cluster's pods) and {}.{} (headless), exported by every cluster",
        services::ECHO_SERVICE,
        services::DEMO_NAMESPACE,
        services::ECHO_PORT,
        services::HTTP_PORT,
        services::HEADLESS_SERVICE,
        services::DEMO_NAMESPACE
    );
    println!(
        "metrics (from inside the lab, e.g. trellis lab exec c1/node-0 -- curl -s http://198.18.1.10:9464/metrics):"
    );
    let mut table = Table::new(&[
        "CLUSTER",
        "CLUSTERIP",
        "CLUSTERSET VIPS",
        "CONTROLLER",
        "DNS",
        "GATEWAYS",
    ]);
    for (index, cluster) in state.clusters.iter().enumerate() {
        let first = control::controller_address(cluster);
        let gateways: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("{}:{GATEWAY_METRICS_PORT}", n.address))
            .collect();
        table.row([
            cluster.name.clone(),
            services::echo_cluster_ip(index).to_string(),
            super::clusterset::clusterset_ip_range(index),
            format!("{first}:{}", control::CONTROLLER_METRICS_PORT),
            format!(
                "{first}:{} (DNS on :{})",
                control::DNS_METRICS_PORT,
                control::DNS_PORT
            ),
            gateways.join(" "),
        ]);
    }
    print!("{}", table.render("  "));
}

/// Rewrites every controller's configuration with the new mode (atomically: temp file and
/// rename); the controllers pick it up within seconds and push it to their gateways.
pub fn set_node_encryption(dir: &Path, state: &mut LabState, on: bool) -> anyhow::Result<()> {
    state.node_encryption = on;
    for cluster in &state.clusters {
        for replica in control::controller_replicas(dir, state, cluster) {
            crate::cni::write_atomically(
                &replica.config,
                control::replica_yaml(dir, state, cluster, on, &replica).as_bytes(),
                0o644,
            )?;
        }
    }
    state.save(dir)?;
    println!(
        "node encryption {} in every cluster (controllers push it to their gateways; cross-cluster traffic is always encrypted)",
        if on { "on" } else { "off" }
    );
    Ok(())
}

pub fn exec(state: &LabState, target: &str, command: &[String]) -> anyhow::Result<ExitCode> {
    let netns_name = state.netns_of(target).with_context(|| {
        format!(
            "no pod or node {target:?} in lab {:?} (try c1/pod-0, c1/NAMESPACE/POD or c1/node-0)",
            state.lab
        )
    })?;
    let netns = Netns::open(netns_name)?;
    let (program, args) = command.split_first().context("no command given")?;
    let mut child = netns
        .spawn(Command::new(program).args(args))?
        .with_context(|| format!("run {program}"))?;
    let status = child.wait()?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

/// Removes everything of lab `name`: pods through CNI DEL (as a runtime would), then every
/// namespace with the lab's prefix, then its state. Carries on past failures and reports all.
pub fn down(dir: &Path, name: &str) -> anyhow::Result<()> {
    let mut failures: Vec<String> = Vec::new();
    // CNI DEL first, as a runtime tears pods down; deleting the node namespaces afterwards
    // removes anything DEL could not, so a failed DEL is only a warning.
    if let Ok(state) = LabState::load(dir)
        && let Some(bin_dir) = &state.bin_dir
    {
        for cluster in &state.clusters {
            for node in &cluster.nodes {
                let (Ok((_, list)), Ok(runtime)) =
                    (conflist(dir, node), runtime_for(node, bin_dir))
                else {
                    continue;
                };
                for pod in node.pods.iter().filter(|p| p.cni_result.is_some()) {
                    if let Err(error) =
                        runtime.del(&list, &attachment(pod), pod.cni_result.as_ref())
                    {
                        eprintln!("warning: CNI DEL {}/{}: {error}", cluster.name, pod.name);
                    }
                }
                for pod in cluster
                    .objects
                    .pods
                    .values()
                    .filter(|p| p.node == node.name && p.cni_result.is_some())
                {
                    let attachment = pod_attachment(
                        &pod.container_id,
                        &pod.netns,
                        &pod.spec.namespace,
                        &pod.spec.name,
                    );
                    if let Err(error) = runtime.del(&list, &attachment, pod.cni_result.as_ref()) {
                        eprintln!(
                            "warning: CNI DEL {}/{}: {error}",
                            cluster.name,
                            pod.spec.key()
                        );
                    }
                }
            }
        }
    }
    let prefix = namespace_prefix(name);
    let namespaces: Vec<String> = Netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // Processes first: the recorded daemons, then anything else still inside a lab namespace
    // (a daemon whose record was lost with a crash, a command from `trellis lab exec`).
    if let Ok(state) = LabState::load(dir) {
        for daemon in &state.daemons {
            if let Err(error) = daemon.stop(Duration::from_secs(3)) {
                failures.push(format!("{error:#}"));
            }
        }
    }
    for netns in &namespaces {
        failures.extend(processes::stop_all_in(netns, Duration::from_secs(3)));
    }
    let mut removed = 0;
    for netns in Netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
    {
        match Netns::delete(&netns) {
            Ok(()) => removed += 1,
            Err(error) => failures.push(error.to_string()),
        }
    }
    if dir.exists()
        && let Err(error) = fs::remove_dir_all(dir)
    {
        failures.push(format!("remove {}: {error}", dir.display()));
    }
    if failures.is_empty() {
        println!("lab {name:?} is down ({removed} namespaces removed)");
        Ok(())
    } else {
        bail!(
            "lab {name:?} teardown had {} failure(s):\n  {}",
            failures.len(),
            failures.join("\n  ")
        )
    }
}
