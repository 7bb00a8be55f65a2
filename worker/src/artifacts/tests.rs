//! The runner's artifact side against the in-process fake store: inputs downloaded for the
//! attempt and cached, outputs packed, checked against limits and uploaded across cuts.

use std::path::Path;
use std::time::Duration;

use scabbard_common::artifact::{pack, unpack};
use scabbard_common::client::ClientOptions;
use scabbard_common::proto::{ArtifactInput, ArtifactKind, TaskSpec, Welcome};

use super::fake::{FakeStore, Next, serve};
use super::*;

struct Setup {
    dir: tempfile::TempDir,
    store: Arc<FakeStore>,
    artifacts: Artifacts,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FakeStore::default());
    let addr = serve(store.clone()).await;
    let link = Arc::new(ControllerLink::new(&addr, ClientOptions::default()));
    link.set_token("scbd_agent_test");
    let cache = ArtifactCache::open(&dir.path().join("cache"), 1 << 30)
        .await
        .unwrap();
    let mut artifacts = Artifacts::new(cache, link);
    artifacts.upload_backoff = Backoff {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(20),
        ..Backoff::default()
    };
    artifacts.download.backoff = artifacts.upload_backoff.clone();
    Setup {
        dir,
        store,
        artifacts,
    }
}

/// A packed directory holding `files` (name, content) under `sub/`.
fn packed_tree(dir: &Path, files: &[(&str, &[u8])]) -> Vec<u8> {
    let src = dir.join(format!("src-{:x}", rand::random::<u32>()));
    std::fs::create_dir_all(src.join("sub")).unwrap();
    for (name, content) in files {
        std::fs::write(src.join("sub").join(name), content).unwrap();
    }
    let archive = dir.join(format!("{:x}.tar.zst", rand::random::<u32>()));
    pack(&src, &archive).unwrap();
    std::fs::read(&archive).unwrap()
}

fn spec_with_input(r: &ArtifactRef) -> TaskSpec {
    TaskSpec {
        inputs: vec![ArtifactInput {
            from: "${{ tasks.build.artifacts.dist }}".into(),
            path: "in/dist".into(),
            artifact: Some(r.clone()),
        }],
        ..Default::default()
    }
}

/// A log channel and the task collecting its text (ends once every sender is dropped).
fn log_channel() -> (mpsc::Sender<OutputChunk>, tokio::task::JoinHandle<String>) {
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
    let collect = tokio::spawn(async move {
        let mut text = String::new();
        while let Some(c) = rx.recv().await {
            text.push_str(&String::from_utf8_lossy(&c.data));
        }
        text
    });
    (tx, collect)
}

#[tokio::test]
async fn inputs_are_downloaded_for_the_attempt_and_then_served_from_the_cache() {
    let s = setup().await;
    let bytes = packed_tree(s.dir.path(), &[("a.txt", b"hello")]);
    let r = s
        .store
        .put("build-task", "dist", ArtifactKind::Directory, bytes);
    let cancel = CancellationToken::new();
    let spec = spec_with_input(&r);
    let (log, text) = log_channel();
    let staged = s
        .artifacts
        .stage_inputs(("consumer", 7), &spec, &log, &cancel)
        .await
        .unwrap();
    drop(log);
    let log = text.await.unwrap();
    assert_eq!(staged.inputs.len(), 1);
    let input = &staged.inputs[0];
    assert_eq!(input.path, "in/dist");
    assert_eq!(input.kind, ArtifactKind::Directory);
    assert_eq!(
        std::fs::read(input.local.join("sub/a.txt")).unwrap(),
        b"hello"
    );
    assert!(
        log.contains("input in/dist (build-task/dist)") && log.contains("downloaded in"),
        "{log}"
    );
    {
        let reqs = s.store.requests.lock().unwrap();
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            (reqs[0].for_task_id.as_str(), reqs[0].for_fencing_token),
            ("consumer", 7)
        );
        assert_eq!(*s.store.tokens.lock().unwrap(), ["Bearer scbd_agent_test"]);
    }
    // Another attempt needing the same digest: no download.
    let spec = spec_with_input(&r);
    let cancel = CancellationToken::new();
    let (log, text) = log_channel();
    let again = s
        .artifacts
        .stage_inputs(("other", 1), &spec, &log, &cancel)
        .await
        .unwrap();
    drop(log);
    let log = text.await.unwrap();
    assert_eq!(again.inputs[0].local, staged.inputs[0].local);
    assert!(log.contains("from this worker's cache"), "{log}");
    assert_eq!(s.store.requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_cut_download_resumes_and_a_corrupt_one_is_fetched_again() {
    let s = setup().await;
    let content: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let bytes = packed_tree(s.dir.path(), &[("blob", &content)]);
    assert!(bytes.len() > 5000);
    let r = s
        .store
        .put("build-task", "dist", ArtifactKind::Directory, bytes);
    s.store
        .script_downloads(&[Next::CutAfter(3000), Next::Corrupt]);
    let spec = spec_with_input(&r);
    let cancel = CancellationToken::new();
    let (log, text) = log_channel();
    let staged = s
        .artifacts
        .stage_inputs(("consumer", 7), &spec, &log, &cancel)
        .await;
    drop(log);
    drop(text);
    let staged = staged.unwrap();
    assert_eq!(
        std::fs::read(staged.inputs[0].local.join("sub/blob")).unwrap(),
        content
    );
    let offsets: Vec<u64> = s
        .store
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.offset)
        .collect();
    assert_eq!(
        offsets,
        [0, 3000, 0],
        "resumed, then restarted after the mismatch"
    );
}

