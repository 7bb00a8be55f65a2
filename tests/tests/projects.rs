//! Projects end to end: they fence every RPC that takes an id, quotas bound queued and
//! running tasks, and every admin action lands in the audit log.

use std::time::{Duration, Instant};

use scabbard_common::client::{AdminServiceClient, ProjectServiceClient};
use scabbard_common::proto::{
    CancelTaskRequest, CreateTokenRequest, DeleteProjectRequest, DrainAgentRequest,
    GetProjectRequest, GetTaskRequest, ListAuditRequest, ListTasksRequest, ListTokensRequest,
    Project, ProjectQuota, RevokeTokenRequest, Scope, SubmitTaskRequest, TaskLogsRequest,
    TaskState, UpdateProjectRequest, WatchTasksRequest, WhoAmIRequest,
};
use scabbard_tests::sec::*;
use scabbard_tests::*;
use tonic::Code;

#[tokio::test]
async fn cross_project_access_is_refused_on_every_rpc_that_takes_an_id() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    create_project(&c, "alpha", None).await?;
    create_project(&c, "beta", None).await?;
    let (_, alpha) = api_token(&c, "alpha", Scope::Admin, 0).await?;
    let (beta_tok_id, _) = api_token(&c, "beta", Scope::Read, 0).await?;
    let mut beta_admin = tasks_as(&c, ADMIN_TOKEN).await?;
    let beta_task = beta_admin
        .submit(noop_submit("beta"))
        .await?
        .into_inner()
        .task
        .unwrap()
        .id;
    let tasks = tasks_as(&c, &alpha).await?;
    let projects = ProjectServiceClient::new(c.channel(&alpha).await?);
    let adm = AdminServiceClient::new(c.channel(&alpha).await?);

    type Call =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>;
    let id = beta_task.clone();
    let cases: Vec<(&str, Call)> = vec![
        ("TaskService/Get", {
            let (mut t, id) = (tasks.clone(), id.clone());
            Box::pin(async move { t.get(GetTaskRequest { id }).await.map(drop) })
        }),
        ("TaskService/Cancel", {
            let (mut t, id) = (tasks.clone(), id.clone());
            Box::pin(async move {
                t.cancel(CancelTaskRequest {
                    id,
                    reason: String::new(),
                })
                .await
                .map(drop)
            })
        }),
        ("TaskService/Watch", {
            let (mut t, id) = (tasks.clone(), id.clone());
            Box::pin(async move {
                t.watch(WatchTasksRequest {
                    ids: vec![id],
                    send_initial: true,
                    ..Default::default()
                })
                .await
                .map(drop)
            })
        }),
        ("TaskService/Logs", {
            let (mut t, id) = (tasks.clone(), id.clone());
            Box::pin(async move {
                t.logs(TaskLogsRequest {
                    task_id: id,
                    ..Default::default()
                })
                .await
                .map(drop)
            })
        }),
        ("TaskService/List(project)", {
            let mut t = tasks.clone();
            Box::pin(async move {
                t.list(ListTasksRequest {
                    project: "beta".into(),
                    ..Default::default()
                })
                .await
                .map(drop)
            })
        }),
        ("TaskService/Submit(project)", {
            let mut t = tasks.clone();
            Box::pin(async move { t.submit(noop_submit("beta")).await.map(drop) })
        }),
        ("ProjectService/Get", {
            let mut p = projects.clone();
            Box::pin(async move {
                p.get(GetProjectRequest {
                    name: "beta".into(),
                })
                .await
                .map(drop)
            })
        }),
        ("ProjectService/Update", {
            let mut p = projects.clone();
            Box::pin(async move {
                p.update(UpdateProjectRequest {
                    project: Some(Project {
                        name: "beta".into(),
                        ..Default::default()
                    }),
                })
                .await
                .map(drop)
            })
        }),
        ("ProjectService/Delete", {
            let mut p = projects.clone();
            Box::pin(async move {
                p.delete(DeleteProjectRequest {
                    name: "beta".into(),
                })
                .await
                .map(drop)
            })
        }),
        ("AdminService/RevokeToken", {
            let (mut a, id) = (adm.clone(), beta_tok_id.clone());
            Box::pin(async move {
                a.revoke_token(RevokeTokenRequest {
                    id,
                    reason: String::new(),
                })
                .await
                .map(drop)
            })
        }),
        ("AdminService/ListTokens(project)", {
            let mut a = adm.clone();
            Box::pin(async move {
                a.list_tokens(ListTokensRequest {
                    project: "beta".into(),
                    ..Default::default()
                })
                .await
                .map(drop)
            })
        }),
        ("AdminService/ListAudit(project)", {
            let mut a = adm.clone();
            Box::pin(async move {
                a.list_audit(ListAuditRequest {
                    project: "beta".into(),
                    ..Default::default()
                })
                .await
                .map(drop)
            })
        }),
        ("AdminService/DrainAgent", {
            let mut a = adm.clone();
            Box::pin(async move {
                a.drain_agent(DrainAgentRequest {
                    id: "agent-x".into(),
                    reason: String::new(),
                })
                .await
                .map(drop)
            })
        }),
        ("AdminService/CreateToken(project)", {
            let mut a = adm.clone();
            Box::pin(async move {
                a.create_token(CreateTokenRequest {
                    scopes: vec![Scope::Read as i32],
                    project: "beta".into(),
                    ..Default::default()
                })
                .await
                .map(drop)
            })
        }),
    ];
    // Another project's ids answer exactly like unknown ones (NOT_FOUND), so they cannot
    // be probed; acting in another project by name is refused.
    let by_id = [
        "TaskService/Get",
        "TaskService/Cancel",
        "TaskService/Watch",
        "TaskService/Logs",
        "ProjectService/Get",
        "AdminService/RevokeToken",
    ];
    for (name, call) in cases {
        let r = call.await;
        let s = r.expect_err(name);
        let want = if by_id.contains(&name) {
            Code::NotFound
        } else {
            Code::PermissionDenied
        };
        assert_eq!(s.code(), want, "{name}: {}", s.message());
    }
    // The beta task is untouched, and alpha's own listing does not show it.
    let t = beta_admin
        .get(GetTaskRequest {
            id: beta_task.clone(),
        })
        .await?
        .into_inner();
    assert!(!t.cancel_requested && t.state() != TaskState::Cancelled);
    let mine = tasks
        .clone()
        .list(ListTasksRequest::default())
        .await?
        .into_inner()
        .tasks;
    assert!(mine.iter().all(|t| t.project == "alpha"), "{mine:?}");
    // A watch on everything only shows alpha's tasks.
    let mut events = tasks
        .clone()
        .watch(WatchTasksRequest::default())
        .await?
        .into_inner();
    beta_admin.submit(noop_submit("beta")).await?;
    let own = tasks
        .clone()
        .submit(noop_submit(""))
        .await?
        .into_inner()
        .task
        .unwrap();
    assert_eq!(own.project, "alpha");
    let first = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await??
        .unwrap();
    assert_eq!(first.task.unwrap().id, own.id);
    Ok(())
}

