//! The worker's link to the controller: register (once; the identity is kept in the data
//! dir), open the `Session` stream, reconcile running attempts after `Welcome`, then pump
//! messages both ways with heartbeats. A dropped stream is retried with jittered
//! exponential backoff; while it is down attempts keep running and their output stays in
//! the spool, from which the next session refills whatever the controller lacks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use scabbard_common::backoff::Backoff;
use scabbard_common::client::{self, AgentServiceClient};
use scabbard_common::proto::{
    self, AgentMessage, CapabilityUpdate, ControllerMessage, Heartbeat, Hello, RegisterRequest,
    agent_message, controller_message,
};
use scabbard_common::{Error, Result};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::WorkerConfig;
use crate::identity::{self, Identity};
use crate::link::ControllerLink;
use crate::runner::{AttemptKey, Runner};

/// Ways a session ends.
enum End {
    Shutdown,
    /// The agent token was refused: register again.
    Reregister(String),
    /// An administrator revoked this agent's token: stop (registering again would undo
    /// the revocation).
    Revoked(String),
    Lost(Error),
}

pub(crate) struct Connection {
    pub(crate) cfg: WorkerConfig,
    pub(crate) runner: Arc<Runner>,
    pub(crate) outbox: mpsc::Receiver<AgentMessage>,
    pub(crate) draining: bool,
    /// The controller this worker talks to now (the leader, once redirected).
    pub(crate) target: String,
    /// Set once shutdown was asked: finish what runs, then stop (or at this instant).
    pub(crate) stop_at: Option<tokio::time::Instant>,
    /// The way to the controller for calls outside the session (artifacts): kept pointing
    /// at `target` with the current agent token and limits.
    pub(crate) link: Arc<ControllerLink>,
    /// The identity whose token was just refused: registering again asks for the same
    /// agent id and proves it with that token (a live id is never handed out without it).
    pub(crate) previous: Option<Identity>,
}

/// How long a new session may take to open and be welcomed.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// Tries in a row refused for a reason retrying cannot fix (a bad registration token, a
/// refused or missing certificate) before the worker stops with an error.
pub(crate) const PERMANENT_TRIES: u32 = 3;

/// Whether `e`, ending a session that never opened, is a misconfiguration that retrying
/// cannot fix: the controller refused the registration token or the client certificate,
/// or the TLS handshake failed on a certificate.
fn is_permanent(e: &Error) -> bool {
    match e {
        Error::Unauthenticated(_) | Error::PermissionDenied(_) => true,
        Error::Unavailable(m) | Error::Internal(m) => {
            let m = m.to_ascii_lowercase();
            m.contains("certificate") || m.contains(scabbard_common::tls::CLIENT_CERT_PHRASE)
        }
        _ => false,
    }
}

