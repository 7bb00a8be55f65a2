//! Executors: the code that runs one attempt of a task on this host.
//!
//! An [`Executor`] owns everything between "here is a spec" and "here is the outcome": the
//! process (or engine session), its working directory, its output and its termination on
//! timeout or cancel. It streams raw output as [`OutputChunk`]s and returns an
//! [`ExecOutcome`]. It must not talk to the controller, number log chunks or spool anything:
//! the runner does that with what the executor hands back.

mod contain;
mod dagger;
mod noop;
mod shell;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use scabbard_common::proto;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use contain::Containment;
pub use dagger::DaggerExecutor;
pub use noop::NoopExecutor;
pub use shell::ShellExecutor;

/// What an executor needs to know about the attempt besides its spec.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// The task being run.
    pub task_id: String,
    /// The attempt's fencing token (unique per attempt of a task).
    pub fencing_token: u64,
    /// The attempt number (1-based), exported to the task as `SCABBARD_ATTEMPT`.
    pub attempt: u32,
    /// This worker's agent id (`SCABBARD_AGENT_ID`).
    pub agent_id: String,
    /// The name this worker registers under (`SCABBARD_AGENT_NAME`).
    pub agent_name: String,
    /// Parent directory of the per-attempt working directories.
    pub work_root: PathBuf,
    /// Wall-clock limit used when the spec has no `timeout_ms`; zero means no limit.
    pub default_timeout: Duration,
    /// The task's project (worker-side secrets, registries and caches are allowed per
    /// project; cache volumes are namespaced by it).
    pub project: String,
    /// The spec's `inputs`, already downloaded and checked by the runner, in spec order.
    pub inputs: Vec<StagedInput>,
    /// Where the executor leaves the artifacts it produced, one entry per artifact named
    /// after it (`artifact_dir/<name>`: the file, or the directory). The runner creates it
    /// (0700) when the spec declares artifacts, packs and uploads what the outcome lists,
    /// and removes it afterwards.
    pub artifact_dir: PathBuf,
    /// The trace context the task's processes get (`TRACEPARENT`, `TRACESTATE`): the
    /// worker's execution span when it traces, else the assignment's as given; `None` when
    /// the task has none.
    pub trace: Option<scabbard_common::telemetry::TraceParent>,
}

/// An input artifact ready on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedInput {
    /// The input's `from`, for messages.
    pub from: String,
    /// Where the spec wants it: a container path, or a path relative to the work dir.
    pub path: String,
    /// Its unpacked content in the worker's artifact cache (a file or a directory). It is
    /// shared by every attempt that uses the same artifact: read it, copy it, never change it.
    pub local: PathBuf,
    /// File or directory.
    pub kind: proto::ArtifactKind,
}

/// An artifact an attempt produced, at `ExecContext::artifact_dir/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedArtifact {
    /// The spec's artifact name.
    pub name: String,
    /// File or directory.
    pub kind: proto::ArtifactKind,
}

impl ExecContext {
    /// `TRACEPARENT` (and `TRACESTATE`) for the task's processes; empty without a trace.
    pub fn trace_env(&self) -> Vec<(&'static str, String)> {
        self.trace
            .as_ref()
            .map(scabbard_common::telemetry::traceparent_env)
            .unwrap_or_default()
    }

    /// What a Dagger session gets so the engine's spans join the task's trace:
    /// [`trace_env`](Self::trace_env) plus this worker's `OTEL_*` variables (not its
    /// service name) and its OTLP endpoint. Empty without a trace.
    pub fn otel_env(&self) -> Vec<(String, String)> {
        if self.trace.is_none() {
            return Vec::new();
        }
        let mut env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("OTEL_") && k != "OTEL_SERVICE_NAME")
            .collect();
        if let Some(ep) = scabbard_common::telemetry::endpoint_in_use()
            && !env.iter().any(|(k, _)| k == "OTEL_EXPORTER_OTLP_ENDPOINT")
        {
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), ep.to_string()));
        }
        env.extend(
            self.trace_env()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        env
    }

    /// The limit for this attempt: the spec's `timeout_ms` if set, else the default.
    /// `None` means no limit.
    pub fn timeout_for(&self, spec: &proto::TaskSpec) -> Option<Duration> {
        let limit = if spec.timeout_ms > 0 {
            Duration::from_millis(spec.timeout_ms)
        } else {
            self.default_timeout
        };
        (!limit.is_zero()).then_some(limit)
    }
}

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutStream {
    /// The task's standard output.
    Stdout,
    /// The task's standard error.
    Stderr,
    /// Messages from the worker itself about the attempt ("timed out, sent SIGTERM").
    System,
}

impl From<OutStream> for proto::LogStream {
    fn from(s: OutStream) -> Self {
        match s {
            OutStream::Stdout => proto::LogStream::Stdout,
            OutStream::Stderr => proto::LogStream::Stderr,
            OutStream::System => proto::LogStream::System,
        }
    }
}

/// A piece of output, sent as soon as it was read (not split on lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Where it came from.
    pub stream: OutStream,
    /// The raw bytes (at most 64 KiB).
    pub data: Vec<u8>,
}

/// How an attempt ended, as far as the executor can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Succeeded, failed, cancelled or timed out.
    pub outcome: proto::Outcome,
    /// The process's exit code; `128 + signal` when killed by a signal, 127 when the command
    /// could not be started, -1 when no process ran because of the platform.
    pub exit_code: i32,
    /// Human-readable explanation (empty on success).
    pub message: String,
    /// Whose fault a failure is; `Unspecified` on success.
    pub error_class: proto::ErrorClass,
    /// Named outputs of the task (kept whatever the outcome: they help debug a failure).
    pub outputs: HashMap<String, String>,
    /// Artifacts left in the attempt's `artifact_dir` (on success only).
    pub artifacts: Vec<ProducedArtifact>,
}

