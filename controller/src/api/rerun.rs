//! `TaskService.Rerun`, `WorkflowService.Rerun` and `ScheduleService.Trigger`: the checks
//! and audit around the core's rerun and trigger (see `core::rerun`,
//! `core::schedule_verbs`).
//!
//! A rerun follows Submit's rules in the source's project: the caller has already been
//! shown the source (it may read it), and must be able to submit there (the method's scope
//! is `submit`; a token of another project was refused when the source was read). An
//! idempotency key dedupes reruns exactly as it dedupes submits: it is the new record's key.

use scabbard_common::Error;
use scabbard_common::proto::{
    Schedule, SubmitTaskResponse, SubmitWorkflowResponse, Task, TriggerScheduleResponse, Workflow,
};
use tonic::Status;

use super::workflows::masked_workflow;
use crate::audit;
use crate::auth::{Catalog, Principal};
use crate::core::{CoreMsg, CoreRouter, history};
use crate::sealed::masked;

/// Longest idempotency key a trigger accepts (it is namespaced by the schedule's id).
const MAX_TRIGGER_KEY: usize = 200;

/// The source's project, if the caller may submit in it and it still exists.
fn project_of(catalog: &Catalog, who: &Principal, project: &str) -> Result<String, Status> {
    let project = who.resolve_project(project)?;
    if catalog.project(&project).is_none() {
        return Err(Error::not_found("project", project).into());
    }
    Ok(project)
}

async fn record(
    catalog: &Catalog,
    who: &Principal,
    action: &str,
    id: &str,
    project: &str,
    detail: String,
) {
    let entry = audit::entry(who, action, id, project, detail);
    if let Err(e) = audit::record(catalog.store(), &entry).await {
        tracing::warn!(error = %e, target = %id, action, "could not write the audit log");
    }
}

/// Reruns `source` (already shown to `who`).
pub(crate) async fn task(
    core: &CoreRouter,
    catalog: &Catalog,
    who: &Principal,
    source: Task,
    idempotency_key: String,
    trace: crate::core::trace::Trace,
) -> Result<SubmitTaskResponse, Status> {
    let project = project_of(catalog, who, &source.project)?;
    let from = source.id.clone();
    let (task, existing) = core
        .ask(|reply| CoreMsg::RerunTask {
            source: Box::new(Task { project, ..source }),
            idempotency_key,
            trace,
            reply,
        })
        .await?;
    if !existing {
        let detail = format!("rerun of {from}");
        record(catalog, who, "task.rerun", &task.id, &task.project, detail).await;
    }
    Ok(SubmitTaskResponse {
        task: Some(masked(task)),
        existing,
    })
}

/// Reruns workflow `source` (already shown to `who`).
pub(crate) async fn workflow(
    core: &CoreRouter,
    catalog: &Catalog,
    who: &Principal,
    source: Workflow,
    idempotency_key: String,
    trace: crate::core::trace::Trace,
) -> Result<SubmitWorkflowResponse, Status> {
    let project = project_of(catalog, who, &source.project)?;
    if let Some(wf) = by_key(core, catalog, &project, &idempotency_key).await? {
        return Ok(SubmitWorkflowResponse {
            workflow: Some(masked_workflow(wf)),
            existing: true,
        });
    }
    let from = source.id.clone();
    let (wf, existing) = core
        .ask(|reply| CoreMsg::RerunWorkflow {
            source: Box::new(Workflow { project, ..source }),
            idempotency_key,
            trace,
            reply,
        })
        .await?;
    if !existing {
        let detail = format!("rerun of {from}");
        record(catalog, who, "workflow.rerun", &wf.id, &wf.project, detail).await;
    }
    Ok(SubmitWorkflowResponse {
        workflow: Some(masked_workflow(wf)),
        existing,
    })
}

/// Fires schedule `s` (already shown to `who`) once now.
pub(crate) async fn trigger(
    core: &CoreRouter,
    catalog: &Catalog,
    who: &Principal,
    s: Schedule,
    idempotency_key: String,
) -> Result<TriggerScheduleResponse, Status> {
    if idempotency_key.len() > MAX_TRIGGER_KEY {
        return Err(Error::invalid(format!(
            "idempotency_key is {} bytes; at most {MAX_TRIGGER_KEY}",
            idempotency_key.len()
        ))
        .into());
    }
    let project = project_of(catalog, who, &s.project)?;
    // Namespaced: the same key on two schedules (or a plain submit) means different runs.
    let key = if idempotency_key.is_empty() {
        String::new()
    } else {
        format!("trigger-{}-{idempotency_key}", s.id)
    };
    if let Some(wf) = by_key(core, catalog, &project, &key).await? {
        return Ok(TriggerScheduleResponse {
            workflow: Some(masked_workflow(wf)),
            existing: true,
            schedule: Some(s),
        });
    }
    let id = s.id.clone();
    let (wf, existing, s) = core
        .ask(|reply| CoreMsg::TriggerSchedule {
            id,
            idempotency_key: key,
            reply,
        })
        .await?;
    if !existing {
        let name = s.spec.as_ref().map(|x| x.name.as_str()).unwrap_or("");
        let detail = format!("{name}: started {}", wf.id);
        record(catalog, who, "schedule.trigger", &s.id, &s.project, detail).await;
    }
    Ok(TriggerScheduleResponse {
        workflow: Some(masked_workflow(wf)),
        existing,
        schedule: Some(s),
    })
}

/// The workflow an idempotency key already names in the store, if any (one that left the
/// core's memory; a live or recent one the core finds itself).
async fn by_key(
    core: &CoreRouter,
    catalog: &Catalog,
    project: &str,
    key: &str,
) -> Result<Option<Workflow>, Status> {
    if key.is_empty() {
        return Ok(None);
    }
    let Some(kv) = catalog
        .store()
        .get(&history::wf_idem_key(project, key))
        .await?
    else {
        return Ok(None);
    };
    let id = String::from_utf8_lossy(&kv.value).into_owned();
    Ok(core.current()?.workflow(&id).await.ok())
}
