//! One actor per agent stream (`AgentService.Session`). It owns the stream: it forwards
//! the core's messages to the worker, writes log chunks straight into the log store (and
//! acks them) for attempts the agent currently holds, passes every other report to the
//! core, and ends the session when the agent goes silent for longer than its lease.
//! Liveness stays here: a heartbeat that reports nothing new (no cache or capability
//! change, no drain) never becomes a core message, so 10,000 idle agents cost the core
//! nothing per interval; the core reads when the agent was last heard from a shared
//! counter.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use scabbard_common::proto::{
    Ack, AgentMessage, ControllerMessage, LogChunk, agent_message, controller_message,
};
use scabbard_common::{Error, Result};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::Catalog;
use crate::core::{Attached, CoreHandle, CoreMsg};
use crate::logstore::LogStore;

/// Most inbound messages handled before log chunks are flushed and acked.
const BATCH: usize = 512;

/// State of one live session.
pub(crate) struct SessionActor {
    pub(crate) core: CoreHandle,
    pub(crate) logs: Arc<LogStore>,
    pub(crate) agent_id: String,
    pub(crate) session: u64,
    /// Attempts this agent holds (task id, fencing token): running ones, and finished ones
    /// whose log is not archived yet (their chunks may be replayed).
    pub(crate) attempts: HashSet<(String, u64)>,
    /// The controller archives logs: a result ack alone does not end an attempt here.
    pub(crate) archives_logs: bool,
    pub(crate) silence_limit: Duration,
    /// Messages are boxed (see `AgentTx`): idle queues stay small.
    pub(crate) out: mpsc::Sender<Result<Box<ControllerMessage>, Status>>,
    /// The agent token this session authenticated with; its revocation ends the session.
    pub(crate) token_id: String,
    pub(crate) catalog: Arc<Catalog>,
    /// Cancelled when the core's queue to this session overflowed: the session ends.
    pub(crate) overflow: CancellationToken,
    /// When the last message from the agent arrived (or the session began).
    pub(crate) last_heard: Instant,
    /// The same as unix ms, shared with the core (which no plain heartbeat reaches).
    pub(crate) last_seen: Arc<std::sync::atomic::AtomicI64>,
    /// Whether the core was told the agent is draining.
    pub(crate) draining_told: bool,
}

impl SessionActor {
    /// Builds the actor from what the core answered to `Attach`.
    pub(crate) fn new(
        core: CoreHandle,
        logs: Arc<LogStore>,
        attached: &Attached,
        out: mpsc::Sender<Result<Box<ControllerMessage>, Status>>,
        token_id: String,
        catalog: Arc<Catalog>,
        overflow: CancellationToken,
    ) -> Self {
        Self {
            core,
            logs,
            agent_id: attached.agent_id.clone(),
            session: attached.session,
            attempts: attached.attempts.iter().cloned().collect(),
            archives_logs: attached.welcome.archives_logs,
            silence_limit: Duration::from_millis(attached.welcome.lease_ttl_ms),
            out,
            token_id,
            catalog,
            overflow,
            last_heard: Instant::now(),
            last_seen: attached.last_seen.clone(),
            draining_told: false,
        }
    }

    /// Runs the session until the stream ends, the core replaces it, or the agent goes silent.
    pub(crate) async fn run(
        mut self,
        attached: Attached,
        mut inbound: Streaming<AgentMessage>,
        mut from_core: mpsc::Receiver<Box<ControllerMessage>>,
    ) {
        let why = match self.serve(attached, &mut inbound, &mut from_core).await {
            Ok(why) => why,
            Err(e) => format!("error: {e}"),
        };
        info!(agent = %self.agent_id, session = self.session, why, "session ended");
        self.core
            .send(CoreMsg::Detach {
                agent_id: self.agent_id.clone(),
                session: self.session,
                last_heard: self.last_heard.into_std(),
            })
            .await;
    }

