//! Tests of the artifact cache on a real directory with real archives.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use scabbard_common::artifact::pack;
use scabbard_common::proto::{ArtifactKind, ArtifactRef};

use super::*;

/// A packed directory holding one file of `bytes` bytes of `fill`: its ref and archive.
fn archive(dir: &Path, name: &str, bytes: usize, fill: u8) -> (ArtifactRef, PathBuf) {
    let src = dir.join(format!("src-{name}"));
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/data.bin"), vec![fill; bytes]).unwrap();
    let path = dir.join(format!("{name}.tar.zst"));
    let p = pack(&src, &path).unwrap();
    let r = ArtifactRef {
        task_id: "producer".into(),
        name: name.into(),
        kind: p.kind as i32,
        sha256: p.sha256,
        size: p.size,
        ..Default::default()
    };
    (r, path)
}

/// A fetch that copies `from` and counts its calls.
fn copy_from(
    from: &Path,
    calls: &Arc<AtomicU32>,
) -> impl FnOnce(PathBuf) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>> {
    let from = from.to_path_buf();
    let calls = calls.clone();
    move |to| {
        calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::fs::copy(&from, &to).await?;
            Ok(())
        })
    }
}

fn entries(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_verified_entry_is_reused() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("cache");
    let cache = ArtifactCache::open(&root, 1 << 30).await.unwrap();
    let (r, path) = archive(d.path(), "dist", 5000, b'a');
    let calls = Arc::new(AtomicU32::new(0));
    let first = cache.get(&r, copy_from(&path, &calls)).await.unwrap();
    assert!(first.fetched);
    assert_eq!(first.kind, ArtifactKind::Directory);
    assert_eq!(first.size, 5000);
    assert_eq!(
        std::fs::read(first.content.join("sub/data.bin")).unwrap(),
        vec![b'a'; 5000]
    );
    assert_eq!(first.content, root.join(&r.sha256).join("content"));
    // The archive is not kept next to the content.
    assert_eq!(entries(&root.join(&r.sha256)), ["content"]);
    let again = cache.get(&r, copy_from(&path, &calls)).await.unwrap();
    assert!(!again.fetched);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // A new worker process adopts it.
    drop((first, again, cache));
    let cache = ArtifactCache::open(&root, 1 << 30).await.unwrap();
    let adopted = cache.get(&r, copy_from(&path, &calls)).await.unwrap();
    assert!(!adopted.fetched);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.total_bytes(), 5000);
}

#[tokio::test]
async fn a_digest_mismatch_is_refused_and_nothing_is_kept() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("cache");
    let cache = ArtifactCache::open(&root, 1 << 30).await.unwrap();
    let (r, good) = archive(d.path(), "dist", 100, b'a');
    let (_, other) = archive(d.path(), "other", 100, b'b');
    let calls = Arc::new(AtomicU32::new(0));
    let err = cache.get(&r, copy_from(&other, &calls)).await.unwrap_err();
    assert!(err.to_string().contains(&r.sha256), "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
    // The temporary entry is deleted on the blocking pool: wait for it with a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !entries(&root).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "left behind: {:?}",
            entries(&root)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cache.total_bytes(), 0);
    assert!(cache.digests().is_empty());

    // A failed fetch leaves nothing either, and a later good one works.
    let failing = |_to: PathBuf| async { Err(Error::Unavailable("store down".into())) };
    let err = cache.get(&r, failing).await.unwrap_err();
    assert!(err.to_string().contains("store down"), "{err}");
    let lease = cache.get(&r, copy_from(&good, &calls)).await.unwrap();
    assert!(lease.fetched);
}

