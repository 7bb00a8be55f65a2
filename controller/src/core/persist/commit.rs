//! The persister's loop: cuts the queued writes into batches within the store's limits,
//! commits them (up to [`BatchLimits::in_flight`] at once, chained: see [`super::chain`]),
//! and settles them in order: each write's effects run once its batch is durable (or has
//! failed), always in the order the writes were queued.
//!
//! What is pending goes out as soon as nothing is in flight (a lone write is not held
//! back); while commits are in flight, only full batches join them. So a store that takes
//! one transaction at a time sees exactly one in flight, and a busy one gets full
//! transactions back to back instead of waiting a round trip per transaction.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use scabbard_common::{Error, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::chain::{self, Chain, Link, Verdict};
use super::{BatchLimits, CommitError, Fence, Load, Refused, Write};
use crate::store::{Compare, Op, Store, TxnResponse};

/// Sends of one commit after the store answered `Unavailable` (its outcome unknown).
const RETRIES: u32 = 3;
/// Sends of one commit that came out of turn (its predecessor was not yet applied); once
/// is expected when a predecessor failed or was overtaken, more means the chain key was
/// written by someone else.
const OUT_OF_TURN: u32 = 3;

/// A batch sent and not yet settled.
struct InFlight {
    batch: Vec<Write>,
    /// Its store operations, to send again.
    ops: Vec<Op>,
    link: Option<Link>,
    started: Instant,
    /// Its answer (sent at once: a spawned task, when several may be in flight).
    answer: BoxFuture<'static, Result<TxnResponse>>,
}

/// Why a commit did not happen.
pub(super) enum Failure {
    /// The store refused the request itself (too large, invalid): nothing was written and
    /// the store is fine.
    Refused(String),
    /// The store could not be written, or the fence was lost: the term is over.
    TermOver(String),
}

/// What woke the loop.
enum Event {
    Answer(Result<TxnResponse>),
    Writes(Option<Vec<Write>>),
}

pub(super) struct Loop {
    load: Arc<Load>,
    store: Arc<dyn Store>,
    limits: BatchLimits,
    fence: Option<Fence>,
    refused: mpsc::UnboundedSender<Refused>,
    term_over: CancellationToken,
    /// Set once the term is over: every later write fails with it, uncommitted.
    failure: Option<String>,
    /// `Some` when commits are chained (more than one in flight).
    chain: Option<Chain>,
    /// Received, not yet in a batch, in order.
    pending: VecDeque<Write>,
    /// The batch being cut, with its bytes and operations.
    forming: Vec<Write>,
    forming_bytes: usize,
    forming_ops: usize,
    /// Sent, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Every handle is gone: nothing more will come.
    closed: bool,
}

