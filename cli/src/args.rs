//! Command-line grammar.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Scabbard: a distributed control plane for build pipelines.
#[derive(Parser, Debug)]
#[command(
    name = "scabbard",
    version,
    about,
    propagate_version = true,
    after_help = EXIT_CODES
)]
pub(crate) struct Cli {
    /// Output format of commands that print resources: `table` for people, `json` (the
    /// proto3 JSON mapping; `--wait`/`--follow`/`--watch` print JSON Lines) or `yaml`.
    /// See docs/cli.md.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = crate::render::Format::Table)]
    pub(crate) output: crate::render::Format,
    /// Log as JSON lines (daemons).
    #[arg(long, global = true, env = "SCABBARD_LOG_JSON")]
    pub(crate) log_json: bool,
    /// Deadline on each call to the controller (e.g. `10s`, `500ms`): a call that gets no
    /// answer in time fails with a deadline error instead of waiting. Streams (`logs
    /// --follow`, watches) must start within it, then run on. Default: none (a silent
    /// controller is still detected by keep-alive pings within about 4 s).
    #[arg(long, global = true, env = "SCABBARD_TIMEOUT", value_parser = crate::duration::parse)]
    pub(crate) timeout: Option<std::time::Duration>,
    /// Use this context (controller, token reference, TLS files; `scabbard context list`)
    /// instead of the current one. `dev` and `login` create or update the context of this
    /// name.
    #[arg(long, global = true, env = "SCABBARD_CONTEXT")]
    pub(crate) context: Option<String>,
    /// On Ctrl-C while following a task or workflow (`submit --wait/--follow`, `logs -f`,
    /// `workflow watch`, `--watch`), cancel it before exiting (130). Without it the work
    /// keeps running and the CLI prints how to cancel it.
    #[arg(long, global = true)]
    pub(crate) cancel_on_interrupt: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The global `--timeout`, set once by `main`.
static REQUEST_TIMEOUT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// Records the global `--timeout` (once, from `main`).
pub(crate) fn set_request_timeout(t: Option<std::time::Duration>) {
    if let Some(t) = t {
        let _ = REQUEST_TIMEOUT.set(t);
    }
}

/// The global `--timeout`, if given.
pub(crate) fn request_timeout() -> Option<std::time::Duration> {
    REQUEST_TIMEOUT.get().copied()
}

// Parsed once per process: boxing the large daemon variants would gain nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Cluster status: leader, controllers, store health, queue depths, workflows and
    /// circuit breakers.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Save an API token for a controller (checked with the controller first) in the
    /// credentials file; the token is read from stdin unless --token gives it.
    Login(LoginArgs),
    /// Forget the saved token of a controller (the token itself stays valid).
    Logout(LogoutArgs),
    /// Show the token in use: its id, name, scopes and project.
    Whoami {
        #[command(flatten)]
        target: Target,
    },
    /// Serve MCP (Model Context Protocol) on stdin/stdout for AI agents: templates, tasks
    /// and workflows as tools and resources, called with this token (see docs/mcp.md).
    Mcp {
        #[command(flatten)]
        target: Target,
    },
    /// Create, list and revoke API and registration tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Create, inspect, change and delete projects and their quotas.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Show the audit log of admin and operator actions, newest first.
    Audit(AuditArgs),
    /// Submit, inspect, cancel and watch workflows (DAGs of tasks).
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// List, show, render and run workflow templates.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Create, inspect, pause, resume and delete cron schedules of templates.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Inspect and reset circuit breakers.
    #[command(subcommand)]
    Breakers(BreakersCommand),
    /// List and download the artifacts of tasks and workflows.
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// Maintain the embedded store file (offline).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell); see
    /// docs/cli.md for where to install it.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// List, switch and show CLI contexts (a named controller with its token reference and
    /// TLS files); `dev` and `login` create them.
    #[command(subcommand)]
    Context(ContextCommand),
}

/// `scabbard context …`
#[derive(Subcommand, Debug)]
pub(crate) enum ContextCommand {
    /// List the contexts; `*` marks the current one.
    List,
    /// Make a context the current one (every command then talks to its controller).
    Use {
        /// The context's name.
        name: String,
    },
    /// Show a context (default: the one in use) and where its token comes from.
    Show {
        /// The context's name.
        name: Option<String>,
    },
}

