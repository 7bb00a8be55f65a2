//! The catalog against a real embedded store: two catalogs stand for two controllers
//! sharing one store.

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::proto::{CreateTokenRequest, Scope, TokenKind};
use tokio_util::sync::CancellationToken;

use super::{Bootstrap, Catalog, DefaultLimits};
use crate::auth::principal::Principal;
use crate::store::{EmbeddedStore, Store};

fn admin() -> Principal {
    Principal::internal("tok_test", "test admin")
}

async fn two_catalogs() -> (
    tempfile::TempDir,
    Arc<Catalog>,
    Arc<Catalog>,
    CancellationToken,
) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
    let stop = CancellationToken::new();
    let a = Catalog::open(store.clone(), None, DefaultLimits::default(), stop.clone())
        .await
        .unwrap();
    let b = Catalog::open(store, None, DefaultLimits::default(), stop.clone())
        .await
        .unwrap();
    (dir, a, b, stop)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn bootstrap_happens_once_across_controllers() {
    let (_d, a, b, stop) = two_catalogs().await;
    let (ra, rb) = tokio::join!(a.bootstrap(None), b.bootstrap(None));
    let created = [ra.unwrap(), rb.unwrap()]
        .into_iter()
        .filter(|r| matches!(r, Bootstrap::Created { .. }))
        .count();
    assert_eq!(created, 1);
    assert!(matches!(
        a.bootstrap(None).await.unwrap(),
        Bootstrap::AlreadyDone
    ));
    assert!(a.project("default").is_some());
    stop.cancel();
}

#[tokio::test]
async fn registration_uses_are_counted_exactly_under_contention() {
    let (_d, a, b, stop) = two_catalogs().await;
    a.bootstrap(None).await.unwrap();
    let (_, secret) = a
        .create_token(
            &admin(),
            CreateTokenRequest {
                kind: TokenKind::Registration as i32,
                max_uses: 5,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually("b to learn the token", || b.authenticate(&secret).is_ok()).await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let c = if i % 2 == 0 { a.clone() } else { b.clone() };
        let s = secret.clone();
        calls.push(tokio::spawn(
            async move { c.use_registration_token(&s).await },
        ));
    }
    let mut ok = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert!(
                matches!(
                    e.code(),
                    tonic::Code::Unauthenticated | tonic::Code::Unavailable
                ),
                "{e}"
            ),
        }
    }
    assert_eq!(ok, 5, "exactly max_uses registrations succeed");
    stop.cancel();
}

#[tokio::test]
async fn revocation_on_one_controller_reaches_the_other_and_is_broadcast() {
    let (_d, a, b, stop) = two_catalogs().await;
    a.bootstrap(None).await.unwrap();
    let (info, secret) = a
        .create_token(
            &admin(),
            CreateTokenRequest {
                scopes: vec![Scope::Read as i32],
                project: "default".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eventually("b to learn the token", || b.authenticate(&secret).is_ok()).await;
    let mut revoked = b.revocations();
    a.revoke_token(&admin(), &info.id, "test").await.unwrap();
    // Refused at once where it was revoked.
    assert_eq!(
        a.authenticate(&secret).unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let id = tokio::time::timeout(Duration::from_secs(5), revoked.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, info.id);
    assert!(b.authenticate(&secret).is_err());
    // Revoking again is a no-op that still answers.
    assert!(
        a.revoke_token(&admin(), &info.id, "again")
            .await
            .unwrap()
            .revoked
    );
    stop.cancel();
}

#[tokio::test]
async fn bad_token_requests_are_refused_with_field_names() {
    let (_d, a, _b, stop) = two_catalogs().await;
    a.bootstrap(None).await.unwrap();
    let cases = [
        (
            CreateTokenRequest {
                kind: TokenKind::Agent as i32,
                ..Default::default()
            },
            "kind",
        ),
        (CreateTokenRequest::default(), "scopes"),
        (
            CreateTokenRequest {
                scopes: vec![99],
                ..Default::default()
            },
            "scopes",
        ),
        (
            CreateTokenRequest {
                scopes: vec![Scope::Read as i32],
                project: "nope".into(),
                ..Default::default()
            },
            "nope",
        ),
        (
            CreateTokenRequest {
                scopes: vec![Scope::Read as i32],
                ttl_ms: u64::MAX,
                ..Default::default()
            },
            "ttl_ms",
        ),
        (
            CreateTokenRequest {
                kind: TokenKind::Registration as i32,
                scopes: vec![Scope::Read as i32],
                ..Default::default()
            },
            "scopes",
        ),
    ];
    for (req, field) in cases {
        let e = a.create_token(&admin(), req.clone()).await.unwrap_err();
        assert!(e.to_string().contains(field), "{req:?}: {e}");
    }
    stop.cancel();
}
