//! Checks of a submitted workflow: at least one task, valid and unique names, known
//! dependencies, no cycles, output references only to ancestors, and each node's task spec
//! (with the checks plain tasks get). Every structural problem is reported at once, naming
//! the tasks involved.

use std::collections::{BTreeSet, HashMap, HashSet};

use scabbard_common::proto::{FailurePolicy, WorkflowSpec};
use scabbard_common::{Error, Result};

use super::refs;
use crate::config::ControllerConfig;
use crate::core::validate as task_validate;

/// Most nodes in one workflow.
pub const MAX_NODES: usize = 1000;
/// Most dependency edges (`depends_on` entries of all nodes together) in one workflow:
/// the engine's work per node change grows with them.
pub const MAX_DEPENDENCIES: usize = 20_000;

/// Validates `spec` in place (fills each node's defaults, e.g. its timeout). Linear in the
/// size of the workflow (ancestry is one bit set per node), but a 1,000-node workflow still
/// takes milliseconds: callers on the core's path run it before the core sees the spec.
pub fn workflow_spec(spec: &mut WorkflowSpec, cfg: &ControllerConfig) -> Result<()> {
    crate::core::validate::size::check_workflow(spec, cfg)?;
    if spec.tasks.is_empty() {
        return Err(Error::invalid(
            "the workflow has no tasks: give at least one entry in tasks",
        ));
    }
    if spec.tasks.len() > MAX_NODES {
        return Err(Error::invalid(format!(
            "the workflow has {} tasks; at most {MAX_NODES}",
            spec.tasks.len()
        )));
    }
    let edges: usize = spec.tasks.iter().map(|t| t.depends_on.len()).sum();
    if edges > MAX_DEPENDENCIES {
        return Err(Error::invalid(format!(
            "the workflow has {edges} dependencies (depends_on entries); at most {MAX_DEPENDENCIES}"
        )));
    }
    if spec.name.len() > 256 {
        return Err(Error::invalid("name is longer than 256 bytes"));
    }
    if FailurePolicy::try_from(spec.failure_policy).is_err() {
        return Err(Error::invalid(format!(
            "failure_policy {} is unknown: use FAIL_FAST or CONTINUE",
            spec.failure_policy
        )));
    }
    if !(-1000..=1000).contains(&spec.priority) {
        return Err(Error::invalid(format!(
            "priority {} is out of range -1000..=1000",
            spec.priority
        )));
    }
    if let Some(r) = &spec.default_retry {
        task_validate::extras::retry("default_retry", r)?;
    }
    if let Some(g) = &spec.concurrency {
        task_validate::extras::group_key("concurrency.key", &g.key)?;
    }
    // Every problem in one answer: the structure, the expressions (their syntax alone
    // while the structure is broken: ancestry needs an acyclic graph of known names) and
    // each node's spec.
    let mut errors = structure(spec);
    if errors.is_empty() {
        errors.extend(references(spec));
    } else {
        errors.extend(expression_syntax(spec));
    }
    for (i, t) in spec.tasks.iter_mut().enumerate() {
        let Some(task) = t.spec.as_mut() else {
            errors.push(format!("tasks[{i}] ({}): spec is required", t.name));
            continue;
        };
        // References are filled in at release; check the spec with stand-in values.
        let mut probe = task.clone();
        refs::for_each_string(&mut probe, &mut |_, s| {
            if let Ok(v) = refs::substitute(s, &|_| Some("x".into())) {
                *s = v;
            }
        });
        match task_validate::task_spec(&mut probe, cfg) {
            Ok(()) => task.timeout_ms = probe.timeout_ms,
            Err(e) => errors.push(format!("tasks[{i}] ({}): {}", t.name, e)),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid(errors.join("; ")))
    }
}

