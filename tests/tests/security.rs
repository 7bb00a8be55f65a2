//! The security model end to end: every bad credential gets its exact code, revocation
//! takes effect at once (a live agent stream drops within a second), projects fence every
//! RPC that takes an id, quotas and registration-token limits hold, and every admin action
//! lands in the audit log.

use std::time::{Duration, Instant};

use scabbard_common::client::{
    self, AdminServiceClient, AgentServiceClient, ProjectServiceClient, TaskServiceClient,
};
use scabbard_common::proto::{
    CancelTaskRequest, CreateProjectRequest, CreateTokenRequest, DeleteProjectRequest,
    DrainAgentRequest, GetProjectRequest, GetTaskRequest, ListAuditRequest, ListTasksRequest,
    ListTokensRequest, Project, ProjectQuota, RegisterRequest, RevokeTokenRequest,
    RotateAgentTokenRequest, Scope, SubmitTaskRequest, TaskLogsRequest, TaskState, TokenKind,
    UpdateProjectRequest, WatchTasksRequest, WhoAmIRequest,
};
use scabbard_tests::*;
use tonic::Code;

async fn admin(c: &InProc) -> anyhow::Result<AdminServiceClient<client::AuthedChannel>> {
    Ok(AdminServiceClient::new(c.channel(ADMIN_TOKEN).await?))
}

