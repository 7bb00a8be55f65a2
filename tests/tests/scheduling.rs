//! Retry policies, circuit breakers, concurrency groups and fairness across projects,
//! through real controller and worker processes.

use std::time::Duration;

use scabbard_common::proto::admin_service_client::AdminServiceClient;
use scabbard_common::proto::project_service_client::ProjectServiceClient;
use scabbard_common::proto::{
    BreakerState, ConcurrencyGroup, CreateProjectRequest, ListAgentsRequest, ListBreakersRequest,
    Project, ResetBreakerRequest, RetryPolicy, SubmitTaskRequest, Task, TaskSpec, TaskState,
};
use scabbard_tests::wf::Cluster;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(60);

fn with_retry(mut spec: TaskSpec, retry: RetryPolicy) -> TaskSpec {
    spec.retry = Some(retry);
    spec
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

#[tokio::test]
async fn a_flaky_task_succeeds_on_attempt_3_with_backoff_within_the_policy() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 2, &[])?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let count = c.dir.path().join("count");
    let script = format!(
        "n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; echo attempt $n; [ $n -ge 3 ]",
        f = count.display()
    );
    let policy = RetryPolicy {
        max_attempts: 5,
        initial_backoff_ms: 300,
        max_backoff_ms: 2_000,
        multiplier: 2.0,
        jitter: 0.5,
        ..Default::default()
    };
    let id = submit(&mut tasks, with_retry(shell(&script), policy)).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:#?}");
    assert_eq!(t.attempts.len(), 3);
    assert_eq!(t.user_failures, 2);
    assert_eq!(t.infra_failures, 0);
    // Gap before retry n (1-based) is the backoff: base 300·2^(n-1), minus up to 50 % jitter;
    // dispatch after the backoff adds a little, bounded generously here.
    for (n, w) in t.attempts.windows(2).enumerate() {
        let gap = w[1].assigned_at_ms - w[0].finished_at_ms;
        let base = 300 * (1 << n);
        assert!(
            gap >= base / 2,
            "retry {} came after {gap} ms, before the backoff floor {}",
            n + 1,
            base / 2
        );
        assert!(
            gap <= base + 1_500,
            "retry {} came after {gap} ms, far beyond {base}",
            n + 1
        );
    }
    assert_eq!(logs(&mut tasks, &id, 1, false).await?, "attempt 1\n");
    assert_eq!(logs(&mut tasks, &id, 3, false).await?, "attempt 3\n");
    Ok(())
}

#[tokio::test]
async fn a_non_retryable_exit_code_fails_at_once() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 2, &[])?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let policy = RetryPolicy {
        max_attempts: 5,
        initial_backoff_ms: 50,
        retry_exit_codes: vec![75],
        ..Default::default()
    };
    let id = submit(&mut tasks, with_retry(shell("exit 2"), policy.clone())).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed);
    assert_eq!(t.attempts.len(), 1, "{t:#?}");
    assert_eq!(t.result.unwrap().exit_code, 2);
    // A listed code is retried until max_attempts.
    let id = submit(&mut tasks, with_retry(shell("exit 75"), policy)).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed);
    assert_eq!(t.attempts.len(), 5);
    Ok(())
}

