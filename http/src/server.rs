//! The server: GET routes answered by a [`Routes`] implementation, one request per
//! connection, every connection bounded in number (total and per client) and in time.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
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
    /// A connection, from accept to the last byte written, lasts at most this.
    pub connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_per_client: 8,
            header_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(10),
        }
    }
}

/// An answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl Reply {
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
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
            let service = service_fn(move |request: Request<Incoming>| {
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(respond(&*routes, &request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            if tokio::time::timeout(limits.connection_timeout, connection)
                .await
                .is_err()
            {
                tracing::debug!(%peer, "HTTP connection past its deadline; closed");
            }
            drop(slot);
        });
    }
}

async fn respond<R: Routes>(
    routes: &R,
    request: &Request<Incoming>,
) -> http::Response<Full<Bytes>> {
    let reply = if request.method() == Method::GET || request.method() == Method::HEAD {
        routes.get(request.uri().path()).await
    } else {
        Reply::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
    };
    let body = if request.method() == Method::HEAD {
        Bytes::new()
    } else {
        reply.body
    };
    let mut response = http::Response::new(Full::new(body));
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
    }

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
