//! Tunnel throughput and latency: plain veth, Debian's wireguard-go, boringtun-cli and
//! trellis-gateway, each between the same two fresh namespaces over the same veth, measured the
//! same way (iperf3 for N seconds, 1 and 4 flows; ICMP round trips), in one invocation.
//! While a tunnel runs, a capture on the underlay counts TCP segments: any at all means
//! traffic escaped the tunnel in plaintext, and the run fails.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::IpNet;
use serde_json::Value;
use trellis_netns::testing::TempNetns;
use trellis_netns::{Netlink, Netns, VethSpec, probe};

pub(crate) const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub(crate) const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Inner addresses, only ever inside the benchmark's namespaces.
const INNER_A: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 1);
const INNER_B: Ipv4Addr = Ipv4Addr::new(10, 99, 2, 1);
const TUNNEL_MTU: u32 = 1420;
pub(crate) const WG_PORT: u16 = 51820;

#[derive(clap::Args)]
pub struct Options {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    #[command(flatten)]
    tunnels: Contenders,
    /// Repeat the whole set, alternating, this many times.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
}

/// Which tunnels a benchmark runs (shared by `tunnel` and `latency`).
#[derive(clap::Args)]
pub struct Contenders {
    /// Which contenders to run, in order: veth, wireguard-go, boringtun, trellis, trellis-1w
    /// (trellis-gateway with one worker).
    #[arg(
        long = "contenders",
        value_delimiter = ',',
        default_value = "veth,wireguard-go,boringtun,trellis"
    )]
    pub(crate) names: Vec<String>,
    /// boringtun-cli; by default the one `scripts/install-peers` puts in target/peers, else PATH.
    #[arg(long)]
    pub(crate) boringtun: Option<PathBuf>,
}

/// One measured configuration.
#[derive(Debug, Clone)]
struct Measurement {
    contender: String,
    flows: u32,
    gbps: f64,
    rtt_ms: f64,
    rcvbuf_errors: u64,
    /// Machine-wide busy CPU seconds per gigabit moved.
    cpu_seconds_per_gbit: f64,
    /// CPU seconds (user + system) of the tunnel's own processes, both sides, per gigabit:
    /// what the implementation costs, whatever else the machine runs.
    tunnel_cpu_seconds_per_gbit: f64,
}

pub(crate) struct Pair {
    pub(crate) a: TempNetns,
    pub(crate) b: TempNetns,
}

pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

impl Pair {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let a = TempNetns::new("bench-tun-a")?;
        let b = TempNetns::new("bench-tun-b")?;
        block_on(async {
            let na = Netlink::connect_in(&a)?;
            let nb = Netlink::connect_in(&b)?;
            for netlink in [&na, &nb] {
                let lo = netlink.require_link("lo").await?;
                netlink.set_up(lo.index).await?;
            }
            na.add_veth(&VethSpec {
                name: "under",
                peer_name: "under",
                peer_netns: Some(&b),
                mtu: Some(1500),
            })
            .await?;
            for (netlink, underlay, inner) in
                [(&na, UNDERLAY_A, INNER_A), (&nb, UNDERLAY_B, INNER_B)]
            {
                let under = netlink.require_link("under").await?;
                netlink
                    .add_address(under.index, IpNet::new(IpAddr::V4(underlay), 24)?)
                    .await?;
                netlink.set_up(under.index).await?;
                let lo = netlink.require_link("lo").await?;
                netlink
                    .add_address(lo.index, IpNet::from(IpAddr::V4(inner)))
                    .await?;
            }
            anyhow::Ok(())
        })?;
        Ok(Self { a, b })
    }
}

