//! Node certificates on Kubernetes: a gateway proves which node it runs on with its projected
//! ServiceAccount token (audience [`BOOTSTRAP_AUDIENCE`]) and asks for a short-lived
//! `<node>.node.<cluster>.trellis` certificate for a key it generated (a PKCS#10 request: only
//! the public half leaves the node, and the request's signature proves the gateway holds the
//! private half). [`NodeIssuer::issue`] decides, with two API calls:
//!
//! 1. a TokenReview (`authentication.k8s.io/v1`, `create tokenreviews`): the token must be
//!    authenticated for the audience, belong to the gateway's ServiceAccount, and be bound to
//!    a Pod (its `authentication.kubernetes.io/pod-name` and `pod-uid` extras);
//! 2. that Pod (`get pods`): it must be the same Pod (UID) and run on the node asked for.
//!
//! Then it signs, under the cluster's agent CA, whatever names the request asked for replaced
//! by the node's identity alone. The agent port asks it for `AgentRole::Bootstrap` hellos
//! (`agent::AgentAuth::TlsWithBootstrap`); the gateway's side is
//! `trellis_agent_client::bootstrap`.
//!
//! DNS gets its read-only `dns.<cluster>.trellis` the same way, with the DNS ServiceAccount's
//! token (its pod must exist; no node is checked). Each ServiceAccount gets only its own kind:
//! a gateway's token never yields DNS's certificate (or another node's), DNS's token never a
//! node's ([`NodeIssuer::issue`] picks the account from what is asked).

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
pub use trellis_agent_client::bootstrap::Subject;
use trellis_core::agent::AgentIdentity;

use crate::certs::CertifiedKey;

/// The audience a gateway's projected token must be issued for (so a token made for the API
/// server, or for anything else, is not accepted here, and this one is useless elsewhere).
pub const BOOTSTRAP_AUDIENCE: &str = "trellis-agent";
/// How long a node certificate is valid: short, since expiry is its revocation.
pub const NODE_CERT_HOURS: i64 = 24;

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Why a bootstrap request is refused; `label()` is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapRefusal {
    #[error("the token is not authenticated for the agent audience")]
    TokenRejected,
    #[error(
        "the token is not the ServiceAccount's of what it asks for (the gateways' for a node, DNS's for DNS)"
    )]
    WrongServiceAccount,
    #[error("the token is not bound to a pod")]
    NotAPodToken,
    #[error("the token's pod does not exist (or is another pod of the same name)")]
    PodNotFound,
    #[error("the token's pod runs on another node")]
    PodOnOtherNode,
    #[error("the certificate request does not parse or its signature does not verify")]
    BadRequest,
    #[error("the Kubernetes API did not answer")]
    Api,
    #[error("signing failed")]
    Signing,
}

impl BootstrapRefusal {
    pub fn label(&self) -> &'static str {
        match self {
            BootstrapRefusal::TokenRejected => "bootstrap_token_rejected",
            BootstrapRefusal::WrongServiceAccount => "bootstrap_wrong_service_account",
            BootstrapRefusal::NotAPodToken => "bootstrap_not_a_pod_token",
            BootstrapRefusal::PodNotFound => "bootstrap_pod_not_found",
            BootstrapRefusal::PodOnOtherNode => "bootstrap_pod_on_other_node",
            BootstrapRefusal::BadRequest => "bootstrap_bad_request",
            BootstrapRefusal::Api => "bootstrap_api",
            BootstrapRefusal::Signing => "bootstrap_signing",
        }
    }
}

/// Issues node certificates after checking the gateway's token with the API server.
#[derive(Clone)]
pub struct NodeIssuer {
    pub client: kube::Client,
    /// The cluster's agent CA (certificate and key).
    pub ca: CertifiedKey,
    pub cluster: String,
    /// The gateways' ServiceAccount: `(namespace, name)`.
    pub service_account: (String, String),
    /// DNS's ServiceAccount, when DNS may bootstrap its identity.
    pub dns_service_account: Option<(String, String)>,
}

impl std::fmt::Debug for NodeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIssuer")
            .field("cluster", &self.cluster)
            .field("service_account", &self.service_account)
            .field("dns_service_account", &self.dns_service_account)
            .finish_non_exhaustive()
    }
}

