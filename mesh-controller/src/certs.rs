//! The mesh's certificates: one CA per mesh, one certificate per cluster carrying the cluster's
//! identity as the DNS name `<cluster-id>.cluster.trellis`. The same certificate serves as the
//! QUIC server certificate (peers dial the name) and as the client certificate (the accepting
//! side reads the identity from it), so it has both extended key usages.
//!
//! These are plain functions over PEM strings; the `certs` subcommand
//! ([`crate::certs_command`]) only reads and writes the files.

use std::net::IpAddr;

use ipnet::IpNet;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
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

pub(crate) fn cert_error(operation: &'static str) -> impl Fn(rcgen::Error) -> Error {
    move |source| Error::Certificate { operation, source }
}

/// What every Trellis CA is: named `common_name`, issuing end-entity certificates only (path
/// length 0), valid for `validity`.
pub(crate) fn ca_params(common_name: String, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
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
    params
}

/// Creates a new mesh CA.
pub fn generate_ca(mesh_name: &str, validity: Validity) -> Result<CertifiedKey, Error> {
    let key = KeyPair::generate().map_err(cert_error("generating the CA key"))?;
    let mut params = ca_params(format!("Trellis mesh CA {mesh_name}"), validity);
    // Every address, so that strict RFC 3779 path validation (`openssl verify`) accepts the
    // ranges of the cluster certificates it signs (a subset of their issuer's).
    let mut all = CustomExtension::from_oid_content(
        IP_ADDR_BLOCKS_OID,
        encode_ip_addr_blocks(&[
            "0.0.0.0/0".parse().expect("valid"),
            "::/0".parse().expect("valid"),
        ]),
    );
    all.set_criticality(false);
    params.custom_extensions.push(all);
    let cert = params
        .self_signed(&key)
        .map_err(cert_error("self-signing the CA"))?;
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// RFC 3779's `id-pe-ipAddrBlocks` (1.3.6.1.5.5.7.1.7): the address ranges a cluster may
/// claim, signed by the mesh CA.
pub const IP_ADDR_BLOCKS_OID: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 7];

/// One DER tag-length-value.
pub(crate) fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// The DER of an RFC 3779 `IPAddrBlocks` holding `ranges` as prefixes (IPv4 family first,
/// each family's prefixes aggregated and sorted, as the RFC's canonical form asks).
pub fn encode_ip_addr_blocks(ranges: &[IpNet]) -> Vec<u8> {
    let aggregated = IpNet::aggregate(&ranges.to_vec());
    let mut families = Vec::new();
    for (afi, v6) in [([0u8, 1], false), ([0u8, 2], true)] {
        let mut prefixes = Vec::new();
        for net in aggregated
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
        {
            let bits = usize::from(net.prefix_len());
            let bytes: Vec<u8> = match net.network() {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            let used = bits.div_ceil(8);
            let unused = (used * 8 - bits) as u8;
            let mut content = vec![unused];
            content.extend_from_slice(&bytes[..used]);
            prefixes.extend(der_tlv(0x03, &content));
        }
        if prefixes.is_empty() {
            continue;
        }
        let mut family = der_tlv(0x04, &afi);
        family.extend(der_tlv(0x30, &prefixes));
        families.extend(der_tlv(0x30, &family));
    }
    der_tlv(0x30, &families)
}

/// Reads one DER TLV: `(tag, content, rest)`.
fn der_read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The prefixes of an RFC 3779 `IPAddrBlocks` (address ranges, `inherit` and SAFIs are not
/// used by Trellis and refused).
pub fn decode_ip_addr_blocks(der: &[u8]) -> Option<Vec<IpNet>> {
    let (0x30, mut families, []) = der_read(der)? else {
        return None;
    };
    let mut out = Vec::new();
    while !families.is_empty() {
        let (0x30, family, rest) = der_read(families)? else {
            return None;
        };
        families = rest;
        let (0x04, afi, family) = der_read(family)? else {
            return None;
        };
        let (0x30, mut prefixes, []) = der_read(family)? else {
            return None;
        };
        let width = match afi {
            [0, 1] => 4,
            [0, 2] => 16,
            _ => return None,
        };
        while !prefixes.is_empty() {
            let (0x03, bits, rest) = der_read(prefixes)? else {
                return None;
            };
            prefixes = rest;
            let (&unused, bytes) = bits.split_first()?;
            if unused > 7 || bytes.len() > width || (bytes.is_empty() && unused != 0) {
                return None;
            }
            let mut addr = [0u8; 16];
            addr[..bytes.len()].copy_from_slice(bytes);
            let len = u8::try_from(bytes.len() * 8).ok()? - unused;
            let net = if width == 4 {
                let a = std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
                IpNet::V4(ipnet::Ipv4Net::new(a, len).ok()?.trunc())
            } else {
                IpNet::V6(ipnet::Ipv6Net::new(addr.into(), len).ok()?.trunc())
            };
            out.push(net);
        }
    }
    Some(out)
}

/// The ranges a cluster certificate (DER) allows its cluster to claim: `Ok(None)` when it
/// carries no `ipAddrBlocks` extension, an error when the extension cannot be read.
pub fn claim_ranges_of(cert_der: &[u8]) -> Result<Option<Vec<IpNet>>, Error> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let unreadable = |reason: &'static str| Error::Config {
        reason: format!("the peer certificate's address ranges: {reason}"),
    };
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|_| unreadable("not a certificate"))?;
    let oid = IP_ADDR_BLOCKS_OID
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".");
    let Some(ext) = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == oid)
    else {
        return Ok(None);
    };
    decode_ip_addr_blocks(ext.value)
        .map(Some)
        .ok_or_else(|| unreadable("not an RFC 3779 IPAddrBlocks of prefixes"))
}

