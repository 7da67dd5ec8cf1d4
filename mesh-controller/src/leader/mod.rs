//! Leader election between the controller's replicas, with client-go's semantics: one record
//! (a `coordination.k8s.io/v1` Lease, or a file in the lab) names the holder and when it last
//! renewed. A record is free when absent, released (no holder) or seen unchanged for its lease
//! duration; the holder renews every retry period and gives up when it could not renew for
//! the renew deadline (shorter than the lease duration, so it has stopped acting before anyone
//! may take over). Writes are conditional on the version read (Kubernetes' resourceVersion):
//! whoever writes second gets a conflict and reads again.
//!
//! As client-go's, a follower times the holder's lease on its own monotonic clock, from when
//! it saw the record change: replicas' wall clocks may disagree by any amount, so the renewal
//! time in the record (the holder's wall clock) is written for people, never compared.
//!
//! [`decide`] is the pure rule; [`Elector`] drives it against a [`LeaseBackend`].

pub mod file;
pub mod lease;
pub mod pod_label;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

// tokio's clock, so tests on paused time measure takeovers exactly.
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::source::SourceState;
use crate::static_source::StateSink;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How long a holder's record stays valid after its last renewal.
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before it stops leading.
    pub renew_deadline: Duration,
    /// How often the holder renews and a follower looks again.
    pub retry_period: Duration,
}

/// The election record, as either backend stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `None` when released.
    pub holder: Option<String>,
    pub acquire_time: Option<SystemTime>,
    pub renew_time: Option<SystemTime>,
    /// The holder's lease duration (a follower honours the holder's, not its own).
    pub lease_duration: Duration,
    /// How many times the holder changed.
    pub transitions: u32,
}

/// A record with the version it was read or written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub record: LeaseRecord,
    pub version: String,
}

/// What a replica does after reading the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The record is free (absent, released or expired): write this one to lead.
    Acquire(LeaseRecord),
    /// This replica holds it: write this one to keep leading.
    Renew(LeaseRecord),
    /// Another replica holds it; it is free in `free_in` unless it changes meanwhile.
    Follow { holder: String, free_in: Duration },
}

