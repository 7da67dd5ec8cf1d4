//! Shared rig for the gateway's namespace tests: nodes in their own network namespaces joined
//! by a veth "underlay" in 198.18.0.0/15, a pod address on each node's loopback, and a real
//! gateway per node, and a packet capture of the underlay. Everything lives in namespaces the
//! test creates and drops.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// What a frame on the underlay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// An IPv4 packet to or from a pod address, in the clear; `from_a` when it comes from a's
    /// pods (or goes to b's).
    Plain {
        from_a: bool,
    },
    /// UDP to or from a gateway's WireGuard port.
    Tunnel,
    Other,
}

#[derive(Debug, Clone)]
pub struct Captured {
    /// The kernel's timestamp (wall clock, since the epoch).
    pub at: Duration,
    pub frame: Frame,
    /// The frame's first bytes (Ethernet and IP headers and the start of the payload).
    pub head: Vec<u8>,
}

/// A packet socket in a node's namespace recording every frame of its underlay interface,
/// both directions, with the kernel's timestamps, on a thread of its own (no external tool).
pub struct UnderlayCapture {
    stop: Arc<AtomicBool>,
    frames: Arc<std::sync::Mutex<Vec<Captured>>>,
    thread: std::thread::JoinHandle<()>,
    /// The interface's packet counters when the capture started.
    counted_before: u64,
}

/// What a capture recorded, and how many frames the interface counted meanwhile.
pub struct Capture {
    pub frames: Vec<Captured>,
    pub counted: u64,
}

impl Capture {
    /// Panics unless the capture holds at least every frame the interface counted: a capture
    /// that missed frames cannot prove that something was absent.
    pub fn assert_complete(&self) {
        assert!(
            self.frames.len() as u64 >= self.counted,
            "the capture missed frames ({} captured, {} counted by the interface)",
            self.frames.len(),
            self.counted
        );
    }

    pub fn count(&self, frame: Frame) -> usize {
        self.frames.iter().filter(|f| f.frame == frame).count()
    }

    pub fn plaintext(&self) -> usize {
        self.frames
            .iter()
            .filter(|f| matches!(f.frame, Frame::Plain { .. }))
            .count()
    }
}

/// Tells plaintext pod traffic from WireGuard on the underlay between nodes `a` and `b`.
pub struct Classifier {
    pub a_pods: IpNet,
    pub b_pods: IpNet,
    pub wireguard_port: u16,
}

impl Classifier {
    fn classify(&self, frame: &[u8]) -> Frame {
        // Ethernet, then IPv4.
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            return Frame::Other;
        }
        let ip = &frame[14..];
        let header = usize::from(ip[0] & 0x0f) * 4;
        let address = |at: usize| IpAddr::from([ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]);
        let (source, destination) = (address(12), address(16));
        let pod = |addr: &IpAddr| self.a_pods.contains(addr) || self.b_pods.contains(addr);
        if pod(&source) || pod(&destination) {
            let from_a = self.a_pods.contains(&source) || self.b_pods.contains(&destination);
            return Frame::Plain { from_a };
        }
        if ip[9] == 17 && ip.len() >= header + 4 {
            let port = |at: usize| u16::from_be_bytes([ip[header + at], ip[header + at + 1]]);
            if port(0) == self.wireguard_port || port(2) == self.wireguard_port {
                return Frame::Tunnel;
            }
        }
        Frame::Other
    }
}

impl Classifier {
    /// Pod traffic between `a` and `b`, WireGuard on the gateways' port 51820.
    pub fn between(a: &Node, b: &Node) -> Self {
        Self {
            a_pods: a.pod_cidr,
            b_pods: b.pod_cidr,
            wireguard_port: 51820,
        }
    }
}

