//! The node's kernel flow sources: conntrack's events (a connection confirmed, a connection
//! removed, with its packet and byte counts) and the packets the policy table drops and logs
//! to NFLOG group [`NFLOG_GROUP`], read from two netlink sockets in the node's namespace and
//! handed on as [`KernelEvent`]s, not yet named.
//!
//! What the kernel could not deliver is counted, never waited for: a socket whose receive
//! buffer overflows loses messages (`ENOBUFS`), and the kernel moves on. NFLOG numbers every
//! packet it logs to the group, so its losses are counted exactly from the gaps; conntrack
//! does not, so each `ENOBUFS` on its socket counts as one lost event (at least one was).
//! Messages that do not parse are counted as lost too, and skipped.
//!
//! When: a connection's `New` comes as its first packet is confirmed; its `Destroy` when
//! conntrack removes the entry, which for a closed TCP connection is after TIME_WAIT (two
//! minutes by default) and the next pass of conntrack's garbage collector. Conntrack only
//! tracks in a namespace where some rule needs it (the policy table's `ct state` rules do).
//!
//! Parsing is pure ([`conntrack`], [`nflog`], [`packet`]); the sockets are the edge.

mod conntrack;
mod nflog;
mod packet;

use std::io;
use std::time::{Duration, SystemTime};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::NetfilterMessage;
use netlink_sys::{Socket, constants::NETLINK_NETFILTER};
use trellis_core::flow::kernel::{KernelEvent, NFLOG_GROUP};
use trellis_netns::Netns;

/// Each socket's receive buffer: a burst of short connections makes two conntrack events
/// each, about 1 KiB of buffer apiece, and a flood of drops fills NFLOG's batches; what does
/// not fit is lost and counted. As root the buffer may exceed `net.core.rmem_max`.
const RECEIVE_BUFFER_BYTES: usize = 8 << 20;
/// One read: more than the largest NFLOG batch ([`nflog::BATCH_BYTES`]).
const DATAGRAM_BYTES: usize = 128 * 1024;
/// Datagrams read from one socket before the other gets its turn.
const READS_PER_TURN: usize = 64;
/// How long the reader sleeps after a drain for more events to gather (see `run`).
const COALESCE: Duration = Duration::from_millis(10);
/// How long an idle reader blocks in `poll` before it checks whether it should stop.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How long the kernel may take to acknowledge the NFLOG bind.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a source's name is in [`KernelSources::run`]'s loss reports.
pub const CONNTRACK: &str = "conntrack";
pub const NFLOG: &str = "nflog";

