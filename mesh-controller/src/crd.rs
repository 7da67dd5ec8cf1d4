//! The custom resources the controller reads and writes: the Multi-Cluster Services API's
//! `ServiceExport` and `ServiceImport` (KEP-1645, `multicluster.x-k8s.io`, served as
//! `v1beta1`, the storage version, and `v1alpha1`) and the About API's `ClusterProperty`
//! (KEP-2149, `about.k8s.io/v1alpha1`), and Trellis' own `Peer` (`trellis.dev/v1alpha1`,
//! cluster-scoped: an external machine attached to node gateways).
//!
//! Both MCS versions have the same schema (v1alpha1 accepts every v1beta1 field), so the API
//! server converts between them without a webhook (`conversion: None`). The controller reads
//! and writes `v1beta1`.
//!
//! The CRD manifests are generated from these types (`trellis-controller crds`) and committed
//! in `mesh-controller/crds/` (and copied into the chart, `helm/trellis/crds/`); tests fail
//! when either drifts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::SessionAffinityConfig;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Error;

pub const GROUP: &str = "multicluster.x-k8s.io";
/// The version the controller reads and writes (and the CRDs store).
pub const VERSION: &str = "v1beta1";
pub const API_VERSION: &str = "multicluster.x-k8s.io/v1beta1";

/// What a ServiceExport asks beyond its existence (which is the request to export the
/// Service of the same namespace and name).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportSpec {
    /// Labels to put on the ServiceImport in every cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exported_labels: BTreeMap<String, String>,
    /// Annotations to put on the ServiceImport in every cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exported_annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ServiceExportStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A ServiceExport as the controller reads it (either served version: their fields are the
/// same). Written by hand rather than derived because its `spec` is optional: most
/// ServiceExports have none.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ServiceExport {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ExportSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceExportStatus>,
}

impl kube::Resource for ServiceExport {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "ServiceExport".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "serviceexports".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// `ClusterSetIP` (one virtual IP per IP family for the clusterset) or `Headless`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceImportType {
    #[default]
    ClusterSetIP,
    Headless,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP`, `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ServiceImportStatus {
    /// The exporting clusters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ClusterStatus {
    pub cluster: String,
}

/// The types of one served version: the same fields in both.
macro_rules! mcs_version {
    ($version:tt, $storage:tt) => {
        use super::*;

        /// What a ServiceExport asks beyond its existence, which requests the export of the
        /// Service of the same namespace and name. (This version's schema, for the CRD; the
        /// controller reads ServiceExports as [`crate::crd::ServiceExport`].)
        #[derive(
            CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema,
        )]
        #[kube(
                    group = "multicluster.x-k8s.io",
                    version = $version,
                    kind = "ServiceExport",
                    doc = "Exports the Service of the same namespace and name to the clusterset.",
                    namespaced,
                    status = "ServiceExportStatus",
                    shortname = "svcex",
                    shortname = "svcexport",
                    storage = $storage
                )]
        #[serde(rename_all = "camelCase")]
        pub struct ServiceExportSpec {
            /// Labels to put on the ServiceImport in every cluster.
            #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
            pub exported_labels: BTreeMap<String, String>,
            /// Annotations to put on the ServiceImport in every cluster.
            #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
            pub exported_annotations: BTreeMap<String, String>,
        }

        /// How the clusterset's service behaves: the oldest export's type and properties, the
        /// union of the exports' ports, and this cluster's clusterset IPs.
        #[derive(
            CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema,
        )]
        #[kube(
                    group = "multicluster.x-k8s.io",
                    version = $version,
                    kind = "ServiceImport",
                    doc = "A service imported from the clusterset, written by the controller.",
                    namespaced,
                    derive = "PartialEq",
                    status = "ServiceImportStatus",
                    shortname = "svcim",
                    storage = $storage
                )]
        #[serde(rename_all = "camelCase")]
        pub struct ServiceImportSpec {
            #[serde(default)]
            pub ports: Vec<ServiceImportPort>,
            /// The clusterset IPs (ClusterSetIP only), one per IP family, in `ipFamilies`'
            /// order.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = 2))]
            pub ips: Vec<String>,
            #[serde(rename = "type")]
            pub type_: ServiceImportType,
            /// `ClientIP` or `None`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub session_affinity: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub session_affinity_config: Option<SessionAffinityConfig>,
            /// `IPv4`, `IPv6`: the family of each of `ips`, in order.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = 2))]
            pub ip_families: Vec<String>,
            /// `Cluster` or `Local`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub internal_traffic_policy: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub traffic_distribution: Option<String>,
        }
    };
}

