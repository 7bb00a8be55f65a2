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
//!
//! Inputs are copied into the working directory before the command starts, and declared
//! artifacts moved out of it to the runner's artifact dir after it succeeded ([`files`]).
//!
//! With `run_as` ([`RunAs`]) the command runs as that unprivileged user, in its own PID
//! namespace with its own `/proc` and no supplementary groups, started as
//! `unshare --pid --fork --kill-child --mount-proc --setuid U --setgid G -- argv…`: it sees
//! only its own processes, so no other task's environment. Its working directory is owned by
//! that user (0700) and named with 128 random bits: the work root is 0711, so a task can
//! reach its own directory but can neither list the others nor guess their names. `unshare`
//! leads the process group the worker signals; when the namespace's first process dies the
//! kernel kills everything left in the namespace, even processes that left the group.

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

use super::{Containment, ExecContext, ExecOutcome, Executor, OutStream, OutputChunk};
use crate::config::{Hide, RunAs};
use files::FileError;
use group::{GroupGuard, own_process_group, signal_group, spawn_when_not_busy, wait_group_gone};
use last_line::LastLine;
use outputs::OUTPUT_FILE;
use pump::{pump, system_note};

// Shared with the dagger executor (process groups, last stdout line, output notes).
pub(super) mod group;
pub(super) mod last_line;
pub(super) mod outputs;
pub(super) mod pump;

mod files;
mod isolate;

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
    /// Whom tasks run as, when not the worker's user.
    run_as: Option<RunAs>,
    /// What tasks must not see (their own namespaces), when set.
    hide: Option<Hide>,
    /// Keeps every process of an attempt (even those leaving its group) to be killed
    /// with it, when set.
    contain: Option<Arc<Containment>>,
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
        Self {
            kill_grace: grace,
            run_as: None,
            hide: None,
            contain: None,
        }
    }

    /// Runs every attempt inside its own containment (see [`Containment`]): whatever it
    /// started, even outside its process group, dies when it ends. `None` relies on the
    /// process group alone.
    pub fn contain(mut self, contain: Option<Arc<Containment>>) -> Self {
        self.contain = contain;
        self
    }

    /// Runs every task in its own namespaces where `hide`'s paths are covered (see
    /// `config::ShellConfig::hide`); `None` runs them in the worker's.
    pub fn hide(mut self, hide: Option<Hide>) -> Self {
        self.hide = hide;
        self
    }

    /// Runs every task as `run_as` (see the module docs); `None` keeps the worker's user.
    pub fn run_as(mut self, run_as: Option<RunAs>) -> Self {
        self.run_as = run_as;
        self
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
        let owner = self.run_as.as_ref().map(|r| (r.uid, r.gid));
        let workdir = match prepare_workdir(&ctx, owner).await {
            Ok(dir) => dir,
            Err(e) => {
                return ExecOutcome::infrastructure(format!(
                    "cannot create a working directory under {}: {e}",
                    ctx.work_root.display()
                ));
            }
        };
        let outcome = self
            .run_prepared(
                &ctx,
                spec,
                argv,
                &workdir,
                owner,
                needs_last_line,
                &out,
                cancel,
            )
            .await;
        let dir = workdir.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(dir = %workdir.display(), error = %e, "cannot remove working directory");
        }
        outcome
    }
}

