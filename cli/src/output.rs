//! Human-readable output of tasks, agents, tokens, projects and the audit log; workflows
//! in [`workflow`], templates, schedules and breakers in [`catalog`]. (JSON and YAML are
//! printed by [`crate::render`].)

use scabbard_common::proto::{
    Agent, AgentStatus, AuditEntry, Project, Scope, Task, TaskState, TokenInfo, TokenKind,
};
use tonic::Code;

pub(crate) mod catalog;
pub(crate) mod placement;
pub(crate) mod workflow;

/// Turns an RPC failure into a one-line error a person can act on, naming the gRPC code
/// as the protocol spells it (`UNAUTHENTICATED`, `PERMISSION_DENIED`, ...).
pub(crate) fn status(s: tonic::Status) -> anyhow::Error {
    let hint = match s.code() {
        Code::Unauthenticated => {
            "; check the token (--token, SCABBARD_TOKEN) or run `scabbard login`"
        }
        Code::PermissionDenied => "; `scabbard whoami` shows the token's scopes and project",
        _ => "",
    };
    crate::exit::Refused {
        code: s.code(),
        text: format!("{} ({}{hint})", s.message(), code_name(s.code())),
    }
    .into()
}

pub(crate) use scabbard_common::error::code_name;

/// `QUEUED`, `RUNNING`, ...
pub(crate) fn state_name(s: TaskState) -> &'static str {
    s.as_str_name().trim_start_matches("TASK_STATE_")
}

pub(crate) fn ago(ms: i64) -> String {
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
        Some(Kind::Container(c)) => format!(
            "{} ({} step{})",
            c.image,
            c.steps.len(),
            if c.steps.len() == 1 { "" } else { "s" }
        ),
        Some(Kind::DaggerCall(d)) => format!(
            "dagger call -m {} {} {}",
            d.module,
            d.function,
            d.args.join(" ")
        ),
        None => String::new(),
    }
}

/// One task, in detail.
pub(crate) fn task(t: &Task) {
    say!("id:        {}", t.id);
    say!("state:     {}", state_name(t.state()));
    say!("command:   {}", what(t));
    if !t.project.is_empty() {
        say!("project:   {}", t.project);
    }
    say!("created:   {}", ago(t.created_at_ms));
    if let Some(p) = &t.placement {
        for line in placement::lines(p) {
            say!("{line}");
        }
    }
    if !t.agent_id.is_empty() {
        say!("agent:     {}", t.agent_id);
    }
    if let Some(r) = &t.result {
        say!("exit code: {}", r.exit_code);
        if !r.message.is_empty() {
            say!("message:   {}", r.message);
        }
    }
    if t.cancel_requested && !scabbard_common::is_final(t.state()) {
        say!("cancel:    requested");
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
        say!(
            "attempt {}: agent {} — {}",
            a.number,
            a.agent_id,
            outcome.trim_end()
        );
    }
}

/// A table of tasks (one page of it); the header only with `header`.
pub(crate) fn tasks_page(ts: &[Task], header: bool) {
    if header {
        say!("{:<28} {:<10} {:<10} COMMAND", "ID", "STATE", "CREATED");
    }
    for t in ts {
        // Cut on a character (a byte cut could split one and panic), before escaping.
        let mut cmd = what(t);
        if cmd.chars().count() > 60 {
            cmd = cmd.chars().take(57).collect();
            cmd.push_str("...");
        }
        say!(
            "{:<28} {:<10} {:<10} {cmd}",
            t.id,
            state_name(t.state()),
            ago(t.created_at_ms)
        );
    }
}

/// A table of agents.
pub(crate) fn agents(agents: &[Agent]) {
    say!(
        "{:<34} {:<16} {:<13} {:>7} {:<12} CAPABILITIES",
        "ID",
        "NAME",
        "STATUS",
        "RUNNING",
        "PROJECT"
    );
    for a in agents {
        let status = AgentStatus::try_from(a.status)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("AGENT_STATUS_")
                    .to_string()
            })
            .unwrap_or_default();
        say!(
            "{:<34} {:<16} {:<13} {:>3}/{:<3} {:<12} {}",
            a.id,
            a.name,
            status,
            a.running,
            a.slots,
            if a.project.is_empty() {
                "*"
            } else {
                &a.project
            },
            a.capabilities.join(",")
        );
    }
}

