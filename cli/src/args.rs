//! Command-line grammar.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Scabbard: a distributed control plane for build pipelines.
#[derive(Parser, Debug)]
#[command(name = "scabbard", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Log as JSON lines (daemons).
    #[arg(long, global = true, env = "SCABBARD_LOG_JSON")]
    pub(crate) log_json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run a controller on the embedded store plus one local worker, in one process.
    Dev(DevArgs),
    /// Run a controller.
    Controller(ControllerArgs),
    /// Run a worker daemon.
    Worker(WorkerArgs),
    /// Submit a task.
    Submit(SubmitArgs),
    /// Inspect and cancel tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Print a task's log.
    Logs(LogsArgs),
    /// Inspect and drain agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Cluster status: leader, controllers, store health, queue depths.
    Status {
        #[command(flatten)]
        target: Target,
    },
}

/// Where the controller is.
#[derive(Args, Debug, Clone)]
pub(crate) struct Target {
    /// Controller address; several (comma-separated) to find the leader among them.
    #[arg(long, env = "SCABBARD_CONTROLLER", default_value = "127.0.0.1:7400")]
    pub(crate) controller: String,
}

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
    /// Address others are redirected to while this controller leads (default: --listen).
    #[arg(long, env = "SCABBARD_ADVERTISE_ADDR")]
    pub(crate) advertise_addr: Option<String>,
    /// Task log directory (shared by all controllers of an etcd cluster).
    #[arg(long, env = "SCABBARD_LOGS_DIR")]
    pub(crate) logs_dir: Option<PathBuf>,
    /// Leader lease TTL: a dead leader is replaced within about this long.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) leader_lease_ttl: Option<std::time::Duration>,
    /// Agent lease / reconnect grace period.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) agent_lease_ttl: Option<std::time::Duration>,
    /// Heartbeat interval asked of workers.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) heartbeat_interval: Option<std::time::Duration>,
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
}

#[derive(Args, Debug)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Run this shell script with `sh -c` instead of a command.
    #[arg(long, conflicts_with = "noop")]
    pub(crate) sh: Option<String>,
    /// Submit a no-op task (control-plane test).
    #[arg(long)]
    pub(crate) noop: bool,
    /// Environment variable `KEY=VALUE` (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_kv)]
    pub(crate) env: Vec<(String, String)>,
    /// Task label `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    pub(crate) labels: Vec<(String, String)>,
    /// Only run on agents with label `key=value` (repeatable).
    #[arg(long = "require-label", value_parser = parse_kv)]
    pub(crate) require_labels: Vec<(String, String)>,
    /// Only run on agents with this capability (repeatable).
    #[arg(long = "require-capability")]
    pub(crate) require_capabilities: Vec<String>,
    /// Time limit per attempt, e.g. 90s, 10m.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) timeout: Option<std::time::Duration>,
    /// Priority (-1000..1000, higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub(crate) priority: i32,
    /// Task name.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Idempotency key: resubmitting with it returns the first task.
    #[arg(long)]
    pub(crate) idempotency_key: Option<String>,
    /// Wait for the task to finish; exit with its status.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Stream the task's log until it finishes; exit with its status.
    #[arg(long, short = 'f')]
    pub(crate) follow: bool,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum TaskCommand {
    /// Show one task.
    Get {
        #[command(flatten)]
        target: Target,
        /// Task id.
        id: String,
    },
    /// List tasks, newest first.
    List {
        #[command(flatten)]
        target: Target,
        /// Only these states (queued, assigned, running, succeeded, failed, cancelled, timed_out).
        #[arg(long = "state")]
        states: Vec<String>,
        /// Only tasks with label `key=value`.
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a queued or running task.
    Cancel {
        #[command(flatten)]
        target: Target,
        /// Task id.
        id: String,
        /// Why (recorded in the result).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Args, Debug)]
pub(crate) struct LogsArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Task id.
    pub(crate) id: String,
    /// Keep streaming until the task finishes.
    #[arg(long, short = 'f')]
    pub(crate) follow: bool,
    /// Attempt number (default: the latest).
    #[arg(long, default_value_t = 0)]
    pub(crate) attempt: u32,
}

#[derive(Subcommand, Debug)]
pub(crate) enum AgentsCommand {
    /// List agents.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Stop giving work to an agent; running tasks finish.
    Drain {
        #[command(flatten)]
        target: Target,
        /// Agent id.
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Parses `key=value`.
pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}
