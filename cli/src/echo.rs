//! `trellis echo-server`: the lab's workload, and a test workload for any cluster. TCP, UDP
//! and SCTP ports echo what they receive (as many of each as asked for, as a pod declares its
//! container ports); an HTTP port answers every request with who served it, so a client sees
//! which pod of which cluster a Service sent it to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Connections served at once per port; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// An HTTP request head larger than this is refused.
const MAX_REQUEST_HEAD: usize = 8192;
/// A client has this long to send its request head.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// The largest UDP datagram echoed.
const MAX_DATAGRAM: usize = 65_536;
/// SCTP's IP protocol number.
const IPPROTO_SCTP: i32 = 132;

#[derive(Args)]
pub struct EchoArgs {
    /// Who this server is, in every HTTP answer (the lab uses `<cluster>/<pod>`).
    #[arg(long)]
    identity: String,
    /// A TCP echo port (repeat for more). Without any port given: TCP echo on 0.0.0.0:7000
    /// and HTTP on 0.0.0.0:8080.
    #[arg(long)]
    tcp: Vec<SocketAddr>,
    /// A UDP echo port: every datagram is sent back to its sender (repeat for more).
    #[arg(long)]
    udp: Vec<SocketAddr>,
    /// An SCTP echo port (repeat for more); skipped, with a message, when the kernel has no
    /// SCTP.
    #[arg(long)]
    sctp: Vec<SocketAddr>,
    /// An HTTP port (repeat for more).
    #[arg(long)]
    http: Vec<SocketAddr>,
    /// Serve only the ports given: none when none is (a pod that only makes connections).
    #[arg(long)]
    no_default_ports: bool,
    /// Written (empty) once every port is bound: readiness for any protocol.
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
}

impl EchoArgs {
    /// The ports to serve: those given, or the lab's defaults when none is.
    fn or_defaults(mut self) -> Self {
        if !self.no_default_ports
            && self.tcp.is_empty()
            && self.udp.is_empty()
            && self.sctp.is_empty()
            && self.http.is_empty()
        {
            self.tcp.push(SocketAddr::from(([0, 0, 0, 0], 7000)));
            self.http.push(SocketAddr::from(([0, 0, 0, 0], 8080)));
        }
        self
    }
}

pub fn run(args: EchoArgs) -> anyhow::Result<()> {
    crate::block_on(serve(args))
}

async fn serve(args: EchoArgs) -> anyhow::Result<()> {
    let args = args.or_defaults();
    let identity: Arc<str> = args.identity.into();
    // Every socket is bound before any is served, so a port that cannot be had fails the
    // start instead of leaving a half-serving workload.
    let mut servers = tokio::task::JoinSet::new();
    for at in args.tcp {
        let listener = TcpListener::bind(at)
            .await
            .with_context(|| format!("listen on tcp {at}"))?;
        servers.spawn(accept_loop(listener, |stream, _| echo(stream)));
    }
    for at in args.udp {
        let socket = UdpSocket::bind(at)
            .await
            .with_context(|| format!("listen on udp {at}"))?;
        servers.spawn(echo_datagrams(socket));
    }
    for at in args.sctp {
        match sctp_listener(at) {
            Ok(listener) => {
                servers.spawn(accept_loop(listener, |stream, _| echo(stream)));
            }
            Err(error) if error.raw_os_error() == Some(nix::libc::EPROTONOSUPPORT) => {
                eprintln!(
                    "echo-server: this kernel has no SCTP (try `modprobe sctp`); not serving sctp {at}"
                );
            }
            Err(error) => return Err(error).with_context(|| format!("listen on sctp {at}")),
        }
    }
    for at in args.http {
        let listener = TcpListener::bind(at)
            .await
            .with_context(|| format!("listen on http {at}"))?;
        let identity = identity.clone();
        servers.spawn(accept_loop(listener, move |stream, client| {
            answer_http(stream, client, identity.clone())
        }));
    }
    if let Some(ready) = &args.ready_file {
        std::fs::write(ready, b"").with_context(|| format!("write {}", ready.display()))?;
    }
    // The servers run until the process is stopped; the first to end (none does) ends it.
    if servers.is_empty() {
        std::future::pending::<()>().await;
    }
    servers.join_next().await;
    Ok(())
}

/// A one-to-one style SCTP socket listening on `at`. Such a socket takes the same calls as a
/// TCP one (`accept`, `read`, `write`), so tokio's TCP types drive it; only TCP options
/// (`TCP_NODELAY`) do not apply, and their errors are ignored.
fn sctp_listener(at: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(at),
        socket2::Type::STREAM,
        Some(socket2::Protocol::from(IPPROTO_SCTP)),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&at.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(std::net::TcpListener::from(socket))
}

/// Sends every datagram back to where it came from.
async fn echo_datagrams(socket: UdpSocket) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv_from(&mut buffer).await {
            Ok((n, from)) => {
                let _ = socket.send_to(&buffer[..n], from).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
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
    async fn udp_datagrams_come_back_to_their_sender() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = server.local_addr().unwrap();
        tokio::spawn(echo_datagrams(server));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"ping 81/udp", at).await.unwrap();
        let mut back = [0u8; 64];
        let (n, from) = client.recv_from(&mut back).await.unwrap();
        assert_eq!((&back[..n], from), (&b"ping 81/udp"[..], at));
    }

    #[test]
    fn no_port_given_means_the_lab_defaults() {
        let args = EchoArgs {
            identity: "me".into(),
            tcp: vec![],
            udp: vec![],
            sctp: vec![],
            http: vec![],
            no_default_ports: false,
            ready_file: None,
        }
        .or_defaults();
        assert_eq!(args.tcp, ["0.0.0.0:7000".parse().unwrap()]);
        assert_eq!(args.http, ["0.0.0.0:8080".parse().unwrap()]);
        let udp_only = EchoArgs {
            identity: "me".into(),
            tcp: vec![],
            udp: vec!["0.0.0.0:80".parse().unwrap()],
            sctp: vec![],
            http: vec![],
            no_default_ports: false,
            ready_file: None,
        }
        .or_defaults();
        assert!(udp_only.tcp.is_empty() && udp_only.http.is_empty());
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
