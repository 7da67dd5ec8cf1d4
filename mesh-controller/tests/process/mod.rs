//! What the tests of the controller binary share: its processes (killed when dropped, only
//! those a test started), free local ports, `trellis-controller` subcommands, and a cluster's
//! static source.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command};
use std::time::Duration;

use trellis_controller::agent::AgentHello;
use trellis_core::framing::{FrameDecoder, encode_json_frame};

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis-controller");

/// Kills the child it owns when dropped (only processes this test started).
pub struct Proc(pub Child);

impl Proc {
    /// SIGKILL, as a crash or an OOM kill would end it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn run(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn cluster_yaml(id: &str, pod: &str, svc_cidr: &str, svc_ip: &str, ep: &str) -> String {
    format!(
        r#"apiVersion: about.k8s.io/v1alpha1
kind: ClusterProperty
metadata: {{name: cluster.clusterset.k8s.io}}
spec: {{value: {id}}}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {{name: kubernetes}}
spec: {{cidrs: ["{svc_cidr}"]}}
---
apiVersion: v1
kind: Node
metadata: {{name: {id}-node-0}}
spec: {{podCIDR: "{pod}", podCIDRs: ["{pod}"]}}
status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec: {{clusterIP: "{svc_ip}", ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints: [{{addresses: ["{ep}"], conditions: {{ready: true}}}}]
ports: [{{name: http, port: 8080, protocol: TCP}}]
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {{name: web, namespace: shop}}
"#
    )
}

/// A gateway or DNS subscription to a controller's agent port (plaintext token mode).
pub struct Subscriber {
    stream: TcpStream,
    dec: FrameDecoder,
}

impl Subscriber {
    pub fn connect(addr: SocketAddr, hello: &AgentHello) -> Self {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        stream
            .write_all(&encode_json_frame(hello, "hello", 1 << 20).unwrap())
            .unwrap();
        Self {
            stream,
            dec: FrameDecoder::new(64 << 20),
        }
    }

    pub fn next<T: serde::de::DeserializeOwned>(&mut self) -> T {
        let mut buf = [0u8; 65536];
        loop {
            if let Some(v) = self.dec.next_json::<T>().unwrap() {
                return v;
            }
            let n = self.stream.read(&mut buf).unwrap();
            assert!(n > 0, "the controller closed the stream");
            self.dec.push(&buf[..n]);
        }
    }
}
