//! A container task as Dagger calls, on a `Query` for one engine session.
//!
//! Order: every ID the pipeline refers to is resolved first, with `.id().await` — the
//! secrets (`setSecret`, the spec's `secret_env` and worker-side sources), the registry
//! password, the cache volumes and the host directories — so that no lazily resolved ID is
//! left for the SDK to `unwrap()` inside a later query. Then the container:
//! `withRegistryAuth` (before the pull), `from`, plain variables, secret variables, cache
//! mounts (with their sharing mode), host directories (with their excludes) and the
//! working directory. Each step is `withExec(args, expect: ANY)` followed by `sync`, which
//! returns the container's ID: the next step, the step's `exitCode`, `stdout` and `stderr`
//! and the outputs all start from that ID (`node(id:)`), so no query repeats the pipeline.
//!
//! Classification: a step's non-zero exit code is the task's failure (USER, that exit
//! code, the step's output in the log); so is an engine-reported `ExecError` (which
//! `expect: ANY` should make impossible) and a declared output the container does not
//! have. Any other SDK, GraphQL or transport error is an INFRASTRUCTURE failure. Output is
//! sent as the step ends (the API has no live output; the engine's progress on the session's
//! stderr is live). The first failing step ends the pipeline; outputs are read only when
//! every step succeeded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dagger_sdk::errors::DaggerError;
use dagger_sdk::{
    Container, ContainerExistsOpts, ContainerWithExecOpts, ContainerWithMountedCacheOpts,
    ExistsType, HostDirectoryOpts, Id, Query, ReturnType,
};
use scabbard_common::proto::ErrorClass;
use tokio::sync::mpsc;

use super::digest::digest_path;
use super::gql::Failure;
use super::plan::{OutputKind, Plan};
use crate::executor::shell::last_line::LastLine;
use crate::executor::{ExecOutcome, OutStream, OutputChunk};

/// Largest output chunk.
const CHUNK_SIZE: usize = 64 * 1024;

/// An SDK failure and what the pipeline was doing.
struct Stopped {
    failure: Failure,
    doing: String,
}

type Step<T> = Result<T, Stopped>;

fn at(doing: impl Into<String>) -> impl FnOnce(DaggerError) -> Stopped {
    let doing = doing.into();
    move |e| Stopped {
        failure: Failure::from_sdk(&e),
        doing,
    }
}

