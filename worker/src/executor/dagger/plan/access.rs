//! What a task's project may use of the worker's own resources: secret sources,
//! registry credentials and cache volumes, each checked against its allowlist in
//! `[dagger]`. [`check`] decides without reading any value; [`Checked::read`] reads the
//! secret values afterwards, so a source a project may not use is never read for it.
//! Cache volumes get their engine names here: `<project>/<volume>`, or the volume's own
//! name when `[dagger.caches.<volume>] shared = true`.

use std::collections::BTreeMap;

use dagger_sdk::CacheSharingMode;
use scabbard_common::proto;

use super::Refusal;
use crate::config::allows;
use crate::config::{DaggerConfig, SecretSource, WorkerSecret};

/// A secret handed to the engine (`setSecret`) and set as a variable in the container.
#[derive(Clone, PartialEq, Eq)]
pub(in crate::executor::dagger) struct SecretVar {
    /// Variable in the container.
    pub(in crate::executor::dagger) env: String,
    /// Name of the Dagger secret (never the value).
    pub(in crate::executor::dagger) name: String,
    /// The value.
    pub(in crate::executor::dagger) value: String,
}

impl std::fmt::Debug for SecretVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretVar({} from {})", self.env, self.name)
    }
}

/// Registry credentials for the pull and the push.
#[derive(Clone, PartialEq, Eq)]
pub(in crate::executor::dagger) struct Registry {
    pub(in crate::executor::dagger) address: String,
    pub(in crate::executor::dagger) username: String,
    /// Name of the Dagger secret holding the password.
    pub(in crate::executor::dagger) secret_name: String,
    pub(in crate::executor::dagger) password: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({} as {})", self.address, self.username)
    }
}

/// A cache mount.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::executor::dagger) struct Cache {
    /// The engine's volume: `<project>/<volume>`, or `<volume>` when shared.
    pub(in crate::executor::dagger) volume: String,
    pub(in crate::executor::dagger) path: String,
    pub(in crate::executor::dagger) sharing: Option<CacheSharingMode>,
}

/// Where a secret variable's value comes from.
enum Value {
    /// The spec's `secret_env` (already in hand).
    Given(String),
    /// A worker-side source, read by [`Checked::read`]; `what` names it for messages.
    Source { source: SecretSource, what: String },
}

struct PendingSecret {
    env: String,
    name: String,
    value: Value,
}

struct PendingRegistry {
    address: String,
    username: String,
    source: SecretSource,
}

/// A task allowed to use what it names; values not read yet.
pub(super) struct Checked {
    secrets: Vec<PendingSecret>,
    registry: Option<PendingRegistry>,
    /// Cache mounts with their engine volume names.
    pub(super) caches: Vec<Cache>,
}

/// Checks the secret sources, registry credentials and cache volumes `task` names against
/// `cfg` for `project`. Reads nothing.
pub(super) fn check(
    task: &proto::ContainerTask,
    spec: &proto::TaskSpec,
    cfg: &DaggerConfig,
    project: &str,
) -> Result<Checked, Refusal> {
    let user = |m: String| Err(Refusal::User(m));
    // Secret variables: the spec's secret_env, then worker-side sources (which win).
    let mut secrets: BTreeMap<String, PendingSecret> = BTreeMap::new();
    for (env, value) in &spec.secret_env {
        check_var(env)?;
        secrets.insert(
            env.clone(),
            PendingSecret {
                env: env.clone(),
                name: format!("scabbard-env-{env}"),
                value: Value::Given(value.clone()),
            },
        );
    }
    for r in &task.secrets {
        check_var(&r.env)?;
        let Some(WorkerSecret { source, projects }) = cfg.secrets.get(&r.source) else {
            return user(format!(
                "secret source '{}' (for {}) is not configured on this worker ([dagger.secrets])",
                r.source, r.env
            ));
        };
        if !allows(projects.as_deref(), project) {
            return user(format!(
                "secret source '{}' (for {}) may not be used by project '{project}' on this \
                 worker (not in [dagger.secrets].{}.projects)",
                r.source, r.env, r.source
            ));
        }
        secrets.insert(
            r.env.clone(),
            PendingSecret {
                env: r.env.clone(),
                name: format!("scabbard-source-{}", r.source),
                value: Value::Source {
                    source: source.clone(),
                    what: format!("secret source '{}'", r.source),
                },
            },
        );
    }

    let registry = if task.registry_auth.is_empty() {
        None
    } else {
        let address = &task.registry_auth;
        let Some(auth) = cfg.registries.get(address) else {
            return user(format!(
                "registry '{address}' (registry_auth) has no credentials on this worker \
                 ([dagger.registries])"
            ));
        };
        if !allows(auth.projects.as_deref(), project) {
            return user(format!(
                "registry credentials for '{address}' (registry_auth) may not be used by \
                 project '{project}' on this worker (not in [dagger.registries.\"{address}\"].projects)"
            ));
        }
        let source = auth
            .password_source()
            .ok_or_else(|| Refusal::Infra(format!("registry '{address}': no password source")))?;
        Some(PendingRegistry {
            address: address.clone(),
            username: auth.username.clone(),
            source,
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
        let rules = cfg.caches.get(&c.volume);
        if let Some(rules) = rules
            && !allows(rules.projects.as_deref(), project)
        {
            return user(format!(
                "cache volume '{}' may not be used by project '{project}' on this worker \
                 (not in [dagger.caches.{}].projects)",
                c.volume, c.volume
            ));
        }
        let shared = rules.is_some_and(|r| r.shared);
        caches.push(Cache {
            volume: engine_volume(project, &c.volume, shared),
            path: c.path.clone(),
            sharing,
        });
    }

    Ok(Checked {
        secrets: secrets.into_values().collect(),
        registry,
        caches,
    })
}

/// The engine's name of a task's cache volume: one per project unless shared. Project
/// names never hold a '/', and shared volume names may not (config check), so names of
/// different projects, and shared ones, never meet.
pub(in crate::executor::dagger) fn engine_volume(
    project: &str,
    volume: &str,
    shared: bool,
) -> String {
    if shared {
        volume.to_string()
    } else {
        format!("{project}/{volume}")
    }
}

impl Checked {
    /// Reads the worker-side values now (a rotated value is picked up by the next task).
    /// A source that cannot be read is the host's problem.
    pub(super) fn read(self) -> Result<(Vec<SecretVar>, Option<Registry>), Refusal> {
        let mut secrets = Vec::with_capacity(self.secrets.len());
        for s in self.secrets {
            let value = match s.value {
                Value::Given(v) => v,
                Value::Source { source, what } => {
                    read_secret(&source).map_err(|why| Refusal::Infra(format!("{what}: {why}")))?
                }
            };
            secrets.push(SecretVar {
                env: s.env,
                name: s.name,
                value,
            });
        }
        let registry = match self.registry {
            None => None,
            Some(r) => {
                let password = read_secret(&r.source)
                    .map_err(|why| Refusal::Infra(format!("registry '{}': {why}", r.address)))?;
                Some(Registry {
                    secret_name: format!("scabbard-registry-{}", r.address),
                    address: r.address,
                    username: r.username,
                    password,
                })
            }
        };
        Ok((secrets, registry))
    }
}

pub(super) fn check_var(name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Err(Refusal::User(format!(
            "{name:?} is not a valid environment variable name"
        )));
    }
    Ok(())
}

/// Reads a worker-side secret.
pub(in crate::executor::dagger) fn read_secret(source: &SecretSource) -> Result<String, String> {
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
