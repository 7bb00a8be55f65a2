//! Checks of client input, each failure naming the field and what would be accepted.

use scabbard_common::proto::{TaskSpec, task_spec::Kind};
use scabbard_common::{Error, Result};

use crate::config::ControllerConfig;

pub(crate) mod artifacts;
pub(crate) mod extras;
pub(crate) mod size;

/// Largest number of env vars / labels / argv entries.
const MAX_ENTRIES: usize = 1024;
/// Largest single string (bytes).
const MAX_STRING: usize = 64 * 1024;

/// Validates a submitted spec and fills defaults (timeout).
pub(crate) fn task_spec(spec: &mut TaskSpec, cfg: &ControllerConfig) -> Result<()> {
    match spec.kind.as_ref() {
        None => {
            return Err(Error::invalid(
                "spec.kind is required: set spec.shell, spec.container, spec.dagger_call or spec.noop",
            ));
        }
        Some(Kind::Shell(sh)) => {
            if sh.command.is_empty() || sh.command[0].trim().is_empty() {
                return Err(Error::invalid(
                    "spec.shell.command is empty: give the program and its arguments, e.g. [\"sh\", \"-c\", \"make test\"]",
                ));
            }
            if sh.command.len() > MAX_ENTRIES {
                return Err(Error::invalid(format!(
                    "spec.shell.command has {} arguments; at most {MAX_ENTRIES}",
                    sh.command.len()
                )));
            }
            if let Some(a) = sh.command.iter().find(|a| a.contains('\0')) {
                return Err(Error::invalid(format!(
                    "spec.shell.command argument {a:?} contains a NUL byte"
                )));
            }
        }
        Some(Kind::Noop(_)) => {}
        Some(Kind::Container(c)) => extras::container(c)?,
        Some(Kind::DaggerCall(d)) => extras::dagger_call(d)?,
    }
    extras::policies(spec)?;
    artifacts::check(spec)?;
    extras::output_sources(spec)?;
    if spec.name.len() > 256 {
        return Err(Error::invalid("spec.name is longer than 256 bytes"));
    }
    check_map("spec.env", &spec.env, true)?;
    check_map("spec.secret_env", &spec.secret_env, true)?;
    if let Some(k) = spec.secret_env.keys().find(|k| spec.env.contains_key(*k)) {
        return Err(Error::invalid(format!(
            "{k:?} is in both spec.env and spec.secret_env: give it in one of them"
        )));
    }
    if let Some(k) = spec
        .secret_env
        .iter()
        .find_map(|(k, v)| (v == crate::sealed::MASK).then_some(k))
    {
        return Err(Error::invalid(format!(
            "spec.secret_env[{k:?}] is {:?}, the mask the API shows in place of secrets: give the real value",
            crate::sealed::MASK
        )));
    }
    check_map("spec.labels", &spec.labels, false)?;
    if let Some(req) = &spec.requirements {
        check_map("spec.requirements.labels", &req.labels, false)?;
        if let Some(c) = req.capabilities.iter().find(|c| c.trim().is_empty()) {
            return Err(Error::invalid(format!(
                "spec.requirements.capabilities contains an empty entry ({c:?})"
            )));
        }
    }
    if !(-1000..=1000).contains(&spec.priority) {
        return Err(Error::invalid(format!(
            "spec.priority {} is out of range -1000..=1000",
            spec.priority
        )));
    }
    if spec.timeout_ms == 0 {
        spec.timeout_ms = cfg.default_task_timeout_ms;
    } else if spec.timeout_ms > cfg.max_task_timeout_ms {
        return Err(Error::invalid(format!(
            "spec.timeout_ms {} ({}) exceeds the maximum {} ({}; max_task_timeout_ms in the controller config)",
            spec.timeout_ms,
            scabbard_common::time::human_ms(spec.timeout_ms),
            cfg.max_task_timeout_ms,
            scabbard_common::time::human_ms(cfg.max_task_timeout_ms)
        )));
    }
    if spec.max_infra_retries.is_some_and(|n| n > 100) {
        return Err(Error::invalid("spec.max_infra_retries must be at most 100"));
    }
    Ok(())
}

