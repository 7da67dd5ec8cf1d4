//! `trellis lab peer add|remove|list`: an external machine (a laptop, a VM) in the lab — a
//! namespace on the underlay running Debian's wireguard-go with the wg-quick config a new
//! `Peer` gets, attached through one node's gateway.
//!
//! `add` writes the `Peer` into the cluster's static source (as `trellis lab apply` would),
//! waits until the controller accepts it and the node's gateway has it, then starts the
//! machine. wireguard-go's control socket lives in `/run/wireguard`, shared by every network
//! namespace: the machine runs in a private mount namespace with its own tmpfs there, so two
//! lab peers (or a benchmark's `wg0`) never collide. `remove` stops it, deletes its namespace
//! and the `Peer`; `lab down` removes the namespace with the lab's others (it has the lab's
//! prefix) and stops the recorded daemon.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::wgkey::PublicKey;
use trellis_gateway::peer_config::{ExternalPeer, render_wg_quick};
use trellis_netns::{Netlink, Netns, VethSpec};

use super::LabState;
use super::objects::{Manifest, PassedKind};
use super::processes::Launch;
use super::topology::{Cluster, Node, UNDERLAY_PREFIX, namespace_prefix};

/// The port every lab gateway listens on (its `--advertise-endpoint`).
const GATEWAY_PORT: u16 = 51820;
/// The interface of the machine's tunnel.
const TUNNEL: &str = "wg0";
/// What the machine's tunnel carries: the underlay's MTU minus WireGuard's overhead.
const TUNNEL_MTU: u32 = 1420;
/// Keepalive the machine sends (it is behind no NAT here, but it makes the first handshake
/// go out at once, as a laptop's config would).
const KEEPALIVE: u16 = 25;
/// The third octet of the machines' addresses inside a cluster's pod range: beyond every
/// node's block (a lab has at most 50 nodes: blocks 0–49).
const PEER_BLOCK: u8 = 250;
/// How long `add` waits for the controller and the gateway.
const ACCEPTED_WITHIN: Duration = Duration::from_secs(20);

#[derive(Args)]
pub struct LabPeerArgs {
    #[command(subcommand)]
    command: LabPeerCommand,
}

#[derive(Subcommand)]
enum LabPeerCommand {
    /// Add an external machine: a fresh key, a `Peer` in the cluster's source, a namespace on
    /// the underlay running wireguard-go with the printed wg-quick config. It reaches the pods
    /// and services of every cluster of the lab, and they reach it.
    Add {
        /// The machine's name (its `Peer`'s).
        #[arg(value_name = "NAME")]
        peer: String,
        /// The cluster whose node carries it.
        #[arg(long, default_value = "c1")]
        cluster: String,
        /// The node whose gateway it connects to.
        #[arg(long, default_value = "node-0")]
        node: String,
        /// Its address in the mesh (inside the cluster's pod range, outside every node's
        /// block); the next free one of `10.<c>.250.0/24` when left out.
        #[arg(long)]
        address: Option<Ipv4Net>,
    },
    /// Remove the machine, its namespace and its `Peer`.
    Remove {
        #[arg(value_name = "NAME")]
        peer: String,
    },
    /// The lab's external machines.
    List,
}

/// What the lab made for one machine, kept in `peers/<name>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPeer {
    pub name: String,
    pub cluster: String,
    pub node: String,
    pub netns: String,
    /// The switch-side end of its uplink.
    pub switch_port: String,
    pub underlay: Ipv4Addr,
    pub address: Ipv4Net,
    pub public_key: PublicKey,
}

impl LabPeer {
    fn daemon_name(&self) -> String {
        format!("peer/{}", self.name)
    }
}

fn peers_dir(dir: &Path) -> PathBuf {
    dir.join("peers")
}

fn record_path(dir: &Path, name: &str) -> PathBuf {
    peers_dir(dir).join(format!("{name}.json"))
}

