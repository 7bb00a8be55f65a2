//! Saved credentials: `credentials.toml` in the config directory (`$SCABBARD_CONFIG_DIR`,
//! else `$XDG_CONFIG_HOME/scabbard`, else `~/.config/scabbard`), holding one entry per
//! controller (its address or address list, an API token, TLS files) and which entry is
//! current. `scabbard login` and `scabbard dev` write it; every client command reads it
//! for what its flags and environment do not give ([`resolve`]).
//!
//! The file holds secrets: it is written atomically (temporary file + rename) with mode
//! 0600 in a 0700 directory, and refused when other users may read it.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use scabbard_common::client::{ClientOptions, addresses};
use serde::{Deserialize, Serialize};

use crate::args::Target;

/// Name of the file in the config directory.
pub(crate) const FILE_NAME: &str = "credentials.toml";

/// Controller address used when neither a flag, the environment nor a saved entry gives one.
pub(crate) const DEFAULT_CONTROLLER: &str = "127.0.0.1:7400";

/// The config directory (not created).
pub(crate) fn config_dir() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("SCABBARD_CONFIG_DIR") {
        return Ok(d);
    }
    // The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    if let Some(d) = var("XDG_CONFIG_HOME").filter(|d| d.is_absolute()) {
        return Ok(d.join("scabbard"));
    }
    if let Some(h) = var("HOME") {
        return Ok(h.join(".config").join("scabbard"));
    }
    bail!("cannot tell where the config directory is: set SCABBARD_CONFIG_DIR or HOME")
}

/// Path of the credentials file.
pub(crate) fn path() -> Result<PathBuf> {
    Ok(config_dir()?.join(FILE_NAME))
}

/// The whole file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Credentials {
    /// Address (list) of the entry used when no controller is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) current: Option<String>,
    /// One entry per controller (or cluster).
    #[serde(default, rename = "controller")]
    pub(crate) controllers: Vec<Entry>,
}

/// What to use for one controller or cluster.
#[derive(Clone, Default, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// `host:port` or URL; several comma-separated for a cluster.
    pub(crate) address: String,
    /// The API token.
    pub(crate) token: String,
    /// Id of the token (as `WhoAmI` said at login), to revoke it later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token_id: Option<String>,
    /// Name of the token (as `WhoAmI` said at login).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token_name: Option<String>,
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

// Never print the token.
impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("address", &self.address)
            .field("token", &"***")
            .field("token_id", &self.token_id)
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

/// An address as compared: no scheme, no trailing slash, lower case.
fn normalize(addr: &str) -> String {
    let a = addr.trim();
    let a = a.split_once("://").map_or(a, |(_, rest)| rest);
    a.trim_end_matches('/').to_ascii_lowercase()
}

fn address_set(list: &str) -> Vec<String> {
    addresses(list).iter().map(|a| normalize(a)).collect()
}

impl Entry {
    /// Whether this entry is for (one of) the controllers in `list`.
    pub(crate) fn matches(&self, list: &str) -> bool {
        let mine = address_set(&self.address);
        address_set(list).iter().any(|a| mine.contains(a))
    }

    fn same_address(&self, list: &str) -> bool {
        let mut a = address_set(&self.address);
        let mut b = address_set(list);
        a.sort();
        b.sort();
        a == b
    }
}