impl Connection {
    /// Connects, serves and reconnects until `shutdown`; then takes no new work, lets
    /// running attempts finish and report (up to the configured grace), and returns.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let backoff = Backoff {
            max: self.cfg.max_backoff(),
            ..Backoff::default()
        };
        let mut failures = 0u32;
        let mut wrapped = true;
        let mut last_failed: Option<String> = None;
        let mut refused = 0u32;
        loop {
            let (end, welcomed) = self.session(&shutdown).await;
            crate::metrics::session(false);
            if welcomed {
                // Older failures are history; the one that ended this session (below) is not.
                last_failed = None;
                refused = 0;
            }
            if self.stopping_done() {
                return Ok(());
            }
            match end {
                End::Shutdown => return Ok(()),
                End::Revoked(why) => {
                    return Err(Error::Unauthenticated(format!(
                        "{why}: this worker stops. To bring the host back, register it again: remove {} and start it with a valid registration token",
                        self.cfg.data_dir.join("identity").display()
                    )));
                }
                End::Reregister(why) => {
                    warn!(why, "agent token refused; registering again");
                    self.previous = identity::load(&self.cfg.data_dir).ok().flatten();
                    let _ = std::fs::remove_file(self.cfg.data_dir.join("identity"));
                }
                // Follow a redirect at once, unless it points at the controller that just
                // failed (a follower still naming a dead leader): then back off as usual.
                End::Lost(Error::NotLeader {
                    leader: Some(leader),
                }) if leader != self.target && last_failed.as_deref() != Some(leader.as_str()) => {
                    info!(%leader, "redirected to the leader");
                    self.target = leader;
                    continue;
                }
                End::Lost(e) => {
                    if !welcomed && is_permanent(&e) {
                        refused += 1;
                        if refused >= PERMANENT_TRIES {
                            return Err(Error::Unauthenticated(format!(
                                "the controller at {} refused this worker {refused} times in a row: {e}. \
                                 This will not fix itself: check the registration token \
                                 (--registration-token / SCABBARD_REGISTRATION_TOKEN) and the TLS \
                                 files (--ca-cert, --client-cert, --client-key); the worker stops",
                                self.target
                            )));
                        }
                        warn!(controller = %self.target, error = %e, attempt = refused, of = PERMANENT_TRIES, "the controller refused this worker; trying again");
                    } else if welcomed {
                        warn!(controller = %self.target, error = %e, "controller connection lost");
                    } else {
                        refused = 0;
                        warn!(controller = %self.target, error = %e, "cannot open a session with the controller; retrying");
                    }
                    if !matches!(e, Error::NotLeader { .. }) {
                        last_failed = Some(self.target.clone());
                    }
                    // Next time, try the next configured controller (it redirects if needed),
                    // also after a session that was up: the controller that went silent may
                    // be frozen, and reconnecting to it first would hang until the
                    // keep-alive gives up again. Back off harder only once every address
                    // was tried.
                    let all = scabbard_common::client::addresses(&self.cfg.controller);
                    if !all.is_empty() && (!welcomed || all.len() > 1) {
                        let next = all
                            .iter()
                            .position(|a| *a == self.target)
                            .map_or(0, |i| (i + 1) % all.len());
                        self.target = all[next].clone();
                        if next != 0 {
                            failures = failures.min(1);
                            wrapped = false;
                        } else {
                            wrapped = true;
                        }
                    }
                }
            }
            failures = if welcomed {
                0
            } else if wrapped {
                failures.saturating_add(1)
            } else {
                failures.max(1)
            };
            wrapped = true;
            let delay = backoff.delay(failures);
            // Keep draining the outbox while away: everything in it is spooled.
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = shutdown.cancelled(), if self.stop_at.is_none() => self.begin_stop(),
                    m = self.outbox.recv() => if m.is_none() { return Ok(()) },
                }
                if self.stopping_done() {
                    return Ok(());
                }
            }
        }
    }

    fn begin_stop(&mut self) {
        let grace = Duration::from_millis(self.cfg.shutdown_grace_ms);
        info!(
            running = self.runner.running(),
            grace_s = grace.as_secs(),
            "shutting down: no new work; waiting for running tasks to finish and report"
        );
        self.draining = true;
        self.stop_at = Some(tokio::time::Instant::now() + grace);
    }

    /// Shutdown was asked and either everything has reported or the grace is over.
    fn stopping_done(&self) -> bool {
        self.stop_at
            .is_some_and(|at| self.runner.is_idle() || tokio::time::Instant::now() >= at)
    }

    async fn identity(&mut self) -> Result<Identity> {
        if let Some(id) = identity::load(&self.cfg.data_dir)? {
            return Ok(id);
        }
        if self.cfg.registration_token.is_empty() {
            return Err(Error::Unauthenticated(
                "no agent identity in the data dir and no registration token (--registration-token or SCABBARD_REGISTRATION_TOKEN)".into(),
            ));
        }
        let channel = client::connect_with(&self.target, &self.cfg.client_options()).await?;
        let request = RegisterRequest {
            registration_token: self.cfg.registration_token.clone(),
            name: self.runner.agent_name().to_string(),
            labels: self.cfg.labels.clone(),
            capabilities: self.runner.capabilities(),
            slots: self.cfg.slots,
            version: env!("CARGO_PKG_VERSION").into(),
            agent_id: String::new(),
            current_agent_token: String::new(),
        };
        let mut client = AgentServiceClient::new(channel);
        // Come back as the same agent when we can prove it; else as a new one.
        let resp = match self.previous.clone() {
            Some(prev) => {
                let again = RegisterRequest {
                    agent_id: prev.agent_id,
                    current_agent_token: prev.agent_token,
                    ..request.clone()
                };
                match client.register(again).await {
                    Err(s) if s.code() == tonic::Code::PermissionDenied => {
                        warn!(error = %s.message(), "cannot keep the agent id; registering as a new agent");
                        client.register(request).await
                    }
                    r => r,
                }
            }
            None => client.register(request).await,
        }
        .map_err(Error::from)?
        .into_inner();
        self.previous = None;
        let id = Identity {
            agent_id: resp.agent_id,
            agent_token: resp.agent_token,
        };
        identity::save(&self.cfg.data_dir, &id)?;
        info!(agent = %id.agent_id, "registered");
        Ok(id)
    }

    /// One session; returns how it ended and whether the controller welcomed us.
    async fn session(&mut self, shutdown: &CancellationToken) -> (End, bool) {
        self.link.set_target(&self.target);
        let id = match self.identity().await {
            Ok(id) => id,
            Err(e @ Error::Unauthenticated(_)) if self.cfg.registration_token.is_empty() => {
                return (End::Lost(e), false);
            }
            Err(e) => return (End::Lost(e), false),
        };
        self.runner.set_agent_id(&id.agent_id);
        self.link.set_token(&id.agent_token);
        let (req_tx, req_rx) = mpsc::channel::<AgentMessage>(1024);
        // Capabilities and the warm-cache summary go in `Hello`, and in a heartbeat when
        // they change (an engine came or went, a new image was pulled).
        let mut advertised = self.runner.capabilities();
        let (mut cache_version, cache) = self.runner.cache_summary();
        let hello = Hello {
            agent_id: id.agent_id.clone(),
            capabilities: advertised.clone(),
            labels: self.cfg.labels.clone(),
            slots: self.cfg.slots,
            running: self.runner.hello_list(),
            version: env!("CARGO_PKG_VERSION").into(),
            cache: Some(cache),
        };
        let _ = req_tx
            .send(AgentMessage {
                msg: Some(agent_message::Msg::Hello(hello)),
            })
            .await;
        let channel = match client::connect_with(&self.target, &self.cfg.client_options()).await {
            Ok(c) => c,
            Err(e) => return (End::Lost(e), false),
        };
        let req = match client::with_token(
            tonic::Request::new(ReceiverStream::new(req_rx)),
            Some(&id.agent_token),
        ) {
            Ok(r) => r,
            Err(e) => return (End::Lost(e), false),
        };
        // The session must open, and the welcome arrive, within a bounded time. A frozen
        // controller is dropped sooner by the keep-alive (about 4 s); this bound is for one
        // that answers pings but not the session, and it is generous, because a new
        // leader's welcome waits for its recovery and a store commit.
        let silent = || {
            End::Lost(Error::Unavailable(format!(
                "controller at {} did not answer the session within {} ms",
                self.target,
                WELCOME_TIMEOUT.as_millis()
            )))
        };
        let open_by = tokio::time::Instant::now() + WELCOME_TIMEOUT;
        let opened = tokio::time::timeout_at(
            open_by,
            AgentServiceClient::new(channel)
                .max_decoding_message_size(client::MAX_MESSAGE_BYTES)
                .session(req),
        )
        .await;
        let Ok(opened) = opened else {
            return (silent(), false);
        };
        let mut inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(s)
                if s.code() == tonic::Code::Unauthenticated && s.message().contains("revoked") =>
            {
                return (End::Revoked(s.message().to_string()), false);
            }
            // A missing client certificate is not a bad agent token: keep the identity.
            Err(s)
                if s.code() == tonic::Code::Unauthenticated
                    && s.message()
                        .contains(scabbard_common::tls::CLIENT_CERT_PHRASE) =>
            {
                return (End::Lost(s.into()), false);
            }
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                return (End::Reregister(s.message().to_string()), false);
            }
            Err(s) => return (End::Lost(s.into()), false),
        };
        let Ok(first) = tokio::time::timeout_at(open_by, inbound.message()).await else {
            return (silent(), false);
        };
        let welcome = match first {
            Ok(Some(ControllerMessage {
                msg: Some(controller_message::Msg::Welcome(w)),
            })) => w,
            Ok(_) => return (End::Lost(Error::internal("expected Welcome")), false),
            Err(s) => return (End::Lost(s.into()), false),
        };
        info!(agent = %id.agent_id, resumed = welcome.resume.len(), "session open");
        crate::metrics::session(true);
        self.link.welcomed(&welcome);
        // An operator's drain (or undrain) holds across sessions; a shutdown drains anyway.
        if self.stop_at.is_none() && self.draining != welcome.drained {
            info!(
                drained = welcome.drained,
                "the controller says this agent is {}",
                if welcome.drained {
                    "drained"
                } else {
                    "in service"
                }
            );
            self.draining = welcome.drained;
        }
        let mut pump = Pump {
            runner: self.runner.clone(),
            tx: req_tx,
            sent: HashMap::new(),
            archives_logs: welcome.archives_logs,
        };
        if let Err(e) = pump.reconcile(&welcome).await {
            return (End::Lost(e), true);
        }
        let hb = Duration::from_millis(welcome.heartbeat_interval_ms.max(50));
        let mut ticker = tokio::time::interval(hb);
        loop {
            if self.stopping_done() {
                return (End::Shutdown, true);
            }
            let stop_at = self
                .stop_at
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400));
            let step = tokio::select! {
                _ = shutdown.cancelled(), if self.stop_at.is_none() => {
                    self.begin_stop();
                    let free = self.runner.slots.saturating_sub(self.runner.running());
                    pump.send(agent_message::Msg::Heartbeat(Heartbeat { free_slots: free, draining: true, ..Default::default() })).await
                }
                _ = tokio::time::sleep_until(stop_at) => return (End::Shutdown, true),
                m = self.outbox.recv() => match m {
                    Some(m) => pump.outgoing(m).await,
                    None => return (End::Shutdown, true),
                },
                m = inbound.message() => match m {
                    Ok(Some(m)) => self.incoming(&mut pump, m).await,
                    Ok(None) => Err(Error::Unavailable("controller closed the session".into())),
                    Err(s) => Err(s.into()),
                },
                _ = ticker.tick() => {
                    let mut hb = Heartbeat {
                        free_slots: self.runner.slots.saturating_sub(self.runner.running()),
                        // Only a shutdown: an operator's drain is the controller's own.
                        draining: self.stop_at.is_some(),
                        ..Default::default()
                    };
                    let now = self.runner.capabilities();
                    if now != advertised {
                        info!(before = ?advertised, now = ?now, "advertising new capabilities");
                        hb.capabilities = Some(CapabilityUpdate { capabilities: now.clone() });
                        advertised = now;
                    }
                    let (version, cache) = self.runner.cache_summary();
                    if version != cache_version {
                        hb.cache = Some(cache);
                        cache_version = version;
                    }
                    pump.send(agent_message::Msg::Heartbeat(hb)).await
                }
            };
            if let Err(e) = step {
                return (End::Lost(e), true);
            }
        }
    }

    async fn incoming(&mut self, pump: &mut Pump, m: ControllerMessage) -> Result<()> {
        use controller_message::Msg;
        match m.msg {
            Some(Msg::Assign(a)) => {
                let key = (a.task_id.clone(), a.fencing_token);
                if self.draining {
                    return pump.reject(&key, "the worker is draining").await;
                }
                match self.runner.start(a) {
                    Ok(true) => {
                        pump.sent.insert(key.clone(), 0);
                        pump.send(agent_message::Msg::Accepted(proto::Accepted {
                            task_id: key.0,
                            fencing_token: key.1,
                        }))
                        .await
                    }
                    Ok(false) => Ok(()),
                    Err(why) => pump.reject(&key, &why).await,
                }
            }
            Some(Msg::Cancel(c)) => {
                self.runner.cancel(&(c.task_id, c.fencing_token));
                Ok(())
            }
            Some(Msg::Ack(a)) => {
                let key = (a.task_id, a.fencing_token);
                // A controller that archives logs says when the spool may go (`archived`,
                // after the result ack); until then the chunks stay, for the next leader.
                if a.stale || a.archived || (a.result && !pump.archives_logs) {
                    if a.stale {
                        warn!(task = %key.0, token = key.1, "controller says this attempt is stale; dropping it");
                    }
                    pump.sent.remove(&key);
                    self.runner.forget(&key);
                }
                Ok(())
            }
            Some(Msg::Drain(d)) => {
                info!(reason = %d.reason, "draining: no new work will be accepted");
                self.draining = true;
                Ok(())
            }
            Some(Msg::Undrain(u)) => {
                // A worker that is shutting down stays drained.
                if self.stop_at.is_none() {
                    info!(reason = %u.reason, "undrained: taking new work again");
                    self.draining = false;
                }
                Ok(())
            }
            Some(Msg::Welcome(_)) | None => Ok(()),
        }
    }
}

