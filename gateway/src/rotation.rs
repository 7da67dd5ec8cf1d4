//! Rotating the gateway's WireGuard key, on a schedule and on demand (SIGUSR1, which
//! `trellis-gateway rotate-key` sends), without a gap in any tunnel:
//!
//! 1. a new key pair is generated; the old private key is stored as `previous.key`, then the
//!    new one replaces `private.key` (both 0600, written atomically);
//! 2. the device answers handshakes addressed to either key: every peer keeps its session on
//!    the old key, and a peer that initiates to the new key is switched to it (its old
//!    session goes, the new one replaces it within that round trip);
//! 3. the new public key goes to the controller (the registration the controller client
//!    follows; it registers again), which hands it to every peer; each peer adds it as a new
//!    peer and initiates at once;
//! 4. after the grace period, any peer still on the old key is switched to the new one (and
//!    sent an initiation), the old key is forgotten and `previous.key` removed.
//!
//! Routes never change, so nothing is ever sent in plaintext: a packet meets a session, a
//! queue behind a handshake, or a drop. A rotation needs the controller connected (a key no
//! peer can learn would cut every tunnel at the end of the grace period), so one asked for
//! while it is not waits (schedule) or is refused (signal), and so does the desired-state file
//! mode, which has no one to tell.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use trellis_core::agent::GatewayRegistration;
use trellis_core::wgkey::PublicKey;

use crate::Error;
use crate::device::DeviceHandle;
use crate::keys::{self, KeyPair, OwnKeys};
use crate::metrics::Metrics;

/// How long the old key still answers handshakes after a rotation: peers learn the new key
/// from their controllers within moments (a few hundred milliseconds across clusters); this is
/// for a slow peering link.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// A scheduled rotation that could not run (controller not connected, a failed write) is
/// tried again this much later.
const RETRY: Duration = Duration::from_secs(30);

/// What a rotation touches.
pub struct Rotator {
    pub state_dir: PathBuf,
    pub device: DeviceHandle,
    /// The keys the reconciler treats as this gateway's own.
    pub own_keys: OwnKeys,
    /// What the controller client registers with.
    pub registration: watch::Sender<GatewayRegistration>,
    pub metrics: Metrics,
    pub grace: Duration,
}

impl Rotator {
    /// Steps 1 to 3: the new key stored, in the device beside the old one, and announced.
    pub async fn rotate(&self) -> Result<PublicKey, Error> {
        let old = KeyPair::load(&self.state_dir)?;
        let new = KeyPair::generate();
        keys::store_rotation(&self.state_dir, &old, &new)?;
        self.device.rotate_key(new.clone()).await?;
        let public = new.public_key();
        self.own_keys.set(public, Some(old.public_key()));
        self.registration.send_modify(|r| r.public_key = public);
        self.metrics.key_rotated();
        tracing::info!(
            old = %old.public_key(),
            new = %public,
            grace = ?self.grace,
            "rotated the WireGuard key: announced to the controller; the old key answers until each peer uses the new one"
        );
        Ok(public)
    }

    /// Step 4: every peer on the new key, the old one forgotten.
    pub async fn finish(&self) -> Result<(), Error> {
        let switched = self.device.finish_rotation().await?;
        self.own_keys.set(self.own_keys.current(), None);
        keys::forget_previous(&self.state_dir);
        tracing::info!(
            late_peers = switched,
            "key rotation done: the old key is gone"
        );
        Ok(())
    }
}

/// When the key stored in `state_dir` is due for rotation: `interval` after it was written.
fn due(state_dir: &Path, interval: Duration) -> Instant {
    let age = std::fs::metadata(state_dir.join(keys::PRIVATE_KEY_FILE))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|written| SystemTime::now().duration_since(written).ok())
        .unwrap_or_default();
    Instant::now() + interval.saturating_sub(age)
}

