//! The node-encryption toggle, proven on the wire. Pods on two nodes exchange numbered
//! full-MTU UDP datagrams both ways and a paced bulk TCP stream with a checked byte pattern,
//! while encryption is switched on and off five times, the two nodes switching apart from
//! each other (in both orders), as nodes following a controller do. A packet socket on the
//! underlay records every frame from before the first switch. Asserted: the TCP bytes intact,
//! every switch visible on the wire, and no pod-to-pod plaintext from a node between the moment
//! its switch on took effect and the moment its next switch off began (so none while both are
//! on, and none in the final phase); and no datagram lost. Runs as root, in namespaces it
//! creates.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Captured, Classifier, Frame, Node, UnderlayCapture, pattern, two_nodes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use trellis_gateway::metrics::DropReason;
use trellis_netns::RouteTarget;

const UDP_PORT: u16 = 7200;
const TCP_PORT: u16 = 7201;
/// How long the second node lags the first at each switch.
const SWITCH_GAP: Duration = Duration::from_millis(300);
/// Traffic before the first switch, and between switches.
const PLAIN_BEFORE: Duration = Duration::from_millis(800);
const STEADY: Duration = Duration::from_millis(1000);
/// Each switch: encryption on or off, and whether node a goes first.
const SWITCHES: [(bool, bool); 5] = [
    (true, true),
    (false, false),
    (true, false),
    (false, true),
    (true, true),
];
/// Two datagrams every 2 ms each way (about 1,000 a second), at most this many.
const MAX_DATAGRAMS: usize = 40_000;
/// 32 KiB every 8 ms (about 4 MB/s), at most this much.
const TCP_CHUNK: usize = 32 << 10;
const MAX_TCP_BYTES: usize = 128 << 20;

/// Wall-clock time since the epoch: the clock the kernel stamps captured frames with.
fn wall() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

/// Datagrams the kernel dropped for want of room in the receive buffers of UDP sockets on
/// `port` (not the gateway's doing).
fn udp_socket_drops(node: &Node, port: u16) -> u64 {
    let text = node
        .ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/udp"))
        .unwrap()
        .unwrap();
    let port = format!(":{port:04X}");
    text.lines()
        .skip(1)
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|local| local.ends_with(&port))
        })
        .filter_map(|line| line.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// A UDP socket on the node's pod address with a large receive buffer.
fn pod_udp(node: &Node, port: u16) -> Arc<UdpSocket> {
    let at = SocketAddr::new(node.pod, port);
    let socket = node
        .ns
        .run(move || -> std::io::Result<std::net::UdpSocket> {
            let socket = std::net::UdpSocket::bind(at)?;
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::RcvBufForce,
                &(8 << 20),
            )?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .unwrap()
        .unwrap();
    Arc::new(UdpSocket::from_std(socket).unwrap())
}

/// What one direction of numbered datagrams did.
struct Sent {
    /// When each sequence number was sent.
    at: Vec<Duration>,
    /// Sends the kernel refused, by sequence number.
    refused: Vec<(u64, String)>,
}

async fn send_numbered(
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    size: usize,
    stop: Arc<AtomicBool>,
) -> Sent {
    let mut datagram: Vec<u8> = (0..size).map(pattern).collect();
    let mut sent = Sent {
        at: Vec::new(),
        refused: Vec::new(),
    };
    let mut ticks = tokio::time::interval(Duration::from_millis(2));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::SeqCst) && sent.at.len() < MAX_DATAGRAMS {
        ticks.tick().await;
        for _ in 0..2 {
            let seq = sent.at.len() as u64;
            datagram[..8].copy_from_slice(&seq.to_be_bytes());
            sent.at.push(wall());
            if let Err(e) = socket.send_to(&datagram, to).await {
                sent.refused.push((seq, e.to_string()));
            }
        }
    }
    sent
}

/// What one direction of numbered datagrams delivered.
#[derive(Default)]
struct Received {
    /// How many times each sequence number arrived.
    counts: BTreeMap<u64, u32>,
    /// Datagrams of the wrong size or content.
    damaged: u64,
}

async fn receive_numbered(
    socket: Arc<UdpSocket>,
    size: usize,
    distinct: Arc<AtomicU64>,
    mut done: tokio::sync::oneshot::Receiver<()>,
) -> Received {
    let expected: Vec<u8> = (0..size).map(pattern).collect();
    let mut received = Received::default();
    let mut buffer = vec![0u8; 65536];
    loop {
        tokio::select! {
            _ = &mut done => return received,
            result = socket.recv_from(&mut buffer) => {
                let (len, _) = result.unwrap();
                if len != size || buffer[8..len] != expected[8..] {
                    received.damaged += 1;
                    continue;
                }
                let seq = u64::from_be_bytes(buffer[..8].try_into().unwrap());
                let count = received.counts.entry(seq).or_default();
                if *count == 0 {
                    distinct.fetch_add(1, Ordering::SeqCst);
                }
                *count += 1;
            }
        }
    }
}

/// A TCP socket bound to `at` (a pod address) whose segments fit the pod MTU (`mss`), as a
/// pod's would behind its veth.
fn pod_tcp(at: SocketAddr, mss: u32) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_tcp_mss(mss)?;
    socket.set_reuse_address(true)?;
    socket.bind(&at.into())?;
    Ok(socket)
}

