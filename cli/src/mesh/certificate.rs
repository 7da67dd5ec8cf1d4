//! The mesh CA and a cluster's certificate as Secrets: reading them back, and judging whether
//! an existing certificate still serves (same CA, identity and ranges, far from expiry), so
//! `trellis mesh enable` re-run changes nothing. Issuing is `trellis_controller::certs`'s.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use trellis_controller::certs::{CertifiedKey, claim_ranges_of};
use trellis_controller::tls::{PeeringCredentials, TlsMaterial, identity_of, parse_certs};
use trellis_core::cluster::ClusterId;

use super::ranges;

/// The Secret holding the mesh CA, in the cluster that created it, in kube-system by default
/// (`--ca-namespace`): never in Trellis's namespace, whose Secrets the controller may list.
pub const CA_SECRET: &str = "trellis-mesh-ca";
/// The Secret the chart mounts: the mesh CA certificate and this cluster's certificate.
pub const TLS_SECRET: &str = "trellis-tls";
/// A certificate with fewer days left than this is reissued.
pub const RENEW_DAYS: i64 = 30;

fn text(secret: &Secret, key: &str) -> anyhow::Result<String> {
    let name = secret.metadata.name.as_deref().unwrap_or("?");
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .with_context(|| format!("Secret {name} has no key {key}"))?;
    String::from_utf8(bytes.0.clone()).with_context(|| format!("Secret {name}'s {key} is not PEM"))
}

fn secret(namespace: &str, name: &str, data: [(&str, &str); 3]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "trellis".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(
            data.into_iter()
                .filter(|(key, _)| !key.is_empty())
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// The mesh CA from its Secret (`ca.crt`, `ca.key`).
pub fn ca_from_secret(secret: &Secret) -> anyhow::Result<CertifiedKey> {
    Ok(CertifiedKey {
        cert_pem: text(secret, "ca.crt")?,
        key_pem: text(secret, "ca.key")?,
    })
}

/// The Secret keeping the mesh CA.
pub fn ca_secret(namespace: &str, ca: &CertifiedKey) -> Secret {
    secret(
        namespace,
        CA_SECRET,
        [("ca.crt", &ca.cert_pem), ("ca.key", &ca.key_pem), ("", "")],
    )
}

/// A cluster's TLS material from the chart's Secret (`ca.crt`, `tls.crt`, `tls.key`).
pub fn tls_from_secret(secret: &Secret) -> anyhow::Result<TlsMaterial> {
    Ok(TlsMaterial {
        ca_pem: text(secret, "ca.crt")?,
        cert_pem: text(secret, "tls.crt")?,
        key_pem: text(secret, "tls.key")?,
    })
}

/// The mesh CA certificate of the chart's Secret (its `ca.crt`), when it holds a readable one,
/// whatever the state of the rest.
pub fn ca_of_tls_secret(secret: &Secret) -> Option<String> {
    let pem = text(secret, "ca.crt").ok()?;
    let certs = parse_certs(&pem).ok()?;
    x509_parser::parse_x509_certificate(certs[0].as_ref()).ok()?;
    Some(pem)
}

/// The annotation of the chart's Secret naming which of its certificate's ranges were signed
/// for external machines (`--peer-cidr`), comma-separated: a certificate's ranges carry no
/// such mark, and a re-run must keep them and `trellis peer add` tell them from the pod range.
pub const PEER_CIDRS_ANNOTATION: &str = "trellis.dev/peer-cidrs";

/// The chart's Secret for `material`, recording `peer_ranges`. No `type`: an existing Secret
/// keeps its own (it cannot change), a new one is `Opaque`, as `kubectl create secret generic`
/// makes it.
pub fn tls_secret(namespace: &str, material: &TlsMaterial, peer_ranges: &[IpNet]) -> Secret {
    let mut secret = secret(
        namespace,
        TLS_SECRET,
        [
            ("ca.crt", &material.ca_pem),
            ("tls.crt", &material.cert_pem),
            ("tls.key", &material.key_pem),
        ],
    );
    if !peer_ranges.is_empty() {
        secret.metadata.annotations = Some(BTreeMap::from([(
            PEER_CIDRS_ANNOTATION.to_string(),
            peer_ranges
                .iter()
                .map(IpNet::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )]));
    }
    secret
}

/// The peer ranges the chart's Secret records (none when it records none).
pub fn recorded_peer_ranges(secret: &Secret) -> anyhow::Result<Vec<IpNet>> {
    let Some(value) = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PEER_CIDRS_ANNOTATION))
    else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse::<IpNet>().with_context(|| {
                format!("annotation {PEER_CIDRS_ANNOTATION}: {part:?} is not a CIDR")
            })
        })
        .collect()
}

