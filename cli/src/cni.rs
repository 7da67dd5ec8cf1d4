//! `trellis cni install`: what the chart's init container runs on every node. It copies the
//! `trellis-cni` plugin into the runtime's plugin directory and writes the node's conflist,
//! whose pod CIDRs come from the node's `Node` object (`spec.podCIDRs`, assigned by the
//! kube-controller-manager), read through the in-cluster API credentials.
//!
//! The decision — Node JSON to conflist — is the pure [`conflist`]; reading the Node
//! ([`wait_for_node`]) waits for the CIDRs to be assigned; files are replaced atomically
//! (temporary file, `fsync`, `rename`), so the runtime never reads half a conflist and a
//! running plugin binary is never overwritten in place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

#[derive(Args)]
pub struct CniArgs {
    #[command(subcommand)]
    command: CniCommand,
}

#[derive(Subcommand)]
enum CniCommand {
    /// Install trellis-cni and this node's conflist (pod CIDRs from the Node object).
    Install(InstallArgs),
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// This node's name (a Kubernetes Node; in a pod: `spec.nodeName`).
    #[arg(long)]
    node: String,
    /// The container runtime's plugin directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The container runtime's configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The plugin binary to install.
    #[arg(long, default_value = "/usr/local/bin/trellis-cni")]
    plugin: PathBuf,
    /// File name of the conflist in --conf-dir.
    #[arg(long, default_value = "10-trellis.conflist")]
    conf_name: String,
    /// Pod MTU; without it the plugin uses the underlay's MTU minus WireGuard's 80 bytes.
    #[arg(long)]
    mtu: Option<u32>,
    /// Chain the `portmap` plugin (hostPort): `auto` when it is in --cni-bin-dir.
    #[arg(long, value_enum, default_value_t = Portmap::Auto)]
    portmap: Portmap,
    /// How long to wait for the Node's pod CIDRs to be assigned.
    #[arg(long, default_value_t = 300)]
    wait_seconds: u64,
    /// The file the node's gateway writes once its plan is in place (`trellis-gateway
    /// --ready-file`); the plugin wires no pod before it exists. Empty: no such gate.
    #[arg(long, default_value = "/run/trellis/gateway.ready")]
    gateway_ready_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Portmap {
    Auto,
    On,
    Off,
}

/// What the conflist says besides the node's CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflistSettings {
    pub mtu: Option<u32>,
    pub portmap: bool,
    /// See [`trellis_cni::config::NetConf::gateway_ready_file`].
    pub gateway_ready_file: Option<PathBuf>,
}

/// The network name in the conflist (and the plugin's lease directory under its data dir).
pub const NETWORK_NAME: &str = "trellis";

/// The node's pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`), parsed; empty until assigned.
pub fn pod_cidrs(node: &Node) -> anyhow::Result<Vec<IpNet>> {
    trellis_controller::objects::pod_cidrs_of(node)
        .iter()
        .map(|c| {
            c.parse::<IpNet>()
                .with_context(|| format!("the Node's pod CIDR {c:?} is not a CIDR"))
        })
        .collect()
}

/// The conflist for `node`, as pretty JSON; an error if the node has no pod CIDR yet or more
/// than one per address family (the plugin takes at most one IPv4 and one IPv6).
pub fn conflist(node: &Node, settings: &ConflistSettings) -> anyhow::Result<String> {
    let name = node.metadata.name.as_deref().unwrap_or("<unnamed>");
    let cidrs = pod_cidrs(node)?;
    if cidrs.is_empty() {
        bail!("node {name} has no pod CIDR (spec.podCIDRs) yet");
    }
    let v4 = cidrs.iter().filter(|c| matches!(c, IpNet::V4(_))).count();
    if v4 > 1 || cidrs.len() - v4 > 1 {
        bail!("node {name} has more than one pod CIDR of a family: {cidrs:?}");
    }
    let mut plugin = json!({
        "type": "trellis-cni",
        "podCIDRs": cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
    });
    if let Some(mtu) = settings.mtu {
        plugin["mtu"] = json!(mtu);
    }
    if let Some(ready) = &settings.gateway_ready_file {
        plugin["gatewayReadyFile"] = json!(ready);
    }
    let mut plugins = vec![plugin];
    if settings.portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    let list = json!({
        "cniVersion": "1.1.0",
        "name": NETWORK_NAME,
        "plugins": Value::Array(plugins),
    });
    Ok(serde_json::to_string_pretty(&list)? + "\n")
}

