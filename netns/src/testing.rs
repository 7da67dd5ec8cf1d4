//! Namespaces for tests: unique names, removed when the guard drops, also when a test fails.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Error, Netns};

/// A namespace that is deleted when this guard goes out of scope.
#[derive(Debug)]
pub struct TempNetns {
    name: String,
    netns: Netns,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempNetns {
    /// Creates `<prefix>-<pid>-<n>`, unique across the processes and threads of a test run.
    pub fn new(prefix: &str) -> Result<Self, Error> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let netns = Netns::create(&name)?;
        Ok(Self { name, netns })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }
}

impl std::ops::Deref for TempNetns {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.netns
    }
}

impl Drop for TempNetns {
    fn drop(&mut self) {
        if let Err(e) = Netns::delete(&self.name) {
            eprintln!(
                "warning: could not remove test namespace {}: {e}",
                self.name
            );
        }
    }
}
