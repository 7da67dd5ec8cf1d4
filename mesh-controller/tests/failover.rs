//! Two `trellis-controller` processes of one cluster (west) electing a leader through a lease
//! file, as the lab and a static source run them: only the leader binds the peering and agent
//! addresses and says ready; the leader is SIGKILLed; the other leads a lease duration after
//! it last saw the lease renewed (client-go's rule: at most a retry period late), binds the same addresses, and a gateway reconnecting there is given the same
//! plan (the same peers and routes: no tunnel to rebuild), DNS the same imports.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use trellis_controller::agent::AgentHello;
use trellis_controller::gateway::{GatewayRegistration, GatewayUpdate};
use trellis_core::agent::GatewayDesired;
use trellis_core::cluster::PublicKey;
use trellis_core::imports::ImportsUpdate;

mod process;

use process::{BIN, Proc, Subscriber, cluster_yaml, free_tcp, free_udp, run};
const LEASE_DURATION: Duration = Duration::from_secs(3);
const RETRY_PERIOD: Duration = Duration::from_secs(1);
const TOKEN: &str = "lab-token";

/// The body and status of `GET path`; `None` when nothing answers.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    trellis_http::get(addr, path, Duration::from_secs(5))
        .ok()
        .map(|r| (r.status, r.body))
}

/// Whether the replica leads (`/leader` 200; `/readyz` is 200 on a synced follower too).
fn leads(metrics: SocketAddr) -> bool {
    get(metrics, "/leader").is_some_and(|(status, _)| status == 200)
}

fn eventually(what: &str, logs: &Path, mut cond: impl FnMut() -> bool) {
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        trellis_test_support::eventually(what, Duration::from_secs(30), || cond().then_some(()))
    }));
    if let Err(panic) = waited {
        for log in ["east.log", "west-1.log", "west-2.log"] {
            let text = std::fs::read_to_string(logs.join(log)).unwrap_or_default();
            eprintln!("--- {log} ---\n{text}");
        }
        std::panic::resume_unwind(panic);
    }
}

fn gateway(node: &str, key: u8) -> AgentHello {
    AgentHello::gateway(
        GatewayRegistration {
            node: node.into(),
            endpoint: SocketAddr::from(([198, 18, 0, key], 51820)),
            public_key: PublicKey([key; 32]),
        },
        Some(TOKEN.into()),
    )
}

