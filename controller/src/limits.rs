//! Load limits as a tower layer, placed inside the auth layer (so it sees the
//! [`Principal`]):
//!
//! * a **per-principal rate limit**: a token bucket per token id, with the rate and burst
//!   the catalog resolved into the principal (its project's quota, else the controller's
//!   `rate_limit_per_second` / `rate_limit_burst`; 0 = unlimited). Calls without a
//!   principal (health, reflection, `Register`) are not rate-limited;
//! * a **global concurrency limit** (`max_concurrent_requests`, 0 = unlimited): calls over
//!   it are rejected at once, never queued;
//! * a **per-RPC deadline** (`rpc_timeout_ms`, 0 = none) on the handler: a call whose
//!   handler has not answered in time gets `DEADLINE_EXCEEDED`. Not on artifact uploads,
//!   whose handler reads the client's whole stream (they have an idle timeout instead).
//!
//! Rejections are `RESOURCE_EXHAUSTED` with the retry hint `retry-after-ms` in the
//! metadata ([`scabbard_common::error::retry_after`] reads it back).
//!
//! Streams: the concurrency permit and the deadline cover the handler future only, i.e.
//! until the response headers. A streaming handler returns its response (a stream) at once
//! and the body is then polled by the HTTP/2 connection, outside this layer — so
//! `AgentService/Session`, `TaskService/Watch` and `Logs` hold no permit and are not cut by
//! the deadline for their whole life.
//!
//! The buckets use GCRA (one "theoretical arrival time" per token, no refill timer): a
//! bucket whose time is in the past is the same as a full one, so idle entries are dropped
//! whenever a shard has grown, keeping the map as small as the set of active tokens. The
//! map is sharded so concurrent callers rarely share a lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use scabbard_common::Error;
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::auth::Principal;
use crate::config::ControllerConfig;

/// Retry hint sent with a concurrency rejection (the server is busy right now; any
/// finishing call frees a slot).
const BUSY_RETRY: Duration = Duration::from_millis(100);
/// Lock shards of the bucket map.
const SHARDS: usize = 32;
/// A shard is swept for idle buckets when it reaches this many entries (then twice its
/// size after the sweep).
const MIN_SWEEP: usize = 64;

/// Limits of a controller, from its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most calls running at once (0 = unlimited).
    pub max_concurrent_requests: usize,
    /// Deadline of a call's handler (None = none).
    pub rpc_timeout: Option<Duration>,
}

impl Limits {
    /// The limits `cfg` asks for.
    pub fn from_config(cfg: &ControllerConfig) -> Self {
        Self {
            max_concurrent_requests: cfg.max_concurrent_requests,
            rpc_timeout: (cfg.rpc_timeout_ms > 0)
                .then(|| Duration::from_millis(cfg.rpc_timeout_ms)),
        }
    }
}

/// Tower layer enforcing [`Limits`] and each principal's rate.
#[derive(Clone)]
pub struct LimitsLayer {
    shared: Arc<Shared>,
}

struct Shared {
    limits: Limits,
    in_flight: AtomicUsize,
    buckets: Buckets,
}

impl LimitsLayer {
    /// A layer with `limits` and empty buckets.
    pub fn new(limits: Limits) -> Self {
        Self {
            shared: Arc::new(Shared {
                limits,
                in_flight: AtomicUsize::new(0),
                buckets: Buckets::new(),
            }),
        }
    }

