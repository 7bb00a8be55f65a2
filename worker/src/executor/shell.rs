//! The `shell` executor: runs a task's argv as a host process.
//!
//! It owns the attempt's working directory (created fresh, removed afterwards), the child's
//! environment, its process group (every process the command starts is killed on timeout,
//! cancel, or when the command exits and leaves background processes behind), the reading
//! of its stdout and stderr, and the collection of its outputs ([`outputs`]) once it
//! ended, whatever the outcome. It must not outlive its processes: `run` returns only once
//! the group is gone. It does not redact secrets from the output or the outputs: the
//! runner does.
//!
//! The environment is cleared: the task sees `PATH` (the worker's), `HOME` (the working
//! directory), the spec's `env` and `secret_env` (which may override those two), then ours,
//! which win over any spec variable of the same name: `SCABBARD_TASK_ID`,
//! `SCABBARD_ATTEMPT`, `SCABBARD_AGENT_ID`, `SCABBARD_AGENT_NAME` and `SCABBARD_OUTPUT`
//! (an empty file in the working directory for the task's `key=value` outputs).

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use scabbard_common::proto::{self, ErrorClass, Outcome};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::{ExecContext, ExecOutcome, Executor, OutStream, OutputChunk};
use group::{GroupGuard, own_process_group, signal_group, wait_group_gone};
use last_line::LastLine;
use outputs::OUTPUT_FILE;
use pump::{pump, system_note};

// Shared with the dagger executor (process groups, last stdout line, output notes).
pub(super) mod group;
pub(super) mod last_line;
pub(super) mod outputs;
pub(super) mod pump;

/// Capability name of [`ShellExecutor`].
pub(super) const CAPABILITY: &str = "shell";
/// `PATH` given to tasks when the worker itself has none.
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Last resort against a receiver that neither reads nor goes away.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// How long to wait for the kernel to remove a SIGKILLed group.
const REAP_WAIT: Duration = Duration::from_secs(5);
/// How long the notes about the outputs may wait for a stuck output receiver, together.
const NOTE_WAIT: Duration = Duration::from_secs(1);

/// Runs `shell` tasks as host processes in their own process group.
#[derive(Debug, Clone)]
pub struct ShellExecutor {
    kill_grace: Duration,
}

impl ShellExecutor {
    /// Time between SIGTERM and SIGKILL unless configured otherwise.
    pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

    /// An executor with the default kill grace period.
    pub fn new() -> Self {
        Self::with_kill_grace(Self::DEFAULT_KILL_GRACE)
    }

    /// An executor that waits `grace` after SIGTERM before sending SIGKILL.
    pub fn with_kill_grace(grace: Duration) -> Self {
        Self { kill_grace: grace }
    }
}

impl Default for ShellExecutor {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Executor for ShellExecutor {
    fn capability(&self) -> &'static str {
        CAPABILITY
    }

