//! Shared helpers: a server on 127.0.0.1 with ephemeral ports, an upstream stub, a resolver.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

use trellis_dns::Catalog;
use trellis_dns::acl::ForwardAcl;
use trellis_dns::catalog::ZoneHandle;
use trellis_dns::config::Config;
use trellis_dns::forward::Forwarder;
use trellis_dns::metrics::Metrics;
use trellis_dns::server::{self, Running};

pub struct TestServer {
    pub running: Running,
    pub handle: ZoneHandle,
    pub metrics: Metrics,
}

impl TestServer {
    pub fn addr(&self) -> SocketAddr {
        self.running.dns_addr
    }
}

pub async fn start(catalog: &Catalog, upstreams: Vec<SocketAddr>) -> TestServer {
    start_with(catalog, upstreams, 1).await
}

pub async fn start_with(
    catalog: &Catalog,
    upstreams: Vec<SocketAddr>,
    udp_workers: usize,
) -> TestServer {
    let config = Config {
        udp_workers,
        // These tests query from loopback and some rely on forwarding.
        forward_for: ForwardAcl::new(vec!["127.0.0.0/8".parse().unwrap()]),
        ..test_config(upstreams)
    };
    start_config(config, Some(catalog)).await
}

/// Loopback, ephemeral ports, a short upstream timeout, no rate limit (tests poll one name from
/// one address faster than clients do; tests/rate_limit.rs sets it), defaults otherwise (no
/// forwarding).
pub fn test_config(upstreams: Vec<SocketAddr>) -> Config {
    Config {
        rate_limit: 0,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        upstreams,
        upstream_timeout: Duration::from_millis(300),
        ..Config::default()
    }
}

/// A server with `config`, publishing `catalog` first if given (`None`: nothing loaded yet).
pub async fn start_config(config: Config, catalog: Option<&Catalog>) -> TestServer {
    let zone = config.validate().unwrap();
    let metrics = Metrics::new().unwrap();
    let handle = ZoneHandle::new(zone, config.edns_udp_size, Some(metrics.clone()));
    if let Some(catalog) = catalog {
        assert!(handle.publish(catalog).is_empty());
    }
    let forwarder = Forwarder::new(config.upstreams.clone(), config.upstream_timeout);
    let running = server::start(&config, handle.clone(), metrics.clone(), forwarder)
        .await
        .unwrap();
    TestServer {
        running,
        handle,
        metrics,
    }
}

/// A resolver with no cache, one attempt, UDP with TCP fallback (or TCP only).
pub fn resolver(addr: SocketAddr, tcp_only: bool) -> TokioResolver {
    let mut server = if tcp_only {
        NameServerConfig::tcp(addr.ip())
    } else {
        NameServerConfig::udp_and_tcp(addr.ip())
    };
    for connection in &mut server.connections {
        connection.port = addr.port();
    }
    let mut builder = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![server]),
        TokioRuntimeProvider::default(),
    );
    let options = builder.options_mut();
    options.cache_size = 0;
    options.attempts = 1;
    options.timeout = Duration::from_secs(3);
    options.ndots = 0;
    builder.build().unwrap()
}

pub fn catalog(json: &str) -> Catalog {
    Catalog::from_json(json).unwrap()
}

/// The standard test catalog: `web.shop`, a ClusterSetIP import exported by east and west
/// with the clusterset IPs 10.96.0.10 and fd00::10; headless `db.shop` in west.
pub fn shop() -> Catalog {
    catalog(
        r#"{"revision": 1, "services": [
          {"name": "web", "namespace": "shop", "ips": ["10.96.0.10", "fd00::10"],
           "ports": [{"name": "http", "port": 80}, {"name": "dns", "protocol": "UDP", "port": 53}],
           "clusters": [{"cluster": "east"}, {"cluster": "west"}]},
          {"name": "db", "namespace": "shop", "headless": true, "ports": [{"name": "pg", "port": 5432}],
           "clusters": [{"cluster": "west", "endpoints": [{"address": "10.2.1.5", "hostname": "db-0"},
                                                         {"address": "10.2.1.6", "hostname": "db-1"}]}]}
        ]}"#,
    )
}

/// `big.shop`: a headless service with `n` endpoints (too many for 512 bytes when n > 29).
pub fn with_big(n: usize) -> Catalog {
    let mut catalog = shop();
    let endpoints: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"address": "10.3.{}.{}"}}"#, i / 250, i % 250 + 1))
        .collect();
    let big = format!(
        r#"{{"services": [{{"name": "big", "namespace": "shop", "headless": true, "clusters": [
            {{"cluster": "east", "endpoints": [{}]}}]}}]}}"#,
        endpoints.join(",")
    );
    catalog
        .services
        .extend(Catalog::from_json(&big).unwrap().services);
    catalog
}

