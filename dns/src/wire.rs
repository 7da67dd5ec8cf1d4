//! Reading and patching DNS messages in wire format without decoding them (pure, no
//! allocation): the question's end, the OPT record, truncation. Used where a whole parse would
//! cost too much (every packet) or change bytes we relay (upstream answers).

/// Largest UDP answer without EDNS (RFC 1035).
pub const PLAIN_UDP_LIMIT: usize = 512;

/// End of the question section (uncompressed names), if well-formed.
pub fn question_end(packet: &[u8]) -> Option<usize> {
    let count = u16::from_be_bytes([*packet.get(4)?, *packet.get(5)?]);
    let mut pos = 12;
    for _ in 0..count {
        pos = skip_name(packet, pos)? + 4;
    }
    (pos <= packet.len()).then_some(pos)
}

/// The position after the name at `pos` (labels, possibly ending in a compression pointer).
fn skip_name(packet: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *packet.get(pos)?;
        match len {
            0 => return Some(pos + 1),
            1..=63 => pos += 1 + usize::from(len),
            0xc0..=0xff => return (pos + 2 <= packet.len()).then_some(pos + 2),
            _ => return None,
        }
    }
}

/// The byte range of the OPT record (in the additional section), if the message has one and
/// every record before it is well-formed.
pub fn find_opt(packet: &[u8]) -> Option<std::ops::Range<usize>> {
    let count = |at: usize| usize::from(u16::from_be_bytes([packet[at], packet[at + 1]]));
    let mut pos = question_end(packet)?;
    let (answers, authorities, additionals) = (count(6), count(8), count(10));
    for index in 0..answers + authorities + additionals {
        let start = pos;
        pos = skip_name(packet, pos)?;
        let fixed = packet.get(pos..pos + 10)?;
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let end = pos + 10 + rdlen;
        if end > packet.len() {
            return None;
        }
        if index >= answers + authorities && fixed[0..2] == [0, 41] {
            return Some(start..end);
        }
        pos = end;
    }
    None
}

/// The UDP payload size the message's OPT record advertises, if it has one.
pub fn edns_payload(packet: &[u8]) -> Option<u16> {
    let opt = find_opt(packet)?;
    let class = opt.start + 3; // after the root name (1 byte) and the type (2)
    Some(u16::from_be_bytes([packet[class], packet[class + 1]]))
}

/// Sets the UDP payload size of the message's OPT record; false when it has none. (The OPT
/// record's name is the root, one byte, so the class is at a fixed offset.)
pub fn set_edns_payload(packet: &mut [u8], size: u16) -> bool {
    let Some(opt) = find_opt(packet) else {
        return false;
    };
    if packet[opt.start] != 0 {
        return false;
    }
    packet[opt.start + 3..opt.start + 5].copy_from_slice(&size.to_be_bytes());
    true
}

/// The UDP size limit for answering `query` when this server accepts at most `cap`: 512
/// without EDNS, else the client's advertised size capped by ours (never below 512).
pub fn udp_limit(query: &[u8], cap: u16) -> usize {
    match edns_payload(query) {
        None => PLAIN_UDP_LIMIT,
        Some(size) => usize::from(size.min(cap)).max(PLAIN_UDP_LIMIT),
    }
}

/// Cuts `answer` down to its header, question and OPT record with TC set, so that the client
/// retries over TCP. `None` when the answer is not well-formed enough to cut.
pub fn truncate(answer: &[u8]) -> Option<Vec<u8>> {
    let end = question_end(answer)?;
    let opt = find_opt(answer).filter(|opt| answer[opt.start] == 0);
    let mut out = answer[..end].to_vec();
    out[2] |= 0x02;
    out[6..12].fill(0);
    if let Some(opt) = opt {
        out.extend_from_slice(&answer[opt]);
        out[11] = 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Message;

    fn message(answers: usize, edns: Option<u16>) -> Vec<u8> {
        testing::message(answers, edns, true)
    }

    #[test]
    fn finds_and_patches_the_opt_record() {
        // Compressed answer names before the OPT record are skipped.
        let mut bytes = message(3, Some(4096));
        assert_eq!(edns_payload(&bytes), Some(4096));
        assert_eq!(udp_limit(&bytes, 1232), 1232);
        assert!(set_edns_payload(&mut bytes, 1232));
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!((m.edns.unwrap().max_payload(), m.answers.len()), (1232, 3));
        let mut plain = message(3, None);
        assert_eq!(edns_payload(&plain), None);
        assert!(!set_edns_payload(&mut plain, 1232));
        assert_eq!(udp_limit(&plain, 1232), 512);
        assert_eq!(udp_limit(&message(0, Some(100)), 1232), 512);
        // Garbage never panics.
        for len in 0..bytes.len() {
            let _ = (find_opt(&bytes[..len]), question_end(&bytes[..len]));
            let _ = truncate(&bytes[..len]);
        }
    }

    #[test]
    fn truncation_keeps_header_question_and_opt() {
        let bytes = message(100, Some(1232));
        let cut = truncate(&bytes).unwrap();
        let m = Message::from_vec(&cut).unwrap();
        assert!(m.truncation && m.answers.is_empty());
        assert_eq!((m.id, m.queries.len()), (9, 1));
        assert_eq!(m.edns.unwrap().max_payload(), 1232);
        let cut = truncate(&message(100, None)).unwrap();
        let m = Message::from_vec(&cut).unwrap();
        assert!(m.truncation && m.edns.is_none() && m.additionals.is_empty());
    }
}

/// DNS messages for tests.
#[cfg(test)]
pub(crate) mod testing {
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    /// A question for `www.example.test.` A with `answers` A records (a response, or a
    /// query), and an OPT record offering `edns` when given.
    pub(crate) fn message(answers: usize, edns: Option<u16>, response: bool) -> Vec<u8> {
        let name = Name::from_ascii("www.example.test.").unwrap();
        let kind = if response {
            MessageType::Response
        } else {
            MessageType::Query
        };
        let mut m = Message::new(9, kind, OpCode::Query);
        m.add_query(Query::query(name.clone(), RecordType::A));
        for i in 0..answers {
            m.add_answer(Record::from_rdata(
                name.clone(),
                60,
                RData::A(A::new(192, 0, 2, i as u8)),
            ));
        }
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }
}
