//! The authoritative data for the cluster-set zone, built from a [`Catalog`] (pure: no IO),
//! as the Kubernetes DNS-Based Multicluster Service Discovery specification (KEP-1645,
//! schema 1.0.0) has it. For a service `<svc>.<ns>` imported from clusters `<c>`:
//! - `<svc>.<ns>.svc.<zone>` A/AAAA: the clusterset IPs of a ClusterSetIP import (none until
//!   one is known: the name then exists without addresses), every ready endpoint address of
//!   every cluster for a headless one (which does not exist without a ready endpoint);
//! - `<svc>.<ns>.svc.<zone>` SRV: one record per port: the port with the service name as
//!   target (ClusterSetIP), or per ready endpoint and port with the endpoint's name as target
//!   (headless);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV: the same, per named port;
//! - `<hostname>.<c>.<svc>.<ns>.svc.<zone>` A/AAAA: a ready headless endpoint, named by its
//!   hostname or, without one, by its first address with dots or colons as dashes (the
//!   specification's "unique system-assigned identifier");
//! - `dns-version.<zone>` TXT `1.0.0`, and the SOA and NS records at the apex.
//! - in the reverse zones configured ([`ZoneConfig::with_reverse`]), PTR records: a clusterset
//!   IP to the service name, a ready headless endpoint's address to its name; each reverse
//!   zone has its own SOA and NS.
//!
//! Nothing else: no name picks one cluster's backends (`<c>.<svc>...` exists only as the
//! empty parent of a headless endpoint's name). Every ancestor of a published name down to the
//! apex exists (empty non-terminals answer NODATA, not NXDOMAIN).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use crate::Error;
use crate::acl::Cidr;
use crate::model::{Catalog, Endpoint, valid_label};

/// A service of the catalog left out of the zone, and why.
#[derive(Clone, Debug)]
pub struct Skipped {
    /// `<name>.<namespace>`.
    pub service: String,
    /// Why.
    pub reason: SkipReason,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            self.service,
            trellis_core::error_chain(&self.reason)
        )
    }
}

/// Why a service of the catalog is left out of the zone (listed in [`Zone::skipped`]).
#[derive(Clone, Debug, thiserror::Error)]
pub enum SkipReason {
    /// The service name or namespace is not a DNS label.
    #[error("invalid label {0:?}")]
    Label(String),
    /// An exporting cluster's name is not a DNS label.
    #[error("invalid cluster name {0:?}")]
    Cluster(String),
    /// A ready endpoint's hostname is not a DNS label.
    #[error("invalid endpoint hostname {0:?}")]
    Hostname(String),
    /// A port name is not a DNS label.
    #[error("invalid port name {0:?}")]
    PortName(String),
    /// The labels do not make a domain name under the apex (too long).
    #[error("name {labels:?}")]
    Name {
        /// The labels, before the apex.
        labels: Vec<String>,
        /// Why they make no name.
        #[source]
        source: hickory_proto::ProtoError,
    },
}

/// The schema version of the MCS DNS specification served (`dns-version.<zone>` TXT).
pub const SCHEMA_VERSION: &str = "1.0.0";

/// What the zone is and how it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The apex, e.g. `clusterset.local.`.
    pub apex: Name,
    /// TTL of every record, and of negative answers (SOA minimum).
    pub ttl: u32,
    /// Reverse zones (`in-addr.arpa`/`ip6.arpa` names) served as well: PTR records for the
    /// clusterset IPs and ready headless endpoints within them, NXDOMAIN for the rest.
    pub reverse: Vec<Name>,
}

impl ZoneConfig {
    /// A zone config for `apex` (e.g. `clusterset.local`).
    pub fn new(apex: &str, ttl: u32) -> Result<Self, Error> {
        let mut apex = Name::from_ascii(apex).map_err(|source| Error::ZoneName {
            apex: apex.to_string(),
            source,
        })?;
        apex.set_fqdn(true);
        if apex.is_root() {
            return Err(Error::Config {
                reason: "zone must not be the root",
            });
        }
        Ok(Self {
            apex: apex.to_lowercase(),
            ttl,
            reverse: Vec::new(),
        })
    }

