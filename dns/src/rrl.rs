//! Response rate limiting (a simplified BIND RRL): a UDP source address can be spoofed, so a
//! DNS server can be made to send many answers to a victim. Identical responses to one client
//! network (/24 for IPv4, /56 for IPv6) are limited to N per second per (qname, qtype, rcode);
//! beyond that, every other response is sent truncated and empty ("slip": TC=1, so a real
//! client retries over TCP, which a spoofer cannot) and the rest are dropped. TCP is never
//! limited.
//!
//! The state is a fixed table of 64-bit atomic slots indexed by a keyed hash of the bucket:
//! O(1) per response, no allocation, no lock, memory fixed at start whatever the number of
//! (spoofed) sources. A colliding bucket simply takes the slot over (eviction); that can only
//! let more responses through for a moment, never block a client that is under its limit.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Time is counted in ticks of 1/16 s, so a bucket's one-second window is 16 ticks.
const TICKS_PER_SECOND: u64 = 16;
/// Every `SLIP`-th limited response is sent truncated instead of dropped.
const SLIP: u64 = 2;

/// What to do with one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Under the limit: send it.
    Send,
    /// Over the limit, its turn to slip: send an empty truncated response.
    Slip,
    /// Over the limit: send nothing.
    Drop,
}

/// The limiter, shared by every UDP worker.
pub struct RateLimiter {
    /// Responses per second per bucket.
    limit: u64,
    /// Slot layout: tag (32 bits, from the hash) | window start tick (16) | count (16).
    slots: Box<[AtomicU64]>,
    mask: usize,
    keys: RandomState,
    epoch: Instant,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limit", &self.limit)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl RateLimiter {
    /// At most `per_second` identical responses per bucket and second, tracked in `slots`
    /// slots (rounded up to a power of two). `None` when `per_second` is 0 (disabled).
    pub fn new(per_second: u32, slots: usize) -> Option<Self> {
        if per_second == 0 {
            return None;
        }
        let len = slots.max(1).next_power_of_two();
        Some(Self {
            limit: u64::from(per_second),
            slots: (0..len).map(|_| AtomicU64::new(0)).collect(),
            mask: len - 1,
            // Keyed per process: an attacker cannot aim collisions at a victim's slot.
            keys: RandomState::new(),
            epoch: Instant::now(),
        })
    }

    /// Bytes of state: fixed at start.
    pub fn memory(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }

    /// The verdict for the response with `rcode` to `query` (the client's packet; its
    /// question is the key) sent to `client` at `now`.
    pub fn check(&self, client: IpAddr, query: &[u8], rcode: u8, now: Instant) -> Verdict {
        let ticks =
            now.saturating_duration_since(self.epoch).as_millis() as u64 * TICKS_PER_SECOND / 1000;
        self.check_at(self.bucket(client, query, rcode), ticks)
    }

    /// The keyed hash of a bucket: the client's network, the lower-cased question name and
    /// type (read from the packet in place) and the response code.
    fn bucket(&self, client: IpAddr, query: &[u8], rcode: u8) -> u64 {
        // The key is assembled on the stack and hashed in one call (per-byte hasher calls
        // cost more than the rest of the check).
        let mut key = [0u8; 1 + 7 + 1 + 255 + 2];
        let mut len = match client.to_canonical() {
            IpAddr::V4(v4) => {
                key[0] = 4;
                key[1..4].copy_from_slice(&v4.octets()[..3]);
                4
            }
            IpAddr::V6(v6) => {
                key[0] = 6;
                key[1..8].copy_from_slice(&v6.octets()[..7]);
                8
            }
        };
        key[len] = rcode & 0x0f;
        len += 1;
        // The question: labels lower-cased up to the root, then the type. A packet cut short
        // keys what it has: all such packets from one network share buckets, which is what a
        // limiter wants.
        let name_start = len;
        let mut pos = 12;
        while let Some(&label) = query.get(pos) {
            let label = usize::from(label);
            if label == 0 || label > 63 || len - name_start + 1 + label > 255 {
                pos += 1;
                break;
            }
            let Some(bytes) = query.get(pos + 1..pos + 1 + label) else {
                break;
            };
            key[len] = label as u8;
            for (k, b) in key[len + 1..len + 1 + label].iter_mut().zip(bytes) {
                *k = b.to_ascii_lowercase();
            }
            len += 1 + label;
            pos += 1 + label;
        }
        if let Some(qtype) = query.get(pos..pos + 2) {
            key[len..len + 2].copy_from_slice(qtype);
            len += 2;
        }
        let mut hasher = self.keys.build_hasher();
        hasher.write(&key[..len]);
        hasher.finish()
    }

    /// The verdict for bucket `hash` at time `ticks` (1/16 s since the epoch).
    fn check_at(&self, hash: u64, ticks: u64) -> Verdict {
        let slot = &self.slots[hash as usize & self.mask];
        let tag = hash >> 32;
        let now = ticks & 0xffff;
        let mut count = 0;
        // Concurrent workers may race on a slot; the update is one compare-and-swap retried,
        // so a count is never lost except across an eviction.
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            let (old_tag, start, old_count) = (old >> 32, (old >> 16) & 0xffff, old & 0xffff);
            let fresh = old_tag != tag || (now.wrapping_sub(start) & 0xffff) >= TICKS_PER_SECOND;
            let (start, next) = if fresh {
                (now, 1)
            } else {
                (start, (old_count + 1).min(0xffff))
            };
            count = next;
            Some(tag << 32 | start << 16 | next)
        });
        if count <= self.limit {
            Verdict::Send
        } else if (count - self.limit) % SLIP == 1 {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }
}

