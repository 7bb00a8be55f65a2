//! `scabbard agents list|drain`.

use anyhow::Result;
use scabbard_common::client::{self, AdminServiceClient};
use scabbard_common::proto::{DrainAgentRequest, ListAgentsRequest};

use crate::args::AgentsCommand;
use crate::output;

pub(crate) async fn agents(c: AgentsCommand) -> Result<u8> {
    match c {
        AgentsCommand::List { target } => {
            let mut admin = AdminServiceClient::new(client::connect(&target.controller).await?);
            let agents = admin
                .list_agents(ListAgentsRequest {})
                .await
                .map_err(output::status)?
                .into_inner()
                .agents;
            output::agents(&agents);
        }
        AgentsCommand::Drain { target, id, reason } => {
            let mut admin = AdminServiceClient::new(client::connect(&target.controller).await?);
            let a = admin
                .drain_agent(DrainAgentRequest { id, reason })
                .await
                .map_err(output::status)?
                .into_inner();
            println!("agent {} is draining ({} running)", a.id, a.running);
        }
    }
    Ok(0)
}
