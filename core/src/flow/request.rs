//! What a reader asks for: Hubble's filters (`hubble observe`), the last N, a time window,
//! and whether to follow; as a query string (`/flows?namespace=x&verdict=DROPPED&follow=1`)
//! and as the agent frames' JSON.
//!
//! Semantics, Hubble's: values of one filter are alternatives (any matches), different
//! filters must all match; `namespace`, `pod`, `cluster`, `label` and `port` match either end.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::model::{Endpoint, Flow, TrafficDirection, Verdict};

/// Flows a request selects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace: Vec<String>,
    /// `[cluster/][namespace/]prefix` of a pod's name at either end (namespace `default`
    /// when not given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_pod: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_pod: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<String>,
    /// Equality-based selectors (`k=v,k2!=v2,k3`) on either end's labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdict: Vec<Verdict>,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocol: Vec<String>,
    /// Either end's port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port: Vec<u16>,
    /// The observing node: `<cluster>/<node>` or `<node>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic_direction: Vec<TrafficDirection>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_rfc3339"
    )]
    pub since: Option<SystemTime>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_rfc3339"
    )]
    pub until: Option<SystemTime>,
}

/// A reader's request: which flows, how many of the recorded ones, and whether to go on with
/// new ones as they come.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRequest {
    #[serde(default)]
    pub filter: FlowFilter,
    /// The last N recorded flows that match (all recorded when `None`). Following without it
    /// shows none of the recorded ones, as `hubble observe --follow` does, unless a window
    /// start (`since`) asks for them: see [`FlowRequest::wants_history`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
    /// Peer clusters whose controllers are asked too, over peering (`*`: every peer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown flow query parameter {0:?}")]
    UnknownParameter(String),
    #[error("flow query parameter {name}: {reason}")]
    BadValue { name: String, reason: String },
}

impl FlowRequest {
    /// Whether recorded flows are answered before (or instead of) new ones: always without
    /// `follow`; with it, only when `last` or `since` asks for them (`hubble observe -f`
    /// alone shows only new flows, `--since 10m -f` the window first).
    pub fn wants_history(&self) -> bool {
        !self.follow || self.last.is_some() || self.filter.since.is_some()
    }

    /// The query string (without `?`), parameters named like `trellis observe`'s flags.
    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        let f = &self.filter;
        for (name, values) in [
            ("namespace", &f.namespace),
            ("pod", &f.pod),
            ("from-pod", &f.from_pod),
            ("to-pod", &f.to_pod),
            ("cluster", &f.cluster),
            ("label", &f.label),
            ("protocol", &f.protocol),
            ("node", &f.node),
            ("peer", &self.peers),
        ] {
            for v in values {
                q.append_pair(name, v);
            }
        }
        for v in &f.verdict {
            q.append_pair("verdict", v.as_str());
        }
        for p in &f.port {
            q.append_pair("port", &p.to_string());
        }
        for d in &f.traffic_direction {
            q.append_pair("traffic-direction", d.as_str());
        }
        if let Some(t) = f.since {
            q.append_pair("since", &humantime::format_rfc3339_nanos(t).to_string());
        }
        if let Some(t) = f.until {
            q.append_pair("until", &humantime::format_rfc3339_nanos(t).to_string());
        }
        if let Some(n) = self.last {
            q.append_pair("last", &n.to_string());
        }
        if self.follow {
            q.append_pair("follow", "true");
        }
        q.finish()
    }

    /// Parses [`FlowRequest::to_query`]'s form (unknown parameters and bad values refused).
    pub fn from_query(query: &str) -> Result<Self, RequestError> {
        let mut request = FlowRequest::default();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let bad = |reason: String| RequestError::BadValue {
                name: name.to_string(),
                reason,
            };
            let f = &mut request.filter;
            let value = value.into_owned();
            match name.as_ref() {
                "namespace" => f.namespace.push(value),
                "pod" => f.pod.push(value),
                "from-pod" => f.from_pod.push(value),
                "to-pod" => f.to_pod.push(value),
                "cluster" => f.cluster.push(value),
                "label" => {
                    parse_selector(&value).map_err(bad)?;
                    f.label.push(value)
                }
                "protocol" => {
                    let lower = value.to_ascii_lowercase();
                    if !["tcp", "udp", "sctp", "icmp", "icmpv6"].contains(&lower.as_str()) {
                        return Err(bad(format!(
                            "{value:?} is not tcp, udp, sctp, icmp or icmpv6"
                        )));
                    }
                    f.protocol.push(lower)
                }
                "node" => f.node.push(value),
                "peer" => request.peers.push(value),
                "verdict" => f.verdict.push(value.parse().map_err(bad)?),
                "port" => f.port.push(
                    value
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a port")))?,
                ),
                "traffic-direction" => {
                    f.traffic_direction
                        .push(match value.to_ascii_uppercase().as_str() {
                            "INGRESS" => TrafficDirection::Ingress,
                            "EGRESS" => TrafficDirection::Egress,
                            _ => return Err(bad(format!("{value:?} is not INGRESS or EGRESS"))),
                        })
                }
                "since" => f.since = Some(parse_time(&value).map_err(bad)?),
                "until" => f.until = Some(parse_time(&value).map_err(bad)?),
                "last" => {
                    request.last = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("{value:?} is not a count")))?,
                    )
                }
                "follow" => {
                    request.follow = match value.as_str() {
                        "" | "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err(bad(format!("{value:?} is not true or false"))),
                    }
                }
                other => return Err(RequestError::UnknownParameter(other.to_owned())),
            }
        }
        Ok(request)
    }
}