/// `multicluster.x-k8s.io/v1beta1`: the version the controller uses.
pub mod v1beta1 {
    mcs_version!("v1beta1", true);
}

/// `multicluster.x-k8s.io/v1alpha1`: served for clients that still use it.
pub mod v1alpha1 {
    mcs_version!("v1alpha1", false);
}

pub use v1beta1::{ServiceImport, ServiceImportSpec};

/// A property of the cluster; `cluster.clusterset.k8s.io` holds its ID in the clusterset.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(group = "about.k8s.io", version = "v1alpha1", kind = "ClusterProperty")]
pub struct ClusterPropertySpec {
    pub value: String,
}

/// An external peer (a laptop, a VM) admitted into the mesh through node gateways of this
/// cluster (as Kilo's `Peer`): the controller checks it like a peer cluster's claims
/// (`trellis_core::external_peer`) and says so in its `Ready` condition.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "Peer",
    doc = "An external WireGuard peer attached to node gateways of this cluster.",
    derive = "PartialEq",
    status = "PeerStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    /// The peer's WireGuard public key (base64, 32 bytes).
    pub public_key: String,
    /// The addresses the peer sends from and is reached at: CIDRs inside the ranges this
    /// cluster may claim, overlapping no node, service range, other peer or cluster.
    #[serde(rename = "allowedIPs")]
    #[schemars(length(min = 1, max = 64))]
    pub allowed_ips: Vec<String>,
    /// The nodes whose gateways may carry the peer, in order of preference: the first that
    /// runs a gateway does.
    #[schemars(length(min = 1, max = 16))]
    pub nodes: Vec<String>,
    /// Seconds between keepalives the gateway sends (0 or absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    /// A Secret in the controller's namespace whose `presharedKey` is the peer's preshared
    /// key (base64, 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key_secret: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct PeerStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The key of a preshared key Secret's data that holds the key.
pub const PRESHARED_KEY_FIELD: &str = "presharedKey";

impl Peer {
    /// The spec as the admission reads it, its preshared key resolved by `secret`
    /// (the key text of the named Secret, or why there is none).
    pub fn external_spec(
        &self,
        secret: impl Fn(&str) -> Result<String, String>,
    ) -> trellis_core::external_peer::ExternalPeerSpec {
        use trellis_core::external_peer::{ExternalPeerSpec, PresharedKeyRef};
        let preshared_key = self
            .spec
            .preshared_key_secret
            .as_ref()
            .map(|name| PresharedKeyRef {
                secret: name.clone(),
                key: secret(name).and_then(|text| {
                    text.parse()
                        .map_err(|_| format!("{PRESHARED_KEY_FIELD} is not a base64 32-byte key"))
                }),
            });
        ExternalPeerSpec {
            name: self.metadata.name.clone().unwrap_or_default(),
            uid: self.metadata.uid.clone(),
            public_key: self.spec.public_key.clone(),
            allowed_ips: self.spec.allowed_ips.clone(),
            nodes: self.spec.nodes.clone(),
            persistent_keepalive: self.spec.persistent_keepalive,
            preshared_key,
        }
    }
}

/// The name of the ClusterProperty that holds the cluster ID (KEP-2149).
pub const CLUSTER_ID_PROPERTY: &str = "cluster.clusterset.k8s.io";

fn merged(crds: Vec<CustomResourceDefinition>) -> Result<CustomResourceDefinition, Error> {
    kube::core::crd::merge_crds(crds, VERSION).map_err(|source| Error::MergeCrd { source })
}

