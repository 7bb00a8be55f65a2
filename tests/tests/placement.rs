//! Placement explanations (why a queued task or a pending workflow waits) for each of the
//! five waiting causes — an open breaker, a label no agent has, a container task with no
//! engine-capable worker, a workflow pending on its concurrency group, a project at its
//! running quota — through the real CLI (text and `-o json`) against real controller and
//! worker processes; and each explanation goes once its cause does.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::proto::{
    ConcurrencyGroup, ContainerStep, ContainerTask, TaskSpec, TaskState, WorkflowState,
    task_spec::Kind,
};
use scabbard_tests::fleet::{Fleet, WorkerSpec, expect_succeeded};
use scabbard_tests::wf::{Cluster, node, submit_workflow, wait_workflow, workflow};
use scabbard_tests::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

/// The `scabbard` CLI against one controller, with the admin token and its own config dir.
struct Cli {
    addr: String,
    config: tempfile::TempDir,
}

impl Cli {
    fn new(addr: &str) -> Result<Self> {
        Ok(Self {
            addr: addr.to_string(),
            config: tempfile::tempdir()?,
        })
    }

    fn cmd(&self) -> Command {
        let mut c = cli(self.config.path());
        c.env("SCABBARD_CONTROLLER", &self.addr);
        c
    }

    /// stdout of a command that must succeed.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cmd().args(args).output()?;
        if !out.status.success() {
            bail!(
                "scabbard {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A command's `-o json` answer.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&self.ok(&all)?)?)
    }

    /// Polls `task get -o json` until the task's explanation has `reason`.
    async fn explained(&self, id: &str, reason: &str) -> Result<Value> {
        let want = format!("PLACEMENT_REASON_{reason}");
        eventually(&format!("task {id} explained as {reason}"), T, || {
            let want = want.clone();
            async move {
                let v = self.json(&["task", "get", id]).ok()?;
                (v["placement"]["reason"] == want.as_str()).then_some(v)
            }
        })
        .await
    }

    /// Polls `status -o json` until `n` agents are connected.
    async fn agents(&self, n: u64) -> Result<()> {
        eventually(&format!("{n} agents connected"), T, || async move {
            let v = self.json(&["status"]).ok()?;
            (v["connectedAgents"].as_u64().unwrap_or(0) == n).then_some(())
        })
        .await
    }
}

/// The lines a child process writes (stdout or stderr), read on a thread.
struct Lines {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(pipe: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// The first line (from now on) containing `text`.
    fn wait_for(&mut self, text: &str) -> Result<String> {
        let end = Instant::now() + T;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(text) {
                        return Ok(l);
                    }
                }
                Err(_) => bail!("no line with {text:?}; got {:#?}", self.seen),
            }
        }
    }
}

