//! Which clients may use forwarding: a list of CIDRs (`--forward-for`). Off by default, so a
//! trellis-dns reachable from pods is not an open resolver for anything else (an amplifier
//! for spoofed queries, a way around the cluster's DNS policy); the cluster DNS forwards only
//! `clusterset.local` here and needs none of it.

use std::net::IpAddr;
use std::str::FromStr;

/// A CIDR that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum CidrError {
    /// No `/prefix`.
    #[error("{value:?} is not ADDRESS/PREFIX")]
    Form {
        /// The text.
        value: String,
    },
    /// The address part is not an IP address.
    #[error("the address of {value:?}")]
    Address {
        /// The text.
        value: String,
        /// The parse error.
        #[source]
        source: std::net::AddrParseError,
    },
    /// The prefix is not a number within the address's length.
    #[error("the prefix of {value:?} must be 0..=32 for IPv4, 0..=128 for IPv6")]
    Prefix {
        /// The text.
        value: String,
    },
}

/// An address range, `ADDRESS/PREFIX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The range's address as given (not masked).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the range (an IPv4-mapped IPv6 client counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(value: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = value.split_once('/').ok_or_else(|| CidrError::Form {
            value: value.into(),
        })?;
        let addr: IpAddr = addr.parse().map_err(|source| CidrError::Address {
            value: value.into(),
            source,
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| CidrError::Prefix {
                value: value.into(),
            })?;
        Ok(Self {
            addr: addr.to_canonical(),
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The clients allowed to use forwarding; empty (the default) allows none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardAcl {
    allowed: Vec<Cidr>,
}

impl ForwardAcl {
    /// Allows the clients within any of `allowed`.
    pub fn new(allowed: Vec<Cidr>) -> Self {
        Self { allowed }
    }

    /// Whether `client` may have its out-of-zone queries forwarded.
    pub fn allows(&self, client: IpAddr) -> bool {
        self.allowed.iter().any(|cidr| cidr.contains(client))
    }

    /// Whether nobody may.
    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(cidrs: &[&str]) -> ForwardAcl {
        ForwardAcl::new(cidrs.iter().map(|c| c.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn matches_by_prefix_and_family() {
        let lab = acl(&["10.1.0.0/16", "198.18.1.0/24", "fd00:10::/64"]);
        assert!(lab.allows(ip("10.1.255.3")) && lab.allows(ip("198.18.1.10")));
        assert!(!lab.allows(ip("10.2.0.1")) && !lab.allows(ip("198.18.2.1")));
        assert!(lab.allows(ip("fd00:10::5")) && !lab.allows(ip("fd00:11::5")));
        // A dual-stack socket sees IPv4 clients as mapped addresses.
        assert!(lab.allows(ip("::ffff:10.1.0.1")));
        assert!(!lab.allows(ip("::ffff:10.2.0.1")));
        let everyone = acl(&["0.0.0.0/0", "::/0"]);
        assert!(everyone.allows(ip("203.0.113.9")) && everyone.allows(ip("2001:db8::1")));
        let host = acl(&["127.0.0.1/32"]);
        assert!(host.allows(ip("127.0.0.1")) && !host.allows(ip("127.0.0.2")));
        assert!(acl(&["::/0"]).allows(ip("::1")) && !acl(&["::/0"]).allows(ip("10.0.0.1")));
        let none = ForwardAcl::default();
        assert!(none.is_empty() && !none.allows(ip("127.0.0.1")));
    }

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "fd00::/129",
            "x/8",
            "10.0.0.0/-1",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let error = "nope/8".parse::<Cidr>().unwrap_err();
        assert!(std::error::Error::source(&error).is_some());
        assert!(!error.to_string().contains("invalid IP"), "{error}");
    }
}
