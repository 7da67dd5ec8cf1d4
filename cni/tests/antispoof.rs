//! The node agent's anti-spoofing rules (`trellis_gateway::antispoof`) against pods this
//! plugin wires, IPv4 and IPv6: a pod that writes another pod's address as its source with a
//! raw socket reaches nobody; with its own address it does.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use socket2::{Domain, Protocol, Socket, Type};
use trellis_netns::Netns;

fn checksum(words: &[u8]) -> u32 {
    words
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP datagram to `to` with the source address `from`, IP header included, checksums right.
fn datagram(from: IpAddr, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut udp = vec![0u8; udp_len];
    udp[0..2].copy_from_slice(&4242u16.to_be_bytes());
    udp[2..4].copy_from_slice(&to.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    udp[8..].copy_from_slice(payload);
    match (from, to.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
            let sum = fold(checksum(&pseudo) + checksum(&udp));
            udp[6..8].copy_from_slice(&sum.to_be_bytes());
            let mut packet = vec![0u8; 20];
            packet[0] = 0x45;
            packet[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            packet[8] = 64;
            packet[9] = 17;
            packet[12..16].copy_from_slice(&src.octets());
            packet[16..20].copy_from_slice(&dst.octets());
            packet.extend_from_slice(&udp);
            packet
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
            let sum = fold(checksum(&pseudo) + checksum(&udp));
            udp[6..8].copy_from_slice(&sum.to_be_bytes());
            let mut packet = vec![0u8; 40];
            packet[0] = 0x60;
            packet[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            packet[6] = 17;
            packet[7] = 64;
            packet[8..24].copy_from_slice(&src.octets());
            packet[24..40].copy_from_slice(&dst.octets());
            packet.extend_from_slice(&udp);
            packet
        }
        _ => panic!("one family"),
    }
}

/// Writes `count` datagrams from inside `netns` through a raw socket (IP header included).
fn send_raw(netns: &Netns, from: IpAddr, to: SocketAddr, count: usize) {
    let domain = if to.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = netns
        .run(|| Socket::new(domain, Type::RAW, Some(Protocol::from(255))))
        .unwrap()
        .unwrap();
    let packet = datagram(from, to, b"who am i");
    let destination = SocketAddr::new(to.ip(), 0);
    for _ in 0..count {
        socket.send_to(&packet, &destination.into()).unwrap();
    }
}

/// The sources of what `socket` receives until it has been quiet for half a second.
fn receive_all(socket: &UdpSocket) -> Vec<IpAddr> {
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut sources = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok((_, from)) = socket.recv_from(&mut buf) {
        sources.push(from.ip());
    }
    sources
}

#[test]
fn a_pod_reaches_others_with_its_own_address_only_ipv4_and_ipv6() {
    trellis_test_support::skip_unless_root!();
    let node = Node::new("cni-spoof");
    let list = node.conflist(&["10.244.7.0/24", "fd00:10:244:7::/64"]);
    let mut pods: Vec<Pod> = ["pod-a", "pod-b", "pod-c"]
        .iter()
        .map(|id| node.new_pod(id))
        .collect();
    let mut addresses = Vec::new();
    for pod in &mut pods {
        let result = node.add(&list, pod).unwrap();
        let v4: IpAddr = pod_ip(&result, 0).parse().unwrap();
        let v6: IpAddr = pod_ip(&result, 1).parse().unwrap();
        addresses.push((v4, v6));
    }
    let node_netns = Netns::open(node.netns.name()).unwrap();
    trellis_gateway::antispoof::install(Some(&node_netns), trellis_core::POD_VETH_PREFIX).unwrap();
    let a = &pods[0];
    let (own, b, c) = (addresses[0], addresses[1], addresses[2]);
    let strangers: (IpAddr, IpAddr) = ("10.9.9.9".parse().unwrap(), "fd00:99::9".parse().unwrap());
    for (family, own, neighbour, stranger, target) in [
        ("IPv4", own.0, b.0, strangers.0, c.0),
        ("IPv6", own.1, b.1, strangers.1, c.1),
    ] {
        let target = SocketAddr::new(target, 9999);
        let listener = pods[2]
            .netns
            .run(|| UdpSocket::bind(SocketAddr::new(target.ip(), 9999)))
            .unwrap()
            .unwrap();
        // IPv6 neighbour discovery may need a moment: a first datagram of its own.
        send_raw(&a.netns, own, target, 1);
        std::thread::sleep(Duration::from_millis(200));
        let _ = receive_all(&listener);
        send_raw(&a.netns, neighbour, target, 10);
        send_raw(&a.netns, stranger, target, 10);
        send_raw(&a.netns, own, target, 10);
        let sources = receive_all(&listener);
        assert_eq!(
            sources.iter().filter(|s| **s == own).count(),
            10,
            "{family}: the pod's own datagrams arrive: {sources:?}"
        );
        assert!(
            sources.iter().all(|s| *s == own),
            "{family}: a spoofed datagram arrived: {sources:?}"
        );
    }
    let (v4, v6) = trellis_gateway::antispoof::dropped(Some(&node_netns)).unwrap();
    assert_eq!((v4, v6), (20, 20), "every spoofed datagram counted");
}
