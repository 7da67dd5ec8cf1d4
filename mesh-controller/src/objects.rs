//! From Kubernetes objects to the cluster's [`SourceState`], pure. Both sources (the API
//! server and the static file) hold the same kinds of objects and end here.
//!
//! * Nodes: pod CIDRs from `spec.podCIDRs` (or `spec.podCIDR`), internal addresses from
//!   `status.addresses`, and optionally the gateway from the annotations
//!   `trellis.dev/gateway-endpoint` and `trellis.dev/public-key` (gateway registrations
//!   override them).
//! * A Service is exported when a ServiceExport (of either served version) of the same
//!   namespace and name exists; its endpoints come from the EndpointSlices labelled
//!   `kubernetes.io/service-name`, except those the controller wrote itself for imports
//!   (labelled `multicluster.kubernetes.io/source-cluster`), so imports are never re-exported.
//!   The export's properties (creation time, exported labels and annotations, the Service's
//!   session affinity, traffic policies and IP families) go with it.
//! * The derived Services the controller creates for its ClusterSetIP imports (labelled
//!   `multicluster.kubernetes.io/service-name` and managed by `trellis-controller`) are never
//!   exported; their ClusterIPs are the imports' clusterset IPs.
//! * Service CIDRs from ServiceCIDR objects (`networking.k8s.io/v1`), if any.
//! * The cluster ID from the ClusterProperty `cluster.clusterset.k8s.io`, if any.
//! * NetworkPolicies, Pods and Namespaces, converted by [`crate::policy_source`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, ServiceCIDR};
use serde::Deserialize;
use trellis_core::cluster::{
    ClusterId, Endpoint, ExportProperties, ExportedService, NodeGateway, NodeState, Protocol,
    PublicKey, ServiceKey, ServiceKind, ServicePort,
};

use crate::Error;
use crate::crd::{CLUSTER_ID_PROPERTY, ClusterProperty, ServiceExport};
use crate::source::SourceState;

pub const ANNOTATION_GATEWAY_ENDPOINT: &str = "trellis.dev/gateway-endpoint";
pub const ANNOTATION_PUBLIC_KEY: &str = "trellis.dev/public-key";
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_MCS_SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";
pub const LABEL_SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The `app.kubernetes.io/managed-by` value on every object the controller writes.
pub const MANAGER: &str = "trellis-controller";

/// The objects a source holds.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub service_exports: Vec<ServiceExport>,
    pub cluster_properties: Vec<ClusterProperty>,
    pub service_cidrs: Vec<ServiceCIDR>,
    /// NetworkPolicy's kinds (the Kubernetes source lists them only with `networkPolicy`).
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub network_policies: Vec<NetworkPolicy>,
    /// External peers (`trellis.dev/v1alpha1` `Peer`).
    pub peers: Vec<crate::crd::Peer>,
    /// The preshared keys the peers' Secrets hold, by Secret name (on Kubernetes, Secrets of
    /// the controller's namespace; the static source holds none).
    pub preshared_keys: BTreeMap<String, String>,
}

/// A node's pod CIDRs as the API server has them: `spec.podCIDRs`, else `spec.podCIDR`;
/// empty until the kube-controller-manager assigns them.
pub fn pod_cidrs_of(node: &Node) -> Vec<String> {
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if cidrs.is_empty()
        && let Some(c) = spec.and_then(|s| s.pod_cidr.clone())
    {
        cidrs.push(c);
    }
    cidrs
}

