//! What Trellis's tests share, so each crate's tests do not grow their own copy:
//! - [`eventually`] / [`eventually_async`]: wait on a condition instead of sleeping;
//! - [`skip_unless_root!`]: tests that build network namespaces skip, with a message, when not root;
//! - [`bin_path`]: the workspace's binaries, for tests in one crate that run another's;
//! - [`TempNetns`]: a namespace removed when the test ends, also when it fails.
//!
//! HTTP requests in tests use `trellis_http`'s client, the one the CLI uses.

mod bins;
mod root;
mod wait;

pub use bins::bin_path;
pub use root::{is_root, skip_reason};
pub use trellis_netns::testing::TempNetns;
pub use wait::{POLL, eventually, eventually_async};