/// The subject common name of the first certificate in `pem` (a mesh CA is named
/// "Trellis mesh CA <the cluster that created it>"), for messages.
pub fn subject_name(pem: &str) -> String {
    parse_certs(pem)
        .ok()
        .and_then(|certs| {
            let (_, cert) = x509_parser::parse_x509_certificate(certs[0].as_ref()).ok()?;
            let cn = cert.subject().iter_common_name().next()?;
            cn.as_str().ok().map(str::to_string)
        })
        .unwrap_or_else(|| "an unreadable CA".to_string())
}

/// Whether two PEM bundles hold the same CA certificate.
pub fn same_ca(a: &str, b: &str) -> bool {
    match (parse_certs(a), parse_certs(b)) {
        (Ok(a), Ok(b)) => a[0] == b[0],
        _ => false,
    }
}

/// What a cluster certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub id: ClusterId,
    /// The ranges signed into it (empty when it carries none).
    pub ranges: Vec<IpNet>,
    /// Unix seconds.
    pub not_after: i64,
}

/// Reads a cluster certificate (the first of `cert_pem`).
pub fn read_leaf(cert_pem: &str) -> anyhow::Result<Leaf> {
    let certs = parse_certs(cert_pem).context("reading the cluster certificate")?;
    let id = identity_of(&certs[0]).context("reading the cluster certificate's identity")?;
    let ranges = claim_ranges_of(&certs[0])
        .context("reading the cluster certificate's ranges")?
        .unwrap_or_default();
    let not_after = trellis_agent_client::tls::not_after(&certs[0])
        .context("reading the cluster certificate's validity")?;
    Ok(Leaf {
        id,
        ranges,
        not_after,
    })
}

/// Checks that `material`'s certificate chains to its CA at `now` (Unix seconds) and matches
/// its key: what the controller will check when it loads them.
pub fn verify(material: &TlsMaterial, now: i64) -> anyhow::Result<()> {
    let ca = parse_certs(&material.ca_pem).context("reading the mesh CA certificate")?;
    let leaf = parse_certs(&material.cert_pem).context("reading the cluster certificate")?;
    let anchor = webpki::anchor_from_trusted_cert(&ca[0])
        .map_err(|e| anyhow::anyhow!("the mesh CA certificate is unusable: {e}"))?;
    let end_entity = webpki::EndEntityCert::try_from(&leaf[0])
        .map_err(|e| anyhow::anyhow!("the cluster certificate is unreadable: {e}"))?;
    let time = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now).unwrap_or(0),
    ));
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            time,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "the cluster certificate does not verify under {:?}: {e}",
                subject_name(&material.ca_pem)
            )
        })?;
    PeeringCredentials::new(material)
        .map(drop)
        .map_err(anyhow::Error::from)
}

/// Whether an existing certificate stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep(Leaf),
    /// Why it must be reissued.
    Reissue(String),
}

