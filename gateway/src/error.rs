use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What failed in the gateway, and on what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create state directory {path}")]
    CreateStateDir { path: PathBuf, source: io::Error },
    #[error("read private key {path}")]
    ReadKey { path: PathBuf, source: io::Error },
    #[error("private key {path} is not a base64 WireGuard key")]
    ParseKey { path: PathBuf },
    #[error("private key {path} is readable by others (mode {mode:o}); it must be 0600")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("write private key {path}")]
    WriteKey { path: PathBuf, source: io::Error },
    #[error("open TUN device {name}")]
    OpenTun { name: String, source: io::Error },
    #[error("bind UDP {addr}")]
    BindUdp { addr: SocketAddr, source: io::Error },
    #[error("serve metrics on {addr}")]
    BindMetrics { addr: SocketAddr, source: io::Error },
    #[error("register metrics")]
    Metrics(#[from] prometheus::Error),
    #[error("read desired state {path}")]
    ReadState { path: PathBuf, source: io::Error },
    #[error("parse desired state {path}")]
    ParseState {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid desired state")]
    InvalidState(#[from] trellis_core::gateway::StateError),
    #[error(transparent)]
    Netns(#[from] trellis_netns::Error),
    #[error("the TUN device failed (was it deleted?)")]
    TunFailed(#[source] io::Error),
    #[error("start the device loop's thread")]
    DeviceRuntime(#[source] io::Error),
    #[error("the device loop has stopped")]
    DeviceStopped,
    #[error("enforce NetworkPolicy")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("the policy task stopped before it finished")]
    PolicyTask,
    /// Every failed route operation of one pass (each logged where it failed).
    #[error("{} route operations failed", .0.len())]
    Routes(Vec<Error>),
}

/// An error and its causes, `: `-separated, for a log line; kept for callers of the old name.
pub use trellis_core::error_chain as chain;