/// Sends on the current session, filling gaps from the spool so the controller sees every
/// chunk exactly once and in order.
struct Pump {
    runner: Arc<Runner>,
    tx: mpsc::Sender<AgentMessage>,
    /// Next chunk sequence number to send, per attempt on this session.
    sent: HashMap<AttemptKey, u64>,
    /// The controller archives logs (`Welcome.archives_logs`): an attempt is dropped on
    /// `Ack.archived`, not on the result ack.
    archives_logs: bool,
}

impl Pump {
    async fn send(&self, msg: agent_message::Msg) -> Result<()> {
        self.tx
            .send(AgentMessage { msg: Some(msg) })
            .await
            .map_err(|_| Error::Unavailable("session stream closed".into()))
    }

    async fn reject(&self, key: &AttemptKey, reason: &str) -> Result<()> {
        self.send(agent_message::Msg::Rejected(proto::Rejected {
            task_id: key.0.clone(),
            fencing_token: key.1,
            reason: reason.to_string(),
        }))
        .await
    }

    async fn reconcile(&mut self, welcome: &proto::Welcome) -> Result<()> {
        for r in &welcome.resume {
            let key = (r.task_id.clone(), r.fencing_token);
            if !r.keep {
                if !r.result_recorded {
                    warn!(task = %key.0, token = key.1, "controller does not know this attempt any more; stopping it");
                }
                self.runner.forget(&key);
                continue;
            }
            self.sent.insert(key.clone(), r.next_seq);
            self.fill(&key, u64::MAX).await?;
            if let Some(f) = self.runner.finished(&key) {
                self.send(agent_message::Msg::Finished(f)).await?;
            }
        }
        Ok(())
    }

