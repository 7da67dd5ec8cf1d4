//! The CNI commands: the order of IPAM and kernel steps, and what is undone on failure.

use std::collections::HashSet;
use std::net::IpAddr;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::NetConf;
use crate::dataplane::{Dataplane, HOST_IFNAME_PREFIX, PodSpec};
use crate::env::Attachment;
use crate::error::{CniError, code};
use crate::failpoint;
use crate::ipam::Owner;
use crate::result::{CniResult, Wiring};
use crate::{SPEC_VERSION, SUPPORTED_VERSIONS};

/// The node-side veth name: a prefix and a hash of the attachment, so DEL and GC can find it
/// from the container ID alone, and it fits the kernel's 15 characters.
pub fn host_ifname(owner: &Owner) -> String {
    let digest = Sha256::new()
        .chain_update(owner.container_id.as_bytes())
        .chain_update([0])
        .chain_update(owner.ifname.as_bytes())
        .finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{HOST_IFNAME_PREFIX}{hex}")
}

fn owner_of(attachment: &Attachment) -> Owner {
    Owner::new(attachment.container_id.clone(), attachment.ifname.clone())
}

fn exhausted(error: crate::ipam::Exhausted) -> CniError {
    CniError::new(
        code::POOL_EXHAUSTED,
        "no free pod address on this node",
        error.to_string(),
    )
}

/// ADD: lease addresses, wire the pod, report. Any failure after the lease undoes the wiring
/// and frees the lease before returning; a crash instead leaves a lease that names its owner,
/// which the runtime's DEL or GC frees.
pub async fn add<D: Dataplane>(
    dataplane: &D,
    conf: &NetConf,
    attachment: &Attachment,
) -> Result<CniResult, CniError> {
    let netns = attachment
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, "CNI_NETNS is not set", ""))?;
    if let Some(missing) = gateway_not_ready(conf) {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the node's gateway has not put its tunnels and backstops in place yet",
            missing,
        ));
    }
    let owner = owner_of(attachment);
    let host_ifname = host_ifname(&owner);
    let mtu = match conf.mtu {
        Some(mtu) => mtu,
        None => dataplane.default_mtu().await,
    };
    let store = conf.store()?;
    let addresses = store.transact(|allocations| {
        allocations
            .allocate(&conf.pod_cidrs, &owner)
            .map_err(exhausted)
    })?;
    failpoint::crash_if_armed("ipam-committed");

    let spec = PodSpec {
        netns,
        ifname: &attachment.ifname,
        host_ifname: &host_ifname,
        mtu,
        addresses: &addresses,
    };
    let attached = match dataplane.attach(&spec).await {
        Ok(attached) => attached,
        Err(error) => {
            // Our veth is keyed by the host-side name, so removing it never touches an
            // interface the pod had before (the interface-exists case).
            let _ = dataplane.remove(&host_ifname).await;
            store.transact(|allocations| {
                allocations.release(&owner);
                Ok(())
            })?;
            return Err(error);
        }
    };
    let netns_text = netns.to_string_lossy();
    Ok(CniResult::for_pod(
        conf.prev_result.as_ref(),
        &Wiring {
            host_ifname: &host_ifname,
            host_mac: attached.host_mac,
            pod_ifname: &attachment.ifname,
            pod_mac: attached.pod_mac,
            netns: &netns_text,
            mtu,
            addresses: &addresses,
        },
    )
    .in_version(&conf.cni_version))
}

/// DEL: cut the pod off first (its routes and neighbour entries go, its veth goes down), then
/// free the lease, so an address is never free while a route still leads to an old pod.
/// Idempotent.
///
/// The veth itself is left for the kernel to destroy with the pod's namespace, which the runtime
/// removes right after DEL: deleting a veth synchronously costs 10-40 ms of RCU waits with the
/// rtnl lock held, stalling every other pod's ADD on the node, while namespace teardown does
/// it in the background and in batches. A namespace that outlives DEL keeps a down, routeless
/// veth until the next ADD of that attachment or GC removes it.
pub async fn del<D: Dataplane>(
    dataplane: &D,
    conf: &NetConf,
    attachment: &Attachment,
) -> Result<(), CniError> {
    let owner = owner_of(attachment);
    let store = conf.store()?;
    let leased = store.read()?.of(&owner);
    dataplane.disconnect(&host_ifname(&owner), &leased).await?;
    store.transact(|allocations| {
        allocations.release(&owner);
        Ok(())
    })
}

