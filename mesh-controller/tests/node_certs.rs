//! The controller's half of the node-certificate bootstrap against a scripted API server
//! answering with real Kubernetes JSON (a TokenReview as the API server returns it for a
//! bound, audience-scoped ServiceAccount token; the gateway's Pod), every call checked
//! against the chart's RBAC.

mod common;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use trellis_controller::certs::Validity;
use trellis_controller::node_certs::{BOOTSTRAP_AUDIENCE, BootstrapRefusal, NodeIssuer};
use trellis_core::agent::AgentIdentity;

const POD: &str = "trellis-gateway-x7k2p";
const POD_UID: &str = "5f0c2b9e-1d0a-4f6e-9a57-3c1b2d4e6f80";

fn review(authenticated: bool, username: &str, audiences: &[&str]) -> Value {
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
                    "authentication.kubernetes.io/pod-name": [POD],
                    "authentication.kubernetes.io/pod-uid": [POD_UID]
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
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let ca = trellis_controller::agent_certs::generate_agent_ca("c1", Validity::days_from_now(1))
        .unwrap();
    let issuer = NodeIssuer {
        client,
        ca,
        cluster: "c1".into(),
        service_account: ("trellis-system".into(), "trellis-gateway".into()),
    };
    let node = node.to_owned();
    let task =
        tokio::spawn(async move { issuer.issue(&node, "eyJhbGciOiJSUzI1NiIs...", &csr).await });
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
            assert_eq!(
                req.uri().path(),
                format!("/api/v1/namespaces/trellis-system/pods/{POD}")
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
