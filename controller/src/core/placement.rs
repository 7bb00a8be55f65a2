//! The agent index the dispatcher places tasks with, so that placing a task costs the
//! same with 2 agents or 10,000.
//!
//! Agents that may get work (a live session, not lost, not draining) are grouped by
//! **signature**: what [`fits`](super::scheduler::fits) looks at — the project the agent is
//! bound to, its capabilities (executors, `gpu`, …) and its labels. Each group keeps its
//! members that have a free slot ordered as the matcher ranks them (most free slots, then
//! fewest running, then id). For each placement class (per project) the index remembers
//! which signatures fit, so placing a task looks at the head of each fitting group that has
//! a free slot — not at every agent. Container tasks also look at the agents whose engine
//! is warm for their image or cache volumes (kept in a second index), so cache affinity is
//! ranked exactly as before.
//!
//! The core keeps the index in step with its agent table: [`AgentIndex::sync`] after any
//! change of an agent's session, slots, running attempts, capabilities, labels, drain flag
//! or warm cache. Within a dispatch round [`AgentIndex::reserve`] counts a planned
//! assignment before it is made.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use scabbard_common::proto::TaskSpec;

use super::AgentEntry;
use super::scheduler::{Candidate, PlacementClass, Warm, fits};

mod tally;

/// Position of an agent with a free slot in its group: best first. The id is shared with
/// the member, so moving an agent in the order allocates nothing.
type Rank = (Reverse<u32>, u32, Arc<str>);

/// Placement classes remembered with their fitting signatures before the memo is cleared
/// (it is also cleared whenever a signature appears or goes).
const MAX_MEMO: usize = 4096;

/// Agents with one signature.
struct Group {
    project: String,
    capabilities: Vec<String>,
    labels: HashMap<String, String>,
    /// Members with a free slot, best first.
    free: BTreeSet<Rank>,
    members: usize,
}

/// What the index holds of one agent that may get work.
struct Member {
    id: Arc<str>,
    sig: Arc<str>,
    slots: u32,
    running: u32,
    /// Keys of the warm index this agent is in (`i\0image`, `v\0volume`).
    warm_keys: Vec<String>,
}

impl Member {
    fn free(&self) -> u32 {
        self.slots.saturating_sub(self.running)
    }

    fn rank(&self) -> Rank {
        (Reverse(self.free()), self.running, self.id.clone())
    }
}

/// Where a task should go (see [`AgentIndex::pick`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    /// This agent: fits, has a free slot, warmest, then most free slots.
    Agent(String),
    /// Only colder agents have a free slot while a warmer one fits but is full.
    WarmerBusy(String),
    None,
}

/// Agents that may get work, indexed by signature and free slots (see the module docs).
#[derive(Default)]
pub(crate) struct AgentIndex {
    groups: HashMap<Arc<str>, Group>,
    members: HashMap<String, Member>,
    /// Warm key → agents (members) whose engine has it warm.
    warm: HashMap<String, HashSet<String>>,
    /// Placement class → project → signatures that fit it.
    fitting: HashMap<PlacementClass, HashMap<String, Vec<Arc<str>>>>,
    /// Free slots over every member.
    free_total: u64,
    /// Agents looked at by [`pick`](Self::pick) so far (for tests and metrics).
    pub(crate) examined: u64,
}

fn signature(project: &str, caps: &[String], labels: &HashMap<String, String>) -> Arc<str> {
    use std::fmt::Write;
    let mut c: Vec<&String> = caps.iter().collect();
    c.sort();
    c.dedup();
    let mut l: Vec<(&String, &String)> = labels.iter().collect();
    l.sort();
    let mut s = format!("p={}", project.escape_default());
    for c in c {
        let _ = write!(s, "|c={}", c.escape_default());
    }
    for (k, v) in l {
        let _ = write!(s, "|l={}={}", k.escape_default(), v.escape_default());
    }
    Arc::from(s)
}

fn same_set(a: &[String], b: &[String]) -> bool {
    a.iter().all(|x| b.contains(x)) && b.iter().all(|x| a.contains(x))
}

