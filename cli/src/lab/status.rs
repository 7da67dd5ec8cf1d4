//! `trellis lab status`: the lab's layout, each cluster's mesh as its controller reports it
//! (`GET /status`, fetched from inside the controller's node namespace), and the
//! connectivity matrix; `-o json` gives the same as one document. Exits 1 when anything is
//! unhealthy.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use trellis_core::status::{ControllerStatus, problems};
use trellis_netns::Netns;

use super::build::print_layout;
use super::connectivity::{self, Row};
use super::control::{CONTROLLER_METRICS_PORT, controller_address};
use super::topology::{Cluster, LabState};
use crate::status::{
    EXIT_UNHEALTHY, FETCH_TIMEOUT, Output, http_get, parse_status, render, render_problems,
};

/// `trellis lab status -o json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabStatus {
    pub lab: String,
    pub node_encryption: bool,
    pub clusters: Vec<LabCluster>,
    /// ICMP echo from every pod to every other pod and to its node, and a TCP connection to
    /// every other pod's echo server.
    pub connectivity: Vec<Probe>,
    /// What is unhealthy, one line each; empty when all is well.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabCluster {
    pub cluster: String,
    /// Where its controller's status was asked for (inside the lab).
    pub controller: String,
    /// The controller's `GET /status`, when it answered.
    pub status: Option<ControllerStatus>,
    /// Why it did not.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    /// ICMP round-trip time; `None` when no reply came.
    pub rtt_ms: Option<f64>,
    /// TCP connect time to the echo server; `None` when it failed or was not tried (nodes).
    pub tcp_ms: Option<f64>,
    /// Every probe of this pair succeeded.
    pub ok: bool,
}

fn controller_metrics(cluster: &Cluster) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(controller_address(cluster)),
        CONTROLLER_METRICS_PORT,
    )
}

/// The controller's status, asked from inside the namespace of the node it runs on (its
/// address exists only there); the namespace is entered on a short-lived thread.
pub(super) fn fetch(cluster: &Cluster) -> anyhow::Result<ControllerStatus> {
    fetch_leading(cluster).map(|(_, status)| status)
}

/// With two controller replicas (`--controller-replicas 2`), the one that leads: the first
/// whose `/leader` answers 200 (a follower answers 503); the first replica when none does.
/// Returns its metrics address and status.
pub(super) fn fetch_leading(cluster: &Cluster) -> anyhow::Result<(SocketAddr, ControllerStatus)> {
    let netns = Netns::open(&cluster.nodes[0].netns)?;
    let first = controller_metrics(cluster);
    let replicas = [first, SocketAddr::new(first.ip(), first.port() + 1)];
    let (addr, body) = netns.run(move || {
        let leading = replicas
            .into_iter()
            .find(|addr| http_get(*addr, &addr.to_string(), "/leader", FETCH_TIMEOUT).is_ok())
            .unwrap_or(first);
        http_get(leading, &leading.to_string(), "/status", FETCH_TIMEOUT).map(|b| (leading, b))
    })??;
    Ok((addr, parse_status(&body)?))
}

/// Pure: the lab's problems from what each controller said and the connectivity matrix.
pub fn lab_problems(clusters: &[LabCluster], connectivity: &[Probe]) -> Vec<String> {
    let mut out = Vec::new();
    for cluster in clusters {
        match (&cluster.status, &cluster.error) {
            (Some(status), _) => out.extend(problems(status)),
            (None, error) => out.push(format!(
                "{}: the controller at {} did not answer: {}",
                cluster.cluster,
                cluster.controller,
                error.as_deref().unwrap_or("no status")
            )),
        }
    }
    out.extend(
        connectivity
            .iter()
            .filter(|p| !p.ok)
            .map(|p| format!("{} cannot reach {}", p.from, p.to)),
    );
    out
}