/// Judges the existing `material` of cluster `id` against the CA to use (`ca_pem`, when one is
/// known) and the ranges it should carry, at `now` (Unix seconds).
pub fn judge(
    material: &TlsMaterial,
    ca_pem: Option<&str>,
    id: &ClusterId,
    wanted: &[IpNet],
    now: i64,
) -> Verdict {
    let leaf = match read_leaf(&material.cert_pem) {
        Ok(leaf) => leaf,
        Err(e) => return Verdict::Reissue(format!("the current one is unreadable: {e:#}")),
    };
    if &leaf.id != id {
        return Verdict::Reissue(format!("the current one is cluster {}'s", leaf.id));
    }
    if let Some(ca) = ca_pem
        && !same_ca(ca, &material.ca_pem)
    {
        return Verdict::Reissue(format!(
            "the current one is from another mesh CA ({:?}, not {:?})",
            subject_name(&material.ca_pem),
            subject_name(ca)
        ));
    }
    if let Err(e) = verify(material, now) {
        return Verdict::Reissue(format!("the current one is unusable: {e:#}"));
    }
    if ranges::canonical(&leaf.ranges) != ranges::canonical(wanted) {
        return Verdict::Reissue(format!(
            "the current one carries {}, not {}",
            if leaf.ranges.is_empty() {
                "no ranges".to_string()
            } else {
                ranges::list(&leaf.ranges)
            },
            ranges::list(wanted)
        ));
    }
    if leaf.not_after - now < RENEW_DAYS * 24 * 3600 {
        return Verdict::Reissue(format!("the current one expires {}", date(leaf.not_after)));
    }
    Verdict::Keep(leaf)
}

