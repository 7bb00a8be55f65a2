//! Who is calling: the [`Principal`] the auth layer puts into each authenticated request's
//! extensions, and the checks services make against it (scope, project).

use scabbard_common::proto::{Scope, TokenKind};
use scabbard_common::{Error, Result};

/// Project value meaning "every project" (cluster-wide tokens).
pub const ALL_PROJECTS: &str = "*";
/// Project tasks go to when none is named.
pub const DEFAULT_PROJECT: &str = "default";

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Id of the token used (`tok_…`), or `config` for the static registration token.
    pub token_id: String,
    /// The token's name, for audit entries.
    pub name: String,
    /// What kind of token it is.
    pub kind: TokenKind,
    /// Effective scope (the highest the token holds; each includes those below).
    pub scope: Scope,
    /// Bound project, or [`ALL_PROJECTS`].
    pub project: String,
    /// Agent tokens: the agent.
    pub agent_id: String,
    /// Requests per second allowed to this principal (0 = unlimited) and burst.
    pub rate_per_second: u32,
    /// Requests allowed at once above the rate.
    pub burst: u32,
    /// The client's address (for audit entries), when known.
    pub peer: String,
}

impl Principal {
    /// The controller acting on its own behalf (bootstrap, tests): a cluster-wide admin.
    pub fn internal(token_id: &str, name: &str) -> Self {
        Self {
            token_id: token_id.into(),
            name: name.into(),
            kind: TokenKind::Api,
            scope: Scope::Admin,
            project: ALL_PROJECTS.into(),
            agent_id: String::new(),
            rate_per_second: 0,
            burst: 0,
            peer: String::new(),
        }
    }

    /// Fails with `PERMISSION_DENIED` unless the token holds `scope` (or a higher one).
    pub fn require(&self, scope: Scope) -> Result<()> {
        if self.kind == TokenKind::Api && self.scope as i32 >= scope as i32 {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "token {} ({}) lacks the {} scope",
            self.token_id,
            self.name,
            scope_name(scope)
        )))
    }

    /// True for tokens bound to no single project.
    pub fn cluster_wide(&self) -> bool {
        self.project == ALL_PROJECTS
    }

    /// Whether the caller may see or touch `project`'s resources.
    pub fn may_access(&self, project: &str) -> bool {
        self.cluster_wide() || self.project == project
    }

    /// Fails with `PERMISSION_DENIED` when `project` is not the caller's.
    pub fn check_project(&self, what: &str, project: &str) -> Result<()> {
        if self.may_access(project) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{what} belongs to project {project:?}; this token is bound to project {:?}",
            self.project
        )))
    }

    /// Fails with `NOT_FOUND` — the very answer an unknown id gets — when `id` (a `kind`)
    /// belongs to a project the caller may not see, so ids cannot be probed across
    /// projects. Every lookup by id in the API goes through here.
    pub fn check_visible(&self, kind: &'static str, id: &str, project: &str) -> Result<()> {
        if self.may_access(project) {
            return Ok(());
        }
        Err(Error::not_found(kind, id))
    }

    /// Fails with `PERMISSION_DENIED` unless the token is cluster-wide.
    pub fn require_cluster_wide(&self, what: &str) -> Result<()> {
        if self.cluster_wide() {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{what} needs a cluster-wide token; this one is bound to project {:?}",
            self.project
        )))
    }

    /// The project a request acts in: `asked` if given (and allowed), else the token's own
    /// (or the default project for cluster-wide tokens).
    pub fn resolve_project(&self, asked: &str) -> Result<String> {
        if asked.is_empty() {
            return Ok(if self.cluster_wide() {
                DEFAULT_PROJECT.to_string()
            } else {
                self.project.clone()
            });
        }
        self.check_project("the request", asked)?;
        Ok(asked.to_string())
    }

    /// Filter for list calls: `Some(project)` to restrict to, `None` for all.
    pub fn list_filter(&self, asked: &str) -> Result<Option<String>> {
        match (self.cluster_wide(), asked.is_empty()) {
            (true, true) => Ok(None),
            (true, false) => Ok(Some(asked.to_string())),
            (false, _) => {
                self.check_project(
                    "the request",
                    if asked.is_empty() {
                        &self.project
                    } else {
                        asked
                    },
                )?;
                Ok(Some(self.project.clone()))
            }
        }
    }
}

/// Lower-case name of a scope (`read`, `submit`, `operator`, `admin`).
pub fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Read => "read",
        Scope::Submit => "submit",
        Scope::Operator => "operator",
        Scope::Admin => "admin",
        Scope::Unspecified => "none",
    }
}

/// Parses a scope name.
pub fn parse_scope(s: &str) -> Result<Scope> {
    match s.trim().to_ascii_lowercase().as_str() {
        "read" => Ok(Scope::Read),
        "submit" => Ok(Scope::Submit),
        "operator" => Ok(Scope::Operator),
        "admin" => Ok(Scope::Admin),
        other => Err(Error::invalid(format!(
            "scope {other:?} is not one of read, submit, operator, admin"
        ))),
    }
}

/// The caller of an authenticated request (put there by the auth layer).
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal> {
    let mut p = req
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| {
            Error::Unauthenticated(
                "missing token: send metadata 'authorization: Bearer <token>'".into(),
            )
        })?;
    if let Some(a) = req.remote_addr() {
        p.peer = a.to_string();
        // A call a follower forwarded: its client's address too, labelled as the
        // follower's word for it.
        if req.metadata().contains_key(crate::forward::FORWARDED_KEY)
            && let Some(client) = req
                .metadata()
                .get(crate::forward::FORWARDED_FOR_KEY)
                .and_then(|v| v.to_str().ok())
        {
            let client: String = client.chars().take(64).collect();
            p.peer = format!("{a} for {client}");
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(scope: Scope, project: &str) -> Principal {
        Principal {
            token_id: "tok_1".into(),
            name: "t".into(),
            kind: TokenKind::Api,
            scope,
            project: project.into(),
            agent_id: String::new(),
            rate_per_second: 0,
            burst: 0,
            peer: String::new(),
        }
    }

    #[test]
    fn scopes_include_lower_ones() {
        let op = p(Scope::Operator, "a");
        assert!(op.require(Scope::Read).is_ok());
        assert!(op.require(Scope::Submit).is_ok());
        assert!(op.require(Scope::Operator).is_ok());
        assert_eq!(
            op.require(Scope::Admin).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn projects_are_fenced() {
        let a = p(Scope::Admin, "a");
        assert!(a.check_project("task", "a").is_ok());
        assert!(a.check_project("task", "b").is_err());
        assert_eq!(a.resolve_project("").unwrap(), "a");
        assert!(a.resolve_project("b").is_err());
        assert_eq!(a.list_filter("").unwrap(), Some("a".into()));
        assert!(a.list_filter("b").is_err());
        let all = p(Scope::Read, ALL_PROJECTS);
        assert_eq!(all.resolve_project("").unwrap(), DEFAULT_PROJECT);
        assert_eq!(all.list_filter("").unwrap(), None);
        assert_eq!(all.list_filter("b").unwrap(), Some("b".into()));
    }
}
