//! After the last step succeeded: the `$SCABBARD_OUTPUT` file read back through the
//! engine (size first, bounded like the shell's, parsed by the shell's parser), `publish`,
//! artifacts exported to the attempt's artifact dir, then the declared outputs. Declared
//! outputs win over keys of the same name in the file. Missing declared outputs and
//! missing required artifacts make the attempt a user failure that names them all.

use std::collections::HashMap;
use std::path::Path;

use dagger_sdk::{Container, ContainerExistsOpts, ExistsType};
use scabbard_common::proto::{ArtifactKind, ErrorClass, Outcome};
use tokio::sync::mpsc;

use super::steps::Ran;
use super::{
    ATTEMPT_ENV, AttemptDirs, OUTPUT_ENV, OUTPUT_FILE, SCRATCH, Step, Stopped, at, host_failure,
    note,
};
use crate::executor::dagger::digest::digest_path;
use crate::executor::dagger::gql::Failure;
use crate::executor::dagger::plan::{OutputKind, Plan};
use crate::executor::shell::outputs::{MAX_FILE_BYTES, parse_output_text};
use crate::executor::{ExecOutcome, OutputChunk, ProducedArtifact};

/// Results of a pipeline whose steps all succeeded.
pub(super) async fn finish(
    ran: Ran,
    plan: &Plan,
    commits: &[String],
    out: &mpsc::Sender<OutputChunk>,
    dirs: &AttemptDirs,
) -> Step<ExecOutcome> {
    let container = &ran.container;
    let from_file = if ran.stepped {
        read_output_file(container, out).await?
    } else {
        HashMap::new()
    };
    let published = match &plan.publish {
        Some(address) => Some(publish(container, plan, address, out).await?),
        None => None,
    };
    let (artifacts, mut missing) = export_artifacts(container, plan, out, &dirs.artifacts).await?;
    let results = Results {
        last_line: ran.last_line.as_ref(),
        commits,
        published: published.as_deref(),
    };
    let (mut outputs, missing_outputs) =
        collect_outputs(container, plan, &results, &dirs.exports()).await?;
    missing.extend(missing_outputs);
    for (k, v) in from_file {
        outputs.entry(k).or_insert(v);
    }
    let mut outcome = if missing.is_empty() {
        ExecOutcome::succeeded()
    } else {
        ExecOutcome::failed(1, ErrorClass::User, missing.join("; "))
    };
    outcome.outputs = outputs;
    if outcome.outcome == Outcome::Succeeded {
        outcome.artifacts = artifacts;
    }
    Ok(outcome)
}

/// The values the steps wrote to `$SCABBARD_OUTPUT`; notes about it go to the log.
async fn read_output_file(
    container: &Container,
    out: &mpsc::Sender<OutputChunk>,
) -> Step<HashMap<String, String>> {
    let file = container.file(OUTPUT_FILE);
    let size = match file.size().await {
        Ok(size) => size,
        Err(e) => {
            // Most likely the task removed it; the shell executor treats that the same way.
            let why = match Failure::from_sdk(&e) {
                Failure::Engine(why) => why,
                Failure::Exec { .. } => "the engine reported a failed command".into(),
            };
            note(
                out,
                format!(
                    "$SCABBARD_OUTPUT: cannot read {OUTPUT_FILE} ({why}): no outputs read from it"
                ),
            )
            .await;
            return Ok(HashMap::new());
        }
    };
    let size = usize::try_from(size).unwrap_or(0);
    if size == 0 {
        return Ok(HashMap::new());
    }
    if size > MAX_FILE_BYTES {
        note(
            out,
            format!(
                "$SCABBARD_OUTPUT: the file is {size} bytes, more than the {} KiB limit: not read, \
                 no outputs taken from it",
                MAX_FILE_BYTES / 1024
            ),
        )
        .await;
        return Ok(HashMap::new());
    }
    let text = file
        .contents()
        .await
        .map_err(at("reading $SCABBARD_OUTPUT"))?;
    let (values, notes) = parse_output_text(text.as_bytes());
    for line in notes {
        note(out, line).await;
    }
    Ok(values)
}

