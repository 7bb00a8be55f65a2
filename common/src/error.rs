//! The one error type of Scabbard. Every variant knows its gRPC code; the conversion to
//! `tonic::Status` lives here and nowhere else.

use tonic::{Code, Status};

/// Result alias using [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Domain error carrying the gRPC code a caller should see.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// What was looked up ("task", "agent").
        kind: &'static str,
        /// The id that was asked for.
        id: String,
    },
    /// The named thing does not exist; the message names it and says what does exist
    /// (`template "nope" not found (available: a, b)`).
    #[error("{0}")]
    NotFoundListing(String),
    /// The thing exists already (idempotency conflicts, duplicate names).
    #[error("{0}")]
    AlreadyExists(String),
    /// The operation is not allowed in the current state (cancel a finished task, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A report from an attempt whose fencing token is no longer current.
    #[error("stale attempt: {0}")]
    StaleAttempt(String),
    /// Missing or bad credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the right to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was hit (message size, queue quota, rate).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A rate limit or concurrency limit was hit; retry after the given time.
    #[error("{msg} (retry after {} ms)", .retry_after.as_millis())]
    RateLimited {
        /// What limit, and whose.
        msg: String,
        /// When a retry can succeed (sent as metadata `retry-after-ms`).
        retry_after: std::time::Duration,
    },
    /// The store or another dependency is unavailable; retrying may help.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A compare-and-swap lost to a concurrent writer.
    #[error("conflict: {0}")]
    Conflict(String),
    /// This controller is not the leader; `leader` is where to go instead (if known).
    #[error("{}", not_leader_message(.leader))]
    NotLeader {
        /// The leader's gRPC address, when one is elected.
        leader: Option<String>,
    },
    /// A bug or an unexpected failure.
    #[error("internal error: {0}")]
    Internal(String),
}

fn not_leader_message(leader: &Option<String>) -> String {
    match leader {
        Some(l) => format!(
            "this controller is not the leader; the leader is at {l} (metadata {LEADER_KEY})",
            LEADER_KEY = crate::LEADER_METADATA_KEY
        ),
        None => {
            "this controller is not the leader and no leader is elected yet; retry shortly".into()
        }
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound {
            kind,
            id: id.into(),
        }
    }

    /// Shorthand for [`Error::Internal`].
    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Self::Internal(msg.to_string())
    }

    /// The gRPC code callers see for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound { .. } | Error::NotFoundListing(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) | Error::StaleAttempt(_) => Code::FailedPrecondition,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) | Error::RateLimited { .. } => Code::ResourceExhausted,
            Error::Unavailable(_) | Error::NotLeader { .. } => Code::Unavailable,
            Error::Conflict(_) => Code::Aborted,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let mut status = Status::new(e.code(), e.to_string());
        if let Error::NotLeader { leader: Some(l) } = &e
            && let Ok(v) = l.parse()
        {
            status.metadata_mut().insert(crate::LEADER_METADATA_KEY, v);
        }
        if let Error::RateLimited { retry_after, .. } = &e {
            let ms = retry_after.as_millis().max(1);
            if let Ok(v) = ms.to_string().parse() {
                status.metadata_mut().insert(RETRY_AFTER_MS_KEY, v);
            }
        }
        status
    }
}

/// Metadata key of the retry hint on `RESOURCE_EXHAUSTED` answers (milliseconds).
pub const RETRY_AFTER_MS_KEY: &str = "retry-after-ms";

/// The canonical name of a gRPC code (`NOT_FOUND`): JSON errors, metric labels, CLI output.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The retry hint carried by a rate-limited status, if any.
pub fn retry_after(s: &Status) -> Option<std::time::Duration> {
    s.metadata()
        .get(RETRY_AFTER_MS_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()
        .map(std::time::Duration::from_millis)
}

/// The leader address carried by a redirect status, if any.
pub fn leader_hint(s: &Status) -> Option<String> {
    if s.code() != Code::Unavailable {
        return None;
    }
    s.metadata()
        .get(crate::LEADER_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(msg),
            Code::NotFound => Error::NotFound {
                kind: "resource",
                id: msg,
            },
            Code::AlreadyExists => Error::AlreadyExists(msg),
            Code::FailedPrecondition => Error::FailedPrecondition(msg),
            Code::Unauthenticated => Error::Unauthenticated(msg),
            Code::PermissionDenied => Error::PermissionDenied(msg),
            Code::ResourceExhausted => Error::ResourceExhausted(msg),
            Code::Unavailable if leader_hint(&s).is_some() => Error::NotLeader {
                leader: leader_hint(&s),
            },
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Error::Unavailable(msg),
            Code::Aborted => Error::Conflict(msg),
            _ => Error::Internal(format!("{}: {msg}", s.code())),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(format!("io: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_survive_the_round_trip_through_status() {
        let cases = [
            Error::invalid("x"),
            Error::not_found("task", "t1"),
            Error::Unauthenticated("no".into()),
            Error::ResourceExhausted("full".into()),
            Error::StaleAttempt("old".into()),
        ];
        for e in cases {
            let code = e.code();
            let status: Status = e.into();
            assert_eq!(status.code(), code);
        }
    }

    #[test]
    fn not_leader_carries_the_leader_address_in_metadata() {
        let s: Status = Error::NotLeader {
            leader: Some("10.0.0.2:7400".into()),
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(leader_hint(&s).as_deref(), Some("10.0.0.2:7400"));
        assert!(matches!(
            Error::from(s),
            Error::NotLeader { leader: Some(_) }
        ));
        let s: Status = Error::NotLeader { leader: None }.into();
        assert_eq!(leader_hint(&s), None);
    }

    #[test]
    fn not_found_names_the_kind_and_id() {
        let s: Status = Error::not_found("task", "abc").into();
        assert_eq!(s.message(), "task \"abc\" not found");
    }
}