#[tokio::test]
async fn a_digest_that_stays_wrong_fails_as_infrastructure_and_keeps_nothing() {
    let s = setup().await;
    let bytes = packed_tree(s.dir.path(), &[("a", b"x")]);
    let r = s
        .store
        .put("build-task", "dist", ArtifactKind::Directory, bytes);
    s.store.script_downloads(&[Next::Corrupt, Next::Corrupt]);
    let spec = spec_with_input(&r);
    let cancel = CancellationToken::new();
    let (log, text) = log_channel();
    let failed = s
        .artifacts
        .stage_inputs(("consumer", 7), &spec, &log, &cancel)
        .await;
    drop(log);
    drop(text);
    let failed = failed.unwrap_err();
    assert_eq!(failed.error_class, ErrorClass::Infrastructure);
    assert!(failed.message.contains(&r.sha256), "{}", failed.message);
    assert!(s.artifacts.cache.digests().is_empty());

    // An input the controller did not resolve.
    let spec = TaskSpec {
        inputs: vec![ArtifactInput {
            from: "x/y".into(),
            path: "in".into(),
            artifact: None,
        }],
        ..Default::default()
    };
    let cancel = CancellationToken::new();
    let (log, text) = log_channel();
    let failed = s
        .artifacts
        .stage_inputs(("consumer", 7), &spec, &log, &cancel)
        .await;
    drop(log);
    drop(text);
    let failed = failed.unwrap_err();
    assert_eq!(failed.error_class, ErrorClass::Infrastructure);
    assert!(
        failed.message.contains("not resolved"),
        "{}",
        failed.message
    );
}

/// An artifact dir holding a directory `dist` (random, incompressible `bytes`) and a file
/// `report`.
fn produced(dir: &Path, bytes: usize) -> (PathBuf, Vec<ProducedArtifact>) {
    let out = dir.join("artifacts");
    std::fs::create_dir_all(out.join("dist/deep")).unwrap();
    let noise: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    std::fs::write(out.join("dist/deep/blob"), &noise).unwrap();
    std::fs::write(out.join("report"), b"{\"ok\":true}").unwrap();
    (
        out,
        vec![
            ProducedArtifact {
                name: "dist".into(),
                kind: ArtifactKind::Directory,
            },
            ProducedArtifact {
                name: "report".into(),
                kind: ArtifactKind::File,
            },
        ],
    )
}

#[tokio::test]
async fn produced_artifacts_are_packed_uploaded_and_their_archives_removed() {
    let s = setup().await;
    let (out, list) = produced(s.dir.path(), 3 << 20);
    let cancel = CancellationToken::new();
    let (log, text) = log_channel();
    let refs = s
        .artifacts
        .publish(("producer", 4), &list, &out, &log, &cancel)
        .await
        .unwrap();
    drop(log);
    let log = text.await.unwrap();
    assert_eq!(refs.len(), 2);
    for r in &refs {
        let (stored, bytes) = s.store.get("producer", &r.name).unwrap();
        assert_eq!(&stored, r);
        assert_eq!(r.fencing_token, 4);
        assert_eq!(bytes.len() as u64, r.size);
    }
    let (_, dist) = s.store.get("producer", "dist").unwrap();
    let archive = s.dir.path().join("dist.tar.zst");
    std::fs::write(&archive, dist).unwrap();
    let back = s.dir.path().join("back");
    unpack(&archive, ArtifactKind::Directory, &back).unwrap();
    assert_eq!(
        std::fs::read(back.join("deep/blob")).unwrap(),
        std::fs::read(out.join("dist/deep/blob")).unwrap()
    );
    assert_eq!(refs[1].kind(), ArtifactKind::File);
    assert!(
        log.contains("artifact dist: 3.0 MiB packed (sha256 "),
        "{log}"
    );
    assert!(log.contains("uploaded in"), "{log}");
    // Only what the executor left remains (the runner removes the dir afterwards).
    let mut left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["dist", "report"]);
}

