//! The run queue and agent matching. Each project's queue orders its tasks by priority
//! (high first), then by arrival; the dispatcher serves projects fairly. Matching picks, among connected agents that are not draining, have a free
//! slot, advertise every required capability and carry every required label, the one with
//! the most free capacity.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use scabbard_common::proto::TaskSpec;

/// Position of a task in its project's queue.
pub(crate) type QueueKey = (Reverse<i32>, u64, String);

/// Queued tasks, one queue per project, each in dispatch order (priority, then arrival).
/// The dispatcher takes from the projects in fair order (fewest running tasks first), so a
/// flood in one project does not starve another.
#[derive(Default)]
pub(crate) struct RunQueue {
    projects: HashMap<String, BTreeSet<QueueKey>>,
    /// Project of each queued task.
    project_of: HashMap<String, String>,
    next_seq: u64,
    len: usize,
}

impl RunQueue {
    /// Adds a task of `project`; returns its key (needed to remove it).
    pub(crate) fn push(&mut self, task_id: &str, priority: i32, project: &str) -> QueueKey {
        self.next_seq += 1;
        let key = (Reverse(priority), self.next_seq, task_id.to_string());
        if let Some(old) = self.project_of.get(task_id)
            && old != project
        {
            // Defensive: a task is only ever in one project's queue.
            return key;
        }
        if self
            .projects
            .entry(project.to_string())
            .or_default()
            .insert(key.clone())
        {
            self.project_of
                .insert(task_id.to_string(), project.to_string());
            self.len += 1;
        }
        key
    }

    /// Removes a task by its key.
    pub(crate) fn remove(&mut self, key: &QueueKey) -> bool {
        let Some(project) = self.project_of.get(&key.2) else {
            return false;
        };
        let Some(q) = self.projects.get_mut(project) else {
            return false;
        };
        let removed = q.remove(key);
        if removed {
            self.len -= 1;
            if q.is_empty() {
                self.projects.remove(project);
            }
            self.project_of.remove(&key.2);
        }
        removed
    }

    /// Tasks of `project` in the queue.
    pub(crate) fn queued_in(&self, project: &str) -> u32 {
        self.projects.get(project).map_or(0, |q| q.len() as u32)
    }

    /// Number of queued tasks.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Each project with a non-empty queue, and its keys in dispatch order.
    pub(crate) fn projects(&self) -> impl Iterator<Item = (&str, &BTreeSet<QueueKey>)> {
        self.projects.iter().map(|(p, q)| (p.as_str(), q))
    }
}

/// What the matcher needs to know of an agent.
pub(crate) struct Candidate<'a> {
    pub(crate) id: &'a str,
    pub(crate) capabilities: &'a [String],
    pub(crate) labels: &'a HashMap<String, String>,
    pub(crate) slots: u32,
    pub(crate) running: u32,
}

/// The capability an executor needs for this spec.
pub(crate) fn executor_capability(spec: &TaskSpec) -> Option<&'static str> {
    use scabbard_common::proto::task_spec::Kind;
    match spec.kind.as_ref()? {
        Kind::Shell(_) => Some("shell"),
        Kind::Noop(_) => Some("noop"),
        Kind::Container(_) | Kind::DaggerCall(_) => Some("dagger"),
    }
}

/// Whether `agent` can run `spec` at all (ignoring free slots).
pub(crate) fn fits(spec: &TaskSpec, agent: &Candidate<'_>) -> bool {
    if let Some(cap) = executor_capability(spec)
        && !agent.capabilities.iter().any(|c| c == cap)
    {
        return false;
    }
    let Some(req) = spec.requirements.as_ref() else {
        return true;
    };
    req.capabilities
        .iter()
        .all(|c| agent.capabilities.iter().any(|a| a == c))
        && req
            .labels
            .iter()
            .all(|(k, v)| agent.labels.get(k) == Some(v))
}

/// The best agent for `spec` among `agents`: fits, has a free slot, most free slots
/// (ties: lowest running count, then id for determinism).
pub(crate) fn pick<'a>(
    spec: &TaskSpec,
    agents: impl Iterator<Item = Candidate<'a>>,
) -> Option<&'a str> {
    agents
        .filter(|a| a.running < a.slots && fits(spec, a))
        .max_by(|a, b| {
            let fa = a.slots - a.running;
            let fb = b.slots - b.running;
            fa.cmp(&fb)
                .then(b.running.cmp(&a.running))
                .then(b.id.cmp(a.id))
        })
        .map(|a| a.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use scabbard_common::proto::{NoopTask, Requirements, ShellTask, task_spec::Kind};

    fn shell_spec(caps: &[&str], labels: &[(&str, &str)]) -> TaskSpec {
        TaskSpec {
            kind: Some(Kind::Shell(ShellTask {
                command: vec!["true".into()],
            })),
            requirements: Some(Requirements {
                capabilities: caps.iter().map(|s| s.to_string()).collect(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn queue_orders_by_priority_then_arrival_per_project() {
        let mut q = RunQueue::default();
        q.push("a", 0, "p");
        q.push("b", 5, "p");
        let c = q.push("c", 0, "p");
        q.push("x", 9, "other");
        assert_eq!(q.queued_in("p"), 3);
        q.push("d", 5, "p");
        let (_, keys) = q.projects().find(|(p, _)| *p == "p").unwrap();
        let order: Vec<_> = keys.iter().map(|k| k.2.clone()).collect();
        assert_eq!(order, ["b", "d", "a", "c"]);
        assert!(q.remove(&c));
        assert!(!q.remove(&c));
        assert_eq!(q.len(), 4);
        assert_eq!(q.queued_in("other"), 1);
    }

    #[test]
    fn pick_respects_capabilities_labels_and_slots() {
        let caps_shell = vec!["shell".to_string(), "noop".to_string()];
        let caps_gpu = vec!["shell".to_string(), "gpu".to_string()];
        let linux: HashMap<String, String> = [("os".to_string(), "linux".to_string())].into();
        let none = HashMap::new();
        let agents = || {
            vec![
                Candidate {
                    id: "a1",
                    capabilities: &caps_shell,
                    labels: &linux,
                    slots: 2,
                    running: 2,
                },
                Candidate {
                    id: "a2",
                    capabilities: &caps_gpu,
                    labels: &none,
                    slots: 4,
                    running: 0,
                },
                Candidate {
                    id: "a3",
                    capabilities: &caps_shell,
                    labels: &linux,
                    slots: 4,
                    running: 1,
                },
            ]
            .into_iter()
        };
        assert_eq!(
            pick(&shell_spec(&[], &[("os", "linux")]), agents()),
            Some("a3")
        );
        assert_eq!(pick(&shell_spec(&["gpu"], &[]), agents()), Some("a2"));
        assert_eq!(
            pick(&shell_spec(&["gpu"], &[("os", "linux")]), agents()),
            None
        );
        let noop = TaskSpec {
            kind: Some(Kind::Noop(NoopTask {})),
            ..Default::default()
        };
        assert_eq!(pick(&noop, agents()), Some("a3"));
    }
}