/// Issues the certificate of cluster `id`, signed by the mesh CA, with no address ranges (a
/// peer presenting it is allowed only what the other side's configuration lists).
pub fn generate_cluster_cert(
    ca: &CertifiedKey,
    id: &ClusterId,
    validity: Validity,
) -> Result<CertifiedKey, Error> {
    generate_cluster_cert_with_ranges(ca, id, &[], validity)
}

/// Issues the certificate of cluster `id`, signed by the mesh CA, carrying the ranges it may
/// claim (its pod and service CIDRs) in a non-critical RFC 3779 `ipAddrBlocks` extension
/// (non-critical so that TLS stacks which do not know it still accept the certificate).
pub fn generate_cluster_cert_with_ranges(
    ca: &CertifiedKey,
    id: &ClusterId,
    ranges: &[IpNet],
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
    if !ranges.is_empty() {
        let mut ext =
            CustomExtension::from_oid_content(IP_ADDR_BLOCKS_OID, encode_ip_addr_blocks(ranges));
        ext.set_criticality(false);
        params.custom_extensions.push(ext);
    }
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
    ranges: &[IpNet],
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
    let leaf = generate_cluster_cert_with_ranges(&ca, id, ranges, validity)?;
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
        write_cluster_files(dir.path(), &id, &[], Validity::days_from_now(1), false).unwrap();
        let mode = std::fs::metadata(dir.path().join("west-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(write_ca_files(dir.path(), "m", Validity::days_from_now(1), false).is_err());
        assert!(
            write_cluster_files(dir.path(), &id, &[], Validity::days_from_now(1), true).is_ok()
        );
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
        assert_eq!(
            claim_ranges_of(&der[0]).unwrap(),
            None,
            "no ranges, no extension"
        );
    }

    #[test]
    fn address_blocks_encode_as_rfc_3779_and_read_back() {
        let nets: Vec<IpNet> = ["10.1.0.0/16", "10.96.0.0/12", "fd00:1::/48", "0.0.0.0/0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let der = encode_ip_addr_blocks(&nets[..3]);
        // RFC 3779's example shape: SEQUENCE { SEQUENCE { OCTET STRING 0001, SEQUENCE {
        // BIT STRING ... } } ... }; 10.1.0.0/16 is `03 03 00 0a 01`, 10.96/12 `03 03 04 0a 60`.
        assert_eq!(&der[..6], &[0x30, 0x23, 0x30, 0x10, 0x04, 0x02]);
        assert!(der.windows(5).any(|w| w == [0x03, 0x03, 0x00, 0x0a, 0x01]));
        assert!(der.windows(5).any(|w| w == [0x03, 0x03, 0x04, 0x0a, 0x60]));
        let mut back = decode_ip_addr_blocks(&der).unwrap();
        back.sort();
        let mut want = nets[..3].to_vec();
        want.sort();
        assert_eq!(back, want);
        // /0 is an empty bit string.
        assert_eq!(
            decode_ip_addr_blocks(&encode_ip_addr_blocks(&nets[3..])).unwrap(),
            vec![nets[3]]
        );
        for broken in [
            &der[..der.len() - 1],
            &[0x30, 0x03, 0x04, 0x01, 0x00][..],
            &[],
        ] {
            assert_eq!(decode_ip_addr_blocks(broken), None, "{broken:?}");
        }
    }

    #[test]
    fn a_cluster_certificate_carries_its_ranges_signed_and_still_verifies() {
        let ca = generate_ca("test", Validity::days_from_now(1)).unwrap();
        let id: ClusterId = "east".parse().unwrap();
        let ranges: Vec<IpNet> = vec![
            "10.1.0.0/16".parse().unwrap(),
            "10.96.0.0/16".parse().unwrap(),
        ];
        let leaf = generate_cluster_cert_with_ranges(&ca, &id, &ranges, Validity::days_from_now(1))
            .unwrap();
        let der = crate::tls::parse_certs(&leaf.cert_pem).unwrap();
        assert_eq!(
            crate::tls::identity_of(&der[0]).unwrap(),
            id,
            "webpki accepts it"
        );
        assert_eq!(claim_ranges_of(&der[0]).unwrap(), Some(ranges));
    }
}