#[tokio::test]
async fn uploads_are_retried_from_the_start_after_a_cut() {
    let s = setup().await;
    let (out, list) = produced(s.dir.path(), 3 << 20);
    s.store.script_uploads(&[
        Next::CutAfter(1 << 20),
        Next::Refuse(tonic::Code::Unavailable),
    ]);
    let cancel = CancellationToken::new();
    let (log, text) = log_channel();
    let refs = s
        .artifacts
        .publish(("producer", 4), &list[..1], &out, &log, &cancel)
        .await
        .unwrap();
    drop(log);
    let log = text.await.unwrap();
    assert_eq!(s.store.headers.lock().unwrap().len(), 3);
    let (stored, bytes) = s.store.get("producer", "dist").unwrap();
    assert_eq!(stored, refs[0]);
    assert_eq!(bytes.len() as u64, refs[0].size);
    assert!(
        log.contains("upload try 1 failed") && log.contains("upload try 2 failed"),
        "{log}"
    );
}

#[tokio::test]
async fn refusals_end_the_attempt_with_the_controllers_message() {
    for (code, class) in [
        (tonic::Code::PermissionDenied, ErrorClass::Infrastructure),
        (tonic::Code::InvalidArgument, ErrorClass::Infrastructure),
        (tonic::Code::ResourceExhausted, ErrorClass::User),
    ] {
        let s = setup().await;
        let (out, list) = produced(s.dir.path(), 1000);
        s.store.script_uploads(&[Next::Refuse(code)]);
        let cancel = CancellationToken::new();
        let (log, text) = log_channel();
        let failed = s
            .artifacts
            .publish(("producer", 4), &list, &out, &log, &cancel)
            .await;
        drop(log);
        drop(text);
        let failed = failed.unwrap_err();
        assert_eq!(failed.outcome, Outcome::Failed);
        assert_eq!(failed.error_class, class, "{code:?}");
        assert!(
            failed.message.contains("refused dist by the test"),
            "{}",
            failed.message
        );
        assert_eq!(s.store.headers.lock().unwrap().len(), 1, "not retried");
    }
}

#[tokio::test]
async fn the_controllers_limits_fail_the_attempt_as_a_user_error_before_uploading() {
    let s = setup().await;
    let (out, list) = produced(s.dir.path(), 100_000);
    s.artifacts.link.welcomed(&Welcome {
        max_artifact_bytes: 50_000,
        ..Default::default()
    });
    let cancel = CancellationToken::new();
    let (log, text) = log_channel();
    let failed = s
        .artifacts
        .publish(("producer", 4), &list, &out, &log, &cancel)
        .await;
    drop(log);
    drop(text);
    let failed = failed.unwrap_err();
    assert_eq!(failed.error_class, ErrorClass::User);
    let m = &failed.message;
    assert!(
        m.contains("artifact dist is") && m.contains("max_artifact_bytes = 50000"),
        "{m}"
    );
    assert!(m.contains("controller's limit"), "{m}");

    // Each fits, together they do not.
    let dist_size = {
        let a = s.dir.path().join("probe.tar.zst");
        pack(&out.join("dist"), &a).unwrap().size
    };
    s.artifacts.link.welcomed(&Welcome {
        max_artifact_bytes: 0,
        max_task_artifact_bytes: dist_size + 10,
        ..Default::default()
    });
    let cancel = CancellationToken::new();
    let (log, text) = log_channel();
    let failed = s
        .artifacts
        .publish(("producer", 4), &list, &out, &log, &cancel)
        .await;
    drop(log);
    drop(text);
    let m = failed.unwrap_err().message;
    assert!(
        m.contains("artifact report") && m.contains("max_task_artifact_bytes"),
        "{m}"
    );
    assert!(
        s.store.headers.lock().unwrap().is_empty(),
        "nothing was uploaded"
    );
}

#[tokio::test]
async fn a_cancel_stops_upload_retries() {
    let s = setup().await;
    let (out, list) = produced(s.dir.path(), 1000);
    s.store
        .script_uploads(&[Next::Refuse(tonic::Code::Unavailable); 1000]);
    let cancel = CancellationToken::new();
    let store = s.store.clone();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.headers.lock().unwrap().len() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        canceller.cancel();
    });
    let (log, text) = log_channel();
    let failed = tokio::time::timeout(
        Duration::from_secs(20),
        s.artifacts
            .publish(("producer", 4), &list, &out, &log, &cancel),
    )
    .await
    .expect("the cancel ended the retries");
    drop(log);
    drop(text);
    let failed = failed.unwrap_err();
    assert_eq!(failed.outcome, Outcome::Cancelled);
    assert!(failed.message.contains("uploading"), "{}", failed.message);
}
