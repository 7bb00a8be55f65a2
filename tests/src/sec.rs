//! Security test helpers: an admin client, projects and API tokens on an in-process
//! controller.

use anyhow::Result;
use scabbard_common::client::{self, AdminServiceClient, ProjectServiceClient, TaskServiceClient};
use scabbard_common::proto::{
    CreateProjectRequest, CreateTokenRequest, Project, ProjectQuota, Scope, SubmitTaskRequest,
    TokenKind,
};

use crate::{ADMIN_TOKEN, InProc, Tasks, shell};

pub async fn admin(c: &InProc) -> Result<AdminServiceClient<client::AuthedChannel>> {
    Ok(AdminServiceClient::new(c.channel(ADMIN_TOKEN).await?))
}

pub async fn create_project(c: &InProc, name: &str, quota: Option<ProjectQuota>) -> Result<()> {
    ProjectServiceClient::new(c.channel(ADMIN_TOKEN).await?)
        .create(CreateProjectRequest {
            project: Some(Project {
                name: name.into(),
                quota,
                ..Default::default()
            }),
        })
        .await?;
    Ok(())
}

pub async fn api_token(
    c: &InProc,
    project: &str,
    scope: Scope,
    ttl_ms: u64,
) -> Result<(String, String)> {
    let r = admin(c)
        .await?
        .create_token(CreateTokenRequest {
            kind: TokenKind::Api as i32,
            name: format!("{project}-{}", scope.as_str_name()),
            scopes: vec![scope as i32],
            project: project.into(),
            ttl_ms,
            max_uses: 0,
        })
        .await?
        .into_inner();
    Ok((r.token.unwrap().id, r.secret))
}

pub async fn tasks_as(c: &InProc, token: &str) -> Result<Tasks> {
    Ok(TaskServiceClient::new(c.channel(token).await?))
}

pub fn noop_submit(project: &str) -> SubmitTaskRequest {
    SubmitTaskRequest {
        spec: Some(shell("true")),
        idempotency_key: String::new(),
        project: project.into(),
    }
}
