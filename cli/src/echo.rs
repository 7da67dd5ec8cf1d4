//! `trellis echo-server`: the lab's workload, and a test workload for any cluster. A TCP port
//! echoes what it receives; an HTTP port answers every request with who served it, so a client
//! sees which pod of which cluster a Service sent it to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connections served at once per port; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// An HTTP request head larger than this is refused.
const MAX_REQUEST_HEAD: usize = 8192;
/// A client has this long to send its request head.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Args)]
pub struct EchoArgs {
    /// Who this server is, in every HTTP answer (the lab uses `<cluster>/<pod>`).
    #[arg(long)]
    identity: String,
    /// The TCP echo port.
    #[arg(long, default_value = "0.0.0.0:7000")]
    tcp: SocketAddr,
    /// The HTTP port.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http: SocketAddr,
}

pub fn run(args: EchoArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: EchoArgs) -> anyhow::Result<()> {
    let tcp = TcpListener::bind(args.tcp)
        .await
        .with_context(|| format!("listen on {}", args.tcp))?;
    let http = TcpListener::bind(args.http)
        .await
        .with_context(|| format!("listen on {}", args.http))?;
    let identity: Arc<str> = args.identity.into();
    let echo = accept_loop(tcp, |stream, _| echo(stream));
    let http = accept_loop(http, move |stream, client| {
        answer_http(stream, client, identity.clone())
    });
    tokio::select! {
        () = echo => {}
        () = http => {}
    }
    Ok(())
}

async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, client)) => {
                let connection = handle(stream, client);
                tokio::spawn(async move {
                    connection.await;
                    drop(slot);
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.split();
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
}

async fn answer_http(mut stream: TcpStream, client: SocketAddr, identity: Arc<str>) {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(REQUEST_DEADLINE, async {
        let mut buffer = [0u8; 1024];
        loop {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buffer[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_REQUEST_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    let complete = matches!(read, Ok(Ok(true)));
    let response = http_response(complete.then_some(&head[..]), &identity, client);
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

/// The whole HTTP/1.1 response to a request head (`None`: incomplete or too large).
fn http_response(head: Option<&[u8]>, identity: &str, client: SocketAddr) -> Vec<u8> {
    let request_line = head
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| h.lines().next());
    let (status, body) = match request_line.map(|l| l.split_whitespace().collect::<Vec<_>>()) {
        Some(parts) if parts.len() == 3 && parts[2].starts_with("HTTP/1.") => {
            if parts[0] == "GET" || parts[0] == "HEAD" {
                ("200 OK", format!("{identity} answered {client}\n"))
            } else {
                ("405 Method Not Allowed", "only GET and HEAD\n".to_string())
            }
        }
        _ => ("400 Bad Request", "bad request\n".to_string()),
    };
    let is_head = request_line.is_some_and(|l| l.starts_with("HEAD "));
    let mut response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !is_head {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(head: Option<&[u8]>) -> String {
        String::from_utf8(http_response(
            head,
            "c2/pod-3",
            "10.1.0.1:40000".parse().unwrap(),
        ))
        .unwrap()
    }

    #[test]
    fn a_get_names_the_server_and_the_client() {
        let response = text(Some(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"));
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("content-length: 33\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nc2/pod-3 answered 10.1.0.1:40000\n"));
    }

    #[test]
    fn head_has_no_body_and_other_methods_are_refused() {
        let head = text(Some(b"HEAD / HTTP/1.1\r\n\r\n"));
        assert!(head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"));
        assert!(text(Some(b"POST / HTTP/1.1\r\n\r\n")).starts_with("HTTP/1.1 405"));
    }

    #[test]
    fn garbage_and_incomplete_requests_get_400() {
        assert!(text(None).starts_with("HTTP/1.1 400"));
        assert!(text(Some(b"\xff\xfe\r\n\r\n")).starts_with("HTTP/1.1 400"));
        assert!(text(Some(b"GET /\r\n\r\n")).starts_with("HTTP/1.1 400"));
    }

    #[tokio::test]
    async fn serves_echo_and_http_on_loopback() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tcp_at, http_at) = (tcp.local_addr().unwrap(), http.local_addr().unwrap());
        tokio::spawn(accept_loop(tcp, |s, _| echo(s)));
        tokio::spawn(accept_loop(http, |s, c| answer_http(s, c, "me".into())));

        let mut client = TcpStream::connect(tcp_at).await.unwrap();
        client.write_all(b"hello mesh").await.unwrap();
        let mut back = [0u8; 10];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello mesh");

        let mut client = TcpStream::connect(http_at).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut response = String::new();
        client.read_to_string(&mut response).await.unwrap();
        assert!(response.ends_with(&format!("me answered {}\n", client.local_addr().unwrap())));
    }
}
