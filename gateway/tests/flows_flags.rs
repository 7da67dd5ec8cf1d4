//! `trellis-gateway run`'s flow flags are checked before anything starts.

use std::process::Command;

fn run_with(flags: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_trellis-gateway"))
        .arg("run")
        .arg("--state-dir")
        .arg(dir.path())
        .args(flags)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_flow_buffer_of_nothing_or_of_too_much_is_refused() {
    for size in ["0", "1048577"] {
        let (ok, stderr) = run_with(&["--flow-buffer", size]);
        assert!(!ok);
        assert!(
            stderr.contains("--flow-buffer must be between 1 and 1048576"),
            "{stderr}"
        );
    }
}

#[test]
fn flows_are_on_or_off() {
    let (ok, stderr) = run_with(&["--flows", "maybe"]);
    assert!(!ok);
    assert!(stderr.contains("want on or off"), "{stderr}");
}

#[test]
fn flows_off_is_accepted() {
    // Accepted: the run then fails on what follows the flags (no TUN without root, or a
    // missing --node-name for --controller), never on --flows.
    let (ok, stderr) = run_with(&["--flows", "off", "--controller", "127.0.0.1:1"]);
    assert!(!ok);
    assert!(
        stderr.contains("--controller needs --node-name"),
        "{stderr}"
    );
}
