//! Which CPUs the device workers run on. The kernel steers a packet to TUN queue and socket
//! `cpu % workers` (see `io`), so worker `i` is pinned to exactly those CPUs while traffic is
//! light: the thread a packet wakes is then already on the CPU that woke it, and a round trip
//! pays no cross-CPU wake-up (tens of microseconds each on a VM). A worker that stays
//! saturated is let go to any CPU, so the scheduler can spread one heavy flow's work (the
//! application, encryption, the peer's decryption) over idle CPUs; it goes home again once its
//! traffic is light.

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
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
}

/// How often a worker checks whether its home CPUs are oversubscribed (at home) or its
/// traffic light again (away).
const WINDOW: Duration = Duration::from_millis(10);
/// The share of a window a worker may wait for its CPU (runnable, not running) before it
/// leaves home: a quarter means the CPU is shared with other busy threads.
const CONTENTION_SHARE: u32 = 4;
/// A worker away goes home once it is busy less than this share of a window (a tenth).
const LIGHT_SHARE: u32 = 10;

/// What a worker should do with its affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    Stay,
    /// Pin to the home CPUs.
    Home,
    /// Run anywhere this process may.
    Anywhere,
}

/// A worker's placement policy (pure; the worker applies each [`Move`]).
#[derive(Debug)]
pub struct Placement {
    home: Vec<usize>,
    anywhere: Vec<usize>,
    at_home: bool,
    window_start: Instant,
    /// The thread's total run-queue wait at `window_start`, once sampled.
    waited_at_window_start: Option<Duration>,
    /// Time spent working since `window_start`.
    busy: Duration,
}

impl Placement {
    /// A worker that starts at home (the caller pins it there first).
    pub fn new(home: Vec<usize>, anywhere: Vec<usize>, now: Instant) -> Self {
        Self {
            home,
            anywhere,
            at_home: true,
            window_start: now,
            waited_at_window_start: None,
            busy: Duration::ZERO,
        }
    }

    /// One wake-up's work began at `started` and ended at `ended`. `run_queue_wait` reads the
    /// thread's total time spent runnable but not running (called at most once a window).
    pub fn after_work(
        &mut self,
        started: Instant,
        ended: Instant,
        run_queue_wait: impl FnOnce() -> Option<Duration>,
    ) -> Move {
        self.busy += ended.saturating_duration_since(started);
        let span = ended.saturating_duration_since(self.window_start);
        if span < WINDOW {
            return Move::Stay;
        }
        let busy = std::mem::take(&mut self.busy);
        self.window_start = ended;
        if !self.at_home {
            if busy * LIGHT_SHARE < span {
                self.at_home = true;
                self.waited_at_window_start = run_queue_wait();
                return Move::Home;
            }
            return Move::Stay;
        }
        let Some(waited) = run_queue_wait() else {
            return Move::Stay;
        };
        match self.waited_at_window_start.replace(waited) {
            Some(before) if waited.saturating_sub(before) * CONTENTION_SHARE > span => {
                self.at_home = false;
                Move::Anywhere
            }
            _ => Move::Stay,
        }
    }

    /// Applies `step` to the calling thread.
    pub fn apply(&self, step: Move) {
        let cpus = match step {
            Move::Stay => return,
            Move::Home => &self.home,
            Move::Anywhere => &self.anywhere,
        };
        if let Err(e) = pin_current_thread(cpus) {
            tracing::debug!("affinity {step:?} ({cpus:?}): {e}");
        }
    }
}

/// The calling thread's total time runnable but waiting for a CPU (`/proc/thread-self/
/// schedstat`, second field), if the kernel keeps it.
pub fn run_queue_wait() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    parse_schedstat_wait(&text)
}

fn parse_schedstat_wait(text: &str) -> Option<Duration> {
    let nanos: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
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
    fn light_traffic_stays_home() {
        let t0 = Instant::now();
        let mut placement = Placement::new(vec![0], vec![0, 1], t0);
        let mut waited = Duration::ZERO;
        // A ping every millisecond for a second, each waiting a little for its CPU (10 %).
        for i in 1..1000 {
            let start = t0 + ms(i);
            waited += us(100);
            let step = placement.after_work(start, start + us(20), || Some(waited));
            assert_eq!(step, Move::Stay, "at {i} ms");
        }
    }

    #[test]
    fn a_contended_home_is_left_and_idleness_brings_it_back() {
        let t0 = Instant::now();
        let mut placement = Placement::new(vec![0], vec![0, 1], t0);
        let mut waited = Duration::ZERO;
        let mut now = t0;
        let mut moves = Vec::new();
        // Busy, and runnable-but-waiting half the time: the home CPU is oversubscribed.
        for _ in 0..100 {
            now += us(200);
            waited += us(100);
            moves.push(placement.after_work(now, now + us(100), || Some(waited)));
            if moves.last() == Some(&Move::Anywhere) {
                break;
            }
        }
        assert_eq!(moves.last(), Some(&Move::Anywhere), "{moves:?}");
        // The first window only sets the baseline: it takes two to leave.
        assert!(moves.len() > 40, "left after {} wake-ups", moves.len());
        // Busy elsewhere, whatever the waits: stays away (no ping-pong).
        for _ in 0..100 {
            now += us(200);
            waited += us(150);
            assert_eq!(
                placement.after_work(now, now + us(100), || Some(waited)),
                Move::Stay
            );
        }
        // Light traffic again (a ping a millisecond): home within a window, and stays.
        let mut moves = Vec::new();
        for _ in 0..100 {
            now += ms(1);
            moves.push(placement.after_work(now, now + us(20), || Some(waited)));
        }
        assert_eq!(moves.iter().filter(|m| **m == Move::Home).count(), 1);
        assert!(moves[..12].contains(&Move::Home), "{moves:?}");
        assert!(!moves.contains(&Move::Anywhere));
    }

    #[test]
    fn schedstat_wait_is_the_second_field() {
        assert_eq!(
            parse_schedstat_wait("2553741 48732 17\n"),
            Some(Duration::from_nanos(48732))
        );
        assert_eq!(parse_schedstat_wait("garbage"), None);
        assert!(run_queue_wait().is_some());
    }
}
