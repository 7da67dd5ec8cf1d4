//! Relaying queries outside the zone to upstream resolvers: the client's bytes go out with a
//! fresh random ID from a fresh ephemeral port, the answer comes back as the upstream wrote it
//! (flags, sections, EDNS) with the client's ID restored. A failure or timeout moves on to the
//! next upstream; when all fail, the caller answers SERVFAIL.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use crate::Error;
use crate::answer::Transport;
use crate::wire::question_end;

/// Something that answers a forwarded query (the seam for tests).
pub trait Upstream: Send + Sync + 'static {
    /// Exchanges `query` (a full DNS message) and returns the answer, with the query's ID.
    fn exchange(
        &self,
        query: &[u8],
        transport: Transport,
    ) -> impl Future<Output = Result<Vec<u8>, Error>> + Send;
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
    ) -> Result<Vec<u8>, Error> {
        let fail = |reason: String| Error::Upstream { upstream, reason };
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
                    let socket = UdpSocket::bind(bind)
                        .await
                        .map_err(|e| fail(format!("bind: {e}")))?;
                    socket
                        .connect(upstream)
                        .await
                        .map_err(|e| fail(format!("connect: {e}")))?;
                    socket
                        .send(&out)
                        .await
                        .map_err(|e| fail(format!("send: {e}")))?;
                    let mut buf = vec![0u8; 65535];
                    loop {
                        let len = socket
                            .recv(&mut buf)
                            .await
                            .map_err(|e| fail(format!("recv: {e}")))?;
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
                        .map_err(|e| fail(format!("connect: {e}")))?;
                    let len =
                        u16::try_from(out.len()).map_err(|_| fail("query too long".into()))?;
                    let mut framed = len.to_be_bytes().to_vec();
                    framed.extend_from_slice(&out);
                    stream
                        .write_all(&framed)
                        .await
                        .map_err(|e| fail(format!("send: {e}")))?;
                    let len = stream
                        .read_u16()
                        .await
                        .map_err(|e| fail(format!("recv: {e}")))?;
                    let mut buf = vec![0u8; usize::from(len)];
                    stream
                        .read_exact(&mut buf)
                        .await
                        .map_err(|e| fail(format!("recv: {e}")))?;
                    if matches(query, id, &buf) {
                        Ok(buf)
                    } else {
                        Err(fail("answer does not match the query".into()))
                    }
                }
            }
        };
        let mut answer = timeout(self.timeout, exchange)
            .await
            .map_err(|_| fail("timed out".into()))??;
        answer[0..2].copy_from_slice(&query[0..2]);
        Ok(answer)
    }
}

impl Upstream for Forwarder {
    async fn exchange(&self, query: &[u8], transport: Transport) -> Result<Vec<u8>, Error> {
        let mut last = Error::Upstream {
            upstream: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: "no upstream configured".into(),
        };
        if query.len() < 12 {
            return Err(last);
        }
        for upstream in &self.upstreams {
            match self.exchange_with(*upstream, query, transport).await {
                Ok(answer) => return Ok(answer),
                Err(error) => {
                    tracing::debug!(%error, "upstream failed");
                    last = error;
                }
            }
        }
        Err(last)
    }
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
}
