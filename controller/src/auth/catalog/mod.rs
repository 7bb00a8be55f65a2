//! The catalog: the cluster's tokens and projects, kept in the store (`tokens/<id>`,
//! `projects/<name>`) and cached in memory on every controller, fed by a store watch. It
//! answers "who is this token" in well under a microsecond without touching the store, and
//! applies its own writes at once, so a revocation is refused on the very next call here
//! and within a watch delivery on the other controllers. Revoked token ids are broadcast so
//! open agent sessions using them close at once.

mod projects;
#[cfg(test)]
mod tests;
mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::Message;
use scabbard_common::proto::{Project, Scope, StoredToken, TokenKind};
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::principal::Principal;
use super::secrets::{constant_time_eq, token_hash};
use crate::store::{KeyValue, Store, WatchEvent};

pub use projects::validate_name as validate_project_name;
pub use tokens::Bootstrap;

/// Store key prefix of token records.
pub const TOKEN_PREFIX: &str = "tokens/";
/// Store key prefix of project records.
pub const PROJECT_PREFIX: &str = "projects/";

/// Limits applied to principals whose project sets none.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultLimits {
    /// Requests per second per token (0 = unlimited).
    pub requests_per_second: u32,
    /// Burst above the rate.
    pub burst: u32,
}

#[derive(Default)]
struct Cache {
    /// token id → (record, mod revision)
    tokens: HashMap<String, (StoredToken, i64)>,
    /// sha256 → token id
    by_hash: HashMap<String, String>,
    /// name → (project, mod revision)
    projects: BTreeMap<String, (Project, i64)>,
}

/// Tokens and projects of the cluster; see the module docs.
pub struct Catalog {
    store: Arc<dyn Store>,
    cache: RwLock<Cache>,
    revoked: broadcast::Sender<String>,
    /// SHA-256 of the config's static registration token, if one is set.
    static_registration: Option<String>,
    limits: DefaultLimits,
    /// Audit entries written in the background (submits).
    audit: crate::audit::Sink,
}

impl Catalog {
    /// Loads tokens and projects from `store` and keeps them current until `stop`.
    pub async fn open(
        store: Arc<dyn Store>,
        static_registration_token: Option<&str>,
        limits: DefaultLimits,
        stop: CancellationToken,
    ) -> Result<Arc<Self>> {
        let (revoked, _) = broadcast::channel(1024);
        let catalog = Arc::new(Self {
            store: store.clone(),
            cache: RwLock::new(Cache::default()),
            revoked,
            static_registration: static_registration_token
                .filter(|t| !t.is_empty())
                .map(token_hash),
            limits,
            audit: crate::audit::Sink::spawn(store.clone()),
        });
        let revision = catalog.reload().await?;
        tokio::spawn(catalog.clone().follow(revision, stop));
        Ok(catalog)
    }

    /// The store the catalog writes to.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Records an audit entry in the background (see [`crate::audit::Sink`]).
    pub(crate) fn audit(&self, e: scabbard_common::proto::AuditEntry) {
        self.audit.record(e);
    }

    /// Token ids as they are revoked (here or on another controller).
    pub fn revocations(&self) -> broadcast::Receiver<String> {
        self.revoked.subscribe()
    }

    /// Who holds `secret`: `UNAUTHENTICATED` for unknown, revoked or expired tokens.
    pub fn authenticate(&self, secret: &str) -> Result<Principal> {
        let hash = token_hash(secret);
        let cache = self.cache.read().expect("catalog lock");
        let Some((stored, _)) = cache
            .by_hash
            .get(&hash)
            .and_then(|id| cache.tokens.get(id))
            .filter(|(t, _)| constant_time_eq(t.sha256.as_bytes(), hash.as_bytes()))
        else {
            if let Some(h) = &self.static_registration
                && constant_time_eq(h.as_bytes(), hash.as_bytes())
            {
                return Ok(Principal {
                    token_id: "config".into(),
                    name: "static registration token".into(),
                    kind: TokenKind::Registration,
                    scope: Scope::Unspecified,
                    project: super::ALL_PROJECTS.into(),
                    agent_id: String::new(),
                    rate_per_second: 0,
                    burst: 0,
                    peer: String::new(),
                });
            }
            return Err(Error::Unauthenticated(
                "token is not valid: it is unknown to this cluster (check for typos, or create one with `scabbard token create`)".into(),
            ));
        };
        let info = stored.info.clone().unwrap_or_default();
        if info.revoked {
            return Err(Error::Unauthenticated(format!(
                "token {} ({}) was revoked",
                info.id, info.name
            )));
        }
        if info.expires_at_ms > 0 && info.expires_at_ms <= now_ms() {
            return Err(Error::Unauthenticated(format!(
                "token {} ({}) expired at {} ms since the epoch",
                info.id, info.name, info.expires_at_ms
            )));
        }
        let quota = cache.projects.get(&info.project).and_then(|(p, _)| p.quota);
        let (rate, burst) = match quota {
            Some(q) if q.requests_per_second > 0 => (q.requests_per_second, q.burst),
            // Agents are not held to the controller-wide default: their work rides one
            // Session stream, and their artifact calls follow the tasks they run.
            _ if info.kind() == TokenKind::Agent => (0, 0),
            _ => (self.limits.requests_per_second, self.limits.burst),
        };
        Ok(Principal {
            scope: info
                .scopes()
                .max_by_key(|s| *s as i32)
                .unwrap_or(Scope::Unspecified),
            kind: info.kind(),
            token_id: info.id,
            name: info.name,
            project: info.project,
            agent_id: info.agent_id,
            rate_per_second: rate,
            burst: burst.max(rate),
            peer: String::new(),
        })
    }

