//! Agent presence in the store: while an agent's session is up, the leader keeps a
//! `presence/<agent id>` key alive under a lease of its own (TTL = the agent lease). When
//! the session ends the lease is left to expire, so the key outlives the agent by exactly
//! the grace period: operators (and other controllers) can see in the store which agents
//! are alive. A new leader gives every agent one grace period (the agent lease) from its
//! takeover to reconnect, and keeps the attempts of those back within it; it does not go by
//! the keys alone, because they expire on their own while the old leader is frozen (or slow
//! to be replaced), which would make a new leader requeue the work of every agent that is
//! only reconnecting. On the leader that holds the session, the grace runs from the
//! agent's last message (see `State::detach`), so it is one lease in all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::store::{LeaseId, Op, Store, Txn};

/// Store key prefix of presence keys.
pub(crate) const PRESENCE_PREFIX: &str = "presence/";

pub(crate) enum PresenceEvent {
    Up(String),
    Down(String),
}

/// Sends presence changes to the keeper task (never blocks the core).
#[derive(Clone)]
pub(crate) struct Presence {
    tx: mpsc::Sender<PresenceEvent>,
}

impl Presence {
    pub(crate) fn start(store: Arc<dyn Store>, ttl: Duration, stop: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(keeper(store, ttl, rx, stop));
        Self { tx }
    }

    pub(crate) fn up(&self, agent: &str) {
        let _ = self.tx.try_send(PresenceEvent::Up(agent.to_string()));
    }

    pub(crate) fn down(&self, agent: &str) {
        let _ = self.tx.try_send(PresenceEvent::Down(agent.to_string()));
    }
}

async fn keeper(
    store: Arc<dyn Store>,
    ttl: Duration,
    mut rx: mpsc::Receiver<PresenceEvent>,
    stop: CancellationToken,
) {
    // Agents with a live session and their leases.
    let mut live: HashMap<String, LeaseId> = HashMap::new();
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = rx.recv() => match ev {
                None => return,
                Some(PresenceEvent::Up(agent)) => {
                    if live.contains_key(&agent) {
                        continue;
                    }
                    match mark(store.as_ref(), &agent, ttl).await {
                        Some(lease) => { live.insert(agent, lease); }
                        None => debug!(agent, "could not record presence; will retry on reconnect"),
                    }
                }
                // Stop renewing: the key lasts one more TTL, the agent's grace period.
                Some(PresenceEvent::Down(agent)) => { live.remove(&agent); }
            },
            _ = tick.tick() => {
                let renewals = live.iter().map(|(agent, lease)| {
                    let store = store.clone();
                    async move { (agent.clone(), store.lease_keep_alive(*lease).await.is_ok()) }
                });
                for (agent, ok) in join_all(renewals).await {
                    if !ok && let Some(lease) = mark(store.as_ref(), &agent, ttl).await {
                        live.insert(agent, lease);
                    }
                }
            }
        }
    }
}

async fn mark(store: &dyn Store, agent: &str, ttl: Duration) -> Option<LeaseId> {
    let lease = store.lease_grant(ttl).await.ok()?;
    let put = Txn {
        success: vec![Op::Put {
            key: format!("{PRESENCE_PREFIX}{agent}"),
            value: Vec::new(),
            lease,
        }],
        ..Txn::default()
    };
    match store.txn(put).await {
        Ok(_) => Some(lease),
        Err(_) => {
            let _ = store.lease_revoke(lease).await;
            None
        }
    }
}