impl Loop {
    pub(super) fn new(
        load: Arc<Load>,
        store: Arc<dyn Store>,
        limits: BatchLimits,
        fence: Option<Fence>,
        refused: mpsc::UnboundedSender<Refused>,
        term_over: CancellationToken,
    ) -> Self {
        Self {
            load,
            store,
            chain: (limits.in_flight > 1).then(Chain::new),
            limits,
            fence,
            refused,
            term_over,
            failure: None,
            pending: VecDeque::new(),
            forming: Vec::new(),
            forming_bytes: 0,
            forming_ops: 0,
            in_flight: VecDeque::new(),
            closed: false,
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Vec<Write>>) {
        loop {
            while self.in_flight.len() < self.limits.in_flight.max(1) {
                let full = self.fill(&mut rx);
                if self.forming.is_empty() || !(full || self.in_flight.is_empty()) {
                    break;
                }
                let batch = std::mem::take(&mut self.forming);
                (self.forming_bytes, self.forming_ops) = (0, 0);
                self.send(batch);
            }
            // More writes are taken only while there is room for them (backpressure).
            let room = !self.closed
                && self.pending.is_empty()
                && self.in_flight.len() < self.limits.in_flight.max(1);
            let event = match self.in_flight.front_mut() {
                Some(head) => tokio::select! {
                    biased;
                    answer = &mut head.answer => Event::Answer(answer),
                    ws = rx.recv(), if room => Event::Writes(ws),
                },
                None if self.closed && self.forming.is_empty() && self.pending.is_empty() => {
                    return;
                }
                None => Event::Writes(rx.recv().await),
            };
            match event {
                Event::Answer(answer) => {
                    if let Some(head) = self.in_flight.pop_front() {
                        self.settle(head, answer).await;
                    }
                }
                Event::Writes(Some(ws)) => self.pending.extend(ws),
                Event::Writes(None) => self.closed = true,
            }
        }
    }

    /// Moves pending (and queued) writes into the forming batch; true once it is full.
    fn fill(&mut self, rx: &mut mpsc::Receiver<Vec<Write>>) -> bool {
        loop {
            let Some(w) = self.pending.front() else {
                if self.forming_ops >= self.limits.ops {
                    return true;
                }
                match rx.try_recv() {
                    Ok(ws) => {
                        self.pending.extend(ws);
                        continue;
                    }
                    Err(_) => return false,
                }
            };
            // The first write always goes (a larger one alone; the store decides).
            if !self.forming.is_empty()
                && !w.is_barrier()
                && (self.forming_bytes + w.bytes() > self.limits.bytes
                    || self.forming_ops + w.ops() > self.limits.ops)
            {
                return true;
            }
            let Some(w) = self.pending.pop_front() else {
                return false;
            };
            self.forming_bytes += w.bytes();
            self.forming_ops += w.ops();
            self.forming.push(w);
        }
    }

    fn fence(&self) -> Option<&Compare> {
        self.fence.as_ref().map(|f| &f.compare)
    }

    /// Sends `batch` (or, once the term is over, fails it at once: nothing is in flight
    /// then, so the order of effects holds).
    fn send(&mut self, batch: Vec<Write>) {
        if let Some(why) = &self.failure {
            run_effects(batch, &Err(CommitError::unavailable(why)));
            return;
        }
        let ops = ops_for(&batch);
        let link = match self.chain.as_mut() {
            Some(c) => Some(c.link(self.in_flight.back().and_then(|f| f.link.as_ref()))),
            None => None,
        };
        let txn = chain::txn(self.fence(), ops.clone(), link.as_ref());
        let store = self.store.clone();
        let answer: BoxFuture<'static, _> = if self.chain.is_some() {
            let sent = tokio::spawn(async move { store.txn(txn).await });
            Box::pin(async move {
                sent.await.unwrap_or_else(|e| {
                    Err(Error::internal(format!("the commit task failed: {e}")))
                })
            })
        } else {
            // One at a time: polled right here, no task hand-off.
            Box::pin(async move { store.txn(txn).await })
        };
        self.in_flight.push_back(InFlight {
            batch,
            ops,
            link,
            started: Instant::now(),
            answer,
        });
    }