/// A node as the mesh sees it; `None` for a node without a name.
pub fn node_state(node: &Node) -> Option<NodeState> {
    let name = node.metadata.name.clone()?;
    let pod_cidrs = pod_cidrs_of(node)
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    let internal_ips = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|addrs| {
            addrs
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse::<IpAddr>().ok())
                .collect()
        })
        .unwrap_or_default();
    let annotations = node.metadata.annotations.as_ref();
    let gateway = annotations.and_then(|a| {
        let endpoint: SocketAddr = a.get(ANNOTATION_GATEWAY_ENDPOINT)?.parse().ok()?;
        let public_key: PublicKey = a.get(ANNOTATION_PUBLIC_KEY)?.parse().ok()?;
        Some(NodeGateway {
            endpoint,
            public_key,
        })
    });
    Some(NodeState {
        name,
        pod_cidrs,
        internal_ips,
        gateway,
    })
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// A Service with its endpoints; `None` for Services that cannot be exported (ExternalName,
/// or missing name/namespace).
pub fn exported_service(svc: &Service, slices: &[&EndpointSlice]) -> Option<ExportedService> {
    let namespace = svc.metadata.namespace.clone()?;
    let name = svc.metadata.name.clone()?;
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = &spec.cluster_ip
    {
        ips.push(ip.clone());
    }
    let headless = ips.iter().any(|ip| ip == "None");
    let cluster_ips = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    let mut ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone(),
                protocol: protocol(p.protocol.as_deref())?,
                port: u16::try_from(p.port).ok()?,
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect();
    ports.sort();
    let mut endpoints: Vec<Endpoint> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .map(|e| Endpoint {
            addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            hostname: e.hostname.clone(),
            node: e.node_name.clone(),
            // "nil should be interpreted as ready" (EndpointConditions).
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
        })
        .filter(|e| !e.addresses.is_empty())
        .collect();
    endpoints.sort();
    endpoints.dedup();
    let mut endpoint_ports: Vec<ServicePort> = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                protocol: protocol(p.protocol.as_deref())?,
                port: u16::try_from(p.port?).ok()?,
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect();
    endpoint_ports.sort();
    endpoint_ports.dedup();
    Some(ExportedService {
        namespace,
        name,
        kind: if headless {
            ServiceKind::Headless
        } else {
            ServiceKind::ClusterSetIP
        },
        cluster_ips,
        ports,
        endpoints,
        endpoint_ports,
        properties: service_properties(spec),
    })
}