/// A UDP socket and a TCP listener on the same free port. The kernel picks the UDP port; TCP
/// may find it taken by another test's connection, so a few ports are tried.
pub async fn udp_and_tcp_on_one_port() -> (UdpSocket, TcpListener, SocketAddr) {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp, addr);
        }
    }
    panic!("no port was free for both UDP and TCP in 20 tries");
}

/// An upstream stub on 127.0.0.1 (UDP and TCP on one port): `*.example.test.` A 192.0.2.1,
/// anything else NXDOMAIN. Returns its address and the task serving it.
pub async fn upstream_stub() -> (SocketAddr, JoinHandle<()>, JoinHandle<()>) {
    let (udp, tcp, addr) = udp_and_tcp_on_one_port().await;
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((len, peer)) = udp.recv_from(&mut buf).await else {
                return;
            };
            if let Some(answer) = stub_answer(&buf[..len]) {
                let _ = udp.send_to(&answer, peer).await;
            }
        }
    });
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = tcp.accept().await else {
                return;
            };
            tokio::spawn(async move {
                while let Ok(len) = stream.read_u16().await {
                    let mut query = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    let Some(answer) = stub_answer(&query) else {
                        return;
                    };
                    let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&answer);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, udp_task, tcp_task)
}

fn stub_answer(query: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let mut response = Message::new(query.id, MessageType::Response, OpCode::Query);
    response.metadata.recursion_desired = query.recursion_desired;
    response.metadata.recursion_available = true;
    let question = query.queries.first()?.clone();
    response.add_query(question.clone());
    if question
        .name()
        .to_ascii()
        .to_ascii_lowercase()
        .ends_with(".example.test.")
    {
        if question.query_type() == RecordType::A {
            response.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A::new(192, 0, 2, 1)),
            ));
        }
    } else {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    response.to_vec().ok()
}

/// Sends `packet` over UDP and waits up to `wait` for one answer.
pub async fn udp_exchange(server: SocketAddr, packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    udp_exchange_from(IpAddr::from([127, 0, 0, 1]), server, packet, wait).await
}

/// A query for `name`/`qtype` with RD set, with an OPT record advertising `edns` if given.
pub fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut query = Message::new(0x5151, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        query.set_edns(e);
    }
    query.to_vec().unwrap()
}

/// Sends `packet` over UDP from `from` (any loopback address: 127.0.0.0/8 is all local) and
/// waits up to `wait` for one answer.
pub async fn udp_exchange_from(
    from: IpAddr,
    server: SocketAddr,
    packet: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(SocketAddr::new(from, 0)).await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
        Ok(Ok(len)) => Some(buf[..len].to_vec()),
        _ => None,
    }
}

/// One query over TCP; the answer.
pub async fn tcp_exchange(server: SocketAddr, packet: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await.unwrap();
    let len = tokio::time::timeout(Duration::from_secs(3), stream.read_u16())
        .await
        .expect("a TCP answer")
        .unwrap();
    let mut answer = vec![0u8; usize::from(len)];
    stream.read_exact(&mut answer).await.unwrap();
    answer
}

/// The parsed answer to `name`/`qtype` over UDP (from 127.0.0.1) or TCP.
pub async fn ask(server: SocketAddr, name: &str, qtype: RecordType, tcp: bool) -> Message {
    let packet = query(name, qtype, Some(1232));
    let bytes = if tcp {
        tcp_exchange(server, &packet).await
    } else {
        udp_exchange(server, &packet, Duration::from_secs(2))
            .await
            .expect("a UDP answer")
    };
    Message::from_vec(&bytes).unwrap()
}

/// `GET path` on an HTTP endpoint: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    let response = tokio::task::spawn_blocking(move || {
        trellis_http::get(addr, &path, Duration::from_secs(5)).expect("an HTTP answer")
    })
    .await
    .unwrap();
    (response.status, response.body)
}

/// GET /metrics.
pub async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The sum of the samples of `name` whose labels include every `labels` pair.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.rsplit_once(' ').map_or("", |(s, _)| s);
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            metric == name
                && labels.iter().all(|(k, v)| {
                    rest.split(',')
                        .any(|p| p.trim_end_matches('}') == format!("{k}=\"{v}\""))
                })
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A log line of the binary without its terminal colour codes.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether the external `tool` is missing (it does not run with `arg`); if so, says on stderr
/// that `what` (the test, or the part of it needing the tool) is skipped and how to install it.
pub fn missing_tool(what: &str, tool: &str, arg: &str, package: &str) -> bool {
    if std::process::Command::new(tool).arg(arg).output().is_ok() {
        return false;
    }
    eprintln!(
        "skipped {what}: `{tool}` is missing (apt-get install {package}, or scripts/install-deps)"
    );
    true
}
