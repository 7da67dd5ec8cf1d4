//! The gateway's first look at a datagram from the network (gateway/src/device.rs `demux`):
//! which WireGuard message it is and which peer slot its receiver index names.
#![no_main]

use boringtun::noise::{Packet, Tunn};
use libfuzzer_sys::fuzz_target;
use trellis_gateway::device::{
    COOKIE_REPLY, Classified, DATA, HANDSHAKE_INIT, HANDSHAKE_RESPONSE, classify_datagram,
};
use trellis_gateway::metrics::DropReason;

fuzz_target!(|datagram: &[u8]| {
    let ours = classify_datagram(datagram);
    // boringtun parses the same message again once the peer is found: the demux must accept
    // exactly what it accepts, and read the same receiver index.
    let theirs = Tunn::parse_incoming_packet(datagram);
    match (ours, theirs) {
        (Err(reason), Err(_)) => assert_eq!(reason, DropReason::Malformed),
        (Ok(Classified::HandshakeInit), Ok(Packet::HandshakeInit(_))) => {
            assert_eq!(datagram[0], HANDSHAKE_INIT)
        }
        (Ok(Classified::Indexed { kind, index, slot }), Ok(packet)) => {
            assert_eq!(kind, datagram[0]);
            assert_eq!(slot, index >> 8, "the slot is the index's upper 24 bits");
            let receiver = match packet {
                Packet::HandshakeResponse(p) => {
                    assert_eq!(kind, HANDSHAKE_RESPONSE);
                    p.receiver_idx
                }
                Packet::PacketCookieReply(p) => {
                    assert_eq!(kind, COOKIE_REPLY);
                    p.receiver_idx
                }
                Packet::PacketData(p) => {
                    assert_eq!(kind, DATA);
                    p.receiver_idx
                }
                Packet::HandshakeInit(_) => panic!("an initiation classified as indexed"),
            };
            assert_eq!(index, receiver);
        }
        (ours, theirs) => panic!("demux says {ours:?}, boringtun says {theirs:?}"),
    }
});
