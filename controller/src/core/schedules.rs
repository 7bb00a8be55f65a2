//! Schedules in the core: cron ticks that run a template with parameters.
//!
//! Only the leader's core fires. Each tick T is handled once: the run it starts carries the
//! idempotency key `schedule-<id>-<T>`, and the schedule's `last_tick_ms` moves past T in the
//! same commit group. After downtime or a failover every missed tick still inside the
//! catch-up window runs, oldest first (each under the overlap policy); older ones are
//! counted as skipped. A new leader that re-handles a tick whose run already exists finds
//! that run by its key, so nothing doubles. The time comes from the configured clock (a
//! manual one in tests).

use std::collections::HashMap;

use prost::Message;
use scabbard_common::proto::{
    ConcurrencyGroup, OverlapPolicy, Schedule, ScheduleSpec, TemplateRef,
};
use scabbard_common::{Error, Result};
use tracing::{info, warn};

use super::workflows::workflow_final;
use super::{Reply, State, reply_effect};
use crate::schedules::plan::{self, Cron, OverlapAction};

/// Store key prefix of schedule records.
pub(crate) const SCHEDULE_PREFIX: &str = "schedules/";

/// Most ticks handled for one schedule per pass (the rest follow on the next pass).
const TICKS_PER_PASS: usize = 100;

/// Longest catch-up window accepted: a week.
const MAX_WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;

impl State {
    pub(super) async fn create_schedule(
        &mut self,
        spec: ScheduleSpec,
        project: String,
        paused: bool,
        reply: Reply<Schedule>,
    ) {
        let cron = match self.check_schedule(&spec, &project, None) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let id = match self.ids.generate() {
            Ok(u) => u.to_string().to_lowercase(),
            Err(e) => {
                let _ = reply.send(Err(Error::internal(e)));
                return;
            }
        };
        let now = self.clock.now_ms();
        let mut s = Schedule {
            id: id.clone(),
            spec: Some(spec),
            project,
            paused,
            created_at_ms: now,
            // Ticks strictly after creation.
            last_tick_ms: now,
            ..Default::default()
        };
        s.next_tick_ms = if paused {
            0
        } else {
            cron.next_after(now).unwrap_or(0)
        };
        info!(schedule = %id, cron = cron.expr(), "schedule created");
        self.crons.insert(id.clone(), cron);
        self.schedules.insert(id.clone(), s.clone());
        self.persist_schedule(&s, vec![reply_effect(reply, s.clone())])
            .await;
    }