/// A running tunnel between the pair; dropping it stops its processes.
pub(crate) struct Running {
    /// Where B's inner address is reached from A.
    pub(crate) target: Ipv4Addr,
    pub(crate) source: Ipv4Addr,
    pub(crate) processes: Vec<Child>,
    encrypted: bool,
    /// Files the tunnel needs while it runs.
    _work: Option<tempfile::TempDir>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn run_in(netns: &Netns, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = netns
        .spawn(&mut command)?
        .with_context(|| format!("start {program}"))?
        .wait_with_output()?;
    if !output.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

pub(crate) fn wg_keypair() -> anyhow::Result<(String, String)> {
    let private = Command::new("wg")
        .arg("genkey")
        .output()
        .context("wg genkey (apt-get install wireguard-tools)")?;
    let private = String::from_utf8(private.stdout)?.trim().to_string();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, private.as_bytes())?;
    let public = String::from_utf8(child.wait_with_output()?.stdout)?
        .trim()
        .to_string();
    Ok((private, public))
}

pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A stock userspace WireGuard (wireguard-go or boringtun-cli) on each side, configured with
/// `wg` over its UAPI socket. Interface names differ per side: the sockets share /run.
fn start_userspace_wg(
    pair: &Pair,
    daemon: &Path,
    args: &[&str],
    tag: &str,
) -> anyhow::Result<Running> {
    let names = [format!("tb{tag}a"), format!("tb{tag}b")];
    let keys = [wg_keypair()?, wg_keypair()?];
    let mut processes = Vec::new();
    for (netns, name) in [(&pair.a, &names[0]), (&pair.b, &names[1])] {
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{name}.sock"));
        let mut command = Command::new(daemon);
        command
            .args(args)
            .arg(name)
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        processes.push(
            netns
                .spawn(&mut command)?
                .with_context(|| format!("start {}", daemon.display()))?,
        );
    }
    let running = Running {
        target: INNER_B,
        source: INNER_A,
        processes,
        encrypted: true,
        _work: None,
    };
    for name in &names {
        wait_for(
            &format!("{name}'s UAPI socket"),
            Duration::from_secs(5),
            || Path::new(&format!("/var/run/wireguard/{name}.sock")).exists(),
        )?;
    }
    let sides = [
        (&pair.a, &names[0], &keys[0], &keys[1], UNDERLAY_B, INNER_B),
        (&pair.b, &names[1], &keys[1], &keys[0], UNDERLAY_A, INNER_A),
    ];
    for (netns, name, own, peer, peer_underlay, peer_inner) in sides {
        let key_file = std::env::temp_dir().join(format!("{name}.key"));
        std::fs::write(&key_file, &own.0)?;
        let status = Command::new("wg")
            .args([
                "set",
                name,
                "listen-port",
                &WG_PORT.to_string(),
                "private-key",
            ])
            .arg(&key_file)
            .args([
                "peer",
                &peer.1,
                "endpoint",
                &format!("{peer_underlay}:{WG_PORT}"),
                "allowed-ips",
                &format!("{peer_inner}/32"),
            ])
            .status()?;
        std::fs::remove_file(&key_file)?;
        if !status.success() {
            bail!("wg set {name} failed");
        }
        block_on(async {
            let netlink = Netlink::connect_in(netns)?;
            let link = netlink.require_link(name).await?;
            netlink.set_mtu(link.index, TUNNEL_MTU).await?;
            netlink.set_up(link.index).await?;
            netlink
                .replace_route(&trellis_netns::Route::via_device(
                    IpNet::from(IpAddr::V4(peer_inner)),
                    link.index,
                ))
                .await?;
            anyhow::Ok(())
        })?;
    }
    Ok(running)
}

pub(crate) fn boringtun_path(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let installed = exe
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("peers/bin/boringtun-cli"));
    match installed {
        Some(path) if path.is_file() => Ok(path),
        _ => Ok(PathBuf::from("boringtun-cli")),
    }
}

