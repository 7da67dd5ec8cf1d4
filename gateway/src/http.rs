//! The gateway's `/metrics`, `/healthz` (the device loop ticks), `/readyz` (a plan is applied),
//! `/status` (its [`trellis_core::status::GatewayReport`] as JSON) and `/node` (the node's
//! facts for `trellis diagnose`: [`crate::node_report::NodeReport`]), on the one HTTP stack
//! every daemon serves with ([`trellis_http`]: connections capped in total and per client,
//! with deadlines, so metrics clients, idle or not reading, cannot starve the kubelet's probes).

use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpListener;
use trellis_http::{Limits, Reply, Routes};

use crate::device::DeviceHandle;
use crate::metrics::Metrics;
use crate::node_report::NodeSource;

/// What `GET /status` reports on: the node's name and the running device loop.
#[derive(Debug, Clone)]
pub struct StatusSource {
    pub node: String,
    pub device: DeviceHandle,
}

/// The device loop ticks every 250 ms; a loop silent this long is unhealthy.
const HEALTHY_WITHIN_SECONDS: u64 = 5;

/// The gateway's routes. Without a `status` source, `GET /status` is not found; without a
/// `node` source, `GET /node`.
#[derive(Debug, Clone)]
pub struct GatewayRoutes {
    pub metrics: Metrics,
    pub status: Option<StatusSource>,
    pub node: Option<NodeSource>,
}

impl Routes for GatewayRoutes {
    async fn get(&self, path: &str) -> Reply {
        let healthy = self.metrics.is_healthy(HEALTHY_WITHIN_SECONDS);
        match path {
            "/metrics" => Reply::metrics(self.metrics.render()),
            "/healthz" => Reply::check(healthy, "ok\n", "device loop not running\n"),
            // Ready once a plan is applied (restored at start, or from the source), and with
            // NetworkPolicy on its first policy table: a rolling update moves on to the next
            // node only when this one's tunnels and policy are back.
            "/readyz" => Reply::check(
                healthy && self.metrics.is_ready(),
                "ready\n",
                "no plan applied yet\n",
            ),
            "/status" => match &self.status {
                Some(source) => status(source, &self.metrics).await,
                None => Reply::not_found(),
            },
            "/node" => match &self.node {
                Some(source) => node(source).await,
                None => Reply::not_found(),
            },
            _ => Reply::not_found(),
        }
    }
}

/// `GET /status`: the report as pretty JSON, or 503 when the device loop has stopped.
async fn status(source: &StatusSource, metrics: &Metrics) -> Reply {
    match crate::status::report(&source.node, &source.device, metrics).await {
        Ok(report) => Reply::json(serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"),
        Err(e) => Reply::error(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// `GET /node`: the node's facts as pretty JSON; what could not be read is listed in it.
async fn node(source: &NodeSource) -> Reply {
    let raw = crate::node_report::read(source).await;
    let report = crate::node_report::report(source, raw);
    Reply::json(serde_json::to_string_pretty(&report).unwrap_or_default() + "\n")
}

/// Serves forever.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    status: Option<StatusSource>,
    node: Option<NodeSource>,
) {
    let refusals = metrics.clone();
    trellis_http::serve(
        listener,
        Arc::new(GatewayRoutes {
            metrics,
            status,
            node,
        }),
        Limits::default(),
        move |reason| refusals.http_refused(reason),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn routes_metrics_health_readiness_and_errors() {
        let metrics = Metrics::new().unwrap();
        let routes = GatewayRoutes {
            metrics: metrics.clone(),
            status: None,
            node: None,
        };
        let status = async |path: &str| routes.get(path).await.status;
        assert_eq!(status("/healthz").await, StatusCode::SERVICE_UNAVAILABLE);
        metrics.beat();
        assert_eq!(status("/healthz").await, StatusCode::OK);
        assert_eq!(
            status("/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE,
            "healthy is not ready before a plan is applied"
        );
        metrics.ready.set(1);
        assert_eq!(status("/readyz").await, StatusCode::OK);
        let reply = routes.get("/metrics").await;
        assert!(String::from_utf8_lossy(&reply.body).contains("trellis_gateway_peers_up"));
        assert_eq!(status("/status").await, StatusCode::NOT_FOUND, "no source");
        assert_eq!(status("/node").await, StatusCode::NOT_FOUND, "no source");
        assert_eq!(status("/nope").await, StatusCode::NOT_FOUND);
    }

    /// A GET of the gateway's routes from a loopback address of its own.
    async fn probe(source: &'static str, addr: std::net::SocketAddr, path: &'static str) -> u16 {
        tokio::task::spawn_blocking(move || {
            trellis_http::client::get_from(
                Some(format!("{source}:0").parse().unwrap()),
                addr,
                path,
                std::time::Duration::from_secs(2),
            )
            .map_or(0, |r| r.status)
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sixty_four_idle_connections_for_30_s_never_fail_the_health_probe() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new().unwrap();
        let beating = metrics.clone();
        let heart = tokio::spawn(async move {
            loop {
                beating.beat();
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        });
        let server = tokio::spawn(serve(listener, metrics.clone(), None, None));
        // A client on one address keeps 64 connections open and idle, reopening any the
        // gateway closes, for 30 s; the kubelet probes from another address every second.
        let started = std::time::Instant::now();
        let mut idle = Vec::new();
        let mut probes = 0;
        while started.elapsed() < std::time::Duration::from_secs(30) {
            idle.retain(|s: &tokio::net::TcpStream| s.peer_addr().is_ok());
            while idle.len() < 64 {
                idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            assert_eq!(
                probe("127.0.0.2", addr, "/healthz").await,
                200,
                "after {:?}",
                started.elapsed()
            );
            probes += 1;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        assert!(probes >= 25);
        assert!(
            metrics
                .render()
                .contains("trellis_gateway_http_refused_total{reason=\"source_pending_full\"}"),
            "the idle client's connections beyond its share were refused"
        );
        heart.abort();
        server.abort();
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        trellis_test_support::skip_unless_root!();
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
        let node_source = NodeSource {
            node: "node-0".into(),
            interface: "trellis0".into(),
            configured_mtu: 1420,
            advertised: None,
            cni_conflist: None,
        };
        let server = tokio::spawn(serve(listener, metrics, Some(source), Some(node_source)));
        let get = async |path: &'static str| {
            let ns = ns.path().to_path_buf();
            tokio::task::spawn_blocking(move || {
                trellis_netns::Netns::open_path(&ns)
                    .unwrap()
                    .run(|| trellis_http::get(addr, path, std::time::Duration::from_secs(5)))
                    .unwrap()
                    .unwrap()
            })
            .await
            .unwrap()
        };
        let health = get("/healthz").await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
        let status = get("/status").await;
        assert_eq!(status.status, 200);
        let report: trellis_core::status::GatewayReport =
            serde_json::from_str(&status.body).unwrap();
        assert_eq!(report.node, "node-0");
        assert!(report.peers.is_empty());
        // The node's facts (read where the server's tasks run; reading changes nothing).
        let node = get("/node").await;
        assert_eq!(node.status, 200, "{}", node.body);
        let facts: crate::node_report::NodeReport = serde_json::from_str(&node.body).unwrap();
        assert_eq!(facts.node, "node-0");
        assert_eq!(facts.cni_conflist.present, None, "not told where");
        server.abort();
    }
}
