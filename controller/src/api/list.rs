//! `TaskService/List` and `WorkflowService/List`, served from the store off the core: the
//! history index of each kind (`core::history::TASK_INDEX`, `WORKFLOW_INDEX`: every record
//! by inverted id, per project, per label) gives a stable newest-first order, and each page
//! reads the records it looks at to filter on state, labels, creation time (and, for
//! workflows, template). One copy of these rules serves both kinds ([`page`]).
//!
//! * **Page tokens** are keyset positions (the last index key a page looked at): records
//!   created while a client pages sort before the position, so none is skipped or
//!   repeated across pages.
//! * **Time range**: ids are ULIDs, which start with their creation time, so
//!   `created_before_ms` is where the range starts and `created_after_ms` where it stops.
//! * **Scan budget**: a page looks at most at [`SCAN_BUDGET`] index keys. A very selective
//!   filter then returns a partial (even empty) page with a token to go on from.
//! * **Freshness**: a record in the store is the task's (workflow's) state as last
//!   committed. Every transition is committed before anyone is told about it, so a listed
//!   state is never older than one a client was answered; a transition the core has made
//!   but not yet committed (milliseconds) shows as the state before it. Workflow lists
//!   first wait on a core barrier (`CoreMsg::Durable`), since the core answers workflow and
//!   schedule reads from memory before their writes are durable.

use std::collections::HashMap;

use futures::{StreamExt, TryStreamExt};
use prost::Message;
use scabbard_common::proto::{ListTasksRequest, ListWorkflowsRequest, Task, Workflow};
use scabbard_common::{Error, Result};

use crate::core::history::{self, IndexSpace};
use crate::store::Store;

/// Workflows a page reads whole at once.
const WHOLE_READS: usize = 16;

/// Most index keys one page looks at.
pub(crate) const SCAN_BUDGET: usize = 5_000;

/// Records created this long before `created_after_ms` by their id may carry a creation
/// time inside the range (the id is taken a moment before the record's time).
const CLOCK_SLACK_MS: i64 = 1_000;

/// What every `List` asks, whatever it lists.
pub(crate) struct Query<'a> {
    pub(crate) page_size: u32,
    pub(crate) page_token: &'a str,
    /// Empty: every project.
    pub(crate) project: &'a str,
    pub(crate) labels: &'a HashMap<String, String>,
    pub(crate) created_after_ms: i64,
    pub(crate) created_before_ms: i64,
}

/// A kind of record `List` pages through its history index.
pub(crate) trait Listed: Sized {
    /// Its index.
    const INDEX: IndexSpace;
    /// The store key of the record with this id (what a page reads per index entry).
    fn record_key(id: &str) -> String;
    fn decode(record: &[u8]) -> Result<Self>;
    fn project(&self) -> &str;
    fn created_at_ms(&self) -> i64;
    fn labels(&self) -> Option<&HashMap<String, String>>;
}

impl Listed for Task {
    const INDEX: IndexSpace = history::TASK_INDEX;
    fn record_key(id: &str) -> String {
        format!("{}{id}", crate::core::TASK_PREFIX)
    }
    fn decode(record: &[u8]) -> Result<Self> {
        let mut t = <Task as Message>::decode(record)
            .map_err(|e| Error::internal(format!("corrupt task record: {e}")))?;
        if t.project.is_empty() {
            t.project = crate::auth::DEFAULT_PROJECT.to_string();
        }
        Ok(t)
    }
    fn project(&self) -> &str {
        &self.project
    }
    fn created_at_ms(&self) -> i64 {
        self.created_at_ms
    }
    fn labels(&self) -> Option<&HashMap<String, String>> {
        self.spec.as_ref().map(|s| &s.labels)
    }
}

/// A workflow's header (nodes are read for the records a page keeps).
impl Listed for Workflow {
    const INDEX: IndexSpace = history::WORKFLOW_INDEX;
    fn record_key(id: &str) -> String {
        crate::core::workflows::records::header_key(id)
    }
    fn decode(record: &[u8]) -> Result<Self> {
        <Workflow as Message>::decode(record)
            .map_err(|e| Error::internal(format!("corrupt workflow record: {e}")))
    }
    fn project(&self) -> &str {
        &self.project
    }
    fn created_at_ms(&self) -> i64 {
        self.created_at_ms
    }
    fn labels(&self) -> Option<&HashMap<String, String>> {
        self.spec.as_ref().map(|s| &s.labels)
    }
}

/// One page of tasks and the token of the next ("" at the end).
pub(crate) async fn tasks(
    store: &dyn Store,
    req: &ListTasksRequest,
) -> Result<(Vec<Task>, String)> {
    let q = Query {
        page_size: req.page_size,
        page_token: &req.page_token,
        project: &req.project,
        labels: &req.labels,
        created_after_ms: req.created_after_ms,
        created_before_ms: req.created_before_ms,
    };
    page(store, &q, |t: &Task| {
        req.states.is_empty() || req.states.contains(&t.state)
    })
    .await
}

