//! The device loop against in-memory TUNs and an in-memory UDP "network".

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use tokio::sync::Notify;
use trellis_core::gateway::TunnelPeer;
use trellis_core::wgkey::PublicKey;

use super::*;
use crate::io::TUN_HEADROOM;
use crate::metrics::{DropReason, Initiation};

/// WireGuard's timers under boringtun's mock clock (only with the `mock-time` feature).
#[cfg(feature = "mock-time")]
#[path = "device/timers_tests.rs"]
mod timers;

/// A queue of packets with a readiness signal.
struct Queue<T> {
    items: Mutex<VecDeque<T>>,
    ready: Notify,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
        }
    }
}

impl<T> Queue<T> {
    fn push(&self, item: T) {
        self.items.lock().unwrap().push_back(item);
        self.ready.notify_one();
    }
    fn pop(&self) -> Option<T> {
        self.items.lock().unwrap().pop_front()
    }
    async fn readable(&self) {
        loop {
            if !self.items.lock().unwrap().is_empty() {
                return;
            }
            self.ready.notified().await;
        }
    }
}

#[derive(Clone, Default)]
pub(crate) struct FakeTun {
    /// What the kernel would send into the tunnel.
    inbound: Arc<Queue<Vec<u8>>>,
    /// What the device delivered to the kernel.
    delivered: Arc<Queue<Vec<u8>>>,
}

impl Tun for FakeTun {
    async fn readable(&self) -> io::Result<()> {
        self.inbound.readable().await;
        Ok(())
    }
    fn try_recv_packets(&mut self, bufs: &mut [Vec<u8>], sizes: &mut [usize]) -> io::Result<usize> {
        let packet = self.inbound.pop().ok_or(io::ErrorKind::WouldBlock)?;
        // Like read(2) on a TUN: a packet longer than the buffer is cut short.
        let len = packet.len().min(bufs[0].len());
        bufs[0][..len].copy_from_slice(&packet[..len]);
        sizes[0] = len;
        Ok(1)
    }
    async fn send_packets(&mut self, bufs: &mut [Vec<u8>]) -> io::Result<()> {
        for buf in bufs {
            self.delivered.push(buf[TUN_HEADROOM..].to_vec());
        }
        Ok(())
    }
}

/// Datagrams waiting at a socket, with their sources.
type Inbox = Queue<(Vec<u8>, SocketAddr)>;
/// A datagram the network carried: from, to, bytes.
type Carried = (SocketAddr, SocketAddr, Vec<u8>);

/// An in-memory network of UDP sockets; it also records every datagram it carried.
#[derive(Clone, Default)]
pub(crate) struct FakeNet {
    sockets: Arc<Mutex<HashMap<SocketAddr, Arc<Inbox>>>>,
    wire: Arc<Mutex<Vec<Carried>>>,
    /// Datagrams sent from these addresses are recorded but lost.
    muted: Arc<Mutex<Vec<SocketAddr>>>,
}

pub(crate) struct FakeUdp {
    net: FakeNet,
    /// Behave like a socket with UDP GSO and GRO: many datagrams per send and receive.
    offload: bool,
    /// Shared with the test, which may move the socket (a roaming peer).
    addr: Arc<Mutex<SocketAddr>>,
    queue: Arc<Inbox>,
}

impl FakeNet {
    fn bind(&self, addr: &str) -> FakeUdp {
        let addr: SocketAddr = addr.parse().unwrap();
        let queue = Arc::new(Queue::default());
        self.sockets.lock().unwrap().insert(addr, queue.clone());
        FakeUdp {
            net: self.clone(),
            offload: false,
            addr: Arc::new(Mutex::new(addr)),
            queue,
        }
    }
    /// Moves the socket at `old` to `new`: what a NAT rebinding or a new network does.
    fn rebind(&self, socket: &Arc<Mutex<SocketAddr>>, new: &str) -> SocketAddr {
        let new: SocketAddr = new.parse().unwrap();
        let mut addr = socket.lock().unwrap();
        let mut sockets = self.sockets.lock().unwrap();
        let queue = sockets.remove(&*addr).unwrap();
        sockets.insert(new, queue);
        *addr = new;
        new
    }
    /// Loses (or, with `false`, carries again) whatever `addr` sends.
    fn mute(&self, addr: SocketAddr, muted: bool) {
        let mut list = self.muted.lock().unwrap();
        list.retain(|a| *a != addr);
        if muted {
            list.push(addr);
        }
    }
    fn inject(&self, to: SocketAddr, from: SocketAddr, datagram: Vec<u8>) {
        if let Some(queue) = self.sockets.lock().unwrap().get(&to) {
            queue.push((datagram, from));
        }
    }
}

impl Udp for FakeUdp {
    async fn readable(&self) -> io::Result<()> {
        self.queue.readable().await;
        Ok(())
    }
    fn try_recv_gro(&mut self, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
        let mut items = self.queue.items.lock().unwrap();
        let (datagram, from) = items.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let segment = datagram.len().min(buf.len());
        buf[..segment].copy_from_slice(&datagram[..segment]);
        let mut len = segment;
        // As the kernel's GRO does: more datagrams of the same size from the same source
        // (the last may be shorter), up to 64.
        let mut count = 1;
        while self.offload && segment > 0 && count < 64 && len % segment == 0 {
            let Some((next, next_from)) = items.front() else {
                break;
            };
            if *next_from != from || next.is_empty() || next.len() > segment {
                break;
            }
            if len + next.len() > buf.len() {
                break;
            }
            buf[len..len + next.len()].copy_from_slice(next);
            len += next.len();
            count += 1;
            items.pop_front();
        }
        Ok((len, segment, from))
    }
    async fn send_segments(
        &self,
        datagrams: &[std::io::IoSlice<'_>],
        segment: usize,
        to: SocketAddr,
    ) -> io::Result<()> {
        for (i, datagram) in datagrams.iter().enumerate() {
            assert!(
                datagram.len() == segment || (i + 1 == datagrams.len() && datagram.len() < segment),
                "GSO: every datagram but the last is one segment"
            );
            self.send_to(datagram, to).await?;
        }
        Ok(())
    }
    fn max_segments(&self) -> usize {
        if self.offload { 64 } else { 1 }
    }
    async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
        let from = *self.addr.lock().unwrap();
        self.net
            .wire
            .lock()
            .unwrap()
            .push((from, to, datagram.to_vec()));
        if !self.net.muted.lock().unwrap().contains(&from) {
            self.net.inject(to, from, datagram.to_vec());
        }
        Ok(datagram.len())
    }
}

