//! `ScheduleService`: cron schedules that run a template (created, listed, paused, resumed,
//! deleted); the leader fires them.

use std::sync::Arc;

use scabbard_common::Error;
use scabbard_common::proto::{
    CreateScheduleRequest, DeleteScheduleRequest, DeleteScheduleResponse, GetScheduleRequest,
    ListSchedulesRequest, ListSchedulesResponse, PauseScheduleRequest, ResumeScheduleRequest,
    Schedule, TriggerScheduleRequest, TriggerScheduleResponse, UpdateScheduleRequest,
    schedule_service_server::ScheduleService,
};
use tonic::{Request, Response, Status};

use crate::audit;
use crate::auth::{self, Catalog, Principal};
use crate::core::{CoreMsg, CoreRouter, validate};

/// Implementation of `scabbard.v1.ScheduleService`.
pub struct ScheduleApi {
    pub(crate) core: CoreRouter,
    pub(crate) catalog: Arc<Catalog>,
}

impl ScheduleApi {
    /// The schedule `input` names (an id, a name or a unique id prefix; see
    /// `crate::resolve`), if the caller may see it.
    async fn visible(&self, who: &Principal, input: String) -> Result<Schedule, Status> {
        let id = if input.len() == 26 && validate::id("schedule", &input).is_ok() {
            input
        } else {
            let project = who.list_filter("")?.unwrap_or_default();
            let mine = self
                .core
                .call(|reply| CoreMsg::ListSchedules { project, reply })
                .await?;
            crate::resolve::schedule(&mine, &input)?
        };
        validate::id("schedule", &id)?;
        let s = self
            .core
            .ask(|reply| CoreMsg::GetSchedule { id, reply })
            .await?;
        who.check_visible("schedule", &s.id, &s.project)?;
        Ok(s)
    }

    async fn audit(&self, who: &Principal, action: &str, s: &Schedule) {
        let name = s.spec.as_ref().map(|x| x.name.clone()).unwrap_or_default();
        let entry = audit::entry(who, action, &s.id, &s.project, name);
        if let Err(e) = audit::record(self.catalog.store(), &entry).await {
            tracing::warn!(error = %e, schedule = %s.id, action, "could not write the audit log");
        }
    }

    async fn pause(&self, who: &Principal, id: String, pause: bool) -> Result<Schedule, Status> {
        let id = self.visible(who, id).await?.id;
        let s = self
            .core
            .ask(|reply| CoreMsg::PauseSchedule { id, pause, reply })
            .await?;
        self.audit(
            who,
            if pause {
                "schedule.pause"
            } else {
                "schedule.resume"
            },
            &s,
        )
        .await;
        Ok(s)
    }
}

#[tonic::async_trait]
impl ScheduleService for ScheduleApi {
    async fn create(
        &self,
        req: Request<CreateScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| Error::invalid("spec is required: name, cron, template (and params)"))?;
        let project = who.resolve_project(&r.project)?;
        if self.catalog.project(&project).is_none() {
            return Err(Error::not_found("project", project).into());
        }
        let s = self
            .core
            .ask(|reply| CoreMsg::CreateSchedule {
                spec,
                project,
                paused: r.paused,
                reply,
            })
            .await?;
        self.audit(&who, "schedule.create", &s).await;
        Ok(Response::new(s))
    }

    async fn get(&self, req: Request<GetScheduleRequest>) -> Result<Response<Schedule>, Status> {
        let who = auth::principal(&req)?;
        Ok(Response::new(
            self.visible(&who, req.into_inner().id).await?,
        ))
    }

    async fn list(
        &self,
        req: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        let who = auth::principal(&req)?;
        let project = who
            .list_filter(&req.into_inner().project)?
            .unwrap_or_default();
        let schedules = self
            .core
            .call(|reply| CoreMsg::ListSchedules { project, reply })
            .await?;
        Ok(Response::new(ListSchedulesResponse { schedules }))
    }

    async fn pause(
        &self,
        req: Request<PauseScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let who = auth::principal(&req)?;
        Ok(Response::new(
            self.pause(&who, req.into_inner().id, true).await?,
        ))
    }

    async fn resume(
        &self,
        req: Request<ResumeScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let who = auth::principal(&req)?;
        Ok(Response::new(
            self.pause(&who, req.into_inner().id, false).await?,
        ))
    }

    async fn delete(
        &self,
        req: Request<DeleteScheduleRequest>,
    ) -> Result<Response<DeleteScheduleResponse>, Status> {
        let who = auth::principal(&req)?;
        let s = self.visible(&who, req.into_inner().id).await?;
        let id = s.id.clone();
        self.core
            .ask(|reply| CoreMsg::DeleteSchedule { id, reply })
            .await?;
        self.audit(&who, "schedule.delete", &s).await;
        Ok(Response::new(DeleteScheduleResponse {}))
    }

    async fn trigger(
        &self,
        req: Request<TriggerScheduleRequest>,
    ) -> Result<Response<TriggerScheduleResponse>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        let s = self.visible(&who, r.id).await?;
        let resp =
            super::rerun::trigger(&self.core, &self.catalog, &who, s, r.idempotency_key).await?;
        Ok(Response::new(resp))
    }

    async fn update(
        &self,
        req: Request<UpdateScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let who = auth::principal(&req)?;
        let mut r = req.into_inner();
        let nothing = r.name.is_none()
            && r.cron.is_none()
            && r.timezone.is_none()
            && r.template.is_none()
            && r.template_version.is_none()
            && r.params.is_none()
            && r.overlap.is_none()
            && r.catch_up_window_ms.is_none()
            && r.paused.is_none();
        if nothing {
            return Err(Error::invalid(
                "nothing to update: set at least one of name, cron, timezone, template, template_version, params, overlap, catch_up_window_ms, paused",
            )
            .into());
        }
        let s = self.visible(&who, r.id.clone()).await?;
        // The id as the core knows it (the visible lookup may accept other spellings).
        r.id = s.id;
        let s = self
            .core
            .ask(|reply| CoreMsg::UpdateSchedule {
                req: Box::new(r),
                reply,
            })
            .await?;
        self.audit(&who, "schedule.update", &s).await;
        Ok(Response::new(s))
    }
}