fn check_map(
    field: &str,
    map: &std::collections::HashMap<String, String>,
    env: bool,
) -> Result<()> {
    if map.len() > MAX_ENTRIES {
        return Err(Error::invalid(format!(
            "{field} has {} entries; at most {MAX_ENTRIES}",
            map.len()
        )));
    }
    for (k, v) in map {
        if k.is_empty() {
            return Err(Error::invalid(format!("{field} has an empty key")));
        }
        if k.len() > 256 || v.len() > MAX_STRING {
            return Err(Error::invalid(format!("{field}[{k:?}] is too long")));
        }
        if k.contains('\0') || v.contains('\0') {
            return Err(Error::invalid(format!(
                "{field}[{k:?}] contains a NUL byte"
            )));
        }
        if env && k.contains('=') {
            return Err(Error::invalid(format!(
                "{field} key {k:?} contains '=': environment variable names cannot"
            )));
        }
    }
    Ok(())
}

/// Validates an id given by a client (task or agent id).
pub(crate) fn id(kind: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(format!("{kind} id is required")));
    }
    if id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::invalid(format!(
            "{kind} id {id:?} is malformed (expected letters, digits, '-' or '_')"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use scabbard_common::proto::ShellTask;

    fn shell(cmd: &[&str]) -> TaskSpec {
        TaskSpec {
            kind: Some(Kind::Shell(ShellTask {
                command: cmd.iter().map(|s| s.to_string()).collect(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn empty_command_and_missing_kind_are_refused_with_the_field_name() {
        let cfg = ControllerConfig::default();
        let e = task_spec(&mut shell(&[]), &cfg).unwrap_err();
        assert!(e.to_string().contains("spec.shell.command"), "{e}");
        let e = task_spec(&mut TaskSpec::default(), &cfg).unwrap_err();
        assert!(e.to_string().contains("spec.kind"), "{e}");
    }

    #[test]
    fn default_timeout_is_filled_and_excess_refused() {
        let cfg = ControllerConfig::default();
        let mut s = shell(&["true"]);
        task_spec(&mut s, &cfg).unwrap();
        assert_eq!(s.timeout_ms, cfg.default_task_timeout_ms);
        s.timeout_ms = cfg.max_task_timeout_ms + 1;
        assert!(task_spec(&mut s, &cfg).is_err());
    }

    #[test]
    fn env_names_with_equals_are_refused() {
        let cfg = ControllerConfig::default();
        let mut s = shell(&["true"]);
        s.env.insert("A=B".into(), "x".into());
        assert!(
            task_spec(&mut s, &cfg)
                .unwrap_err()
                .to_string()
                .contains("'='")
        );
    }

    #[test]
    fn secret_env_is_checked_like_env_and_never_shares_a_key_with_it() {
        let cfg = ControllerConfig::default();
        let mut s = shell(&["true"]);
        s.secret_env.insert("TOKEN".into(), "hunter2".into());
        task_spec(&mut s, &cfg).unwrap();
        for (k, v, expect) in [
            ("A=B", "x", "'='"),
            ("", "x", "empty key"),
            ("NUL", "a\0b", "NUL"),
            ("BIG", &"x".repeat(64 * 1024 + 1), "too long"),
            ("MASKED", "***", "real value"),
        ] {
            let mut s = shell(&["true"]);
            s.secret_env.insert(k.into(), v.into());
            let e = task_spec(&mut s, &cfg).unwrap_err().to_string();
            assert!(e.contains(expect) && e.contains("secret_env"), "{k}: {e}");
        }
        s.secret_env.insert("MAX".into(), "x".repeat(64 * 1024));
        task_spec(&mut s, &cfg).unwrap();
        s.env.insert("TOKEN".into(), "plain".into());
        let e = task_spec(&mut s, &cfg).unwrap_err().to_string();
        assert!(e.contains("both"), "{e}");
    }

    #[test]
    fn ids_are_checked() {
        assert!(id("task", "").is_err());
        assert!(id("task", "../etc").is_err());
        assert!(id("task", "01jabc").is_ok());
    }
}