/// Reads the Node until it has a pod CIDR, polling every `poll` for at most `timeout`.
/// Transient API errors are retried; a missing Node or a refusal (RBAC) stops at once.
pub async fn wait_for_node(
    client: kube::Client,
    name: &str,
    poll: Duration,
    timeout: Duration,
) -> anyhow::Result<Node> {
    let api: kube::Api<Node> = kube::Api::all(client);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match api.get(name).await {
            Ok(node) if !pod_cidrs(&node)?.is_empty() => return Ok(node),
            Ok(_) => "no pod CIDR assigned yet (spec.podCIDRs is empty)".to_string(),
            Err(kube::Error::Api(status)) if matches!(status.code, 401 | 403 | 404) => {
                bail!(
                    "reading Node {name}: {} ({}); the pod's service account needs `get` on nodes",
                    status.message,
                    status.code
                );
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() + poll > deadline {
            bail!(
                "Node {name} has no pod CIDR after {} s: {last}; does the cluster allocate \
                 node CIDRs (kube-controller-manager --allocate-node-cidrs)?",
                timeout.as_secs()
            );
        }
        eprintln!("waiting for Node {name}: {last}");
        tokio::time::sleep(poll).await;
    }
}

/// Writes `bytes` to `path` with `mode`: a temporary file in the same directory, synced,
/// renamed over the target and the directory synced, so readers (the kubelet, a runtime, the
/// next `trellis` command) see the old file or the new one, never half of it.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    trellis_files::write_atomically(path, bytes, mode)
        .with_context(|| format!("writing {}", path.display()))
}

/// Installs the plugin binary and the conflist for `node`.
pub fn install_files(args: &InstallArgs, node: &Node) -> anyhow::Result<(PathBuf, PathBuf)> {
    let portmap = match args.portmap {
        Portmap::On => true,
        Portmap::Off => false,
        Portmap::Auto => args.cni_bin_dir.join("portmap").is_file(),
    };
    let text = conflist(
        node,
        &ConflistSettings {
            mtu: args.mtu,
            portmap,
            gateway_ready_file: (!args.gateway_ready_file.as_os_str().is_empty())
                .then(|| args.gateway_ready_file.clone()),
        },
    )?;
    let plugin = std::fs::read(&args.plugin)
        .with_context(|| format!("reading the plugin {}", args.plugin.display()))?;
    std::fs::create_dir_all(&args.cni_bin_dir)
        .with_context(|| format!("creating {}", args.cni_bin_dir.display()))?;
    std::fs::create_dir_all(&args.conf_dir)
        .with_context(|| format!("creating {}", args.conf_dir.display()))?;
    let plugin_path = args.cni_bin_dir.join("trellis-cni");
    write_atomically(&plugin_path, &plugin, 0o755)?;
    let conf_path = args.conf_dir.join(&args.conf_name);
    write_atomically(&conf_path, text.as_bytes(), 0o644)?;
    Ok((plugin_path, conf_path))
}

