//! Retry decisions: whether a failed attempt runs again under the task's retry policy, and
//! after how long (the shared jittered backoff of `scabbard_common::backoff`).

use std::time::Duration;

use scabbard_common::backoff::Backoff;
use scabbard_common::proto::{ErrorClass, FailureClass, Outcome, RetryPolicy, TaskResult};

/// The failure class of a finished attempt (None for success or cancellation).
pub(crate) fn class_of(r: &TaskResult) -> Option<FailureClass> {
    match r.outcome() {
        Outcome::TimedOut => Some(FailureClass::Timeout),
        Outcome::Failed | Outcome::Unspecified => {
            Some(if r.error_class() == ErrorClass::Infrastructure {
                FailureClass::Infrastructure
            } else {
                FailureClass::ExitCode
            })
        }
        Outcome::Succeeded | Outcome::Cancelled => None,
    }
}

/// For a user failure (exit code or timeout): the delay before the next attempt, or None
/// when the policy does not retry it. `user_failures` counts this failure.
pub(crate) fn user_retry(
    policy: Option<&RetryPolicy>,
    result: &TaskResult,
    user_failures: u32,
) -> Option<Duration> {
    let p = policy?;
    let class = class_of(result)?;
    if class == FailureClass::Infrastructure || user_failures >= p.max_attempts.max(1) {
        return None;
    }
    let retried = if p.retry_on.is_empty() {
        matches!(class, FailureClass::ExitCode | FailureClass::Timeout)
    } else {
        p.retry_on.contains(&(class as i32))
    };
    if !retried {
        return None;
    }
    if class == FailureClass::ExitCode
        && !p.retry_exit_codes.is_empty()
        && !p.retry_exit_codes.contains(&result.exit_code)
    {
        return None;
    }
    Some(Backoff::from_policy(p).delay(user_failures.saturating_sub(1)))
}

/// For an infrastructure failure that will be retried: the delay before the task is
/// queued again (none without a policy: another agent may take it at once).
pub(crate) fn infra_delay(policy: Option<&RetryPolicy>, infra_failures: u32) -> Option<Duration> {
    let p = policy?;
    Some(Backoff::from_policy(p).delay(infra_failures.saturating_sub(1)))
}

/// How many infrastructure failures are retried: none when the policy lists classes in
/// `retry_on` without INFRASTRUCTURE; else the policy's bound, else the spec's, else the
/// controller's default. An explicit 0 means none.
pub(crate) fn max_infra(policy: Option<&RetryPolicy>, spec_max: Option<u32>, default: u32) -> u32 {
    if let Some(p) = policy
        && !p.retry_on.is_empty()
        && !p.retry_on.contains(&(FailureClass::Infrastructure as i32))
    {
        return 0;
    }
    policy
        .and_then(|p| p.max_infra_retries)
        .or(spec_max)
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(code: i32) -> TaskResult {
        TaskResult {
            outcome: Outcome::Failed as i32,
            exit_code: code,
            error_class: ErrorClass::User as i32,
            ..Default::default()
        }
    }

    fn policy(max: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: max,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            ..Default::default()
        }
    }

    #[test]
    fn exit_codes_retry_up_to_max_attempts() {
        let p = policy(3);
        assert!(user_retry(Some(&p), &failed(1), 1).is_some());
        assert!(user_retry(Some(&p), &failed(1), 2).is_some());
        assert!(user_retry(Some(&p), &failed(1), 3).is_none());
        assert!(user_retry(None, &failed(1), 1).is_none());
        assert!(user_retry(Some(&policy(0)), &failed(1), 1).is_none());
    }

    #[test]
    fn only_listed_codes_and_classes_retry() {
        let mut p = policy(5);
        p.retry_exit_codes = vec![75];
        assert!(user_retry(Some(&p), &failed(75), 1).is_some());
        assert!(user_retry(Some(&p), &failed(2), 1).is_none());
        let timeout = TaskResult {
            outcome: Outcome::TimedOut as i32,
            ..Default::default()
        };
        assert!(user_retry(Some(&p), &timeout, 1).is_some());
        p.retry_on = vec![FailureClass::ExitCode as i32];
        assert!(user_retry(Some(&p), &timeout, 1).is_none());
        let ok = TaskResult {
            outcome: Outcome::Succeeded as i32,
            ..Default::default()
        };
        assert!(user_retry(Some(&p), &ok, 1).is_none());
    }

    #[test]
    fn delays_grow_within_the_policy() {
        let p = policy(10);
        for n in 1..10 {
            let d = user_retry(Some(&p), &failed(1), n).unwrap();
            assert!(d <= Duration::from_millis(1000), "{d:?}");
        }
        assert_eq!(max_infra(Some(&RetryPolicy::default()), None, 3), 3);
        assert_eq!(max_infra(None, Some(7), 3), 7);
        assert_eq!(
            max_infra(
                Some(&RetryPolicy {
                    max_infra_retries: Some(2),
                    ..Default::default()
                }),
                Some(7),
                3
            ),
            2
        );
    }

    #[test]
    fn zero_means_no_infrastructure_retry_and_retry_on_decides() {
        // An explicit 0 is none, on the task or in the policy; unset is the default.
        assert_eq!(max_infra(None, Some(0), 3), 0);
        assert_eq!(max_infra(None, None, 3), 3);
        let zero = RetryPolicy {
            max_infra_retries: Some(0),
            ..Default::default()
        };
        assert_eq!(max_infra(Some(&zero), Some(5), 3), 0);
        // retry_on listing classes without INFRASTRUCTURE: infrastructure failures end it.
        let exit_only = RetryPolicy {
            retry_on: vec![FailureClass::ExitCode as i32],
            max_infra_retries: Some(4),
            ..Default::default()
        };
        assert_eq!(max_infra(Some(&exit_only), None, 3), 0);
        // Listing it retries them, up to the policy's bound (or the default).
        let infra = RetryPolicy {
            retry_on: vec![FailureClass::Infrastructure as i32],
            ..Default::default()
        };
        assert_eq!(max_infra(Some(&infra), None, 3), 3);
        let infra2 = RetryPolicy {
            max_infra_retries: Some(2),
            ..infra.clone()
        };
        assert_eq!(max_infra(Some(&infra2), None, 3), 2);
        // ... and an infrastructure failure is never retried as a user failure.
        let lost = TaskResult {
            outcome: Outcome::Failed as i32,
            error_class: ErrorClass::Infrastructure as i32,
            ..Default::default()
        };
        assert!(user_retry(Some(&infra), &lost, 1).is_none());
    }
}
