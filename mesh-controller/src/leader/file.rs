//! The election record as a JSON file, for controllers on one machine (the lab, a static
//! source): every write happens under an exclusive `flock` of `<file>.lock`, checks the
//! version it read, and replaces the file atomically, so two processes racing get one win
//! and one conflict, and a reader never sees half a record.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{LeaseBackend, LeaseError, LeaseRecord, Versioned};

/// The lease file at `path`.
#[derive(Debug, Clone)]
pub struct FileLease {
    pub path: PathBuf,
}

/// The file's content (times as microseconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OnDisk {
    #[serde(default)]
    holder_identity: Option<String>,
    #[serde(default)]
    acquire_time_micros: Option<u64>,
    #[serde(default)]
    renew_time_micros: Option<u64>,
    lease_duration_seconds: u64,
    #[serde(default)]
    lease_transitions: u32,
    version: u64,
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn time(micros: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(micros)
}

impl OnDisk {
    fn new(record: &LeaseRecord, version: u64) -> Self {
        Self {
            holder_identity: record.holder.clone(),
            acquire_time_micros: record.acquire_time.map(micros),
            renew_time_micros: record.renew_time.map(micros),
            lease_duration_seconds: record.lease_duration.as_secs(),
            lease_transitions: record.transitions,
            version,
        }
    }

    fn versioned(&self) -> Versioned {
        Versioned {
            record: LeaseRecord {
                holder: self.holder_identity.clone().filter(|h| !h.is_empty()),
                acquire_time: self.acquire_time_micros.map(time),
                renew_time: self.renew_time_micros.map(time),
                lease_duration: Duration::from_secs(self.lease_duration_seconds),
                transitions: self.lease_transitions,
            },
            version: self.version.to_string(),
        }
    }
}

fn io_error(operation: &'static str, path: &Path) -> impl Fn(std::io::Error) -> LeaseError {
    let path = path.to_owned();
    move |source| LeaseError::File {
        operation,
        path: path.clone(),
        source,
    }
}

/// The longest a write waits for another process's lock (held for one read and one rename).
const LOCK_WAIT: Duration = Duration::from_secs(2);

fn lock_within(mut file: std::fs::File, wait: Duration) -> std::io::Result<Flock<std::fs::File>> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((returned, nix::errno::Errno::EWOULDBLOCK)) => {
                if std::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!("another process held it for over {wait:?}"),
                    ));
                }
                file = returned;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((_, errno)) => return Err(errno.into()),
        }
    }
}