fn parse_time(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text).map_err(|e| format!("{text:?}: {e}"))
}

/// One requirement of an equality-based selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated (all must hold).
fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    text.split(',')
        .map(str::trim)
        .map(|part| {
            let requirement = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            match &requirement {
                Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _)
                | Requirement::Exists(k)
                | Requirement::NotExists(k)
                    if k.is_empty() =>
                {
                    Err(format!("{text:?}: a requirement without a key"))
                }
                _ => Ok(requirement),
            }
        })
        .collect()
}

fn selector_matches(requirements: &[Requirement], labels: &BTreeMap<String, String>) -> bool {
    requirements.iter().all(|r| match r {
        Requirement::Equals(k, v) => labels.get(k) == Some(v),
        Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
        Requirement::Exists(k) => labels.contains_key(k),
        Requirement::NotExists(k) => !labels.contains_key(k),
    })
}

/// `[cluster/][namespace/]prefix` against a pod end.
fn pod_matches(pattern: &str, end: &Endpoint) -> bool {
    let (Some(namespace), Some(pod)) = (&end.namespace, &end.pod_name) else {
        return false;
    };
    let parts: Vec<&str> = pattern.splitn(3, '/').collect();
    let (cluster, ns, prefix) = match parts.as_slice() {
        [prefix] => (None, "default", *prefix),
        [ns, prefix] => (None, *ns, *prefix),
        [cluster, ns, prefix] => (Some(*cluster), *ns, *prefix),
        _ => return false,
    };
    cluster.is_none_or(|c| end.cluster.as_deref() == Some(c))
        && namespace == ns
        && pod.starts_with(prefix)
}

fn any_or_empty<T>(values: &[T], test: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(test)
}

impl FlowFilter {
    /// Whether `flow` passes every filter given.
    pub fn matches(&self, flow: &Flow) -> bool {
        let ends = [&*flow.source, &*flow.destination];
        let in_window =
            self.since.is_none_or(|t| flow.time >= t) && self.until.is_none_or(|t| flow.time <= t);
        in_window
            && any_or_empty(&self.namespace, |ns| {
                ends.iter().any(|e| e.namespace.as_deref() == Some(ns))
            })
            && any_or_empty(&self.pod, |p| ends.iter().any(|e| pod_matches(p, e)))
            && any_or_empty(&self.from_pod, |p| pod_matches(p, &flow.source))
            && any_or_empty(&self.to_pod, |p| pod_matches(p, &flow.destination))
            && any_or_empty(&self.cluster, |c| {
                ends.iter().any(|e| e.cluster.as_deref() == Some(c))
            })
            && any_or_empty(&self.label, |selector| {
                parse_selector(selector)
                    .is_ok_and(|rs| ends.iter().any(|e| selector_matches(&rs, &e.labels)))
            })
            && any_or_empty(&self.verdict, |v| flow.verdict == *v)
            && any_or_empty(&self.protocol, |p| flow.l4.protocol.name() == *p)
            && any_or_empty(&self.port, |p| {
                flow.l4.source_port == Some(*p) || flow.l4.destination_port == Some(*p)
            })
            && any_or_empty(&self.node, |n| {
                flow.node_name == *n
                    || flow
                        .node_name
                        .split_once('/')
                        .is_some_and(|(_, node)| node == n)
            })
            && any_or_empty(&self.traffic_direction, |d| flow.traffic_direction == *d)
    }
}

