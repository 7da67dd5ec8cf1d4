//! Crash points for the crash-safety tests: `TRELLIS_CNI_CRASH_AT=<point>` makes the plugin
//! abort right there, as a `kill -9` would, with no cleanup of any kind.

/// The points of ADD at which a crash can be injected.
pub const POINTS: [&str; 3] = ["ipam-committed", "veth-created", "pod-configured"];

const VARIABLE: &str = "TRELLIS_CNI_CRASH_AT";

pub fn crash_if_armed(point: &str) {
    if std::env::var_os(VARIABLE).is_some_and(|armed| armed == point) {
        std::process::abort();
    }
}
