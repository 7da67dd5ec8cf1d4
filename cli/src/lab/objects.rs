//! The Kubernetes objects of a lab cluster, pure: what `trellis lab apply` reads (multi-document
//! YAML of Namespaces, Pods, NetworkPolicies, Services and ServiceExports), how applying or
//! deleting them changes the cluster's records (which pods to create, recreate or remove),
//! and the objects as the cluster's static source holds them — as the API server would, with
//! each namespace's `kubernetes.io/metadata.name` label and each pod's IP in its status.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::cluster::Protocol;
use trellis_core::policy::NAMESPACE_NAME_LABEL;

pub type Labels = BTreeMap<String, String>;

/// The namespace of the lab's own pods; it always exists, as in every Kubernetes cluster.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Namespaces every lab cluster has without applying them.
pub const BUILT_IN_NAMESPACES: [&str; 2] = [DEFAULT_NAMESPACE, super::services::DEMO_NAMESPACE];

/// A container port a pod declares, which its echo server serves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A Pod as applied: what decides whether it must be recreated is `node` and `ports`; its
/// labels can change in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    /// `spec.nodeName` when the manifest names one.
    #[serde(default)]
    pub node: Option<String>,
    pub ports: Vec<ContainerPort>,
}

impl PodSpec {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `other` is the same pod with a different spec (the pod must be recreated, as
    /// Kubernetes forbids changing a running pod's node or ports).
    pub fn needs_recreate(&self, other: &PodSpec) -> bool {
        self.node != other.node || self.ports != other.ports
    }
}

/// An applied pod and what the lab made of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedPod {
    pub spec: PodSpec,
    /// The node it runs on (`spec.node`, or the one the lab chose).
    pub node: String,
    pub netns: String,
    pub container_id: String,
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// The CNI result of ADD, kept for DEL.
    #[serde(default)]
    pub cni_result: Option<Value>,
}

/// One object of a manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    Namespace {
        name: String,
        labels: Labels,
    },
    Pod(PodSpec),
    /// A namespaced object the lab passes to the source as given (NetworkPolicy, Service,
    /// ServiceExport), in canonical JSON.
    Passed {
        kind: PassedKind,
        namespace: String,
        name: String,
        document: Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PassedKind {
    NetworkPolicy,
    Service,
    ServiceExport,
    /// `trellis.dev/v1alpha1` Peer: cluster-scoped (its namespace is empty).
    Peer,
}

impl Manifest {
    /// `namespace/x`, `pod/x/a`, `networkpolicy/x/deny`: how messages name it.
    pub fn describe(&self) -> String {
        match self {
            Manifest::Namespace { name, .. } => format!("namespace/{name}"),
            Manifest::Pod(pod) => format!("pod/{}", pod.key()),
            Manifest::Passed {
                kind,
                namespace,
                name,
                ..
            } if namespace.is_empty() => {
                format!("{}/{name}", format!("{kind:?}").to_ascii_lowercase())
            }
            Manifest::Passed {
                kind,
                namespace,
                name,
                ..
            } => format!(
                "{}/{namespace}/{name}",
                format!("{kind:?}").to_ascii_lowercase()
            ),
        }
    }
}

/// The objects applied to one cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterObjects {
    /// Applied namespaces and their labels (the name label is added when rendered).
    #[serde(default)]
    pub namespaces: BTreeMap<String, Labels>,
    /// By `namespace/name`.
    #[serde(default)]
    pub pods: BTreeMap<String, AppliedPod>,
    /// NetworkPolicies, Services and ServiceExports by kind and `namespace/name`.
    #[serde(default)]
    pub passed: BTreeMap<PassedKind, BTreeMap<String, Value>>,
}

/// A DNS-1123 label: what the lab accepts as a namespace or pod name (it names files and
/// network namespaces after them).
pub fn validate_name(what: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("{what} name {name:?} must be 1-63 characters of a-z, 0-9 and '-' (a DNS label)");
    }
    Ok(())
}

fn protocol(text: Option<&str>) -> anyhow::Result<Protocol> {
    match text.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => bail!("protocol {other:?} (TCP, UDP or SCTP)"),
    }
}

