//! The controller as the source of the catalog: the cluster's mesh controller streams
//! [`ImportsUpdate`](trellis_core::imports::ImportsUpdate)s on its agent port, followed with
//! the shared agent client ([`trellis_agent_client`]: mutual TLS as the read-only DNS
//! identity, hello, keepalives, gap check, reconnect with backoff); each applied update is
//! mapped to a [`Catalog`] and published. On a disconnect, a gap or a bad frame the server
//! keeps answering from the last catalog; a new connection starts with a fresh snapshot.
//!
//! [`catalog_from_imports`] is pure; [`run`] is the IO loop.

use tokio::sync::watch;
use tracing::{info, warn};
use trellis_agent_client::{ClientConfig, Ended, Handler};
use trellis_core::agent::AgentRole;
use trellis_core::cluster::ServiceKind;
use trellis_core::imports::Imports;

use crate::catalog::ZoneHandle;
use crate::metrics::Metrics;
use crate::model::{Catalog, ClusterEndpoints, ServiceImport};

/// The largest frame accepted from the controller: the most it ever sends.
pub const DEFAULT_MAX_FRAME: usize = trellis_core::agent::MAX_AGENT_FRAME;

/// The catalog DNS serves for `imports`: one entry per imported service with its type, its
/// clusterset IPs (this cluster's VIPs, never the exporting clusters' own ClusterIPs, which
/// only their own cluster reaches), its resolved ports, and for a headless service every
/// backend's ready endpoints.
pub fn catalog_from_imports(imports: &Imports) -> Catalog {
    let services = imports
        .services
        .values()
        .map(|svc| {
            let headless = svc.kind == ServiceKind::Headless;
            ServiceImport {
                name: svc.name.clone(),
                namespace: svc.namespace.clone(),
                headless,
                ips: if headless {
                    Vec::new()
                } else {
                    svc.vips.clone()
                },
                ports: svc.ports.clone(),
                clusters: if headless {
                    svc.backends
                        .iter()
                        .map(|b| ClusterEndpoints {
                            cluster: b.cluster.as_str().to_string(),
                            endpoints: b.endpoints.iter().filter(|e| e.ready).cloned().collect(),
                        })
                        .collect()
                } else {
                    Vec::new()
                },
            }
        })
        .collect();
    Catalog {
        revision: imports.revision,
        services,
    }
}

/// Publishes every applied state to the zone.
struct Publisher {
    handle: ZoneHandle,
    metrics: Metrics,
}

impl Handler for Publisher {
    type State = Imports;

    async fn applied(&mut self, imports: &Imports) -> bool {
        self.metrics.controller_updates.inc();
        let catalog = catalog_from_imports(imports);
        let (revision, services) = (catalog.revision, catalog.services.len());
        // Building the zone and its precomputed answers is CPU work: off the runtime.
        let publisher = self.handle.clone();
        match tokio::task::spawn_blocking(move || publisher.publish(&catalog)).await {
            Ok(skipped) => info!(
                revision,
                services,
                skipped = skipped.len(),
                "catalog from the controller published"
            ),
            Err(e) => warn!(error = %e, "publishing the catalog failed"),
        }
        false
    }

    fn connected(&mut self, up: bool, ended: Option<&Ended>) {
        self.metrics.controller_connected.set(i64::from(up));
        if let Some(ended) = ended {
            self.metrics
                .controller_errors
                .with_label_values(&[ended.reason()])
                .inc();
        }
    }
}

/// Subscribes to the controller forever (as DNS: read-only), publishing every change to
/// `handle`.
pub async fn run(handle: ZoneHandle, source: ClientConfig, metrics: Metrics) {
    let (_hello, rx) = watch::channel(AgentRole::Dns);
    let mut publisher = Publisher { handle, metrics };
    let mut state = None;
    trellis_agent_client::follow(&source, rx, None, &mut publisher, &mut state).await;
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
            app_protocol: None,
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
            properties: Default::default(),
            oldest: "east".parse().unwrap(),
            conflicts: vec![],
            vips: vec![],
            ports: vec![
                core_port(Some("http"), cluster::Protocol::Tcp, 80),
                core_port(Some("dns"), cluster::Protocol::Udp, 53),
                core_port(None, cluster::Protocol::Sctp, 99),
            ],
            backends: vec![
                Backend {
                    cluster: id("east"),
                    endpoint_ports: vec![],
                    exported_at: None,
                    local: true,
                    cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
                    endpoints: vec![ep(&["10.1.0.5"], None, true)],
                },
                Backend {
                    cluster: id("west"),
                    endpoint_ports: vec![],
                    exported_at: None,
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
            properties: Default::default(),
            oldest: "east".parse().unwrap(),
            conflicts: vec![],
            vips: vec![],
            ports: vec![core_port(Some("pg"), cluster::Protocol::Tcp, 5432)],
            backends: vec![Backend {
                cluster: id("west"),
                endpoint_ports: vec![],
                exported_at: None,
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
        let mut imports = imports();
        imports.services.get_mut("shop/web").unwrap().vips =
            vec!["10.99.0.7".parse().unwrap(), "fd99::7".parse().unwrap()];
        let catalog = catalog_from_imports(&imports);
        assert_eq!(catalog.revision, 7);
        assert_eq!(catalog.services.len(), 2);
        let web = catalog.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.namespace, "shop");
        assert!(!web.headless);
        // The clusterset VIPs, not any cluster's own ClusterIPs.
        assert_eq!(
            web.ips,
            vec![
                "10.99.0.7".parse::<std::net::IpAddr>().unwrap(),
                "fd99::7".parse().unwrap()
            ]
        );
        assert!(web.clusters.is_empty(), "{:?}", web.clusters);
        assert_eq!(
            web.ports,
            vec![
                ServicePort::new(Some("http".into()), Protocol::Tcp, 80),
                ServicePort::new(Some("dns".into()), Protocol::Udp, 53),
                ServicePort::new(None, Protocol::Sctp, 99),
            ]
        );

        let db = catalog.services.iter().find(|s| s.name == "db").unwrap();
        assert!(db.headless && db.ips.is_empty());
        assert_eq!(db.clusters.len(), 1);
        let west = &db.clusters[0];
        assert_eq!(west.cluster, "west");
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
    fn without_a_vip_a_clusterset_ip_service_has_no_addresses() {
        let catalog = catalog_from_imports(&imports());
        let web = catalog.services.iter().find(|s| s.name == "web").unwrap();
        assert!(
            web.ips.is_empty(),
            "no cluster's own ClusterIP stands in: {web:?}"
        );
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
        assert_eq!(catalog.services[0].name, "web");
        assert_eq!(
            catalog_from_imports(&Imports::default()),
            Catalog::default()
        );
    }
}
