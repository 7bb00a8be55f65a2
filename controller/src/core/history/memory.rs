//! What the core remembers of history, bounded: which of its writes are durable, the
//! finished tasks it still holds (oldest first), and recent idempotency keys. Nothing
//! leaves memory before the write that stored it is durable, so the store can answer for it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which writes are durable: the core numbers the writes it tracks, and each one's effect
/// raises `durable` once committed (commits happen in order, so it only grows).
#[derive(Default)]
pub(crate) struct Durability {
    next: u64,
    durable: Arc<AtomicU64>,
}

impl Durability {
    /// A number for the next tracked write and the effect that marks it durable.
    pub(crate) fn track(&mut self) -> (u64, crate::core::Effect) {
        self.next += 1;
        let seq = self.next;
        let durable = self.durable.clone();
        (
            seq,
            Box::new(move |r| {
                if r.is_ok() {
                    durable.fetch_max(seq, Ordering::AcqRel);
                }
            }),
        )
    }

    /// Whether write `seq` is durable.
    pub(crate) fn is_durable(&self, seq: u64) -> bool {
        seq <= self.durable.load(Ordering::Acquire)
    }
}

/// The finished tasks the core keeps, oldest first, each with the number of the write
/// that made it final (it leaves memory only once that is durable).
#[derive(Default)]
pub(crate) struct FinishedCache {
    order: VecDeque<(u64, String)>,
    /// `done/` time of each task in the cache, to replace its key when it is rewritten,
    /// and the number its `order` entry carries (older entries of it are stale).
    done_ms: HashMap<String, (i64, u64)>,
}

impl FinishedCache {
    /// Records that `id` became (or was rewritten as) final by write `seq`; returns the
    /// `done/` time of its previous final record, if it had one.
    pub(crate) fn finished(&mut self, id: &str, done_ms: i64, seq: u64) -> Option<i64> {
        match self.done_ms.get_mut(id) {
            Some((ms, _)) => Some(std::mem::replace(ms, done_ms)),
            None => {
                self.done_ms.insert(id.to_string(), (done_ms, seq));
                self.order.push_back((seq, id.to_string()));
                None
            }
        }
    }

    /// Tasks in the cache.
    pub(crate) fn len(&self) -> usize {
        self.done_ms.len()
    }

    /// The oldest entry, if its write is durable and the cache holds more than `cap`.
    pub(crate) fn pop_evictable(&mut self, cap: usize, d: &Durability) -> Option<String> {
        loop {
            if self.done_ms.len() <= cap {
                return None;
            }
            let (seq, _) = self.order.front()?;
            if !d.is_durable(*seq) {
                return None;
            }
            let (seq, id) = self.order.pop_front()?;
            if self.done_ms.get(&id).is_some_and(|(_, s)| *s == seq) {
                self.done_ms.remove(&id);
                return Some(id);
            }
            // Stale: the task was removed (or re-added later) since.
        }
    }

    /// Drops `id` (forgotten, or deleted by retention); its queue entry goes stale.
    pub(crate) fn remove(&mut self, id: &str) {
        self.done_ms.remove(id);
    }
}

/// Recent idempotency keys (`project\0key` → task id), bounded: the oldest leave once
/// their write is durable, after which a submit with that key is checked against the store
/// (`idem/`) before the core decides.
#[derive(Default)]
pub(crate) struct IdemMemory {
    /// Key → (task id, number of the write that stored it).
    map: HashMap<String, (String, u64)>,
    order: VecDeque<(u64, String)>,
}

/// Most idempotency keys the core keeps in memory.
pub(crate) const IDEM_MEMORY: usize = 100_000;

impl IdemMemory {
    pub(crate) fn get(&self, key: &str) -> Option<&String> {
        self.map.get(key).map(|(id, _)| id)
    }

    /// Remembers `key` → `id`, written by write `seq`; forgets durable old keys past the bound.
    pub(crate) fn insert(&mut self, key: String, id: String, seq: u64, d: &Durability) {
        self.map.insert(key.clone(), (id, seq));
        self.order.push_back((seq, key));
        while self.order.len() > IDEM_MEMORY {
            match self.order.front() {
                Some((s, _)) if d.is_durable(*s) => {
                    let (s, k) = self.order.pop_front().expect("front");
                    // A key used again since is the later entry's.
                    if self.map.get(&k).is_some_and(|(_, at)| *at == s) {
                        self.map.remove(&k);
                    }
                }
                _ => break,
            }
        }
    }

    /// Forgets `key` if it names task `id`.
    pub(crate) fn forget_key(&mut self, key: &str, id: &str) {
        if self.map.get(key).is_some_and(|(v, _)| v == id) {
            self.map.remove(key);
        }
    }

    /// Forgets every key of task `id`.
    pub(crate) fn forget_task(&mut self, id: &str) {
        self.map.retain(|_, (v, _)| v != id);
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }
}
