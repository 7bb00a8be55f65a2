//! `AdminService`.

use std::sync::Arc;

use scabbard_common::proto::{
    Agent, ClusterStatusRequest, ClusterStatusResponse, ControllerMember, DrainAgentRequest,
    ListAgentsRequest, ListAgentsResponse, admin_service_server::AdminService,
};
use tonic::{Request, Response, Status};

use crate::core::{CoreMsg, CoreRouter, Route, validate};
use crate::membership::MEMBER_PREFIX;
use crate::store::Store;

/// Implementation of `scabbard.v1.AdminService`.
pub struct AdminApi {
    pub(crate) core: CoreRouter,
    pub(crate) store: Arc<dyn Store>,
    /// This controller's advertised address.
    pub(crate) advertise: String,
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_agents(
        &self,
        _req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self.core.ask(|reply| CoreMsg::ListAgents { reply }).await?;
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
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
        if let Some(core) = active
            && let Ok(stats) = core.stats().await
        {
            status.queued_tasks = stats.queued as u64;
            status.active_tasks = stats.active as u64;
            status.total_tasks = stats.total as u64;
            status.connected_agents = stats.connected_agents as u32;
        }
        status.leader = leader;
        Ok(Response::new(status))
    }

    async fn drain_agent(
        &self,
        req: Request<DrainAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        let r = req.into_inner();
        validate::id("agent", &r.id)?;
        let agent = self
            .core
            .ask(|reply| CoreMsg::DrainAgent {
                id: r.id,
                reason: r.reason,
                reply,
            })
            .await?;
        Ok(Response::new(agent))
    }
}
