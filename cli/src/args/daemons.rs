//! Command-line grammar of the daemons and the local cluster: `scabbard dev`,
//! `scabbard controller` (with its artifact store) and `scabbard worker`.

use std::path::PathBuf;

use clap::Args;

use super::parse_kv;

#[derive(Args, Debug)]
pub(crate) struct DevArgs {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub(crate) listen: std::net::SocketAddr,
    /// Data directory (store, logs, worker spool). Default: a fresh temporary directory.
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Slots of the local worker.
    #[arg(long, default_value_t = 4)]
    pub(crate) slots: u32,
    /// Serve TLS with a throwaway CA generated into `<data-dir>/tls/` (the local worker
    /// uses mutual TLS with its own client certificate).
    #[arg(long)]
    pub(crate) tls: bool,
    /// HTTP/JSON API address. Default: 127.0.0.1:7480 (a free port when --listen's port
    /// is 0).
    #[arg(long)]
    pub(crate) http_listen: Option<std::net::SocketAddr>,
    /// Directory of user workflow templates (`*.yaml`), loaded beside the built-in ones.
    #[arg(long, env = "SCABBARD_TEMPLATES_DIR")]
    pub(crate) templates_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct ControllerArgs {
    /// TOML config file (flags and env override it).
    #[arg(long, env = "SCABBARD_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "SCABBARD_LISTEN")]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// Data directory.
    #[arg(long, env = "SCABBARD_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Token workers present to register (at least 16 characters).
    #[arg(long, env = "SCABBARD_REGISTRATION_TOKEN", hide_env_values = true)]
    pub(crate) registration_token: Option<String>,
    /// File holding the admin token to create on the first start of an empty cluster
    /// (default: `SCABBARD_BOOTSTRAP_TOKEN`, else one is generated and printed once).
    #[arg(long, env = "SCABBARD_BOOTSTRAP_TOKEN_FILE")]
    pub(crate) bootstrap_token_file: Option<PathBuf>,
    /// State store backend: `embedded` (single node, default) or `etcd` (several controllers).
    #[arg(long, env = "SCABBARD_STORE")]
    pub(crate) store: Option<String>,
    /// etcd client URLs (with `--store etcd`), comma-separated.
    #[arg(long, env = "SCABBARD_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub(crate) etcd_endpoints: Vec<String>,
    /// etcd user name.
    #[arg(long, env = "SCABBARD_ETCD_USERNAME")]
    pub(crate) etcd_username: Option<String>,
    /// etcd password.
    #[arg(long, env = "SCABBARD_ETCD_PASSWORD", hide_env_values = true)]
    pub(crate) etcd_password: Option<String>,
    /// CA bundle for etcd's TLS certificate.
    #[arg(long)]
    pub(crate) etcd_ca_file: Option<PathBuf>,
    /// Client certificate for etcd (mutual TLS).
    #[arg(long)]
    pub(crate) etcd_cert_file: Option<PathBuf>,
    /// Client key for etcd (mutual TLS).
    #[arg(long)]
    pub(crate) etcd_key_file: Option<PathBuf>,
    /// Key prefix in etcd (default `/scabbard/`).
    #[arg(long)]
    pub(crate) etcd_namespace: Option<String>,
    /// Bound of one try of an etcd request (default 1s): reads are sent again after it.
    #[arg(long, env = "SCABBARD_ETCD_ATTEMPT_TIMEOUT", value_parser = crate::duration::parse)]
    pub(crate) etcd_attempt_timeout: Option<std::time::Duration>,
    /// Bound of a whole etcd request, retries included (default 5s).
    #[arg(long, env = "SCABBARD_ETCD_REQUEST_TIMEOUT", value_parser = crate::duration::parse)]
    pub(crate) etcd_request_timeout: Option<std::time::Duration>,
    /// The etcd servers' --max-txn-ops: the most operations the leader puts in one
    /// transaction (default 0: the largest of 1024, 512, 256, 128 the servers take, found
    /// at start). A figure set here is checked against the servers at start.
    #[arg(long, env = "SCABBARD_ETCD_MAX_TXN_OPS")]
    pub(crate) etcd_max_txn_ops: Option<usize>,
    /// Address others are redirected to while this controller leads (default: --listen).
    #[arg(long, env = "SCABBARD_ADVERTISE_ADDR")]
    pub(crate) advertise_addr: Option<String>,
    /// This controller's live task log directory (default `<data-dir>/logs`; never shared:
    /// finished attempts' logs are archived in the artifact store).
    #[arg(long, env = "SCABBARD_LOGS_DIR")]
    pub(crate) logs_dir: Option<PathBuf>,
    /// Key sealing task secrets in the store (64 hex digits; the same file on every
    /// controller). Default: `<data-dir>/secrets.key`, generated (embedded store only).
    #[arg(long, env = "SCABBARD_SECRETS_KEY_FILE")]
    pub(crate) secrets_key_file: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (GET /metrics, plain HTTP, no auth).
    #[arg(long, env = "SCABBARD_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,
    /// Serve the HTTP/JSON API (`/api/v1`, bearer tokens as for gRPC) on this address.
    #[arg(long, env = "SCABBARD_HTTP_LISTEN")]
    pub(crate) http_listen: Option<std::net::SocketAddr>,
    /// Directory of user workflow templates (*.yaml), loaded next to the built-in ones.
    #[arg(long, env = "SCABBARD_TEMPLATES_DIR")]
    pub(crate) templates_dir: Option<PathBuf>,
    /// How long a container task waits for a worker with its image warm when only colder
    /// workers are free (e.g. 2s; 0 = never wait).
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) cache_affinity_wait: Option<std::time::Duration>,
    /// Keep finished tasks, workflows, logs, artifacts and audit entries this many days
    /// (default 30; fractions allowed, e.g. 0.5 = 12 hours). A project's own retention
    /// overrides it.
    #[arg(long, env = "SCABBARD_RETENTION_DAYS")]
    pub(crate) retention_days: Option<f64>,
    /// How often the leader's retention sweeper runs a round (e.g. 60s).
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) retention_sweep_interval: Option<std::time::Duration>,
    /// Consecutive failures that open a circuit breaker (agent, template step, dependency).
    #[arg(long)]
    pub(crate) breaker_threshold: Option<u32>,
    /// How long an open circuit breaker waits before a probe (e.g. 30s).
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) breaker_open: Option<std::time::Duration>,
    /// Leader lease TTL: a dead leader is replaced within about this long.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) leader_lease_ttl: Option<std::time::Duration>,
    /// Agent lease / reconnect grace period.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) agent_lease_ttl: Option<std::time::Duration>,
    /// Heartbeat interval asked of workers.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) heartbeat_interval: Option<std::time::Duration>,
    /// Requests per second allowed per token whose project sets no rate (0 = unlimited).
    #[arg(long, env = "SCABBARD_RATE_LIMIT")]
    pub(crate) rate_limit: Option<u32>,
    /// Requests a token may send at once above --rate-limit (default: the rate).
    #[arg(long, env = "SCABBARD_RATE_BURST")]
    pub(crate) rate_burst: Option<u32>,
    /// Most calls handled at once; more are refused with RESOURCE_EXHAUSTED (0 = unlimited).
    #[arg(long, env = "SCABBARD_MAX_CONCURRENT_REQUESTS")]
    pub(crate) max_concurrent_requests: Option<usize>,
    /// Deadline of each call's handler, e.g. 30s (0 = none; streams only until they start).
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) rpc_timeout: Option<std::time::Duration>,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long)]
    pub(crate) max_message_bytes: Option<usize>,
    /// Largest task spec a submit may carry, in bytes (bigger: INVALID_ARGUMENT).
    #[arg(long)]
    pub(crate) max_spec_bytes: Option<usize>,
    /// Largest result an attempt may report, in bytes (bigger: the attempt FAILS saying so).
    #[arg(long)]
    pub(crate) max_result_bytes: Option<usize>,
    /// Largest total of an attempt's outputs, in bytes (more: the attempt FAILS saying so).
    #[arg(long)]
    pub(crate) max_outputs_bytes: Option<usize>,
    /// Largest workflow (its whole spec) a submit or template run may carry, in bytes.
    #[arg(long)]
    pub(crate) max_workflow_bytes: Option<usize>,
    /// Shortest interval between two ticks of a cron schedule, e.g. 60s.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) min_schedule_interval: Option<std::time::Duration>,
    /// Most schedules one project may have (0 = unlimited).
    #[arg(long)]
    pub(crate) max_schedules_per_project: Option<u32>,
    /// Bytes a Watch stream may hold for a client that does not read before it is ended.
    #[arg(long)]
    pub(crate) max_stream_buffer_bytes: Option<usize>,
    /// Most Watch/Logs streams one token may have open (0 = unlimited).
    #[arg(long)]
    pub(crate) max_streams_per_token: Option<u32>,
    /// A connection that has not started its handshake within this long is closed, e.g. 10s.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) handshake_timeout: Option<std::time::Duration>,
    /// Most open connections per client IP address on each listener (0 = unlimited).
    #[arg(long)]
    pub(crate) max_connections_per_ip: Option<usize>,
    /// Messages queued for one agent session before it is closed (the agent resyncs).
    #[arg(long)]
    pub(crate) agent_queue_capacity: Option<usize>,
    /// An Assign not accepted by its agent within this long is requeued, e.g. 30s (0 = never).
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) assign_accept_timeout: Option<std::time::Duration>,
    /// Finished tasks kept in the controller's memory; older ones are read from the store.
    #[arg(long)]
    pub(crate) finished_cache_tasks: Option<usize>,
    /// Finished workflows kept in the controller's memory; older ones are read from the store.
    #[arg(long)]
    pub(crate) finished_cache_workflows: Option<usize>,
    /// How long an idempotency key is honoured, e.g. 7d.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) idempotency_window: Option<std::time::Duration>,
    /// PEM certificate (chain) of the listener; turns TLS on (with --tls-key).
    #[arg(long, env = "SCABBARD_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SCABBARD_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,
    /// PEM CA that client certificates are verified against (mutual TLS; clients without a
    /// certificate may still connect with a token).
    #[arg(long, env = "SCABBARD_TLS_CLIENT_CA")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// Workers must present a client certificate from --tls-client-ca naming the agent.
    #[arg(long)]
    pub(crate) require_worker_client_cert: bool,
    /// PEM CA of the other controllers' certificates: a TLS follower forwards calls to the
    /// leader (without it, it redirects clients with UNAVAILABLE and the leader's address).
    #[arg(long, env = "SCABBARD_TLS_PEER_CA")]
    pub(crate) tls_peer_ca: Option<PathBuf>,
    /// Name the leader's certificate must carry when forwarding (default: the host of its
    /// advertised address).
    #[arg(long)]
    pub(crate) tls_peer_domain: Option<String>,
    #[command(flatten)]
    pub(crate) artifacts: ArtifactStoreArgs,
}

