//! A gateway without a node certificate gets one (on Kubernetes), and DNS its read-only
//! identity: it generates a key (the private half never leaves the pod), sends a PKCS#10
//! request and its projected ServiceAccount token in an `AgentRole::Bootstrap` hello over TLS
//! (no client certificate), and receives its `<node>.node.<cluster>.trellis` (or
//! `dns.<cluster>.trellis`) certificate. [`renew_due`] says when to ask again; [`Renewer`]
//! keeps the files fresh.
//!
//! The controller must prove itself first: its certificate must chain to the agent CA given
//! (the cluster's own: one agent CA per cluster) **and** name `agent.<cluster>.trellis` with
//! the server-auth usage. The cluster may be given (`--cluster-id`), then it must be that one;
//! without it, the agent CA is pinned and the cluster is learnt from the controller's
//! certificate ([`ControllerVerifier`]). A certificate from another CA, or a node's or DNS's
//! certificate presented as a server, still fails the handshake before anything is sent. The
//! issued certificate must then name what was asked for, in that cluster.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_core::agent::{AgentHello, AgentIdentity, AgentRole, BootstrapIssued, NodeBootstrap};
use trellis_core::framing::{FrameDecoder, encode_json_frame};
use trellis_netns::Netns;

use crate::client::Ended;

/// What is asked for: a node's identity, or DNS's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Node(String),
    Dns,
}

impl Subject {
    /// The identity this subject has in `cluster`.
    pub fn identity(&self, cluster: &str) -> AgentIdentity {
        match self {
            Subject::Node(node) => AgentIdentity::Node {
                cluster: cluster.to_owned(),
                node: node.clone(),
            },
            Subject::Dns => AgentIdentity::Dns {
                cluster: cluster.to_owned(),
            },
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Node(node) => write!(f, "node {node}"),
            Subject::Dns => f.write_str("DNS"),
        }
    }
}

/// What the controller issued, with the key generated here.
#[derive(Clone)]
pub struct Issued {
    pub certificate_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    /// The cluster, as the controller's certificate (and the issued one) name it.
    pub cluster: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("certificate_pem", &self.certificate_pem)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

fn bad(what: impl std::fmt::Display) -> Ended {
    Ended::Hello(std::io::Error::other(what.to_string()))
}

/// Accepts a server certificate that chains to the pinned agent CA, has the server-auth usage
/// and names exactly one controller identity `agent.<cluster>.trellis` (of `cluster` when
/// given): the chain, usage, validity and name checks are webpki's, for that name.
#[derive(Debug)]
pub struct ControllerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    cluster: Option<String>,
}

impl ControllerVerifier {
    pub fn new(
        roots: Arc<rustls::RootCertStore>,
        cluster: Option<String>,
    ) -> Result<Self, rustls::client::VerifierBuilderError> {
        let inner =
            WebPkiServerVerifier::builder_with_provider(roots, crate::tls::provider()).build()?;
        Ok(Self { inner, cluster })
    }
}

