use super::*;

const SRC4: [u8; 4] = [10, 1, 0, 5];
const DST4: [u8; 4] = [10, 2, 0, 7];
const SRC6: [u8; 16] = [0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
const DST6: [u8; 16] = [0xfd, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const SEQ: u32 = 0xfff0_0000;

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// What the kernel hands a `IFF_VNET_HDR` TUN for a TSO send: virtio header, one IP + TCP
/// header with the total length of the whole thing, then all the payload.
fn tcp_super_packet(v6: bool, payload: &[u8], gso_size: u16, flags: u8) -> Vec<u8> {
    let ip_len = if v6 { 40 } else { 20 };
    let mut packet = vec![0u8; ip_len + 20];
    if v6 {
        packet[0] = 0x60;
        let plen = (20 + payload.len()) as u16;
        packet[4..6].copy_from_slice(&plen.to_be_bytes());
        packet[6] = 6;
        packet[7] = 64;
        packet[8..24].copy_from_slice(&SRC6);
        packet[24..40].copy_from_slice(&DST6);
    } else {
        packet[0] = 0x45;
        let total = (ip_len + 20 + payload.len()).min(65535) as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        packet[8] = 64;
        packet[9] = 6;
        packet[12..16].copy_from_slice(&SRC4);
        packet[16..20].copy_from_slice(&DST4);
    }
    let tcp = &mut packet[ip_len..];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&SEQ.to_be_bytes());
    tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
    packet.extend_from_slice(payload);
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: (ip_len + 20) as u16,
        gso_size,
        csum_start: ip_len as u16,
        csum_offset: 16,
    };
    let mut read = [0u8; VNET_HDR_LEN].to_vec();
    hdr.write((&mut read[..]).try_into().unwrap());
    read.extend_from_slice(&packet);
    read
}

fn buffers() -> (Vec<Vec<u8>>, Vec<usize>) {
    (
        vec![vec![0u8; 1500]; MAX_SPLIT_SEGMENTS],
        vec![0; MAX_SPLIT_SEGMENTS],
    )
}

/// The transport checksum of `segment` (IP header first) verifies.
fn transport_checksum_ok(segment: &[u8], protocol: u8) -> bool {
    let (ip_len, src, dst, l4_len) = if segment[0] >> 4 == 6 {
        (40, &segment[8..24], &segment[24..40], segment.len() - 40)
    } else {
        let ihl = usize::from(segment[0] & 0xf) * 4;
        (ihl, &segment[12..16], &segment[16..20], segment.len() - ihl)
    };
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    let partial = ones_complement_sum(&pseudo, 0);
    ones_complement_sum(&segment[ip_len..], u32::from(partial)) == 0xffff
}

fn check_tcp_segments(v6: bool) {
    let data = payload(3500);
    let mut read = tcp_super_packet(v6, &data, 1000, 0x18 | 0x01); // PSH ACK FIN
    let (mut bufs, mut sizes) = buffers();
    let n = split_super_packet(&mut read, &mut bufs, &mut sizes).unwrap();
    assert_eq!(n, 4);
    let ip_len = if v6 { 40 } else { 20 };
    let mut rebuilt = Vec::new();
    for i in 0..n {
        let segment = &bufs[i][..sizes[i]];
        let data_len = if i < 3 { 1000 } else { 500 };
        assert_eq!(segment.len(), ip_len + 20 + data_len);
        if v6 {
            assert_eq!(
                u16::from_be_bytes([segment[4], segment[5]]) as usize,
                20 + data_len
            );
        } else {
            assert_eq!(
                u16::from_be_bytes([segment[2], segment[3]]) as usize,
                segment.len()
            );
            assert_eq!(
                ones_complement_sum(&segment[..20], 0),
                0xffff,
                "IP checksum"
            );
            let id = u16::from_be_bytes([segment[4], segment[5]]);
            assert_eq!(id, 0x1234 + i as u16, "IP ID advances per segment");
        }
        let tcp = &segment[ip_len..];
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        assert_eq!(seq, SEQ.wrapping_add(1000 * i as u32), "sequence wraps");
        let last = i == n - 1;
        assert_eq!(tcp[13] & 0x09 != 0, last, "PSH/FIN only on the last");
        assert!(transport_checksum_ok(segment, 6), "TCP checksum of {i}");
        rebuilt.extend_from_slice(&tcp[20..]);
    }
    assert_eq!(rebuilt, data);
}

