//! Controller configuration: one struct read from a TOML file, then overridden by
//! environment and flags (in the CLI). Checked up front by [`ControllerConfig::validate`]:
//! a bad value stops the process before it binds anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use scabbard_common::{Error, Result};
use serde::{Deserialize, Serialize};

/// Everything a controller needs to run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Where Prometheus metrics are served (`GET /metrics`, plain HTTP, no auth); unset = off.
    pub metrics_listen: Option<SocketAddr>,
    /// Traces (`[telemetry]`: `otlp_endpoint`, `service_name`, `sampler`, `sampler_arg`);
    /// the `OTEL_*` variables override it. Read by the binary before logging starts.
    pub telemetry: scabbard_common::telemetry::TelemetryConfig,
    /// Where the HTTP/JSON API is served (`/api/v1`, same tokens as gRPC); unset = off.
    pub http_listen: Option<SocketAddr>,
    /// Where the embedded store and the task logs live.
    pub data_dir: PathBuf,
    /// A static registration token workers may present to `AgentService.Register`, next
    /// to the ones created with `scabbard token create --kind registration` (optional;
    /// at least 16 characters when set).
    pub registration_token: String,
    /// File holding the admin token to create on the first start of an empty cluster
    /// (automation). Without it (and without `SCABBARD_BOOTSTRAP_TOKEN`) one is generated
    /// and printed once.
    pub bootstrap_token_file: Option<PathBuf>,
    /// The bootstrap admin token itself (from `SCABBARD_BOOTSTRAP_TOKEN` or `scabbard dev`;
    /// never read from the config file).
    #[serde(skip)]
    pub bootstrap_token: Option<String>,
    /// Requests per second allowed per token whose project sets no rate (0 = unlimited).
    /// Agent tokens are exempt from this default (their work rides one Session stream);
    /// a project's own rate applies to them too.
    pub rate_limit_per_second: u32,
    /// Burst above `rate_limit_per_second`.
    pub rate_limit_burst: u32,
    /// Most gRPC calls handled at once; calls beyond are refused at once with
    /// `RESOURCE_EXHAUSTED` and a retry hint (0 = unlimited). Streams count only until
    /// their response starts.
    pub max_concurrent_requests: usize,
    /// Deadline of a call's handler (milliseconds; 0 = none): unanswered calls get
    /// `DEADLINE_EXCEEDED`. Streams are bounded only until their response starts.
    pub rpc_timeout_ms: u64,
    /// How often workers heartbeat (milliseconds).
    pub heartbeat_interval_ms: u64,
    /// How long an agent may be silent or disconnected before its attempts are requeued
    /// as infrastructure failures (milliseconds).
    pub agent_lease_ttl_ms: u64,
    /// Timeout of a task that sets none (milliseconds).
    pub default_task_timeout_ms: u64,
    /// Longest timeout a task may ask for (milliseconds).
    pub max_task_timeout_ms: u64,
    /// How often a task may be requeued after infrastructure failures, unless it says.
    pub default_max_infra_retries: u32,
    /// Largest gRPC message accepted (bytes).
    pub max_message_bytes: usize,
    /// Most tasks waiting in the queue; submits beyond get `RESOURCE_EXHAUSTED`.
    pub max_queued_tasks: usize,
    /// Largest task spec (encoded, secrets sealed) a submit may carry, alone or as a
    /// workflow node; bigger ones get `INVALID_ARGUMENT` naming this key.
    pub max_spec_bytes: usize,
    /// Largest result (encoded: outcome, message, outputs, artifact refs) an attempt may
    /// report; a bigger one ends the attempt FAILED with the sizes and this key named.
    pub max_result_bytes: usize,
    /// Largest total of an attempt's outputs (names and values); more ends the attempt
    /// FAILED like an oversized result.
    pub max_outputs_bytes: usize,
    /// Largest workflow (its whole encoded spec, every node's task included) a submit,
    /// template run or schedule tick may start. Workflows are stored one record per node,
    /// so this bounds memory and the submit, not one store value.
    pub max_workflow_bytes: usize,
    /// TTL of the leader's lease: a dead leader is replaced within about this long
    /// (milliseconds).
    pub leader_lease_ttl_ms: u64,
    /// Address other controllers, workers and clients are redirected to when this
    /// controller leads (default: the listen address).
    pub advertise_addr: Option<String>,
    /// Where this controller, while it leads, keeps live task logs (default
    /// `<data_dir>/logs`). Not shared between controllers: finished attempts' logs are
    /// archived in the artifact store, and workers replay the live part to a new leader.
    pub logs_dir: Option<PathBuf>,
    /// State store backend: `embedded` (single node) or `etcd`.
    pub store: String,
    /// etcd settings (with `store = "etcd"`).
    pub etcd: crate::store::EtcdConfig,
    /// TLS on the listener and mutual TLS for workers (`[tls]`; plaintext without it).
    pub tls: crate::tls::TlsConfig,
    /// File holding the key that seals task secrets (`secret_env`) in the store: 32 random
    /// bytes, hex (`openssl rand -hex 32`). The same file on every controller of a cluster.
    /// Unset: `<data_dir>/secrets.key`, generated on first start (embedded store); with
    /// `store = "etcd"` tasks carrying secrets are refused.
    pub secrets_key_file: Option<PathBuf>,
    /// Consecutive failures that open a circuit breaker (an agent, a template step, a named
    /// dependency).
    pub breaker_threshold: u32,
    /// How long an open breaker waits before letting a probe through (milliseconds);
    /// doubles after each failed probe up to ten times this.
    pub breaker_open_ms: u64,
    /// Directory of user workflow templates (`*.yaml`, `*.yml`), loaded at start next to
    /// the built-in ones. A broken file stops the controller with the file and field named.
    pub templates_dir: Option<PathBuf>,
    /// How long a container task may wait for a worker whose engine has its image (or cache
    /// volumes) warm when only colder workers have a free slot (milliseconds; 0 = never
    /// wait).
    pub cache_affinity_wait_ms: u64,
    /// The artifact store (`[artifacts]`): a directory on this controller's disk by default,
    /// or an S3-compatible bucket; and the size limits of artifacts.
    /// Fairness and resource bounds (see README "Limits under abuse"):
    /// shortest interval between two ticks of a cron schedule (milliseconds).
    pub min_schedule_interval_ms: u64,
    /// Most schedules one project may have (0 = unlimited).
    pub max_schedules_per_project: u32,
    /// Bytes a Watch stream may hold for a client that does not read; beyond, the stream
    /// ends with `RESOURCE_EXHAUSTED` ("consumer too slow; resubscribe").
    pub max_stream_buffer_bytes: usize,
    /// Most Watch/Logs streams one token may have open at once (0 = unlimited).
    pub max_streams_per_token: u32,
    /// A new connection that has not sent its first bytes of the HTTP/2 (or TLS) handshake
    /// within this long is closed (milliseconds; gRPC and metrics listeners).
    pub handshake_timeout_ms: u64,
    /// Most open connections from one IP address per listener; more are refused (0 =
    /// unlimited).
    pub max_connections_per_ip: usize,
    /// Messages queued for one agent session; when the agent does not read them in time the
    /// session is closed (it reconnects and resynchronises) instead of dropping any.
    pub agent_queue_capacity: usize,
    /// An Assign the agent has not accepted within this long is requeued elsewhere (its
    /// attempt fenced off: a late accept is refused) (milliseconds; 0 = never).
    pub assign_accept_timeout_ms: u64,
    /// Finished tasks the core keeps in memory (most recently finished first); older ones
    /// are served from the store (see docs/history.md).
    pub finished_cache_tasks: usize,
    /// Finished workflows the core keeps in memory (most recently finished first); older
    /// ones are served from the store (see docs/history.md).
    pub finished_cache_workflows: usize,
    /// How long an idempotency key is honoured after its task was submitted
    /// (milliseconds): a later submit with the same key creates a new task.
    pub idempotency_window_ms: u64,
    pub artifacts: crate::artifacts::ArtifactsConfig,
    /// How long finished tasks, workflows, their logs and artifacts, and audit entries are
    /// kept (days; fractions allowed, e.g. `0.0001` ≈ 8.6 s for tests). A project's own
    /// `retention_days` overrides it. See docs/retention.md.
    pub retention_days: f64,
    /// How often the leader's retention sweeper starts a round (milliseconds).
    pub retention_sweep_interval_ms: u64,
    /// Where schedules read the time (the system clock; a manual one in tests). Never read
    /// from the config file.
    #[serde(skip)]
    pub clock: ClockHandle,
}

