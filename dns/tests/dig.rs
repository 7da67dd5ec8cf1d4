//! The real `trellis-dns` binary on 127.0.0.1 (ephemeral ports) against Debian's `dig`
//! (dnsutils), with a watched catalog file and an upstream stub. Skipped when dig is missing.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use trellis_dns::Catalog;
use trellis_test_support::eventually;

const WAIT: Duration = Duration::from_secs(10);

/// The server process; killed (by its PID) and reaped on drop, even when the test fails.
struct Server {
    child: Child,
    dns: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(key)? + key.len()..];
    let rest = rest.trim_start_matches("Some(");
    let end = rest.find([' ', ')']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn spawn_server(catalog: &Path, upstream: SocketAddr) -> Server {
    spawn_server_with(catalog, upstream, &["--forward-for", "127.0.0.0/8"], true)
}

/// The binary on `catalog` with `extra` flags; waits for it to serve and, with
/// `wait_published`, for the catalog to be published.
fn spawn_server_with(
    catalog: &Path,
    upstream: SocketAddr,
    extra: &[&str],
    wait_published: bool,
) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_trellis-dns"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--catalog-poll-ms",
            "50",
        ])
        .args([
            "--upstream-timeout-ms",
            "500",
            "--upstream",
            &upstream.to_string(),
        ])
        .arg("--catalog")
        .arg(catalog)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn trellis-dns");
    // Owned by the guard at once: killed even if start-up fails below.
    let mut server = Server {
        child,
        dns: SocketAddr::from(([0, 0, 0, 0], 0)),
        metrics: SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let stderr = server.child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(common::strip_ansi(&line));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut addrs = None;
    let mut published = false;
    let mut log = Vec::new();
    while Instant::now() < deadline && !(addrs.is_some() && (published || !wait_published)) {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        log.push(line.clone());
        if line.contains("serving") {
            addrs = Some((
                field(&line, "dns_addr=").unwrap(),
                field(&line, "metrics_addr=").unwrap(),
            ));
        }
        published |= line.contains("catalog published");
    }
    let Some((dns, metrics)) = addrs else {
        panic!(
            "trellis-dns did not start: {log:?} {:?}",
            server.child.try_wait()
        );
    };
    assert!(published || !wait_published, "catalog not published");
    server.dns = dns;
    server.metrics = metrics;
    server
}

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answer-section records of dig's output, as "name type data".
fn answers(output: &str) -> Vec<String> {
    let mut section = false;
    let mut records = Vec::new();
    for line in output.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            section = true;
            continue;
        }
        if section {
            if line.trim().is_empty() {
                break;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            records.push(format!(
                "{} {} {}",
                words[0],
                words[3],
                words[4..].join(" ")
            ));
        }
    }
    records
}