/// Every machine the lab made, by name.
pub fn recorded(dir: &Path) -> Vec<LabPeer> {
    let Ok(entries) = fs::read_dir(peers_dir(dir)) else {
        return Vec::new();
    };
    let mut peers: Vec<LabPeer> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
        .collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    peers
}

pub fn run(dir: &Path, lab: &str, args: LabPeerArgs) -> anyhow::Result<()> {
    match args.command {
        LabPeerCommand::List => {
            let peers = recorded(dir);
            if peers.is_empty() {
                println!("no external peers");
            }
            for p in peers {
                println!(
                    "{}\t{}/{}\t{}\tunderlay {}\tkey {}",
                    p.name, p.cluster, p.node, p.address, p.underlay, p.public_key
                );
            }
            Ok(())
        }
        LabPeerCommand::Add {
            peer: name,
            cluster,
            node,
            address,
        } => {
            let _turn = super::one_change_at_a_time(dir, lab)?;
            let mut state =
                LabState::load(dir).with_context(|| format!("lab {lab:?} is not up"))?;
            add(dir, &mut state, &name, &cluster, &node, address)
        }
        LabPeerCommand::Remove { peer: name } => {
            let _turn = super::one_change_at_a_time(dir, lab)?;
            let mut state =
                LabState::load(dir).with_context(|| format!("lab {lab:?} is not up"))?;
            remove(dir, &mut state, &name)
        }
    }
}

/// The `Peer` object, as `kubectl apply` would take it.
pub fn peer_document(name: &str, public_key: &PublicKey, address: Ipv4Net, node: &str) -> Value {
    json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "Peer",
        "metadata": {"name": name},
        "spec": {
            "publicKey": public_key.to_string(),
            "allowedIPs": [address.to_string()],
            "nodes": [node],
        },
    })
}

/// What a lab machine routes into the mesh: every cluster's pod and service ranges.
pub fn mesh_ranges(state: &LabState) -> anyhow::Result<Vec<IpNet>> {
    let mut out = Vec::new();
    for (index, cluster) in state.clusters.iter().enumerate() {
        out.push(cluster.pod_cidr);
        out.push(super::services::service_cidr(index).parse()?);
    }
    Ok(out)
}

/// The next free machine address of the cluster (`10.<c>.250.<n>/32`), given those taken.
pub fn next_address(cluster: &Cluster, taken: &[Ipv4Net]) -> anyhow::Result<Ipv4Net> {
    let IpNet::V4(pods) = cluster.pod_cidr else {
        bail!("cluster {} has no IPv4 pod range", cluster.name);
    };
    let [a, b, ..] = pods.network().octets();
    (1..=254u8)
        .map(|n| Ipv4Net::new(Ipv4Addr::new(a, b, PEER_BLOCK, n), 32).expect("a /32"))
        .find(|candidate| !taken.contains(candidate))
        .context("every address of the lab's peer block is taken")
}

/// The next free underlay address for a machine (`198.19.250.<n>`: nodes use
/// `198.18.<c>.<10+n>`), and its switch port name.
pub fn next_underlay(taken: &[Ipv4Addr]) -> anyhow::Result<(Ipv4Addr, String)> {
    (1..=254u8)
        .map(|n| Ipv4Addr::new(198, 19, 250, n))
        .find(|a| !taken.contains(a))
        .map(|a| (a, format!("lp{}", a.octets()[3])))
        .context("every underlay address of the lab's peers is taken")
}

