//! The etcd backend of the [`Store`] interface (production, several controllers).
//!
//! A thin mapping onto etcd's own model: every key lives under [`EtcdConfig::namespace`],
//! which callers never see (not in keys, ranges or watch events). Every call is bounded by
//! `request_timeout`, retries included, and reports connection trouble as `Unavailable` naming
//! the endpoints. Each try is bounded by the shorter `attempt_timeout`: a request that reached
//! a member whose etcd leader died hangs until a deadline (etcd drops the forwarded proposal
//! silently), so reads are sent again after one short try instead of waiting out the whole
//! bound. Reads are retried on transient failures within that bound; writes only when they
//! surely never reached etcd (connection refused, no leader), so a retried transaction can
//! never apply twice here (a write whose try timed out is `Unavailable`, outcome unknown;
//! the committer decides). Dead connections are found by HTTP/2 pings
//! (`keep_alive_timeout`), and members that stop answering (killed, frozen) are taken out of
//! the balancer until they answer again ([`endpoints`]). This module owns no domain logic.

mod config;
mod endpoints;
mod errors;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KvClient, LeaseClient,
    PutOptions, TxnOp, TxnOpResponse, WatchClient,
};
use scabbard_common::{Error, Result};
use tokio::time::Instant;

pub use config::EtcdConfig;
use errors::{Retry, is_auth_failure};

use super::{
    CmpOp, Compare, CompareTarget, KeyValue, LeaseId, Op, OpResult, RangePage, Store, Txn,
    TxnResponse, WatchStream,
};

/// etcd's default `--max-txn-ops`: most compares, or ops per branch, in one transaction.
pub const ETCD_MAX_TXN_OPS: usize = 128;
/// Transaction sizes tried at connect with `etcd.max_txn_ops = 0`, largest first: more
/// than 1024 operations per commit gains little (a commit of 1024 already holds ~128
/// no-op tasks).
const DETECTED_TXN_OPS: [usize; 3] = [1024, 512, 256];
/// Room left in a request for protobuf framing, compares and keys.
const ETCD_FRAMING_BYTES: usize = 32 * 1024;

