//! Shared rig for the gateway's namespace tests: nodes in their own network namespaces joined
//! by a veth "underlay" in 198.18.0.0/15, a pod address on each node's loopback, and a real
//! gateway per node. Everything lives in namespaces the test creates and drops.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use trellis_core::gateway::{GatewayState, RemoteNode};
use trellis_gateway::{Gateway, GatewayConfig};
use trellis_netns::{Netlink, VethSpec};
use trellis_test_support::{TempNetns, eventually_async};

pub struct Node {
    pub name: String,
    pub ns: TempNetns,
    pub netlink: Netlink,
    pub underlay: IpAddr,
    pub pod: IpAddr,
    pub pod_cidr: IpNet,
    /// Every pod CIDR of the node (the IPv4 one, plus IPv6 once enabled).
    pub pod_cidrs: Vec<IpNet>,
    pub pod6: Option<IpAddr>,
    pub state_dir: tempfile::TempDir,
    pub gateway: Option<Gateway>,
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

impl Node {
    /// A TCP connection from the node's pod address (made inside its namespace, then used from
    /// the test's runtime).
    pub fn connect_from_pod(
        &self,
        to: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        let source = SocketAddr::new(self.pod, 0);
        let stream = self.ns.run(move || {
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.bind(&source.into())?;
            socket.connect_timeout(&to.into(), timeout)?;
            socket.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(std::net::TcpStream::from(socket))
        });
        TcpStream::from_std(stream.expect("enter the node's namespace")?)
    }

    /// A TCP listener bound inside the node's namespace (the socket is made there, then used
    /// from the test's runtime).
    pub fn listen(&self, at: SocketAddr) -> TcpListener {
        let listener = self
            .ns
            .run(move || {
                let listener = std::net::TcpListener::bind(at)?;
                listener.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(listener)
            })
            .unwrap()
            .unwrap();
        TcpListener::from_std(listener).unwrap()
    }

    pub fn config(&self) -> GatewayConfig {
        GatewayConfig {
            state_dir: self.state_dir.path().to_path_buf(),
            ..GatewayConfig::default()
        }
    }

    pub async fn start(&mut self) {
        let config = self.config();
        self.start_with(&config).await;
    }

    /// Starts a gateway with `config`. A port still held by a gateway stopped a moment ago
    /// (its worker threads close their sockets after the TUN goes) is retried, for 5 s.
    pub async fn start_with(&mut self, config: &GatewayConfig) {
        let gateway = eventually_async("the gateway starts", Duration::from_secs(5), || async {
            match Gateway::start(Some(&self.ns), config).await {
                Ok(gateway) => Some(gateway),
                Err(trellis_gateway::Error::BindUdp { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    None
                }
                Err(e) => panic!("start gateway: {e}"),
            }
        })
        .await;
        self.gateway = Some(gateway);
    }

    /// The value of one series of the in-process gateway's metrics (`name{labels}`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.gateway().metrics.render(), series)
    }

    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("gateway running")
    }

