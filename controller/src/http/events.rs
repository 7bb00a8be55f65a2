//! `GET /api/v1/events`: task *and* workflow events as one server-sent event stream,
//! resumable with `Last-Event-ID` after restarts and leader changes, with no gap.
//!
//! Task events come from the in-process `TaskService.Watch` (event `task`, data a
//! `TaskEvent`). Workflow events (event `workflow`, data a `WorkflowEvent`: the whole
//! workflow with its nodes, and the revision of that state) come from a store watch of the
//! workflow headers (a header is written last for every change of a workflow), read at
//! once and shown only when the caller's token may see the workflow's project (asked with
//! `WhoAmI` when the stream opens, the same rule as `WorkflowService.Get`). Each workflow
//! event is the workflow's state now, so states it went through while a client was away
//! are folded into one, as `WorkflowService.Watch` does.
//!
//! Every event's id is the stream's cursor, `<task revision>:<task id>:<workflow
//! revision>`: the last task event sent and the last workflow revision looked at. The two
//! sources interleave freely, and resuming from any id restarts each of them exactly
//! after what was sent. Ids of the form `<revision>:<task id>` (task events only) are
//! accepted too. With `ids` (task ids) the stream carries only those tasks' events.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use scabbard_common::proto as pb;
use tonic::Code;

use super::HttpState;
use super::error::{call_failed, code_name, error, status_response};
use super::routes::{build_request, call_unary};
use super::sse::{last_event_id, open};
use crate::core::workflows::WORKFLOW_PREFIX;
use crate::store::{Store, WatchEvent, WatchStream};

/// Where a stream stands: the last task event and the last workflow revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) task_rev: i64,
    pub(crate) task_id: String,
    pub(crate) wf_rev: i64,
}

impl Cursor {
    /// Parses `<rev>:<task id>[:<workflow rev>]` (a two-part id resumes workflows from
    /// the task revision).
    pub(crate) fn parse(id: &str) -> Option<Self> {
        let mut parts = id.splitn(3, ':');
        let task_rev = parts.next()?.parse::<i64>().ok().filter(|r| *r >= 0)?;
        let task_id = parts.next().unwrap_or("").to_string();
        let wf_rev = match parts.next() {
            Some(w) => w.parse::<i64>().ok().filter(|r| *r >= 0)?,
            None => task_rev,
        };
        Some(Self {
            task_rev,
            task_id,
            wf_rev,
        })
    }

    fn id(&self) -> String {
        format!("{}:{}:{}", self.task_rev, self.task_id, self.wf_rev)
    }
}

