//! A simulator of a compiled [`Ruleset`] on a new connection's first packet, following the
//! node table's fixed part (see [`super::ruleset`]): a packet from one of the node's pod
//! interfaces is dropped unless its source is in `local_pods`, then goes through the egress
//! map's chain; a packet to one of the node's pod interfaces likewise through the ingress
//! map's chain. It lets tests hold compiled rulesets against the reference evaluator.

use std::net::IpAddr;

use super::evaluate::Connection;
use super::ruleset::{Direction, Family, Match, Name, Ruleset, Verdict};

/// What the node does with the packet in one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The pod is not isolated in this direction.
    NotIsolated,
    /// A rule accepted it (its comment, if any).
    Accepted { by: Option<String> },
    /// A chain dropped it.
    Dropped { by: Option<String> },
    /// The pod's interface address is not among the node's known pods.
    UnknownPod,
}

impl Outcome {
    pub fn passes(&self) -> bool {
        matches!(self, Outcome::NotIsolated | Outcome::Accepted { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpretError {
    #[error("the ruleset names chain {0:?}, which it does not have")]
    NoSuchChain(Name),
    #[error("the ruleset names set {0:?}, which it does not have")]
    NoSuchSet(Name),
    #[error("chain {0:?} jumps deeper than {MAX_DEPTH} chains (a loop?)")]
    TooDeep(Name),
}

/// nftables' own limit on nested jumps.
const MAX_DEPTH: usize = 16;

/// The packet leaving the node's pod at `connection.source`.
pub fn egress(ruleset: &Ruleset, connection: &Connection) -> Result<Outcome, InterpretError> {
    through(ruleset, connection, Direction::Egress)
}

/// The packet arriving at the node's pod at `connection.destination`.
pub fn ingress(ruleset: &Ruleset, connection: &Connection) -> Result<Outcome, InterpretError> {
    through(ruleset, connection, Direction::Ingress)
}

fn through(
    ruleset: &Ruleset,
    connection: &Connection,
    direction: Direction,
) -> Result<Outcome, InterpretError> {
    let (pod, map) = match direction {
        Direction::Egress => (connection.source, &ruleset.egress),
        Direction::Ingress => (connection.destination, &ruleset.ingress),
    };
    if !ruleset.local_pods.contains(&pod) {
        return Ok(Outcome::UnknownPod);
    }
    let Some(chain) = map.get(&pod) else {
        return Ok(Outcome::NotIsolated);
    };
    // Falling off the pod's chain returns to the base chain, whose policy accepts.
    Ok(run(ruleset, connection, chain, 0)?.unwrap_or(Outcome::Accepted { by: None }))
}

/// A chain's verdict, or `None` when no rule decides (back to the caller).
fn run(
    ruleset: &Ruleset,
    connection: &Connection,
    chain: &Name,
    depth: usize,
) -> Result<Option<Outcome>, InterpretError> {
    if depth >= MAX_DEPTH {
        return Err(InterpretError::TooDeep(chain.clone()));
    }
    let rules = ruleset
        .chains
        .get(chain)
        .ok_or_else(|| InterpretError::NoSuchChain(chain.clone()))?;
    for rule in rules {
        let mut all = true;
        for condition in &rule.matches {
            if !holds(ruleset, connection, condition)? {
                all = false;
                break;
            }
        }
        if !all {
            continue;
        }
        match &rule.verdict {
            Verdict::Accept => {
                return Ok(Some(Outcome::Accepted {
                    by: rule.comment.clone(),
                }));
            }
            Verdict::Drop { .. } => {
                return Ok(Some(Outcome::Dropped {
                    by: rule.comment.clone(),
                }));
            }
            Verdict::Jump { chain } => {
                if let Some(outcome) = run(ruleset, connection, chain, depth + 1)? {
                    return Ok(Some(outcome));
                }
            }
        }
    }
    Ok(None)
}

fn in_address_set(ruleset: &Ruleset, set: &Name, address: IpAddr) -> Result<bool, InterpretError> {
    let set = ruleset
        .address_sets
        .get(set)
        .ok_or_else(|| InterpretError::NoSuchSet(set.clone()))?;
    Ok(set.family == Family::of(&address) && set.elements.iter().any(|n| n.contains(&address)))
}

fn holds(
    ruleset: &Ruleset,
    connection: &Connection,
    condition: &Match,
) -> Result<bool, InterpretError> {
    Ok(match condition {
        Match::SourceIn { set } => in_address_set(ruleset, set, connection.source)?,
        Match::DestinationIn { set } => in_address_set(ruleset, set, connection.destination)?,
        Match::Protocol { protocol } => connection.protocol == Some(*protocol),
        Match::DestinationPorts { ranges } => {
            connection.protocol.is_some()
                && ranges
                    .iter()
                    .any(|(first, last)| (*first..=*last).contains(&connection.port))
        }
        Match::DestinationServiceIn { set } => {
            let services = ruleset
                .service_sets
                .get(set)
                .ok_or_else(|| InterpretError::NoSuchSet(set.clone()))?;
            match connection.protocol {
                Some(protocol) => {
                    services.family == Family::of(&connection.destination)
                        && services.elements.contains(&(
                            connection.destination,
                            protocol,
                            connection.port,
                        ))
                }
                None => false,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::cluster::Protocol;
    use crate::policy::ruleset::{AddressSet, Rule};

    fn rule(matches: Vec<Match>, verdict: Verdict, comment: &str) -> Rule {
        Rule {
            matches,
            verdict,
            comment: Some(comment.into()),
        }
    }

    fn jump(chain: &str) -> Verdict {
        Verdict::Jump {
            chain: chain.into(),
        }
    }

    /// Pod 10.0.0.1 isolated for ingress: a policy chain accepting 10.0.1.0/24 on TCP 80, a
    /// second one that decides nothing, then drop.
    fn ruleset() -> Ruleset {
        let mut chains = BTreeMap::new();
        chains.insert(
            "pod".to_string(),
            vec![
                rule(vec![], jump("undecided"), "first"),
                rule(vec![], jump("web"), "second"),
                rule(
                    vec![],
                    Verdict::Drop {
                        direction: Direction::Ingress,
                    },
                    "drop",
                ),
            ],
        );
        chains.insert(
            "undecided".to_string(),
            vec![rule(
                vec![Match::Protocol {
                    protocol: Protocol::Sctp,
                }],
                Verdict::Accept,
                "sctp",
            )],
        );
        chains.insert(
            "web".to_string(),
            vec![rule(
                vec![
                    Match::SourceIn {
                        set: "peers".into(),
                    },
                    Match::Protocol {
                        protocol: Protocol::Tcp,
                    },
                    Match::DestinationPorts {
                        ranges: vec![(80, 80)],
                    },
                ],
                Verdict::Accept,
                "web",
            )],
        );
        Ruleset {
            address_sets: BTreeMap::from([(
                "peers".to_string(),
                AddressSet {
                    family: Family::Ipv4,
                    elements: BTreeSet::from(["10.0.1.0/24".parse().unwrap()]),
                },
            )]),
            chains,
            ingress: BTreeMap::from([("10.0.0.1".parse().unwrap(), "pod".to_string())]),
            local_pods: BTreeSet::from(["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()]),
            ..Ruleset::default()
        }
    }

    fn to(destination: &str, source: &str, protocol: Option<Protocol>, port: u16) -> Connection {
        Connection {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            protocol,
            port,
        }
    }

    #[test]
    fn chains_fall_through_jumps_until_a_verdict() {
        let r = ruleset();
        let tcp = Some(Protocol::Tcp);
        assert_eq!(
            ingress(&r, &to("10.0.0.1", "10.0.1.9", tcp, 80)),
            Ok(Outcome::Accepted {
                by: Some("web".into())
            })
        );
        assert_eq!(
            ingress(&r, &to("10.0.0.1", "10.0.1.9", Some(Protocol::Sctp), 9)),
            Ok(Outcome::Accepted {
                by: Some("sctp".into())
            })
        );
        for denied in [
            to("10.0.0.1", "10.0.2.9", tcp, 80),
            to("10.0.0.1", "10.0.1.9", tcp, 81),
            to("10.0.0.1", "10.0.1.9", None, 0),
        ] {
            assert_eq!(
                ingress(&r, &denied),
                Ok(Outcome::Dropped {
                    by: Some("drop".into())
                }),
                "{denied:?}"
            );
        }
        assert_eq!(
            ingress(&r, &to("10.0.0.2", "10.0.2.9", tcp, 80)),
            Ok(Outcome::NotIsolated)
        );
        assert_eq!(
            egress(&r, &to("10.0.0.2", "10.0.0.1", tcp, 80)),
            Ok(Outcome::NotIsolated)
        );
        assert_eq!(
            egress(&r, &to("10.0.0.2", "10.0.0.3", tcp, 80)),
            Ok(Outcome::UnknownPod)
        );
    }

    #[test]
    fn a_broken_ruleset_is_an_error_not_a_verdict() {
        let mut r = ruleset();
        r.chains.get_mut("web").unwrap()[0].matches[0] = Match::SourceIn {
            set: "missing".into(),
        };
        let c = to("10.0.0.1", "10.0.1.9", Some(Protocol::Tcp), 80);
        assert_eq!(
            ingress(&r, &c),
            Err(InterpretError::NoSuchSet("missing".into()))
        );
        r.chains.get_mut("pod").unwrap()[1].verdict = jump("gone");
        assert_eq!(
            ingress(&r, &c),
            Err(InterpretError::NoSuchChain("gone".into()))
        );
        r.chains.get_mut("undecided").unwrap()[0].verdict = jump("pod");
        r.chains.get_mut("undecided").unwrap()[0].matches.clear();
        assert!(matches!(ingress(&r, &c), Err(InterpretError::TooDeep(_))));
    }
}
