//! The Kubernetes source: reflectors over Nodes, Services, EndpointSlices and ServiceExports
//! (`multicluster.x-k8s.io/v1beta1`; required), ClusterProperties and ServiceCIDRs (optional: their APIs may be absent), and
//! with NetworkPolicy enforcement Namespaces, Pods and NetworkPolicies (required). Once
//! every required kind has listed, each change (debounced) rebuilds the cluster state from the
//! stores with [`crate::objects::source_state`].
//!
//! The watcher re-lists on `410 Gone` and retries with backoff when the API server goes away;
//! the stores keep the last listed state meanwhile, so nothing is withdrawn because the API
//! server restarted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, ServiceCIDR};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use trellis_core::cluster::{ClusterId, ServiceKey};
use trellis_core::imports::Imports;

use crate::crd::{ClusterProperty, Peer, ServiceExport};
use crate::hub::{Hub, MeshView};
use crate::objects::{ExportStatus, Objects};
use crate::static_source::StateSink;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Node,
    Service,
    EndpointSlice,
    ServiceExport,
    ClusterProperty,
    ServiceCidr,
    Namespace,
    Pod,
    NetworkPolicy,
    /// `trellis.dev/v1alpha1` Peer (optional: an older chart may not have the CRD).
    Peer,
    /// The preshared-key Secrets of the controller's namespace (optional: without the
    /// permission, peers that name one are refused and the rest work).
    Secret,
}

/// The label a Secret of the controller's namespace carries to be read as a peer's preshared
/// key (only such Secrets are listed: the controller keeps no other Secret in memory).
pub const PRESHARED_KEY_LABEL: &str = "trellis.dev/preshared-key";

/// The kinds NetworkPolicy needs, required (listed before anything is delivered) when the
/// controller enforces policy: a source that knows no pods yet must not say there are none.
const POLICY_KINDS: [Kind; 3] = [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy];

const REQUIRED: [Kind; 4] = [
    Kind::Node,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::ServiceExport,
];

type Tagged = (Kind, Result<bool, watcher::Error>);

/// A reflector for `K`, reporting `Ok(true)` when a (re)list completed.
fn reflect<K>(api: Api<K>, kind: Kind) -> (Store<K>, impl Stream<Item = Tagged> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .map(move |ev| (kind, ev.map(|e| matches!(e, watcher::Event::InitDone))));
    (reader, stream)
}

fn owned<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.state().iter().map(|k| (**k).clone()).collect()
}

/// The cluster ID from the ClusterProperty `cluster.clusterset.k8s.io` (KEP-2149), for a
/// controller configured without one.
pub async fn cluster_id(client: Client) -> Result<trellis_core::cluster::ClusterId, crate::Error> {
    let api: Api<ClusterProperty> = Api::all(client);
    let prop = api
        .get(crate::crd::CLUSTER_ID_PROPERTY)
        .await
        .map_err(|source| crate::Error::Kubernetes {
            operation: "reading the ClusterProperty cluster.clusterset.k8s.io",
            source,
        })?;
    prop.spec
        .value
        .parse()
        .map_err(|source| crate::Error::ClusterIdProperty { source })
}

/// Runs until cancelled, delivering the cluster's state to the hub after every change, and
/// keeps the ServiceExports' conditions (`Valid`, `Ready`, `Conflict`) up to date with the
/// objects and the hub's view of the clusterset.
/// With `network_policy`, Namespaces, Pods and NetworkPolicies are watched too.
pub async fn run(client: Client, hub: Hub, network_policy: bool, namespace: String) {
    let (tx, rx) = tokio::sync::watch::channel(ExportStatuses::new());
    let writer = tokio::spawn(write_export_statuses(
        client.clone(),
        hub.id().clone(),
        rx,
        hub.subscribe_view(),
    ));
    let peer_writer = tokio::spawn(write_peer_statuses(client.clone(), hub.subscribe_view()));
    let options = SourceOptions {
        debounce: Duration::from_millis(100),
        network_policy,
        preshared_key_namespace: Some(namespace),
    };
    run_with_status(client, hub, options, Some(tx)).await;
    writer.abort();
    peer_writer.abort();
}

pub const CONDITION_VALID: &str = "Valid";
pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_CONFLICT: &str = "Conflict";
/// The reason of the Event a ServiceExport gets when it enters conflict.
pub const EVENT_CONFLICT: &str = "ServiceExportConflict";

