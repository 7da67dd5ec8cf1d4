//! Relaying queries outside the zone to upstream resolvers: the client's bytes go out with a
//! fresh random ID from a fresh ephemeral port, the answer comes back as the upstream wrote it
//! (flags, sections, EDNS) with the client's ID restored. A failure or timeout moves on to the
//! next upstream; when all fail, the caller answers SERVFAIL.
//!
//! The EDNS cap of the server holds for relayed messages too ([`capped_query`],
//! [`relayed_answer`]): an upstream is never offered a bigger UDP payload than the server
//! itself takes, and a UDP answer never exceeds what the client may get from this server.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use crate::answer::Transport;
use crate::wire::{self, question_end};

/// Why a forwarded query got no upstream answer (the client gets SERVFAIL). Its
/// [`kind`](ForwardError::kind) labels `trellis_dns_upstream_failures_total`, the same over
/// UDP and TCP.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream is configured.
    #[error("no upstream configured")]
    NoUpstream,
    /// The query is shorter than a DNS header.
    #[error("the query is shorter than a DNS header")]
    ShortQuery,
    /// Too many queries are being forwarded already.
    #[error("too many queries in flight to the upstreams")]
    Overload,
    /// A socket operation with an upstream failed.
    #[error("{step} {upstream}")]
    Io {
        /// The upstream.
        upstream: SocketAddr,
        /// What was being done.
        step: Step,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The upstream did not answer in time.
    #[error("no answer from {upstream} within {timeout:?}")]
    Timeout {
        /// The upstream.
        upstream: SocketAddr,
        /// The time allowed.
        timeout: Duration,
    },
    /// The upstream's TCP answer is not the answer to the query.
    #[error("the answer from {upstream} does not match the query")]
    Mismatch {
        /// The upstream.
        upstream: SocketAddr,
    },
    /// The query does not fit a TCP frame.
    #[error("the query is too long to forward over TCP")]
    QueryTooLong,
    /// The answer is too large for the client and cannot be parsed far enough to truncate.
    #[error("an oversized answer that cannot be truncated")]
    Untruncatable,
}

/// The socket operation of a [`ForwardError::Io`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Binding a local socket for the upstream.
    Bind,
    /// Connecting to the upstream.
    Connect,
    /// Sending the query.
    Send,
    /// Receiving the answer.
    Receive,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Bind => "binding a socket for",
            Step::Connect => "connecting to",
            Step::Send => "sending to",
            Step::Receive => "receiving from",
        })
    }
}

/// The kinds of forwarding failure, as metrics count them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// No upstream answered in time.
    Timeout,
    /// No upstream is configured.
    NoUpstream,
    /// The server forwards too many queries already.
    Overload,
    /// Anything else (refused, reset, a mismatched or oversized answer).
    Error,
}

impl FailureKind {
    /// The `reason` label of `trellis_dns_upstream_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::NoUpstream => "no_upstream",
            FailureKind::Overload => "overload",
            FailureKind::Error => "error",
        }
    }
}

impl ForwardError {
    /// What kind of failure this is.
    pub fn kind(&self) -> FailureKind {
        match self {
            ForwardError::Timeout { .. } => FailureKind::Timeout,
            ForwardError::NoUpstream => FailureKind::NoUpstream,
            ForwardError::Overload => FailureKind::Overload,
            ForwardError::ShortQuery
            | ForwardError::Io { .. }
            | ForwardError::Mismatch { .. }
            | ForwardError::QueryTooLong
            | ForwardError::Untruncatable => FailureKind::Error,
        }
    }
}

/// Something that answers a forwarded query (the seam for tests).
pub trait Upstream: Send + Sync + 'static {
    /// Exchanges `query` (a full DNS message) and returns the answer, with the query's ID.
    fn exchange(
        &self,
        query: &[u8],
        transport: Transport,
    ) -> impl Future<Output = Result<Vec<u8>, ForwardError>> + Send;
}

