//! A container task checked against the worker's `[dagger]` configuration and the
//! attempt's context before any engine is touched: what to run, which steps may be answered
//! from the engine's cache, the worker-side secrets, registry credentials and cache volumes
//! the task's project may use ([`access`]), host directories inside the workspace root and
//! container paths that are absolute ([`paths`]), the sources (git, http, staged inputs),
//! GPUs, what to publish, and the outputs and artifacts a container can produce
//! ([`results`]). Secret values are read last, once every check passed.
//!
//! A refusal says whose fault it is: the spec's ([`Refusal::User`]: an unknown or
//! forbidden source, a path outside the workspace, a GPU this worker does not have) or the
//! host's ([`Refusal::Infra`]: a configured secret that cannot be read). This module makes
//! no Dagger call; [`super::container`] turns a [`Plan`] into them.

mod access;
mod paths;
mod results;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;

use scabbard_common::proto;

use crate::config::{ALL_GPUS, DaggerConfig};
use crate::executor::ExecContext;
pub(super) use access::{Cache, Registry, SecretVar};
pub(super) use paths::{HostDir, inside_workspace};
pub(super) use results::{Artifact, Output, OutputKind};

/// Why a task is not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The spec asks for something this worker cannot give it.
    User(String),
    /// The worker's own configuration fails.
    Infra(String),
}

/// Project assumed for an assignment that carries none (a controller that predates
/// projects on assignments gives every task this one).
pub(super) const DEFAULT_PROJECT: &str = "default";

/// GPUs handed to the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Gpus {
    /// `experimentalWithAllGPUs`.
    All,
    /// `experimentalWithGPU(devices)`.
    Devices(Vec<String>),
}

/// A git checkout (`Query.git`), resolved to a commit before the container is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GitCheckout {
    pub(super) url: String,
    /// Branch, tag or commit; `None` = the remote's HEAD.
    pub(super) reference: Option<String>,
    /// Absolute container path.
    pub(super) path: String,
    pub(super) keep_git_dir: bool,
    /// For messages: `container.git[i]`.
    pub(super) field: String,
}

/// A file fetched with `Query.http`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Download {
    pub(super) url: String,
    /// Absolute container path of the file.
    pub(super) path: String,
}

/// A staged input (a file or directory of the worker's artifact cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct InputMount {
    /// Its content on this host.
    pub(super) local: PathBuf,
    /// Absolute container path.
    pub(super) path: String,
    /// A directory (`host().directory`) or a file (`host().file`).
    pub(super) dir: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Step {
    pub(super) args: Vec<String>,
    /// For messages: the step's name, else its number.
    pub(super) label: String,
    /// Whether the engine may answer it from its cache: the task or the step says so and
    /// every step before it may be answered from the cache too.
    pub(super) cached: bool,
}

/// Everything the pipeline needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    pub(super) image: String,
    pub(super) registry: Option<Registry>,
    pub(super) gpus: Option<Gpus>,
    /// Plain variables, by name.
    pub(super) env: BTreeMap<String, String>,
    /// Secret variables, by variable name.
    pub(super) secrets: Vec<SecretVar>,
    pub(super) caches: Vec<Cache>,
    pub(super) dirs: Vec<HostDir>,
    pub(super) git: Vec<GitCheckout>,
    pub(super) downloads: Vec<Download>,
    pub(super) inputs: Vec<InputMount>,
    pub(super) workdir: Option<String>,
    pub(super) steps: Vec<Step>,
    /// `SCABBARD_ATTEMPT_ID`: `<task id>/<fencing token>`, set before the first step that
    /// is not cached (so that step and every later one really run in this attempt).
    pub(super) attempt_id: String,
    /// Address to push the container to once every step succeeded.
    pub(super) publish: Option<String>,
    /// Entrypoint of the published image (empty: the base image's).
    pub(super) entrypoint: Vec<String>,
    pub(super) artifacts: Vec<Artifact>,
    pub(super) outputs: Vec<Output>,
    /// Lines for the attempt's log about how the spec was taken (a `cache: true` step
    /// that runs anyway).
    pub(super) notes: Vec<String>,
}

impl Plan {
    /// Every secret value the pipeline handles (to mask them wherever they might show).
    pub(super) fn secret_values(&self) -> Vec<String> {
        let mut values: Vec<String> = self.secrets.iter().map(|s| s.value.clone()).collect();
        values.extend(self.registry.iter().map(|r| r.password.clone()));
        values
    }

    /// Whether an output is exported to the host (then that part of the work dir is kept).
    pub(super) fn exports(&self) -> bool {
        self.outputs
            .iter()
            .any(|o| matches!(o.kind, OutputKind::ContainerPath(_)))
    }

    /// The step before which `SCABBARD_ATTEMPT_ID` is set: the first one not cached.
    pub(super) fn nonce_before(&self) -> Option<usize> {
        self.steps.iter().position(|s| !s.cached)
    }
}

