//! Mutual TLS for peering: TLS 1.3 only, the `ring` provider, the mesh CA as the only root, and
//! verifiers that map a certificate to the cluster identity it carries.
//!
//! * The accepting side verifies the chain (unknown CA, expiry, usage) with webpki, then reads
//!   the identity (`<id>.cluster.trellis`) and refuses clusters it is not configured to peer
//!   with. The peer's `Hello` must then claim that same identity (`trellis_core::peering`).
//! * The dialing side asks for the name `<id>.cluster.trellis` of the cluster it means to reach,
//!   so a server presenting another cluster's certificate fails the handshake.
//!
//! Every refusal is logged with its reason and counted in
//! `trellis_controller_auth_failures_total{reason}`.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use trellis_core::cluster::ClusterId;
use trellis_core::peering::ALPN_OFFERED;

use crate::certs::cluster_id_from_name;
use crate::metrics::Metrics;
use crate::{Error, TlsCause};

/// The crypto provider of the whole controller: `ring`, as quinn and kube use.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls_err("parsing PEM certificates"))?;
    if certs.is_empty() {
        return Err(Error::Tls {
            operation: "parsing PEM certificates",
            source: TlsCause::NoCertificate,
        });
    }
    Ok(certs)
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(tls_err("parsing the PEM private key"))
}

/// The cluster identity a certificate carries: its single `*.cluster.trellis` DNS name.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<ClusterId, Error> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| Error::Tls {
        operation: "parsing the peer certificate",
        source: TlsCause::Webpki(e),
    })?;
    let ids: Vec<ClusterId> = ee
        .valid_dns_names()
        .filter_map(cluster_id_from_name)
        .collect();
    match ids.as_slice() {
        [id] => Ok(id.clone()),
        [] => Err(Error::Tls {
            operation: "reading the cluster identity",
            source: TlsCause::NoIdentity,
        }),
        _ => Err(Error::Tls {
            operation: "reading the cluster identity",
            source: TlsCause::SeveralIdentities,
        }),
    }
}

/// The clusters this controller peers with; shared with the verifier so configuration
/// reloads take effect on the next handshake.
pub type AllowedPeers = Arc<RwLock<BTreeSet<ClusterId>>>;

/// A stable metric label for a rustls verification error.
pub fn failure_reason(err: &rustls::Error) -> &'static str {
    match err {
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "identity_mismatch"
            }
            CertificateError::BadSignature => "bad_signature",
            CertificateError::ApplicationVerificationFailure => "unknown_cluster",
            _ => "invalid_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_certificate",
        _ => "tls_error",
    }
}

/// The signature checks of both verifiers: webpki's (`self.inner()`), unchanged. Only the
/// certificate checks differ between the two sides, so the rest is written once.
macro_rules! delegate_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner().verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner().verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner().supported_verify_schemes()
        }
    };
}

/// The peering credentials in use: this cluster's certificate and key, and the webpki
/// verifiers built from the mesh CA. Both QUIC configurations read them at every handshake,
/// so [`PeeringCredentials::reload`] changes what new handshakes use, both ways, without
/// touching open connections.
#[derive(Debug)]
pub struct PeeringCredentials {
    key: RwLock<Arc<rustls::sign::CertifiedKey>>,
    client_verifier: RwLock<Arc<dyn ClientCertVerifier>>,
    server_verifier: RwLock<Arc<WebPkiServerVerifier>>,
}

type Verifiers = (
    Arc<rustls::sign::CertifiedKey>,
    Arc<dyn ClientCertVerifier>,
    Arc<WebPkiServerVerifier>,
);

fn load_credentials(material: &TlsMaterial) -> Result<Verifiers, Error> {
    let provider = provider();
    let roots = roots(&material.ca_pem)?;
    let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(tls_err("building the client-certificate verifier"))?;
    let server = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(tls_err("building the server-certificate verifier"))?;
    let signing = provider
        .key_provider
        .load_private_key(parse_key(&material.key_pem)?)
        .map_err(tls_err("loading the cluster key"))?;
    let key = Arc::new(rustls::sign::CertifiedKey::new(
        parse_certs(&material.cert_pem)?,
        signing,
    ));
    key.keys_match()
        .map_err(tls_err("matching the cluster key to its certificate"))?;
    Ok((key, client, server))
}

impl PeeringCredentials {
    pub fn new(material: &TlsMaterial) -> Result<Arc<Self>, Error> {
        let (key, client, server) = load_credentials(material)?;
        Ok(Arc::new(Self {
            key: RwLock::new(key),
            client_verifier: RwLock::new(client),
            server_verifier: RwLock::new(server),
        }))
    }

