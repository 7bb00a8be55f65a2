//! Checks of the parts of a task spec beyond its command: container and Dagger-call kinds,
//! retry policy, concurrency group, breaker names and declared outputs.

use scabbard_common::proto::{
    ContainerTask, DaggerCallTask, FailureClass, OutputSpec, RetryPolicy, TaskSpec, output_spec,
};
use scabbard_common::{Error, Result};

use super::{MAX_ENTRIES, MAX_STRING};

/// Most steps, mounts, secrets or outputs in one task.
const MAX_ITEMS: usize = 256;

pub(crate) fn container(c: &ContainerTask) -> Result<()> {
    if c.image.trim().is_empty() {
        return Err(Error::invalid(
            "spec.container.image is required, e.g. \"alpine:3.20\"",
        ));
    }
    if c.image.chars().any(char::is_whitespace) || c.image.len() > 512 {
        return Err(Error::invalid(format!(
            "spec.container.image {:?} is not an image reference",
            c.image
        )));
    }
    if c.steps.is_empty() && c.git.is_empty() && c.downloads.is_empty() && c.publish.is_empty() {
        return Err(Error::invalid(
            "spec.container.steps is empty: give at least one step with its args (a task without steps needs a git source, a download or publish)",
        ));
    }
    for (n, list) in [
        ("steps", c.steps.len()),
        ("secrets", c.secrets.len()),
        ("caches", c.caches.len()),
        ("directories", c.directories.len()),
        ("git", c.git.len()),
        ("downloads", c.downloads.len()),
        ("gpus", c.gpus.len()),
    ] {
        if list > MAX_ITEMS {
            return Err(Error::invalid(format!(
                "spec.container.{n} has {list} entries; at most {MAX_ITEMS}"
            )));
        }
    }
    for (i, s) in c.steps.iter().enumerate() {
        if s.args.is_empty() || s.args[0].trim().is_empty() {
            return Err(Error::invalid(format!(
                "spec.container.steps[{i}].args is empty: give the program and its arguments"
            )));
        }
        argv(&format!("spec.container.steps[{i}].args"), &s.args)?;
    }
    for (i, s) in c.secrets.iter().enumerate() {
        if s.env.is_empty() || s.env.contains('=') || s.source.is_empty() {
            return Err(Error::invalid(format!(
                "spec.container.secrets[{i}] needs env (a variable name without '=') and source (a secret source named in the worker's config)"
            )));
        }
    }
    for (i, m) in c.caches.iter().enumerate() {
        if m.volume.is_empty() || !m.path.starts_with('/') {
            return Err(Error::invalid(format!(
                "spec.container.caches[{i}] needs volume (a name) and an absolute path"
            )));
        }
        if scabbard_common::proto::CacheSharing::try_from(m.sharing).is_err() {
            return Err(Error::invalid(format!(
                "spec.container.caches[{i}].sharing: {} is not a cache sharing mode (SHARED, PRIVATE, LOCKED)",
                m.sharing
            )));
        }
    }
    for (i, d) in c.directories.iter().enumerate() {
        if d.host_path.is_empty() || !d.path.starts_with('/') {
            return Err(Error::invalid(format!(
                "spec.container.directories[{i}] needs host_path and an absolute container path"
            )));
        }
        if d.host_path.split('/').any(|p| p == "..") {
            return Err(Error::invalid(format!(
                "spec.container.directories[{i}].host_path {:?} may not contain '..'",
                d.host_path
            )));
        }
    }
    if !c.workdir.is_empty() && !c.workdir.starts_with('/') {
        return Err(Error::invalid(format!(
            "spec.container.workdir {:?} must be an absolute path",
            c.workdir
        )));
    }
    sources(c)?;
    gpus(&c.gpus)?;
    if !c.publish.is_empty() && !image_ref_ok(&c.publish) {
        return Err(Error::invalid(format!(
            "spec.container.publish {:?} is not an image reference (e.g. ghcr.io/acme/app:1.2.3)",
            c.publish
        )));
    }
    Ok(())
}

