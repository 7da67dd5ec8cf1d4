//! `trellis-controller`: run the per-cluster mesh controller, or create its certificates and
//! CRDs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use trellis_controller::certs_command::CertsCommand;
use trellis_controller::config::{Config, LeaseLocation, SourceConfig};
use trellis_controller::hub::{Hub, HubConfig};
use trellis_controller::leader::file::FileLease;
use trellis_controller::leader::lease::KubeLease;
use trellis_controller::leader::pod_label::{self, PodLabeler};
use trellis_controller::leader::{self, AnyLease, Elector, WarmSink};
use trellis_controller::metrics::Metrics;
use trellis_controller::peering::{PeerConfig, Peering, PeeringConfig};
use trellis_controller::store::{AnyStore, ConfigMapStore, FileStore, StateStore};
use trellis_controller::tls::TlsMaterial;
use trellis_controller::{agent, crd, kube_source, static_source};

#[derive(Parser)]
#[command(
    name = "trellis-controller",
    version,
    about = "The Trellis mesh controller"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run {
        /// The configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create the mesh CA or a cluster's certificate.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Print the CRDs the controller needs (ServiceExport, ServiceImport, ClusterProperty).
    Crds,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Certs(command) => println!("{}", command.run()?),
        Command::Crds => print!("{}", crd::crds_yaml()?),
        Command::Run { config } => {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(config))?;
        }
    }
    Ok(())
}

