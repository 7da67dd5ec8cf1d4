//! The authoritative data for the cluster-set zone, built from a [`Catalog`] (pure: no IO).
//!
//! Names published for a service `<svc>.<ns>` exported by clusters `c`:
//! - `<svc>.<ns>.svc.<zone>` A/AAAA: the local cluster's addresses first when it exports the
//!   service (only them with `local_only`), then every other exporting cluster's, ordered by name;
//!   a cluster's addresses are its service IPs, or its ready endpoints when headless;
//! - `<c>.<svc>.<ns>.svc.<zone>` A/AAAA: cluster `c`'s addresses (the SRV target of `c`);
//! - `<hostname>.<c>.<svc>.<ns>.svc.<zone>` A/AAAA: a headless endpoint with a hostname;
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV per named port, one target per cluster
//!   (per endpoint with a hostname for headless services), local targets at priority 0 and
//!   remote ones at priority 1 when the local cluster exports the service.
//!
//! Every ancestor of a published name down to the apex exists (empty non-terminals answer
//! NODATA, not NXDOMAIN); the apex holds the SOA.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use crate::Error;
use crate::model::{Catalog, ClusterExport, Endpoint, Protocol, valid_label};

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

/// What the zone is and how it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The apex, e.g. `clusterset.local.`.
    pub apex: Name,
    /// TTL of every record, and of negative answers (SOA minimum).
    pub ttl: u32,
    /// Answer a service name with the local cluster's addresses only, when it exports them.
    pub local_only: bool,
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
            local_only: false,
        })
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
}

