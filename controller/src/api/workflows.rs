//! `WorkflowService`: submit, inspect, list, cancel and watch DAG workflows.

use std::sync::Arc;

use scabbard_common::Error;
use scabbard_common::proto::{
    CancelWorkflowRequest, GetWorkflowRequest, ListWorkflowsRequest, ListWorkflowsResponse,
    RerunWorkflowRequest, SubmitWorkflowRequest, SubmitWorkflowResponse, TemplateRef,
    WatchWorkflowRequest, Workflow, WorkflowEvent, WorkflowSpec, WorkflowState,
    workflow_service_server::WorkflowService,
};
use tonic::{Request, Response, Status};

use super::tasks::BoxStream;
use crate::audit;
use crate::auth::{self, Catalog, Principal};
use crate::core::history;
use crate::core::workflows::{not_cancellable, records, workflow_final};
use crate::core::{CoreMsg, CoreRouter, validate};
use crate::sealed::mask_spec;
use crate::store::WatchEvent;

/// Implementation of `scabbard.v1.WorkflowService`.
pub struct WorkflowApi {
    pub(crate) core: CoreRouter,
    pub(crate) catalog: Arc<Catalog>,
    /// Limits the submitted workflow is validated against (here, not in the core).
    pub(crate) cfg: Arc<crate::config::ControllerConfig>,
    /// Per-token stream caps and per-stream buffer limits.
    pub(crate) streams: Arc<super::StreamLimits>,
}

/// Validates a submitted workflow off the async threads (a 1,000-node DAG is real work), so
/// neither the core actor nor the runtime stalls on it; fills node defaults in place.
pub(crate) async fn validate_off_core(
    mut spec: WorkflowSpec,
    cfg: Arc<crate::config::ControllerConfig>,
) -> Result<WorkflowSpec, Error> {
    tokio::task::spawn_blocking(move || {
        crate::workflow::validate::workflow_spec(&mut spec, &cfg).map(|()| spec)
    })
    .await
    .map_err(|e| Error::internal(format!("workflow validation: {e}")))?
}

/// The workflow as clients see it: secret values read "***".
pub(crate) fn masked_workflow(mut wf: Workflow) -> Workflow {
    if let Some(spec) = wf.spec.as_mut() {
        for t in spec.tasks.iter_mut() {
            if let Some(s) = t.spec.as_mut() {
                mask_spec(s);
            }
        }
    }
    wf
}

/// Submits a workflow for `who` into `project` (empty = the caller's); shared with
/// `TemplateService.Run`. `spec` has passed [`crate::workflow::validate::workflow_spec`]
/// (the core only seals it and resolves its inputs).
pub(crate) async fn submit(
    core: &CoreRouter,
    catalog: &Catalog,
    who: &Principal,
    spec: WorkflowSpec,
    idempotency_key: String,
    project: &str,
    template: Option<TemplateRef>,
) -> Result<SubmitWorkflowResponse, Status> {
    let project = who.resolve_project(project)?;
    if catalog.project(&project).is_none() {
        return Err(Error::not_found("project", project).into());
    }
    // A key whose workflow left the core's memory (finished) is found in the store; a
    // recent or live one the core decides (it also orders concurrent submits of one key).
    if !idempotency_key.is_empty()
        && let Some(kv) = catalog
            .store()
            .get(&history::wf_idem_key(&project, &idempotency_key))
            .await?
    {
        let id = String::from_utf8_lossy(&kv.value).into_owned();
        if let Ok(wf) = core.current()?.workflow(&id).await {
            return Ok(SubmitWorkflowResponse {
                workflow: Some(masked_workflow(wf)),
                existing: true,
            });
        }
    }
    let (wf, existing) = core
        .ask(|reply| CoreMsg::SubmitWorkflow {
            spec: Box::new(spec),
            idempotency_key,
            project,
            template,
            validated: true,
            // The handler's server span (tracing on); a controller that does not trace
            // keeps no context for workflows.
            trace: scabbard_common::telemetry::current().map(Box::new),
            reply,
        })
        .await?;
    Ok(SubmitWorkflowResponse {
        workflow: Some(masked_workflow(wf)),
        existing,
    })
}

impl WorkflowApi {
    /// The workflow `input` (an id or a unique prefix of one) names, if the caller may
    /// see it.
    async fn visible(&self, who: &Principal, input: String) -> Result<Workflow, Status> {
        let id = crate::resolve::workflow(self.catalog.store().as_ref(), who, &input).await?;
        validate::id("workflow", &id)?;
        // From the core while it holds the workflow, else from the store (off the core).
        let wf = self.core.current()?.workflow(&id).await?;
        who.check_visible("workflow", &wf.id, &wf.project)?;
        Ok(wf)
    }
}

