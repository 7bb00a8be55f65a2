//! After an attempt's result is durable: its log is sealed in the leader's local log
//! store, archived in the blob store, the archive recorded on the attempt, and only then
//! is the worker told it may drop the attempt's spool.
//!
//! The steps, each after the one before succeeded (none blocks the core):
//! 1. the result commit; the local log holds every chunk the `Finished` announced
//!    (`log_chunks`), else nothing happens: the worker keeps its spool and replays the
//!    chunks to whichever leader it connects to next;
//! 2. the local log is sealed (fsynced), then the result ack goes out (`Ack.result`);
//! 3. the sealed log is uploaded to the blob store ([`LogArchive`]), retried with
//!    backoff while the term lasts;
//! 4. [`CoreMsg::LogArchived`]: the core records `log_archive` (and the exact
//!    `log_bytes`) on the attempt through its persister (fenced, like every write);
//! 5. once that is durable, `Ack.archived` lets the worker drop the spool.
//!
//! A leader that dies anywhere in between loses nothing: until step 5 the worker keeps the
//! chunks, replays them to the next leader (its `Welcome` keeps result-recorded attempts
//! whose log is not archived) and resends the `Finished`, which runs these steps again
//! there (an upload is idempotent). Attempts without a log chunk, and controllers without a
//! blob store, skip steps 3-4.

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::proto::{self, ControllerMessage, controller_message};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::agent_tx::AgentTx;
use super::{CoreMsg, Effect, State, agent_effect};
use crate::logstore::LogStore;
use crate::logstore::archive::{Archived, LogArchive};

/// Upload attempts before an archive is left to the next replay.
const UPLOAD_TRIES: u32 = 8;

/// What the steps after a result need, cheap to clone into an effect.
#[derive(Clone)]
pub(crate) struct LogCtx {
    pub(crate) logs: Arc<LogStore>,
    pub(crate) archive: Option<Arc<LogArchive>>,
    /// The core, for recording archives (weak: it does not keep the core alive).
    pub(crate) core: mpsc::WeakSender<CoreMsg>,
}

/// The ack of an attempt's result (`archived`: the spool may go too).
pub(crate) fn result_ack(
    task_id: &str,
    token: u64,
    log_chunks: u64,
    archived: bool,
) -> ControllerMessage {
    ControllerMessage {
        msg: Some(controller_message::Msg::Ack(proto::Ack {
            task_id: task_id.to_string(),
            fencing_token: token,
            next_seq: log_chunks,
            result: true,
            stale: false,
            archived,
        })),
    }
}

impl State {
    pub(crate) fn log_ctx(&self) -> LogCtx {
        LogCtx {
            logs: self.logs.clone(),
            archive: self.archive.clone(),
            core: self.me.clone(),
        }
    }

    /// Step 4: records the archive on the attempt, then acks it to the agent.
    pub(super) async fn on_log_archived(
        &mut self,
        task_id: String,
        token: u64,
        archived: Archived,
        tx: Option<AgentTx>,
    ) {
        let ack = tx.map(|tx| agent_effect(tx, result_ack(&task_id, token, archived.chunks, true)));
        let Some(entry) = self.tasks.get_mut(&task_id) else {
            warn!(task = %task_id, "an archived log's task is not in memory; the worker replays it later");
            return;
        };
        let Some(a) = entry
            .task
            .attempts
            .iter_mut()
            .find(|a| a.fencing_token == token && a.result.is_some())
        else {
            warn!(task = %task_id, token, "an archived log's attempt is unknown");
            return;
        };
        if a.log_archive == archived.key && a.log_bytes == archived.data_bytes {
            self.after_durable(ack.into_iter().collect()).await;
            return;
        }
        a.log_archive = archived.key.clone();
        a.log_bytes = archived.data_bytes;
        a.log_chunks = a.log_chunks.max(archived.chunks);
        let task = entry.task.clone();
        info!(task = %task_id, token, key = %archived.key, bytes = archived.size, "log archived");
        self.persist_task(&task, ack.into_iter().collect()).await;
    }
}

/// Steps 2-5 for one attempt once its result commit (the effect's argument) succeeded.
/// `attempt` is the log store's attempt number (the token's low half).
pub(crate) fn after_result(
    ctx: LogCtx,
    task_id: &str,
    token: u64,
    log_chunks: u64,
    tx: Option<AgentTx>,
) -> Effect {
    let task_id = task_id.to_string();
    Box::new(move |r| {
        if r.is_err() {
            return;
        }
        if log_chunks == 0 {
            // Nothing to keep: the result ack lets the spool go.
            if let Some(tx) = tx {
                agent_effect(tx, result_ack(&task_id, token, 0, true))(r);
            }
            return;
        }
        tokio::spawn(async move { seal_archive_ack(ctx, task_id, token, log_chunks, tx).await });
    })
}

/// Steps 1 (the log check) to 4; true if the log was sealed (and acked).
pub(crate) async fn seal_archive_ack(
    ctx: LogCtx,
    task_id: String,
    token: u64,
    log_chunks: u64,
    tx: Option<AgentTx>,
) -> bool {
    let attempt = token as u32;
    let logs = &ctx.logs;
    match logs.next_seq(&task_id, attempt).await {
        Ok(have) if have >= log_chunks => {}
        Ok(have) => {
            warn!(task = %task_id, attempt, have, log_chunks, "the result is recorded but its log is incomplete here: waiting for the worker's replay");
            return false;
        }
        Err(e) => {
            warn!(task = %task_id, error = %e, "reading the log position failed: the worker keeps its spool");
            return false;
        }
    }
    if let Err(e) = logs.seal(&task_id, attempt).await {
        warn!(task = %task_id, error = %e, "sealing the log failed: the result is not acknowledged, the worker keeps its spool");
        return false;
    }
    let Some(archive) = ctx.archive.clone() else {
        if let Some(tx) = tx {
            agent_effect(tx, result_ack(&task_id, token, log_chunks, true))(&Ok(()));
        }
        return true;
    };
    if let Some(tx) = &tx {
        agent_effect(tx.clone(), result_ack(&task_id, token, log_chunks, false))(&Ok(()));
    }
    let mut delay = Duration::from_millis(200);
    for n in 1..=UPLOAD_TRIES {
        match archive.upload(logs, &task_id, attempt).await {
            Ok(archived) => {
                let Some(core) = ctx.core.upgrade() else {
                    return true; // the term is over: the next leader archives from the replay
                };
                let _ = core
                    .send(CoreMsg::LogArchived {
                        task_id,
                        fencing_token: token,
                        archived,
                        tx,
                    })
                    .await;
                return true;
            }
            Err(e) => {
                warn!(task = %task_id, attempt, try_ = n, error = %e, "archiving a log failed; the worker keeps its spool");
                if ctx.core.upgrade().is_none() {
                    return true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    true
}
