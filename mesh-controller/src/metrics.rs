//! The controller's Prometheus metrics (`trellis_controller_*`), owned by one [`Metrics`] that
//! is passed down to whatever records.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    core::Collector,
};

use trellis_core::cluster::ClusterId;

use crate::Error;
use crate::mesh::Mesh;

/// The controller's listeners, as the `listener` label of refused connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Agent,
    Peering,
    Metrics,
    Flows,
}

impl Listener {
    pub fn label(self) -> &'static str {
        match self {
            Listener::Agent => "agent",
            Listener::Peering => "peering",
            Listener::Metrics => "metrics",
            Listener::Flows => "flows",
        }
    }
}

/// What became of a gateway report, as the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportResult {
    Accepted,
    Rejected,
}

impl ReportResult {
    pub fn label(self) -> &'static str {
        match self {
            ReportResult::Accepted => "accepted",
            ReportResult::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub remote_clusters_configured: IntGauge,
    pub remote_clusters_connected: IntGauge,
    pub remote_cluster_ready: IntGaugeVec,
    pub remote_cluster_refused: IntGaugeVec,
    pub refused_claims: IntGaugeVec,
    pub last_sync_timestamp: prometheus::GaugeVec,
    pub sync_lag: prometheus::GaugeVec,
    pub imported_services: IntGaugeVec,
    pub imported_endpoints: IntGaugeVec,
    pub protocol_failures: IntCounterVec,
    pub auth_failures: IntCounterVec,
    /// When each certificate in use expires: `certificate` is `peering`, `mesh_ca`, `agent`
    /// or `agent_ca`.
    pub certificate_expiry: IntGaugeVec,
    pub connections_refused: IntCounterVec,
    pub gateways_registered: IntGauge,
    pub gateway_reports: IntCounterVec,
    pub local_revision: IntGauge,
    /// NetworkPolicies of the local cluster refused (invalid): they isolate nothing.
    pub policies_refused: IntGauge,
    /// Nodes whose flow channel is connected.
    pub flow_channels: IntGauge,
    pub flow_queries: IntCounterVec,
    pub flows_relayed: IntCounterVec,
    pub peer_flow_queries_refused: IntCounterVec,
    pub flow_sources_skipped: IntCounterVec,
    pub flows_dropped: IntCounter,
    pub flow_replies_rejected: IntCounter,
    pub flows_refused: IntCounterVec,
    /// 1 while this replica leads (always, without leader election).
    pub leader: IntGauge,
    pub leadership_transitions: IntCounter,
    /// 1 while `/readyz` answers 200: following with its sources synced, or leading and
    /// serving.
    pub ready: IntGauge,
    /// Failed calls keeping the leader pod label in step (retried).
    pub leader_label_failures: IntCounter,
    pub state_save_failures: IntCounterVec,
}

fn reg<C: Collector + Clone + 'static>(r: &Registry, c: C) -> Result<C, Error> {
    r.register(Box::new(c.clone()))
        .map_err(|source| Error::Metrics {
            operation: "registering a metric",
            source,
        })?;
    Ok(c)
}

fn err(source: prometheus::Error) -> Error {
    Error::Metrics {
        operation: "creating a metric",
        source,
    }
}