/// A minimal IPv4 packet: 20-byte header and a payload.
pub(crate) fn ipv4(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0u8; 20];
    packet[0] = 0x45;
    let total = (20 + payload.len()) as u16;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[8] = 64;
    packet[9] = 17;
    packet[12..16].copy_from_slice(&src.parse::<Ipv4Addr>().unwrap().octets());
    packet[16..20].copy_from_slice(&dst.parse::<Ipv4Addr>().unwrap().octets());
    packet.extend_from_slice(payload);
    packet
}

pub(crate) struct Node {
    pub(crate) keys: KeyPair,
    pub(crate) addr: SocketAddr,
    pub(crate) tun: FakeTun,
    pub(crate) handle: DeviceHandle,
    pub(crate) metrics: Metrics,
    pub(crate) socket: Arc<Mutex<SocketAddr>>,
}

pub(crate) fn start(net: &FakeNet, addr: &str) -> Node {
    start_with(net, addr, false)
}

/// A node whose socket batches like UDP GSO and GRO when `offload`.
pub(crate) fn start_with(net: &FakeNet, addr: &str, offload: bool) -> Node {
    start_keyed(net, addr, offload, KeyPair::generate())
}

/// A node with a given key: also a node's gateway started again (its key kept in its state
/// directory), taking over the address from the one before, whose sessions are gone.
fn start_keyed(net: &FakeNet, addr: &str, offload: bool, keys: KeyPair) -> Node {
    let tun = FakeTun::default();
    let mut udp = net.bind(addr);
    udp.offload = offload;
    let socket = udp.addr.clone();
    let metrics = Metrics::new().unwrap();
    let (device, handle) = Device::new(
        tun.clone(),
        udp,
        keys.clone(),
        metrics.clone(),
        DeviceConfig::default(),
    );
    tokio::spawn(device.run());
    Node {
        keys,
        addr: addr.parse().unwrap(),
        tun,
        handle,
        metrics,
        socket,
    }
}

pub(crate) fn peer_of(node: &Node, name: &str, cidr: &str) -> TunnelPeer {
    TunnelPeer {
        name: name.into(),
        public_key: node.keys.public_key(),
        endpoint: Some(node.addr),
        allowed_ips: vec![cidr.parse().unwrap()],
        persistent_keepalive: None,
        preshared_key: None,
    }
}

pub(crate) async fn delivered(tun: &FakeTun) -> Option<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(2), async {
        tun.delivered.readable().await;
        tun.delivered.pop()
    })
    .await
    .ok()
    .flatten()
}

/// A handshake initiation to `to` from a fresh key it does not know, with a valid MAC1.
fn stranger_initiation(to: &Node, index: u32) -> Vec<u8> {
    let stranger = KeyPair::generate();
    let mut tunn = Tunn::new(
        stranger.secret().clone(),
        *to.keys.public(),
        None,
        None,
        index,
        None,
    );
    let mut buf = [0u8; 256];
    match tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(init) => init.to_vec(),
        _ => panic!("a fresh Tunn formats an initiation"),
    }
}

async fn pair(net: &FakeNet) -> (Node, Node) {
    let a = start(net, "198.18.0.1:51820");
    let b = start(net, "198.18.0.2:51820");
    make_peers(&a, &b).await;
    (a, b)
}

/// Drops so far, by reason (in `DropReason::ALL` order).
fn drop_counts(metrics: &Metrics) -> Vec<u64> {
    DropReason::ALL.iter().map(|r| metrics.drops(*r)).collect()
}

/// Waits until `condition` holds, naming it if it never does: generous, because a loaded
/// 2-core machine runs these debug-build devices slowly, and the condition ends the wait.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    trellis_test_support::eventually_async(what, Duration::from_secs(10), || {
        std::future::ready(condition().then_some(()))
    })
    .await;
}

/// a (pods 10.1.0.0/24) and b (pods 10.2.0.0/24) become each other's peer.
async fn make_peers(a: &Node, b: &Node) {
    a.handle
        .set_peers(vec![peer_of(b, "b", "10.2.0.0/24")], true)
        .await
        .unwrap();
    b.handle
        .set_peers(vec![peer_of(a, "a", "10.1.0.0/24")], true)
        .await
        .unwrap();
}

#[tokio::test]
async fn handshake_then_traffic_both_ways() {
    let net = FakeNet::default();
    let (a, b) = pair(&net).await;
    let ping = ipv4("10.1.0.5", "10.2.0.7", b"ping");
    a.tun.inbound.push(ping.clone());
    assert_eq!(delivered(&b.tun).await.as_deref(), Some(&ping[..]));
    let pong = ipv4("10.2.0.7", "10.1.0.5", b"pong");
    b.tun.inbound.push(pong.clone());
    assert_eq!(delivered(&a.tun).await.as_deref(), Some(&pong[..]));

    let stats = a.handle.stats().await.unwrap();
    assert_eq!(stats[0].handshakes, 1);
    assert_eq!(stats[0].tx_bytes, ping.len() as u64);
    assert_eq!(stats[0].rx_bytes, pong.len() as u64);
    assert!(stats[0].since_last_handshake.is_some());
    let text = a.metrics.render();
    assert!(
        text.contains("trellis_gateway_peer_handshakes_total{peer=\"b\"} 1"),
        "{text}"
    );
    assert!(text.contains("trellis_gateway_peers_configured 1"));
    // Nothing but WireGuard crossed the wire: no plaintext payload in any datagram.
    for (_, _, datagram) in net.wire.lock().unwrap().iter() {
        assert!(!datagram.windows(4).any(|w| w == b"ping" || w == b"pong"));
    }
}

