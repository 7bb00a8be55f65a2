//! `scabbard agents list|drain|undrain|remove`, `scabbard breakers list|reset`, `scabbard status`.

use anyhow::Result;
use scabbard_common::client::AdminServiceClient;
use scabbard_common::proto::{
    BreakerState, ClusterStatusRequest, DrainAgentRequest, ListAgentsRequest, ListBreakersRequest,
    RemoveAgentRequest, ResetBreakerRequest, UndrainAgentRequest,
};

use crate::args::{AgentsCommand, BreakersCommand, Target};
use crate::output::{self, catalog};
use crate::render;

pub(crate) async fn agents(c: AgentsCommand) -> Result<u8> {
    match c {
        AgentsCommand::List { target } => {
            let admin = AdminServiceClient::new(super::connect(&target).await?);
            let agents = crate::retry::idempotent(|| {
                let mut c = admin.clone();
                async move { c.list_agents(ListAgentsRequest {}).await }
            })
            .await
            .map_err(output::status)?
            .into_inner()
            .agents;
            render::show(&agents, || output::agents(&agents))?;
        }
        AgentsCommand::Drain { target, id, reason } => {
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
            let a = admin
                .drain_agent(DrainAgentRequest { id, reason })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&a, || {
                say!("agent {} is draining ({} running)", a.id, a.running)
            })?;
        }
        AgentsCommand::Undrain { target, id, reason } => {
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
            let a = admin
                .undrain_agent(UndrainAgentRequest { id, reason })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&a, || {
                say!("agent {} ({}) is back in service", a.id, a.name)
            })?;
        }
        AgentsCommand::Remove { target, id, reason } => {
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
            let r = admin
                .remove_agent(RemoveAgentRequest { id, reason })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&r, || {
                let a = r.agent.clone().unwrap_or_default();
                say!(
                    "agent {} ({}) removed; {} agent token(s) revoked",
                    a.id,
                    a.name,
                    r.revoked_tokens
                )
            })?;
        }
    }
    Ok(0)
}

pub(crate) async fn breakers(c: BreakersCommand) -> Result<u8> {
    match c {
        BreakersCommand::List { target, all } => {
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
            let bs = admin
                .list_breakers(ListBreakersRequest { all })
                .await
                .map_err(output::status)?
                .into_inner()
                .breakers;
            render::show(&bs, || {
                if bs.is_empty() {
                    say!("no {}breakers", if all { "" } else { "open or half-open " });
                } else {
                    catalog::breakers(&bs);
                }
            })?;
        }
        BreakersCommand::Reset { target, key } => {
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
            let b = admin
                .reset_breaker(ResetBreakerRequest { key })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&b, || {
                if b.trips == 0 && b.opened_at_ms == 0 {
                    say!(
                        "breaker {} has never opened: nothing to reset (it is closed)",
                        crate::printable::printable(&b.key)
                    )
                } else {
                    say!("breaker {} is {}", b.key, catalog::breaker_state(&b))
                }
            })?;
        }
    }
    Ok(0)
}

pub(crate) async fn status(target: Target) -> Result<u8> {
    let admin = AdminServiceClient::new(super::connect_optional(&target).await?);
    let s = crate::retry::idempotent(|| {
        let mut c = admin.clone();
        async move { c.cluster_status(ClusterStatusRequest {}).await }
    })
    .await
    .map_err(output::status)?
    .into_inner();
    let code = if s.store_healthy && !s.leader.is_empty() {
        0
    } else {
        crate::exit::UNAVAILABLE
    };
    if render::structured() {
        render::show(&s, || ())?;
        return Ok(code);
    }
    let leader = if s.leader.is_empty() {
        "(none elected)"
    } else {
        s.leader.as_str()
    };
    say!("leader:      {leader}");
    say!("answered by: {}", s.answered_by);
    let health = if s.store_healthy {
        "healthy".to_string()
    } else {
        format!("UNHEALTHY: {}", s.store_error)
    };
    say!("store:       {} ({health})", s.store_backend);
    say!("controllers:");
    for m in &s.members {
        say!(
            "  {}{}",
            m.address,
            if m.leader { "  (leader)" } else { "" }
        );
    }
    if s.token_needed {
        say!(
            "tasks, agents, workflows, breakers: a token is needed to see these \
             (`scabbard login`, or SCABBARD_TOKEN)"
        );
    } else if s.answered_by_leader {
        say!(
            "tasks:       {} queued, {} assigned/running, {} total",
            s.queued_tasks,
            s.active_tasks,
            s.total_tasks
        );
        say!("agents:      {} connected", s.connected_agents);
        say!(
            "workflows:   {} running, {} pending",
            s.running_workflows,
            s.pending_workflows
        );
        say!("waiting:     {}", output::placement::summary(&s.waiting));
        let dispatched = s.cache_affinity_hits + s.cache_affinity_misses;
        if dispatched > 0 {
            say!(
                "cache:       {:.0}% of {dispatched} container tasks went to a warm engine",
                100.0 * s.cache_affinity_hits as f64 / dispatched as f64
            );
        }
        if let Some(r) = &s.retention {
            retention(r);
        }
        let open: Vec<_> = s
            .breakers
            .iter()
            .filter(|b| b.state() != BreakerState::Closed)
            .cloned()
            .collect();
        if open.is_empty() {
            say!("breakers:    all closed");
        } else {
            say!("breakers:    {} not closed", open.len());
            catalog::breakers(&open);
        }
    }
    Ok(code)
}

/// The retention lines of `scabbard status`.
fn retention(r: &scabbard_common::proto::RetentionStatus) {
    let last = if r.last_sweep_at_ms > 0 {
        output::ago(r.last_sweep_at_ms)
    } else {
        "not yet".into()
    };
    say!(
        "retention:   {} days by default; last sweep {last}; {} expired left for later",
        r.default_retention_days,
        r.backlog
    );
    say!(
        "  deleted:   {} tasks, {} workflows, {} logs, {} artifacts, {} audit entries, {} idempotency keys",
        r.tasks_deleted,
        r.workflows_deleted,
        r.logs_deleted,
        r.artifacts_deleted,
        r.audit_deleted,
        r.idempotency_keys_deleted
    );
    let oldest = if r.oldest_finished_at_ms > 0 {
        format!("finished {}", output::ago(r.oldest_finished_at_ms))
    } else {
        "none kept".into()
    };
    say!("  oldest:    {oldest}");
}
