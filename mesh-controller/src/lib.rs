//! `trellis-controller`: the per-cluster brain of Trellis.
//!
//! It builds the cluster's [`ClusterState`](trellis_core::cluster::ClusterState) from a source
//! (Kubernetes or a static file), exchanges it with the controllers of peer clusters over QUIC
//! with mutual TLS, and streams the merged desired state to the node gateways and the imported
//! services to DNS.

pub mod agent;
pub mod certs;
pub mod config;
pub mod crd;
pub mod gateway;
pub mod hub;
pub mod import_writer;
pub mod kube_settings;
pub mod kube_source;
pub mod mesh;
pub mod metrics;
pub mod objects;
pub mod peering;
pub mod static_source;
pub mod store;
pub mod tls;

/// The errors of the controller library, named after the failing operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{operation}: {reason}")]
    Certificate {
        operation: &'static str,
        reason: String,
    },
    #[error("{operation}: {reason}")]
    Tls {
        operation: &'static str,
        reason: String,
    },
    #[error("{operation}: {reason}")]
    Quic {
        operation: &'static str,
        reason: String,
    },
    #[error("{operation}: {reason}")]
    Kubernetes {
        operation: &'static str,
        reason: String,
    },
    #[error("parsing Kubernetes objects, document {document}: {reason}")]
    ParseObjects { document: usize, reason: String },
    #[error("{operation}: {reason}")]
    Store {
        operation: &'static str,
        reason: String,
    },
    #[error("invalid configuration: {reason}")]
    Config { reason: String },
    #[error("{operation}: {reason}")]
    Metrics {
        operation: &'static str,
        reason: String,
    },
}
