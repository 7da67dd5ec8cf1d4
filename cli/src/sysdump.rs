//! `trellis sysdump --context A`: one `.tar.gz` with what a bug report needs, read through the
//! API server: every Trellis pod's logs (and its previous container's, after a restart), the
//! controller's `/status` (through its Service, and each replica's), every pod's metrics, each
//! gateway's `/status` and node facts with its routes (`/node`), the Trellis custom resources,
//! the namespace's events and ConfigMaps, the nodes, and `summary.txt`: what was collected and
//! what could not be. Never Secrets.
//!
//! Bounded: every read has a deadline and a size cap (a longer body is cut and says so in the
//! summary); logs are the newest `--log-lines`. Entries are streamed into the archive as they
//! are read. An item that cannot be read is recorded, not fatal; a custom resource whose CRD is
//! not installed (404) is recorded as absent.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::Args;
use k8s_openapi::api::core::v1::Pod;

use crate::cluster::{self, ClusterArgs, METRICS_PORT, pod_name, pod_proxy, service_proxy};

/// The custom resources a Trellis cluster may serve: (file name, list path).
pub const RESOURCES: [(&str, &str); 4] = [
    (
        "serviceexports",
        "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports",
    ),
    (
        "serviceimports",
        "/apis/multicluster.x-k8s.io/v1alpha1/serviceimports",
    ),
    ("peers", "/apis/trellis.dev/v1alpha1/peers"),
    (
        "clusterproperties",
        "/apis/about.k8s.io/v1alpha1/clusterproperties",
    ),
];

/// `app.kubernetes.io/name=trellis`, as a query parameter.
const TRELLIS_PODS_QUERY: &str = "labelSelector=app.kubernetes.io%2Fname%3Dtrellis";

#[derive(Args)]
pub struct SysdumpArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The archive to write (default: trellis-sysdump-<UTC time>.tar.gz here).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The newest lines of each container's log.
    #[arg(long, default_value_t = 10_000)]
    log_lines: u32,
    /// The largest item (a log, a metrics page, a list) in bytes; longer ones are cut.
    #[arg(long, default_value_t = 10 << 20)]
    max_item_bytes: usize,
    /// How long one read may take, e.g. `15s`.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
}

/// What to collect and how much.
#[derive(Debug, Clone)]
pub struct Limits {
    pub log_lines: u32,
    pub max_item_bytes: usize,
    pub request_timeout: Duration,
}

/// The archive being written: entries under one directory, and the summary's lines.
pub struct Dump<W: Write> {
    tar: tar::Builder<W>,
    directory: String,
    mtime: u64,
    collected: Vec<String>,
    failed: Vec<String>,
    /// What the cluster does not serve (a CRD not installed): not a failure.
    absent: Vec<String>,
}

impl<W: Write> Dump<W> {
    pub fn new(writer: W, directory: &str, at: SystemTime) -> Self {
        let mut tar = tar::Builder::new(writer);
        tar.mode(tar::HeaderMode::Deterministic);
        Self {
            tar,
            directory: directory.to_string(),
            mtime: at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            collected: Vec::new(),
            failed: Vec::new(),
            absent: Vec::new(),
        }
    }

    fn entry(&mut self, path: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(self.mtime);
        header.set_entry_type(tar::EntryType::Regular);
        self.tar
            .append_data(&mut header, format!("{}/{path}", self.directory), bytes)
            .with_context(|| format!("writing {path} into the archive"))
    }

    /// Adds `path`, noting it (and whether it was cut) in the summary.
    pub fn add(&mut self, path: &str, bytes: &[u8], truncated: bool) -> anyhow::Result<()> {
        self.entry(path, bytes)?;
        self.collected.push(format!(
            "{path} ({}{})",
            crate::status::human_bytes(bytes.len() as u64),
            if truncated {
                ", cut at the size cap"
            } else {
                ""
            }
        ));
        Ok(())
    }

    pub fn fail(&mut self, what: &str, why: &str) {
        self.failed.push(format!("{what}: {why}"));
    }

    pub fn absent(&mut self, what: &str, why: &str) {
        self.absent.push(format!("{what}: {why}"));
    }

    pub fn failures(&self) -> usize {
        self.failed.len()
    }

