//! Failure injection through real processes: a worker killed with SIGKILL, a stream cut
//! and restored inside the grace period, a controller killed and restarted on its data dir.

use std::time::Duration;

use scabbard_common::client::{self, AgentServiceClient};
use scabbard_common::proto::{
    AgentMessage, Finished, Hello, Outcome, RunningAttempt, TaskResult, TaskState, agent_message,
    controller_message,
};
use scabbard_tests::proxy::Proxy;
use scabbard_tests::*;
use tokio_stream::StreamExt;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn killed_worker_task_is_requeued_and_its_late_report_rejected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(
        &dir.path().join("c"),
        free_port(),
        &ControllerOpts::default(),
    )?;
    let addr = c.addr.to_string();
    let mut a = Worker::start(&addr, &dir.path().join("a"), "a", 1)?;
    let mut tasks = tasks_client(&addr).await?;
    let id = submit(
        &mut tasks,
        shell("echo attempt-start; sleep 2; echo attempt-end"),
    )
    .await?;
    let running = wait_state(&mut tasks, &id, Some(TaskState::Running), T).await?;
    let agent_a = running.agent_id.clone();
    assert_eq!(Some(agent_a.clone()), a.agent_id());
    let token_a = a.agent_token().expect("identity");
    a.proc.kill9();
    let _b = Worker::start(&addr, &dir.path().join("b"), "b", 1)?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(t.attempts.len(), 2, "{t:?}");
    assert_eq!(t.attempts[0].agent_id, agent_a);
    assert_ne!(t.attempts[1].agent_id, agent_a);
    assert_eq!(t.infra_failures, 1);
    assert_eq!(
        logs(&mut tasks, &id, 2, false).await?,
        "attempt-start\nattempt-end\n"
    );

    // The first attempt's worker "comes back" and reports: its fencing token is stale.
    let stale_token = t.attempts[0].fencing_token;
    assert_eq!(
        stale_token as u32, 1,
        "the low half of a token is the attempt number"
    );
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            agent_id: agent_a.clone(),
            capabilities: vec!["shell".into()],
            slots: 1,
            running: vec![RunningAttempt {
                task_id: id.clone(),
                fencing_token: stale_token,
                finished: true,
            }],
            ..Default::default()
        })),
    })
    .await?;
    let req = client::with_token(
        tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
        Some(&token_a),
    )?;
    let mut inbound = AgentServiceClient::new(client::connect(&addr).await?)
        .session(req)
        .await?
        .into_inner();
    let welcome = match inbound.next().await.expect("welcome")?.msg {
        Some(controller_message::Msg::Welcome(w)) => w,
        other => panic!("expected Welcome, got {other:?}"),
    };
    assert_eq!(welcome.resume.len(), 1);
    assert!(!welcome.resume[0].keep, "a stale attempt must not be kept");
    assert!(!welcome.resume[0].result_recorded);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Finished(Finished {
            task_id: id.clone(),
            fencing_token: stale_token,
            result: Some(TaskResult {
                outcome: Outcome::Failed as i32,
                exit_code: 99,
                ..Default::default()
            }),
            log_chunks: 0,
        })),
    })
    .await?;
    let ack = loop {
        match inbound.next().await.expect("ack")?.msg {
            Some(controller_message::Msg::Ack(a)) => break a,
            _ => continue,
        }
    };
    assert!(ack.stale && !ack.result, "{ack:?}");
    let t = get(&mut tasks, &id).await?;
    assert_eq!(t.state(), TaskState::Succeeded);
    assert_eq!(
        t.result.unwrap().exit_code,
        0,
        "the stale report must not overwrite the result"
    );
    Ok(())
}

