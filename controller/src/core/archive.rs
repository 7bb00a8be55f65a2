//! After an attempt's result is durable: its log is sealed in the leader's local log
//! store, archived in the blob store, the archive recorded on the attempt, and only then
//! is the worker told it may drop the attempt's spool.
//!
//! The steps, each after the one before succeeded (none blocks the core):
//! 1. the result commit; the local log holds every chunk the `Finished` announced
//!    (`log_chunks`), else nothing happens: the worker keeps its spool and replays the
//!    chunks to whichever leader it connects to next;
//! 2. the local log is sealed (fsynced), then the result ack goes out (`Ack.result`);
//! 3. the sealed log is uploaded to the blob store ([`LogArchive`]); an unreachable store
//!    is retried with backoff while the term lasts;
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

/// Tries of an upload that fails for a reason other than an unreachable blob store (the
/// local log vanished, e.g. deleted by retention) before it is left to the next replay. An
/// unreachable store is retried (backoff up to 30 s) for as long as the term lasts.
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

    /// Step 4: records the archive on the attempt, then acks it to the attempt's agent
    /// (if connected; else its next `Welcome` says so).
    pub(super) async fn on_log_archived(
        &mut self,
        task_id: String,
        token: u64,
        archived: Archived,
    ) {
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
        // The agent's session now (it may have reconnected since the upload began).
        let ack = self
            .agents
            .get(&a.agent_id)
            .and_then(|g| g.conn.as_ref())
            .map(|c| {
                agent_effect(
                    c.tx.clone(),
                    result_ack(&task_id, token, archived.chunks, true),
                )
            });
        if a.log_archive == archived.key && a.log_bytes == archived.data_bytes {
            self.after_durable(ack.into_iter().collect()).await;
            return;
        }
        a.log_archive = archived.key.clone();
        a.log_bytes = archived.data_bytes;
        a.log_chunks = a.log_chunks.max(archived.chunks);
        let task = entry.task.clone();
        info!(task = %task_id, token, key = %archived.key, bytes = archived.size, "log archived");
        self.persist_task(task, ack.into_iter().collect()).await;
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
    let mut other_failures = 0;
    for n in 1u64.. {
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
                    })
                    .await;
                return true;
            }
            Err(e) => {
                warn!(task = %task_id, attempt, try_ = n, error = %e, "archiving a log failed; the worker keeps its spool");
                if !matches!(e, scabbard_common::Error::Unavailable(_)) {
                    other_failures += 1;
                }
                if ctx.core.upgrade().is_none() || other_failures >= UPLOAD_TRIES {
                    return true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use scabbard_common::proto::{self, ControllerMessage, controller_message};
    use tokio::sync::mpsc;

    use super::{CoreMsg, LogCtx, after_result, seal_archive_ack};
    use crate::artifacts::{ArtifactStore, ArtifactsConfig};
    use crate::core::agent_tx::AgentTx;
    use crate::logstore::LogStore;
    use crate::logstore::archive::LogArchive;

    struct Fixture {
        _dir: tempfile::TempDir,
        logs: std::sync::Arc<LogStore>,
        archive: std::sync::Arc<LogArchive>,
        blobs: std::sync::Arc<ArtifactStore>,
    }

    async fn fixture(chunks: u64) -> Fixture {
        let d = tempfile::tempdir().unwrap();
        let logs = LogStore::open(&d.path().join("logs")).unwrap();
        let chunks: Vec<proto::LogChunk> = (0..chunks)
            .map(|seq| proto::LogChunk {
                seq,
                data: format!("line {seq}\n").into_bytes(),
                ..Default::default()
            })
            .collect();
        if !chunks.is_empty() {
            logs.append("t1", 1, &chunks).await.unwrap();
        }
        let blobs = ArtifactStore::open(&ArtifactsConfig::default(), d.path()).unwrap();
        Fixture {
            _dir: d,
            logs,
            archive: LogArchive::new(blobs.clone()),
            blobs,
        }
    }

    fn ctx(f: &Fixture, archive: bool, core: &mpsc::Sender<CoreMsg>) -> LogCtx {
        LogCtx {
            logs: f.logs.clone(),
            archive: archive.then(|| f.archive.clone()),
            core: core.downgrade(),
        }
    }

    fn ack_of(m: Box<ControllerMessage>) -> proto::Ack {
        match m.msg {
            Some(controller_message::Msg::Ack(a)) => a,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_finished_log_is_sealed_acked_then_archived_and_reported_to_the_core() {
        let f = fixture(3).await;
        let (core_tx, mut core_rx) = mpsc::channel(4);
        let (tx, mut rx, _overflow) = AgentTx::channel(4);
        after_result(ctx(&f, true, &core_tx), "t1", 1, 3, Some(tx))(&Ok(()));
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a result ack")
            .expect("open");
        let first = ack_of(first);
        assert!(first.result && !first.archived, "{first:?}");
        // Sealing (fsync) came before the ack.
        assert!(f.logs.position("t1", 1).await.unwrap().sealed);
        let msg = tokio::time::timeout(Duration::from_secs(10), core_rx.recv())
            .await
            .expect("the core hears of the archive")
            .expect("open");
        let CoreMsg::LogArchived {
            task_id,
            fencing_token,
            archived,
        } = msg
        else {
            panic!("expected LogArchived");
        };
        assert_eq!((task_id.as_str(), fencing_token), ("t1", 1));
        assert_eq!(archived.chunks, 3);
        assert_eq!(archived.data_bytes, f.logs.bytes("t1", 1).await.unwrap());
        assert_eq!(archived.key, "logs/t1/1.log");
        // The spool may not go before the core recorded the archive.
        assert!(rx.try_recv().is_err());
        let back: Vec<_> = f
            .archive
            .read(&archived.key, 1, 1)
            .await
            .unwrap()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, f.logs.read("t1", 1, 1, 100).await.unwrap());
        // Retention deletes it.
        assert_eq!(f.archive.delete_archived_logs("t1").await.unwrap(), 1);
        let key = f.blobs.log_key("t1", 1);
        assert!(!f.blobs.exists(&key).await.unwrap());
    }

    #[tokio::test]
    async fn an_incomplete_or_unsealable_log_is_not_acked() {
        let f = fixture(2).await;
        let (core_tx, mut core_rx) = mpsc::channel(4);
        let (tx, mut rx, _overflow) = AgentTx::channel(4);
        // The result says 5 chunks; 2 are here (a new leader before the replay).
        let ctx = ctx(&f, true, &core_tx);
        assert!(!seal_archive_ack(ctx.clone(), "t1".into(), 1, 5, Some(tx.clone())).await);
        assert!(rx.try_recv().is_err());
        assert!(!f.logs.position("t1", 1).await.unwrap().sealed);
        // A failed commit acknowledges nothing.
        after_result(ctx, "t1", 1, 2, Some(tx))(&Err(crate::core::persist::CommitError {
            refused: false,
            message: "x".into(),
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err());
        assert!(core_rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn without_a_log_or_a_blob_store_the_result_ack_lets_the_spool_go() {
        let f = fixture(0).await;
        let (core_tx, _core_rx) = mpsc::channel(4);
        let (tx, mut rx, _overflow) = AgentTx::channel(4);
        after_result(ctx(&f, true, &core_tx), "t1", 1, 0, Some(tx))(&Ok(()));
        let a = ack_of(rx.try_recv().unwrap());
        assert!(a.result && a.archived);

        let f = fixture(2).await;
        let (tx, mut rx, _overflow) = AgentTx::channel(4);
        assert!(seal_archive_ack(ctx(&f, false, &core_tx), "t1".into(), 1, 2, Some(tx)).await);
        let a = ack_of(rx.try_recv().unwrap());
        assert!(a.result && a.archived);
    }
}