    async fn serve(
        &mut self,
        attached: Attached,
        inbound: &mut Streaming<AgentMessage>,
        from_core: &mut mpsc::Receiver<Box<ControllerMessage>>,
    ) -> Result<String> {
        let mut welcome = attached.welcome;
        for r in welcome.resume.iter_mut().filter(|r| r.keep) {
            r.next_seq = self
                .logs
                .next_seq(&r.task_id, r.fencing_token as u32)
                .await?;
        }
        self.emit(ControllerMessage {
            msg: Some(controller_message::Msg::Welcome(welcome)),
        })
        .await?;
        let mut deadline = Instant::now() + self.silence_limit;
        let mut revocations = self.catalog.revocations();
        loop {
            tokio::select! {
                id = revocations.recv() => {
                    let revoked = match &id {
                        Ok(id) => *id == self.token_id,
                        // Missed some: ask the catalog directly.
                        Err(_) => self.catalog.token(&self.token_id).is_none_or(|t| t.revoked),
                    };
                    if revoked {
                        let _ = self
                            .out
                            .send(Err(Status::unauthenticated(format!(
                                "agent token {} was revoked: the session is closed",
                                self.token_id
                            ))))
                            .await;
                        return Ok("agent token revoked".into());
                    }
                    if matches!(id, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        revocations = self.catalog.revocations();
                    }
                }
                msg = from_core.recv() => match msg {
                    Some(m) => { self.observe(&m); self.emit_boxed(m).await?; }
                    None => return Ok("replaced by a newer session".into()),
                },
                msg = inbound.message() => {
                    let first = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok("agent closed the stream".into()),
                        Err(s) => return Ok(format!("stream error: {}", s.message())),
                    };
                    self.last_heard = Instant::now();
                    self.last_seen.store(
                        scabbard_common::time::now_ms(),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    deadline = self.last_heard + self.silence_limit;
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match inbound.message().now_or_never() {
                            Some(Ok(Some(m))) => batch.push(m),
                            _ => break,
                        }
                    }
                    self.handle_batch(batch).await?;
                }
                _ = self.overflow.cancelled() => return Ok(OVERFLOWED.into()),
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(format!("no message for {} ms", self.silence_limit.as_millis()));
                }
            }
        }
    }

    /// Tracks which attempts the agent holds from what the core sends it.
    fn observe(&mut self, m: &ControllerMessage) {
        match &m.msg {
            Some(controller_message::Msg::Assign(a)) => {
                self.attempts.insert((a.task_id.clone(), a.fencing_token));
            }
            Some(controller_message::Msg::Ack(a))
                if a.stale || a.archived || (a.result && !self.archives_logs) =>
            {
                self.attempts.remove(&(a.task_id.clone(), a.fencing_token));
            }
            _ => {}
        }
    }

    async fn emit(&self, m: ControllerMessage) -> Result<()> {
        self.emit_boxed(Box::new(m)).await
    }

    async fn emit_boxed(&self, m: Box<ControllerMessage>) -> Result<()> {
        tokio::select! {
            r = self.out.send(Ok(m)) => {
                r.map_err(|_| Error::Unavailable("agent stream closed".into()))
            }
            // An agent that does not read blocks this send: the overflow still ends it.
            _ = self.overflow.cancelled() => Err(Error::ResourceExhausted(OVERFLOWED.into())),
        }
    }

    async fn handle_batch(&mut self, batch: Vec<AgentMessage>) -> Result<()> {
        let mut pending: Vec<(String, u64, Vec<LogChunk>)> = Vec::new();
        for m in batch {
            match m.msg {
                Some(agent_message::Msg::Log(c)) => {
                    if !self
                        .attempts
                        .contains(&(c.task_id.clone(), c.fencing_token))
                    {
                        debug!(task = %c.task_id, token = c.fencing_token, "log chunk for a stale attempt");
                        self.emit(stale_ack(&c.task_id, c.fencing_token)).await?;
                        continue;
                    }
                    crate::metrics::log_received(1, c.data.len() as u64);
                    let chunk = LogChunk {
                        attempt: c.fencing_token as u32,
                        seq: c.seq,
                        stream: c.stream,
                        data: c.data,
                        at_ms: c.at_ms,
                    };
                    match pending.last_mut() {
                        Some((t, tok, v)) if *t == c.task_id && *tok == c.fencing_token => {
                            v.push(chunk)
                        }
                        _ => pending.push((c.task_id, c.fencing_token, vec![chunk])),
                    }
                }
                Some(other) => {
                    // Logs before a report are stored before the core sees the report.
                    self.flush(&mut pending).await?;
                    if let agent_message::Msg::Hello(_) = other {
                        warn!(agent = %self.agent_id, "ignoring a second Hello");
                        continue;
                    }
                    if let agent_message::Msg::Heartbeat(h) = &other {
                        // Liveness is this actor's business (the silence deadline, and
                        // `last_seen`); the core hears of a heartbeat only when it says
                        // something new: a cache or capability change, or draining.
                        let news = h.cache.is_some()
                            || h.capabilities.is_some()
                            || (h.draining && !self.draining_told);
                        if !news {
                            continue;
                        }
                        self.draining_told |= h.draining;
                    }
                    self.core
                        .send(CoreMsg::FromAgent {
                            agent_id: self.agent_id.clone(),
                            session: self.session,
                            msg: other,
                        })
                        .await;
                }
                None => {}
            }
        }
        self.flush(&mut pending).await
    }

    async fn flush(&mut self, pending: &mut Vec<(String, u64, Vec<LogChunk>)>) -> Result<()> {
        for (task_id, token, chunks) in pending.drain(..) {
            let next_seq = match self.logs.append(&task_id, token as u32, &chunks).await {
                Ok(n) => n,
                Err(Error::InvalidArgument(e)) => {
                    // A gap: tell the agent where the log stands so it resends from there.
                    warn!(task = %task_id, error = %e, "log gap");
                    self.logs.next_seq(&task_id, token as u32).await?
                }
                Err(e) => return Err(e),
            };
            self.emit(ControllerMessage {
                msg: Some(controller_message::Msg::Ack(Ack {
                    task_id,
                    fencing_token: token,
                    next_seq,
                    result: false,
                    stale: false,
                    archived: false,
                })),
            })
            .await?;
        }
        Ok(())
    }
}