#[tokio::test]
async fn batch_of_packets_queued_before_the_handshake_all_arrive() {
    let net = FakeNet::default();
    let (a, b) = pair(&net).await;
    for n in 0..50u8 {
        a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", &[n; 100]));
    }
    for n in 0..50u8 {
        let packet = delivered(&b.tun).await.expect("packet lost");
        assert_eq!(packet[20], n, "order kept");
    }
    let text = a.metrics.render();
    assert!(
        text.contains("trellis_gateway_peer_queued_packets{peer=\"b\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn no_route_and_spoofed_sources_are_dropped() {
    let net = FakeNet::default();
    let (a, b) = pair(&net).await;
    a.tun.inbound.push(ipv4("10.1.0.5", "10.9.0.1", b"nowhere"));
    // B accepts from A only sources inside 10.1.0.0/24.
    a.tun.inbound.push(ipv4("10.7.0.5", "10.2.0.7", b"spoofed"));
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"fine"));
    let packet = delivered(&b.tun).await.unwrap();
    assert_eq!(&packet[20..], b"fine");
    assert_eq!(a.metrics.drops(DropReason::NoRoute), 1);
    assert_eq!(b.metrics.drops(DropReason::SourceNotAllowed), 1);
}

#[tokio::test]
async fn garbage_truncated_replayed_and_unknown_handshakes_are_counted_not_fatal() {
    let net = FakeNet::default();
    let (a, b) = pair(&net).await;
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"first"));
    delivered(&b.tun).await.unwrap();
    let before = drop_counts(&b.metrics);
    let attacker: SocketAddr = "198.18.0.66:4000".parse().unwrap();

    // Random bytes of every small length, and every message type with a wrong length.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for len in 0..300 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        net.inject(b.addr, attacker, bytes);
    }
    for kind in 1..=4u8 {
        let mut bytes = vec![0u8; 40];
        bytes[0] = kind;
        net.inject(b.addr, attacker, bytes);
    }
    // Replays and truncations of a real data packet.
    let data = net
        .wire
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(_, _, d)| d[0] == 4 && d.len() > 32)
        .unwrap()
        .2
        .clone();
    for _ in 0..5 {
        net.inject(b.addr, a.addr, data.clone());
    }
    for cut in [31, 32, 33, data.len() - 1] {
        net.inject(b.addr, a.addr, data[..cut].to_vec());
    }
    // A handshake from a key B does not know, with a valid MAC1.
    net.inject(b.addr, attacker, stranger_initiation(&b, 7));

    // B still works.
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"after"));
    let mut got = Vec::new();
    while let Some(packet) = delivered(&b.tun).await {
        got.push(packet);
        if got.last().unwrap().ends_with(b"after") {
            break;
        }
    }
    assert!(got.last().unwrap().ends_with(b"after"), "{got:?}");
    // Replays are caught by the counter window, truncated copies by length or the counter.
    let after = drop_counts(&b.metrics);
    let added = |reason: DropReason| {
        let at = DropReason::ALL.iter().position(|r| *r == reason).unwrap();
        after[at] - before[at]
    };
    let replay = added(DropReason::Replay);
    assert!(replay >= 5, "replay {replay}");
    assert!(added(DropReason::NoPeer) >= 1, "unknown handshake key");
    let malformed = added(DropReason::Malformed);
    let decrypt = added(DropReason::DecryptFailed);
    let no_peer = added(DropReason::NoPeer);
    assert_eq!(
        malformed + decrypt + no_peer + replay,
        300 + 4 + 5 + 4 + 1,
        "every bad datagram is counted once"
    );
    assert_eq!(b.handle.stats().await.unwrap().len(), 1);
}

#[tokio::test]
async fn removing_a_peer_stops_traffic_and_readding_restores_it() {
    let net = FakeNet::default();
    let (a, b) = pair(&net).await;
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"one"));
    delivered(&b.tun).await.unwrap();

    b.handle.set_peers(vec![], true).await.unwrap();
    assert!(b.handle.stats().await.unwrap().is_empty());
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"two"));
    assert!(
        delivered(&b.tun).await.is_none(),
        "removed peer still delivered"
    );
    assert!(b.metrics.drops(DropReason::NoPeer) >= 1);
    assert!(!b.metrics.render().contains("peer=\"a\""));

    b.handle
        .set_peers(vec![peer_of(&a, "a", "10.1.0.0/24")], true)
        .await
        .unwrap();
    // A's session is gone on B's side; A keeps sending on it until the next handshake, which
    // B's traffic to A starts.
    b.tun.inbound.push(ipv4("10.2.0.7", "10.1.0.5", b"back"));
    assert!(delivered(&a.tun).await.unwrap().ends_with(b"back"));
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"three"));
    assert!(delivered(&b.tun).await.unwrap().ends_with(b"three"));
}