/// Cuts the response in `out[..len]` down to its header and question with TC set (the slip
/// answer); returns the new length. The response's question is the client's, uncompressed.
pub fn slip(out: &mut [u8], len: usize) -> usize {
    if len < 12 {
        return len; // not a response: nothing to cut
    }
    let end = match crate::wire::question_end(&out[..len]) {
        Some(end) => end,
        None => {
            out[4..6].fill(0); // a question we cannot delimit goes too
            12
        }
    };
    out[2] |= 0x02; // TC
    out[6..12].fill(0); // no answer, authority or additional records
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limit_then_slip_and_drop_alternately_then_a_new_second() {
        let rrl = RateLimiter::new(5, 1024).unwrap();
        let q = query("web.shop.svc.clusterset.local", 1);
        let bucket = rrl.bucket(ip("10.0.0.1"), &q, 0);
        let verdicts: Vec<Verdict> = (0..9).map(|_| rrl.check_at(bucket, 100)).collect();
        use Verdict::*;
        assert_eq!(
            verdicts,
            [Send, Send, Send, Send, Send, Slip, Drop, Slip, Drop]
        );
        // Still within the second (15 ticks later): limited.
        assert_eq!(rrl.check_at(bucket, 115), Slip);
        // A second after the window opened: a fresh window.
        assert_eq!(rrl.check_at(bucket, 116), Send);
    }

    #[test]
    fn buckets_are_per_network_question_and_rcode() {
        let rrl = RateLimiter::new(1, 1 << 16).unwrap();
        let q = query("web.shop.svc.clusterset.local", 1);
        let base = rrl.bucket(ip("10.0.0.1"), &q, 0);
        // Same /24, same question in another spelling: the same bucket.
        assert_eq!(base, rrl.bucket(ip("10.0.0.200"), &q, 0));
        assert_eq!(
            base,
            rrl.bucket(
                ip("10.0.0.9"),
                &query("WEB.Shop.svc.clusterset.local", 1),
                0
            )
        );
        assert_eq!(base, rrl.bucket(ip("::ffff:10.0.0.7"), &q, 0));
        // Another network, name, type or rcode: another bucket.
        for other in [
            rrl.bucket(ip("10.0.1.1"), &q, 0),
            rrl.bucket(
                ip("10.0.0.1"),
                &query("api.shop.svc.clusterset.local", 1),
                0,
            ),
            rrl.bucket(
                ip("10.0.0.1"),
                &query("web.shop.svc.clusterset.local", 28),
                0,
            ),
            rrl.bucket(ip("10.0.0.1"), &q, 3),
        ] {
            assert_ne!(base, other);
        }
        // IPv6: one bucket per /56.
        let v6 = rrl.bucket(ip("fd00:1:2:3400::1"), &q, 0);
        assert_eq!(v6, rrl.bucket(ip("fd00:1:2:34ff:ffff::9"), &q, 0));
        assert_ne!(v6, rrl.bucket(ip("fd00:1:2:3500::1"), &q, 0));

        let now = Instant::now();
        assert_eq!(rrl.check(ip("10.0.0.1"), &q, 0, now), Verdict::Send);
        assert_eq!(rrl.check(ip("10.0.0.2"), &q, 0, now), Verdict::Slip);
        assert_eq!(rrl.check(ip("10.0.1.2"), &q, 0, now), Verdict::Send);
    }

    /// 100,000 spoofed sources: the table does not grow, and a client hammering one name
    /// afterwards is limited as before.
    #[test]
    fn memory_is_bounded_under_spoofed_sources() {
        let rrl = RateLimiter::new(20, 4096).unwrap();
        let before = rrl.memory();
        assert_eq!(before, 4096 * 8);
        let q = query("web.shop.svc.clusterset.local", 1);
        let now = Instant::now();
        let mut sent = 0;
        for i in 0..100_000u32 {
            // A distinct /24 each time.
            let client = IpAddr::from([11 + (i >> 16) as u8, (i >> 8) as u8, i as u8, 7]);
            if rrl.check(client, &q, 0, now) == Verdict::Send {
                sent += 1;
            }
        }
        assert_eq!(rrl.memory(), before);
        // Each is a new bucket, under its limit (bar a rare full-hash collision).
        assert!(sent >= 99_900, "{sent}");
        let victim = ip("192.0.2.1");
        let full = (0..200)
            .filter(|_| rrl.check(victim, &q, 0, now) == Verdict::Send)
            .count();
        assert_eq!(full, 20);
    }

    #[test]
    fn zero_disables_and_slip_keeps_header_and_question() {
        assert!(RateLimiter::new(0, 1024).is_none());
        let mut response = query("web.shop.svc.clusterset.local", 1);
        let question_end = response.len();
        response[2] |= 0x84; // QR, AA
        response[7] = 1; // one answer
        response.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 0, 0, 1]);
        let len = response.len();
        let cut = slip(&mut response, len);
        assert_eq!(cut, question_end);
        assert_eq!(response[2] & 0x02, 0x02);
        assert_eq!(&response[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        // A question that runs past the end: the header alone, with no counts.
        let mut broken = response[..20].to_vec();
        broken[7] = 1;
        assert_eq!(slip(&mut broken, 20), 12);
        assert_eq!(&broken[4..12], &[0; 8]);
    }
}
