//! What `status --context`, `diagnose` and `sysdump` read from a cluster, through its API
//! server only (no port-forward): the controller's `/status` through the service proxy, each
//! gateway's `/node` and every pod's `/metrics` through the pod proxy, the API server's clock
//! from its `Date` header. Every read has a deadline and a size cap.

use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use http::Request;
use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use trellis_core::status::ControllerStatus;
use trellis_gateway::node_report::NodeReport;

/// The namespace of the chart's release (`helm install -n trellis-system trellis`).
pub const DEFAULT_NAMESPACE: &str = "trellis-system";
/// The controller's Service of a release named `trellis` (helm/trellis/templates/controller.yaml).
pub const DEFAULT_CONTROLLER_SERVICE: &str = "trellis-controller";
/// The port name of every Trellis pod's and Service's metrics listener (also `/status`, `/node`).
pub const METRICS_PORT: &str = "metrics";
/// Every Trellis pod carries it (the chart's selector labels).
pub const TRELLIS_PODS: &str = "app.kubernetes.io/name=trellis";
/// How long one read through the API server may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Status documents, node facts: far below this.
pub const DOCUMENT_CAP: usize = 8 << 20;

/// Which cluster and which Trellis in it a command reads: `--context`, `--namespace`,
/// `--service`, as `status`, `diagnose`, `sysdump` and `peer` take them.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ClusterArgs {
    /// The kubeconfig context of the cluster (default: the current context).
    #[arg(long)]
    pub context: Option<String>,
    /// The namespace Trellis is installed in.
    #[arg(short, long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// The controller's Service: the chart's `<fullname>-controller` (`trellis-controller`
    /// for a release named `trellis`).
    #[arg(long, default_value = DEFAULT_CONTROLLER_SERVICE)]
    pub service: String,
}

impl Default for ClusterArgs {
    fn default() -> Self {
        Self {
            context: None,
            namespace: DEFAULT_NAMESPACE.to_string(),
            service: DEFAULT_CONTROLLER_SERVICE.to_string(),
        }
    }
}

impl ClusterArgs {
    /// A client for the context, from the user's kubeconfig.
    pub async fn connect(&self) -> anyhow::Result<kube::Client> {
        crate::kubeconfig::client(self.context.as_deref()).await
    }

    /// The controller's status document, through its Service ([`controller_status`]).
    pub async fn controller_status(
        &self,
        client: &kube::Client,
    ) -> anyhow::Result<ControllerStatus> {
        controller_status(client, &self.namespace, &self.service).await
    }
}

/// One answer read through the API server.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub body: Vec<u8>,
    /// The body was longer than the cap and was cut there.
    pub truncated: bool,
    /// The API server's `Date` header.
    pub date: Option<SystemTime>,
    /// This machine's clock when the request was sent and when the answer came.
    pub sent: SystemTime,
    pub received: SystemTime,
}

impl Fetched {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body of a 2xx answer, else an error with the API server's message.
    pub fn ok(self) -> anyhow::Result<Self> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        bail!("HTTP {}: {}", self.status, failure_message(&self.body))
    }
}

/// The message of a Kubernetes `Status` failure, else the body's first line.
pub fn failure_message(body: &[u8]) -> String {
    if let Ok(status) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(message) = status["message"].as_str()
    {
        return message.to_string();
    }
    let text = String::from_utf8_lossy(body);
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(300)
        .collect()
}

