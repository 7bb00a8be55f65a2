//! Output references: `${{ tasks.<node>.outputs.<key> }}` in a node's strings (command and
//! arguments, image, workdir, mounted host directories, the publish address, git URLs and
//! refs, download URLs, env values, Dagger call arguments) is replaced by the value
//! the named ancestor reported when the node is released. Any other `${{ … }}` expression is
//! an error (template parameters are rendered before a workflow is submitted).

use scabbard_common::proto::{TaskSpec, task_spec::Kind};

/// One reference found in a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRef {
    pub task: String,
    pub output: String,
}

/// The references in `s`, or an error naming a malformed or unknown expression.
pub fn scan(s: &str) -> Result<Vec<OutputRef>, String> {
    let mut out = Vec::new();
    for piece in pieces(s) {
        if let Piece::Expr(e) = piece {
            out.push(parse(e)?);
        }
    }
    Ok(out)
}

/// `s` with every reference replaced through `lookup`; the unresolved ones are returned as
/// the error.
pub fn substitute(
    s: &str,
    lookup: &dyn Fn(&OutputRef) -> Option<String>,
) -> Result<String, Vec<String>> {
    if !s.contains("${{") {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut missing = Vec::new();
    for piece in pieces(s) {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Expr(e) => match parse(e) {
                Ok(r) => match lookup(&r) {
                    Some(v) => out.push_str(&v),
                    None => missing.push(format!("tasks.{}.outputs.{}", r.task, r.output)),
                },
                Err(e) => missing.push(e),
            },
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(missing)
    }
}

/// Calls `f` on every string of the spec that may hold references.
pub fn for_each_string(spec: &mut TaskSpec, f: &mut dyn FnMut(&str, &mut String)) {
    match spec.kind.as_mut() {
        Some(Kind::Shell(sh)) => {
            for (i, a) in sh.command.iter_mut().enumerate() {
                f(&format!("shell.command[{i}]"), a);
            }
        }
        Some(Kind::Container(c)) => {
            f("container.image", &mut c.image);
            f("container.workdir", &mut c.workdir);
            for (i, s) in c.steps.iter_mut().enumerate() {
                for (j, a) in s.args.iter_mut().enumerate() {
                    f(&format!("container.steps[{i}].args[{j}]"), a);
                }
            }
            // A directory an earlier node exported (e.g. a checkout) mounted here.
            for (i, d) in c.directories.iter_mut().enumerate() {
                f(
                    &format!("container.directories[{i}].host_path"),
                    &mut d.host_path,
                );
            }
            // A commit or a version an earlier node found, e.g. to tag what is published.
            f("container.publish", &mut c.publish);
            for (i, g) in c.git.iter_mut().enumerate() {
                f(&format!("container.git[{i}].url"), &mut g.url);
                f(&format!("container.git[{i}].ref"), &mut g.r#ref);
            }
            for (i, d) in c.downloads.iter_mut().enumerate() {
                f(&format!("container.downloads[{i}].url"), &mut d.url);
            }
        }
        Some(Kind::DaggerCall(d)) => {
            f("dagger_call.module", &mut d.module);
            f("dagger_call.function", &mut d.function);
            for (i, a) in d.args.iter_mut().enumerate() {
                f(&format!("dagger_call.args[{i}]"), a);
            }
        }
        Some(Kind::Noop(_)) | None => {}
    }
    for (k, v) in spec.env.iter_mut() {
        f(&format!("env.{k}"), v);
    }
}

enum Piece<'a> {
    Text(&'a str),
    Expr(&'a str),
}

fn pieces(s: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${{") {
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let after = &rest[start + 3..];
        match after.find("}}") {
            Some(end) => {
                out.push(Piece::Expr(&after[..end]));
                rest = &after[end + 2..];
            }
            None => {
                // Unterminated: an expression that cannot parse, so it is reported.
                out.push(Piece::Expr("${{ without a closing }}"));
                rest = "";
            }
        }
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

fn parse(expr: &str) -> Result<OutputRef, String> {
    let e = expr.trim();
    let parts: Vec<&str> = e.split('.').collect();
    match parts.as_slice() {
        ["tasks", task, "outputs", output] if !task.is_empty() && !output.is_empty() => {
            Ok(OutputRef {
                task: task.to_string(),
                output: output.to_string(),
            })
        }
        _ => Err(format!(
            "${{{{ {e} }}}} is not an output reference (expected ${{{{ tasks.<task>.outputs.<name> }}}})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_replaces_references() {
        let s = "v=${{ tasks.build.outputs.version }}-${{tasks.x.outputs.y}}";
        let refs = scan(s).unwrap();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].task, "build");
        assert_eq!(refs[1].output, "y");
        let got = substitute(s, &|r| Some(format!("<{}>", r.output))).unwrap();
        assert_eq!(got, "v=<version>-<y>");
        let missing = substitute(s, &|r| (r.task == "build").then(|| "1".into())).unwrap_err();
        assert_eq!(missing, vec!["tasks.x.outputs.y".to_string()]);
    }

    #[test]
    fn other_expressions_are_errors() {
        assert!(
            scan("${{ params.repo }}")
                .unwrap_err()
                .contains("params.repo")
        );
        assert!(scan("${{ tasks.a.outputs }}").is_err());
        assert!(scan("${{ tasks.a.outputs.b").is_err());
        assert!(scan("plain $HOME and {{ x }}").unwrap().is_empty());
    }
}
