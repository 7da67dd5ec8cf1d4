//! What the fuzz targets share: feeding a stream in chunks, and the DNS zone they answer from.

use std::sync::OnceLock;

use trellis_dns::fast::FastTable;
use trellis_dns::model::Catalog;
use trellis_dns::zone::{Zone, ZoneConfig};

/// The UDP payload size the DNS targets advertise (the server's default).
pub const EDNS_UDP_SIZE: u16 = 1232;

/// Splits `data` into a chunk size (its first byte, at least 1) and the stream that follows:
/// stream decoders must not care how the network cut their input.
pub fn chunked(data: &[u8]) -> Option<(usize, &[u8])> {
    let (&step, stream) = data.split_first()?;
    Some((usize::from(step).max(1), stream))
}

/// A small but complete catalog: a ClusterSetIP import (IPv4 and IPv6 clusterset IPs, named
/// ports) exported by two clusters, a headless one with and without hostnames in two
/// clusters, and one large enough that its SRV answer does not fit 512 bytes, so truncation
/// and the dropping of additionals are exercised.
pub const CATALOG: &str = r#"{"services": [
  {"name": "web", "namespace": "shop", "ips": ["10.99.0.10", "fd99::10"],
   "ports": [{"name": "http", "port": 80}, {"name": "dns", "protocol": "UDP", "port": 53}],
   "clusters": [{"cluster": "east"}, {"cluster": "west"}]},
  {"name": "db", "namespace": "shop", "headless": true, "ports": [{"name": "pg", "port": 5432}],
   "clusters": [
    {"cluster": "east", "endpoints": [{"address": "10.9.0.1", "hostname": "db-0"},
                                      {"address": "10.9.0.2", "hostname": "db-1"},
                                      {"address": "fd00::9:3"}]},
    {"cluster": "west", "endpoints": [{"address": "10.10.0.1", "hostname": "db-0"}]}]},
  {"name": "big", "namespace": "bulk", "headless": true,
   "ports": [{"name": "x", "protocol": "UDP", "port": 9}],
   "clusters": [{"cluster": "east", "endpoints": [
       {"address": "10.8.0.1", "hostname": "h1"}, {"address": "10.8.0.2", "hostname": "h2"},
       {"address": "10.8.0.3", "hostname": "h3"}, {"address": "10.8.0.4", "hostname": "h4"},
       {"address": "10.8.0.5", "hostname": "h5"}, {"address": "10.8.0.6", "hostname": "h6"},
       {"address": "10.8.0.7", "hostname": "h7"}, {"address": "10.8.0.8", "hostname": "h8"},
       {"address": "10.8.0.9", "hostname": "h9"}, {"address": "10.8.0.10", "hostname": "h10"},
       {"address": "10.8.0.11", "hostname": "h11"}, {"address": "10.8.0.12", "hostname": "h12"},
       {"address": "10.8.0.13", "hostname": "h13"}, {"address": "10.8.0.14", "hostname": "h14"},
       {"address": "10.8.0.15", "hostname": "h15"}, {"address": "10.8.0.16", "hostname": "h16"},
       {"address": "10.8.0.17", "hostname": "h17"}, {"address": "10.8.0.18", "hostname": "h18"},
       {"address": "10.8.0.19", "hostname": "h19"}, {"address": "10.8.0.20", "hostname": "h20"}]}]}
]}"#;

/// The zone and fast table built from [`CATALOG`], once per process (building per input would
/// spend the time budget on setup).
pub fn dns() -> &'static (Zone, FastTable) {
    static DNS: OnceLock<(Zone, FastTable)> = OnceLock::new();
    DNS.get_or_init(|| {
        let catalog = Catalog::from_json(CATALOG).expect("the fuzz catalog parses");
        // Reverse zones holding the VIPs and db's endpoints: PTR answers and their negatives.
        let reverse = ["10.99.0.0/16", "10.9.0.0/24", "fd00::/16"]
            .map(|cidr| cidr.parse().expect("a reverse zone"));
        let config = ZoneConfig::new("clusterset.local", 5)
            .and_then(|config| config.with_reverse(&reverse))
            .expect("zone config");
        let zone = Zone::build(config, &catalog);
        assert!(zone.skipped().is_empty(), "{:?}", zone.skipped());
        let fast = FastTable::build(&zone, EDNS_UDP_SIZE);
        assert!(!fast.is_empty());
        (zone, fast)
    })
}

/// The UDP size limit a reply to `query` must respect, computed independently of the server:
/// 512 bytes without EDNS (or when the query cannot be parsed: the reply is a bare header),
/// else the client's advertised size capped by ours, never below 512.
pub fn udp_limit(query: &[u8]) -> usize {
    match hickory_proto::op::Message::from_vec(query) {
        Ok(message) => match &message.edns {
            Some(edns) => usize::from(edns.max_payload().min(EDNS_UDP_SIZE)).max(512),
            None => 512,
        },
        Err(_) => 512,
    }
}

/// A reply with every owner name lower-cased, so that answers differing only in the spelling
/// the client chose compare equal.
pub fn canonical(bytes: &[u8]) -> hickory_proto::op::Message {
    let mut message = hickory_proto::op::Message::from_vec(bytes).expect("our replies parse");
    for query in &mut message.queries {
        let lower = query.name().to_lowercase();
        query.set_name(lower);
    }
    for record in message
        .answers
        .iter_mut()
        .chain(&mut message.authorities)
        .chain(&mut message.additionals)
    {
        let lower = record.name.to_lowercase();
        record.name = lower;
    }
    message
}
