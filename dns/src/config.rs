//! The one typed configuration of `trellis-dns`, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::Error;
use crate::acl::{Cidr, ForwardAcl};
use crate::zone::ZoneConfig;

/// Everything `trellis-dns` needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// UDP and TCP listen address (port 0 picks an ephemeral port, for tests).
    pub listen: SocketAddr,
    /// Where `/metrics` is served (`None`: not served).
    pub metrics: Option<SocketAddr>,
    /// The authoritative zone.
    pub zone: String,
    /// TTL of answers and of negative answers.
    pub ttl: u32,
    /// Address ranges whose reverse zones are served too (PTR records of the clusterset IPs
    /// and headless endpoints within them). Empty (the default): none.
    pub reverse_zones: Vec<Cidr>,
    /// The catalog file to watch (`None`: fed in-process only).
    pub catalog_file: Option<PathBuf>,
    /// How often the catalog file is checked for changes.
    pub catalog_poll: Duration,
    /// The mesh controller's agent port, `HOST:PORT`, to subscribe to (`None`: no
    /// subscription). Mutually exclusive with `catalog_file`.
    pub controller: Option<String>,
    /// Deprecated: a file holding the shared agent token of a controller without agent TLS
    /// (read once at start, trimmed). Exclusive with `agent_tls`.
    pub controller_token_file: Option<PathBuf>,
    /// The agent port's TLS: the cluster's agent CA and the DNS identity's certificate and
    /// key (`dns.<cluster>.trellis`), re-read when they change.
    pub agent_tls: Option<trellis_agent_client::TlsFiles>,
    /// Clients whose out-of-zone queries are forwarded; everyone else gets REFUSED. Empty
    /// (the default): nobody's.
    pub forward_for: ForwardAcl,
    /// Upstream resolvers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Time allowed to each upstream per query.
    pub upstream_timeout: Duration,
    /// Forwarded queries in flight at most; beyond, SERVFAIL at once.
    pub max_forwards_in_flight: usize,
    /// UDP payload size advertised in EDNS and the cap for UDP answers (512..=4096).
    pub edns_udp_size: u16,
    /// UDP worker threads, each with its own `SO_REUSEPORT` socket.
    pub udp_workers: usize,
    /// Identical UDP responses (same client /24 or /56, name, type and rcode) sent per second
    /// at most; beyond, every other one is slipped (TC, empty) and the rest dropped. 0: off.
    pub rate_limit: u32,
    /// Slots of the rate limiter's table (8 bytes each, rounded up to a power of two): the
    /// buckets tracked at once, whatever the number of clients.
    pub rate_limit_slots: usize,
    /// Requested UDP receive buffer (bytes).
    pub udp_recv_buffer: usize,
    /// TCP connections served at once; beyond, new ones are closed.
    pub max_tcp_connections: usize,
    /// A TCP connection idle this long is closed.
    pub tcp_idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 53)),
            metrics: Some(SocketAddr::from(([0, 0, 0, 0], 9153))),
            zone: "clusterset.local".into(),
            ttl: 5,
            reverse_zones: Vec::new(),
            catalog_file: None,
            catalog_poll: Duration::from_secs(1),
            controller: None,
            controller_token_file: None,
            agent_tls: None,
            forward_for: ForwardAcl::default(),
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            max_forwards_in_flight: 1024,
            edns_udp_size: 1232,
            udp_workers: 1,
            rate_limit: 20,
            rate_limit_slots: 1 << 16,
            udp_recv_buffer: 4 << 20,
            max_tcp_connections: 512,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Checks the values and returns the zone configuration.
    pub fn validate(&self) -> Result<ZoneConfig, Error> {
        let fail = |reason: &'static str| Err(Error::Config { reason });
        if !(512..=4096).contains(&self.edns_udp_size) {
            return fail("edns_udp_size must be within 512..=4096");
        }
        if self.ttl == 0 || self.ttl > 3600 {
            return fail("ttl must be within 1..=3600 seconds");
        }
        if self.udp_workers == 0 || self.udp_workers > 64 {
            return fail("udp_workers must be within 1..=64");
        }
        if self.upstream_timeout.is_zero() || self.catalog_poll.is_zero() {
            return fail("timeouts and poll intervals must be positive");
        }
        if self.max_forwards_in_flight == 0 || self.max_tcp_connections == 0 {
            return fail("connection and forward limits must be positive");
        }
        if self.rate_limit_slots == 0 || self.rate_limit_slots > 1 << 24 {
            return fail("rate_limit_slots must be within 1..=16777216");
        }
        if self.upstreams.iter().any(|u| u.port() == 0) {
            return fail("upstream port must not be 0");
        }
        if self.catalog_file.is_some() && self.controller.is_some() {
            return fail("a catalog file and a controller are mutually exclusive: give one source");
        }
        if self.controller_token_file.is_some() && self.controller.is_none() {
            return fail("a controller token file needs a controller");
        }
        if self.agent_tls.is_some() && self.controller.is_none() {
            return fail("agent TLS files need a controller");
        }
        if self.agent_tls.is_some() && self.controller_token_file.is_some() {
            return fail(
                "a controller token file cannot be combined with agent TLS: the controller knows DNS by its certificate",
            );
        }
        if let Some(addr) = &self.controller {
            match addr.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {}
                _ => return fail("controller must be HOST:PORT with a non-zero port"),
            }
        }
        ZoneConfig::new(&self.zone, self.ttl)?.with_reverse(&self.reverse_zones)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_limits_enforced() {
        let zone = Config::default().validate().unwrap();
        assert_eq!(Config::default().rate_limit, 20);
        assert!(Config::default().forward_for.is_empty());
        Config {
            controller: Some("trellis-controller.trellis-system:7443".into()),
            controller_token_file: Some("/token".into()),
            ..Config::default()
        }
        .validate()
        .unwrap();
        assert_eq!(zone.apex.to_ascii(), "clusterset.local.");
        assert!(zone.reverse.is_empty());
        let zone = Config {
            reverse_zones: vec![
                "10.99.0.0/16".parse().unwrap(),
                "fd99::/64".parse().unwrap(),
            ],
            ..Config::default()
        }
        .validate()
        .unwrap();
        assert_eq!(
            zone.reverse
                .iter()
                .map(|n| n.to_ascii())
                .collect::<Vec<_>>(),
            [
                "99.10.in-addr.arpa.",
                "0.0.0.0.0.0.0.0.0.0.0.0.9.9.d.f.ip6.arpa."
            ]
        );
        for bad in [
            Config {
                edns_udp_size: 100,
                ..Config::default()
            },
            Config {
                ttl: 0,
                ..Config::default()
            },
            Config {
                udp_workers: 0,
                ..Config::default()
            },
            Config {
                zone: ".".into(),
                ..Config::default()
            },
            Config {
                zone: "a..b".into(),
                ..Config::default()
            },
            Config {
                catalog_file: Some("/c.json".into()),
                controller: Some("127.0.0.1:7443".into()),
                ..Config::default()
            },
            Config {
                controller_token_file: Some("/token".into()),
                ..Config::default()
            },
            Config {
                controller: Some("no-port".into()),
                ..Config::default()
            },
            Config {
                controller: Some("host:0".into()),
                ..Config::default()
            },
            Config {
                rate_limit_slots: 0,
                ..Config::default()
            },
            // Reverse zones end on a label of the reverse tree.
            Config {
                reverse_zones: vec!["10.96.0.0/12".parse().unwrap()],
                ..Config::default()
            },
            Config {
                reverse_zones: vec!["fd00::/62".parse().unwrap()],
                ..Config::default()
            },
            Config {
                reverse_zones: vec!["0.0.0.0/0".parse().unwrap()],
                ..Config::default()
            },
            Config {
                reverse_zones: vec!["10.1.2.3/32".parse().unwrap()],
                ..Config::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
