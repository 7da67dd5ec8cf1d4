//! Slots for connections that have not proved anything yet (a TCP client before its hello, a
//! QUIC handshake before it completes), capped in total and per source, so one host (or one
//! IPv6 /64) holding many idle connections cannot starve everyone else.
//!
//! A slot is held by a [`SourceSlot`] and given back when it drops. Memory is bounded by the
//! total cap: a source is only remembered while it holds a slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken.
    Full,
    /// This source holds its share already.
    SourceFull,
}

impl Refusal {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "pending_full",
            Self::SourceFull => "source_pending_full",
        }
    }
}

#[derive(Debug)]
struct Held {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// The slots of one listener.
#[derive(Debug, Clone)]
pub struct SourceSlots {
    held: Arc<Mutex<Held>>,
    max_total: usize,
    max_per_source: usize,
}

/// One connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct SourceSlot {
    held: Arc<Mutex<Held>>,
    source: IpAddr,
}

/// The unit a source is counted by: an IPv4 address, or an IPv6 /64 (one host commonly holds
/// a whole /64, and could otherwise take a slot per address).
pub fn source_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

impl SourceSlots {
    pub fn new(max_total: usize, max_per_source: usize) -> Self {
        Self {
            held: Arc::new(Mutex::new(Held {
                total: 0,
                by_source: HashMap::new(),
            })),
            max_total,
            max_per_source,
        }
    }

    /// A slot for a connection from `address`, if the listener and the source have room.
    pub fn try_acquire(&self, address: IpAddr) -> Result<SourceSlot, Refusal> {
        let source = source_key(address);
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.total >= self.max_total {
            return Err(Refusal::Full);
        }
        let count = held.by_source.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            return Err(Refusal::SourceFull);
        }
        *count += 1;
        held.total += 1;
        Ok(SourceSlot {
            held: self.held.clone(),
            source,
        })
    }

    /// Slots held now, in all.
    pub fn held(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.total = held.total.saturating_sub(1);
        if let Some(count) = held.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                held.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_share_and_others_still_get_in() {
        let slots = SourceSlots::new(10, 3);
        let mine: Vec<_> = (0..3)
            .map(|_| slots.try_acquire(ip("198.18.0.9")).unwrap())
            .collect();
        assert_eq!(
            slots.try_acquire(ip("198.18.0.9")).unwrap_err(),
            Refusal::SourceFull
        );
        let other = slots.try_acquire(ip("198.18.0.10")).unwrap();
        assert_eq!(slots.held(), 4);
        drop(mine);
        assert!(slots.try_acquire(ip("198.18.0.9")).is_ok(), "given back");
        drop(other);
        assert_eq!(slots.held(), 0);
    }

    #[test]
    fn the_total_caps_many_sources_and_memory_follows_what_is_held() {
        let slots = SourceSlots::new(100, 2);
        let held: Vec<_> = (0..100u32)
            .map(|n| slots.try_acquire(IpAddr::V4(n.into())).unwrap())
            .collect();
        assert_eq!(
            slots.try_acquire(ip("203.0.113.1")).unwrap_err(),
            Refusal::Full
        );
        drop(held);
        assert!(slots.held.lock().unwrap().by_source.is_empty());
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let slots = SourceSlots::new(10, 2);
        let _a = slots.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        let _b = slots.try_acquire(ip("2001:db8:1:2::ffff")).unwrap();
        assert_eq!(
            slots.try_acquire(ip("2001:db8:1:2:aaaa::1")).unwrap_err(),
            Refusal::SourceFull
        );
        assert!(slots.try_acquire(ip("2001:db8:1:3::1")).is_ok());
        assert_eq!(source_key(ip("::ffff:198.18.0.1")), ip("198.18.0.1"));
    }
}
