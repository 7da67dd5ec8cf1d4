//! Which CPUs the device workers run on. The kernel steers a packet to TUN queue and socket
//! `cpu % workers` (see `io`), so worker `i` is pinned to exactly those CPUs: the thread a
//! packet wakes is then already on the CPU that woke it, and a round trip pays no cross-CPU
//! wake-up (tens of microseconds each on a VM). Under bulk load the device sends everything
//! to its first worker instead, free to run anywhere ([`ModePolicy`]).

use std::time::{Duration, Instant};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// More workers than this buys nothing but memory (each has its own buffers) on a gateway.
pub const MAX_WORKERS: usize = 8;

/// The CPUs this process may run on (its affinity, e.g. a container's cpuset), in order.
pub fn allowed() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// One worker per allowed CPU, at least one and at most [`MAX_WORKERS`].
pub fn default_workers(allowed: &[usize]) -> usize {
    allowed.len().clamp(1, MAX_WORKERS)
}

/// The CPUs whose packets the kernel steers to worker `index` of `workers`; empty (run
/// anywhere) when there are none, or when there is only one worker.
pub fn for_worker(allowed: &[usize], workers: usize, index: usize) -> Vec<usize> {
    if workers <= 1 {
        return Vec::new();
    }
    allowed
        .iter()
        .copied()
        .filter(|cpu| cpu % workers == index)
        .collect()
}

/// Pins the calling thread to `cpus` (no change when empty).
pub fn pin_current_thread(cpus: &[usize]) -> nix::Result<()> {
    pin_thread(Pid::from_raw(0), cpus)
}

/// Pins thread `tid` of this process to `cpus` (no change when empty).
pub fn pin_thread(tid: Pid, cpus: &[usize]) -> nix::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)?;
    }
    sched_setaffinity(tid, &set)
}

/// How a steered device is using its workers: spread (each packet to the worker of its CPU
/// or flow) while traffic is light, for the lowest latency; all to the first worker, free to
/// run on any CPU, under bulk load, where one thread with full batches moves the most per CPU
/// second (spreading adds lock hand-offs between workers, smaller batches and, when a busy
/// worker moves, datagrams reaching the peer from changing CPUs). Decided from the time all
/// workers spent working, over windows of at least [`MODE_WINDOW`].
#[derive(Debug)]
pub struct ModePolicy {
    spread: bool,
    window_start: Instant,
    busy_at_window_start: Duration,
}

const MODE_WINDOW: Duration = Duration::from_millis(10);
/// Bulk: the workers together were busy more than half of a window.
const BULK_SHARE: u32 = 2;
/// Light again: busy less than a tenth of a window.
const LIGHT_SHARE: u32 = 10;

impl ModePolicy {
    /// Starts spread.
    pub fn new(now: Instant) -> Self {
        Self {
            spread: true,
            window_start: now,
            busy_at_window_start: Duration::ZERO,
        }
    }

    /// `busy` is the workers' total working time so far; the new mode when it changes.
    pub fn after(&mut self, now: Instant, busy: Duration) -> Option<bool> {
        let span = now.saturating_duration_since(self.window_start);
        if span < MODE_WINDOW {
            return None;
        }
        let worked = busy.saturating_sub(self.busy_at_window_start);
        self.window_start = now;
        self.busy_at_window_start = busy;
        let spread = if self.spread {
            worked * BULK_SHARE <= span
        } else {
            worked * LIGHT_SHARE < span
        };
        (spread != self.spread).then(|| {
            self.spread = spread;
            spread
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn light_traffic_stays_spread() {
        let t0 = Instant::now();
        let mut policy = ModePolicy::new(t0);
        let mut busy = Duration::ZERO;
        // A ping every millisecond for a second, 40 us of work each.
        for i in 1..=1000 {
            busy += us(40);
            assert_eq!(policy.after(t0 + ms(i), busy), None, "at {i} ms");
        }
    }

    #[test]
    fn bulk_load_goes_to_the_first_worker_and_light_traffic_spreads_again() {
        let t0 = Instant::now();
        let mut policy = ModePolicy::new(t0);
        let mut busy = Duration::ZERO;
        let mut changes = Vec::new();
        // Bulk: the workers together busy 0.8 ms of every millisecond.
        for i in 1..=100 {
            busy += us(800);
            if let Some(spread) = policy.after(t0 + ms(i), busy) {
                changes.push((i, spread));
            }
        }
        assert_eq!(changes, [(10, false)], "bulk after one window, once");
        // Still busy, even at a quarter: stays with the first worker (no flapping).
        for i in 101..=200 {
            busy += us(250);
            assert_eq!(policy.after(t0 + ms(i), busy), None);
        }
        // Light again: spread after the next whole window.
        let mut changes = Vec::new();
        for i in 201..=300 {
            busy += us(40);
            if let Some(spread) = policy.after(t0 + ms(i), busy) {
                changes.push((i, spread));
            }
        }
        assert_eq!(changes, [(210, true)]);
    }

    #[test]
    fn a_long_idle_gap_is_one_light_window() {
        let t0 = Instant::now();
        let mut policy = ModePolicy::new(t0);
        assert_eq!(policy.after(t0 + ms(10), ms(9)), Some(false));
        // Nothing for a second, then one packet: spread.
        assert_eq!(policy.after(t0 + ms(1010), ms(9) + us(30)), Some(true));
    }

    #[test]
    fn each_worker_gets_the_cpus_steered_to_it() {
        let two = [0, 1];
        assert_eq!(for_worker(&two, 2, 0), vec![0]);
        assert_eq!(for_worker(&two, 2, 1), vec![1]);
        // A cpuset that does not start at 0: 2 -> 2, 3 -> 3, 4 -> 0, 5 -> 1 (mod 4).
        let set = [2, 3, 4, 5];
        assert_eq!(for_worker(&set, 4, 0), vec![4]);
        assert_eq!(for_worker(&set, 4, 2), vec![2]);
        // More CPUs than workers: each takes its residue class.
        let twelve: Vec<usize> = (0..12).collect();
        assert_eq!(for_worker(&twelve, 8, 3), vec![3, 11]);
        // One worker runs anywhere.
        assert!(for_worker(&two, 1, 0).is_empty());
    }

    #[test]
    fn one_worker_per_cpu_within_bounds() {
        assert_eq!(default_workers(&[]), 1);
        assert_eq!(default_workers(&[0, 1]), 2);
        let many: Vec<usize> = (0..64).collect();
        assert_eq!(default_workers(&many), MAX_WORKERS);
    }

    #[test]
    fn this_process_may_run_somewhere() {
        assert!(!allowed().is_empty());
    }
}