/// Default of [`ControllerConfig::retention_days`].
pub const DEFAULT_RETENTION_DAYS: f64 = 30.0;
/// Longest retention a controller or project may set (100 years).
pub const MAX_RETENTION_DAYS: f64 = 36_500.0;

/// Checks a retention in days (`what` names the setting in the error).
pub fn check_retention_days(what: &str, days: f64) -> Result<()> {
    if days.is_finite() && days > 0.0 && days <= MAX_RETENTION_DAYS {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{what} must be a number of days above 0 and at most {MAX_RETENTION_DAYS} (fractions allowed: 0.5 = 12 hours), not {days}"
    )))
}

/// Default of [`ControllerConfig::max_spec_bytes`].
pub const DEFAULT_MAX_SPEC_BYTES: usize = 256 * 1024;
/// Default of [`ControllerConfig::max_result_bytes`].
pub const DEFAULT_MAX_RESULT_BYTES: usize = 256 * 1024;
/// Default of [`ControllerConfig::max_outputs_bytes`].
pub const DEFAULT_MAX_OUTPUTS_BYTES: usize = 128 * 1024;
/// Default of [`ControllerConfig::max_workflow_bytes`].
pub const DEFAULT_MAX_WORKFLOW_BYTES: usize = 8 * 1024 * 1024;