/// CHECK: the lease is still ours, it matches prevResult, and the kernel state is intact.
pub async fn check<D: Dataplane>(
    dataplane: &D,
    conf: &NetConf,
    attachment: &Attachment,
) -> Result<(), CniError> {
    let netns = attachment
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, "CNI_NETNS is not set", ""))?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult",
            "the runtime must pass the result of ADD",
        )
    })?;
    let owner = owner_of(attachment);
    let leased: Vec<IpAddr> = conf.store()?.read()?.of(&owner);
    if leased.is_empty() {
        return Err(CniError::new(
            code::CHECK_FAILED,
            "no address is leased to this container",
            owner.container_id,
        ));
    }
    let reported: Vec<IpAddr> = prev
        .addresses_of(&attachment.ifname, &netns.to_string_lossy())
        .iter()
        .map(|a| a.addr())
        .collect();
    if reported.iter().any(|a| !leased.contains(a)) {
        return Err(CniError::new(
            code::CHECK_FAILED,
            "prevResult reports addresses not leased to this container",
            format!("reported {reported:?}, leased {leased:?}"),
        ));
    }
    let host_ifname = host_ifname(&owner);
    dataplane
        .check(&PodSpec {
            netns,
            ifname: &attachment.ifname,
            host_ifname: &host_ifname,
            mtu: conf.mtu.unwrap_or(0),
            addresses: &leased,
        })
        .await
}

/// STATUS: ready when the state is readable and an address is free in every pod CIDR.
/// Why the node is not ready for pods: its gateway's ready file is configured and missing.
fn gateway_not_ready(conf: &NetConf) -> Option<String> {
    let path = conf.gateway_ready_file.as_ref()?;
    (!path.exists()).then(|| format!("{} does not exist", path.display()))
}

pub fn status(conf: &NetConf) -> Result<(), CniError> {
    if let Some(missing) = gateway_not_ready(conf) {
        return Err(CniError::new(
            code::NOT_AVAILABLE,
            "the node's gateway has not put its tunnels and backstops in place yet",
            missing,
        ));
    }
    let store = conf.store().map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            "IPAM state directory is unusable",
            e.details,
        )
    })?;
    let allocations = store
        .read()
        .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg, e.details))?;
    if let Some(full) = conf
        .pod_cidrs
        .iter()
        .find(|cidr| allocations.free_in(cidr) == 0)
    {
        return Err(CniError::new(
            code::NOT_AVAILABLE_RESOURCES,
            "no free pod address on this node",
            format!("{full} is full"),
        ));
    }
    Ok(())
}

/// GC: free every lease, and delete every veth, of attachments the runtime no longer knows,
/// including veths DEL disconnected whose namespace was kept. Carries on past failures and
/// reports them all.
pub async fn gc<D: Dataplane>(dataplane: &D, conf: &NetConf) -> Result<(), CniError> {
    let valid: HashSet<Owner> = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "GC needs cni.dev/valid-attachments",
                "",
            )
        })?
        .iter()
        .map(|(id, ifname)| Owner::new(id.clone(), ifname.clone()))
        .collect();
    let valid_links: HashSet<String> = valid.iter().map(host_ifname).collect();
    let store = conf.store()?;
    let stale: HashSet<Owner> = store.read()?.owners().difference(&valid).cloned().collect();
    let mut failures = Vec::new();
    let mut removed = HashSet::new();
    for owner in &stale {
        match dataplane.remove(&host_ifname(owner)).await {
            Ok(()) => {
                removed.insert(owner.clone());
            }
            Err(error) => failures.push(format!("{}: {error}", owner.container_id)),
        }
    }
    for link in dataplane.disconnected_links().await? {
        if !valid_links.contains(&link)
            && let Err(error) = dataplane.remove(&link).await
        {
            failures.push(format!("{link}: {error}"));
        }
    }
    // Keep the lease of any attachment whose veth could not be removed: its address must not
    // be handed out while a route still leads to it.
    store.transact(|allocations| {
        let keep: HashSet<Owner> = allocations
            .owners()
            .into_iter()
            .filter(|o| !removed.contains(o))
            .collect();
        allocations.retain_owners(&keep);
        Ok(())
    })?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::DATAPLANE,
            "GC could not remove every stale attachment",
            failures.join("; "),
        ))
    }
}

