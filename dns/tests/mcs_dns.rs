//! The Kubernetes DNS-Based Multicluster Service Discovery specification (KEP-1645's
//! `specification.md`, schema 1.0.0) and the DNS specs of the MCS conformance suite
//! (kubernetes-sigs/mcs-api `conformance/clusterip_service_dns.go` and
//! `headless_service_dns.go`), asked by a real resolver (hickory, over UDP with TCP fallback)
//! of the zone the server builds from the controller's imports
//! ([`subscription::catalog_from_imports`]).
//!
//! The service is the suite's `hello`: ports `tcp` 42/TCP and `udp` 42/UDP, exported by
//! clusters `c1` (this one) and `c2`.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use tokio::net::UdpSocket;

use common::*;
use trellis_core::cluster::{Endpoint, Protocol, ServiceKind, ServicePort};
use trellis_core::imports::{Backend, ImportedService, Imports};
use trellis_dns::subscription::catalog_from_imports;

const NS: &str = "mcs-conformance";
/// `hello.mcs-conformance.svc.clusterset.local.`: the ClusterSetIP import.
const HELLO: &str = "hello.mcs-conformance.svc.clusterset.local.";
/// `hello-headless.mcs-conformance.svc.clusterset.local.`: the headless import.
const HEADLESS: &str = "hello-headless.mcs-conformance.svc.clusterset.local.";
/// This cluster's clusterset IPs for `hello`.
const VIP4: &str = "10.99.0.42";
const VIP6: &str = "fd99::42";
/// The exporting clusters' own ClusterIPs: reachable only inside each cluster, never answered.
const C1_CLUSTER_IP: &str = "10.96.0.10";
const C2_CLUSTER_IP: &str = "10.97.0.10";

fn hello_ports() -> Vec<ServicePort> {
    vec![
        ServicePort::new(Some("tcp".into()), Protocol::Tcp, 42),
        ServicePort::new(Some("udp".into()), Protocol::Udp, 42),
    ]
}

fn endpoint(addresses: &[&str], hostname: Option<&str>, ready: bool) -> Endpoint {
    Endpoint {
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        hostname: hostname.map(Into::into),
        node: None,
        ready,
    }
}

fn backend(
    cluster: &str,
    local: bool,
    cluster_ip: Option<&str>,
    endpoints: Vec<Endpoint>,
) -> Backend {
    Backend {
        cluster: cluster.parse().unwrap(),
        local,
        cluster_ips: cluster_ip.iter().map(|ip| ip.parse().unwrap()).collect(),
        endpoints,
        endpoint_ports: vec![],
        exported_at: None,
    }
}

fn import(name: &str, kind: ServiceKind, vips: &[&str], backends: Vec<Backend>) -> ImportedService {
    ImportedService {
        namespace: NS.into(),
        name: name.into(),
        kind,
        ports: hello_ports(),
        properties: Default::default(),
        oldest: "c1".parse().unwrap(),
        conflicts: vec![],
        vips: vips.iter().map(|ip| ip.parse().unwrap()).collect(),
        backends,
    }
}

