//! The one way Trellis replaces a state file (IPAM leases, a gateway's key and last plan, the
//! controller's state, the CNI configuration the kubelet reads): the bytes go to an unnamed
//! temporary file in the same directory, are synced, linked over the target and the directory
//! synced (`atomic-write-file`). A crash at any point leaves the old content or the new one,
//! never half of either, and no stray temporary file.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use atomic_write_file::AtomicWriteFile;
use atomic_write_file::unix::OpenOptionsExt as _;

/// Replaces `path` with `bytes`, with permissions `mode` whatever the old file had.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomically_then(path, bytes, mode, || Ok(()))
}

/// [`write_atomically`], calling `before_replace` once the new content is durable and before
/// it replaces the old: where a test injects a crash, or a caller checks it still owns a lock.
pub fn write_atomically_then(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    before_replace: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let mut options = AtomicWriteFile::options();
    options.mode(mode);
    options.preserve_mode(false);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    before_replace()?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_with_the_mode_asked_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        write_atomically(&path, b"one", 0o600).unwrap();
        write_atomically(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failure_before_the_replace_keeps_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, b"old", 0o644).unwrap();
        let refused = write_atomically_then(&path, b"new", 0o644, || {
            Err(io::Error::other("lost the lock"))
        });
        assert_eq!(refused.unwrap_err().to_string(), "lost the lock");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