/// The controller's artifact store (`[artifacts]` in the config file). The S3 secret key
/// comes from `SCABBARD_S3_SECRET_ACCESS_KEY` or a file, never a flag.
#[derive(Args, Debug)]
pub(crate) struct ArtifactStoreArgs {
    /// Where artifacts live: `local` (a directory of this controller; default) or `s3`.
    #[arg(long, env = "SCABBARD_ARTIFACTS_BACKEND")]
    pub(crate) artifacts_backend: Option<String>,
    /// Local backend: the directory (default `<data-dir>/artifacts`; controllers sharing
    /// one etcd need the same one).
    #[arg(long, env = "SCABBARD_ARTIFACTS_DIR")]
    pub(crate) artifacts_dir: Option<PathBuf>,
    /// Largest artifact accepted, e.g. 5GiB (0 = no limit).
    #[arg(long, env = "SCABBARD_MAX_ARTIFACT_BYTES", value_parser = crate::size::parse)]
    pub(crate) max_artifact_bytes: Option<u64>,
    /// Most artifact bytes one attempt of a task may upload, e.g. 20GiB (0 = no limit).
    #[arg(long, env = "SCABBARD_MAX_TASK_ARTIFACT_BYTES", value_parser = crate::size::parse)]
    pub(crate) max_task_artifact_bytes: Option<u64>,
    /// S3 backend: the bucket.
    #[arg(long, env = "SCABBARD_S3_BUCKET")]
    pub(crate) artifacts_s3_bucket: Option<String>,
    /// S3 backend: key prefix inside the bucket (e.g. `scabbard/`).
    #[arg(long, env = "SCABBARD_S3_PREFIX")]
    pub(crate) artifacts_s3_prefix: Option<String>,
    /// S3 backend: endpoint URL of a non-AWS store (e.g. http://127.0.0.1:9000).
    #[arg(long, env = "SCABBARD_S3_ENDPOINT")]
    pub(crate) artifacts_s3_endpoint: Option<String>,
    /// S3 backend: region.
    #[arg(long, env = "SCABBARD_S3_REGION")]
    pub(crate) artifacts_s3_region: Option<String>,
    /// S3 backend: access key id.
    #[arg(long, env = "SCABBARD_S3_ACCESS_KEY_ID")]
    pub(crate) artifacts_s3_access_key_id: Option<String>,
    /// S3 backend: file holding the secret access key (or SCABBARD_S3_SECRET_ACCESS_KEY).
    #[arg(long, env = "SCABBARD_S3_SECRET_ACCESS_KEY_FILE")]
    pub(crate) artifacts_s3_secret_access_key_file: Option<PathBuf>,
    /// S3 backend: allow a plain http:// endpoint.
    #[arg(long)]
    pub(crate) artifacts_s3_allow_http: bool,
    /// S3 backend: virtual-hosted-style bucket addressing instead of path style.
    #[arg(long)]
    pub(crate) artifacts_s3_virtual_hosted_style: bool,
}

