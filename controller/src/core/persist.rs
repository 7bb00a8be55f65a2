//! The persister: the only writer of the core's records. The core hands it writes in
//! order; it groups what is pending into one store transaction (one durable commit),
//! bounded by operation count and bytes, and only then runs each write's effects —
//! replying to a client, sending a message to an agent, publishing a task event. So nothing
//! is acknowledged before it is durable, and the core never waits on the disk.
//!
//! Failures, and what they cost:
//! * **A write the store refuses** (too large, or otherwise invalid) is isolated: the
//!   batch is committed again one write at a time, the others land, and the refused one
//!   gets an error in its effects and is reported to the core ([`Refused`]), which ends that
//!   one record's story cleanly (e.g. fails the task with the reason).
//! * **Anything else** (the store is unreachable after retries, or the leader's fence was
//!   refused) **ends the term**: this batch and every write queued after it fail without
//!   being committed, and `term_over` is cancelled. The core stops; the controller stops
//!   serving as leader and rebuilds from the store as a new term. State the store has not
//!   confirmed is never served.
//! * A **barrier** ([`Write::barrier`]) carries no data: its effects run once every write
//!   queued before it is durable, for answers that state something already written.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use scabbard_common::{Error, Result};
use tokio::sync::mpsc;
use tracing::{error, warn};

use tokio_util::sync::CancellationToken;

use crate::store::{Compare, Op, Store, Txn};

/// What guards every commit: the leader's fence, and the token to cancel when it fails.
#[derive(Clone)]
pub(crate) struct Fence {
    pub(crate) compare: Compare,
    pub(crate) lost: CancellationToken,
}

/// Runs after the write's batch committed (`Ok`) or failed (`Err`).
pub(crate) type Effect = Box<dyn FnOnce(&Result<(), CommitError>) + Send>;

/// Why a write is not durable.
#[derive(Debug, Clone)]
pub(crate) struct CommitError {
    /// The store refused this write itself (too large, invalid): retrying will not help.
    pub(crate) refused: bool,
    pub(crate) message: String,
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl CommitError {
    fn refused(message: &str) -> Self {
        Self {
            refused: true,
            message: format!("the store refused this record: {message}"),
        }
    }

    fn unavailable(message: &str) -> Self {
        Self {
            refused: false,
            message: message.to_string(),
        }
    }

    /// The error a client gets.
    pub(crate) fn to_error(&self) -> Error {
        if self.refused {
            Error::invalid(self.message.clone())
        } else {
            Error::Unavailable(format!("could not persist: {}", self.message))
        }
    }
}

/// One record to write (or delete) and what to do once it is durable.
pub(crate) struct Write {
    pub(crate) key: String,
    /// `None` deletes the key (or, with an empty key, is a barrier).
    pub(crate) value: Option<Vec<u8>>,
    /// More keys written (`Some`) or deleted (`None`) in the same commit as `key`: the
    /// history keys that follow a task record (see `core::history`). Never split from it.
    pub(crate) also: Vec<(String, Option<Vec<u8>>)>,
    pub(crate) effects: Vec<Effect>,
}

impl Write {
    /// No data: `effects` run once everything queued before it is durable.
    pub(crate) fn barrier(effects: Vec<Effect>) -> Self {
        Self {
            key: String::new(),
            value: None,
            also: Vec::new(),
            effects,
        }
    }

    fn is_barrier(&self) -> bool {
        self.key.is_empty()
    }

    fn bytes(&self) -> usize {
        let one = |k: &String, v: &Option<Vec<u8>>| k.len() + v.as_ref().map_or(0, Vec::len);
        one(&self.key, &self.value) + self.also.iter().map(|(k, v)| one(k, v)).sum::<usize>()
    }

    /// Store operations this write makes (a barrier none).
    fn ops(&self) -> usize {
        if self.is_barrier() {
            0
        } else {
            1 + self.also.len()
        }
    }
}

/// A write the store refused on its own: the key, its size, and the store's reason.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    pub(crate) key: String,
    pub(crate) bytes: usize,
    pub(crate) reason: String,
}

