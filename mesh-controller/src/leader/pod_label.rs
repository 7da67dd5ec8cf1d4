//! Traffic follows the leader by a pod label (Patroni's way): the replica that leads labels its
//! own Pod `trellis.dev/controller-leader: "true"` and takes the label off every other
//! controller pod of its namespace; a starting replica first takes it off its own pod (a
//! restarted container keeps its pod's labels). The Services that must reach the leader (the
//! agent port gateways and DNS dial, the peering Service, the one `trellis status` proxies to)
//! select the label, so readiness can mean "the process is healthy" on every replica.
//!
//! [`leader_patches`] is the pure rule; [`PodLabeler`] makes the API calls (JSON merge
//! patches); [`run`] keeps the label in step with this replica's role, retrying failures.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// The label the Services routing to the leader select.
pub const LEADER_LABEL: &str = "trellis.dev/controller-leader";

/// How often a leader checks the labels again after it set them (someone may have edited a
/// pod, or an old leader restarted with its label).
pub const RECHECK: Duration = Duration::from_secs(30);

/// One change to one pod's leader label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelPatch {
    pub pod: String,
    /// `true`: set the label to "true"; `false`: remove it.
    pub leader: bool,
}

/// A listed pod as far as the rule cares: its name and its leader label's value, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLabel {
    pub name: String,
    pub leader_label: Option<String>,
}

impl PodLabel {
    pub fn of(pod: &Pod) -> Option<Self> {
        Some(Self {
            name: pod.metadata.name.clone()?,
            leader_label: pod
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LEADER_LABEL))
                .cloned(),
        })
    }
}

/// What the leader `me` patches, given the controller pods listed: its own pod labelled
/// "true" unless it is already (also when the list misses it: it is patched by name), and the
/// label removed from every other pod that carries it, whatever its value. Sorted by pod.
pub fn leader_patches(pods: &[PodLabel], me: &str) -> Vec<LabelPatch> {
    let mut patches: Vec<LabelPatch> = pods
        .iter()
        .filter(|pod| pod.name != me && pod.leader_label.is_some())
        .map(|pod| LabelPatch {
            pod: pod.name.clone(),
            leader: false,
        })
        .collect();
    let labelled = pods
        .iter()
        .any(|pod| pod.name == me && pod.leader_label.as_deref() == Some("true"));
    if !labelled {
        patches.push(LabelPatch {
            pod: me.to_owned(),
            leader: true,
        });
    }
    patches.sort_by(|a, b| a.pod.cmp(&b.pod));
    patches
}

/// The JSON merge patch for one change (`null` removes a label; removing an absent one is a
/// no-op, so a starting replica need not read its pod first).
pub fn merge_patch(leader: bool) -> serde_json::Value {
    let value = if leader { json!("true") } else { json!(null) };
    json!({"metadata": {"labels": {LEADER_LABEL: value}}})
}

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("listing the controller pods ({selector})")]
    List {
        selector: String,
        #[source]
        source: kube::Error,
    },
    #[error("{} the leader label on pod {pod}", if *.leader { "setting" } else { "removing" })]
    Patch {
        pod: String,
        leader: bool,
        #[source]
        source: kube::Error,
    },
    #[error("the pod API did not answer within {0:?}")]
    TimedOut(Duration),
}

/// This replica's pod and its peers': `me` in `namespace`, the others found by `selector`
/// (the chart's controller selector labels).
#[derive(Clone)]
pub struct PodLabeler {
    api: Api<Pod>,
    selector: String,
    me: String,
}

impl PodLabeler {
    pub fn new(client: kube::Client, namespace: &str, selector: &str, me: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            selector: selector.to_owned(),
            me: me.to_owned(),
        }
    }

    async fn patch(&self, change: &LabelPatch) -> Result<(), LabelError> {
        match self
            .api
            .patch(
                &change.pod,
                &PatchParams::default(),
                &Patch::Merge(merge_patch(change.leader)),
            )
            .await
        {
            Ok(_) => Ok(()),
            // A pod gone carries no label: nothing left to remove.
            Err(kube::Error::Api(status)) if status.code == 404 && !change.leader => Ok(()),
            Err(source) => Err(LabelError::Patch {
                pod: change.pod.clone(),
                leader: change.leader,
                source,
            }),
        }
    }

    /// Takes the label off this replica's own pod (at start, and when it stops leading).
    pub async fn unlabel_self(&self) -> Result<(), LabelError> {
        self.patch(&LabelPatch {
            pod: self.me.clone(),
            leader: false,
        })
        .await
    }

    /// Labels this replica's pod as the leader's and unlabels every other; returns the
    /// patches made. Stops at the first failure (the caller retries from a fresh list).
    pub async fn label_leader(&self) -> Result<Vec<LabelPatch>, LabelError> {
        let pods = self
            .api
            .list(&ListParams::default().labels(&self.selector))
            .await
            .map_err(|source| LabelError::List {
                selector: self.selector.clone(),
                source,
            })?;
        let listed: Vec<PodLabel> = pods.items.iter().filter_map(PodLabel::of).collect();
        if !listed.iter().any(|pod| pod.name == self.me) {
            tracing::warn!(pod = %self.me, selector = %self.selector, "this replica's pod is not among the pods leaderElection.podSelector lists; labelling it anyway");
        }
        let patches = leader_patches(&listed, &self.me);
        // Unlabel the others first: for a moment no pod leads rather than two.
        let (mine, others): (Vec<_>, Vec<_>) = patches.iter().partition(|p| p.leader);
        for change in others.into_iter().chain(mine) {
            self.patch(change).await?;
            tracing::info!(pod = %change.pod, leader = change.leader, "{}", if change.leader { "labelled the leader's pod" } else { "removed the leader label" });
        }
        Ok(patches)
    }
}