fn warm_keys(w: &Warm) -> Vec<String> {
    w.images
        .iter()
        .map(|i| format!("i\0{i}"))
        .chain(w.volumes.iter().map(|v| format!("v\0{v}")))
        .collect()
}

impl AgentIndex {
    /// Free slots over every agent that may get work.
    pub(crate) fn free_slots(&self) -> u64 {
        self.free_total
    }

    /// Brings the index in step with agent `id` (`None`: the agent is gone).
    pub(crate) fn sync(&mut self, id: &str, entry: Option<&AgentEntry>) {
        let agent = entry.and_then(|e| {
            let a = e.stored.agent.as_ref()?;
            (e.conn.is_some() && !e.lost && !a.draining).then_some((e, a))
        });
        let Some((entry, a)) = agent else {
            self.remove(id);
            return;
        };
        let running = entry.running.len() as u32;
        if let Some(m) = self.members.get(id) {
            let g = &self.groups[&m.sig];
            let warm_same = m.warm_keys.len() == entry.warm.images.len() + entry.warm.volumes.len()
                && m.warm_keys.iter().all(|k| match k.split_once('\0') {
                    Some(("i", i)) => entry.warm.images.contains(i),
                    Some((_, v)) => entry.warm.volumes.contains(v),
                    None => false,
                });
            if m.slots == a.slots
                && warm_same
                && g.project == a.project
                && g.labels == a.labels
                && same_set(&g.capabilities, &a.capabilities)
            {
                self.set_running(id, running);
                return;
            }
            self.remove(id);
        }
        let sig = signature(&a.project, &a.capabilities, &a.labels);
        let group = self.groups.entry(sig.clone()).or_insert_with(|| {
            // A new signature may fit classes cached before it existed.
            Group {
                project: a.project.clone(),
                capabilities: a.capabilities.clone(),
                labels: a.labels.clone(),
                free: BTreeSet::new(),
                members: 0,
            }
        });
        if group.members == 0 {
            self.fitting.clear();
        }
        group.members += 1;
        let m = Member {
            id: Arc::from(id),
            sig,
            slots: a.slots,
            running,
            warm_keys: warm_keys(&entry.warm),
        };
        if m.free() > 0 {
            group.free.insert(m.rank());
        }
        self.free_total += m.free() as u64;
        for k in &m.warm_keys {
            self.warm
                .entry(k.clone())
                .or_default()
                .insert(id.to_string());
        }
        self.members.insert(id.to_string(), m);
    }

    fn remove(&mut self, id: &str) {
        let Some(m) = self.members.remove(id) else {
            return;
        };
        self.free_total -= m.free() as u64;
        if let Some(g) = self.groups.get_mut(&m.sig) {
            g.free.remove(&m.rank());
            g.members -= 1;
            if g.members == 0 {
                self.groups.remove(&m.sig);
                self.fitting.clear();
            }
        }
        for k in &m.warm_keys {
            if let Some(s) = self.warm.get_mut(k) {
                s.remove(id);
                if s.is_empty() {
                    self.warm.remove(k);
                }
            }
        }
    }

    /// Sets the running count of a member, moving it in its group's order (no allocation).
    fn set_running(&mut self, id: &str, running: u32) {
        let Some(m) = self.members.get_mut(id) else {
            return;
        };
        if m.running == running {
            return;
        }
        let g = self
            .groups
            .get_mut(&m.sig)
            .expect("a member's group exists");
        let old_free = m.free();
        if old_free > 0 {
            g.free.remove(&m.rank());
        }
        m.running = running;
        self.free_total = self.free_total - old_free as u64 + m.free() as u64;
        if m.free() > 0 {
            g.free.insert(m.rank());
        }
    }

    /// Like [`sync`](Self::sync) after a change of the agent's running attempts alone (an
    /// assignment, a result, a requeue): only its place in the order moves.
    pub(crate) fn sync_running(&mut self, id: &str, entry: &AgentEntry) {
        if self.members.contains_key(id) {
            self.set_running(id, entry.running.len() as u32);
        } else {
            self.sync(id, Some(entry));
        }
    }

