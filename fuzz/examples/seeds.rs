//! Writes the seed corpora under `fuzz/seeds/<target>/` from real inputs: frames from the
//! crate's own encoders, DNS queries from hickory-proto, WireGuard messages from boringtun,
//! TSO/USO super-packets built the way gateway/src/offload_tests.rs builds them, and CNI
//! configs and environments like the runtimes' (cni/tests). Run from `fuzz/`:
//! `cargo +nightly run --example seeds`; the output is committed.

use std::fs;
use std::path::Path;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as WgPublic, StaticSecret};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use trellis_core::agent::{
    AgentHello, AgentReport, GatewayDesired, GatewayRegistration, GatewayUpdate, PeerSpec,
    RouteSpec, RouteVia,
};
use trellis_core::cluster::{ServiceKey, fixture};
use trellis_core::imports::Imports;
use trellis_core::framing::encode_json_frame;
use trellis_core::peering::{Message as PeeringMessage, encode_frame};
use trellis_core::status::{GatewayReport, TunnelStatus};
use trellis_core::wgkey::PublicKey;
use trellis_gateway::offload::{
    F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VNET_HDR_LEN, VnetHdr,
};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

/// A stream seed: the chunk size byte the stream targets read first, then the frames.
fn stream(step: u8, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![step];
    for frame in frames {
        out.extend_from_slice(frame);
    }
    out
}

