//! The `dagger` executor: container tasks and `dagger_call` tasks on the host's Dagger
//! engine.
//!
//! A **container task** gets its own engine session: our code starts `dagger session
//! --progress plain` ([`session`]) with the configured CLI ([`cli`]: never downloaded while
//! `offline`), in its own process group, and points a `dagger_sdk::Query` at that session's
//! port and token ([`gql`]) — secrets and registry auth are per session in Dagger, so tasks
//! never see each other's. The spec is checked first ([`plan`]: which worker-side secret
//! sources, registry credentials and cache volumes the task's project may use — decided
//! before any value is read —, host directories inside the workspace root, sources, GPUs,
//! outputs and artifacts), then run as Dagger calls ([`container`]): every attempt's steps
//! really run unless marked cacheable, each step's output is streamed from files, and the
//! results (`$SCABBARD_OUTPUT`, publish, artifacts, outputs) are collected; exported
//! outputs get digests ([`digest`]). The session's stderr (the engine's progress, with the
//! live output of running execs) is streamed into the task's log as system chunks. On
//! timeout or cancel the pipeline is dropped and the session's group gets SIGTERM, then
//! SIGKILL after `kill_grace_ms`; `run` returns once the group is gone, and the attempt's
//! work dir is removed (but for exported `container_path` outputs).
//!
//! A **`dagger_call` task** is `dagger call -m <module> <function> <args…>` as a host
//! process ([`call`]).
//!
//! Failures: the task's own (a step's non-zero exit code, an unknown or forbidden secret
//! source, a declared output or required artifact the container lacks, GPUs the worker
//! does not have, a push the registry refuses) are USER failures; everything else — no CLI,
//! a session that does not start in time, any other SDK/GraphQL/transport error, a panic
//! inside the SDK (the pipeline runs in its own tokio task, so a panic is caught as a
//! `JoinError`) — is an INFRASTRUCTURE failure, which the controller retries by its policy.
//!
//! Secret values (the spec's `secret_env` and worker-side ones) are masked in every chunk
//! this executor sends, in the result's message and outputs, and in the queries it logs.
//!
//! The worker advertises the `dagger` capability only while an engine answers ([`probe`]):
//! [`DaggerExecutor::probe`] at start-up, [`DaggerExecutor::spawn_rechecks`] after that; a
//! worker with `[dagger].gpus` also advertises `gpu` while it does.

mod call;
mod cli;
mod container;
mod digest;
mod gql;
mod plan;
mod probe;
mod session;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use scabbard_common::proto::{self, ErrorClass, Outcome};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{DAGGER_CAPABILITY, ExecContext, ExecOutcome, Executor, GPU_CAPABILITY, OutputChunk};
use crate::config::DaggerConfig;
use crate::redact::{ChunkRedactor, Secrets};
use plan::Refusal;
use session::{EngineSession, SessionSpec};

/// Runs container and `dagger_call` tasks on the host's Dagger engine.
#[derive(Clone)]
pub struct DaggerExecutor {
    cfg: Arc<DaggerConfig>,
    /// Whether the engine answered the last probe.
    available: Arc<AtomicBool>,
    /// Whether a probe ran yet (the first result is always logged).
    probed: Arc<AtomicBool>,
}

impl std::fmt::Debug for DaggerExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaggerExecutor")
            .field("available", &self.is_available())
            .finish_non_exhaustive()
    }
}

