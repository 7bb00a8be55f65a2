//! Who may use what the worker holds: its secret sources (`[dagger.secrets]`), registry
//! credentials (`[dagger.registries]`) and cache volumes (`[dagger.caches]`), each with an
//! optional allowlist of projects. This module owns their configuration shapes and checks;
//! it never reads a secret value (the executor does, after a task passed the check).

use std::path::PathBuf;

use scabbard_common::{Error, Result};
use serde::Deserialize;

use super::DaggerConfig;

/// Where the value of a worker-side secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A variable of the worker's own environment.
    Env(String),
    /// A file of the worker's host (one trailing newline is dropped).
    File(PathBuf),
}

/// One `[dagger.secrets]` entry: `{ env = "VAR" }` or `{ file = "/path" }`, with an
/// optional `projects = [...]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawSecret")]
pub struct WorkerSecret {
    /// Where the value is read from.
    pub source: SecretSource,
    /// The projects whose tasks may use it; `None` = every project.
    pub projects: Option<Vec<String>>,
}

impl From<SecretSource> for WorkerSecret {
    /// A source open to every project.
    fn from(source: SecretSource) -> Self {
        Self {
            source,
            projects: None,
        }
    }
}

impl WorkerSecret {
    /// `source`, usable by `projects` only.
    pub fn for_projects(source: SecretSource, projects: &[&str]) -> Self {
        Self {
            source,
            projects: Some(projects.iter().map(|p| p.to_string()).collect()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    env: Option<String>,
    file: Option<PathBuf>,
    projects: Option<Vec<String>>,
}

impl TryFrom<RawSecret> for WorkerSecret {
    type Error = String;

    fn try_from(raw: RawSecret) -> std::result::Result<Self, String> {
        let source = match (raw.env, raw.file) {
            (Some(var), None) => SecretSource::Env(var),
            (None, Some(path)) => SecretSource::File(path),
            _ => return Err("a secret source needs exactly one of `env` and `file`".into()),
        };
        Ok(Self {
            source,
            projects: raw.projects,
        })
    }
}

/// Credentials for one registry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryAuth {
    /// User name to log in with.
    pub username: String,
    /// Variable of the worker's environment holding the password or token.
    pub password_env: Option<String>,
    /// File holding the password or token (one trailing newline is dropped).
    pub password_file: Option<PathBuf>,
    /// The projects whose tasks may use these credentials; `None` = every project.
    pub projects: Option<Vec<String>>,
}

impl RegistryAuth {
    /// Where the password comes from (checked by [`DaggerConfig::validate`]).
    pub fn password_source(&self) -> Option<SecretSource> {
        match (&self.password_env, &self.password_file) {
            (Some(var), None) => Some(SecretSource::Env(var.clone())),
            (None, Some(path)) => Some(SecretSource::File(path.clone())),
            _ => None,
        }
    }
}

/// Rules for one named cache volume (`[dagger.caches.<volume>]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheVolumeConfig {
    /// The projects whose tasks may mount it; `None` = every project.
    pub projects: Option<Vec<String>>,
    /// One engine volume for every allowed project (named as tasks name it) instead of one
    /// per project (`<project>/<volume>`). Default: false.
    pub shared: bool,
}

/// Whether `projects` (an allowlist, `None` = everyone) lets `project` in.
pub fn allows(projects: Option<&[String]>, project: &str) -> bool {
    projects.is_none_or(|list| list.iter().any(|p| p == project))
}

/// Checks the three tables, naming the field at fault.
pub(super) fn validate(cfg: &DaggerConfig) -> Result<()> {
    let bad = |field: &str, why: &str| Err(Error::invalid(format!("dagger.{field} {why}")));
    for (name, secret) in &cfg.secrets {
        if !valid_name(name) {
            return bad(
                &format!("secrets.{name:?}"),
                "is not a valid name: use letters, digits, '_', '-' and '.'",
            );
        }
        let field = format!("secrets.{name}");
        check_source(&field, &secret.source)?;
        check_projects(&field, secret.projects.as_deref())?;
    }
    for (address, auth) in &cfg.registries {
        let field = format!("registries.{address:?}");
        if address.trim().is_empty() || address.contains(char::is_whitespace) {
            return bad(&field, "needs a registry address such as \"ghcr.io\"");
        }
        if auth.username.trim().is_empty() {
            return bad(&format!("{field}.username"), "is required");
        }
        match auth.password_source() {
            Some(source) => check_source(&field, &source)?,
            None => {
                return bad(
                    &field,
                    "needs exactly one of password_env and password_file",
                );
            }
        }
        check_projects(&field, auth.projects.as_deref())?;
    }
    for (volume, rules) in &cfg.caches {
        let field = format!("caches.{volume:?}");
        // No '/': a shared volume keeps its name, and must never look like a namespaced one.
        if volume.is_empty() || volume.contains('/') || volume.contains(char::is_whitespace) {
            return bad(
                &field,
                "is not a valid volume name (no '/' or spaces; namespaced names are made by the worker)",
            );
        }
        check_projects(&field, rules.projects.as_deref())?;
    }
    Ok(())
}

/// See [`DaggerConfig::open_to_every_project`].
pub(super) fn open_to_every_project(cfg: &DaggerConfig) -> Vec<String> {
    let mut open: Vec<String> = cfg
        .secrets
        .iter()
        .filter(|(_, s)| s.projects.is_none())
        .map(|(name, _)| format!("dagger.secrets.{name}"))
        .chain(
            cfg.registries
                .iter()
                .filter(|(_, r)| r.projects.is_none())
                .map(|(address, _)| format!("dagger.registries.{address:?}")),
        )
        .chain(
            cfg.caches
                .iter()
                .filter(|(_, c)| c.shared && c.projects.is_none())
                .map(|(volume, _)| format!("dagger.caches.{volume} (shared)")),
        )
        .collect();
    open.sort();
    open
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn check_source(field: &str, source: &SecretSource) -> Result<()> {
    match source {
        SecretSource::Env(var) if var.is_empty() || var.contains('=') || var.contains('\0') => Err(
            Error::invalid(format!("dagger.{field}: {var:?} is not a variable name")),
        ),
        SecretSource::File(path) if !path.is_absolute() => Err(Error::invalid(format!(
            "dagger.{field}: the file must be an absolute path, got {}",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// An allowlist names at least one project, each a plausible project name.
fn check_projects(field: &str, projects: Option<&[String]>) -> Result<()> {
    let Some(projects) = projects else {
        return Ok(());
    };
    if projects.is_empty() {
        return Err(Error::invalid(format!(
            "dagger.{field}.projects is empty, so no task could use it: list projects, or \
             leave `projects` out to allow every project"
        )));
    }
    for p in projects {
        if p.is_empty() || p.contains(|c: char| c == '/' || c.is_whitespace()) {
            return Err(Error::invalid(format!(
                "dagger.{field}.projects: {p:?} is not a project name"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WorkerConfig;

    fn parse(text: &str) -> Result<DaggerConfig> {
        let cfg = WorkerConfig::from_toml(text)?;
        cfg.dagger.validate()?;
        Ok(cfg.dagger)
    }

    #[test]
    fn allowlists_parse_and_old_forms_still_work() {
        let cfg = parse(
            r#"
            [dagger.secrets]
            npm = { env = "NPM_TOKEN", projects = ["web"] }
            key = { file = "/etc/key" }
            [dagger.registries."ghcr.io"]
            username = "bot"
            password_env = "GHCR_TOKEN"
            projects = ["web", "api"]
            [dagger.caches.gomod]
            projects = ["api"]
            [dagger.caches.apt]
            shared = true
            "#,
        )
        .unwrap();
        assert_eq!(
            cfg.secrets["npm"],
            WorkerSecret::for_projects(SecretSource::Env("NPM_TOKEN".into()), &["web"])
        );
        assert_eq!(
            cfg.secrets["key"],
            WorkerSecret::from(SecretSource::File("/etc/key".into()))
        );
        let ghcr = &cfg.registries["ghcr.io"];
        assert!(allows(ghcr.projects.as_deref(), "api"));
        assert!(!allows(ghcr.projects.as_deref(), "ops"));
        assert!(allows(None, "anyone"));
        assert_eq!(
            cfg.caches["gomod"],
            CacheVolumeConfig {
                projects: Some(vec!["api".into()]),
                shared: false
            }
        );
        assert!(cfg.caches["apt"].shared);
        assert_eq!(
            cfg.open_to_every_project(),
            ["dagger.caches.apt (shared)", "dagger.secrets.key"]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "[dagger.secrets]\nx = { env = \"X\", projects = [] }",
                "dagger.secrets.x.projects is empty",
            ),
            (
                "[dagger.secrets]\nx = { env = \"X\", file = \"/f\" }",
                "exactly one of `env` and `file`",
            ),
            (
                "[dagger.secrets]\nx = { url = \"y\" }",
                "unknown field `url`",
            ),
            (
                "[dagger.registries.\"r.io\"]\nusername = \"u\"\npassword_env = \"P\"\nprojects = [\"a b\"]",
                "dagger.registries.\"r.io\".projects",
            ),
            (
                "[dagger.caches.\"a/b\"]\nshared = true",
                "dagger.caches.\"a/b\"",
            ),
            ("[dagger.caches.x]\nsurprise = 1", "surprise"),
        ];
        for (text, field) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
