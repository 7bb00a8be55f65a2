//! Deleting a task's logs when retention expires it: every attempt's file (and seal
//! marker) under `<dir>/<task_id>/`, whatever of them is cached in memory, and the
//! archived copies in the blob store (when this log store has an archive attached).

use std::sync::atomic::Ordering;

use scabbard_common::Result;

use super::disk::lock;
use super::{LogStore, check_task_id};

impl LogStore {
    /// Deletes every attempt log of `task_id`, local and archived. Deleting logs that are
    /// already gone is fine. Only for tasks that are final: an attempt still being
    /// appended to would come back.
    pub async fn delete_task(&self, task_id: &str) -> Result<()> {
        check_task_id(task_id)?;
        // The archive first: a failure leaves the local copy, and the next sweep retries.
        if let Some(a) = self.archive() {
            a.delete_archived_logs(task_id).await?;
        }
        // Drop the cached attempts first, so nothing serves or reopens the files.
        let cached: Vec<_> = {
            let mut cache = lock(&self.shared.cache);
            let keys: Vec<_> = cache
                .attempts
                .keys()
                .filter(|(t, _)| t == task_id)
                .cloned()
                .collect();
            keys.iter()
                .filter_map(|k| cache.attempts.remove(k))
                .collect()
        };
        let task_id = task_id.to_string();
        self.blocking(move |shared| {
            for entry in &cached {
                let mut st = lock(&entry.state);
                st.file = None;
                entry.loaded.store(false, Ordering::Release);
            }
            match std::fs::remove_dir_all(shared.dir.join(&task_id)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await
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
}
