//! Lease bookkeeping of the embedded store: which leases are live, their deadlines and the keys
//! attached to each, plus the expiry thread that asks the writer to reap expired leases.
//!
//! Deadlines live only in memory (a reopen grants every lease a fresh full TTL, as etcd does
//! on a leader change). This module never writes to the database: revoking and reaping go
//! through the writer so that the deleted keys get a revision and watch events.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use scabbard_common::{Error, Result};
use tokio::sync::mpsc;

use super::Shared;
use super::writer::Request;
use crate::store::LeaseId;

/// Longest TTL accepted.
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks a requested TTL and returns it in whole milliseconds (as persisted).
pub(super) fn ttl_millis(ttl: Duration) -> Result<u64> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 || ttl > MAX_TTL {
        return Err(Error::invalid(format!(
            "lease ttl must be between 1ms and {}s, got {ttl:?}",
            MAX_TTL.as_secs()
        )));
    }
    Ok(ms)
}

/// One live lease.
#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// Every live lease, shared by the writer (grant, revoke, reap, key moves), keep-alives and the
/// expiry thread. Locked briefly, never across an `.await`.
#[derive(Debug, Default)]
pub(super) struct LeaseTable {
    leases: HashMap<LeaseId, Lease>,
}

impl LeaseTable {
    /// Adds a lease expiring `ttl` after `now`.
    pub(super) fn insert(&mut self, id: LeaseId, ttl: Duration, now: Instant) {
        let deadline = now.checked_add(ttl).unwrap_or(now + MAX_TTL);
        self.leases.insert(
            id,
            Lease {
                ttl,
                deadline,
                keys: BTreeSet::new(),
            },
        );
    }

    /// Forgets a lease (after it was revoked or reaped).
    pub(super) fn remove(&mut self, id: LeaseId) {
        self.leases.remove(&id);
    }

    /// Whether the lease exists, expired or not.
    pub(super) fn contains(&self, id: LeaseId) -> bool {
        self.leases.contains_key(&id)
    }

    /// Whether the lease exists and has not expired at `now`.
    pub(super) fn is_live(&self, id: LeaseId, now: Instant) -> bool {
        self.leases.get(&id).is_some_and(|l| l.deadline > now)
    }

    /// Renews a live lease for another full TTL.
    pub(super) fn keep_alive(&mut self, id: LeaseId, now: Instant) -> Result<()> {
        match self.leases.get_mut(&id) {
            Some(l) if l.deadline > now => {
                l.deadline = now.checked_add(l.ttl).unwrap_or(l.deadline);
                Ok(())
            }
            _ => Err(Error::not_found("lease", id.to_string())),
        }
    }

    /// Leases whose deadline has passed at `now`, in id order.
    pub(super) fn expired(&self, now: Instant) -> Vec<LeaseId> {
        let mut ids: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The earliest deadline of any lease.
    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }

    /// Keys attached to the lease as of the last commit.
    pub(super) fn keys(&self, id: LeaseId) -> Vec<String> {
        self.leases
            .get(&id)
            .map(|l| l.keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Records that `key` moved from lease `from` to lease `to` (0 = none).
    pub(super) fn move_key(&mut self, key: &str, from: LeaseId, to: LeaseId) {
        if from == to {
            return;
        }
        if let Some(l) = self.leases.get_mut(&from) {
            l.keys.remove(key);
        }
        if let Some(l) = self.leases.get_mut(&to) {
            l.keys.insert(key.to_string());
        }
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the tables stay
/// consistent: every mutation is a single map operation).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the thread that asks the writer to reap expired leases. It wakes at the next
/// deadline or every `tick`, whichever comes first, and stops when `stop` is dropped or the
/// writer is gone.
pub(super) fn spawn_expiry(
    shared: Arc<Shared>,
    requests: mpsc::WeakSender<Request>,
    stop: std_mpsc::Receiver<()>,
    tick: Duration,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("store-lease-expiry".into())
        .spawn(move || {
            loop {
                let now = Instant::now();
                let next = lock(&shared.leases).next_deadline();
                if next.is_some_and(|d| d <= now)
                    && !shared.expire_pending.swap(true, Ordering::AcqRel)
                {
                    let Some(sender) = requests.upgrade() else {
                        return;
                    };
                    if sender.blocking_send(Request::Expire).is_err() {
                        return;
                    }
                }
                let wait = next
                    .map(|d| d.saturating_duration_since(now))
                    .unwrap_or(tick)
                    .clamp(Duration::from_millis(1), tick);
                match stop.recv_timeout(wait) {
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_extends_and_expired_lease_is_not_found() {
        let t0 = Instant::now();
        let mut table = LeaseTable::default();
        table.insert(1, Duration::from_secs(1), t0);
        assert!(table.is_live(1, t0 + Duration::from_millis(900)));
        table
            .keep_alive(1, t0 + Duration::from_millis(900))
            .unwrap();
        assert!(table.is_live(1, t0 + Duration::from_millis(1800)));
        assert_eq!(
            table.expired(t0 + Duration::from_millis(1800)),
            Vec::<i64>::new()
        );
        assert_eq!(table.expired(t0 + Duration::from_secs(2)), vec![1]);
        assert!(matches!(
            table.keep_alive(1, t0 + Duration::from_secs(2)),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn keys_follow_moves() {
        let now = Instant::now();
        let mut table = LeaseTable::default();
        table.insert(1, Duration::from_secs(5), now);
        table.insert(2, Duration::from_secs(5), now);
        table.move_key("a", 0, 1);
        table.move_key("b", 0, 1);
        table.move_key("a", 1, 2);
        assert_eq!(table.keys(1), vec!["b".to_string()]);
        assert_eq!(table.keys(2), vec!["a".to_string()]);
        table.move_key("b", 1, 0);
        assert!(table.keys(1).is_empty());
    }

    #[test]
    fn ttl_bounds() {
        assert!(ttl_millis(Duration::ZERO).is_err());
        assert!(ttl_millis(Duration::from_micros(10)).is_err());
        assert_eq!(ttl_millis(Duration::from_secs(2)).unwrap(), 2000);
        assert!(ttl_millis(Duration::MAX).is_err());
    }
}
