//! `trellis diagnose --context A`: what a user checks before filing a bug, each check passed
//! or failed with the fix. The facts are gathered through the API server ([`gather`]: the
//! controller's `/status`, every gateway's `/node`, the API server's clock, the cluster's
//! certificate Secret); the checks are pure functions of them ([`checks`]).
//!
//! Exit codes: 0 nothing failed (warnings and unknowns allowed), 1 a check failed.

pub mod checks;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::core::v1::Secret;
use trellis_core::status::ControllerStatus;
use trellis_gateway::node_report::NodeReport;

use crate::cluster::{self, ClockOffset, ClusterArgs};
use checks::{Check, Outcome};

/// Gateways whose node facts are read at once.
const PARALLEL_NODE_READS: usize = 8;

/// The Secret with the mesh CA and the cluster's certificate (the chart's `tls.secretName`).
pub const DEFAULT_TLS_SECRET: &str = "trellis-tls";

#[derive(Args)]
pub struct DiagnoseArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The Secret with ca.crt and tls.crt (the chart's tls.secretName).
    #[arg(long, default_value = DEFAULT_TLS_SECRET)]
    tls_secret: String,
}

/// Everything the checks judge.
#[derive(Debug, Clone)]
pub struct Facts {
    pub namespace: String,
    pub controller_service: String,
    pub tls_secret: String,
    /// This machine's clock when the facts were gathered.
    pub now: SystemTime,
    pub controller: Result<ControllerStatus, String>,
    /// Why the gateway pods could not be listed.
    pub pods_error: Option<String>,
    pub gateways: Vec<GatewayFacts>,
    /// The API server's clock against this machine's.
    pub api_clock: Option<ClockOffset>,
    pub certificates: Result<Vec<CertificateFacts>, String>,
}

/// One gateway pod and what its `/node` said.
#[derive(Debug, Clone)]
pub struct GatewayFacts {
    pub pod: String,
    pub node: String,
    pub report: Result<NodeReport, String>,
    /// The node's clock against this machine's.
    pub clock: Option<ClockOffset>,
}

/// One certificate of the TLS Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Its key in the Secret: `ca.crt`, `tls.crt`.
    pub key: String,
    pub subject: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// The certificates of a PEM bundle.
pub fn certificate_facts(key: &str, pem: &[u8]) -> anyhow::Result<Vec<CertificateFacts>> {
    let mut certs = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.with_context(|| format!("{key} is not PEM"))?;
        let cert = block
            .parse_x509()
            .map_err(|e| anyhow::anyhow!("{key}: not an X.509 certificate: {e}"))?;
        let validity = cert.validity();
        certs.push(CertificateFacts {
            key: key.to_string(),
            subject: cert.subject().to_string(),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        });
    }
    anyhow::ensure!(!certs.is_empty(), "{key} holds no certificate");
    Ok(certs)
}

/// `ca.crt` and `tls.crt` of the TLS Secret.
async fn read_certificates(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Vec<CertificateFacts>> {
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let secret = api
        .get(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name}"))?;
    let data = secret.data.unwrap_or_default();
    let mut certs = Vec::new();
    for key in ["ca.crt", "tls.crt"] {
        let pem = data
            .get(key)
            .with_context(|| format!("Secret {namespace}/{name} has no {key}"))?;
        certs.extend(certificate_facts(key, &pem.0)?);
    }
    Ok(certs)
}

/// Reads every fact; what cannot be read is recorded where the checks look for it.
pub async fn gather(client: &kube::Client, target: &ClusterArgs, tls_secret: &str) -> Facts {
    let (namespace, controller_service) = (target.namespace.as_str(), target.service.as_str());
    let text = |e: anyhow::Error| format!("{e:#}");
    let controller = target.controller_status(client).await.map_err(text);
    let (pods, pods_error) = match cluster::pods(client, namespace, Some("gateway")).await {
        Ok(pods) => (pods, None),
        Err(e) => (Vec::new(), Some(text(e))),
    };
    // A few nodes at a time: a large cluster is read in seconds, without a burst of proxy
    // requests on the API server.
    let mut reading = tokio::task::JoinSet::new();
    let mut gateways = Vec::new();
    for pod in pods {
        while reading.len() >= PARALLEL_NODE_READS {
            if let Some(Ok(gateway)) = reading.join_next().await {
                gateways.push(gateway);
            }
        }
        let (client, namespace) = (client.clone(), namespace.to_string());
        reading.spawn(async move {
            let (report, clock) = match cluster::node_report(&client, &namespace, &pod).await {
                Ok((report, clock)) => (Ok(report), Some(clock)),
                Err(e) => (Err(format!("{e:#}")), None),
            };
            GatewayFacts {
                pod: cluster::pod_name(&pod).to_string(),
                node: cluster::pod_node(&pod).to_string(),
                report,
                clock,
            }
        });
    }
    while let Some(done) = reading.join_next().await {
        if let Ok(gateway) = done {
            gateways.push(gateway);
        }
    }
    gateways.sort_by(|a, b| a.node.cmp(&b.node));
    Facts {
        namespace: namespace.to_string(),
        controller_service: controller_service.to_string(),
        tls_secret: tls_secret.to_string(),
        now: SystemTime::now(),
        controller,
        pods_error,
        gateways,
        api_clock: cluster::api_server_clock(client).await.ok(),
        certificates: read_certificates(client, namespace, tls_secret)
            .await
            .map_err(text),
    }
}

/// The checks as lines: `[FAIL] mtu  node-1: ...`, each failure's fix below it, and a tally.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let _ = writeln!(
            out,
            "[{:>7}] {:width$}  {}: {}",
            c.outcome.label(),
            c.name,
            c.subject,
            c.detail
        );
        if let Some(fix) = &c.fix {
            let _ = writeln!(out, "{:>9} {:width$}  fix: {fix}", "", "");
        }
    }
    let count = |o: Outcome| checks.iter().filter(|c| c.outcome == o).count();
    let _ = writeln!(
        out,
        "\n{} passed, {} failed, {} warnings, {} unknown",
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Warn),
        count(Outcome::Unknown)
    );
    out
}

