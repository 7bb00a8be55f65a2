//! Reading task and workflow history from the store, off the core: records by id (one
//! transaction of reads per chunk on etcd), whole workflows (header and parts), and the
//! lookups a submit needs when its idempotency key or an input's producer is not in the
//! core's memory.

use prost::Message;
use scabbard_common::proto::{Task, Workflow};
use scabbard_common::{Error, Result};

use crate::core::TASK_PREFIX;
use crate::core::workflows::records;
use crate::store::Store;

/// A task record from the store (`None` when there is none).
pub(crate) async fn read_task(store: &dyn Store, id: &str) -> Result<Option<Task>> {
    let Some(kv) = store.get(&format!("{}{id}", TASK_PREFIX)).await? else {
        return Ok(None);
    };
    let mut t = Task::decode(kv.value.as_slice())
        .map_err(|e| Error::internal(format!("corrupt task record {id}: {e}")))?;
    if t.project.is_empty() {
        t.project = crate::auth::DEFAULT_PROJECT.to_string();
    }
    Ok(Some(t))
}

/// The values of `keys` (in order; `None` for a missing one): one transaction of reads per
/// chunk on etcd (a round trip each), plain reads on the embedded store (they do not queue
/// behind its writer).
pub(crate) async fn get_many(store: &dyn Store, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
    let mut out = Vec::with_capacity(keys.len());
    if store.backend() != "etcd" {
        for k in keys {
            out.push(store.get(k).await?.map(|kv| kv.value));
        }
        return Ok(out);
    }
    let chunk = store.max_txn_ops().clamp(1, 128);
    for part in keys.chunks(chunk) {
        let r = store
            .txn(crate::store::Txn {
                success: part
                    .iter()
                    .map(|k| crate::store::Op::Get { key: k.clone() })
                    .collect(),
                ..Default::default()
            })
            .await?;
        for res in r.results {
            if let crate::store::OpResult::Get(kv) = res {
                out.push(kv.map(|kv| kv.value));
            }
        }
    }
    Ok(out)
}

/// The records of tasks `ids` that exist, in order.
pub(crate) async fn read_tasks(store: &dyn Store, ids: &[String]) -> Result<Vec<Task>> {
    let keys: Vec<String> = ids
        .iter()
        .map(|id| format!("{}{id}", TASK_PREFIX))
        .collect();
    let mut out = Vec::with_capacity(ids.len());
    for (k, v) in keys.iter().zip(get_many(store, &keys).await?) {
        let Some(v) = v else { continue };
        let mut t = Task::decode(v.as_slice())
            .map_err(|e| Error::internal(format!("corrupt task record {k}: {e}")))?;
        if t.project.is_empty() {
            t.project = crate::auth::DEFAULT_PROJECT.to_string();
        }
        out.push(t);
    }
    Ok(out)
}

/// For a submit (off the core): the task id `idem` (an `idem/` key) names, if any, and the
/// records of that task and of `ids`.
pub(crate) async fn lookup(
    store: &dyn Store,
    idem: Option<&str>,
    ids: &[String],
) -> Result<(Option<String>, Vec<Task>)> {
    let mut ids = ids.to_vec();
    let mut named = None;
    if let Some(k) = idem
        && let Some(kv) = store.get(k).await?
    {
        let id = String::from_utf8_lossy(&kv.value).into_owned();
        ids.push(id.clone());
        named = Some(id);
    }
    let mut tasks = Vec::with_capacity(ids.len());
    for id in &ids {
        if let Some(t) = read_task(store, id).await? {
            tasks.push(t);
        }
    }
    Ok((named, tasks))
}

/// A workflow's records in the store: its header and parts, in key order (none when it
/// has no header).
pub(crate) async fn read_workflow_records(
    store: &dyn Store,
    id: &str,
) -> Result<Vec<crate::store::KeyValue>> {
    let header = records::header_key(id);
    let parts = format!("{header}/");
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.range(&header, after.as_deref(), 1_000).await?;
        after = page.kvs.last().map(|kv| kv.key.clone());
        // The prefix also matches longer ids.
        out.extend(
            page.kvs
                .into_iter()
                .filter(|kv| kv.key == header || kv.key.starts_with(&parts)),
        );
        if !page.more || after.is_none() {
            return Ok(out);
        }
    }
}

/// A workflow from the store, header and parts (`None` when it has no header).
pub(crate) async fn read_workflow(store: &dyn Store, id: &str) -> Result<Option<Workflow>> {
    let mut loader = records::Loader::default();
    for kv in read_workflow_records(store, id).await? {
        loader.add(&kv.key, &kv.value)?;
    }
    let loaded = loader.finish();
    if let Some((id, why)) = loaded.broken.into_iter().next() {
        return Err(Error::internal(format!("workflow {id}: {why}")));
    }
    Ok(loaded.workflows.into_iter().find(|w| w.id == id))
}
