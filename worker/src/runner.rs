//! Attempts on this worker: starting them on a free slot with the right executor, cancel,
//! and the per-attempt task that numbers output chunks, spools them and queues them for
//! the controller. Everything an attempt produces is spooled *before* it is queued, so the
//! connection can always refill what a dropped stream lost, and redacted before that: the
//! task's secret values never reach the spool or the controller (nor does the spooled
//! `Assign` carry them: they live in memory only, for the attempt's process).
//!
//! Around the executor, the runner handles the attempt's artifacts ([`crate::artifacts`]):
//! it gets the inputs into the local cache first (holding them there until the attempt
//! ends), creates the `artifact_dir` when the spec declares artifacts, and after a success
//! packs and uploads what the executor left there before reporting the result with their
//! refs; then it removes the artifact dir.
//!
//! A cancel is never lost to timing: one for an attempt this worker does not know (yet) is
//! remembered, keyed by task and fencing token, and an attempt that starts later under that
//! key starts cancelled (see [`Runner::cancel`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use scabbard_common::proto::{
    self, AgentLogChunk, AgentMessage, RunningAttempt, TaskResult, agent_message,
};
use scabbard_common::time::now_ms;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::artifacts::Artifacts;
use crate::executor::{ExecContext, ExecOutcome, Executor, OutputChunk, executor_for};
use crate::redact::{ChunkRedactor, Secrets};
use crate::spool::Spool;

mod warm;

/// (task id, fencing token).
pub(crate) type AttemptKey = (String, u64);

pub(crate) struct AttemptState {
    pub(crate) cancel: CancellationToken,
    /// Set once the attempt ended (and its result is spooled).
    pub(crate) finished: Option<proto::Finished>,
}

/// What a [`Runner`] is made of.
pub(crate) struct RunnerParts {
    /// Where attempts' output and results are kept until acknowledged.
    pub(crate) spool: Arc<Spool>,
    /// One per capability.
    pub(crate) executors: Vec<Arc<dyn Executor>>,
    /// Parent of per-attempt working directories.
    pub(crate) work_root: std::path::PathBuf,
    /// Timeout of tasks that carry none.
    pub(crate) default_timeout: Duration,
    /// Attempts that may run at once.
    pub(crate) slots: u32,
    /// Messages for the controller.
    pub(crate) outbox: mpsc::Sender<AgentMessage>,
    /// The name this worker registers under.
    pub(crate) agent_name: String,
    /// Input downloads and artifact uploads.
    pub(crate) artifacts: Arc<Artifacts>,
}

/// Owns the attempts of this worker.
pub(crate) struct Runner {
    pub(crate) attempts: Mutex<HashMap<AttemptKey, AttemptState>>,
    pub(crate) spool: Arc<Spool>,
    executors: HashMap<&'static str, Arc<dyn Executor>>,
    work_root: std::path::PathBuf,
    default_timeout: Duration,
    pub(crate) slots: u32,
    outbox: mpsc::Sender<AgentMessage>,
    /// This worker's agent id, known once it has an identity (exported to tasks).
    agent_id: Mutex<String>,
    /// The name this worker registers under (exported to tasks).
    agent_name: String,
    /// Images and cache volumes its engine has warm.
    warm: Mutex<warm::WarmCache>,
    /// Input downloads and artifact uploads.
    artifacts: Arc<Artifacts>,
    /// Cancels of attempts not in `attempts` when they came, newest last (at most
    /// [`EARLY_CANCELS`]). Locked after `attempts`, never before.
    early_cancels: Mutex<VecDeque<AttemptKey>>,
}

/// How many cancels of unknown attempts are remembered. Most are for attempts that already
/// ended here; the one that matters (an Assign still on its way) is among the newest.
const EARLY_CANCELS: usize = 256;

impl Runner {
    pub(crate) fn new(parts: RunnerParts) -> Self {
        Self {
            warm: Mutex::new(warm::WarmCache::default()),
            attempts: Mutex::new(HashMap::new()),
            spool: parts.spool,
            executors: parts
                .executors
                .into_iter()
                .map(|e| (e.capability(), e))
                .collect(),
            work_root: parts.work_root,
            default_timeout: parts.default_timeout,
            slots: parts.slots,
            outbox: parts.outbox,
            agent_id: Mutex::new(String::new()),
            agent_name: parts.agent_name,
            artifacts: parts.artifacts,
            early_cancels: Mutex::new(VecDeque::new()),
        }
    }

