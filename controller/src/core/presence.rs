//! Agent presence in the store: while an agent's session is up, the leader keeps a
//! `presence/<agent id>` key. Every presence key of this leader hangs off **one** lease
//! (TTL = the agent lease) that the keeper renews once per third of the TTL, whatever the
//! number of agents; keys are put and deleted in group commits (as many per transaction as
//! the store takes), never one store call per agent per interval. When a session ends the
//! key is deleted one agent lease later, so it outlives the agent by exactly the grace
//! period; when the leader dies its lease expires and every key with it: operators (and
//! other controllers) can see in the store which agents are alive. A new leader gives every
//! agent one grace period (the agent lease) from its takeover to reconnect, and keeps the
//! attempts of those back within it; it does not go by the keys alone, because they expire
//! on their own while the old leader is frozen (or slow to be replaced), which would make a
//! new leader requeue the work of every agent that is only reconnecting. On the leader that
//! holds the session, the grace runs from the agent's last message (see `State::detach`),
//! so it is one lease in all.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Unbounded: an attach storm of 10,000 agents must not drop an `Up` (its key would
    /// be missing) or a `Down` (its key would stay); the keeper drains it in group commits.
    tx: mpsc::UnboundedSender<PresenceEvent>,
}

impl Presence {
    pub(crate) fn start(store: Arc<dyn Store>, ttl: Duration, stop: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(keeper(store, ttl, rx, stop));
        Self { tx }
    }

    pub(crate) fn up(&self, agent: &str) {
        let _ = self.tx.send(PresenceEvent::Up(agent.to_string()));
    }

    pub(crate) fn down(&self, agent: &str) {
        let _ = self.tx.send(PresenceEvent::Down(agent.to_string()));
    }
}

async fn keeper(
    store: Arc<dyn Store>,
    ttl: Duration,
    mut rx: mpsc::UnboundedReceiver<PresenceEvent>,
    stop: CancellationToken,
) {
    let max_ops = store.max_txn_ops().clamp(1, 1024);
    let mut k = Keeper {
        store,
        ttl,
        max_ops,
        lease: None,
        live: HashSet::new(),
        to_put: HashSet::new(),
        leaving: HashMap::new(),
    };
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                k.note(ev);
                // Everything already queued goes into the same group commit.
                while let Ok(ev) = rx.try_recv() {
                    k.note(ev);
                }
                k.put_pending().await;
            }
            _ = tick.tick() => k.renew().await,
        }
    }
}

/// The keeper's view: which agents have a key, which need one, which leave when.
struct Keeper {
    store: Arc<dyn Store>,
    ttl: Duration,
    /// Operations per group commit.
    max_ops: usize,
    /// The one lease every key of this leader hangs off.
    lease: Option<LeaseId>,
    /// Agents whose key is in the store.
    live: HashSet<String>,
    /// Agents whose key is to be put.
    to_put: HashSet<String>,
    /// Agents whose session ended, and when their key goes (one grace period later).
    leaving: HashMap<String, Instant>,
}

impl Keeper {
    fn note(&mut self, ev: PresenceEvent) {
        match ev {
            PresenceEvent::Up(agent) => {
                self.leaving.remove(&agent);
                if !self.live.contains(&agent) {
                    self.to_put.insert(agent);
                }
            }
            PresenceEvent::Down(agent) => {
                if self.to_put.remove(&agent) {
                    return; // never written
                }
                if self.live.contains(&agent) {
                    self.leaving.insert(agent, Instant::now() + self.ttl);
                }
            }
        }
    }

    /// The shared lease, granted on first use (and again after it was lost).
    async fn lease(&mut self) -> Option<LeaseId> {
        if self.lease.is_none() {
            self.lease = self.store.lease_grant(self.ttl).await.ok();
        }
        self.lease
    }

