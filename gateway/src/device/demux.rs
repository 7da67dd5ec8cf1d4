//! Which peer an incoming datagram is for, without trusting anything in it.
//!
//! boringtun's parser reads the message type, size and reserved bytes. A handshake initiation
//! is then checked against the shared rate limiter (which answers with a cookie under load)
//! before the one DH needed to learn the sender's static key; every other message carries our
//! receiver index, whose upper 24 bits are the peer's slot (boringtun's `Tunn` uses
//! `index << 8`).

use std::net::SocketAddr;
use std::sync::Arc;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use trellis_core::wgkey::PublicKey;

use super::KeyRing;
use super::peers::{Peer, PeerTable};
use crate::metrics::DropReason;

/// WireGuard's message types (first byte, little-endian u32).
pub const HANDSHAKE_INIT: u8 = 1;
pub const HANDSHAKE_RESPONSE: u8 = 2;
pub const COOKIE_REPLY: u8 = 3;
pub const DATA: u8 = 4;
pub const HANDSHAKE_INIT_LEN: usize = 148;
pub const HANDSHAKE_RESPONSE_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;
pub const DATA_MIN_LEN: usize = 32;

/// What the first bytes of a datagram say it is, before any cryptography.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classified {
    /// A handshake initiation of the right size: the rate limiter and one DH find its peer.
    HandshakeInit,
    /// A handshake response, cookie reply or data message addressed to our receiver `index`,
    /// whose upper 24 bits are the peer's `slot`.
    Indexed { kind: u8, index: u32, slot: u32 },
}

/// The pure first step of demultiplexing, boringtun's own parse: a WireGuard message type
/// with its exact (or, for data, minimum) size and zero reserved bytes, and the receiver index
/// where one is carried. Anything else is [`DropReason::Malformed`]. Public so that it can be
/// fuzzed on its own.
pub fn classify_datagram(datagram: &[u8]) -> Result<Classified, DropReason> {
    let indexed = |kind, index: u32| Classified::Indexed {
        kind,
        index,
        slot: index >> 8,
    };
    match Tunn::parse_incoming_packet(datagram) {
        Ok(Packet::HandshakeInit(_)) => Ok(Classified::HandshakeInit),
        Ok(Packet::HandshakeResponse(p)) => Ok(indexed(HANDSHAKE_RESPONSE, p.receiver_idx)),
        Ok(Packet::PacketCookieReply(p)) => Ok(indexed(COOKIE_REPLY, p.receiver_idx)),
        Ok(Packet::PacketData(p)) => Ok(indexed(DATA, p.receiver_idx)),
        Err(_) => Err(DropReason::Malformed),
    }
}

/// Which of the device's keys a handshake initiation was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyUse {
    Current,
    /// The key a rotation replaced, during its grace period.
    Previous,
}

/// Where a datagram goes.
pub(super) enum Demux<'t> {
    /// To this peer; for a handshake initiation, also which of our keys it was sent to.
    Peer(&'t Arc<Peer>, Option<KeyUse>),
    Drop(DropReason),
    /// A cookie reply of this length is waiting in the scratch buffer.
    Cookie(usize),
}

/// Finds the peer `datagram` (from `from`) is for in `table`; an initiation is admitted by
/// the limiter of the key its MAC1 names (the current one, or during a rotation the previous
/// one), which may instead write a cookie reply into `scratch`.
pub(super) fn demux<'t>(
    table: &'t PeerTable,
    ring: &KeyRing,
    datagram: &[u8],
    from: SocketAddr,
    scratch: &mut [u8],
) -> Demux<'t> {
    match classify_datagram(datagram) {
        Err(reason) => Demux::Drop(reason),
        Ok(Classified::HandshakeInit) => {
            let mut identities = std::iter::once((KeyUse::Current, &ring.current))
                .chain(ring.previous.iter().map(|p| (KeyUse::Previous, p)))
                .peekable();
            while let Some((key_use, identity)) = identities.next() {
                let keys = &identity.keys;
                return match identity
                    .limiter
                    .verify_packet(Some(from.ip()), datagram, scratch)
                {
                    Ok(Packet::HandshakeInit(init)) => {
                        match parse_handshake_anon(keys.secret(), keys.public(), &init) {
                            Ok(half) => match table.by_key(&PublicKey(half.peer_static_public)) {
                                Some(peer) => Demux::Peer(peer, Some(key_use)),
                                None => Demux::Drop(DropReason::NoPeer),
                            },
                            Err(_) => Demux::Drop(DropReason::DecryptFailed),
                        }
                    }
                    Ok(_) => Demux::Drop(DropReason::Malformed),
                    Err(TunnResult::WriteToNetwork(cookie)) => Demux::Cookie(cookie.len()),
                    Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                        Demux::Drop(DropReason::RateLimited)
                    }
                    // MAC1 names another public key: perhaps our other one.
                    Err(TunnResult::Err(WireGuardError::InvalidMac))
                        if identities.peek().is_some() =>
                    {
                        continue;
                    }
                    Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                        Demux::Drop(DropReason::DecryptFailed)
                    }
                    Err(_) => Demux::Drop(DropReason::Malformed),
                };
            }
            Demux::Drop(DropReason::DecryptFailed)
        }
        Ok(Classified::Indexed { slot, .. }) => match table.peers.get(&slot) {
            Some(peer) => Demux::Peer(peer, None),
            None => Demux::Drop(DropReason::NoPeer),
        },
    }
}

/// The drop a `Tunn` error counts as.
pub(super) fn drop_reason(error: &WireGuardError) -> DropReason {
    match error {
        // A counter seen before, a handshake initiation no newer than the last one, or a
        // response to a handshake since superseded (both ends initiated at once, or a retry
        // went out): old news, not a malformed datagram.
        WireGuardError::DuplicateCounter
        | WireGuardError::InvalidCounter
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::UnexpectedPacket => DropReason::Replay,
        WireGuardError::InvalidAeadTag
        | WireGuardError::InvalidMac
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp => DropReason::DecryptFailed,
        WireGuardError::UnderLoad => DropReason::RateLimited,
        WireGuardError::NoCurrentSession
        | WireGuardError::WrongIndex
        | WireGuardError::ConnectionExpired => DropReason::NoPeer,
        _ => DropReason::Malformed,
    }
}

/// Whether a data message that failed this way says the sender uses a session we do not
/// have (so a handshake from us may help).
pub(super) fn unknown_session(error: &WireGuardError) -> bool {
    matches!(
        error,
        WireGuardError::NoCurrentSession
            | WireGuardError::WrongIndex
            | WireGuardError::InvalidAeadTag
    )
}
