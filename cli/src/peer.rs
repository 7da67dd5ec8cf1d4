//! `trellis peer config`: a wg-quick file for a machine outside Kubernetes (a laptop, a VM)
//! that joins the mesh through a node's gateway.

use clap::{Args, Subcommand};
use trellis_gateway::peer_config::PeerConfigArgs;

#[derive(Args)]
pub struct PeerArgs {
    #[command(subcommand)]
    command: PeerCommand,
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Print a wg-quick config (with a fresh key) for an external machine; run it on the node
    /// whose gateway the machine will connect to.
    Config(PeerConfigArgs),
}

pub fn run(args: PeerArgs) -> anyhow::Result<()> {
    match args.command {
        PeerCommand::Config(args) => print!("{}", args.render()?),
    }
    Ok(())
}
