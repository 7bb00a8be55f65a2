//! The etcd backend of the [`Store`] interface (production, several controllers). A thin
//! mapping onto etcd's own model: every key lives under a namespace prefix that callers
//! never see; each call is bounded by `request_timeout` and reports connection trouble as
//! `Unavailable` (callers retry those).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions, TxnOp,
    TxnOpResponse, WatchOptions,
};
use scabbard_common::{Error, Result};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{
    CmpOp, Compare, CompareTarget, KeyValue, LeaseId, Op, OpResult, RangePage, Store, Txn,
    TxnResponse, WatchEvent, WatchStream,
};

/// How to reach etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs (`http://host:2379`, `https://…` with TLS).
    pub endpoints: Vec<String>,
    /// etcd user (with `password`).
    pub username: Option<String>,
    /// etcd password.
    pub password: Option<String>,
    /// CA bundle to verify etcd's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (mutual TLS), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client key.
    pub key_file: Option<PathBuf>,
    /// Key prefix for everything Scabbard stores.
    pub namespace: String,
    /// Bound of every request (milliseconds).
    pub request_timeout_ms: u64,
    /// Bound of connecting (milliseconds).
    pub connect_timeout_ms: u64,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            namespace: "/scabbard/".into(),
            request_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
        }
    }
}

impl EtcdConfig {
    /// Refuses settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() || self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(Error::invalid(
                "etcd.endpoints must list at least one URL (--etcd-endpoints)",
            ));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(Error::invalid(
                "etcd.username and etcd.password go together",
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Error::invalid(
                "etcd.cert_file and etcd.key_file go together",
            ));
        }
        for f in [&self.ca_file, &self.cert_file, &self.key_file]
            .into_iter()
            .flatten()
        {
            if !f.exists() {
                return Err(Error::invalid(format!(
                    "etcd TLS file {} does not exist",
                    f.display()
                )));
            }
        }
        if self.request_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err(Error::invalid("etcd timeouts must be > 0"));
        }
        Ok(())
    }
}

/// A store on an etcd cluster.
pub struct EtcdStore {
    client: Client,
    namespace: String,
    timeout: Duration,
    endpoints: String,
}

fn map_err(e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => match s.code() {
            tonic::Code::NotFound => Error::NotFound {
                kind: "lease",
                id: s.message().to_string(),
            },
            tonic::Code::InvalidArgument => Error::invalid(format!("etcd: {}", s.message())),
            tonic::Code::OutOfRange if s.message().contains("compacted") => {
                Error::FailedPrecondition(format!("etcd: {}", s.message()))
            }
            tonic::Code::ResourceExhausted => {
                Error::ResourceExhausted(format!("etcd: {}", s.message()))
            }
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                Error::Unavailable(format!("etcd refused our credentials: {}", s.message()))
            }
            _ => Error::Unavailable(format!("etcd: {}", s.message())),
        },
        E::LeaseKeepAliveError(m) if m.contains("not found") => Error::not_found("lease", m),
        other => Error::Unavailable(format!("etcd: {other}")),
    }
}

/// The smallest key greater than every key starting with `prefix`.
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

