//! The client's patience: a bounded retry of one call when the controller asks the caller
//! to come back (RESOURCE_EXHAUSTED with `retry-after-ms` metadata: a rate or concurrency
//! limit) or is briefly unavailable, for calls that are safe to repeat (reads, and
//! submits carrying an idempotency key); and [`reconnect`], which finds the leader again
//! after a stream broke (a leader change), for `--follow`/`--watch`.

use std::future::Future;
use std::time::Duration;

use scabbard_common::client::AuthedChannel;
use tonic::{Code, Status};

use crate::args::Target;

/// Tries of one call, the first included.
pub(crate) const TRIES: u32 = 5;

/// Longest single wait, whatever `retry-after-ms` says.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(10);

/// How long `--follow`/`--watch` keep looking for a (new) leader after a stream broke.
pub(crate) const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Most times one follow reconnects (a stream that keeps breaking is not a leader change).
pub(crate) const MAX_RECONNECTS: u32 = 20;

/// Whether a call refused with `s` may succeed if sent again later.
pub(crate) fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::ResourceExhausted => scabbard_common::error::retry_after(s).is_some(),
        Code::Unavailable => true,
        _ => false,
    }
}

/// How long to wait before try `attempt + 2`: what the controller asked for, else an
/// exponential backoff from 200 ms; at most [`MAX_WAIT`].
pub(crate) fn delay(s: &Status, attempt: u32) -> Duration {
    scabbard_common::error::retry_after(s)
        .unwrap_or_else(|| Duration::from_millis(200u64 << attempt.min(6)))
        .min(MAX_WAIT)
}

/// Runs `call` until it succeeds, fails for good, or [`TRIES`] tries were made; says on
/// stderr when it waits.
pub(crate) async fn idempotent<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(s) if attempt + 1 < TRIES && retryable(&s) => {
                let wait = delay(&s, attempt);
                esay!(
                    "note: {} ({}); trying again in {} ms ({}/{})",
                    crate::printable::printable(s.message()),
                    crate::output::code_name(s.code()),
                    wait.as_millis(),
                    attempt + 2,
                    TRIES
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(s) => return Err(s),
        }
    }
}

/// Whether a stream that failed with `s` (or ended early) is worth following again on a
/// new connection: the connection broke or the controller stepped down (UNAVAILABLE,
/// or an HTTP/2 error surfacing as UNKNOWN/INTERNAL/CANCELLED), not a refusal.
pub(crate) fn broken_stream(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted
    ) && !scabbard_common::client::is_timeout(s)
}

/// The target the command connected to first ([`crate::cmd::connect`] records it).
static TARGET: std::sync::OnceLock<Target> = std::sync::OnceLock::new();

/// Records the command's target, for [`reconnect`].
pub(crate) fn remember(target: &Target) {
    let _ = TARGET.set(target.clone());
}

/// Connects to the leader among the command's controllers again, trying for
/// [`RECONNECT_FOR`] (a new leader is elected within the leader lease).
pub(crate) async fn reconnect(why: &Status) -> anyhow::Result<AuthedChannel> {
    static TIMES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let Some(target) = TARGET.get() else {
        return Err(crate::output::status(why.clone()));
    };
    if TIMES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= MAX_RECONNECTS {
        return Err(crate::output::status(why.clone()).context(format!(
            "the stream broke {MAX_RECONNECTS} times; giving up"
        )));
    }
    esay!(
        "note: lost the stream ({}: {}); reconnecting to the leader",
        crate::output::code_name(why.code()),
        crate::printable::printable(why.message())
    );
    let until = tokio::time::Instant::now() + RECONNECT_FOR;
    let mut attempt = 0u32;
    loop {
        match crate::cmd::connect(target).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() < until => {
                tracing::debug!("reconnecting: {e:#}");
                tokio::time::sleep(Duration::from_millis(250u64 << attempt.min(3))).await;
                attempt += 1;
            }
            Err(e) => return Err(e.context("reconnecting after the stream broke")),
        }
    }
}