    /// Writes `summary.txt` and ends the archive; the writer back.
    pub fn finish(mut self, header: &str) -> anyhow::Result<W> {
        let mut summary = header.to_string();
        let _ = writeln!(summary, "\ncollected ({}):", self.collected.len());
        for line in &self.collected {
            let _ = writeln!(summary, "  {line}");
        }
        let _ = writeln!(summary, "\nnot collected ({}):", self.failed.len());
        for line in &self.failed {
            let _ = writeln!(summary, "  {line}");
        }
        if !self.absent.is_empty() {
            let _ = writeln!(
                summary,
                "\nnot served by this cluster ({}):",
                self.absent.len()
            );
            for line in &self.absent {
                let _ = writeln!(summary, "  {line}");
            }
        }
        self.entry("summary.txt", summary.as_bytes())?;
        self.tar.into_inner().context("ending the archive")
    }
}

/// Reads `path` into `entry`; a failure is recorded as `what`. Returns the body when read.
async fn fetch_into<W: Write>(
    dump: &mut Dump<W>,
    client: &kube::Client,
    limits: &Limits,
    path: &str,
    entry: &str,
    what: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    fetch_capped(
        dump,
        client,
        limits,
        limits.max_item_bytes,
        path,
        entry,
        what,
    )
    .await
}

/// [`fetch_into`] with a cap of its own.
async fn fetch_capped<W: Write>(
    dump: &mut Dump<W>,
    client: &kube::Client,
    limits: &Limits,
    cap: usize,
    path: &str,
    entry: &str,
    what: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    let fetched = cluster::get(client, path, cap, limits.request_timeout)
        .await
        .and_then(cluster::Fetched::ok);
    match fetched {
        Ok(fetched) => {
            dump.add(entry, &fetched.body, fetched.truncated)?;
            Ok(Some(fetched.body))
        }
        Err(error) => {
            dump.fail(what, &format!("{error:#}"));
            Ok(None)
        }
    }
}

/// The names of a pod's containers, init containers first, each with whether it restarted
/// (so its previous log exists).
fn containers(pod: &Pod) -> Vec<(String, bool)> {
    let restarted = |name: &str| {
        let status = pod.status.as_ref();
        status
            .into_iter()
            .flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            })
            .any(|c| c.name == name && c.restart_count > 0)
    };
    pod.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
        .map(|c| (c.name.clone(), restarted(&c.name)))
        .collect()
}

/// Collects everything into `dump`.
pub async fn collect<W: Write>(
    dump: &mut Dump<W>,
    client: &kube::Client,
    namespace: &str,
    service: &str,
    limits: &Limits,
) -> anyhow::Result<()> {
    let ns = format!("/api/v1/namespaces/{namespace}");
    fetch_into(
        dump,
        client,
        limits,
        "/version",
        "version.json",
        "the API server's version",
    )
    .await?;
    fetch_into(
        dump,
        client,
        limits,
        "/api/v1/nodes",
        "nodes.json",
        "the nodes",
    )
    .await?;
    fetch_into(
        dump,
        client,
        limits,
        &format!("{ns}/events"),
        "events.json",
        "the namespace's events",
    )
    .await?;
    fetch_into(
        dump,
        client,
        limits,
        &format!("{ns}/configmaps"),
        "configmaps.json",
        "the namespace's ConfigMaps",
    )
    .await?;
    fetch_into(
        dump,
        client,
        limits,
        &service_proxy(namespace, service, METRICS_PORT, "/status"),
        "controller/status.json",
        "the controller's /status through its Service",
    )
    .await?;
    for (name, path) in RESOURCES {
        match cluster::get(client, path, limits.max_item_bytes, limits.request_timeout).await {
            Ok(fetched) if fetched.status == 404 => {
                dump.absent(name, "404: its CRD is not installed")
            }
            Ok(fetched) => match fetched.ok() {
                Ok(fetched) => dump.add(
                    &format!("resources/{name}.json"),
                    &fetched.body,
                    fetched.truncated,
                )?,
                Err(error) => dump.fail(name, &format!("{error:#}")),
            },
            Err(error) => dump.fail(name, &format!("{error:#}")),
        }
    }
    // The pod list is read whole (up to the document cap): what else is collected follows it.
    let Some(list) = fetch_capped(
        dump,
        client,
        limits,
        limits.max_item_bytes.max(cluster::DOCUMENT_CAP),
        &format!("{ns}/pods?{TRELLIS_PODS_QUERY}"),
        "pods.json",
        "the Trellis pods",
    )
    .await?
    else {
        return Ok(());
    };
    let pods: Vec<Pod> = match serde_json::from_slice::<k8s_openapi::List<Pod>>(&list) {
        Ok(list) => list.items,
        Err(error) => {
            dump.fail("the Trellis pods", &format!("not a pod list: {error}"));
            return Ok(());
        }
    };
    for pod in &pods {
        collect_pod(dump, client, namespace, pod, limits).await?;
    }
    Ok(())
}

