//! The device loop's two IO seams, TUN and UDP, as small traits, with the real
//! implementations (tun-rs, tokio) opened inside a chosen network namespace.

use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg, sendmsg, setsockopt,
    sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use trellis_netns::Netns;

use crate::Error;
use crate::offload::{self, VNET_HDR_LEN};

/// Bytes of room in front of every packet handed to [`Tun::send_packets`] (for the
/// `virtio_net_hdr` the TUN wants when offloads are on).
pub const TUN_HEADROOM: usize = VNET_HDR_LEN;

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

    fn index(self) -> usize {
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

/// The TUN side: IP packets (with offloads, several per read or write).
pub trait Tun: Send + Sync + 'static {
    /// Resolves when a packet may be waiting (false positives allowed).
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// One read: a packet, or with offloads a super-packet already split into segments, each
    /// in `bufs[i][..sizes[i]]`; returns how many. `WouldBlock` when nothing waits;
    /// `InvalidData` when what was read is not a packet (count it and go on).
    fn try_recv_packets(&mut self, bufs: &mut [Vec<u8>], sizes: &mut [usize]) -> io::Result<usize>;
    /// Writes packets, each `bufs[i][TUN_HEADROOM..]` (the room in front is the device's);
    /// with offloads, segments of one flow may be coalesced into one write. Waits for room.
    fn send_packets(&mut self, bufs: &mut [Vec<u8>])
    -> impl Future<Output = io::Result<()>> + Send;
    fn offloads(&self) -> Offloads {
        Offloads::default()
    }
}