fn pod_spec(pod: Pod) -> anyhow::Result<PodSpec> {
    let name = pod.metadata.name.context("a Pod without metadata.name")?;
    let namespace = pod
        .metadata
        .namespace
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    validate_name("pod", &name)?;
    validate_name("namespace", &namespace)?;
    let spec = pod.spec.unwrap_or_default();
    let mut ports = Vec::new();
    for container in &spec.containers {
        for port in container.ports.iter().flatten() {
            let number = u16::try_from(port.container_port)
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| {
                    format!(
                        "pod {namespace}/{name}: containerPort {} is not 1-65535",
                        port.container_port
                    )
                })?;
            ports.push(ContainerPort {
                name: port.name.clone(),
                port: number,
                protocol: protocol(port.protocol.as_deref())
                    .with_context(|| format!("pod {namespace}/{name}"))?,
            });
        }
    }
    ports.sort_by(|a, b| (a.port, a.protocol, &a.name).cmp(&(b.port, b.protocol, &b.name)));
    if ports
        .windows(2)
        .any(|w| (w[0].port, w[0].protocol) == (w[1].port, w[1].protocol))
    {
        bail!("pod {namespace}/{name} declares a port and protocol twice");
    }
    Ok(PodSpec {
        namespace,
        name,
        labels: pod.metadata.labels.unwrap_or_default(),
        node: spec.node_name,
        ports,
    })
}

fn namespaced(metadata: &Value, kind: &str) -> anyhow::Result<(String, String)> {
    let name = metadata["name"]
        .as_str()
        .with_context(|| format!("a {kind} without metadata.name"))?
        .to_string();
    let namespace = metadata["namespace"]
        .as_str()
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_string();
    validate_name("namespace", &namespace)?;
    Ok((namespace, name))
}

/// A document as the source keeps it: its namespace filled in, its status dropped.
fn canonical(mut document: Value, namespace: &str) -> Value {
    if let Some(object) = document.as_object_mut() {
        object.remove("status");
        if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert("namespace".into(), Value::String(namespace.into()));
            for server_side in ["uid", "resourceVersion", "creationTimestamp", "generation"] {
                metadata.remove(server_side);
            }
        }
    }
    document
}

fn manifest(document: Value, index: usize) -> anyhow::Result<Option<Manifest>> {
    if document.is_null() {
        return Ok(None);
    }
    let kind = document["kind"].as_str().unwrap_or_default().to_string();
    let context = || format!("document {} ({kind})", index + 1);
    let parsed = match kind.as_str() {
        "Namespace" => {
            let namespace: Namespace = serde_json::from_value(document).with_context(context)?;
            let name = namespace
                .metadata
                .name
                .context("a Namespace without metadata.name")?;
            validate_name("namespace", &name)?;
            Manifest::Namespace {
                name,
                labels: namespace.metadata.labels.unwrap_or_default(),
            }
        }
        "Pod" => Manifest::Pod(pod_spec(
            serde_json::from_value(document).with_context(context)?,
        )?),
        "NetworkPolicy" | "Service" | "ServiceExport" => {
            let (namespace, name) = namespaced(&document["metadata"], &kind)?;
            let document = match kind.as_str() {
                // Checked and made canonical through the API types.
                "NetworkPolicy" => serde_json::to_value(
                    serde_json::from_value::<NetworkPolicy>(document).with_context(context)?,
                )?,
                "Service" => serde_json::to_value(
                    serde_json::from_value::<Service>(document).with_context(context)?,
                )?,
                _ => document,
            };
            let kind = match kind.as_str() {
                "NetworkPolicy" => PassedKind::NetworkPolicy,
                "Service" => PassedKind::Service,
                _ => PassedKind::ServiceExport,
            };
            Manifest::Passed {
                kind,
                document: canonical(document, &namespace),
                namespace,
                name,
            }
        }
        "Peer" => {
            let name = document["metadata"]["name"]
                .as_str()
                .context("a Peer without metadata.name")?
                .to_string();
            validate_name("peer", &name)?;
            let mut document = canonical(document, "");
            if let Some(metadata) = document["metadata"].as_object_mut() {
                metadata.remove("namespace");
            }
            Manifest::Passed {
                kind: PassedKind::Peer,
                namespace: String::new(),
                name,
                document,
            }
        }
        "" => bail!("document {} has no kind", index + 1),
        other => bail!(
            "document {}: the lab does not take kind {other:?} (Namespace, Pod, NetworkPolicy, Service, ServiceExport, Peer)",
            index + 1
        ),
    };
    Ok(Some(parsed))
}

