//! Routes a program owns: tagged with its own routing protocol number (`ip route ... proto N`)
//! and a metric, so it can list exactly its routes after a restart, replace them atomically and
//! leave everyone else's alone.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::RouteMessageBuilder;

use crate::{Error, Netlink};

/// Where an owned route sends its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteTarget {
    /// Straight out of a device (scope link), e.g. a TUN.
    Device(u32),
    /// Through a next hop the kernel resolves.
    Gateway(IpAddr),
    /// Nowhere: the kernel answers "unreachable". A fail-closed backstop under other routes.
    Unreachable,
}

/// A route in the main table tagged with the owner's protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnedRoute {
    pub destination: IpNet,
    pub target: RouteTarget,
    /// The route's priority (`metric`); lower wins. Part of the route's identity.
    pub metric: u32,
}

impl std::fmt::Display for OwnedRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.target {
            RouteTarget::Device(index) => write!(f, "{} dev {index}", self.destination)?,
            RouteTarget::Gateway(gateway) => write!(f, "{} via {gateway}", self.destination)?,
            RouteTarget::Unreachable => write!(f, "unreachable {}", self.destination)?,
        }
        write!(f, " metric {}", self.metric)
    }
}

impl Netlink {
    /// Adds `route`, or atomically replaces the route with the same destination and metric
    /// (whoever owns it): traffic never sees a moment without a route.
    pub async fn replace_owned_route(&self, protocol: u8, route: &OwnedRoute) -> Result<(), Error> {
        self.handle
            .route()
            .add(owned_message(protocol, route)?)
            .replace()
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("replace route {route} proto {protocol}"), e))
    }

    /// Deletes `route`.
    pub async fn delete_owned_route(&self, protocol: u8, route: &OwnedRoute) -> Result<(), Error> {
        self.handle
            .route()
            .del(owned_message(protocol, route)?)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("delete route {route} proto {protocol}"), e))
    }

    /// The routes of the main table tagged with `protocol`, IPv4 and IPv6.
    pub async fn owned_routes(&self, protocol: u8) -> Result<Vec<OwnedRoute>, Error> {
        Ok(self
            .route_messages()
            .await?
            .iter()
            .filter(|m| m.header.protocol == RouteProtocol::from(protocol))
            .filter_map(owned_from_message)
            .collect())
    }
}

fn owned_message(protocol: u8, route: &OwnedRoute) -> Result<RouteMessage, Error> {
    let invalid = |e: &dyn std::fmt::Display| Error::Netlink {
        operation: format!("build route {route}"),
        source: rtnetlink::Error::InvalidNla(e.to_string()),
    };
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.destination.network(), route.destination.prefix_len())
        .map_err(|e| invalid(&e))?
        .protocol(RouteProtocol::from(protocol))
        .priority(route.metric);
    match route.target {
        RouteTarget::Device(index) => {
            builder = builder.output_interface(index).scope(RouteScope::Link);
        }
        RouteTarget::Gateway(gateway) => {
            builder = builder.gateway(gateway).map_err(|e| invalid(&e))?;
        }
        RouteTarget::Unreachable => builder = builder.kind(RouteType::Unreachable),
    }
    Ok(builder.build())
}

fn owned_from_message(message: &RouteMessage) -> Option<OwnedRoute> {
    let parsed = crate::netlink::parse_main_route(message)?;
    let target = if message.header.kind == RouteType::Unreachable {
        RouteTarget::Unreachable
    } else if let Some(gateway) = parsed.gateway {
        RouteTarget::Gateway(gateway)
    } else {
        RouteTarget::Device(parsed.device?)
    };
    Some(OwnedRoute {
        destination: parsed.destination,
        target,
        metric: parsed.metric,
    })
}
