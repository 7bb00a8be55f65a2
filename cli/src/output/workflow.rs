//! Human-readable workflows: the tree of nodes (each indented under its dependencies)
//! that `workflow watch` redraws, the line-per-change log it prints when stdout is not a
//! terminal, and the workflow table. All pure functions from `proto::Workflow` to text.

use std::collections::{HashMap, HashSet};

use scabbard_common::proto::{NodeState, Workflow, WorkflowNode, WorkflowState};

use super::{ago, clip, table, utc};

/// `RUNNING`, `SUCCEEDED`, ...
pub(crate) fn workflow_state(s: WorkflowState) -> &'static str {
    s.as_str_name().trim_start_matches("WORKFLOW_STATE_")
}

/// `WAITING`, `RUNNING`, ...
pub(crate) fn node_state(s: NodeState) -> &'static str {
    s.as_str_name().trim_start_matches("NODE_STATE_")
}

/// Nothing moves a workflow out of these states.
pub(crate) fn is_final(s: WorkflowState) -> bool {
    matches!(
        s,
        WorkflowState::Succeeded | WorkflowState::Failed | WorkflowState::Cancelled
    )
}

fn node_final(s: NodeState) -> bool {
    matches!(
        s,
        NodeState::Succeeded | NodeState::Failed | NodeState::Cancelled | NodeState::Skipped
    )
}

fn name(w: &Workflow) -> &str {
    w.spec.as_ref().map_or("", |s| s.name.as_str())
}

/// `workflow <id> <name>  RUNNING  2/4 done[  cancel requested][ — message]`
pub(crate) fn header(w: &Workflow) -> String {
    let mut out = format!("workflow {}", w.id);
    if !name(w).is_empty() {
        out.push(' ');
        out.push_str(name(w));
    }
    out.push_str(&format!(
        "  {}  {}/{} done",
        workflow_state(w.state()),
        w.done,
        w.total
    ));
    if w.cancel_requested && !is_final(w.state()) {
        out.push_str("  cancel requested");
    }
    if !w.message.is_empty() {
        out.push_str(" — ");
        out.push_str(&w.message);
    }
    out
}

/// What a node line shows after its name: state, attempts, exit code, other
/// dependencies, message.
fn detail(n: &WorkflowNode, others: &[&str]) -> String {
    let state = n.state();
    let mut parts = vec![format!("{:<9}", node_state(state))];
    if n.attempts > 0 {
        parts.push(format!("attempt {}", n.attempts));
    }
    if node_final(state) && n.attempts > 0 {
        parts.push(format!("exit {}", n.exit_code));
    }
    if !others.is_empty() {
        parts.push(format!("after {}", others.join(", ")));
    }
    if !n.message.is_empty() {
        parts.push(format!("— {}", n.message));
    }
    parts.join("  ").trim_end().to_string()
}

