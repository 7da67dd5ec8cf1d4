//! Leader election and the state ConfigMap against a scripted API server answering with real
//! Kubernetes JSON (`testdata/k8s/lease.json`): a Lease is created when absent, renewed with
//! the resourceVersion read, a 409 sends the writer back to read, a follower takes over once
//! the holder's record lapses, and a holder that cannot renew steps down before anyone may
//! take over; the leader labels its pod for the Services and unlabels the old leader's, and a
//! starting replica unlabels its own (`testdata/k8s/controller-pods.json`). Time is tokio's paused clock, so the takeover times are exact figures of the
//! protocol (the API answering at once), printed for the notes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::time::Instant;
use trellis_controller::leader::lease::KubeLease;
use trellis_controller::leader::pod_label::{self, LabelPatch, PodLabeler};
use trellis_controller::leader::{self, Elector, LostLeadership, Timings};
use trellis_controller::metrics::Metrics;
use trellis_controller::store::{ConfigMapStore, Persisted, STORE_VERSION, StateStore};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases/trellis-controller";
const CONFIG_MAP: &str = "/api/v1/namespaces/trellis-system/configmaps/trellis-controller-state";

/// The chart's defaults.
const TIMINGS: Timings = Timings {
    lease_duration: Duration::from_secs(15),
    renew_deadline: Duration::from_secs(10),
    retry_period: Duration::from_secs(2),
};

