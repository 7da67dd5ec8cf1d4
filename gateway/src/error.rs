use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What failed in the gateway, and on what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create state directory {path}: {source}")]
    CreateStateDir { path: PathBuf, source: io::Error },
    #[error("read private key {path}: {source}")]
    ReadKey { path: PathBuf, source: io::Error },
    #[error("private key {path} is not a base64 WireGuard key")]
    ParseKey { path: PathBuf },
    #[error("private key {path} is readable by others (mode {mode:o}); it must be 0600")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("write private key {path}: {source}")]
    WriteKey { path: PathBuf, source: io::Error },
    #[error("open TUN device {name}: {source}")]
    OpenTun { name: String, source: io::Error },
    #[error("bind UDP {addr}: {source}")]
    BindUdp { addr: SocketAddr, source: io::Error },
    #[error("serve metrics on {addr}: {source}")]
    BindMetrics { addr: SocketAddr, source: io::Error },
    #[error("register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("read desired state {path}: {source}")]
    ReadState { path: PathBuf, source: io::Error },
    #[error("parse desired state {path}: {source}")]
    ParseState {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid desired state: {0}")]
    InvalidState(#[from] trellis_core::gateway::StateError),
    #[error("{0}")]
    Netns(#[from] trellis_netns::Error),
    #[error("the TUN device failed (was it deleted?): {0}")]
    TunFailed(io::Error),
    #[error("start the device loop's thread: {0}")]
    DeviceRuntime(io::Error),
    #[error("the device loop has stopped")]
    DeviceStopped,
    #[error("{} route operations failed: {}", .0.len(), .0.join("; "))]
    Routes(Vec<String>),
}

/// An error and its causes, `: `-separated, for a log line (anyhow's `{:#}` without anyhow).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
