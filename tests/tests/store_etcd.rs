//! The store conformance suite and etcd-specific behaviour against a real etcd.

use std::sync::Arc;
use std::time::Duration;

use scabbard_controller::store::{EtcdConfig, EtcdStore, Store, conformance};
use scabbard_tests::etcd::EtcdCluster;

fn cfg(endpoints: &str, namespace: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: endpoints.split(',').map(str::to_string).collect(),
        namespace: namespace.into(),
        request_timeout_ms: 2_000,
        connect_timeout_ms: 2_000,
        ..Default::default()
    }
}

#[tokio::test]
async fn conformance_suite_passes_on_real_etcd() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let store: Arc<dyn Store> =
        EtcdStore::connect(&cfg(&etcd.endpoints(), "/conformance/")).await?;
    conformance::run_all(store).await;
    Ok(())
}

#[tokio::test]
async fn namespaces_isolate_and_a_restarted_etcd_is_used_again() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(1)?;
    let a = EtcdStore::connect(&cfg(&etcd.endpoints(), "/a/")).await?;
    let b = EtcdStore::connect(&cfg(&etcd.endpoints(), "/b/")).await?;
    a.put("k", b"from-a".to_vec()).await?;
    assert!(b.get("k").await?.is_none());
    assert_eq!(a.get("k").await?.unwrap().value, b"from-a");
    assert_eq!(a.range("", None, 0).await?.kvs.len(), 1);

    etcd.members[0].kill9();
    let err = a.get("k").await.unwrap_err();
    assert!(
        matches!(err, scabbard_common::Error::Unavailable(_)),
        "{err}"
    );
    etcd.members[0].restart()?;
    etcd.wait_healthy(Duration::from_secs(30))?;
    scabbard_tests::eventually(
        "the store to work again",
        Duration::from_secs(30),
        || async { a.get("k").await.ok().flatten() },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn unreachable_etcd_fails_fast_naming_the_endpoint() {
    let port = scabbard_tests::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let t0 = std::time::Instant::now();
    let err = EtcdStore::connect(&cfg(&url, "/x/"))
        .await
        .err()
        .expect("must fail");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    assert!(matches!(err, scabbard_common::Error::Unavailable(_)));
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn three_member_cluster_survives_one_member_down() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3)?;
    let store = EtcdStore::connect(&cfg(&etcd.endpoints(), "/ha/")).await?;
    store.put("before", b"1".to_vec()).await?;
    etcd.members[0].kill9();
    scabbard_tests::eventually(
        "writes with one member down",
        Duration::from_secs(30),
        || async { store.put("after", b"2".to_vec()).await.ok() },
    )
    .await?;
    assert_eq!(store.get("before").await?.unwrap().value, b"1");
    Ok(())
}
