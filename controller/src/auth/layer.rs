//! The auth tower layer: every gRPC call passes here before any service sees it. It reads
//! the bearer token, asks the [`Catalog`] who it is, checks the kind and scope the method
//! needs ([`rule`]), and puts the [`Principal`] into the request's extensions for the
//! services' project checks. Health and reflection stay open; `Register` carries its
//! registration token in the body and is checked by the service.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use scabbard_common::Error;
use scabbard_common::proto::{Scope, TokenKind};
use tonic::codegen::http;
use tower::{Layer, Service};

use super::catalog::Catalog;
use super::principal::scope_name;
use super::secrets::bearer_header;

/// What a method needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Nothing (health, reflection, registration).
    Open,
    /// A token is used if present (so answers can say more), never required.
    Optional,
    /// An agent token.
    Agent,
    /// An API token with at least this scope.
    Api(Scope),
    /// An agent token, or an API token with at least this scope.
    AgentOrApi(Scope),
}

/// The rule for a gRPC path (`/package.Service/Method`).
pub fn rule(path: &str) -> Rule {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return Rule::Open;
    }
    let Some((service, method)) = path
        .strip_prefix("/scabbard.v1.")
        .and_then(|p| p.split_once('/'))
    else {
        return Rule::Api(Scope::Read);
    };
    match (service, method) {
        ("AgentService", "Register") => Rule::Open,
        ("AgentService", _) => Rule::Agent,
        ("AdminService", "ClusterStatus") => Rule::Optional,
        ("AdminService", "ListAgents" | "WhoAmI") => Rule::Api(Scope::Read),
        ("AdminService", "ListBreakers") => Rule::Api(Scope::Read),
        ("AdminService", "GetStats") => Rule::Api(Scope::Read),
        ("AdminService", "DrainAgent" | "ListAudit" | "ResetBreaker") => Rule::Api(Scope::Operator),
        // The effective configuration, secrets hidden (see crate::config_view).
        ("AdminService", "GetConfig") => Rule::Api(Scope::Operator),
        ("AdminService", "UndrainAgent" | "RemoveAgent") => Rule::Api(Scope::Operator),
        ("AdminService", _) => Rule::Api(Scope::Admin),
        // Uploads come from the agent running the attempt; downloads from agents (inputs
        // of their attempts) and readers (results); the service checks which.
        ("ArtifactService", "Upload") => Rule::Agent,
        ("ArtifactService", "Download") => Rule::AgentOrApi(Scope::Read),
        ("ArtifactService", _) => Rule::Api(Scope::Read),
        ("TaskService", "Submit" | "SubmitBatch" | "Cancel") => Rule::Api(Scope::Submit),
        ("TaskService", "Rerun") => Rule::Api(Scope::Submit),
        ("TaskService", _) => Rule::Api(Scope::Read),
        ("ProjectService", "Get" | "List") => Rule::Api(Scope::Read),
        ("ProjectService", _) => Rule::Api(Scope::Admin),
        ("WorkflowService" | "TemplateService" | "ScheduleService", m)
            if m.starts_with("Get")
                || m.starts_with("List")
                || m.starts_with("Watch")
                || m == "Render" =>
        {
            Rule::Api(Scope::Read)
        }
        ("WorkflowService" | "TemplateService" | "ScheduleService", _) => Rule::Api(Scope::Submit),
        // Methods added later must say what they need; until then, only admins.
        _ => Rule::Api(Scope::Admin),
    }
}

/// Tower layer authenticating every call against a [`Catalog`].
#[derive(Clone)]
pub struct AuthLayer {
    catalog: Arc<Catalog>,
}

