//! The slow path: one query packet in, one decision out (pure; hickory-proto parses and
//! writes). The fast path precomputes its answers with this very function.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};

use crate::zone::{Lookup, Zone};

/// The transport a query came over; UDP answers are limited in size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// UDP: answers above the client's limit are truncated (TC set).
    Udp,
    /// TCP: up to 65,535 bytes.
    Tcp,
}

/// Why a packet got no answer at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a DNS header.
    Short,
    /// Larger than the receive buffer.
    Oversized,
    /// A response (QR set), never answered (no reflection loops).
    NotAQuery,
}

impl DropReason {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Short => "short",
            DropReason::Oversized => "oversized",
            DropReason::NotAQuery => "not_a_query",
        }
    }
}

/// What the server does with a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Reply),
    /// Outside the zone: relay to an upstream.
    Forward {
        /// The query type, for metrics.
        qtype: RecordType,
    },
    /// Send nothing.
    Drop(DropReason),
}

/// A reply and what it says, for metrics.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    /// The wire bytes.
    pub bytes: Vec<u8>,
    /// The query type (`None` when the query could not be parsed).
    pub qtype: Option<RecordType>,
    /// The response code.
    pub rcode: ResponseCode,
    /// Records in the answer section.
    pub answers: usize,
    /// Whether TC was set.
    pub truncated: bool,
}

pub use crate::wire::PLAIN_UDP_LIMIT;

/// Decides what to do with `packet` for `zone`. `edns_udp_size` is the UDP payload size this
/// server advertises and accepts at most.
pub fn respond(zone: &Zone, packet: &[u8], transport: Transport, edns_udp_size: u16) -> Outcome {
    if packet.len() < 12 {
        return Outcome::Drop(DropReason::Short);
    }
    if packet[2] & 0x80 != 0 {
        return Outcome::Drop(DropReason::NotAQuery);
    }
    let query = match Message::from_vec(packet) {
        Ok(query) => query,
        Err(_) => return Outcome::Reply(header_only(packet, ResponseCode::FormErr)),
    };
    let qtype = query.queries.first().map(|q| q.query_type());
    let mut response = Message::new(query.id, MessageType::Response, query.op_code);
    response.metadata.recursion_desired = query.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = query.checking_disabled;
    if let Some(edns) = &query.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns_udp_size.max(512));
        ours.set_version(0);
        response.set_edns(ours);
        if edns.version() > 0 {
            response.metadata.response_code = ResponseCode::BADVERS;
            return finish(response, qtype, transport, udp_limit(&query, edns_udp_size));
        }
    }
    if query.op_code != OpCode::Query {
        response.add_queries(query.queries.iter().cloned());
        response.metadata.response_code = ResponseCode::NotImp;
        return finish(response, qtype, transport, udp_limit(&query, edns_udp_size));
    }
    if query.queries.len() != 1 || !query.answers.is_empty() || !query.authorities.is_empty() {
        response.add_queries(query.queries.iter().cloned());
        response.metadata.response_code = ResponseCode::FormErr;
        return finish(response, qtype, transport, udp_limit(&query, edns_udp_size));
    }
    let question = &query.queries[0];
    response.add_query(question.clone());
    let lookup = zone.lookup(question.name(), question.query_type());
    if lookup == Lookup::NotInZone {
        return Outcome::Forward {
            qtype: question.query_type(),
        };
    }
    response.metadata.authoritative = true;
    if question.query_class() != DNSClass::IN {
        response.metadata.authoritative = false;
        response.metadata.response_code = ResponseCode::Refused;
        return finish(response, qtype, transport, udp_limit(&query, edns_udp_size));
    }
    match lookup {
        Lookup::NotInZone => unreachable!("handled above"),
        Lookup::NotLoaded => {
            // Not authoritative and no SOA: a resolver must not cache this as an answer.
            response.metadata.authoritative = false;
            response.metadata.response_code = ResponseCode::ServFail;
        }
        Lookup::NxDomain => {
            response.metadata.response_code = ResponseCode::NXDomain;
            response.add_authority(zone.soa_for(question.name()));
        }
        Lookup::NoData => {
            response.add_authority(zone.soa_for(question.name()));
        }
        Lookup::Found {
            answers,
            additionals,
        } => {
            response.add_answers(answers);
            response.add_additionals(additionals);
        }
    }
    finish(response, qtype, transport, udp_limit(&query, edns_udp_size))
}

/// The UDP size limit for answering `query`: 512 without EDNS, else the client's advertised
/// size capped by ours (never below 512).
fn udp_limit(query: &Message, edns_udp_size: u16) -> usize {
    match &query.edns {
        None => PLAIN_UDP_LIMIT,
        Some(edns) => usize::from(edns.max_payload().min(edns_udp_size)).max(PLAIN_UDP_LIMIT),
    }
}

