//! Leader election on top of the [`Store`] interface, the way etcd's election recipe works:
//! a candidate creates the leader key bound to its own lease only if the key is absent, keeps
//! the lease alive while it leads, and everybody else watches the key until it disappears
//! (the leader resigned, or its lease expired because it died). The leader's writes carry a
//! compare on the key's mod revision (the *fence*), so a deposed leader can never commit.
//!
//! It works the same on etcd (several controllers) and on the embedded store (one).
//!
//! The key's value is `<node id> <advertised address>`: the node id is random per
//! controller (kept in `<data_dir>/node-id`), so two controllers that advertise the same
//! address never take the key from each other; followers read the address after the space
//! for their redirects ([`leader_address`]). A restarted controller takes its own key back
//! at once only when the node id matches — the same data dir, so really the same node;
//! anything else (another node, or a value from before node ids) waits for its lease.

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

/// Store key holding the leader's node id and advertised address (`<node id> <address>`).
pub const LEADER_KEY: &str = "election/leader";

/// Name of the file in the data dir holding this controller's node id.
const NODE_ID_FILE: &str = "node-id";

/// Who campaigns: a node id unique to this controller and the address it advertises.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Random, persisted in the data dir: the same node after a restart.
    pub node_id: String,
    /// Where followers redirect to while this node leads.
    pub advertise: String,
}

impl Candidate {
    fn value(&self) -> String {
        format!("{} {}", self.node_id, self.advertise)
    }
}

/// Splits a leader key value into (node id, address); a value from before node ids is
/// the address alone.
fn parse_value(value: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(value);
    match text.split_once(' ') {
        Some((node, addr)) => (node.to_string(), addr.to_string()),
        None => (String::new(), text.into_owned()),
    }
}

/// The leader's advertised address from the leader key's value (for redirects).
pub fn leader_address(value: &[u8]) -> String {
    parse_value(value).1
}

