//! The SDK's side: a `dagger_sdk::Query` pointed at one session, and what its errors mean.
//!
//! The SDK's own entry points find the engine through process-global environment
//! (`DAGGER_SESSION_PORT`/`TOKEN`) or start a session themselves (and may download a CLI).
//! We need neither: `Query`'s fields are public, so [`connect`] builds one over the SDK's
//! `DefaultGraphQLClient` with this session's port and token (POST
//! `http://127.0.0.1:{port}/query`, Basic auth `token:`). Concurrent tasks thus use their
//! own sessions without touching the environment.
//!
//! Every query goes through [`LoggedClient`], which logs it at debug level with the
//! attempt's secret values masked (`setSecret` carries a plaintext). The SDK itself logs
//! query text at trace level under `dagger_sdk`; the worker's log filter silences that
//! target (see `scabbard_common::logging`).

use std::sync::Arc;

use async_trait::async_trait;
use dagger_sdk::core::connect_params::ConnectParams;
use dagger_sdk::core::gql_client::GraphQlExtension;
use dagger_sdk::core::graphql_client::{
    DefaultGraphQLClient, DynGraphQLClient, GraphQLClient, GraphQLError,
};
use dagger_sdk::errors::DaggerError;
use dagger_sdk::{Query, Selection};

use super::cli::error_chain;
use crate::redact::Secrets;

/// A `Query` root over `client`.
pub(super) fn query_over(client: DynGraphQLClient) -> Query {
    Query {
        proc: None,
        selection: Selection::default(),
        graphql_client: client,
    }
}

/// A `Query` root for the session on `127.0.0.1:port`, logging through [`LoggedClient`].
pub(super) fn connect(port: u16, token: &str, secrets: Arc<Secrets>) -> Query {
    let params = ConnectParams::new(u64::from(port), token);
    let inner: DynGraphQLClient = Arc::new(DefaultGraphQLClient::new(
        &params,
        &dagger_sdk::Config::default(),
    ));
    query_over(Arc::new(LoggedClient { inner, secrets }))
}

/// Logs each query (secrets masked) before handing it to the real client.
pub(super) struct LoggedClient {
    pub(super) inner: DynGraphQLClient,
    pub(super) secrets: Arc<Secrets>,
}

#[async_trait]
impl GraphQLClient for LoggedClient {
    async fn query(&self, query: &str) -> Result<Option<serde_json::Value>, GraphQLError> {
        tracing::debug!(query = %self.secrets.redact_str(query), "dagger query");
        self.inner.query(query).await
    }
}

/// What went wrong in an SDK call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// A command in the container exited non-zero (only without `expect: Any`, or if the
    /// engine reports it anyway): the task's fault.
    Exec {
        exit_code: i32,
        stdout: String,
        stderr: String,
    },
    /// Anything else: the engine, the transport, the SDK.
    Engine(String),
}

impl Failure {
    /// Classifies an SDK error.
    pub(super) fn from_sdk(e: &DaggerError) -> Self {
        if let DaggerError::Query(GraphQLError::DomainError { fields, .. }) = e {
            for f in fields {
                if let Some(GraphQlExtension::ExecError {
                    exit_code,
                    stdout,
                    stderr,
                    ..
                }) = &f.extensions
                {
                    return Failure::Exec {
                        exit_code: *exit_code,
                        stdout: stdout.clone(),
                        stderr: stderr.clone(),
                    };
                }
            }
        }
        Failure::Engine(describe(e))
    }
}

/// A one-line account of an SDK error (the engine's messages included).
pub(super) fn describe(e: &DaggerError) -> String {
    match e {
        DaggerError::Query(GraphQLError::DomainError { fields, message }) => {
            let mut all: Vec<&str> = fields.iter().map(|f| f.message.as_str()).collect();
            if all.is_empty() {
                all.push(message);
            }
            format!("engine error: {}", all.join("; "))
        }
        DaggerError::Query(GraphQLError::HttpError(m)) => {
            format!("cannot reach the engine session: {}", m.trim())
        }
        other => error_chain(other),
    }
}
