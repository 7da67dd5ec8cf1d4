//! NetworkPolicy on the node: the controller's [`PolicyInputs`] compiled into the node's
//! [`Ruleset`] and kept in the kernel's `inet trellis_policy` table
//! ([`trellis_core::policy::nft`] renders it).
//!
//! [`Enforcer`] decides what to do, with the side effects behind two seams: the compiler
//! ([`PolicyCompiler`]) and the kernel ([`PolicyKernel`], `nft` in production). It keeps the
//! ruleset the kernel holds, and changes the table by the difference from it (one
//! transaction); the first time (the table may be a previous process's) and after any failure
//! it replaces the table whole (one transaction too). A failed transaction leaves the kernel's
//! table as it was, so a failure never opens the table half-changed: the old rules stay
//! enforced until the next attempt succeeds.
//!
//! The table outlives the process: nothing here deletes it on shutdown, and nothing touches it
//! at start before a ruleset is known (restored from the last plan, or from the controller),
//! so a restarted agent leaves the previous rules in force until it replaces them atomically.

pub mod kernel;

use std::collections::BTreeMap;
use std::time::Instant;

use trellis_core::policy::nft::{self, ExistingTable, RenderError, RenderOptions};
use trellis_core::policy::ruleset::Ruleset;
use trellis_core::policy::{Compiler, PolicyInputs};

pub use kernel::NftKernel;

use crate::nft::NftError;

/// The policy one node enforces: the inputs, and the node they are compiled for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodePolicy {
    pub node: String,
    pub inputs: PolicyInputs,
}

/// Makes a node's ruleset from the inputs.
pub trait PolicyCompiler: Send {
    fn ruleset(&mut self, inputs: &PolicyInputs, node: &str) -> Ruleset;
}

/// [`trellis_core::policy::Compiler`], kept between applies: a change costs what it touches
/// (a full compilation takes about half a second at 1,000 pods and 1,000 policies; a policy
/// change through the compiler under a millisecond, see docs/benchmarks.md).
#[derive(Default)]
pub struct IncrementalCompiler {
    compiler: Option<(String, Compiler)>,
}

impl PolicyCompiler for IncrementalCompiler {
    fn ruleset(&mut self, inputs: &PolicyInputs, node: &str) -> Ruleset {
        let compiler = match &mut self.compiler {
            Some((for_node, compiler))
                if for_node == node && compiler.inputs().cluster == inputs.cluster =>
            {
                compiler
            }
            slot => {
                &mut slot
                    .insert((node.to_owned(), Compiler::new(inputs.cluster.clone(), node)))
                    .1
            }
        };
        compiler.update(&without_unknown_identities(inputs)).clone()
    }
}

/// `inputs` less the pods whose identity it does not hold. Such a pod is selected by no
/// policy, so compiled as it is it would be known and open; left out, it is an unknown pod
/// and dropped, until its identity arrives. (A controller sends both together; this is the
/// node not trusting that.)
fn without_unknown_identities(inputs: &PolicyInputs) -> std::borrow::Cow<'_, PolicyInputs> {
    let known = |e: &trellis_core::policy::PolicyEndpoint| {
        inputs.identities.contains_key(&e.identity_key())
    };
    if inputs.endpoints.values().all(known) {
        return std::borrow::Cow::Borrowed(inputs);
    }
    let mut kept = inputs.clone();
    kept.endpoints.retain(|_, e| known(e));
    std::borrow::Cow::Owned(kept)
}

/// The kernel's side: run a script as one transaction, read the named counters.
pub trait PolicyKernel: Send {
    fn apply(&mut self, script: &str) -> Result<(), NftError>;
    /// Packet counts of the table's named counters.
    fn counters(&mut self) -> Result<BTreeMap<String, u64>, NftError>;
    /// What the table holds by name; `None` when there is none.
    fn existing(&mut self) -> Result<Option<ExistingTable>, NftError>;
}

/// Why the desired policy is not (yet) what the kernel enforces.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the node's ruleset breaks its contract")]
    Render(#[from] RenderError),
    #[error("apply the policy table")]
    Kernel(#[from] NftError),
}

/// What is in the kernel because this process put it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InKernel {
    /// Nothing applied yet since start: the table, if any, is a previous process's.
    Unknown,
    /// The table is gone (enforcement off).
    Disabled,
    /// This ruleset, compiled from inputs with this digest.
    Enforced(Applied),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub node: String,
    /// The desired state's revision the policy came with (the latest with these inputs).
    pub revision: u64,
    /// [`PolicyInputs::digest`] of the inputs.
    pub digest: String,
    pub ruleset: Ruleset,
}

