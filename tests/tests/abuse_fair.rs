//! Fairness and bounded resources under abuse, through real controller and worker
//! processes: an unplaceable flood in one project, a request flood against the default rate
//! limit, a cron firing every second, unread Watch streams, silent and surplus TCP
//! connections, an agent that stops reading, an agent that never accepts. Each test also
//! shows that another project's task still runs promptly.

use std::time::{Duration, Instant};

use futures::StreamExt;
use scabbard_common::client::{self, ProjectServiceClient};
use scabbard_common::proto::admin_service_client::AdminServiceClient;
use scabbard_common::proto::schedule_service_client::ScheduleServiceClient;
use scabbard_common::proto::{
    AgentStatus, CreateProjectRequest, CreateScheduleRequest, CreateTokenRequest, ErrorClass,
    Finished, GetTaskRequest, Outcome, Project, Requirements, ScheduleSpec, Scope,
    SubmitTaskRequest, Task, TaskResult, TaskSpec, TaskState, TokenKind, WatchTasksRequest,
    agent_message,
};
use scabbard_tests::agent::FakeAgent;
use scabbard_tests::wf::Cluster;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(60);
/// How soon another project's task must start on an idle worker, even under the abuse.
const PROMPT: Duration = Duration::from_secs(5);

async fn create_projects(c: &Cluster, names: &[&str]) -> anyhow::Result<()> {
    let mut projects = ProjectServiceClient::new(c.channel().await?);
    for name in names {
        projects
            .create(CreateProjectRequest {
                project: Some(Project {
                    name: name.to_string(),
                    ..Default::default()
                }),
            })
            .await?;
    }
    Ok(())
}

async fn submit_in(c: &mut Tasks, project: &str, spec: TaskSpec) -> anyhow::Result<Task> {
    Ok(c.submit(SubmitTaskRequest {
        spec: Some(spec),
        project: project.into(),
        ..Default::default()
    })
    .await?
    .into_inner()
    .task
    .unwrap())
}

/// Submits a `true` task in `project` and checks it is assigned within [`PROMPT`] and
/// succeeds.
async fn runs_promptly(tasks: &mut Tasks, project: &str) -> anyhow::Result<Task> {
    let t = submit_in(tasks, project, shell("true")).await?;
    let done = wait_state(tasks, &t.id, None, T).await?;
    assert_eq!(done.state(), TaskState::Succeeded, "{done:#?}");
    let waited = done.attempts[0].assigned_at_ms - t.created_at_ms;
    assert!(
        waited <= PROMPT.as_millis() as i64,
        "project {project}'s task waited {waited} ms for an idle worker"
    );
    Ok(done)
}

fn unplaceable() -> TaskSpec {
    let mut spec = shell("true");
    spec.requirements = Some(Requirements {
        labels: [("zone".to_string(), "mars".to_string())].into(),
        ..Default::default()
    });
    spec
}

