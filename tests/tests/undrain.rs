//! Draining and undraining agents, and removing lost ones, through the real `scabbard` CLI
//! against a real controller and real workers (issue 18 item 2): a drained agent gets no
//! new work, also after a controller restart; `agents undrain` (by id prefix) returns it to
//! service, and that too survives a restart; `agents drain <name>` works; a connected agent
//! cannot be removed (FAILED_PRECONDITION, saying to drain and stop it), a LOST one can
//! (`agents remove`), and each action is in the audit log.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use scabbard_tests::*;
use serde_json::Value;

struct Env {
    dir: tempfile::TempDir,
    ctl: Controller,
    workers: Vec<Worker>,
}

impl Env {
    fn start(workers: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ctl = Controller::start(
            &dir.path().join("controller"),
            0,
            &ControllerOpts::default(),
        )?;
        let workers = workers
            .iter()
            .map(|w| Worker::start(&ctl.addr.to_string(), &dir.path().join(w), w, 2))
            .collect::<Result<_>>()?;
        Ok(Self { dir, ctl, workers })
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("cli-config")
    }

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

    /// stderr of a command that must fail.
    fn fails(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        ensure!(
            !out.status.success(),
            "scabbard {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8(out.stderr)?)
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut with = args.to_vec();
        with.extend(["-o", "json"]);
        let text = self.ok(&with)?;
        serde_json::from_str(&text).with_context(|| format!("{args:?}: not JSON: {text}"))
    }

    /// The agent named `name` as `agents list -o json` shows it (`None`: not listed).
    fn agent(&self, name: &str) -> Result<Option<Value>> {
        let list = self.json(&["agents", "list"])?;
        Ok(list
            .as_array()
            .context("an array")?
            .iter()
            .find(|a| a["name"] == name)
            .cloned())
    }

    /// Waits until agent `name` has `status` (`AGENT_STATUS_…`); returns it.
    fn wait_status(&self, name: &str, status: &str) -> Result<Value> {
        until(
            &format!("{name} to be {status}"),
            Duration::from_secs(30),
            || Ok(self.agent(name)?.filter(|a| a["status"] == status)),
        )
    }

    fn submit(&self, script: &str) -> Result<String> {
        let t = self.json(&["submit", "--sh", script])?;
        Ok(t["id"].as_str().context("task id")?.to_string())
    }

    fn state(&self, task: &str) -> Result<String> {
        let t = self.json(&["task", "get", task])?;
        Ok(t["state"].as_str().unwrap_or_default().to_string())
    }

    fn wait_state(&self, task: &str, state: &str) -> Result<()> {
        until(
            &format!("task {task} to be {state}"),
            Duration::from_secs(30),
            || Ok((self.state(task)? == state).then_some(())),
        )
    }

    /// Stops the controller and starts it again on the same port and data dir.
    fn restart_controller(&mut self) -> Result<()> {
        self.ctl.proc.terminate(Duration::from_secs(10));
        let port = self.ctl.addr.port();
        let data = self.ctl.data_dir.clone();
        self.ctl = until("the controller to restart", Duration::from_secs(20), || {
            Ok(Controller::start(&data, port, &ControllerOpts::default()).ok())
        })?;
        Ok(())
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout` (with the last
/// error, if any).
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

/// The task stays QUEUED for `d` (the scheduler runs many times meanwhile: every
/// heartbeat, every second's sweep).
fn stays_queued(env: &Env, task: &str, d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        let s = env.state(task)?;
        ensure!(s == "TASK_STATE_QUEUED", "task {task} left the queue: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn undrain_returns_an_agent_to_service_and_both_survive_a_controller_restart() -> Result<()> {
    let mut env = Env::start(&["w1"])?;
    let a = env.wait_status("w1", "AGENT_STATUS_CONNECTED")?;
    let id = a["id"].as_str().context("agent id")?.to_string();

    // Drained by name: no new work.
    let out = env.ok(&["agents", "drain", "w1", "--reason", "maintenance"])?;
    assert!(out.contains(&id), "{out}");
    env.wait_status("w1", "AGENT_STATUS_DRAINING")?;
    let held = env.submit("echo held")?;
    stays_queued(&env, &held, Duration::from_millis(1500))?;

    // The drain survives a controller restart (and the worker's reconnect).
    env.restart_controller()?;
    env.wait_status("w1", "AGENT_STATUS_DRAINING")?;
    stays_queued(&env, &held, Duration::from_millis(1500))?;

    // Undrained by a unique prefix of its id (without `agent-`): the held task runs.
    let prefix = &id["agent-".len()..id.len() - 4];
    let out = env.ok(&["agents", "undrain", prefix, "--reason", "done"])?;
    assert!(
        out.contains("back in service") && out.contains(&id),
        "{out}"
    );
    env.wait_state(&held, "TASK_STATE_SUCCEEDED")?;
    env.wait_status("w1", "AGENT_STATUS_CONNECTED")?;

    // The undrain survives a restart too: new work runs at once.
    env.restart_controller()?;
    env.wait_status("w1", "AGENT_STATUS_CONNECTED")?;
    let after = env.submit("echo after")?;
    env.wait_state(&after, "TASK_STATE_SUCCEEDED")?;

    // The worker process restarting keeps an operator's drain as well.
    env.ok(&["agents", "drain", &id])?;
    env.workers[0].proc.terminate(Duration::from_secs(10));
    env.workers[0] = Worker::start(
        &env.ctl.addr.to_string(),
        &env.dir.path().join("w1"),
        "w1",
        2,
    )?;
    env.wait_status("w1", "AGENT_STATUS_DRAINING")?;
    env.ok(&["agents", "undrain", "w1"])?;
    let last = env.submit("echo last")?;
    env.wait_state(&last, "TASK_STATE_SUCCEEDED")?;

    let audit = env.ok(&["audit", "-o", "json"])?;
    for action in ["agent.drain", "agent.undrain"] {
        assert!(audit.contains(action), "{action} not in {audit}");
    }
    Ok(())
}

#[test]
fn only_a_lost_agent_can_be_removed() -> Result<()> {
    let mut env = Env::start(&["keep", "gone"])?;
    env.wait_status("keep", "AGENT_STATUS_CONNECTED")?;
    let gone = env.wait_status("gone", "AGENT_STATUS_CONNECTED")?;
    let gone_id = gone["id"].as_str().context("agent id")?.to_string();

    // Connected: refused, saying what to do first.
    let err = env.fails(&["agents", "remove", "gone"])?;
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("drain") && err.contains("connected"),
        "{err}"
    );
    assert!(env.agent("gone")?.is_some());

    // Lost (killed; silent past the agent lease): removed, with its token.
    env.workers[1].proc.kill9();
    env.wait_status("gone", "AGENT_STATUS_LOST")?;
    let out = env.ok(&["agents", "remove", "gone", "--reason", "host retired"])?;
    assert!(out.contains("removed") && out.contains(&gone_id), "{out}");
    assert!(env.agent("gone")?.is_none(), "still listed");
    let err = env.fails(&["agents", "remove", &gone_id])?;
    assert!(err.contains("NOT_FOUND"), "{err}");
    let tokens = env.json(&["token", "list", "--all"])?;
    let live_agent_tokens: Vec<&Value> = tokens
        .as_array()
        .context("an array")?
        .iter()
        .filter(|t| t["agentId"] == gone_id.as_str() && t["revoked"] != true)
        .collect();
    assert!(
        live_agent_tokens.is_empty(),
        "a removed agent's token is still live: {live_agent_tokens:?}"
    );

    // The other agent is untouched and still works; the removal is audited.
    let t = env.submit("echo still-here")?;
    env.wait_state(&t, "TASK_STATE_SUCCEEDED")?;
    let audit = env.ok(&["audit", "-o", "json"])?;
    assert!(
        audit.contains("agent.remove") && audit.contains(&gone_id),
        "{audit}"
    );
    Ok(())
}
