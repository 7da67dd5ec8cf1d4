//! Prefix arithmetic for `ipBlock` peers: a CIDR minus its `except`s, several of them united,
//! as the fewest disjoint prefixes. nftables interval sets refuse overlapping elements, and a
//! canonical form means equal address ranges always render to equal set elements.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::ruleset::Family;

/// An inclusive range of addresses of one family, as integers (IPv4 in the low 32 bits).
type Interval = (u128, u128);

fn bits(family: Family) -> u32 {
    match family {
        Family::Ipv4 => 32,
        Family::Ipv6 => 128,
    }
}

fn to_int(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn interval_of(net: &IpNet) -> Interval {
    (to_int(net.network()), to_int(net.broadcast()))
}

fn prefix(family: Family, start: u128, len: u8) -> IpNet {
    match family {
        // The start came from an IPv4 interval, so it fits in 32 bits.
        Family::Ipv4 => {
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(start as u32), len).expect("length at most 32"))
        }
        Family::Ipv6 => {
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(start), len).expect("length at most 128"))
        }
    }
}

fn family_of_net(net: &IpNet) -> Family {
    match net {
        IpNet::V4(_) => Family::Ipv4,
        IpNet::V6(_) => Family::Ipv6,
    }
}

/// `from` without any address of `cut`.
fn subtract(from: Vec<Interval>, cut: Interval) -> Vec<Interval> {
    let mut out = Vec::with_capacity(from.len() + 1);
    for (lo, hi) in from {
        if cut.1 < lo || cut.0 > hi {
            out.push((lo, hi));
            continue;
        }
        if cut.0 > lo {
            out.push((lo, cut.0 - 1));
        }
        if cut.1 < hi {
            out.push((cut.1 + 1, hi));
        }
    }
    out
}

