//! `trellis lab observe`: `trellis observe` against every lab cluster's controller at once (or
//! those named with `--in`), each asked from inside the namespace it runs in (its flows
//! listener is on loopback there, as on Kubernetes). A plain query's answers are merged by
//! time and cut to the last N overall; `--follow` streams every cluster at once, a thread
//! each, printing lines as they come.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, bail};
use trellis_core::flow::Flow;
use trellis_netns::Netns;

use super::topology::{Cluster, LabState};
use crate::observe::{
    FLOWS_PORT, FlowArgs, Output, Printer, flow_request, flows_path, stream, warn_not_a_flow,
};

/// Where a lab controller's flows listener is, inside the namespace it runs in.
const LISTENER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), FLOWS_PORT);

pub fn run(state: &LabState, only: &[String], args: &FlowArgs) -> anyhow::Result<ExitCode> {
    let request = flow_request(args, SystemTime::now()).map_err(anyhow::Error::msg)?;
    let clusters = chosen(state, only)?;
    let path = flows_path(&request);
    let failures = if request.follow {
        follow(&clusters, &path, args)
    } else {
        let answers = std::thread::scope(|scope| {
            let asked: Vec<_> = clusters
                .iter()
                .map(|cluster| scope.spawn(|| fetch(cluster, &path, request.last, args)))
                .collect();
            asked
                .into_iter()
                .map(|asked| {
                    asked
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p))
                })
                .collect::<Vec<_>>()
        });
        let mut failures = 0;
        let mut flows = Vec::new();
        for (cluster, answer) in clusters.iter().zip(answers) {
            match answer {
                Ok(lines) => flows.push(records(&lines)),
                Err(error) => {
                    eprintln!("error: {}: {error:#}", cluster.name);
                    failures += 1;
                }
            }
        }
        for record in merge(flows, request.last) {
            match args.output {
                Output::Json => println!("{}", record.line),
                Output::Compact => {
                    println!("{}", trellis_core::flow::format::compact(&record.flow))
                }
            }
        }
        failures
    };
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The clusters `--in` names (all when none), refusing a name the lab does not have.
fn chosen<'a>(state: &'a LabState, only: &[String]) -> anyhow::Result<Vec<&'a Cluster>> {
    if only.is_empty() {
        return Ok(state.clusters.iter().collect());
    }
    only.iter()
        .map(|name| {
            state
                .clusters
                .iter()
                .find(|cluster| cluster.name == *name)
                .with_context(|| {
                    let names: Vec<&str> = state.clusters.iter().map(|c| c.name.as_str()).collect();
                    format!(
                        "--in {name}: lab {:?} has clusters {}",
                        state.lab,
                        names.join(", ")
                    )
                })
        })
        .collect()
}

fn hint(cluster: &Cluster) -> String {
    format!(
        "is {}'s controller running? (trellis lab status; trellis lab start {}/controller)",
        cluster.name, cluster.name
    )
}

/// One controller's answer to a query that ends: its last `last` lines (they come oldest
/// first, so only those can be among the last `last` overall), or all of them.
fn fetch(
    cluster: &Cluster,
    path: &str,
    last: Option<usize>,
    args: &FlowArgs,
) -> anyhow::Result<Vec<String>> {
    let netns = Netns::open(&cluster.nodes[0].netns)?;
    let hint = hint(cluster);
    netns.run(|| {
        let mut tail = Tail::new(last);
        stream(LISTENER, None, path, args.timeout, &hint, |line| {
            tail.push(line)
        })?;
        Ok(tail.lines.into())
    })?
}

/// Streams every cluster at once, each on its own thread inside its controller's namespace
/// for as long as the stream lasts; returns how many ended in an error.
fn follow(clusters: &[&Cluster], path: &str, args: &FlowArgs) -> usize {
    std::thread::scope(|scope| {
        let streams: Vec<_> = clusters
            .iter()
            .map(|cluster| {
                scope.spawn(move || -> anyhow::Result<()> {
                    let netns = Netns::open(&cluster.nodes[0].netns)?;
                    let hint = hint(cluster);
                    netns.run(|| {
                        let printer = Printer::new(args.output);
                        stream(LISTENER, None, path, args.timeout, &hint, |line| {
                            printer.print(line)
                        })
                    })??;
                    bail!("the controller ended the stream")
                })
            })
            .collect();
        clusters
            .iter()
            .zip(streams)
            .map(|(cluster, stream)| {
                let outcome = stream
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                outcome
                    .inspect_err(|error| eprintln!("error: {}: {error:#}", cluster.name))
                    .is_err()
            })
            .filter(|failed| *failed)
            .count()
    })
}