/// trellis-gateway on each side, each told about the other through its desired-state file,
/// as two nodes of different clusters (so always encrypted).
fn start_trellis(pair: &Pair, extra_args: &[&str]) -> anyhow::Result<Running> {
    let binary = std::env::current_exe()?
        .parent()
        .context("binary has no directory")?
        .join("trellis-gateway");
    if !binary.is_file() {
        bail!(
            "{} is missing (cargo build --release --workspace)",
            binary.display()
        );
    }
    let work = tempfile::tempdir()?;
    let state_dirs = [work.path().join("a"), work.path().join("b")];
    let mut keys = Vec::new();
    for dir in &state_dirs {
        let output = Command::new(&binary)
            .arg("public-key")
            .arg("--state-dir")
            .arg(dir)
            .output()?;
        if !output.status.success() {
            bail!(
                "trellis-gateway public-key: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        keys.push(String::from_utf8(output.stdout)?.trim().to_string());
    }
    let sides = [
        (
            &pair.a,
            "tbtra",
            &state_dirs[0],
            "bench-a",
            "bench-b",
            &keys[1],
            UNDERLAY_B,
            INNER_B,
        ),
        (
            &pair.b,
            "tbtrb",
            &state_dirs[1],
            "bench-b",
            "bench-a",
            &keys[0],
            UNDERLAY_A,
            INNER_A,
        ),
    ];
    let mut processes = Vec::new();
    for (
        netns,
        interface,
        state_dir,
        own_cluster,
        peer_cluster,
        peer_key,
        peer_underlay,
        peer_inner,
    ) in sides
    {
        let desired = serde_json::json!({
            "revision": 1,
            "cluster": own_cluster,
            "nodes": [{
                "name": format!("{peer_cluster}/node"),
                "cluster": peer_cluster,
                "public_key": peer_key,
                "endpoint": format!("{peer_underlay}:{WG_PORT}"),
                "pod_cidrs": [format!("{}/24", Ipv4Addr::from(u32::from(peer_inner) & 0xffff_ff00))],
            }]
        });
        let desired_path = state_dir.join("desired.json");
        std::fs::write(&desired_path, serde_json::to_vec(&desired)?)?;
        let mut command = Command::new(&binary);
        command
            .arg("run")
            .arg("--state-dir")
            .arg(state_dir)
            .args([
                "--interface",
                interface,
                "--listen-port",
                &WG_PORT.to_string(),
                "--mtu",
                &TUNNEL_MTU.to_string(),
            ])
            .arg("--desired-state")
            .arg(&desired_path)
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        processes.push(
            netns
                .spawn(&mut command)?
                .context("start trellis-gateway")?,
        );
    }
    Ok(Running {
        target: INNER_B,
        source: INNER_A,
        processes,
        encrypted: true,
        _work: Some(work),
    })
}

fn start(pair: &Pair, contender: &str, boringtun: Option<&Path>) -> anyhow::Result<Running> {
    match contender {
        "veth" => {
            // The baseline: the inner addresses routed straight over the underlay.
            for (netns, gateway, destination) in [
                (&pair.a, UNDERLAY_B, INNER_B),
                (&pair.b, UNDERLAY_A, INNER_A),
            ] {
                block_on(async {
                    let netlink = Netlink::connect_in(netns)?;
                    let route = trellis_netns::Route::via_gateway(
                        IpNet::from(IpAddr::V4(destination)),
                        IpAddr::V4(gateway),
                        None,
                    );
                    netlink.replace_route(&route).await?;
                    anyhow::Ok(())
                })?;
            }
            Ok(Running {
                target: INNER_B,
                source: INNER_A,
                processes: Vec::new(),
                encrypted: false,
                _work: None,
            })
        }
        "wireguard-go" => start_userspace_wg(pair, Path::new("wireguard-go"), &["-f"], "wg"),
        "boringtun" => start_userspace_wg(
            pair,
            &boringtun_path(boringtun)?,
            &["-f", "--disable-drop-privileges", "--log", "/dev/null"],
            "bt",
        ),
        "trellis" => start_trellis(pair, &[]),
        // One device thread, as before per-CPU workers: what the workers buy.
        "trellis-1w" => start_trellis(pair, &["--workers", "1"]),
        other => bail!(
            "unknown contender {other:?} (veth, wireguard-go, boringtun, trellis, trellis-1w)"
        ),
    }
}

/// Busy and total jiffies of the whole machine.
pub(crate) fn cpu_jiffies() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// User + system CPU seconds the processes have used so far.
fn process_cpu_seconds(processes: &[Child]) -> anyhow::Result<f64> {
    let pids: Vec<u32> = processes.iter().map(Child::id).collect();
    pids_cpu_seconds(&pids)
}

/// User + system CPU seconds the processes `pids` (all their threads) have used so far.
pub(crate) fn pids_cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name (which may hold spaces) start after its ')'.
        let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields.get(11).context("utime")?.parse::<u64>()?
            + fields.get(12).context("stime")?.parse::<u64>()?;
    }
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks as f64 / hz)
}

