//! The artifact store end to end through a real controller process: uploads by the agent
//! running the attempt (checked, limited, atomic), what a finished task serves, downloads
//! by agents for their inputs and by API tokens of the task's project, resumable from an
//! offset — on the local backend and on S3 (a real `moto_server`). Agents are driven by
//! hand (`FakeAgent`), so every refusal can be provoked exactly.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use scabbard_common::client::{self, ArtifactServiceClient, ProjectServiceClient};
use scabbard_common::proto::{
    ArtifactInput, ArtifactKind, ArtifactRef, ArtifactSpec, CreateProjectRequest,
    CreateTokenRequest, DownloadArtifactRequest, ErrorClass, ListArtifactsRequest, Outcome,
    Project, Requirements, Scope, StatArtifactRequest, TaskResult, TaskSpec, TaskState, TokenKind,
    download_artifact_response,
};
use scabbard_tests::agent::{FakeAgent, header, messages, pattern, sha, upload};
use scabbard_tests::moto::{MotoServer, SECRET_ACCESS_KEY};
use scabbard_tests::*;
use tonic::Code;

const T: Duration = Duration::from_secs(30);

type Artifacts = ArtifactServiceClient<client::AuthedChannel>;

/// Where a controller keeps its artifacts, seen from the test.
enum Blobs {
    /// The local backend's directory.
    Local(PathBuf),
    /// A bucket on a moto server.
    S3 { moto: MotoServer, bucket: String },
}