    /// Calls running now (counted only with a concurrency limit).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limited {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`LimitsLayer`].
#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// A slot of the concurrency limit, given back on drop.
struct Permit(Option<Arc<Shared>>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Shared {
    /// Rate first (no slot is taken by a call that is refused anyway), then concurrency.
    fn admit(self: &Arc<Self>, path: &str, principal: Option<&Principal>) -> Result<Permit, Error> {
        if let Some(p) = principal
            && p.rate_per_second > 0
            && let Err(wait) =
                self.buckets
                    .check(&p.token_id, p.rate_per_second, p.burst, Instant::now())
        {
            return Err(Error::RateLimited {
                msg: format!(
                    "rate limit of token {} ({}) exceeded: {} requests/s, burst {} ({path})",
                    p.token_id,
                    p.name,
                    p.rate_per_second,
                    p.burst.max(1)
                ),
                retry_after: wait,
            });
        }
        let max = self.limits.max_concurrent_requests;
        if max == 0 {
            return Ok(Permit(None));
        }
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(Some(self.clone()));
        if before >= max {
            return Err(Error::RateLimited {
                msg: format!(
                    "the controller is at its limit of {max} concurrent requests (max_concurrent_requests); retry shortly ({path})"
                ),
                retry_after: BUSY_RETRY,
            });
        }
        Ok(permit)
    }
}

impl<S, B> Service<http::Request<B>> for Limited<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let permit = match self
            .shared
            .admit(req.uri().path(), req.extensions().get::<Principal>())
        {
            Ok(p) => p,
            Err(e) => {
                let resp = tonic::Status::from(e).into_http::<tonic::body::Body>();
                return Box::pin(async move { Ok(resp) });
            }
        };
        // An upload's handler reads the whole client stream: it has its own idle timeout
        // instead of the per-call deadline.
        let timeout = self
            .shared
            .limits
            .rpc_timeout
            .filter(|_| !is_client_stream(req.uri().path()));
        let path = timeout.map(|_| req.uri().path().to_string());
        let fut = self.inner.call(req);
        Box::pin(async move {
            // Held until the handler answered (streams: until their response started).
            let _permit = permit;
            match (timeout, path) {
                (Some(t), Some(path)) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => r,
                    Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                        "{path} did not answer within the controller's rpc_timeout_ms ({} ms)",
                        t.as_millis()
                    ))
                    .into_http::<tonic::body::Body>()),
                },
                _ => fut.await,
            }
        })
    }
}

/// Client-streaming methods, whose handlers last as long as the client sends.
fn is_client_stream(path: &str) -> bool {
    path == "/scabbard.v1.ArtifactService/Upload"
}

/// Token buckets keyed by token id (GCRA: each entry is the bucket's theoretical arrival
/// time in nanoseconds since `base`).
struct Buckets {
    base: Instant,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Default)]
struct Shard {
    tats: HashMap<Box<str>, u64>,
    sweep_at: usize,
}

