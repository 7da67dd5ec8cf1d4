//! The last applied plan, kept in the state directory beside the key, so a gateway that starts
//! again (after a crash, a restart or an upgrade) has its peers and routes back, and initiates
//! every handshake, before it hears from its controller; with it the policy inputs the node
//! enforced, so the restarted gateway replaces its policy table (in one transaction) with the
//! same rules before it is ready, rather than waiting for the controller.
//!
//! The file is the plan's JSON with one more key, `policy` (absent when the node enforces
//! none): `{"revision":…,"peers":[…],"routes":{…},"policy":{"node":"…","inputs":{…}}}`. A
//! file written before policy existed loads as a plan without policy.
//!
//! A newer plan always replaces an older one on disk: writes go through one task that takes
//! the latest plan whenever it changed (a `watch` channel), so a burst of deltas costs one
//! write, never blocks the reconciler, and never lands out of order.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trellis_core::gateway::GatewayPlan;

use crate::policy::NodePolicy;

/// What is stored: the plan, and the policy the node enforced with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPlan {
    #[serde(flatten)]
    pub plan: GatewayPlan,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<NodePolicy>,
}

/// The file's name inside the state directory.
pub const PLAN_FILE: &str = "last-plan.json";

/// Why a stored plan could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PlanStoreError {
    #[error("read the last plan {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse the last plan {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("write the last plan {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the last plan lives.
#[derive(Debug, Clone)]
pub struct PlanStore {
    path: PathBuf,
}

impl PlanStore {
    pub fn in_dir(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(PLAN_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored plan; `None` when there is none yet (a node's first start).
    pub fn load(&self) -> Result<Option<StoredPlan>, PlanStoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PlanStoreError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| PlanStoreError::Parse {
                path: self.path.clone(),
                source,
            })
    }

    /// Replaces the stored plan atomically ([`trellis_files::write_atomically`], owner only): a
    /// crash leaves the old plan or the new one.
    pub fn save(&self, plan: &StoredPlan) -> Result<(), PlanStoreError> {
        let write_err = |source| PlanStoreError::Write {
            path: self.path.clone(),
            source,
        };
        let text = serde_json::to_vec(plan).map_err(|e| write_err(std::io::Error::other(e)))?;
        trellis_files::write_atomically(&self.path, &text, 0o600).map_err(write_err)
    }

    /// Starts the writer task: every plan sent on the returned channel is stored, the latest
    /// one winning when several arrive during a write. Once the sender is dropped the task
    /// stores the last plan it has not yet written and ends: await it to flush.
    pub fn spawn_writer(
        self,
    ) -> (
        watch::Sender<Option<StoredPlan>>,
        tokio::task::JoinHandle<()>,
    ) {
        let (sender, mut plans) = watch::channel::<Option<StoredPlan>>(None);
        let task = tokio::spawn(async move {
            while plans.changed().await.is_ok() {
                let Some(plan) = plans.borrow_and_update().clone() else {
                    continue;
                };
                let store = self.clone();
                match tokio::task::spawn_blocking(move || store.save(&plan)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("{}", crate::error::chain(&e)),
                    Err(e) => {
                        tracing::warn!("store the last plan: {}", trellis_core::error_chain(&e))
                    }
                }
            }
        });
        (sender, task)
    }
}

#[cfg(test)]
mod tests {
    use trellis_core::gateway::{PodRoute, TunnelPeer};
    use trellis_core::wgkey::PublicKey;

    use super::*;

    fn plan(revision: u64) -> StoredPlan {
        StoredPlan {
            plan: gateway_plan(revision),
            policy: Some(NodePolicy {
                node: "node-0".into(),
                inputs: trellis_core::policy::PolicyInputs::new("c1".parse().unwrap()),
            }),
        }
    }

    fn gateway_plan(revision: u64) -> GatewayPlan {
        GatewayPlan {
            revision,
            peers: vec![TunnelPeer {
                name: "c2/node-0".into(),
                public_key: PublicKey([7; 32]),
                endpoint: Some("198.18.2.10:51820".parse().unwrap()),
                allowed_ips: vec!["10.2.0.0/24".parse().unwrap()],
                persistent_keepalive: Some(25),
                preshared_key: None,
            }],
            routes: [
                ("10.2.0.0/24".parse().unwrap(), PodRoute::Tunnel),
                (
                    "10.1.1.0/24".parse().unwrap(),
                    PodRoute::Via("198.18.1.11".parse().unwrap()),
                ),
            ]
            .into(),
        }
    }

    #[test]
    fn a_saved_plan_loads_back_equal_and_none_before_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = PlanStore::in_dir(dir.path());
        assert!(store.load().unwrap().is_none());
        store.save(&plan(3)).unwrap();
        store.save(&plan(4)).unwrap();
        assert_eq!(store.load().unwrap(), Some(plan(4)));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(store.path()).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "private to the gateway: {mode:o}");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
    }

    #[test]
    fn a_plan_stored_before_policy_existed_loads_without_policy() {
        let dir = tempfile::tempdir().unwrap();
        let store = PlanStore::in_dir(dir.path());
        fs::write(store.path(), serde_json::to_vec(&gateway_plan(2)).unwrap()).unwrap();
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(loaded.plan, gateway_plan(2));
        assert_eq!(loaded.policy, None);
        // And the new file is the plan's JSON with a `policy` key.
        store.save(&plan(3)).unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(store.path()).unwrap()).unwrap();
        assert_eq!(value["revision"], 3);
        assert_eq!(value["policy"]["node"], "node-0");
        assert_eq!(value["policy"]["inputs"]["cluster"], "c1");
    }

    #[test]
    fn a_broken_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = PlanStore::in_dir(dir.path());
        fs::write(store.path(), "{ half").unwrap();
        let error = store.load().unwrap_err();
        assert!(error.to_string().contains(PLAN_FILE), "{error}");
    }

    #[tokio::test]
    async fn the_writer_stores_the_latest_plan() {
        let dir = tempfile::tempdir().unwrap();
        let store = PlanStore::in_dir(dir.path());
        let (writer, task) = store.clone().spawn_writer();
        for revision in 1..=20 {
            writer.send_replace(Some(plan(revision)));
        }
        // Dropping the sender flushes: the task writes what it has not yet, then ends.
        drop(writer);
        task.await.unwrap();
        assert_eq!(store.load().unwrap(), Some(plan(20)));
    }
}