/// Checks `task` (and `spec`'s env, secrets, outputs and artifacts, and `ctx`'s project and
/// staged inputs) against `cfg`. Blocking: secret sources may be files.
pub(super) fn plan(
    task: &proto::ContainerTask,
    spec: &proto::TaskSpec,
    cfg: &DaggerConfig,
    ctx: &ExecContext,
) -> Result<Plan, Refusal> {
    let user = |m: String| Err(Refusal::User(m));
    if task.image.trim().is_empty() {
        return user("container task has no image".into());
    }
    let project = if ctx.project.is_empty() {
        DEFAULT_PROJECT
    } else {
        ctx.project.as_str()
    };
    let (steps, notes) = check_steps(task)?;
    let gpus = check_gpus(&task.gpus, &cfg.gpus)?;

    // Who may use what, before any value is read.
    let mut access = access::check(task, spec, cfg, project)?;
    let caches = std::mem::take(&mut access.caches);

    let mut dirs = Vec::new();
    for d in &task.directories {
        if d.path.is_empty() {
            return user(format!(
                "directory {}: no path in the container",
                d.host_path
            ));
        }
        let host_path = inside_workspace(&d.host_path, cfg.workspace_root.as_deref())?;
        dirs.push(HostDir {
            host_path,
            path: d.path.clone(),
            exclude: d.exclude.clone(),
        });
    }

    let mut git = Vec::new();
    for (i, g) in task.git.iter().enumerate() {
        let field = format!("container.git[{i}]");
        if g.url.trim().is_empty() {
            return user(format!("{field}.url is empty"));
        }
        let path = paths::container_path(&format!("{field}.path"), &g.path)?;
        if let Some(j) = git.iter().position(|o: &GitCheckout| o.path == path) {
            return user(format!(
                "{field}.path {path} is also the path of container.git[{j}]"
            ));
        }
        git.push(GitCheckout {
            url: g.url.clone(),
            reference: (!g.r#ref.trim().is_empty()).then(|| g.r#ref.trim().to_string()),
            path,
            keep_git_dir: g.keep_git_dir,
            field,
        });
    }

    let mut downloads = Vec::new();
    for (i, d) in task.downloads.iter().enumerate() {
        let field = format!("container.downloads[{i}]");
        let url = d.url.trim();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return user(format!(
                "{field}.url must be an http:// or https:// URL, got {:?}",
                d.url
            ));
        }
        downloads.push(Download {
            url: url.to_string(),
            path: paths::container_path(&format!("{field}.path"), &d.path)?,
        });
    }

    let mut inputs = Vec::new();
    for (i, input) in ctx.inputs.iter().enumerate() {
        let path = paths::container_path(&format!("inputs[{i}].path"), &input.path)?;
        let dir = match input.kind {
            proto::ArtifactKind::Directory => true,
            proto::ArtifactKind::File => false,
            proto::ArtifactKind::Unspecified => input.local.is_dir(),
        };
        // The worker's own artifact cache: not the workspace, so no workspace_root check.
        inputs.push(InputMount {
            local: input.local.clone(),
            path,
            dir,
        });
    }

    let publish = match task.publish.trim() {
        "" => None,
        address if address.contains(char::is_whitespace) => {
            return user(format!(
                "container.publish {address:?} is not an image address"
            ));
        }
        address => Some(address.to_string()),
    };

    let artifacts = results::check_artifacts(&spec.artifacts)?;
    let outputs = results::check_outputs(&spec.outputs, !steps.is_empty(), &git, &publish)?;

    for k in spec.env.keys() {
        access::check_var(k)?;
    }

    // Every check passed: now read the values.
    let (secrets, registry) = access.read()?;
    let env = spec
        .env
        .iter()
        .filter(|(k, _)| !secrets.iter().any(|s| &s.env == *k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Plan {
        image: task.image.clone(),
        registry,
        gpus,
        env,
        secrets,
        caches,
        dirs,
        git,
        downloads,
        inputs,
        workdir: (!task.workdir.is_empty()).then(|| task.workdir.clone()),
        steps,
        attempt_id: format!("{}/{}", ctx.task_id, ctx.fencing_token),
        publish,
        entrypoint: task.entrypoint.clone(),
        artifacts,
        outputs,
        notes,
    })
}

/// Steps with their labels and whether each may come from the cache.
fn check_steps(task: &proto::ContainerTask) -> Result<(Vec<Step>, Vec<String>), Refusal> {
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    let mut all_cached = true;
    for (i, s) in task.steps.iter().enumerate() {
        let label = if s.name.is_empty() {
            format!("step {}", i + 1)
        } else {
            format!("step {} ({})", i + 1, s.name)
        };
        if s.args.is_empty() {
            return Err(Refusal::User(format!("{label} has no args")));
        }
        let wanted = task.cache || s.cache;
        if s.cache && !all_cached {
            notes.push(format!(
                "{label} is marked cache: true but runs anyway: a step before it is not cached, \
                 so its input changes in every attempt"
            ));
        }
        all_cached &= wanted;
        steps.push(Step {
            args: s.args.clone(),
            label,
            cached: all_cached,
        });
    }
    Ok((steps, notes))
}

/// `container.gpus` against the worker's `[dagger].gpus`.
fn check_gpus(wanted: &[String], offered: &[String]) -> Result<Option<Gpus>, Refusal> {
    let user = |m: String| Err(Refusal::User(m));
    if wanted.is_empty() {
        return Ok(None);
    }
    if offered.is_empty() {
        return user(format!(
            "container.gpus asks for GPUs {wanted:?}, but this worker has none ([dagger].gpus is \
             not set): give the task a `gpu` requirement so it lands on a worker with GPUs"
        ));
    }
    let worker_all = offered.iter().any(|g| g == ALL_GPUS);
    if wanted.iter().any(|g| g == ALL_GPUS) {
        if wanted.len() > 1 {
            return user(format!(
                "container.gpus: \"{ALL_GPUS}\" cannot be combined with device ids, got {wanted:?}"
            ));
        }
        // "All" means every GPU this worker offers.
        return Ok(Some(if worker_all {
            Gpus::All
        } else {
            Gpus::Devices(offered.to_vec())
        }));
    }
    if !worker_all && let Some(missing) = wanted.iter().find(|g| !offered.contains(g)) {
        return user(format!(
            "container.gpus: device {missing:?} is not one of this worker's GPUs \
             ([dagger].gpus = {offered:?})"
        ));
    }
    Ok(Some(Gpus::Devices(wanted.to_vec())))
}