/// The network upstreams, tried in order.
#[derive(Clone, Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    /// Forwards to `upstreams` in order, allowing each `timeout`.
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self { upstreams, timeout }
    }

    async fn exchange_with(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        transport: Transport,
    ) -> Result<Vec<u8>, ForwardError> {
        let fail = |step: Step| {
            move |source: std::io::Error| ForwardError::Io {
                upstream,
                step,
                source,
            }
        };
        let id: u16 = rand::random();
        let mut out = query.to_vec();
        out[0..2].copy_from_slice(&id.to_be_bytes());
        let exchange = async {
            match transport {
                Transport::Udp => {
                    let bind: SocketAddr = if upstream.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        ([0u16; 8], 0).into()
                    };
                    let socket = UdpSocket::bind(bind).await.map_err(fail(Step::Bind))?;
                    socket
                        .connect(upstream)
                        .await
                        .map_err(fail(Step::Connect))?;
                    socket.send(&out).await.map_err(fail(Step::Send))?;
                    let mut buf = vec![0u8; 65535];
                    loop {
                        let len = socket.recv(&mut buf).await.map_err(fail(Step::Receive))?;
                        if matches(query, id, &buf[..len]) {
                            buf.truncate(len);
                            return Ok(buf);
                        }
                        // A stray or spoofed datagram: keep waiting for the real one.
                    }
                }
                Transport::Tcp => {
                    let mut stream = TcpStream::connect(upstream)
                        .await
                        .map_err(fail(Step::Connect))?;
                    let len = u16::try_from(out.len()).map_err(|_| ForwardError::QueryTooLong)?;
                    let mut framed = len.to_be_bytes().to_vec();
                    framed.extend_from_slice(&out);
                    stream.write_all(&framed).await.map_err(fail(Step::Send))?;
                    let len = stream.read_u16().await.map_err(fail(Step::Receive))?;
                    let mut buf = vec![0u8; usize::from(len)];
                    stream
                        .read_exact(&mut buf)
                        .await
                        .map_err(fail(Step::Receive))?;
                    if matches(query, id, &buf) {
                        Ok(buf)
                    } else {
                        Err(ForwardError::Mismatch { upstream })
                    }
                }
            }
        };
        let mut answer =
            timeout(self.timeout, exchange)
                .await
                .map_err(|_| ForwardError::Timeout {
                    upstream,
                    timeout: self.timeout,
                })??;
        answer[0..2].copy_from_slice(&query[0..2]);
        Ok(answer)
    }
}

impl Upstream for Forwarder {
    async fn exchange(&self, query: &[u8], transport: Transport) -> Result<Vec<u8>, ForwardError> {
        if query.len() < 12 {
            return Err(ForwardError::ShortQuery);
        }
        let mut last = ForwardError::NoUpstream;
        for upstream in &self.upstreams {
            match self.exchange_with(*upstream, query, transport).await {
                Ok(answer) => return Ok(answer),
                Err(error) => {
                    tracing::debug!(error = %trellis_core::error_chain(&error), "upstream failed");
                    last = error;
                }
            }
        }
        Err(last)
    }
}

/// `query` as it goes upstream: an EDNS payload size above `cap` lowered to `cap`, so that the
/// upstream answers within what this server relays over UDP.
pub fn capped_query(query: &[u8], cap: u16) -> Vec<u8> {
    let mut out = query.to_vec();
    if wire::edns_payload(&out).is_some_and(|size| size > cap) {
        wire::set_edns_payload(&mut out, cap);
    }
    out
}

/// An upstream `answer` to the client's `query` as relayed: its OPT record advertising this
/// server's `cap`, and over UDP cut down to header, question and OPT with TC set when it does
/// not fit the client's limit (its EDNS size capped by `cap`, 512 without EDNS), so that the
/// client retries over TCP. Returns the bytes and whether they were truncated; `None` when an
/// oversized answer cannot be parsed far enough to truncate.
pub fn relayed_answer(
    mut answer: Vec<u8>,
    query: &[u8],
    transport: Transport,
    cap: u16,
) -> Option<(Vec<u8>, bool)> {
    wire::set_edns_payload(&mut answer, cap);
    if transport == Transport::Tcp || answer.len() <= wire::udp_limit(query, cap) {
        return Some((answer, false));
    }
    wire::truncate(&answer).map(|cut| (cut, true))
}