/// The conditions a ServiceExport should have (transition times unset): `Valid` from the
/// objects; `Ready` (`Exported` once the clusterset's imports hold this cluster's export,
/// `Pending` before, `Failed` if invalid); and, once imported, `Conflict` (`True` with the
/// reasons the exports disagree on, naming the cluster whose export won; `NoConflicts`
/// otherwise). `imports` is `None` until the mesh view exists.
pub fn export_conditions(
    local: &ClusterId,
    key: &ServiceKey,
    status: &ExportStatus,
    imports: Option<&Imports>,
) -> Vec<Condition> {
    let cond = crate::import_writer::condition;
    let mut out = vec![cond(
        CONDITION_VALID,
        status.valid,
        status.reason,
        status.message.clone(),
    )];
    if !status.valid {
        out.push(cond(
            CONDITION_READY,
            false,
            "Failed",
            format!("not exported: {}", status.message),
        ));
        return out;
    }
    let import = imports
        .and_then(|i| i.services.get(&key.to_string()))
        .filter(|i| i.backends.iter().any(|b| &b.cluster == local));
    let Some(import) = import else {
        out.push(cond(
            CONDITION_READY,
            false,
            "Pending",
            format!("Service {key} is being exported to the clusterset"),
        ));
        return out;
    };
    out.push(cond(
        CONDITION_READY,
        true,
        "Exported",
        format!(
            "Service {key} is exported to the clusterset by {} cluster(s)",
            import.backends.len()
        ),
    ));
    out.push(match import.conflict_reason() {
        Some(reason) => cond(
            CONDITION_CONFLICT,
            true,
            &reason,
            format!(
                "the exports of {key} disagree ({reason}); the oldest export, cluster {}'s, \
                 wins",
                import.oldest
            ),
        ),
        None => cond(
            CONDITION_CONFLICT,
            false,
            "NoConflicts",
            format!("every export of {key} agrees"),
        ),
    });
    out
}

fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// Whether a ServiceExport whose conditions were `previous` enters conflict with `next`.
pub fn entered_conflict(previous: &[Condition], next: &[Condition]) -> bool {
    !is_true(previous, CONDITION_CONFLICT) && is_true(next, CONDITION_CONFLICT)
}

/// Server-side applies the conditions of each ServiceExport whose conditions changed, from
/// its objects' status and the hub's imports, and emits an Event on a ServiceExport when it
/// enters conflict; runs until the statuses' sender is dropped.
pub async fn write_export_statuses(
    client: Client,
    local: ClusterId,
    mut rx: tokio::sync::watch::Receiver<ExportStatuses>,
    mut view: tokio::sync::watch::Receiver<Option<std::sync::Arc<MeshView>>>,
) {
    use kube::api::{Patch, PatchParams};
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let pp = PatchParams::apply(crate::import_writer::FIELD_MANAGER).force();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: crate::import_writer::FIELD_MANAGER.into(),
            instance: None,
        },
    );
    let mut applied: BTreeMap<ServiceKey, Vec<Condition>> = BTreeMap::new();
    let mut view_open = true;
    loop {
        let current = rx.borrow_and_update().clone();
        let mesh = view.borrow_and_update().clone();
        for (key, status) in &current {
            let mut conditions =
                export_conditions(&local, key, status, mesh.as_ref().map(|v| &*v.imports));
            let previous = applied
                .get(key)
                .cloned()
                .unwrap_or_else(|| status.conditions.clone());
            crate::import_writer::stamp_conditions(
                &mut conditions,
                &previous,
                crate::import_writer::now(),
            );
            if conditions == previous {
                applied.insert(key.clone(), conditions);
                continue;
            }
            let patch = serde_json::json!({
                "apiVersion": crate::crd::API_VERSION,
                "kind": "ServiceExport",
                "status": {"conditions": conditions},
            });
            let api: Api<ServiceExport> = Api::namespaced(client.clone(), &key.namespace);
            match api
                .patch_status(&key.name, &pp, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {
                    if entered_conflict(&previous, &conditions) {
                        let conflict = conditions.iter().find(|c| c.type_ == CONDITION_CONFLICT);
                        let event = Event {
                            type_: EventType::Warning,
                            reason: EVENT_CONFLICT.into(),
                            note: conflict.map(|c| format!("{}: {}", c.reason, c.message)),
                            action: "Export".into(),
                            secondary: None,
                        };
                        let reference = ObjectReference {
                            api_version: Some(crate::crd::API_VERSION.into()),
                            kind: Some("ServiceExport".into()),
                            name: Some(key.name.clone()),
                            namespace: Some(key.namespace.clone()),
                            uid: status.uid.clone(),
                            ..Default::default()
                        };
                        if let Err(e) = recorder.publish(&event, &reference).await {
                            tracing::warn!(service = %key, error = %trellis_core::error_chain(&e), "emitting a ServiceExport conflict Event");
                        }
                    }
                    applied.insert(key.clone(), conditions);
                }
                Err(e) => {
                    tracing::warn!(service = %key, error = %trellis_core::error_chain(&e), "writing a ServiceExport's conditions")
                }
            }
        }
        applied.retain(|k, _| current.contains_key(k));
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            r = view.changed(), if view_open => if r.is_err() { view_open = false },
        }
    }
}