/// VERSION's answer.
pub fn version_json() -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Versions {
        cni_version: &'static str,
        supported_versions: [&'static str; 3],
    }
    serde_json::to_string(&Versions {
        cni_version: SPEC_VERSION,
        supported_versions: SUPPORTED_VERSIONS,
    })
    .expect("static versions serialise")
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::path::PathBuf;

    use super::*;
    use crate::dataplane::Attached;
    use crate::ipam::Store;

    /// Records links as the kernel would hold them; fails attach when told to.
    #[derive(Default)]
    struct FakeDataplane {
        fail_attach: bool,
        /// host-side name -> up
        links: RefCell<Vec<(String, bool)>>,
        removed: RefCell<Vec<String>>,
    }

    impl FakeDataplane {
        fn up_links(&self) -> Vec<String> {
            self.links
                .borrow()
                .iter()
                .filter(|(_, up)| *up)
                .map(|(n, _)| n.clone())
                .collect()
        }
    }

    impl Dataplane for FakeDataplane {
        async fn attach(&self, spec: &PodSpec<'_>) -> Result<Attached, CniError> {
            if self.fail_attach {
                return Err(CniError::new(code::DATAPLANE, "refused", ""));
            }
            self.links
                .borrow_mut()
                .push((spec.host_ifname.to_string(), true));
            Ok(Attached {
                host_mac: [0xee; 6],
                pod_mac: [2, 0, 0, 0, 0, 1],
            })
        }
        async fn disconnect(
            &self,
            host_ifname: &str,
            _addresses: &[IpAddr],
        ) -> Result<(), CniError> {
            for (name, up) in self.links.borrow_mut().iter_mut() {
                if name == host_ifname {
                    *up = false;
                }
            }
            Ok(())
        }
        async fn remove(&self, host_ifname: &str) -> Result<(), CniError> {
            self.removed.borrow_mut().push(host_ifname.to_string());
            self.links.borrow_mut().retain(|(n, _)| n != host_ifname);
            Ok(())
        }
        async fn disconnected_links(&self) -> Result<Vec<String>, CniError> {
            Ok(self
                .links
                .borrow()
                .iter()
                .filter(|(_, up)| !up)
                .map(|(n, _)| n.clone())
                .collect())
        }
        async fn check(&self, _spec: &PodSpec<'_>) -> Result<(), CniError> {
            Ok(())
        }
        async fn default_mtu(&self) -> u32 {
            1420
        }
    }

    fn conf(dir: &std::path::Path, cidr: &str) -> NetConf {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.1.0","name":"t","type":"trellis-cni","podCIDRs":["{cidr}"],"dataDir":"{}"}}"#, dir.display()).as_bytes(),
        )
        .unwrap()
    }

    fn attachment(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: Some(PathBuf::from("/run/netns/x")),
            args: vec![],
        }
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    fn leases(conf: &NetConf) -> usize {
        Store::open(&conf.state_dir())
            .unwrap()
            .read()
            .unwrap()
            .len()
    }

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_ifname(&Owner::new("abc", "eth0"));
        assert_eq!(a, host_ifname(&Owner::new("abc", "eth0")));
        assert_eq!(a.len(), 15);
        assert_ne!(a, host_ifname(&Owner::new("abc", "eth1")));
    }

    #[test]
    fn failed_attach_frees_the_lease_and_removes_the_veth() {
        let dir = tempfile::tempdir().unwrap();
        let conf = conf(dir.path(), "10.0.0.0/24");
        let dataplane = FakeDataplane {
            fail_attach: true,
            ..Default::default()
        };
        let error = block_on(add(&dataplane, &conf, &attachment("a"))).unwrap_err();
        assert_eq!(error.code, code::DATAPLANE);
        assert_eq!(dataplane.removed.borrow().len(), 1);
        assert_eq!(leases(&conf), 0);
    }

    #[test]
    fn add_then_del_leaves_nothing_and_del_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let conf = conf(dir.path(), "10.0.0.0/24");
        let dataplane = FakeDataplane::default();
        let result = block_on(add(&dataplane, &conf, &attachment("a"))).unwrap();
        assert_eq!(result.ips[0].address.to_string(), "10.0.0.1/32");
        assert_eq!(result.interfaces[1].mtu, Some(1420));
        block_on(del(&dataplane, &conf, &attachment("a"))).unwrap();
        block_on(del(&dataplane, &conf, &attachment("a"))).unwrap();
        block_on(del(&dataplane, &conf, &attachment("never-added"))).unwrap();
        assert!(dataplane.up_links().is_empty(), "DEL cut the pod off");
        assert_eq!(leases(&conf), 0);
    }

    #[test]
    fn no_pod_is_wired_before_the_gateway_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("gateway.ready");
        let mut conf = conf(dir.path(), "10.0.0.0/24");
        conf.gateway_ready_file = Some(ready.clone());
        let dataplane = FakeDataplane::default();
        let refused = block_on(add(&dataplane, &conf, &attachment("a"))).unwrap_err();
        assert_eq!(refused.code, code::TRY_AGAIN_LATER);
        assert!(refused.details.contains("gateway.ready"), "{refused:?}");
        assert_eq!(status(&conf).unwrap_err().code, code::NOT_AVAILABLE);
        assert!(dataplane.up_links().is_empty(), "nothing wired");
        assert_eq!(leases(&conf), 0, "no address taken");
        std::fs::write(&ready, "").unwrap();
        status(&conf).unwrap();
        block_on(add(&dataplane, &conf, &attachment("a"))).unwrap();
        assert_eq!(leases(&conf), 1);
    }

    #[test]
    fn exhausted_pool_is_code_102_and_status_51() {
        let dir = tempfile::tempdir().unwrap();
        let conf = conf(dir.path(), "10.0.0.0/30");
        let dataplane = FakeDataplane::default();
        block_on(add(&dataplane, &conf, &attachment("a"))).unwrap();
        status(&conf).unwrap();
        block_on(add(&dataplane, &conf, &attachment("b"))).unwrap();
        assert_eq!(
            block_on(add(&dataplane, &conf, &attachment("c")))
                .unwrap_err()
                .code,
            code::POOL_EXHAUSTED
        );
        assert_eq!(
            status(&conf).unwrap_err().code,
            code::NOT_AVAILABLE_RESOURCES
        );
    }

    #[test]
    fn gc_frees_only_what_is_not_valid() {
        let dir = tempfile::tempdir().unwrap();
        let mut conf = conf(dir.path(), "10.0.0.0/24");
        let dataplane = FakeDataplane::default();
        for id in ["a", "b", "c"] {
            block_on(add(&dataplane, &conf, &attachment(id))).unwrap();
        }
        // "c" was DELeted but its namespace kept: its disconnected veth lingers.
        block_on(del(&dataplane, &conf, &attachment("c"))).unwrap();
        conf.valid_attachments = Some(vec![("b".into(), "eth0".into())]);
        block_on(gc(&dataplane, &conf)).unwrap();
        let left = Store::open(&conf.state_dir()).unwrap().read().unwrap();
        assert_eq!(left.owners(), [Owner::new("b", "eth0")].into());
        let links: Vec<String> = dataplane
            .links
            .borrow()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(links, vec![host_ifname(&Owner::new("b", "eth0"))]);
    }

    #[test]
    fn version_lists_every_supported_version() {
        let json: serde_json::Value = serde_json::from_str(&version_json()).unwrap();
        assert_eq!(json["cniVersion"], "1.1.0");
        assert_eq!(
            json["supportedVersions"],
            serde_json::json!(["0.4.0", "1.0.0", "1.1.0"])
        );
    }
}