#[tokio::test]
async fn concurrent_attempts_fetch_a_digest_once() {
    let d = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(&d.path().join("cache"), 1 << 30)
        .await
        .unwrap();
    let (r, path) = archive(d.path(), "dist", 20_000, b'z');
    let calls = Arc::new(AtomicU32::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (cache, r, path, calls, release) = (
            cache.clone(),
            r.clone(),
            path.clone(),
            calls.clone(),
            release.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let fetch = move |to: PathBuf| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                // Hold the fetch open until the test lets it finish.
                release.notified().await;
                tokio::fs::copy(&path, &to).await?;
                Ok(())
            };
            cache
                .get(&r, fetch)
                .await
                .map(|l| (l.fetched, l.content.clone()))
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while calls.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no fetch started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    release.notify_one();
    let mut fetched = 0;
    let mut paths = Vec::new();
    for t in tasks {
        let (f, p) = t.await.unwrap().unwrap();
        fetched += u32::from(f);
        paths.push(p);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "downloaded once");
    assert_eq!(fetched, 1);
    assert!(paths.iter().all(|p| *p == paths[0]));
}

#[tokio::test]
async fn eviction_takes_the_least_recently_used_and_spares_entries_in_use() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("cache");
    // Room for three 1000-byte entries.
    let cache = ArtifactCache::open(&root, 3000).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let (a, a_path) = archive(d.path(), "a", 1000, b'a');
    let (b, b_path) = archive(d.path(), "b", 1000, b'b');
    let (c, c_path) = archive(d.path(), "c", 1000, b'c');
    let (e, e_path) = archive(d.path(), "e", 1500, b'e');
    // `a` is the oldest but stays in use; `b` and `c` are released, `b` first.
    let held_a = cache.get(&a, copy_from(&a_path, &calls)).await.unwrap();
    drop(cache.get(&b, copy_from(&b_path, &calls)).await.unwrap());
    drop(cache.get(&c, copy_from(&c_path, &calls)).await.unwrap());
    assert_eq!(cache.total_bytes(), 3000);
    let held_e = cache.get(&e, copy_from(&e_path, &calls)).await.unwrap();
    // 4500 > 3000: `b` (least recently used, idle) goes, then `c`; `a` is in use.
    let mut want = vec![a.sha256.clone(), e.sha256.clone()];
    want.sort();
    assert_eq!(cache.digests(), want);
    assert_eq!(cache.total_bytes(), 2500);
    assert!(held_a.content.join("sub/data.bin").is_file());
    assert!(!root.join(&b.sha256).exists() && !root.join(&c.sha256).exists());
    assert!(held_e.content.join("sub/data.bin").is_file());

    // An entry bigger than the whole cache lives only while it is used.
    let small = ArtifactCache::open(&d.path().join("small"), 1 << 20)
        .await
        .unwrap();
    let (big, big_path) = archive(d.path(), "big", 2 << 20, b'x');
    let lease = small.get(&big, copy_from(&big_path, &calls)).await.unwrap();
    assert!(lease.content.join("sub/data.bin").is_file());
    assert_eq!(small.digests(), std::slice::from_ref(&big.sha256));
    drop(lease);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !small.digests().is_empty() || d.path().join("small").join(&big.sha256).exists() {
        assert!(tokio::time::Instant::now() < deadline, "not evicted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn leftovers_of_a_crash_are_deleted_on_open() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("cache");
    std::fs::create_dir_all(root.join(".tmp-0123/content")).unwrap();
    std::fs::create_dir_all(root.join(".evict-abc")).unwrap();
    // A digest directory without content (cannot happen through the cache, but be safe).
    std::fs::create_dir_all(root.join("a".repeat(64))).unwrap();
    let cache = ArtifactCache::open(&root, 1 << 30).await.unwrap();
    assert!(entries(&root).is_empty(), "{:?}", entries(&root));
    assert_eq!(cache.total_bytes(), 0);
}

#[tokio::test]
async fn file_artifacts_are_cached_as_files() {
    let d = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::open(&d.path().join("cache"), 1 << 30)
        .await
        .unwrap();
    let src = d.path().join("report.json");
    std::fs::write(&src, b"{}").unwrap();
    let path = d.path().join("r.tar.zst");
    let p = pack(&src, &path).unwrap();
    let r = ArtifactRef {
        task_id: "t".into(),
        name: "report".into(),
        kind: p.kind as i32,
        sha256: p.sha256,
        size: p.size,
        ..Default::default()
    };
    let calls = Arc::new(AtomicU32::new(0));
    let lease = cache.get(&r, copy_from(&path, &calls)).await.unwrap();
    assert_eq!(lease.kind, ArtifactKind::File);
    assert_eq!(std::fs::read(&lease.content).unwrap(), b"{}");
    // A ref without a digest is refused before anything is fetched.
    let bad = ArtifactRef {
        sha256: "nope".into(),
        ..r
    };
    assert!(cache.get(&bad, copy_from(&path, &calls)).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