fn image_ref_ok(r: &str) -> bool {
    !r.is_empty() && r.len() <= 512 && !r.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Git and HTTP sources: a URL, an absolute container path each.
fn sources(c: &ContainerTask) -> Result<()> {
    for (i, g) in c.git.iter().enumerate() {
        let url_ok = ["https://", "http://", "ssh://", "git://", "git@"]
            .iter()
            .any(|p| g.url.starts_with(p))
            && !g.url.chars().any(|c| c.is_whitespace() || c.is_control());
        if !url_ok {
            return Err(Error::invalid(format!(
                "spec.container.git[{i}].url {:?} must be an https, ssh or git URL",
                g.url
            )));
        }
        if g.r#ref.len() > 256
            || g.r#ref.starts_with('-')
            || g.r#ref.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::invalid(format!(
                "spec.container.git[{i}].ref {:?} is not a branch, tag or commit",
                g.r#ref
            )));
        }
        abs_path(&format!("spec.container.git[{i}].path"), &g.path)?;
    }
    for (i, d) in c.downloads.iter().enumerate() {
        if !(d.url.starts_with("https://") || d.url.starts_with("http://"))
            || d.url.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::invalid(format!(
                "spec.container.downloads[{i}].url {:?} must be an http(s) URL",
                d.url
            )));
        }
        abs_path(&format!("spec.container.downloads[{i}].path"), &d.path)?;
    }
    Ok(())
}

fn abs_path(field: &str, p: &str) -> Result<()> {
    if !p.starts_with('/') || p.trim_end_matches('/').is_empty() || p.contains('\0') {
        return Err(Error::invalid(format!(
            "{field} {p:?} must be an absolute path in the container (not /)"
        )));
    }
    Ok(())
}

/// `["all"]` or device ids.
fn gpus(list: &[String]) -> Result<()> {
    if list.iter().any(|g| g == "all") && list.len() > 1 {
        return Err(Error::invalid(
            "spec.container.gpus: \"all\" stands alone; or list device ids such as [\"0\", \"1\"]",
        ));
    }
    if let Some(g) = list.iter().find(|g| {
        g.is_empty()
            || g.len() > 128
            || !g
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'))
    }) {
        return Err(Error::invalid(format!(
            "spec.container.gpus entry {g:?} is not \"all\" or a device id"
        )));
    }
    Ok(())
}

pub(crate) fn dagger_call(d: &DaggerCallTask) -> Result<()> {
    if d.module.trim().is_empty() || d.function.trim().is_empty() {
        return Err(Error::invalid(
            "spec.dagger_call needs module (a path or git URL) and function",
        ));
    }
    argv("spec.dagger_call.args", &d.args)
}

