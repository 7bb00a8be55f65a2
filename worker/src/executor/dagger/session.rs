//! One `dagger session` process: started by us (never by the SDK), in its own process
//! group tied to the worker's life, with a bound on its start-up (the SDK has none). It
//! prints `{"port":…,"session_token":…}` on stdout once it is ready; the SDK is then pointed
//! at `127.0.0.1:port` with that token for this session only (see [`super::gql`]). Its
//! stderr (the engine's plain progress) is streamed line by line as system chunks while it
//! runs. [`EngineSession::shutdown`] closes its stdin (a session ends on EOF), sends
//! SIGTERM to the group, SIGKILL after the grace period, and returns once the group is
//! gone; dropping an [`EngineSession`] SIGKILLs the group.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::executor::shell::group::{
    GroupGuard, own_process_group, signal_group, spawn_when_not_busy, wait_group_gone,
};
use crate::executor::{OutStream, OutputChunk};

/// Lines of the session's stderr kept to explain a failed start.
const TAIL_LINES: usize = 20;
/// Longest line read from the session's output; longer ones are cut.
const MAX_LINE: usize = 64 * 1024;
/// How long to wait for the kernel to remove a SIGKILLed group.
const REAP_WAIT: Duration = Duration::from_secs(5);
/// How long the readers may take to empty the pipes once the group is gone.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// What the session prints once it accepts queries.
#[derive(Debug, Deserialize)]
struct Ready {
    port: u16,
    session_token: String,
}

/// How to start a session.
pub(super) struct SessionSpec<'a> {
    /// The CLI.
    pub(super) cli: &'a Path,
    /// Its whole environment.
    pub(super) env: Vec<(String, OsString)>,
    /// Its working directory.
    pub(super) cwd: &'a Path,
    /// Bound on the wait for its port and token.
    pub(super) start_timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub(super) kill_grace: Duration,
}

/// A running `dagger session`.
pub(super) struct EngineSession {
    /// Port on 127.0.0.1 the session serves GraphQL on.
    pub(super) port: u16,
    /// Its token (Basic auth user name).
    pub(super) token: String,
    /// Its pid, which is also its process group id.
    pub(super) pgid: libc::pid_t,
    child: Child,
    stdin: Option<ChildStdin>,
    group: GroupGuard,
    readers: Vec<JoinHandle<()>>,
    kill_grace: Duration,
}

