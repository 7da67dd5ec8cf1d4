//! The DNS input: a plain snapshot of the services exported in the mesh, as the mesh controller
//! streams them (or as a JSON file holds them). It carries no DNS knowledge; `zone` turns it
//! into records.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
/// Ports and endpoints are the mesh's own types (`trellis_core::cluster`): a catalog file may
/// give a port without `protocol` (TCP) and an endpoint with one `address` and no `ready`
/// (ready).
pub use trellis_core::cluster::{Endpoint, Protocol, ServicePort};

use crate::Error;

/// Every service imported into this cluster (exported anywhere in the clusterset), at one
/// revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Monotonic revision of the snapshot; becomes the SOA serial (low 32 bits).
    #[serde(default)]
    pub revision: u64,
    /// One entry per imported service `<name>.<namespace>`.
    #[serde(default)]
    pub services: Vec<ServiceImport>,
}

/// One imported service (a ServiceImport): its type, its clusterset IPs, its ports and the
/// endpoints every exporting cluster contributes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceImport {
    /// Service name (a DNS label).
    pub name: String,
    /// Namespace (a DNS label).
    pub namespace: String,
    /// A headless import: its name answers every ready endpoint of every cluster. Otherwise
    /// (ClusterSetIP) it answers the clusterset IPs.
    #[serde(default)]
    pub headless: bool,
    /// The clusterset IPs (IPv4 and/or IPv6) of a ClusterSetIP import in this cluster; empty
    /// until allocated (the name then has no addresses). Ignored when `headless`.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The service's ports: SRV records at the service name, and at `_<port>._<proto>` for
    /// the named ones.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// The exporting clusters' endpoints (used when `headless`); a cluster whose lease
    /// expired must simply be left out.
    #[serde(default)]
    pub clusters: Vec<ClusterEndpoints>,
}

/// One exporting cluster's endpoints of a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterEndpoints {
    /// Cluster ID (a DNS label): `<hostname>.<cluster>.<svc>.<ns>.svc.<zone>` names its
    /// headless endpoints.
    pub cluster: String,
    /// Endpoints; only the ready ones are published.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

impl Catalog {
    /// Parses a catalog from JSON text.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        serde_json::from_str(text).map_err(|source| Error::ParseCatalog { source })
    }
}

/// Whether `label` is a valid DNS label for a name we publish (RFC 1123 host label, lower or
/// upper case; `_` is tolerated as Kubernetes port names do not use it but hostnames may).
pub(crate) fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape() {
        let catalog = Catalog::from_json(
            r#"{"revision": 7, "services": [
                {"name": "web", "namespace": "shop", "ips": ["10.96.0.10", "fd00::10"],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80}, {"port": 81}],
                 "clusters": [{"cluster": "east"}, {"cluster": "west"}]},
                {"name": "db", "namespace": "shop", "headless": true, "clusters": [
                 {"cluster": "west", "endpoints": [{"address": "10.1.0.5", "hostname": "web-0"}, {"address": "10.1.0.6"}]}]}
            ]}"#,
        )
        .unwrap();
        assert_eq!(catalog.revision, 7);
        let [web, db] = &catalog.services[..] else {
            panic!("{catalog:?}");
        };
        assert!(!web.headless && web.ips.len() == 2 && web.clusters.len() == 2);
        assert_eq!(web.ports[1].protocol, Protocol::Tcp);
        assert_eq!(web.ports[1].name, None);
        assert!(db.headless);
        let endpoints = &db.clusters[0].endpoints;
        assert_eq!(endpoints[0].hostname.as_deref(), Some("web-0"));
        assert_eq!(endpoints[1].addresses.len(), 1);
        assert!(endpoints[1].ready);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_addresses() {
        assert!(Catalog::from_json(r#"{"servicez": []}"#).is_err());
        assert!(
            Catalog::from_json(
                r#"{"services": [{"name": "a", "namespace": "b", "ips": ["10.0.0.300"]}]}"#
            )
            .is_err()
        );
        // The per-cluster service IPs of the old format are gone: a cluster carries endpoints.
        assert!(
            Catalog::from_json(
                r#"{"services": [{"name": "a", "namespace": "b", "clusters": [{"cluster": "c", "ips": ["10.0.0.3"]}]}]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn labels() {
        assert!(valid_label("web-0"));
        assert!(!valid_label(""));
        assert!(!valid_label("-a"));
        assert!(!valid_label("a.b"));
        assert!(!valid_label(&"a".repeat(64)));
    }
}