fn write_catalog(dir: &Path, catalog: &Catalog) {
    let tmp = dir.join("catalog.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(catalog).unwrap()).unwrap();
    std::fs::rename(&tmp, dir.join("catalog.json")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_against_the_binary() {
    if missing_tool("dig_against_the_binary", "dig", "-v", "dnsutils") {
        return;
    }
    let (upstream, _udp, _tcp) = upstream_stub().await;
    let dir = tempfile::tempdir().unwrap();
    write_catalog(dir.path(), &with_big(100));
    let server = spawn_server(&dir.path().join("catalog.json"), upstream);
    let s = server.dns;

    let out = dig(s, &["web.shop.svc.clusterset.local", "A"]);
    assert!(
        out.contains("status: NOERROR") && out.contains("flags: qr aa rd ra"),
        "{out}"
    );
    assert_eq!(
        answers(&out),
        ["web.shop.svc.clusterset.local. A 10.96.0.10"]
    );
    let out = dig(s, &["web.shop.svc.clusterset.local", "AAAA"]);
    assert_eq!(
        answers(&out),
        ["web.shop.svc.clusterset.local. AAAA fd00::10"]
    );
    let out = dig(s, &["_http._tcp.web.shop.svc.clusterset.local", "SRV"]);
    assert_eq!(
        answers(&out),
        ["_http._tcp.web.shop.svc.clusterset.local. SRV 0 100 80 web.shop.svc.clusterset.local."]
    );
    assert!(
        out.contains("ADDITIONAL: 3"),
        "the target's A and AAAA + OPT: {out}"
    );
    // At the bare name, one record per port.
    let out = dig(s, &["web.shop.svc.clusterset.local", "SRV"]);
    assert_eq!(
        answers(&out),
        [
            "web.shop.svc.clusterset.local. SRV 0 50 80 web.shop.svc.clusterset.local.",
            "web.shop.svc.clusterset.local. SRV 0 50 53 web.shop.svc.clusterset.local."
        ]
    );
    let out = dig(s, &["db-0.west.db.shop.svc.clusterset.local"]);
    assert_eq!(
        answers(&out),
        ["db-0.west.db.shop.svc.clusterset.local. A 10.2.1.5"]
    );

    // NXDOMAIN vs NODATA, both with the SOA.
    let out = dig(s, &["nope.shop.svc.clusterset.local"]);
    assert!(
        out.contains("status: NXDOMAIN") && out.contains("AUTHORITY: 1"),
        "{out}"
    );
    let out = dig(s, &["web.shop.svc.clusterset.local", "MX"]);
    assert!(
        out.contains("status: NOERROR")
            && out.contains("ANSWER: 0")
            && out.contains("AUTHORITY: 1"),
        "{out}"
    );
    assert!(
        out.contains("IN\tSOA\tns.dns.clusterset.local. hostmaster.clusterset.local."),
        "{out}"
    );

    // Case: answered in the client's spelling.
    let out = dig(s, &["WEB.Shop.SVC.clusterset.LOCAL"]);
    assert_eq!(answers(&out).len(), 1);
    assert!(
        answers(&out)[0].starts_with("WEB.Shop.SVC.clusterset.LOCAL. A"),
        "{out}"
    );

    // A large answer: truncated over UDP, dig retries over TCP and gets all 100.
    let out = dig(s, &["big.shop.svc.clusterset.local"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(answers(&out).len(), 100);
    let out = dig(s, &["big.shop.svc.clusterset.local", "+ignore", "+noedns"]);
    assert!(out.contains(" tc") && out.contains("ANSWER: 0"), "{out}");
    let out = dig(s, &["web.shop.svc.clusterset.local", "+tcp"]);
    assert_eq!(answers(&out).len(), 1);

    // Forwarding, over UDP and TCP.
    let out = dig(s, &["www.example.test"]);
    assert_eq!(answers(&out), ["www.example.test. A 192.0.2.1"]);
    let out = dig(s, &["www.example.test", "+tcp"]);
    assert_eq!(answers(&out), ["www.example.test. A 192.0.2.1"]);
    let out = dig(s, &["nothing.invalid"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");

    // Garbage, then the server still answers.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for packet in [&b"x"[..], &[0u8; 12], &[0xff; 600], &[0u8; 5000]] {
        socket.send_to(packet, s).unwrap();
    }
    let out = dig(s, &["web.shop.svc.clusterset.local"]);
    assert_eq!(answers(&out).len(), 1);

    // An endpoint removed from the file is gone as soon as the file is read (50 ms polls).
    let mut catalog = with_big(100);
    catalog.revision = 2;
    catalog.services[1].clusters[0].endpoints.remove(0);
    write_catalog(dir.path(), &catalog);
    eventually("the endpoint removed", WAIT, || {
        let out = dig(s, &["db.shop.svc.clusterset.local"]);
        (answers(&out) == ["db.shop.svc.clusterset.local. A 10.2.1.6"]).then_some(())
    });
    let out = dig(s, &["db-0.west.db.shop.svc.clusterset.local"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    let out = dig(s, &["clusterset.local", "SOA"]);
    assert!(
        out.contains("hostmaster.clusterset.local. 2 7200 1800 86400 5"),
        "serial follows the revision: {out}"
    );

    let text = scrape(server.metrics).await;
    assert!(
        metric(
            &text,
            "trellis_dns_queries_total",
            &[("source", "upstream")]
        ) >= 3.0
    );
    assert!(metric(&text, "trellis_dns_dropped_packets_total", &[]) >= 2.0);
    assert!(
        metric(
            &text,
            "trellis_dns_catalog_loads_total",
            &[("result", "ok")]
        ) >= 2.0
    );
}

/// With its catalog file missing at start, the binary answers SERVFAIL (not an authoritative
/// NXDOMAIN a cache would keep) and /readyz is 503; once the file appears, the names resolve,
/// missing ones are NXDOMAIN, and /readyz is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_until_the_catalog_file_is_loaded() {
    if missing_tool(
        "servfail_until_the_catalog_file_is_loaded",
        "dig",
        "-v",
        "dnsutils",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server_with(
        &dir.path().join("catalog.json"),
        "127.0.0.1:9".parse().unwrap(),
        &[],
        false,
    );
    let s = server.dns;
    for name in [
        "web.shop.svc.clusterset.local",
        "nope.shop.svc.clusterset.local",
    ] {
        for transport in ["+notcp", "+tcp"] {
            let out = dig(s, &[name, transport]);
            assert!(
                out.contains("status: SERVFAIL") && !out.contains("flags: qr aa"),
                "{out}"
            );
        }
    }
    assert_eq!(http_get(server.metrics, "/readyz").await.0, 503);

    write_catalog(dir.path(), &shop());
    let out = eventually("the catalog loaded", WAIT, || {
        let out = dig(s, &["web.shop.svc.clusterset.local"]);
        // Until then, SERVFAIL and nothing else.
        assert!(
            out.contains("status: SERVFAIL") || out.contains("status: NOERROR"),
            "{out}"
        );
        out.contains("status: NOERROR").then_some(out)
    });
    assert_eq!(answers(&out).len(), 1, "{out}");
    let out = dig(s, &["nope.shop.svc.clusterset.local"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert_eq!(
        http_get(server.metrics, "/readyz").await,
        (200, "ready\n".into())
    );
    // Started without --forward-for: out-of-zone names are refused, not forwarded.
    let out = dig(s, &["www.example.test"]);
    assert!(out.contains("status: REFUSED"), "{out}");
}

/// `--reverse-zone`: `dig -x` of a headless endpoint and of the clusterset IP finds their
/// names; an unknown address in the zone is NXDOMAIN with the reverse zone's SOA; the schema
/// version answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_reverse_zones_and_the_schema_version() {
    if missing_tool(
        "dig_reverse_zones_and_the_schema_version",
        "dig",
        "-v",
        "dnsutils",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    write_catalog(dir.path(), &shop());
    let server = spawn_server_with(
        &dir.path().join("catalog.json"),
        "127.0.0.1:9".parse().unwrap(),
        &["--reverse-zone", "10.2.0.0/16,10.96.0.0/16"],
        true,
    );
    let s = server.dns;
    let out = dig(s, &["-x", "10.2.1.5"]);
    assert_eq!(
        answers(&out),
        ["5.1.2.10.in-addr.arpa. PTR db-0.west.db.shop.svc.clusterset.local."],
        "{out}"
    );
    let out = dig(s, &["-x", "10.96.0.10"]);
    assert_eq!(
        answers(&out),
        ["10.0.96.10.in-addr.arpa. PTR web.shop.svc.clusterset.local."],
        "{out}"
    );
    let out = dig(s, &["-x", "10.2.9.9"]);
    assert!(
        out.contains("status: NXDOMAIN") && out.contains("2.10.in-addr.arpa.\t5\tIN\tSOA"),
        "{out}"
    );
    let out = dig(s, &["dns-version.clusterset.local", "TXT"]);
    assert_eq!(
        answers(&out),
        ["dns-version.clusterset.local. TXT \"1.0.0\""],
        "{out}"
    );
    // Outside the reverse zones: refused (no --forward-for), not answered.
    let out = dig(s, &["-x", "10.1.0.1"]);
    assert!(out.contains("status: REFUSED"), "{out}");
}