/// A Unix time as an RFC 3339 UTC date and time.
pub fn date(unix: i64) -> String {
    let time =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Refuses a mesh CA whose certificate and key do not belong together, or that is no CA.
pub fn check_ca(ca: &CertifiedKey) -> anyhow::Result<()> {
    let probe: ClusterId = "probe".parse().expect("a valid cluster ID");
    let leaf = trellis_controller::certs::generate_cluster_cert(
        ca,
        &probe,
        trellis_controller::certs::Validity::days_from_now(1),
    )
    .map_err(anyhow::Error::from)?;
    let material = TlsMaterial {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if let Err(e) = verify(&material, now) {
        bail!("the mesh CA's key does not sign for its certificate: {e:#}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_controller::certs::{Validity, generate_ca, generate_cluster_cert_with_ranges};

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn material(ca: &CertifiedKey, id: &str, ranges: &[IpNet], days: i64) -> TlsMaterial {
        let leaf = generate_cluster_cert_with_ranges(
            ca,
            &id.parse().unwrap(),
            ranges,
            Validity::days_from_now(days),
        )
        .unwrap();
        TlsMaterial {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
        }
    }

    #[test]
    fn secrets_round_trip_and_name_their_keys() {
        let ca = generate_ca("c1", Validity::days_from_now(10)).unwrap();
        let back = ca_from_secret(&ca_secret("trellis-system", &ca)).unwrap();
        assert_eq!(back.cert_pem, ca.cert_pem);
        assert_eq!(back.key_pem, ca.key_pem);
        let tls = material(&ca, "c1", &nets(&["10.11.0.0/16"]), 365);
        let secret = tls_secret("trellis-system", &tls, &[]);
        assert_eq!(secret.type_, None);
        let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
        assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
        assert_eq!(tls_from_secret(&secret).unwrap().cert_pem, tls.cert_pem);
        let mut broken = secret.clone();
        broken.data.as_mut().unwrap().remove("tls.key");
        let err = tls_from_secret(&broken).unwrap_err().to_string();
        assert!(err.contains("trellis-tls has no key tls.key"), "{err}");
        assert_eq!(subject_name(&ca.cert_pem), "Trellis mesh CA c1");
        check_ca(&ca).unwrap();
        let other = generate_ca("c2", Validity::days_from_now(10)).unwrap();
        let mismatched = CertifiedKey {
            cert_pem: ca.cert_pem.clone(),
            key_pem: other.key_pem,
        };
        assert!(check_ca(&mismatched).is_err());
    }

    #[test]
    fn peer_ranges_are_recorded_on_the_secret_and_read_back() {
        let ca = generate_ca("c1", Validity::days_from_now(10)).unwrap();
        let tls = material(&ca, "c1", &nets(&["10.11.0.0/16", "10.200.0.0/24"]), 365);
        assert!(
            recorded_peer_ranges(&tls_secret("trellis-system", &tls, &[]))
                .unwrap()
                .is_empty()
        );
        let peers = nets(&["10.200.0.0/24", "fd00:200::/64"]);
        let mut secret = tls_secret("trellis-system", &tls, &peers);
        assert_eq!(recorded_peer_ranges(&secret).unwrap(), peers);
        secret
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(PEER_CIDRS_ANNOTATION.into(), "10.200.0.0/24,bogus".into());
        let err = recorded_peer_ranges(&secret).unwrap_err().to_string();
        assert!(err.contains("\"bogus\" is not a CIDR"), "{err}");
        // ca.crt stays readable on its own when the rest is broken, and only a certificate is.
        let mut broken = tls_secret("trellis-system", &tls, &[]);
        broken.data.as_mut().unwrap().remove("tls.key");
        assert_eq!(ca_of_tls_secret(&broken), Some(ca.cert_pem.clone()));
        broken.data.as_mut().unwrap().insert(
            "ca.crt".into(),
            ByteString(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec()),
        );
        assert_eq!(ca_of_tls_secret(&broken), None);
    }

    #[test]
    fn a_valid_certificate_for_the_same_ca_identity_and_ranges_is_kept() {
        let ca = generate_ca("c1", Validity::days_from_now(3650)).unwrap();
        let wanted = nets(&["10.11.0.0/16", "10.111.0.0/16"]);
        let id: ClusterId = "c1".parse().unwrap();
        let tls = material(&ca, "c1", &wanted, 365);
        let Verdict::Keep(leaf) = judge(&tls, Some(&ca.cert_pem), &id, &wanted, now()) else {
            panic!("should be kept");
        };
        assert_eq!(leaf.ranges, wanted);
        // Without a CA at hand, its own CA is trusted.
        assert!(matches!(
            judge(&tls, None, &id, &wanted, now()),
            Verdict::Keep(_)
        ));
    }

    #[test]
    fn other_ranges_another_ca_a_near_expiry_or_a_broken_one_are_reissued() {
        let ca = generate_ca("c1", Validity::days_from_now(3650)).unwrap();
        let other = generate_ca("c9", Validity::days_from_now(3650)).unwrap();
        let wanted = nets(&["10.11.0.0/16", "10.111.0.0/16"]);
        let id: ClusterId = "c1".parse().unwrap();
        let reason = |tls: &TlsMaterial, ca: &CertifiedKey| match judge(
            tls,
            Some(&ca.cert_pem),
            &id,
            &wanted,
            now(),
        ) {
            Verdict::Reissue(reason) => reason,
            Verdict::Keep(_) => panic!("kept"),
        };
        let narrow = material(&ca, "c1", &nets(&["10.11.0.0/16"]), 365);
        assert!(
            reason(&narrow, &ca).contains("carries 10.11.0.0/16, not 10.11.0.0/16, 10.111.0.0/16")
        );
        let good = material(&ca, "c1", &wanted, 365);
        let r = reason(&good, &other);
        assert!(
            r.contains("another mesh CA") && r.contains("Trellis mesh CA c9"),
            "{r}"
        );
        let expiring = material(&ca, "c1", &wanted, 10);
        assert!(reason(&expiring, &ca).contains("expires"));
        let mut wrong_key = good.clone();
        wrong_key.key_pem = narrow.key_pem.clone();
        assert!(reason(&wrong_key, &ca).contains("unusable"));
        // A certificate that does not chain to the ca.crt beside it.
        let mut foreign = material(&other, "c1", &wanted, 365);
        foreign.ca_pem = ca.cert_pem.clone();
        assert!(reason(&foreign, &ca).contains("does not verify"));
        let mut garbage = good;
        garbage.cert_pem = "not a certificate".into();
        assert!(reason(&garbage, &ca).contains("unreadable"));
    }
}