/// What one [`Enforcer::enforce`] did to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to change.
    Unchanged,
    /// The table replaced whole.
    Replaced,
    /// Only the difference applied.
    Updated,
    /// The table removed.
    Deleted,
}

/// The result of an apply, for metrics: what was done and how long the kernel took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub action: Action,
    pub seconds: f64,
}

/// Keeps the kernel's table equal to the desired policy.
pub struct Enforcer {
    compiler: Box<dyn PolicyCompiler>,
    kernel: Box<dyn PolicyKernel>,
    in_kernel: InKernel,
    /// The last apply failed: the next replaces the table whole, whatever the kernel holds.
    failed: bool,
    /// How the table is to be rendered from the next apply on.
    options: RenderOptions,
    /// How the table this process last put in the kernel was rendered.
    rendered_with: RenderOptions,
}

impl Enforcer {
    pub fn new(compiler: Box<dyn PolicyCompiler>, kernel: Box<dyn PolicyKernel>) -> Self {
        Self {
            compiler,
            kernel,
            in_kernel: InKernel::Unknown,
            failed: false,
            options: RenderOptions::default(),
            rendered_with: RenderOptions::default(),
        }
    }

    /// Whether the table logs its drops to NFLOG (for flows), from the next
    /// [`Self::enforce`] on.
    pub fn log_drops(mut self, on: bool) -> Self {
        self.set_log_drops(on);
        self
    }

    /// [`Self::log_drops`] on a running enforcer: the next [`Self::enforce`] refills the
    /// table when the setting changed (the fixed rules change, which an update cannot).
    pub fn set_log_drops(&mut self, on: bool) {
        self.options.log_drops = on;
    }

    pub fn in_kernel(&self) -> &InKernel {
        &self.in_kernel
    }

    /// Whether the desired policy (at the last call) is in the kernel: with enforcement on,
    /// whether a ruleset of this process is. Readiness waits on it.
    pub fn settled(&self) -> bool {
        !self.failed && self.in_kernel != InKernel::Unknown
    }

    /// Brings the kernel's table to `policy` (`None`: no table). Idempotent; after a failure
    /// the next call replaces the table whole.
    pub fn enforce(
        &mut self,
        revision: u64,
        policy: Option<&NodePolicy>,
    ) -> Result<Outcome, PolicyError> {
        let Some(NodePolicy { node, inputs }) = policy else {
            if self.in_kernel == InKernel::Disabled && !self.failed {
                return Ok(unchanged());
            }
            return self.run(&nft::render_delete(), Action::Deleted, |_| {
                InKernel::Disabled
            });
        };
        let digest = inputs.digest();
        if !self.failed
            && let InKernel::Enforced(applied) = &mut self.in_kernel
            && applied.digest == digest
            && applied.node == *node
            && self.rendered_with == self.options
        {
            applied.revision = revision;
            return Ok(unchanged());
        }
        let ruleset = self.compiler.ruleset(inputs, node);
        let applied = Applied {
            node: node.clone(),
            revision,
            digest,
            ruleset,
        };
        if let (InKernel::Enforced(before), false) = (&self.in_kernel, self.failed)
            && self.rendered_with == self.options
        {
            return match nft::render_update_with(&before.ruleset, &applied.ruleset, self.options) {
                Ok(Some(script)) => self.run(&script, Action::Updated, move |_| {
                    InKernel::Enforced(applied)
                }),
                Ok(None) => {
                    self.in_kernel = InKernel::Enforced(applied);
                    Ok(unchanged())
                }
                Err(e) => Err(self.fail(e.into())),
            };
        }
        self.replace(applied)
    }

