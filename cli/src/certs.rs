//! `trellis certs`: the mesh CA and the per-cluster certificates controllers peer with
//! (mutual TLS; a cluster's identity is its certificate's `<id>.cluster.trellis` name).

use clap::Args;
use trellis_controller::certs_command::CertsCommand;

#[derive(Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    println!("{}", args.command.run()?);
    Ok(())
}