/// `-` for 0 (no limit).
fn limit(n: u32) -> String {
    if n == 0 { "-".into() } else { n.to_string() }
}

/// `admin`, `read,submit`, ...
pub(crate) fn scopes(t: &TokenInfo) -> String {
    let names: Vec<String> = t
        .scopes
        .iter()
        .map(|s| {
            Scope::try_from(*s).map_or_else(
                |_| s.to_string(),
                |s| {
                    s.as_str_name()
                        .trim_start_matches("SCOPE_")
                        .to_ascii_lowercase()
                },
            )
        })
        .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

/// `api`, `registration`, `agent`.
pub(crate) fn kind(t: &TokenInfo) -> String {
    t.kind()
        .as_str_name()
        .trim_start_matches("TOKEN_KIND_")
        .to_ascii_lowercase()
}

/// `in 3d`, `5h ago`, ... (rounded to the nearest unit).
fn relative(ms: i64) -> String {
    let d = ms - scabbard_common::time::now_ms();
    let secs = d.unsigned_abs().div_ceil(1000);
    let round = |unit: u64| (secs + unit / 2) / unit;
    let amount = match secs {
        0..=59 => format!("{secs}s"),
        60..=3569 => format!("{}m", round(60)),
        3570..=170_999 => format!("{}h", round(3600)),
        _ => format!("{}d", round(86_400)),
    };
    if d >= 0 {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// When a token expires: `never`, `in 29d`, `2h ago`.
pub(crate) fn expires(t: &TokenInfo) -> String {
    if t.expires_at_ms <= 0 {
        "never".into()
    } else {
        relative(t.expires_at_ms)
    }
}

/// `active`, `revoked` or `expired`.
pub(crate) fn token_state(t: &TokenInfo) -> &'static str {
    if t.revoked {
        "revoked"
    } else if t.expires_at_ms > 0 && t.expires_at_ms <= scabbard_common::time::now_ms() {
        "expired"
    } else {
        "active"
    }
}

/// `3` (unlimited), `3/10`, or `-` (not counted).
fn uses(t: &TokenInfo) -> String {
    match (t.kind(), t.max_uses) {
        (TokenKind::Registration, 0) => t.uses.to_string(),
        (TokenKind::Registration, max) => format!("{}/{max}", t.uses),
        _ => "-".into(),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Prints `rows` under `headers`, each column as wide as its widest cell (the last one
/// not padded).
fn table<const N: usize>(headers: [&str; N], rows: Vec<[String; N]>) {
    // Cells come from the server: escaped before they are measured.
    let rows: Vec<[String; N]> = rows
        .into_iter()
        .map(|r| r.map(|c| crate::printable::printable(&c).into_owned()))
        .collect();
    let mut widths = headers.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(c);
            } else {
                out.push_str(c);
                out.extend(std::iter::repeat_n(' ', w - c.chars().count() + 2));
            }
        }
        say!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// A table of tokens.
pub(crate) fn tokens(ts: &[TokenInfo]) {
    let rows = ts
        .iter()
        .map(|t| {
            [
                t.id.clone(),
                kind(t),
                clip(&t.name, 32),
                t.project.clone(),
                scopes(t),
                t.hint.clone(),
                ago(t.created_at_ms),
                expires(t),
                uses(t),
                token_state(t).to_string(),
            ]
        })
        .collect();
    table(
        [
            "ID", "KIND", "NAME", "PROJECT", "SCOPES", "HINT", "CREATED", "EXPIRES", "USES",
            "STATE",
        ],
        rows,
    );
}

/// One token, in detail.
pub(crate) fn token(t: &TokenInfo) {
    say!("id:         {}", t.id);
    say!("name:       {}", t.name);
    say!("kind:       {}", kind(t));
    say!("scopes:     {}", scopes(t));
    say!(
        "project:    {}{}",
        t.project,
        if t.project == "*" {
            " (every project)"
        } else {
            ""
        }
    );
    say!("hint:       {}", t.hint);
    say!("created:    {} by {}", ago(t.created_at_ms), t.created_by);
    say!("expires:    {}", expires(t));
    if t.kind() == TokenKind::Registration {
        say!("uses:       {}", uses(t));
    }
    if !t.agent_id.is_empty() {
        say!("agent:      {}", t.agent_id);
    }
    say!("state:      {}", token_state(t));
}

/// One project, in detail.
pub(crate) fn project(p: &Project) {
    let q = p.quota.unwrap_or_default();
    say!("name:         {}", p.name);
    say!("description:  {}", p.description);
    say!("created:      {}", ago(p.created_at_ms));
    say!("max queued:   {}", limit(q.max_queued_tasks));
    say!("max running:  {}", limit(q.max_running_tasks));
    say!(
        "rate:         {} requests/s per token",
        limit(q.requests_per_second)
    );
    say!("burst:        {}", limit(q.burst));
    say!("retention:    {}", retention(p.retention_days));
}

/// A project's retention setting, for people.
pub(crate) fn retention(days: f64) -> String {
    if days <= 0.0 {
        "the controller's (retention_days)".into()
    } else {
        format!("{days} days")
    }
}

/// A table of projects.
pub(crate) fn projects(ps: &[Project]) {
    let rows = ps
        .iter()
        .map(|p| {
            let q = p.quota.unwrap_or_default();
            [
                p.name.clone(),
                limit(q.max_queued_tasks),
                limit(q.max_running_tasks),
                limit(q.requests_per_second),
                limit(q.burst),
                if p.retention_days > 0.0 {
                    format!("{}d", p.retention_days)
                } else {
                    "-".into()
                },
                ago(p.created_at_ms),
                p.description.clone(),
            ]
        })
        .collect();
    table(
        [
            "NAME",
            "MAX QUEUED",
            "MAX RUNNING",
            "RATE",
            "BURST",
            "RETENTION",
            "CREATED",
            "DESCRIPTION",
        ],
        rows,
    );
}

/// A table of audit entries.
pub(crate) fn audit(es: &[AuditEntry]) {
    let rows = es
        .iter()
        .map(|e| {
            let actor = match (e.actor_name.as_str(), e.actor.as_str()) {
                ("", id) => id.to_string(),
                (name, "") => name.to_string(),
                (name, id) => format!("{name} ({id})"),
            };
            let detail = match (e.detail.as_str(), e.peer.as_str()) {
                (d, "") => d.to_string(),
                ("", peer) => format!("[from {peer}]"),
                (d, peer) => format!("{d} [from {peer}]"),
            };
            [
                utc(e.at_ms),
                e.action.clone(),
                e.project.clone(),
                e.target.clone(),
                actor,
                detail,
            ]
        })
        .collect();
    table(
        [
            "TIME (UTC)",
            "ACTION",
            "PROJECT",
            "TARGET",
            "ACTOR",
            "DETAIL",
        ],
        rows,
    );
}

/// `2025-03-01 14:05:09` (UTC) for milliseconds since the epoch.
pub(crate) fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_735_689_599_000), "2024-12-31 23:59:59");
    }

    #[test]
    fn long_multibyte_names_are_cut_on_characters() {
        let t = Task {
            spec: Some(scabbard_common::proto::TaskSpec {
                name: "é".repeat(70),
                ..Default::default()
            }),
            ..Default::default()
        };
        tasks_page(&[t], true);
    }

    #[test]
    fn names_codes_as_grpc_does() {
        let e = status(tonic::Status::unauthenticated("token revoked")).to_string();
        assert!(e.starts_with("token revoked (UNAUTHENTICATED"), "{e}");
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
    }
}
