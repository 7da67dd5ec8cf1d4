//! DNS answer rate: unbound and trellis-dns serving the same N A records under
//! `clusterset.local`, each pinned to one CPU (`taskset`), driven by `dnsperf` pinned to another
//! CPU with the same query file, alternating, in one invocation. Prints QPS, latency and the
//! trellis / unbound ratio.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

#[derive(clap::Args)]
pub struct Options {
    /// Seconds per dnsperf run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// A records served (one service each).
    #[arg(long, default_value_t = 1000)]
    records: u32,
    /// Repeat the pair, alternating the order, this many times.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// CPU the server under test is pinned to.
    #[arg(long, default_value_t = 0)]
    server_cpu: u32,
    /// CPU dnsperf is pinned to.
    #[arg(long, default_value_t = 1)]
    client_cpu: u32,
    /// dnsperf clients (sockets), `-c`.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// dnsperf outstanding queries, `-q`.
    #[arg(long, default_value_t = 200)]
    outstanding: u32,
    /// trellis-dns binary (default: beside this one; `cargo build --release -p trellis-dns`).
    #[arg(long)]
    trellis_dns: Option<PathBuf>,
    /// unbound binary.
    #[arg(long, default_value = "unbound")]
    unbound: PathBuf,
    /// Which contenders to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "unbound,trellis")]
    contenders: Vec<String>,
}

#[derive(Debug, Clone)]
struct Measurement {
    contender: String,
    qps: f64,
    avg_latency_ms: f64,
    lost: u64,
    noerror_percent: f64,
    rcvbuf_errors: u64,
    /// Server CPU time (user + system) per answered query, microseconds: what the server
    /// spends per answer, whoever was the bottleneck.
    cpu_us_per_query: f64,
    /// Share of its CPU the server used during the run (1.0 = saturated).
    cpu_busy: f64,
}

/// CPU seconds (user + system, all threads) used so far by process `pid`.
fn cpu_seconds(pid: u32, ticks_per_second: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("malformed /proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .context("short /proc/pid/stat")?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    Ok(ticks / ticks_per_second)
}

fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The machine's UDP `RcvbufErrors` (datagrams dropped on a full receive buffer).
fn rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// A server process, killed by PID and reaped on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn address(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        100 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

fn name(i: u32) -> String {
    format!("web{i}.shop.svc.clusterset.local")
}

/// A port free for both UDP and TCP on 127.0.0.1 right now.
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1")
}

/// A minimal A query for `name` (ID 1, RD).
fn query(name: &str) -> Vec<u8> {
    let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Waits until `port` answers an A query for record 0 with NOERROR and one answer.
fn wait_ready(port: u16, server: &mut Server) -> anyhow::Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Some(status) = server.0.try_wait()? {
            bail!("server exited at start: {status}");
        }
        socket.send_to(&query(&name(0)), ("127.0.0.1", port))?;
        if let Ok(len) = socket.recv(&mut buf)
            && len >= 12
            && buf[3] & 0x0f == 0
            && buf[6..8] == [0, 1]
        {
            return Ok(());
        }
    }
    bail!("server on port {port} never answered")
}