/// What a task record holds besides its spec and its final result (kept twice: as the
/// task's and its last attempt's): ids, timestamps, and every earlier attempt compacted
/// (no outputs, message cut to [`crate::core::validate::size::ATTEMPT_MESSAGE_BYTES`]).
pub const TASK_RECORD_OVERHEAD_BYTES: usize = 256 * 1024;

/// A shareable clock for [`ControllerConfig::clock`].
#[derive(Clone)]
pub struct ClockHandle(pub std::sync::Arc<dyn crate::schedules::Clock>);

impl Default for ClockHandle {
    fn default() -> Self {
        Self(std::sync::Arc::new(crate::schedules::SystemClock))
    }
}

impl std::fmt::Debug for ClockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClockHandle(now_ms = {})", self.0.now_ms())
    }
}

/// Default per-token request rate: far above what CI clients send (a submit per job, a
/// Get or a stream now and then), far below what one token flooding the controller would.
pub const DEFAULT_RATE_LIMIT: u32 = 500;
/// Default burst above [`DEFAULT_RATE_LIMIT`] (a 1,000-task matrix submitted at once).
pub const DEFAULT_RATE_BURST: u32 = 1_000;

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7400".parse().expect("static address"),
            metrics_listen: None,
            telemetry: Default::default(),
            http_listen: None,
            data_dir: PathBuf::from("./scabbard-data"),
            registration_token: String::new(),
            bootstrap_token_file: None,
            bootstrap_token: None,
            rate_limit_per_second: DEFAULT_RATE_LIMIT,
            rate_limit_burst: DEFAULT_RATE_BURST,
            max_concurrent_requests: 10_000,
            rpc_timeout_ms: 30_000,
            heartbeat_interval_ms: 2_000,
            agent_lease_ttl_ms: 10_000,
            default_task_timeout_ms: 3_600_000,
            max_task_timeout_ms: 7 * 24 * 3_600_000,
            default_max_infra_retries: 3,
            max_message_bytes: scabbard_common::client::MAX_MESSAGE_BYTES,
            max_queued_tasks: 1_000_000,
            max_spec_bytes: DEFAULT_MAX_SPEC_BYTES,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_outputs_bytes: DEFAULT_MAX_OUTPUTS_BYTES,
            max_workflow_bytes: DEFAULT_MAX_WORKFLOW_BYTES,
            leader_lease_ttl_ms: 3_000,
            advertise_addr: None,
            logs_dir: None,
            store: "embedded".into(),
            etcd: crate::store::EtcdConfig::default(),
            tls: crate::tls::TlsConfig::default(),
            secrets_key_file: None,
            breaker_threshold: 5,
            breaker_open_ms: 30_000,
            templates_dir: None,
            cache_affinity_wait_ms: 2_000,
            min_schedule_interval_ms: 60_000,
            max_schedules_per_project: 100,
            max_stream_buffer_bytes: 4 << 20,
            max_streams_per_token: 128,
            handshake_timeout_ms: 10_000,
            max_connections_per_ip: 4_096,
            agent_queue_capacity: 4_096,
            assign_accept_timeout_ms: 30_000,
            retention_days: DEFAULT_RETENTION_DAYS,
            retention_sweep_interval_ms: 60_000,
            finished_cache_tasks: 10_000,
            finished_cache_workflows: 1_000,
            idempotency_window_ms: 7 * 24 * 3_600_000,
            artifacts: crate::artifacts::ArtifactsConfig::default(),
            clock: ClockHandle::default(),
        }
    }
}

