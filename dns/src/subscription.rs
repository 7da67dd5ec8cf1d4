//! The controller as the source of the catalog: the cluster's mesh controller streams
//! [`ImportsUpdate`]s on its agent port (4-byte big-endian length + JSON, after an
//! [`AgentHello::dns`]); each applied update is mapped to a [`Catalog`] and published.
//!
//! [`catalog_from_imports`] and [`Backoff`] are pure; [`run`] is the IO loop. On a disconnect,
//! a gap in the revisions or a bad frame the server keeps answering from the last catalog and
//! reconnects (capped exponential backoff with jitter); a new connection starts with a fresh
//! snapshot.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};
use trellis_core::agent::AgentHello;
use trellis_core::cluster::ServiceKind;
use trellis_core::framing::{FrameDecoder, FrameError, encode_json_frame};
use trellis_core::imports::{Imports, ImportsUpdate};

use crate::catalog::ZoneHandle;
use crate::metrics::Metrics;
use crate::model::{Catalog, ClusterExport, ServiceImport};

/// The largest frame accepted from the controller by default.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;
/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to subscribe.
#[derive(Clone)]
pub struct ControllerSource {
    /// The controller's agent port, `HOST:PORT`.
    pub addr: String,
    /// The shared agent token, if the controller requires one.
    pub token: Option<String>,
    /// The largest frame accepted; a larger one closes the connection.
    pub max_frame: usize,
}

impl std::fmt::Debug for ControllerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerSource")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_frame", &self.max_frame)
            .finish()
    }
}

/// The catalog DNS serves for `imports`: one entry per imported service, one cluster export
/// per backend, only ready endpoints.
pub fn catalog_from_imports(imports: &Imports) -> Catalog {
    let services = imports
        .services
        .values()
        .map(|svc| {
            let headless = svc.kind == ServiceKind::Headless;
            ServiceImport {
                name: svc.name.clone(),
                namespace: svc.namespace.clone(),
                clusters: svc
                    .backends
                    .iter()
                    .map(|b| ClusterExport {
                        cluster: b.cluster.as_str().to_string(),
                        local: b.local,
                        ips: if headless {
                            Vec::new()
                        } else {
                            b.cluster_ips.clone()
                        },
                        ports: svc.ports.clone(),
                        headless,
                        endpoints: b.endpoints.iter().filter(|e| e.ready).cloned().collect(),
                    })
                    .collect(),
            }
        })
        .collect();
    Catalog {
        revision: imports.revision,
        services,
    }
}

/// Capped exponential reconnect delays with jitter: each delay is drawn in `[d/2, d]` where
/// `d` doubles from [`BACKOFF_MIN`] up to [`BACKOFF_MAX`].
#[derive(Debug, Clone)]
pub struct Backoff {
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            current: BACKOFF_MIN,
        }
    }
}

impl Backoff {
    /// The next delay; `random` is any `u64` (the jitter).
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let d = self.current;
        self.current = (d * 2).min(BACKOFF_MAX);
        let half = d.as_millis() as u64 / 2;
        Duration::from_millis(half + random % (half + 1))
    }

    /// Back to the shortest delay (after a connection delivered a snapshot).
    pub fn reset(&mut self) {
        self.current = BACKOFF_MIN;
    }
}