/// Why a session whose outbound queue overflowed ends (also its status to the agent).
const OVERFLOWED: &str = "the agent did not read its messages in time and the controller's queue to it overflowed: reconnect and resynchronise";

/// The response stream of a session: the messages the actor emits, ended at once with
/// `RESOURCE_EXHAUSTED` when the core's queue to the session overflowed (whatever is still
/// buffered for an agent that stopped reading is dropped with it).
pub(crate) struct SessionStream {
    rx: mpsc::Receiver<Result<Box<ControllerMessage>, Status>>,
    overflow: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    done: bool,
}

impl SessionStream {
    pub(crate) fn new(
        rx: mpsc::Receiver<Result<Box<ControllerMessage>, Status>>,
        overflow: CancellationToken,
    ) -> Self {
        Self {
            rx,
            overflow: Box::pin(overflow.cancelled_owned()),
            done: false,
        }
    }
}

impl futures::Stream for SessionStream {
    type Item = Result<ControllerMessage, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if self.overflow.as_mut().poll(cx).is_ready() {
            self.done = true;
            self.rx.close();
            return Poll::Ready(Some(Err(Status::resource_exhausted(OVERFLOWED))));
        }
        self.rx.poll_recv(cx).map(|m| m.map(|r| r.map(|b| *b)))
    }
}

fn stale_ack(task_id: &str, token: u64) -> ControllerMessage {
    ControllerMessage {
        msg: Some(controller_message::Msg::Ack(Ack {
            task_id: task_id.to_string(),
            fencing_token: token,
            stale: true,
            ..Default::default()
        })),
    }
}
