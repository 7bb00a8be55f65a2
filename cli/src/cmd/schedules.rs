//! `scabbard schedule create|list|get|pause|resume|delete`: thin wrappers around
//! `ScheduleService`. The cron expression and time zone are checked here first (with the
//! controller's own parser) so a typo fails before any call.

use anyhow::Result;
use scabbard_common::proto::schedule_service_client::ScheduleServiceClient;
use scabbard_common::proto::{
    CreateScheduleRequest, DeleteScheduleRequest, GetScheduleRequest, ListSchedulesRequest,
    OverlapPolicy, PauseScheduleRequest, ResumeScheduleRequest, ScheduleSpec,
};
use scabbard_controller::schedules::plan::Cron;

use crate::args::{ScheduleCommand, param_map};
use crate::output::{self, catalog};
use crate::render;

pub(crate) async fn schedule(c: ScheduleCommand) -> Result<u8> {
    match c {
        ScheduleCommand::Trigger(a) => return super::verbs::schedule_trigger(a).await,
        ScheduleCommand::Update(a) => return super::verbs::schedule_update(a).await,
        ScheduleCommand::Create {
            target,
            name,
            cron,
            template,
            template_version,
            params,
            timezone,
            overlap,
            catch_up,
            paused,
            project,
        } => {
            let timezone = timezone.unwrap_or_default();
            Cron::parse(&cron, &timezone).map_err(anyhow::Error::msg)?;
            let catch_up_window_ms = match catch_up {
                None => 0,
                Some(d) if d.is_zero() => {
                    anyhow::bail!("--catch-up must be more than 0 (e.g. 30s, 5m)")
                }
                Some(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            };
            let spec = ScheduleSpec {
                name,
                cron,
                timezone,
                template,
                template_version: template_version.unwrap_or(0),
                params: param_map(params).map_err(anyhow::Error::msg)?,
                overlap: OverlapPolicy::from(overlap) as i32,
                catch_up_window_ms,
            };
            let mut s = ScheduleServiceClient::new(super::connect(&target).await?);
            let created = s
                .create(CreateScheduleRequest {
                    spec: Some(spec),
                    project: project.unwrap_or_default(),
                    paused,
                })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&created, || catalog::schedule(&created))?;
        }
        ScheduleCommand::List { target, project } => {
            let mut s = ScheduleServiceClient::new(super::connect(&target).await?);
            let resp = s
                .list(ListSchedulesRequest {
                    project: project.unwrap_or_default(),
                })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&resp.schedules, || catalog::schedules(&resp.schedules))?;
        }
        ScheduleCommand::Get { target, id } => {
            let mut s = ScheduleServiceClient::new(super::connect(&target).await?);
            let sch = s
                .get(GetScheduleRequest { id })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&sch, || catalog::schedule(&sch))?;
        }
        ScheduleCommand::Pause { target, id } => {
            let mut s = ScheduleServiceClient::new(super::connect(&target).await?);
            let sch = s
                .pause(PauseScheduleRequest { id })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&sch, || say!("schedule {} paused", sch.id))?;
        }
        ScheduleCommand::Resume { target, id } => {
            let mut s = ScheduleServiceClient::new(super::connect(&target).await?);
            let sch = s
                .resume(ResumeScheduleRequest { id })
                .await
                .map_err(output::status)?
                .into_inner();
            let next = if sch.next_tick_ms > 0 {
                format!("; next tick {} UTC", output::utc(sch.next_tick_ms))
            } else {
                String::new()
            };
            render::show(&sch, || say!("schedule {} resumed{next}", sch.id))?;
        }
        ScheduleCommand::Delete { target, id } => {
            let mut s = ScheduleServiceClient::new(super::connect(&target).await?);
            let resp = s
                .delete(DeleteScheduleRequest { id: id.clone() })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&resp, || say!("schedule {id} deleted"))?;
        }
    }
    Ok(0)
}
