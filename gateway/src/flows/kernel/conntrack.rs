//! Conntrack's events (`NFNLGRP_CONNTRACK_NEW` / `_DESTROY`) as [`ConntrackEvent`]s. Pure.

use std::time::SystemTime;

use netlink_packet_core::{DefaultNla, NLA_TYPE_MASK, Nla, NlasIterator};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple as CtTuple,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};
use trellis_core::flow::kernel::{ConntrackEvent, ConntrackEventKind, Tuple};
use trellis_core::flow::{Counters, L4Protocol};

use super::Decoded;

/// `CTA_COUNTERS_ORIG` / `_REPLY`: nested packets and bytes of each direction.
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
/// The ICMP identifier, for ICMP and ICMPv6 (`CTA_PROTO_ICMP_ID`, `CTA_PROTO_ICMPV6_ID`).
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMPV6_ID: u16 = 7;

/// The event one conntrack message tells, if it is one the flows need (a new or destroyed
/// connection of TCP, UDP, SCTP or ICMP).
pub fn event_of(message: &NetfilterMessage, time: SystemTime) -> Decoded<ConntrackEvent> {
    let (kind, attributes) = match &message.inner {
        NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)) => {
            (ConntrackEventKind::New, attributes)
        }
        NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attributes)) => {
            (ConntrackEventKind::Destroy, attributes)
        }
        _ => return Decoded::Skip,
    };
    let mut original = None;
    let mut reply = None;
    let mut counters_original = None;
    let mut counters_reply = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(tuple) => original = Some(tuple),
            ConntrackAttribute::CtaTupleReply(tuple) => reply = Some(tuple),
            // The kind keeps its nested flag in a `DefaultNla`.
            ConntrackAttribute::Other(nla) if nla.kind() & NLA_TYPE_MASK == CTA_COUNTERS_ORIG => {
                counters_original = Some(nla)
            }
            ConntrackAttribute::Other(nla) if nla.kind() & NLA_TYPE_MASK == CTA_COUNTERS_REPLY => {
                counters_reply = Some(nla)
            }
            _ => {}
        }
    }
    let (Some(original), Some(reply)) = (original, reply) else {
        return Decoded::Bad("a conntrack event without both tuples");
    };
    let (original, reply) = match (tuple_of(original), tuple_of(reply)) {
        (Ok(Some(original)), Ok(Some(reply))) => (original, reply),
        (Err(e), _) | (_, Err(e)) => return Decoded::Bad(e),
        _ => return Decoded::Skip,
    };
    let counters = match (counters_original, counters_reply) {
        (Some(sent), Some(received)) => {
            match (packets_and_bytes(sent), packets_and_bytes(received)) {
                (Some(sent), Some(received)) => Some(Counters {
                    packets_sent: sent.0,
                    bytes_sent: sent.1,
                    packets_received: received.0,
                    bytes_received: received.1,
                }),
                _ => return Decoded::Bad("conntrack counters without packets and bytes"),
            }
        }
        _ => None,
    };
    Decoded::Event(ConntrackEvent {
        time,
        kind,
        original,
        reply,
        counters,
    })
}

