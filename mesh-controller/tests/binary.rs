//! The `trellis-controller` binary as a user runs it: certificates from its `certs` command, two
//! clusters on static files peering on 127.0.0.1, metrics over HTTP, a DNS subscriber and a
//! gateway subscriber on the agent port, and node encryption switched by editing the config.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use trellis_controller::agent::AgentHello;
use trellis_controller::gateway::{GatewayRegistration, GatewayUpdate};
use trellis_core::cluster::PublicKey;
use trellis_core::imports::ImportsUpdate;

mod process;

use process::{BIN, Proc, Subscriber, cluster_yaml, free_tcp, free_udp, run};

#[allow(clippy::too_many_arguments)]
fn config(
    dir: &Path,
    id: &str,
    listen: SocketAddr,
    peer: &str,
    peer_endpoint: Option<SocketAddr>,
    metrics: SocketAddr,
    agent: SocketAddr,
    encryption: bool,
) -> String {
    let d = dir.display();
    let endpoint = peer_endpoint.map_or(String::new(), |e| format!(", endpoint: \"{e}\""));
    format!(
        "clusterId: {id}\nlisten: \"{listen}\"\npeers: [{{id: {peer}{endpoint}}}]\n\
         leaseSeconds: 4\nheartbeatSeconds: 1\nnodeEncryption: {encryption}\n\
         tls: {{ca: {d}/ca.pem, cert: {d}/{id}.pem, key: {d}/{id}-key.pem}}\n\
         source: {{static: {{path: {d}/{id}.yaml, pollMillis: 100}}}}\n\
         metricsListen: \"{metrics}\"\nagentListen: \"{agent}\"\n\
         agentTokenFile: {d}/agent-token\nstateFile: {d}/{id}-state.json\n"
    )
}

fn metrics(addr: SocketAddr) -> String {
    get(addr, "/metrics")
}

/// The body of `GET path`, whatever the status; empty when nothing answers.
fn get(addr: SocketAddr, path: &str) -> String {
    trellis_http::get(addr, path, Duration::from_secs(5)).map_or_else(|_| String::new(), |r| r.body)
}

