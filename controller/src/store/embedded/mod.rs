//! The embedded store backend: the [`Store`] trait on a local redb file
//! (`<data_dir>/state.redb`), for single-controller deployments and tests.
//!
//! It owns the database file and its write-ahead log (`wal`, replayed by `recovery`), the
//! single writer thread (group commit, see `writer`), the lease table and expiry thread
//! (`lease`), and the in-memory watch history (`watch`). Reads go straight to redb read
//! transactions. It must not be shared between processes: opening a file another process
//! holds fails with [`Error::Unavailable`].
//!
//! Durability: a batch of writes is durable once its log frame is synced (or, with
//! [`EmbeddedOptions::wal`] off, once its redb commit is); callers are answered only then.
//!
//! Lifecycle: [`EmbeddedStore::open`] starts the threads; [`EmbeddedStore::close`] (or
//! dropping the last handle) stops them and closes the file so that it can be reopened.

mod batch;
mod compact;
mod lease;
mod record;
mod recovery;
mod wal;
mod watch;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, DatabaseError, ReadableDatabase};
use scabbard_common::{Error, Result};
use tokio::sync::{mpsc, oneshot};

pub use self::compact::Compacted;
use self::lease::{LeaseTable, lock, ttl_millis};
use self::record::{
    INITIAL_REVISION, KV, MAX_KEY_BYTES, MAX_TXN_BYTES, MAX_VALUE_BYTES, META, META_REVISION,
    Record, read_err, storage_err,
};
use self::wal::Wal;
use self::watch::WatchHub;
use self::writer::{Position, Request, Writer, WriterConfig};
use super::{KeyValue, LeaseId, Op, RangePage, Store, Txn, TxnResponse, WatchStream};

/// Tuning knobs of an [`EmbeddedStore`]; [`Default`] suits a controller.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Watch events kept in memory for watches from a past revision (and as slack for slow
    /// watchers). Older history is reported as compacted.
    pub watch_history: usize,
    /// Channel capacity of each watch stream.
    pub watch_buffer: usize,
    /// Most writes applied in one durable commit.
    pub max_batch: usize,
    /// Capacity of the queue in front of the writer.
    pub queue: usize,
    /// Longest the expiry thread sleeps between lease checks.
    pub expiry_tick: Duration,
    /// redb page cache size in bytes.
    pub cache_bytes: usize,
    /// Make batches durable through a write-ahead log (one sequential append and sync per
    /// batch, redb committed durably at checkpoints). Off: every batch is a durable redb
    /// commit, which rewrites each B-tree page it touched and is several times slower on
    /// scattered keys.
    pub wal: bool,
    /// Longest time between checkpoints (durable redb commit, then the log is emptied).
    pub checkpoint_interval: Duration,
    /// Log size that forces a checkpoint.
    pub checkpoint_wal_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            watch_history: 100_000,
            watch_buffer: 1024,
            max_batch: 1024,
            queue: 4096,
            expiry_tick: Duration::from_millis(100),
            cache_bytes: 256 * 1024 * 1024,
            wal: true,
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_wal_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Counters of the writer, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Group commits: batches that wrote something, each made durable once.
    pub commits: u64,
    /// Checkpoints (durable redb commits that emptied the write-ahead log).
    pub checkpoints: u64,
    /// Store transactions answered (including read-only and failed-compare ones).
    pub txns: u64,
}

/// State shared by the handle, the writer, the expiry thread and the watch tasks.
struct Shared {
    leases: Mutex<LeaseTable>,
    hub: Arc<WatchHub>,
    revision: AtomicI64,
    commits: AtomicU64,
    checkpoints: AtomicU64,
    txns: AtomicU64,
    /// An `Expire` request is queued and not yet handled.
    expire_pending: AtomicBool,
    /// Why the writer stopped, if it failed.
    failure: Mutex<Option<String>>,
}

