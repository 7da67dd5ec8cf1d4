//! The node's policy table (`trellis_core::policy::nft`) in the kernel, against pods in
//! namespaces of their own wired to a node namespace by `trl*` veths (as the CNI plugin does):
//! every rendered script is taken by the real `nft`, and the table does what its documentation
//! says: egress then ingress, an accept in the egress base chain not stopping the ingress one,
//! unknown pods dropped, the node's own traffic never filtered, IPv6 neighbour discovery
//! passing; updates under load never let a denied packet through. Runs as root.

mod policy_rig;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use policy_rig::*;
use trellis_core::cluster::Protocol;
use trellis_core::policy::nft::{self, TABLE};
use trellis_core::policy::ruleset::{
    AddressSet, Direction, Family, Match, Rule, Ruleset, ServiceSet, Verdict,
};

fn set(family: Family, members: &[IpAddr]) -> AddressSet {
    AddressSet {
        family,
        elements: members.iter().map(|a| ipnet::IpNet::from(*a)).collect(),
    }
}

fn rule(matches: Vec<Match>, verdict: Verdict) -> Rule {
    Rule {
        matches,
        verdict,
        comment: Some(format!("test \"rule\" {}", "x".repeat(200))),
    }
}

fn tcp(port: u16) -> Vec<Match> {
    vec![
        Match::Protocol {
            protocol: Protocol::Tcp,
        },
        Match::DestinationPorts {
            ranges: vec![(port, port)],
        },
    ]
}

fn udp(port: u16) -> Vec<Match> {
    vec![
        Match::Protocol {
            protocol: Protocol::Udp,
        },
        Match::DestinationPorts {
            ranges: vec![(port, port)],
        },
    ]
}

const DROP_IN: Verdict = Verdict::Drop {
    direction: Direction::Ingress,
};
const DROP_OUT: Verdict = Verdict::Drop {
    direction: Direction::Egress,
};

/// B (pod 1) isolated for ingress: TCP 80 from A (pod 0) only, both families, and from A to
/// B's named port (UDP 5353, by service set). A isolated for egress: UDP 53, TCP 80 and the
/// named ports of the service set only. C (pod 2) unknown to the ruleset.
fn first_ruleset(rig: &Rig) -> Ruleset {
    let [a, b, _c] = [&rig.pods[0], &rig.pods[1], &rig.pods[2]];
    let mut r = Ruleset::default();
    r.address_sets
        .insert("from_a".into(), set(Family::Ipv4, &[a.v4()]));
    r.address_sets
        .insert("from_a6".into(), set(Family::Ipv6, &[a.v6()]));
    let mut from_a = vec![Match::SourceIn {
        set: "from_a".into(),
    }];
    from_a.extend(tcp(80));
    let mut from_a6 = vec![Match::SourceIn {
        set: "from_a6".into(),
    }];
    from_a6.extend(tcp(80));
    r.service_sets.insert(
        "named".into(),
        ServiceSet {
            family: Family::Ipv4,
            elements: [(b.v4(), Protocol::Udp, 5353), (b.v4(), Protocol::Sctp, 9)].into(),
        },
    );
    let named = Match::DestinationServiceIn {
        set: "named".into(),
    };
    let named_from_a = vec![
        Match::SourceIn {
            set: "from_a".into(),
        },
        named.clone(),
    ];
    r.chains.insert(
        "b_in".into(),
        vec![
            rule(from_a, Verdict::Accept),
            rule(from_a6, Verdict::Accept),
            rule(named_from_a, Verdict::Accept),
            rule(vec![], DROP_IN),
        ],
    );
    r.chains.insert(
        "a_out".into(),
        vec![
            rule(udp(53), Verdict::Accept),
            rule(tcp(80), Verdict::Accept),
            rule(vec![named], Verdict::Accept),
            rule(vec![], DROP_OUT),
        ],
    );
    for address in [b.v4(), b.v6()] {
        r.ingress.insert(address, "b_in".into());
    }
    for address in [a.v4(), a.v6()] {
        r.egress.insert(address, "a_out".into());
    }
    r.local_pods.extend([a.v4(), a.v6(), b.v4(), b.v6()]);
    r
}

fn counters(rig: &Rig) -> BTreeMap<String, u64> {
    trellis_gateway::nft::counters(Some(&rig.node), TABLE).unwrap()
}

/// Applies `new` by the difference from `old`, which nft must take.
fn update(rig: &Rig, old: &Ruleset, new: &Ruleset) {
    let script = nft::render_update(old, new).unwrap().expect("a change");
    assert!(!script.contains("delete table"), "{script}");
    if let Err(e) = trellis_gateway::nft::apply(Some(&rig.node), &script) {
        panic!("nft refused the update: {e}\n{script}");
    }
}

