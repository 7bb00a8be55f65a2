//! `AdminService`: cluster status, agents, tokens, the audit log.

use std::sync::Arc;

use scabbard_common::Error;
use scabbard_common::proto::{
    Agent, Breaker, BreakerState, ClusterStatusRequest, ClusterStatusResponse, ControllerMember,
    CreateTokenRequest, CreateTokenResponse, DrainAgentRequest, GetConfigRequest,
    GetConfigResponse, GetStatsRequest, GetStatsResponse, ListAgentsRequest, ListAgentsResponse,
    ListAuditRequest, ListAuditResponse, ListBreakersRequest, ListBreakersResponse,
    ListTokensRequest, ListTokensResponse, ProjectQueue, RemoveAgentRequest, RemoveAgentResponse,
    ResetBreakerRequest, RevokeTokenRequest, TokenInfo, TokenKind, UndrainAgentRequest,
    WhoAmIRequest, WhoAmIResponse, admin_service_server::AdminService,
};
use tonic::{Request, Response, Status};

use crate::audit;
use crate::auth::{self, Catalog, Principal};
use crate::core::{CoreMsg, CoreRouter, Route, breakers, validate};
use crate::membership::MEMBER_PREFIX;
use crate::store::Store;

/// Implementation of `scabbard.v1.AdminService`.
pub struct AdminApi {
    pub(crate) core: CoreRouter,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) catalog: Arc<Catalog>,
    /// This controller's advertised address.
    pub(crate) advertise: String,
    /// The effective configuration, secrets hidden (`GetConfig`).
    pub(crate) config: Arc<GetConfigResponse>,
}

impl AdminApi {
    /// The id of the agent `input` names: an id, a name or a unique id prefix (see
    /// `crate::resolve`).
    async fn agent_id(&self, input: &str) -> Result<String, Status> {
        if input.is_empty() {
            return Err(Error::invalid("id is required: an agent id, id prefix or name").into());
        }
        if input.len() > 256 {
            return Err(Error::invalid("id is longer than 256 bytes").into());
        }
        let agents = self.core.ask(|reply| CoreMsg::ListAgents { reply }).await?;
        Ok(crate::resolve::agent(&agents, input)?)
    }
}