/// The handler.
pub(crate) async fn events(
    State(st): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut req: pb::WatchTasksRequest = match build_request("/api/v1/events", &[], &uri, b"") {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let resume = match last_event_id(&headers) {
        Some(id) => match Cursor::parse(&id) {
            Some(c) => Some(c),
            None => {
                return error(
                    Code::InvalidArgument,
                    format!(
                        "Last-Event-ID {id:?} is not an event id of this stream (<revision>:<task id>:<workflow revision>)"
                    ),
                );
            }
        },
        None => None,
    };
    let with_workflows = req.ids.is_empty();
    // The store's revision before the task watch opens: a client resuming from it misses
    // nothing a live watch would have sent.
    let cursor = match resume {
        Some(c) => {
            req.after_revision = c.task_rev;
            req.after_task_id = c.task_id.clone();
            c
        }
        None => match st.store.range(WORKFLOW_PREFIX, None, 1).await {
            Ok(page) => Cursor {
                task_rev: page.revision,
                task_id: String::new(),
                wf_rev: page.revision,
            },
            Err(e) => return status_response(&tonic::Status::from(e)),
        },
    };
    let rpc = "/scabbard.v1.TaskService/Watch";
    let tasks = match open::<_, pb::TaskEvent>(&st, &headers, peer, rpc, req).await {
        Ok(s) => s,
        Err(status) => return call_failed(&st, &uri, status).await,
    };
    let workflows = if with_workflows {
        let who = match call_unary::<_, pb::WhoAmIResponse>(
            &st,
            &headers,
            peer,
            "/scabbard.v1.AdminService/WhoAmI",
            pb::WhoAmIRequest::default(),
        )
        .await
        {
            Ok(w) => w.token.unwrap_or_default(),
            Err(status) => return call_failed(&st, &uri, status).await,
        };
        match st.store.watch(WORKFLOW_PREFIX, cursor.wf_rev + 1).await {
            Ok(w) => Some((w, who.project)),
            Err(e) => return status_response(&tonic::Status::from(e)),
        }
    } else {
        None
    };
    let state = Merged {
        tasks,
        workflows,
        store: st.store.clone(),
        cursor,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let ev = s.next().await;
        Some((Ok::<_, std::convert::Infallible>(ev), s))
    })
    .boxed();
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The two sources and the cursor.
struct Merged {
    tasks: tonic::Streaming<pb::TaskEvent>,
    /// The workflow header watch and the caller's project (`*` = every project).
    workflows: Option<(WatchStream, String)>,
    store: Arc<dyn Store>,
    cursor: Cursor,
    done: bool,
}

impl Merged {
    /// The next event to send; an `error` event ends the stream.
    async fn next(&mut self) -> Event {
        loop {
            let got = match self.workflows.as_mut() {
                Some((w, _)) => tokio::select! {
                    t = self.tasks.next() => Source::Task(t),
                    w = w.recv() => Source::Workflow(w),
                },
                None => Source::Task(self.tasks.next().await),
            };
            match got {
                Source::Task(Some(Ok(e))) => {
                    self.cursor.task_rev = e.revision;
                    self.cursor.task_id = e.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
                    return json_event("task", self.cursor.id(), &e);
                }
                Source::Task(Some(Err(status))) => return self.fail(&status),
                Source::Task(None) => {
                    return self.fail(&tonic::Status::unavailable(
                        "the task watch ended; reconnect with Last-Event-ID",
                    ));
                }
                Source::Workflow(Some(Ok(WatchEvent::Put(kv)))) => {
                    let Some(id) = kv
                        .key
                        .strip_prefix(WORKFLOW_PREFIX)
                        .filter(|rest| !rest.contains('/'))
                    else {
                        continue;
                    };
                    if kv.mod_revision <= self.cursor.wf_rev {
                        continue; // folded into a state already sent
                    }
                    let id = id.to_string();
                    match crate::api::workflows::read_from_store(&self.store, &id).await {
                        Ok(Some((wf, rev))) => {
                            self.cursor.wf_rev = self.cursor.wf_rev.max(rev).max(kv.mod_revision);
                            let project = self.workflows.as_ref().map_or("", |(_, p)| p.as_str());
                            if project != crate::auth::ALL_PROJECTS && project != wf.project {
                                continue;
                            }
                            let e = pb::WorkflowEvent {
                                workflow: Some(crate::api::workflows::masked_workflow(wf)),
                                revision: rev.max(kv.mod_revision),
                            };
                            return json_event("workflow", self.cursor.id(), &e);
                        }
                        Ok(None) => {
                            self.cursor.wf_rev = kv.mod_revision;
                            continue;
                        }
                        Err(status) => return self.fail(&status),
                    }
                }
                Source::Workflow(Some(Ok(WatchEvent::Delete { .. }))) => continue,
                Source::Workflow(Some(Err(e))) => {
                    return self.fail(&tonic::Status::aborted(format!(
                        "the workflow watch broke ({e}); reconnect with Last-Event-ID"
                    )));
                }
                Source::Workflow(None) => {
                    return self.fail(&tonic::Status::unavailable(
                        "the store watch ended; reconnect with Last-Event-ID",
                    ));
                }
            }
        }
    }

    fn fail(&mut self, status: &tonic::Status) -> Event {
        self.done = true;
        let body = serde_json::json!({
            "code": code_name(status.code()),
            "message": status.message(),
        });
        Event::default().event("error").data(body.to_string())
    }
}

/// What one wait of [`Merged::next`] got (short-lived, on the stack: size is no concern).
#[allow(clippy::large_enum_variant)]
enum Source {
    Task(Option<Result<pb::TaskEvent, tonic::Status>>),
    Workflow(Option<scabbard_common::Result<WatchEvent>>),
}

fn json_event<T: serde::Serialize>(name: &str, id: String, data: &T) -> Event {
    Event::default()
        .event(name)
        .id(id)
        .json_data(data)
        .unwrap_or_else(|e| Event::default().event("error").data(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_old_ids_resume() {
        let c = Cursor::parse("12:01abc:9").expect("cursor");
        assert_eq!((c.task_rev, c.task_id.as_str(), c.wf_rev), (12, "01abc", 9));
        assert_eq!(Cursor::parse(&c.id()), Some(c));
        let old = Cursor::parse("12:01abc").expect("two-part id");
        assert_eq!(old.wf_rev, 12);
        assert_eq!(Cursor::parse("12").map(|c| c.task_id), Some(String::new()));
        assert!(Cursor::parse("yesterday").is_none());
        assert!(Cursor::parse("1:a:x").is_none());
        assert!(Cursor::parse("-1:a").is_none());
    }
}
