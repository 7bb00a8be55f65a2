//! Worker configuration (TOML file, then env and flags in the CLI), checked up front.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use scabbard_common::{Error, Result};
use serde::Deserialize;

mod dagger;
mod shell;

pub use dagger::{
    ALL_GPUS, CacheVolumeConfig, DaggerConfig, RegistryAuth, SecretSource, WorkerSecret, allows,
};
pub use shell::{Hide, RunAs, ShellConfig};

/// Default bound of the artifact cache: 10 GiB.
pub const DEFAULT_ARTIFACT_CACHE_BYTES: u64 = 10 << 30;

/// Smallest `artifact_cache_bytes` accepted.
const MIN_ARTIFACT_CACHE_BYTES: u64 = 1 << 20;

/// Everything a worker needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Controller address (`host:port` or URL); several, comma-separated, for a cluster
    /// (the worker follows redirects to the leader).
    pub controller: String,
    /// Registration token (needed for the first start; later the agent token in
    /// `data_dir` is used).
    pub registration_token: String,
    /// Agent name shown in listings (default: host name).
    pub name: String,
    /// Labels tasks can select on.
    pub labels: HashMap<String, String>,
    /// How many attempts run at once.
    pub slots: u32,
    /// Agent identity, the log spool and the artifact cache (mode 0700, files 0600; 0711
    /// when `shell.run_as` is set and the work dir is inside it).
    pub data_dir: PathBuf,
    /// Parent of per-attempt working directories (default: `<data_dir>/work`).
    pub work_dir: Option<PathBuf>,
    /// Bound of the cache of downloaded input artifacts (`<data_dir>/artifact-cache`), in
    /// bytes of unpacked content. Least recently used entries that no running attempt
    /// uses are evicted beyond it. Default: 10 GiB.
    pub artifact_cache_bytes: u64,
    /// Timeout for tasks that carry none (milliseconds).
    pub default_task_timeout_ms: u64,
    /// Longest wait between reconnect attempts (milliseconds).
    pub max_reconnect_backoff_ms: u64,
    /// On shutdown, how long running tasks may take to finish and report (milliseconds);
    /// after that the worker exits and its tasks are requeued by the controller.
    pub shutdown_grace_ms: u64,
    /// PEM CA certificate the controller's certificate is verified against; setting it
    /// (or an `https://` controller address) turns TLS on.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (its CN or a DNS name must be the agent's
    /// name; it is the default name when `name` is empty).
    pub client_cert: Option<PathBuf>,
    /// PEM key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Name the controller's certificate must carry (default: the address's host).
    pub tls_domain: Option<String>,
    /// Where Prometheus metrics are served (`GET /metrics`, plain HTTP, no auth); unset = off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The `dagger` executor (`[dagger]` section).
    pub dagger: DaggerConfig,
    /// The `shell` executor (`[shell]` section).
    pub shell: ShellConfig,
    /// Traces (`[telemetry]`: `otlp_endpoint`, `service_name`, `sampler`, `sampler_arg`);
    /// the `OTEL_*` variables override it. Read by the binary before logging starts.
    pub telemetry: scabbard_common::telemetry::TelemetryConfig,
    /// The file this configuration was read from, if any (set by the CLI, not in the file):
    /// with `shell.run_as` the worker checks that tasks cannot read it.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            controller: "127.0.0.1:7400".into(),
            registration_token: String::new(),
            name: String::new(),
            labels: HashMap::new(),
            slots: 4,
            data_dir: PathBuf::from("./scabbard-worker"),
            work_dir: None,
            artifact_cache_bytes: DEFAULT_ARTIFACT_CACHE_BYTES,
            default_task_timeout_ms: 3_600_000,
            max_reconnect_backoff_ms: 3_000,
            shutdown_grace_ms: 600_000,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            tls_domain: None,
            metrics_listen: None,
            dagger: DaggerConfig::default(),
            shell: ShellConfig::default(),
            telemetry: Default::default(),
            config_file: None,
        }
    }
}