/// UDP receive-buffer overflows seen by the namespace.
fn rcvbuf_errors(netns: &Netns) -> anyhow::Result<u64> {
    let snmp = netns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (Some(header), Some(values)) = (udp.first(), udp.get(1)) else {
        return Ok(0);
    };
    let column = header
        .split_whitespace()
        .position(|h| h == "RcvbufErrors")
        .context("no RcvbufErrors")?;
    Ok(values
        .split_whitespace()
        .nth(column)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Watches A's underlay for TCP segments while it runs.
struct Capture {
    child: Child,
}

impl Capture {
    fn start(netns: &Netns) -> anyhow::Result<Self> {
        let mut command = Command::new("tcpdump");
        command
            .args(["-i", "under", "-nn", "-l", "-q", "tcp"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let child = netns
            .spawn(&mut command)?
            .context("start tcpdump (apt-get install tcpdump)")?;
        // Give it a moment to attach before traffic starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { child })
    }

    /// The captured TCP segments, one summary line each.
    fn stop(mut self) -> anyhow::Result<Vec<String>> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let stdout = self.child.stdout.take().context("tcpdump stdout")?;
        let lines = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter(|line| !line.trim().is_empty())
            .collect();
        self.child.wait()?;
        Ok(lines)
    }
}

fn iperf(pair: &Pair, running: &Running, flows: u32, seconds: u32) -> anyhow::Result<f64> {
    let run = Iperf {
        client: &pair.a,
        server: &pair.b,
        target: running.target,
        source: Some(running.source),
        flows,
        seconds,
        reverse: false,
    };
    Ok(run.measure()?.gbps)
}

/// One iperf3 run between two namespaces: the server bound to `target` in `server`, the
/// client in `client` (bound to `source` if given); with `reverse`, the server sends (`-R`).
pub(crate) struct Iperf<'a> {
    pub(crate) client: &'a Netns,
    pub(crate) server: &'a Netns,
    pub(crate) target: Ipv4Addr,
    pub(crate) source: Option<Ipv4Addr>,
    pub(crate) flows: u32,
    pub(crate) seconds: u32,
    pub(crate) reverse: bool,
}

/// What one iperf3 run measured.
pub(crate) struct IperfResult {
    /// Received, all flows together.
    pub(crate) gbps: f64,
    /// TCP retransmissions of the sending side.
    pub(crate) retransmits: u64,
}

impl Iperf<'_> {
    pub(crate) fn measure(&self) -> anyhow::Result<IperfResult> {
        let target = self.target.to_string();
        let mut server_command = Command::new("iperf3");
        server_command
            .args(["-s", "-B", &target])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut server = self
            .server
            .spawn(&mut server_command)?
            .context("start iperf3 (apt-get install iperf3)")?;
        let address = SocketAddr::new(IpAddr::V4(self.target), 5201);
        let ready = wait_for("iperf3 server", Duration::from_secs(5), || {
            self.client
                .run(|| TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok())
                .unwrap_or(false)
        });
        if let Err(e) = ready {
            let _ = server.kill();
            let _ = server.wait();
            return Err(e);
        }
        // The probe connection above may have raced the server; let it settle.
        std::thread::sleep(Duration::from_millis(200));
        let seconds = self.seconds.to_string();
        let flows = self.flows.to_string();
        let mut args = vec!["-c", &target, "-t", &seconds, "-P", &flows, "-J"];
        let source = self.source.map(|s| s.to_string());
        if let Some(source) = &source {
            args.extend(["-B", source.as_str()]);
        }
        if self.reverse {
            args.push("-R");
        }
        let outcome = run_in(self.client, "iperf3", &args);
        let _ = server.kill();
        let _ = server.wait();
        let report: Value = serde_json::from_str(&outcome?)?;
        if let Some(error) = report["error"].as_str() {
            bail!("iperf3: {error}");
        }
        let gbps = report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|bps| bps / 1e9)
            .context("iperf3 report without sum_received")?;
        let retransmits = report["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(0);
        Ok(IperfResult { gbps, retransmits })
    }
}

/// Round trips as a user's `ping` (iputils) in A sees them: `count` echoes, `interval`
/// apart, one time per answer.
pub(crate) fn ping(
    pair: &Pair,
    target: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> anyhow::Result<Vec<Duration>> {
    ping_from(&pair.a, target, count, interval)
}

/// Round trips as `ping` in `netns` sees them (see [`ping`]).
pub(crate) fn ping_from(
    netns: &Netns,
    target: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let output = run_in(
        netns,
        "ping",
        &[
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            &format!("{:.3}", interval.as_secs_f64()),
            "-W",
            "1",
            &target.to_string(),
        ],
    )?;
    Ok(parse_ping_times(&output))
}

/// The `time=0.079 ms` of every answer line of iputils' `ping`.
pub(crate) fn parse_ping_times(output: &str) -> Vec<Duration> {
    output
        .lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once("time=")?;
            let millis: f64 = rest.split_whitespace().next()?.parse().ok()?;
            Some(Duration::from_secs_f64(millis / 1000.0))
        })
        .collect()
}

