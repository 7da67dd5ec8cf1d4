//! `trellis status`: a controller's `GET /status` as tables (or the JSON document itself),
//! judged healthy or not. Rendering is pure (status document in, text out). The document is
//! read through the API server of a kubeconfig context (the controller's Service, by the
//! service proxy: no port-forward), or with `--controller` from an address (a lab, a
//! port-forward) by a small blocking HTTP/1.1 GET. `--wait` polls until healthy.
//!
//! Exit codes: 0 healthy; 1 something is unhealthy (a peer cluster not connected, synced or
//! admitted, a node without a connected, reporting gateway, a stale or missing handshake —
//! see [`trellis_core::status::problems`]); 2 the controller could not be reached or did not
//! answer with a status document. Imports in conflict are a warning, not a problem: the
//! oldest export wins and the service works.

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use trellis_core::cluster::ServiceKind;
use trellis_core::status::{ControllerPolicyStatus, ControllerStatus, GatewayReport, problems};

use crate::cluster::ClusterArgs;
pub use crate::cluster::parse_status;
use crate::table::Table;

/// How long a status request may take, connecting and reading.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `--wait` asks.
pub const WAIT_POLL: Duration = Duration::from_secs(2);

pub const EXIT_UNHEALTHY: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables for people.
    Table,
    /// The status document, for scripts.
    Json,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The controller's metrics address, e.g. `http://127.0.0.1:9464` (a lab, or `kubectl
    /// port-forward`). Without it the controller is read through the API server of the
    /// kubeconfig context.
    #[arg(long, conflicts_with_all = ["context", "namespace", "service"])]
    controller: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Wait until the mesh is healthy (or --timeout), printing what it waits for.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, e.g. `5m`, `90s`.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, requires = "wait")]
    timeout: Duration,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// Where the status document comes from.
pub enum Source {
    /// A metrics address (`--controller`).
    Direct(String),
    /// The controller's Service, through the API server.
    Cluster {
        client: kube::Client,
        cluster: ClusterArgs,
    },
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Self::Direct(url) => format!("controller {url}"),
            Self::Cluster { cluster, .. } => format!(
                "controller Service {}/{}",
                cluster.namespace, cluster.service
            ),
        }
    }

    pub async fn fetch(&self) -> anyhow::Result<ControllerStatus> {
        match self {
            Self::Direct(url) => {
                let url = url.clone();
                tokio::task::spawn_blocking(move || {
                    let (host, base) = parse_controller_url(&url)?;
                    let addr = resolve(&host)?;
                    let body = http_get(addr, &host, &format!("{base}/status"), FETCH_TIMEOUT)?;
                    parse_status(&body)
                })
                .await
                .context("the status request's thread")?
            }
            Self::Cluster { client, cluster } => cluster.controller_status(client).await,
        }
    }
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    crate::block_on(async {
        let source = match &args.controller {
            Some(url) => Source::Direct(url.clone()),
            None => match args.cluster.connect().await {
                Ok(client) => Source::Cluster {
                    client,
                    cluster: args.cluster.clone(),
                },
                Err(error) => {
                    eprintln!("error: {error:#}");
                    return Ok(ExitCode::from(EXIT_UNREACHABLE));
                }
            },
        };
        let last = if args.wait {
            wait_until_healthy(&source, args.timeout, WAIT_POLL, |line| eprintln!("{line}")).await
        } else {
            source.fetch().await
        };
        finish(&source, last, args.output)
    })
}

/// What status judges unhealthy: the controller's problems and refused NetworkPolicies.
pub fn judge(status: &ControllerStatus) -> Vec<String> {
    let mut found = problems(status);
    found.extend(policy_problems(status));
    found
}

