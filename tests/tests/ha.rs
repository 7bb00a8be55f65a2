//! Several controllers on one real etcd: leader election, redirects, and failover with
//! kill -9 of the leader while tasks run.

use std::time::{Duration, Instant};

use scabbard_common::client::{self, AdminServiceClient, TaskServiceClient};
use scabbard_common::proto::{ClusterStatusRequest, TaskState};
use scabbard_tests::etcd::EtcdCluster;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(60);

type Cluster = scabbard_tests::etcd::EtcdControllers;

fn start(controllers: usize, workers: usize) -> anyhow::Result<Cluster> {
    Cluster::start(controllers, workers, 3)
}

async fn leader(addrs: &str) -> Option<String> {
    let ch = client::connect_leader(addrs).await.ok()?;
    let s = AdminServiceClient::new(ch)
        .cluster_status(ClusterStatusRequest {})
        .await
        .ok()?
        .into_inner();
    (s.answered_by_leader && s.store_healthy).then_some(s.leader)
}

#[tokio::test]
async fn followers_redirect_to_the_single_leader() -> anyhow::Result<()> {
    let c = start(3, 0)?;
    let addrs = c.addrs();
    let leader = eventually("a leader", T, || leader(&addrs)).await?;
    let mut redirects = 0;
    for ctl in &c.controllers {
        // Every controller names the same leader and sees all three members (each
        // registers its membership as it starts).
        let addr = ctl.addr.to_string();
        let s = eventually("a settled cluster view", T, || {
            let addr = addr.clone();
            let leader = leader.clone();
            async move {
                let s = AdminServiceClient::new(with_token(
                    client::connect(&addr).await.ok()?,
                    ADMIN_TOKEN,
                ))
                .cluster_status(ClusterStatusRequest {})
                .await
                .ok()?
                .into_inner();
                (s.leader == leader && s.members.len() == 3).then_some(s)
            }
        })
        .await?;
        assert_eq!(s.members.iter().filter(|m| m.leader).count(), 1, "{s:?}");
        if ctl.addr.to_string() != leader {
            // Client calls are forwarded to the leader (tests/tests/follow.rs has more) …
            let r = TaskServiceClient::new(with_token(
                client::connect(&ctl.addr.to_string()).await?,
                ADMIN_TOKEN,
            ))
            .submit(scabbard_common::proto::SubmitTaskRequest {
                spec: Some(shell("true")),
                ..Default::default()
            })
            .await?;
            assert!(r.into_inner().task.is_some());
            // … agent sessions are redirected to the single leader.
            let err = scabbard_common::client::AgentServiceClient::new(
                client::connect(&ctl.addr.to_string()).await?,
            )
            .register(scabbard_common::proto::RegisterRequest {
                registration_token: TOKEN.into(),
                name: "via-follower".into(),
                slots: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unavailable);
            assert_eq!(
                scabbard_common::error::leader_hint(&err).as_deref(),
                Some(leader.as_str())
            );
            redirects += 1;
        }
    }
    assert_eq!(redirects, 2);
    Ok(())
}

#[tokio::test]
async fn killing_the_leader_loses_no_task_and_runs_none_twice() -> anyhow::Result<()> {
    let mut c = start(3, 2)?;
    let addrs = c.addrs();
    let first = eventually("a leader", T, || leader(&addrs)).await?;
    let mut tasks = TaskServiceClient::new(admin_channel(&addrs).await?);
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(
            submit(
                &mut tasks,
                shell(&format!("echo start-{i}; sleep 1.5; echo end-{i}")),
            )
            .await?,
        );
    }
    eventually("tasks running", T, || {
        let mut tasks = tasks.clone();
        let id = ids[0].clone();
        async move { (get(&mut tasks, &id).await.ok()?.state() == TaskState::Running).then_some(()) }
    })
    .await?;

    let idx = c
        .controllers
        .iter()
        .position(|x| x.addr.to_string() == first)
        .expect("leader is one of ours");
    let killed = Instant::now();
    c.controllers[idx].proc.kill9();
    let rest: String = c
        .controllers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .map(|(_, x)| x.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let second = eventually("a new leader", T, || leader(&rest)).await?;
    eprintln!("failover: new leader {second} after {:?}", killed.elapsed());
    assert_ne!(first, second);

    let mut tasks = TaskServiceClient::new(admin_channel(&rest).await?);
    for (i, id) in ids.iter().enumerate() {
        let t = wait_state(&mut tasks, id, None, T).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
        assert_eq!(t.attempts.len(), 1, "task {id} ran more than once: {t:?}");
        assert_eq!(
            logs(&mut tasks, id, 0, false).await?,
            format!("start-{i}\nend-{i}\n")
        );
    }
    let _ = &c.workers;
    Ok(())
}

#[tokio::test]
async fn frozen_worker_is_replaced_and_its_stale_results_rejected() -> anyhow::Result<()> {
    let mut c = start(1, 0)?;
    let addrs = c.addrs();
    eventually("a leader", T, || leader(&addrs)).await?;
    let dir = tempfile::tempdir()?;
    let frozen = Worker::start(&addrs, &dir.path().join("frozen"), "frozen", 1)?;
    let mut tasks = TaskServiceClient::new(admin_channel(&addrs).await?);
    let id = submit(&mut tasks, shell("echo begin; sleep 2; echo done")).await?;
    let t = wait_state(&mut tasks, &id, Some(TaskState::Running), T).await?;
    assert_eq!(Some(t.agent_id.clone()), frozen.agent_id());

    frozen.proc.signal(libc::SIGSTOP);
    let healthy = Worker::start(&addrs, &dir.path().join("healthy"), "healthy", 1)?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(t.attempts.len(), 2, "{t:?}");
    assert_eq!(Some(t.attempts[1].agent_id.clone()), healthy.agent_id());
    assert_eq!(t.infra_failures, 1);

    // Resumed, the frozen worker finishes its stale attempt: the result is refused, the
    // recorded one stays, and the worker rejoins.
    frozen.proc.signal(libc::SIGCONT);
    let frozen_id = frozen.agent_id().expect("registered");
    wait_agent(&addrs, "the frozen worker to rejoin", |a| {
        a.id == frozen_id
            && a.status() == scabbard_common::proto::AgentStatus::Connected
            && a.running == 0
    })
    .await?;
    let after = get(&mut tasks, &id).await?;
    assert_eq!(after.attempts.len(), 2);
    assert_eq!(
        after.result, t.result,
        "the stale attempt must not change the result"
    );
    // Work still flows.
    let next = submit(&mut tasks, shell("echo again")).await?;
    assert_eq!(
        wait_state(&mut tasks, &next, None, T).await?.state(),
        TaskState::Succeeded
    );
    c.workers.clear();
    Ok(())
}

async fn health(addr: &str) -> Option<i32> {
    let ch = client::connect(addr).await.ok()?;
    let r = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status)
}