/// How big one commit may grow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    /// Operations per transaction (the fence compare not included).
    pub(crate) ops: usize,
    /// Bytes of keys and values per transaction. A single larger write still goes alone
    /// (and the store decides).
    pub(crate) bytes: usize,
}

impl BatchLimits {
    /// What `store` accepts in one transaction, with room for the fence compare.
    pub(crate) fn for_store(store: &dyn Store) -> Self {
        Self {
            ops: 4096usize.min(store.max_txn_ops().saturating_sub(1)).max(1),
            // Keys and values are not all a request carries: leave an eighth for framing.
            bytes: (store.max_txn_bytes() / 8 * 7).max(1),
        }
    }
}

/// How busy the live path is, for background work that makes way for it (the retention
/// sweeper): commits of the core's writes, and how long the last one took.
#[derive(Debug, Default)]
pub(crate) struct Load {
    commits: AtomicU64,
    last_commit_us: AtomicU64,
}

impl Load {
    /// Commits of the core's writes so far (this term).
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// How long the last commit of the core's writes took.
    pub(crate) fn last_commit(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.last_commit_us.load(Ordering::Relaxed))
    }

    fn committed(&self, took: std::time::Duration) {
        self.last_commit_us
            .store(took.as_micros() as u64, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
    }
}

/// Most writes held while staging before they go to the persister anyway.
const STAGE_MAX: usize = 256;

/// Handle used by the core to enqueue writes.
///
/// While [`staging`](Self::stage) (the core's run loop), writes are held and go to the
/// persister together at [`flush`](Self::flush), once per turn of the core: a submit and
/// the assignment the same turn makes of it land in one commit (one sync, not two, on
/// the way from submit to start), and the persister is woken once per turn, not per write.
/// Nothing is acknowledged any earlier: effects still run only after the commit.
pub(crate) struct Persister {
    tx: mpsc::Sender<Vec<Write>>,
    /// `Some` while staging: the writes of this turn, in order.
    staged: std::sync::Mutex<Option<Vec<Write>>>,
    load: Arc<Load>,
}

/// What the persister reports back to the core.
pub(crate) struct PersisterEvents {
    /// Writes the store refused on their own (the rest of their batch committed).
    pub(crate) refused: mpsc::UnboundedReceiver<Refused>,
    /// Cancelled when a commit failed in a way that ends the term.
    pub(crate) term_over: CancellationToken,
}

impl Persister {
    /// Starts the persister loop. It ends once every handle is dropped and what was
    /// queued has been committed or failed.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        limits: BatchLimits,
        fence: Option<Fence>,
    ) -> (Self, PersisterEvents, tokio::task::JoinHandle<()>) {
        // Messages are one write, or one turn of the core's writes.
        let (tx, rx) = mpsc::channel(16 * 1024);
        let (refused_tx, refused) = mpsc::unbounded_channel();
        let term_over = CancellationToken::new();
        let load = Arc::new(Load::default());
        let handle = tokio::spawn(
            Loop {
                load: load.clone(),
                store,
                limits,
                fence,
                refused: refused_tx,
                term_over: term_over.clone(),
                failure: None,
            }
            .run(rx),
        );
        let persister = Self {
            tx,
            staged: std::sync::Mutex::new(None),
            load,
        };
        (persister, PersisterEvents { refused, term_over }, handle)
    }

    /// Enqueues a write (or, while staging, holds it until [`flush`](Self::flush)); waits
    /// only when the queue is full (backpressure).
    pub(crate) async fn write(&self, w: Write) -> Result<()> {
        let writes = {
            let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
            match staged.as_mut() {
                // A long turn still feeds the persister as it goes (it commits while the
                // core works on).
                Some(held) if held.len() + 1 >= STAGE_MAX => {
                    held.push(w);
                    std::mem::take(held)
                }
                Some(held) => {
                    held.push(w);
                    return Ok(());
                }
                None => vec![w],
            }
        };
        self.send(writes).await
    }

    /// How busy this persister is.
    pub(crate) fn load(&self) -> Arc<Load> {
        self.load.clone()
    }

    /// From now on, holds writes until [`flush`](Self::flush). Whoever stages must flush
    /// before waiting on any write's effect.
    pub(crate) fn stage(&self) {
        let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
        staged.get_or_insert_with(Vec::new);
    }

    /// Sends the writes held since the last flush, in order, as one unit.
    pub(crate) async fn flush(&self) -> Result<()> {
        let held = {
            let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
            match staged.as_mut() {
                Some(held) if !held.is_empty() => std::mem::take(held),
                _ => return Ok(()),
            }
        };
        self.send(held).await
    }

    async fn send(&self, writes: Vec<Write>) -> Result<()> {
        self.tx
            .send(writes)
            .await
            .map_err(|_| Error::Unavailable("controller is shutting down".into()))
    }
}

