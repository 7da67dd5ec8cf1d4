//! Kernel settings under `/proc/sys`. Those under `net/` belong to the network namespace of
//! whoever opens the file, so each is written from a thread inside the target namespace.

use std::fs;
use std::path::Path;

use crate::{Error, Netns};

/// Writes `value` to `/proc/sys/<key>` (key in path form: `net/ipv4/ip_forward`) inside
/// `netns`, or in the caller's namespace when `netns` is `None`. Skips the write when the value
/// is already set, which keeps hot paths (the CNI plugin) from taking kernel locks for nothing.
pub fn write(netns: Option<&Netns>, key: &str, value: &str) -> Result<(), Error> {
    in_namespace(netns, key, |path| {
        if fs::read_to_string(path)?.trim() == value {
            return Ok(());
        }
        fs::write(path, value)
    })
}

/// Reads `/proc/sys/<key>` inside `netns` (or the caller's namespace).
pub fn read(netns: Option<&Netns>, key: &str) -> Result<String, Error> {
    in_namespace(netns, key, |path| {
        fs::read_to_string(path).map(|s| s.trim().to_string())
    })
}

fn in_namespace<T: Send>(
    netns: Option<&Netns>,
    key: &str,
    access: impl FnOnce(&Path) -> std::io::Result<T> + Send,
) -> Result<T, Error> {
    let path = Path::new("/proc/sys").join(key);
    let result = match netns {
        Some(netns) => netns.run(|| access(&path))?,
        None => access(&path),
    };
    result.map_err(|source| Error::Sysctl {
        key: key.to_string(),
        source,
    })
}
