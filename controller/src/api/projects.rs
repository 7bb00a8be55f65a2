//! `ProjectService`: projects are the tenancy unit (tasks, tokens, quotas, rate limits).

use std::sync::Arc;

use scabbard_common::Error;
use scabbard_common::proto::{
    CreateProjectRequest, DeleteProjectRequest, DeleteProjectResponse, GetProjectRequest,
    ListProjectsRequest, ListProjectsResponse, ListTasksRequest, Project, TaskState,
    UpdateProjectRequest, project_service_server::ProjectService,
};
use tonic::{Request, Response, Status};

use crate::auth::catalog::validate_project_name;
use crate::auth::{self, Catalog};
use crate::core::{CoreMsg, CoreRouter};

/// Implementation of `scabbard.v1.ProjectService`.
pub struct ProjectApi {
    pub(crate) core: CoreRouter,
    pub(crate) catalog: Arc<Catalog>,
}

#[tonic::async_trait]
impl ProjectService for ProjectApi {
    async fn create(
        &self,
        req: Request<CreateProjectRequest>,
    ) -> Result<Response<Project>, Status> {
        let who = auth::principal(&req)?;
        let p = req
            .into_inner()
            .project
            .ok_or_else(|| Error::invalid("project is required"))?;
        Ok(Response::new(self.catalog.create_project(&who, p).await?))
    }

    async fn get(&self, req: Request<GetProjectRequest>) -> Result<Response<Project>, Status> {
        let who = auth::principal(&req)?;
        let name = req.into_inner().name;
        validate_project_name(&name)?;
        who.check_visible("project", &name, &name)?;
        let p = self
            .catalog
            .project(&name)
            .ok_or_else(|| Error::not_found("project", name))?;
        Ok(Response::new(p))
    }

    async fn list(
        &self,
        req: Request<ListProjectsRequest>,
    ) -> Result<Response<ListProjectsResponse>, Status> {
        let who = auth::principal(&req)?;
        Ok(Response::new(ListProjectsResponse {
            projects: self.catalog.list_projects(&who),
        }))
    }

    async fn update(
        &self,
        req: Request<UpdateProjectRequest>,
    ) -> Result<Response<Project>, Status> {
        let who = auth::principal(&req)?;
        let p = req
            .into_inner()
            .project
            .ok_or_else(|| Error::invalid("project is required"))?;
        Ok(Response::new(self.catalog.update_project(&who, p).await?))
    }

    async fn delete(
        &self,
        req: Request<DeleteProjectRequest>,
    ) -> Result<Response<DeleteProjectResponse>, Status> {
        let who = auth::principal(&req)?;
        let name = req.into_inner().name;
        validate_project_name(&name)?;
        who.require_cluster_wide("deleting a project")?;
        if self.catalog.project(&name).is_none() {
            return Err(Error::not_found("project", name).into());
        }
        let unfinished = ListTasksRequest {
            states: [
                TaskState::Queued,
                TaskState::Assigned,
                TaskState::Running,
                TaskState::RetryWait,
            ]
            .map(|s| s as i32)
            .to_vec(),
            page_size: 1,
            project: name.clone(),
            ..Default::default()
        };
        let (live, _) = self
            .core
            .ask(|reply| CoreMsg::List {
                req: unfinished,
                reply,
            })
            .await?;
        if let Some(t) = live.first() {
            return Err(Error::FailedPrecondition(format!(
                "project {name} still has unfinished tasks (e.g. {}); cancel them or wait, then delete",
                t.id
            ))
            .into());
        }
        self.catalog.delete_project(&who, &name).await?;
        Ok(Response::new(DeleteProjectResponse {}))
    }
}
