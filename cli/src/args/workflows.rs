//! Command-line grammar of `workflow`, `template`, `schedule` and `breakers`, and the
//! parsers of their values (`-p key=value`, workflow state names, overlap policies).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use scabbard_common::proto::{OverlapPolicy, WorkflowState};

use super::Target;

#[derive(Subcommand, Debug)]
pub(crate) enum WorkflowCommand {
    /// Submit a workflow file (a DAG of tasks); prints the workflow id.
    Submit {
        #[command(flatten)]
        target: Target,
        /// Workflow file (`-` = stdin).
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Project to run it in (default: the token's project, else `default`).
        #[arg(long)]
        project: Option<String>,
        /// Idempotency key: submitting again with it returns the first workflow.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait for the workflow to finish; exit 0 if it succeeded, 1 otherwise.
        #[arg(long, conflicts_with = "watch")]
        wait: bool,
        /// Show the live tree of nodes until the workflow finishes; exit 0 if it
        /// succeeded, 1 otherwise.
        #[arg(long)]
        watch: bool,
    },
    /// Show one workflow.
    Get {
        #[command(flatten)]
        target: Target,
        /// Workflow id (or a unique prefix of it).
        id: String,
    },
    /// List workflows, newest first.
    List {
        #[command(flatten)]
        target: Target,
        /// Only these states (pending, running, succeeded, failed, cancelled); repeatable
        /// or comma-separated.
        #[arg(long = "state", value_parser = parse_workflow_state, value_delimiter = ',')]
        states: Vec<WorkflowState>,
        /// Only runs of this template.
        #[arg(long)]
        template: Option<String>,
        /// Only this project's workflows.
        #[arg(long)]
        project: Option<String>,
        /// At most this many per page.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous page (the token it printed).
        #[arg(long)]
        page_token: Option<String>,
        /// Every page, not just the first.
        #[arg(long)]
        all: bool,
    },
    /// Cancel a workflow: running nodes are cancelled, the rest skipped.
    Cancel {
        #[command(flatten)]
        target: Target,
        /// Workflow id (or a unique prefix of it).
        id: String,
        /// Why (recorded in the workflow).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show the live tree of a workflow's nodes until it finishes; exit 0 if it
    /// succeeded, 1 otherwise (one line per change when stdout is not a terminal).
    Watch {
        #[command(flatten)]
        target: Target,
        /// Workflow id (or a unique prefix of it).
        id: String,
    },
    /// Run a workflow again: a new workflow with the same spec; prints its id.
    Rerun(super::WorkflowRerunArgs),
    /// Every node's log, each line prefixed by its node's name.
    Logs(super::WorkflowLogsArgs),
}

#[derive(Subcommand, Debug)]
pub(crate) enum TemplateCommand {
    /// List templates (latest version of each).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show a template and its parameters.
    #[command(disable_version_flag = true)]
    Show {
        #[command(flatten)]
        target: Target,
        /// Template name.
        name: String,
        /// Version [default: the latest].
        #[arg(long)]
        version: Option<u32>,
        /// Also print the template body.
        #[arg(long)]
        body: bool,
    },
    /// Print the workflow a template gives for these parameters, without running it.
    #[command(disable_version_flag = true)]
    Render {
        #[command(flatten)]
        target: Target,
        /// Template name.
        name: String,
        /// Parameter `name=value` (repeatable; the value may contain `=`).
        #[arg(long = "param", short = 'p', value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Version [default: the latest].
        #[arg(long)]
        version: Option<u32>,
    },
    /// Render a template and submit the workflow; prints the workflow id.
    #[command(disable_version_flag = true)]
    Run {
        #[command(flatten)]
        target: Target,
        /// Template name.
        name: String,
        /// Parameter `name=value` (repeatable; the value may contain `=`).
        #[arg(long = "param", short = 'p', value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Version [default: the latest].
        #[arg(long)]
        version: Option<u32>,
        /// Project to run it in (default: the token's project, else `default`).
        #[arg(long)]
        project: Option<String>,
        /// Idempotency key: running again with it returns the first workflow.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Show the live tree of nodes until the workflow finishes; exit 0 if it
        /// succeeded, 1 otherwise.
        #[arg(long)]
        watch: bool,
        /// Wait for the workflow to finish (progress on stderr); exit 0 if it succeeded,
        /// 1 otherwise.
        #[arg(long, conflicts_with = "watch")]
        wait: bool,
    },
}

/// What a schedule does with a tick while its previous run is still going.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OverlapArg {
    /// Skip the tick.
    Skip,
    /// Start it after the previous run (runs go one at a time).
    Queue,
    /// Cancel the previous run and start the new one (also spelled `cancel_previous`, as
    /// in the docs and workflow files).
    #[value(alias = "cancel_previous")]
    CancelPrevious,
}

impl From<OverlapArg> for OverlapPolicy {
    fn from(o: OverlapArg) -> Self {
        match o {
            OverlapArg::Skip => OverlapPolicy::Skip,
            OverlapArg::Queue => OverlapPolicy::Queue,
            OverlapArg::CancelPrevious => OverlapPolicy::CancelPrevious,
        }
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum ScheduleCommand {
    /// Create a schedule that runs a template on a cron expression.
    Create {
        #[command(flatten)]
        target: Target,
        /// Name, unique in the project.
        #[arg(long)]
        name: String,
        /// Cron expression: `minute hour day-of-month month day-of-week`, 6 fields with
        /// seconds first, or @hourly, @daily, @weekly, @monthly, @yearly.
        #[arg(long)]
        cron: String,
        /// Template to run.
        #[arg(long)]
        template: String,
        /// Template version [default: the latest at each tick].
        #[arg(long)]
        template_version: Option<u32>,
        /// Parameter `name=value` (repeatable; the value may contain `=`).
        #[arg(long = "param", short = 'p', value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// IANA time zone the expression is read in, e.g. Europe/Berlin [default: UTC].
        #[arg(long)]
        timezone: Option<String>,
        /// What a tick does while the previous run is still going.
        #[arg(long, value_enum, default_value_t = OverlapArg::Skip)]
        overlap: OverlapArg,
        /// Ticks missed while the controller was down (or during a failover) each run after
        /// recovery, every one no older than this, e.g. 5m; older ones are skipped and
        /// counted [default: 1m].
        #[arg(long, value_parser = crate::duration::parse)]
        catch_up: Option<Duration>,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
        /// Project to create it in (default: the token's project, else `default`).
        #[arg(long)]
        project: Option<String>,
    },
    /// List schedules.
    List {
        #[command(flatten)]
        target: Target,
        /// Only this project's schedules.
        #[arg(long)]
        project: Option<String>,
    },
    /// Show one schedule.
    Get {
        #[command(flatten)]
        target: Target,
        /// Schedule id, name or unique id prefix.
        id: String,
    },
    /// Stop a schedule's ticks until it is resumed.
    Pause {
        #[command(flatten)]
        target: Target,
        /// Schedule id, name or unique id prefix.
        id: String,
    },
    /// Resume a paused schedule from now (ticks missed while paused do not run).
    Resume {
        #[command(flatten)]
        target: Target,
        /// Schedule id, name or unique id prefix.
        id: String,
    },
    /// Delete a schedule (its workflows stay).
    Delete {
        #[command(flatten)]
        target: Target,
        /// Schedule id, name or unique id prefix.
        id: String,
    },
    /// Fire a schedule once now (whatever its overlap policy); prints the run's id.
    Trigger(super::ScheduleTriggerArgs),
    /// Change a schedule: only the options given change; the next tick is recomputed.
    Update(super::ScheduleUpdateArgs),
}

#[derive(Subcommand, Debug)]
pub(crate) enum BreakersCommand {
    /// List circuit breakers that are open or half-open.
    List {
        #[command(flatten)]
        target: Target,
        /// Also closed breakers that have counted failures.
        #[arg(long)]
        all: bool,
    },
    /// Close a breaker by hand (its failure count starts again from zero). A breaker that
    /// never opened is closed already: resetting it is a no-op that says so.
    Reset {
        #[command(flatten)]
        target: Target,
        /// Breaker key, e.g. `agent:<id>`, `step:<template>/<node>`, `registry:ghcr.io`.
        key: String,
    },
}

/// Parses a template parameter `name=value`; the value may contain `=` and be empty.
pub(crate) fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        Some(_) => Err(format!("parameter {s:?} has no name: expected NAME=VALUE")),
        None => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// Parses a workflow state name, in any case: `running`, `RUNNING`,
/// `WORKFLOW_STATE_RUNNING`.
pub(crate) fn parse_workflow_state(s: &str) -> Result<WorkflowState, String> {
    let upper = s.trim().to_ascii_uppercase();
    let name = if upper.starts_with("WORKFLOW_STATE_") {
        upper
    } else {
        format!("WORKFLOW_STATE_{upper}")
    };
    match WorkflowState::from_str_name(&name) {
        Some(WorkflowState::Unspecified) | None => Err(format!(
            "unknown workflow state {s:?} (pending, running, succeeded, failed, cancelled)"
        )),
        Some(state) => Ok(state),
    }
}

/// The `-p` parameters as a map; a name given twice is refused.
pub(crate) fn param_map(
    params: Vec<(String, String)>,
) -> Result<std::collections::HashMap<String, String>, String> {
    let mut out = std::collections::HashMap::new();
    for (k, v) in params {
        if out.contains_key(&k) {
            return Err(format!("parameter {k:?} given twice"));
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// `--version N` as the protocol has it: 0 = the latest.
pub(crate) fn version(v: Option<u32>) -> u32 {
    v.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_split_at_the_first_equals_sign() {
        assert_eq!(parse_param("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(
            parse_param("query=x=1&y=2"),
            Ok(("query".into(), "x=1&y=2".into()))
        );
        assert_eq!(parse_param("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_param("=v").unwrap_err().contains("no name"));
        assert!(parse_param(" =v").unwrap_err().contains("no name"));
        assert!(parse_param("novalue").unwrap_err().contains("NAME=VALUE"));
    }

    #[test]
    fn params_given_twice_are_refused() {
        let m = param_map(vec![("a".into(), "1".into()), ("b".into(), "x=y".into())])
            .expect("distinct names");
        assert_eq!(m["b"], "x=y");
        let e = param_map(vec![("a".into(), "1".into()), ("a".into(), "2".into())]);
        assert_eq!(e, Err("parameter \"a\" given twice".into()));
    }

    #[test]
    fn workflow_states_parse_in_any_case() {
        assert_eq!(parse_workflow_state("running"), Ok(WorkflowState::Running));
        assert_eq!(parse_workflow_state("RUNNING"), Ok(WorkflowState::Running));
        assert_eq!(
            parse_workflow_state("Succeeded"),
            Ok(WorkflowState::Succeeded)
        );
        assert_eq!(
            parse_workflow_state("workflow_state_cancelled"),
            Ok(WorkflowState::Cancelled)
        );
        assert!(parse_workflow_state("unspecified").is_err());
        let e = parse_workflow_state("done").unwrap_err();
        assert!(e.contains("unknown workflow state \"done\""), "{e}");
    }

    #[test]
    fn overlap_names_map_to_the_protocol() {
        assert_eq!(OverlapPolicy::from(OverlapArg::Skip), OverlapPolicy::Skip);
        assert_eq!(
            OverlapPolicy::from(OverlapArg::CancelPrevious),
            OverlapPolicy::CancelPrevious
        );
        assert_eq!(
            OverlapArg::from_str("cancel-previous", false),
            Ok(OverlapArg::CancelPrevious)
        );
        assert_eq!(
            OverlapArg::from_str("cancel_previous", false),
            Ok(OverlapArg::CancelPrevious)
        );
    }
}
