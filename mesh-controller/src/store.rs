//! What survives a controller restart: the last local state, the gateway registrations, the
//! remote states and the encryption mode. On start the controller serves them (remotes as
//! disconnected, expiring a lease later unless their peers reconnect) until its sources and
//! peers resync, so gateways and DNS are never told to drop what only looks gone.

use std::future::Future;
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

/// Where the last state is kept: a file ([`FileStore`], the lab and single replicas) or a
/// ConfigMap ([`ConfigMapStore`], replicas on Kubernetes: whichever leads next reads it).
pub trait StateStore: Send + Sync + 'static {
    fn load(&self) -> impl Future<Output = Result<Option<Persisted>, Error>> + Send;
    fn save(&self, state: &Persisted) -> impl Future<Output = Result<(), Error>> + Send;
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
    async fn load(&self) -> Result<Option<Persisted>, Error> {
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

    async fn save(&self, state: &Persisted) -> Result<(), Error> {
        let bytes = serde_json::to_vec(state).map_err(|source| Error::StoreEncode { source })?;
        trellis_files::write_atomically(&self.path, &bytes, 0o600)
            .map_err(store_err("replacing the state file", &self.path))
    }
}

/// The key of the state in its ConfigMap.
pub const CONFIG_MAP_KEY: &str = "state.json";

/// The largest state a ConfigMap takes: Kubernetes refuses objects over 1 MiB, and the
/// object's metadata needs some of it.
pub const CONFIG_MAP_MAX_BYTES: usize = 1024 * 1024 - 16 * 1024;

/// The field manager of the controller's writes of the state ConfigMap.
const STATE_FIELD_MANAGER: &str = "trellis-controller-state";

/// The state as key `state.json` of ConfigMap `name`, written with server-side apply (only
/// the leader writes it). A state too large for a ConfigMap is refused
/// ([`Error::StoreTooLarge`]) and the previous one kept.
#[derive(Clone)]
pub struct ConfigMapStore {
    api: kube::Api<k8s_openapi::api::core::v1::ConfigMap>,
    namespace: String,
    name: String,
    max_bytes: usize,
}

impl ConfigMapStore {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self::with_limit(client, namespace, name, CONFIG_MAP_MAX_BYTES)
    }

    /// With another size bound (tests).
    pub fn with_limit(client: kube::Client, namespace: &str, name: &str, max_bytes: usize) -> Self {
        Self {
            api: kube::Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            max_bytes,
        }
    }

    fn what(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl StateStore for ConfigMapStore {
    async fn load(&self) -> Result<Option<Persisted>, Error> {
        let cm = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| Error::Kubernetes {
                operation: "reading the state ConfigMap",
                source,
            })?;
        let Some(text) = cm.and_then(|cm| cm.data?.remove(CONFIG_MAP_KEY)) else {
            return Ok(None);
        };
        let p: Persisted =
            serde_json::from_str(&text).map_err(|source| Error::StoreConfigMapParse {
                config_map: self.what(),
                source,
            })?;
        if p.version != STORE_VERSION {
            return Err(Error::StoreConfigMapVersion {
                config_map: self.what(),
                found: p.version,
                expected: STORE_VERSION,
            });
        }
        Ok(Some(p))
    }

    async fn save(&self, state: &Persisted) -> Result<(), Error> {
        let text = serde_json::to_string(state).map_err(|source| Error::StoreEncode { source })?;
        if text.len() > self.max_bytes {
            return Err(Error::StoreTooLarge {
                bytes: text.len(),
                limit: self.max_bytes,
            });
        }
        let cm = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "labels": {"app.kubernetes.io/component": "controller-state"},
            },
            "data": {CONFIG_MAP_KEY: text},
        });
        self.api
            .patch(
                &self.name,
                &kube::api::PatchParams::apply(STATE_FIELD_MANAGER).force(),
                &kube::api::Patch::Apply(&cm),
            )
            .await
            .map_err(|source| Error::Kubernetes {
                operation: "writing the state ConfigMap",
                source,
            })?;
        Ok(())
    }
}

/// The store the configuration chose.
#[derive(Clone)]
pub enum AnyStore {
    File(FileStore),
    ConfigMap(Box<ConfigMapStore>),
}

impl StateStore for AnyStore {
    async fn load(&self) -> Result<Option<Persisted>, Error> {
        match self {
            AnyStore::File(s) => s.load().await,
            AnyStore::ConfigMap(s) => s.load().await,
        }
    }

    async fn save(&self, state: &Persisted) -> Result<(), Error> {
        match self {
            AnyStore::File(s) => s.save(state).await,
            AnyStore::ConfigMap(s) => s.save(state).await,
        }
    }
}

/// An in-memory store for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore(pub std::sync::Arc<std::sync::Mutex<Option<Persisted>>>);

impl StateStore for MemoryStore {
    async fn load(&self) -> Result<Option<Persisted>, Error> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    async fn save(&self, state: &Persisted) -> Result<(), Error> {
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
    metrics: crate::metrics::Metrics,
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
        match store.save(&p).await {
            Ok(()) => last = Some(p),
            Err(e) => {
                let reason = match e {
                    Error::StoreTooLarge { .. } => "too_large",
                    _ => "error",
                };
                metrics
                    .state_save_failures
                    .with_label_values(&[reason])
                    .inc();
                // Retried at the next period; `last` unchanged, so a state too large now
                // is saved once it shrinks.
                tracing::warn!(error = %trellis_core::error_chain(&e), "saving the state");
            }
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

    #[tokio::test]
    async fn the_file_store_round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore {
            path: dir.path().join("state.json"),
        };
        assert_eq!(store.load().await.unwrap(), None);
        store.save(&persisted()).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(persisted()));
        std::fs::write(&store.path, b"{not json").unwrap();
        assert!(
            store
                .load()
                .await
                .unwrap_err()
                .to_string()
                .contains("parsing the state file")
        );
        let mut old = serde_json::to_value(persisted()).unwrap();
        old["version"] = 99.into();
        std::fs::write(&store.path, old.to_string()).unwrap();
        assert!(store.load().await.is_err());
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
            crate::metrics::Metrics::new().unwrap(),
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
                    .await
                    .unwrap()
                    .is_some_and(|p| p.registrations.iter().any(|r| r.node == node))
                    .then_some(())
            },
        )
        .await;
        saver.abort();
    }
}
