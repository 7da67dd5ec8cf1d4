//! Naming kernel events: a conntrack event becomes one flow per end that is a pod of this
//! node (leaving it: egress; reaching it: ingress), a dropped packet one dropped flow. Both
//! ends are named from the [`Directory`]; the policies behind the verdict come from the
//! reference evaluator on the node's own inputs (the kernel gave the verdict, the evaluator,
//! held equal to the compiled ruleset by tests, names the rules), cached per connection.
//! Pure.

use std::collections::HashMap;
use std::sync::Arc;

use trellis_core::cluster::Protocol;
use trellis_core::flow::kernel::{
    ConntrackEvent, ConntrackEventKind, DropPoint, KernelEvent, PacketDrop, Tuple,
};
use trellis_core::flow::{
    DropReason, Flow, FlowEvent, Icmp, Ip, L4, L4Protocol, PolicyRef, TcpFlags, TrafficDirection,
    Verdict,
};
use trellis_core::policy::PolicyKey;
use trellis_core::policy::evaluate::{Connection, DirectionVerdict, Mesh};
use trellis_core::policy::ruleset::Direction;

use super::directory::{Directory, Known};

/// The most connections whose policies are remembered; the cache starts again when full.
pub const POLICY_CACHE_ENTRIES: usize = 16_384;

/// The policies behind one connection, each way.
#[derive(Debug, Default)]
pub struct PolicyNames {
    pub egress: Named,
    pub ingress: Named,
}

/// One direction: the rules that allowed it, or the policies that isolate the pod.
#[derive(Debug, Default)]
pub struct Named {
    pub allowed_by: Vec<PolicyRef>,
    pub denied_by: Vec<PolicyRef>,
}

/// Decisions per connection, for the directory's inputs (a new directory starts empty).
#[derive(Debug, Default)]
pub struct PolicyCache {
    entries: HashMap<Connection, Arc<PolicyNames>>,
}

