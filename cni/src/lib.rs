//! `trellis-cni`: the CNI plugin (spec 1.1.0) that gives every pod a routed veth and an address
//! from its node's pod CIDR, in the style of Calico and Cilium (L3, no bridge).
//!
//! The plugin side is split the way the rest of Trellis is: parsing, address allocation and
//! result building are plain functions ([`env`], [`config`], [`ipam::Allocations`],
//! [`result`]); the disk ([`ipam::Store`]) and the kernel ([`dataplane`]) sit at the edges.
//! [`runtime`] is the other side of the contract: it invokes plugin chains the way containerd
//! and CRI-O do, for the lab, the tests and the benchmark.

pub mod commands;
pub mod config;
pub mod dataplane;
pub mod env;
pub mod error;
pub mod failpoint;
pub mod ipam;
pub mod result;
pub mod runtime;

/// The spec version this plugin implements.
pub const SPEC_VERSION: &str = "1.1.0";

/// Every config version the plugin accepts.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
