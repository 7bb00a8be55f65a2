//! `follow` and `report` against an in-process fake `WorkflowService`.

use std::pin::Pin;

use futures::Stream;
use scabbard_common::proto::workflow_service_server::{WorkflowService, WorkflowServiceServer};
use scabbard_common::proto::{ListWorkflowsResponse, NodeState, WorkflowEvent, WorkflowNode};
use tonic::{Request, Response, Status};

use super::*;

/// Streams a workflow running then finishing as `final_state`; id `early` ends while
/// still running.
struct Fake {
    final_state: WorkflowState,
}

fn snapshot(id: &str, state: WorkflowState, node: NodeState, done: u32) -> WorkflowEvent {
    WorkflowEvent {
        workflow: Some(Workflow {
            id: id.into(),
            state: state as i32,
            nodes: vec![WorkflowNode {
                name: "only".into(),
                state: node as i32,
                attempts: 1,
                ..WorkflowNode::default()
            }],
            done,
            total: 1,
            ..Workflow::default()
        }),
        revision: 0,
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<WorkflowEvent, Status>> + Send>>;

#[tonic::async_trait]
impl WorkflowService for Fake {
    async fn submit(
        &self,
        _: Request<SubmitWorkflowRequest>,
    ) -> Result<Response<SubmitWorkflowResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get(&self, _: Request<GetWorkflowRequest>) -> Result<Response<Workflow>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list(
        &self,
        _: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn cancel(
        &self,
        _: Request<CancelWorkflowRequest>,
    ) -> Result<Response<Workflow>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type WatchStream = Events;
    async fn watch(&self, req: Request<WatchWorkflowRequest>) -> Result<Response<Events>, Status> {
        let id = req.into_inner().id;
        if id == "missing" {
            return Err(Status::not_found("workflow missing not found"));
        }
        let mut events = vec![
            snapshot(&id, WorkflowState::Running, NodeState::Queued, 0),
            snapshot(&id, WorkflowState::Running, NodeState::Running, 0),
        ];
        if id != "early" {
            let node = if self.final_state == WorkflowState::Succeeded {
                NodeState::Succeeded
            } else {
                NodeState::Failed
            };
            events.push(snapshot(&id, self.final_state, node, 1));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(
            events.into_iter().map(Ok),
        ))))
    }
    async fn rerun(
        &self,
        _: Request<scabbard_common::proto::RerunWorkflowRequest>,
    ) -> Result<Response<SubmitWorkflowResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

async fn client(final_state: WorkflowState) -> Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkflowServiceServer::new(Fake { final_state }))
            .serve_with_incoming(incoming),
    );
    let channel = scabbard_common::client::connect(&addr.to_string())
        .await
        .expect("connect");
    Client::new(scabbard_common::client::authed(channel, None).expect("authed"))
}

#[tokio::test]
async fn follow_returns_the_final_workflow_and_report_gives_the_exit_code() {
    let mut wf = client(WorkflowState::Succeeded).await;
    let w = follow(&mut wf, "wf1", true).await.expect("followed");
    assert_eq!(w.state(), WorkflowState::Succeeded);
    assert_eq!(w.done, 1);
    assert_eq!(report(&w), 0);

    let mut wf = client(WorkflowState::Failed).await;
    let w = follow(&mut wf, "wf2", false).await.expect("followed");
    assert_eq!(w.state(), WorkflowState::Failed);
    assert_eq!(report(&w), 1);
}

#[tokio::test]
async fn a_watch_that_ends_early_or_fails_is_an_error() {
    let mut wf = client(WorkflowState::Succeeded).await;
    let e = follow(&mut wf, "early", false)
        .await
        .expect_err("ended early");
    assert!(
        e.to_string().contains("before workflow early finished"),
        "{e}"
    );
    let e = follow(&mut wf, "missing", false)
        .await
        .expect_err("not found");
    assert!(e.to_string().contains("NOT_FOUND"), "{e}");
}