#[tokio::test]
async fn endpoint_follows_a_roaming_peer() {
    let net = FakeNet::default();
    let (a, b) = pair(&net).await;
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"one"));
    delivered(&b.tun).await.unwrap();
    // A moves to a new address and speaks first; B follows it there.
    let moved = net.rebind(&a.socket, "198.18.0.9:6000");
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"roam"));
    delivered(&b.tun).await.unwrap();
    assert_eq!(b.handle.stats().await.unwrap()[0].endpoint, Some(moved));
    b.tun
        .inbound
        .push(ipv4("10.2.0.7", "10.1.0.5", b"found you"));
    assert!(delivered(&a.tun).await.unwrap().ends_with(b"found you"));
    // Reapplying the same state keeps the roamed endpoint; a new configured one wins.
    b.handle
        .set_peers(vec![peer_of(&a, "a", "10.1.0.0/24")], true)
        .await
        .unwrap();
    assert_eq!(b.handle.stats().await.unwrap()[0].endpoint, Some(moved));
    let mut changed = peer_of(&a, "a", "10.1.0.0/24");
    changed.endpoint = Some("198.18.0.10:7000".parse().unwrap());
    b.handle
        .set_peers(vec![changed.clone()], true)
        .await
        .unwrap();
    assert_eq!(
        b.handle.stats().await.unwrap()[0].endpoint,
        changed.endpoint
    );
}

#[tokio::test]
async fn a_handshake_flood_gets_cookies_and_the_established_peer_keeps_working() {
    let net = FakeNet::default();
    let config = DeviceConfig {
        handshake_rate_limit: 10,
        ..DeviceConfig::default()
    };
    let a = start(&net, "198.18.0.1:51820");
    // b with a low handshake limit, so a small flood is enough.
    let b = {
        let keys = KeyPair::generate();
        let tun = FakeTun::default();
        let udp = net.bind("198.18.0.2:51820");
        let socket = udp.addr.clone();
        let metrics = Metrics::new().unwrap();
        let (device, handle) = Device::new(tun.clone(), udp, keys.clone(), metrics.clone(), config);
        tokio::spawn(device.run());
        Node {
            keys,
            addr: "198.18.0.2:51820".parse().unwrap(),
            tun,
            handle,
            metrics,
            socket,
        }
    };
    make_peers(&a, &b).await;
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"before"));
    delivered(&b.tun).await.unwrap();

    let flooder = net.bind("198.18.0.66:4000");
    for n in 0..60u32 {
        net.inject(
            b.addr,
            *flooder.addr.lock().unwrap(),
            stranger_initiation(&b, n),
        );
    }
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"during"));
    assert!(delivered(&b.tun).await.unwrap().ends_with(b"during"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cookies = std::iter::from_fn(|| flooder.queue.pop())
        .filter(|(d, _)| d[0] == COOKIE_REPLY && d.len() == COOKIE_REPLY_LEN)
        .count();
    assert!(
        cookies > 0,
        "under load, initiations are answered with cookies"
    );
    assert_eq!(b.metrics.drops(DropReason::RateLimited), cookies as u64);
    assert!(
        b.metrics.drops(DropReason::NoPeer) <= 12,
        "DH work stays bounded"
    );
}

#[tokio::test]
async fn packets_over_the_mtu_are_dropped_not_panicked_on() {
    let net = FakeNet::default();
    let (a, b) = pair(&net).await;
    // The TUN may hand over more than the MTU if someone raises it behind our back.
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", &[0; 4000]));
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"small"));
    assert!(delivered(&b.tun).await.unwrap().ends_with(b"small"));
    assert_eq!(a.metrics.drops(DropReason::TooBig), 1);
}

#[tokio::test]
async fn persistent_keepalive_keeps_the_path_warm() {
    let net = FakeNet::default();
    let (a, b) = pair(&net).await;
    let mut with_keepalive = peer_of(&b, "b", "10.2.0.0/24");
    with_keepalive.persistent_keepalive = Some(1);
    a.handle
        .set_peers(vec![with_keepalive], true)
        .await
        .unwrap();
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"hello"));
    delivered(&b.tun).await.unwrap();
    let keepalives = |net: &FakeNet| {
        net.wire
            .lock()
            .unwrap()
            .iter()
            .filter(|(from, _, d)| *from == a.addr && d[0] == DATA && d.len() == DATA_MIN_LEN)
            .count()
    };
    let before = keepalives(&net);
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(keepalives(&net) >= before + 2, "a keepalive every second");
}

#[tokio::test]
async fn a_replayed_handshake_initiation_is_a_replay_drop() {
    let net = FakeNet::default();
    let (a, b) = pair(&net).await;
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"one"));
    delivered(&b.tun).await.unwrap();
    // B, given its peer second, initiated the handshake A answered (A's own initiation, sent
    // when it got its peer, found B without one).
    let init = net
        .wire
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(from, _, d)| *from == b.addr && d[0] == HANDSHAKE_INIT)
        .unwrap()
        .2
        .clone();
    let replays = a.metrics.drops(DropReason::Replay);
    net.inject(a.addr, b.addr, init);
    eventually("the replayed initiation counted", || {
        a.metrics.drops(DropReason::Replay) == replays + 1
    })
    .await;
    assert_eq!(
        a.handle.stats().await.unwrap()[0].handshakes,
        1,
        "no new session"
    );
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"two"));
    assert!(delivered(&b.tun).await.unwrap().ends_with(b"two"));
}

#[tokio::test]
async fn gso_sends_and_gro_receives_keep_every_packet_in_order() {
    let net = FakeNet::default();
    let a = start_with(&net, "198.18.0.1:51820", true);
    let b = start_with(&net, "198.18.0.2:51820", true);
    make_peers(&a, &b).await;
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"hello"));
    delivered(&b.tun).await.unwrap();
    let drops_before = (drop_counts(&a.metrics), drop_counts(&b.metrics));
    // Runs of one size with odd ones between: the GSO plan cuts them, GRO glues them back.
    let sizes: Vec<usize> = (0..300)
        .map(|n| match n % 50 {
            49 => 37,
            48 => 1300,
            _ => 1000,
        })
        .collect();
    for (n, size) in sizes.iter().enumerate() {
        let mut payload = vec![(n % 251) as u8; *size];
        payload[..2].copy_from_slice(&(n as u16).to_be_bytes());
        a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", &payload));
    }
    for (n, size) in sizes.iter().enumerate() {
        let packet = delivered(&b.tun).await.expect("packet lost");
        assert_eq!(packet.len(), 20 + size, "packet {n}");
        assert_eq!(
            u16::from_be_bytes([packet[20], packet[21]]),
            n as u16,
            "order"
        );
    }
    let stats = b.handle.stats().await.unwrap();
    assert_eq!(
        stats[0].rx_bytes,
        5 + 20 + sizes.iter().map(|s| (20 + s) as u64).sum::<u64>()
    );
    assert_eq!(
        (drop_counts(&a.metrics), drop_counts(&b.metrics)),
        drops_before,
        "no drop of any reason"
    );
}