    /// Also serves the reverse zones of `ranges`. A range must end on a label boundary of the
    /// reverse tree (an IPv4 prefix of 8, 16 or 24 bits; an IPv6 prefix a multiple of 4 up to
    /// 124) to be a zone of its own.
    pub fn with_reverse(mut self, ranges: &[Cidr]) -> Result<Self, Error> {
        for range in ranges {
            let (bits, arpa_labels) = match range.addr() {
                IpAddr::V4(_) => (8, 4),
                IpAddr::V6(_) => (4, 32),
            };
            let prefix = usize::from(range.prefix());
            if prefix == 0 || prefix % bits != 0 || prefix / bits >= arpa_labels {
                return Err(Error::Config {
                    reason: "a reverse zone must be an IPv4 /8, /16 or /24, or an IPv6 prefix a multiple of 4 up to /124",
                });
            }
            let reverse = Name::from(range.addr()).trim_to(prefix / bits + 2);
            let reverse = reverse.to_lowercase();
            if !self.reverse.contains(&reverse) {
                self.reverse.push(reverse);
            }
        }
        Ok(self)
    }
}

/// The records of one owner name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// A records.
    pub a: Vec<Ipv4Addr>,
    /// AAAA records.
    pub aaaa: Vec<Ipv6Addr>,
    /// SRV records.
    pub srv: Vec<SRV>,
    /// TXT records (one string each).
    pub txt: Vec<String>,
    /// The PTR record of a reverse name (at most one: one name per address).
    pub ptr: Option<Name>,
}

impl Node {
    fn push_addr(&mut self, addr: IpAddr) {
        match addr {
            IpAddr::V4(v4) if !self.a.contains(&v4) => self.a.push(v4),
            IpAddr::V6(v6) if !self.aaaa.contains(&v6) => self.aaaa.push(v6),
            _ => {}
        }
    }

    /// Adds an SRV record unless the same one is there (an RRset holds no duplicates: two
    /// ports of the same number but different protocols make one record at the bare name).
    fn push_srv(&mut self, srv: SRV) {
        if !self.srv.contains(&srv) {
            self.srv.push(srv);
        }
    }
}

/// The answer of the zone to one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The name is outside the zone: forward it.
    NotInZone,
    /// The name is in the zone but no catalog has been loaded yet: nothing is known about it
    /// (SERVFAIL; an NXDOMAIN now would be cached as the truth).
    NotLoaded,
    /// The name does not exist (answer with the SOA in authority).
    NxDomain,
    /// The name exists without records of that type (NOERROR, SOA in authority).
    NoData,
    /// Records, plus additional records (addresses of SRV targets).
    Found {
        /// The answer section.
        answers: Vec<Record>,
        /// The additional section.
        additionals: Vec<Record>,
    },
}

/// The zone's contents at one catalog revision.
#[derive(Clone, Debug)]
pub struct Zone {
    config: ZoneConfig,
    apex: LowerName,
    /// The reverse zones' apexes.
    reverse: Vec<LowerName>,
    serial: u32,
    nodes: HashMap<LowerName, Node>,
    /// Services of the catalog that were skipped, with the reason.
    skipped: Vec<Skipped>,
    services: usize,
    /// Built from a catalog (false only for [`Zone::not_loaded`]).
    loaded: bool,
}

impl Zone {
    /// An empty zone (the apex records only).
    pub fn empty(config: ZoneConfig) -> Self {
        Self::build(config, &Catalog::default())
    }

    /// The zone before any catalog: every in-zone name is [`Lookup::NotLoaded`], no name
    /// exists (so nothing is precomputed).
    pub fn not_loaded(config: ZoneConfig) -> Self {
        let mut zone = Self::empty(config);
        zone.nodes.clear();
        zone.loaded = false;
        zone
    }

