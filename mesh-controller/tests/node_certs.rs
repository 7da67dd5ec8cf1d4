//! The controller's half of the node-certificate bootstrap against a scripted API server
//! answering with real Kubernetes JSON (a TokenReview as the API server returns it for a
//! bound, audience-scoped ServiceAccount token; the gateway's Pod), every call checked
//! against the chart's RBAC.

mod common;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use trellis_controller::certs::Validity;
use trellis_controller::node_certs::{BOOTSTRAP_AUDIENCE, BootstrapRefusal, NodeIssuer, Subject};
use trellis_core::agent::AgentIdentity;

const POD: &str = "trellis-gateway-x7k2p";
const POD_UID: &str = "5f0c2b9e-1d0a-4f6e-9a57-3c1b2d4e6f80";
const DNS_POD: &str = "trellis-dns-6c9f8d7b5-q2w4e";
const DNS_POD_UID: &str = "9a1e7c3d-2b4f-4d6a-8e0c-5f7a9b1c3d5e";
const GATEWAY_SA: &str = "system:serviceaccount:trellis-system:trellis-gateway";
const DNS_SA: &str = "system:serviceaccount:trellis-system:trellis-dns";

fn review(authenticated: bool, username: &str, audiences: &[&str]) -> Value {
    review_of(POD, POD_UID, authenticated, username, audiences)
}

/// A TokenReview's answer for a token bound to the pod `pod` (`uid`).
fn review_of(
    pod: &str,
    uid: &str,
    authenticated: bool,
    username: &str,
    audiences: &[&str],
) -> Value {
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": "eyJhbGciOiJSUzI1NiIs...", "audiences": [BOOTSTRAP_AUDIENCE]},
        "status": {
            "authenticated": authenticated,
            "user": {
                "username": username,
                "uid": "8d3f0f3e-0b1c-4b8a-9f5e-2a7c6d1e0b9a",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:trellis-system", "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/credential-id": ["JTI=1b4c6a1e-5c3e-4a4f-8f55-0d1f2e3c4b5a"],
                    "authentication.kubernetes.io/node-name": ["node-1"],
                    "authentication.kubernetes.io/node-uid": ["0e6a1f2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"],
                    "authentication.kubernetes.io/pod-name": [pod],
                    "authentication.kubernetes.io/pod-uid": [uid]
                }
            },
            "audiences": audiences
        }
    })
}

fn pod(node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD,
            "namespace": "trellis-system",
            "uid": POD_UID,
            "labels": {"app.kubernetes.io/component": "gateway"}
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "trellis-gateway",
            "containers": [{"name": "gateway", "image": "trellis:dev"}]
        },
        "status": {"phase": "Running"}
    })
}

