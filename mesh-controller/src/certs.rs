//! The mesh's certificates: one CA per mesh, one certificate per cluster carrying the cluster's
//! identity as the DNS name `<cluster-id>.cluster.trellis`. The same certificate serves as the
//! QUIC server certificate (peers dial the name) and as the client certificate (the accepting
//! side reads the identity from it), so it has both extended key usages.
//!
//! These are plain functions over PEM strings; the `certs` subcommand (and later `trellis
//! certs`) only reads and writes the files.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};
use trellis_core::cluster::ClusterId;

use crate::Error;

/// The DNS-name suffix of cluster identities.
pub const IDENTITY_SUFFIX: &str = ".cluster.trellis";

/// The DNS name a cluster's certificate carries.
pub fn identity_name(id: &ClusterId) -> String {
    format!("{id}{IDENTITY_SUFFIX}")
}

/// The cluster ID in a certificate DNS name, if it is an identity name.
pub fn cluster_id_from_name(name: &str) -> Option<ClusterId> {
    name.strip_suffix(IDENTITY_SUFFIX)?.parse().ok()
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Validity of a new certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew between clusters) for `days` days.
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
}

fn cert_error(operation: &'static str) -> impl Fn(rcgen::Error) -> Error {
    move |source| Error::Certificate { operation, source }
}