fn probes(rows: &[Row]) -> Vec<Probe> {
    let ms = |d: &std::time::Duration| d.as_secs_f64() * 1000.0;
    rows.iter()
        .flat_map(|(from, row)| {
            row.iter().map(move |probe| Probe {
                from: from.clone(),
                to: probe.target.clone(),
                rtt_ms: probe.icmp.as_ref().map(ms),
                tcp_ms: probe.tcp.as_ref().and_then(|t| t.as_ref().ok()).map(ms),
                ok: probe.ok(),
            })
        })
        .collect()
}

pub fn run(state: &LabState, output: Output) -> anyhow::Result<ExitCode> {
    let clusters: Vec<LabCluster> = state
        .clusters
        .iter()
        .map(|cluster| {
            let (controller, status, error) = match fetch_leading(cluster) {
                Ok((addr, status)) => (addr, Some(status), None),
                Err(e) => (controller_metrics(cluster), None, Some(format!("{e:#}"))),
            };
            // With replicas, which one leads (the one asked).
            let leading = match controller.port() - CONTROLLER_METRICS_PORT {
                _ if state.controller_replicas <= 1 => String::new(),
                0 => format!(" ({}/controller leads)", cluster.name),
                i => format!(" ({}/controller/{i} leads)", cluster.name),
            };
            LabCluster {
                cluster: cluster.name.clone(),
                controller: format!("http://{controller}{leading}"),
                status,
                error,
            }
        })
        .collect();
    let rows = connectivity::measure(state, super::build::PROBE_TIMEOUT);
    let connectivity = probes(&rows);
    let problems = lab_problems(&clusters, &connectivity);
    let healthy = problems.is_empty();
    match output {
        Output::Json => {
            let document = LabStatus {
                lab: state.lab.clone(),
                node_encryption: state.node_encryption,
                clusters,
                connectivity,
                problems,
            };
            println!("{}", serde_json::to_string_pretty(&document)?);
        }
        Output::Table => {
            println!("lab {:?}", state.lab);
            print_layout(state);
            for cluster in &clusters {
                println!();
                match &cluster.status {
                    Some(status) => {
                        if state.controller_replicas > 1 {
                            println!("controller {}", cluster.controller);
                        }
                        print!("{}", render(status));
                    }
                    None => println!(
                        "cluster {}: the controller at {} did not answer: {}",
                        cluster.cluster,
                        cluster.controller,
                        cluster.error.as_deref().unwrap_or("no status")
                    ),
                }
            }
            println!();
            connectivity::print(&rows);
            print!("{}", render_problems(&problems));
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNHEALTHY)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_controllers_and_failed_probes_are_problems() {
        let healthy: ControllerStatus =
            serde_json::from_str(include_str!("../../tests/fixtures/status-healthy.json")).unwrap();
        let clusters = vec![
            LabCluster {
                cluster: "c1".into(),
                controller: "http://198.18.1.10:9464".into(),
                status: Some(healthy),
                error: None,
            },
            LabCluster {
                cluster: "c2".into(),
                controller: "http://198.18.2.10:9464".into(),
                status: None,
                error: Some("connect to 198.18.2.10:9464: Connection refused".into()),
            },
        ];
        let rows: Vec<Row> = vec![(
            "c1/pod-0".into(),
            vec![
                connectivity::Probe {
                    target: "c1/pod-1".into(),
                    icmp: Some(std::time::Duration::from_micros(150)),
                    tcp: Some(Ok(std::time::Duration::from_micros(300))),
                },
                connectivity::Probe {
                    target: "c2/pod-0".into(),
                    icmp: Some(std::time::Duration::from_micros(150)),
                    tcp: Some(Err(())),
                },
            ],
        )];
        let connectivity = probes(&rows);
        assert_eq!(connectivity[0].rtt_ms, Some(0.15));
        assert_eq!(connectivity[0].tcp_ms, Some(0.3));
        assert!(!connectivity[1].ok, "a failed TCP connect fails the pair");
        assert_eq!(
            lab_problems(&clusters, &connectivity),
            [
                "c2: the controller at http://198.18.2.10:9464 did not answer: connect to 198.18.2.10:9464: Connection refused",
                "c1/pod-0 cannot reach c2/pod-0",
            ]
        );
        assert!(lab_problems(&clusters[..1], &connectivity[..1]).is_empty());
    }
}
