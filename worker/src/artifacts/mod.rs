//! Artifacts on the worker: getting an attempt's inputs into the local cache before its
//! executor runs ([`Artifacts::stage_inputs`]), and packing, checking and uploading what
//! it produced once it succeeded ([`Artifacts::publish`]).
//!
//! Inputs are downloaded through `ArtifactService.Download` with the agent token, on behalf
//! of the attempt (`for_task_id`/`for_fencing_token`), resumed after a dropped stream, digest
//! checked (a mismatch is downloaded once more from scratch), into the digest-keyed
//! [`cache`]; the attempt holds a lease on each entry until it ends. Any failure to get an
//! input is an INFRASTRUCTURE failure (the controller retries the task elsewhere).
//!
//! Outputs are packed (`scabbard_common::artifact::pack`, on the blocking pool) next to
//! the executor's `artifact_dir/<name>`, checked against the controller's limits from
//! `Welcome` (over one: a USER failure naming the artifact, its size and the limit), and
//! uploaded ([`upload`]) until stored. Progress goes to the attempt's log as system lines.
//!
//! The runner calls both; executors never talk to the controller.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scabbard_common::artifact::{pack, temp_archive};
use scabbard_common::backoff::Backoff;
use scabbard_common::client::{DownloadOptions, download_artifact};
use scabbard_common::proto::{
    self, ArtifactRef, ArtifactUploadHeader, DownloadArtifactRequest, ErrorClass, Outcome,
};
use scabbard_common::{Error, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::executor::{ExecOutcome, OutStream, OutputChunk, ProducedArtifact, StagedInput};
use crate::link::ControllerLink;

pub(crate) mod cache;
#[cfg(test)]
pub(crate) mod fake;
mod upload;

pub(crate) use cache::{ArtifactCache, CacheLease};

/// The artifact side of the worker, shared by every attempt.
pub(crate) struct Artifacts {
    /// Downloaded inputs.
    pub(crate) cache: ArtifactCache,
    /// The controller calls go to.
    pub(crate) link: Arc<ControllerLink>,
    /// Tries and backoff of downloads.
    pub(crate) download: DownloadOptions,
    /// Backoff between upload tries.
    pub(crate) upload_backoff: Backoff,
}

/// One attempt's inputs, ready: what the executor gets, and the leases that keep them in
/// the cache until the attempt ends.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    /// For `ExecContext::inputs`, in spec order.
    pub(crate) inputs: Vec<StagedInput>,
    /// Dropped when the attempt ends.
    pub(crate) leases: Vec<CacheLease>,
}

/// The attempt being served: (task id, fencing token).
pub(crate) type Attempt<'a> = (&'a str, u64);