/// Serializes, dropping additionals and then truncating (TC) to fit the transport.
fn finish(
    mut response: Message,
    qtype: Option<RecordType>,
    transport: Transport,
    udp_limit: usize,
) -> Outcome {
    let limit = match transport {
        Transport::Udp => udp_limit,
        Transport::Tcp => usize::from(u16::MAX),
    };
    let rcode = response.response_code;
    let mut bytes = encode(&response);
    if bytes.len() > limit && !response.additionals.is_empty() {
        response.additionals.clear();
        bytes = encode(&response);
    }
    let mut truncated = false;
    if bytes.len() > limit {
        truncated = true;
        let mut short = response.truncate();
        short.metadata.authoritative = response.authoritative;
        response = short;
        bytes = encode(&response);
        if bytes.len() > limit {
            // Truncation keeps the question section, and only a query echoed whole (FORMERR,
            // NOTIMP) can carry more questions than fit: the header and OPT alone always do.
            response.queries.clear();
            bytes = encode(&response);
        }
    }
    Outcome::Reply(Reply {
        bytes,
        qtype,
        rcode,
        answers: response.answers.len(),
        truncated,
    })
}

fn encode(message: &Message) -> Vec<u8> {
    // Encoding our own well-formed records cannot fail short of a 64 KiB overflow; fall back to
    // the bare header with SERVFAIL rather than panic.
    message.to_vec().unwrap_or_else(|_| {
        let mut header = vec![0u8; 12];
        header[0..2].copy_from_slice(&message.id.to_be_bytes());
        header[2] = 0x80 | (u8::from(message.op_code) << 3) | u8::from(message.recursion_desired);
        header[3] = 0x80 | ResponseCode::ServFail.low();
        header
    })
}

/// A reply carrying only the header of `packet` (at least 12 bytes) with `rcode`: for queries
/// that cannot be parsed at all.
pub fn header_only(packet: &[u8], rcode: ResponseCode) -> Reply {
    let mut bytes = vec![0u8; 12];
    bytes[0..2].copy_from_slice(&packet[0..2]);
    bytes[2] = 0x80 | (packet[2] & 0x79); // QR, opcode, RD
    bytes[3] = 0x80 | rcode.low();
    Reply {
        bytes,
        qtype: None,
        rcode,
        answers: 0,
        truncated: false,
    }
}

/// SERVFAIL for a query that was to be forwarded (upstream failed or overloaded).
pub fn servfail(packet: &[u8], edns_udp_size: u16) -> Option<Reply> {
    not_forwarded(packet, ResponseCode::ServFail, edns_udp_size)
}

/// REFUSED for a query outside the zone from a client that may not use forwarding (RA clear:
/// no recursion is offered to it).
pub fn refused(packet: &[u8], edns_udp_size: u16) -> Option<Reply> {
    not_forwarded(packet, ResponseCode::Refused, edns_udp_size)
}

fn not_forwarded(packet: &[u8], rcode: ResponseCode, edns_udp_size: u16) -> Option<Reply> {
    if packet.len() < 12 {
        return None;
    }
    let Ok(query) = Message::from_vec(packet) else {
        return Some(header_only(packet, rcode));
    };
    let mut response = Message::new(query.id, MessageType::Response, query.op_code);
    response.metadata.recursion_desired = query.recursion_desired;
    response.metadata.recursion_available = rcode != ResponseCode::Refused;
    response.metadata.response_code = rcode;
    response.add_queries(query.queries.iter().cloned());
    if query.edns.is_some() {
        let mut ours = Edns::new();
        ours.set_max_payload(edns_udp_size.max(512));
        response.set_edns(ours);
    }
    match finish(
        response,
        query.queries.first().map(|q| q.query_type()),
        Transport::Udp,
        PLAIN_UDP_LIMIT,
    ) {
        Outcome::Reply(reply) => Some(reply),
        _ => None,
    }
}

/// The answer records of a reply, for tests and debugging.
pub fn answers_of(bytes: &[u8]) -> Option<Vec<Record>> {
    Message::from_vec(bytes).ok().map(|m| m.answers)
}

