//! The CLI's exit codes (docs/cli.md, "Exit codes"): the work's outcome (0, 1, or a task's
//! own exit code) outside the range 64–78, which is reserved for the CLI's own failures
//! (sysexits style), so `scabbard submit --wait -- false` (1) and a refused call (65…78)
//! never look alike. Errors are classified here, by the gRPC code of a refused call
//! ([`Refused`]) or by a marker the command attached ([`Failure`]).

use tonic::Code;

/// Usage error: unknown flag, bad value (e.g. a duration without a unit).
pub(crate) const USAGE: u8 = 64;
/// The controller refused the input (INVALID_ARGUMENT, FAILED_PRECONDITION,
/// ALREADY_EXISTS, OUT_OF_RANGE, ABORTED).
pub(crate) const DATA: u8 = 65;
/// Not found (NOT_FOUND).
pub(crate) const NOT_FOUND: u8 = 66;
/// No controller reachable, UNAVAILABLE, or `status`: no leader / unhealthy store.
pub(crate) const UNAVAILABLE: u8 = 69;
/// Any other failure of the CLI (a local file, an unexpected answer, INTERNAL).
pub(crate) const SOFTWARE: u8 = 70;
/// Try again later: RESOURCE_EXHAUSTED after the retries, a deadline (`--timeout`).
pub(crate) const TEMPFAIL: u8 = 75;
/// No token, a refused token, or a missing permission.
pub(crate) const NOPERM: u8 = 77;
/// Local configuration: the credentials file, an unknown context.
pub(crate) const CONFIG: u8 = 78;
/// A waited-for task exited with a code in 64–78 (the code itself is printed).
pub(crate) const TASK_RESERVED: u8 = 79;
/// Interrupted (Ctrl-C / SIGINT) while waiting or following.
pub(crate) const INTERRUPTED: u8 = 130;

/// A call the controller refused, with its code (its `Display` is the CLI's message).
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) code: Code,
    pub(crate) text: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Refused {}

/// A local failure with a chosen exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) text: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Failure {}

/// An error exiting with `code`.
pub(crate) fn fail(code: u8, text: impl Into<String>) -> anyhow::Error {
    Failure {
        code,
        text: text.into(),
    }
    .into()
}

/// The exit code of a gRPC code.
pub(crate) fn of_code(c: Code) -> u8 {
    match c {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Aborted => DATA,
        Code::NotFound => NOT_FOUND,
        Code::Unavailable => UNAVAILABLE,
        Code::ResourceExhausted | Code::DeadlineExceeded | Code::Cancelled => TEMPFAIL,
        Code::Unauthenticated | Code::PermissionDenied => NOPERM,
        _ => SOFTWARE,
    }
}

/// The exit code for a command's error.
pub(crate) fn of_error(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.code;
        }
        if let Some(r) = cause.downcast_ref::<Refused>() {
            return of_code(r.code);
        }
        if let Some(s) = cause.downcast_ref::<tonic::Status>() {
            return of_code(s.code());
        }
        if let Some(s) = cause.downcast_ref::<scabbard_common::Error>() {
            return of_code(s.code());
        }
        if cause.downcast_ref::<tonic::transport::Error>().is_some() {
            return UNAVAILABLE;
        }
    }
    SOFTWARE
}

/// The CLI's exit code for a task that failed with its own exit code `n` (1–255): the
/// same, except in the reserved range.
pub(crate) fn of_task(n: i32) -> u8 {
    match n {
        64..=78 => TASK_RESERVED,
        1..=255 => n as u8,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_tasks_never_share_a_code() {
        let e = anyhow::Error::from(Refused {
            code: Code::NotFound,
            text: "x".into(),
        })
        .context("getting a task");
        assert_eq!(of_error(&e), NOT_FOUND);
        assert_eq!(of_error(&fail(CONFIG, "no such context")), CONFIG);
        assert_eq!(of_error(&anyhow::anyhow!("disk full")), SOFTWARE);
        assert_eq!(of_task(1), 1);
        assert_eq!(of_task(3), 3);
        assert_eq!(of_task(70), TASK_RESERVED);
        assert_eq!(of_task(0), 1);
        for c in [
            USAGE,
            DATA,
            NOT_FOUND,
            UNAVAILABLE,
            SOFTWARE,
            TEMPFAIL,
            NOPERM,
            CONFIG,
        ] {
            assert!((64..=78).contains(&c));
        }
    }
}
