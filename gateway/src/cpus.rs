//! Which CPUs the device workers run on. The kernel steers a packet to TUN queue and socket
//! `cpu % workers` (see `io`), so worker `i` is pinned to exactly those CPUs: the thread a
//! packet wakes is then already on the CPU that woke it.

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

#[cfg(test)]
mod tests {
    use super::*;

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