/// The imports of cluster c1: `hello` (ClusterSetIP, both clusters, dual-stack VIPs) and
/// `hello-headless`: two StatefulSet pods in c1 (hostnames), in c2 a Deployment's pods (no
/// hostnames; one dual-stack, one not ready).
fn imports() -> Imports {
    let hello = import(
        "hello",
        ServiceKind::ClusterSetIP,
        &[VIP4, VIP6],
        vec![
            backend(
                "c1",
                true,
                Some(C1_CLUSTER_IP),
                vec![endpoint(&["10.1.0.5"], None, true)],
            ),
            backend(
                "c2",
                false,
                Some(C2_CLUSTER_IP),
                vec![endpoint(&["10.2.0.5"], None, true)],
            ),
        ],
    );
    let headless = import(
        "hello-headless",
        ServiceKind::Headless,
        &[],
        vec![
            backend(
                "c1",
                true,
                None,
                vec![
                    endpoint(&["10.1.0.11"], Some("hello-0"), true),
                    endpoint(&["10.1.0.12"], Some("hello-1"), true),
                ],
            ),
            backend(
                "c2",
                false,
                None,
                vec![
                    endpoint(&["10.2.0.21", "fd02::21"], None, true),
                    endpoint(&["10.2.0.22"], None, false),
                ],
            ),
        ],
    );
    Imports {
        revision: 9,
        services: [hello, headless]
            .into_iter()
            .map(|s| (s.key().to_string(), s))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// The server answering c1's imports; out-of-zone names forwarded to `upstreams`.
async fn serve(upstreams: Vec<SocketAddr>) -> TestServer {
    start(&catalog_from_imports(&imports()), upstreams).await
}

/// The answers' data for `name`/`rtype`, sorted; the lookup must succeed.
async fn data(resolver: &TokioResolver, name: &str, rtype: RecordType) -> Vec<String> {
    let lookup = resolver
        .lookup(name, rtype)
        .await
        .unwrap_or_else(|e| panic!("{name} {rtype}: {e}"));
    let mut out: Vec<String> = lookup
        .answers()
        .iter()
        .map(|r| r.data.to_string())
        .collect();
    out.sort();
    out
}

/// The response code of a lookup that finds no records, and whether the SOA came with it.
async fn none(resolver: &TokioResolver, name: &str, rtype: RecordType) -> (ResponseCode, bool) {
    match resolver.lookup(name, rtype).await {
        Err(NetError::Dns(DnsError::NoRecordsFound(no))) => (no.response_code, no.soa.is_some()),
        other => panic!("{name} {rtype}: expected no records, got {other:?}"),
    }
}

/// (port, target) of SRV records as the conformance suite reads them from nslookup.
fn srv(records: &[String]) -> Vec<(u16, String)> {
    records
        .iter()
        .map(|r| {
            let fields: Vec<&str> = r.split_whitespace().collect();
            assert_eq!(fields.len(), 4, "{r}");
            (fields[2].parse().unwrap(), fields[3].to_string())
        })
        .collect()
}

/// Conformance: "A DNS lookup of the <service>.<ns>.svc.clusterset.local domain for a
/// ClusterIP service should resolve to the clusterset IP" (spec 2.3.1, A and AAAA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusterset_ip_service_resolves_to_its_clusterset_ip() {
    let server = serve(vec![]).await;
    let resolver = resolver(server.addr(), false);
    assert_eq!(data(&resolver, HELLO, RecordType::A).await, [VIP4]);
    assert_eq!(data(&resolver, HELLO, RecordType::AAAA).await, [VIP6]);
    let a = resolver.lookup(HELLO, RecordType::A).await.unwrap();
    assert!(a.answers().iter().all(|r| r.ttl == 5));

    // Until the import has a VIP the name exists, with nothing to answer.
    let mut pending = imports();
    for svc in pending.services.values_mut() {
        svc.vips.clear();
    }
    server.handle.publish(&catalog_from_imports(&pending));
    for rtype in [RecordType::A, RecordType::AAAA, RecordType::SRV] {
        assert_eq!(
            none(&resolver, HELLO, rtype).await,
            (ResponseCode::NoError, true),
            "{rtype}"
        );
    }
    server.running.shutdown();
}

/// Conformance: "A DNS SRV query of the <service>.<ns>.svc.clusterset.local domain for a
/// ClusterIP service should return valid SRV records": exactly one, the service port and the
/// service name (42/TCP and 42/UDP are one record). Spec 2.3.2: `_<port>._<proto>` per named
/// port, the service name as target, its addresses in the additional section.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_of_a_clusterset_ip_service_targets_the_service_name() {
    let server = serve(vec![]).await;
    let resolver = resolver(server.addr(), false);
    let target = "hello.mcs-conformance.svc.clusterset.local.".to_string();
    assert_eq!(
        srv(&data(&resolver, HELLO, RecordType::SRV).await),
        [(42, target.clone())]
    );
    for owner in ["_tcp._tcp", "_udp._udp"] {
        let name = format!("{owner}.{HELLO}");
        assert_eq!(
            srv(&data(&resolver, &name, RecordType::SRV).await),
            [(42, target.clone())],
            "{name}"
        );
    }
    let answer = ask(server.addr(), HELLO, RecordType::SRV, false).await;
    let mut additional: Vec<String> = answer
        .additionals
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect();
    additional.sort();
    assert_eq!(
        additional,
        [format!("{target} {VIP4}"), format!("{target} {VIP6}")]
    );
    // The protocol is part of the name.
    assert_eq!(
        none(&resolver, &format!("_tcp._udp.{HELLO}"), RecordType::SRV)
            .await
            .0,
        ResponseCode::NXDomain
    );
    server.running.shutdown();
}

