//! Pod routes: the pure plan from the kernel's current routes to the desired ones, and the
//! route table seam it is applied through.
//!
//! Every route the gateway installs carries its routing protocol number, so after a restart it
//! finds exactly its own routes and leaves everyone else's alone. Per pod CIDR:
//! - encrypted: `dst dev <tun> metric <primary>` plus a fail-closed backstop
//!   `unreachable dst metric <backstop>`, which takes over if the TUN disappears (the gateway
//!   died): traffic to an encrypted peer is refused rather than sent in the clear;
//! - plain: `dst via <node ip> metric <primary>`.
//!
//! Switching a CIDR between the two is one atomic `route replace` of the primary route.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use ipnet::IpNet;
use trellis_core::gateway::PodRoute;
use trellis_netns::{Netlink, OwnedRoute, RouteTarget};

use crate::Error;

/// The metrics of the gateway's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMetrics {
    pub primary: u32,
    pub backstop: u32,
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self {
            primary: 10,
            backstop: 0x7fff_0000,
        }
    }
}

/// One change to the route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOp {
    Replace(OwnedRoute),
    Delete(OwnedRoute),
}

/// The kernel routes that implement `pod_routes`, given the TUN's interface index.
pub fn desired_routes(
    pod_routes: &BTreeMap<IpNet, PodRoute>,
    tun_index: u32,
    metrics: RouteMetrics,
) -> BTreeSet<OwnedRoute> {
    let mut routes = BTreeSet::new();
    for (destination, route) in pod_routes {
        let destination = *destination;
        match route {
            PodRoute::Tunnel => {
                routes.insert(OwnedRoute {
                    destination,
                    target: RouteTarget::Unreachable,
                    metric: metrics.backstop,
                });
                routes.insert(OwnedRoute {
                    destination,
                    target: RouteTarget::Device(tun_index),
                    metric: metrics.primary,
                });
            }
            PodRoute::Via(node_ip) => {
                routes.insert(OwnedRoute {
                    destination,
                    target: RouteTarget::Gateway(*node_ip),
                    metric: metrics.primary,
                });
            }
        }
    }
    routes
}

/// The operations that turn `current` (our routes as the kernel has them) into `desired`,
/// in a fail-closed order: backstops first, then primary routes (replaced in place, never
/// deleted and re-added), then removals. Routes already right are not touched.
pub fn plan(current: &[OwnedRoute], desired: &BTreeSet<OwnedRoute>) -> Vec<RouteOp> {
    let key = |r: &OwnedRoute| (r.destination, r.metric);
    let current_by_key: BTreeMap<_, _> = current.iter().map(|r| (key(r), *r)).collect();
    let desired_keys: BTreeSet<_> = desired.iter().map(key).collect();
    let needs_change = |r: &&OwnedRoute| current_by_key.get(&key(r)) != Some(*r);
    let mut ops: Vec<RouteOp> = desired
        .iter()
        .filter(|r| r.target == RouteTarget::Unreachable)
        .filter(needs_change)
        .map(|r| RouteOp::Replace(*r))
        .collect();
    ops.extend(
        desired
            .iter()
            .filter(|r| r.target != RouteTarget::Unreachable)
            .filter(needs_change)
            .map(|r| RouteOp::Replace(*r)),
    );
    // Current routes whose slot is no longer wanted; primaries before backstops, so a
    // destination never loses its floor while its primary route still exists.
    let mut stale: Vec<&OwnedRoute> = current
        .iter()
        .filter(|r| !desired_keys.contains(&key(r)))
        .collect();
    stale.sort_by_key(|r| r.target == RouteTarget::Unreachable);
    ops.extend(stale.into_iter().map(|r| RouteOp::Delete(*r)));
    ops
}

/// The kernel route table, as far as the gateway's own routes go.
pub trait RouteTable: Send + Sync {
    fn list(&self) -> impl Future<Output = Result<Vec<OwnedRoute>, Error>> + Send;
    fn replace(&self, route: &OwnedRoute) -> impl Future<Output = Result<(), Error>> + Send;
    fn delete(&self, route: &OwnedRoute) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The real table, over a netlink socket in the node's namespace.
#[derive(Clone)]
pub struct NetlinkRoutes {
    pub netlink: Netlink,
    pub protocol: u8,
}

impl RouteTable for NetlinkRoutes {
    async fn list(&self) -> Result<Vec<OwnedRoute>, Error> {
        Ok(self.netlink.owned_routes(self.protocol).await?)
    }
    async fn replace(&self, route: &OwnedRoute) -> Result<(), Error> {
        Ok(self
            .netlink
            .replace_owned_route(self.protocol, route)
            .await?)
    }
    async fn delete(&self, route: &OwnedRoute) -> Result<(), Error> {
        match self.netlink.delete_owned_route(self.protocol, route).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => Ok(other?),
        }
    }
}