struct Loop {
    load: Arc<Load>,
    store: Arc<dyn Store>,
    limits: BatchLimits,
    fence: Option<Fence>,
    refused: mpsc::UnboundedSender<Refused>,
    term_over: CancellationToken,
    /// Set once the term is over: every later write fails with it, uncommitted.
    failure: Option<String>,
}

impl Loop {
    async fn run(mut self, mut rx: mpsc::Receiver<Vec<Write>>) {
        let mut batch: Vec<Write> = Vec::new();
        // Received and not yet in a commit, in order.
        let mut pending: std::collections::VecDeque<Write> = std::collections::VecDeque::new();
        loop {
            if pending.is_empty() {
                match rx.recv().await {
                    Some(ws) => pending.extend(ws),
                    None => return,
                }
            }
            let (mut bytes, mut ops) = (0usize, 0usize);
            loop {
                let Some(w) = pending.front() else {
                    if ops >= self.limits.ops {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(ws) => {
                            pending.extend(ws);
                            continue;
                        }
                        Err(_) => break,
                    }
                };
                // The first write always goes (a larger one alone; the store decides).
                if !batch.is_empty()
                    && !w.is_barrier()
                    && (bytes + w.bytes() > self.limits.bytes || ops + w.ops() > self.limits.ops)
                {
                    break;
                }
                let Some(w) = pending.pop_front() else { break };
                bytes += w.bytes();
                ops += w.ops();
                batch.push(w);
            }
            if !batch.is_empty() {
                self.commit_batch(&mut batch).await;
            }
        }
    }

    /// Commits `batch` (draining it) and runs every write's effects with its outcome.
    async fn commit_batch(&mut self, batch: &mut Vec<Write>) {
        if let Some(why) = &self.failure {
            let result = Err(CommitError::unavailable(why));
            run_effects(batch.drain(..), &result);
            return;
        }
        let started = std::time::Instant::now();
        let result = self.commit(ops_for(batch)).await;
        crate::metrics::store_commit(batch.len(), started.elapsed(), result.is_ok());
        self.load.committed(started.elapsed());
        match result {
            Ok(()) => run_effects(batch.drain(..), &Ok(())),
            Err(Failure::Refused(why)) if batch.iter().filter(|w| !w.is_barrier()).count() > 1 => {
                warn!(error = %why, writes = batch.len(), "the store refused a batch: committing its writes one at a time");
                self.one_at_a_time(batch).await;
            }
            Err(Failure::Refused(why)) => {
                let w = batch.iter().find(|w| !w.is_barrier());
                if let Some(w) = w {
                    self.report_refused(w, &why);
                }
                run_effects(batch.drain(..), &Err(CommitError::refused(&why)));
            }
            Err(Failure::TermOver(why)) => {
                self.end_term(&why);
                run_effects(batch.drain(..), &Err(CommitError::unavailable(&why)));
            }
        }
    }