fn median_rtt_ms(pair: &Pair, running: &Running) -> anyhow::Result<f64> {
    let mut samples = ping(pair, running.target, 50, Duration::from_millis(10))?;
    if samples.is_empty() {
        bail!("no echo came back through the tunnel");
    }
    samples.sort();
    Ok(samples[samples.len() / 2].as_secs_f64() * 1000.0)
}

/// Starts `contender` between the pair and waits until an echo crosses it.
pub(crate) fn start_passing(
    pair: &Pair,
    contender: &str,
    boringtun: Option<&Path>,
) -> anyhow::Result<Running> {
    let running = start(pair, contender, boringtun)?;
    wait_for(
        &format!("{contender} to pass traffic"),
        Duration::from_secs(10),
        || {
            probe::icmp_echo(&pair.a, running.target, Duration::from_millis(300))
                .ok()
                .flatten()
                .is_some()
        },
    )?;
    Ok(running)
}

fn measure(contender: &str, flows: u32, options: &Options) -> anyhow::Result<Measurement> {
    let pair = Pair::new()?;
    let running = start_passing(&pair, contender, options.tunnels.boringtun.as_deref())?;
    let rtt_ms = median_rtt_ms(&pair, &running)?;
    let errors_before = rcvbuf_errors(&pair.a)? + rcvbuf_errors(&pair.b)?;
    let capture = Capture::start(&pair.a)?;
    let (busy_before, _) = cpu_jiffies()?;
    let tunnel_before = process_cpu_seconds(&running.processes)?;
    let started = Instant::now();
    let gbps = iperf(&pair, &running, flows, options.seconds)?;
    let elapsed = started.elapsed().as_secs_f64();
    let (busy_after, _) = cpu_jiffies()?;
    let tunnel_cpu = process_cpu_seconds(&running.processes)? - tunnel_before;
    let plaintext = capture.stop()?;
    if running.encrypted && !plaintext.is_empty() {
        bail!(
            "{contender}: {} plaintext TCP segments seen on the underlay with the tunnel up, first: {}",
            plaintext.len(),
            plaintext[0]
        );
    }
    // The same capture must see the baseline's plaintext, or it proves nothing for the rest.
    if !running.encrypted && plaintext.is_empty() {
        bail!("{contender}: the underlay capture saw no TCP at all; the leak check is blind");
    }
    let rcvbuf = rcvbuf_errors(&pair.a)? + rcvbuf_errors(&pair.b)? - errors_before;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let busy_seconds = (busy_after - busy_before) as f64 / ticks;
    let gbits = gbps * elapsed.min(f64::from(options.seconds));
    drop(running);
    Ok(Measurement {
        contender: contender.to_string(),
        flows,
        gbps,
        rtt_ms,
        rcvbuf_errors: rcvbuf,
        cpu_seconds_per_gbit: busy_seconds / gbits.max(f64::EPSILON),
        tunnel_cpu_seconds_per_gbit: tunnel_cpu / gbits.max(f64::EPSILON),
    })
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    println!(
        "tunnel benchmark: {} s iperf3 per run, 1 and 4 flows, {} round(s), contenders {}",
        options.seconds,
        options.rounds,
        options.tunnels.names.join(", ")
    );
    let mut results: Vec<Measurement> = Vec::new();
    for round in 0..options.rounds {
        for flows in [1, 4] {
            // Alternate the order each round so drift hits everyone alike.
            let mut order = options.tunnels.names.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for contender in &order {
                let measurement = measure(contender, flows, options)
                    .with_context(|| format!("{contender}, {flows} flow(s)"))?;
                println!(
                    "  {:<13} {} flow(s): {:>6.2} Gb/s  rtt {:.3} ms  rcvbuf errors {:>7}  machine cpu {:.2} s/Gb  tunnel cpu {:.2} s/Gb",
                    measurement.contender,
                    flows,
                    measurement.gbps,
                    measurement.rtt_ms,
                    measurement.rcvbuf_errors,
                    measurement.cpu_seconds_per_gbit,
                    measurement.tunnel_cpu_seconds_per_gbit
                );
                results.push(measurement);
            }
        }
    }
    print_summary(&results, &options.tunnels.names);
    Ok(())
}