/// Whether `answer` is the response to `query` sent with `id`: same ID, QR set, same question
/// (names compared case-insensitively).
fn matches(query: &[u8], id: u16, answer: &[u8]) -> bool {
    if answer.len() < 12 || answer[0..2] != id.to_be_bytes() || answer[2] & 0x80 == 0 {
        return false;
    }
    let (Some(q_end), Some(a_end)) = (question_end(query), question_end(answer)) else {
        return false;
    };
    query[4..6] == answer[4..6] && query[12..q_end].eq_ignore_ascii_case(&answer[12..a_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_have_kinds_and_print_their_cause_once() {
        let none = Forwarder::new(Vec::new(), Duration::from_secs(1));
        let query = message(0, None, false);
        let error = none.exchange(&query, Transport::Udp).await.unwrap_err();
        assert_eq!(error.kind(), FailureKind::NoUpstream);
        assert_eq!(error.kind().label(), "no_upstream");
        assert_eq!(ForwardError::Overload.kind().label(), "overload");

        // A port held but not listened on, over TCP: connection refused, of kind `error`.
        let held =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        held.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let addr = held.local_addr().unwrap().as_socket().unwrap();
        let refused = Forwarder::new(vec![addr], Duration::from_secs(2));
        let error = refused.exchange(&query, Transport::Tcp).await.unwrap_err();
        assert_eq!(error.kind(), FailureKind::Error, "{error:?}");
        let chain = trellis_core::error_chain(&error);
        assert!(
            chain.starts_with(&format!("connecting to {addr}: ")),
            "{chain}"
        );
        let cause = std::error::Error::source(&error).unwrap().to_string();
        assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
    }

    #[test]
    fn answers_must_match_id_and_question() {
        let query = [
            0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1,
        ];
        let mut answer = query;
        answer[0..2].copy_from_slice(&7u16.to_be_bytes());
        answer[2] |= 0x80;
        assert!(matches(&query, 7, &answer));
        assert!(!matches(&query, 8, &answer));
        let mut upper = answer;
        upper[13] = b'A';
        assert!(matches(&query, 7, &upper));
        let mut other = answer;
        other[13] = b'b';
        assert!(!matches(&query, 7, &other));
        assert!(!matches(&query, 7, &answer[..15]));
        assert!(!matches(&query, 7, &query));
    }

    fn message(answers: usize, edns: Option<u16>, response: bool) -> Vec<u8> {
        crate::wire::testing::message(answers, edns, response)
    }

    #[test]
    fn the_edns_cap_holds_both_ways() {
        let q = capped_query(&message(0, Some(4096), false), 1232);
        assert_eq!(wire::edns_payload(&q), Some(1232));
        let small = capped_query(&message(0, Some(800), false), 1232);
        assert_eq!(wire::edns_payload(&small), Some(800));
        let plain = message(0, None, false);
        assert_eq!(capped_query(&plain, 1232), plain);

        let client = message(0, Some(4096), false);
        // Fits: relayed, advertising our cap.
        let (bytes, cut) =
            relayed_answer(message(3, Some(4096), true), &client, Transport::Udp, 1232).unwrap();
        assert!(!cut);
        assert_eq!(wire::edns_payload(&bytes), Some(1232));
        // Too big for 1232 (150 records): truncated over UDP, whole over TCP.
        let big = message(150, Some(4096), true);
        assert!(big.len() > 1232);
        let (bytes, cut) = relayed_answer(big.clone(), &client, Transport::Udp, 1232).unwrap();
        assert!(cut && bytes.len() <= 1232);
        let (bytes, cut) = relayed_answer(big, &client, Transport::Tcp, 1232).unwrap();
        assert!(!cut && bytes.len() > 1232);
        // A client without EDNS gets 512 at most.
        let (bytes, cut) =
            relayed_answer(message(40, None, true), &plain, Transport::Udp, 1232).unwrap();
        assert!(cut && bytes.len() <= 512);
    }
}