/// Creates a new mesh CA.
pub fn generate_ca(mesh_name: &str, validity: Validity) -> Result<CertifiedKey, Error> {
    let key = KeyPair::generate().map_err(cert_error("generating the CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Trellis mesh CA {mesh_name}"));
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
        .map_err(cert_error("self-signing the CA"))?;
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues the certificate of cluster `id`, signed by the mesh CA.
pub fn generate_cluster_cert(
    ca: &CertifiedKey,
    id: &ClusterId,
    validity: Validity,
) -> Result<CertifiedKey, Error> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(cert_error("reading the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(cert_error("reading the CA certificate"))?;
    let key = KeyPair::generate().map_err(cert_error("generating the cluster key"))?;
    let mut params = CertificateParams::new(vec![identity_name(id)])
        .map_err(cert_error("building the cluster certificate"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.as_str());
    dn.push(DnType::OrganizationName, "Trellis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(cert_error("signing the cluster certificate"))?;
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The file names `write_files` uses inside a directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

pub fn cluster_cert_file(id: &ClusterId) -> String {
    format!("{id}.pem")
}

pub fn cluster_key_file(id: &ClusterId) -> String {
    format!("{id}-key.pem")
}

fn write_file(
    path: &std::path::Path,
    content: &str,
    private: bool,
    force: bool,
) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |operation: &'static str| {
        move |source: std::io::Error| Error::CertificateFile {
            operation,
            path: path.to_owned(),
            source,
        }
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(if private { 0o600 } else { 0o644 });
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(io("creating a certificate file"))?;
    f.write_all(content.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("writing a certificate file"))
}

/// Creates `ca.pem` and `ca-key.pem` in `dir` (what `trellis certs ca` does). Refuses to
/// overwrite existing files unless `force`.
pub fn write_ca_files(
    dir: &std::path::Path,
    mesh_name: &str,
    validity: Validity,
    force: bool,
) -> Result<CertifiedKey, Error> {
    let ca = generate_ca(mesh_name, validity)?;
    write_file(&dir.join(CA_KEY_FILE), &ca.key_pem, true, force)?;
    write_file(&dir.join(CA_CERT_FILE), &ca.cert_pem, false, force)?;
    Ok(ca)
}

/// Issues `<id>.pem` and `<id>-key.pem` in `dir` from the CA files there (what `trellis certs
/// cluster` does).
pub fn write_cluster_files(
    dir: &std::path::Path,
    id: &ClusterId,
    validity: Validity,
    force: bool,
) -> Result<CertifiedKey, Error> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|source| Error::CertificateFile {
            operation: "reading the mesh CA",
            path: dir.join(name),
            source,
        })
    };
    let ca = CertifiedKey {
        cert_pem: read(CA_CERT_FILE)?,
        key_pem: read(CA_KEY_FILE)?,
    };
    let leaf = generate_cluster_cert(&ca, id, validity)?;
    write_file(&dir.join(cluster_key_file(id)), &leaf.key_pem, true, force)?;
    write_file(
        &dir.join(cluster_cert_file(id)),
        &leaf.cert_pem,
        false,
        force,
    )?;
    Ok(leaf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_private_and_never_overwritten_silently() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write_ca_files(dir.path(), "m", Validity::days_from_now(1), false).unwrap();
        let id: ClusterId = "west".parse().unwrap();
        write_cluster_files(dir.path(), &id, Validity::days_from_now(1), false).unwrap();
        let mode = std::fs::metadata(dir.path().join("west-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(write_ca_files(dir.path(), "m", Validity::days_from_now(1), false).is_err());
        assert!(write_cluster_files(dir.path(), &id, Validity::days_from_now(1), true).is_ok());
    }

    #[test]
    fn identity_names_round_trip() {
        let id: ClusterId = "east".parse().unwrap();
        assert_eq!(identity_name(&id), "east.cluster.trellis");
        assert_eq!(cluster_id_from_name("east.cluster.trellis"), Some(id));
        assert_eq!(cluster_id_from_name("east.example.com"), None);
        assert_eq!(cluster_id_from_name("Bad_.cluster.trellis"), None);
    }

    #[test]
    fn cluster_certs_chain_to_the_ca_and_carry_the_identity() {
        let ca = generate_ca("test", Validity::days_from_now(1)).unwrap();
        let id: ClusterId = "east".parse().unwrap();
        let leaf = generate_cluster_cert(&ca, &id, Validity::days_from_now(1)).unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{leaf:?}").contains("PRIVATE"));
        let der = crate::tls::parse_certs(&leaf.cert_pem).unwrap();
        assert_eq!(crate::tls::identity_of(&der[0]).unwrap(), id);
        // A broken CA is an error, not a panic.
        let broken = CertifiedKey {
            cert_pem: "garbage".into(),
            key_pem: ca.key_pem.clone(),
        };
        assert!(generate_cluster_cert(&broken, &id, Validity::days_from_now(1)).is_err());
    }
}

/// `certs` as a subcommand, shared by `trellis certs` and `trellis-controller certs`.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create the mesh CA (`ca.pem`, `ca-key.pem`) in DIR. Keep `ca-key.pem` offline.
    Ca {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value = "trellis-mesh")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a cluster's certificate (`<id>.pem`, `<id>-key.pem`) from the CA in DIR.
    Cluster {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        id: ClusterId,
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent-port certificate in DIR under the cluster's agent CA
    /// (`<cluster>-agent-ca.pem`, created on first use): the controller's (`--controller`),
    /// DNS's (`--dns`) or a node's (`--node NAME`). Replaces an existing one atomically.
    Agent {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        cluster: ClusterId,
        #[arg(long, conflicts_with_all = ["dns", "controller"], required_unless_present_any = ["dns", "controller"])]
        node: Option<String>,
        #[arg(long, conflicts_with = "controller")]
        dns: bool,
        #[arg(long)]
        controller: bool,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

impl CertsCommand {
    /// Writes the files; returns what to tell the user.
    pub fn run(self) -> Result<String, Error> {
        match self {
            Self::Ca {
                dir,
                name,
                days,
                force,
            } => {
                std::fs::create_dir_all(&dir).map_err(|source| Error::CertificateFile {
                    operation: "creating the certificate directory",
                    path: dir.clone(),
                    source,
                })?;
                write_ca_files(&dir, &name, Validity::days_from_now(days), force)?;
                Ok(format!(
                    "wrote {0}/{CA_CERT_FILE} and {0}/{CA_KEY_FILE} (keep the key offline)",
                    dir.display()
                ))
            }
            Self::Cluster {
                dir,
                id,
                days,
                force,
            } => {
                write_cluster_files(&dir, &id, Validity::days_from_now(days), force)?;
                Ok(format!(
                    "wrote {0}/{1} and {0}/{2}",
                    dir.display(),
                    cluster_cert_file(&id),
                    cluster_key_file(&id)
                ))
            }
            Self::Agent {
                dir,
                cluster,
                node,
                dns,
                controller,
                days,
            } => {
                use trellis_core::agent::AgentIdentity;
                let cluster = cluster.to_string();
                let identity = match (node, dns, controller) {
                    (Some(node), _, _) => AgentIdentity::Node { cluster, node },
                    (None, true, _) => AgentIdentity::Dns { cluster },
                    (None, false, _) => AgentIdentity::Controller { cluster },
                };
                let files = crate::agent_certs::write_agent_files(&dir, &identity, days)?;
                Ok(format!(
                    "wrote {} and {} ({})",
                    files.cert.display(),
                    files.key.display(),
                    identity.dns_name()
                ))
            }
        }
    }
}