/// `wg setconf` input from a wg-quick file: what `wg-quick strip` leaves (the keys only
/// wg-quick knows removed).
pub fn setconf_text(wg_quick: &str) -> String {
    const WG_QUICK_ONLY: [&str; 9] = [
        "Address",
        "DNS",
        "MTU",
        "Table",
        "PreUp",
        "PostUp",
        "PreDown",
        "PostDown",
        "SaveConfig",
    ];
    let mut out = String::new();
    for line in wg_quick.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        if line.trim_start().starts_with('#') || WG_QUICK_ONLY.contains(&key) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The script the machine's namespace runs (inside `unshare -m --propagation private`): its
/// own `/run/wireguard`, wireguard-go in the foreground, configured with `wg setconf`, its
/// address and routes; `ready` once it is all in place; wireguard-go stopped with it.
pub fn machine_script(setconf: &Path, address: Ipv4Net, routes: &[IpNet], ready: &Path) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "set -eu");
    let _ = writeln!(s, "mkdir -p /run/wireguard");
    let _ = writeln!(s, "mount -t tmpfs trellis-lab-peer /run/wireguard");
    let _ = writeln!(
        s,
        "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f {TUNNEL} &"
    );
    let _ = writeln!(s, "wg_pid=$!");
    let _ = writeln!(
        s,
        "trap 'kill $wg_pid 2>/dev/null; wait $wg_pid; exit 0' TERM INT"
    );
    let _ = writeln!(s, "n=0");
    let _ = writeln!(
        s,
        "until [ -S /run/wireguard/{TUNNEL}.sock ]; do n=$((n+1)); if [ $n -gt 200 ]; then echo 'wireguard-go did not start' >&2; kill $wg_pid; exit 1; fi; sleep 0.05; done"
    );
    let _ = writeln!(s, "wg setconf {TUNNEL} {}", setconf.display());
    let _ = writeln!(s, "ip address add {address} dev {TUNNEL}");
    let _ = writeln!(s, "ip link set {TUNNEL} mtu {TUNNEL_MTU} up");
    for route in routes {
        let _ = writeln!(s, "ip route add {route} dev {TUNNEL}");
    }
    let _ = writeln!(s, "touch {}", ready.display());
    let _ = writeln!(s, "wait $wg_pid");
    s
}

fn find<'a>(
    state: &'a LabState,
    cluster: &str,
    node: &str,
) -> anyhow::Result<(&'a Cluster, &'a Node)> {
    let c = state
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .with_context(|| format!("lab {:?} has no cluster {cluster:?}", state.lab))?;
    let n = c
        .nodes
        .iter()
        .find(|n| n.name == node)
        .with_context(|| format!("cluster {cluster} has no node {node:?}"))?;
    Ok((c, n))
}

