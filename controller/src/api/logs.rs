//! Serving `TaskService.Logs`: reads an attempt's log from the log store and, with
//! `follow`, waits for more until the attempt has ended — moving on to the next attempt
//! when the task was requeued and the caller follows the latest one.

use std::sync::Arc;

use scabbard_common::proto::{LogChunk, Task};
use scabbard_common::{Error, Result, is_final};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::core::{CoreMsg, CoreRouter};
use crate::logstore::LogStore;

const PAGE: usize = 512;

pub(super) struct Follower {
    pub(super) core: CoreRouter,
    pub(super) logs: Arc<LogStore>,
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
            let mut pos = self.logs.subscribe(&self.task_id, self.attempt);
            let mut finished = false;
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
                if n == PAGE {
                    continue;
                }
                if finished || !self.follow {
                    break;
                }
                let p = *pos.borrow_and_update();
                if p.sealed && self.seq >= p.next_seq {
                    break;
                }
                // Every chunk of an attempt is stored before its end is recorded, so once
                // the task shows the attempt ended, one more read completes the log.
                let task = self.task().await?;
                if task
                    .attempts
                    .get(self.attempt as usize - 1)
                    .is_some_and(|a| a.result.is_some())
                {
                    finished = true;
                    continue;
                }
                tokio::select! {
                    r = pos.changed() => if r.is_err() { return Ok(()) },
                    r = self.wait_task_event(&mut events) => r?,
                    _ = tx.closed() => return Ok(()),
                }
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