/// Names, dependencies and cycles.
fn structure(spec: &WorkflowSpec) -> Vec<String> {
    let mut errors = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut dups: BTreeSet<&str> = BTreeSet::new();
    for (i, t) in spec.tasks.iter().enumerate() {
        if !name_ok(&t.name) {
            errors.push(format!(
                "tasks[{i}] name {:?} is invalid: 1..64 letters, digits, '_' or '-'",
                t.name
            ));
        }
        if seen.insert(t.name.as_str(), i).is_some() {
            dups.insert(t.name.as_str());
        }
    }
    if !dups.is_empty() {
        errors.push(format!(
            "duplicate task names: {}",
            dups.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    for t in &spec.tasks {
        let mut unknown: Vec<&str> = t
            .depends_on
            .iter()
            .map(String::as_str)
            .filter(|d| !seen.contains_key(d))
            .collect();
        unknown.dedup();
        if !unknown.is_empty() {
            errors.push(format!(
                "task {} depends on unknown task(s): {}",
                t.name,
                unknown.join(", ")
            ));
        }
        let mut uniq = HashSet::new();
        if let Some(d) = t.depends_on.iter().find(|d| !uniq.insert(d.as_str())) {
            errors.push(format!("task {} lists dependency {d} twice", t.name));
        }
    }
    if let Some(cycle) = find_cycle(spec) {
        errors.push(format!(
            "the dependencies form a cycle: {}",
            cycle.join(" -> ")
        ));
    }
    errors
}

/// One cycle as a closed path (first name repeated at the end), if any.
fn find_cycle(spec: &WorkflowSpec) -> Option<Vec<String>> {
    let index: HashMap<&str, usize> = spec
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    // 0 = unvisited, 1 = on the stack, 2 = done.
    let mut mark = vec![0u8; spec.tasks.len()];
    let mut stack: Vec<usize> = Vec::new();
    for root in 0..spec.tasks.len() {
        if mark[root] != 0 {
            continue;
        }
        // Iterative DFS: (node, next dependency index).
        let mut frames: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = 1;
        stack.push(root);
        while let Some(&mut (node, ref mut next)) = frames.last_mut() {
            let deps = &spec.tasks[node].depends_on;
            if *next < deps.len() {
                let dep = index.get(deps[*next].as_str()).copied();
                *next += 1;
                // An unknown dependency is reported on its own; it closes no cycle.
                let Some(dep) = dep else { continue };
                match mark[dep] {
                    0 => {
                        mark[dep] = 1;
                        stack.push(dep);
                        frames.push((dep, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|&n| n == dep).unwrap_or(0);
                        // Dependencies point backwards in time: print in run order.
                        let mut path: Vec<String> = stack[from..]
                            .iter()
                            .rev()
                            .map(|&n| spec.tasks[n].name.clone())
                            .collect();
                        path.push(path[0].clone());
                        return Some(path);
                    }
                    _ => {}
                }
            } else {
                mark[node] = 2;
                stack.pop();
                frames.pop();
            }
        }
    }
    None
}

/// Every node's ancestors (direct or indirect dependencies), one bit set per node, built
/// once in dependency order: O(edges x nodes / 64). Needs a checked, acyclic spec.
pub struct Ancestry<'a> {
    index: HashMap<&'a str, usize>,
    words: usize,
    bits: Vec<u64>,
}

impl<'a> Ancestry<'a> {
    /// The ancestry of `spec`'s nodes (names unique, dependencies known, no cycle).
    pub fn of(spec: &'a WorkflowSpec) -> Self {
        let n = spec.tasks.len();
        let index: HashMap<&str, usize> = spec
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let words = n.div_ceil(64).max(1);
        let mut bits = vec![0u64; n * words];
        let mut done = vec![false; n];
        // Iterative post-order: a node's set is the union of its dependencies' sets and
        // the dependencies themselves.
        for root in 0..n {
            let mut stack = vec![(root, false)];
            while let Some((node, expanded)) = stack.pop() {
                if done[node] {
                    continue;
                }
                let deps: Vec<usize> = spec.tasks[node]
                    .depends_on
                    .iter()
                    .filter_map(|d| index.get(d.as_str()).copied())
                    .collect();
                if !expanded {
                    stack.push((node, true));
                    stack.extend(deps.iter().filter(|d| !done[**d]).map(|d| (*d, false)));
                    continue;
                }
                for d in deps {
                    for w in 0..words {
                        let v = bits[d * words + w];
                        bits[node * words + w] |= v;
                    }
                    bits[node * words + d / 64] |= 1 << (d % 64);
                }
                done[node] = true;
            }
        }
        Self { index, words, bits }
    }

    /// Whether `name` is an ancestor of node `i`.
    pub fn is_ancestor(&self, i: usize, name: &str) -> bool {
        self.index
            .get(name)
            .is_some_and(|&a| self.bits[i * self.words + a / 64] & (1 << (a % 64)) != 0)
    }

    /// The index of node `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
}

/// Output and artifact references and conditions: well-formed, to an ancestor (and to an
/// artifact it declares).
fn references(spec: &WorkflowSpec) -> Vec<String> {
    let anc = Ancestry::of(spec);
    let mut errors = Vec::new();
    for (i, t) in spec.tasks.iter().enumerate() {
        errors.extend(artifact_references(spec, i, &anc));
        errors.extend(condition(i, &t.name, &t.when, &anc));
    }
    for (i, t) in spec.tasks.iter().enumerate() {
        let Some(task) = t.spec.clone() else {
            continue;
        };
        let mut task = task;
        refs::for_each_string(&mut task, &mut |field, s| match refs::scan(s) {
            Err(e) => errors.push(format!("tasks[{i}] ({}) {field}: {e}", t.name)),
            Ok(found) => {
                for r in found {
                    if !anc.is_ancestor(i, &r.task) {
                        errors.push(format!(
                            "tasks[{i}] ({}) {field} references tasks.{}.outputs.{} but {} is not among its dependencies (direct or indirect)",
                            t.name, r.task, r.output, r.task
                        ));
                    }
                }
            }
        });
    }
    errors
}

/// The syntax of every `${{ … }}` expression and `when` condition, without the ancestry
/// checks (for a workflow whose structure is already refused).
fn expression_syntax(spec: &WorkflowSpec) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, t) in spec.tasks.iter().enumerate() {
        if let Err(e) = refs::scan(&t.when) {
            errors.push(format!("tasks[{i}] ({}) when: {e}", t.name));
        }
        let Some(mut task) = t.spec.clone() else {
            continue;
        };
        refs::for_each_string(&mut task, &mut |field, s| {
            if let Err(e) = refs::scan(s) {
                errors.push(format!("tasks[{i}] ({}) {field}: {e}", t.name));
            }
        });
    }
    errors
}

/// The `inputs` of node `i` that name another node's artifact: that node exists, is an
/// ancestor, and declares the artifact.
fn artifact_references(spec: &WorkflowSpec, i: usize, anc: &Ancestry<'_>) -> Vec<String> {
    use crate::core::validate::artifacts::{InputSource, parse_from};
    let t = &spec.tasks[i];
    let mut errors = Vec::new();
    let Some(task) = t.spec.as_ref() else {
        return errors;
    };
    for (j, input) in task.inputs.iter().enumerate() {
        let field = format!("tasks[{i}] ({}) inputs[{j}].from", t.name);
        let (node, name) = match parse_from(&input.from) {
            Ok(InputSource::Node { node, name }) => (node, name),
            Ok(InputSource::Task { .. }) => continue,
            Err(why) => {
                errors.push(format!("{field}: {why}"));
                continue;
            }
        };
        let Some(p) = anc.index(&node) else {
            errors.push(format!(
                "{field} references tasks.{node}.artifacts.{name} but there is no task {node}"
            ));
            continue;
        };
        let producer = &spec.tasks[p];
        if !anc.is_ancestor(i, &node) {
            let cycle = if node == t.name {
                " (a task cannot take its own artifacts)".to_string()
            } else if anc.is_ancestor(p, &t.name) {
                format!(
                    " — and {node} depends on {}, so it would be a cycle: {} -> {node} -> {}",
                    t.name, t.name, t.name
                )
            } else {
                String::new()
            };
            errors.push(format!(
                "{field} references tasks.{node}.artifacts.{name} but {node} is not among its dependencies (direct or indirect){cycle}"
            ));
            continue;
        }
        let declared: Vec<&str> = producer
            .spec
            .iter()
            .flat_map(|s| s.artifacts.iter().map(|a| a.name.as_str()))
            .collect();
        if !declared.contains(&name.as_str()) {
            errors.push(format!(
                "{field} references tasks.{node}.artifacts.{name} but {node} declares no artifact {name} (it declares: {})",
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            ));
        }
    }
    errors
}

/// A node's `when`: "", "true" or "false", or output references (to ancestors) that make
/// one of them at release.
fn condition(i: usize, name: &str, when: &str, anc: &Ancestry<'_>) -> Vec<String> {
    let field = format!("tasks[{i}] ({name}) when");
    match refs::scan(when) {
        Err(e) => vec![format!("{field}: {e}")],
        Ok(found) if found.is_empty() => {
            if matches!(when.trim(), "" | "true" | "false") {
                Vec::new()
            } else {
                vec![format!(
                    "{field} is {when:?}: it must be true or false once rendered"
                )]
            }
        }
        Ok(found) => found
            .into_iter()
            .filter(|r| !anc.is_ancestor(i, &r.task))
            .map(|r| {
                format!(
                    "{field} references tasks.{}.outputs.{} but {} is not among its dependencies (direct or indirect)",
                    r.task, r.output, r.task
                )
            })
            .collect(),
    }
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests;