/// `trellis lab peer add`.
pub fn add(
    dir: &Path,
    state: &mut LabState,
    name: &str,
    cluster_name: &str,
    node_name: &str,
    address: Option<Ipv4Net>,
) -> anyhow::Result<()> {
    super::objects::validate_name("peer", name)?;
    if let Ok(bytes) = fs::read(record_path(dir, name)) {
        let existing: LabPeer = serde_json::from_slice(&bytes)?;
        println!(
            "peer/{name} exists ({} on {}/{}); its config is {}",
            existing.address,
            existing.cluster,
            existing.node,
            config_path(dir, name).display()
        );
        return Ok(());
    }
    let (cluster, node) = find(state, cluster_name, node_name)?;
    let (cluster, node) = (cluster.clone(), node.clone());
    let others = recorded(dir);
    let address = match address {
        Some(a) => a,
        None => next_address(
            &cluster,
            &others
                .iter()
                .filter(|p| p.cluster == cluster.name)
                .map(|p| p.address)
                .collect::<Vec<_>>(),
        )?,
    };
    let (underlay, switch_port) =
        next_underlay(&others.iter().map(|p| p.underlay).collect::<Vec<_>>())?;
    let gateway_dir = dir.join("nodes").join(&node.netns).join("gateway");
    let gateway_key = trellis_gateway::keys::KeyPair::load(&gateway_dir)
        .with_context(|| format!("the gateway key of {}/{}", cluster.name, node.name))?
        .public_key();
    let machine = trellis_gateway::keys::KeyPair::generate();
    let routes = mesh_ranges(state)?;
    let config = render_wg_quick(&ExternalPeer {
        private_key: machine.private_key_base64(),
        addresses: vec![IpNet::V4(address)],
        gateway_public_key: gateway_key,
        gateway_endpoint: SocketAddr::new(node.address.into(), GATEWAY_PORT),
        allowed_ips: routes.clone(),
        persistent_keepalive: Some(KEEPALIVE),
    });
    let record = LabPeer {
        name: name.to_string(),
        cluster: cluster.name.clone(),
        node: node.name.clone(),
        netns: format!("{}peer-{name}", namespace_prefix(&state.lab)),
        switch_port,
        underlay,
        address,
        public_key: machine.public_key(),
    };

    // The Peer first: refused, it leaves nothing behind.
    let document = peer_document(name, &record.public_key, address, &node.name);
    super::apply::apply(dir, state, &cluster.name, &[peer_manifest(name, document)])?;
    if let Err(refusal) = wait_accepted(state, &record) {
        super::apply::delete(
            dir,
            state,
            &cluster.name,
            &[peer_manifest(name, Value::Null)],
        )?;
        return Err(refusal.context(format!("peer/{name} removed again")));
    }

    fs::create_dir_all(peers_dir(dir))?;
    trellis_files::write_atomically(&config_path(dir, name), config.as_bytes(), 0o600)?;
    let setconf = peers_dir(dir).join(format!("{name}.setconf"));
    trellis_files::write_atomically(&setconf, setconf_text(&config).as_bytes(), 0o600)?;
    trellis_files::write_atomically(
        &record_path(dir, name),
        serde_json::to_vec_pretty(&record)?.as_slice(),
        0o644,
    )?;
    super::build::block_on(attach(state, &record))?;
    let ready = peers_dir(dir).join(format!("{name}.ready"));
    super::build::start_daemon(
        dir,
        state,
        Launch {
            name: record.daemon_name(),
            netns: record.netns.clone(),
            program: PathBuf::from("unshare"),
            args: vec![
                "-m".into(),
                "--propagation".into(),
                "private".into(),
                "sh".into(),
                "-c".into(),
                machine_script(&setconf, address, &routes, &ready),
            ],
            log: peers_dir(dir).join(format!("{name}.log")),
            ready: SocketAddr::new(underlay.into(), 0),
            ready_path: None,
            ready_file: Some(ready),
        },
    )?;
    println!(
        "peer/{name}: {address} in namespace {} (underlay {underlay}), through {}/{}",
        record.netns, cluster.name, node.name
    );
    println!(
        "  try: ip netns exec {} ping {}",
        record.netns,
        state.clusters[0].nodes[0]
            .pods
            .first()
            .and_then(|p| p.address)
            .map(|a| a.to_string())
            .unwrap_or_else(|| "<pod address>".into())
    );
    println!(
        "its wg-quick config ({}):",
        config_path(dir, name).display()
    );
    print!("{config}");
    Ok(())
}

fn config_path(dir: &Path, name: &str) -> PathBuf {
    peers_dir(dir).join(format!("{name}.conf"))
}

fn peer_manifest(name: &str, document: Value) -> Manifest {
    Manifest::Passed {
        kind: PassedKind::Peer,
        namespace: String::new(),
        name: name.to_string(),
        document,
    }
}

