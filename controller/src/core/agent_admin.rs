//! What operators do to agents besides draining them: undraining (back to service) and
//! removing a lost one. A drain is the operator's (`StoredAgent.drained`, persisted), apart
//! from a worker saying it shuts down (`Agent.draining` for that session only): both stop
//! new work, only the first outlives the session and a controller restart.

use prost::Message;
use scabbard_common::Error;
use scabbard_common::proto::{Agent, ControllerMessage, StoredAgent, Undrain, controller_message};
use tracing::info;

use super::presence::PRESENCE_PREFIX;
use super::{AGENT_PREFIX, Reply, State, agent_effect, reply_effect};

/// The stored form of an agent: `agent.draining` is the operator's drain only (a shutdown
/// is not carried over to the next session or leader).
pub(super) fn record(stored: &StoredAgent) -> Vec<u8> {
    let mut s = stored.clone();
    if let Some(a) = s.agent.as_mut() {
        a.draining = s.drained;
    }
    s.encode_to_vec()
}

impl State {
    /// Ends an operator's drain: the agent gets work again (and is told so, when
    /// connected). Undraining an agent that is not drained changes nothing.
    pub(super) async fn undrain(&mut self, id: String, reason: String, reply: Reply<Agent>) {
        let Some(entry) = self.agents.get_mut(&id) else {
            let _ = reply.send(Err(Error::not_found("agent", id)));
            return;
        };
        entry.stored.drained = false;
        if let Some(a) = entry.stored.agent.as_mut() {
            a.draining = false;
        }
        let mut effects = Vec::new();
        if let Some(conn) = &entry.conn {
            effects.push(agent_effect(
                conn.tx.clone(),
                ControllerMessage {
                    msg: Some(controller_message::Msg::Undrain(Undrain { reason })),
                },
            ));
        }
        let value = record(&entry.stored);
        self.sync_agent(&id);
        let view = self.agent_view(self.agents.get(&id).expect("present"));
        info!(agent = %id, "agent undrained");
        effects.insert(0, reply_effect(reply, view));
        self.write(format!("{AGENT_PREFIX}{id}"), Some(value), effects)
            .await;
    }

    /// Forgets a LOST agent: its record and presence key go, in one commit. A connected
    /// agent, or one still within its grace period, is refused (`FAILED_PRECONDITION`).
    pub(super) async fn remove_agent(&mut self, id: String, reply: Reply<Agent>) {
        let Some(entry) = self.agents.get(&id) else {
            let _ = reply.send(Err(Error::not_found("agent", id)));
            return;
        };
        let view = self.agent_view(entry);
        let ttl_ms = self.cfg.agent_lease_ttl().as_millis();
        if entry.conn.is_some() {
            let _ = reply.send(Err(Error::FailedPrecondition(format!(
                "agent {id} ({}) is connected: drain it (`scabbard agents drain {id}`) and stop its worker first; only a LOST agent (no contact for the agent lease, {ttl_ms} ms) can be removed",
                view.name
            ))));
            return;
        }
        if !entry.lost {
            let _ = reply.send(Err(Error::FailedPrecondition(format!(
                "agent {id} ({}) is disconnected but may still come back: it can be removed once it is LOST (no contact for the agent lease, {ttl_ms} ms)",
                view.name
            ))));
            return;
        }
        let running: Vec<String> = entry.running.iter().cloned().collect();
        self.agents.remove(&id);
        self.sync_agent(&id);
        for task in running {
            // Lost agents hold none (the sweeper requeued them); never leave one behind.
            self.requeue_or_fail(&task, &format!("agent {id} was removed"))
                .await;
        }
        info!(agent = %id, name = %view.name, "lost agent removed");
        self.write_with(
            format!("{AGENT_PREFIX}{id}"),
            None,
            vec![(format!("{PRESENCE_PREFIX}{id}"), None)],
            vec![reply_effect(reply, view)],
        )
        .await;
    }
}
