//! A container task as Dagger calls, on a `Query` for one engine session.
//!
//! Order ([`base`]): every ID the pipeline refers to is resolved first, with `.id().await`
//! — secrets (`setSecret`: the spec's `secret_env`, worker-side sources, the registry
//! password), cache volumes, host directories, git trees (each ref resolved to its commit
//! first, then the tree of that commit), http downloads, the staged inputs (the worker's
//! artifact cache, through `host()`) and the scratch directory — so that no lazily resolved
//! ID is left for the SDK to `unwrap()` inside a later query. Then the container:
//! `withRegistryAuth` (before the pull), `from`, GPUs, plain variables,
//! `SCABBARD_OUTPUT`, the scratch directory at `/scabbard`, secret variables, cache mounts,
//! host directories, git checkouts, downloads, inputs and the working directory. All of
//! that is cacheable by content.
//!
//! Steps ([`steps`]): each is `withExec(args, expect: ANY, redirectStdout, redirectStderr)`
//! followed by `sync`, which returns the container's ID: the next step, the step's
//! `exitCode`, its output files and the results all start from that ID (`node(id:)`), so no
//! query repeats the pipeline. Right before the first step that may not come from the
//! cache, `withEnvVariable(SCABBARD_ATTEMPT_ID, "<task id>/<fencing token>")` makes the op
//! chain unique to the attempt: that step and every later one really run. A step's stdout
//! and stderr go to files in the container (`/scabbard/steps/<n>.out|.err`), exported to the
//! attempt's work dir once it ends and streamed into the log in 64 KiB chunks (never held
//! whole in memory); the last stdout line is tracked on the way. Live output while a step
//! runs is the engine's progress on the session's stderr.
//!
//! Results ([`finish`]), once every step succeeded: the `$SCABBARD_OUTPUT` file read back,
//! `publish` (the scratch directory and Scabbard's variables removed first), artifacts
//! exported to the attempt's artifact dir, then the declared outputs.
//!
//! Classification: a step's non-zero exit code is the task's failure (USER, that exit
//! code, the step's output in the log); so is an engine-reported `ExecError` (which
//! `expect: ANY` should make impossible), a declared output or required artifact the
//! container does not have, a git ref or repository that does not exist, and a registry
//! that refuses the credentials on publish. Any other SDK, GraphQL or transport error is an
//! INFRASTRUCTURE failure. The first failing step ends the pipeline.

mod base;
mod finish;
mod steps;

use std::path::PathBuf;

use dagger_sdk::Query;
use dagger_sdk::errors::DaggerError;
use scabbard_common::proto::ErrorClass;
use tokio::sync::mpsc;

use super::gql::Failure;
use super::plan::Plan;
use crate::executor::{ExecOutcome, OutStream, OutputChunk};

/// Largest output chunk.
const CHUNK_SIZE: usize = 64 * 1024;
/// Scabbard's scratch directory in the container (removed before `publish`).
const SCRATCH: &str = "/scabbard";
/// The `$SCABBARD_OUTPUT` file in the container.
const OUTPUT_FILE: &str = "/scabbard/output";
/// The variable naming [`OUTPUT_FILE`].
const OUTPUT_ENV: &str = "SCABBARD_OUTPUT";
/// The variable that makes an attempt's op chain its own.
pub(super) const ATTEMPT_ENV: &str = "SCABBARD_ATTEMPT_ID";

/// Where step `n`'s stdout (`out`) or stderr (`err`) is redirected in the container.
fn step_file(n: usize, stream: &str) -> String {
    format!("{SCRATCH}/steps/{n}.{stream}")
}

/// The attempt's directories on this host.
#[derive(Debug, Clone)]
pub(super) struct AttemptDirs {
    /// The attempt's work dir (step output files pass through `steps/`, `container_path`
    /// outputs are exported to `outputs/`).
    pub(super) work: PathBuf,
    /// Where artifacts are exported to (`<name>`), for the runner to upload.
    pub(super) artifacts: PathBuf,
}

impl AttemptDirs {
    /// Where `container_path` outputs are exported.
    pub(super) fn exports(&self) -> PathBuf {
        self.work.join("outputs")
    }

    fn steps(&self) -> PathBuf {
        self.work.join("steps")
    }
}

/// Why the pipeline stopped early.
enum Stopped {
    /// An SDK call failed while doing something.
    Sdk { failure: Failure, doing: String },
    /// The attempt ends with this outcome (a step failed, a result is missing).
    Done(ExecOutcome),
}

type Step<T> = Result<T, Stopped>;

fn at(doing: impl Into<String>) -> impl FnOnce(DaggerError) -> Stopped {
    let doing = doing.into();
    move |e| Stopped::Sdk {
        failure: Failure::from_sdk(&e),
        doing,
    }
}

/// An infrastructure failure of this host (not of the engine).
fn host_failure(why: String) -> Stopped {
    Stopped::Done(ExecOutcome::infrastructure(why))
}

/// Runs `plan` on `client`.
pub(super) async fn run_pipeline(
    client: Query,
    plan: Plan,
    out: mpsc::Sender<OutputChunk>,
    dirs: AttemptDirs,
) -> ExecOutcome {
    match pipeline(&client, &plan, &out, &dirs).await {
        Ok(outcome) | Err(Stopped::Done(outcome)) => outcome,
        Err(Stopped::Sdk {
            failure:
                Failure::Exec {
                    exit_code,
                    stdout,
                    stderr,
                },
            doing,
        }) => {
            send_text(&out, OutStream::Stdout, &stdout).await;
            send_text(&out, OutStream::Stderr, &stderr).await;
            let code = if exit_code == 0 { 1 } else { exit_code };
            ExecOutcome::failed(
                code,
                ErrorClass::User,
                format!("{doing}: exited with code {exit_code}"),
            )
        }
        Err(Stopped::Sdk {
            failure: Failure::Engine(why),
            doing,
        }) => ExecOutcome::infrastructure(format!("dagger: {doing}: {why}")),
    }
}

async fn pipeline(
    client: &Query,
    plan: &Plan,
    out: &mpsc::Sender<OutputChunk>,
    dirs: &AttemptDirs,
) -> Step<ExecOutcome> {
    for line in &plan.notes {
        note(out, line.clone()).await;
    }
    let base = base::base_container(client, plan, out).await?;
    let ran = steps::run_steps(base.container, plan, out, dirs).await?;
    finish::finish(ran, plan, &base.commits, out, dirs).await
}

/// Sends `text` in chunks of at most [`CHUNK_SIZE`] (split on character boundaries).
pub(super) async fn send_text(out: &mpsc::Sender<OutputChunk>, stream: OutStream, text: &str) {
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(CHUNK_SIZE);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        let chunk = OutputChunk {
            stream,
            data: piece.as_bytes().to_vec(),
        };
        if out.send(chunk).await.is_err() {
            return;
        }
        rest = tail;
    }
}

/// A line of our own in the attempt's log.
pub(super) async fn note(out: &mpsc::Sender<OutputChunk>, text: String) {
    let _ = out
        .send(OutputChunk {
            stream: OutStream::System,
            data: format!("{text}\n").into_bytes(),
        })
        .await;
}
