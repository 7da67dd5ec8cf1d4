//! The shared model of Trellis: plain data and pure functions, no IO.
//!
//! Every daemon and the CLI speak in these types, so they hold no tokio, netlink or kube
//! dependencies: they can be tested, serialised and compared anywhere.

/// The prefix of every pod's host-side veth the CNI plugin makes (`trl` + 12 hex digits): the
/// node agent's per-pod rules (anti-spoofing, later policy) match interfaces by it.
pub const POD_VETH_PREFIX: &str = "trl";

pub mod admission;
pub mod agent;
pub mod cidr;
pub mod claims;
pub mod cluster;
mod error_chain;
pub mod external_peer;
pub mod flow;
pub mod framing;
pub mod gateway;
pub mod imports;
pub mod keyed;
pub mod peering;
pub mod policy;
pub mod status;
pub mod vips;
pub mod wgkey;

pub use error_chain::error_chain;

/// SHA-256 of `bytes` in lowercase hex: the digests two processes compare (the static source
/// file a writer wrote and the controller loaded, the policy inputs a controller sent and a
/// node enforces).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
