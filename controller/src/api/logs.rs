//! Serving `TaskService.Logs`: reads an attempt's log — from the blob store once it is
//! archived (`AttemptRecord.log_archive`) and this controller has no sealed copy of its
//! own, else from the leader's local log store — and,
//! with `follow`, waits for more until the attempt has ended, moving on to the next
//! attempt when the task was requeued and the caller follows the latest one.
//!
//! An attempt that ended while its log is still incomplete here (a new leader, before the
//! worker replayed its spool) is waited for, follow or not, up to [`RECOVERY_WAIT`]: its
//! chunks arrive, or its archive is recorded; after that the call fails `UNAVAILABLE`
//! rather than end a log short.

use std::sync::Arc;

use scabbard_common::proto::{LogChunk, Task};
use scabbard_common::{Error, Result, is_final};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::core::{CoreMsg, CoreRouter};
use crate::logstore::LogStore;
use crate::logstore::archive::LogArchive;

const PAGE: usize = 512;

/// How long a read waits for the rest of an ended attempt's log to come back.
pub(crate) const RECOVERY_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub(super) struct Follower {
    pub(super) core: CoreRouter,
    pub(super) logs: Arc<LogStore>,
    pub(super) archive: Option<Arc<LogArchive>>,
    pub(super) task_id: String,
    pub(super) follow_latest: bool,
    /// 0: not assigned yet.
    pub(super) attempt: u32,
    pub(super) seq: u64,
    pub(super) follow: bool,
}

impl Follower {
    pub(super) async fn run(mut self, tx: mpsc::Sender<Result<LogChunk, Status>>) {
        if let Err(e) = self.serve(&tx).await {
            let _ = tx.send(Err(e.into())).await;
        }
    }

    async fn task(&self) -> Result<Task> {
        self.core.current()?.task(&self.task_id).await
    }

    async fn serve(&mut self, tx: &mpsc::Sender<Result<LogChunk, Status>>) -> Result<()> {
        let (_, mut events) = self
            .core
            .call(|reply| CoreMsg::Subscribe { ids: vec![], reply })
            .await?;
        loop {
            if self.attempt == 0 {
                // Not assigned yet: wait for the first attempt (or the end).
                let task = self.task().await?;
                if task.fencing_token > 0 {
                    self.attempt = task.fencing_token as u32;
                    continue;
                }
                if !self.follow || is_final(task.state()) {
                    return Ok(());
                }
                self.wait_task_event(&mut events).await?;
                continue;
            }
            self.serve_attempt(tx, &mut events).await?;
            if tx.is_closed() {
                return Ok(());
            }
            // This attempt's log is complete.
            if !self.follow || !self.follow_latest {
                return Ok(());
            }
            loop {
                let task = self.task().await?;
                if task.fencing_token as u32 > self.attempt {
                    self.attempt = task.fencing_token as u32;
                    self.seq = 0;
                    break;
                }
                if is_final(task.state()) {
                    return Ok(());
                }
                self.wait_task_event(&mut events).await?;
            }
        }
    }

    /// Sends the current attempt's log from `self.seq` until it is complete (or, without
    /// `follow`, until what a running attempt has so far is sent).
    async fn serve_attempt(
        &mut self,
        tx: &mpsc::Sender<Result<LogChunk, Status>>,
        events: &mut broadcast::Receiver<Arc<Task>>,
    ) -> Result<()> {
        let index = self.attempt as usize - 1;
        let mut pos = self.logs.subscribe(&self.task_id, self.attempt);
        let mut recovering: Option<tokio::time::Instant> = None;
        let mut archive_missing = false;
        loop {
            let task = self.task().await?;
            let record = task.attempts.get(index);
            if let Some(a) = record.filter(|a| !a.log_archive.is_empty() && !archive_missing)
                && let Some(archive) = &self.archive
            {
                // This controller's own sealed copy, if it has one, is the cheaper read.
                let here = self.logs.position(&self.task_id, self.attempt).await?;
                if here.sealed && here.next_seq >= a.log_chunks {
                    archive_missing = true;
                    continue;
                }
                let mut chunks = match archive.read(&a.log_archive, self.attempt, self.seq).await {
                    Ok(chunks) => chunks,
                    // Not in this controller's blob store (a local artifacts directory that
                    // is not shared): the local log store may still hold it whole (a shared
                    // logs directory).
                    Err(e @ Error::NotFound { .. }) => {
                        let here = self.logs.next_seq(&self.task_id, self.attempt).await?;
                        if here < a.log_chunks.max(1) {
                            return Err(e);
                        }
                        archive_missing = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                while let Some(c) = futures::StreamExt::next(&mut chunks).await {
                    let c = c?;
                    self.seq = c.seq + 1;
                    if tx.send(Ok(c)).await.is_err() {
                        return Ok(());
                    }
                }
                return Ok(());
            }
            // Seen before reading: a chunk stored after this read wakes the wait below.
            let p = *pos.borrow_and_update();
            loop {
                let chunks = self
                    .logs
                    .read(&self.task_id, self.attempt, self.seq, PAGE)
                    .await?;
                let n = chunks.len();
                for c in chunks {
                    self.seq = c.seq + 1;
                    if tx.send(Ok(c)).await.is_err() {
                        return Ok(());
                    }
                }
                if n < PAGE {
                    break;
                }
            }
            if p.sealed && self.seq >= p.next_seq {
                return Ok(());
            }
            match record.filter(|a| a.result.is_some()) {
                // Ended: every chunk is stored before the end is recorded — here, unless
                // this leader took over and the worker has not replayed them yet.
                Some(a) if self.seq >= a.log_chunks => return Ok(()),
                Some(a) => {
                    let since = *recovering.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= RECOVERY_WAIT {
                        return Err(Error::Unavailable(format!(
                            "the log of task {} attempt {} is incomplete here ({} of {} chunks): \
                             its worker has not replayed the rest to this leader yet; retry later",
                            self.task_id, self.attempt, self.seq, a.log_chunks
                        )));
                    }
                }
                None if !self.follow => return Ok(()),
                None => {}
            }
            let limit = recovering.map_or(tokio::time::Instant::now() + RECOVERY_WAIT, |s| {
                s + RECOVERY_WAIT
            });
            tokio::select! {
                r = pos.changed() => if r.is_err() { return Ok(()) },
                r = self.wait_task_event(events) => r?,
                _ = tx.closed() => return Ok(()),
                _ = tokio::time::sleep_until(limit) => {}
            }
        }
    }

    async fn wait_task_event(&self, events: &mut broadcast::Receiver<Arc<Task>>) -> Result<()> {
        loop {
            match events.recv().await {
                Ok(t) if t.id == self.task_id => return Ok(()),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Error::Unavailable("controller is shutting down".into()));
                }
            }
        }
    }
}