/// Conformance: "DNS lookups of the <service>.<ns>.svc.cluster.local domain for a ClusterIP
/// service should only resolve local services": trellis-dns is not authoritative for
/// `cluster.local`; such a name goes to the upstream (the cluster DNS) and its answer, the
/// local Service's ClusterIP, comes back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_local_names_are_left_to_the_cluster_dns() {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let cluster_dns = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((len, peer)) = upstream.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let mut response = Message::new(query.id, MessageType::Response, OpCode::Query);
            response.metadata.recursion_desired = query.recursion_desired;
            response.metadata.recursion_available = true;
            response.metadata.authoritative = true;
            response.add_queries(query.queries.iter().cloned());
            let question = &query.queries[0];
            if question.name().to_ascii() == "hello.mcs-conformance.svc.cluster.local."
                && question.query_type() == RecordType::A
            {
                response.add_answer(Record::from_rdata(
                    question.name().clone(),
                    30,
                    RData::A(A(C1_CLUSTER_IP.parse().unwrap())),
                ));
            } else {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            let _ = upstream.send_to(&response.to_vec().unwrap(), peer).await;
        }
    });
    let server = serve(vec![upstream_addr]).await;
    let resolver = resolver(server.addr(), false);
    let local = "hello.mcs-conformance.svc.cluster.local.";
    assert_eq!(data(&resolver, local, RecordType::A).await, [C1_CLUSTER_IP]);
    let lookup = resolver.lookup(local, RecordType::A).await.unwrap();
    assert_eq!(lookup.answers()[0].ttl, 30, "the cluster DNS's own answer");
    // And the clusterset name is still the VIP.
    assert_eq!(data(&resolver, HELLO, RecordType::A).await, [VIP4]);
    cluster_dns.abort();
    server.running.shutdown();
}

/// Conformance: "A DNS query of the <service>.<ns>.svc.clusterset.local domain for a headless
/// service should return the ready endpoint addresses of all the backing pods" (spec 2.4.1):
/// every ready endpoint of every cluster, A and AAAA; without a ready endpoint, NXDOMAIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_service_resolves_to_every_ready_endpoint_of_every_cluster() {
    let server = serve(vec![]).await;
    let resolver = resolver(server.addr(), false);
    assert_eq!(
        data(&resolver, HEADLESS, RecordType::A).await,
        ["10.1.0.11", "10.1.0.12", "10.2.0.21"]
    );
    assert_eq!(
        data(&resolver, HEADLESS, RecordType::AAAA).await,
        ["fd02::21"]
    );

    let mut idle = imports();
    for svc in idle.services.values_mut() {
        for backend in &mut svc.backends {
            for endpoint in &mut backend.endpoints {
                endpoint.ready = false;
            }
        }
    }
    server.handle.publish(&catalog_from_imports(&idle));
    for rtype in [RecordType::A, RecordType::AAAA, RecordType::SRV] {
        assert_eq!(
            none(&resolver, HEADLESS, rtype).await,
            (ResponseCode::NXDomain, true),
            "{rtype}"
        );
    }
    server.running.shutdown();
}

