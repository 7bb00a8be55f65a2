//! A container task checked against the worker's `[dagger]` configuration before any
//! engine is touched: what to run, with the secret values read from their worker-side
//! sources, host directories resolved inside the workspace root, and outputs a container
//! can produce. A refusal says whose fault it is: the spec's ([`Refusal::User`]: an
//! unknown secret source, a path outside the workspace, a `path` output) or the host's
//! ([`Refusal::Infra`]: a configured secret that cannot be read).

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use dagger_sdk::CacheSharingMode;
use scabbard_common::proto::{self, output_spec::Source};

use crate::config::{DaggerConfig, SecretSource};
use crate::executor::shell::outputs::valid_name;

/// Why a task is not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The spec asks for something this worker cannot give it.
    User(String),
    /// The worker's own configuration fails.
    Infra(String),
}

/// A secret handed to the engine (`setSecret`) and set as a variable in the container.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct SecretVar {
    /// Variable in the container.
    pub(super) env: String,
    /// Name of the Dagger secret (never the value).
    pub(super) name: String,
    /// The value.
    pub(super) value: String,
}

impl std::fmt::Debug for SecretVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretVar({} from {})", self.env, self.name)
    }
}

/// Registry credentials for the pull.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Registry {
    pub(super) address: String,
    pub(super) username: String,
    /// Name of the Dagger secret holding the password.
    pub(super) secret_name: String,
    pub(super) password: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({} as {})", self.address, self.username)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Cache {
    pub(super) volume: String,
    pub(super) path: String,
    pub(super) sharing: Option<CacheSharingMode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HostDir {
    /// Absolute, canonical, inside the workspace root.
    pub(super) host_path: PathBuf,
    pub(super) path: String,
    pub(super) exclude: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Step {
    pub(super) args: Vec<String>,
    /// For messages: the step's name, else its number.
    pub(super) label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum OutputKind {
    /// Exported from this path in the container.
    ContainerPath(String),
    /// The last non-empty line of the last step's stdout.
    LastStdoutLine,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Output {
    pub(super) name: String,
    pub(super) kind: OutputKind,
}

/// Everything the pipeline needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    pub(super) image: String,
    pub(super) registry: Option<Registry>,
    /// Plain variables, by name.
    pub(super) env: BTreeMap<String, String>,
    /// Secret variables, by variable name.
    pub(super) secrets: Vec<SecretVar>,
    pub(super) caches: Vec<Cache>,
    pub(super) dirs: Vec<HostDir>,
    pub(super) workdir: Option<String>,
    pub(super) steps: Vec<Step>,
    pub(super) outputs: Vec<Output>,
}

impl Plan {
    /// Every secret value the pipeline handles (to mask them wherever they might show).
    pub(super) fn secret_values(&self) -> Vec<String> {
        let mut values: Vec<String> = self.secrets.iter().map(|s| s.value.clone()).collect();
        values.extend(self.registry.iter().map(|r| r.password.clone()));
        values
    }

    /// Whether an output is exported to the host (then the work dir is kept).
    pub(super) fn exports(&self) -> bool {
        self.outputs
            .iter()
            .any(|o| matches!(o.kind, OutputKind::ContainerPath(_)))
    }
}

/// Checks `task` (and `spec`'s env, secrets and outputs) against `cfg`.
pub(super) fn plan(
    task: &proto::ContainerTask,
    spec: &proto::TaskSpec,
    cfg: &DaggerConfig,
) -> Result<Plan, Refusal> {
    let user = |m: String| Err(Refusal::User(m));
    if task.image.trim().is_empty() {
        return user("container task has no image".into());
    }
    let mut steps = Vec::new();
    for (i, s) in task.steps.iter().enumerate() {
        let label = if s.name.is_empty() {
            format!("step {}", i + 1)
        } else {
            format!("step {} ({})", i + 1, s.name)
        };
        if s.args.is_empty() {
            return user(format!("{label} has no args"));
        }
        steps.push(Step {
            args: s.args.clone(),
            label,
        });
    }

    // Secret variables: the spec's secret_env, then worker-side sources (which win).
    let mut secrets: BTreeMap<String, SecretVar> = BTreeMap::new();
    for (env, value) in &spec.secret_env {
        check_var(env)?;
        secrets.insert(
            env.clone(),
            SecretVar {
                env: env.clone(),
                name: format!("scabbard-env-{env}"),
                value: value.clone(),
            },
        );
    }
    for r in &task.secrets {
        check_var(&r.env)?;
        let Some(source) = cfg.secrets.get(&r.source) else {
            return user(format!(
                "secret source '{}' (for {}) is not configured on this worker ([dagger.secrets])",
                r.source, r.env
            ));
        };
        let value = read_secret(source)
            .map_err(|why| Refusal::Infra(format!("secret source '{}': {why}", r.source)))?;
        secrets.insert(
            r.env.clone(),
            SecretVar {
                env: r.env.clone(),
                name: format!("scabbard-source-{}", r.source),
                value,
            },
        );
    }
    let mut env = BTreeMap::new();
    for (k, v) in &spec.env {
        check_var(k)?;
        if !secrets.contains_key(k) {
            env.insert(k.clone(), v.clone());
        }
    }

    let registry = if task.registry_auth.is_empty() {
        None
    } else {
        let Some(auth) = cfg.registries.get(&task.registry_auth) else {
            return user(format!(
                "registry '{}' has no credentials on this worker ([dagger.registries])",
                task.registry_auth
            ));
        };
        let source = auth.password_source().ok_or_else(|| {
            Refusal::Infra(format!(
                "registry '{}': no password source",
                task.registry_auth
            ))
        })?;
        let password = read_secret(&source)
            .map_err(|why| Refusal::Infra(format!("registry '{}': {why}", task.registry_auth)))?;
        Some(Registry {
            address: task.registry_auth.clone(),
            username: auth.username.clone(),
            secret_name: format!("scabbard-registry-{}", task.registry_auth),
            password,
        })
    };

    let mut caches = Vec::new();
    for c in &task.caches {
        if c.volume.is_empty() || c.path.is_empty() {
            return user("a cache mount needs a volume and a path".into());
        }
        let sharing = match proto::CacheSharing::try_from(c.sharing) {
            Ok(proto::CacheSharing::Unspecified) => None,
            Ok(proto::CacheSharing::Shared) => Some(CacheSharingMode::Shared),
            Ok(proto::CacheSharing::Private) => Some(CacheSharingMode::Private),
            Ok(proto::CacheSharing::Locked) => Some(CacheSharingMode::Locked),
            Err(_) => {
                return user(format!(
                    "cache '{}': unknown sharing {}",
                    c.volume, c.sharing
                ));
            }
        };
        caches.push(Cache {
            volume: c.volume.clone(),
            path: c.path.clone(),
            sharing,
        });
    }

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

    let outputs = check_outputs(&spec.outputs, !steps.is_empty())?;
    Ok(Plan {
        image: task.image.clone(),
        registry,
        env,
        secrets: secrets.into_values().collect(),
        caches,
        dirs,
        workdir: (!task.workdir.is_empty()).then(|| task.workdir.clone()),
        steps,
        outputs,
    })
}

fn check_var(name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Err(Refusal::User(format!(
            "{name:?} is not a valid environment variable name"
        )));
    }
    Ok(())
}

/// Reads a worker-side secret now (so a rotated value is picked up by the next task).
pub(super) fn read_secret(source: &SecretSource) -> Result<String, String> {
    match source {
        SecretSource::Env(var) => std::env::var(var).map_err(|e| match e {
            std::env::VarError::NotPresent => {
                format!("the worker's environment has no {var}")
            }
            std::env::VarError::NotUnicode(_) => format!("{var} is not UTF-8"),
        }),
        SecretSource::File(path) => {
            let mut text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            Ok(text)
        }
    }
}

/// `host_path` resolved inside `root`: relative ones under it, absolute ones must be in
/// it; `..` and symlinks may not leave it, and it must be an existing directory.
pub(super) fn inside_workspace(host_path: &str, root: Option<&Path>) -> Result<PathBuf, Refusal> {
    let user = |m: String| Err(Refusal::User(m));
    let Some(root) = root else {
        return user(format!(
            "host directory {host_path}: this worker has no dagger.workspace_root, so tasks cannot mount host directories"
        ));
    };
    if host_path.is_empty() {
        return user("a directory mount needs a host_path".into());
    }
    let path = Path::new(host_path);
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    // Lexically first (so `..` cannot climb out even through missing directories)...
    let mut lexical = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                if !lexical.pop() {
                    return user(format!("host directory {host_path} leaves the workspace"));
                }
            }
            Component::CurDir => {}
            other => lexical.push(other),
        }
    }
    if !lexical.starts_with(root) {
        return user(format!(
            "host directory {host_path} is outside the workspace root {}",
            root.display()
        ));
    }
    // ...then through symlinks.
    let root_real = std::fs::canonicalize(root).map_err(|e| {
        Refusal::Infra(format!(
            "workspace root {} (dagger.workspace_root): {e}",
            root.display()
        ))
    })?;
    let real = match std::fs::canonicalize(&lexical) {
        Ok(real) => real,
        Err(e) => return user(format!("host directory {host_path}: {e}")),
    };
    if !real.starts_with(&root_real) {
        return user(format!(
            "host directory {host_path} leads outside the workspace root {} (through a symlink)",
            root.display()
        ));
    }
    if !real.is_dir() {
        return user(format!("host directory {host_path} is not a directory"));
    }
    Ok(real)
}