    /// Settles the oldest commit in flight (sending it again if needed) and runs its
    /// writes' effects.
    async fn settle(&mut self, head: InFlight, answer: Result<TxnResponse>) {
        let InFlight {
            mut batch,
            ops,
            link,
            started,
            ..
        } = head;
        let result = self.commit(&ops, link, Some(answer)).await;
        crate::metrics::store_commit(batch.len(), started.elapsed(), result.is_ok());
        self.load.committed(started.elapsed());
        match result {
            Ok(()) => run_effects(batch, &Ok(())),
            Err(Failure::Refused(why)) if batch.iter().filter(|w| !w.is_barrier()).count() > 1 => {
                warn!(error = %why, writes = batch.len(), "the store refused a batch: committing its writes one at a time");
                self.one_at_a_time(&mut batch).await;
            }
            Err(Failure::Refused(why)) => {
                if let Some(w) = batch.iter().find(|w| !w.is_barrier()) {
                    self.report_refused(w, &why);
                }
                run_effects(batch, &Err(CommitError::refused(&why)));
            }
            Err(Failure::TermOver(why)) => {
                self.end_term(&why);
                run_effects(batch, &Err(CommitError::unavailable(&why)));
            }
        }
        if self.failure.is_some() {
            self.fail_in_flight().await;
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
            // After what is applied: whatever is in flight behind comes out of turn and
            // is sent again after these.
            let link = self.chain.as_mut().map(|c| c.link(None));
            let result = match self
                .commit(&ops_for(std::slice::from_ref(&w)), link, None)
                .await
            {
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

    /// Ends the term: nothing is committed any more.
    fn end_term(&mut self, why: &str) {
        error!(error = %why, "store commit failed: ending this term (the state is rebuilt from the store)");
        self.failure = Some(format!("the store could not be written ({why}); retry"));
        self.term_over.cancel();
    }

    /// Once the term is over, after the failed batch's effects: every commit still in
    /// flight fails too (whatever the store did with it, it is not acknowledged: a new
    /// term reads the store first).
    async fn fail_in_flight(&mut self) {
        let failure = self.failure.clone().unwrap_or_default();
        let result = Err(CommitError::unavailable(&failure));
        while let Some(f) = self.in_flight.pop_front() {
            // Already sent (chained commits are sent by their own task): wait for the
            // store's answer so nothing of this term is still on its way once this returns.
            // An unchained answer is polled here and was never sent: never send it now.
            if self.chain.is_some() {
                let _ = f.answer.await;
            }
            run_effects(f.batch, &result);
        }
    }

    /// Commits `ops` (chained by `link`); `answer` is the store's answer to a send already
    /// made. Everything before it is settled, so a send again follows what is applied.
    async fn commit(
        &mut self,
        ops: &[Op],
        mut link: Option<Link>,
        mut answer: Option<Result<TxnResponse>>,
    ) -> std::result::Result<(), Failure> {
        let (mut attempt, mut out_of_turn) = (0u32, 0u32);
        loop {
            let r = match answer.take() {
                Some(r) => r,
                None => {
                    let txn = chain::txn(self.fence(), ops.to_vec(), link.as_ref());
                    self.store.txn(txn).await
                }
            };
            let verdict = match r {
                Ok(resp) => match &link {
                    None if resp.succeeded => Verdict::Applied,
                    None => Verdict::FenceLost,
                    Some(l) => chain::verdict(self.fence(), l, &resp)
                        .map_err(|e| Failure::TermOver(e.to_string()))?,
                },
                Err(e @ Error::Unavailable(_))
                    if attempt < RETRIES && self.store.fatal().is_none() =>
                {
                    attempt += 1;
                    warn!(error = %e, attempt, "store unavailable; retrying commit");
                    tokio::time::sleep(scabbard_common::backoff::Backoff::default().delay(attempt))
                        .await;
                    link = self.relink(link);
                    continue;
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
            };
            match verdict {
                Verdict::Applied => {
                    if let (Some(c), Some(l)) = (self.chain.as_mut(), link.as_ref()) {
                        c.applied(l);
                    }
                    return Ok(());
                }
                Verdict::FenceLost => {
                    if let Some(f) = &self.fence {
                        f.lost.cancel();
                    }
                    return Err(Failure::TermOver(
                        "this controller is no longer the leader (fenced write refused)".into(),
                    ));
                }
                Verdict::OutOfTurn if out_of_turn < OUT_OF_TURN => {
                    out_of_turn += 1;
                    link = self.relink(link);
                }
                Verdict::OutOfTurn => {
                    return Err(Failure::TermOver(format!(
                        "the commit chain ({}) kept changing under this leader: another \
                         writer uses it",
                        chain::CHAIN_KEY
                    )));
                }
            }
        }
    }

    fn relink(&self, link: Option<Link>) -> Option<Link> {
        match (&self.chain, link) {
            (Some(c), Some(l)) => Some(c.relink(&l)),
            (_, l) => l,
        }
    }
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
pub(super) fn ops_for(batch: &[Write]) -> Vec<Op> {
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
