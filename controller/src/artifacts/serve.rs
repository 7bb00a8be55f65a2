//! [`Artifacts`]: the domain calls behind `ArtifactService`. Each asks the core whether
//! the caller may do it (and records uploads through it), then moves the bytes through
//! the [`ArtifactStore`] itself — never inside the core.
//!
//! Upload (agents): header → core check (holds the attempt, declared name, limits) →
//! stream into the store (aborted on any error) → core records the ref durably → reply.
//! A record the core refuses deletes the object it would have referred to.
//! Download (agents, for an input of an attempt they run; API tokens, for their project's
//! succeeded tasks), Stat and List serve what the core says a task serves.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use scabbard_common::proto::{
    ArtifactKind, ArtifactRef, DownloadArtifactRequest, ListArtifactsRequest, StatArtifactRequest,
    TokenKind, upload_artifact_request,
};
use scabbard_common::{Error, Result};
use tracing::{info, warn};

use super::store::{ArtifactStore, Expected};
use super::{UPLOAD_IDLE_TIMEOUT, check_id, check_name, fmt_bytes};
use crate::auth::Principal;
use crate::core::artifacts::{RecordRefused, find};
use crate::core::{CoreMsg, CoreRouter};

/// The artifact service's domain side.
pub struct Artifacts {
    core: CoreRouter,
    store: Arc<ArtifactStore>,
}

/// The data of a download, in chunks.
pub type DataStream = BoxStream<'static, Result<Bytes>>;

impl Artifacts {
    /// Serves artifacts of the tasks `core` knows from `store`.
    pub fn new(core: CoreRouter, store: Arc<ArtifactStore>) -> Self {
        Self { core, store }
    }

    /// The store behind it.
    pub fn store(&self) -> &Arc<ArtifactStore> {
        &self.store
    }

