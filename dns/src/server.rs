//! The sockets: UDP worker threads (fast path inline, slow path inline, forwarding handed to
//! tokio), TCP on tokio, and `/metrics`. Everything stops when [`Running`] is shut down or
//! dropped.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::Error;
use crate::acl::ForwardAcl;
use crate::answer::{Outcome, Reply, Transport, refused, respond, servfail};
use crate::catalog::ZoneHandle;
use crate::config::Config;
use crate::forward::{ForwardError, Upstream, capped_query, relayed_answer};
use crate::metrics::Metrics;
use crate::rrl::{RateLimiter, Verdict, slip};

/// Largest UDP datagram accepted (and answer sent); a longer query is dropped as oversized.
const MAX_UDP_QUERY: usize = 4096;
/// How often UDP workers wake up to check for shutdown when idle.
const IDLE_WAKEUP: Duration = Duration::from_millis(100);
/// Forward jobs queued between the UDP workers and tokio.
const FORWARD_QUEUE: usize = 4096;

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// The UDP and TCP address.
    pub dns_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops every thread and task and waits for the UDP workers.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_all();
    }
}

struct ForwardJob {
    query: Vec<u8>,
    peer: SocketAddr,
    qtype: Option<hickory_proto::rr::RecordType>,
    received: Instant,
}

/// Binds the sockets and starts serving; must run inside a tokio runtime.
pub async fn start<U: Upstream>(
    config: &Config,
    handle: ZoneHandle,
    metrics: Metrics,
    upstream: U,
) -> Result<Running, Error> {
    let upstream = Arc::new(upstream);
    let forwards = Arc::new(Semaphore::new(config.max_forwards_in_flight));
    let stop = Arc::new(AtomicBool::new(false));
    let edns = handle.edns_udp_size();
    let acl = Arc::new(config.forward_for.clone());
    let limiter = Limiter::new(
        RateLimiter::new(config.rate_limit, config.rate_limit_slots).map(Arc::new),
        &metrics,
    );

    let (udp, tcp, dns_addr) = bind_listeners(config)?;

    let (tx, rx) = mpsc::channel::<ForwardJob>(FORWARD_QUEUE);
    let reply_socket = udp[0].try_clone().map_err(bind_error("udp", dns_addr))?;
    let mut tasks = vec![tokio::spawn(forward_udp(
        rx,
        reply_socket,
        upstream.clone(),
        forwards.clone(),
        metrics.clone(),
        limiter.clone(),
        edns,
    ))];

    let mut threads = Vec::new();
    for (index, socket) in udp.into_iter().enumerate() {
        let name = format!("dns-udp-{index}");
        let worker = UdpWorker {
            socket,
            handle: handle.clone(),
            metrics: metrics.clone(),
            forward: tx.clone(),
            acl: acl.clone(),
            limiter: limiter.clone(),
            stop: stop.clone(),
            edns,
        };
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || worker.run())
            .map_err(|source| Error::Spawn { name, source })?;
        threads.push(thread);
    }

    let tcp_server = TcpServer {
        handle: handle.clone(),
        metrics: metrics.clone(),
        upstream,
        forwards,
        acl,
        max_connections: config.max_tcp_connections,
        idle: config.tcp_idle_timeout,
    };
    tasks.push(tokio::spawn(tcp_server.run(tcp)));

    let metrics_addr = match config.metrics {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(bind_error("metrics", addr))?;
            let bound = listener.local_addr().map_err(bind_error("metrics", addr))?;
            tasks.push(tokio::spawn(serve_metrics(
                listener,
                metrics.clone(),
                handle.clone(),
            )));
            Some(bound)
        }
        None => None,
    };
    info!(%dns_addr, ?metrics_addr, "trellis-dns serving");
    Ok(Running {
        dns_addr,
        metrics_addr,
        stop,
        threads,
        tasks,
    })
}

/// How many ports are tried for `--listen` with port 0 (see [`bind_listeners`]).
const PORT_ATTEMPTS: usize = 20;

