//! The DNS hot path (dns/src/fast.rs): a UDP query answered from precomputed wire bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_dns::answer::{Outcome, Transport, respond};
use trellis_fuzz::{EDNS_UDP_SIZE, canonical, dns, udp_limit};

fuzz_target!(|query: &[u8]| {
    let (zone, fast) = dns();
    // The server's send buffer is 4 KiB.
    let mut out = [0u8; 4096];
    let Some(hit) = fast.answer(query, EDNS_UDP_SIZE, &mut out) else {
        return; // the slow path's business (dns_slow)
    };
    let reply = &out[..hit.len];
    assert!(
        reply.len() <= udp_limit(query),
        "{} bytes for a query allowing {}",
        reply.len(),
        udp_limit(query)
    );
    assert_eq!(reply[..2], query[..2], "the reply carries the query's ID");
    assert_ne!(reply[2] & 0x80, 0, "QR set");
    // The fast path is an optimisation only: it says exactly what the slow path says.
    let Outcome::Reply(slow) = respond(zone, query, Transport::Udp, EDNS_UDP_SIZE) else {
        panic!("the fast path answered a query the slow path would not answer");
    };
    assert_eq!(canonical(reply), canonical(&slow.bytes));
    assert_eq!(hit.entry.answers, slow.answers);
    assert_eq!(hit.entry.rcode, slow.rcode);
});