    /// Whether the zone was built from a catalog.
    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    /// Builds the zone from a catalog. Invalid services (bad labels) are skipped and listed in
    /// [`Zone::skipped`]; the rest is published.
    pub fn build(config: ZoneConfig, catalog: &Catalog) -> Self {
        let apex = LowerName::new(&config.apex);
        let reverse: Vec<LowerName> = config.reverse.iter().map(LowerName::new).collect();
        let mut zone = Self {
            apex: apex.clone(),
            reverse: reverse.clone(),
            serial: catalog.revision as u32,
            nodes: HashMap::new(),
            skipped: Vec::new(),
            services: 0,
            config,
            loaded: true,
        };
        for apex in std::iter::once(apex).chain(reverse) {
            zone.nodes.insert(apex, Node::default());
        }
        // Fails only for an apex too long to hold any name below it.
        if let Ok(version) = zone.name(&["dns-version"]) {
            zone.insert(
                version,
                Node {
                    txt: vec![SCHEMA_VERSION.to_string()],
                    ..Node::default()
                },
            );
        }
        for service in &catalog.services {
            if let Err(reason) = zone.add_service(service) {
                zone.skipped.push(Skipped {
                    service: format!("{}.{}", service.name, service.namespace),
                    reason,
                });
            } else {
                zone.services += 1;
            }
        }
        for node in zone.nodes.values_mut() {
            finish_srv(node);
        }
        zone
    }

    fn add_service(&mut self, service: &crate::model::ServiceImport) -> Result<(), SkipReason> {
        for label in [&service.name, &service.namespace] {
            if !valid_label(label) {
                return Err(SkipReason::Label(label.clone()));
            }
        }
        for port in &service.ports {
            if let Some(name) = &port.name
                && !valid_label(name)
            {
                return Err(SkipReason::PortName(name.clone()));
            }
        }
        let svc = self.name(&[&service.name, &service.namespace, "svc"])?;
        // SRV owners: the bare name for every port, `_<port>._<proto>` for the named ones.
        let mut srv_owners: Vec<(Name, u16)> = Vec::new();
        for port in &service.ports {
            srv_owners.push((svc.clone(), port.port));
            if let Some(port_name) = &port.name {
                let owner = self.name(&[
                    &format!("_{port_name}"),
                    &format!("_{}", port.protocol.lowercase()),
                    &service.name,
                    &service.namespace,
                    "svc",
                ])?;
                srv_owners.push((owner, port.port));
            }
        }

        // Collected first, inserted after: an error leaves the zone untouched.
        let mut owned: Vec<(Name, Node)> = Vec::new();
        let mut service_node = Node::default();
        if !service.headless {
            for ip in &service.ips {
                service_node.push_addr(*ip);
                owned.push((reverse_name(*ip), pointer(&svc)));
            }
            // SRV records point at the clusterset IPs: none before one is known.
            if !service.ips.is_empty() {
                for (owner, port) in &srv_owners {
                    let mut node = Node::default();
                    node.push_srv(SRV::new(0, 0, *port, svc.clone()));
                    owned.push((owner.clone(), node));
                }
            }
            owned.push((svc, service_node));
        } else {
            for export in &service.clusters {
                if !valid_label(&export.cluster) {
                    return Err(SkipReason::Cluster(export.cluster.clone()));
                }
                for endpoint in export.endpoints.iter().filter(|e| e.ready) {
                    let Some(host) = endpoint_label(endpoint)? else {
                        continue;
                    };
                    let target = self.name(&[
                        &host,
                        &export.cluster,
                        &service.name,
                        &service.namespace,
                        "svc",
                    ])?;
                    let mut node = Node::default();
                    for addr in &endpoint.addresses {
                        node.push_addr(*addr);
                        service_node.push_addr(*addr);
                        owned.push((reverse_name(*addr), pointer(&target)));
                    }
                    for (owner, port) in &srv_owners {
                        let mut srv = Node::default();
                        srv.push_srv(SRV::new(0, 0, *port, target.clone()));
                        owned.push((owner.clone(), srv));
                    }
                    owned.push((target, node));
                }
            }
            // A headless service without a ready endpoint has no records: NXDOMAIN (2.4.1).
            if service_node.a.is_empty() && service_node.aaaa.is_empty() {
                return Ok(());
            }
            owned.push((svc, service_node));
        }
        for (name, node) in owned {
            self.insert(name, node);
        }
        Ok(())
    }

    /// `labels` + apex, lower-cased.
    fn name(&self, labels: &[&str]) -> Result<Name, SkipReason> {
        let fail = |source| SkipReason::Name {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            source,
        };
        Name::from_labels(labels.iter().map(|l| l.to_ascii_lowercase().into_bytes()))
            .map_err(fail)?
            .append_domain(&self.config.apex)
            .map_err(fail)
    }

