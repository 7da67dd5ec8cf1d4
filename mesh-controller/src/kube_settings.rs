//! Runtime settings on Kubernetes: the ConfigMap (by default `trellis-system/trellis-controller`)
//! whose `nodeEncryption` key (`"true"` or `"false"`) switches node-to-node encryption for the
//! whole cluster without a restart. A missing key or ConfigMap keeps the current mode; an
//! invalid value is logged and ignored.

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::hub::Hub;

pub const NODE_ENCRYPTION_KEY: &str = "nodeEncryption";

/// A setting the ConfigMap holds but that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("{NODE_ENCRYPTION_KEY} must be \"true\" or \"false\", not {value:?}")]
    NodeEncryption { value: String },
}

/// The node-encryption mode the ConfigMap asks for; `Ok(None)` if it does not say.
pub fn node_encryption_of(cm: &ConfigMap) -> Result<Option<bool>, SettingError> {
    let Some(value) = cm.data.as_ref().and_then(|d| d.get(NODE_ENCRYPTION_KEY)) else {
        return Ok(None);
    };
    match value.trim() {
        "true" => Ok(Some(true)),
        "false" => Ok(Some(false)),
        other => Err(SettingError::NodeEncryption {
            value: other.to_owned(),
        }),
    }
}

/// Follows the ConfigMap until cancelled, applying its node-encryption mode to the hub.
pub async fn run(client: Client, namespace: String, name: String, hub: Hub) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api, cfg)
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut failing = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(cm) => {
                failing = false;
                match node_encryption_of(&cm) {
                    Ok(Some(on)) => hub.set_node_encryption(on),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(%namespace, %name, error = %e, "ignoring the setting")
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(%namespace, %name, error = %trellis_core::error_chain(&e), "watching the settings ConfigMap failed; retrying");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(v: Option<&str>) -> ConfigMap {
        ConfigMap {
            data: v.map(|v| [(NODE_ENCRYPTION_KEY.to_string(), v.to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn reads_the_mode_strictly() {
        assert_eq!(node_encryption_of(&cm(Some("true"))), Ok(Some(true)));
        assert_eq!(node_encryption_of(&cm(Some(" false\n"))), Ok(Some(false)));
        assert_eq!(node_encryption_of(&cm(None)), Ok(None));
        assert!(node_encryption_of(&cm(Some("yes"))).is_err());
    }
}
