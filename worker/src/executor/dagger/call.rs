//! `dagger_call` tasks: `<cli> call -m <module> <function> <args…>` as a host process.
//!
//! The process handling is the shell executor's (own process group tied to the worker,
//! streamed stdout/stderr, SIGTERM then SIGKILL of the group on timeout or cancel, `path`
//! and `last_stdout_line` outputs, `$SCABBARD_OUTPUT`), run on a shell spec made from the
//! call. The environment is cleared but for what the CLI needs ([`super::cli::cli_env`]:
//! the engine's runner host, HOME, Docker and proxy settings), then the spec's `env` and
//! `secret_env` (a module reads secrets as `env:NAME` arguments), then the `SCABBARD_*`
//! variables. Failing to start the CLI is an infrastructure failure; its non-zero exit
//! is the task's, with its code.

use scabbard_common::proto::{self, ErrorClass};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::cli::{cli_env, cli_path};
use crate::config::DaggerConfig;
use crate::executor::{ExecContext, ExecOutcome, Executor, OutputChunk, ShellExecutor};

/// Runs one `dagger call` attempt.
pub(super) async fn run_call(
    cfg: &DaggerConfig,
    ctx: ExecContext,
    spec: &proto::TaskSpec,
    call: &proto::DaggerCallTask,
    out: mpsc::Sender<OutputChunk>,
    cancel: CancellationToken,
) -> ExecOutcome {
    if call.module.trim().is_empty() || call.function.trim().is_empty() {
        return ExecOutcome::failed(
            127,
            ErrorClass::User,
            "dagger_call task needs a module and a function",
        );
    }
    let cli = match cli_path(cfg).await {
        Ok(cli) => cli,
        Err(why) => return ExecOutcome::infrastructure(why),
    };
    let cli_text = cli.to_string_lossy().into_owned();
    let mut command = vec![
        cli_text.clone(),
        "call".into(),
        "-m".into(),
        call.module.clone(),
        call.function.clone(),
    ];
    command.extend(call.args.iter().cloned());
    let mut shell_spec = spec.clone();
    shell_spec.kind = Some(proto::task_spec::Kind::Shell(proto::ShellTask { command }));
    // The CLI's variables first; the spec's own may override them.
    let mut env: std::collections::HashMap<String, String> = cli_env(cfg)
        .into_iter()
        .filter_map(|(k, v)| v.into_string().ok().map(|v| (k, v)))
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    // The session `dagger call` starts exports to the worker's collector, in the task's trace.
    env.extend(ctx.otel_env());
    shell_spec.env = env;
    let shell = ShellExecutor::with_kill_grace(cfg.kill_grace());
    let outcome = shell.run(ctx, &shell_spec, out, cancel).await;
    if outcome.exit_code == 127
        && outcome.error_class == ErrorClass::User
        && outcome.message.contains(&cli_text)
    {
        // The shell executor blames the command; here the command is ours.
        return ExecOutcome::infrastructure(format!("dagger CLI: {}", outcome.message));
    }
    outcome
}
