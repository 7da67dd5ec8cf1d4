//! `trellis-agent-client`: the one client of a controller's agent port, shared by the gateway
//! and DNS ([`client`]), and the agent port's TLS material for both ends, re-read when its
//! files change ([`tls`]). Identities are [`trellis_core::agent::AgentIdentity`] names in the
//! certificates; see `SECURITY.md` ("The agent port").

pub mod bootstrap;
pub mod client;
pub mod tls;

pub use client::{
    AgentStream, Backoff, ClientConfig, Ended, Handler, Replica, Transport, connect, follow,
};
pub use tls::{ClientTls, ServerTls, TlsError, TlsFiles};
pub use tokio_rustls;