#[test]
fn a_tcp4_super_packet_splits_into_segments_with_valid_checksums() {
    check_tcp_segments(false);
}

#[test]
fn a_tcp6_super_packet_splits_into_segments_with_valid_checksums() {
    check_tcp_segments(true);
}

#[test]
fn a_plain_packet_is_copied_and_its_partial_checksum_finished() {
    let data = payload(300);
    let mut read = tcp_super_packet(false, &data, 0, 0x18);
    read[1] = GSO_NONE; // not GSO, but NEEDS_CSUM is set
    let (mut bufs, mut sizes) = buffers();
    assert_eq!(
        split_super_packet(&mut read, &mut bufs, &mut sizes).unwrap(),
        1
    );
    let segment = &bufs[0][..sizes[0]];
    assert_eq!(segment.len(), 20 + 20 + 300);
    // The kernel leaves the pseudo-header sum in the field: emulate that, then finish.
    let mut partial = read[VNET_HDR_LEN..].to_vec();
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&SRC4);
    pseudo.extend_from_slice(&DST4);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&320u16.to_be_bytes());
    let sum = ones_complement_sum(&pseudo, 0);
    partial[36..38].copy_from_slice(&sum.to_be_bytes());
    finish_checksum(&mut partial, 20, 16).unwrap();
    assert!(transport_checksum_ok(&partial, 6));
    // Without NEEDS_CSUM, bytes pass untouched.
    let mut plain = vec![0u8; VNET_HDR_LEN];
    plain.extend_from_slice(&partial);
    assert_eq!(
        split_super_packet(&mut plain, &mut bufs, &mut sizes).unwrap(),
        1
    );
    assert_eq!(&bufs[0][..sizes[0]], &partial[..]);
}

#[test]
fn malformed_virtio_headers_are_errors() {
    let (mut bufs, mut sizes) = buffers();
    let mut short = vec![0u8; 5];
    assert!(matches!(
        split_super_packet(&mut short, &mut bufs, &mut sizes),
        Err(OffloadError::Truncated(5))
    ));
    let mut only_header = vec![0u8; VNET_HDR_LEN];
    assert!(split_super_packet(&mut only_header, &mut bufs, &mut sizes).is_err());
    // TCPv4 GSO over an IPv6 packet.
    let mut mismatched = tcp_super_packet(true, &payload(3000), 1000, 0x10);
    mismatched[1] = GSO_TCPV4;
    assert!(matches!(
        split_super_packet(&mut mismatched, &mut bufs, &mut sizes),
        Err(OffloadError::IpVersion {
            gso_type: GSO_TCPV4,
            version: 6
        })
    ));
    // UFO (type 3) is not something a TUN should hand us.
    let mut ufo = tcp_super_packet(false, &payload(3000), 1000, 0x10);
    ufo[1] = 3;
    assert!(matches!(
        split_super_packet(&mut ufo, &mut bufs, &mut sizes),
        Err(OffloadError::GsoType(3))
    ));
    // Too many segments for the buffers.
    let mut tiny = tcp_super_packet(false, &payload(60_000), 100, 0x10);
    assert!(matches!(
        split_super_packet(&mut tiny, &mut bufs, &mut sizes),
        Err(OffloadError::TooManySegments(600))
    ));
    // A checksum field beyond the packet.
    let mut beyond = tcp_super_packet(false, &payload(10), 0, 0x10);
    beyond[1] = GSO_NONE;
    beyond[6..8].copy_from_slice(&60_000u16.to_ne_bytes());
    assert!(split_super_packet(&mut beyond, &mut bufs, &mut sizes).is_err());
}