/// What `close` and `drop` tear down.
#[derive(Default)]
struct Running {
    requests: Option<mpsc::Sender<Request>>,
    stop_expiry: Option<std_mpsc::Sender<()>>,
    writer: Option<JoinHandle<()>>,
    expiry: Option<JoinHandle<()>>,
    db: Option<Arc<Database>>,
}

/// A [`Store`] on a local redb file, with group commit. Share it as `Arc<EmbeddedStore>` (or
/// `Arc<dyn Store>`); close it with [`EmbeddedStore::close`] or by dropping the last handle.
pub struct EmbeddedStore {
    path: PathBuf,
    shared: Arc<Shared>,
    requests: RwLock<Option<mpsc::Sender<Request>>>,
    db: RwLock<Option<Arc<Database>>>,
    running: Mutex<Running>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .field("revision", &self.shared.revision.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (creating if absent) the database file at `path` with default options, replaying
    /// its write-ahead log (`<path>.wal`) if the last run crashed. Blocks while the file is
    /// opened, the log replayed and the lease index rebuilt: call it at startup.
    ///
    /// Fails with [`Error::Unavailable`] if another process (or another open handle in this
    /// process) holds the file.
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        Self::open_with(path, EmbeddedOptions::default())
    }

    /// [`EmbeddedStore::open`] with explicit options.
    pub fn open_with(path: &Path, options: EmbeddedOptions) -> Result<Arc<Self>> {
        // Owner only, created exclusively (redb initialises an empty file).
        scabbard_common::private::ensure_file(path).map_err(|e| {
            Error::Unavailable(format!("cannot create store file {}: {e}", path.display()))
        })?;
        let db = redb::Builder::new()
            .set_cache_size(options.cache_bytes)
            .create(path)
            .map_err(|e| open_error(path, e))?;
        let db = Arc::new(db);
        // The redb lock is held: nobody else touches the log.
        let wal_path = Wal::path_for(path);
        let (mut wal, frames) = Wal::open(&wal_path)?;
        let loaded = recovery::load(&db, frames)?;
        // Everything in the log is now durable in the database.
        wal.reset()?;
        let wal = if options.wal {
            Some(wal)
        } else {
            drop(wal);
            std::fs::remove_file(&wal_path)
                .map_err(|e| Error::Unavailable(format!("removing {}: {e}", wal_path.display())))?;
            None
        };
        tracing::debug!(
            path = %path.display(),
            revision = loaded.revision,
            keys = loaded.keys,
            "opened embedded store"
        );
        let hub = Arc::new(WatchHub::new(
            loaded.revision,
            loaded.revision <= INITIAL_REVISION,
            options.watch_history,
            options.watch_buffer,
        ));
        let shared = Arc::new(Shared {
            leases: Mutex::new(loaded.leases),
            hub,
            revision: AtomicI64::new(loaded.revision),
            commits: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            txns: AtomicU64::new(0),
            expire_pending: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let writer = Writer::new(
            Arc::clone(&db),
            rx,
            Arc::clone(&shared),
            Position {
                revision: loaded.revision,
                next_lease: loaded.next_lease,
                wal_seq: loaded.wal_seq,
            },
            WriterConfig {
                max_batch: options.max_batch,
                wal,
                checkpoint_interval: options.checkpoint_interval,
                checkpoint_wal_bytes: options.checkpoint_wal_bytes,
            },
        )
        .spawn()?;
        let (stop_tx, stop_rx) = std_mpsc::channel();
        let expiry = lease::spawn_expiry(
            Arc::clone(&shared),
            tx.downgrade(),
            stop_rx,
            options.expiry_tick.max(Duration::from_millis(1)),
        );
        let running = Running {
            requests: Some(tx.clone()),
            stop_expiry: Some(stop_tx),
            writer: Some(writer),
            expiry: None,
            db: Some(Arc::clone(&db)),
        };
        let store = Self {
            path: path.to_path_buf(),
            shared,
            requests: RwLock::new(Some(tx)),
            db: RwLock::new(Some(db)),
            running: Mutex::new(running),
        };
        // On failure `store` drops here, which stops the writer and closes the file.
        lock(&store.running).expiry = Some(expiry?);
        Ok(Arc::new(store))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commit and transaction counters since open.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.shared.commits.load(Ordering::Relaxed),
            checkpoints: self.shared.checkpoints.load(Ordering::Relaxed),
            txns: self.shared.txns.load(Ordering::Relaxed),
        }
    }

    /// Stops the writer and expiry threads (after the writes already queued), ends every
    /// watch, and closes the file, so that the same path can be opened again once this
    /// returns. Later calls on this handle fail with [`Error::Unavailable`]. Idempotent.
    pub async fn close(&self) -> Result<()> {
        let running = self.take_running();
        tokio::task::spawn_blocking(move || shutdown(running))
            .await
            .map_err(|e| Error::internal(format!("embedded store shutdown task: {e}")))?
    }

    /// Empties the handle; what is returned still has to be shut down.
    fn take_running(&self) -> Running {
        self.requests
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        self.db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        self.shared.hub.close();
        std::mem::take(&mut *lock(&self.running))
    }

    fn sender(&self) -> Result<mpsc::Sender<Request>> {
        self.requests
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| self.stopped())
    }