/// Writes the byte pattern, paced, until `stop` (or the cap); returns the bytes written.
async fn write_pattern(mut stream: TcpStream, stop: Arc<AtomicBool>) -> usize {
    let mut chunk = vec![0u8; TCP_CHUNK];
    let mut at = 0;
    let mut ticks = tokio::time::interval(Duration::from_millis(8));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::SeqCst) && at < MAX_TCP_BYTES {
        ticks.tick().await;
        for (i, byte) in chunk.iter_mut().enumerate() {
            *byte = pattern(at + i);
        }
        stream.write_all(&chunk).await.expect("TCP write");
        at += chunk.len();
    }
    stream.shutdown().await.expect("TCP shutdown");
    at
}

/// Reads to the end, checking every byte against the pattern; returns the bytes read.
async fn read_pattern(mut stream: TcpStream) -> usize {
    let mut buffer = vec![0u8; 256 << 10];
    let mut at = 0;
    loop {
        let len = stream.read(&mut buffer).await.expect("TCP read");
        if len == 0 {
            return at;
        }
        for (i, byte) in buffer[..len].iter().enumerate() {
            assert_eq!(*byte, pattern(at + i), "TCP byte {} differs", at + i);
        }
        at += len;
    }
}

/// One node's switch: when applying began and when it returned.
#[derive(Debug, Clone, Copy)]
struct Applied {
    start: Duration,
    done: Duration,
}

/// Switches `node`'s encryption towards `other`.
async fn switch(node: &Node, other: &Node, on: bool, revision: u64) -> Applied {
    let start = wall();
    node.apply("c1", revision, vec![other.as_remote("c1", on)])
        .await;
    Applied {
        start,
        done: wall(),
    }
}

#[derive(Debug, Clone, Copy)]
struct Switch {
    on: bool,
    a: Applied,
    b: Applied,
}

/// The phase a moment falls in, for the report.
fn phase(at: Duration, origin: Duration, switches: &[Switch]) -> String {
    let mut label = "plain, before the first switch".to_string();
    for (i, s) in switches.iter().enumerate() {
        let first = s.a.start.min(s.b.start);
        let both = s.a.done.max(s.b.done);
        let mode = if s.on { "on" } else { "off" };
        let (first_name, second_name) = if s.a.start <= s.b.start {
            ("a", "b")
        } else {
            ("b", "a")
        };
        if at >= first && at < both {
            label = format!(
                "switch {} ({mode}): {first_name} switched, {second_name} not yet",
                i + 1
            );
        } else if at >= both {
            label = format!("after switch {} (both {mode})", i + 1);
        }
    }
    format!("{label}, at {:.3} s", (at - origin).as_secs_f64())
}