impl WorkerConfig {
    /// Parses a TOML file; unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::invalid(format!("worker config: {e}")))
    }

    /// Refuses configurations that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.telemetry.validate()?;
        if self.controller.trim().is_empty() {
            return Err(Error::invalid(
                "controller address is required (--controller)",
            ));
        }
        // Also reads and checks the TLS files, naming any that is missing or malformed.
        let opts = self.client_options();
        for addr in scabbard_common::client::addresses(&self.controller) {
            scabbard_common::client::endpoint_with(&addr, &opts)?;
        }
        if self.slots == 0 || self.slots > 4096 {
            return Err(Error::invalid(format!(
                "slots must be 1..=4096, got {}",
                self.slots
            )));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(Error::invalid("data_dir must not be empty"));
        }
        if self.default_task_timeout_ms == 0 {
            return Err(Error::invalid("default_task_timeout_ms must be > 0"));
        }
        if self.artifact_cache_bytes < MIN_ARTIFACT_CACHE_BYTES {
            return Err(Error::invalid(format!(
                "artifact_cache_bytes must be at least {MIN_ARTIFACT_CACHE_BYTES} (1 MiB), got {}",
                self.artifact_cache_bytes
            )));
        }
        if let Some(w) = &self.work_dir
            && (w.as_os_str().is_empty() || self.data_dir.starts_with(w))
        {
            return Err(Error::invalid(format!(
                "work_dir must be a directory of its own, not {} (the data dir or one of its parents)",
                w.display()
            )));
        }
        self.dagger.validate()?;
        self.shell.validate()
    }

    /// How to connect to the controller (TLS settings; the token is sent per call).
    pub fn client_options(&self) -> scabbard_common::client::ClientOptions {
        scabbard_common::client::ClientOptions {
            token: None,
            ca_cert: self.ca_cert.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
            tls_domain: self.tls_domain.clone(),
            request_timeout: None,
        }
    }

    /// The agent name to register with: `name`, else the client certificate's name, else
    /// the host name (`None`: let the caller pick).
    pub fn effective_name(&self) -> Result<Option<String>> {
        if !self.name.is_empty() {
            return Ok(Some(self.name.clone()));
        }
        match &self.client_cert {
            Some(c) => Ok(scabbard_common::tls::pem_file_names(c, "client_cert")?
                .primary()
                .map(str::to_string)),
            None => Ok(None),
        }
    }

    /// Where attempts get their working directories.
    pub fn work_root(&self) -> PathBuf {
        self.work_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("work"))
    }

    /// Where downloaded input artifacts are cached.
    pub fn artifact_cache_dir(&self) -> PathBuf {
        self.data_dir.join("artifact-cache")
    }

    /// Reconnect backoff cap.
    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_reconnect_backoff_ms.max(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_and_cache_keys_parse_and_default() {
        let cfg = WorkerConfig::from_toml("").unwrap();
        assert_eq!(cfg.artifact_cache_bytes, 10 << 30);
        assert!(cfg.shell.run_as.is_none());
        assert_eq!(
            cfg.artifact_cache_dir(),
            cfg.data_dir.join("artifact-cache")
        );
        let cfg = WorkerConfig::from_toml(
            "artifact_cache_bytes = 1073741824\n[shell]\nrun_as = \"nobody\"\nunshare = \"/usr/bin/unshare\"",
        )
        .unwrap();
        assert_eq!(cfg.artifact_cache_bytes, 1 << 30);
        assert_eq!(cfg.shell.run_as.as_deref(), Some("nobody"));
        cfg.validate().expect("tests run as root with util-linux");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("artifact_cache_bytes = 10", "artifact_cache_bytes"),
            ("[shell]\nrun_as = \"root\"", "shell.run_as"),
            ("[shell]\nrun_as = \"no-such-user-x\"", "shell.run_as"),
            (
                "[shell]\nrun_as = \"nobody\"\nunshare = \"/nope/unshare\"",
                "shell.unshare",
            ),
            ("[shell]\nsurprise = 1", "surprise"),
            (
                "data_dir = \"/var/lib/w\"\nwork_dir = \"/var/lib\"",
                "work_dir",
            ),
        ];
        for (text, field) in cases {
            let err = WorkerConfig::from_toml(text)
                .and_then(|c| c.validate())
                .expect_err(text)
                .to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