/// Applies `ops` in order, continuing past failures, and reports every failure.
pub async fn apply<R: RouteTable>(table: &R, ops: &[RouteOp]) -> Result<(), Error> {
    let mut failures = Vec::new();
    for op in ops {
        let result = match op {
            RouteOp::Replace(route) => table.replace(route).await,
            RouteOp::Delete(route) => table.delete(route).await,
        };
        if let Err(e) = result {
            tracing::warn!("{}", trellis_core::error_chain(&e));
            failures.push(e);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Routes(failures))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use std::sync::Mutex;

    const TUN: u32 = 9;
    const M: RouteMetrics = RouteMetrics {
        primary: 10,
        backstop: 1000,
    };

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn via(s: &str) -> PodRoute {
        PodRoute::Via(s.parse::<IpAddr>().unwrap())
    }

    /// A route table in memory that can be told to fail.
    #[derive(Default)]
    struct FakeTable {
        routes: Mutex<BTreeMap<(IpNet, u32), OwnedRoute>>,
        log: Mutex<Vec<RouteOp>>,
        fail_on: Option<IpNet>,
    }

    impl RouteTable for FakeTable {
        async fn list(&self) -> Result<Vec<OwnedRoute>, Error> {
            Ok(self.routes.lock().unwrap().values().copied().collect())
        }
        async fn replace(&self, route: &OwnedRoute) -> Result<(), Error> {
            if self.fail_on == Some(route.destination) {
                return Err(Error::DeviceStopped);
            }
            self.log.lock().unwrap().push(RouteOp::Replace(*route));
            self.routes
                .lock()
                .unwrap()
                .insert((route.destination, route.metric), *route);
            Ok(())
        }
        async fn delete(&self, route: &OwnedRoute) -> Result<(), Error> {
            self.log.lock().unwrap().push(RouteOp::Delete(*route));
            self.routes
                .lock()
                .unwrap()
                .remove(&(route.destination, route.metric));
            Ok(())
        }
    }

    async fn converge(table: &FakeTable, pod_routes: &BTreeMap<IpNet, PodRoute>) -> Vec<RouteOp> {
        table.log.lock().unwrap().clear();
        let desired = desired_routes(pod_routes, TUN, M);
        let ops = plan(&table.list().await.unwrap(), &desired);
        apply(table, &ops).await.unwrap();
        assert_eq!(
            table
                .list()
                .await
                .unwrap()
                .into_iter()
                .collect::<BTreeSet<_>>(),
            desired
        );
        ops
    }

    #[tokio::test]
    async fn encrypted_cidrs_get_a_backstop_first_and_a_second_run_does_nothing() {
        let table = FakeTable::default();
        let routes = BTreeMap::from([(net("10.2.0.0/24"), PodRoute::Tunnel)]);
        let ops = converge(&table, &routes).await;
        assert_eq!(ops.len(), 2);
        assert!(matches!(ops[0], RouteOp::Replace(r) if r.target == RouteTarget::Unreachable));
        assert!(matches!(ops[1], RouteOp::Replace(r) if r.target == RouteTarget::Device(TUN)));
        assert!(converge(&table, &routes).await.is_empty(), "idempotent");
    }

    #[tokio::test]
    async fn switching_on_is_backstop_then_one_replace_and_off_is_replace_then_delete() {
        let table = FakeTable::default();
        let plain = BTreeMap::from([(net("10.1.2.0/24"), via("198.18.0.2"))]);
        converge(&table, &plain).await;
        let on = BTreeMap::from([(net("10.1.2.0/24"), PodRoute::Tunnel)]);
        let ops = converge(&table, &on).await;
        // Never a moment without a route: no delete of the plain route, it is replaced.
        assert!(
            ops.iter().all(|op| matches!(op, RouteOp::Replace(_))),
            "{ops:?}"
        );
        assert!(matches!(ops[0], RouteOp::Replace(r) if r.target == RouteTarget::Unreachable));
        let ops = converge(&table, &plain).await;
        assert!(matches!(
            ops[0],
            RouteOp::Replace(OwnedRoute {
                target: RouteTarget::Gateway(_),
                ..
            })
        ));
        assert!(matches!(ops[1], RouteOp::Delete(r) if r.target == RouteTarget::Unreachable));
        assert_eq!(ops.len(), 2);
    }

    #[tokio::test]
    async fn removed_cidrs_lose_primary_before_backstop_and_others_are_untouched() {
        let table = FakeTable::default();
        let both = BTreeMap::from([
            (net("10.2.0.0/24"), PodRoute::Tunnel),
            (net("10.3.0.0/24"), PodRoute::Tunnel),
        ]);
        converge(&table, &both).await;
        let one = BTreeMap::from([(net("10.3.0.0/24"), PodRoute::Tunnel)]);
        let ops = converge(&table, &one).await;
        assert_eq!(ops.len(), 2);
        assert!(matches!(ops[0], RouteOp::Delete(r) if r.target == RouteTarget::Device(TUN)));
        assert!(matches!(ops[1], RouteOp::Delete(r) if r.target == RouteTarget::Unreachable));
    }

    #[tokio::test]
    async fn a_new_tun_index_replaces_primaries_only() {
        let table = FakeTable::default();
        let routes = BTreeMap::from([(net("10.2.0.0/24"), PodRoute::Tunnel)]);
        converge(&table, &routes).await;
        let desired = desired_routes(&routes, TUN + 1, M);
        let ops = plan(&table.list().await.unwrap(), &desired);
        assert_eq!(ops.len(), 1);
    }

    #[tokio::test]
    async fn failures_do_not_stop_the_others_and_are_all_reported() {
        let table = FakeTable {
            fail_on: Some(net("10.2.0.0/24")),
            ..FakeTable::default()
        };
        let routes = BTreeMap::from([
            (net("10.2.0.0/24"), PodRoute::Tunnel),
            (net("10.3.0.0/24"), PodRoute::Tunnel),
        ]);
        let ops = plan(&[], &desired_routes(&routes, TUN, M));
        let error = apply(&table, &ops).await.unwrap_err();
        assert!(
            matches!(error, Error::Routes(ref f) if f.len() == 2),
            "{error}"
        );
        assert_eq!(
            table.routes.lock().unwrap().len(),
            2,
            "10.3 still installed"
        );
    }
}
