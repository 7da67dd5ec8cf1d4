//! `trellis mesh`: clusters joined into a mesh from the user's kubeconfig, as `cilium
//! clustermesh` and `subctl` do it. `enable` prepares one cluster (namespace, mesh CA, its
//! certificate and Secret) and installs the chart or prints how; `connect` and `disconnect`
//! add or remove two clusters as each other's peers in their releases' values.
//!
//! The Kubernetes side goes through a `kube::Client` (tests script the API server), helm
//! through the [`helm::Helm`] seam (tests record the commands).

mod certificate;
mod connect;
mod enable;
mod helm;
mod ranges;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use ipnet::IpNet;
use trellis_core::cluster::ClusterId;

use crate::kubeconfig;
use connect::{ConnectOptions, Side};
use enable::{CaSource, EnableOptions, Finish};
use helm::{HelmBinary, Target};

pub use certificate::TLS_SECRET;
/// For `trellis peer`'s tests: the Secret as `mesh enable` writes it.
#[cfg(test)]
pub use certificate::tls_secret;

/// The ranges the certificate in the chart's Secret signs, and those of them recorded as
/// ranges for external machines (`--peer-cidr`).
pub fn signed_ranges(
    secret: &k8s_openapi::api::core::v1::Secret,
) -> anyhow::Result<(Vec<IpNet>, Vec<IpNet>)> {
    let material = certificate::tls_from_secret(secret)?;
    let signed = certificate::read_leaf(&material.cert_pem)?.ranges;
    let peers = certificate::recorded_peer_ranges(secret)?
        .into_iter()
        .filter(|r| signed.iter().any(|s| s.contains(r)))
        .collect();
    Ok((signed, peers))
}

/// The field manager of what `trellis mesh` writes by server-side apply.
const FIELD_MANAGER: &str = "trellis";

#[derive(Args)]
pub struct MeshArgs {
    #[command(subcommand)]
    command: MeshCommand,
}

#[derive(Subcommand)]
enum MeshCommand {
    /// Prepare a cluster for the mesh: namespace, mesh CA (created unless given or found, in
    /// kube-system),
    /// the cluster's certificate with the ranges it may claim, the Secret `trellis-tls`; then
    /// print the helm install it needs, or run it with --install.
    Enable(EnableArgs),
    /// Make two enabled clusters each other's peers (`peers[]` of both releases, by `helm
    /// upgrade --reuse-values`), after checking they share the mesh CA.
    Connect(ConnectArgs),
    /// Remove two clusters from each other's peers.
    Disconnect(ConnectArgs),
}

#[derive(Args)]
struct Cluster {
    /// The kubeconfig context of the cluster (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// The namespace Trellis is installed in.
    #[arg(long, default_value = "trellis-system")]
    namespace: String,
    /// The helm binary.
    #[arg(long, default_value = "helm")]
    helm: PathBuf,
    /// The chart the release is installed or upgraded from.
    #[arg(long, default_value = "helm/trellis")]
    chart: PathBuf,
}