impl DaggerExecutor {
    /// An executor for `cfg`; not available until a [`Self::probe`] succeeds. Warns about
    /// each worker-side source every project may use.
    pub fn new(cfg: DaggerConfig) -> Self {
        for source in cfg.open_to_every_project() {
            warn!(
                %source,
                "every project's tasks may use this (no `projects` allowlist in the worker config)"
            );
        }
        Self {
            cfg: Arc::new(cfg),
            available: Arc::new(AtomicBool::new(false)),
            probed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the engine answered the last probe.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    /// Asks the engine now (bounded by `probe_timeout_ms`) and records the answer; logs
    /// the first answer and every change. Returns whether it answered.
    pub async fn probe(&self) -> bool {
        let answer = probe::probe(&self.cfg).await;
        let up = answer.is_ok();
        let was = self.available.swap(up, Ordering::Relaxed);
        let first = !self.probed.swap(true, Ordering::Relaxed);
        match answer {
            Ok(version) if first || !was => {
                info!(%version, "dagger engine answers: advertising the dagger capability");
            }
            Err(why) if first => {
                info!(%why, "dagger engine does not answer: not advertising the dagger capability");
            }
            Err(why) if was => {
                warn!(%why, "dagger engine stopped answering: withdrawing the dagger capability");
            }
            _ => {}
        }
        up
    }

    /// Probes again every `probe_interval_ms` until `stop` fires; `None` when the interval
    /// is 0 (start-up only).
    pub fn spawn_rechecks(&self, stop: CancellationToken) -> Option<JoinHandle<()>> {
        let interval = self.cfg.probe_interval()?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = this.probe() => {}
                }
            }
        }))
    }

    async fn run_container(
        &self,
        ctx: ExecContext,
        spec: &proto::TaskSpec,
        task: &proto::ContainerTask,
        out: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> ExecOutcome {
        // Blocking: secret sources and host directories are read from the file system.
        let planned = tokio::task::spawn_blocking({
            let (task, spec, cfg, ctx) =
                (task.clone(), spec.clone(), self.cfg.clone(), ctx.clone());
            move || plan::plan(&task, &spec, &cfg, &ctx)
        })
        .await;
        let plan = match planned {
            Ok(Ok(plan)) => plan,
            Ok(Err(Refusal::User(why))) => return ExecOutcome::failed(127, ErrorClass::User, why),
            Ok(Err(Refusal::Infra(why))) => return ExecOutcome::infrastructure(why),
            Err(e) => return ExecOutcome::infrastructure(format!("checking the task: {e}")),
        };
        let values = plan.secret_values();
        let secrets = Arc::new(Secrets::with_encodings(
            values
                .iter()
                .map(String::as_str)
                .chain(spec.secret_env.values().map(String::as_str)),
        ));
        let (tx, forwarder) = redacting_forwarder(out, secrets.clone());
        let mut outcome = self
            .container_attempt(&ctx, spec, plan, tx, cancel, secrets.clone())
            .await;
        let _ = forwarder.await;
        outcome.message = secrets.redact_str(&outcome.message);
        outcome.outputs = outcome
            .outputs
            .into_iter()
            .map(|(k, v)| (secrets.redact_str(&k), secrets.redact_str(&v)))
            .collect();
        outcome
    }

    /// Session, pipeline, shutdown; `tx` is dropped when it returns.
    async fn container_attempt(
        &self,
        ctx: &ExecContext,
        spec: &proto::TaskSpec,
        plan: plan::Plan,
        tx: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
        secrets: Arc<Secrets>,
    ) -> ExecOutcome {
        // One token for "stop now", fired by a cancel or by the attempt's deadline.
        let stop = cancel.child_token();
        let limit = ctx.timeout_for(spec);
        let timer = limit.map(|limit| {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                stop.cancel();
            })
        });
        let stopped = |cancel: &CancellationToken| {
            if cancel.is_cancelled() {
                ExecOutcome {
                    outcome: Outcome::Cancelled,
                    exit_code: -1,
                    message: "cancelled".into(),
                    error_class: ErrorClass::Unspecified,
                    outputs: Default::default(),
                    artifacts: Vec::new(),
                }
            } else {
                ExecOutcome {
                    outcome: Outcome::TimedOut,
                    exit_code: -1,
                    message: format!(
                        "timed out after {}s",
                        limit.unwrap_or_default().as_secs_f64()
                    ),
                    error_class: ErrorClass::User,
                    outputs: Default::default(),
                    artifacts: Vec::new(),
                }
            }
        };

        let workdir = match super::fresh_workdir(ctx).await {
            Ok(dir) => dir,
            Err(e) => {
                return ExecOutcome::infrastructure(format!(
                    "cannot create a working directory under {}: {e}",
                    ctx.work_root.display()
                ));
            }
        };
        let cli = match cli::cli_path(&self.cfg).await {
            Ok(cli) => cli,
            Err(why) => {
                remove_dir(&workdir).await;
                return ExecOutcome::infrastructure(why);
            }
        };
        let mut env = cli::cli_env(&self.cfg);
        // The engine's spans join the task's trace.
        env.extend(ctx.otel_env().into_iter().map(|(k, v)| (k, v.into())));
        let session_spec = SessionSpec {
            cli: &cli,
            env,
            cwd: &workdir,
            start_timeout: self.cfg.session_start_timeout(),
            kill_grace: self.cfg.kill_grace(),
        };
        let session = match EngineSession::start(session_spec, Some(tx.clone()), stop.clone()).await
        {
            Ok(session) => session,
            Err(why) => {
                remove_dir(&workdir).await;
                if stop.is_cancelled() {
                    return stopped(&cancel);
                }
                return ExecOutcome::infrastructure(why);
            }
        };
        let client = gql::connect(session.port, &session.token, secrets);
        let exports = plan.exports();
        let dirs = container::AttemptDirs {
            work: workdir.clone(),
            artifacts: ctx.artifact_dir.clone(),
        };
        let export_dir = dirs.exports();
        // In the attempt's execute span (its steps' spans hang under it when traced).
        let mut pipeline = tokio::spawn(tracing::Instrument::in_current_span(
            container::run_pipeline(client, plan, tx.clone(), dirs),
        ));
        let mut outcome = tokio::select! {
            ended = &mut pipeline => match ended {
                Ok(outcome) => outcome,
                Err(e) if e.is_panic() => ExecOutcome::infrastructure(format!(
                    "the Dagger SDK panicked: {}",
                    panic_message(e)
                )),
                Err(e) => ExecOutcome::infrastructure(format!("the pipeline ended: {e}")),
            },
            () = stop.cancelled() => {
                pipeline.abort();
                let _ = pipeline.await;
                let outcome = stopped(&cancel);
                container::note(
                    &tx,
                    format!(
                        "{}: stopping the dagger session (SIGTERM, SIGKILL in {}s)",
                        outcome.message,
                        self.cfg.kill_grace().as_secs_f64()
                    ),
                )
                .await;
                outcome
            }
        };
        if let Some(timer) = timer {
            timer.abort();
        }
        session.shutdown().await;
        // Everything the attempt left in its work dir goes, but exported `container_path`
        // outputs (the legacy way to hand files on, which points at them).
        let kept = exports
            && outcome
                .outputs
                .values()
                .any(|v| std::path::Path::new(v).starts_with(&export_dir));
        if kept {
            remove_all_but(&workdir, &export_dir).await;
        } else {
            remove_dir(&workdir).await;
            if exports {
                outcome
                    .outputs
                    .retain(|_, v| !std::path::Path::new(v).starts_with(&export_dir));
            }
        }
        outcome
    }
}