impl Blobs {
    /// Everything stored, finished or not: files (staging files included) or keys and
    /// unfinished multipart uploads.
    async fn objects(&self) -> Vec<String> {
        match self {
            Blobs::Local(dir) => {
                let mut out = Vec::new();
                let mut stack = vec![dir.clone()];
                while let Some(d) = stack.pop() {
                    for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                        if e.path().is_dir() {
                            stack.push(e.path());
                        } else {
                            let p = e.path();
                            out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
                        }
                    }
                }
                out.sort();
                out
            }
            Blobs::S3 { moto, bucket } => {
                let mut out = moto.keys(bucket).await.expect("list keys");
                out.extend(
                    moto.pending_uploads(bucket)
                        .await
                        .expect("list uploads")
                        .into_iter()
                        .map(|k| format!("(unfinished upload) {k}")),
                );
                out
            }
        }
    }

    /// Waits until exactly `want` is stored.
    async fn wait_for(&self, what: &str, want: &[String]) -> Result<()> {
        let end = std::time::Instant::now() + T;
        loop {
            let now = self.objects().await;
            if now == want {
                return Ok(());
            }
            if std::time::Instant::now() > end {
                anyhow::bail!("timed out waiting for {what}: stored {now:?}, want {want:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The stored key of an artifact (relative to the directory, or the bucket).
    fn key(&self, task: &str, token: u64, name: &str) -> String {
        match self {
            Blobs::Local(_) => format!("{task}/{token}/{name}.tar.zst"),
            Blobs::S3 { .. } => format!("ci/artifacts/{task}/{token}/{name}.tar.zst"),
        }
    }
}

/// The ref and the bytes of a download.
async fn download(
    c: &mut Artifacts,
    req: DownloadArtifactRequest,
) -> std::result::Result<(ArtifactRef, Vec<u8>), tonic::Status> {
    let mut s = c.download(req).await?.into_inner();
    let mut r = None;
    let mut data = Vec::new();
    while let Some(m) = s.message().await? {
        match m.part {
            Some(download_artifact_response::Part::Artifact(a)) => r = Some(a),
            Some(download_artifact_response::Part::Data(d)) => {
                assert!(d.len() <= 1 << 20, "chunks are at most 1 MiB");
                data.extend_from_slice(&d);
            }
            None => {}
        }
    }
    Ok((r.expect("the first message is the ref"), data))
}

fn shell_on(agent: &str, artifacts: &[(&str, bool)]) -> TaskSpec {
    TaskSpec {
        requirements: Some(Requirements {
            labels: [("name".to_string(), agent.to_string())].into(),
            ..Default::default()
        }),
        artifacts: artifacts
            .iter()
            .map(|(name, optional)| ArtifactSpec {
                name: name.to_string(),
                path: format!("out/{name}"),
                optional: *optional,
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

/// A read token bound to a new project `name`.
async fn other_project_reader(addr: &str, name: &str) -> Result<String> {
    let admin = admin_channel(addr).await?;
    ProjectServiceClient::new(admin.clone())
        .create(CreateProjectRequest {
            project: Some(Project {
                name: name.into(),
                ..Default::default()
            }),
        })
        .await?;
    let r = client::AdminServiceClient::new(admin)
        .create_token(CreateTokenRequest {
            kind: TokenKind::Api as i32,
            name: format!("{name}-reader"),
            scopes: vec![Scope::Read as i32],
            project: name.into(),
            ttl_ms: 0,
            max_uses: 0,
        })
        .await?
        .into_inner();
    Ok(r.secret)
}

fn denied(r: std::result::Result<impl std::fmt::Debug, tonic::Status>, code: Code, says: &str) {
    let (c, m) = code_and_message(r);
    assert_eq!(c, code, "{m}");
    assert!(m.contains(says), "{m:?} should say {says:?}");
}

/// Everything an upload and a download must do, on whichever backend `blobs` is.
async fn uploads_and_downloads(c: &Controller, blobs: &Blobs) -> Result<()> {
    let addr = c.addr.to_string();
    let mut a = FakeAgent::connect(&addr, "a").await?;
    let b = FakeAgent::connect(&addr, "b").await?;
    assert_eq!(a.welcome.max_artifact_bytes, 5 << 30);
    assert_eq!(a.welcome.max_task_artifact_bytes, 20 << 30);
    let mut tasks = tasks_client(&addr).await?;
    let producer = submit(
        &mut tasks,
        shell_on("a", &[("dist", false), ("notes", true)]),
    )
    .await?;
    let assign = a.accept_next(T).await?;
    assert_eq!(assign.task_id, producer);
    let token = assign.fencing_token;
    let body = pattern((3 << 20) + 12_345, 1);

    // Only the agent running the attempt may upload.
    denied(
        upload(
            &mut b.artifacts(),
            header(&producer, token, "dist", &body),
            &body,
        )
        .await,
        Code::PermissionDenied,
        "does not run attempt",
    );
    denied(
        upload(
            &mut a.artifacts(),
            header(&producer, token + 1, "dist", &body),
            &body,
        )
        .await,
        Code::PermissionDenied,
        "does not run attempt",
    );
    // Only declared names.
    denied(
        upload(
            &mut a.artifacts(),
            header(&producer, token, "nope", &body),
            &body,
        )
        .await,
        Code::InvalidArgument,
        "declares no artifact \"nope\"",
    );
    // A digest or a size that does not match leaves nothing.
    let mut bad = header(&producer, token, "dist", &body);
    bad.sha256 = sha(b"something else");
    denied(
        upload(&mut a.artifacts(), bad, &body).await,
        Code::InvalidArgument,
        "SHA-256",
    );
    let mut bad = header(&producer, token, "dist", &body);
    bad.size += 1;
    denied(
        upload(&mut a.artifacts(), bad, &body).await,
        Code::InvalidArgument,
        "ended after",
    );
    blobs
        .wait_for("refused uploads to leave nothing", &[])
        .await?;

    // A client that drops its upload midway leaves nothing either.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut dropping = a.artifacts();
    let call = tokio::spawn(async move {
        dropping
            .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    for m in messages(header(&producer, token, "dist", &body), &body)
        .into_iter()
        .take(3)
    {
        tx.send(m).await?;
    }
    eventually("the dropped upload to start storing", T, || async {
        (!blobs.objects().await.is_empty()).then_some(())
    })
    .await?;
    call.abort();
    drop(tx);
    blobs
        .wait_for("a dropped upload to leave nothing", &[])
        .await?;

    // The real upload.
    let r = client::artifacts::upload_artifact(
        &mut a.artifacts(),
        header(&producer, token, "dist", &body),
        &write_temp(&body)?,
    )
    .await?;
    assert_eq!(
        (r.task_id.as_str(), r.name.as_str(), r.fencing_token, r.size),
        (producer.as_str(), "dist", token, body.len() as u64)
    );
    assert_eq!(r.sha256, sha(&body));
    assert_eq!(r.project, "default");
    assert_eq!(r.kind(), ArtifactKind::Directory);
    assert!(r.created_at_ms > 0);
    blobs
        .wait_for("the artifact", &[blobs.key(&producer, token, "dist")])
        .await?;

    // Served only once the task succeeded.
    let mut reader = ArtifactServiceClient::new(admin_channel(&addr).await?);
    denied(
        reader
            .stat(StatArtifactRequest {
                task_id: producer.clone(),
                name: "dist".into(),
            })
            .await,
        Code::NotFound,
        "RUNNING",
    );
    let ack = a.finish(&producer, token, succeeded()).await?;
    assert!(ack.result && !ack.stale, "{ack:?}");
    let t = wait_state(&mut tasks, &producer, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(t.result.as_ref().unwrap().artifacts, vec![r.clone()]);
    assert_eq!(t.attempts[0].artifacts, vec![r.clone()]);

    let stat = reader
        .stat(StatArtifactRequest {
            task_id: producer.clone(),
            name: "dist".into(),
        })
        .await?
        .into_inner();
    assert_eq!(stat, r);
    let list = reader
        .list(ListArtifactsRequest {
            task_id: producer.clone(),
            workflow_id: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(list.artifacts, vec![r.clone()]);
    denied(
        reader
            .stat(StatArtifactRequest {
                task_id: producer.clone(),
                name: "notes".into(),
            })
            .await,
        Code::NotFound,
        "notes",
    );

    // Downloads with an API token: whole, from an offset, through the client library.
    let whole = DownloadArtifactRequest {
        task_id: producer.clone(),
        name: "dist".into(),
        ..Default::default()
    };
    let (got, data) = download(&mut reader, whole.clone()).await?;
    assert_eq!(got, r);
    assert!(data == body, "downloaded bytes differ");
    let (_, tail) = download(
        &mut reader,
        DownloadArtifactRequest {
            offset: 1_500_001,
            ..whole.clone()
        },
    )
    .await?;
    assert!(tail == body[1_500_001..], "resumed bytes differ");
    let (_, none) = download(
        &mut reader,
        DownloadArtifactRequest {
            offset: body.len() as u64,
            ..whole.clone()
        },
    )
    .await?;
    assert!(none.is_empty());
    denied(
        download(
            &mut reader,
            DownloadArtifactRequest {
                offset: body.len() as u64 + 1,
                ..whole.clone()
            },
        )
        .await,
        Code::InvalidArgument,
        "past the end",
    );
    let mut sink = Vec::new();
    let via_lib = client::artifacts::download_from(reader.clone(), &whole, &mut sink).await?;
    assert_eq!(via_lib, r);
    assert!(sink == body);

    // Another project's token may not.
    let outsider = other_project_reader(&addr, "outsiders").await?;
    let mut outside =
        ArtifactServiceClient::new(with_token(client::connect(&addr).await?, &outsider));
    // (NOT_FOUND, exactly as for an unknown task: ids cannot be probed across projects.)
    denied(
        download(&mut outside, whole.clone()).await,
        Code::NotFound,
        "not found",
    );
    denied(
        outside
            .list(ListArtifactsRequest {
                task_id: producer.clone(),
                workflow_id: String::new(),
            })
            .await,
        Code::NotFound,
        "not found",
    );

    // Agents: only for an input of an attempt they run.
    let mut b = b;
    let consumer_spec = TaskSpec {
        inputs: vec![ArtifactInput {
            from: format!("{producer}/dist"),
            path: "in/dist".into(),
            artifact: Some(r.clone()),
        }],
        ..shell_on("b", &[])
    };
    let consumer = submit(&mut tasks, consumer_spec).await?;
    let cassign = b.accept_next(T).await?;
    assert_eq!(cassign.task_id, consumer);
    let for_input = DownloadArtifactRequest {
        for_task_id: consumer.clone(),
        for_fencing_token: cassign.fencing_token,
        ..whole.clone()
    };
    let mut sink = Vec::new();
    let got = client::artifacts::download_from(b.artifacts(), &for_input, &mut sink).await?;
    assert_eq!(got, r);
    assert!(sink == body, "the input arrived changed");
    denied(
        download(&mut a.artifacts(), for_input.clone()).await,
        Code::PermissionDenied,
        "does not run attempt",
    );
    denied(
        download(
            &mut b.artifacts(),
            DownloadArtifactRequest {
                name: "notes".into(),
                ..for_input.clone()
            },
        )
        .await,
        Code::PermissionDenied,
        "not an input",
    );
    denied(
        download(&mut b.artifacts(), whole.clone()).await,
        Code::InvalidArgument,
        "for_task_id",
    );
    // Agents cannot list or stat; API tokens cannot upload.
    denied(
        b.artifacts()
            .list(ListArtifactsRequest {
                task_id: producer.clone(),
                workflow_id: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "API token",
    );
    denied(
        upload(
            &mut reader,
            header(&consumer, cassign.fencing_token, "x", b"x"),
            b"x",
        )
        .await,
        Code::PermissionDenied,
        "agent token",
    );
    b.finish(&consumer, cassign.fencing_token, succeeded())
        .await?;
    Ok(())
}

fn write_temp(data: &[u8]) -> Result<PathBuf> {
    let f = tempfile::Builder::new().suffix(".tar.zst").tempfile()?;
    std::fs::write(f.path(), data)?;
    let (_, path) = f.keep()?;
    Ok(path)
}

#[tokio::test]
async fn local_backend_uploads_downloads_and_refusals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(&dir.path().join("c"), 0, &ControllerOpts::default())?;
    let blobs = Blobs::Local(dir.path().join("c/artifacts"));
    uploads_and_downloads(&c, &blobs).await
}

#[tokio::test]
async fn s3_backend_uploads_downloads_and_refusals() -> Result<()> {
    let moto = MotoServer::start().await?;
    moto.create_bucket("scabbard-e2e").await?;
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("s3-secret");
    std::fs::write(&secret, SECRET_ACCESS_KEY)?;
    let mut extra = moto.controller_flags("scabbard-e2e");
    extra.push("--artifacts-s3-secret-access-key-file".into());
    extra.push(secret.display().to_string());
    let c = Controller::start(
        &dir.path().join("c"),
        0,
        &ControllerOpts {
            extra,
            ..Default::default()
        },
    )?;
    let blobs = Blobs::S3 {
        moto,
        bucket: "scabbard-e2e".into(),
    };
    uploads_and_downloads(&c, &blobs).await?;
    // Nothing was written on the controller's disk.
    assert!(!dir.path().join("c/artifacts").exists());
    Ok(())
}

#[tokio::test]
async fn limits_required_artifacts_and_ended_attempts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(
        &dir.path().join("c"),
        0,
        &ControllerOpts {
            extra: [
                "--max-artifact-bytes",
                "2MiB",
                "--max-task-artifact-bytes",
                "3MiB",
            ]
            .map(str::to_string)
            .to_vec(),
            ..Default::default()
        },
    )?;
    let blobs = Blobs::Local(dir.path().join("c/artifacts"));
    let addr = c.addr.to_string();
    let mut a = FakeAgent::connect(&addr, "a").await?;
    assert_eq!(a.welcome.max_artifact_bytes, 2 << 20);
    assert_eq!(a.welcome.max_task_artifact_bytes, 3 << 20);
    let mut tasks = tasks_client(&addr).await?;
    let id = submit(&mut tasks, shell_on("a", &[("x", false), ("y", false)])).await?;
    let first = a.accept_next(T).await?;
    let token = first.fencing_token;

    // Over the per-artifact limit: refused before any byte is sent, naming the limit.
    let big = pattern((2 << 20) + 1, 2);
    let r = upload(&mut a.artifacts(), header(&id, token, "x", &big), &big).await;
    let s = r.expect_err("over the limit");
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    for says in [
        "\"x\"",
        "artifacts.max_artifact_bytes",
        "2.0 MiB",
        "2097153 bytes",
    ] {
        assert!(
            s.message().contains(says),
            "{:?} should say {says}",
            s.message()
        );
    }
    assert!(
        scabbard_common::error::retry_after(&s).is_none(),
        "no retry hint"
    );

    // Over the per-task limit with what the attempt already uploaded.
    let two = pattern(2 << 20, 3);
    upload(&mut a.artifacts(), header(&id, token, "x", &two), &two).await?;
    let s = upload(&mut a.artifacts(), header(&id, token, "y", &two), &two)
        .await
        .expect_err("over the task limit");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(
        s.message().contains("artifacts.max_task_artifact_bytes"),
        "{}",
        s.message()
    );
    // Uploading the same name again replaces it (and does not count twice).
    let small = pattern(1000, 4);
    upload(&mut a.artifacts(), header(&id, token, "x", &small), &small).await?;
    blobs
        .wait_for("attempt 1's x", &[blobs.key(&id, token, "x")])
        .await?;

    // A success without the required `y` is an infrastructure failure: the task is
    // requeued and attempt 1's upload deleted.
    a.finish(&id, token, succeeded()).await?;
    let second = a.accept_next(T).await?;
    assert_eq!(second.task_id, id);
    assert!(second.fencing_token > token);
    let t = get(&mut tasks, &id).await?;
    let failed = t.attempts[0].result.as_ref().expect("attempt 1 ended");
    assert_eq!(failed.error_class(), ErrorClass::Infrastructure);
    assert!(
        failed.message.contains("artifact \"y\" was not uploaded"),
        "{failed:?}"
    );
    assert_eq!(t.attempts[0].artifacts.len(), 1, "the record stays: {t:?}");
    blobs
        .wait_for("attempt 1's upload to be deleted", &[])
        .await?;
    // The ended attempt may not upload any more.
    denied(
        upload(&mut a.artifacts(), header(&id, token, "y", &small), &small).await,
        Code::PermissionDenied,
        "does not run attempt",
    );

    // Attempt 2 uploads both and succeeds: both are served.
    let t2 = second.fencing_token;
    let rx = upload(&mut a.artifacts(), header(&id, t2, "x", &small), &small).await?;
    let ry = upload(&mut a.artifacts(), header(&id, t2, "y", &two), &two).await?;
    a.finish(&id, t2, succeeded()).await?;
    let t = wait_state(&mut tasks, &id, Some(TaskState::Succeeded), T).await?;
    assert_eq!(t.result.unwrap().artifacts, vec![rx, ry]);

    // A cancelled attempt's uploads are deleted too.
    let id2 = submit(&mut tasks, shell_on("a", &[("x", false)])).await?;
    let third = a.accept_next(T).await?;
    upload(
        &mut a.artifacts(),
        header(&id2, third.fencing_token, "x", &small),
        &small,
    )
    .await?;
    let cancelled = TaskResult {
        outcome: Outcome::Cancelled as i32,
        ..Default::default()
    };
    a.finish(&id2, third.fencing_token, cancelled).await?;
    blobs
        .wait_for(
            "only the succeeded task's artifacts",
            &[blobs.key(&id, t2, "x"), blobs.key(&id, t2, "y")],
        )
        .await?;
    Ok(())
}