    /// Stops the gateway and waits for its TUN to be gone.
    pub async fn stop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.stop();
        }
        eventually_async(
            "the TUN gone after stop",
            Duration::from_secs(5),
            || async {
                self.netlink
                    .link("trellis0")
                    .await
                    .unwrap()
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    }

    /// This node as a remote node in another gateway's desired state.
    pub fn as_remote(&self, cluster: &str, encrypted: bool) -> RemoteNode {
        RemoteNode {
            name: self.name.clone(),
            cluster: cluster.into(),
            public_key: self.gateway().public_key,
            endpoint: Some(SocketAddr::new(self.underlay, 51820)),
            node_ip: Some(self.underlay),
            pod_cidrs: self.pod_cidrs.clone(),
            encrypted,
            persistent_keepalive: None,
        }
    }

    pub async fn apply(&self, cluster: &str, revision: u64, nodes: Vec<RemoteNode>) {
        let state = GatewayState {
            revision,
            cluster: cluster.into(),
            nodes,
        };
        self.gateway()
            .reconciler
            .apply(&state)
            .await
            .expect("apply desired state");
    }

    /// Gives the node an IPv6 pod CIDR `fd0<n>::/64` and pod address `fd0<n>::1`.
    pub async fn enable_ipv6(&mut self, n: u8) {
        let lo = self.netlink.require_link("lo").await.unwrap();
        let pod6: IpAddr = format!("fd0{n}::1").parse().unwrap();
        self.netlink
            .add_address(lo.index, IpNet::new(pod6, 128).unwrap())
            .await
            .unwrap();
        self.pod6 = Some(pod6);
        self.pod_cidrs.push(net(&format!("fd0{n}::/64")));
    }

    /// A UDP socket bound to this node's pod address.
    pub async fn pod_socket(&self, port: u16) -> UdpSocket {
        self.socket_at(SocketAddr::new(self.pod, port)).await
    }

    /// A UDP socket bound to `addr` in this node's namespace.
    pub async fn socket_at(&self, addr: SocketAddr) -> UdpSocket {
        let socket = self
            .ns
            .run(move || {
                let socket = std::net::UdpSocket::bind(addr)?;
                socket.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(socket)
            })
            .unwrap()
            .unwrap();
        UdpSocket::from_std(socket).unwrap()
    }

    /// A pod "echo" service on `port`, answering every datagram.
    pub async fn echo(&self, port: u16) -> tokio::task::JoinHandle<()> {
        self.echo_at(SocketAddr::new(self.pod, port)).await
    }

    /// An echo service on `addr`.
    pub async fn echo_at(&self, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
        let socket = self.socket_at(addr).await;
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..len], from).await;
            }
        })
    }

    /// Whether a datagram from this node's pod to `to` comes back within `deadline`
    /// (resending every 200 ms, as the first packets may wait for a handshake).
    pub async fn ping(&self, to: SocketAddr, deadline: Duration) -> bool {
        self.ping_from(self.pod, to, deadline).await
    }

    /// Like [`Node::ping`], from source address `from`.
    pub async fn ping_from(&self, from: IpAddr, to: SocketAddr, deadline: Duration) -> bool {
        self.ping_every(from, to, deadline, Duration::from_millis(200))
            .await
    }

    /// Like [`Node::ping_from`], resending every `resend`.
    pub async fn ping_every(
        &self,
        from: IpAddr,
        to: SocketAddr,
        deadline: Duration,
        resend: Duration,
    ) -> bool {
        let socket = self.socket_at(SocketAddr::new(from, 0)).await;
        let marker = format!("trellis-ping-{}", rand_tag());
        let attempt = async {
            let mut buf = [0u8; 2048];
            loop {
                let _ = socket.send_to(marker.as_bytes(), to).await;
                if let Ok(Ok((len, _))) =
                    tokio::time::timeout(resend, socket.recv_from(&mut buf)).await
                    && &buf[..len] == marker.as_bytes()
                {
                    return;
                }
            }
        };
        tokio::time::timeout(deadline, attempt).await.is_ok()
    }
}

/// The value of `series` (`name{labels}`, exactly as rendered) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

fn rand_tag() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Two nodes, `a` (198.18.0.1, pods 10.1.0.0/24) and `b` (198.18.0.2, pods 10.2.0.0/24),
/// joined by a veth pair, gateways running but not configured.
pub async fn two_nodes(prefix: &str) -> (Node, Node) {
    let (mut a, mut b) = two_bare_nodes(prefix).await;
    a.start().await;
    b.start().await;
    (a, b)
}