/// Output names and sources a container task can produce.
fn check_outputs(outputs: &[proto::OutputSpec], has_steps: bool) -> Result<Vec<Output>, Refusal> {
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
            Some(Source::Path(_)) => {
                return user(format!(
                    "output '{name}' uses `path`, which only shell tasks support: a container \
                     task's files are read with `container_path` (exported to the worker)"
                ));
            }
            Some(Source::GitCommit(_) | Source::Published(_)) => {
                return user(format!("output '{name}': this source is not supported yet"));
            }
            Some(Source::LastStdoutLine(false)) | None => {
                return user(format!(
                    "output '{name}' has no source: give `container_path` or `last_stdout_line`"
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn task(image: &str, steps: &[&[&str]]) -> proto::ContainerTask {
        proto::ContainerTask {
            image: image.into(),
            steps: steps
                .iter()
                .map(|a| proto::ContainerStep {
                    cache: false,
                    args: a.iter().map(|s| s.to_string()).collect(),
                    name: String::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn refused(r: Result<Plan, Refusal>) -> String {
        match r {
            Err(Refusal::User(m)) => m,
            other => panic!("expected a user refusal, got {other:?}"),
        }
    }

    #[test]
    fn user_mistakes_are_refused_with_reasons() {
        let cfg = DaggerConfig::default();
        let spec = proto::TaskSpec::default();
        assert!(refused(plan(&task("", &[&["x"]]), &spec, &cfg)).contains("no image"));
        assert!(refused(plan(&task("a", &[&[]]), &spec, &cfg)).contains("step 1 has no args"));
        let mut t = task("a", &[&["x"]]);
        t.secrets.push(proto::SecretRef {
            env: "T".into(),
            source: "nope".into(),
        });
        assert!(refused(plan(&t, &spec, &cfg)).contains("'nope'"));
        let mut t = task("a", &[&["x"]]);
        t.registry_auth = "ghcr.io".into();
        assert!(refused(plan(&t, &spec, &cfg)).contains("ghcr.io"));
        let mut spec = proto::TaskSpec::default();
        spec.outputs.push(proto::OutputSpec {
            name: "o".into(),
            source: Some(Source::Path("x".into())),
        });
        let m = refused(plan(&task("a", &[&["x"]]), &spec, &cfg));
        assert!(m.contains("only shell tasks"), "{m}");
    }

    #[test]
    fn secrets_come_from_worker_sources_and_secret_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "file-secret\n").unwrap();
        let cfg = DaggerConfig {
            secrets: HashMap::from([("key".to_string(), SecretSource::File(file))]),
            ..Default::default()
        };
        let mut t = task("a", &[&["x"]]);
        t.secrets.push(proto::SecretRef {
            env: "KEY".into(),
            source: "key".into(),
        });
        let spec = proto::TaskSpec {
            env: HashMap::from([("KEY".into(), "plain".into()), ("A".into(), "1".into())]),
            secret_env: HashMap::from([("TOKEN".into(), "tok".into())]),
            ..Default::default()
        };
        let p = plan(&t, &spec, &cfg).unwrap();
        assert_eq!(p.env, BTreeMap::from([("A".to_string(), "1".to_string())]));
        let got: Vec<(&str, &str)> = p
            .secrets
            .iter()
            .map(|s| (s.env.as_str(), s.value.as_str()))
            .collect();
        assert_eq!(got, [("KEY", "file-secret"), ("TOKEN", "tok")]);
        assert!(!format!("{p:?}").contains("file-secret"));
    }

    #[test]
    fn unreadable_worker_secret_is_infrastructure() {
        let cfg = DaggerConfig {
            secrets: HashMap::from([(
                "gone".to_string(),
                SecretSource::Env("SCABBARD_TEST_SURELY_UNSET".into()),
            )]),
            ..Default::default()
        };
        let mut t = task("a", &[&["x"]]);
        t.secrets.push(proto::SecretRef {
            env: "X".into(),
            source: "gone".into(),
        });
        match plan(&t, &proto::TaskSpec::default(), &cfg) {
            Err(Refusal::Infra(m)) => assert!(m.contains("SCABBARD_TEST_SURELY_UNSET"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_directories_stay_in_the_workspace() {
        let ws = tempfile::tempdir().unwrap();
        let root = ws.path().join("root");
        std::fs::create_dir_all(root.join("src/sub")).unwrap();
        std::fs::create_dir_all(ws.path().join("outside")).unwrap();
        std::os::unix::fs::symlink(ws.path().join("outside"), root.join("link")).unwrap();
        let real_root = std::fs::canonicalize(&root).unwrap();
        let ok = |p: &str| inside_workspace(p, Some(&root));
        assert_eq!(ok("src").unwrap(), real_root.join("src"));
        assert_eq!(ok("src/sub/..").unwrap(), real_root.join("src"));
        assert_eq!(
            ok(root.join("src").to_str().unwrap()).unwrap(),
            real_root.join("src")
        );
        for bad in [
            "..",
            "../outside",
            "src/../../outside",
            "link",
            "/etc",
            "missing",
        ] {
            assert!(matches!(ok(bad), Err(Refusal::User(_))), "{bad}");
        }
        assert!(
            matches!(inside_workspace("src", None), Err(Refusal::User(m)) if m.contains("workspace_root"))
        );
    }
}
