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
/// A contended worker leaves home only if the other CPUs were idle at least this share of a
/// window (a third): moving to a CPU as busy as home buys nothing and costs order (its
/// datagrams would reach the peer's workers from changing CPUs).
const SPARE_SHARE: u32 = 3;

/// What the policy reads from the kernel (real: [`KernelProbe`]; tests: scripted).
pub trait Probe {
    /// The calling thread's total time runnable but waiting for a CPU.
    fn run_queue_wait(&mut self) -> Option<Duration>;
    /// The total time `cpus` have spent idle.
    fn idle_time(&mut self, cpus: &[usize]) -> Option<Duration>;
}

/// `/proc/thread-self/schedstat` and the cpuidle residency counters in sysfs.
pub struct KernelProbe;

impl Probe for KernelProbe {
    fn run_queue_wait(&mut self) -> Option<Duration> {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        parse_schedstat_wait(&text)
    }

    fn idle_time(&mut self, cpus: &[usize]) -> Option<Duration> {
        let mut total = Duration::ZERO;
        for cpu in cpus {
            let dir = format!("/sys/devices/system/cpu/cpu{cpu}/cpuidle");
            let mut found = false;
            for state in std::fs::read_dir(&dir).ok()?.flatten() {
                let Ok(text) = std::fs::read_to_string(state.path().join("time")) else {
                    continue;
                };
                let micros: u64 = text.trim().parse().ok()?;
                total += Duration::from_micros(micros);
                found = true;
            }
            if !found {
                return None;
            }
        }
        Some(total)
    }
}

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
    /// `anywhere` but `home`: where a worker that leaves would go.
    others: Vec<usize>,
    at_home: bool,
    window_start: Instant,
    /// The thread's total run-queue wait at `window_start`, once sampled.
    waited_at_window_start: Option<Duration>,
    /// Time spent working since `window_start`.
    busy: Duration,
    /// The other CPUs' total idle time at `window_start`, sampled while contended.
    others_idle_at_window_start: Option<Duration>,
}

impl Placement {
    /// A worker that starts at home (the caller pins it there first).
    pub fn new(home: Vec<usize>, anywhere: Vec<usize>, now: Instant) -> Self {
        let others = anywhere
            .iter()
            .copied()
            .filter(|cpu| !home.contains(cpu))
            .collect();
        Self {
            home,
            anywhere,
            others,
            at_home: true,
            window_start: now,
            waited_at_window_start: None,
            busy: Duration::ZERO,
            others_idle_at_window_start: None,
        }
    }

