//! The DNS slow path (dns/src/answer.rs, as dns/src/server.rs calls it for UDP and TCP):
//! hickory-proto parses the packet, the zone answers, the reply is sized to the transport.
#![no_main]

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use trellis_dns::answer::{DropReason, Outcome, Transport, respond, servfail};
use trellis_dns::zone::Lookup;
use trellis_fuzz::{EDNS_UDP_SIZE, dns, udp_limit};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, packet)) = data.split_first() else {
        return;
    };
    let transport = if mode & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let (zone, _) = dns();
    match respond(zone, packet, transport, EDNS_UDP_SIZE) {
        Outcome::Drop(DropReason::Short) => assert!(packet.len() < 12),
        Outcome::Drop(DropReason::NotAQuery) => assert_ne!(packet[2] & 0x80, 0),
        Outcome::Drop(other) => panic!("respond never drops for {other:?}"),
        Outcome::Forward { qtype } => {
            // Only a well-formed single question outside our zone leaves for upstream.
            let query = Message::from_vec(packet).expect("a forwarded query parses");
            assert_eq!(query.queries.len(), 1);
            let question = &query.queries[0];
            assert_eq!(question.query_type(), qtype);
            assert_eq!(zone.lookup(question.name(), qtype), Lookup::NotInZone);
        }
        Outcome::Reply(reply) => {
            assert!(packet.len() >= 12 && packet[2] & 0x80 == 0);
            let limit = match transport {
                Transport::Udp => udp_limit(packet),
                Transport::Tcp => usize::from(u16::MAX),
            };
            assert!(
                reply.bytes.len() <= limit,
                "a reply of {} bytes over {transport:?} for a query allowing {limit}",
                reply.bytes.len()
            );
            assert_eq!(
                reply.bytes[..2],
                packet[..2],
                "the reply carries the query's ID"
            );
            let parsed = Message::from_vec(&reply.bytes).expect("our replies parse");
            assert_eq!(
                parsed.metadata.message_type,
                hickory_proto::op::MessageType::Response
            );
            assert_eq!(parsed.truncation, reply.truncated);
            assert_eq!(parsed.answers.len(), reply.answers);
            // By number: 16 is both BADVERS and BADSIG, and hickory reads it as the latter.
            assert_eq!(u16::from(parsed.response_code), u16::from(reply.rcode));
        }
    }
    // The SERVFAIL the UDP server sends when upstream is overloaded (over UDP: plain limit).
    if let Some(reply) = servfail(packet, EDNS_UDP_SIZE) {
        assert!(
            reply.bytes.len() <= udp_limit(packet),
            "a SERVFAIL of {} bytes for a query allowing {}",
            reply.bytes.len(),
            udp_limit(packet)
        );
        assert_eq!(reply.bytes[..2], packet[..2]);
        Message::from_vec(&reply.bytes).expect("our SERVFAIL parses");
    }
});
