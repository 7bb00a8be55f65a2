//! Conversion between the file shape (`model`) and the protocol's `WorkflowSpec`, both
//! ways. File → protocol checks what the types cannot say (exactly one task kind, exactly
//! one output source, retry ranges) and names the field path of each failure; DAG checks
//! (names, cycles, references) are the controller's.

use std::collections::{BTreeMap, HashMap};

use super::FieldError;
use super::model::*;
use crate::proto;

type Result<T> = std::result::Result<T, FieldError>;

fn err(path: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.into(),
        message: message.into(),
    }
}

fn map(m: BTreeMap<String, String>) -> HashMap<String, String> {
    m.into_iter().collect()
}

fn sorted(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub(crate) fn workflow(def: WorkflowDef) -> Result<proto::WorkflowSpec> {
    let mut tasks = Vec::with_capacity(def.tasks.len());
    for (i, t) in def.tasks.into_iter().enumerate() {
        tasks.push(task(&format!("tasks[{i}]"), t)?);
    }
    Ok(proto::WorkflowSpec {
        name: def.name,
        tasks,
        failure_policy: match def.failure_policy {
            None => proto::FailurePolicy::Unspecified,
            Some(FailurePolicyDef::FailFast) => proto::FailurePolicy::FailFast,
            Some(FailurePolicyDef::Continue) => proto::FailurePolicy::Continue,
        } as i32,
        default_retry: def
            .default_retry
            .map(|r| retry("default_retry", r))
            .transpose()?,
        concurrency: def.concurrency.map(concurrency),
        labels: map(def.labels),
        priority: def.priority,
    })
}

fn task(path: &str, t: TaskDef) -> Result<proto::WorkflowTask> {
    use proto::task_spec::Kind;
    let mut kinds: Vec<(&str, Kind)> = Vec::new();
    if let Some(s) = t.shell {
        kinds.push((
            "shell",
            Kind::Shell(proto::ShellTask { command: s.command }),
        ));
    }
    if let Some(c) = t.container {
        kinds.push(("container", Kind::Container(container(c))));
    }
    if let Some(d) = t.dagger_call {
        kinds.push((
            "dagger_call",
            Kind::DaggerCall(proto::DaggerCallTask {
                module: d.module,
                function: d.function,
                args: d.args,
            }),
        ));
    }
    if t.noop.is_some() {
        kinds.push(("noop", Kind::Noop(proto::NoopTask {})));
    }
    let kind = match kinds.len() {
        1 => kinds.pop().map(|(_, k)| k),
        0 => {
            return Err(err(
                path,
                format!(
                    "task {:?} says nothing to run: give exactly one of shell, container, dagger_call or noop",
                    t.name
                ),
            ));
        }
        _ => {
            let names: Vec<&str> = kinds.iter().map(|(n, _)| *n).collect();
            return Err(err(
                path,
                format!(
                    "task {:?} has {}: give exactly one of shell, container, dagger_call or noop",
                    t.name,
                    names.join(" and ")
                ),
            ));
        }
    };
    let mut outputs = Vec::with_capacity(t.outputs.len());
    for (i, o) in t.outputs.into_iter().enumerate() {
        outputs.push(output(&format!("{path}.outputs[{i}]"), o)?);
    }
    let spec = proto::TaskSpec {
        name: String::new(),
        kind,
        env: map(t.env),
        requirements: t.requirements.map(|r| proto::Requirements {
            capabilities: r.capabilities,
            labels: map(r.labels),
        }),
        priority: t.priority,
        timeout_ms: t.timeout,
        labels: map(t.labels),
        max_infra_retries: t.max_infra_retries,
        secret_env: map(t.secret_env),
        retry: t
            .retry
            .map(|r| retry(&format!("{path}.retry"), r))
            .transpose()?,
        concurrency: t.concurrency.map(concurrency),
        breakers: t.breakers,
        outputs,
        artifacts: t
            .artifacts
            .into_iter()
            .map(|a| proto::ArtifactSpec {
                name: a.name,
                path: a.path,
                optional: a.optional,
            })
            .collect(),
        inputs: t
            .inputs
            .into_iter()
            .map(|i| proto::ArtifactInput {
                from: i.from,
                path: i.path,
                artifact: None,
            })
            .collect(),
    };
    Ok(proto::WorkflowTask {
        name: t.name,
        spec: Some(spec),
        depends_on: t.depends_on,
        when: t.when,
    })
}

fn container(c: ContainerDef) -> proto::ContainerTask {
    proto::ContainerTask {
        image: c.image,
        steps: c
            .steps
            .into_iter()
            .map(|s| proto::ContainerStep {
                args: s.args,
                name: s.name,
                cache: s.cache,
            })
            .collect(),
        workdir: c.workdir,
        secrets: c
            .secrets
            .into_iter()
            .map(|s| proto::SecretRef {
                env: s.env,
                source: s.source,
            })
            .collect(),
        caches: c
            .caches
            .into_iter()
            .map(|m| proto::CacheMount {
                volume: m.volume,
                path: m.path,
                sharing: match m.sharing {
                    None => proto::CacheSharing::Unspecified,
                    Some(SharingDef::Shared) => proto::CacheSharing::Shared,
                    Some(SharingDef::Private) => proto::CacheSharing::Private,
                    Some(SharingDef::Locked) => proto::CacheSharing::Locked,
                } as i32,
            })
            .collect(),
        directories: c
            .directories
            .into_iter()
            .map(|d| proto::DirectoryMount {
                host_path: d.host_path,
                path: d.path,
                exclude: d.exclude,
            })
            .collect(),
        registry_auth: c.registry_auth,
        gpus: c.gpus,
        git: c
            .git
            .into_iter()
            .map(|g| proto::GitSource {
                url: g.url,
                r#ref: g.r#ref,
                path: g.path,
                keep_git_dir: g.keep_git_dir,
            })
            .collect(),
        downloads: c
            .downloads
            .into_iter()
            .map(|d| proto::HttpSource {
                url: d.url,
                path: d.path,
            })
            .collect(),
        cache: c.cache,
        publish: c.publish,
        entrypoint: c.entrypoint,
    }
}

fn output(path: &str, o: OutputDef) -> Result<proto::OutputSpec> {
    use proto::output_spec::Source;
    let mut sources = Vec::new();
    if let Some(p) = o.path {
        sources.push(("path", Source::Path(p)));
    }
    if o.last_stdout_line {
        sources.push(("last_stdout_line", Source::LastStdoutLine(true)));
    }
    if let Some(p) = o.container_path {
        sources.push(("container_path", Source::ContainerPath(p)));
    }
    if let Some(p) = o.git_commit {
        sources.push(("git_commit", Source::GitCommit(p)));
    }
    if o.published {
        sources.push(("published", Source::Published(true)));
    }
    if sources.len() != 1 {
        let found = if sources.is_empty() {
            "none".to_string()
        } else {
            sources
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(" and ")
        };
        return Err(err(
            path,
            format!(
                "output {:?} needs exactly one of path, last_stdout_line: true, container_path, git_commit or published: true (found {found})",
                o.name
            ),
        ));
    }
    Ok(proto::OutputSpec {
        name: o.name,
        source: sources.pop().map(|(_, s)| s),
    })
}

fn retry(path: &str, r: RetryDef) -> Result<proto::RetryPolicy> {
    if r.multiplier != 0.0 && r.multiplier < 1.0 {
        return Err(err(
            format!("{path}.multiplier"),
            format!(
                "{} is below 1.0: delays must not shrink (0 means the default 2.0)",
                r.multiplier
            ),
        ));
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        return Err(err(
            format!("{path}.jitter"),
            format!(
                "{} is outside 0.0..=1.0 (the randomised fraction of each delay)",
                r.jitter
            ),
        ));
    }
    Ok(proto::RetryPolicy {
        max_attempts: r.max_attempts,
        initial_backoff_ms: r.initial_backoff,
        max_backoff_ms: r.max_backoff,
        multiplier: r.multiplier,
        jitter: r.jitter,
        retry_on: r
            .retry_on
            .into_iter()
            .map(|c| match c {
                FailureClassDef::ExitCode => proto::FailureClass::ExitCode,
                FailureClassDef::Timeout => proto::FailureClass::Timeout,
                FailureClassDef::Infrastructure => proto::FailureClass::Infrastructure,
            } as i32)
            .collect(),
        retry_exit_codes: r.retry_exit_codes,
        max_infra_retries: r.max_infra_retries,
    })
}

fn concurrency(c: ConcurrencyDef) -> proto::ConcurrencyGroup {
    proto::ConcurrencyGroup {
        key: c.key,
        limit: c.limit,
    }
}

// ---- protocol → file shape ----

pub(crate) fn from_workflow(spec: &proto::WorkflowSpec) -> WorkflowDef {
    WorkflowDef {
        name: spec.name.clone(),
        failure_policy: match spec.failure_policy() {
            proto::FailurePolicy::Unspecified => None,
            proto::FailurePolicy::FailFast => Some(FailurePolicyDef::FailFast),
            proto::FailurePolicy::Continue => Some(FailurePolicyDef::Continue),
        },
        priority: spec.priority,
        labels: sorted(&spec.labels),
        concurrency: spec.concurrency.as_ref().map(from_concurrency),
        default_retry: spec.default_retry.as_ref().map(from_retry),
        tasks: spec.tasks.iter().map(from_task).collect(),
    }
}

fn from_task(t: &proto::WorkflowTask) -> TaskDef {
    use proto::task_spec::Kind;
    let mut def = TaskDef {
        name: t.name.clone(),
        depends_on: t.depends_on.clone(),
        when: t.when.clone(),
        ..Default::default()
    };
    let Some(spec) = &t.spec else {
        return def;
    };
    match &spec.kind {
        None => {}
        Some(Kind::Shell(s)) => {
            def.shell = Some(ShellDef {
                command: s.command.clone(),
            })
        }
        Some(Kind::Noop(_)) => def.noop = Some(Some(NoopDef {})),
        Some(Kind::Container(c)) => def.container = Some(from_container(c)),
        Some(Kind::DaggerCall(d)) => {
            def.dagger_call = Some(DaggerCallDef {
                module: d.module.clone(),
                function: d.function.clone(),
                args: d.args.clone(),
            })
        }
    }
    def.env = sorted(&spec.env);
    def.secret_env = sorted(&spec.secret_env);
    def.labels = sorted(&spec.labels);
    def.requirements = spec.requirements.as_ref().map(|r| RequirementsDef {
        capabilities: r.capabilities.clone(),
        labels: sorted(&r.labels),
    });
    def.priority = spec.priority;
    def.timeout = spec.timeout_ms;
    def.max_infra_retries = spec.max_infra_retries;
    def.retry = spec.retry.as_ref().map(from_retry);
    def.concurrency = spec.concurrency.as_ref().map(from_concurrency);
    def.breakers = spec.breakers.clone();
    def.outputs = spec.outputs.iter().map(from_output).collect();
    def.artifacts = spec
        .artifacts
        .iter()
        .map(|a| ArtifactDef {
            name: a.name.clone(),
            path: a.path.clone(),
            optional: a.optional,
        })
        .collect();
    def.inputs = spec
        .inputs
        .iter()
        .map(|i| InputDef {
            from: i.from.clone(),
            path: i.path.clone(),
        })
        .collect();
    def
}

fn from_container(c: &proto::ContainerTask) -> ContainerDef {
    ContainerDef {
        image: c.image.clone(),
        workdir: c.workdir.clone(),
        registry_auth: c.registry_auth.clone(),
        steps: c
            .steps
            .iter()
            .map(|s| StepDef {
                name: s.name.clone(),
                args: s.args.clone(),
                cache: s.cache,
            })
            .collect(),
        secrets: c
            .secrets
            .iter()
            .map(|s| SecretDef {
                env: s.env.clone(),
                source: s.source.clone(),
            })
            .collect(),
        caches: c
            .caches
            .iter()
            .map(|m| CacheDef {
                volume: m.volume.clone(),
                path: m.path.clone(),
                sharing: match m.sharing() {
                    proto::CacheSharing::Unspecified => None,
                    proto::CacheSharing::Shared => Some(SharingDef::Shared),
                    proto::CacheSharing::Private => Some(SharingDef::Private),
                    proto::CacheSharing::Locked => Some(SharingDef::Locked),
                },
            })
            .collect(),
        directories: c
            .directories
            .iter()
            .map(|d| DirectoryDef {
                host_path: d.host_path.clone(),
                path: d.path.clone(),
                exclude: d.exclude.clone(),
            })
            .collect(),
        gpus: c.gpus.clone(),
        git: c
            .git
            .iter()
            .map(|g| GitDef {
                url: g.url.clone(),
                r#ref: g.r#ref.clone(),
                path: g.path.clone(),
                keep_git_dir: g.keep_git_dir,
            })
            .collect(),
        downloads: c
            .downloads
            .iter()
            .map(|d| HttpDef {
                url: d.url.clone(),
                path: d.path.clone(),
            })
            .collect(),
        cache: c.cache,
        publish: c.publish.clone(),
        entrypoint: c.entrypoint.clone(),
    }
}

fn from_output(o: &proto::OutputSpec) -> OutputDef {
    use proto::output_spec::Source;
    let mut def = OutputDef {
        name: o.name.clone(),
        ..Default::default()
    };
    match &o.source {
        None => {}
        Some(Source::Path(p)) => def.path = Some(p.clone()),
        Some(Source::LastStdoutLine(b)) => def.last_stdout_line = *b,
        Some(Source::ContainerPath(p)) => def.container_path = Some(p.clone()),
        Some(Source::GitCommit(p)) => def.git_commit = Some(p.clone()),
        Some(Source::Published(b)) => def.published = *b,
    }
    def
}

fn from_retry(r: &proto::RetryPolicy) -> RetryDef {
    RetryDef {
        max_attempts: r.max_attempts,
        initial_backoff: r.initial_backoff_ms,
        max_backoff: r.max_backoff_ms,
        multiplier: r.multiplier,
        jitter: r.jitter,
        retry_on: r
            .retry_on()
            .filter_map(|c| match c {
                proto::FailureClass::Unspecified => None,
                proto::FailureClass::ExitCode => Some(FailureClassDef::ExitCode),
                proto::FailureClass::Timeout => Some(FailureClassDef::Timeout),
                proto::FailureClass::Infrastructure => Some(FailureClassDef::Infrastructure),
            })
            .collect(),
        retry_exit_codes: r.retry_exit_codes.clone(),
        max_infra_retries: r.max_infra_retries,
    }
}

fn from_concurrency(c: &proto::ConcurrencyGroup) -> ConcurrencyDef {
    ConcurrencyDef {
        key: c.key.clone(),
        limit: c.limit,
    }
}