/// [`trellis_test_support::eventually`], printing both controllers' logs when it times out.
fn eventually(what: &str, logs: &Path, mut cond: impl FnMut() -> bool) {
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        trellis_test_support::eventually(what, Duration::from_secs(20), || cond().then_some(()))
    }));
    if let Err(panic) = waited {
        let log = |n: &str| std::fs::read_to_string(logs.join(n)).unwrap_or_default();
        eprintln!(
            "--- east ---\n{}\n--- west ---\n{}",
            log("east.log"),
            log("west.log")
        );
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn two_controllers_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    run(&["certs", "ca", "--dir", d, "--name", "test"]);
    // Each certificate carries the ranges its cluster may claim (the peers route nothing else).
    run(&[
        "certs",
        "cluster",
        "--dir",
        d,
        "--id",
        "east",
        "--pod-cidr",
        "10.10.0.0/16",
        "--service-cidr",
        "10.96.0.0/16",
    ]);
    run(&[
        "certs",
        "cluster",
        "--dir",
        d,
        "--id",
        "west",
        "--pod-cidr",
        "10.20.0.0/16",
        "--service-cidr",
        "10.97.0.0/16",
    ]);
    std::fs::write(dir.path().join("agent-token"), "lab-token\n").unwrap();
    // Cluster, pod CIDR, service CIDR, web's cluster IP, web's endpoint.
    for (name, pods, services, web_ip, endpoint) in [
        (
            "east",
            "10.10.0.0/24",
            "10.96.0.0/16",
            "10.96.0.10",
            "10.10.0.5",
        ),
        (
            "west",
            "10.20.0.0/24",
            "10.97.0.0/16",
            "10.97.0.10",
            "10.20.0.5",
        ),
    ] {
        let yaml = cluster_yaml(name, pods, services, web_ip, endpoint);
        std::fs::write(dir.path().join(format!("{name}.yaml")), yaml).unwrap();
    }
    let (e_quic, w_quic) = (free_udp(), free_udp());
    let (e_metrics, w_metrics, e_agent, w_agent) = (free_tcp(), free_tcp(), free_tcp(), free_tcp());
    let e_flows = free_tcp();
    let west_cfg = dir.path().join("west-config.yaml");
    std::fs::write(
        dir.path().join("east-config.yaml"),
        config(
            dir.path(),
            "east",
            e_quic,
            "west",
            Some(w_quic),
            e_metrics,
            e_agent,
            false,
        ) + &format!("flows: {{enabled: true, listen: \"{e_flows}\"}}\n"),
    )
    .unwrap();
    // West's configuration is written again later, to switch node encryption on.
    let write_west_config = |node_encryption: bool| {
        std::fs::write(
            &west_cfg,
            // West takes its ID from the ClusterProperty in its static file.
            config(
                dir.path(),
                "west",
                w_quic,
                "east",
                None,
                w_metrics,
                w_agent,
                node_encryption,
            )
            .replace("clusterId: west\n", "")
                // West has no API server to give its imports VIPs: it allocates them.
                + "clusterset_ip_ranges: [10.255.0.0/24]\n",
        )
        .unwrap();
    };
    write_west_config(false);
    let spawn = |cfg: &Path, log: &str| {
        let log = std::fs::File::create(dir.path().join(log)).unwrap();
        Proc(
            Command::new(BIN)
                .args(["run", "--config"])
                .arg(cfg)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let east = spawn(&dir.path().join("east-config.yaml"), "east.log");
    let west = spawn(&west_cfg, "west.log");

    eventually("west to import east's web", dir.path(), || {
        metrics(w_metrics).contains("trellis_controller_imported_services{cluster=\"east\"} 1")
    });
    eventually("east to hold west's state", dir.path(), || {
        metrics(e_metrics).contains("trellis_controller_remote_clusters_connected 1")
    });
    // East serves flows: a node's flow channel is listed, the peer too, a bad query refused.
    let _flow_channel = Subscriber::connect(
        e_agent,
        &AgentHello {
            token: Some("lab-token".into()),
            role: trellis_core::agent::AgentRole::Flows(trellis_core::agent::FlowChannel {
                node: "east-node-0".into(),
            }),
        },
    );
    eventually("east to list its node's flow channel", dir.path(), || {
        get(e_flows, "/flows/nodes").contains("east-node-0")
    });
    assert!(get(e_flows, "/flows/nodes").contains("west"));
    assert!(metrics(e_metrics).contains("trellis_controller_flow_channels 1"));
    let bad = trellis_http::get(e_flows, "/flows?verdict=MAYBE", Duration::from_secs(5)).unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    let status = get(e_metrics, "/status");
    assert!(status.contains("\"cluster\": \"west\""), "{status}");
    assert!(status.contains("\"services\": 1"), "{status}");
    assert!(
        metrics(e_metrics).contains("trellis_controller_remote_cluster_ready{cluster=\"west\"} 1")
    );

    // DNS on west sees shop/web backed by both clusters, west's own marked local.
    let token = Some("lab-token".to_string());
    let mut dns = Subscriber::connect(w_agent, &AgentHello::dns(token.clone()));
    let ImportsUpdate::Snapshot(imports) = dns.next::<ImportsUpdate>() else {
        panic!("snapshot first")
    };
    let web = &imports.services["shop/web"];
    assert_eq!(web.backends.len(), 2);
    assert!(
        web.backends
            .iter()
            .any(|b| b.cluster.as_str() == "east" && !b.local)
    );
    // Its clusterset VIP comes from west's clustersetIPRanges, and /status lists the import.
    let range: ipnet::IpNet = "10.255.0.0/24".parse().unwrap();
    assert_eq!(web.vips.len(), 1, "{web:?}");
    assert!(range.contains(&web.vips[0]), "{web:?}");
    let status: trellis_core::status::ControllerStatus =
        serde_json::from_str(&get(w_metrics, "/status")).unwrap();
    let listed = &status.imports[0];
    assert_eq!(
        (listed.namespace.as_str(), listed.name.as_str()),
        ("shop", "web")
    );
    assert_eq!(listed.vips, web.vips);
    assert_eq!(listed.clusters.len(), 2);

    // A gateway on west registers. East's node has no gateway yet, so the snapshot routes
    // east's pod CIDR into the tunnel (fail closed) but has no peer for it.
    let mut gw = Subscriber::connect(
        w_agent,
        &AgentHello::gateway(
            GatewayRegistration {
                node: "west-node-0".into(),
                endpoint: "127.0.0.1:51820".parse().unwrap(),
                public_key: PublicKey([5; 32]),
            },
            token,
        ),
    );
    let GatewayUpdate::Snapshot(mut desired) = gw.next::<GatewayUpdate>() else {
        panic!("snapshot first")
    };
    assert!(!desired.node_encryption);
    assert!(
        desired
            .routes
            .iter()
            .any(|r| r.destination == "10.10.0.0/24".parse().unwrap())
    );
    eventually("west to count its gateway", dir.path(), || {
        metrics(w_metrics).contains("trellis_controller_gateways_registered 1")
    });

    // Switch node encryption on by editing west's configuration: pushed without a restart.
    write_west_config(true);
    loop {
        let u = gw.next::<GatewayUpdate>();
        assert!(desired.apply(&u));
        if desired.node_encryption {
            break;
        }
    }

    // West saves its state; east goes away and west restarts: west serves east's last state
    // from its state file while east is unreachable (until east's lease runs out).
    eventually("west to save east's state", dir.path(), || {
        std::fs::read_to_string(dir.path().join("west-state.json"))
            .is_ok_and(|s| s.contains("\"east\"") && s.contains("\"web\""))
    });
    drop(dns);
    drop(gw);
    drop(east);
    drop(west);
    let _west = spawn(&west_cfg, "west-2.log");
    let mut dns = None;
    eventually(
        "the restarted west to accept subscribers",
        dir.path(),
        || {
            dns = TcpStream::connect(w_agent).ok();
            dns.is_some()
        },
    );
    drop(dns);
    let mut dns = Subscriber::connect(w_agent, &AgentHello::dns(Some("lab-token".into())));
    let ImportsUpdate::Snapshot(imports) = dns.next::<ImportsUpdate>() else {
        panic!("snapshot first")
    };
    assert!(
        imports.services["shop/web"]
            .backends
            .iter()
            .any(|b| b.cluster.as_str() == "east"),
        "{imports:?}"
    );
}

#[test]
fn a_bad_clusterset_ip_range_is_refused_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "clusterId: east\ntls: {ca: ca.pem, cert: c.pem, key: k.pem}\n\
         source: {static: {path: c.yaml}}\nclusterset_ip_ranges: [10.255.0.0/33]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"10.255.0.0/33\" is not a CIDR"),
        "{stderr}"
    );
}
