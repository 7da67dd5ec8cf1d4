//! When to switch the kernel's steering between spreading packets over the workers and
//! sending them all to the first (the decision is [`cpus::ModePolicy`]'s; this applies it).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Device;
use crate::cpus::{self, ModePolicy};
use crate::io::{Tun, Udp};
use crate::steering::{SteeringControl, SteeringMode};

impl<T: Tun, U: Udp> Device<T, U> {
    /// Lets the workers switch the device's steering as the load asks (the first worker's
    /// thread starts on its home CPUs, spread).
    pub fn steered(self, steering: SteeringControl) -> Self {
        self.metrics.steering_spread.set(1);
        if let Ok(mut slot) = self.shared.steering.lock() {
            *slot = Some((steering, ModePolicy::new(Instant::now())));
        }
        self
    }

    /// Counts one wake-up's work, and revisits the steering.
    pub(super) fn after_work(&mut self, started: Instant) {
        let now = Instant::now();
        let worked = u64::try_from(now.saturating_duration_since(started).as_nanos()).unwrap_or(0);
        self.shared.busy_nanos.fetch_add(worked, Ordering::Relaxed);
        self.revisit_steering(now);
    }

    pub(super) fn revisit_steering(&self, now: Instant) {
        // Another worker revisiting it now is as good.
        let Ok(mut slot) = self.shared.steering.try_lock() else {
            return;
        };
        let Some((steering, policy)) = slot.as_mut() else {
            return;
        };
        let busy = Duration::from_nanos(self.shared.busy_nanos.load(Ordering::Relaxed));
        let Some(spread) = policy.after(now, busy) else {
            return;
        };
        if let Err(e) = steering.switch.spread(spread) {
            tracing::warn!("switching the steering (spread: {spread}): {e}");
            return;
        }
        let cpus = if spread {
            &steering.home
        } else {
            &steering.anywhere
        };
        if let Err(e) = cpus::pin_thread(steering.first, cpus) {
            tracing::debug!("pinning the first worker to {cpus:?}: {e}");
        }
        self.metrics.steering_spread.set(i64::from(spread));
        let to = SteeringMode::spread(spread).label();
        self.metrics.steering_changes.with_label_values(&[to]).inc();
        tracing::debug!("steering: {to}");
    }
}
