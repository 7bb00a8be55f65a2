//! `TaskService`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use scabbard_common::Error;
use scabbard_common::proto::{
    BatchEntryError, CancelTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse,
    LogChunk, RerunTaskRequest, SubmitBatchRequest, SubmitBatchResponse, SubmitBatchResult,
    SubmitTaskRequest, SubmitTaskResponse, Task, TaskEvent, TaskLogsRequest, TaskState,
    WatchTasksRequest, task_service_server::TaskService,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::audit;
use crate::auth::{self, Catalog, Principal};
use crate::core::{BatchEntry, CoreMsg, CoreRouter, Origin, TASK_PREFIX, validate};
use crate::store::{Store, WatchEvent};
// Every task leaving this service goes through `masked`: secret values read "***".
use crate::sealed::masked;

/// Server-stream type used by the streaming methods.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Implementation of `scabbard.v1.TaskService`.
pub struct TaskApi {
    pub(crate) core: CoreRouter,
    pub(crate) catalog: Arc<Catalog>,
    /// Per-token stream caps and per-stream buffer limits.
    pub(crate) streams: Arc<super::StreamLimits>,
}

/// Most entries of one `SubmitBatch`.
pub(crate) const MAX_BATCH: usize = 1000;

impl TaskApi {
    /// What the API checks of a submit before the core sees it (a spec is given, the
    /// caller may use the project, which exists): the spec, idempotency key and project.
    fn check_submit(
        &self,
        who: &Principal,
        r: SubmitTaskRequest,
    ) -> Result<(scabbard_common::proto::TaskSpec, String, String), Error> {
        let spec = r.spec.ok_or_else(|| Error::invalid("spec is required"))?;
        let project = who.resolve_project(&r.project)?;
        if self.catalog.project(&project).is_none() {
            return Err(Error::not_found("project", project));
        }
        Ok((spec, r.idempotency_key, project))
    }

    /// The task, if the caller's project may see it (`PERMISSION_DENIED` otherwise).
    /// `input` is a task id or a unique prefix of one (see `crate::resolve`).
    async fn visible_task(&self, who: &Principal, input: String) -> Result<Task, Status> {
        self.visible_task_for(who, input, "get").await
    }

    /// [`visible_task`](Self::visible_task) for the command `verb` (`get`, `logs`, …): a
    /// workflow's id is answered with the workflow command to use instead.
    async fn visible_task_for(
        &self,
        who: &Principal,
        input: String,
        verb: &str,
    ) -> Result<Task, Status> {
        let store = self.catalog.store().as_ref();
        let id = match crate::resolve::task(store, who, &input).await {
            Err(e @ Error::NotFound { .. }) => {
                return Err(crate::resolve::not_a_task(store, who, &input, verb, e)
                    .await
                    .into());
            }
            other => other?,
        };
        validate::id("task", &id)?;
        // From the core while it holds the task, else from the store (off the core).
        let task = match self.core.current()?.task(&id).await {
            Err(e @ Error::NotFound { .. }) => {
                return Err(crate::resolve::not_a_task(store, who, &input, verb, e)
                    .await
                    .into());
            }
            other => other?,
        };
        who.check_visible("task", &task.id, &task.project)?;
        Ok(task)
    }
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn submit(
        &self,
        req: Request<SubmitTaskRequest>,
    ) -> Result<Response<SubmitTaskResponse>, Status> {
        let who = auth::principal(&req)?;
        let trace = crate::core::trace::incoming(&req);
        let (spec, idempotency_key, project) = self.check_submit(&who, req.into_inner())?;
        let name = spec.name.clone();
        let audit = audit::entry(&who, "task.submit", "", &project, name.clone());
        let (task, existing) = self
            .core
            .ask(|reply| CoreMsg::Submit {
                spec: Box::new(spec),
                idempotency_key,
                project,
                origin: Origin {
                    trace,
                    rerun_of: String::new(),
                    audit: Some(Box::new(audit)),
                },
                reply,
            })
            .await?;
        // A new task's entry was written in its commit; a repeat wrote nothing.
        if existing {
            self.catalog.audit(audit::entry(
                &who,
                "task.submit",
                &task.id,
                &task.project,
                format!("{name} (existing: same idempotency key)"),
            ));
        }
        Ok(Response::new(SubmitTaskResponse {
            task: Some(masked(task)),
            existing,
        }))
    }

    async fn submit_batch(
        &self,
        req: Request<SubmitBatchRequest>,
    ) -> Result<Response<SubmitBatchResponse>, Status> {
        let who = auth::principal(&req)?;
        let trace = crate::core::trace::incoming(&req);
        let r = req.into_inner();
        if r.tasks.len() > MAX_BATCH {
            return Err(Error::invalid(format!(
                "tasks: {} entries, at most {MAX_BATCH} per SubmitBatch: split the batch",
                r.tasks.len()
            ))
            .into());
        }
        // Each entry goes through the same checks as a Submit of its own; those the API
        // refuses get their error, the rest go to the core in one message.
        let mut answers = Vec::with_capacity(r.tasks.len());
        let mut entries = Vec::new();
        for t in r.tasks {
            match self.check_submit(&who, t) {
                Ok((spec, idempotency_key, project)) => {
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    entries.push(BatchEntry {
                        spec: Box::new(spec),
                        idempotency_key,
                        project,
                        trace: trace.clone(),
                        reply,
                    });
                    answers.push(Ok(rx));
                }
                Err(e) => answers.push(Err(e)),
            }
        }
        if !entries.is_empty() {
            self.core.tell(CoreMsg::SubmitBatch { entries }).await?;
        }
        let mut results = Vec::with_capacity(answers.len());
        // One audit entry per call and project, not per task.
        let mut submitted = std::collections::BTreeMap::<String, Vec<String>>::new();
        for a in answers {
            let outcome = match a {
                Ok(rx) => rx.await.unwrap_or_else(|_| {
                    Err(Error::Unavailable("controller is shutting down".into()))
                }),
                Err(e) => Err(e),
            };
            if let Ok((task, _)) = &outcome {
                let e = submitted.entry(task.project.clone()).or_default();
                e.push(task.id.clone());
            }
            results.push(match outcome {
                Ok((task, existing)) => SubmitBatchResult {
                    task: Some(masked(task)),
                    existing,
                    error: None,
                },
                Err(e) => SubmitBatchResult {
                    error: Some(BatchEntryError {
                        code: e.code() as i32,
                        message: e.to_string(),
                    }),
                    ..Default::default()
                },
            });
        }
        for (project, ids) in submitted {
            let shown: Vec<&str> = ids.iter().take(20).map(String::as_str).collect();
            let more = ids.len().saturating_sub(shown.len());
            let mut detail = format!("batch of {}: {}", ids.len(), shown.join(","));
            if more > 0 {
                detail.push_str(&format!(" and {more} more"));
            }
            self.catalog
                .audit(audit::entry(&who, "task.submit", &ids[0], &project, detail));
        }
        Ok(Response::new(SubmitBatchResponse { results }))
    }

    async fn get(&self, req: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let who = auth::principal(&req)?;
        Ok(Response::new(masked(
            self.visible_task(&who, req.into_inner().id).await?,
        )))
    }

    async fn list(
        &self,
        req: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let who = auth::principal(&req)?;
        let mut req = req.into_inner();
        req.project = who.list_filter(&req.project)?.unwrap_or_default();
        for s in &req.states {
            if TaskState::try_from(*s).is_err() || *s == 0 {
                return Err(Error::invalid(format!(
                    "states: {s} is not a task state (use TASK_STATE_QUEUED … TASK_STATE_RETRY_WAIT)"
                ))
                .into());
            }
        }
        // From the store's history index, off the core (see `api::list`). Only the leader
        // serves (like every task call), so a follower never answers with an older view.
        self.core.current()?;
        let (tasks, next_page_token) =
            super::list::tasks(self.catalog.store().as_ref(), &req).await?;
        Ok(Response::new(ListTasksResponse {
            tasks: tasks.into_iter().map(masked).collect(),
            next_page_token,
        }))
    }

    async fn cancel(&self, req: Request<CancelTaskRequest>) -> Result<Response<Task>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        if r.reason.len() > 1024 {
            return Err(Error::invalid("reason is longer than 1024 bytes").into());
        }
        let task = self.visible_task_for(&who, r.id.clone(), "cancel").await?;
        let entry = audit::entry(
            &who,
            "task.cancel",
            &task.id,
            &task.project,
            r.reason.clone(),
        );
        let cancelled = self
            .core
            .ask(|reply| CoreMsg::Cancel {
                id: task.id.clone(),
                reason: r.reason,
                reply,
            })
            .await;
        let task = match cancelled {
            // Only finished tasks leave the core: this one is final (read from the store).
            Err(Error::NotFound { .. }) if scabbard_common::is_final(task.state()) => {
                return Err(Error::FailedPrecondition(format!(
                    "task {} is already {}; only queued or running tasks can be cancelled",
                    task.id,
                    task.state().as_str_name().trim_start_matches("TASK_STATE_")
                ))
                .into());
            }
            other => other?,
        };
        // The cancel is recorded; a failed audit write is reported but does not undo it.
        if let Err(e) = audit::record(self.catalog.store(), &entry).await {
            tracing::warn!(error = %e, task = %task.id, "could not record the cancel in the audit log");
        }
        Ok(Response::new(masked(task)))
    }

    type WatchStream = BoxStream<TaskEvent>;

    async fn watch(
        &self,
        req: Request<WatchTasksRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = auth::principal(&req)?;
        let mut r = req.into_inner();
        for id in &mut r.ids {
            let store = self.catalog.store().as_ref();
            *id = match crate::resolve::task(store, &who, id).await {
                Err(e @ Error::NotFound { .. }) => {
                    return Err(crate::resolve::not_a_task(store, &who, id, "watch", e)
                        .await
                        .into());
                }
                other => other?,
            };
            validate::id("task", id)?;
        }
        if r.after_revision < 0 {
            return Err(Error::invalid("after_revision must not be negative").into());
        }
        // Served from the store's history, not from the core: every event is a committed
        // task record named by its store revision, so a resume point means the same on
        // every controller and across leader changes.
        let store = self.catalog.store().clone();
        let (snapshot, from) = if r.after_revision > 0 {
            (
                read_tasks(store.as_ref(), &r.ids).await?.0,
                r.after_revision,
            )
        } else {
            let (snapshot, at) = read_tasks(store.as_ref(), &r.ids).await?;
            (snapshot, at + 1)
        };
        for (t, _) in &snapshot {
            who.check_visible("task", &t.id, &t.project)?;
        }
        // Placement explanations are the leader's derived state, never stored: a fresh
        // watch of given ids on the leader also gets them from its core (see
        // `core::waiting`). A resumed one gets only what the store has after its resume
        // point.
        let placements = match (
            r.ids.is_empty() || r.after_revision > 0,
            self.core.current(),
        ) {
            (false, Ok(core)) => core
                .call(|reply| CoreMsg::SubscribePlacements {
                    ids: r.ids.clone(),
                    reply,
                })
                .await
                .ok(),
            _ => None,
        };
        let mut changes = store.watch(TASK_PREFIX, from).await?;
        let slot = self.streams.open(&who.token_id)?;
        let (tx, out) = self.streams.outbox::<TaskEvent>(slot);
        super::guard::end_on_revoke(self.catalog.clone(), who.token_id.clone(), tx.ender());
        let filter: std::collections::HashSet<String> = r.ids.into_iter().collect();
        let send_initial = r.send_initial && r.after_revision == 0;
        // Resuming inside a revision: skip its events up to and including that task's.
        let mut skip = (r.after_revision > 0).then_some((r.after_revision, r.after_task_id));
        tokio::spawn(async move {
            let mut seen = super::placement::Seen::new(from - 1);
            if send_initial {
                for (t, revision) in snapshot {
                    seen.state(&t, revision, &filter);
                    if !tx.push(TaskEvent {
                        task: Some(masked(t)),
                        revision,
                    }) {
                        return;
                    }
                }
            }
            let (current, mut explained) = match placements {
                Some((current, rx)) if send_initial => (current, Some(rx)),
                Some((_, rx)) => (Vec::new(), Some(rx)),
                None => (Vec::new(), None),
            };
            for t in current {
                if let Some(ev) = seen.placement(Arc::new(t), &filter)
                    && !tx.push(ev)
                {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    next = changes.recv() => next,
                    p = super::placement::next(&mut explained) => {
                        if let Some(ev) = p.and_then(|t| seen.placement(t, &filter))
                            && !tx.push(ev)
                        {
                            return;
                        }
                        continue;
                    }
                    _ = tx.closed() => return,
                };
                let kv = match next {
                    Some(Ok(WatchEvent::Put(kv))) => kv,
                    Some(Ok(WatchEvent::Delete { .. })) => continue,
                    Some(Err(e)) => {
                        tx.finish(Status::aborted(format!(
                            "the watch broke ({e}); watch again from the last event's revision and task id"
                        )));
                        return;
                    }
                    None => {
                        tx.finish(Status::unavailable(
                            "the store watch ended; watch again from the last event's revision and task id",
                        ));
                        return;
                    }
                };
                let Some(id) = kv.key.strip_prefix(TASK_PREFIX) else {
                    continue;
                };
                if let Some((rev, after_id)) = &skip {
                    if kv.mod_revision == *rev {
                        // The client's last event: what follows in this revision is new.
                        let last_seen = !after_id.is_empty() && id == after_id;
                        if last_seen {
                            skip = None;
                        }
                        continue;
                    }
                    skip = None;
                }
                if !filter.is_empty() && !filter.contains(id) {
                    continue;
                }
                let t = match Task::decode(kv.value.as_slice()) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "undecodable task record in a watch");
                        continue;
                    }
                };
                if !who.may_access(&t.project) {
                    continue;
                }
                seen.state(&t, kv.mod_revision, &filter);
                // False: the client went away or fell too far behind (then the stream
                // ends with RESOURCE_EXHAUSTED, its buffer freed).
                if !tx.push(TaskEvent {
                    task: Some(masked(t)),
                    revision: kv.mod_revision,
                }) {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    type LogsStream = BoxStream<LogChunk>;

    async fn logs(
        &self,
        req: Request<TaskLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        let task = self
            .visible_task_for(&who, r.task_id.clone(), "logs")
            .await?;
        if r.attempt as usize > task.attempts.len() {
            return Err(Error::invalid(format!(
                "task {} has {} attempts; attempt {} does not exist",
                task.id,
                task.attempts.len(),
                r.attempt
            ))
            .into());
        }
        let slot = self.streams.open(&who.token_id)?;
        let (tx, out) = mpsc::channel(256);
        let current = self.core.current()?;
        let follower = super::logs::Follower {
            core: self.core.clone(),
            logs: current.logs().clone(),
            archive: current.archive().cloned(),
            task_id: task.id.clone(),
            follow_latest: r.attempt == 0,
            attempt: if r.attempt == 0 {
                task.fencing_token as u32
            } else {
                r.attempt
            },
            seq: r.from_seq,
            follow: r.follow,
        };
        tokio::spawn(follower.run(tx));
        let stream = super::guard::close_on_revoke(self.catalog.clone(), who.token_id, out);
        // The token's stream slot is held as long as the stream.
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            stream,
            move |m| {
                let _ = &slot;
                m
            },
        ))))
    }

    async fn rerun(
        &self,
        req: Request<RerunTaskRequest>,
    ) -> Result<Response<SubmitTaskResponse>, Status> {
        let who = auth::principal(&req)?;
        let trace = crate::core::trace::incoming(&req);
        let r = req.into_inner();
        let source = self.visible_task(&who, r.id).await?;
        let resp = super::rerun::task(
            &self.core,
            &self.catalog,
            &who,
            source,
            r.idempotency_key,
            trace,
        )
        .await?;
        Ok(Response::new(resp))
    }
}

