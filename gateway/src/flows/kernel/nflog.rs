//! The policy table's logged drops (NFLOG) as [`PacketDrop`]s, and the configuration that
//! binds the group. Pure.

use std::time::{Duration, SystemTime};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::nflog::{
    ConfigCmd, ConfigFlags, ConfigMode, ConfigNla, PacketNla, Timeout, ULogMessage,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use trellis_core::flow::kernel::{DropPoint, PacketDrop};

use super::Decoded;
use super::packet;

/// The bytes of each packet copied: the IP header with options (60) and a TCP header's
/// first 20 bytes, or an IPv6 header (40) with a few extension headers before the ports.
pub const COPY_RANGE: u32 = 128;
/// How long the kernel holds logged packets to batch them: a drop reaches the flows within it.
const FLUSH_TIMEOUT: Duration = Duration::from_millis(50);
/// The kernel's batch: up to this many bytes (it caps at 128 KiB) or packets per message.
pub const BATCH_BYTES: u32 = 64 * 1024;
const BATCH_PACKETS: u32 = 256;

/// The request that binds `group` to the socket it is sent on, copying [`COPY_RANGE`] bytes
/// of each packet, numbering them (gaps are losses), batching as above.
pub fn bind_request(group: u16, sequence: u32) -> NetlinkMessage<NetfilterMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(
                NetfilterProtoFamily::Unspec,
                libc::NFNETLINK_V0 as u8,
                group,
            ),
            ULogMessage::Config(vec![
                ConfigCmd::Bind.into(),
                ConfigMode::new_packet(COPY_RANGE).into(),
                ConfigFlags::SEQ.into(),
                Timeout::from(FLUSH_TIMEOUT).into(),
                ConfigNla::NlBufSiz(BATCH_BYTES),
                ConfigNla::QThresh(BATCH_PACKETS),
            ]),
        )),
    );
    message.finalize();
    message
}

/// One logged packet: its sequence number (when the kernel numbered it) and what it says.
#[derive(Debug)]
pub struct Logged {
    pub sequence: Option<u32>,
    pub drop: Decoded<PacketDrop>,
}

/// The logged packet one NFLOG message carries; `None` for other messages.
pub fn logged_of(message: &NetfilterMessage, time: SystemTime) -> Option<Logged> {
    let NetfilterMessageInner::ULog(ULogMessage::Packet(attributes)) = &message.inner else {
        return None;
    };
    let mut sequence = None;
    let mut prefix = None;
    let mut payload = None;
    for attribute in attributes {
        match attribute {
            PacketNla::Seq(n) => sequence = Some(*n),
            PacketNla::Prefix(p) => prefix = Some(p),
            PacketNla::Payload(p) => payload = Some(p),
            _ => {}
        }
    }
    let drop = match prefix
        .and_then(|p| p.to_str().ok())
        .and_then(DropPoint::from_nflog_prefix)
    {
        // Another rule logging to the group: not a drop of ours.
        None => Decoded::Skip,
        Some(point) => match payload.map(|p| packet::parse(p)) {
            None => Decoded::Bad("a logged packet without its bytes"),
            Some(Err(_)) => Decoded::Bad("a logged packet that is no IP packet"),
            Some(Ok(headers)) => Decoded::Event(PacketDrop {
                time,
                point,
                packet: headers.tuple,
                tcp_flags: headers.tcp_flags,
                icmp: headers.icmp,
            }),
        },
    };
    Some(Logged { sequence, drop })
}

/// Counts the packets missing between the sequence numbers seen: the kernel numbers every
/// packet it logs to the group, so a gap is packets it logged but could not deliver.
#[derive(Debug, Default)]
pub struct SequenceGaps {
    next: Option<u32>,
}

/// A jump backwards, or forwards by more than this, is not losses but a renumbering (the
/// group bound again): it restarts the count.
const PLAUSIBLE_GAP: u32 = 1 << 30;

