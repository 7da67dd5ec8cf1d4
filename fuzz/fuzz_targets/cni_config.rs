//! The network configuration a container runtime writes on the plugin's stdin
//! (cni/src/config.rs), and the result built on a `prevResult` from earlier in the chain.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use trellis_cni::config::{NetConf, peek_version};
use trellis_cni::result::{CniResult, Wiring};
use trellis_cni::{SPEC_VERSION, SUPPORTED_VERSIONS};

fuzz_target!(|stdin: &[u8]| {
    let peeked = peek_version(stdin);
    let Ok(conf) = NetConf::parse(stdin) else {
        return;
    };
    // Errors are reported in the config's version: whatever parses, the peek reads the same.
    assert_eq!(peeked.as_deref(), Some(conf.cni_version.as_str()));
    assert!(SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()));
    // The name becomes a directory under the data dir: one plain component, no traversal.
    let first = conf.name.chars().next().expect("a name is not empty");
    assert!(first.is_ascii_alphanumeric());
    assert!(
        conf.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    );
    assert_eq!(conf.state_dir().parent(), Some(conf.data_dir.as_path()));
    // At most one CIDR per family, with room for pods, without host bits.
    assert!(!conf.pod_cidrs.is_empty() && conf.pod_cidrs.len() <= 2);
    if let [a, b] = conf.pod_cidrs[..] {
        assert_ne!(a.addr().is_ipv4(), b.addr().is_ipv4());
    }
    for cidr in &conf.pod_cidrs {
        assert_eq!(cidr.trunc(), *cidr);
        assert!(cidr.max_prefix_len() - cidr.prefix_len() >= 2);
    }
    if let Some(mtu) = conf.mtu {
        let v6 = conf.pod_cidrs.iter().any(|c| c.addr().is_ipv6());
        assert!(mtu >= if v6 { 1280 } else { 576 } && mtu <= 65535);
    }
    // ADD's result on top of the previous plugin's (as cni/src/commands.rs builds it), in the
    // config's version: it serialises, reads back, and reports the pod's addresses.
    let addresses: Vec<IpAddr> = conf.pod_cidrs.iter().map(|c| c.network()).collect();
    let wiring = Wiring {
        host_ifname: "trl0123456789ab",
        host_mac: [0xee; 6],
        pod_ifname: "eth0",
        pod_mac: [2, 0, 0, 0, 0, 1],
        netns: "/var/run/netns/fuzz",
        mtu: conf.mtu.unwrap_or(1420),
        addresses: &addresses,
    };
    let result =
        CniResult::for_pod(conf.prev_result.as_ref(), &wiring).in_version(&conf.cni_version);
    let json = serde_json::to_vec(&result).expect("a result serialises");
    let back: CniResult = serde_json::from_slice(&json).expect("a result reads back");
    assert_eq!(back, result);
    let reported = result.addresses_of("eth0", "/var/run/netns/fuzz");
    for address in &addresses {
        assert!(
            reported.iter().any(|net| net.addr() == *address),
            "{address} reported (prev result: {:?})",
            conf.prev_result
        );
    }
    let _ = result.in_version(SPEC_VERSION);
});
