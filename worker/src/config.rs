//! Worker configuration (TOML file, then env and flags in the CLI), checked up front.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use scabbard_common::{Error, Result};
use serde::Deserialize;

mod dagger;

pub use dagger::{
    ALL_GPUS, CacheVolumeConfig, DaggerConfig, RegistryAuth, SecretSource, WorkerSecret, allows,
};

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
    /// Agent identity and the log spool.
    pub data_dir: PathBuf,
    /// Parent of per-attempt working directories (default: `<data_dir>/work`).
    pub work_dir: Option<PathBuf>,
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
    /// The `dagger` executor (`[dagger]` section).
    pub dagger: DaggerConfig,
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
            default_task_timeout_ms: 3_600_000,
            max_reconnect_backoff_ms: 3_000,
            shutdown_grace_ms: 600_000,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            tls_domain: None,
            dagger: DaggerConfig::default(),
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
        self.dagger.validate()
    }

    /// How to connect to the controller (TLS settings; the token is sent per call).
    pub fn client_options(&self) -> scabbard_common::client::ClientOptions {
        scabbard_common::client::ClientOptions {
            token: None,
            ca_cert: self.ca_cert.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
            tls_domain: self.tls_domain.clone(),
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

    /// Reconnect backoff cap.
    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_reconnect_backoff_ms.max(100))
    }
}
