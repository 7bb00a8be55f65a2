//! `TaskService/List`, served from the store off the core: the history index
//! (`hist/t/<inverted id>` for every task, `hist/p/<project>/<inverted id>` per project; see
//! `core::history`) gives a stable newest-first order, and each page reads the records it
//! looks at to filter on state, labels and creation time.
//!
//! * **Page tokens** are keyset positions (the last index key a page looked at): tasks
//!   submitted while a client pages sort before the position, so no task is skipped or
//!   repeated across pages.
//! * **Time range**: ids are ULIDs, which start with their creation time, so
//!   `created_before_ms` is where the range starts and `created_after_ms` where it stops.
//! * **Scan budget**: a page looks at most at [`SCAN_BUDGET`] index keys. A very selective
//!   filter then returns a partial (even empty) page with a token to go on from.
//! * **Freshness**: a record in the store is the task's state as last committed. Every
//!   transition is committed before anyone is told about it, so a listed state is never
//!   older than one a client was answered; a transition the core has made but not yet
//!   committed (milliseconds) shows as the state before it.

use scabbard_common::proto::{ListTasksRequest, Task};
use scabbard_common::{Error, Result};

use crate::core::history;
use crate::store::Store;

/// Most index keys one page looks at.
pub(crate) const SCAN_BUDGET: usize = 5_000;

/// Tasks created this long before `created_after_ms` by their id may carry a creation time
/// inside the range (the id is taken a moment before the record's time).
const CLOCK_SLACK_MS: i64 = 1_000;

/// One page of tasks and the token of the next ("" at the end).
pub(crate) async fn tasks(
    store: &dyn Store,
    req: &ListTasksRequest,
) -> Result<(Vec<Task>, String)> {
    let size = match req.page_size {
        0 => 100,
        n if n <= 1000 => n as usize,
        n => {
            return Err(Error::invalid(format!("page_size {n} is larger than 1000")));
        }
    };
    if req.created_after_ms < 0 || req.created_before_ms < 0 {
        return Err(Error::invalid(
            "created_after_ms and created_before_ms are unix milliseconds (0 = no bound)",
        ));
    }
    if req.created_before_ms > 0 && req.created_after_ms >= req.created_before_ms {
        return Err(Error::invalid(format!(
            "created_after_ms ({}) must be before created_before_ms ({})",
            req.created_after_ms, req.created_before_ms
        )));
    }
    // The narrowest index: an indexed label's within the project (unless the project has
    // tasks whose labels are not indexed), else the project's, else all.
    let label = req
        .labels
        .iter()
        .filter(|(k, v)| history::label_indexable(k, v))
        .min();
    let prefix = match (req.project.is_empty(), label) {
        (true, _) => history::TASK_INDEX_PREFIX.to_string(),
        (false, Some((k, v))) if !label_overflow(store, &req.project).await? => {
            history::label_index_prefix(&req.project, k, v)
        }
        (false, _) => history::project_index_prefix(&req.project),
    };
    // Where to start: after the token's position, and after every id created at or after
    // `created_before_ms`.
    let mut after: Option<String> = None;
    if !req.page_token.is_empty() {
        after = Some(history::decode_page_token(&req.page_token)?);
    }
    if req.created_before_ms > 0 {
        let bound = history::inverted_time_bound(req.created_before_ms);
        if after.as_ref().is_none_or(|a| *a < bound) {
            after = Some(bound);
        }
    }
    let mut after = after.map(|inv| format!("{prefix}{inv}"));
    // Where to stop: past every id created before `created_after_ms` (less a slack).
    let stop = (req.created_after_ms > 0)
        .then(|| history::inverted_time_bound((req.created_after_ms - CLOCK_SLACK_MS).max(0)));
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
        let ids: Vec<String> = invs
            .iter()
            .filter_map(|inv| history::uninvert_id(inv))
            .collect();
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!("{}{id}", crate::core::TASK_PREFIX))
            .collect();
        let records = history::get_many(store, &keys).await?;
        for (inv, record) in invs.iter().zip(records) {
            scanned += 1;
            after = Some(format!("{prefix}{inv}"));
            // Deleted by retention since the index was read (both go in one commit).
            let Some(record) = record else { continue };
            let t = decode(&record)?;
            if matches(&t, req) {
                out.push(t);
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

/// Whether `project` has tasks whose labels are not indexed.
async fn label_overflow(store: &dyn Store, project: &str) -> Result<bool> {
    let prefix = format!("{}{project}/", history::LABEL_OVERFLOW_PREFIX);
    Ok(!store.range(&prefix, None, 1).await?.kvs.is_empty())
}

fn token_of(prefix: &str, after: Option<&str>) -> String {
    after
        .and_then(|k| k.strip_prefix(prefix))
        .map(history::encode_page_token)
        .unwrap_or_default()
}

fn decode(record: &[u8]) -> Result<Task> {
    let mut t = <Task as prost::Message>::decode(record)
        .map_err(|e| Error::internal(format!("corrupt task record: {e}")))?;
    if t.project.is_empty() {
        t.project = crate::auth::DEFAULT_PROJECT.to_string();
    }
    Ok(t)
}

/// Whether `t` passes the request's filters (project, states, labels, creation time).
fn matches(t: &Task, req: &ListTasksRequest) -> bool {
    if !req.project.is_empty() && t.project != req.project {
        return false;
    }
    if !req.states.is_empty() && !req.states.contains(&t.state) {
        return false;
    }
    if req.created_after_ms > 0 && t.created_at_ms < req.created_after_ms {
        return false;
    }
    if req.created_before_ms > 0 && t.created_at_ms >= req.created_before_ms {
        return false;
    }
    let labels = t.spec.as_ref().map(|s| &s.labels);
    req.labels
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}
