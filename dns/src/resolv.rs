//! resolv.conf parsing (from text; the file is read at the edge).

use std::net::{IpAddr, SocketAddr};

/// The `nameserver` addresses of a resolv.conf, in order, on port 53. IPv6 zone suffixes
/// (`%eth0`) are dropped; malformed lines are ignored as the libc resolver does.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            let addr = words.next()?;
            let addr = addr.split('%').next().unwrap_or(addr);
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// `upstreams` without this server itself (listening on `listen`): a node whose resolv.conf
/// points at trellis-dns must not make it forward to itself in a loop.
pub fn without_self(upstreams: Vec<SocketAddr>, listen: SocketAddr) -> Vec<SocketAddr> {
    upstreams
        .into_iter()
        .filter(|u| {
            !(u.port() == listen.port()
                && (*u == listen || (listen.ip().is_unspecified() && u.ip().is_loopback())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_in_order() {
        let text = "# generated\nsearch svc.cluster.local\nnameserver 10.96.0.10\n\
                    nameserver   fe80::1%eth0  \n;nameserver 1.1.1.1\nnameserver bogus\n\
                    options ndots:5\nnameserver 8.8.8.8 # google\n";
        let got: Vec<String> = parse_resolv_conf(text)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, ["10.96.0.10:53", "[fe80::1]:53", "8.8.8.8:53"]);
        assert!(parse_resolv_conf("").is_empty());
    }

    #[test]
    fn never_forwards_to_itself() {
        let ups = parse_resolv_conf("nameserver 127.0.0.1\nnameserver 10.0.0.2\nnameserver ::1\n");
        let kept = |listen: &str| -> Vec<String> {
            without_self(ups.clone(), listen.parse().unwrap())
                .iter()
                .map(|a| a.to_string())
                .collect()
        };
        assert_eq!(kept("0.0.0.0:53"), ["10.0.0.2:53"]);
        assert_eq!(kept("127.0.0.1:53"), ["10.0.0.2:53", "[::1]:53"]);
        assert_eq!(kept("0.0.0.0:5353").len(), 3);
    }
}