/// What the Service says of itself beyond type and ports (KEP-1645 copies it to the import).
fn service_properties(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> ExportProperties {
    ExportProperties {
        session_affinity: spec.session_affinity.clone(),
        session_affinity_timeout: spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds),
        internal_traffic_policy: spec.internal_traffic_policy.clone(),
        traffic_distribution: spec.traffic_distribution.clone(),
        ip_families: spec.ip_families.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// What the ServiceExport adds to its Service's properties: its creation time (which decides
/// conflicts: the oldest export wins) and the labels and annotations it exports.
fn add_export_properties(properties: &mut ExportProperties, export: &ServiceExport) {
    properties.exported_at = export
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second());
    properties.labels = export.spec.exported_labels.clone();
    properties.annotations = export.spec.exported_annotations.clone();
}

/// `name` if it is a valid object name (at most 63 characters), else its first characters
/// and a stable hash of the whole.
pub(crate) fn short_name(name: String) -> String {
    if name.len() <= 63 {
        return name;
    }
    // FNV-1a: stable across runs and platforms.
    let hash = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let mut short: String = name.chars().take(46).collect();
    short = short.trim_end_matches('-').to_owned();
    format!("{short}-{hash:016x}")
}

/// The name of the Service derived for a ClusterSetIP import: `derived-<svc>`, shortened with
/// a hash when longer than 63 characters.
pub fn derived_service_name(service: &str) -> String {
    short_name(format!("derived-{service}"))
}

/// Whether the Service is one the controller derived for a ClusterSetIP import: it carries
/// both labels the controller sets. Such a Service is never exported.
pub fn is_derived_service(svc: &Service) -> bool {
    derived_service_import(svc).is_some()
}

/// The import a derived Service serves, by its labels; `None` for any other Service.
fn derived_service_import(svc: &Service) -> Option<ServiceKey> {
    let labels = svc.metadata.labels.as_ref()?;
    if labels.get(LABEL_MANAGED_BY).map(String::as_str) != Some(MANAGER) {
        return None;
    }
    let import = labels.get(LABEL_MCS_SERVICE_NAME)?;
    // Named as the controller names it, so no other Service with our labels can stand in.
    if svc.metadata.name.as_deref() != Some(derived_service_name(import).as_str()) {
        return None;
    }
    Some(ServiceKey::new(svc.metadata.namespace.clone()?, import))
}

/// The clusterset IPs of the imports: the ClusterIPs the API server gave their derived
/// Services, in the Services' order (their `ipFamilies`).
fn clusterset_ips(services: &[Service]) -> BTreeMap<ServiceKey, Vec<IpAddr>> {
    services
        .iter()
        .filter_map(|svc| {
            let key = derived_service_import(svc)?;
            let spec = svc.spec.as_ref()?;
            let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
            if ips.is_empty()
                && let Some(ip) = &spec.cluster_ip
            {
                ips.push(ip.clone());
            }
            let ips: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
            (!ips.is_empty()).then_some((key, ips))
        })
        .collect()
}

/// The cluster as the objects describe it.
pub fn source_state(objects: &Objects) -> SourceState {
    let nodes = objects
        .nodes
        .iter()
        .filter_map(node_state)
        .map(|n| (n.name.clone(), n))
        .collect();
    let exported: BTreeMap<ServiceKey, &ServiceExport> = objects
        .service_exports
        .iter()
        .filter(|e| e.metadata.deletion_timestamp.is_none())
        .filter_map(|e| {
            Some((
                ServiceKey::new(e.metadata.namespace.clone()?, e.metadata.name.clone()?),
                e,
            ))
        })
        .collect();
    let mut slices_by_service: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &objects.endpoint_slices {
        let labels = slice.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(LABEL_SOURCE_CLUSTER)) {
            continue;
        }
        let (Some(ns), Some(svc)) = (
            slice.metadata.namespace.clone(),
            labels.and_then(|l| l.get(LABEL_SERVICE_NAME)).cloned(),
        ) else {
            continue;
        };
        slices_by_service
            .entry(ServiceKey::new(ns, svc))
            .or_default()
            .push(slice);
    }
    let services = objects
        .services
        .iter()
        .filter_map(|svc| {
            let key = ServiceKey::new(svc.metadata.namespace.clone()?, svc.metadata.name.clone()?);
            let export = exported.get(&key)?;
            if is_derived_service(svc) {
                return None;
            }
            let slices = slices_by_service
                .get(&key)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let mut service = exported_service(svc, slices)?;
            add_export_properties(&mut service.properties, export);
            // Every peer would refuse it, and our own ServiceImport would be refused: not
            // exported, and said so in its `Valid` condition (see `export_statuses`).
            trellis_core::claims::check_properties(&service).ok()?;
            Some((key, service))
        })
        .collect();
    let mut service_cidrs: Vec<ipnet::IpNet> = objects
        .service_cidrs
        .iter()
        .filter_map(|c| c.spec.as_ref()?.cidrs.clone())
        .flatten()
        .filter_map(|c| c.parse().ok())
        .collect();
    service_cidrs.sort();
    service_cidrs.dedup();
    let cluster_id = objects
        .cluster_properties
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(CLUSTER_ID_PROPERTY))
        .and_then(|p| p.spec.value.parse::<ClusterId>().ok());
    SourceState {
        cluster_id,
        service_cidrs,
        nodes,
        services,
        policy: crate::policy_source::policy_source(
            &objects.network_policies,
            &objects.pods,
            &objects.namespaces,
        ),
        digest: None,
        clusterset_ips: clusterset_ips(&objects.services),
        external_peers: external_peers(objects),
    }
}

/// The Peers not being deleted, by name (a store lists them in no order), their preshared
/// keys looked up among the source's Secrets.
fn external_peers(objects: &Objects) -> Vec<trellis_core::external_peer::ExternalPeerSpec> {
    let mut peers: Vec<_> = objects
        .peers
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            p.external_spec(|secret| {
                objects.preshared_keys.get(secret).cloned().ok_or_else(|| {
                    format!(
                        "no Secret of that name with key {} in the controller's namespace",
                        crate::crd::PRESHARED_KEY_FIELD
                    )
                })
            })
        })
        .collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    peers
}

/// What the controller reports on a ServiceExport: KEP-1645's `Valid` condition (the
/// `Ready` and `Conflict` conditions need the clusterset's imports: see
/// [`crate::kube_source::export_conditions`]). `conditions` are those the object has now.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportStatus {
    pub valid: bool,
    pub reason: &'static str,
    pub message: String,
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The ServiceExport's UID (the subject of its Events).
    pub uid: Option<String>,
}

