//! The workspace's binaries, for a test in one crate that runs another crate's binary (a crate's
//! own binaries are `env!("CARGO_BIN_EXE_<name>")`).

use std::path::PathBuf;

/// A binary of this workspace, from the target directory the running test was built into.
/// Panics, saying what to run, when it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}
