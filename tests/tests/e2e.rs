//! End to end through real processes: a `scabbard controller` and `scabbard worker`s on
//! loopback, driven over gRPC.

use std::time::Duration;

use scabbard_common::proto::{Outcome, TaskState};
use scabbard_tests::*;

const T: Duration = Duration::from_secs(30);

async fn cluster(workers: usize) -> anyhow::Result<(tempfile::TempDir, Controller, Vec<Worker>)> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(
        &dir.path().join("controller"),
        free_port(),
        &ControllerOpts::default(),
    )?;
    let mut ws = Vec::new();
    for i in 0..workers {
        ws.push(Worker::start(
            &c.addr.to_string(),
            &dir.path().join(format!("w{i}")),
            &format!("w{i}"),
            2,
        )?);
    }
    Ok((dir, c, ws))
}

#[tokio::test]
async fn task_runs_logs_follow_in_order_and_succeeds() -> anyhow::Result<()> {
    let (_d, c, _w) = cluster(1).await?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let id = submit(
        &mut tasks,
        shell("for i in $(seq 1 50); do echo line-$i; done; echo to-stderr >&2"),
    )
    .await?;
    // Follow from the moment of submission: returns when the attempt is sealed.
    let text = logs(&mut tasks, &id, 0, true).await?;
    let expected: String = (1..=50).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(text.replace("to-stderr\n", ""), expected);
    assert!(text.contains("to-stderr"));
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(t.attempts.len(), 1);
    Ok(())
}

#[tokio::test]
async fn non_zero_exit_fails_with_the_exit_code() -> anyhow::Result<()> {
    let (_d, c, _w) = cluster(1).await?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let id = submit(&mut tasks, shell("echo boom; exit 7")).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed);
    let r = t.result.unwrap();
    assert_eq!(r.exit_code, 7);
    assert_eq!(r.outcome(), Outcome::Failed);
    assert_eq!(logs(&mut tasks, &id, 0, false).await?, "boom\n");
    Ok(())
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() -> anyhow::Result<()> {
    let (d, c, _w) = cluster(1).await?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let pidfile = d.path().join("bg.pid");
    let mut spec = shell(&format!(
        "sleep 300 & echo $! > {}; echo started; wait",
        pidfile.display()
    ));
    spec.timeout_ms = 1500;
    let id = submit(&mut tasks, spec).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::TimedOut, "{t:?}");
    let pid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    eventually(
        "the background sleep to be killed",
        Duration::from_secs(10),
        || async { (!pid_alive(pid)).then_some(()) },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn cancel_kills_a_running_task() -> anyhow::Result<()> {
    let (d, c, _w) = cluster(1).await?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let pidfile = d.path().join("cancel.pid");
    let id = submit(
        &mut tasks,
        shell(&format!(
            "echo $$ > {}; echo up; sleep 300",
            pidfile.display()
        )),
    )
    .await?;
    wait_state(&mut tasks, &id, Some(TaskState::Running), T).await?;
    eventually("the task to write its pid", T, || async {
        pidfile.exists().then_some(())
    })
    .await?;
    tasks
        .cancel(scabbard_common::proto::CancelTaskRequest {
            id: id.clone(),
            reason: "test".into(),
        })
        .await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Cancelled, "{t:?}");
    let pid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    eventually(
        "the task's shell to be gone",
        Duration::from_secs(10),
        || async { (!pid_alive(pid)).then_some(()) },
    )
    .await?;
    // Cancelling again is refused: the task is final.
    let err = tasks
        .cancel(scabbard_common::proto::CancelTaskRequest {
            id,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    Ok(())
}

#[tokio::test]
async fn queued_task_waits_for_a_matching_agent() -> anyhow::Result<()> {
    let (d, c, _w) = cluster(1).await?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let mut spec = shell("echo on-gpu");
    spec.requirements = Some(scabbard_common::proto::Requirements {
        labels: [("name".to_string(), "gpu-box".to_string())].into(),
        ..Default::default()
    });
    let id = submit(&mut tasks, spec).await?;
    // w0 does not match: the task stays queued.
    let quick = submit(&mut tasks, shell("true")).await?;
    wait_state(&mut tasks, &quick, Some(TaskState::Succeeded), T).await?;
    assert_eq!(get(&mut tasks, &id).await?.state(), TaskState::Queued);
    let _gpu = Worker::start(&c.addr.to_string(), &d.path().join("gpu"), "gpu-box", 1)?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded);
    Ok(())
}
