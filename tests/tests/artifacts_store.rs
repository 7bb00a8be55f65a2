//! The artifact store below the service, and the client library's download: the store
//! writing atomically on a real S3 server (`moto_server`), and a download whose connection
//! drops resuming where it stopped.

use std::time::Duration;

use anyhow::Result;
use scabbard_common::client::{self, ArtifactServiceClient};
use scabbard_common::proto::{
    ArtifactSpec, DownloadArtifactRequest, Outcome, Requirements, TaskResult, TaskSpec, TaskState,
};
use scabbard_tests::agent::{FakeAgent, header, pattern, sha, upload};
use scabbard_tests::moto::MotoServer;
use scabbard_tests::*;
use tonic::Code;

const T: Duration = Duration::from_secs(30);

/// Waits until `bucket` holds exactly `want` and no unfinished multipart upload.
async fn wait_stored(moto: &MotoServer, bucket: &str, what: &str, want: &[&str]) -> Result<()> {
    let end = std::time::Instant::now() + T;
    loop {
        let keys = moto.keys(bucket).await?;
        let pending = moto.pending_uploads(bucket).await?;
        if keys == want && pending.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > end {
            anyhow::bail!(
                "timed out waiting for {what}: keys {keys:?}, unfinished uploads {pending:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn shell_on(agent: &str, artifacts: &[&str]) -> TaskSpec {
    TaskSpec {
        requirements: Some(Requirements {
            labels: [("name".to_string(), agent.to_string())].into(),
            ..Default::default()
        }),
        artifacts: artifacts
            .iter()
            .map(|name| ArtifactSpec {
                name: name.to_string(),
                path: format!("out/{name}"),
                optional: false,
            })
            .collect(),
        ..shell("true")
    }
}

fn succeeded() -> TaskResult {
    TaskResult {
        outcome: Outcome::Succeeded as i32,
        ..Default::default()
    }
}

/// The store itself on S3 (what the controller's unit tests do on local disk): a complete
/// upload reads back from any offset; a wrong digest, a wrong size or a broken stream
/// leaves no object and no unfinished multipart upload.
#[tokio::test]
async fn s3_store_writes_atomically() -> Result<()> {
    use bytes::Bytes;
    use futures::StreamExt;
    use scabbard_controller::artifacts::{ArtifactStore, Expected};

    let moto = MotoServer::start().await?;
    moto.create_bucket("store-unit").await?;
    let dir = tempfile::tempdir()?;
    let store = ArtifactStore::open(&moto.config("store-unit"), dir.path())?;
    store.probe().await?;
    let key = store.key("t1", 7, "dist");
    // Two 8 MiB parts and a short last one.
    let body = pattern((17 << 20) + 99, 5);
    let chunks = |data: &[u8]| -> Vec<scabbard_common::Result<Bytes>> {
        data.chunks(1 << 20)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    };
    let expected = |data: &[u8]| Expected {
        what: "artifact \"dist\" of task t1".into(),
        size: data.len() as u64,
        sha256: sha(data),
    };

    let mut wrong = expected(&body);
    wrong.sha256 = sha(b"not it");
    let e = store
        .put_stream(&key, &wrong, futures::stream::iter(chunks(&body)))
        .await
        .expect_err("digest");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = store
        .put_stream(
            &key,
            &expected(&body),
            futures::stream::iter(chunks(&body[..body.len() - 10])),
        )
        .await
        .expect_err("size");
    assert!(e.to_string().contains("ended after"), "{e}");
    let mut cut = chunks(&body);
    cut.truncate(12);
    cut.push(Err(scabbard_common::Error::Unavailable("reset".into())));
    let e = store
        .put_stream(&key, &expected(&body), futures::stream::iter(cut))
        .await
        .expect_err("cut");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    wait_stored(&moto, "store-unit", "refused uploads to leave nothing", &[]).await?;
    assert!(!store.exists(&key).await?);

    store
        .put_stream(&key, &expected(&body), futures::stream::iter(chunks(&body)))
        .await?;
    wait_stored(
        &moto,
        "store-unit",
        "the object",
        &["artifacts/t1/7/dist.tar.zst"],
    )
    .await?;
    for from in [0u64, 9_000_001, body.len() as u64] {
        let mut got = Vec::new();
        let mut s = store.read_from(&key, from, body.len() as u64).await?;
        while let Some(c) = s.next().await {
            let c = c?;
            assert!(c.len() <= 1 << 20);
            got.extend_from_slice(&c);
        }
        assert!(got == body[from as usize..], "read from {from}");
    }
    store.delete(&key).await?;
    wait_stored(&moto, "store-unit", "the delete", &[]).await?;
    Ok(())
}

/// Writes into a buffer and cuts every connection of `proxy` once `cut_at` bytes arrived.
struct CuttingSink<'a> {
    data: Vec<u8>,
    cut_at: usize,
    proxy: &'a scabbard_tests::proxy::Proxy,
    cut: bool,
}

impl scabbard_common::client::ArtifactSink for CuttingSink<'_> {
    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(data);
        if !self.cut && self.data.len() >= self.cut_at {
            self.cut = true;
            self.proxy.cut(false);
        }
        Ok(())
    }

    async fn restart(&mut self) -> std::io::Result<()> {
        self.data.clear();
        Ok(())
    }
}

/// The client library resumes a download whose connection drops, at the byte it got to,
/// and still checks the whole archive's digest.
#[tokio::test]
async fn a_dropped_download_resumes_where_it_stopped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(&dir.path().join("c"), 0, &ControllerOpts::default())?;
    let addr = c.addr.to_string();
    let mut a = FakeAgent::connect(&addr, "a").await?;
    let mut tasks = tasks_client(&addr).await?;
    let id = submit(&mut tasks, shell_on("a", &["dist"])).await?;
    let assign = a.accept_next(T).await?;
    let body = pattern(24 << 20, 9);
    let r = upload(
        &mut a.artifacts(),
        header(&id, assign.fencing_token, "dist", &body),
        &body,
    )
    .await?;
    a.finish(&id, assign.fencing_token, succeeded()).await?;
    wait_state(&mut tasks, &id, Some(TaskState::Succeeded), T).await?;

    let proxy = scabbard_tests::proxy::Proxy::start(c.addr).await?;
    let reader = ArtifactServiceClient::new(with_token(
        client::connect(&proxy.addr.to_string()).await?,
        ADMIN_TOKEN,
    ));
    let mut sink = CuttingSink {
        data: Vec::new(),
        cut_at: 2 << 20,
        proxy: &proxy,
        cut: false,
    };
    let got = client::artifacts::download_from(
        reader.clone(),
        &DownloadArtifactRequest {
            task_id: id.clone(),
            name: "dist".into(),
            ..Default::default()
        },
        &mut sink,
    )
    .await?;
    assert_eq!(got, r);
    assert!(sink.cut, "the connection was cut");
    assert!(
        proxy.accepted() >= 2,
        "the download must have reconnected ({} connections)",
        proxy.accepted()
    );
    assert!(sink.data == body, "resumed bytes differ");
    Ok(())
}