/// One page of workflows (each whole: header, nodes and spec) and the token of the next.
pub(crate) async fn workflows(
    store: &dyn Store,
    req: &ListWorkflowsRequest,
) -> Result<(Vec<Workflow>, String)> {
    let q = Query {
        page_size: req.page_size,
        page_token: &req.page_token,
        project: &req.project,
        labels: &req.labels,
        created_after_ms: req.created_after_ms,
        created_before_ms: req.created_before_ms,
    };
    let keep = |w: &Workflow| {
        (req.states.is_empty() || req.states.contains(&w.state))
            && (req.template.is_empty()
                || w.template.as_ref().map(|t| t.name.as_str()) == Some(req.template.as_str()))
    };
    let (headers, next) = page(store, &q, keep).await?;
    // Each kept one whole: a range each, [`WHOLE_READS`] at a time (round trips on etcd).
    let whole: Vec<Option<Workflow>> = futures::stream::iter(headers)
        .map(|h| async move { history::read_workflow(store, &h.id).await })
        .buffered(WHOLE_READS)
        .try_collect()
        .await?;
    // Deleted by retention since (skipped), or changed since its header was read (the
    // whole workflow is as of now; listed if it still passes the filters).
    let out = whole.into_iter().flatten().filter(|w| keep(w)).collect();
    Ok((out, next))
}

/// One page of records of kind `T` passing the query and `keep`, and the next page's token.
pub(crate) async fn page<T: Listed>(
    store: &dyn Store,
    q: &Query<'_>,
    keep: impl Fn(&T) -> bool,
) -> Result<(Vec<T>, String)> {
    let size = match q.page_size {
        0 => 100,
        n if n <= 1000 => n as usize,
        n => {
            return Err(Error::invalid(format!("page_size {n} is larger than 1000")));
        }
    };
    if q.created_after_ms < 0 || q.created_before_ms < 0 {
        return Err(Error::invalid(
            "created_after_ms and created_before_ms are unix milliseconds (0 = no bound)",
        ));
    }
    if q.created_before_ms > 0 && q.created_after_ms >= q.created_before_ms {
        return Err(Error::invalid(format!(
            "created_after_ms ({}) must be before created_before_ms ({})",
            q.created_after_ms, q.created_before_ms
        )));
    }
    let index = T::INDEX;
    // The narrowest index: an indexed label's within the project (unless the project has
    // records whose labels are not indexed), else the project's, else all.
    let label = q
        .labels
        .iter()
        .filter(|(k, v)| history::label_indexable(k, v))
        .min();
    let prefix = match (q.project.is_empty(), label) {
        (true, _) => index.all.to_string(),
        (false, Some((k, v))) if !label_overflow(store, &index, q.project).await? => {
            index.label_prefix(q.project, k, v)
        }
        (false, _) => index.project_prefix(q.project),
    };
    // Where to start: after the token's position, and after every id created at or after
    // `created_before_ms`.
    let mut after: Option<String> = None;
    if !q.page_token.is_empty() {
        after = Some(history::decode_page_token(q.page_token)?);
    }
    if q.created_before_ms > 0 {
        let bound = history::inverted_time_bound(q.created_before_ms);
        if after.as_ref().is_none_or(|a| *a < bound) {
            after = Some(bound);
        }
    }
    let mut after = after.map(|inv| format!("{prefix}{inv}"));
    // Where to stop: past every id created before `created_after_ms` (less a slack).
    let stop = (q.created_after_ms > 0)
        .then(|| history::inverted_time_bound((q.created_after_ms - CLOCK_SLACK_MS).max(0)));
    let mut out = Vec::with_capacity(size.min(128));
    let mut scanned = 0usize;
    loop {
        let left = SCAN_BUDGET - scanned;
        if left == 0 {
            // Budget spent: a partial page and where to go on from.
            return Ok((out, token_of(&prefix, after.as_deref())));
        }
        let want = (size - out.len()).clamp(32, 256).min(left);
        let page = store.range(&prefix, after.as_deref(), want).await?;
        let mut invs = Vec::with_capacity(page.kvs.len());
        let mut ended = !page.more;
        for kv in &page.kvs {
            let inv = &kv.key[prefix.len()..];
            if stop.as_deref().is_some_and(|s| inv > s) {
                ended = true;
                break;
            }
            invs.push(inv.to_string());
        }
        let keys: Vec<String> = invs
            .iter()
            .filter_map(|inv| history::uninvert_id(inv))
            .map(|id| T::record_key(&id))
            .collect();
        let records = history::get_many(store, &keys).await?;
        for (inv, record) in invs.iter().zip(records) {
            scanned += 1;
            after = Some(format!("{prefix}{inv}"));
            // Deleted by retention since the index was read (both go in one commit).
            let Some(record) = record else { continue };
            let r = T::decode(&record)?;
            if matches(&r, q) && keep(&r) {
                out.push(r);
                if out.len() == size {
                    return Ok((out, token_of(&prefix, after.as_deref())));
                }
            }
        }
        if ended || page.kvs.is_empty() {
            return Ok((out, String::new()));
        }
    }
}

/// Whether `project` has records whose labels are not indexed.
async fn label_overflow(store: &dyn Store, index: &IndexSpace, project: &str) -> Result<bool> {
    let prefix = index.overflow_prefix(project);
    Ok(!store.range(&prefix, None, 1).await?.kvs.is_empty())
}

fn token_of(prefix: &str, after: Option<&str>) -> String {
    after
        .and_then(|k| k.strip_prefix(prefix))
        .map(history::encode_page_token)
        .unwrap_or_default()
}

/// Whether `r` passes the query's filters (project, labels, creation time).
fn matches<T: Listed>(r: &T, q: &Query<'_>) -> bool {
    if !q.project.is_empty() && r.project() != q.project {
        return false;
    }
    if q.created_after_ms > 0 && r.created_at_ms() < q.created_after_ms {
        return false;
    }
    if q.created_before_ms > 0 && r.created_at_ms() >= q.created_before_ms {
        return false;
    }
    let labels = r.labels();
    q.labels
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}