impl UnderlayCapture {
    /// Starts recording `node`'s interface "underlay".
    pub async fn start(node: &Node, classifier: Classifier) -> Self {
        let ifindex = node.netlink.require_link("underlay").await.unwrap().index;
        use nix::sys::socket::{self, AddressFamily, SockFlag, SockProtocol, SockType, sockopt};
        let fd = node
            .ns
            .run(|| -> nix::Result<OwnedFd> {
                let fd = socket::socket(
                    AddressFamily::Packet,
                    SockType::Raw,
                    SockFlag::SOCK_CLOEXEC,
                    SockProtocol::EthAll,
                )?;
                socket::setsockopt(&fd, sockopt::RcvBufForce, &(64 << 20))?;
                socket::setsockopt(&fd, sockopt::ReceiveTimestampns, &true)?;
                socket::setsockopt(
                    &fd,
                    sockopt::ReceiveTimeout,
                    &nix::sys::time::TimeVal::new(0, 50_000),
                )?;
                Ok(fd)
            })
            .unwrap()
            .expect("a packet socket in the node's namespace");
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::default();
        let thread = {
            let (stop, frames) = (stop.clone(), Arc::clone(&frames));
            std::thread::spawn(move || read_frames(&fd, ifindex, &classifier, &stop, &frames))
        };
        let counted_before = interface_packets(node, "underlay");
        Self {
            stop,
            frames,
            thread,
            counted_before,
        }
    }

    /// Waits until a frame satisfying `want` has been recorded.
    pub async fn wait_for(&self, what: &str, want: impl Fn(&Captured) -> bool) {
        eventually_async(what, Duration::from_secs(5), || async {
            self.frames.lock().unwrap().iter().any(&want).then_some(())
        })
        .await;
    }

    /// Stops after the frames already queued, and returns them all.
    pub fn finish(self, node: &Node) -> Capture {
        let counted = interface_packets(node, "underlay") - self.counted_before;
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        let frames = std::mem::take(&mut *self.frames.lock().unwrap());
        Capture { frames, counted }
    }
}

fn read_frames(
    fd: &OwnedFd,
    ifindex: u32,
    classifier: &Classifier,
    stop: &AtomicBool,
    frames: &std::sync::Mutex<Vec<Captured>>,
) {
    use nix::errno::Errno;
    use nix::sys::socket::{ControlMessageOwned, LinkAddr, MsgFlags, recvmsg};
    let mut buffer = [0u8; 128];
    let mut control = nix::cmsg_space!(nix::sys::time::TimeSpec);
    loop {
        // Once told to stop, read what is queued without waiting, then end.
        let stopping = stop.load(Ordering::SeqCst);
        let flags = if stopping {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
        let (len, interface, at) =
            match recvmsg::<LinkAddr>(fd.as_raw_fd(), &mut iov, Some(&mut control), flags) {
                Ok(message) => {
                    let at = message.cmsgs().ok().and_then(|mut cmsgs| {
                        cmsgs.find_map(|cmsg| match cmsg {
                            ControlMessageOwned::ScmTimestampns(ts) => Some(Duration::new(
                                ts.tv_sec().try_into().unwrap(),
                                ts.tv_nsec().try_into().unwrap(),
                            )),
                            _ => None,
                        })
                    });
                    (
                        message.bytes,
                        message.address.map(|address| address.ifindex()),
                        at,
                    )
                }
                Err(Errno::EAGAIN | Errno::EINTR) if !stopping => continue,
                Err(Errno::EAGAIN) => return,
                Err(e) => panic!("reading the capture: {e}"),
            };
        if interface != Some(ifindex as usize) {
            continue;
        }
        let head = &buffer[..len.min(buffer.len())];
        frames.lock().unwrap().push(Captured {
            at: at.expect("a kernel timestamp on every frame"),
            frame: classifier.classify(head),
            head: head.to_vec(),
        });
    }
}

/// Packets through a node's interface as its counters have them (rx + tx), from
/// `/proc/net/dev` of the node's namespace.
fn interface_packets(node: &Node, interface: &str) -> u64 {
    let text = node
        .ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .unwrap()
        .unwrap();
    let line = text
        .lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{interface}:")))
        .expect("the interface in /proc/net/dev");
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    fields[1] + fields[9]
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
