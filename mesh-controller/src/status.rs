//! The controller's status document, as JSON on `GET /status` (defined in `trellis-core` so
//! that `trellis status` reads exactly what is served), built purely from the hub's parts.

use std::collections::BTreeSet;
use std::time::{Instant, SystemTime};

use trellis_core::cluster::ClusterId;
use trellis_core::imports::Imports;

pub use trellis_core::status::{
    ControllerStatus, ImportStatus, MAX_STATUS_IMPORTS, NodeStatus, RemoteStatus,
};

use crate::gateways::Gateways;
use crate::mesh::Mesh;
use crate::sessions::Sessions;
use crate::source::SourceState;

/// What the status document is built from.
#[derive(Debug)]
pub struct StatusParts<'a> {
    pub cluster: &'a ClusterId,
    pub name: &'a str,
    pub configured: &'a [ClusterId],
    pub mesh: &'a Mesh,
    pub sessions: &'a Sessions,
    pub gateways: &'a Gateways,
    pub source: Option<&'a SourceState>,
    pub revision: u64,
    pub mesh_revision: u64,
    pub node_encryption: bool,
    /// The policy inputs nodes are sent now, with their digest (when enforcing policy).
    pub policy: Option<(&'a trellis_core::policy::PolicyInputs, &'a str)>,
    /// What this cluster imports (the last mesh view's).
    pub imports: &'a Imports,
    /// The external peers' verdicts.
    pub external_peers: &'a trellis_core::external_peer::Admission,
    /// The local cluster state (its external peers' addresses advertised).
    pub local: &'a trellis_core::cluster::ClusterState,
}

/// What an external peer routes into the mesh: the pod and service CIDRs of this cluster
/// and of the admitted peer clusters, adjacent ones merged.
fn mesh_cidrs(parts: &StatusParts<'_>) -> Vec<ipnet::IpNet> {
    let mut all: Vec<ipnet::IpNet> = parts.local.cidrs().collect();
    for remote in parts.mesh.admitted() {
        all.extend(remote.cidrs());
    }
    ipnet::IpNet::aggregate(&all)
}

/// Every configured peer with its connection, revision, sync age and lag, counts and, when
/// refused, why; every node with its gateway's registration, stream and latest report (aged
/// to `now`); every import with its type, VIPs, exporting clusters' endpoints and conflicts.
pub fn document(parts: &StatusParts<'_>, now: Instant, wall: SystemTime) -> ControllerStatus {
    let remotes = parts
        .configured
        .iter()
        .map(|id| remote_status(parts, id, now, wall))
        .collect();
    let gateways = parts.gateways;
    let mut names: BTreeSet<&String> = gateways.registrations.keys().collect();
    names.extend(gateways.reports.keys());
    if let Some(source) = parts.source {
        names.extend(source.nodes.keys());
    }
    let nodes = names
        .into_iter()
        .map(|node| {
            let registration = gateways.registrations.get(node);
            let report = gateways.reports.get(node).map(|(report, at)| {
                let age = now.saturating_duration_since(*at).as_secs();
                (report.aged(age), age)
            });
            NodeStatus {
                node: node.clone(),
                in_source: parts.source.is_some_and(|s| s.nodes.contains_key(node)),
                registered: registration.is_some(),
                connected: gateways.is_connected(node),
                endpoint: registration.map(|r| r.endpoint),
                public_key: registration.map(|r| r.public_key),
                report_age_seconds: report.as_ref().map(|(_, age)| *age),
                report: report.map(|(report, _)| report),
            }
        })
        .collect();
    ControllerStatus {
        cluster: parts.cluster.clone(),
        name: parts.name.to_owned(),
        source_synced: parts.source.is_some(),
        revision: parts.revision,
        mesh_revision: parts.mesh_revision,
        node_encryption: parts.node_encryption,
        gateways_connected: gateways.connected,
        remotes,
        nodes,
        source_digest: parts.source.and_then(|s| s.digest.clone()),
        policy: parts.policy.map(|(inputs, digest)| {
            let refused = parts
                .source
                .map(|s| s.policy.refused.iter().map(ToString::to_string).collect())
                .unwrap_or_default();
            crate::policy_view::policy_status(inputs, digest, refused)
        }),
        imports: parts
            .imports
            .services
            .values()
            .take(MAX_STATUS_IMPORTS)
            .map(ImportStatus::of)
            .collect(),
        imports_total: parts.imports.services.len(),
        external_peers: parts.external_peers.statuses(),
        mesh_cidrs: mesh_cidrs(parts),
    }
}

fn remote_status(
    parts: &StatusParts<'_>,
    id: &ClusterId,
    now: Instant,
    wall: SystemTime,
) -> RemoteStatus {
    let r = parts.mesh.get(id);
    let session = parts.sessions.contains(id);
    RemoteStatus {
        cluster: id.clone(),
        session,
        synced: r.is_some(),
        ready: session && r.is_some_and(|r| r.connected && !r.whole),
        revision: r.map(|r| r.state.revision),
        last_sync_age_seconds: r
            .map(|r| wall.duration_since(r.last_sync).map_or(0, |d| d.as_secs())),
        lag_seconds: r.map(|r| now.saturating_duration_since(r.last_heard).as_secs()),
        last_sync_unix: r.and_then(|r| {
            r.last_sync
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        }),
        // What of it is admitted (and so routed and imported).
        nodes: r.map_or(0, |r| r.admitted.nodes.len()),
        services: r.map_or(0, |r| r.admitted.services.len()),
        endpoints: r.map_or(0, |r| r.admitted.endpoint_count()),
        refused: r
            .filter(|r| r.whole)
            .map(|r| r.refusals.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        refused_claims: r
            .filter(|r| !r.whole)
            .map(|r| r.refusals.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        refused_claims_total: r
            .filter(|r| !r.whole)
            .map_or(0, |r| r.counts.values().sum()),
    }
}