/// `scabbard store …`
#[derive(Subcommand, Debug)]
pub(crate) enum StoreCommand {
    /// Shrink the embedded store file (`<data-dir>/state.redb`) after retention deleted
    /// history. The controller must be stopped: the file is locked while it runs.
    Compact {
        /// The controller's data directory.
        #[arg(long, env = "SCABBARD_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ArtifactsCommand {
    /// List the artifacts a task serves (once it succeeded), or those of every node of a
    /// workflow.
    List {
        #[command(flatten)]
        target: Target,
        /// Task id or workflow id (or a unique prefix of one).
        id: String,
    },
    /// Download artifacts, check their SHA-256 and unpack each into DIR/<name> (a file
    /// artifact becomes the file DIR/<name>). With a workflow id and no --node, each goes
    /// to DIR/<node>/<name>.
    Get {
        #[command(flatten)]
        target: Target,
        /// Task id, or workflow id.
        id: String,
        /// The artifact (default: all of them).
        name: Option<String>,
        /// Directory to unpack into (created if needed). `-o DIR` is still accepted here
        /// when DIR is not an output format (table, text, json, yaml).
        #[arg(long = "output-dir", short = 'd', value_name = "DIR")]
        dir: PathBuf,
        /// With a workflow id: only this node's artifacts.
        #[arg(long)]
        node: Option<String>,
    },
}

mod daemons;
mod output;
mod security;
mod verbs;
mod workflows;
pub(crate) use daemons::*;
pub(crate) use output::{EXIT_CODES, legacy_output_dir};
pub(crate) use security::*;
pub(crate) use verbs::*;
pub(crate) use workflows::*;

/// Where the controller is and how to authenticate to it; what is not given here comes
/// from the credentials file (`scabbard login`).
#[derive(Args, Clone)]
pub(crate) struct Target {
    /// Controller address; several (comma-separated) to find the leader among them
    /// [default: the one of `scabbard login`, else 127.0.0.1:7400].
    #[arg(long, env = "SCABBARD_CONTROLLER")]
    pub(crate) controller: Option<String>,
    /// API token [default: the one saved by `scabbard login` for the controller].
    #[arg(long, env = "SCABBARD_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// PEM CA certificate of the controller; turns TLS on [default: the saved one].
    #[arg(long, env = "SCABBARD_CA_CERT")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    #[arg(long, env = "SCABBARD_CLIENT_CERT")]
    pub(crate) client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(long, env = "SCABBARD_CLIENT_KEY")]
    pub(crate) client_key: Option<PathBuf>,
    /// Name the controller's certificate must carry (default: the address's host).
    #[arg(long, env = "SCABBARD_TLS_DOMAIN")]
    pub(crate) tls_domain: Option<String>,
}

// Never print the token.
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("controller", &self.controller)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("tls_domain", &self.tls_domain)
            .finish()
    }
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
    /// Secret environment variable `KEY=VALUE` (repeatable): stored encrypted, shown as
    /// `***`, redacted from the task's log. Prefer --secret-env (no value in shell history).
    #[arg(long = "secret", value_name = "KEY=VALUE", value_parser = parse_secret)]
    pub(crate) secrets: Vec<SecretKv>,
    /// Secret environment variable KEY whose value is taken from this command's own
    /// environment (repeatable).
    #[arg(long = "secret-env", value_name = "KEY")]
    pub(crate) secret_env: Vec<String>,
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
    /// Project to run the task in (default: the token's project, else `default`).
    #[arg(long)]
    pub(crate) project: Option<String>,
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
        /// Task id (or a unique prefix of it).
        id: String,
    },
    /// List tasks, newest first.
    List {
        #[command(flatten)]
        target: Target,
        /// Only these states (queued, assigned, running, retry_wait, succeeded, failed,
        /// cancelled, timed_out); repeatable or comma-separated.
        #[arg(long = "state", value_delimiter = ',')]
        states: Vec<String>,
        /// Only tasks with label `key=value`.
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// At most this many per page.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only this project's tasks.
        #[arg(long)]
        project: Option<String>,
        /// Continue from a previous page (the token it printed).
        #[arg(long)]
        page_token: Option<String>,
        /// Every page, not just the first.
        #[arg(long)]
        all: bool,
        /// Only tasks created at or after this long ago, e.g. 1h, 7d.
        #[arg(long, value_parser = crate::duration::parse)]
        since: Option<std::time::Duration>,
        /// Only tasks created before this long ago, e.g. 1d.
        #[arg(long, value_parser = crate::duration::parse)]
        until: Option<std::time::Duration>,
    },
    /// Cancel a queued or running task.
    Cancel {
        #[command(flatten)]
        target: Target,
        /// Task id (or a unique prefix of it).
        id: String,
        /// Why: recorded in the audit log (`scabbard audit --action task.cancel`), not in
        /// the task's result.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Follow a task until it is final: one line per state change, and why it waits while
    /// it is queued (its placement explanation); exits with the task's status.
    Watch {
        #[command(flatten)]
        target: Target,
        /// Task id.
        id: String,
    },
    /// Run a task again: a new task with the same spec; prints its id.
    Rerun(TaskRerunArgs),
}