/// The `Valid` condition of every ServiceExport: whether its Service exists and can be
/// exported.
pub fn export_statuses(objects: &Objects) -> BTreeMap<ServiceKey, ExportStatus> {
    let services: BTreeMap<ServiceKey, &Service> = objects
        .services
        .iter()
        .filter_map(|s| {
            Some((
                ServiceKey::new(s.metadata.namespace.clone()?, s.metadata.name.clone()?),
                s,
            ))
        })
        .collect();
    objects
        .service_exports
        .iter()
        .filter(|e| e.metadata.deletion_timestamp.is_none())
        .filter_map(|e| {
            let key = ServiceKey::new(e.metadata.namespace.clone()?, e.metadata.name.clone()?);
            let status = match services.get(&key) {
                None => ExportStatus {
                    valid: false,
                    reason: "NoService",
                    message: format!("Service {key} does not exist"),
                    conditions: Vec::new(),
                    uid: None,
                },
                Some(svc)
                    if svc.spec.as_ref().and_then(|s| s.type_.as_deref())
                        == Some("ExternalName") =>
                {
                    ExportStatus {
                        valid: false,
                        reason: "InvalidServiceType",
                        message: format!(
                            "Service {key} is of type ExternalName, which cannot be exported"
                        ),
                        conditions: Vec::new(),
                        uid: None,
                    }
                }
                Some(svc) if is_derived_service(svc) => ExportStatus {
                    valid: false,
                    reason: "InvalidServiceType",
                    message: format!(
                        "Service {key} is derived by trellis-controller for an import, which \
                         cannot be exported"
                    ),
                    conditions: Vec::new(),
                    uid: None,
                },
                Some(svc) if let Err(what) = export_properties_check(svc, e) => ExportStatus {
                    valid: false,
                    reason: "InvalidProperties",
                    message: format!(
                        "{what} of Service {key} or its ServiceExport are not what Kubernetes                          accepts (or beyond the clusterset's bounds); it is not exported"
                    ),
                    conditions: Vec::new(),
                    uid: None,
                },
                Some(_) => ExportStatus {
                    valid: true,
                    reason: "Valid",
                    message: format!("Service {key} can be exported"),
                    conditions: Vec::new(),
                    uid: None,
                },
            };
            Some((
                key,
                ExportStatus {
                    conditions: e
                        .status
                        .as_ref()
                        .map(|s| s.conditions.clone())
                        .unwrap_or_default(),
                    uid: e.metadata.uid.clone(),
                    ..status
                },
            ))
        })
        .collect()
}

/// Whether the properties `svc` and its `export` give would be admitted by every peer (and
/// written onto a ServiceImport the API server accepts).
fn export_properties_check(svc: &Service, export: &ServiceExport) -> Result<(), &'static str> {
    let Some(mut service) = exported_service(svc, &[]) else {
        return Ok(());
    };
    add_export_properties(&mut service.properties, export);
    trellis_core::claims::check_properties(&service)
}

/// Parses a YAML stream of Kubernetes objects (documents separated by `---`, and `List`s),
/// keeping the kinds the controller uses and ignoring the others.
pub fn parse_objects(yaml: &str) -> Result<Objects, Error> {
    let mut objects = Objects::default();
    for (index, doc) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let value = serde_json::Value::deserialize(doc).map_err(|source| Error::ParseDocument {
            document: index,
            source,
        })?;
        add_object(&mut objects, value, index)?;
    }
    Ok(objects)
}