/// West's gateway's plan once it has a peer for east's node.
fn plan_with_east_peer(agent: SocketAddr) -> (Subscriber, GatewayDesired) {
    let mut gw = Subscriber::connect(agent, &gateway("west-node-0", 5));
    let GatewayUpdate::Snapshot(mut desired) = gw.next::<GatewayUpdate>() else {
        panic!("snapshot first")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while desired.peers.is_empty() {
        assert!(Instant::now() < deadline, "no peer in {desired:?}");
        let update = gw.next::<GatewayUpdate>();
        assert!(desired.apply(&update));
    }
    (gw, desired)
}

#[test]
fn the_follower_leads_within_the_lease_duration_and_serves_the_same_plan() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    run(&["certs", "ca", "--dir", d, "--name", "test"]);
    for (id, pods, services) in [
        ("east", "10.10.0.0/16", "10.96.0.0/16"),
        ("west", "10.20.0.0/16", "10.97.0.0/16"),
    ] {
        run(&[
            "certs",
            "cluster",
            "--dir",
            d,
            "--id",
            id,
            "--pod-cidr",
            pods,
            "--service-cidr",
            services,
        ]);
    }
    std::fs::write(dir.path().join("agent-token"), format!("{TOKEN}\n")).unwrap();
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
    let (e_metrics, e_agent, w_agent) = (free_tcp(), free_tcp(), free_tcp());
    // Each replica its own metrics address (a follower serves it); the rest shared.
    let w_metrics = [free_tcp(), free_tcp()];
    let config = |id: &str,
                  listen: SocketAddr,
                  peer: &str,
                  endpoint: SocketAddr,
                  metrics: SocketAddr,
                  agent: SocketAddr,
                  election: &str| {
        format!(
            "clusterId: {id}\nlisten: \"{listen}\"\npeers: [{{id: {peer}, endpoint: \"{endpoint}\"}}]\n\
             leaseSeconds: 4\nheartbeatSeconds: 1\n\
             tls: {{ca: {d}/ca.pem, cert: {d}/{id}.pem, key: {d}/{id}-key.pem}}\n\
             source: {{static: {{path: {d}/{id}.yaml, pollMillis: 100}}}}\n\
             metricsListen: \"{metrics}\"\nagentListen: \"{agent}\"\n\
             agentTokenFile: {d}/agent-token\nstateFile: {d}/{id}-state.json\n{election}"
        )
    };
    let election = format!(
        "leaderElection: {{file: {d}/west-leader.json, leaseDurationSeconds: {}, \
         renewDeadlineSeconds: 2, retryPeriodSeconds: {}}}\n",
        LEASE_DURATION.as_secs(),
        RETRY_PERIOD.as_secs()
    );
    let spawn = |name: &str, yaml: String| {
        let cfg = dir.path().join(format!("{name}.yaml.config"));
        std::fs::write(&cfg, yaml).unwrap();
        let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
        Proc(
            Command::new(BIN)
                .args(["run", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", "info")
                .env_remove("POD_NAME")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let _east = spawn(
        "east",
        config("east", e_quic, "west", w_quic, e_metrics, e_agent, ""),
    );
    let mut west: Vec<Proc> = (0..2)
        .map(|i| {
            spawn(
                &format!("west-{}", i + 1),
                config(
                    "west",
                    w_quic,
                    "east",
                    e_quic,
                    w_metrics[i],
                    w_agent,
                    &election,
                ),
            )
        })
        .collect();

    // One replica leads; the other serves metrics, says it follows, and is ready (its source
    // synced: it can take over).
    let mut leader = 0;
    eventually("one west replica to lead", dir.path(), || {
        match (leads(w_metrics[0]), leads(w_metrics[1])) {
            (true, false) => leader = 0,
            (false, true) => leader = 1,
            _ => return false,
        }
        true
    });
    let follower = 1 - leader;
    let (code, body) = get(w_metrics[follower], "/leader").unwrap();
    assert_eq!(code, 503, "{body}");
    eventually("the follower to be ready", dir.path(), || {
        get(w_metrics[follower], "/readyz").is_some_and(|(status, _)| status == 200)
    });
    assert!(
        get(w_metrics[follower], "/metrics")
            .unwrap()
            .1
            .contains("trellis_controller_leader 0")
    );
    assert!(
        get(w_metrics[leader], "/metrics")
            .unwrap()
            .1
            .contains("trellis_controller_leader 1")
    );

    // East's gateway registers, so west's plan has a tunnel peer; west's gateway and DNS
    // subscribe to the leader.
    let _east_gw = Subscriber::connect(e_agent, &gateway("east-node-0", 9));
    let (west_gw, before) = plan_with_east_peer(w_agent);
    let mut dns = Subscriber::connect(w_agent, &AgentHello::dns(Some(TOKEN.into())));
    let ImportsUpdate::Snapshot(imports_before) = dns.next::<ImportsUpdate>() else {
        panic!("snapshot first")
    };
    eventually(
        "the leader to save the registration and east's state",
        dir.path(),
        || {
            std::fs::read_to_string(dir.path().join("west-state.json"))
                .is_ok_and(|s| s.contains("west-node-0") && s.contains("\"east\""))
        },
    );

    let renewed_before_kill = || -> Duration {
        let lease: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("west-leader.json")).unwrap())
                .unwrap();
        let renewed = std::time::UNIX_EPOCH
            + Duration::from_micros(lease["renewTimeMicros"].as_u64().unwrap());
        std::time::SystemTime::now()
            .duration_since(renewed)
            .unwrap_or_default()
    };
    let since_renewal = renewed_before_kill();
    west[leader].kill();
    let killed = Instant::now();
    eventually("the follower to lead", dir.path(), || {
        leads(w_metrics[follower])
    });
    let took = killed.elapsed();
    println!(
        "failover (two processes, lease file, lease {LEASE_DURATION:?} / renew 2 s / retry 1 s): \
         ready after {took:?} (the last renewal {since_renewal:?} before the kill)"
    );
    // The follower times the lease from when it read the last renewal (its own clock, not
    // the record's date), which is at most a retry period after the renewal.
    assert!(
        took <= LEASE_DURATION + RETRY_PERIOD + Duration::from_millis(500),
        "the follower led {took:?} after the kill"
    );
    drop(west_gw);
    drop(dns);

    // The gateway reconnects to the same address and gets the same plan: the same peers
    // (keys, endpoints, allowed ranges) and routes, so it rebuilds no tunnel.
    let mut agent_up = false;
    eventually(
        "the new leader to bind the agent address",
        dir.path(),
        || {
            agent_up = TcpStream::connect(w_agent).is_ok();
            agent_up
        },
    );
    let (_gw, after) = plan_with_east_peer(w_agent);
    assert_eq!(after.peers, before.peers);
    assert_eq!(after.routes, before.routes);
    let mut dns = Subscriber::connect(w_agent, &AgentHello::dns(Some(TOKEN.into())));
    let ImportsUpdate::Snapshot(imports_after) = dns.next::<ImportsUpdate>() else {
        panic!("snapshot first")
    };
    assert_eq!(imports_after.services, imports_before.services);
    let metrics = get(w_metrics[follower], "/metrics").unwrap().1;
    assert!(metrics.contains("trellis_controller_leader 1"), "{metrics}");
    assert!(
        metrics.contains("trellis_controller_leadership_transitions_total 1"),
        "{metrics}"
    );
}