impl Cluster {
    fn target(&self) -> Target {
        Target {
            context: self.context.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

#[derive(Args)]
struct EnableArgs {
    #[command(flatten)]
    cluster: Cluster,
    /// The cluster's ID in the mesh (default: its certificate's, else the context name made
    /// into an ID). It cannot change once peers know it.
    #[arg(long)]
    cluster_id: Option<ClusterId>,
    /// Issue the certificate from the mesh CA of another cluster (its Secret
    /// `trellis-mesh-ca` in --ca-namespace): how a cluster joins an existing mesh.
    #[arg(long, conflicts_with = "ca_dir")]
    ca_from_context: Option<String>,
    /// Issue the certificate from the mesh CA in DIR (`ca.pem`, `ca-key.pem`, as `trellis certs
    /// ca` writes them).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// The namespace of the mesh CA's Secret `trellis-mesh-ca` (its key signs every cluster
    /// of the mesh), here and in --ca-from-context's cluster. Not Trellis's namespace: the
    /// controller reads Secrets there.
    #[arg(long, default_value = "kube-system")]
    ca_namespace: String,
    /// The cluster's pod range (repeat for dual stack). Default: kube-controller-manager's
    /// --cluster-cidr, when the cluster shows it.
    #[arg(long = "pod-cidr")]
    pod_cidrs: Vec<IpNet>,
    /// The cluster's service range (repeat for dual stack). Default: its ServiceCIDR objects,
    /// else kube-controller-manager's --service-cluster-ip-range.
    #[arg(long = "service-cidr")]
    service_cidrs: Vec<IpNet>,
    /// A range for external machines (`trellis peer add --address`), signed into the
    /// certificate beside the pod and service ranges and outside both (repeatable). Default:
    /// the ones the current certificate was issued with. Addresses inside the pod range are
    /// node IPAM's to give to a new node, which would cut the machine off.
    #[arg(long = "peer-cidr")]
    peer_cidrs: Vec<IpNet>,
    /// Sign no peer range (drop those the current certificate carries).
    #[arg(long, conflicts_with = "peer_cidrs")]
    no_peer_cidrs: bool,
    /// Days the cluster certificate is valid (more than the 30 before expiry when a re-run
    /// renews it).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(31..=3650))]
    days: i64,
    /// Run the helm install instead of printing it.
    #[arg(long, conflicts_with = "dry_run")]
    install: bool,
    /// Change nothing: say what would be created and run.
    #[arg(long)]
    dry_run: bool,
    /// A values file for the helm install (repeatable).
    #[arg(long = "values", short = 'f')]
    values: Vec<PathBuf>,
    /// A value for the helm install, KEY=VALUE as `helm --set` takes it (repeatable).
    #[arg(long = "set")]
    sets: Vec<String>,
    /// How long the helm install waits for the pods.
    #[arg(long, default_value = "5m")]
    timeout: String,
}

#[derive(Args)]
struct ConnectArgs {
    #[command(flatten)]
    cluster: Cluster,
    /// The kubeconfig context of the other cluster.
    #[arg(long)]
    destination_context: String,
    /// The namespace Trellis is installed in, in the other cluster (default: --namespace).
    #[arg(long)]
    destination_namespace: Option<String>,
    /// Where the other cluster dials this one (IP:PORT), when its peering Service's address
    /// is not reachable from there (NAT, a LoadBalancer known by host name).
    #[arg(long)]
    endpoint: Option<SocketAddr>,
    /// Where this cluster dials the other one (IP:PORT).
    #[arg(long)]
    destination_endpoint: Option<SocketAddr>,
    /// Change nothing: print the helm commands.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: MeshArgs) -> anyhow::Result<()> {
    crate::block_on(run_async(args))
}

async fn run_async(args: MeshArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    match args.command {
        MeshCommand::Enable(args) => {
            let client = kubeconfig::client(args.cluster.context.as_deref()).await?;
            let ca_source = match (&args.ca_from_context, &args.ca_dir) {
                (Some(name), _) => CaSource::Context {
                    name: name.clone(),
                    client: kubeconfig::client(Some(name)).await?,
                },
                (None, Some(dir)) => CaSource::Dir(dir.clone()),
                (None, None) => CaSource::Own,
            };
            let options = EnableOptions {
                target: args.cluster.target(),
                ca_namespace: args.ca_namespace,
                cluster_id: args.cluster_id,
                pod_cidrs: args.pod_cidrs,
                service_cidrs: args.service_cidrs,
                peer_cidrs: if args.no_peer_cidrs {
                    Some(Vec::new())
                } else {
                    Some(args.peer_cidrs).filter(|given| !given.is_empty())
                },
                finish: if args.dry_run {
                    Finish::DryRun
                } else if args.install {
                    Finish::Install
                } else {
                    Finish::Print
                },
                days: args.days,
                chart: args.cluster.chart.clone(),
                value_files: args.values,
                sets: args.sets,
                timeout: args.timeout,
                helm_program: args.cluster.helm.display().to_string(),
            };
            let helm = HelmBinary {
                program: args.cluster.helm.clone(),
            };
            enable::enable(&client, ca_source, &options, &helm, &mut out).await
        }
        MeshCommand::Connect(args) => {
            let (a, b, options, helm) = sides(&args).await?;
            connect::connect(&a, &b, &options, &helm, &mut out).await
        }
        MeshCommand::Disconnect(args) => {
            let (a, b, options, helm) = sides(&args).await?;
            connect::disconnect(&a, &b, &options, &helm, &mut out).await
        }
    }
}

async fn sides(args: &ConnectArgs) -> anyhow::Result<(Side, Side, ConnectOptions, HelmBinary)> {
    let a = Side {
        target: args.cluster.target(),
        client: kubeconfig::client(args.cluster.context.as_deref()).await?,
        endpoint: args.endpoint,
    };
    let b = Side {
        target: Target {
            context: Some(args.destination_context.clone()),
            namespace: args
                .destination_namespace
                .clone()
                .unwrap_or_else(|| args.cluster.namespace.clone()),
        },
        client: kubeconfig::client(Some(&args.destination_context)).await?,
        endpoint: args.destination_endpoint,
    };
    let options = ConnectOptions {
        chart: args.cluster.chart.clone(),
        dry_run: args.dry_run,
        helm_program: args.cluster.helm.display().to_string(),
    };
    let helm = HelmBinary {
        program: args.cluster.helm.clone(),
    };
    Ok((a, b, options, helm))
}

/// The HTTP status of an API server's refusal.
fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Now, in Unix seconds.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