/// A node with two workers, as on a two-CPU machine: the handshake and sessions one worker
/// makes serve the other, whichever queue or socket the kernel steers a packet to.
#[tokio::test]
async fn two_workers_share_sessions_and_stop_together() {
    let net = FakeNet::default();
    let a = start(&net, "198.18.0.1:51820");
    let keys = KeyPair::generate();
    let (first_tun, second_tun) = (FakeTun::default(), FakeTun::default());
    let first_udp = net.bind("198.18.0.2:51820");
    let metrics = Metrics::new().unwrap();
    let (first, handle) = Device::new(
        first_tun.clone(),
        first_udp,
        keys.clone(),
        metrics.clone(),
        DeviceConfig::default(),
    );
    // Bound last, the second socket gets every datagram to the address: the network steers
    // all of a's traffic to the second worker.
    let second = first
        .sibling()
        .attach(second_tun.clone(), net.bind("198.18.0.2:51820"));
    let first = tokio::spawn(first.run());
    let second = tokio::spawn(second.run());
    let b = Node {
        keys,
        addr: "198.18.0.2:51820".parse().unwrap(),
        tun: first_tun.clone(),
        handle,
        metrics,
        socket: Arc::new(Mutex::new("198.18.0.2:51820".parse().unwrap())),
    };
    make_peers(&a, &b).await;

    // a starts the handshake; b's second worker answers it and decrypts the packet.
    let ping = ipv4("10.1.0.5", "10.2.0.7", b"ping");
    a.tun.inbound.push(ping.clone());
    assert_eq!(delivered(&second_tun).await.as_deref(), Some(&ping[..]));
    // The reply leaves through b's first worker, on the session the second one made.
    let pong = ipv4("10.2.0.7", "10.1.0.5", b"pong");
    first_tun.inbound.push(pong.clone());
    assert_eq!(delivered(&a.tun).await.as_deref(), Some(&pong[..]));
    // And the other way round.
    let again = ipv4("10.2.0.7", "10.1.0.5", b"again");
    second_tun.inbound.push(again.clone());
    assert_eq!(delivered(&a.tun).await.as_deref(), Some(&again[..]));

    let stats = b.handle.stats().await.unwrap();
    assert_eq!(stats[0].handshakes, 1, "one session for both workers");
    assert_eq!(stats[0].rx_bytes, ping.len() as u64);
    assert_eq!(stats[0].tx_bytes, (pong.len() + again.len()) as u64);
    assert!(first_tun.delivered.pop().is_none());

    // Dropping the last handle stops the first worker, and it the second.
    drop(b);
    for worker in [first, second] {
        let stopped = tokio::time::timeout(Duration::from_secs(2), worker).await;
        assert!(matches!(stopped, Ok(Ok(Ok(())))), "worker still running");
    }
}

/// Two peers with a session: a packet from a has reached b.
async fn connected_pair(net: &FakeNet) -> (Node, Node) {
    let (a, b) = pair(net).await;
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"before"));
    assert!(delivered(&b.tun).await.unwrap().ends_with(b"before"));
    (a, b)
}

/// A gateway restarted: the old loop stops (every handle dropped), a new one starts with the
/// same key on the same address and is given the same peers, with no session of the old one.
async fn restart(net: &FakeNet, node: Node, peers: Vec<TunnelPeer>) -> Node {
    let keys = node.keys.clone();
    let addr = node.addr.to_string();
    drop(node);
    let node = start_keyed(net, &addr, false, keys);
    node.handle.set_peers(peers, true).await.unwrap();
    node
}

/// Pushes a numbered packet from `from` (10.1.0.5 or 10.2.0.7, by `to_b`) every 20 ms until
/// one arrives at `to`; how long that took, or `None` after `within`.
async fn first_delivery(from: &Node, to: &Node, to_b: bool, within: Duration) -> Option<Duration> {
    let (src, dst) = if to_b {
        ("10.1.0.5", "10.2.0.7")
    } else {
        ("10.2.0.7", "10.1.0.5")
    };
    let started = tokio::time::Instant::now();
    let mut n = 0u32;
    while started.elapsed() < within {
        from.tun.inbound.push(ipv4(src, dst, &n.to_be_bytes()));
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if to.tun.delivered.pop().is_some() {
            return Some(started.elapsed());
        }
    }
    None
}

#[tokio::test]
async fn a_restarted_gateway_initiates_so_its_peer_switches_at_once() {
    let net = FakeNet::default();
    let (a, b) = connected_pair(&net).await;

    let b = restart(&net, b, vec![peer_of(&a, "a", "10.1.0.0/24")]).await;
    // A sends first: without B's handshake it would keep encrypting with the session B lost
    // until its own timers gave up (Keepalive + Rekey-Timeout: 15 s).
    let took = first_delivery(&a, &b, true, Duration::from_secs(2)).await;
    let took = took.expect("A's traffic reaches the restarted B within 2 s");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(b.metrics.initiations(Initiation::NewPeer), 1);
    // And back, on the same new session.
    let back = first_delivery(&b, &a, false, Duration::from_secs(1)).await;
    assert!(back.is_some(), "B's traffic reaches A");
}