impl FileLease {
    fn lock_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    fn read(&self) -> Result<Option<OnDisk>, LeaseError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| LeaseError::FileParse {
                        path: self.path.clone(),
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("reading the lease file", &self.path)(e)),
        }
    }

    /// Runs `write` under the exclusive lock with the record as it is now.
    fn locked(
        &self,
        write: impl FnOnce(Option<OnDisk>) -> Result<OnDisk, LeaseError>,
    ) -> Result<Versioned, LeaseError> {
        let lock_path = self.lock_path();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error("opening the lease lock", &lock_path))?;
        // Held until dropped at the end of this function. Never waited on for long: a
        // holder stopped while holding it (SIGSTOP) must not wedge this thread for good.
        let _lock =
            lock_within(file, LOCK_WAIT).map_err(io_error("locking the lease lock", &lock_path))?;
        let next = write(self.read()?)?;
        let bytes = serde_json::to_vec(&next).map_err(|source| LeaseError::FileParse {
            path: self.path.clone(),
            source,
        })?;
        trellis_files::write_atomically(&self.path, &bytes, 0o600)
            .map_err(io_error("replacing the lease file", &self.path))?;
        Ok(next.versioned())
    }

    fn create_now(&self, record: &LeaseRecord) -> Result<Versioned, LeaseError> {
        self.locked(|current| match current {
            Some(_) => Err(LeaseError::Conflict),
            None => Ok(OnDisk::new(record, 1)),
        })
    }

    fn update_now(&self, record: &LeaseRecord, version: &str) -> Result<Versioned, LeaseError> {
        self.locked(|current| match current {
            Some(current) if current.version.to_string() == version => {
                Ok(OnDisk::new(record, current.version.wrapping_add(1)))
            }
            _ => Err(LeaseError::Conflict),
        })
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, LeaseError> + Send + 'static,
) -> Result<T, LeaseError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(LeaseError::File {
            operation: "running the lease file operation",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

impl LeaseBackend for FileLease {
    async fn get(&self) -> Result<Option<Versioned>, LeaseError> {
        let this = self.clone();
        blocking(move || Ok(this.read()?.map(|d| d.versioned()))).await
    }

    async fn create(&self, record: &LeaseRecord) -> Result<Versioned, LeaseError> {
        let (this, record) = (self.clone(), record.clone());
        blocking(move || this.create_now(&record)).await
    }

    async fn update(&self, record: &LeaseRecord, version: &str) -> Result<Versioned, LeaseError> {
        let (this, record, version) = (self.clone(), record.clone(), version.to_owned());
        blocking(move || this.update_now(&record, &version)).await
    }

    fn describe(&self) -> String {
        format!("lease file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: &str) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.into()),
            acquire_time: Some(time(1_700_000_000_000_000)),
            renew_time: Some(time(1_700_000_001_500_000)),
            lease_duration: Duration::from_secs(15),
            transitions: 2,
        }
    }

    #[tokio::test]
    async fn writes_are_conditional_on_the_version_read() {
        let dir = tempfile::tempdir().unwrap();
        let lease = FileLease {
            path: dir.path().join("leader.json"),
        };
        assert_eq!(lease.get().await.unwrap(), None);
        let first = lease.create(&record("a")).await.unwrap();
        assert_eq!(first.record, record("a"));
        assert_eq!(lease.get().await.unwrap(), Some(first.clone()));
        // A second creator and a writer with a stale version both lose.
        assert!(matches!(
            lease.create(&record("b")).await,
            Err(LeaseError::Conflict)
        ));
        let renewed = lease.update(&record("a"), &first.version).await.unwrap();
        assert_ne!(renewed.version, first.version);
        assert!(matches!(
            lease.update(&record("b"), &first.version).await,
            Err(LeaseError::Conflict)
        ));
        assert_eq!(
            lease.get().await.unwrap().unwrap().record.holder.as_deref(),
            Some("a")
        );
        std::fs::write(&lease.path, b"{half").unwrap();
        assert!(matches!(
            lease.get().await,
            Err(LeaseError::FileParse { .. })
        ));
    }

    #[test]
    fn a_lock_held_elsewhere_is_waited_on_only_so_long() {
        let dir = tempfile::tempdir().unwrap();
        let lease = FileLease {
            path: dir.path().join("leader.json"),
        };
        let other = std::fs::File::create(lease.lock_path()).unwrap();
        let held = Flock::lock(other, FlockArg::LockExclusive).unwrap();
        let started = std::time::Instant::now();
        let err = lease.create_now(&record("a")).unwrap_err();
        assert!(
            trellis_core::error_chain(&err).contains("held it for over"),
            "{err}"
        );
        assert!(started.elapsed() < LOCK_WAIT + Duration::from_secs(1));
        drop(held);
        lease.create_now(&record("a")).unwrap();
    }

    #[test]
    fn racing_processes_get_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leader.json");
        let wins: usize = std::thread::scope(|s| {
            let racers: Vec<_> = (0..8)
                .map(|i| {
                    let lease = FileLease { path: path.clone() };
                    s.spawn(move || lease.create_now(&record(&format!("r{i}"))).is_ok())
                })
                .collect();
            racers
                .into_iter()
                .map(|r| usize::from(r.join().unwrap()))
                .sum()
        });
        assert_eq!(wins, 1);
    }
}