/// The election rule: what `me` does given the `current` record (none when absent), which it
/// has seen unchanged for `unchanged_for` (its own monotonic clock). `now` (its wall clock)
/// only dates what it writes.
pub fn decide(
    now: SystemTime,
    current: Option<&LeaseRecord>,
    unchanged_for: Duration,
    me: &str,
    timings: &Timings,
) -> Decision {
    let mine = |acquire_time: SystemTime, transitions: u32| LeaseRecord {
        holder: Some(me.to_owned()),
        acquire_time: Some(acquire_time),
        renew_time: Some(now),
        lease_duration: timings.lease_duration,
        transitions,
    };
    let Some(current) = current else {
        return Decision::Acquire(mine(now, 0));
    };
    let holder = current.holder.as_deref().filter(|h| !h.is_empty());
    if holder == Some(me) {
        return Decision::Renew(mine(
            current.acquire_time.unwrap_or(now),
            current.transitions,
        ));
    }
    // A record never renewed counts as expired. The holder's lease duration, not ours,
    // says how long its record stays valid.
    let free_in = current
        .renew_time
        .and_then(|_| current.lease_duration.checked_sub(unchanged_for))
        .filter(|left| !left.is_zero());
    match (holder, free_in) {
        (Some(holder), Some(free_in)) => Decision::Follow {
            holder: holder.to_owned(),
            free_in,
        },
        _ => Decision::Acquire(mine(now, current.transitions.saturating_add(1))),
    }
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone else wrote the record since it was read (409 Conflict, or the file's version
    /// moved on): read it again.
    #[error("the lease was written by someone else first")]
    Conflict,
    #[error("{operation}")]
    Kubernetes {
        operation: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("{operation} {}", path.display())]
    File {
        operation: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the lease file {}", path.display())]
    FileParse {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the lease operation took longer than {0:?}")]
    TimedOut(Duration),
}

/// Where the record lives.
pub trait LeaseBackend: Send + Sync + 'static {
    /// The record, or `None` when there is none.
    fn get(&self) -> impl Future<Output = Result<Option<Versioned>, LeaseError>> + Send;
    /// Writes the first record; [`LeaseError::Conflict`] when one exists already.
    fn create(
        &self,
        record: &LeaseRecord,
    ) -> impl Future<Output = Result<Versioned, LeaseError>> + Send;
    /// Replaces the record if it is still at `version`; [`LeaseError::Conflict`] otherwise.
    fn update(
        &self,
        record: &LeaseRecord,
        version: &str,
    ) -> impl Future<Output = Result<Versioned, LeaseError>> + Send;
    /// For logs: what and where the record is.
    fn describe(&self) -> String;
}

/// The backend the configuration chose.
#[derive(Clone)]
pub enum AnyLease {
    File(file::FileLease),
    Kubernetes(Box<lease::KubeLease>),
}

impl LeaseBackend for AnyLease {
    async fn get(&self) -> Result<Option<Versioned>, LeaseError> {
        match self {
            AnyLease::File(b) => b.get().await,
            AnyLease::Kubernetes(b) => b.get().await,
        }
    }

    async fn create(&self, record: &LeaseRecord) -> Result<Versioned, LeaseError> {
        match self {
            AnyLease::File(b) => b.create(record).await,
            AnyLease::Kubernetes(b) => b.create(record).await,
        }
    }

    async fn update(&self, record: &LeaseRecord, version: &str) -> Result<Versioned, LeaseError> {
        match self {
            AnyLease::File(b) => b.update(record, version).await,
            AnyLease::Kubernetes(b) => b.update(record, version).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            AnyLease::File(b) => b.describe(),
            AnyLease::Kubernetes(b) => b.describe(),
        }
    }
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LostLeadership {
    #[error("{0} holds the lease now")]
    OtherHolder(String),
    #[error("could not renew the lease within the renew deadline of {0:?}")]
    DeadlinePassed(Duration),
}

/// This replica's identity: env `POD_NAME` when set (the chart sets it from the downward
/// API), else `<hostname>-<pid>`.
pub fn identity() -> String {
    if let Ok(name) = std::env::var("POD_NAME")
        && !name.trim().is_empty()
    {
        return name.trim().to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let host = if host.is_empty() { "controller" } else { host };
    format!("{host}-{}", std::process::id())
}

/// The wall clock the records are dated with (a seam for tests on paused time).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// What identifies one state of the record: any write changes its version; holder and
/// renewal time too, for a backend whose version would not.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RecordKey {
    version: String,
    holder: Option<String>,
    renew_time: Option<SystemTime>,
}

impl RecordKey {
    fn of(current: Option<&Versioned>) -> Option<Self> {
        current.map(|v| Self {
            version: v.version.clone(),
            holder: v.record.holder.clone(),
            renew_time: v.record.renew_time,
        })
    }
}

/// One replica's side of the election.
pub struct Elector<B> {
    backend: B,
    me: String,
    timings: Timings,
    clock: Clock,
    metrics: Metrics,
    /// The record as this replica last wrote it (while leading).
    held: Option<Versioned>,
    /// When the last successful write was sent: the holder's validity counts from then, so
    /// a slow write never extends it.
    renewed_at: Option<Instant>,
    /// The record as last read and when this replica first saw it so (its monotonic clock).
    observed: Option<(Option<RecordKey>, Instant)>,
    /// The holder last seen, for the transitions counter and logs.
    seen_holder: Option<String>,
    last_error: Option<String>,
}

impl<B: LeaseBackend> Elector<B> {
    pub fn new(backend: B, me: String, timings: Timings, metrics: Metrics) -> Self {
        Self::with_clock(backend, me, timings, metrics, Arc::new(SystemTime::now))
    }

    pub fn with_clock(
        backend: B,
        me: String,
        timings: Timings,
        metrics: Metrics,
        clock: Clock,
    ) -> Self {
        metrics.leader.set(0);
        Self {
            backend,
            me,
            timings,
            clock,
            metrics,
            held: None,
            renewed_at: None,
            observed: None,
            seen_holder: None,
            last_error: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.me
    }

    pub fn is_leading(&self) -> bool {
        self.held.is_some()
    }

    fn observe(&mut self, holder: Option<&str>) {
        if self.seen_holder.as_deref() != holder {
            if self.seen_holder.is_some() || holder == Some(self.me.as_str()) {
                self.metrics.leadership_transitions.inc();
            }
            tracing::info!(
                lease = %self.backend.describe(),
                holder = holder.unwrap_or("none"),
                me = %self.me,
                "lease holder"
            );
            self.seen_holder = holder.map(str::to_owned);
        }
    }

    /// Notes `current` as read just now; returns how long it has been seen unchanged.
    fn unchanged_for(&mut self, current: Option<&Versioned>) -> Duration {
        let key = RecordKey::of(current);
        let now = Instant::now();
        match &self.observed {
            Some((seen, since)) if *seen == key => now - *since,
            _ => {
                self.observed = Some((key, now));
                Duration::ZERO
            }
        }
    }

    fn failed(&mut self, what: &'static str, error: &LeaseError) {
        let text = trellis_core::error_chain(error);
        // Once per distinct error: a follower retrying every period would flood the log.
        if self.last_error.as_deref() != Some(text.as_str()) {
            tracing::warn!(lease = %self.backend.describe(), error = %text, "{what}");
            self.last_error = Some(text);
        }
    }

    async fn bounded<T>(
        &self,
        within: Duration,
        operation: impl Future<Output = Result<T, LeaseError>>,
    ) -> Result<T, LeaseError> {
        tokio::time::timeout(within, operation)
            .await
            .unwrap_or(Err(LeaseError::TimedOut(within)))
    }

    /// Writes `record` over what was read (create when nothing was).
    async fn write(
        &self,
        record: &LeaseRecord,
        over: Option<&Versioned>,
        within: Duration,
    ) -> Result<Versioned, LeaseError> {
        match over {
            None => self.bounded(within, self.backend.create(record)).await,
            Some(v) => {
                self.bounded(within, self.backend.update(record, &v.version))
                    .await
            }
        }
    }

    /// Returns once this replica leads; until then follows, looking again every retry
    /// period, and at the moment the holder's record would lapse.
    pub async fn acquire(&mut self) {
        let within = self.timings.renew_deadline;
        loop {
            let current = match self.bounded(within, self.backend.get()).await {
                Ok(current) => current,
                Err(e) => {
                    self.failed("reading the lease", &e);
                    tokio::time::sleep(self.timings.retry_period).await;
                    continue;
                }
            };
            let unchanged_for = self.unchanged_for(current.as_ref());
            let now = (self.clock)();
            let record = current.as_ref().map(|v| &v.record);
            match decide(now, record, unchanged_for, &self.me, &self.timings) {
                Decision::Acquire(mine) | Decision::Renew(mine) => {
                    let sent = Instant::now();
                    match self.write(&mine, current.as_ref(), within).await {
                        Ok(written) => {
                            self.held = Some(written);
                            self.renewed_at = Some(sent);
                            self.last_error = None;
                            self.observe(Some(&self.me.clone()));
                            self.metrics.leader.set(1);
                            tracing::info!(lease = %self.backend.describe(), me = %self.me, "leading");
                            return;
                        }
                        // Someone else wrote first: read again at once.
                        Err(LeaseError::Conflict) => continue,
                        Err(e) => {
                            self.failed("taking the lease", &e);
                            tokio::time::sleep(self.timings.retry_period).await;
                        }
                    }
                }
                Decision::Follow { holder, free_in } => {
                    self.observe(Some(&holder));
                    // Just past the lapse, so the next look finds it free.
                    let wait = self
                        .timings
                        .retry_period
                        .min(free_in + Duration::from_millis(5));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// While leading: renews every retry period; returns why leadership was lost (another
    /// holder in the record, or no renewal within the renew deadline). The caller stops
    /// acting as leader at once.
    pub async fn hold(&mut self) -> LostLeadership {
        let lost = self.renew_until_lost().await;
        self.held = None;
        self.metrics.leader.set(0);
        tracing::error!(lease = %self.backend.describe(), me = %self.me, reason = %lost, "lost leadership");
        lost
    }

    async fn renew_until_lost(&mut self) -> LostLeadership {
        let mut reread = false;
        loop {
            let renewed_at = self.renewed_at.unwrap_or_else(Instant::now);
            let deadline = renewed_at + self.timings.renew_deadline;
            if !reread {
                let next = (renewed_at + self.timings.retry_period).max(Instant::now());
                tokio::time::sleep_until(next).await;
            }
            let now = Instant::now();
            if now >= deadline {
                return LostLeadership::DeadlinePassed(self.timings.renew_deadline);
            }
            let left = deadline - now;
            let base = if reread {
                match self.bounded(left, self.backend.get()).await {
                    Ok(current) => current,
                    Err(e) => {
                        self.failed("reading the lease", &e);
                        self.pause_before_retry(deadline).await;
                        continue;
                    }
                }
            } else {
                self.held.clone()
            };
            let unchanged_for = self.unchanged_for(base.as_ref());
            let now = (self.clock)();
            let record = base.as_ref().map(|v| &v.record);
            let mine = match decide(now, record, unchanged_for, &self.me, &self.timings) {
                Decision::Renew(mine) | Decision::Acquire(mine) => mine,
                Decision::Follow { holder, .. } => {
                    self.observe(Some(&holder));
                    return LostLeadership::OtherHolder(holder);
                }
            };
            let sent = Instant::now();
            let left = deadline.checked_duration_since(sent).unwrap_or_default();
            match self.write(&mine, base.as_ref(), left).await {
                Ok(written) => {
                    self.held = Some(written);
                    self.renewed_at = Some(sent);
                    self.last_error = None;
                    reread = false;
                }
                Err(LeaseError::Conflict) => reread = true,
                Err(e) => {
                    self.failed("renewing the lease", &e);
                    // The next try reads first: the write may have landed after all.
                    reread = true;
                    self.pause_before_retry(deadline).await;
                }
            }
        }
    }

    async fn pause_before_retry(&self, deadline: Instant) {
        let until = (Instant::now() + self.timings.retry_period).min(deadline);
        tokio::time::sleep_until(until).await;
    }

    /// Gives the lease up on a clean shutdown (no holder, dated now), so a follower takes
    /// over at its next look instead of after the lease duration.
    pub async fn release(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        self.metrics.leader.set(0);
        let released = LeaseRecord {
            holder: None,
            renew_time: Some((self.clock)()),
            lease_duration: Duration::from_secs(1),
            ..held.record.clone()
        };
        match self
            .write(&released, Some(&held), self.timings.retry_period)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.backend.describe(), "released the lease"),
            Err(e) => {
                tracing::warn!(lease = %self.backend.describe(), error = %trellis_core::error_chain(&e), "releasing the lease (it lapses after its duration)")
            }
        }
    }
}

/// Runs the leader's `work` (its setup, then serving) while `elector`, which has just
/// acquired the lease, keeps renewing it: a setup longer than the lease never lets another
/// replica take over beside it. When leadership is lost, `work` is dropped at once (whatever
/// it spawned elsewhere the caller aborts next) and the reason returned.
pub async fn while_leading<B: LeaseBackend, T>(
    elector: &mut Elector<B>,
    work: impl Future<Output = T>,
) -> Result<T, LostLeadership> {
    tokio::select! {
        // Losing wins a tie: no step of the work runs after the lease is gone.
        biased;
        lost = elector.hold() => Err(lost),
        done = work => Ok(done),
    }
}

/// A source's sink while the process follows: it keeps the latest state (the watches stay
/// warm) and delivers it to the hub once the process leads, after the hub restored the
/// last saved state, so the hub starts from the same point a restarted controller does.
pub struct WarmSink<S> {
    inner: Arc<Mutex<Warm<S>>>,
    /// Set to 1 by the first state: the follower could take over (`/readyz`).
    synced: Option<prometheus::IntGauge>,
}

impl<S> Clone for WarmSink<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            synced: self.synced.clone(),
        }
    }
}

enum Warm<S> {
    Holding(Option<Box<SourceState>>),
    Delivering(S),
}

impl<S: StateSink> Default for WarmSink<S> {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Warm::Holding(None))),
            synced: None,
        }
    }
}