#[test]
fn the_table_filters_egress_then_ingress_and_updates_are_taken_by_nft() {
    trellis_test_support::skip_unless_root!();
    let rig = Rig::new("pol-rules", 3);
    let (a, b, c) = (&rig.pods[0], &rig.pods[1], &rig.pods[2]);
    let first = first_ruleset(&rig);
    trellis_gateway::nft::apply(Some(&rig.node), &nft::render_full(&first).unwrap()).unwrap();
    // Replacing it again is one transaction too (a restarted agent).
    trellis_gateway::nft::apply(Some(&rig.node), &nft::render_full(&first).unwrap()).unwrap();

    let _b80 = b.tcp_listener(b.v4(), 80);
    let _b80v6 = b.tcp_listener(b.v6(), 80);
    let _b81 = b.tcp_listener(b.v4(), 81);
    assert!(
        a.tcp_connects(b.v4(), 80),
        "A -> B TCP 80 allowed both ways"
    );
    assert!(
        a.tcp_connects(b.v6(), 80),
        "over IPv6 too (neighbour discovery passes)"
    );
    assert!(!a.tcp_connects(b.v4(), 81), "B's ingress allows 80 only");

    let before = counters(&rig);
    assert!(!a.udp_reaches(b, b.v4(), 9000), "A's egress drops UDP 9000");
    let after = counters(&rig);
    assert!(after["drop_egress"] > before["drop_egress"], "{after:?}");

    // A's egress accepts UDP 53; B's ingress (the next base chain) still drops it.
    let before = after;
    assert!(!a.udp_reaches(b, b.v4(), 53));
    let after = counters(&rig);
    assert!(
        after["drop_ingress"] > before["drop_ingress"]
            && after["drop_egress"] == before["drop_egress"],
        "accepted by egress, dropped by ingress: {before:?} -> {after:?}"
    );

    assert!(
        a.udp_reaches(b, b.v4(), 5353),
        "B's named port, by (address, protocol, port) both ways"
    );
    assert!(!a.udp_reaches(b, b.v4(), 5354));
    assert!(
        b.udp_reaches(a, a.v4(), 7000),
        "B is not egress-isolated, A not ingress-isolated"
    );
    assert!(b.udp_reaches(a, a.v6(), 7000));

    let before = counters(&rig);
    assert!(!c.udp_reaches(a, a.v4(), 7000), "C is unknown: dropped");
    assert!(!b.udp_reaches(c, c.v4(), 7000), "and so is what goes to it");
    let after = counters(&rig);
    assert!(
        after["drop_unknown_pod"] >= before["drop_unknown_pod"] + 2,
        "{after:?}"
    );

    // The node's own traffic is never filtered (kubelet probes), nor are the replies.
    assert!(
        rig.node_tcp_connects(b.v4(), 81),
        "node -> B on a port B's policy does not allow"
    );
    // A pod talking to its node is subject to its egress policy (hook input).
    assert!(!a.udp_reaches_node(&rig, a.gateway_v4(), 9999));

    // Updates, each taken by nft as one transaction, each changing behaviour as it says.
    // 1. B's chain changes (flushed and refilled): UDP 53 from A allowed too.
    let mut second = first.clone();
    let mut udp_from_a = vec![Match::SourceIn {
        set: "from_a".into(),
    }];
    udp_from_a.extend(udp(53));
    second
        .chains
        .get_mut("b_in")
        .unwrap()
        .insert(0, rule(udp_from_a, Verdict::Accept));
    update(&rig, &first, &second);
    assert!(a.udp_reaches(b, b.v4(), 53));

    // 2. C becomes known; A's egress isolation goes (its map entries, then its chain).
    let mut third = second.clone();
    third.local_pods.extend([c.v4(), c.v6()]);
    third.egress.clear();
    third.chains.remove("a_out");
    update(&rig, &second, &third);
    assert!(c.udp_reaches(a, a.v4(), 7000), "C known now");
    assert!(
        a.udp_reaches(c, c.v4(), 9000),
        "A no longer egress-isolated"
    );

    // 3. C isolated for ingress through a new chain naming a new set (B only); the IPv6 set
    //    goes with the rule naming it.
    let mut fourth = third.clone();
    fourth
        .address_sets
        .insert("from_b".into(), set(Family::Ipv4, &[b.v4()]));
    let mut from_b = vec![Match::SourceIn {
        set: "from_b".into(),
    }];
    from_b.extend(udp(7000));
    fourth.chains.insert(
        "c_in".into(),
        vec![rule(from_b, Verdict::Accept), rule(vec![], DROP_IN)],
    );
    fourth.ingress.insert(c.v4(), "c_in".into());
    fourth.address_sets.remove("from_a6");
    fourth.chains.get_mut("b_in").unwrap().remove(2);
    update(&rig, &third, &fourth);
    assert!(b.udp_reaches(c, c.v4(), 7000));
    assert!(!a.udp_reaches(c, c.v4(), 7000));
    assert!(!a.tcp_connects(b.v6(), 80), "the IPv6 rule went");

    // 4. A set's members change: B's ingress from A turns into from C (elements only).
    let mut fifth = fourth.clone();
    fifth
        .address_sets
        .insert("from_a".into(), set(Family::Ipv4, &[c.v4()]));
    let script = nft::render_update(&fourth, &fifth).unwrap().unwrap();
    assert!(!script.contains("chain"), "elements only: {script}");
    update(&rig, &fourth, &fifth);
    assert!(c.tcp_connects(b.v4(), 80));
    assert!(!a.tcp_connects(b.v4(), 80));

    // 5. A set of single addresses (a hash set) gets a prefix (an interval set): the table is
    //    refilled in one transaction, not deleted.
    let mut sixth = fifth.clone();
    sixth.address_sets.insert(
        "from_b".into(),
        AddressSet {
            family: Family::Ipv4,
            elements: ["10.70.1.0/24".parse().unwrap()].into(),
        },
    );
    let script = nft::render_update(&fifth, &sixth).unwrap().unwrap();
    assert!(script.contains("flush table"), "{script}");
    update(&rig, &fifth, &sixth);
    assert!(b.udp_reaches(c, c.v4(), 7000));
    assert!(!a.udp_reaches(c, c.v4(), 7000));

    // 6. All the way back in one update.
    update(&rig, &sixth, &first);
    assert!(a.tcp_connects(b.v4(), 80));
    assert!(!c.udp_reaches(a, a.v4(), 7000));
    let listed = rig.nft_list();
    assert!(
        !listed.contains("c_in") && !listed.contains("from_b"),
        "{listed}"
    );

    // Enforcement off: the table goes, everything passes.
    trellis_gateway::nft::apply(Some(&rig.node), &nft::render_delete()).unwrap();
    assert!(c.udp_reaches(a, a.v4(), 7000));
    trellis_gateway::nft::apply(Some(&rig.node), &nft::render_delete()).unwrap();
}

