//! Bounds on long-lived API streams (`TaskService/Watch`, `WorkflowService/Watch`,
//! `TaskService/Logs`):
//!
//! * **per-token stream cap** (`max_streams_per_token`): a token with that many streams
//!   open gets `RESOURCE_EXHAUSTED` for the next one; the slot is given back when the
//!   stream ends or the client drops it;
//! * **per-stream buffered bytes** (`max_stream_buffer_bytes`): a watch's events wait in
//!   an [`Outbox`] that counts their encoded size. A client that does not read lets the
//!   HTTP/2 window fill, the connection stops polling, and events pile up here: past the
//!   limit the buffered events are dropped and the stream ends with `RESOURCE_EXHAUSTED`
//!   ("consumer too slow; resubscribe"), so an unread watch costs at most that many bytes.
//!   One event is always accepted into an empty buffer, whatever its size.
//!
//! Logs streams keep their own bound: the follower waits for the client (a bounded
//! channel of chunks), so a slow log reader is slowed down, never buffered for.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use futures::task::AtomicWaker;
use scabbard_common::Error;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::config::ControllerConfig;

/// What a stream over its buffer limit ends with.
pub(crate) const TOO_SLOW: &str = "consumer too slow; resubscribe";

/// The stream limits of one controller, shared by every streaming service.
pub struct StreamLimits {
    max_buffer_bytes: usize,
    max_per_token: u32,
    open: Mutex<HashMap<String, u32>>,
    /// Bytes buffered in every outbox now (for metrics and tests).
    buffered: AtomicUsize,
}

impl StreamLimits {
    /// The limits `cfg` asks for.
    pub fn from_config(cfg: &ControllerConfig) -> Arc<Self> {
        Arc::new(Self {
            max_buffer_bytes: cfg.max_stream_buffer_bytes,
            max_per_token: cfg.max_streams_per_token,
            open: Mutex::new(HashMap::new()),
            buffered: AtomicUsize::new(0),
        })
    }

    /// Bytes waiting in every watch's buffer now.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    /// Takes one of `token_id`'s stream slots, or says why not.
    pub(crate) fn open(self: &Arc<Self>, token_id: &str) -> Result<StreamSlot, Error> {
        let mut open = self.open.lock().expect("stream slots lock");
        let n = open.entry(token_id.to_string()).or_default();
        if self.max_per_token > 0 && *n >= self.max_per_token {
            let max = self.max_per_token;
            if *n == 0 {
                open.remove(token_id);
            }
            return Err(Error::ResourceExhausted(format!(
                "token {token_id} already has {max} streams open (Watch and Logs), the most allowed (config key max_streams_per_token): close one first"
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            limits: self.clone(),
            token_id: token_id.to_string(),
        })
    }

    /// A byte-bounded buffer for one stream holding `slot`.
    pub(crate) fn outbox<T: prost::Message>(
        self: &Arc<Self>,
        slot: StreamSlot,
    ) -> (Outbox<T>, OutboxStream<T>) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                ended: false,
            }),
            waker: AtomicWaker::new(),
            gone: CancellationToken::new(),
            limits: self.clone(),
        });
        (
            Outbox {
                shared: shared.clone(),
            },
            OutboxStream {
                shared,
                _slot: slot,
            },
        )
    }
}

/// One open stream of a token; given back on drop.
pub(crate) struct StreamSlot {
    limits: Arc<StreamLimits>,
    token_id: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().expect("stream slots lock");
        if let Some(n) = open.get_mut(&self.token_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.token_id);
            }
        }
    }
}

struct Queue<T> {
    items: VecDeque<(Result<T, Status>, usize)>,
    bytes: usize,
    /// No more items will come (the producer finished, or the stream was ended).
    ended: bool,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    waker: AtomicWaker,
    /// Cancelled when the client dropped the stream.
    gone: CancellationToken,
    limits: Arc<StreamLimits>,
}

impl<T> Shared<T> {
    /// Drops what is buffered, queues `status` as the last item and ends the stream.
    fn end_with(&self, q: &mut Queue<T>, status: Status) {
        self.limits.buffered.fetch_sub(q.bytes, Ordering::Relaxed);
        q.items.clear();
        q.bytes = 0;
        q.items.push_back((Err(status), 0));
        q.ended = true;
    }
}

/// The producing end of a byte-bounded stream buffer (see the module docs). Dropping it
/// ends the stream once the client has read what is buffered.
pub(crate) struct Outbox<T> {
    shared: Arc<Shared<T>>,
}

impl<T: prost::Message> Outbox<T> {
    /// Queues `item`. False when the stream is over (the client went away, or it fell
    /// more than the byte limit behind and was ended): the producer should stop.
    pub(crate) fn push(&self, item: T) -> bool {
        let n = item.encoded_len();
        let mut q = self.shared.queue.lock().expect("outbox lock");
        if q.ended || self.shared.gone.is_cancelled() {
            return false;
        }
        if !q.items.is_empty() && q.bytes + n > self.shared.limits.max_buffer_bytes {
            let limit = self.shared.limits.max_buffer_bytes;
            tracing::info!(
                buffered = q.bytes,
                limit,
                "a stream's client does not keep up: ending it"
            );
            self.shared.end_with(
                &mut q,
                Status::resource_exhausted(format!(
                    "{TOO_SLOW} (more than {limit} bytes of events waited for this client; config key max_stream_buffer_bytes)"
                )),
            );
            drop(q);
            self.shared.waker.wake();
            return false;
        }
        q.items.push_back((Ok(item), n));
        q.bytes += n;
        self.shared.limits.buffered.fetch_add(n, Ordering::Relaxed);
        drop(q);
        self.shared.waker.wake();
        true
    }
}