/// Asks every `poll` until the status is healthy or `timeout` has passed; the last answer.
/// Each wait is announced through `progress` (`waiting (12s): ...`).
pub async fn wait_until_healthy(
    source: &Source,
    timeout: Duration,
    poll: Duration,
    mut progress: impl FnMut(String),
) -> anyhow::Result<ControllerStatus> {
    let started = tokio::time::Instant::now();
    loop {
        let last = source.fetch().await;
        let why = match &last {
            Ok(status) => {
                let found = judge(status);
                if found.is_empty() {
                    return last;
                }
                let more = if found.len() > 1 {
                    format!(" (and {} more)", found.len() - 1)
                } else {
                    String::new()
                };
                format!("{}{more}", found[0])
            }
            Err(error) => format!("{} unreachable: {error:#}", source.describe()),
        };
        if started.elapsed() + poll > timeout {
            progress(format!(
                "gave up after {}: {why}",
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
            ));
            return last;
        }
        progress(format!(
            "waiting ({}): {why}",
            humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
        ));
        tokio::time::sleep(poll).await;
    }
}

/// Prints the status (or why there is none) and says how it went.
fn finish(
    source: &Source,
    last: anyhow::Result<ControllerStatus>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let status = match last {
        Ok(status) => status,
        Err(error) => {
            eprintln!("error: {}: {error:#}", source.describe());
            return Ok(ExitCode::from(EXIT_UNREACHABLE));
        }
    };
    let problems = judge(&status);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Table => {
            print!("{}", render(&status));
            print!("{}", render_problems(&problems));
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNHEALTHY)
    })
}

/// `http://HOST:PORT[/prefix]` (or `HOST:PORT`) into `HOST:PORT` and the path prefix.
pub fn parse_controller_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => bail!("{scheme}:// is not supported; the metrics port speaks http"),
        None => url,
    };
    let (host, path) = match rest.find('/') {
        Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if host.is_empty() {
        bail!("{url:?} names no host");
    }
    let host = if host
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        && !host.ends_with(']')
    {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_string()))
}

fn resolve(host: &str) -> anyhow::Result<SocketAddr> {
    host.to_socket_addrs()
        .with_context(|| format!("resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))
}

/// A blocking GET of `path`; the body of a 200 answer.
pub fn http_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let get = trellis_http::Get {
        host: Some(host),
        ..trellis_http::Get::new(addr, path, timeout)
    };
    Ok(get.send()?.ok_body()?)
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.into()
}

fn on_off(value: bool) -> &'static str {
    if value { "on" } else { "off" }
}

/// `5s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_age(seconds: u64) -> String {
    // Two units read at a glance; seconds do not matter once it is hours.
    let unit = match seconds {
        s if s < 3600 => 1,
        s if s < 86_400 => 60,
        _ => 3600,
    };
    humantime::format_duration(Duration::from_secs(seconds - seconds % unit)).to_string()
}