/// Longest wait of [`Store::health`].
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// A [`Store`] on an etcd cluster (v3 API). Cheap to share behind an `Arc`.
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    /// Key prefix, bytes of [`EtcdConfig::namespace`].
    namespace: Arc<[u8]>,
    request_timeout: Duration,
    /// Bound of one try ([`EtcdConfig::attempt_timeout`]).
    attempt_timeout: Duration,
    /// The configured endpoints, comma-separated, for messages.
    endpoints: String,
    /// The servers' request size limit ([`EtcdConfig::max_request_bytes`]).
    max_request_bytes: usize,
    /// [`EtcdConfig::max_txn_ops`].
    max_txn_ops: usize,
    /// Takes dead endpoints out of the balancer; stops with the store.
    _prober: Option<endpoints::Prober>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("namespace", &String::from_utf8_lossy(&self.namespace))
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects and checks that etcd answers a read, all within `cfg.connect_timeout`.
    /// Bad settings are `InvalidArgument` naming the field; an unreachable etcd is
    /// `Unavailable` naming the endpoints.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Arc<Self>> {
        cfg.validate()?;
        let endpoints = cfg.endpoints.join(",");
        let deadline = Instant::now() + cfg.connect_timeout;
        let unreachable = |why: String| {
            Error::Unavailable(format!(
                "cannot reach etcd at {endpoints} within {:?}: {why}",
                cfg.connect_timeout
            ))
        };
        let connect = Client::connect(&cfg.endpoints, Some(connect_options(cfg)?));
        let client = match tokio::time::timeout_at(deadline, connect).await {
            Err(_) => return Err(unreachable("no answer".into())),
            Ok(Err(e)) if is_auth_failure(&e) => {
                return Err(Error::invalid(format!(
                    "etcd.username/etcd.password: etcd at {endpoints} refused them: {e}"
                )));
            }
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Ok(Ok(c)) => c,
        };
        // Probes need no etcd leader: a member that answers is in service.
        let probe_opts = connect_options(cfg)?.with_require_leader(false);
        let prober = endpoints::spawn(
            client.clone(),
            cfg.endpoints.clone(),
            probe_opts,
            cfg.attempt_timeout,
        );
        let store = Self {
            _prober: prober,
            kv: client.kv_client(),
            watch: client.watch_client(),
            lease: client.lease_client(),
            namespace: cfg.namespace.as_bytes().into(),
            request_timeout: cfg.request_timeout,
            attempt_timeout: cfg.attempt_timeout,
            endpoints: endpoints.clone(),
            max_request_bytes: cfg.max_request_bytes,
            max_txn_ops: cfg.max_txn_ops,
        };
        // The client connects lazily: a read proves etcd is there. Retried until the
        // deadline, so one dead member of several does not fail it.
        store.probe(deadline).await.map_err(|e| match e {
            Error::Unavailable(why) => unreachable(why),
            other => other,
        })?;
        let mut store = store;
        if store.max_txn_ops == 0 {
            store.max_txn_ops = store.detect_max_txn_ops().await?;
        } else if store.max_txn_ops > ETCD_MAX_TXN_OPS
            && let Err(why) = store.takes_txn_ops(store.max_txn_ops).await?
        {
            let n = store.max_txn_ops;
            return Err(Error::invalid(format!(
                "etcd.max_txn_ops = {n}, but etcd at {} refused a transaction of {n} operations ({why}): start the etcd servers with --max-txn-ops={n} or more, or lower etcd.max_txn_ops (etcd's default is {ETCD_MAX_TXN_OPS}; 0 finds the servers' limit)",
                store.endpoints
            )));
        }
        Ok(Arc::new(store))
    }

    /// The largest of [`DETECTED_TXN_OPS`] the servers take (etcd's default if none).
    async fn detect_max_txn_ops(&self) -> Result<usize> {
        for n in DETECTED_TXN_OPS {
            if self.takes_txn_ops(n).await?.is_ok() {
                return Ok(n);
            }
        }
        Ok(ETCD_MAX_TXN_OPS)
    }

    /// Whether the servers take a transaction of `n` operations: a read-only transaction
    /// with that many compares (etcd counts compares against the same limit). `Err` holds
    /// the servers' refusal.
    async fn takes_txn_ops(&self, n: usize) -> Result<std::result::Result<(), String>> {
        let probe = Txn {
            compares: (0..n)
                .map(|i| Compare::absent(format!("meta/max-txn-ops-probe/{i}")))
                .collect(),
            ..Txn::default()
        };
        match self.txn(probe).await {
            Ok(_) => Ok(Ok(())),
            Err(Error::InvalidArgument(why)) => Ok(Err(why)),
            Err(e) => Err(e),
        }
    }

    /// The servers' request size limit, as configured.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    /// Most compares, or ops per branch, one transaction may carry (as configured, and
    /// checked against the servers at connect).
    pub fn max_txn_ops(&self) -> usize {
        self.max_txn_ops
    }

    /// The endpoints this store talks to, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// A linearizable one-key read; its header carries the store revision.
    async fn probe(&self, deadline: Instant) -> Result<i64> {
        let key = self.key("");
        let r = self
            .call_until(
                &self.kv,
                deadline,
                "a read",
                Retry::Idempotent,
                None,
                |mut kv| {
                    let key = key.clone();
                    async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
                },
            )
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// Runs `f` until it succeeds, fails for good, or `request_timeout` passes.
    async fn call<C, T, F, Fut>(
        &self,
        client: &C,
        what: &str,
        retry: Retry,
        lease: Option<LeaseId>,
        f: F,
    ) -> Result<T>
    where
        C: Clone,
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        self.call_until(client, deadline, what, retry, lease, f)
            .await
    }

    /// Runs `f` on a clone of `client` until it succeeds, fails with an error `retry` does
    /// not allow, or `deadline` passes (`Unavailable`). `what` and `lease` go into errors.
    async fn call_until<C, T, F, Fut>(
        &self,
        client: &C,
        deadline: Instant,
        what: &str,
        retry: Retry,
        lease: Option<LeaseId>,
        mut f: F,
    ) -> Result<T>
    where
        C: Clone,
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let mut delay = Duration::from_millis(10);
        loop {
            let try_deadline = deadline.min(Instant::now() + self.attempt_timeout);
            let err = match tokio::time::timeout_at(try_deadline, f(client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                // A read sent to a member that lost its leader waits for a deadline: send it
                // again (the balancer may pick another member, or this one has a leader now).
                Err(_) if retry == Retry::Idempotent && try_deadline < deadline => {
                    tracing::debug!(what, "etcd try timed out; sending it again");
                    continue;
                }
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "etcd at {} did not complete {what} within {:?}",
                        self.endpoints,
                        Instant::now() - started
                    )));
                }
            };
            if !retry.allows(&err) || Instant::now() + delay >= deadline {
                return Err(errors::map(err, &self.endpoints, what, lease));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    fn key(&self, k: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.namespace.len() + k.len());
        v.extend_from_slice(&self.namespace);
        v.extend_from_slice(k.as_bytes());
        v
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> KeyValue {
        to_key_value(&self.namespace, kv)
    }

    fn compare(&self, c: &Compare) -> etcd_client::Compare {
        let op = match c.op {
            CmpOp::Equal => CompareOp::Equal,
            CmpOp::NotEqual => CompareOp::NotEqual,
            CmpOp::Greater => CompareOp::Greater,
            CmpOp::Less => CompareOp::Less,
        };
        let key = self.key(&c.key);
        match &c.target {
            CompareTarget::Version(v) => etcd_client::Compare::version(key, op, *v),
            CompareTarget::CreateRevision(r) => etcd_client::Compare::create_revision(key, op, *r),
            CompareTarget::ModRevision(r) => etcd_client::Compare::mod_revision(key, op, *r),
            CompareTarget::Value(v) => etcd_client::Compare::value(key, op, v.clone()),
        }
    }

    fn op(&self, op: &Op) -> TxnOp {
        match op {
            Op::Put { key, value, lease } => {
                let opts = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
                TxnOp::put(self.key(key), value.clone(), opts)
            }
            Op::Delete { key } => TxnOp::delete(self.key(key), None::<DeleteOptions>),
            Op::Get { key } => TxnOp::get(self.key(key), None),
        }
    }
}

