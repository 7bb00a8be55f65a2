//! `scabbard submit`, `scabbard task get|list|cancel`, `scabbard logs`.

use std::io::Write;

use anyhow::{Result, bail};
use scabbard_common::client::{AuthedChannel, TaskServiceClient};
use scabbard_common::is_final;
use scabbard_common::proto::{
    CancelTaskRequest, GetTaskRequest, ListTasksRequest, LogStream, NoopTask, Requirements,
    ShellTask, SubmitTaskRequest, Task, TaskLogsRequest, TaskSpec, TaskState, WatchTasksRequest,
    task_spec::Kind,
};

use crate::args::{LogsArgs, SubmitArgs, TaskCommand};
use crate::{output, progress, render};

pub(crate) async fn submit(a: SubmitArgs) -> Result<u8> {
    let kind = match (a.noop, a.sh, a.command.is_empty()) {
        (true, _, true) => Kind::Noop(NoopTask {}),
        (false, Some(script), true) => Kind::Shell(ShellTask {
            command: vec!["sh".into(), "-c".into(), script],
        }),
        (false, None, false) => Kind::Shell(ShellTask { command: a.command }),
        (false, None, true) => bail!(
            "nothing to run: give a command after `--` (scabbard submit -- make test), or --sh 'script', or --noop"
        ),
        _ => bail!("give either a command, --sh or --noop, not several"),
    };
    let secret_env = secret_env(a.secrets, a.secret_env)?;
    let spec = TaskSpec {
        name: a.name.unwrap_or_default(),
        kind: Some(kind),
        env: a.env.into_iter().collect(),
        requirements: Some(Requirements {
            capabilities: a.require_capabilities,
            labels: a.require_labels.into_iter().collect(),
        }),
        priority: a.priority,
        timeout_ms: a.timeout.map_or(0, |d| d.as_millis() as u64),
        labels: a.labels.into_iter().collect(),
        secret_env,
        ..Default::default()
    };
    let mut tasks = TaskServiceClient::new(super::connect(&a.target).await?);
    let resp = tasks
        .submit(SubmitTaskRequest {
            spec: Some(spec),
            idempotency_key: a.idempotency_key.unwrap_or_default(),
            project: a.project.unwrap_or_default(),
        })
        .await
        .map_err(output::status)?
        .into_inner();
    let task = resp.task.unwrap_or_default();
    if resp.existing {
        esay!("task {} already exists for this idempotency key", task.id);
    }
    if !a.wait && !a.follow {
        render::show(&task, || say!("{}", task.id))?;
        return Ok(0);
    }
    esay!("submitted {}", task.id);
    if a.follow {
        print_logs(&mut tasks, &task.id, 0, true).await?;
    }
    let spinner = if a.follow {
        None
    } else {
        progress::spinner(format!("waiting for task {}", task.id))
    };
    let final_task = wait(&mut tasks, &task.id, spinner.as_ref()).await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    Ok(report(&final_task?))
}

/// `--secret KEY=VALUE` and `--secret-env KEY` (the value of KEY in our environment).
fn secret_env(
    given: Vec<crate::args::SecretKv>,
    from_env: Vec<String>,
) -> Result<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    for s in given {
        let (k, v) = s.split().map_err(anyhow::Error::msg)?;
        out.insert(k, v);
    }
    for key in from_env {
        match std::env::var(&key) {
            Ok(v) => {
                out.insert(key, v);
            }
            Err(std::env::VarError::NotPresent) => {
                bail!("--secret-env {key}: {key} is not set in this environment")
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                bail!("--secret-env {key}: the value of {key} is not valid UTF-8")
            }
        }
    }
    Ok(out)
}

/// Waits until the task is in a final state; with `-o json|yaml` prints every event of
/// the watch (JSON Lines), and shows the state on `spinner`.
pub(super) async fn wait(
    tasks: &mut TaskServiceClient<AuthedChannel>,
    id: &str,
    spinner: Option<&indicatif::ProgressBar>,
) -> Result<Task> {
    let mut stream = tasks
        .watch(WatchTasksRequest {
            ids: vec![id.to_string()],
            send_initial: true,
            ..Default::default()
        })
        .await
        .map_err(output::status)?
        .into_inner();
    while let Some(ev) = stream.message().await.map_err(output::status)? {
        render::event(&ev)?;
        if let Some(t) = ev.task {
            if is_final(t.state()) {
                return Ok(t);
            }
            if let Some(s) = spinner {
                s.set_message(format!(
                    "task {} {}",
                    crate::printable::printable(&t.id),
                    output::state_name(t.state())
                ));
            }
        }
    }
    bail!("the controller closed the watch before task {id} finished")
}