/// An agent whose every attempt ends in an infrastructure failure (its engine is gone)
/// trips its breaker and work moves to the good one. (A task's own exit code never counts
/// against the agent: see abuse_ident.rs.)
#[tokio::test]
async fn an_agent_failing_every_task_trips_its_breaker_and_work_moves() -> anyhow::Result<()> {
    let c = Cluster::start(
        &["good"],
        2,
        &["--breaker-threshold", "2", "--breaker-open", "60s"],
    )?;
    let mut bad = scabbard_tests::agent::FakeAgent::connect(&c.addr(), "bad").await?;
    let bad_loop = tokio::spawn(async move {
        while let Ok(a) = bad.accept_next(Duration::from_secs(600)).await {
            let lost = scabbard_common::proto::TaskResult {
                outcome: scabbard_common::proto::Outcome::Failed as i32,
                message: "engine unreachable".into(),
                error_class: scabbard_common::proto::ErrorClass::Infrastructure as i32,
                ..Default::default()
            };
            if bad.finish(&a.task_id, a.fencing_token, lost).await.is_err() {
                break;
            }
        }
    });
    let ch = c.channel().await?;
    let mut admin = AdminServiceClient::new(ch.clone());
    let bad_id = eventually("both agents", T, || {
        let mut admin = admin.clone();
        async move {
            let agents = admin
                .list_agents(ListAgentsRequest {})
                .await
                .ok()?
                .into_inner()
                .agents;
            (agents.len() == 2)
                .then(|| agents.into_iter().find(|a| a.name == "bad").map(|a| a.id))?
        }
    })
    .await?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let policy = RetryPolicy {
        max_attempts: 6,
        initial_backoff_ms: 50,
        max_backoff_ms: 200,
        ..Default::default()
    };
    let mut ids = Vec::new();
    for _ in 0..12 {
        let spec = shell("sleep 0.1");
        ids.push(submit(&mut tasks, with_retry(spec, policy.clone())).await?);
    }
    let mut on_bad = 0;
    for id in &ids {
        let t = wait_state(&mut tasks, id, None, T).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:#?}");
        on_bad += t.attempts.iter().filter(|a| a.agent_id == bad_id).count();
    }
    // Threshold 2, plus what was already running on its slot when it tripped.
    assert!(on_bad <= 4, "{on_bad} attempts went to the failing agent");
    let key = format!("agent:{bad_id}");
    let breakers = admin
        .list_breakers(ListBreakersRequest { all: false })
        .await?
        .into_inner()
        .breakers;
    let b = breakers
        .iter()
        .find(|b| b.key == key)
        .expect("bad agent's breaker listed");
    assert_eq!(b.state(), BreakerState::Open);
    assert!(b.last_error.contains("engine unreachable"), "{b:?}");
    let status = admin
        .cluster_status(scabbard_common::proto::ClusterStatusRequest {})
        .await?
        .into_inner();
    assert!(status.breakers.iter().any(|b| b.key == key));
    // An operator closes it by hand.
    let reset = admin
        .reset_breaker(ResetBreakerRequest { key: key.clone() })
        .await?
        .into_inner();
    assert_eq!(reset.state(), BreakerState::Closed);
    // A breaker that never opened: resetting it is a no-op (issue 18), answered as a
    // closed breaker that never tripped.
    let none = admin
        .reset_breaker(ResetBreakerRequest {
            key: "agent:nope".into(),
        })
        .await?
        .into_inner();
    assert_eq!(none.state(), BreakerState::Closed);
    assert_eq!((none.trips, none.opened_at_ms), (0, 0));
    bad_loop.abort();
    Ok(())
}

