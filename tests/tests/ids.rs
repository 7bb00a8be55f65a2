//! Short ids and names through the real `scabbard` CLI against a real controller and worker
//! (issue 18 item 5): a unique id prefix works for tasks, workflows, schedules, agents and
//! tokens; an ambiguous one is INVALID_ARGUMENT listing the matches; a schedule is found by
//! its name and an agent by its name; another project's task prefix is NOT_FOUND for a
//! project-bound token; `logs <workflow id>` points to `workflow logs`.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use scabbard_tests::*;
use serde_json::Value;

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
        let worker = Worker::start(&ctl.addr.to_string(), &dir.path().join("w1"), "w1", 4)?;
        Ok(Self {
            dir,
            ctl,
            _worker: worker,
        })
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("cli-config")
    }

    /// `scabbard <args>` with `token`.
    fn run_as(&self, token: &str, args: &[&str]) -> Result<Output> {
        Ok(cli(&self.config())
            .env("SCABBARD_CONTROLLER", self.ctl.addr.to_string())
            .env("SCABBARD_TOKEN", token)
            .args(args)
            .output()?)
    }

    fn ok_as(&self, token: &str, args: &[&str]) -> Result<String> {
        let out = self.run_as(token, args)?;
        ensure!(
            out.status.success(),
            "scabbard {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        self.ok_as(ADMIN_TOKEN, args)
    }

    /// stderr of a command that must fail.
    fn fails_as(&self, token: &str, args: &[&str]) -> Result<String> {
        let out = self.run_as(token, args)?;
        ensure!(
            !out.status.success(),
            "scabbard {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8(out.stderr)?)
    }

    fn fails(&self, args: &[&str]) -> Result<String> {
        self.fails_as(ADMIN_TOKEN, args)
    }

    fn json_as(&self, token: &str, args: &[&str]) -> Result<Value> {
        let mut with = args.to_vec();
        with.extend(["-o", "json"]);
        let text = self.ok_as(token, &with)?;
        serde_json::from_str(&text).with_context(|| format!("{args:?}: not JSON: {text}"))
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        self.json_as(ADMIN_TOKEN, args)
    }

    fn submit_as(&self, token: &str, script: &str) -> Result<String> {
        let t = self.json_as(token, &["submit", "--sh", script])?;
        Ok(t["id"].as_str().context("task id")?.to_string())
    }

    /// A new API token; returns (id, secret).
    fn token(&self, name: &str, scope: &str, project: &str) -> Result<(String, String)> {
        let t = self.json(&[
            "token",
            "create",
            "--name",
            name,
            "--scope",
            scope,
            "--project",
            project,
        ])?;
        Ok((
            t["token"]["id"].as_str().context("token id")?.to_string(),
            t["secret"].as_str().context("secret")?.to_string(),
        ))
    }
}

fn until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => String::new(),
            Err(e) => format!(": {e:#}"),
        };
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}{last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The shortest prefix of `id` (at least 4 characters) that no other of `all` starts with.
fn unique_prefix<'a>(id: &'a str, all: &[String]) -> &'a str {
    (4..id.len())
        .map(|n| &id[..n])
        .find(|p| all.iter().filter(|o| o.starts_with(p)).count() == 1)
        .unwrap_or(id)
}

/// The longest prefix every id of `ids` shares.
fn common_prefix(ids: &[String]) -> String {
    let first = &ids[0];
    let n = (0..first.len())
        .take_while(|&i| {
            ids.iter()
                .all(|o| o.as_bytes().get(i) == first.as_bytes().get(i))
        })
        .count();
    first[..n].to_string()
}