    async fn run(
        &self,
        ctx: ExecContext,
        spec: &proto::TaskSpec,
        out: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> ExecOutcome {
        let argv = match &spec.kind {
            Some(proto::task_spec::Kind::Shell(shell)) => &shell.command,
            _ => return ExecOutcome::infrastructure("shell executor given a non-shell task"),
        };
        if argv.is_empty() {
            return ExecOutcome::failed(127, ErrorClass::User, "shell task has an empty command");
        }
        let needs_last_line = match outputs::check_declared(&spec.outputs) {
            Ok(needs) => needs,
            Err(message) => return ExecOutcome::failed(127, ErrorClass::User, message),
        };
        let workdir = match prepare_workdir(&ctx).await {
            Ok(dir) => dir,
            Err(e) => {
                return ExecOutcome::infrastructure(format!(
                    "cannot create a working directory under {}: {e}",
                    ctx.work_root.display()
                ));
            }
        };
        let last_line = needs_last_line.then(|| Arc::new(Mutex::new(LastLine::default())));
        let ran = self
            .run_in(
                &ctx,
                spec,
                argv,
                &workdir,
                out.clone(),
                cancel,
                last_line.clone(),
            )
            .await;
        let outcome = match ran {
            Ran::NotStarted(outcome) => outcome,
            Ran::Ended(mut outcome) => {
                add_outputs(&mut outcome, &spec.outputs, &workdir, last_line, &out).await;
                outcome
            }
        };
        if let Err(e) = tokio::fs::remove_dir_all(&workdir).await {
            tracing::warn!(dir = %workdir.display(), error = %e, "cannot remove working directory");
        }
        outcome
    }
}

/// Whether the command ran.
enum Ran {
    /// No process was started (nothing to collect outputs from).
    NotStarted(ExecOutcome),
    /// The process group ran and is gone.
    Ended(ExecOutcome),
}

/// Why the wait for the child ended.
enum Ending {
    Exited(io::Result<ExitStatus>),
    TimedOut(Duration),
    Cancelled,
}

impl ShellExecutor {
    /// Runs the command in `workdir` until its whole process group is gone.
    #[allow(clippy::too_many_arguments)]
    async fn run_in(
        &self,
        ctx: &ExecContext,
        spec: &proto::TaskSpec,
        argv: &[String],
        workdir: &Path,
        out: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
        last_line: Option<Arc<Mutex<LastLine>>>,
    ) -> Ran {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(workdir)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into()),
            )
            .env("HOME", workdir)
            .envs(&spec.env)
            .envs(&spec.secret_env)
            .envs(task_env(ctx, workdir))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        own_process_group(cmd.as_std_mut());

        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => return Ran::NotStarted(spawn_failure(&argv[0], &e)),
        };
        // The child called setsid(): its pid is its process group id.
        let Some(pgid) = child.id().and_then(|id| libc::pid_t::try_from(id).ok()) else {
            return Ran::NotStarted(ExecOutcome::infrastructure("spawned child has no pid"));
        };
        let mut group = GroupGuard(Some(pgid));
        let group_dead = CancellationToken::new();
        let mut pumps = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(
                stdout,
                OutStream::Stdout,
                out.clone(),
                group_dead.clone(),
                last_line,
            )));
        }
        if let Some(stderr) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(
                stderr,
                OutStream::Stderr,
                out.clone(),
                group_dead.clone(),
                None,
            )));
        }

        let limit = ctx.timeout_for(spec);
        let deadline = async {
            match limit {
                Some(limit) => sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let ending = tokio::select! {
            status = child.wait() => Ending::Exited(status),
            () = cancel.cancelled() => Ending::Cancelled,
            () = deadline => Ending::TimedOut(limit.unwrap_or_default()),
        };

        let outcome = match ending {
            Ending::Exited(Ok(status)) => {
                // Background processes the command left behind die with it.
                signal_group(pgid, libc::SIGKILL);
                exit_outcome(status)
            }
            Ending::Exited(Err(e)) => {
                signal_group(pgid, libc::SIGKILL);
                let _ = child.wait().await;
                ExecOutcome::infrastructure(format!("cannot wait for the task's process: {e}"))
            }
            Ending::TimedOut(limit) => {
                let why = format!("timed out after {}", secs(limit));
                let status = self.terminate(&mut child, pgid, &why, &out).await;
                stopped_outcome(Outcome::TimedOut, why, status)
            }
            Ending::Cancelled => {
                let why = "cancelled".to_string();
                let status = self.terminate(&mut child, pgid, &why, &out).await;
                stopped_outcome(Outcome::Cancelled, why, status)
            }
        };
        if !wait_group_gone(pgid, Instant::now() + REAP_WAIT).await {
            tracing::warn!(task_id = %ctx.task_id, pgid, "process group still alive after SIGKILL");
        }
        group.0 = None;

        // Everything in the group is dead: what is still in the pipes is read, then a pipe held
        // open by a process that escaped the group is abandoned.
        group_dead.cancel();
        for mut pump in pumps {
            if timeout(DRAIN_MAX, &mut pump).await.is_err() {
                tracing::warn!(task_id = %ctx.task_id, "output receiver stuck: dropping the rest");
                pump.abort();
            }
        }
        Ran::Ended(outcome)
    }

    /// SIGTERM to the group, then SIGKILL after the grace period; returns the child's status.
    async fn terminate(
        &self,
        child: &mut tokio::process::Child,
        pgid: libc::pid_t,
        why: &str,
        out: &mpsc::Sender<OutputChunk>,
    ) -> io::Result<ExitStatus> {
        let grace = self.kill_grace;
        let deadline = Instant::now() + grace;
        signal_group(pgid, libc::SIGTERM);
        let note = format!(
            "{why}: sent SIGTERM to the process group, SIGKILL in {}",
            secs(grace)
        );
        system_note(out, note, deadline).await;
        let status = timeout_at(deadline, child.wait()).await;
        if status.is_err() || !wait_group_gone(pgid, deadline).await {
            signal_group(pgid, libc::SIGKILL);
            let note = format!("still running after {}: sent SIGKILL", secs(grace));
            system_note(out, note, Instant::now() + Duration::from_secs(1)).await;
        }
        signal_group(pgid, libc::SIGKILL);
        match status {
            Ok(status) => status,
            Err(_) => child.wait().await,
        }
    }
}