    /// Adds `node` under `name` (merging with what is there) and every ancestor up to its
    /// zone's apex; a name in none of the zones (an address outside the reverse zones) is
    /// left out.
    fn insert(&mut self, name: Name, node: Node) {
        let key = LowerName::new(&name);
        let Some(apex_labels) = self.apex_of(&key).map(LowerName::num_labels) else {
            return;
        };
        let entry = self.nodes.entry(key.clone()).or_default();
        for addr in node.a {
            entry.push_addr(IpAddr::V4(addr));
        }
        for addr in node.aaaa {
            entry.push_addr(IpAddr::V6(addr));
        }
        for srv in node.srv {
            entry.push_srv(srv);
        }
        for txt in node.txt {
            if !entry.txt.contains(&txt) {
                entry.txt.push(txt);
            }
        }
        // One PTR per address: the first service (in catalog order) to claim it keeps it.
        if entry.ptr.is_none() {
            entry.ptr = node.ptr;
        }
        let mut parent = key.base_name();
        while parent.num_labels() > apex_labels {
            self.nodes.entry(parent.clone()).or_default();
            parent = parent.base_name();
        }
    }

    /// The zone's config.
    pub fn config(&self) -> &ZoneConfig {
        &self.config
    }

    /// Services published.
    pub fn services(&self) -> usize {
        self.services
    }

    /// Services skipped at build time, with the reason.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Every owner name in the zone (lower case), for precomputing answers.
    pub fn names(&self) -> impl Iterator<Item = (&LowerName, &Node)> {
        self.nodes.iter()
    }

    /// Whether `name` is at or below the apex or a reverse zone's.
    pub fn contains(&self, name: &LowerName) -> bool {
        self.apex_of(name).is_some()
    }

    /// Whether `name` is in one of the reverse zones.
    pub fn is_reverse(&self, name: &LowerName) -> bool {
        self.reverse.iter().any(|apex| apex.zone_of(name))
    }

    /// The apex of the zone `name` is in: the cluster-set apex, or the deepest reverse zone
    /// holding it.
    fn apex_of(&self, name: &LowerName) -> Option<&LowerName> {
        if self.apex.zone_of(name) {
            return Some(&self.apex);
        }
        self.reverse
            .iter()
            .filter(|apex| apex.zone_of(name))
            .max_by_key(|apex| apex.num_labels())
    }

    /// The name of the zone's name server (the SOA's MNAME and the apex's NS target).
    fn name_server(&self) -> Name {
        Name::from_ascii("ns.dns")
            .and_then(|n| n.append_domain(&self.config.apex))
            .unwrap_or_else(|_| self.config.apex.clone())
    }

    /// The SOA record of the apex (for authority sections).
    pub fn soa(&self) -> Record {
        self.soa_at(self.config.apex.clone())
    }

    /// The SOA record of the zone `name` is in (the authority of a negative answer for it).
    pub fn soa_for(&self, name: &Name) -> Record {
        match self.apex_of(&LowerName::new(name)) {
            Some(apex) => self.soa_at(Name::from(apex.clone())),
            None => self.soa(),
        }
    }

