//! `scabbard workflow logs <id>`: every node's log, each line prefixed by the node's name
//! (as `docker compose logs` does), built on the existing RPCs: `WorkflowService.Get` (or
//! `Watch` with `--follow`) for the nodes' task ids, `TaskService.Logs` for each task.
//!
//! Without `--follow` the nodes that have run so far are printed one after the other, in
//! the workflow's order. With `--follow` every node's log is streamed as it comes (nodes
//! released later join when they get their task), until the workflow has ended and every
//! stream has drained. stdout and stderr lines of the tasks all go to stdout (a prefix
//! already says whose line it is); the worker's own lines read `[scabbard] …`.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use anyhow::{Result, bail};
use scabbard_common::client::{AuthedChannel, TaskServiceClient};
use scabbard_common::proto::{
    GetWorkflowRequest, LogChunk, LogStream, TaskLogsRequest, WatchWorkflowRequest, Workflow,
    WorkflowNode,
};
use tokio::sync::mpsc;

use super::workflows::Client;
use crate::args::WorkflowLogsArgs;
use crate::output::{self, workflow as view};

type Tasks = TaskServiceClient<AuthedChannel>;

/// What a node's log stream sends to the printer.
enum Event {
    Chunk(String, LogChunk),
    /// The stream ended (`Some`: with this error).
    End(String, Option<tonic::Status>),
}

pub(crate) async fn logs(a: WorkflowLogsArgs) -> Result<u8> {
    let channel = super::connect(&a.target).await?;
    let mut wf = Client::new(channel.clone());
    let tasks = Tasks::new(channel);
    let w = wf
        .get(GetWorkflowRequest { id: a.id.clone() })
        .await
        .map_err(output::status)?
        .into_inner();
    for n in &a.nodes {
        if !w.nodes.iter().any(|x| &x.name == n) {
            let names: Vec<&str> = w.nodes.iter().map(|x| x.name.as_str()).collect();
            bail!(
                "workflow {} has no node {n:?} (its nodes: {})",
                w.id,
                names.join(", ")
            );
        }
    }
    let wanted: HashSet<String> = a.nodes.iter().cloned().collect();
    let mut printer = Printer::new(&w, &wanted);
    if !a.follow {
        let ready: Vec<&WorkflowNode> = w
            .nodes
            .iter()
            .filter(|n| printer.wants(n) && !n.task_id.is_empty())
            .collect();
        for n in ready {
            let (tx, mut rx) = mpsc::channel(256);
            tokio::spawn(stream(
                tasks.clone(),
                n.name.clone(),
                n.task_id.clone(),
                false,
                tx,
            ));
            while let Some(ev) = rx.recv().await {
                printer.take(ev)?;
            }
        }
        return Ok(printer.exit_code());
    }
    let mut watch = wf
        .watch(WatchWorkflowRequest {
            id: w.id.clone(),
            ..Default::default()
        })
        .await
        .map_err(output::status)?
        .into_inner();
    let (tx, mut rx) = mpsc::channel(256);
    let mut tx = Some(tx);
    let mut started: HashSet<String> = HashSet::new();
    let mut start = |w: &Workflow, tx: &mpsc::Sender<Event>, printer: &Printer| {
        for n in w.nodes.iter().filter(|n| printer.wants(n)) {
            if !n.task_id.is_empty() && started.insert(n.name.clone()) {
                let args = (tasks.clone(), n.name.clone(), n.task_id.clone());
                tokio::spawn(stream(args.0, args.1, args.2, true, tx.clone()));
            }
        }
    };
    if let Some(tx) = tx.as_ref() {
        start(&w, tx, &printer);
    }
    loop {
        tokio::select! {
            ev = watch.message(), if tx.is_some() => {
                match ev.map_err(output::status)? {
                    Some(ev) => {
                        let Some(cur) = ev.workflow else { continue };
                        if let Some(sender) = tx.as_ref() {
                            start(&cur, sender, &printer);
                        }
                        if view::is_final(cur.state()) {
                            // No node starts any more: the streams end with their tasks.
                            tx = None;
                        }
                    }
                    None => tx = None,
                }
            }
            ev = rx.recv() => match ev {
                Some(ev) => printer.take(ev)?,
                None => break,
            },
        }
    }
    Ok(printer.exit_code())
}

