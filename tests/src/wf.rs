//! Workflow helpers: a controller with workers, DAG builders, waiting for a workflow to end.

use std::time::Duration;

use anyhow::{Result, anyhow};
use scabbard_common::client::AuthedChannel;
use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
use scabbard_common::proto::{
    GetWorkflowRequest, SubmitWorkflowRequest, Workflow, WorkflowNode, WorkflowSpec, WorkflowState,
    WorkflowTask,
};

use crate::{
    ADMIN_TOKEN, Controller, ControllerOpts, Worker, client, eventually, shell, with_token,
};

/// A workflow client with the admin token.
pub type Workflows = WorkflowServiceClient<AuthedChannel>;

/// A controller process and `n` workers with `slots` each, named w0, w1, ….
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub controller: Controller,
    pub workers: Vec<Worker>,
}

impl Cluster {
    /// Starts the controller with `extra` flags and the workers (named by `names`).
    pub fn start(names: &[&str], slots: u32, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Port 0: no race with other tests for a "free" port.
        let controller = Controller::start(
            &dir.path().join("controller"),
            0,
            &ControllerOpts {
                extra: extra.iter().map(|s| s.to_string()).collect(),
                ..ControllerOpts::default()
            },
        )?;
        let mut workers = Vec::new();
        for name in names {
            workers.push(Worker::start(
                &controller.addr.to_string(),
                &dir.path().join(name),
                name,
                slots,
            )?);
        }
        Ok(Self {
            dir,
            controller,
            workers,
        })
    }

    /// The controller's address.
    pub fn addr(&self) -> String {
        self.controller.addr.to_string()
    }

    /// A channel to the controller with the admin token.
    pub async fn channel(&self) -> Result<AuthedChannel> {
        let addr = self.addr();
        let ch = eventually(
            "controller to accept connections",
            Duration::from_secs(20),
            || {
                let addr = addr.clone();
                async move { client::connect(&addr).await.ok() }
            },
        )
        .await?;
        Ok(with_token(ch, ADMIN_TOKEN))
    }

    /// A workflow client.
    pub async fn workflows(&self) -> Result<Workflows> {
        Ok(WorkflowServiceClient::new(self.channel().await?))
    }
}

/// A node running `script` with `sh -c` after `deps`.
pub fn node(name: &str, deps: &[&str], script: &str) -> WorkflowTask {
    WorkflowTask {
        name: name.into(),
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        spec: Some(shell(script)),
        when: String::new(),
    }
}

/// A workflow of `tasks`.
pub fn workflow(name: &str, tasks: Vec<WorkflowTask>) -> WorkflowSpec {
    WorkflowSpec {
        name: name.into(),
        tasks,
        ..Default::default()
    }
}

/// Submits a workflow.
pub async fn submit_workflow(c: &mut Workflows, spec: WorkflowSpec) -> Result<Workflow> {
    c.submit(SubmitWorkflowRequest {
        spec: Some(spec),
        ..Default::default()
    })
    .await?
    .into_inner()
    .workflow
    .ok_or_else(|| anyhow!("no workflow in the response"))
}

/// Waits until the workflow is final.
pub async fn wait_workflow(c: &mut Workflows, id: &str, timeout: Duration) -> Result<Workflow> {
    eventually(&format!("workflow {id} to finish"), timeout, || {
        let mut c = c.clone();
        let id = id.to_string();
        async move {
            let wf = c.get(GetWorkflowRequest { id }).await.ok()?.into_inner();
            matches!(
                wf.state(),
                WorkflowState::Succeeded | WorkflowState::Failed | WorkflowState::Cancelled
            )
            .then_some(wf)
        }
    })
    .await
}

/// The node called `name`.
pub fn node_of<'a>(wf: &'a Workflow, name: &str) -> &'a WorkflowNode {
    wf.nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name} in {wf:?}"))
}