/// The pod a reviewed token is bound to: `(namespace, name, uid)`, if the review says the
/// token is the gateways' ServiceAccount's, for the agent audience. Pure.
pub fn bound_pod(
    review: &TokenReview,
    service_account: &(String, String),
) -> Result<(String, String, String), BootstrapRefusal> {
    let status = review
        .status
        .as_ref()
        .ok_or(BootstrapRefusal::TokenRejected)?;
    let audiences = status.audiences.clone().unwrap_or_default();
    if status.authenticated != Some(true) || !audiences.iter().any(|a| a == BOOTSTRAP_AUDIENCE) {
        return Err(BootstrapRefusal::TokenRejected);
    }
    let user = status
        .user
        .as_ref()
        .ok_or(BootstrapRefusal::TokenRejected)?;
    let expected = format!(
        "system:serviceaccount:{}:{}",
        service_account.0, service_account.1
    );
    if user.username.as_deref() != Some(expected.as_str()) {
        return Err(BootstrapRefusal::WrongServiceAccount);
    }
    let extra: BTreeMap<String, Vec<String>> = user.extra.clone().unwrap_or_default();
    let one = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .cloned()
            .ok_or(BootstrapRefusal::NotAPodToken)
    };
    Ok((service_account.0.clone(), one(POD_NAME)?, one(POD_UID)?))
}

impl NodeIssuer {
    /// A `<node>.node.<cluster>.trellis` certificate (PEM) for the key of `csr_pem`, if
    /// `token` proves its holder is the gateway pod running on `node`; or
    /// `dns.<cluster>.trellis` if it proves its holder is a DNS pod.
    pub async fn issue(
        &self,
        subject: &Subject,
        token: &str,
        csr_pem: &str,
    ) -> Result<String, BootstrapRefusal> {
        let service_account = match subject {
            Subject::Node(_) => &self.service_account,
            Subject::Dns => self
                .dns_service_account
                .as_ref()
                .ok_or(BootstrapRefusal::WrongServiceAccount)?,
        };
        // The request first: a broken one costs no API call.
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|_| BootstrapRefusal::BadRequest)?;
        CertificateSigningRequestParams::from_der(&der)
            .map_err(|_| BootstrapRefusal::BadRequest)?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![BOOTSTRAP_AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %trellis_core::error_chain(&e), "TokenReview");
                BootstrapRefusal::Api
            })?;
        let (namespace, pod_name, uid) = bound_pod(&reviewed, service_account)?;
        let pod = Api::<Pod>::namespaced(self.client.clone(), &namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|_| BootstrapRefusal::Api)?
            .ok_or(BootstrapRefusal::PodNotFound)?;
        if pod.metadata.uid.as_deref() != Some(uid.as_str()) {
            return Err(BootstrapRefusal::PodNotFound);
        }
        if let Subject::Node(node) = subject
            && pod.spec.and_then(|s| s.node_name).as_deref() != Some(node.as_str())
        {
            return Err(BootstrapRefusal::PodOnOtherNode);
        }
        sign_identity_certificate(&self.ca, &subject.identity(&self.cluster), csr_pem)
    }
}

/// `node`'s certificate ([`NODE_CERT_HOURS`]) under the agent CA `ca`, for the key of
/// `csr_pem` (its signature verified), naming that node's identity only.
pub fn sign_node_certificate(
    ca: &CertifiedKey,
    cluster: &str,
    node: &str,
    csr_pem: &str,
) -> Result<String, BootstrapRefusal> {
    let identity = AgentIdentity::Node {
        cluster: cluster.to_owned(),
        node: node.to_owned(),
    };
    sign_identity_certificate(ca, &identity, csr_pem)
}

/// A client certificate ([`NODE_CERT_HOURS`]) naming `identity` only (a node's or DNS's:
/// client-auth usage), under the agent CA `ca`, for the key of `csr_pem` (its signature
/// verified).
pub fn sign_identity_certificate(
    ca: &CertifiedKey,
    identity: &AgentIdentity,
    csr_pem: &str,
) -> Result<String, BootstrapRefusal> {
    if matches!(identity, AgentIdentity::Controller { .. }) {
        return Err(BootstrapRefusal::Signing);
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|_| BootstrapRefusal::BadRequest)?;
    let csr = CertificateSigningRequestParams::from_der(&der)
        .map_err(|_| BootstrapRefusal::BadRequest)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|_| BootstrapRefusal::Signing)?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|_| BootstrapRefusal::Signing)?;
    let mut params =
        CertificateParams::new(vec![identity.dns_name()]).map_err(|_| BootstrapRefusal::Signing)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.dns_name());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::hours(NODE_CERT_HOURS);
    let cert = params
        .signed_by(&csr.public_key, &issuer)
        .map_err(|_| BootstrapRefusal::Signing)?;
    Ok(cert.pem())
}
