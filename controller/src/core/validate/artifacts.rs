//! Checks of what a task produces and consumes as artifacts (`spec.artifacts`,
//! `spec.inputs`) and of the forms an input's `from` may take. Where the referenced artifact
//! exists is checked elsewhere: against the workflow's nodes at submit (`workflow::validate`)
//! or against the finished task for a plain task's `<task id>/<name>` (the core's submit).
//! An input's `artifact` is never taken from the client: the controller always overwrites
//! it with what `from` resolves to.

use std::collections::HashSet;

use scabbard_common::proto::{TaskSpec, task_spec::Kind};
use scabbard_common::{Error, Result};

use super::extras::output_name_ok;

/// Most artifacts a task may declare, and most inputs it may take.
pub(crate) const MAX_ARTIFACTS: usize = 64;

/// What an input's `from` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InputSource {
    /// `${{ tasks.<node>.artifacts.<name> }}`: an ancestor node of the same workflow.
    Node { node: String, name: String },
    /// `<task id>/<name>`: an artifact of a succeeded task of the same project.
    Task { task_id: String, name: String },
}

/// Parses an input's `from`.
pub(crate) fn parse_from(from: &str) -> std::result::Result<InputSource, String> {
    let s = from.trim();
    if let Some(inner) = s.strip_prefix("${{").and_then(|r| r.strip_suffix("}}")) {
        let parts: Vec<&str> = inner.trim().split('.').collect();
        return match parts.as_slice() {
            ["tasks", node, "artifacts", name] if !node.is_empty() && output_name_ok(name) => {
                Ok(InputSource::Node {
                    node: node.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!(
                "{from:?} is not an artifact reference: write ${{{{ tasks.<task>.artifacts.<name> }}}}"
            )),
        };
    }
    if s.contains("${{") {
        return Err(format!(
            "{from:?}: an artifact reference must be the whole value, ${{{{ tasks.<task>.artifacts.<name> }}}}"
        ));
    }
    match s.split_once('/') {
        Some((task_id, name)) if id_ok(task_id) && output_name_ok(name) => Ok(InputSource::Task {
            task_id: task_id.to_string(),
            name: name.to_string(),
        }),
        _ => Err(format!(
            "{from:?} is neither ${{{{ tasks.<task>.artifacts.<name> }}}} (in a workflow) nor <task id>/<artifact name>"
        )),
    }
}

fn id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks `spec.artifacts` and `spec.inputs` (forms, names, paths).
pub(crate) fn check(spec: &TaskSpec) -> Result<()> {
    if spec.artifacts.is_empty() && spec.inputs.is_empty() {
        return Ok(());
    }
    let container = match spec.kind.as_ref() {
        Some(Kind::Container(_)) => true,
        Some(Kind::Shell(_)) => false,
        _ => {
            return Err(Error::invalid(
                "spec.artifacts and spec.inputs are for shell and container tasks only",
            ));
        }
    };
    for (field, n) in [
        ("spec.artifacts", spec.artifacts.len()),
        ("spec.inputs", spec.inputs.len()),
    ] {
        if n > MAX_ARTIFACTS {
            return Err(Error::invalid(format!(
                "{field} has {n} entries; at most {MAX_ARTIFACTS}"
            )));
        }
    }
    let mut names = HashSet::new();
    for (i, a) in spec.artifacts.iter().enumerate() {
        if !output_name_ok(&a.name) {
            return Err(Error::invalid(format!(
                "spec.artifacts[{i}].name {:?} must be 1..128 letters, digits, '_', '-' or '.'",
                a.name
            )));
        }
        if a.name == "." || a.name == ".." {
            return Err(Error::invalid(format!(
                "spec.artifacts[{i}].name {:?} is reserved",
                a.name
            )));
        }
        if !names.insert(a.name.as_str()) {
            return Err(Error::invalid(format!(
                "spec.artifacts names {:?} twice",
                a.name
            )));
        }
        path(&format!("spec.artifacts[{i}].path"), &a.path, container)?;
    }
    let mut places = HashSet::new();
    for (i, input) in spec.inputs.iter().enumerate() {
        parse_from(&input.from)
            .map_err(|why| Error::invalid(format!("spec.inputs[{i}].from: {why}")))?;
        path(&format!("spec.inputs[{i}].path"), &input.path, container)?;
        let normal = input.path.trim_end_matches('/').to_string();
        if !places.insert(normal) {
            return Err(Error::invalid(format!(
                "spec.inputs[{i}].path {:?} is used by another input",
                input.path
            )));
        }
    }
    Ok(())
}

/// A container path (absolute) or a work-dir path (relative, never leaving it).
fn path(field: &str, p: &str, container: bool) -> Result<()> {
    if p.is_empty() || p.len() > 4096 || p.contains('\0') {
        return Err(Error::invalid(format!(
            "{field} {p:?} must be a non-empty path"
        )));
    }
    if container {
        if !p.starts_with('/') || p.trim_end_matches('/').is_empty() {
            return Err(Error::invalid(format!(
                "{field} {p:?} must be an absolute path in the container (not /)"
            )));
        }
    } else if p.starts_with('/') || p.split('/').any(|c| c == "..") || p.trim_matches('/') == "." {
        return Err(Error::invalid(format!(
            "{field} {p:?} must be relative to the task's working directory, without '..'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use scabbard_common::proto::{ArtifactInput, ArtifactSpec, ContainerTask, NoopTask, ShellTask};

    fn shell() -> TaskSpec {
        TaskSpec {
            kind: Some(Kind::Shell(ShellTask {
                command: vec!["true".into()],
            })),
            ..Default::default()
        }
    }

    fn artifact(name: &str, path: &str) -> ArtifactSpec {
        ArtifactSpec {
            name: name.into(),
            path: path.into(),
            optional: false,
        }
    }

    fn input(from: &str, path: &str) -> ArtifactInput {
        ArtifactInput {
            from: from.into(),
            path: path.into(),
            artifact: None,
        }
    }

    #[test]
    fn from_forms() {
        assert_eq!(
            parse_from("${{ tasks.build.artifacts.dist }}"),
            Ok(InputSource::Node {
                node: "build".into(),
                name: "dist".into()
            })
        );
        assert_eq!(
            parse_from("01jabc/report.json"),
            Ok(InputSource::Task {
                task_id: "01jabc".into(),
                name: "report.json".into()
            })
        );
        for bad in [
            "",
            "dist",
            "${{ tasks.build.outputs.dist }}",
            "x${{ tasks.build.artifacts.dist }}",
            "${{ tasks.build.artifacts }}",
            "../x/y",
            "a/b/c",
        ] {
            assert!(parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shell_paths_are_relative_and_container_paths_absolute() {
        let mut s = shell();
        s.artifacts.push(artifact("dist", "out/dist"));
        s.inputs.push(input("${{ tasks.a.artifacts.x }}", "in/x"));
        check(&s).unwrap();
        for bad in ["/abs", "../up", "a/../../b", ""] {
            let mut s = shell();
            s.artifacts.push(artifact("dist", bad));
            let e = check(&s).unwrap_err().to_string();
            assert!(e.contains("spec.artifacts[0].path"), "{bad}: {e}");
        }
        let mut c = TaskSpec {
            kind: Some(Kind::Container(ContainerTask::default())),
            ..Default::default()
        };
        c.artifacts.push(artifact("dist", "relative"));
        let e = check(&c).unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        c.artifacts[0].path = "/out".into();
        c.inputs.push(input("t1/dist", "/"));
        let e = check(&c).unwrap_err().to_string();
        assert!(e.contains("spec.inputs[0].path"), "{e}");
    }

    #[test]
    fn names_inputs_and_kinds_are_checked() {
        let mut s = shell();
        s.artifacts.push(artifact("dist", "a"));
        s.artifacts.push(artifact("dist", "b"));
        assert!(check(&s).unwrap_err().to_string().contains("twice"));
        let mut s = shell();
        s.artifacts.push(artifact("bad name", "a"));
        assert!(check(&s).unwrap_err().to_string().contains("name"));
        let mut s = shell();
        s.inputs.push(input("t1/a", "x"));
        s.inputs.push(input("t1/b", "x/"));
        assert!(check(&s).unwrap_err().to_string().contains("another input"));
        let mut s = shell();
        s.inputs.push(input("nope", "x"));
        assert!(
            check(&s)
                .unwrap_err()
                .to_string()
                .contains("spec.inputs[0].from")
        );
        let noop = TaskSpec {
            kind: Some(Kind::Noop(NoopTask {})),
            artifacts: vec![artifact("a", "a")],
            ..Default::default()
        };
        assert!(check(&noop).is_err());
    }
}
