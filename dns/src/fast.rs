//! The fast path: answers for every in-zone name and the common types, precomputed in wire
//! format by the slow path ([`crate::answer::respond`]) when a catalog is published. A query
//! that looks exactly like a plain stub query (one question, class IN, no compression, at most
//! one OPT record of version 0, no CD) is answered by copying the precomputed bytes and
//! patching the ID, the RD bit and the question's spelling; anything else returns `None` and
//! goes to the slow path. No allocation per query.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::BinEncodable;

use crate::answer::{Outcome, PLAIN_UDP_LIMIT, Transport, respond};
use crate::zone::Zone;

/// Query types precomputed for every owner name (PTR only for names in a reverse zone).
pub const FAST_TYPES: [RecordType; 4] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::PTR,
];

/// Longest wire-format name plus the two qtype bytes.
const MAX_KEY: usize = 255 + 2;

/// FNV-1a: keys are short and come from our own zone, lookups only read.
#[derive(Default)]
pub struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = hash;
    }
}

/// One precomputed answer.
#[derive(Debug)]
pub struct Entry {
    /// The response to a query without EDNS (ID 0, RD clear, lower-case question).
    plain: Box<[u8]>,
    /// The response to a query with an OPT record.
    edns: Box<[u8]>,
    /// Index into [`FAST_TYPES`], for metrics.
    pub type_index: usize,
    /// Response code (NOERROR or NXDOMAIN never: NODATA is NOERROR).
    pub rcode: ResponseCode,
    /// Records in the answer section.
    pub answers: usize,
}

/// Precomputed answers keyed by lower-case wire qname + qtype.
#[derive(Debug, Default)]
pub struct FastTable {
    entries: HashMap<Box<[u8]>, Entry, BuildHasherDefault<Fnv>>,
}

/// A fast-path answer written to the output buffer.
#[derive(Debug, Clone, Copy)]
pub struct Hit<'a> {
    /// Bytes written.
    pub len: usize,
    /// What was answered.
    pub entry: &'a Entry,
}

impl FastTable {
    /// Precomputes every owner name of `zone` for [`FAST_TYPES`].
    pub fn build(zone: &Zone, edns_udp_size: u16) -> Self {
        let mut entries = HashMap::default();
        for (lower, _) in zone.names() {
            let name: &Name = lower;
            let reverse = zone.is_reverse(lower);
            for (type_index, qtype) in FAST_TYPES.iter().enumerate() {
                if *qtype == RecordType::PTR && !reverse {
                    continue;
                }
                let plain = precompute(zone, name, *qtype, false, edns_udp_size);
                let edns = precompute(zone, name, *qtype, true, edns_udp_size);
                let (Some((plain, rcode, answers)), Some((edns, _, _))) = (plain, edns) else {
                    continue;
                };
                let mut key = Vec::with_capacity(name.len() + 3);
                // Our names are lower case and uncompressed: the wire form is the key.
                let Ok(wire) = Query::query(name.clone(), *qtype).to_bytes() else {
                    continue;
                };
                key.extend_from_slice(&wire[..wire.len() - 2]);
                entries.insert(
                    key.into_boxed_slice(),
                    Entry {
                        plain,
                        edns,
                        type_index,
                        rcode,
                        answers,
                    },
                );
            }
        }
        Self { entries }
    }

