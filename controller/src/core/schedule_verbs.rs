//! Schedule verbs beyond create/pause/resume/delete: firing a schedule by hand
//! ([`State::trigger_schedule`]) and changing it ([`State::update_schedule`]).
//!
//! A manual trigger runs regardless of the overlap policy and of `paused`: an operator who
//! asks for a run gets one. Only QUEUE keeps its meaning (runs of that schedule go one at a
//! time, so the triggered run waits its turn in the schedule's concurrency group). The run
//! counts as the schedule's last run (so the next tick's overlap policy sees it) and in
//! `fired`; `last_tick_ms` and the cron plan are untouched. Its idempotency key comes from
//! the API, namespaced by schedule.

use std::collections::HashMap;

use scabbard_common::Error;
use scabbard_common::proto::{
    ConcurrencyGroup, OverlapPolicy, Schedule, TemplateRef, UpdateScheduleRequest, Workflow,
};
use tokio::sync::oneshot;
use tracing::info;

use super::{Reply, State, reply_effect};

impl State {
    pub(super) async fn trigger_schedule(
        &mut self,
        id: String,
        key: String,
        reply: Reply<(Workflow, bool, Schedule)>,
    ) {
        let Some(mut s) = self.schedules.get(&id).cloned() else {
            let _ = reply.send(Err(Error::not_found("schedule", id)));
            return;
        };
        let spec = s.spec.clone().unwrap_or_default();
        let params: HashMap<String, String> = spec.params.clone().into_iter().collect();
        let (mut wf, version) =
            match self
                .templates
                .render(&spec.template, spec.template_version, &params)
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            };
        if spec.overlap() == OverlapPolicy::Queue && wf.concurrency.is_none() {
            wf.concurrency = Some(ConcurrencyGroup {
                key: format!("schedule:{}", s.id),
                limit: 1,
            });
        }
        let now = self.clock.now_ms();
        let template = TemplateRef {
            name: spec.template.clone(),
            version,
            params: spec.params.clone(),
            schedule_id: s.id.clone(),
            scheduled_for_ms: now,
        };
        // The typed error, should the workflow be refused (its reply is sent at once then).
        let (tx, mut rx) = oneshot::channel();
        let created = self
            .create_workflow(
                wf,
                key,
                s.project.clone(),
                Some(template),
                false,
                (None, String::new()),
                Some(tx),
            )
            .await;
        let (run, existing) = match created {
            Ok(r) => r,
            Err(msg) => {
                let e = match rx.try_recv() {
                    Ok(Err(e)) => e,
                    _ => Error::internal(msg),
                };
                let _ = reply.send(Err(e));
                return;
            }
        };
        if !existing {
            s.fired += 1;
            s.last_workflow_id = run.id.clone();
            s.last_outcome = format!("triggered by hand: started {}", run.id);
            info!(schedule = %s.id, workflow = %run.id, "schedule triggered by hand");
        }
        self.schedules.insert(s.id.clone(), s.clone());
        // Answered once this write (after the workflow's) is durable.
        self.persist_schedule(&s, vec![reply_effect(reply, (run, existing, s.clone()))])
            .await;
    }

    /// Applies the fields of `req` that are set, validates the result as a create would,
    /// and recomputes the next tick. A new cron expression or time zone (or a resume)
    /// plans from now: ticks of the old plan that were missed do not run.
    pub(super) async fn update_schedule(
        &mut self,
        req: UpdateScheduleRequest,
        reply: Reply<Schedule>,
    ) {
        let Some(mut s) = self.schedules.get(&req.id).cloned() else {
            let _ = reply.send(Err(Error::not_found("schedule", req.id)));
            return;
        };
        let mut spec = s.spec.clone().unwrap_or_default();
        let replan = req.cron.as_ref().is_some_and(|c| *c != spec.cron)
            || req.timezone.as_ref().is_some_and(|t| *t != spec.timezone)
            || (req.paused == Some(false) && s.paused);
        if let Some(v) = req.name {
            spec.name = v;
        }
        if let Some(v) = req.cron {
            spec.cron = v;
        }
        if let Some(v) = req.timezone {
            spec.timezone = v;
        }
        if let Some(v) = req.template {
            spec.template = v;
        }
        if let Some(v) = req.template_version {
            spec.template_version = v;
        }
        if let Some(p) = req.params {
            spec.params = p.values;
        }
        if let Some(v) = req.overlap {
            if v == OverlapPolicy::Unspecified as i32 {
                let _ = reply.send(Err(Error::invalid(
                    "overlap: OVERLAP_POLICY_UNSPECIFIED is not a policy: use SKIP, QUEUE or CANCEL_PREVIOUS",
                )));
                return;
            }
            spec.overlap = v;
        }
        if let Some(v) = req.catch_up_window_ms {
            spec.catch_up_window_ms = v;
        }
        let cron = match self.check_schedule(&spec, &s.project, Some(&s.id)) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if let Some(p) = req.paused {
            s.paused = p;
        }
        if replan {
            s.last_tick_ms = s.last_tick_ms.max(self.clock.now_ms());
        }
        s.next_tick_ms = if s.paused {
            0
        } else {
            cron.next_after(s.last_tick_ms).unwrap_or(0)
        };
        s.spec = Some(spec);
        info!(schedule = %s.id, cron = cron.expr(), "schedule updated");
        self.crons.insert(s.id.clone(), cron);
        self.schedules.insert(s.id.clone(), s.clone());
        self.persist_schedule(&s, vec![reply_effect(reply, s.clone())])
            .await;
    }
}
