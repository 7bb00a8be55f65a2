//! What the engine records for tests to read: one line per exec evaluation in
//! `<state>/execs.jsonl`, one line per image push in `<fixtures>/pushes.jsonl`.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One exec evaluation: a real run (`cached: false`) or an answer from the engine's cache
/// (`cached: true`, once per session that needed it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    /// The exec's cache key (hex SHA-256 of its op chain).
    pub key: String,
    /// Its argv.
    pub args: Vec<String>,
    /// The image at the root of its chain (`None`: a scratch container).
    pub image: Option<String>,
    /// Its working directory.
    pub workdir: String,
    /// Whether the result came from the cache (no process ran).
    pub cached: bool,
    /// The exit code (of the run this result came from).
    pub exit_code: i32,
    /// When it was evaluated, in ms since the Unix epoch.
    pub at_ms: u64,
    /// The session that evaluated it.
    #[serde(default)]
    pub session: String,
    /// The plain environment variables of the container (secret variables are not here).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of the secret variables it had (values are never recorded).
    #[serde(default)]
    pub secret_env: Vec<String>,
    /// Cache volumes mounted, as `key:path`.
    #[serde(default)]
    pub caches: Vec<String>,
}

/// One image push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    /// The address pushed to, as given to `publish`.
    pub address: String,
    /// Hex SHA-256 of the pushed image (the tar under `registry/sha256/`).
    pub digest: String,
    /// When, in ms since the Unix epoch.
    pub at_ms: u64,
    /// The image's entrypoint (`withEntrypoint`), if set.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
}

/// Reads a JSON-lines file; a missing file is empty. A line that does not parse is an error
/// (the engine writes whole lines under a lock).
pub(crate) fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Vec<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: bad line {l:?}: {e}", path.display()),
                )
            })
        })
        .collect()
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
