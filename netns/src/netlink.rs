use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope,
};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::{Error, Netns};

/// A netlink route socket bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    pub(crate) handle: rtnetlink::Handle,
}

/// What we read back about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// RFC 2863 operational state is "up": the kernel has finished bringing the link up and it
    /// carries packets (its queueing discipline is attached).
    pub operational: bool,
    pub kind: Option<String>,
}

/// A route in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    pub device: Option<u32>,
    /// Scope link: the destination is directly reachable on `device`.
    pub scope_link: bool,
}

impl Route {
    /// A route to `destination` straight out of `device`.
    pub fn via_device(destination: IpNet, device: u32) -> Self {
        Self {
            destination,
            gateway: None,
            device: Some(device),
            scope_link: true,
        }
    }

    /// A route to `destination` through `gateway`, optionally pinned to `device`.
    pub fn via_gateway(destination: IpNet, gateway: IpAddr, device: Option<u32>) -> Self {
        Self {
            destination,
            gateway: Some(gateway),
            device,
            scope_link: false,
        }
    }
}

/// A veth pair to create. With `peer_netns` set, the peer is born in that namespace (no move
/// afterwards, which would cost another trip through the rtnl lock).
#[derive(Debug)]
pub struct VethSpec<'a> {
    pub name: &'a str,
    pub peer_name: &'a str,
    pub peer_netns: Option<&'a Netns>,
    pub mtu: Option<u32>,
}

impl Netlink {
    /// A handle on the calling thread's namespace. Call it inside a tokio runtime.
    pub fn connect() -> Result<Self, Error> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// A handle on `netns`: the socket is opened on a thread inside it, and stays bound to it.
    /// Call it inside a tokio runtime.
    pub fn connect_in(netns: &Netns) -> Result<Self, Error> {
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle, _) = netns
            .run(move || {
                let _entered = runtime.enter();
                rtnetlink::new_connection()
            })?
            .map_err(Error::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, Error> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(message) => Ok(message.map(|m| link_from_message(&m))),
            Err(source) => {
                let error = Error::netlink(format!("get link {name}"), source);
                if error.is_not_found() {
                    Ok(None)
                } else {
                    Err(error)
                }
            }
        }
    }

    /// The link called `name`, or an error saying it is missing.
    pub async fn require_link(&self, name: &str) -> Result<Link, Error> {
        self.link(name)
            .await?
            .ok_or_else(|| Error::LinkNotFound(name.to_string()))
    }

    pub async fn links(&self) -> Result<Vec<Link>, Error> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|m| link_from_message(&m))
            .try_collect()
            .await
            .map_err(|e| Error::netlink("list links", e))
    }

    pub async fn add_veth(&self, spec: &VethSpec<'_>) -> Result<(), Error> {
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(spec.peer_name.to_string());
        if let Some(netns) = spec.peer_netns {
            peer = peer.setns_by_fd(netns.fd().as_raw_fd());
        }
        if let Some(mtu) = spec.mtu {
            peer = peer.mtu(mtu);
        }
        let mut veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(spec.name.to_string())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
        if let Some(mtu) = spec.mtu {
            veth = veth.mtu(mtu);
        }
        self.handle
            .link()
            .add(veth.build())
            .execute()
            .await
            .map_err(|e| {
                Error::netlink(
                    format!("create veth {} (peer {})", spec.name, spec.peer_name),
                    e,
                )
            })
    }

    pub async fn add_bridge(&self, name: &str) -> Result<(), Error> {
        self.handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("create bridge {name}"), e))
    }

    pub async fn set_up(&self, index: u32) -> Result<(), Error> {
        self.set_link(
            LinkUnspec::new_with_index(index).up().build(),
            format!("set link {index} up"),
        )
        .await
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), Error> {
        self.set_link(
            LinkUnspec::new_with_index(index).mtu(mtu).build(),
            format!("set MTU {mtu} on link {index}"),
        )
        .await
    }

    pub async fn set_down(&self, index: u32) -> Result<(), Error> {
        self.set_link(
            LinkUnspec::new_with_index(index).down().build(),
            format!("set link {index} down"),
        )
        .await
    }

    pub async fn set_master(&self, index: u32, master: u32) -> Result<(), Error> {
        self.set_link(
            LinkUnspec::new_with_index(index).controller(master).build(),
            format!("attach link {index} to {master}"),
        )
        .await
    }

    /// Moves a link into another namespace (it gets a new index there).
    pub async fn move_to(&self, index: u32, netns: &Netns) -> Result<(), Error> {
        self.set_link(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(netns.fd().as_raw_fd())
                .build(),
            format!("move link {index} to {}", netns.path().display()),
        )
        .await
    }

    async fn set_link(&self, message: LinkMessage, operation: String) -> Result<(), Error> {
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|e| Error::netlink(operation, e))
    }

    /// Deletes a link (for a veth, both ends go).
    pub async fn delete_link(&self, index: u32) -> Result<(), Error> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("delete link {index}"), e))
    }

    /// Adds `address` to the link. IPv6 addresses skip duplicate address detection: they are
    /// ours by allocation, and DAD would keep them unusable for a second or more.
    pub async fn add_address(&self, index: u32, address: IpNet) -> Result<(), Error> {
        let mut request = self
            .handle
            .address()
            .add(index, address.addr(), address.prefix_len());
        if address.addr().is_ipv6() {
            request.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        request
            .replace()
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("add address {address} to link {index}"), e))
    }

    /// The addresses on the link.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>, Error> {
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink(format!("list addresses of link {index}"), e))?;
        Ok(messages
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|attribute| match attribute {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds or replaces a route in the main table.
    pub async fn replace_route(&self, route: &Route) -> Result<(), Error> {
        self.handle
            .route()
            .add(route_message(route)?)
            .replace()
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("add route {}", describe(route)), e))
    }

    /// Adds a route; fails if one to the same destination exists.
    pub async fn add_route(&self, route: &Route) -> Result<(), Error> {
        self.handle
            .route()
            .add(route_message(route)?)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("add route {}", describe(route)), e))
    }

    pub async fn delete_route(&self, route: &Route) -> Result<(), Error> {
        self.handle
            .route()
            .del(route_message(route)?)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("delete route {}", describe(route)), e))
    }

    /// The routes of the main table, IPv4 and IPv6.
    pub async fn routes(&self) -> Result<Vec<Route>, Error> {
        Ok(self
            .route_messages()
            .await?
            .iter()
            .filter_map(route_from_message)
            .collect())
    }

    /// Every route message of both families, as the kernel dumps them.
    pub(crate) async fn route_messages(&self) -> Result<Vec<RouteMessage>, Error> {
        let mut messages = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let family: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|e| Error::netlink("list routes", e))?;
            messages.extend(family);
        }
        Ok(messages)
    }

    /// A permanent neighbour entry: `ip` lives at `mac` on the link, no ARP or ND needed.
    pub async fn add_permanent_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), Error> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("add neighbour {ip} on link {index}"), e))
    }
}