/// The records of the tasks `ids`, each with its revision, read consistently at one store
/// revision (also returned): nothing changed them between the read and that revision, so a
/// watch from the next revision misses nothing. `NOT_FOUND` names a missing task.
async fn read_tasks(store: &dyn Store, ids: &[String]) -> Result<(Vec<(Task, i64)>, i64), Status> {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let kv = store
                .get(&format!("{TASK_PREFIX}{id}"))
                .await?
                .ok_or_else(|| Error::not_found("task", id.clone()))?;
            let t = Task::decode(kv.value.as_slice())
                .map_err(|e| Error::internal(format!("corrupt task record {id}: {e}")))?;
            out.push((t, kv.mod_revision));
        }
        let at = store.revision().await?;
        // Read again: unchanged means every state above is the state at `at`.
        let mut stable = true;
        for (t, rev) in &out {
            let now = store.get(&format!("{TASK_PREFIX}{}", t.id)).await?;
            if now.is_none_or(|kv| kv.mod_revision != *rev) {
                stable = false;
                break;
            }
        }
        if stable || tries >= 20 {
            if !stable {
                return Err(Error::Unavailable(
                    "the watched tasks change too fast to read them consistently; try again".into(),
                )
                .into());
            }
            out.sort_by_key(|(_, rev)| *rev);
            return Ok((out, at));
        }
    }
}