/// The last `last` non-blank lines pushed (all when `None`): what is kept of an answer
/// whatever its length.
struct Tail {
    last: Option<usize>,
    lines: VecDeque<String>,
}

impl Tail {
    fn new(last: Option<usize>) -> Self {
        Self {
            last,
            lines: VecDeque::new(),
        }
    }

    fn push(&mut self, line: &str) {
        if line.trim().is_empty() || self.last == Some(0) {
            return;
        }
        if self.last.is_some_and(|last| self.lines.len() >= last) {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_string());
    }
}

/// A served flow: parsed to order and show it, and the line as served for `-o json`.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    flow: Flow,
    line: String,
}

/// The flows among served lines; the others are skipped with a warning.
fn records(lines: &[String]) -> Vec<Record> {
    lines
        .iter()
        .map(|line| line.trim())
        .filter(|line| !line.is_empty())
        .filter_map(|line| match serde_json::from_str::<Flow>(line) {
            Ok(flow) => Some(Record {
                flow,
                line: line.to_string(),
            }),
            Err(error) => {
                warn_not_a_flow(line, &error);
                None
            }
        })
        .collect()
}

/// Every cluster's flows in order of time (a cluster's own order kept on ties), the last
/// `last` of them when given.
fn merge(answers: Vec<Vec<Record>>, last: Option<usize>) -> Vec<Record> {
    let mut all: Vec<Record> = answers.into_iter().flatten().collect();
    all.sort_by_key(|record| record.flow.time);
    if let Some(last) = last {
        let excess = all.len().saturating_sub(last);
        all.drain(..excess);
    }
    all
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::lab::Topology;

    fn line(seconds: u64, node: &str) -> String {
        let time = humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_secs(seconds));
        format!(
            r#"{{"time":"{time}","node_name":"{node}","verdict":"FORWARDED","event":"connection_new","ip":{{"source":"10.1.0.5","destination":"10.2.0.7","encrypted":false}},"l4":{{"protocol":"UDP","source_port":5353,"destination_port":53}},"source":{{"kind":"world"}},"destination":{{"kind":"world"}},"traffic_direction":"EGRESS"}}"#
        )
    }

    fn nodes(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| {
                format!(
                    "{}@{}",
                    r.flow.node_name,
                    r.flow.time.duration_since(UNIX_EPOCH).unwrap().as_secs()
                )
            })
            .collect()
    }

    #[test]
    fn answers_merge_by_time_and_keep_the_last_n_overall() {
        let c1 = records(&[line(10, "c1/n0"), line(30, "c1/n0"), line(30, "c1/n1")]);
        let c2 = records(&[
            line(20, "c2/n0"),
            "".into(),
            "{\"not\": \"a flow\"}".into(),
            line(40, "c2/n0"),
        ]);
        assert_eq!(c2.len(), 2, "the blank and the broken line are skipped");
        assert_eq!(
            nodes(&merge(vec![c1.clone(), c2.clone()], None)),
            ["c1/n0@10", "c2/n0@20", "c1/n0@30", "c1/n1@30", "c2/n0@40"]
        );
        assert_eq!(
            nodes(&merge(vec![c1.clone(), c2.clone()], Some(3))),
            ["c1/n0@30", "c1/n1@30", "c2/n0@40"]
        );
        assert!(merge(vec![c1, c2], Some(0)).is_empty());
        let kept = merge(vec![records(&[line(5, "c1/n0")])], Some(20));
        assert_eq!(kept[0].line, line(5, "c1/n0"), "the line as served");
    }

    #[test]
    fn an_answer_is_cut_to_its_last_n_lines_as_it_comes() {
        let pushed = |last: Option<usize>| {
            let mut tail = Tail::new(last);
            for line in ["a", "", "b", "c", " "] {
                tail.push(line);
            }
            Vec::from(tail.lines)
        };
        assert_eq!(pushed(Some(2)), ["b", "c"]);
        assert_eq!(pushed(None), ["a", "b", "c"]);
        assert!(pushed(Some(0)).is_empty());
    }

    #[test]
    fn in_picks_clusters_by_name_and_refuses_unknown_ones() {
        let state = Topology::new("t", 3, 1, 1).unwrap();
        let names = |only: &[&str]| -> Result<Vec<String>, String> {
            let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
            chosen(&state, &only)
                .map(|cs| cs.iter().map(|c| c.name.clone()).collect())
                .map_err(|e| e.to_string())
        };
        assert_eq!(names(&[]).unwrap(), ["c1", "c2", "c3"]);
        assert_eq!(names(&["c3", "c1"]).unwrap(), ["c3", "c1"]);
        assert_eq!(
            names(&["c9"]).unwrap_err(),
            "--in c9: lab \"t\" has clusters c1, c2, c3"
        );
    }
}
