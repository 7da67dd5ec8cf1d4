//! `trellis observe`: flows from a controller's flows listener (`GET /flows?<query>`, NDJSON),
//! with `hubble observe`'s filters, one compact line per flow or the JSON as served.
//!
//! The flags become a [`FlowRequest`] in a pure function ([`flow_request`]); what is sent is
//! its query string, and what comes back is printed line by line as it arrives, so `--follow`
//! shows a flow as soon as the controller has it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use clap::{Args, ValueEnum};
use trellis_core::flow::request::RequestError;
use trellis_core::flow::{Flow, FlowFilter, FlowRequest, TrafficDirection, Verdict};
use trellis_http::ClientError;

/// The controller's flows listener (hubble-relay's port).
pub const FLOWS_PORT: u16 = 4245;

/// How many recorded flows a plain `trellis observe` shows, as `hubble observe` does.
pub const DEFAULT_LAST: usize = 20;

const PROTOCOLS: [&str; 5] = ["tcp", "udp", "sctp", "icmp", "icmpv6"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One line per flow: `TIME NODE: SRC -> DST proto FLAGS VERDICT (policies) ...`.
    Compact,
    /// One `Flow` JSON object per line, exactly as the controller sent it.
    Json,
}

/// What to ask for and how to print it: shared by `trellis observe` and `trellis lab observe`.
/// Values of one filter are alternatives; different filters must all match.
#[derive(Args, Clone, Debug)]
pub struct FlowArgs {
    /// Flows with a pod of this namespace at either end.
    #[arg(long, value_name = "NS")]
    pub namespace: Vec<String>,
    /// Flows with this pod at either end: `[CLUSTER/][NS/]NAME-PREFIX` (namespace `default`
    /// when not given).
    #[arg(long, value_name = "[C/]NS/PREFIX")]
    pub pod: Vec<String>,
    /// Flows from this pod (as --pod).
    #[arg(long, value_name = "[C/]NS/PREFIX")]
    pub from_pod: Vec<String>,
    /// Flows to this pod (as --pod).
    #[arg(long, value_name = "[C/]NS/PREFIX")]
    pub to_pod: Vec<String>,
    /// Flows with an end in this cluster.
    #[arg(long)]
    pub cluster: Vec<String>,
    /// Flows with an end whose labels match: `app=web,tier!=db,debug,!canary`.
    #[arg(long, value_name = "SELECTOR")]
    pub label: Vec<String>,
    /// FORWARDED or DROPPED.
    #[arg(long)]
    pub verdict: Vec<String>,
    /// tcp, udp, sctp, icmp or icmpv6.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// Flows with this port at either end.
    #[arg(long)]
    pub port: Vec<String>,
    /// Flows seen by this node: `NODE` or `CLUSTER/NODE`.
    #[arg(long)]
    pub node: Vec<String>,
    /// INGRESS (reaching the observed pod) or EGRESS (leaving it).
    #[arg(long)]
    pub traffic_direction: Vec<String>,
    /// Flows since a time: a duration ago (`5m`, `1h30m`) or an RFC 3339 time
    /// (`2026-12-07T05:40:00Z`).
    #[arg(long, value_name = "DURATION|TIME")]
    pub since: Option<String>,
    /// Flows until a time (as --since).
    #[arg(long, value_name = "DURATION|TIME")]
    pub until: Option<String>,
    /// The last N recorded flows that match (20 when neither this, --since, --until, --all
    /// nor --follow is given; none of the recorded ones with --follow alone).
    #[arg(long, value_name = "N", conflicts_with = "all")]
    pub last: Option<usize>,
    /// Every recorded flow that matches.
    #[arg(long)]
    pub all: bool,
    /// Go on printing new flows as they come (Ctrl-C ends).
    #[arg(short, long)]
    pub follow: bool,
    /// Ask this peer cluster's controller too, over the peering (`*`: every peer); it answers
    /// with the flows that have an end in this cluster.
    #[arg(long, value_name = "CLUSTER")]
    pub peer: Vec<String>,
    #[arg(short, long, value_enum, default_value_t = Output::Compact)]
    pub output: Output,
    /// How long connecting and the answer's start may take.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Args)]
pub struct ObserveArgs {
    /// The controller's flows listener, `ADDR[:PORT]` (port 4245 when not given); on
    /// Kubernetes reached through `kubectl port-forward deploy/trellis-controller 4245`.
    #[arg(long, default_value = "127.0.0.1:4245", value_name = "ADDR[:PORT]")]
    pub controller: String,
    #[command(flatten)]
    pub flows: FlowArgs,
}

pub fn run(args: ObserveArgs) -> anyhow::Result<ExitCode> {
    let request = flow_request(&args.flows, SystemTime::now()).map_err(anyhow::Error::msg)?;
    let host = controller_host(&args.controller).map_err(anyhow::Error::msg)?;
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("--controller {}: resolve {host}", args.controller))?
        .next()
        .ok_or_else(|| anyhow!("--controller {}: {host} has no address", args.controller))?;
    let printer = Printer::new(args.flows.output);
    // The answer is flows only, its status sent before any node has answered: whether a node
    // or peer was left out (busy, too slow) shows in the controller's skip counts, read
    // before and after. (A follower's answer has no after.)
    let skipped_before = (!request.follow).then(|| skipped_sources(addr, &host));
    stream(
        addr,
        Some(&host),
        &flows_path(&request),
        args.flows.timeout,
        KUBERNETES_HINT,
        |line| printer.print(line),
    )?;
    if let Some(before) = skipped_before {
        let missing = newly_skipped(&before, &skipped_sources(addr, &host));
        if !missing.is_empty() {
            eprintln!(
                "warning: flows may be missing: the controller went without {} while answering \
                 (ask again, or see /flows/nodes)",
                missing.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Per source (`node NAME`, `peer ID`) and reason, how often the controller's queries went
/// without it: `skipped` of `GET /flows/nodes` (nothing when it cannot be read).
type SkipCounts = BTreeMap<String, BTreeMap<String, u64>>;

fn skipped_sources(addr: SocketAddr, host: &str) -> SkipCounts {
    #[derive(serde::Deserialize)]
    struct Sources {
        #[serde(default)]
        skipped: SkipCounts,
    }
    let get = trellis_http::Get {
        host: Some(host),
        ..trellis_http::Get::new(addr, "/flows/nodes", Duration::from_secs(5))
    };
    get.send()
        .ok()
        .and_then(|response| response.ok_body().ok())
        .and_then(|body| serde_json::from_str::<Sources>(&body).ok())
        .map(|sources| sources.skipped)
        .unwrap_or_default()
}

/// The sources skipped (more often) in `after` than in `before`, as `node n1 (busy)`.
fn newly_skipped(before: &SkipCounts, after: &SkipCounts) -> Vec<String> {
    after
        .iter()
        .filter_map(|(source, reasons)| {
            let grew: Vec<&str> = reasons
                .iter()
                .filter(|(reason, count)| {
                    before
                        .get(source)
                        .and_then(|b| b.get(*reason))
                        .is_none_or(|b| *count > b)
                })
                .map(|(reason, _)| reason.as_str())
                .collect();
            (!grew.is_empty()).then(|| format!("{source} ({})", grew.join(", ")))
        })
        .collect()
}

/// What to try when the flows listener cannot be reached from outside the cluster.
pub const KUBERNETES_HINT: &str = "is the controller's flows listener reachable? on Kubernetes: \
     kubectl -n <namespace> port-forward deploy/trellis-controller 4245";

/// `/flows?<query>`.
pub fn flows_path(request: &FlowRequest) -> String {
    let query = request.to_query();
    if query.is_empty() {
        "/flows".into()
    } else {
        format!("/flows?{query}")
    }
}

/// GETs `path` and hands each line of the answer to `on_line` as it arrives. An unreachable
/// listener is one error naming `hint`; a refused query is the controller's own message.
pub fn stream(
    addr: SocketAddr,
    host: Option<&str>,
    path: &str,
    timeout: Duration,
    hint: &str,
    mut on_line: impl FnMut(&str),
) -> anyhow::Result<()> {
    let get = trellis_http::Get {
        host,
        ..trellis_http::Get::new(addr, path, timeout)
    };
    let response = get
        .lines(|line| {
            on_line(line);
            ControlFlow::Continue(())
        })
        .map_err(|error| match error {
            ClientError::Connect { source, .. } => {
                anyhow!("cannot connect to {addr}: {source}; {hint}")
            }
            ClientError::Timeout { timeout, .. } => {
                anyhow!("{addr} did not answer within {timeout:?}; {hint}")
            }
            other => anyhow::Error::new(other).context("reading flows"),
        })?;
    match response.status {
        200 => Ok(()),
        400 => Err(anyhow!(
            "the controller refused the query: {}",
            one_line(&response.body)
        )),
        status => Err(anyhow!(
            "the controller at {addr} answered {status}: {}",
            one_line(&response.body)
        )),
    }
}

/// An error body as one line, of a readable length.
fn one_line(body: &str) -> String {
    let text = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() > 300 {
        format!("{}...", text.chars().take(300).collect::<String>())
    } else {
        text
    }
}

/// Turns the served lines into printed ones.
pub struct Printer {
    output: Output,
}

impl Printer {
    pub fn new(output: Output) -> Self {
        Self { output }
    }

    /// What to print for one served line: nothing for a blank one; the line itself as JSON;
    /// the compact line of the flow it holds, or a warning on stderr for a line that is not
    /// a flow (one bad record does not end the stream).
    pub fn render(&self, line: &str) -> Option<String> {
        let line = line.trim();
        if line.is_empty() {
            return None;
        }
        match self.output {
            Output::Json => Some(line.to_string()),
            Output::Compact => match serde_json::from_str::<Flow>(line) {
                Ok(flow) => Some(trellis_core::flow::format::compact(&flow)),
                Err(error) => {
                    warn_not_a_flow(line, &error);
                    None
                }
            },
        }
    }

    pub fn print(&self, line: &str) {
        if let Some(text) = self.render(line) {
            println!("{text}");
        }
    }
}

pub fn warn_not_a_flow(line: &str, error: &serde_json::Error) {
    let start: String = line.chars().take(80).collect();
    eprintln!("warning: skipped a line that is not a flow ({error}): {start}");
}

/// `ADDR[:PORT]` (an `http://` in front is allowed) as `host:port`, port 4245 by default;
/// IPv6 as `[::1]` or `[::1]:4245` (or bare `::1`).
pub fn controller_host(text: &str) -> Result<String, String> {
    let bare = text
        .strip_prefix("http://")
        .unwrap_or(text)
        .trim_end_matches('/');
    if bare.is_empty() {
        return Err(format!("--controller {text:?}: give ADDR[:PORT]"));
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, FLOWS_PORT).to_string());
    }
    if let Some(inside) = bare.strip_prefix('[') {
        return match inside.split_once(']') {
            Some((ip, "")) if ip.parse::<std::net::Ipv6Addr>().is_ok() => {
                Ok(format!("[{ip}]:{FLOWS_PORT}"))
            }
            Some((ip, port))
                if ip.parse::<std::net::Ipv6Addr>().is_ok()
                    && port.strip_prefix(':').is_some_and(is_port) =>
            {
                Ok(bare.to_string())
            }
            _ => Err(format!(
                "--controller {text:?} is not [IPv6] or [IPv6]:PORT"
            )),
        };
    }
    match bare.rsplit_once(':') {
        None => Ok(format!("{bare}:{FLOWS_PORT}")),
        Some((host, port)) if !host.is_empty() && !host.contains(':') && is_port(port) => {
            Ok(bare.to_string())
        }
        Some(_) => Err(format!(
            "--controller {text:?} is not ADDR[:PORT] (a port is 1-65535)"
        )),
    }
}

fn is_port(text: &str) -> bool {
    text.parse::<u16>().is_ok_and(|port| port != 0)
}

/// The request the flags ask for, `now` being when `--since 5m` counts back from. Refuses
/// what the controller would refuse, with the flag's name, before anything is sent.
pub fn flow_request(args: &FlowArgs, now: SystemTime) -> Result<FlowRequest, String> {
    let since = args
        .since
        .as_deref()
        .map(|text| point_in_time("--since", text, now))
        .transpose()?;
    let until = args
        .until
        .as_deref()
        .map(|text| point_in_time("--until", text, now))
        .transpose()?;
    if let (Some(since), Some(until)) = (since, until)
        && until < since
    {
        return Err("--until is before --since: no flow can match".into());
    }
    if args.follow && until.is_some() {
        return Err("--follow goes on with new flows; --until ends them: give one".into());
    }
    let mut filter = FlowFilter {
        namespace: names("--namespace", &args.namespace)?,
        pod: pods("--pod", &args.pod)?,
        from_pod: pods("--from-pod", &args.from_pod)?,
        to_pod: pods("--to-pod", &args.to_pod)?,
        cluster: names("--cluster", &args.cluster)?,
        label: names("--label", &args.label)?,
        verdict: args
            .verdict
            .iter()
            .map(|v| v.parse::<Verdict>().map_err(|e| format!("--verdict: {e}")))
            .collect::<Result<_, _>>()?,
        protocol: args
            .protocol
            .iter()
            .map(|p| protocol(p))
            .collect::<Result<_, _>>()?,
        port: args
            .port
            .iter()
            .map(|p| match p.parse::<u16>() {
                Ok(port) if port != 0 => Ok(port),
                _ => Err(format!("--port: {p:?} is not a port (1-65535)")),
            })
            .collect::<Result<_, _>>()?,
        node: names("--node", &args.node)?,
        traffic_direction: args
            .traffic_direction
            .iter()
            .map(|d| match d.to_ascii_uppercase().as_str() {
                "INGRESS" => Ok(TrafficDirection::Ingress),
                "EGRESS" => Ok(TrafficDirection::Egress),
                _ => Err(format!(
                    "--traffic-direction: {d:?} is not INGRESS or EGRESS"
                )),
            })
            .collect::<Result<_, _>>()?,
        since,
        until,
    };
    // `--all --follow`: every recorded flow first, which following alone would not ask for
    // (see `FlowRequest::wants_history`); a window from the epoch asks for them all.
    if args.all && args.follow && filter.since.is_none() {
        filter.since = Some(SystemTime::UNIX_EPOCH);
    }
    let last = match (args.all, args.last) {
        (true, _) => None,
        (false, Some(n)) => Some(n),
        (false, None) if !args.follow && since.is_none() && until.is_none() => Some(DEFAULT_LAST),
        (false, None) => None,
    };
    let request = FlowRequest {
        filter,
        last,
        follow: args.follow,
        peers: names("--peer", &args.peer)?,
    };
    // The controller parses the query with this same function: what passes here passes there
    // (label selectors are checked only by it).
    FlowRequest::from_query(&request.to_query()).map_err(|error| match error {
        RequestError::BadValue { name, reason } => format!("--{name}: {reason}"),
        other => other.to_string(),
    })?;
    Ok(request)
}

fn names(flag: &str, values: &[String]) -> Result<Vec<String>, String> {
    values
        .iter()
        .map(|v| {
            if v.trim().is_empty() {
                Err(format!("{flag}: an empty value matches nothing"))
            } else {
                Ok(v.trim().to_string())
            }
        })
        .collect()
}

/// `[CLUSTER/][NS/]PREFIX`; `NS/` alone is every pod of a namespace.
fn pods(flag: &str, values: &[String]) -> Result<Vec<String>, String> {
    let values = names(flag, values)?;
    for value in &values {
        let parts: Vec<&str> = value.split('/').collect();
        let fine = match parts.as_slice() {
            [_] => true,
            [ns, _] => !ns.is_empty(),
            [cluster, ns, _] => !cluster.is_empty() && !ns.is_empty(),
            _ => false,
        };
        if !fine {
            return Err(format!(
                "{flag}: {value:?} is not [CLUSTER/][NAMESPACE/]POD-PREFIX"
            ));
        }
    }
    Ok(values)
}

fn protocol(text: &str) -> Result<String, String> {
    let lower = text.to_ascii_lowercase();
    let name = if lower == "icmpv4" {
        "icmp".into()
    } else {
        lower
    };
    if PROTOCOLS.contains(&name.as_str()) {
        Ok(name)
    } else {
        Err(format!(
            "--protocol: {text:?} is not one of {}",
            PROTOCOLS.join(", ")
        ))
    }
}

/// A duration ago (`5m`) or an RFC 3339 time.
fn point_in_time(flag: &str, text: &str, now: SystemTime) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return now
            .checked_sub(ago)
            .ok_or_else(|| format!("{flag}: {text:?} ago is before the epoch"));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!(
            "{flag}: {text:?} is neither a duration (5m, 1h30m) nor an RFC 3339 time \
             (2026-12-07T05:40:00Z)"
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        flows: FlowArgs,
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn request(args: &[&str]) -> Result<FlowRequest, String> {
        let command =
            Command::try_parse_from(std::iter::once("observe").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        flow_request(&command.flows, now())
    }

    #[test]
    fn without_a_window_it_asks_for_the_last_20_and_following_asks_for_new_ones_only() {
        let plain = request(&[]).unwrap();
        assert_eq!((plain.last, plain.follow), (Some(20), false));
        assert_eq!(plain.filter, FlowFilter::default());
        assert_eq!(flows_path(&plain), "/flows?last=20");
        let follow = request(&["-f"]).unwrap();
        assert_eq!((follow.last, follow.follow), (None, true));
        assert_eq!(flows_path(&follow), "/flows?follow=true");
        let both = request(&["--follow", "--last", "5"]).unwrap();
        assert_eq!((both.last, both.follow), (Some(5), true));
        let all = request(&["--all"]).unwrap();
        assert_eq!(all.last, None);
        assert_eq!(flows_path(&all), "/flows");
        let all_follow = request(&["--all", "-f"]).unwrap();
        assert_eq!(all_follow.filter.since, Some(UNIX_EPOCH));
        assert!(
            all_follow.wants_history(),
            "every recorded flow, then new ones"
        );
        assert!(!follow.wants_history());
    }

    #[test]
    fn sources_skipped_while_answering_are_named() {
        let counts = |entries: &[(&str, &str, u64)]| {
            let mut map = SkipCounts::new();
            for (source, reason, n) in entries {
                map.entry((*source).into())
                    .or_default()
                    .insert((*reason).into(), *n);
            }
            map
        };
        let before = counts(&[("node n1", "busy", 2), ("node n2", "timeout", 1)]);
        assert!(newly_skipped(&before, &before).is_empty());
        let after = counts(&[
            ("node n1", "busy", 3),
            ("node n2", "timeout", 1),
            ("node n2", "busy", 1),
            ("peer c2", "not_connected", 1),
        ]);
        assert_eq!(
            newly_skipped(&before, &after),
            [
                "node n1 (busy)",
                "node n2 (busy)",
                "peer c2 (not_connected)"
            ]
        );
    }

    #[test]
    fn since_and_until_take_a_duration_ago_or_a_time() {
        let ago = request(&["--since", "5m"]).unwrap();
        assert_eq!(ago.filter.since, Some(now() - Duration::from_secs(300)));
        assert_eq!(ago.last, None, "a window replaces the default of 20");
        let window = request(&[
            "--since",
            "2027-01-15T07:00:00Z",
            "--until",
            "2027-01-15T07:30:00.5Z",
        ])
        .unwrap();
        assert_eq!(
            window.filter.since,
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000 - 3600))
        );
        assert_eq!(
            window.filter.until,
            Some(UNIX_EPOCH + Duration::from_millis(1_800_000_000_000 - 1_799_500))
        );
        let with_last = request(&["--since", "1h", "--last", "3"]).unwrap();
        assert_eq!(with_last.last, Some(3));
        let follow_since = request(&["--since", "1m", "-f"]).unwrap();
        assert_eq!((follow_since.last, follow_since.follow), (None, true));
        assert!(
            follow_since.wants_history(),
            "the last minute, then new flows"
        );
    }

    #[test]
    fn every_filter_flag_is_repeatable_and_reaches_the_query() {
        let r = request(&[
            "--namespace",
            "x",
            "--namespace",
            "y",
            "--pod",
            "c2/y/b",
            "--from-pod",
            "x/a",
            "--to-pod",
            "web",
            "--cluster",
            "c1",
            "--label",
            "app=web,tier!=db",
            "--verdict",
            "dropped",
            "--verdict",
            "FORWARDED",
            "--protocol",
            "TCP",
            "--protocol",
            "icmpv4",
            "--port",
            "80",
            "--node",
            "c1/c1-node-0",
            "--traffic-direction",
            "ingress",
            "--peer",
            "*",
            "--last",
            "7",
        ])
        .unwrap();
        assert_eq!(
            r.filter,
            FlowFilter {
                namespace: vec!["x".into(), "y".into()],
                pod: vec!["c2/y/b".into()],
                from_pod: vec!["x/a".into()],
                to_pod: vec!["web".into()],
                cluster: vec!["c1".into()],
                label: vec!["app=web,tier!=db".into()],
                verdict: vec![Verdict::Dropped, Verdict::Forwarded],
                protocol: vec!["tcp".into(), "icmp".into()],
                port: vec![80],
                node: vec!["c1/c1-node-0".into()],
                traffic_direction: vec![TrafficDirection::Ingress],
                since: None,
                until: None,
            }
        );
        assert_eq!(r.peers, ["*"]);
        assert_eq!(
            flows_path(&r),
            "/flows?namespace=x&namespace=y&pod=c2%2Fy%2Fb&from-pod=x%2Fa&to-pod=web&cluster=c1\
             &label=app%3Dweb%2Ctier%21%3Ddb&protocol=tcp&protocol=icmp&node=c1%2Fc1-node-0\
             &peer=*&verdict=DROPPED&verdict=FORWARDED&port=80&traffic-direction=INGRESS&last=7"
        );
        assert_eq!(FlowRequest::from_query(&r.to_query()), Ok(r));
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        for (args, message) in [
            (
                &["--verdict", "MAYBE"][..],
                "--verdict: \"MAYBE\" is not a verdict",
            ),
            (&["--port", "99999"], "--port: \"99999\" is not a port"),
            (&["--port", "http"], "--port: \"http\" is not a port"),
            (&["--port", "0"], "--port: \"0\" is not a port"),
            (
                &["--protocol", "gre"],
                "--protocol: \"gre\" is not one of tcp",
            ),
            (
                &["--traffic-direction", "sideways"],
                "--traffic-direction: \"sideways\" is not INGRESS or EGRESS",
            ),
            (
                &["--since", "yesterday"],
                "--since: \"yesterday\" is neither",
            ),
            (&["--until", "soon"], "--until: \"soon\" is neither"),
            (
                &["--since", "1m", "--until", "2m"],
                "--until is before --since",
            ),
            (&["-f", "--until", "1m"], "--follow goes on"),
            (&["--label", "=web"], "--label: \"=web\": a requirement"),
            (&["--pod", "c1/x/a/b"], "--pod: \"c1/x/a/b\" is not"),
            (&["--to-pod", "/a"], "--to-pod: \"/a\" is not"),
            (&["--namespace", ""], "--namespace: an empty value"),
            (&["--last", "-3"], "unexpected argument '-3'"),
            (&["--last", "3", "--all"], "cannot be used with"),
        ] {
            let error = request(args).unwrap_err();
            assert!(error.contains(message), "{args:?}: {error}");
        }
    }

    #[test]
    fn controller_addresses_get_the_flows_port_when_they_have_none() {
        for (given, host) in [
            ("127.0.0.1", "127.0.0.1:4245"),
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("http://localhost:4245/", "localhost:4245"),
            ("relay.example", "relay.example:4245"),
            ("::1", "[::1]:4245"),
            ("[::1]", "[::1]:4245"),
            ("[fd00::1]:9000", "[fd00::1]:9000"),
        ] {
            assert_eq!(controller_host(given).as_deref(), Ok(host), "{given}");
        }
        for bad in ["", "host:http", "host:0", "[::1]:", "[nope]", "a:b:c"] {
            assert!(controller_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lines_print_as_compact_or_as_served_and_bad_ones_are_skipped() {
        let flow = r#"{"time":"2026-12-07T05:40:00.123Z","node_name":"c1/c1-node-0","verdict":"DROPPED","drop_reason":"POLICY_DENIED","event":"packet_dropped","ip":{"source":"10.1.0.5","destination":"10.2.0.7","encrypted":true},"l4":{"protocol":"TCP","source_port":41234,"destination_port":80,"tcp_flags":{"SYN":true}},"source":{"kind":"pod","cluster":"c1","namespace":"x","pod_name":"a"},"destination":{"kind":"pod","cluster":"c2","namespace":"y","pod_name":"b"},"traffic_direction":"EGRESS","denied_by":[{"cluster":"c1","namespace":"x","name":"deny-all"}],"tunnel":{"peer_cluster":"c2","peer_node":"c2-node-0"}}"#;
        let compact = Printer::new(Output::Compact);
        assert_eq!(
            compact.render(flow).as_deref(),
            Some(
                "Dec  7 05:40:00.123 c1/c1-node-0: c1/x/a:41234 -> c2/y/b:80 tcp SYN DROPPED \
                 POLICY_DENIED (denied by x/deny-all) EGRESS encrypted via c2/c2-node-0"
            )
        );
        assert_eq!(compact.render("  "), None);
        assert_eq!(compact.render("{\"not\":\"a flow\"}"), None);
        let json = Printer::new(Output::Json);
        assert_eq!(json.render(flow).as_deref(), Some(flow));
        assert_eq!(json.render(""), None);
    }

    #[test]
    fn error_bodies_become_one_readable_line() {
        assert_eq!(
            one_line("flow query parameter port:\n  \"x\" is not a port\n"),
            "flow query parameter port: \"x\" is not a port"
        );
        assert_eq!(one_line(&"y".repeat(400)).chars().count(), 303);
    }
}
