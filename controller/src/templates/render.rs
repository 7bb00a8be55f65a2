//! `${{ ... }}` placeholders in a template's workflow body: finding them (with the field
//! path of each, for load-time errors) and replacing `${{ params.NAME }}` on the YAML value
//! tree. `${{ tasks.NODE.outputs.KEY }}` is left as written: the controller fills it when
//! the node is released.

use std::collections::HashMap;
use std::ops::Range;

use scabbard_common::wfdef::{Mapping, Value as Yaml};

use super::params::{Value, is_ident};

/// What a placeholder refers to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Expr<'a> {
    /// `params.NAME`
    Param(&'a str),
    /// `tasks.…` (filled at run time)
    Task,
    /// Anything else: refused at load.
    Other,
}

/// One `${{ expr }}` in a string.
#[derive(Debug)]
pub(crate) struct Placeholder<'a> {
    /// Byte range of the whole `${{ ... }}`.
    pub(crate) range: Range<usize>,
    /// The trimmed expression inside.
    pub(crate) expr: &'a str,
}

impl Placeholder<'_> {
    pub(crate) fn kind(&self) -> Expr<'_> {
        if let Some(name) = self.expr.strip_prefix("params.") {
            Expr::Param(name)
        } else if self.expr.starts_with("tasks.") {
            Expr::Task
        } else {
            Expr::Other
        }
    }
}

/// Every placeholder in `s`, and the byte offset of an unterminated `${{` if there is one.
pub(crate) fn scan(s: &str) -> (Vec<Placeholder<'_>>, Option<usize>) {
    let mut found = Vec::new();
    let mut pos = 0;
    while let Some(start) = s[pos..].find("${{").map(|i| i + pos) {
        let inner = start + 3;
        let Some(end) = s[inner..].find("}}").map(|i| i + inner) else {
            return (found, Some(start));
        };
        found.push(Placeholder {
            range: start..end + 2,
            expr: s[inner..end].trim(),
        });
        pos = end + 2;
    }
    (found, None)
}

/// Checks every placeholder in `v` (keys included); `path` is where `v` sits. Each problem
/// is pushed as `path: what is wrong`.
pub(crate) fn check(
    v: &Yaml,
    path: &str,
    known: &dyn Fn(&str) -> bool,
    names: &str,
    errors: &mut Vec<String>,
) {
    match v {
        Yaml::String(s) => check_str(s, path, known, names, errors),
        Yaml::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                check(item, &format!("{path}[{i}]"), known, names, errors);
            }
        }
        Yaml::Mapping(m) => {
            for (k, item) in m {
                let key = key_text(k);
                let here = format!("{path}.{key}");
                if let Yaml::String(ks) = k {
                    check_str(ks, &format!("{here} (key)"), known, names, errors);
                }
                check(item, &here, known, names, errors);
            }
        }
        Yaml::Tagged(t) => check(&t.value, path, known, names, errors),
        Yaml::Null | Yaml::Bool(_) | Yaml::Number(_) => {}
    }
}

fn check_str(
    s: &str,
    path: &str,
    known: &dyn Fn(&str) -> bool,
    names: &str,
    errors: &mut Vec<String>,
) {
    let (found, unterminated) = scan(s);
    for p in &found {
        match p.kind() {
            Expr::Param(name) if is_ident(name) && known(name) => {}
            Expr::Param(name) => errors.push(format!(
                "{path}: unknown parameter {name:?} in \"${{{{ {} }}}}\" (parameters: {names})",
                p.expr
            )),
            Expr::Task => {}
            Expr::Other => errors.push(format!(
                "{path}: unknown expression \"${{{{ {} }}}}\": use ${{{{ params.NAME }}}} or ${{{{ tasks.NODE.outputs.KEY }}}}",
                p.expr
            )),
        }
    }
    if let Some(at) = unterminated {
        errors.push(format!(
            "{path}: \"${{{{\" at byte {at} is not closed with \"}}}}\""
        ));
    }
}

fn key_text(k: &Yaml) -> String {
    match k {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        _ => "?".into(),
    }
}

/// A copy of `v` with every `${{ params.NAME }}` replaced. A list element that is exactly
/// one list parameter expands into its items; elsewhere a list is comma-joined. Unknown
/// names (impossible after the load check) and other expressions are left as written.
pub(crate) fn substitute(v: &Yaml, values: &HashMap<String, Value>) -> Yaml {
    match v {
        Yaml::String(s) => Yaml::String(substitute_str(s, values)),
        Yaml::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                if let Yaml::String(s) = item
                    && let Some(list) = whole_list(s, values)
                {
                    out.extend(list.iter().cloned().map(Yaml::String));
                } else {
                    out.push(substitute(item, values));
                }
            }
            Yaml::Sequence(out)
        }
        Yaml::Mapping(m) => {
            let mut out = Mapping::with_capacity(m.len());
            for (k, item) in m {
                out.insert(substitute(k, values), substitute(item, values));
            }
            Yaml::Mapping(out)
        }
        Yaml::Tagged(t) => {
            let mut t = t.as_ref().clone();
            t.value = substitute(&t.value, values);
            Yaml::Tagged(Box::new(t))
        }
        Yaml::Null | Yaml::Bool(_) | Yaml::Number(_) => v.clone(),
    }
}

/// The items of the list parameter `s` consists of, if it is exactly one such placeholder.
fn whole_list<'v>(s: &str, values: &'v HashMap<String, Value>) -> Option<&'v [String]> {
    let (found, _) = scan(s);
    let [p] = found.as_slice() else {
        return None;
    };
    if p.range != (0..s.len()) {
        return None;
    }
    match p.kind() {
        Expr::Param(name) => match values.get(name) {
            Some(Value::List(items)) => Some(items),
            _ => None,
        },
        _ => None,
    }
}

fn substitute_str(s: &str, values: &HashMap<String, Value>) -> String {
    let (found, _) = scan(s);
    if found.is_empty() {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for p in &found {
        if let Expr::Param(name) = p.kind()
            && let Some(v) = values.get(name)
        {
            out.push_str(&s[last..p.range.start]);
            out.push_str(&v.text());
            last = p.range.end;
        }
    }
    out.push_str(&s[last..]);
    out
}