/// Streams one node's task log into `tx`, then says it ended.
async fn stream(
    mut tasks: Tasks,
    node: String,
    task_id: String,
    follow: bool,
    tx: mpsc::Sender<Event>,
) {
    let opened = tasks
        .logs(TaskLogsRequest {
            task_id,
            attempt: 0,
            follow,
            from_seq: 0,
        })
        .await;
    let mut s = match opened {
        Ok(r) => r.into_inner(),
        Err(e) => {
            let _ = tx.send(Event::End(node, Some(e))).await;
            return;
        }
    };
    let end = loop {
        match s.message().await {
            Ok(Some(c)) => {
                if tx.send(Event::Chunk(node.clone(), c)).await.is_err() {
                    return;
                }
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let _ = tx.send(Event::End(node, end)).await;
}

/// Cuts chunks into lines and prints each with its node's prefix.
struct Printer {
    width: usize,
    wanted: HashSet<String>,
    /// Unfinished last line per (node, stream).
    partial: HashMap<(String, i32), Vec<u8>>,
    /// Nodes whose stream failed.
    failed: usize,
}

impl Printer {
    fn new(w: &Workflow, wanted: &HashSet<String>) -> Self {
        let width = w
            .nodes
            .iter()
            .filter(|n| wanted.is_empty() || wanted.contains(&n.name))
            .map(|n| n.name.len())
            .max()
            .unwrap_or(0);
        Self {
            width,
            wanted: wanted.clone(),
            partial: HashMap::new(),
            failed: 0,
        }
    }

    fn wants(&self, n: &WorkflowNode) -> bool {
        self.wanted.is_empty() || self.wanted.contains(&n.name)
    }

    fn take(&mut self, ev: Event) -> Result<()> {
        match ev {
            Event::Chunk(node, c) => {
                let key = (node, c.stream);
                let buf = self.partial.entry(key.clone()).or_default();
                buf.extend_from_slice(&c.data);
                let mut lines = Vec::new();
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let rest = buf.split_off(i + 1);
                    lines.push(std::mem::replace(buf, rest));
                }
                for l in lines {
                    self.line(&key.0, key.1, &l)?;
                }
            }
            Event::End(node, err) => {
                let keys: Vec<(String, i32)> = self
                    .partial
                    .keys()
                    .filter(|k| k.0 == node)
                    .cloned()
                    .collect();
                for k in keys {
                    if let Some(mut rest) = self.partial.remove(&k)
                        && !rest.is_empty()
                    {
                        rest.push(b'\n');
                        self.line(&k.0, k.1, &rest)?;
                    }
                }
                if let Some(e) = err {
                    self.failed += 1;
                    esay!("{node}: {}", output::status(e));
                }
            }
        }
        Ok(())
    }

    fn line(&self, node: &str, stream: i32, line: &[u8]) -> Result<()> {
        let mut out = std::io::stdout().lock();
        let prefix = format!(
            "{:<w$} | ",
            crate::printable::printable(node),
            w = self.width
        );
        out.write_all(prefix.as_bytes())?;
        if stream == LogStream::System as i32 {
            let text = String::from_utf8_lossy(line);
            out.write_all(b"[scabbard] ")?;
            out.write_all(crate::printable::printable_text(&text).as_bytes())?;
        } else {
            out.write_all(line)?;
        }
        out.flush()?;
        Ok(())
    }

    /// 0, or 1 when some node's log could not be read.
    fn exit_code(&self) -> u8 {
        u8::from(self.failed > 0)
    }
}
