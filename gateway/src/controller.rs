//! Following the cluster's controller: register (node name, endpoint, public key — never the
//! private key), then apply the desired state it streams (a snapshot, then deltas). The
//! connection, TLS with this node's identity, keepalives, the revision-gap check and the
//! reconnects with backoff are the shared agent client's ([`trellis_agent_client`]); this
//! module is what a gateway does with the stream. When the controller goes away the data plane
//! keeps running on the last state; after a reconnect the gateway gets a fresh snapshot.
//!
//! The registration comes from a `watch` channel: sending a new one (a rotated WireGuard key)
//! makes the client reconnect at once and register it.
//!
//! The desired state's policy inputs (the node's NetworkPolicy) are enforced with each state
//! applied ([`crate::policy`]); a resync retries a failed policy change.
//!
//! On the same stream the gateway reports its tunnels (an `AgentReport`) right after the
//! hello, after each plan it applies, and every `report_interval`, for the controller's
//! `GET /status`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;
use trellis_agent_client::{ClientConfig, Ended, Handler, Transport};
use trellis_core::agent::{
    AgentHello, AgentReport, AgentRole, GatewayDesired, GatewayRegistration, MAX_AGENT_FRAME,
    MAX_REPORT_FRAME,
};
use trellis_core::framing::encode_json_frame;
use trellis_netns::Netns;

use crate::gateway::Reconciler;
use crate::policy::NodePolicy;
use crate::routes::RouteTable;

/// Where the controller is and what to tell it.
#[derive(Debug, Clone)]
pub struct ControllerSource {
    pub address: SocketAddr,
    /// Mutual TLS with this node's identity (or the deprecated shared token).
    pub transport: Transport,
    /// The current registration; a new value re-registers (key rotation).
    pub registration: watch::Receiver<GatewayRegistration>,
    /// How often to report the tunnels' status
    /// ([`trellis_core::status::REPORT_INTERVAL_SECONDS`] by default).
    pub report_interval: Duration,
}

/// Applies what the controller streams, and reports.
struct Applier<'a, R: RouteTable> {
    reconciler: &'a Reconciler<R>,
    address: SocketAddr,
}

impl<R: RouteTable> Handler for Applier<'_, R> {
    type State = GatewayDesired;

    async fn applied(&mut self, state: &GatewayDesired) -> bool {
        self.reconciler.metrics.controller_updates.inc();
        match self
            .reconciler
            .apply_desired(&state.plan(), node_policy(state).as_ref())
            .await
        {
            Ok(()) => {
                self.reconciler
                    .metrics
                    .set_node_encryption(state.node_encryption);
                // The controller hears about a newly applied plan at once.
                true
            }
            Err(e) => {
                tracing::warn!(
                    "apply desired state revision {}: {}",
                    state.revision,
                    trellis_core::error_chain(&e)
                );
                false
            }
        }
    }

    async fn resync(&mut self, state: &GatewayDesired) {
        // Repair drift and retry failures on the last state.
        if let Err(e) = self
            .reconciler
            .apply_desired(&state.plan(), node_policy(state).as_ref())
            .await
        {
            tracing::warn!(
                "re-apply desired state revision {}: {}",
                state.revision,
                trellis_core::error_chain(&e)
            );
        }
    }

    async fn report(&mut self, hello: &AgentHello) -> Option<Vec<u8>> {
        let AgentRole::Gateway(registration) = &hello.role else {
            return None;
        };
        let report = match crate::status::report(
            &registration.node,
            &self.reconciler.device,
            &self.reconciler.metrics,
        )
        .await
        {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!("status report: {}", trellis_core::error_chain(&e));
                return None;
            }
        };
        // A report too large for the controller is skipped, not sent to end the stream.
        match encode_json_frame(&AgentReport::Gateway(report), "report", MAX_REPORT_FRAME) {
            Ok(frame) => Some(frame),
            Err(e) => {
                tracing::warn!("status report: {}", trellis_core::error_chain(&e));
                None
            }
        }
    }

    fn connected(&mut self, up: bool, ended: Option<&Ended>) {
        self.reconciler
            .metrics
            .controller_connected
            .set(i64::from(up));
        if up {
            tracing::info!(controller = %self.address, "registered with the controller");
        }
        let _ = ended;
    }
}

/// The policy the desired state asks this node to enforce.
fn node_policy(state: &GatewayDesired) -> Option<NodePolicy> {
    state.policy.as_ref().map(|inputs| NodePolicy {
        node: state.node.clone(),
        inputs: inputs.clone(),
    })
}

/// Follows the controller forever. `netns`: where to open the connection (the gateway's
/// namespace when it runs in-process in another one; `None` for the caller's).
pub async fn follow_controller<R: RouteTable>(
    reconciler: &Reconciler<R>,
    source: &ControllerSource,
    netns: Option<&Netns>,
    resync: Duration,
) {
    let config = ClientConfig {
        address: source.address.to_string(),
        transport: source.transport.clone(),
        max_frame: MAX_AGENT_FRAME,
        resync: Some(resync),
        report: Some(source.report_interval.max(Duration::from_millis(100))),
    };
    let mut applier = Applier {
        reconciler,
        address: source.address,
    };
    let mut state = None;
    trellis_agent_client::follow(
        &config,
        source.registration.clone(),
        netns,
        &mut applier,
        &mut state,
    )
    .await;
}
