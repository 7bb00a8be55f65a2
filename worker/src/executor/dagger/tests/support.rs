//! What the mock client and the fake engine share: reading the SDK's query text (it is
//! always one chain of fields, `query{a(x:1){b{c}}}`), comparing queries regardless of
//! argument order (the SDK keeps arguments in a HashMap), and canned engine answers per
//! query shape.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

/// One field of the chain: its name (or `... on Type`) and its arguments as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) name: String,
    pub(super) args: Vec<(String, String)>,
}

impl Segment {
    /// The argument `name` decoded as a string (if it is one).
    pub(super) fn str_arg(&self, name: &str) -> Option<String> {
        let raw = &self.args.iter().find(|(k, _)| k == name)?.1;
        serde_json::from_str::<String>(raw).ok()
    }

    pub(super) fn raw_arg(&self, name: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits `text` at top-level occurrences of `sep` (outside strings and brackets).
fn split_top(text: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let (mut depth, mut in_str, mut escaped) = (0i32, false, false);
    for c in text.chars() {
        if in_str {
            current.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            '{' if depth > 0 => depth += 1,
            '}' if depth > 0 => depth -= 1,
            _ => {}
        }
        if c == sep && depth == 0 {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
}

/// The fields of a query, `query` itself left out.
pub(super) fn segments(query: &str) -> Vec<Segment> {
    let trimmed = query.trim_end_matches('}');
    let mut parts = split_top(trimmed, '{');
    assert_eq!(parts.remove(0), "query", "not a query: {query}");
    parts
        .into_iter()
        .map(|part| match part.split_once('(') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix(')').expect("closing paren");
                let args = split_top(inner, ',')
                    .into_iter()
                    .map(|a| {
                        let a = a.trim();
                        let (k, v) = a.split_once(':').expect("name:value");
                        (k.trim().to_string(), v.trim().to_string())
                    })
                    .collect();
                Segment {
                    name: name.to_string(),
                    args,
                }
            }
            None => Segment {
                name: part,
                args: Vec::new(),
            },
        })
        .collect()
}

/// `query` with each field's arguments in name order.
pub(super) fn normalize(query: &str) -> String {
    let segs = segments(query);
    let mut text = String::from("query");
    for s in &segs {
        text.push('{');
        text.push_str(&s.name);
        if !s.args.is_empty() {
            let mut args = s.args.clone();
            args.sort();
            let args: Vec<String> = args.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            text.push_str(&format!("({})", args.join(", ")));
        }
    }
    text.push_str(&"}".repeat(segs.len()));
    text
}

/// The commit every git ref resolves to unless a script says otherwise.
pub(super) const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the engine answers.
#[derive(Default)]
pub(super) struct Script {
    /// Exit code of step N (1-based); 0 when absent.
    pub(super) exit_codes: HashMap<usize, i64>,
    /// What step N wrote to stdout (its redirect file, exported after the step).
    pub(super) stdout: HashMap<usize, String>,
    pub(super) stderr: HashMap<usize, String>,
    /// A query containing this text fails with an engine error.
    pub(super) engine_error_on: Option<String>,
    /// A query containing this text gets `data: null` and no error (the SDK panics).
    pub(super) null_data_on: Option<String>,
    /// A query containing this text fails with an `ExecError` (exit code 5).
    pub(super) exec_error_on: Option<String>,
    /// Container paths that exist, and whether each is a directory.
    pub(super) paths: HashMap<String, bool>,
    /// `sync` answers this late.
    pub(super) sync_delay: Option<Duration>,
    /// What the steps left in `$SCABBARD_OUTPUT`.
    pub(super) output_file: String,
    /// Commit of each git URL (else [`COMMIT`]).
    pub(super) commits: HashMap<String, String>,
    /// A query containing the first text fails with an engine error carrying the second.
    pub(super) fail_on: Vec<(String, String)>,
}

/// Canned answers by query shape, with stable IDs.
#[derive(Default)]
pub(super) struct Responder {
    pub(super) script: Script,
    counters: Mutex<HashMap<&'static str, usize>>,
}

/// An answer: `data`, or the body of a GraphQL error response.
pub(super) type Answer = Result<Value, Value>;

impl Responder {
    pub(super) fn new(script: Script) -> Self {
        Self {
            script,
            counters: Mutex::default(),
        }
    }

    fn next(&self, kind: &'static str) -> String {
        let mut c = self.counters.lock().unwrap();
        let n = c.entry(kind).or_insert(0);
        *n += 1;
        format!("{kind}-{n}")
    }

    /// The step a query is about: the step of the container ID it starts from plus the
    /// `withExec`s it adds.
    fn step_of(segs: &[Segment]) -> usize {
        let base = segs
            .first()
            .filter(|s| s.name == "node")
            .and_then(|s| s.str_arg("id"))
            .and_then(|id| id.strip_prefix("ctr-").and_then(|n| n.parse().ok()))
            .unwrap_or(0);
        base + segs.iter().filter(|s| s.name == "withExec").count()
    }

    /// How long to wait before answering `query`.
    pub(super) fn delay(&self, query: &str) -> Option<Duration> {
        let leaf = segments(query).last().map(|s| s.name.clone());
        self.script
            .sync_delay
            .filter(|_| leaf.as_deref() == Some("sync"))
    }

    pub(super) fn answer(&self, query: &str) -> Answer {
        if let Some((_, message)) = self
            .script
            .fail_on
            .iter()
            .find(|(needle, _)| query.contains(needle.as_str()))
        {
            return Err(engine_error(message));
        }
        if let Some(bad) = &self.script.engine_error_on
            && query.contains(bad.as_str())
        {
            return Err(engine_error(&format!(
                "failed to resolve image: {bad}: not found"
            )));
        }
        if let Some(bad) = &self.script.null_data_on
            && query.contains(bad.as_str())
        {
            return Ok(Value::Null);
        }
        if let Some(bad) = &self.script.exec_error_on
            && query.contains(bad.as_str())
        {
            return Err(json!([{
                "message": "process \"false\" did not complete successfully: exit code: 5",
                "extensions": {
                    "_type": "EXEC_ERROR",
                    "cmd": ["false"],
                    "exitCode": 5,
                    "stdout": "exec out",
                    "stderr": "exec err",
                },
            }]));
        }
        let segs = segments(query);
        let leaf = segs.last().expect("a field");
        let parent = segs.len().checked_sub(2).map(|i| &segs[i]);
        let step = Self::step_of(&segs);
        let value = match leaf.name.as_str() {
            "id" => {
                let kind = match parent.map(|s| s.name.as_str()) {
                    Some("setSecret") => "secret",
                    Some("cacheVolume") => "cache",
                    Some("directory") => "dir",
                    Some("file") => "file",
                    Some("withNewFile") => "scratch",
                    Some("tree") => "tree",
                    Some("http") => "http",
                    _ => "other",
                };
                json!(self.next(kind))
            }
            "commit" => {
                let url = segs[0].str_arg("url").unwrap_or_default();
                json!(self.script.commits.get(&url).map_or(COMMIT, String::as_str))
            }
            "sync" => json!(format!("ctr-{step}")),
            "exitCode" => json!(self.script.exit_codes.get(&step).copied().unwrap_or(0)),
            "size" => json!(self.script.output_file.len()),
            "contents" => json!(self.script.output_file),
            "publish" => {
                let address = leaf.str_arg("address").expect("publish address");
                json!(format!("{address}@sha256:{}", "ab".repeat(32)))
            }
            "exists" => {
                let path = leaf.str_arg("path").unwrap_or_default();
                let is_dir = self.script.paths.get(&path).copied();
                match leaf.raw_arg("expectedType") {
                    Some("DIRECTORY_TYPE") => json!(is_dir == Some(true)),
                    _ => json!(is_dir.is_some()),
                }
            }
            "export" => {
                let dest = leaf.str_arg("path").expect("export path");
                let parent = parent.expect("what is exported");
                let from = parent.str_arg("path").unwrap_or_default();
                match self.step_output(&from) {
                    Some(text) => std::fs::write(&dest, text).unwrap(),
                    None => write_export(Path::new(&dest), parent.name == "directory", &from),
                }
                json!(dest)
            }
            "version" => json!("v0.test"),
            other => panic!("the fake engine has no answer for `{other}` in {query}"),
        };
        Ok(nest(&segs, value))
    }

    /// What a step wrote to the redirect file at `path` (`/scabbard/steps/<n>.out|err`).
    fn step_output(&self, path: &str) -> Option<String> {
        let name = path.strip_prefix("/scabbard/steps/")?;
        let (n, stream) = name.split_once('.')?;
        let n: usize = n.parse().ok()?;
        let texts = match stream {
            "out" => &self.script.stdout,
            "err" => &self.script.stderr,
            _ => return None,
        };
        Some(texts.get(&n).cloned().unwrap_or_default())
    }
}

fn engine_error(message: &str) -> Value {
    json!([{ "message": message, "path": ["container", "from"] }])
}

/// `value` wrapped in one object per field of the chain (fragments add no level).
fn nest(segs: &[Segment], value: Value) -> Value {
    segs.iter()
        .rev()
        .filter(|s| !s.name.starts_with("..."))
        .fold(value, |inner, s| json!({ s.name.clone(): inner }))
}

/// What the session would write on export: a file holding `exported <path>`, or a
/// directory with two such files.
fn write_export(dest: &Path, dir: bool, from: &str) {
    if dir {
        std::fs::create_dir_all(dest.join("sub")).unwrap();
        std::fs::write(dest.join("a.txt"), format!("exported {from}/a.txt")).unwrap();
        std::fs::write(dest.join("sub/b.txt"), format!("exported {from}/sub/b.txt")).unwrap();
    } else {
        std::fs::write(dest, format!("exported {from}")).unwrap();
    }
}

/// `query{a{b{c}}}` from its fields.
pub(super) fn chain(fields: &[&str]) -> String {
    let mut text = String::from("query");
    for f in fields {
        text.push('{');
        text.push_str(f);
    }
    text.push_str(&"}".repeat(fields.len()));
    text
}

#[test]
fn normalize_sorts_arguments_but_not_inside_values() {
    let a = r#"query{container{withExec(expect:ANY, args:["a, b","c(d)"]){sync}}}"#;
    let b = r#"query{container{withExec(args:["a, b","c(d)"], expect:ANY){sync}}}"#;
    assert_eq!(normalize(a), normalize(b));
    assert_eq!(normalize(b), b);
    let segs = segments(r#"query{node(id:"ctr-2"){... on Container{exitCode}}}"#);
    assert_eq!(segs[1].name, "... on Container");
    assert_eq!(Responder::step_of(&segs), 2);
}