/// GETs `path_and_query` of the API server, reading at most `cap` bytes of the body, within
/// `timeout`.
pub async fn get(
    client: &kube::Client,
    path_and_query: &str,
    cap: usize,
    timeout: Duration,
) -> anyhow::Result<Fetched> {
    let request = Request::get(path_and_query)
        .body(kube::client::Body::empty())
        .context("building the request")?;
    let sent = SystemTime::now();
    let read = async {
        let response = client.send(request).await?;
        let status = response.status().as_u16();
        let date = response
            .headers()
            .get(http::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(httpdate_parse);
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        let mut truncated = false;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if let Some(data) = frame.data_ref() {
                let room = cap - bytes.len();
                if data.len() > room {
                    bytes.extend_from_slice(&data[..room]);
                    truncated = true;
                    break;
                }
                bytes.extend_from_slice(data);
            }
        }
        Ok::<_, kube::Error>(Fetched {
            status,
            body: bytes,
            truncated,
            date,
            sent,
            received: SystemTime::now(),
        })
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result.with_context(|| format!("GET {path_and_query}")),
        Err(_) => bail!("GET {path_and_query}: no answer within {timeout:?}"),
    }
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`), as the API server sends it.
pub fn httpdate_parse(text: &str) -> Option<SystemTime> {
    // RFC 9110's IMF-fixdate is RFC 2822's form in GMT; humantime reads RFC 3339, so reorder.
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, clock, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == month)? + 1;
    humantime::parse_rfc3339(&format!("{year}-{month:02}-{day:0>2}T{clock}Z")).ok()
}

/// `/api/v1/namespaces/<ns>/services/http:<service>:<port>/proxy<path>`.
pub fn service_proxy(namespace: &str, service: &str, port: &str, path: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/services/http:{service}:{port}/proxy{path}")
}

/// `/api/v1/namespaces/<ns>/pods/<pod>:<port>/proxy<path>`.
pub fn pod_proxy(namespace: &str, pod: &str, port: u16, path: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}")
}

/// The controller's status document, through its Service (with two replicas only the leader
/// is Ready, so the Service routes to it).
pub async fn controller_status(
    client: &kube::Client,
    namespace: &str,
    service: &str,
) -> anyhow::Result<ControllerStatus> {
    let path = service_proxy(namespace, service, METRICS_PORT, "/status");
    let fetched = get(client, &path, DOCUMENT_CAP, REQUEST_TIMEOUT)
        .await?
        .ok()
        .with_context(|| {
            format!("the controller's /status through Service {namespace}/{service}")
        })?;
    parse_status(&fetched.text())
}

/// A controller's `GET /status` document.
pub fn parse_status(body: &str) -> anyhow::Result<ControllerStatus> {
    serde_json::from_str(body).context("the answer is not a controller status document")
}

/// The Trellis pods of `namespace`; of one component (`controller`, `gateway`, `dns`) or all.
pub async fn pods(
    client: &kube::Client,
    namespace: &str,
    component: Option<&str>,
) -> anyhow::Result<Vec<Pod>> {
    let selector = match component {
        Some(component) => format!("{TRELLIS_PODS},app.kubernetes.io/component={component}"),
        None => TRELLIS_PODS.to_string(),
    };
    let api: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .with_context(|| format!("listing the pods of {namespace} ({selector})"))?;
    Ok(list.items)
}

pub fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("")
}

pub fn pod_node(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
}

pub fn pod_component(pod: &Pod) -> &str {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/component"))
        .map_or("", String::as_str)
}

/// The pod's container port named `metrics`.
pub fn metrics_port(pod: &Pod) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(METRICS_PORT))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// How far a clock read remotely is from this machine's: its reading minus the middle of the
/// request, give or take half the round trip (plus a second for the API server's whole-second
/// `Date`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    pub offset_ms: i64,
    pub uncertainty_ms: u64,
}

fn unix_ms(at: SystemTime) -> i64 {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

impl ClockOffset {
    pub fn measure(remote_unix_ms: i64, sent: SystemTime, received: SystemTime) -> Self {
        let (sent, received) = (unix_ms(sent), unix_ms(received));
        let round_trip = received.saturating_sub(sent).max(0);
        Self {
            offset_ms: remote_unix_ms - (sent + round_trip / 2),
            uncertainty_ms: u64::try_from(round_trip / 2).unwrap_or(0),
        }
    }

    /// From the `Date` header of an answer (whole seconds: up to a second behind).
    pub fn of_date(fetched: &Fetched) -> Option<Self> {
        let date = unix_ms(fetched.date?);
        let mut offset = Self::measure(date + 500, fetched.sent, fetched.received);
        offset.uncertainty_ms += 500;
        Some(offset)
    }
}

/// The API server's clock, from the `Date` of a `GET /version`.
pub async fn api_server_clock(client: &kube::Client) -> anyhow::Result<ClockOffset> {
    let fetched = get(client, "/version", 64 * 1024, REQUEST_TIMEOUT)
        .await?
        .ok()?;
    ClockOffset::of_date(&fetched).context("the API server's answer has no Date header")
}

/// A gateway pod's node facts (`GET /node` through the pod proxy) and how far its clock is
/// from this machine's.
pub async fn node_report(
    client: &kube::Client,
    namespace: &str,
    pod: &Pod,
) -> anyhow::Result<(NodeReport, ClockOffset)> {
    let name = pod_name(pod);
    let port = metrics_port(pod).with_context(|| format!("pod {name} has no metrics port"))?;
    let fetched = get(
        client,
        &pod_proxy(namespace, name, port, "/node"),
        DOCUMENT_CAP,
        REQUEST_TIMEOUT,
    )
    .await?
    .ok()
    .with_context(|| format!("the node facts of gateway {name}"))?;
    let report: NodeReport = serde_json::from_slice(&fetched.body)
        .with_context(|| format!("gateway {name}'s /node is not a node report"))?;
    let clock = i64::try_from(report.clock_unix_ms).unwrap_or(i64::MAX);
    Ok((
        report,
        ClockOffset::measure(clock, fetched.sent, fetched.received),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_and_clock_offsets() {
        let at = httpdate_parse("Fri, 27 Nov 2026 03:41:07 GMT").unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms(at) as u64)
            )
            .to_string(),
            "2026-11-27T03:41:07Z"
        );
        assert_eq!(
            httpdate_parse("Fri, 7 Nov 2026 03:41:07 GMT").map(unix_ms),
            httpdate_parse("Sat, 07 Nov 2026 03:41:07 GMT").map(unix_ms)
        );
        assert!(httpdate_parse("yesterday").is_none());
        let t = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        // Sent at 10.000 s, answered at 10.200 s; the remote read 15.100 s at about 10.100 s.
        let offset = ClockOffset::measure(15_100, t(10_000), t(10_200));
        assert_eq!(
            offset,
            ClockOffset {
                offset_ms: 5_000,
                uncertainty_ms: 100
            }
        );
    }

    #[tokio::test]
    async fn a_long_answer_is_cut_and_a_silent_one_times_out() {
        use crate::test_api::{Answer, scripted};
        let (client, _log, server) = scripted(|_| {
            Answer::text(200, &"x".repeat(5000)).dated("Fri, 27 Nov 2026 03:41:07 GMT")
        });
        let fetched = get(
            &client,
            "/api/v1/namespaces/a/pods/b/log",
            1000,
            REQUEST_TIMEOUT,
        )
        .await
        .unwrap();
        assert_eq!((fetched.body.len(), fetched.truncated), (1000, true));
        assert_eq!(
            fetched.date.map(unix_ms),
            Some(1_795_750_867_000),
            "the Date header is read"
        );
        server.abort();

        // An API server that never answers.
        let (svc, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(svc, "default");
        let err = get(&client, "/version", 1000, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "GET /version: no answer within 50ms");
    }

    #[test]
    fn proxy_paths_and_failure_messages() {
        assert_eq!(
            service_proxy("trellis-system", "trellis-controller", "metrics", "/status"),
            "/api/v1/namespaces/trellis-system/services/http:trellis-controller:metrics/proxy/status"
        );
        assert_eq!(
            pod_proxy("trellis-system", "trellis-gateway-x", 9586, "/node"),
            "/api/v1/namespaces/trellis-system/pods/trellis-gateway-x:9586/proxy/node"
        );
        let status = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"no endpoints available for service \"trellis-controller\"","reason":"ServiceUnavailable","code":503}"#;
        assert_eq!(
            failure_message(status),
            "no endpoints available for service \"trellis-controller\""
        );
        assert_eq!(
            failure_message(b"404 page not found\n"),
            "404 page not found"
        );
    }
}
