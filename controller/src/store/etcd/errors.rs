//! How etcd-client failures become [`scabbard_common::Error`]s, and which of them a call may
//! retry. Connection trouble is `Unavailable` (callers retry those), compacted history
//! `FailedPrecondition`, unknown leases `NotFound`, requests etcd refuses `InvalidArgument`.

use etcd_client::Error as EtcdError;
use scabbard_common::Error;
use tonic::Code;

use crate::store::LeaseId;

/// Which failures a call may send again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// Reads, keep-alives, watch creation: any transient failure.
    Idempotent,
    /// Writes: only failures that prove etcd never received the request, so a retried
    /// compare-and-swap cannot apply twice (or report a loss it actually won).
    NotSent,
}

impl Retry {
    pub(super) fn allows(self, e: &EtcdError) -> bool {
        match self {
            Retry::NotSent => never_sent(e),
            Retry::Idempotent => never_sent(e) || transient(e),
        }
    }
}

/// A status's message and its sources, joined: tonic hides the interesting part
/// (connection refused) in the source chain.
fn describe(s: &tonic::Status) -> String {
    with_sources(s.message().to_string(), std::error::Error::source(s))
}

/// An error and its sources, joined.
fn chain(e: &dyn std::error::Error) -> String {
    with_sources(e.to_string(), e.source())
}

fn with_sources(mut out: String, mut cur: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

/// etcd certainly did not receive the request: the connection could not be made, or the
/// member refused it before proposing it.
fn never_sent(e: &EtcdError) -> bool {
    match e {
        EtcdError::TransportError(_) => true,
        EtcdError::GRpcStatus(s) => {
            let text = describe(s);
            match s.code() {
                Code::Unavailable => {
                    text.contains("no leader")
                        || text.contains("tcp connect error")
                        || text.contains("error trying to connect")
                        || text.contains("Connection refused")
                }
                Code::ResourceExhausted => text.contains("too many requests"),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Failures that may pass: etcd down or electing, a connection reset, a slow member.
fn transient(e: &EtcdError) -> bool {
    match e {
        EtcdError::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        EtcdError::IoError(_) | EtcdError::WatchError(_) => true,
        EtcdError::LeaseKeepAliveError(m) => !m.contains("not found"),
        _ => false,
    }
}

/// Wrong user or password (at connect time).
pub(super) fn is_auth_failure(e: &EtcdError) -> bool {
    matches!(e, EtcdError::GRpcStatus(s)
        if s.message().contains("authentication failed")
            || matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied))
}

/// Whether etcd refused a revision as compacted.
pub(super) fn is_compacted(s: &tonic::Status) -> bool {
    s.code() == Code::OutOfRange && s.message().contains("compacted")
}

/// Maps a failed call (`what`, e.g. "a transaction") to our error. `lease` names the lease
/// in a `NotFound`.
pub(super) fn map(e: EtcdError, endpoints: &str, what: &str, lease: Option<LeaseId>) -> Error {
    let lease_not_found = |detail: &str| match lease {
        Some(l) => Error::not_found("lease", l.to_string()),
        None => Error::not_found("lease", detail.to_string()),
    };
    let unavailable = |detail: String| {
        Error::Unavailable(format!("etcd at {endpoints}: {what} failed: {detail}"))
    };
    match e {
        EtcdError::GRpcStatus(s) => {
            let msg = s.message().to_string();
            match s.code() {
                Code::NotFound => lease_not_found(&msg),
                Code::OutOfRange if is_compacted(&s) => Error::FailedPrecondition(format!(
                    "{what}: etcd has compacted that history ({msg})"
                )),
                Code::InvalidArgument | Code::OutOfRange => {
                    Error::invalid(format!("etcd refused {what}: {msg}"))
                }
                Code::ResourceExhausted if msg.contains("too many requests") => unavailable(msg),
                Code::ResourceExhausted => {
                    Error::ResourceExhausted(format!("etcd refused {what}: {msg}"))
                }
                Code::PermissionDenied | Code::Unauthenticated => Error::Internal(format!(
                    "etcd at {endpoints} refused {what}: {msg} (check the roles of etcd.username)"
                )),
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Aborted => unavailable(describe(&s)),
                _ => Error::Internal(format!("etcd at {endpoints}: {what}: {}", describe(&s))),
            }
        }
        EtcdError::LeaseKeepAliveError(m) if m.contains("not found") => lease_not_found(&m),
        EtcdError::InvalidArgs(m) => Error::invalid(format!("etcd: {what}: {m}")),
        other => unavailable(chain(&other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, msg: &str) -> EtcdError {
        EtcdError::GRpcStatus(tonic::Status::new(code, msg))
    }

    #[test]
    fn writes_retry_only_what_never_reached_etcd() {
        let no_leader = status(Code::Unavailable, "etcdserver: no leader");
        let timed_out = status(Code::Unavailable, "etcdserver: request timed out");
        assert!(Retry::NotSent.allows(&no_leader));
        assert!(!Retry::NotSent.allows(&timed_out));
        assert!(Retry::Idempotent.allows(&timed_out));
        let not_found = EtcdError::LeaseKeepAliveError("lease not found".into());
        assert!(!Retry::Idempotent.allows(&not_found));
        assert!(!Retry::Idempotent.allows(&status(Code::InvalidArgument, "bad")));
    }

    #[test]
    fn codes_map_to_our_errors() {
        let m = |e| map(e, "http://x:1", "a get", Some(7));
        assert!(matches!(
            m(status(Code::NotFound, "etcdserver: requested lease not found")),
            Error::NotFound { kind: "lease", ref id } if id == "7"
        ));
        assert!(matches!(
            m(status(
                Code::OutOfRange,
                "mvcc: required revision has been compacted"
            )),
            Error::FailedPrecondition(_)
        ));
        assert!(matches!(
            m(status(
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request"
            )),
            Error::InvalidArgument(_)
        ));
        let e = m(status(Code::Unavailable, "etcdserver: no leader"));
        assert!(
            matches!(e, Error::Unavailable(ref s) if s.contains("http://x:1")),
            "{e}"
        );
        assert!(matches!(
            m(EtcdError::LeaseKeepAliveError("lease not found".into())),
            Error::NotFound { .. }
        ));
    }
}