/// Sorted, with overlapping and adjacent intervals joined.
fn merge(mut intervals: Vec<Interval>) -> Vec<Interval> {
    intervals.sort_unstable();
    let mut out: Vec<Interval> = Vec::with_capacity(intervals.len());
    for (lo, hi) in intervals {
        match out.last_mut() {
            Some(last) if last.1 == u128::MAX || lo <= last.1 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The fewest prefixes covering exactly `[lo, hi]`, in address order.
fn interval_prefixes(family: Family, (mut lo, hi): Interval, out: &mut Vec<IpNet>) {
    let width = bits(family);
    loop {
        // The largest aligned block starting at `lo` that ends at or before `hi`.
        let mut size = if lo == 0 {
            width
        } else {
            lo.trailing_zeros().min(width)
        };
        let end = |size: u32| {
            if size >= 128 {
                u128::MAX
            } else {
                lo + ((1u128 << size) - 1)
            }
        };
        while end(size) > hi {
            size -= 1;
        }
        out.push(prefix(family, lo, (width - size) as u8));
        let last = end(size);
        if last >= hi {
            return;
        }
        lo = last + 1;
    }
}

/// The addresses of `family` in any of the blocks (each a CIDR minus its excepts), as the
/// fewest disjoint prefixes, in address order. Blocks and excepts of the other family are
/// ignored.
pub fn block_prefixes<'a>(
    family: Family,
    blocks: impl IntoIterator<Item = (&'a IpNet, &'a [IpNet])>,
) -> Vec<IpNet> {
    let mut ranges = Vec::new();
    for (cidr, except) in blocks {
        if family_of_net(cidr) != family {
            continue;
        }
        let mut left = vec![interval_of(cidr)];
        for cut in except.iter().filter(|e| family_of_net(e) == family) {
            left = subtract(left, interval_of(cut));
        }
        ranges.extend(left);
    }
    let mut out = Vec::new();
    for interval in merge(ranges) {
        interval_prefixes(family, interval, &mut out);
    }
    out
}

/// The one-address prefix of `address`.
pub fn host(address: IpAddr) -> IpNet {
    IpNet::from(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn of(family: Family, blocks: &[(&str, &[&str])]) -> Vec<String> {
        let owned: Vec<(IpNet, Vec<IpNet>)> =
            blocks.iter().map(|(c, e)| (net(c), nets(e))).collect();
        block_prefixes(family, owned.iter().map(|(c, e)| (c, e.as_slice())))
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_cidr_without_excepts_is_itself_with_host_bits_cleared() {
        assert_eq!(of(Family::Ipv4, &[("10.1.2.3/16", &[])]), ["10.1.0.0/16"]);
        assert_eq!(of(Family::Ipv4, &[("0.0.0.0/0", &[])]), ["0.0.0.0/0"]);
        assert_eq!(of(Family::Ipv6, &[("::/0", &[])]), ["::/0"]);
    }

    #[test]
    fn an_except_splits_the_cidr_into_the_fewest_prefixes() {
        assert_eq!(
            of(Family::Ipv4, &[("10.0.0.0/24", &["10.0.0.128/25"])]),
            ["10.0.0.0/25"]
        );
        assert_eq!(
            of(Family::Ipv4, &[("10.0.0.0/30", &["10.0.0.1/32"])]),
            ["10.0.0.0/32", "10.0.0.2/31"]
        );
        assert_eq!(
            of(Family::Ipv4, &[("0.0.0.0/0", &["10.0.0.0/8"])]).len(),
            8,
            "0/0 minus one /8 is 8 prefixes"
        );
        assert_eq!(
            of(Family::Ipv6, &[("::/0", &["fd00::/8"])]),
            [
                "::/1", "8000::/2", "c000::/3", "e000::/4", "f000::/5", "f800::/6", "fc00::/8",
                "fe00::/7"
            ]
        );
    }

    #[test]
    fn overlapping_and_adjacent_blocks_merge() {
        assert_eq!(
            of(
                Family::Ipv4,
                &[
                    ("10.0.0.0/25", &[]),
                    ("10.0.0.128/25", &[]),
                    ("10.0.0.7/32", &[])
                ]
            ),
            ["10.0.0.0/24"]
        );
        assert_eq!(
            of(
                Family::Ipv4,
                &[("10.0.0.0/24", &["10.0.0.0/25"]), ("10.0.0.0/26", &[])]
            ),
            ["10.0.0.0/26", "10.0.0.128/25"]
        );
    }

    #[test]
    fn an_except_covering_the_cidr_leaves_nothing_and_families_stay_apart() {
        assert!(of(Family::Ipv4, &[("10.0.0.0/24", &["10.0.0.0/16"])]).is_empty());
        assert!(of(Family::Ipv6, &[("10.0.0.0/24", &[])]).is_empty());
        assert_eq!(
            of(Family::Ipv4, &[("10.0.0.0/24", &["fd00::/8"])]),
            ["10.0.0.0/24"]
        );
    }

    #[test]
    fn the_prefixes_are_disjoint_and_cover_exactly_the_range() {
        // Every address of a small space, checked one by one.
        let blocks = [
            ("10.0.0.0/26", &["10.0.0.5/32", "10.0.0.16/29"][..]),
            ("10.0.0.40/29", &["10.0.0.44/30"][..]),
            ("10.0.0.50/31", &[][..]),
        ];
        let owned: Vec<(IpNet, Vec<IpNet>)> =
            blocks.iter().map(|(c, e)| (net(c), nets(e))).collect();
        let prefixes = block_prefixes(Family::Ipv4, owned.iter().map(|(c, e)| (c, e.as_slice())));
        for last in 0..=255u8 {
            let a: IpAddr = format!("10.0.0.{last}").parse().unwrap();
            let expected = owned
                .iter()
                .any(|(c, e)| c.contains(&a) && !e.iter().any(|x| x.contains(&a)));
            let covering = prefixes.iter().filter(|p| p.contains(&a)).count();
            assert_eq!(covering, usize::from(expected), "{a}");
        }
    }
}