/// The preshared keys the labelled Secrets hold (`data.presharedKey`, the key's base64 text),
/// by Secret name; a Secret without one is left out (its peer is refused, saying so).
pub fn preshared_keys(secrets: &[Secret]) -> BTreeMap<String, String> {
    secrets
        .iter()
        .filter_map(|secret| {
            let name = secret.metadata.name.clone()?;
            let bytes = secret.data.as_ref()?.get(crate::crd::PRESHARED_KEY_FIELD)?;
            let text = String::from_utf8(bytes.0.clone()).ok()?;
            Some((name, text.trim().to_string()))
        })
        .collect()
}

/// The `Ready` condition of a Peer from its verdict (transition time unset).
pub fn peer_condition(verdict: &trellis_core::external_peer::Verdict) -> Condition {
    crate::import_writer::condition(
        CONDITION_READY,
        verdict.ready,
        &verdict.reason,
        verdict.message.clone(),
    )
}

/// Server-side applies each Peer's `Ready` condition when its verdict changes (the previous
/// transition time read from the object the first time); runs until the view closes.
pub async fn write_peer_statuses(
    client: Client,
    mut view: tokio::sync::watch::Receiver<Option<std::sync::Arc<MeshView>>>,
) {
    use kube::api::{Patch, PatchParams};
    let api: Api<Peer> = Api::all(client);
    let pp = PatchParams::apply(crate::import_writer::FIELD_MANAGER).force();
    // What was applied to each Peer, by name, with the uid of the object it went to: a Peer
    // re-created under its name is another object, whose conditions are read and written
    // afresh even when its verdict is the same.
    let mut applied: BTreeMap<String, (Option<String>, Vec<Condition>)> = BTreeMap::new();
    loop {
        let admission = view
            .borrow_and_update()
            .as_ref()
            .map(|v| v.external_peers.clone());
        if let Some(admission) = admission {
            for (name, verdict) in &admission.verdicts {
                let uid = admission.uids.get(name).cloned();
                let previous = match applied.get(name) {
                    Some((applied_to, previous)) if *applied_to == uid => previous.clone(),
                    _ => match api.get_opt(name).await {
                        // The object under the name is not (yet) the one judged: the source
                        // sends its verdict when it catches up.
                        Ok(Some(peer)) if uid.is_some() && peer.metadata.uid != uid => continue,
                        Ok(Some(peer)) => peer.status.map(|s| s.conditions).unwrap_or_default(),
                        // Deleted since the source saw it.
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::warn!(peer = %name, error = %trellis_core::error_chain(&e), "reading a Peer's conditions");
                            continue;
                        }
                    },
                };
                let mut conditions = vec![peer_condition(verdict)];
                crate::import_writer::stamp_conditions(
                    &mut conditions,
                    &previous,
                    crate::import_writer::now(),
                );
                if conditions == previous {
                    applied.insert(name.clone(), (uid, conditions));
                    continue;
                }
                let mut patch = serde_json::json!({
                    "apiVersion": "trellis.dev/v1alpha1",
                    "kind": "Peer",
                    "status": {"conditions": conditions},
                });
                // The uid makes the write a precondition: the API server refuses it if the
                // name now holds another object.
                if let Some(uid) = &uid {
                    patch["metadata"] = serde_json::json!({"uid": uid});
                }
                match api.patch_status(name, &pp, &Patch::Apply(&patch)).await {
                    Ok(_) => {
                        applied.insert(name.clone(), (uid, conditions));
                    }
                    Err(e) => {
                        tracing::warn!(peer = %name, error = %trellis_core::error_chain(&e), "writing a Peer's conditions")
                    }
                }
            }
            applied.retain(|name, _| admission.verdicts.contains_key(name));
        }
        if view.changed().await.is_err() {
            return;
        }
    }
}

/// How the source runs: the debounce interval (tests use a short one) and whether it
/// watches what NetworkPolicy needs.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub debounce: Duration,
    pub network_policy: bool,
    /// Where peers' preshared-key Secrets are read (the controller's namespace); `None`:
    /// nowhere, so peers that name one are refused.
    pub preshared_key_namespace: Option<String>,
}

/// As [`run`], with the debounce interval (tests use a short one), without policy.
pub async fn run_with(client: Client, sink: impl StateSink, debounce: Duration) {
    let options = SourceOptions {
        debounce,
        network_policy: false,
        preshared_key_namespace: None,
    };
    run_with_status(client, sink, options, None).await
}