    /// After a refused batch: each write alone, in order, so only the culprit fails.
    async fn one_at_a_time(&mut self, batch: &mut Vec<Write>) {
        for w in batch.drain(..) {
            if let Some(why) = &self.failure {
                let result = Err(CommitError::unavailable(why));
                run_effects([w], &result);
                continue;
            }
            if w.is_barrier() {
                run_effects([w], &Ok(()));
                continue;
            }
            let result = match self.commit(ops_for(std::slice::from_ref(&w))).await {
                Ok(()) => Ok(()),
                Err(Failure::Refused(why)) => {
                    self.report_refused(&w, &why);
                    Err(CommitError::refused(&why))
                }
                Err(Failure::TermOver(why)) => {
                    self.end_term(&why);
                    Err(CommitError::unavailable(&why))
                }
            };
            run_effects([w], &result);
        }
    }

    fn report_refused(&self, w: &Write, why: &str) {
        error!(key = %w.key, bytes = w.bytes(), error = %why, "the store refused a write");
        let _ = self.refused.send(Refused {
            key: w.key.clone(),
            bytes: w.bytes(),
            reason: why.to_string(),
        });
    }

    fn end_term(&mut self, why: &str) {
        error!(error = %why, "store commit failed: ending this term (the state is rebuilt from the store)");
        self.failure = Some(format!("the store could not be written ({why}); retry"));
        self.term_over.cancel();
    }

    async fn commit(&self, ops: Vec<Op>) -> std::result::Result<(), Failure> {
        let mut attempt = 0u32;
        loop {
            let txn = Txn {
                compares: self.fence.iter().map(|f| f.compare.clone()).collect(),
                success: ops.clone(),
                failure: Vec::new(),
            };
            match self.store.txn(txn).await {
                Ok(r) if r.succeeded => return Ok(()),
                Ok(_) => {
                    if let Some(f) = &self.fence {
                        f.lost.cancel();
                    }
                    return Err(Failure::TermOver(
                        "this controller is no longer the leader (fenced write refused)".into(),
                    ));
                }
                Err(e @ Error::Unavailable(_)) if attempt < 3 && self.store.fatal().is_none() => {
                    attempt += 1;
                    warn!(error = %e, attempt, "store unavailable; retrying commit");
                    tokio::time::sleep(scabbard_common::backoff::Backoff::default().delay(attempt))
                        .await;
                }
                // A full database (etcd's NOSPACE alarm) refuses everything: not this write's
                // fault, and not something isolating it would fix.
                Err(Error::ResourceExhausted(why)) if why.contains("space exceeded") => {
                    return Err(Failure::TermOver(why));
                }
                Err(e @ (Error::InvalidArgument(_) | Error::ResourceExhausted(_))) => {
                    return Err(Failure::Refused(e.to_string()));
                }
                Err(e) => return Err(Failure::TermOver(e.to_string())),
            }
        }
    }
}

/// Why a commit did not happen.
enum Failure {
    /// The store refused the request itself (too large, invalid): nothing was written and
    /// the store is fine.
    Refused(String),
    /// The store could not be written, or the fence was lost: the term is over.
    TermOver(String),
}

fn run_effects(writes: impl IntoIterator<Item = Write>, result: &Result<(), CommitError>) {
    for w in writes {
        for effect in w.effects {
            effect(result);
        }
    }
}

/// The store ops of a batch; later writes of a key supersede earlier ones (a write's
/// `also` keys count as written after its key); barriers carry none.
fn ops_for(batch: &[Write]) -> Vec<Op> {
    let all = || {
        batch.iter().filter(|w| !w.is_barrier()).flat_map(|w| {
            std::iter::once((&w.key, &w.value)).chain(w.also.iter().map(|(k, v)| (k, v)))
        })
    };
    let mut last: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(batch.len());
    for (i, (k, _)) in all().enumerate() {
        last.insert(k.as_str(), i);
    }
    let mut ops = Vec::with_capacity(last.len());
    for (i, (k, v)) in all().enumerate() {
        if last.get(k.as_str()) != Some(&i) {
            continue;
        }
        ops.push(match v {
            Some(v) => Op::put(k.clone(), v.clone()),
            None => Op::delete(k.clone()),
        });
    }
    ops
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