/// Found by the `gateway_split` fuzz target: a TCPv4 GSO read whose packet is only its IP and
/// TCP headers (no payload) split into zero segments, so the read vanished without being
/// counted; it is now a malformed read like any other bad header.
#[test]
fn a_gso_read_without_payload_is_refused() {
    let (mut bufs, mut sizes) = buffers();
    #[rustfmt::skip]
    let mut read = vec![
        // virtio_net_hdr: NEEDS_CSUM, TCPV4, hdr_len 40, gso_size 1000, csum 20 + 16.
        1, GSO_TCPV4, 40, 0, 0xe8, 3, 20, 0, 16, 0,
        // IPv4: total length 40, TTL 64, TCP, 10.1.0.5 -> 10.2.0.7.
        0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 1, 0, 5, 10, 2, 0, 7,
        // TCP: data offset 5, ACK, nothing after it.
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x10, 0, 0, 0, 0, 0, 0,
    ];
    if cfg!(target_endian = "big") {
        for field in read[2..VNET_HDR_LEN].chunks_exact_mut(2) {
            field.swap(0, 1);
        }
    }
    assert!(matches!(
        split_super_packet(&mut read, &mut bufs, &mut sizes),
        Err(OffloadError::Header("GSO packet without payload"))
    ));
}

#[test]
fn random_reads_never_panic() {
    let (mut bufs, mut sizes) = buffers();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let template = tcp_super_packet(false, &payload(4000), 1000, 0x10);
    for round in 0..20_000 {
        let mut read = if round % 2 == 0 {
            // A real super-packet with a few bytes of its headers scrambled.
            let mut read = template.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % (VNET_HDR_LEN + 60);
                read[at] = next() as u8;
            }
            let cut = (next() as usize) % read.len() + 1;
            read.truncate(cut);
            read
        } else {
            let len = (next() % 200) as usize;
            (0..len).map(|_| next() as u8).collect()
        };
        let _ = split_super_packet(&mut read, &mut bufs, &mut sizes);
    }
}

#[test]
fn gso_groups_are_same_size_runs_per_destination_in_order() {
    let mut groups = Vec::new();
    let list = [
        (1456, 'a'),
        (1456, 'a'),
        (1456, 'a'),
        (500, 'a'), // a shorter last one ends the run
        (1456, 'a'),
        (1456, 'b'), // another destination
        (1456, 'b'),
        (148, 'b'), // a handshake, shorter: joins as the last
        (1456, 'b'),
        (2000, 'b'), // longer than the run's size: a new run
    ];
    plan_gso_groups(&list, 64, UDP_MAX_GSO_BYTES, &mut groups);
    let got: Vec<(usize, usize, usize)> = groups
        .iter()
        .map(|g| (g.start, g.count, g.segment))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 4, 1456),
            (4, 1, 1456),
            (5, 3, 1456),
            (8, 1, 1456),
            (9, 1, 2000)
        ]
    );
    // Every datagram is in exactly one group, in order.
    let covered: Vec<usize> = groups.iter().flat_map(|g| g.range()).collect();
    assert_eq!(covered, (0..list.len()).collect::<Vec<_>>());
}

#[test]
fn gso_groups_respect_the_segment_and_byte_limits() {
    let mut groups = Vec::new();
    let list: Vec<(usize, u8)> = (0..200).map(|_| (1456, 0)).collect();
    plan_gso_groups(&list, 64, UDP_MAX_GSO_BYTES, &mut groups);
    // 65,507 bytes hold 44 datagrams of 1,456.
    assert!(groups.iter().all(|g| g.count <= 44 && g.segment == 1456));
    assert_eq!(groups.iter().map(|g| g.count).sum::<usize>(), 200);
    assert_eq!(groups[0].count, 44);
    plan_gso_groups(&list, 10, UDP_MAX_GSO_BYTES, &mut groups);
    assert_eq!(groups.len(), 20);
    plan_gso_groups(&list[..0], 64, UDP_MAX_GSO_BYTES, &mut groups);
    assert!(groups.is_empty());
    // Without GSO (one segment per send) every datagram is its own group.
    plan_gso_groups(&list[..5], 1, UDP_MAX_GSO_BYTES, &mut groups);
    assert_eq!(groups.len(), 5);
}

#[test]
fn gro_reads_are_cut_at_the_segment_size() {
    let cuts: Vec<_> = gro_segments(3000, 1200).collect();
    assert_eq!(cuts, vec![0..1200, 1200..2400, 2400..3000]);
    assert_eq!(gro_segments(80, 80).collect::<Vec<_>>(), vec![0..80]);
    assert_eq!(gro_segments(80, 0).collect::<Vec<_>>(), vec![0..80]);
    assert_eq!(gro_segments(0, 0).count(), 0);
}
