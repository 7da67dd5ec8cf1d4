use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use super::Allocations;
use crate::error::{CniError, code};

const STATE_FILE: &str = "allocations.json";
const LOCK_FILE: &str = "lock";

/// The allocations of one network on disk.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    lock_timeout: Duration,
}

/// How long an invocation waits for another to finish with the state before giving up with
/// "try again later" (CNI code 11) rather than hanging the runtime.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

fn io_error(what: &str, path: &Path, error: io::Error) -> CniError {
    CniError::new(
        code::IO_FAILURE,
        format!("IPAM state: {what}"),
        format!("{}: {error}", path.display()),
    )
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, CniError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error("create directory", dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        })
    }

    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `change` on the current allocations under the network's exclusive lock, and
    /// persists the result atomically if it changed. An error from `change` persists nothing.
    pub fn transact<T>(
        &self,
        change: impl FnOnce(&mut Allocations) -> Result<T, CniError>,
    ) -> Result<T, CniError> {
        let _lock = self.lock()?;
        let before = self.load()?;
        let mut after = before.clone();
        let outcome = change(&mut after)?;
        if after != before {
            self.remove_torn_writes();
            self.save(&after)?;
        }
        Ok(outcome)
    }

    /// The current allocations (under the lock, so never mid-change).
    pub fn read(&self) -> Result<Allocations, CniError> {
        let _lock = self.lock()?;
        self.load()
    }

    fn lock(&self) -> Result<File, CniError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error("open lock", &path, e))?;
        // The kernel drops the lock when the process dies, however it dies.
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(io_error("take lock", &path, e)),
        }
        // Another invocation holds it: wait for it on a helper thread, but not forever. The
        // clone shares the open file description, so its lock is this file's lock.
        let waiter = file
            .try_clone()
            .map_err(|e| io_error("take lock", &path, e))?;
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(waiter.lock());
        });
        match receiver.recv_timeout(self.lock_timeout) {
            Ok(Ok(())) => Ok(file),
            Ok(Err(e)) => Err(io_error("take lock", &path, e)),
            Err(_) => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "IPAM state is busy; try again later",
                format!(
                    "{} stayed locked for {} ms",
                    path.display(),
                    self.lock_timeout.as_millis()
                ),
            )),
        }
    }

    fn load(&self) -> Result<Allocations, CniError> {
        let path = self.dir.join(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                CniError::new(
                    code::STATE_CORRUPT,
                    "IPAM state is unreadable; it was left as it is",
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Allocations::default()),
            Err(e) => Err(io_error("read", &path, e)),
        }
    }

    /// A crash in the middle of a rename can leave the writer's named temporary file
    /// (`.allocations.json.XXXXXX`); under the lock nobody else is writing, so any such file is
    /// a dead writer's.
    fn remove_torn_writes(&self) {
        let prefix = format!(".{STATE_FILE}.");
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Replaces the state atomically: a temporary file synced, renamed over the state, and the
    /// directory synced, so the new lease survives a power loss once ADD has answered.
    fn save(&self, allocations: &Allocations) -> Result<(), CniError> {
        let path = self.dir.join(STATE_FILE);
        let bytes =
            serde_json::to_vec(allocations).map_err(|e| io_error("encode", &path, e.into()))?;
        trellis_files::write_atomically_then(&path, &bytes, 0o600, || {
            crate::failpoint::crash_if_armed(crate::failpoint::IPAM_SYNCED);
            Ok(())
        })
        .map_err(|e| io_error("write", &path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Owner;

    #[test]
    fn a_dead_writer_s_temporary_file_is_removed_by_the_next_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let torn = dir.path().join(format!(".{STATE_FILE}.Xy12Ab"));
        fs::write(&torn, b"{\"leases\": {").unwrap();
        store
            .transact(|a| {
                a.allocate(&["10.0.0.0/24".parse().unwrap()], &Owner::new("a", "eth0"))
                    .map_err(|e| CniError::new(1, "", e.to_string()))
            })
            .unwrap();
        assert!(!torn.exists());
        assert_eq!(store.read().unwrap().len(), 1);
    }

    #[test]
    fn changes_persist_and_failed_changes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cidr = "10.0.0.0/24".parse().unwrap();
        store
            .transact(|a| {
                a.allocate(&[cidr], &Owner::new("a", "eth0"))
                    .map_err(|e| CniError::new(1, "", e.to_string()))
            })
            .unwrap();
        let failed: Result<(), CniError> = store.transact(|a| {
            a.release(&Owner::new("a", "eth0"));
            Err(CniError::new(code::DATAPLANE, "boom", ""))
        });
        assert!(failed.is_err());
        assert_eq!(Store::open(dir.path()).unwrap().read().unwrap().len(), 1);
    }

    #[test]
    fn a_corrupt_state_is_reported_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"{\"leases\": [garbage").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let error = store.transact(|_| Ok(())).unwrap_err();
        assert_eq!(error.code, code::STATE_CORRUPT);
        assert_eq!(
            fs::read(dir.path().join(STATE_FILE)).unwrap(),
            b"{\"leases\": [garbage"
        );
    }
}
