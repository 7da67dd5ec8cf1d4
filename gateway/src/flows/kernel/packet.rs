//! The headers of a packet NFLOG copied (the first bytes from the IP header on): addresses,
//! protocol, ports, TCP flags, ICMP type and code. Pure, and defensive: the bytes are whatever
//! the kernel copied, possibly cut short.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use trellis_core::flow::kernel::Tuple;
use trellis_core::flow::{L4Protocol, TcpFlags};

/// What the headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    pub tuple: Tuple,
    pub tcp_flags: Option<TcpFlags>,
    pub icmp: Option<(u8, u8)>,
}

/// Why the bytes are no IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    Version(u8),
    #[error("the IP header is cut short ({0} bytes)")]
    Truncated(usize),
}

/// IPv6 extension headers followed before giving up on finding the layer-4 header.
const MAX_EXTENSION_HEADERS: usize = 8;

/// The headers of `packet`, which starts at its IP header. A layer-4 header that is missing
/// (a later fragment, or cut off by the copy range) leaves the ports at 0 and no flags.
pub fn parse(packet: &[u8]) -> Result<Headers, PacketError> {
    let first = *packet.first().ok_or(PacketError::Empty)?;
    let (source, destination, protocol, l4) = match first >> 4 {
        4 => ipv4(packet)?,
        6 => ipv6(packet)?,
        version => return Err(PacketError::Version(version)),
    };
    let protocol = L4Protocol::from_number(protocol);
    let mut headers = Headers {
        tuple: Tuple {
            source,
            destination,
            protocol,
            source_port: 0,
            destination_port: 0,
        },
        tcp_flags: None,
        icmp: None,
    };
    let Some(l4) = l4 else {
        return Ok(headers);
    };
    let port = |at: usize| l4.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    match protocol {
        L4Protocol::Tcp | L4Protocol::Udp | L4Protocol::Sctp => {
            if let (Some(source), Some(destination)) = (port(0), port(2)) {
                headers.tuple.source_port = source;
                headers.tuple.destination_port = destination;
            }
            if protocol == L4Protocol::Tcp {
                headers.tcp_flags = l4.get(13).map(|byte| TcpFlags::from_byte(*byte));
            }
        }
        L4Protocol::Icmpv4 | L4Protocol::Icmpv6 => {
            if let [kind, code, ..] = *l4 {
                headers.icmp = Some((kind, code));
                // Echo request and reply carry an identifier, which conntrack keeps as the
                // tuple's "port".
                let echo = match protocol {
                    L4Protocol::Icmpv4 => kind == 8 || kind == 0,
                    _ => kind == 128 || kind == 129,
                };
                if echo && let Some(id) = port(4) {
                    headers.tuple.source_port = id;
                }
            }
        }
        L4Protocol::Other(_) => {}
    }
    Ok(headers)
}

type Network<'a> = (IpAddr, IpAddr, u8, Option<&'a [u8]>);

fn ipv4(packet: &[u8]) -> Result<Network<'_>, PacketError> {
    if packet.len() < 20 {
        return Err(PacketError::Truncated(packet.len()));
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(PacketError::Truncated(header_len));
    }
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let destination = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    let l4 = (fragment_offset == 0)
        .then(|| packet.get(header_len..))
        .flatten();
    Ok((source.into(), destination.into(), packet[9], l4))
}

