//! `--kind logs`: one log of `--log-mib` MiB (1 GiB by default) through the controller. An
//! agent driven by hand takes a task and streams its log in 64 KiB chunks over its session
//! (the controller appends them to its log store and acks them) while an API client follows
//! the log (`TaskService.Logs`, `follow`). Reported, in MB/s (10^6 bytes per second):
//!
//! * ingest + follow: first chunk sent → the follower has the last byte (the log ends when
//!   the result is recorded);
//! * archive: the result reported → `Ack.archived` (sealed, copied to the blob store — the
//!   local-disk backend here — and recorded);
//! * finished read: `Logs` of the finished, archived attempt (from the leader's sealed
//!   copy; a controller without one streams it from the blob store).
//!
//! The worker's own spooling is not in these figures: the agent sends from memory.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::client::{self, TaskServiceClient};
use scabbard_common::proto::{
    AgentLogChunk, AgentMessage, Finished, LogStream, Outcome, ShellTask, SubmitTaskRequest,
    TaskLogsRequest, TaskResult, TaskSpec, agent_message, controller_message, task_spec::Kind,
};
use tokio_stream::StreamExt;

use crate::artifacts::HandAgent;

const CHUNK: usize = 64 << 10;

/// Runs the log benchmark against a controller at `addr`.
pub(crate) async fn run(
    addr: &str,
    registration_token: &str,
    admin_token: &str,
    mib: usize,
) -> Result<()> {
    let total = (mib as u64) << 20;
    let chunks = total.div_ceil(CHUNK as u64);
    let mut agent = HandAgent::connect(addr, registration_token).await?;
    let admin = client::authed(client::connect(addr).await?, Some(admin_token))?;
    let mut tasks = TaskServiceClient::new(admin.clone()).max_decoding_message_size(64 << 20);
    println!(
        "scabbard-bench: kind=logs size={mib} MiB in {chunks} chunks of {} KiB, one follower, archive on the local blob store",
        CHUNK >> 10
    );
    let id = tasks
        .submit(SubmitTaskRequest {
            spec: Some(TaskSpec {
                kind: Some(Kind::Shell(ShellTask {
                    command: vec!["true".into()],
                })),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .task
        .context("no task")?
        .id;
    let assign = agent.accept_next().await?;
    if assign.task_id != id {
        bail!("assigned {} instead of {id}", assign.task_id);
    }
    let token = assign.fencing_token;
    let (tx, mut inbound) = agent.split();

    // The follower, from before the first chunk.
    let mut follower = tasks.clone();
    let fid = id.clone();
    let follow = tokio::spawn(async move {
        let mut s = follower
            .logs(TaskLogsRequest {
                task_id: fid,
                attempt: 0,
                follow: true,
                from_seq: 0,
            })
            .await?
            .into_inner();
        let mut bytes = 0u64;
        let mut next = 0u64;
        while let Some(c) = s.next().await {
            let c = c?;
            if c.seq != next {
                bail!("follower: chunk {} where {next} was due", c.seq);
            }
            next += 1;
            bytes += c.data.len() as u64;
        }
        anyhow::Ok((bytes, Instant::now()))
    });

    // Acks: all chunks stored, then the archive.
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = inbound.next().await {
            if let Some(controller_message::Msg::Ack(a)) = m.msg
                && acks_tx.send((a, Instant::now())).is_err()
            {
                return;
            }
        }
    });

    let data = vec![b'x'; CHUNK - 1]
        .into_iter()
        .chain([b'\n'])
        .collect::<Vec<u8>>();
    let t0 = Instant::now();
    for seq in 0..chunks {
        let len = (total - seq * CHUNK as u64).min(CHUNK as u64) as usize;
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Log(AgentLogChunk {
                task_id: id.clone(),
                fencing_token: token,
                seq,
                stream: LogStream::Stdout as i32,
                data: data[..len].to_vec(),
                at_ms: 0,
            })),
        })
        .await
        .context("session closed")?;
    }
    let stored = loop {
        let (a, at) = tokio::time::timeout(Duration::from_secs(600), acks.recv())
            .await
            .context("no ack within 600 s")?
            .context("session ended")?;
        if a.next_seq >= chunks && !a.result {
            break at;
        }
    };
    let reported = Instant::now();
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Finished(Finished {
            task_id: id.clone(),
            fencing_token: token,
            result: Some(TaskResult {
                outcome: Outcome::Succeeded as i32,
                ..Default::default()
            }),
            log_chunks: chunks,
        })),
    })
    .await?;
    let (followed, follow_end) = follow.await??;
    if followed != total {
        bail!("the follower got {followed} of {total} bytes");
    }
    let archived = loop {
        let (a, at) = tokio::time::timeout(Duration::from_secs(600), acks.recv())
            .await
            .context("no archive ack within 600 s")?
            .context("session ended")?;
        if a.archived {
            break at;
        }
    };
    let t1 = Instant::now();
    let mut s = tasks
        .logs(TaskLogsRequest {
            task_id: id.clone(),
            attempt: 1,
            follow: false,
            from_seq: 0,
        })
        .await?
        .into_inner();
    let mut read = 0u64;
    while let Some(c) = s.next().await {
        read += c?.data.len() as u64;
    }
    let read_time = t1.elapsed();
    if read != total {
        bail!("the archived read got {read} of {total} bytes");
    }
    let t = tasks
        .get(scabbard_common::proto::GetTaskRequest { id: id.clone() })
        .await?
        .into_inner();
    let a = t.attempts.last().context("no attempt")?;
    if a.log_bytes != total || a.log_archive.is_empty() {
        bail!(
            "attempt record: log_bytes {} archive {:?}",
            a.log_bytes,
            a.log_archive
        );
    }
    let mbs = |d: Duration| total as f64 / 1e6 / d.as_secs_f64();
    println!(
        "logs: ingest {:.0} MB/s ({:.2}s to the last ack); ingest + follow {:.0} MB/s ({:.2}s to the follower's last byte)",
        mbs(stored - t0),
        (stored - t0).as_secs_f64(),
        mbs(follow_end - t0),
        (follow_end - t0).as_secs_f64()
    );
    println!(
        "logs: archive {:.0} MB/s ({:.2}s from the result to Ack.archived); finished read {:.0} MB/s ({:.2}s)",
        mbs(archived - reported),
        (archived - reported).as_secs_f64(),
        mbs(read_time),
        read_time.as_secs_f64()
    );
    drop(tx);
    Ok(())
}
