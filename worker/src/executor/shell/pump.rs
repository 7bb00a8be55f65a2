//! Reading a shell attempt's stdout and stderr: each pipe is copied to the attempt's output
//! as soon as bytes arrive (never waiting for a line), and stops being read once the process
//! group is dead and the pipe has given what was buffered in it. Also the worker's own
//! lines about the attempt ([`system_note`]).

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::LastLine;
use crate::executor::{OutStream, OutputChunk};

/// Largest output chunk.
const CHUNK_SIZE: usize = 64 * 1024;
/// Once the group is dead, a pipe that stays silent this long is held by an escaped
/// process: stop reading it.
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// Once the group is dead, at most this much more output is read from a pipe: what was
/// buffered in it, not what an escaped process keeps writing.
const DRAIN_MAX_BYTES: usize = 4 << 20;

/// Copies one pipe to `out` in chunks of up to [`CHUNK_SIZE`], as soon as bytes arrive,
/// feeding `last_line` (if any) with everything read.
pub(in crate::executor) async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    stream: OutStream,
    out: mpsc::Sender<OutputChunk>,
    group_dead: CancellationToken,
    last_line: Option<Arc<Mutex<LastLine>>>,
) {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut receiver_gone = false;
    let mut after_death = 0;
    loop {
        let read = if group_dead.is_cancelled() {
            if after_death >= DRAIN_MAX_BYTES {
                break;
            }
            match timeout(DRAIN_IDLE, pipe.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                read = pipe.read(&mut buf) => read,
                // `read` is cancel-safe: nothing is lost by dropping it.
                () = group_dead.cancelled() => continue,
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                if group_dead.is_cancelled() {
                    after_death += n;
                }
                if let Some(l) = &last_line {
                    l.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(&buf[..n]);
                }
                // Keep reading after the receiver is gone so the child never blocks on a full pipe.
                if !receiver_gone {
                    let chunk = OutputChunk {
                        stream,
                        data: buf[..n].to_vec(),
                    };
                    receiver_gone = out.send(chunk).await.is_err();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(?stream, error = %e, "cannot read task output");
                break;
            }
        }
    }
}

/// Sends a line of our own to the output; a stuck receiver must not delay the kill.
pub(in crate::executor) async fn system_note(
    out: &mpsc::Sender<OutputChunk>,
    text: String,
    until: Instant,
) {
    let chunk = OutputChunk {
        stream: OutStream::System,
        data: format!("{text}\n").into_bytes(),
    };
    let _ = timeout_at(until, out.send(chunk)).await;
}