pub fn run(args: CniArgs) -> anyhow::Result<()> {
    let CniCommand::Install(args) = args.command;
    let node = crate::block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster credentials)")?;
        wait_for_node(
            client,
            &args.node,
            Duration::from_secs(2),
            Duration::from_secs(args.wait_seconds),
        )
        .await
    })?;
    let (plugin, conf) = install_files(&args, &node)?;
    println!(
        "installed {} and {} (pod CIDRs {})",
        plugin.display(),
        conf.display(),
        pod_cidrs(&node)?
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_api::{Answer, Log, scripted};

    /// A kind worker's Node as the API server returns it (pod CIDRs assigned).
    const KIND_NODE: &str = include_str!("../testdata/node-kind-worker.json");

    fn node() -> Node {
        serde_json::from_str(KIND_NODE).unwrap()
    }

    fn without_cidrs() -> Node {
        let mut n = node();
        let spec = n.spec.as_mut().unwrap();
        spec.pod_cidr = None;
        spec.pod_cidrs = None;
        n
    }

    /// Each plugin's stdin as the runtime builds it (name and version injected), parsed by
    /// the real plugin's configuration parser.
    fn plugin_stdin(list: &str, at: usize) -> Vec<u8> {
        let list: Value = serde_json::from_str(list).unwrap();
        let mut plugin = list["plugins"][at].clone();
        plugin["name"] = list["name"].clone();
        plugin["cniVersion"] = list["cniVersion"].clone();
        serde_json::to_vec(&plugin).unwrap()
    }

    #[test]
    fn a_kind_node_becomes_a_conflist_the_plugin_accepts() {
        let text = conflist(
            &node(),
            &ConflistSettings {
                mtu: Some(1420),
                portmap: true,
                gateway_ready_file: Some("/run/trellis/gateway.ready".into()),
            },
        )
        .unwrap();
        let conf = trellis_cni::config::NetConf::parse(&plugin_stdin(&text, 0)).unwrap();
        assert_eq!(
            conf.pod_cidrs,
            vec![
                "10.244.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(conf.mtu, Some(1420));
        assert_eq!(
            conf.gateway_ready_file.as_deref(),
            Some(std::path::Path::new("/run/trellis/gateway.ready"))
        );
        assert_eq!(conf.name, NETWORK_NAME);
        let list: trellis_cni::runtime::ConfList = serde_json::from_str(&text).unwrap();
        assert_eq!(list.plugins[1]["type"], "portmap");
        assert_eq!(list.plugins[1]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn without_options_the_plugin_picks_the_mtu_and_nothing_is_chained() {
        let text = conflist(
            &node(),
            &ConflistSettings {
                mtu: None,
                portmap: false,
                gateway_ready_file: None,
            },
        )
        .unwrap();
        let list: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(list["plugins"].as_array().unwrap().len(), 1);
        assert!(list["plugins"][0].get("mtu").is_none());
        let conf = trellis_cni::config::NetConf::parse(&plugin_stdin(&text, 0)).unwrap();
        assert_eq!(conf.mtu, None);
    }

    #[test]
    fn the_single_pod_cidr_field_is_a_fallback() {
        let mut n = without_cidrs();
        n.spec.as_mut().unwrap().pod_cidr = Some("10.244.7.0/24".into());
        assert_eq!(
            pod_cidrs(&n).unwrap(),
            vec!["10.244.7.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn nodes_without_or_with_too_many_cidrs_are_refused() {
        let settings = ConflistSettings {
            mtu: None,
            portmap: false,
            gateway_ready_file: None,
        };
        let err = conflist(&without_cidrs(), &settings).unwrap_err();
        assert!(err.to_string().contains("no pod CIDR"), "{err}");
        let mut two_v4 = node();
        two_v4.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["10.244.1.0/24".into(), "10.245.1.0/24".into()]);
        let err = conflist(&two_v4, &settings).unwrap_err();
        assert!(err.to_string().contains("more than one"), "{err}");
        let mut bad = node();
        bad.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.1.0".into()]);
        let err = conflist(&bad, &settings).unwrap_err();
        assert!(err.to_string().contains("not a CIDR"), "{err}");
    }

    #[test]
    fn install_writes_the_plugin_and_the_conflist_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("trellis-cni-src");
        std::fs::write(&plugin, b"#!/bin/sh\necho plugin\n").unwrap();
        let bin = dir.path().join("opt/cni/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("portmap"), b"").unwrap();
        // An older conflist is replaced whole.
        let conf_dir = dir.path().join("etc/cni/net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::write(conf_dir.join("10-trellis.conflist"), b"{old").unwrap();
        let args = InstallArgs {
            node: "east-worker".into(),
            cni_bin_dir: bin.clone(),
            conf_dir: conf_dir.clone(),
            plugin,
            conf_name: "10-trellis.conflist".into(),
            mtu: None,
            portmap: Portmap::Auto,
            wait_seconds: 1,
            gateway_ready_file: "/run/trellis/gateway.ready".into(),
        };
        let (plugin_path, conf_path) = install_files(&args, &node()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&plugin_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read(&plugin_path).unwrap(),
            b"#!/bin/sh\necho plugin\n"
        );
        let list: Value = serde_json::from_slice(&std::fs::read(&conf_path).unwrap()).unwrap();
        assert_eq!(
            list["plugins"][1]["type"], "portmap",
            "portmap is chained when present"
        );
        let names: Vec<_> = std::fs::read_dir(&conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["10-trellis.conflist"], "no temporary file left");
        // Without portmap in the plugin directory, auto leaves it out.
        std::fs::remove_file(bin.join("portmap")).unwrap();
        install_files(&args, &node()).unwrap();
        let list: Value = serde_json::from_slice(&std::fs::read(&conf_path).unwrap()).unwrap();
        assert_eq!(list["plugins"].as_array().unwrap().len(), 1);
    }

    /// A client whose API server answers the node's GETs with `answers`, in order.
    fn node_api(answers: Vec<Answer>) -> (kube::Client, Log, tokio::task::JoinHandle<()>) {
        let answers = std::sync::Mutex::new(std::collections::VecDeque::from(answers));
        scripted(move |target| {
            assert_eq!(target, "/api/v1/nodes/east-worker");
            answers
                .lock()
                .unwrap()
                .pop_front()
                .expect("no more requests than scripted")
        })
    }

    #[tokio::test]
    async fn waits_until_the_node_has_its_pod_cidrs() {
        let pending = serde_json::to_value(without_cidrs()).unwrap();
        let ready: Value = serde_json::from_str(KIND_NODE).unwrap();
        let (client, log, server) = node_api(vec![
            Answer::json(200, &pending),
            Answer::failure(500, "InternalError", "etcd leader changed"),
            Answer::json(200, &ready),
        ]);
        let node = wait_for_node(
            client,
            "east-worker",
            Duration::from_millis(10),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(pod_cidrs(&node).unwrap().len(), 2);
        assert_eq!(log.lock().unwrap().len(), 3);
        server.abort();
    }

    #[tokio::test]
    async fn a_refusal_stops_at_once_and_names_the_permission() {
        let (client, log, server) = node_api(vec![Answer::failure(
            403,
            "Forbidden",
            "nodes \"east-worker\" is forbidden: User \"system:serviceaccount:trellis-system:trellis-node\" cannot get resource \"nodes\"",
        )]);
        let err = wait_for_node(
            client,
            "east-worker",
            Duration::from_millis(10),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("forbidden") && err.contains("`get` on nodes"),
            "{err}"
        );
        assert_eq!(log.lock().unwrap().len(), 1);
        server.abort();
    }

    #[tokio::test]
    async fn gives_up_after_the_timeout_saying_why() {
        let pending = serde_json::to_value(without_cidrs()).unwrap();
        let (client, _log, server) =
            node_api((0..100).map(|_| Answer::json(200, &pending)).collect());
        let err = wait_for_node(
            client,
            "east-worker",
            Duration::from_millis(20),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("no pod CIDR after") && err.contains("allocate-node-cidrs"),
            "{err}"
        );
        server.abort();
    }
}
