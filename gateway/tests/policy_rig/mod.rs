//! A node namespace with pods in namespaces of their own, each wired by a veth named like the
//! CNI plugin's (`trl<i>` on the node, `eth0` in the pod) with 10.70.<i>.2/24 and
//! fd70:<i>::2/64, the node's end .1 and ::1 (the pod's default gateway), forwarding on.
//! Everything lives in namespaces the rig creates and removes.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use trellis_netns::Netns;
use trellis_test_support::TempNetns;

pub struct Pod {
    pub index: u8,
    pub ns: TempNetns,
}

pub struct Rig {
    pub node: TempNetns,
    pub pods: Vec<Pod>,
}

/// Runs `ip` (in namespace `ns` when given); panics with its error output on failure.
pub fn ip(ns: Option<&str>, args: &[&str]) {
    let mut command = Command::new("ip");
    if let Some(ns) = ns {
        command.args(["-n", ns]);
    }
    let output = command.args(args).output().unwrap();
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn sysctl(ns: &str, key: &str, value: &str) {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{key}: {output:?}");
}

impl Rig {
    pub fn new(prefix: &str, pods: u8) -> Self {
        let node = TempNetns::new(prefix).unwrap();
        let n = node.name().to_string();
        ip(Some(&n), &["link", "set", "lo", "up"]);
        sysctl(&n, "net.ipv4.ip_forward", "1");
        sysctl(&n, "net.ipv6.conf.all.forwarding", "1");
        // No duplicate address detection: link-local addresses usable at once, so neighbour
        // discovery answers without a second's wait.
        sysctl(&n, "net.ipv6.conf.default.accept_dad", "0");
        let pods = (0..pods)
            .map(|index| {
                let ns = TempNetns::new(&format!("{prefix}-p")).unwrap();
                let p = ns.name().to_string();
                sysctl(&p, "net.ipv6.conf.default.accept_dad", "0");
                let host = format!("trl{index}");
                ip(
                    Some(&n),
                    &[
                        "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &p,
                    ],
                );
                ip(
                    Some(&n),
                    &["addr", "add", &format!("10.70.{index}.1/24"), "dev", &host],
                );
                ip(
                    Some(&n),
                    &[
                        "addr",
                        "add",
                        &format!("fd70:{index}::1/64"),
                        "dev",
                        &host,
                        "nodad",
                    ],
                );
                ip(Some(&n), &["link", "set", &host, "up"]);
                ip(Some(&p), &["link", "set", "lo", "up"]);
                ip(
                    Some(&p),
                    &["addr", "add", &format!("10.70.{index}.2/24"), "dev", "eth0"],
                );
                ip(
                    Some(&p),
                    &[
                        "addr",
                        "add",
                        &format!("fd70:{index}::2/64"),
                        "dev",
                        "eth0",
                        "nodad",
                    ],
                );
                ip(Some(&p), &["link", "set", "eth0", "up"]);
                ip(
                    Some(&p),
                    &[
                        "route",
                        "add",
                        "default",
                        "via",
                        &format!("10.70.{index}.1"),
                    ],
                );
                ip(
                    Some(&p),
                    &[
                        "-6",
                        "route",
                        "add",
                        "default",
                        "via",
                        &format!("fd70:{index}::1"),
                    ],
                );
                Pod { index, ns }
            })
            .collect();
        Self { node, pods }
    }

    /// A TCP connection from the node itself (what a kubelet probe is).
    pub fn node_tcp_connects(&self, to: IpAddr, port: u16) -> bool {
        connects(&self.node, None, SocketAddr::new(to, port))
    }

    pub fn nft_list(&self) -> String {
        trellis_gateway::nft::run(
            Some(&self.node),
            &["list", "table", "inet", trellis_core::policy::nft::TABLE],
            None,
        )
        .unwrap()
    }
}

fn connects(ns: &Netns, from: Option<IpAddr>, to: SocketAddr) -> bool {
    ns.run(|| {
        let domain = if to.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let socket =
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
                .unwrap();
        if let Some(from) = from {
            socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
        }
        socket
            .connect_timeout(&to.into(), Duration::from_millis(700))
            .is_ok()
    })
    .unwrap()
}

impl Pod {
    pub fn v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 70, self.index, 2))
    }

    pub fn v6(&self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0xfd70,
            u16::from(self.index),
            0,
            0,
            0,
            0,
            0,
            2,
        ))
    }

    /// The node's end of this pod's veth (an address of the node).
    pub fn gateway_v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 70, self.index, 1))
    }

    pub fn ns_path(&self) -> PathBuf {
        self.ns.path().to_path_buf()
    }

    /// A listening TCP socket in the pod (the kernel completes handshakes without accept).
    pub fn tcp_listener(&self, at: IpAddr, port: u16) -> std::net::TcpListener {
        self.ns
            .run(|| std::net::TcpListener::bind(SocketAddr::new(at, port)))
            .unwrap()
            .unwrap()
    }

    pub fn tcp_connects(&self, to: IpAddr, port: u16) -> bool {
        let from = if to.is_ipv4() { self.v4() } else { self.v6() };
        connects(&self.ns, Some(from), SocketAddr::new(to, port))
    }

    pub fn udp_socket(&self, at: IpAddr, port: u16) -> UdpSocket {
        let socket = self
            .ns
            .run(|| UdpSocket::bind(SocketAddr::new(at, port)))
            .unwrap()
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        socket
    }

    /// Whether a datagram from this pod reaches `to`'s socket at `address:port`.
    pub fn udp_reaches(&self, to: &Pod, address: IpAddr, port: u16) -> bool {
        let receiver = to.udp_socket(address, port);
        send_udp_from(self.ns.path(), address, port);
        let mut buffer = [0u8; 64];
        receiver.recv_from(&mut buffer).is_ok()
    }

    /// Whether a datagram from this pod reaches a socket of the node at `address:port`.
    pub fn udp_reaches_node(&self, rig: &Rig, address: IpAddr, port: u16) -> bool {
        let receiver = rig
            .node
            .run(|| UdpSocket::bind(SocketAddr::new(address, port)))
            .unwrap()
            .unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        send_udp_from(self.ns.path(), address, port);
        let mut buffer = [0u8; 64];
        receiver.recv_from(&mut buffer).is_ok()
    }
}

/// One datagram from a fresh socket inside the namespace at `ns` (a new flow each time).
pub fn send_udp_from(ns: &Path, to: IpAddr, port: u16) {
    let ns = Netns::open_path(ns).unwrap();
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = ns.run(|| UdpSocket::bind(bind)).unwrap().unwrap();
    let _ = socket.send_to(b"probe", SocketAddr::new(to, port));
}

/// How many datagrams are waiting on `socket` (read until it has been quiet a while).
pub fn drain(socket: &UdpSocket) -> u64 {
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut count = 0;
    let mut buffer = [0u8; 64];
    while socket.recv_from(&mut buffer).is_ok() {
        count += 1;
    }
    count
}