fn peering() {
    let a = fixture::cluster("a", "10.1.0.0/24", "10.96.0.0/16");
    let mut b = fixture::cluster("b", "10.2.0.0/24", "10.97.0.0/16");
    b.services.insert(
        ServiceKey::new("shop", "web"),
        fixture::service("shop", "web", "10.97.0.10", &["10.2.0.5", "10.2.0.6"]),
    );
    let mut next = b.clone();
    next.revision = 1;
    next.services.insert(
        ServiceKey::new("shop", "db"),
        fixture::service("shop", "db", "10.97.0.11", &["10.2.0.7"]),
    );
    next.nodes.remove("node-0");
    let delta = b.delta_to(&next).unwrap();
    let max = 1 << 20;
    let hello = encode_frame(
        &PeeringMessage::Hello {
            cluster: fixture::id("b"),
            name: "cluster b".into(),
        },
        max,
    )
    .unwrap();
    let snapshot = encode_frame(&PeeringMessage::Snapshot { state: b }, max).unwrap();
    let delta = encode_frame(&PeeringMessage::Delta { delta }, max).unwrap();
    let heartbeat = encode_frame(&PeeringMessage::Heartbeat { revision: 1 }, max).unwrap();
    write(
        "peering_frames",
        "session",
        &stream(200, &[hello.clone(), snapshot.clone(), delta, heartbeat]),
    );
    write(
        "peering_frames",
        "session-bytewise",
        &stream(1, &[hello, snapshot]),
    );
    // A peer enforcing NetworkPolicy: an identity, its pod and a spoofed one (at a's
    // address), then a relabel as a delta.
    let mut policy = fixture::cluster("b", "10.2.0.0/24", "10.97.0.0/16");
    let identity = |number: u32, pod: &str| trellis_core::policy::Identity {
        key: trellis_core::policy::IdentityKey {
            cluster: fixture::id("b"),
            number,
        },
        labels: trellis_core::policy::IdentityLabels {
            namespace: "x".into(),
            pod_labels: [("pod".to_owned(), pod.to_owned())].into(),
            namespace_labels: [("kubernetes.io/metadata.name".to_owned(), "x".to_owned())]
                .into(),
        },
    };
    let pod = |name: &str, address: &str, number: u32| trellis_core::policy::PolicyEndpoint {
        cluster: fixture::id("b"),
        namespace: "x".into(),
        name: name.into(),
        addresses: vec![address.parse().unwrap()],
        node: "node-0".into(),
        identity: number,
        named_ports: vec![trellis_core::policy::NamedPort {
            name: "serve-80".into(),
            protocol: Default::default(),
            port: 80,
        }],
    };
    policy.identities.insert(identity(1, "a").key.clone(), identity(1, "a"));
    for p in [pod("a", "10.2.0.5", 1), pod("spoof", "10.1.0.5", 1)] {
        policy.pods.insert(trellis_core::keyed::Keyed::key(&p), p);
    }
    let mut relabelled = policy.clone();
    relabelled.revision = 1;
    relabelled.identities.insert(identity(2, "b").key.clone(), identity(2, "b"));
    relabelled
        .pods
        .insert(trellis_core::keyed::Keyed::key(&pod("a", "10.2.0.5", 2)), pod("a", "10.2.0.5", 2));
    let policy_delta = policy.delta_to(&relabelled).unwrap();
    let hello_b = encode_frame(
        &PeeringMessage::Hello {
            cluster: fixture::id("b"),
            name: "cluster b".into(),
        },
        max,
    )
    .unwrap();
    write(
        "peering_frames",
        "session-policy",
        &stream(
            128,
            &[
                hello_b,
                encode_frame(&PeeringMessage::Snapshot { state: policy }, max).unwrap(),
                encode_frame(&PeeringMessage::Delta { delta: policy_delta }, max).unwrap(),
            ],
        ),
    );
    // A peer exporting MCS properties: one service as Kubernetes would accept it, one with an
    // annotation far over the bound and a label the API server would refuse.
    let mut props = fixture::cluster("b", "10.2.0.0/24", "10.97.0.0/16");
    let mut fine = fixture::service("shop", "web", "10.97.0.10", &["10.2.0.5"]);
    fine.properties = trellis_core::cluster::ExportProperties {
        exported_at: Some(1_700_000_000),
        session_affinity: Some("ClientIP".into()),
        session_affinity_timeout: Some(600),
        internal_traffic_policy: Some("Local".into()),
        traffic_distribution: Some("PreferClose".into()),
        ip_families: vec!["IPv4".into()],
        labels: [("app.kubernetes.io/name".to_owned(), "web".to_owned())].into(),
        annotations: [("example.com/owner".to_owned(), "team-a".to_owned())].into(),
    };
    fine.ports[0].app_protocol = Some("kubernetes.io/h2c".into());
    let mut bad = fixture::service("shop", "bad", "10.97.0.11", &["10.2.0.6"]);
    bad.properties.annotations = [("a".to_owned(), "x".repeat(5000))].into();
    bad.properties.labels = [("no spaces".to_owned(), "v".to_owned())].into();
    for svc in [fine, bad] {
        props.services.insert(svc.key(), svc);
    }
    let hello_props = encode_frame(
        &PeeringMessage::Hello {
            cluster: fixture::id("b"),
            name: "cluster b".into(),
        },
        max,
    )
    .unwrap();
    write(
        "peering_frames",
        "session-properties",
        &stream(
            200,
            &[
                hello_props,
                encode_frame(&PeeringMessage::Snapshot { state: props }, max).unwrap(),
            ],
        ),
    );
    // The other side's own opening, as a session from "a" sends it.
    let own = encode_frame(&PeeringMessage::Snapshot { state: a }, max).unwrap();
    write("peering_frames", "snapshot-a", &stream(64, &[own]));
}

fn public_key(byte: u8) -> PublicKey {
    PublicKey([byte; 32])
}

