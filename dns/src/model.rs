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

/// Every service exported anywhere in the mesh that this cluster imports, at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Monotonic revision of the snapshot; becomes the SOA serial (low 32 bits).
    #[serde(default)]
    pub revision: u64,
    /// One entry per exported service `<name>.<namespace>`.
    #[serde(default)]
    pub services: Vec<ServiceImport>,
}

/// One exported service and the clusters exporting it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceImport {
    /// Service name (a DNS label).
    pub name: String,
    /// Namespace (a DNS label).
    pub namespace: String,
    /// The clusters exporting it; a cluster whose lease expired must simply be left out.
    #[serde(default)]
    pub clusters: Vec<ClusterExport>,
}

/// One cluster's export of a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterExport {
    /// Cluster name (a DNS label); it appears in SRV targets and per-cluster names.
    pub cluster: String,
    /// True for the cluster this DNS server runs in.
    #[serde(default)]
    pub local: bool,
    /// Service (cluster) IPs, IPv4 and/or IPv6. Ignored when `headless`.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Service ports; only named ports get SRV records.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Headless service: answers carry the ready endpoints instead of service IPs.
    #[serde(default)]
    pub headless: bool,
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
            r#"{"revision": 7, "services": [{"name": "web", "namespace": "shop", "clusters": [
                {"cluster": "east", "local": true, "ips": ["10.96.0.10", "fd00::10"],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80}, {"port": 81}]},
                {"cluster": "west", "headless": true,
                 "endpoints": [{"address": "10.1.0.5", "hostname": "web-0"}, {"address": "10.1.0.6"}]}
            ]}]}"#,
        )
        .unwrap();
        assert_eq!(catalog.revision, 7);
        let clusters = &catalog.services[0].clusters;
        assert_eq!(clusters[0].ports[1].protocol, Protocol::Tcp);
        assert_eq!(clusters[0].ports[1].name, None);
        assert!(clusters[1].headless);
        assert_eq!(clusters[1].endpoints[0].hostname.as_deref(), Some("web-0"));
        assert_eq!(clusters[1].endpoints[1].addresses.len(), 1);
        assert!(clusters[1].endpoints[1].ready);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_addresses() {
        assert!(Catalog::from_json(r#"{"servicez": []}"#).is_err());
        assert!(
            Catalog::from_json(
                r#"{"services": [{"name": "a", "namespace": "b", "clusters": [{"cluster": "c", "ips": ["10.0.0.300"]}]}]}"#
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