/// A DNS pod (a Deployment's), as the API server returns it.
fn dns_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": DNS_POD,
            "namespace": "trellis-system",
            "uid": DNS_POD_UID,
            "labels": {"app.kubernetes.io/component": "dns"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "trellis-dns-6c9f8d7b5", "uid": "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "nodeName": "node-0",
            "serviceAccountName": "trellis-dns",
            "containers": [{"name": "dns", "image": "trellis:dev"}]
        },
        "status": {"phase": "Running"}
    })
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    // Whatever names the request asks for, the certificate carries the node's identity only.
    rcgen::CertificateParams::new(vec!["controller.example".into()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

/// Runs `issue` for `node` against a scripted API answering with `answers` in order.
async fn issue(
    node: &str,
    csr: String,
    answers: Vec<Value>,
) -> (Result<String, BootstrapRefusal>, common::Calls) {
    issue_for(Subject::Node(node.to_owned()), csr, answers).await
}

/// Runs `issue` for `subject` against a scripted API answering with `answers` in order.
async fn issue_for(
    subject: Subject,
    csr: String,
    answers: Vec<Value>,
) -> (Result<String, BootstrapRefusal>, common::Calls) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let ca = trellis_controller::agent_certs::generate_agent_ca("c1", Validity::days_from_now(1))
        .unwrap();
    let issuer = NodeIssuer {
        client,
        ca,
        cluster: "c1".into(),
        service_account: ("trellis-system".into(), "trellis-gateway".into()),
        dns_service_account: Some(("trellis-system".into(), "trellis-dns".into())),
    };
    let task = tokio::spawn(async move {
        issuer
            .issue(&subject, "eyJhbGciOiJSUzI1NiIs...", &csr)
            .await
    });
    let calls = common::Calls::default();
    for answer in answers {
        let Some((req, send)) = handle.next_request().await else {
            break;
        };
        calls.record(&req);
        if req.method() == http::Method::POST {
            assert_eq!(
                req.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            assert_eq!(body["spec"]["audiences"], json!([BOOTSTRAP_AUDIENCE]));
        } else {
            let path = req.uri().path().to_owned();
            assert!(
                path == format!("/api/v1/namespaces/trellis-system/pods/{POD}")
                    || path == format!("/api/v1/namespaces/trellis-system/pods/{DNS_POD}"),
                "{path}"
            );
        }
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(answer.to_string().into_bytes()))
                .unwrap(),
        );
    }
    (task.await.unwrap(), calls)
}

#[tokio::test]
async fn a_gateway_token_bound_to_a_pod_on_the_node_gets_that_nodes_certificate() {
    let sa = "system:serviceaccount:trellis-system:trellis-gateway";
    let (issued, calls) = issue(
        "node-1",
        csr(),
        vec![review(true, sa, &[BOOTSTRAP_AUDIENCE]), pod("node-1")],
    )
    .await;
    let pem = issued.expect("issued");
    let der = trellis_controller::tls::parse_certs(&pem).unwrap();
    assert_eq!(
        trellis_agent_client::tls::identities_of(&der[0]),
        [AgentIdentity::Node {
            cluster: "c1".into(),
            node: "node-1".into()
        }],
        "the node's identity only, whatever the request asked"
    );
    let lifetime = trellis_agent_client::tls::not_after(&der[0]).unwrap()
        - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (23 * 3600..=24 * 3600 + 60).contains(&lifetime),
        "{lifetime} s"
    );
    assert_eq!(calls.count("create", "tokenreviews"), 1);
    assert_eq!(calls.count("get", "pods"), 1);
    calls.assert_allowed_by_the_chart();
}

#[tokio::test]
async fn every_other_token_or_pod_is_refused() {
    let sa = "system:serviceaccount:trellis-system:trellis-gateway";
    // The gateway of node-0 asks for node-1's certificate.
    let (issued, calls) = issue(
        "node-1",
        csr(),
        vec![review(true, sa, &[BOOTSTRAP_AUDIENCE]), pod("node-0")],
    )
    .await;
    assert_eq!(issued, Err(BootstrapRefusal::PodOnOtherNode));
    calls.assert_allowed_by_the_chart();
    // Another pod's token (any pod can ask for a token with this audience).
    let (issued, _) = issue(
        "node-1",
        csr(),
        vec![review(
            true,
            "system:serviceaccount:default:default",
            &[BOOTSTRAP_AUDIENCE],
        )],
    )
    .await;
    assert_eq!(issued, Err(BootstrapRefusal::WrongServiceAccount));
    // Not authenticated, or for another audience.
    let (issued, _) = issue("node-1", csr(), vec![review(false, sa, &[])]).await;
    assert_eq!(issued, Err(BootstrapRefusal::TokenRejected));
    let (issued, _) = issue(
        "node-1",
        csr(),
        vec![review(true, sa, &["https://kubernetes.default.svc"])],
    )
    .await;
    assert_eq!(issued, Err(BootstrapRefusal::TokenRejected));
    // A request whose signature does not verify (a public key the sender does not hold).
    let mut bad = csr();
    let at = bad.len() / 2;
    bad.replace_range(at..at + 4, "AAAA");
    let (issued, _) = issue(
        "node-1",
        bad,
        vec![review(true, sa, &[BOOTSTRAP_AUDIENCE]), pod("node-1")],
    )
    .await;
    assert_eq!(issued, Err(BootstrapRefusal::BadRequest));
}