impl<S: StateSink> WarmSink<S> {
    /// A sink that sets `synced` to 1 once the sources delivered their first state.
    pub fn signalling(synced: prometheus::IntGauge) -> Self {
        Self {
            synced: Some(synced),
            ..Self::default()
        }
    }

    /// From now on every state goes to `target`, starting with the one held.
    pub fn deliver_to(&self, target: S) {
        let mut warm = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Warm::Holding(held) = &mut *warm
            && let Some(state) = held.take()
        {
            target.set_source(*state);
        }
        *warm = Warm::Delivering(target);
    }

    /// Whether a state is held (the source has synced) while following.
    pub fn holds_state(&self) -> bool {
        matches!(
            &*self.inner.lock().unwrap_or_else(|p| p.into_inner()),
            Warm::Holding(Some(_))
        )
    }
}

impl<S: StateSink> StateSink for WarmSink<S> {
    fn set_source(&self, state: SourceState) {
        match &mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()) {
            Warm::Holding(held) => *held = Some(Box::new(state)),
            Warm::Delivering(target) => target.set_source(state),
        }
        if let Some(synced) = &self.synced {
            synced.set(1);
        }
    }

    fn source_failed(&self, error: &crate::Error) {
        if let Warm::Delivering(target) = &*self.inner.lock().unwrap_or_else(|p| p.into_inner()) {
            target.source_failed(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timings = Timings {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn held_by(holder: &str, renewed: u64, transitions: u32) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.into()),
            acquire_time: Some(at(0)),
            renew_time: Some(at(renewed)),
            lease_duration: T.lease_duration,
            transitions,
        }
    }

    const NEW: Duration = Duration::ZERO;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_absent_lease_is_taken_with_no_transitions() {
        assert_eq!(
            decide(at(5), None, NEW, "a", &T),
            Decision::Acquire(LeaseRecord {
                holder: Some("a".into()),
                acquire_time: Some(at(5)),
                renew_time: Some(at(5)),
                lease_duration: T.lease_duration,
                transitions: 0,
            })
        );
    }

    #[test]
    fn another_holders_live_lease_is_followed_until_seen_unchanged_for_its_duration() {
        let record = held_by("b", 100, 3);
        assert_eq!(
            decide(at(114), Some(&record), secs(14), "a", &T),
            Decision::Follow {
                holder: "b".into(),
                free_in: secs(1)
            }
        );
        // At the lapse it is free, and taking it counts a transition.
        let Decision::Acquire(mine) = decide(at(115), Some(&record), secs(15), "a", &T) else {
            panic!("an expired lease is free");
        };
        assert_eq!(mine.holder.as_deref(), Some("a"));
        assert_eq!(mine.transitions, 4);
        assert_eq!(mine.acquire_time, Some(at(115)));
        assert_eq!(mine.renew_time, Some(at(115)));
    }

    #[test]
    fn the_wall_clocks_never_decide_whether_a_lease_lapsed() {
        // Our clock far ahead of the holder's: its record just changed, so it holds.
        let record = held_by("b", 100, 0);
        assert_eq!(
            decide(at(1_000), Some(&record), NEW, "a", &T),
            Decision::Follow {
                holder: "b".into(),
                free_in: T.lease_duration
            }
        );
        // Our clock far behind: a record unchanged for the duration is free all the same.
        assert!(matches!(
            decide(at(10), Some(&record), secs(15), "a", &T),
            Decision::Acquire(_)
        ));
    }

    #[test]
    fn the_holders_own_duration_decides_when_it_lapses() {
        let mut record = held_by("b", 100, 0);
        record.lease_duration = secs(60);
        assert_eq!(
            decide(at(130), Some(&record), secs(30), "a", &T),
            Decision::Follow {
                holder: "b".into(),
                free_in: secs(30)
            }
        );
    }

    #[test]
    fn a_released_or_never_renewed_lease_is_free_at_once() {
        let mut released = held_by("b", 100, 1);
        released.holder = None;
        assert!(matches!(
            decide(at(101), Some(&released), NEW, "a", &T),
            Decision::Acquire(LeaseRecord { transitions: 2, .. })
        ));
        released.holder = Some(String::new());
        assert!(matches!(
            decide(at(101), Some(&released), NEW, "a", &T),
            Decision::Acquire(_)
        ));
        let mut unrenewed = held_by("b", 100, 1);
        unrenewed.renew_time = None;
        assert!(matches!(
            decide(at(101), Some(&unrenewed), NEW, "a", &T),
            Decision::Acquire(_)
        ));
    }

    #[test]
    fn the_holder_renews_keeping_its_acquire_time_and_count() {
        let record = held_by("a", 100, 7);
        assert_eq!(
            decide(at(102), Some(&record), secs(2), "a", &T),
            Decision::Renew(LeaseRecord {
                holder: Some("a".into()),
                acquire_time: Some(at(0)),
                renew_time: Some(at(102)),
                lease_duration: T.lease_duration,
                transitions: 7,
            })
        );
        // Even past its own lapse: nobody took it, so no transition.
        assert!(matches!(
            decide(at(500), Some(&record), secs(400), "a", &T),
            Decision::Renew(LeaseRecord { transitions: 7, .. })
        ));
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Option<String>>>);

    impl StateSink for Arc<Recorder> {
        fn set_source(&self, state: SourceState) {
            self.0.lock().unwrap().push(state.digest);
        }
    }

    fn state(digest: &str) -> SourceState {
        SourceState {
            digest: Some(digest.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_followers_source_is_held_then_delivered_latest_first() {
        let synced = prometheus::IntGauge::new("synced", "synced").unwrap();
        let warm = WarmSink::<Arc<Recorder>>::signalling(synced.clone());
        assert!(!warm.holds_state());
        assert_eq!(synced.get(), 0, "not ready before the first state");
        warm.set_source(state("one"));
        assert_eq!(synced.get(), 1, "ready once synced, while following");
        warm.set_source(state("two"));
        assert!(warm.holds_state());
        let hub = Arc::new(Recorder::default());
        warm.deliver_to(hub.clone());
        warm.set_source(state("three"));
        assert_eq!(
            *hub.0.lock().unwrap(),
            vec![Some("two".into()), Some("three".into())]
        );
    }
}
