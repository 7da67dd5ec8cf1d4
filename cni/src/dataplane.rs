//! The kernel side of a pod: its veth, addresses, routes and neighbours.
//!
//! Both directions use permanent neighbour entries (pod → link-local gateway at the host
//! veth's MAC; node → pod address at the pod's MAC), so no ARP or neighbour discovery runs
//! and the first packet of a pod leaves without waiting for one.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use trellis_netns::{Link, Netlink, Netns, Route, VethSpec, sysctl};

use crate::config::WIREGUARD_OVERHEAD;
use crate::error::{CniError, code};
use crate::failpoint;
use crate::result::gateway_for;

/// What a pod's network is made of.
#[derive(Debug, Clone)]
pub struct PodSpec<'a> {
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub host_ifname: &'a str,
    pub mtu: u32,
    pub addresses: &'a [IpAddr],
}

/// What `attach` built, for the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

/// The seam between the CNI commands and the kernel.
#[allow(async_fn_in_trait)]
pub trait Dataplane {
    /// Wires the pod. On error, whatever was half-built is for `remove` to delete.
    async fn attach(&self, spec: &PodSpec<'_>) -> Result<Attached, CniError>;
    /// Cuts the pod off at once (its routes and neighbour entries gone, its veth down) without
    /// deleting the veth: the kernel destroys that with the pod's namespace, which the runtime
    /// removes right after DEL. Succeeds when there is nothing left to cut.
    async fn disconnect(&self, host_ifname: &str, addresses: &[IpAddr]) -> Result<(), CniError>;
    /// Deletes the pod's veth pair now. Succeeds when it is already gone.
    async fn remove(&self, host_ifname: &str) -> Result<(), CniError>;
    /// Host-side veths that DEL disconnected but whose pod namespace outlived it.
    async fn disconnected_links(&self) -> Result<Vec<String>, CniError>;
    /// Verifies the pod's network is as `attach` left it.
    async fn check(&self, spec: &PodSpec<'_>) -> Result<(), CniError>;
    /// The pod MTU when the config gives none.
    async fn default_mtu(&self) -> u32;
}

/// Every host-side veth of trellis-cni starts with this.
pub const HOST_IFNAME_PREFIX: &str = trellis_core::POD_VETH_PREFIX;

/// The real thing, running in the node's network namespace.
pub struct KernelDataplane {
    node: Netlink,
}

impl KernelDataplane {
    /// Opens netlink in the caller's (the node's) namespace. Needs a tokio runtime.
    pub fn connect() -> Result<Self, CniError> {
        Ok(Self {
            node: Netlink::connect()?,
        })
    }
}

fn unknown_netns(path: &Path, error: trellis_netns::Error) -> CniError {
    CniError::new(
        code::UNKNOWN_CONTAINER,
        "the container's network namespace does not exist",
        format!("{}: {error}", path.display()),
    )
}

/// How long a new veth may take to become operational before ADD gives up on it.
const OPERATIONAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Link-up is only half of it: the kernel attaches the link's queue in its link-watch work a
/// moment later and drops whatever is sent before that. A pod's first SYN lost there costs a
/// one-second retransmit, so ADD returns only once both ends carry packets.
async fn wait_operational(netlink: &Netlink, name: &str) -> Result<(), CniError> {
    let deadline = Instant::now() + OPERATIONAL_TIMEOUT;
    loop {
        if netlink.require_link(name).await?.operational {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CniError::new(
                code::DATAPLANE,
                "veth did not become operational",
                format!(
                    "{name} still not up after {} ms",
                    OPERATIONAL_TIMEOUT.as_millis()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

/// Teardown is idempotent: what is already gone counts as done.
fn ignore_missing(outcome: Result<(), trellis_netns::Error>) -> Result<(), CniError> {
    match outcome {
        Err(error) if !error.is_not_found() => Err(error.into()),
        _ => Ok(()),
    }
}

fn check_failed(details: String) -> CniError {
    CniError::new(
        code::CHECK_FAILED,
        "pod network differs from what ADD set up",
        details,
    )
}

fn host_route(address: &IpAddr, host: &Link) -> Route {
    Route::via_device(IpNet::from(*address), host.index)
}

fn pod_default_route(address: &IpAddr, pod: &Link) -> Route {
    let default: IpNet = if address.is_ipv4() {
        "0.0.0.0/0"
    } else {
        "::/0"
    }
    .parse()
    .expect("default route parses");
    Route::via_gateway(default, gateway_for(address), Some(pod.index))
}

impl Dataplane for KernelDataplane {
    async fn attach(&self, spec: &PodSpec<'_>) -> Result<Attached, CniError> {
        let pod_netns = Netns::open_path(spec.netns).map_err(|e| unknown_netns(spec.netns, e))?;
        let pod = Netlink::connect_in(&pod_netns)?;
        // A veth left for this same attachment (a crashed ADD, or a DEL whose namespace was
        // kept): ours to replace, and deleting it removes its pod end too.
        if let Some(stale) = self.node.link(spec.host_ifname).await? {
            self.node.delete_link(stale.index).await?;
        }
        if pod.link(spec.ifname).await?.is_some() {
            return Err(CniError::new(
                code::INTERFACE_EXISTS,
                "interface name already taken in the container",
                format!("{} already exists in {}", spec.ifname, spec.netns.display()),
            ));
        }
        self.node
            .add_veth(&VethSpec {
                name: spec.host_ifname,
                peer_name: spec.ifname,
                peer_netns: Some(&pod_netns),
                mtu: Some(spec.mtu),
            })
            .await?;
        failpoint::crash_if_armed("veth-created");

        let host = self.node.require_link(spec.host_ifname).await?;
        let pod_link = pod.require_link(spec.ifname).await?;
        let (host_mac, pod_mac) = match (host.mac, pod_link.mac) {
            (Some(h), Some(p)) => (h, p),
            _ => {
                return Err(CniError::new(
                    code::DATAPLANE,
                    "veth has no MAC address",
                    spec.host_ifname.to_string(),
                ));
            }
        };
        for address in spec.addresses {
            pod.add_address(pod_link.index, IpNet::from(*address))
                .await?;
        }
        pod.set_up(pod_link.index).await?;
        for address in spec.addresses {
            let gateway = gateway_for(address);
            pod.replace_route(&Route::via_device(IpNet::from(gateway), pod_link.index))
                .await?;
            pod.add_permanent_neighbour(pod_link.index, gateway, host_mac)
                .await?;
            pod.replace_route(&pod_default_route(address, &pod_link))
                .await?;
        }
        failpoint::crash_if_armed("pod-configured");

        self.node.set_up(host.index).await?;
        wait_operational(&self.node, spec.host_ifname).await?;
        wait_operational(&pod, spec.ifname).await?;
        for address in spec.addresses {
            self.node
                .add_permanent_neighbour(host.index, *address, pod_mac)
                .await?;
            self.node.replace_route(&host_route(address, &host)).await?;
        }
        if spec.addresses.iter().any(IpAddr::is_ipv4) {
            sysctl::write(None, "net/ipv4/ip_forward", "1")?;
        }
        if spec.addresses.iter().any(IpAddr::is_ipv6) {
            sysctl::write(None, "net/ipv6/conf/all/forwarding", "1")?;
        }
        Ok(Attached { host_mac, pod_mac })
    }

    async fn disconnect(&self, host_ifname: &str, addresses: &[IpAddr]) -> Result<(), CniError> {
        let Some(host) = self.node.link(host_ifname).await? else {
            return Ok(());
        };
        for address in addresses {
            ignore_missing(self.node.delete_route(&host_route(address, &host)).await)?;
            ignore_missing(self.node.delete_neighbour(host.index, *address).await)?;
        }
        ignore_missing(self.node.set_down(host.index).await)
    }

    async fn remove(&self, host_ifname: &str) -> Result<(), CniError> {
        match self.node.link(host_ifname).await? {
            Some(link) => ignore_missing(self.node.delete_link(link.index).await),
            None => Ok(()),
        }
    }

    async fn disconnected_links(&self) -> Result<Vec<String>, CniError> {
        Ok(self
            .node
            .links()
            .await?
            .into_iter()
            .filter(|link| {
                link.name.starts_with(HOST_IFNAME_PREFIX)
                    && link.kind.as_deref() == Some("veth")
                    && !link.up
            })
            .map(|link| link.name)
            .collect())
    }

    async fn check(&self, spec: &PodSpec<'_>) -> Result<(), CniError> {
        let pod_netns = Netns::open_path(spec.netns).map_err(|e| unknown_netns(spec.netns, e))?;
        let pod = Netlink::connect_in(&pod_netns)?;
        let pod_link = pod.link(spec.ifname).await?.ok_or_else(|| {
            check_failed(format!(
                "{} is missing in {}",
                spec.ifname,
                spec.netns.display()
            ))
        })?;
        if !pod_link.up {
            return Err(check_failed(format!("{} is down", spec.ifname)));
        }
        let host =
            self.node.link(spec.host_ifname).await?.ok_or_else(|| {
                check_failed(format!("host veth {} is missing", spec.host_ifname))
            })?;
        if !host.up {
            return Err(check_failed(format!(
                "host veth {} is down",
                spec.host_ifname
            )));
        }
        let pod_addresses = pod.addresses(pod_link.index).await?;
        let pod_routes = pod.routes().await?;
        let node_routes = self.node.routes().await?;
        for address in spec.addresses {
            if !pod_addresses.iter().any(|a| a.addr() == *address) {
                return Err(check_failed(format!("{address} is not on {}", spec.ifname)));
            }
            let default = pod_default_route(address, &pod_link);
            if !pod_routes
                .iter()
                .any(|r| r.destination == default.destination && r.gateway == default.gateway)
            {
                return Err(check_failed(format!(
                    "pod has no default route via {}",
                    gateway_for(address)
                )));
            }
            let wanted = host_route(address, &host);
            if !node_routes
                .iter()
                .any(|r| r.destination == wanted.destination && r.device == wanted.device)
            {
                return Err(check_failed(format!(
                    "node has no route to {address} via {}",
                    spec.host_ifname
                )));
            }
        }
        Ok(())
    }

    async fn default_mtu(&self) -> u32 {
        let underlay = async {
            let routes = self.node.routes().await.ok()?;
            let default = routes
                .iter()
                .find(|r| r.destination.prefix_len() == 0 && r.device.is_some())?;
            let links = self.node.links().await.ok()?;
            links.iter().find(|l| Some(l.index) == default.device)?.mtu
        };
        underlay
            .await
            .unwrap_or(1500)
            .saturating_sub(WIREGUARD_OVERHEAD)
    }
}