#[tokio::test]
async fn project_quotas_bound_queued_and_running_tasks() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    create_project(
        &c,
        "small",
        Some(ProjectQuota {
            max_queued_tasks: 2,
            max_running_tasks: 1,
            ..Default::default()
        }),
    )
    .await?;
    let (_, tok) = api_token(&c, "small", Scope::Submit, 0).await?;
    let mut t = tasks_as(&c, &tok).await?;
    let slow = |s: &str| SubmitTaskRequest {
        spec: Some(shell(&format!("sleep {s}"))),
        ..Default::default()
    };
    let a = t.submit(slow("1")).await?.into_inner().task.unwrap().id;
    let b = t.submit(slow("1")).await?.into_inner().task.unwrap().id;
    let (code, msg) = code_and_message(t.submit(slow("1")).await);
    assert_eq!(code, Code::ResourceExhausted);
    assert!(msg.contains("max_queued_tasks"), "{msg}");
    // Another project is not affected by this one's quota.
    tasks_as(&c, ADMIN_TOKEN)
        .await?
        .submit(noop_submit(""))
        .await?;

    // Two slots, but the project may only run one task at a time.
    let dir = tempfile::tempdir()?;
    let _w = Worker::start(&c.addr(), dir.path(), "w", 2)?;
    let mut admin_tasks = tasks_as(&c, ADMIN_TOKEN).await?;
    let mut max_running = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // One List is one consistent snapshot of the core (two Gets are not).
        let all = admin_tasks
            .list(ListTasksRequest {
                project: "small".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .tasks;
        let running = all
            .iter()
            .filter(|t| matches!(t.state(), TaskState::Assigned | TaskState::Running))
            .count();
        max_running = max_running.max(running);
        let done = |id: &str| {
            all.iter()
                .any(|t| t.id == id && t.state() == TaskState::Succeeded)
        };
        if done(&a) && done(&b) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "tasks did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(max_running, 1, "max_running_tasks = 1 was exceeded");
    Ok(())
}

#[tokio::test]
async fn admin_actions_are_audited_and_whoami_answers() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    create_project(&c, "audited", None).await?;
    let (id, secret) = api_token(&c, "audited", Scope::Operator, 0).await?;
    let who = AdminServiceClient::new(c.channel(&secret).await?)
        .who_am_i(WhoAmIRequest {})
        .await?
        .into_inner()
        .token
        .unwrap();
    assert_eq!(
        (who.id.as_str(), who.project.as_str()),
        (id.as_str(), "audited")
    );
    let mut t = tasks_as(&c, &secret).await?;
    let task = t
        .submit(SubmitTaskRequest {
            spec: Some(shell("sleep 5")),
            ..Default::default()
        })
        .await?
        .into_inner()
        .task
        .unwrap();
    let mut adm = admin(&c).await?;
    // A new task's entry is written in the task's own commit: there once Submit answers.
    let at_submit = adm
        .list_audit(ListAuditRequest {
            action: "task.submit".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .entries;
    assert_eq!(
        at_submit
            .iter()
            .map(|e| e.target.as_str())
            .collect::<Vec<_>>(),
        [task.id.as_str()],
        "{at_submit:#?}"
    );
    t.cancel(CancelTaskRequest {
        id: task.id.clone(),
        reason: "not needed".into(),
    })
    .await?;
    adm.revoke_token(RevokeTokenRequest {
        id: id.clone(),
        reason: "rotation".into(),
    })
    .await?;
    let entries = adm
        .list_audit(ListAuditRequest::default())
        .await?
        .into_inner()
        .entries;
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    // Newest first (the submit and the cancel may share a millisecond: either order).
    assert_eq!(actions[0], "token.revoke", "{entries:#?}");
    let mut middle = actions[1..3].to_vec();
    middle.sort_unstable();
    assert_eq!(middle, ["task.cancel", "task.submit"], "{entries:#?}");
    assert_eq!(
        &actions[3..5],
        &["token.create", "project.create"],
        "{entries:#?}"
    );
    let cancel = entries
        .iter()
        .find(|e| e.action == "task.cancel")
        .expect("cancel entry");
    assert_eq!(
        (cancel.actor.as_str(), cancel.target.as_str()),
        (id.as_str(), task.id.as_str())
    );
    let submit = entries
        .iter()
        .find(|e| e.action == "task.submit")
        .expect("submit entry");
    assert_eq!(
        (
            submit.actor.as_str(),
            submit.target.as_str(),
            submit.project.as_str()
        ),
        (id.as_str(), task.id.as_str(), "audited")
    );
    assert!(cancel.peer.starts_with("127.0.0.1:"), "{cancel:?}");
    assert!(entries.iter().all(|e| e.at_ms > 0));
    // Filters.
    let only = adm
        .list_audit(ListAuditRequest {
            action: "task.cancel".into(),
            limit: 10,
            ..Default::default()
        })
        .await?
        .into_inner()
        .entries;
    assert_eq!(only.len(), 1);
    let (code, _) = code_and_message(
        adm.list_audit(ListAuditRequest {
            limit: 5000,
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    Ok(())
}