impl ExecOutcome {
    /// A successful attempt with no outputs.
    pub fn succeeded() -> Self {
        Self {
            outcome: proto::Outcome::Succeeded,
            exit_code: 0,
            message: String::new(),
            error_class: proto::ErrorClass::Unspecified,
            outputs: HashMap::new(),
            artifacts: Vec::new(),
        }
    }

    /// A failed attempt.
    pub fn failed(exit_code: i32, class: proto::ErrorClass, message: impl Into<String>) -> Self {
        Self {
            outcome: proto::Outcome::Failed,
            exit_code,
            message: message.into(),
            error_class: class,
            outputs: HashMap::new(),
            artifacts: Vec::new(),
        }
    }

    /// A failure of the platform rather than of the task (no process ran).
    pub fn infrastructure(message: impl Into<String>) -> Self {
        Self::failed(-1, proto::ErrorClass::Infrastructure, message)
    }
}

impl From<ExecOutcome> for proto::TaskResult {
    fn from(o: ExecOutcome) -> Self {
        proto::TaskResult {
            outcome: o.outcome as i32,
            exit_code: o.exit_code,
            message: o.message,
            error_class: o.error_class as i32,
            outputs: o.outputs,
            artifacts: Vec::new(),
        }
    }
}

/// Runs attempts of one kind of task.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// The capability name this executor is advertised under ("shell", "noop").
    fn capability(&self) -> &'static str;

    /// Whether the executor can run tasks now (its capability is advertised only then).
    /// The `dagger` executor is available while its engine answers; others always are.
    fn available(&self) -> bool {
        true
    }

    /// More capabilities this executor offers while it is available (the `dagger` executor
    /// of a worker with GPUs: `gpu`).
    fn extra_capabilities(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// Runs one attempt to the end. Output goes to `out` (a dropped receiver is tolerated:
    /// output is then discarded). When `cancel` fires the attempt is stopped and the outcome
    /// is `Cancelled`. Returns only once everything the attempt started is gone.
    async fn run(
        &self,
        ctx: ExecContext,
        spec: &proto::TaskSpec,
        out: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> ExecOutcome;
}

/// A fresh, empty `work_root/<task_id>-<fencing_token>` for one attempt (emptied if a
/// previous run left it behind), private to the worker's user (0700); the task id is
/// sanitised for the file system.
pub(crate) async fn fresh_workdir(ctx: &ExecContext) -> std::io::Result<PathBuf> {
    use std::io;
    let name = safe_name(&ctx.task_id);
    let dir = ctx.work_root.join(format!("{name}-{}", ctx.fencing_token));
    tokio::fs::create_dir_all(&ctx.work_root).await?;
    match tokio::fs::remove_dir_all(&dir).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    tokio::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .await?;
    Ok(dir)
}

/// `id` with every character but ASCII letters, digits, '-' and '_' replaced by '_' (for
/// file names).
pub(crate) fn safe_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Capability of hosts whose Dagger engine answers (container and dagger_call tasks).
pub const DAGGER_CAPABILITY: &str = "dagger";

/// Capability of hosts whose Dagger engine answers and that hand GPUs to containers
/// (`[dagger].gpus`).
pub const GPU_CAPABILITY: &str = "gpu";

/// The capability a spec needs, i.e. which executor runs it; `None` if the spec has no kind.
pub fn executor_for(spec: &proto::TaskSpec) -> Option<&'static str> {
    use proto::task_spec::Kind;
    match spec.kind.as_ref()? {
        Kind::Shell(_) => Some(shell::CAPABILITY),
        Kind::Noop(_) => Some(noop::CAPABILITY),
        Kind::Container(_) | Kind::DaggerCall(_) => Some(DAGGER_CAPABILITY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::task_spec::Kind;

    #[test]
    fn specs_map_to_their_executor() {
        let mut spec = proto::TaskSpec::default();
        assert_eq!(executor_for(&spec), None);
        spec.kind = Some(Kind::Noop(proto::NoopTask {}));
        assert_eq!(executor_for(&spec), Some(NoopExecutor.capability()));
        spec.kind = Some(Kind::Shell(proto::ShellTask::default()));
        assert_eq!(executor_for(&spec), Some(ShellExecutor::new().capability()));
    }

    #[test]
    fn spec_timeout_wins_over_default_and_zero_means_none() {
        let mut ctx = ExecContext {
            task_id: "t".into(),
            fencing_token: 1,
            attempt: 1,
            agent_id: "agent-1".into(),
            agent_name: "host-1".into(),
            work_root: PathBuf::from("/nonexistent"),
            default_timeout: Duration::from_secs(60),
            project: "default".into(),
            inputs: Vec::new(),
            artifact_dir: PathBuf::from("/nonexistent/artifacts"),
            trace: None,
        };
        let mut spec = proto::TaskSpec::default();
        assert_eq!(ctx.timeout_for(&spec), Some(Duration::from_secs(60)));
        spec.timeout_ms = 1500;
        assert_eq!(ctx.timeout_for(&spec), Some(Duration::from_millis(1500)));
        spec.timeout_ms = 0;
        ctx.default_timeout = Duration::ZERO;
        assert_eq!(ctx.timeout_for(&spec), None);
    }

    #[test]
    fn outcome_converts_to_task_result() {
        let r: proto::TaskResult =
            ExecOutcome::failed(3, proto::ErrorClass::User, "exited with code 3").into();
        assert_eq!(r.outcome, proto::Outcome::Failed as i32);
        assert_eq!(r.exit_code, 3);
        assert_eq!(r.error_class, proto::ErrorClass::User as i32);
    }
}
