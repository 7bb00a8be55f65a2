//! Load limits: a token over its rate gets `RESOURCE_EXHAUSTED` with a `retry-after-ms`
//! hint while other tokens carry on; a project's quota sets its tokens' rate; calls over
//! the global concurrency limit are refused at once; long-lived streams hold no slot and
//! outlive the per-RPC deadline.

use std::time::{Duration, Instant};

use scabbard_common::client::{
    AdminServiceClient, AgentServiceClient, ProjectServiceClient, TaskServiceClient,
};
use scabbard_common::error::retry_after;
use scabbard_common::proto::{
    AgentMessage, CreateProjectRequest, CreateTokenRequest, ListTasksRequest, Project,
    ProjectQuota, RegisterRequest, Scope, TokenKind, WatchTasksRequest,
};
use scabbard_tests::*;
use tonic::Code;

/// Creates an API token (cluster-wide admin creates it in `project`); returns its id and
/// secret.
async fn token(
    admin: &mut AdminServiceClient<scabbard_common::client::AuthedChannel>,
    name: &str,
    project: &str,
) -> anyhow::Result<(String, String)> {
    let r = admin
        .create_token(CreateTokenRequest {
            kind: TokenKind::Api as i32,
            name: name.into(),
            scopes: vec![Scope::Read as i32],
            project: project.into(),
            ttl_ms: 0,
            max_uses: 0,
        })
        .await?
        .into_inner();
    Ok((r.token.expect("token info").id, r.secret))
}

/// Calls `List` until refused; returns how many succeeded and the refusal.
async fn until_refused(c: &mut Tasks, max: usize) -> (usize, tonic::Status) {
    for ok in 0..max {
        if let Err(s) = c.list(ListTasksRequest::default()).await {
            return (ok, s);
        }
    }
    panic!("{max} calls in a row were all accepted");
}