/// Prints the outcome on stderr; the exit code is the task's (1 when it has none).
pub(super) fn report(t: &Task) -> u8 {
    let r = t.result.clone().unwrap_or_default();
    esay!(
        "task {} {} (exit code {}){}",
        t.id,
        output::state_name(t.state()),
        r.exit_code,
        if r.message.is_empty() {
            String::new()
        } else {
            format!(": {}", r.message)
        }
    );
    match t.state() {
        TaskState::Succeeded => 0,
        _ if (1..=255).contains(&r.exit_code) => r.exit_code as u8,
        _ => 1,
    }
}

pub(super) async fn print_logs(
    tasks: &mut TaskServiceClient<AuthedChannel>,
    id: &str,
    attempt: u32,
    follow: bool,
) -> Result<()> {
    let mut stream = tasks
        .logs(TaskLogsRequest {
            task_id: id.to_string(),
            attempt,
            follow,
            from_seq: 0,
        })
        .await
        .map_err(output::status)?
        .into_inner();
    let mut current_attempt = 0;
    while let Some(c) = stream.message().await.map_err(output::status)? {
        if render::structured() {
            render::event(&c)?;
            continue;
        }
        if current_attempt != 0 && c.attempt != current_attempt {
            esay!("--- attempt {} ---", c.attempt);
        }
        current_attempt = c.attempt;
        match c.stream() {
            LogStream::Stderr => std::io::stderr().write_all(&c.data)?,
            // The worker's own lines (they may quote task-chosen names): escaped.
            LogStream::System => eprint!(
                "[scabbard] {}",
                crate::printable::printable_text(&String::from_utf8_lossy(&c.data))
            ),
            _ => {
                let mut out = std::io::stdout().lock();
                out.write_all(&c.data)?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

pub(crate) async fn task(c: TaskCommand) -> Result<u8> {
    match c {
        TaskCommand::Rerun(a) => return super::verbs::task_rerun(a).await,
        TaskCommand::Get { target, id } => {
            let mut tasks = TaskServiceClient::new(super::connect(&target).await?);
            let t = tasks
                .get(GetTaskRequest { id })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&t, || output::task(&t))?;
        }
        TaskCommand::List {
            target,
            states,
            labels,
            limit,
            project,
            page_token,
            all,
            since,
            until,
        } => {
            let states = states
                .iter()
                .map(|s| {
                    let name = format!("TASK_STATE_{}", s.to_ascii_uppercase());
                    TaskState::from_str_name(&name).map(|s| s as i32).ok_or_else(|| {
                        anyhow::anyhow!("unknown state {s:?} (queued, assigned, running, succeeded, failed, cancelled, timed_out, retry_wait)")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let ago = |d: std::time::Duration| {
                (scabbard_common::time::now_ms() - d.as_millis() as i64).max(1)
            };
            let mut tasks = TaskServiceClient::new(super::connect(&target).await?);
            let mut req = ListTasksRequest {
                states,
                labels: labels.into_iter().collect(),
                page_size: limit.clamp(1, 1000),
                page_token: page_token.unwrap_or_default(),
                project: project.unwrap_or_default(),
                created_after_ms: since.map_or(0, ago),
                created_before_ms: until.map_or(0, ago),
            };
            if render::structured() {
                let first = std::mem::take(&mut req.page_token);
                let items = render::pages(all, first, |page_token| {
                    let req = ListTasksRequest {
                        page_token,
                        ..req.clone()
                    };
                    let mut tasks = tasks.clone();
                    async move {
                        let r = tasks.list(req).await.map_err(output::status)?.into_inner();
                        Ok((r.tasks, r.next_page_token))
                    }
                })
                .await?;
                render::show(&items, || ())?;
                return Ok(0);
            }
            let mut first = true;
            loop {
                let resp = tasks
                    .list(req.clone())
                    .await
                    .map_err(output::status)?
                    .into_inner();
                output::tasks_page(&resp.tasks, first);
                first = false;
                if resp.next_page_token.is_empty() {
                    break;
                }
                if !all {
                    render::next_page(&resp.next_page_token);
                    break;
                }
                req.page_token = resp.next_page_token;
            }
        }
        TaskCommand::Cancel { target, id, reason } => {
            let mut tasks = TaskServiceClient::new(super::connect(&target).await?);
            let t = tasks
                .cancel(CancelTaskRequest { id, reason })
                .await
                .map_err(output::status)?
                .into_inner();
            if render::structured() {
                render::show(&t, || ())?;
                return Ok(0);
            }
            say!(
                "{} {}",
                t.id,
                if is_final(t.state()) {
                    output::state_name(t.state())
                } else {
                    "cancel requested"
                }
            );
        }
    }
    Ok(0)
}

pub(crate) async fn logs(a: LogsArgs) -> Result<u8> {
    let mut tasks = TaskServiceClient::new(super::connect(&a.target).await?);
    print_logs(&mut tasks, &a.id, a.attempt, a.follow).await?;
    Ok(0)
}
