//! The pure half of the offloads: no IO, bytes in, bytes out.
//!
//! - TUN reads with `IFF_VNET_HDR` start with a `virtio_net_hdr`; with TSO/USO on, the packet
//!   behind it may be a *super-packet* (one TCP or UDP header, up to 64 KiB of payload) that
//!   must be cut into MTU-sized segments with their own lengths, IDs, sequence numbers and
//!   checksums before each is encrypted. [`split_super_packet`] validates the header and does
//!   that (the per-segment rewrite is tun-rs's `gso_split`, a port of wireguard-go's).
//! - On the way out to the network, runs of same-sized datagrams to the same endpoint leave
//!   in one `sendmsg` with `UDP_SEGMENT`; [`plan_gso_groups`] decides the runs.
//! - On the way in, a `UDP_GRO` read holds several datagrams of one size back to back;
//!   [`gro_segments`] cuts it.
//!
//! Nothing here trusts its input: a malformed header is an [`OffloadError`], never a panic.

use std::ops::Range;

/// Length of the `virtio_net_hdr` that precedes every packet on an `IFF_VNET_HDR` TUN.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the transport checksum is partial and ours to finish.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;
/// Most segments the kernel puts in one UDP GSO send or GRO read (`UDP_MAX_SEGMENTS`).
pub const UDP_MAX_SEGMENTS: usize = 64;
/// Most UDP payload bytes in one GSO send: an IPv4 datagram's 65,535 less its headers.
pub const UDP_MAX_GSO_BYTES: usize = 65_535 - 20 - 8;
/// The most segments one TUN super-packet is split into before it is refused.
pub const MAX_SPLIT_SEGMENTS: usize = 128;

/// The offloads a device may use, each probed at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `IFF_VNET_HDR` + `TUNSETOFFLOAD` CSUM|TSO4|TSO6: TCP super-packets to and from the TUN.
    TunTso,
    /// `TUNSETOFFLOAD` USO4|USO6 (Linux 6.2+): UDP super-packets too.
    TunUso,
    /// `UDP_SEGMENT`: one `sendmsg` carries many datagrams.
    UdpGso,
    /// `UDP_GRO`: one `recvmsg` returns many datagrams.
    UdpGro,
}

impl Feature {
    pub const ALL: [Feature; 4] = [Self::TunTso, Self::TunUso, Self::UdpGso, Self::UdpGro];

