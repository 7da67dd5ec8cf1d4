//! `trellis_dns_*` metrics: one [`Metrics`] owns the registry and is passed down.

use prometheus::core::{AtomicU64, GenericCounter};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::Error;
use crate::answer::{rcode_label, type_label};
use crate::fast::FAST_TYPES;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

/// Latency buckets, from a fast-path answer (µs) to a slow upstream (s).
const BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The server's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Queries answered, by query type, response code and source (`zone` or `upstream`).
    pub queries: IntCounterVec,
    /// Time from receiving a query to sending its answer, by source.
    pub latency: HistogramVec,
    /// Records put in answer sections.
    pub records: IntCounter,
    /// Queries forwarded upstream.
    pub forwarded: IntCounter,
    /// Out-of-zone queries refused because the client may not use forwarding.
    pub forward_refused: IntCounter,
    /// Forwarded queries that got no usable upstream answer, by reason.
    pub upstream_failures: IntCounterVec,
    /// Packets dropped without an answer, by reason.
    pub dropped: IntCounterVec,
    /// UDP responses held back by the rate limiter, by action (`slip`: sent empty with TC,
    /// `drop`: not sent).
    pub rate_limited: IntCounterVec,
    /// Answers truncated (TC set) to fit UDP.
    pub truncated: IntCounter,
    /// Catalog loads, by result.
    pub catalog_loads: IntCounterVec,
    /// Services published.
    pub services: IntGauge,
    /// Precomputed fast-path answers.
    pub fast_answers: IntGauge,
    /// 1 once the first catalog is loaded (in-zone names are answered), else 0.
    pub ready: IntGauge,
    /// 1 while subscribed to the controller.
    pub controller_connected: IntGauge,
    /// When DNS's agent certificate (`dns`) and its CA (`ca`) expire.
    pub certificate_expiry: prometheus::IntGaugeVec,
    /// Updates (snapshots and deltas) applied from the controller.
    pub controller_updates: IntCounter,
    /// Controller connections ended, by reason.
    pub controller_errors: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let err = |source| Error::Metrics { source };
        let queries = IntCounterVec::new(
            Opts::new(
                "trellis_dns_queries_total",
                "DNS queries answered, by type, rcode and source.",
            ),
            &["type", "rcode", "source"],
        )
        .map_err(err)?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "trellis_dns_answer_duration_seconds",
                "Time from receiving a query to sending its answer, by source.",
            )
            .buckets(BUCKETS.to_vec()),
            &["source"],
        )
        .map_err(err)?;
        let records = IntCounter::new(
            "trellis_dns_records_served_total",
            "Resource records put in answer sections.",
        )
        .map_err(err)?;
        let forwarded = IntCounter::new(
            "trellis_dns_forwarded_queries_total",
            "Queries outside the zone relayed to an upstream resolver.",
        )
        .map_err(err)?;
        let forward_refused = IntCounter::new(
            "trellis_dns_forward_refused_total",
            "Queries outside the zone answered REFUSED: the client is not in --forward-for.",
        )
        .map_err(err)?;
        let upstream_failures = IntCounterVec::new(
            Opts::new(
                "trellis_dns_upstream_failures_total",
                "Forwarded queries answered SERVFAIL because no upstream answered, by reason.",
            ),
            &["reason"],
        )
        .map_err(err)?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "trellis_dns_dropped_packets_total",
                "Packets dropped without an answer, by reason.",
            ),
            &["reason"],
        )
        .map_err(err)?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "trellis_dns_rate_limited_total",
                "UDP responses over the per-client rate limit, by action (slip or drop).",
            ),
            &["action"],
        )
        .map_err(err)?;
        let truncated = IntCounter::new(
            "trellis_dns_truncated_answers_total",
            "UDP answers truncated (TC set) so that the client retries over TCP.",
        )
        .map_err(err)?;
        let catalog_loads = IntCounterVec::new(
            Opts::new(
                "trellis_dns_catalog_loads_total",
                "Service catalog loads, by result.",
            ),
            &["result"],
        )
        .map_err(err)?;
        let services = IntGauge::new(
            "trellis_dns_catalog_services",
            "Exported services currently published.",
        )
        .map_err(err)?;
        let fast_answers = IntGauge::new(
            "trellis_dns_precomputed_answers",
            "Answers precomputed for the fast path.",
        )
        .map_err(err)?;
        let ready = IntGauge::new(
            "trellis_dns_ready",
            "1 once the first catalog is loaded and in-zone names are answered, else 0.",
        )
        .map_err(err)?;
        let controller_connected = IntGauge::new(
            "trellis_dns_controller_connected",
            "1 while subscribed to the mesh controller, else 0.",
        )
        .map_err(err)?;
        let controller_updates = IntCounter::new(
            "trellis_dns_controller_updates_total",
            "Imports updates (snapshots and deltas) applied from the mesh controller.",
        )
        .map_err(err)?;
        let controller_errors = IntCounterVec::new(
            Opts::new(
                "trellis_dns_controller_errors_total",
                "Controller subscriptions ended, by reason.",
            ),
            &["reason"],
        )
        .map_err(err)?;
        let certificate_expiry = prometheus::IntGaugeVec::new(
            Opts::new(
                "trellis_dns_certificate_expiry_timestamp_seconds",
                "Unix time when DNS's agent certificate (dns) or its CA (ca) expires; re-read when the files change.",
            ),
            &["certificate"],
        )
        .map_err(err)?;
        for collector in [
            Box::new(queries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(records.clone()),
            Box::new(forwarded.clone()),
            Box::new(forward_refused.clone()),
            Box::new(upstream_failures.clone()),
            Box::new(dropped.clone()),
            Box::new(rate_limited.clone()),
            Box::new(truncated.clone()),
            Box::new(catalog_loads.clone()),
            Box::new(services.clone()),
            Box::new(fast_answers.clone()),
            Box::new(ready.clone()),
            Box::new(controller_connected.clone()),
            Box::new(controller_updates.clone()),
            Box::new(controller_errors.clone()),
            Box::new(certificate_expiry.clone()),
        ] {
            registry.register(collector).map_err(err)?;
        }
        Ok(Self {
            registry,
            queries,
            latency,
            records,
            forwarded,
            forward_refused,
            upstream_failures,
            dropped,
            rate_limited,
            truncated,
            catalog_loads,
            services,
            fast_answers,
            ready,
            controller_connected,
            controller_updates,
            controller_errors,
            certificate_expiry,
        })
    }

    /// Counts one answered query.
    pub fn answered(&self, qtype: Option<RecordType>, rcode: ResponseCode, source: &str) {
        self.queries
            .with_label_values(&[type_label(qtype), rcode_label(rcode), source])
            .inc();
    }

    /// Counters of the fast path, resolved once: `[type index][NOERROR]`.
    pub fn fast_counters(&self) -> Vec<GenericCounter<AtomicU64>> {
        FAST_TYPES
            .iter()
            .map(|t| {
                self.queries
                    .with_label_values(&[type_label(Some(*t)), "NOERROR", "zone"])
            })
            .collect()
    }

    /// The zone latency histogram, resolved once.
    pub fn zone_latency(&self) -> Histogram {
        self.latency.with_label_values(&["zone"])
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