impl SequenceGaps {
    /// Packets lost before `sequence`.
    pub fn observe(&mut self, sequence: u32) -> u64 {
        let lost = match self.next {
            Some(expected) => {
                let gap = sequence.wrapping_sub(expected);
                if gap < PLAUSIBLE_GAP {
                    u64::from(gap)
                } else {
                    0
                }
            }
            None => 0,
        };
        self.next = Some(sequence.wrapping_add(1));
        lost
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;

    use trellis_core::flow::L4Protocol;
    use trellis_core::policy::ruleset::Direction;

    use super::*;
    use crate::flows::kernel::packet::tests::{ipv4_packet, tcp};

    fn message(attributes: Vec<PacketNla>) -> NetfilterMessage {
        let mut outer = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(
                    NetfilterProtoFamily::IPv4,
                    0,
                    trellis_core::flow::kernel::NFLOG_GROUP,
                ),
                ULogMessage::Packet(attributes),
            )),
        );
        outer.finalize();
        let mut wire = vec![0u8; outer.buffer_len()];
        outer.serialize(&mut wire);
        match NetlinkMessage::<NetfilterMessage>::deserialize(&wire)
            .unwrap()
            .payload
        {
            NetlinkPayload::InnerMessage(inner) => inner,
            other => panic!("{other:?}"),
        }
    }

    fn prefix(point: &DropPoint) -> PacketNla {
        PacketNla::Prefix(CString::new(point.nflog_prefix()).unwrap())
    }

    #[test]
    fn a_dropped_syn_names_its_pod_chain() {
        let point = DropPoint::PodChain {
            direction: Direction::Ingress,
            chain: "pod_in_10_0_0_2".into(),
        };
        let syn = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, &tcp(41234, 80, 0x02));
        let logged = logged_of(
            &message(vec![
                PacketNla::Seq(7),
                prefix(&point),
                PacketNla::Payload(syn),
            ]),
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(logged.sequence, Some(7));
        let Decoded::Event(drop) = logged.drop else {
            panic!("{logged:?}")
        };
        assert_eq!(drop.point, point);
        assert_eq!(drop.packet.protocol, L4Protocol::Tcp);
        assert_eq!(
            (drop.packet.source_port, drop.packet.destination_port),
            (41234, 80)
        );
        assert!(drop.tcp_flags.unwrap().syn);
        assert_eq!(drop.time, SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn other_prefixes_are_skipped_and_broken_packets_are_bad() {
        let syn = ipv4_packet([10, 0, 0, 1], [10, 0, 0, 2], 6, &tcp(1, 2, 0x02));
        let foreign = logged_of(
            &message(vec![
                PacketNla::Prefix(CString::new("calico-packet: ").unwrap()),
                PacketNla::Payload(syn.clone()),
            ]),
            SystemTime::now(),
        )
        .unwrap();
        assert!(matches!(foreign.drop, Decoded::Skip));
        let unprefixed =
            logged_of(&message(vec![PacketNla::Payload(syn)]), SystemTime::now()).unwrap();
        assert!(matches!(unprefixed.drop, Decoded::Skip));
        let garbage = logged_of(
            &message(vec![
                prefix(&DropPoint::UnknownPod {
                    direction: Direction::Egress,
                }),
                PacketNla::Payload(vec![0x45, 1, 2]),
            ]),
            SystemTime::now(),
        )
        .unwrap();
        assert!(matches!(garbage.drop, Decoded::Bad(_)));
        let empty = logged_of(
            &message(vec![prefix(&DropPoint::UnknownPod {
                direction: Direction::Ingress,
            })]),
            SystemTime::now(),
        )
        .unwrap();
        assert!(matches!(empty.drop, Decoded::Bad(_)));
    }

    #[test]
    fn gaps_in_the_sequence_are_losses() {
        let mut gaps = SequenceGaps::default();
        assert_eq!(gaps.observe(5), 0, "the first number seen starts the count");
        assert_eq!(gaps.observe(6), 0);
        assert_eq!(gaps.observe(10), 3);
        assert_eq!(
            gaps.observe(u32::MAX),
            0,
            "a renumbering, not four billion losses"
        );
        assert_eq!(gaps.observe(1), 1, "wrapping around");
        assert_eq!(gaps.observe(0), 0, "backwards");
        assert_eq!(gaps.observe(1), 0);
    }

    #[test]
    fn the_bind_request_asks_for_an_acknowledgement() {
        let request = bind_request(1616, 9);
        assert_eq!(request.header.flags & NLM_F_ACK, NLM_F_ACK);
        assert_eq!(request.header.sequence_number, 9);
        let NetlinkPayload::InnerMessage(inner) = &request.payload else {
            panic!()
        };
        assert_eq!(inner.header.res_id, 1616);
        let NetfilterMessageInner::ULog(ULogMessage::Config(config)) = &inner.inner else {
            panic!()
        };
        assert!(config.contains(&ConfigNla::Cmd(ConfigCmd::Bind)));
        assert!(config.contains(&ConfigNla::Mode(ConfigMode::new_packet(COPY_RANGE))));
    }
}
