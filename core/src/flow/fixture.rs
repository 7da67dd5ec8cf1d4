//! Small builders of flows for tests across the workspace.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::model::*;

/// A pod end `cluster/namespace/name` on its cluster's `<cluster>-node-0`, labelled
/// `app: <name>`.
pub fn pod(path: &str) -> Arc<Endpoint> {
    let mut parts = path.splitn(3, '/');
    let (cluster, namespace, name) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    Arc::new(Endpoint {
        kind: EndpointKind::Pod,
        cluster: Some(cluster.into()),
        namespace: Some(namespace.into()),
        pod_name: Some(name.into()),
        node_name: Some(format!("{cluster}-node-0")),
        labels: [("app".to_owned(), name.to_owned())].into(),
        identity: Some(7),
    })
}

/// A TCP connection opened (its SYN forwarded) `second` seconds after `base` from `from` to
/// `to` (`cluster/namespace/pod`) on port 80, seen leaving on `node`.
pub fn connection(base: u64, second: u64, node: &str, from: &str, to: &str) -> Flow {
    Flow {
        time: UNIX_EPOCH + Duration::from_secs(base + second),
        node_name: node.into(),
        verdict: Verdict::Forwarded,
        drop_reason: None,
        event: FlowEvent::ConnectionNew,
        ip: Ip {
            source: "10.1.0.5".parse().expect("an address"),
            destination: "10.2.0.7".parse().expect("an address"),
            encrypted: false,
        },
        l4: L4 {
            protocol: L4Protocol::Tcp,
            source_port: Some(40000),
            destination_port: Some(80),
            tcp_flags: Some(TcpFlags::from_byte(0x02)),
            icmp: None,
        },
        source: pod(from),
        destination: pod(to),
        traffic_direction: TrafficDirection::Egress,
        allowed_by: Vec::new(),
        denied_by: Vec::new(),
        tunnel: None,
        counters: None,
    }
}