fn agent() {
    let hello = AgentHello::gateway(
        GatewayRegistration {
            node: "node-0".into(),
            endpoint: "198.18.1.10:51820".parse().unwrap(),
            public_key: public_key(1),
        },
        Some("agent-token".into()),
    );
    let report = AgentReport::Gateway(GatewayReport {
        node: "node-0".into(),
        revision: 3,
        node_encryption: Some(true),
        peers: vec![TunnelStatus {
            cluster: "b".into(),
            node: "node-0".into(),
            public_key: public_key(2),
            endpoint: Some("198.18.2.10:51820".parse().unwrap()),
            last_handshake_age_seconds: Some(12),
            handshakes: 4,
            rx_bytes: 1 << 20,
            tx_bytes: 2 << 20,
        }],
        drops: [("no_route".to_string(), 3)].into_iter().collect(),
        policy: None,
    });
    let max = usize::MAX;
    let hello_frame = encode_json_frame(&hello, "hello", max).unwrap();
    let report_frame = encode_json_frame(&report, "report", max).unwrap();
    write(
        "agent_stream",
        "gateway",
        &stream(255, &[hello_frame, report_frame.clone(), report_frame]),
    );
    let dns = encode_json_frame(&AgentHello::dns(None), "hello", max).unwrap();
    write("agent_stream", "dns", &stream(3, &[dns]));
}

fn gateway_updates() {
    let peer = |cluster: &str, key: u8, ip: &str, net: &str| PeerSpec {
        cluster: fixture::id(cluster),
        node: "node-0".into(),
        public_key: public_key(key),
        endpoint: Some(format!("{ip}:51820").parse().unwrap()),
        allowed_ips: vec![net.parse().unwrap()],
        persistent_keepalive: Some(25),
        preshared_key: None,
    };
    let old = GatewayDesired {
        revision: 4,
        node: "node-0".into(),
        node_encryption: false,
        peers: vec![peer("b", 2, "198.18.2.10", "10.2.0.0/24")],
        routes: vec![
            RouteSpec {
                destination: "10.2.0.0/24".parse().unwrap(),
                via: RouteVia::Tunnel,
            },
            RouteSpec {
                destination: "10.1.1.0/24".parse().unwrap(),
                via: RouteVia::Node {
                    address: "192.168.1.12".parse().unwrap(),
                },
            },
        ],
        policy: None,
    };
    let mut new = old.clone();
    new.revision = 5;
    new.node_encryption = true;
    new.peers.push(peer("c", 3, "198.18.3.10", "fd00:3::/64"));
    new.routes.remove(1);
    let delta = old.delta_to(&new).unwrap();
    let frames = [
        encode_json_frame(&GatewayUpdate::Snapshot(old), "update", usize::MAX).unwrap(),
        encode_json_frame(&delta, "update", usize::MAX).unwrap(),
    ];
    write("gateway_update", "snapshot-delta", &stream(100, &frames));
}

fn imports() {
    let a = fixture::cluster("a", "10.1.0.0/24", "10.96.0.0/16");
    let mut b = fixture::cluster("b", "10.2.0.0/24", "10.97.0.0/16");
    let mut a2 = a.clone();
    a2.services.insert(
        ServiceKey::new("shop", "web"),
        fixture::service("shop", "web", "10.96.0.10", &["10.1.0.5"]),
    );
    b.services.insert(
        ServiceKey::new("shop", "web"),
        fixture::service("shop", "web", "10.97.0.10", &["10.2.0.5"]),
    );
    let first = Imports::build(&fixture::id("a"), [&a, &b], &Default::default(), 1);
    let second = Imports::build(&fixture::id("a"), [&a2, &b], &Default::default(), 2);
    let delta = first.delta_to(&second).unwrap();
    let frames = [
        encode_json_frame(
            &trellis_core::imports::ImportsUpdate::Snapshot(first),
            "imports",
            usize::MAX,
        )
        .unwrap(),
        encode_json_frame(&delta, "imports", usize::MAX).unwrap(),
    ];
    write("imports_update", "snapshot-delta", &stream(128, &frames));
    // Exports in conflict (an older headless one in b, a newer ClusterSetIP one with another
    // port in a), then a ClusterSetIP import with its VIP.
    let mut a3 = a.clone();
    let mut newer = fixture::service("shop", "web", "10.96.0.10", &["10.1.0.5"]);
    newer.properties.exported_at = Some(200);
    newer.ports[0].port = 8080;
    a3.services.insert(newer.key(), newer);
    let mut b3 = b.clone();
    let mut older = fixture::service("shop", "web", "10.97.0.10", &["10.2.0.5"]);
    older.properties.exported_at = Some(100);
    older.kind = trellis_core::cluster::ServiceKind::Headless;
    b3.services.insert(older.key(), older);
    let mut api = fixture::service("shop", "api", "10.97.0.12", &["10.2.0.8"]);
    api.properties.exported_at = Some(100);
    b3.services.insert(api.key(), api);
    let vips = [(ServiceKey::new("shop", "api"), vec!["10.255.0.7".parse().unwrap()])].into();
    let conflicted = Imports::build(&fixture::id("a"), [&a3, &b3], &vips, 1);
    write(
        "imports_update",
        "conflict-vips",
        &stream(
            128,
            &[encode_json_frame(
                &trellis_core::imports::ImportsUpdate::Snapshot(conflicted),
                "imports",
                usize::MAX,
            )
            .unwrap()],
        ),
    );
}

