//! The device loop's two IO seams, TUN and UDP, as small traits, with the real
//! implementations (tun-rs, tokio) opened inside a chosen network namespace.

use std::future::Future;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use nix::sys::socket::{setsockopt, sockopt};
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
        let udp = RealUdp::bind(Some(&ns), 0).unwrap();
        let socket = socket2::SockRef::from(&udp.0);
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
        let (len, from) = udp.try_recv_from(&mut buf).unwrap();
        assert_eq!((len, from), (1, peer.local_addr().unwrap()));
        udp.send_to(b"y", from).await.unwrap();
        assert_eq!(peer.recv(&mut buf).unwrap(), 1);
    }
}