#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
    /// TOML config file (flags and env override it).
    #[arg(long, env = "SCABBARD_WORKER_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Controller address(es), comma-separated; the worker follows the leader.
    #[arg(long, env = "SCABBARD_CONTROLLER")]
    pub(crate) controller: Option<String>,
    /// Registration token (first start only).
    #[arg(long, env = "SCABBARD_REGISTRATION_TOKEN", hide_env_values = true)]
    pub(crate) registration_token: Option<String>,
    /// Agent name.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Label `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    pub(crate) labels: Vec<(String, String)>,
    /// Concurrent attempts.
    #[arg(long)]
    pub(crate) slots: Option<u32>,
    /// Data directory (identity, spool, work dirs).
    #[arg(long, env = "SCABBARD_WORKER_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// On SIGTERM, how long running tasks may take to finish before the worker exits.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) shutdown_grace: Option<std::time::Duration>,
    /// PEM CA certificate of the controller; turns TLS on.
    #[arg(long, env = "SCABBARD_CA_CERT")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (its CN is the default agent name).
    #[arg(long, env = "SCABBARD_CLIENT_CERT")]
    pub(crate) client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(long, env = "SCABBARD_CLIENT_KEY")]
    pub(crate) client_key: Option<PathBuf>,
    /// Name the controller's certificate must carry (default: the address's host).
    #[arg(long, env = "SCABBARD_TLS_DOMAIN")]
    pub(crate) tls_domain: Option<String>,
    /// Serve Prometheus metrics on this address (GET /metrics, plain HTTP, no auth).
    #[arg(long, env = "SCABBARD_WORKER_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,
}