fn dns_query(name: &str, qtype: RecordType, edns: Option<u16>, id: u16) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn dns() {
    let queries = [
        (
            "a-web",
            "web.shop.svc.clusterset.local.",
            RecordType::A,
            None,
        ),
        (
            "aaaa-web-edns",
            "web.shop.svc.clusterset.local.",
            RecordType::AAAA,
            Some(1232),
        ),
        (
            "srv-http",
            "_http._tcp.web.shop.svc.clusterset.local.",
            RecordType::SRV,
            Some(4096),
        ),
        (
            "srv-big-plain",
            "_x._udp.big.bulk.svc.clusterset.local.",
            RecordType::SRV,
            None,
        ),
        (
            "a-host-mixed-case",
            "DB-0.East.Db.Shop.Svc.ClusterSet.Local.",
            RecordType::A,
            Some(512),
        ),
        (
            "srv-bare-name",
            "web.shop.svc.clusterset.local.",
            RecordType::SRV,
            None,
        ),
        (
            "nxdomain",
            "nope.shop.svc.clusterset.local.",
            RecordType::A,
            None,
        ),
        (
            "txt-nodata",
            "web.shop.svc.clusterset.local.",
            RecordType::TXT,
            Some(1232),
        ),
        ("soa-apex", "clusterset.local.", RecordType::SOA, None),
        ("forward", "example.com.", RecordType::A, Some(1232)),
        (
            "a-host-dashed",
            "fd00--9-3.east.db.shop.svc.clusterset.local.",
            RecordType::AAAA,
            None,
        ),
        (
            "txt-dns-version",
            "dns-version.clusterset.local.",
            RecordType::TXT,
            Some(1232),
        ),
        ("ptr-db-0", "1.0.9.10.in-addr.arpa.", RecordType::PTR, None),
    ];
    for (i, (name, qname, qtype, edns)) in queries.into_iter().enumerate() {
        let query = dns_query(qname, qtype, edns, 0x1000 + i as u16);
        write("dns_fast", name, &query);
        // dns_slow: a mode byte first (even: UDP, odd: TCP).
        let mut udp = vec![0u8];
        udp.extend_from_slice(&query);
        write("dns_slow", &format!("udp-{name}"), &udp);
        let mut tcp = vec![1u8];
        tcp.extend_from_slice(&query);
        write("dns_slow", &format!("tcp-{name}"), &tcp);
    }
    // EDNS version 1 (BADVERS) and a NOTIFY (NOTIMP), as some clients send them.
    let mut m = Message::new(7, MessageType::Query, OpCode::Notify);
    m.add_query(Query::query(
        Name::from_ascii("clusterset.local.").unwrap(),
        RecordType::SOA,
    ));
    let mut notify = vec![0u8];
    notify.extend_from_slice(&m.to_vec().unwrap());
    write("dns_slow", "udp-notify", &notify);
    let mut m = Message::new(8, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("web.shop.svc.clusterset.local.").unwrap(),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    m.set_edns(e);
    let mut badvers = vec![0u8];
    badvers.extend_from_slice(&m.to_vec().unwrap());
    write("dns_slow", "udp-badvers", &badvers);
}

/// A super-packet as the kernel hands it to an `IFF_VNET_HDR` TUN (after
/// gateway/src/offload_tests.rs): virtio header, one IP + TCP/UDP header, all the payload.
fn super_packet(v6: bool, udp: bool, payload_len: usize, gso_size: u16) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 + i / 251) as u8).collect();
    let ip_len = if v6 { 40 } else { 20 };
    let l4_len = if udp { 8 } else { 20 };
    let mut packet = vec![0u8; ip_len + l4_len];
    let protocol = if udp { 17 } else { 6 };
    if v6 {
        packet[0] = 0x60;
        packet[4..6].copy_from_slice(&((l4_len + payload_len) as u16).to_be_bytes());
        packet[6] = protocol;
        packet[7] = 64;
        packet[8] = 0xfd;
        packet[9] = 1;
        packet[23] = 5;
        packet[24] = 0xfd;
        packet[25] = 2;
        packet[39] = 7;
    } else {
        packet[0] = 0x45;
        let total = (ip_len + l4_len + payload_len).min(65535) as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        packet[8] = 64;
        packet[9] = protocol;
        packet[12..16].copy_from_slice(&[10, 1, 0, 5]);
        packet[16..20].copy_from_slice(&[10, 2, 0, 7]);
    }
    let l4 = &mut packet[ip_len..];
    l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&5201u16.to_be_bytes());
    if udp {
        l4[4..6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    } else {
        l4[4..8].copy_from_slice(&0xfff0_0000u32.to_be_bytes());
        l4[8..12].copy_from_slice(&77u32.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = 0x18 | 0x01; // PSH ACK FIN
        l4[14..16].copy_from_slice(&512u16.to_be_bytes());
    }
    packet.extend_from_slice(&payload);
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: match (udp, v6) {
            (true, _) => GSO_UDP_L4,
            (false, true) => GSO_TCPV6,
            (false, false) => GSO_TCPV4,
        },
        hdr_len: (ip_len + l4_len) as u16,
        gso_size,
        csum_start: ip_len as u16,
        csum_offset: if udp { 6 } else { 16 },
    };
    let mut read = [0u8; VNET_HDR_LEN];
    hdr.write(&mut read);
    let mut out = read.to_vec();
    out.extend_from_slice(&packet);
    out
}