/// Like [`two_nodes`], without gateways.
pub async fn two_bare_nodes(prefix: &str) -> (Node, Node) {
    let ns_a = TempNetns::new(&format!("{prefix}-a")).unwrap();
    let ns_b = TempNetns::new(&format!("{prefix}-b")).unwrap();
    let nl_a = Netlink::connect_in(&ns_a).unwrap();
    let nl_b = Netlink::connect_in(&ns_b).unwrap();
    nl_a.add_veth(&VethSpec {
        name: "underlay",
        peer_name: "underlay",
        peer_netns: Some(&ns_b),
        mtu: None,
    })
    .await
    .unwrap();
    let mut nodes = Vec::new();
    for (i, (ns, nl)) in [(ns_a, nl_a), (ns_b, nl_b)].into_iter().enumerate() {
        let n = i + 1;
        let lo = nl.require_link("lo").await.unwrap();
        nl.set_up(lo.index).await.unwrap();
        let pod = net(&format!("10.{n}.0.1/32"));
        nl.add_address(lo.index, pod).await.unwrap();
        let underlay = nl.require_link("underlay").await.unwrap();
        nl.add_address(underlay.index, net(&format!("198.18.0.{n}/24")))
            .await
            .unwrap();
        nl.set_up(underlay.index).await.unwrap();
        let node = Node {
            name: format!("c1/node-{}", ["a", "b"][i]),
            ns,
            netlink: nl,
            underlay: format!("198.18.0.{n}").parse().unwrap(),
            pod: pod.addr(),
            pod_cidr: net(&format!("10.{n}.0.0/24")),
            pod_cidrs: vec![net(&format!("10.{n}.0.0/24"))],
            pod6: None,
            state_dir: tempfile::tempdir().unwrap(),
            gateway: None,
        };
        nodes.push(node);
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    (a, b)
}

/// Runs `tcpdump` on `interface` in `node`'s namespace until dropped (killed by its PID).
pub struct Capture {
    child: std::process::Child,
    pub file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    /// Starts tcpdump through `ip netns exec` (which also gives it the namespace's /sys) and
    /// waits until it reports it is listening.
    pub async fn start(node: &Node, interface: &str) -> Capture {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("underlay.pcap");
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", node.ns.name(), "tcpdump"])
            .args([
                "-i",
                interface,
                "--immediate-mode",
                "-U",
                "-n",
                "-Z",
                "root",
            ])
            .args(["-s", "200"])
            .args(["-c", "100000", "-w"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tcpdump");
        let stderr = child.stderr.take().unwrap();
        let (listening, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening on") {
                    let _ = listening.send(());
                }
            }
        });
        let ready = tokio::task::spawn_blocking(move || ready.recv_timeout(Duration::from_secs(5)))
            .await
            .unwrap();
        assert!(ready.is_ok(), "tcpdump did not start listening");
        Capture {
            child,
            file,
            _dir: dir,
        }
    }

    /// Stops the capture and returns the raw pcap bytes.
    /// (SIGTERM, so tcpdump flushes; SIGKILL if it lingers.)
    pub async fn finish(mut self) -> Vec<u8> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The byte at offset `at` of a checked stream (not periodic over any length a segment has).
pub fn pattern(at: usize) -> u8 {
    (at.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Streams `bytes` of TCP from a's pod to an echo server on b's pod (port 9000) and reads them
/// back, checking every byte.
pub async fn bulk_echo(a: &Node, b: &Node, bytes: usize) {
    let server = SocketAddr::new(b.pod, 9000);
    let listener = b.listen(server);
    let echo = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut read, mut write) = stream.into_split();
        tokio::io::copy(&mut read, &mut write).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let stream = a
        .connect_from_pod(server, Duration::from_secs(10))
        .expect("connect through the tunnel");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut chunk = vec![0u8; 256 << 10];
        let mut at = 0;
        while at < bytes {
            let len = chunk.len().min(bytes - at);
            for (i, byte) in chunk[..len].iter_mut().enumerate() {
                *byte = pattern(at + i);
            }
            write.write_all(&chunk[..len]).await.unwrap();
            at += len;
        }
        write.shutdown().await.unwrap();
    });
    let reader = async {
        let mut buf = vec![0u8; 256 << 10];
        let mut at = 0;
        loop {
            let len = read.read(&mut buf).await.unwrap();
            if len == 0 {
                break;
            }
            for (i, byte) in buf[..len].iter().enumerate() {
                assert_eq!(*byte, pattern(at + i), "byte {} differs", at + i);
            }
            at += len;
        }
        at
    };
    let received = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("bulk transfer timed out");
    assert_eq!(received, bytes);
    writer.await.unwrap();
    echo.await.unwrap();
}