impl EngineSession {
    /// Starts a session and waits (up to `start_timeout`) for its port and token. Its
    /// stderr goes to `progress` as system chunks (if given). The error is for a human:
    /// the CLI's last words are in it. Firing `stop` abandons the start (the session is
    /// shut down first).
    pub(super) async fn start(
        spec: SessionSpec<'_>,
        progress: Option<mpsc::Sender<OutputChunk>>,
        stop: CancellationToken,
    ) -> Result<Self, String> {
        let mut cmd = Command::new(spec.cli);
        // Plain progress: the engine's own account of each call, with the output of every
        // running exec as it is written (a pipe would select it too; explicit is sure).
        cmd.arg("session")
            .args(["--progress", "plain"])
            .args(["--label", "dagger.io/sdk.name:rust"])
            .args(["--label", "scabbard.dev/worker:true"])
            .current_dir(spec.cwd)
            .env_clear()
            .envs(spec.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        own_process_group(cmd.as_std_mut());
        let mut child = spawn_when_not_busy(&mut cmd)
            .await
            .map_err(|e| format!("cannot start {} session: {e}", spec.cli.display()))?;
        let Some(pgid) = child.id().and_then(|id| libc::pid_t::try_from(id).ok()) else {
            return Err("the dagger session process has no pid".into());
        };
        let group = GroupGuard(Some(pgid));
        let stdin = child.stdin.take();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (ready_tx, mut ready_rx) = mpsc::channel(1);
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(read_stdout(stdout, ready_tx)));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(tokio::spawn(read_stderr(stderr, progress, tail.clone())));
        }
        let mut session = Self {
            port: 0,
            token: String::new(),
            pgid,
            child,
            stdin,
            group,
            readers,
            kill_grace: spec.kill_grace,
        };
        let deadline = Instant::now() + spec.start_timeout;
        enum Start {
            Ready(Option<Ready>),
            Exited(std::io::Result<std::process::ExitStatus>),
            TimedOut,
            Stopped,
        }
        let start = tokio::select! {
            ready = ready_rx.recv() => Start::Ready(ready),
            // The CLI may exit while something it started still holds its stdout open.
            status = session.child.wait() => Start::Exited(status),
            () = tokio::time::sleep_until(deadline) => Start::TimedOut,
            () = stop.cancelled() => Start::Stopped,
        };
        let failure = match start {
            Start::Ready(Some(ready)) => {
                session.port = ready.port;
                session.token = ready.session_token;
                return Ok(session);
            }
            Start::Ready(None) => {
                // Stdout closed without the handshake: the CLI is exiting.
                let status = timeout(Duration::from_secs(2), session.child.wait()).await;
                match status {
                    Ok(Ok(status)) => {
                        format!("dagger session exited before it was ready ({status})")
                    }
                    _ => "dagger session closed its output before it was ready".to_string(),
                }
            }
            Start::Exited(Ok(status)) => {
                format!("dagger session exited before it was ready ({status})")
            }
            Start::Exited(Err(e)) => format!("cannot wait for the dagger session: {e}"),
            Start::TimedOut => format!(
                "dagger session did not report its port within {}s (dagger.session_start_timeout_ms): the engine does not answer",
                spec.start_timeout.as_secs_f64()
            ),
            Start::Stopped => {
                session.shutdown().await;
                return Err("stopped while the dagger session was starting".into());
            }
        };
        session.shutdown().await;
        let tail: Vec<String> = tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        Err(if tail.is_empty() {
            failure
        } else {
            format!("{failure}; its last output: {}", tail.join(" | "))
        })
    }

    /// Ends the session: EOF on stdin and SIGTERM to the group, SIGKILL after the grace
    /// period; returns once the group is gone and its output read.
    pub(super) async fn shutdown(mut self) {
        self.stdin.take();
        let pgid = self.pgid;
        signal_group(pgid, libc::SIGTERM);
        let deadline = Instant::now() + self.kill_grace;
        let exited = timeout_at(deadline, self.child.wait()).await.is_ok();
        if !exited || !wait_group_gone(pgid, deadline).await {
            signal_group(pgid, libc::SIGKILL);
        }
        // Whatever the session started in its group goes with it.
        signal_group(pgid, libc::SIGKILL);
        let _ = self.child.wait().await;
        if !wait_group_gone(pgid, Instant::now() + REAP_WAIT).await {
            tracing::warn!(
                pgid,
                "dagger session process group still alive after SIGKILL"
            );
        }
        self.group.0 = None;
        for mut reader in std::mem::take(&mut self.readers) {
            if timeout(DRAIN_WAIT, &mut reader).await.is_err() {
                reader.abort();
            }
        }
    }
}

impl Drop for EngineSession {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

/// Reads stdout until the handshake line, then keeps draining it (so the session never
/// blocks on a full pipe).
async fn read_stdout(stdout: impl AsyncRead + Unpin, ready: mpsc::Sender<Ready>) {
    let mut lines = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut ready = Some(ready);
    loop {
        line.clear();
        match read_line(&mut lines, &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if let Some(tx) = &ready
            && let Ok(r) = serde_json::from_slice::<Ready>(trim(&line))
        {
            let _ = tx.send(r).await;
            ready = None;
        }
    }
}

/// Streams stderr line by line as system chunks, keeping the last lines in `tail`.
async fn read_stderr(
    stderr: impl AsyncRead + Unpin,
    progress: Option<mpsc::Sender<OutputChunk>>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stderr);
    let mut line = Vec::new();
    let mut progress = progress;
    loop {
        line.clear();
        match read_line(&mut lines, &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        {
            let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(String::from_utf8_lossy(trim(&line)).into_owned());
        }
        if let Some(tx) = &progress {
            let mut data = line.clone();
            if data.last() != Some(&b'\n') {
                data.push(b'\n');
            }
            let chunk = OutputChunk {
                stream: OutStream::System,
                data,
            };
            // Keep reading after the receiver is gone so the session never blocks.
            if tx.send(chunk).await.is_err() {
                progress = None;
            }
        }
    }
}

/// One line (with its `\n`), at most [`MAX_LINE`] bytes kept; the rest of a longer line is
/// read and dropped. Returns the bytes consumed (0 at EOF).
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&buf[..take.min(room)]);
        reader.consume(take);
        total += take;
        if done {
            return Ok(total);
        }
    }
}

fn trim(line: &[u8]) -> &[u8] {
    line.trim_ascii()
}

/// Whether a process still runs (a zombie counts as gone). For tests and diagnostics.
#[cfg(test)]
pub(super) fn process_gone(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, 0) };
    if rc == -1 {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
