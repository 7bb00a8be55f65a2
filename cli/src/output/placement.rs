//! Placement explanations as people read them: why a queued task or a pending workflow
//! waits (`task get`, `task watch`, `submit --wait`, `workflow get|watch`, `status`).

use scabbard_common::proto::{Placement, PlacementReason, WaitingCount};

/// The reason code without its prefix, e.g. `MISSING_LABEL`.
pub(crate) fn code(p: &Placement) -> &'static str {
    p.reason()
        .as_str_name()
        .trim_start_matches("PLACEMENT_REASON_")
}

/// The reason in words, e.g. "missing label".
pub(crate) fn words(r: PlacementReason) -> String {
    match r {
        PlacementReason::Unspecified => "being placed".into(),
        other => other
            .as_str_name()
            .trim_start_matches("PLACEMENT_REASON_")
            .to_ascii_lowercase()
            .replace('_', " "),
    }
}

/// The lines of `task get` / `workflow get` for an explanation.
pub(crate) fn lines(p: &Placement) -> Vec<String> {
    let mut out = vec![format!("waiting:   {}", p.message)];
    let mut reason = format!("reason:    {}", code(p));
    if p.agents_considered > 0 || !p.filtered.is_empty() {
        reason.push_str(&format!(
            " ({}/{} agents eligible)",
            p.agents_eligible, p.agents_considered
        ));
    }
    out.push(reason);
    out
}

/// Whether two explanations say the same (their times aside).
pub(crate) fn same(a: Option<&Placement>, b: Option<&Placement>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.reason == b.reason && a.message == b.message,
        (None, None) => true,
        _ => false,
    }
}

/// The `waiting:` line of `scabbard status`, e.g. "2 tasks missing label, 1 workflow
/// concurrency group".
pub(crate) fn summary(counts: &[WaitingCount]) -> String {
    let plural = |n: u64, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    let mut parts = Vec::new();
    for c in counts {
        let why = words(c.reason());
        if c.tasks > 0 {
            parts.push(format!("{} {why}", plural(c.tasks, "task")));
        }
        if c.workflows > 0 {
            parts.push(format!("{} {why}", plural(c.workflows, "workflow")));
        }
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_as_people_write() {
        let p = Placement {
            reason: PlacementReason::MissingLabel as i32,
            message: "0/3 agents eligible: 3 missing label os=windows".into(),
            agents_considered: 3,
            ..Default::default()
        };
        assert_eq!(code(&p), "MISSING_LABEL");
        assert_eq!(
            lines(&p),
            [
                "waiting:   0/3 agents eligible: 3 missing label os=windows",
                "reason:    MISSING_LABEL (0/3 agents eligible)"
            ]
        );
        let counts = [
            WaitingCount {
                reason: PlacementReason::MissingLabel as i32,
                tasks: 2,
                workflows: 0,
            },
            WaitingCount {
                reason: PlacementReason::ConcurrencyGroup as i32,
                tasks: 1,
                workflows: 1,
            },
        ];
        assert_eq!(
            summary(&counts),
            "2 tasks missing label, 1 task concurrency group, 1 workflow concurrency group"
        );
        assert_eq!(summary(&[]), "nothing");
    }
}
