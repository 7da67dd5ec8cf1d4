//! Handshake bring-up: N WireGuard initiators (boringtun's `noise`, each with its own key,
//! source address and socket) all start a handshake at once with one responder, which knows
//! every one of them as a peer: boringtun-cli, wireguard-go or trellis-gateway, between two
//! fresh namespaces. Measured: how long until every session is up, the waves (cookie replies
//! make initiators wait for WireGuard's 5 s retransmission), and the responder's CPU time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use trellis_netns::Netlink;

use crate::tunnel::{Pair, UNDERLAY_A, UNDERLAY_B, WG_PORT, block_on, boringtun_path, wait_for};

/// Initiator addresses: 198.19.0.0/16 on A's underlay, routed from B via A.
const INITIATORS: IpNet = IpNet::V4(
    match ipnet::Ipv4Net::new(Ipv4Addr::new(198, 19, 0, 0), 16) {
        Ok(net) => net,
        Err(_) => panic!("constant prefix"),
    },
);
const MAX_PEERS: usize = 5000;
const RESPONDER_IF: &str = "tbhs";

#[derive(clap::Args)]
pub struct Options {
    /// Initiators, each a peer of the responder (at most 5,000).
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Which responders to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "wireguard-go,boringtun,trellis"
    )]
    contenders: Vec<String>,
    /// Give up on the sessions not up after this many seconds.
    #[arg(long, default_value_t = 40)]
    timeout_seconds: u64,
    /// boringtun-cli; by default the one `scripts/install-peers` puts in target/peers, else PATH.
    #[arg(long)]
    boringtun: Option<std::path::PathBuf>,
    /// Repeat the whole set this many times.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
}

struct Outcome {
    contender: String,
    up: usize,
    /// Seconds from the burst to the first, half, 90 % and all sessions up.
    first: f64,
    half: f64,
    p90: f64,
    all: Option<f64>,
    cookies: usize,
    retries: usize,
    /// Responder CPU seconds (user + system) from the burst to the end.
    cpu: f64,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn initiator_ip(i: usize) -> Ipv4Addr {
    let n = u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 1 + i as u32;
    Ipv4Addr::from(n)
}

/// The pod address the responder allows for initiator `i`.
fn inner_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + 1 + i as u32)
}

/// A running responder; dropping it stops its process.
struct Responder {
    child: Child,
    _work: tempfile::TempDir,
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Responder {
    /// User + system CPU seconds of the process so far.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
            + fields.get(12).context("stime")?.parse::<u64>()?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
        Ok(ticks as f64 / hz)
    }
}

fn start_stock(
    pair: &Pair,
    daemon: &Path,
    args: &[&str],
    secret: &StaticSecret,
    peers: &[PublicKey],
) -> anyhow::Result<Responder> {
    let work = tempfile::tempdir()?;
    let socket = format!("/var/run/wireguard/{RESPONDER_IF}.sock");
    let _ = std::fs::remove_file(&socket);
    let mut command = Command::new(daemon);
    command
        .args(args)
        .arg(RESPONDER_IF)
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = pair
        .b
        .spawn(&mut command)?
        .with_context(|| format!("start {}", daemon.display()))?;
    let responder = Responder { child, _work: work };
    wait_for("the UAPI socket", Duration::from_secs(5), || {
        Path::new(&socket).exists()
    })?;
    let mut config = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {WG_PORT}\n",
        b64(secret.as_bytes())
    );
    for (i, peer) in peers.iter().enumerate() {
        config.push_str(&format!(
            "[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n",
            b64(peer.as_bytes()),
            inner_ip(i)
        ));
    }
    let file = responder._work.path().join("wg.conf");
    std::fs::write(&file, config)?;
    let status = Command::new("wg")
        .args(["setconf", RESPONDER_IF])
        .arg(&file)
        .status()
        .context("wg setconf")?;
    if !status.success() {
        bail!("wg setconf {RESPONDER_IF} failed");
    }
    block_on(async {
        let netlink = Netlink::connect_in(&pair.b)?;
        let link = netlink.require_link(RESPONDER_IF).await?;
        netlink.set_up(link.index).await?;
        anyhow::Ok(())
    })?;
    Ok(responder)
}

