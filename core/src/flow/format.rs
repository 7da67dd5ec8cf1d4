//! One flow as one line, after `hubble observe`'s compact output: when, the observing node,
//! both ends, protocol, verdict and the policies behind it, then what else is worth a glance
//! (the direction, the tunnel, a closed connection's counters):
//!
//! `Dec  7 05:40:00.123 c1/c1-node-0: c1/x/a:41234 -> c2/y/b:80 tcp SYN FORWARDED
//! (x/allow-frontend) EGRESS encrypted via c2/c2-node-0`
//!
//! Times are UTC: the nodes of a mesh span time zones, and their lines are merged.

use std::net::{IpAddr, SocketAddr};

use super::model::{Counters, Endpoint, Flow, FlowEvent, Icmp, L4Protocol, PolicyRef, Verdict};

/// The compact line of `flow` (no trailing newline).
pub fn compact(flow: &Flow) -> String {
    let (source_port, destination_port) = match flow.l4.protocol {
        // ICMP has no ports; its type and code follow the protocol instead.
        L4Protocol::Icmpv4 | L4Protocol::Icmpv6 => (None, None),
        _ => (flow.l4.source_port, flow.l4.destination_port),
    };
    let mut line = format!(
        "{} {}: {} -> {} {}",
        timestamp(flow.time),
        flow.node_name,
        end(&flow.source, flow.ip.source, source_port),
        end(&flow.destination, flow.ip.destination, destination_port),
        flow.l4.protocol.name(),
    );
    if let Some(icmp) = flow.l4.icmp {
        line.push(' ');
        line.push_str(&icmp_text(flow.l4.protocol, icmp));
    }
    if let Some(flags) = flow.l4.tcp_flags {
        let flags = flags.to_string();
        if !flags.is_empty() {
            line.push(' ');
            line.push_str(&flags);
        }
    }
    line.push(' ');
    line.push_str(flow.verdict.as_str());
    match flow.verdict {
        Verdict::Forwarded => {
            if !flow.allowed_by.is_empty() {
                line.push_str(&format!(" ({})", policies(&flow.allowed_by)));
            }
        }
        Verdict::Dropped => {
            if let Some(reason) = flow.drop_reason {
                line.push(' ');
                line.push_str(reason.as_str());
            }
            if !flow.denied_by.is_empty() {
                line.push_str(&format!(" (denied by {})", policies(&flow.denied_by)));
            }
        }
    }
    line.push(' ');
    line.push_str(flow.traffic_direction.as_str());
    if flow.ip.encrypted {
        line.push_str(" encrypted");
    }
    if let Some(tunnel) = &flow.tunnel {
        line.push_str(&format!(
            " via {}/{}",
            tunnel.peer_cluster, tunnel.peer_node
        ));
    }
    if flow.event == FlowEvent::ConnectionClosed {
        line.push_str(" closed");
        if let Some(counters) = flow.counters {
            line.push_str(": ");
            line.push_str(&counters_text(&counters));
        }
    }
    printable(&line)
}

/// `text` with every control character escaped (`\u{1b}`): names come from other clusters
/// and nodes, and a terminal must never take one for an escape sequence (clearing the
/// screen, rewriting earlier lines).
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `Dec  7 05:40:00.123` (Go's `time.StampMilli`, as Hubble prints it), in UTC.
fn timestamp(time: std::time::SystemTime) -> String {
    // `2026-12-07T05:40:00.123Z`: fixed positions, whatever the time.
    let rfc = humantime::format_rfc3339_millis(time).to_string();
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = rfc
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)));
    let day = rfc.get(8..10).and_then(|d| d.parse::<u8>().ok());
    match (month, day, rfc.get(11..23)) {
        (Some(month), Some(day), Some(clock)) => format!("{month} {day:>2} {clock}"),
        // Only a time past year 9999 has another shape; show it whole rather than guess.
        _ => rfc,
    }
}