/// DNS's token bound to a DNS pod gets `dns.<cluster>.trellis` and nothing else; a gateway's
/// token never gets DNS's identity, and DNS's token never a node's.
#[tokio::test]
async fn dns_gets_its_identity_for_its_own_token_only() {
    let (issued, calls) = issue_for(
        Subject::Dns,
        csr(),
        vec![
            review_of(DNS_POD, DNS_POD_UID, true, DNS_SA, &[BOOTSTRAP_AUDIENCE]),
            dns_pod(),
        ],
    )
    .await;
    let pem = issued.expect("issued");
    let der = trellis_controller::tls::parse_certs(&pem).unwrap();
    assert_eq!(
        trellis_agent_client::tls::identities_of(&der[0]),
        [AgentIdentity::Dns {
            cluster: "c1".into()
        }]
    );
    assert_eq!(calls.count("create", "tokenreviews"), 1);
    assert_eq!(calls.count("get", "pods"), 1);
    calls.assert_allowed_by_the_chart();

    // A gateway's token asking for DNS's identity: refused at the review, no pod looked at.
    let (issued, calls) = issue_for(
        Subject::Dns,
        csr(),
        vec![
            review(true, GATEWAY_SA, &[BOOTSTRAP_AUDIENCE]),
            pod("node-0"),
        ],
    )
    .await;
    assert_eq!(issued, Err(BootstrapRefusal::WrongServiceAccount));
    assert_eq!(calls.count("get", "pods"), 0);

    // DNS's token asking for a node's identity (the node its pod runs on included).
    let (issued, calls) = issue_for(
        Subject::Node("node-0".into()),
        csr(),
        vec![
            review_of(DNS_POD, DNS_POD_UID, true, DNS_SA, &[BOOTSTRAP_AUDIENCE]),
            dns_pod(),
        ],
    )
    .await;
    assert_eq!(issued, Err(BootstrapRefusal::WrongServiceAccount));
    assert_eq!(calls.count("get", "pods"), 0);

    // DNS's token whose pod is gone (same name, another UID): refused.
    let mut replaced = dns_pod();
    replaced["metadata"]["uid"] = json!("00000000-0000-4000-8000-000000000000");
    let (issued, _) = issue_for(
        Subject::Dns,
        csr(),
        vec![
            review_of(DNS_POD, DNS_POD_UID, true, DNS_SA, &[BOOTSTRAP_AUDIENCE]),
            replaced,
        ],
    )
    .await;
    assert_eq!(issued, Err(BootstrapRefusal::PodNotFound));

    // DNS's token for the API server's audience.
    let (issued, _) = issue_for(
        Subject::Dns,
        csr(),
        vec![review_of(
            DNS_POD,
            DNS_POD_UID,
            true,
            DNS_SA,
            &["https://kubernetes.default.svc"],
        )],
    )
    .await;
    assert_eq!(issued, Err(BootstrapRefusal::TokenRejected));
}

/// Without a DNS ServiceAccount configured, nobody gets DNS's identity.
#[tokio::test]
async fn without_a_dns_service_account_no_dns_identity_is_issued() {
    let (svc, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let ca = trellis_controller::agent_certs::generate_agent_ca("c1", Validity::days_from_now(1))
        .unwrap();
    let issuer = NodeIssuer {
        client,
        ca,
        cluster: "c1".into(),
        service_account: ("trellis-system".into(), "trellis-gateway".into()),
        dns_service_account: None,
    };
    assert_eq!(
        issuer.issue(&Subject::Dns, "t", &csr()).await,
        Err(BootstrapRefusal::WrongServiceAccount)
    );
}
