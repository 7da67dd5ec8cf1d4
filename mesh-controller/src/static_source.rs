//! The static source: a YAML file of Kubernetes objects, re-read when it changes. A file that
//! fails to parse is logged and ignored: the last good state stays (nothing is withdrawn
//! because someone saved a typo).

use std::path::PathBuf;
use std::time::Duration;

use crate::hub::Hub;
use crate::objects::{parse_objects, source_state};
use crate::source::SourceState;

/// Where a source delivers the cluster's state; the hub in production, a recorder in tests.
pub trait StateSink: Send + Sync + 'static {
    fn set_source(&self, state: SourceState);

    /// The source read something it cannot use and keeps the last state (the error is
    /// logged by the source; a sink may count it).
    fn source_failed(&self, _error: &crate::Error) {}
}

impl StateSink for Hub {
    fn set_source(&self, state: SourceState) {
        Hub::set_source(self, state);
    }
}

/// The pure part: given the file's bytes, what to deliver (if anything).
#[derive(Debug, Default)]
pub struct StaticFile {
    last_content: Option<String>,
}

impl StaticFile {
    /// Returns the new state if `content` differs from the last good content and parses.
    pub fn update(&mut self, content: String) -> Result<Option<SourceState>, crate::Error> {
        if self.last_content.as_ref() == Some(&content) {
            return Ok(None);
        }
        let objects = parse_objects(&content)?;
        let mut state = source_state(&objects);
        state.digest = Some(trellis_core::sha256_hex(content.as_bytes()));
        self.last_content = Some(content);
        Ok(Some(state))
    }
}

/// What tells a file changed without reading it: length, modification time (nanoseconds
/// on Linux file systems) and inode (a writer that renames a new file into place).
type Fingerprint = (u64, Option<std::time::SystemTime>, u64);

fn fingerprint(meta: &std::fs::Metadata) -> Fingerprint {
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let inode = 0;
    (meta.len(), meta.modified().ok(), inode)
}

/// Re-read a file whose metadata did not change at least this often anyway (a write within
/// the file system's timestamp granularity that kept the length is still seen).
const REREAD_EVERY: Duration = Duration::from_secs(2);

/// Polls `path` every `poll` and delivers changes to `sink`; runs until cancelled. A poll
/// whose file metadata is unchanged costs one `stat`, so a short poll (50 ms) is cheap.
pub async fn run(path: PathBuf, poll: Duration, sink: impl StateSink) {
    let mut file = StaticFile::default();
    let mut last_error: Option<String> = None;
    let mut seen: Option<(Fingerprint, tokio::time::Instant)> = None;
    loop {
        let now = tokio::time::Instant::now();
        let print = tokio::fs::metadata(&path)
            .await
            .ok()
            .map(|m| fingerprint(&m));
        let unchanged = matches!((&seen, &print), (Some((old, at)), Some(new))
            if old == new && now.duration_since(*at) < REREAD_EVERY);
        if unchanged {
            tokio::time::sleep(poll).await;
            continue;
        }
        seen = print.map(|p| (p, now));
        match tokio::fs::read_to_string(&path).await {
            Ok(content) => match file.update(content) {
                Ok(Some(state)) => {
                    tracing::info!(
                        path = %path.display(),
                        nodes = state.nodes.len(),
                        services = state.services.len(),
                        "static source loaded"
                    );
                    last_error = None;
                    sink.set_source(state);
                }
                Ok(None) => {}
                Err(e) => {
                    sink.source_failed(&e);
                    let msg = trellis_core::error_chain(&e);
                    if last_error.as_ref() != Some(&msg) {
                        tracing::error!(path = %path.display(), error = %msg, "static source unreadable; keeping the last state");
                        last_error = Some(msg);
                    }
                }
            },
            Err(e) => {
                let msg = trellis_core::error_chain(&e);
                if last_error.as_ref() != Some(&msg) {
                    tracing::error!(path = %path.display(), error = %msg, "reading the static source; keeping the last state");
                    last_error = Some(msg);
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<SourceState>>>, Arc<Mutex<usize>>);

    impl StateSink for Recorder {
        fn set_source(&self, state: SourceState) {
            self.0.lock().unwrap().push(state);
        }

        fn source_failed(&self, _error: &crate::Error) {
            *self.1.lock().unwrap() += 1;
        }
    }

    const FILE: &str = include_str!("../testdata/cluster-east.yaml");

    #[test]
    fn only_changed_parseable_content_is_delivered() {
        let mut f = StaticFile::default();
        assert!(f.update(FILE.into()).unwrap().is_some());
        assert!(f.update(FILE.into()).unwrap().is_none());
        assert!(f.update("kind: Node\nmetadata: [".into()).is_err());
        // After an error, the same good content is not redelivered.
        assert!(f.update(FILE.into()).unwrap().is_none());
    }

    #[test]
    fn the_digest_is_the_sha256_of_the_bytes_last_loaded() {
        let mut f = StaticFile::default();
        let state = f.update(FILE.into()).unwrap().unwrap();
        let digest = state.digest.unwrap();
        assert_eq!(digest.len(), 64);
        assert_eq!(digest, trellis_core::sha256_hex(FILE.as_bytes()));
        assert_eq!(
            trellis_core::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let edited = format!(
            "{FILE}
# edited
"
        );
        let state = f.update(edited.clone()).unwrap().unwrap();
        assert_eq!(
            state.digest.unwrap(),
            trellis_core::sha256_hex(edited.as_bytes())
        );
    }

    #[tokio::test]
    async fn the_file_is_watched_and_bad_edits_keep_the_last_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.yaml");
        std::fs::write(&path, FILE).unwrap();
        let rec = Recorder::default();
        let task = tokio::spawn(run(path.clone(), Duration::from_millis(20), rec.clone()));
        let wait = |n: usize| {
            let rec = rec.clone();
            async move {
                trellis_test_support::eventually_async(
                    &format!("{n} deliveries"),
                    Duration::from_secs(20),
                    || async { (rec.0.lock().unwrap().len() >= n).then_some(()) },
                )
                .await
            }
        };
        wait(1).await;
        std::fs::write(&path, "kind: [broken").unwrap();
        // Wait until the broken file was read and refused, then check nothing was delivered.
        trellis_test_support::eventually_async(
            "the broken file refused",
            Duration::from_secs(20),
            || async { (*rec.1.lock().unwrap() > 0).then_some(()) },
        )
        .await;
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        std::fs::write(
            &path,
            FILE.replace("podCIDR: 10.10.1.0/24", "podCIDR: 10.10.2.0/24"),
        )
        .unwrap();
        wait(2).await;
        let states = rec.0.lock().unwrap().clone();
        assert_eq!(
            states[1].nodes["east-node-1"].pod_cidrs,
            vec!["10.10.2.0/24".parse().unwrap()]
        );
        task.abort();
    }
}
