//! A gateway without a node certificate gets one (on Kubernetes): it generates a key (the
//! private half never leaves the node), sends a PKCS#10 request and its projected
//! ServiceAccount token in an `AgentRole::Bootstrap` hello over TLS (the controller verified
//! as `agent.<cluster>.trellis` of the agent CA, no client certificate), and receives its
//! `<node>.node.<cluster>.trellis` certificate. [`renew_due`] says when to ask again.

use std::path::Path;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_core::agent::{AgentHello, AgentIdentity, AgentRole, BootstrapIssued, NodeBootstrap};
use trellis_core::framing::{FrameDecoder, encode_json_frame};
use trellis_netns::Netns;

use crate::client::Ended;

/// What the controller issued, with the key generated here.
#[derive(Clone)]
pub struct Issued {
    pub certificate_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("certificate_pem", &self.certificate_pem)
            .finish_non_exhaustive()
    }
}

fn bad(what: impl std::fmt::Display) -> Ended {
    Ended::Hello(std::io::Error::other(what.to_string()))
}

/// Asks the controller at `address` for `node`'s certificate with `token`.
pub async fn bootstrap(
    address: &str,
    ca: &Path,
    cluster: &str,
    node: &str,
    token: &str,
    netns: Option<&Netns>,
) -> Result<Issued, Ended> {
    let identity = AgentIdentity::Node {
        cluster: cluster.to_owned(),
        node: node.to_owned(),
    };
    let key = rcgen::KeyPair::generate().map_err(bad)?;
    let csr_pem = rcgen::CertificateParams::new(vec![identity.dns_name()])
        .and_then(|params| params.serialize_request(&key))
        .and_then(|csr| csr.pem())
        .map_err(bad)?;
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(ca).map_err(Ended::Connect)?;
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert.map_err(bad)?).map_err(bad)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(bad)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = AgentIdentity::Controller {
        cluster: cluster.to_owned(),
    }
    .dns_name();
    let name = ServerName::try_from(name).map_err(bad)?;
    let tcp = crate::client::tcp(address, netns)
        .await
        .map_err(Ended::Connect)?;
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| Ended::Tls(std::io::ErrorKind::TimedOut.into()))?
    .map_err(Ended::Tls)?;
    let hello = AgentHello {
        token: None,
        role: AgentRole::Bootstrap(NodeBootstrap {
            node: node.to_owned(),
            service_account_token: token.trim().to_owned(),
            csr_pem,
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
    Ok(Issued {
        certificate_pem: answer.certificate_pem,
        key_pem: key.serialize_pem(),
        ca_pem: answer.ca_pem,
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
