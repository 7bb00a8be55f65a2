//! Issue 12, "ident": breakers, identity and retry semantics under abuse, through real
//! processes (workers, controllers on etcd) and the in-process controller. Each test
//! reproduces the attack or fault and shows the cluster unaffected: another project's task
//! still runs promptly. Waits are on conditions with deadlines, never fixed sleeps.

use std::time::{Duration, Instant};

use scabbard_common::client::{AdminServiceClient, AgentServiceClient, TaskServiceClient};
use scabbard_common::proto::{
    BreakerState, CreateTokenRequest, ErrorClass, FailureClass, GetTaskRequest,
    ListBreakersRequest, ListTasksRequest, Outcome, RegisterRequest, ResetBreakerRequest,
    RetryPolicy, Scope, SubmitTaskRequest, TaskResult, TaskSpec, TaskState, TokenKind,
};
use scabbard_tests::agent::FakeAgent;
use scabbard_tests::etcd::EtcdCluster;
use scabbard_tests::sec::{admin, api_token, create_project, tasks_as};
use scabbard_tests::{
    ADMIN_TOKEN, Controller, ControllerOpts, InProc, TOKEN, Tasks, Worker, code_and_message,
    eventually, free_port, scabbard_bin, shell, wait_state, with_token,
};
use tonic::Code;

const T: Duration = Duration::from_secs(30);
/// "Promptly": well under the 30 s an open agent breaker would hold a task.
const PROMPT: Duration = Duration::from_secs(8);

async fn submit_in(c: &mut Tasks, project: &str, spec: TaskSpec) -> anyhow::Result<String> {
    Ok(c.submit(SubmitTaskRequest {
        spec: Some(spec),
        idempotency_key: String::new(),
        project: project.into(),
    })
    .await?
    .into_inner()
    .task
    .unwrap()
    .id)
}

fn named(script: &str, breaker: &str) -> TaskSpec {
    TaskSpec {
        breakers: vec![breaker.into()],
        ..shell(script)
    }
}