/// Rotates whenever asked on `requests` and, with an `interval`, when the stored key is that
/// old; finishes each rotation after its grace period. `connected` says whether the
/// controller client is registered now. Runs until the process ends.
pub async fn run(
    rotator: Rotator,
    interval: Option<Duration>,
    mut requests: mpsc::Receiver<()>,
    connected: impl Fn() -> bool,
) {
    let mut grace_ends: Option<Instant> = None;
    let mut not_before = Instant::now();
    let mut open = true;
    loop {
        let scheduled = interval.map(|i| due(&rotator.state_dir, i).max(not_before));
        let on_demand = tokio::select! {
            request = requests.recv(), if open => match request {
                Some(()) => true,
                None => {
                    open = false;
                    continue;
                }
            },
            () = sleep_until(scheduled), if scheduled.is_some() => false,
            () = sleep_until(grace_ends), if grace_ends.is_some() => {
                grace_ends = None;
                if let Err(e) = rotator.finish().await {
                    tracing::warn!("finish the key rotation: {}", crate::chain(&e));
                }
                continue;
            }
            else => std::future::pending().await,
        };
        if !connected() {
            tracing::warn!(
                on_demand,
                "not rotating the WireGuard key: not registered with the controller, which must announce the new key"
            );
            not_before = Instant::now() + RETRY;
            continue;
        }
        if grace_ends.take().is_some()
            && let Err(e) = rotator.finish().await
        {
            tracing::warn!("finish the last key rotation: {}", crate::chain(&e));
        }
        match rotator.rotate().await {
            Ok(_) => grace_ends = Some(Instant::now() + rotator.grace),
            Err(e) => {
                tracing::warn!("rotate the WireGuard key: {}", crate::chain(&e));
                not_before = Instant::now() + RETRY;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::device::tests::{FakeNet, start};

    #[tokio::test]
    async fn a_request_rotates_only_while_registered_and_the_grace_period_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = KeyPair::load_or_generate(dir.path()).unwrap().public_key();
        let node = start(&FakeNet::default(), "198.18.0.1:51820");
        let own_keys = OwnKeys::new(first);
        let (registration, registered) = watch::channel(GatewayRegistration {
            node: "node-0".into(),
            endpoint: "198.18.0.1:51820".parse().unwrap(),
            public_key: first,
        });
        let rotator = Rotator {
            state_dir: dir.path().to_path_buf(),
            device: node.handle.clone(),
            own_keys: own_keys.clone(),
            registration,
            metrics: node.metrics.clone(),
            grace: Duration::from_millis(300),
        };
        let connected = Arc::new(AtomicBool::new(false));
        let (ask, requests) = mpsc::channel(1);
        let is_connected = connected.clone();
        tokio::spawn(run(rotator, None, requests, move || {
            is_connected.load(Ordering::Relaxed)
        }));
        let stored = || KeyPair::load(dir.path()).unwrap().public_key();

        // Not registered with the controller: nothing changes.
        ask.send(()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(stored(), first);

        connected.store(true, Ordering::Relaxed);
        ask.send(()).await.unwrap();
        let new = trellis_test_support::eventually_async(
            "the key rotates",
            Duration::from_secs(5),
            || {
                let now = stored();
                std::future::ready((now != first).then_some(now))
            },
        )
        .await;
        trellis_test_support::eventually_async(
            "the new key announced",
            Duration::from_secs(5),
            || std::future::ready((registered.borrow().public_key == new).then_some(())),
        )
        .await;
        assert!(own_keys.contains(&first) && own_keys.contains(&new));
        assert!(dir.path().join(keys::PREVIOUS_KEY_FILE).exists());
        let text = node.metrics.render();
        assert!(
            text.contains("trellis_gateway_key_rotations_total 1"),
            "{text}"
        );

        // The grace period ends: the old key is gone, from the device and the disk.
        trellis_test_support::eventually_async("the rotation done", Duration::from_secs(5), || {
            std::future::ready((!dir.path().join(keys::PREVIOUS_KEY_FILE).exists()).then_some(()))
        })
        .await;
        assert!(!own_keys.contains(&first));
        assert_eq!(own_keys.current(), new);
    }
}
