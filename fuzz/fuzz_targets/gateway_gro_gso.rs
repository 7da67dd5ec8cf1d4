//! The gateway's datagram batching (gateway/src/offload.rs): cutting a UDP GRO read into
//! datagrams, and planning which encrypted datagrams leave together in one UDP GSO send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_gateway::offload::{
    GsoGroup, UDP_MAX_GSO_BYTES, UDP_MAX_SEGMENTS, gro_segments, plan_gso_groups,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    // GRO: a receive of `len` bytes assembled from `segment`-sized datagrams.
    let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let segment = usize::from(u16::from_le_bytes([data[2], data[3]]));
    let mut next = 0;
    let ranges: Vec<_> = gro_segments(len, segment).collect();
    for (i, range) in ranges.iter().enumerate() {
        assert_eq!(range.start, next, "contiguous");
        assert!(range.end > range.start, "never empty");
        if segment > 0 {
            assert!(range.len() <= segment);
            if i + 1 < ranges.len() {
                assert_eq!(range.len(), segment, "only the last is short");
            }
        }
        next = range.end;
    }
    assert_eq!(next, len, "the datagrams cover the receive");

    // GSO: datagrams (length, destination) in sending order.
    let (max_segments, max_bytes) = if data[4] & 1 == 0 {
        (UDP_MAX_SEGMENTS, UDP_MAX_GSO_BYTES)
    } else {
        (usize::from(data[4] >> 1), usize::from(data[5]) * 64)
    };
    let datagrams: Vec<(usize, u8)> = data[6..]
        .chunks_exact(3)
        .map(|c| {
            (
                usize::from(u16::from_le_bytes([c[0], c[1]]) % 2048),
                c[2] % 4,
            )
        })
        .collect();
    let mut groups: Vec<GsoGroup> = Vec::new();
    plan_gso_groups(&datagrams, max_segments, max_bytes, &mut groups);
    let mut next = 0;
    for group in &groups {
        assert_eq!(group.start, next, "order kept, nothing skipped");
        assert!(group.count >= 1 && group.count <= max_segments.max(1));
        let members = &datagrams[group.range()];
        let (first_len, to) = members[0];
        assert_eq!(group.segment, first_len);
        let mut bytes = 0;
        for (i, (len, dest)) in members.iter().enumerate() {
            assert_eq!(dest, &to, "one destination per send");
            if i + 1 < members.len() {
                assert_eq!(*len, group.segment, "all but the last are one size");
            } else {
                assert!(*len <= group.segment, "the last may be shorter");
            }
            bytes += len;
        }
        assert!(
            group.count == 1 || bytes <= max_bytes,
            "{bytes} bytes over {max_bytes}"
        );
        next = group.range().end;
    }
    assert_eq!(next, datagrams.len(), "every datagram is sent");
});
