//! What Trellis's tests share, so each crate's tests do not grow their own copy:
//! - [`eventually`] / [`eventually_async`] / [`poll_until`]: wait on a condition instead of
//!   sleeping;
//! - [`skip_unless_root!`]: tests that build network namespaces skip, with a message, when not root
//!   ([`skip_for_missing_tool`] likewise for an external tool);
//! - [`bin_path`]: the workspace's binaries, for tests in one crate that run another's;
//! - [`TempNetns`]: a namespace removed when the test ends, also when it fails;
//! - [`rss_kib`]: this process's resident memory.
//!
//! HTTP requests in tests use `trellis_http`'s client, the one the CLI uses.

mod bins;
mod memory;
mod root;
mod wait;

pub use bins::bin_path;
pub use memory::rss_kib;
pub use root::{REQUIRE_TOOLS, is_root, skip_for_missing_tool, skip_reason};
pub use trellis_netns::testing::TempNetns;
pub use wait::{POLL, eventually, eventually_async, poll_until};