fn read(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The agent CA key, as PKCS#8 PEM (the chart's, from Helm's `genCA`, is PKCS#1).
fn read_ca_key(path: &PathBuf) -> Result<String> {
    trellis_controller::agent_certs::ca_key_pem(&read(path)?)
        .with_context(|| format!("in {}", path.display()))
}

async fn run(config_path: PathBuf) -> Result<()> {
    let cfg = Config::parse(&read(&config_path)?)
        .with_context(|| format!("in {}", config_path.display()))?;
    let tls = TlsMaterial {
        ca_pem: read(&cfg.tls.ca)?,
        cert_pem: read(&cfg.tls.cert)?,
        key_pem: read(&cfg.tls.key)?,
    };
    let client = match &cfg.source {
        SourceConfig::Kubernetes { .. } => Some(
            kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?,
        ),
        SourceConfig::Static { .. } => None,
    };
    let id = match (&cfg.cluster_id, &cfg.source, &client) {
        (Some(id), _, _) => id.clone(),
        (None, SourceConfig::Static { path, .. }, _) => {
            let objects = trellis_controller::objects::parse_objects(&read(path)?)?;
            trellis_controller::objects::source_state(&objects)
                .cluster_id
                .with_context(|| {
                    format!(
                        "no clusterId in the configuration and no ClusterProperty \
                         cluster.clusterset.k8s.io in {}",
                        path.display()
                    )
                })?
        }
        (None, SourceConfig::Kubernetes { .. }, Some(client)) => {
            kube_source::cluster_id(client.clone()).await?
        }
        (None, SourceConfig::Kubernetes { .. }, None) => {
            anyhow::bail!("no Kubernetes client")
        }
    };
    let metrics = Metrics::new()?;
    // External peers' addresses must lie inside what this cluster's certificate lets it claim.
    let own_allowance = match trellis_controller::tls::parse_certs(&tls.cert_pem)?.first() {
        Some(der) => trellis_controller::certs::claim_ranges_of(der)?,
        None => None,
    };
    let make_hub = || {
        let hub = Hub::new(
            HubConfig {
                id: id.clone(),
                name: cfg.name(&id),
                service_cidrs: cfg.service_cidrs.clone(),
                lease: cfg.lease(),
                node_encryption: cfg.node_encryption,
                recent_deltas: 256,
                startup_grace: cfg.lease(),
            },
            metrics.clone(),
        );
        hub.set_claim_limits(cfg.peer_limits.into());
        hub.set_own_allowance(own_allowance.clone());
        hub.set_network_policy(cfg.network_policy);
        hub.set_clusterset_ip_ranges(cfg.clusterset_ip_ranges());
        for peer in &cfg.peers {
            hub.set_configured_allowance(&peer.id, peer.allowance());
            if let Some(endpoint) = peer.endpoint {
                hub.add_peer_controller_endpoint(&peer.id, endpoint.ip());
            }
        }
        hub.set_local_addresses(
            [Some(cfg.listen), cfg.metrics_listen, cfg.agent_listen]
                .into_iter()
                .flatten()
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified())
                .collect(),
        );
        hub
    };
    // The leader's hub is made when this replica leads, so its startup grace (waiting for
    // peers before serving gateways a view without them) starts then. Until then `/status`
    // shows an idle hub: no source, no peers, no gateways.
    let leading_hub: Arc<std::sync::OnceLock<Hub>> = Arc::default();
    let following_hub = make_hub();
    let mut tasks = tokio::task::JoinSet::new();
    // Served by a follower too: /readyz says it is healthy, /leader which replica leads.
    if let Some(addr) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
        let leading = leading_hub.clone();
        tasks.spawn(trellis_controller::metrics::serve(
            listener,
            metrics.clone(),
            Arc::new(move || {
                let hub = leading.get().unwrap_or(&following_hub);
                serde_json::to_string_pretty(&hub.status()).unwrap_or_default()
            }),
        ));
    }
    // The sources run from the start (a follower's watches stay warm); the hub gets their
    // state once this replica leads, after it restored the last saved state.
    let warm = WarmSink::<Hub>::signalling(metrics.ready.clone());
    let mut export_statuses = None;
    match &cfg.source {
        SourceConfig::Static { path, poll_millis } => {
            tasks.spawn(static_source::run(
                path.clone(),
                Duration::from_millis(*poll_millis),
                warm.clone(),
            ));
        }
        SourceConfig::Kubernetes {
            settings_namespace, ..
        } => {
            let client = client.clone().context("no Kubernetes client")?;
            let (statuses, statuses_rx) =
                tokio::sync::watch::channel(kube_source::ExportStatuses::new());
            export_statuses = Some(statuses_rx);
            tasks.spawn(kube_source::run_with_status(
                client,
                warm.clone(),
                kube_source::SourceOptions {
                    debounce: Duration::from_millis(100),
                    network_policy: cfg.network_policy,
                    preshared_key_namespace: Some(settings_namespace.clone()),
                },
                Some(statuses),
            ));
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // On Kubernetes the leader's pod carries the label the leader-routed Services select; a
    // starting replica first takes it off its own pod (a restarted container keeps it).
    let (leading_tx, leading_rx) = tokio::sync::watch::channel(false);
    let labeler = leader_pod_labeler(&cfg, client.as_ref());
    if let Some(labeler) = &labeler {
        let retry = cfg
            .leader_election
            .as_ref()
            .map_or(Duration::from_secs(2), |e| e.timings().retry_period);
        tasks.spawn(pod_label::run(
            labeler.clone(),
            leading_rx,
            retry,
            Duration::from_secs(10),
            metrics.clone(),
        ));
    }
    let mut elector = match cfg.lease_location() {
        None => {
            metrics.leader.set(1);
            None
        }
        Some(location) => {
            let backend = match location {
                LeaseLocation::File(path) => AnyLease::File(FileLease { path }),
                LeaseLocation::Kubernetes { namespace, name } => {
                    AnyLease::Kubernetes(Box::new(KubeLease::new(
                        client.clone().context("no Kubernetes client")?,
                        &namespace,
                        &name,
                    )))
                }
            };
            let timings = cfg
                .leader_election
                .as_ref()
                .map(|e| e.timings())
                .context("leaderElection")?;
            let mut elector = Elector::new(backend, leader::identity(), timings, metrics.clone());
            tracing::info!(me = %elector.identity(), "following until this replica leads");
            tokio::select! {
                () = elector.acquire() => {},
                _ = tokio::signal::ctrl_c() => return stop_following(tasks).await,
                _ = term.recv() => return stop_following(tasks).await,
            }
            Some(elector)
        }
    };
    // Leading from here on. The lease is renewed from this moment, while the leader sets up
    // (a setup longer than the lease must not let another replica lead beside this one), and
    // the leader's work ends the moment leadership is lost.
    let hub = make_hub();
    let _ = leading_hub.set(hub.clone());
    let load_within = cfg
        .leader_election
        .as_ref()
        .map_or(Duration::from_secs(10), |e| e.timings().renew_deadline);
    let lead = async {
        let store = match (&cfg.state_config_map, &cfg.source, &client) {
            (
                Some(name),
                SourceConfig::Kubernetes {
                    settings_namespace, ..
                },
                Some(client),
            ) => Some(AnyStore::ConfigMap(Box::new(ConfigMapStore::new(
                client.clone(),
                settings_namespace,
                name,
            )))),
            _ => cfg
                .state_file
                .as_ref()
                .map(|path| AnyStore::File(FileStore { path: path.clone() })),
        };
        if let Some(store) = store {
            // Bounded: an API server that does not answer must not hold up the leader's start.
            match tokio::time::timeout(load_within, store.load()).await {
                Ok(Ok(Some(saved))) => hub.restore(saved),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %trellis_core::error_chain(&e), "ignoring the saved state")
                }
                Err(_) => tracing::warn!(
                    within = ?load_within,
                    "reading the saved state timed out; starting without it"
                ),
            }
            let captured = hub.clone();
            tasks.spawn(trellis_controller::store::run(
                hub.subscribe_local(),
                move || captured.persisted(),
                store,
                Duration::from_secs(2),
                metrics.clone(),
            ));
        }
        warm.deliver_to(hub.clone());
        if let SourceConfig::Kubernetes {
            settings_namespace,
            settings_config_map,
        } = &cfg.source
        {
            let client = client.clone().context("no Kubernetes client")?;
            if let Some(statuses) = export_statuses {
                tasks.spawn(kube_source::write_export_statuses(
                    client.clone(),
                    hub.id().clone(),
                    statuses,
                    hub.subscribe_view(),
                ));
            }
            tasks.spawn(kube_source::write_peer_statuses(
                client.clone(),
                hub.subscribe_view(),
            ));
            tasks.spawn(trellis_controller::kube_settings::run(
                client.clone(),
                settings_namespace.clone(),
                settings_config_map.clone(),
                hub.clone(),
            ));
            tasks.spawn(trellis_controller::import_writer::run(
                client,
                hub.clone(),
                cfg.lease(),
            ));
        }
        if cfg.flows.enabled {
            let addr = cfg.flows.listen;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the flows listener {addr}"))?;
            hub.flows().set_enabled(true);
            tracing::info!(%addr, "serving flows (GET /flows)");
            tasks.spawn(trellis_controller::flows::serve(
                listener,
                hub.flows().clone(),
            ));
        }
        let mut agent_tls = None;
        if let Some(addr) = cfg.agent_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the agent listener {addr}"))?;
            let auth = match (cfg.agent_tls_files(), &cfg.agent_token_file) {
                (Some((ca, cert, key, self_issued)), _) => {
                    if self_issued {
                        // No certificate files given: this controller's own agent.<id>.trellis from
                        // the agent CA key (issued at every start, so a new CA or ID takes effect),
                        // renewed before it expires.
                        let bootstrap = cfg
                            .node_bootstrap
                            .as_ref()
                            .context("agentTls without cert needs nodeBootstrap.caKey")?;
                        let ca_key = trellis_controller::certs::CertifiedKey {
                            cert_pem: read(&ca)?,
                            key_pem: read_ca_key(&bootstrap.ca_key)?,
                        };
                        trellis_controller::agent_certs::write_controller_cert(
                            &ca_key,
                            id.as_str(),
                            &cert,
                            &key,
                        )
                        .context("issuing the controller's agent certificate")?;
                        tracing::info!(cluster = %id, cert = %cert.display(), "issued this controller's agent certificate from the agent CA");
                        tasks.spawn(renew_controller_cert(
                            ca.clone(),
                            bootstrap.ca_key.clone(),
                            id.to_string(),
                            cert.clone(),
                            key.clone(),
                        ));
                    }
                    let files = trellis_agent_client::TlsFiles {
                        ca: ca.clone(),
                        cert,
                        key,
                    };
                    let agent_tls_err = |e: trellis_agent_client::TlsError| {
                        anyhow::anyhow!("agent TLS: {}", trellis_core::error_chain(&e))
                    };
                    match (&cfg.node_bootstrap, &client) {
                        (Some(bootstrap), Some(client)) => {
                            let tls = Arc::new(
                                agent::ServerTls::load_allowing_bootstrap(files)
                                    .map_err(agent_tls_err)?,
                            );
                            agent_tls = Some(tls.clone());
                            let issuer = trellis_controller::node_certs::NodeIssuer {
                                client: client.clone(),
                                ca: trellis_controller::certs::CertifiedKey {
                                    cert_pem: read(&ca)?,
                                    key_pem: read_ca_key(&bootstrap.ca_key)?,
                                },
                                cluster: tls.material().identity.cluster().to_owned(),
                                service_account: bootstrap
                                    .service_account()
                                    .context("nodeBootstrap.serviceAccount")?,
                                dns_service_account: bootstrap.dns_service_account(),
                            };
                            agent::AgentAuth::TlsWithBootstrap(tls, Arc::new(issuer))
                        }
                        _ => {
                            let tls =
                                Arc::new(agent::ServerTls::load(files).map_err(agent_tls_err)?);
                            agent_tls = Some(tls.clone());
                            agent::AgentAuth::Tls(tls)
                        }
                    }
                }
                (None, Some(path)) => {
                    agent::AgentAuth::LegacyToken(Some(read(path)?.trim().into()))
                }
                (None, None) => agent::AgentAuth::LegacyToken(None),
            };
            tasks.spawn(agent::serve(
                listener,
                hub.clone(),
                cfg.max_frame_bytes,
                auth,
            ));
        }
        tasks.spawn(watch_config(
            config_path.clone(),
            Arc::new(cfg.clone()),
            hub.clone(),
        ));
        let peering = Peering::start(
            PeeringConfig {
                listen: cfg.listen,
                peers: cfg
                    .peers
                    .iter()
                    .map(|p| PeerConfig {
                        id: p.id.clone(),
                        endpoint: p.endpoint,
                    })
                    .collect(),
                heartbeat: cfg.heartbeat(),
                lease: cfg.lease(),
                max_frame: cfg.max_frame_bytes,
                backoff_min: Duration::from_millis(500),
                backoff_max: Duration::from_secs(30),
                max_pending_handshakes: 64,
                tls,
            },
            hub.clone(),
        )?;
        tracing::info!(
            cluster = %id,
            listen = %peering.local_addr()?,
            peers = cfg.peers.len(),
            "trellis-controller running"
        );
        // Serving: ready, and from now on the Services' traffic may come here.
        metrics.ready.set(1);
        let _ = leading_tx.send(true);
        let certificates = watch_certificates(&peering, &cfg, agent_tls, hub.metrics().clone());
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
            () = certificates => {},
        }
        tracing::info!("shutting down");
        metrics.ready.set(0);
        // The agent server and the API writers first: peering's close may take seconds.
        tasks.abort_all();
        peering.shutdown().await;
        anyhow::Ok(())
    };
    let led = match elector.as_mut() {
        Some(elector) => leader::while_leading(elector, lead).await,
        None => Ok(lead.await),
    };
    // Whatever the leader spawned stops here (its peering stopped with `lead`).
    metrics.ready.set(0);
    tasks.shutdown().await;
    match led {
        // Another replica leads (or may soon): this one restarts as a follower rather than
        // ever act beside it.
        Err(lost) => {
            anyhow::bail!("lost leadership ({lost}); exiting to restart as a follower")
        }
        Ok(result) => result?,
    }
    // The listeners are closed: the next leader (on this machine too) can bind them now.
    if let Some(elector) = elector.as_mut() {
        elector.release().await;
    }
    // The next leader takes the label off this pod too; doing it here sends no traffic to a
    // stopped process meanwhile. Bounded: shutdown must not hang on the API.
    if let Some(labeler) = labeler {
        match tokio::time::timeout(Duration::from_secs(2), labeler.unlabel_self()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %trellis_core::error_chain(&e), "removing the leader label at shutdown (the next leader removes it)")
            }
            Err(_) => tracing::warn!(
                "removing the leader label at shutdown timed out (the next leader removes it)"
            ),
        }
    }
    Ok(())
}