    /// Counts an assignment planned to `id` within a dispatch round (before the core
    /// records it; the next [`sync`](Self::sync) sets the true count).
    pub(crate) fn reserve(&mut self, id: &str) {
        if let Some(r) = self.members.get(id).map(|m| m.running + 1) {
            self.set_running(id, r);
        }
    }

    /// Makes sure the signatures that fit tasks of `class` (with `spec`) in `project` are
    /// known (computed once per class and project while the set of signatures is stable).
    fn ensure_fitting(&mut self, spec: &TaskSpec, project: &str, class: &PlacementClass) {
        if self
            .fitting
            .get(class)
            .is_some_and(|p| p.contains_key(project))
        {
            return;
        }
        if self.fitting.len() >= MAX_MEMO {
            self.fitting.clear();
        }
        let warm = Warm::default();
        let sigs = self
            .groups
            .iter()
            .filter(|(_, g)| fits(spec, project, &group_candidate(g, &warm)))
            .map(|(s, _)| s.clone())
            .collect();
        self.fitting
            .entry(class.clone())
            .or_default()
            .insert(project.to_string(), sigs);
    }

    /// The best agent for `spec` (of placement class `class`) in `project`, among members
    /// `usable` accepts (breakers): the warmest for the task's image and caches, then most
    /// free slots, then fewest running, then lowest id — as [`super::scheduler::pick`]
    /// ranks them. Looks at one agent per fitting signature (more only past agents
    /// `usable` refuses) plus, for container tasks, the agents warm for it.
    pub(crate) fn pick(
        &mut self,
        spec: &TaskSpec,
        project: &str,
        class: &PlacementClass,
        usable: impl Fn(&str) -> bool,
        score: impl Fn(&str) -> u32,
    ) -> Choice {
        self.ensure_fitting(spec, project, class);
        let sigs = &self.fitting[class][project];
        let mut examined = 0u64;
        // (score, free, Reverse(running), Reverse(id))
        let mut best: Option<(u32, u32, Reverse<u32>, Reverse<&str>)> = None;
        let mut warmest = 0;
        for sig in sigs {
            let Some(g) = self.groups.get(sig) else {
                continue;
            };
            for (Reverse(free), running, id) in &g.free {
                let id: &str = id;
                examined += 1;
                if !usable(id) {
                    continue;
                }
                let s = score(id);
                warmest = warmest.max(s);
                let key = (s, *free, Reverse(*running), Reverse(id));
                if best.as_ref().is_none_or(|b| key > *b) {
                    best = Some(key);
                }
                break;
            }
        }
        if let Some(scabbard_common::proto::task_spec::Kind::Container(c)) = spec.kind.as_ref() {
            let keys = std::iter::once(format!("i\0{}", c.image))
                .chain(c.caches.iter().map(|m| format!("v\0{}", m.volume)));
            let mut seen: HashSet<&str> = HashSet::new(); // an agent warm for several keys
            for k in keys {
                let Some(ids) = self.warm.get(&k) else {
                    continue;
                };
                for id in ids {
                    if !seen.insert(id.as_str()) {
                        continue;
                    }
                    examined += 1;
                    let Some(m) = self.members.get(id) else {
                        continue;
                    };
                    if !sigs.contains(&m.sig) || !usable(id) {
                        continue;
                    }
                    let s = score(id);
                    warmest = warmest.max(s);
                    if m.free() == 0 {
                        continue;
                    }
                    let key = (s, m.free(), Reverse(m.running), Reverse(id.as_str()));
                    if best.as_ref().is_none_or(|b| key > *b) {
                        best = Some(key);
                    }
                }
            }
        }
        let choice = match best {
            None => Choice::None,
            Some((s, _, _, Reverse(id))) if s < warmest => Choice::WarmerBusy(id.to_string()),
            Some((_, _, _, Reverse(id))) => Choice::Agent(id.to_string()),
        };
        self.examined += examined;
        choice
    }
}

