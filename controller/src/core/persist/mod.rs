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
//!
//! With a store that takes several transactions at once (etcd, [`Store::commit_pipeline`]),
//! full batches go out while earlier ones are still in flight, chained so that the store
//! applies them in order ([`chain`]); effects still run in the order of the writes
//! ([`commit`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use scabbard_common::{Error, Result};
use tokio::sync::mpsc;

use tokio_util::sync::CancellationToken;

mod chain;
mod commit;
#[cfg(test)]
mod tests;

use crate::store::{Compare, Store};
use commit::Loop;

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
    /// Most commits in flight at once ([`Store::commit_pipeline`]); above 1, commits are
    /// chained (see [`chain`]).
    pub(crate) in_flight: usize,
}

impl BatchLimits {
    /// What `store` accepts in one transaction, with room for the commit chain's put.
    pub(crate) fn for_store(store: &dyn Store) -> Self {
        Self {
            ops: 4096usize.min(store.max_txn_ops().saturating_sub(1)).max(1),
            // Keys and values are not all a request carries: leave an eighth for framing.
            bytes: (store.max_txn_bytes() / 8 * 7).max(1),
            in_flight: store.commit_pipeline().max(1),
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
            Loop::new(
                load.clone(),
                store,
                limits,
                fence,
                refused_tx,
                term_over.clone(),
            )
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
