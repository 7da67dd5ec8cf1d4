//! Runs as root: builds real namespaces, links and routes, and checks traffic crosses them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use ipnet::IpNet;
use std::time::Duration;
use trellis_netns::testing::TempNetns;

use trellis_netns::{Netlink, Netns, Route, VethSpec, probe, sysctl};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

async fn bring_up_loopback(netlink: &Netlink) {
    let lo = netlink.require_link("lo").await.unwrap();
    netlink.set_up(lo.index).await.unwrap();
}

#[tokio::test]
async fn namespace_is_visible_to_iproute2_and_removed_on_drop() {
    trellis_test_support::skip_unless_root!();
    let name;
    {
        let ns = TempNetns::new("tk-create").unwrap();
        name = ns.name().to_string();
        assert!(Netns::exists(&name));
        assert!(Netns::list().unwrap().contains(&name));
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "ip", "-o", "link"])
            .output()
            .unwrap();
        assert!(output.status.success(), "ip netns exec failed: {output:?}");
        // A fresh namespace has only loopback.
        assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 1);
        // Creating it twice is refused.
        assert!(Netns::create(&name).is_err());
    }
    assert!(!Netns::exists(&name));
    assert!(
        Netns::delete(&name).is_err(),
        "a second delete reports the namespace is gone"
    );
}

#[test]
fn opening_a_plain_file_as_a_namespace_is_refused() {
    let dir = std::env::temp_dir().join(format!("tk-plain-{}", std::process::id()));
    std::fs::write(&dir, b"").unwrap();
    let error = Netns::open_path(&dir).unwrap_err();
    std::fs::remove_file(&dir).unwrap();
    // The message names the operation; the cause is the source, not repeated in the message.
    assert!(
        error.to_string().starts_with("open network namespace"),
        "{error}"
    );
    let cause = std::error::Error::source(&error)
        .expect("a cause")
        .to_string();
    assert!(cause.contains("not a network namespace"), "{cause}");
    assert!(!error.to_string().contains(&cause), "{error}");
}

#[tokio::test]
async fn veth_born_in_another_namespace_carries_tcp_both_ways() {
    trellis_test_support::skip_unless_root!();
    let left = TempNetns::new("tk-left").unwrap();
    let right = TempNetns::new("tk-right").unwrap();
    let left_nl = Netlink::connect_in(&left).unwrap();
    let right_nl = Netlink::connect_in(&right).unwrap();
    bring_up_loopback(&left_nl).await;
    bring_up_loopback(&right_nl).await;

    left_nl
        .add_veth(&VethSpec {
            name: "to-right",
            peer_name: "to-left",
            peer_netns: Some(&right),
            mtu: Some(1400),
        })
        .await
        .unwrap();
    assert!(
        left_nl.link("to-left").await.unwrap().is_none(),
        "peer must not appear on this side"
    );
    let l = left_nl.require_link("to-right").await.unwrap();
    let r = right_nl.require_link("to-left").await.unwrap();
    assert_eq!(r.mtu, Some(1400));
    assert_eq!(r.kind.as_deref(), Some("veth"));

    left_nl
        .add_address(l.index, net("198.18.0.1/24"))
        .await
        .unwrap();
    right_nl
        .add_address(r.index, net("198.18.0.2/24"))
        .await
        .unwrap();
    right_nl
        .add_address(r.index, net("2001:db8::2/64"))
        .await
        .unwrap();
    left_nl.set_up(l.index).await.unwrap();
    right_nl.set_up(r.index).await.unwrap();
    assert!(
        right_nl
            .addresses(r.index)
            .await
            .unwrap()
            .contains(&net("198.18.0.2/24"))
    );

    // A route by hand, read back, then removed.
    let extra = Route::via_gateway(net("198.19.5.0/24"), "198.18.0.2".parse().unwrap(), None);
    left_nl.add_route(&extra).await.unwrap();
    let routes = left_nl.routes().await.unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r.destination == extra.destination && r.gateway == extra.gateway)
    );
    left_nl.delete_route(&extra).await.unwrap();
    assert!(
        !left_nl
            .routes()
            .await
            .unwrap()
            .iter()
            .any(|r| r.destination == extra.destination)
    );

    let listener = right
        .run(|| TcpListener::bind("198.18.0.2:7000"))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
    });
    let addr: SocketAddr = "198.18.0.2:7000".parse().unwrap();
    let mut client = left.run(|| TcpStream::connect(addr)).unwrap().unwrap();
    client.write_all(b"hello").unwrap();
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"hello");
    server.join().unwrap();

    // The ICMP probe sees the peer, and nothing where nobody is.
    let peer = "198.18.0.2".parse().unwrap();
    let nobody = "198.18.0.3".parse().unwrap();
    assert!(
        probe::icmp_echo(&left, peer, Duration::from_secs(1))
            .unwrap()
            .is_some()
    );
    assert!(
        probe::icmp_echo(&left, nobody, Duration::from_millis(300))
            .unwrap()
            .is_none()
    );

    // Deleting one end removes the pair.
    left_nl.delete_link(l.index).await.unwrap();
    assert!(right_nl.link("to-left").await.unwrap().is_none());
}

#[tokio::test]
async fn bridge_ports_and_sysctls() {
    trellis_test_support::skip_unless_root!();
    let ns = TempNetns::new("tk-bridge").unwrap();
    let nl = Netlink::connect_in(&ns).unwrap();
    nl.add_bridge("br0").await.unwrap();
    nl.add_veth(&VethSpec {
        name: "a",
        peer_name: "b",
        peer_netns: None,
        mtu: None,
    })
    .await
    .unwrap();
    let bridge = nl.require_link("br0").await.unwrap();
    let a = nl.require_link("a").await.unwrap();
    nl.set_master(a.index, bridge.index).await.unwrap();
    let output = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "ip",
            "-o",
            "link",
            "show",
            "master",
            "br0",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&output.stdout).contains(" a@b"),
        "{output:?}"
    );

    assert_eq!(sysctl::read(Some(&ns), "net/ipv4/ip_forward").unwrap(), "0");
    sysctl::write(Some(&ns), "net/ipv4/ip_forward", "1").unwrap();
    assert_eq!(sysctl::read(Some(&ns), "net/ipv4/ip_forward").unwrap(), "1");
    let other = TempNetns::new("tk-moved").unwrap();
    // The write stayed in its own namespace.
    assert_eq!(
        sysctl::read(Some(&other), "net/ipv4/ip_forward").unwrap(),
        "0"
    );
    nl.move_to(a.index, &other).await.unwrap();
    assert!(nl.link("a").await.unwrap().is_none());
    let other_nl = Netlink::connect_in(&other).unwrap();
    assert!(other_nl.link("a").await.unwrap().is_some());
}
