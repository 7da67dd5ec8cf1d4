//! `trellis-bench`: runs Trellis and the reference it competes with side by side, in one run,
//! and reports both and their ratio (this machine is noisy; only ratios travel).

mod cni;
mod dns;
mod flows;
mod handshakes;
mod latency;
mod netpol;
mod path;
mod policy;
mod propagation;
mod stats;
mod tunnel;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Side-by-side benchmarks of Trellis against the reference implementations")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// trellis-cni against the reference bridge + host-local plugins: ADD, CHECK, DEL latency.
    Cni(cni::Options),
    /// unbound and trellis-dns answering the same records, pinned, driven by dnsperf: QPS.
    Dns(dns::Options),
    /// Plain veth, wireguard-go, boringtun-cli and trellis-gateway: throughput, RTT, CPU.
    Tunnel(tunnel::Options),
    /// The real path: iperf3 and ping pod to pod through the lab's gateways (node encryption,
    /// across clusters, with NetworkPolicy), beside the bare tunnel and plain routing, with
    /// the ratios.
    Path(path::Options),
    /// ICMP round trips through veth, wireguard-go, boringtun-cli and trellis-gateway, paced
    /// and back to back: min, p50, p90, p99.
    Latency(latency::Options),
    /// N initiators at once against wireguard-go, boringtun-cli and trellis-gateway: time
    /// until every session is up.
    Handshakes(handshakes::Options),
    /// The node's nftables policy table: one pod changed (update) with 100 and 10,000 pods in
    /// its sets, against replacing the whole table.
    PolicyApply(policy::Options),
    /// New TCP connections per second and an established flow's throughput between two pods,
    /// without and with the node's table compiled from N policies over N pods.
    Netpol(netpol::Options),
    /// A NetworkPolicy change in a lab cluster of N pods until every node enforces it: p50, p99.
    PolicyPropagation(propagation::Options),
    /// New TCP connections per second through a node whose trellis-gateway records flows
    /// (--flows on) against one that does not, the policy table loaded either way; the
    /// gateway's CPU per 1,000 connections, flows recorded, ring overwrites.
    Flows(flows::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Cni(options) => cni::run(&options),
        Bench::Tunnel(options) => tunnel::run(&options),
        Bench::Latency(options) => latency::run(&options),
        Bench::Path(options) => path::run(&options),
        Bench::Dns(options) => dns::run(&options),
        Bench::Handshakes(options) => handshakes::run(&options),
        Bench::PolicyApply(options) => policy::run(&options),
        Bench::Netpol(options) => netpol::run(&options),
        Bench::PolicyPropagation(options) => propagation::run(&options),
        Bench::Flows(options) => flows::run(&options),
    }
}