#[tokio::test]
async fn etcd_outage_and_controller_restart_lose_nothing() -> anyhow::Result<()> {
    let mut c = start(1, 1)?;
    let addr = c.controllers[0].addr.to_string();
    eventually("a leader", T, || leader(&addr)).await?;
    let mut tasks = TaskServiceClient::new(admin_channel(&addr).await?);
    let done = submit(&mut tasks, shell("echo kept")).await?;
    wait_state(&mut tasks, &done, None, T).await?;

    // etcd down: the controller keeps running and says NOT_SERVING; back up: it recovers.
    c.etcd.members[0].kill9();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    eventually("health NOT_SERVING", T, || async {
        health(&addr).await.filter(|s| *s != serving)
    })
    .await?;
    c.etcd.members[0].restart()?;
    eventually("leading again", T, || leader(&addr)).await?;
    assert_eq!(health(&addr).await, Some(serving));
    let mut tasks = TaskServiceClient::new(admin_channel(&addr).await?);
    let after = submit(&mut tasks, shell("echo after-outage")).await?;
    assert_eq!(
        wait_state(&mut tasks, &after, None, T).await?.state(),
        TaskState::Succeeded
    );

    // A controller restarted on the etcd backend sees exactly the state it left (taken
    // once every attempt's log is archived, the last change a finished task gets).
    let before = eventually("every log archived", T, || {
        let mut tasks = tasks.clone();
        async move {
            let all = tasks
                .list(scabbard_common::proto::ListTasksRequest::default())
                .await
                .ok()?
                .into_inner()
                .tasks;
            all.iter()
                .flat_map(|t| &t.attempts)
                .all(|a| a.log_chunks == 0 || !a.log_archive.is_empty())
                .then_some(all)
        }
    })
    .await?;
    let port = c.controllers[0].addr.port();
    let data = c.controllers[0].data_dir.clone();
    let opts = ControllerOpts {
        lease: "8s",
        extra: vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            c.etcd.endpoints(),
            "--logs-dir".into(),
            c.dir.path().join("shared-logs").display().to_string(),
            "--leader-lease-ttl".into(),
            "2s".into(),
        ],
        ..ControllerOpts::default()
    };
    c.controllers[0].proc.kill9();
    c.controllers[0] = Controller::start(&data, port, &opts)?;
    eventually("leading after restart", T, || leader(&addr)).await?;
    let mut tasks = TaskServiceClient::new(admin_channel(&addr).await?);
    let again = tasks
        .list(scabbard_common::proto::ListTasksRequest::default())
        .await?
        .into_inner()
        .tasks;
    assert_eq!(before, again);
    assert_eq!(logs(&mut tasks, &done, 0, false).await?, "kept\n");
    Ok(())
}