    /// Number of precomputed answers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is precomputed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Answers `query` into `out` if it is a plain query for a precomputed name and type and
    /// the answer fits the client's UDP limit; `None` sends it to the slow path.
    pub fn answer<'a>(
        &'a self,
        query: &[u8],
        edns_udp_size: u16,
        out: &mut [u8],
    ) -> Option<Hit<'a>> {
        // Header: a QUERY, no TC/AA, no CD/Z/RA/RCODE (AD is allowed: dig sets it), one
        // question, no answer or authority, at most one additional.
        if query.len() < 12 + 5
            || query[2] & 0xfe != 0
            || query[3] & !0x20 != 0
            || query[4..10] != [0, 1, 0, 0, 0, 0]
            || query[10] != 0
            || query[11] > 1
        {
            return None;
        }
        let mut key = [0u8; MAX_KEY];
        let mut pos = 12;
        let mut key_len = 0;
        loop {
            let len = usize::from(*query.get(pos)?);
            if len == 0 {
                key[key_len] = 0;
                key_len += 1;
                pos += 1;
                break;
            }
            if len > 63 || key_len + 1 + len + 1 > 255 {
                return None; // compression pointer, or too long
            }
            let label = query.get(pos + 1..pos + 1 + len)?;
            key[key_len] = len as u8;
            for (k, b) in key[key_len + 1..key_len + 1 + len].iter_mut().zip(label) {
                *k = b.to_ascii_lowercase();
            }
            key_len += 1 + len;
            pos += 1 + len;
        }
        let name_end = pos;
        let fixed = query.get(pos..pos + 4)?;
        if fixed[2..4] != [0, 1] {
            return None; // class IN only
        }
        key[key_len] = fixed[0];
        key[key_len + 1] = fixed[1];
        key_len += 2;
        pos += 4;
        let limit = if query[11] == 1 {
            // OPT: root name, type 41, class = payload size, TTL = ext-rcode, version, flags.
            let opt = query.get(pos..pos + 11)?;
            if opt[0..3] != [0, 0, 41] || opt[5] != 0 || opt[6] != 0 {
                return None;
            }
            let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
            if pos + 11 + rdlen != query.len() || !plain_options(&query[pos + 11..]) {
                return None;
            }
            let payload = u16::from_be_bytes([opt[3], opt[4]]);
            usize::from(payload.min(edns_udp_size)).max(PLAIN_UDP_LIMIT)
        } else {
            if pos != query.len() {
                return None;
            }
            PLAIN_UDP_LIMIT
        };
        let entry = self.entries.get(&key[..key_len])?;
        let answer: &[u8] = if query[11] == 1 {
            &entry.edns
        } else {
            &entry.plain
        };
        if answer.len() > limit || answer.len() > out.len() {
            return None;
        }
        let out = &mut out[..answer.len()];
        out.copy_from_slice(answer);
        out[0] = query[0];
        out[1] = query[1];
        out[2] |= query[2] & 0x01;
        out[12..name_end].copy_from_slice(&query[12..name_end]);
        Some(Hit {
            len: answer.len(),
            entry,
        })
    }
}

/// Whether EDNS option data is well-formed TLVs that the slow path would also accept and
/// ignore: NSID and client subnet (which hickory decodes, and may reject) go slow.
fn plain_options(mut data: &[u8]) -> bool {
    while !data.is_empty() {
        let Some(header) = data.get(..4) else {
            return false;
        };
        let code = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if code == 3 || code == 8 || data.len() < 4 + len {
            return false;
        }
        data = &data[4 + len..];
    }
    true
}