/// The ServiceExport CRD: a ServiceExport needs no `spec`.
fn service_export_crd() -> Result<CustomResourceDefinition, Error> {
    let mut crd = merged(vec![
        v1beta1::ServiceExport::crd(),
        v1alpha1::ServiceExport::crd(),
    ])?;
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            && let Some(required) = schema.required.as_mut()
        {
            required.retain(|r| r != "spec");
            if required.is_empty() {
                schema.required = None;
            }
        }
    }
    Ok(crd)
}

/// Every CRD the controller needs, as one multi-document YAML stream.
pub fn crds_yaml() -> Result<String, Error> {
    let mut out = String::from(
        "# Generated by `trellis-controller crds` from mesh-controller/src/crd.rs. Do not edit.\n",
    );
    for crd in [
        service_export_crd()?,
        merged(vec![
            v1beta1::ServiceImport::crd(),
            v1alpha1::ServiceImport::crd(),
        ])?,
        ClusterProperty::crd(),
        Peer::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(
            &serde_norway::to_string(&crd).map_err(|source| Error::SerializeCrd { source })?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI fails when the committed CRDs drift from the types. Regenerate with
    /// `cargo run -p trellis-controller -- crds > mesh-controller/crds/trellis-crds.yaml` and
    /// copy the file to `helm/trellis/crds/` (integration/tests/helm.rs compares the two).
    #[test]
    fn committed_crds_match_the_types() {
        let committed = include_str!("../crds/trellis-crds.yaml");
        let generated = crds_yaml().unwrap();
        assert!(
            committed == generated,
            "mesh-controller/crds/trellis-crds.yaml is stale: run `cargo run -p \
             trellis-controller -- crds > mesh-controller/crds/trellis-crds.yaml` and copy it \
             to helm/trellis/crds/"
        );
    }

    #[test]
    fn both_versions_are_served_and_v1beta1_is_stored_with_the_same_schema() {
        for crd in [
            service_export_crd().unwrap(),
            merged(vec![
                v1beta1::ServiceImport::crd(),
                v1alpha1::ServiceImport::crd(),
            ])
            .unwrap(),
        ] {
            let versions = &crd.spec.versions;
            let names: Vec<(&str, bool, bool)> = versions
                .iter()
                .map(|v| (v.name.as_str(), v.served, v.storage))
                .collect();
            assert_eq!(
                names,
                [("v1beta1", true, true), ("v1alpha1", true, false)],
                "{}",
                crd.spec.names.kind
            );
            // The API server converts with `None`: only possible when the schemas agree.
            assert_eq!(versions[0].schema, versions[1].schema);
            assert!(crd.spec.conversion.is_none());
        }
    }

    #[test]
    fn a_service_export_needs_no_spec_and_reads_either_version() {
        for version in ["v1alpha1", "v1beta1"] {
            let json = format!(
                r#"{{"apiVersion":"multicluster.x-k8s.io/{version}","kind":"ServiceExport",
                "metadata":{{"name":"web","namespace":"shop"}}}}"#
            );
            let se: ServiceExport = serde_json::from_str(&json).unwrap();
            assert_eq!(se.metadata.name.as_deref(), Some("web"));
            assert_eq!(se.spec, ExportSpec::default());
        }
        let se: ServiceExport = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"exportedLabels": {"team": "a"}, "exportedAnnotations": {"note": "x"}},
        }))
        .unwrap();
        assert_eq!(se.spec.exported_labels["team"], "a");
        assert_eq!(se.spec.exported_annotations["note"], "x");
        let schema = service_export_crd().unwrap().spec.versions[0]
            .schema
            .clone()
            .unwrap()
            .open_api_v3_schema
            .unwrap();
        assert!(
            schema
                .required
                .as_ref()
                .is_none_or(|r| !r.contains(&"spec".to_string())),
            "{:?}",
            schema.required
        );
        use kube::Resource;
        assert_eq!(
            ServiceExport::api_version(&()),
            "multicluster.x-k8s.io/v1beta1"
        );
    }
}
