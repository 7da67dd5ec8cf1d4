//! The agent port's TLS material, both ends: a CA (the cluster's agent CA), a certificate and
//! its key, as PEM files. TLS 1.3 only, rustls with the ring provider (the controller's).
//!
//! Files are re-read when they change: [`ClientTls::connector`] and [`ServerTls::config`]
//! compare each file's metadata (inode, length, modification time) on every use (three
//! `stat`s, no read) and rebuild the configuration when one moved; a broken new set is logged
//! and the last good one kept. So a new handshake uses the new certificate, and an open
//! connection keeps the one it was made with. [`Material::expiry`] feeds the
//! `*_certificate_expiry_timestamp_seconds` gauges.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use trellis_core::agent::AgentIdentity;

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the PEM in {path}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("building the TLS configuration")]
    Rustls(#[source] rustls::Error),
    #[error("building the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("the certificate in {path} does not parse")]
    Certificate { path: PathBuf },
    #[error(
        "the certificate in {path} names no agent identity (<node>.node.<cluster>.trellis, dns.<cluster>.trellis or agent.<cluster>.trellis)"
    )]
    NoIdentity { path: PathBuf },
}

/// Where the PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA the other end's certificate must chain to.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The three files' (inode, length, modification time): what changes when one is replaced.
type Stamp = [(u64, u64, SystemTime); 3];

impl TlsFiles {
    fn stamp(&self) -> Option<Stamp> {
        let one = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            Some((
                std::os::unix::fs::MetadataExt::ino(&m),
                m.len(),
                m.modified().ok()?,
            ))
        };
        Some([one(&self.ca)?, one(&self.cert)?, one(&self.key)?])
    }
}

/// The provider both ends use.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The agent identities a certificate's DNS names stand for.
pub fn identities_of(cert: &CertificateDer<'_>) -> Vec<AgentIdentity> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee
            .valid_dns_names()
            .filter_map(AgentIdentity::from_dns_name)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// When a certificate expires, in Unix seconds.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// One loaded set of files.
#[derive(Debug, Clone)]
pub struct Material {
    pub roots: Arc<RootCertStore>,
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    ca_pem: Arc<str>,
    /// The identity the own certificate carries (its first agent identity).
    pub identity: AgentIdentity,
    /// When the own certificate and the CA expire (Unix seconds).
    pub expiry: Expiry,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expiry {
    pub cert: i64,
    pub ca: i64,
}

impl Material {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca = certs(&files.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in &ca {
            roots.add(cert.clone()).map_err(TlsError::Rustls)?;
        }
        let chain = certs(&files.cert)?;
        let key =
            PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|source| TlsError::Pem {
                path: files.key.clone(),
                source,
            })?;
        let identity =
            identities_of(&chain[0])
                .into_iter()
                .next()
                .ok_or_else(|| TlsError::NoIdentity {
                    path: files.cert.clone(),
                })?;
        let bad = |path: &PathBuf| TlsError::Certificate { path: path.clone() };
        let expiry = Expiry {
            cert: not_after(&chain[0]).ok_or_else(|| bad(&files.cert))?,
            ca: ca
                .iter()
                .filter_map(|c| not_after(c))
                .min()
                .ok_or_else(|| bad(&files.ca))?,
        };
        let ca_pem = String::from_utf8_lossy(&read(&files.ca)?).into();
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            ca_pem,
            identity,
            expiry,
        })
    }

    /// The CA as PEM (what a bootstrapped gateway is handed).
    pub fn ca_pem(&self) -> String {
        self.ca_pem.to_string()
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// The files' stamp when last looked at, and what was built from them.
type Loaded<T> = (Option<Stamp>, Arc<(Material, T)>);

/// A value built from the files, rebuilt when they change.
#[derive(Debug)]
struct Reloading<T> {
    files: TlsFiles,
    what: &'static str,
    current: Mutex<Loaded<T>>,
    build: fn(&Material) -> Result<T, TlsError>,
}

impl<T> Reloading<T> {
    fn new(
        files: TlsFiles,
        what: &'static str,
        build: fn(&Material) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let material = Material::load(&files)?;
        let value = build(&material)?;
        Ok(Self {
            files,
            what,
            current: Mutex::new((stamp, Arc::new((material, value)))),
            build,
        })
    }

    /// The current value, rebuilt first if a file changed since the last look.
    fn get(&self) -> Arc<(Material, T)> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = self.files.stamp();
        if stamp.is_some() && stamp != current.0 {
            match Material::load(&self.files).and_then(|m| (self.build)(&m).map(|v| (m, v))) {
                Ok(loaded) => {
                    tracing::info!(
                        what = self.what,
                        cert = %self.files.cert.display(),
                        not_after = loaded.0.expiry.cert,
                        "TLS files changed: reloaded"
                    );
                    *current = (stamp, Arc::new(loaded));
                }
                Err(e) => {
                    tracing::warn!(
                        what = self.what,
                        error = %trellis_core::error_chain(&e),
                        "TLS files changed but do not load (yet: a writer may be half-way); keeping the last good ones"
                    );
                }
            }
        }
        current.1.clone()
    }
}