#[tokio::test]
async fn stream_cut_within_grace_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = ControllerOpts {
        lease: "5s",
        ..ControllerOpts::default()
    };
    let c = Controller::start(&dir.path().join("c"), free_port(), &opts)?;
    let proxy = Proxy::start(c.addr).await?;
    let _w = Worker::start(&proxy.addr.to_string(), &dir.path().join("w"), "w", 1)?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let id = submit(
        &mut tasks,
        shell("for i in $(seq 1 60); do echo line-$i; sleep 0.03; done"),
    )
    .await?;
    wait_state(&mut tasks, &id, Some(TaskState::Running), T).await?;
    eventually("some log lines", T, || {
        let mut tasks = tasks.clone();
        let id = id.clone();
        async move {
            logs(&mut tasks, &id, 0, false)
                .await
                .ok()
                .filter(|l| l.lines().count() >= 5)
        }
    })
    .await?;
    proxy.cut(true);
    wait_agent(
        &c.addr.to_string(),
        "the controller to see the agent disconnected",
        |a| a.status() == scabbard_common::proto::AgentStatus::Disconnected,
    )
    .await?;
    proxy.restore();
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(t.attempts.len(), 1, "the task must finish once: {t:?}");
    let text = logs(&mut tasks, &id, 0, false).await?;
    let expected: String = (1..=60).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(text, expected);
    Ok(())
}

#[tokio::test]
async fn controller_restart_keeps_tasks_results_and_logs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let opts = ControllerOpts {
        lease: "5s",
        ..ControllerOpts::default()
    };
    let mut c = Controller::start(&dir.path().join("c"), port, &opts)?;
    let addr = c.addr.to_string();
    let mut w = Worker::start(&addr, &dir.path().join("w"), "w", 2)?;
    let mut tasks = tasks_client(&addr).await?;
    let done = submit(&mut tasks, shell("echo persisted-log; exit 3")).await?;
    wait_state(&mut tasks, &done, None, T).await?;
    // A task running across the restart, on a worker that stays up.
    let across = submit(&mut tasks, shell("echo before; sleep 2; echo after")).await?;
    wait_state(&mut tasks, &across, Some(TaskState::Running), T).await?;

    c.proc.kill9();
    let mut c = Controller::start(&dir.path().join("c"), port, &opts)?;
    let mut tasks = tasks_client(&addr).await?;
    let t = get(&mut tasks, &done).await?;
    assert_eq!(t.state(), TaskState::Failed);
    assert_eq!(t.result.unwrap().exit_code, 3);
    assert_eq!(logs(&mut tasks, &done, 0, false).await?, "persisted-log\n");
    let t = wait_state(&mut tasks, &across, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(
        t.attempts.len(),
        1,
        "the worker reconnected within grace: {t:?}"
    );
    assert_eq!(
        logs(&mut tasks, &across, 0, false).await?,
        "before\nafter\n"
    );

    // Queued tasks survive a restart and run afterwards.
    w.proc.terminate(Duration::from_secs(5));
    let queued = submit(&mut tasks, shell("echo later")).await?;
    c.proc.kill9();
    let _c = Controller::start(&dir.path().join("c"), port, &opts)?;
    let mut tasks = tasks_client(&addr).await?;
    assert_eq!(get(&mut tasks, &queued).await?.state(), TaskState::Queued);
    let _w2 = Worker::start(&addr, &dir.path().join("w2"), "w2", 1)?;
    let t = wait_state(&mut tasks, &queued, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded);
    assert_eq!(logs(&mut tasks, &queued, 0, false).await?, "later\n");
    Ok(())
}

#[tokio::test]
async fn sigterm_lets_running_tasks_finish_and_takes_no_new_work() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(
        &dir.path().join("c"),
        free_port(),
        &ControllerOpts::default(),
    )?;
    let addr = c.addr.to_string();
    let mut w = Worker::start(&addr, &dir.path().join("w"), "w", 2)?;
    let mut tasks = tasks_client(&addr).await?;
    let id = submit(&mut tasks, shell("echo start; sleep 1.5; echo end")).await?;
    wait_state(&mut tasks, &id, Some(TaskState::Running), T).await?;
    w.proc.signal(libc::SIGTERM);
    wait_agent(&addr, "the agent to be draining", |a| a.draining).await?;
    let later = submit(&mut tasks, shell("echo later")).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(logs(&mut tasks, &id, 0, false).await?, "start\nend\n");
    let status = w
        .proc
        .wait_exit(Duration::from_secs(20))
        .expect("worker exited");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        get(&mut tasks, &later).await?.state(),
        TaskState::Queued,
        "a stopping worker takes no new work"
    );
    Ok(())
}