fn add_object(objects: &mut Objects, value: serde_json::Value, index: usize) -> Result<(), Error> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    let err = |source: serde_json::Error| Error::ParseObject {
        document: index,
        kind: kind.clone(),
        source,
    };
    match kind.as_str() {
        "List" => {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for item in items {
                add_object(objects, item, index)?;
            }
        }
        "Node" => objects
            .nodes
            .push(serde_json::from_value(value).map_err(err)?),
        "Service" => objects
            .services
            .push(serde_json::from_value(value).map_err(err)?),
        "EndpointSlice" => objects
            .endpoint_slices
            .push(serde_json::from_value(value).map_err(err)?),
        "ServiceExport" => objects
            .service_exports
            .push(serde_json::from_value(value).map_err(err)?),
        "ClusterProperty" => objects
            .cluster_properties
            .push(serde_json::from_value(value).map_err(err)?),
        "Peer" => objects
            .peers
            .push(serde_json::from_value(value).map_err(err)?),
        "ServiceCIDR" => objects
            .service_cidrs
            .push(serde_json::from_value(value).map_err(err)?),
        "Namespace" => objects
            .namespaces
            .push(serde_json::from_value(value).map_err(err)?),
        "Pod" => objects
            .pods
            .push(serde_json::from_value(value).map_err(err)?),
        "NetworkPolicy" => objects
            .network_policies
            .push(serde_json::from_value(value).map_err(err)?),
        "" => {
            return Err(Error::ObjectWithoutKind { document: index });
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const CLUSTER_YAML: &str = include_str!("../testdata/cluster-east.yaml");

    #[test]
    fn parses_a_cluster_file_into_the_source_state() {
        let objects = parse_objects(CLUSTER_YAML).unwrap();
        assert_eq!(objects.nodes.len(), 2);
        let s = source_state(&objects);
        assert_eq!(s.cluster_id, Some("east".parse().unwrap()));
        assert_eq!(s.service_cidrs, vec!["10.96.0.0/16".parse().unwrap()]);
        let n0 = &s.nodes["east-node-0"];
        assert_eq!(n0.pod_cidrs, vec!["10.10.0.0/24".parse().unwrap()]);
        assert_eq!(
            n0.internal_ips,
            vec!["192.168.10.10".parse::<IpAddr>().unwrap()]
        );
        assert!(n0.gateway.is_some());
        assert!(s.nodes["east-node-1"].gateway.is_none());
        // web is exported, db is not; the imported slice is ignored.
        assert_eq!(s.services.len(), 1);
        let web = &s.services[&ServiceKey::new("shop", "web")];
        assert_eq!(web.kind, ServiceKind::ClusterSetIP);
        assert_eq!(
            web.cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(web.ports.len(), 1);
        assert_eq!(web.ports[0].port, 80);
        assert_eq!(web.endpoints.len(), 2);
        assert_eq!(web.endpoint_ports[0].port, 8080);
        assert!(web.endpoints.iter().any(|e| !e.ready));
    }

    #[test]
    fn exports_report_whether_their_service_exists() {
        let yaml = format!(
            "{CLUSTER_YAML}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n\
             metadata: {{name: ghost, namespace: shop}}\n"
        );
        let st = export_statuses(&parse_objects(&yaml).unwrap());
        assert!(st[&ServiceKey::new("shop", "web")].valid);
        let ghost = &st[&ServiceKey::new("shop", "ghost")];
        assert!(!ghost.valid);
        assert_eq!(ghost.reason, "NoService");
        assert_eq!(ghost.message, "Service shop/ghost does not exist");
    }

    #[test]
    fn an_export_with_labels_kubernetes_refuses_is_invalid_and_not_exported() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceExport
metadata: {name: web, namespace: shop}
spec: {exportedLabels: {team: "a typo with spaces"}}
"#;
        let objects = parse_objects(yaml).unwrap();
        assert!(source_state(&objects).services.is_empty());
        let st = &export_statuses(&objects)[&ServiceKey::new("shop", "web")];
        assert!(!st.valid);
        assert_eq!(st.reason, "InvalidProperties");
        assert!(st.message.contains("exported labels"), "{}", st.message);
    }

    #[test]
    fn external_name_and_derived_services_are_never_exported() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceExport
metadata: {name: ext, namespace: shop}
---
apiVersion: v1
kind: Service
metadata:
  name: derived-web
  namespace: shop
  labels: {app.kubernetes.io/managed-by: trellis-controller, multicluster.kubernetes.io/service-name: web}
spec: {clusterIP: 10.96.9.9, clusterIPs: [10.96.9.9, "fd00::9"], ports: [{port: 80}]}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: derived-web, namespace: shop}
---
apiVersion: v1
kind: Service
metadata:
  name: claims-to-be-derived
  namespace: shop
  labels: {multicluster.kubernetes.io/service-name: api}
spec: {clusterIP: 10.96.9.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata:
  name: not-the-derived-name
  namespace: shop
  labels: {app.kubernetes.io/managed-by: trellis-controller, multicluster.kubernetes.io/service-name: web}
spec: {clusterIP: 10.96.9.11, ports: [{port: 80}]}
"#;
        let objects = parse_objects(yaml).unwrap();
        let s = source_state(&objects);
        assert!(s.services.is_empty(), "{:?}", s.services.keys());
        assert_eq!(
            s.clusterset_ips,
            BTreeMap::from([(
                ServiceKey::new("shop", "web"),
                vec!["10.96.9.9".parse().unwrap(), "fd00::9".parse().unwrap()]
            )]),
            "only a Service with both labels is a derived one"
        );
        let st = export_statuses(&objects);
        for name in ["ext", "derived-web"] {
            let status = &st[&ServiceKey::new("shop", name)];
            assert!(!status.valid, "{name}");
            assert_eq!(status.reason, "InvalidServiceType", "{name}");
        }
    }

    #[test]
    fn an_export_carries_its_properties_from_either_version() {
        for version in ["v1alpha1", "v1beta1"] {
            let yaml = format!(
                r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop, labels: {{own: label}}}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, appProtocol: http}}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}
  internalTrafficPolicy: Local
  trafficDistribution: PreferClose
  ipFamilies: [IPv4]
