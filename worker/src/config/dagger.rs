//! The `[dagger]` section of the worker configuration: how the `dagger` executor finds the
//! CLI and the engine, how often it checks that the engine answers, the GPUs it may hand
//! to containers, and the worker-side sources of the secrets, registry credentials, cache
//! volumes and host directories that container tasks may name ([`access`]: which projects
//! may use each). Secret values are never part of the configuration itself: it only says
//! where to read them (an environment variable or a file of the worker), when a task needs
//! them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use scabbard_common::{Error, Result};
use serde::Deserialize;

mod access;

pub use access::{CacheVolumeConfig, RegistryAuth, SecretSource, WorkerSecret, allows};

/// `[dagger]`: the Dagger executor (container and `dagger_call` tasks).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaggerConfig {
    /// Whether this worker runs `container` and `dagger_call` tasks at all. When true the
    /// worker probes the engine at start-up and every `probe_interval_ms`, and advertises
    /// the `dagger` capability only while the engine answers. Default: true.
    pub enabled: bool,
    /// Path of the `dagger` CLI (a bare name is looked up in `PATH`). Default: the
    /// worker's `_EXPERIMENTAL_DAGGER_CLI_BIN` if set, else `dagger` found in `PATH`. The
    /// worker starts one `dagger session` with it per container task, and runs
    /// `dagger call` with it for `dagger_call` tasks.
    pub cli: Option<PathBuf>,
    /// The engine the CLI connects to (e.g. `docker-container://dagger-engine`,
    /// `unix:///run/dagger/engine.sock`, `tcp://10.0.0.5:1234`), given to the CLI as
    /// `_EXPERIMENTAL_DAGGER_RUNNER_HOST`. Default: the worker's own
    /// `_EXPERIMENTAL_DAGGER_RUNNER_HOST` if set, else the CLI's default (an engine
    /// container it runs with Docker).
    pub runner_host: Option<String>,
    /// Never download anything. When no CLI is found the executor reports an
    /// infrastructure error naming what to install instead of fetching one, and the CLI
    /// runs with `DO_NOT_TRACK=1` (no telemetry). Default: true. With `false` a missing CLI
    /// is downloaded once by the Dagger SDK into its cache (`$XDG_CACHE_HOME/dagger`).
    pub offline: bool,
    /// How long `dagger session` may take to print its port and token, in milliseconds
    /// (the first session on a host may have to start the engine). Default: 60000.
    pub session_start_timeout_ms: u64,
    /// How often the worker checks again whether the engine answers, in milliseconds; the
    /// `dagger` capability comes and goes with the answer (the worker reconnects to the
    /// controller to advertise the change). 0 = only at start-up. Default: 60000.
    pub probe_interval_ms: u64,
    /// Bound on one check of the engine (starting a session and asking its version), in
    /// milliseconds. The first check delays the worker's start by at most this. Default:
    /// 30000.
    pub probe_timeout_ms: u64,
    /// Time between SIGTERM and SIGKILL when a `dagger session` or `dagger call` process
    /// group is stopped (timeout, cancel, end of the task), in milliseconds. Default: 5000.
    pub kill_grace_ms: u64,
    /// Absolute path of the host directory tree that container tasks may mount
    /// (`ContainerTask.directories`). A relative `host_path` is taken under it; an
    /// absolute one must lie inside it; neither may leave it through `..` or symlinks.
    /// Unset: tasks cannot mount host directories.
    pub workspace_root: Option<PathBuf>,
    /// Secret sources that container tasks name in `secrets[].source`, e.g.
    /// `npm_token = { env = "NPM_TOKEN", projects = ["web"] }` (a variable of the worker's
    /// environment) or `deploy_key = { file = "/etc/scabbard/deploy_key" }` (a file's
    /// content, without one trailing newline). `projects` lists the projects whose tasks may
    /// use the source; left out, every project may (the worker warns at start). Read when
    /// an allowed task needs them and handed to the engine as Dagger secrets: never stored,
    /// logged or put in a result.
    pub secrets: HashMap<String, WorkerSecret>,
    /// Registry credentials, keyed by the registry address that tasks name in
    /// `registry_auth`: `[dagger.registries."ghcr.io"]` with `username = "bot"`,
    /// `password_env = "GHCR_TOKEN"` or `password_file = "/path"`, and `projects`. The
    /// password is a Dagger secret, read when an allowed task needs it (to pull, and to
    /// push with `publish`).
    pub registries: HashMap<String, RegistryAuth>,
    /// Cache volumes with rules, keyed by the volume name tasks use in `caches[].volume`:
    /// `[dagger.caches.gomod]` with `projects = ["web"]` (who may mount it; left out,
    /// every project) and `shared = true` (one volume for every allowed project). A volume
    /// that is not shared — every volume not listed here included — is namespaced by
    /// project: the engine's volume is `<project>/<volume>`.
    pub caches: HashMap<String, CacheVolumeConfig>,
    /// GPUs this worker hands to containers (`ContainerTask.gpus`): `["all"]` for every
    /// GPU of the host, or a list of device ids such as `["0", "1"]`. Empty (default): no
    /// GPUs, and tasks asking for some fail. A worker with GPUs advertises the `gpu`
    /// capability while its engine answers.
    pub gpus: Vec<String>,
}