    /// The SOA record of the zone at `owner`; the server and mailbox are named in the
    /// cluster-set zone whatever the zone.
    fn soa_at(&self, owner: Name) -> Record {
        let apex = self.config.apex.clone();
        let rname = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&apex))
            .unwrap_or_else(|_| apex.clone());
        Record::from_rdata(
            owner,
            self.config.ttl,
            RData::SOA(SOA::new(
                self.name_server(),
                rname,
                self.serial,
                7200,
                1800,
                86400,
                self.config.ttl,
            )),
        )
    }

    /// Answers `qtype` for `qname`; owner names of answers are `qname` as asked (case kept).
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Lookup {
        let key = LowerName::new(qname);
        let Some(apex) = self.apex_of(&key) else {
            return Lookup::NotInZone;
        };
        if !self.loaded {
            return Lookup::NotLoaded;
        }
        let Some(node) = self.nodes.get(&key) else {
            return Lookup::NxDomain;
        };
        let ttl = self.config.ttl;
        let record = |data: RData| Record::from_rdata(qname.clone(), ttl, data);
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let any = qtype == RecordType::ANY;
        if qtype == RecordType::A || any {
            answers.extend(node.a.iter().map(|a| record(RData::A(A(*a)))));
        }
        if qtype == RecordType::AAAA || any {
            answers.extend(node.aaaa.iter().map(|a| record(RData::AAAA(AAAA(*a)))));
        }
        if qtype == RecordType::SRV || any {
            for srv in &node.srv {
                answers.push(record(RData::SRV(srv.clone())));
                if let Some(target) = self.nodes.get(&LowerName::new(&srv.target)) {
                    let owner = srv.target.clone();
                    let addresses = target
                        .a
                        .iter()
                        .map(|a| RData::A(A(*a)))
                        .chain(target.aaaa.iter().map(|a| RData::AAAA(AAAA(*a))));
                    for data in addresses {
                        let record = Record::from_rdata(owner.clone(), ttl, data);
                        if !additionals.contains(&record) {
                            additionals.push(record);
                        }
                    }
                }
            }
        }
        if qtype == RecordType::TXT || any {
            answers.extend(
                node.txt
                    .iter()
                    .map(|t| record(RData::TXT(TXT::new(vec![t.clone()])))),
            );
        }
        if qtype == RecordType::PTR || any {
            answers.extend(node.ptr.iter().map(|t| record(RData::PTR(PTR(t.clone())))));
        }
        if key == *apex {
            if qtype == RecordType::SOA || any {
                let mut soa = self.soa();
                soa.name = qname.clone();
                answers.push(soa);
            }
            if qtype == RecordType::NS || any {
                answers.push(record(RData::NS(NS(self.name_server()))));
            }
        }
        if answers.is_empty() {
            Lookup::NoData
        } else {
            Lookup::Found {
                answers,
                additionals,
            }
        }
    }
}

/// The reverse name of `addr` (`<d>.<c>.<b>.<a>.in-addr.arpa.`, or nibbles under `ip6.arpa.`).
fn reverse_name(addr: IpAddr) -> Name {
    let mut name = Name::from(addr).to_lowercase();
    name.set_fqdn(true);
    name
}

/// A node holding only a PTR record to `target`.
fn pointer(target: &Name) -> Node {
    Node {
        ptr: Some(target.clone()),
        ..Node::default()
    }
}

/// The label naming a ready headless endpoint under its cluster: its hostname, or its first
/// address with dots or colons as dashes (the specification's "unique system-assigned
/// identifier", the form the MCS conformance suite expects); `None` for an endpoint without
/// an address.
fn endpoint_label(endpoint: &Endpoint) -> Result<Option<String>, SkipReason> {
    if let Some(host) = &endpoint.hostname {
        if !valid_label(host) {
            return Err(SkipReason::Hostname(host.clone()));
        }
        return Ok(Some(host.clone()));
    }
    Ok(endpoint
        .addresses
        .first()
        .map(|a| a.to_string().replace(['.', ':'], "-")))
}