#[tokio::test]
async fn ten_thousand_unplaceable_tasks_in_one_project_do_not_delay_another() -> anyhow::Result<()>
{
    // No rate limit here: this test is about dispatch, not about the flood's rate.
    let c = Cluster::start(&["w0"], 2, &["--rate-limit", "0"])?;
    create_projects(&c, &["a", "b"]).await?;
    let tasks = tasks_client(&c.addr()).await?;
    wait_agent(&c.addr(), "the worker", |a| a.name == "w0").await?;
    // 10,600 tasks asking for a label no worker has, older than anything of project b.
    let submitted = futures::stream::iter(0..10_600)
        .map(|_| {
            let mut tasks = tasks.clone();
            async move { submit_in(&mut tasks, "a", unplaceable()).await }
        })
        .buffer_unordered(32)
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await;
    assert_eq!(submitted, 10_600);
    let mut tasks = tasks.clone();
    // Project b's tasks run at once on the idle worker, one after another.
    for _ in 0..5 {
        runs_promptly(&mut tasks, "b").await?;
    }
    // Project a's own placeable task is not stuck behind its unplaceable ones either.
    runs_promptly(&mut tasks, "a").await?;
    let mut admin = AdminServiceClient::new(c.channel().await?);
    let status = admin
        .cluster_status(scabbard_common::proto::ClusterStatusRequest {})
        .await?
        .into_inner();
    assert!(
        status.queued_tasks >= 10_600,
        "the flood is still queued: {status:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_request_flood_hits_the_default_rate_limit_and_others_are_unaffected()
-> anyhow::Result<()> {
    // Default flags: the default per-token rate limit applies.
    let c = Cluster::start(&["w0"], 2, &[])?;
    create_projects(&c, &["a", "b"]).await?;
    let mut admin = AdminServiceClient::new(c.channel().await?);
    let secret = admin
        .create_token(CreateTokenRequest {
            kind: TokenKind::Api as i32,
            name: "flooder".into(),
            scopes: vec![Scope::Submit as i32],
            project: "a".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    let flooder = scabbard_common::client::TaskServiceClient::new(with_token(
        client::connect(&c.addr()).await?,
        &secret,
    ));
    // Cheap calls as fast as 64 callers go, until the limit answers (or the deadline).
    let end = Instant::now() + Duration::from_secs(60);
    let limited = futures::stream::iter(0..u32::MAX)
        .take_while(|_| futures::future::ready(Instant::now() < end))
        .map(|_| {
            let mut f = flooder.clone();
            async move {
                f.get(GetTaskRequest {
                    id: "01jzzzzzzzzzzzzzzzzzzzzzzz".into(),
                })
                .await
                .err()
                .filter(|s| s.code() == tonic::Code::ResourceExhausted)
            }
        })
        .buffer_unordered(64)
        .filter_map(futures::future::ready)
        .next()
        .await
        .expect("the flood was never rate limited");
    assert!(
        limited.message().contains("rate limit"),
        "{}",
        limited.message()
    );
    let hint = scabbard_common::error::retry_after(&limited).expect("a retry-after-ms hint");
    assert!(
        hint > Duration::ZERO && hint <= Duration::from_secs(5),
        "{hint:?}"
    );
    // Another token, another project: unaffected.
    let mut tasks = tasks_client(&c.addr()).await?;
    runs_promptly(&mut tasks, "b").await?;
    Ok(())
}

#[tokio::test]
async fn a_cron_firing_every_second_is_refused_naming_the_minimum() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 2, &[])?;
    create_projects(&c, &["b"]).await?;
    let mut schedules = ScheduleServiceClient::new(c.channel().await?);
    for cron in ["* * * * * *", "*/30 * * * * *"] {
        let (code, msg) = code_and_message(
            schedules
                .create(CreateScheduleRequest {
                    spec: Some(ScheduleSpec {
                        name: "hammer".into(),
                        cron: cron.into(),
                        template: "ci-pipeline".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await,
        );
        assert_eq!(code, tonic::Code::InvalidArgument, "{cron}: {msg}");
        assert!(
            msg.contains("min_schedule_interval_ms") && msg.contains("60 s"),
            "{cron}: {msg}"
        );
    }
    let mut tasks = tasks_client(&c.addr()).await?;
    runs_promptly(&mut tasks, "b").await?;
    Ok(())
}

/// Resident memory of a process, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[tokio::test]
async fn unread_watch_streams_are_ended_and_memory_stays_bounded() -> anyhow::Result<()> {
    let c = Cluster::start(
        &["w0"],
        4,
        &[
            "--rate-limit",
            "0",
            "--max-stream-buffer-bytes",
            "262144",
            "--max-streams-per-token",
            "22",
        ],
    )?;
    create_projects(&c, &["a", "b"]).await?;
    let mut tasks = tasks_client(&c.addr()).await?;
    wait_agent(&c.addr(), "the worker", |a| a.name == "w0").await?;
    // 20 watches of every task, each on its own connection, never read.
    let mut unread = Vec::new();
    for _ in 0..20 {
        let mut w = scabbard_common::client::TaskServiceClient::new(c.channel().await?);
        unread.push(
            w.watch(WatchTasksRequest {
                ids: Vec::new(),
                send_initial: false,
                ..Default::default()
            })
            .await?
            .into_inner(),
        );
    }
    let pid = c.controller.proc.pid();
    let before = rss(pid);
    // 200 tasks with 64 KiB of environment each: ~4 events of ~64 KiB per task per watch,
    // about 50 MiB per watch and 1 GiB for the 20 if nothing bounded them.
    let big = "x".repeat(64 * 1024);
    let ids: Vec<String> = futures::stream::iter(0..200)
        .map(|_| {
            let mut tasks = tasks.clone();
            let big = big.clone();
            async move {
                let mut spec = shell("true");
                spec.env.insert("BIG".into(), big);
                submit_in(&mut tasks, "a", spec).await.map(|t| t.id)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    for id in &ids {
        wait_state(&mut tasks, id, None, T).await?;
    }
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 300 << 20,
        "the controller grew by {} MiB with 20 unread watches",
        grown >> 20
    );
    eprintln!(
        "controller RSS grew by {} MiB with 20 unread watches",
        grown >> 20
    );
    // The per-token stream cap (22): the ended watches gave their slots back, live ones
    // hold theirs; the 23rd live one is refused.
    let mut w = scabbard_common::client::TaskServiceClient::new(c.channel().await?);
    let mut more = Vec::new();
    let refused = loop {
        match w.watch(WatchTasksRequest::default()).await {
            Ok(s) => more.push(s.into_inner()),
            Err(e) => break e,
        }
        assert!(
            more.len() <= 22,
            "the per-token stream cap was not enforced"
        );
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("max_streams_per_token"),
        "{}",
        refused.message()
    );
    drop(more);
    // Other clients are unaffected: another token's watch follows its task to the end.
    let mut admin = AdminServiceClient::new(c.channel().await?);
    let secret = admin
        .create_token(CreateTokenRequest {
            kind: TokenKind::Api as i32,
            name: "b-user".into(),
            scopes: vec![Scope::Submit as i32],
            project: "b".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    let mut b = scabbard_common::client::TaskServiceClient::new(with_token(
        client::connect(&c.addr()).await?,
        &secret,
    ));
    let t = submit_in(&mut b, "b", shell("true")).await?;
    let mut follow = b
        .watch(WatchTasksRequest {
            ids: vec![t.id.clone()],
            send_initial: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let done = tokio::time::timeout(T, async {
        while let Some(ev) = follow.next().await {
            let task = ev?.task.unwrap();
            if task.state() == TaskState::Succeeded {
                return Ok::<_, tonic::Status>(task);
            }
        }
        Err(tonic::Status::aborted("watch ended early"))
    })
    .await??;
    let waited = done.attempts[0].assigned_at_ms - t.created_at_ms;
    assert!(waited <= PROMPT.as_millis() as i64, "waited {waited} ms");
    // Each unread watch, read at last, ends with the clear status after what it held.
    for mut s in unread {
        let end = tokio::time::timeout(T, async {
            loop {
                match s.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Some(e),
                    None => return None,
                }
            }
        })
        .await?
        .expect("the unread watch ended without a status");
        assert_eq!(end.code(), tonic::Code::ResourceExhausted, "{end:?}");
        assert!(
            end.message().contains("consumer too slow; resubscribe"),
            "{}",
            end.message()
        );
    }
    Ok(())
}

#[tokio::test]
async fn silent_connections_are_closed_and_surplus_refused_while_health_serves()
-> anyhow::Result<()> {
    let c = Cluster::start(
        &["w0"],
        2,
        &[
            "--max-connections-per-ip",
            "50",
            "--handshake-timeout",
            "2s",
        ],
    )?;
    create_projects(&c, &["b"]).await?;
    let addr: std::net::SocketAddr = c.addr().parse()?;
    // 200 silent connections from another loopback address (the cap is per address).
    let mut opened = Vec::new();
    for _ in 0..200 {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind("127.0.0.2:0".parse()?)?;
        opened.push((Instant::now(), sock.connect(addr).await?));
    }
    // Health (from 127.0.0.1) keeps answering while they are open.
    let ch = client::connect(&c.addr()).await?;
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut tasks = tasks_client(&c.addr()).await?;
    runs_promptly(&mut tasks, "b").await?;
    // Every connection ends: the surplus at once, the admitted 50 after the timeout.
    let closes = futures::future::join_all(opened.into_iter().map(|(at, mut s)| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        (r.is_ok(), at.elapsed())
    }))
    .await;
    assert!(
        closes.iter().all(|(closed, _)| *closed),
        "a silent connection stayed open"
    );
    let late = closes
        .iter()
        .filter(|(_, took)| *took >= Duration::from_millis(1_500))
        .count();
    assert!(
        (40..=50).contains(&late),
        "{late} connections were held until the handshake timeout (cap 50)"
    );
    Ok(())
}

#[tokio::test]
async fn an_agent_that_stops_reading_loses_its_session_and_its_task_moves_on() -> anyhow::Result<()>
{
    let c = Cluster::start(
        &[],
        2,
        &["--agent-queue-capacity", "16", "--rate-limit", "0"],
    )?;
    create_projects(&c, &["a", "b"]).await?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let mut slow = FakeAgent::connect(&c.addr(), "slow").await?;
    let t = submit_in(&mut tasks, "a", shell("true")).await?;
    let a = slow.accept_next(T).await?;
    assert_eq!(a.task_id, t.id);
    wait_state(&mut tasks, &t.id, Some(TaskState::Running), T).await?;
    // It stops reading and sends reports the controller answers through its queue
    // (stale results: each gets an Ack), until the queue overflows.
    let flood = async {
        for i in 0..200_000u64 {
            let msg = agent_message::Msg::Finished(Finished {
                task_id: format!("01jbogus{i:018}"),
                fencing_token: 1,
                result: Some(TaskResult::default()),
                log_chunks: 0,
            });
            if slow.send_raw(msg).await.is_err() {
                return;
            }
        }
    };
    let addr = c.addr();
    let disconnected = wait_agent(&addr, "the slow agent's session to close", |ag| {
        ag.name == "slow" && ag.status() != AgentStatus::Connected
    });
    tokio::pin!(disconnected);
    tokio::select! {
        r = &mut disconnected => { r?; }
        _ = flood => { disconnected.await?; }
    }
    // Its task is not stuck: past the lease it is requeued and runs on a real worker.
    let mut w = Worker::start(&c.addr(), &c.dir.path().join("w0"), "w0", 2)?;
    let done = wait_state(&mut tasks, &t.id, None, T).await?;
    assert_eq!(done.state(), TaskState::Succeeded, "{done:#?}");
    assert_eq!(ran_on_name(&c, &done).await?, "w0");
    runs_promptly(&mut tasks, "b").await?;
    w.proc.terminate(Duration::from_secs(10));
    Ok(())
}

/// The name of the agent the task's last attempt ran on.
async fn ran_on_name(c: &Cluster, t: &Task) -> anyhow::Result<String> {
    let id = t
        .attempts
        .last()
        .map(|a| a.agent_id.clone())
        .unwrap_or_default();
    let mut admin = AdminServiceClient::new(c.channel().await?);
    let agents = admin
        .list_agents(scabbard_common::proto::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents;
    Ok(agents
        .into_iter()
        .find(|a| a.id == id)
        .map(|a| a.name)
        .unwrap_or(id))
}

#[tokio::test]
async fn an_assign_never_accepted_is_requeued_and_a_late_accept_is_refused() -> anyhow::Result<()> {
    let c = Cluster::start(&[], 2, &["--assign-accept-timeout", "1s"])?;
    create_projects(&c, &["a", "b"]).await?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let mut mute = FakeAgent::connect(&c.addr(), "mute").await?;
    let t = submit_in(&mut tasks, "a", shell("true")).await?;
    let first = mute.next_assign(T).await?;
    assert_eq!(first.task_id, t.id);
    // Never accepted: the attempt ends as an infrastructure failure after the deadline.
    let ended = eventually("the unaccepted attempt to be requeued", T, || {
        let mut tasks = tasks.clone();
        let id = t.id.clone();
        async move {
            let t = get(&mut tasks, &id).await.ok()?;
            t.attempts
                .first()
                .and_then(|a| a.result.clone())
                .map(|r| (t.clone(), r))
        }
    })
    .await?;
    let (_, r) = &ended;
    assert_eq!(r.error_class(), ErrorClass::Infrastructure);
    assert!(
        r.message.contains("assign_accept_timeout_ms"),
        "{}",
        r.message
    );
    // It runs elsewhere.
    let mut w = Worker::start(&c.addr(), &c.dir.path().join("w0"), "w0", 2)?;
    let done = wait_state(&mut tasks, &t.id, None, T).await?;
    assert_eq!(done.state(), TaskState::Succeeded, "{done:#?}");
    assert_eq!(ran_on_name(&c, &done).await?, "w0");
    // The first attempt is fenced off: its late result is refused as stale.
    mute.send_raw(agent_message::Msg::Accepted(
        scabbard_common::proto::Accepted {
            task_id: first.task_id.clone(),
            fencing_token: first.fencing_token,
        },
    ))
    .await?;
    let ack = mute
        .finish(
            &first.task_id,
            first.fencing_token,
            TaskResult {
                outcome: Outcome::Succeeded as i32,
                ..Default::default()
            },
        )
        .await?;
    assert!(ack.stale, "{ack:?}");
    let after = get(&mut tasks, &t.id).await?;
    assert_eq!(after.result, done.result);
    runs_promptly(&mut tasks, "b").await?;
    w.proc.terminate(Duration::from_secs(10));
    Ok(())
}

#[tokio::test]
async fn a_project_cannot_hold_more_schedules_than_the_cap() -> anyhow::Result<()> {
    let templates = tempfile::tempdir()?;
    std::fs::write(
        templates.path().join("tick.yaml"),
        "name: tick\nversion: 1\ndescription: one no-op task\nworkflow:\n  tasks:\n    - name: noop\n      noop: {}\n",
    )?;
    let dir = templates.path().to_path_buf();
    let ctl = InProc::start_with(move |cfg| {
        cfg.templates_dir = Some(dir);
        cfg.max_schedules_per_project = 2;
    })
    .await?;
    let mut schedules = ScheduleServiceClient::new(ctl.channel(ADMIN_TOKEN).await?);
    let create = |name: &str| CreateScheduleRequest {
        spec: Some(ScheduleSpec {
            name: name.into(),
            cron: "0 * * * *".into(),
            template: "tick".into(),
            ..Default::default()
        }),
        paused: true,
        ..Default::default()
    };
    schedules.create(create("one")).await?;
    schedules.create(create("two")).await?;
    let (code, msg) = code_and_message(schedules.create(create("three")).await);
    assert_eq!(code, tonic::Code::ResourceExhausted, "{msg}");
    assert!(msg.contains("max_schedules_per_project"), "{msg}");
    Ok(())
}
