//! Deleting a task's logs when retention expires it: every attempt's file (and seal
//! marker) under `<dir>/<task_id>/`, whatever of them is cached in memory, and the
//! archived copies in the blob store (when this log store has an archive attached).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use futures::StreamExt;
use scabbard_common::{Error, Result};

use super::disk::lock;
use super::{LogStore, check_task_id};

impl LogStore {
    /// Deletes every attempt log of `task_id`, local and archived. Deleting logs that are
    /// already gone is fine. Only for tasks that are final: an attempt still being
    /// appended to would come back.
    pub async fn delete_task(&self, task_id: &str) -> Result<()> {
        self.delete_tasks(&[task_id.to_string()])
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// [`Self::delete_task`] for many tasks, one answer per task in their order (a task
    /// whose logs could not all be deleted keeps the rest for the next try). The local
    /// files of all of them go in one blocking job, so a retention batch costs one thread
    /// hand-off instead of one per task.
    pub async fn delete_tasks(&self, task_ids: &[String]) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = task_ids.iter().map(|id| check_task_id(id)).collect();
        // The archive first: a failure leaves the local copy, and the next sweep retries.
        if let Some(a) = self.archive() {
            let archived: Vec<Result<usize>> = futures::stream::iter(task_ids.to_vec())
                .map(|id| {
                    let a = a.clone();
                    async move { a.delete_archived_logs(&id).await }
                })
                .buffered(8)
                .collect()
                .await;
            for (r, a) in results.iter_mut().zip(archived) {
                if r.is_ok()
                    && let Err(e) = a
                {
                    *r = Err(e);
                }
            }
        }
        let doomed: HashSet<String> = task_ids
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(id, _)| id.clone())
            .collect();
        if doomed.is_empty() {
            return results;
        }
        // Drop the cached attempts first, so nothing serves or reopens the files.
        let cached: Vec<_> = {
            let mut cache = lock(&self.shared.cache);
            let keys: Vec<_> = cache
                .attempts
                .keys()
                .filter(|(t, _)| doomed.contains(t))
                .cloned()
                .collect();
            keys.iter()
                .filter_map(|k| cache.attempts.remove(k))
                .collect()
        };
        let local = self
            .blocking(move |shared| {
                for entry in &cached {
                    let mut st = lock(&entry.state);
                    st.file = None;
                    entry.loaded.store(false, Ordering::Release);
                }
                Ok(doomed
                    .into_iter()
                    .filter_map(|id| match std::fs::remove_dir_all(shared.dir.join(&id)) {
                        Ok(()) => None,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                        Err(e) => Some((id, Error::from(e))),
                    })
                    .collect::<HashMap<_, _>>())
            })
            .await;
        match local {
            Ok(mut failed) => {
                for (id, r) in task_ids.iter().zip(results.iter_mut()) {
                    if let Some(e) = failed.remove(id) {
                        *r = Err(e);
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(Error::internal(msg.clone()));
                }
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use scabbard_common::proto::{LogChunk, LogStream};

    use super::*;

    fn chunk(seq: u64) -> LogChunk {
        LogChunk {
            seq,
            stream: LogStream::Stdout as i32,
            data: b"line\n".to_vec(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn deletes_every_attempt_of_one_task_only() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        logs.append("t1", 1, &[chunk(0)]).await.unwrap();
        logs.seal("t1", 1).await.unwrap();
        logs.append("t1", 2, &[chunk(0), chunk(1)]).await.unwrap();
        logs.append("t2", 1, &[chunk(0)]).await.unwrap();
        logs.delete_task("t1").await.unwrap();
        assert!(!dir.path().join("t1").exists());
        assert_eq!(logs.next_seq("t1", 2).await.unwrap(), 0);
        assert_eq!(logs.next_seq("t2", 1).await.unwrap(), 1);
        // Gone already: fine.
        logs.delete_task("t1").await.unwrap();
        assert!(logs.delete_task("../x").await.is_err());
    }

    #[tokio::test]
    async fn a_batch_answers_per_task_and_a_bad_id_spoils_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        for t in ["a", "b", "keep"] {
            logs.append(t, 1, &[chunk(0)]).await.unwrap();
        }
        let ids: Vec<String> = ["a", "../escape", "b", "never-had-logs"]
            .map(String::from)
            .to_vec();
        let r = logs.delete_tasks(&ids).await;
        assert_eq!(r.len(), 4);
        assert!(r[0].is_ok() && r[2].is_ok() && r[3].is_ok(), "{r:?}");
        assert!(r[1].is_err(), "{r:?}");
        assert!(!dir.path().join("a").exists());
        assert!(!dir.path().join("b").exists());
        assert!(dir.path().join("keep").exists());
        assert_eq!(logs.next_seq("a", 1).await.unwrap(), 0);
        assert_eq!(logs.next_seq("keep", 1).await.unwrap(), 1);
        assert!(logs.delete_tasks(&[]).await.is_empty());
    }
}
