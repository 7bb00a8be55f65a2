//! `AdminService`.

use scabbard_common::proto::{
    Agent, DrainAgentRequest, ListAgentsRequest, ListAgentsResponse,
    admin_service_server::AdminService,
};
use tonic::{Request, Response, Status};

use crate::core::{CoreMsg, CoreRouter, validate};

/// Implementation of `scabbard.v1.AdminService`.
pub struct AdminApi {
    pub(crate) core: CoreRouter,
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