/// The variables the worker sets for every task; they win over the spec's.
fn task_env(ctx: &ExecContext, workdir: &Path) -> [(&'static str, OsString); 5] {
    [
        ("SCABBARD_TASK_ID", ctx.task_id.clone().into()),
        ("SCABBARD_ATTEMPT", ctx.attempt.to_string().into()),
        ("SCABBARD_AGENT_ID", ctx.agent_id.clone().into()),
        ("SCABBARD_AGENT_NAME", ctx.agent_name.clone().into()),
        (
            "SCABBARD_OUTPUT",
            workdir.join(OUTPUT_FILE).into_os_string(),
        ),
    ]
}

/// Collects the outputs of an attempt that ran into `outcome`, writes what was dropped to
/// the system log, and fails a successful attempt whose declared outputs are missing.
async fn add_outputs(
    outcome: &mut ExecOutcome,
    declared: &[proto::OutputSpec],
    workdir: &Path,
    last_line: Option<Arc<Mutex<LastLine>>>,
    out: &mpsc::Sender<OutputChunk>,
) {
    let last_line = last_line.map(|l| l.lock().unwrap_or_else(PoisonError::into_inner).finish());
    let (declared, dir) = (declared.to_vec(), workdir.to_path_buf());
    let collected =
        tokio::task::spawn_blocking(move || outputs::collect(&declared, &dir, last_line)).await;
    let until = Instant::now() + NOTE_WAIT;
    let collected = match collected {
        Ok(collected) => collected,
        Err(e) => {
            let why = format!("cannot read the task's outputs: {e}");
            if outcome.outcome == Outcome::Succeeded {
                *outcome = ExecOutcome::infrastructure(why);
            } else {
                system_note(out, why, until).await;
            }
            return;
        }
    };
    for note in collected.notes {
        system_note(out, note, until).await;
    }
    if !collected.missing.is_empty() {
        if outcome.outcome == Outcome::Succeeded {
            // A dependent would otherwise run without the value.
            outcome.outcome = Outcome::Failed;
            outcome.error_class = ErrorClass::User;
            outcome.message = collected.missing.join("; ");
        } else {
            for missing in collected.missing {
                system_note(out, missing, until).await;
            }
        }
    }
    outcome.outputs = collected.values;
}

/// A fresh `work_root/<task_id>-<fencing_token>`, emptied if a previous run left it behind,
/// holding an empty `$SCABBARD_OUTPUT` file.
async fn prepare_workdir(ctx: &ExecContext) -> io::Result<PathBuf> {
    let dir = super::fresh_workdir(ctx).await?;
    if let Err(e) = tokio::fs::write(dir.join(OUTPUT_FILE), b"").await {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(e);
    }
    Ok(dir)
}

fn spawn_failure(program: &str, e: &io::Error) -> ExecOutcome {
    let message = match e.kind() {
        io::ErrorKind::NotFound => format!("command not found: {program}"),
        io::ErrorKind::PermissionDenied => format!("permission denied: {program}"),
        _ => format!("cannot start {program}: {e}"),
    };
    ExecOutcome::failed(127, ErrorClass::User, message)
}

/// The shell's convention: the exit code, or 128 + the signal that killed the process.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

fn exit_outcome(status: ExitStatus) -> ExecOutcome {
    if status.success() {
        return ExecOutcome::succeeded();
    }
    let message = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("ended with {status}"),
    };
    ExecOutcome::failed(exit_code(status), ErrorClass::User, message)
}

fn stopped_outcome(outcome: Outcome, why: String, status: io::Result<ExitStatus>) -> ExecOutcome {
    ExecOutcome {
        outcome,
        exit_code: status.map(exit_code).unwrap_or(-1),
        message: why,
        error_class: if outcome == Outcome::TimedOut {
            ErrorClass::User
        } else {
            ErrorClass::Unspecified
        },
        outputs: Default::default(),
        artifacts: Vec::new(),
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod outputs_tests;
#[cfg(test)]
mod tests;
