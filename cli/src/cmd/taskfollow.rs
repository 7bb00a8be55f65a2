//! Following one task to its end — its log (`submit --follow`, `logs --follow`) and its
//! state (`submit --wait/--follow`) — across a leader change: when the stream breaks
//! (the leader was killed, the connection reset), the CLI finds the leader again
//! ([`crate::retry::reconnect`]) and resumes from the last chunk (`from_seq`) or the
//! task's current state (the watch sends it first).

use std::io::Write;

use anyhow::Result;
use scabbard_common::client::{AuthedChannel, TaskServiceClient};
use scabbard_common::is_final;
use scabbard_common::proto::{LogStream, Task, TaskLogsRequest, WatchTasksRequest};
use tonic::Status;

use crate::output::placement;
use crate::{output, render, retry};

type Client = TaskServiceClient<AuthedChannel>;

/// Waits until the task is in a final state; with `-o json|yaml` prints every event of
/// the watch (JSON Lines), and shows the state on `spinner`. Why the task waits (its
/// placement explanation) goes on the spinner, else on stderr, each time it changes. With
/// `lines` (`task watch`), prints one line per change on stdout instead.
pub(crate) async fn wait(
    tasks: &mut Client,
    id: &str,
    spinner: Option<&indicatif::ProgressBar>,
    lines: bool,
) -> Result<Task> {
    // Survives reconnects, so a resumed watch does not repeat what was shown.
    let mut last: Option<Task> = None;
    loop {
        match watch_once(tasks, id, spinner, lines, &mut last).await {
            Ok(t) => return Ok(t),
            Err(s) if retry::broken_stream(&s) => {
                *tasks = Client::new(retry::reconnect(&s).await?);
            }
            Err(s) => return Err(output::status(s)),
        }
    }
}

async fn watch_once(
    tasks: &mut Client,
    id: &str,
    spinner: Option<&indicatif::ProgressBar>,
    lines: bool,
    last: &mut Option<Task>,
) -> Result<Task, Status> {
    let mut stream = retry::idempotent(|| {
        let mut c = tasks.clone();
        let req = WatchTasksRequest {
            ids: vec![id.to_string()],
            send_initial: true,
            ..Default::default()
        };
        async move { c.watch(req).await }
    })
    .await?
    .into_inner();
    while let Some(ev) = stream.message().await? {
        render::event(&ev).map_err(|e| Status::internal(e.to_string()))?;
        if let Some(t) = ev.task {
            show_change(last.as_ref(), &t, spinner, lines);
            if is_final(t.state()) {
                return Ok(t);
            }
            *last = Some(t);
        }
    }
    Err(Status::unavailable(format!(
        "the controller closed the watch before task {id} finished"
    )))
}

/// Shows what changed between `last` and `t`: the state, and why it waits.
fn show_change(
    last: Option<&Task>,
    t: &Task,
    spinner: Option<&indicatif::ProgressBar>,
    lines: bool,
) {
    let moved = last.is_none_or(|l| l.state != t.state);
    let why = t.placement.as_ref().filter(|_| {
        !placement::same(
            last.and_then(|l| l.placement.as_ref()),
            t.placement.as_ref(),
        )
    });
    if lines && !render::structured() {
        if moved {
            say!(
                "{} {}",
                clock(t.updated_at_ms),
                output::state_name(t.state())
            );
        }
        if let Some(p) = why {
            say!(
                "{} waiting: {} [{}]",
                clock(p.updated_at_ms),
                p.message,
                placement::code(p)
            );
        }
    }
    if is_final(t.state()) {
        return;
    }
    match (spinner, why) {
        (Some(s), Some(p)) => s.set_message(format!(
            "task {} waiting: {}",
            crate::printable::printable(&t.id),
            crate::printable::printable(&p.message)
        )),
        (Some(s), None) if moved => s.set_message(format!(
            "task {} {}",
            crate::printable::printable(&t.id),
            output::state_name(t.state())
        )),
        (None, Some(p)) if !lines && !render::structured() => {
            esay!(
                "task {} waiting: {} [{}]",
                t.id,
                p.message,
                placement::code(p)
            )
        }
        _ => {}
    }
}

/// `HH:MM:SS` (UTC) of a unix-ms time.
fn clock(ms: i64) -> String {
    let full = output::utc(ms.max(1));
    full.get(11..19).unwrap_or(&full).to_string()
}

/// Prints the task's log (one attempt, or the latest: `attempt` 0), following it when
/// `follow`; resumes after the last chunk printed when the stream breaks.
pub(crate) async fn logs(tasks: &mut Client, id: &str, attempt: u32, follow: bool) -> Result<()> {
    let mut pos = Position {
        attempt,
        next_seq: 0,
        shown_attempt: 0,
    };
    loop {
        match logs_once(tasks, id, follow, &mut pos).await {
            Ok(()) => return Ok(()),
            Err(Broke::Status(s)) if retry::broken_stream(&s) => {
                *tasks = Client::new(retry::reconnect(&s).await?);
            }
            Err(Broke::Status(s)) => return Err(output::status(s)),
            Err(Broke::Local(e)) => return Err(e),
        }
    }
}

/// Where a log stream is: the attempt asked for (0 = the latest), the one printed last
/// and the next chunk of it.
struct Position {
    attempt: u32,
    next_seq: u64,
    shown_attempt: u32,
}

enum Broke {
    Status(Status),
    Local(anyhow::Error),
}

impl From<Status> for Broke {
    fn from(s: Status) -> Self {
        Broke::Status(s)
    }
}

impl From<std::io::Error> for Broke {
    fn from(e: std::io::Error) -> Self {
        Broke::Local(e.into())
    }
}

async fn logs_once(
    tasks: &mut Client,
    id: &str,
    follow: bool,
    pos: &mut Position,
) -> Result<(), Broke> {
    let mut stream = retry::idempotent(|| {
        let mut c = tasks.clone();
        let req = TaskLogsRequest {
            task_id: id.to_string(),
            attempt: pos.attempt,
            follow,
            from_seq: pos.next_seq,
        };
        async move { c.logs(req).await }
    })
    .await?
    .into_inner();
    while let Some(c) = stream.message().await? {
        if c.attempt == pos.shown_attempt && c.seq < pos.next_seq {
            continue; // printed before the reconnect
        }
        if render::structured() {
            render::event(&c).map_err(Broke::Local)?;
        } else {
            if pos.shown_attempt != 0 && c.attempt != pos.shown_attempt {
                esay!("--- attempt {} ---", c.attempt);
            }
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
        pos.shown_attempt = c.attempt;
        pos.next_seq = c.seq + 1;
    }
    Ok(())
}