#[tokio::test]
async fn a_client_over_its_rate_is_refused_with_a_hint_others_are_not() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = ControllerOpts {
        extra: ["--rate-limit", "5", "--rate-burst", "5"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let c = Controller::start(&dir.path().join("c"), free_port(), &opts)?;
    let addr = c.addr.to_string();
    let channel = tasks_client(&addr).await?; // waits until it accepts connections
    drop(channel);
    let mut admin = AdminServiceClient::new(admin_channel(&addr).await?);
    let (hog_id, hog) = token(&mut admin, "hog", "").await?;
    let (_, other) = token(&mut admin, "other", "").await?;
    let ch = scabbard_common::client::connect(&addr).await?;
    let mut hog_c = TaskServiceClient::new(with_token(ch.clone(), &hog));
    let mut other_c = TaskServiceClient::new(with_token(ch.clone(), &other));

    // The hog spends its burst of 5 (a 6th may fit if a refill lands meanwhile)...
    let (ok, refused) = until_refused(&mut hog_c, 50).await;
    assert!(
        (5..=6).contains(&ok),
        "{ok} calls accepted before the refusal"
    );
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains(&hog_id), "{}", refused.message());
    let hint = retry_after(&refused).expect("a retry-after-ms hint");
    assert!(
        hint > Duration::ZERO && hint <= Duration::from_millis(200),
        "hint {hint:?} (one request every 200 ms)"
    );
    let refused_at = Instant::now();

    // ...while the other token still has its own whole burst, and health stays open.
    for i in 0..5 {
        other_c
            .list(ListTasksRequest::default())
            .await
            .unwrap_or_else(|s| panic!("other client's call {i} refused: {s:?}"));
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for _ in 0..20 {
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?;
    }

    // After the hinted time the hog gets through again (one call's worth).
    tokio::time::sleep(hint.saturating_sub(refused_at.elapsed())).await;
    hog_c
        .list(ListTasksRequest::default())
        .await
        .expect("accepted after waiting the hinted time");
    Ok(())
}

#[tokio::test]
async fn a_project_quota_sets_the_rate_of_its_tokens() -> anyhow::Result<()> {
    let c = InProc::start_with(|cfg| {
        cfg.rate_limit_per_second = 1000;
        cfg.rate_limit_burst = 1000;
    })
    .await?;
    let ch = c.channel(ADMIN_TOKEN).await?;
    ProjectServiceClient::new(ch.clone())
        .create(CreateProjectRequest {
            project: Some(Project {
                name: "slow".into(),
                quota: Some(ProjectQuota {
                    requests_per_second: 1,
                    burst: 2,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await?;
    let mut admin = AdminServiceClient::new(ch);
    let (_, slow) = token(&mut admin, "slow", "slow").await?;
    let (_, fast) = token(&mut admin, "fast", "").await?;
    let mut slow_c = TaskServiceClient::new(c.channel(&slow).await?);
    let (ok, refused) = until_refused(&mut slow_c, 50).await;
    assert_eq!(ok, 2, "the project's burst");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let hint = retry_after(&refused).expect("hint");
    assert!(hint > Duration::from_millis(500) && hint <= Duration::from_secs(1));
    // A token of the default project runs on the controller's defaults.
    let mut fast_c = TaskServiceClient::new(c.channel(&fast).await?);
    for _ in 0..100 {
        fast_c.list(ListTasksRequest::default()).await?;
    }
    Ok(())
}

#[tokio::test]
async fn over_the_concurrency_limit_calls_are_refused_at_once() -> anyhow::Result<()> {
    let c = InProc::start_with(|cfg| {
        cfg.max_concurrent_requests = 1;
        cfg.rpc_timeout_ms = 2_000;
    })
    .await?;
    let agent_token = AgentServiceClient::new(scabbard_common::client::connect(&c.addr()).await?)
        .register(RegisterRequest {
            registration_token: TOKEN.into(),
            name: "slow-hello".into(),
            capabilities: vec!["shell".into()],
            slots: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .agent_token;
    // A session that never says Hello keeps its handler (and the only slot) busy until
    // the handler's deadline.
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1);
    let mut agents = AgentServiceClient::new(c.channel(&agent_token).await?);
    let session = tokio::spawn(async move {
        agents
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(drop)
    });
    let mut tasks = TaskServiceClient::new(c.channel(ADMIN_TOKEN).await?);
    let started = Instant::now();
    let refused = eventually("the slot to be taken", Duration::from_secs(5), || {
        let mut tasks = tasks.clone();
        async move { tasks.list(ListTasksRequest::default()).await.err() }
    })
    .await?;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_concurrent_requests"),
        "{}",
        refused.message()
    );
    assert!(retry_after(&refused).is_some());
    // Refused at once, not queued behind the busy call.
    let t = Instant::now();
    let again = tasks.list(ListTasksRequest::default()).await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);
    assert!(t.elapsed() < Duration::from_millis(500));

    // The handler's deadline frees the slot: the session ends with DEADLINE_EXCEEDED.
    let ended = session.await?.expect_err("the session handler timed out");
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(tx);
    eventually("the slot to come back", Duration::from_secs(5), || {
        let mut tasks = tasks.clone();
        async move { tasks.list(ListTasksRequest::default()).await.ok() }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn streams_hold_no_slot_and_outlive_the_rpc_deadline() -> anyhow::Result<()> {
    let c = InProc::start_with(|cfg| {
        cfg.max_concurrent_requests = 2;
        cfg.rpc_timeout_ms = 300;
    })
    .await?;
    let ch = c.channel(ADMIN_TOKEN).await?;
    let mut watches = Vec::new();
    for _ in 0..6 {
        let s = TaskServiceClient::new(ch.clone())
            .watch(WatchTasksRequest {
                ids: vec![],
                send_initial: false,
                ..Default::default()
            })
            .await?
            .into_inner();
        watches.push(s);
    }
    // Six open streams and a limit of two: unary calls still go through...
    let mut tasks = TaskServiceClient::new(ch.clone());
    for _ in 0..10 {
        tasks.list(ListTasksRequest::default()).await?;
    }
    // ...and, well past the 300 ms deadline, every stream still delivers.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let id = submit(&mut tasks, shell("true")).await?;
    for w in &mut watches {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.message())
            .await?
            .expect("stream open after the deadline")
            .expect("an event");
        assert_eq!(ev.task.expect("task").id, id);
    }
    Ok(())
}

#[test]
fn bad_limit_flags_are_refused_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(scabbard_bin())
            .args(["controller", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--rate-burst", "10"]);
    assert!(!ok);
    assert!(err.contains("rate_limit_burst"), "{err}");
    let (ok, err) = run(&["--rpc-timeout", "5ms"]);
    assert!(!ok);
    assert!(err.contains("rpc_timeout_ms"), "{err}");
    let (ok, err) = run(&["--max-message-bytes", "12"]);
    assert!(!ok);
    assert!(err.contains("max_message_bytes"), "{err}");
    let (ok, err) = run(&["--max-concurrent-requests", "many"]);
    assert!(!ok);
    assert!(err.contains("max-concurrent-requests"), "{err}");
}
