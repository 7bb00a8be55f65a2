//! `scabbard workflow submit|get|list|cancel|watch`, and following a workflow to its end
//! (quietly, as a live tree on a terminal, or one line per change otherwise), which
//! `template run --watch` shares.

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, Result};
use scabbard_common::client::AuthedChannel;
use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
use scabbard_common::proto::{
    CancelWorkflowRequest, GetWorkflowRequest, ListWorkflowsRequest, SubmitWorkflowRequest,
    SubmitWorkflowResponse, WatchWorkflowRequest, Workflow, WorkflowState,
};
use scabbard_common::wfdef;

use crate::args::WorkflowCommand;
use crate::output::{self, workflow as view};
use crate::render;

pub(crate) type Client = WorkflowServiceClient<AuthedChannel>;

pub(crate) async fn workflow(c: WorkflowCommand) -> Result<u8> {
    match c {
        WorkflowCommand::Submit {
            target,
            file,
            project,
            idempotency_key,
            wait,
            watch,
        } => {
            let (text, origin) = read_file(&file)?;
            let spec = wfdef::parse_workflow(&text, &origin).map_err(anyhow::Error::msg)?;
            let mut wf = Client::new(super::connect(&target).await?);
            let resp = wf
                .submit(SubmitWorkflowRequest {
                    spec: Some(spec),
                    idempotency_key: idempotency_key.unwrap_or_default(),
                    project: project.unwrap_or_default(),
                })
                .await
                .map_err(output::status)?
                .into_inner();
            started(&mut wf, resp, wait, watch).await
        }
        WorkflowCommand::Get { target, id } => {
            let wf = Client::new(super::connect(&target).await?);
            let w = crate::retry::idempotent(|| {
                let (mut c, id) = (wf.clone(), id.clone());
                async move { c.get(GetWorkflowRequest { id }).await }
            })
            .await
            .map_err(output::status)?
            .into_inner();
            render::show(&w, || details(&w))?;
            Ok(0)
        }
        WorkflowCommand::List {
            target,
            states,
            template,
            project,
            limit,
            page_token,
            all,
        } => {
            let mut wf = Client::new(super::connect(&target).await?);
            let mut req = ListWorkflowsRequest {
                states: states.into_iter().map(|s| s as i32).collect(),
                project: project.unwrap_or_default(),
                template: template.unwrap_or_default(),
                page_size: limit.clamp(1, 1000),
                page_token: page_token.unwrap_or_default(),
                ..Default::default()
            };
            if render::structured() {
                let first = std::mem::take(&mut req.page_token);
                let items = render::pages(all, first, |page_token| {
                    let req = ListWorkflowsRequest {
                        page_token,
                        ..req.clone()
                    };
                    let mut wf = wf.clone();
                    async move {
                        let r = wf.list(req).await.map_err(output::status)?.into_inner();
                        Ok((r.workflows, r.next_page_token))
                    }
                })
                .await?;
                render::show(&items, || ())?;
                return Ok(0);
            }
            let mut first = true;
            loop {
                let resp = wf
                    .list(req.clone())
                    .await
                    .map_err(output::status)?
                    .into_inner();
                if first || !resp.workflows.is_empty() {
                    view::workflows(&resp.workflows);
                }
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
            Ok(0)
        }
        WorkflowCommand::Cancel { target, id, reason } => {
            let mut wf = Client::new(super::connect(&target).await?);
            let w = wf
                .cancel(CancelWorkflowRequest { id, reason })
                .await
                .map_err(output::status)?
                .into_inner();
            if render::structured() {
                render::show(&w, || ())?;
                return Ok(0);
            }
            say!(
                "{} {}",
                w.id,
                if view::is_final(w.state()) {
                    view::workflow_state(w.state())
                } else {
                    "cancel requested"
                }
            );
            Ok(0)
        }
        WorkflowCommand::Rerun(a) => super::verbs::workflow_rerun(a).await,
        WorkflowCommand::Logs(a) => super::workflow_logs::logs(a).await,
        WorkflowCommand::Watch { target, id } => {
            let mut wf = Client::new(super::connect(&target).await?);
            let w = follow(&mut wf, &id, true).await?;
            Ok(report(&w))
        }
    }
}

/// After a submit (of a file or a template): print the id, or follow the workflow.
pub(crate) async fn started(
    wf: &mut Client,
    resp: SubmitWorkflowResponse,
    wait: bool,
    watch: bool,
) -> Result<u8> {
    let w = resp.workflow.unwrap_or_default();
    if resp.existing {
        esay!("workflow {} already exists for this idempotency key", w.id);
    }
    if !wait && !watch {
        render::show(&w, || say!("{}", w.id))?;
        return Ok(0);
    }
    esay!("submitted {}", w.id);
    let last = follow(wf, &w.id, watch).await?;
    Ok(report(&last))
}

/// The workflow file's text and its name for errors (`-` = stdin).
fn read_file(path: &std::path::Path) -> Result<(String, String)> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the workflow from stdin")?;
        return Ok((text, "<stdin>".into()));
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading workflow file {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

/// Follows a workflow with `WorkflowService.Watch` until it is final and returns it.
/// With `show`, draws each event: the tree, redrawn in place, on a terminal; one line
/// per change otherwise. With `-o json|yaml`, every event is printed (JSON Lines), with
/// `show` or not.
/// A broken stream (a leader change) is followed again on a new connection to the
/// leader; Ctrl-C says how to cancel the workflow (see [`crate::interrupt`]).
pub(crate) async fn follow(wf: &mut Client, id: &str, show: bool) -> Result<Workflow> {
    let work = crate::interrupt::Work::Workflow(id, wf.clone());
    crate::interrupt::guard(work, async {
        let mut last: Option<Workflow> = None;
        let mut drawn = 0usize;
        loop {
            match follow_once(wf, id, show, &mut last, &mut drawn).await {
                Ok(w) => return Ok(w),
                Err(Broke::Status(s)) if crate::retry::broken_stream(&s) => {
                    *wf = Client::new(crate::retry::reconnect(&s).await?);
                }
                Err(Broke::Status(s)) => return Err(output::status(s)),
                Err(Broke::Local(e)) => return Err(e),
            }
        }
    })
    .await
}

enum Broke {
    Status(tonic::Status),
    Local(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Broke {
    fn from(e: E) -> Self {
        Broke::Local(e.into())
    }
}

async fn follow_once(
    wf: &mut Client,
    id: &str,
    show: bool,
    last: &mut Option<Workflow>,
    drawn: &mut usize,
) -> Result<Workflow, Broke> {
    let tty = std::io::stdout().is_terminal();
    let structured = render::structured();
    let mut stream = crate::retry::idempotent(|| {
        let mut c = wf.clone();
        let req = WatchWorkflowRequest {
            id: id.to_string(),
            ..Default::default()
        };
        async move { c.watch(req).await }
    })
    .await
    .map_err(Broke::Status)?
    .into_inner();
    while let Some(ev) = stream.message().await.map_err(Broke::Status)? {
        if structured {
            render::event(&ev)?;
        }
        let Some(w) = ev.workflow else { continue };
        if show && !structured {
            if tty {
                *drawn = redraw(*drawn, &view::tree(&w))?;
            } else {
                let mut out = std::io::stdout().lock();
                for line in view::changes(last.as_ref(), &w) {
                    writeln!(out, "{}", crate::printable::printable(&line))?;
                }
                out.flush()?;
            }
        }
        let done = view::is_final(w.state());
        *last = Some(w.clone());
        if done {
            return Ok(w);
        }
    }
    Err(Broke::Status(tonic::Status::unavailable(format!(
        "the controller closed the watch before workflow {id} finished"
    ))))
}

/// Replaces the `drawn` lines printed last with `lines`; returns how many it printed.
/// Line wrap is off while drawing, so each line takes exactly one row.
fn redraw(drawn: usize, lines: &[String]) -> Result<usize> {
    let mut out = std::io::stdout().lock();
    let mut buf = String::from("\x1b[?7l");
    if drawn > 0 {
        buf.push_str(&format!("\x1b[{drawn}A\r\x1b[J"));
    }
    for l in lines {
        buf.push_str(&crate::printable::printable(l));
        buf.push('\n');
    }
    buf.push_str("\x1b[?7h");
    out.write_all(buf.as_bytes())?;
    out.flush()?;
    Ok(lines.len())
}

/// Prints the outcome on stderr; exit code 0 if the workflow succeeded, 1 otherwise.
pub(crate) fn report(w: &Workflow) -> u8 {
    let end = if w.finished_at_ms > 0 {
        w.finished_at_ms
    } else {
        w.updated_at_ms
    };
    esay!(
        "workflow {} {} in {} ({}/{} nodes done){}",
        w.id,
        view::workflow_state(w.state()),
        view::took(w.created_at_ms, end),
        w.done,
        w.total,
        if w.message.is_empty() {
            String::new()
        } else {
            format!(": {}", w.message)
        }
    );
    u8::from(w.state() != WorkflowState::Succeeded)
}

/// `workflow get`: the tree, then where it came from and each node's task.
fn details(w: &Workflow) {
    for line in view::tree(w) {
        say!("{line}");
    }
    say!();
    say!("project:   {}", w.project);
    if let Some(p) = &w.placement {
        say!("reason:    {}", output::placement::code(p));
    }
    say!("created:   {} UTC", output::utc(w.created_at_ms));
    if w.finished_at_ms > 0 {
        say!(
            "finished:  {} UTC (took {})",
            output::utc(w.finished_at_ms),
            view::took(w.created_at_ms, w.finished_at_ms)
        );
    }
    if let Some(t) = w.template.as_ref().filter(|t| !t.name.is_empty()) {
        let mut params: Vec<String> = t.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        params.sort();
        say!(
            "template:  {} version {} {}",
            t.name,
            t.version,
            params.join(" ")
        );
        if !t.schedule_id.is_empty() {
            say!(
                "schedule:  {} (tick {} UTC)",
                t.schedule_id,
                output::utc(t.scheduled_for_ms)
            );
        }
    }
    if !w.idempotency_key.is_empty() {
        say!("idem key:  {}", w.idempotency_key);
    }
    let tasks: Vec<_> = w.nodes.iter().filter(|n| !n.task_id.is_empty()).collect();
    if !tasks.is_empty() {
        say!("tasks (scabbard logs <task>):");
        for n in tasks {
            say!("  {:<20} {}", n.name, n.task_id);
        }
    }
}

#[cfg(test)]
mod tests;