#[test]
fn updates_under_load_never_let_a_denied_packet_through() {
    trellis_test_support::skip_unless_root!();
    let rig = Rig::new("pol-atomic", 3);
    let (a, b, c) = (&rig.pods[0], &rig.pods[1], &rig.pods[2]);
    // B denies A (by set) and accepts the rest.
    let base = |generation: u32| {
        let mut r = Ruleset::default();
        r.address_sets
            .insert("denied".into(), set(Family::Ipv4, &[a.v4()]));
        let mut from_a = vec![Match::SourceIn {
            set: "denied".into(),
        }];
        from_a.extend(udp(6000));
        // The same chain changed (flushed and refilled in the transaction), or B moved to
        // another chain (a new chain, the map entry replaced, the old chain deleted).
        let chain = if generation % 4 < 2 {
            "b_in".to_string()
        } else {
            format!("b_alt_{}", generation % 2)
        };
        r.chains.insert(
            chain.clone(),
            vec![
                Rule {
                    matches: from_a,
                    verdict: DROP_IN,
                    comment: Some(format!("generation {generation}")),
                },
                rule(vec![], Verdict::Accept),
            ],
        );
        r.ingress.insert(b.v4(), chain);
        r.local_pods.extend([a.v4(), b.v4(), c.v4()]);
        r.chains
            .insert("spare".into(), vec![rule(vec![], Verdict::Accept)]);
        // Unrelated churn: other pods coming and going in the sets and local pods.
        for i in 0..(generation % 7) * 20 {
            let other: IpAddr = format!("10.99.{}.{}", i / 200, i % 200 + 1)
                .parse()
                .unwrap();
            r.local_pods.insert(other);
            r.address_sets
                .get_mut("denied")
                .unwrap()
                .elements
                .insert(other.into());
        }
        r
    };
    let mut applied = base(0);
    trellis_gateway::nft::apply(Some(&rig.node), &nft::render_full(&applied).unwrap()).unwrap();
    let denied = b.udp_socket(b.v4(), 6000);
    let allowed = b.udp_socket(b.v4(), 6001);
    let stop = Arc::new(AtomicBool::new(false));
    let probes = {
        let stop = stop.clone();
        let (a_ns, c_ns) = (a.ns_path(), c.ns_path());
        let target = b.v4();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                // A fresh socket per datagram: each one a new flow conntrack has not seen.
                send_udp_from(&a_ns, target, 6000);
                send_udp_from(&c_ns, target, 6001);
                sent += 1;
            }
            sent
        })
    };
    let started = Instant::now();
    let mut updates = 0;
    let mut replaces = 0;
    for generation in 1..=120u32 {
        let next = base(generation);
        if generation % 10 == 0 {
            // What a restarted agent does with the table it finds: empty and refill it.
            let existing = trellis_gateway::policy::kernel::existing(Some(&rig.node))
                .unwrap()
                .unwrap();
            let script = nft::render_replace(&existing, &next).unwrap();
            trellis_gateway::nft::apply(Some(&rig.node), &script).unwrap();
            replaces += 1;
        } else {
            update(&rig, &applied, &next);
            updates += 1;
        }
        applied = next;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = probes.join().unwrap();
    let leaked = drain(&denied);
    let passed = drain(&allowed);
    eprintln!(
        "{updates} updates and {replaces} replaces in {:?} under {sent} probe pairs: {leaked} denied datagrams through, {passed} allowed ones",
        started.elapsed()
    );
    assert!(sent > 100, "the probes ran throughout ({sent})");
    assert!(passed > 0, "allowed traffic flowed");
    assert_eq!(leaked, 0, "a denied datagram got through during an update");
}
