//! `trellis-dns`: serves `<svc>.<ns>.svc.clusterset.local` from the services the cluster's mesh
//! controller streams (or, standalone, from a watched catalog file) and forwards everything else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Parser};
use tracing::info;

use trellis_dns::acl::{Cidr, ForwardAcl};
use trellis_dns::catalog::{ZoneHandle, watch_file};
use trellis_dns::config::Config;
use trellis_dns::forward::Forwarder;
use trellis_dns::metrics::Metrics;
use trellis_dns::resolv::{parse_resolv_conf, without_self};
use trellis_dns::server;
use trellis_dns::subscription::{self, DEFAULT_MAX_FRAME};

#[derive(Parser, Debug)]
#[command(about = "clusterset.local DNS for Trellis; forwards everything else")]
#[command(group(ArgGroup::new("source").required(true).args(["catalog", "controller"])))]
struct Args {
    /// UDP and TCP listen address.
    #[arg(long, default_value = "0.0.0.0:53")]
    listen: SocketAddr,
    /// /metrics listen address; "off" disables it.
    #[arg(long, default_value = "0.0.0.0:9153")]
    metrics: String,
    /// Authoritative zone.
    #[arg(long, default_value = "clusterset.local")]
    zone: String,
    /// TTL of answers, seconds.
    #[arg(long, default_value_t = 5)]
    ttl: u32,
    /// Also serve the reverse zone of this range (CIDR, repeatable or comma-separated; an
    /// IPv4 /8, /16 or /24, an IPv6 prefix a multiple of 4): PTR records of the clusterset IPs
    /// and headless endpoints in it, NXDOMAIN for the rest. Default: none.
    #[arg(long = "reverse-zone", value_name = "CIDR", value_delimiter = ',')]
    reverse_zones: Vec<Cidr>,
    /// Catalog JSON file, watched for changes (standalone use, without a controller).
    #[arg(
        long,
        conflicts_with = "controller",
        required_unless_present = "controller"
    )]
    catalog: Option<PathBuf>,
    /// The mesh controller's agent port (HOST:PORT) to subscribe to: the normal source.
    #[arg(long, value_name = "HOST:PORT")]
    controller: Option<String>,
    /// Deprecated (a controller without agent TLS): file holding its shared agent token.
    #[arg(long, value_name = "PATH", requires = "controller")]
    controller_token_file: Option<PathBuf>,
    /// The cluster's agent CA (PEM): the controller must present `agent.<cluster>.trellis`
    /// signed by it.
    #[arg(long, value_name = "PATH", requires_all = ["controller", "agent_cert", "agent_key"])]
    agent_ca: Option<PathBuf>,
    /// DNS's certificate (`dns.<cluster>.trellis`, from `trellis certs agent --dns`).
    #[arg(long, value_name = "PATH", requires = "agent_ca")]
    agent_cert: Option<PathBuf>,
    /// DNS's private key.
    #[arg(long, value_name = "PATH", requires = "agent_ca")]
    agent_key: Option<PathBuf>,
    /// On Kubernetes: the projected ServiceAccount token (audience `trellis-agent`) DNS proves
    /// itself with to get (and renew, before it expires) its `dns.<cluster>.trellis`
    /// certificate from the controller, written to --agent-cert and --agent-key. The
    /// controller is any `agent.<id>.trellis` signed by --agent-ca (one agent CA per cluster)
    /// unless --cluster-id pins it.
    #[arg(long, value_name = "PATH", requires = "agent_ca")]
    agent_bootstrap_token: Option<PathBuf>,
    /// The cluster's ID: when given, a bootstrap accepts only that cluster's controller.
    #[arg(long, value_name = "ID", requires = "agent_bootstrap_token")]
    cluster_id: Option<String>,
    /// Catalog poll interval, milliseconds.
    #[arg(long, default_value_t = 1000)]
    catalog_poll_ms: u64,
    /// Clients (CIDR, repeatable or comma-separated) whose queries outside the zone are
    /// forwarded; everyone else gets REFUSED. Default: none. Everyone: 0.0.0.0/0,::/0.
    #[arg(long = "forward-for", value_name = "CIDR", value_delimiter = ',')]
    forward_for: Vec<Cidr>,
    /// Upstream resolver (repeatable); default: the nameservers of --resolv-conf.
    #[arg(long = "upstream")]
    upstreams: Vec<SocketAddr>,
    /// resolv.conf to take upstreams from when no --upstream is given (read only with
    /// --forward-for).
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Per-upstream timeout, milliseconds.
    #[arg(long, default_value_t = 2000)]
    upstream_timeout_ms: u64,
    /// EDNS UDP payload size (512..=4096): advertised, and the cap of UDP answers and of the
    /// size forwarded queries offer upstream, whatever the client offers.
    #[arg(long, default_value_t = 1232)]
    edns_udp_size: u16,
    /// Identical UDP responses per second to one client network (/24, /56) for one name,
    /// type and rcode; beyond, every other one goes out truncated (TC) and the rest are
    /// dropped. 0 disables.
    #[arg(long, default_value_t = 20)]
    rate_limit: u32,
    /// Buckets the rate limiter tracks at once (8 bytes each; fixed memory).
    #[arg(long, default_value_t = 1 << 16)]
    rate_limit_slots: usize,
    /// UDP worker threads (SO_REUSEPORT sockets).
    #[arg(long, default_value_t = 1)]
    udp_workers: usize,
}