    /// Puts the keys of agents that came up, in group commits on the shared lease.
    async fn put_pending(&mut self) {
        if self.to_put.is_empty() {
            return;
        }
        let Some(lease) = self.lease().await else {
            debug!("could not grant the presence lease; will retry");
            return;
        };
        let agents: Vec<String> = self.to_put.iter().cloned().collect();
        for chunk in agents.chunks(self.max_ops) {
            let txn = Txn {
                success: chunk
                    .iter()
                    .map(|a| Op::Put {
                        key: format!("{PRESENCE_PREFIX}{a}"),
                        value: Vec::new(),
                        lease,
                    })
                    .collect(),
                ..Txn::default()
            };
            match self.store.txn(txn).await {
                Ok(_) => {
                    for a in chunk {
                        self.to_put.remove(a);
                        self.live.insert(a.clone());
                    }
                }
                Err(e) => {
                    debug!(error = %e, "could not record presence; will retry");
                    return;
                }
            }
        }
    }

    /// Once per interval: renews the shared lease (one call for every agent), deletes the
    /// keys whose grace ran out, retries puts that failed.
    async fn renew(&mut self) {
        let now = Instant::now();
        let gone: Vec<String> = self
            .leaving
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(a, _)| a.clone())
            .collect();
        for chunk in gone.chunks(self.max_ops) {
            let txn = Txn {
                success: chunk
                    .iter()
                    .map(|a| Op::Delete {
                        key: format!("{PRESENCE_PREFIX}{a}"),
                    })
                    .collect(),
                ..Txn::default()
            };
            if self.store.txn(txn).await.is_ok() {
                for a in chunk {
                    self.leaving.remove(a);
                    self.live.remove(a);
                }
            }
        }
        if let Some(lease) = self.lease
            && self.store.lease_keep_alive(lease).await.is_err()
        {
            // The lease (and every key on it) is gone: write them again on a new one.
            self.lease = None;
            let live = std::mem::take(&mut self.live);
            self.to_put.extend(live);
        }
        self.put_pending().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::faults::FaultyStore;

    async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// 1,000 agents: their keys share one lease and are written in a few group commits;
    /// renewing them writes nothing; a session's end deletes its key one lease later.
    #[tokio::test]
    async fn presence_is_one_lease_and_group_commits_whatever_the_agents() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::new(EmbeddedStore::open(&dir.path().join("db")).unwrap());
        let ttl = Duration::from_millis(600);
        let stop = CancellationToken::new();
        let p = Presence::start(store.clone(), ttl, stop.clone());
        let agents: Vec<String> = (0..1000).map(|i| format!("agent-{i:04}")).collect();
        for a in &agents {
            p.up(a);
        }
        let key = |a: &str| format!("{PRESENCE_PREFIX}{a}");
        let last = key(&agents[999]);
        wait_for("every presence key", async || {
            store.get(&last).await.unwrap().is_some() && store.committed() > 0
        })
        .await;
        let mut leases = HashSet::new();
        for a in &agents {
            let kv = store.get(&key(a)).await.unwrap().expect("present");
            leases.insert(kv.lease);
        }
        assert_eq!(leases.len(), 1, "one lease for every agent");
        assert!(!leases.contains(&0));
        let commits = store.committed();
        assert!(commits <= 20, "{commits} commits for 1000 agents");
        // Three TTLs of renewals: the keys live on, and nothing was written for them.
        tokio::time::sleep(ttl * 3).await;
        assert!(store.get(&key(&agents[0])).await.unwrap().is_some());
        assert_eq!(store.committed(), commits, "renewals must not write");
        // Half of them leave: their keys go one lease later, in group commits.
        for a in &agents[..500] {
            p.down(a);
        }
        let first = key(&agents[0]);
        wait_for("the keys of the agents that left to go", async || {
            store.get(&first).await.unwrap().is_none()
        })
        .await;
        assert!(store.get(&key(&agents[499])).await.unwrap().is_none());
        assert!(store.get(&key(&agents[500])).await.unwrap().is_some());
        assert!(store.committed() - commits <= 20);
        stop.cancel();
    }
}
