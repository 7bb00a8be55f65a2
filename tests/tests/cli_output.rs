//! `-o json|yaml` of the real `scabbard` binary against a real controller and worker:
//! each command's JSON parses, follows the proto3 JSON mapping (it deserializes into the
//! protocol type and serializes back to the same value) and carries the fields its table
//! shows; YAML is the same value; `--wait -o json` prints JSON Lines; errors in JSON mode
//! go to stderr with exit code 1; control characters in names are escaped in tables;
//! `scabbard completion bash` prints a script.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use scabbard_common::proto::{
    Agent, AuditEntry, ClusterStatusResponse, CreateTokenResponse, Project, Schedule, Task,
    TaskEvent, TokenInfo, Workflow, WorkflowEvent,
};
use scabbard_tests::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A task name with an escape sequence and a bell in it.
const RED: &str = "\u{1b}[31mred\u{7}";

struct Env {
    dir: tempfile::TempDir,
    ctl: Controller,
    _worker: Worker,
}

impl Env {
    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ctl = Controller::start(
            &dir.path().join("controller"),
            0,
            &ControllerOpts::default(),
        )?;
        let worker = Worker::start(&ctl.addr.to_string(), &dir.path().join("w1"), "w1", 2)?;
        Ok(Self {
            dir,
            ctl,
            _worker: worker,
        })
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("cli-config")
    }

    /// `scabbard <args>` against this controller, with the admin token.
    fn run(&self, args: &[&str]) -> Result<Output> {
        Ok(cli(&self.config())
            .env("SCABBARD_CONTROLLER", self.ctl.addr.to_string())
            .args(args)
            .output()?)
    }

    /// stdout of a command that must succeed.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        ensure!(
            out.status.success(),
            "scabbard {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `args` with `-o json`, parsed, checked to be the proto JSON mapping of a `T`; and
    /// with `yaml_too`, `-o yaml` checked to be the same value. A finished task still
    /// changes a little afterwards (its log is archived), so the pair is asked again until
    /// the two calls saw the same state (within the deadline).
    fn json<T: Serialize + DeserializeOwned>(
        &self,
        args: &[&str],
        yaml_too: bool,
    ) -> Result<Value> {
        let call = |format: &str| -> Result<Value> {
            let mut with = args.to_vec();
            with.extend(["-o", format]);
            let text = self.ok(&with)?;
            Ok(if format == "json" {
                serde_json::from_str(&text)
                    .with_context(|| format!("{args:?}: not JSON: {text}"))?
            } else {
                serde_yaml_ng::from_str(&text)
                    .with_context(|| format!("{args:?}: not YAML: {text}"))?
            })
        };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let v = call("json")?;
            round_trips::<T>(&v).with_context(|| format!("{args:?}"))?;
            if !yaml_too {
                return Ok(v);
            }
            let y = call("yaml")?;
            if y == v {
                return Ok(v);
            }
            ensure!(
                Instant::now() < end,
                "{args:?}: YAML {y} differs from JSON {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `v` (an object, or an array of them) deserializes into `T` and serializes back to `v`.
fn round_trips<T: Serialize + DeserializeOwned>(v: &Value) -> Result<()> {
    let items: Vec<&Value> = match v {
        Value::Array(items) => items.iter().collect(),
        one => vec![one],
    };
    for item in items {
        let t: T = serde_json::from_value(item.clone())
            .with_context(|| format!("not the JSON mapping of the message: {item}"))?;
        let back = serde_json::to_value(&t)?;
        ensure!(&back == item, "round trip changed {item} into {back}");
    }
    Ok(())
}

/// Polls `f` until it returns `Some`, for at most 30 s.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = f()? {
            return Ok(t);
        }
        if Instant::now() > end {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

fn find<'a>(list: &'a Value, key: &str, value: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|i| i[key] == value)
}

/// JSON Lines: every line one object.
fn lines(text: &str) -> Result<Vec<Value>> {
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l:?}")))
        .collect()
}

