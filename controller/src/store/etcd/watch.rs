//! Watches on etcd: one etcd watch per [`Store::watch`](crate::store::Store::watch) call,
//! pumped by a task into the crate's bounded [`WatchStream`]. The task ends, after one `Err`
//! item, when etcd cancels the watch or its stream breaks, and ends quietly when the
//! receiver is dropped (which cancels the etcd watch).

use std::sync::Arc;

use etcd_client::{EventType, GetOptions, WatchOptions, WatchResponse};
use scabbard_common::{Error, Result};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::errors::{self, Retry, is_compacted};
use super::{EtcdStore, prefix_end, to_key_value, unprefix};
use crate::store::{WatchEvent, WatchStream};

/// Events buffered between etcd and a slow watcher (beyond it, etcd's stream backs up).
const WATCH_BUFFER: usize = 1024;

/// Opens a watch of `prefix` from `from_revision` (0 = only future changes).
pub(super) async fn open(
    store: &EtcdStore,
    prefix: &str,
    from_revision: i64,
) -> Result<WatchStream> {
    if from_revision < 0 {
        return Err(Error::invalid(format!(
            "watch from revision {from_revision}: revisions are >= 0"
        )));
    }
    let key = store.key(prefix);
    let end = prefix_end(&key);
    if from_revision > 0 {
        // etcd accepts a watch on compacted history and cancels it right after; a read at
        // that revision fails at once instead. (A compaction racing this check still ends
        // the stream with a `FailedPrecondition` item.)
        let k = key.clone();
        store
            .call(&store.kv, "a watch", Retry::Idempotent, None, |mut kv| {
                let k = k.clone();
                async move {
                    let opts = GetOptions::new()
                        .with_revision(from_revision)
                        .with_count_only();
                    match kv.get(k, Some(opts)).await {
                        // A future revision: the watch simply waits for it.
                        Err(etcd_client::Error::GRpcStatus(s))
                            if s.code() == tonic::Code::OutOfRange && !is_compacted(&s) =>
                        {
                            Ok(())
                        }
                        r => r.map(drop),
                    }
                }
            })
            .await?;
    }
    let mut opts = WatchOptions::new().with_range(end);
    if from_revision > 0 {
        opts = opts.with_start_revision(from_revision);
    }
    // Open the stream and wait for etcd's answer to the create request.
    let (stream, first) = store
        .call(&store.watch, "a watch", Retry::Idempotent, None, |mut w| {
            let (key, opts) = (key.clone(), opts.clone());
            async move {
                let mut stream = w.watch(key, Some(opts)).await?;
                match stream.message().await? {
                    Some(first) => Ok((stream, first)),
                    None => Err(etcd_client::Error::WatchError(
                        "etcd closed the watch before confirming it".into(),
                    )),
                }
            }
        })
        .await?;
    if let Some(e) = cancelled(&first, from_revision, &store.endpoints) {
        return Err(e);
    }
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let pump = Pump {
        namespace: store.namespace.clone(),
        endpoints: store.endpoints.clone(),
        from_revision,
        tx,
    };
    tokio::spawn(pump.run(stream, first).in_current_span());
    Ok(rx)
}

/// Why etcd cancelled a watch, if it did.
fn cancelled(r: &WatchResponse, from_revision: i64, endpoints: &str) -> Option<Error> {
    if !r.canceled() {
        return None;
    }
    Some(if r.compact_revision() > 0 {
        Error::FailedPrecondition(format!(
            "watch from revision {from_revision}: etcd has compacted its history up to \
             revision {}",
            r.compact_revision()
        ))
    } else {
        Error::Unavailable(format!(
            "etcd at {endpoints} cancelled the watch: {}",
            r.cancel_reason()
        ))
    })
}

struct Pump {
    namespace: Arc<[u8]>,
    endpoints: String,
    from_revision: i64,
    tx: mpsc::Sender<Result<WatchEvent>>,
}

impl Pump {
    async fn run(self, mut stream: etcd_client::WatchStream, first: WatchResponse) {
        if !self.forward(&first).await {
            return;
        }
        loop {
            let next = tokio::select! {
                // The watcher went away: dropping `stream` cancels the etcd watch.
                () = self.tx.closed() => return,
                next = stream.message() => next,
            };
            let failure = match next {
                Ok(Some(resp)) => match cancelled(&resp, self.from_revision, &self.endpoints) {
                    None => {
                        if !self.forward(&resp).await {
                            return;
                        }
                        continue;
                    }
                    Some(e) => e,
                },
                Ok(None) => Error::Unavailable(format!(
                    "etcd at {} closed the watch stream",
                    self.endpoints
                )),
                Err(e) => errors::map(e, &self.endpoints, "a watch", None),
            };
            let _ = self.tx.send(Err(failure)).await;
            return;
        }
    }

    /// Sends the events of one response; false when the watcher is gone.
    async fn forward(&self, resp: &WatchResponse) -> bool {
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let event = match ev.event_type() {
                EventType::Put => WatchEvent::Put(to_key_value(&self.namespace, kv)),
                EventType::Delete => WatchEvent::Delete {
                    key: unprefix(&self.namespace, kv.key()),
                    revision: kv.mod_revision(),
                },
            };
            if self.tx.send(Ok(event)).await.is_err() {
                return false;
            }
        }
        true
    }
}
