//! Tests that need root (network namespaces, TUN devices, nftables) skip when run as a normal
//! user, saying why, as netavark's tests do; `scripts/test` runs them all as root.

/// Whether this process can build network namespaces.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The line a skipped test prints.
pub fn skip_reason(test: &str) -> String {
    format!(
        "skipped {test}: needs root (it builds network namespaces); run `sudo scripts/test` to run every test"
    )
}

/// Returns from the calling test, with a message on stderr, unless running as root.
///
/// ```
/// fn builds_a_namespace() {
///     trellis_test_support::skip_unless_root!();
///     // ... create namespaces ...
/// }
/// # builds_a_namespace();
/// ```
#[macro_export]
macro_rules! skip_unless_root {
    () => {
        if !$crate::is_root() {
            eprintln!("{}", $crate::skip_reason(module_path!()));
            return;
        }
    };
}
