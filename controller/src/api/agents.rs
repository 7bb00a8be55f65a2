//! `AgentService`: registration with a registration token (which issues the agent's own
//! token), the session stream and token rotation, authenticated by the agent token.

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::Error;
use scabbard_common::proto::{
    Agent, AgentMessage, ControllerMessage, RegisterRequest, RegisterResponse,
    RotateAgentTokenRequest, RotateAgentTokenResponse, StoredAgent, agent_message,
    agent_service_server::AgentService,
};
use scabbard_common::time::now_ms;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{self, Catalog};
use crate::core::{CoreMsg, CoreRouter, validate};
use crate::session::SessionActor;

/// How long a new session may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Implementation of `scabbard.v1.AgentService`.
pub struct AgentApi {
    pub(crate) core: CoreRouter,
    pub(crate) catalog: Arc<Catalog>,
    /// Workers must present a verified client certificate naming the agent (mTLS).
    pub(crate) require_client_cert: bool,
    /// Messages the core may queue for one session (`agent_queue_capacity`).
    pub(crate) queue_capacity: usize,
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let peer_certs = req.peer_certs();
        let r = req.into_inner();
        if r.registration_token.is_empty() {
            return Err(Error::Unauthenticated(
                "registration_token is required (`scabbard token create --kind registration`, or the controller's --registration-token)".into(),
            )
            .into());
        }
        if r.slots == 0 || r.slots > 4096 {
            return Err(Error::invalid(format!("slots must be 1..=4096, got {}", r.slots)).into());
        }
        if r.name.len() > 256 {
            return Err(Error::invalid("name is longer than 256 bytes").into());
        }
        let reregistering = !r.agent_id.is_empty();
        let agent_id = if r.agent_id.is_empty() {
            format!("agent-{}", ulid::Ulid::new().to_string().to_lowercase())
        } else {
            validate::id("agent", &r.agent_id)?;
            r.agent_id
        };
        let cert_name = if r.name.is_empty() {
            &agent_id
        } else {
            &r.name
        };
        crate::tls::check_agent_identity(
            peer_certs.clone(),
            &agent_id,
            cert_name,
            self.require_client_cert,
        )?;
        // Only callers holding a registration token learn anything about agent ids. A
        // follower's copy of the catalog can lag behind a token just created on the
        // leader: a token it does not know yet gets the redirect, so the leader decides.
        if let Err(e) = self.catalog.check_registration_token(&r.registration_token) {
            self.core.current()?;
            return Err(e.into());
        }
        // A live agent id is taken over only by that agent: it proves itself with its
        // current token or a client certificate naming the id.
        if reregistering
            && self.catalog.agent_has_live_token(&agent_id)
            && !self.catalog.proves_agent(&r.current_agent_token, &agent_id)
            && !crate::tls::cert_names_agent_id(peer_certs.as_ref(), &agent_id)
        {
            return Err(Error::PermissionDenied(format!(
                "agent {agent_id} is registered already: re-registering it needs its current agent token (current_agent_token) or a client certificate naming {agent_id}; a new worker registers without agent_id"
            ))
            .into());
        }
        // A follower answers NotLeader before it uses up a registration-token use.
        self.core.current()?;
        // Counted only once the request is otherwise valid.
        let by = self
            .catalog
            .use_registration_token(&r.registration_token)
            .await?;
        let name = if r.name.is_empty() {
            agent_id.clone()
        } else {
            r.name
        };
        let token = self
            .catalog
            .issue_agent_token(&agent_id, &name, &by)
            .await?;
        // A project-bound registration token binds the agent to that project.
        let project = if by.cluster_wide() {
            String::new()
        } else {
            by.project.clone()
        };
        let now = now_ms();
        let stored = StoredAgent {
            agent: Some(Agent {
                id: agent_id.clone(),
                name,
                labels: r.labels,
                capabilities: r.capabilities,
                slots: r.slots,
                version: r.version,
                registered_at_ms: now,
                last_seen_ms: now,
                project,
                ..Default::default()
            }),
            // The token lives in the catalog (tokens/<id>), bound to this agent id.
            token_sha256: String::new(),
            // The core keeps an operator's drain across a re-registration.
            drained: false,
        };
        self.core
            .ask(|reply| CoreMsg::Register { stored, reply })
            .await?;
        Ok(Response::new(RegisterResponse {
            agent_id,
            agent_token: token,
        }))
    }

    type SessionStream = super::tasks::BoxStream<ControllerMessage>;

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = auth::principal(&req)?;
        // Agent tokens are named "agent <agent name>".
        let agent_name = who.name.strip_prefix("agent ").unwrap_or(&who.name);
        crate::tls::check_agent_identity(
            req.peer_certs(),
            &who.agent_id,
            agent_name,
            self.require_client_cert,
        )?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Error::invalid("no Hello within 10 s of opening the session"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(h)) => h,
            _ => return Err(Error::invalid("the first session message must be Hello").into()),
        };
        let (core_tx, core_rx, overflow) =
            crate::core::agent_tx::AgentTx::channel(self.queue_capacity);
        // The session stays with this core even if leadership moves on.
        let core = self.core.current()?;
        let attached = core
            .ask(|reply| CoreMsg::Attach {
                agent_id: who.agent_id.clone(),
                hello,
                tx: core_tx,
                reply,
            })
            .await?;
        let (out_tx, out_rx) = mpsc::channel(1024);
        let actor = SessionActor::new(
            core.clone(),
            core.logs().clone(),
            &attached,
            out_tx,
            who.token_id,
            self.catalog.clone(),
            overflow.clone(),
        );
        tokio::spawn(actor.run(attached, inbound, core_rx));
        Ok(Response::new(Box::pin(crate::session::SessionStream::new(
            out_rx, overflow,
        ))))
    }

    async fn rotate_token(
        &self,
        req: Request<RotateAgentTokenRequest>,
    ) -> Result<Response<RotateAgentTokenResponse>, Status> {
        let who = auth::principal(&req)?;
        let agent_token = self.catalog.rotate_agent_token(&who).await?;
        Ok(Response::new(RotateAgentTokenResponse { agent_token }))
    }
}