fn mean(
    results: &[Measurement],
    contender: &str,
    flows: u32,
    field: fn(&Measurement) -> f64,
) -> Option<f64> {
    let values: Vec<f64> = results
        .iter()
        .filter(|m| m.contender == contender && m.flows == flows)
        .map(field)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The median over every run of `contender` (RTT is measured before each run, whatever its
/// flow count, and is noisy on a shared VM: one idle vCPU to wake costs tens of microseconds).
fn median_of(
    results: &[Measurement],
    contender: &str,
    field: fn(&Measurement) -> f64,
) -> Option<f64> {
    let mut values: Vec<f64> = results
        .iter()
        .filter(|m| m.contender == contender)
        .map(field)
        .collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn print_summary(results: &[Measurement], contenders: &[String]) {
    println!();
    println!(
        "{:<13} {:>10} {:>10} {:>12} {:>16} {:>16} {:>16}",
        "contender",
        "1 flow",
        "4 flows",
        "rtt ms (med)",
        "machine s/Gb (1)",
        "tunnel s/Gb (1)",
        "tunnel s/Gb (4)"
    );
    for contender in contenders {
        let one = mean(results, contender, 1, |m| m.gbps).unwrap_or(f64::NAN);
        let four = mean(results, contender, 4, |m| m.gbps).unwrap_or(f64::NAN);
        let rtt = median_of(results, contender, |m| m.rtt_ms).unwrap_or(f64::NAN);
        let cpu = mean(results, contender, 1, |m| m.cpu_seconds_per_gbit).unwrap_or(f64::NAN);
        let tunnel_one =
            mean(results, contender, 1, |m| m.tunnel_cpu_seconds_per_gbit).unwrap_or(f64::NAN);
        let tunnel_four =
            mean(results, contender, 4, |m| m.tunnel_cpu_seconds_per_gbit).unwrap_or(f64::NAN);
        println!(
            "{contender:<13} {one:>9.2}G {four:>9.2}G {rtt:>12.3} {cpu:>16.2} {tunnel_one:>16.2} {tunnel_four:>16.2}"
        );
    }
    if contenders.iter().any(|c| c == "trellis") {
        for peer in contenders
            .iter()
            .filter(|c| *c != "trellis" && *c != "veth")
        {
            for flows in [1, 4] {
                if let (Some(ours), Some(theirs)) = (
                    mean(results, "trellis", flows, |m| m.gbps),
                    mean(results, peer, flows, |m| m.gbps),
                ) {
                    println!("trellis / {peer}, {flows} flow(s): {:.2}x", ours / theirs);
                }
            }
            if let (Some(ours), Some(theirs)) = (
                median_of(results, "trellis", |m| m.rtt_ms),
                median_of(results, peer, |m| m.rtt_ms),
            ) {
                println!("trellis / {peer}, rtt: {:.2}x", ours / theirs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_times_are_read_from_answer_lines_only() {
        let output = "PING 10.99.2.1 (10.99.2.1) 56(84) bytes of data.
64 bytes from 10.99.2.1: icmp_seq=1 ttl=64 time=0.079 ms
64 bytes from 10.99.2.1: icmp_seq=2 ttl=64 time=1.25 ms

--- 10.99.2.1 ping statistics ---
2 packets transmitted, 2 received, 0% packet loss, time 10ms
rtt min/avg/max/mdev = 0.079/0.664/1.250/0.585 ms";
        assert_eq!(
            parse_ping_times(output),
            vec![Duration::from_micros(79), Duration::from_micros(1250)]
        );
    }
}