/// Short metric label of a query type (bounded set).
pub fn type_label(qtype: Option<RecordType>) -> &'static str {
    match qtype {
        None => "NONE",
        Some(RecordType::A) => "A",
        Some(RecordType::AAAA) => "AAAA",
        Some(RecordType::SRV) => "SRV",
        Some(RecordType::PTR) => "PTR",
        Some(RecordType::TXT) => "TXT",
        Some(RecordType::MX) => "MX",
        Some(RecordType::NS) => "NS",
        Some(RecordType::SOA) => "SOA",
        Some(RecordType::CNAME) => "CNAME",
        Some(RecordType::ANY) => "ANY",
        Some(RecordType::HTTPS) => "HTTPS",
        Some(RecordType::SVCB) => "SVCB",
        Some(_) => "OTHER",
    }
}

/// Short metric label of a response code (bounded set).
pub fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "OTHER",
    }
}

/// A query as the unit tests of this module and of `fast` send it: `name`/`qtype` with RD as
/// given and an OPT record advertising `edns` if given.
#[cfg(test)]
pub(crate) fn test_query(
    name: &str,
    qtype: RecordType,
    rd: bool,
    edns: Option<u16>,
    id: u16,
) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = rd;
    m.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii(name).unwrap(),
        qtype,
    ));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Catalog;
    use crate::zone::ZoneConfig;

    fn zone(endpoints: usize) -> Zone {
        let eps: Vec<String> = (0..endpoints)
            .map(|i| format!(r#"{{"address": "10.9.{}.{}"}}"#, i / 250, i % 250 + 1))
            .collect();
        let json = format!(
            r#"{{"services": [{{"name": "web", "namespace": "shop", "ips": ["10.1.0.10"]}},
              {{"name": "big", "namespace": "shop", "headless": true,
                "clusters": [{{"cluster": "east", "endpoints": [{}]}}]}}]}}"#,
            eps.join(",")
        );
        Zone::build(
            ZoneConfig::new("clusterset.local", 5).unwrap(),
            &Catalog::from_json(&json).unwrap(),
        )
    }

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        test_query(name, qtype, true, edns, 0x1234)
    }

    /// The outcome of a plain UDP query (no EDNS, our usual 1232-byte limit).
    fn udp(zone: &Zone, name: &str, qtype: RecordType) -> Outcome {
        respond(zone, &query(name, qtype, None), Transport::Udp, 1232)
    }

    /// Names outside the zone go to the upstreams, whether or not the zone is loaded.
    fn assert_forwarded(zone: &Zone) {
        assert_eq!(
            udp(zone, "example.org.", RecordType::A),
            Outcome::Forward {
                qtype: RecordType::A
            }
        );
    }

    fn reply(outcome: Outcome) -> (Reply, Message) {
        match outcome {
            Outcome::Reply(r) => {
                let m = Message::from_vec(&r.bytes).unwrap();
                (r, m)
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn positive_negative_and_forward() {
        let zone = zone(1);
        let (r, m) = reply(udp(&zone, "web.shop.svc.clusterset.local.", RecordType::A));
        assert_eq!((r.rcode, r.answers), (ResponseCode::NoError, 1));
        assert!(m.authoritative && m.recursion_desired && m.id == 0x1234);
        let (r, m) = reply(udp(&zone, "nope.shop.svc.clusterset.local.", RecordType::A));
        assert_eq!(r.rcode, ResponseCode::NXDomain);
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        let (r, m) = reply(udp(&zone, "web.shop.svc.clusterset.local.", RecordType::MX));
        assert_eq!((r.rcode, r.answers), (ResponseCode::NoError, 0));
        assert_eq!(m.authorities.len(), 1);
        assert_forwarded(&zone);
    }

    #[test]
    fn servfail_in_the_zone_before_a_catalog() {
        let zone = Zone::not_loaded(ZoneConfig::new("clusterset.local", 5).unwrap());
        for (name, edns) in [
            ("web.shop.svc.clusterset.local.", None),
            ("nope.shop.svc.clusterset.local.", Some(1232)),
            ("clusterset.local.", None),
        ] {
            for transport in [Transport::Udp, Transport::Tcp] {
                let (r, m) = reply(respond(
                    &zone,
                    &query(name, RecordType::A, edns),
                    transport,
                    1232,
                ));
                assert_eq!((r.rcode, r.answers), (ResponseCode::ServFail, 0), "{name}");
                assert!(!m.authoritative && m.authorities.is_empty(), "{m:?}");
                assert_eq!(m.edns.is_some(), edns.is_some());
            }
        }
        assert_forwarded(&zone);
    }

    #[test]
    fn truncates_over_udp_not_over_tcp() {
        let zone = zone(100);
        let q = query("big.shop.svc.clusterset.local.", RecordType::A, None);
        let (r, m) = reply(respond(&zone, &q, Transport::Udp, 1232));
        assert!(r.truncated && m.truncation && m.answers.is_empty());
        let (r, _) = reply(respond(&zone, &q, Transport::Tcp, 1232));
        assert_eq!((r.truncated, r.answers), (false, 100));
        // EDNS raises the UDP limit up to our own size.
        let q = query("big.shop.svc.clusterset.local.", RecordType::A, Some(4096));
        let (r, m) = reply(respond(&zone, &q, Transport::Udp, 1232));
        assert!(r.truncated && r.bytes.len() <= 1232);
        assert_eq!(m.edns.unwrap().max_payload(), 1232);
        let zone = zone_small_enough();
        let (r, _) = reply(respond(&zone, &q, Transport::Udp, 1232));
        assert_eq!((r.truncated, r.answers), (false, 60));
    }

    fn zone_small_enough() -> Zone {
        zone(60)
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        let zone = zone(1);
        assert_eq!(
            respond(&zone, &[1, 2, 3], Transport::Udp, 1232),
            Outcome::Drop(DropReason::Short)
        );
        let mut q = query("web.shop.svc.clusterset.local.", RecordType::A, None);
        q[2] |= 0x80;
        assert_eq!(
            respond(&zone, &q, Transport::Udp, 1232),
            Outcome::Drop(DropReason::NotAQuery)
        );
        let q = query("web.shop.svc.clusterset.local.", RecordType::A, None);
        let (r, m) = reply(respond(&zone, &q[..q.len() - 3], Transport::Udp, 1232));
        assert_eq!(r.rcode, ResponseCode::FormErr);
        assert_eq!(m.id, 0x1234);
        // Two questions.
        let mut m2 = Message::from_vec(&q).unwrap();
        m2.add_query(m2.queries[0].clone());
        let (r, _) = reply(respond(&zone, &m2.to_vec().unwrap(), Transport::Udp, 1232));
        assert_eq!(r.rcode, ResponseCode::FormErr);
        // Every prefix and a few bit flips never panic.
        for len in 0..q.len() {
            let _ = respond(&zone, &q[..len], Transport::Udp, 1232);
        }
        for i in 0..q.len() * 8 {
            let mut flipped = q.clone();
            flipped[i / 8] ^= 1 << (i % 8);
            let _ = respond(&zone, &flipped, Transport::Udp, 1232);
        }
    }

    /// Found by the `dns_slow` fuzz target: a UDP query of three long questions got a
    /// FORMERR echoing all three, 759 bytes for a client that allows 512, even after
    /// truncation (which keeps the questions).
    #[test]
    fn a_reply_echoing_many_questions_still_fits_udp() {
        let mut packet = vec![0x12, 0x34, 0x01, 0x00, 0, 3, 0, 0, 0, 0, 0, 0];
        for fill in [b'a', b'b', b'c'] {
            for _ in 0..4 {
                packet.push(60);
                packet.extend_from_slice(&[fill; 60]);
            }
            packet.extend_from_slice(&[0, 0, 1, 0, 1]);
        }
        assert_eq!(packet.len(), 759);
        let zone = zone_small_enough();
        let (r, m) = reply(respond(&zone, &packet, Transport::Udp, 1232));
        assert!(r.bytes.len() <= PLAIN_UDP_LIMIT, "{} bytes", r.bytes.len());
        assert!(r.truncated && m.truncation);
        assert_eq!(r.rcode, ResponseCode::FormErr);
        assert_eq!(m.id, 0x1234);
        // Over TCP the whole echo goes back.
        let (r, m) = reply(respond(&zone, &packet, Transport::Tcp, 1232));
        assert!(!r.truncated);
        assert_eq!(m.queries.len(), 3);
    }

    #[test]
    fn edns_version_and_servfail() {
        let zone = zone(1);
        let mut m = Message::from_vec(&query(
            "web.shop.svc.clusterset.local.",
            RecordType::A,
            Some(1232),
        ))
        .unwrap();
        m.edns.as_mut().unwrap().set_version(1);
        let (r, _) = reply(respond(&zone, &m.to_vec().unwrap(), Transport::Udp, 1232));
        assert_eq!(r.rcode, ResponseCode::BADVERS);
        let s = servfail(&query("example.org.", RecordType::A, Some(1232)), 1232).unwrap();
        let m = Message::from_vec(&s.bytes).unwrap();
        assert_eq!(
            (m.response_code, m.id, m.queries.len()),
            (ResponseCode::ServFail, 0x1234, 1)
        );
        assert!(m.edns.is_some());
        let r = refused(&query("example.org.", RecordType::A, None), 1232).unwrap();
        let m = Message::from_vec(&r.bytes).unwrap();
        assert_eq!((m.response_code, m.id), (ResponseCode::Refused, 0x1234));
        assert!(!m.recursion_available && m.recursion_desired && m.answers.is_empty());
    }
}