    /// The name this worker registers under.
    pub(crate) fn agent_name(&self) -> &str {
        &self.agent_name
    }

    /// Records this worker's agent id (once registered) for the attempts started from now.
    pub(crate) fn set_agent_id(&self, id: &str) {
        *self.agent_id.lock().unwrap_or_else(|p| p.into_inner()) = id.to_string();
    }

    /// What the engine has warm, and the version of that summary (moves on change).
    pub(crate) fn cache_summary(&self) -> (u64, proto::CacheSummary) {
        let w = self.warm.lock().unwrap_or_else(|p| p.into_inner());
        (w.version(), w.summary())
    }

    /// Capabilities to advertise: those of the executors that are available now, with the
    /// extra ones they offer (`gpu`).
    pub(crate) fn capabilities(&self) -> Vec<String> {
        let mut c: Vec<String> = self
            .executors
            .iter()
            .filter(|(_, e)| e.available())
            .flat_map(|(k, e)| std::iter::once(*k).chain(e.extra_capabilities()))
            .map(str::to_string)
            .collect();
        c.sort();
        c.dedup();
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptKey, AttemptState>> {
        self.attempts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attempts still executing.
    pub(crate) fn running(&self) -> u32 {
        self.lock()
            .values()
            .filter(|a| a.finished.is_none())
            .count() as u32
    }

    /// Whether no attempt is running or waiting for its result to be acknowledged.
    pub(crate) fn is_idle(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every attempt the controller should hear about in `Hello`.
    pub(crate) fn hello_list(&self) -> Vec<RunningAttempt> {
        self.lock()
            .iter()
            .map(|((task_id, token), a)| RunningAttempt {
                task_id: task_id.clone(),
                fencing_token: *token,
                finished: a.finished.is_some(),
            })
            .collect()
    }

    pub(crate) fn finished(&self, key: &AttemptKey) -> Option<proto::Finished> {
        self.lock().get(key).and_then(|a| a.finished.clone())
    }

    /// Re-adopts attempts spooled by a previous run of this worker. Their processes died
    /// with it, so unfinished ones end as infrastructure failures (keeping their logs).
    pub(crate) fn adopt_spooled(&self) -> scabbard_common::Result<usize> {
        let spooled = self.spool.load_all()?;
        let mut table = self.lock();
        for s in &spooled {
            let key = (s.assign.task_id.clone(), s.assign.fencing_token);
            let finished = match &s.finished {
                Some(f) => f.clone(),
                None => {
                    let f = proto::Finished {
                        task_id: key.0.clone(),
                        fencing_token: key.1,
                        result: Some(TaskResult {
                            outcome: proto::Outcome::Failed as i32,
                            message: "the worker restarted while the attempt ran".into(),
                            error_class: proto::ErrorClass::Infrastructure as i32,
                            ..Default::default()
                        }),
                        log_chunks: s.last_seq.map_or(0, |l| l + 1),
                    };
                    self.spool.finish(&f)?;
                    f
                }
            };
            table.insert(
                key,
                AttemptState {
                    cancel: CancellationToken::new(),
                    finished: Some(finished),
                },
            );
        }
        Ok(spooled.len())
    }

    /// Starts an attempt; `Err(reason)` when it cannot run here.
    pub(crate) fn start(self: &Arc<Self>, mut assign: proto::Assign) -> Result<bool, String> {
        let trace = crate::trace::of_assign(&assign);
        let span = crate::trace::attempt_span(&assign, trace.as_ref());
        let _accept = span
            .in_scope(|| crate::trace::step("scabbard.worker.accept"))
            .entered();
        let key = (assign.task_id.clone(), assign.fencing_token);
        let spec = assign.spec.clone().ok_or("assignment without a spec")?;
        // Spooled without its secrets: an attempt is never resumed from the spool (after a
        // restart it ends as an infrastructure failure), so they are not needed there.
        if let Some(s) = assign.spec.as_mut() {
            s.secret_env.clear();
        }
        let cap = executor_for(&spec).ok_or("task spec has no kind")?;
        let exec = self
            .executors
            .get(cap)
            .cloned()
            .ok_or_else(|| format!("this worker has no '{cap}' executor"))?;
        if !exec.available() {
            return Err(format!(
                "the '{cap}' executor is not available on this worker now (its engine does not answer)"
            ));
        }
        let cancel = CancellationToken::new();
        {
            let mut table = self.lock();
            if table.contains_key(&key) {
                return Ok(false); // duplicate delivery
            }
            let running = table.values().filter(|a| a.finished.is_none()).count() as u32;
            if running >= self.slots {
                return Err(format!("no free slot ({running}/{} busy)", self.slots));
            }
            self.spool
                .begin(&assign)
                .map_err(|e| format!("cannot spool: {e}"))?;
            table.insert(
                key.clone(),
                AttemptState {
                    cancel: cancel.clone(),
                    finished: None,
                },
            );
            // Cancelled before it got here: it starts cancelled (the executor ends it at
            // once, as CANCELLED), so the controller hears how it ended.
            let mut early = self.early_cancels.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = early.iter().position(|k| *k == key) {
                early.remove(i);
                info!(task = %key.0, token = key.1, "attempt was cancelled before it arrived: starting it cancelled");
                cancel.cancel();
            }
        }
        let ctx = ExecContext {
            task_id: assign.task_id.clone(),
            fencing_token: assign.fencing_token,
            attempt: assign.attempt,
            agent_id: self
                .agent_id
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            agent_name: self.agent_name.clone(),
            work_root: self.work_root.clone(),
            default_timeout: self.default_timeout,
            project: assign.project.clone(),
            inputs: Vec::new(),
            artifact_dir: self.work_root.join(format!(
                "{}-{}.artifacts",
                crate::executor::safe_name(&assign.task_id),
                assign.fencing_token
            )),
            trace,
        };
        let runner = self.clone();
        tokio::spawn(
            async move { runner.run_attempt(key, ctx, spec, exec, cancel).await }.instrument(span),
        );
        Ok(true)
    }

    async fn run_attempt(
        self: Arc<Self>,
        key: AttemptKey,
        ctx: ExecContext,
        spec: proto::TaskSpec,
        exec: Arc<dyn Executor>,
        cancel: CancellationToken,
    ) {
        let (started, executor) = (std::time::Instant::now(), exec.capability());
        let secrets = Arc::new(Secrets::with_encodings(spec.secret_env.values()));
        let mut redactor = ChunkRedactor::new(secrets.clone());
        let (tx, mut rx) = mpsc::channel(64);
        let stop = cancel.clone();
        let work = self.execute(&key, ctx, &spec, exec, tx, cancel);
        tokio::pin!(work);
        let mut log = AttemptLog::default();
        let (mut outcome, artifacts) = loop {
            tokio::select! {
                done = &mut work => break done,
                Some(chunk) = rx.recv() => {
                    self.emit_chunks(&key, &mut log, redactor.push(chunk)).await;
                    if log.spool_failed_now() {
                        // Lines could be lost: stop the task rather than run on unrecorded.
                        stop.cancel();
                    }
                }
            }
        };
        while let Ok(chunk) = rx.try_recv() {
            self.emit_chunks(&key, &mut log, redactor.push(chunk)).await;
        }
        self.emit_chunks(&key, &mut log, redactor.finish()).await;
        if let Some(why) = log.spool_error.clone() {
            let why = format!(
                "cannot spool the attempt's output, so log lines could be lost (the attempt was stopped): {why}"
            );
            warn!(task = %key.0, attempt = key.1, reason = %why, "attempt failed: spool write failed");
            let note = OutputChunk {
                stream: crate::executor::OutStream::System,
                data: format!("{why}\n").into_bytes(),
            };
            self.emit_chunks(&key, &mut log, redactor.push(note)).await;
            self.emit_chunks(&key, &mut log, redactor.finish()).await;
            outcome = ExecOutcome {
                outcome: proto::Outcome::Failed,
                error_class: proto::ErrorClass::Infrastructure,
                message: why,
                ..outcome
            };
        }
        // Outputs flow into workflow answers and dependents' environments: a secret (or an
        // encoding of it) in one is masked, and the log says which (GitHub Actions drops
        // such outputs; we keep the rest of the value).
        let mut outputs = std::collections::HashMap::with_capacity(outcome.outputs.len());
        let mut masked: Vec<String> = Vec::new();
        for (k, v) in std::mem::take(&mut outcome.outputs) {
            let (name, value) = (secrets.redact_str(&k), secrets.redact_str(&v));
            if name != k || value != v {
                masked.push(name.clone());
            }
            outputs.insert(name, value);
        }
        masked.sort();
        for name in masked {
            let note = OutputChunk {
                stream: crate::executor::OutStream::System,
                data: format!(
                    "output {name:?} contained a secret (or an encoding of one): it was masked\n"
                )
                .into_bytes(),
            };
            self.emit_chunks(&key, &mut log, redactor.push(note)).await;
        }
        self.emit_chunks(&key, &mut log, redactor.finish()).await;
        let seq = log.seq;
        let finished = proto::Finished {
            task_id: key.0.clone(),
            fencing_token: key.1,
            result: Some(TaskResult {
                outcome: outcome.outcome as i32,
                exit_code: outcome.exit_code,
                message: secrets.redact_str(&outcome.message),
                error_class: outcome.error_class as i32,
                outputs,
                artifacts,
            }),
            log_chunks: seq,
        };
        // The engine pulled the image unless the platform failed before it could.
        if outcome.error_class != proto::ErrorClass::Infrastructure {
            self.warm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .note(&spec);
        }
        crate::trace::record_outcome(&tracing::Span::current(), outcome.outcome);
        let spooled =
            crate::trace::step("scabbard.worker.spool").in_scope(|| self.spool.finish(&finished));
        if let Err(e) = spooled {
            warn!(task = %key.0, error = %e, "cannot spool the result; it is kept in memory only");
        }
        info!(task = %key.0, attempt = key.1 as u32, token = key.1, outcome = ?outcome.outcome, "attempt finished");
        crate::metrics::attempt_finished(executor, outcome.outcome, started.elapsed());
        if let Some(a) = self.lock().get_mut(&key) {
            a.finished = Some(finished.clone());
        }
        let _ = self
            .outbox
            .send(AgentMessage {
                msg: Some(agent_message::Msg::Finished(finished)),
            })
            .await;
    }

    /// The attempt from inputs to stored artifacts: stages the inputs, runs the executor,
    /// uploads what a success produced; returns how it ended and the artifacts' refs. Every
    /// line about it goes to `log`.
    async fn execute(
        &self,
        key: &AttemptKey,
        mut ctx: ExecContext,
        spec: &proto::TaskSpec,
        exec: Arc<dyn Executor>,
        log: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> (ExecOutcome, Vec<proto::ArtifactRef>) {
        let attempt = (key.0.as_str(), key.1);
        let artifact_dir = ctx.artifact_dir.clone();
        let wants_artifacts = !spec.artifacts.is_empty();
        if wants_artifacts && let Err(e) = fresh_private_dir(&artifact_dir).await {
            let why = format!("cannot create {}: {e}", artifact_dir.display());
            return (ExecOutcome::infrastructure(why), Vec::new());
        }
        let staged = match self
            .artifacts
            .stage_inputs(attempt, spec, &log, &cancel)
            .instrument(crate::trace::step("scabbard.worker.inputs"))
            .await
        {
            Ok(staged) => staged,
            Err(outcome) => {
                remove_dir(&artifact_dir).await;
                return (outcome, Vec::new());
            }
        };
        ctx.inputs = staged.inputs.clone();
        let executing = crate::trace::step("scabbard.worker.execute");
        // The task's processes continue the trace under this span (when the worker traces;
        // else they get the assignment's context as it came).
        if let Some(tp) = executing.in_scope(scabbard_common::telemetry::current) {
            ctx.trace = Some(tp);
        }
        let mut outcome = exec
            .run(ctx, spec, log.clone(), cancel.clone())
            .instrument(executing)
            .await;
        // The attempt's own processes are gone: its inputs may leave the cache.
        drop(staged);
        let mut refs = Vec::new();
        if outcome.outcome == proto::Outcome::Succeeded && !outcome.artifacts.is_empty() {
            let produced = std::mem::take(&mut outcome.artifacts);
            match self
                .artifacts
                .publish(attempt, &produced, &artifact_dir, &log, &cancel)
                .instrument(crate::trace::step("scabbard.worker.upload"))
                .await
            {
                Ok(stored) => refs = stored,
                Err(failed) => {
                    // The process's exit code and outputs still help to debug the failure.
                    let (outputs, exit_code) =
                        (std::mem::take(&mut outcome.outputs), outcome.exit_code);
                    outcome = failed;
                    outcome.outputs = outputs;
                    outcome.exit_code = exit_code;
                }
            }
        }
        if wants_artifacts {
            remove_dir(&artifact_dir).await;
        }
        (outcome, refs)
    }

    async fn emit_chunks(&self, key: &AttemptKey, log: &mut AttemptLog, chunks: Vec<OutputChunk>) {
        for chunk in chunks {
            self.emit_chunk(key, log, chunk).await;
        }
    }

    async fn emit_chunk(&self, key: &AttemptKey, log: &mut AttemptLog, chunk: OutputChunk) {
        let seq = &mut log.seq;
        let c = AgentLogChunk {
            task_id: key.0.clone(),
            fencing_token: key.1,
            seq: *seq,
            stream: proto::LogStream::from(chunk.stream) as i32,
            data: chunk.data,
            at_ms: now_ms(),
        };
        *seq += 1;
        if let Err(e) = self.spool.append_chunk(&c) {
            warn!(task = %key.0, error = %e, "cannot spool a log chunk");
            if log.spool_error.is_none() {
                log.spool_error = Some(e.to_string());
                log.newly_failed = true;
            }
        }
        let _ = self
            .outbox
            .send(AgentMessage {
                msg: Some(agent_message::Msg::Log(c)),
            })
            .await;
    }

    /// Asks a running attempt to stop (the executor reports CANCELLED). An attempt this
    /// worker does not hold is remembered: should its `Assign` come after the cancel (the
    /// fencing token names the attempt exactly), it starts cancelled. Checked and recorded
    /// under the attempts' lock, so a concurrent [`start`](Self::start) sees one or the other.
    pub(crate) fn cancel(&self, key: &AttemptKey) {
        let table = self.lock();
        if let Some(a) = table.get(key) {
            a.cancel.cancel();
            return;
        }
        let mut early = self.early_cancels.lock().unwrap_or_else(|p| p.into_inner());
        if !early.contains(key) {
            if early.len() >= EARLY_CANCELS {
                early.pop_front();
            }
            early.push_back(key.clone());
        }
    }

    /// Forgets an attempt: stops it if running and deletes its spool.
    pub(crate) fn forget(&self, key: &AttemptKey) {
        if let Some(a) = self.lock().remove(key) {
            a.cancel.cancel();
        }
        if let Err(e) = self.spool.remove(&key.0, key.1) {
            warn!(task = %key.0, error = %e, "cannot remove spool");
        }
    }
}

/// Where an attempt's log stands: the next sequence number, and the first spool failure.
#[derive(Debug, Default)]
struct AttemptLog {
    seq: u64,
    /// Why a chunk could not be spooled (the attempt fails with it).
    spool_error: Option<String>,
    /// Set by the failure, cleared by [`AttemptLog::spool_failed_now`].
    newly_failed: bool,
}

impl AttemptLog {
    /// Whether the spool failed since the last call.
    fn spool_failed_now(&mut self) -> bool {
        std::mem::take(&mut self.newly_failed)
    }
}

/// `dir` created empty with mode 0700 (a leftover of a previous run is deleted first).
async fn fresh_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    tokio::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .await
}

async fn remove_dir(dir: &std::path::Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            warn!(dir = %dir.display(), error = %e, "cannot remove the artifact dir");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
