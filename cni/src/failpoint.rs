//! Crash points for the crash-safety tests: `TRELLIS_CNI_CRASH_AT=<point>` makes the plugin
//! abort right there, as a `kill -9` would, with no cleanup of any kind.

/// The points of ADD, after its lease is committed, at which a crash can be injected.
pub const POINTS: [&str; 3] = ["ipam-committed", "veth-created", "pod-configured"];

/// Inside the IPAM store's write: the new state is written and synced, not yet renamed over
/// the old one.
pub const IPAM_SYNCED: &str = "ipam-synced";

const VARIABLE: &str = "TRELLIS_CNI_CRASH_AT";

pub fn crash_if_armed(point: &str) {
    if std::env::var_os(VARIABLE).is_some_and(|armed| armed == point) {
        std::process::abort();
    }
}
