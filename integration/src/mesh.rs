//! What the end-to-end tests need to drive a lab's workload: its layout from the state file,
//! TCP and HTTP clients opened inside pod namespaces, `dig`, captures on the underlay, and the
//! daemons' HTTP endpoints.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_netns::Netns;

use trellis_test_support::poll_until;

use crate::TestLab;

/// The echo server's ports in every pod.
pub const ECHO_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 8080;

/// A pod of the lab, as its state file records it.
#[derive(Debug, Clone)]
pub struct LabPod {
    /// `c1/pod-0`.
    pub name: String,
    pub cluster: String,
    /// `c1/node-0`.
    pub node: String,
    pub netns: String,
    pub address: Ipv4Addr,
}

/// A node of the lab.
#[derive(Debug, Clone)]
pub struct LabNode {
    /// `c1/node-0`.
    pub name: String,
    pub cluster: String,
    pub netns: String,
    pub address: Ipv4Addr,
}

impl TestLab {
    /// `trellis lab up <args>`, which must succeed; returns its output.
    pub fn up(&self, args: &[&str]) -> String {
        let mut all = vec!["up"];
        all.extend_from_slice(args);
        let output = self.trellis(&all);
        let text = crate::text(&output);
        assert!(output.status.success(), "lab up failed:\n{text}");
        text
    }

    pub fn state_dir(&self) -> std::path::PathBuf {
        Path::new("/run/trellis/lab").join(&self.name)
    }