impl Default for DaggerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cli: None,
            runner_host: None,
            offline: true,
            session_start_timeout_ms: 60_000,
            probe_interval_ms: 60_000,
            probe_timeout_ms: 30_000,
            kill_grace_ms: 5_000,
            workspace_root: None,
            secrets: HashMap::new(),
            registries: HashMap::new(),
            caches: HashMap::new(),
            gpus: Vec::new(),
        }
    }
}

impl DaggerConfig {
    /// Refuses a section that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::invalid(format!("dagger.{field} {why}")));
        if self.cli.as_ref().is_some_and(|c| c.as_os_str().is_empty()) {
            return bad(
                "cli",
                "must not be empty (leave it out to use `dagger` from PATH)",
            );
        }
        if let Some(host) = &self.runner_host
            && !host.contains("://")
        {
            return bad(
                "runner_host",
                &format!("must be a URL such as unix:///run/dagger/engine.sock, got {host:?}"),
            );
        }
        if self.session_start_timeout_ms == 0 {
            return bad("session_start_timeout_ms", "must be > 0");
        }
        if self.probe_timeout_ms == 0 {
            return bad("probe_timeout_ms", "must be > 0");
        }
        if self.probe_interval_ms != 0 && self.probe_interval_ms < 1_000 {
            return bad(
                "probe_interval_ms",
                &format!(
                    "must be 0 (start-up only) or >= 1000, got {}",
                    self.probe_interval_ms
                ),
            );
        }
        if self.kill_grace_ms > 600_000 {
            return bad("kill_grace_ms", "must be <= 600000");
        }
        if let Some(root) = &self.workspace_root
            && !root.is_absolute()
        {
            return bad(
                "workspace_root",
                &format!("must be an absolute path, got {}", root.display()),
            );
        }
        check_gpus(&self.gpus)?;
        access::validate(self)?;
        Ok(())
    }

    /// [`Self::session_start_timeout_ms`].
    pub fn session_start_timeout(&self) -> Duration {
        Duration::from_millis(self.session_start_timeout_ms)
    }

    /// [`Self::probe_timeout_ms`].
    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.probe_timeout_ms)
    }

    /// [`Self::probe_interval_ms`]; `None` = never probe again.
    pub fn probe_interval(&self) -> Option<Duration> {
        (self.probe_interval_ms > 0).then(|| Duration::from_millis(self.probe_interval_ms))
    }

    /// [`Self::kill_grace_ms`].
    pub fn kill_grace(&self) -> Duration {
        Duration::from_millis(self.kill_grace_ms)
    }
}