impl AuthLayer {
    /// A layer checking tokens against `catalog`.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self { catalog }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            catalog: self.catalog.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    catalog: Arc<Catalog>,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match check(&self.catalog, &mut req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(e) => {
                let resp = tonic::Status::from(e).into_http::<tonic::body::Body>();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

fn check<B>(catalog: &Catalog, req: &mut http::Request<B>) -> Result<(), Error> {
    let rule = rule(req.uri().path());
    let token = bearer_header(req.headers().get("authorization"));
    let principal = match (rule, token) {
        (Rule::Open, _) | (Rule::Optional, None) => return Ok(()),
        (Rule::Optional, Some(t)) => match catalog.authenticate(t) {
            Ok(p) => p,
            Err(_) => return Ok(()),
        },
        (_, None) => {
            return Err(Error::Unauthenticated(format!(
                "{} needs a token: send metadata 'authorization: Bearer <token>' (scabbard login, or --token)",
                req.uri().path()
            )));
        }
        (_, Some(t)) => catalog.authenticate(t)?,
    };
    match (rule, principal.kind) {
        (Rule::Agent | Rule::AgentOrApi(_), TokenKind::Agent) | (Rule::Optional, _) => {}
        (Rule::AgentOrApi(_), TokenKind::Api) => {}
        (Rule::AgentOrApi(_), _) => {
            return Err(Error::PermissionDenied(format!(
                "{} needs an agent or API token; token {} is a registration token",
                req.uri().path(),
                principal.token_id
            )));
        }
        (Rule::Agent, _) => {
            return Err(Error::PermissionDenied(format!(
                "{} is for agents: it needs an agent token, not token {}",
                req.uri().path(),
                principal.token_id
            )));
        }
        (Rule::Api(_), TokenKind::Api) => {}
        (Rule::Api(_), kind) => {
            return Err(Error::PermissionDenied(format!(
                "{} needs an API token; token {} is a {} token",
                req.uri().path(),
                principal.token_id,
                match kind {
                    TokenKind::Agent => "agent",
                    TokenKind::Registration => "registration",
                    _ => "non-API",
                }
            )));
        }
        (Rule::Open, _) => {}
    }
    let needed = match rule {
        Rule::Api(scope) => Some(scope),
        Rule::AgentOrApi(scope) if principal.kind == TokenKind::Api => Some(scope),
        _ => None,
    };
    if let Some(scope) = needed
        && (principal.scope as i32) < scope as i32
    {
        return Err(Error::PermissionDenied(format!(
            "{} needs the {} scope; token {} ({}) has {}",
            req.uri().path(),
            scope_name(scope),
            principal.token_id,
            principal.name,
            scope_name(principal.scope)
        )));
    }
    req.extensions_mut().insert(principal);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_the_expected_rule() {
        assert_eq!(rule("/grpc.health.v1.Health/Check"), Rule::Open);
        assert_eq!(
            rule("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Rule::Open
        );
        assert_eq!(rule("/scabbard.v1.AgentService/Register"), Rule::Open);
        assert_eq!(rule("/scabbard.v1.AgentService/Session"), Rule::Agent);
        assert_eq!(rule("/scabbard.v1.AgentService/RotateToken"), Rule::Agent);
        assert_eq!(rule("/scabbard.v1.TaskService/Get"), Rule::Api(Scope::Read));
        assert_eq!(
            rule("/scabbard.v1.TaskService/Submit"),
            Rule::Api(Scope::Submit)
        );
        assert_eq!(
            rule("/scabbard.v1.TaskService/SubmitBatch"),
            Rule::Api(Scope::Submit)
        );
        assert_eq!(
            rule("/scabbard.v1.TaskService/Cancel"),
            Rule::Api(Scope::Submit)
        );
        assert_eq!(
            rule("/scabbard.v1.AdminService/ClusterStatus"),
            Rule::Optional
        );
        assert_eq!(
            rule("/scabbard.v1.AdminService/DrainAgent"),
            Rule::Api(Scope::Operator)
        );
        for m in ["UndrainAgent", "RemoveAgent"] {
            assert_eq!(
                rule(&format!("/scabbard.v1.AdminService/{m}")),
                Rule::Api(Scope::Operator)
            );
        }
        assert_eq!(
            rule("/scabbard.v1.AdminService/CreateToken"),
            Rule::Api(Scope::Admin)
        );
        assert_eq!(
            rule("/scabbard.v1.AdminService/Unknown"),
            Rule::Api(Scope::Admin)
        );
        assert_eq!(
            rule("/scabbard.v1.ProjectService/List"),
            Rule::Api(Scope::Read)
        );
        assert_eq!(
            rule("/scabbard.v1.ProjectService/Delete"),
            Rule::Api(Scope::Admin)
        );
        assert_eq!(rule("/nope"), Rule::Api(Scope::Read));
        for m in [
            "TaskService/Rerun",
            "WorkflowService/Rerun",
            "ScheduleService/Trigger",
            "ScheduleService/Update",
        ] {
            assert_eq!(
                rule(&format!("/scabbard.v1.{m}")),
                Rule::Api(Scope::Submit),
                "{m}"
            );
        }
        assert_eq!(rule("/scabbard.v1.ArtifactService/Upload"), Rule::Agent);
        assert_eq!(
            rule("/scabbard.v1.ArtifactService/Download"),
            Rule::AgentOrApi(Scope::Read)
        );
        assert_eq!(
            rule("/scabbard.v1.ArtifactService/Stat"),
            Rule::Api(Scope::Read)
        );
        assert_eq!(
            rule("/scabbard.v1.ArtifactService/List"),
            Rule::Api(Scope::Read)
        );
    }
}
