//! The agent port's certificates: one **agent CA per cluster** (not the mesh CA), and under it
//! the controller's `agent.<cluster>.trellis` (server), one `<node>.node.<cluster>.trellis`
//! per node and `dns.<cluster>.trellis` (clients). See `SECURITY.md` ("The agent port").
//!
//! Why a cluster CA: the controller may hold its key to issue node certificates (on
//! Kubernetes, after a ServiceAccount token review), and a key a cluster holds must not be
//! able to mint anything another cluster trusts: the mesh CA signs peering identities, the
//! agent CA only this cluster's agents. The server certificate has only the server-auth
//! usage and the clients' only client-auth, so a stolen node key cannot pose as the
//! controller.

use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use trellis_core::agent::AgentIdentity;

use crate::Error;
use crate::certs::{CertifiedKey, Validity, ca_params, cert_error, der_tlv};

/// Creates a cluster's agent CA.
pub fn generate_agent_ca(cluster: &str, validity: Validity) -> Result<CertifiedKey, Error> {
    let key = KeyPair::generate().map_err(cert_error("generating the agent CA key"))?;
    let params = ca_params(format!("Trellis agent CA {cluster}"), validity);
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

/// How long the controller's self-issued agent certificate is valid.
pub const SELF_ISSUED_DAYS: i64 = 7;
/// It is issued again when less than this is left.
pub const SELF_RENEW_DAYS: i64 = 3;

/// Whether the certificate at `cert` is missing, unreadable, not `identity`'s, or expires
/// within [`SELF_RENEW_DAYS`].
pub fn controller_cert_due(cert: &Path, identity: &AgentIdentity) -> bool {
    let Ok(pem) = std::fs::read_to_string(cert) else {
        return true;
    };
    let Some(der) = crate::tls::parse_certs(&pem)
        .ok()
        .and_then(|c| c.into_iter().next())
    else {
        return true;
    };
    if trellis_agent_client::tls::identities_of(&der) != [identity.clone()] {
        return true;
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    trellis_agent_client::tls::not_after(&der).is_none_or(|t| t - now < SELF_RENEW_DAYS * 24 * 3600)
}

/// Issues the controller's own `agent.<cluster>.trellis` ([`SELF_ISSUED_DAYS`]) from the
/// agent CA `ca` into `cert` and `key` (the key first, both replaced atomically; the agent
/// port reloads them).
pub fn write_controller_cert(
    ca: &CertifiedKey,
    cluster: &str,
    cert: &Path,
    key: &Path,
) -> Result<(), Error> {
    let identity = AgentIdentity::Controller {
        cluster: cluster.to_owned(),
    };
    let leaf = generate_agent_cert(ca, &identity, Validity::days_from_now(SELF_ISSUED_DAYS))?;
    write(key, &leaf.key_pem, true)?;
    write(cert, &leaf.cert_pem, false)?;
    Ok(())
}

/// The agent CA key as PKCS#8 PEM, whatever PEM it came as: PKCS#8, or PKCS#1 ("RSA PRIVATE
/// KEY", what Helm's `genCA` makes for the chart's agent CA), which ring cannot sign with as
/// is.
pub fn ca_key_pem(pem: &str) -> Result<String, Error> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let unreadable = || Error::Certificate {
        operation: "reading the agent CA key (PKCS#8 or PKCS#1 PEM)",
        source: rcgen::Error::CouldNotParseKeyPair,
    };
    let pkcs8 = match PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| unreadable())? {
        PrivateKeyDer::Pkcs8(key) => key.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(key) => rsa_pkcs1_to_pkcs8(key.secret_pkcs1_der()),
        _ => return Err(unreadable()),
    };
    let key = KeyPair::try_from(pkcs8.as_slice()).map_err(|_| unreadable())?;
    Ok(key.serialize_pem())
}

/// PKCS#8 `PrivateKeyInfo { version 0, rsaEncryption, OCTET STRING pkcs1 }` (RFC 5208).
fn rsa_pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(RSA_ALGORITHM);
    body.extend(der_tlv(0x04, pkcs1));
    der_tlv(0x30, &body)
}

#[cfg(test)]
mod self_issued_tests {
    use super::*;

    /// The controller issues its own agent.<id>.trellis from the agent CA key: a server
    /// certificate the agent port loads, due again when missing, of another cluster or near
    /// its end.
    #[test]
    fn the_controller_issues_its_own_agent_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_agent_ca("east", Validity::days_from_now(10)).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let (cert, key) = (
            dir.path().join("agent.pem"),
            dir.path().join("agent-key.pem"),
        );
        let identity = AgentIdentity::Controller {
            cluster: "east".into(),
        };
        assert!(controller_cert_due(&cert, &identity));
        write_controller_cert(&ca, "east", &cert, &key).unwrap();
        assert!(!controller_cert_due(&cert, &identity));
        assert!(controller_cert_due(
            &cert,
            &AgentIdentity::Controller {
                cluster: "west".into()
            }
        ));
        let tls = trellis_agent_client::ServerTls::load_allowing_bootstrap(
            trellis_agent_client::TlsFiles {
                ca: ca_file,
                cert: cert.clone(),
                key,
            },
        )
        .unwrap();
        assert_eq!(tls.material().identity, identity);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let left = tls.material().expiry.cert - now;
        assert!(
            (SELF_ISSUED_DAYS * 86400 - 120..=SELF_ISSUED_DAYS * 86400).contains(&left),
            "{left}"
        );
        assert!(left > SELF_RENEW_DAYS * 86400);
        // The key file is private.
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("agent-key.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0);
    }
}