impl Node {
    fn push_addr(&mut self, addr: IpAddr) {
        match addr {
            IpAddr::V4(v4) if !self.a.contains(&v4) => self.a.push(v4),
            IpAddr::V6(v6) if !self.aaaa.contains(&v6) => self.aaaa.push(v6),
            _ => {}
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
    serial: u32,
    nodes: HashMap<LowerName, Node>,
    /// Services of the catalog that were skipped, with the reason.
    skipped: Vec<Skipped>,
    services: usize,
    /// Built from a catalog (false only for [`Zone::not_loaded`]).
    loaded: bool,
}

impl Zone {
    /// An empty zone (apex and SOA only).
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
        let mut zone = Self {
            apex: apex.clone(),
            serial: catalog.revision as u32,
            nodes: HashMap::new(),
            skipped: Vec::new(),
            services: 0,
            config,
            loaded: true,
        };
        zone.nodes.insert(apex, Node::default());
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
        for export in &service.clusters {
            if !valid_label(&export.cluster) {
                return Err(SkipReason::Cluster(export.cluster.clone()));
            }
            for endpoint in ready(export) {
                if let Some(host) = &endpoint.hostname
                    && !valid_label(host)
                {
                    return Err(SkipReason::Hostname(host.clone()));
                }
            }
            for port in &export.ports {
                if let Some(name) = &port.name
                    && !valid_label(name)
                {
                    return Err(SkipReason::PortName(name.clone()));
                }
            }
        }
        let svc = self.name(&[&service.name, &service.namespace, "svc"])?;

        let mut clusters: Vec<&ClusterExport> = service.clusters.iter().collect();
        clusters.sort_by(|a, b| b.local.cmp(&a.local).then(a.cluster.cmp(&b.cluster)));
        let local_exports = clusters.iter().any(|c| c.local && !addresses(c).is_empty());

        // Collected first, inserted after: an error leaves the zone untouched.
        let mut owned: Vec<(Name, Node)> = Vec::new();
        let mut service_node = Node::default();
        let mut srv: BTreeMap<Name, Node> = BTreeMap::new();
        for export in &clusters {
            let cluster_name =
                self.name(&[&export.cluster, &service.name, &service.namespace, "svc"])?;
            let mut cluster_node = Node::default();
            for addr in addresses(export) {
                cluster_node.push_addr(addr);
                if !(self.config.local_only && local_exports && !export.local) {
                    service_node.push_addr(addr);
                }
            }
            let priority = u16::from(local_exports && !export.local);
            let mut targets: Vec<Name> = Vec::new();
            let mut cluster_target = false;
            if export.headless {
                for endpoint in ready(export) {
                    match &endpoint.hostname {
                        Some(host) => {
                            let host_name = self.name(&[
                                host,
                                &export.cluster,
                                &service.name,
                                &service.namespace,
                                "svc",
                            ])?;
                            let mut node = Node::default();
                            for addr in &endpoint.addresses {
                                node.push_addr(*addr);
                            }
                            if !targets.contains(&host_name) {
                                targets.push(host_name.clone());
                            }
                            owned.push((host_name, node));
                        }
                        None => cluster_target = true,
                    }
                }
            } else if !cluster_node.a.is_empty() || !cluster_node.aaaa.is_empty() {
                cluster_target = true;
            }
            if cluster_target {
                targets.push(cluster_name.clone());
            }
            for port in &export.ports {
                let Some(port_name) = &port.name else {
                    continue;
                };
                let srv_name = self.name(&[
                    &format!("_{port_name}"),
                    &format!("_{}", srv_protocol(port.protocol)),
                    &service.name,
                    &service.namespace,
                    "svc",
                ])?;
                let node = srv.entry(srv_name).or_default();
                for target in &targets {
                    node.srv
                        .push(SRV::new(priority, 0, port.port, target.clone()));
                }
            }
            owned.push((cluster_name, cluster_node));
        }
        owned.push((svc, service_node));
        owned.extend(srv);
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

    /// Adds `node` under `name` (merging with what is there) and every ancestor up to the apex.
    fn insert(&mut self, name: Name, node: Node) {
        let key = LowerName::new(&name);
        let entry = self.nodes.entry(key.clone()).or_default();
        for addr in node.a {
            entry.push_addr(IpAddr::V4(addr));
        }
        for addr in node.aaaa {
            entry.push_addr(IpAddr::V6(addr));
        }
        for srv in node.srv {
            if !entry.srv.contains(&srv) {
                entry.srv.push(srv);
            }
        }
        let mut parent = key.base_name();
        while parent.num_labels() > self.apex.num_labels() {
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

    /// Whether `name` is at or below the apex.
    pub fn contains(&self, name: &LowerName) -> bool {
        self.apex.zone_of(name)
    }

    /// The SOA record of the apex (for authority sections).
    pub fn soa(&self) -> Record {
        let apex = self.config.apex.clone();
        let mname = Name::from_ascii("ns.dns")
            .and_then(|n| n.append_domain(&apex))
            .unwrap_or_else(|_| apex.clone());
        let rname = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&apex))
            .unwrap_or_else(|_| apex.clone());
        Record::from_rdata(
            apex,
            self.config.ttl,
            RData::SOA(SOA::new(
                mname,
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
        if !self.apex.zone_of(&key) {
            return Lookup::NotInZone;
        }
        if !self.loaded {
            return Lookup::NotLoaded;
        }
        let Some(node) = self.nodes.get(&key) else {
            return Lookup::NxDomain;
        };
        let ttl = self.config.ttl;
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let any = qtype == RecordType::ANY;
        if qtype == RecordType::A || any {
            answers.extend(
                node.a
                    .iter()
                    .map(|a| Record::from_rdata(qname.clone(), ttl, RData::A(A(*a)))),
            );
        }
        if qtype == RecordType::AAAA || any {
            answers.extend(
                node.aaaa
                    .iter()
                    .map(|a| Record::from_rdata(qname.clone(), ttl, RData::AAAA(AAAA(*a)))),
            );
        }
        if qtype == RecordType::SRV || any {
            for srv in &node.srv {
                answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::SRV(srv.clone()),
                ));
                if let Some(target) = self.nodes.get(&LowerName::new(&srv.target)) {
                    let owner = srv.target.clone();
                    for a in &target.a {
                        let record = Record::from_rdata(owner.clone(), ttl, RData::A(A(*a)));
                        if !additionals.contains(&record) {
                            additionals.push(record);
                        }
                    }
                    for a in &target.aaaa {
                        let record = Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(*a)));
                        if !additionals.contains(&record) {
                            additionals.push(record);
                        }
                    }
                }
            }
        }
        if (qtype == RecordType::SOA || any) && key == self.apex {
            let mut soa = self.soa();
            soa.name = qname.clone();
            answers.push(soa);
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

/// The addresses a cluster contributes: service IPs, or ready endpoints when headless.
fn addresses(export: &ClusterExport) -> Vec<IpAddr> {
    if export.headless {
        ready(export)
            .flat_map(|e| e.addresses.iter().copied())
            .collect()
    } else {
        export.ips.clone()
    }
}

/// The endpoints of `export` that are ready (a catalog normally holds only those).
fn ready(export: &ClusterExport) -> impl Iterator<Item = &Endpoint> {
    export.endpoints.iter().filter(|e| e.ready)
}

/// The SRV label of a protocol, without the underscore.
fn srv_protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
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
              {"name": "web", "namespace": "shop", "clusters": [
                {"cluster": "west", "ips": ["10.2.0.10"], "ports": [{"name": "http", "port": 80}]},
                {"cluster": "east", "local": true, "ips": ["10.1.0.10", "fd00::10"],
                 "ports": [{"name": "http", "port": 80}, {"port": 81}]}]},
              {"name": "db", "namespace": "shop", "clusters": [
                {"cluster": "west", "headless": true, "ports": [{"name": "pg", "port": 5432}],
                 "endpoints": [{"address": "10.2.1.5", "hostname": "db-0"}, {"address": "10.2.1.6"}]}]},
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

    #[test]
    fn local_cluster_first_then_the_others() {
        let zone = zone();
        let q = name("web.shop.svc.clusterset.local.");
        assert_eq!(
            rdatas(zone.lookup(&q, RecordType::A)),
            ["10.1.0.10", "10.2.0.10"]
        );
        assert_eq!(rdatas(zone.lookup(&q, RecordType::AAAA)), ["fd00::10"]);

        let mut config = ZoneConfig::new("clusterset.local", 5).unwrap();
        config.local_only = true;
        let zone = Zone::build(config, &catalog());
        assert_eq!(rdatas(zone.lookup(&q, RecordType::A)), ["10.1.0.10"]);
    }

    #[test]
    fn srv_targets_name_the_cluster_local_first() {
        let zone = zone();
        let q = name("_http._tcp.web.shop.svc.clusterset.local.");
        assert_eq!(
            rdatas(zone.lookup(&q, RecordType::SRV)),
            [
                "0 100 80 east.web.shop.svc.clusterset.local.",
                "1 100 80 west.web.shop.svc.clusterset.local."
            ]
        );
        let Lookup::Found { additionals, .. } = zone.lookup(&q, RecordType::SRV) else {
            panic!()
        };
        assert_eq!(additionals.len(), 3);
        assert_eq!(
            rdatas(zone.lookup(&name("west.web.shop.svc.clusterset.local."), RecordType::A)),
            ["10.2.0.10"]
        );
    }

    #[test]
    fn headless_endpoints_and_hostnames() {
        let zone = zone();
        assert_eq!(
            rdatas(zone.lookup(&name("db.shop.svc.clusterset.local."), RecordType::A)),
            ["10.2.1.5", "10.2.1.6"]
        );
        assert_eq!(
            rdatas(zone.lookup(
                &name("db-0.west.db.shop.svc.clusterset.local."),
                RecordType::A
            )),
            ["10.2.1.5"]
        );
        assert_eq!(
            rdatas(zone.lookup(
                &name("_pg._tcp.db.shop.svc.clusterset.local."),
                RecordType::SRV
            )),
            [
                "0 50 5432 db-0.west.db.shop.svc.clusterset.local.",
                "0 50 5432 west.db.shop.svc.clusterset.local."
            ]
        );
    }

    #[test]
    fn negative_answers_and_case() {
        let zone = zone();
        let web = name("WEB.Shop.svc.ClusterSet.Local.");
        assert_eq!(rdatas(zone.lookup(&web, RecordType::A)).len(), 2);
        assert_eq!(zone.lookup(&web, RecordType::TXT), Lookup::NoData);
        assert_eq!(
            zone.lookup(&name("db.shop.svc.clusterset.local."), RecordType::AAAA),
            Lookup::NoData
        );
        // Empty non-terminals exist.
        assert_eq!(
            zone.lookup(&name("shop.svc.clusterset.local."), RecordType::A),
            Lookup::NoData
        );
        assert_eq!(
            zone.lookup(&name("_tcp.web.shop.svc.clusterset.local."), RecordType::A),
            Lookup::NoData
        );
        assert_eq!(
            zone.lookup(&name("nope.shop.svc.clusterset.local."), RecordType::A),
            Lookup::NxDomain
        );
        assert_eq!(
            zone.lookup(
                &name("_81._tcp.web.shop.svc.clusterset.local."),
                RecordType::SRV
            ),
            Lookup::NxDomain
        );
        assert_eq!(
            zone.lookup(&name("example.com."), RecordType::A),
            Lookup::NotInZone
        );
        assert_eq!(
            rdatas(zone.lookup(&name("clusterset.local."), RecordType::SOA)).len(),
            1
        );
    }

    #[test]
    fn before_a_catalog_nothing_in_the_zone_is_known() {
        let zone = Zone::not_loaded(ZoneConfig::new("clusterset.local", 5).unwrap());
        assert!(!zone.is_loaded() && zone.names().next().is_none());
        for n in ["web.shop.svc.clusterset.local.", "clusterset.local."] {
            for qtype in [RecordType::A, RecordType::SOA] {
                assert_eq!(zone.lookup(&name(n), qtype), Lookup::NotLoaded, "{n}");
            }
        }
        assert_eq!(
            zone.lookup(&name("example.com."), RecordType::A),
            Lookup::NotInZone
        );
        // An empty catalog is a catalog: loaded, names absent.
        let empty = Zone::empty(ZoneConfig::new("clusterset.local", 5).unwrap());
        assert!(empty.is_loaded());
        assert_eq!(
            empty.lookup(&name("web.shop.svc.clusterset.local."), RecordType::A),
            Lookup::NxDomain
        );
    }

    #[test]
    fn invalid_services_are_skipped_not_fatal() {
        let zone = zone();
        assert_eq!(zone.services(), 2);
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
    }
}
