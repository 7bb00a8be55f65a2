//! Leader election on top of the [`Store`] interface, the way etcd's election recipe works:
//! a candidate creates the leader key bound to its own lease only if the key is absent, keeps
//! the lease alive while it leads, and everybody else watches the key until it disappears
//! (the leader resigned, or its lease expired because it died). The leader's writes carry a
//! compare on the key's mod revision (the *fence*), so a deposed leader can never commit.
//!
//! It works the same on etcd (several controllers) and on the embedded store (one).

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::backoff::Backoff;
use scabbard_common::{Error, Result};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::core::Route;
use crate::store::{CmpOp, Compare, CompareTarget, LeaseId, Op, OpResult, Store, Txn, WatchEvent};

/// Store key holding the leader's advertised address.
pub const LEADER_KEY: &str = "election/leader";

/// Held while this controller leads.
pub struct Leadership {
    /// The lease the leader key is bound to.
    pub lease: LeaseId,
    /// Compare that every write of this leader carries.
    pub fence: Compare,
    /// Cancelled when leadership is lost (lease not renewed, or a fenced write failed).
    pub lost: CancellationToken,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Gives up leadership: deletes the key so another controller takes over at once.
    pub async fn resign(self, store: &dyn Store) {
        self.keepalive.abort();
        if let Err(e) = store.lease_revoke(self.lease).await {
            warn!(error = %e, "resigning: could not revoke the leader lease (it will expire)");
        }
    }
}