#[derive(Args, Debug)]
pub(crate) struct LogsArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Task id (or a unique prefix of it).
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
        /// Agent id, unique id prefix or name.
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Return a drained agent to service (the state survives restarts).
    Undrain {
        #[command(flatten)]
        target: Target,
        /// Agent id, unique id prefix or name.
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Remove a LOST agent (its record and tokens); a connected one is refused.
    Remove {
        #[command(flatten)]
        target: Target,
        /// Agent id, unique id prefix or name.
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// A `--secret KEY=VALUE` as given; its `Debug` hides the value. Split by
/// [`SecretKv::split`], not by clap, whose errors would repeat the value.
#[derive(Clone)]
pub(crate) struct SecretKv(String);

impl std::fmt::Debug for SecretKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = self.0.split_once('=').map_or("?", |(k, _)| k);
        write!(f, "{key}=***")
    }
}

impl SecretKv {
    /// The key and the value, or an error that does not show the value.
    pub(crate) fn split(self) -> Result<(String, String), String> {
        match self.0.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err("--secret expects KEY=VALUE (the value is not shown)".into()),
        }
    }
}

fn parse_secret(s: &str) -> Result<SecretKv, String> {
    Ok(SecretKv(s.to_string()))
}

/// Parses `key=value`.
pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn workflow_commands_parse() {
        let cli = Cli::try_parse_from([
            "scabbard",
            "template",
            "run",
            "deploy",
            "-p",
            "env=prod",
            "-p",
            "q=a=b",
            "--version",
            "3",
            "--watch",
        ])
        .expect("parses");
        let Command::Template(TemplateCommand::Run {
            params,
            version,
            watch,
            ..
        }) = cli.command
        else {
            panic!("not template run: {:?}", cli.command);
        };
        assert_eq!(params[1], ("q".to_string(), "a=b".to_string()));
        assert_eq!(version, Some(3));
        assert!(watch);

        let cli =
            Cli::try_parse_from(["scabbard", "workflow", "list", "--state", "running,PENDING"])
                .expect("parses");
        let Command::Workflow(WorkflowCommand::List { states, .. }) = cli.command else {
            panic!("not workflow list");
        };
        use scabbard_common::proto::WorkflowState;
        assert_eq!(states, vec![WorkflowState::Running, WorkflowState::Pending]);

        let cli = Cli::try_parse_from([
            "scabbard",
            "schedule",
            "create",
            "--name",
            "nightly",
            "--cron",
            "0 2 * * *",
            "--template",
            "build",
            "--overlap",
            "cancel-previous",
            "--catch-up",
            "5m",
        ])
        .expect("parses");
        let Command::Schedule(ScheduleCommand::Create {
            overlap, catch_up, ..
        }) = cli.command
        else {
            panic!("not schedule create");
        };
        assert_eq!(overlap, OverlapArg::CancelPrevious);
        assert_eq!(catch_up, Some(std::time::Duration::from_secs(300)));

        let e = Cli::try_parse_from(["scabbard", "template", "render", "t", "-p", "=x"])
            .expect_err("empty name");
        assert!(e.to_string().contains("no name"), "{e}");
        assert!(Cli::try_parse_from(["scabbard", "workflow", "list", "--state", "done"]).is_err());
    }
}