/// As [`run`], with explicit options and without the export conditions.
pub async fn run_with_options(client: Client, sink: impl StateSink, options: SourceOptions) {
    run_with_status(client, sink, options, None).await
}

/// The ServiceExports' `Valid` conditions (and the conditions they have), published after
/// every rebuild.
pub type ExportStatuses = BTreeMap<ServiceKey, ExportStatus>;

/// As [`run_with`], also publishing every ServiceExport's condition on `statuses`.
pub async fn run_with_status(
    client: Client,
    sink: impl StateSink,
    options: SourceOptions,
    statuses: Option<tokio::sync::watch::Sender<ExportStatuses>>,
) {
    let debounce = options.debounce;
    let (nodes, s1) = reflect(Api::<Node>::all(client.clone()), Kind::Node);
    let (services, s2) = reflect(Api::<Service>::all(client.clone()), Kind::Service);
    let (slices, s3) = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        Kind::EndpointSlice,
    );
    let (exports, s4) = reflect(
        Api::<ServiceExport>::all(client.clone()),
        Kind::ServiceExport,
    );
    let (props, s5) = reflect(
        Api::<ClusterProperty>::all(client.clone()),
        Kind::ClusterProperty,
    );
    let (cidrs, s6) = reflect(Api::<ServiceCIDR>::all(client.clone()), Kind::ServiceCidr);
    let (peers, s10) = reflect(Api::<Peer>::all(client.clone()), Kind::Peer);
    let mut streams = vec![
        s1.boxed(),
        s2.boxed(),
        s3.boxed(),
        s4.boxed(),
        s5.boxed(),
        s6.boxed(),
        s10.boxed(),
    ];
    let secrets = options.preshared_key_namespace.as_ref().map(|namespace| {
        let api = Api::<Secret>::namespaced(client.clone(), namespace);
        let (reader, writer) = reflector::store::<Secret>();
        let config = watcher::Config::default().labels(PRESHARED_KEY_LABEL);
        let stream = reflector::reflector(writer, watcher(api, config))
            .default_backoff()
            .map(move |ev| {
                (
                    Kind::Secret,
                    ev.map(|e| matches!(e, watcher::Event::InitDone)),
                )
            });
        streams.push(stream.boxed());
        reader
    });
    let mut required: Vec<Kind> = REQUIRED.to_vec();
    let policy_stores = if options.network_policy {
        let (namespaces, s7) = reflect(Api::<Namespace>::all(client.clone()), Kind::Namespace);
        let (pods, s8) = reflect(Api::<Pod>::all(client.clone()), Kind::Pod);
        let (policies, s9) = reflect(Api::<NetworkPolicy>::all(client), Kind::NetworkPolicy);
        streams.extend([s7.boxed(), s8.boxed(), s9.boxed()]);
        required.extend(POLICY_KINDS);
        Some((namespaces, pods, policies))
    } else {
        None
    };
    let mut events = futures::stream::select_all(streams);
    let mut synced: BTreeSet<Kind> = BTreeSet::new();
    let mut failing: BTreeSet<Kind> = BTreeSet::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let ready = required.iter().all(|k| synced.contains(k));
        let sleep = async {
            match deadline {
                Some(d) if ready => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.next() => match ev {
                None => return,
                Some((kind, Ok(init_done))) => {
                    if failing.remove(&kind) {
                        tracing::info!(?kind, "watch recovered");
                    }
                    if init_done && synced.insert(kind) {
                        tracing::info!(?kind, "listed");
                    }
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + debounce);
                }
                Some((kind, Err(e))) => {
                    // Log once per outage, not once per retry.
                    if failing.insert(kind) {
                        tracing::warn!(?kind, error = %trellis_core::error_chain(&e), "watch failed; retrying with backoff, keeping the last state");
                    }
                }
            },
            () = sleep => {
                deadline = None;
                let mut objects = Objects {
                    nodes: owned(&nodes),
                    services: owned(&services),
                    endpoint_slices: owned(&slices),
                    service_exports: owned(&exports),
                    cluster_properties: owned(&props),
                    service_cidrs: owned(&cidrs),
                    peers: owned(&peers),
                    preshared_keys: secrets.as_ref().map(|s| preshared_keys(&owned(s))).unwrap_or_default(),
                    ..Objects::default()
                };
                if let Some((namespaces, pods, policies)) = &policy_stores {
                    objects.namespaces = owned(namespaces);
                    objects.pods = owned(pods);
                    objects.network_policies = owned(policies);
                }
                if let Some(tx) = &statuses {
                    tx.send_replace(crate::objects::export_statuses(&objects));
                }
                sink.set_source(crate::objects::source_state(&objects));
            }
        }
    }
}