    fn database(&self) -> Result<Arc<Database>> {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| self.stopped())
    }

    /// The error for a request the writer will never answer.
    fn stopped(&self) -> Error {
        match lock(&self.shared.failure).as_ref() {
            Some(msg) => Error::Unavailable(msg.clone()),
            None => Error::Unavailable(format!("embedded store {} is closed", self.path.display())),
        }
    }

    /// Queues a request for the writer and waits for its answer (sent after the commit).
    async fn call<T>(&self, req: impl FnOnce(oneshot::Sender<Result<T>>) -> Request) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(req(tx))
            .await
            .map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }
}

impl Drop for EmbeddedStore {
    /// Same as [`EmbeddedStore::close`], blocking the current thread while the writer
    /// finishes its batch.
    fn drop(&mut self) {
        if let Err(e) = shutdown(self.take_running()) {
            tracing::warn!("closing embedded store {}: {e}", self.path.display());
        }
    }
}

/// Stops the threads in order (expiry, then the writer once it drained its queue) and closes
/// the database when no read holds it any more.
fn shutdown(mut running: Running) -> Result<()> {
    let mut result = Ok(());
    drop(running.stop_expiry.take());
    if let Some(h) = running.expiry.take()
        && h.join().is_err()
    {
        result = Err(Error::internal("lease expiry thread panicked"));
    }
    drop(running.requests.take());
    if let Some(h) = running.writer.take()
        && h.join().is_err()
    {
        result = Err(Error::internal("store writer thread panicked"));
    }
    if let Some(mut db) = running.db.take() {
        // Reads in flight hold a clone for a moment; give them a short grace period.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Arc::try_unwrap(db) {
                Ok(db) => {
                    db.close().map_err(|e| storage_err("close", e))?;
                    break;
                }
                Err(shared) if Instant::now() < deadline => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(1));
                }
                // The last reader's drop closes it.
                Err(_) => break,
            }
        }
    }
    result
}

fn open_error(path: &Path, e: DatabaseError) -> Error {
    match e {
        DatabaseError::DatabaseAlreadyOpen => Error::Unavailable(format!(
            "store file {} is locked by another process (is another controller running with \
             this data directory?); stop it or use a different data directory",
            path.display()
        )),
        e => Error::Unavailable(format!("opening store file {}: {e}", path.display())),
    }
}