    /// Makes the table hold `applied`'s ruleset whatever it holds now: emptied and filled in
    /// one transaction when it is there ([`nft::render_replace`]); created (or, if that was
    /// refused, deleted and created) otherwise.
    fn replace(&mut self, applied: Applied) -> Result<Outcome, PolicyError> {
        let full = match nft::render_full_with(&applied.ruleset, self.options) {
            Ok(script) => script,
            Err(e) => return Err(self.fail(e.into())),
        };
        let existing = match self.kernel.existing() {
            Ok(existing) => existing,
            Err(e) => {
                tracing::warn!(
                    "read the policy table (replacing it whole instead): {}",
                    crate::chain(&e)
                );
                None
            }
        };
        if let Some(existing) = existing {
            let script = match nft::render_replace_with(&existing, &applied.ruleset, self.options) {
                Ok(script) => script,
                Err(e) => return Err(self.fail(e.into())),
            };
            match self.run(&script, Action::Replaced, |_| {
                InKernel::Enforced(applied.clone())
            }) {
                Ok(outcome) => return Ok(outcome),
                Err(e) => tracing::warn!(
                    "refill the policy table (deleting and creating it instead): {}",
                    crate::chain(&e)
                ),
            }
        }
        self.run(&full, Action::Replaced, move |_| {
            InKernel::Enforced(applied)
        })
    }

    fn run(
        &mut self,
        script: &str,
        action: Action,
        then: impl FnOnce(&InKernel) -> InKernel,
    ) -> Result<Outcome, PolicyError> {
        let started = Instant::now();
        match self.kernel.apply(script) {
            Ok(()) => {
                self.in_kernel = then(&self.in_kernel);
                self.rendered_with = self.options;
                self.failed = false;
                Ok(Outcome {
                    action,
                    seconds: started.elapsed().as_secs_f64(),
                })
            }
            Err(e) => Err(self.fail(e.into())),
        }
    }

    /// After a failure the kernel still holds what it held (transactions are atomic), but the
    /// next attempt replaces the table whole rather than trusting the difference.
    fn fail(&mut self, error: PolicyError) -> PolicyError {
        self.failed = true;
        error
    }

    /// The table's drop counters: (ingress, egress, unknown pod). Zero when there is no table.
    /// A table found gone (someone deleted it) is replaced whole by the next
    /// [`Self::enforce`] (the next state, or the resync).
    pub fn drops(&mut self) -> Result<(u64, u64, u64), NftError> {
        if !matches!(self.in_kernel, InKernel::Enforced(_)) {
            return Ok((0, 0, 0));
        }
        let counts = match self.kernel.counters() {
            Ok(counts) => counts,
            Err(NftError::Refused(message)) if message.contains("No such file") => {
                if !self.failed {
                    tracing::warn!(
                        "the policy table is gone from the kernel: it is put back at the next resync"
                    );
                }
                self.failed = true;
                return Err(NftError::Refused(message));
            }
            Err(e) => return Err(e),
        };
        let count = |name: &str| counts.get(name).copied().unwrap_or(0);
        Ok((
            count(nft::COUNTER_DROP_INGRESS),
            count(nft::COUNTER_DROP_EGRESS),
            count(nft::COUNTER_DROP_UNKNOWN_POD),
        ))
    }
}

/// Reads the policy table's drop counters into `metrics` (blocking: runs `nft`); nothing
/// when there is no table.
pub fn record_drops(
    enforcer: &std::sync::Mutex<Enforcer>,
    metrics: &crate::metrics::PolicyMetrics,
) {
    let read = enforcer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .drops();
    match read {
        Ok(totals) => metrics.record_drops(totals),
        Err(e) => tracing::debug!("policy counters: {}", crate::chain(&e)),
    }
}

fn unchanged() -> Outcome {
    Outcome {
        action: Action::Unchanged,
        seconds: 0.0,
    }
}