#[tokio::test]
async fn agent_presence_is_an_etcd_lease_that_outlives_the_agent_by_its_grace() -> anyhow::Result<()>
{
    use scabbard_controller::store::{EtcdConfig, EtcdStore, Store};
    let mut c = start(1, 1)?;
    let addrs = c.addrs();
    eventually("a leader", T, || leader(&addrs)).await?;
    let agent = eventually("the worker to register", T, || async {
        c.workers[0].agent_id()
    })
    .await?;
    let etcd = EtcdStore::connect(&EtcdConfig {
        endpoints: vec![c.etcd.endpoints()],
        ..Default::default()
    })
    .await?;
    let key = format!("presence/{agent}");
    let kv = eventually("the presence key", T, || async {
        etcd.get(&key).await.ok().flatten()
    })
    .await?;
    assert_ne!(kv.lease, 0, "presence must be bound to a lease");
    c.workers[0].proc.kill9();
    eventually("the presence key to expire", T, || async {
        matches!(etcd.get(&key).await, Ok(None)).then_some(())
    })
    .await?;
    Ok(())
}

/// Tokens live in etcd: one created through the leader authenticates on every controller,
/// and its revocation reaches the followers within a watch delivery.
#[tokio::test]
async fn tokens_are_shared_and_revocations_reach_every_controller() -> anyhow::Result<()> {
    use scabbard_common::proto::{
        CreateTokenRequest, RevokeTokenRequest, Scope, TokenKind, WhoAmIRequest,
    };
    let c = start(2, 0)?;
    let mut admin = AdminServiceClient::new(admin_channel(&c.addrs()).await?);
    let created = admin
        .create_token(CreateTokenRequest {
            kind: TokenKind::Api as i32,
            name: "shared".into(),
            scopes: vec![Scope::Read as i32],
            project: "default".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let secret = created.secret.clone();
    // Every controller knows it (WhoAmI is answered locally, leader or not).
    for ctl in &c.controllers {
        let addr = ctl.addr.to_string();
        let secret = secret.clone();
        eventually("the token to reach every controller", T, || {
            let (addr, secret) = (addr.clone(), secret.clone());
            async move {
                let ch = client::connect(&addr).await.ok()?;
                AdminServiceClient::new(with_token(ch, &secret))
                    .who_am_i(WhoAmIRequest {})
                    .await
                    .ok()
            }
        })
        .await?;
    }
    admin
        .revoke_token(RevokeTokenRequest {
            id: created.token.unwrap().id,
            reason: "test".into(),
        })
        .await?;
    let revoked = Instant::now();
    for ctl in &c.controllers {
        let addr = ctl.addr.to_string();
        let secret = secret.clone();
        let code = eventually("the revocation to reach every controller", T, || {
            let (addr, secret) = (addr.clone(), secret.clone());
            async move {
                let ch = client::connect(&addr).await.ok()?;
                match AdminServiceClient::new(with_token(ch, &secret))
                    .who_am_i(WhoAmIRequest {})
                    .await
                {
                    Err(s) => Some(s.code()),
                    Ok(_) => None,
                }
            }
        })
        .await?;
        assert_eq!(code, tonic::Code::Unauthenticated);
    }
    assert!(
        revoked.elapsed() < Duration::from_secs(2),
        "revocation took {:?} to reach every controller",
        revoked.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn schedules_fire_each_tick_once_across_a_leader_failover() -> anyhow::Result<()> {
    use scabbard_common::proto::schedule_service_client::ScheduleServiceClient;
    use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
    use scabbard_common::proto::{
        CreateScheduleRequest, GetScheduleRequest, ListWorkflowsRequest, OverlapPolicy,
        ScheduleSpec,
    };
    let etcd = EtcdCluster::start(1)?;
    let dir = tempfile::tempdir()?;
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&templates)?;
    std::fs::write(
        templates.join("tick.yaml"),
        "name: tick\nversion: 1\ndescription: one no-op task\nworkflow:\n  tasks:\n    - name: noop\n      noop: {}\n",
    )?;
    let opts = ControllerOpts {
        extra: vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            etcd.endpoints(),
            "--logs-dir".into(),
            dir.path().join("shared-logs").display().to_string(),
            "--leader-lease-ttl".into(),
            "2s".into(),
            "--templates-dir".into(),
            templates.display().to_string(),
            // Ticks every 2 s (the default minimum interval is 60 s).
            "--min-schedule-interval".into(),
            "1s".into(),
        ],
        ..ControllerOpts::default()
    };
    let mut cs = Vec::new();
    for i in 0..2 {
        cs.push(Controller::start(
            &dir.path().join(format!("c{i}")),
            free_port(),
            &opts,
        )?);
    }
    let addrs = cs
        .iter()
        .map(|c| c.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let first = eventually("a leader", T, || leader(&addrs)).await?;
    // Every 2 s; runs queue behind each other (no workers), so every tick makes a run. The
    // bootstrap token reaches the leader's token cache through its etcd watch: retry until
    // it has.
    let s = eventually("the schedule to be created", T, || {
        let addrs = addrs.clone();
        async move {
            let mut schedules = ScheduleServiceClient::new(admin_channel(&addrs).await.ok()?);
            schedules
                .create(CreateScheduleRequest {
                    spec: Some(ScheduleSpec {
                        name: "every-2s".into(),
                        cron: "*/2 * * * * *".into(),
                        template: "tick".into(),
                        overlap: OverlapPolicy::Queue as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await?;
    let fired = |addrs: String, n: u64| {
        let id = s.id.clone();
        async move {
            eventually(&format!("{n} ticks fired"), T, || {
                let (addrs, id) = (addrs.clone(), id.clone());
                async move {
                    let ch = admin_channel(&addrs).await.ok()?;
                    let s = ScheduleServiceClient::new(ch)
                        .get(GetScheduleRequest { id })
                        .await
                        .ok()?
                        .into_inner();
                    (s.fired >= n).then_some(s)
                }
            })
            .await
        }
    };
    fired(addrs.clone(), 2).await?;
    let idx = cs
        .iter()
        .position(|x| x.addr.to_string() == first)
        .expect("ours");
    cs[idx].proc.kill9();
    let rest = cs[1 - idx].addr.to_string();
    eventually("a new leader", T, || leader(&rest)).await?;
    let after = fired(rest.clone(), 6).await?;
    assert_eq!(after.skipped, 0, "{after:?}");
    let runs = WorkflowServiceClient::new(admin_channel(&rest).await?)
        .list(ListWorkflowsRequest {
            template: "tick".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workflows;
    let mut ticks: Vec<i64> = runs
        .iter()
        .map(|w| w.template.as_ref().unwrap().scheduled_for_ms)
        .collect();
    ticks.sort();
    assert!(ticks.len() >= 6, "{ticks:?}");
    for w in ticks.windows(2) {
        assert_eq!(
            w[1] - w[0],
            2_000,
            "a tick was skipped or doubled across the failover: {ticks:?}"
        );
    }
    Ok(())
}
