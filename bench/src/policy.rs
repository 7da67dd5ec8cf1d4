//! How long the node's policy table takes to change when one pod changes, with few and with
//! many pods in its sets: the update script (`trellis_core::policy::nft::render_update`)
//! against replacing the whole table (`render_replace`, what a restarted agent does, and
//! `render_full`, creating it), each one `nft -f` transaction in a namespace of its own.
//! Times are `nft`'s (process start to exit: parse and kernel transaction), rendering apart.
//! Prints p50/p90 per size and the ratios.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::Context;
use trellis_core::cluster::Protocol;
use trellis_core::policy::nft;
use trellis_core::policy::ruleset::{AddressSet, Direction, Family, Match, Rule, Ruleset, Verdict};
use trellis_netns::testing::TempNetns;

use crate::stats::percentiles;

#[derive(clap::Args)]
pub struct Options {
    /// Pod counts (local and remote) in the sets, one table each.
    #[arg(long, value_delimiter = ',', default_value = "100,10000")]
    pods: Vec<u32>,
    /// Changes measured per kind and size.
    #[arg(long, default_value_t = 30)]
    repeats: u32,
}

/// Selector sets the pods are spread over.
const SELECTORS: u32 = 10;

fn pod(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + i))
}

/// Pods on the measured node: a node runs at most ~110 (the kubelet's default `maxPods`),
/// whatever the size of the mesh.
const LOCAL_PODS: u32 = 50;

/// `pods` pods, [`LOCAL_PODS`] of them (at most half) on this node, each isolated for ingress
/// by a chain allowing TCP 80 from one selector's set; every pod in one of the selector sets.
fn ruleset(pods: u32) -> Ruleset {
    let local = LOCAL_PODS.min(pods / 2);
    let mut r = Ruleset::default();
    for s in 0..SELECTORS {
        r.address_sets.insert(
            format!("sel_{s}"),
            AddressSet {
                family: Family::Ipv4,
                elements: BTreeSet::new(),
            },
        );
    }
    for i in 0..pods {
        r.address_sets
            .get_mut(&format!("sel_{}", i % SELECTORS))
            .expect("every selector set exists")
            .elements
            .insert(pod(i).into());
    }
    for i in 0..local {
        add_local(&mut r, i);
    }
    r
}

fn add_local(r: &mut Ruleset, i: u32) {
    let chain = format!("pod_{i}_in");
    r.chains.insert(
        chain.clone(),
        vec![
            Rule {
                matches: vec![
                    Match::SourceIn {
                        set: format!("sel_{}", i % SELECTORS),
                    },
                    Match::Protocol {
                        protocol: Protocol::Tcp,
                    },
                    Match::DestinationPorts {
                        ranges: vec![(80, 80)],
                    },
                ],
                verdict: Verdict::Accept,
                comment: Some(format!("x/allow-{i}")),
            },
            Rule {
                matches: vec![],
                verdict: Verdict::Drop {
                    direction: Direction::Ingress,
                },
                comment: None,
            },
        ],
    );
    r.ingress.insert(pod(i), chain);
    r.local_pods.insert(pod(i));
}

fn apply(ns: &TempNetns, script: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    trellis_gateway::nft::apply(Some(ns), script).context("nft refused the script")?;
    Ok(started.elapsed())
}

struct Row {
    pods: u32,
    remote_pod: Vec<Duration>,
    local_pod: Vec<Duration>,
    replace: Vec<Duration>,
    create: Vec<Duration>,
    update_bytes: usize,
    full_bytes: usize,
}

fn measure(pods: u32, repeats: u32) -> anyhow::Result<Row> {
    let ns = TempNetns::new("bench-policy")?;
    let base = ruleset(pods);
    let full = nft::render_full(&base)?;
    apply(&ns, &full)?;
    let mut row = Row {
        pods,
        remote_pod: Vec::new(),
        local_pod: Vec::new(),
        replace: Vec::new(),
        create: Vec::new(),
        update_bytes: 0,
        full_bytes: full.len(),
    };
    for round in 0..repeats {
        // A remote pod appears in a selector set, then goes.
        let mut with_remote = base.clone();
        with_remote
            .address_sets
            .get_mut("sel_3")
            .expect("selector set")
            .elements
            .insert(pod(pods + 1 + round).into());
        let script = nft::render_update(&base, &with_remote)?.context("a change")?;
        row.update_bytes = script.len();
        row.remote_pod.push(apply(&ns, &script)?);
        apply(
            &ns,
            &nft::render_update(&with_remote, &base)?.context("a change")?,
        )?;
        // A local pod appears (its chain, map entry and address), then goes.
        let mut with_local = base.clone();
        add_local(&mut with_local, pods + 1 + round);
        row.local_pod.push(apply(
            &ns,
            &nft::render_update(&base, &with_local)?.context("a change")?,
        )?);
        apply(
            &ns,
            &nft::render_update(&with_local, &base)?.context("a change")?,
        )?;
    }
    // Apart from the updates: a replaced table's old elements are freed by the kernel after
    // the transaction, work that would land on the next update measured.
    for _ in 0..repeats {
        // The whole table: refilled in place (a restarted agent), and deleted and created.
        let existing =
            trellis_gateway::policy::kernel::existing(Some(&ns))?.context("the table is there")?;
        row.replace
            .push(apply(&ns, &nft::render_replace(&existing, &base)?)?);
        row.create.push(apply(&ns, &nft::render_full(&base)?)?);
    }
    Ok(row)
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &pods in &options.pods {
        rows.push(measure(pods, options.repeats.max(1))?);
    }
    println!(
        "{:>7} {:>22} {:>22} {:>22} {:>22} {:>12} {:>12}",
        "pods",
        "remote pod p50/p90 ms",
        "local pod p50/p90 ms",
        "replace p50/p90 ms",
        "create p50/p90 ms",
        "update B",
        "full B"
    );
    for row in &rows {
        let cell = |samples: &[Duration]| {
            let p = percentiles(samples);
            format!("{:.2} / {:.2}", p.p50, p.p90)
        };
        println!(
            "{:>7} {:>22} {:>22} {:>22} {:>22} {:>12} {:>12}",
            row.pods,
            cell(&row.remote_pod),
            cell(&row.local_pod),
            cell(&row.replace),
            cell(&row.create),
            row.update_bytes,
            row.full_bytes
        );
    }
    if let [small, .., large] = rows.as_slice() {
        let p50 = |samples: &[Duration]| percentiles(samples).p50;
        println!(
            "one remote pod: {} pods / {} pods = {:.2}x; one local pod: {:.2}x; whole table: {:.2}x",
            large.pods,
            small.pods,
            p50(&large.remote_pod) / p50(&small.remote_pod),
            p50(&large.local_pod) / p50(&small.local_pod),
            p50(&large.replace) / p50(&small.replace),
        );
        println!(
            "at {} pods, replacing the table takes {:.1}x a one-pod update",
            large.pods,
            p50(&large.replace) / p50(&large.remote_pod)
        );
    }
    Ok(())
}
