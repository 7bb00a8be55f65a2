//! `scabbard agents list|drain`.

use anyhow::Result;
use scabbard_common::client::AdminServiceClient;
use scabbard_common::proto::{ClusterStatusRequest, DrainAgentRequest, ListAgentsRequest};

use crate::args::{AgentsCommand, Target};
use crate::output;

pub(crate) async fn agents(c: AgentsCommand) -> Result<u8> {
    match c {
        AgentsCommand::List { target } => {
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
            let agents = admin
                .list_agents(ListAgentsRequest {})
                .await
                .map_err(output::status)?
                .into_inner()
                .agents;
            output::agents(&agents);
        }
        AgentsCommand::Drain { target, id, reason } => {
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
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

pub(crate) async fn status(target: Target) -> Result<u8> {
    let mut admin = AdminServiceClient::new(super::connect_optional(&target).await?);
    let s = admin
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(output::status)?
        .into_inner();
    let leader = if s.leader.is_empty() {
        "(none elected)"
    } else {
        s.leader.as_str()
    };
    println!("leader:      {leader}");
    println!("answered by: {}", s.answered_by);
    let health = if s.store_healthy {
        "healthy".to_string()
    } else {
        format!("UNHEALTHY: {}", s.store_error)
    };
    println!("store:       {} ({health})", s.store_backend);
    println!("controllers:");
    for m in &s.members {
        println!(
            "  {}{}",
            m.address,
            if m.leader { "  (leader)" } else { "" }
        );
    }
    if s.answered_by_leader {
        println!(
            "tasks:       {} queued, {} assigned/running, {} total",
            s.queued_tasks, s.active_tasks, s.total_tasks
        );
        println!("agents:      {} connected", s.connected_agents);
    }
    Ok(if s.store_healthy && !s.leader.is_empty() {
        0
    } else {
        2
    })
}
