//! A tiny HTTP/1.1 server for `/metrics`, `/healthz`, `/readyz` and `/status` (the gateway's
//! [`trellis_core::status::GatewayReport`] as JSON). It reads one bounded request per
//! connection, with a deadline, and closes the connection after answering.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::device::DeviceHandle;
use crate::metrics::Metrics;

/// What `GET /status` reports on: the node's name and the running device loop.
#[derive(Debug, Clone)]
pub struct StatusSource {
    pub node: String,
    pub device: DeviceHandle,
}

const MAX_REQUEST: usize = 8192;
const DEADLINE: Duration = Duration::from_secs(5);
/// The device loop ticks every 250 ms; a loop silent this long is unhealthy.
const HEALTHY_WITHIN_SECONDS: u64 = 5;

/// Connections served at once; more are closed straight away.
const MAX_CONNECTIONS: usize = 32;

/// Serves forever; each connection runs on its own task, at most `MAX_CONNECTIONS` at once.
/// Without a `status` source, `GET /status` is not found.
pub async fn serve(listener: TcpListener, metrics: Metrics, status: Option<StatusSource>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let metrics = metrics.clone();
                let status = status.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(DEADLINE, answer(stream, &metrics, status.as_ref()))
                            .await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The status line, content type and body for a request line such as `GET /metrics HTTP/1.1`.
pub fn route(request_line: &str, metrics: &Metrics) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        ("GET", "/healthz") if metrics.is_healthy(HEALTHY_WITHIN_SECONDS) => {
            ("200 OK", "text/plain", "ok\n".into())
        }
        ("GET", "/healthz") => (
            "503 Service Unavailable",
            "text/plain",
            "device loop not running\n".into(),
        ),
        // Ready once a plan is applied (restored at start, or from the source): a rolling
        // update moves on to the next node only when this one's tunnels are back.
        ("GET", "/readyz") if metrics.is_ready() && metrics.is_healthy(HEALTHY_WITHIN_SECONDS) => {
            ("200 OK", "text/plain", "ready\n".into())
        }
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "no plan applied yet\n".into(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
    }
}

/// `GET /status`: the report as pretty JSON, or 503 when the device loop has stopped.
async fn status(source: &StatusSource, metrics: &Metrics) -> (&'static str, &'static str, String) {
    match crate::status::report(&source.node, &source.device, metrics).await {
        Ok(report) => (
            "200 OK",
            "application/json",
            serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
        ),
        Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
    }
}

fn is_status_request(request_line: &str) -> bool {
    let mut parts = request_line.split_whitespace();
    parts.next() == Some("GET")
        && parts
            .next()
            .is_some_and(|path| path.split('?').next() == Some("/status"))
}

async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    source: Option<&StatusSource>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            break; // oversized headers: answer from the request line we have
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let text = String::from_utf8_lossy(&buf[..len]);
    let request_line = text.lines().next().unwrap_or("");
    let (status, content_type, body) = match source {
        Some(source) if is_status_request(request_line) => status(source, metrics).await,
        _ => route(request_line, metrics),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_metrics_health_and_errors() {
        let metrics = Metrics::new().unwrap();
        assert_eq!(
            route("GET /healthz HTTP/1.1", &metrics).0,
            "503 Service Unavailable"
        );
        metrics.beat();
        assert_eq!(route("GET /healthz HTTP/1.1", &metrics).0, "200 OK");
        assert_eq!(
            route("GET /readyz HTTP/1.1", &metrics).0,
            "503 Service Unavailable",
            "healthy is not ready before a plan is applied"
        );
        metrics.ready.set(1);
        assert_eq!(route("GET /readyz HTTP/1.1", &metrics).0, "200 OK");
        let (status, _, body) = route("GET /metrics?x=1 HTTP/1.1", &metrics);
        assert_eq!(status, "200 OK");
        assert!(body.contains("trellis_gateway_peers_up"));
        assert_eq!(route("GET /nope HTTP/1.1", &metrics).0, "404 Not Found");
        assert_eq!(
            route("POST /metrics HTTP/1.1", &metrics).0,
            "405 Method Not Allowed"
        );
        assert_eq!(route("", &metrics).0, "405 Method Not Allowed");
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let ns = crate::io::tests::loopback_netns("gw-http").await;
        let listener = ns
            .run(|| {
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                listener.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(listener)
            })
            .unwrap()
            .unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let node = crate::device::tests::start(
            &crate::device::tests::FakeNet::default(),
            "198.18.0.1:51820",
        );
        let metrics = node.metrics.clone();
        metrics.beat();
        let source = StatusSource {
            node: "node-0".into(),
            device: node.handle.clone(),
        };
        let server = tokio::spawn(serve(listener, metrics, Some(source)));
        let get = async |path: &str| {
            let stream = ns
                .run(move || {
                    let stream = std::net::TcpStream::connect(addr)?;
                    stream.set_nonblocking(true)?;
                    Ok::<_, std::io::Error>(stream)
                })
                .unwrap()
                .unwrap();
            let mut stream = TcpStream::from_std(stream).unwrap();
            stream
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        let response = get("/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("ok\n"));
        let response = get("/status").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
        let report: trellis_core::status::GatewayReport = serde_json::from_str(body).unwrap();
        assert_eq!(report.node, "node-0");
        assert!(report.peers.is_empty());
        server.abort();
    }
}
