//! Reachability probes run from inside a namespace, with no tools needed on the machine.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{Error, Netns};

static SEQUENCE: AtomicU16 = AtomicU16::new(1);

/// Sends one ICMP echo request to `destination` from inside `netns` and waits up to `timeout`
/// for the reply. `Ok(Some(rtt))` when it came back, `Ok(None)` when it did not.
pub fn icmp_echo(
    netns: &Netns,
    destination: Ipv4Addr,
    timeout: Duration,
) -> Result<Option<Duration>, Error> {
    let socket = netns
        .run(|| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)))?
        .map_err(|source| Error::EnterNamespace {
            path: netns.path().to_path_buf(),
            source,
        })?;
    let identifier = (std::process::id() & 0xffff) as u16;
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let request = echo_request(identifier, sequence);
    let started = Instant::now();
    let io_error = |source| Error::EnterNamespace {
        path: netns.path().to_path_buf(),
        source,
    };
    socket
        .send_to(
            &request,
            &SocketAddr::new(IpAddr::V4(destination), 0).into(),
        )
        .map_err(io_error)?;
    let mut buffer = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        socket.set_read_timeout(Some(left)).map_err(io_error)?;
        let length = match (&socket).read(&mut buffer) {
            Ok(length) => length,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(io_error(e)),
        };
        if is_echo_reply(&buffer[..length], destination, identifier, sequence) {
            return Ok(Some(started.elapsed()));
        }
    }
}

fn echo_request(identifier: u16, sequence: u16) -> [u8; 24] {
    let mut packet = [0u8; 24];
    packet[0] = 8; // echo request
    packet[4..6].copy_from_slice(&identifier.to_be_bytes());
    packet[6..8].copy_from_slice(&sequence.to_be_bytes());
    packet[8..].copy_from_slice(b"trellis-probe-16");
    let checksum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// A raw IPv4 socket hands over the IP header too.
fn is_echo_reply(packet: &[u8], from: Ipv4Addr, identifier: u16, sequence: u16) -> bool {
    let Some(first) = packet.first() else {
        return false;
    };
    let header_length = usize::from(first & 0x0f) * 4;
    if packet.len() < header_length + 8 || header_length < 20 {
        return false;
    }
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let icmp = &packet[header_length..];
    source == from
        && icmp[0] == 0
        && icmp[4..6] == identifier.to_be_bytes()
        && icmp[6..8] == sequence.to_be_bytes()
}

fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_packet_including_its_checksum_is_zero() {
        let packet = echo_request(0x1234, 7);
        assert_eq!(internet_checksum(&packet), 0);
    }

    #[test]
    fn recognises_only_the_matching_reply() {
        let mut reply = vec![0x45u8; 20];
        reply[12..16].copy_from_slice(&[10, 0, 0, 2]);
        let mut icmp = echo_request(0x1234, 7).to_vec();
        icmp[0] = 0;
        reply.extend_from_slice(&icmp);
        let from = Ipv4Addr::new(10, 0, 0, 2);
        assert!(is_echo_reply(&reply, from, 0x1234, 7));
        assert!(!is_echo_reply(&reply, from, 0x1234, 8));
        assert!(!is_echo_reply(
            &reply,
            Ipv4Addr::new(10, 0, 0, 3),
            0x1234,
            7
        ));
        assert!(!is_echo_reply(&reply[..10], from, 0x1234, 7));
    }
}
