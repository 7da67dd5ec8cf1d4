//! The network-namespace toolkit every Trellis test, the CNI plugin and the lab build on.
//!
//! Namespaces are made the way iproute2 makes them (a bind mount under `/run/netns`), so
//! `ip netns exec` works on them. Links, addresses, routes and neighbours go through
//! `rtnetlink`; nothing shells out to `ip`.
//!
//! A namespace is only ever entered on a short-lived thread of its own, to create a socket,
//! a netlink handle or a child process, and that thread then exits: a thread switched into
//! another namespace must never be returned to a pool (containernetworking's `pkg/ns`
//! README explains the bugs that follow otherwise).

mod error;
mod namespace;
mod netlink;
pub mod probe;
pub mod sysctl;
pub mod testing;

mod owned_routes;

pub use error::Error;
pub use namespace::{NETNS_RUN_DIR, Netns};
pub use netlink::{Link, Netlink, Route, VethSpec};
pub use owned_routes::{OwnedRoute, RouteTarget};
