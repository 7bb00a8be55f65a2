//! The run queue and agent matching. Each project's queue orders its tasks by priority
//! (high first), then by arrival, and is split by **placement class** (what decides which
//! agents can take a task: executor, GPUs, required capabilities and labels, concurrency
//! group, breakers), so the dispatcher tests a class once per round instead of every task
//! in it: 10,000 tasks asking for a label no worker has cost one look, not 10,000. The
//! dispatcher serves projects fairly. Matching picks, among connected agents that are not
//! draining, have a free slot, advertise every required capability and carry every
//! required label, the one with the most free capacity.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use scabbard_common::proto::TaskSpec;

/// Position of a task in its project's queue.
pub(crate) type QueueKey = (Reverse<i32>, u64, String);

/// What decides where a task may run (see [`placement_class`]); tasks of one class are
/// placeable on exactly the same agents.
pub(crate) type PlacementClass = Arc<str>;

/// The placement class of `spec`: every field [`fits`] and the dispatcher's holds
/// (concurrency group, breakers) look at, in a canonical order.
pub(crate) fn placement_class(spec: Option<&TaskSpec>) -> PlacementClass {
    use std::fmt::Write;
    let Some(spec) = spec else {
        return Arc::from("");
    };
    let mut s = String::new();
    let _ = write!(
        s,
        "x={}|g={}",
        executor_capability(spec).unwrap_or(""),
        needs_gpu(spec) as u8
    );
    if let Some(req) = spec.requirements.as_ref() {
        let mut caps: Vec<&String> = req.capabilities.iter().collect();
        caps.sort();
        caps.dedup();
        for c in caps {
            let _ = write!(s, "|c={}", c.escape_default());
        }
        let mut labels: Vec<(&String, &String)> = req.labels.iter().collect();
        labels.sort();
        for (k, v) in labels {
            let _ = write!(s, "|l={}={}", k.escape_default(), v.escape_default());
        }
    }
    if let Some(g) = spec.concurrency.as_ref() {
        let _ = write!(s, "|cg={}/{}", g.limit, g.key.escape_default());
    }
    for b in &spec.breakers {
        let _ = write!(s, "|b={}", b.escape_default());
    }
    Arc::from(s)
}

/// One project's queued tasks, by placement class, each in dispatch order.
#[derive(Default)]
pub(crate) struct ProjectQueue {
    classes: HashMap<PlacementClass, BTreeSet<QueueKey>>,
    len: usize,
}

impl ProjectQueue {
    /// Number of queued tasks.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Each placement class and its keys in dispatch order.
    #[cfg(test)]
    pub(crate) fn classes(&self) -> impl Iterator<Item = &BTreeSet<QueueKey>> {
        self.classes.values()
    }

    /// Each placement class with its keys in dispatch order.
    pub(crate) fn by_class(&self) -> impl Iterator<Item = (&PlacementClass, &BTreeSet<QueueKey>)> {
        self.classes.iter()
    }
}

/// Queued tasks, one queue per project (split by placement class), each in dispatch order
/// (priority, then arrival). The dispatcher takes from the projects in fair order (fewest
/// running tasks first), so a flood in one project does not starve another.
#[derive(Default)]
pub(crate) struct RunQueue {
    projects: HashMap<String, ProjectQueue>,
    /// Project and placement class of each queued task.
    place_of: HashMap<String, (String, PlacementClass)>,
    next_seq: u64,
    len: usize,
}