    /// New handshakes use `material` from now on; an error leaves the old in use.
    pub fn reload(&self, material: &TlsMaterial) -> Result<(), Error> {
        let (key, client, server) = load_credentials(material)?;
        *self.key.write().unwrap_or_else(|e| e.into_inner()) = key;
        *self
            .client_verifier
            .write()
            .unwrap_or_else(|e| e.into_inner()) = client;
        *self
            .server_verifier
            .write()
            .unwrap_or_else(|e| e.into_inner()) = server;
        Ok(())
    }

    fn key(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Hands out the current certificate on both sides.
#[derive(Debug)]
struct CurrentKey(Arc<PeeringCredentials>);

impl rustls::server::ResolvesServerCert for CurrentKey {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.key())
    }
}

impl rustls::client::ResolvesClientCert for CurrentKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct PeerClientVerifier {
    creds: Arc<PeeringCredentials>,
    allowed: AllowedPeers,
    metrics: Metrics,
}

impl PeerClientVerifier {
    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        self.creds
            .client_verifier
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn refuse(&self, err: rustls::Error, detail: &str) -> rustls::Error {
        let reason = failure_reason(&err);
        tracing::warn!(reason, %err, detail, "refused a peer's client certificate");
        self.metrics.auth_failure(reason);
        err
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    /// No hints: the CA may be replaced at runtime, and a client has one certificate anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner()
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| self.refuse(e, "certificate chain"))?;
        let id = identity_of(end_entity).map_err(|e| {
            self.refuse(
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                &trellis_core::error_chain(&e),
            )
        })?;
        let allowed = self
            .allowed
            .read()
            .map(|set| set.contains(&id))
            .unwrap_or(false);
        if !allowed {
            return Err(self.refuse(
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
                &format!("cluster {id} is not a configured peer"),
            ));
        }
        Ok(verified)
    }

    delegate_signatures!();
}

#[derive(Debug)]
struct PeerServerVerifier {
    creds: Arc<PeeringCredentials>,
    metrics: Metrics,
}

impl PeerServerVerifier {
    fn inner(&self) -> Arc<WebPkiServerVerifier> {
        self.creds
            .server_verifier
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|err| {
                let reason = failure_reason(&err);
                let presented = identity_of(end_entity)
                    .map(|id| id.to_string())
                    .unwrap_or_else(|_| "none".into());
                tracing::warn!(
                    reason,
                    %err,
                    expected = %server_name.to_str(),
                    presented,
                    "refused a peer's server certificate"
                );
                self.metrics.auth_failure(reason);
                err
            })
    }

    delegate_signatures!();
}

/// What a controller needs to speak mutual TLS: the mesh CA and its own certificate and key.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots.add(cert).map_err(tls_err("adding the mesh CA"))?;
    }
    Ok(Arc::new(roots))
}

/// The error of a TLS setup step, for `map_err`.
fn tls_err<E: Into<TlsCause>>(operation: &'static str) -> impl Fn(E) -> Error {
    move |e| Error::Tls {
        operation,
        source: e.into(),
    }
}

/// The server (accepting) side's rustls configuration.
pub fn server_config(
    material: &TlsMaterial,
    allowed: AllowedPeers,
    metrics: Metrics,
) -> Result<rustls::ServerConfig, Error> {
    server_config_with(&PeeringCredentials::new(material)?, allowed, metrics)
}

/// The server side reading `creds` at every handshake.
pub fn server_config_with(
    creds: &Arc<PeeringCredentials>,
    allowed: AllowedPeers,
    metrics: Metrics,
) -> Result<rustls::ServerConfig, Error> {
    let verifier = Arc::new(PeerClientVerifier {
        creds: creds.clone(),
        allowed,
        metrics,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("choosing TLS 1.3"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentKey(creds.clone())));
    cfg.alpn_protocols = ALPN_OFFERED.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The client (dialing) side's rustls configuration.
pub fn client_config(
    material: &TlsMaterial,
    metrics: Metrics,
) -> Result<rustls::ClientConfig, Error> {
    client_config_with(&PeeringCredentials::new(material)?, metrics)
}

/// The client side reading `creds` at every handshake.
pub fn client_config_with(
    creds: &Arc<PeeringCredentials>,
    metrics: Metrics,
) -> Result<rustls::ClientConfig, Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("choosing TLS 1.3"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerServerVerifier {
            creds: creds.clone(),
            metrics,
        }))
        .with_client_cert_resolver(Arc::new(CurrentKey(creds.clone())));
    cfg.alpn_protocols = ALPN_OFFERED.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}