fn precompute(
    zone: &Zone,
    name: &Name,
    qtype: RecordType,
    edns: bool,
    edns_udp_size: u16,
) -> Option<(Box<[u8]>, ResponseCode, usize)> {
    let mut query = Message::new(0, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(name.clone(), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(u16::MAX);
        query.set_edns(e);
    }
    let bytes = query.to_vec().ok()?;
    match respond(zone, &bytes, Transport::Tcp, edns_udp_size) {
        Outcome::Reply(reply) if !reply.truncated => {
            Some((reply.bytes.into_boxed_slice(), reply.rcode, reply.answers))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::test_query as query;
    use crate::model::Catalog;
    use crate::zone::ZoneConfig;

    const EDNS_SIZE: u16 = 1232;

    fn zone() -> Zone {
        let eps: Vec<String> = (0..80)
            .map(|i| format!(r#"{{"address": "10.9.0.{}", "hostname": "h{i}"}}"#, i + 1))
            .collect();
        let json = format!(
            r#"{{"services": [
              {{"name": "web", "namespace": "shop", "ips": ["10.96.0.10", "fd00::1"],
                "ports": [{{"name": "http", "port": 80}}, {{"name": "dns", "protocol": "UDP", "port": 53}}]}},
              {{"name": "big", "namespace": "shop", "headless": true,
                "ports": [{{"name": "x", "protocol": "UDP", "port": 9}}],
                "clusters": [{{"cluster": "east", "endpoints": [{}]}}]}}]}}"#,
            eps.join(",")
        );
        let config = ZoneConfig::new("clusterset.local", 5)
            .unwrap()
            .with_reverse(&[
                "10.96.0.0/16".parse().unwrap(),
                "10.9.0.0/24".parse().unwrap(),
            ])
            .unwrap();
        Zone::build(config, &Catalog::from_json(&json).unwrap())
    }

    fn slow(zone: &Zone, q: &[u8]) -> Vec<u8> {
        match respond(zone, q, Transport::Udp, EDNS_SIZE) {
            Outcome::Reply(r) => r.bytes,
            other => panic!("{other:?}"),
        }
    }

    /// Lower-cases every name so answers that differ only in spelling compare equal.
    fn canonical(bytes: &[u8]) -> Message {
        let mut m = Message::from_vec(bytes).unwrap();
        for q in &mut m.queries {
            let lower = q.name().to_lowercase();
            q.set_name(lower);
        }
        for r in m
            .answers
            .iter_mut()
            .chain(&mut m.authorities)
            .chain(&mut m.additionals)
        {
            let lower = r.name.to_lowercase();
            r.name = lower;
        }
        m
    }

    #[test]
    fn fast_path_equals_slow_path() {
        let zone = zone();
        let table = FastTable::build(&zone, EDNS_SIZE);
        assert!(table.len() > 10);
        let mut out = [0u8; 4096];
        let mut fast_hits = 0;
        let mut names: Vec<String> = zone.names().map(|(n, _)| n.to_string()).collect();
        names.sort();
        for (i, name) in names.iter().enumerate() {
            let reverse = name.ends_with(".arpa.");
            for qtype in [
                RecordType::A,
                RecordType::AAAA,
                RecordType::SRV,
                RecordType::PTR,
                RecordType::TXT,
            ] {
                for edns in [None, Some(512), Some(4096)] {
                    for rd in [false, true] {
                        let q = query(name, qtype, rd, edns, i as u16 * 7 + 1);
                        let slow_bytes = slow(&zone, &q);
                        if let Some(hit) = table.answer(&q, EDNS_SIZE, &mut out) {
                            fast_hits += 1;
                            assert_eq!(
                                &out[..hit.len],
                                &slow_bytes[..],
                                "{name} {qtype} {edns:?} {rd}"
                            );
                        } else {
                            // Only TXT, PTR outside the reverse zones and answers that UDP
                            // cuts down miss.
                            let full = match respond(&zone, &q, Transport::Tcp, EDNS_SIZE) {
                                Outcome::Reply(r) => r.bytes,
                                other => panic!("{other:?}"),
                            };
                            assert!(
                                qtype == RecordType::TXT
                                    || (qtype == RecordType::PTR && !reverse)
                                    || full != slow_bytes,
                                "{name} {qtype} {edns:?} missed"
                            );
                        }
                        // Mixed case: same answer, question spelled as asked.
                        let mixed: String = name
                            .chars()
                            .enumerate()
                            .map(|(j, c)| {
                                if j % 2 == 0 {
                                    c.to_ascii_uppercase()
                                } else {
                                    c
                                }
                            })
                            .collect();
                        let q = query(&mixed, qtype, rd, edns, 99);
                        if let Some(hit) = table.answer(&q, EDNS_SIZE, &mut out) {
                            let fast = Message::from_vec(&out[..hit.len]).unwrap();
                            assert_eq!(fast.queries[0].name().to_ascii(), mixed);
                            assert_eq!(canonical(&out[..hit.len]), canonical(&slow(&zone, &q)));
                        }
                    }
                }
            }
        }
        assert!(fast_hits > 100, "{fast_hits}");
        // A reverse name is answered on the fast path too.
        let q = query("10.0.96.10.in-addr.arpa.", RecordType::PTR, true, None, 5);
        let hit = table
            .answer(&q, EDNS_SIZE, &mut out)
            .expect("PTR on the fast path");
        let m = Message::from_vec(&out[..hit.len]).unwrap();
        assert_eq!(
            m.answers[0].data.to_string(),
            "web.shop.svc.clusterset.local."
        );
    }

    /// Random mutations of valid queries: whenever the fast path answers, the slow path gives
    /// the same answer (names compared case-insensitively), and nothing panics.
    #[test]
    fn mutated_queries_fast_equals_slow() {
        let zone = zone();
        let table = FastTable::build(&zone, EDNS_SIZE);
        let mut out = [0u8; 4096];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let bases = [
            query(
                "web.shop.svc.clusterset.local.",
                RecordType::A,
                true,
                None,
                1,
            ),
            query(
                "web.shop.svc.clusterset.local.",
                RecordType::AAAA,
                false,
                Some(1232),
                2,
            ),
            query(
                "_http._tcp.web.shop.svc.clusterset.local.",
                RecordType::SRV,
                true,
                Some(600),
                3,
            ),
        ];
        let mut answered = 0;
        for i in 0..20_000 {
            let mut q = bases[i % bases.len()].clone();
            for _ in 0..1 + next() % 3 {
                if q.is_empty() {
                    q.push(0);
                }
                match next() % 4 {
                    0 => {
                        let at = (next() as usize) % q.len();
                        q[at] ^= 1 << (next() % 8);
                    }
                    1 => {
                        let at = (next() as usize) % q.len();
                        q[at] = next() as u8;
                    }
                    2 => q.truncate((next() as usize) % (q.len() + 1)),
                    _ => q.push(next() as u8),
                }
            }
            let Some(hit) = table.answer(&q, EDNS_SIZE, &mut out) else {
                let _ = respond(&zone, &q, Transport::Udp, EDNS_SIZE);
                continue;
            };
            answered += 1;
            let slow = slow(&zone, &q);
            assert_eq!(canonical(&out[..hit.len]), canonical(&slow), "query {q:?}");
        }
        assert!(answered > 100, "{answered}");
    }

    #[test]
    fn unusual_queries_go_to_the_slow_path() {
        let zone = zone();
        let table = FastTable::build(&zone, EDNS_SIZE);
        let mut out = [0u8; 4096];
        let q = query(
            "web.shop.svc.clusterset.local.",
            RecordType::A,
            true,
            None,
            1,
        );
        assert!(table.answer(&q, EDNS_SIZE, &mut out).is_some());
        let variants: Vec<Vec<u8>> = vec![
            {
                let mut v = q.clone();
                v[2] |= 0x80;
                v
            }, // a response
            {
                let mut v = q.clone();
                v[2] |= 0x10;
                v
            }, // another opcode
            {
                let mut v = q.clone();
                v[3] |= 0x10;
                v
            }, // CD
            {
                let mut v = q.clone();
                v.push(0);
                v
            }, // trailing byte
            q[..q.len() - 1].to_vec(), // truncated
            {
                let mut v = q.clone();
                let n = v.len();
                v[n - 1] = 3;
                v
            }, // class CH
            query(
                "web.shop.svc.clusterset.local.",
                RecordType::MX,
                true,
                None,
                1,
            ),
            query("nope.clusterset.local.", RecordType::A, true, None, 1),
            query("example.org.", RecordType::A, true, None, 1),
        ];
        for v in variants {
            assert!(table.answer(&v, EDNS_SIZE, &mut out).is_none());
        }
        // EDNS version 1 goes slow (BADVERS).
        let mut m = Message::from_vec(&query(
            "web.shop.svc.clusterset.local.",
            RecordType::A,
            true,
            Some(1232),
            1,
        ))
        .unwrap();
        m.edns.as_mut().unwrap().set_version(1);
        assert!(
            table
                .answer(&m.to_vec().unwrap(), EDNS_SIZE, &mut out)
                .is_none()
        );
        // Every prefix of a valid query is handled without panicking.
        let q = query(
            "web.shop.svc.clusterset.local.",
            RecordType::A,
            true,
            Some(1232),
            1,
        );
        for len in 0..q.len() {
            assert!(table.answer(&q[..len], EDNS_SIZE, &mut out).is_none());
        }
    }
}