/// The leader pod labeller, on Kubernetes with a Lease, `leaderElection.podSelector` and env
/// POD_NAME and POD_NAMESPACE (the chart sets all three); otherwise none (the lab shares one
/// address between its replicas: nothing to label).
fn leader_pod_labeler(cfg: &Config, client: Option<&kube::Client>) -> Option<PodLabeler> {
    let selector = cfg.leader_pod_selector()?;
    let client = client?;
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    match (env("POD_NAME"), env("POD_NAMESPACE")) {
        (Some(pod), Some(namespace)) => {
            tracing::info!(%pod, %namespace, %selector, "the leader labels its pod {}=true", pod_label::LEADER_LABEL);
            Some(PodLabeler::new(client.clone(), &namespace, selector, &pod))
        }
        _ => {
            tracing::warn!(
                "leaderElection.podSelector is set but env POD_NAME or POD_NAMESPACE is not: no pod label marks the leader"
            );
            None
        }
    }
}

async fn stop_following(mut tasks: tokio::task::JoinSet<()>) -> Result<()> {
    tracing::info!("shutting down (following)");
    tasks.shutdown().await;
    Ok(())
}

/// Issues this controller's own agent certificate again when it is due (looked at hourly);
/// the agent port reloads the files.
async fn renew_controller_cert(
    ca: PathBuf,
    ca_key: PathBuf,
    cluster: String,
    cert: PathBuf,
    key: PathBuf,
) {
    let identity = trellis_core::agent::AgentIdentity::Controller {
        cluster: cluster.clone(),
    };
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        if !trellis_controller::agent_certs::controller_cert_due(&cert, &identity) {
            continue;
        }
        let issued = read(&ca).and_then(|cert_pem| {
            let ca = trellis_controller::certs::CertifiedKey {
                cert_pem,
                key_pem: read_ca_key(&ca_key)?,
            };
            trellis_controller::agent_certs::write_controller_cert(&ca, &cluster, &cert, &key)
                .map_err(anyhow::Error::from)
        });
        match issued {
            Ok(()) => tracing::info!(%cluster, "renewed this controller's agent certificate"),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "renewing this controller's agent certificate (retried in an hour)")
            }
        }
    }
}