impl PolicyCache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn policy_ref(cluster: &str, key: &PolicyKey, rule: Option<usize>) -> PolicyRef {
    PolicyRef {
        cluster: cluster.to_owned(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        rule,
    }
}

fn named(cluster: &str, verdict: &DirectionVerdict) -> Named {
    match verdict {
        DirectionVerdict::NotIsolated => Named::default(),
        DirectionVerdict::Allowed { by } => Named {
            allowed_by: by
                .iter()
                .map(|(key, rule)| policy_ref(cluster, key, Some(*rule)))
                .collect(),
            denied_by: Vec::new(),
        },
        DirectionVerdict::Denied { isolated_by } => Named {
            allowed_by: Vec::new(),
            denied_by: isolated_by
                .iter()
                .map(|key| policy_ref(cluster, key, None))
                .collect(),
        },
    }
}

fn policy_protocol(protocol: L4Protocol) -> Option<Protocol> {
    match protocol {
        L4Protocol::Tcp => Some(Protocol::Tcp),
        L4Protocol::Udp => Some(Protocol::Udp),
        L4Protocol::Sctp => Some(Protocol::Sctp),
        _ => None,
    }
}

/// The policies behind `connection` (none without policy inputs).
fn policies(dir: &Directory, connection: Connection) -> Option<Arc<PolicyNames>> {
    let inputs = dir.inputs()?;
    let mut cache = dir
        .policy_cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(hit) = cache.entries.get(&connection) {
        return Some(hit.clone());
    }
    let decision = Mesh::new(std::slice::from_ref(inputs)).decide(&connection);
    let cluster = inputs.cluster.as_str();
    let names = Arc::new(PolicyNames {
        egress: named(cluster, &decision.egress),
        ingress: named(cluster, &decision.ingress),
    });
    if cache.entries.len() >= POLICY_CACHE_ENTRIES {
        cache.entries.clear();
    }
    cache.entries.insert(connection, names.clone());
    Some(names)
}

fn ports(protocol: L4Protocol, source: u16, destination: u16) -> (Option<u16>, Option<u16>) {
    match protocol {
        L4Protocol::Tcp | L4Protocol::Udp | L4Protocol::Sctp => (Some(source), Some(destination)),
        _ => (None, None),
    }
}

/// The flows a kernel event stands for.
pub fn enrich(event: &KernelEvent, dir: &Directory) -> Vec<Flow> {
    match event {
        KernelEvent::Conntrack(event) => connection_flows(event, dir),
        KernelEvent::Drop(drop) => vec![drop_flow(drop, dir)],
    }
}

/// Which ends of a connection are this node's pods: (source, destination).
fn local_ends(dir: &Directory, source: &mut Known, destination: &mut Known) -> (bool, bool) {
    if dir.knows_local_pods() {
        return (source.local, destination.local);
    }
    // Without the node's pods, the local end is the one not reached through the mesh (and not
    // a node): a connection with no end in the mesh cannot be told apart from the node's own.
    let maybe_local =
        |k: &Known| !k.remote && k.endpoint.kind != trellis_core::flow::EndpointKind::Node;
    match (maybe_local(source), maybe_local(destination)) {
        (true, false) => {
            *source = dir.unnamed_local();
            (true, false)
        }
        (false, true) => {
            *destination = dir.unnamed_local();
            (false, true)
        }
        _ => (false, false),
    }
}

fn connection_flows(event: &ConntrackEvent, dir: &Directory) -> Vec<Flow> {
    // After DNAT the real destination is where the answer comes from.
    let source = event.original.source;
    let destination = event.reply.source;
    let protocol = event.original.protocol;
    let (source_port, destination_port) = ports(
        protocol,
        event.original.source_port,
        event.reply.source_port,
    );
    let mut from = dir.lookup(source);
    let mut to = dir.lookup(destination);
    let (from_local, to_local) = local_ends(dir, &mut from, &mut to);
    if !from_local && !to_local {
        return Vec::new();
    }
    let (flow_event, tcp_flags, counters) = match event.kind {
        ConntrackEventKind::New => (
            FlowEvent::ConnectionNew,
            (protocol == L4Protocol::Tcp).then(|| TcpFlags::from_byte(0x02)),
            None,
        ),
        ConntrackEventKind::Destroy => (FlowEvent::ConnectionClosed, None, event.counters),
    };
    let names = policies(
        dir,
        Connection {
            source,
            destination,
            protocol: policy_protocol(protocol),
            port: event.reply.source_port,
        },
    );
    let mut flows = Vec::with_capacity(usize::from(from_local) + usize::from(to_local));
    for (local, direction, remote) in [
        (from_local, TrafficDirection::Egress, &to),
        (to_local, TrafficDirection::Ingress, &from),
    ] {
        if !local {
            continue;
        }
        let allowed_by = names.as_ref().map_or_else(Vec::new, |n| match direction {
            TrafficDirection::Egress => n.egress.allowed_by.clone(),
            TrafficDirection::Ingress => n.ingress.allowed_by.clone(),
        });
        flows.push(Flow {
            time: event.time,
            node_name: dir.node_name().to_owned(),
            verdict: Verdict::Forwarded,
            drop_reason: None,
            event: flow_event,
            ip: Ip {
                source,
                destination,
                encrypted: remote.path.encrypted,
            },
            l4: L4 {
                protocol,
                source_port,
                destination_port,
                tcp_flags,
                icmp: None,
            },
            source: from.endpoint.clone(),
            destination: to.endpoint.clone(),
            traffic_direction: direction,
            allowed_by,
            denied_by: Vec::new(),
            tunnel: remote.path.tunnel.clone(),
            counters,
        });
    }
    flows
}

fn drop_flow(drop: &PacketDrop, dir: &Directory) -> Flow {
    let Tuple {
        source,
        destination,
        protocol,
        source_port,
        destination_port,
    } = drop.packet;
    let from = dir.lookup(source);
    let to = dir.lookup(destination);
    // The chain that dropped it says the direction: the ingress chain guards the packet's
    // destination (the local end), the egress chain its source.
    let (direction, reason) = match &drop.point {
        DropPoint::PodChain { direction, .. } | DropPoint::Isolated { direction } => {
            (*direction, DropReason::PolicyDenied)
        }
        DropPoint::UnknownPod { direction } => (*direction, DropReason::UnknownPod),
    };
    let direction = match direction {
        Direction::Ingress => TrafficDirection::Ingress,
        Direction::Egress => TrafficDirection::Egress,
    };
    let denied_by = match reason {
        DropReason::PolicyDenied => policies(
            dir,
            Connection {
                source,
                destination,
                protocol: policy_protocol(protocol),
                port: destination_port,
            },
        )
        .map_or_else(Vec::new, |n| match direction {
            TrafficDirection::Egress => n.egress.denied_by.clone(),
            TrafficDirection::Ingress => n.ingress.denied_by.clone(),
        }),
        DropReason::UnknownPod => Vec::new(),
    };
    let remote = match direction {
        TrafficDirection::Egress => &to,
        TrafficDirection::Ingress => &from,
    };
    let (source_port, destination_port) = ports(protocol, source_port, destination_port);
    Flow {
        time: drop.time,
        node_name: dir.node_name().to_owned(),
        verdict: Verdict::Dropped,
        drop_reason: Some(reason),
        event: FlowEvent::PacketDropped,
        ip: Ip {
            source,
            destination,
            encrypted: remote.path.encrypted,
        },
        l4: L4 {
            protocol,
            source_port,
            destination_port,
            tcp_flags: drop.tcp_flags,
            icmp: drop.icmp.map(|(kind, code)| Icmp { kind, code }),
        },
        source: from.endpoint.clone(),
        destination: to.endpoint.clone(),
        traffic_direction: direction,
        allowed_by: Vec::new(),
        denied_by,
        tunnel: remote.path.tunnel.clone(),
        counters: None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use trellis_core::flow::{Counters, EndpointKind, Tunnel};
    use trellis_core::policy::{
        LabelSelector, NetworkPolicy, PolicyPeer, PolicyPort, PolicyRule, PortSpec,
    };

    use super::super::directory::Directory;
    use super::super::directory::tests::{directory, identity, inputs, plan};
    use super::*;

    fn tuple(source: &str, sport: u16, destination: &str, dport: u16) -> Tuple {
        Tuple {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            protocol: L4Protocol::Tcp,
            source_port: sport,
            destination_port: dport,
        }
    }

    /// A connection from `source` to `destination`, answered by `answerer` (the destination
    /// unless DNAT'd).
    fn conntrack(
        kind: ConntrackEventKind,
        source: &str,
        destination: &str,
        answerer: &str,
    ) -> KernelEvent {
        KernelEvent::Conntrack(ConntrackEvent {
            time: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            kind,
            original: tuple(source, 41234, destination, 80),
            // A Service's backend answers on its own port.
            reply: tuple(
                answerer,
                if answerer == destination { 80 } else { 8080 },
                source,
                41234,
            ),
            counters: (kind == ConntrackEventKind::Destroy).then_some(Counters {
                packets_sent: 5,
                bytes_sent: 400,
                packets_received: 4,
                bytes_received: 3000,
            }),
        })
    }

    fn new(source: &str, destination: &str) -> KernelEvent {
        conntrack(ConntrackEventKind::New, source, destination, destination)
    }

    fn dropped(point: DropPoint, source: &str, destination: &str, port: u16) -> KernelEvent {
        KernelEvent::Drop(PacketDrop {
            time: UNIX_EPOCH + Duration::from_secs(1_800_000_001),
            point,
            packet: tuple(source, 41000, destination, port),
            tcp_flags: Some(TcpFlags::from_byte(0x02)),
            icmp: None,
        })
    }

    fn policy_ref(name: &str, rule: Option<usize>) -> PolicyRef {
        PolicyRef {
            cluster: "c1".into(),
            namespace: "x".into(),
            name: name.into(),
            rule,
        }
    }

    /// x/local-web (app=web) admits app=client on port 80 only (rule 1; rule 0 admits
    /// app=nobody).
    fn with_policy() -> Directory {
        let mut inputs = inputs();
        let selector = |app: &str| LabelSelector {
            match_labels: [("app".to_string(), app.to_string())].into(),
            match_expressions: vec![],
        };
        let from = |app: &str, port: u16| PolicyRule {
            peers: vec![PolicyPeer::Pods {
                namespace_selector: None,
                pod_selector: Some(selector(app)),
            }],
            ports: vec![PolicyPort {
                protocol: Protocol::Tcp,
                port: Some(PortSpec::Number(port)),
                end_port: None,
            }],
        };
        let policy = NetworkPolicy {
            namespace: "x".into(),
            name: "web-from-client".into(),
            pod_selector: selector("web"),
            ingress: Some(vec![from("nobody", 80), from("client", 80)]),
            egress: None,
        };
        inputs.policies.insert(policy.key(), policy);
        Directory::build(&identity(), &plan(), Some(Arc::new(inputs)))
    }

    #[test]
    fn a_local_pod_opening_a_connection_is_one_egress_flow_named_at_both_ends() {
        let flows = enrich(&new("10.1.1.5", "10.2.1.9"), &directory());
        assert_eq!(flows.len(), 1);
        let f = &flows[0];
        assert_eq!(f.traffic_direction, TrafficDirection::Egress);
        assert_eq!(f.verdict, Verdict::Forwarded);
        assert_eq!(f.event, FlowEvent::ConnectionNew);
        assert_eq!(f.node_name, "c1/n1");
        assert_eq!(f.source.display_name(), "c1/x/client");
        assert_eq!(f.destination.display_name(), "c2/z/api");
        assert_eq!(f.l4.source_port, Some(41234));
        assert_eq!(f.l4.tcp_flags.unwrap().to_string(), "SYN");
        assert!(f.ip.encrypted, "c2's pods are behind the tunnel");
        assert_eq!(
            f.tunnel,
            Some(Tunnel {
                peer_cluster: "c2".into(),
                peer_node: "m1".into()
            })
        );
        assert!(f.allowed_by.is_empty() && f.denied_by.is_empty());
    }

    #[test]
    fn a_remote_pod_reaching_a_local_one_is_one_ingress_flow_through_its_peer() {
        let closed = conntrack(
            ConntrackEventKind::Destroy,
            "10.1.2.7",
            "10.1.1.6",
            "10.1.1.6",
        );
        let flows = enrich(&closed, &directory());
        assert_eq!(flows.len(), 1);
        let f = &flows[0];
        assert_eq!(f.traffic_direction, TrafficDirection::Ingress);
        assert_eq!(f.event, FlowEvent::ConnectionClosed);
        assert_eq!(f.counters.unwrap().bytes_received, 3000);
        assert_eq!(f.l4.tcp_flags, None, "no packet's flags on a close");
        assert_eq!(f.source.display_name(), "c1/y/web");
        assert_eq!(f.tunnel.as_ref().unwrap().peer_node, "n2");
        assert!(f.ip.encrypted);
    }

    #[test]
    fn two_local_pods_make_two_flows_and_no_local_pod_none() {
        let flows = enrich(&new("10.1.1.5", "10.1.1.6"), &directory());
        let directions: Vec<_> = flows.iter().map(|f| f.traffic_direction).collect();
        assert_eq!(
            directions,
            [TrafficDirection::Egress, TrafficDirection::Ingress]
        );
        assert!(flows.iter().all(|f| !f.ip.encrypted && f.tunnel.is_none()));
        assert!(
            Arc::ptr_eq(&flows[0].source, &flows[1].source),
            "one pod's name is shared, not copied"
        );
        assert!(enrich(&new("10.1.2.7", "10.2.1.9"), &directory()).is_empty());
        assert!(enrich(&new("198.18.0.1", "1.1.1.1"), &directory()).is_empty());
    }

    #[test]
    fn a_service_address_is_shown_as_the_backend_it_was_translated_to() {
        let via_service = conntrack(
            ConntrackEventKind::New,
            "10.1.1.5",
            "10.96.0.10",
            "10.1.2.7",
        );
        let flows = enrich(&via_service, &directory());
        assert_eq!(flows.len(), 1);
        let f = &flows[0];
        assert_eq!(
            f.ip.destination,
            "10.1.2.7".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(f.destination.display_name(), "c1/y/web");
        assert_eq!(f.l4.destination_port, Some(8080), "the backend's port");
        assert!(f.ip.encrypted, "n2 is behind the tunnel");
    }

    #[test]
    fn a_plainly_routed_peer_is_not_encrypted() {
        let flows = enrich(&new("10.1.1.5", "10.1.3.4"), &directory());
        assert!(!flows[0].ip.encrypted);
        assert_eq!(flows[0].tunnel, None);
    }

    #[test]
    fn allowed_flows_name_the_rule_that_allowed_them() {
        let dir = with_policy();
        let flows = enrich(&new("10.1.1.5", "10.1.1.6"), &dir);
        assert_eq!(flows.len(), 2);
        assert!(flows[0].allowed_by.is_empty(), "egress is not isolated");
        assert_eq!(
            flows[1].allowed_by,
            [policy_ref("web-from-client", Some(1))]
        );
        assert_eq!(dir.policy_cache.lock().unwrap().len(), 1);
        enrich(&new("10.1.1.5", "10.1.1.6"), &dir);
        assert_eq!(dir.policy_cache.lock().unwrap().len(), 1, "decided once");
    }

    #[test]
    fn a_dropped_packet_names_the_policy_that_denied_it() {
        let dir = with_policy();
        let point = DropPoint::PodChain {
            direction: Direction::Ingress,
            chain: "pod-x".into(),
        };
        let flow = enrich(&dropped(point, "10.1.1.5", "10.1.1.6", 443), &dir).remove(0);
        assert_eq!(flow.verdict, Verdict::Dropped);
        assert_eq!(flow.drop_reason, Some(DropReason::PolicyDenied));
        assert_eq!(flow.event, FlowEvent::PacketDropped);
        assert_eq!(flow.traffic_direction, TrafficDirection::Ingress);
        assert_eq!(flow.denied_by, [policy_ref("web-from-client", None)]);
        assert_eq!(flow.source.display_name(), "c1/x/client");
        assert_eq!(flow.destination.display_name(), "c1/x/local-web");
        assert_eq!(flow.l4.destination_port, Some(443));
        assert!(flow.l4.tcp_flags.unwrap().syn);
        // From a peer cluster's pod, the isolated-pod backstop: through its tunnel.
        let flow = enrich(
            &dropped(
                DropPoint::Isolated {
                    direction: Direction::Ingress,
                },
                "10.2.1.9",
                "10.1.1.6",
                80,
            ),
            &dir,
        )
        .remove(0);
        assert_eq!(flow.denied_by, [policy_ref("web-from-client", None)]);
        assert!(flow.ip.encrypted);
        assert_eq!(flow.tunnel.unwrap().peer_cluster, "c2");
    }

    #[test]
    fn a_drop_at_an_unknown_pod_and_icmp() {
        let dir = with_policy();
        let egress = DropPoint::UnknownPod {
            direction: Direction::Egress,
        };
        let mut event = dropped(egress, "10.1.1.77", "10.2.1.9", 80);
        if let KernelEvent::Drop(drop) = &mut event {
            drop.packet.protocol = L4Protocol::Icmpv4;
            drop.tcp_flags = None;
            drop.icmp = Some((8, 0));
        }
        let flow = enrich(&event, &dir).remove(0);
        assert_eq!(flow.drop_reason, Some(DropReason::UnknownPod));
        assert_eq!(flow.traffic_direction, TrafficDirection::Egress);
        assert_eq!(flow.source.kind, EndpointKind::World);
        assert!(flow.denied_by.is_empty());
        assert_eq!(flow.l4.icmp, Some(Icmp { kind: 8, code: 0 }));
        assert_eq!(flow.l4.source_port, None);
        // Going out to a peer cluster's pod: through its tunnel.
        assert!(flow.ip.encrypted);
        assert_eq!(flow.tunnel.unwrap().peer_cluster, "c2");
    }

    #[test]
    fn a_drop_reaching_an_unknown_pod_is_ingress_whoever_sent_it() {
        let dir = with_policy();
        let ingress = DropPoint::UnknownPod {
            direction: Direction::Ingress,
        };
        // A peer cluster's pod connects to a pod wired before the node was told of it: the
        // ingress chain drops it. The local end is the destination; the remote one, and the
        // tunnel it came through, the source.
        let flow = enrich(&dropped(ingress.clone(), "10.2.1.9", "10.1.1.77", 80), &dir).remove(0);
        assert_eq!(flow.drop_reason, Some(DropReason::UnknownPod));
        assert_eq!(flow.traffic_direction, TrafficDirection::Ingress);
        assert_eq!(flow.source.display_name(), "c2/z/api");
        assert!(flow.ip.encrypted, "it came through the tunnel");
        assert_eq!(flow.tunnel.unwrap().peer_cluster, "c2");
        // From a known local pod, too.
        let flow = enrich(&dropped(ingress, "10.1.1.5", "10.1.1.77", 80), &dir).remove(0);
        assert_eq!(flow.traffic_direction, TrafficDirection::Ingress);
        assert!(!flow.ip.encrypted);
        assert!(flow.tunnel.is_none());
    }

    #[test]
    fn without_policy_inputs_the_end_outside_the_mesh_is_taken_as_local() {
        let dir = Directory::build(&identity(), &plan(), None);
        let flows = enrich(&new("10.1.1.5", "10.2.1.9"), &dir);
        assert_eq!(flows.len(), 1);
        let f = &flows[0];
        assert_eq!(f.traffic_direction, TrafficDirection::Egress);
        assert_eq!(f.source.display_name(), "c1/n1");
        assert_eq!(f.destination.display_name(), "c2/m1");
        assert!(f.ip.encrypted);
        let flows = enrich(&new("10.1.2.7", "10.1.1.5"), &dir);
        assert_eq!(flows[0].traffic_direction, TrafficDirection::Ingress);
        assert!(
            enrich(&new("10.1.1.5", "1.1.1.1"), &dir).is_empty(),
            "no end in the mesh"
        );
    }

    #[test]
    fn the_policy_cache_is_bounded() {
        let dir = with_policy();
        for port in 0..(POLICY_CACHE_ENTRIES as u16 + 10) {
            let mut event = new("10.1.1.5", "10.1.1.6");
            if let KernelEvent::Conntrack(c) = &mut event {
                c.reply.source_port = port;
            }
            enrich(&event, &dir);
        }
        assert!(dir.policy_cache.lock().unwrap().len() <= POLICY_CACHE_ENTRIES);
    }
}