impl Artifacts {
    /// A worker's artifacts with the default download and upload policies.
    pub(crate) fn new(cache: ArtifactCache, link: Arc<ControllerLink>) -> Self {
        Self {
            cache,
            link,
            download: DownloadOptions::default(),
            upload_backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(10),
                ..Backoff::default()
            },
        }
    }

    /// Gets every input of `spec` into the cache; `Err` is how the attempt ends instead
    /// (an infrastructure failure, or cancelled).
    pub(crate) async fn stage_inputs(
        &self,
        attempt: Attempt<'_>,
        spec: &proto::TaskSpec,
        log: &mpsc::Sender<OutputChunk>,
        cancel: &CancellationToken,
    ) -> std::result::Result<Staged, ExecOutcome> {
        let mut staged = Staged::default();
        for input in &spec.inputs {
            let Some(artifact) = input.artifact.as_ref().filter(|a| !a.sha256.is_empty()) else {
                return Err(ExecOutcome::infrastructure(format!(
                    "input {:?} at {:?} was not resolved to an artifact by the controller",
                    input.from, input.path
                )));
            };
            let started = Instant::now();
            let lease = tokio::select! {
                r = self.fetch(attempt, artifact) => r,
                () = cancel.cancelled() => return Err(cancelled("while downloading its inputs")),
            };
            let lease = lease.map_err(|e| {
                ExecOutcome::infrastructure(format!(
                    "input {:?} ({}/{}): {e}",
                    input.from, artifact.task_id, artifact.name
                ))
            })?;
            if lease.fetched {
                crate::metrics::artifact_downloaded(artifact.size);
            }
            let how = if lease.fetched {
                format!("downloaded in {:.1} s", started.elapsed().as_secs_f64())
            } else {
                "from this worker's cache".to_string()
            };
            note(
                log,
                format!(
                    "input {} ({}/{}): {} packed (sha256 {}…), {} unpacked, {how}",
                    input.path,
                    artifact.task_id,
                    artifact.name,
                    human_bytes(artifact.size),
                    short(&artifact.sha256),
                    human_bytes(lease.size)
                ),
            )
            .await;
            staged.inputs.push(StagedInput {
                from: input.from.clone(),
                path: input.path.clone(),
                local: lease.content.clone(),
                kind: lease.kind,
            });
            staged.leases.push(lease);
        }
        Ok(staged)
    }

    /// The cache entry of `artifact`, downloaded for `attempt` if needed.
    async fn fetch(&self, attempt: Attempt<'_>, artifact: &ArtifactRef) -> Result<CacheLease> {
        let req = DownloadArtifactRequest {
            task_id: artifact.task_id.clone(),
            name: artifact.name.clone(),
            offset: 0,
            for_task_id: attempt.0.to_string(),
            for_fencing_token: attempt.1,
        };
        let link = self.link.clone();
        let opts = self.download.clone();
        let sha = artifact.sha256.clone();
        self.cache
            .get(artifact, move |archive: PathBuf| async move {
                let mut file = tokio::fs::File::create(&archive).await?;
                let connect = |last: Option<&Error>| {
                    if let Some(e) = last {
                        link.failed(e);
                    }
                    let link = link.clone();
                    async move { link.artifacts().await }
                };
                download_artifact(connect, &req, Some(&sha), &mut file, &opts).await?;
                Ok(())
            })
            .await
    }

    /// Packs, checks and uploads what a succeeded attempt produced in `artifact_dir`;
    /// returns the stored refs, or how the attempt ends instead.
    pub(crate) async fn publish(
        &self,
        attempt: Attempt<'_>,
        produced: &[ProducedArtifact],
        artifact_dir: &Path,
        log: &mpsc::Sender<OutputChunk>,
        cancel: &CancellationToken,
    ) -> std::result::Result<Vec<proto::ArtifactRef>, ExecOutcome> {
        let limits = self.link.limits();
        let mut packed = Vec::with_capacity(produced.len());
        let mut total = 0u64;
        for p in produced {
            let src = artifact_dir.join(&p.name);
            let archive = temp_archive(artifact_dir, &p.name);
            let started = Instant::now();
            let (from, to) = (src.clone(), archive.clone());
            let result = tokio::select! {
                r = tokio::task::spawn_blocking(move || pack(&from, &to)) => r,
                () = cancel.cancelled() => return Err(cancelled("while packing its artifacts")),
            };
            let info = match result {
                Ok(Ok(info)) => info,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    return Err(ExecOutcome::failed(
                        -1,
                        ErrorClass::User,
                        format!("artifact {}: cannot pack it: {e}", p.name),
                    ));
                }
                Ok(Err(e)) => {
                    return Err(ExecOutcome::infrastructure(format!(
                        "artifact {}: cannot pack it: {e}",
                        p.name
                    )));
                }
                Err(e) => return Err(ExecOutcome::infrastructure(format!("packing: {e}"))),
            };
            total += info.size;
            if limits.per_artifact > 0 && info.size > limits.per_artifact {
                return Err(too_big(format!(
                    "artifact {} is {} packed ({} bytes), over the controller's limit of {} per artifact (max_artifact_bytes = {})",
                    p.name,
                    human_bytes(info.size),
                    info.size,
                    human_bytes(limits.per_artifact),
                    limits.per_artifact
                )));
            }
            if limits.per_task > 0 && total > limits.per_task {
                return Err(too_big(format!(
                    "artifact {} ({} packed, {} bytes) brings this attempt's artifacts to {} bytes, over the controller's limit of {} per task (max_task_artifact_bytes = {})",
                    p.name,
                    human_bytes(info.size),
                    info.size,
                    total,
                    human_bytes(limits.per_task),
                    limits.per_task
                )));
            }
            packed.push((p, archive, info, started.elapsed()));
        }
        let mut refs = Vec::with_capacity(packed.len());
        for (p, archive, info, pack_time) in packed {
            let header = ArtifactUploadHeader {
                task_id: attempt.0.to_string(),
                fencing_token: attempt.1,
                name: p.name.clone(),
                kind: info.kind as i32,
                size: info.size,
                sha256: info.sha256.clone(),
            };
            let started = Instant::now();
            let stored = upload::upload(
                &self.link,
                &header,
                &archive,
                &self.upload_backoff,
                cancel,
                |n, why| {
                    tracing::warn!(task = %attempt.0, artifact = %p.name, tries = n, error = why, "artifact upload failed; retrying");
                    // Best effort: a full log channel drops the line, never delays the retry.
                    let _ = log.try_send(OutputChunk {
                        stream: OutStream::System,
                        data: format!("artifact {}: upload try {n} failed ({why}); retrying\n", p.name)
                            .into_bytes(),
                    });
                },
            )
            .await;
            let _ = tokio::fs::remove_file(&archive).await;
            let stored = match stored {
                Ok(r) => r,
                Err(upload::UploadError::Cancelled) => {
                    return Err(cancelled("while uploading its artifacts"));
                }
                Err(upload::UploadError::Local(e)) => {
                    return Err(ExecOutcome::infrastructure(format!(
                        "artifact {}: {e}",
                        p.name
                    )));
                }
                Err(upload::UploadError::Refused(s)) => {
                    let class = if s.code() == tonic::Code::ResourceExhausted {
                        ErrorClass::User
                    } else {
                        ErrorClass::Infrastructure
                    };
                    return Err(ExecOutcome::failed(
                        -1,
                        class,
                        format!(
                            "artifact {}: the controller refused the upload ({:?}): {}",
                            p.name,
                            s.code(),
                            s.message()
                        ),
                    ));
                }
            };
            crate::metrics::artifact_uploaded(info.size);
            note(
                log,
                format!(
                    "artifact {}: {} packed (sha256 {}…) in {:.1} s, uploaded in {:.1} s",
                    p.name,
                    human_bytes(info.size),
                    short(&info.sha256),
                    pack_time.as_secs_f64(),
                    started.elapsed().as_secs_f64()
                ),
            )
            .await;
            refs.push(stored);
        }
        Ok(refs)
    }
}

/// A failure because an artifact is over a limit: the task's doing.
fn too_big(message: String) -> ExecOutcome {
    ExecOutcome::failed(-1, ErrorClass::User, message)
}

/// How an attempt cancelled during the runner's part ends.
fn cancelled(when: &str) -> ExecOutcome {
    ExecOutcome {
        outcome: Outcome::Cancelled,
        exit_code: -1,
        message: format!("cancelled {when}"),
        error_class: ErrorClass::Unspecified,
        outputs: Default::default(),
        artifacts: Vec::new(),
    }
}

/// A line of the worker's own in the attempt's log.
pub(crate) async fn note(log: &mpsc::Sender<OutputChunk>, text: String) {
    let _ = log
        .send(OutputChunk {
            stream: OutStream::System,
            data: format!("{text}\n").into_bytes(),
        })
        .await;
}

/// The first 12 hex digits of a digest.
fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// `12.3 MiB`.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests;
