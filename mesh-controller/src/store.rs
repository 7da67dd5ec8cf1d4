//! What survives a controller restart: the last local state, the gateway registrations, the
//! remote states and the encryption mode. On start the controller serves them (remotes as
//! disconnected, expiring a lease later unless their peers reconnect) until its sources and
//! peers resync, so gateways and DNS are never told to drop what only looks gone.

use std::path::PathBuf;
use std::time::Duration;

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use trellis_core::cluster::{ClusterId, ClusterState};

use crate::Error;
use crate::gateway::GatewayRegistration;

pub const STORE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub version: u32,
    pub local: ClusterState,
    pub registrations: Vec<GatewayRegistration>,
    pub remotes: Vec<ClusterState>,
    pub node_encryption: bool,
    /// The ranges each remote's certificate allowed at its last session, so its saved state
    /// is admitted the same way after a restart, before it reconnects.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub certificate_allowances: BTreeMap<ClusterId, Vec<IpNet>>,
}

/// The disk seam.
pub trait StateStore: Send + Sync + 'static {
    fn load(&self) -> Result<Option<Persisted>, Error>;
    fn save(&self, state: &Persisted) -> Result<(), Error>;
}

/// A JSON file replaced atomically (temp file, fsync, rename).
#[derive(Debug, Clone)]
pub struct FileStore {
    pub path: PathBuf,
}

fn store_err(operation: &'static str, path: &std::path::Path) -> impl Fn(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::StoreFile {
        operation,
        path: path.clone(),
        source,
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Result<Option<Persisted>, Error> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(store_err("reading the state file", &self.path)(e)),
        };
        let p: Persisted = serde_json::from_slice(&bytes).map_err(|source| Error::StoreParse {
            path: self.path.clone(),
            source,
        })?;
        if p.version != STORE_VERSION {
            return Err(Error::StoreVersion {
                path: self.path.clone(),
                found: p.version,
                expected: STORE_VERSION,
            });
        }
        Ok(Some(p))
    }

    fn save(&self, state: &Persisted) -> Result<(), Error> {
        let bytes = serde_json::to_vec(state).map_err(|source| Error::StoreEncode { source })?;
        trellis_files::write_atomically(&self.path, &bytes, 0o600)
            .map_err(store_err("replacing the state file", &self.path))
    }
}

/// An in-memory store for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore(pub std::sync::Arc<std::sync::Mutex<Option<Persisted>>>);

impl StateStore for MemoryStore {
    fn load(&self) -> Result<Option<Persisted>, Error> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn save(&self, state: &Persisted) -> Result<(), Error> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.clone());
        Ok(())
    }
}

/// Saves what `capture` returns when it changed, checking every `every`, and at once when a
/// gateway registration changed: a controller killed right after its gateways registered must
/// come back knowing their keys, or it would tell its peers to drop their tunnels until the
/// gateways find it again. `changes` fires whenever the local state changed (the hub's
/// `subscribe_local`). Runs until `changes` closes.
pub async fn run<T>(
    mut changes: tokio::sync::watch::Receiver<T>,
    capture: impl Fn() -> Option<Persisted>,
    store: impl StateStore,
    every: Duration,
) {
    // Whatever the hub holds already is looked at first.
    changes.mark_changed();
    let mut last: Option<Persisted> = None;
    loop {
        let periodic = tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            () = tokio::time::sleep(every) => true,
        };
        let Some(p) = capture() else { continue };
        let registrations_changed = last
            .as_ref()
            .is_none_or(|l| l.registrations != p.registrations);
        if !(periodic || registrations_changed) || last.as_ref() == Some(&p) {
            continue;
        }
        match store.save(&p) {
            Ok(()) => last = Some(p),
            Err(e) => tracing::warn!(error = %trellis_core::error_chain(&e), "saving the state"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::cluster::fixture::cluster;

    fn persisted() -> Persisted {
        Persisted {
            version: STORE_VERSION,
            local: cluster("a", "10.1.0.0/24", "10.96.0.0/16"),
            registrations: vec![],
            remotes: vec![cluster("b", "10.2.0.0/24", "10.97.0.0/16")],
            node_encryption: true,
            certificate_allowances: [("b".parse().unwrap(), vec!["10.2.0.0/16".parse().unwrap()])]
                .into(),
        }
    }

    #[test]
    fn the_file_store_round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore {
            path: dir.path().join("state.json"),
        };
        assert_eq!(store.load().unwrap(), None);
        store.save(&persisted()).unwrap();
        assert_eq!(store.load().unwrap(), Some(persisted()));
        std::fs::write(&store.path, b"{not json").unwrap();
        assert!(
            store
                .load()
                .unwrap_err()
                .to_string()
                .contains("parsing the state file")
        );
        let mut old = serde_json::to_value(persisted()).unwrap();
        old["version"] = 99.into();
        std::fs::write(&store.path, old.to_string()).unwrap();
        assert!(store.load().is_err());
    }

    #[tokio::test]
    async fn a_gateway_registration_is_saved_at_once() {
        let hub = crate::hub::Hub::new(
            crate::hub::HubConfig {
                id: "a".parse().unwrap(),
                name: "a".into(),
                service_cidrs: vec![],
                lease: Duration::from_secs(30),
                node_encryption: false,
                recent_deltas: 4,
                startup_grace: Duration::ZERO,
            },
            crate::metrics::Metrics::new().unwrap(),
        );
        let store = MemoryStore::default();
        // The period is an hour: only the registration itself can trigger the save.
        let captured = hub.clone();
        let saver = tokio::spawn(run(
            hub.subscribe_local(),
            move || captured.persisted(),
            store.clone(),
            Duration::from_secs(3600),
        ));
        let mut source = crate::source::SourceState {
            cluster_id: None,
            service_cidrs: vec![],
            nodes: Default::default(),
            services: Default::default(),
            ..Default::default()
        };
        source.nodes = cluster("a", "10.1.0.0/24", "10.96.0.0/16").nodes;
        let node = source.nodes.keys().next().unwrap().clone();
        hub.set_source(source);
        hub.register_gateway(trellis_core::agent::GatewayRegistration {
            node: node.clone(),
            endpoint: "192.168.1.10:51820".parse().unwrap(),
            public_key: trellis_core::cluster::PublicKey([7; 32]),
        });
        // The period is an hour: reaching the store within seconds means the registration
        // itself triggered the save.
        trellis_test_support::eventually_async(
            "the registration to reach the store",
            Duration::from_secs(20),
            || async {
                store
                    .load()
                    .unwrap()
                    .is_some_and(|p| p.registrations.iter().any(|r| r.node == node))
                    .then_some(())
            },
        )
        .await;
        saver.abort();
    }
}