/// Project A's failing `false` tasks (five, the threshold) neither open the agent breaker
/// nor A's named breaker for B: B's task naming the same breaker runs at once on the same
/// worker. ListBreakers as B shows nothing of A; a B operator cannot reset the agent
/// breaker nor touch A's.
#[tokio::test]
async fn one_projects_failures_never_hold_another_projects_tasks() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    create_project(&c, "alpha", None).await?;
    create_project(&c, "beta", None).await?;
    let dir = tempfile::tempdir()?;
    let _w = Worker::start(&c.addr(), &dir.path().join("w"), "w", 2)?;
    let mut adm = admin(&c).await?;
    let agent_id = scabbard_tests::wait_agent(&c.addr(), "the worker", |a| a.name == "w")
        .await?
        .id;
    let mut tasks = tasks_as(&c, ADMIN_TOKEN).await?;

    // Five plain failing `false` tasks in alpha (the threshold): they used to open the
    // agent breaker, and beta's next task waited 30 s.
    for _ in 0..5 {
        let id = submit_in(&mut tasks, "alpha", shell("false")).await?;
        let t = wait_state(&mut tasks, &id, None, T).await?;
        assert_eq!(t.state(), TaskState::Failed);
    }
    let started = Instant::now();
    let first_b = submit_in(&mut tasks, "beta", shell("true")).await?;
    wait_state(&mut tasks, &first_b, Some(TaskState::Succeeded), PROMPT).await?;
    assert!(started.elapsed() < PROMPT);
    // Five more in alpha (the threshold): exit code 1, each naming registry:x.
    for _ in 0..5 {
        let id = submit_in(&mut tasks, "alpha", named("false", "registry:x")).await?;
        let t = wait_state(&mut tasks, &id, None, T).await?;
        assert_eq!(t.state(), TaskState::Failed);
    }
    let list = adm
        .list_breakers(ListBreakersRequest { all: true })
        .await?
        .into_inner()
        .breakers;
    assert!(
        !list.iter().any(|b| b.key == format!("agent:{agent_id}")),
        "exit codes never count against the agent: {list:?}"
    );
    let alpha_key = "project/alpha/registry:x";
    assert!(
        list.iter()
            .any(|b| b.key == alpha_key && b.state() == BreakerState::Open && b.project == "alpha"),
        "alpha's own breaker opened: {list:?}"
    );
    // Alpha's next task naming it waits; beta's naming the same thing runs at once.
    let held = submit_in(&mut tasks, "alpha", named("true", "registry:x")).await?;
    let started = Instant::now();
    let b_task = submit_in(&mut tasks, "beta", named("true", "registry:x")).await?;
    let t = wait_state(&mut tasks, &b_task, Some(TaskState::Succeeded), PROMPT).await?;
    assert!(started.elapsed() < PROMPT, "{t:?}");
    let plain = submit_in(&mut tasks, "beta", shell("true")).await?;
    wait_state(&mut tasks, &plain, Some(TaskState::Succeeded), PROMPT).await?;
    assert_eq!(
        tasks
            .get(GetTaskRequest { id: held.clone() })
            .await?
            .into_inner()
            .state(),
        TaskState::Queued,
        "alpha's task waits for alpha's open breaker"
    );

    // Beta sees nothing of alpha's breakers (ids, errors).
    let (_, beta_read) = api_token(&c, "beta", Scope::Read, 0).await?;
    let mut beta_adm = AdminServiceClient::new(c.channel(&beta_read).await?);
    let seen = beta_adm
        .list_breakers(ListBreakersRequest { all: true })
        .await?
        .into_inner()
        .breakers;
    assert!(
        seen.iter()
            .all(|b| b.project != "alpha" && !b.last_error.contains("task")),
        "{seen:?}"
    );
    let (_, alpha_read) = api_token(&c, "alpha", Scope::Read, 0).await?;
    let mine = AdminServiceClient::new(c.channel(&alpha_read).await?)
        .list_breakers(ListBreakersRequest { all: true })
        .await?
        .into_inner()
        .breakers;
    assert!(mine.iter().any(|b| b.key == alpha_key), "{mine:?}");

    // A beta operator may not reset the global agent breaker, nor see alpha's.
    let (_, beta_op) = api_token(&c, "beta", Scope::Operator, 0).await?;
    let mut beta_op = AdminServiceClient::new(c.channel(&beta_op).await?);
    let (code, msg) = code_and_message(
        beta_op
            .reset_breaker(ResetBreakerRequest {
                key: format!("agent:{agent_id}"),
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("cluster-wide"), "{msg}");
    let (code, msg) = code_and_message(
        beta_op
            .reset_breaker(ResetBreakerRequest {
                key: alpha_key.into(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound, "{msg}");
    // Alpha's operator resets it by its bare name; the held task then runs.
    let (_, alpha_op) = api_token(&c, "alpha", Scope::Operator, 0).await?;
    let b = AdminServiceClient::new(c.channel(&alpha_op).await?)
        .reset_breaker(ResetBreakerRequest {
            key: "registry:x".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        (b.key.as_str(), b.state()),
        (alpha_key, BreakerState::Closed)
    );
    wait_state(&mut tasks, &held, Some(TaskState::Succeeded), T).await?;
    Ok(())
}

fn infra_failure() -> TaskResult {
    TaskResult {
        outcome: Outcome::Failed as i32,
        message: "engine went away".into(),
        error_class: ErrorClass::Infrastructure as i32,
        ..Default::default()
    }
}

/// `max_infra_retries: 0` means no infrastructure retry, `retry_on` without
/// INFRASTRUCTURE too; listing it retries. Another project's task runs meanwhile.
#[tokio::test]
async fn retry_on_and_max_infra_retries_zero_are_honoured() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let mut agent = FakeAgent::connect(&c.addr(), "fake").await?;
    let mut tasks = tasks_as(&c, ADMIN_TOKEN).await?;
    let cases = [
        (
            "max_infra_retries: 0",
            TaskSpec {
                max_infra_retries: Some(0),
                ..shell("true")
            },
            1,
        ),
        (
            "retry_on: [exit_code]",
            TaskSpec {
                retry: Some(RetryPolicy {
                    max_attempts: 3,
                    retry_on: vec![FailureClass::ExitCode as i32],
                    ..Default::default()
                }),
                ..shell("true")
            },
            1,
        ),
        (
            "retry_on: [infrastructure], max_infra_retries: 1",
            TaskSpec {
                retry: Some(RetryPolicy {
                    initial_backoff_ms: 20,
                    retry_on: vec![FailureClass::Infrastructure as i32],
                    max_infra_retries: Some(1),
                    ..Default::default()
                }),
                ..shell("true")
            },
            2,
        ),
    ];
    for (what, spec, attempts) in cases {
        let id = submit_in(&mut tasks, "default", spec).await?;
        for _ in 0..attempts {
            let a = agent.accept_next(T).await?;
            assert_eq!(a.task_id, id, "{what}");
            agent.finish(&id, a.fencing_token, infra_failure()).await?;
        }
        let t = wait_state(&mut tasks, &id, None, T).await?;
        assert_eq!(t.state(), TaskState::Failed, "{what}: {t:?}");
        assert_eq!(t.attempts.len(), attempts, "{what}: {t:?}");
        // Nothing more is assigned for it; the next task runs at once.
        let next = submit_in(&mut tasks, "default", shell("true")).await?;
        let a = agent.accept_next(PROMPT).await?;
        assert_eq!(a.task_id, next, "{what}: no further attempt of {id}");
        agent
            .finish(
                &next,
                a.fencing_token,
                TaskResult {
                    outcome: Outcome::Succeeded as i32,
                    ..Default::default()
                },
            )
            .await?;
    }
    Ok(())
}

fn register(agent_id: &str, proof: &str) -> RegisterRequest {
    RegisterRequest {
        registration_token: TOKEN.into(),
        name: "intruder".into(),
        slots: 1,
        agent_id: agent_id.into(),
        current_agent_token: proof.into(),
        ..Default::default()
    }
}

/// Anyone holding a registration token used to be able to re-register a live agent id and
/// take it over. Now that needs the agent's current token; the live agent keeps its
/// session and its tasks, and a real worker restarting comes back as itself.
#[tokio::test]
async fn reregistering_a_live_agent_id_needs_proof() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let mut victim = FakeAgent::connect(&c.addr(), "victim").await?;
    let mut tasks = tasks_as(&c, ADMIN_TOKEN).await?;
    let mut agents = AgentServiceClient::new(scabbard_common::client::connect(&c.addr()).await?);
    for proof in ["", "scbd_agent_guessed", ADMIN_TOKEN] {
        let (code, msg) =
            code_and_message(agents.register(register(&victim.agent_id, proof)).await);
        assert!(
            matches!(code, Code::PermissionDenied | Code::Unauthenticated),
            "{code:?} {msg}"
        );
    }
    // The victim still has its session and gets (and finishes) work.
    let id = submit_in(&mut tasks, "default", shell("true")).await?;
    let a = victim.accept_next(PROMPT).await?;
    assert_eq!(a.task_id, id);
    victim
        .finish(
            &id,
            a.fencing_token,
            TaskResult {
                outcome: Outcome::Succeeded as i32,
                ..Default::default()
            },
        )
        .await?;
    wait_state(&mut tasks, &id, Some(TaskState::Succeeded), T).await?;
    // With its own token as proof it re-registers (a worker coming back as itself).
    let again = agents
        .register(register(&victim.agent_id, &victim.token))
        .await?
        .into_inner();
    assert_eq!(again.agent_id, victim.agent_id);
    // A fresh agent still registers with the registration token alone.
    agents.register(register("", "")).await?;

    // A real worker killed and restarted keeps its identity and runs work again.
    let dir = tempfile::tempdir()?;
    let mut w = Worker::start(&c.addr(), dir.path(), "real", 1)?;
    let first = scabbard_tests::wait_agent(&c.addr(), "the worker", |a| a.name == "real")
        .await?
        .id;
    // Registered is not yet saved: wait for the identity on disk before the kill.
    eventually("the worker's identity on disk", T, || async {
        (w.agent_id().as_deref() == Some(first.as_str())).then_some(())
    })
    .await?;
    w.proc.kill9();
    let _w = Worker::start(&c.addr(), dir.path(), "real", 1)?;
    drop(victim); // so the task goes to the real worker
    let id = submit_in(&mut tasks, "default", shell("true")).await?;
    wait_state(&mut tasks, &id, Some(TaskState::Succeeded), T).await?;
    let t = tasks.get(GetTaskRequest { id }).await?.into_inner();
    assert_eq!(
        t.attempts.last().unwrap().agent_id,
        first,
        "same agent after restart"
    );
    Ok(())
}

/// Ids of another project answer NOT_FOUND exactly like unknown ids, and unknown enum
/// values are refused with INVALID_ARGUMENT.
#[tokio::test]
async fn foreign_ids_are_not_found_and_unknown_enums_are_refused() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    create_project(&c, "alpha", None).await?;
    create_project(&c, "beta", None).await?;
    let mut tasks = tasks_as(&c, ADMIN_TOKEN).await?;
    let alpha_task = submit_in(&mut tasks, "alpha", shell("true")).await?;
    let (_, beta) = api_token(&c, "beta", Scope::Admin, 0).await?;
    let mut beta_tasks = tasks_as(&c, &beta).await?;
    let (foreign, fmsg) = code_and_message(
        beta_tasks
            .get(GetTaskRequest {
                id: alpha_task.clone(),
            })
            .await,
    );
    let unknown_id = format!("{}0", &alpha_task[..alpha_task.len() - 1]);
    let (unknown, umsg) = code_and_message(beta_tasks.get(GetTaskRequest { id: unknown_id }).await);
    assert_eq!((foreign, unknown), (Code::NotFound, Code::NotFound));
    assert!(
        !fmsg.contains("alpha") && fmsg.contains("not found"),
        "{fmsg} / {umsg}"
    );

    let mut adm = admin(&c).await?;
    for (what, req) in [
        (
            "kind",
            CreateTokenRequest {
                kind: 99,
                name: "x".into(),
                scopes: vec![Scope::Read as i32],
                ..Default::default()
            },
        ),
        (
            "scopes",
            CreateTokenRequest {
                kind: TokenKind::Api as i32,
                name: "x".into(),
                scopes: vec![42],
                ..Default::default()
            },
        ),
    ] {
        let (code, msg) = code_and_message(adm.create_token(req).await);
        assert_eq!(code, Code::InvalidArgument, "{what}: {msg}");
        assert!(msg.contains(what), "{msg}");
    }
    let (code, _) = code_and_message(
        tasks
            .list(ListTasksRequest {
                states: vec![77],
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    // The cluster still serves: another project's task is created promptly.
    let mut beta_tasks = TaskServiceClient::new(with_token(
        scabbard_common::client::connect(&c.addr()).await?,
        &beta,
    ));
    beta_tasks
        .submit(scabbard_tests::sec::noop_submit("beta"))
        .await?;
    Ok(())
}

/// etcd mode refuses to start without an advertise address, naming the flag.
#[tokio::test]
async fn etcd_mode_without_an_advertise_address_refuses_to_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            std::process::Command::new(scabbard_bin())
                .args([
                    "controller",
                    "--listen",
                    "127.0.0.1:0",
                    "--store",
                    "etcd",
                    "--etcd-endpoints",
                    "http://127.0.0.1:1",
                    "--registration-token",
                    TOKEN,
                ])
                .arg("--data-dir")
                .arg(&dir)
                .env_remove("SCABBARD_ADVERTISE_ADDR")
                .output()
        }
    })
    .await??;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--advertise-addr"), "{err}");
    Ok(())
}

/// Register on a follower answers with the leader (UNAVAILABLE) before it touches the
/// registration token: a single-use token still registers on the leader afterwards. Both
/// controllers advertise distinct addresses; the leader stays put meanwhile.
#[tokio::test]
async fn register_on_a_follower_does_not_use_up_a_single_use_token() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let dir = tempfile::tempdir()?;
    let opts = ControllerOpts {
        lease: "8s",
        extra: vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            etcd.endpoints(),
            "--logs-dir".into(),
            dir.path().join("shared-logs").display().to_string(),
            "--leader-lease-ttl".into(),
            "2s".into(),
        ],
        ..ControllerOpts::default()
    };
    let cs = [
        Controller::start(&dir.path().join("c0"), free_port(), &opts)?,
        Controller::start(&dir.path().join("c1"), free_port(), &opts)?,
    ];
    let addrs: Vec<String> = cs.iter().map(|c| c.addr.to_string()).collect();
    let status = |addr: String| async move {
        let ch = scabbard_common::client::connect(&addr).await.ok()?;
        AdminServiceClient::new(with_token(ch, ADMIN_TOKEN))
            .cluster_status(scabbard_common::proto::ClusterStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    let (leader, follower) = eventually("a leader and a follower", T, || {
        let addrs = addrs.clone();
        async move {
            let a = status(addrs[0].clone()).await?;
            let b = status(addrs[1].clone()).await?;
            match (a.answered_by_leader, b.answered_by_leader) {
                (true, false) if b.leader == addrs[0] => Some((addrs[0].clone(), addrs[1].clone())),
                (false, true) if a.leader == addrs[1] => Some((addrs[1].clone(), addrs[0].clone())),
                _ => None,
            }
        }
    })
    .await?;
    let mut adm = eventually("the admin token on the leader", T, || {
        let leader = leader.clone();
        async move {
            let ch = scabbard_common::client::connect(&leader).await.ok()?;
            let mut a = AdminServiceClient::new(with_token(ch, ADMIN_TOKEN));
            a.who_am_i(scabbard_common::proto::WhoAmIRequest {})
                .await
                .ok()?;
            Some(a)
        }
    })
    .await?;
    let once = adm
        .create_token(CreateTokenRequest {
            kind: TokenKind::Registration as i32,
            name: "once".into(),
            max_uses: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    let req = RegisterRequest {
        registration_token: once,
        name: "single".into(),
        slots: 1,
        ..Default::default()
    };
    let mut on_follower =
        AgentServiceClient::new(scabbard_common::client::connect(&follower).await?);
    for _ in 0..3 {
        let (code, msg) = code_and_message(on_follower.register(req.clone()).await);
        assert_eq!(code, Code::Unavailable, "{msg}");
    }
    let mut on_leader = AgentServiceClient::new(scabbard_common::client::connect(&leader).await?);
    let r = on_leader.register(req.clone()).await?.into_inner();
    assert!(!r.agent_id.is_empty());
    // Its one use is now spent.
    let (code, _) = code_and_message(on_leader.register(req).await);
    assert_eq!(code, Code::Unauthenticated);
    Ok(())
}
