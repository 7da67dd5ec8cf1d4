//! An external machine (Debian's wireguard-go in a namespace on the lab's underlay) added with
//! `trellis lab peer add`: a `Peer` that claims what is not its cluster's to give is refused
//! and leaves nothing behind; an admitted one reaches the pods of both clusters (ICMP and TCP)
//! through one node's gateway and is reached back from every node of both; taking its `Peer`
//! away cuts it off in the mesh, and `remove` leaves nothing of it.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use trellis_integration::{TestLab, text};
use trellis_netns::Netns;

/// The echo server every lab pod runs.
const ECHO_PORT: u16 = 7000;

fn pods(lab: &TestLab) -> Vec<(String, Ipv4Addr)> {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("/run/trellis/lab/{}/state.json", lab.name)).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for cluster in state["clusters"].as_array().unwrap() {
        for node in cluster["nodes"].as_array().unwrap() {
            for pod in node["pods"].as_array().unwrap() {
                out.push((
                    format!(
                        "{}/{}",
                        cluster["name"].as_str().unwrap(),
                        pod["name"].as_str().unwrap()
                    ),
                    pod["address"].as_str().unwrap().parse().unwrap(),
                ));
            }
        }
    }
    out
}

fn ping_from(netns: &str, to: Ipv4Addr) -> bool {
    std::process::Command::new("ip")
        .args(["netns", "exec", netns, "ping", "-c", "1", "-W", "1"])
        .arg(to.to_string())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A TCP exchange with a pod's echo server from inside `netns`.
fn echo_from(netns: &str, to: Ipv4Addr) -> Result<(), String> {
    let ns = Netns::open(netns).map_err(|e| e.to_string())?;
    ns.run(move || -> Result<(), String> {
        let addr = SocketAddr::new(IpAddr::V4(to), ECHO_PORT);
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("{addr}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream
            .write_all(b"from the laptop\n")
            .map_err(|e| e.to_string())?;
        let mut back = [0u8; 16];
        stream
            .read_exact(&mut back)
            .map_err(|e| format!("{addr}: {e}"))?;
        if &back != b"from the laptop\n" {
            return Err(format!("{addr} echoed {back:?}"));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?
}

fn status_peers(lab: &TestLab) -> serde_json::Value {
    let out = lab.trellis(&["status", "-o", "json"]);
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    serde_json::json!(
        doc["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["status"]["external_peers"].clone())
            .collect::<Vec<_>>()
    )
}

#[test]
fn an_external_machine_reaches_both_clusters_is_reached_back_and_is_cut_off() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("xpeer");
    let up = lab.trellis(&["up", "--clusters", "2", "--nodes", "2", "--pods", "1"]);
    assert!(up.status.success(), "{}", text(&up));
    let namespaces_before = lab.namespaces();
    let peers_before = status_peers(&lab);

    // The attack first: claims on a node's pods and on another cluster's range are refused by
    // c1's controller, and nothing of them is left.
    for (name, address, reason) in [
        ("steal-node", "10.1.1.0/24", "Overlaps"),
        ("steal-c2", "10.2.250.9/32", "OutsideAllowance"),
        ("steal-services", "10.101.0.10/32", "Overlaps"),
    ] {
        let out = lab.trellis(&["peer", "add", name, "--cluster", "c1", "--address", address]);
        let said = text(&out);
        assert!(!out.status.success(), "{said}");
        assert!(said.contains(reason), "{name}: {said}");
    }
    assert_eq!(lab.namespaces(), namespaces_before, "no machine was made");
    assert_eq!(status_peers(&lab), peers_before, "no Peer is left");

    let add = lab.trellis(&[
        "peer",
        "add",
        "laptop",
        "--cluster",
        "c1",
        "--node",
        "node-0",
    ]);
    let said = text(&add);
    assert!(add.status.success(), "{said}");
    assert!(
        said.contains("PrivateKey = "),
        "the wg-quick config is printed: {said}"
    );
    assert!(
        said.contains("AllowedIPs = 10.1.0.0/16, 10.101.0.0/16, 10.2.0.0/16, 10.102.0.0/16"),
        "{said}"
    );
    let machine = format!("{}peer-laptop", lab.namespace_prefix());
    let laptop: Ipv4Addr = "10.1.250.1".parse().unwrap();

    // The machine reaches every pod of both clusters, through c1/node-0's gateway.
    let pods = pods(&lab);
    assert_eq!(pods.len(), 4);
    for (pod, address) in &pods {
        assert!(
            trellis_test_support::poll_until(Duration::from_secs(10), || ping_from(
                &machine, *address
            )
            .then_some(()))
            .is_some(),
            "laptop -> {pod} ({address}) ICMP"
        );
        echo_from(&machine, *address).unwrap_or_else(|e| panic!("laptop -> {pod} TCP: {e}"));
    }

    // Every pod reaches it back: ICMP, and TCP to a listener on the machine.
    let ns = Netns::open(&machine).unwrap();
    let listener = ns.run(|| TcpListener::bind((laptop, 0)).unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(false).unwrap();
    let accepting = std::thread::spawn(move || {
        let mut accepted = 0;
        while accepted < 4 {
            let (mut conn, _) = listener.accept().unwrap();
            let mut byte = [0u8; 1];
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = conn.read(&mut byte);
            accepted += 1;
        }
    });
    for (pod, _) in &pods {
        let ping = lab.trellis(&[
            "exec",
            pod,
            "--",
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            &laptop.to_string(),
        ]);
        assert!(
            ping.status.success(),
            "{pod} -> laptop ICMP: {}",
            text(&ping)
        );
        let probe = lab.trellis(&[
            "probe",
            pod,
            &format!("{laptop}:{port}/tcp"),
            "--timeout",
            "3s",
        ]);
        assert!(
            probe.status.success(),
            "{pod} -> laptop TCP: {}",
            text(&probe)
        );
    }
    accepting.join().unwrap();

    // Its Peer taken away (the machine still running with its key): the mesh drops it.
    let peer_yaml = std::env::temp_dir().join(format!("{}-peer.yaml", lab.name));
    std::fs::write(
        &peer_yaml,
        "apiVersion: trellis.dev/v1alpha1\nkind: Peer\nmetadata: {name: laptop}\n",
    )
    .unwrap();
    let delete = lab.trellis(&[
        "delete",
        "--cluster",
        "c1",
        "-f",
        peer_yaml.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&peer_yaml);
    assert!(delete.status.success(), "{}", text(&delete));
    let cut_off = |address: Ipv4Addr| {
        trellis_test_support::poll_until(Duration::from_secs(10), || {
            (!ping_from(&machine, address)).then_some(())
        })
        .is_some()
    };
    for (pod, address) in &pods {
        assert!(
            cut_off(*address),
            "laptop still reaches {pod} without its Peer"
        );
        assert!(
            echo_from(&machine, *address).is_err(),
            "laptop still connects to {pod}"
        );
    }
    let back = lab.trellis(&[
        "exec",
        "c2/pod-1",
        "--",
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        &laptop.to_string(),
    ]);
    assert!(!back.status.success(), "c2 still routes to the laptop");

    // And `remove` leaves nothing of the machine.
    let wireguard_go: Vec<u32> = lab
        .processes()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with("wireguard-go\0"))
        })
        .collect();
    assert_eq!(wireguard_go.len(), 1, "the machine runs wireguard-go");
    let remove = lab.trellis(&["peer", "remove", "laptop"]);
    assert!(remove.status.success(), "{}", text(&remove));
    assert_eq!(lab.namespaces(), namespaces_before);
    let gone = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
    };
    assert!(wireguard_go.iter().all(gone), "wireguard-go is gone");
}

#[test]
fn lab_down_removes_a_machine_left_running() {
    trellis_test_support::skip_unless_root!();
    let lab = TestLab::new("xpeerdown");
    let up = lab.trellis(&["up", "--clusters", "1", "--nodes", "1", "--pods", "1"]);
    assert!(up.status.success(), "{}", text(&up));
    let add = lab.trellis(&["peer", "add", "vm"]);
    assert!(add.status.success(), "{}", text(&add));
    assert!(lab.namespaces().iter().any(|n| n.ends_with("peer-vm")));
    let down = lab.trellis(&["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(lab.namespaces().is_empty(), "{:?}", lab.namespaces());
    assert!(lab.processes().is_empty(), "{:?}", lab.processes());
}
