//! Interoperability: Debian's wireguard-go, configured with `wg` from the config
//! `trellis-gateway peer-config` prints, handshakes with a trellis gateway and exchanges
//! traffic both ways (runs as root; needs wireguard-go and wireguard-tools).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::two_bare_nodes;
use trellis_core::gateway::RemoteNode;
use trellis_test_support::eventually_async;

/// A wireguard-go process, killed by PID (and its control socket removed) when dropped.
struct WireguardGo {
    child: Child,
    socket: PathBuf,
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_peer_from_peer_config_talks_both_ways() {
    trellis_test_support::skip_unless_root!();
    // scripts/install-deps installs both; a missing peer is a broken setup, not a pass.
    assert!(
        have("wireguard-go") && have("wg"),
        "wireguard-go and wg are required (apt-get install wireguard-go wireguard-tools)"
    );
    let (mut gw, mut laptop) = two_bare_nodes("gw-interop").await;
    gw.start().await;

    // The config the gateway prints for an external machine.
    let output = Command::new(env!("CARGO_BIN_EXE_trellis-gateway"))
        .args(["peer-config", "--state-dir"])
        .arg(gw.state_dir.path())
        .args([
            "--endpoint",
            "198.18.0.1:51820",
            "--address",
            "10.99.0.2/32",
            "--allowed-ips",
            "10.1.0.0/24",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let config = String::from_utf8(output.stdout).unwrap();
    assert!(config.contains(&format!("PublicKey = {}", gw.gateway().public_key)));
    let external_key = config
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches("# ")
        .to_string();
    // What `wg-quick strip` does: drop wg-quick-only settings.
    let wg_config: String = config
        .lines()
        .filter(|line| !line.starts_with("Address"))
        .map(|line| format!("{line}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("wg.conf");
    std::fs::write(&config_path, wg_config).unwrap();

    // wireguard-go in the laptop's namespace, under a name no other test uses (its control
    // socket lives in /var/run/wireguard, shared by all namespaces).
    let name = format!("tgw{}", std::process::id() % 100_000);
    let socket = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
    let child = laptop
        .ns
        .spawn(
            Command::new("wireguard-go")
                .args(["-f", &name])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap()
        .expect("start wireguard-go");
    let _wireguard_go = WireguardGo {
        child,
        socket: socket.clone(),
    };
    eventually_async(
        "wireguard-go's control socket",
        Duration::from_secs(5),
        || async { socket.exists().then_some(()) },
    )
    .await;
    let status = Command::new("wg")
        .args(["setconf", &name])
        .arg(&config_path)
        .status()
        .unwrap();
    assert!(status.success(), "wg setconf");
    let link = laptop.netlink.require_link(&name).await.unwrap();
    laptop
        .netlink
        .add_address(link.index, "10.99.0.2/32".parse().unwrap())
        .await
        .unwrap();
    laptop.netlink.set_up(link.index).await.unwrap();
    laptop
        .netlink
        .replace_route(&trellis_netns::Route::via_device(
            "10.1.0.0/24".parse().unwrap(),
            link.index,
        ))
        .await
        .unwrap();
    laptop.pod = "10.99.0.2".parse::<IpAddr>().unwrap();

    // The gateway learns about the laptop: an external peer without an endpoint.
    gw.apply(
        "c1",
        1,
        vec![RemoteNode {
            name: "external/laptop".into(),
            cluster: "external".into(),
            public_key: external_key.parse().unwrap(),
            endpoint: None,
            node_ip: None,
            pod_cidrs: vec!["10.99.0.2/32".parse().unwrap()],
            encrypted: true,
            persistent_keepalive: None,
        }],
    )
    .await;

    let _echo_gw = gw.echo(7000).await;
    let _echo_laptop = laptop.echo(7000).await;
    let long = Duration::from_secs(10);
    assert!(
        laptop.ping(SocketAddr::new(gw.pod, 7000), long).await,
        "wireguard-go -> trellis"
    );
    assert!(
        gw.ping(SocketAddr::new(laptop.pod, 7000), long).await,
        "trellis -> wireguard-go"
    );
    // 8 MiB of TCP each way between wireguard-go and the gateway with its offloads on: its
    // TSO super-packets split and sent with UDP GSO, wireguard-go's datagrams taken in with
    // UDP GRO and coalesced into the TUN.
    let text = gw.gateway().metrics.render();
    for feature in ["tun_tso", "udp_gso", "udp_gro"] {
        assert!(
            text.contains(&format!(
                "trellis_gateway_offload_enabled{{feature=\"{feature}\"}} 1"
            )),
            "{feature} on: {text}"
        );
    }
    common::bulk_echo(&laptop, &gw, 8 << 20).await;
    // wg agrees a handshake happened and bytes flowed.
    let shown = Command::new("wg")
        .args(["show", &name, "transfer"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    let fields: Vec<&str> = shown.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{shown}");
    assert!(
        fields[1].parse::<u64>().unwrap() > 8 << 20 && fields[2].parse::<u64>().unwrap() > 8 << 20,
        "{shown}"
    );
    let stats = gw.gateway().device().stats().await.unwrap();
    assert!(stats[0].handshakes >= 1, "{stats:?}");
    assert!(stats[0].endpoint.is_some(), "learned the laptop's endpoint");
    gw.stop().await;
}