async fn collect_pod<W: Write>(
    dump: &mut Dump<W>,
    client: &kube::Client,
    namespace: &str,
    pod: &Pod,
    limits: &Limits,
) -> anyhow::Result<()> {
    let name = pod_name(pod);
    let logs = format!("/api/v1/namespaces/{namespace}/pods/{name}/log");
    for (container, restarted) in containers(pod) {
        let query = format!(
            "container={container}&timestamps=true&tailLines={}&limitBytes={}",
            limits.log_lines, limits.max_item_bytes
        );
        fetch_into(
            dump,
            client,
            limits,
            &format!("{logs}?{query}"),
            &format!("logs/{name}/{container}.log"),
            &format!("the log of {name}/{container}"),
        )
        .await?;
        if restarted {
            fetch_into(
                dump,
                client,
                limits,
                &format!("{logs}?{query}&previous=true"),
                &format!("logs/{name}/{container}.previous.log"),
                &format!("the previous log of {name}/{container}"),
            )
            .await?;
        }
    }
    let Some(port) = cluster::metrics_port(pod) else {
        dump.fail(
            &format!("the metrics of {name}"),
            "the pod has no metrics port",
        );
        return Ok(());
    };
    let proxied = |path: &str| pod_proxy(namespace, name, port, path);
    fetch_into(
        dump,
        client,
        limits,
        &proxied("/metrics"),
        &format!("metrics/{name}.txt"),
        &format!("the metrics of {name}"),
    )
    .await?;
    match cluster::pod_component(pod) {
        "controller" => {
            // A follower (HA) serves metrics only: its answer says so.
            fetch_into(
                dump,
                client,
                limits,
                &proxied("/status"),
                &format!("controller/{name}.status.json"),
                &format!("the /status of {name}"),
            )
            .await?;
        }
        "gateway" => {
            let node = cluster::pod_node(pod);
            fetch_into(
                dump,
                client,
                limits,
                &proxied("/status"),
                &format!("gateways/{node}.status.json"),
                &format!("the /status of {name} (node {node})"),
            )
            .await?;
            fetch_into(
                dump,
                client,
                limits,
                &proxied("/node"),
                &format!("nodes/{node}.json"),
                &format!("the node facts and routes of {node} (pod {name})"),
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

/// `20261127-034107`.
fn stamp(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .trim_end_matches('Z')
        .replace(['-', ':'], "")
        .replace('T', "-")
}

pub fn run(args: SysdumpArgs) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let client = args.cluster.connect().await?;
        let now = SystemTime::now();
        let directory = format!("trellis-sysdump-{}", stamp(now));
        let path = args
            .output
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{directory}.tar.gz")));
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let gzip = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(file),
            flate2::Compression::default(),
        );
        let mut dump = Dump::new(gzip, &directory, now);
        let limits = Limits {
            log_lines: args.log_lines,
            max_item_bytes: args.max_item_bytes,
            request_timeout: args.request_timeout,
        };
        let ClusterArgs {
            namespace, service, ..
        } = &args.cluster;
        eprintln!("collecting from namespace {namespace} ...");
        collect(&mut dump, &client, namespace, service, &limits).await?;
        let failures = dump.failures();
        let header = summary_header(&args, now);
        let gzip = dump.finish(&header)?;
        gzip.finish()
            .and_then(|mut w| w.flush())
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{}{}",
            path.display(),
            if failures > 0 {
                format!(" ({failures} item(s) not collected: see summary.txt in it)")
            } else {
                String::new()
            }
        );
        Ok(ExitCode::SUCCESS)
    })
}