fn fixture(name: &str) -> Value {
    let path = format!("{}/testdata/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// Every request answered 500 (etcd unavailable).
    Failing,
    /// Requests never answered (a partition).
    Hanging,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    who: &'static str,
    method: Method,
    code: u16,
    /// When the replica sent it (before any scripted latency).
    sent: Instant,
}

/// A scripted API server holding one Lease (and the state ConfigMap) with a resourceVersion,
/// shared by every replica's client.
#[derive(Default)]
struct FakeApi {
    lease: Option<Value>,
    config_map: Option<Value>,
    rv: u64,
    out: std::collections::BTreeMap<&'static str, Outage>,
    /// Before the next write of this replica, someone else writes the Lease (holder named).
    intrude_before_write: Option<(&'static str, String)>,
    seen: Vec<Seen>,
    /// Requests outside the chart's RBAC (leases get/create/update, configmaps get/patch).
    forbidden: BTreeSet<String>,
    /// How long the server takes to answer this replica (a slow API server or link).
    latency: std::collections::BTreeMap<&'static str, Duration>,
}

type Shared = Arc<Mutex<FakeApi>>;

impl FakeApi {
    fn stamp(&mut self, mut lease: Value) -> Value {
        self.rv += 1;
        let template = fixture("lease.json");
        lease["metadata"] = template["metadata"].clone();
        lease["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        lease["apiVersion"] = template["apiVersion"].clone();
        lease["kind"] = template["kind"].clone();
        lease
    }

    fn intruder(&mut self, holder: &str) -> Value {
        let mut lease = fixture("lease.json");
        lease["spec"]["holderIdentity"] = json!(holder);
        lease["spec"]["renewTime"] = json!(
            k8s_openapi::jiff::Timestamp::try_from(SystemTime::now())
                .unwrap()
                .to_string()
        );
        self.stamp(lease)
    }

    fn answer(
        &mut self,
        who: &'static str,
        method: &Method,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> Response<Body> {
        if self.out.get(who) == Some(&Outage::Failing) {
            return respond(
                500,
                &status(500, "InternalError", "etcdserver: request timed out"),
            );
        }
        let writes = method == Method::POST || method == Method::PUT;
        if writes
            && let Some((target, holder)) = self.intrude_before_write.clone()
            && target == who
        {
            self.intrude_before_write = None;
            let lease = self.intruder(&holder);
            self.lease = Some(lease);
        }
        let lease_body = || -> Value {
            let v: Value = serde_json::from_slice(body).unwrap();
            // What the controller sends is a Lease Kubernetes accepts.
            let typed: k8s_openapi::api::coordination::v1::Lease =
                serde_json::from_value(v.clone()).expect("a Lease");
            assert_eq!(typed.metadata.name.as_deref(), Some("trellis-controller"));
            v
        };
        match (method.as_str(), path) {
            ("GET", LEASE) => match &self.lease {
                Some(lease) => respond(200, lease),
                None => respond(
                    404,
                    &status(
                        404,
                        "NotFound",
                        "leases.coordination.k8s.io \"trellis-controller\" not found",
                    ),
                ),
            },
            ("POST", LEASES) => {
                let body = lease_body();
                if self.lease.is_some() {
                    return respond(
                        409,
                        &status(
                            409,
                            "AlreadyExists",
                            "leases.coordination.k8s.io \"trellis-controller\" already exists",
                        ),
                    );
                }
                let lease = self.stamp(body);
                self.lease = Some(lease.clone());
                respond(201, &lease)
            }
            ("PUT", LEASE) => {
                let body = lease_body();
                let Some(current) = &self.lease else {
                    return respond(
                        404,
                        &status(
                            404,
                            "NotFound",
                            "leases.coordination.k8s.io \"trellis-controller\" not found",
                        ),
                    );
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return respond(
                        409,
                        &status(
                            409,
                            "Conflict",
                            "Operation cannot be fulfilled on leases.coordination.k8s.io \"trellis-controller\": the object has been modified; please apply your changes to the latest version and try again",
                        ),
                    );
                }
                let lease = self.stamp(body);
                self.lease = Some(lease.clone());
                respond(200, &lease)
            }
            ("GET", CONFIG_MAP) => match &self.config_map {
                Some(cm) => respond(200, cm),
                None => respond(
                    404,
                    &status(
                        404,
                        "NotFound",
                        "configmaps \"trellis-controller-state\" not found",
                    ),
                ),
            },
            ("PATCH", CONFIG_MAP) => {
                assert!(
                    query.contains("fieldManager=trellis-controller-state"),
                    "{query}"
                );
                assert!(query.contains("force=true"), "{query}");
                let mut cm: Value = serde_json::from_slice(body).unwrap();
                let _: k8s_openapi::api::core::v1::ConfigMap =
                    serde_json::from_value(cm.clone()).expect("a ConfigMap");
                self.rv += 1;
                cm["metadata"]["namespace"] = json!("trellis-system");
                cm["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                self.config_map = Some(cm.clone());
                respond(200, &cm)
            }
            _ => {
                self.forbidden.insert(format!("{method} {path}"));
                respond(403, &status(403, "Forbidden", "forbidden"))
            }
        }
    }
}

/// A client of replica `who` to the shared server.
fn client(api: &Shared, who: &'static str) -> kube::Client {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = api.clone();
    tokio::spawn(async move {
        // Unanswered requests of a partitioned replica are kept here, never answered.
        let mut hanging = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let sent = Instant::now();
            let latency = api.lock().unwrap().latency.get(who).copied();
            if let Some(latency) = latency {
                tokio::time::sleep(latency).await;
            }
            let mut api = api.lock().unwrap();
            let (path, query) = (
                parts.uri.path().to_owned(),
                parts.uri.query().unwrap_or("").to_owned(),
            );
            if api.out.get(who) == Some(&Outage::Hanging) {
                api.seen.push(Seen {
                    who,
                    method: parts.method.clone(),
                    code: 0,
                    sent,
                });
                hanging.push(send);
                continue;
            }
            let response = api.answer(who, &parts.method, &path, &query, &bytes);
            let code = response.status().as_u16();
            api.seen.push(Seen {
                who,
                method: parts.method.clone(),
                code,
                sent,
            });
            send.send_response(response);
        }
    });
    kube::Client::new(svc, "default")
}

/// A wall clock that moves with tokio's paused one.
fn clock() -> trellis_controller::leader::Clock {
    let (wall, start) = (SystemTime::now(), Instant::now());
    Arc::new(move || wall + start.elapsed())
}

fn elector(api: &Shared, who: &'static str) -> (Elector<KubeLease>, Metrics) {
    skewed_elector(api, who, Duration::ZERO)
}

/// A replica whose wall clock runs `ahead` of the others'.
fn skewed_elector(
    api: &Shared,
    who: &'static str,
    ahead: Duration,
) -> (Elector<KubeLease>, Metrics) {
    let metrics = Metrics::new().unwrap();
    let backend = KubeLease::new(client(api, who), "trellis-system", "trellis-controller");
    let wall = clock();
    let skewed: trellis_controller::leader::Clock = Arc::new(move || wall() + ahead);
    (
        Elector::with_clock(backend, who.into(), TIMINGS, metrics.clone(), skewed),
        metrics,
    )
}

fn holder(api: &Shared) -> Option<String> {
    let api = api.lock().unwrap();
    api.lease.as_ref()?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

fn lease_spec(api: &Shared) -> Value {
    api.lock().unwrap().lease.as_ref().unwrap()["spec"].clone()
}

#[tokio::test(start_paused = true)]
async fn the_first_replica_creates_the_lease_renews_it_and_the_second_follows() {
    let api = Shared::default();
    let (mut a, a_metrics) = elector(&api, "a");
    a.acquire().await;
    assert_eq!(holder(&api).as_deref(), Some("a"));
    let spec = lease_spec(&api);
    assert_eq!(spec["leaseDurationSeconds"], 15);
    assert_eq!(spec["leaseTransitions"], 0);
    assert_eq!(a_metrics.leader.get(), 1);
    let created_renew = spec["renewTime"].clone();

    let (mut b, b_metrics) = elector(&api, "b");
    let holding = tokio::spawn(async move { a.hold().await });
    // A minute of following: the holder renews all along, so b never leads.
    let followed = tokio::time::timeout(Duration::from_secs(60), b.acquire()).await;
    assert!(followed.is_err(), "b took a lease a kept renewing");
    assert_eq!(b_metrics.leader.get(), 0);
    assert_eq!(holder(&api).as_deref(), Some("a"));
    assert_ne!(lease_spec(&api)["renewTime"], created_renew);
    let api_seen = api.lock().unwrap().seen.clone();
    let renewals: Vec<&Seen> = api_seen
        .iter()
        .filter(|s| s.who == "a" && s.method == Method::PUT)
        .collect();
    // Every retry period, each with the resourceVersion of the last write (never a 409).
    assert!(
        (28..=31).contains(&renewals.len()),
        "{} renewals",
        renewals.len()
    );
    assert!(renewals.iter().all(|s| s.code == 200), "{renewals:?}");
    assert!(
        api_seen
            .iter()
            .filter(|s| s.who == "b")
            .all(|s| s.method == Method::GET)
    );
    assert!(api.lock().unwrap().forbidden.is_empty());
    holding.abort();
}

#[tokio::test(start_paused = true)]
async fn a_follower_whose_clock_runs_ahead_never_takes_a_lease_still_renewed() {
    // 30 s ahead: the holder's renewals all look older than the lease duration by b's wall
    // clock. Only how long b saw the record unchanged (b's own monotonic clock) counts.
    let api = Shared::default();
    let (mut a, _) = elector(&api, "a");
    a.acquire().await;
    let (mut b, b_metrics) = skewed_elector(&api, "b", Duration::from_secs(30));
    let holding = tokio::spawn(async move { a.hold().await });
    let followed = tokio::time::timeout(Duration::from_secs(60), b.acquire()).await;
    assert!(followed.is_err(), "b took a lease a kept renewing");
    assert_eq!(b_metrics.leader.get(), 0);
    assert_eq!(holder(&api).as_deref(), Some("a"));
    assert!(!holding.is_finished(), "a lost the lease it kept renewing");

    // Once a stops renewing, b takes over a lease duration after it last saw the record
    // change (at most a retry period after the last renewal), by b's own clock.
    holding.abort();
    let killed = Instant::now();
    b.acquire().await;
    let took = Instant::now() - killed;
    assert!(
        took <= TIMINGS.lease_duration + TIMINGS.retry_period,
        "took {took:?}"
    );
    assert!(
        took + TIMINGS.retry_period >= TIMINGS.lease_duration,
        "took {took:?}: before the record lapsed"
    );
    assert_eq!(holder(&api).as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn a_slow_write_does_not_extend_the_leaders_own_view_of_its_lease() {
    // Every answer takes 3 s: the renewal's record is dated when it was sent, so the holder
    // counts its renew deadline from then, not from when the answer came.
    let api = Shared::default();
    api.lock()
        .unwrap()
        .latency
        .insert("a", Duration::from_secs(3));
    let (mut a, a_metrics) = elector(&api, "a");
    a.acquire().await;
    let holding = tokio::spawn(async move {
        let lost = a.hold().await;
        (lost, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    api.lock().unwrap().out.insert("a", Outage::Hanging);
    let (lost, stepped_down) = holding.await.unwrap();
    assert_eq!(lost, LostLeadership::DeadlinePassed(TIMINGS.renew_deadline));
    assert_eq!(a_metrics.leader.get(), 0);
    let last_write_sent = api
        .lock()
        .unwrap()
        .seen
        .iter()
        .filter(|s| s.who == "a" && s.method != Method::GET && (200..300).contains(&s.code))
        .map(|s| s.sent)
        .max()
        .unwrap();
    assert!(
        stepped_down - last_write_sent <= TIMINGS.renew_deadline + Duration::from_millis(10),
        "stepped down {:?} after sending its last renewal",
        stepped_down - last_write_sent
    );
}

#[tokio::test(start_paused = true)]
async fn the_leader_renews_while_it_sets_up_and_its_work_stops_when_the_lease_is_lost() {
    let api = Shared::default();
    let (mut a, a_metrics) = elector(&api, "a");
    a.acquire().await;
    let (mut b, _) = elector(&api, "b");
    let following = tokio::spawn(async move {
        b.acquire().await;
        Instant::now()
    });
    // A setup three lease durations long (a slow state read, certificates, listeners): the
    // lease is renewed all along, so nobody else leads meanwhile.
    let setup = async {
        tokio::time::sleep(3 * TIMINGS.lease_duration).await;
        "set up"
    };
    assert_eq!(leader::while_leading(&mut a, setup).await, Ok("set up"));
    assert!(!following.is_finished(), "b led while a was setting up");
    assert_eq!(holder(&api).as_deref(), Some("a"));
    assert_eq!(a_metrics.leader.get(), 1);

    // Serving, when the API stops answering a: its work is dropped (listeners closed,
    // writers stopped) the moment it steps down, before b may lead.
    struct Stopped(Arc<Mutex<Option<Instant>>>);
    impl Drop for Stopped {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(Instant::now());
        }
    }
    let stopped = Arc::new(Mutex::new(None));
    let guard = Stopped(stopped.clone());
    let serving = async move {
        let _guard = guard;
        std::future::pending::<()>().await
    };
    let outage = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        api.lock().unwrap().out.insert("a", Outage::Failing);
    };
    let (lost, ()) = tokio::join!(leader::while_leading(&mut a, serving), outage);
    assert_eq!(
        lost,
        Err(LostLeadership::DeadlinePassed(TIMINGS.renew_deadline))
    );
    let stopped = stopped.lock().unwrap().expect("the work was dropped");
    assert_eq!(a_metrics.leader.get(), 0);
    let led = following.await.unwrap();
    assert!(led > stopped, "b led before a's work stopped");
    assert_eq!(holder(&api).as_deref(), Some("b"));
}

/// Kills the holder `after` it led, returns how long until the follower led.
async fn takeover_after_kill(after: Duration) -> (Duration, Metrics) {
    let api = Shared::default();
    let (mut a, _) = elector(&api, "a");
    a.acquire().await;
    let (mut b, b_metrics) = elector(&api, "b");
    let holding = tokio::spawn(async move { a.hold().await });
    let following = tokio::spawn(async move {
        b.acquire().await;
        Instant::now()
    });
    tokio::time::sleep(after).await;
    // As SIGKILL would: no release, no last renewal.
    holding.abort();
    let killed = Instant::now();
    let led = following.await.unwrap();
    assert_eq!(holder(&api).as_deref(), Some("b"));
    assert_eq!(lease_spec(&api)["leaseTransitions"], 1);
    (led - killed, b_metrics)
}

#[tokio::test(start_paused = true)]
async fn a_killed_leader_is_replaced_within_the_lease_duration() {
    let mut takeovers = Vec::new();
    // Kills at different points of the renewal period.
    for millis in [7_000, 7_500, 8_300, 8_999, 9_001, 12_700] {
        let (took, b_metrics) = takeover_after_kill(Duration::from_millis(millis)).await;
        assert!(
            took <= TIMINGS.lease_duration,
            "took {took:?} after a kill at {millis} ms"
        );
        // The record lapses a lease duration after the last renewal, at most a retry
        // period before the kill.
        assert!(
            took + TIMINGS.retry_period >= TIMINGS.lease_duration,
            "took {took:?}: before the record lapsed"
        );
        assert_eq!(b_metrics.leader.get(), 1);
        assert_eq!(b_metrics.leadership_transitions.get(), 1);
        takeovers.push(took);
    }
    takeovers.sort();
    let median = takeovers[takeovers.len() / 2];
    println!(
        "failover (scripted API, lease 15 s / renew 10 s / retry 2 s): median {median:?}, \
         min {:?}, max {:?}",
        takeovers[0],
        takeovers[takeovers.len() - 1]
    );
}

#[tokio::test(start_paused = true)]
async fn a_conflicting_write_sends_the_writer_back_to_read() {
    // Creating: someone else created the Lease between our read and our create.
    let api = Shared::default();
    api.lock().unwrap().intrude_before_write = Some(("a", "c".into()));
    let (mut a, a_metrics) = elector(&api, "a");
    let taken = tokio::time::timeout(Duration::from_secs(5), a.acquire()).await;
    assert!(taken.is_err(), "a led while c held a fresh lease");
    assert_eq!(holder(&api).as_deref(), Some("c"));
    assert_eq!(a_metrics.leader.get(), 0);
    let codes: Vec<(Method, u16)> = api
        .lock()
        .unwrap()
        .seen
        .iter()
        .map(|s| (s.method.clone(), s.code))
        .collect();
    assert_eq!(
        codes[..3],
        [(Method::GET, 404), (Method::POST, 409), (Method::GET, 200)]
    );

    // Renewing: another replica took the Lease over (a's renewal had stalled): the 409 makes
    // the holder read, see the new holder and stop leading.
    let api = Shared::default();
    let (mut a, a_metrics) = elector(&api, "a");
    a.acquire().await;
    api.lock().unwrap().intrude_before_write = Some(("a", "b".into()));
    let lost = tokio::time::timeout(Duration::from_secs(5), a.hold())
        .await
        .expect("a stops leading at once");
    assert_eq!(lost, LostLeadership::OtherHolder("b".into()));
    assert_eq!(a_metrics.leader.get(), 0);
    assert!(
        api.lock()
            .unwrap()
            .seen
            .iter()
            .any(|s| s.method == Method::PUT && s.code == 409)
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_steps_down_before_anyone_takes_over() {
    for outage in [Outage::Failing, Outage::Hanging] {
        let api = Shared::default();
        let (mut a, a_metrics) = elector(&api, "a");
        a.acquire().await;
        let (mut b, _) = elector(&api, "b");
        let following = tokio::spawn(async move {
            b.acquire().await;
            Instant::now()
        });
        let holding = tokio::spawn(async move {
            let lost = a.hold().await;
            (lost, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(4_100)).await;
        // Renewals at 2 s and 4 s went through; from now on a cannot reach the API.
        let last_renewal = Instant::now() - Duration::from_millis(100);
        api.lock().unwrap().out.insert("a", outage);
        let (lost, stepped_down) = holding.await.unwrap();
        assert_eq!(
            lost,
            LostLeadership::DeadlinePassed(TIMINGS.renew_deadline),
            "{outage:?}"
        );
        assert_eq!(a_metrics.leader.get(), 0);
        let led = following.await.unwrap();
        assert!(
            stepped_down - last_renewal <= TIMINGS.renew_deadline + Duration::from_millis(10),
            "{outage:?}: stepped down {:?} after the last renewal",
            stepped_down - last_renewal
        );
        // Never two leaders: b leads only after a stopped, once the record lapsed.
        assert!(
            led > stepped_down,
            "{outage:?}: b led {:?} after the last renewal, a stepped down {:?} after",
            led - last_renewal,
            stepped_down - last_renewal
        );
        assert!(led - last_renewal >= TIMINGS.lease_duration, "{outage:?}");
        assert_eq!(holder(&api).as_deref(), Some("b"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_the_followers_next_look() {
    let api = Shared::default();
    let (mut a, _) = elector(&api, "a");
    a.acquire().await;
    let (mut b, _) = elector(&api, "b");
    let following = tokio::spawn(async move {
        b.acquire().await;
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = Instant::now();
    a.release().await;
    let led = following.await.unwrap();
    assert!(
        led - released <= TIMINGS.retry_period,
        "{:?}",
        led - released
    );
    assert_eq!(lease_spec(&api)["leaseTransitions"], 1);
}

fn persisted(nodes: usize) -> Persisted {
    let mut local = trellis_core::cluster::fixture::cluster("a", "10.1.0.0/24", "10.96.0.0/16");
    let node = local.nodes.values().next().unwrap().clone();
    for i in 0..nodes {
        let mut n = node.clone();
        n.name = format!("node-with-a-long-name-{i:06}");
        local.nodes.insert(n.name.clone(), n);
    }
    Persisted {
        version: STORE_VERSION,
        local,
        registrations: vec![],
        remotes: vec![trellis_core::cluster::fixture::cluster(
            "b",
            "10.2.0.0/24",
            "10.97.0.0/16",
        )],
        node_encryption: true,
        certificate_allowances: Default::default(),
    }
}

#[tokio::test]
async fn the_state_configmap_round_trips_and_keeps_the_previous_state_when_too_large() {
    let api = Shared::default();
    let store = ConfigMapStore::with_limit(
        client(&api, "a"),
        "trellis-system",
        "trellis-controller-state",
        64 * 1024,
    );
    assert_eq!(store.load().await.unwrap(), None);
    let small = persisted(0);
    store.save(&small).await.unwrap();
    assert_eq!(store.load().await.unwrap(), Some(small.clone()));
    let cm = api.lock().unwrap().config_map.clone().unwrap();
    assert!(cm["data"]["state.json"].as_str().unwrap().starts_with('{'));

    // Too large for the bound: refused without a request, the previous state kept.
    let requests = api.lock().unwrap().seen.len();
    let large = persisted(2_000);
    let err = store.save(&large).await.unwrap_err();
    assert!(
        matches!(
            err,
            trellis_controller::Error::StoreTooLarge { limit: 65536, .. }
        ),
        "{err}"
    );
    assert_eq!(api.lock().unwrap().seen.len(), requests);
    assert_eq!(store.load().await.unwrap(), Some(small));

    // A state of another format version is refused, not misread.
    api.lock().unwrap().config_map.as_mut().unwrap()["data"]["state.json"] =
        json!(serde_json::to_string(&json!({"version": 99})).unwrap());
    assert!(store.load().await.is_err());
    assert!(api.lock().unwrap().forbidden.is_empty());
}

/// The default bound fits a large cluster's state: 1,000 nodes.
#[test]
fn a_thousand_nodes_fit_the_configmap_bound() {
    let bytes = serde_json::to_vec(&persisted(1_000)).unwrap().len();
    assert!(
        bytes < trellis_controller::store::CONFIG_MAP_MAX_BYTES,
        "{bytes} bytes"
    );
}

// The leader pod label, against a scripted API holding the chart's two controller pods
// (`testdata/k8s/controller-pods.json`, the first labelled as the old leader's).

const PODS: &str = "/api/v1/namespaces/trellis-system/pods";
const OLD_LEADER: &str = "trellis-controller-6c9f7b5d48-2xkqp";
const NEW_LEADER: &str = "trellis-controller-6c9f7b5d48-9wz4m";
/// The chart's controller selector labels (leaderElection.podSelector).
const CONTROLLER_PODS: &str = "app.kubernetes.io/name=trellis,app.kubernetes.io/instance=trellis,app.kubernetes.io/component=controller";

/// A scripted pod API: lists by the chart's selector, applies JSON merge patches of labels.
#[derive(Default)]
struct PodApi {
    pods: Vec<Value>,
    /// Answer the next this many requests 500.
    failing: usize,
    /// Each request: method, path and query, and the patch body.
    seen: Vec<(String, String, Option<Value>)>,
}

impl PodApi {
    fn with_chart_pods() -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            pods: fixture("controller-pods.json")["items"]
                .as_array()
                .unwrap()
                .clone(),
            ..Self::default()
        }))
    }

    fn leader_label(&self, pod: &str) -> Option<String> {
        let pod = self
            .pods
            .iter()
            .find(|p| p["metadata"]["name"] == pod)
            .unwrap();
        pod["metadata"]["labels"]["trellis.dev/controller-leader"]
            .as_str()
            .map(str::to_owned)
    }

    fn patches(&self) -> Vec<(String, Value)> {
        self.seen
            .iter()
            .filter(|(method, ..)| method == "PATCH")
            .map(|(_, path, body)| (path.clone(), body.clone().unwrap()))
            .collect()
    }

    fn answer(&mut self, req: &http::request::Parts, body: &[u8]) -> Response<Body> {
        let path = req.uri.path().to_owned();
        let query = req.uri.query().unwrap_or("").to_owned();
        let patch = (!body.is_empty()).then(|| serde_json::from_slice::<Value>(body).unwrap());
        self.seen.push((
            req.method.to_string(),
            format!("{path}?{query}"),
            patch.clone(),
        ));
        if self.failing > 0 {
            self.failing -= 1;
            return respond(
                500,
                &status(500, "InternalError", "etcdserver: request timed out"),
            );
        }
        match (req.method.as_str(), path.strip_prefix(PODS)) {
            ("GET", Some("")) => {
                let selector: String = url_decode(
                    query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("labelSelector="))
                        .unwrap_or(""),
                );
                let selected: Vec<Value> = self
                    .pods
                    .iter()
                    .filter(|pod| {
                        selector.split(',').all(|term| {
                            let (k, v) = term.split_once('=').unwrap();
                            pod["metadata"]["labels"][k] == v
                        })
                    })
                    .cloned()
                    .collect();
                let mut list = fixture("controller-pods.json");
                list["items"] = json!(selected);
                respond(200, &list)
            }
            ("PATCH", Some(name)) => {
                let name = name.trim_start_matches('/');
                assert_eq!(
                    req.headers["content-type"], "application/merge-patch+json",
                    "a JSON merge patch"
                );
                let Some(pod) = self.pods.iter_mut().find(|p| p["metadata"]["name"] == name) else {
                    return respond(
                        404,
                        &status(404, "NotFound", &format!("pods \"{name}\" not found")),
                    );
                };
                // RFC 7386 on the labels, the only field the controller may touch.
                let patch = patch.unwrap();
                assert_eq!(
                    patch.as_object().unwrap().keys().collect::<Vec<_>>(),
                    ["metadata"]
                );
                for (key, value) in patch["metadata"]["labels"].as_object().unwrap() {
                    let labels = pod["metadata"]["labels"].as_object_mut().unwrap();
                    if value.is_null() {
                        labels.remove(key);
                    } else {
                        labels.insert(key.clone(), value.clone());
                    }
                }
                respond(200, pod)
            }
            _ => respond(403, &status(403, "Forbidden", "forbidden")),
        }
    }
}

fn url_decode(s: &str) -> String {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn pod_client(api: &Arc<Mutex<PodApi>>) -> kube::Client {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = api.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let response = api.lock().unwrap().answer(&parts, &bytes);
            send.send_response(response);
        }
    });
    kube::Client::new(svc, "default")
}

fn labeler(api: &Arc<Mutex<PodApi>>, me: &str) -> PodLabeler {
    PodLabeler::new(pod_client(api), "trellis-system", CONTROLLER_PODS, me)
}

#[tokio::test]
async fn a_new_leader_labels_its_pod_and_unlabels_the_old_leaders() {
    let api = PodApi::with_chart_pods();
    let patches = labeler(&api, NEW_LEADER).label_leader().await.unwrap();
    assert_eq!(
        patches,
        vec![
            LabelPatch {
                pod: OLD_LEADER.into(),
                leader: false
            },
            LabelPatch {
                pod: NEW_LEADER.into(),
                leader: true
            },
        ]
    );
    let api = api.lock().unwrap();
    assert_eq!(api.leader_label(NEW_LEADER).as_deref(), Some("true"));
    assert_eq!(
        api.leader_label(OLD_LEADER),
        None,
        "the old leader's label is gone"
    );
    // Listed by the chart's selector, the old leader unlabelled before the new one labelled
    // (for a moment no pod leads, never two); the other labels left alone.
    assert!(
        url_decode(&api.seen[0].1).contains(&format!("labelSelector={CONTROLLER_PODS}")),
        "{:?}",
        api.seen[0]
    );
    assert_eq!(
        api.patches(),
        vec![
            (
                format!("{PODS}/{OLD_LEADER}?"),
                json!({"metadata": {"labels": {"trellis.dev/controller-leader": null}}})
            ),
            (
                format!("{PODS}/{NEW_LEADER}?"),
                json!({"metadata": {"labels": {"trellis.dev/controller-leader": "true"}}})
            ),
        ]
    );
    let old = api
        .pods
        .iter()
        .find(|p| p["metadata"]["name"] == OLD_LEADER)
        .unwrap();
    assert_eq!(
        old["metadata"]["labels"]["app.kubernetes.io/component"],
        "controller"
    );
}

#[tokio::test]
async fn a_leader_already_labelled_alone_patches_nothing() {
    let api = PodApi::with_chart_pods();
    let patches = labeler(&api, OLD_LEADER).label_leader().await.unwrap();
    assert_eq!(patches, vec![]);
    assert!(api.lock().unwrap().patches().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_starting_replica_unlabels_its_pod_retrying_failures_then_labels_it_once_leading() {
    let api = PodApi::with_chart_pods();
    // The old leader's container restarted: its pod still carries the label. The API
    // fails twice first.
    api.lock().unwrap().failing = 2;
    let metrics = Metrics::new().unwrap();
    let (leading, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(pod_label::run(
        labeler(&api, OLD_LEADER),
        rx,
        TIMINGS.retry_period,
        Duration::from_secs(10),
        metrics.clone(),
    ));
    let started = Instant::now();
    while api.lock().unwrap().leader_label(OLD_LEADER).is_some() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never unlabelled"
        );
    }
    // Two failures, each retried a retry period later: counted, never fatal.
    assert_eq!(metrics.leader_label_failures.get(), 2);
    assert!(started.elapsed() >= 2 * TIMINGS.retry_period);
    {
        let api = api.lock().unwrap();
        // A follower only touches its own pod: no list, no other pod.
        assert!(api.seen.iter().all(|(method, path, _)| method == "PATCH"
            && path.starts_with(&format!("{PODS}/{OLD_LEADER}"))));
        assert_eq!(api.seen.len(), 3);
    }

    // It leads now (the other replica's pod, unlabelled, is left so).
    leading.send(true).unwrap();
    let started = Instant::now();
    while api.lock().unwrap().leader_label(OLD_LEADER).as_deref() != Some("true") {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never labelled"
        );
    }
    assert_eq!(api.lock().unwrap().leader_label(NEW_LEADER), None);

    // Someone labels the other pod by hand: the leader's next check takes it off.
    {
        let mut api = api.lock().unwrap();
        let other = api
            .pods
            .iter_mut()
            .find(|p| p["metadata"]["name"] == NEW_LEADER)
            .unwrap();
        other["metadata"]["labels"]["trellis.dev/controller-leader"] = json!("true");
    }
    tokio::time::sleep(pod_label::RECHECK + Duration::from_secs(1)).await;
    assert_eq!(api.lock().unwrap().leader_label(NEW_LEADER), None);
    assert_eq!(metrics.leader_label_failures.get(), 2);
    drop(leading);
    task.await.unwrap();
}

#[tokio::test]
async fn unlabelling_a_pod_already_gone_succeeds() {
    let api = PodApi::with_chart_pods();
    labeler(&api, "trellis-controller-6c9f7b5d48-gone1")
        .unlabel_self()
        .await
        .unwrap();
}