#[tokio::test]
async fn data_for_a_lost_session_makes_the_restarted_gateway_initiate() {
    let net = FakeNet::default();
    let (a, b) = connected_pair(&net).await;

    // B's own handshake after the restart is lost on the way: the data A keeps sending on
    // the old session must make B try again at once, not after Rekey-Timeout (5 s).
    net.mute(b.addr, true);
    let b = restart(&net, b, vec![peer_of(&a, "a", "10.1.0.0/24")]).await;
    net.mute(b.addr, false);
    let took = first_delivery(&a, &b, true, Duration::from_secs(3)).await;
    let took = took.expect("A's traffic reaches the restarted B");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(b.metrics.initiations(Initiation::UnknownSession), 1);
}

#[tokio::test]
async fn both_ends_restarted_together_find_each_other_at_once() {
    let net = FakeNet::default();
    let (a, b) = connected_pair(&net).await;

    let (a_keys, b_keys) = (a.keys.clone(), b.keys.clone());
    drop((a, b));
    let a = start_keyed(&net, "198.18.0.1:51820", false, a_keys);
    let b = start_keyed(&net, "198.18.0.2:51820", false, b_keys);
    // Both get their peers at the same moment: their handshakes cross.
    let (x, y) = tokio::join!(
        a.handle
            .set_peers(vec![peer_of(&b, "b", "10.2.0.0/24")], true),
        b.handle
            .set_peers(vec![peer_of(&a, "a", "10.1.0.0/24")], true),
    );
    x.unwrap();
    y.unwrap();
    let there = first_delivery(&a, &b, true, Duration::from_secs(1)).await;
    let back = first_delivery(&b, &a, false, Duration::from_secs(1)).await;
    assert!(there.is_some() && back.is_some(), "{there:?} {back:?}");
}

#[tokio::test]
async fn spoofed_data_for_unknown_sessions_starts_at_most_one_handshake_a_second() {
    let net = FakeNet::default();
    let a = start(&net, "198.18.0.1:51820");
    let b = start(&net, "198.18.0.2:51820");
    // B knows A but A never answers (A has no peer): B has no session with A.
    b.handle
        .set_peers(vec![peer_of(&a, "a", "10.1.0.0/24")], true)
        .await
        .unwrap();
    // Data messages "from" A's address for sessions B never had, as a spoofer would send.
    for index in 0..100u32 {
        let mut data = vec![0u8; 64];
        data[0] = DATA;
        data[4..8].copy_from_slice(&((index % 4 + 1) << 8).to_le_bytes());
        net.inject(b.addr, a.addr, data);
    }
    eventually("every forged data message counted", || {
        b.metrics.drops(DropReason::NoPeer) + b.metrics.drops(DropReason::DecryptFailed) >= 100
    })
    .await;
    assert!(
        b.metrics.initiations(Initiation::UnknownSession) <= 1,
        "{}",
        b.metrics.initiations(Initiation::UnknownSession)
    );
    assert_eq!(b.metrics.initiations(Initiation::NewPeer), 1);
}

#[tokio::test]
async fn a_moved_endpoint_gets_a_handshake_at_once() {
    let net = FakeNet::default();
    let (a, b) = connected_pair(&net).await;
    let moved = net.rebind(&b.socket, "198.18.0.3:51820");
    let mut peer = peer_of(&b, "b", "10.2.0.0/24");
    peer.endpoint = Some(moved);
    a.handle.set_peers(vec![peer], true).await.unwrap();
    assert_eq!(a.metrics.initiations(Initiation::EndpointChanged), 1);
    let stats = a.handle.stats().await.unwrap();
    assert_eq!(stats[0].endpoint, Some(moved));
    eventually("a second handshake at b", || {
        b.metrics
            .render()
            .contains("trellis_gateway_peer_handshakes_total{peer=\"a\"} 2")
    })
    .await;
}

#[tokio::test]
async fn a_thousand_peers_get_their_handshakes_at_once_without_tripping_cookies() {
    let net = FakeNet::default();
    let (a, b) = (
        start(&net, "198.18.0.1:51820"),
        start(&net, "198.18.0.2:51820"),
    );
    b.handle
        .set_peers(vec![peer_of(&a, "a", "10.1.0.0/24")], true)
        .await
        .unwrap();
    // A restarts into a mesh of 1,000 nodes (999 of them silent here, and b).
    let mut peers: Vec<TunnelPeer> = (1..1000u32)
        .map(|n| {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&n.to_le_bytes());
            TunnelPeer {
                name: format!("n{n}"),
                public_key: PublicKey(key),
                endpoint: Some(SocketAddr::new(
                    Ipv4Addr::from(0xc612_0000 | (n + 10)).into(),
                    51820,
                )),
                allowed_ips: vec![
                    format!("10.{}.{}.0/24", 100 + n / 256, n % 256)
                        .parse()
                        .unwrap(),
                ],
                persistent_keepalive: None,
                preshared_key: None,
            }
        })
        .collect();
    peers.push(peer_of(&b, "b", "10.2.0.0/24"));
    a.handle.set_peers(peers, true).await.unwrap();
    assert_eq!(a.metrics.initiations(Initiation::NewPeer), 1000);
    // b, which had no reason to send, has a session with A from A's initiation alone.
    eventually("b's session with a from a's initiation alone", || {
        b.metrics
            .render()
            .contains("trellis_gateway_peer_handshakes_total{peer=\"a\"} 1")
    })
    .await;

    // The other side of such a burst: 1,000 initiations reach one gateway at once (1,000
    // gateways restarted together), under its default limit of 2,000 a second: none is
    // answered with a cookie.
    let inits: Vec<Vec<u8>> = (0..1000).map(|n| stranger_initiation(&b, n)).collect();
    let from: SocketAddr = "198.18.0.66:4000".parse().unwrap();
    let before = b.metrics.drops(DropReason::NoPeer);
    for init in inits {
        net.inject(b.addr, from, init);
    }
    for _ in 0..1000 {
        if b.metrics.drops(DropReason::NoPeer) >= before + 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        b.metrics.drops(DropReason::NoPeer),
        before + 1000,
        "every key looked up"
    );
    assert_eq!(
        b.metrics.drops(DropReason::RateLimited),
        0,
        "no cookie demanded"
    );
}