/// A stored key without the namespace.
fn to_key_value(namespace: &[u8], kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: unprefix(namespace, kv.key()),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn unprefix(namespace: &[u8], key: &[u8]) -> String {
    String::from_utf8_lossy(key.strip_prefix(namespace).unwrap_or(key)).into_owned()
}

/// The smallest key greater than every key starting with `prefix` (etcd's range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(cfg.connect_timeout)
        // Dead connections (a killed member, a silent partition) are noticed within about
        // 1.5 keep-alive timeouts, idle or not.
        .with_keep_alive(cfg.keep_alive_timeout / 2, cfg.keep_alive_timeout)
        .with_keep_alive_while_idle(true)
        // A member cut off from its quorum refuses requests (and ends watches) instead of
        // serving stale data.
        .with_require_leader(true);
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        // Simple tokens expire (5 min by default); without this, calls fail after that.
        opts = opts.with_user(u, p).with_auto_token_refresh(true);
    }
    if cfg.ca_file.is_some() || cfg.cert_file.is_some() {
        let read = |field: &str, f: &std::path::Path| {
            std::fs::read(f)
                .map_err(|e| Error::invalid(format!("etcd.{field}: {}: {e}", f.display())))
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &cfg.ca_file {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read("ca_file", ca)?));
        }
        if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read("cert_file", c)?,
                read("key_file", k)?,
            ));
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let k = self.key(key);
        let r = self
            .call(&self.kv, "a get", Retry::Idempotent, None, |mut kv| {
                let k = k.clone();
                async move { kv.get(k, None).await }
            })
            .await?;
        Ok(r.kvs().first().map(|kv| self.kv(kv)))
    }

    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<RangePage> {
        let full = self.key(prefix);
        let end = prefix_end(&full);
        // Strictly after `start_after`: the smallest key above it is `start_after` + "\0".
        let start = match start_after {
            Some(k) => {
                let mut s = self.key(k);
                s.push(0);
                s.max(full)
            }
            None => full,
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let r = self
            .call(&self.kv, "a range", Retry::Idempotent, None, |mut kv| {
                let (start, end) = (start.clone(), end.clone());
                async move {
                    kv.get(
                        start,
                        Some(GetOptions::new().with_range(end).with_limit(limit)),
                    )
                    .await
                }
            })
            .await?;
        Ok(RangePage {
            kvs: r.kvs().iter().map(|kv| self.kv(kv)).collect(),
            more: r.more(),
            revision: r.header().map_or(0, |h| h.revision()),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let compares: Vec<_> = txn.compares.iter().map(|c| self.compare(c)).collect();
        let success: Vec<_> = txn.success.iter().map(|o| self.op(o)).collect();
        let failure: Vec<_> = txn.failure.iter().map(|o| self.op(o)).collect();
        let lease = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|o| match o {
                Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                _ => None,
            });
        let t = etcd_client::Txn::new()
            .when(compares)
            .and_then(success)
            .or_else(failure);
        let r = self
            .call(
                &self.kv,
                "a transaction",
                Retry::NotSent,
                lease,
                |mut kv| {
                    let t = t.clone();
                    async move { kv.txn(t).await }
                },
            )
            .await?;
        let mut results = Vec::with_capacity(txn.success.len().max(txn.failure.len()));
        for o in r.op_responses() {
            results.push(match o {
                TxnOpResponse::Put(_) => OpResult::Put,
                TxnOpResponse::Delete(d) => OpResult::Delete(d.deleted() > 0),
                TxnOpResponse::Get(g) => OpResult::Get(g.kvs().first().map(|kv| self.kv(kv))),
                TxnOpResponse::Txn(_) => {
                    return Err(Error::internal("etcd answered a nested transaction"));
                }
            });
        }
        Ok(TxnResponse {
            succeeded: r.succeeded(),
            revision: r.header().map_or(0, |h| h.revision()),
            results,
        })
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream> {
        watch::open(self, prefix, from_revision).await
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd counts whole seconds (and may raise a TTL to its minimum, ~2 s).
        let secs = i64::try_from(ttl.as_millis().div_ceil(1000).max(1)).unwrap_or(i64::MAX);
        let r = self
            .call(
                &self.lease,
                "a lease grant",
                Retry::NotSent,
                None,
                |mut l| async move { l.grant(secs, None).await },
            )
            .await?;
        Ok(r.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        // etcd-client's `keep_alive` opens the stream, sends one request and waits for its
        // answer (a TTL <= 0 is "lease not found"): that one round trip is the renewal.
        self.call(
            &self.lease,
            "a lease keep-alive",
            Retry::Idempotent,
            Some(lease),
            |mut l| async move { l.keep_alive(lease).await.map(drop) },
        )
        .await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.call(
            &self.lease,
            "a lease revoke",
            Retry::NotSent,
            Some(lease),
            |mut l| async move { l.revoke(lease).await.map(drop) },
        )
        .await
    }

    async fn revision(&self) -> Result<i64> {
        self.probe(Instant::now() + self.request_timeout).await
    }

    async fn health(&self) -> Result<()> {
        self.probe(Instant::now() + self.request_timeout.min(HEALTH_TIMEOUT))
            .await
            .map(drop)
    }

    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn max_txn_ops(&self) -> usize {
        self.max_txn_ops
    }

    fn max_value_bytes(&self) -> usize {
        self.max_request_bytes().saturating_sub(ETCD_FRAMING_BYTES)
    }

    fn max_txn_bytes(&self) -> usize {
        self.max_request_bytes().saturating_sub(ETCD_FRAMING_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }

    #[test]
    fn keys_lose_the_namespace() {
        assert_eq!(unprefix(b"/ns/", b"/ns/a/b"), "a/b");
        assert_eq!(unprefix(b"/ns/", b"/other"), "/other");
    }
}
