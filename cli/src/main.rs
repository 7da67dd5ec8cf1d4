//! `trellis`: the command-line tool. `trellis lab` builds a mesh from network namespaces on
//! one machine; `trellis status` shows a cluster's mesh as its controller sees it.

mod certs;
mod cluster;
mod cni;
mod diagnose;
mod echo;
mod kubeconfig;
mod lab;
mod mesh;
mod observe;
mod peer;
mod status;
mod sysdump;
mod table;
#[cfg(test)]
mod test_api;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis: encrypted pod networking across Kubernetes clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A lab of clusters, nodes and pods made of network namespaces on this machine.
    Lab(lab::LabArgs),
    /// The mesh CA and per-cluster certificates for controller peering.
    Certs(certs::CertsArgs),
    /// Machines outside Kubernetes that join the mesh through a gateway.
    Peer(peer::PeerArgs),
    /// A test workload: TCP echo, and HTTP answering with who served the request (the lab
    /// runs one in every pod).
    EchoServer(echo::EchoArgs),
    /// The CNI plugin on a Kubernetes node: `install` (the chart's init container).
    Cni(cni::CniArgs),
    /// A cluster's mesh as its controller sees it: peer clusters, gateways, tunnels. Exits 1
    /// when something is unhealthy, 2 when the controller cannot be reached.
    Status(status::StatusArgs),
    /// Flows, as `hubble observe` shows them: every connection and dropped packet the nodes
    /// saw, with the verdict and the policies behind it, from a controller's flows listener.
    Observe(Box<observe::ObserveArgs>),
    /// Clusters joined into a mesh from your kubeconfig: `enable` one (namespace, mesh CA, its
    /// certificate, the helm install), `connect` and `disconnect` two.
    Mesh(mesh::MeshArgs),
    /// The checks to run before filing a bug, through a kubeconfig context's API server:
    /// rp_filter, the CNI conflist, gateways registered, peering, clock skew against the
    /// certificates, MTU; each failure with its fix. Exits 1 when a check fails.
    Diagnose(diagnose::DiagnoseArgs),
    /// A .tar.gz for a bug report, through a kubeconfig context's API server: logs, /status
    /// documents, metrics, custom resources, node facts and routes; the file name is printed.
    Sysdump(sysdump::SysdumpArgs),
}

fn main() -> std::process::ExitCode {
    restore_default_sigpipe();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Lab(args) => lab::run(args),
        Command::Certs(args) => certs::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Peer(args) => peer::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::EchoServer(args) => echo::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Cni(args) => cni::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Status(args) => status::run(args),
        Command::Observe(args) => observe::run(*args),
        Command::Mesh(args) => mesh::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Diagnose(args) => diagnose::run(args),
        Command::Sysdump(args) => sysdump::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a command's async part on a single-threaded runtime: a CLI command waits on one thing
/// at a time, and its few concurrent reads need no second thread.
fn block_on<T>(command: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(command)
}

/// Rust ignores SIGPIPE, so `trellis lab status | head` would end in a "broken pipe" panic;
/// a command-line tool should just stop, as `ls | head` does.
#[allow(unsafe_code)]
fn restore_default_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists, and SIG_DFL installs no
    // handler code of ours.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
}