impl Metrics {
    pub fn new() -> Result<Self, Error> {
        let r = Registry::new();
        let g = |name: &str, help: &str| IntGauge::new(name, help).map_err(err);
        let gv = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).map_err(err)
        };
        let fv = |name: &str, help: &str, labels: &[&str]| {
            prometheus::GaugeVec::new(Opts::new(name, help), labels).map_err(err)
        };
        let cv = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).map_err(err)
        };
        Ok(Self {
            remote_clusters_configured: reg(
                &r,
                g(
                    "trellis_controller_remote_clusters_configured",
                    "Remote clusters in the configuration.",
                )?,
            )?,
            remote_clusters_connected: reg(
                &r,
                g(
                    "trellis_controller_remote_clusters_connected",
                    "Remote clusters with an established peering session.",
                )?,
            )?,
            remote_cluster_ready: reg(
                &r,
                gv(
                    "trellis_controller_remote_cluster_ready",
                    "1 if the remote cluster's state is synced, admitted and within its lease.",
                    &["cluster"],
                )?,
            )?,
            remote_cluster_refused: reg(
                &r,
                gv(
                    "trellis_controller_remote_cluster_refused",
                    "1 if the remote cluster is refused (overlapping CIDRs or duplicate ID).",
                    &["cluster"],
                )?,
            )?,
            refused_claims: reg(
                &r,
                gv(
                    "trellis_controller_refused_claims",
                    "Claims of a peer cluster the mesh refuses now, by object kind and reason.",
                    &["peer", "kind", "reason"],
                )?,
            )?,
            last_sync_timestamp: reg(
                &r,
                fv(
                    "trellis_controller_remote_cluster_last_sync_timestamp_seconds",
                    "Unix time of the last snapshot or delta received from the remote cluster.",
                    &["cluster"],
                )?,
            )?,
            sync_lag: reg(
                &r,
                fv(
                    "trellis_controller_remote_cluster_sync_lag_seconds",
                    "Seconds since the remote cluster was last heard from (message or heartbeat).",
                    &["cluster"],
                )?,
            )?,
            imported_services: reg(
                &r,
                gv(
                    "trellis_controller_imported_services",
                    "Services imported from the remote cluster.",
                    &["cluster"],
                )?,
            )?,
            imported_endpoints: reg(
                &r,
                gv(
                    "trellis_controller_imported_endpoints",
                    "Endpoints imported from the remote cluster.",
                    &["cluster"],
                )?,
            )?,
            protocol_failures: reg(
                &r,
                cv(
                    "trellis_controller_protocol_failures_total",
                    "Peering sessions closed by a protocol error, by reason.",
                    &["reason"],
                )?,
            )?,
            auth_failures: reg(
                &r,
                cv(
                    "trellis_controller_auth_failures_total",
                    "Peers refused during TLS authentication, by reason.",
                    &["reason"],
                )?,
            )?,
            certificate_expiry: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "trellis_controller_certificate_expiry_timestamp_seconds",
                        "Unix time when a certificate in use expires, by certificate (peering, \
                         mesh_ca, agent, agent_ca); re-read when its file changes.",
                    ),
                    &["certificate"],
                )
                .map_err(err)?,
            )?,
            connections_refused: reg(
                &r,
                cv(
                    "trellis_controller_connections_refused_total",
                    "Connections closed at once by a listener (agent, peering), by reason: its \
                     slots for unproven clients full, the source holding its share of them, or \
                     its subscribers full.",
                    &["listener", "reason"],
                )?,
            )?,
            gateways_registered: reg(
                &r,
                g(
                    "trellis_controller_gateways_registered",
                    "Node gateways registered with this controller.",
                )?,
            )?,
            gateway_reports: reg(
                &r,
                cv(
                    "trellis_controller_gateway_reports_total",
                    "Status reports from node gateways, by result (accepted, rejected: \
                     unparsable, out of bounds or for another node).",
                    &["result"],
                )?,
            )?,
            local_revision: reg(
                &r,
                g(
                    "trellis_controller_local_revision",
                    "Revision of the local cluster state sent to peers.",
                )?,
            )?,
            policies_refused: reg(
                &r,
                g(
                    "trellis_controller_policies_refused",
                    "NetworkPolicies of this cluster refused as invalid (they isolate nothing).",
                )?,
            )?,
            flow_channels: reg(
                &r,
                g(
                    "trellis_controller_flow_channels",
                    "Nodes whose flow channel is connected to this controller.",
                )?,
            )?,
            flow_queries: reg(
                &r,
                cv(
                    "trellis_controller_flow_queries_total",
                    "Flow queries, by who asked (http: a reader of the flows listener, peer: a \
                     peer cluster's controller) and result (ok, bad_request, refused).",
                    &["source", "result"],
                )?,
            )?,
            flows_relayed: reg(
                &r,
                cv(
                    "trellis_controller_flows_relayed_total",
                    "Flows written to readers, by reader (http, peer).",
                    &["reader"],
                )?,
            )?,
            peer_flow_queries_refused: reg(
                &r,
                cv(
                    "trellis_controller_peer_flow_queries_refused_total",
                    "Flow queries of peer clusters refused, by reason (not_admitted, too_many, \
                     bad_request, disabled).",
                    &["reason"],
                )?,
            )?,
            flow_sources_skipped: reg(
                &r,
                cv(
                    "trellis_controller_flow_sources_skipped_total",
                    "Nodes or peers a flow query went without, by reason (timeout: no answer in \
                     time, busy: too many queries on it, error: it refused or failed, \
                     not_connected: a peer asked for is not connected).",
                    &["reason"],
                )?,
            )?,
            flows_dropped: reg(
                &r,
                IntCounter::new(
                    "trellis_controller_flows_dropped_total",
                    "Flows a node or peer sent for a query whose reader was too slow to take \
                     them (its queue was full).",
                )
                .map_err(err)?,
            )?,
            flow_replies_rejected: reg(
                &r,
                IntCounter::new(
                    "trellis_controller_flow_replies_rejected_total",
                    "Flow reply frames from nodes or peers that did not parse (skipped).",
                )
                .map_err(err)?,
            )?,
            flows_refused: reg(
                &r,
                cv(
                    "trellis_controller_flows_refused_total",
                    "Flows a node or peer sent that it cannot speak for, by reason (other_node: \
                     a node's channel naming another node, relabelled as the channel's node's; \
                     the others dropped: peer_other_node: a \
                     peer's flow not seen on that peer's nodes; peer_not_ours: a peer's flow \
                     with no end a pod of this cluster; peer_future: a peer's flow dated ahead).",
                    &["reason"],
                )?,
            )?,
            leader: reg(
                &r,
                g(
                    "trellis_controller_leader",
                    "1 while this replica leads (binds the listeners, writes to the API, \
                     streams to gateways and DNS), 0 while it follows.",
                )?,
            )?,
            leadership_transitions: reg(
                &r,
                IntCounter::new(
                    "trellis_controller_leadership_transitions_total",
                    "Changes of the lease holder this replica saw (another replica taking \
                     over, or this one).",
                )
                .map_err(err)?,
            )?,
            ready: reg(
                &r,
                g(
                    "trellis_controller_ready",
                    "1 while this replica is ready (/readyz 200): following with its sources \
                     synced, so it can take over, or leading and serving.",
                )?,
            )?,
            leader_label_failures: reg(
                &r,
                IntCounter::new(
                    "trellis_controller_leader_label_failures_total",
                    "Failed API calls setting or removing the trellis.dev/controller-leader pod \
                     label the leader-routed Services select (retried every retry period).",
                )
                .map_err(err)?,
            )?,
            state_save_failures: reg(
                &r,
                cv(
                    "trellis_controller_state_save_failures_total",
                    "Saves of the last state that failed, by reason (too_large: over the \
                     ConfigMap limit, the previous state kept; error: the file or API failed).",
                    &["reason"],
                )?,
            )?,
            registry: r,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// `reason` is a typed error's stable `kind()` label, never an error's text.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    /// `reason` is a typed refusal's stable `label()`, never an error's text.
    pub fn connection_refused(&self, listener: Listener, reason: &'static str) {
        self.connections_refused
            .with_label_values(&[listener.label(), reason])
            .inc();
    }

    pub fn gateway_report(&self, result: ReportResult) {
        self.gateway_reports
            .with_label_values(&[result.label()])
            .inc();
    }

    /// `reason` is a typed error's stable `kind()` label, never an error's text.
    pub fn protocol_failure(&self, reason: &'static str) {
        self.protocol_failures.with_label_values(&[reason]).inc();
    }

    /// Sets the refused-claims gauges of `peer` from its counts, zeroing the labels it no
    /// longer has (the label set is bounded: object kinds × reasons per configured peer).
    fn record_refused_claims(
        &self,
        peer: &ClusterId,
        counts: &std::collections::BTreeMap<(&'static str, &'static str), usize>,
    ) {
        use trellis_core::claims::{OBJECT_KINDS, REASON_LABELS};
        for kind in OBJECT_KINDS {
            for reason in REASON_LABELS {
                let n = counts.get(&(*kind, *reason)).copied().unwrap_or(0);
                let gauge = self.refused_claims.get_metric_with_label_values(&[
                    peer.as_str(),
                    kind,
                    reason,
                ]);
                if n > 0 {
                    if let Ok(g) = gauge {
                        g.set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                } else {
                    let _ = self
                        .refused_claims
                        .remove_label_values(&[peer.as_str(), kind, reason]);
                }
            }
        }
    }

    /// Records each configured remote cluster's readiness, sync and imports as `mesh` holds
    /// them, and how many are connected.
    pub fn record_remotes(&self, configured: &[ClusterId], mesh: &Mesh) {
        let mut connected = 0;
        for id in configured {
            let l = [id.as_str()];
            match mesh.get(id) {
                Some(r) => {
                    if r.connected {
                        connected += 1;
                    }
                    let ready = r.connected && !r.whole;
                    self.remote_cluster_ready
                        .with_label_values(&l)
                        .set(i64::from(ready));
                    self.remote_cluster_refused
                        .with_label_values(&l)
                        .set(i64::from(r.whole));
                    self.record_refused_claims(id, &r.counts);
                    let ts = r
                        .last_sync
                        .duration_since(std::time::SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0);
                    self.last_sync_timestamp.with_label_values(&l).set(ts);
                    self.sync_lag
                        .with_label_values(&l)
                        .set(r.last_heard.elapsed().as_secs_f64());
                    let (svcs, eps) = if r.whole {
                        (0, 0)
                    } else {
                        (r.admitted.services.len(), r.admitted.endpoint_count())
                    };
                    self.imported_services
                        .with_label_values(&l)
                        .set(i64::try_from(svcs).unwrap_or(i64::MAX));
                    self.imported_endpoints
                        .with_label_values(&l)
                        .set(i64::try_from(eps).unwrap_or(i64::MAX));
                }
                None => {
                    self.remote_cluster_ready.with_label_values(&l).set(0);
                    self.remote_cluster_refused.with_label_values(&l).set(0);
                    self.record_refused_claims(id, &Default::default());
                    self.imported_services.with_label_values(&l).set(0);
                    self.imported_endpoints.with_label_values(&l).set(0);
                }
            }
        }
        self.remote_clusters_connected.set(connected);
    }
}