/// Conformance: "A DNS query of the <hostname>.<clusterid>.<service>.<ns>.svc.clusterset.local
/// domain for a headless StatefulSet service should return the requested pod's endpoint
/// address" (spec 2.4.1); an endpoint without a hostname is named by its address, dashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_endpoint_resolves_by_hostname_and_cluster() {
    let server = serve(vec![]).await;
    let resolver = resolver(server.addr(), false);
    for (host, want) in [
        ("hello-0.c1", &["10.1.0.11"][..]),
        ("hello-1.c1", &["10.1.0.12"]),
        ("10-2-0-21.c2", &["10.2.0.21"]),
    ] {
        assert_eq!(
            data(&resolver, &format!("{host}.{HEADLESS}"), RecordType::A).await,
            want,
            "{host}"
        );
    }
    assert_eq!(
        data(
            &resolver,
            &format!("10-2-0-21.c2.{HEADLESS}"),
            RecordType::AAAA
        )
        .await,
        ["fd02::21"]
    );
    // A hostname belongs to its cluster; a not-ready endpoint has no name.
    for name in ["hello-0.c2", "10-2-0-22.c2"] {
        assert_eq!(
            none(&resolver, &format!("{name}.{HEADLESS}"), RecordType::A)
                .await
                .0,
            ResponseCode::NXDomain,
            "{name}"
        );
    }
    server.running.shutdown();
}

/// Conformance: "A DNS SRV query of the <service>.<ns>.svc.clusterset.local domain for a
/// headless service should return valid SRV records": one per ready endpoint, the service
/// port, a target starting with the endpoint's hostname (or its dashed address). Spec 2.4.2:
/// the same at `_<port>._<proto>`, targets `<hostname>.<clusterid>.<svc>...` that resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_of_a_headless_service_names_every_ready_endpoint() {
    let server = serve(vec![]).await;
    let resolver = resolver(server.addr(), false);
    let want: Vec<(u16, String)> = ["hello-0.c1", "hello-1.c1", "10-2-0-21.c2"]
        .iter()
        .map(|host| (42, format!("{host}.{HEADLESS}")))
        .collect();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    for owner in [
        HEADLESS.to_string(),
        format!("_tcp._tcp.{HEADLESS}"),
        format!("_udp._udp.{HEADLESS}"),
    ] {
        let mut got = srv(&data(&resolver, &owner, RecordType::SRV).await);
        got.sort();
        assert_eq!(got, want_sorted, "{owner}");
    }
    for (_, target) in &want {
        assert_eq!(
            data(&resolver, target, RecordType::A).await.len(),
            1,
            "{target}"
        );
    }
    server.running.shutdown();
}

/// Spec 2.2: `dns-version.clusterset.local. TXT "1.0.0"`; the apex's SOA and NS; negative
/// answers carry the SOA in authority (for negative caching).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_version_and_the_apex() {
    let server = serve(vec![]).await;
    let resolver = resolver(server.addr(), false);
    assert_eq!(
        data(&resolver, "dns-version.clusterset.local.", RecordType::TXT).await,
        ["1.0.0"]
    );
    assert_eq!(
        data(&resolver, "clusterset.local.", RecordType::SOA).await,
        ["ns.dns.clusterset.local. hostmaster.clusterset.local. 9 7200 1800 86400 5"]
    );
    assert_eq!(
        data(&resolver, "clusterset.local.", RecordType::NS).await,
        ["ns.dns.clusterset.local."]
    );
    for (name, rtype, rcode) in [
        (
            "nope.clusterset.local.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (HELLO, RecordType::TXT, ResponseCode::NoError),
    ] {
        let answer = ask(server.addr(), name, rtype, false).await;
        assert_eq!(answer.response_code, rcode, "{name}");
        assert!(answer.authoritative && answer.answers.is_empty(), "{name}");
        assert_eq!(answer.authorities.len(), 1, "{name}");
        assert_eq!(answer.authorities[0].record_type(), RecordType::SOA);
    }
    server.running.shutdown();
}