    /// One wake-up's work began at `started` and ended at `ended`; `probe` is read at most
    /// once a window.
    pub fn after_work(&mut self, started: Instant, ended: Instant, probe: &mut impl Probe) -> Move {
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
                self.waited_at_window_start = probe.run_queue_wait();
                self.others_idle_at_window_start = None;
                return Move::Home;
            }
            return Move::Stay;
        }
        let Some(waited) = probe.run_queue_wait() else {
            return Move::Stay;
        };
        let contended = matches!(
            self.waited_at_window_start.replace(waited),
            Some(before) if waited.saturating_sub(before) * CONTENTION_SHARE > span
        );
        if !contended || self.others.is_empty() {
            self.others_idle_at_window_start = None;
            return Move::Stay;
        }
        // Contended: leave if the other CPUs have room, judged over the next window (or at
        // once when the kernel does not say how idle they are).
        let Some(idle) = probe.idle_time(&self.others) else {
            self.at_home = false;
            return Move::Anywhere;
        };
        match self.others_idle_at_window_start.replace(idle) {
            Some(before)
                if idle.saturating_sub(before) * SPARE_SHARE > span * self.others.len() as u32 =>
            {
                self.at_home = false;
                self.others_idle_at_window_start = None;
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

    /// A scripted kernel: the thread's run-queue wait and the other CPUs' idle time grow by
    /// the given amounts per reading.
    struct Script {
        waited: Duration,
        wait_step: Duration,
        idle: Option<Duration>,
        idle_step: Duration,
    }

    impl Script {
        fn new(wait_step: Duration, idle_step: Option<Duration>) -> Self {
            Self {
                waited: Duration::ZERO,
                wait_step,
                idle: idle_step.map(|_| Duration::ZERO),
                idle_step: idle_step.unwrap_or_default(),
            }
        }
    }

    impl Probe for Script {
        fn run_queue_wait(&mut self) -> Option<Duration> {
            self.waited += self.wait_step;
            Some(self.waited)
        }
        fn idle_time(&mut self, cpus: &[usize]) -> Option<Duration> {
            assert_eq!(cpus, [1], "the CPUs other than home");
            self.idle = self.idle.map(|idle| idle + self.idle_step);
            self.idle
        }
    }

    /// Wake-ups every `every`, each working `work`, for `count` wake-ups: the moves made.
    fn run(
        placement: &mut Placement,
        now: &mut Instant,
        every: Duration,
        work: Duration,
        count: usize,
        probe: &mut Script,
    ) -> Vec<Move> {
        (0..count)
            .map(|_| {
                *now += every;
                placement.after_work(*now, *now + work, probe)
            })
            .collect()
    }

    fn left_after(moves: &[Move]) -> Option<usize> {
        moves.iter().position(|m| *m == Move::Anywhere)
    }

    #[test]
    fn light_traffic_stays_home() {
        let mut now = Instant::now();
        let mut placement = Placement::new(vec![0], vec![0, 1], now);
        // A ping every millisecond for a second, each window waiting 1 ms of 10 (10 %).
        let mut probe = Script::new(ms(1), Some(ms(10)));
        let moves = run(&mut placement, &mut now, ms(1), us(20), 1000, &mut probe);
        assert!(moves.iter().all(|m| *m == Move::Stay));
    }

    #[test]
    fn a_contended_home_is_left_for_idle_cpus_and_light_traffic_brings_it_back() {
        let mut now = Instant::now();
        let mut placement = Placement::new(vec![0], vec![0, 1], now);
        // Busy half the time and waiting 5 ms of each 10 ms window; CPU 1 idle 8 ms of 10.
        let mut probe = Script::new(ms(5), Some(ms(8)));
        let moves = run(&mut placement, &mut now, us(200), us(100), 300, &mut probe);
        // A baseline window, a contended one, one more to see CPU 1's idleness: then away.
        let left = left_after(&moves).expect("left home");
        assert!((100..200).contains(&left), "left after {left} wake-ups");
        // Busy elsewhere: stays away (no ping-pong).
        let moves = run(&mut placement, &mut now, us(200), us(100), 300, &mut probe);
        assert!(moves.iter().all(|m| *m == Move::Stay));
        // Light traffic again (a ping a millisecond, waiting little): home within a window or
        // two, and stays.
        probe.wait_step = us(100);
        let moves = run(&mut placement, &mut now, ms(1), us(20), 100, &mut probe);
        assert_eq!(moves.iter().filter(|m| **m == Move::Home).count(), 1);
        assert!(moves[..25].contains(&Move::Home), "{moves:?}");
        assert!(!moves.contains(&Move::Anywhere));
    }

    #[test]
    fn a_contended_home_is_kept_when_the_other_cpus_are_as_busy() {
        let mut now = Instant::now();
        let mut placement = Placement::new(vec![0], vec![0, 1], now);
        // Contended at home, and CPU 1 idle only 1 ms of 10: nowhere better to go.
        let mut probe = Script::new(ms(5), Some(ms(1)));
        let moves = run(&mut placement, &mut now, us(200), us(100), 1000, &mut probe);
        assert_eq!(left_after(&moves), None);
    }

    #[test]
    fn without_idle_counters_contention_alone_decides() {
        let mut now = Instant::now();
        let mut placement = Placement::new(vec![0], vec![0, 1], now);
        let mut probe = Script::new(ms(5), None);
        let moves = run(&mut placement, &mut now, us(200), us(100), 300, &mut probe);
        assert!(left_after(&moves).is_some());
    }

    #[test]
    fn the_kernel_probe_reads_this_machine() {
        let mut probe = KernelProbe;
        assert!(probe.run_queue_wait().is_some());
        // cpuidle counters exist on this machine (haltpoll); elsewhere they may not.
        if std::path::Path::new("/sys/devices/system/cpu/cpu0/cpuidle/state0/time").exists() {
            assert!(probe.idle_time(&[0]).is_some());
        }
    }

    #[test]
    fn schedstat_wait_is_the_second_field() {
        assert_eq!(
            parse_schedstat_wait("2553741 48732 17\n"),
            Some(Duration::from_nanos(48732))
        );
        assert_eq!(parse_schedstat_wait("garbage"), None);
    }
}