/// A gateway's or DNS's side: who it is, and whom it accepts as its controller
/// (`agent.<cluster>.trellis` signed by the CA, the cluster read from its own identity).
#[derive(Debug)]
pub struct ClientTls {
    inner: Reloading<Arc<rustls::ClientConfig>>,
}

fn client_config(m: &Material) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_root_certificates(m.roots.clone())
        .with_client_auth_cert(m.chain.clone(), m.key())
        .map_err(TlsError::Rustls)?;
    Ok(Arc::new(config))
}

impl ClientTls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            inner: Reloading::new(files, "agent client", client_config)?,
        })
    }

    /// The connector for a new connection, the name the controller must carry, and the
    /// material in use (files re-read if they changed).
    pub fn connector(
        &self,
    ) -> (
        tokio_rustls::TlsConnector,
        ServerName<'static>,
        Arc<(Material, Arc<rustls::ClientConfig>)>,
    ) {
        let current = self.inner.get();
        let name = AgentIdentity::Controller {
            cluster: current.0.identity.cluster().to_owned(),
        }
        .dns_name();
        let name = ServerName::try_from(name).expect("identity names are DNS names");
        (
            tokio_rustls::TlsConnector::from(current.1.clone()),
            name,
            current,
        )
    }

    pub fn material(&self) -> Material {
        self.inner.get().0.clone()
    }
}

/// The controller's side: its agent certificate, and client certificates required, chained to
/// the cluster's agent CA. What each client may do is decided after the handshake from the
/// identity in its certificate.
#[derive(Debug)]
pub struct ServerTls {
    inner: Reloading<Arc<rustls::ServerConfig>>,
}

fn server_config(m: &Material) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_for(m, false)
}

fn server_config_allowing_bootstrap(m: &Material) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_for(m, true)
}

fn server_config_for(
    m: &Material,
    allow_unauthenticated: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider());
    let builder = if allow_unauthenticated {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let verifier = builder.build().map_err(TlsError::Verifier)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key())
        .map_err(TlsError::Rustls)?;
    Ok(Arc::new(config))
}

impl ServerTls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            inner: Reloading::new(files, "agent server", server_config)?,
        })
    }

    /// Like [`ServerTls::load`], but a client without a certificate completes the handshake
    /// (it may then only ask for its node's certificate: the agent port refuses anything else).
    pub fn load_allowing_bootstrap(files: TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            inner: Reloading::new(files, "agent server", server_config_allowing_bootstrap)?,
        })
    }

    /// The acceptor for a new connection (files re-read if they changed).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.inner.get().1.clone())
    }

    pub fn material(&self) -> Material {
        self.inner.get().0.clone()
    }
}

/// Every `every`: looks at the files (re-reading them when they changed) and hands `set` when
/// the own certificate and the CA in use expire. Runs forever.
pub async fn watch_expiry(tls: Arc<ClientTls>, every: std::time::Duration, set: impl Fn(Expiry)) {
    loop {
        set(tls.material().expiry);
        tokio::time::sleep(every).await;
    }
}