impl ShellExecutor {
    /// Places the inputs, runs the command, collects outputs and artifacts.
    #[allow(clippy::too_many_arguments)]
    async fn run_prepared(
        &self,
        ctx: &ExecContext,
        spec: &proto::TaskSpec,
        argv: &[String],
        workdir: &Path,
        owner: files::Owner,
        needs_last_line: bool,
        out: &mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> ExecOutcome {
        if !ctx.inputs.is_empty() {
            let (dir, inputs) = (workdir.to_path_buf(), ctx.inputs.clone());
            let placed =
                tokio::task::spawn_blocking(move || files::place_inputs(&dir, &inputs, owner))
                    .await;
            match placed {
                Ok(Ok(())) => {}
                Ok(Err(FileError::User(m))) => {
                    return ExecOutcome::failed(127, ErrorClass::User, m);
                }
                Ok(Err(FileError::Infra(m))) => return ExecOutcome::infrastructure(m),
                Err(e) => return ExecOutcome::infrastructure(format!("placing inputs: {e}")),
            }
        }
        let mut argv = argv.to_vec();
        if let Some(r) = &self.run_as {
            // Found as the task's user would find it, so "not found" says so (instead of
            // `unshare` reporting a directory of the worker's PATH it may not enter).
            let (r, path) = (r.clone(), task_path(spec));
            let program = argv[0].clone();
            let found =
                tokio::task::spawn_blocking(move || isolate::find_program(&program, &path, &r))
                    .await;
            match found {
                Ok(Some(p)) => argv[0] = p.to_string_lossy().into_owned(),
                Ok(None) => {
                    return ExecOutcome::failed(
                        127,
                        ErrorClass::User,
                        format!(
                            "command not found: {} (looked up in PATH as the user tasks run as, {})",
                            argv[0],
                            self.run_as.as_ref().map_or("", |r| r.user.as_str())
                        ),
                    );
                }
                Err(e) => {
                    return ExecOutcome::infrastructure(format!("looking up the command: {e}"));
                }
            }
        }
        let last_line = needs_last_line.then(|| Arc::new(Mutex::new(LastLine::default())));
        let ran = self
            .run_in(
                ctx,
                spec,
                &argv,
                workdir,
                out.clone(),
                cancel,
                last_line.clone(),
            )
            .await;
        match ran {
            Ran::NotStarted(outcome) => outcome,
            Ran::Ended(mut outcome) => {
                add_outputs(&mut outcome, &spec.outputs, workdir, last_line, out).await;
                if outcome.outcome == Outcome::Succeeded && !spec.artifacts.is_empty() {
                    add_artifacts(&mut outcome, ctx, &spec.artifacts, workdir, out).await;
                }
                outcome
            }
        }
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
        let mut cmd = match (&self.run_as, &self.hide) {
            (Some(r), _) => isolate::command(r, argv),
            (None, Some(h)) => isolate::hidden_command(h, argv),
            (None, None) => {
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]);
                cmd
            }
        };
        cmd.current_dir(workdir)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into()),
            )
            .env("HOME", workdir)
            .envs(&spec.env)
            .envs(&spec.secret_env)
            .envs(task_env(ctx, workdir))
            .envs(ctx.trace_env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let cage = match &self.contain {
            Some(c) => match c.cage(&ctx.task_id, ctx.fencing_token, ctx.attempt) {
                Ok(cage) => Some(cage),
                Err(e) => {
                    return Ran::NotStarted(ExecOutcome::infrastructure(format!(
                        "cannot set up the attempt's containment: {e}"
                    )));
                }
            },
            None => None,
        };
        if let Some(cage) = &cage {
            cage.enter_on_exec(cmd.as_std_mut());
        }
        own_process_group(cmd.as_std_mut());

        let mut child = match spawn_when_not_busy(&mut cmd).await {
            Ok(child) => child,
            Err(e) => {
                return Ran::NotStarted(match (&self.run_as, &self.hide) {
                    // The worker's tool failed, not the task.
                    (Some(RunAs { unshare, .. }), _) | (None, Some(Hide { unshare, .. })) => {
                        ExecOutcome::infrastructure(format!(
                            "cannot start {}: {e}",
                            unshare.display()
                        ))
                    }
                    (None, None) => spawn_failure(&argv[0], &e),
                });
            }
        };
        // The child called setsid(): its pid is its process group id.
        let Some(pgid) = child.id().and_then(|id| libc::pid_t::try_from(id).ok()) else {
            return Ran::NotStarted(ExecOutcome::infrastructure("spawned child has no pid"));
        };
        let mut group = GroupGuard(Some(pgid));
        if let Some(cage) = &cage {
            cage.note_leader(pgid);
        }
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
        // Processes that left the group (setsid, double fork) die now too.
        if let Some(cage) = &cage
            && !cage.kill_all().await
        {
            tracing::warn!(task_id = %ctx.task_id, "processes of the attempt still alive after SIGKILL");
        }

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

/// The `PATH` the task's process gets (the spec's, else the worker's).
fn task_path(spec: &proto::TaskSpec) -> OsString {
    spec.secret_env
        .get("PATH")
        .or_else(|| spec.env.get("PATH"))
        .map(OsString::from)
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| FALLBACK_PATH.into())
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

/// Moves the declared artifacts of a succeeded attempt to its artifact dir and lists them
/// in `outcome`; a missing required one (or a path that escapes) fails the attempt.
async fn add_artifacts(
    outcome: &mut ExecOutcome,
    ctx: &ExecContext,
    declared: &[proto::ArtifactSpec],
    workdir: &Path,
    out: &mpsc::Sender<OutputChunk>,
) {
    let (dir, declared, artifact_dir) = (
        workdir.to_path_buf(),
        declared.to_vec(),
        ctx.artifact_dir.clone(),
    );
    let collected = tokio::task::spawn_blocking(move || {
        files::collect_artifacts(&dir, &declared, &artifact_dir)
    })
    .await;
    let failed = |outcome: &mut ExecOutcome, class, message| {
        outcome.outcome = Outcome::Failed;
        outcome.error_class = class;
        outcome.message = message;
    };
    match collected {
        Ok(Ok(c)) => {
            let until = Instant::now() + NOTE_WAIT;
            for note in c.notes {
                system_note(out, note, until).await;
            }
            outcome.artifacts = c.produced;
        }
        Ok(Err(FileError::User(m))) => failed(outcome, ErrorClass::User, m),
        Ok(Err(FileError::Infra(m))) => failed(outcome, ErrorClass::Infrastructure, m),
        Err(e) => failed(
            outcome,
            ErrorClass::Infrastructure,
            format!("collecting artifacts: {e}"),
        ),
    }
}

/// A fresh working directory holding an empty `$SCABBARD_OUTPUT` file:
/// `work_root/<task_id>-<fencing_token>` (emptied if a previous run left it behind), or,
/// for a task running as `owner`, `work_root/<task_id>-<fencing_token>-<32 random hex>`
/// owned by that user with mode 0700.
async fn prepare_workdir(ctx: &ExecContext, owner: files::Owner) -> io::Result<PathBuf> {
    let dir = match owner {
        None => super::fresh_workdir(ctx).await?,
        Some(_) => {
            let name = format!(
                "{}-{}-{:016x}{:016x}",
                super::safe_name(&ctx.task_id),
                ctx.fencing_token,
                rand::random::<u64>(),
                rand::random::<u64>()
            );
            let dir = ctx.work_root.join(name);
            tokio::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .await?;
            dir
        }
    };
    let output = dir.join(OUTPUT_FILE);
    let made = async {
        tokio::fs::write(&output, b"").await?;
        if let Some((uid, gid)) = owner {
            let (d, o) = (dir.clone(), output.clone());
            tokio::task::spawn_blocking(move || {
                std::os::unix::fs::chown(&d, Some(uid), Some(gid))?;
                std::os::unix::fs::chown(&o, Some(uid), Some(gid))
            })
            .await
            .map_err(io::Error::other)??;
        }
        io::Result::Ok(())
    };
    if let Err(e) = made.await {
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
mod hide_tests;
#[cfg(test)]
mod outputs_tests;
#[cfg(test)]
mod run_as_tests;
#[cfg(test)]
mod tests;
