//! The checks of `trellis diagnose`: each a pure function of the gathered [`Facts`], each
//! result pass, warn, fail or unknown, with the fix for what is not right.

use std::time::{Duration, SystemTime};

use trellis_cni::config::WIREGUARD_OVERHEAD;

use super::{CertificateFacts, Facts, GatewayFacts};
use crate::cluster::ClockOffset;

/// Clocks further apart than this fail: the controller backdates the node certificates it
/// issues by 5 minutes, and NTP keeps clocks within milliseconds.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Clocks further apart than this are worth a warning.
pub const WARN_SKEW: Duration = Duration::from_secs(5);
/// A certificate expiring within this is worth a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Pass,
    /// Could not be told (a fact missing); not a failure.
    Unknown,
    Warn,
    Fail,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Pass => "ok",
            Self::Unknown => "unknown",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What is checked: `rp_filter`, `mtu`.
    pub name: &'static str,
    /// On what: a node, a peer cluster, a certificate.
    pub subject: String,
    pub outcome: Outcome,
    pub detail: String,
    /// What to do when it is not a pass.
    pub fix: Option<String>,
}

fn check(
    name: &'static str,
    subject: impl Into<String>,
    outcome: Outcome,
    detail: String,
) -> Check {
    Check {
        name,
        subject: subject.into(),
        outcome,
        detail,
        fix: None,
    }
}

