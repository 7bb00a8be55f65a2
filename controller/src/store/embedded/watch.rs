//! Watches of the embedded store: an in-memory ring of recent events and one task per watch
//! that reads from it.
//!
//! The writer only appends to the ring and bumps a revision signal; it never waits for a
//! watcher. Each watch task walks the ring from its own next revision, so replay and live
//! delivery are the same code path (no gap, no duplicate), and a watcher that falls so far
//! behind that its next revision left the ring ends with an `Err` item. History from before
//! the process started is not kept: such watches fail with `FailedPrecondition`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use scabbard_common::{Error, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::lease::lock;
use crate::store::{WatchEvent, WatchStream};

/// Events a watch task copies out of the ring per lock (rounded up to a whole revision).
const CHUNK: usize = 256;

/// The revision an event happened at.
fn event_revision(e: &WatchEvent) -> i64 {
    match e {
        WatchEvent::Put(kv) => kv.mod_revision,
        WatchEvent::Delete { revision, .. } => *revision,
    }
}

/// The key an event is about.
fn event_key(e: &WatchEvent) -> &str {
    match e {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

/// Recent events, in revision order.
#[derive(Debug)]
struct Ring {
    events: VecDeque<WatchEvent>,
    capacity: usize,
    /// Every event with a revision >= this is in `events`.
    first_available: i64,
    /// Revision of the last published event (the store revision).
    last_revision: i64,
}

/// Shared between the writer (publishes) and the watch tasks (read).
#[derive(Debug)]
pub(super) struct WatchHub {
    ring: Mutex<Ring>,
    published: watch::Sender<i64>,
    closed: CancellationToken,
    buffer: usize,
}

impl WatchHub {
    /// A hub for a store at `revision` (history up to it is unavailable unless the store was
    /// never written), keeping `capacity` events and giving each watch a channel of `buffer`.
    pub(super) fn new(revision: i64, never_written: bool, capacity: usize, buffer: usize) -> Self {
        let first_available = if never_written { 0 } else { revision + 1 };
        Self {
            ring: Mutex::new(Ring {
                events: VecDeque::new(),
                capacity: capacity.max(1),
                first_available,
                last_revision: revision,
            }),
            published: watch::Sender::new(revision),
            closed: CancellationToken::new(),
            buffer: buffer.max(2),
        }
    }

    /// Appends the committed events of one batch (in revision order) and wakes the watchers.
    pub(super) fn publish(&self, events: Vec<WatchEvent>, revision: i64) {
        {
            let mut ring = lock(&self.ring);
            ring.events.extend(events);
            ring.last_revision = revision;
            while ring.events.len() > ring.capacity {
                let Some(dropped) = ring.events.pop_front() else {
                    break;
                };
                let rev = event_revision(&dropped);
                ring.first_available = rev + 1;
                // Drop whole revisions only, so a replay never starts in the middle of one.
                while ring
                    .events
                    .front()
                    .is_some_and(|e| event_revision(e) <= rev)
                {
                    ring.events.pop_front();
                }
            }
        }
        self.published.send_replace(revision);
    }

    /// Ends every watch once it has delivered what the ring holds.
    pub(super) fn close(&self) {
        self.closed.cancel();
    }

    /// Starts a watch of keys under `prefix` from `from_revision` (0 = only future events).
    /// Must run inside a tokio runtime.
    pub(super) fn watch(self: &Arc<Self>, prefix: &str, from_revision: i64) -> Result<WatchStream> {
        if from_revision < 0 {
            return Err(Error::invalid(format!(
                "watch from_revision must be >= 0, got {from_revision}"
            )));
        }
        if self.closed.is_cancelled() {
            return Err(Error::Unavailable("embedded store is closed".into()));
        }
        let next = {
            let ring = lock(&self.ring);
            if from_revision == 0 {
                ring.last_revision + 1
            } else if from_revision < ring.first_available {
                return Err(compacted(from_revision, ring.first_available));
            } else {
                from_revision
            }
        };
        let (tx, rx) = mpsc::channel(self.buffer);
        let seen = self.published.subscribe();
        let hub = Arc::clone(self);
        let prefix = prefix.to_string();
        tokio::spawn(async move { hub.run_watch(prefix, next, tx, seen).await }.in_current_span());
        Ok(rx)
    }

    /// Copies the events under `prefix` from revision `next` on, about [`CHUNK`] scanned
    /// events' worth, and returns them with the next revision to read.
    fn collect(&self, prefix: &str, next: i64) -> Result<(Vec<WatchEvent>, i64)> {
        let ring = lock(&self.ring);
        if next < ring.first_available {
            return Err(compacted(next, ring.first_available));
        }
        let start = ring.events.partition_point(|e| event_revision(e) < next);
        let mut out = Vec::new();
        let mut last = None;
        for (scanned, e) in ring.events.range(start..).enumerate() {
            let rev = event_revision(e);
            if scanned >= CHUNK && last != Some(rev) {
                break;
            }
            last = Some(rev);
            if event_key(e).starts_with(prefix) {
                out.push(e.clone());
            }
        }
        Ok((out, last.map_or(next, |r| r + 1)))
    }

    async fn run_watch(
        self: Arc<Self>,
        prefix: String,
        mut next: i64,
        tx: mpsc::Sender<Result<WatchEvent>>,
        mut seen: watch::Receiver<i64>,
    ) {
        loop {
            // Mark the current revision seen before reading the ring: anything published after
            // the read wakes `changed()` below.
            seen.borrow_and_update();
            let (events, after) = match self.collect(&prefix, next) {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if after == next {
                tokio::select! {
                    changed = seen.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    () = self.closed.cancelled() => {
                        let _ = tx.try_send(Err(Error::Unavailable("embedded store closed".into())));
                        return;
                    }
                }
                continue;
            }
            next = after;
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn compacted(from: i64, first_available: i64) -> Error {
    Error::FailedPrecondition(format!(
        "watch from revision {from}: history before revision {first_available} is compacted \
         (not kept, or the watcher fell behind); list again and watch from the listed revision"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KeyValue;

    fn put(key: &str, rev: i64) -> WatchEvent {
        WatchEvent::Put(KeyValue {
            key: key.into(),
            value: vec![],
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        })
    }

    #[test]
    fn ring_drops_whole_revisions() {
        let hub = WatchHub::new(1, true, 3, 8);
        hub.publish(vec![put("a", 2), put("b", 2)], 2);
        hub.publish(vec![put("a", 3), put("b", 3)], 3);
        let ring = lock(&hub.ring);
        assert_eq!(ring.first_available, 3);
        assert_eq!(ring.events.len(), 2);
    }

    #[test]
    fn collect_filters_by_prefix_and_advances() {
        let hub = WatchHub::new(1, true, 100, 8);
        hub.publish(vec![put("a/1", 2), put("b/1", 3), put("a/2", 4)], 4);
        let (events, next) = hub.collect("a/", 3).unwrap();
        assert_eq!(events, vec![put("a/2", 4)]);
        assert_eq!(next, 5);
        assert!(hub.collect("a/", 5).unwrap().0.is_empty());
    }

    #[tokio::test]
    async fn watch_before_history_is_compacted() {
        let hub = Arc::new(WatchHub::new(10, false, 100, 8));
        assert!(matches!(
            hub.watch("", 5),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(hub.watch("", 11).is_ok());
        assert!(matches!(hub.watch("", -1), Err(Error::InvalidArgument(_))));
    }
}
