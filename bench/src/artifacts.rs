//! `--kind artifacts`: artifact throughput through the controller (local-disk backend, the
//! embedded default). An agent driven by hand takes a task that declares one artifact,
//! uploads an archive of `--artifact-mib` MiB of incompressible bytes
//! (`ArtifactService.Upload`: the controller hashes it, writes it as a multipart upload,
//! fsyncs it and records it durably), reports success; then an API client downloads it
//! (`Download`, written to a file, SHA-256 checked by the client library). Repeated
//! `--artifact-rounds` times; MB/s are 10^6 bytes per second.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::client::artifacts::{download_from, upload_artifact};
use scabbard_common::client::{self, AgentServiceClient, ArtifactServiceClient, TaskServiceClient};
use scabbard_common::proto::{
    Accepted, AgentMessage, ArtifactKind, ArtifactSpec, ArtifactUploadHeader, Assign,
    ControllerMessage, DownloadArtifactRequest, Finished, Heartbeat, Hello, Outcome,
    RegisterRequest, ShellTask, SubmitTaskRequest, TaskResult, TaskSpec, agent_message,
    controller_message, task_spec::Kind,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

/// One round's timings.
struct Round {
    upload: Duration,
    download: Duration,
}

/// Runs the artifact benchmark against a controller at `addr`.
pub(crate) async fn run(
    addr: &str,
    registration_token: &str,
    admin_token: &str,
    dir: &Path,
    mib: usize,
    rounds: usize,
) -> Result<()> {
    let bytes = (mib as u64) << 20;
    let archive = dir.join("bench-artifact.tar.zst");
    let (size, sha256) = write_random(&archive, bytes).await?;
    let mut agent = HandAgent::connect(addr, registration_token).await?;
    let admin = client::authed(client::connect(addr).await?, Some(admin_token))?;
    let mut tasks = TaskServiceClient::new(admin.clone());
    let reader = ArtifactServiceClient::new(admin).max_decoding_message_size(64 << 20);
    println!(
        "scabbard-bench: kind=artifacts backend=local (fsynced, recorded durably) size={mib} MiB rounds={rounds}"
    );
    let mut results = Vec::new();
    for round in 1..=rounds {
        let id = tasks
            .submit(SubmitTaskRequest {
                spec: Some(TaskSpec {
                    kind: Some(Kind::Shell(ShellTask {
                        command: vec!["true".into()],
                    })),
                    artifacts: vec![ArtifactSpec {
                        name: "blob".into(),
                        path: "blob".into(),
                        optional: false,
                    }],
                    ..Default::default()
                }),
                idempotency_key: String::new(),
                project: String::new(),
            })
            .await?
            .into_inner()
            .task
            .context("no task")?
            .id;
        let assign = agent.accept_next().await?;
        if assign.task_id != id {
            bail!("assigned {} instead of {id}", assign.task_id);
        }
        let header = ArtifactUploadHeader {
            task_id: id.clone(),
            fencing_token: assign.fencing_token,
            name: "blob".into(),
            kind: ArtifactKind::File as i32,
            size,
            sha256: sha256.clone(),
        };
        let t0 = Instant::now();
        let r = upload_artifact(&mut agent.artifacts()?, header, &archive).await?;
        let upload = t0.elapsed();
        agent.finish(&id, assign.fencing_token).await?;
        wait_succeeded(&mut tasks, &id).await?;
        let out = dir.join(format!("downloaded-{round}.tar.zst"));
        let file = tokio::fs::File::create(&out).await?;
        let mut sink = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let t1 = Instant::now();
        let got = download_from(
            reader.clone(),
            &DownloadArtifactRequest {
                task_id: id.clone(),
                name: "blob".into(),
                ..Default::default()
            },
            &mut sink,
        )
        .await?;
        sink.shutdown().await?;
        let download = t1.elapsed();
        if got.sha256 != r.sha256 || std::fs::metadata(&out)?.len() != size {
            bail!("round {round}: the downloaded artifact differs");
        }
        std::fs::remove_file(&out)?;
        let mbs = |d: Duration| size as f64 / 1e6 / d.as_secs_f64();
        println!(
            "round {round}: upload {:.0} MB/s ({:.2}s), download {:.0} MB/s ({:.2}s), combined {:.0} MB/s",
            mbs(upload),
            upload.as_secs_f64(),
            mbs(download),
            download.as_secs_f64(),
            2.0 * size as f64 / 1e6 / (upload + download).as_secs_f64()
        );
        results.push(Round { upload, download });
    }
    results.sort_by_key(|r| r.upload + r.download);
    let median = &results[results.len() / 2];
    let mbs = |d: Duration| size as f64 / 1e6 / d.as_secs_f64();
    println!(
        "artifacts (median round of {}): upload {:.0} MB/s, download {:.0} MB/s, upload+download {:.0} MB/s ({} MiB each way)",
        results.len(),
        mbs(median.upload),
        mbs(median.download),
        2.0 * size as f64 / 1e6 / (median.upload + median.download).as_secs_f64(),
        mib
    );
    let _ = std::fs::remove_file(&archive);
    Ok(())
}

/// Writes `n` pseudo-random (incompressible, like a packed archive) bytes; returns the
/// size and SHA-256.
async fn write_random(path: &Path, n: u64) -> Result<(u64, String)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<(u64, String)> {
        use std::io::Write;
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
        let mut h = scabbard_common::artifact::Sha256::default();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = n;
        while left > 0 {
            for w in buf.chunks_exact_mut(8) {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                w.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
            }
            let k = left.min(buf.len() as u64) as usize;
            h.update(&buf[..k]);
            f.write_all(&buf[..k])?;
            left -= k as u64;
        }
        // On disk before the first round, as the worker's `pack` leaves its archives: its
        // writeback must not land in the measurement.
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok((n, h.finish()))
    })
    .await?
}

