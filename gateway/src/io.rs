//! The device loop's two IO seams, TUN and UDP, as small traits, with the real
//! implementations (tun-rs, tokio) opened inside a chosen network namespace.

use std::future::Future;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};
use trellis_netns::Netns;

use crate::Error;

/// The TUN side: whole IP packets, no extra header.
pub trait Tun: Send + Sync + 'static {
    /// Resolves when a packet may be waiting (false positives allowed).
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Reads one packet, or `WouldBlock`.
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one packet, waiting for room if needed.
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send;
}

/// The UDP side: WireGuard datagrams. Addresses are canonical (IPv4 as IPv4).
pub trait Udp: Send + Sync + 'static {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
    fn send_to(
        &self,
        datagram: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send;
}

/// A TUN device from tun-rs.
pub struct RealTun(tun_rs::AsyncDevice);

impl Tun for RealTun {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.0.readable()
    }
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_recv(buf)
    }
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<usize>> + Send {
        self.0.send(packet)
    }
}

impl RealTun {
    /// Creates (or attaches to) the TUN `name` inside `netns` (or the current namespace), with
    /// the given MTU. Call inside a tokio runtime.
    pub fn open(netns: Option<&Netns>, name: &str, mtu: u16) -> Result<Self, Error> {
        let open_err = |source| Error::OpenTun {
            name: name.to_string(),
            source,
        };
        let build = || {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .packet_information(false)
                .build_sync()
        };
        let device = match netns {
            Some(netns) => netns.run(build)?,
            None => build(),
        }
        .map_err(open_err)?;
        tun_rs::AsyncDevice::new(device).map(Self).map_err(open_err)
    }
}

/// A dual-stack UDP socket (IPv4 peers appear as IPv4, not v4-mapped).
pub struct RealUdp(tokio::net::UdpSocket);

/// The socket buffers we ask for; root may exceed `net.core.rmem_max` (SO_RCVBUFFORCE).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

impl RealUdp {
    /// Binds `[::]:port` (IPv4 too) inside `netns` (or the current namespace). Call inside a
    /// tokio runtime.
    pub fn bind(netns: Option<&Netns>, port: u16) -> Result<Self, Error> {
        let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
        let bind = || -> io::Result<std::net::UdpSocket> {
            let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_only_v6(false)?;
            socket.set_nonblocking(true)?;
            if socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES).is_err() {
                tracing::debug!("could not enlarge the UDP receive buffer");
            }
            let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
            socket.bind(&addr.into())?;
            Ok(socket.into())
        };
        let socket = match netns {
            Some(netns) => netns.run(bind)?,
            None => bind(),
        }
        .map_err(|source| Error::BindUdp { addr, source })?;
        tokio::net::UdpSocket::from_std(socket)
            .map(Self)
            .map_err(|source| Error::BindUdp { addr, source })
    }

    pub fn local_port(&self) -> io::Result<u16> {
        self.0.local_addr().map(|a| a.port())
    }
}

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

impl Udp for RealUdp {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.0.readable()
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.0
            .try_recv_from(buf)
            .map(|(len, from)| (len, canonical(from)))
    }
    fn send_to(
        &self,
        datagram: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        self.0.send_to(datagram, to_socket_family(to))
    }
}