/// Waits for a child to exit; its status code.
fn exit_code(child: &mut Child) -> Result<i32> {
    let end = Instant::now() + T;
    loop {
        if let Some(s) = child.try_wait()? {
            return s.code().context("killed by a signal");
        }
        if Instant::now() > end {
            let _ = child.kill();
            bail!("the command did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A worker process with more labels than the harness's `name=<name>`.
fn labelled_worker(addr: &str, dir: &Path, name: &str, labels: &[(&str, &str)]) -> Result<Proc> {
    let mut cmd = Command::new(scabbard_bin());
    cmd.args([
        "worker",
        "--controller",
        addr,
        "--registration-token",
        TOKEN,
    ])
    .args(["--name", name, "--slots", "1"])
    .arg("--data-dir")
    .arg(dir);
    for (k, v) in labels {
        cmd.args(["--label", &format!("{k}={v}")]);
    }
    let child = cmd
        .env("SCABBARD_LOG", process_log_level())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(Proc::new(child, name))
}

/// A shell script that waits until `gate` exists.
fn gated(gate: &Path) -> String {
    format!("while [ ! -f {} ]; do sleep 0.05; done", gate.display())
}

/// The explanation is gone from a task's `-o json` (it ran).
fn assert_cleared(v: &Value) {
    assert!(v.get("placement").is_none(), "{v:#}");
}

#[tokio::test]
async fn a_label_no_agent_has_is_explained_until_an_agent_with_it_joins() -> Result<()> {
    let c = Cluster::start(&["w0", "w1"], 1, &[])?;
    let cli = Cli::new(&c.addr())?;
    cli.agents(2).await?;
    let id = cli
        .ok(&["submit", "--require-label", "os=windows", "--", "true"])?
        .trim()
        .to_string();
    let v = cli.explained(&id, "MISSING_LABEL").await?;
    let p = &v["placement"];
    assert_eq!(v["state"], "TASK_STATE_QUEUED");
    assert_eq!(
        p["message"],
        "0/2 agents eligible: 2 missing label os=windows"
    );
    assert_eq!(p["agentsConsidered"], 2);
    assert_eq!(p["agentsEligible"], 0);
    assert_eq!(
        p["filtered"],
        json!([{"requirement": "label os=windows", "agents": 2}])
    );
    let text = cli.ok(&["task", "get", &id])?;
    assert!(
        text.contains("waiting:   0/2 agents eligible: 2 missing label os=windows"),
        "{text}"
    );
    assert!(
        text.contains("reason:    MISSING_LABEL (0/2 agents eligible)"),
        "{text}"
    );
    // `status` sums the waiting tasks by reason.
    let text = cli.ok(&["status"])?;
    assert!(text.contains("waiting:     1 task missing label"), "{text}");
    let s = cli.json(&["status"])?;
    assert_eq!(
        s["waiting"],
        json!([{"reason": "PLACEMENT_REASON_MISSING_LABEL", "tasks": "1", "workflows": "0"}])
    );
    // `task watch` says why, then follows the task to its end once an agent with the
    // label joins.
    let mut watch = cli
        .cmd()
        .args(["task", "watch", &id])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = Lines::of(watch.stdout.take().context("stdout")?);
    lines.wait_for(" QUEUED")?;
    lines.wait_for("waiting: 0/2 agents eligible: 2 missing label os=windows [MISSING_LABEL]")?;
    // With -o json, the watch's events (JSON Lines) carry the explanation.
    let mut json_watch = cli
        .cmd()
        .args(["-o", "json", "task", "watch", &id])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut events = Lines::of(json_watch.stdout.take().context("stdout")?);
    let ev: Value = serde_json::from_str(&events.wait_for("\"PLACEMENT_REASON_MISSING_LABEL\"")?)?;
    assert_eq!(ev["task"]["placement"]["agentsConsidered"], 2);
    let _win = labelled_worker(
        &c.addr(),
        &c.dir.path().join("win"),
        "win",
        &[("os", "windows")],
    )?;
    lines.wait_for(" SUCCEEDED")?;
    assert_eq!(exit_code(&mut watch)?, 0);
    let last: Value = serde_json::from_str(&events.wait_for("TASK_STATE_SUCCEEDED")?)?;
    assert!(last["task"].get("placement").is_none(), "{last:#}");
    assert_eq!(exit_code(&mut json_watch)?, 0);
    let v = cli.json(&["task", "get", &id])?;
    assert_eq!(v["state"], "TASK_STATE_SUCCEEDED");
    assert_cleared(&v);
    let s = cli.json(&["status"])?;
    assert_eq!(s["waiting"], json!([]), "{s:#}");
    Ok(())
}

#[tokio::test]
async fn a_container_task_waits_for_an_engine_capable_worker() -> Result<()> {
    let mut fleet = Fleet::controller(Vec::new())?;
    let cli = Cli::new(&fleet.addr())?;
    let _plain = Worker::start(&fleet.addr(), &fleet.dir.path().join("plain"), "plain", 2)?;
    cli.agents(1).await?;
    let mut tasks = fleet.tasks().await?;
    let spec = TaskSpec {
        kind: Some(Kind::Container(ContainerTask {
            image: "alpine:3.20".into(),
            steps: vec![ContainerStep {
                args: vec!["sh".into(), "-c".into(), "echo built".into()],
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    };
    let id = submit(&mut tasks, spec).await?;
    let v = cli.explained(&id, "NO_ENGINE").await?;
    let p = &v["placement"];
    assert_eq!(
        p["filtered"],
        json!([{"requirement": "capability dagger", "agents": 1}])
    );
    let msg = p["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("0/1 agents eligible: 1 missing capability dagger"),
        "{msg}"
    );
    assert!(msg.contains("Dagger engine"), "{msg}");
    let text = cli.ok(&["task", "get", &id])?;
    assert!(
        text.contains("reason:    NO_ENGINE (0/1 agents eligible)"),
        "{text}"
    );
    assert!(text.contains("missing capability dagger"), "{text}");
    // A worker with an engine joins: the task runs there.
    fleet.add(WorkerSpec::named("engine")).await?;
    expect_succeeded(&mut tasks, &id, T).await?;
    assert_cleared(&cli.json(&["task", "get", &id])?);
    Ok(())
}

#[tokio::test]
async fn a_task_held_by_an_open_breaker_says_which_until_it_is_reset() -> Result<()> {
    let c = Cluster::start(
        &["w0"],
        2,
        &["--breaker-threshold", "2", "--breaker-open", "60s"],
    )?;
    let cli = Cli::new(&c.addr())?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let with_dep = |script: &str| {
        let mut s = shell(script);
        s.breakers = vec!["registry:flaky".into()];
        s
    };
    for _ in 0..2 {
        let id = submit(&mut tasks, with_dep("exit 1")).await?;
        assert_eq!(
            wait_state(&mut tasks, &id, None, T).await?.state(),
            TaskState::Failed
        );
    }
    let id = submit(&mut tasks, with_dep("echo pulled")).await?;
    let key = "project/default/registry:flaky";
    let v = cli.explained(&id, "BREAKER_OPEN").await?;
    let p = &v["placement"];
    assert_eq!(p["blockedBy"], key);
    assert_eq!(p["agentsConsidered"], 1);
    assert_eq!(p["agentsEligible"], 1);
    let msg = p["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with(&format!("held by circuit breaker {key} (open")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("scabbard breakers reset {key}")),
        "{msg}"
    );
    let text = cli.ok(&["task", "get", &id])?;
    assert!(
        text.contains("reason:    BREAKER_OPEN (1/1 agents eligible)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("waiting:   held by circuit breaker {key}")),
        "{text}"
    );
    let text = cli.ok(&["status"])?;
    assert!(text.contains("waiting:     1 task breaker open"), "{text}");
    // Closing the breaker lets the task through.
    cli.ok(&["breakers", "reset", key])?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_cleared(&cli.json(&["task", "get", &id])?);
    Ok(())
}

#[tokio::test]
async fn a_workflow_pending_on_its_concurrency_group_says_so_until_the_group_frees() -> Result<()> {
    let c = Cluster::start(&["w0"], 2, &[])?;
    let cli = Cli::new(&c.addr())?;
    let mut wfs = c.workflows().await?;
    let gate = c.dir.path().join("gate");
    let group = || {
        Some(ConcurrencyGroup {
            key: "deploy-prod".into(),
            limit: 1,
        })
    };
    let mut first = workflow("deploy-1", vec![node("deploy", &[], &gated(&gate))]);
    first.concurrency = group();
    let first = submit_workflow(&mut wfs, first).await?;
    let mut second = workflow("deploy-2", vec![node("deploy", &[], "true")]);
    second.concurrency = group();
    let second = submit_workflow(&mut wfs, second).await?;
    assert_eq!(second.state(), WorkflowState::Pending);
    let want = "waiting for concurrency group deploy-prod (1/1 workflows running)";
    let v = cli.json(&["workflow", "get", &second.id])?;
    assert_eq!(v["state"], "WORKFLOW_STATE_PENDING");
    assert_eq!(
        v["placement"]["reason"],
        "PLACEMENT_REASON_CONCURRENCY_GROUP"
    );
    assert_eq!(v["placement"]["blockedBy"], "deploy-prod");
    assert_eq!(v["placement"]["message"], want);
    let text = cli.ok(&["workflow", "get", &second.id])?;
    assert!(text.contains(&format!("waiting: {want}")), "{text}");
    assert!(text.contains("reason:    CONCURRENCY_GROUP"), "{text}");
    let text = cli.ok(&["status"])?;
    assert!(text.contains("1 workflow concurrency group"), "{text}");
    // `workflow watch` says why it waits, then follows it to its end once the group frees.
    let mut watch = cli
        .cmd()
        .args(["workflow", "watch", &second.id])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = Lines::of(watch.stdout.take().context("stdout")?);
    lines.wait_for(&format!("waiting: {want}"))?;
    std::fs::write(&gate, b"")?;
    assert_eq!(exit_code(&mut watch)?, 0, "{:#?}", lines.seen);
    assert_eq!(
        wait_workflow(&mut wfs, &first.id, T).await?.state(),
        WorkflowState::Succeeded
    );
    let v = cli.json(&["workflow", "get", &second.id])?;
    assert_eq!(v["state"], "WORKFLOW_STATE_SUCCEEDED");
    assert_cleared(&v);
    Ok(())
}

#[tokio::test]
async fn a_project_at_its_running_quota_holds_the_rest_and_says_so() -> Result<()> {
    let c = Cluster::start(&["w0"], 4, &[])?;
    let cli = Cli::new(&c.addr())?;
    cli.agents(1).await?;
    let mut tasks = tasks_client(&c.addr()).await?;
    cli.ok(&["project", "create", "capped", "--max-running", "1"])?;
    let gate = c.dir.path().join("gate");
    let first = cli
        .ok(&["submit", "--project", "capped", "--sh", &gated(&gate)])?
        .trim()
        .to_string();
    wait_state(&mut tasks, &first, Some(TaskState::Running), T).await?;
    // `submit --wait` says why the task waits (on stderr), then waits for its end.
    let mut wait = cli
        .cmd()
        .args(["submit", "--wait", "--project", "capped", "--", "true"])
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = Lines::of(wait.stderr.take().context("stderr")?);
    let submitted = lines.wait_for("submitted ")?;
    let id = submitted
        .trim()
        .trim_start_matches("submitted ")
        .to_string();
    let want = "project capped is at its running quota (1/1 tasks running)";
    lines.wait_for(&format!("task {id} waiting: {want} [PROJECT_QUOTA]"))?;
    let v = cli.explained(&id, "PROJECT_QUOTA").await?;
    let p = &v["placement"];
    assert_eq!(p["message"], want);
    assert_eq!(p["blockedBy"], "capped");
    assert_eq!(p["agentsConsidered"], 1);
    assert_eq!(p["agentsEligible"], 1);
    let text = cli.ok(&["task", "get", &id])?;
    assert!(text.contains(&format!("waiting:   {want}")), "{text}");
    assert!(
        text.contains("reason:    PROJECT_QUOTA (1/1 agents eligible)"),
        "{text}"
    );
    let s = cli.json(&["status"])?;
    assert_eq!(
        s["waiting"],
        json!([{"reason": "PLACEMENT_REASON_PROJECT_QUOTA", "tasks": "1", "workflows": "0"}])
    );
    // The first task ends: the second runs, and `submit --wait` exits with its status.
    std::fs::write(&gate, b"")?;
    assert_eq!(exit_code(&mut wait)?, 0, "{:#?}", lines.seen);
    let v = cli.json(&["task", "get", &id])?;
    assert_eq!(v["state"], "TASK_STATE_SUCCEEDED");
    assert_cleared(&v);
    Ok(())
}

#[tokio::test]
async fn a_running_workflow_says_which_node_waits_and_why() -> Result<()> {
    let c = Cluster::start(&["w0"], 1, &[])?;
    let cli = Cli::new(&c.addr())?;
    cli.agents(1).await?;
    let mut wfs = c.workflows().await?;
    let mut build = node("build", &[], "true");
    if let Some(spec) = build.spec.as_mut() {
        spec.requirements = Some(scabbard_common::proto::Requirements {
            labels: [("os".to_string(), "plan9".to_string())].into(),
            ..Default::default()
        });
    }
    let wf = submit_workflow(&mut wfs, workflow("needs-plan9", vec![build])).await?;
    let want = "node build: 0/1 agents eligible: 1 missing label os=plan9";
    let v = eventually("the workflow explained", T, || async {
        let v = cli.json(&["workflow", "get", &wf.id]).ok()?;
        (v["placement"]["message"] == want).then_some(v)
    })
    .await?;
    assert_eq!(v["state"], "WORKFLOW_STATE_RUNNING");
    assert_eq!(v["placement"]["reason"], "PLACEMENT_REASON_MISSING_LABEL");
    let text = cli.ok(&["workflow", "get", &wf.id])?;
    assert!(text.contains(&format!("waiting: {want}")), "{text}");
    assert!(text.contains("reason:    MISSING_LABEL"), "{text}");
    cli.ok(&["workflow", "cancel", &wf.id])?;
    let v = cli.json(&["workflow", "get", &wf.id])?;
    assert_cleared(&v);
    Ok(())
}
