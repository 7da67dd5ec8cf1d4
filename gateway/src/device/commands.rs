//! What a [`DeviceHandle`] asks of the loop, and how the first worker answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use trellis_core::gateway::TunnelPeer;
use trellis_core::wgkey::PublicKey;

use super::{Device, Identity, KeyRing, Role};
use crate::Error;
use crate::io::{Tun, Udp};
use crate::keys::KeyPair;
use crate::metrics::DropReason;

/// What the loop reports about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub since_last_handshake: Option<Duration>,
    pub handshakes: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

pub(super) enum Command {
    /// Adds and updates these peers; with `prune`, removes every other peer.
    SetPeers {
        peers: Vec<TunnelPeer>,
        prune: bool,
        done: oneshot::Sender<()>,
    },
    Stats(oneshot::Sender<Vec<PeerStats>>),
    /// Makes `keys` the current key; the old one answers handshakes, and every peer keeps its
    /// sessions on it, until [`Command::FinishRotation`].
    RotateKey {
        keys: KeyPair,
        done: oneshot::Sender<()>,
    },
    /// Moves the peers still on the replaced key to the current one (each sent an initiation)
    /// and forgets the replaced key; answers how many peers moved.
    FinishRotation(oneshot::Sender<usize>),
    /// One round of the timers now, whatever the loop's interval: the timer tests move a
    /// mock clock and must know a round ran after each move.
    #[cfg(all(test, feature = "mock-time"))]
    RunTimers(oneshot::Sender<()>),
}

/// Talks to a running device loop. Dropping every handle stops the loop.
#[derive(Clone, Debug)]
pub struct DeviceHandle {
    commands: mpsc::Sender<Command>,
}

impl DeviceHandle {
    pub(super) fn new(commands: mpsc::Sender<Command>) -> Self {
        Self { commands }
    }

    /// Adds and updates `peers`; with `prune`, removes the others. Returns once applied.
    pub async fn set_peers(&self, peers: Vec<TunnelPeer>, prune: bool) -> Result<(), Error> {
        let (done, applied) = oneshot::channel();
        self.commands
            .send(Command::SetPeers { peers, prune, done })
            .await
            .map_err(|_| Error::DeviceStopped)?;
        applied.await.map_err(|_| Error::DeviceStopped)
    }

    /// A key rotation's switch: `keys` answers handshakes beside the old key, which every
    /// peer keeps using until it initiates to the new one. A rotation not yet finished is
    /// finished first.
    pub async fn rotate_key(&self, keys: KeyPair) -> Result<(), Error> {
        let (done, applied) = oneshot::channel();
        self.commands
            .send(Command::RotateKey { keys, done })
            .await
            .map_err(|_| Error::DeviceStopped)?;
        applied.await.map_err(|_| Error::DeviceStopped)
    }

    /// Ends a key rotation's grace period: the peers still on the old key move to the new
    /// one; returns how many did.
    pub async fn finish_rotation(&self) -> Result<usize, Error> {
        let (done, moved) = oneshot::channel();
        self.commands
            .send(Command::FinishRotation(done))
            .await
            .map_err(|_| Error::DeviceStopped)?;
        moved.await.map_err(|_| Error::DeviceStopped)
    }

    pub async fn stats(&self) -> Result<Vec<PeerStats>, Error> {
        let (reply, stats) = oneshot::channel();
        self.commands
            .send(Command::Stats(reply))
            .await
            .map_err(|_| Error::DeviceStopped)?;
        stats.await.map_err(|_| Error::DeviceStopped)
    }

    /// Runs every peer's timers once; returns when what they sent is on the network.
    #[cfg(all(test, feature = "mock-time"))]
    pub(crate) async fn run_timers(&self) -> Result<(), Error> {
        let (done, ran) = oneshot::channel();
        self.commands
            .send(Command::RunTimers(done))
            .await
            .map_err(|_| Error::DeviceStopped)?;
        ran.await.map_err(|_| Error::DeviceStopped)
    }
}

