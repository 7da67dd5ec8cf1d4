//! Carving per-node pod CIDRs out of a cluster CIDR, as kube-controller-manager's
//! node IPAM does (`--cluster-cidr` split into `--node-cidr-mask-size` blocks).

use ipnet::IpNet;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("node prefix /{node_prefix} must be longer than the cluster CIDR {cluster}")]
    NodePrefixTooShort { cluster: IpNet, node_prefix: u8 },
    #[error("node prefix /{node_prefix} is longer than the address family allows")]
    NodePrefixTooLong { node_prefix: u8 },
    #[error("cluster CIDR {cluster} has no room for node block {index} of size /{node_prefix}")]
    OutOfBlocks {
        cluster: IpNet,
        node_prefix: u8,
        index: u32,
    },
}

/// The `index`-th block of size `/node_prefix` inside `cluster`.
pub fn node_block(cluster: IpNet, node_prefix: u8, index: u32) -> Result<IpNet, CidrError> {
    if node_prefix <= cluster.prefix_len() {
        return Err(CidrError::NodePrefixTooShort {
            cluster,
            node_prefix,
        });
    }
    if node_prefix > cluster.max_prefix_len() {
        return Err(CidrError::NodePrefixTooLong { node_prefix });
    }
    let out_of_blocks = CidrError::OutOfBlocks {
        cluster,
        node_prefix,
        index,
    };
    let usize_index = usize::try_from(index).map_err(|_| out_of_blocks.clone())?;
    cluster
        .subnets(node_prefix)
        .map_err(|_| CidrError::NodePrefixTooLong { node_prefix })?
        .nth(usize_index)
        .ok_or(out_of_blocks)
}

/// Whether two CIDRs share any address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn carves_consecutive_node_blocks() {
        let cluster = net("10.10.0.0/16");
        assert_eq!(node_block(cluster, 24, 0).unwrap(), net("10.10.0.0/24"));
        assert_eq!(node_block(cluster, 24, 3).unwrap(), net("10.10.3.0/24"));
        assert_eq!(node_block(cluster, 24, 255).unwrap(), net("10.10.255.0/24"));
    }

    #[test]
    fn carves_ipv6_blocks() {
        let cluster = net("fd10::/56");
        assert_eq!(node_block(cluster, 64, 2).unwrap(), net("fd10:0:0:2::/64"));
    }

    #[test]
    fn refuses_blocks_past_the_end_or_of_bad_size() {
        let cluster = net("10.10.0.0/16");
        assert!(matches!(
            node_block(cluster, 24, 256),
            Err(CidrError::OutOfBlocks { .. })
        ));
        assert!(matches!(
            node_block(cluster, 16, 0),
            Err(CidrError::NodePrefixTooShort { .. })
        ));
        assert!(matches!(
            node_block(cluster, 33, 0),
            Err(CidrError::NodePrefixTooLong { .. })
        ));
    }

    #[test]
    fn overlap_is_symmetric_and_exact() {
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.1.0.0/16")));
        assert!(overlaps(&net("10.1.0.0/16"), &net("10.0.0.0/8")));
        assert!(!overlaps(&net("10.1.0.0/16"), &net("10.2.0.0/16")));
        assert!(!overlaps(&net("10.1.0.0/16"), &net("fd00::/8")));
    }
}
