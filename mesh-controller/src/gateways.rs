//! The node gateways as the controller knows them: each node's registration (its key and
//! endpoint), its open streams and its latest report (pure bookkeeping; the caller passes
//! `now`).

use std::collections::BTreeMap;
use std::time::Instant;

use trellis_core::agent::GatewayRegistration;
use trellis_core::status::GatewayReport;

#[derive(Debug, Default)]
pub struct Gateways {
    pub registrations: BTreeMap<String, GatewayRegistration>,
    /// Open gateway streams in total.
    pub connected: usize,
    /// Open gateway streams per node (a reconnect may overlap the old stream briefly).
    pub streams: BTreeMap<String, usize>,
    /// Each node's latest gateway report and when it arrived.
    pub reports: BTreeMap<String, (GatewayReport, Instant)>,
}

impl Gateways {
    /// A gateway registered on a new stream.
    pub fn register(&mut self, reg: GatewayRegistration) {
        *self.streams.entry(reg.node.clone()).or_default() += 1;
        self.registrations.insert(reg.node.clone(), reg);
        self.connected += 1;
    }

    /// A gateway's stream ended; its registration stays.
    pub fn disconnected(&mut self, node: &str) {
        if let Some(streams) = self.streams.get_mut(node) {
            *streams = streams.saturating_sub(1);
        }
        self.connected = self.connected.saturating_sub(1);
    }

    pub fn report(&mut self, node: &str, report: GatewayReport, now: Instant) {
        self.reports.insert(node.to_owned(), (report, now));
    }

    /// Whether `node`'s gateway has a stream open.
    pub fn is_connected(&self, node: &str) -> bool {
        self.streams.get(node).is_some_and(|n| *n > 0)
    }
}
