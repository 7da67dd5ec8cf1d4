//! The node's kernel flow sources against the real kernel, in namespaces the tests create:
//! conntrack's events for a connection (opened, then closed with its counts), the drops a
//! table logs to the policy table's NFLOG group (with the prefixes the policy table uses),
//! the policy table itself logging its drops when rendered to, and a burst of connections
//! delivered or counted as lost, never hanging. Runs as root.

mod policy_rig;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trellis_core::flow::L4Protocol;
use trellis_core::flow::kernel::{
    ConntrackEvent, ConntrackEventKind, DropPoint, KernelEvent, NFLOG_GROUP, PacketDrop,
};
use trellis_core::policy::nft::{self, RenderOptions};
use trellis_core::policy::ruleset::{Direction, Rule, Ruleset, Verdict};
use trellis_gateway::flows::kernel::{CONNTRACK, KernelSources, NFLOG};
use trellis_netns::Netns;
use trellis_test_support::{TempNetns, eventually_async};

/// What the sources reported so far.
#[derive(Default)]
struct Seen {
    events: Mutex<Vec<KernelEvent>>,
    lost_conntrack: AtomicU64,
    lost_nflog: AtomicU64,
}

impl Seen {
    fn conntrack(&self, matching: impl Fn(&ConntrackEvent) -> bool) -> Vec<ConntrackEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                KernelEvent::Conntrack(c) if matching(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    fn drops(&self, matching: impl Fn(&PacketDrop) -> bool) -> Vec<PacketDrop> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                KernelEvent::Drop(d) if matching(d) => Some(d.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Opens the sources in `ns` and reads them on a task until the test ends.
fn listen(ns: &Netns) -> (Arc<Seen>, tokio::task::JoinHandle<()>) {
    let sources = KernelSources::open(Some(ns)).expect("open the kernel sources");
    let seen = Arc::new(Seen::default());
    let (events, losses) = (seen.clone(), seen.clone());
    let task = tokio::spawn(async move {
        let result = sources
            .run(
                move |event| events.events.lock().unwrap().push(event),
                move |source, count| {
                    let counter = match source {
                        CONNTRACK => &losses.lost_conntrack,
                        NFLOG => &losses.lost_nflog,
                        other => panic!("a loss of an unknown source {other}"),
                    };
                    counter.fetch_add(count, Ordering::Relaxed);
                },
            )
            .await;
        panic!("the sources stopped: {result:?}");
    });
    (seen, task)
}

/// A namespace with its loopback up.
fn namespace(prefix: &str) -> TempNetns {
    let ns = TempNetns::new(prefix).unwrap();
    policy_rig::ip(Some(ns.name()), &["link", "set", "lo", "up"]);
    ns
}

fn nft(ns: &Netns, script: &str) {
    trellis_gateway::nft::apply(Some(ns), script).unwrap();
}

/// Conntrack working in the namespace (it only tracks where a rule needs it), and closed TCP
/// connections removed within a second rather than two minutes (TIME_WAIT).
fn track_connections(ns: &TempNetns) {
    nft(
        ns,
        "table inet track {\n\tchain out { type filter hook output priority 0; ct state new accept; }\n}\n",
    );
    for state in ["time_wait", "close", "close_wait", "fin_wait", "last_ack"] {
        trellis_netns::sysctl::write(
            Some(ns),
            &format!("net/netfilter/nf_conntrack_tcp_timeout_{state}"),
            "1",
        )
        .unwrap();
    }
}

/// Removes every IPv4 connection conntrack tracks in `ns` (IPCTNL_MSG_CT_DELETE without a
/// tuple), once the kernel acknowledged it.
fn flush_conntrack(ns: &Netns) {
    use netlink_packet_core::{
        NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_netfilter::conntrack::ConntrackMessage;
    use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::Delete(vec![]),
        )),
    );
    request.finalize();
    let mut bytes = vec![0u8; request.buffer_len()];
    request.serialize(&mut bytes);
    let mut socket = ns
        .run(|| netlink_sys::Socket::new(netlink_sys::constants::NETLINK_NETFILTER))
        .unwrap()
        .unwrap();
    socket.bind_auto().unwrap();
    socket.send(&bytes, 0).unwrap();
    let mut answer = vec![0u8; 4096];
    let len = socket.recv(&mut &mut answer[..], 0).unwrap();
    let answer = NetlinkMessage::<NetfilterMessage>::deserialize(&answer[..len]).unwrap();
    let NetlinkPayload::Error(ack) = answer.payload else {
        panic!("{answer:?}")
    };
    assert_eq!(ack.code, None, "flush refused: {ack:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_reported_opened_then_closed_with_its_counts() {
    trellis_test_support::skip_unless_root!();
    let ns = namespace("fk-ct");
    track_connections(&ns);
    let (seen, _task) = listen(&ns);
    assert_eq!(
        trellis_netns::sysctl::read(Some(&ns), "net/netfilter/nf_conntrack_acct").unwrap(),
        "1",
        "accounting on, for the counts"
    );
    let (client, server) = ns
        .run(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let server = listener.local_addr().unwrap();
            let mut client = TcpStream::connect(server).unwrap();
            let (mut accepted, _) = listener.accept().unwrap();
            client.write_all(&[7u8; 1000]).unwrap();
            let mut got = [0u8; 1000];
            accepted.read_exact(&mut got).unwrap();
            accepted.write_all(b"thanks").unwrap();
            let mut reply = [0u8; 6];
            client.read_exact(&mut reply).unwrap();
            (client.local_addr().unwrap(), server)
        })
        .unwrap();
    let ours = |event: &ConntrackEvent| {
        event.original.protocol == L4Protocol::Tcp
            && SocketAddr::new(event.original.source, event.original.source_port) == client
            && SocketAddr::new(event.original.destination, event.original.destination_port)
                == server
    };
    let opened = eventually_async("the new connection's event", Duration::from_secs(5), || {
        let found = seen.conntrack(|e| ours(e) && e.kind == ConntrackEventKind::New);
        async move { found.into_iter().next() }
    })
    .await;
    assert_eq!(opened.reply.source_port, server.port());
    assert_eq!(opened.reply.destination_port, client.port());
    assert_eq!(opened.counters, None);
    // Closed (both ends dropped when the namespace thread returned). Conntrack removes a
    // closed connection's entry after TIME_WAIT, when its garbage collector next passes (up to
    // a minute on a busy host): flushed here instead, as `conntrack -F` does, which removes it
    // at once with the same event.
    flush_conntrack(&ns);
    let closed = eventually_async(
        "the closed connection's event",
        Duration::from_secs(30),
        || {
            let found = seen.conntrack(|e| ours(e) && e.kind == ConntrackEventKind::Destroy);
            async move { found.into_iter().next() }
        },
    )
    .await;
    assert_eq!(closed.reply, opened.reply);
    assert!(closed.time >= opened.time);
    let counters = closed.counters.expect("counts, with accounting on");
    // The handshake, 1,000 bytes, the FIN; and "thanks" back.
    assert!(counters.packets_sent >= 3, "{counters:?}");
    assert!(counters.bytes_sent > 1000, "{counters:?}");
    assert!(counters.packets_received >= 2, "{counters:?}");
    assert!(counters.bytes_received > 6, "{counters:?}");
    assert_eq!(seen.lost_conntrack.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_drops_name_their_drop_point_and_packet() {
    trellis_test_support::skip_unless_root!();
    let ns = namespace("fk-log");
    let pod_chain = DropPoint::PodChain {
        direction: Direction::Egress,
        chain: "pod_eg_10_0_0_1".into(),
    };
    let isolated = DropPoint::Isolated {
        direction: Direction::Ingress,
    };
    nft(
        &ns,
        &format!(
            "table inet t {{\n\tchain out {{ type filter hook output priority 0;\n\
             \t\tudp dport 9999 log prefix \"{}\" group {NFLOG_GROUP} drop\n\
             \t\ttcp dport 9998 log prefix \"{}\" group {NFLOG_GROUP} drop\n\
             \t\tudp dport 9997 log prefix \"someone else's\" group {NFLOG_GROUP} drop\n\
             \t}}\n}}\n",
            pod_chain.nflog_prefix(),
            isolated.nflog_prefix()
        ),
    );
    let (seen, _task) = listen(&ns);
    let udp_source = ns
        .run(|| {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            // Refused locally (EPERM): the drop is what counts.
            let _ = socket.send_to(b"probe", "127.0.0.1:9997");
            let _ = socket.send_to(b"probe", "127.0.0.1:9999");
            let _ = TcpStream::connect_timeout(
                &"127.0.0.1:9998".parse().unwrap(),
                Duration::from_millis(500),
            );
            socket.local_addr().unwrap()
        })
        .unwrap();
    let udp = eventually_async("the logged UDP drop", Duration::from_secs(5), || {
        let found = seen.drops(|d| d.packet.protocol == L4Protocol::Udp);
        async move { found.into_iter().next() }
    })
    .await;
    assert_eq!(udp.point, pod_chain);
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(
        (udp.packet.source, udp.packet.destination),
        (loopback, loopback)
    );
    assert_eq!(
        (udp.packet.source_port, udp.packet.destination_port),
        (udp_source.port(), 9999)
    );
    assert_eq!(udp.tcp_flags, None);
    let syn = eventually_async("the logged TCP SYN", Duration::from_secs(5), || {
        let found = seen.drops(|d| d.packet.protocol == L4Protocol::Tcp);
        async move { found.into_iter().next() }
    })
    .await;
    assert_eq!(syn.point, isolated);
    assert_eq!(syn.packet.destination_port, 9998);
    let flags = syn.tcp_flags.unwrap();
    assert!(flags.syn && !flags.ack, "{flags:?}");
    // The foreign prefix's packet was logged too, and neither reported nor counted as lost.
    assert!(
        seen.drops(|d| d.packet.destination_port == 9997).is_empty(),
        "another rule's log is not ours"
    );
    assert_eq!(seen.lost_nflog.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_table_logs_its_drops_where_they_happen() {
    trellis_test_support::skip_unless_root!();
    // Pods 0 and 1 known to the node, pod 1 isolated for ingress with nothing allowed; pod 2
    // unknown.
    let rig = policy_rig::Rig::new("fk-pol", 3);
    let (pod0, pod1, pod2) = (&rig.pods[0], &rig.pods[1], &rig.pods[2]);
    let chain = trellis_core::policy::names::pod_chain(pod1.v4(), Direction::Ingress);
    let mut ruleset = Ruleset::default();
    ruleset.chains.insert(
        chain.clone(),
        vec![Rule {
            matches: vec![],
            verdict: Verdict::Drop {
                direction: Direction::Ingress,
            },
            comment: None,
        }],
    );
    ruleset.ingress.insert(pod1.v4(), chain.clone());
    ruleset.local_pods = [pod0.v4(), pod1.v4()].into();
    let logged = RenderOptions { log_drops: true };
    nft(&rig.node, &nft::render_full_with(&ruleset, logged).unwrap());
    let (seen, _task) = listen(&rig.node);

    let _listener = pod1.tcp_listener(pod1.v4(), 80);
    assert!(!pod0.tcp_connects(pod1.v4(), 80), "denied");
    let denied = eventually_async("the denied SYN", Duration::from_secs(5), || {
        let found = seen.drops(|d| d.packet.destination == pod1.v4());
        async move { found.into_iter().next() }
    })
    .await;
    assert_eq!(
        denied.point,
        DropPoint::PodChain {
            direction: Direction::Ingress,
            chain
        }
    );
    assert_eq!(denied.packet.source, pod0.v4());
    assert_eq!(denied.packet.destination_port, 80);
    assert!(denied.tcp_flags.unwrap().syn);

    let _unknown_listener = pod0.tcp_listener(pod0.v4(), 81);
    assert!(!pod2.tcp_connects(pod0.v4(), 81), "from an unknown pod");
    let unknown = eventually_async("the unknown pod's drop", Duration::from_secs(5), || {
        let found = seen.drops(|d| d.packet.source == pod2.v4());
        async move { found.into_iter().next() }
    })
    .await;
    assert_eq!(
        unknown.point,
        DropPoint::UnknownPod {
            direction: Direction::Egress
        },
        "dropped leaving the unknown pod"
    );
    assert_eq!(unknown.packet.destination_port, 81);
    // To the unknown pod: its ingress chain drops it, and says so.
    let _to_unknown_listener = pod2.tcp_listener(pod2.v4(), 83);
    assert!(!pod0.tcp_connects(pod2.v4(), 83), "to an unknown pod");
    let to_unknown = eventually_async(
        "the drop to the unknown pod",
        Duration::from_secs(5),
        || {
            let found = seen.drops(|d| d.packet.destination == pod2.v4());
            async move { found.into_iter().next() }
        },
    )
    .await;
    assert_eq!(
        to_unknown.point,
        DropPoint::UnknownPod {
            direction: Direction::Ingress
        }
    );
    assert_eq!(
        (to_unknown.packet.source, to_unknown.packet.destination_port),
        (pod0.v4(), 83)
    );

    // An allowed connection (pod 1 to pod 0: neither isolated that way) is a new conntrack
    // connection, not a drop.
    let _allowed_listener = pod0.tcp_listener(pod0.v4(), 82);
    assert!(pod1.tcp_connects(pod0.v4(), 82));
    eventually_async(
        "the allowed connection's event",
        Duration::from_secs(5),
        || {
            let found = seen.conntrack(|e| {
                e.kind == ConntrackEventKind::New
                    && e.original.source == pod1.v4()
                    && e.original.destination_port == 82
            });
            async move { found.into_iter().next() }
        },
    )
    .await;
    assert!(seen.drops(|d| d.packet.destination_port == 82).is_empty());
    // The refill with logging off takes the clauses away (the kernel takes both scripts).
    let existing = trellis_gateway::policy::kernel::existing(Some(&rig.node))
        .unwrap()
        .unwrap();
    nft(
        &rig.node,
        &nft::render_replace_with(&existing, &ruleset, RenderOptions::default()).unwrap(),
    );
    assert!(!rig.nft_list().contains(" log "), "{}", rig.nft_list());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_denied_packets_reaches_userspace_at_the_log_rate_and_is_all_dropped() {
    trellis_test_support::skip_unless_root!();
    const FLOOD: u64 = 20_000;
    // Pod 1 isolated for ingress with nothing allowed; pod 0 floods it with UDP.
    let rig = policy_rig::Rig::new("fk-flood", 2);
    let (pod0, pod1) = (&rig.pods[0], &rig.pods[1]);
    let chain = trellis_core::policy::names::pod_chain(pod1.v4(), Direction::Ingress);
    let mut ruleset = Ruleset::default();
    ruleset.chains.insert(
        chain.clone(),
        vec![Rule {
            matches: vec![],
            verdict: Verdict::Drop {
                direction: Direction::Ingress,
            },
            comment: None,
        }],
    );
    ruleset.ingress.insert(pod1.v4(), chain);
    ruleset.local_pods = [pod0.v4(), pod1.v4()].into();
    nft(
        &rig.node,
        &nft::render_full_with(&ruleset, RenderOptions { log_drops: true }).unwrap(),
    );
    let (seen, _task) = listen(&rig.node);
    let flooder = pod0
        .ns
        .run(|| UdpSocket::bind(SocketAddr::new(pod0.v4(), 0)))
        .unwrap()
        .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..FLOOD {
        let _ = flooder.send_to(b"flood", SocketAddr::new(pod1.v4(), 9000));
    }
    eventually_async(
        "every packet dropped and counted",
        Duration::from_secs(10),
        || {
            let dropped = trellis_gateway::nft::counters(Some(&rig.node), nft::TABLE).unwrap()
                [nft::COUNTER_DROP_INGRESS];
            async move { (dropped >= FLOOD).then_some(()) }
        },
    )
    .await;
    let flooded_for = started.elapsed().as_secs_f64();
    // NFLOG delivers in order: once a later drop is read, the flood's logged ones all were
    // (or were counted lost).
    let _listener = pod1.tcp_listener(pod1.v4(), 9999);
    assert!(!pod0.tcp_connects(pod1.v4(), 9999));
    eventually_async("the drop after the flood", Duration::from_secs(5), || {
        let found = seen.drops(|d| d.packet.destination_port == 9999);
        async move { found.into_iter().next() }
    })
    .await;
    let logged = seen.drops(|d| d.packet.destination_port == 9000).len() as u64
        + seen.lost_nflog.load(Ordering::Relaxed);
    let rate = f64::from(nft::DROP_LOG_RATE);
    let most = (rate + rate * flooded_for) as u64 + 100;
    assert!(logged > 0, "the flood was logged");
    assert!(
        logged <= most,
        "{logged} of {FLOOD} dropped packets reached userspace in {flooded_for:.2} s (at most {most})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_is_delivered_or_counted_lost() {
    trellis_test_support::skip_unless_root!();
    const CONNECTIONS: usize = 2_000;
    let ns = namespace("fk-burst");
    track_connections(&ns);
    let (seen, _task) = listen(&ns);
    let server = ns
        .run(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let server = listener.local_addr().unwrap();
            // The kernel completes each handshake; closing the client right away makes a
            // connection of a SYN, a FIN and a reset.
            std::thread::spawn(move || {
                for stream in listener.incoming().take(CONNECTIONS) {
                    drop(stream);
                }
            });
            server
        })
        .unwrap();
    let started = std::time::Instant::now();
    ns.run(|| {
        for _ in 0..CONNECTIONS {
            drop(TcpStream::connect(server).unwrap());
        }
    })
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the burst took {:?}",
        started.elapsed()
    );
    let opened = || {
        seen.conntrack(|e| {
            e.kind == ConntrackEventKind::New && e.original.destination_port == server.port()
        })
        .len()
    };
    // Every connection reported, or what was not counted as lost; within seconds, the
    // reader keeping up rather than stalling.
    let delivered = eventually_async("the burst's events", Duration::from_secs(10), || {
        let (opened, lost) = (opened(), seen.lost_conntrack.load(Ordering::Relaxed));
        async move { (opened == CONNECTIONS || lost > 0).then_some(opened) }
    })
    .await;
    let lost = seen.lost_conntrack.load(Ordering::Relaxed);
    eprintln!("{delivered} of {CONNECTIONS} new connections reported, {lost} losses counted");
    assert!(delivered <= CONNECTIONS);
    assert!(delivered > 0);
}
