//! The node gateways as the controller knows them: each node's registration (its key and
//! endpoint), its open streams and its latest report (pure bookkeeping; the caller passes
//! `now`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

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
    /// Registered nodes without an open stream, since when (a restored registration counts
    /// from the restore).
    pub silent_since: BTreeMap<String, Instant>,
}

impl Gateways {
    /// A gateway registered on a new stream.
    pub fn register(&mut self, reg: GatewayRegistration) {
        *self.streams.entry(reg.node.clone()).or_default() += 1;
        self.silent_since.remove(&reg.node);
        self.registrations.insert(reg.node.clone(), reg);
        self.connected += 1;
    }

    /// A gateway's stream ended; its registration stays (the node's tunnels keep running on
    /// the last state), but from now on the node counts as silent.
    pub fn disconnected(&mut self, node: &str, now: Instant) {
        if let Some(streams) = self.streams.get_mut(node) {
            *streams = streams.saturating_sub(1);
            if *streams == 0 {
                self.silent_since.insert(node.to_owned(), now);
            }
        }
        self.connected = self.connected.saturating_sub(1);
    }

    /// Registrations restored from the store: no stream is open for them yet.
    pub fn restore(&mut self, registrations: BTreeMap<String, GatewayRegistration>, now: Instant) {
        self.silent_since = registrations
            .keys()
            .filter(|n| !self.is_connected(n))
            .map(|n| (n.clone(), now))
            .collect();
        self.registrations = registrations;
    }

    /// The nodes whose gateway has been silent for longer than `lease`: their pods cannot be
    /// counted on from another node or cluster, so their endpoints are exported not ready.
    pub fn lapsed(&self, now: Instant, lease: Duration) -> BTreeSet<String> {
        self.silent_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) > lease)
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// When the next silent gateway lapses, if any has not yet.
    pub fn next_lapse(&self, now: Instant, lease: Duration) -> Option<Instant> {
        self.silent_since
            .values()
            .map(|since| *since + lease)
            .filter(|at| *at >= now)
            .min()
    }

    pub fn report(&mut self, node: &str, report: GatewayReport, now: Instant) {
        self.reports.insert(node.to_owned(), (report, now));
    }

    /// Whether `node`'s gateway has a stream open.
    pub fn is_connected(&self, node: &str) -> bool {
        self.streams.get(node).is_some_and(|n| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(node: &str) -> GatewayRegistration {
        GatewayRegistration {
            node: node.into(),
            endpoint: "198.18.0.1:51820".parse().unwrap(),
            public_key: trellis_core::cluster::PublicKey([1; 32]),
        }
    }

    #[test]
    fn a_gateway_silent_past_the_lease_lapses_until_it_registers_again() {
        let lease = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut g = Gateways::default();
        g.register(registration("n0"));
        // A reconnect overlaps the old stream: one of two closing is not silence.
        g.register(registration("n0"));
        g.disconnected("n0", t0);
        assert!(g.silent_since.is_empty());
        g.disconnected("n0", t0);
        assert!(g.lapsed(t0 + lease, lease).is_empty(), "within the lease");
        assert_eq!(g.next_lapse(t0, lease), Some(t0 + lease));
        assert_eq!(
            g.lapsed(t0 + lease + Duration::from_millis(1), lease),
            BTreeSet::from(["n0".to_string()])
        );
        assert!(g.registrations.contains_key("n0"), "the registration stays");
        g.register(registration("n0"));
        assert!(g.lapsed(t0 + lease * 2, lease).is_empty());
    }

    #[test]
    fn restored_registrations_count_as_silent_from_the_restore() {
        let lease = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut g = Gateways::default();
        g.restore(BTreeMap::from([("n0".to_string(), registration("n0"))]), t0);
        assert!(g.lapsed(t0 + lease, lease).is_empty());
        assert_eq!(g.lapsed(t0 + lease * 2, lease).len(), 1);
    }
}
