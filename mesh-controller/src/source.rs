//! What a source (Kubernetes or the static file) knows of the cluster, and how the local
//! cluster state is composed from it and the gateways' registrations (pure).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::identities::{IdentityAllocator, local_identities};
use crate::policy_source::PolicySource;
use trellis_core::agent::GatewayRegistration;
use trellis_core::cluster::{
    ClusterId, ClusterState, ExportedService, NodeGateway, NodeState, ServiceKey,
};
use trellis_core::external_peer::ExternalPeerSpec;

/// What a source (Kubernetes or the static file) knows of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceState {
    /// The cluster ID the source found (KEP-2149 `cluster.clusterset.k8s.io`), if any.
    pub cluster_id: Option<ClusterId>,
    pub service_cidrs: Vec<IpNet>,
    pub nodes: BTreeMap<String, NodeState>,
    pub services: BTreeMap<ServiceKey, ExportedService>,
    /// NetworkPolicies, pods and namespaces (used when the controller enforces policy).
    pub policy: PolicySource,
    /// SHA-256 (hex) of the static file this was read from; `None` for Kubernetes.
    pub digest: Option<String>,
    /// The clusterset IPs the cluster has given its imports (on Kubernetes: the ClusterIPs
    /// of the derived Services the controller created), by imported service.
    pub clusterset_ips: BTreeMap<ServiceKey, Vec<std::net::IpAddr>>,
    /// External peers as their authors wrote them (checked when the state is composed).
    pub external_peers: Vec<ExternalPeerSpec>,
}

impl SourceState {
    /// The local cluster state (at revision 0) this source and the gateways' registrations
    /// describe; `default_service_cidrs` stand in when the source reports none. With an
    /// identity allocator (the controller enforces NetworkPolicy) the state carries the
    /// cluster's policy identities and pods, which peers need to select them.
    pub fn compose(
        &self,
        id: &ClusterId,
        name: &str,
        default_service_cidrs: &[IpNet],
        registrations: &BTreeMap<String, GatewayRegistration>,
        lapsed_gateways: &BTreeSet<String>,
        identities: Option<&mut IdentityAllocator>,
    ) -> ClusterState {
        let mut next = ClusterState::new(id.clone(), name.to_owned());
        next.service_cidrs = if self.service_cidrs.is_empty() {
            default_service_cidrs.to_vec()
        } else {
            self.service_cidrs.clone()
        };
        next.services = self.services.clone();
        // A node whose gateway went silent past the lease may be gone: its pods leave every
        // clusterset VIP and headless answer (elsewhere and here) until it registers again.
        if !lapsed_gateways.is_empty() {
            for svc in next.services.values_mut() {
                for e in &mut svc.endpoints {
                    if e.node.as_ref().is_some_and(|n| lapsed_gateways.contains(n)) {
                        e.ready = false;
                    }
                }
            }
        }
        if let Some(allocator) = identities {
            (next.identities, next.pods) = local_identities(id, &self.policy, allocator);
        }
        next.nodes = self.nodes.clone();
        for (name, node) in next.nodes.iter_mut() {
            if let Some(reg) = registrations.get(name) {
                node.gateway = Some(NodeGateway {
                    endpoint: reg.endpoint,
                    public_key: reg.public_key,
                });
            }
        }
        next
    }
}