fn unbound_config(dir: &Path, port: u16, records: u32) -> anyhow::Result<PathBuf> {
    let mut conf = String::new();
    writeln!(conf, "server:")?;
    writeln!(conf, "  interface: 127.0.0.1")?;
    writeln!(conf, "  port: {port}")?;
    writeln!(conf, "  num-threads: 1")?;
    writeln!(conf, "  do-daemonize: no")?;
    writeln!(conf, "  chroot: \"\"")?;
    writeln!(conf, "  username: \"\"")?;
    writeln!(conf, "  directory: \"{}\"", dir.display())?;
    writeln!(conf, "  pidfile: \"\"")?;
    writeln!(conf, "  use-syslog: no")?;
    writeln!(conf, "  logfile: \"\"")?;
    writeln!(conf, "  verbosity: 0")?;
    writeln!(conf, "  do-ip6: no")?;
    writeln!(conf, "  so-rcvbuf: 4m")?;
    writeln!(conf, "  module-config: \"iterator\"")?;
    writeln!(conf, "  access-control: 127.0.0.0/8 allow")?;
    writeln!(conf, "  local-zone: \"clusterset.local.\" static")?;
    for i in 0..records {
        writeln!(conf, "  local-data: \"{}. 5 IN A {}\"", name(i), address(i))?;
    }
    let path = dir.join("unbound.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

fn catalog(dir: &Path, records: u32) -> anyhow::Result<PathBuf> {
    let services: Vec<serde_json::Value> = (0..records)
        .map(|i| {
            serde_json::json!({
                "name": format!("web{i}"),
                "namespace": "shop",
                "ips": [address(i).to_string()],
                "clusters": [{"cluster": "local"}]
            })
        })
        .collect();
    let path = dir.join("catalog.json");
    std::fs::write(
        &path,
        serde_json::json!({"revision": 1, "services": services}).to_string(),
    )?;
    Ok(path)
}

fn start(contender: &str, dir: &Path, port: u16, options: &Options) -> anyhow::Result<Server> {
    let cpu = options.server_cpu.to_string();
    let mut command = Command::new("taskset");
    command.args(["-c", &cpu]);
    match contender {
        "unbound" => {
            let conf = unbound_config(dir, port, options.records)?;
            command.arg(&options.unbound).arg("-d").arg("-c").arg(conf);
        }
        "trellis" => {
            let binary = match &options.trellis_dns {
                Some(path) => path.clone(),
                None => std::env::current_exe()?
                    .parent()
                    .context("no parent directory")?
                    .join("trellis-dns"),
            };
            if !binary.is_file() {
                bail!(
                    "{} not found (cargo build --release -p trellis-dns)",
                    binary.display()
                );
            }
            let catalog = catalog(dir, options.records)?;
            // The upstream is never used: every query is in the zone. dnsperf repeats the
            // same names from one address far beyond any client: no rate limit (unbound has
            // none configured either).
            command
                .arg(binary)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics", "off"])
                .args(["--upstream", "127.0.0.1:9", "--udp-workers", "1"])
                .args(["--rate-limit", "0"])
                .arg("--catalog")
                .arg(catalog)
                .env("RUST_LOG", "warn");
        }
        other => bail!("unknown contender {other}"),
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {contender}"))?;
    let mut server = Server(child);
    wait_ready(port, &mut server).with_context(|| format!("{contender} not ready"))?;
    Ok(server)
}

/// `Queries per second:   123.45` → 123.45
fn field(output: &str, label: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.trim_start().starts_with(label))?;
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn dnsperf(port: u16, queries: &Path, options: &Options) -> anyhow::Result<(f64, f64, u64, f64)> {
    let output = Command::new("taskset")
        .args(["-c", &options.client_cpu.to_string(), "dnsperf"])
        .args(["-s", "127.0.0.1", "-p", &port.to_string()])
        .arg("-d")
        .arg(queries)
        .args(["-l", &options.seconds.to_string()])
        .args(["-c", &options.clients.to_string()])
        .args(["-q", &options.outstanding.to_string()])
        .args(["-t", "2"])
        .output()
        .context("running dnsperf (apt-get install dnsperf)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "dnsperf failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let qps = field(&text, "Queries per second:").context("no QPS in dnsperf output")?;
    let latency = field(&text, "Average Latency (s):").context("no latency in dnsperf output")?;
    let lost = field(&text, "Queries lost:").unwrap_or(f64::NAN) as u64;
    let noerror = text
        .lines()
        .find(|l| l.trim_start().starts_with("Response codes:"))
        .and_then(|l| {
            let rest = &l[l.find("NOERROR")? + "NOERROR".len()..];
            let pct = rest.split('(').nth(1)?.split('%').next()?;
            pct.parse::<f64>().ok()
        })
        .unwrap_or(0.0);
    Ok((qps, latency * 1000.0, lost, noerror))
}

fn measure(contender: &str, queries: &Path, options: &Options) -> anyhow::Result<Measurement> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let server = start(contender, dir.path(), port, options)?;
    let tick = ticks_per_second();
    let pid = server.0.id();
    let before = rcvbuf_errors();
    let cpu_before = cpu_seconds(pid, tick)?;
    let (qps, avg_latency_ms, lost, noerror_percent) = dnsperf(port, queries, options)?;
    let cpu = cpu_seconds(pid, tick)? - cpu_before;
    let rcvbuf_errors = rcvbuf_errors().saturating_sub(before);
    drop(server);
    let answered = qps * f64::from(options.seconds);
    Ok(Measurement {
        contender: contender.to_string(),
        qps,
        avg_latency_ms,
        lost,
        noerror_percent,
        rcvbuf_errors,
        cpu_us_per_query: cpu * 1e6 / answered.max(1.0),
        cpu_busy: cpu / f64::from(options.seconds),
    })
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.seconds == 0
        || options.seconds > 600
        || options.records == 0
        || options.records > 1_000_000
    {
        bail!("--seconds must be within 1..=600 and --records within 1..=1000000");
    }
    println!(
        "DNS benchmark: {} A records under clusterset.local, server on CPU {}, dnsperf on CPU {} \
         (-c {} -q {}), {} s per run, {} round(s)",
        options.records,
        options.server_cpu,
        options.client_cpu,
        options.clients,
        options.outstanding,
        options.seconds,
        options.rounds
    );
    let dir = tempfile::tempdir()?;
    let queries = dir.path().join("queries.txt");
    let mut text = String::new();
    for i in 0..options.records {
        writeln!(text, "{} A", name(i))?;
    }
    std::fs::write(&queries, text)?;

    let mut results = Vec::new();
    for round in 0..options.rounds {
        let mut order = options.contenders.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for contender in &order {
            let m = measure(contender, &queries, options)
                .with_context(|| format!("{contender}, round {round}"))?;
            println!(
                "  {:<8} {:>8.0} QPS  avg latency {:.3} ms  server CPU {:>3.0}% {:.2} us/query  lost {}  rcvbuf errors {}  NOERROR {:.2}%",
                m.contender,
                m.qps,
                m.avg_latency_ms,
                m.cpu_busy * 100.0,
                m.cpu_us_per_query,
                m.lost,
                m.rcvbuf_errors,
                m.noerror_percent
            );
            if m.noerror_percent < 99.9 {
                bail!(
                    "{contender} answered NOERROR to only {:.2}% of queries",
                    m.noerror_percent
                );
            }
            results.push(m);
        }
    }
    print_summary(&results, &options.contenders);
    Ok(())
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

fn print_summary(results: &[Measurement], contenders: &[String]) {
    let series = |contender: &str, f: fn(&Measurement) -> f64| -> Vec<f64> {
        results
            .iter()
            .filter(|m| m.contender == contender)
            .map(f)
            .collect()
    };
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    println!();
    println!(
        "{:<8} {:>12} {:>12} {:>10} {:>10} {:>16} {:>18}",
        "server",
        "median QPS",
        "mean QPS",
        "min QPS",
        "max QPS",
        "mean latency ms",
        "median CPU us/q"
    );
    for contender in contenders {
        let qps = series(contender, |m| m.qps);
        let latency = series(contender, |m| m.avg_latency_ms);
        let cpu = series(contender, |m| m.cpu_us_per_query);
        println!(
            "{contender:<8} {:>12.0} {:>12.0} {:>10.0} {:>10.0} {:>16.3} {:>18.2}",
            median(qps.clone()).unwrap_or(f64::NAN),
            mean(&qps).unwrap_or(f64::NAN),
            qps.iter().copied().fold(f64::INFINITY, f64::min),
            qps.iter().copied().fold(0.0, f64::max),
            mean(&latency).unwrap_or(f64::NAN),
            median(cpu).unwrap_or(f64::NAN)
        );
    }
    let ours = series("trellis", |m| m.qps);
    let theirs = series("unbound", |m| m.qps);
    if let (Some(o), Some(t)) = (median(ours.clone()), median(theirs.clone())) {
        println!("trellis / unbound QPS: {:.2}x (medians)", o / t);
    }
    if let (Some(o), Some(t)) = (mean(&ours), mean(&theirs)) {
        println!("trellis / unbound QPS: {:.2}x (means)", o / t);
    }
    let ours = median(series("trellis", |m| m.cpu_us_per_query));
    let theirs = median(series("unbound", |m| m.cpu_us_per_query));
    if let (Some(o), Some(t)) = (ours, theirs) {
        println!(
            "server CPU per query: unbound / trellis {:.2}x (the capacity ratio when the server, \
             not dnsperf, is the bottleneck)",
            t / o
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dnsperf_fields() {
        let out = "  Queries sent:         100\n  Queries lost:         3 (3.00%)\n  \
                   Response codes:       NOERROR 97 (100.00%)\n  Average Latency (s):  0.000190 (min 0.000010, max 0.001)\n  \
                   Queries per second:   170123.456789\n";
        assert_eq!(field(out, "Queries per second:"), Some(170123.456789));
        assert_eq!(field(out, "Average Latency (s):"), Some(0.000190));
        assert_eq!(field(out, "Queries lost:"), Some(3.0));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn query_wire_format_and_addresses() {
        assert_eq!(
            query("a.b"),
            [
                0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 1, b'b', 0, 0, 1, 0, 1
            ]
        );
        assert_eq!(address(0), Ipv4Addr::new(10, 100, 0, 1));
        assert_eq!(address(999), Ipv4Addr::new(10, 100, 3, 250));
        let all: std::collections::HashSet<_> = (0..100_000).map(address).collect();
        assert_eq!(all.len(), 100_000);
    }
}