    /// Receives one artifact of an attempt `who` (an agent) runs: the first part is the
    /// header, the rest data. Returns the recorded ref.
    pub async fn upload<S>(&self, who: &Principal, parts: S) -> Result<ArtifactRef>
    where
        S: Stream<Item = Result<upload_artifact_request::Part>> + Unpin + Send + 'static,
    {
        if who.kind != TokenKind::Agent || who.agent_id.is_empty() {
            return Err(Error::PermissionDenied(
                "uploads need the agent token of the agent running the attempt".into(),
            ));
        }
        let mut parts = parts;
        let header = match next_part(&mut parts).await? {
            Some(upload_artifact_request::Part::Header(h)) => h,
            Some(upload_artifact_request::Part::Data(_)) => {
                return Err(Error::invalid(
                    "the first upload message must be the header (task_id, fencing_token, name, kind, size, sha256), not data",
                ));
            }
            None => return Err(Error::invalid("the upload ended before its header")),
        };
        check_id("task_id", &header.task_id)?;
        check_name("name", &header.name)?;
        if header.fencing_token == 0 {
            return Err(Error::invalid(
                "fencing_token is required: the token of the attempt the artifact belongs to",
            ));
        }
        let kind = ArtifactKind::try_from(header.kind).unwrap_or(ArtifactKind::Unspecified);
        if kind == ArtifactKind::Unspecified {
            return Err(Error::invalid(
                "kind must be ARTIFACT_KIND_FILE or ARTIFACT_KIND_DIRECTORY",
            ));
        }
        if header.size == 0 {
            return Err(Error::invalid(
                "size is 0: a packed artifact (tar + zstd) is never empty",
            ));
        }
        let sha256 = header.sha256.to_ascii_lowercase();
        if !scabbard_common::artifact::is_sha256(&sha256) {
            return Err(Error::invalid(format!(
                "sha256 {:?} is not a SHA-256 in hex (64 characters)",
                header.sha256
            )));
        }
        // One term for the whole upload: a new leader does not know this one's checks.
        let core = self.core.current()?;
        let what = format!("artifact {:?} of task {}", header.name, header.task_id);
        let grant = core
            .ask(|reply| CoreMsg::ArtifactUploadStart {
                agent_id: who.agent_id.clone(),
                task_id: header.task_id.clone(),
                fencing_token: header.fencing_token,
                name: header.name.clone(),
                size: header.size,
                reply,
            })
            .await?;
        let key = self
            .store
            .key(&header.task_id, header.fencing_token, &header.name);
        let expected = Expected {
            what: what.clone(),
            size: header.size,
            sha256: sha256.clone(),
        };
        let artifact = ArtifactRef {
            task_id: header.task_id.clone(),
            name: header.name.clone(),
            fencing_token: header.fencing_token,
            kind: kind as i32,
            sha256,
            size: header.size,
            project: grant.project,
            workflow_id: grant.workflow_id,
            workflow_node: grant.workflow_node,
            created_at_ms: 0,
        };
        // The rest runs apart from the handler: a client that resets the call drops the
        // handler, and an upload must still end aborted (or recorded), never half-way.
        let store = self.store.clone();
        let agent_id = who.agent_id.clone();
        let data = data_stream(parts);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            store.put_stream(&key, &expected, data).await?;
            let recorded = core
                .call(|reply| CoreMsg::ArtifactRecord {
                    agent_id,
                    artifact: Box::new(artifact),
                    reply,
                })
                .await;
            match recorded {
                Ok(Ok(r)) => {
                    info!(task = %r.task_id, token = r.fencing_token, name = %r.name, size = %fmt_bytes(r.size),
                        ms = started.elapsed().as_millis() as u64, "artifact stored");
                    Ok(r)
                }
                Ok(Err(RecordRefused { error, keep_object })) => {
                    if !keep_object && let Err(e) = store.delete(&key).await {
                        warn!(key = %key, error = %e, "deleting an upload that was not recorded");
                    }
                    Err(error)
                }
                Err(e) => {
                    // The core is gone (shutdown, leadership lost): nothing refers to it.
                    store.discard([key]);
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| Error::internal(format!("{what}: the upload task failed: {e}")))?
    }

    /// The ref and the data (from `offset`) of the artifact `req` names, if `who` may
    /// read it.
    pub async fn download(
        &self,
        who: &Principal,
        req: DownloadArtifactRequest,
    ) -> Result<(ArtifactRef, DataStream)> {
        check_id("task_id", &req.task_id)?;
        check_name("name", &req.name)?;
        let artifact = if who.kind == TokenKind::Agent {
            check_id("for_task_id", &req.for_task_id)?;
            if req.for_fencing_token == 0 {
                return Err(Error::invalid(
                    "for_fencing_token is required with an agent token: the attempt the artifact is an input of",
                ));
            }
            self.core
                .ask(|reply| CoreMsg::ArtifactForInput {
                    agent_id: who.agent_id.clone(),
                    for_task_id: req.for_task_id.clone(),
                    for_fencing_token: req.for_fencing_token,
                    task_id: req.task_id.clone(),
                    name: req.name.clone(),
                    reply,
                })
                .await?
        } else {
            if !req.for_task_id.is_empty() || req.for_fencing_token != 0 {
                return Err(Error::invalid(
                    "for_task_id and for_fencing_token are for agents; leave them empty with an API token",
                ));
            }
            self.stat_of(who, &req.task_id, &req.name).await?
        };
        if req.offset > artifact.size {
            return Err(Error::invalid(format!(
                "offset {} is past the end of artifact {:?} of task {} ({} bytes)",
                req.offset, artifact.name, artifact.task_id, artifact.size
            )));
        }
        let key = self
            .store
            .key(&artifact.task_id, artifact.fencing_token, &artifact.name);
        let data = self
            .store
            .read_from(&key, req.offset, artifact.size)
            .await?;
        Ok((artifact, data))
    }

    /// One served artifact's ref.
    pub async fn stat(&self, who: &Principal, req: StatArtifactRequest) -> Result<ArtifactRef> {
        check_id("task_id", &req.task_id)?;
        check_name("name", &req.name)?;
        self.stat_of(who, &req.task_id, &req.name).await
    }

    /// The artifacts a task (or every node of a workflow) serves.
    pub async fn list(
        &self,
        who: &Principal,
        req: ListArtifactsRequest,
    ) -> Result<Vec<ArtifactRef>> {
        let (id, workflow, what) = match (req.task_id.is_empty(), req.workflow_id.is_empty()) {
            (false, true) => (req.task_id, false, "task"),
            (true, false) => (req.workflow_id, true, "workflow"),
            _ => {
                return Err(Error::invalid(
                    "give exactly one of task_id and workflow_id",
                ));
            }
        };
        // A unique id prefix works too (see `crate::resolve`).
        let store = self.core.current()?.store().clone();
        let id = if workflow {
            crate::resolve::workflow(store.as_ref(), who, &id).await?
        } else {
            crate::resolve::task(store.as_ref(), who, &id).await?
        };
        check_id(if workflow { "workflow_id" } else { "task_id" }, &id)?;
        let served = self.served(&id, workflow).await?;
        who.check_visible(what, &id, &served.project)?;
        Ok(served.artifacts)
    }

    /// What a task or workflow serves: from the core, and for tasks that left its memory
    /// from their records in the store.
    async fn served(&self, id: &str, workflow: bool) -> Result<crate::core::artifacts::Served> {
        let core = self.core.current()?;
        let asked = core
            .ask(|reply| CoreMsg::ServedArtifacts {
                id: id.to_string(),
                workflow,
                reply,
            })
            .await;
        let mut served = match asked {
            Err(Error::NotFound { .. }) if !workflow => {
                let t = core.task(id).await?;
                return Ok(crate::core::artifacts::served_of(&t));
            }
            // A finished workflow that left the core's memory: every node's task is read
            // from the store below.
            Err(Error::NotFound { .. }) => {
                let w = core.workflow(id).await?;
                crate::core::artifacts::Served {
                    project: w.project.clone(),
                    evicted: w
                        .nodes
                        .iter()
                        .filter(|n| !n.task_id.is_empty())
                        .map(|n| (n.task_id.clone(), n.name.clone()))
                        .collect(),
                    ..Default::default()
                }
            }
            other => other?,
        };
        for (task_id, node) in std::mem::take(&mut served.evicted) {
            let Ok(t) = core.task(&task_id).await else {
                continue;
            };
            let s = crate::core::artifacts::served_of(&t);
            served
                .artifacts
                .extend(s.artifacts.into_iter().map(|mut a| {
                    a.workflow_id = id.to_string();
                    a.workflow_node = node.clone();
                    a
                }));
        }
        Ok(served)
    }

    async fn stat_of(&self, who: &Principal, task_id: &str, name: &str) -> Result<ArtifactRef> {
        let served = self.served(task_id, false).await?;
        who.check_visible("task", task_id, &served.project)?;
        find(&served, task_id, name)
    }
}

/// The next part, waiting at most [`UPLOAD_IDLE_TIMEOUT`].
async fn next_part<S>(parts: &mut S) -> Result<Option<upload_artifact_request::Part>>
where
    S: Stream<Item = Result<upload_artifact_request::Part>> + Unpin,
{
    match tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, parts.next()).await {
        Ok(p) => p.transpose(),
        Err(_) => Err(Error::Unavailable(format!(
            "no upload message for {} s",
            UPLOAD_IDLE_TIMEOUT.as_secs()
        ))),
    }
}

/// The data parts after the header as bytes; a second header is an error.
fn data_stream<S>(parts: S) -> impl Stream<Item = Result<Bytes>> + Unpin + Send
where
    S: Stream<Item = Result<upload_artifact_request::Part>> + Unpin + Send + 'static,
{
    futures::stream::unfold((parts, false), |(mut parts, done)| async move {
        if done {
            return None;
        }
        match next_part(&mut parts).await {
            Ok(None) => None,
            Ok(Some(upload_artifact_request::Part::Data(d))) => {
                Some((Ok(Bytes::from(d)), (parts, false)))
            }
            Ok(Some(upload_artifact_request::Part::Header(_))) => Some((
                Err(Error::invalid("a second header in one upload")),
                (parts, true),
            )),
            Err(e) => Some((Err(e), (parts, true))),
        }
    })
    .boxed()
}
