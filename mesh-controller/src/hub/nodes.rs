//! The hub's side of the node gateways: registrations, streams and reports.

use std::time::Instant;

use trellis_core::status::{GatewayReport, ReportError};

use super::Hub;
use crate::gateway::GatewayRegistration;
use crate::metrics::ReportResult;

impl Hub {
    /// A node's gateway registered (or re-registered with a new key or endpoint).
    pub fn register_gateway(&self, reg: GatewayRegistration) {
        let mut inner = self.lock();
        if let Some(src) = &inner.source
            && !src.nodes.contains_key(&reg.node)
        {
            tracing::warn!(
                node = %reg.node,
                "a gateway registered for a node the source does not know; it takes effect when the node appears"
            );
        }
        inner.lapsed_gateways.remove(&reg.node);
        inner.gateways.register(reg);
        self.metrics
            .gateways_registered
            .set(i64::try_from(inner.gateways.connected).unwrap_or(i64::MAX));
        self.recompose(&mut inner);
    }

    /// The gateway of `node` (registered on this stream) reported. A report for another node,
    /// or one out of bounds, is refused (and counted) and changes nothing.
    pub fn gateway_report(&self, node: &str, report: GatewayReport) -> Result<(), ReportError> {
        if let Err(e) = report.validate(node) {
            self.metrics.gateway_report(ReportResult::Rejected);
            return Err(e);
        }
        self.metrics.gateway_report(ReportResult::Accepted);
        self.lock().gateways.report(node, report, Instant::now());
        Ok(())
    }

    /// The source's addresses of `node` (its InternalIPs), where its gateway may register an
    /// endpoint; `None` when the source does not know the node (or has not synced yet).
    pub fn node_addresses(&self, node: &str) -> Option<Vec<std::net::IpAddr>> {
        let inner = self.lock();
        let n = inner.source.as_ref()?.nodes.get(node)?;
        Some(n.internal_ips.clone())
    }

    /// The stream of `node`'s gateway ended; its registration (and so its node's peers
    /// elsewhere) stays: the data plane keeps running on the last state.
    pub fn gateway_disconnected(&self, node: &str) {
        let mut inner = self.lock();
        inner.gateways.disconnected(node, Instant::now());
        self.metrics
            .gateways_registered
            .set(i64::try_from(inner.gateways.connected).unwrap_or(i64::MAX));
    }
}