impl Credentials {
    /// Reads `path`; a missing file is empty. Refuses a file other users may read or
    /// write: it holds tokens.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{} holds API tokens but other users may access it (mode {mode:o}); \
                 run `chmod 600 {}` (and consider revoking the tokens in it)",
                path.display(),
                path.display()
            );
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes the file atomically with mode 0600 (its directory 0700 when created).
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let mut text = String::from(
            "# Scabbard CLI credentials (written by `scabbard login` and `scabbard dev`).\n\
             # Holds API tokens: keep it private (mode 0600).\n\n",
        );
        text.push_str(&toml::to_string(self).context("encoding the credentials")?);
        write_private(path, text.as_bytes())
    }

    /// The entry for (one of) the controllers in `list`: one for exactly that list first.
    pub(crate) fn find(&self, list: &str) -> Option<&Entry> {
        self.controllers
            .iter()
            .find(|e| e.same_address(list))
            .or_else(|| self.controllers.iter().find(|e| e.matches(list)))
    }

    /// The current entry.
    pub(crate) fn current(&self) -> Option<&Entry> {
        let cur = self.current.as_deref()?;
        self.controllers.iter().find(|e| e.same_address(cur))
    }

    /// Adds `entry`, replacing any entry sharing an address with it; makes it current
    /// when `make_current` or when there is no current entry.
    pub(crate) fn upsert(&mut self, entry: Entry, make_current: bool) {
        self.controllers.retain(|e| !e.matches(&entry.address));
        if make_current || self.current().is_none() {
            self.current = Some(entry.address.clone());
        }
        self.controllers.push(entry);
    }

    /// Removes the entries sharing an address with `list`; returns them.
    pub(crate) fn remove(&mut self, list: &str) -> Vec<Entry> {
        let (gone, kept) = std::mem::take(&mut self.controllers)
            .into_iter()
            .partition(|e| e.matches(list));
        self.controllers = kept;
        if self.current().is_none() {
            self.current = None;
        }
        gone
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, then
/// rename), readable by the owner only; creates the directory (0700) if needed.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    if dir != Path::new(".") {
        scabbard_common::private::tighten(dir, scabbard_common::private::DIR_MODE)
            .with_context(|| format!("making {} private", dir.display()))?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".scabbard-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Where a command's token came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenSource {
    /// `--token` or `SCABBARD_TOKEN`.
    Given,
    /// The credentials file.
    File(PathBuf),
    /// The context's `env:VAR` or `file:PATH`.
    Context(String),
    /// Nowhere.
    None,
}

/// The controller to call and how, from flags and environment first, then the credentials
/// file.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// Address (list) to connect to.
    pub(crate) controller: String,
    /// Token and TLS settings.
    pub(crate) opts: ClientOptions,
    /// Where the token came from.
    pub(crate) source: TokenSource,
    /// The context used, if any.
    pub(crate) context: Option<String>,
}

impl Resolved {
    /// The token, or an error saying how to get one.
    pub(crate) fn token(&self) -> Result<&str> {
        match self.opts.token.as_deref() {
            Some(t) if !t.trim().is_empty() => Ok(t),
            _ => Err(crate::exit::fail(
                crate::exit::NOPERM,
                format!(
                    "no API token for controller {c}: run `scabbard login --controller {c}` \
                     (it prompts for the token), or set SCABBARD_TOKEN",
                    c = self.controller
                ),
            )),
        }
    }
}

