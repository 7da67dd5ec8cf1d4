//! The server: GET routes answered by a [`Routes`] implementation, one request per
//! connection, every connection bounded in number (total and per client) and in time.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use trellis_core::admission::SourceSlots;

/// How many clients are served at once, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one client (IPv4 address or IPv6 /64).
    pub max_per_client: usize,
    /// The request head must arrive within this.
    pub header_timeout: Duration,
    /// A connection, from accept to the last byte written, lasts at most this...
    pub connection_timeout: Duration,
    /// ...unless it answers with a [`Reply::streaming`] body (a reader following flows): then
    /// at most this, and less when the client goes away or the producer ends.
    pub stream_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_per_client: 8,
            header_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(10),
            stream_timeout: Duration::from_secs(3600),
        }
    }
}

/// An answer: status, content type and body; or a body written as it is produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
    /// When set, the body is these chunks instead of `body`.
    pub stream: Option<ReplyStream>,
}

/// The chunks of a streaming body, in order, until every sender is dropped. Taken once, by
/// the connection that writes it.
#[derive(Clone)]
pub struct ReplyStream(Arc<std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Bytes>>>>);

impl std::fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyStream")
    }
}

impl PartialEq for ReplyStream {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ReplyStream {}

impl ReplyStream {
    fn take(&self) -> Option<tokio::sync::mpsc::Receiver<Bytes>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// A body read from a channel: a chunk as soon as it is sent. When the client goes away
/// hyper drops the body, and with it the receiver: the producer's next send fails, which is
/// how it learns to stop.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

impl Reply {
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            stream: None,
        }
    }

    /// 200 with a body of the chunks sent on `chunks`' sender, written as they come, until it
    /// is dropped (see [`Limits::stream_timeout`]).
    pub fn streaming(
        content_type: &'static str,
        chunks: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> Self {
        Self {
            stream: Some(ReplyStream(Arc::new(std::sync::Mutex::new(Some(chunks))))),
            ..Self::new(StatusCode::OK, content_type, Bytes::new())
        }
    }

    /// 200 with a plain-text body.
    pub fn text(body: impl Into<Bytes>) -> Self {
        Self::new(StatusCode::OK, "text/plain; charset=utf-8", body)
    }

    /// A plain-text error.
    pub fn error(status: StatusCode, message: impl Into<Bytes>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", message)
    }

    /// The Prometheus text exposition.
    pub fn metrics(body: impl Into<Bytes>) -> Self {
        Self::new(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            body,
        )
    }

    /// A JSON document.
    pub fn json(body: impl Into<Bytes>) -> Self {
        Self::new(StatusCode::OK, "application/json", body)
    }

    /// 200 `ok` when `healthy`, else 503 with `why`: what `/healthz` and `/readyz` answer.
    pub fn check(healthy: bool, ok: &'static str, why: &'static str) -> Self {
        if healthy {
            Self::text(ok)
        } else {
            Self::error(StatusCode::SERVICE_UNAVAILABLE, why)
        }
    }

    pub fn not_found() -> Self {
        Self::error(StatusCode::NOT_FOUND, "not found\n")
    }
}

/// What a daemon answers to `GET path` (the query string removed).
pub trait Routes: Send + Sync + 'static {
    fn get(&self, path: &str) -> impl Future<Output = Reply> + Send;

    /// What it answers to `GET path?query`, for routes that take parameters (`query` is
    /// empty without one); by default the query is ignored.
    fn get_with_query<'a>(
        &'a self,
        path: &'a str,
        _query: &'a str,
    ) -> impl Future<Output = Reply> + Send + 'a {
        self.get(path)
    }
}

/// Serves `routes` on `listener` until cancelled. `refused` is told why each connection that
/// found no slot was closed (`pending_full`: every slot taken; `source_pending_full`: the
/// client holds its share), for a metric.
pub async fn serve<R: Routes>(
    listener: TcpListener,
    routes: Arc<R>,
    limits: Limits,
    refused: impl Fn(&'static str) + Send + Sync + 'static,
) {
    let slots = SourceSlots::new(limits.max_connections, limits.max_per_client);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, mostly: wait rather than spin.
                tracing::warn!("HTTP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match slots.try_acquire(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                refused(refusal.label());
                continue;
            }
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let streaming = Arc::new(AtomicBool::new(false));
            let marks = streaming.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let routes = routes.clone();
                let marks = marks.clone();
                async move { Ok::<_, Infallible>(respond(&*routes, &request, &marks).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let in_time =
                match tokio::time::timeout(limits.connection_timeout, &mut connection).await {
                    Ok(_) => true,
                    // A streaming answer lives longer: until the client or the producer stops.
                    Err(_) if streaming.load(Ordering::Relaxed) => {
                        tokio::time::timeout(limits.stream_timeout, connection)
                            .await
                            .is_ok()
                    }
                    Err(_) => false,
                };
            if !in_time {
                tracing::debug!(%peer, "HTTP connection past its deadline; closed");
            }
            drop(slot);
        });
    }
}