/// `c1/x/a:41234` for a named end, `203.0.113.9:443 (world)` (`[2001:db8::1]:443 (world)`)
/// for one the mesh does not know: there the address is all there is to go by.
fn end(endpoint: &Endpoint, ip: IpAddr, port: Option<u16>) -> String {
    let name = endpoint.display_name();
    if name == "world" {
        match port {
            Some(port) => format!("{} (world)", SocketAddr::new(ip, port)),
            None => format!("{ip} (world)"),
        }
    } else {
        match port {
            Some(port) => format!("{name}:{port}"),
            None => name,
        }
    }
}

/// `echo-request (type 8 code 0)`, or `type 42 code 1` for a type without a common name.
fn icmp_text(protocol: L4Protocol, icmp: Icmp) -> String {
    let name = match (protocol, icmp.kind) {
        (L4Protocol::Icmpv4, 0) | (L4Protocol::Icmpv6, 129) => Some("echo-reply"),
        (L4Protocol::Icmpv4, 8) | (L4Protocol::Icmpv6, 128) => Some("echo-request"),
        (L4Protocol::Icmpv4, 3) | (L4Protocol::Icmpv6, 1) => Some("destination-unreachable"),
        (L4Protocol::Icmpv4, 11) | (L4Protocol::Icmpv6, 3) => Some("time-exceeded"),
        (L4Protocol::Icmpv6, 2) => Some("packet-too-big"),
        (L4Protocol::Icmpv6, 135) => Some("neighbor-solicitation"),
        (L4Protocol::Icmpv6, 136) => Some("neighbor-advertisement"),
        _ => None,
    };
    let numbers = format!("type {} code {}", icmp.kind, icmp.code);
    match name {
        Some(name) => format!("{name} ({numbers})"),
        None => numbers,
    }
}