#[tokio::test]
async fn a_concurrency_group_of_one_never_runs_two_at_once() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0", "w1"], 4, &[])?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let mut grouped = Vec::new();
    let mut others = Vec::new();
    for i in 0..24 {
        if i % 2 == 0 {
            let mut spec = shell("sleep 0.05");
            spec.concurrency = Some(ConcurrencyGroup {
                key: "migrate-db".into(),
                limit: 1,
            });
            grouped.push(submit(&mut tasks, spec).await?);
        } else {
            others.push(submit(&mut tasks, shell("sleep 0.05")).await?);
        }
    }
    let mut spans = Vec::new();
    for id in grouped.iter().chain(&others) {
        let t = wait_state(&mut tasks, id, None, T).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
        if grouped.contains(id) {
            // Every attempt holds the group's slot from assignment to its end.
            spans.extend(
                t.attempts
                    .iter()
                    .map(|a| (a.assigned_at_ms, a.finished_at_ms)),
            );
        }
    }
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two tasks of the group overlapped: {w:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_flood_from_one_project_does_not_starve_another() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 2, &[])?;
    let mut projects = ProjectServiceClient::new(c.channel().await?);
    for name in ["flood", "other"] {
        projects
            .create(CreateProjectRequest {
                project: Some(Project {
                    name: name.into(),
                    ..Default::default()
                }),
            })
            .await?;
    }
    let mut tasks = tasks_client(&c.addr()).await?;
    let mut flood = Vec::new();
    for _ in 0..40 {
        let mut spec = shell("sleep 0.1");
        spec.priority = -10;
        flood.push(submit_in(&mut tasks, "flood", spec).await?.id);
    }
    // Lower priority still: fairness between projects, priority within one.
    let mut spec = shell("true");
    spec.priority = -100;
    let other = submit_in(&mut tasks, "other", spec).await?;
    let done = wait_state(&mut tasks, &other.id, None, T).await?;
    assert_eq!(done.state(), TaskState::Succeeded);
    let started = done.attempts[0].assigned_at_ms;
    let mut overtook = 0;
    for id in &flood {
        let t = get(&mut tasks, id).await?;
        if let Some(a) = t.attempts.first()
            && a.assigned_at_ms > other.created_at_ms
            && a.assigned_at_ms < started
        {
            overtook += 1;
        }
    }
    // At most the slots freeing up while it was being submitted.
    assert!(
        overtook <= 2,
        "{overtook} flood tasks started before the other project's task"
    );
    for id in &flood {
        wait_state(&mut tasks, id, None, T).await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_open_dependency_breaker_holds_its_tasks_in_the_queue_until_reset() -> anyhow::Result<()>
{
    let mut c = Cluster::start(
        &["w0"],
        2,
        &["--breaker-threshold", "2", "--breaker-open", "60s"],
    )?;
    let mut admin = AdminServiceClient::new(c.channel().await?);
    let mut tasks = tasks_client(&c.addr()).await?;
    let with_dep = |script: &str| {
        let mut s = shell(script);
        s.breakers = vec!["registry:flaky".into()];
        s
    };
    // Two failures through the dependency open its breaker.
    for _ in 0..2 {
        let id = submit(&mut tasks, with_dep("echo 'pull failed' >&2; exit 1")).await?;
        assert_eq!(
            wait_state(&mut tasks, &id, None, T).await?.state(),
            TaskState::Failed
        );
    }
    let open = admin
        .list_breakers(ListBreakersRequest { all: false })
        .await?
        .into_inner()
        .breakers;
    assert!(
        open.iter()
            .any(|b| b.key == "project/default/registry:flaky" && b.state() == BreakerState::Open),
        "{open:?}"
    );
    // It is stored: a controller restarted (kill -9) on the same data comes back with it.
    c.controller.proc.kill9();
    let (dir, port) = (c.controller.data_dir.clone(), c.controller.addr.port());
    c.controller = Controller::start(
        &dir,
        port,
        &ControllerOpts {
            extra: ["--breaker-threshold", "2", "--breaker-open", "60s"]
                .map(String::from)
                .to_vec(),
            ..ControllerOpts::default()
        },
    )?;
    let mut admin = AdminServiceClient::new(c.channel().await?);
    let mut tasks = tasks_client(&c.addr()).await?;
    let open = admin
        .list_breakers(ListBreakersRequest { all: false })
        .await?
        .into_inner()
        .breakers;
    assert!(
        open.iter()
            .any(|b| b.key == "project/default/registry:flaky" && b.state() == BreakerState::Open),
        "after the restart: {open:?}"
    );
    wait_agent(&c.addr(), "the worker back", |a| {
        a.status() == scabbard_common::proto::AgentStatus::Connected
    })
    .await?;
    // A task needing it waits (no attempt burnt); one that does not runs.
    let held = submit(&mut tasks, with_dep("true")).await?;
    let free = submit(&mut tasks, shell("true")).await?;
    assert_eq!(
        wait_state(&mut tasks, &free, None, T).await?.state(),
        TaskState::Succeeded
    );
    let t = get(&mut tasks, &held).await?;
    assert_eq!(t.state(), TaskState::Queued, "{t:?}");
    assert!(t.attempts.is_empty());
    // An operator closes it: the held task runs.
    admin
        .reset_breaker(ResetBreakerRequest {
            key: "registry:flaky".into(),
        })
        .await?;
    assert_eq!(
        wait_state(&mut tasks, &held, None, T).await?.state(),
        TaskState::Succeeded
    );
    Ok(())
}