/// The controller identity's cluster in `cert`, if it names exactly one controller.
pub fn controller_cluster(cert: &CertificateDer<'_>) -> Option<String> {
    let clusters: Vec<String> = crate::tls::identities_of(cert)
        .into_iter()
        .filter_map(|i| match i {
            AgentIdentity::Controller { cluster } => Some(cluster),
            _ => None,
        })
        .collect();
    match clusters.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

impl ServerCertVerifier for ControllerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refused =
            || rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        let cluster = controller_cluster(end_entity).ok_or_else(refused)?;
        if self.cluster.as_ref().is_some_and(|c| *c != cluster) {
            return Err(refused());
        }
        let name = AgentIdentity::Controller { cluster }.dns_name();
        let name = ServerName::try_from(name).map_err(|_| refused())?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Asks the controller at `address` for `node`'s certificate with `token`, the controller
/// required to be `agent.<cluster>.trellis`.
pub async fn bootstrap(
    address: &str,
    ca: &Path,
    cluster: &str,
    node: &str,
    token: &str,
    netns: Option<&Netns>,
) -> Result<Issued, Ended> {
    bootstrap_as(
        address,
        ca,
        Some(cluster),
        &Subject::Node(node.to_owned()),
        token,
        netns,
    )
    .await
}

/// Asks the controller at `address` for `subject`'s certificate with `token`. Without
/// `cluster`, any `agent.<id>.trellis` signed by the agent CA `ca` is this cluster's
/// controller (one agent CA per cluster), and `id` is the cluster.
pub async fn bootstrap_as(
    address: &str,
    ca: &Path,
    cluster: Option<&str>,
    subject: &Subject,
    token: &str,
    netns: Option<&Netns>,
) -> Result<Issued, Ended> {
    let key = rcgen::KeyPair::generate().map_err(bad)?;
    // The names asked for do not matter: the controller signs the subject's identity only.
    let names = cluster
        .map(|c| vec![subject.identity(c).dns_name()])
        .unwrap_or_default();
    let csr_pem = rcgen::CertificateParams::new(names)
        .and_then(|params| params.serialize_request(&key))
        .and_then(|csr| csr.pem())
        .map_err(bad)?;
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(ca).map_err(Ended::Connect)?;
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert.map_err(bad)?).map_err(bad)?;
    }
    let verifier =
        ControllerVerifier::new(Arc::new(roots), cluster.map(str::to_owned)).map_err(bad)?;
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(bad)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    // Only sent as SNI; the verifier decides by the certificate's own name.
    let name = AgentIdentity::Controller {
        cluster: cluster.unwrap_or("cluster").to_owned(),
    }
    .dns_name();
    let name = ServerName::try_from(name).map_err(bad)?;
    let tcp = crate::client::tcp(address, netns)
        .await
        .map_err(Ended::Connect)?;
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| Ended::Tls(std::io::ErrorKind::TimedOut.into()))?
    .map_err(Ended::Tls)?;
    let cluster = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(controller_cluster)
        .ok_or_else(|| bad("the controller's certificate names no cluster"))?;
    let hello = AgentHello {
        token: None,
        role: AgentRole::Bootstrap(NodeBootstrap {
            node: match subject {
                Subject::Node(node) => node.clone(),
                Subject::Dns => String::new(),
            },
            service_account_token: token.trim().to_owned(),
            csr_pem,
            dns: *subject == Subject::Dns,
        }),
    };
    let frame = encode_json_frame(&hello, "hello", 64 * 1024).map_err(Ended::EncodeHello)?;
    stream.write_all(&frame).await.map_err(Ended::Hello)?;
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut buf = vec![0u8; 16 * 1024];
    let answer = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Some(issued) = decoder
                .next_json::<BootstrapIssued>()
                .map_err(Ended::Frame)?
            {
                return Ok(issued);
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Err(Ended::Closed),
                Ok(n) => decoder.push(&buf[..n]),
            }
        }
    })
    .await
    .map_err(|_| Ended::Read(std::io::ErrorKind::TimedOut.into()))??;
    // What was asked for, in the controller's cluster, and nothing else.
    let issued = CertificateDer::pem_slice_iter(answer.certificate_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| crate::tls::identities_of(&c))
        .unwrap_or_default();
    if issued != [subject.identity(&cluster)] {
        return Err(bad(format!(
            "the controller issued {issued:?}, not {subject} of cluster {cluster}"
        )));
    }
    Ok(Issued {
        certificate_pem: answer.certificate_pem,
        key_pem: key.serialize_pem(),
        ca_pem: answer.ca_pem,
        cluster,
    })
}

/// Whether the certificate at `cert` is missing, unreadable or expires within `margin`.
pub fn renew_due(cert: &Path, margin: Duration) -> bool {
    let Ok(pem) = std::fs::read(cert) else {
        return true;
    };
    let Some(Ok(der)) = CertificateDer::pem_slice_iter(&pem).next() else {
        return true;
    };
    let Some(not_after) = crate::tls::not_after(&der) else {
        return true;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    not_after - now < margin.as_secs() as i64
}

/// Keeps a bootstrapped certificate and key in files: asks the controller when the
/// certificate is missing or due ([`Renewer::MARGIN`] before it expires), with the token
/// re-read each time (the kubelet rotates it).
#[derive(Debug, Clone)]
pub struct Renewer {
    pub address: String,
    /// The agent CA (pinned).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The projected ServiceAccount token's file.
    pub token: PathBuf,
    /// The cluster, when known; else learnt from the controller's certificate.
    pub cluster: Option<String>,
    pub subject: Subject,
}

impl Renewer {
    /// Renewed a third of the way before a 24 h certificate expires.
    pub const MARGIN: Duration = Duration::from_secs(8 * 3600);

    /// Asks (retrying with backoff) until the certificate on disk is not due for renewal.
    pub async fn until_valid(&self) {
        let mut delay = Duration::from_secs(1);
        while renew_due(&self.cert, Self::MARGIN) {
            match self.once().await {
                Ok(cluster) => {
                    tracing::info!(subject = %self.subject, %cluster, cert = %self.cert.display(), "agent certificate issued by the controller");
                    return;
                }
                Err(e) => {
                    tracing::warn!(subject = %self.subject, "agent certificate: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// One request; the certificate and key written (the key first). The cluster on success.
    pub async fn once(&self) -> Result<String, String> {
        let token = std::fs::read_to_string(&self.token)
            .map_err(|e| format!("reading {}: {e}", self.token.display()))?;
        let issued = bootstrap_as(
            &self.address,
            &self.ca,
            self.cluster.as_deref(),
            &self.subject,
            &token,
            None,
        )
        .await
        .map_err(|e| trellis_core::error_chain(&e))?;
        // The key first: a certificate never sits beside a key it does not match for long.
        trellis_files::write_atomically(&self.key, issued.key_pem.as_bytes(), 0o600)
            .map_err(|e| format!("writing {}: {e}", self.key.display()))?;
        trellis_files::write_atomically(&self.cert, issued.certificate_pem.as_bytes(), 0o644)
            .map_err(|e| format!("writing {}: {e}", self.cert.display()))?;
        Ok(issued.cluster)
    }

    /// The first certificate, then renewals every 10 minutes' look, forever (spawned).
    pub async fn first_then_spawn(self) {
        self.until_valid().await;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(600)).await;
                self.until_valid().await;
            }
        });
    }
}
