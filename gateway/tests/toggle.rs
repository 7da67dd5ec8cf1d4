//! The node-encryption toggle: a TCP stream between pods on two nodes keeps running while
//! encryption is switched on and off; the underlay carries plaintext before and only
//! WireGuard after (runs as root; needs tcpdump).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Capture, contains, two_nodes};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use trellis_netns::RouteTarget;

const MARKER: &[u8] = b"trellis-tcp-seq";

/// Lines in the capture matching a tcpdump filter.
fn matching(pcap: &[u8], filter: &str) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.pcap");
    std::fs::write(&file, pcap).unwrap();
    let output = Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&file)
        .arg(filter)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_stream_survives_switching_encryption_on_and_off() {
    let (a, b) = two_nodes("gw-toggle").await;
    let set = |encrypted: bool, revision: u64| {
        let (a, b) = (&a, &b);
        async move {
            tokio::join!(
                a.apply("c1", revision, vec![b.as_remote("c1", encrypted)]),
                b.apply("c1", revision, vec![a.as_remote("c1", encrypted)]),
            );
        }
    };
    set(false, 1).await;
    let routes = a.netlink.owned_routes(212).await.unwrap();
    assert_eq!(routes.len(), 1);
    assert!(
        matches!(routes[0].target, RouteTarget::Gateway(_)),
        "{routes:?}"
    );

    // A TCP echo server on b's pod, a client on a's pod.
    let server_addr = SocketAddr::new(b.pod, 7100);
    let listener = b.listen(server_addr);
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if write
                .write_all(format!("{line}\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let stream = a
        .connect_from_pod(server_addr, Duration::from_secs(5))
        .expect("connect over the plain route");

    // The client sends a numbered line every 20 ms and checks each comes back, in order.
    let echoed = Arc::new(AtomicU64::new(0));
    let client = {
        let echoed = echoed.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            for seq in 0u64.. {
                let line = format!("{}-{seq}", String::from_utf8_lossy(MARKER));
                write.write_all(format!("{line}\n").as_bytes()).await?;
                let back = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
                    .await
                    .map_err(|_| std::io::Error::other(format!("no echo of {seq}")))??;
                if back.as_deref() != Some(line.as_str()) {
                    return Err(std::io::Error::other(format!("{back:?} for {line}")));
                }
                echoed.store(seq + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<(), std::io::Error>(())
        })
    };
    let progress = |echoed: &Arc<AtomicU64>| {
        let echoed = echoed.clone();
        async move {
            let start = echoed.load(Ordering::SeqCst);
            for _ in 0..500 {
                if echoed.load(Ordering::SeqCst) >= start + 10 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    };

    // Plain: the payload is visible on the underlay.
    let capture = Capture::start(&b, "underlay").await;
    assert!(progress(&echoed).await, "stream runs in plaintext");
    let plain = capture.finish().await;
    assert!(
        contains(&plain, MARKER),
        "plaintext visible before encryption"
    );

    // On: from the moment both applied, only WireGuard crosses the underlay.
    set(true, 2).await;
    let capture = Capture::start(&b, "underlay").await;
    assert!(progress(&echoed).await, "stream runs through the tunnel");
    let tunnel = capture.finish().await;
    assert!(!contains(&tunnel, MARKER), "plaintext after switching on");
    assert_eq!(matching(&tunnel, "ip and not udp port 51820"), 0);
    assert!(matching(&tunnel, "udp port 51820") > 0);
    let routes = a.netlink.owned_routes(212).await.unwrap();
    assert_eq!(routes.len(), 2, "tunnel route and backstop: {routes:?}");

    // Off again: plain, same connection.
    set(false, 3).await;
    assert!(progress(&echoed).await, "stream runs in plaintext again");
    let routes = a.netlink.owned_routes(212).await.unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");

    assert!(!client.is_finished(), "client stopped: {:?}", client.await);
    client.abort();
    server.abort();
}