/// Checks an operator's reason (at most 1024 bytes).
fn check_reason(reason: &str) -> Result<(), Status> {
    if reason.len() > 1024 {
        return Err(Error::invalid("reason is longer than 1024 bytes").into());
    }
    Ok(())
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_config(
        &self,
        _req: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        // Operator scope is checked by the auth layer; the view holds no secret.
        Ok(Response::new((*self.config).clone()))
    }

    async fn list_agents(
        &self,
        _req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self.core.ask(|reply| CoreMsg::ListAgents { reply }).await?;
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn cluster_status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        // Anyone may find the leader; queue depths are for token holders.
        let who = req.extensions().get::<Principal>().cloned();
        let may_read = who.is_some();
        let route = self.core.watch().borrow().clone();
        let (leader, active) = match route {
            Route::Active(core) => (self.advertise.clone(), Some(core)),
            Route::Follower(l) => (l.unwrap_or_default(), None),
        };
        let mut status = ClusterStatusResponse {
            answered_by: self.advertise.clone(),
            answered_by_leader: active.is_some(),
            store_backend: self.store.backend().to_string(),
            ..Default::default()
        };
        match self.store.health().await {
            Ok(()) => status.store_healthy = true,
            Err(e) => status.store_error = e.to_string(),
        }
        if let Ok(page) = self.store.range(MEMBER_PREFIX, None, 1000).await {
            status.members = page
                .kvs
                .iter()
                .map(|kv| {
                    let address = String::from_utf8_lossy(&kv.value).into_owned();
                    ControllerMember {
                        leader: address == leader,
                        address,
                    }
                })
                .collect();
        }
        // Without a token the counters stay empty: say so rather than show zeros.
        status.token_needed = active.is_some() && !may_read;
        if let Some(core) = active.filter(|_| may_read)
            && let Ok(stats) = core.stats().await
        {
            status.queued_tasks = stats.queued as u64;
            status.active_tasks = stats.active as u64;
            status.total_tasks = stats.total as u64;
            status.workflows_in_memory = stats.workflows_in_memory as u64;
            status.waiting = stats.waiting;
            status.connected_agents = stats.connected_agents as u32;
            status.breakers = who
                .as_ref()
                .map(|w| visible_breakers(w, stats.breakers))
                .unwrap_or_default();
            status.running_workflows = stats.running_workflows as u64;
            status.pending_workflows = stats.pending_workflows as u64;
            status.cache_affinity_hits = stats.cache_affinity_hits;
            status.cache_affinity_misses = stats.cache_affinity_misses;
            status.retention = Some(crate::retention::status());
        }
        status.leader = leader;
        Ok(Response::new(status))
    }

    async fn drain_agent(
        &self,
        req: Request<DrainAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        let drain = true;
        Ok(Response::new(self.set_drain(req, drain).await?))
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let who = auth::principal(&req)?;
        let (token, secret) = self.catalog.create_token(&who, req.into_inner()).await?;
        Ok(Response::new(CreateTokenResponse {
            token: Some(token),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        let kind = TokenKind::try_from(r.kind)
            .map_err(|_| Error::invalid(format!("kind: {} is not a token kind", r.kind)))?;
        let filter = who.list_filter(&r.project)?;
        let tokens = self
            .catalog
            .list_tokens(filter.as_deref(), kind, r.include_revoked);
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        check_reason(&r.reason)?;
        // A known id as given (another project's is refused by `revoke_token`); else a
        // name or unique id prefix among the tokens the caller may see.
        let id = if self.catalog.token(&r.id).is_some() {
            r.id
        } else {
            let filter = who.list_filter("")?;
            let visible = self
                .catalog
                .list_tokens(filter.as_deref(), TokenKind::Unspecified, true);
            crate::resolve::token(&visible, &r.id)?
        };
        validate::id("token", &id)?;
        Ok(Response::new(
            self.catalog.revoke_token(&who, &id, &r.reason).await?,
        ))
    }

    async fn who_am_i(
        &self,
        req: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let who = auth::principal(&req)?;
        Ok(Response::new(WhoAmIResponse {
            token: self.catalog.token(&who.token_id),
        }))
    }

    async fn list_audit(
        &self,
        req: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n if n <= 1000 => n as usize,
            n => return Err(Error::invalid(format!("limit {n} is larger than 1000")).into()),
        };
        let filter = who.list_filter(&r.project)?;
        if r.action.len() > 128 {
            return Err(Error::invalid("action is longer than 128 bytes").into());
        }
        let entries = audit::list(&self.store, filter.as_deref(), &r.action, limit).await?;
        // A filter naming no known action that matches nothing is a typo, not an empty log.
        if entries.is_empty()
            && !r.action.is_empty()
            && !scabbard_common::audit_actions::is_known(&r.action)
        {
            return Err(
                Error::invalid(scabbard_common::audit_actions::unknown_message(&r.action)).into(),
            );
        }
        Ok(Response::new(ListAuditResponse { entries }))
    }

    async fn list_breakers(
        &self,
        req: Request<ListBreakersRequest>,
    ) -> Result<Response<ListBreakersResponse>, Status> {
        let who = auth::principal(&req)?;
        let all = req.into_inner().all;
        let breakers = self
            .core
            .call(|reply| CoreMsg::ListBreakers { all, reply })
            .await?;
        Ok(Response::new(ListBreakersResponse {
            breakers: visible_breakers(&who, breakers),
        }))
    }

    async fn get_stats(
        &self,
        req: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        if r.window_ms < 0 {
            return Err(Error::invalid("window_ms must not be negative (0 = all kept)").into());
        }
        let filter = who.list_filter(&r.project)?;
        let samples = crate::metrics::stats::samples(scabbard_common::time::now_ms(), r.window_ms);
        let route = self.core.watch().borrow().clone();
        let mut projects = Vec::new();
        if let Route::Active(core) = route {
            let stats = core.stats().await?;
            projects = stats
                .projects
                .into_iter()
                .filter(|l| filter.as_deref().is_none_or(|p| p == l.project))
                .map(|l| ProjectQueue {
                    project: l.project,
                    queued: l.queued,
                    running: l.running,
                    oldest_queued_at_ms: l.oldest_queued_at_ms,
                })
                .collect();
        }
        Ok(Response::new(GetStatsResponse {
            samples,
            bucket_ms: crate::metrics::stats::BUCKET_MS,
            projects,
        }))
    }

    async fn reset_breaker(
        &self,
        req: Request<ResetBreakerRequest>,
    ) -> Result<Response<Breaker>, Status> {
        let who = auth::principal(&req)?;
        let key = req.into_inner().key;
        if key.is_empty() || key.len() > 256 {
            return Err(Error::invalid(
                "key is required: a breaker key as listed by ListBreakers (e.g. \"agent:<id>\")",
            )
            .into());
        }
        let (key, project) = breaker_to_reset(&who, key)?;
        let reset = self
            .core
            .ask(|reply| CoreMsg::ResetBreaker {
                key: key.clone(),
                reply,
            })
            .await;
        let breaker = match reset {
            // A breaker that never counted a failure is closed: resetting it is a no-op
            // (answered as a closed breaker that never tripped), not an error.
            Err(Error::NotFound { .. }) => {
                return Ok(Response::new(Breaker {
                    key,
                    state: BreakerState::Closed as i32,
                    ..Default::default()
                }));
            }
            r => r?,
        };
        let entry = audit::entry(&who, "breaker.reset", &key, &project, "");
        audit::record(&self.store, &entry).await?;
        Ok(Response::new(breaker))
    }

    async fn undrain_agent(
        &self,
        req: Request<UndrainAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        let drain = false;
        Ok(Response::new(self.set_drain(req, drain).await?))
    }

    async fn remove_agent(
        &self,
        req: Request<RemoveAgentRequest>,
    ) -> Result<Response<RemoveAgentResponse>, Status> {
        let who = auth::principal(&req)?;
        who.require_cluster_wide("removing an agent (agents serve every project)")?;
        let r = req.into_inner();
        check_reason(&r.reason)?;
        let id = self.agent_id(&r.id).await?;
        let entry = audit::entry(
            &who,
            "agent.remove",
            &id,
            auth::ALL_PROJECTS,
            r.reason.clone(),
        );
        let agent = self
            .core
            .ask(|reply| CoreMsg::RemoveAgent {
                id: id.clone(),
                reply,
            })
            .await?;
        // Its tokens go too: the worker, should it come back, registers anew.
        let mut revoked_tokens = 0;
        for t in self
            .catalog
            .list_tokens(None, TokenKind::Agent, false)
            .into_iter()
            .filter(|t| t.agent_id == id)
        {
            self.catalog
                .revoke_token(&who, &t.id, "its agent was removed")
                .await?;
            revoked_tokens += 1;
        }
        audit::record(&self.store, &entry).await?;
        Ok(Response::new(RemoveAgentResponse {
            agent: Some(agent),
            revoked_tokens,
        }))
    }
}

/// What of `breakers` the caller may see: its own project's, and the global (agent) ones —
/// for a project-bound caller without their last error, which may name other projects'
/// tasks.
fn visible_breakers(who: &Principal, breakers: Vec<Breaker>) -> Vec<Breaker> {
    breakers
        .into_iter()
        .filter_map(|mut b| match breakers::key_project(&b.key) {
            Some(Ok(p)) => who.may_access(p).then_some(b),
            Some(Err(())) => who.cluster_wide().then_some(b),
            None => {
                if !who.cluster_wide() {
                    b.last_error.clear();
                }
                Some(b)
            }
        })
        .collect()
}

/// The full key of the breaker the caller asks to reset, and its project for the audit
/// log. Global (agent) breakers need a cluster-wide operator; a project's breaker an
/// operator of that project (another project's answers NOT_FOUND, like an unknown one);
/// a bare name is the caller's project's breaker of that name.
fn breaker_to_reset(who: &Principal, key: String) -> Result<(String, String), Status> {
    match breakers::key_project(&key) {
        None => {
            who.require_cluster_wide(&format!(
                "resetting the global breaker {key:?} (it holds every project's tasks)"
            ))?;
            Ok((key, auth::ALL_PROJECTS.to_string()))
        }
        Some(Ok(p)) => {
            who.check_visible("breaker", &key, p)?;
            let project = p.to_string();
            Ok((key, project))
        }
        Some(Err(())) => {
            let project = who.resolve_project("")?;
            Ok((breakers::scoped_key(&project, &key), project))
        }
    }
}

impl AdminApi {
    /// `DrainAgent` and `UndrainAgent`: one rule (cluster-wide operator, a reason within
    /// bounds, the agent by id, prefix or name), audited after the core applied it.
    async fn set_drain<R: DrainRequest>(
        &self,
        req: Request<R>,
        drain: bool,
    ) -> Result<Agent, Status> {
        let who = auth::principal(&req)?;
        let verb = if drain { "draining" } else { "undraining" };
        who.require_cluster_wide(&format!("{verb} an agent (agents serve every project)"))?;
        let (id, reason) = req.into_inner().parts();
        check_reason(&reason)?;
        let id = self.agent_id(&id).await?;
        let action = if drain {
            "agent.drain"
        } else {
            "agent.undrain"
        };
        let entry = audit::entry(&who, action, &id, auth::ALL_PROJECTS, reason.clone());
        let agent = self
            .core
            .ask(|reply| {
                if drain {
                    CoreMsg::DrainAgent { id, reason, reply }
                } else {
                    CoreMsg::UndrainAgent { id, reason, reply }
                }
            })
            .await?;
        audit::record(&self.store, &entry).await?;
        Ok(agent)
    }
}

/// A drain or undrain request: the agent and the operator's reason.
trait DrainRequest {
    fn parts(self) -> (String, String);
}

impl DrainRequest for DrainAgentRequest {
    fn parts(self) -> (String, String) {
        (self.id, self.reason)
    }
}

impl DrainRequest for UndrainAgentRequest {
    fn parts(self) -> (String, String) {
        (self.id, self.reason)
    }
}