#[tonic::async_trait]
impl WorkflowService for WorkflowApi {
    async fn submit(
        &self,
        req: Request<SubmitWorkflowRequest>,
    ) -> Result<Response<SubmitWorkflowResponse>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| Error::invalid("spec is required: a workflow with its tasks"))?;
        let spec = validate_off_core(spec, self.cfg.clone()).await?;
        let resp = submit(
            &self.core,
            &self.catalog,
            &who,
            spec,
            r.idempotency_key,
            &r.project,
            None,
        )
        .await?;
        if let Some(wf) = &resp.workflow {
            let name = wf.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
            let detail = if resp.existing {
                format!("{name} (existing: same idempotency key)")
            } else {
                name.to_string()
            };
            self.catalog.audit(audit::entry(
                &who,
                "workflow.submit",
                &wf.id,
                &wf.project,
                detail,
            ));
        }
        Ok(Response::new(resp))
    }

    async fn get(&self, req: Request<GetWorkflowRequest>) -> Result<Response<Workflow>, Status> {
        let who = auth::principal(&req)?;
        let wf = self.visible(&who, req.into_inner().id).await?;
        Ok(Response::new(masked_workflow(wf)))
    }

    async fn list(
        &self,
        req: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        let who = auth::principal(&req)?;
        let mut req = req.into_inner();
        req.project = who.list_filter(&req.project)?.unwrap_or_default();
        for s in &req.states {
            if WorkflowState::try_from(*s).is_err() || *s == 0 {
                return Err(Error::invalid(format!(
                    "states: {s} is not a workflow state (use WORKFLOW_STATE_PENDING … WORKFLOW_STATE_CANCELLED)"
                ))
                .into());
            }
        }
        if req.template.len() > 128 {
            return Err(Error::invalid("template is longer than 128 bytes").into());
        }
        // From the store's history index, off the core (see `api::list`). Only the leader
        // serves (like every workflow call), so a follower never answers with an older view;
        // and only once what its core wrote so far is durable, so the list shows every
        // workflow and state the core already answered with (a schedule's run it reported,
        // a submit another client was answered; no scan in the core, one barrier).
        self.core.ask(|reply| CoreMsg::Durable { reply }).await?;
        let (workflows, next_page_token) =
            super::list::workflows(self.catalog.store().as_ref(), &req).await?;
        Ok(Response::new(ListWorkflowsResponse {
            workflows: workflows.into_iter().map(masked_workflow).collect(),
            next_page_token,
        }))
    }

    async fn cancel(
        &self,
        req: Request<CancelWorkflowRequest>,
    ) -> Result<Response<Workflow>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        if r.reason.len() > 1024 {
            return Err(Error::invalid("reason is longer than 1024 bytes").into());
        }
        let wf = self.visible(&who, r.id.clone()).await?;
        if workflow_final(wf.state()) {
            return Err(not_cancellable(&wf.id, wf.state()).into());
        }
        let entry = audit::entry(
            &who,
            "workflow.cancel",
            &wf.id,
            &wf.project,
            r.reason.clone(),
        );
        let wf = match self
            .core
            .ask(|reply| CoreMsg::CancelWorkflow {
                id: wf.id.clone(),
                reason: r.reason,
                reply,
            })
            .await
        {
            // It finished and left the core's memory since it was read.
            Err(Error::NotFound { .. }) => {
                let now = self.visible(&who, wf.id.clone()).await?;
                return Err(not_cancellable(&now.id, now.state()).into());
            }
            other => other?,
        };
        if let Err(e) = audit::record(self.catalog.store(), &entry).await {
            tracing::warn!(error = %e, workflow = %wf.id, "could not record the cancel in the audit log");
        }
        Ok(Response::new(masked_workflow(wf)))
    }

    type WatchStream = BoxStream<WorkflowEvent>;

    async fn watch(
        &self,
        req: Request<WatchWorkflowRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        let id = crate::resolve::workflow(self.catalog.store().as_ref(), &who, &r.id).await?;
        validate::id("workflow", &id)?;
        if r.after_revision < 0 {
            return Err(Error::invalid("after_revision must not be negative").into());
        }
        // Served from the store (header and node records, read at one revision, then its
        // changes), not from the core: revisions mean the same on every controller and
        // across leader changes.
        let store = self.catalog.store().clone();
        let header = records::header_key(&id);
        let page = store.range(&header, None, 0).await?;
        let mut parts = Parts::new(&header);
        for kv in page.kvs {
            parts.put(kv.key, kv.value, kv.mod_revision);
        }
        let (now, now_rev) = parts
            .assemble()?
            .ok_or_else(|| Error::not_found("workflow", id.clone()))?;
        who.check_visible("workflow", &id, &now.project)?;
        let mut changes = store.watch(&header, page.revision + 1).await?;
        let slot = self.streams.open(&who.token_id)?;
        let (tx, out) = self.streams.outbox::<WorkflowEvent>(slot);
        super::guard::end_on_revoke(self.catalog.clone(), who.token_id.clone(), tx.ender());
        let after = r.after_revision;
        tokio::spawn(async move {
            let event = |wf: Workflow, revision: i64| WorkflowEvent {
                workflow: Some(masked_workflow(wf)),
                revision,
            };
            let done = workflow_final(now.state());
            if now_rev > after && !tx.push(event(now, now_rev)) {
                return;
            }
            if done {
                return;
            }
            loop {
                let next = tokio::select! {
                    next = changes.recv() => next,
                    _ = tx.closed() => return,
                };
                let header_rev = match next {
                    Some(Ok(WatchEvent::Put(kv))) => {
                        let is_header = kv.key == parts.header;
                        let rev = kv.mod_revision;
                        parts.put(kv.key, kv.value, rev);
                        // The header is written last for every change of the workflow.
                        if !is_header {
                            continue;
                        }
                        rev
                    }
                    Some(Ok(WatchEvent::Delete { key, .. })) => {
                        if key == parts.header {
                            tx.finish(Status::not_found(format!("workflow {id} was deleted")));
                            return;
                        }
                        parts.remove(&key);
                        continue;
                    }
                    Some(Err(e)) => {
                        tx.finish(Status::aborted(format!(
                            "the watch broke ({e}); watch again from the last event's revision"
                        )));
                        return;
                    }
                    None => {
                        tx.finish(Status::unavailable(
                            "the store watch ended; watch again from the last event's revision",
                        ));
                        return;
                    }
                };
                let wf = match parts.assemble() {
                    Ok(Some((wf, _))) => wf,
                    Ok(None) => continue,
                    Err(e) => {
                        tx.finish(e);
                        return;
                    }
                };
                let done = workflow_final(wf.state());
                if !tx.push(event(wf, header_rev)) || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn rerun(
        &self,
        req: Request<RerunWorkflowRequest>,
    ) -> Result<Response<SubmitWorkflowResponse>, Status> {
        let who = auth::principal(&req)?;
        let trace = crate::core::trace::incoming(&req);
        let r = req.into_inner();
        let source = self.visible(&who, r.id).await?;
        let resp = super::rerun::workflow(
            &self.core,
            &self.catalog,
            &who,
            source,
            r.idempotency_key,
            trace,
        )
        .await?;
        Ok(Response::new(resp))
    }
}

/// The workflow `id` as the store holds it now, with its header's revision; `None` when it
/// has no header (gone, or never acknowledged). No visibility check: callers filter.
pub(crate) async fn read_from_store(
    store: &Arc<dyn crate::store::Store>,
    id: &str,
) -> Result<Option<(Workflow, i64)>, Status> {
    let header = records::header_key(id);
    let page = store.range(&header, None, 0).await?;
    let mut parts = Parts::new(&header);
    for kv in page.kvs {
        parts.put(kv.key, kv.value, kv.mod_revision);
    }
    parts.assemble()
}

/// The records of one workflow (header and parts) as a watch sees them.
struct Parts {
    header: String,
    records: std::collections::BTreeMap<String, Vec<u8>>,
    header_rev: i64,
}

impl Parts {
    fn new(header: &str) -> Self {
        Self {
            header: header.to_string(),
            records: Default::default(),
            header_rev: 0,
        }
    }

    /// Keeps `key` if it is this workflow's (the prefix also matches longer ids).
    fn put(&mut self, key: String, value: Vec<u8>, rev: i64) {
        if key == self.header {
            self.header_rev = rev;
        } else if !key
            .strip_prefix(self.header.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
        {
            return;
        }
        self.records.insert(key, value);
    }

    fn remove(&mut self, key: &str) {
        self.records.remove(key);
    }

    /// The workflow and its header's revision; `None` without a header.
    fn assemble(&self) -> Result<Option<(Workflow, i64)>, Status> {
        if !self.records.contains_key(&self.header) {
            return Ok(None);
        }
        let mut loader = records::Loader::default();
        for (k, v) in &self.records {
            loader.add(k, v)?;
        }
        let loaded = loader.finish();
        if let Some((id, why)) = loaded.broken.into_iter().next() {
            return Err(Error::internal(format!("workflow {id}: {why}")).into());
        }
        Ok(loaded
            .workflows
            .into_iter()
            .next()
            .map(|wf| (wf, self.header_rev)))
    }
}