/// This controller's node id: read from `<data_dir>/node-id`, or made (random) and saved
/// there on first start (created exclusively, owner-only).
pub fn node_id(data_dir: &std::path::Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() && !id.trim().contains(char::is_whitespace) => {
            return Ok(id.trim().to_string());
        }
        Ok(_) => {
            return Err(Error::invalid(format!(
                "{} is malformed: delete it (a new node id is made)",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    std::fs::create_dir_all(data_dir)?;
    let id = format!("node-{}", ulid::Ulid::new().to_string().to_lowercase());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    writeln!(f, "{id}")?;
    f.sync_all()?;
    Ok(id)
}

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
    me: &Candidate,
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
        match try_lead(&store, me, ttl).await {
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
    me: &Candidate,
    ttl: Duration,
) -> Result<std::result::Result<Leadership, (String, i64)>> {
    // The lease lives at least `ttl` from when the grant was sent.
    let granted = Instant::now();
    let lease = store.lease_grant(ttl).await?;
    let put = Op::Put {
        key: LEADER_KEY.into(),
        value: me.value().into_bytes(),
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
        let (holder_node, holder) = parse_value(&current.value);
        if holder_node != me.node_id {
            let _ = store.lease_revoke(lease).await;
            return Ok(Err((holder, current.mod_revision)));
        }
        // Our own key from before a restart (same node id: same data dir): take it over
        // (a new write, so a new fence).
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
    info!(advertise = %me.advertise, node = %me.node_id, revision, "elected leader");
    // Only elections write the leader key (renewals touch the lease, not the key), so its
    // mod revision identifies this term.
    let fence = Compare {
        key: LEADER_KEY.into(),
        op: CmpOp::Equal,
        target: CompareTarget::ModRevision(revision),
    };
    let lost = CancellationToken::new();
    let keepalive = tokio::spawn(keep_alive(store.clone(), lease, ttl, granted, lost.clone()));
    Ok(Ok(Leadership {
        lease,
        fence,
        lost,
        keepalive,
    }))
}

/// Renews the lease every ttl/6 and declares leadership lost when no renewal succeeded for
/// a whole TTL (or the lease is gone).
///
/// Times count from when a renewal was *sent*: the store extends the lease to at least that
/// instant plus the TTL, so by the time this leader steps down no other controller can have
/// been elected before it (etcd only expires a lease through its own leader, and a new etcd
/// leader first extends every lease by a TTL). Renewing six times per TTL and waiting out a
/// whole TTL is what lets a leader ride through an etcd leader election (1–2 s without an
/// etcd leader, plus dropping the dead endpoint): the earlier bound of 2/3 of the TTL, with
/// renewals every third of it, cost the Scabbard leader its term on most etcd member kills.
/// Nothing a leader does between losing the lease and noticing can do harm: its commits
/// are fenced on the leader key, and every answer and assignment follows a commit.
async fn keep_alive(
    store: Arc<dyn Store>,
    lease: LeaseId,
    ttl: Duration,
    granted: Instant,
    lost: CancellationToken,
) {
    let mut last_ok = granted;
    let every = ttl / 6;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = lost.cancelled() => return,
        }
        let sent = Instant::now();
        // A try may take until the step-down bound: a slow answer still renews.
        let left = (last_ok + ttl).saturating_duration_since(sent);
        match tokio::time::timeout(left.max(every), store.lease_keep_alive(lease)).await {
            Ok(Ok(())) => last_ok = sent,
            Ok(Err(Error::NotFound { .. })) => {
                warn!("leader lease expired: stepping down");
                lost.cancel();
                return;
            }
            Ok(Err(e)) => warn!(error = %e, "leader lease renewal failed"),
            Err(_) => warn!("leader lease renewal timed out"),
        }
        if last_ok.elapsed() >= ttl {
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

    fn node(id: &str, addr: &str) -> Candidate {
        Candidate {
            node_id: id.into(),
            advertise: addr.into(),
        }
    }

    #[tokio::test]
    async fn one_leader_at_a_time_and_takeover_after_resign() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let stop = CancellationToken::new();
        let (route_a, _) = watch::channel(Route::Follower(None));
        let (route_b, mut rx_b) = watch::channel(Route::Follower(None));
        let ttl = Duration::from_secs(2);
        let a = campaign(store.clone(), &node("na", "a:1"), ttl, &route_a, &stop)
            .await
            .expect("a leads");
        let b = tokio::spawn({
            let store = store.clone();
            let stop = stop.clone();
            async move { campaign(store, &node("nb", "b:1"), ttl, &route_b, &stop).await }
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
        let first = campaign(store.clone(), &node("n1", "me:1"), ttl, &route, &stop)
            .await
            .unwrap();
        first.keepalive.abort(); // "crash" without resigning
        let second = tokio::time::timeout(
            Duration::from_secs(2),
            campaign(store.clone(), &node("n1", "me:1"), ttl, &route, &stop),
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

    #[tokio::test]
    async fn two_nodes_with_the_same_advertise_address_do_not_steal_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let stop = CancellationToken::new();
        let (route_a, _) = watch::channel(Route::Follower(None));
        let (route_b, mut rx_b) = watch::channel(Route::Follower(None));
        let ttl = Duration::from_secs(30);
        let a = campaign(store.clone(), &node("na", "same:1"), ttl, &route_a, &stop)
            .await
            .expect("a leads");
        let b = tokio::spawn({
            let store = store.clone();
            let stop = stop.clone();
            async move { campaign(store, &node("nb", "same:1"), ttl, &route_b, &stop).await }
        });
        // B follows, redirecting to the (shared) address, and does not lead.
        tokio::time::timeout(
            Duration::from_secs(5),
            rx_b.wait_for(|r| matches!(r, Route::Follower(Some(l)) if l == "same:1")),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(!b.is_finished(), "b must not take a's key");
        // A's fence still holds: nobody wrote the key again.
        let r = store
            .txn(Txn {
                compares: vec![a.fence.clone()],
                success: vec![],
                failure: vec![],
            })
            .await
            .unwrap();
        assert!(r.succeeded, "a is still the leader of its term");
        let kv = store.get(LEADER_KEY).await.unwrap().unwrap();
        assert_eq!(leader_address(&kv.value), "same:1");
        stop.cancel();
        let _ = b.await;
        a.resign(store.as_ref()).await;
    }

    #[test]
    fn the_node_id_is_made_once_and_kept_and_old_values_still_give_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let first = node_id(dir.path()).unwrap();
        assert!(first.starts_with("node-"));
        assert_eq!(
            node_id(dir.path()).unwrap(),
            first,
            "same data dir, same node"
        );
        let other = tempfile::tempdir().unwrap();
        assert_ne!(node_id(other.path()).unwrap(), first);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(NODE_ID_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(leader_address(b"node-x 10.0.0.1:7400"), "10.0.0.1:7400");
        assert_eq!(leader_address(b"10.0.0.1:7400"), "10.0.0.1:7400");
        assert_eq!(
            parse_value(b"10.0.0.1:7400").0,
            "",
            "legacy: no node owns it"
        );
    }
}
