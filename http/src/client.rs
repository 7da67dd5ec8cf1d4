//! A blocking HTTP/1.1 GET for the CLI, the lab and the tests: run it on a short-lived thread
//! (inside a network namespace if need be); it makes its own socket and a small runtime.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// The largest body read: a cluster's status document is well under it.
const MAX_BODY: usize = 64 << 20;

/// The longest line [`Get::lines`] takes (a flow is well under it).
const MAX_LINE: usize = 1 << 20;

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body of a 200, or an error naming the status.
    pub fn ok_body(self) -> Result<String, ClientError> {
        if self.status == 200 {
            Ok(self.body)
        } else {
            Err(ClientError::Status {
                status: self.status,
                body: self.body.chars().take(200).collect(),
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP to {addr}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("the answer from {addr} is larger than {MAX_BODY} bytes or broken")]
    Body { addr: SocketAddr },
    #[error("answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("start the client's runtime")]
    Runtime(#[source] std::io::Error),
}

/// `GET path` from `addr`, all of it (connect, request, body) within `timeout`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, ClientError> {
    Get::new(addr, path, timeout).send()
}

/// [`get`] from a given local address.
pub fn get_from(
    local: Option<SocketAddr>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Response, ClientError> {
    Get {
        local,
        ..Get::new(addr, path, timeout)
    }
    .send()
}

/// One GET, with what may differ from the plain [`get`].
#[derive(Debug, Clone)]
pub struct Get<'a> {
    pub addr: SocketAddr,
    /// The `Host` header (a name behind a proxy); the address when `None`.
    pub host: Option<&'a str>,
    /// The local address to send from.
    pub local: Option<SocketAddr>,
    pub path: &'a str,
    pub timeout: Duration,
}

impl<'a> Get<'a> {
    pub fn new(addr: SocketAddr, path: &'a str, timeout: Duration) -> Self {
        Self {
            addr,
            host: None,
            local: None,
            path,
            timeout,
        }
    }

    pub fn send(&self) -> Result<Response, ClientError> {
        let (addr, timeout) = (self.addr, self.timeout);
        runtime()?.block_on(async {
            tokio::time::timeout(timeout, fetch(self))
                .await
                .map_err(|_| ClientError::Timeout { addr, timeout })?
        })
    }

    /// The body of a 200 line by line as it arrives (a stream of NDJSON), each handed to
    /// `on_line` until it says stop or the server ends the body: `timeout` bounds the connection
    /// and the response's head only, so a followed stream may last. Another status comes back
    /// with its body whole, as from [`Get::send`]; a 200's `body` is then empty.
    pub fn lines(
        &self,
        mut on_line: impl FnMut(&str) -> std::ops::ControlFlow<()>,
    ) -> Result<Response, ClientError> {
        let (addr, timeout) = (self.addr, self.timeout);
        runtime()?.block_on(async {
            let response = tokio::time::timeout(timeout, request(self))
                .await
                .map_err(|_| ClientError::Timeout { addr, timeout })??;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            if status != 200 {
                let body = tokio::time::timeout(timeout, Limited::new(body, MAX_BODY).collect())
                    .await
                    .map_err(|_| ClientError::Timeout { addr, timeout })?
                    .map_err(|_| ClientError::Body { addr })?
                    .to_bytes();
                return Ok(Response {
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            let mut pending: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|source| ClientError::Http { addr, source })?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line[..end]);
                    if on_line(line.trim_end_matches('\r')).is_break() {
                        return Ok(Response {
                            status,
                            body: String::new(),
                        });
                    }
                }
                if pending.len() > MAX_LINE {
                    return Err(ClientError::Body { addr });
                }
            }
            if !pending.is_empty() {
                let _ = on_line(&String::from_utf8_lossy(&pending));
            }
            Ok(Response {
                status,
                body: String::new(),
            })
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)
}

async fn fetch(get: &Get<'_>) -> Result<Response, ClientError> {
    let addr = get.addr;
    let response = request(get).await?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| ClientError::Body { addr })?
        .to_bytes();
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Connects, sends the GET and reads the response's head.
async fn request(get: &Get<'_>) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
    let (local, addr, path) = (get.local, get.addr, get.path);
    let connect_err = |source| ClientError::Connect { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(connect_err)?;
    if let Some(local) = local {
        socket.bind(local).map_err(connect_err)?;
    }
    let stream = socket.connect(addr).await.map_err(connect_err)?;
    let http_err = |source| ClientError::Http { addr, source };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(
            http::header::HOST,
            get.host.map_or_else(|| addr.to_string(), str::to_string),
        )
        .header(http::header::ACCEPT, "*/*")
        .body(Empty::<Bytes>::new())
        .map_err(|_| ClientError::Body { addr })?;
    sender.send_request(request).await.map_err(http_err)
}