/// Specs 2.3.4 and 2.4.4: no record picks one cluster's backends; nothing outside the
/// specification exists (NXDOMAIN), and an existing name without the asked type is NODATA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outside_the_specification() {
    let server = serve(vec![]).await;
    let resolver = resolver(server.addr(), false);
    for name in [
        format!("c1.{HELLO}"),
        format!("c2.{HELLO}"),
        format!("hello-0.c1.{HELLO}"),
        "hello.mcs-conformance.clusterset.local.".to_string(),
        format!("_42._tcp.{HELLO}"),
        format!("_http._tcp.{HELLO}"),
    ] {
        for rtype in [RecordType::A, RecordType::SRV] {
            assert_eq!(
                none(&resolver, &name, rtype).await,
                (ResponseCode::NXDomain, true),
                "{name} {rtype}"
            );
        }
    }
    // Under a headless service `<clusterid>` is only the parent of its endpoints' names: an
    // empty non-terminal (RFC 8020: it exists), with no record of its own.
    for rtype in [RecordType::A, RecordType::AAAA, RecordType::SRV] {
        assert_eq!(
            none(&resolver, &format!("c1.{HEADLESS}"), rtype).await,
            (ResponseCode::NoError, true),
            "{rtype}"
        );
    }
    // Existing names without the asked type.
    for (name, rtype) in [
        (HELLO, RecordType::TXT),
        (HEADLESS, RecordType::TXT),
        ("dns-version.clusterset.local.", RecordType::A),
        ("clusterset.local.", RecordType::A),
        ("svc.clusterset.local.", RecordType::A),
    ] {
        assert_eq!(
            none(&resolver, name, rtype).await,
            (ResponseCode::NoError, true),
            "{name} {rtype}"
        );
    }
    // No answer anywhere carries an exporting cluster's own ClusterIP.
    for rtype in [RecordType::A, RecordType::SRV] {
        let answer = ask(server.addr(), HELLO, rtype, true).await;
        let text: Vec<String> = answer
            .answers
            .iter()
            .chain(&answer.additionals)
            .map(|r| r.data.to_string())
            .collect();
        for own in [C1_CLUSTER_IP, C2_CLUSTER_IP] {
            assert!(!text.iter().any(|t| t.contains(own)), "{rtype}: {text:?}");
        }
    }
    server.running.shutdown();
}

/// Names are compared case-insensitively and answered in the client's spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_case_insensitive() {
    let server = serve(vec![]).await;
    let mut query = Message::new(7, MessageType::Query, OpCode::Query);
    let spelled = "HELLO-0.C1.Hello-Headless.MCS-Conformance.svc.ClusterSet.Local.";
    query.add_query(Query::query(
        Name::from_ascii(spelled).unwrap(),
        RecordType::A,
    ));
    let bytes = udp_exchange(
        server.addr(),
        &query.to_vec().unwrap(),
        Duration::from_secs(2),
    )
    .await
    .expect("an answer");
    let answer = Message::from_vec(&bytes).unwrap();
    assert_eq!(answer.answers.len(), 1);
    assert_eq!(answer.answers[0].name.to_ascii(), spelled);
    assert_eq!(
        answer.answers[0].data.to_string(),
        "10.1.0.11".parse::<IpAddr>().unwrap().to_string()
    );
    server.running.shutdown();
}

/// `nslookup -type=<rtype> <name>` against the server, as the conformance suite runs it in a
/// pod; `None` (the check skipped, said on stderr) without nslookup.
async fn nslookup(server: SocketAddr, rtype: &str, name: &str) -> Option<String> {
    if missing_tool("the nslookup checks", "nslookup", "-version", "dnsutils") {
        return None;
    }
    let args = [
        format!("-port={}", server.port()),
        format!("-type={rtype}"),
        name.to_string(),
        server.ip().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("nslookup")
            .args(&args)
            .output()
            .expect("run nslookup")
    })
    .await
    .unwrap();
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (port, target) of every `... service = <priority> <weight> <port> <target>` line, trailing
/// dot stripped: what the suite's `parseSRVRecords` extracts.
fn nslookup_srv(output: &str) -> Vec<(u16, String)> {
    output
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter_map(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let [_, _, port, target] = fields[..] else {
                return None;
            };
            Some((port.parse().ok()?, target.trim_end_matches('.').to_string()))
        })
        .collect()
}

/// The sorted `Address:` values that follow a `Name:` line: what the suite's `HaveAddresses`
/// compares.
fn nslookup_addresses(output: &str) -> Vec<String> {
    let mut addresses = Vec::new();
    let mut named = false;
    for line in output.lines() {
        if line.starts_with("Name:") {
            named = true;
        } else if let Some(address) = line.strip_prefix("Address:")
            && named
        {
            addresses.push(address.trim().to_string());
            named = false;
        }
    }
    addresses.sort();
    addresses
}