async fn wait_succeeded(
    tasks: &mut TaskServiceClient<client::AuthedChannel>,
    id: &str,
) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let t = tasks
            .get(scabbard_common::proto::GetTaskRequest { id: id.into() })
            .await?
            .into_inner();
        match t.state() {
            scabbard_common::proto::TaskState::Succeeded => return Ok(()),
            s if scabbard_common::is_final(s) => bail!("task {id} ended {s:?}: {:?}", t.result),
            _ if Instant::now() > end => bail!("task {id} did not finish"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// A minimal agent: registers, holds a session (heartbeating), accepts assignments,
/// reports success.
pub(crate) struct HandAgent {
    token: String,
    channel: tonic::transport::Channel,
    tx: mpsc::Sender<AgentMessage>,
    inbound: tonic::Streaming<ControllerMessage>,
}

impl HandAgent {
    pub(crate) async fn connect(addr: &str, registration_token: &str) -> Result<Self> {
        let channel = client::connect(addr).await?;
        let labels = HashMap::from([("bench".to_string(), "artifacts".to_string())]);
        let reg = AgentServiceClient::new(channel.clone())
            .register(RegisterRequest {
                registration_token: registration_token.into(),
                name: "bench-artifacts".into(),
                labels: labels.clone(),
                capabilities: vec!["shell".into()],
                slots: 1,
                version: "bench".into(),
                agent_id: String::new(),
                current_agent_token: String::new(),
            })
            .await?
            .into_inner();
        let (tx, rx) = mpsc::channel(64);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                agent_id: reg.agent_id.clone(),
                capabilities: vec!["shell".into()],
                labels,
                slots: 1,
                ..Default::default()
            })),
        })
        .await?;
        let req = client::with_token(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            Some(&reg.agent_token),
        )?;
        let mut inbound = AgentServiceClient::new(channel.clone())
            .session(req)
            .await?
            .into_inner();
        let welcome = match inbound.next().await.context("no Welcome")??.msg {
            Some(controller_message::Msg::Welcome(w)) => w,
            other => bail!("expected Welcome, got {other:?}"),
        };
        let beats = tx.clone();
        let every = Duration::from_millis(welcome.heartbeat_interval_ms.max(50));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let beat = AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                        free_slots: 1,
                        ..Default::default()
                    })),
                };
                if beats.send(beat).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            token: reg.agent_token,
            channel,
            tx,
            inbound,
        })
    }

    pub(crate) async fn accept_next(&mut self) -> Result<Assign> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.inbound.next())
                .await
                .context("no assignment within 30 s")?
                .context("session ended")??;
            if let Some(controller_message::Msg::Assign(a)) = m.msg {
                self.tx
                    .send(AgentMessage {
                        msg: Some(agent_message::Msg::Accepted(Accepted {
                            task_id: a.task_id.clone(),
                            fencing_token: a.fencing_token,
                        })),
                    })
                    .await?;
                return Ok(a);
            }
        }
    }

    async fn finish(&mut self, task_id: &str, token: u64) -> Result<()> {
        self.tx
            .send(AgentMessage {
                msg: Some(agent_message::Msg::Finished(Finished {
                    task_id: task_id.into(),
                    fencing_token: token,
                    result: Some(TaskResult {
                        outcome: Outcome::Succeeded as i32,
                        ..Default::default()
                    }),
                    log_chunks: 0,
                })),
            })
            .await?;
        Ok(())
    }

    /// The session's two directions, for a caller that drives it alone.
    pub(crate) fn split(
        self,
    ) -> (
        mpsc::Sender<AgentMessage>,
        tonic::Streaming<ControllerMessage>,
    ) {
        (self.tx, self.inbound)
    }

    fn artifacts(&self) -> Result<ArtifactServiceClient<client::AuthedChannel>> {
        Ok(ArtifactServiceClient::new(client::authed(
            self.channel.clone(),
            Some(&self.token),
        )?))
    }
}
