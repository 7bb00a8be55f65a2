//! `scabbard submit`, `scabbard task get|list|cancel`, `scabbard logs`.

use anyhow::{Result, bail};
use scabbard_common::client::TaskServiceClient;
use scabbard_common::is_final;
use scabbard_common::proto::{
    CancelTaskRequest, GetTaskRequest, ListTasksRequest, NoopTask, Requirements, ShellTask,
    SubmitTaskRequest, Task, TaskSpec, TaskState, task_spec::Kind,
};

use super::taskfollow;
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
    let req = SubmitTaskRequest {
        spec: Some(spec),
        idempotency_key: a.idempotency_key.unwrap_or_default(),
        project: a.project.unwrap_or_default(),
    };
    // Sent again after a rate limit or an outage only with an idempotency key: without
    // one, a retry could run the task twice.
    let resp = if req.idempotency_key.is_empty() {
        tasks.submit(req).await
    } else {
        crate::retry::idempotent(|| {
            let (mut c, req) = (tasks.clone(), req.clone());
            async move { c.submit(req).await }
        })
        .await
    }
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
    let spinner = if a.follow {
        None
    } else {
        progress::spinner(format!("waiting for task {}", task.id))
    };
    let work = crate::interrupt::Work::Task(&task.id, tasks.clone());
    let final_task = crate::interrupt::guard(work, async {
        if a.follow {
            taskfollow::logs(&mut tasks, &task.id, 0, true).await?;
        }
        taskfollow::wait(&mut tasks, &task.id, spinner.as_ref(), false).await
    })
    .await;
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
        _ => crate::exit::of_task(r.exit_code),
    }
}

pub(crate) async fn task(c: TaskCommand) -> Result<u8> {
    match c {
        TaskCommand::Rerun(a) => return super::verbs::task_rerun(a).await,
        TaskCommand::Get { target, id } => {
            let tasks = TaskServiceClient::new(super::connect(&target).await?);
            let t = crate::retry::idempotent(|| {
                let (mut c, id) = (tasks.clone(), id.clone());
                async move { c.get(GetTaskRequest { id }).await }
            })
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
            let tasks = TaskServiceClient::new(super::connect(&target).await?);
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
                let resp = crate::retry::idempotent(|| {
                    let (mut c, req) = (tasks.clone(), req.clone());
                    async move { c.list(req).await }
                })
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
        TaskCommand::Watch { target, id } => {
            let mut tasks = TaskServiceClient::new(super::connect(&target).await?);
            let t = taskfollow::wait(&mut tasks, &id, None, true).await?;
            return Ok(report(&t));
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
    let work = crate::interrupt::Work::Task(&a.id, tasks.clone());
    let printing = taskfollow::logs(&mut tasks, &a.id, a.attempt, a.follow);
    if a.follow {
        crate::interrupt::guard(work, printing).await?;
    } else {
        printing.await?;
    }
    Ok(0)
}