/// Equal weights summing to about 100 within each priority, as CoreDNS does.
fn finish_srv(node: &mut Node) {
    if node.srv.is_empty() {
        return;
    }
    node.srv.sort_by_key(|s| s.priority);
    let srvs = std::mem::take(&mut node.srv);
    for srv in &srvs {
        let same = srvs.iter().filter(|s| s.priority == srv.priority).count();
        let weight = (100 / same).max(1) as u16;
        node.srv
            .push(SRV::new(srv.priority, weight, srv.port, srv.target.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::from_json(
            r#"{"revision": 3, "services": [
              {"name": "web", "namespace": "shop", "ips": ["10.96.5.1", "fd00::5:1"],
               "ports": [{"name": "http", "port": 80}, {"name": "http-udp", "protocol": "UDP", "port": 80},
                         {"port": 81}],
               "clusters": [{"cluster": "east", "endpoints": [{"address": "10.1.0.5"}]},
                            {"cluster": "west", "endpoints": [{"address": "10.2.0.5"}]}]},
              {"name": "db", "namespace": "shop", "headless": true, "ports": [{"name": "pg", "port": 5432}],
               "clusters": [
                {"cluster": "west", "endpoints": [{"address": "10.2.1.5", "hostname": "db-0"},
                                                  {"address": "10.2.1.6"},
                                                  {"address": "10.2.1.7", "hostname": "db-2", "ready": false}]},
                {"cluster": "east", "endpoints": [{"addresses": ["10.1.1.5", "fd00::1:5"], "hostname": "db-0"}]}]},
              {"name": "pending", "namespace": "shop", "ports": [{"name": "http", "port": 80}]},
              {"name": "idle", "namespace": "shop", "headless": true, "ports": [{"name": "pg", "port": 5432}],
               "clusters": [{"cluster": "west", "endpoints": [{"address": "10.2.2.5", "ready": false}]}]},
              {"name": "Bad.Name", "namespace": "shop"}
            ]}"#,
        )
        .unwrap()
    }

    fn zone() -> Zone {
        Zone::build(ZoneConfig::new("clusterset.local", 5).unwrap(), &catalog())
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn rdatas(lookup: Lookup) -> Vec<String> {
        match lookup {
            Lookup::Found { answers, .. } => answers.iter().map(|r| r.data.to_string()).collect(),
            other => panic!("expected records, got {other:?}"),
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn a_clusterset_ip_service_answers_its_vips_not_the_clusters_ips() {
        let zone = zone();
        let q = name("web.shop.svc.clusterset.local.");
        assert_eq!(rdatas(zone.lookup(&q, RecordType::A)), ["10.96.5.1"]);
        assert_eq!(rdatas(zone.lookup(&q, RecordType::AAAA)), ["fd00::5:1"]);
        // No name singles out one cluster's backends.
        for cluster in ["east", "west"] {
            assert_eq!(
                zone.lookup(
                    &name(&format!("{cluster}.web.shop.svc.clusterset.local.")),
                    RecordType::A
                ),
                Lookup::NxDomain
            );
        }
    }

    #[test]
    fn clusterset_ip_srv_targets_the_service_name() {
        let zone = zone();
        // At the bare name one record per port number: 80/TCP and 80/UDP make one.
        let bare = name("web.shop.svc.clusterset.local.");
        assert_eq!(
            rdatas(zone.lookup(&bare, RecordType::SRV)),
            [
                "0 50 80 web.shop.svc.clusterset.local.",
                "0 50 81 web.shop.svc.clusterset.local."
            ]
        );
        let Lookup::Found { additionals, .. } = zone.lookup(&bare, RecordType::SRV) else {
            panic!()
        };
        assert_eq!(additionals.len(), 2, "the VIPs: {additionals:?}");
        for (owner, want) in [
            ("_http._tcp", "0 100 80 web.shop.svc.clusterset.local."),
            ("_http-udp._udp", "0 100 80 web.shop.svc.clusterset.local."),
        ] {
            assert_eq!(
                rdatas(zone.lookup(
                    &name(&format!("{owner}.web.shop.svc.clusterset.local.")),
                    RecordType::SRV
                )),
                [want],
                "{owner}"
            );
        }
        // The unnamed port has no `_<port>._<proto>` name.
        assert_eq!(
            zone.lookup(
                &name("_81._tcp.web.shop.svc.clusterset.local."),
                RecordType::SRV
            ),
            Lookup::NxDomain
        );
    }

    #[test]
    fn before_its_vip_a_clusterset_ip_service_exists_without_data() {
        let zone = zone();
        let q = name("pending.shop.svc.clusterset.local.");
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::SRV] {
            assert_eq!(zone.lookup(&q, qtype), Lookup::NoData, "{qtype}");
        }
    }

    #[test]
    fn headless_answers_every_ready_endpoint_of_every_cluster() {
        let zone = zone();
        let db = name("db.shop.svc.clusterset.local.");
        assert_eq!(
            sorted(rdatas(zone.lookup(&db, RecordType::A))),
            ["10.1.1.5", "10.2.1.5", "10.2.1.6"]
        );
        assert_eq!(rdatas(zone.lookup(&db, RecordType::AAAA)), ["fd00::1:5"]);
        // The same hostname in two clusters: two names.
        for (cluster, want) in [("west", vec!["10.2.1.5"]), ("east", vec!["10.1.1.5"])] {
            assert_eq!(
                rdatas(zone.lookup(
                    &name(&format!("db-0.{cluster}.db.shop.svc.clusterset.local.")),
                    RecordType::A
                )),
                want
            );
        }
        assert_eq!(
            rdatas(zone.lookup(
                &name("db-0.east.db.shop.svc.clusterset.local."),
                RecordType::AAAA
            )),
            ["fd00::1:5"]
        );
        // Without a hostname: the address, dashed.
        assert_eq!(
            rdatas(zone.lookup(
                &name("10-2-1-6.west.db.shop.svc.clusterset.local."),
                RecordType::A
            )),
            ["10.2.1.6"]
        );
        // A not-ready endpoint has no name.
        assert_eq!(
            zone.lookup(
                &name("db-2.west.db.shop.svc.clusterset.local."),
                RecordType::A
            ),
            Lookup::NxDomain
        );
        let srv = [
            "0 33 5432 10-2-1-6.west.db.shop.svc.clusterset.local.",
            "0 33 5432 db-0.east.db.shop.svc.clusterset.local.",
            "0 33 5432 db-0.west.db.shop.svc.clusterset.local.",
        ];
        for owner in [
            "db.shop.svc.clusterset.local.",
            "_pg._tcp.db.shop.svc.clusterset.local.",
        ] {
            assert_eq!(
                sorted(rdatas(zone.lookup(&name(owner), RecordType::SRV))),
                srv,
                "{owner}"
            );
        }
        // The cluster label exists only as the endpoints' parent: no records of its own.
        assert_eq!(
            zone.lookup(&name("west.db.shop.svc.clusterset.local."), RecordType::A),
            Lookup::NoData
        );
    }

    #[test]
    fn a_headless_service_without_ready_endpoints_does_not_exist() {
        let zone = zone();
        for n in [
            "idle.shop.svc.clusterset.local.",
            "_pg._tcp.idle.shop.svc.clusterset.local.",
        ] {
            assert_eq!(
                zone.lookup(&name(n), RecordType::A),
                Lookup::NxDomain,
                "{n}"
            );
        }
    }

    #[test]
    fn the_apex_has_soa_ns_and_the_schema_version() {
        let zone = zone();
        let apex = name("clusterset.local.");
        assert_eq!(
            rdatas(zone.lookup(&apex, RecordType::SOA)),
            ["ns.dns.clusterset.local. hostmaster.clusterset.local. 3 7200 1800 86400 5"]
        );
        assert_eq!(
            rdatas(zone.lookup(&apex, RecordType::NS)),
            ["ns.dns.clusterset.local."]
        );
        assert_eq!(zone.lookup(&apex, RecordType::A), Lookup::NoData);
        let version = name("dns-version.clusterset.local.");
        assert_eq!(rdatas(zone.lookup(&version, RecordType::TXT)), ["1.0.0"]);
        assert_eq!(zone.lookup(&version, RecordType::A), Lookup::NoData);
        // Only at the apex.
        assert_eq!(
            zone.lookup(&name("web.shop.svc.clusterset.local."), RecordType::NS),
            Lookup::NoData
        );
    }

    #[test]
    fn negative_answers_and_case() {
        let zone = zone();
        let web = name("WEB.Shop.svc.ClusterSet.Local.");
        assert_eq!(rdatas(zone.lookup(&web, RecordType::A)), ["10.96.5.1"]);
        assert_eq!(zone.lookup(&web, RecordType::TXT), Lookup::NoData);
        // Empty non-terminals exist.
        for ent in [
            "svc.clusterset.local.",
            "shop.svc.clusterset.local.",
            "_tcp.web.shop.svc.clusterset.local.",
        ] {
            assert_eq!(
                zone.lookup(&name(ent), RecordType::A),
                Lookup::NoData,
                "{ent}"
            );
        }
        assert_eq!(
            zone.lookup(&name("nope.shop.svc.clusterset.local."), RecordType::A),
            Lookup::NxDomain
        );
        assert_eq!(
            zone.lookup(&name("example.com."), RecordType::A),
            Lookup::NotInZone
        );
    }

    #[test]
    fn before_a_catalog_nothing_in_the_zone_is_known() {
        let zone = Zone::not_loaded(ZoneConfig::new("clusterset.local", 5).unwrap());
        assert!(!zone.is_loaded() && zone.names().next().is_none());
        for n in [
            "web.shop.svc.clusterset.local.",
            "clusterset.local.",
            "dns-version.clusterset.local.",
        ] {
            for qtype in [RecordType::A, RecordType::SOA, RecordType::TXT] {
                assert_eq!(zone.lookup(&name(n), qtype), Lookup::NotLoaded, "{n}");
            }
        }
        assert_eq!(
            zone.lookup(&name("example.com."), RecordType::A),
            Lookup::NotInZone
        );
        // An empty catalog is a catalog: loaded, names absent, the apex records there.
        let empty = Zone::empty(ZoneConfig::new("clusterset.local", 5).unwrap());
        assert!(empty.is_loaded());
        assert_eq!(
            empty.lookup(&name("web.shop.svc.clusterset.local."), RecordType::A),
            Lookup::NxDomain
        );
        assert_eq!(
            rdatas(empty.lookup(&name("dns-version.clusterset.local."), RecordType::TXT)),
            ["1.0.0"]
        );
    }

    #[test]
    fn reverse_zones_point_back_at_the_names() {
        let ranges = [
            "10.96.0.0/16".parse().unwrap(),
            "10.2.0.0/16".parse().unwrap(),
            "fd00::/16".parse().unwrap(),
        ];
        let config = ZoneConfig::new("clusterset.local", 5)
            .unwrap()
            .with_reverse(&ranges)
            .unwrap();
        let zone = Zone::build(config, &catalog());
        for (reverse, target) in [
            ("1.5.96.10.in-addr.arpa.", "web.shop.svc.clusterset.local."),
            (
                "5.1.2.10.in-addr.arpa.",
                "db-0.west.db.shop.svc.clusterset.local.",
            ),
            (
                "6.1.2.10.in-addr.arpa.",
                "10-2-1-6.west.db.shop.svc.clusterset.local.",
            ),
            (
                "1.0.0.0.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
                "web.shop.svc.clusterset.local.",
            ),
        ] {
            assert_eq!(
                rdatas(zone.lookup(&name(reverse), RecordType::PTR)),
                [target],
                "{reverse}"
            );
        }
        // A not-ready endpoint, an unknown address: no name; the ranges' apexes have SOA/NS.
        for unknown in ["7.1.2.10.in-addr.arpa.", "9.9.96.10.in-addr.arpa."] {
            assert_eq!(
                zone.lookup(&name(unknown), RecordType::PTR),
                Lookup::NxDomain
            );
        }
        let soa = zone.soa_for(&name("9.9.96.10.in-addr.arpa."));
        assert_eq!(soa.name.to_ascii(), "96.10.in-addr.arpa.");
        assert_eq!(
            rdatas(zone.lookup(&name("96.10.in-addr.arpa."), RecordType::NS)),
            ["ns.dns.clusterset.local."]
        );
        assert_eq!(
            zone.lookup(&name("5.96.10.in-addr.arpa."), RecordType::PTR),
            Lookup::NoData,
            "an empty non-terminal"
        );
        // Outside every reverse zone (10.1.1.5 is db-0.east's): not ours to answer.
        assert_eq!(
            zone.lookup(&name("5.1.1.10.in-addr.arpa."), RecordType::PTR),
            Lookup::NotInZone
        );
        // Without reverse zones none of it exists.
        assert_eq!(
            super::tests::zone().lookup(&name("1.5.96.10.in-addr.arpa."), RecordType::PTR),
            Lookup::NotInZone
        );
    }

    #[test]
    fn invalid_services_are_skipped_not_fatal() {
        let zone = zone();
        assert_eq!(zone.services(), 4);
        let [skipped] = zone.skipped() else {
            panic!("{:?}", zone.skipped());
        };
        assert_eq!(skipped.service, "Bad.Name.shop");
        assert!(
            matches!(&skipped.reason, SkipReason::Label(label) if label == "Bad.Name"),
            "{skipped:?}"
        );
        assert_eq!(
            zone.skipped()[0].to_string(),
            r#"Bad.Name.shop: invalid label "Bad.Name""#
        );
        let bad_host = Catalog::from_json(
            r#"{"services": [{"name": "h", "namespace": "ns", "headless": true, "clusters": [
                {"cluster": "east", "endpoints": [{"address": "10.0.0.1", "hostname": "a.b"}]}]}]}"#,
        )
        .unwrap();
        let zone = Zone::build(ZoneConfig::new("clusterset.local", 5).unwrap(), &bad_host);
        assert!(matches!(
            &zone.skipped()[0].reason,
            SkipReason::Hostname(h) if h == "a.b"
        ));
        assert_eq!(
            zone.lookup(&name("h.ns.svc.clusterset.local."), RecordType::A),
            Lookup::NxDomain
        );
    }
}