    /// Sends spooled chunks of `key` from the next unsent one up to (excluding) `upto`.
    async fn fill(&mut self, key: &AttemptKey, upto: u64) -> Result<()> {
        let Some(&from) = self.sent.get(key) else {
            return Ok(());
        };
        if from >= upto {
            return Ok(());
        }
        let chunks = self.runner.spool.chunks_from(&key.0, key.1, from)?;
        for c in chunks.into_iter().take_while(|c| c.seq < upto) {
            let next = c.seq + 1;
            self.send(agent_message::Msg::Log(c)).await?;
            self.sent.insert(key.clone(), next);
        }
        Ok(())
    }

    async fn outgoing(&mut self, m: AgentMessage) -> Result<()> {
        match m.msg {
            Some(agent_message::Msg::Log(c)) => {
                let key = (c.task_id.clone(), c.fencing_token);
                let Some(&next) = self.sent.get(&key) else {
                    return Ok(());
                };
                if c.seq < next {
                    return Ok(()); // already sent from the spool
                }
                if c.seq > next {
                    self.fill(&key, c.seq).await?;
                }
                self.sent.insert(key, c.seq + 1);
                self.send(agent_message::Msg::Log(c)).await
            }
            Some(agent_message::Msg::Finished(f)) => {
                let key = (f.task_id.clone(), f.fencing_token);
                if !self.sent.contains_key(&key) {
                    return Ok(());
                }
                self.fill(&key, f.log_chunks).await?;
                self.send(agent_message::Msg::Finished(f)).await
            }
            Some(other) => self.send(other).await,
            None => Ok(()),
        }
    }
}

/// This host's name, the agent name when none is configured.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}