fn group_candidate<'a>(g: &'a Group, warm: &'a Warm) -> Candidate<'a> {
    Candidate {
        id: "",
        project: &g.project,
        capabilities: &g.capabilities,
        labels: &g.labels,
        slots: 0,
        running: 0,
        warm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::scheduler::placement_class;
    use scabbard_common::proto::{
        Agent, NoopTask, Requirements, ShellTask, StoredAgent, task_spec::Kind,
    };
    use std::collections::HashSet;

    fn entry(caps: &[&str], labels: &[(&str, &str)], slots: u32, running: usize) -> AgentEntry {
        let (tx, _rx, _) = super::super::agent_tx::AgentTx::channel(1);
        AgentEntry {
            stored: StoredAgent {
                agent: Some(Agent {
                    capabilities: caps.iter().map(|s| s.to_string()).collect(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    slots,
                    ..Default::default()
                }),
                ..Default::default()
            },
            conn: Some(super::super::Conn {
                session: 1,
                tx,
                last_seen: Default::default(),
            }),
            running: (0..running)
                .map(|i| format!("t{i}"))
                .collect::<HashSet<_>>(),
            disconnected_at: None,
            lost: false,
            last_seen_ms: 0,
            warm: Default::default(),
        }
    }

    fn noop() -> TaskSpec {
        TaskSpec {
            kind: Some(Kind::Noop(NoopTask {})),
            ..Default::default()
        }
    }

    fn pick(ix: &mut AgentIndex, spec: &TaskSpec) -> Choice {
        let class = placement_class(Some(spec));
        ix.pick(spec, "default", &class, |_| true, |_| 0)
    }

    /// Placing a task looks at the same number of agents whatever the fleet's size.
    #[test]
    fn dispatch_work_does_not_grow_with_agents() {
        let mut examined = Vec::new();
        for n in [2usize, 100, 10_000] {
            let mut ix = AgentIndex::default();
            let mut agents = Vec::new();
            for i in 0..n {
                let caps: &[&str] = if i % 2 == 0 {
                    &["noop", "shell"]
                } else {
                    &["shell"]
                };
                let labels: &[(&str, &str)] = if i % 3 == 0 { &[("os", "linux")] } else { &[] };
                let e = entry(caps, labels, 1_000, i % 4);
                ix.sync(&format!("a{i:05}"), Some(&e));
                agents.push(e);
            }
            let before = ix.examined;
            for _ in 0..50 {
                let Choice::Agent(id) = pick(&mut ix, &noop()) else {
                    panic!("a noop agent has a free slot");
                };
                ix.reserve(&id);
            }
            let shell_linux = TaskSpec {
                kind: Some(Kind::Shell(ShellTask {
                    command: vec!["true".into()],
                })),
                requirements: Some(Requirements {
                    labels: [("os".to_string(), "linux".to_string())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert!(matches!(pick(&mut ix, &shell_linux), Choice::Agent(_)));
            let gpu = TaskSpec {
                requirements: Some(Requirements {
                    capabilities: vec!["gpu".into()],
                    ..Default::default()
                }),
                ..noop()
            };
            assert_eq!(pick(&mut ix, &gpu), Choice::None);
            examined.push(ix.examined - before);
        }
        // Two signatures fit a noop, one a linux shell task, none a gpu one: the same
        // handful of looks for 2 agents and for 10,000.
        assert!(examined.iter().all(|e| *e <= 2 * 50 + 2), "{examined:?}");
        assert_eq!(examined[1], examined[2], "{examined:?}");
    }

    /// The index ranks agents as the matcher does: most free slots, then fewest running,
    /// then id; full, draining and disconnected agents get nothing.
    #[test]
    fn ranks_like_the_matcher_and_follows_changes() {
        let mut ix = AgentIndex::default();
        let mut a = entry(&["noop"], &[], 2, 1);
        let b = entry(&["noop"], &[], 4, 1);
        ix.sync("a", Some(&a));
        ix.sync("b", Some(&b));
        assert_eq!(ix.free_slots(), 4);
        assert_eq!(pick(&mut ix, &noop()), Choice::Agent("b".into()));
        ix.reserve("b");
        ix.reserve("b");
        // b: 1 free, 3 running; a: 1 free, 1 running.
        assert_eq!(pick(&mut ix, &noop()), Choice::Agent("a".into()));
        a.stored.agent.as_mut().unwrap().draining = true;
        ix.sync("a", Some(&a));
        assert_eq!(pick(&mut ix, &noop()), Choice::Agent("b".into()));
        ix.reserve("b");
        assert_eq!(ix.free_slots(), 0);
        assert_eq!(pick(&mut ix, &noop()), Choice::None);
        ix.sync("b", Some(&b)); // the plan was not carried out: back to the true count
        assert_eq!(ix.free_slots(), 3);
        ix.sync("b", None);
        assert_eq!(pick(&mut ix, &noop()), Choice::None);
        assert_eq!(ix.free_slots(), 0);
    }

    /// On random fleets and tasks the index picks exactly what the reference matcher
    /// (a walk over every agent) picks, warm caches included.
    #[test]
    fn agrees_with_the_reference_matcher() {
        use crate::core::scheduler::{self, Pick};
        use scabbard_common::proto::{CacheMount, CacheSummary, ContainerStep, ContainerTask};
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let capsets: [&[&str]; 4] = [
            &["noop", "shell"],
            &["dagger"],
            &["dagger", "gpu"],
            &["shell", "x"],
        ];
        let labelsets: [&[(&str, &str)]; 3] = [&[], &[("os", "linux")], &[("os", "mac")]];
        for _round in 0..40 {
            let mut ix = AgentIndex::default();
            let mut agents: Vec<(String, AgentEntry)> = Vec::new();
            for i in 0..(1 + rnd(30)) {
                let slots = rnd(4) as u32;
                let mut e = entry(
                    capsets[rnd(4) as usize],
                    labelsets[rnd(3) as usize],
                    slots,
                    rnd(slots as u64 + 1) as usize,
                );
                if rnd(3) == 0 {
                    e.stored.agent.as_mut().unwrap().project = "p".into();
                }
                if rnd(2) == 0 {
                    e.warm.set(&CacheSummary {
                        images: vec![format!("img{}", rnd(3))],
                        cache_volumes: vec![format!("vol{}", rnd(3))],
                    });
                }
                let id = format!("a{i}");
                ix.sync(&id, Some(&e));
                agents.push((id, e));
            }
            for _ in 0..20 {
                let spec = match rnd(3) {
                    0 => noop(),
                    1 => TaskSpec {
                        kind: Some(Kind::Shell(ShellTask {
                            command: vec!["true".into()],
                        })),
                        requirements: Some(Requirements {
                            labels: [("os".to_string(), "linux".to_string())].into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    _ => TaskSpec {
                        kind: Some(Kind::Container(ContainerTask {
                            image: format!("img{}", rnd(3)),
                            steps: vec![ContainerStep::default()],
                            caches: vec![CacheMount {
                                volume: format!("vol{}", rnd(3)),
                                path: "/c".into(),
                                ..Default::default()
                            }],
                            gpus: if rnd(4) == 0 {
                                vec!["0".into()]
                            } else {
                                vec![]
                            },
                            ..Default::default()
                        })),
                        ..Default::default()
                    },
                };
                let project = if rnd(2) == 0 { "p" } else { "q" };
                let want = scheduler::pick(
                    &spec,
                    project,
                    agents.iter().map(|(id, e)| {
                        let a = e.stored.agent.as_ref().unwrap();
                        Candidate {
                            id,
                            project: &a.project,
                            capabilities: &a.capabilities,
                            labels: &a.labels,
                            slots: a.slots,
                            running: e.running.len() as u32,
                            warm: &e.warm,
                        }
                    }),
                );
                let class = placement_class(Some(&spec));
                let by_id: HashMap<&str, &AgentEntry> =
                    agents.iter().map(|(id, e)| (id.as_str(), e)).collect();
                let got = ix.pick(
                    &spec,
                    project,
                    &class,
                    |_| true,
                    |id| by_id[id].warm.score(&spec),
                );
                let want = match want {
                    Pick::Agent(a) => Choice::Agent(a.to_string()),
                    Pick::WarmerBusy(a) => Choice::WarmerBusy(a.to_string()),
                    Pick::None => Choice::None,
                };
                assert_eq!(got, want, "{spec:?} in {project}");
            }
        }
    }
}