async fn respond<R: Routes>(
    routes: &R,
    request: &Request<Incoming>,
    streaming: &AtomicBool,
) -> http::Response<BoxBody<Bytes, Infallible>> {
    let reply = if request.method() == Method::GET || request.method() == Method::HEAD {
        let uri = request.uri();
        routes
            .get_with_query(uri.path(), uri.query().unwrap_or(""))
            .await
    } else {
        Reply::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
    };
    let stream = reply.stream.as_ref().and_then(ReplyStream::take);
    let body = match stream {
        _ if request.method() == Method::HEAD => Full::new(Bytes::new()).boxed(),
        Some(chunks) => {
            streaming.store(true, Ordering::Relaxed);
            ChannelBody(chunks).boxed()
        }
        None => Full::new(reply.body).boxed(),
    };
    let mut response = http::Response::new(body);
    *response.status_mut() = reply.status;
    if let Ok(value) = header::HeaderValue::from_str(reply.content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use tokio::io::AsyncWriteExt;

    use super::*;

    struct Fixed;

    impl Routes for Fixed {
        async fn get(&self, path: &str) -> Reply {
            match path {
                "/healthz" => Reply::text("ok\n"),
                "/big" => Reply::text(vec![b'x'; 4 << 20]),
                _ => Reply::not_found(),
            }
        }

        async fn get_with_query(&self, path: &str, query: &str) -> Reply {
            match path {
                // `every=MS`: a line every MS milliseconds until the client goes away.
                "/ticks" => {
                    let every: u64 = query
                        .strip_prefix("every=")
                        .and_then(|ms| ms.parse().ok())
                        .unwrap_or(10);
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    tokio::spawn(async move {
                        for n in 0u64.. {
                            if tx.send(Bytes::from(format!("{n}\n"))).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(every)).await;
                        }
                        TICKERS_STOPPED.fetch_add(1, Ordering::SeqCst);
                    });
                    Reply::streaming("application/x-ndjson", rx)
                }
                _ => self.get(path).await,
            }
        }
    }

    static TICKERS_STOPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    async fn server(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(Fixed), limits, |_| {}));
        addr
    }

    /// A GET from `source` (a loopback address of its own), on a blocking thread.
    async fn get_from(
        source: &'static str,
        addr: SocketAddr,
        path: &'static str,
    ) -> crate::Response {
        tokio::task::spawn_blocking(move || {
            crate::client::get_from(
                Some(format!("{source}:0").parse().unwrap()),
                addr,
                path,
                Duration::from_secs(3),
            )
        })
        .await
        .unwrap()
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routes_methods_and_unknown_paths() {
        let addr = server(Limits::default()).await;
        let ok = get_from("127.0.0.1", addr, "/healthz?verbose=1").await;
        assert_eq!((ok.status, ok.body.as_str()), (200, "ok\n"));
        assert_eq!(get_from("127.0.0.1", addr, "/nope").await.status, 404);
        let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
        raw.write_all(b"POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut answer)
            .await
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 405"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streaming_answer_arrives_line_by_line_past_the_connection_deadline_and_stops_with_its_reader()
     {
        let limits = Limits {
            connection_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let addr = server(limits).await;
        let stopped_before = TICKERS_STOPPED.load(Ordering::SeqCst);
        let lines = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut seen = Vec::new();
            let response = crate::Get::new(addr, "/ticks?every=100", Duration::from_secs(2))
                .lines(|line| {
                    seen.push((line.to_owned(), started.elapsed()));
                    if seen.len() == 8 {
                        std::ops::ControlFlow::Break(())
                    } else {
                        std::ops::ControlFlow::Continue(())
                    }
                })
                .unwrap();
            assert_eq!(response.status, 200);
            seen
        })
        .await
        .unwrap();
        let numbers: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(numbers, ["0", "1", "2", "3", "4", "5", "6", "7"]);
        assert!(
            lines[0].1 < Duration::from_millis(300),
            "the first line came at once, not with the body's end: {:?}",
            lines[0].1
        );
        assert!(
            lines[7].1 > Duration::from_millis(600),
            "lines kept coming past the 300 ms connection deadline"
        );
        // The reader went away: the producer's next send fails and it stops.
        trellis_test_support::eventually_async(
            "the producer stops",
            Duration::from_secs(5),
            || async { (TICKERS_STOPPED.load(Ordering::SeqCst) > stopped_before).then_some(()) },
        )
        .await;
        let other = get_from("127.0.0.2", addr, "/healthz").await;
        assert_eq!(other.status, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_non_reading_clients_never_starve_another_client() {
        let limits = Limits {
            header_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_secs(2),
            ..Limits::default()
        };
        let addr = server(limits).await;
        // One address: 64 connections that say nothing, and 64 that ask for a large body
        // and never read it.
        let mut held = Vec::new();
        for _ in 0..64 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for _ in 0..64 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = stream
                .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
                .await;
            held.push(stream);
        }
        // Another client is answered at once, again and again, while they hang on.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(4) {
            let asked = Instant::now();
            let reply = get_from("127.0.0.2", addr, "/healthz").await;
            assert_eq!(reply.status, 200);
            assert!(
                asked.elapsed() < Duration::from_secs(1),
                "{:?}",
                asked.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(held);
    }
}