/// Bytes in binary units: `512 B`, `1.2 KiB`, `3.4 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Unix seconds as ISO 8601 UTC (`2026-11-27T03:41:07Z`).
pub fn format_utc(unix: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn drops(report: &GatewayReport) -> String {
    let total = report.total_drops();
    if total == 0 {
        return "0".into();
    }
    let mut reasons: Vec<(&String, &u64)> = report.drops.iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let named: Vec<String> = reasons
        .iter()
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    format!("{total} ({})", named.join(", "))
}

/// One controller's status as tables: the cluster, its peer clusters, its nodes' gateways and
/// their tunnel peers.
pub fn render(status: &ControllerStatus) -> String {
    let mut out = String::new();
    let connected = status.nodes.iter().filter(|n| n.connected).count();
    let _ = writeln!(
        out,
        "cluster {}{}  revision {} (mesh view {})  node encryption {}  source {}  gateways {connected}/{} connected",
        status.cluster,
        if status.name != status.cluster.as_str() {
            format!(" ({})", status.name)
        } else {
            String::new()
        },
        status.revision,
        status.mesh_revision,
        on_off(status.node_encryption),
        if status.source_synced {
            "synced"
        } else {
            "not synced"
        },
        status.nodes.len(),
    );

    out.push('\n');
    if status.remotes.is_empty() {
        out.push_str("  no peer clusters configured\n");
    } else {
        let mut peers = Table::new(&[
            "PEER CLUSTER",
            "CONNECTED",
            "READY",
            "REVISION",
            "LAST SYNC",
            "LAG",
            "IMPORTED SERVICES",
            "ENDPOINTS",
            "NOTE",
        ]);
        for remote in &status.remotes {
            let last_sync = match (remote.last_sync_unix, remote.last_sync_age_seconds) {
                (Some(at), Some(age)) => format!("{} ({} ago)", format_utc(at), human_age(age)),
                (Some(at), None) => format_utc(at),
                _ => "never".into(),
            };
            let note = if !remote.refused.is_empty() {
                format!("refused: {}", remote.refused.join("; "))
            } else if remote.refused_claims_total > 0 {
                format!(
                    "{} claim(s) refused (below); the rest is imported",
                    remote.refused_claims_total
                )
            } else if remote.session && !remote.synced {
                "waiting for its snapshot".into()
            } else if !remote.session && remote.synced {
                "disconnected; its state is kept until its lease runs out".into()
            } else {
                String::new()
            };
            // A refused cluster's services and endpoints are not imported.
            let (services, endpoints) = if remote.refused.is_empty() {
                (remote.services, remote.endpoints)
            } else {
                (0, 0)
            };
            peers.row(vec![
                remote.cluster.to_string(),
                yes_no(remote.session),
                yes_no(remote.ready),
                remote.revision.map_or("-".into(), |r| r.to_string()),
                last_sync,
                remote.lag_seconds.map_or("-".into(), human_age),
                services.to_string(),
                endpoints.to_string(),
                note,
            ]);
        }
        out.push_str(&peers.render("  "));
        let refused: Vec<&String> = status
            .remotes
            .iter()
            .flat_map(|r| &r.refused_claims)
            .collect();
        if !refused.is_empty() {
            out.push_str("\nRefused claims (not routed, not imported):\n");
            for line in refused {
                let _ = writeln!(out, "  {line}");
            }
            for remote in &status.remotes {
                let more = remote
                    .refused_claims_total
                    .saturating_sub(remote.refused_claims.len());
                if more > 0 {
                    let _ = writeln!(
                        out,
                        "  cluster {}: and {more} more (see trellis_controller_refused_claims)",
                        remote.cluster
                    );
                }
            }
        }
    }

    out.push('\n');
    let mut nodes = Table::new(&[
        "NODE",
        "GATEWAY",
        "ENDPOINT",
        "REPORT",
        "ENCRYPTION",
        "PLAN",
        "DROPS",
    ]);
    let mut tunnels = Table::new(&[
        "NODE",
        "TUNNEL PEER",
        "ENDPOINT",
        "HANDSHAKE",
        "HANDSHAKES",
        "RX",
        "TX",
    ]);
    for node in &status.nodes {
        let gateway = match (node.registered, node.connected) {
            (_, true) => "connected",
            (true, false) => "disconnected",
            (false, false) => "not registered",
        };
        let (encryption, revision, dropped) = match &node.report {
            Some(report) => (
                report
                    .node_encryption
                    .map_or("-".into(), |on| on_off(on).to_string()),
                report.revision.to_string(),
                drops(report),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        nodes.row(vec![
            node.node.clone(),
            gateway.into(),
            node.endpoint.map_or("-".into(), |e| e.to_string()),
            node.report_age_seconds
                .map_or("none".into(), |age| format!("{} ago", human_age(age))),
            encryption,
            revision,
            dropped,
        ]);
        for peer in node.report.iter().flat_map(|r| &r.peers) {
            tunnels.row(vec![
                node.node.clone(),
                peer.name(),
                peer.endpoint.map_or("-".into(), |e| e.to_string()),
                peer.last_handshake_age_seconds
                    .map_or("never".into(), |age| format!("{} ago", human_age(age))),
                peer.handshakes.to_string(),
                human_bytes(peer.rx_bytes),
                human_bytes(peer.tx_bytes),
            ]);
        }
    }
    if status.nodes.is_empty() {
        out.push_str("  no nodes\n");
    } else {
        out.push_str(&nodes.render("  "));
    }
    if !tunnels.is_empty() {
        out.push('\n');
        out.push_str(&tunnels.render("  "));
    }
    if let Some(policy) = &status.policy {
        out.push_str(&render_policy(status, policy));
    }
    if !status.imports.is_empty() {
        out.push_str(&render_imports(status));
    }
    out
}

/// The Imports section: each clusterset service with its type, this cluster's VIPs, the
/// exporting clusters with their ready/total endpoints, and the conflicts between their
/// exports (a warning: the oldest export wins and the service works, so status stays
/// healthy).
fn render_imports(status: &ControllerStatus) -> String {
    let mut out = String::new();
    let conflicted = status
        .imports
        .iter()
        .filter(|i| !i.conflicts.is_empty())
        .count();
    let total = status.imports_total.max(status.imports.len());
    let _ = writeln!(
        out,
        "
Imports: {total} clusterset service(s){}",
        if conflicted > 0 {
            format!(", {conflicted} with conflicts")
        } else {
            String::new()
        }
    );
    let mut table = Table::new(&[
        "SERVICE",
        "TYPE",
        "VIP",
        "CLUSTERS",
        "ENDPOINTS",
        "CONFLICTS",
    ]);
    for import in &status.imports {
        let vip = match import.kind {
            ServiceKind::Headless => "-".to_string(),
            ServiceKind::ClusterSetIP if import.vips.is_empty() => "pending".into(),
            ServiceKind::ClusterSetIP => import
                .vips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        let clusters = import
            .clusters
            .iter()
            .map(|c| format!("{} {}/{}", c.cluster, c.ready_endpoints, c.endpoints))
            .collect::<Vec<_>>()
            .join(", ");
        let ready: usize = import.clusters.iter().map(|c| c.ready_endpoints).sum();
        let endpoints: usize = import.clusters.iter().map(|c| c.endpoints).sum();
        let conflicts = if import.conflicts.is_empty() {
            "-".to_string()
        } else {
            format!("{} ({} wins)", import.conflicts.join(","), import.oldest)
        };
        table.row(vec![
            format!("{}/{}", import.namespace, import.name),
            match import.kind {
                ServiceKind::ClusterSetIP => "ClusterSetIP",
                ServiceKind::Headless => "Headless",
            }
            .to_string(),
            vip,
            clusters,
            format!("{ready}/{endpoints} ready"),
            conflicts,
        ]);
    }
    out.push('\n');
    out.push_str(&table.render("  "));
    let more = total.saturating_sub(status.imports.len());
    if more > 0 {
        let _ = writeln!(
            out,
            "  and {more} more (a status document lists the first {})",
            trellis_core::status::MAX_STATUS_IMPORTS
        );
    }
    if conflicted > 0 {
        out.push_str(
            "\nwarning: exports in conflict disagree on what the clusterset service is; the \
             oldest export's definition is used (each export's Conflict condition says \
             why)\n",
        );
    }
    out
}

/// The NetworkPolicy section: what nodes are sent (its digest, and how many nodes report
/// enforcing exactly that), each policy with its types and the pods it selects, and the
/// refused policies.
fn render_policy(status: &ControllerStatus, policy: &ControllerPolicyStatus) -> String {
    let mut out = String::new();
    let enforcing = status
        .nodes
        .iter()
        .filter(|n| {
            n.report
                .as_ref()
                .and_then(|r| r.policy.as_ref())
                .is_some_and(|p| p.digest == policy.digest)
        })
        .count();
    let _ = writeln!(
        out,
        "\nNetworkPolicy: {} policies, {} identities, {} pod endpoints (mesh); inputs {}, \
         enforced by {enforcing}/{} nodes",
        policy.policies.len(),
        policy.identities,
        policy.endpoints,
        policy.digest.get(..12).unwrap_or(&policy.digest),
        status.nodes.len(),
    );
    if !policy.policies.is_empty() {
        let mut table = Table::new(&["NAMESPACE", "POLICY", "TYPES", "SELECTED PODS"]);
        for p in &policy.policies {
            table.row(vec![
                p.namespace.clone(),
                p.name.clone(),
                p.types.join(","),
                p.selected_pods.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&table.render("  "));
    }
    if !policy.refused.is_empty() {
        out.push_str("\nRefused policies (they isolate nothing):\n");
        for line in &policy.refused {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// Refused NetworkPolicies are problems: the pods they select are less isolated than their
/// owners asked for.
pub fn policy_problems(status: &ControllerStatus) -> Vec<String> {
    status
        .policy
        .iter()
        .flat_map(|p| &p.refused)
        .cloned()
        .collect()
}

/// `healthy`, or the problems, one per line.
pub fn render_problems(problems: &[String]) -> String {
    if problems.is_empty() {
        return "\nhealthy\n".into();
    }
    let mut out = format!("\nunhealthy ({}):\n", problems.len());
    for problem in problems {
        let _ = writeln!(out, "  {problem}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTHY: &str = include_str!("../tests/fixtures/status-healthy.json");
    const BROKEN: &str = include_str!("../tests/fixtures/status-broken.json");

    #[test]
    fn a_healthy_status_renders_as_aligned_tables() {
        let status = parse_status(HEALTHY).unwrap();
        let text = render(&status);
        let expected = include_str!("../tests/fixtures/status-healthy.txt");
        assert_eq!(text, expected, "\n{text}");
        assert!(problems(&status).is_empty());
        assert_eq!(render_problems(&[]), "\nhealthy\n");
    }

    #[test]
    fn an_unhealthy_status_names_what_is_wrong() {
        let status = parse_status(BROKEN).unwrap();
        let text = render(&status);
        let expected = include_str!("../tests/fixtures/status-broken.txt");
        assert_eq!(text, expected, "\n{text}");
        let problems = problems(&status);
        let listed = render_problems(&problems);
        assert!(listed.starts_with("\nunhealthy (5):\n"), "{listed}");
        assert!(
            listed.contains("c1: peer cluster c3 is refused: pod CIDR 10.1.0.0/16 of c1 overlaps 10.1.0.0/16 of c3"),
            "{listed}"
        );
        assert!(
            listed.contains("c1: peer cluster c2 is not connected"),
            "{listed}"
        );
        assert!(
            listed.contains("c1/node-0: stale handshake with c2/node-0 (200s ago)"),
            "{listed}"
        );
        assert!(
            listed.contains("c1/node-1: the gateway is not connected"),
            "{listed}"
        );
        assert!(
            listed.contains("c1/node-1: no report from the gateway"),
            "{listed}"
        );
        assert!(
            !listed.contains("c1/node-1 yet"),
            "a peer inside the cluster may be idle"
        );
    }

    #[test]
    fn policies_are_tabled_and_refused_ones_judged() {
        use trellis_core::status::{PolicyReport, PolicyStatus};
        let mut status = parse_status(HEALTHY).unwrap();
        assert!(!render(&status).contains("NetworkPolicy"), "none enforced");
        status.policy = Some(ControllerPolicyStatus {
            digest: "0123456789abcdef".repeat(4),
            identities: 3,
            endpoints: 9,
            policies: vec![PolicyStatus {
                namespace: "x".into(),
                name: "allow-b".into(),
                types: vec!["Ingress".into(), "Egress".into()],
                selected_pods: 2,
            }],
            refused: vec![],
        });
        status.nodes[0].report.as_mut().unwrap().policy = Some(PolicyReport {
            digest: "0123456789abcdef".repeat(4),
            ..Default::default()
        });
        let text = render(&status);
        assert!(
            text.contains("NetworkPolicy: 1 policies, 3 identities, 9 pod endpoints (mesh); inputs 0123456789ab, enforced by 1/"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.contains("allow-b"))
            .expect("a policy row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["x", "allow-b", "Ingress,Egress", "2"]);
        assert!(policy_problems(&status).is_empty());

        let refusal = "NetworkPolicy x/bad refused (its pods are not isolated by it): \
                       spec.policyTypes: \"Sideways\" is neither Ingress nor Egress";
        status.policy.as_mut().unwrap().refused = vec![refusal.into()];
        let text = render(&status);
        assert!(
            text.contains("Refused policies (they isolate nothing):"),
            "{text}"
        );
        assert!(text.contains(refusal), "{text}");
        assert_eq!(policy_problems(&status), [refusal]);
    }

    #[test]
    fn imports_are_tabled_with_conflicts_as_a_warning() {
        use trellis_core::status::{ImportClusterStatus, ImportStatus};
        let mut status = parse_status(HEALTHY).unwrap();
        assert!(!render(&status).contains("Imports"), "none imported");
        let part = |cluster: &str, ready, endpoints| ImportClusterStatus {
            cluster: cluster.parse().unwrap(),
            ready_endpoints: ready,
            endpoints,
        };
        status.imports = vec![
            ImportStatus {
                namespace: "shop".into(),
                name: "db".into(),
                kind: ServiceKind::Headless,
                vips: vec![],
                clusters: vec![part("c2", 1, 1)],
                oldest: "c2".parse().unwrap(),
                conflicts: vec![],
            },
            ImportStatus {
                namespace: "shop".into(),
                name: "web".into(),
                kind: ServiceKind::ClusterSetIP,
                vips: vec!["10.255.0.7".parse().unwrap()],
                clusters: vec![part("c1", 2, 2), part("c2", 1, 3)],
                oldest: "c1".parse().unwrap(),
                conflicts: vec!["PortConflict".into(), "TypeConflict".into()],
            },
            ImportStatus {
                namespace: "shop".into(),
                name: "new".into(),
                kind: ServiceKind::ClusterSetIP,
                vips: vec![],
                clusters: vec![part("c2", 0, 0)],
                oldest: "c2".parse().unwrap(),
                conflicts: vec![],
            },
        ];
        status.imports_total = 3;
        let text = render(&status);
        assert!(
            text.contains("\nImports: 3 clusterset service(s), 1 with conflicts\n"),
            "{text}"
        );
        let cells = |service: &str| -> Vec<String> {
            let row = text
                .lines()
                .find(|l| l.trim_start().starts_with(service))
                .unwrap_or_else(|| panic!("no row for {service}:\n{text}"));
            // Columns are two or more spaces apart.
            row.trim()
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            cells("SERVICE"),
            [
                "SERVICE",
                "TYPE",
                "VIP",
                "CLUSTERS",
                "ENDPOINTS",
                "CONFLICTS"
            ]
        );
        assert_eq!(
            cells("shop/web"),
            [
                "shop/web",
                "ClusterSetIP",
                "10.255.0.7",
                "c1 2/2, c2 1/3",
                "3/5 ready",
                "PortConflict,TypeConflict (c1 wins)"
            ]
        );
        assert_eq!(
            cells("shop/db"),
            ["shop/db", "Headless", "-", "c2 1/1", "1/1 ready", "-"]
        );
        assert_eq!(cells("shop/new")[2], "pending");
        assert!(text.contains("warning: exports in conflict"), "{text}");
        // A conflict is a warning, not a problem: status stays healthy (exit 0).
        assert!(problems(&status).is_empty());
        assert!(policy_problems(&status).is_empty());
        // A cut list says how many are not shown.
        status.imports_total = 1003;
        assert!(
            render(&status).contains("and 1000 more"),
            "{}",
            render(&status)
        );
        // The document round-trips with its imports.
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(parse_status(&json).unwrap(), status);
        assert!(json.contains(r#""type":"ClusterSetIP""#), "{json}");
    }

    #[test]
    fn refused_claims_are_named_and_judged() {
        let mut status = parse_status(HEALTHY).unwrap();
        let peer = &mut status.remotes[0];
        peer.refused_claims = vec![
            "cluster c2: node evil refused: pod CIDR 128.0.0.0/1 broader than /8 (IPv4) or /32 \
             (IPv6): default-route-like"
                .into(),
        ];
        peer.refused_claims_total = 3;
        let text = render(&status);
        assert!(text.contains("3 claim(s) refused (below)"), "{text}");
        assert!(
            text.contains("Refused claims (not routed, not imported):"),
            "{text}"
        );
        assert!(
            text.contains("node evil refused: pod CIDR 128.0.0.0/1"),
            "{text}"
        );
        assert!(text.contains("and 2 more"), "{text}");
        let listed = render_problems(&problems(&status));
        assert!(
            listed.contains(
                "3 claim(s) refused: cluster c2: node evil refused: pod CIDR 128.0.0.0/1"
            ),
            "{listed}"
        );
        assert!(listed.contains("(and 2 more)"), "{listed}");
    }

    #[test]
    fn units_ages_and_times() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 + 1), "5.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_age(0), "0s");
        assert_eq!(human_age(192), "3m 12s");
        assert_eq!(human_age(7500), "2h 5m");
        assert_eq!(human_age(3 * 86_400 + 4 * 3600 + 59), "3days 4h");
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_750_867), "2026-11-27T03:41:07Z");
    }

    const STATUS_PATH: &str =
        "/api/v1/namespaces/trellis-system/services/http:trellis-controller:metrics/proxy/status";

    fn through_the_api(client: kube::Client) -> Source {
        Source::Cluster {
            client,
            cluster: ClusterArgs::default(),
        }
    }

    #[tokio::test]
    async fn waits_through_the_service_proxy_until_healthy() {
        use crate::test_api::{Answer, scripted};
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let (client, log, server) = scripted(move |path| {
            assert_eq!(path, STATUS_PATH);
            match asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
                // The controller not Ready yet: the Service has no endpoints.
                0 => Answer::failure(
                    503,
                    "ServiceUnavailable",
                    "no endpoints available for service \"trellis-controller\"",
                ),
                1 => Answer::json(200, &serde_json::from_str(BROKEN).unwrap()),
                _ => Answer::json(200, &serde_json::from_str(HEALTHY).unwrap()),
            }
        });
        let mut lines = Vec::new();
        let status = wait_until_healthy(
            &through_the_api(client),
            Duration::from_secs(10),
            Duration::from_millis(10),
            |line| lines.push(line),
        )
        .await
        .unwrap();
        assert!(judge(&status).is_empty());
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with(
                "waiting (0s): controller Service trellis-system/trellis-controller unreachable"
            ) && lines[0].contains("no endpoints available"),
            "{lines:?}"
        );
        assert!(lines[1].contains("(and 4 more)"), "{lines:?}");
        assert_eq!(log.lock().unwrap().len(), 3);
        server.abort();
    }

    #[tokio::test]
    async fn gives_up_at_the_timeout_with_the_last_answer() {
        use crate::test_api::{Answer, scripted};
        let (client, _log, server) =
            scripted(|_| Answer::json(200, &serde_json::from_str(BROKEN).unwrap()));
        let mut lines = Vec::new();
        let status = wait_until_healthy(
            &through_the_api(client),
            Duration::from_millis(100),
            Duration::from_millis(20),
            |line| lines.push(line),
        )
        .await
        .unwrap();
        assert_eq!(judge(&status).len(), 5);
        assert!(lines.len() >= 2, "{lines:?}");
        assert!(
            lines.last().unwrap().starts_with("gave up after"),
            "{lines:?}"
        );

        // Unreachable to the end: the error is the answer (exit 2).
        let (client, _log, server2) = scripted(|_| {
            Answer::failure(
                503,
                "ServiceUnavailable",
                "error trying to reach service: dial tcp 172.18.0.3:9464: connect: connection refused",
            )
        });
        let err = wait_until_healthy(
            &through_the_api(client),
            Duration::from_millis(50),
            Duration::from_millis(20),
            |_| {},
        )
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("connection refused"), "{err:#}");
        server.abort();
        server2.abort();
    }

    #[test]
    fn controller_urls_and_http_answers() {
        assert_eq!(
            parse_controller_url("http://127.0.0.1:9464").unwrap(),
            ("127.0.0.1:9464".into(), String::new())
        );
        assert_eq!(
            parse_controller_url("localhost:9464/").unwrap(),
            ("localhost:9464".into(), String::new())
        );
        assert_eq!(
            parse_controller_url("http://ctl.example/trellis/").unwrap(),
            ("ctl.example:80".into(), "/trellis".into())
        );
        assert!(parse_controller_url("https://x:1").is_err());
        assert!(parse_controller_url("http://").is_err());
        assert!(parse_status("{}").is_err());
    }
}