/// Resolves `t`: the controller is `--controller`, else the selected context's
/// (`--context`, `SCABBARD_CONTEXT`, else the current context), else the current saved
/// entry's, else [`DEFAULT_CONTROLLER`]; the token is `--token`/`SCABBARD_TOKEN`, else
/// the context's `env:`/`file:` reference, else the saved entry for that controller; TLS
/// files are the flags' when any is given, else the context's, else the entry's.
pub(crate) fn resolve(t: &Target) -> Result<Resolved> {
    let given_token = t.token.clone().filter(|s| !s.trim().is_empty());
    // The context (`--context`, `SCABBARD_CONTEXT`, else the current one) stands in for
    // the flags not given; `--controller` replaces it.
    let context = match &t.controller {
        Some(_) => None,
        None => crate::contexts::active()?,
    };
    let creds = match path() {
        Ok(p) => match Credentials::load(&p) {
            Ok(c) => Some((c, p)),
            // A token was given: the file is not needed for it, so only warn.
            Err(e) if given_token.is_some() => {
                eprintln!("warning: ignoring the credentials file: {e:#}");
                None
            }
            Err(e) => return Err(crate::exit::fail(crate::exit::CONFIG, format!("{e:#}"))),
        },
        Err(e) if given_token.is_some() => {
            tracing::debug!("no credentials file: {e:#}");
            None
        }
        Err(e) => return Err(crate::exit::fail(crate::exit::CONFIG, format!("{e:#}"))),
    };
    let wanted = t
        .controller
        .clone()
        .or_else(|| context.as_ref().map(|c| c.controller.clone()));
    let entry = creds.as_ref().and_then(|(c, _)| match &wanted {
        Some(addr) => c.find(addr),
        None => c.current(),
    });
    let controller = wanted
        .or_else(|| entry.map(|e| e.address.clone()))
        .unwrap_or_else(|| DEFAULT_CONTROLLER.to_string());
    let context_token = match (&given_token, &context) {
        (None, Some(c)) => crate::contexts::token_of(c)?,
        _ => None,
    };
    let (token, source) = match (given_token, context_token, entry) {
        (Some(tok), _, _) => (Some(tok), TokenSource::Given),
        (None, Some(tok), _) => (
            Some(tok),
            TokenSource::Context(
                context
                    .as_ref()
                    .map(|c| c.token.clone())
                    .unwrap_or_default(),
            ),
        ),
        (None, None, Some(e)) if !e.token.is_empty() => (
            Some(e.token.clone()),
            TokenSource::File(creds.as_ref().map(|(_, p)| p.clone()).unwrap_or_default()),
        ),
        (None, None, _) => (None, TokenSource::None),
    };
    let tls_given = t.ca_cert.is_some() || t.client_cert.is_some() || t.client_key.is_some();
    let mut opts = ClientOptions {
        token,
        request_timeout: crate::args::request_timeout(),
        ..ClientOptions::default()
    };
    if tls_given {
        opts.ca_cert = t.ca_cert.clone();
        opts.client_cert = t.client_cert.clone();
        opts.client_key = t.client_key.clone();
    } else if let Some(c) = context
        .as_ref()
        .filter(|c| c.ca_cert.is_some() || c.client_cert.is_some() || c.client_key.is_some())
    {
        opts.ca_cert = c.ca_cert.clone();
        opts.client_cert = c.client_cert.clone();
        opts.client_key = c.client_key.clone();
    } else if let Some(e) = entry {
        opts.ca_cert = e.ca_cert.clone();
        opts.client_cert = e.client_cert.clone();
        opts.client_key = e.client_key.clone();
    }
    opts.tls_domain = t
        .tls_domain
        .clone()
        .or_else(|| context.as_ref().and_then(|c| c.tls_domain.clone()))
        .or_else(|| entry.and_then(|e| e.tls_domain.clone()));
    Ok(Resolved {
        controller,
        opts,
        source,
        context: context.map(|c| c.name),
    })
}

/// `p` made absolute (relative to the working directory), so a saved entry works from
/// anywhere.
pub(crate) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(addr: &str, token: &str) -> Entry {
        Entry {
            address: addr.into(),
            token: token.into(),
            ..Entry::default()
        }
    }

    #[test]
    fn finds_entries_by_any_shared_address() {
        let mut c = Credentials::default();
        c.upsert(entry("10.0.0.1:7400,10.0.0.2:7400", "a"), false);
        c.upsert(entry("http://127.0.0.1:7400", "b"), false);
        assert_eq!(c.find("10.0.0.2:7400").unwrap().token, "a");
        assert_eq!(c.find("127.0.0.1:7400/").unwrap().token, "b");
        assert!(c.find("10.0.0.3:7400").is_none());
        // The first entry became current; the second did not replace it.
        assert_eq!(c.current().unwrap().token, "a");
        c.upsert(entry("10.0.0.1:7400", "c"), true);
        assert_eq!(c.controllers.len(), 2);
        assert_eq!(c.current().unwrap().token, "c");
        assert_eq!(c.remove("10.0.0.1:7400").len(), 1);
        assert!(c.current().is_none());
    }

    #[test]
    fn saves_privately_and_refuses_a_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(FILE_NAME);
        let mut c = Credentials::default();
        let mut e = entry("127.0.0.1:7400", "scbd_api_secret");
        e.ca_cert = Some("/tmp/ca.pem".into());
        c.upsert(e, true);
        c.save(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let back = Credentials::load(&path).unwrap();
        assert_eq!(back.current().unwrap().token, "scbd_api_secret");
        assert_eq!(
            back.current().unwrap().ca_cert.as_deref(),
            Some(Path::new("/tmp/ca.pem"))
        );
        assert!(!format!("{back:?}").contains("scbd_api_secret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Credentials::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(
            Credentials::load(&dir.path().join("missing.toml"))
                .unwrap()
                .controllers
                .is_empty()
        );
    }
}