impl RunQueue {
    /// Adds a task of `project` with `spec`; returns its key (needed to remove it).
    pub(crate) fn push(
        &mut self,
        task_id: &str,
        priority: i32,
        project: &str,
        spec: Option<&TaskSpec>,
    ) -> QueueKey {
        self.next_seq += 1;
        let key = (Reverse(priority), self.next_seq, task_id.to_string());
        if let Some((old, _)) = self.place_of.get(task_id)
            && old != project
        {
            // Defensive: a task is only ever in one project's queue.
            return key;
        }
        let class = match self.place_of.get(task_id) {
            // Already queued (defensive): keep one class per task.
            Some((_, c)) => c.clone(),
            None => placement_class(spec),
        };
        let q = self.projects.entry(project.to_string()).or_default();
        if q.classes
            .entry(class.clone())
            .or_default()
            .insert(key.clone())
        {
            q.len += 1;
            self.place_of
                .insert(task_id.to_string(), (project.to_string(), class));
            self.len += 1;
        }
        key
    }

    /// Removes a task by its key.
    pub(crate) fn remove(&mut self, key: &QueueKey) -> bool {
        let Some((project, class)) = self.place_of.get(&key.2) else {
            return false;
        };
        let Some(q) = self.projects.get_mut(project) else {
            return false;
        };
        let Some(set) = q.classes.get_mut(class) else {
            return false;
        };
        let removed = set.remove(key);
        if removed {
            self.len -= 1;
            q.len -= 1;
            if set.is_empty() {
                q.classes.remove(class);
            }
            if q.len == 0 {
                self.projects.remove(project);
            }
            self.place_of.remove(&key.2);
        }
        removed
    }

    /// The project and placement class of a queued task.
    pub(crate) fn place_of(&self, task_id: &str) -> Option<(&str, &PlacementClass)> {
        self.place_of.get(task_id).map(|(p, c)| (p.as_str(), c))
    }

    /// The sequence number of the last task pushed (keys carry it: later arrivals have
    /// higher ones).
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq
    }

    /// Tasks of `project` in the queue.
    pub(crate) fn queued_in(&self, project: &str) -> u32 {
        self.projects.get(project).map_or(0, |q| q.len as u32)
    }

    /// Projects with queued tasks.
    pub(crate) fn project_count(&self) -> usize {
        self.projects.len()
    }

    /// Number of queued tasks.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Each project with a non-empty queue.
    pub(crate) fn projects(&self) -> impl Iterator<Item = (&str, &ProjectQueue)> {
        self.projects.iter().map(|(p, q)| (p.as_str(), q))
    }
}

/// What an agent's Dagger engine has warm, as it last reported (bounded by the worker).
#[derive(Debug, Default, Clone)]
pub(crate) struct Warm {
    pub(crate) images: std::collections::HashSet<String>,
    pub(crate) volumes: std::collections::HashSet<String>,
}

impl Warm {
    /// Replaces the summary with a reported one.
    pub(crate) fn set(&mut self, s: &scabbard_common::proto::CacheSummary) {
        self.images = s.images.iter().take(256).cloned().collect();
        self.volumes = s.cache_volumes.iter().take(256).cloned().collect();
    }

    /// How warm this engine is for `spec`: 2 for its image, 1 per cache volume; 0 for
    /// anything but container tasks.
    pub(crate) fn score(&self, spec: &TaskSpec) -> u32 {
        use scabbard_common::proto::task_spec::Kind;
        let Some(Kind::Container(c)) = spec.kind.as_ref() else {
            return 0;
        };
        let image = if self.images.contains(&c.image) { 2 } else { 0 };
        image
            + c.caches
                .iter()
                .filter(|m| self.volumes.contains(&m.volume))
                .count() as u32
    }

    /// The summary as the API shows it (sorted), or None when nothing is warm.
    pub(crate) fn summary(&self) -> Option<scabbard_common::proto::CacheSummary> {
        if self.images.is_empty() && self.volumes.is_empty() {
            return None;
        }
        let sorted = |s: &std::collections::HashSet<String>| {
            let mut v: Vec<String> = s.iter().cloned().collect();
            v.sort();
            v
        };
        Some(scabbard_common::proto::CacheSummary {
            images: sorted(&self.images),
            cache_volumes: sorted(&self.volumes),
        })
    }