impl Netlink {
    /// Removes the neighbour entry for `ip` on the link.
    pub async fn delete_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), Error> {
        let mut message = NeighbourMessage::default();
        message.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        message.header.ifindex = index;
        message
            .attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        self.handle
            .neighbours()
            .del(message)
            .execute()
            .await
            .map_err(|e| Error::netlink(format!("delete neighbour {ip} on link {index}"), e))
    }
}

fn describe(route: &Route) -> String {
    let mut text = route.destination.to_string();
    if let Some(gateway) = route.gateway {
        text.push_str(&format!(" via {gateway}"));
    }
    if let Some(device) = route.device {
        text.push_str(&format!(" dev {device}"));
    }
    text
}

fn route_message(route: &Route) -> Result<RouteMessage, Error> {
    let invalid = |e: &dyn std::fmt::Display| Error::Netlink {
        operation: format!("build route {}", describe(route)),
        source: rtnetlink::Error::InvalidNla(e.to_string()),
    };
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.destination.network(), route.destination.prefix_len())
        .map_err(|e| invalid(&e))?;
    if let Some(gateway) = route.gateway {
        builder = builder.gateway(gateway).map_err(|e| invalid(&e))?;
    }
    if let Some(device) = route.device {
        builder = builder.output_interface(device);
    }
    if route.scope_link {
        builder = builder.scope(RouteScope::Link);
    }
    Ok(builder.build())
}

/// The parts of a main-table route both route views need.
pub(crate) struct ParsedRoute {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    pub device: Option<u32>,
    pub metric: u32,
}

/// Reads a route of the main table; `None` for other tables and families.
pub(crate) fn parse_main_route(message: &RouteMessage) -> Option<ParsedRoute> {
    let table = message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(message.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let address = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut destination = match message.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let (mut gateway, mut device, mut metric) = (None, None, 0);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(a) => destination = address(a)?,
            RouteAttribute::Gateway(a) => gateway = address(a),
            RouteAttribute::Oif(index) => device = Some(*index),
            RouteAttribute::Priority(priority) => metric = *priority,
            _ => {}
        }
    }
    Some(ParsedRoute {
        destination: IpNet::new(destination, message.header.destination_prefix_length).ok()?,
        gateway,
        device,
        metric,
    })
}

fn route_from_message(message: &RouteMessage) -> Option<Route> {
    let parsed = parse_main_route(message)?;
    Some(Route {
        destination: parsed.destination,
        gateway: parsed.gateway,
        device: parsed.device,
        scope_link: message.header.scope == RouteScope::Link,
    })
}

fn link_from_message(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        up: message.header.flags.contains(LinkFlags::Up),
        operational: false,
        kind: None,
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Address(bytes) => link.mac = bytes.as_slice().try_into().ok(),
            LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
            LinkAttribute::OperState(state) => link.operational = *state == State::Up,
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    link
}