pub fn run(args: DiagnoseArgs) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let client = args.cluster.connect().await?;
        let facts = gather(&client, &args.cluster, &args.tls_secret).await;
        let checks = checks::all(&facts);
        print!("{}", render(&checks));
        Ok(if checks.iter().any(|c| c.outcome == Outcome::Fail) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_api::{Answer, scripted, testdata};

    const HEALTHY: &str = include_str!("../../tests/fixtures/status-healthy.json");

    fn node_report(node: &str) -> NodeReport {
        serde_json::from_value(testdata(&format!("node-report-{node}.json"))).unwrap()
    }

    fn secret_certificates() -> Vec<CertificateFacts> {
        let secret: Secret = serde_json::from_value(testdata("secret-trellis-tls.json")).unwrap();
        let data = secret.data.unwrap();
        let mut certs = certificate_facts("ca.crt", &data["ca.crt"].0).unwrap();
        certs.extend(certificate_facts("tls.crt", &data["tls.crt"].0).unwrap());
        certs
    }

    /// A healthy cluster's facts, judged a day after its certificate was issued.
    pub(crate) fn facts() -> Facts {
        let certificates = secret_certificates();
        let now = SystemTime::UNIX_EPOCH
            + Duration::from_secs(certificates[1].not_before as u64 + 86_400);
        let clock = |offset_ms| {
            Some(ClockOffset {
                offset_ms,
                uncertainty_ms: 20,
            })
        };
        Facts {
            namespace: "trellis-system".into(),
            controller_service: "trellis-controller".into(),
            tls_secret: "trellis-tls".into(),
            now,
            controller: Ok(serde_json::from_str(HEALTHY).unwrap()),
            pods_error: None,
            gateways: ["node-0", "node-1"]
                .iter()
                .enumerate()
                .map(|(i, node)| GatewayFacts {
                    pod: format!("trellis-gateway-{i}"),
                    node: node.to_string(),
                    report: Ok(node_report(node)),
                    clock: clock(i as i64 * 300),
                })
                .collect(),
            api_clock: clock(-200),
            certificates: Ok(certificates),
        }
    }

    pub(crate) fn facts_without_controller() -> Facts {
        Facts {
            controller: Err(
                "HTTP 503: no endpoints available for service \"trellis-controller\"".into(),
            ),
            ..facts()
        }
    }

    #[test]
    fn the_secret_fixture_holds_the_ca_and_the_cluster_certificate() {
        let certs = secret_certificates();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].subject, "CN=Trellis mesh CA demo");
        assert_eq!(certs[1].subject, "CN=east.cluster.trellis");
        assert_eq!(certs[1].not_after - certs[1].not_before, 365 * 86_400);
        assert!(certificate_facts("tls.crt", b"not a certificate").is_err());
    }

    #[test]
    fn renders_one_line_per_check_with_fixes_and_a_tally() {
        let mut facts = facts();
        facts.gateways[1].report.as_mut().unwrap().rp_filter.all = Some(1);
        let text = render(&checks::all(&facts));
        let line = text
            .lines()
            .find(|l| l.contains("rp_filter") && l.contains("node-1"))
            .unwrap();
        assert!(line.starts_with("[   FAIL] rp_filter"), "{text}");
        assert!(
            text.contains("fix: on node node-1: sysctl -w net.ipv4.conf.all.rp_filter=0"),
            "{text}"
        );
        assert!(
            text.ends_with("\n13 passed, 1 failed, 0 warnings, 0 unknown\n"),
            "{text}"
        );
    }

    /// A kind-like cluster through its API server: the controller's Service answers, one
    /// gateway answers its node facts, the other's pod proxy is refused.
    #[tokio::test]
    async fn gathers_through_the_api_servers_proxies() {
        let pods = testdata("pods-trellis.json");
        let (client, log, server) = scripted(move |target| {
            let ns = "/api/v1/namespaces/trellis-system";
            match target {
                t if t == format!("{ns}/services/http:trellis-controller:metrics/proxy/status") => {
                    Answer::json(200, &serde_json::from_str(HEALTHY).unwrap())
                }
                t if t.starts_with(&format!("{ns}/pods?")) => {
                    assert!(t.contains("app.kubernetes.io%2Fcomponent%3Dgateway"), "{t}");
                    let mut list = pods.clone();
                    list["items"].as_array_mut().unwrap().retain(|p| {
                        p["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
                    });
                    Answer::json(200, &list)
                }
                t if t == format!("{ns}/pods/trellis-gateway-5xk2m:9586/proxy/node") => {
                    Answer::json(200, &testdata("node-report-node-0.json"))
                }
                t if t == format!("{ns}/pods/trellis-gateway-h8q9r:9586/proxy/node") => {
                    Answer::failure(
                        503,
                        "ServiceUnavailable",
                        "error trying to reach service: dial tcp 172.18.0.4:9586: connect: connection refused",
                    )
                }
                "/version" => Answer::json(200, &testdata("version.json"))
                    .dated("Fri, 27 Nov 2026 03:41:07 GMT"),
                t if t == format!("{ns}/secrets/trellis-tls") => {
                    Answer::json(200, &testdata("secret-trellis-tls.json"))
                }
                other => Answer::text(404, &format!("404 page not found: {other}")),
            }
        });
        let facts = gather(&client, &ClusterArgs::default(), DEFAULT_TLS_SECRET).await;
        assert_eq!(facts.controller.as_ref().unwrap().cluster.to_string(), "c1");
        assert_eq!(facts.gateways.len(), 2);
        let (up, down) = (&facts.gateways[0], &facts.gateways[1]);
        assert_eq!(
            (up.pod.as_str(), up.node.as_str()),
            ("trellis-gateway-5xk2m", "node-0")
        );
        assert_eq!(up.report.as_ref().unwrap().mtu.underlay, Some(1500));
        assert!(
            down.report
                .as_ref()
                .unwrap_err()
                .contains("connection refused"),
            "{down:?}"
        );
        // The node's clock and the API server's Date name the same moment (node-0 read
        // 03:41:07.400, the Date says 03:41:07 of a whole second): within the uncertainty.
        let (node, api) = (up.clock.unwrap(), facts.api_clock.unwrap());
        assert!(
            (node.offset_ms - api.offset_ms).unsigned_abs()
                <= node.uncertainty_ms + api.uncertainty_ms,
            "{node:?} {api:?}"
        );
        assert_eq!(facts.certificates.as_ref().unwrap().len(), 2);
        let checks = checks::all(&facts);
        let failed: Vec<_> = checks
            .iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .map(|c| (c.name, c.subject.as_str()))
            .collect();
        assert!(failed.contains(&("node facts", "node-1")), "{failed:?}");
        assert!(
            !failed.iter().any(|(name, _)| *name == "gateway registered"),
            "{failed:?}"
        );
        assert_eq!(
            log.lock().unwrap().len(),
            6,
            "status, pods, two nodes, version, secret: {:?}",
            log.lock().unwrap()
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_missing_secret_and_an_absent_controller_are_facts_not_errors() {
        let (client, _log, server) = scripted(|target| {
            if target.contains("/secrets/") {
                Answer::failure(404, "NotFound", "secrets \"trellis-tls\" not found")
            } else if target.contains("/services/") {
                Answer::failure(
                    503,
                    "ServiceUnavailable",
                    "no endpoints available for service \"trellis-controller\"",
                )
            } else if target.contains("/pods?") {
                Answer::json(
                    200,
                    &serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}),
                )
            } else {
                Answer::json(200, &testdata("version.json"))
            }
        });
        let facts = gather(&client, &ClusterArgs::default(), DEFAULT_TLS_SECRET).await;
        assert!(
            facts
                .controller
                .as_ref()
                .unwrap_err()
                .contains("no endpoints available")
        );
        assert!(
            facts
                .certificates
                .as_ref()
                .unwrap_err()
                .contains("not found")
        );
        assert_eq!(facts.api_clock, None, "no Date header");
        let checks = checks::all(&facts);
        let text = render(&checks);
        assert!(text.contains("[   FAIL] controller"), "{text}");
        assert!(text.contains("no gateway pod found"), "{text}");
        assert!(
            text.contains("fix: create it: `trellis mesh enable"),
            "{text}"
        );
        server.abort();
    }
}
