//! `trellis peer config`: a wg-quick file for a machine outside Kubernetes (a laptop, a VM)
//! that joins the mesh through a node's gateway.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use ipnet::IpNet;

#[derive(Args)]
pub struct PeerArgs {
    #[command(subcommand)]
    command: PeerCommand,
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Print a wg-quick config (with a fresh key) for an external machine; run it on the node
    /// whose gateway the machine will connect to.
    Config {
        /// The gateway's state directory (its key lives there).
        #[arg(long, default_value = "/var/lib/trellis-gateway")]
        state_dir: PathBuf,
        /// The gateway's UDP endpoint as the external machine reaches it.
        #[arg(long)]
        endpoint: SocketAddr,
        /// The external machine's tunnel address(es), e.g. 10.99.0.2/32.
        #[arg(long, value_delimiter = ',', required = true)]
        address: Vec<IpNet>,
        /// What it routes into the mesh: pod and service CIDRs.
        #[arg(long, value_delimiter = ',', required = true)]
        allowed_ips: Vec<IpNet>,
        #[arg(long, default_value_t = 25)]
        keepalive: u16,
    },
}

pub fn run(args: PeerArgs) -> anyhow::Result<()> {
    match args.command {
        PeerCommand::Config {
            state_dir,
            endpoint,
            address,
            allowed_ips,
            keepalive,
        } => {
            let text = trellis_gateway::peer_config::new_external_peer(
                &state_dir,
                endpoint,
                address,
                allowed_ips,
                keepalive,
            )?;
            print!("{text}");
            Ok(())
        }
    }
}