    pub fn label(self) -> &'static str {
        match self {
            Self::TunTso => "tun_tso",
            Self::TunUso => "tun_uso",
            Self::UdpGso => "udp_gso",
            Self::UdpGro => "udp_gro",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Which offloads are on, and how often each was refused (at the start probe or later, at
/// run time), indexed like [`Feature::ALL`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub enabled: [bool; 4],
    pub refused: [u64; 4],
}

impl Offloads {
    pub fn enabled(&self, feature: Feature) -> bool {
        self.enabled[feature.index()]
    }
    /// Both sides' reports in one.
    pub fn merge(mut self, other: Offloads) -> Offloads {
        for i in 0..4 {
            self.enabled[i] |= other.enabled[i];
            self.refused[i] += other.refused[i];
        }
        self
    }
}

/// Why a TUN read could not be turned into packets.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("read shorter than the virtio header ({0} bytes)")]
    Truncated(usize),
    #[error("unsupported GSO type {0}")]
    GsoType(u8),
    #[error("GSO type {gso_type} does not match IP version {version}")]
    IpVersion { gso_type: u8, version: u8 },
    #[error("bad virtio header: {0}")]
    Header(&'static str),
    #[error("super-packet of {0} segments")]
    TooManySegments(usize),
    #[error("segment buffers too small")]
    BufferTooSmall,
    #[error("split refused")]
    Split(#[source] std::io::Error),
}

/// The fields of a `virtio_net_hdr` (native byte order, as the TUN driver writes it for
/// `IFF_VNET_HDR` without `TUNSETVNETLE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(bytes: &[u8]) -> Result<Self, OffloadError> {
        let Some(b) = bytes.get(..VNET_HDR_LEN) else {
            return Err(OffloadError::Truncated(bytes.len()));
        };
        let u16_at = |at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn write(&self, out: &mut [u8; VNET_HDR_LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }

    fn to_tun_rs(self) -> tun_rs::VirtioNetHdr {
        tun_rs::VirtioNetHdr {
            flags: self.flags,
            gso_type: self.gso_type,
            hdr_len: self.hdr_len,
            gso_size: self.gso_size,
            csum_start: self.csum_start,
            csum_offset: self.csum_offset,
        }
    }
}

/// Turns one TUN read (`read` = virtio header + packet) into packets: `bufs[i][..sizes[i]]`
/// for `i` below the returned count. A plain packet is copied (its partial checksum
/// finished if the kernel left it to us); a super-packet is split into segments, each with
/// correct IP and transport checksums. Every `bufs[i]` must be at least as long as the
/// largest segment (the TUN MTU).
pub fn split_super_packet(
    read: &mut [u8],
    bufs: &mut [Vec<u8>],
    sizes: &mut [usize],
) -> Result<usize, OffloadError> {
    let mut hdr = VnetHdr::parse(read)?;
    let packet = &mut read[VNET_HDR_LEN..];
    let len = packet.len();
    if len == 0 {
        return Err(OffloadError::Truncated(VNET_HDR_LEN));
    }
    let (Some(first), Some(first_size)) = (bufs.first_mut(), sizes.first_mut()) else {
        return Err(OffloadError::BufferTooSmall);
    };
    let gso_type = hdr.gso_type & !GSO_ECN;
    if gso_type == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            finish_checksum(packet, hdr.csum_start, hdr.csum_offset)?;
        }
        let out = first.get_mut(..len).ok_or(OffloadError::BufferTooSmall)?;
        out.copy_from_slice(packet);
        *first_size = len;
        return Ok(1);
    }
    let version = packet[0] >> 4;
    let is_v6 = match (gso_type, version) {
        (GSO_TCPV4, 4) | (GSO_UDP_L4, 4) => false,
        (GSO_TCPV6, 6) | (GSO_UDP_L4, 6) => true,
        (GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4, version) => {
            return Err(OffloadError::IpVersion { gso_type, version });
        }
        (other, _) => return Err(OffloadError::GsoType(other)),
    };
    if hdr.gso_size == 0 {
        return Err(OffloadError::Header("gso_size 0"));
    }
    // The kernel's hdr_len may cover a whole forwarded packet; derive it from the transport
    // header instead (csum_start is where that header begins).
    let csum_start = usize::from(hdr.csum_start);
    let transport_len = if gso_type == GSO_UDP_L4 {
        8
    } else {
        let Some(&offset_byte) = packet.get(csum_start + 12) else {
            return Err(OffloadError::Header("TCP header beyond the packet"));
        };
        let tcp_len = usize::from(offset_byte >> 4) * 4;
        if !(20..=60).contains(&tcp_len) {
            return Err(OffloadError::Header("TCP header length"));
        }
        tcp_len
    };
    let hdr_len = csum_start + transport_len;
    if hdr_len > len {
        return Err(OffloadError::Header("headers beyond the packet"));
    }
    hdr.hdr_len = u16::try_from(hdr_len).map_err(|_| OffloadError::Header("hdr_len"))?;
    let payload = len - hdr_len;
    if payload == 0 {
        // The kernel never marks a packet without payload for segmentation; tun-rs would
        // return no segment at all, and the read would vanish uncounted.
        return Err(OffloadError::Header("GSO packet without payload"));
    }
    let segments = payload.div_ceil(usize::from(hdr.gso_size));
    if segments > bufs.len().min(sizes.len()).min(MAX_SPLIT_SEGMENTS) {
        return Err(OffloadError::TooManySegments(segments));
    }
    tun_rs::gso_split(packet, hdr.to_tun_rs(), bufs, sizes, 0, is_v6).map_err(OffloadError::Split)
}

/// Finishes a partial transport checksum (`CHECKSUM_PARTIAL`): the field at
/// `start + offset` holds the pseudo-header sum; the sum over `packet[start..]` goes there.
pub fn finish_checksum(packet: &mut [u8], start: u16, offset: u16) -> Result<(), OffloadError> {
    let start = usize::from(start);
    let at = start + usize::from(offset);
    if at + 2 > packet.len() || start >= packet.len() {
        return Err(OffloadError::Header("checksum field beyond the packet"));
    }
    let initial = u16::from_be_bytes([packet[at], packet[at + 1]]);
    packet[at] = 0;
    packet[at + 1] = 0;
    let sum = !ones_complement_sum(&packet[start..], u32::from(initial));
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The folded 16-bit one's-complement sum of `bytes`, starting from `initial`.
pub fn ones_complement_sum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// One `sendmsg`: datagrams `start..start + count` of the planned list, every one `segment`
/// bytes long except possibly the last, which may be shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsoGroup {
    pub start: usize,
    pub count: usize,
    pub segment: usize,
}

impl GsoGroup {
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.count
    }
}

/// Groups datagrams (`(length, destination)`, in sending order) into UDP GSO sends: a group is
/// a run to one destination whose datagrams all have the first one's length, except a last
/// shorter one that ends the run; at most `max_segments` and `max_bytes` per group. Order is
/// kept, so a peer's packets leave in the order they were encrypted.
pub fn plan_gso_groups<D: PartialEq>(
    datagrams: &[(usize, D)],
    max_segments: usize,
    max_bytes: usize,
    groups: &mut Vec<GsoGroup>,
) {
    groups.clear();
    let max_segments = max_segments.max(1);
    let mut current: Option<(GsoGroup, usize)> = None;
    for (i, (len, to)) in datagrams.iter().enumerate() {
        if let Some((group, bytes)) = &mut current {
            let (first_len, first_to) = &datagrams[group.start];
            let last_len = datagrams[group.start + group.count - 1].0;
            let fits = to == first_to
                && *len <= *first_len
                && last_len == *first_len
                && group.count < max_segments
                && *bytes + len <= max_bytes;
            if fits {
                group.count += 1;
                *bytes += len;
                continue;
            }
            groups.push(*group);
        }
        current = Some((
            GsoGroup {
                start: i,
                count: 1,
                segment: *len,
            },
            *len,
        ));
    }
    if let Some((group, _)) = current {
        groups.push(group);
    }
}

/// The datagrams in one receive of `len` bytes that GRO assembled from `segment`-sized
/// datagrams (the last may be shorter); without GRO `segment` is `len` and this is one range.
pub fn gro_segments(len: usize, segment: usize) -> impl Iterator<Item = Range<usize>> {
    let segment = if segment == 0 { len.max(1) } else { segment };
    (0..len)
        .step_by(segment)
        .map(move |start| start..(start + segment).min(len))
}

#[cfg(test)]
#[path = "offload_tests.rs"]
mod tests;
