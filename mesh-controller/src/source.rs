//! What a source (Kubernetes or the static file) knows of the cluster, and how the local
//! cluster state is composed from it and the gateways' registrations (pure).

use std::collections::BTreeMap;

use ipnet::IpNet;
use trellis_core::agent::GatewayRegistration;
use trellis_core::cluster::{
    ClusterId, ClusterState, ExportedService, NodeGateway, NodeState, ServiceKey,
};

/// What a source (Kubernetes or the static file) knows of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceState {
    /// The cluster ID the source found (KEP-2149 `cluster.clusterset.k8s.io`), if any.
    pub cluster_id: Option<ClusterId>,
    pub service_cidrs: Vec<IpNet>,
    pub nodes: BTreeMap<String, NodeState>,
    pub services: BTreeMap<ServiceKey, ExportedService>,
}

impl SourceState {
    /// The local cluster state (at revision 0) this source and the gateways' registrations
    /// describe; `default_service_cidrs` stand in when the source reports none.
    pub fn compose(
        &self,
        id: &ClusterId,
        name: &str,
        default_service_cidrs: &[IpNet],
        registrations: &BTreeMap<String, GatewayRegistration>,
    ) -> ClusterState {
        let mut next = ClusterState::new(id.clone(), name.to_owned());
        next.service_cidrs = if self.service_cidrs.is_empty() {
            default_service_cidrs.to_vec()
        } else {
            self.service_cidrs.clone()
        };
        next.services = self.services.clone();
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