impl ControllerConfig {
    /// Parses a TOML file; unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::invalid(format!("controller config: {e}")))
    }

    /// Circuit breaker tunables.
    pub(crate) fn breakers(&self) -> crate::core::breakers::BreakerConfig {
        let open = Duration::from_millis(self.breaker_open_ms);
        crate::core::breakers::BreakerConfig {
            threshold: self.breaker_threshold,
            open_for: open,
            max_open_for: open * 10,
            probes: 1,
        }
    }

    /// Refuses configurations that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.telemetry.validate()?;
        if self.breaker_threshold == 0 || self.breaker_open_ms < 10 {
            return Err(Error::invalid(
                "breaker_threshold must be at least 1 and breaker_open_ms at least 10",
            ));
        }
        if !self.registration_token.is_empty() && self.registration_token.len() < 16 {
            return Err(Error::invalid(
                "registration_token must be at least 16 characters when set (--registration-token or SCABBARD_REGISTRATION_TOKEN)",
            ));
        }
        if self.heartbeat_interval_ms < 50 {
            return Err(Error::invalid("heartbeat_interval_ms must be at least 50"));
        }
        if self.agent_lease_ttl_ms < 2 * self.heartbeat_interval_ms {
            return Err(Error::invalid(format!(
                "agent_lease_ttl_ms ({}) must be at least twice heartbeat_interval_ms ({})",
                self.agent_lease_ttl_ms, self.heartbeat_interval_ms
            )));
        }
        if self.default_task_timeout_ms == 0
            || self.default_task_timeout_ms > self.max_task_timeout_ms
        {
            return Err(Error::invalid(
                "default_task_timeout_ms must be > 0 and <= max_task_timeout_ms",
            ));
        }
        if self.rate_limit_per_second > 0
            && self.rate_limit_burst > 0
            && self.rate_limit_burst < self.rate_limit_per_second
        {
            return Err(Error::invalid(format!(
                "rate_limit_burst ({}) must be 0 (= the rate) or at least rate_limit_per_second ({}) (--rate-burst)",
                self.rate_limit_burst, self.rate_limit_per_second
            )));
        }
        if self.min_schedule_interval_ms < 1_000 {
            return Err(Error::invalid(
                "min_schedule_interval_ms must be at least 1000 (cron ticks fall on whole seconds)",
            ));
        }
        if self.max_stream_buffer_bytes < 64 * 1024 {
            return Err(Error::invalid(
                "max_stream_buffer_bytes must be at least 65536",
            ));
        }
        if self.handshake_timeout_ms < 100 {
            return Err(Error::invalid("handshake_timeout_ms must be at least 100"));
        }
        if self.agent_queue_capacity < 16 {
            return Err(Error::invalid("agent_queue_capacity must be at least 16"));
        }
        if self.assign_accept_timeout_ms > 0 && self.assign_accept_timeout_ms < 100 {
            return Err(Error::invalid(
                "assign_accept_timeout_ms must be 0 (never) or at least 100",
            ));
        }
        if self.rpc_timeout_ms > 0 && self.rpc_timeout_ms < 100 {
            return Err(Error::invalid(
                "rpc_timeout_ms must be 0 (no deadline) or at least 100",
            ));
        }
        if self.max_message_bytes < 4096 {
            return Err(Error::invalid("max_message_bytes must be at least 4096"));
        }
        self.check_size_limits()?;
        match self.store.as_str() {
            "embedded" => {}
            "etcd" => {
                self.etcd.validate()?;
                // Followers redirect to the leader's advertised address, and the listen
                // address (often 0.0.0.0) reaches nobody: it must be said.
                if self
                    .advertise_addr
                    .as_deref()
                    .is_none_or(|a| a.trim().is_empty())
                {
                    return Err(Error::invalid(
                        "store = \"etcd\" needs advertise_addr (--advertise-addr or SCABBARD_ADVERTISE_ADDR): the address other controllers, workers and clients are redirected to while this controller leads",
                    ));
                }
            }
            other => {
                return Err(Error::invalid(format!(
                    "store {other:?} is not a backend: use \"embedded\" or \"etcd\""
                )));
            }
        }
        check_retention_days("retention_days", self.retention_days)?;
        if self.retention_sweep_interval_ms < 100 {
            return Err(Error::invalid(
                "retention_sweep_interval_ms must be at least 100",
            ));
        }
        if self.leader_lease_ttl_ms < 1_000 {
            return Err(Error::invalid("leader_lease_ttl_ms must be at least 1000"));
        }
        if let Some(a) = &self.advertise_addr
            && a.trim().is_empty()
        {
            return Err(Error::invalid("advertise_addr must not be empty when set"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(Error::invalid("data_dir must not be empty"));
        }
        self.tls.validate()?;
        self.artifacts.validate()?;
        if let Some(path) = &self.secrets_key_file {
            crate::sealed::read_key_file(path)?;
        }
        Ok(())
    }

    /// The size limits among themselves: each at least 1 KiB, outputs within the result.
    fn check_size_limits(&self) -> Result<()> {
        for (key, v) in [
            ("max_spec_bytes", self.max_spec_bytes),
            ("max_result_bytes", self.max_result_bytes),
            ("max_outputs_bytes", self.max_outputs_bytes),
            ("max_workflow_bytes", self.max_workflow_bytes),
        ] {
            if v < 1024 {
                return Err(Error::invalid(format!("{key} = {v} is below 1024 bytes")));
            }
        }
        if self.max_outputs_bytes > self.max_result_bytes {
            return Err(Error::invalid(format!(
                "max_outputs_bytes ({}) is larger than max_result_bytes ({}): outputs are part of the result",
                self.max_outputs_bytes, self.max_result_bytes
            )));
        }
        if self.max_spec_bytes > self.max_workflow_bytes {
            return Err(Error::invalid(format!(
                "max_spec_bytes ({}) is larger than max_workflow_bytes ({}): a workflow holds its nodes' specs",
                self.max_spec_bytes, self.max_workflow_bytes
            )));
        }
        Ok(())
    }

    /// Refuses size limits the store cannot hold: a task record (its spec, its result twice,
    /// and the compacted earlier attempts) must fit in one store value of at most
    /// `max_value_bytes`. The error names the key to lower (or, for etcd,
    /// `etcd.max_request_bytes` to raise).
    pub fn check_store_limits(&self, max_value_bytes: usize) -> Result<()> {
        let record = self
            .max_spec_bytes
            .saturating_add(self.max_result_bytes.saturating_mul(2))
            .saturating_add(TASK_RECORD_OVERHEAD_BYTES);
        if record > max_value_bytes {
            let raise = if self.store == "etcd" {
                " or raise etcd.max_request_bytes (with the etcd servers' --max-request-bytes)"
            } else {
                ""
            };
            return Err(Error::invalid(format!(
                "max_spec_bytes ({}) + 2 x max_result_bytes ({}) + {} bytes of attempt history = {record} bytes, more than the {} store holds in one value ({max_value_bytes} bytes): lower max_spec_bytes or max_result_bytes{raise}",
                self.max_spec_bytes, self.max_result_bytes, TASK_RECORD_OVERHEAD_BYTES, self.store,
            )));
        }
        Ok(())
    }

    /// The bootstrap admin token given by the operator, if any (the field, else the file).
    pub fn given_bootstrap_token(&self) -> Result<Option<String>> {
        if let Some(t) = &self.bootstrap_token {
            return Ok(Some(t.trim().to_string()));
        }
        match &self.bootstrap_token_file {
            None => Ok(None),
            Some(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| {
                    Error::invalid(format!("bootstrap_token_file {}: {e}", path.display()))
                }),
        }
    }

    /// Heartbeat interval as a duration.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    /// Where task logs live.
    pub fn logs_dir(&self) -> PathBuf {
        self.logs_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("logs"))
    }

    /// Leader lease TTL as a duration.
    pub fn leader_lease_ttl(&self) -> Duration {
        Duration::from_millis(self.leader_lease_ttl_ms)
    }

    /// Agent lease TTL (grace period) as a duration.
    pub fn agent_lease_ttl(&self) -> Duration {
        Duration::from_millis(self.agent_lease_ttl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            ControllerConfig::from_toml("listen = \"127.0.0.1:1\"\nlisten_adress = 1").unwrap_err();
        assert!(err.to_string().contains("listen_adress"), "{err}");
    }

    #[test]
    fn etcd_mode_needs_an_advertise_address() {
        let mut cfg = ControllerConfig {
            store: "etcd".into(),
            ..Default::default()
        };
        cfg.etcd.endpoints = vec!["http://127.0.0.1:2379".into()];
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("--advertise-addr"), "{err}");
        cfg.advertise_addr = Some("10.0.0.5:7400".into());
        cfg.validate().unwrap();
        // The embedded store has one controller: the listen address is enough.
        ControllerConfig::default().validate().unwrap();
    }

    #[test]
    fn short_registration_token_is_refused() {
        let cfg = ControllerConfig {
            registration_token: "short".into(),
            ..Default::default()
        };
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("registration_token")
        );
    }

    #[test]
    fn load_limits_are_checked() {
        let d = ControllerConfig::default();
        assert_eq!(
            (d.max_concurrent_requests, d.rpc_timeout_ms),
            (10_000, 30_000)
        );
        // A flood is stopped by default; 0 turns the limit off (the burst is then unused).
        assert_eq!(
            (d.rate_limit_per_second, d.rate_limit_burst),
            (DEFAULT_RATE_LIMIT, DEFAULT_RATE_BURST)
        );
        ControllerConfig {
            rate_limit_per_second: 0,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let burst_below_rate = ControllerConfig {
            rate_limit_per_second: 100,
            rate_limit_burst: 10,
            ..Default::default()
        };
        assert!(
            burst_below_rate
                .validate()
                .unwrap_err()
                .to_string()
                .contains("rate_limit_burst")
        );
        let tiny_timeout = ControllerConfig {
            rpc_timeout_ms: 5,
            ..Default::default()
        };
        assert!(
            tiny_timeout
                .validate()
                .unwrap_err()
                .to_string()
                .contains("rpc_timeout_ms")
        );
        let off = ControllerConfig {
            rpc_timeout_ms: 0,
            max_concurrent_requests: 0,
            ..Default::default()
        };
        off.validate().unwrap();
        let cfg = ControllerConfig::from_toml(
            "rate_limit_per_second = 5\nrate_limit_burst = 10\nmax_concurrent_requests = 3\nrpc_timeout_ms = 1000",
        )
        .unwrap();
        assert_eq!(cfg.max_concurrent_requests, 3);
        assert_eq!(cfg.rpc_timeout_ms, 1000);
        cfg.validate().unwrap();
    }

    #[test]
    fn size_limits_fit_the_store_and_each_other() {
        let d = ControllerConfig::default();
        d.validate().unwrap();
        // The defaults fit both backends' values (embedded 1.5 MiB, etcd 1.5 MiB - framing).
        d.check_store_limits(1536 * 1024 - 32 * 1024).unwrap();
        let big = ControllerConfig {
            max_spec_bytes: 1024 * 1024,
            ..Default::default()
        };
        let e = big.check_store_limits(1536 * 1024).unwrap_err().to_string();
        assert!(e.contains("max_spec_bytes") && e.contains("1572864"), "{e}");
        let etcd = ControllerConfig {
            store: "etcd".into(),
            max_result_bytes: 700 * 1024,
            ..Default::default()
        };
        let e = etcd
            .check_store_limits(1024 * 1024)
            .unwrap_err()
            .to_string();
        assert!(e.contains("etcd.max_request_bytes"), "{e}");
        let outputs = ControllerConfig {
            max_outputs_bytes: 512 * 1024,
            ..Default::default()
        };
        let e = outputs.validate().unwrap_err().to_string();
        assert!(e.contains("max_outputs_bytes"), "{e}");
        let tiny = ControllerConfig::from_toml("max_workflow_bytes = 10").unwrap();
        let e = tiny.validate().unwrap_err().to_string();
        assert!(e.contains("max_workflow_bytes"), "{e}");
    }

    #[test]
    fn retention_is_a_positive_number_of_days() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 40_000.0] {
            let cfg = ControllerConfig {
                retention_days: bad,
                ..Default::default()
            };
            assert!(
                cfg.validate()
                    .unwrap_err()
                    .to_string()
                    .contains("retention_days"),
                "{bad}"
            );
        }
        let cfg =
            ControllerConfig::from_toml("retention_days = 0.5\nretention_sweep_interval_ms = 1000")
                .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.retention_days, 0.5);
        assert_eq!(ControllerConfig::default().retention_days, 30.0);
    }

    #[test]
    fn lease_must_cover_two_heartbeats() {
        let cfg = ControllerConfig {
            registration_token: "x".repeat(20),
            heartbeat_interval_ms: 1000,
            agent_lease_ttl_ms: 1500,
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }
}
