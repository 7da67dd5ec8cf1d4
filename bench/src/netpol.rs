//! The data-path cost of NetworkPolicy on a node: two pods wired by trellis-cni, measured with
//! no policy table and with the node's table compiled from N policies over N pods (every pod
//! isolated both ways, the two measured pods among them), alternating in one run: new TCP
//! connections per second (each a full handshake, closed with a reset so no port lingers in
//! TIME_WAIT) and the throughput of an established flow (iperf3).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use trellis_cni::runtime::{Attachment, ConfList, Runtime};
use trellis_core::policy::{
    Identity, IdentityKey, IdentityLabels, LabelSelector, NetworkPolicy, PolicyEndpoint,
    PolicyInputs, PolicyPeer, PolicyPort, PolicyRule, PortSpec,
};
use trellis_core::policy::{compile, nft};
use trellis_netns::testing::TempNetns;
use trellis_netns::{Netlink, Netns};

const NODE: &str = "bench-node";
const SERVER_PORT: u16 = 80;
/// The established flow's port (iperf3), allowed with the connections' by the same rule.
const FLOW_PORT: u16 = 81;

#[derive(clap::Args)]
pub struct Options {
    /// Policies in the node's table (each selecting one pod).
    #[arg(long, default_value_t = 1000)]
    policies: usize,
    /// Pods the node's table knows (the two measured ones among them).
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rounds; each measures without and with the table.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub(crate) struct Pod {
    pub(crate) netns: TempNetns,
    pub(crate) address: Ipv4Addr,
}

fn pod_labels(index: usize) -> BTreeMap<String, String> {
    let role = if index.is_multiple_of(2) {
        "client"
    } else {
        "server"
    };
    BTreeMap::from([
        ("app".to_string(), format!("app-{index}")),
        ("role".to_string(), role.to_string()),
    ])
}

fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        match_expressions: vec![],
    }
}

/// `pods` pods in ten namespaces, pod 0 the client and pod 1 the server at their real
/// addresses; policy `i` isolates pod `i mod pods` both ways: in from any namespace's
/// clients on TCP 80-81, out to servers on TCP 80-81 and to anywhere on UDP 53.
pub(crate) fn inputs(
    policies: usize,
    pods: usize,
    client: Ipv4Addr,
    server: Ipv4Addr,
) -> PolicyInputs {
    let cluster: trellis_core::cluster::ClusterId = "c1".parse().expect("valid cluster ID");
    let mut inputs = PolicyInputs::new(cluster.clone());
    let namespace = |index: usize| format!("ns-{}", index % 10);
    for index in 0..pods {
        let address = match index {
            0 => client,
            1 => server,
            // Pods that exist only in the table, outside the measured pods' range.
            _ => Ipv4Addr::new(10, 253, (index / 256) as u8, (index % 256) as u8),
        };
        let key = IdentityKey {
            cluster: cluster.clone(),
            number: index as u32 + 1,
        };
        let ns = namespace(index);
        inputs.identities.insert(
            key.clone(),
            Identity {
                key: key.clone(),
                labels: IdentityLabels {
                    namespace: ns.clone(),
                    pod_labels: pod_labels(index),
                    namespace_labels: BTreeMap::from([(
                        "kubernetes.io/metadata.name".to_string(),
                        ns.clone(),
                    )]),
                },
            },
        );
        let endpoint = PolicyEndpoint {
            cluster: cluster.clone(),
            namespace: ns,
            name: format!("pod-{index}"),
            addresses: vec![IpAddr::V4(address)],
            node: NODE.into(),
            identity: key.number,
            named_ports: vec![],
        };
        inputs
            .endpoints
            .insert(trellis_core::keyed::Keyed::key(&endpoint), endpoint);
    }
    let tcp80 = PolicyPort {
        protocol: trellis_core::cluster::Protocol::Tcp,
        port: Some(PortSpec::Number(SERVER_PORT)),
        end_port: Some(FLOW_PORT),
    };
    for index in 0..policies {
        let pod = index % pods;
        let policy = NetworkPolicy {
            namespace: namespace(pod),
            name: format!("policy-{index}"),
            pod_selector: selector(&[("app", &format!("app-{pod}"))]),
            ingress: Some(vec![PolicyRule {
                peers: vec![PolicyPeer::Pods {
                    namespace_selector: Some(LabelSelector::default()),
                    pod_selector: Some(selector(&[("role", "client")])),
                }],
                ports: vec![tcp80.clone()],
            }]),
            egress: Some(vec![
                PolicyRule {
                    peers: vec![PolicyPeer::Pods {
                        namespace_selector: Some(LabelSelector::default()),
                        pod_selector: Some(selector(&[("role", "server")])),
                    }],
                    ports: vec![tcp80.clone()],
                },
                PolicyRule {
                    peers: vec![],
                    ports: vec![PolicyPort {
                        protocol: trellis_core::cluster::Protocol::Udp,
                        port: Some(PortSpec::Number(53)),
                        end_port: None,
                    }],
                },
            ]),
        };
        inputs.policies.insert(policy.key(), policy);
    }
    inputs
}

