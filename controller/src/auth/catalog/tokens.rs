//! Token records: create, list, revoke, registration-token use counting, agent tokens
//! (issued at registration, rotated by the agent) and the bootstrap admin token.

use prost::Message;
use scabbard_common::proto::{
    CreateTokenRequest, Project, Scope, StoredToken, TokenInfo, TokenKind,
};
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result};

use super::{Catalog, PROJECT_PREFIX, TOKEN_PREFIX};
use crate::audit;
use crate::auth::principal::{ALL_PROJECTS, DEFAULT_PROJECT, Principal};
use crate::auth::secrets::{hint, new_token, token_hash};
use crate::store::{Compare, Op, Txn};

/// Registration tokens live this long unless asked otherwise.
const DEFAULT_REGISTRATION_TTL_MS: u64 = 24 * 3_600_000;
/// Longest lifetime a token may ask for (10 years).
const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3_600_000;
/// Key marking that the cluster's first start happened.
const BOOTSTRAP_KEY: &str = "bootstrap";

/// What the first start of a cluster did.
#[derive(Debug)]
pub enum Bootstrap {
    /// This controller created the admin token (`generated`: we made up the secret, so it
    /// must be shown once).
    Created {
        /// The admin token.
        secret: String,
        /// True when the secret was generated here (not given by the operator).
        generated: bool,
    },
    /// The cluster was bootstrapped before.
    AlreadyDone,
}

fn new_id() -> String {
    format!("tok_{}", ulid::Ulid::new().to_string().to_lowercase())
}

impl Catalog {
    /// One token's info.
    pub fn token(&self, id: &str) -> Option<TokenInfo> {
        let c = self.cache.read().expect("catalog lock");
        c.tokens.get(id).and_then(|(t, _)| t.info.clone())
    }