---
apiVersion: multicluster.x-k8s.io/{version}
kind: ServiceExport
metadata: {{name: web, namespace: shop, creationTimestamp: "2026-01-01T00:00:10Z"}}
spec:
  exportedLabels: {{tier: front}}
  exportedAnnotations: {{note: hi}}
"#
            );
            let s = source_state(&parse_objects(&yaml).unwrap());
            let web = &s.services[&ServiceKey::new("shop", "web")];
            let p = &web.properties;
            assert_eq!(p.exported_at, Some(1_767_225_610), "{version}");
            assert_eq!(p.session_affinity.as_deref(), Some("ClientIP"));
            assert_eq!(p.session_affinity_timeout, Some(60));
            assert_eq!(p.internal_traffic_policy.as_deref(), Some("Local"));
            assert_eq!(p.traffic_distribution.as_deref(), Some("PreferClose"));
            assert_eq!(p.ip_families, ["IPv4"]);
            assert_eq!(p.labels, BTreeMap::from([("tier".into(), "front".into())]));
            assert_eq!(
                p.annotations,
                BTreeMap::from([("note".into(), "hi".into())])
            );
            assert_eq!(web.ports[0].app_protocol.as_deref(), Some("http"));
        }
    }

    #[test]
    fn headless_services_and_lists_are_understood() {
        let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: db, namespace: shop}
  spec:
    clusterIP: None
    ports: [{port: 5432}]
- apiVersion: multicluster.x-k8s.io/v1alpha1
  kind: ServiceExport
  metadata: {name: db, namespace: shop}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: ignored}
"#;
        let s = source_state(&parse_objects(yaml).unwrap());
        let db = &s.services[&ServiceKey::new("shop", "db")];
        assert_eq!(db.kind, ServiceKind::Headless);
        assert!(db.cluster_ips.is_empty());
        assert_eq!(db.ports[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn namespaces_pods_and_policies_are_read_from_the_file() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  nodeName: east-node-0
  containers: [{name: echo, ports: [{containerPort: 80, name: serve-80}]}]
status: {podIP: 10.10.0.20}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: x}
spec: {containers: [{name: echo}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: x}
spec: {policyTypes: [Sideways]}
"#;
        let s = source_state(&parse_objects(yaml).unwrap());
        assert_eq!(s.policy.namespaces["x"]["team"], "a");
        assert_eq!(s.policy.pods.len(), 1, "the pending pod has no address");
        assert_eq!(s.policy.pods[0].named_ports[0].port, 80);
        assert_eq!(s.policy.policies.len(), 1);
        assert_eq!(s.policy.refused.len(), 1);
        assert_eq!(s.policy.refused[0].key.name, "broken");
    }

    #[test]
    fn malformed_documents_are_errors_naming_the_document() {
        let err = parse_objects("kind: Node\nmetadata: {name: 5}\n---\n: :\n").unwrap_err();
        assert!(err.to_string().contains("document 0"), "{err}");
        let err = parse_objects("apiVersion: v1\n---\nfoo: [").unwrap_err();
        assert!(err.to_string().contains("document"), "{err}");
    }
}