/// `/status` documents are built at most this often: any number of clients asking at once
/// take the hub's lock once per interval, not once each.
const STATUS_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(250);

/// The controller's `/status` document, rebuilt only when older than [`STATUS_MAX_AGE`].
struct StatusCache {
    build: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
    cached: std::sync::Mutex<Option<(std::time::Instant, bytes::Bytes)>>,
}

impl StatusCache {
    fn get(&self) -> bytes::Bytes {
        // Held while building, so concurrent requests wait for one build instead of each
        // making its own.
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*cached {
            Some((at, document)) if at.elapsed() < STATUS_MAX_AGE => document.clone(),
            _ => {
                let document = bytes::Bytes::from((self.build)());
                *cached = Some((std::time::Instant::now(), document.clone()));
                document
            }
        }
    }
}

/// `/metrics`, `/healthz` and `/status` of the controller.
struct ControllerRoutes {
    metrics: Metrics,
    status: StatusCache,
}

impl trellis_http::Routes for ControllerRoutes {
    async fn get(&self, path: &str) -> trellis_http::Reply {
        match path {
            "/metrics" => trellis_http::Reply::metrics(self.metrics.render()),
            "/status" => trellis_http::Reply::json(self.status.get()),
            "/healthz" => trellis_http::Reply::text("ok\n"),
            // The process is healthy: a follower ready to take over counts. Traffic reaches
            // the leader by its pod label (leader::pod_label), not by readiness, so rollouts
            // and drains see every healthy replica available.
            "/readyz" => trellis_http::Reply::check(
                self.metrics.ready.get() == 1,
                "ok\n",
                "not ready: the sources have not synced yet\n",
            ),
            // Which replica leads, for the lab and scripts (Patroni's `/leader`).
            "/leader" => trellis_http::Reply::check(
                self.metrics.leader.get() == 1,
                "leading\n",
                "following: another replica leads\n",
            ),
            _ => trellis_http::Reply::not_found(),
        }
    }
}