impl EtcdStore {
    /// Connects (bounded by the connect timeout); `Unavailable` names the endpoints.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Arc<Self>> {
        cfg.validate()?;
        let endpoints = cfg.endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .with_timeout(Duration::from_millis(cfg.request_timeout_ms))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
            opts = opts.with_user(u, p);
        }
        if cfg.ca_file.is_some() || cfg.cert_file.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &cfg.ca_file {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(ca)?));
            }
            if let (Some(c), Some(k)) = (&cfg.cert_file, &cfg.key_file) {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    std::fs::read(c)?,
                    std::fs::read(k)?,
                ));
            }
            opts = opts.with_tls(tls);
        }
        let connect = Client::connect(cfg.endpoints.clone(), Some(opts));
        let client = tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), connect)
            .await
            .map_err(|_| Error::Unavailable(format!("etcd at {endpoints} did not answer in time")))?
            .map_err(|e| {
                Error::Unavailable(format!("cannot connect to etcd at {endpoints}: {e}"))
            })?;
        let store = Arc::new(Self {
            client,
            namespace: cfg.namespace.clone(),
            timeout: Duration::from_millis(cfg.request_timeout_ms),
            endpoints,
        });
        store
            .health()
            .await
            .map_err(|e| Error::Unavailable(format!("etcd at {}: {e}", store.endpoints)))?;
        Ok(store)
    }

    fn key(&self, k: &str) -> Vec<u8> {
        let mut v = self.namespace.as_bytes().to_vec();
        v.extend_from_slice(k.as_bytes());
        v
    }

    fn unkey(&self, k: &[u8]) -> String {
        let k = k.strip_prefix(self.namespace.as_bytes()).unwrap_or(k);
        String::from_utf8_lossy(k).into_owned()
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> KeyValue {
        KeyValue {
            key: self.unkey(kv.key()),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        }
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| Error::Unavailable(format!("etcd at {} timed out", self.endpoints)))?
            .map_err(map_err)
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

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut c = self.client.clone();
        let r = self.bounded(c.get(self.key(key), None)).await?;
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
        let start = match start_after {
            Some(k) => {
                let mut s = self.key(k);
                s.push(0);
                s.max(full)
            }
            None => full,
        };
        let mut opts = GetOptions::new().with_range(end);
        if limit > 0 {
            opts = opts.with_limit(limit as i64);
        }
        let mut c = self.client.clone();
        let r = self.bounded(c.get(start, Some(opts))).await?;
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
        let t = etcd_client::Txn::new()
            .when(compares)
            .and_then(success)
            .or_else(failure);
        let mut c = self.client.clone();
        let r = self.bounded(c.txn(t)).await?;
        let results = r
            .op_responses()
            .into_iter()
            .map(|o| match o {
                TxnOpResponse::Put(_) => OpResult::Put,
                TxnOpResponse::Delete(d) => OpResult::Delete(d.deleted() > 0),
                TxnOpResponse::Get(g) => OpResult::Get(g.kvs().first().map(|kv| self.kv(kv))),
                TxnOpResponse::Txn(_) => OpResult::Put,
            })
            .collect();
        Ok(TxnResponse {
            succeeded: r.succeeded(),
            revision: r.header().map_or(0, |h| h.revision()),
            results,
        })
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream> {
        let full = self.key(prefix);
        let mut opts = WatchOptions::new().with_range(prefix_end(&full));
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        let mut c = self.client.clone();
        let mut stream = self.bounded(c.watch(full, Some(opts))).await?;
        // The first answer confirms the watch, or says the history is compacted.
        let first = self
            .bounded(stream.message())
            .await?
            .ok_or_else(|| Error::Unavailable("etcd closed the watch".into()))?;
        if first.canceled() {
            return Err(if first.compact_revision() > 0 {
                Error::FailedPrecondition(format!(
                    "watch from revision {from_revision}: history compacted up to {}",
                    first.compact_revision()
                ))
            } else {
                Error::Unavailable(format!(
                    "etcd cancelled the watch: {}",
                    first.cancel_reason()
                ))
            });
        }
        let (tx, rx) = mpsc::channel(1024);
        let namespace = self.namespace.clone();
        let unkey = move |k: &[u8]| {
            String::from_utf8_lossy(k.strip_prefix(namespace.as_bytes()).unwrap_or(k)).into_owned()
        };
        tokio::spawn(async move {
            let mut pending = Some(first);
            loop {
                let resp = match pending.take() {
                    Some(r) => r,
                    None => match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            let _ = tx
                                .send(Err(Error::Unavailable("etcd closed the watch".into())))
                                .await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(map_err(e))).await;
                            return;
                        }
                    },
                };
                if resp.canceled() {
                    let e = if resp.compact_revision() > 0 {
                        Error::FailedPrecondition(format!(
                            "watch history compacted up to {}",
                            resp.compact_revision()
                        ))
                    } else {
                        Error::Unavailable(format!(
                            "etcd cancelled the watch: {}",
                            resp.cancel_reason()
                        ))
                    };
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let event = match ev.event_type() {
                        EventType::Put => WatchEvent::Put(KeyValue {
                            key: unkey(kv.key()),
                            value: kv.value().to_vec(),
                            create_revision: kv.create_revision(),
                            mod_revision: kv.mod_revision(),
                            version: kv.version(),
                            lease: kv.lease(),
                        }),
                        EventType::Delete => WatchEvent::Delete {
                            key: unkey(kv.key()),
                            revision: kv.mod_revision(),
                        },
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return; // the watcher went away
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let mut c = self.client.clone();
        Ok(self.bounded(c.lease_grant(secs, None)).await?.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut c = self.client.clone();
        let (mut keeper, mut stream) = self.bounded(c.lease_keep_alive(lease)).await?;
        self.bounded(keeper.keep_alive()).await?;
        match self.bounded(stream.message()).await? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(Error::not_found("lease", lease.to_string())),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let mut c = self.client.clone();
        self.bounded(c.lease_revoke(lease)).await.map(|_| ())
    }

    async fn revision(&self) -> Result<i64> {
        let mut c = self.client.clone();
        let r = self
            .bounded(c.get(
                self.key("\0revision-probe"),
                Some(GetOptions::new().with_count_only()),
            ))
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    async fn health(&self) -> Result<()> {
        self.revision().await.map(|_| ())
    }

    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn max_txn_ops(&self) -> usize {
        // etcd's default --max-txn-ops.
        128
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
    fn config_is_checked() {
        let mut c = EtcdConfig {
            endpoints: vec![],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("endpoints"));
        c.endpoints = vec!["http://127.0.0.1:2379".into()];
        c.username = Some("u".into());
        assert!(c.validate().is_err());
        c.password = Some("p".into());
        c.validate().unwrap();
    }
}