/// Pushes the container (without Scabbard's scratch directory and variables); returns
/// the pushed reference. A registry refusing the credentials is the task's failure.
async fn publish(
    container: &Container,
    plan: &Plan,
    address: &str,
    out: &mpsc::Sender<OutputChunk>,
) -> Step<String> {
    let mut c = container.clone();
    if plan.nonce_before().is_some() {
        c = c.without_env_variable(ATTEMPT_ENV);
    }
    c = c
        .without_env_variable(OUTPUT_ENV)
        .without_directory(SCRATCH);
    if !plan.entrypoint.is_empty() {
        c = c.with_entrypoint(plan.entrypoint.clone());
    }
    note(out, format!("publishing {address}")).await;
    let doing = format!("publishing {address}");
    match c.publish(address).await {
        Ok(reference) => {
            note(out, format!("published {reference}")).await;
            Ok(reference)
        }
        Err(e) => match Failure::from_sdk(&e) {
            Failure::Engine(why) if is_auth_error(&why) => {
                let registry = registry_of(address);
                let hint = match &plan.registry {
                    Some(r) => format!(
                        "with the credentials of registry_auth \"{}\" ([dagger.registries])",
                        r.address
                    ),
                    None => "without credentials: the task has no registry_auth (name \
                             credentials of [dagger.registries] there)"
                        .to_string(),
                };
                Err(Stopped::Done(ExecOutcome::failed(
                    1,
                    ErrorClass::User,
                    format!("{doing}: registry {registry} refused the push {hint}: {why}"),
                )))
            }
            failure => Err(Stopped::Sdk { failure, doing }),
        },
    }
}

