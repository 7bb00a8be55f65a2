//! `TemplateService`: list and describe workflow templates, render them (dry run), run them.

use std::collections::HashMap;
use std::sync::Arc;

use scabbard_common::Error;
use scabbard_common::proto::{
    GetTemplateRequest, ListTemplatesRequest, ListTemplatesResponse, RenderTemplateRequest,
    RenderTemplateResponse, RunTemplateRequest, SubmitWorkflowResponse, Template, TemplateRef,
    template_service_server::TemplateService,
};
use tonic::{Request, Response, Status};

use crate::auth::{self, Catalog};
use crate::config::ControllerConfig;
use crate::core::CoreRouter;
use crate::templates::Registry;

/// Implementation of `scabbard.v1.TemplateService`.
pub struct TemplateApi {
    pub(crate) core: CoreRouter,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) templates: Arc<Registry>,
    pub(crate) cfg: Arc<ControllerConfig>,
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::invalid(
            "name is required: a template name as listed by TemplateService.List",
        ));
    }
    if name.len() > 128 {
        return Err(Error::invalid("name is longer than 128 bytes"));
    }
    Ok(())
}

fn check_params(params: &HashMap<String, String>) -> Result<(), Error> {
    if params.len() > 256 {
        return Err(Error::invalid("more than 256 params"));
    }
    if let Some(k) = params
        .iter()
        .find_map(|(k, v)| (k.len() > 128 || v.len() > 64 * 1024).then_some(k))
    {
        return Err(Error::invalid(format!("param {k:?} is too long")));
    }
    Ok(())
}

impl TemplateApi {
    /// Renders and validates the workflow a run would submit.
    fn render(
        &self,
        name: &str,
        version: u32,
        params: &HashMap<String, String>,
    ) -> Result<(scabbard_common::proto::WorkflowSpec, u32), Error> {
        check_name(name)?;
        check_params(params)?;
        let (mut spec, version) = self.templates.render(name, version, params)?;
        crate::workflow::validate::workflow_spec(&mut spec, &self.cfg).map_err(|e| {
            Error::invalid(format!(
                "template {name} v{version} rendered an invalid workflow: {e}"
            ))
        })?;
        Ok((spec, version))
    }
}

#[tonic::async_trait]
impl TemplateService for TemplateApi {
    async fn list(
        &self,
        _req: Request<ListTemplatesRequest>,
    ) -> Result<Response<ListTemplatesResponse>, Status> {
        Ok(Response::new(ListTemplatesResponse {
            templates: self.templates.list(),
        }))
    }

    async fn get(&self, req: Request<GetTemplateRequest>) -> Result<Response<Template>, Status> {
        let r = req.into_inner();
        check_name(&r.name)?;
        Ok(Response::new(self.templates.get(&r.name, r.version)?))
    }

    async fn render(
        &self,
        req: Request<RenderTemplateRequest>,
    ) -> Result<Response<RenderTemplateResponse>, Status> {
        let r = req.into_inner();
        let (workflow, version) = self.render(&r.name, r.version, &r.params)?;
        Ok(Response::new(RenderTemplateResponse {
            workflow: Some(workflow),
            version,
        }))
    }

    async fn run(
        &self,
        req: Request<RunTemplateRequest>,
    ) -> Result<Response<SubmitWorkflowResponse>, Status> {
        let who = auth::principal(&req)?;
        let r = req.into_inner();
        let (spec, version) = self.render(&r.name, r.version, &r.params)?;
        let template = TemplateRef {
            name: r.name,
            version,
            params: r.params,
            ..Default::default()
        };
        let resp = super::workflows::submit(
            &self.core,
            &self.catalog,
            &who,
            spec,
            r.idempotency_key,
            &r.project,
            Some(template),
        )
        .await?;
        if let Some(wf) = &resp.workflow {
            let t = wf.template.as_ref();
            let mut detail = format!(
                "{}@{}",
                t.map_or("", |t| t.name.as_str()),
                t.map_or(0, |t| t.version)
            );
            if resp.existing {
                detail.push_str(" (existing: same idempotency key)");
            }
            self.catalog.audit(crate::audit::entry(
                &who,
                "template.run",
                &wf.id,
                &wf.project,
                detail,
            ));
        }
        Ok(Response::new(resp))
    }
}