/// Every object of a multi-document YAML file, in order (`List`s are flattened).
pub fn parse_manifests(yaml: &str) -> anyhow::Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let value =
            Value::deserialize(document).with_context(|| format!("document {}", index + 1))?;
        let items = if value["kind"] == "List" {
            value["items"].as_array().cloned().unwrap_or_default()
        } else {
            vec![value]
        };
        for item in items {
            out.extend(manifest(item, index)?);
        }
    }
    Ok(out)
}

/// What applying a manifest does to the cluster's pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodChanges {
    /// New pods, and pods to create again after `remove` took the old one down.
    pub create: Vec<AppliedPod>,
    /// Pods to take down (deleted, or recreated with a new spec).
    pub remove: Vec<AppliedPod>,
}

impl PodChanges {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.remove.is_empty()
    }
}

/// The cluster's node names and how many pods each runs, for placing new pods.
#[derive(Debug, Clone)]
pub struct Placement {
    /// In node order, with the pods each runs.
    pub load: Vec<(String, usize)>,
}

impl Placement {
    /// The named node (if it exists), else the least loaded one (the first of equals).
    fn place(&mut self, pod: &PodSpec) -> anyhow::Result<String> {
        let index = match &pod.node {
            Some(node) => self
                .load
                .iter()
                .position(|(name, _)| name == node)
                .with_context(|| {
                    format!(
                        "pod {}: no node {node:?} in the cluster (nodes: {})",
                        pod.key(),
                        self.load
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?,
            None => self
                .load
                .iter()
                .enumerate()
                .min_by_key(|(index, (_, load))| (*load, *index))
                .map(|(index, _)| index)
                .context("the cluster has no node")?,
        };
        self.load[index].1 += 1;
        Ok(self.load[index].0.clone())
    }

    fn unplace(&mut self, node: &str) {
        if let Some((_, load)) = self.load.iter_mut().find(|(name, _)| name == node) {
            *load = load.saturating_sub(1);
        }
    }
}

/// How the lab names a new pod's namespace and container.
pub trait PodNames {
    fn netns(&self, pod: &PodSpec) -> String;
    fn container_id(&self, pod: &PodSpec) -> String;
}

/// Applies `manifests` to `objects`: the objects afterwards and the pods to make or take
/// down. Applying what is already there changes nothing; a pod whose labels alone changed is
/// relabelled in place; one whose node or ports changed is recreated.
pub fn apply(
    objects: &ClusterObjects,
    manifests: &[Manifest],
    placement: &mut Placement,
    names: &dyn PodNames,
    reserved_pods: &[String],
) -> anyhow::Result<(ClusterObjects, PodChanges)> {
    let mut next = objects.clone();
    let mut changes = PodChanges::default();
    for manifest in manifests {
        match manifest {
            Manifest::Namespace { name, labels } => {
                next.namespaces.insert(name.clone(), labels.clone());
            }
            Manifest::Pod(spec) => {
                let key = spec.key();
                if spec.namespace == DEFAULT_NAMESPACE && reserved_pods.contains(&spec.name) {
                    bail!("pod {key} is one of the lab's own pods; give yours another name");
                }
                if !namespace_exists(&next, &spec.namespace) {
                    bail!(
                        "pod {key}: namespace {:?} not found (apply a Namespace first, or in the same file)",
                        spec.namespace
                    );
                }
                match next.pods.get_mut(&key) {
                    // A pod whose making did not finish (no address) is made again.
                    Some(existing)
                        if !existing.spec.needs_recreate(spec) && existing.address.is_some() =>
                    {
                        existing.spec.labels = spec.labels.clone();
                    }
                    existing => {
                        if let Some(old) = existing.cloned() {
                            placement.unplace(&old.node);
                            changes.create.retain(|p| p.spec.key() != key);
                            if objects.pods.contains_key(&key) {
                                changes.remove.retain(|p| p.spec.key() != key);
                                changes.remove.push(objects.pods[&key].clone());
                            }
                        }
                        let pod = AppliedPod {
                            node: placement.place(spec)?,
                            netns: names.netns(spec),
                            container_id: names.container_id(spec),
                            spec: spec.clone(),
                            address: None,
                            cni_result: None,
                        };
                        next.pods.insert(key, pod.clone());
                        changes.create.push(pod);
                    }
                }
            }
            Manifest::Passed {
                kind,
                namespace,
                name,
                document,
            } => {
                if *kind != PassedKind::Peer && !namespace_exists(&next, namespace) {
                    bail!(
                        "{}: namespace {namespace:?} not found (apply a Namespace first, or in the same file)",
                        manifest.describe()
                    );
                }
                next.passed
                    .entry(*kind)
                    .or_default()
                    .insert(format!("{namespace}/{name}"), document.clone());
            }
        }
    }
    Ok((next, changes))
}

/// Gives every passed object of `next` its `creationTimestamp` as the API server does: the
/// one it had in `previous` (an update keeps it), `now` when it is new. The oldest
/// ServiceExport wins a conflict between clusters (KEP-1645), so it must be known.
pub fn stamp_creation(
    previous: &ClusterObjects,
    next: &mut ClusterObjects,
    now: std::time::SystemTime,
) {
    let now_text = now
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|since| k8s_openapi::jiff::Timestamp::from_second(since.as_secs() as i64).ok())
        .map(|at| at.to_string());
    for (kind, documents) in &mut next.passed {
        for (key, document) in documents.iter_mut() {
            let kept = previous
                .passed
                .get(kind)
                .and_then(|old| old.get(key))
                .and_then(|old| old["metadata"].get("creationTimestamp").cloned());
            let stamp = match kept {
                Some(kept) => kept,
                None => match &now_text {
                    Some(now) => Value::String(now.clone()),
                    None => continue,
                },
            };
            if let Some(metadata) = document.get_mut("metadata").and_then(Value::as_object_mut) {
                metadata.insert("creationTimestamp".into(), stamp);
            }
        }
    }
}

fn namespace_exists(objects: &ClusterObjects, namespace: &str) -> bool {
    BUILT_IN_NAMESPACES.contains(&namespace) || objects.namespaces.contains_key(namespace)
}

/// Deletes `manifests` from `objects` (objects not there are skipped, as
/// `kubectl delete --ignore-not-found` does); deleting a namespace deletes everything in it.
/// Returns the objects afterwards, the pods to take down, and what was deleted.
pub fn delete(
    objects: &ClusterObjects,
    manifests: &[Manifest],
) -> anyhow::Result<(ClusterObjects, Vec<AppliedPod>, Vec<String>)> {
    let mut next = objects.clone();
    let mut deleted = Vec::new();
    for manifest in manifests {
        match manifest {
            Manifest::Namespace { name, .. } => {
                if BUILT_IN_NAMESPACES.contains(&name.as_str()) {
                    bail!("namespace {name:?} is the lab's own and cannot be deleted");
                }
                if next.namespaces.remove(name).is_some() {
                    deleted.push(manifest.describe());
                }
                let prefix = format!("{name}/");
                next.pods.retain(|key, _| !key.starts_with(&prefix));
                for documents in next.passed.values_mut() {
                    documents.retain(|key, _| !key.starts_with(&prefix));
                }
            }
            Manifest::Pod(spec) => {
                if next.pods.remove(&spec.key()).is_some() {
                    deleted.push(manifest.describe());
                }
            }
            Manifest::Passed {
                kind,
                namespace,
                name,
                ..
            } => {
                let key = format!("{namespace}/{name}");
                if next
                    .passed
                    .get_mut(kind)
                    .and_then(|documents| documents.remove(&key))
                    .is_some()
                {
                    deleted.push(manifest.describe());
                }
            }
        }
    }
    let removed = objects
        .pods
        .iter()
        .filter(|(key, _)| !next.pods.contains_key(*key))
        .map(|(_, pod)| pod.clone())
        .collect();
    Ok((next, removed, deleted))
}

/// One `key=value` (set) or `key-` (remove) of `trellis lab label`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelChange {
    Set(String, String),
    Remove(String),
}

pub fn parse_label_change(text: &str) -> anyhow::Result<LabelChange> {
    if let Some(key) = text.strip_suffix('-')
        && !key.contains('=')
    {
        return Ok(LabelChange::Remove(key.to_string()));
    }
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => {
            Ok(LabelChange::Set(key.to_string(), value.to_string()))
        }
        _ => bail!("label change {text:?}: use key=value to set or key- to remove"),
    }
}