mod optional_rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match time {
            Some(t) => s.collect_str(&humantime::format_rfc3339_nanos(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::flow::model::*;

    fn pod(cluster: &str, ns: &str, name: &str, labels: &[(&str, &str)]) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            kind: EndpointKind::Pod,
            cluster: Some(cluster.into()),
            namespace: Some(ns.into()),
            pod_name: Some(name.into()),
            node_name: Some(format!("{cluster}-node-0")),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            identity: Some(1),
        })
    }

    pub(crate) fn flow() -> Flow {
        Flow {
            time: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            node_name: "c1/c1-node-0".into(),
            verdict: Verdict::Dropped,
            drop_reason: Some(DropReason::PolicyDenied),
            event: FlowEvent::PacketDropped,
            ip: Ip {
                source: "10.1.0.5".parse().unwrap(),
                destination: "10.2.0.7".parse().unwrap(),
                encrypted: true,
            },
            l4: L4 {
                protocol: L4Protocol::Tcp,
                source_port: Some(41234),
                destination_port: Some(80),
                tcp_flags: Some(TcpFlags::from_byte(0x02)),
                icmp: None,
            },
            source: pod("c1", "x", "client-1", &[("app", "client")]),
            destination: pod("c2", "y", "server-0", &[("app", "web"), ("tier", "front")]),
            traffic_direction: TrafficDirection::Egress,
            allowed_by: Vec::new(),
            denied_by: vec![PolicyRef {
                cluster: "c1".into(),
                namespace: "x".into(),
                name: "deny-all".into(),
                rule: None,
            }],
            tunnel: Some(Tunnel {
                peer_cluster: "c2".into(),
                peer_node: "c2-node-0".into(),
            }),
            counters: None,
        }
    }

    fn matches(query: &str) -> bool {
        FlowRequest::from_query(query)
            .unwrap()
            .filter
            .matches(&flow())
    }

    #[test]
    fn filters_match_like_hubbles() {
        assert!(matches(""), "no filter passes everything");
        assert!(matches("namespace=y"), "either end's namespace");
        assert!(
            matches("namespace=nope&namespace=x"),
            "values are alternatives"
        );
        assert!(
            !matches("namespace=x&verdict=FORWARDED"),
            "filters all hold"
        );
        assert!(matches("pod=x/client"), "a prefix in a namespace");
        assert!(matches("pod=c2/y/server-0"), "with the cluster");
        assert!(!matches("pod=c1/y/server"), "the wrong cluster");
        assert!(!matches("pod=client"), "without a namespace: default");
        assert!(matches("from-pod=x/cl&to-pod=y/se"));
        assert!(!matches("from-pod=y/se"), "the server is not the source");
        assert!(matches("cluster=c2"));
        assert!(
            matches("label=app%3Dweb%2Ctier%3Dfront"),
            "all of a selector"
        );
        assert!(!matches("label=app%3Dweb%2Ctier%3Dback"));
        assert!(matches("label=app%21%3Dnone"), "!=");
        assert!(matches("label=tier"), "exists");
        assert!(matches("verdict=dropped&protocol=TCP&port=80&port=443"));
        assert!(matches("port=41234"), "either port");
        assert!(!matches("protocol=udp"));
        assert!(matches("node=c1-node-0") && matches("node=c1/c1-node-0"));
        assert!(!matches("node=c2-node-0"));
        assert!(matches("traffic-direction=egress"));
        assert!(matches("since=2027-01-15T08:00:00Z"));
        assert!(!matches("since=2027-01-15T08:00:01Z"));
        assert!(!matches("until=2027-01-15T07:59:59Z"));
    }

    #[test]
    fn following_wants_history_only_when_a_count_or_a_window_start_asks() {
        let ask = |query: &str| FlowRequest::from_query(query).unwrap().wants_history();
        assert!(ask(""), "not following: the recorded flows");
        assert!(ask("last=5"));
        assert!(!ask("follow=true"), "as hubble observe -f: new flows only");
        assert!(ask("follow=true&last=5"));
        assert!(ask("follow=true&since=2027-01-15T08:00:00Z"));
    }

    #[test]
    fn queries_round_trip_and_bad_ones_are_refused() {
        let request = FlowRequest {
            filter: FlowFilter {
                namespace: vec!["a b".into()],
                label: vec!["app=web,tier!=x".into()],
                verdict: vec![Verdict::Dropped],
                port: vec![80],
                since: Some(UNIX_EPOCH + Duration::from_nanos(1_800_000_000_123_456_789)),
                traffic_direction: vec![TrafficDirection::Ingress],
                ..FlowFilter::default()
            },
            last: Some(20),
            follow: true,
            peers: vec!["*".into()],
        };
        assert_eq!(
            FlowRequest::from_query(&request.to_query()),
            Ok(request.clone())
        );
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(serde_json::from_str::<FlowRequest>(&json).unwrap(), request);
        for bad in [
            "verdict=MAYBE",
            "port=99999",
            "protocol=gre",
            "last=-1",
            "since=yesterday",
            "label=%3Dv",
            "follow=perhaps",
            "colour=blue",
        ] {
            assert!(FlowRequest::from_query(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flows_round_trip_as_json_with_hubbles_names() {
        let f = flow();
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["verdict"], "DROPPED");
        assert_eq!(json["drop_reason"], "POLICY_DENIED");
        assert_eq!(json["traffic_direction"], "EGRESS");
        assert_eq!(json["l4"]["protocol"], "TCP");
        assert_eq!(json["l4"]["tcp_flags"]["SYN"], true);
        assert_eq!(json["time"], "2027-01-15T08:00:00.000000000Z");
        assert_eq!(json["destination"]["pod_name"], "server-0");
        assert_eq!(serde_json::from_value::<Flow>(json).unwrap(), f);
    }
}
