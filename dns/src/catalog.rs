//! The published snapshot (zone + precomputed answers), swapped atomically, and its sources:
//! an in-process handle (the controller's stream, tests) and a watched JSON file. Until the
//! first publish the snapshot is "not loaded": in-zone names get SERVFAIL and the server is
//! not ready.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use tracing::{info, warn};

use crate::Error;
use crate::fast::FastTable;
use crate::metrics::Metrics;
use crate::model::Catalog;
use crate::zone::{Skipped, Zone, ZoneConfig};

/// What the server answers from: built once per catalog, read lock-free per query.
#[derive(Debug)]
pub struct Snapshot {
    /// The records.
    pub zone: Zone,
    /// The same, precomputed in wire format.
    pub fast: FastTable,
}

/// Publishes catalogs; every clone sees the latest one. A query sees one whole snapshot, and
/// the next query after a publish sees the new one: a removed endpoint is gone at once.
#[derive(Clone, Debug)]
pub struct ZoneHandle {
    current: Arc<ArcSwap<Snapshot>>,
    config: ZoneConfig,
    edns_udp_size: u16,
    metrics: Option<Metrics>,
}

impl ZoneHandle {
    /// A handle with no catalog yet: in-zone names get SERVFAIL until the first
    /// [`ZoneHandle::publish`].
    pub fn new(config: ZoneConfig, edns_udp_size: u16, metrics: Option<Metrics>) -> Self {
        let zone = Zone::not_loaded(config.clone());
        let fast = FastTable::default();
        if let Some(metrics) = &metrics {
            metrics.ready.set(0);
        }
        Self {
            current: Arc::new(ArcSwap::from_pointee(Snapshot { zone, fast })),
            config,
            edns_udp_size,
            metrics,
        }
    }

    /// Builds and swaps in `catalog`. Returns the services skipped as invalid.
    pub fn publish(&self, catalog: &Catalog) -> Vec<Skipped> {
        let zone = Zone::build(self.config.clone(), catalog);
        let fast = FastTable::build(&zone, self.edns_udp_size);
        let skipped = zone.skipped().to_vec();
        if let Some(metrics) = &self.metrics {
            metrics.services.set(zone.services() as i64);
            metrics.fast_answers.set(fast.len() as i64);
        }
        for skipped in &skipped {
            warn!(%skipped, "skipped an invalid service");
        }
        self.current.store(Arc::new(Snapshot { zone, fast }));
        // After the store: ready means queries see the catalog.
        if let Some(metrics) = &self.metrics {
            metrics.ready.set(1);
        }
        skipped
    }

    /// Whether a catalog has been published (there is no way back: a later failure of the
    /// source keeps the last catalog).
    pub fn is_ready(&self) -> bool {
        self.current.load().zone.is_loaded()
    }

    /// The current snapshot.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The UDP payload size the snapshot was built for.
    pub fn edns_udp_size(&self) -> u16 {
        self.edns_udp_size
    }
}

/// Reads the catalog file (the IO edge).
pub fn read_catalog(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::ReadCatalog {
        path: path.display().to_string(),
        source,
    })
}

/// Watches `path`: every `poll`, publishes its content when it changed and parses. A missing
/// or invalid file keeps the last good catalog (logged and counted). Works with atomic
/// renames and Kubernetes ConfigMap symlink swaps, which inotify on the file would miss.
pub async fn watch_file(handle: ZoneHandle, path: PathBuf, poll: Duration, metrics: Metrics) {
    let mut last: Option<String> = None;
    let mut interval = tokio::time::interval(poll);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let text = match read_catalog(&path) {
            Ok(text) => text,
            Err(error) => {
                if last.is_some()
                    || metrics
                        .catalog_loads
                        .with_label_values(&["unreadable"])
                        .get()
                        == 0
                {
                    warn!(error = %trellis_core::error_chain(&error), "catalog file unreadable, keeping the last catalog");
                }
                metrics
                    .catalog_loads
                    .with_label_values(&["unreadable"])
                    .inc();
                last = None;
                continue;
            }
        };
        if last.as_deref() == Some(text.as_str()) {
            continue;
        }
        match Catalog::from_json(&text) {
            Ok(catalog) => {
                // Building the zone and its precomputed answers is CPU work: off the runtime.
                let started = std::time::Instant::now();
                let (revision, services) = (catalog.revision, catalog.services.len());
                let publisher = handle.clone();
                let Ok(skipped) =
                    tokio::task::spawn_blocking(move || publisher.publish(&catalog)).await
                else {
                    metrics.catalog_loads.with_label_values(&["invalid"]).inc();
                    continue;
                };
                metrics.catalog_loads.with_label_values(&["ok"]).inc();
                info!(
                    revision,
                    services,
                    skipped = skipped.len(),
                    build_ms = started.elapsed().as_millis() as u64,
                    "catalog published"
                );
            }
            Err(error) => {
                metrics.catalog_loads.with_label_values(&["invalid"]).inc();
                warn!(error = %trellis_core::error_chain(&error), "invalid catalog file, keeping the last catalog");
            }
        }
        last = Some(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not ready until the first publish, even of an empty catalog; ready for good after.
    #[test]
    fn ready_from_the_first_publish_on() {
        let metrics = Metrics::new().unwrap();
        let handle = ZoneHandle::new(
            ZoneConfig::new("clusterset.local", 5).unwrap(),
            1232,
            Some(metrics.clone()),
        );
        assert!(!handle.is_ready() && !handle.load().zone.is_loaded());
        assert!(handle.load().fast.is_empty());
        assert_eq!(metrics.ready.get(), 0);
        handle.publish(&Catalog::default());
        assert!(handle.is_ready());
        assert_eq!(metrics.ready.get(), 1);
        let clone = handle.clone();
        clone.publish(&Catalog::default());
        assert!(handle.is_ready() && clone.is_ready());
    }
}
