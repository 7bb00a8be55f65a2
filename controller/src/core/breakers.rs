//! Circuit breakers, keyed by what fails: `agent:<id>`, `step:<template>/<node>`, or a name a
//! task lists in `spec.breakers` (a registry, an outside service).
//!
//! Agent breakers are global (an agent serves every project) and count only infrastructure
//! failures: a task's own exit code or timeout says nothing about the agent. Named and step
//! breakers belong to the project of the task that names them — stored and listed as
//! `project/<project>/<name>` — so one project's failures never hold another's tasks.
//! Records from before that scoping (`<name>` alone) cannot be given a project: a new
//! leader drops them (and deletes them from the store); they close as if reset.
//!
//! closed —(threshold consecutive failures)→ open —(open_for elapsed)→ half-open —(probe
//! succeeds)→ closed; a failed probe opens it again for twice as long (bounded). While a
//! breaker is open the scheduler sends nothing through it: an agent gets no work, tasks
//! naming a step or dependency wait in the queue instead of burning retries. In half-open a
//! bounded number of probes go through. Every change is marked for the core to persist
//! (`breakers/<key>`), so a new leader starts from the same states; probes in flight at a
//! failover are not known to it, so a half-open breaker comes back open and due for a probe.

use std::collections::HashMap;
use std::time::Duration;

use scabbard_common::proto::{self, BreakerState, TaskSpec};

/// Tunables, from the controller config.
#[derive(Debug, Clone)]
pub(crate) struct BreakerConfig {
    /// Consecutive failures that open a closed breaker.
    pub(crate) threshold: u32,
    /// How long a breaker stays open before probing.
    pub(crate) open_for: Duration,
    /// Longest open period after repeated failed probes.
    pub(crate) max_open_for: Duration,
    /// Attempts let through at once while half-open.
    pub(crate) probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: 5,
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(600),
            probes: 1,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Breaker {
    state: Option<BreakerState>,
    failures: u32,
    opened_at_ms: i64,
    retry_at_ms: i64,
    trips: u32,
    last_error: String,
    /// Probes admitted and not yet reported, while half-open.
    probing: u32,
    /// Current open period (grows on failed probes).
    open_ms: i64,
}

impl Breaker {
    fn state(&self) -> BreakerState {
        self.state.unwrap_or(BreakerState::Closed)
    }
}

/// All breakers of one leader term.
#[derive(Debug, Default)]
pub(crate) struct Breakers {
    cfg: BreakerConfig,
    map: HashMap<String, Breaker>,
    /// Keys changed since the last [`take_changes`](Self::take_changes).
    dirty: std::collections::BTreeSet<String>,
}

/// The breaker key of an agent.
pub(crate) fn agent_key(agent_id: &str) -> String {
    format!("{AGENT_PREFIX}{agent_id}")
}

/// Prefix of the global (agent) breaker keys.
pub(crate) const AGENT_PREFIX: &str = "agent:";
/// Prefix of project-scoped breaker keys: `project/<project>/<name>`.
pub(crate) const PROJECT_PREFIX: &str = "project/";

/// The key of breaker `name` (from `spec.breakers`, or a template step) in `project`.
pub(crate) fn scoped_key(project: &str, name: &str) -> String {
    format!("{PROJECT_PREFIX}{project}/{name}")
}

/// The project-scoped keys a task of `project` with `spec` goes through.
pub(crate) fn task_keys<'a>(
    spec: Option<&'a TaskSpec>,
    project: &'a str,
) -> impl Iterator<Item = String> + 'a {
    spec.into_iter()
        .flat_map(|s| s.breakers.iter())
        .map(move |n| scoped_key(project, n))
}

/// Whose a breaker key is: `Some(project)` for a project-scoped one, `None` for a global
/// (agent) one, or an error for a key of neither shape (a record from before scoping).
pub(crate) fn key_project(key: &str) -> Option<std::result::Result<&str, ()>> {
    if key.starts_with(AGENT_PREFIX) {
        return None;
    }
    Some(
        key.strip_prefix(PROJECT_PREFIX)
            .and_then(|rest| rest.split_once('/'))
            .map(|(p, _)| p)
            .filter(|p| !p.is_empty())
            .ok_or(()),
    )
}