/// One direction's tuple; `None` for a protocol the flows leave out (GRE, DCCP, ...).
fn tuple_of(attributes: &[CtTuple]) -> Result<Option<Tuple>, &'static str> {
    let mut source = None;
    let mut destination = None;
    let mut protocol = None;
    let mut source_port = 0;
    let mut destination_port = 0;
    let mut icmp_id = 0;
    for attribute in attributes {
        match attribute {
            CtTuple::Ip(ip) => {
                for field in ip {
                    match field {
                        IPTuple::SourceAddress(a) => source = Some(*a),
                        IPTuple::DestinationAddress(a) => destination = Some(*a),
                        _ => {}
                    }
                }
            }
            CtTuple::Proto(proto) => {
                for field in proto {
                    match field {
                        ProtoTuple::Protocol(p) => {
                            protocol = Some(L4Protocol::from_number(u8::from(*p)))
                        }
                        ProtoTuple::SourcePort(port) => source_port = *port,
                        ProtoTuple::DestinationPort(port) => destination_port = *port,
                        ProtoTuple::Other(nla)
                            if matches!(
                                nla.kind() & NLA_TYPE_MASK,
                                CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID
                            ) =>
                        {
                            icmp_id = be_u16(nla).ok_or("an ICMP identifier of the wrong size")?
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (Some(source), Some(destination), Some(protocol)) = (source, destination, protocol) else {
        return Err("a conntrack tuple without addresses or protocol");
    };
    if source.is_ipv4() != destination.is_ipv4() {
        return Err("a conntrack tuple mixing IPv4 and IPv6");
    }
    let (source_port, destination_port) = match protocol {
        L4Protocol::Tcp | L4Protocol::Udp | L4Protocol::Sctp => (source_port, destination_port),
        L4Protocol::Icmpv4 | L4Protocol::Icmpv6 => (icmp_id, 0),
        L4Protocol::Other(_) => return Ok(None),
    };
    Ok(Some(Tuple {
        source,
        destination,
        protocol,
        source_port,
        destination_port,
    }))
}

fn nla_value(nla: &DefaultNla) -> Vec<u8> {
    let mut value = vec![0u8; nla.value_len()];
    nla.emit_value(&mut value);
    value
}

fn be_u16(nla: &DefaultNla) -> Option<u16> {
    let value: [u8; 2] = nla_value(nla).try_into().ok()?;
    Some(u16::from_be_bytes(value))
}

/// (packets, bytes) of one `CTA_COUNTERS_*` attribute.
fn packets_and_bytes(nla: &DefaultNla) -> Option<(u64, u64)> {
    let value = nla_value(nla);
    let mut packets = None;
    let mut bytes = None;
    for inner in NlasIterator::new(&value[..]) {
        let inner = inner.ok()?;
        // Beside the two: a padding attribute aligning them (CTA_COUNTERS_PAD).
        let slot = match inner.kind() {
            CTA_COUNTERS_PACKETS => &mut packets,
            CTA_COUNTERS_BYTES => &mut bytes,
            _ => continue,
        };
        let number: [u8; 8] = inner.value().try_into().ok()?;
        *slot = Some(u64::from_be_bytes(number));
    }
    Some((packets?, bytes?))
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_netfilter::conntrack::Protocol;
    use netlink_packet_netfilter::{NetfilterHeader, NetfilterProtoFamily};

    use super::*;

    const NESTED: u16 = netlink_packet_core::NLA_F_NESTED;

    fn nla(kind: u16, value: &[u8]) -> DefaultNla {
        DefaultNla::new(kind, value.to_vec())
    }

    /// As the kernel nests them (flagged nested, a padding attribute first).
    fn counters(packets: u64, bytes: u64) -> Vec<u8> {
        let mut value = vec![4, 0, 5, 0];
        for (kind, n) in [(CTA_COUNTERS_PACKETS, packets), (CTA_COUNTERS_BYTES, bytes)] {
            value.extend_from_slice(&12u16.to_ne_bytes());
            value.extend_from_slice(&kind.to_ne_bytes());
            value.extend_from_slice(&n.to_be_bytes());
        }
        value
    }

    fn tuple(
        source: &str,
        destination: &str,
        protocol: u8,
        ports: Option<(u16, u16)>,
        icmp_id: Option<u16>,
    ) -> Vec<CtTuple> {
        let mut proto = vec![ProtoTuple::Protocol(Protocol::from(protocol))];
        if let Some((s, d)) = ports {
            proto.push(ProtoTuple::SourcePort(s));
            proto.push(ProtoTuple::DestinationPort(d));
        }
        if let Some(id) = icmp_id {
            proto.push(ProtoTuple::Other(nla(CTA_PROTO_ICMP_ID, &id.to_be_bytes())));
        }
        vec![
            CtTuple::Ip(vec![
                IPTuple::SourceAddress(source.parse().unwrap()),
                IPTuple::DestinationAddress(destination.parse().unwrap()),
            ]),
            CtTuple::Proto(proto),
        ]
    }

    /// The message through its wire form and back, as the socket delivers it.
    fn delivered(message: ConntrackMessage) -> NetfilterMessage {
        let mut outer = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                message,
            )),
        );
        outer.finalize();
        let mut wire = vec![0u8; outer.buffer_len()];
        outer.serialize(&mut wire);
        match NetlinkMessage::<NetfilterMessage>::deserialize(&wire)
            .unwrap()
            .payload
        {
            NetlinkPayload::InnerMessage(inner) => inner,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_destroyed_tcp_connection_with_its_counters() {
        let message = delivered(ConntrackMessage::Delete(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(
                "10.0.0.1",
                "10.96.0.10",
                6,
                Some((41234, 80)),
                None,
            )),
            ConntrackAttribute::CtaTupleReply(tuple(
                "10.0.0.2",
                "10.0.0.1",
                6,
                Some((8080, 41234)),
                None,
            )),
            ConntrackAttribute::Other(nla(CTA_COUNTERS_ORIG | NESTED, &counters(5, 400))),
            ConntrackAttribute::Other(nla(CTA_COUNTERS_REPLY | NESTED, &counters(4, 900))),
        ]));
        let time = SystemTime::UNIX_EPOCH;
        let Decoded::Event(event) = event_of(&message, time) else {
            panic!("{message:?}")
        };
        assert_eq!(event.kind, ConntrackEventKind::Destroy);
        assert_eq!(
            event.original.source,
            "10.0.0.1".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(event.original.destination_port, 80);
        assert_eq!(
            event.reply.source,
            "10.0.0.2".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(event.reply.source_port, 8080);
        assert_eq!(event.original.protocol, L4Protocol::Tcp);
        assert_eq!(
            event.counters,
            Some(Counters {
                packets_sent: 5,
                bytes_sent: 400,
                packets_received: 4,
                bytes_received: 900
            })
        );
        assert_eq!(event.time, time);
    }

    #[test]
    fn a_new_icmp_echo_keeps_its_identifier_and_other_protocols_are_skipped() {
        let message = delivered(ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.1", "10.0.0.2", 1, None, Some(77))),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.0.2", "10.0.0.1", 1, None, Some(77))),
        ]));
        let Decoded::Event(event) = event_of(&message, SystemTime::now()) else {
            panic!()
        };
        assert_eq!(event.kind, ConntrackEventKind::New);
        assert_eq!(
            (event.original.source_port, event.original.destination_port),
            (77, 0)
        );
        assert_eq!(event.counters, None);
        let gre = delivered(ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.1", "10.0.0.2", 47, None, None)),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.0.2", "10.0.0.1", 47, None, None)),
        ]));
        assert!(matches!(event_of(&gre, SystemTime::now()), Decoded::Skip));
    }

    #[test]
    fn incomplete_events_are_bad_not_a_panic() {
        let one_tuple = delivered(ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.1", "10.0.0.2", 6, Some((1, 2)), None)),
        ]));
        assert!(matches!(
            event_of(&one_tuple, SystemTime::now()),
            Decoded::Bad(_)
        ));
        let mixed = delivered(ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.1", "fd00::2", 6, Some((1, 2)), None)),
            ConntrackAttribute::CtaTupleReply(tuple("fd00::2", "10.0.0.1", 6, Some((2, 1)), None)),
        ]));
        assert!(matches!(
            event_of(&mixed, SystemTime::now()),
            Decoded::Bad(_)
        ));
        let half_counters = delivered(ConntrackMessage::Delete(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.1", "10.0.0.2", 17, Some((1, 2)), None)),
            ConntrackAttribute::CtaTupleReply(tuple(
                "10.0.0.2",
                "10.0.0.1",
                17,
                Some((2, 1)),
                None,
            )),
            ConntrackAttribute::Other(nla(CTA_COUNTERS_ORIG | NESTED, &counters(1, 2)[..16])),
            ConntrackAttribute::Other(nla(CTA_COUNTERS_REPLY | NESTED, &counters(1, 2))),
        ]));
        assert!(matches!(
            event_of(&half_counters, SystemTime::now()),
            Decoded::Bad(_)
        ));
        let get = delivered(ConntrackMessage::Get(vec![]));
        assert!(matches!(event_of(&get, SystemTime::now()), Decoded::Skip));
    }
}