impl Check {
    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// Every check, in the order a user reads them.
pub fn all(facts: &Facts) -> Vec<Check> {
    let mut checks = vec![controller(facts)];
    checks.extend(gateways_registered(facts));
    checks.extend(peering(facts));
    checks.extend(node_facts(facts));
    checks.extend(rp_filter(facts));
    checks.extend(cni_conflist(facts));
    checks.extend(mtu(facts));
    checks.extend(clock_skew(facts));
    checks.extend(certificates(facts));
    checks
}

fn gateway_pods(facts: &Facts) -> String {
    format!(
        "kubectl -n {} get pods -l app.kubernetes.io/name=trellis,app.kubernetes.io/component=gateway -o wide",
        facts.namespace
    )
}

pub fn controller(facts: &Facts) -> Check {
    match &facts.controller {
        Ok(status) => check(
            "controller",
            status.cluster.to_string(),
            Outcome::Pass,
            format!(
                "answers /status (revision {}, source {})",
                status.revision,
                if status.source_synced {
                    "synced"
                } else {
                    "not synced"
                }
            ),
        ),
        Err(error) => check("controller", "-", Outcome::Fail, error.clone()).fix(format!(
            "kubectl -n {ns} get pods -l app.kubernetes.io/name=trellis,app.kubernetes.io/component=controller; \
             kubectl -n {ns} logs deploy/{service}",
            ns = facts.namespace,
            service = facts.controller_service
        )),
    }
}

/// Every node the controller knows has a registered, connected gateway; every gateway pod's
/// node is known to the controller.
pub fn gateways_registered(facts: &Facts) -> Vec<Check> {
    let Ok(status) = &facts.controller else {
        return vec![check(
            "gateway registered",
            "-",
            Outcome::Unknown,
            "the controller's status is needed".into(),
        )];
    };
    let logs = |node: &str| {
        let pod = facts
            .gateways
            .iter()
            .find(|g| g.node == node)
            .map_or("<the gateway pod of the node>", |g| g.pod.as_str());
        format!(
            "kubectl -n {} logs {pod} -c gateway (it registers with the controller's agent port)",
            facts.namespace
        )
    };
    let mut checks: Vec<Check> = status
        .nodes
        .iter()
        .map(|node| {
            let (outcome, detail) = match (node.registered, node.connected) {
                (_, true) => (Outcome::Pass, "registered and connected".to_string()),
                (true, false) => (
                    Outcome::Fail,
                    "registered, but not connected to the controller".to_string(),
                ),
                (false, _) => (Outcome::Fail, "no gateway registered".to_string()),
            };
            let done = check("gateway registered", node.node.clone(), outcome, detail);
            if outcome == Outcome::Pass {
                done
            } else {
                done.fix(logs(&node.node))
            }
        })
        .collect();
    for gateway in &facts.gateways {
        if !status.nodes.iter().any(|n| n.node == gateway.node) {
            checks.push(
                check(
                    "gateway registered",
                    gateway.node.clone(),
                    Outcome::Fail,
                    format!(
                        "gateway pod {} runs here, but the controller does not know the node",
                        gateway.pod
                    ),
                )
                .fix(logs(&gateway.node)),
            );
        }
    }
    if checks.is_empty() {
        checks.push(
            check(
                "gateway registered",
                "-",
                Outcome::Fail,
                "no node and no gateway found".into(),
            )
            .fix(gateway_pods(facts)),
        );
    }
    checks
}

/// Every configured peer cluster is connected, synced and admitted.
pub fn peering(facts: &Facts) -> Vec<Check> {
    let Ok(status) = &facts.controller else {
        return vec![check(
            "peering",
            "-",
            Outcome::Unknown,
            "the controller's status is needed".into(),
        )];
    };
    if status.remotes.is_empty() {
        return vec![
            check(
                "peering",
                "-",
                Outcome::Warn,
                "no peer cluster configured".into(),
            )
            .fix("trellis mesh connect --context <this> --destination-context <other>"),
        ];
    }
    status
        .remotes
        .iter()
        .map(|remote| {
            let subject = remote.cluster.to_string();
            if !remote.refused.is_empty() {
                return check(
                    "peering",
                    subject,
                    Outcome::Fail,
                    format!("refused: {}", remote.refused.join("; ")),
                )
                .fix("the two clusters' pod and service CIDRs and IDs must not overlap: change one side's ranges or ID");
            }
            if !remote.session {
                return check(
                    "peering",
                    subject,
                    Outcome::Fail,
                    "not connected".into(),
                )
                .fix(format!(
                    "the peer's endpoint must be reachable over UDP (peering port, NodePort or LoadBalancer), and both \
                     clusters' certificates signed by one mesh CA: `trellis status` on both sides, \
                     `kubectl -n {} logs deploy/{}`",
                    facts.namespace, facts.controller_service
                ));
            }
            if !remote.ready {
                return check(
                    "peering",
                    subject,
                    Outcome::Fail,
                    "connected, but not synced".into(),
                )
                .fix("wait for its snapshot; if it stays so, the peer controller's log says why");
            }
            check(
                "peering",
                subject,
                Outcome::Pass,
                format!(
                    "connected and synced ({} nodes, {} services)",
                    remote.nodes, remote.services
                ),
            )
        })
        .collect()
}

/// Every gateway answered with its node's facts.
pub fn node_facts(facts: &Facts) -> Vec<Check> {
    if facts.gateways.is_empty() {
        let detail = match &facts.pods_error {
            Some(error) => error.clone(),
            None => "no gateway pod found".into(),
        };
        return vec![check("node facts", "-", Outcome::Fail, detail).fix(gateway_pods(facts))];
    }
    facts
        .gateways
        .iter()
        .filter_map(|g| {
            let error = g.report.as_ref().err()?;
            Some(
                check("node facts", g.node.clone(), Outcome::Fail, error.clone()).fix(format!(
                    "is gateway pod {} running and ready? {}",
                    g.pod,
                    gateway_pods(facts)
                )),
            )
        })
        .collect()
}

fn with_reports(
    facts: &Facts,
) -> impl Iterator<Item = (&GatewayFacts, &trellis_gateway::node_report::NodeReport)> {
    facts
        .gateways
        .iter()
        .filter_map(|g| Some((g, g.report.as_ref().ok()?)))
}

/// Reverse-path filtering off for the tunnel: it has no address, so even loose filtering
/// drops what a node forwards from its own address.
pub fn rp_filter(facts: &Facts) -> Vec<Check> {
    with_reports(facts)
        .map(|(g, report)| {
            let rp = report.rp_filter;
            let shown = |v: Option<u8>| v.map_or("?".to_string(), |v| v.to_string());
            let detail = format!(
                "all={} default={} {}={} (underlay {}={})",
                shown(rp.all),
                shown(rp.default),
                report.tunnel,
                shown(rp.tunnel),
                report.underlay.as_deref().unwrap_or("?"),
                shown(rp.underlay)
            );
            match rp.effective_on_tunnel() {
                Some(0) => check("rp_filter", g.node.clone(), Outcome::Pass, detail),
                Some(_) => check("rp_filter", g.node.clone(), Outcome::Fail, format!(
                    "{detail}: the kernel filters packets arriving on {} (the larger of all and the device's value)",
                    report.tunnel
                ))
                .fix(format!(
                    "on node {}: sysctl -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
                     net.ipv4.conf.{}.rp_filter=0, and keep it in /etc/sysctl.d/",
                    g.node, report.tunnel
                )),
                None => check("rp_filter", g.node.clone(), Outcome::Unknown, detail),
            }
        })
        .collect()
}

/// The CNI conflist the chart installs is on every node.
pub fn cni_conflist(facts: &Facts) -> Vec<Check> {
    with_reports(facts)
        .map(|(g, report)| {
            let conflist = &report.cni_conflist;
            let path = conflist.path.as_deref().unwrap_or("-");
            match conflist.present {
                Some(true) => check("cni conflist", g.node.clone(), Outcome::Pass, format!("{path} present")),
                Some(false) => check("cni conflist", g.node.clone(), Outcome::Fail, format!(
                    "{path} missing: the container runtime cannot wire pods with Trellis"
                ))
                .fix(format!(
                    "kubectl -n {} logs {} -c install-cni; the chart's cni.confDir must be the runtime's CNI \
                     configuration directory",
                    facts.namespace, g.pod
                )),
                None => check(
                    "cni conflist",
                    g.node.clone(),
                    Outcome::Unknown,
                    match &conflist.path {
                        Some(path) => format!("{path} could not be read: see the node facts' errors"),
                        None => "the gateway was not given --cni-conflist".to_string(),
                    },
                ),
            }
        })
        .collect()
}

/// The underlay carries a full tunnel packet plus WireGuard's overhead, and pods send no more
/// than the tunnel carries.
pub fn mtu(facts: &Facts) -> Vec<Check> {
    with_reports(facts)
        .map(|(g, report)| {
            let m = report.mtu;
            let tunnel = m.tunnel.unwrap_or(m.configured_tunnel);
            let pod = report
                .cni_conflist
                .pod_mtu
                .or_else(|| m.default_route_device.map(|u| u.saturating_sub(WIREGUARD_OVERHEAD)));
            let Some(underlay) = m.underlay else {
                return check(
                    "mtu",
                    g.node.clone(),
                    Outcome::Unknown,
                    format!("tunnel {tunnel}; the underlay device was not found"),
                );
            };
            let shown_pod = pod.map_or("?".to_string(), |p| p.to_string());
            let detail = format!("underlay {underlay}, tunnel {tunnel}, pods {shown_pod}");
            let fix = format!(
                "helm upgrade ... --set mtu={} (the underlay's MTU minus {WIREGUARD_OVERHEAD}), then restart the \
                 pods created before",
                underlay.saturating_sub(WIREGUARD_OVERHEAD)
            );
            if tunnel + WIREGUARD_OVERHEAD > underlay {
                return check("mtu", g.node.clone(), Outcome::Fail, format!(
                    "{detail}: a full tunnel packet plus WireGuard's {WIREGUARD_OVERHEAD} bytes exceeds the underlay: \
                     large packets between nodes are lost"
                ))
                .fix(fix);
            }
            if let Some(pod) = pod
                && pod > tunnel
            {
                return check("mtu", g.node.clone(), Outcome::Fail, format!(
                    "{detail}: pods send packets larger than the tunnel carries"
                ))
                .fix(fix);
            }
            check("mtu", g.node.clone(), Outcome::Pass, detail)
        })
        .collect()
}

fn skew_outcome(skew_ms: i64, uncertainty_ms: u64) -> Outcome {
    // Only what is certainly beyond a limit counts against it.
    let certain = skew_ms.unsigned_abs().saturating_sub(uncertainty_ms);
    if certain > MAX_SKEW.as_millis() as u64 {
        Outcome::Fail
    } else if certain > WARN_SKEW.as_millis() as u64 {
        Outcome::Warn
    } else {
        Outcome::Pass
    }
}

fn seconds(ms: i64) -> String {
    format!("{:+.1}s", ms as f64 / 1000.0)
}

/// Every node's clock against the API server's.
pub fn clock_skew(facts: &Facts) -> Vec<Check> {
    let Some(api) = facts.api_clock else {
        return vec![check(
            "clock skew",
            "-",
            Outcome::Unknown,
            "the API server's clock (its Date header) was not read".into(),
        )];
    };
    with_reports(facts)
        .filter_map(|(g, _)| Some((g, g.clock?)))
        .map(|(g, clock)| {
            let skew = clock.offset_ms - api.offset_ms;
            let uncertainty = clock.uncertainty_ms + api.uncertainty_ms;
            let outcome = skew_outcome(skew, uncertainty);
            let detail = format!(
                "{} against the API server (±{uncertainty} ms)",
                seconds(skew)
            );
            let done = check("clock skew", g.node.clone(), outcome, detail);
            if outcome == Outcome::Pass {
                done
            } else {
                done.fix(format!(
                    "synchronise node {}'s clock (chrony or systemd-timesyncd): certificates and tokens are judged \
                     by each side's clock",
                    g.node
                ))
            }
        })
        .collect()
}

/// The clocks that judge the cluster's certificates: the API server's, every node's and this
/// machine's, each as an offset from this machine's.
fn clocks(facts: &Facts) -> Vec<(String, ClockOffset)> {
    let mut clocks = vec![(
        "this machine".to_string(),
        ClockOffset {
            offset_ms: 0,
            uncertainty_ms: 0,
        },
    )];
    if let Some(api) = facts.api_clock {
        clocks.push(("the API server".into(), api));
    }
    for (g, _) in with_reports(facts) {
        if let Some(clock) = g.clock {
            clocks.push((format!("node {}", g.node), clock));
        }
    }
    clocks
}

fn unix(at: SystemTime) -> i64 {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// The cluster's certificates (the `trellis-tls` Secret) are valid by every clock that judges
/// them, and not about to expire.
pub fn certificates(facts: &Facts) -> Vec<Check> {
    let certs = match &facts.certificates {
        Ok(certs) => certs,
        Err(error) => {
            return vec![
                check("certificate", facts.tls_secret.clone(), Outcome::Fail, error.clone()).fix(format!(
                    "create it: `trellis mesh enable --context <this>` (or `trellis certs cluster` and kubectl \
                     create secret generic {} -n {} --from-file=ca.crt --from-file=tls.crt --from-file=tls.key)",
                    facts.tls_secret, facts.namespace
                )),
            ];
        }
    };
    let now = unix(facts.now);
    let clocks = clocks(facts);
    certs
        .iter()
        .map(|cert| certificate(cert, now, &clocks, facts))
        .collect()
}

fn certificate(
    cert: &CertificateFacts,
    now: i64,
    clocks: &[(String, ClockOffset)],
    facts: &Facts,
) -> Check {
    let subject = format!("{}/{} ({})", facts.tls_secret, cert.key, cert.subject);
    let renew = format!(
        "renew it: `trellis mesh enable --context <this>` issues a new certificate from the mesh CA (Secret {}/{})",
        facts.namespace, facts.tls_secret
    );
    let valid = format!(
        "valid {} to {}",
        crate::status::format_utc(cert.not_before.max(0) as u64),
        crate::status::format_utc(cert.not_after.max(0) as u64)
    );
    for (who, clock) in clocks {
        let their_now = now + clock.offset_ms / 1000;
        if their_now < cert.not_before {
            return check(
                "certificate",
                subject,
                Outcome::Fail,
                format!(
                    "{valid}: not yet valid by {who}'s clock ({})",
                    crate::status::format_utc(their_now.max(0) as u64)
                ),
            )
            .fix(if who == "this machine" {
                "wait, or issue it with a start in the past".to_string()
            } else {
                format!("synchronise {who}'s clock")
            });
        }
        if their_now > cert.not_after {
            return check(
                "certificate",
                subject,
                Outcome::Fail,
                format!(
                    "{valid}: expired by {who}'s clock ({})",
                    crate::status::format_utc(their_now.max(0) as u64)
                ),
            )
            .fix(renew);
        }
    }
    let latest = clocks
        .iter()
        .map(|(_, c)| now + c.offset_ms / 1000)
        .max()
        .unwrap_or(now);
    let left = cert.not_after - latest;
    if left < EXPIRY_WARNING.as_secs() as i64 {
        return check(
            "certificate",
            subject,
            Outcome::Warn,
            format!(
                "{valid}: expires in {}",
                crate::status::human_age(left.max(0) as u64)
            ),
        )
        .fix(renew);
    }
    check("certificate", subject, Outcome::Pass, valid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::tests::{facts, facts_without_controller};

    fn outcomes(checks: &[Check]) -> Vec<(String, Outcome)> {
        checks
            .iter()
            .map(|c| (c.subject.clone(), c.outcome))
            .collect()
    }

    fn only(checks: Vec<Check>) -> Check {
        assert_eq!(checks.len(), 1, "{checks:#?}");
        checks.into_iter().next().unwrap()
    }

    #[test]
    fn a_healthy_cluster_passes_every_check() {
        let checks = all(&facts());
        let not_passed: Vec<_> = checks
            .iter()
            .filter(|c| c.outcome != Outcome::Pass)
            .collect();
        assert!(not_passed.is_empty(), "{not_passed:#?}");
        let names: std::collections::BTreeSet<_> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [
                "certificate",
                "clock skew",
                "cni conflist",
                "controller",
                "gateway registered",
                "mtu",
                "peering",
                "rp_filter"
            ]
        );
    }

    #[test]
    fn an_unreachable_controller_fails_and_leaves_its_checks_unknown() {
        let facts = facts_without_controller();
        let c = controller(&facts);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.fix.unwrap().contains("logs deploy/trellis-controller"));
        assert_eq!(only(gateways_registered(&facts)).outcome, Outcome::Unknown);
        assert_eq!(only(peering(&facts)).outcome, Outcome::Unknown);
    }

    #[test]
    fn unregistered_disconnected_and_unknown_gateways_fail() {
        let mut facts = facts();
        let status = facts.controller.as_mut().unwrap();
        status.nodes[0].connected = false;
        status.nodes[1].registered = false;
        status.nodes[1].connected = false;
        facts.gateways[1].node = "node-7".into();
        let checks = gateways_registered(&facts);
        assert_eq!(
            outcomes(&checks),
            [
                ("node-0".into(), Outcome::Fail),
                ("node-1".into(), Outcome::Fail),
                ("node-7".into(), Outcome::Fail)
            ]
        );
        assert!(checks[0].detail.contains("not connected"), "{checks:#?}");
        assert!(checks[1].detail.contains("no gateway registered"));
        assert!(checks[2].detail.contains("does not know the node"));
        assert!(
            checks[0]
                .fix
                .as_ref()
                .unwrap()
                .contains("logs trellis-gateway-")
        );
    }

    #[test]
    fn peers_not_connected_synced_or_admitted_fail() {
        let mut facts = facts();
        assert_eq!(only(peering(&facts)).outcome, Outcome::Pass);
        let remote = &mut facts.controller.as_mut().unwrap().remotes[0];
        remote.ready = false;
        assert!(only(peering(&facts)).detail.contains("not synced"));
        let remote = &mut facts.controller.as_mut().unwrap().remotes[0];
        remote.session = false;
        let c = only(peering(&facts));
        assert_eq!(
            (c.outcome, c.detail.as_str()),
            (Outcome::Fail, "not connected")
        );
        let remote = &mut facts.controller.as_mut().unwrap().remotes[0];
        remote.refused = vec!["pod CIDR 10.244.0.0/16 of c1 overlaps 10.244.0.0/16 of c2".into()];
        assert!(only(peering(&facts)).detail.contains("overlaps"));
        facts.controller.as_mut().unwrap().remotes.clear();
        assert_eq!(only(peering(&facts)).outcome, Outcome::Warn);
    }

    #[test]
    fn rp_filter_on_the_tunnel_fails_with_the_sysctl_to_run() {
        let mut facts = facts();
        assert!(rp_filter(&facts).iter().all(|c| c.outcome == Outcome::Pass));
        let report = facts.gateways[0].report.as_mut().unwrap();
        report.rp_filter.all = Some(2);
        let checks = rp_filter(&facts);
        assert_eq!(checks[0].outcome, Outcome::Fail);
        assert!(
            checks[0]
                .detail
                .starts_with("all=2 default=0 trellis0=0 (underlay eth0=0)"),
            "{}",
            checks[0].detail
        );
        assert!(
            checks[0]
                .fix
                .as_ref()
                .unwrap()
                .contains("sysctl -w net.ipv4.conf.all.rp_filter=0"),
            "{checks:#?}"
        );
        assert_eq!(checks[1].outcome, Outcome::Pass);
        facts.gateways[1].report.as_mut().unwrap().rp_filter.all = None;
        assert_eq!(rp_filter(&facts)[1].outcome, Outcome::Unknown);
    }

    #[test]
    fn a_missing_conflist_fails_and_an_unknown_one_is_unknown() {
        let mut facts = facts();
        facts.gateways[0]
            .report
            .as_mut()
            .unwrap()
            .cni_conflist
            .present = Some(false);
        let conflist = &mut facts.gateways[1].report.as_mut().unwrap().cni_conflist;
        conflist.present = None;
        conflist.path = None;
        let checks = cni_conflist(&facts);
        assert_eq!(
            outcomes(&checks),
            [
                ("node-0".into(), Outcome::Fail),
                ("node-1".into(), Outcome::Unknown)
            ]
        );
        assert!(checks[0].fix.as_ref().unwrap().contains("-c install-cni"));
        assert!(checks[1].detail.contains("--cni-conflist"));
    }

    #[test]
    fn an_underlay_too_small_for_the_tunnel_or_pods_larger_than_it_fail() {
        let mut facts = facts();
        assert_eq!(
            mtu(&facts)[0].detail,
            "underlay 1500, tunnel 1420, pods 1420"
        );
        // A cloud network of 1460 bytes (GCE): 1420 + 80 does not fit.
        facts.gateways[0].report.as_mut().unwrap().mtu.underlay = Some(1460);
        let checks = mtu(&facts);
        assert_eq!(checks[0].outcome, Outcome::Fail);
        assert!(
            checks[0].fix.as_ref().unwrap().contains("--set mtu=1380"),
            "{checks:#?}"
        );
        // Pods larger than the tunnel.
        let report = facts.gateways[1].report.as_mut().unwrap();
        report.cni_conflist.pod_mtu = Some(1450);
        let checks = mtu(&facts);
        assert_eq!(checks[1].outcome, Outcome::Fail);
        assert!(checks[1].detail.contains("larger than the tunnel"));
        // No MTU in the conflist: the plugin's default, the default route's device less 80.
        let report = facts.gateways[1].report.as_mut().unwrap();
        report.cni_conflist.pod_mtu = None;
        assert_eq!(
            mtu(&facts)[1].detail,
            "underlay 1500, tunnel 1420, pods 1420"
        );
        facts.gateways[1].report.as_mut().unwrap().mtu.underlay = None;
        assert_eq!(mtu(&facts)[1].outcome, Outcome::Unknown);
    }

    #[test]
    fn clock_skew_counts_only_what_is_certain() {
        let mut facts = facts();
        assert!(
            clock_skew(&facts)
                .iter()
                .all(|c| c.outcome == Outcome::Pass)
        );
        facts.gateways[0].clock = Some(ClockOffset {
            offset_ms: 7_000,
            uncertainty_ms: 100,
        });
        facts.gateways[1].clock = Some(ClockOffset {
            offset_ms: -400_000,
            uncertainty_ms: 100,
        });
        let checks = clock_skew(&facts);
        assert_eq!(
            outcomes(&checks),
            [
                ("node-0".into(), Outcome::Warn),
                ("node-1".into(), Outcome::Fail)
            ]
        );
        assert!(
            checks[1]
                .detail
                .starts_with("-399.8s against the API server (±120 ms)"),
            "{checks:#?}"
        );
        assert!(checks[1].fix.as_ref().unwrap().contains("chrony"));
        // Within the uncertainty of the measurement: not held against the node.
        assert_eq!(skew_outcome(5_400, 500), Outcome::Pass);
        facts.api_clock = None;
        assert_eq!(only(clock_skew(&facts)).outcome, Outcome::Unknown);
    }

    #[test]
    fn certificates_are_judged_by_every_clock() {
        let mut facts = facts();
        let checks = certificates(&facts);
        assert_eq!(checks.len(), 2, "ca.crt and tls.crt");
        assert!(
            checks.iter().all(|c| c.outcome == Outcome::Pass),
            "{checks:#?}"
        );
        // A node two days behind sees the day-old certificate as not yet valid.
        facts.gateways[1].clock = Some(ClockOffset {
            offset_ms: -172_800_000,
            uncertainty_ms: 0,
        });
        let checks = certificates(&facts);
        assert_eq!(checks[1].outcome, Outcome::Fail);
        assert!(
            checks[1]
                .detail
                .contains("not yet valid by node node-1's clock"),
            "{checks:#?}"
        );
        assert!(
            checks[1]
                .fix
                .as_ref()
                .unwrap()
                .contains("synchronise node node-1")
        );
        // Expiring soon, then expired.
        let mut facts = crate::diagnose::tests::facts();
        let now = unix(facts.now);
        facts.certificates.as_mut().unwrap()[1].not_after = now + 86_400;
        let c = &certificates(&facts)[1];
        assert_eq!(c.outcome, Outcome::Warn);
        assert!(c.detail.contains("expires in 1day"), "{c:#?}");
        facts.certificates.as_mut().unwrap()[1].not_after = now - 10;
        let c = &certificates(&facts)[1];
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("expired by this machine's clock"));
        assert!(c.fix.as_ref().unwrap().contains("trellis mesh enable"));
        facts.certificates = Err("Secret trellis-system/trellis-tls not found".into());
        assert_eq!(only(certificates(&facts)).outcome, Outcome::Fail);
    }
}