fn summary_header(args: &SysdumpArgs, at: SystemTime) -> String {
    format!(
        "trellis sysdump {}\ncontext: {}\nnamespace: {}\ntaken: {}\n",
        env!("CARGO_PKG_VERSION"),
        args.cluster.context.as_deref().unwrap_or("(current)"),
        args.cluster.namespace,
        humantime::format_rfc3339_seconds(at)
    )
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::test_api::{Answer, scripted, testdata};

    const HEALTHY: &str = include_str!("../tests/fixtures/status-healthy.json");

    fn limits(max_item_bytes: usize) -> Limits {
        Limits {
            log_lines: 500,
            max_item_bytes,
            request_timeout: Duration::from_secs(5),
        }
    }

    /// The archive's entries: name to content.
    fn entries(archive: &[u8]) -> std::collections::BTreeMap<String, String> {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
        tar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let mut text = String::new();
                e.read_to_string(&mut text).unwrap();
                (name, text)
            })
            .collect()
    }

    async fn dump_of(
        answer: impl Fn(&str) -> Answer + Send + 'static,
        max_item_bytes: usize,
    ) -> (std::collections::BTreeMap<String, String>, Vec<String>) {
        let (client, log, server) = scripted(answer);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_750_867);
        let gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut dump = Dump::new(gzip, &format!("trellis-sysdump-{}", stamp(at)), at);
        collect(
            &mut dump,
            &client,
            "trellis-system",
            "trellis-controller",
            &limits(max_item_bytes),
        )
        .await
        .unwrap();
        let archive = dump
            .finish("trellis sysdump test\n")
            .unwrap()
            .finish()
            .unwrap();
        server.abort();
        let asked = log.lock().unwrap().clone();
        (entries(&archive), asked)
    }

    /// A kind-like cluster: every read answers but the gateway on node-1's metrics, the
    /// Peer CRD is not installed, and the controller's log is long.
    fn cluster(target: &str) -> Answer {
        let ns = "/api/v1/namespaces/trellis-system";
        let log_line = "2026-11-27T03:41:07.000000000Z 2026-11-27T03:41:07Z  INFO trellis_controller: peer c2 connected\n";
        match target {
            "/version" => Answer::json(200, &testdata("version.json")),
            "/api/v1/nodes" => Answer::json(
                200,
                &serde_json::json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "1907"}, "items": [testdata("node-kind-worker.json")]}),
            ),
            t if t == format!("{ns}/events") || t == format!("{ns}/configmaps") => Answer::json(
                200,
                &serde_json::json!({"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []}),
            ),
            t if t.ends_with("/proxy/status") && t.contains("/services/") => {
                Answer::json(200, &serde_json::from_str(HEALTHY).unwrap())
            }
            t if t.starts_with("/apis/trellis.dev/") => Answer::text(404, "404 page not found\n"),
            t if t.starts_with("/apis/multicluster.x-k8s.io/v1alpha1/serviceexports") => {
                Answer::json(
                    200,
                    &serde_json::json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExportList", "metadata": {"resourceVersion": "1907"},
                    "items": [{"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport", "metadata": {"name": "web", "namespace": "shop"}}]}),
                )
            }
            t if t.starts_with("/apis/") => Answer::json(
                200,
                &serde_json::json!({"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []}),
            ),
            t if t.starts_with(&format!("{ns}/pods?")) => {
                Answer::json(200, &testdata("pods-trellis.json"))
            }
            t if t.starts_with(&format!(
                "{ns}/pods/trellis-controller-7d9f8b6c5d-x2k4p/log?"
            )) =>
            {
                Answer::text(200, &log_line.repeat(50))
            }
            t if t.contains("/log?") => Answer::text(200, log_line),
            t if t == format!("{ns}/pods/trellis-gateway-h8q9r:9586/proxy/metrics") => {
                Answer::failure(
                    503,
                    "ServiceUnavailable",
                    "error trying to reach service: dial tcp 172.18.0.4:9586: connect: connection refused",
                )
            }
            t if t.ends_with("/proxy/metrics") => {
                Answer::text(200, "# TYPE trellis_up gauge\ntrellis_up 1\n")
            }
            t if t.ends_with("/proxy/node") && t.contains("5xk2m") => {
                Answer::json(200, &testdata("node-report-node-0.json"))
            }
            t if t.ends_with("/proxy/node") => {
                Answer::json(200, &testdata("node-report-node-1.json"))
            }
            t if t.contains("/pods/trellis-controller-") && t.ends_with("/proxy/status") => {
                Answer::json(200, &serde_json::from_str(HEALTHY).unwrap())
            }
            t if t.ends_with("/proxy/status") => Answer::json(
                200,
                &serde_json::json!({"node": "node-0", "revision": 12, "peers": [], "drops": {}}),
            ),
            other => Answer::text(404, &format!("404 page not found: {other}")),
        }
    }

    #[tokio::test]
    async fn a_cluster_is_dumped_with_what_failed_in_the_summary() {
        let (entries, asked) = dump_of(cluster, 2048).await;
        let dir = "trellis-sysdump-20261127-034107";
        let names: Vec<&str> = entries
            .keys()
            .map(|k| k.strip_prefix(&format!("{dir}/")).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "configmaps.json",
                "controller/status.json",
                "controller/trellis-controller-7d9f8b6c5d-x2k4p.status.json",
                "events.json",
                "gateways/node-0.status.json",
                "gateways/node-1.status.json",
                "logs/trellis-controller-7d9f8b6c5d-x2k4p/controller.log",
                "logs/trellis-controller-7d9f8b6c5d-x2k4p/controller.previous.log",
                "logs/trellis-dns-5f6d7c8b9a-q7w8e/dns.log",
                "logs/trellis-gateway-5xk2m/gateway.log",
                "logs/trellis-gateway-5xk2m/install-cni.log",
                "logs/trellis-gateway-h8q9r/gateway.log",
                "logs/trellis-gateway-h8q9r/install-cni.log",
                "metrics/trellis-controller-7d9f8b6c5d-x2k4p.txt",
                "metrics/trellis-dns-5f6d7c8b9a-q7w8e.txt",
                "metrics/trellis-gateway-5xk2m.txt",
                "nodes.json",
                "nodes/node-0.json",
                "nodes/node-1.json",
                "pods.json",
                "resources/clusterproperties.json",
                "resources/serviceexports.json",
                "resources/serviceimports.json",
                "summary.txt",
                "version.json",
            ]
        );
        let at = |name: &str| &entries[&format!("{dir}/{name}")];
        // The node facts carry the routes.
        let node: trellis_gateway::node_report::NodeReport =
            serde_json::from_str(at("nodes/node-0.json")).unwrap();
        assert_eq!(
            node.routes[0].to_string(),
            "0.0.0.0/0 via 172.18.0.1 dev eth0"
        );
        assert!(at("resources/serviceexports.json").contains("\"web\""));
        // The long log is cut at the cap, and the summary says so.
        assert_eq!(
            at("logs/trellis-controller-7d9f8b6c5d-x2k4p/controller.log").len(),
            2048
        );
        let summary = at("summary.txt");
        assert!(
            summary.contains("logs/trellis-controller-7d9f8b6c5d-x2k4p/controller.log (2.0 KiB, cut at the size cap)"),
            "{summary}"
        );
        assert!(summary.contains("not collected (1):"), "{summary}");
        assert!(
            summary.contains(
                "not served by this cluster (1):\n  peers: 404: its CRD is not installed"
            ),
            "{summary}"
        );
        assert!(
            summary.contains("the metrics of trellis-gateway-h8q9r: ")
                && summary.contains("connection refused"),
            "{summary}"
        );
        // Logs are asked for with their bounds; the previous log only of the restarted one.
        let log_requests: Vec<&String> = asked.iter().filter(|a| a.contains("/log?")).collect();
        assert_eq!(log_requests.len(), 7, "{log_requests:?}");
        assert!(
            log_requests
                .iter()
                .all(|a| a.contains("tailLines=500&limitBytes=2048"))
        );
        assert_eq!(
            log_requests
                .iter()
                .filter(|a| a.contains("previous=true"))
                .count(),
            1
        );
        assert!(
            !asked.iter().any(|a| a.contains("secrets")),
            "never Secrets: {asked:?}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_namespace_still_gives_an_archive_that_says_why() {
        let (entries, _) = dump_of(
            |_| {
                Answer::failure(
                    403,
                    "Forbidden",
                    "pods is forbidden: User \"dev\" cannot list resource \"pods\"",
                )
            },
            1 << 20,
        )
        .await;
        let summary = entries
            .iter()
            .find(|(k, _)| k.ends_with("/summary.txt"))
            .unwrap()
            .1;
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert!(summary.contains("collected (0):"), "{summary}");
        assert!(
            summary.contains("the Trellis pods: HTTP 403: pods is forbidden"),
            "{summary}"
        );
    }

    #[test]
    fn stamps_name_the_utc_second() {
        assert_eq!(
            stamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_750_867)),
            "20261127-034107"
        );
    }
}