/// Campaigns until this controller leads (returns `Some`) or `shutdown` (returns `None`).
/// While following, publishes the current leader's address on `route`.
pub async fn campaign(
    store: Arc<dyn Store>,
    advertise: &str,
    ttl: Duration,
    route: &watch::Sender<Route>,
    shutdown: &CancellationToken,
) -> Option<Leadership> {
    let backoff = Backoff {
        max: ttl / 2,
        ..Backoff::default()
    };
    let mut failures = 0;
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        match try_lead(&store, advertise, ttl).await {
            Ok(Ok(lead)) => return Some(lead),
            Ok(Err((leader, revision))) => {
                failures = 0;
                info!(leader = %leader, "following");
                route.send_replace(Route::Follower(Some(leader)));
                tokio::select! {
                    _ = wait_vacant(&store, revision, ttl) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, "election: store unavailable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.delay(failures)) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// One attempt: `Ok(Ok(_))` leads, `Ok(Err((leader, rev)))` someone else leads.
async fn try_lead(
    store: &Arc<dyn Store>,
    advertise: &str,
    ttl: Duration,
) -> Result<std::result::Result<Leadership, (String, i64)>> {
    let lease = store.lease_grant(ttl).await?;
    let put = Op::Put {
        key: LEADER_KEY.into(),
        value: advertise.as_bytes().to_vec(),
        lease,
    };
    let r = store
        .txn(Txn {
            compares: vec![Compare::absent(LEADER_KEY)],
            success: vec![put.clone()],
            failure: vec![Op::Get {
                key: LEADER_KEY.into(),
            }],
        })
        .await?;
    let revision = if r.succeeded {
        r.revision
    } else {
        let current = match r.results.first() {
            Some(OpResult::Get(Some(kv))) => kv.clone(),
            _ => {
                return Err(Error::internal(
                    "election: leader key vanished mid-transaction",
                ));
            }
        };
        let holder = String::from_utf8_lossy(&current.value).into_owned();
        if holder != advertise {
            let _ = store.lease_revoke(lease).await;
            return Ok(Err((holder, current.mod_revision)));
        }
        // Our own key from before a restart: take it over (a new write, so a new fence).
        let r = store
            .txn(Txn {
                compares: vec![Compare::mod_revision(LEADER_KEY, current.mod_revision)],
                success: vec![put],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            let _ = store.lease_revoke(lease).await;
            return Ok(Err((holder, current.mod_revision)));
        }
        r.revision
    };
    info!(advertise, revision, "elected leader");
    // Only elections write the leader key (renewals touch the lease, not the key), so its
    // mod revision identifies this term.
    let fence = Compare {
        key: LEADER_KEY.into(),
        op: CmpOp::Equal,
        target: CompareTarget::ModRevision(revision),
    };
    let lost = CancellationToken::new();
    let keepalive = tokio::spawn(keep_alive(store.clone(), lease, ttl, lost.clone()));
    Ok(Ok(Leadership {
        lease,
        fence,
        lost,
        keepalive,
    }))
}

/// Renews the lease every ttl/3; declares leadership lost when renewal fails for 2/3 of
/// the TTL (before the store would expire it) or the lease is gone.
async fn keep_alive(store: Arc<dyn Store>, lease: LeaseId, ttl: Duration, lost: CancellationToken) {
    let mut last_ok = Instant::now();
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = lost.cancelled() => return,
        }
        match tokio::time::timeout(ttl / 3, store.lease_keep_alive(lease)).await {
            Ok(Ok(())) => last_ok = Instant::now(),
            Ok(Err(Error::NotFound { .. })) => {
                warn!("leader lease expired: stepping down");
                lost.cancel();
                return;
            }
            Ok(Err(e)) => warn!(error = %e, "leader lease renewal failed"),
            Err(_) => warn!("leader lease renewal timed out"),
        }
        if last_ok.elapsed() >= ttl * 2 / 3 {
            warn!("leader lease not renewed in time: stepping down");
            lost.cancel();
            return;
        }
    }
}

/// Returns once the leader key is gone (or looks gone), so the caller campaigns again.
async fn wait_vacant(store: &Arc<dyn Store>, seen_revision: i64, ttl: Duration) {
    let poll = ttl / 2;
    match store.watch(LEADER_KEY, seen_revision + 1).await {
        Ok(mut events) => loop {
            match tokio::time::timeout(poll, events.recv()).await {
                Ok(Some(Ok(WatchEvent::Delete { key, .. }))) if key == LEADER_KEY => return,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => return, // watch broke: re-check by campaigning
                Err(_) => {
                    // Belt and braces: look directly now and then.
                    if matches!(store.get(LEADER_KEY).await, Ok(None) | Err(_)) {
                        return;
                    }
                }
            }
        },
        Err(_) => tokio::time::sleep(poll).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    #[tokio::test]
    async fn one_leader_at_a_time_and_takeover_after_resign() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let stop = CancellationToken::new();
        let (route_a, _) = watch::channel(Route::Follower(None));
        let (route_b, mut rx_b) = watch::channel(Route::Follower(None));
        let ttl = Duration::from_secs(2);
        let a = campaign(store.clone(), "a:1", ttl, &route_a, &stop)
            .await
            .expect("a leads");
        let b = tokio::spawn({
            let store = store.clone();
            let stop = stop.clone();
            async move { campaign(store, "b:1", ttl, &route_b, &stop).await }
        });
        rx_b.wait_for(|r| matches!(r, Route::Follower(Some(l)) if l == "a:1"))
            .await
            .unwrap();
        assert!(!b.is_finished());
        a.resign(store.as_ref()).await;
        let b = tokio::time::timeout(Duration::from_secs(5), b)
            .await
            .unwrap()
            .unwrap()
            .expect("b leads");
        // A's fence no longer holds.
        let r = store
            .txn(Txn {
                compares: vec![b.fence.clone()],
                success: vec![],
                failure: vec![],
            })
            .await
            .unwrap();
        assert!(r.succeeded);
        b.resign(store.as_ref()).await;
    }

    #[tokio::test]
    async fn a_restarted_controller_takes_back_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let stop = CancellationToken::new();
        let (route, _) = watch::channel(Route::Follower(None));
        let ttl = Duration::from_secs(30);
        let first = campaign(store.clone(), "me:1", ttl, &route, &stop)
            .await
            .unwrap();
        first.keepalive.abort(); // "crash" without resigning
        let second = tokio::time::timeout(
            Duration::from_secs(2),
            campaign(store.clone(), "me:1", ttl, &route, &stop),
        )
        .await
        .unwrap()
        .unwrap();
        let stale = store
            .txn(Txn {
                compares: vec![first.fence.clone()],
                success: vec![],
                failure: vec![],
            })
            .await
            .unwrap();
        assert!(!stale.succeeded, "the old incarnation's fence must fail");
        second.resign(store.as_ref()).await;
    }
}
