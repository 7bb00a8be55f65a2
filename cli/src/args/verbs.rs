//! Command-line grammar of the everyday verbs: `task rerun`, `workflow rerun`,
//! `workflow logs`, `schedule trigger` and `schedule update`.

use std::time::Duration;

use clap::Args;

use super::{OverlapArg, Target, parse_param};

/// `scabbard task rerun`.
#[derive(Args, Debug)]
pub(crate) struct TaskRerunArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Task id to run again (any state); the new task gets the same spec.
    pub(crate) id: String,
    /// Idempotency key: rerunning again with it returns the first rerun.
    #[arg(long)]
    pub(crate) idempotency_key: Option<String>,
    /// Wait for the new task to finish; exit with its status.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Stream the new task's log until it finishes; exit with its status.
    #[arg(long, short = 'f')]
    pub(crate) follow: bool,
}

/// `scabbard workflow rerun`.
#[derive(Args, Debug)]
pub(crate) struct WorkflowRerunArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Workflow id to run again (any state); every node runs again.
    pub(crate) id: String,
    /// Idempotency key: rerunning again with it returns the first rerun.
    #[arg(long)]
    pub(crate) idempotency_key: Option<String>,
    /// Wait for the new workflow to finish; exit 0 if it succeeded, 1 otherwise.
    #[arg(long, conflicts_with = "watch")]
    pub(crate) wait: bool,
    /// Show the live tree of the new workflow's nodes until it finishes.
    #[arg(long)]
    pub(crate) watch: bool,
}

/// `scabbard workflow logs`.
#[derive(Args, Debug)]
pub(crate) struct WorkflowLogsArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Workflow id.
    pub(crate) id: String,
    /// Keep streaming (nodes that start later too) until the workflow ends.
    #[arg(long, short = 'f')]
    pub(crate) follow: bool,
    /// Only this node's log (repeatable).
    #[arg(long = "node")]
    pub(crate) nodes: Vec<String>,
}

/// `scabbard schedule trigger`.
#[derive(Args, Debug)]
pub(crate) struct ScheduleTriggerArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Schedule id.
    pub(crate) id: String,
    /// Idempotency key: triggering again with it returns the first run instead of
    /// starting another.
    #[arg(long)]
    pub(crate) idempotency_key: Option<String>,
    /// Wait for the run to finish; exit 0 if it succeeded, 1 otherwise.
    #[arg(long, conflicts_with = "watch")]
    pub(crate) wait: bool,
    /// Show the live tree of the run's nodes until it finishes.
    #[arg(long)]
    pub(crate) watch: bool,
}

/// `scabbard schedule update`: only the options given change.
#[derive(Args, Debug)]
pub(crate) struct ScheduleUpdateArgs {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Schedule id.
    pub(crate) id: String,
    /// New name (unique in the project).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// New cron expression (5 fields, 6 with seconds first, or @hourly … @yearly); the
    /// next tick is planned from now.
    #[arg(long)]
    pub(crate) cron: Option<String>,
    /// New IANA time zone, e.g. Europe/Berlin (`UTC` for UTC).
    #[arg(long)]
    pub(crate) timezone: Option<String>,
    /// New template to run.
    #[arg(long)]
    pub(crate) template: Option<String>,
    /// Template version (0 = the latest at each tick).
    #[arg(long)]
    pub(crate) template_version: Option<u32>,
    /// Set parameter `name=value` (repeatable; the other parameters stay).
    #[arg(long = "param", short = 'p', value_parser = parse_param)]
    pub(crate) params: Vec<(String, String)>,
    /// Remove parameter NAME (repeatable).
    #[arg(long = "unset-param")]
    pub(crate) unset_params: Vec<String>,
    /// What a tick does while the previous run is still going.
    #[arg(long, value_enum)]
    pub(crate) overlap: Option<OverlapArg>,
    /// Catch-up window, e.g. 5m.
    #[arg(long, value_parser = crate::duration::parse)]
    pub(crate) catch_up: Option<Duration>,
    /// Pause the schedule.
    #[arg(long, conflicts_with = "resume")]
    pub(crate) pause: bool,
    /// Resume the schedule (from now).
    #[arg(long)]
    pub(crate) resume: bool,
}