/// The UDP sockets and the TCP listener, on one port. With port 0 the kernel picks the UDP
/// port, which may be taken for TCP (by another socket's connection): then another is tried.
fn bind_listeners(config: &Config) -> Result<(Vec<UdpSocket>, TcpListener, SocketAddr), Error> {
    let mut attempt = 1;
    loop {
        let udp = bind_udp(config)?;
        let dns_addr = udp[0]
            .local_addr()
            .map_err(bind_error("udp", config.listen))?;
        match bind_tcp(dns_addr) {
            Ok(tcp) => return Ok((udp, tcp, dns_addr)),
            Err(Error::Bind { ref source, .. })
                if config.listen.port() == 0
                    && source.kind() == ErrorKind::AddrInUse
                    && attempt < PORT_ATTEMPTS =>
            {
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// How a failed step of binding `what` ("udp" or "tcp") on `addr` reads.
fn bind_error(what: &'static str, addr: SocketAddr) -> impl Fn(std::io::Error) -> Error + Copy {
    move |source| Error::Bind { what, addr, source }
}

/// A socket of `addr`'s family (IPv4 or IPv6), not yet bound.
fn new_socket(
    addr: SocketAddr,
    kind: Type,
    protocol: SockProtocol,
    err: impl Fn(std::io::Error) -> Error,
) -> Result<Socket, Error> {
    Socket::new(Domain::for_address(addr), kind, Some(protocol)).map_err(err)
}

fn bind_udp(config: &Config) -> Result<Vec<UdpSocket>, Error> {
    let mut addr = config.listen;
    let mut sockets = Vec::new();
    for _ in 0..config.udp_workers {
        let err = bind_error("udp", addr);
        let socket = new_socket(addr, Type::DGRAM, SockProtocol::UDP, err)?;
        if config.udp_workers > 1 {
            socket.set_reuse_port(true).map_err(err)?;
        }
        // Best effort: the kernel caps it at net.core.rmem_max.
        let _ = socket.set_recv_buffer_size(config.udp_recv_buffer);
        socket.set_read_timeout(Some(IDLE_WAKEUP)).map_err(err)?;
        socket.bind(&addr.into()).map_err(err)?;
        let socket: UdpSocket = socket.into();
        addr = socket.local_addr().map_err(err)?;
        sockets.push(socket);
    }
    Ok(sockets)
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, Error> {
    let err = bind_error("tcp", addr);
    let socket = new_socket(addr, Type::STREAM, SockProtocol::TCP, err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

struct UdpWorker {
    socket: UdpSocket,
    handle: ZoneHandle,
    metrics: Metrics,
    forward: mpsc::Sender<ForwardJob>,
    acl: Arc<ForwardAcl>,
    limiter: Limiter,
    stop: Arc<AtomicBool>,
    edns: u16,
}

/// The response rate limiter as the UDP paths apply it, with its counters resolved once.
#[derive(Clone)]
struct Limiter {
    rrl: Option<Arc<RateLimiter>>,
    slipped: prometheus::IntCounter,
    dropped: prometheus::IntCounter,
}

impl Limiter {
    fn new(rrl: Option<Arc<RateLimiter>>, metrics: &Metrics) -> Self {
        Self {
            rrl,
            slipped: metrics.rate_limited.with_label_values(&["slip"]),
            dropped: metrics.rate_limited.with_label_values(&["drop"]),
        }
    }

    /// Whether the response in `out[..len]` to `query` goes to `client`: `Some(len)` as is,
    /// `Some(shorter)` cut to a slip (TC, no records), `None` dropped.
    fn allow(
        &self,
        client: IpAddr,
        query: &[u8],
        out: &mut [u8],
        len: usize,
        now: Instant,
    ) -> Option<usize> {
        let Some(rrl) = &self.rrl else {
            return Some(len);
        };
        let rcode = out.get(3).map_or(0, |b| b & 0x0f);
        match rrl.check(client, query, rcode, now) {
            Verdict::Send => Some(len),
            Verdict::Slip => {
                self.slipped.inc();
                Some(slip(out, len))
            }
            Verdict::Drop => {
                self.dropped.inc();
                None
            }
        }
    }
}

/// Datagrams received and sent per system call.
const BATCH: usize = 32;

/// Per-worker counters of the fast path, flushed into the shared metrics in bulk.
struct FastStats {
    by_type: Vec<prometheus::local::LocalIntCounter>,
    records: prometheus::local::LocalIntCounter,
    latency: prometheus::local::LocalHistogram,
    pending: u32,
    last_flush: Instant,
}

impl FastStats {
    fn new(metrics: &Metrics) -> Self {
        Self {
            by_type: metrics.fast_counters().iter().map(|c| c.local()).collect(),
            records: metrics.records.local(),
            latency: metrics.zone_latency().local(),
            pending: 0,
            last_flush: Instant::now(),
        }
    }

    fn flush(&mut self, now: Instant) {
        self.by_type.iter_mut().for_each(|c| c.flush());
        self.records.flush();
        self.latency.flush();
        self.pending = 0;
        self.last_flush = now;
    }

    fn maybe_flush(&mut self, now: Instant) {
        if self.pending >= 1024 || now.duration_since(self.last_flush) > Duration::from_secs(1) {
            self.flush(now);
        }
    }
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

impl UdpWorker {
    /// Receives up to [`BATCH`] datagrams per `recvmmsg`, answers them (fast path, else slow
    /// path, else hands them to the forwarder), and sends the answers with one `sendmmsg`.
    fn run(self) {
        let fd = self.socket.as_raw_fd();
        let mut stats = FastStats::new(&self.metrics);
        let mut bufs: Box<[[u8; MAX_UDP_QUERY]; BATCH]> = Box::new([[0u8; MAX_UDP_QUERY]; BATCH]);
        let mut out: Box<[[u8; MAX_UDP_QUERY]; BATCH]> = Box::new([[0u8; MAX_UDP_QUERY]; BATCH]);
        let mut out_len = [0usize; BATCH];
        let mut out_addr: [Option<SockaddrStorage>; BATCH] = [None; BATCH];
        let mut received_meta: [(usize, Option<SockaddrStorage>, bool); BATCH] =
            [(0, None, false); BATCH];
        let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        while !self.stop.load(Ordering::Relaxed) {
            let mut count = 0;
            {
                let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                    bufs.each_mut().map(|b| [IoSliceMut::new(&mut b[..])]);
                match recvmmsg(
                    fd,
                    &mut recv_headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                ) {
                    Ok(results) => {
                        for (slot, message) in received_meta.iter_mut().zip(results) {
                            *slot = (
                                message.bytes,
                                message.address,
                                message.flags.contains(MsgFlags::MSG_TRUNC),
                            );
                            count += 1;
                        }
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(error) => {
                        warn!(%error, "udp receive failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            let received = Instant::now();
            if count == 0 {
                if stats.pending > 0 {
                    stats.flush(received);
                }
                continue;
            }
            let snapshot = self.handle.load();
            let mut replies = 0;
            let mut fast = 0u32;
            for (index, (len, addr, truncated)) in received_meta[..count].iter().enumerate() {
                let Some(addr) = addr else { continue };
                if *truncated {
                    self.metrics.dropped.with_label_values(&["oversized"]).inc();
                    continue;
                }
                let packet = &bufs[index][..*len];
                let Some(peer) = to_std(addr) else { continue };
                if let Some(hit) = snapshot.fast.answer(packet, self.edns, &mut out[replies]) {
                    let Some(len) =
                        self.limiter
                            .allow(peer.ip(), packet, &mut out[replies], hit.len, received)
                    else {
                        continue;
                    };
                    out_len[replies] = len;
                    out_addr[replies] = Some(*addr);
                    replies += 1;
                    fast += 1;
                    stats.by_type[hit.entry.type_index].inc();
                    if len == hit.len {
                        stats.records.inc_by(hit.entry.answers as u64);
                    }
                    continue;
                }
                let (reply, source) =
                    match respond(&snapshot.zone, packet, Transport::Udp, self.edns) {
                        Outcome::Reply(reply) => (Some(reply), "zone"),
                        Outcome::Forward { qtype } if self.acl.allows(peer.ip()) => {
                            (self.forward(packet, peer, qtype, received), "upstream")
                        }
                        Outcome::Forward { .. } => {
                            self.metrics.forward_refused.inc();
                            (refused(packet, self.edns), "zone")
                        }
                        Outcome::Drop(reason) => {
                            self.metrics
                                .dropped
                                .with_label_values(&[reason.label()])
                                .inc();
                            (None, "zone")
                        }
                    };
                if let Some(reply) = reply
                    && reply.bytes.len() <= MAX_UDP_QUERY
                {
                    let len = reply.bytes.len();
                    out[replies][..len].copy_from_slice(&reply.bytes);
                    let Some(len) =
                        self.limiter
                            .allow(peer.ip(), packet, &mut out[replies], len, received)
                    else {
                        continue;
                    };
                    out_len[replies] = len;
                    out_addr[replies] = Some(*addr);
                    replies += 1;
                    count_reply(&self.metrics, &reply, source, received);
                }
            }
            drop(snapshot);
            self.send(fd, &mut send_headers, &out, &out_len, &out_addr, replies);
            let sent = Instant::now();
            let elapsed = sent.duration_since(received).as_secs_f64();
            for _ in 0..fast {
                stats.latency.observe(elapsed);
            }
            stats.pending += fast;
            stats.maybe_flush(sent);
        }
        stats.flush(Instant::now());
    }

    /// Queues a query for the forwarder; SERVFAIL at once when the queue is full.
    fn forward(
        &self,
        packet: &[u8],
        peer: SocketAddr,
        qtype: hickory_proto::rr::RecordType,
        received: Instant,
    ) -> Option<Reply> {
        self.metrics.forwarded.inc();
        let job = ForwardJob {
            query: packet.to_vec(),
            peer,
            qtype: Some(qtype),
            received,
        };
        let Err(error) = self.forward.try_send(job) else {
            return None;
        };
        let job = match error {
            mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job) => job,
        };
        count_failure(&self.metrics, &ForwardError::Overload);
        servfail(&job.query, self.edns)
    }

    fn send(
        &self,
        fd: RawFd,
        headers: &mut MultiHeaders<SockaddrStorage>,
        out: &[[u8; MAX_UDP_QUERY]; BATCH],
        out_len: &[usize; BATCH],
        out_addr: &[Option<SockaddrStorage>; BATCH],
        replies: usize,
    ) {
        let mut first = 0;
        while first < replies {
            let iovs: [[IoSlice<'_>; 1]; BATCH] =
                std::array::from_fn(|i| [IoSlice::new(&out[i][..out_len[i]])]);
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            match sendmmsg(
                fd,
                headers,
                iovs[first..replies].iter(),
                &out_addr[first..replies],
                no_cmsgs,
                MsgFlags::empty(),
            ) {
                Ok(results) => {
                    let sent = results.count();
                    if sent == 0 {
                        break;
                    }
                    first += sent;
                }
                Err(Errno::EINTR) => {}
                Err(error) => {
                    // One bad destination fails the call: skip it and go on.
                    debug!(%error, "udp send failed");
                    first += 1;
                }
            }
        }
    }
}

fn count_reply(metrics: &Metrics, reply: &Reply, source: &str, received: Instant) {
    metrics.answered(reply.qtype, reply.rcode, source);
    metrics.records.inc_by(reply.answers as u64);
    if reply.truncated {
        metrics.truncated.inc();
    }
    metrics
        .latency
        .with_label_values(&[source])
        .observe(received.elapsed().as_secs_f64());
}

/// Counts an upstream answer relayed.
fn count_relayed(
    metrics: &Metrics,
    answer: &[u8],
    truncated: bool,
    qtype: Option<hickory_proto::rr::RecordType>,
    received: Instant,
) {
    let rcode = hickory_proto::op::ResponseCode::from_low(answer.get(3).map_or(2, |b| b & 0x0f));
    let answers = answer
        .get(6..8)
        .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
    count_reply(
        metrics,
        &Reply {
            bytes: Vec::new(),
            qtype,
            rcode,
            answers: usize::from(answers),
            truncated,
        },
        "upstream",
        received,
    );
}

/// Relays forwarded UDP queries, each in its own task, bounded by `forwards`.
async fn forward_udp<U: Upstream>(
    mut rx: mpsc::Receiver<ForwardJob>,
    socket: UdpSocket,
    upstream: Arc<U>,
    forwards: Arc<Semaphore>,
    metrics: Metrics,
    limiter: Limiter,
    edns: u16,
) {
    let socket = Arc::new(socket);
    while let Some(job) = rx.recv().await {
        let Ok(permit) = forwards.clone().try_acquire_owned() else {
            count_failure(&metrics, &ForwardError::Overload);
            if let Some(reply) = servfail(&job.query, edns)
                && send_limited(&socket, &limiter, &job, reply.bytes.clone())
            {
                count_reply(&metrics, &reply, "upstream", job.received);
            }
            continue;
        };
        let (socket, upstream, metrics, limiter) = (
            socket.clone(),
            upstream.clone(),
            metrics.clone(),
            limiter.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let relayed = upstream
                .exchange(&capped_query(&job.query, edns), Transport::Udp)
                .await
                .and_then(|answer| {
                    relayed_answer(answer, &job.query, Transport::Udp, edns)
                        .ok_or(ForwardError::Untruncatable)
                });
            match relayed {
                Ok((answer, truncated)) => {
                    // What was relayed is counted from the header (rcode, answers) as it
                    // came, before the limiter may cut it.
                    let header = answer.get(..12).map(<[u8]>::to_vec);
                    if send_limited(&socket, &limiter, &job, answer)
                        && let Some(header) = header
                    {
                        count_relayed(&metrics, &header, truncated, job.qtype, job.received);
                    }
                }
                Err(error) => {
                    count_failure(&metrics, &error);
                    if let Some(reply) = servfail(&job.query, edns)
                        && send_limited(&socket, &limiter, &job, reply.bytes.clone())
                    {
                        count_reply(&metrics, &reply, "upstream", job.received);
                    }
                }
            }
        });
    }
}

/// Sends `bytes`, a response to `job`, unless the rate limiter drops it (or cuts it to a
/// slip); whether something was sent.
fn send_limited(
    socket: &UdpSocket,
    limiter: &Limiter,
    job: &ForwardJob,
    mut bytes: Vec<u8>,
) -> bool {
    let len = bytes.len();
    let Some(len) = limiter.allow(job.peer.ip(), &job.query, &mut bytes, len, Instant::now())
    else {
        return false;
    };
    // A UDP send on a datagram socket does not block in practice.
    let _ = socket.send_to(&bytes[..len], job.peer);
    true
}

/// Counts a forwarded query that got no upstream answer, by the kind of failure (the same
/// label for the same failure over UDP and TCP).
fn count_failure(metrics: &Metrics, error: &ForwardError) {
    debug!(error = %trellis_core::error_chain(error), "forwarding failed");
    metrics
        .upstream_failures
        .with_label_values(&[error.kind().label()])
        .inc();
}

/// The TCP listener's task and what its connections share.
struct TcpServer<U> {
    handle: ZoneHandle,
    metrics: Metrics,
    upstream: Arc<U>,
    forwards: Arc<Semaphore>,
    acl: Arc<ForwardAcl>,
    max_connections: usize,
    idle: Duration,
}

impl<U: Upstream> TcpServer<U> {
    async fn run(self, listener: TcpListener) {
        let TcpServer {
            handle,
            metrics,
            upstream,
            forwards,
            acl,
            max_connections,
            idle,
        } = self;
        let connections = Arc::new(Semaphore::new(max_connections));
        // Owned here: when this task is aborted (shutdown), every connection goes with it.
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                metrics.dropped.with_label_values(&["tcp_overload"]).inc();
                continue; // dropping the stream closes it
            };
            let connection = TcpConnection {
                handle: handle.clone(),
                metrics: metrics.clone(),
                upstream: upstream.clone(),
                forwards: forwards.clone(),
                forwarding: acl.allows(peer.ip()),
                idle,
            };
            tasks.spawn(async move {
                let _permit = permit;
                if let Err(error) = connection.serve(stream).await {
                    debug!(%error, %peer, "tcp connection ended");
                }
            });
        }
    }
}

/// One TCP client: what it may do and what it is served from.
struct TcpConnection<U> {
    handle: ZoneHandle,
    metrics: Metrics,
    upstream: Arc<U>,
    forwards: Arc<Semaphore>,
    /// Whether the client may use forwarding (`--forward-for`).
    forwarding: bool,
    idle: Duration,
}

impl<U: Upstream> TcpConnection<U> {
    async fn serve(self, mut stream: TcpStream) -> std::io::Result<()> {
        let TcpConnection {
            handle,
            metrics,
            upstream,
            forwards,
            forwarding,
            idle,
        } = self;
        let edns = handle.edns_udp_size();
        loop {
            let Ok(len) = timeout(idle, stream.read_u16()).await else {
                return Ok(()); // idle
            };
            let len = usize::from(len?);
            let mut query = vec![0u8; len];
            timeout(idle, stream.read_exact(&mut query))
                .await
                .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "tcp read"))??;
            let received = Instant::now();
            let outcome = {
                let snapshot = handle.load();
                respond(&snapshot.zone, &query, Transport::Tcp, edns)
            };
            let answer = match outcome {
                Outcome::Reply(reply) => {
                    count_reply(&metrics, &reply, "zone", received);
                    reply.bytes
                }
                Outcome::Forward { .. } if !forwarding => {
                    metrics.forward_refused.inc();
                    let Some(reply) = refused(&query, edns) else {
                        return Ok(());
                    };
                    count_reply(&metrics, &reply, "zone", received);
                    reply.bytes
                }
                Outcome::Forward { qtype } => {
                    metrics.forwarded.inc();
                    let answer = match forwards.clone().try_acquire_owned() {
                        Ok(_permit) => {
                            upstream
                                .exchange(&capped_query(&query, edns), Transport::Tcp)
                                .await
                        }
                        Err(_) => Err(ForwardError::Overload),
                    };
                    match answer {
                        Ok(answer) => {
                            // Over TCP nothing is cut; only the advertised size is ours.
                            let answer = relayed_answer(answer, &query, Transport::Tcp, edns)
                                .map_or_else(Vec::new, |(answer, _)| answer);
                            count_relayed(&metrics, &answer, false, Some(qtype), received);
                            answer
                        }
                        Err(error) => {
                            count_failure(&metrics, &error);
                            let Some(reply) = servfail(&query, edns) else {
                                return Ok(());
                            };
                            count_reply(&metrics, &reply, "upstream", received);
                            reply.bytes
                        }
                    }
                }
                Outcome::Drop(reason) => {
                    metrics.dropped.with_label_values(&[reason.label()]).inc();
                    return Ok(());
                }
            };
            let Ok(len) = u16::try_from(answer.len()) else {
                return Ok(());
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&answer);
            timeout(idle, stream.write_all(&framed))
                .await
                .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "tcp write"))??;
        }
    }
}

/// A minimal HTTP/1.1 endpoint: `GET /metrics` gets the text exposition, `GET /readyz` 200
/// once the first catalog is loaded and 503 before (the readiness probe: a DNS pod that would
/// only say SERVFAIL gets no traffic), anything else 404.
async fn serve_metrics(listener: TcpListener, metrics: Metrics, handle: ZoneHandle) {
    trellis_http::serve(
        listener,
        std::sync::Arc::new(DnsRoutes { metrics, handle }),
        trellis_http::Limits::default(),
        |reason| tracing::debug!(reason, "refused a metrics connection"),
    )
    .await;
}

/// `/metrics`, and `/readyz` (200 once the first catalog is loaded).
struct DnsRoutes {
    metrics: Metrics,
    handle: ZoneHandle,
}

impl trellis_http::Routes for DnsRoutes {
    async fn get(&self, path: &str) -> trellis_http::Reply {
        match path {
            "/metrics" => trellis_http::Reply::metrics(self.metrics.render()),
            "/readyz" => trellis_http::Reply::check(
                self.handle.is_ready(),
                "ready\n",
                "no catalog loaded yet\n",
            ),
            "/healthz" => trellis_http::Reply::text("ok\n"),
            _ => trellis_http::Reply::not_found(),
        }
    }
}