    /// Tokens visible under `project` (`None` = all), newest first.
    pub fn list_tokens(
        &self,
        project: Option<&str>,
        kind: TokenKind,
        include_revoked: bool,
    ) -> Vec<TokenInfo> {
        let c = self.cache.read().expect("catalog lock");
        let mut out: Vec<TokenInfo> = c
            .tokens
            .values()
            .filter_map(|(t, _)| t.info.clone())
            .filter(|i| project.is_none_or(|p| i.project == p))
            .filter(|i| kind == TokenKind::Unspecified || i.kind() == kind)
            .filter(|i| include_revoked || !i.revoked)
            .collect();
        out.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(b.id.cmp(&a.id)));
        out
    }

    /// Creates an API or registration token; returns its info and the secret (shown once).
    pub async fn create_token(
        &self,
        who: &Principal,
        req: CreateTokenRequest,
    ) -> Result<(TokenInfo, String)> {
        // `req.kind()` would read an unknown value as UNSPECIFIED (= API): refuse it instead.
        let asked = TokenKind::try_from(req.kind).map_err(|_| {
            Error::invalid(format!(
                "kind: {} is not a token kind (TOKEN_KIND_API or TOKEN_KIND_REGISTRATION)",
                req.kind
            ))
        })?;
        let kind = match asked {
            TokenKind::Unspecified | TokenKind::Api => TokenKind::Api,
            TokenKind::Registration => TokenKind::Registration,
            TokenKind::Agent => {
                return Err(Error::invalid(
                    "kind: agent tokens are issued by AgentService.Register, not created",
                ));
            }
        };
        if req.name.len() > 128 {
            return Err(Error::invalid("name is longer than 128 bytes"));
        }
        if req.ttl_ms > MAX_TTL_MS {
            return Err(Error::invalid(format!(
                "ttl_ms {} is longer than the 10-year limit",
                req.ttl_ms
            )));
        }
        let mut scopes: Vec<i32> = Vec::new();
        for s in &req.scopes {
            match Scope::try_from(*s) {
                Ok(Scope::Unspecified) | Err(_) => {
                    return Err(Error::invalid(format!(
                        "scopes: {s} is not a scope (SCOPE_READ, SCOPE_SUBMIT, SCOPE_OPERATOR, SCOPE_ADMIN)"
                    )));
                }
                Ok(s) => {
                    if !scopes.contains(&(s as i32)) {
                        scopes.push(s as i32);
                    }
                }
            }
        }
        let project = match kind {
            TokenKind::Registration => {
                if !scopes.is_empty() {
                    return Err(Error::invalid("scopes: registration tokens take no scopes"));
                }
                // Agents registered with a project's token serve only that project (like
                // project runners); without a project they serve every project.
                if req.project == ALL_PROJECTS || (req.project.is_empty() && who.cluster_wide()) {
                    who.require_cluster_wide(
                        "a registration token for agents that serve every project",
                    )?;
                    ALL_PROJECTS.to_string()
                } else {
                    let p = who.resolve_project(&req.project)?;
                    if self.project(&p).is_none() {
                        return Err(Error::not_found("project", p));
                    }
                    p
                }
            }
            _ => {
                if scopes.is_empty() {
                    return Err(Error::invalid(
                        "scopes: an API token needs at least one of read, submit, operator, admin",
                    ));
                }
                if req.project == ALL_PROJECTS {
                    who.require_cluster_wide("a cluster-wide (\"*\") token")?;
                    ALL_PROJECTS.to_string()
                } else {
                    let p = who.resolve_project(&req.project)?;
                    if self.project(&p).is_none() {
                        return Err(Error::not_found("project", p));
                    }
                    p
                }
            }
        };
        let ttl = match (req.ttl_ms, kind) {
            (0, TokenKind::Registration) => DEFAULT_REGISTRATION_TTL_MS,
            (t, _) => t,
        };
        let now = now_ms();
        let secret = new_token(kind);
        let info = TokenInfo {
            id: new_id(),
            kind: kind as i32,
            name: if req.name.is_empty() {
                if kind == TokenKind::Api {
                    "api token".to_string()
                } else {
                    "registration token".to_string()
                }
            } else {
                req.name
            },
            scopes,
            project,
            created_at_ms: now,
            expires_at_ms: if ttl == 0 { 0 } else { now + ttl as i64 },
            max_uses: req.max_uses,
            created_by: who.token_id.clone(),
            hint: hint(&secret),
            ..Default::default()
        };
        let detail = format!(
            "kind={} scopes={:?} ttl_ms={ttl} max_uses={}",
            kind.as_str_name(),
            info.scopes()
                .map(crate::auth::principal::scope_name)
                .collect::<Vec<_>>(),
            info.max_uses
        );
        let audit = audit::entry(who, "token.create", &info.id, &info.project, detail);
        let stored = StoredToken {
            info: Some(info.clone()),
            sha256: token_hash(&secret),
        };
        self.write_token(&stored, None, vec![audit::op(&audit)])
            .await?;
        Ok((info, secret))
    }

    /// Revokes a token at once (idempotent).
    pub async fn revoke_token(&self, who: &Principal, id: &str, reason: &str) -> Result<TokenInfo> {
        let (mut stored, rev) = {
            let c = self.cache.read().expect("catalog lock");
            c.tokens
                .get(id)
                .cloned()
                .ok_or_else(|| Error::not_found("token", id))?
        };
        let mut info = stored.info.clone().unwrap_or_default();
        who.check_visible("token", id, &info.project)?;
        if info.revoked {
            return Ok(info);
        }
        info.revoked = true;
        info.revoked_at_ms = now_ms();
        stored.info = Some(info.clone());
        let audit = audit::entry(who, "token.revoke", id, &info.project, reason.to_string());
        self.write_token(&stored, Some(rev), vec![audit::op(&audit)])
            .await?;
        Ok(info)
    }

    /// Checks a registration token and counts one use of it (exactly, across controllers).
    pub async fn use_registration_token(&self, secret: &str) -> Result<Principal> {
        let p = self.check_registration_token(secret)?;
        if p.token_id == "config" {
            return Ok(p);
        }
        for _ in 0..8 {
            let (mut stored, rev) = {
                let c = self.cache.read().expect("catalog lock");
                c.tokens.get(&p.token_id).cloned().ok_or_else(|| {
                    Error::Unauthenticated("registration token was deleted".into())
                })?
            };
            let info = stored.info.get_or_insert_default();
            if info.max_uses > 0 && info.uses >= info.max_uses {
                return Err(Error::Unauthenticated(format!(
                    "registration token {} has been used all {} times it allows",
                    info.id, info.max_uses
                )));
            }
            info.uses += 1;
            match self.write_token(&stored, Some(rev), vec![]).await {
                Ok(_) => return Ok(p),
                Err(Error::Conflict(_)) => {
                    // Another controller counted a use first: re-read and try again.
                    if let Some(kv) = self
                        .store
                        .get(&format!("{TOKEN_PREFIX}{}", p.token_id))
                        .await?
                    {
                        self.apply(crate::store::WatchEvent::Put(kv));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable(
            "registration token is contended; retry".into(),
        ))
    }

    /// Issues the agent token of a (re-)registered agent, revoking the agent's earlier ones.
    /// The registration token `secret`, checked without using it up.
    pub fn check_registration_token(&self, secret: &str) -> Result<Principal> {
        let p = self.authenticate(secret)?;
        if p.kind != TokenKind::Registration {
            return Err(Error::Unauthenticated(format!(
                "token {} is not a registration token",
                p.token_id
            )));
        }
        Ok(p)
    }

    /// Whether `agent_id` holds an agent token that is not revoked (it is a live agent:
    /// re-registering it needs proof).
    pub fn agent_has_live_token(&self, agent_id: &str) -> bool {
        let c = self.cache.read().expect("catalog lock");
        c.tokens.values().any(|(t, _)| {
            t.info.as_ref().is_some_and(|i| {
                i.kind() == TokenKind::Agent && i.agent_id == agent_id && !i.revoked
            })
        })
    }

    /// Whether `secret` is a valid (unrevoked, unexpired) agent token of `agent_id`.
    pub fn proves_agent(&self, secret: &str, agent_id: &str) -> bool {
        !secret.is_empty()
            && self
                .authenticate(secret)
                .is_ok_and(|p| p.kind == TokenKind::Agent && p.agent_id == agent_id)
    }

    pub async fn issue_agent_token(
        &self,
        agent_id: &str,
        name: &str,
        by: &Principal,
    ) -> Result<String> {
        let mut extra = Vec::new();
        {
            let c = self.cache.read().expect("catalog lock");
            for (t, _) in c.tokens.values() {
                if let Some(i) = &t.info
                    && i.kind() == TokenKind::Agent
                    && i.agent_id == agent_id
                    && !i.revoked
                {
                    let mut old = t.clone();
                    let oi = old.info.get_or_insert_default();
                    oi.revoked = true;
                    oi.revoked_at_ms = now_ms();
                    extra.push(old);
                }
            }
        }
        let secret = new_token(TokenKind::Agent);
        let stored = StoredToken {
            info: Some(TokenInfo {
                id: new_id(),
                kind: TokenKind::Agent as i32,
                name: format!("agent {name}"),
                project: ALL_PROJECTS.into(),
                created_at_ms: now_ms(),
                agent_id: agent_id.into(),
                created_by: by.token_id.clone(),
                hint: hint(&secret),
                ..Default::default()
            }),
            sha256: token_hash(&secret),
        };
        let ops: Vec<Op> = extra
            .iter()
            .map(|t| Op::put(token_key(t), t.encode_to_vec()))
            .collect();
        let revision = self.write_token(&stored, None, ops).await?;
        for t in extra {
            // Write-through of the revocations (the watch would bring them shortly too).
            let id = t.info.as_ref().map(|i| i.id.clone()).unwrap_or_default();
            self.put_token(&id, t, revision);
        }
        Ok(secret)
    }

    /// Gives the calling agent a new secret for the same token (its session stays up).
    pub async fn rotate_agent_token(&self, who: &Principal) -> Result<String> {
        if who.kind != TokenKind::Agent {
            return Err(Error::PermissionDenied(
                "only an agent token can be rotated this way".into(),
            ));
        }
        let (mut stored, rev) = {
            let c = self.cache.read().expect("catalog lock");
            c.tokens
                .get(&who.token_id)
                .cloned()
                .ok_or_else(|| Error::Unauthenticated("agent token was deleted".into()))?
        };
        let secret = new_token(TokenKind::Agent);
        stored.sha256 = token_hash(&secret);
        if let Some(i) = stored.info.as_mut() {
            i.hint = hint(&secret);
        }
        self.write_token(&stored, Some(rev), vec![]).await?;
        Ok(secret)
    }

    /// On the first start of an empty cluster: creates the `default` project and one admin
    /// token (`given`, or a generated one), exactly once across all controllers.
    pub async fn bootstrap(&self, given: Option<String>) -> Result<Bootstrap> {
        if self.store.get(BOOTSTRAP_KEY).await?.is_some() {
            return Ok(Bootstrap::AlreadyDone);
        }
        let (secret, generated) = match given {
            Some(s) => {
                let s = s.trim().to_string();
                if s.len() < 24 {
                    return Err(Error::invalid(
                        "the bootstrap admin token must be at least 24 characters",
                    ));
                }
                (s, false)
            }
            None => (new_token(TokenKind::Api), true),
        };
        let now = now_ms();
        let info = TokenInfo {
            id: new_id(),
            kind: TokenKind::Api as i32,
            name: "bootstrap admin".into(),
            scopes: vec![Scope::Admin as i32],
            project: ALL_PROJECTS.into(),
            created_at_ms: now,
            created_by: "bootstrap".into(),
            hint: hint(&secret),
            ..Default::default()
        };
        let stored = StoredToken {
            info: Some(info.clone()),
            sha256: token_hash(&secret),
        };
        let project = Project {
            name: DEFAULT_PROJECT.into(),
            description: "Tasks submitted without a project".into(),
            quota: None,
            created_at_ms: now,
            retention_days: 0.0,
        };
        let who = Principal::internal("bootstrap", "first start");
        let audit = audit::entry(
            &who,
            "cluster.bootstrap",
            &info.id,
            ALL_PROJECTS,
            "admin token and default project created",
        );
        let resp = self
            .store
            .txn(Txn {
                compares: vec![Compare::absent(BOOTSTRAP_KEY)],
                success: vec![
                    Op::put(BOOTSTRAP_KEY, now.to_string().into_bytes()),
                    Op::put(token_key(&stored), stored.encode_to_vec()),
                    Op::put(
                        format!("{PROJECT_PREFIX}{DEFAULT_PROJECT}"),
                        project.encode_to_vec(),
                    ),
                    audit::op(&audit),
                ],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Ok(Bootstrap::AlreadyDone);
        }
        self.put_token(&info.id, stored, resp.revision);
        self.cache
            .write()
            .expect("catalog lock")
            .projects
            .insert(DEFAULT_PROJECT.into(), (project, resp.revision));
        Ok(Bootstrap::Created { secret, generated })
    }

    /// Writes a token record (created when `expect_rev` is `None`, else compare-and-swap
    /// against that revision) with `extra` ops in the same transaction; applies it locally.
    /// Returns the store revision of the write.
    async fn write_token(
        &self,
        stored: &StoredToken,
        expect_rev: Option<i64>,
        extra: Vec<Op>,
    ) -> Result<i64> {
        let key = token_key(stored);
        let compare = match expect_rev {
            None => Compare::absent(key.clone()),
            Some(r) => Compare::mod_revision(key.clone(), r),
        };
        let mut success = vec![Op::put(key.clone(), stored.encode_to_vec())];
        success.extend(extra);
        let resp = self
            .store
            .txn(Txn {
                compares: vec![compare],
                success,
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(Error::Conflict(format!(
                "{key} changed concurrently; retry"
            )));
        }
        let id = stored
            .info
            .as_ref()
            .map(|i| i.id.clone())
            .unwrap_or_default();
        self.put_token(&id, stored.clone(), resp.revision);
        Ok(resp.revision)
    }
}

fn token_key(t: &StoredToken) -> String {
    format!(
        "{TOKEN_PREFIX}{}",
        t.info.as_ref().map(|i| i.id.as_str()).unwrap_or_default()
    )
}
