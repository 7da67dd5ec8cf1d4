//! Waiting on the condition that proves an event happened, instead of sleeping and hoping.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is re-checked.
pub const POLL: Duration = Duration::from_millis(20);

/// Retries `attempt` until it returns `Some`, and returns that; panics naming `what` when
/// `within` passes first.
pub fn eventually<T>(what: &str, within: Duration, attempt: impl FnMut() -> Option<T>) -> T {
    poll_until(within, attempt)
        .unwrap_or_else(|| panic!("timed out after {within:?} waiting for {what}"))
}

/// Retries `attempt` until it returns `Some`, or gives `None` once `within` passes: for
/// tests that print their own diagnostics (logs, metrics) when the wait fails.
pub fn poll_until<T>(within: Duration, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = attempt() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// [`eventually`] for async conditions, sleeping on tokio's clock (so it also works under
/// paused time).
pub async fn eventually_async<T, F, Fut>(what: &str, within: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value_that_arrives() {
        let mut calls = 0;
        let got = eventually("the third call", Duration::from_secs(5), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(got, 3);
    }

    #[test]
    fn poll_until_gives_up_with_none() {
        let start = Instant::now();
        assert_eq!(poll_until::<()>(Duration::from_millis(50), || None), None);
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    #[should_panic(expected = "timed out after 50ms waiting for nothing")]
    fn names_what_never_happened() {
        eventually::<()>("nothing", Duration::from_millis(50), || None);
    }

    #[tokio::test(start_paused = true)]
    async fn async_waits_on_tokio_time() {
        let start = tokio::time::Instant::now();
        let got = eventually_async("a second", Duration::from_secs(5), || async {
            (start.elapsed() >= Duration::from_secs(1)).then_some(())
        })
        .await;
        assert_eq!(got, ());
    }
}
