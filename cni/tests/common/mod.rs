//! A node namespace with the plugin installed, and pods made through it as a runtime would.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use trellis_cni::runtime::{Attachment, ConfList, InvokeError, Runtime};
use trellis_netns::testing::TempNetns;
use trellis_netns::{Netlink, Netns};

pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The node's own address, as its underlay address would be.
pub const NODE_ADDRESS: &str = "198.18.0.1";

pub fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_trellis-cni"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

pub async fn loopback_up(netns: &Netns) {
    let netlink = Netlink::connect_in(netns).unwrap();
    let lo = netlink.require_link("lo").await.unwrap();
    netlink.set_up(lo.index).await.unwrap();
}

pub struct Node {
    pub netns: TempNetns,
    pub runtime: Runtime,
    pub data_dir: tempfile::TempDir,
}

pub struct Pod {
    pub netns: TempNetns,
    pub attachment: Attachment,
    pub result: Option<Value>,
}

impl Node {
    pub fn new(prefix: &str) -> Self {
        let netns = TempNetns::new(prefix).unwrap();
        block_on(async {
            loopback_up(&netns).await;
            let netlink = Netlink::connect_in(&netns).unwrap();
            let lo = netlink.require_link("lo").await.unwrap();
            netlink
                .add_address(lo.index, format!("{NODE_ADDRESS}/32").parse().unwrap())
                .await
                .unwrap();
        });
        let runtime = Runtime {
            plugin_dirs: vec![plugin_dir(), PathBuf::from(REFERENCE_PLUGINS)],
            node: Some(Netns::open(netns.name()).unwrap()),
            env: Vec::new(),
        };
        Self {
            netns,
            runtime,
            data_dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn conflist(&self, pod_cidrs: &[&str]) -> ConfList {
        self.conflist_with(pod_cidrs, &[])
    }

    /// trellis-cni first, then `chained` plugins (at 1.0.0, the newest the reference supports).
    pub fn conflist_with(&self, pod_cidrs: &[&str], chained: &[Value]) -> ConfList {
        let mut plugins = vec![json!({
            "type": "trellis-cni",
            "podCIDRs": pod_cidrs,
            "mtu": 1420,
            "dataDir": self.data_dir.path(),
        })];
        plugins.extend(chained.iter().cloned());
        serde_json::from_value(json!({"cniVersion": "1.0.0", "name": "pods", "plugins": plugins}))
            .unwrap()
    }

    pub fn new_pod(&self, id: &str) -> Pod {
        let netns = TempNetns::new("cni-pod").unwrap();
        block_on(loopback_up(&netns));
        let attachment = Attachment {
            container_id: id.to_string(),
            netns: netns.path().to_path_buf(),
            ifname: "eth0".into(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), id.into()),
            ],
            capabilities: Default::default(),
        };
        Pod {
            netns,
            attachment,
            result: None,
        }
    }

    pub fn add(&self, list: &ConfList, pod: &mut Pod) -> Result<Value, InvokeError> {
        let result = self.runtime.add(list, &pod.attachment)?;
        pod.result = Some(result.clone());
        Ok(result)
    }

    /// The node's links made by trellis-cni.
    pub fn host_veths(&self) -> Vec<String> {
        self.host_veths_where(|_| true)
    }

    /// trellis-cni's node-side veths that are up (DEL takes them down at once).
    pub fn up_host_veths(&self) -> Vec<String> {
        self.host_veths_where(|link| link.up)
    }

    fn host_veths_where(&self, keep: impl Fn(&trellis_netns::Link) -> bool) -> Vec<String> {
        block_on(async {
            let netlink = Netlink::connect_in(&self.netns).unwrap();
            let links = netlink.links().await.unwrap();
            links
                .into_iter()
                .filter(|l| l.name.starts_with("trl") && keep(l))
                .map(|l| l.name)
                .collect()
        })
    }

    /// Waits (at most 3 s) for the kernel to destroy the veths of removed pod namespaces, and
    /// returns what is left.
    pub fn host_veths_after_namespaces_go(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = self.host_veths();
            if left.is_empty() || std::time::Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The leases on disk.
    pub fn leases(&self) -> usize {
        let path = self.data_dir.path().join("pods/allocations.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let state: Value = serde_json::from_slice(&bytes).unwrap();
                state["leases"].as_object().map_or(0, |m| m.len())
            }
            Err(_) => 0,
        }
    }
}

pub fn pod_ip(result: &Value, index: usize) -> String {
    let address = result["ips"][index]["address"].as_str().unwrap();
    address.split('/').next().unwrap().to_string()
}

/// One ICMP echo from inside `netns`, waiting at most a second.
pub fn ping(netns: &Netns, address: &str) -> bool {
    let mut command = Command::new("ping");
    command
        .args(["-c", "1", "-W", "3", address])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    netns
        .spawn(&mut command)
        .unwrap()
        .unwrap()
        .wait()
        .unwrap()
        .success()
}
