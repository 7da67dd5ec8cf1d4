//! Writing the gateway's state files (its private key, its last plan): one way, crash-safe.

use std::io::{self, Write};
use std::path::Path;

use atomic_write_file::AtomicWriteFile;
use atomic_write_file::unix::OpenOptionsExt;

/// Replaces `path` with `bytes`, readable by the owner only: written to a temporary file in the
/// same directory, synced, renamed into place and the directory synced (`atomic-write-file`),
/// so a crash at any point leaves the old content or the new one, never half of either, and
/// the file is never readable by others.
pub fn write_private_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = AtomicWriteFile::options();
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.preserve_mode(false);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.commit()
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_privately_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_private_atomically(&path, b"one").unwrap();
        write_private_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
