//! The device loop's two IO seams, TUN and UDP, as small traits, with the real
//! implementations (tun-rs, tokio) opened inside a chosen network namespace.

use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};
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
pub use crate::offload::{Feature, Offloads};
use crate::steering::{SteeringError, SteeringSwitch};

/// Bytes of room in front of every packet handed to [`Tun::send_packets`] (for the
/// `virtio_net_hdr` the TUN wants when offloads are on).
pub const TUN_HEADROOM: usize = VNET_HDR_LEN;

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

/// One TUN queue, opened but not yet registered with a runtime.
struct TunQueue {
    device: tun_rs::SyncDevice,
    offloads: Offloads,
}

impl TunQueue {
    fn into_async(self, name: &str) -> Result<RealTun, Error> {
        let vnet_hdr = self.device.tcp_gso();
        let device = tun_rs::AsyncDevice::new(self.device).map_err(|source| Error::OpenTun {
            name: name.to_string(),
            source,
        })?;
        Ok(RealTun {
            device,
            vnet_hdr,
            read_buf: vec![0; if vnet_hdr { VNET_HDR_LEN + 65_535 } else { 0 }],
            gro: tun_rs::GROTable::new(),
            offloads: self.offloads,
        })
    }
}

/// Opens the TUN `name` with `queues` queues (`IFF_MULTI_QUEUE` when more than one; the
/// others are clones of the first, with its offloads), in queue order.
fn open_tun_queues(
    netns: Option<&Netns>,
    name: &str,
    mtu: u16,
    offload: bool,
    queues: usize,
) -> Result<Vec<TunQueue>, Error> {
    let open_err = |source| Error::OpenTun {
        name: name.to_string(),
        source,
    };
    let multi_queue = queues > 1;
    // Every queue is opened inside the namespace: TUNSETIFF finds the device by name there.
    let in_netns = |f: &(dyn Fn() -> io::Result<tun_rs::SyncDevice> + Sync)| match netns {
        Some(netns) => netns.run(f).map_err(Error::from),
        None => Ok(f()),
    };
    let build = |offload: bool| {
        in_netns(&|| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .packet_information(false)
                .offload(offload)
                .multi_queue(multi_queue)
                .build_sync()
        })
    };
    let mut offloads = Offloads::default();
    let first = if offload {
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
    // Further queues are clones of the first, with its offloads.
    let mut devices = Vec::with_capacity(queues);
    for _ in 1..queues {
        devices.push(in_netns(&|| first.try_clone())?.map_err(open_err)?);
    }
    devices.insert(0, first);
    let device = &devices[0];
    let vnet_hdr = device.tcp_gso();
    offloads.enabled[Feature::TunTso.index()] = vnet_hdr;
    offloads.enabled[Feature::TunUso.index()] = device.udp_gso();
    if vnet_hdr && !device.udp_gso() {
        tracing::info!("TUN UDP segmentation offload (USO, Linux 6.2+) refused; TCP only");
        offloads.refused[Feature::TunUso.index()] += 1;
    }
    Ok(devices
        .into_iter()
        .map(|device| TunQueue { device, offloads })
        .collect())
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

/// One UDP socket, bound but not yet registered with a runtime.
struct BoundUdp {
    socket: std::net::UdpSocket,
    addr: SocketAddr,
    gso: bool,
    gso_refused: u64,
    gro: bool,
    gro_refused: u64,
}

impl BoundUdp {
    fn into_async(self) -> Result<RealUdp, Error> {
        let addr = self.addr;
        let socket = tokio::net::UdpSocket::from_std(self.socket)
            .map_err(|source| Error::BindUdp { addr, source })?;
        Ok(RealUdp {
            socket,
            gso: AtomicBool::new(self.gso),
            gso_refused: AtomicU64::new(self.gso_refused),
            gro: self.gro,
            gro_refused: self.gro_refused,
            cmsg: nix::cmsg_space!(libc_int),
        })
    }
}

/// Binds `count` sockets on `[::]:port` (with `SO_REUSEPORT` when more than one; with port 0
/// the others take the port the first got), in bind order, which is their index in the
/// reuseport group.
fn bind_udp_sockets(
    netns: Option<&Netns>,
    port: u16,
    offload: bool,
    count: usize,
) -> Result<Vec<BoundUdp>, Error> {
    let reuse_port = count > 1;
    let bind = |port: u16| -> (SocketAddr, io::Result<std::net::UdpSocket>) {
        let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
        let bind = || -> io::Result<std::net::UdpSocket> {
            let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_only_v6(false)?;
            socket.set_nonblocking(true)?;
            if reuse_port {
                socket.set_reuse_port(true)?;
            }
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
        (addr, bind())
    };
    let mut sockets = Vec::with_capacity(count);
    let mut port = port;
    for _ in 0..count {
        let (addr, socket) = match netns {
            Some(netns) => netns.run(|| bind(port))?,
            None => bind(port),
        };
        let socket = socket.map_err(|source| Error::BindUdp { addr, source })?;
        if port == 0 {
            port = socket
                .local_addr()
                .map_err(|source| Error::BindUdp { addr, source })?
                .port();
        }
        let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
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
        sockets.push(BoundUdp {
            socket,
            addr,
            gso,
            gso_refused,
            gro,
            gro_refused,
        });
    }
    Ok(sockets)
}

/// One device worker's I/O, a TUN queue and a UDP socket, opened but not yet registered with
/// any runtime (so it can be moved to the worker's own thread).
pub struct WorkerIo {
    name: String,
    tun: TunQueue,
    udp: BoundUdp,
}

impl WorkerIo {
    /// Registers both with the current tokio runtime: call on the worker's own thread, inside
    /// its runtime.
    pub fn into_async(self) -> Result<(RealTun, RealUdp), Error> {
        Ok((self.tun.into_async(&self.name)?, self.udp.into_async()?))
    }

    /// The UDP port (the one the kernel chose, when 0 was asked).
    pub fn local_port(&self) -> io::Result<u16> {
        self.udp.socket.local_addr().map(|a| a.port())
    }
}

/// How the workers' I/O came out: one [`WorkerIo`] per queue, worker `i` owning TUN queue `i`
/// and UDP socket `i` (the ones steered packets processed on CPU `i` modulo the count go to).
pub struct OpenedIo {
    pub workers: Vec<WorkerIo>,
    pub layout: QueueLayout,
    /// Turns spreading over the workers on and off; `None` with one worker.
    pub switch: Option<SteeringSwitch>,
}

/// The queue count, and why it is 1 when more were asked.
#[derive(Debug)]
pub struct QueueLayout {
    pub queues: usize,
    /// Why per-CPU steering was refused (and one queue used instead), if it was.
    pub refused: Option<SteeringRefused>,
}

/// Which part of per-CPU steering was refused.
#[derive(Debug, thiserror::Error)]
pub enum SteeringRefused {
    #[error("{queues} queues is too many")]
    TooManyQueues { queues: usize },
    #[error("multi-queue TUN")]
    MultiQueueTun(#[source] Error),
    #[error("SO_REUSEPORT UDP sockets")]
    ReuseportSockets(#[source] Error),
    #[error("attach the steering programs")]
    Attach(#[source] SteeringError),
}

/// Opens the TUN `name` with `queues` queues and binds `queues` dual-stack UDP sockets on
/// `port`, each packet steered to the queue and socket of the CPU that processes it (CPU
/// modulo `queues`; on the TUN, a socket-hashed flow by its hash): TUN packets by an eBPF
/// program (`TUNSETSTEERINGEBPF`), datagrams by a classic BPF one on the `SO_REUSEPORT`
/// group, both switchable with [`OpenedIo::switch`]. If any part of that is refused, falls
/// back to one queue and one socket (logged, and said in [`QueueLayout::refused`]): the counts
/// are always equal, as a TUN queue nobody reads would black-hole its packets. `queues <= 1`
/// opens one plain TUN and socket (no multi-queue flag, no reuseport). Offloads are asked
/// for with `offload`, each probed and falling back where refused.
pub fn open_worker_io(
    netns: Option<&Netns>,
    name: &str,
    mtu: u16,
    port: u16,
    offload: bool,
    queues: usize,
) -> Result<OpenedIo, Error> {
    if queues > 1 {
        match open_steered(netns, name, mtu, port, offload, queues) {
            Ok((workers, switch)) => {
                return Ok(OpenedIo {
                    workers,
                    layout: QueueLayout {
                        queues,
                        refused: None,
                    },
                    switch: Some(switch),
                });
            }
            Err(reason) => {
                tracing::warn!(
                    "per-CPU steering over {queues} queues refused ({}); one TUN queue and one UDP socket",
                    trellis_core::error_chain(&reason)
                );
                let workers = open_single(netns, name, mtu, port, offload)?;
                return Ok(OpenedIo {
                    workers,
                    layout: QueueLayout {
                        queues: 1,
                        refused: Some(reason),
                    },
                    switch: None,
                });
            }
        }
    }
    Ok(OpenedIo {
        workers: open_single(netns, name, mtu, port, offload)?,
        layout: QueueLayout {
            queues: 1,
            refused: None,
        },
        switch: None,
    })
}

fn open_single(
    netns: Option<&Netns>,
    name: &str,
    mtu: u16,
    port: u16,
    offload: bool,
) -> Result<Vec<WorkerIo>, Error> {
    let tun = open_tun_queues(netns, name, mtu, offload, 1)?;
    let udp = bind_udp_sockets(netns, port, offload, 1)?;
    Ok(pair(name, tun, udp))
}

fn pair(name: &str, tun: Vec<TunQueue>, udp: Vec<BoundUdp>) -> Vec<WorkerIo> {
    tun.into_iter()
        .zip(udp)
        .map(|(tun, udp)| WorkerIo {
            name: name.to_string(),
            tun,
            udp,
        })
        .collect()
}

/// The steered open; on any refusal, says which part and why (everything opened so far is
/// closed again when it returns, which deletes a TUN it created).
fn open_steered(
    netns: Option<&Netns>,
    name: &str,
    mtu: u16,
    port: u16,
    offload: bool,
    queues: usize,
) -> Result<(Vec<WorkerIo>, SteeringSwitch), SteeringRefused> {
    let count = u32::try_from(queues).map_err(|_| SteeringRefused::TooManyQueues { queues })?;
    let tun = open_tun_queues(netns, name, mtu, offload, queues)
        .map_err(SteeringRefused::MultiQueueTun)?;
    let udp = bind_udp_sockets(netns, port, offload, queues)
        .map_err(SteeringRefused::ReuseportSockets)?;
    let switch = SteeringSwitch::attach(tun[0].device.as_fd(), udp[0].socket.as_fd(), count)
        .map_err(SteeringRefused::Attach)?;
    Ok((pair(name, tun, udp), switch))
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
        trellis_test_support::skip_unless_root!();
        let ns = loopback_netns("gw-io").await;
        let mut udp = bind_udp_sockets(Some(&ns), 0, true, 1)
            .unwrap()
            .pop()
            .unwrap()
            .into_async()
            .unwrap();
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

    /// Runs `f` on a fresh thread pinned to `cpu`.
    fn on_cpu<T: Send>(cpu: usize, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut set = nix::sched::CpuSet::new();
                    set.set(cpu).unwrap();
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// CPU 0, and CPU 1 when this process may run there (else its half of a test is skipped).
    fn steering_cpus() -> Vec<usize> {
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        let cpus: Vec<usize> = [0, 1]
            .into_iter()
            .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
            .collect();
        if cpus.len() < 2 {
            eprintln!("fewer than 2 CPUs: only CPU {cpus:?} is checked");
        }
        cpus
    }

    /// The TUN `name` up in `ns` with 198.19.<net>.1/24, so 198.19.<net>.2 is routed into it.
    async fn tun_up(ns: &TempNetns, name: &str, net: u8) {
        let netlink = Netlink::connect_in(ns).unwrap();
        let tun = netlink.require_link(name).await.unwrap();
        netlink
            .add_address(tun.index, format!("198.19.{net}.1/24").parse().unwrap())
            .await
            .unwrap();
        netlink.set_up(tun.index).await.unwrap();
    }

    /// Reads every queue (nonblocking) for up to a second until `expected` reads contain
    /// `marker`; then how many did, per queue.
    fn tun_marker_counts(
        queues: &[&tun_rs::SyncDevice],
        marker: &[u8],
        expected: usize,
    ) -> Vec<usize> {
        let mut counts = vec![0; queues.len()];
        let mut buf = vec![0u8; VNET_HDR_LEN + 65_535];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while counts.iter().sum::<usize>() < expected && std::time::Instant::now() < deadline {
            for (queue, count) in queues.iter().zip(&mut counts) {
                while let Ok(len) = queue.recv(&mut buf) {
                    if buf[..len].windows(marker.len()).any(|w| w == marker) {
                        *count += 1;
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        counts
    }

    /// Reads every socket (nonblocking) for up to a second until `expected` datagrams came;
    /// then how many each got.
    fn udp_counts(sockets: &[&std::net::UdpSocket], expected: usize) -> Vec<usize> {
        let mut counts = vec![0; sockets.len()];
        let mut buf = [0u8; 2048];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while counts.iter().sum::<usize>() < expected && std::time::Instant::now() < deadline {
            for (socket, count) in sockets.iter().zip(&mut counts) {
                while socket.recv_from(&mut buf).is_ok() {
                    *count += 1;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        counts
    }

    #[tokio::test]
    async fn two_queues_open_with_steering_on_one_port() {
        trellis_test_support::skip_unless_root!();
        let ns = loopback_netns("gw-steer").await;
        let opened = open_worker_io(Some(&ns), "steer0", 1420, 0, true, 2).unwrap();
        assert_eq!(opened.layout.queues, 2);
        assert!(opened.layout.refused.is_none());
        assert_eq!(opened.workers.len(), 2);
        let port = opened.workers[0].local_port().unwrap();
        assert_ne!(port, 0);
        assert_eq!(opened.workers[1].local_port().unwrap(), port);
        for worker in &opened.workers {
            // Each queue keeps the offloads of the first.
            assert!(worker.tun.device.tcp_gso());
            assert_eq!(worker.tun.offloads, opened.workers[0].tun.offloads);
            assert!(worker.udp.gro);
            let socket = socket2::SockRef::from(&worker.udp.socket);
            assert!(socket.reuse_port().unwrap());
            assert!(!socket.only_v6().unwrap());
        }
    }

    #[tokio::test]
    async fn datagrams_go_to_the_socket_of_the_cpu_they_arrive_on() {
        trellis_test_support::skip_unless_root!();
        let ns = loopback_netns("gw-steer").await;
        let opened = open_worker_io(Some(&ns), "steer1", 1420, 0, false, 2).unwrap();
        assert!(opened.layout.refused.is_none());
        let port = opened.workers[0].local_port().unwrap();
        let sockets: Vec<_> = opened.workers.iter().map(|w| &w.udp.socket).collect();
        for cpu in steering_cpus() {
            for peer in ["127.0.0.1", "::1"] {
                let socket = ns
                    .run(|| std::net::UdpSocket::bind((peer, 0)))
                    .unwrap()
                    .unwrap();
                on_cpu(cpu, || {
                    for _ in 0..8 {
                        socket.send_to(b"steer", (peer, port)).unwrap();
                    }
                });
                let mut expected = vec![0; 2];
                expected[cpu] = 8;
                assert_eq!(
                    udp_counts(&sockets, 8),
                    expected,
                    "sent from CPU {cpu} to {peer}"
                );
            }
        }
    }

    /// A plain TUN and socket, as before workers: no `IFF_MULTI_QUEUE` (no further queue can
    /// be attached), no reuseport, and the TUN's offloads on.
    fn assert_plain(worker: &WorkerIo) {
        let clone = worker.tun.device.try_clone();
        assert_eq!(
            clone.err().map(|e| e.kind()),
            Some(io::ErrorKind::Unsupported)
        );
        assert!(worker.tun.device.tcp_gso());
        let socket = socket2::SockRef::from(&worker.udp.socket);
        assert!(!socket.reuse_port().unwrap());
    }

    /// Two steered workers' I/O (offloads off) in a fresh namespace, the TUN up with
    /// 198.19.`net`.1/24 and its queues nonblocking; `None` (skipped) with one CPU.
    async fn two_steered_queues(name: &str, net: u8) -> Option<(TempNetns, OpenedIo)> {
        if steering_cpus().len() < 2 {
            eprintln!("skipped: one CPU");
            return None;
        }
        let ns = loopback_netns("gw-steer").await;
        let opened = open_worker_io(Some(&ns), name, 1420, 0, false, 2).unwrap();
        tun_up(&ns, name, net).await;
        for worker in &opened.workers {
            worker.tun.device.set_nonblocking(true).unwrap();
        }
        Some((ns, opened))
    }

    /// Under bulk load everything goes to the first worker, from every CPU; spread again, each
    /// CPU's packets go back to its own worker.
    #[tokio::test]
    async fn the_switch_sends_everything_to_the_first_worker_and_back() {
        trellis_test_support::skip_unless_root!();
        let net = 8;
        let Some((ns, opened)) = two_steered_queues("steer8", net).await else {
            return;
        };
        let switch = opened
            .switch
            .as_ref()
            .expect("a steered device has a switch");
        let queues: Vec<_> = opened.workers.iter().map(|w| &w.tun.device).collect();
        let sockets: Vec<_> = opened.workers.iter().map(|w| &w.udp.socket).collect();
        let port = opened.workers[0].local_port().unwrap();
        let sender = ns
            .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        let to_tun = std::net::SocketAddr::from(([198, 19, net, 2], 9));
        // From CPU 1: (TUN queue counts, socket counts).
        let send_from_cpu_1 = |marker: &[u8]| {
            on_cpu(1, || {
                for _ in 0..8 {
                    sender.send_to(marker, to_tun).unwrap();
                    sender.send_to(marker, ("127.0.0.1", port)).unwrap();
                }
            });
            (
                tun_marker_counts(&queues, marker, 8),
                udp_counts(&sockets, 8),
            )
        };
        assert_eq!(send_from_cpu_1(b"spread-1"), (vec![0, 8], vec![0, 8]));
        switch.spread(false).unwrap();
        assert_eq!(send_from_cpu_1(b"first-1"), (vec![8, 0], vec![8, 0]));
        switch.spread(true).unwrap();
        assert_eq!(send_from_cpu_1(b"spread-2"), (vec![0, 8], vec![0, 8]));
    }

    async fn tun_packets_go_to_the_queue_of_the_sending_cpu(offload: bool, name: &str, net: u8) {
        let ns = loopback_netns("gw-steer").await;
        let opened = open_worker_io(Some(&ns), name, 1420, 0, offload, 2).unwrap();
        assert!(opened.layout.refused.is_none());
        tun_up(&ns, name, net).await;
        let queues: Vec<_> = opened.workers.iter().map(|w| &w.tun.device).collect();
        for queue in &queues {
            queue.set_nonblocking(true).unwrap();
        }
        let socket = ns
            .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        let target = std::net::SocketAddr::from(([198, 19, net, 2], 9));
        for cpu in steering_cpus() {
            let marker = format!("steer-tun-cpu-{cpu}");
            on_cpu(cpu, || {
                for _ in 0..8 {
                    socket.send_to(marker.as_bytes(), target).unwrap();
                }
            });
            let mut expected = vec![0; 2];
            expected[cpu] = 8;
            assert_eq!(
                tun_marker_counts(&queues, marker.as_bytes(), 8),
                expected,
                "sent from CPU {cpu}"
            );
        }
    }

    /// A flow whose socket hashed it (here a connected UDP socket; TCP likewise) keeps one
    /// queue whichever CPU sends, so two workers never race over its packets' order.
    #[tokio::test]
    async fn a_hashed_flow_keeps_one_queue_from_every_cpu() {
        trellis_test_support::skip_unless_root!();
        let net = 7;
        let Some((ns, opened)) = two_steered_queues("steer7", net).await else {
            return;
        };
        let queues: Vec<_> = opened.workers.iter().map(|w| &w.tun.device).collect();
        let socket = ns
            .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        socket
            .connect(std::net::SocketAddr::from(([198, 19, net, 2], 9)))
            .unwrap();
        let marker = b"steer-one-flow";
        for cpu in steering_cpus() {
            on_cpu(cpu, || {
                for _ in 0..8 {
                    socket.send(marker).unwrap();
                }
            });
        }
        let mut counts = tun_marker_counts(&queues, marker, 16);
        counts.sort();
        assert_eq!(counts, [0, 16], "one flow, one queue");
    }

    #[tokio::test]
    async fn tun_packets_go_to_the_queue_of_the_cpu_that_sends_them() {
        trellis_test_support::skip_unless_root!();
        tun_packets_go_to_the_queue_of_the_sending_cpu(false, "steer2", 2).await;
    }

    #[tokio::test]
    async fn tun_packets_are_steered_with_offloads_on_too() {
        trellis_test_support::skip_unless_root!();
        tun_packets_go_to_the_queue_of_the_sending_cpu(true, "steer3", 3).await;
    }

    #[tokio::test]
    async fn a_refused_part_falls_back_to_one_plain_queue_and_socket() {
        trellis_test_support::skip_unless_root!();
        let ns = loopback_netns("gw-steer").await;
        // A TUN takes at most 256 queues (MAX_TAP_QUEUES): the 257th is refused.
        let opened = open_worker_io(Some(&ns), "steer6", 1420, 0, true, 257).unwrap();
        assert_eq!(opened.layout.queues, 1);
        let reason = opened.layout.refused.unwrap();
        assert!(
            matches!(reason, SteeringRefused::MultiQueueTun(_)),
            "{reason:?}"
        );
        assert_eq!(opened.workers.len(), 1);
        let worker = &opened.workers[0];
        // A plain TUN and socket, and the offloads not blamed for the refusal.
        assert_plain(worker);
        assert_eq!(worker.tun.offloads.refused[Feature::TunTso.index()], 0);
        // And it carries traffic.
        tun_up(&ns, "steer6", 6).await;
        worker.tun.device.set_nonblocking(true).unwrap();
        let peer = ns
            .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        peer.send_to(b"fallback", ("198.19.6.2", 9)).unwrap();
        assert_eq!(
            tun_marker_counts(&[&worker.tun.device], b"fallback", 1),
            [1]
        );
        let port = worker.local_port().unwrap();
        peer.send_to(b"fallback", ("127.0.0.1", port)).unwrap();
        assert_eq!(udp_counts(&[&worker.udp.socket], 1), [1]);
    }

    #[tokio::test]
    async fn one_queue_is_a_plain_tun_and_a_plain_socket() {
        trellis_test_support::skip_unless_root!();
        let ns = loopback_netns("gw-steer").await;
        let opened = open_worker_io(Some(&ns), "steer4", 1420, 0, true, 1).unwrap();
        assert_eq!(opened.layout.queues, 1);
        assert!(opened.layout.refused.is_none());
        assert_eq!(opened.workers.len(), 1);
        let worker = &opened.workers[0];
        assert_plain(worker);
        let socket = socket2::SockRef::from(&worker.udp.socket);
        assert!(socket.recv_buffer_size().unwrap() >= SOCKET_BUFFER_BYTES);
        assert!(worker.udp.gro);
    }

    #[tokio::test]
    async fn each_worker_registers_with_its_own_runtime_and_passes_traffic() {
        trellis_test_support::skip_unless_root!();
        let ns = loopback_netns("gw-steer").await;
        let name = "steer5";
        let opened = open_worker_io(Some(&ns), name, 1420, 0, true, 2).unwrap();
        assert!(opened.layout.refused.is_none());
        let port = opened.workers[0].local_port().unwrap();
        tun_up(&ns, name, 5).await;
        let cpus = steering_cpus();
        // A worker per CPU checked, each on its own thread in its own current-thread runtime:
        // it answers one datagram, then reports one packet read from its TUN queue.
        let workers: Vec<_> = opened
            .workers
            .into_iter()
            .enumerate()
            .filter(|(index, _)| cpus.contains(index))
            .map(|(index, worker)| {
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async move {
                        let (mut tun, mut udp) = worker.into_async().unwrap();
                        let timeout = std::time::Duration::from_secs(5);
                        let mut buf = vec![0u8; 65_536];
                        let from = loop {
                            tokio::time::timeout(timeout, udp.readable())
                                .await
                                .unwrap()
                                .unwrap();
                            match udp.try_recv_gro(&mut buf) {
                                Ok((_, _, from)) => break from,
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                                Err(e) => panic!("{e}"),
                            }
                        };
                        udp.send_to(format!("udp {index}").as_bytes(), from)
                            .await
                            .unwrap();
                        let mut bufs = vec![vec![0u8; 65_536]; offload::UDP_MAX_SEGMENTS];
                        let mut sizes = vec![0; bufs.len()];
                        loop {
                            tokio::time::timeout(timeout, tun.readable())
                                .await
                                .unwrap()
                                .unwrap();
                            match tun.try_recv_packets(&mut bufs, &mut sizes) {
                                Ok(n) => {
                                    let marker = b"to the tun";
                                    if bufs[..n].iter().zip(&sizes).any(|(b, &len)| {
                                        b[..len].windows(marker.len()).any(|w| w == marker)
                                    }) {
                                        break;
                                    }
                                }
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                                Err(e) => panic!("{e}"),
                            }
                        }
                        udp.send_to(format!("tun {index}").as_bytes(), from)
                            .await
                            .unwrap();
                    });
                })
            })
            .collect();
        for cpu in cpus {
            let peer = ns
                .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
                .unwrap()
                .unwrap();
            peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 64];
            on_cpu(cpu, || peer.send_to(b"ping", ("127.0.0.1", port)).unwrap());
            let len = peer.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], format!("udp {cpu}").as_bytes());
            on_cpu(cpu, || {
                peer.send_to(b"to the tun", ("198.19.5.2", 9)).unwrap()
            });
            let len = peer.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], format!("tun {cpu}").as_bytes());
        }
        for worker in workers {
            worker.join().unwrap();
        }
    }
}