    /// Validates a new schedule (or, with `except`, that schedule's new spec: it does not
    /// clash with its own name or count against the cap); returns its parsed cron
    /// expression.
    pub(super) fn check_schedule(
        &self,
        spec: &ScheduleSpec,
        project: &str,
        except: Option<&str>,
    ) -> Result<Cron> {
        if spec.name.is_empty()
            || spec.name.len() > 64
            || !spec
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::invalid(format!(
                "name {:?} is invalid: 1..64 letters, digits, '-' or '_'",
                spec.name
            )));
        }
        if self
            .schedules
            .values()
            .filter(|s| Some(s.id.as_str()) != except)
            .any(|s| s.project == project && s.spec.as_ref().is_some_and(|x| x.name == spec.name))
        {
            return Err(Error::AlreadyExists(format!(
                "project {project:?} already has a schedule named {:?}",
                spec.name
            )));
        }
        let cron = Cron::parse(&spec.cron, &spec.timezone).map_err(Error::invalid)?;
        let min = self.cfg.min_schedule_interval_ms as i64;
        if let Some(gap) = cron.min_interval_ms(self.clock.now_ms())
            && gap < min
        {
            return Err(Error::invalid(format!(
                "cron {:?} fires every {} s; the minimum interval between ticks is {} s (config key min_schedule_interval_ms)",
                spec.cron,
                gap as f64 / 1000.0,
                min as f64 / 1000.0
            )));
        }
        let cap = self.cfg.max_schedules_per_project;
        if cap > 0
            && except.is_none()
            && self
                .schedules
                .values()
                .filter(|s| s.project == project)
                .count()
                >= cap as usize
        {
            return Err(Error::ResourceExhausted(format!(
                "project {project:?} already has {cap} schedules, the most allowed (config key max_schedules_per_project): delete one first"
            )));
        }
        if OverlapPolicy::try_from(spec.overlap).is_err() {
            return Err(Error::invalid(format!(
                "overlap {} is unknown: use SKIP, QUEUE or CANCEL_PREVIOUS",
                spec.overlap
            )));
        }
        if spec.catch_up_window_ms > MAX_WINDOW_MS {
            return Err(Error::invalid(format!(
                "catch_up_window_ms {} is longer than a week",
                spec.catch_up_window_ms
            )));
        }
        if spec.template.is_empty() {
            return Err(Error::invalid(
                "template is required: the template each tick runs",
            ));
        }
        // A dry run now: a schedule that could never start a run is refused up front.
        let params: HashMap<String, String> = spec.params.clone().into_iter().collect();
        let (mut wf, _) = self
            .templates
            .render(&spec.template, spec.template_version, &params)?;
        crate::workflow::validate::workflow_spec(&mut wf, &self.cfg)?;
        Ok(cron)
    }

    pub(super) fn get_schedule(&self, id: &str) -> Result<Schedule> {
        self.schedules
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found("schedule", id))
    }

    pub(super) fn list_schedules(&self, project: &str) -> Vec<Schedule> {
        self.schedules
            .values()
            .filter(|s| project.is_empty() || s.project == project)
            .cloned()
            .collect()
    }

    /// Pauses (`pause`) or resumes a schedule. Resuming starts from now: ticks missed while
    /// paused do not run.
    pub(super) async fn pause_schedule(&mut self, id: String, pause: bool, reply: Reply<Schedule>) {
        let now = self.clock.now_ms();
        let Some(s) = self.schedules.get_mut(&id) else {
            let _ = reply.send(Err(Error::not_found("schedule", id)));
            return;
        };
        if s.paused != pause {
            s.paused = pause;
            if pause {
                s.next_tick_ms = 0;
            } else {
                s.last_tick_ms = s.last_tick_ms.max(now);
                s.next_tick_ms = self
                    .crons
                    .get(&id)
                    .and_then(|c| c.next_after(s.last_tick_ms))
                    .unwrap_or(0);
            }
        }
        let s = s.clone();
        self.persist_schedule(&s, vec![reply_effect(reply, s.clone())])
            .await;
    }

    pub(super) async fn delete_schedule(&mut self, id: String, reply: Reply<()>) {
        if self.schedules.remove(&id).is_none() {
            let _ = reply.send(Err(Error::not_found("schedule", id)));
            return;
        }
        self.crons.remove(&id);
        self.write(
            format!("{SCHEDULE_PREFIX}{id}"),
            None,
            vec![reply_effect(reply, ())],
        )
        .await;
    }

    /// Handles every due tick of every active schedule.
    pub(crate) async fn fire_schedules(&mut self) {
        let now = self.clock.now_ms();
        let due: Vec<String> = self
            .schedules
            .values()
            .filter(|s| !s.paused && s.next_tick_ms > 0 && s.next_tick_ms <= now)
            .map(|s| s.id.clone())
            .collect();
        for id in due {
            self.fire_one(&id, now).await;
        }
    }

    async fn fire_one(&mut self, id: &str, now: i64) {
        let (Some(mut s), Some(cron)) =
            (self.schedules.get(id).cloned(), self.crons.get(id).cloned())
        else {
            return;
        };
        let spec = s.spec.clone().unwrap_or_default();
        let window = plan::effective_window(spec.catch_up_window_ms) as i64;
        let mut handled = 0;
        while handled < TICKS_PER_PASS {
            let Some(tick) = cron.next_after(s.last_tick_ms) else {
                break;
            };
            if tick > now {
                break;
            }
            handled += 1;
            s.last_tick_ms = tick;
            if now - tick > window {
                s.skipped += 1;
                s.last_outcome = format!("tick {tick}: skipped, older than the catch-up window");
                continue;
            }
            self.handle_tick(&mut s, &spec, tick).await;
        }
        if handled == TICKS_PER_PASS
            && cron
                .next_after(s.last_tick_ms)
                .is_some_and(|t| now - t > window)
        {
            // Far behind: jump to the last tick too old to run, counting every tick jumped
            // over (up to and including it) as skipped.
            if let Some(edge) = cron
                .at_or_before(now - window - 1)
                .filter(|t| *t > s.last_tick_ms)
            {
                let d = plan::due(&cron, s.last_tick_ms, s.created_at_ms, edge, u64::MAX);
                s.skipped += d.missed + u64::from(d.fire.is_some());
                s.last_tick_ms = edge;
            }
        }
        s.next_tick_ms = cron.next_after(s.last_tick_ms).unwrap_or(0);
        self.schedules.insert(id.to_string(), s.clone());
        self.persist_schedule(&s, Vec::new()).await;
    }

    /// One tick: the overlap policy, then the run.
    async fn handle_tick(&mut self, s: &mut Schedule, spec: &ScheduleSpec, tick: i64) {
        let previous = (!s.last_workflow_id.is_empty())
            .then(|| self.workflows.get(&s.last_workflow_id))
            .flatten()
            .filter(|w| !workflow_final(w.state()))
            .map(|w| w.id.clone());
        let action = plan::overlap(spec.overlap(), previous.is_some());
        if action == OverlapAction::Skip {
            s.skipped += 1;
            s.last_outcome = format!(
                "tick {tick}: skipped, run {} still going",
                previous.unwrap_or_default()
            );
            return;
        }
        if action == OverlapAction::CancelPreviousThenStart
            && let Some(prev) = previous.as_deref()
        {
            self.cancel_for_schedule(prev, &s.id).await;
        }
        let params: HashMap<String, String> = spec.params.clone().into_iter().collect();
        let (mut wf, version) = match self.templates.render(
            &spec.template,
            spec.template_version,
            &params,
        ) {
            Ok(r) => r,
            Err(e) => {
                s.skipped += 1;
                s.last_outcome = format!("tick {tick}: not started: {e}");
                warn!(schedule = %s.id, tick, error = %e, "schedule tick could not render its template");
                return;
            }
        };
        if spec.overlap() == OverlapPolicy::Queue && wf.concurrency.is_none() {
            // Runs of this schedule go one at a time: later ones wait (PENDING).
            wf.concurrency = Some(ConcurrencyGroup {
                key: format!("schedule:{}", s.id),
                limit: 1,
            });
        }
        let template = TemplateRef {
            name: spec.template.clone(),
            version,
            params: spec.params.clone(),
            schedule_id: s.id.clone(),
            scheduled_for_ms: tick,
        };
        let key = format!("schedule-{}-{tick}", s.id);
        match self
            .create_workflow(
                wf,
                key,
                s.project.clone(),
                Some(template),
                false,
                (None, String::new()),
                None,
            )
            .await
        {
            Ok((run, existing)) => {
                s.fired += u64::from(!existing);
                s.last_workflow_id = run.id.clone();
                s.last_outcome = match action {
                    OverlapAction::Queue => format!(
                        "tick {tick}: queued as {} behind {}",
                        run.id,
                        previous.unwrap_or_default()
                    ),
                    OverlapAction::CancelPreviousThenStart => format!(
                        "tick {tick}: started {}, cancelled {}",
                        run.id,
                        previous.unwrap_or_default()
                    ),
                    _ => format!("tick {tick}: started {}", run.id),
                };
                info!(schedule = %s.id, tick, workflow = %run.id, existing, "schedule fired");
            }
            Err(e) => {
                s.skipped += 1;
                s.last_outcome = format!("tick {tick}: not started: {e}");
                warn!(schedule = %s.id, tick, error = %e, "schedule tick could not start its run");
            }
        }
    }

    async fn cancel_for_schedule(&mut self, workflow_id: &str, schedule_id: &str) {
        if let Some(w) = self.workflows.get_mut(workflow_id) {
            w.cancel_requested = true;
            w.message = format!("cancelled: a newer run of schedule {schedule_id} started");
        }
        self.advance(workflow_id).await;
    }

    /// Loads schedules (on start and after a rebuild).
    pub(super) async fn recover_schedules(&mut self) -> Result<()> {
        self.schedules.clear();
        self.crons.clear();
        for kv in self.load_prefix(SCHEDULE_PREFIX).await? {
            let s = Schedule::decode(kv.value.as_slice())
                .map_err(|e| Error::internal(format!("corrupt schedule record {}: {e}", kv.key)))?;
            let spec = s.spec.clone().unwrap_or_default();
            match Cron::parse(&spec.cron, &spec.timezone) {
                Ok(c) => {
                    self.crons.insert(s.id.clone(), c);
                }
                Err(e) => {
                    warn!(schedule = %s.id, error = %e, "stored schedule has a bad cron expression; it will not fire")
                }
            }
            self.schedules.insert(s.id.clone(), s);
        }
        Ok(())
    }

    pub(super) async fn persist_schedule(&mut self, s: &Schedule, effects: Vec<super::Effect>) {
        self.write(
            format!("{SCHEDULE_PREFIX}{}", s.id),
            Some(s.encode_to_vec()),
            effects,
        )
        .await;
    }
}
