//! `trellis`: the command-line tool. `trellis lab` builds a mesh from network namespaces on
//! one machine.

mod certs;
mod lab;
mod peer;

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Lab(args) => lab::run(args),
        Command::Certs(args) => certs::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Peer(args) => peer::run(args).map(|()| std::process::ExitCode::SUCCESS),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