/// Runs `plan` on `client`; exported outputs land in `export_dir` (created if needed).
pub(super) async fn run_pipeline(
    client: Query,
    plan: Plan,
    out: mpsc::Sender<OutputChunk>,
    export_dir: PathBuf,
) -> ExecOutcome {
    match pipeline(&client, &plan, &out, &export_dir).await {
        Ok(outcome) => outcome,
        Err(Stopped {
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
        Err(Stopped {
            failure: Failure::Engine(why),
            doing,
        }) => ExecOutcome::infrastructure(format!("dagger: {doing}: {why}")),
    }
}

async fn pipeline(
    client: &Query,
    plan: &Plan,
    out: &mpsc::Sender<OutputChunk>,
    export_dir: &Path,
) -> Step<ExecOutcome> {
    let base = base_container(client, plan).await?;
    let mut container = base;
    let mut last_stdout = String::new();
    for step in &plan.steps {
        note(out, format!("{}: {}", step.label, step.args.join(" "))).await;
        let synced = container
            .with_exec_opts(step.args.clone(), expect_any())
            .sync()
            .await
            .map_err(at(step.label.clone()))?;
        let code = synced.exit_code().await.map_err(at(step.label.clone()))?;
        let stdout = synced.stdout().await.map_err(at(step.label.clone()))?;
        let stderr = synced.stderr().await.map_err(at(step.label.clone()))?;
        send_text(out, OutStream::Stdout, &stdout).await;
        send_text(out, OutStream::Stderr, &stderr).await;
        if code != 0 {
            let code = i32::try_from(code).unwrap_or(i32::MAX);
            return Ok(ExecOutcome::failed(
                code,
                ErrorClass::User,
                format!("{} exited with code {code}", step.label),
            ));
        }
        container = synced;
        last_stdout = stdout;
    }
    if plan.steps.is_empty() {
        container = container.sync().await.map_err(at("pulling the image"))?;
    }
    collect_outputs(&container, plan, &last_stdout, export_dir).await
}

fn expect_any<'a>() -> ContainerWithExecOpts<'a> {
    ContainerWithExecOpts {
        expand: None,
        expect: Some(ReturnType::Any),
        experimental_privileged_nesting: None,
        insecure_root_capabilities: None,
        no_init: None,
        redirect_stderr: None,
        redirect_stdin: None,
        redirect_stdout: None,
        stdin: None,
        use_entrypoint: None,
    }
}

/// Resolves every ID up front, then builds (without running) the container before its
/// first step.
async fn base_container(client: &Query, plan: &Plan) -> Step<Container> {
    let mut secret_ids: Vec<(String, Id)> = Vec::new();
    for s in &plan.secrets {
        let id = client
            .set_secret(s.name.as_str(), s.value.as_str())
            .id()
            .await
            .map_err(at(format!("setting secret {}", s.name)))?;
        secret_ids.push((s.env.clone(), id));
    }
    let registry = match &plan.registry {
        Some(r) => {
            let id = client
                .set_secret(r.secret_name.as_str(), r.password.as_str())
                .id()
                .await
                .map_err(at(format!("setting secret {}", r.secret_name)))?;
            Some((r, id))
        }
        None => None,
    };
    let mut cache_ids = Vec::new();
    for c in &plan.caches {
        let id = client
            .cache_volume(c.volume.as_str())
            .id()
            .await
            .map_err(at(format!("cache volume {}", c.volume)))?;
        cache_ids.push(id);
    }
    let mut dir_ids = Vec::new();
    for d in &plan.dirs {
        let host_path = d.host_path.to_string_lossy();
        let exclude: Vec<&str> = d.exclude.iter().map(String::as_str).collect();
        let opts = HostDirectoryOpts {
            exclude: (!exclude.is_empty()).then_some(exclude),
            gitignore: None,
            include: None,
            no_cache: None,
        };
        let id = client
            .host()
            .directory_opts(host_path.as_ref(), opts)
            .id()
            .await
            .map_err(at(format!("host directory {host_path}")))?;
        dir_ids.push(id);
    }

    let mut c = client.container();
    if let Some((r, id)) = registry {
        c = c.with_registry_auth(r.address.as_str(), r.username.as_str(), id);
    }
    c = c.from(plan.image.as_str());
    for (name, value) in &plan.env {
        c = c.with_env_variable(name.as_str(), value.as_str());
    }
    for (env, id) in secret_ids {
        c = c.with_secret_variable(env, id);
    }
    for (cache, id) in plan.caches.iter().zip(cache_ids) {
        let opts = ContainerWithMountedCacheOpts {
            expand: None,
            owner: None,
            sharing: cache.sharing.clone(),
            source: None,
        };
        c = c.with_mounted_cache_opts(cache.path.as_str(), id, opts);
    }
    for (dir, id) in plan.dirs.iter().zip(dir_ids) {
        c = c.with_directory(dir.path.as_str(), id);
    }
    if let Some(w) = &plan.workdir {
        c = c.with_workdir(w.as_str());
    }
    Ok(c)
}

/// Reads the declared outputs of a pipeline whose steps all succeeded; a missing one makes
/// the attempt a user failure.
async fn collect_outputs(
    container: &Container,
    plan: &Plan,
    last_stdout: &str,
    export_dir: &Path,
) -> Step<ExecOutcome> {
    let mut outputs = HashMap::new();
    let mut missing = Vec::new();
    for o in &plan.outputs {
        let doing = format!("output '{}'", o.name);
        match &o.kind {
            OutputKind::LastStdoutLine => {
                let mut line = LastLine::default();
                line.push(last_stdout.as_bytes());
                match line.finish() {
                    Ok(v) => {
                        outputs.insert(o.name.clone(), v);
                    }
                    Err(why) => missing.push(format!("{doing}: {why}")),
                }
            }
            OutputKind::ContainerPath(path) => {
                if !container
                    .exists(path.as_str())
                    .await
                    .map_err(at(doing.clone()))?
                {
                    missing.push(format!("{doing}: {path} does not exist in the container"));
                    continue;
                }
                let dir_opts = ContainerExistsOpts {
                    do_not_follow_symlinks: None,
                    expand: None,
                    expected_type: Some(ExistsType::DirectoryType),
                };
                let is_dir = container
                    .exists_opts(path.as_str(), dir_opts)
                    .await
                    .map_err(at(doing.clone()))?;
                if let Err(e) = tokio::fs::create_dir_all(export_dir).await {
                    return Ok(ExecOutcome::infrastructure(format!(
                        "cannot create {}: {e}",
                        export_dir.display()
                    )));
                }
                let dest = export_dir.join(&o.name);
                let dest_text = dest.to_string_lossy().into_owned();
                if is_dir {
                    container
                        .directory(path.as_str())
                        .export(dest_text.as_str())
                        .await
                        .map_err(at(doing.clone()))?;
                } else {
                    container
                        .file(path.as_str())
                        .export(dest_text.as_str())
                        .await
                        .map_err(at(doing.clone()))?;
                }
                let digest = tokio::task::spawn_blocking({
                    let dest = dest.clone();
                    move || digest_path(&dest)
                })
                .await;
                match digest {
                    Ok(Ok(digest)) => {
                        outputs.insert(format!("{}.digest", o.name), digest);
                        outputs.insert(o.name.clone(), dest_text);
                    }
                    Ok(Err(e)) => {
                        return Ok(ExecOutcome::infrastructure(format!(
                            "{doing}: the engine exported {path} to {dest_text}, but it cannot be read: {e}"
                        )));
                    }
                    Err(e) => {
                        return Ok(ExecOutcome::infrastructure(format!("{doing}: {e}")));
                    }
                }
            }
        }
    }
    let mut outcome = ExecOutcome::succeeded();
    if !missing.is_empty() {
        outcome = ExecOutcome::failed(1, ErrorClass::User, missing.join("; "));
    }
    outcome.outputs = outputs;
    Ok(outcome)
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