/// Waits until the controller accepts the peer and the node's gateway has it; a refusal
/// comes back at once with the controller's reason.
fn wait_accepted(state: &LabState, record: &LabPeer) -> anyhow::Result<()> {
    let (cluster, node) = find(state, &record.cluster, &record.node)?;
    let deadline = Instant::now() + ACCEPTED_WITHIN;
    let mut last = String::from("the controller has not judged it yet");
    loop {
        if let Ok(status) = super::status::fetch(cluster)
            && let Some(peer) = status.external_peers.iter().find(|p| p.name == record.name)
        {
            if !peer.verdict.ready && peer.verdict.reason != "NoGateway" {
                bail!(
                    "the controller of {} refused peer/{}: {}: {}",
                    cluster.name,
                    record.name,
                    peer.verdict.reason,
                    peer.verdict.message
                );
            }
            last = format!("{}: {}", peer.verdict.reason, peer.verdict.message);
            if peer.verdict.ready {
                match super::apply::gateway_report(node) {
                    Ok(report)
                        if report
                            .peers
                            .iter()
                            .any(|p| p.public_key == record.public_key) =>
                    {
                        return Ok(());
                    }
                    Ok(_) => last = format!("the gateway of {} has not applied it yet", node.name),
                    Err(e) => last = e,
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "peer/{} not in force within {ACCEPTED_WITHIN:?}: {last}",
                record.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The machine's namespace, its uplink plugged into the lab's switch.
async fn attach(state: &LabState, record: &LabPeer) -> anyhow::Result<()> {
    let switch_ns = Netns::open(&state.switch_netns)?;
    let switch = Netlink::connect_in(&switch_ns)?;
    let netns = Netns::create(&record.netns)?;
    let netlink = Netlink::connect_in(&netns)?;
    let lo = netlink.require_link("lo").await?;
    netlink.set_up(lo.index).await?;
    switch
        .add_veth(&VethSpec {
            name: &record.switch_port,
            peer_name: "eth0",
            peer_netns: Some(&netns),
            mtu: Some(super::build::UNDERLAY_MTU),
        })
        .await?;
    let port = switch.require_link(&record.switch_port).await?;
    let bridge = switch.require_link(super::build::SWITCH_BRIDGE).await?;
    switch.set_master(port.index, bridge.index).await?;
    switch.set_up(port.index).await?;
    let uplink = netlink.require_link("eth0").await?;
    netlink
        .add_address(
            uplink.index,
            IpNet::new(std::net::IpAddr::V4(record.underlay), UNDERLAY_PREFIX)?,
        )
        .await?;
    netlink.set_up(uplink.index).await?;
    Ok(())
}

/// `trellis lab peer remove`: the machine first (its process and namespace), then its `Peer`.
pub fn remove(dir: &Path, state: &mut LabState, name: &str) -> anyhow::Result<()> {
    let record: Option<LabPeer> = fs::read(record_path(dir, name))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let Some(record) = record else {
        bail!(
            "lab {:?} has no peer {name:?} (see `trellis lab peer list`)",
            state.lab
        );
    };
    let mut failures = Vec::new();
    let daemon_name = record.daemon_name();
    for daemon in state
        .daemons
        .iter()
        .filter(|d| d.launch.name == daemon_name)
    {
        if let Err(e) = daemon.stop(Duration::from_secs(3)) {
            failures.push(format!("{e:#}"));
        }
    }
    state.daemons.retain(|d| d.launch.name != daemon_name);
    state.save(dir)?;
    failures.extend(super::processes::stop_all_in(
        &record.netns,
        Duration::from_secs(3),
    ));
    if Netns::list()?.contains(&record.netns)
        && let Err(e) = Netns::delete(&record.netns)
    {
        failures.push(format!("delete namespace {}: {e}", record.netns));
    }
    super::apply::delete(
        dir,
        state,
        &record.cluster,
        &[peer_manifest(name, Value::Null)],
    )?;
    for ext in ["json", "conf", "setconf", "ready", "log"] {
        let _ = fs::remove_file(peers_dir(dir).join(format!("{name}.{ext}")));
    }
    if !failures.is_empty() {
        bail!("removing peer/{name}:\n  {}", failures.join("\n  "));
    }
    println!("peer/{name} removed (namespace {})", record.netns);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::topology::Topology;

    #[test]
    fn a_machine_gets_the_next_free_addresses_outside_every_node_block() {
        let lab = Topology::new("t", 2, 50, 1).unwrap();
        let first = next_address(&lab.clusters[1], &[]).unwrap();
        assert_eq!(first.to_string(), "10.2.250.1/32");
        assert!(
            lab.clusters[1]
                .nodes
                .iter()
                .all(|n| !n.pod_cidr.contains(&IpNet::V4(first)))
        );
        assert_eq!(
            next_address(&lab.clusters[1], &[first])
                .unwrap()
                .to_string(),
            "10.2.250.2/32"
        );
        let (underlay, port) = next_underlay(&[Ipv4Addr::new(198, 19, 250, 1)]).unwrap();
        assert_eq!(underlay, Ipv4Addr::new(198, 19, 250, 2));
        assert_eq!(port, "lp2");
        assert!(
            lab.clusters
                .iter()
                .flat_map(|c| &c.nodes)
                .all(|n| n.address != underlay)
        );
    }

    #[test]
    fn the_machine_routes_every_clusters_pods_and_services() {
        let lab = Topology::new("t", 2, 1, 1).unwrap();
        let ranges: Vec<String> = mesh_ranges(&lab)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            ranges,
            [
                "10.1.0.0/16",
                "10.101.0.0/16",
                "10.2.0.0/16",
                "10.102.0.0/16"
            ]
        );
    }

    #[test]
    fn setconf_keeps_what_wg_takes() {
        let quick = "# a comment\n[Interface]\nPrivateKey = abc=\nAddress = 10.1.250.1/32\n\n[Peer]\nPublicKey = def=\nEndpoint = 198.18.1.10:51820\nAllowedIPs = 10.1.0.0/16\nPersistentKeepalive = 25\n";
        assert_eq!(
            setconf_text(quick),
            "[Interface]\nPrivateKey = abc=\n\n[Peer]\nPublicKey = def=\nEndpoint = 198.18.1.10:51820\nAllowedIPs = 10.1.0.0/16\nPersistentKeepalive = 25\n"
        );
    }

    #[test]
    fn the_peer_document_is_what_the_controller_reads_and_the_lab_passes_on() {
        let key = PublicKey([7; 32]);
        let doc = peer_document("laptop", &key, "10.1.250.1/32".parse().unwrap(), "node-0");
        let yaml = serde_norway::to_string(&doc).unwrap();
        let manifests = super::super::objects::parse_manifests(&yaml).unwrap();
        assert_eq!(manifests.len(), 1);
        assert_eq!(manifests[0].describe(), "peer/laptop");
        let objects = trellis_controller::objects::parse_objects(&yaml).unwrap();
        let state = trellis_controller::objects::source_state(&objects);
        assert_eq!(state.external_peers.len(), 1);
        let spec = &state.external_peers[0];
        assert_eq!(spec.public_key, key.to_string());
        assert_eq!(spec.allowed_ips, ["10.1.250.1/32"]);
        assert_eq!(spec.nodes, ["node-0"]);
    }

    #[test]
    fn the_machine_script_isolates_wireguard_gos_socket_and_sets_routes() {
        let script = machine_script(
            Path::new("/x/laptop.setconf"),
            "10.1.250.1/32".parse().unwrap(),
            &[
                "10.1.0.0/16".parse().unwrap(),
                "10.2.0.0/16".parse().unwrap(),
            ],
            Path::new("/x/laptop.ready"),
        );
        assert!(script.contains("mount -t tmpfs trellis-lab-peer /run/wireguard"));
        assert!(
            script.contains("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f wg0 &")
        );
        assert!(script.contains("wg setconf wg0 /x/laptop.setconf"));
        assert!(script.contains("ip route add 10.2.0.0/16 dev wg0"));
        let ready = script.find("touch /x/laptop.ready").unwrap();
        assert!(
            ready > script.find("ip route add 10.2.0.0/16").unwrap(),
            "ready only once routed"
        );
    }
}
