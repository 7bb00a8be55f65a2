//! Reruns: a new task (or workflow) made from a finished or running one's spec.
//!
//! The source's spec is what it was submitted with, as stored: its `secret_env` values are
//! opened here (the only place holding the key) and the new submit seals them again, so
//! a rerun runs with the same secrets without any client ever seeing them. Input artifacts
//! named `<task id>/<name>` are resolved again (the producer must still be a succeeded
//! task of the project). The new record's `rerun_of` names the source; everything else
//! (id, idempotency key, trace context, attempts) is new. The API has already checked that
//! the caller may read the source and submit in its project.

use scabbard_common::proto::{Task, TaskSpec, TemplateRef, Workflow};

use super::{Reply, State};

impl State {
    pub(super) async fn rerun_task(
        &mut self,
        source: Task,
        key: String,
        trace: super::trace::Trace,
        reply: Reply<(Task, bool)>,
    ) {
        let mut spec = source.spec.unwrap_or_default();
        if let Err(e) = self.reopen(&mut spec) {
            let _ = reply.send(Err(e));
            return;
        }
        let origin = super::Origin {
            trace,
            rerun_of: source.id,
            audit: None,
        };
        self.submit(spec, key, source.project, origin, reply).await;
    }

    pub(super) async fn rerun_workflow(
        &mut self,
        source: Workflow,
        key: String,
        trace: super::trace::Trace,
        reply: Reply<(Workflow, bool)>,
    ) {
        let mut spec = source.spec.unwrap_or_default();
        for t in spec.tasks.iter_mut() {
            if let Some(s) = t.spec.as_mut()
                && let Err(e) = self.reopen(s)
            {
                let _ = reply.send(Err(e));
                return;
            }
        }
        // Same template and parameters; a rerun is not a schedule's tick.
        let template = source.template.map(|t| TemplateRef {
            schedule_id: String::new(),
            scheduled_for_ms: 0,
            ..t
        });
        let _ = self
            .create_workflow(
                spec,
                key,
                source.project,
                template,
                false,
                (trace, source.id),
                Some(reply),
            )
            .await;
    }

    /// A stored spec made submittable again: secrets opened, resolved inputs forgotten.
    fn reopen(&self, spec: &mut TaskSpec) -> scabbard_common::Result<()> {
        self.secrets.unseal_spec(spec)?;
        for input in spec.inputs.iter_mut() {
            input.artifact = None;
        }
        Ok(())
    }
}