/// The tree of a workflow's nodes under its header. Each node sits under its deepest
/// dependency (the latest in node order on a tie); a node's other dependencies are
/// named after its state (`after b, c`). Names are padded so the states line up.
pub(crate) fn tree(w: &Workflow) -> Vec<String> {
    let nodes = &w.nodes;
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let deps = |i: usize| -> Vec<usize> {
        nodes[i]
            .depends_on
            .iter()
            .filter_map(|d| index.get(d.as_str()).copied())
            .filter(|&d| d != i)
            .collect()
    };
    // Depth = the longest path from a root (cycles, which the controller refuses, are
    // cut where they close).
    let mut depth: Vec<Option<usize>> = vec![None; nodes.len()];
    fn depth_of(
        i: usize,
        deps: &dyn Fn(usize) -> Vec<usize>,
        depth: &mut Vec<Option<usize>>,
        on_path: &mut HashSet<usize>,
    ) -> usize {
        if let Some(d) = depth[i] {
            return d;
        }
        on_path.insert(i);
        let mut d = 0;
        for p in deps(i) {
            if !on_path.contains(&p) {
                d = d.max(depth_of(p, deps, depth, on_path) + 1);
            }
        }
        on_path.remove(&i);
        depth[i] = Some(d);
        d
    }
    let mut on_path = HashSet::new();
    for i in 0..nodes.len() {
        depth_of(i, &deps, &mut depth, &mut on_path);
    }
    let depth: Vec<usize> = depth.into_iter().map(Option::unwrap_or_default).collect();
    // Each node's parent in the tree: its deepest dependency above it.
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    let mut roots = Vec::new();
    for i in 0..nodes.len() {
        let parent = deps(i)
            .into_iter()
            .filter(|&p| depth[p] < depth[i])
            .max_by_key(|&p| (depth[p], p));
        match parent {
            Some(p) => children[p].push(i),
            None => roots.push(i),
        }
    }
    // (prefix + name, detail) per node, depth first.
    let mut rows: Vec<(String, String)> = Vec::new();
    fn walk(
        i: usize,
        lead: &str,
        branch: &str,
        nodes: &[WorkflowNode],
        children: &[Vec<usize>],
        parent: Option<usize>,
        rows: &mut Vec<(String, String)>,
    ) {
        let n = &nodes[i];
        let others: Vec<&str> = n
            .depends_on
            .iter()
            .map(String::as_str)
            .filter(|d| parent.is_none_or(|p| nodes[p].name != *d))
            .collect();
        rows.push((format!("{lead}{branch}{}", n.name), detail(n, &others)));
        let next_lead = format!(
            "{lead}{}",
            match branch {
                "├── " => "│   ",
                "└── " => "    ",
                _ => "",
            }
        );
        let kids = &children[i];
        for (k, &c) in kids.iter().enumerate() {
            let b = if k + 1 == kids.len() {
                "└── "
            } else {
                "├── "
            };
            walk(c, &next_lead, b, nodes, children, Some(i), rows);
        }
    }
    for &r in &roots {
        walk(r, "", "", nodes, &children, None, &mut rows);
    }
    let width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = vec![header(w)];
    if let Some(p) = &w.placement {
        out.push(format!("  waiting: {}", p.message));
    }
    for (left, right) in rows {
        let pad = width - left.chars().count() + 2;
        out.push(
            format!("  {left}{}{right}", " ".repeat(pad))
                .trim_end()
                .to_string(),
        );
    }
    out
}

/// `HH:MM:SS ` of the workflow's last change (UTC), or nothing when unknown.
fn stamp(w: &Workflow) -> String {
    if w.updated_at_ms > 0 {
        let full = utc(w.updated_at_ms);
        format!("{} ", &full[11..])
    } else {
        String::new()
    }
}

/// The lines to log for the change from `prev` to `cur` (plain output, one line per
/// change): the workflow's header when its state or progress moved, and each node
/// whose state, attempts or exit code changed. With no `prev`: the header and every
/// node.
pub(crate) fn changes(prev: Option<&Workflow>, cur: &Workflow) -> Vec<String> {
    let at = stamp(cur);
    let mut out = Vec::new();
    let moved = prev.is_none_or(|p| {
        p.state != cur.state
            || p.done != cur.done
            || p.total != cur.total
            || p.message != cur.message
            || p.cancel_requested != cur.cancel_requested
    });
    if moved {
        out.push(format!("{at}{}", header(cur)));
    }
    if let Some(p) = cur.placement.as_ref().filter(|_| {
        !super::placement::same(
            prev.and_then(|p| p.placement.as_ref()),
            cur.placement.as_ref(),
        )
    }) {
        out.push(format!("{at}waiting: {}", p.message));
    }
    let before: HashMap<&str, &WorkflowNode> = prev
        .map(|p| p.nodes.iter().map(|n| (n.name.as_str(), n)).collect())
        .unwrap_or_default();
    for n in &cur.nodes {
        let changed = before.get(n.name.as_str()).is_none_or(|b| {
            b.state != n.state
                || b.attempts != n.attempts
                || b.exit_code != n.exit_code
                || b.message != n.message
        });
        if changed {
            out.push(format!("{at}  {}  {}", n.name, detail(n, &[])));
        }
    }
    out
}

/// `1m05s`, `2h03m`, `12s` between two unix-ms times.
pub(crate) fn took(from_ms: i64, to_ms: i64) -> String {
    let s = (to_ms - from_ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// A table of workflows.
pub(crate) fn workflows(ws: &[Workflow]) {
    let rows = ws
        .iter()
        .map(|w| {
            let template = w.template.as_ref().map_or(String::new(), |t| {
                if t.name.is_empty() {
                    String::new()
                } else {
                    format!("{}@{}", t.name, t.version)
                }
            });
            [
                w.id.clone(),
                clip(name(w), 32),
                workflow_state(w.state()).to_string(),
                format!("{}/{}", w.done, w.total),
                w.project.clone(),
                template,
                ago(w.created_at_ms),
            ]
        })
        .collect();
    table(
        [
            "ID", "NAME", "STATE", "DONE", "PROJECT", "TEMPLATE", "CREATED",
        ],
        rows,
    );
}

#[cfg(test)]
mod tests;