fn ipv6(packet: &[u8]) -> Result<Network<'_>, PacketError> {
    if packet.len() < 40 {
        return Err(PacketError::Truncated(packet.len()));
    }
    let address = |at: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&packet[at..at + 16]);
        Ipv6Addr::from(octets)
    };
    let (source, destination) = (address(8), address(24));
    let mut next = packet[6];
    let mut at = 40;
    let mut l4 = None;
    for _ in 0..=MAX_EXTENSION_HEADERS {
        let Some(header) = packet.get(at..) else {
            break;
        };
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units beyond the first 8.
            0 | 43 | 60 => {
                let [following, length, ..] = *header else {
                    break;
                };
                next = following;
                at += (usize::from(length) + 1) * 8;
            }
            // Fragment: only the first fragment holds the layer-4 header.
            44 => {
                let [following, _, high, low, ..] = *header else {
                    break;
                };
                next = following;
                if u16::from_be_bytes([high, low]) >> 3 != 0 {
                    break;
                }
                at += 8;
            }
            // Authentication header: length in 4-byte units beyond the first 8.
            51 => {
                let [following, length, ..] = *header else {
                    break;
                };
                next = following;
                at += (usize::from(length) + 2) * 4;
            }
            _ => {
                l4 = Some(header);
                break;
            }
        }
    }
    Ok((source.into(), destination.into(), next, l4))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An IPv4 header (20 bytes) for `protocol`, then `l4`.
    pub(crate) fn ipv4_packet(
        source: [u8; 4],
        destination: [u8; 4],
        protocol: u8,
        l4: &[u8],
    ) -> Vec<u8> {
        let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0];
        packet.extend_from_slice(&source);
        packet.extend_from_slice(&destination);
        let total = u16::try_from(packet.len() + l4.len()).unwrap();
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(l4);
        packet
    }

    fn ipv6_packet(next: u8, source: Ipv6Addr, destination: Ipv6Addr, rest: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x60, 0, 0, 0];
        packet.extend_from_slice(&u16::try_from(rest.len()).unwrap().to_be_bytes());
        packet.extend_from_slice(&[next, 64]);
        packet.extend_from_slice(&source.octets());
        packet.extend_from_slice(&destination.octets());
        packet.extend_from_slice(rest);
        packet
    }

    /// A TCP header: ports, then flags at byte 13.
    pub(crate) fn tcp(source: u16, destination: u16, flags: u8) -> Vec<u8> {
        let mut header = vec![0u8; 20];
        header[0..2].copy_from_slice(&source.to_be_bytes());
        header[2..4].copy_from_slice(&destination.to_be_bytes());
        header[12] = 5 << 4;
        header[13] = flags;
        header
    }

    #[test]
    fn a_tcp_syn_over_ipv4() {
        let packet = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, &tcp(41234, 80, 0x02));
        let headers = parse(&packet).unwrap();
        assert_eq!(
            headers.tuple,
            Tuple {
                source: "10.0.0.1".parse().unwrap(),
                destination: "10.0.0.2".parse().unwrap(),
                protocol: L4Protocol::Tcp,
                source_port: 41234,
                destination_port: 80,
            }
        );
        let flags = headers.tcp_flags.unwrap();
        assert!(flags.syn && !flags.ack && !flags.rst);
        assert_eq!(headers.icmp, None);
    }

    #[test]
    fn udp_and_sctp_ports_and_options_in_the_ipv4_header() {
        let mut packet = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 17, &[0, 0, 0, 0]);
        // Four bytes of options (IHL 6) before the UDP header.
        packet[0] = 0x46;
        packet.truncate(20);
        packet.extend_from_slice(&[1, 1, 0, 0]);
        packet.extend_from_slice(&[0x13, 0x88, 0x00, 0x35, 0, 8, 0, 0]);
        let headers = parse(&packet).unwrap();
        assert_eq!(
            (
                headers.tuple.protocol,
                headers.tuple.source_port,
                headers.tuple.destination_port
            ),
            (L4Protocol::Udp, 5000, 53)
        );
        assert_eq!(headers.tcp_flags, None);
        let sctp = ipv4_packet(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            132,
            &[0, 9, 0, 10, 0, 0, 0, 0],
        );
        let headers = parse(&sctp).unwrap();
        assert_eq!(
            (
                headers.tuple.protocol,
                headers.tuple.source_port,
                headers.tuple.destination_port
            ),
            (L4Protocol::Sctp, 9, 10)
        );
    }

    #[test]
    fn icmp_echo_keeps_its_identifier_and_errors_their_type() {
        let echo = ipv4_packet(
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            1,
            &[8, 0, 0, 0, 0x12, 0x34, 0, 1],
        );
        let headers = parse(&echo).unwrap();
        assert_eq!(headers.icmp, Some((8, 0)));
        assert_eq!(headers.tuple.source_port, 0x1234);
        assert_eq!(headers.tuple.protocol, L4Protocol::Icmpv4);
        let unreachable = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 1, &[3, 3, 0, 0, 0, 0, 0, 0]);
        let headers = parse(&unreachable).unwrap();
        assert_eq!((headers.icmp, headers.tuple.source_port), (Some((3, 3)), 0));
        let v6 = ipv6_packet(
            58,
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            &[128, 0, 0, 0, 0, 7, 0, 1],
        );
        let headers = parse(&v6).unwrap();
        assert_eq!(headers.tuple.protocol, L4Protocol::Icmpv6);
        assert_eq!(
            (headers.icmp, headers.tuple.source_port),
            (Some((128, 0)), 7)
        );
    }

    #[test]
    fn ipv6_extension_headers_are_walked_to_the_transport_header() {
        let source: Ipv6Addr = "fd00::1".parse().unwrap();
        let destination: Ipv6Addr = "fd00::2".parse().unwrap();
        // Hop-by-hop (8 bytes) then a first fragment (8 bytes) then TCP.
        let mut rest = vec![44, 0, 0, 0, 0, 0, 0, 0];
        rest.extend_from_slice(&[6, 0, 0, 1, 0, 0, 0, 9]);
        rest.extend_from_slice(&tcp(1000, 443, 0x12));
        let packet = ipv6_packet(0, source, destination, &rest);
        let headers = parse(&packet).unwrap();
        assert_eq!(headers.tuple.source, IpAddr::V6(source));
        assert_eq!(headers.tuple.destination, IpAddr::V6(destination));
        assert_eq!(
            (headers.tuple.source_port, headers.tuple.destination_port),
            (1000, 443)
        );
        let flags = headers.tcp_flags.unwrap();
        assert!(flags.syn && flags.ack);
        // A later fragment: addresses and protocol, no ports.
        let mut later = vec![6, 0, 0x01, 0x00, 0, 0, 0, 9];
        later.extend_from_slice(&tcp(1000, 443, 0x12));
        let headers = parse(&ipv6_packet(44, source, destination, &later)).unwrap();
        assert_eq!(headers.tuple.protocol, L4Protocol::Tcp);
        assert_eq!(headers.tuple.destination_port, 0);
        assert_eq!(headers.tcp_flags, None);
    }

    #[test]
    fn later_ipv4_fragments_and_cut_transport_headers_have_no_ports() {
        let mut fragment = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, &tcp(1, 2, 0x02));
        fragment[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        let headers = parse(&fragment).unwrap();
        assert_eq!((headers.tuple.source_port, headers.tcp_flags), (0, None));
        let cut = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, &[0, 1, 0]);
        let headers = parse(&cut).unwrap();
        assert_eq!((headers.tuple.source_port, headers.tcp_flags), (0, None));
        // Ports but not the flags' byte.
        let short = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, &[0, 1, 0, 2, 0, 0]);
        let headers = parse(&short).unwrap();
        assert_eq!(
            (
                headers.tuple.source_port,
                headers.tuple.destination_port,
                headers.tcp_flags
            ),
            (1, 2, None)
        );
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        assert_eq!(parse(&[]), Err(PacketError::Empty));
        assert_eq!(parse(&[0x15; 40]), Err(PacketError::Version(1)));
        assert_eq!(parse(&[0x45; 19]), Err(PacketError::Truncated(19)));
        let mut bad_ihl = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, &[]);
        bad_ihl[0] = 0x42;
        assert!(parse(&bad_ihl).is_err());
        assert_eq!(parse(&[0x60; 39]), Err(PacketError::Truncated(39)));
        // Every prefix of real packets, and extension headers pointing past the end.
        let packet = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, &tcp(1, 2, 0x02));
        for len in 0..packet.len() {
            let _ = parse(&packet[..len]);
        }
        let chain = ipv6_packet(0, Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, &[0, 255, 0, 0]);
        assert!(parse(&chain).unwrap().tuple.destination_port == 0);
        let looping = ipv6_packet(
            60,
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::LOCALHOST,
            &[60, 0, 0, 0, 0, 0, 0, 0].repeat(20),
        );
        assert_eq!(parse(&looping).unwrap().tuple.destination_port, 0);
    }
}
