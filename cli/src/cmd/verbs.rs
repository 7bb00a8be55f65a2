//! `scabbard task rerun`, `workflow rerun`, `schedule trigger`, `schedule update`, and
//! the progress-printing wait `template run --wait` (and the others' `--wait`) share.
//! Each is one RPC; the server holds the rules (see `controller/src/api/rerun.rs`).

use std::collections::HashMap;

use anyhow::{Result, bail};
use scabbard_common::client::TaskServiceClient;
use scabbard_common::proto::schedule_service_client::ScheduleServiceClient;
use scabbard_common::proto::{
    GetScheduleRequest, OverlapPolicy, RerunTaskRequest, RerunWorkflowRequest, ScheduleParams,
    SubmitWorkflowResponse, TriggerScheduleRequest, UpdateScheduleRequest, WatchWorkflowRequest,
    Workflow,
};

use super::workflows::{self, Client};
use crate::args::{
    ScheduleTriggerArgs, ScheduleUpdateArgs, TaskRerunArgs, WorkflowRerunArgs, param_map,
};
use crate::output::{self, catalog, workflow as view};
use crate::{progress, render};

pub(crate) async fn task_rerun(a: TaskRerunArgs) -> Result<u8> {
    let mut tasks = TaskServiceClient::new(super::connect(&a.target).await?);
    let resp = tasks
        .rerun(RerunTaskRequest {
            id: a.id.clone(),
            idempotency_key: a.idempotency_key.unwrap_or_default(),
        })
        .await
        .map_err(output::status)?
        .into_inner();
    let task = resp.task.unwrap_or_default();
    if resp.existing {
        esay!("task {} already exists for this idempotency key", task.id);
    }
    if !a.wait && !a.follow {
        render::show(&task, || say!("{}", task.id))?;
        return Ok(0);
    }
    esay!("rerunning {} as {}", a.id, task.id);
    let spinner = if a.follow {
        None
    } else {
        progress::spinner(format!("waiting for task {}", task.id))
    };
    let work = crate::interrupt::Work::Task(&task.id, tasks.clone());
    let last = crate::interrupt::guard(work, async {
        if a.follow {
            super::taskfollow::logs(&mut tasks, &task.id, 0, true).await?;
        }
        super::taskfollow::wait(&mut tasks, &task.id, spinner.as_ref(), false).await
    })
    .await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    Ok(super::tasks::report(&last?))
}

pub(crate) async fn workflow_rerun(a: WorkflowRerunArgs) -> Result<u8> {
    let mut wf = Client::new(super::connect(&a.target).await?);
    let resp = wf
        .rerun(RerunWorkflowRequest {
            id: a.id,
            idempotency_key: a.idempotency_key.unwrap_or_default(),
        })
        .await
        .map_err(output::status)?
        .into_inner();
    if a.wait {
        return started_with_progress(&mut wf, resp).await;
    }
    workflows::started(&mut wf, resp, false, a.watch).await
}

pub(crate) async fn schedule_trigger(a: ScheduleTriggerArgs) -> Result<u8> {
    let channel = super::connect(&a.target).await?;
    let mut s = ScheduleServiceClient::new(channel.clone());
    let resp = s
        .trigger(TriggerScheduleRequest {
            id: a.id,
            idempotency_key: a.idempotency_key.unwrap_or_default(),
        })
        .await
        .map_err(output::status)?
        .into_inner();
    let run = SubmitWorkflowResponse {
        workflow: resp.workflow,
        existing: resp.existing,
    };
    let mut wf = Client::new(channel);
    if a.wait {
        return started_with_progress(&mut wf, run).await;
    }
    workflows::started(&mut wf, run, false, a.watch).await
}

pub(crate) async fn schedule_update(a: ScheduleUpdateArgs) -> Result<u8> {
    let mut s = ScheduleServiceClient::new(super::connect(&a.target).await?);
    // Parameters merge into the current ones: read them first.
    let params = if a.params.is_empty() && a.unset_params.is_empty() {
        None
    } else {
        let current = s
            .get(GetScheduleRequest { id: a.id.clone() })
            .await
            .map_err(output::status)?
            .into_inner();
        let mut values: HashMap<String, String> = current.spec.unwrap_or_default().params;
        for name in &a.unset_params {
            if values.remove(name).is_none() {
                bail!("--unset-param {name}: the schedule has no parameter {name:?}");
            }
        }
        values.extend(param_map(a.params).map_err(anyhow::Error::msg)?);
        Some(ScheduleParams { values })
    };
    let catch_up_window_ms = match a.catch_up {
        None => None,
        Some(d) if d.is_zero() => bail!("--catch-up must be more than 0 (e.g. 30s, 5m)"),
        Some(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    let paused = match (a.pause, a.resume) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let updated = s
        .update(UpdateScheduleRequest {
            id: a.id,
            name: a.name,
            cron: a.cron,
            timezone: a.timezone,
            template: a.template,
            template_version: a.template_version,
            params,
            overlap: a.overlap.map(|o| OverlapPolicy::from(o) as i32),
            catch_up_window_ms,
            paused,
        })
        .await
        .map_err(output::status)?
        .into_inner();
    render::show(&updated, || catalog::schedule(&updated))?;
    Ok(0)
}

/// After a run started (`template run --wait`, `workflow rerun --wait`, `schedule trigger
/// --wait`): follows it to its end, printing each node change on stderr as it happens,
/// then the outcome; exit code 0 if it succeeded, 1 otherwise (as `workflow submit
/// --wait`). With `-o json|yaml` every event goes to stdout instead.
pub(crate) async fn started_with_progress(
    wf: &mut Client,
    resp: SubmitWorkflowResponse,
) -> Result<u8> {
    let w = resp.workflow.unwrap_or_default();
    if resp.existing {
        esay!("workflow {} already exists for this idempotency key", w.id);
    }
    esay!("submitted {}", w.id);
    let mut stream = wf
        .watch(WatchWorkflowRequest {
            id: w.id.clone(),
            ..Default::default()
        })
        .await
        .map_err(output::status)?
        .into_inner();
    let mut last: Option<Workflow> = None;
    while let Some(ev) = stream.message().await.map_err(output::status)? {
        if render::structured() {
            render::event(&ev)?;
        }
        let Some(cur) = ev.workflow else { continue };
        if !render::structured() {
            for line in view::changes(last.as_ref(), &cur) {
                esay!("{line}");
            }
        }
        let done = view::is_final(cur.state());
        last = Some(cur);
        if done {
            break;
        }
    }
    match last {
        Some(w) if view::is_final(w.state()) => Ok(workflows::report(&w)),
        _ => bail!(
            "the controller closed the watch before workflow {} finished",
            w.id
        ),
    }
}