/// How often certificate files are looked at (three `stat`s each; read only when changed).
const CERTIFICATE_CHECK: Duration = Duration::from_secs(2);

/// Re-reads the peering and agent certificate files when they change (new handshakes use the
/// new ones; open connections stay), and exports when each one in use expires.
async fn watch_certificates(
    peering: &Peering,
    cfg: &Config,
    agent_tls: Option<Arc<agent::ServerTls>>,
    metrics: Metrics,
) {
    let stamp = |paths: &[&PathBuf]| -> Vec<Option<(u64, std::time::SystemTime)>> {
        paths
            .iter()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((
                    std::os::unix::fs::MetadataExt::ino(&m) ^ m.len(),
                    m.modified().ok()?,
                ))
            })
            .collect()
    };
    let files = [&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key];
    let expiry = |pem: &str| {
        trellis_controller::tls::parse_certs(pem)
            .ok()
            .and_then(|certs| {
                certs
                    .iter()
                    .filter_map(|c| trellis_agent_client::tls::not_after(c))
                    .min()
            })
    };
    let gauge = |name: &str, value: Option<i64>| {
        if let Some(value) = value {
            metrics
                .certificate_expiry
                .with_label_values(&[name])
                .set(value);
        }
    };
    let mut seen = None;
    loop {
        let now = stamp(&files);
        if seen.as_ref() != Some(&now) {
            let material = read(&cfg.tls.ca).and_then(|ca_pem| {
                Ok(TlsMaterial {
                    ca_pem,
                    cert_pem: read(&cfg.tls.cert)?,
                    key_pem: read(&cfg.tls.key)?,
                })
            });
            match material.map_err(|e| format!("{e:#}")).and_then(|m| {
                if seen.is_some() {
                    peering
                        .reload_tls(&m)
                        .map_err(|e| trellis_core::error_chain(&e))?;
                    tracing::info!(cert = %cfg.tls.cert.display(), "peering certificate files changed: reloaded (new handshakes use them)");
                }
                Ok(m)
            }) {
                Ok(m) => {
                    gauge("peering", expiry(&m.cert_pem));
                    gauge("mesh_ca", expiry(&m.ca_pem));
                    seen = Some(now);
                }
                // Retried at the next look: a writer may be half-way.
                Err(e) => tracing::warn!(error = %e, "peering certificate files changed but do not load; keeping the last good ones"),
            }
        }
        if let Some(tls) = &agent_tls {
            let material = tls.material();
            gauge("agent", Some(material.expiry.cert));
            gauge("agent_ca", Some(material.expiry.ca));
        }
        tokio::time::sleep(CERTIFICATE_CHECK).await;
    }
}

/// Re-reads the configuration file and applies what can change at runtime (node encryption);
/// anything else needs a restart, which it says.
async fn watch_config(path: PathBuf, initial: Arc<Config>, hub: Hub) {
    let mut current = (*initial).clone();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        match Config::parse(&text) {
            Ok(next) if next != current => {
                if next.node_encryption != current.node_encryption {
                    hub.set_node_encryption(next.node_encryption);
                }
                let mut rest = next.clone();
                rest.node_encryption = current.node_encryption;
                if rest != current {
                    tracing::warn!(
                        "configuration changed beyond nodeEncryption; restart to apply it"
                    );
                }
                current = next;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %trellis_core::error_chain(&e), "ignoring an invalid configuration change")
            }
        }
    }
}