/// `x/allow-frontend, y/allow-dns`: each policy once, in the order given (a policy can allow
/// by several of its rules).
fn policies(refs: &[PolicyRef]) -> String {
    let mut names: Vec<String> = Vec::new();
    for policy in refs {
        let name = policy.to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.join(", ")
}

/// `5 pkts 420 B -> / 4 pkts 1.2 KiB <-`: what the source sent, then what came back.
fn counters_text(counters: &Counters) -> String {
    format!(
        "{} {} -> / {} {} <-",
        packets(counters.packets_sent),
        bytes(counters.bytes_sent),
        packets(counters.packets_received),
        bytes(counters.bytes_received),
    )
}

fn packets(n: u64) -> String {
    if n == 1 {
        "1 pkt".into()
    } else {
        format!("{n} pkts")
    }
}

/// `420 B`, `1.2 KiB`, `3.0 MiB`: binary units with one decimal past bytes.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    // Display only: the rounding of a u64 to f64 is far below the one decimal shown.
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::flow::model::*;

    /// 2026-12-07T05:40:00.123Z
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_796_622_000_123)
    }

    fn pod(cluster: &str, ns: &str, name: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            kind: EndpointKind::Pod,
            cluster: Some(cluster.into()),
            namespace: Some(ns.into()),
            pod_name: Some(name.into()),
            node_name: Some(format!("{cluster}-node-0")),
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
            identity: Some(7),
        })
    }

    fn policy(ns: &str, name: &str, rule: Option<usize>) -> PolicyRef {
        PolicyRef {
            cluster: "c2".into(),
            namespace: ns.into(),
            name: name.into(),
            rule,
        }
    }

    fn tcp(flags: u8) -> L4 {
        L4 {
            protocol: L4Protocol::Tcp,
            source_port: Some(41234),
            destination_port: Some(80),
            tcp_flags: Some(TcpFlags::from_byte(flags)),
            icmp: None,
        }
    }

    /// c1/x/a opens a connection to c2/y/b:80, seen arriving on c2's node.
    fn forwarded() -> Flow {
        Flow {
            time: at(),
            node_name: "c2/c2-node-0".into(),
            verdict: Verdict::Forwarded,
            drop_reason: None,
            event: FlowEvent::ConnectionNew,
            ip: Ip {
                source: "10.1.0.5".parse().unwrap(),
                destination: "10.2.0.7".parse().unwrap(),
                encrypted: true,
            },
            l4: tcp(0x02),
            source: pod("c1", "x", "a"),
            destination: pod("c2", "y", "b"),
            traffic_direction: TrafficDirection::Ingress,
            allowed_by: vec![
                policy("y", "allow-frontend", Some(0)),
                policy("y", "allow-frontend", Some(2)),
                policy("y", "allow-monitoring", None),
            ],
            denied_by: Vec::new(),
            tunnel: Some(Tunnel {
                peer_cluster: "c1".into(),
                peer_node: "c1-node-0".into(),
            }),
            counters: None,
        }
    }

    #[test]
    fn a_forwarded_connection_names_its_policies_once_each_and_its_tunnel() {
        assert_eq!(
            compact(&forwarded()),
            "Dec  7 05:40:00.123 c2/c2-node-0: c1/x/a:41234 -> c2/y/b:80 tcp SYN FORWARDED \
             (y/allow-frontend, y/allow-monitoring) INGRESS encrypted via c1/c1-node-0"
        );
    }

    #[test]
    fn names_with_terminal_escapes_are_printed_escaped() {
        let hostile = |name: &str| {
            Arc::new(Endpoint {
                pod_name: Some(name.into()),
                namespace: Some(format!("ns{name}")),
                ..(*pod("c1", "x", "a")).clone()
            })
        };
        let flow = Flow {
            node_name: "c2/\x1b[2J".into(),
            source: hostile("a\x1b[2J\x1b]0;owned\x07"),
            destination: hostile("b\r\nDec  7 fake line"),
            tunnel: Some(Tunnel {
                peer_cluster: "c1\x1b[31m".into(),
                peer_node: "n\x00".into(),
            }),
            ..forwarded()
        };
        let line = compact(&flow);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("c2/\\u{1b}[2J:"), "{line}");
        assert!(line.contains("b\\u{d}\\u{a}Dec  7 fake line"), "{line}");
    }

    #[test]
    fn a_connection_of_an_unisolated_pod_inside_a_cluster_has_no_policy_part() {
        let flow = Flow {
            allowed_by: Vec::new(),
            tunnel: None,
            ip: Ip {
                encrypted: false,
                ..forwarded().ip
            },
            traffic_direction: TrafficDirection::Egress,
            time: UNIX_EPOCH + Duration::from_millis(1_800_000_000_007),
            ..forwarded()
        };
        assert_eq!(
            compact(&flow),
            "Jan 15 08:00:00.007 c2/c2-node-0: c1/x/a:41234 -> c2/y/b:80 tcp SYN FORWARDED EGRESS"
        );
    }

    #[test]
    fn a_drop_shows_its_reason_and_the_policies_that_denied_it() {
        let flow = Flow {
            verdict: Verdict::Dropped,
            drop_reason: Some(DropReason::PolicyDenied),
            event: FlowEvent::PacketDropped,
            allowed_by: Vec::new(),
            denied_by: vec![policy("y", "deny-all", None)],
            ..forwarded()
        };
        assert_eq!(
            compact(&flow),
            "Dec  7 05:40:00.123 c2/c2-node-0: c1/x/a:41234 -> c2/y/b:80 tcp SYN DROPPED \
             POLICY_DENIED (denied by y/deny-all) INGRESS encrypted via c1/c1-node-0"
        );
        let unknown = Flow {
            drop_reason: Some(DropReason::UnknownPod),
            denied_by: Vec::new(),
            tunnel: None,
            ip: Ip {
                encrypted: false,
                ..flow.ip
            },
            ..flow
        };
        assert_eq!(
            compact(&unknown),
            "Dec  7 05:40:00.123 c2/c2-node-0: c1/x/a:41234 -> c2/y/b:80 tcp SYN DROPPED \
             UNKNOWN_POD INGRESS"
        );
    }

    #[test]
    fn a_closed_connection_shows_what_went_each_way() {
        let flow = Flow {
            event: FlowEvent::ConnectionClosed,
            l4: L4 {
                tcp_flags: None,
                ..tcp(0)
            },
            counters: Some(Counters {
                packets_sent: 5,
                bytes_sent: 420,
                packets_received: 1,
                bytes_received: 1234,
            }),
            ..forwarded()
        };
        assert_eq!(
            compact(&flow),
            "Dec  7 05:40:00.123 c2/c2-node-0: c1/x/a:41234 -> c2/y/b:80 tcp FORWARDED \
             (y/allow-frontend, y/allow-monitoring) INGRESS encrypted via c1/c1-node-0 \
             closed: 5 pkts 420 B -> / 1 pkt 1.2 KiB <-"
        );
    }

    #[test]
    fn icmp_shows_type_and_code_instead_of_ports() {
        let echo = Flow {
            l4: L4 {
                protocol: L4Protocol::Icmpv4,
                // Conntrack keys ICMP by its id; it is no port and not shown.
                source_port: Some(9),
                destination_port: None,
                tcp_flags: None,
                icmp: Some(Icmp { kind: 8, code: 0 }),
            },
            allowed_by: Vec::new(),
            ..forwarded()
        };
        assert_eq!(
            compact(&echo),
            "Dec  7 05:40:00.123 c2/c2-node-0: c1/x/a -> c2/y/b icmp echo-request \
             (type 8 code 0) FORWARDED INGRESS encrypted via c1/c1-node-0"
        );
        let odd = Flow {
            l4: L4 {
                icmp: Some(Icmp { kind: 42, code: 1 }),
                ..echo.l4
            },
            ..echo
        };
        assert!(
            compact(&odd).contains(" icmp type 42 code 1 FORWARDED "),
            "{}",
            compact(&odd)
        );
    }

    #[test]
    fn the_world_and_nodes_are_shown_by_address_and_name() {
        let flow = Flow {
            ip: Ip {
                source: "10.1.0.5".parse().unwrap(),
                destination: "203.0.113.9".parse().unwrap(),
                encrypted: false,
            },
            l4: L4 {
                destination_port: Some(443),
                ..tcp(0x02)
            },
            destination: Arc::new(Endpoint::world()),
            traffic_direction: TrafficDirection::Egress,
            allowed_by: Vec::new(),
            tunnel: None,
            node_name: "c1/c1-node-0".into(),
            ..forwarded()
        };
        assert_eq!(
            compact(&flow),
            "Dec  7 05:40:00.123 c1/c1-node-0: c1/x/a:41234 -> 203.0.113.9:443 (world) tcp SYN \
             FORWARDED EGRESS"
        );
        let from_node = Flow {
            source: Arc::new(Endpoint {
                kind: EndpointKind::Node,
                cluster: Some("c1".into()),
                node_name: Some("c1-node-1".into()),
                ..Endpoint::world()
            }),
            ..flow
        };
        assert!(
            compact(&from_node).contains(": c1/c1-node-1:41234 -> 203.0.113.9:443 (world) "),
            "{}",
            compact(&from_node)
        );
    }

    #[test]
    fn ipv6_addresses_are_bracketed_before_a_port() {
        let flow = Flow {
            ip: Ip {
                source: "2001:db8::1".parse().unwrap(),
                destination: "fd00:10:2::7".parse().unwrap(),
                encrypted: false,
            },
            l4: L4 {
                protocol: L4Protocol::Udp,
                tcp_flags: None,
                destination_port: Some(53),
                ..tcp(0)
            },
            source: Arc::new(Endpoint::world()),
            allowed_by: Vec::new(),
            tunnel: None,
            ..forwarded()
        };
        assert_eq!(
            compact(&flow),
            "Dec  7 05:40:00.123 c2/c2-node-0: [2001:db8::1]:41234 (world) -> c2/y/b:53 udp \
             FORWARDED INGRESS"
        );
        let icmpv6 = Flow {
            l4: L4 {
                protocol: L4Protocol::Icmpv6,
                source_port: None,
                destination_port: None,
                tcp_flags: None,
                icmp: Some(Icmp { kind: 128, code: 0 }),
            },
            ..flow
        };
        assert!(
            compact(&icmpv6).contains(": 2001:db8::1 (world) -> c2/y/b icmpv6 echo-request "),
            "{}",
            compact(&icmpv6)
        );
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
    }
}
