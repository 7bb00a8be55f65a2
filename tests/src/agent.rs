//! A hand-driven agent for protocol tests: registers with the registration token, opens a
//! session (heartbeating in the background so the controller keeps it), takes assignments
//! and reports results when the test says so. Its agent token calls other services (the
//! artifact service) as a real worker would. Plus helpers to upload bytes with it.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use scabbard_common::client::{self, AgentServiceClient, ArtifactServiceClient};
use scabbard_common::proto::{
    Accepted, Ack, AgentMessage, ArtifactKind, ArtifactRef, ArtifactUploadHeader, Assign,
    ControllerMessage, Finished, Heartbeat, Hello, RegisterRequest, TaskResult,
    UploadArtifactRequest, Welcome, agent_message, controller_message, upload_artifact_request,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::TOKEN;

/// An agent whose session the test drives.
pub struct FakeAgent {
    /// Its id.
    pub agent_id: String,
    /// Its agent token.
    pub token: String,
    /// The session's `Welcome`.
    pub welcome: Welcome,
    channel: Channel,
    tx: mpsc::Sender<AgentMessage>,
    inbound: mpsc::Receiver<ControllerMessage>,
    _heartbeat: tokio::task::JoinHandle<()>,
    _reader: tokio::task::JoinHandle<()>,
}

impl FakeAgent {
    /// Registers as `name` (label `name=<name>`, capability `shell`, one slot) with the
    /// controller at `addr` and opens a session.
    pub async fn connect(addr: &str, name: &str) -> Result<Self> {
        let channel = client::connect(addr).await?;
        let reg = AgentServiceClient::new(channel.clone())
            .register(RegisterRequest {
                registration_token: TOKEN.into(),
                name: name.into(),
                labels: HashMap::from([("name".to_string(), name.to_string())]),
                capabilities: vec!["shell".into()],
                slots: 1,
                version: "fake".into(),
                agent_id: String::new(),
                current_agent_token: String::new(),
            })
            .await?
            .into_inner();
        let (tx, rx) = mpsc::channel(64);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                agent_id: reg.agent_id.clone(),
                capabilities: vec!["shell".into()],
                labels: HashMap::from([("name".to_string(), name.to_string())]),
                slots: 1,
                ..Default::default()
            })),
        })
        .await?;
        let req = client::with_token(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            Some(&reg.agent_token),
        )?;
        let mut stream = AgentServiceClient::new(channel.clone())
            .session(req)
            .await?
            .into_inner();
        let welcome = match stream.next().await.context("no Welcome")??.msg {
            Some(controller_message::Msg::Welcome(w)) => w,
            other => bail!("expected Welcome, got {other:?}"),
        };
        let every = Duration::from_millis(welcome.heartbeat_interval_ms.max(50));
        let beats = tx.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let beat = AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                        free_slots: 1,
                        ..Default::default()
                    })),
                };
                if beats.send(beat).await.is_err() {
                    return;
                }
            }
        });
        let (in_tx, inbound) = mpsc::channel(64);
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if in_tx.send(m).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            agent_id: reg.agent_id,
            token: reg.agent_token,
            welcome,
            channel,
            tx,
            inbound,
            _heartbeat: heartbeat,
            _reader: reader,
        })
    }

    /// The next message of type `pick`, skipping others, within `timeout`.
    async fn next<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(controller_message::Msg) -> Option<T>,
    ) -> Result<T> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(end, self.inbound.recv())
                .await
                .map_err(|_| anyhow!("no {what} within {timeout:?}"))?
                .ok_or_else(|| anyhow!("the session ended while waiting for {what}"))?;
            if let Some(t) = m.msg.and_then(&mut pick) {
                return Ok(t);
            }
        }
    }

    /// Waits for an assignment and accepts it (the task becomes RUNNING).
    pub async fn accept_next(&mut self, timeout: Duration) -> Result<Assign> {
        let a = self
            .next("an Assign", timeout, |m| match m {
                controller_message::Msg::Assign(a) => Some(a),
                _ => None,
            })
            .await?;
        self.send(agent_message::Msg::Accepted(Accepted {
            task_id: a.task_id.clone(),
            fencing_token: a.fencing_token,
        }))
        .await?;
        Ok(a)
    }

    /// Reports the end of attempt (`task_id`, `token`) with `result`; returns the ack.
    pub async fn finish(&mut self, task_id: &str, token: u64, result: TaskResult) -> Result<Ack> {
        self.send(agent_message::Msg::Finished(Finished {
            task_id: task_id.into(),
            fencing_token: token,
            result: Some(result),
            log_chunks: 0,
        }))
        .await?;
        let id = task_id.to_string();
        self.next("an Ack", Duration::from_secs(20), move |m| match m {
            controller_message::Msg::Ack(a) if a.task_id == id && a.fencing_token == token => {
                Some(a)
            }
            _ => None,
        })
        .await
    }

    /// Waits for an assignment and does not answer it (an agent that never accepts).
    pub async fn next_assign(&mut self, timeout: Duration) -> Result<Assign> {
        self.next("an Assign", timeout, |m| match m {
            controller_message::Msg::Assign(a) => Some(a),
            _ => None,
        })
        .await
    }

    /// Sends `msg` on the session as it is (tests of misbehaving agents).
    pub async fn send_raw(&self, msg: agent_message::Msg) -> Result<()> {
        self.send(msg).await
    }

    async fn send(&self, msg: agent_message::Msg) -> Result<()> {
        self.tx
            .send(AgentMessage { msg: Some(msg) })
            .await
            .map_err(|_| anyhow!("the session is closed"))
    }

    /// An artifact client carrying this agent's token.
    pub fn artifacts(&self) -> ArtifactServiceClient<client::AuthedChannel> {
        ArtifactServiceClient::new(crate::with_token(self.channel.clone(), &self.token))
            .max_decoding_message_size(64 << 20)
    }
}

/// SHA-256 (hex) of `data`.
pub fn sha(data: &[u8]) -> String {
    let mut h = scabbard_common::artifact::Sha256::default();
    h.update(data);
    h.finish()
}

/// Deterministic bytes that do not repeat with the chunk size.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 31 + i / 7919) as u8).wrapping_add(seed))
        .collect()
}

/// The upload header of `data` as a directory artifact `name` of attempt (`task`, `token`).
pub fn header(task: &str, token: u64, name: &str, data: &[u8]) -> ArtifactUploadHeader {
    ArtifactUploadHeader {
        task_id: task.into(),
        fencing_token: token,
        name: name.into(),
        kind: ArtifactKind::Directory as i32,
        size: data.len() as u64,
        sha256: sha(data),
    }
}

/// The messages of an upload: `h`, then `data` in 1 MiB chunks.
pub fn messages(h: ArtifactUploadHeader, data: &[u8]) -> Vec<UploadArtifactRequest> {
    let mut out = vec![UploadArtifactRequest {
        part: Some(upload_artifact_request::Part::Header(h)),
    }];
    out.extend(data.chunks(1 << 20).map(|c| UploadArtifactRequest {
        part: Some(upload_artifact_request::Part::Data(c.to_vec())),
    }));
    out
}

/// Uploads `data` with header `h`.
pub async fn upload(
    c: &mut ArtifactServiceClient<client::AuthedChannel>,
    h: ArtifactUploadHeader,
    data: &[u8],
) -> std::result::Result<ArtifactRef, tonic::Status> {
    c.upload(futures::stream::iter(messages(h, data)))
        .await
        .map(|r| r.into_inner())
}