/// The UDP side: WireGuard datagrams. Addresses are canonical (IPv4 as IPv4).
pub trait Udp: Send + Sync + 'static {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// One receive into `buf` (at least 64 KiB, or GRO reads are cut short): `(length,
    /// segment size, source)`; with GRO, `length` may hold several datagrams of `segment`
    /// bytes back to back (the last may be shorter).
    fn try_recv_gro(&mut self, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)>;
    fn send_to(
        &self,
        datagram: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send;
    /// Sends datagrams to one destination, every one `segment` bytes but the last (which may
    /// be shorter): one `sendmsg` with GSO, else one each.
    fn send_segments(
        &self,
        datagrams: &[IoSlice<'_>],
        segment: usize,
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// How many datagrams one [`Udp::send_segments`] may carry (1 without GSO).
    fn max_segments(&self) -> usize {
        1
    }
    fn offloads(&self) -> Offloads {
        Offloads::default()
    }
}

/// A TUN device from tun-rs, with `IFF_VNET_HDR` offloads when the kernel takes them.
pub struct RealTun {
    device: tun_rs::AsyncDevice,
    /// Offloads on: reads carry a virtio header and may be super-packets.
    vnet_hdr: bool,
    /// One read: virtio header and up to 64 KiB of super-packet.
    read_buf: Vec<u8>,
    gro: tun_rs::GROTable,
    offloads: Offloads,
}

impl Tun for RealTun {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.device.readable()
    }
    fn try_recv_packets(&mut self, bufs: &mut [Vec<u8>], sizes: &mut [usize]) -> io::Result<usize> {
        if !self.vnet_hdr {
            let (Some(buf), Some(size)) = (bufs.first_mut(), sizes.first_mut()) else {
                return Ok(0);
            };
            *size = self.device.try_recv(buf)?;
            return Ok(1);
        }
        let len = self.device.try_recv(&mut self.read_buf)?;
        offload::split_super_packet(&mut self.read_buf[..len], bufs, sizes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
    async fn send_packets(&mut self, bufs: &mut [Vec<u8>]) -> io::Result<()> {
        if bufs.is_empty() {
            return Ok(());
        }
        self.device
            .send_multiple(&mut self.gro, bufs, TUN_HEADROOM)
            .await
            .map(|_| ())
    }
    fn offloads(&self) -> Offloads {
        self.offloads
    }
}

impl RealTun {
    /// Creates (or attaches to) the TUN `name` inside `netns` (or the current namespace), with
    /// the given MTU; with `offload`, asks for TSO/USO and falls back to plain packets (logged,
    /// and reported by [`Tun::offloads`]) if the kernel refuses. Call inside a tokio runtime.
    pub fn open(netns: Option<&Netns>, name: &str, mtu: u16, offload: bool) -> Result<Self, Error> {
        let open_err = |source| Error::OpenTun {
            name: name.to_string(),
            source,
        };
        let build = |offload: bool| {
            let build = || {
                tun_rs::DeviceBuilder::new()
                    .name(name)
                    .mtu(mtu)
                    .packet_information(false)
                    .offload(offload)
                    .build_sync()
            };
            match netns {
                Some(netns) => netns.run(build).map_err(Error::from),
                None => Ok(build()),
            }
        };
        let mut offloads = Offloads::default();
        let device = if offload {
            match build(true)? {
                Ok(device) => device,
                Err(e) => {
                    tracing::warn!(
                        "TUN offloads (IFF_VNET_HDR, TSO) refused: {e}; reading one packet at a time"
                    );
                    offloads.refused[Feature::TunTso.index()] += 1;
                    offloads.refused[Feature::TunUso.index()] += 1;
                    build(false)?.map_err(open_err)?
                }
            }
        } else {
            build(false)?.map_err(open_err)?
        };
        let vnet_hdr = device.tcp_gso();
        offloads.enabled[Feature::TunTso.index()] = vnet_hdr;
        offloads.enabled[Feature::TunUso.index()] = device.udp_gso();
        if vnet_hdr && !device.udp_gso() {
            tracing::info!("TUN UDP segmentation offload (USO, Linux 6.2+) refused; TCP only");
            offloads.refused[Feature::TunUso.index()] += 1;
        }
        let device = tun_rs::AsyncDevice::new(device).map_err(open_err)?;
        Ok(Self {
            device,
            vnet_hdr,
            read_buf: vec![0; if vnet_hdr { VNET_HDR_LEN + 65_535 } else { 0 }],
            gro: tun_rs::GROTable::new(),
            offloads,
        })
    }
}

/// A dual-stack UDP socket (IPv4 peers appear as IPv4, not v4-mapped), with `UDP_SEGMENT`
/// and `UDP_GRO` when the kernel takes them.
pub struct RealUdp {
    socket: tokio::net::UdpSocket,
    /// GSO in use; cleared for good if a send with it fails the way unsupported GSO does.
    gso: AtomicBool,
    gso_refused: AtomicU64,
    gro: bool,
    gro_refused: u64,
    /// Control-message space for `UDP_GRO`'s segment size, allocated once.
    cmsg: Vec<u8>,
}

/// The socket buffers we ask for; root may exceed `net.core.rmem_max` (SO_RCVBUFFORCE).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

impl RealUdp {
    /// Binds `[::]:port` (IPv4 too) inside `netns` (or the current namespace); with `offload`,
    /// turns on `UDP_GRO` and checks `UDP_SEGMENT`, falling back (logged, reported by
    /// [`Udp::offloads`]) where refused. Call inside a tokio runtime.
    pub fn bind(netns: Option<&Netns>, port: u16, offload: bool) -> Result<Self, Error> {
        let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
        let bind = || -> io::Result<std::net::UdpSocket> {
            let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_only_v6(false)?;
            socket.set_nonblocking(true)?;
            // Past net.core.{r,w}mem_max when we may (CAP_NET_ADMIN), else as far as allowed.
            if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES).is_err() {
                let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
            }
            if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES).is_err() {
                let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
            }
            tracing::debug!(
                receive = socket.recv_buffer_size().unwrap_or(0),
                send = socket.send_buffer_size().unwrap_or(0),
                "UDP socket buffers"
            );
            socket.bind(&addr.into())?;
            Ok(socket.into())
        };
        let socket = match netns {
            Some(netns) => netns.run(bind)?,
            None => bind(),
        }
        .map_err(|source| Error::BindUdp { addr, source })?;
        let (mut gso, mut gso_refused, mut gro, mut gro_refused) = (false, 0, false, 0);
        if offload {
            // Setting the socket's default segment size to 0 probes UDP_SEGMENT support.
            match setsockopt(&socket, sockopt::UdpGsoSegment, &0) {
                Ok(()) => gso = true,
                Err(e) => {
                    tracing::warn!("UDP GSO (UDP_SEGMENT) refused: {e}; one datagram per send");
                    gso_refused = 1;
                }
            }
            match setsockopt(&socket, sockopt::UdpGroSegment, &true) {
                Ok(()) => gro = true,
                Err(e) => {
                    tracing::warn!("UDP GRO (UDP_GRO) refused: {e}; one datagram per receive");
                    gro_refused = 1;
                }
            }
        }
        let socket = tokio::net::UdpSocket::from_std(socket)
            .map_err(|source| Error::BindUdp { addr, source })?;
        Ok(Self {
            socket,
            gso: AtomicBool::new(gso),
            gso_refused: AtomicU64::new(gso_refused),
            gro,
            gro_refused,
            cmsg: nix::cmsg_space!(libc_int),
        })
    }

    pub fn local_port(&self) -> io::Result<u16> {
        self.socket.local_addr().map(|a| a.port())
    }

    /// One datagram per send: without GSO, or when the kernel refused a GSO send.
    async fn send_each(&self, datagrams: &[IoSlice<'_>], to: SocketAddr) -> io::Result<()> {
        let mut result = Ok(());
        for datagram in datagrams {
            if let Err(e) = self.socket.send_to(datagram, to_socket_family(to)).await {
                result = Err(e);
            }
        }
        result
    }
}

/// `cmsg_space!` needs a type name.
#[allow(non_camel_case_types)]
type libc_int = i32;

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn to_socket_family(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        v6 => v6,
    }
}

fn to_sockaddr(addr: SocketAddr) -> SockaddrIn6 {
    match to_socket_family(addr) {
        SocketAddr::V6(v6) => SockaddrIn6::from(v6),
        SocketAddr::V4(_) => unreachable!("to_socket_family maps IPv4 to IPv6"),
    }
}

impl Udp for RealUdp {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.socket.readable()
    }
    fn try_recv_gro(&mut self, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
        if !self.gro {
            let (len, from) = self.socket.try_recv_from(buf)?;
            return Ok((len, len, canonical(from)));
        }
        let Self { socket, cmsg, .. } = self;
        let fd = socket.as_raw_fd();
        socket.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(buf)];
            let message = recvmsg::<SockaddrIn6>(fd, &mut iov, Some(cmsg), MsgFlags::empty())
                .map_err(io::Error::from)?;
            let len = message.bytes;
            let mut segment = len;
            if let Ok(cmsgs) = message.cmsgs() {
                for control in cmsgs {
                    if let ControlMessageOwned::UdpGroSegments(size) = control {
                        segment = usize::try_from(size).unwrap_or(len);
                    }
                }
            }
            let from = message
                .address
                .map(|a| canonical(SocketAddr::V6(SocketAddrV6::from(a))))
                .ok_or_else(|| io::Error::other("datagram without a source address"))?;
            Ok((len, segment, from))
        })
    }
    fn send_to(
        &self,
        datagram: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        self.socket.send_to(datagram, to_socket_family(to))
    }
    async fn send_segments(
        &self,
        datagrams: &[IoSlice<'_>],
        segment: usize,
        to: SocketAddr,
    ) -> io::Result<()> {
        if datagrams.len() < 2 || !self.gso.load(Ordering::Relaxed) {
            return self.send_each(datagrams, to).await;
        }
        let Ok(segment) = u16::try_from(segment) else {
            return self.send_each(datagrams, to).await;
        };
        let address = to_sockaddr(to);
        let fd = self.socket.as_raw_fd();
        let sent = self
            .socket
            .async_io(Interest::WRITABLE, || {
                sendmsg(
                    fd,
                    datagrams,
                    &[ControlMessage::UdpGsoSegments(&segment)],
                    MsgFlags::empty(),
                    Some(&address),
                )
                .map_err(io::Error::from)
            })
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error().map(Errno::from_raw) {
                // What a device without checksum offload or segmentation answers.
                Some(Errno::EIO | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT) => {
                    if self.gso.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            "UDP GSO send refused ({e}); one datagram per send from now on"
                        );
                        self.gso_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    self.send_each(datagrams, to).await
                }
                // Too large for this path as one: send them one by one.
                Some(Errno::EMSGSIZE) => self.send_each(datagrams, to).await,
                _ => Err(e),
            },
        }
    }
    fn max_segments(&self) -> usize {
        if self.gso.load(Ordering::Relaxed) {
            offload::UDP_MAX_SEGMENTS
        } else {
            1
        }
    }
    fn offloads(&self) -> Offloads {
        let mut offloads = Offloads::default();
        offloads.enabled[Feature::UdpGso.index()] = self.gso.load(Ordering::Relaxed);
        offloads.refused[Feature::UdpGso.index()] = self.gso_refused.load(Ordering::Relaxed);
        offloads.enabled[Feature::UdpGro.index()] = self.gro;
        offloads.refused[Feature::UdpGro.index()] = self.gro_refused;
        offloads
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use trellis_netns::Netlink;
    use trellis_netns::testing::TempNetns;

    /// A namespace of the test's own with loopback up: no test traffic in the host's.
    pub(crate) async fn loopback_netns(prefix: &str) -> TempNetns {
        let ns = TempNetns::new(prefix).unwrap();
        let netlink = Netlink::connect_in(&ns).unwrap();
        let lo = netlink.require_link("lo").await.unwrap();
        netlink.set_up(lo.index).await.unwrap();
        ns
    }

    #[tokio::test]
    async fn the_socket_gets_large_buffers_and_is_dual_stack() {
        let ns = loopback_netns("gw-io").await;
        let mut udp = RealUdp::bind(Some(&ns), 0, true).unwrap();
        let socket = socket2::SockRef::from(&udp.socket);
        // The kernel reports twice what was set; as root the force options apply.
        assert!(socket.recv_buffer_size().unwrap() >= SOCKET_BUFFER_BYTES);
        assert!(!socket.only_v6().unwrap());
        // An IPv4 peer is reported as IPv4, not v4-mapped.
        let port = udp.local_port().unwrap();
        let peer = ns
            .run(|| std::net::UdpSocket::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        peer.send_to(b"x", ("127.0.0.1", port)).unwrap();
        udp.readable().await.unwrap();
        let mut buf = [0u8; 8];
        let (len, segment, from) = udp.try_recv_gro(&mut buf).unwrap();
        assert_eq!((len, segment, from), (1, 1, peer.local_addr().unwrap()));
        udp.send_to(b"y", from).await.unwrap();
        assert_eq!(peer.recv(&mut buf).unwrap(), 1);
    }
}
