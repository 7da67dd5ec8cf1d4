//! `certs` as a subcommand, shared by `trellis certs` and `trellis-controller certs`: reads
//! the arguments, writes the files the [`crate::certs`] and [`crate::agent_certs`] functions
//! make, and says what it wrote.

use ipnet::IpNet;
use trellis_core::cluster::ClusterId;

use crate::Error;
use crate::certs::{
    CA_CERT_FILE, CA_KEY_FILE, Validity, cluster_cert_file, cluster_key_file, write_ca_files,
    write_cluster_files,
};

/// The `certs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create the mesh CA (`ca.pem`, `ca-key.pem`) in DIR. Keep `ca-key.pem` offline.
    Ca {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value = "trellis-mesh")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a cluster's certificate (`<id>.pem`, `<id>-key.pem`) from the CA in DIR.
    Cluster {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        id: ClusterId,
        /// A pod CIDR the cluster may claim (repeat for several); signed into the certificate
        /// (RFC 3779 `ipAddrBlocks`), so peers route nothing else of it.
        #[arg(long = "pod-cidr")]
        pod_cidrs: Vec<IpNet>,
        /// A service CIDR the cluster may claim (repeat for several).
        #[arg(long = "service-cidr")]
        service_cidrs: Vec<IpNet>,
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent-port certificate in DIR under the cluster's agent CA
    /// (`<cluster>-agent-ca.pem`, created on first use): the controller's (`--controller`),
    /// DNS's (`--dns`) or a node's (`--node NAME`). Replaces an existing one atomically.
    Agent {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        cluster: ClusterId,
        #[arg(long, conflicts_with_all = ["dns", "controller"], required_unless_present_any = ["dns", "controller"])]
        node: Option<String>,
        #[arg(long, conflicts_with = "controller")]
        dns: bool,
        #[arg(long)]
        controller: bool,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

impl CertsCommand {
    /// Writes the files; returns what to tell the user.
    pub fn run(self) -> Result<String, Error> {
        match self {
            Self::Ca {
                dir,
                name,
                days,
                force,
            } => {
                std::fs::create_dir_all(&dir).map_err(|source| Error::CertificateFile {
                    operation: "creating the certificate directory",
                    path: dir.clone(),
                    source,
                })?;
                write_ca_files(&dir, &name, Validity::days_from_now(days), force)?;
                Ok(format!(
                    "wrote {0}/{CA_CERT_FILE} and {0}/{CA_KEY_FILE} (keep the key offline)",
                    dir.display()
                ))
            }
            Self::Cluster {
                dir,
                id,
                pod_cidrs,
                service_cidrs,
                days,
                force,
            } => {
                let ranges: Vec<IpNet> = pod_cidrs.into_iter().chain(service_cidrs).collect();
                write_cluster_files(&dir, &id, &ranges, Validity::days_from_now(days), force)?;
                let note = if ranges.is_empty() {
                    " (no --pod-cidr/--service-cidr: peers route nothing of this cluster \
                     unless their configuration lists its ranges)"
                } else {
                    ""
                };
                Ok(format!(
                    "wrote {0}/{1} and {0}/{2}{note}",
                    dir.display(),
                    cluster_cert_file(&id),
                    cluster_key_file(&id)
                ))
            }
            Self::Agent {
                dir,
                cluster,
                node,
                dns,
                controller,
                days,
            } => {
                use trellis_core::agent::AgentIdentity;
                let cluster = cluster.to_string();
                let identity = match (node, dns, controller) {
                    (Some(node), _, _) => AgentIdentity::Node { cluster, node },
                    (None, true, _) => AgentIdentity::Dns { cluster },
                    (None, false, _) => AgentIdentity::Controller { cluster },
                };
                let files = crate::agent_certs::write_agent_files(&dir, &identity, days)?;
                Ok(format!(
                    "wrote {} and {} ({})",
                    files.cert.display(),
                    files.key.display(),
                    identity.dns_name()
                ))
            }
        }
    }
}