    pub fn state(&self) -> Value {
        let path = self.state_dir().join("state.json");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&bytes).expect("the lab state is JSON")
    }

    pub fn pods(&self) -> Vec<LabPod> {
        let state = self.state();
        let mut pods = Vec::new();
        for cluster in state["clusters"].as_array().expect("clusters") {
            let cluster_name = cluster["name"].as_str().expect("name");
            for node in cluster["nodes"].as_array().expect("nodes") {
                for pod in node["pods"].as_array().expect("pods") {
                    pods.push(LabPod {
                        name: format!("{cluster_name}/{}", pod["name"].as_str().unwrap()),
                        cluster: cluster_name.to_string(),
                        node: format!("{cluster_name}/{}", node["name"].as_str().unwrap()),
                        netns: pod["netns"].as_str().unwrap().to_string(),
                        address: pod["address"].as_str().unwrap().parse().unwrap(),
                    });
                }
            }
        }
        pods
    }

    pub fn pod(&self, name: &str) -> LabPod {
        self.pods()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn nodes(&self) -> Vec<LabNode> {
        let state = self.state();
        let mut nodes = Vec::new();
        for cluster in state["clusters"].as_array().expect("clusters") {
            let cluster_name = cluster["name"].as_str().expect("name");
            for node in cluster["nodes"].as_array().expect("nodes") {
                nodes.push(LabNode {
                    name: format!("{cluster_name}/{}", node["name"].as_str().unwrap()),
                    cluster: cluster_name.to_string(),
                    netns: node["netns"].as_str().unwrap().to_string(),
                    address: node["address"].as_str().unwrap().parse().unwrap(),
                });
            }
        }
        nodes
    }

    pub fn node(&self, name: &str) -> LabNode {
        self.nodes()
            .into_iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The PID of a running daemon of the lab (`c1/controller`, `c1/node-0/gateway`).
    pub fn daemon_pid(&self, name: &str) -> u32 {
        self.state()["daemons"]
            .as_array()
            .expect("daemons")
            .iter()
            .find(|d| d["name"] == name)
            .and_then(|d| d["pid"].as_u64())
            .unwrap_or_else(|| panic!("no daemon {name}")) as u32
    }

    /// Kills a daemon with SIGKILL, as a crash would.
    pub fn kill_daemon(&self, name: &str) {
        let pid = self.daemon_pid(name);
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {name} (pid {pid})");
    }

    /// The routes `node` (`c1/node-0`) has for `destination`, as `ip -o route show` prints
    /// them, the one in use first.
    pub fn routes(&self, node: &str, destination: &str) -> String {
        let output = self.trellis(&["exec", node, "--", "ip", "-o", "route", "show", destination]);
        String::from_utf8_lossy(&output.stdout).to_string()
    }

    /// Waits (up to 15 s) until the route `node` uses for `destination` contains `want`
    /// ("dev trellis0", "via 198.18.1.11"); returns every route for it.
    pub fn wait_for_route(&self, node: &str, destination: &str, want: &str) -> String {
        let mut routes = String::new();
        let settled = poll_until(Duration::from_secs(15), || {
            routes = self.routes(node, destination);
            routes
                .lines()
                .next()
                .is_some_and(|first| first.contains(want))
                .then_some(())
        });
        assert!(
            settled.is_some(),
            "{node} never routed {destination} {want}: {routes}"
        );
        routes
    }

    /// `dig +short` from inside a pod against its cluster's DNS (on the cluster's first node).
    pub fn dig(&self, pod: &str, name: &str) -> Vec<String> {
        let cluster = pod.split('/').next().unwrap();
        let dns = self.node(&format!("{cluster}/node-0")).address;
        let output = self.trellis(&[
            "exec",
            pod,
            "--",
            "dig",
            "+short",
            "+time=1",
            "+tries=2",
            &format!("@{dns}"),
            name,
        ]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A TCP connection opened from inside `netns` (only the socket is made there).
pub fn connect_in(netns: &str, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let netns = Netns::open(netns).map_err(std::io::Error::other)?;
    let stream = netns
        .run(|| TcpStream::connect_timeout(&to, timeout))
        .map_err(std::io::Error::other)??;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Sends a message to a TCP echo server from inside `netns` and checks it comes back.
pub fn tcp_echo(netns: &str, to: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut stream = connect_in(netns, to, timeout)?;
    let message = format!("hello {to} from {netns}\n");
    stream.write_all(message.as_bytes())?;
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back)?;
    if back != message.as_bytes() {
        return Err(std::io::Error::other(format!(
            "echo from {to} differs: {:?}",
            String::from_utf8_lossy(&back)
        )));
    }
    Ok(())
}

/// `GET path` from inside `netns`; the body of a 200 response.
pub fn http_get(
    netns: &str,
    to: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<String> {
    let netns = Netns::open(netns).map_err(std::io::Error::other)?;
    netns
        .run(|| trellis_http::get(to, path, timeout).and_then(trellis_http::Response::ok_body))
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)
}

/// A client that sends a numbered line every 10 ms and reads it back, recording the longest
/// wait for an echo and the first error, until told to stop.
pub struct LiveStream {
    stop: Arc<AtomicBool>,
    worker: std::thread::JoinHandle<(Duration, u64, Option<String>)>,
}

impl LiveStream {
    pub fn start(mut stream: TcpStream) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let worker = std::thread::spawn(move || {
            let mut longest = Duration::ZERO;
            let mut echoed = 0u64;
            let mut last = Instant::now();
            while !stopping.load(Ordering::Relaxed) {
                let line = format!("{echoed:016}\n");
                let mut back = [0u8; 17];
                let outcome = stream
                    .write_all(line.as_bytes())
                    .and_then(|()| stream.read_exact(&mut back));
                if let Err(e) = outcome {
                    return (longest, echoed, Some(e.to_string()));
                }
                if back != line.as_bytes() {
                    return (longest, echoed, Some("echo out of order".into()));
                }
                echoed += 1;
                longest = longest.max(last.elapsed());
                last = Instant::now();
                std::thread::sleep(Duration::from_millis(10));
            }
            (longest, echoed, None)
        });
        Self { stop, worker }
    }

    /// The longest wait for an echo and how many came back; panics on an error.
    pub fn finish(self, what: &str) -> (Duration, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let (longest, echoed, error) = self.worker.join().expect("stream thread");
        assert!(error.is_none(), "{what}: {error:?} after {echoed} echoes");
        (longest, echoed)
    }
}

/// A process the test started; killed (by PID) when dropped.
pub struct Started(pub std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tcpdump` writing what crosses the lab's underlay bridge to `file`, until stopped.
pub fn capture_underlay(lab: &TestLab, file: &Path) -> Started {
    let switch = Netns::open(&format!("tl-{}-switch", lab.name)).expect("the switch namespace");
    let mut command = Command::new("tcpdump");
    command
        .args(["-i", "br0", "-nn", "-U", "-s", "128", "-w"])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = switch
        .spawn(&mut command)
        .expect("enter the switch")
        .expect("tcpdump runs (install tcpdump)");
    // tcpdump needs a moment to attach before the first packet counts.
    std::thread::sleep(Duration::from_millis(500));
    Started(child)
}

/// Captures the underlay for `during`, then counts the packets matching each tcpdump filter.
pub fn capture_and_count(
    lab: &TestLab,
    file: &Path,
    during: Duration,
    filters: &[&str],
) -> Vec<usize> {
    let capture = capture_underlay(lab, file);
    std::thread::sleep(during);
    // With -U tcpdump writes each packet as it comes, so stopping it loses nothing.
    std::thread::sleep(Duration::from_millis(200));
    drop(capture);
    filters.iter().map(|f| count_matching(file, f)).collect()
}

/// The packets of a capture file that match a tcpdump `filter`.
pub fn count_matching(file: &Path, filter: &str) -> usize {
    let output = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .arg(filter)
        .output()
        .expect("tcpdump reads the capture");
    String::from_utf8_lossy(&output.stdout).lines().count()
}

/// The value of one series (`name{labels}` exactly as exposed) in a Prometheus text page.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// One series of a daemon's `/metrics`, fetched from inside `netns`.
pub fn scrape(netns: &str, endpoint: SocketAddr, series: &str) -> Option<f64> {
    let text = http_get(netns, endpoint, "/metrics", Duration::from_secs(3)).ok()?;
    sample(&text, series)
}

/// Sends `count` UDP datagrams from inside `netns` with the IPv4 source address `source`,
/// whatever the namespace's own address is (a raw socket writes the IP header itself: what a
/// pod with `CAP_NET_RAW` can do to pass as another).
pub fn send_udp_as(
    netns: &str,
    source: Ipv4Addr,
    to: std::net::SocketAddrV4,
    count: usize,
) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let netns = Netns::open(netns).map_err(std::io::Error::other)?;
    // IPPROTO_RAW: the kernel takes our header (filling in the checksum and total length).
    let socket = netns
        .run(|| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255))))
        .map_err(std::io::Error::other)??;
    let payload = b"spoof?";
    let udp_len = 8 + payload.len();
    let mut packet = vec![0u8; 20 + udp_len];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    packet[6] = 0x40; // don't fragment
    packet[8] = 64;
    packet[9] = 17;
    packet[12..16].copy_from_slice(&source.octets());
    packet[16..20].copy_from_slice(&to.ip().octets());
    packet[20..22].copy_from_slice(&4242u16.to_be_bytes());
    packet[22..24].copy_from_slice(&to.port().to_be_bytes());
    packet[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
    packet[28..].copy_from_slice(payload);
    let destination = SocketAddr::new((*to.ip()).into(), 0);
    for _ in 0..count {
        socket.send_to(&packet, &destination.into())?;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
