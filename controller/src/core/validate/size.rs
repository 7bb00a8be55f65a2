//! Byte limits of what the controller stores, checked up front so that no record it writes
//! can exceed the store's value limit: a spec or workflow over its limit is refused at
//! submit (`INVALID_ARGUMENT` naming the size, the limit and the config key), a result over
//! its limit ends the attempt FAILED with the same facts, and earlier attempts of a task
//! keep only a short message (no outputs), so a task record stays bounded however often it
//! is retried.

use prost::Message;
use scabbard_common::proto::{ErrorClass, Outcome, TaskResult, TaskSpec, WorkflowSpec};
use scabbard_common::{Error, Result};

use crate::config::ControllerConfig;

/// How much of an ended attempt's message its record keeps once a later attempt follows
/// (the final attempt keeps its result whole).
pub(crate) const ATTEMPT_MESSAGE_BYTES: usize = 1024;

/// Refuses a task spec (encoded, as it will be stored) over `max_spec_bytes`. `what`
/// names it in the message ("spec", "tasks[3] (build) spec").
pub(crate) fn check_spec(what: &str, spec: &TaskSpec, cfg: &ControllerConfig) -> Result<()> {
    let size = spec.encoded_len();
    if size > cfg.max_spec_bytes {
        return Err(Error::invalid(format!(
            "{what} is {size} bytes, over the limit of {} bytes (max_spec_bytes)",
            cfg.max_spec_bytes
        )));
    }
    Ok(())
}

/// Refuses a workflow over `max_workflow_bytes`, or with a node spec over `max_spec_bytes`.
pub(crate) fn check_workflow(spec: &WorkflowSpec, cfg: &ControllerConfig) -> Result<()> {
    let size = spec.encoded_len();
    if size > cfg.max_workflow_bytes {
        return Err(Error::invalid(format!(
            "the workflow is {size} bytes, over the limit of {} bytes (max_workflow_bytes)",
            cfg.max_workflow_bytes
        )));
    }
    for (i, t) in spec.tasks.iter().enumerate() {
        if let Some(s) = &t.spec {
            check_spec(&format!("tasks[{i}] ({}) spec", t.name), s, cfg)?;
        }
    }
    Ok(())
}

/// Total bytes of a result's outputs (names and values).
pub(crate) fn outputs_bytes(r: &TaskResult) -> usize {
    r.outputs.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// The result to record for a reported one: itself when within `max_result_bytes` and
/// `max_outputs_bytes`, else a small FAILED result (the task's own fault, so its retry
/// policy applies) saying which limit, how big, and the config key. Deterministic, so a
/// replayed report is recognised as the one recorded.
pub(crate) fn fit_result(r: TaskResult, cfg: &ControllerConfig) -> TaskResult {
    let outputs = outputs_bytes(&r);
    let why = if outputs > cfg.max_outputs_bytes {
        format!(
            "the attempt's {} outputs total {outputs} bytes, over the limit of {} bytes (max_outputs_bytes); outputs dropped",
            r.outputs.len(),
            cfg.max_outputs_bytes
        )
    } else {
        let size = r.encoded_len();
        if size <= cfg.max_result_bytes {
            return r;
        }
        format!(
            "the attempt's result is {size} bytes ({} outputs, {outputs} bytes of them; a message of {} bytes), over the limit of {} bytes (max_result_bytes); result dropped",
            r.outputs.len(),
            r.message.len(),
            cfg.max_result_bytes
        )
    };
    let was = match r.outcome() {
        Outcome::Succeeded => String::new(),
        o => format!(
            " (it ended {}: {})",
            o.as_str_name().trim_start_matches("OUTCOME_"),
            cut(&r.message, 256)
        ),
    };
    TaskResult {
        outcome: Outcome::Failed as i32,
        exit_code: r.exit_code,
        message: format!("{why}{was}"),
        error_class: ErrorClass::User as i32,
        outputs: Default::default(),
        artifacts: Vec::new(),
    }
}

/// What an ended attempt's record keeps once it is not the task's final result: its outcome,
/// exit code and class, the start of its message; no outputs.
pub(crate) fn compact_attempt_result(r: &mut TaskResult) {
    r.outputs.clear();
    if r.message.len() > ATTEMPT_MESSAGE_BYTES {
        r.message = cut(&r.message, ATTEMPT_MESSAGE_BYTES);
    }
}

/// `s` cut to at most `max` bytes on a character boundary, with a note of what was cut.
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &s[..end], s.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outputs: usize, each: usize) -> TaskResult {
        TaskResult {
            outcome: Outcome::Succeeded as i32,
            outputs: (0..outputs)
                .map(|i| (format!("out{i}"), "x".repeat(each)))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_result_within_the_limits_is_kept_whole() {
        let cfg = ControllerConfig::default();
        let r = result(4, 1000);
        assert_eq!(fit_result(r.clone(), &cfg), r);
    }

    #[test]
    fn oversized_outputs_fail_the_attempt_naming_size_limit_and_key() {
        let cfg = ControllerConfig::default();
        // The case: 120 path outputs of 15 KB.
        let r = fit_result(result(120, 15_000), &cfg);
        assert_eq!(r.outcome(), Outcome::Failed);
        assert_eq!(r.error_class(), ErrorClass::User);
        assert!(r.outputs.is_empty());
        assert!(r.encoded_len() < 1024, "{}", r.encoded_len());
        for part in ["120 outputs", "max_outputs_bytes", "131072"] {
            assert!(r.message.contains(part), "{part}: {}", r.message);
        }
        // Deterministic: a replay maps to the same record.
        assert_eq!(fit_result(result(120, 15_000), &cfg), r);
    }

    #[test]
    fn an_oversized_message_fails_the_attempt_on_max_result_bytes() {
        let cfg = ControllerConfig {
            max_result_bytes: 4096,
            max_outputs_bytes: 2048,
            ..Default::default()
        };
        let mut r = result(1, 10);
        r.outcome = Outcome::Failed as i32;
        r.message = "é".repeat(5000);
        let r = fit_result(r, &cfg);
        assert!(r.message.contains("max_result_bytes"), "{}", r.message);
        assert!(r.message.contains("ended FAILED"), "{}", r.message);
        assert!(r.encoded_len() < 1024);
    }

    #[test]
    fn compacting_keeps_a_bounded_message_and_no_outputs() {
        let mut r = result(3, 10);
        r.message = "ü".repeat(10_000);
        compact_attempt_result(&mut r);
        assert!(r.outputs.is_empty());
        assert!(
            r.message.len() <= ATTEMPT_MESSAGE_BYTES,
            "{}",
            r.message.len()
        );
        assert!(r.message.ends_with("bytes cut)"));
    }

    #[test]
    fn oversized_specs_and_workflows_are_refused_naming_the_key() {
        let cfg = ControllerConfig::default();
        let mut spec = TaskSpec::default();
        spec.env.insert("BIG".into(), "x".repeat(300 * 1024));
        let e = check_spec("spec", &spec, &cfg).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("max_spec_bytes"), "{e}");
        assert!(e.to_string().contains("262144"), "{e}");
        let wf = WorkflowSpec {
            tasks: (0..40)
                .map(|i| scabbard_common::proto::WorkflowTask {
                    name: format!("n{i}"),
                    spec: Some(TaskSpec {
                        env: [("V".to_string(), "y".repeat(250 * 1024))].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let e = check_workflow(&wf, &cfg).unwrap_err().to_string();
        assert!(e.contains("max_workflow_bytes"), "{e}");
    }
}
