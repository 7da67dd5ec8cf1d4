/// This process's resident set in KiB (`VmRSS` of `/proc/self/status`; 0 where there is none),
/// for tests that state or bound what a load costs in memory.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_running_process_has_a_resident_set() {
        assert!(super::rss_kib() > 0);
    }
}
