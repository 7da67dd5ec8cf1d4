//! The gateway's status report ([`trellis_core::status::GatewayReport`]): its tunnel peers as
//! the device loop counts them, the desired state applied, and the drops by reason. Sent to
//! the controller every few seconds and served on `GET /status`. With NetworkPolicy on, the
//! policy in the kernel: its digest tells the controller (and the lab) that a change is
//! enforced on this node.

use trellis_core::status::{GatewayReport, PolicyReport, TunnelStatus, split_peer_name};

use crate::Error;
use crate::device::{DeviceHandle, PeerStats};
use crate::metrics::{DropReason, Metrics};

/// Pure: the report for these peer statistics and this applied state.
pub fn build_report(
    node: &str,
    stats: &[PeerStats],
    revision: u64,
    node_encryption: Option<bool>,
    drops: impl IntoIterator<Item = (String, u64)>,
    policy: Option<PolicyReport>,
) -> GatewayReport {
    GatewayReport {
        node: node.to_string(),
        revision,
        node_encryption,
        peers: stats
            .iter()
            .map(|peer| {
                let (cluster, node) = split_peer_name(&peer.name);
                TunnelStatus {
                    cluster,
                    node,
                    public_key: peer.public_key,
                    endpoint: peer.endpoint,
                    last_handshake_age_seconds: peer.since_last_handshake.map(|d| d.as_secs()),
                    handshakes: peer.handshakes,
                    rx_bytes: peer.rx_bytes,
                    tx_bytes: peer.tx_bytes,
                }
            })
            .collect(),
        drops: drops.into_iter().filter(|(_, n)| *n > 0).collect(),
        policy,
    }
}

/// The report of the running gateway: asks the device loop for its peers.
pub async fn report(
    node: &str,
    device: &DeviceHandle,
    metrics: &Metrics,
) -> Result<GatewayReport, Error> {
    let stats = device.stats().await?;
    let drops = DropReason::ALL
        .iter()
        .map(|reason| (reason.label().to_string(), metrics.drops(*reason)));
    Ok(build_report(
        node,
        &stats,
        u64::try_from(metrics.state_revision.get()).unwrap_or(0),
        metrics.node_encryption(),
        drops,
        metrics.policy.report(),
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use trellis_core::wgkey::PublicKey;

    use super::*;
    use crate::device::tests::{FakeNet, peer_of, start};

    #[test]
    fn peers_are_split_into_cluster_and_node_and_only_real_drops_listed() {
        let stats = [
            PeerStats {
                name: "c2/node-0".into(),
                public_key: PublicKey([2; 32]),
                endpoint: Some("198.18.2.10:51820".parse().unwrap()),
                since_last_handshake: Some(Duration::from_millis(4_900)),
                handshakes: 2,
                tx_bytes: 10,
                rx_bytes: 20,
            },
            PeerStats {
                name: "laptop".into(),
                public_key: PublicKey([3; 32]),
                endpoint: None,
                since_last_handshake: None,
                handshakes: 0,
                tx_bytes: 0,
                rx_bytes: 0,
            },
        ];
        let report = build_report(
            "node-0",
            &stats,
            9,
            Some(true),
            [("no_route".to_string(), 3), ("replay".to_string(), 0)],
            Some(PolicyReport {
                revision: 9,
                digest: "abc".into(),
                rules: 4,
                ..PolicyReport::default()
            }),
        );
        assert_eq!(report.policy.as_ref().map(|p| p.rules), Some(4));
        assert_eq!(report.revision, 9);
        assert_eq!(report.node_encryption, Some(true));
        assert_eq!(report.peers[0].cluster, "c2");
        assert_eq!(report.peers[0].node, "node-0");
        assert_eq!(report.peers[0].last_handshake_age_seconds, Some(4));
        assert_eq!(
            (report.peers[0].rx_bytes, report.peers[0].tx_bytes),
            (20, 10)
        );
        assert_eq!(report.peers[1].name(), "laptop");
        assert_eq!(report.peers[1].last_handshake_age_seconds, None);
        assert_eq!(report.drops.len(), 1);
        assert_eq!(report.total_drops(), 3);
        assert_eq!(report.validate("node-0"), Ok(()));
    }

    #[tokio::test]
    async fn a_running_device_reports_its_peers_revision_and_mode() {
        let net = FakeNet::default();
        let a = start(&net, "198.18.0.1:51820");
        let b = start(&net, "198.18.0.2:51820");
        a.handle
            .set_peers(vec![peer_of(&b, "c2/node-1", "10.2.0.0/24")], true)
            .await
            .unwrap();
        a.metrics.state_revision.set(4);
        a.metrics.set_node_encryption(false);
        a.metrics.drop_packet(DropReason::NoRoute);
        let report = report("node-0", &a.handle, &a.metrics).await.unwrap();
        assert_eq!(report.node, "node-0");
        assert_eq!(report.revision, 4);
        assert_eq!(report.node_encryption, Some(false));
        assert_eq!(report.peers.len(), 1);
        assert_eq!(report.peers[0].name(), "c2/node-1");
        assert_eq!(report.peers[0].public_key, b.keys.public_key());
        assert_eq!(report.drops.get("no_route"), Some(&1));
        assert_eq!(report.policy, None, "no policy enforced");
        // Once a ruleset is in the kernel the report carries it, with the table's drops.
        a.metrics.policy.applied(
            Some(0.01),
            Some(PolicyReport {
                revision: 4,
                digest: "d".into(),
                local_pods: vec!["10.0.0.2".parse().unwrap()],
                rules: 2,
                ..PolicyReport::default()
            }),
        );
        a.metrics.policy.record_drops((5, 1, 2));
        let policy = super::report("node-0", &a.handle, &a.metrics)
            .await
            .unwrap()
            .policy
            .unwrap();
        assert_eq!((policy.digest.as_str(), policy.rules), ("d", 2));
        assert_eq!((policy.dropped_ingress, policy.dropped_egress), (5, 1));
    }
}