/// A kernel for tests: records the scripts, refuses when told to.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Records every script; refuses the next `fail` ones.
    #[derive(Clone, Default)]
    pub(crate) struct FakeKernel {
        pub(crate) scripts: Arc<Mutex<Vec<String>>>,
        pub(crate) fail: Arc<Mutex<usize>>,
        /// What `existing` answers (`None`: no table).
        pub(crate) existing: Arc<Mutex<Option<ExistingTable>>>,
        /// The table was deleted behind the enforcer's back.
        pub(crate) gone: Arc<Mutex<bool>>,
    }

    impl PolicyKernel for FakeKernel {
        fn apply(&mut self, script: &str) -> Result<(), NftError> {
            let mut fail = self.fail.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(NftError::Refused("no".into()));
            }
            self.scripts.lock().unwrap().push(script.to_string());
            Ok(())
        }
        fn counters(&mut self) -> Result<BTreeMap<String, u64>, NftError> {
            if *self.gone.lock().unwrap() {
                return Err(NftError::Refused("Error: No such file or directory".into()));
            }
            Ok([
                ("drop_ingress".to_string(), 3),
                ("drop_unknown_pod".to_string(), 1),
            ]
            .into())
        }
        fn existing(&mut self) -> Result<Option<ExistingTable>, NftError> {
            Ok(self.existing.lock().unwrap().clone())
        }
    }

    impl FakeKernel {
        pub(crate) fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.scripts.lock().unwrap())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use trellis_core::policy::PolicyEndpoint;

    use super::fake::FakeKernel;
    use super::*;

    /// Counts compilations.
    struct CountingCompiler(Arc<Mutex<usize>>);

    impl PolicyCompiler for CountingCompiler {
        fn ruleset(&mut self, inputs: &PolicyInputs, node: &str) -> Ruleset {
            *self.0.lock().unwrap() += 1;
            trellis_core::policy::compile(inputs, node)
        }
    }

    pub(crate) fn inputs(pods: &[&str]) -> NodePolicy {
        NodePolicy {
            node: "n1".into(),
            inputs: policy_inputs(pods),
        }
    }

    /// Pods of node `n1` at these addresses, all of one identity.
    fn policy_inputs(pods: &[&str]) -> PolicyInputs {
        let mut inputs = PolicyInputs::new("c1".parse().unwrap());
        let identity = trellis_core::policy::Identity {
            key: trellis_core::policy::IdentityKey {
                cluster: "c1".parse().unwrap(),
                number: 1,
            },
            labels: trellis_core::policy::IdentityLabels {
                namespace: "x".into(),
                ..Default::default()
            },
        };
        inputs.identities.insert(identity.key.clone(), identity);
        for (i, pod) in pods.iter().enumerate() {
            let endpoint = PolicyEndpoint {
                cluster: "c1".parse().unwrap(),
                namespace: "x".into(),
                name: format!("p{i}"),
                addresses: vec![pod.parse().unwrap()],
                node: "n1".into(),
                identity: 1,
                named_ports: vec![],
            };
            inputs
                .endpoints
                .insert(trellis_core::keyed::Keyed::key(&endpoint), endpoint);
        }
        inputs
    }

    #[test]
    fn a_pod_whose_identity_is_missing_is_left_unknown_not_open() {
        let mut inputs = policy_inputs(&["10.0.0.1", "10.0.0.2"]);
        let mut endpoints = inputs.endpoints.values_mut();
        let known = endpoints.next().unwrap().clone();
        let orphan = endpoints.next().unwrap();
        orphan.identity = 2;
        let orphan = orphan.clone();
        let ruleset = IncrementalCompiler::default().ruleset(&inputs, "n1");
        assert!(
            ruleset.local_pods.contains(&known.addresses[0]),
            "{ruleset:?}"
        );
        assert!(
            !ruleset.local_pods.contains(&orphan.addresses[0]),
            "{ruleset:?}"
        );
    }

    fn enforcer() -> (Enforcer, FakeKernel, Arc<Mutex<usize>>) {
        let kernel = FakeKernel::default();
        let compiled = Arc::new(Mutex::new(0));
        let enforcer = Enforcer::new(
            Box::new(CountingCompiler(compiled.clone())),
            Box::new(kernel.clone()),
        );
        (enforcer, kernel, compiled)
    }

    #[test]
    fn the_first_apply_replaces_the_table_then_only_differences_go() {
        let (mut e, kernel, _) = enforcer();
        assert!(!e.settled(), "nothing of ours in the kernel yet");
        let first = e.enforce(1, Some(&inputs(&["10.0.0.1"]))).unwrap();
        assert_eq!(first.action, Action::Replaced);
        let scripts = kernel.take();
        assert_eq!(scripts.len(), 1);
        assert!(scripts[0].starts_with(&nft::render_delete()));
        assert!(e.settled());

        let second = e
            .enforce(2, Some(&inputs(&["10.0.0.1", "10.0.0.2"])))
            .unwrap();
        assert_eq!(second.action, Action::Updated);
        assert_eq!(
            kernel.take(),
            ["add element inet trellis_policy _local4 { 10.0.0.2 }\n"]
        );
        let InKernel::Enforced(applied) = e.in_kernel() else {
            panic!("{:?}", e.in_kernel())
        };
        assert_eq!(applied.revision, 2);
        assert_eq!(
            applied.digest,
            policy_inputs(&["10.0.0.1", "10.0.0.2"]).digest()
        );
    }

    #[test]
    fn equal_inputs_are_neither_compiled_nor_applied_again() {
        let (mut e, kernel, compiled) = enforcer();
        e.enforce(1, Some(&inputs(&["10.0.0.1"]))).unwrap();
        kernel.take();
        let again = e.enforce(5, Some(&inputs(&["10.0.0.1"]))).unwrap();
        assert_eq!(again.action, Action::Unchanged);
        assert!(kernel.take().is_empty());
        assert_eq!(*compiled.lock().unwrap(), 1);
        let InKernel::Enforced(applied) = e.in_kernel() else {
            panic!()
        };
        assert_eq!(applied.revision, 5, "the newest revision with these inputs");
    }

    #[test]
    fn a_failure_keeps_the_last_applied_and_the_next_attempt_replaces_the_table() {
        let (mut e, kernel, _) = enforcer();
        e.enforce(1, Some(&inputs(&["10.0.0.1"]))).unwrap();
        kernel.take();
        *kernel.fail.lock().unwrap() = 1;
        assert!(e.enforce(2, Some(&inputs(&["10.0.0.2"]))).is_err());
        assert!(!e.settled());
        let InKernel::Enforced(applied) = e.in_kernel() else {
            panic!()
        };
        assert_eq!(applied.revision, 1, "the kernel still holds revision 1");
        // Retried (a resync): the whole table, not a difference from a state it may not hold.
        let retry = e.enforce(2, Some(&inputs(&["10.0.0.2"]))).unwrap();
        assert_eq!(retry.action, Action::Replaced);
        assert!(kernel.take()[0].starts_with(&nft::render_delete()));
        assert!(e.settled());
        // Even a retry of the inputs that were already in place replaces the table.
        *kernel.fail.lock().unwrap() = 1;
        assert!(e.enforce(3, None).is_err());
        assert_eq!(
            e.enforce(3, Some(&inputs(&["10.0.0.2"]))).unwrap().action,
            Action::Replaced
        );
    }

    #[test]
    fn a_table_left_by_another_process_is_emptied_and_filled_not_deleted() {
        let (mut e, kernel, _) = enforcer();
        let existing = ExistingTable {
            chains: ["_egress".to_string(), "old".to_string()].into(),
            ..ExistingTable::default()
        };
        *kernel.existing.lock().unwrap() = Some(existing.clone());
        assert_eq!(
            e.enforce(1, Some(&inputs(&["10.0.0.1"]))).unwrap().action,
            Action::Replaced
        );
        let scripts = kernel.take();
        assert_eq!(scripts.len(), 1);
        assert!(
            scripts[0].starts_with("table inet trellis_policy\nflush table inet trellis_policy\n"),
            "{}",
            scripts[0]
        );
        assert!(scripts[0].contains("delete chain inet trellis_policy old\n"));
        // Refused (say, a set of the same name with another type): deleted and created.
        *kernel.fail.lock().unwrap() = 1;
        assert!(e.enforce(2, None).is_err());
        *kernel.fail.lock().unwrap() = 1;
        assert_eq!(
            e.enforce(3, Some(&inputs(&["10.0.0.2"]))).unwrap().action,
            Action::Replaced
        );
        let scripts = kernel.take();
        assert_eq!(scripts.len(), 1, "the refused script is not recorded");
        assert!(scripts[0].starts_with(&nft::render_delete()));
        assert!(e.settled());
    }

    #[test]
    fn a_table_deleted_behind_its_back_is_put_back_at_the_next_enforce() {
        let (mut e, kernel, _) = enforcer();
        let policy = inputs(&["10.0.0.1"]);
        e.enforce(1, Some(&policy)).unwrap();
        kernel.take();
        assert_eq!(
            e.enforce(1, Some(&policy)).unwrap().action,
            Action::Unchanged
        );
        *kernel.gone.lock().unwrap() = true;
        assert!(e.drops().is_err());
        *kernel.gone.lock().unwrap() = false;
        // The resync re-applies the same inputs: the table is created again.
        assert_eq!(
            e.enforce(1, Some(&policy)).unwrap().action,
            Action::Replaced
        );
        assert!(kernel.take()[0].starts_with(&nft::render_delete()));
    }

    #[test]
    fn switching_drop_logging_refills_the_table_and_updates_keep_it() {
        let (e, kernel, _) = enforcer();
        let mut e = e.log_drops(true);
        let policy = inputs(&["10.0.0.1"]);
        e.enforce(1, Some(&policy)).unwrap();
        let scripts = kernel.take();
        assert!(
            scripts[0].contains("log prefix \"trellis:unknown:in\" group 1616\n"),
            "{}",
            scripts[0]
        );
        // The same inputs, logging switched off: the table refilled, without the log clauses.
        *kernel.existing.lock().unwrap() = Some(ExistingTable::default());
        e.set_log_drops(false);
        assert_eq!(
            e.enforce(2, Some(&policy)).unwrap().action,
            Action::Replaced
        );
        let scripts = kernel.take();
        assert_eq!(scripts.len(), 1);
        assert!(scripts[0].contains("counter name drop_unknown_pod drop"));
        assert!(!scripts[0].contains(" log "), "{}", scripts[0]);
        assert_eq!(
            e.enforce(3, Some(&policy)).unwrap().action,
            Action::Unchanged
        );
        // On again, then a change: the update goes as a difference, rendered with logging.
        e.set_log_drops(true);
        assert_eq!(
            e.enforce(4, Some(&policy)).unwrap().action,
            Action::Replaced
        );
        kernel.take();
        let mut isolated = inputs(&["10.0.0.1"]);
        let deny: trellis_core::policy::NetworkPolicy = serde_json::from_value(
            serde_json::json!({"namespace": "x", "name": "deny", "pod_selector": {}, "ingress": []}),
        )
        .unwrap();
        isolated.inputs.policies.insert(deny.key(), deny);
        assert_eq!(
            e.enforce(5, Some(&isolated)).unwrap().action,
            Action::Updated
        );
        let scripts = kernel.take();
        assert!(
            scripts[0].contains(
                "pod_in_10_0_0_1 limit rate 1000/second burst 1000 packets log prefix \"trellis:pod:in:pod_in_10_0_0_1\" group 1616\n"
            ),
            "{}",
            scripts[0]
        );
    }

    #[test]
    fn no_policy_deletes_the_table_once() {
        let (mut e, kernel, _) = enforcer();
        e.enforce(1, Some(&inputs(&["10.0.0.1"]))).unwrap();
        kernel.take();
        assert_eq!(e.enforce(2, None).unwrap().action, Action::Deleted);
        assert_eq!(kernel.take(), [nft::render_delete()]);
        assert_eq!(e.enforce(3, None).unwrap().action, Action::Unchanged);
        assert!(kernel.take().is_empty());
        assert!(e.settled());
        assert_eq!(e.drops().unwrap(), (0, 0, 0), "no table, no counters read");
        // Switched on again: the table whole.
        assert_eq!(
            e.enforce(4, Some(&inputs(&["10.0.0.1"]))).unwrap().action,
            Action::Replaced
        );
        assert_eq!(e.drops().unwrap(), (3, 0, 1));
    }

    #[test]
    fn a_ruleset_that_cannot_render_fails_without_touching_the_kernel() {
        struct Broken;
        impl PolicyCompiler for Broken {
            fn ruleset(&mut self, _: &PolicyInputs, _: &str) -> Ruleset {
                let mut r = Ruleset::default();
                r.egress
                    .insert("10.0.0.1".parse().unwrap(), "missing".into());
                r
            }
        }
        let kernel = FakeKernel::default();
        let mut e = Enforcer::new(Box::new(Broken), Box::new(kernel.clone()));
        assert!(matches!(
            e.enforce(1, Some(&inputs(&["10.0.0.1"]))),
            Err(PolicyError::Render(_))
        ));
        assert!(kernel.take().is_empty());
        assert!(!e.settled());
    }
}