/// Runs of consecutive lost sequence numbers, each with the phase its first one was sent in.
fn lost_runs(
    direction: &str,
    sent: &Sent,
    received: &Received,
    origin: Duration,
    switches: &[Switch],
) -> Vec<String> {
    let lost: Vec<u64> = (0..sent.at.len() as u64)
        .filter(|seq| !received.counts.contains_key(seq))
        .collect();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < lost.len() {
        let mut j = i;
        while j + 1 < lost.len() && lost[j + 1] == lost[j] + 1 {
            j += 1;
        }
        let (first, last) = (lost[i], lost[j]);
        let span = sent.at[last as usize] - sent.at[first as usize];
        runs.push(format!(
            "{direction}: seq {first}..={last} ({} datagrams over {} ms), first sent in {}",
            last - first + 1,
            span.as_millis(),
            phase(sent.at[first as usize], origin, switches)
        ));
        i = j + 1;
    }
    runs
}

fn drops(node: &Node) -> String {
    DropReason::ALL
        .iter()
        .map(|r| (r.label(), node.gateway().metrics.drops(*r)))
        .filter(|(_, n)| *n > 0)
        .map(|(label, n)| format!("{label}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_encryption_loses_no_datagram_keeps_tcp_intact_and_leaks_no_plaintext() {
    trellis_test_support::skip_unless_root!();
    // Lossless because every node keeps its peers in both modes: while one node of the pair
    // encrypts and the other does not yet (or no longer), the plain one still decrypts.
    let lost = switch_under_load("gw-toggle").await;
    assert!(lost.is_empty(), "datagrams lost:\n{}", lost.join("\n"));
}

/// Runs the traffic through five switches, asserts everything but datagram loss (TCP intact,
/// capture complete, no plaintext while on) and returns the losses, described.
async fn switch_under_load(prefix: &str) -> Vec<String> {
    let (a, b) = two_nodes(prefix).await;
    let mut revision = 1;
    for (node, other) in [(&a, &b), (&b, &a)] {
        node.apply("c1", revision, vec![other.as_remote("c1", false)])
            .await;
    }
    let routes = a.netlink.owned_routes(212).await.unwrap();
    assert!(
        matches!(routes[..], [ref r] if matches!(r.target, RouteTarget::Gateway(_))),
        "{routes:?}"
    );
    // Pods get the tunnel's MTU from the start: a full datagram is exactly that, in IP.
    let mtu = a
        .netlink
        .require_link("trellis0")
        .await
        .unwrap()
        .mtu
        .unwrap() as usize;
    let datagram = mtu - 20 - 8;
    let mss = u32::try_from(mtu - 40).unwrap();

    // The capture, from before any traffic.
    let capture = UnderlayCapture::start(&a, Classifier::between(&a, &b)).await;

    // Numbered datagrams both ways.
    let stop = Arc::new(AtomicBool::new(false));
    let (socket_a, socket_b) = (pod_udp(&a, UDP_PORT), pod_udp(&b, UDP_PORT));
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for (from, to, to_node) in [(&socket_a, &socket_b, &b), (&socket_b, &socket_a, &a)] {
        let distinct = Arc::new(AtomicU64::new(0));
        let (done, done_rx) = tokio::sync::oneshot::channel();
        let receiver = tokio::spawn(receive_numbered(
            to.clone(),
            datagram,
            distinct.clone(),
            done_rx,
        ));
        receivers.push((receiver, done, distinct));
        senders.push(tokio::spawn(send_numbered(
            from.clone(),
            SocketAddr::new(to_node.pod, UDP_PORT),
            datagram,
            stop.clone(),
        )));
    }
    // The TCP stream, a -> b.
    let server = SocketAddr::new(b.pod, TCP_PORT);
    let listener = b.ns.run(move || -> std::io::Result<std::net::TcpListener> {
        let socket = pod_tcp(server, mss)?;
        socket.listen(8)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    });
    let listener = TcpListener::from_std(listener.unwrap().unwrap()).unwrap();
    let client_at = SocketAddr::new(a.pod, 0);
    let client =
        a.ns.run(move || -> std::io::Result<std::net::TcpStream> {
            let socket = pod_tcp(client_at, mss)?;
            socket.connect_timeout(&server.into(), Duration::from_secs(5))?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })
        .unwrap()
        .expect("TCP connect over the plain route");
    let (accepted, _) = listener.accept().await.unwrap();
    let reader = tokio::spawn(read_pattern(accepted));
    let writer = tokio::spawn(write_pattern(
        TcpStream::from_std(client).unwrap(),
        stop.clone(),
    ));

    // The switches, the second node some time after the first.
    let origin = wall();
    tokio::time::sleep(PLAIN_BEFORE).await;
    let mut switches = Vec::new();
    for (on, a_first) in SWITCHES {
        revision += 1;
        let (first, second) = if a_first { (&a, &b) } else { (&b, &a) };
        let first_applied = switch(first, second, on, revision).await;
        tokio::time::sleep(SWITCH_GAP).await;
        let second_applied = switch(second, first, on, revision).await;
        let (a_applied, b_applied) = if a_first {
            (first_applied, second_applied)
        } else {
            (second_applied, first_applied)
        };
        switches.push(Switch {
            on,
            a: a_applied,
            b: b_applied,
        });
        let routes = a.netlink.owned_routes(212).await.unwrap();
        assert_eq!(routes.len(), if on { 2 } else { 1 }, "{routes:?}");
        tokio::time::sleep(STEADY).await;
    }

    // Stop sending; wait (bounded) for what is in flight.
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for sender in senders {
        sent.push(sender.await.unwrap());
    }
    let written = writer.await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the TCP stream ends within a minute")
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline
        && receivers
            .iter()
            .zip(&sent)
            .any(|((_, _, distinct), sent)| distinct.load(Ordering::SeqCst) < sent.at.len() as u64)
    {
        tokio::time::sleep(trellis_test_support::POLL).await;
    }
    let mut received = Vec::new();
    for (receiver, done, _) in receivers {
        let _ = done.send(());
        received.push(receiver.await.unwrap());
    }
    let capture = capture.finish(&a);
    let frames = &capture.frames;

    // What happened, in numbers.
    let directions = ["a -> b", "b -> a"];
    let mut failures = Vec::new();
    let mut lost = Vec::new();
    let mut lost_total = 0;
    for ((direction, sent), received) in directions.iter().zip(&sent).zip(&received) {
        let runs = lost_runs(direction, sent, received, origin, &switches);
        let lost_count = sent.at.len() - received.counts.len();
        lost_total += lost_count;
        let duplicates: u32 = received.counts.values().map(|n| n - 1).sum();
        eprintln!(
            "UDP {direction}: {} sent ({datagram}-byte payloads, {mtu}-byte packets), {} received, {lost_count} lost, {duplicates} duplicated, {} damaged, {} refused at send",
            sent.at.len(),
            received.counts.len(),
            received.damaged,
            sent.refused.len(),
        );
        for run in &runs {
            eprintln!("  lost {run}");
        }
        lost.extend(runs);
        for (seq, error) in sent.refused.iter().take(5) {
            eprintln!(
                "  refused {direction} seq {seq}: {error}, {}",
                phase(sent.at[*seq as usize], origin, &switches)
            );
        }
        if received.damaged > 0 {
            failures.push(format!(
                "{direction}: {} damaged datagrams",
                received.damaged
            ));
        }
    }
    let socket_drops = udp_socket_drops(&a, UDP_PORT) + udp_socket_drops(&b, UDP_PORT);
    eprintln!(
        "UDP receive-buffer drops (not the gateway's): {socket_drops}; gateway drops: a [{}] b [{}]",
        drops(&a),
        drops(&b)
    );
    eprintln!("TCP a -> b: {written} bytes written, {read} read and checked");
    for (i, s) in switches.iter().enumerate() {
        let at = |t: Duration| (t - origin).as_secs_f64();
        eprintln!(
            "switch {} {}: a {:.3}..{:.3} s, b {:.3}..{:.3} s",
            i + 1,
            if s.on { "on" } else { "off" },
            at(s.a.start),
            at(s.a.done),
            at(s.b.start),
            at(s.b.done)
        );
    }

    // The capture: whether it saw everything, then plaintext where it must not be.
    let tunnel = capture.count(Frame::Tunnel);
    eprintln!(
        "underlay capture: {} frames ({tunnel} WireGuard, {} plaintext pod-to-pod); the interface counted {}",
        frames.len(),
        capture.plaintext(),
        capture.counted
    );
    capture.assert_complete();
    let first_switch = switches[0].a.start.min(switches[0].b.start);
    assert!(
        frames
            .iter()
            .any(|f| matches!(f.frame, Frame::Plain { .. }) && f.at < first_switch),
        "the capture saw the plaintext before the first switch"
    );
    assert!(tunnel > 0, "the capture saw WireGuard");
    // A node's traffic is encrypted from the moment its switch on returned until its next
    // switch off begins.
    for (from_a, name) in [(true, "a"), (false, "b")] {
        let mut windows = Vec::new();
        let mut open = None;
        for s in &switches {
            let applied = if from_a { s.a } else { s.b };
            match (s.on, open) {
                (true, None) => open = Some(applied.done),
                (false, Some(from)) => {
                    windows.push((from, applied.start));
                    open = None;
                }
                _ => {}
            }
        }
        if let Some(from) = open {
            windows.push((from, Duration::MAX));
        }
        let leaks: Vec<&Captured> = frames
            .iter()
            .filter(|f| f.frame == Frame::Plain { from_a })
            .filter(|f| windows.iter().any(|(from, to)| f.at >= *from && f.at < *to))
            .collect();
        eprintln!("plaintext from {name} while it was on: {}", leaks.len());
        if let Some(first) = leaks.first() {
            failures.push(format!(
                "{} plaintext packets from {name} while its encryption was on, the first {}",
                leaks.len(),
                phase(first.at, origin, &switches)
            ));
        }
    }
    // Each switch took effect on the wire: in the steady phase after it, WireGuard and no
    // plaintext when on, plaintext both ways when off.
    for (i, s) in switches.iter().enumerate() {
        let from = s.a.done.max(s.b.done);
        let to = switches
            .get(i + 1)
            .map_or(Duration::MAX, |next| next.a.start.min(next.b.start));
        let count = |frame: Frame| {
            frames
                .iter()
                .filter(|f| f.at >= from && f.at < to && f.frame == frame)
                .count()
        };
        let tunnel = count(Frame::Tunnel);
        let plain = [
            count(Frame::Plain { from_a: true }),
            count(Frame::Plain { from_a: false }),
        ];
        eprintln!(
            "after switch {} (both {}): {tunnel} WireGuard frames, plaintext a -> b {}, b -> a {}",
            i + 1,
            if s.on { "on" } else { "off" },
            plain[0],
            plain[1]
        );
        let took_effect = if s.on {
            tunnel > 0 && plain == [0, 0]
        } else {
            plain[0] > 0 && plain[1] > 0
        };
        if !took_effect {
            failures.push(format!(
                "switch {} did not show on the wire: {tunnel} WireGuard, plaintext {plain:?}",
                i + 1
            ));
        }
    }
    let last = switches.last().unwrap();
    let final_plain = frames
        .iter()
        .filter(|f| matches!(f.frame, Frame::Plain { .. }) && f.at >= last.a.done.max(last.b.done))
        .count();
    eprintln!("plaintext in the final on phase: {final_plain}");
    if final_plain > 0 {
        failures.push(format!(
            "{final_plain} plaintext packets in the final on phase"
        ));
    }

    assert_eq!(read, written, "every TCP byte arrived");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if lost_total > 0 {
        lost.push(format!(
            "{lost_total} datagrams lost in all (receive-buffer drops: {socket_drops}; gateway drops: a [{}] b [{}])",
            drops(&a),
            drops(&b)
        ));
    }
    lost
}
