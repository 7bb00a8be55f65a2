//! The store against local disk: what a completed upload leaves, and that nothing is left
//! by a refused or cut one. (The same against a real S3 server: tests/tests/artifacts.rs.)

use bytes::Bytes;
use futures::StreamExt;
use scabbard_common::artifact::Sha256;
use scabbard_common::{Error, Result};

use super::*;

fn sha(data: &[u8]) -> String {
    let mut h = Sha256::default();
    h.update(data);
    h.finish()
}

fn local(dir: &std::path::Path) -> std::sync::Arc<ArtifactStore> {
    ArtifactStore::open(&ArtifactsConfig::default(), dir).expect("open")
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn chunks(data: &[u8]) -> Vec<Result<Bytes>> {
    data.chunks(CHUNK_BYTES)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

fn expected(data: &[u8]) -> Expected {
    Expected {
        what: "artifact \"dist\" of task t1".into(),
        size: data.len() as u64,
        sha256: sha(data),
    }
}

async fn read_all(
    s: &ArtifactStore,
    key: &object_store::path::Path,
    from: u64,
    size: u64,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut st = s.read_from(key, from, size).await.expect("read");
    while let Some(c) = st.next().await {
        let c = c.expect("chunk");
        assert!(c.len() <= CHUNK_BYTES);
        out.extend_from_slice(&c);
    }
    out
}

/// Every file under `dir` (staging files included).
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn a_complete_upload_reads_back_from_any_offset() {
    let d = tempfile::tempdir().unwrap();
    let s = local(d.path());
    let key = s.key("t1", 3, "dist");
    assert_eq!(key.as_ref(), "t1/3/dist.tar.zst");
    // More than one part, not a multiple of the chunk size.
    let body = data(17 * 1024 * 1024 + 123);
    s.put_stream(&key, &expected(&body), futures::stream::iter(chunks(&body)))
        .await
        .unwrap();
    assert!(d.path().join("artifacts/t1/3/dist.tar.zst").is_file());
    assert!(s.exists(&key).await.unwrap());
    let n = body.len() as u64;
    assert_eq!(read_all(&s, &key, 0, n).await, body);
    assert_eq!(read_all(&s, &key, 5_000_001, n).await, body[5_000_001..]);
    assert!(read_all(&s, &key, n, n).await.is_empty());
    s.delete(&key).await.unwrap();
    assert!(!s.exists(&key).await.unwrap());
    assert!(files(d.path()).is_empty(), "{:?}", files(d.path()));
}

#[tokio::test]
async fn refused_uploads_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = local(d.path());
    let key = s.key("t1", 1, "dist");
    let body = data(9 * 1024 * 1024);

    // Wrong digest.
    let mut wrong = expected(&body);
    wrong.sha256 = sha(b"something else");
    let e = s
        .put_stream(&key, &wrong, futures::stream::iter(chunks(&body)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.to_string().contains("SHA-256"), "{e}");

    // Fewer bytes than announced.
    let e = s
        .put_stream(
            &key,
            &expected(&body),
            futures::stream::iter(chunks(&body[..body.len() - 1])),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ended after"), "{e}");

    // More bytes than announced.
    let mut short = expected(&body);
    short.size -= 10;
    let e = s
        .put_stream(&key, &short, futures::stream::iter(chunks(&body)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("more data"), "{e}");

    // The client's stream breaks midway.
    let mut cut: Vec<Result<Bytes>> = chunks(&body).into_iter().take(6).collect();
    cut.push(Err(Error::Unavailable("connection reset".into())));
    let e = s
        .put_stream(&key, &expected(&body), futures::stream::iter(cut))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.to_string().contains("cut after 6291456"), "{e}");

    // The handler is dropped midway (client gone, shutdown): the stream never ends.
    let pending =
        futures::stream::iter(chunks(&body).into_iter().take(7)).chain(futures::stream::pending());
    let exp = expected(&body);
    let upload = s.put_stream(&key, &exp, Box::pin(pending));
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), upload)
            .await
            .is_err()
    );
    wait_until(|| files(d.path()).is_empty()).await;
    assert!(!s.exists(&key).await.unwrap());
}

#[tokio::test]
async fn a_refused_reupload_keeps_the_earlier_object() {
    let d = tempfile::tempdir().unwrap();
    let s = local(d.path());
    let key = s.key("t1", 1, "dist");
    let body = data(1000);
    s.put_stream(&key, &expected(&body), futures::stream::iter(chunks(&body)))
        .await
        .unwrap();
    let other = data(2000);
    let mut bad = expected(&other);
    bad.sha256 = sha(b"x");
    assert!(
        s.put_stream(&key, &bad, futures::stream::iter(chunks(&other)))
            .await
            .is_err()
    );
    assert_eq!(read_all(&s, &key, 0, 1000).await, body);
}

#[tokio::test]
async fn discards_delete_in_the_background() {
    let d = tempfile::tempdir().unwrap();
    let s = local(d.path());
    let body = data(10);
    let keys: Vec<_> = (1..=3).map(|i| s.key("t9", i, "out")).collect();
    for k in &keys {
        s.put_stream(k, &expected(&body), futures::stream::iter(chunks(&body)))
            .await
            .unwrap();
    }
    s.discard(keys.clone());
    wait_until(|| files(d.path()).is_empty()).await;
    // A missing object reads as NOT_FOUND, naming the key.
    let e = match s.read_from(&keys[0], 0, 10).await {
        Err(e) => e,
        Ok(_) => panic!("deleted object still readable"),
    };
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.to_string().contains("t9/1/out.tar.zst"), "{e}");
}

#[test]
fn names_and_sizes_read_well() {
    assert!(check_name("name", "dist-1.2_x").is_ok());
    for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129)] {
        assert!(check_name("name", bad).is_err(), "{bad:?}");
    }
    assert_eq!(fmt_bytes(512), "512 B");
    assert_eq!(fmt_bytes(5 << 30), "5.0 GiB");
    assert_eq!(fmt_bytes(300 << 20), "300.0 MiB");
}

/// Polls `f` every 10 ms for up to 5 s.
async fn wait_until(f: impl Fn() -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !f() {
        assert!(
            std::time::Instant::now() < end,
            "condition not met within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
