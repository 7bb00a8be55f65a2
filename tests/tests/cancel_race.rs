//! An accepted cancel always ends the attempt, whatever the timing: while the task is
//! queued, assigned (the worker has not acked yet), while the worker spawns the process,
//! just after it turned RUNNING, and while the worker's session is down. Real controller and
//! worker processes; every cancelled task must reach CANCELLED within a deadline and its
//! process must be gone (each task writes its shell's pid to a file first).

use std::path::Path;
use std::time::{Duration, Instant};

use scabbard_common::proto::{CancelTaskRequest, TaskState};
use scabbard_tests::proxy::Proxy;
use scabbard_tests::*;

/// How long one cancelled task may take to end (generous: the machine may be loaded).
const END: Duration = Duration::from_secs(30);

/// A task that records its shell's pid, prints, and sleeps far longer than any test.
fn sleeper(dir: &Path, i: usize) -> scabbard_common::proto::TaskSpec {
    let pid = dir.join(format!("{i}.pid"));
    shell(&format!("echo $$ > {}; echo up; sleep 300", pid.display()))
}

/// Cancels `id`; a task that ended meanwhile (it cannot have: it sleeps) is an error too.
async fn cancel(tasks: &mut Tasks, id: &str) -> anyhow::Result<()> {
    tasks
        .cancel(CancelTaskRequest {
            id: id.to_string(),
            reason: "cancel race test".into(),
        })
        .await?;
    Ok(())
}