fn config(args: Args) -> anyhow::Result<Config> {
    let mut upstreams = args.upstreams;
    // Without --forward-for nothing is forwarded: no resolv.conf needed.
    if upstreams.is_empty() && !args.forward_for.is_empty() {
        let text = std::fs::read_to_string(&args.resolv_conf)
            .with_context(|| format!("reading {}", args.resolv_conf.display()))?;
        upstreams = without_self(parse_resolv_conf(&text), args.listen);
    }
    let metrics = match args.metrics.as_str() {
        "off" => None,
        addr => Some(
            addr.parse()
                .with_context(|| format!("--metrics {addr:?}"))?,
        ),
    };
    Ok(Config {
        listen: args.listen,
        metrics,
        zone: args.zone,
        ttl: args.ttl,
        reverse_zones: args.reverse_zones,
        catalog_file: args.catalog,
        catalog_poll: Duration::from_millis(args.catalog_poll_ms),
        controller: args.controller,
        controller_token_file: args.controller_token_file,
        agent_tls: match (args.agent_ca, args.agent_cert, args.agent_key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(trellis_agent_client::TlsFiles { ca, cert, key })
            }
            _ => None,
        },
        forward_for: ForwardAcl::new(args.forward_for),
        upstreams,
        upstream_timeout: Duration::from_millis(args.upstream_timeout_ms),
        edns_udp_size: args.edns_udp_size,
        udp_workers: args.udp_workers,
        rate_limit: args.rate_limit,
        rate_limit_slots: args.rate_limit_slots,
        ..Config::default()
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let bootstrap = args
        .agent_bootstrap_token
        .clone()
        .map(|token| (token, args.cluster_id.clone()));
    let config = config(args)?;
    let zone = config.validate()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // On Kubernetes the certificate comes from the controller: asked for once the server runs
    // (it answers SERVFAIL in the zone, /readyz 503, and stays live meanwhile), then the
    // subscription starts with it.
    let renewer = match (bootstrap, &config.agent_tls, &config.controller) {
        (Some((token, cluster)), Some(files), Some(address)) => {
            Some(trellis_agent_client::bootstrap::Renewer {
                address: address.clone(),
                ca: files.ca.clone(),
                cert: files.cert.clone(),
                key: files.key.clone(),
                token,
                cluster,
                subject: trellis_agent_client::bootstrap::Subject::Dns,
            })
        }
        _ => None,
    };
    let controller = if renewer.is_some() {
        None
    } else {
        source(&config)?
    };
    if config.forward_for.is_empty() {
        info!("forwarding is off (no --forward-for): queries outside the zone get REFUSED");
    } else if config.upstreams.is_empty() {
        tracing::warn!("no upstream resolver: forwarded queries get SERVFAIL");
    }
    runtime.block_on(async {
        let metrics = Metrics::new()?;
        let handle = ZoneHandle::new(zone, config.edns_udp_size, Some(metrics.clone()));
        let forwarder = Forwarder::new(config.upstreams.clone(), config.upstream_timeout);
        let running = server::start(&config, handle.clone(), metrics.clone(), forwarder).await?;
        if let Some(path) = config.catalog_file.clone() {
            tokio::spawn(watch_file(handle, path, config.catalog_poll, metrics));
        } else if let Some(renewer) = renewer {
            let config = config.clone();
            tokio::spawn(async move {
                renewer.first_then_spawn().await;
                match source(&config) {
                    Ok(Some(source)) => follow(handle, source, metrics).await,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!("{e:#}: not following the controller");
                    }
                }
            });
        } else if let Some(source) = controller {
            tokio::spawn(follow(handle, source, metrics));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("shutting down");
        running.shutdown();
        Ok(())
    })
}

/// The controller subscription's configuration (its TLS files loaded), if there is one.
fn source(config: &Config) -> anyhow::Result<Option<trellis_agent_client::ClientConfig>> {
    Ok(match &config.controller {
        Some(addr) => {
            let transport = match (&config.agent_tls, &config.controller_token_file) {
                (Some(files), _) => trellis_agent_client::Transport::Tls(std::sync::Arc::new(
                    trellis_agent_client::ClientTls::load(files.clone()).map_err(|e| {
                        anyhow::anyhow!("agent TLS: {}", trellis_core::error_chain(&e))
                    })?,
                )),
                (None, Some(path)) => {
                    tracing::warn!(
                        "--controller-token-file is deprecated: use --agent-ca/--agent-cert/--agent-key (DNS's identity)"
                    );
                    let token = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?
                        .trim()
                        .to_string();
                    anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
                    trellis_agent_client::Transport::LegacyToken(Some(token))
                }
                (None, None) => trellis_agent_client::Transport::LegacyToken(None),
            };
            Some(trellis_agent_client::ClientConfig {
                address: addr.clone(),
                transport,
                max_frame: DEFAULT_MAX_FRAME,
                resync: None,
                report: None,
            })
        }
        None => None,
    })
}

/// Follows the controller (and exports when the agent certificate in use expires).
async fn follow(handle: ZoneHandle, source: trellis_agent_client::ClientConfig, metrics: Metrics) {
    if let trellis_agent_client::Transport::Tls(tls) = &source.transport {
        let expiry = metrics.certificate_expiry.clone();
        tokio::spawn(trellis_agent_client::tls::watch_expiry(
            tls.clone(),
            std::time::Duration::from_secs(5),
            move |e| {
                expiry.with_label_values(&["dns"]).set(e.cert);
                expiry.with_label_values(&["ca"]).set(e.ca);
            },
        ));
    }
    subscription::run(handle, source, metrics).await;
}
