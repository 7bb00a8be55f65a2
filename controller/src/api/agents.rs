//! `AgentService`: registration with the registration token, and the session stream
//! authenticated by the agent token.

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::Error;
use scabbard_common::proto::{
    Agent, AgentMessage, ControllerMessage, RegisterRequest, RegisterResponse, StoredAgent,
    agent_message, agent_service_server::AgentService,
};
use scabbard_common::time::now_ms;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::config::ControllerConfig;
use crate::core::{CoreMsg, CoreRouter, validate};
use crate::session::SessionActor;

/// How long a new session may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Implementation of `scabbard.v1.AgentService`.
pub struct AgentApi {
    pub(crate) core: CoreRouter,
    pub(crate) cfg: Arc<ControllerConfig>,
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = req.into_inner();
        if r.registration_token.is_empty() {
            return Err(Error::Unauthenticated(
                "registration_token is required (the controller's --registration-token)".into(),
            )
            .into());
        }
        if !auth::constant_time_eq(
            r.registration_token.as_bytes(),
            self.cfg.registration_token.as_bytes(),
        ) {
            return Err(Error::Unauthenticated("registration token is not valid".into()).into());
        }
        if r.slots == 0 || r.slots > 4096 {
            return Err(Error::invalid(format!("slots must be 1..=4096, got {}", r.slots)).into());
        }
        if r.name.len() > 256 {
            return Err(Error::invalid("name is longer than 256 bytes").into());
        }
        let agent_id = if r.agent_id.is_empty() {
            format!("agent-{}", ulid::Ulid::new().to_string().to_lowercase())
        } else {
            validate::id("agent", &r.agent_id)?;
            r.agent_id
        };
        let token = auth::new_agent_token();
        let now = now_ms();
        let stored = StoredAgent {
            agent: Some(Agent {
                id: agent_id.clone(),
                name: if r.name.is_empty() {
                    agent_id.clone()
                } else {
                    r.name
                },
                labels: r.labels,
                capabilities: r.capabilities,
                slots: r.slots,
                version: r.version,
                registered_at_ms: now,
                last_seen_ms: now,
                ..Default::default()
            }),
            token_sha256: auth::token_hash(&token),
        };
        self.core
            .ask(|reply| CoreMsg::Register { stored, reply })
            .await?;
        Ok(Response::new(RegisterResponse {
            agent_id,
            agent_token: token,
        }))
    }

    type SessionStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let token = auth::bearer(req.metadata())
            .ok_or_else(|| {
                Error::Unauthenticated(
                    "missing agent token: send metadata 'authorization: Bearer <agent token>'"
                        .into(),
                )
            })?
            .to_string();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Error::invalid("no Hello within 10 s of opening the session"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(h)) => h,
            _ => return Err(Error::invalid("the first session message must be Hello").into()),
        };
        let (core_tx, core_rx) = mpsc::channel::<ControllerMessage>(4096);
        let token_hash = auth::token_hash(&token);
        // The session stays with this core even if leadership moves on.
        let core = self.core.current()?;
        let attached = core
            .ask(|reply| CoreMsg::Attach {
                token_hash,
                hello,
                tx: core_tx,
                reply,
            })
            .await?;
        let (out_tx, out_rx) = mpsc::channel(1024);
        let actor = SessionActor::new(core.clone(), core.logs().clone(), &attached, out_tx);
        tokio::spawn(actor.run(attached, inbound, core_rx));
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}