    /// Whether the image of a container task is warm here.
    pub(crate) fn has_image(&self, spec: &TaskSpec) -> bool {
        use scabbard_common::proto::task_spec::Kind;
        matches!(spec.kind.as_ref(), Some(Kind::Container(c)) if self.images.contains(&c.image))
    }
}

/// What the matcher needs to know of an agent ([`fits`] reads its project, capabilities
/// and labels; the rest is for [`pick`], the reference ranking the dispatcher's index is
/// tested against).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Candidate<'a> {
    pub(crate) id: &'a str,
    /// The project the agent is bound to ("" = every project).
    pub(crate) project: &'a str,
    pub(crate) capabilities: &'a [String],
    pub(crate) labels: &'a HashMap<String, String>,
    pub(crate) slots: u32,
    pub(crate) running: u32,
    pub(crate) warm: &'a Warm,
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

/// Capability of workers that expose GPUs to containers.
pub(crate) const GPU_CAPABILITY: &str = "gpu";

/// Whether the spec asks for GPUs (then only agents with the `gpu` capability fit).
pub(crate) fn needs_gpu(spec: &TaskSpec) -> bool {
    use scabbard_common::proto::task_spec::Kind;
    matches!(spec.kind.as_ref(), Some(Kind::Container(c)) if !c.gpus.is_empty())
}

