//! What a container task hands back: declared outputs (`container_path`,
//! `last_stdout_line`, `git_commit`, `published`) and artifacts (absolute container paths
//! exported after the steps), checked before anything runs.

use std::collections::HashSet;

use scabbard_common::proto::{self, output_spec::Source};

use super::{GitCheckout, Refusal, paths};
use crate::executor::shell::outputs::valid_name;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::executor::dagger) enum OutputKind {
    /// Exported from this path in the container.
    ContainerPath(String),
    /// The last non-empty line of the last step's stdout.
    LastStdoutLine,
    /// The commit the git source at this container path resolved to.
    GitCommit(String),
    /// The reference `publish` pushed.
    Published,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::executor::dagger) struct Output {
    pub(in crate::executor::dagger) name: String,
    pub(in crate::executor::dagger) kind: OutputKind,
}

/// A file or directory of the container exported as an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::executor::dagger) struct Artifact {
    pub(in crate::executor::dagger) name: String,
    /// Absolute container path.
    pub(in crate::executor::dagger) path: String,
    pub(in crate::executor::dagger) optional: bool,
}

/// Artifact names (distinct, usable as file names) and absolute container paths.
pub(super) fn check_artifacts(specs: &[proto::ArtifactSpec]) -> Result<Vec<Artifact>, Refusal> {
    let mut names = HashSet::new();
    let mut checked = Vec::new();
    for (i, a) in specs.iter().enumerate() {
        let user = |m: String| Err(Refusal::User(m));
        let name = &a.name;
        if !valid_name(name.as_bytes()) || name == "." || name == ".." {
            return user(format!(
                "artifacts[{i}].name '{name}' is not valid: use letters, digits, '_', '-' and '.'"
            ));
        }
        if !names.insert(name.as_str()) {
            return user(format!("artifact '{name}' is declared twice"));
        }
        checked.push(Artifact {
            name: name.clone(),
            path: paths::container_path(&format!("artifacts[{i}].path"), &a.path)?,
            optional: a.optional,
        });
    }
    Ok(checked)
}

/// Output names and sources a container task can produce.
pub(super) fn check_outputs(
    outputs: &[proto::OutputSpec],
    has_steps: bool,
    git: &[GitCheckout],
    publish: &Option<String>,
) -> Result<Vec<Output>, Refusal> {
    let mut names = HashSet::new();
    let mut checked = Vec::new();
    for o in outputs {
        let name = &o.name;
        let user = |m: String| Err(Refusal::User(m));
        if !valid_name(name.as_bytes()) {
            return user(format!(
                "invalid output name '{name}': use letters, digits, '_', '-' and '.'"
            ));
        }
        if !names.insert(name.as_str()) {
            return user(format!("output '{name}' is declared twice"));
        }
        let kind = match &o.source {
            Some(Source::ContainerPath(path)) if !path.is_empty() => {
                OutputKind::ContainerPath(path.clone())
            }
            Some(Source::ContainerPath(_)) => {
                return user(format!("output '{name}' has an empty container_path"));
            }
            Some(Source::LastStdoutLine(true)) if has_steps => OutputKind::LastStdoutLine,
            Some(Source::LastStdoutLine(true)) => {
                return user(format!(
                    "output '{name}' takes the last stdout line, but the task has no steps"
                ));
            }
            Some(Source::GitCommit(path)) => {
                if !git.iter().any(|g| &g.path == path) {
                    let known: Vec<&str> = git.iter().map(|g| g.path.as_str()).collect();
                    return user(format!(
                        "output '{name}': git_commit {path:?} is not the path of a git source \
                         of the task (container.git paths: {known:?})"
                    ));
                }
                OutputKind::GitCommit(path.clone())
            }
            Some(Source::Published(true)) if publish.is_some() => OutputKind::Published,
            Some(Source::Published(true)) => {
                return user(format!(
                    "output '{name}' takes the published reference, but the task has no \
                     container.publish"
                ));
            }
            Some(Source::Path(_)) => {
                return user(format!(
                    "output '{name}' uses `path`, which only shell tasks support: a container \
                     task's files are read with `container_path` (exported to the worker), \
                     or written as key=value lines to $SCABBARD_OUTPUT"
                ));
            }
            Some(Source::LastStdoutLine(false) | Source::Published(false)) | None => {
                return user(format!(
                    "output '{name}' has no source: give `container_path`, \
                     `last_stdout_line`, `git_commit` or `published`"
                ));
            }
        };
        checked.push(Output {
            name: name.clone(),
            kind,
        });
    }
    // Exported names become file names in the work dir.
    if checked.iter().any(|o| o.name == "." || o.name == "..") {
        return Err(Refusal::User(
            "output names '.' and '..' are reserved".into(),
        ));
    }
    Ok(checked)
}