fn split() {
    // The mtu byte first: 29 gives 576 + 29 * 32 = 1504 byte buffers (a 1500 MTU).
    let mtu_1500 = 29u8;
    for (name, v6, udp, len, gso) in [
        ("tcp4", false, false, 3500, 1000),
        ("tcp6", true, false, 2900, 1220),
        ("udp4", false, true, 3000, 1400),
        ("udp6", true, true, 1000, 1200),
    ] {
        let mut seed = vec![mtu_1500];
        seed.extend_from_slice(&super_packet(v6, udp, len, gso));
        write("gateway_split", name, &seed);
    }
    // A plain packet whose checksum the kernel left to us.
    let mut plain = super_packet(false, false, 300, 0);
    plain[1] = GSO_NONE;
    let mut seed = vec![mtu_1500];
    seed.extend_from_slice(&plain);
    write("gateway_split", "plain-needs-csum", &seed);
}

fn wireguard() {
    let secret = |b: u8| StaticSecret::from([b; 32]);
    let (a_secret, b_secret) = (secret(1), secret(2));
    let (a_public, b_public) = (WgPublic::from(&a_secret), WgPublic::from(&b_secret));
    let mut a = Tunn::new(a_secret, b_public, None, None, 1 << 8, None);
    let mut b = Tunn::new(b_secret, a_public, None, None, 2 << 8, None);
    let mut buf = vec![0u8; 2048];
    let mut reply = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false) else {
        panic!("no initiation");
    };
    let init = init.to_vec();
    write("gateway_demux", "handshake-init", &init);
    let TunnResult::WriteToNetwork(response) = b.decapsulate(None, &init, &mut reply) else {
        panic!("no response");
    };
    let response = response.to_vec();
    write("gateway_demux", "handshake-response", &response);
    let mut out = vec![0u8; 2048];
    if let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, &response, &mut out) {
        write("gateway_demux", "data-keepalive", keepalive);
    }
    let packet = &super_packet(false, false, 100, 0)[VNET_HDR_LEN..];
    if let TunnResult::WriteToNetwork(data) = a.encapsulate(packet, &mut out) {
        write("gateway_demux", "data", data);
    }
}