fn start_trellis(pair: &Pair, peers: &[PublicKey]) -> anyhow::Result<(Responder, PublicKey)> {
    let binary = std::env::current_exe()?
        .parent()
        .context("binary has no directory")?
        .join("trellis-gateway");
    let work = tempfile::tempdir()?;
    let state_dir = work.path().join("state");
    let output = Command::new(&binary)
        .arg("public-key")
        .arg("--state-dir")
        .arg(&state_dir)
        .output()
        .with_context(|| format!("{} (cargo build --release)", binary.display()))?;
    if !output.status.success() {
        bail!("trellis-gateway public-key failed");
    }
    let public = base64::engine::general_purpose::STANDARD
        .decode(String::from_utf8(output.stdout)?.trim())?;
    let public: [u8; 32] = public.try_into().ok().context("key length")?;
    let nodes: Vec<serde_json::Value> = peers
        .iter()
        .enumerate()
        .map(|(i, key)| {
            serde_json::json!({
                "name": format!("peers/p{i}"),
                "cluster": "peers",
                "public_key": b64(key.as_bytes()),
                "pod_cidrs": [format!("{}/32", inner_ip(i))],
            })
        })
        .collect();
    let desired = serde_json::json!({"revision": 1, "cluster": "bench", "nodes": nodes});
    let desired_path = work.path().join("desired.json");
    std::fs::write(&desired_path, serde_json::to_vec(&desired)?)?;
    let mut command = Command::new(&binary);
    command
        .arg("run")
        .arg("--state-dir")
        .arg(&state_dir)
        .args(["--interface", RESPONDER_IF, "--listen-port"])
        .arg(WG_PORT.to_string())
        .arg("--desired-state")
        .arg(&desired_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = pair
        .b
        .spawn(&mut command)?
        .context("start trellis-gateway")?;
    let responder = Responder { child, _work: work };
    // Ready once the whole state (peers, then routes) is applied.
    let metrics: SocketAddr = "127.0.0.1:9586".parse()?;
    wait_for(
        "trellis-gateway to apply its peers",
        Duration::from_secs(60),
        || {
            pair.b
                .run(move || trellis_http::get(metrics, "/metrics", Duration::from_millis(500)))
                .ok()
                .and_then(Result::ok)
                .is_some_and(|r| r.body.contains("trellis_gateway_desired_state_revision 1"))
        },
    )?;
    Ok((responder, PublicKey::from(public)))
}

/// Puts the initiators' addresses on A and routes them from B.
fn address_initiators(pair: &Pair, count: usize) -> anyhow::Result<()> {
    block_on(async {
        let na = Netlink::connect_in(&pair.a)?;
        let under = na.require_link("under").await?;
        for i in 0..count {
            na.add_address(under.index, IpNet::from(IpAddr::V4(initiator_ip(i))))
                .await?;
        }
        let nb = Netlink::connect_in(&pair.b)?;
        nb.replace_route(&trellis_netns::Route::via_gateway(
            INITIATORS,
            IpAddr::V4(UNDERLAY_A),
            None,
        ))
        .await?;
        anyhow::Ok(())
    })
}

fn measure(contender: &str, options: &Options) -> anyhow::Result<Outcome> {
    let count = options.peers;
    let pair = Pair::new()?;
    address_initiators(&pair, count)?;
    let secrets: Vec<StaticSecret> = (0..count)
        .map(|_| StaticSecret::random_from_rng(rand_core::OsRng))
        .collect();
    let publics: Vec<PublicKey> = secrets.iter().map(PublicKey::from).collect();
    let (responder, responder_key) = match contender {
        "trellis" => start_trellis(&pair, &publics)?,
        "boringtun" | "wireguard-go" => {
            let secret = StaticSecret::random_from_rng(rand_core::OsRng);
            let public = PublicKey::from(&secret);
            let responder = if contender == "boringtun" {
                start_stock(
                    &pair,
                    &boringtun_path(options.boringtun.as_deref())?,
                    &["-f", "--disable-drop-privileges", "--log", "/dev/null"],
                    &secret,
                    &publics,
                )?
            } else {
                start_stock(&pair, Path::new("wireguard-go"), &["-f"], &secret, &publics)?
            };
            (responder, public)
        }
        other => bail!("unknown contender {other:?} (wireguard-go, boringtun, trellis)"),
    };
    let sockets: Vec<UdpSocket> = pair.a.run(|| -> std::io::Result<Vec<UdpSocket>> {
        (0..count)
            .map(|i| {
                let socket = UdpSocket::bind((initiator_ip(i), 0))?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            })
            .collect()
    })??;
    let mut tunns: Vec<Tunn> = secrets
        .into_iter()
        .enumerate()
        .map(|(i, secret)| Tunn::new(secret, responder_key, None, None, i as u32, None))
        .collect();
    let target = SocketAddr::new(IpAddr::V4(UNDERLAY_B), WG_PORT);
    let mut up_at: Vec<Option<f64>> = vec![None; count];
    let (mut cookies, mut retries) = (0, 0);
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let cpu_before = responder.cpu_seconds()?;
    let started = Instant::now();
    // The burst: every initiator at once.
    for (tunn, socket) in tunns.iter_mut().zip(&sockets) {
        if let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut out, false)
        {
            socket.send_to(init, target)?;
        }
    }
    let deadline = started + Duration::from_secs(options.timeout_seconds);
    let mut last_timers = Instant::now();
    let mut pending = count;
    while pending > 0 && Instant::now() < deadline {
        let mut received = false;
        for i in 0..count {
            while let Ok((len, _)) = sockets[i].recv_from(&mut buf) {
                received = true;
                if buf[0] == 3 {
                    cookies += 1;
                }
                let mut reply = match tunns[i].decapsulate(Some(target.ip()), &buf[..len], &mut out)
                {
                    TunnResult::WriteToNetwork(reply) => Some(reply.to_vec()),
                    _ => None,
                };
                while let Some(datagram) = reply.take() {
                    sockets[i].send_to(&datagram, target)?;
                    if let TunnResult::WriteToNetwork(more) =
                        tunns[i].decapsulate(None, &[], &mut out)
                    {
                        reply = Some(more.to_vec());
                    }
                }
                if up_at[i].is_none() && tunns[i].stats().0.is_some() {
                    up_at[i] = Some(started.elapsed().as_secs_f64());
                    pending -= 1;
                }
            }
        }
        // WireGuard's timers: a retransmission 5 s after an unanswered (or cookie-answered)
        // initiation, now with the cookie's MAC2.
        if last_timers.elapsed() >= Duration::from_millis(100) {
            last_timers = Instant::now();
            for i in 0..count {
                if up_at[i].is_some() {
                    continue;
                }
                if let TunnResult::WriteToNetwork(init) = tunns[i].update_timers(&mut out) {
                    retries += 1;
                    sockets[i].send_to(init, target)?;
                }
            }
        }
        if !received {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let cpu = responder.cpu_seconds()? - cpu_before;
    drop(responder);
    let mut times: Vec<f64> = up_at.iter().flatten().copied().collect();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| -> f64 {
        let need = ((q * count as f64).ceil() as usize).max(1);
        times.get(need - 1).copied().unwrap_or(f64::NAN)
    };
    Ok(Outcome {
        contender: contender.to_string(),
        up: times.len(),
        first: times.first().copied().unwrap_or(f64::NAN),
        half: at(0.5),
        p90: at(0.9),
        all: (times.len() == count).then(|| at(1.0)),
        cookies,
        retries,
        cpu,
    })
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.peers == 0 || options.peers > MAX_PEERS {
        bail!("--peers must be between 1 and {MAX_PEERS}");
    }
    println!(
        "handshake bring-up: {} initiators at once, {} s timeout, {} round(s), responders {}",
        options.peers,
        options.timeout_seconds,
        options.rounds,
        options.contenders.join(", ")
    );
    for _ in 0..options.rounds {
        for contender in &options.contenders {
            let o = measure(contender, options).with_context(|| contender.clone())?;
            let all = o
                .all
                .map_or_else(|| "not all".to_string(), |s| format!("{s:.2} s"));
            println!(
                "  {:<13} up {:>5}/{}  first {:.3} s  50% {:.3} s  90% {:.3} s  all {}  cookies {}  retransmits {}  responder cpu {:.2} s",
                o.contender,
                o.up,
                options.peers,
                o.first,
                o.half,
                o.p90,
                all,
                o.cookies,
                o.retries,
                o.cpu
            );
        }
    }
    Ok(())
}
