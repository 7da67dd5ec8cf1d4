//! Tests that need root (network namespaces, TUN devices, nftables) skip when run as a normal
//! user, saying why, as netavark's tests do; `scripts/test` runs them all as root.

/// Whether this process can build network namespaces.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The running test's name where the harness gave its thread one (not with one test thread,
/// where tests run on `main`), else `fallback`.
fn current_test(fallback: &str) -> String {
    let thread = std::thread::current();
    thread
        .name()
        .filter(|name| *name != "main")
        .unwrap_or(fallback)
        .to_owned()
}

/// The line a skipped test prints: the test's name, else the module it is in.
pub fn skip_reason(module: &str) -> String {
    let test = current_test(module);
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

/// Set (by `scripts/test`) to make a missing external tool fail the test that needs it, so
/// the full suite never passes by skipping; a developer's plain `cargo test` skips instead.
pub const REQUIRE_TOOLS: &str = "TRELLIS_REQUIRE_TOOLS";

/// Says that the calling test skips because `tool` is missing, or panics when the suite
/// requires every tool ([`REQUIRE_TOOLS`]).
pub fn skip_for_missing_tool(tool: &str) {
    let test = current_test("a test");
    assert!(
        std::env::var_os(REQUIRE_TOOLS).is_none(),
        "{test} needs {tool}, which is missing: run scripts/install-deps"
    );
    eprintln!("skipped {test}: {tool} is not installed; run scripts/install-deps to run it");
}
