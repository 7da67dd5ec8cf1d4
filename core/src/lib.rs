//! The shared model of Trellis: plain data and pure functions, no IO.
//!
//! Every daemon and the CLI speak in these types, so they hold no tokio, netlink or kube
//! dependencies: they can be tested, serialised and compared anywhere.

pub mod admission;
pub mod agent;
pub mod cidr;
pub mod cluster;
pub mod gateway;
pub mod imports;
pub mod peering;
pub mod status;
pub mod wgkey;
