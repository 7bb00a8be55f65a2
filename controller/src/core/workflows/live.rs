//! Which workflows the core holds: live ones (pending, running) and a bounded cache of
//! recently finished ones (`finished_cache_workflows`). A finished workflow leaves memory
//! once its final header is durable and its node tasks are final; from then on it is
//! served from the store (`CoreHandle::workflow`, `api::list`). Recovery loads only live
//! workflows (`wlive/` keys), after migrating a store written before the workflow history
//! keys existed (layout 3, see `core::history`).

use std::time::Instant;

use futures::{StreamExt, TryStreamExt};

use prost::Message;
use scabbard_common::proto::Workflow;
use scabbard_common::{Error, Result, is_final};
use tracing::{info, warn};

use super::super::{Effect, State, history, idempotency_key};
use super::{WORKFLOW_PREFIX, records, workflow_final};

/// Live workflows recovery reads at once.
const RECOVER_READS: usize = 32;

impl State {
    /// A workflow's final header is being written: it joins the finished cache; the
    /// returned effect marks that write durable.
    pub(in crate::core) fn finished_workflow(&mut self, wf: &Workflow) -> Effect {
        let (seq, durable) = self.durability.track();
        self.wf_finished.finished(&wf.id, wf.finished_at_ms, seq);
        durable
    }

    /// Drops the oldest finished workflows past `finished_cache_workflows` whose final
    /// header is durable and whose node tasks are all final.
    pub(crate) fn evict_finished_workflows(&mut self) {
        let cap = self.cfg.finished_cache_workflows;
        let mut pinned = Vec::new();
        while let Some(id) = self.wf_finished.pop_evictable(cap, &self.durability) {
            let Some(w) = self.workflows.get(&id) else {
                continue;
            };
            if !workflow_final(w.state()) || self.wf_active.contains(&id) {
                continue;
            }
            let tasks_live = w.nodes.iter().any(|n| {
                self.tasks
                    .get(&n.task_id)
                    .is_some_and(|e| !is_final(e.task.state()))
            });
            if tasks_live {
                pinned.push((id, w.finished_at_ms));
                continue;
            }
            if !w.idempotency_key.is_empty() {
                let key = idempotency_key(&w.project, &w.idempotency_key);
                if self.wf_idempotency.get(&key) == Some(&id) {
                    self.wf_idempotency.remove(&key);
                }
            }
            self.workflows.remove(&id);
            self.wf_dirty.remove(&id);
        }
        // Back at the end of the line: they leave once their tasks are final.
        for (id, ms) in pinned {
            self.wf_finished.finished(&id, ms, 0);
        }
    }

    /// Loads the live workflows (`wlive/`); links nodes to tasks written after the
    /// workflow's last record (a crash between the writes), and marks each for advancing.
    pub(in crate::core) async fn recover_workflows(&mut self) -> Result<()> {
        self.workflows.clear();
        self.wf_active.clear();
        self.wf_dirty.clear();
        self.wf_idempotency.clear();
        self.wf_finished = Default::default();
        let mut node_tasks = std::collections::HashMap::new();
        for e in self.tasks.values() {
            if !e.task.workflow_id.is_empty() {
                node_tasks.insert(
                    (e.task.workflow_id.clone(), e.task.workflow_node.clone()),
                    e.task.id.clone(),
                );
            }
        }
        let live: Vec<String> = self
            .load_prefix(history::WF_LIVE_PREFIX)
            .await?
            .into_iter()
            .filter_map(|kv| {
                kv.key
                    .strip_prefix(history::WF_LIVE_PREFIX)
                    .map(str::to_string)
            })
            .collect();
        // A header per workflow and a record per node (or, from earlier versions, one
        // whole record: read as it is, then rewritten as parts).
        // One range per live workflow, [`RECOVER_READS`] at a time (round trips on etcd).
        let store = self.store.clone();
        let read: Vec<Vec<crate::store::KeyValue>> = futures::stream::iter(live)
            .map(|id| {
                let store = store.clone();
                async move { history::read_workflow_records(store.as_ref(), &id).await }
            })
            .buffered(RECOVER_READS)
            .try_collect()
            .await?;
        let mut loader = records::Loader::default();
        for kv in read.iter().flatten() {
            loader.add(&kv.key, &kv.value)?;
        }
        let loaded = loader.finish();
        for (id, why) in &loaded.broken {
            warn!(workflow = %id, why, "skipping a workflow whose records are incomplete");
        }
        for mut wf in loaded.workflows {
            for n in wf.nodes.iter_mut().filter(|n| n.task_id.is_empty()) {
                if let Some(t) = node_tasks.get(&(wf.id.clone(), n.name.clone())) {
                    n.task_id = t.clone();
                }
            }
            if !wf.idempotency_key.is_empty() {
                self.wf_idempotency.insert(
                    idempotency_key(&wf.project, &wf.idempotency_key),
                    wf.id.clone(),
                );
            }
            if workflow_final(wf.state()) {
                // `wlive/` outlived its workflow (cannot happen: both go in one commit).
                self.wf_finished.finished(&wf.id, wf.finished_at_ms, 0);
            } else {
                self.wf_active.insert(wf.id.clone());
                self.wf_dirty.insert(wf.id.clone());
            }
            self.workflows.insert(wf.id.clone(), wf);
        }
        for id in loaded.legacy {
            if let Some(wf) = self.workflows.get(&id).cloned() {
                self.persist_whole_workflow(&wf, Vec::new()).await;
            }
        }
        Ok(())
    }

    /// Once per store (layout 2 → 3): writes every workflow header's history keys
    /// (index, idempotency, `wlive/` or `wdone/`), in bounded batches through the
    /// persister (fenced like every write of this term). Idempotent. Returns how many
    /// workflows it looked at.
    pub(in crate::core) async fn migrate_workflows(&mut self) -> Result<usize> {
        let started = Instant::now();
        let mut after: Option<String> = None;
        let mut n = 0usize;
        loop {
            let page = self
                .store
                .range(WORKFLOW_PREFIX, after.as_deref(), 2_000)
                .await?;
            after = page.kvs.last().map(|kv| kv.key.clone());
            for kv in &page.kvs {
                // Headers only (parts are `workflows/<id>/…`).
                if kv.key[WORKFLOW_PREFIX.len()..].contains('/') {
                    continue;
                }
                let w = Workflow::decode(kv.value.as_slice()).map_err(|e| {
                    Error::internal(format!("corrupt workflow record {}: {e}", kv.key))
                })?;
                let mut ops = history::workflow_migration_ops(&w).into_iter();
                if let Some((k, v)) = ops.next() {
                    self.write_with(k, v, ops.collect(), Vec::new()).await;
                }
                n += 1;
            }
            if !page.more || after.is_none() {
                break;
            }
        }
        info!(
            workflows = n,
            took_ms = started.elapsed().as_millis() as u64,
            "workflow history keys written (layout 3)"
        );
        Ok(n)
    }
}