pub fn relabel(labels: &mut Labels, changes: &[LabelChange]) {
    for change in changes {
        match change {
            LabelChange::Set(key, value) => {
                labels.insert(key.clone(), value.clone());
            }
            LabelChange::Remove(key) => {
                labels.remove(key);
            }
        }
    }
}

/// A Pod object as the source holds it.
pub fn pod_document(
    namespace: &str,
    name: &str,
    labels: &Labels,
    node: &str,
    ports: &[ContainerPort],
    address: Option<Ipv4Addr>,
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut port = json!({"containerPort": p.port, "protocol": p.protocol});
            if let Some(name) = &p.name {
                port["name"] = json!(name);
            }
            port
        })
        .collect();
    let mut document = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "echo", "image": "trellis", "ports": ports}]},
        "status": {"phase": "Pending"},
    });
    if let Some(address) = address {
        document["status"] = json!({
            "phase": "Running",
            "podIP": address.to_string(),
            "podIPs": [{"ip": address.to_string()}],
        });
    }
    document
}

/// A Namespace object as the API server holds it: with its name as a label.
pub fn namespace_document(name: &str, labels: &Labels) -> Value {
    let mut labels = labels.clone();
    labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// The EndpointSlice the endpoint-slice controller would keep for an applied Service with a
/// selector: the ready pods of its namespace the selector matches. `None` for a Service
/// without a selector.
pub fn endpoint_slice(service: &Value, pods: &[(PodSpec, String, Ipv4Addr)]) -> Option<Value> {
    let selector: Labels = serde_json::from_value(service["spec"]["selector"].clone()).ok()?;
    if selector.is_empty() {
        return None;
    }
    let namespace = service["metadata"]["namespace"].as_str()?;
    let name = service["metadata"]["name"].as_str()?;
    let selected: Vec<&(PodSpec, String, Ipv4Addr)> = pods
        .iter()
        .filter(|(pod, _, _)| {
            pod.namespace == namespace && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
        })
        .collect();
    let endpoints: Vec<Value> = selected
        .iter()
        .map(|(pod, node, address)| {
            json!({"addresses": [address.to_string()], "hostname": pod.name, "nodeName": node, "conditions": {"ready": true}})
        })
        .collect();
    let ports: Vec<Value> = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|port| {
            let protocol = port["protocol"].as_str().unwrap_or("TCP");
            // A named target port resolves on the pods (the first that declares it).
            let target = match &port["targetPort"] {
                Value::Number(n) => n.as_u64(),
                Value::String(name) => selected.iter().find_map(|(pod, _, _)| {
                    pod.ports
                        .iter()
                        .find(|p| p.name.as_deref() == Some(name.as_str()))
                        .map(|p| u64::from(p.port))
                }),
                _ => None,
            }
            .or_else(|| port["port"].as_u64());
            let mut out = json!({"port": target, "protocol": protocol});
            if let Some(name) = port["name"].as_str() {
                out["name"] = json!(name);
            }
            out
        })
        .collect();
    Some(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-lab"), "namespace": namespace, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
}

/// Documents as one YAML stream (each JSON, which is YAML), each after a `---`.
pub fn documents_yaml(documents: &[Value]) -> String {
    let mut yaml = String::new();
    for document in documents {
        yaml.push_str("---\n");
        yaml.push_str(&serde_json::to_string(document).expect("JSON values serialise"));
        yaml.push('\n');
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Names;
    impl PodNames for Names {
        fn netns(&self, pod: &PodSpec) -> String {
            format!("ns-{}.{}", pod.namespace, pod.name)
        }
        fn container_id(&self, pod: &PodSpec) -> String {
            format!("id-{}.{}", pod.namespace, pod.name)
        }
    }

    fn placement() -> Placement {
        Placement {
            load: vec![("node-0".into(), 2), ("node-1".into(), 1)],
        }
    }

    const MODEL: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: blue}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  containers:
  - name: c
    ports:
    - {name: serve-80-tcp, containerPort: 80, protocol: TCP}
    - {name: serve-80-udp, containerPort: 80, protocol: UDP}
    - {containerPort: 81}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {nodeName: node-0, containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
";

    fn applied(yaml: &str, on: &ClusterObjects) -> (ClusterObjects, PodChanges) {
        apply(
            on,
            &parse_manifests(yaml).unwrap(),
            &mut placement(),
            &Names,
            &["pod-0".into()],
        )
        .unwrap()
    }

    #[test]
    fn parses_the_kinds_the_lab_takes() {
        let manifests = parse_manifests(MODEL).unwrap();
        assert_eq!(manifests.len(), 4);
        let Manifest::Pod(a) = &manifests[1] else {
            panic!("{manifests:?}")
        };
        assert_eq!(a.labels["pod"], "a");
        assert_eq!(a.node, None);
        assert_eq!(
            a.ports,
            [
                ContainerPort {
                    name: Some("serve-80-tcp".into()),
                    port: 80,
                    protocol: Protocol::Tcp
                },
                ContainerPort {
                    name: Some("serve-80-udp".into()),
                    port: 80,
                    protocol: Protocol::Udp
                },
                ContainerPort {
                    name: None,
                    port: 81,
                    protocol: Protocol::Tcp
                },
            ]
        );
        assert_eq!(manifests[3].describe(), "networkpolicy/x/deny");
        let Manifest::Passed { document, .. } = &manifests[3] else {
            panic!()
        };
        assert_eq!(document["metadata"]["namespace"], "x");
        assert_eq!(document["spec"]["policyTypes"], json!(["Ingress"]));
    }

    #[test]
    fn refuses_what_the_lab_cannot_run() {
        let bad = |yaml: &str| format!("{:#}", parse_manifests(yaml).unwrap_err());
        assert!(bad("kind: Deployment\nmetadata: {name: d}").contains("does not take kind"));
        assert!(bad("metadata: {name: d}").contains("no kind"));
        assert!(bad("kind: Pod\nmetadata: {name: Bad_Name}").contains("DNS label"));
        assert!(
            bad("kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 80, protocol: ICMP}]}]}")
                .contains("ICMP")
        );
        assert!(
            bad("kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 80}]}]}")
                .contains("twice")
        );
        let unknown_namespace = apply(
            &ClusterObjects::default(),
            &parse_manifests("kind: Pod\nmetadata: {name: p, namespace: nowhere}").unwrap(),
            &mut placement(),
            &Names,
            &[],
        )
        .unwrap_err();
        assert!(unknown_namespace.to_string().contains("not found"));
        let own_pod = apply(
            &ClusterObjects::default(),
            &parse_manifests("kind: Pod\nmetadata: {name: pod-0}").unwrap(),
            &mut placement(),
            &Names,
            &["pod-0".into()],
        )
        .unwrap_err();
        assert!(own_pod.to_string().contains("lab's own pods"));
    }

    #[test]
    fn new_pods_go_to_the_named_or_the_least_loaded_node() {
        let (objects, changes) = applied(MODEL, &ClusterObjects::default());
        let nodes: Vec<(String, String)> = changes
            .create
            .iter()
            .map(|p| (p.spec.key(), p.node.clone()))
            .collect();
        assert_eq!(
            nodes,
            [
                ("x/a".to_string(), "node-1".to_string()),
                ("x/b".to_string(), "node-0".to_string())
            ]
        );
        assert!(changes.remove.is_empty());
        assert_eq!(objects.pods["x/a"].netns, "ns-x.a");
        assert_eq!(objects.namespaces["x"]["team"], "blue");
        assert_eq!(objects.passed[&PassedKind::NetworkPolicy].len(), 1);
    }

    /// The objects after the lab made their pods (each has an address).
    fn made(mut objects: ClusterObjects) -> ClusterObjects {
        for (i, pod) in objects.pods.values_mut().enumerate() {
            pod.address = Some(Ipv4Addr::new(10, 1, 0, 2 + i as u8));
        }
        objects
    }

    #[test]
    fn a_pod_whose_making_did_not_finish_is_made_again() {
        let (first, _) = applied(MODEL, &ClusterObjects::default());
        let (_, changes) = applied(MODEL, &first);
        assert_eq!(changes.create.len(), 2, "neither pod got an address");
        assert_eq!(
            changes.remove.len(),
            2,
            "what was left of them is taken down first"
        );
    }

    #[test]
    fn applying_twice_changes_nothing_and_labels_change_in_place() {
        let first = made(applied(MODEL, &ClusterObjects::default()).0);
        let (second, changes) = applied(MODEL, &first);
        assert_eq!(second, first);
        assert!(changes.is_empty());

        let (relabelled, changes) = applied(&MODEL.replace("{pod: a}", "{pod: z}"), &first);
        assert!(changes.is_empty(), "a label change recreates nothing");
        assert_eq!(relabelled.pods["x/a"].spec.labels["pod"], "z");
    }

    #[test]
    fn a_new_node_or_new_ports_recreate_the_pod() {
        let first = made(applied(MODEL, &ClusterObjects::default()).0);
        let moved = MODEL.replace("nodeName: node-0", "nodeName: node-1");
        let (next, changes) = applied(&moved, &first);
        assert_eq!(changes.remove.len(), 1);
        assert_eq!(changes.remove[0].spec.key(), "x/b");
        assert_eq!(changes.create.len(), 1);
        assert_eq!(next.pods["x/b"].node, "node-1");

        let reported = MODEL.replace("{containerPort: 81}", "{containerPort: 82}");
        let (_, changes) = applied(&reported, &first);
        assert_eq!(
            (changes.remove.len(), changes.create[0].spec.key()),
            (1, "x/a".to_string())
        );
    }

    #[test]
    fn deleting_a_namespace_deletes_what_is_in_it() {
        let (objects, _) = applied(MODEL, &ClusterObjects::default());
        let (left, removed, deleted) = delete(
            &objects,
            &parse_manifests("kind: Namespace\nmetadata: {name: x}").unwrap(),
        )
        .unwrap();
        assert_eq!(
            left,
            ClusterObjects {
                passed: BTreeMap::from([(PassedKind::NetworkPolicy, BTreeMap::new())]),
                ..ClusterObjects::default()
            }
        );
        assert_eq!(removed.len(), 2);
        assert_eq!(deleted, ["namespace/x"]);
        let (_, removed, deleted) = delete(
            &objects,
            &parse_manifests("kind: Pod\nmetadata: {name: a, namespace: x}\n---\nkind: Pod\nmetadata: {name: gone, namespace: x}").unwrap(),
        )
        .unwrap();
        assert_eq!((removed.len(), deleted), (1, vec!["pod/x/a".to_string()]));
        assert!(
            delete(
                &objects,
                &parse_manifests("kind: Namespace\nmetadata: {name: default}").unwrap()
            )
            .is_err()
        );
    }

    #[test]
    fn label_changes_set_overwrite_and_remove() {
        let mut labels = Labels::from([("pod".into(), "a".into()), ("old".into(), "1".into())]);
        let changes: Vec<LabelChange> = ["pod=b", "new=", "old-"]
            .iter()
            .map(|c| parse_label_change(c).unwrap())
            .collect();
        relabel(&mut labels, &changes);
        assert_eq!(
            labels,
            Labels::from([("pod".into(), "b".into()), ("new".into(), String::new())])
        );
        assert!(parse_label_change("=x").is_err());
        assert!(parse_label_change("plain").is_err());
    }

    #[test]
    fn documents_carry_what_the_api_server_adds() {
        let namespace = namespace_document("x", &Labels::from([("team".into(), "blue".into())]));
        assert_eq!(
            namespace["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "x"
        );
        let ports = [ContainerPort {
            name: Some("serve-80-tcp".into()),
            port: 80,
            protocol: Protocol::Tcp,
        }];
        let pod = pod_document(
            "x",
            "a",
            &Labels::new(),
            "node-1",
            &ports,
            Some(Ipv4Addr::new(10, 1, 1, 5)),
        );
        assert_eq!(pod["status"]["podIP"], "10.1.1.5");
        assert_eq!(pod["status"]["podIPs"][0]["ip"], "10.1.1.5");
        assert_eq!(pod["spec"]["nodeName"], "node-1");
        assert_eq!(
            pod["spec"]["containers"][0]["ports"][0],
            json!({"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"})
        );
        // What the controller parses: the Kubernetes API types.
        let parsed: Pod = serde_json::from_value(pod).unwrap();
        assert_eq!(parsed.status.unwrap().pod_ip.as_deref(), Some("10.1.1.5"));
        let yaml = documents_yaml(&[namespace.clone(), namespace]);
        assert_eq!(yaml.matches("---\n").count(), 2);
        assert_eq!(parse_manifests(&yaml).unwrap().len(), 2);
    }

    #[test]
    fn services_with_a_selector_get_the_slice_of_their_pods() {
        let pod = |name: &str, app: &str| PodSpec {
            namespace: "x".into(),
            name: name.into(),
            labels: Labels::from([("app".into(), app.into())]),
            node: None,
            ports: vec![ContainerPort {
                name: Some("web".into()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        };
        let pods = vec![
            (
                pod("a", "web"),
                "node-0".to_string(),
                Ipv4Addr::new(10, 1, 0, 2),
            ),
            (
                pod("b", "db"),
                "node-1".to_string(),
                Ipv4Addr::new(10, 1, 1, 2),
            ),
        ];
        let service = json!({"metadata": {"name": "web", "namespace": "x"}, "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}});
        let slice = endpoint_slice(&service, &pods).unwrap();
        assert_eq!(slice["endpoints"].as_array().unwrap().len(), 1);
        assert_eq!(slice["endpoints"][0]["addresses"][0], "10.1.0.2");
        assert_eq!(slice["ports"][0]["port"], 8080);
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "web"
        );
        assert!(
            endpoint_slice(
                &json!({"metadata": {"name": "s", "namespace": "x"}, "spec": {}}),
                &pods
            )
            .is_none()
        );
    }

    #[test]
    fn objects_keep_the_creation_time_of_their_first_apply() {
        let export = |name: &str| json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport", "metadata": {"name": name, "namespace": "x"}});
        let first = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_641_736);
        let mut applied = ClusterObjects::default();
        applied.passed.insert(
            PassedKind::ServiceExport,
            BTreeMap::from([("x/web".to_string(), export("web"))]),
        );
        let before = ClusterObjects::default();
        stamp_creation(&before, &mut applied, first);
        let created = |objects: &ClusterObjects, key: &str| {
            objects.passed[&PassedKind::ServiceExport][key]["metadata"]["creationTimestamp"].clone()
        };
        assert_eq!(created(&applied, "x/web"), "2026-12-07T11:08:56Z");

        // Applied again later with another export beside it: the first keeps its time.
        let mut again = applied.clone();
        let exports = again.passed.get_mut(&PassedKind::ServiceExport).unwrap();
        exports.insert("x/web".into(), export("web"));
        exports.insert("x/api".into(), export("api"));
        stamp_creation(
            &applied,
            &mut again,
            first + std::time::Duration::from_secs(60),
        );
        assert_eq!(created(&again, "x/web"), "2026-12-07T11:08:56Z");
        assert_eq!(created(&again, "x/api"), "2026-12-07T11:09:56Z");
        assert_eq!(
            again.passed[&PassedKind::ServiceExport]["x/web"],
            applied.passed[&PassedKind::ServiceExport]["x/web"]
        );
    }
}
