//! The agent port's certificates: one **agent CA per cluster** (not the mesh CA), and under it
//! the controller's `agent.<cluster>.trellis` (server), one `<node>.node.<cluster>.trellis`
//! per node and `dns.<cluster>.trellis` (clients). See `docs/security-agent.md`.
//!
//! Why a cluster CA: the controller may hold its key to issue node certificates (on
//! Kubernetes, after a ServiceAccount token review), and a key a cluster holds must not be
//! able to mint anything another cluster trusts: the mesh CA signs peering identities, the
//! agent CA only this cluster's agents. The server certificate has only the server-auth
//! usage and the clients' only client-auth, so a stolen node key cannot pose as the
//! controller.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use trellis_core::agent::AgentIdentity;

use crate::Error;
use crate::certs::{CertifiedKey, Validity};

fn cert_error(operation: &'static str) -> impl Fn(rcgen::Error) -> Error {
    move |source| Error::Certificate { operation, source }
}

/// Creates a cluster's agent CA.
pub fn generate_agent_ca(cluster: &str, validity: Validity) -> Result<CertifiedKey, Error> {
    let key = KeyPair::generate().map_err(cert_error("generating the agent CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Trellis agent CA {cluster}"));
    dn.push(DnType::OrganizationName, "Trellis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params
        .self_signed(&key)
        .map_err(cert_error("self-signing the agent CA"))?;
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues `identity`'s certificate under the agent CA `ca`, for a key generated here.
pub fn generate_agent_cert(
    ca: &CertifiedKey,
    identity: &AgentIdentity,
    validity: Validity,
) -> Result<CertifiedKey, Error> {
    let key = KeyPair::generate().map_err(cert_error("generating an agent key"))?;
    let cert_pem = sign_agent_cert(ca, identity, &key, validity)?;
    Ok(CertifiedKey {
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}

/// Signs `identity`'s certificate for `public` (only its public half is used) under `ca`.
pub fn sign_agent_cert(
    ca: &CertifiedKey,
    identity: &AgentIdentity,
    public: &impl rcgen::PublicKeyData,
    validity: Validity,
) -> Result<String, Error> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(cert_error("reading the agent CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(cert_error("reading the agent CA certificate"))?;
    let mut params = CertificateParams::new(vec![identity.dns_name()])
        .map_err(cert_error("building an agent certificate"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.dns_name());
    dn.push(DnType::OrganizationName, "Trellis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match identity {
        AgentIdentity::Controller { .. } => ExtendedKeyUsagePurpose::ServerAuth,
        AgentIdentity::Node { .. } | AgentIdentity::Dns { .. } => {
            ExtendedKeyUsagePurpose::ClientAuth
        }
    }];
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params
        .signed_by(public, &issuer)
        .map_err(cert_error("signing an agent certificate"))?;
    Ok(cert.pem())
}

/// Where `trellis certs agent` puts a cluster's agent files in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFiles {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The file names of `identity` (and its cluster's agent CA) in `dir`.
pub fn agent_files(dir: &Path, identity: &AgentIdentity) -> AgentFiles {
    let cluster = identity.cluster();
    let stem = match identity {
        AgentIdentity::Controller { cluster } => format!("{cluster}-agent"),
        AgentIdentity::Dns { cluster } => format!("{cluster}-dns"),
        AgentIdentity::Node { cluster, node } => format!("{cluster}-node-{node}"),
    };
    AgentFiles {
        ca: dir.join(format!("{cluster}-agent-ca.pem")),
        ca_key: dir.join(format!("{cluster}-agent-ca-key.pem")),
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
    }
}

fn write(path: &Path, content: &str, private: bool) -> Result<(), Error> {
    trellis_files::write_atomically(
        path,
        content.as_bytes(),
        if private { 0o600 } else { 0o644 },
    )
    .map_err(|source| Error::CertificateFile {
        operation: "writing a certificate file",
        path: path.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::CertificateFile {
        operation: "reading the agent CA",
        path: path.to_owned(),
        source,
    })
}

/// Issues `identity`'s certificate and key in `dir` from the cluster's agent CA there,
/// creating the CA first when it does not exist. Existing certificates are replaced
/// atomically (a running daemon reloads them).
pub fn write_agent_files(
    dir: &Path,
    identity: &AgentIdentity,
    days: i64,
) -> Result<AgentFiles, Error> {
    let files = agent_files(dir, identity);
    let ca = if files.ca.exists() {
        CertifiedKey {
            cert_pem: read(&files.ca)?,
            key_pem: read(&files.ca_key)?,
        }
    } else {
        let ca = generate_agent_ca(identity.cluster(), Validity::days_from_now(3650))?;
        write(&files.ca_key, &ca.key_pem, true)?;
        write(&files.ca, &ca.cert_pem, false)?;
        ca
    };
    let leaf = generate_agent_cert(&ca, identity, Validity::days_from_now(days))?;
    write(&files.key, &leaf.key_pem, true)?;
    write(&files.cert, &leaf.cert_pem, false)?;
    Ok(files)
}