#[test]
fn json_and_yaml_output_of_every_resource() -> Result<()> {
    let env = Env::start()?;

    // Agents: once the worker is connected.
    let agents = eventually("the worker to connect", || {
        let v = env.json::<Agent>(&["agents", "list"], false)?;
        Ok(find(&v, "status", "AGENT_STATUS_CONNECTED")
            .is_some()
            .then_some(v))
    })?;
    let agent = &agents[0];
    let table = env.ok(&["agents", "list"])?;
    for field in ["id", "name"] {
        assert!(table.contains(s(agent, field)), "{field}: {table}");
    }
    assert_eq!(agent["slots"], 2, "{agent}");
    assert!(table.contains("CONNECTED"), "{table}");

    // submit --wait -o json: one TaskEvent per line, the last one final; exit code 0.
    let out = env.run(&[
        "submit", "--wait", "-o", "json", "--name", RED, "--label", "team=ops", "--", "true",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = lines(&String::from_utf8(out.stdout)?)?;
    assert!(!events.is_empty());
    for e in &events {
        round_trips::<TaskEvent>(e)?;
    }
    let last = &events.last().expect("events")["task"];
    assert_eq!(last["state"], "TASK_STATE_SUCCEEDED", "{last}");
    let id = s(last, "id").to_string();
    assert_eq!(last["spec"]["name"], RED);

    // A failing task: the task's exit code, and still JSON lines.
    let out = env.run(&["submit", "--wait", "-o", "json", "--sh", "exit 3"])?;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = lines(&String::from_utf8(out.stdout)?)?;
    assert_eq!(
        events.last().expect("events")["task"]["state"],
        "TASK_STATE_FAILED"
    );

    // submit without --wait: the task, one object.
    let queued = env.json::<Task>(&["submit", "--noop"], false)?;
    assert!(!s(&queued, "id").is_empty(), "{queued}");
    // Until it is final, so the lists below hold no task whose state is still moving.
    eventually("the noop task to finish", || {
        let t = env.json::<Task>(&["task", "get", s(&queued, "id")], false)?;
        Ok((t["state"] == "TASK_STATE_SUCCEEDED").then_some(()))
    })?;

    // task get: the table's fields.
    let t = env.json::<Task>(&["task", "get", &id], true)?;
    let table = env.ok(&["task", "get", &id])?;
    assert_eq!(s(&t, "id"), id);
    assert!(table.contains(&format!("id:        {id}")), "{table}");
    assert!(table.contains("state:     SUCCEEDED"), "{table}");
    assert!(table.contains(s(&t, "agentId")), "{table}");
    assert!(table.contains(s(&t, "project")), "{table}");
    assert_eq!(t["result"]["exitCode"], 0);
    assert_eq!(t["spec"]["labels"]["team"], "ops");
    // 64-bit integers are strings in the mapping.
    assert!(t["createdAtMs"].is_string(), "{t}");
    // The name is escaped in the tables, raw (JSON-escaped) in JSON.
    assert!(table.contains("\\u{1b}[31mred\\u{7}"), "{table:?}");
    assert!(
        !table.contains('\u{1b}') && !table.contains('\u{7}'),
        "{table:?}"
    );

    // task list: an array holding both tasks; the table shows the same ids and states.
    let list = env.json::<Task>(&["task", "list", "--all"], true)?;
    let table = env.ok(&["task", "list"])?;
    assert!(table.contains("\\u{1b}[31mred\\u{7}"), "{table:?}");
    assert!(!table.contains('\u{1b}'), "{table:?}");
    for t in list.as_array().expect("an array") {
        let short = s(t, "state").trim_start_matches("TASK_STATE_");
        let row = table
            .lines()
            .find(|l| l.starts_with(s(t, "id")))
            .with_context(|| format!("{} not in {table}", s(t, "id")))?;
        assert!(row.contains(short), "{row} should say {short}");
    }
    assert!(find(&list, "id", &id).is_some());
    // Paging: one page of one task, the next page token on stderr only.
    let out = env.run(&["task", "list", "--limit", "1", "-o", "json"])?;
    let page: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(page.as_array().map(Vec::len), Some(1), "{page}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("next page: --page-token"));

    // logs -o json: LogChunk lines.
    let echo = env.run(&["submit", "--wait", "--sh", "echo hello-json"])?;
    assert!(echo.status.success());
    let echo_id = String::from_utf8_lossy(&echo.stderr)
        .split_whitespace()
        .find(|w| w.len() == 26)
        .context("task id on stderr")?
        .to_string();
    let chunks = lines(&env.ok(&["logs", &echo_id, "-o", "json"])?)?;
    assert!(
        chunks
            .iter()
            .any(|c| c["stream"] == "LOG_STREAM_STDOUT" && c["data"] == "aGVsbG8tanNvbgo="), // base64 of "hello-json\n"
        "{chunks:?}"
    );

    // Errors in JSON mode: stderr and exit code 66 (not found), nothing on stdout.
    let out = env.run(&["task", "get", "01AAAAAAAAAAAAAAAAAAAAAAAA", "-o", "json"])?;
    assert_eq!(out.status.code(), Some(66));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));

    workflows(&env)?;
    catalog(&env)?;
    security(&env)?;
    status(&env)?;
    Ok(())
}

fn workflows(env: &Env) -> Result<()> {
    let file = env.dir.path().join("wf.yaml");
    std::fs::write(
        &file,
        "name: json-dag\ntasks:\n  - {name: a, shell: {command: [\"true\"]}}\n  - {name: b, depends_on: [a], noop: {}}\n",
    )?;
    let file = file.to_str().context("path")?;
    let out = env.run(&["workflow", "submit", "-f", file, "--wait", "-o", "json"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = lines(&String::from_utf8(out.stdout)?)?;
    for e in &events {
        round_trips::<WorkflowEvent>(e)?;
    }
    let last = &events.last().context("events")?["workflow"];
    assert_eq!(last["state"], "WORKFLOW_STATE_SUCCEEDED", "{last}");
    let id = s(last, "id").to_string();

    let w = env.json::<Workflow>(&["workflow", "get", &id], true)?;
    let table = env.ok(&["workflow", "get", &id])?;
    assert!(table.contains(&id), "{table}");
    for n in w["nodes"].as_array().context("nodes")? {
        assert!(table.contains(s(n, "name")), "{table}");
        assert!(table.contains(s(n, "taskId")), "{table}");
    }
    assert_eq!(w["nodes"].as_array().map(Vec::len), Some(2));

    let list = env.json::<Workflow>(&["workflow", "list", "--all"], true)?;
    assert!(find(&list, "id", &id).is_some(), "{list}");
    let table = env.ok(&["workflow", "list"])?;
    assert!(table.contains(&id), "{table}");

    // watch of a finished workflow: its event, one line.
    let out = env.run(&["workflow", "watch", &id, "-o", "json"])?;
    assert!(out.status.success());
    let watched = lines(&String::from_utf8(out.stdout)?)?;
    assert_eq!(
        watched.last().context("an event")?["workflow"]["state"],
        "WORKFLOW_STATE_SUCCEEDED"
    );
    Ok(())
}

fn catalog(env: &Env) -> Result<()> {
    let templates = env.json::<scabbard_common::proto::Template>(&["template", "list"], true)?;
    let table = env.ok(&["template", "list"])?;
    let names: Vec<&str> = templates
        .as_array()
        .context("array")?
        .iter()
        .map(|t| s(t, "name"))
        .collect();
    assert!(names.contains(&"scheduled-maintenance"), "{names:?}");
    for n in &names {
        assert!(table.contains(n), "{n} not in {table}");
    }
    let shown = env.json::<scabbard_common::proto::Template>(
        &["template", "show", "scheduled-maintenance"],
        true,
    )?;
    assert_eq!(shown["name"], "scheduled-maintenance", "{shown}");

    let created = env.json::<Schedule>(
        &[
            "schedule",
            "create",
            "--name",
            "nightly-json",
            "--cron",
            "0 2 * * *",
            "--template",
            "scheduled-maintenance",
            "-p",
            "bucket=logs-bucket",
            "--paused",
        ],
        false,
    )?;
    let sid = s(&created, "id").to_string();
    assert!(!sid.is_empty(), "{created}");
    let got = env.json::<Schedule>(&["schedule", "get", &sid], true)?;
    assert_eq!(got["spec"]["name"], "nightly-json", "{got}");
    let list = env.json::<Schedule>(&["schedule", "list"], true)?;
    assert!(find(&list, "id", &sid).is_some(), "{list}");
    let table = env.ok(&["schedule", "list"])?;
    assert!(
        table.contains(&sid) && table.contains("nightly-json"),
        "{table}"
    );
    Ok(())
}

fn security(env: &Env) -> Result<()> {
    let created = env.json::<CreateTokenResponse>(
        &["token", "create", "--name", "ci-json", "--scope", "read"],
        false,
    )?;
    assert!(!s(&created, "secret").is_empty(), "{created}");
    let tid = s(&created["token"], "id").to_string();
    let tokens = env.json::<TokenInfo>(&["token", "list"], true)?;
    let token = find(&tokens, "id", &tid).context("the new token")?;
    assert_eq!(token["scopes"][0], "SCOPE_READ", "{token}");
    let table = env.ok(&["token", "list"])?;
    assert!(table.contains(&tid) && table.contains("ci-json"), "{table}");

    env.json::<Project>(
        &["project", "create", "payments", "--max-running", "3"],
        false,
    )?;
    let p = env.json::<Project>(&["project", "get", "payments"], true)?;
    assert_eq!(p["quota"]["maxRunningTasks"], 3, "{p}");
    let list = env.json::<Project>(&["project", "list"], true)?;
    assert!(find(&list, "name", "payments").is_some(), "{list}");
    let table = env.ok(&["project", "list"])?;
    assert!(table.contains("payments"), "{table}");

    let me = env.json::<TokenInfo>(&["whoami"], true)?;
    assert!(env.ok(&["whoami"])?.contains(s(&me, "id")));

    let audit = env.json::<AuditEntry>(&["audit"], false)?;
    assert!(
        audit
            .as_array()
            .context("array")?
            .iter()
            .any(|e| s(e, "target") == "payments"),
        "{audit}"
    );
    Ok(())
}

fn status(env: &Env) -> Result<()> {
    let st = env.json::<ClusterStatusResponse>(&["status"], false)?;
    assert_eq!(st["storeHealthy"], true, "{st}");
    assert!(!s(&st, "leader").is_empty(), "{st}");
    let table = env.ok(&["status"])?;
    assert!(
        table.contains(&format!("leader:      {}", s(&st, "leader"))),
        "{table}"
    );
    assert!(table.contains(s(&st, "storeBackend")), "{table}");
    // No breaker is open: an empty array (the table says so in words).
    let breakers = env.json::<scabbard_common::proto::Breaker>(&["breakers", "list"], true)?;
    assert_eq!(breakers, serde_json::json!([]));
    for m in st["members"].as_array().context("members")? {
        assert!(table.contains(s(m, "address")), "{table}");
    }
    Ok(())
}

#[test]
fn completion_scripts_name_the_subcommands() -> Result<()> {
    let config = tempfile::tempdir()?;
    for shell in ["bash", "zsh", "fish"] {
        let out = cli(config.path()).args(["completion", shell]).output()?;
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout)?;
        for word in ["scabbard", "submit", "workflow", "completion", "output"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
    }
    let help = cli(config.path()).arg("--help").output()?;
    let help = String::from_utf8(help.stdout)?;
    assert!(help.contains("Exit codes:"), "{help}");
    Ok(())
}
