//! Address management: a pure allocator over a state file that survives crashes.
//!
//! host-local keeps one file per address and leaks them when a process dies between writing
//! and cleaning up (containernetworking/plugins#332, #498). Here the whole state is one small
//! JSON document, changed only under an exclusive lock and replaced atomically (write, fsync,
//! rename): a reader sees the old state or the new one, never half of either. Every lease names
//! its owner (container ID and interface), so DEL and GC can always find what a crashed ADD
//! left behind, and an ADD retried for the same owner gets the same address back.

mod allocator;
mod store;

pub use allocator::{Allocations, Exhausted, Owner};
pub use store::{DEFAULT_LOCK_TIMEOUT, Store};