/// Rejects what the writer must never see: empty or oversized keys and values, negative
/// leases.
fn validate(txn: &Txn) -> Result<()> {
    let check_key = |key: &str| {
        if key.len() > MAX_KEY_BYTES {
            return Err(Error::invalid(format!(
                "key of {} bytes exceeds the {MAX_KEY_BYTES}-byte limit",
                key.len()
            )));
        }
        Ok(())
    };
    for c in &txn.compares {
        check_key(&c.key)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Put { key, value, lease } => {
                check_key(key)?;
                if key.is_empty() {
                    return Err(Error::invalid("put: key must not be empty"));
                }
                if value.len() > MAX_VALUE_BYTES {
                    return Err(Error::ResourceExhausted(format!(
                        "value of {} bytes for key {key:?} exceeds the {MAX_VALUE_BYTES}-byte limit",
                        value.len()
                    )));
                }
                if *lease < 0 {
                    return Err(Error::invalid(format!("put: invalid lease id {lease}")));
                }
            }
            Op::Delete { key } | Op::Get { key } => check_key(key)?,
        }
    }
    let size = writer::txn_bytes(txn);
    if size > MAX_TXN_BYTES {
        return Err(Error::ResourceExhausted(format!(
            "transaction of {size} bytes exceeds the {MAX_TXN_BYTES}-byte limit"
        )));
    }
    Ok(())
}

/// Reads a page of `prefix` keys after `start_after` in one read transaction.
fn read_range(
    db: &Database,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<RangePage> {
    use std::ops::Bound;
    let rtx = db.begin_read().map_err(read_err)?;
    let revision = rtx
        .open_table(META)
        .map_err(read_err)?
        .get(META_REVISION)
        .map_err(read_err)?
        .map_or(INITIAL_REVISION, |g| g.value());
    let kv = rtx.open_table(KV).map_err(read_err)?;
    let lower = match start_after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix),
    };
    let mut kvs = Vec::new();
    let mut more = false;
    for entry in kv
        .range::<&str>((lower, Bound::Unbounded))
        .map_err(read_err)?
    {
        let (key, bytes) = entry.map_err(read_err)?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        if limit != 0 && kvs.len() == limit {
            more = true;
            break;
        }
        kvs.push(Record::decode(key, bytes.value())?.to_kv(key));
    }
    Ok(RangePage {
        kvs,
        more,
        revision,
    })
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        // A point read of cached pages: cheap enough to run on the async thread.
        let db = self.database()?;
        let rtx = db.begin_read().map_err(read_err)?;
        let kv = rtx.open_table(KV).map_err(read_err)?;
        let guard = kv.get(key).map_err(read_err)?;
        guard
            .map(|g| Record::decode(key, g.value()).map(|r| r.to_kv(key)))
            .transpose()
    }

    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage> {
        let db = self.database()?;
        let prefix = prefix.to_string();
        let start_after = start_after.map(str::to_string);
        tokio::task::spawn_blocking(move || read_range(&db, &prefix, start_after.as_deref(), limit))
            .await
            .map_err(|e| Error::internal(format!("range task: {e}")))?
    }

    fn max_value_bytes(&self) -> usize {
        MAX_VALUE_BYTES
    }

    fn fatal(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }

    fn max_txn_bytes(&self) -> usize {
        MAX_TXN_BYTES
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        validate(&txn)?;
        self.call(|reply| Request::Txn {
            txn,
            reply,
            background: false,
        })
        .await
    }

    async fn txn_background(&self, txn: Txn) -> Result<TxnResponse> {
        validate(&txn)?;
        self.call(|reply| Request::Txn {
            txn,
            reply,
            background: true,
        })
        .await
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream> {
        self.sender()?;
        self.shared.hub.watch(prefix, from_revision)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        ttl_millis(ttl)?;
        self.call(|reply| Request::Grant { ttl, reply }).await
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.sender()?;
        lock(&self.shared.leases).keep_alive(lease, Instant::now())
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.call(|reply| Request::Revoke { lease, reply }).await
    }

    async fn revision(&self) -> Result<i64> {
        self.sender()?;
        Ok(self.shared.revision.load(Ordering::Acquire))
    }

    async fn health(&self) -> Result<()> {
        self.sender()?;
        if let Some(msg) = lock(&self.shared.failure).as_ref() {
            return Err(Error::Unavailable(msg.clone()));
        }
        let running = lock(&self.running);
        match &running.writer {
            Some(h) if !h.is_finished() => Ok(()),
            _ => Err(Error::Unavailable(
                "embedded store writer is not running".into(),
            )),
        }
    }
}