/// Whether an engine message says the registry refused the credentials.
fn is_auth_error(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "unauthorized",
        "authentication required",
        "access denied",
        "access to the resource is denied",
        "insufficient_scope",
        "no basic auth credentials",
        "invalid username/password",
        "401",
        "403 forbidden",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// The registry host of an image address (`docker.io` when it names none).
fn registry_of(address: &str) -> &str {
    match address.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Exports each artifact to `artifact_dir/<name>`; returns those produced and a message
/// per required one missing (optional ones missing are noted and skipped).
async fn export_artifacts(
    container: &Container,
    plan: &Plan,
    out: &mpsc::Sender<OutputChunk>,
    artifact_dir: &Path,
) -> Step<(Vec<ProducedArtifact>, Vec<String>)> {
    let mut produced = Vec::new();
    let mut missing = Vec::new();
    if plan.artifacts.is_empty() {
        return Ok((produced, missing));
    }
    tokio::fs::create_dir_all(artifact_dir)
        .await
        .map_err(|e| host_failure(format!("cannot create {}: {e}", artifact_dir.display())))?;
    for a in &plan.artifacts {
        let doing = format!("artifact '{}'", a.name);
        let dest = artifact_dir.join(&a.name);
        match export_path(container, &a.path, &dest, &doing).await? {
            Some(kind) => produced.push(ProducedArtifact {
                name: a.name.clone(),
                kind,
            }),
            None if a.optional => {
                note(
                    out,
                    format!(
                        "{doing}: {} does not exist in the container: skipped (optional)",
                        a.path
                    ),
                )
                .await;
            }
            None => missing.push(format!(
                "{doing}: {} does not exist in the container",
                a.path
            )),
        }
    }
    Ok((produced, missing))
}

/// Exports `path` (a file or a directory) of `container` to `dest`; `None` if the
/// container has no such path.
async fn export_path(
    container: &Container,
    path: &str,
    dest: &Path,
    doing: &str,
) -> Step<Option<ArtifactKind>> {
    if !container.exists(path).await.map_err(at(doing))? {
        return Ok(None);
    }
    let dir_opts = ContainerExistsOpts {
        do_not_follow_symlinks: None,
        expand: None,
        expected_type: Some(ExistsType::DirectoryType),
    };
    let is_dir = container
        .exists_opts(path, dir_opts)
        .await
        .map_err(at(doing))?;
    let dest_text = dest.to_string_lossy();
    if is_dir {
        container
            .directory(path)
            .export(dest_text.as_ref())
            .await
            .map_err(at(doing))?;
        Ok(Some(ArtifactKind::Directory))
    } else {
        container
            .file(path)
            .export(dest_text.as_ref())
            .await
            .map_err(at(doing))?;
        Ok(Some(ArtifactKind::File))
    }
}

/// What the declared outputs draw on besides the container.
struct Results<'a> {
    last_line: Option<&'a Result<String, String>>,
    /// Commit of each git checkout, in plan order.
    commits: &'a [String],
    published: Option<&'a str>,
}

/// The declared outputs, and a message per output that could not be produced.
async fn collect_outputs(
    container: &Container,
    plan: &Plan,
    results: &Results<'_>,
    export_dir: &Path,
) -> Step<(HashMap<String, String>, Vec<String>)> {
    let mut outputs = HashMap::new();
    let mut missing = Vec::new();
    for o in &plan.outputs {
        let doing = format!("output '{}'", o.name);
        match &o.kind {
            OutputKind::LastStdoutLine => match results.last_line {
                Some(Ok(v)) => {
                    outputs.insert(o.name.clone(), v.clone());
                }
                Some(Err(why)) => missing.push(format!("{doing}: {why}")),
                None => missing.push(format!("{doing}: no step ran")),
            },
            OutputKind::GitCommit(path) => {
                let commit = plan
                    .git
                    .iter()
                    .position(|g| &g.path == path)
                    .and_then(|i| results.commits.get(i));
                match commit {
                    Some(c) => {
                        outputs.insert(o.name.clone(), c.clone());
                    }
                    None => missing.push(format!("{doing}: no git source at {path}")),
                }
            }
            OutputKind::Published => match results.published {
                Some(r) => {
                    outputs.insert(o.name.clone(), r.to_string());
                }
                None => missing.push(format!("{doing}: nothing was published")),
            },
            OutputKind::ContainerPath(path) => {
                tokio::fs::create_dir_all(export_dir).await.map_err(|e| {
                    host_failure(format!("cannot create {}: {e}", export_dir.display()))
                })?;
                let dest = export_dir.join(&o.name);
                if export_path(container, path, &dest, &doing).await?.is_none() {
                    missing.push(format!("{doing}: {path} does not exist in the container"));
                    continue;
                }
                let digest = tokio::task::spawn_blocking({
                    let dest = dest.clone();
                    move || digest_path(&dest)
                })
                .await;
                let dest_text = dest.to_string_lossy().into_owned();
                match digest {
                    Ok(Ok(digest)) => {
                        outputs.insert(format!("{}.digest", o.name), digest);
                        outputs.insert(o.name.clone(), dest_text);
                    }
                    Ok(Err(e)) => {
                        return Err(host_failure(format!(
                            "{doing}: the engine exported {path} to {dest_text}, but it cannot be read: {e}"
                        )));
                    }
                    Err(e) => return Err(host_failure(format!("{doing}: {e}"))),
                }
            }
        }
    }
    Ok((outputs, missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_hosts_and_auth_errors() {
        assert_eq!(registry_of("ghcr.io/org/app:1"), "ghcr.io");
        assert_eq!(registry_of("localhost:5000/app"), "localhost:5000");
        assert_eq!(registry_of("library/alpine"), "docker.io");
        assert_eq!(registry_of("alpine"), "docker.io");
        assert!(is_auth_error(
            "failed to push: unexpected status from HEAD request: 401 Unauthorized"
        ));
        assert!(is_auth_error(
            "denied: requested access to the resource is denied"
        ));
        assert!(!is_auth_error(
            "dial tcp 10.0.0.5:443: connect: connection refused"
        ));
    }
}