#[async_trait]
impl Executor for DaggerExecutor {
    fn capability(&self) -> &'static str {
        DAGGER_CAPABILITY
    }

    fn available(&self) -> bool {
        self.is_available()
    }

    fn extra_capabilities(&self) -> Vec<&'static str> {
        if self.cfg.has_gpus() {
            vec![GPU_CAPABILITY]
        } else {
            Vec::new()
        }
    }

    async fn run(
        &self,
        ctx: ExecContext,
        spec: &proto::TaskSpec,
        out: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> ExecOutcome {
        use proto::task_spec::Kind;
        match &spec.kind {
            Some(Kind::Container(task)) => self.run_container(ctx, spec, task, out, cancel).await,
            Some(Kind::DaggerCall(call)) => {
                call::run_call(&self.cfg, ctx, spec, call, out, cancel).await
            }
            _ => ExecOutcome::infrastructure("dagger executor given a task that is not for it"),
        }
    }
}

/// A sender whose chunks reach `out` with `secrets` masked (a secret split across chunks
/// included); the task ends once every clone of the sender is gone.
fn redacting_forwarder(
    out: mpsc::Sender<OutputChunk>,
    secrets: Arc<Secrets>,
) -> (mpsc::Sender<OutputChunk>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
    let task = tokio::spawn(async move {
        let mut redactor = ChunkRedactor::new(secrets);
        let mut open = true;
        while let Some(chunk) = rx.recv().await {
            for chunk in redactor.push(chunk) {
                // Keep draining after the receiver is gone: senders must never block.
                if open && out.send(chunk).await.is_err() {
                    open = false;
                }
            }
        }
        for chunk in redactor.finish() {
            if open && out.send(chunk).await.is_err() {
                open = false;
            }
        }
    });
    (tx, task)
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into()),
        Err(e) => e.to_string(),
    }
}

/// Removes every entry of `dir` but `keep`.
async fn remove_all_but(dir: &std::path::Path, keep: &std::path::Path) {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot list working directory");
            return;
        }
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let path = entry.path();
        if path == keep {
            continue;
        }
        let removed = match entry.file_type().await {
            Ok(t) if t.is_dir() => tokio::fs::remove_dir_all(&path).await,
            _ => tokio::fs::remove_file(&path).await,
        };
        if let Err(e) = removed
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %path.display(), error = %e, "cannot remove from working directory");
        }
    }
}

async fn remove_dir(dir: &std::path::Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(dir = %dir.display(), error = %e, "cannot remove working directory");
    }
}