    /// Reads every token and project from the store into the cache; returns the revision
    /// read at.
    async fn reload(&self) -> Result<i64> {
        let (tokens, rev_t) = load(&self.store, TOKEN_PREFIX).await?;
        let (projects, rev_p) = load(&self.store, PROJECT_PREFIX).await?;
        let mut fresh = Cache::default();
        for kv in tokens {
            if let Ok(t) = StoredToken::decode(kv.value.as_slice()) {
                let id = t.info.as_ref().map(|i| i.id.clone()).unwrap_or_default();
                fresh.by_hash.insert(t.sha256.clone(), id.clone());
                fresh.tokens.insert(id, (t, kv.mod_revision));
            } else {
                warn!(key = %kv.key, "ignoring a corrupt token record");
            }
        }
        for kv in projects {
            if let Ok(p) = Project::decode(kv.value.as_slice()) {
                fresh.projects.insert(p.name.clone(), (p, kv.mod_revision));
            }
        }
        let newly_revoked: Vec<String> = {
            let old = self.cache.read().expect("catalog lock");
            fresh
                .tokens
                .iter()
                .filter(|(id, (t, _))| {
                    revoked(t) && old.tokens.get(*id).is_some_and(|(o, _)| !revoked(o))
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        *self.cache.write().expect("catalog lock") = fresh;
        for id in newly_revoked {
            let _ = self.revoked.send(id);
        }
        Ok(rev_t.min(rev_p))
    }

    /// Applies the store's changes to the cache until `stop`; reloads when a watch breaks.
    async fn follow(self: Arc<Self>, mut revision: i64, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let watches = tokio::try_join!(
                self.store.watch(TOKEN_PREFIX, revision + 1),
                self.store.watch(PROJECT_PREFIX, revision + 1)
            );
            if let Ok((mut tokens, mut projects)) = watches {
                failures = 0;
                loop {
                    let ev = tokio::select! {
                        _ = stop.cancelled() => return,
                        e = tokens.recv() => e,
                        e = projects.recv() => e,
                    };
                    match ev {
                        Some(Ok(ev)) => self.apply(ev),
                        Some(Err(e)) => {
                            debug!(error = %e, "catalog watch broke; reloading");
                            break;
                        }
                        None => break,
                    }
                }
            }
            failures += 1;
            let delay = scabbard_common::backoff::Backoff::default().delay(failures);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay.min(Duration::from_secs(2))) => {}
            }
            match self.reload().await {
                Ok(r) => revision = r,
                Err(e) => warn!(error = %e, "reloading tokens and projects"),
            }
        }
    }

    /// Applies one store change (from the watch, or our own write) to the cache.
    fn apply(&self, ev: WatchEvent) {
        match ev {
            WatchEvent::Put(kv) => {
                if let Some(id) = kv.key.strip_prefix(TOKEN_PREFIX) {
                    if let Ok(t) = StoredToken::decode(kv.value.as_slice()) {
                        self.put_token(id, t, kv.mod_revision);
                    }
                } else if let Some(name) = kv.key.strip_prefix(PROJECT_PREFIX)
                    && let Ok(p) = Project::decode(kv.value.as_slice())
                {
                    let mut c = self.cache.write().expect("catalog lock");
                    if c.projects
                        .get(name)
                        .is_none_or(|(_, r)| *r <= kv.mod_revision)
                    {
                        c.projects.insert(name.to_string(), (p, kv.mod_revision));
                    }
                }
            }
            WatchEvent::Delete { key, .. } => {
                if let Some(id) = key.strip_prefix(TOKEN_PREFIX) {
                    let mut c = self.cache.write().expect("catalog lock");
                    if let Some((t, _)) = c.tokens.remove(id) {
                        c.by_hash.remove(&t.sha256);
                        drop(c);
                        let _ = self.revoked.send(id.to_string());
                    }
                } else if let Some(name) = key.strip_prefix(PROJECT_PREFIX) {
                    self.cache
                        .write()
                        .expect("catalog lock")
                        .projects
                        .remove(name);
                }
            }
        }
    }

    fn put_token(&self, id: &str, t: StoredToken, rev: i64) {
        let mut c = self.cache.write().expect("catalog lock");
        let was_live = match c.tokens.get(id) {
            Some((_, r)) if *r > rev => return, // we already hold something newer
            Some((old, _)) => {
                let live = !revoked(old);
                let old_hash = old.sha256.clone();
                c.by_hash.remove(&old_hash);
                live
            }
            None => true,
        };
        let now_revoked = revoked(&t);
        c.by_hash.insert(t.sha256.clone(), id.to_string());
        c.tokens.insert(id.to_string(), (t, rev));
        drop(c);
        if was_live && now_revoked {
            let _ = self.revoked.send(id.to_string());
        }
    }
}

fn revoked(t: &StoredToken) -> bool {
    t.info.as_ref().is_some_and(|i| i.revoked)
}

async fn load(store: &Arc<dyn Store>, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    let mut revision = 0;
    loop {
        let page = store.range(prefix, after.as_deref(), 10_000).await?;
        if revision == 0 {
            revision = page.revision;
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
        out.extend(page.kvs);
        if !page.more || after.is_none() {
            return Ok((out, revision));
        }
    }
}
