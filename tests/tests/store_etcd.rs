//! The etcd store backend against real etcd processes: the backend-agnostic conformance
//! suite, then what only etcd has — namespaces, outages and restarts, unreachable
//! endpoints, a 3-member cluster losing a member, compacted history, etcd's txn limit.
//! Every test starts its own etcd, so they run in parallel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use scabbard_common::Error;
use scabbard_controller::store::{
    EtcdConfig, EtcdStore, Op, OpResult, Store, Txn, WatchEvent, conformance,
};
use scabbard_tests::etcd::{EtcdCluster, EtcdServer};
use scabbard_tests::eventually;

/// Request timeout of the stores under test: outages must surface within it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Slack on top of a timeout for scheduling on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);
const T: Duration = Duration::from_secs(20);

fn cfg(endpoints: &str, namespace: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: endpoints.split(',').map(str::to_string).collect(),
        namespace: namespace.into(),
        request_timeout: REQUEST_TIMEOUT,
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

fn assert_unavailable<T: std::fmt::Debug>(r: scabbard_common::Result<T>, what: &str) {
    assert!(
        matches!(r, Err(Error::Unavailable(_))),
        "{what}: expected Unavailable, got {r:?}"
    );
}

/// A plain etcd client, to look behind the store's back.
async fn raw(endpoint: &str) -> anyhow::Result<etcd_client::Client> {
    Ok(etcd_client::Client::connect([endpoint], None).await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_suite_passes_on_real_etcd() -> anyhow::Result<()> {
    let etcd = EtcdServer::start()?;
    let store: Arc<dyn Store> = EtcdStore::connect(&cfg(&etcd.client_url, "/conformance/")).await?;
    assert_eq!(store.backend(), "etcd");
    conformance::run_all(store).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_isolate_two_stores_on_one_etcd() -> anyhow::Result<()> {
    let etcd = EtcdServer::start()?;
    let a = EtcdStore::connect(&cfg(&etcd.client_url, "/a/")).await?;
    let b = EtcdStore::connect(&cfg(&etcd.client_url, "/b/")).await?;
    let mut b_events = b.watch("", 0).await?;
    a.put("jobs/1", b"from-a".to_vec()).await?;
    assert_eq!(b.get("jobs/1").await?, None);
    // The same key in b is another key: creating it "if absent" succeeds.
    let created = b
        .txn(Txn {
            compares: vec![scabbard_controller::store::Compare::absent("jobs/1")],
            success: vec![Op::put("jobs/1", "from-b")],
            failure: vec![],
        })
        .await?;
    assert!(created.succeeded);
    let page = a.range("", None, 0).await?;
    let keys: Vec<&str> = page.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["jobs/1"], "callers see unprefixed keys");
    assert_eq!(page.kvs[0].value, b"from-a");
    assert_eq!(
        b.get("jobs/1").await?.map(|kv| kv.value),
        Some(b"from-b".to_vec())
    );
    // b's watch saw its own write only, unprefixed.
    match tokio::time::timeout(T, b_events.recv()).await? {
        Some(Ok(WatchEvent::Put(kv))) => {
            assert_eq!((kv.key.as_str(), &kv.value[..]), ("jobs/1", &b"from-b"[..]))
        }
        other => panic!("expected b's put, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), b_events.recv())
            .await
            .is_err(),
        "b must not see a's writes"
    );
    // In etcd itself the keys carry the namespace.
    let mut etcd_client = raw(&etcd.client_url).await?;
    let all = etcd_client
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await?;
    let raw_keys: Vec<&[u8]> = all.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(raw_keys, [&b"/a/jobs/1"[..], &b"/b/jobs/1"[..]]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_fail_fast_while_etcd_is_down_and_work_again_after_a_restart() -> anyhow::Result<()> {
    let mut etcd = EtcdServer::start()?;
    let store = EtcdStore::connect(&cfg(&etcd.client_url, "/outage/")).await?;
    store.put("k", b"v".to_vec()).await?;
    let mut watch = store.watch("", 0).await?;

    etcd.kill9();
    // The open watch ends with exactly one error.
    match tokio::time::timeout(T, watch.recv()).await? {
        Some(Err(Error::Unavailable(_))) => {}
        other => panic!("expected the watch to fail with Unavailable, got {other:?}"),
    }
    assert!(tokio::time::timeout(T, watch.recv()).await?.is_none());
    // Every call fails with Unavailable within the request timeout, naming etcd.
    let t0 = Instant::now();
    let err = store.get("k").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains(&etcd.client_url), "{err}");
    assert_unavailable(store.put("k", b"w".to_vec()).await, "put");
    assert_unavailable(store.range("", None, 0).await, "range");
    assert_unavailable(store.watch("", 0).await, "watch");
    assert_unavailable(store.lease_grant(Duration::from_secs(5)).await, "grant");
    assert_unavailable(store.health().await, "health");
    let took = t0.elapsed();
    assert!(
        took < 6 * REQUEST_TIMEOUT + SLACK,
        "six calls took {took:?} with a request timeout of {REQUEST_TIMEOUT:?}"
    );

    etcd.restart()?;
    eventually("the store to work again", T, || async {
        store.get("k").await.ok().flatten()
    })
    .await?;
    store.put("k", b"after".to_vec()).await?;
    let mut watch = store.watch("", 0).await?;
    store.put("k2", b"x".to_vec()).await?;
    match tokio::time::timeout(T, watch.recv()).await? {
        Some(Ok(WatchEvent::Put(kv))) => assert_eq!(kv.key, "k2"),
        other => panic!("expected a put after the restart, got {other:?}"),
    }
    store.health().await?;
    Ok(())
}

#[tokio::test]
async fn connecting_to_a_dead_endpoint_fails_fast_naming_it() {
    let url = format!("http://127.0.0.1:{}", scabbard_tests::free_port());
    let mut c = cfg(&url, "/x/");
    c.connect_timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let err = EtcdStore::connect(&c)
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
    assert!(
        t0.elapsed() < c.connect_timeout + SLACK,
        "{:?}",
        t0.elapsed()
    );
    // Bad settings are refused before any connection, naming the field.
    let err = EtcdStore::connect(&cfg("127.0.0.1:2379", "/x/"))
        .await
        .expect_err("not a URL");
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("etcd.endpoints")),
        "{err:?}"
    );
}

/// The member id of the cluster's leader, and each member's id, by client URL.
async fn leader_index(cluster: &EtcdCluster) -> anyhow::Result<usize> {
    for (i, m) in cluster.members.iter().enumerate() {
        let Ok(mut c) = raw(&m.client_url).await else {
            continue;
        };
        let Ok(s) = c.status().await else { continue };
        let me = s.header().map(|h| h.member_id());
        if me == Some(s.leader()) {
            return Ok(i);
        }
    }
    anyhow::bail!("no member says it leads")
}

/// `n` writes and reads in a row, each of which must succeed first time.
async fn serves_every_call(store: &EtcdStore, tag: &str, n: usize) {
    // A member that just died is taken out of the balancer after its missed probes (about
    // 1 s); from then on every call must succeed first time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while store
        .put(&format!("{tag}/probe"), b"v".to_vec())
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{tag}: the store never recovered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for i in 0..n {
        let key = format!("{tag}/{i}");
        store
            .put(&key, b"v".to_vec())
            .await
            .unwrap_or_else(|e| panic!("{tag}: put {i}: {e}"));
        let got = store
            .get(&key)
            .await
            .unwrap_or_else(|e| panic!("{tag}: get {i}: {e}"));
        assert!(got.is_some(), "{tag}: {key} missing");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_member_cluster_keeps_serving_with_one_member_down() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3)?;
    let store = EtcdStore::connect(&cfg(&etcd.endpoints(), "/ha/")).await?;
    store.put("before", b"1".to_vec()).await?;
    let leader = leader_index(&etcd).await?;

    // A follower dies: no election, and the dead endpoint must not fail any call.
    let follower = (leader + 1) % 3;
    etcd.kill9(follower);
    serves_every_call(&store, "follower-down", 30).await;
    etcd.restart(follower)?;

    // The leader dies: calls may fail while the others elect one, then all succeed.
    etcd.kill9(leader);
    eventually("writes after the leader died", T, || async {
        store.put("after", b"2".to_vec()).await.ok()
    })
    .await?;
    serves_every_call(&store, "leader-down", 30).await;
    assert_eq!(
        store.get("before").await?.map(|kv| kv.value),
        Some(b"1".to_vec())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn watching_compacted_history_is_a_failed_precondition() -> anyhow::Result<()> {
    let etcd = EtcdServer::start()?;
    let store = EtcdStore::connect(&cfg(&etcd.client_url, "/compact/")).await?;
    let first = store.put("k", b"1".to_vec()).await?;
    let last = store.put("k", b"2".to_vec()).await?;
    raw(&etcd.client_url).await?.compact(last, None).await?;
    let err = store
        .watch("", first)
        .await
        .expect_err("history before `last` is gone");
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    // From the compaction revision on, history is still there; a future revision waits.
    let mut rx = store.watch("", last).await?;
    match tokio::time::timeout(T, rx.recv()).await? {
        Some(Ok(WatchEvent::Put(kv))) => assert_eq!(kv.mod_revision, last),
        other => panic!("expected the put at {last}, got {other:?}"),
    }
    let mut future = store.watch("", last + 1).await?;
    let next = store.put("k", b"3".to_vec()).await?;
    match tokio::time::timeout(T, future.recv()).await? {
        Some(Ok(WatchEvent::Put(kv))) => assert_eq!(kv.mod_revision, next),
        other => panic!("expected the put at {next}, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_limits_leases_and_watch_cleanup() -> anyhow::Result<()> {
    let mut etcd = EtcdServer::start()?;
    let store = EtcdStore::connect(&cfg(&etcd.client_url, "/limits/")).await?;
    let as_dyn: &dyn Store = store.as_ref();
    assert_eq!(as_dyn.max_txn_ops(), 128);
    assert_eq!(store.max_txn_ops(), 128);

    // etcd takes max_txn_ops ops in one transaction and refuses one more.
    let puts = |n: usize| Txn {
        success: (0..n).map(|i| Op::put(format!("t/{i}"), "v")).collect(),
        ..Txn::default()
    };
    let ok = store.txn(puts(128)).await?;
    assert!(ok.succeeded && ok.results.iter().all(|r| *r == OpResult::Put));
    assert_eq!(store.range("t/", None, 0).await?.kvs.len(), 128);
    let err = store.txn(puts(129)).await.expect_err("over etcd's limit");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");

    // TTLs round up to whole seconds.
    let mut raw = raw(&etcd.client_url).await?;
    let lease = store.lease_grant(Duration::from_millis(10_200)).await?;
    let ttl = raw.lease_time_to_live(lease, None).await?.granted_ttl();
    assert_eq!(ttl, 11);
    store.lease_revoke(lease).await?;

    // A dropped watch is cancelled in etcd, not leaked.
    let watchers = |etcd: &mut EtcdServer| {
        etcd.member()
            .metric("etcd_debugging_mvcc_watcher_total")
            .unwrap_or(-1.0)
    };
    let rx = store.watch("", 0).await?;
    assert_eq!(watchers(&mut etcd), 1.0);
    drop(rx);
    eventually("etcd to drop the watcher", T, || {
        let n = watchers(&mut etcd);
        async move { (n == 0.0).then_some(()) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn max_txn_ops_is_checked_against_the_servers() -> anyhow::Result<()> {
    // etcd's default --max-txn-ops is 128: a controller told 256 refuses to start, saying
    // which setting to change on which side.
    let default = EtcdServer::start()?;
    let mut c = cfg(&default.client_url, "/txn-ops/");
    c.max_txn_ops = 256;
    let err = match EtcdStore::connect(&c).await {
        Ok(_) => panic!("connected with etcd.max_txn_ops above the servers' limit"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("etcd.max_txn_ops = 256") && msg.contains("--max-txn-ops=256"),
        "{msg}"
    );
    // With the servers raised to match, it connects and commits a transaction of that size
    // (which the default servers refuse).
    let raised = EtcdServer::start_with(&["--max-txn-ops=256"])?;
    c.endpoints = vec![raised.client_url.clone()];
    let store = EtcdStore::connect(&c).await?;
    assert_eq!(store.max_txn_ops(), 256);
    // Left at 0 (the default), the limit is found at start: etcd's default, or the
    // largest tried size the servers take.
    let auto = EtcdStore::connect(&cfg(&default.client_url, "/txn-ops/")).await?;
    assert_eq!(auto.max_txn_ops(), 128);
    let auto = EtcdStore::connect(&cfg(&raised.client_url, "/txn-ops/")).await?;
    assert_eq!(auto.max_txn_ops(), 256);
    let big = |n: usize| Txn {
        success: (0..n)
            .map(|i| Op::put(format!("k/{i}"), b"v".to_vec()))
            .collect(),
        ..Txn::default()
    };
    assert!(store.txn(big(255)).await?.succeeded);
    assert_eq!(store.range("k/", None, 0).await?.kvs.len(), 255);
    let small = EtcdStore::connect(&cfg(&default.client_url, "/txn-ops/")).await?;
    assert!(matches!(
        small.txn(big(255)).await,
        Err(Error::InvalidArgument(_))
    ));
    Ok(())
}