/// Every task in `ids` ends CANCELLED, and no process any of them started is alive.
async fn all_cancelled_and_gone(
    tasks: &mut Tasks,
    pids: &Path,
    ids: &[(usize, String, u64)],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + END;
    let mut stuck = Vec::new();
    // Where the cancels hit: before any assignment, after it but before the process wrote
    // its pid, or once it ran.
    let (mut queued, mut assigned, mut ran) = (0, 0, 0);
    for (i, id, delay) in ids {
        let left = deadline.saturating_duration_since(Instant::now());
        match wait_state(tasks, id, None, left.max(Duration::from_millis(200))).await {
            Ok(t) if t.state() == TaskState::Cancelled => {
                if t.attempts.is_empty() {
                    queued += 1;
                } else if pids.join(format!("{i}.pid")).exists() {
                    ran += 1;
                } else {
                    assigned += 1;
                }
            }
            Ok(t) => stuck.push(format!(
                "#{i} ({delay} ms) ended {:?}: {:?}",
                t.state(),
                t.result
            )),
            Err(e) => stuck.push(format!("#{i} ({delay} ms): {e}")),
        }
    }
    anyhow::ensure!(
        stuck.is_empty(),
        "{} of {} cancelled tasks did not end CANCELLED within {END:?}:\n{}",
        stuck.len(),
        ids.len(),
        stuck.join("\n")
    );
    println!(
        "cancelled: {queued} while queued, {assigned} assigned before their process ran, {ran} once their process had started"
    );
    // Tasks whose process started wrote its pid: that process must be gone.
    for (i, _, _) in ids {
        let Ok(text) = std::fs::read_to_string(pids.join(format!("{i}.pid"))) else {
            continue;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            continue; // written half-way when the cancel hit: the group is gone anyway
        };
        eventually(
            &format!("the process of task #{i} (pid {pid}) to be gone"),
            Duration::from_secs(10),
            || async { (!pid_alive(pid)).then_some(()) },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn cancel_at_any_moment_after_submit_ends_the_attempt() -> anyhow::Result<()> {
    let d = tempfile::tempdir()?;
    let c = Controller::start(&d.path().join("c"), 0, &ControllerOpts::default())?;
    let _w = Worker::start(&c.addr.to_string(), &d.path().join("w"), "w", 8)?;
    wait_agent(&c.addr.to_string(), "the worker to connect", |a| {
        a.name == "w" && a.status() == scabbard_common::proto::AgentStatus::Connected
    })
    .await?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let pids = d.path().join("pids");
    std::fs::create_dir_all(&pids)?;
    // Delays from 0 to 50 ms between submit and cancel sweep every window: queued,
    // assigned (not yet acked), spawning, just running. Six at a time, so the worker is
    // busy starting some while the cancels of others arrive.
    let mut ids = Vec::new();
    for group in 0..10usize {
        let runs = (0..6usize).map(|k| {
            let (mut tasks, pids, i) = (tasks.clone(), pids.clone(), group * 6 + k);
            async move {
                let delay = (i as u64 * 7) % 51;
                let id = submit(&mut tasks, sleeper(&pids, i)).await?;
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                cancel(&mut tasks, &id).await?;
                anyhow::Ok((i, id, delay))
            }
        });
        for r in futures::future::join_all(runs).await {
            ids.push(r?);
        }
    }
    all_cancelled_and_gone(&mut tasks, &pids, &ids).await
}

#[tokio::test]
async fn cancel_right_when_running_ends_the_attempt() -> anyhow::Result<()> {
    let d = tempfile::tempdir()?;
    let c = Controller::start(&d.path().join("c"), 0, &ControllerOpts::default())?;
    let _w = Worker::start(&c.addr.to_string(), &d.path().join("w"), "w", 4)?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let pids = d.path().join("pids");
    std::fs::create_dir_all(&pids)?;
    // Cancel the moment the controller says RUNNING (the worker acked; its process may
    // not exist yet), as the web UI's cancel button does.
    let mut ids = Vec::new();
    for i in 0..15usize {
        let id = submit(&mut tasks, sleeper(&pids, i)).await?;
        wait_state(&mut tasks, &id, Some(TaskState::Running), END).await?;
        cancel(&mut tasks, &id).await?;
        ids.push((i, id, 0));
    }
    all_cancelled_and_gone(&mut tasks, &pids, &ids).await
}

#[tokio::test]
async fn cancel_while_the_worker_is_away_is_applied_when_it_returns() -> anyhow::Result<()> {
    let d = tempfile::tempdir()?;
    // A lease long enough that the worker comes back before it is declared lost: the
    // cancel must then reach it on the new session (not only end the task's record).
    let opts = ControllerOpts {
        lease: "20s",
        ..ControllerOpts::default()
    };
    let c = Controller::start(&d.path().join("c"), 0, &opts)?;
    let proxy = Proxy::start(c.addr).await?;
    let _w = Worker::start(&proxy.addr.to_string(), &d.path().join("w"), "w", 4)?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let pids = d.path().join("pids");
    std::fs::create_dir_all(&pids)?;
    let mut ids = Vec::new();
    for i in 0..3usize {
        let id = submit(&mut tasks, sleeper(&pids, i)).await?;
        wait_state(&mut tasks, &id, Some(TaskState::Running), END).await?;
        eventually("the task's pid file", END, || async {
            pids.join(format!("{i}.pid")).exists().then_some(())
        })
        .await?;
        ids.push((i, id, 0));
    }
    // Cut the session and keep the worker out while the cancels are accepted.
    proxy.cut(true);
    wait_agent(
        &c.addr.to_string(),
        "the controller to see the worker gone",
        |a| a.name == "w" && a.status() != scabbard_common::proto::AgentStatus::Connected,
    )
    .await?;
    for (_, id, _) in &ids {
        cancel(&mut tasks, id).await?;
    }
    for (_, id, _) in &ids {
        let t = get(&mut tasks, id).await?;
        assert!(
            t.cancel_requested && t.state() == TaskState::Running,
            "{t:?}"
        );
    }
    proxy.restore();
    all_cancelled_and_gone(&mut tasks, &pids, &ids).await
}

#[tokio::test]
async fn cancel_while_the_worker_stays_away_past_its_lease() -> anyhow::Result<()> {
    let d = tempfile::tempdir()?;
    // The default 2 s lease: the worker is lost while it is cut off.
    let c = Controller::start(&d.path().join("c"), 0, &ControllerOpts::default())?;
    let proxy = Proxy::start(c.addr).await?;
    let _w = Worker::start(&proxy.addr.to_string(), &d.path().join("w"), "w", 2)?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let pids = d.path().join("pids");
    std::fs::create_dir_all(&pids)?;
    let id = submit(&mut tasks, sleeper(&pids, 0)).await?;
    wait_state(&mut tasks, &id, Some(TaskState::Running), END).await?;
    eventually("the task's pid file", END, || async {
        pids.join("0.pid").exists().then_some(())
    })
    .await?;
    proxy.cut(true);
    wait_agent(
        &c.addr.to_string(),
        "the controller to see the worker gone",
        |a| a.name == "w" && a.status() != scabbard_common::proto::AgentStatus::Connected,
    )
    .await?;
    cancel(&mut tasks, &id).await?;
    // The controller ends the task when the lease runs out, without the worker…
    let t = wait_state(&mut tasks, &id, None, END).await?;
    assert_eq!(t.state(), TaskState::Cancelled, "{t:?}");
    // …and the worker, back, hears the attempt is not kept and kills its process.
    proxy.restore();
    all_cancelled_and_gone(&mut tasks, &pids, &[(0, id, 0)]).await
}