impl<T> Outbox<T> {
    /// Ends the stream with `status` (after what is buffered) and drops nothing.
    pub(crate) fn finish(&self, status: Status) {
        let mut q = self.shared.queue.lock().expect("outbox lock");
        if !q.ended {
            q.items.push_back((Err(status), 0));
            q.ended = true;
        }
        drop(q);
        self.shared.waker.wake();
    }

    /// A handle that can end the stream from elsewhere (e.g. when its token is revoked).
    pub(crate) fn ender(&self) -> Ender<T> {
        Ender {
            shared: self.shared.clone(),
        }
    }

    /// Resolves when the client dropped the stream.
    pub(crate) async fn closed(&self) {
        self.shared.gone.cancelled().await
    }
}

impl<T> Drop for Outbox<T> {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("outbox lock").ended = true;
        self.shared.waker.wake();
    }
}

/// Ends a stream from outside its producer.
pub(crate) struct Ender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Ender<T> {
    /// Drops what is buffered and ends the stream with `status` now.
    pub(crate) fn end(&self, status: Status) {
        let mut q = self.shared.queue.lock().expect("outbox lock");
        if !q.ended {
            self.shared.end_with(&mut q, status);
        }
        drop(q);
        self.shared.waker.wake();
    }

    /// Resolves when the client dropped the stream.
    pub(crate) async fn closed(&self) {
        self.shared.gone.cancelled().await
    }
}

/// The client's end of an [`Outbox`]: the response body.
pub(crate) struct OutboxStream<T> {
    shared: Arc<Shared<T>>,
    _slot: StreamSlot,
}

impl<T> Stream for OutboxStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let shared = &self.shared;
        let mut q = shared.queue.lock().expect("outbox lock");
        if let Some((item, n)) = q.items.pop_front() {
            q.bytes -= n;
            shared.limits.buffered.fetch_sub(n, Ordering::Relaxed);
            return Poll::Ready(Some(item));
        }
        if q.ended {
            return Poll::Ready(None);
        }
        shared.waker.register(cx.waker());
        Poll::Pending
    }
}

impl<T> Drop for OutboxStream<T> {
    fn drop(&mut self) {
        self.shared.gone.cancel();
        let mut q = self.shared.queue.lock().expect("outbox lock");
        self.shared
            .limits
            .buffered
            .fetch_sub(q.bytes, Ordering::Relaxed);
        q.items.clear();
        q.bytes = 0;
        q.ended = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use scabbard_common::proto::LogChunk;

    fn limits(bytes: usize, per_token: u32) -> Arc<StreamLimits> {
        StreamLimits::from_config(&ControllerConfig {
            max_stream_buffer_bytes: bytes,
            max_streams_per_token: per_token,
            ..Default::default()
        })
    }

    fn chunk(n: usize) -> LogChunk {
        LogChunk {
            data: vec![b'x'; n],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_unread_stream_is_ended_at_its_byte_limit_and_frees_what_it_held() {
        let l = limits(100_000, 0);
        let (out, mut stream) = l.outbox::<LogChunk>(l.open("t").unwrap());
        let mut pushed = 0;
        while out.push(chunk(10_000)) {
            pushed += 1;
            assert!(pushed < 100, "never ended");
        }
        assert!(pushed <= 10, "{pushed}");
        // Ended: what it buffered is gone; the client reads the reason.
        assert_eq!(l.buffered_bytes(), 0);
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains(TOO_SLOW), "{}", err.message());
        assert!(stream.next().await.is_none());
        assert!(!out.push(chunk(1)));
    }

    #[tokio::test]
    async fn a_reading_client_gets_everything_and_one_big_event_always_fits() {
        let l = limits(100_000, 0);
        let (out, mut stream) = l.outbox::<LogChunk>(l.open("t").unwrap());
        assert!(out.push(chunk(500_000)), "one event fits an empty buffer");
        assert_eq!(stream.next().await.unwrap().unwrap().data.len(), 500_000);
        for _ in 0..1000 {
            assert!(out.push(chunk(1_000)));
            assert!(stream.next().await.unwrap().is_ok());
        }
        out.finish(Status::aborted("bye"));
        assert_eq!(
            stream.next().await.unwrap().unwrap_err().code(),
            tonic::Code::Aborted
        );
        drop(out);
        assert!(stream.next().await.is_none());
        assert_eq!(l.buffered_bytes(), 0);
    }

    #[tokio::test]
    async fn streams_per_token_are_capped_and_given_back() {
        let l = limits(100_000, 2);
        let a = l.open("t").unwrap();
        let (out, stream) = l.outbox::<LogChunk>(l.open("t").unwrap());
        let err = l.open("t").err().unwrap();
        assert!(err.to_string().contains("max_streams_per_token"), "{err}");
        assert!(l.open("other").is_ok(), "other tokens are not affected");
        drop(a);
        let b = l.open("t").unwrap();
        drop(stream);
        out.closed().await; // the client went away: the producer learns it
        assert!(!out.push(chunk(1)));
        let _c = l.open("t").unwrap();
        drop(b);
    }
}