/// `node`'s peer entry for `keys` (a node's key after a rotation).
fn peer_with_key(node: &Node, keys: &KeyPair, name: &str, cidr: &str) -> TunnelPeer {
    TunnelPeer {
        public_key: keys.public_key(),
        ..peer_of(node, name, cidr)
    }
}

/// What a reconciler does when the controller says a peer's key changed: the new key as a
/// new peer, then the old one pruned.
async fn learn_key(node: &Node, peer: TunnelPeer) {
    node.handle
        .set_peers(vec![peer.clone()], false)
        .await
        .unwrap();
    node.handle.set_peers(vec![peer], true).await.unwrap();
}

#[tokio::test]
async fn a_rotated_key_keeps_every_session_until_the_peer_initiates_to_the_new_key() {
    let net = FakeNet::default();
    let (a, b) = connected_pair(&net).await;
    let new = KeyPair::generate();
    b.handle.rotate_key(new.clone()).await.unwrap();

    // A does not know the new key yet: the sessions on the old one carry on, both ways.
    let there = first_delivery(&a, &b, true, Duration::from_secs(1)).await;
    let back = first_delivery(&b, &a, false, Duration::from_secs(1)).await;
    assert!(there.is_some() && back.is_some(), "{there:?} {back:?}");

    // A learns it (from its controller): it initiates to the new key at once, B moves A to
    // it, and traffic goes on the new session within moments.
    learn_key(&a, peer_with_key(&b, &new, "b", "10.2.0.0/24")).await;
    let there = first_delivery(&a, &b, true, Duration::from_secs(2)).await;
    let back = first_delivery(&b, &a, false, Duration::from_secs(2)).await;
    let (there, back) = (there.expect("A to B"), back.expect("B to A"));
    assert!(
        there < Duration::from_millis(500) && back < Duration::from_millis(500),
        "{there:?} {back:?}"
    );
    let stats = a.handle.stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].public_key, new.public_key());

    // A late initiation from A to the old key is refused now that A uses the new one.
    let mut late = Tunn::new(
        a.keys.secret().clone(),
        *b.keys.public(),
        None,
        None,
        77,
        None,
    );
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(init) = late.format_handshake_initiation(&mut buf, false) else {
        panic!("an initiation")
    };
    net.inject(b.addr, a.addr, init.to_vec());
    eventually("the late initiation counted", || {
        b.metrics.drops(DropReason::OldKey) == 1
    })
    .await;
    // Nobody was left on the old key.
    assert_eq!(b.handle.finish_rotation().await.unwrap(), 0);
    let back = first_delivery(&b, &a, false, Duration::from_secs(1)).await;
    assert!(back.is_some(), "B's traffic still reaches A");
}

#[tokio::test]
async fn the_end_of_the_grace_period_moves_late_peers_to_the_new_key() {
    let net = FakeNet::default();
    let (a, b) = connected_pair(&net).await;
    let new = KeyPair::generate();
    b.handle.rotate_key(new.clone()).await.unwrap();
    // A never initiated to the new key: B moves it and initiates (with the new key), which
    // A can only answer once it learns that key.
    assert_eq!(b.handle.finish_rotation().await.unwrap(), 1);
    learn_key(&a, peer_with_key(&b, &new, "b", "10.2.0.0/24")).await;
    let there = first_delivery(&a, &b, true, Duration::from_secs(2)).await;
    let back = first_delivery(&b, &a, false, Duration::from_secs(2)).await;
    assert!(there.is_some() && back.is_some(), "{there:?} {back:?}");
    // The old key answers nothing any more.
    let mut old = Tunn::new(
        a.keys.secret().clone(),
        *b.keys.public(),
        None,
        None,
        78,
        None,
    );
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(init) = old.format_handshake_initiation(&mut buf, false) else {
        panic!("an initiation")
    };
    let refused = b.metrics.drops(DropReason::DecryptFailed);
    net.inject(b.addr, a.addr, init.to_vec());
    eventually("an initiation to the forgotten key is refused", || {
        b.metrics.drops(DropReason::DecryptFailed) == refused + 1
    })
    .await;
}

#[tokio::test]
async fn packets_on_the_old_keys_session_are_accepted_while_both_peers_exist() {
    let net = FakeNet::default();
    let (a, b) = connected_pair(&net).await;
    let new = KeyPair::generate();
    b.handle.rotate_key(new.clone()).await.unwrap();
    // A adds B's new key as a peer (the old one not pruned yet); its initiation is lost, so
    // B keeps sending on the old key's session, to the peer A no longer routes to.
    net.mute(a.addr, true);
    a.handle
        .set_peers(vec![peer_with_key(&b, &new, "b-new", "10.2.0.0/24")], false)
        .await
        .unwrap();
    net.mute(a.addr, false);
    b.tun
        .inbound
        .push(ipv4("10.2.0.7", "10.1.0.5", b"in flight"));
    let got = delivered(&a.tun).await.expect("delivered");
    assert!(got.ends_with(b"in flight"));
    assert_eq!(a.metrics.drops(DropReason::SourceNotAllowed), 0);
}

