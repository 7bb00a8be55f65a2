//! The audit log's action names (`noun.verb`), shared by the controller (which refuses a
//! `ListAudit` filter naming none of them when nothing matches: a typo) and the CLI's help.
//! A new audited action adds its name here.

/// Every action the controller records, sorted.
pub const KNOWN: &[&str] = &[
    "agent.drain",
    "agent.remove",
    "agent.undrain",
    "breaker.reset",
    "cluster.bootstrap",
    "project.create",
    "project.delete",
    "project.update",
    "schedule.create",
    "schedule.delete",
    "schedule.pause",
    "schedule.resume",
    "schedule.trigger",
    "schedule.update",
    "task.cancel",
    "task.rerun",
    "task.submit",
    "template.run",
    "token.create",
    "token.revoke",
    "workflow.cancel",
    "workflow.rerun",
    "workflow.submit",
];

/// Whether `action` is a known action name.
pub fn is_known(action: &str) -> bool {
    KNOWN.contains(&action)
}

/// The error text for an unknown action filter.
pub fn unknown_message(action: &str) -> String {
    format!(
        "unknown audit action {action:?}; valid actions: {}",
        KNOWN.join(", ")
    )
}
