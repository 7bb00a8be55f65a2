//! One session's view of the engine: the shared state directory and fixtures, plus what is
//! per session in Dagger — secret values (by name, last writer wins) and which exec results
//! this session already evaluated (each is logged and reported once per session).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

use crate::error::Failure;
use crate::store::Store;

/// Where the engine lives and what it may touch, from the runner host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EngineConfig {
    /// The engine's state directory.
    pub(crate) state: PathBuf,
    /// The fixtures directory (the outside world), if any.
    pub(crate) fixtures: Option<PathBuf>,
}

/// How execs are isolated on this host.
#[derive(Debug, Clone)]
pub(crate) struct Isolation {
    /// util-linux `unshare`.
    pub(crate) unshare: PathBuf,
    /// Whether we are root (else a user namespace maps us to root).
    pub(crate) root: bool,
}

/// A session of the engine.
pub(crate) struct Engine {
    pub(crate) store: Store,
    pub(crate) fixtures: Option<PathBuf>,
    /// Base of relative host paths (the session's `--workdir`, else its cwd).
    pub(crate) host_cwd: PathBuf,
    /// Short id of this session, in logs and records.
    pub(crate) session_id: String,
    pub(crate) isolation: Isolation,
    /// Fires when the session shuts down: running execs are killed.
    pub(crate) shutdown: CancellationToken,
    /// The runtime, for execs driven from blocking resolver threads.
    pub(crate) handle: tokio::runtime::Handle,
    secrets: Mutex<HashMap<String, String>>,
    evaluated: Mutex<HashSet<String>>,
    exec_counter: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// A session over `config`.
    pub(crate) fn new(
        config: &EngineConfig,
        host_cwd: PathBuf,
        isolation: Isolation,
        shutdown: CancellationToken,
        handle: tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        Ok(Self {
            store: Store::open(&config.state)?,
            fixtures: config.fixtures.clone(),
            host_cwd,
            session_id: format!("{:08x}", rand::random::<u32>()),
            isolation,
            shutdown,
            handle,
            secrets: Mutex::default(),
            evaluated: Mutex::default(),
            exec_counter: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The fixtures directory, or an error saying `what` needs one.
    pub(crate) fn fixtures(&self, what: &str) -> Result<&Path, Failure> {
        self.fixtures.as_deref().ok_or_else(|| {
            Failure::engine(format!(
                "fake engine: {what} needs a fixtures directory (runner host fake://<state>?fixtures=<dir>)"
            ))
        })
    }

    /// A host path as the session sees it (relative to its working directory).
    pub(crate) fn host_path(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.host_cwd.join(p)
        }
    }

    /// Writes one progress line to the session's stderr.
    pub(crate) fn progress(&self, line: &str) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
        let _ = err.flush();
    }

    /// A label for the next exec's output lines.
    pub(crate) fn exec_label(&self, key: &str) -> String {
        let n = self
            .exec_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}.{n}", &key[..6.min(key.len())])
    }

    /// Stores a secret's value for this session.
    pub(crate) fn set_secret(&self, name: &str, plaintext: &str) {
        self.secrets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), plaintext.to_string());
    }

    /// A secret's value in this session.
    pub(crate) fn secret(&self, name: &str) -> Result<String, Failure> {
        self.secrets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| {
                Failure::engine(format!(
                    "fake engine: secret {name:?} is not set in this session"
                ))
            })
    }

    /// Whether this session already evaluated exec `key`.
    pub(crate) fn was_evaluated(&self, key: &str) -> bool {
        self.evaluated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    /// Notes that this session evaluated exec `key`.
    pub(crate) fn mark_evaluated(&self, key: &str) {
        self.evaluated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_string());
    }
}