/// `["all"]`, or distinct device ids (no spaces or commas).
fn check_gpus(gpus: &[String]) -> Result<()> {
    let bad = |why: String| Err(Error::invalid(format!("dagger.gpus {why}")));
    if gpus.iter().any(|g| g == ALL_GPUS) && gpus.len() > 1 {
        return bad(format!(
            "must be [\"{ALL_GPUS}\"] alone or a list of device ids, got {gpus:?}"
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for g in gpus {
        if g.is_empty() || g.contains(|c: char| c.is_whitespace() || c == ',') {
            return bad(format!("has an invalid device id {g:?}"));
        }
        if !seen.insert(g) {
            return bad(format!("lists device {g:?} twice"));
        }
    }
    Ok(())
}

impl DaggerConfig {
    /// Whether this worker has GPUs to hand to containers (it then advertises `gpu`).
    pub fn has_gpus(&self) -> bool {
        !self.gpus.is_empty()
    }

    /// The sources open to every project (no `projects` list), to warn about at start:
    /// `dagger.secrets.<name>`, `dagger.registries."<address>"`, and shared cache volumes.
    pub fn open_to_every_project(&self) -> Vec<String> {
        access::open_to_every_project(self)
    }
}

/// The `gpus` value that means every GPU of the host.
pub const ALL_GPUS: &str = "all";

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
    fn defaults_are_offline_and_enabled() {
        let cfg = parse("").unwrap();
        assert!(cfg.enabled && cfg.offline);
        assert_eq!(cfg.probe_interval(), Some(Duration::from_secs(60)));
        assert!(cfg.workspace_root.is_none() && cfg.secrets.is_empty());
    }

    #[test]
    fn full_section_parses() {
        let cfg = parse(
            r#"
            [dagger]
            cli = "/opt/dagger/bin/dagger"
            runner_host = "unix:///run/dagger/engine.sock"
            offline = true
            session_start_timeout_ms = 5000
            probe_interval_ms = 0
            workspace_root = "/srv/ws"
            [dagger.secrets]
            npm = { env = "NPM_TOKEN" }
            key = { file = "/etc/key" }
            [dagger.registries."ghcr.io"]
            username = "bot"
            password_env = "GHCR_TOKEN"
            "#,
        )
        .unwrap();
        assert_eq!(
            cfg.secrets["npm"].source,
            SecretSource::Env("NPM_TOKEN".into())
        );
        assert_eq!(
            cfg.secrets["key"].source,
            SecretSource::File("/etc/key".into())
        );
        assert_eq!(
            cfg.registries["ghcr.io"].password_source(),
            Some(SecretSource::Env("GHCR_TOKEN".into()))
        );
        assert_eq!(cfg.probe_interval(), None);
        assert!(!cfg.has_gpus());
    }

    #[test]
    fn gpus_are_all_or_device_ids() {
        let cfg = parse("[dagger]\ngpus = [\"all\"]").unwrap();
        assert!(cfg.has_gpus());
        let cfg = parse("[dagger]\ngpus = [\"0\", \"GPU-8f2c\"]").unwrap();
        assert_eq!(cfg.gpus, ["0", "GPU-8f2c"]);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[dagger]\nrunner_host = \"engine\"", "dagger.runner_host"),
            (
                "[dagger]\nsession_start_timeout_ms = 0",
                "dagger.session_start_timeout_ms",
            ),
            (
                "[dagger]\nprobe_interval_ms = 10",
                "dagger.probe_interval_ms",
            ),
            ("[dagger]\nworkspace_root = \"ws\"", "dagger.workspace_root"),
            (
                "[dagger.secrets]\nx = { file = \"rel\" }",
                "dagger.secrets.x",
            ),
            (
                "[dagger.secrets]\n\"a b\" = { env = \"X\" }",
                "dagger.secrets.\"a b\"",
            ),
            (
                "[dagger.registries.\"ghcr.io\"]\nusername = \"u\"",
                "password_env and password_file",
            ),
            (
                "[dagger.registries.\"ghcr.io\"]\npassword_env = \"P\"",
                "dagger.registries.\"ghcr.io\".username",
            ),
            (
                "[dagger.secrets]\nx = { url = \"y\" }",
                "unknown field `url`",
            ),
            ("[dagger]\ngpus = [\"all\", \"0\"]", "dagger.gpus"),
            ("[dagger]\ngpus = [\"0\", \"0\"]", "dagger.gpus"),
            ("[dagger]\ngpus = [\"0,1\"]", "dagger.gpus"),
            ("[dagger]\nsurprise = 1", "surprise"),
        ];
        for (text, field) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
