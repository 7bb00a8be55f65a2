//! Command-line grammar of `login`, `logout`, `token`, `project` and `audit`.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use super::Target;

#[derive(Args, Debug)]
pub(crate) struct LoginArgs {
    #[command(flatten)]
    pub(crate) target: Target,
}

#[derive(Args, Debug)]
pub(crate) struct LogoutArgs {
    /// Controller address (list) whose token to forget [default: the current one].
    #[arg(long, env = "SCABBARD_CONTROLLER", conflicts_with = "all")]
    pub(crate) controller: Option<String>,
    /// Forget every saved token.
    #[arg(long)]
    pub(crate) all: bool,
}

/// A token kind on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KindArg {
    /// For people, CI systems and tools.
    Api,
    /// Lets workers register.
    Registration,
    /// Issued to an agent at registration (list only).
    Agent,
}

/// A token scope on the command line; each includes the ones before it.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScopeArg {
    /// Get, list, watch tasks and their logs; list agents.
    Read,
    /// Submit and cancel tasks.
    Submit,
    /// Drain agents, read the audit log.
    Operator,
    /// Tokens and projects.
    Admin,
}

#[derive(Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// Create a token. Its secret is printed once, on stdout (details on stderr).
    Create {
        #[command(flatten)]
        target: Target,
        /// Kind of token.
        #[arg(long, value_enum, default_value_t = KindArg::Api)]
        kind: KindArg,
        /// Name, to recognise it in lists and the audit log.
        #[arg(long, default_value = "")]
        name: String,
        /// Scopes of an API token, comma-separated or repeated (read, submit, operator,
        /// admin; each includes the ones before it).
        #[arg(long = "scope", value_enum, value_delimiter = ',')]
        scopes: Vec<ScopeArg>,
        /// Project to bind the token to; `*` = every project (needs a cluster-wide admin)
        /// [default: your token's project].
        #[arg(long)]
        project: Option<String>,
        /// Lifetime, e.g. 12h or 30d [default: none for API tokens, 24h for registration
        /// tokens].
        #[arg(long, value_parser = crate::duration::parse)]
        ttl: Option<Duration>,
        /// Registration tokens: how many registrations it allows [default: unlimited].
        #[arg(long)]
        uses: Option<u32>,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        target: Target,
        /// Only this project's tokens.
        #[arg(long)]
        project: Option<String>,
        /// Only this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token at once (calls with it fail from then on).
    Revoke {
        #[command(flatten)]
        target: Target,
        /// Token id, unique id prefix or name (see `scabbard token list`).
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Quota flags of `project create|update` (0 = no project-specific limit).
#[derive(Args, Debug, Clone, Copy)]
pub(crate) struct QuotaArgs {
    /// Most tasks queued (or waiting to retry) at once; more submits are refused.
    #[arg(long)]
    pub(crate) max_queued: Option<u32>,
    /// Most tasks assigned or running at once; the rest wait in the queue.
    #[arg(long)]
    pub(crate) max_running: Option<u32>,
    /// Requests per second allowed per token of the project.
    #[arg(long)]
    pub(crate) rate: Option<u32>,
    /// Requests a token may send at once above --rate.
    #[arg(long)]
    pub(crate) burst: Option<u32>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ProjectCommand {
    /// Create a project.
    Create {
        #[command(flatten)]
        target: Target,
        /// Name: 1-63 of a-z, 0-9 and `-`, starting with a letter.
        name: String,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        quota: QuotaArgs,
        /// Keep the project's finished tasks, workflows, logs, artifacts and audit entries
        /// this many days (fractions allowed; 0 = the controller's --retention-days).
        #[arg(long)]
        retention_days: Option<f64>,
    },
    /// List projects.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show one project.
    Get {
        #[command(flatten)]
        target: Target,
        /// Project name.
        name: String,
    },
    /// Change a project's description or quota (what is not given stays).
    Update {
        #[command(flatten)]
        target: Target,
        /// Project name.
        name: String,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        quota: QuotaArgs,
        /// Keep the project's finished tasks, workflows, logs, artifacts and audit entries
        /// this many days (fractions allowed; 0 = the controller's --retention-days).
        /// Applies from the sweeper's next round, without a restart.
        #[arg(long)]
        retention_days: Option<f64>,
    },
    /// Delete a project with no unfinished tasks; revokes its tokens.
    Delete {
        #[command(flatten)]
        target: Target,
        /// Project name.
        name: String,
    },
}

#[derive(Args, Debug)]
pub(crate) struct AuditArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// At most this many entries (1-1000).
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: u32,
    /// Only this project's entries.
    #[arg(long)]
    pub(crate) project: Option<String>,
    /// Only this action (e.g. token.create, token.revoke, project.create, agent.drain,
    /// task.cancel); a misspelt one is refused with the list of valid actions.
    #[arg(long)]
    pub(crate) action: Option<String>,
}
