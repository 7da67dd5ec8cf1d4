//! ADD, CHECK and DEL of N pods through the reference `bridge` + `host-local` plugins and
//! through `trellis-cni`, invoked the same way (env + stdin, from the node's namespace),
//! interleaved pod by pod so both see the same machine noise.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use trellis_cni::runtime::{Attachment, ConfList, Runtime};
use trellis_netns::testing::TempNetns;
use trellis_netns::{Netlink, Netns};

use crate::stats::percentiles;

#[derive(clap::Args)]
pub struct Options {
    /// Pods per implementation.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Where the reference plugins live (Debian's containernetworking-plugins).
    #[arg(long, default_value = "/usr/lib/cni")]
    reference_dir: PathBuf,
}

struct Contender {
    name: &'static str,
    node: TempNetns,
    runtime: Runtime,
    list: ConfList,
    pods: Vec<(TempNetns, Attachment, Option<Value>)>,
    add: Vec<Duration>,
    check: Vec<Duration>,
    del: Vec<Duration>,
    _data: tempfile::TempDir,
}

impl Contender {
    fn new(name: &'static str, plugin_dir: PathBuf, plugin: Value) -> anyhow::Result<Self> {
        let node = TempNetns::new(&format!("bench-{name}"))?;
        let data = tempfile::tempdir()?;
        let mut plugin = plugin;
        match plugin.get_mut("ipam") {
            Some(ipam) => ipam["dataDir"] = json!(data.path()),
            None => plugin["dataDir"] = json!(data.path()),
        }
        let list = serde_json::from_value(
            json!({"cniVersion": "1.0.0", "name": format!("bench-{name}"), "plugins": [plugin]}),
        )?;
        let runtime = Runtime {
            plugin_dirs: vec![plugin_dir],
            node: Some(Netns::open(node.name())?),
            env: Vec::new(),
        };
        Ok(Self {
            name,
            node,
            runtime,
            list,
            pods: Vec::new(),
            add: Vec::new(),
            check: Vec::new(),
            del: Vec::new(),
            _data: data,
        })
    }

    fn add_pod(&mut self, index: usize) -> anyhow::Result<()> {
        let netns = TempNetns::new(&format!("bench-{}-pod", self.name))?;
        let attachment = Attachment {
            container_id: format!("bench-{}-{index}", self.name),
            netns: netns.path().to_path_buf(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let result = self
            .runtime
            .add(&self.list, &attachment)
            .with_context(|| format!("{} ADD", self.name))?;
        self.add.push(started.elapsed());
        self.pods.push((netns, attachment, Some(result)));
        Ok(())
    }

    fn check_pod(&mut self, index: usize) -> anyhow::Result<()> {
        let (_, attachment, result) = &self.pods[index];
        let started = Instant::now();
        self.runtime
            .check(
                &self.list,
                attachment,
                result.as_ref().context("no result")?,
            )
            .with_context(|| format!("{} CHECK", self.name))?;
        self.check.push(started.elapsed());
        Ok(())
    }

    fn del_pod(&mut self, index: usize) -> anyhow::Result<()> {
        let (_, attachment, result) = &self.pods[index];
        let started = Instant::now();
        self.runtime
            .del(&self.list, attachment, result.as_ref())
            .with_context(|| format!("{} DEL", self.name))?;
        self.del.push(started.elapsed());
        Ok(())
    }
}

/// Runs `step` on both contenders for every pod, alternating who goes first.
fn interleave(
    contenders: &mut [Contender; 2],
    pods: usize,
    step: fn(&mut Contender, usize) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for index in 0..pods {
        let order = if index % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            step(&mut contenders[which], index)?;
        }
    }
    Ok(())
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !options.reference_dir.join("bridge").is_file() {
        bail!(
            "reference plugins not found in {} (apt-get install containernetworking-plugins)",
            options.reference_dir.display()
        );
    }
    let own_dir = std::env::current_exe()?
        .parent()
        .context("binary has no directory")?
        .to_path_buf();
    if !own_dir.join("trellis-cni").is_file() {
        bail!(
            "trellis-cni not found beside {} (cargo build --release --workspace)",
            own_dir.display()
        );
    }
    let reference = Contender::new(
        "reference",
        options.reference_dir.clone(),
        json!({"type": "bridge", "bridge": "cni0", "isGateway": true, "mtu": 1420,
               "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/16"}]]}}),
    )?;
    let trellis = Contender::new(
        "trellis",
        own_dir,
        json!({"type": "trellis-cni", "podCIDRs": ["10.251.0.0/16"], "mtu": 1420}),
    )?;
    let mut contenders = [reference, trellis];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for contender in &contenders {
        runtime.block_on(async {
            let netlink = Netlink::connect_in(&contender.node)?;
            let lo = netlink.require_link("lo").await?;
            netlink.set_up(lo.index).await
        })?;
    }

    println!(
        "CNI benchmark: {} pods each, bridge+host-local (reference) vs trellis-cni, interleaved",
        options.pods
    );
    interleave(&mut contenders, options.pods, Contender::add_pod)?;
    interleave(&mut contenders, options.pods, Contender::check_pod)?;
    interleave(&mut contenders, options.pods, Contender::del_pod)?;

    println!(
        "{:<6} {:>14} {:>14} {:>14} {:>14} {:>10}",
        "op", "ref p50 ms", "ref p99 ms", "trellis p50", "trellis p99", "p50 ratio"
    );
    let [reference, trellis] = &contenders;
    for (op, r, t) in [
        ("ADD", &reference.add, &trellis.add),
        ("CHECK", &reference.check, &trellis.check),
        ("DEL", &reference.del, &trellis.del),
    ] {
        let (r, t) = (percentiles(r), percentiles(t));
        println!(
            "{op:<6} {:>14.2} {:>14.2} {:>14.2} {:>14.2} {:>9.2}x",
            r.p50,
            r.p99,
            t.p50,
            t.p99,
            t.p50 / r.p50
        );
    }
    println!("(ratio = trellis / reference; below 1 is faster)");
    Ok(())
}
