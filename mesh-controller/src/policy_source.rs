//! From the Kubernetes objects NetworkPolicy needs (NetworkPolicy, Pod, Namespace) to the
//! normalised model of [`trellis_core::policy`], pure and public (the lab builds expected
//! tables with the same functions).
//!
//! A NetworkPolicy is converted whole or refused whole, with the reason the API server would
//! give (a source that is not the API server, such as the static file, can hold anything).
//! Refusing a policy means *less* isolation: the pods it selects are then isolated only by
//! the cluster's other policies, so the controller says so loudly.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use trellis_core::claims::{
    is_dns1123_label, is_dns1123_subdomain, is_label_key, is_label_value, is_port_name,
};
use trellis_core::cluster::Protocol;
use trellis_core::policy::{
    LabelRequirement, LabelSelector, Labels, NAMESPACE_NAME_LABEL, NamedPort, NetworkPolicy,
    PolicyKey, PolicyPeer, PolicyPort, PolicyRule, PortSpec, SelectorOperator,
};

/// Why a NetworkPolicy is refused (as the API server's validation would refuse it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("metadata.name and metadata.namespace are required")]
    Unnamed,
    #[error("spec.policyTypes: {0:?} is neither Ingress nor Egress")]
    PolicyType(String),
    #[error("{field}: {reason}")]
    Selector { field: String, reason: String },
    #[error("{field}: a peer needs podSelector, namespaceSelector or ipBlock")]
    EmptyPeer { field: String },
    #[error("{field}: ipBlock cannot be combined with podSelector or namespaceSelector")]
    IpBlockWithSelector { field: String },
    #[error("{field}: {value:?} is not a CIDR")]
    Cidr { field: String, value: String },
    #[error("{field}: except {except} is not inside cidr {cidr}")]
    ExceptOutside {
        field: String,
        cidr: IpNet,
        except: IpNet,
    },
    #[error("{field}: protocol {0:?} is not TCP, UDP or SCTP", .value)]
    Protocol { field: String, value: String },
    #[error("{field}: port {value} is not in 1-65535")]
    PortNumber { field: String, value: i64 },
    #[error("{field}: port name {value:?} is not a valid port name")]
    PortName { field: String, value: String },
    #[error("{field}: endPort needs a numbered port and must not be below it")]
    EndPort { field: String },
}

/// A refused NetworkPolicy, for logs, metrics and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPolicy {
    pub key: PolicyKey,
    pub error: PolicyError,
}

impl std::fmt::Display for RefusedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NetworkPolicy {} refused (its pods are not isolated by it): {}",
            self.key, self.error
        )
    }
}

/// A pod with an address, as policy needs it (its identity is decided later, over the whole
/// cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    pub named_ports: Vec<NamedPort>,
}

/// A namespace's name and labels, with `kubernetes.io/metadata.name: <name>` as the API
/// server sets it (a static file may omit it).
pub fn namespace_labels(namespace: &Namespace) -> Option<(String, Labels)> {
    let name = namespace.metadata.name.clone()?;
    let mut labels: Labels = namespace.metadata.labels.clone().unwrap_or_default();
    labels
        .entry(NAMESPACE_NAME_LABEL.to_owned())
        .or_insert_with(|| name.clone());
    Some((name, labels))
}

fn protocol(value: Option<&str>, field: &str) -> Result<Protocol, PolicyError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(PolicyError::Protocol {
            field: field.to_owned(),
            value: other.to_owned(),
        }),
    }
}

/// A pod policy can see: named, on a node, with an address, not on the host network, not
/// finished (phase `Succeeded` or `Failed`: its address may already be another pod's).
/// `None` otherwise. Addresses that do not parse and port names that are not valid are left
/// out.
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        // Its address is its node's: NetworkPolicy does not apply to it, and a peer would
        // rightly refuse a pod at a node address.
        return None;
    }
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut addresses: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if addresses.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
    {
        addresses.push(ip);
    }
    addresses.sort();
    addresses.dedup();
    if addresses.is_empty() {
        return None;
    }
    let mut named_ports: Vec<NamedPort> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.clone().filter(|n| is_port_name(n))?;
            Some(NamedPort {
                name,
                protocol: protocol(p.protocol.as_deref(), "").ok()?,
                port: u16::try_from(p.container_port).ok().filter(|p| *p != 0)?,
            })
        })
        .collect();
    named_ports.sort();
    named_ports.dedup();
    Some(PodInfo {
        namespace,
        name,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        node,
        addresses,
        named_ports,
    })
}