/// Serves `GET /metrics`, `/healthz`, `/readyz` (200 while ready: following with its sources
/// synced, or leading and serving), `/leader` (200 while leading, 503 while following) and
/// `/status` (the JSON `status` returns, cached for
/// [`STATUS_MAX_AGE`]) on `listener` until cancelled, on the daemons' one HTTP stack
/// (connections capped in total and per client, with deadlines).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    status: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) {
    let refusals = metrics.clone();
    let routes = ControllerRoutes {
        metrics,
        status: StatusCache {
            build: status,
            cached: std::sync::Mutex::new(None),
        },
    };
    trellis_http::serve(
        listener,
        std::sync::Arc::new(routes),
        trellis_http::Limits::default(),
        move |reason| refusals.connection_refused(Listener::Metrics, reason),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_trellis_controller_metrics() {
        let m = Metrics::new().unwrap();
        m.auth_failure("unknown_ca");
        m.gateway_report(ReportResult::Rejected);
        m.remote_cluster_ready.with_label_values(&["east"]).set(1);
        let text = m.render();
        assert!(text.contains("trellis_controller_auth_failures_total{reason=\"unknown_ca\"} 1"));
        assert!(text.contains("trellis_controller_remote_cluster_ready{cluster=\"east\"} 1"));
        assert!(text.contains("trellis_controller_gateways_registered 0"));
        assert!(text.contains("trellis_controller_gateway_reports_total{result=\"rejected\"} 1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_metrics_and_builds_status_once_for_many_clients() {
        let m = Metrics::new().unwrap();
        let (leader, ready) = (m.leader.clone(), m.ready.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let builds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = builds.clone();
        let task = tokio::spawn(serve(
            l,
            m,
            std::sync::Arc::new(move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                "{}".to_string()
            }),
        ));
        let get = move |path: &'static str| {
            tokio::task::spawn_blocking(move || {
                trellis_http::get(addr, path, std::time::Duration::from_secs(5)).unwrap()
            })
        };
        let starting = get("/readyz").await.unwrap();
        assert_eq!(starting.status, 503, "{}", starting.body);
        ready.set(1);
        assert_eq!(
            get("/readyz").await.unwrap().status,
            200,
            "a synced follower"
        );
        let following = get("/leader").await.unwrap();
        assert_eq!(following.status, 503, "{}", following.body);
        leader.set(1);
        assert_eq!(get("/leader").await.unwrap().status, 200);
        assert_eq!(get("/healthz").await.unwrap().status, 200);
        let metrics = get("/metrics").await.unwrap();
        assert_eq!(metrics.status, 200);
        assert!(
            metrics
                .body
                .contains("trellis_controller_remote_clusters_configured 0")
        );
        let started = std::time::Instant::now();
        let asks: Vec<_> = (0..8).map(|_| get("/status")).collect();
        for ask in asks {
            assert_eq!(ask.await.unwrap().body, "{}");
        }
        let took = started.elapsed();
        let built = builds.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            built <= 1 + (took.as_millis() / STATUS_MAX_AGE.as_millis()) as usize,
            "{built} builds in {took:?}"
        );
        task.abort();
    }
}