/// Why a connection ended; [`Ended::reason`] labels `trellis_dns_controller_errors_total`.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("connecting")]
    Connect(#[source] std::io::Error),
    #[error("encoding the hello")]
    EncodeHello(#[source] FrameError),
    #[error("sending the hello")]
    Hello(#[source] std::io::Error),
    #[error("reading")]
    Read(#[source] std::io::Error),
    #[error("the controller closed the stream")]
    Closed,
    #[error("reading a frame")]
    Frame(#[source] FrameError),
    #[error("a delta does not follow revision {have}")]
    Gap { have: u64 },
}

impl Ended {
    fn reason(&self) -> &'static str {
        match self {
            Ended::Connect(_) => "connect",
            Ended::EncodeHello(_) | Ended::Hello(_) => "hello",
            Ended::Read(_) => "read",
            Ended::Closed => "closed",
            Ended::Frame(FrameError::TooLarge { .. }) => "oversized_frame",
            Ended::Frame(_) => "malformed_frame",
            Ended::Gap { .. } => "gap",
        }
    }
}

/// A timeout as an IO error ("timed out").
fn timed_out() -> std::io::Error {
    std::io::ErrorKind::TimedOut.into()
}

/// Subscribes to the controller forever, publishing every change to `handle`.
pub async fn run(handle: ZoneHandle, source: ControllerSource, metrics: Metrics) {
    let mut backoff = Backoff::default();
    loop {
        let ended = session(&handle, &source, &metrics, &mut backoff).await;
        metrics.controller_connected.set(0);
        metrics
            .controller_errors
            .with_label_values(&[ended.reason()])
            .inc();
        let delay = backoff.next_delay(rand::random());
        warn!(
            controller = %source.addr,
            error = %trellis_core::error_chain(&ended),
            retry_ms = delay.as_millis() as u64,
            "controller subscription ended; serving the last catalog"
        );
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    handle: &ZoneHandle,
    source: &ControllerSource,
    metrics: &Metrics,
    backoff: &mut Backoff,
) -> Ended {
    let mut stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&source.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Ended::Connect(e),
            Err(_) => return Ended::Connect(timed_out()),
        };
    // The stream may be idle for long: keepalives find a controller that vanished.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5));
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        warn!(error = %e, "setting TCP keepalive on the controller stream");
    }
    let hello = match encode_json_frame(&AgentHello::dns(source.token.clone()), "hello", 1 << 20) {
        Ok(f) => f,
        Err(e) => return Ended::EncodeHello(e),
    };
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&hello)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Ended::Hello(e),
        Err(_) => return Ended::Hello(timed_out()),
    }
    info!(controller = %source.addr, "subscribed to the controller");
    metrics.controller_connected.set(1);
    let mut decoder = FrameDecoder::new(source.max_frame);
    let mut imports: Option<Imports> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        loop {
            let update = match decoder.next_json::<ImportsUpdate>() {
                Ok(Some(u)) => u,
                Ok(None) => break,
                Err(e) => return Ended::Frame(e),
            };
            // A connection starts with a snapshot; a delta before one is a gap too.
            let current = match (&mut imports, &update) {
                (Some(current), _) => current,
                (None, ImportsUpdate::Snapshot(_)) => imports.insert(Imports::default()),
                (None, ImportsUpdate::Delta { .. }) => return Ended::Gap { have: 0 },
            };
            if !current.apply(&update) {
                return Ended::Gap {
                    have: current.revision,
                };
            }
            if matches!(update, ImportsUpdate::Snapshot(_)) {
                backoff.reset();
            }
            metrics.controller_updates.inc();
            let catalog = catalog_from_imports(current);
            let (revision, services) = (catalog.revision, catalog.services.len());
            // Building the zone and its precomputed answers is CPU work: off the runtime.
            let publisher = handle.clone();
            match tokio::task::spawn_blocking(move || publisher.publish(&catalog)).await {
                Ok(skipped) => info!(
                    revision,
                    services,
                    skipped = skipped.len(),
                    "catalog from the controller published"
                ),
                Err(e) => warn!(error = %e, "publishing the catalog failed"),
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) => return Ended::Closed,
            Ok(n) => decoder.push(&buf[..n]),
            Err(e) => return Ended::Read(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use trellis_core::cluster::fixture::id;
    use trellis_core::cluster::{self, Endpoint as CoreEndpoint, Protocol, ServicePort};
    use trellis_core::imports::{Backend, ImportedService};

    fn core_port(
        name: Option<&str>,
        protocol: cluster::Protocol,
        port: u16,
    ) -> cluster::ServicePort {
        cluster::ServicePort {
            name: name.map(Into::into),
            protocol,
            port,
        }
    }

    fn ep(addrs: &[&str], hostname: Option<&str>, ready: bool) -> CoreEndpoint {
        CoreEndpoint {
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            hostname: hostname.map(Into::into),
            node: None,
            ready,
        }
    }

    fn imports() -> Imports {
        let web = ImportedService {
            namespace: "shop".into(),
            name: "web".into(),
            kind: ServiceKind::ClusterSetIP,
            ports: vec![
                core_port(Some("http"), cluster::Protocol::Tcp, 80),
                core_port(Some("dns"), cluster::Protocol::Udp, 53),
                core_port(None, cluster::Protocol::Sctp, 99),
            ],
            backends: vec![
                Backend {
                    cluster: id("east"),
                    local: true,
                    cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
                    endpoints: vec![ep(&["10.1.0.5"], None, true)],
                },
                Backend {
                    cluster: id("west"),
                    local: false,
                    cluster_ips: vec!["10.97.0.10".parse().unwrap()],
                    endpoints: vec![],
                },
            ],
        };
        let db = ImportedService {
            namespace: "shop".into(),
            name: "db".into(),
            kind: ServiceKind::Headless,
            ports: vec![core_port(Some("pg"), cluster::Protocol::Tcp, 5432)],
            backends: vec![Backend {
                cluster: id("west"),
                local: false,
                cluster_ips: vec![],
                endpoints: vec![
                    ep(&["10.2.0.5", "fd00:2::5"], Some("db-0"), true),
                    ep(&["10.2.0.6"], Some("db-1"), false),
                    ep(&["10.2.0.7"], None, true),
                ],
            }],
        };
        let mut services = BTreeMap::new();
        services.insert("shop/web".to_string(), web);
        services.insert("shop/db".to_string(), db);
        Imports {
            revision: 7,
            services,
        }
    }

    #[test]
    fn maps_imports_to_the_catalog() {
        let catalog = catalog_from_imports(&imports());
        assert_eq!(catalog.revision, 7);
        assert_eq!(catalog.services.len(), 2);
        let web = catalog.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.namespace, "shop");
        assert_eq!(web.clusters.len(), 2);
        let east = &web.clusters[0];
        assert_eq!(east.cluster, "east");
        assert!(east.local && !east.headless);
        assert_eq!(
            east.ips,
            vec![
                "10.96.0.10".parse::<std::net::IpAddr>().unwrap(),
                "fd00::10".parse().unwrap()
            ]
        );
        assert_eq!(
            east.ports,
            vec![
                ServicePort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80
                },
                ServicePort {
                    name: Some("dns".into()),
                    protocol: Protocol::Udp,
                    port: 53
                },
                ServicePort {
                    name: None,
                    protocol: Protocol::Sctp,
                    port: 99
                },
            ]
        );
        let west = &web.clusters[1];
        assert_eq!(west.cluster, "west");
        assert!(!west.local);
        assert_eq!(
            west.ips,
            vec!["10.97.0.10".parse::<std::net::IpAddr>().unwrap()]
        );

        let db = catalog.services.iter().find(|s| s.name == "db").unwrap();
        assert_eq!(db.clusters.len(), 1);
        let west = &db.clusters[0];
        assert!(west.headless && west.ips.is_empty());
        // Only ready endpoints, as they came.
        assert_eq!(
            west.endpoints,
            vec![
                ep(&["10.2.0.5", "fd00:2::5"], Some("db-0"), true),
                ep(&["10.2.0.7"], None, true),
            ]
        );
        // The mapped catalog builds a zone with nothing skipped.
        let zone = crate::zone::Zone::build(
            crate::zone::ZoneConfig::new("clusterset.local", 5).unwrap(),
            &catalog,
        );
        assert!(zone.skipped().is_empty(), "{:?}", zone.skipped());
    }

    #[test]
    fn a_cluster_absent_from_the_imports_is_absent_from_the_catalog() {
        let mut imports = imports();
        for svc in imports.services.values_mut() {
            svc.backends.retain(|b| b.cluster != id("west"));
        }
        imports.services.retain(|_, s| !s.backends.is_empty());
        let catalog = catalog_from_imports(&imports);
        assert_eq!(catalog.services.len(), 1);
        assert!(
            catalog
                .services
                .iter()
                .flat_map(|s| &s.clusters)
                .all(|c| c.cluster == "east")
        );
        assert_eq!(
            catalog_from_imports(&Imports::default()),
            Catalog::default()
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::default();
        let lows: Vec<u64> = (0..8).map(|_| b.next_delay(0).as_millis() as u64).collect();
        assert_eq!(lows, [50, 100, 200, 400, 800, 1600, 2500, 2500]);
        let mut b = Backoff::default();
        for _ in 0..20 {
            let d = b.next_delay(u64::MAX);
            assert!(d >= BACKOFF_MIN / 2 && d <= BACKOFF_MAX, "{d:?}");
        }
        assert_eq!(b.next_delay(2500), BACKOFF_MAX);
        b.reset();
        assert!(b.next_delay(7) <= BACKOFF_MIN);
    }
}