pub(crate) fn nft(netns: &Netns, script: &str) -> anyhow::Result<()> {
    trellis_gateway::nft::apply(Some(netns), script).context("nft refused the script")
}

fn wire_pods(node: &TempNetns) -> anyhow::Result<(Vec<Pod>, Runtime, ConfList, tempfile::TempDir)> {
    let own_dir: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary has no directory")?
        .to_path_buf();
    if !own_dir.join("trellis-cni").is_file() {
        bail!("trellis-cni not found beside {}", own_dir.display());
    }
    let data = tempfile::tempdir()?;
    let list: ConfList = serde_json::from_value(json!({
        "cniVersion": "1.0.0", "name": "bench-netpol",
        "plugins": [{"type": "trellis-cni", "podCIDRs": ["10.252.0.0/24"], "mtu": 1420,
                     "dataDir": data.path()}]
    }))?;
    let runtime = Runtime {
        plugin_dirs: vec![own_dir],
        node: Some(Netns::open(node.name())?),
        env: Vec::new(),
    };
    let mut pods = Vec::new();
    for index in 0..2 {
        let netns = TempNetns::new("bench-netpol-pod")?;
        let attachment = Attachment {
            container_id: format!("bench-netpol-{index}"),
            netns: netns.path().to_path_buf(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        let result = runtime.add(&list, &attachment)?;
        let address: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .context("CNI result without an address")?
            .parse()?;
        pods.push(Pod { netns, address });
    }
    Ok((pods, runtime, list, data))
}

/// Connections per second from `client` to `server` for `seconds`, one after another.
pub(crate) fn connection_rate(
    client: &Pod,
    target: SocketAddr,
    seconds: u64,
) -> anyhow::Result<f64> {
    let deadline = Duration::from_secs(seconds);
    let made = client.netns.netns().run(move || -> anyhow::Result<u64> {
        let started = Instant::now();
        let mut made = 0u64;
        while started.elapsed() < deadline {
            let stream = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                .with_context(|| format!("a connection the policy allows failed after {made}"))?;
            drop(stream);
            made += 1;
        }
        Ok(made)
    })??;
    Ok(made as f64 / seconds as f64)
}

fn throughput(client: &Pod, server: &Pod, seconds: u64) -> anyhow::Result<f64> {
    let mut daemon = server
        .netns
        .netns()
        .spawn(
            Command::new("iperf3")
                .args([
                    "-s",
                    "-1",
                    "-p",
                    &FLOW_PORT.to_string(),
                    "-B",
                    &server.address.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?
        .context("start iperf3 (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let output = client.netns.netns().run(|| {
        Command::new("iperf3")
            .args([
                "-c",
                &server.address.to_string(),
                "-p",
                &FLOW_PORT.to_string(),
                "-J",
                "-t",
            ])
            .arg(seconds.to_string())
            .output()
    })??;
    let _ = daemon.kill();
    let _ = daemon.wait();
    let report: Value = serde_json::from_slice(&output.stdout)?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .context("iperf3 report without sum_received")
}

/// A node namespace with two pods wired by trellis-cni, pod 0 the client and pod 1 the
/// server, which accepts connections on [`SERVER_PORT`] and drops them until the bed is
/// dropped (then the pods are unwired and every namespace goes).
pub(crate) struct Bed {
    pub(crate) node: TempNetns,
    pods: Vec<Pod>,
    cni: Runtime,
    list: ConfList,
    _data: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Bed {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let node = TempNetns::new("bench-netpol-node")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let netlink = Netlink::connect_in(node.netns())?;
            let lo = netlink.require_link("lo").await?;
            netlink.set_up(lo.index).await
        })?;
        // The node routes between its pods (a new namespace does not forward).
        trellis_netns::sysctl::write(Some(node.netns()), "net/ipv4/ip_forward", "1")?;
        let (pods, cni, list, data) = wire_pods(&node)?;
        let (client, server) = (&pods[0], &pods[1]);
        // Thousands of connections a second from one client: every local port, and ports in
        // TIME_WAIT taken again.
        trellis_netns::sysctl::write(
            Some(client.netns.netns()),
            "net/ipv4/ip_local_port_range",
            "1024\t65535",
        )?;
        trellis_netns::sysctl::write(Some(client.netns.netns()), "net/ipv4/tcp_tw_reuse", "1")?;
        // A deep accept queue: a full one drops the client's SYN, which costs it a 1 s
        // retransmission and would measure the queue, not the data path.
        trellis_netns::sysctl::write(Some(server.netns.netns()), "net/core/somaxconn", "65535")?;
        let listener: TcpListener =
            server
                .netns
                .netns()
                .run(|| -> std::io::Result<TcpListener> {
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    socket
                        .bind(&SocketAddr::new(IpAddr::V4(server.address), SERVER_PORT).into())?;
                    socket.listen(65535)?;
                    Ok(socket.into())
                })??;
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Closed after the client's close, so the client's side keeps TIME_WAIT
                    // (which it may reuse), not the server's.
                    if let Ok(mut stream) = stream {
                        let _ = std::io::Read::read(&mut stream, &mut [0u8; 1]);
                    }
                }
            })
        };
        Ok(Self {
            node,
            pods,
            cni,
            list,
            _data: data,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub(crate) fn client(&self) -> &Pod {
        &self.pods[0]
    }

    pub(crate) fn server(&self) -> &Pod {
        &self.pods[1]
    }

    /// The server's listening address, which the policy table allows.
    pub(crate) fn target(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.server().address), SERVER_PORT)
    }

    /// The table must enforce, or a comparison with it means nothing: with it, a port no rule
    /// allows times out (the SYN is dropped) where without it the server's kernel refuses at
    /// once.
    pub(crate) fn check_enforced(&self) -> anyhow::Result<()> {
        let denied = SocketAddr::new(IpAddr::V4(self.server().address), FLOW_PORT + 1);
        let outcome = self
            .client()
            .netns
            .netns()
            .run(move || TcpStream::connect_timeout(&denied, Duration::from_millis(300)))?;
        match outcome {
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => Ok(()),
            other => bail!("the policy table does not drop a denied connection: {other:?}"),
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the acceptor so it sees the stop.
        let target = self.target();
        let _ = self
            .client()
            .netns
            .netns()
            .run(move || TcpStream::connect_timeout(&target, Duration::from_secs(1)));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (index, pod) in self.pods.iter().enumerate() {
            let attachment = Attachment {
                container_id: format!("bench-netpol-{index}"),
                netns: pod.netns.path().to_path_buf(),
                ifname: "eth0".into(),
                ..Default::default()
            };
            let _ = self.cni.del(&self.list, &attachment, None);
        }
    }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.pods < 2 || options.policies == 0 {
        bail!("need at least 2 pods and 1 policy");
    }
    let bed = Bed::new()?;
    let (client, server) = (bed.client(), bed.server());
    let inputs = inputs(
        options.policies,
        options.pods,
        client.address,
        server.address,
    );
    let compiled = Instant::now();
    let ruleset = compile(&inputs, NODE);
    let compile_time = compiled.elapsed();
    let script = nft::render_full(&ruleset)?;
    println!(
        "NetworkPolicy data path: {} policies over {} pods on the node, {} rules, compiled in {:.1} ms; \
         {} s per measurement, {} round(s)",
        options.policies,
        options.pods,
        ruleset.rule_count(),
        compile_time.as_secs_f64() * 1e3,
        options.seconds,
        options.rounds
    );
    let target = bed.target();
    nft(bed.node.netns(), &script)?;
    bed.check_enforced()?;

    let mut rates = [Vec::new(), Vec::new()];
    let mut rates_gbps = [Vec::new(), Vec::new()];
    for round in 0..options.rounds {
        // Alternate which goes first so drift in the machine's load hits both.
        let order = if round.is_multiple_of(2) {
            [0, 1]
        } else {
            [1, 0]
        };
        for with_policy in order {
            if with_policy == 1 {
                nft(bed.node.netns(), &script)?;
            } else {
                nft(bed.node.netns(), &nft::render_delete())?;
            }
            rates[with_policy].push(connection_rate(client, target, options.seconds)?);
            rates_gbps[with_policy].push(throughput(client, server, options.seconds)?);
            eprintln!(
                "round {round}, {}: {:.0} connections/s, {:.2} Gb/s",
                if with_policy == 1 {
                    "policies"
                } else {
                    "no policy"
                },
                rates[with_policy].last().copied().unwrap_or_default(),
                rates_gbps[with_policy].last().copied().unwrap_or_default()
            );
        }
    }
    let (plain_rate, policy_rate) = (median(&mut rates[0]), median(&mut rates[1]));
    let (plain_gbps, policy_gbps) = (median(&mut rates_gbps[0]), median(&mut rates_gbps[1]));
    println!(
        "{:<28} {:>14} {:>14} {:>8}",
        "", "no policy", "policies", "ratio"
    );
    println!(
        "{:<28} {:>14.0} {:>14.0} {:>7.2}x",
        "new TCP connections/s",
        plain_rate,
        policy_rate,
        policy_rate / plain_rate
    );
    println!(
        "{:<28} {:>14.2} {:>14.2} {:>7.2}x",
        "established flow Gb/s",
        plain_gbps,
        policy_gbps,
        policy_gbps / plain_gbps
    );
    Ok(())
}

/// The middle of the measurements (the upper one of an even count).
pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