#[test]
fn unique_prefixes_and_names_resolve_and_ambiguous_ones_list_the_matches() -> Result<()> {
    let env = Env::start()?;
    until("the agent", Duration::from_secs(30), || {
        let list = env.json(&["agents", "list"])?;
        Ok(list
            .as_array()
            .and_then(|a| a.iter().find(|a| a["status"] == "AGENT_STATUS_CONNECTED"))
            .cloned())
    })?;

    // Tasks: three submitted back to back share a prefix; each has a unique one.
    let ids: Vec<String> = (0..3)
        .map(|i| env.submit_as(ADMIN_TOKEN, &format!("echo task-{i}")))
        .collect::<Result<_>>()?;
    for id in &ids {
        until("the task to finish", Duration::from_secs(30), || {
            let t = env.json(&["task", "get", id])?;
            Ok((t["state"] == "TASK_STATE_SUCCEEDED").then_some(()))
        })?;
    }
    let all_tasks: Vec<String> = env
        .json(&["task", "list"])?
        .as_array()
        .context("an array")?
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_string))
        .collect();
    for id in &ids {
        let p = unique_prefix(id, &all_tasks);
        let t = env.json(&["task", "get", p])?;
        assert_eq!(t["id"], id.as_str(), "prefix {p}");
        // Upper case works too (ULIDs are case-insensitive).
        let t = env.json(&["task", "get", &p.to_uppercase()])?;
        assert_eq!(t["id"], id.as_str(), "prefix {p}");
    }
    let shared = common_prefix(&ids);
    ensure!(
        shared.len() >= 4,
        "tasks submitted together share {shared:?}"
    );
    let err = env.fails(&["task", "get", &shared])?;
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("ambiguous"),
        "{err}"
    );
    for id in &ids {
        assert!(err.contains(id.as_str()), "{id} not listed: {err}");
    }
    assert!(err.contains("SUCCEEDED"), "states are listed: {err}");
    let err = env.fails(&["task", "get", &ids[0][..3]])?;
    assert!(err.contains("at least 4"), "{err}");
    // Logs by prefix.
    let p = unique_prefix(&ids[1], &all_tasks);
    let text = env.ok(&["logs", p])?;
    assert!(text.contains("task-1"), "{text}");
    // Artifacts of a task by prefix (it serves none).
    let served = env.json(&["artifacts", "list", p])?;
    assert_eq!(served, serde_json::json!([]), "{served}");

    // Workflows: by prefix; a workflow id given to `logs` points to `workflow logs`.
    let file = env.dir.path().join("wf.yaml");
    std::fs::write(
        &file,
        "name: ids-wf\ntasks:\n  - {name: only, shell: {command: [sh, -c, 'echo wf']}}\n",
    )?;
    let wf = env.json(&["workflow", "submit", "-f", file.to_str().context("path")?])?;
    let wf_id = wf["workflow"]["id"]
        .as_str()
        .or(wf["id"].as_str())
        .with_context(|| format!("workflow id in {wf}"))?
        .to_string();
    let got = env.json(&["workflow", "get", &wf_id[..12]])?;
    assert_eq!(got["id"], wf_id.as_str(), "{got}");
    let err = env.fails(&["logs", &wf_id])?;
    assert!(
        err.contains("is a workflow") && err.contains(&format!("scabbard workflow logs {wf_id}")),
        "{err}"
    );

    // Schedules: by name and by prefix.
    let s = env.json(&[
        "schedule",
        "create",
        "--name",
        "nightly",
        "--cron",
        "0 2 * * *",
        "--template",
        "scheduled-maintenance",
        "-p",
        "bucket=logs-bucket",
        "--paused",
    ])?;
    let sid = s["id"].as_str().context("schedule id")?.to_string();
    let got = env.json(&["schedule", "get", "nightly"])?;
    assert_eq!(got["id"], sid.as_str(), "{got}");
    let got = env.json(&["schedule", "get", &sid[..12]])?;
    assert_eq!(got["spec"]["name"], "nightly", "{got}");
    env.ok(&["schedule", "resume", "nightly"])?;
    env.ok(&["schedule", "pause", &sid[..12]])?;
    let err = env.fails(&["schedule", "get", "weekly"])?;
    assert!(err.contains("NOT_FOUND"), "{err}");

    // Agents: by name and by id prefix (with or without `agent-`).
    let agent = env.json(&["agents", "list"])?[0].clone();
    let aid = agent["id"].as_str().context("agent id")?.to_string();
    let out = env.ok(&["agents", "drain", "w1"])?;
    assert!(out.contains(&aid), "{out}");
    let out = env.ok(&["agents", "undrain", &aid[..14]])?;
    assert!(out.contains(&aid), "{out}");
    let out = env.ok(&["agents", "drain", &aid["agent-".len()..16]])?;
    assert!(out.contains(&aid), "{out}");
    env.ok(&["agents", "undrain", &aid])?;

    // Tokens: revoked by a unique prefix of the id.
    let (tid, secret) = env.token("short-lived", "read", "default")?;
    let revoked = env.json(&["token", "revoke", &tid[..tid.len() - 6]])?;
    assert_eq!(revoked["id"], tid.as_str(), "{revoked}");
    let err = env.fails_as(&secret, &["task", "list"])?;
    assert!(err.contains("UNAUTHENTICATED"), "{err}");

    // Project scoping: a prefix of another project's task is NOT_FOUND for a token bound
    // to a project (never revealing it), and found by its own project and by an admin.
    env.ok(&["project", "create", "blue"])?;
    env.ok(&["project", "create", "green"])?;
    let (_, blue) = env.token("blue-submit", "submit", "blue")?;
    let (_, green) = env.token("green-read", "read", "green")?;
    let blue_task = env.submit_as(&blue, "echo blue")?;
    let p = &blue_task[..20];
    let err = env.fails_as(&green, &["task", "get", p])?;
    assert!(err.contains("NOT_FOUND"), "{err}");
    assert!(!err.contains(&blue_task), "the id leaked: {err}");
    let t = env.json_as(&blue, &["task", "get", p])?;
    assert_eq!(t["id"], blue_task.as_str());
    let t = env.json(&["task", "get", p])?;
    assert_eq!(t["id"], blue_task.as_str());
    // Nor is an ambiguous prefix listing another project's tasks.
    let err = env.fails_as(&green, &["task", "get", &shared])?;
    assert!(err.contains("NOT_FOUND"), "{err}");
    Ok(())
}