async fn create_project(c: &InProc, name: &str, quota: Option<ProjectQuota>) -> anyhow::Result<()> {
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

async fn api_token(
    c: &InProc,
    project: &str,
    scope: Scope,
    ttl_ms: u64,
) -> anyhow::Result<(String, String)> {
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

async fn tasks_as(c: &InProc, token: &str) -> anyhow::Result<Tasks> {
    Ok(TaskServiceClient::new(c.channel(token).await?))
}

fn noop_submit(project: &str) -> SubmitTaskRequest {
    SubmitTaskRequest {
        spec: Some(shell("true")),
        idempotency_key: String::new(),
        project: project.into(),
    }
}

#[tokio::test]
async fn each_bad_credential_gets_its_code() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let plain = client::connect(&c.addr()).await?;

    // Missing token.
    let mut t = TaskServiceClient::new(plain.clone());
    let (code, msg) = code_and_message(t.list(ListTasksRequest::default()).await);
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("authorization"), "{msg}");
    // Garbage and unknown tokens.
    for bad in [
        "nonsense",
        "scbd_api_0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let (code, msg) = code_and_message(
            tasks_as(&c, bad)
                .await?
                .list(ListTasksRequest::default())
                .await,
        );
        assert_eq!(code, Code::Unauthenticated, "{bad}: {msg}");
    }
    // A malformed header (not "Bearer …").
    let mut req = tonic::Request::new(ListTasksRequest::default());
    req.metadata_mut()
        .insert("authorization", "Basic Zm9vOmJhcg==".parse()?);
    assert_eq!(code_and_message(t.list(req).await).0, Code::Unauthenticated);

    // Expired.
    create_project(&c, "team-a", None).await?;
    let (_, short) = api_token(&c, "team-a", Scope::Read, 300).await?;
    let mut st = tasks_as(&c, &short).await?;
    st.list(ListTasksRequest::default()).await?;
    let (code, msg) = eventually(
        "the short-lived token to expire",
        Duration::from_secs(10),
        || {
            let mut st = st.clone();
            async move {
                match st.list(ListTasksRequest::default()).await {
                    Err(s) => Some((s.code(), s.message().to_string())),
                    Ok(_) => None,
                }
            }
        },
    )
    .await?;
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("expired"), "{msg}");

    // Revoked: refused on the very next call.
    let (id, secret) = api_token(&c, "team-a", Scope::Submit, 0).await?;
    let mut rt = tasks_as(&c, &secret).await?;
    rt.submit(noop_submit("")).await?;
    admin(&c)
        .await?
        .revoke_token(RevokeTokenRequest {
            id: id.clone(),
            reason: "leaked".into(),
        })
        .await?;
    let (code, msg) = code_and_message(rt.list(ListTasksRequest::default()).await);
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("revoked"), "{msg}");

    // Missing scope.
    let (_, reader) = api_token(&c, "team-a", Scope::Read, 0).await?;
    let mut r = tasks_as(&c, &reader).await?;
    r.list(ListTasksRequest::default()).await?;
    let (code, msg) = code_and_message(r.submit(noop_submit("")).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("submit"), "{msg}");
    let (code, _) = code_and_message(
        AdminServiceClient::new(c.channel(&reader).await?)
            .create_token(CreateTokenRequest::default())
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);

    // Wrong kind: a registration token is not an API token, an API token is not an agent's.
    let reg = admin(&c)
        .await?
        .create_token(CreateTokenRequest {
            kind: TokenKind::Registration as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    assert!(reg.starts_with("scbd_reg_"));
    assert_eq!(
        code_and_message(
            tasks_as(&c, &reg)
                .await?
                .list(ListTasksRequest::default())
                .await
        )
        .0,
        Code::PermissionDenied
    );
    assert_eq!(
        code_and_message(
            AgentServiceClient::new(c.channel(ADMIN_TOKEN).await?)
                .rotate_token(RotateAgentTokenRequest {})
                .await
        )
        .0,
        Code::PermissionDenied
    );

    // Foreign project on submit.
    create_project(&c, "team-b", None).await?;
    let (_, a_submit) = api_token(&c, "team-a", Scope::Submit, 0).await?;
    let (code, msg) = code_and_message(
        tasks_as(&c, &a_submit)
            .await?
            .submit(noop_submit("team-b"))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("team-b"), "{msg}");

    // Health and reflection stay open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(plain);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(())
}

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
    for (name, call) in cases {
        let r = call.await;
        let s = r.expect_err(name);
        assert_eq!(s.code(), Code::PermissionDenied, "{name}: {}", s.message());
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
async fn revoked_agent_token_drops_the_live_stream_within_a_second() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let dir = tempfile::tempdir()?;
    let mut w = Worker::start(&c.addr(), dir.path(), "w1", 1)?;
    let agent = wait_agent(&c.addr(), "the worker to connect", |a| {
        a.name == "w1" && a.status == 1
    })
    .await?;
    let mut adm = admin(&c).await?;
    let tokens = adm
        .list_tokens(ListTokensRequest {
            kind: TokenKind::Agent as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .tokens;
    let tok = tokens
        .iter()
        .find(|t| t.agent_id == agent.id)
        .expect("agent token listed");
    assert!(tok.hint.starts_with("scbd_agent_"));
    let revoked_at = Instant::now();
    adm.revoke_token(RevokeTokenRequest {
        id: tok.id.clone(),
        reason: "host decommissioned".into(),
    })
    .await?;
    wait_agent(&c.addr(), "the agent's stream to drop", |a| {
        a.id == agent.id && a.status != 1
    })
    .await?;
    let took = revoked_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "stream dropped after {took:?}"
    );
    // The worker cannot come back with the revoked token.
    let token = w.agent_token().expect("worker identity");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.try_send(scabbard_common::proto::AgentMessage {
        msg: Some(scabbard_common::proto::agent_message::Msg::Hello(
            Default::default(),
        )),
    })?;
    let mut agents = AgentServiceClient::new(c.channel(&token).await?);
    let (code, msg) = code_and_message(
        agents
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    // The worker does not sneak back in by registering again: it stops, saying why.
    let waited = Instant::now();
    let status = tokio::task::spawn_blocking(move || w.proc.wait_exit(Duration::from_secs(20)))
        .await?
        .expect("worker status");
    // (wait_exit kills it at the deadline: make sure it exited by itself well before.)
    assert!(
        waited.elapsed() < Duration::from_secs(15),
        "the worker kept running"
    );
    assert!(!status.success());
    Ok(())
}

#[tokio::test]
async fn agent_tokens_rotate_and_registration_tokens_expire_and_run_out() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let mut adm = admin(&c).await?;
    let reg = adm
        .create_token(CreateTokenRequest {
            kind: TokenKind::Registration as i32,
            name: "two hosts".into(),
            max_uses: 2,
            ..Default::default()
        })
        .await?
        .into_inner();
    let info = reg.token.unwrap();
    assert!(
        info.expires_at_ms > 0,
        "registration tokens expire by default"
    );
    let mut agents = AgentServiceClient::new(client::connect(&c.addr()).await?);
    let register = |token: &str, name: &str| RegisterRequest {
        registration_token: token.into(),
        name: name.into(),
        capabilities: vec!["shell".into()],
        slots: 1,
        ..Default::default()
    };
    let a = agents
        .register(register(&reg.secret, "a"))
        .await?
        .into_inner();
    agents.register(register(&reg.secret, "b")).await?;
    let (code, msg) = code_and_message(agents.register(register(&reg.secret, "c")).await);
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("used all 2"), "{msg}");
    let listed = adm
        .list_tokens(ListTokensRequest {
            kind: TokenKind::Registration as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .tokens;
    assert_eq!(listed.iter().find(|t| t.id == info.id).unwrap().uses, 2);

    // Rotation: the new token works, the old one is refused.
    let mut rot = AgentServiceClient::new(c.channel(&a.agent_token).await?);
    let new = rot
        .rotate_token(RotateAgentTokenRequest {})
        .await?
        .into_inner()
        .agent_token;
    assert_ne!(new, a.agent_token);
    let (code, _) = code_and_message(rot.rotate_token(RotateAgentTokenRequest {}).await);
    assert_eq!(code, Code::Unauthenticated);
    AgentServiceClient::new(c.channel(&new).await?)
        .rotate_token(RotateAgentTokenRequest {})
        .await?;

    // A short-lived registration token stops working.
    let short = adm
        .create_token(CreateTokenRequest {
            kind: TokenKind::Registration as i32,
            ttl_ms: 200,
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    let code = eventually(
        "the registration token to expire",
        Duration::from_secs(10),
        || {
            let mut agents = agents.clone();
            let r = register(&short, "late");
            async move { agents.register(r).await.err().map(|s| s.code()) }
        },
    )
    .await?;
    assert_eq!(code, Code::Unauthenticated);
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
    t.cancel(CancelTaskRequest {
        id: task.id.clone(),
        reason: "not needed".into(),
    })
    .await?;
    let mut adm = admin(&c).await?;
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
    // Newest first.
    assert_eq!(
        &actions[..4],
        &[
            "token.revoke",
            "task.cancel",
            "token.create",
            "project.create"
        ],
        "{entries:#?}"
    );
    let cancel = &entries[1];
    assert_eq!(
        (cancel.actor.as_str(), cancel.target.as_str()),
        (id.as_str(), task.id.as_str())
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

#[test]
fn first_start_prints_one_admin_token_and_later_starts_do_not() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let start =
        || -> anyhow::Result<(std::process::Child, std::sync::mpsc::Receiver<String>, u16)> {
            let port = free_port();
            let mut child = std::process::Command::new(scabbard_bin())
                .args(["controller", "--listen", &format!("127.0.0.1:{port}")])
                .arg("--data-dir")
                .arg(dir.path())
                .env("SCABBARD_LOG", "warn")
                .env_remove("SCABBARD_BOOTSTRAP_TOKEN")
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            let out = BufReader::new(child.stdout.take().unwrap());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in out.lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            Ok((child, rx, port))
        };
    let (mut first, rx, _) = start()?;
    // The banner ends with the login hint.
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("scabbard login")) {
        lines.push(rx.recv_timeout(Duration::from_secs(20))?);
    }
    let tokens: Vec<&String> = lines
        .iter()
        .filter(|l| l.trim().starts_with("scbd_api_"))
        .collect();
    assert_eq!(tokens.len(), 1, "{lines:?}");
    // It works as an admin token.
    let token = tokens[0].trim().to_string();
    let port_line = lines
        .iter()
        .find(|l| l.starts_with("listening on "))
        .expect("listening line");
    let addr = port_line
        .trim_start_matches("listening on ")
        .trim()
        .to_string();
    rt.block_on(async {
        let ch = client::connect(&addr).await?;
        AdminServiceClient::new(with_token(ch, &token))
            .who_am_i(WhoAmIRequest {})
            .await?;
        anyhow::Ok(())
    })?;
    let _ = first.kill();
    let _ = first.wait();

    let (mut second, rx, port) = start()?;
    rt.block_on(eventually(
        "the restarted controller to serve",
        Duration::from_secs(20),
        || async move {
            let ch = client::connect(&format!("127.0.0.1:{port}")).await.ok()?;
            AdminServiceClient::new(with_token(ch, ADMIN_TOKEN))
                .cluster_status(scabbard_common::proto::ClusterStatusRequest {})
                .await
                .ok()
        },
    ))?;
    let later: Vec<String> = rx.try_iter().collect();
    assert!(later.iter().all(|l| !l.contains("scbd_api_")), "{later:?}");
    let _ = second.kill();
    let _ = second.wait();
    Ok(())
}

#[tokio::test]
async fn revoking_an_api_token_closes_its_open_watch() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let (id, secret) = api_token(&c, "default", Scope::Read, 0).await?;
    let mut events = tasks_as(&c, &secret)
        .await?
        .watch(WatchTasksRequest::default())
        .await?
        .into_inner();
    let revoked = Instant::now();
    admin(&c)
        .await?
        .revoke_token(RevokeTokenRequest {
            id,
            reason: "gone".into(),
        })
        .await?;
    let end = tokio::time::timeout(Duration::from_secs(1), events.message()).await?;
    let status = end.expect_err("the watch ends with an error");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(revoked.elapsed() < Duration::from_secs(1));
    Ok(())
}