/// The conformance DNS specs as the suite checks them: nslookup's output, parsed its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_checks_through_nslookup() {
    let server = serve(vec![]).await;
    let dns = server.addr();
    let Some(a) = nslookup(dns, "A", HELLO).await else {
        return;
    };
    assert_eq!(nslookup_addresses(&a), [VIP4], "{a}");
    let aaaa = nslookup(dns, "AAAA", HELLO).await.unwrap();
    assert_eq!(nslookup_addresses(&aaaa), [VIP6], "{aaaa}");
    let srv = nslookup(dns, "SRV", HELLO).await.unwrap();
    assert_eq!(
        nslookup_srv(&srv),
        [(42, HELLO.trim_end_matches('.').to_string())],
        "{srv}"
    );

    let headless = nslookup(dns, "A", HEADLESS).await.unwrap();
    assert_eq!(
        nslookup_addresses(&headless),
        ["10.1.0.11", "10.1.0.12", "10.2.0.21"],
        "{headless}"
    );
    let pod = nslookup(dns, "A", &format!("hello-1.c1.{HEADLESS}"))
        .await
        .unwrap();
    assert_eq!(nslookup_addresses(&pod), ["10.1.0.12"], "{pod}");
    let srv = nslookup(dns, "SRV", HEADLESS).await.unwrap();
    let records = nslookup_srv(&srv);
    assert_eq!(records.len(), 3, "one per ready endpoint: {srv}");
    for host in ["hello-0", "hello-1", "10-2-0-21"] {
        assert!(
            records
                .iter()
                .any(|(port, target)| *port == 42 && target.starts_with(host)),
            "{host}: {srv}"
        );
    }
    server.running.shutdown();
}

/// Specs 2.3.3 and 2.4.3, for the reverse zones the server is given (`--reverse-zone`): the
/// clusterset IPs point at the service name, ready headless endpoints at their own names;
/// anything else in those zones is NXDOMAIN under the zone's SOA, and addresses outside them
/// are not this server's to answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptr_records_in_the_reverse_zones_served() {
    let config = trellis_dns::Config {
        reverse_zones: [
            "10.99.0.0/16",
            "10.1.0.0/16",
            "10.2.0.0/16",
            "fd99::/16",
            "fd02::/16",
        ]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect(),
        ..test_config(vec![])
    };
    let server = start_config(config, Some(&catalog_from_imports(&imports()))).await;
    let resolver = resolver(server.addr(), false);
    let ptr = |ip: &str| Name::from(ip.parse::<IpAddr>().unwrap()).to_ascii();
    for (ip, target) in [
        (VIP4, HELLO.to_string()),
        (VIP6, HELLO.to_string()),
        ("10.1.0.11", format!("hello-0.c1.{HEADLESS}")),
        ("10.2.0.21", format!("10-2-0-21.c2.{HEADLESS}")),
        ("fd02::21", format!("10-2-0-21.c2.{HEADLESS}")),
    ] {
        assert_eq!(
            data(&resolver, &ptr(ip), RecordType::PTR).await,
            [target],
            "{ip}"
        );
    }
    for ip in ["10.99.0.1", "10.2.0.22"] {
        let answer = ask(server.addr(), &ptr(ip), RecordType::PTR, false).await;
        assert_eq!(answer.response_code, ResponseCode::NXDomain, "{ip}");
        assert!(answer.authoritative);
        let soa = &answer.authorities[0];
        assert_eq!(soa.record_type(), RecordType::SOA);
        assert!(
            soa.name.zone_of(&Name::from_ascii(ptr(ip)).unwrap()),
            "{soa:?}"
        );
        assert!(
            soa.name.to_ascii().ends_with(".10.in-addr.arpa."),
            "{soa:?}"
        );
    }
    // An exporting cluster's own ClusterIP is outside the reverse zones: a name like any other
    // outside the server's zones (forwarding is off here: REFUSED), never answered with
    // authority.
    let answer = ask(server.addr(), &ptr(C1_CLUSTER_IP), RecordType::PTR, false).await;
    assert_eq!(answer.response_code, ResponseCode::Refused);
    assert!(!answer.authoritative && answer.answers.is_empty());
    server.running.shutdown();
}