impl<T: Tun, U: Udp> Device<T, U> {
    /// Moves every peer still on the previous key to the current one, sending each an
    /// initiation at once (with the new key), and forgets the previous key.
    async fn finish_rotation(&mut self) -> usize {
        let ring = self.shared.keys.load_full();
        if ring.previous.is_none() {
            return 0;
        }
        let table = self.shared.table.load_full();
        let mut initiations = Vec::new();
        let mut moved = 0;
        for peer in table.peers.values() {
            let mut state = peer.lock();
            if !state.on_previous {
                continue;
            }
            state.use_key(&ring.current, &peer.public_key, peer.slot);
            moved += 1;
            if let Some((len, to)) = state.initiate(&mut self.scratch, true) {
                initiations.push((self.scratch[..len].to_vec(), to));
            }
        }
        self.shared.keys.store(Arc::new(KeyRing {
            current: ring.current.clone(),
            previous: None,
        }));
        for (datagram, to) in initiations {
            if let Err(e) = self.udp.send_to(&datagram, to).await {
                tracing::debug!("UDP send to {to}: {e}");
                self.metrics.drop_packet(DropReason::SocketError);
            }
        }
        moved
    }
}

/// The next command for the first worker; `None` when the loop is to stop (every handle
/// dropped, `stop` fired, or, for a sibling, the first worker gone).
pub(super) async fn next_command(role: &mut Role) -> Option<Command> {
    match role {
        Role::First { commands, stop, .. } => tokio::select! {
            command = commands.recv() => command,
            _ = async {
                match stop {
                    Some(stop) => {
                        let _ = stop.await;
                    }
                    None => std::future::pending().await,
                }
            } => None,
        },
        // Nothing is ever sent: `changed` fails once the first worker drops its sender.
        Role::Sibling { first } => {
            while first.changed().await.is_ok() {}
            None
        }
    }
}

impl<T: Tun, U: Udp> Device<T, U> {
    pub(super) async fn handle(&mut self, command: Command) {
        match command {
            Command::SetPeers { peers, prune, done } => {
                let (table, initiate) =
                    self.shared
                        .table
                        .load()
                        .reconcile(&self.shared, peers, prune);
                // A new peer (every peer, when the gateway just started) or a moved one gets
                // a handshake now: the remote end switches to the new session at once rather
                // than keep sending into one we no longer have until its timers give up
                // (15 s). Formatted under each peer's lock, sent after it.
                let mut initiations = Vec::with_capacity(initiate.len());
                for (slot, reason) in initiate {
                    let Some(peer) = table.peers.get(&slot) else {
                        continue;
                    };
                    if let Some((len, to)) = peer.lock().initiate(&mut self.scratch, false) {
                        self.metrics.initiated(reason);
                        initiations.push((self.scratch[..len].to_vec(), to));
                    }
                }
                self.shared.table.store(Arc::new(table));
                let _ = done.send(());
                for (datagram, to) in initiations {
                    if let Err(e) = self.udp.send_to(&datagram, to).await {
                        tracing::debug!("UDP send to {to}: {e}");
                        self.metrics.drop_packet(DropReason::SocketError);
                    }
                }
            }
            Command::RotateKey { keys, done } => {
                self.finish_rotation().await;
                let identity = Identity::new(keys, self.config.handshake_rate_limit);
                let old = self.shared.keys.load_full();
                // The peers keep their `Tunn` (and sessions) on the old key, which stays.
                for peer in self.shared.table.load().peers.values() {
                    peer.lock().on_previous = true;
                }
                self.shared.keys.store(Arc::new(KeyRing {
                    current: identity,
                    previous: Some(old.current.clone()),
                }));
                let _ = done.send(());
            }
            Command::FinishRotation(done) => {
                let moved = self.finish_rotation().await;
                let _ = done.send(moved);
            }
            Command::Stats(reply) => {
                let table = self.shared.table.load();
                let mut stats: Vec<_> = table
                    .peers
                    .values()
                    .filter_map(|peer| {
                        let state = peer.lock();
                        if state.retiring.is_some() {
                            return None;
                        }
                        Some(PeerStats {
                            name: state.name.clone(),
                            public_key: peer.public_key,
                            endpoint: state.endpoint,
                            since_last_handshake: state.tunn.stats().0,
                            handshakes: state.handshakes,
                            tx_bytes: state.tx_bytes,
                            rx_bytes: state.rx_bytes,
                        })
                    })
                    .collect();
                stats.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(stats);
            }
            #[cfg(all(test, feature = "mock-time"))]
            Command::RunTimers(done) => {
                self.run_timers().await;
                let _ = done.send(());
            }
        }
    }
}
