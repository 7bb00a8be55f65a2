//! CLI contexts: `contexts.toml` next to the credentials file (same directory, mode
//! 0600), one named entry per controller or cluster — its address (list), where its token
//! comes from, its TLS files — and which context is current. `scabbard context
//! list|use|show` reads and switches them; `scabbard dev` and `scabbard login` create or
//! update one and make it current; the global `--context NAME` (or `SCABBARD_CONTEXT`)
//! picks one for a single command. [`crate::credentials::resolve`] uses the selected
//! context for what `--controller`, `--token` and the TLS flags do not give.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::credentials;
use crate::exit::{self, fail};

/// Name of the file in the config directory.
pub(crate) const FILE_NAME: &str = "contexts.toml";

/// Where a context's token comes from.
pub(crate) const TOKEN_FROM_CREDENTIALS: &str = "credentials";

/// The whole file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Contexts {
    /// Name of the context used when none is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) current: Option<String>,
    /// The contexts.
    #[serde(default, rename = "context")]
    pub(crate) contexts: Vec<Ctx>,
}

/// One context.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Ctx {
    /// Its name (`dev`, `prod`, …).
    pub(crate) name: String,
    /// Controller address, or several comma-separated for a cluster.
    pub(crate) controller: String,
    /// Where the token comes from: `credentials` (the entry of `credentials.toml` for this
    /// controller; the default), `env:VAR` or `file:PATH`. Never the token itself.
    #[serde(default = "default_token_ref")]
    pub(crate) token: String,
    /// PEM CA certificate of the controller (TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// PEM client certificate (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_cert: Option<PathBuf>,
    /// Key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_key: Option<PathBuf>,
    /// Name the controller's certificate must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_domain: Option<String>,
}

fn default_token_ref() -> String {
    TOKEN_FROM_CREDENTIALS.into()
}

/// Path of the contexts file.
pub(crate) fn path() -> Result<PathBuf> {
    Ok(credentials::config_dir()?.join(FILE_NAME))
}

/// The global `--context` / `SCABBARD_CONTEXT`, set once by `main`.
static SELECTED: OnceLock<String> = OnceLock::new();

/// Records the global `--context` (once, from `main`).
pub(crate) fn set_selected(name: Option<String>) {
    if let Some(n) = name.filter(|n| !n.trim().is_empty()) {
        let _ = SELECTED.set(n);
    }
}

/// The context named with `--context` / `SCABBARD_CONTEXT`, if any.
pub(crate) fn selected_name() -> Option<&'static str> {
    SELECTED.get().map(String::as_str)
}

impl Contexts {
    /// Reads `path`; a missing file is empty.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(fail(
                    exit::CONFIG,
                    format!("reading {}: {e}", path.display()),
                ));
            }
        };
        toml::from_str(&text)
            .map_err(|e| fail(exit::CONFIG, format!("parsing {}: {e}", path.display())))
    }

    /// Writes the file atomically with mode 0600.
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let mut text = String::from(
            "# Scabbard CLI contexts (`scabbard context list|use|show`; written by\n\
             # `scabbard login` and `scabbard dev`). Tokens live in credentials.toml.\n\n",
        );
        text.push_str(&toml::to_string(self).context("encoding the contexts")?);
        credentials::write_private(path, text.as_bytes())
    }

    /// The context called `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Ctx> {
        self.contexts.iter().find(|c| c.name == name)
    }

    /// The context called `name`, or an error listing the known ones.
    pub(crate) fn require(&self, name: &str) -> Result<&Ctx> {
        self.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
            fail(
                exit::CONFIG,
                if known.is_empty() {
                    format!(
                        "no context named {name:?}: there are none yet (`scabbard login` and `scabbard dev` create them)"
                    )
                } else {
                    format!(
                        "no context named {name:?}; known contexts: {} (`scabbard context list`)",
                        known.join(", ")
                    )
                },
            )
        })
    }

    /// The current context, if it exists.
    pub(crate) fn current(&self) -> Option<&Ctx> {
        self.get(self.current.as_deref()?)
    }

    /// Adds or replaces the context of the same name, and makes it current.
    pub(crate) fn upsert_current(&mut self, ctx: Ctx) {
        self.current = Some(ctx.name.clone());
        match self.contexts.iter_mut().find(|c| c.name == ctx.name) {
            Some(c) => *c = ctx,
            None => self.contexts.push(ctx),
        }
    }

    /// The name of the context for `controller`: an existing one for exactly that address
    /// (list), else `fallback`.
    pub(crate) fn name_for(&self, controller: &str, fallback: &str) -> String {
        self.contexts
            .iter()
            .find(|c| c.controller == controller)
            .map_or_else(|| fallback.to_string(), |c| c.name.clone())
    }
}

/// The context a command uses: the one `--context`/`SCABBARD_CONTEXT` names (an unknown
/// name is an error), else the current one of the file (none when there is no file).
pub(crate) fn active() -> Result<Option<Ctx>> {
    let explicit = selected_name();
    let path = match path() {
        Ok(p) => p,
        Err(e) if explicit.is_some() => return Err(e),
        Err(_) => return Ok(None),
    };
    let all = Contexts::load(&path)?;
    match explicit {
        Some(name) => Ok(Some(all.require(name)?.clone())),
        None => Ok(all.current().cloned()),
    }
}

/// The token a context refers to (`env:VAR`, `file:PATH`); `None` for `credentials`,
/// which the caller looks up in the credentials file.
pub(crate) fn token_of(ctx: &Ctx) -> Result<Option<String>> {
    let r = ctx.token.trim();
    if let Some(var) = r.strip_prefix("env:") {
        return match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
            _ => Err(fail(
                exit::CONFIG,
                format!(
                    "context {:?} takes its token from ${var}, which is not set",
                    ctx.name
                ),
            )),
        };
    }
    if let Some(file) = r.strip_prefix("file:") {
        let t = std::fs::read_to_string(file).map_err(|e| {
            fail(
                exit::CONFIG,
                format!("context {:?} takes its token from {file}: {e}", ctx.name),
            )
        })?;
        return Ok(Some(t.trim().to_string()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn contexts_round_trip_privately_and_switch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        let mut all = Contexts::default();
        all.upsert_current(Ctx {
            name: "a".into(),
            controller: "127.0.0.1:1".into(),
            token: default_token_ref(),
            ..Ctx::default()
        });
        all.upsert_current(Ctx {
            name: "b".into(),
            controller: "127.0.0.1:2".into(),
            token: "env:B_TOKEN".into(),
            ..Ctx::default()
        });
        assert_eq!(all.current().unwrap().name, "b");
        all.save(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Contexts::load(&p).unwrap();
        assert_eq!(back.contexts, all.contexts);
        assert_eq!(back.name_for("127.0.0.1:1", "x"), "a");
        assert_eq!(back.name_for("127.0.0.1:3", "x"), "x");
        let e = back.require("c").unwrap_err().to_string();
        assert!(e.contains("known contexts: a, b"), "{e}");
    }
}