fn argv(field: &str, args: &[String]) -> Result<()> {
    if args.len() > MAX_ENTRIES {
        return Err(Error::invalid(format!(
            "{field} has {} entries; at most {MAX_ENTRIES}",
            args.len()
        )));
    }
    if let Some(a) = args
        .iter()
        .find(|a| a.contains('\0') || a.len() > MAX_STRING)
    {
        return Err(Error::invalid(format!(
            "{field} entry {:?} contains a NUL byte or is too long",
            a.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// Checks a retry policy; `field` names it in messages ("spec.retry").
pub(crate) fn retry(field: &str, r: &RetryPolicy) -> Result<()> {
    if r.max_attempts > 100 {
        return Err(Error::invalid(format!(
            "{field}.max_attempts {} is more than 100",
            r.max_attempts
        )));
    }
    if r.max_infra_retries.is_some_and(|n| n > 100) {
        return Err(Error::invalid(format!(
            "{field}.max_infra_retries must be at most 100"
        )));
    }
    const DAY_MS: u64 = 24 * 3600 * 1000;
    if r.initial_backoff_ms > DAY_MS || r.max_backoff_ms > DAY_MS {
        return Err(Error::invalid(format!(
            "{field} backoffs are limited to one day (86400000 ms)"
        )));
    }
    if r.max_backoff_ms != 0 && r.initial_backoff_ms > r.max_backoff_ms {
        return Err(Error::invalid(format!(
            "{field}.initial_backoff_ms {} is larger than max_backoff_ms {}",
            r.initial_backoff_ms, r.max_backoff_ms
        )));
    }
    if !r.multiplier.is_finite() || (r.multiplier != 0.0 && !(1.0..=10.0).contains(&r.multiplier)) {
        return Err(Error::invalid(format!(
            "{field}.multiplier {} must be between 1.0 and 10.0 (0 = 2.0)",
            r.multiplier
        )));
    }
    if !r.jitter.is_finite() || !(0.0..=1.0).contains(&r.jitter) {
        return Err(Error::invalid(format!(
            "{field}.jitter {} must be between 0.0 and 1.0",
            r.jitter
        )));
    }
    if r.retry_on
        .iter()
        .any(|c| FailureClass::try_from(*c).map_or(true, |c| c == FailureClass::Unspecified))
    {
        return Err(Error::invalid(format!(
            "{field}.retry_on has an unknown class; use EXIT_CODE, TIMEOUT or INFRASTRUCTURE"
        )));
    }
    if r.retry_exit_codes.contains(&0) {
        return Err(Error::invalid(format!(
            "{field}.retry_exit_codes contains 0, which is success"
        )));
    }
    Ok(())
}

/// Checks the policy fields of a task spec.
pub(crate) fn policies(spec: &TaskSpec) -> Result<()> {
    if let Some(r) = &spec.retry {
        retry("spec.retry", r)?;
    }
    if let Some(g) = &spec.concurrency {
        group_key("spec.concurrency.key", &g.key)?;
    }
    if spec.breakers.len() > 16 {
        return Err(Error::invalid("spec.breakers names more than 16 breakers"));
    }
    for b in &spec.breakers {
        group_key("spec.breakers", b)?;
    }
    outputs(&spec.outputs)
}

/// A concurrency group or breaker name: printable, no spaces, at most 128 bytes.
pub(crate) fn group_key(field: &str, key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 128 || key.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Error::invalid(format!(
            "{field} {key:?} must be 1..128 printable characters without spaces"
        )));
    }
    Ok(())
}

fn outputs(list: &[OutputSpec]) -> Result<()> {
    if list.len() > MAX_ITEMS {
        return Err(Error::invalid(format!(
            "spec.outputs has {} entries; at most {MAX_ITEMS}",
            list.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, o) in list.iter().enumerate() {
        if !output_name_ok(&o.name) {
            return Err(Error::invalid(format!(
                "spec.outputs[{i}].name {:?} must be letters, digits, '_', '-' or '.'",
                o.name
            )));
        }
        if !seen.insert(o.name.as_str()) {
            return Err(Error::invalid(format!(
                "spec.outputs names {:?} twice",
                o.name
            )));
        }
        match &o.source {
            None => {
                return Err(Error::invalid(format!(
                    "spec.outputs[{i}] ({}) needs a source: path, last_stdout_line, container_path, git_commit or published",
                    o.name
                )));
            }
            Some(output_spec::Source::GitCommit(p)) if !p.starts_with('/') => {
                return Err(Error::invalid(format!(
                    "spec.outputs[{i}].git_commit {p:?} must be the absolute container path of one of spec.container.git"
                )));
            }
            Some(output_spec::Source::Path(p))
                if p.is_empty() || p.starts_with('/') || p.split('/').any(|s| s == "..") =>
            {
                return Err(Error::invalid(format!(
                    "spec.outputs[{i}].path {p:?} must be relative to the task's working directory, without '..'"
                )));
            }
            Some(output_spec::Source::ContainerPath(p)) if !p.starts_with('/') => {
                return Err(Error::invalid(format!(
                    "spec.outputs[{i}].container_path {p:?} must be absolute"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Output names: what a `${{ tasks.x.outputs.NAME }}` reference can name.
pub(crate) fn output_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Output sources that only make sense with a matching container field: `git_commit` names
/// a git source's path, `published` needs `publish`; container-only sources on other kinds
/// are refused.
pub(crate) fn output_sources(spec: &TaskSpec) -> Result<()> {
    use scabbard_common::proto::task_spec::Kind;
    let container = match spec.kind.as_ref() {
        Some(Kind::Container(c)) => Some(c),
        _ => None,
    };
    for (i, o) in spec.outputs.iter().enumerate() {
        match (&o.source, container) {
            (Some(output_spec::Source::GitCommit(p)), Some(c)) => {
                let norm = |s: &str| s.trim_end_matches('/').to_string();
                if !c.git.iter().any(|g| norm(&g.path) == norm(p)) {
                    return Err(Error::invalid(format!(
                        "spec.outputs[{i}].git_commit {p:?} is not the path of any spec.container.git source"
                    )));
                }
            }
            (Some(output_spec::Source::Published(true)), Some(c)) if c.publish.is_empty() => {
                return Err(Error::invalid(format!(
                    "spec.outputs[{i}] ({}) takes the published reference, but spec.container.publish is empty",
                    o.name
                )));
            }
            (
                Some(
                    output_spec::Source::GitCommit(_)
                    | output_spec::Source::Published(_)
                    | output_spec::Source::ContainerPath(_),
                ),
                None,
            ) => {
                return Err(Error::invalid(format!(
                    "spec.outputs[{i}] ({}) uses a container-only source (container_path, git_commit or published) on a task that is not a container task",
                    o.name
                )));
            }
            _ => {}
        }
    }
    Ok(())
}