impl Buckets {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// Takes one request from `key`'s bucket (`rate` per second, up to `burst` at once);
    /// `Err` says how long until one is available. Rate and burst are read on every call,
    /// so a changed quota applies from the next call on.
    fn check(&self, key: &str, rate: u32, burst: u32, now: Instant) -> Result<(), Duration> {
        if rate == 0 {
            return Ok(());
        }
        let now = now.saturating_duration_since(self.base).as_nanos() as u64;
        let interval = (1_000_000_000 / u64::from(rate)).max(1);
        let tolerance = interval.saturating_mul(u64::from(burst.max(1)));
        let shard = &self.shards[self.hasher.hash_one(key) as usize % self.shards.len()];
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let tat = shard.tats.get(key).copied().unwrap_or(now).max(now);
        let next = tat.saturating_add(interval);
        if next - now > tolerance {
            let wait = next - now - tolerance;
            // Rounded up to the millisecond: retrying after the hint succeeds.
            return Err(Duration::from_millis(wait.div_ceil(1_000_000)));
        }
        match shard.tats.get_mut(key) {
            Some(t) => *t = next,
            None => {
                if shard.tats.len() >= shard.sweep_at.max(MIN_SWEEP) {
                    // A bucket whose time has passed is full: forgetting it changes nothing.
                    shard.tats.retain(|_, t| *t > now);
                    shard.sweep_at = (shard.tats.len() * 2).max(MIN_SWEEP);
                }
                shard.tats.insert(key.into(), next);
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("shard").tats.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scabbard_common::proto::{Scope, TokenKind};
    use tonic::Code;

    fn at(b: &Buckets, ms: u64) -> Instant {
        b.base + Duration::from_millis(ms)
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_the_rate() {
        let b = Buckets::new();
        for i in 0..5 {
            assert!(b.check("a", 10, 5, at(&b, 1000)).is_ok(), "request {i}");
        }
        let wait = b.check("a", 10, 5, at(&b, 1000)).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Not yet refilled 1 ms early; refilled at the hinted time.
        assert!(b.check("a", 10, 5, at(&b, 1099)).is_err());
        assert!(b.check("a", 10, 5, at(&b, 1100)).is_ok());
        assert!(b.check("a", 10, 5, at(&b, 1100)).is_err());
        // After a long pause the whole burst is back, not more.
        for _ in 0..5 {
            assert!(b.check("a", 10, 5, at(&b, 5000)).is_ok());
        }
        assert!(b.check("a", 10, 5, at(&b, 5000)).is_err());
    }

    #[test]
    fn tokens_have_separate_buckets() {
        let b = Buckets::new();
        for _ in 0..3 {
            b.check("a", 1, 3, at(&b, 0)).unwrap();
        }
        assert!(b.check("a", 1, 3, at(&b, 0)).is_err());
        for _ in 0..3 {
            b.check("b", 1, 3, at(&b, 0)).unwrap();
        }
        assert!(b.check("b", 1, 3, at(&b, 0)).is_err());
    }

    #[test]
    fn zero_rate_is_unlimited_and_zero_burst_means_one() {
        let b = Buckets::new();
        for _ in 0..10_000 {
            b.check("a", 0, 0, at(&b, 0)).unwrap();
        }
        assert_eq!(b.len(), 0);
        b.check("c", 2, 0, at(&b, 0)).unwrap();
        assert_eq!(
            b.check("c", 2, 0, at(&b, 0)).unwrap_err(),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn a_raised_rate_applies_from_the_next_call() {
        let b = Buckets::new();
        b.check("a", 1, 1, at(&b, 0)).unwrap();
        assert!(b.check("a", 1, 1, at(&b, 0)).is_err());
        // The quota went up: the bucket refills at the new rate from now on (10 ms per
        // request instead of 1 s), without forgiving what was just used.
        assert!(b.check("a", 100, 100, at(&b, 0)).is_err());
        b.check("a", 100, 100, at(&b, 10)).unwrap();
        assert!(b.check("a", 1, 1, at(&b, 10)).is_err());
    }

    #[test]
    fn idle_buckets_are_forgotten() {
        let b = Buckets::new();
        for i in 0..10_000 {
            b.check(&format!("tok_{i}"), 10, 10, at(&b, i)).unwrap();
        }
        // Each bucket is idle 100 ms after its call: the map stays near the active set
        // (10 per ms * 100 ms = 1000 live ones), far below the 10,000 tokens seen.
        assert!(b.len() < 4_000, "{} buckets kept", b.len());
    }

    #[test]
    fn rate_and_burst_hold_under_concurrent_callers() {
        let b = Arc::new(Buckets::new());
        let now = Instant::now();
        let ok = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if b.check("shared", 1, 50, now).is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(ok.load(Ordering::Relaxed), 50);
    }

    fn principal(token_id: &str, rate: u32, burst: u32) -> Principal {
        Principal {
            token_id: token_id.into(),
            name: "t".into(),
            kind: TokenKind::Api,
            scope: Scope::Admin,
            project: "*".into(),
            agent_id: String::new(),
            rate_per_second: rate,
            burst,
            peer: String::new(),
        }
    }

    type Req = http::Request<()>;
    type Resp = http::Response<tonic::body::Body>;

    /// A service answering OK once `gate` has a permit (or at once without a gate).
    fn svc(
        gate: Option<Arc<tokio::sync::Semaphore>>,
    ) -> impl Service<Req, Response = Resp, Error = std::convert::Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        tower::service_fn(move |_req: Req| {
            let gate = gate.clone();
            async move {
                if let Some(g) = gate {
                    let _ = g.acquire().await;
                }
                Ok(http::Response::new(tonic::body::Body::empty()))
            }
        })
    }

    fn req(p: Option<Principal>) -> Req {
        let mut r = http::Request::builder()
            .uri("/scabbard.v1.TaskService/Get")
            .body(())
            .expect("request");
        if let Some(p) = p {
            r.extensions_mut().insert(p);
        }
        r
    }

    fn status(r: &Resp) -> Option<tonic::Status> {
        tonic::Status::from_header_map(r.headers())
    }

    #[tokio::test]
    async fn over_the_rate_gets_resource_exhausted_with_a_hint_others_do_not() {
        let layer = LimitsLayer::new(Limits {
            max_concurrent_requests: 0,
            rpc_timeout: None,
        });
        let mut s = layer.layer(svc(None));
        for _ in 0..3 {
            let r = s.call(req(Some(principal("tok_a", 1, 3)))).await.unwrap();
            assert!(status(&r).is_none());
        }
        let r = s.call(req(Some(principal("tok_a", 1, 3)))).await.unwrap();
        let st = status(&r).expect("a status");
        assert_eq!(st.code(), Code::ResourceExhausted);
        assert!(st.message().contains("tok_a"), "{}", st.message());
        let hint = scabbard_common::error::retry_after(&st).expect("retry-after-ms");
        assert!(hint > Duration::from_millis(900) && hint <= Duration::from_secs(1));
        // Another token, and calls without a principal, are not affected.
        let r = s.call(req(Some(principal("tok_b", 1, 3)))).await.unwrap();
        assert!(status(&r).is_none());
        for _ in 0..100 {
            assert!(status(&s.call(req(None)).await.unwrap()).is_none());
        }
    }

    #[tokio::test]
    async fn over_the_concurrency_limit_is_rejected_at_once_and_slots_come_back() {
        let layer = LimitsLayer::new(Limits {
            max_concurrent_requests: 2,
            rpc_timeout: None,
        });
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut s = layer.layer(svc(Some(gate.clone())));
        let a = tokio::spawn(s.call(req(None)));
        let b = tokio::spawn(s.call(req(Some(principal("tok_a", 0, 0)))));
        tokio::task::yield_now().await;
        assert_eq!(layer.in_flight(), 2);
        // The third is refused without waiting, with or without a principal.
        let r = s.call(req(None)).await.unwrap();
        let st = status(&r).expect("a status");
        assert_eq!(st.code(), Code::ResourceExhausted);
        assert_eq!(scabbard_common::error::retry_after(&st), Some(BUSY_RETRY));
        assert_eq!(layer.in_flight(), 2);
        gate.add_permits(10);
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        assert_eq!(layer.in_flight(), 0);
        let mut s = layer.layer(svc(None));
        assert!(status(&s.call(req(None)).await.unwrap()).is_none());
        assert_eq!(layer.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_dropped_call_gives_its_slot_back() {
        let layer = LimitsLayer::new(Limits {
            max_concurrent_requests: 1,
            rpc_timeout: None,
        });
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut s = layer.layer(svc(Some(gate)));
        let call = s.call(req(None));
        assert_eq!(layer.in_flight(), 1);
        drop(call);
        assert_eq!(layer.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_slow_handler_gets_deadline_exceeded() {
        let layer = LimitsLayer::new(Limits {
            max_concurrent_requests: 10,
            rpc_timeout: Some(Duration::from_millis(100)),
        });
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut s = layer.layer(svc(Some(gate)));
        let r = s.call(req(None)).await.unwrap();
        let st = status(&r).expect("a status");
        assert_eq!(st.code(), Code::DeadlineExceeded);
        assert!(st.message().contains("rpc_timeout_ms"), "{}", st.message());
        assert_eq!(layer.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_artifact_upload_is_not_cut_by_the_deadline() {
        let layer = LimitsLayer::new(Limits {
            max_concurrent_requests: 10,
            rpc_timeout: Some(Duration::from_millis(100)),
        });
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut s = layer.layer(svc(Some(gate.clone())));
        let upload = http::Request::builder()
            .uri("/scabbard.v1.ArtifactService/Upload")
            .body(())
            .expect("request");
        let call = tokio::spawn(s.call(upload));
        // Three times the deadline: a cut would have answered by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!call.is_finished(), "the upload was cut");
        gate.add_permits(1);
        let r = call.await.unwrap().unwrap();
        assert!(status(&r).is_none_or(|s| s.code() == Code::Ok));
    }
}