/// Why the sources could not be opened or stopped.
#[derive(Debug, thiserror::Error)]
pub enum FlowSourceError {
    #[error("enter the node's namespace")]
    Netns(#[source] trellis_netns::Error),
    #[error("open the {socket} netlink socket")]
    Open {
        socket: &'static str,
        #[source]
        error: io::Error,
    },
    #[error("subscribe to conntrack's events")]
    Subscribe(#[source] io::Error),
    #[error("bind NFLOG group {group} (another process may hold it)")]
    Bind {
        group: u16,
        #[source]
        error: io::Error,
    },
    #[error("start the thread that reads the sockets")]
    Thread(#[source] io::Error),
    #[error("the thread that reads the sockets ended without a word")]
    ReaderGone,
    #[error("read the {socket} socket")]
    Receive {
        socket: &'static str,
        #[source]
        error: io::Error,
    },
}

/// What one message turned out to be.
#[derive(Debug)]
enum Decoded<T> {
    Event(T),
    /// Not one the flows need (another protocol, another rule's log prefix).
    Skip,
    /// Malformed: counted as lost.
    Bad(&'static str),
}

/// The two sockets, open and subscribed; [`Self::run`] reads them.
pub struct KernelSources {
    conntrack: Socket,
    nflog: Socket,
}

impl std::fmt::Debug for KernelSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSources").finish_non_exhaustive()
    }
}

impl KernelSources {
    /// Opens the conntrack-event socket (groups NFNLGRP_CONNTRACK_NEW and _DESTROY) and binds
    /// the policy table's NFLOG group, in `netns` when given (the sockets are made on a
    /// short-lived thread inside it) else in the current namespace; turns on
    /// `net.netfilter.nf_conntrack_acct` in that namespace (for byte and packet counts; a
    /// failure is logged, not fatal).
    pub fn open(netns: Option<&Netns>) -> Result<Self, FlowSourceError> {
        let open = || -> Result<Self, FlowSourceError> {
            Ok(Self {
                conntrack: conntrack_socket()?,
                nflog: nflog_socket(NFLOG_GROUP)?,
            })
        };
        let sources = match netns {
            Some(netns) => netns.run(open).map_err(FlowSourceError::Netns)??,
            None => open()?,
        };
        // After the subscription, which loads conntrack's netlink module (and conntrack with
        // it) when it was not: the setting exists from then on. It counts connections made
        // from then on.
        if let Err(e) = trellis_netns::sysctl::write(netns, "net/netfilter/nf_conntrack_acct", "1")
        {
            tracing::warn!(
                "turn on conntrack's accounting (closed connections will lack byte counts): {}",
                crate::chain(&e)
            );
        }
        Ok(sources)
    }

    /// Reads both sockets until one fails: every event handed to `sink`, what the kernel
    /// could not deliver and what did not parse to `lost(source, count)` with source
    /// [`CONNTRACK`] or [`NFLOG`]. The reading happens on a thread of its own (`sink` and
    /// `lost` run there: keep them quick), which stops when this future is dropped.
    ///
    /// Why a thread that sleeps rather than a task woken by readiness: events come one per
    /// datagram, tens of thousands a second under load. Woken for each (tokio's epoll is
    /// edge-triggered: every arrival is a wake-up, even while the task waits for nothing),
    /// the gateway spent more switching in and out than reading. The thread drains both
    /// sockets, then sleeps [`COALESCE`] while the next events gather in the buffers; only
    /// when a drain finds nothing does it block in `poll` for the next one. A flow is
    /// recorded at most that much later.
    pub async fn run(
        self,
        sink: impl FnMut(KernelEvent) + Send + 'static,
        lost: impl FnMut(&'static str, u64) + Send + 'static,
    ) -> Result<(), FlowSourceError> {
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("trellis-flows".into())
            .spawn(move || {
                let result = self.read(sink, lost, || done.is_closed());
                let _ = done.send(result);
            })
            .map_err(FlowSourceError::Thread)?;
        finished.await.unwrap_or(Err(FlowSourceError::ReaderGone))
    }

    /// The reading thread's loop, until `stopped()` or a socket fails.
    fn read(
        self,
        mut sink: impl FnMut(KernelEvent),
        mut lost: impl FnMut(&'static str, u64),
        stopped: impl Fn() -> bool,
    ) -> Result<(), FlowSourceError> {
        let mut buffer = vec![0u8; DATAGRAM_BYTES];
        let mut gaps = nflog::SequenceGaps::default();
        while !stopped() {
            let mut read_any = false;
            // Turns in alternation, so a flood on one socket does not starve the other.
            loop {
                let conntrack = read_turn(
                    &self.conntrack,
                    CONNTRACK,
                    &mut buffer,
                    &mut lost,
                    |datagram, lost| conntrack_datagram(datagram, &mut sink, lost),
                )?;
                let nflog = read_turn(
                    &self.nflog,
                    NFLOG,
                    &mut buffer,
                    &mut lost,
                    |datagram, lost| nflog_datagram(datagram, &mut gaps, &mut sink, lost),
                )?;
                read_any |= conntrack.read > 0 || nflog.read > 0;
                if conntrack.drained && nflog.drained {
                    break;
                }
            }
            if read_any {
                std::thread::sleep(COALESCE);
            } else {
                self.wait_readable(IDLE_POLL)?;
            }
        }
        Ok(())
    }

    /// Blocks until either socket has something to read, or `timeout`.
    fn wait_readable(&self, timeout: Duration) -> Result<(), FlowSourceError> {
        use std::os::fd::AsFd;
        let mut fds = [
            nix::poll::PollFd::new(self.conntrack.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(self.nflog.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        let timeout =
            nix::poll::PollTimeout::try_from(timeout).unwrap_or(nix::poll::PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(FlowSourceError::Receive {
                socket: CONNTRACK,
                error: e.into(),
            }),
        }
    }
}

/// What one turn on a socket read.
struct Turn {
    read: usize,
    /// The socket had nothing more.
    drained: bool,
}

/// Reads up to [`READS_PER_TURN`] datagrams while there are any (the sockets are
/// non-blocking).
fn read_turn(
    socket: &Socket,
    name: &'static str,
    buffer: &mut [u8],
    lost: &mut impl FnMut(&'static str, u64),
    mut each: impl FnMut(&[u8], &mut dyn FnMut(&'static str, u64)),
) -> Result<Turn, FlowSourceError> {
    let mut read = 0;
    for _ in 0..READS_PER_TURN {
        match socket.recv(&mut &mut buffer[..], 0) {
            Ok(len) => {
                read += 1;
                each(&buffer[..len.min(buffer.len())], lost);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::debug!("the {name} socket overflowed");
                // NFLOG's gaps count its losses exactly; conntrack's at least one.
                if name == CONNTRACK {
                    lost(name, 1);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Turn {
                    read,
                    drained: true,
                });
            }
            Err(error) => {
                return Err(FlowSourceError::Receive {
                    socket: name,
                    error,
                });
            }
        }
    }
    Ok(Turn {
        read,
        drained: false,
    })
}

/// Each netlink message of one datagram; `None` for one that does not parse (and for bytes
/// that are no message), after which the rest of the datagram is given up.
fn messages(mut datagram: &[u8], mut each: impl FnMut(Option<NetfilterMessage>)) {
    const HEADER: usize = 16;
    while !datagram.is_empty() {
        let Some(len) = datagram
            .get(..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .filter(|len| (HEADER..=datagram.len()).contains(len))
        else {
            each(None);
            return;
        };
        match NetlinkMessage::<NetfilterMessage>::deserialize(&datagram[..len]) {
            // Acknowledgements, errors, NLMSG_DONE: nothing the flows need.
            Ok(message) => {
                if let NetlinkPayload::InnerMessage(inner) = message.payload {
                    each(Some(inner));
                }
            }
            Err(_) => each(None),
        }
        datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
    }
}

fn conntrack_datagram(
    datagram: &[u8],
    sink: &mut impl FnMut(KernelEvent),
    lost: &mut dyn FnMut(&'static str, u64),
) {
    let now = SystemTime::now();
    messages(datagram, |message| {
        let Some(message) = message else {
            lost(CONNTRACK, 1);
            return;
        };
        match conntrack::event_of(&message, now) {
            Decoded::Event(event) => sink(KernelEvent::Conntrack(event)),
            Decoded::Skip => {}
            Decoded::Bad(why) => {
                tracing::debug!("skipped a conntrack message: {why}");
                lost(CONNTRACK, 1);
            }
        }
    });
}

fn nflog_datagram(
    datagram: &[u8],
    gaps: &mut nflog::SequenceGaps,
    sink: &mut impl FnMut(KernelEvent),
    lost: &mut dyn FnMut(&'static str, u64),
) {
    let now = SystemTime::now();
    messages(datagram, |message| {
        let Some(message) = message else {
            lost(NFLOG, 1);
            return;
        };
        let Some(logged) = nflog::logged_of(&message, now) else {
            return;
        };
        if let Some(sequence) = logged.sequence {
            let missing = gaps.observe(sequence);
            if missing > 0 {
                lost(NFLOG, missing);
            }
        }
        match logged.drop {
            Decoded::Event(drop) => sink(KernelEvent::Drop(drop)),
            Decoded::Skip => {}
            Decoded::Bad(why) => {
                tracing::debug!("skipped a logged packet: {why}");
                lost(NFLOG, 1);
            }
        }
    });
}

/// A netlink-netfilter socket, bound, with a large receive buffer.
fn netfilter_socket(name: &'static str) -> Result<Socket, FlowSourceError> {
    let open_error = |error| FlowSourceError::Open {
        socket: name,
        error,
    };
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(open_error)?;
    socket.bind_auto().map_err(open_error)?;
    if nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::RcvBufForce,
        &RECEIVE_BUFFER_BYTES,
    )
    .is_err()
    {
        // Not privileged: as much as `net.core.rmem_max` allows.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(RECEIVE_BUFFER_BYTES);
    }
    Ok(socket)
}

fn conntrack_socket() -> Result<Socket, FlowSourceError> {
    let socket = netfilter_socket(CONNTRACK)?;
    for group in [libc::NFNLGRP_CONNTRACK_NEW, libc::NFNLGRP_CONNTRACK_DESTROY] {
        socket
            .add_membership(group as u32)
            .map_err(FlowSourceError::Subscribe)?;
    }
    socket
        .set_non_blocking(true)
        .map_err(|error| FlowSourceError::Open {
            socket: CONNTRACK,
            error,
        })?;
    Ok(socket)
}

/// The NFLOG socket with `group` bound to it, once the kernel acknowledged the bind.
fn nflog_socket(group: u16) -> Result<Socket, FlowSourceError> {
    let socket = netfilter_socket(NFLOG)?;
    let bind_error = |error| FlowSourceError::Bind { group, error };
    const SEQUENCE: u32 = 1;
    let request = nflog::bind_request(group, SEQUENCE);
    let mut bytes = vec![0u8; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0).map_err(bind_error)?;
    // Blocking, with a deadline, until the acknowledgement; packets the group logs in the
    // meantime (before anyone reads) are let go.
    socket2::SockRef::from(&socket)
        .set_read_timeout(Some(ACK_TIMEOUT))
        .map_err(bind_error)?;
    let mut buffer = vec![0u8; DATAGRAM_BYTES];
    let deadline = std::time::Instant::now() + ACK_TIMEOUT;
    let acknowledged = loop {
        if std::time::Instant::now() >= deadline {
            return Err(bind_error(io::Error::new(
                io::ErrorKind::TimedOut,
                "no acknowledgement from the kernel",
            )));
        }
        let len = socket.recv(&mut &mut buffer[..], 0).map_err(bind_error)?;
        if let Some(answer) = acknowledgement(&buffer[..len.min(buffer.len())], SEQUENCE) {
            break answer;
        }
    };
    acknowledged.map_err(bind_error)?;
    socket.set_non_blocking(true).map_err(bind_error)?;
    Ok(socket)
}

/// The kernel's answer to request `sequence` in `datagram`, if it holds one.
fn acknowledgement(mut datagram: &[u8], sequence: u32) -> Option<Result<(), io::Error>> {
    while datagram.len() >= 16 {
        let len = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]) as usize;
        if !(16..=datagram.len()).contains(&len) {
            return None;
        }
        if let Ok(message) = NetlinkMessage::<NetfilterMessage>::deserialize(&datagram[..len])
            && message.header.sequence_number == sequence
            && let NetlinkPayload::Error(error) = message.payload
        {
            return Some(match error.code {
                None => Ok(()),
                Some(_) => Err(error.to_io()),
            });
        }
        datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_splits_into_its_messages_and_garbage_is_counted_once() {
        // Two NLMSG_NOOP-free inner messages would need a kernel; two empty conntrack GETs
        // (type 0x0101) do: header (16) + nfgenmsg (4) each.
        let mut message = vec![
            20, 0, 0, 0, 0x01, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0,
        ];
        let mut two = message.clone();
        two.extend_from_slice(&message);
        let mut seen = Vec::new();
        messages(&two, |m| seen.push(m.is_some()));
        assert_eq!(seen, [true, true]);
        // A length past the end, a length below the header: one bad, then stop.
        message[0] = 200;
        let mut seen = Vec::new();
        messages(&message, |m| seen.push(m.is_some()));
        assert_eq!(seen, [false]);
        let mut seen = Vec::new();
        messages(&[3, 0, 0, 0, 1], |m| seen.push(m.is_some()));
        assert_eq!(seen, [false]);
        let mut seen = Vec::new();
        messages(&[], |m| seen.push(m.is_some()));
        assert!(seen.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overflowing_socket_counts_its_losses_and_reads_on() {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};

        trellis_test_support::skip_unless_root!();
        let ns = crate::io::tests::loopback_netns("fk-overflow").await;
        crate::nft::apply(
            Some(&ns),
            "table inet track {\n\tchain out { type filter hook output priority 0; ct state new accept; }\n}\n",
        )
        .unwrap();
        let sources = KernelSources::open(Some(&ns)).unwrap();
        // The smallest buffer the kernel allows: a few events fill it.
        socket2::SockRef::from(&sources.conntrack)
            .set_recv_buffer_size(0)
            .unwrap();
        let listener = ns
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let server = listener.local_addr().unwrap();
        const BURST: usize = 100;
        let accepting = std::thread::spawn(move || {
            // The burst and the one after, closed as they come.
            for stream in listener.incoming().take(BURST + 1) {
                drop(stream);
            }
        });
        let connect = || ns.run(|| TcpStream::connect(server)).unwrap().unwrap();
        // A burst before anyone reads.
        let burst: Vec<TcpStream> = (0..BURST).map(|_| connect()).collect();
        let lost = Arc::new(AtomicU64::new(0));
        let events = Arc::new(Mutex::new(Vec::new()));
        let (losses, seen) = (lost.clone(), events.clone());
        let _reader = tokio::spawn(sources.run(
            move |event| seen.lock().unwrap().push(event),
            move |source, count| {
                assert_eq!(source, CONNTRACK);
                losses.fetch_add(count, Ordering::Relaxed);
            },
        ));
        trellis_test_support::eventually_async("a loss counted", Duration::from_secs(5), || {
            let lost = lost.load(Ordering::Relaxed);
            async move { (lost > 0).then_some(()) }
        })
        .await;
        assert!(
            events.lock().unwrap().len() < burst.len(),
            "some of the burst was lost"
        );
        // And the reader goes on: a connection made after is reported.
        let after = connect().local_addr().unwrap();
        trellis_test_support::eventually_async(
            "the next connection's event",
            Duration::from_secs(5),
            || {
                let found = events.lock().unwrap().iter().any(|event| {
                    matches!(event, KernelEvent::Conntrack(c)
                        if c.original.source_port == after.port()
                            && c.original.destination_port == server.port())
                });
                async move { found.then_some(()) }
            },
        )
        .await;
        accepting.join().unwrap();
    }
}
