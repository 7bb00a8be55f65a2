//! The steps: each run with its stdout and stderr redirected to files in the container,
//! which are exported to the attempt's work dir once the step ends and streamed into the
//! log in chunks (the last stdout line tracked on the way), then removed. The first step
//! not cached gets `SCABBARD_ATTEMPT_ID` first.

use std::path::Path;

use dagger_sdk::{Container, ContainerWithExecOpts, ReturnType};
use scabbard_common::proto::ErrorClass;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::{
    ATTEMPT_ENV, AttemptDirs, CHUNK_SIZE, Step, Stopped, at, host_failure, note, step_file,
};
use crate::executor::dagger::plan::Plan;
use crate::executor::shell::last_line::LastLine;
use crate::executor::{ExecOutcome, OutStream, OutputChunk};

/// The container after the last step, and that step's last stdout line.
pub(super) struct Ran {
    pub(super) container: Container,
    /// `None` when the task has no steps.
    pub(super) last_line: Option<Result<String, String>>,
    /// Whether any step ran (then the container may hold `$SCABBARD_OUTPUT` values).
    pub(super) stepped: bool,
}

/// Runs the steps in order; the first failing one ends the attempt (`Stopped::Done`).
pub(super) async fn run_steps(
    base: Container,
    plan: &Plan,
    out: &mpsc::Sender<OutputChunk>,
    dirs: &AttemptDirs,
) -> Step<Ran> {
    if plan.steps.is_empty() {
        let container = base.sync().await.map_err(at("pulling the image"))?;
        return Ok(Ran {
            container,
            last_line: None,
            stepped: false,
        });
    }
    let local = dirs.steps();
    tokio::fs::create_dir_all(&local)
        .await
        .map_err(|e| host_failure(format!("cannot create {}: {e}", local.display())))?;
    let nonce_before = plan.nonce_before();
    let mut container = base;
    let mut last_line = None;
    for (i, step) in plan.steps.iter().enumerate() {
        let n = i + 1;
        // Traced: one span per step, from here until the iteration ends.
        let step_span = crate::trace::container_step(n, &step.label);
        note(out, format!("{}: {}", step.label, step.args.join(" "))).await;
        if nonce_before == Some(i) {
            container = container.with_env_variable(ATTEMPT_ENV, plan.attempt_id.as_str());
        }
        let stdout_file = step_file(n, "out");
        let stderr_file = step_file(n, "err");
        let synced = container
            .with_exec_opts(step.args.clone(), exec_opts(&stdout_file, &stderr_file))
            .sync()
            .await
            .map_err(at(step.label.clone()))?;
        let code = synced.exit_code().await.map_err(at(step.label.clone()))?;
        step_span.record("scabbard.exit_code", code);
        let mut line = LastLine::default();
        let to = local.join(format!("{n}.out"));
        let label = format!("{}: stdout", step.label);
        relay(
            &synced,
            &stdout_file,
            &to,
            OutStream::Stdout,
            Some(&mut line),
            out,
            &label,
        )
        .await?;
        let to = local.join(format!("{n}.err"));
        let label = format!("{}: stderr", step.label);
        relay(
            &synced,
            &stderr_file,
            &to,
            OutStream::Stderr,
            None,
            out,
            &label,
        )
        .await?;
        if code != 0 {
            let code = i32::try_from(code).unwrap_or(i32::MAX);
            return Err(Stopped::Done(ExecOutcome::failed(
                code,
                ErrorClass::User,
                format!("{} exited with code {code}", step.label),
            )));
        }
        container = synced;
        last_line = Some(line.finish());
    }
    Ok(Ran {
        container,
        last_line,
        stepped: true,
    })
}

fn exec_opts<'a>(stdout: &'a str, stderr: &'a str) -> ContainerWithExecOpts<'a> {
    ContainerWithExecOpts {
        expand: None,
        expect: Some(ReturnType::Any),
        experimental_privileged_nesting: None,
        insecure_root_capabilities: None,
        no_init: None,
        redirect_stderr: Some(stderr),
        redirect_stdin: None,
        redirect_stdout: Some(stdout),
        stdin: None,
        use_entrypoint: None,
    }
}

/// Exports `file` of `container` to `to`, streams it to `out` as `stream` in chunks of at
/// most [`CHUNK_SIZE`] (feeding `line` if given), and removes it.
async fn relay(
    container: &Container,
    file: &str,
    to: &Path,
    stream: OutStream,
    line: Option<&mut LastLine>,
    out: &mpsc::Sender<OutputChunk>,
    doing: &str,
) -> Step<()> {
    let dest = to.to_string_lossy();
    container
        .file(file)
        .export(dest.as_ref())
        .await
        .map_err(at(doing))?;
    let sent = stream_file(to, stream, line, out).await;
    if let Err(e) = tokio::fs::remove_file(to).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(file = %to.display(), error = %e, "cannot remove a step's output file");
    }
    sent.map_err(|e| {
        host_failure(format!(
            "{doing}: the engine exported {file} to {dest}, but it cannot be read: {e}"
        ))
    })
}

/// Sends the file at `path` in chunks (after a closed receiver it is still read, for
/// `line`, but no longer sent).
async fn stream_file(
    path: &Path,
    stream: OutStream,
    mut line: Option<&mut LastLine>,
    out: &mpsc::Sender<OutputChunk>,
) -> std::io::Result<()> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut open = true;
    loop {
        let mut data = vec![0u8; CHUNK_SIZE];
        let n = file.read(&mut data).await?;
        if n == 0 {
            return Ok(());
        }
        data.truncate(n);
        match line.as_deref_mut() {
            Some(line) => line.push(&data),
            None if !open => return Ok(()),
            None => {}
        }
        if open && out.send(OutputChunk { stream, data }).await.is_err() {
            open = false;
        }
    }
}
