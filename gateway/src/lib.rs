//! The per-node gateway: a userspace WireGuard device over boringtun's `noise` protocol core,
//! and the reconciler that applies the desired state (peers and pod routes) to it.

pub mod allowed_ips;
pub mod antispoof;
pub mod controller;
pub mod cpus;
pub mod device;
mod error;
pub mod flows;
pub mod gateway;
pub mod http;
pub mod io;
pub mod keys;
pub mod metrics;
pub mod nft;
pub mod node_report;
pub mod offload;
pub mod peer_config;
pub mod plan_store;
pub mod policy;
pub mod rotation;
pub mod routes;
pub mod status;
pub mod steering;

pub use error::{Error, chain};
pub use gateway::{Gateway, GatewayConfig, Reconciler};