/// Keeps this replica's pod label in step with `leading` until cancelled: while following,
/// its own label removed (once); while leading, its pod labelled and the others unlabelled,
/// checked again every [`RECHECK`]. A failed call is logged, counted
/// (`trellis_controller_leader_label_failures_total`) and retried after `retry`; it never
/// stops the controller (traffic then reaches the old leader's pod, or none, until it works).
pub async fn run(
    labeler: PodLabeler,
    mut leading: watch::Receiver<bool>,
    retry: Duration,
    within: Duration,
    metrics: Metrics,
) {
    let mut last_error: Option<String> = None;
    loop {
        let lead = *leading.borrow_and_update();
        let outcome = if lead {
            tokio::time::timeout(within, labeler.label_leader())
                .await
                .unwrap_or(Err(LabelError::TimedOut(within)))
                .map(drop)
        } else {
            tokio::time::timeout(within, labeler.unlabel_self())
                .await
                .unwrap_or(Err(LabelError::TimedOut(within)))
        };
        let wait = match outcome {
            Ok(()) => {
                last_error = None;
                if lead { Some(RECHECK) } else { None }
            }
            Err(e) => {
                metrics.leader_label_failures.inc();
                let text = trellis_core::error_chain(&e);
                // Once per distinct error: a retry every period would flood the log.
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "leader pod label (retried)");
                    last_error = Some(text);
                }
                Some(retry)
            }
        };
        let changed = match wait {
            Some(wait) => tokio::time::timeout(wait, leading.changed())
                .await
                .unwrap_or(Ok(())),
            None => leading.changed().await,
        };
        if changed.is_err() {
            // The sender is gone: the controller is stopping.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, label: Option<&str>) -> PodLabel {
        PodLabel {
            name: name.into(),
            leader_label: label.map(str::to_owned),
        }
    }

    fn set(pod: &str) -> LabelPatch {
        LabelPatch {
            pod: pod.into(),
            leader: true,
        }
    }

    fn unset(pod: &str) -> LabelPatch {
        LabelPatch {
            pod: pod.into(),
            leader: false,
        }
    }

    #[test]
    fn a_new_leader_labels_itself_and_unlabels_the_old_one() {
        let pods = [pod("ctl-a", Some("true")), pod("ctl-b", None)];
        assert_eq!(
            leader_patches(&pods, "ctl-b"),
            vec![unset("ctl-a"), set("ctl-b")]
        );
    }

    #[test]
    fn nothing_to_do_when_only_the_leader_is_labelled() {
        let pods = [pod("ctl-a", None), pod("ctl-b", Some("true"))];
        assert_eq!(leader_patches(&pods, "ctl-b"), vec![]);
    }

    #[test]
    fn any_value_of_the_label_on_another_pod_is_removed_and_a_wrong_own_value_fixed() {
        let pods = [
            pod("ctl-a", Some("false")),
            pod("ctl-b", Some("yes")),
            pod("ctl-c", Some("true")),
        ];
        assert_eq!(
            leader_patches(&pods, "ctl-b"),
            vec![unset("ctl-a"), set("ctl-b"), unset("ctl-c")]
        );
    }

    #[test]
    fn a_leader_missing_from_the_list_still_labels_itself() {
        assert_eq!(leader_patches(&[], "ctl-b"), vec![set("ctl-b")]);
    }

    #[test]
    fn the_patches_set_or_remove_the_label() {
        assert_eq!(
            merge_patch(true),
            json!({"metadata": {"labels": {"trellis.dev/controller-leader": "true"}}})
        );
        assert_eq!(
            merge_patch(false),
            json!({"metadata": {"labels": {"trellis.dev/controller-leader": null}}})
        );
    }
}