/// Whether `agent` can run `spec` of `project` at all (ignoring free slots): a
/// project-bound agent takes only its project's tasks.
pub(crate) fn fits(spec: &TaskSpec, project: &str, agent: &Candidate<'_>) -> bool {
    if !agent.project.is_empty() && agent.project != project {
        return false;
    }
    if let Some(cap) = executor_capability(spec)
        && !agent.capabilities.iter().any(|c| c == cap)
    {
        return false;
    }
    if needs_gpu(spec) && !agent.capabilities.iter().any(|c| c == GPU_CAPABILITY) {
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

/// Where `spec` should go among `agents`.
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pick<'a> {
    /// This agent: fits, has a free slot, warmest for the task's image and caches, then
    /// most free slots (ties: lowest running count, then id for determinism).
    Agent(&'a str),
    /// Only colder agents have a free slot while a warmer one fits but is full: worth
    /// waiting a little for it (the caller bounds the wait), else take `.0`.
    WarmerBusy(&'a str),
    /// No agent fits with a free slot.
    None,
}

/// The best agent for `spec` of `project` among `agents` (see [`Pick`]): the reference
/// ranking, by a walk over every agent; the dispatcher gets the same answer from
/// [`super::placement::AgentIndex`] without the walk.
#[cfg(test)]
pub(crate) fn pick<'a>(
    spec: &TaskSpec,
    project: &str,
    agents: impl Iterator<Item = Candidate<'a>>,
) -> Pick<'a> {
    let mut best: Option<(u32, u32, u32, &'a str)> = None;
    let mut warmest_fitting = 0;
    for a in agents.filter(|a| fits(spec, project, a)) {
        let score = a.warm.score(spec);
        warmest_fitting = warmest_fitting.max(score);
        if a.running >= a.slots {
            continue;
        }
        let key = (score, a.slots - a.running, u32::MAX - a.running, a.id);
        let better = match &best {
            None => true,
            Some(b) => {
                (key.0, key.1, key.2, std::cmp::Reverse(key.3))
                    > (b.0, b.1, b.2, std::cmp::Reverse(b.3))
            }
        };
        if better {
            best = Some(key);
        }
    }
    match best {
        None => Pick::None,
        Some((score, _, _, id)) if score < warmest_fitting => Pick::WarmerBusy(id),
        Some((_, _, _, id)) => Pick::Agent(id),
    }
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
        q.push("a", 0, "p", None);
        q.push("b", 5, "p", None);
        let c = q.push("c", 0, "p", None);
        q.push("x", 9, "other", None);
        assert_eq!(q.queued_in("p"), 3);
        q.push("d", 5, "p", None);
        let (_, pq) = q.projects().find(|(p, _)| *p == "p").unwrap();
        let keys = pq.classes().next().unwrap();
        let order: Vec<_> = keys.iter().map(|k| k.2.clone()).collect();
        assert_eq!(order, ["b", "d", "a", "c"]);
        assert!(q.remove(&c));
        assert!(!q.remove(&c));
        assert_eq!(q.len(), 4);
        assert_eq!(q.queued_in("other"), 1);
    }

    #[test]
    fn tasks_are_grouped_by_placement_class() {
        let linux = shell_spec(&[], &[("os", "linux"), ("arch", "x86")]);
        let same = shell_spec(&[], &[("arch", "x86"), ("os", "linux")]);
        let other = shell_spec(&[], &[("os", "nowhere")]);
        assert_eq!(placement_class(Some(&linux)), placement_class(Some(&same)));
        assert_ne!(placement_class(Some(&linux)), placement_class(Some(&other)));
        let mut grouped = linux.clone();
        grouped.concurrency = Some(scabbard_common::proto::ConcurrencyGroup {
            key: "db".into(),
            limit: 1,
        });
        assert_ne!(
            placement_class(Some(&linux)),
            placement_class(Some(&grouped))
        );

        let mut q = RunQueue::default();
        let mut keys = Vec::new();
        for i in 0..1000 {
            keys.push(q.push(&format!("u{i}"), 0, "a", Some(&other)));
        }
        q.push("p1", 0, "a", Some(&linux));
        q.push("p2", 0, "a", Some(&same));
        let (_, pq) = q.projects().next().unwrap();
        assert_eq!(pq.len(), 1002);
        let mut sizes: Vec<usize> = pq.classes().map(|c| c.len()).collect();
        sizes.sort();
        assert_eq!(sizes, [2, 1000]);
        for k in &keys {
            assert!(q.remove(k));
        }
        let (_, pq) = q.projects().next().unwrap();
        assert_eq!(pq.classes().count(), 1);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn pick_respects_capabilities_labels_and_slots() {
        let caps_shell = vec!["shell".to_string(), "noop".to_string()];
        let caps_gpu = vec!["shell".to_string(), "gpu".to_string()];
        let linux: HashMap<String, String> = [("os".to_string(), "linux".to_string())].into();
        let none = HashMap::new();
        let cold = Warm::default();
        let agents = || {
            vec![
                Candidate {
                    project: "",
                    id: "a1",
                    capabilities: &caps_shell,
                    labels: &linux,
                    slots: 2,
                    running: 2,
                    warm: &cold,
                },
                Candidate {
                    project: "",
                    id: "a2",
                    capabilities: &caps_gpu,
                    labels: &none,
                    slots: 4,
                    running: 0,
                    warm: &cold,
                },
                Candidate {
                    project: "",
                    id: "a3",
                    capabilities: &caps_shell,
                    labels: &linux,
                    slots: 4,
                    running: 1,
                    warm: &cold,
                },
            ]
            .into_iter()
        };
        assert_eq!(
            pick(&shell_spec(&[], &[("os", "linux")]), "default", agents()),
            Pick::Agent("a3")
        );
        assert_eq!(
            pick(&shell_spec(&["gpu"], &[]), "default", agents()),
            Pick::Agent("a2")
        );
        assert_eq!(
            pick(
                &shell_spec(&["gpu"], &[("os", "linux")]),
                "default",
                agents()
            ),
            Pick::None
        );
        let noop = TaskSpec {
            kind: Some(Kind::Noop(NoopTask {})),
            ..Default::default()
        };
        assert_eq!(pick(&noop, "default", agents()), Pick::Agent("a3"));
    }

    #[test]
    fn bound_agents_take_only_their_project_and_gpu_tasks_need_gpu_workers() {
        use scabbard_common::proto::{ContainerStep, ContainerTask};
        let dagger = vec!["dagger".to_string()];
        let dagger_gpu = vec!["dagger".to_string(), "gpu".to_string()];
        let labels = HashMap::new();
        let warm = Warm::default();
        let agent = |id: &'static str, project: &'static str, caps: &'static [String]| Candidate {
            id,
            project,
            capabilities: caps,
            labels: &labels,
            slots: 4,
            running: 0,
            warm: &warm,
        };
        let dagger: &'static [String] = Box::leak(dagger.into_boxed_slice());
        let dagger_gpu: &'static [String] = Box::leak(dagger_gpu.into_boxed_slice());
        let container = |gpus: &[&str]| TaskSpec {
            kind: Some(Kind::Container(ContainerTask {
                image: "alpine".into(),
                steps: vec![ContainerStep {
                    args: vec!["true".into()],
                    ..Default::default()
                }],
                gpus: gpus.iter().map(|g| g.to_string()).collect(),
                ..Default::default()
            })),
            ..Default::default()
        };
        // A bound agent serves only its project, even when it is the only one free.
        let only_b = || [agent("b-host", "b", dagger)].into_iter();
        assert_eq!(pick(&container(&[]), "a", only_b()), Pick::None);
        assert_eq!(pick(&container(&[]), "b", only_b()), Pick::Agent("b-host"));
        // An unbound agent serves everyone.
        let open = || [agent("any", "", dagger)].into_iter();
        assert_eq!(pick(&container(&[]), "a", open()), Pick::Agent("any"));
        // GPU tasks wait for an agent with the gpu capability.
        assert_eq!(pick(&container(&["all"]), "a", open()), Pick::None);
        let gpu = || [agent("any", "", dagger), agent("gpu", "", dagger_gpu)].into_iter();
        assert_eq!(pick(&container(&["0"]), "a", gpu()), Pick::Agent("gpu"));
    }

    #[test]
    fn warm_engines_win_while_they_have_slots() {
        use scabbard_common::proto::{CacheMount, CacheSummary, ContainerStep, ContainerTask};
        let caps = vec!["dagger".to_string()];
        let labels = HashMap::new();
        let mut warm = Warm::default();
        warm.set(&CacheSummary {
            images: vec!["golang:1.23".into()],
            cache_volumes: vec!["gomod".into()],
        });
        let cold = Warm::default();
        let spec = |image: &str| TaskSpec {
            kind: Some(Kind::Container(ContainerTask {
                image: image.into(),
                steps: vec![ContainerStep {
                    args: vec!["go".into()],
                    ..Default::default()
                }],
                caches: vec![CacheMount {
                    volume: "gomod".into(),
                    path: "/go".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        };
        let agents = |warm_running: u32| {
            vec![
                Candidate {
                    project: "",
                    id: "cold",
                    capabilities: &caps,
                    labels: &labels,
                    slots: 8,
                    running: 0,
                    warm: &cold,
                },
                Candidate {
                    project: "",
                    id: "warm",
                    capabilities: &caps,
                    labels: &labels,
                    slots: 2,
                    running: warm_running,
                    warm: &warm,
                },
            ]
            .into_iter()
        };
        assert_eq!(warm.score(&spec("golang:1.23")), 3);
        assert_eq!(
            pick(&spec("golang:1.23"), "default", agents(1)),
            Pick::Agent("warm")
        );
        // Full: the cold one is offered, flagged so the caller may wait a little.
        assert_eq!(
            pick(&spec("golang:1.23"), "default", agents(2)),
            Pick::WarmerBusy("cold")
        );
        // Another image, same cache volume: still warmer.
        assert_eq!(
            pick(&spec("alpine:3"), "default", agents(0)),
            Pick::Agent("warm")
        );
        assert_eq!(Warm::default().score(&shell_spec(&[], &[])), 0);
    }
}