fn gro_gso() {
    // GRO: 4 x 1400 + 600 bytes; GSO: the kernel's limits, two endpoints, a short last one.
    let mut seed = Vec::new();
    seed.extend_from_slice(&6200u16.to_le_bytes());
    seed.extend_from_slice(&1400u16.to_le_bytes());
    seed.extend_from_slice(&[0, 0]);
    for (len, to) in [
        (1452u16, 0u8),
        (1452, 0),
        (1452, 0),
        (800, 0),
        (1452, 1),
        (92, 1),
    ] {
        seed.extend_from_slice(&len.to_le_bytes());
        seed.push(to);
    }
    write("gateway_gro_gso", "runs", &seed);
}

fn cni() {
    let configs: [(&str, &str); 5] = [
        (
            "dual-stack",
            r#"{"cniVersion":"1.1.0","name":"trellis","type":"trellis-cni","podCIDRs":["10.244.1.0/24","fd00:10:244:1::/64"],"mtu":1420,"dataDir":"/var/lib/cni/trellis"}"#,
        ),
        (
            "v4-runtime",
            r#"{"cniVersion":"1.0.0","name":"pods","type":"trellis-cni","podCIDRs":["10.244.1.0/24"],"mtu":1420,"dataDir":"/tmp/x"}"#,
        ),
        (
            "gc",
            r#"{"cniVersion":"1.1.0","name":"n","type":"trellis-cni","podCIDRs":["10.0.0.0/24"],"cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        ),
        (
            "prev-result",
            r#"{"cniVersion":"1.0.0","name":"pods","type":"trellis-cni","podCIDRs":["10.0.0.0/24"],"ipamLockTimeoutMs":2000,"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"lo","sandbox":"/var/run/netns/x"}],"ips":[{"address":"127.0.0.1/8","interface":0}],"routes":[{"dst":"0.0.0.0/0","gw":"10.0.0.1"}],"dns":{"nameservers":["10.96.0.10"],"search":["svc.cluster.local"]}}}"#,
        ),
        (
            "legacy",
            r#"{"cniVersion":"0.4.0","name":"pods","type":"trellis-cni","podCIDRs":["fd00::/120"],"mtu":1280}"#,
        ),
    ];
    for (name, config) in configs {
        write("cni_config", name, config.as_bytes());
    }
    let envs = [
        (
            "add",
            "CNI_COMMAND=ADD\nCNI_CONTAINERID=4f7c1d9e0b\nCNI_NETNS=/var/run/netns/cni-1234\nCNI_IFNAME=eth0\nCNI_ARGS=K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IgnoreUnknown=1\nCNI_PATH=/opt/cni/bin",
        ),
        (
            "del",
            "CNI_COMMAND=DEL\nCNI_CONTAINERID=4f7c1d9e0b\nCNI_IFNAME=eth0\nCNI_PATH=/opt/cni/bin",
        ),
        ("version", "CNI_COMMAND=VERSION"),
        ("gc", "CNI_COMMAND=GC\nCNI_PATH=/opt/cni/bin"),
    ];
    for (name, env) in envs {
        write("cni_env", name, env.as_bytes());
    }
}

fn main() {
    peering();
    agent();
    gateway_updates();
    imports();
    dns();
    split();
    wireguard();
    gro_gso();
    cni();
}
