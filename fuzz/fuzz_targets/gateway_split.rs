//! A TUN read with `IFF_VNET_HDR` (gateway/src/offload.rs `split_super_packet`): the virtio
//! header parsed, a TSO/USO super-packet cut into segments, a partial checksum finished.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_gateway::offload::{
    F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_UDP_L4, MAX_SPLIT_SEGMENTS, VNET_HDR_LEN, VnetHdr,
    ones_complement_sum, split_super_packet,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mtu_byte, read)) = data.split_first() else {
        return;
    };
    // Segment buffers are the TUN MTU: from the IPv4 minimum up to jumbo frames.
    let mtu = 576 + usize::from(mtu_byte) * 32;
    let original = read.to_vec();
    let mut read = read.to_vec();
    let mut bufs = vec![vec![0u8; mtu]; MAX_SPLIT_SEGMENTS];
    let mut sizes = vec![0usize; MAX_SPLIT_SEGMENTS];
    let parsed = VnetHdr::parse(&original);
    if let Ok(hdr) = parsed {
        let mut written = [0u8; VNET_HDR_LEN];
        hdr.write(&mut written);
        assert_eq!(
            written[..],
            original[..VNET_HDR_LEN],
            "the header round-trips"
        );
    }
    let Ok(n) = split_super_packet(&mut read, &mut bufs, &mut sizes) else {
        return;
    };
    let hdr = parsed.expect("a split read has a header");
    let packet = &original[VNET_HDR_LEN..];
    assert!((1..=MAX_SPLIT_SEGMENTS).contains(&n));
    for i in 0..n {
        assert!(
            sizes[i] <= mtu,
            "segment {i} of {} bytes over the MTU {mtu}",
            sizes[i]
        );
    }
    let gso_type = hdr.gso_type & !GSO_ECN;
    if gso_type == GSO_NONE {
        assert_eq!(n, 1);
        assert_eq!(sizes[0], packet.len());
        let out = &bufs[0][..sizes[0]];
        if hdr.flags & F_NEEDS_CSUM == 0 {
            assert_eq!(out, packet, "a plain packet is copied as is");
        } else {
            let start = usize::from(hdr.csum_start);
            let at = start + usize::from(hdr.csum_offset);
            // Only the checksum field changed...
            assert_eq!(out[..at], packet[..at]);
            assert_eq!(out[at + 2..], packet[at + 2..]);
            // ...and (when the field is 16-bit aligned within the summed range, as the
            // kernel's always is) it makes the sum over the transport, with the pseudo-header
            // sum the kernel left there, verify.
            if hdr.csum_offset % 2 == 0 {
                let pseudo = u16::from_be_bytes([packet[at], packet[at + 1]]);
                assert_eq!(
                    ones_complement_sum(&out[start..], u32::from(pseudo)),
                    0xffff
                );
            }
        }
        return;
    }
    // A super-packet: headers (IP up to csum_start, then TCP or UDP) + payload.
    let csum_start = usize::from(hdr.csum_start);
    let transport_len = if gso_type == GSO_UDP_L4 {
        8
    } else {
        usize::from(packet[csum_start + 12] >> 4) * 4
    };
    let hdr_len = csum_start + transport_len;
    let gso_size = usize::from(hdr.gso_size);
    let mut offset = hdr_len;
    for i in 0..n {
        let segment = &bufs[i][..sizes[i]];
        assert!(segment.len() >= hdr_len, "segment {i} holds the headers");
        let payload = &segment[hdr_len..];
        assert!(
            payload.len() <= gso_size,
            "segment {i} payload over gso_size"
        );
        if i + 1 < n {
            assert_eq!(payload.len(), gso_size, "only the last segment is short");
        }
        assert_eq!(
            payload,
            &packet[offset..offset + payload.len()],
            "payload in order"
        );
        offset += payload.len();
        if packet[0] >> 4 == 4 {
            // Each IPv4 header (csum_start bytes) carries a valid checksum.
            assert_eq!(ones_complement_sum(&segment[..csum_start], 0), 0xffff);
            let total = u16::from_be_bytes([segment[2], segment[3]]);
            assert_eq!(usize::from(total), segment.len(), "IPv4 total length");
        } else {
            let payload_len = u16::from_be_bytes([segment[4], segment[5]]);
            assert_eq!(
                usize::from(payload_len),
                segment.len() - 40,
                "IPv6 payload length"
            );
        }
    }
    assert_eq!(
        offset,
        packet.len(),
        "the segments' payloads add up to the input's"
    );
});
