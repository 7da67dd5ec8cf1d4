//! `trellis-controller`: the per-cluster brain of Trellis.
//!
//! It builds the cluster's [`ClusterState`](trellis_core::cluster::ClusterState) from a source
//! (Kubernetes or a static file), exchanges it with the controllers of peer clusters over QUIC
//! with mutual TLS, and streams the merged desired state to the node gateways and the imported
//! services to DNS.

pub mod agent;
pub mod agent_certs;
pub mod certs;
pub mod certs_command;
pub mod config;
pub mod crd;
pub mod flows;
pub mod gateway;
pub mod gateways;
pub mod hub;
pub mod identities;
pub mod import_writer;
pub mod kube_settings;
pub mod kube_source;
pub mod leader;
pub mod mesh;
pub mod metrics;
pub mod node_certs;
pub mod objects;
pub mod peering;
pub mod policy_source;
pub mod policy_view;
pub mod sessions;
pub mod source;
pub mod static_source;
pub mod status;
pub mod store;
pub mod tls;

/// The errors of the controller library, named after the failing operation. The cause is
/// kept typed in `source()`, never repeated in the message: print with
/// [`trellis_core::error_chain`] to see it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{operation}")]
    Certificate {
        operation: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{operation} {}", path.display())]
    CertificateFile {
        operation: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{operation}")]
    Tls {
        operation: &'static str,
        #[source]
        source: TlsCause,
    },
    #[error("{operation}")]
    Quic {
        operation: &'static str,
        #[source]
        source: QuicCause,
    },
    #[error("binding the peering endpoint {addr}")]
    BindPeering {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{operation}")]
    Kubernetes {
        operation: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("reading the cluster ID from the ClusterProperty")]
    ClusterIdProperty {
        #[source]
        source: trellis_core::cluster::ClusterError,
    },
    #[error("merging the versions of a CRD")]
    MergeCrd {
        #[source]
        source: kube::core::crd::MergeError,
    },
    #[error("serialising a CRD")]
    SerializeCrd {
        #[source]
        source: serde_norway::Error,
    },
    #[error("parsing Kubernetes objects, document {document}")]
    ParseDocument {
        document: usize,
        #[source]
        source: serde_norway::Error,
    },
    #[error("parsing Kubernetes objects, document {document}: {kind}")]
    ParseObject {
        document: usize,
        kind: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("parsing Kubernetes objects, document {document}: object without a kind")]
    ObjectWithoutKind { document: usize },
    #[error("{operation} {}", path.display())]
    StoreFile {
        operation: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the state file {}", path.display())]
    StoreParse {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("parsing the state file {}: version {found} is not {expected}", path.display())]
    StoreVersion {
        path: std::path::PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("parsing the state in ConfigMap {config_map}")]
    StoreConfigMapParse {
        config_map: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the state in ConfigMap {config_map}: version {found} is not {expected}")]
    StoreConfigMapVersion {
        config_map: String,
        found: u32,
        expected: u32,
    },
    /// Kubernetes refuses objects over 1 MiB: the previous state stays.
    #[error(
        "the state is {bytes} bytes, over the {limit} a ConfigMap takes; keeping the previous one"
    )]
    StoreTooLarge { bytes: usize, limit: usize },
    #[error("encoding the state")]
    StoreEncode {
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid configuration: reading the YAML")]
    ConfigYaml {
        #[source]
        source: serde_norway::Error,
    },
    #[error("invalid configuration")]
    ConfigFields {
        #[source]
        source: serde_json::Error,
    },
    /// A value that parsed but breaks a rule; the rule is the message (there is no cause).
    #[error("invalid configuration: {reason}")]
    Config { reason: String },
    #[error("{operation}")]
    Metrics {
        operation: &'static str,
        #[source]
        source: prometheus::Error,
    },
}

/// Why TLS material or a certificate's identity was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsCause {
    #[error(transparent)]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("no certificate found")]
    NoCertificate,
    #[error("{0:?}")]
    Webpki(webpki::Error),
    #[error("the certificate names no <id>.cluster.trellis")]
    NoIdentity,
    #[error("the certificate names several clusters")]
    SeveralIdentities,
    #[error(
        "the certificate is for cluster {certified}, but this controller is cluster {configured}"
    )]
    OtherCluster {
        certified: trellis_core::cluster::ClusterId,
        configured: trellis_core::cluster::ClusterId,
    },
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Why the QUIC endpoint or a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum QuicCause {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Bounds(#[from] quinn::VarIntBoundsExceeded),
    #[error(transparent)]
    CipherSuite(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error("timed out")]
    TimedOut(#[from] tokio::time::error::Elapsed),
    #[error("no async runtime")]
    NoRuntime,
    #[error("the peer does not speak trellis/1")]
    Alpn,
}
