//! `trellis certs`: the mesh CA and the per-cluster certificates controllers peer with
//! (mutual TLS; a cluster's identity is its certificate's `<id>.cluster.trellis` name).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use trellis_controller::certs::{Validity, write_ca_files, write_cluster_files};

#[derive(Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the mesh CA (`ca.pem`, `ca-key.pem`) in DIR. Keep `ca-key.pem` offline.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "trellis-mesh")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue cluster ID's certificate (`<id>.pem`, `<id>-key.pem`) from the CA in DIR.
    Cluster {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long, default_value_t = 365)]
        days: i64,
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Ca {
            dir,
            name,
            days,
            force,
        } => {
            std::fs::create_dir_all(&dir)?;
            write_ca_files(&dir, &name, Validity::days_from_now(days), force)?;
            println!(
                "mesh CA written to {} (ca.pem; keep ca-key.pem offline)",
                dir.display()
            );
        }
        CertsCommand::Cluster {
            dir,
            id,
            days,
            force,
        } => {
            let id = id.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            write_cluster_files(&dir, &id, Validity::days_from_now(days), force)?;
            println!("certificate of cluster {id} written to {}", dir.display());
        }
    }
    Ok(())
}