impl Breakers {
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            map: HashMap::new(),
            dirty: Default::default(),
        }
    }

    /// Whether work may go through `key` now (without admitting it).
    pub(crate) fn allows(&self, key: &str, now_ms: i64) -> bool {
        let Some(b) = self.map.get(key) else {
            return true;
        };
        match b.state() {
            BreakerState::Open => now_ms >= b.retry_at_ms && self.cfg.probes > 0,
            BreakerState::HalfOpen => b.probing < self.cfg.probes,
            _ => true,
        }
    }

    /// Whether no breaker has counted anything yet (the dispatcher's fast path).
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The state of `key` (closed when unknown).
    pub(crate) fn state(&self, key: &str) -> BreakerState {
        self.map
            .get(key)
            .map_or(BreakerState::Closed, Breaker::state)
    }

    /// Records that an attempt was sent through `key` (turns a due open breaker half-open
    /// and counts the probe). Call only after [`allows`](Self::allows).
    pub(crate) fn admit(&mut self, key: &str, now_ms: i64) {
        let Some(b) = self.map.get_mut(key) else {
            return;
        };
        match b.state() {
            BreakerState::Open if now_ms >= b.retry_at_ms => {
                b.state = Some(BreakerState::HalfOpen);
                b.probing = 1;
                self.dirty.insert(key.to_string());
            }
            BreakerState::HalfOpen => b.probing += 1,
            _ => {}
        }
    }

    /// An attempt through `key` succeeded: closes it.
    pub(crate) fn success(&mut self, key: &str) {
        if let Some(b) = self.map.get_mut(key) {
            if b.state() != BreakerState::Closed {
                tracing::info!(breaker = key, "circuit breaker closed");
            }
            if b.state() != BreakerState::Closed || b.failures > 0 {
                self.dirty.insert(key.to_string());
            }
            let trips = b.trips;
            *b = Breaker {
                trips,
                ..Breaker::default()
            };
        }
    }

    /// An admitted attempt ended without saying anything about `key` (cancelled, or lost
    /// to another cause): frees its probe slot.
    pub(crate) fn release(&mut self, key: &str) {
        if let Some(b) = self.map.get_mut(key) {
            b.probing = b.probing.saturating_sub(1);
        }
    }

    /// An attempt through `key` failed. Returns true when this opened the breaker.
    pub(crate) fn failure(&mut self, key: &str, error: &str, now_ms: i64) -> bool {
        let cfg = &self.cfg;
        self.dirty.insert(key.to_string());
        let b = self.map.entry(key.to_string()).or_default();
        b.last_error = error.chars().take(500).collect();
        let base = cfg.open_for.as_millis() as i64;
        let max = cfg.max_open_for.as_millis() as i64;
        let open_ms = match b.state() {
            BreakerState::HalfOpen => {
                b.probing = b.probing.saturating_sub(1);
                (b.open_ms.max(base) * 2).min(max)
            }
            BreakerState::Open => return false,
            _ => {
                b.failures += 1;
                if b.failures < cfg.threshold.max(1) {
                    return false;
                }
                base
            }
        };
        b.state = Some(BreakerState::Open);
        b.opened_at_ms = now_ms;
        b.open_ms = open_ms;
        b.retry_at_ms = now_ms + open_ms;
        b.trips += 1;
        tracing::warn!(
            breaker = key,
            failures = b.failures,
            open_ms,
            error,
            "circuit breaker opened"
        );
        true
    }

    /// The breakers changed since the last call: each key with its record to store, or
    /// None when it is back to closed with nothing counted (delete the record).
    pub(crate) fn take_changes(&mut self) -> Vec<(String, Option<proto::Breaker>)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|k| {
                let rec = self
                    .map
                    .get(&k)
                    .filter(|b| b.state() != BreakerState::Closed || b.failures > 0)
                    .map(|b| view(&k, b));
                (k, rec)
            })
            .collect()
    }

    /// Loads stored breakers (a new leader). A half-open one comes back open and due, as
    /// the probes it had in flight are unknown here.
    pub(crate) fn restore(&mut self, records: Vec<proto::Breaker>, now_ms: i64) {
        self.map.clear();
        self.dirty.clear();
        for r in records {
            if matches!(key_project(&r.key), Some(Err(()))) {
                // Unscoped (before per-project breakers): whose it was is unknown, and
                // holding every project's tasks on it is what scoping ended. Delete it.
                tracing::info!(breaker = %r.key, "dropping an unscoped breaker record from an earlier version");
                self.dirty.insert(r.key);
                continue;
            }
            let state = match r.state() {
                BreakerState::HalfOpen => BreakerState::Open,
                s => s,
            };
            let retry_at_ms = if r.state() == BreakerState::HalfOpen {
                now_ms
            } else {
                r.retry_at_ms
            };
            self.map.insert(
                r.key.clone(),
                Breaker {
                    state: Some(state),
                    failures: r.failures,
                    opened_at_ms: r.opened_at_ms,
                    retry_at_ms,
                    trips: r.trips,
                    last_error: r.last_error,
                    probing: 0,
                    open_ms: (r.retry_at_ms - r.opened_at_ms).max(0),
                },
            );
        }
    }

    /// Closes `key` by hand. Returns its view (closed), or None if unknown.
    pub(crate) fn reset(&mut self, key: &str) -> Option<proto::Breaker> {
        self.success(key);
        self.map.get(key).map(|b| view(key, b))
    }

    /// Breakers that are not closed (with `all`, also closed ones that counted failures).
    pub(crate) fn list(&self, all: bool) -> Vec<proto::Breaker> {
        let mut out: Vec<_> = self
            .map
            .iter()
            .filter(|(_, b)| {
                b.state() != BreakerState::Closed || (all && (b.failures > 0 || b.trips > 0))
            })
            .map(|(k, b)| view(k, b))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}