/// A Kubernetes label selector in the model, validated as the API server does (operators,
/// values, label syntax).
pub fn label_selector(
    selector: &meta::LabelSelector,
    field: &str,
) -> Result<LabelSelector, PolicyError> {
    let err = |reason: String| PolicyError::Selector {
        field: field.to_owned(),
        reason,
    };
    let match_labels: Labels = selector.match_labels.clone().unwrap_or_default();
    for (key, value) in &match_labels {
        if !is_label_key(key) || !is_label_value(value) {
            return Err(err(format!(
                "matchLabels {key:?}: {value:?} is not a valid label"
            )));
        }
    }
    let match_expressions = selector
        .match_expressions
        .iter()
        .flatten()
        .map(|r| {
            let operator = match r.operator.as_str() {
                "In" => SelectorOperator::In,
                "NotIn" => SelectorOperator::NotIn,
                "Exists" => SelectorOperator::Exists,
                "DoesNotExist" => SelectorOperator::DoesNotExist,
                other => return Err(err(format!("operator {other:?} is not a valid operator"))),
            };
            if !is_label_key(&r.key) {
                return Err(err(format!("key {:?} is not a valid label key", r.key)));
            }
            let values = r.values.clone().unwrap_or_default();
            if let Some(v) = values.iter().find(|v| !is_label_value(v)) {
                return Err(err(format!("value {v:?} is not a valid label value")));
            }
            Ok(LabelRequirement {
                key: r.key.clone(),
                operator,
                values,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let selector = LabelSelector {
        match_labels,
        match_expressions,
    };
    selector.validate().map_err(|e| err(e.to_string()))?;
    Ok(selector)
}

fn cidr(value: &str, field: &str) -> Result<IpNet, PolicyError> {
    value
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| PolicyError::Cidr {
            field: field.to_owned(),
            value: value.to_owned(),
        })
}

fn peer(p: &k8s::NetworkPolicyPeer, field: &str) -> Result<PolicyPeer, PolicyError> {
    let selector = |s: &Option<meta::LabelSelector>, name: &str| {
        s.as_ref()
            .map(|s| label_selector(s, &format!("{field}.{name}")))
            .transpose()
    };
    let namespace_selector = selector(&p.namespace_selector, "namespaceSelector")?;
    let pod_selector = selector(&p.pod_selector, "podSelector")?;
    match (
        &p.ip_block,
        namespace_selector.is_some() || pod_selector.is_some(),
    ) {
        (Some(_), true) => Err(PolicyError::IpBlockWithSelector {
            field: field.to_owned(),
        }),
        (None, false) => Err(PolicyError::EmptyPeer {
            field: field.to_owned(),
        }),
        (None, true) => Ok(PolicyPeer::Pods {
            namespace_selector,
            pod_selector,
        }),
        (Some(block), false) => {
            let field = format!("{field}.ipBlock");
            let net = cidr(&block.cidr, &format!("{field}.cidr"))?;
            let except = block
                .except
                .iter()
                .flatten()
                .map(|e| {
                    let e = cidr(e, &format!("{field}.except"))?;
                    if net.contains(&e) {
                        Ok(e)
                    } else {
                        Err(PolicyError::ExceptOutside {
                            field: field.clone(),
                            cidr: net,
                            except: e,
                        })
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(PolicyPeer::IpBlock { cidr: net, except })
        }
    }
}

fn port(p: &k8s::NetworkPolicyPort, field: &str) -> Result<PolicyPort, PolicyError> {
    let protocol = protocol(p.protocol.as_deref(), &format!("{field}.protocol"))?;
    let number = |value: i64| {
        u16::try_from(value)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| PolicyError::PortNumber {
                field: field.to_owned(),
                value,
            })
    };
    let port = match &p.port {
        None => None,
        Some(IntOrString::Int(n)) => Some(PortSpec::Number(number(i64::from(*n))?)),
        Some(IntOrString::String(name)) => {
            if !is_port_name(name) {
                return Err(PolicyError::PortName {
                    field: field.to_owned(),
                    value: name.clone(),
                });
            }
            Some(PortSpec::Name(name.clone()))
        }
    };
    let end_port = match p.end_port {
        None => None,
        Some(end) => {
            let end = number(i64::from(end))?;
            match port {
                Some(PortSpec::Number(start)) if end >= start => Some(end),
                _ => {
                    return Err(PolicyError::EndPort {
                        field: field.to_owned(),
                    });
                }
            }
        }
    };
    Ok(PolicyPort {
        protocol,
        port,
        end_port,
    })
}

fn rule(
    peers: Option<&Vec<k8s::NetworkPolicyPeer>>,
    ports: Option<&Vec<k8s::NetworkPolicyPort>>,
    field: &str,
    peers_name: &str,
) -> Result<PolicyRule, PolicyError> {
    Ok(PolicyRule {
        peers: peers
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| peer(p, &format!("{field}.{peers_name}[{i}]")))
            .collect::<Result<_, _>>()?,
        ports: ports
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| port(p, &format!("{field}.ports[{i}]")))
            .collect::<Result<_, _>>()?,
    })
}

/// A NetworkPolicy normalised, or why it is refused. `policyTypes` default as the API server
/// defaults them: Ingress always, Egress when the policy has egress rules; given, they decide
/// alone (rules of a direction not among them are ignored, as Kubernetes ignores them).
pub fn network_policy(policy: &k8s::NetworkPolicy) -> Result<NetworkPolicy, PolicyError> {
    let (Some(namespace), Some(name)) = (
        policy.metadata.namespace.clone(),
        policy.metadata.name.clone(),
    ) else {
        return Err(PolicyError::Unnamed);
    };
    let spec = policy.spec.clone().unwrap_or_default();
    let (ingress_on, egress_on) = match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            let mut on = (false, false);
            for t in types {
                match t.as_str() {
                    "Ingress" => on.0 = true,
                    "Egress" => on.1 = true,
                    other => return Err(PolicyError::PolicyType(other.to_owned())),
                }
            }
            on
        }
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    };
    let pod_selector = match &spec.pod_selector {
        Some(s) => label_selector(s, "spec.podSelector")?,
        None => LabelSelector::default(),
    };
    let ingress = ingress_on
        .then(|| {
            spec.ingress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    rule(
                        r.from.as_ref(),
                        r.ports.as_ref(),
                        &format!("spec.ingress[{i}]"),
                        "from",
                    )
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let egress = egress_on
        .then(|| {
            spec.egress
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, r)| {
                    rule(
                        r.to.as_ref(),
                        r.ports.as_ref(),
                        &format!("spec.egress[{i}]"),
                        "to",
                    )
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(NetworkPolicy {
        namespace,
        name,
        pod_selector,
        ingress,
        egress,
    })
}

/// What NetworkPolicy needs of a cluster's objects: its policies (and the refused ones), its
/// namespaces' labels, its pods with an address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySource {
    pub policies: BTreeMap<PolicyKey, NetworkPolicy>,
    pub refused: Vec<RefusedPolicy>,
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<PodInfo>,
}

/// Converts the three kinds; objects without names are skipped (the API server never
/// returns them), pods and namespaces with invalid names too (they could not exist).
pub fn policy_source(
    policies: &[k8s::NetworkPolicy],
    pods: &[Pod],
    namespaces: &[Namespace],
) -> PolicySource {
    let mut out = PolicySource::default();
    for p in policies {
        match network_policy(p) {
            Ok(policy) => {
                out.policies.insert(policy.key(), policy);
            }
            Err(PolicyError::Unnamed) => {}
            Err(error) => out.refused.push(RefusedPolicy {
                key: PolicyKey {
                    namespace: p.metadata.namespace.clone().unwrap_or_default(),
                    name: p.metadata.name.clone().unwrap_or_default(),
                },
                error,
            }),
        }
    }
    out.refused.sort_by(|a, b| a.key.cmp(&b.key));
    out.namespaces = namespaces
        .iter()
        .filter_map(namespace_labels)
        .filter(|(name, _)| is_dns1123_label(name))
        .collect();
    out.pods = pods
        .iter()
        .filter_map(pod_info)
        .filter(|p| is_dns1123_label(&p.namespace) && is_dns1123_subdomain(&p.name))
        .collect();
    out.pods
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out.pods
        .dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Result<NetworkPolicy, PolicyError> {
        let p: k8s::NetworkPolicy = serde_norway::from_str(yaml).unwrap();
        network_policy(&p)
    }

    const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n";

    fn with_spec(spec: &str) -> Result<NetworkPolicy, PolicyError> {
        policy(&format!("{HEAD}spec:\n{spec}"))
    }

    #[test]
    fn policy_types_default_as_the_api_server_does() {
        // No types, no egress rules: Ingress only (deny-all ingress when no ingress rules).
        let p = with_spec("  podSelector: {}\n").unwrap();
        assert_eq!((p.ingress, p.egress), (Some(vec![]), None));
        // No types, egress rules: both.
        let p = with_spec("  podSelector: {}\n  egress: [{}]\n").unwrap();
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, Some(vec![PolicyRule::default()]));
        // An empty egress list is no egress rule: Ingress only.
        let p = with_spec("  podSelector: {}\n  egress: []\n").unwrap();
        assert_eq!(p.egress, None);
        // Given types decide alone; rules of other directions are ignored.
        let p = with_spec("  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n").unwrap();
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
        let p = with_spec("  podSelector: {}\n  policyTypes: [Ingress, Egress]\n").unwrap();
        assert_eq!((p.ingress, p.egress), (Some(vec![]), Some(vec![])));
        assert_eq!(
            with_spec("  policyTypes: [Sideways]\n").unwrap_err(),
            PolicyError::PolicyType("Sideways".into())
        );
        // No spec at all: the empty selector, ingress denied.
        let p = policy(HEAD).unwrap();
        assert!(p.pod_selector.is_empty() && p.ingress == Some(vec![]));
    }

    #[test]
    fn peers_selectors_ip_blocks_and_ports_convert() {
        let p = with_spec(
            r#"
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
      namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y, z]}]}
    - namespaceSelector: {}
    - ipBlock: {cidr: 10.0.0.1/16, except: [10.0.1.0/24]}
    ports:
    - port: 80
    - {port: serve-81, protocol: UDP}
    - {port: 1000, endPort: 2000, protocol: SCTP}
    - protocol: UDP
"#,
        )
        .unwrap();
        let rule = &p.ingress.unwrap()[0];
        assert_eq!(rule.peers.len(), 3);
        let PolicyPeer::Pods {
            namespace_selector: Some(ns),
            pod_selector: Some(pod),
        } = &rule.peers[0]
        else {
            panic!("{:?}", rule.peers[0]);
        };
        assert_eq!(pod.match_labels["pod"], "b");
        assert_eq!(ns.match_expressions[0].operator, SelectorOperator::In);
        assert_eq!(
            rule.peers[1],
            PolicyPeer::Pods {
                namespace_selector: Some(LabelSelector::default()),
                pod_selector: None
            }
        );
        assert_eq!(
            rule.peers[2],
            PolicyPeer::IpBlock {
                cidr: "10.0.0.0/16".parse().unwrap(),
                except: vec!["10.0.1.0/24".parse().unwrap()]
            }
        );
        assert_eq!(
            rule.ports,
            vec![
                PolicyPort {
                    protocol: Protocol::Tcp,
                    port: Some(PortSpec::Number(80)),
                    end_port: None
                },
                PolicyPort {
                    protocol: Protocol::Udp,
                    port: Some(PortSpec::Name("serve-81".into())),
                    end_port: None
                },
                PolicyPort {
                    protocol: Protocol::Sctp,
                    port: Some(PortSpec::Number(1000)),
                    end_port: Some(2000)
                },
                PolicyPort {
                    protocol: Protocol::Udp,
                    port: None,
                    end_port: None
                },
            ]
        );
        // `from` absent or empty: every peer.
        let p = with_spec("  ingress: [{ports: [{port: 80}]}]\n").unwrap();
        assert!(p.ingress.unwrap()[0].peers.is_empty());
    }

    #[test]
    fn invalid_policies_are_refused_whole_with_the_reason() {
        let cases = [
            ("  ingress: [{from: [{}]}]\n", "a peer needs"),
            (
                "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n",
                "cannot be combined",
            ),
            (
                "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
                "not a CIDR",
            ),
            (
                "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]\n",
                "not inside cidr",
            ),
            ("  ingress: [{ports: [{port: 0}]}]\n", "not in 1-65535"),
            ("  ingress: [{ports: [{port: 70000}]}]\n", "not in 1-65535"),
            (
                "  ingress: [{ports: [{port: Bad_Name}]}]\n",
                "not a valid port name",
            ),
            (
                "  ingress: [{ports: [{port: 80, protocol: ICMP}]}]\n",
                "protocol",
            ),
            (
                "  ingress: [{ports: [{port: 80, endPort: 79}]}]\n",
                "endPort",
            ),
            (
                "  ingress: [{ports: [{port: http, endPort: 90}]}]\n",
                "endPort",
            ),
            (
                "  podSelector: {matchExpressions: [{key: a, operator: In}]}\n",
                "needs at least one value",
            ),
            (
                "  podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}\n",
                "takes no values",
            ),
            (
                "  podSelector: {matchExpressions: [{key: a, operator: Near, values: [x]}]}\n",
                "not a valid operator",
            ),
            (
                "  podSelector: {matchLabels: {'bad key': x}}\n",
                "not a valid label",
            ),
        ];
        for (spec, want) in cases {
            let err = with_spec(spec).unwrap_err();
            assert!(err.to_string().contains(want), "{spec}: {err}");
        }
        let refused = RefusedPolicy {
            key: PolicyKey {
                namespace: "x".into(),
                name: "p".into(),
            },
            error: with_spec(cases[0].0).unwrap_err(),
        };
        assert!(
            refused.to_string().contains("not isolated by it"),
            "{refused}"
        );
    }

    #[test]
    fn pods_need_a_node_and_an_address_and_must_not_have_finished() {
        let pod = |extra: &str| -> Pod {
            serde_norway::from_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x, labels: {{pod: a}}}}\n\
                 spec:\n  nodeName: n1\n  containers:\n  - name: c\n    ports:\n    \
                 - {{containerPort: 80, name: serve-80}}\n    \
                 - {{containerPort: 81, name: serve-81-udp, protocol: UDP}}\n    \
                 - {{containerPort: 82}}\n{extra}"
            ))
            .unwrap()
        };
        let running = pod(
            "status: {phase: Running, podIP: 10.1.0.5, podIPs: [{ip: 10.1.0.5}, {ip: 'fd00::5'}]}\n",
        );
        let info = pod_info(&running).unwrap();
        assert_eq!(info.node, "n1");
        assert_eq!(info.addresses.len(), 2);
        assert_eq!(info.labels["pod"], "a");
        assert_eq!(
            info.named_ports,
            vec![
                NamedPort {
                    name: "serve-80".into(),
                    protocol: Protocol::Tcp,
                    port: 80
                },
                NamedPort {
                    name: "serve-81-udp".into(),
                    protocol: Protocol::Udp,
                    port: 81
                },
            ]
        );
        let only_pod_ip = pod("status: {podIP: 10.1.0.6}\n");
        assert_eq!(
            pod_info(&only_pod_ip).unwrap().addresses,
            vec!["10.1.0.6".parse::<IpAddr>().unwrap()]
        );
        assert!(pod_info(&pod("status: {phase: Pending}\n")).is_none());
        assert!(pod_info(&pod("status: {phase: Succeeded, podIP: 10.1.0.5}\n")).is_none());
        assert!(pod_info(&pod("status: {phase: Failed, podIP: 10.1.0.5}\n")).is_none());
        let mut host = running.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(
            pod_info(&host).is_none(),
            "host-network pods are not endpoints"
        );
        let mut unscheduled = running.clone();
        unscheduled.spec.as_mut().unwrap().node_name = None;
        assert!(pod_info(&unscheduled).is_none());
    }

    #[test]
    fn namespaces_carry_their_name_label() {
        let ns: Namespace = serde_norway::from_str(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\n",
        )
        .unwrap();
        let (name, labels) = namespace_labels(&ns).unwrap();
        assert_eq!(name, "x");
        assert_eq!(labels[NAMESPACE_NAME_LABEL], "x");
        assert_eq!(labels["team"], "a");
    }
}