#[tokio::test]
async fn data_sent_on_the_old_keys_session_still_arrives_after_the_switch() {
    let net = FakeNet::default();
    let (a, b) = connected_pair(&net).await;
    let new = KeyPair::generate();
    b.handle.rotate_key(new.clone()).await.unwrap();
    // A sends on the session of B's old key; the datagram is held up in the network.
    net.mute(a.addr, true);
    let seen = net.wire.lock().unwrap().len();
    a.tun.inbound.push(ipv4("10.1.0.5", "10.2.0.7", b"late"));
    let held_up = poll_until_async(|| {
        net.wire.lock().unwrap()[seen..]
            .iter()
            .find(|(from, _, d)| *from == a.addr && d[0] == DATA && d.len() > DATA_MIN_LEN)
            .map(|(_, _, d)| d.clone())
    })
    .await;
    net.mute(a.addr, false);
    // A learns the new key and B moves A to it; then the held-up datagram arrives.
    learn_key(&a, peer_with_key(&b, &new, "b", "10.2.0.0/24")).await;
    assert!(
        first_delivery(&a, &b, true, Duration::from_secs(2))
            .await
            .is_some()
    );
    while b.tun.delivered.pop().is_some() {}
    net.inject(b.addr, a.addr, held_up);
    let got = delivered(&b.tun).await;
    let got = got.unwrap_or_else(|| panic!("not delivered: {:?}", drop_counts(&b.metrics)));
    assert!(got.ends_with(b"late"), "{got:?}");
}

async fn poll_until_async<T>(mut attempt: impl FnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(value) = attempt() {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened")
}

#[tokio::test]
async fn data_on_a_replaced_keys_session_still_arrives_after_the_old_peer_is_pruned() {
    let net = FakeNet::default();
    let (a, b) = connected_pair(&net).await;
    let new = KeyPair::generate();
    b.handle.rotate_key(new.clone()).await.unwrap();
    // B sends on its old key's session; the datagram is held up in the network.
    net.mute(b.addr, true);
    let seen = net.wire.lock().unwrap().len();
    b.tun.inbound.push(ipv4("10.2.0.7", "10.1.0.5", b"late"));
    let held_up = poll_until_async(|| {
        net.wire.lock().unwrap()[seen..]
            .iter()
            .find(|(from, _, d)| *from == b.addr && d[0] == DATA && d.len() > DATA_MIN_LEN)
            .map(|(_, _, d)| d.clone())
    })
    .await;
    net.mute(b.addr, false);
    // A learns B's new key and prunes the old one's peer; then the datagram arrives.
    learn_key(&a, peer_with_key(&b, &new, "b", "10.2.0.0/24")).await;
    net.inject(a.addr, b.addr, held_up);
    let got = delivered(&a.tun).await;
    let got = got.unwrap_or_else(|| panic!("not delivered: {:?}", drop_counts(&a.metrics)));
    assert!(got.ends_with(b"late"), "{got:?}");
    // Only the new key's peer is listed, sent to and counted.
    let stats = a.handle.stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].public_key, new.public_key());
    assert!(
        a.metrics
            .render()
            .contains("trellis_gateway_peers_configured 1")
    );
    assert!(
        first_delivery(&a, &b, true, Duration::from_secs(2))
            .await
            .is_some()
    );
}

/// An external peer's preshared key (`Peer.spec.presharedKeySecret`) is mixed into the
/// handshake: with the same key on both ends traffic flows; a gateway with another key (or
/// none) never completes a handshake, and changing it on the gateway takes effect at once.
#[tokio::test]
async fn a_preshared_key_must_match_for_a_handshake() {
    use trellis_core::external_peer::PresharedKey;
    let net = FakeNet::default();
    let a = start(&net, "198.18.0.1:51820");
    let b = start(&net, "198.18.0.2:51820");
    let psk = Some(PresharedKey([9; 32]));
    let with = |peer: TunnelPeer, key: Option<PresharedKey>| TunnelPeer {
        preshared_key: key,
        ..peer
    };
    a.handle
        .set_peers(vec![with(peer_of(&b, "b", "10.2.0.0/24"), psk)], true)
        .await
        .unwrap();
    b.handle
        .set_peers(
            vec![with(
                peer_of(&a, "a", "10.1.0.0/24"),
                Some(PresharedKey([8; 32])),
            )],
            true,
        )
        .await
        .unwrap();
    let ping = ipv4("10.1.0.5", "10.2.0.7", b"ping");
    a.tun.inbound.push(ping.clone());
    assert_eq!(
        delivered(&b.tun).await,
        None,
        "another preshared key: no session"
    );

    b.handle
        .set_peers(vec![with(peer_of(&a, "a", "10.1.0.0/24"), psk)], true)
        .await
        .unwrap();
    a.tun.inbound.push(ping.clone());
    eventually("a session with the same preshared key", || {
        b.tun.delivered.pop().is_some_and(|p| p == ping) || {
            a.tun.inbound.push(ping.clone());
            false
        }
    })
    .await;
}

#[tokio::test]
async fn an_external_peer_re_added_with_a_new_key_is_cut_off_at_once() {
    let net = FakeNet::default();
    let a = start(&net, "198.18.0.1:51820");
    let b = start(&net, "198.18.0.2:51820");
    // B carries A as an external peer (a `Peer` of its cluster), A knows B as a node.
    a.handle
        .set_peers(vec![peer_of(&b, "b", "10.2.0.0/24")], true)
        .await
        .unwrap();
    b.handle
        .set_peers(vec![peer_of(&a, "c1/peer:laptop", "10.1.0.0/24")], true)
        .await
        .unwrap();
    let there = first_delivery(&a, &b, true, Duration::from_secs(2)).await;
    assert!(there.is_some(), "the laptop reaches B");

    // The Peer is removed and re-added under its name with another key: whoever holds the
    // old key must not be let in, not even for a moment.
    let replacement = KeyPair::generate();
    b.handle
        .set_peers(
            vec![TunnelPeer {
                public_key: replacement.public_key(),
                ..peer_of(&a, "c1/peer:laptop", "10.1.0.0/24")
            }],
            true,
        )
        .await
        .unwrap();
    let late = first_delivery(&a, &b, true, Duration::from_millis(1500)).await;
    assert_eq!(late, None, "the old key's session still delivers");
}