fn view(key: &str, b: &Breaker) -> proto::Breaker {
    proto::Breaker {
        key: key.to_string(),
        project: match key_project(key) {
            Some(Ok(p)) => p.to_string(),
            _ => String::new(),
        },
        state: b.state() as i32,
        failures: b.failures,
        opened_at_ms: b.opened_at_ms,
        retry_at_ms: b.retry_at_ms,
        trips: b.trips,
        last_error: b.last_error.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers() -> Breakers {
        Breakers::new(BreakerConfig {
            threshold: 3,
            open_for: Duration::from_millis(1000),
            max_open_for: Duration::from_millis(3000),
            probes: 1,
        })
    }

    #[test]
    fn opens_after_threshold_probes_when_due_and_closes_on_success() {
        let mut b = breakers();
        assert!(!b.failure("agent:a", "exit 1", 0));
        assert!(!b.failure("agent:a", "exit 1", 0));
        assert!(b.allows("agent:a", 0));
        assert!(b.failure("agent:a", "exit 1", 10));
        assert!(!b.allows("agent:a", 500));
        assert_eq!(b.list(false)[0].state(), BreakerState::Open);
        // Due: one probe goes through, a second waits.
        assert!(b.allows("agent:a", 1010));
        b.admit("agent:a", 1010);
        assert_eq!(b.list(false)[0].state(), BreakerState::HalfOpen);
        assert!(!b.allows("agent:a", 1010));
        b.success("agent:a");
        assert!(b.list(false).is_empty());
        assert!(b.allows("agent:a", 1010));
    }

    #[test]
    fn a_failed_probe_reopens_for_longer_up_to_the_bound() {
        let mut b = breakers();
        for _ in 0..3 {
            b.failure("dep", "down", 0);
        }
        let mut now = 1000;
        let mut expect = [2000, 3000, 3000].into_iter();
        for _ in 0..3 {
            assert!(b.allows("dep", now));
            b.admit("dep", now);
            assert!(b.failure("dep", "still down", now));
            let v = &b.list(false)[0];
            assert_eq!(v.retry_at_ms - now, expect.next().unwrap());
            now = v.retry_at_ms;
        }
        assert_eq!(b.list(false)[0].trips, 4);
    }

    #[test]
    fn changes_are_reported_once_and_restore_brings_states_back() {
        const DEP: &str = "project/p/dep";
        let mut b = breakers();
        assert!(b.take_changes().is_empty());
        for _ in 0..3 {
            b.failure(DEP, "down", 100);
        }
        b.failure("agent:x", "exit 1", 100);
        let changes = b.take_changes();
        assert_eq!(changes.len(), 2);
        assert!(b.take_changes().is_empty());
        let records: Vec<_> = changes.into_iter().filter_map(|(_, r)| r).collect();
        let mut other = breakers();
        other.restore(records, 200);
        assert!(!other.allows(DEP, 500), "still open after a failover");
        assert!(other.allows(DEP, 1100), "due at the same time");
        assert_eq!(other.list(true).len(), 2);
        // Closing reports a delete.
        b.success("agent:x");
        assert_eq!(b.take_changes(), vec![("agent:x".to_string(), None)]);
        // A half-open breaker comes back open and due at once.
        b.admit(DEP, 1100);
        let rec = b.take_changes().remove(0).1.unwrap();
        assert_eq!(rec.state(), BreakerState::HalfOpen);
        other.restore(vec![rec], 1200);
        assert!(other.allows(DEP, 1200));
        assert_eq!(other.state(DEP), BreakerState::Open);
    }

    #[test]
    fn success_resets_the_count_and_reset_closes_by_hand() {
        let mut b = breakers();
        b.failure("k", "x", 0);
        b.failure("k", "x", 0);
        b.success("k");
        b.failure("k", "x", 0);
        b.failure("k", "x", 0);
        assert!(b.allows("k", 0));
        b.failure("k", "x", 0);
        assert!(!b.allows("k", 0));
        let v = b.reset("k").unwrap();
        assert_eq!(v.state(), BreakerState::Closed);
        assert!(b.allows("k", 0));
        assert!(b.reset("unknown").is_none());
    }

    #[test]
    fn keys_are_scoped_per_project_and_agents_are_global() {
        let spec = TaskSpec {
            breakers: vec!["registry:ghcr.io".into(), "step:ci/build".into()],
            ..Default::default()
        };
        let a: Vec<_> = task_keys(Some(&spec), "a").collect();
        assert_eq!(a, ["project/a/registry:ghcr.io", "project/a/step:ci/build"]);
        assert_eq!(key_project(&a[1]), Some(Ok("a")));
        assert_eq!(key_project("agent:x"), None);
        assert_eq!(key_project("registry:ghcr.io"), Some(Err(())));
        assert_eq!(key_project("project/"), Some(Err(())));
        // A's breaker open does not hold B's task naming the same thing.
        let mut b = breakers();
        for _ in 0..3 {
            b.failure(&a[0], "down", 0);
        }
        assert!(!b.allows(&a[0], 10));
        assert!(b.allows(&scoped_key("b", "registry:ghcr.io"), 10));
        assert_eq!(b.list(false)[0].project, "a");
    }

    #[test]
    fn unscoped_records_of_an_earlier_version_are_dropped_and_deleted() {
        let old = |key: &str| proto::Breaker {
            key: key.into(),
            state: BreakerState::Open as i32,
            failures: 5,
            retry_at_ms: i64::MAX,
            ..Default::default()
        };
        let mut b = breakers();
        b.restore(
            vec![old("registry:ghcr.io"), old("agent:w1"), old("project/a/x")],
            0,
        );
        assert!(b.allows("registry:ghcr.io", 1), "no longer holds anyone");
        assert!(!b.allows("agent:w1", 1));
        assert!(!b.allows("project/a/x", 1));
        assert_eq!(
            b.take_changes(),
            vec![("registry:ghcr.io".to_string(), None)],
            "the old record is deleted from the store"
        );
    }
}
