//! Human-readable output of tasks and agents.

use scabbard_common::proto::{Agent, AgentStatus, Task, TaskState};

/// Turns an RPC failure into a one-line error a person can act on.
pub(crate) fn status(s: tonic::Status) -> anyhow::Error {
    let code = format!("{:?}", s.code());
    anyhow::anyhow!("{} ({})", s.message(), code)
}

/// `QUEUED`, `RUNNING`, ...
pub(crate) fn state_name(s: TaskState) -> &'static str {
    s.as_str_name().trim_start_matches("TASK_STATE_")
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = (scabbard_common::time::now_ms() - ms).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

fn what(t: &Task) -> String {
    use scabbard_common::proto::task_spec::Kind;
    let Some(spec) = &t.spec else {
        return String::new();
    };
    if !spec.name.is_empty() {
        return spec.name.clone();
    }
    match &spec.kind {
        Some(Kind::Shell(s)) => s.command.join(" "),
        Some(Kind::Noop(_)) => "(noop)".into(),
        None => String::new(),
    }
}

/// One task, in detail.
pub(crate) fn task(t: &Task) {
    println!("id:        {}", t.id);
    println!("state:     {}", state_name(t.state()));
    println!("command:   {}", what(t));
    println!("created:   {}", ago(t.created_at_ms));
    if !t.agent_id.is_empty() {
        println!("agent:     {}", t.agent_id);
    }
    if let Some(r) = &t.result {
        println!("exit code: {}", r.exit_code);
        if !r.message.is_empty() {
            println!("message:   {}", r.message);
        }
    }
    if t.cancel_requested && !scabbard_common::is_final(t.state()) {
        println!("cancel:    requested");
    }
    for a in &t.attempts {
        let outcome = a.result.as_ref().map_or("running".to_string(), |r| {
            format!(
                "{} exit={} {}",
                r.outcome().as_str_name().trim_start_matches("OUTCOME_"),
                r.exit_code,
                r.message
            )
        });
        println!(
            "attempt {}: agent {} — {}",
            a.number,
            a.agent_id,
            outcome.trim_end()
        );
    }
}

/// A table of tasks.
pub(crate) fn tasks(ts: &[Task]) {
    println!("{:<28} {:<10} {:<10} COMMAND", "ID", "STATE", "CREATED");
    for t in ts {
        let mut cmd = what(t);
        if cmd.len() > 60 {
            cmd.truncate(57);
            cmd.push_str("...");
        }
        println!(
            "{:<28} {:<10} {:<10} {cmd}",
            t.id,
            state_name(t.state()),
            ago(t.created_at_ms)
        );
    }
}

/// A table of agents.
pub(crate) fn agents(agents: &[Agent]) {
    println!(
        "{:<34} {:<16} {:<13} {:>7} CAPABILITIES",
        "ID", "NAME", "STATUS", "RUNNING"
    );
    for a in agents {
        let status = AgentStatus::try_from(a.status)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("AGENT_STATUS_")
                    .to_string()
            })
            .unwrap_or_default();
        println!(
            "{:<34} {:<16} {:<13} {:>3}/{:<3} {}",
            a.id,
            a.name,
            status,
            a.running,
            a.slots,
            a.capabilities.join(",")
        );
    }
}
