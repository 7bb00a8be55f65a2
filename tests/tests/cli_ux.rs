//! The operator's CLI as a user meets it, through the real `scabbard` binary against real
//! controller and worker processes (issue 18): contexts switch the controller every command
//! talks to; Ctrl-C (SIGINT) on a follow says how to cancel, and `--cancel-on-interrupt`
//! cancels; exit codes keep the CLI's failures (64–78) apart from a task's own; a worker
//! with a wrong registration token stops non-zero; rate-limited calls are retried; and the
//! small mismatches between the docs and the binary stay fixed (durations need units,
//! unknown audit actions are refused, status without a token says so, resetting a breaker
//! that never opened is a no-op, a typo'd template name, workflow validation at once).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use scabbard_common::proto::TaskState;
use scabbard_tests::*;

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `scabbard <args>` with a private config dir and nothing from the environment that
/// picks a controller or a token.
fn bare(config: &Path, args: &[&str]) -> Command {
    let mut c = cli(config);
    c.env_remove("SCABBARD_TOKEN")
        .env_remove("SCABBARD_CONTROLLER")
        .env_remove("SCABBARD_CONTEXT")
        .args(args);
    c
}

fn controller(dir: &Path, extra: &[&str]) -> anyhow::Result<Controller> {
    Controller::start(
        dir,
        0,
        &ControllerOpts {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..ControllerOpts::default()
        },
    )
}

/// `scabbard login --context NAME --controller ADDR`, the token on stdin.
fn login(config: &Path, name: &str, addr: &str) -> anyhow::Result<Output> {
    let mut child = bare(config, &["login", "--context", name, "--controller", addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{ADMIN_TOKEN}\n").as_bytes())?;
    Ok(child.wait_with_output()?)
}

#[test]
fn a_context_switch_changes_the_controller_of_every_command() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    let a = controller(&dir.path().join("a"), &[])?;
    let b = controller(&dir.path().join("b"), &[])?;
    let (addr_a, addr_b) = (a.addr.to_string(), b.addr.to_string());
    let end = Instant::now() + Duration::from_secs(20);
    for (name, addr) in [("alpha", &addr_a), ("beta", &addr_b)] {
        loop {
            let out = login(&config, name, addr)?;
            if out.status.success() {
                assert!(stdout(&out).contains(&format!("context {name:?} is current")));
                break;
            }
            assert!(Instant::now() < end, "login to {addr}: {}", text(&out));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Contexts are private and hold no token.
    let file = config.join("contexts.toml");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file)?.permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(!std::fs::read_to_string(&file)?.contains(ADMIN_TOKEN));

    // The last login is current; `context list` marks it.
    let out = bare(&config, &["context", "list", "-o", "json"]).output()?;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let current: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| c["current"] == true)
        .map(|c| c["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(current, ["beta"], "{list}");

    // A task submitted through alpha exists on alpha only.
    let out = bare(&config, &["context", "use", "alpha"]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let out = bare(&config, &["submit", "--noop", "--name", "in-alpha"]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let id = stdout(&out).trim().to_string();
    let status = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = bare(&config, args).output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    assert_eq!(
        status(&["status", "-o", "json"])?["answeredBy"],
        addr_a.as_str()
    );
    let out = bare(&config, &["task", "get", &id]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let who = bare(&config, &["whoami"]).output()?;
    assert!(stdout(&who).contains("context:    alpha"), "{}", text(&who));

    // Switched: status, get, list and whoami all talk to beta.
    let out = bare(&config, &["context", "use", "beta"]).output()?;
    assert!(stdout(&out).contains("switched to context \"beta\""));
    assert_eq!(
        status(&["status", "-o", "json"])?["answeredBy"],
        addr_b.as_str()
    );
    let out = bare(&config, &["task", "get", &id]).output()?;
    assert_eq!(
        out.status.code(),
        Some(66),
        "not found on beta: {}",
        text(&out)
    );
    let list = status(&["task", "list", "-o", "json"])?;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    let who = bare(&config, &["whoami"]).output()?;
    assert!(stdout(&who).contains("context:    beta"), "{}", text(&who));

    // One command elsewhere: --context and SCABBARD_CONTEXT, without switching.
    let out = bare(&config, &["--context", "alpha", "task", "get", &id]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let out = bare(&config, &["task", "get", &id])
        .env("SCABBARD_CONTEXT", "alpha")
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let out = bare(&config, &["context", "show"]).output()?;
    assert!(stdout(&out).contains(&addr_b), "{}", text(&out));

    // An unknown context: configuration error, naming the known ones.
    let out = bare(&config, &["--context", "gamma", "task", "list"]).output()?;
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        stderr(&out).contains("known contexts: alpha, beta"),
        "{}",
        text(&out)
    );
    Ok(())
}

/// A `submit` following a long task, its stderr lines forwarded to a channel.
struct Following {
    proc: Proc,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Following {
    fn start(config: &Path, addr: &str, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = cli(config)
            .env("SCABBARD_CONTROLLER", addr)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            proc: Proc::new(child, "scabbard submit"),
            lines,
            seen: Vec::new(),
        })
    }

    /// The first stderr line containing `part` (waits up to 30 s).
    fn line(&mut self, part: &str) -> anyhow::Result<String> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(part)) {
                return Ok(l.clone());
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => anyhow::bail!("no line with {part:?} in {:?}", self.seen),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_says_how_to_cancel_and_cancel_on_interrupt_cancels() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    let ctl = controller(&dir.path().join("ctl"), &[])?;
    let addr = ctl.addr.to_string();
    let _w = Worker::start(&addr, &dir.path().join("w"), "w1", 4)?;
    let mut tasks = tasks_client(&addr).await?;

    for cancel in [false, true] {
        let args: &[&str] = if cancel {
            &[
                "submit",
                "--follow",
                "--cancel-on-interrupt",
                "--sh",
                "sleep 120",
            ]
        } else {
            &["submit", "--wait", "--sh", "sleep 120"]
        };
        let mut f = Following::start(&config, &addr, args)?;
        let line = f.line("submitted ")?;
        let id = line.trim().trim_start_matches("submitted ").to_string();
        wait_state(
            &mut tasks,
            &id,
            Some(TaskState::Running),
            Duration::from_secs(30),
        )
        .await?;
        f.proc.signal(libc::SIGINT);
        let st = f.proc.wait_exit(Duration::from_secs(20)).expect("exited");
        assert_eq!(st.code(), Some(130), "{:?}", f.seen);
        if cancel {
            f.line(&format!("interrupted: task {id} cancelled"))?;
            let t = wait_state(&mut tasks, &id, None, Duration::from_secs(30)).await?;
            assert_eq!(t.state(), TaskState::Cancelled, "{t:?}");
        } else {
            let msg = f.line("interrupted")?;
            assert!(
                msg.contains(&format!("`scabbard task cancel {id}`")),
                "says how to cancel: {msg}"
            );
            let t = get(&mut tasks, &id).await?;
            assert_eq!(t.state(), TaskState::Running, "the task keeps running");
            let out = cli(&config)
                .env("SCABBARD_CONTROLLER", &addr)
                .args(["task", "cancel", &id])
                .output()?;
            assert!(out.status.success(), "{}", text(&out));
        }
    }

    // The same for a workflow followed with --watch.
    let file = dir.path().join("slow.yaml");
    std::fs::write(
        &file,
        "name: slow\ntasks:\n  - {name: nap, shell: {command: [sleep, '120']}}\n",
    )?;
    let file = file.to_str().expect("utf-8");
    let mut f = Following::start(
        &config,
        &addr,
        &[
            "workflow",
            "submit",
            "-f",
            file,
            "--watch",
            "--cancel-on-interrupt",
        ],
    )?;
    let id = f
        .line("submitted ")?
        .trim()
        .trim_start_matches("submitted ")
        .to_string();
    let state = |id: &str| -> anyhow::Result<String> {
        let out = cli(&config)
            .env("SCABBARD_CONTROLLER", &addr)
            .args(["workflow", "get", id, "-o", "json"])
            .output()?;
        let w: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(w["state"].as_str().unwrap_or("").to_string())
    };
    let end = Instant::now() + Duration::from_secs(30);
    while state(&id)? != "WORKFLOW_STATE_RUNNING" {
        assert!(Instant::now() < end, "workflow {id} never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    f.proc.signal(libc::SIGINT);
    let st = f.proc.wait_exit(Duration::from_secs(20)).expect("exited");
    assert_eq!(st.code(), Some(130), "{:?}", f.seen);
    f.line(&format!("interrupted: workflow {id} cancelled"))?;
    let end = Instant::now() + Duration::from_secs(30);
    while state(&id)? != "WORKFLOW_STATE_CANCELLED" {
        assert!(Instant::now() < end, "workflow {id} not cancelled");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn a_worker_with_a_wrong_registration_token_stops_non_zero() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = controller(&dir.path().join("ctl"), &[])?;
    let started = Instant::now();
    let child = Command::new(scabbard_bin())
        .args(["worker", "--controller", &ctl.addr.to_string()])
        .args(["--registration-token", "not-the-registration-token-at-all"])
        .args(["--name", "wrong"])
        .arg("--data-dir")
        .arg(dir.path().join("w"))
        .env("SCABBARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = child.wait_with_output()?;
    let err = stderr(&out);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("the worker stops"), "{err}");
    assert!(err.contains("registration token"), "{err}");
    assert!(
        !err.contains("connection lost"),
        "no connection ever existed: {err}"
    );
    Ok(())
}

/// One controller and a worker, for the small checks.
struct Env {
    dir: tempfile::TempDir,
    ctl: Controller,
    _w: Worker,
}

impl Env {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ctl = controller(&dir.path().join("ctl"), &[])?;
        let w = Worker::start(&ctl.addr.to_string(), &dir.path().join("w"), "w1", 2)?;
        Ok(Self { dir, ctl, _w: w })
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(cli(&self.config())
            .env("SCABBARD_CONTROLLER", self.ctl.addr.to_string())
            .args(args)
            .output()?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_units_and_the_docs_mismatches() -> anyhow::Result<()> {
    let env = Env::start()?;
    let addr = env.ctl.addr.to_string();
    wait_agent(&addr, "the worker to connect", |_| true).await?;

    // A task's exit code 1 and the CLI's own failures never share a code.
    let out = env.run(&["submit", "--wait", "--sh", "exit 1"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = env.run(&["task", "get", "01AAAAAAAAAAAAAAAAAAAAAAAA"])?;
    assert_eq!(out.status.code(), Some(66), "{}", text(&out));
    let out = env.run(&["task", "list", "--nope"])?;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let out = cli(&env.config())
        .env_remove("SCABBARD_TOKEN")
        .env("SCABBARD_CONTROLLER", &addr)
        .args(["task", "list"])
        .output()?;
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));

    // Durations need a unit, and the error says which.
    let out = env.run(&["submit", "--timeout", "10", "--noop"])?;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        stderr(&out).contains("add a unit, e.g. 10s"),
        "{}",
        text(&out)
    );

    // A typo'd audit action is refused with the valid ones; a real one is fine.
    let out = env.run(&["audit", "--action", "token.revok"])?;
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    assert!(
        stderr(&out).contains("unknown audit action \"token.revok\"")
            && stderr(&out).contains("token.revoke"),
        "{}",
        text(&out)
    );
    let out = env.run(&["audit", "--action", "token.revoke"])?;
    assert!(out.status.success(), "{}", text(&out));

    // Status without a token says what it cannot show.
    let out = cli(&env.config())
        .env_remove("SCABBARD_TOKEN")
        .env("SCABBARD_CONTROLLER", &addr)
        .arg("status")
        .output()?;
    assert!(
        stdout(&out).contains("a token is needed") && !stdout(&out).contains("0 connected"),
        "{}",
        text(&out)
    );

    // Resetting a breaker that never opened is a no-op that says so.
    let out = env.run(&["breakers", "reset", "agent:01AAAAAAAAAAAAAAAAAAAAAAAA"])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("has never opened"), "{}", text(&out));

    // task list --state: comma-separated, every state.
    let out = env.run(&["task", "list", "--state", "queued,retry_wait,timed_out"])?;
    assert!(out.status.success(), "{}", text(&out));

    // A typo'd template name: the name quoted, the list outside the quotes.
    let out = env.run(&["template", "show", "ci-pipelin"])?;
    assert_eq!(out.status.code(), Some(66), "{}", text(&out));
    assert!(
        stderr(&out).contains("template \"ci-pipelin\" not found (available: "),
        "{}",
        text(&out)
    );

    // Workflow validation: a cycle and a bad expression in one answer.
    let wf = env.dir.path().join("bad.yaml");
    std::fs::write(
        &wf,
        "name: bad\ntasks:\n  - name: a\n    depends_on: [b]\n    shell: {command: [echo, '${{ nope }}']}\n  - name: b\n    depends_on: [a]\n    shell: {command: ['true']}\n",
    )?;
    let out = env.run(&["workflow", "submit", "-f", wf.to_str().expect("utf-8")])?;
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("cycle") && err.contains("tasks[0] (a)"),
        "{err}"
    );
    assert!(err.contains("is not an output reference"), "{err}");
    Ok(())
}

#[test]
fn rate_limited_reads_are_retried_after_retry_after_ms() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = controller(
        &dir.path().join("ctl"),
        &["--rate-limit", "1", "--rate-burst", "1"],
    )?;
    let config = dir.path().join("config");
    // A burst of reads with one token at 1/s: refused with RESOURCE_EXHAUSTED and
    // `retry-after-ms`, retried after it, never failed.
    let mut noted = false;
    for _ in 0..5 {
        let out = cli(&config)
            .env("SCABBARD_CONTROLLER", ctl.addr.to_string())
            .args(["task", "list", "--limit", "1"])
            .output()?;
        assert!(out.status.success(), "{}", text(&out));
        noted |= stderr(&out).contains("trying again");
    }
    assert!(noted, "at least one call was rate limited and retried");
    Ok(())
}

/// The leader's address as seen through `addrs`, once the store is healthy.
async fn leader(addrs: &str) -> Option<String> {
    let ch = scabbard_common::client::connect_leader(addrs).await.ok()?;
    let s = scabbard_common::client::AdminServiceClient::new(ch)
        .cluster_status(scabbard_common::proto::ClusterStatusRequest {})
        .await
        .ok()?
        .into_inner();
    (s.answered_by_leader && s.store_healthy).then_some(s.leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_survives_a_leader_kill() -> anyhow::Result<()> {
    let mut cluster = scabbard_tests::etcd::EtcdControllers::start(2, 1, 2)?;
    let addrs = cluster.addrs();
    let first = eventually("a leader", Duration::from_secs(60), || leader(&addrs)).await?;
    wait_agent(&addrs, "the worker to connect", |_| true).await?;
    let config = cluster.dir.path().join("cli-config");
    let mut child = cli(&config)
        .env("SCABBARD_CONTROLLER", &addrs)
        .args(["submit", "--follow", "--sh"])
        .arg("for i in $(seq 1 30); do echo line$i; sleep 0.2; done")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let errs = std::thread::spawn(move || {
        BufReader::new(err)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut proc = Proc::new(child, "scabbard submit --follow");
    let mut lines = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    while !lines.iter().any(|l: &String| l == "line3") {
        lines.push(rx.recv_timeout(end.saturating_duration_since(Instant::now()))?);
    }
    // Kill the leader mid-follow.
    let i = cluster
        .controllers
        .iter()
        .position(|c| c.addr.to_string() == first)
        .expect("the leader is one of ours");
    cluster.controllers[i].proc.kill9();
    let st = tokio::task::spawn_blocking(move || proc.wait_exit(Duration::from_secs(90)))
        .await?
        .expect("exited");
    lines.extend(rx.try_iter());
    let errs = errs.join().expect("stderr reader");
    assert_eq!(st.code(), Some(0), "lines: {lines:?}, stderr: {errs:?}");
    assert!(
        errs.iter()
            .any(|l| l.contains("reconnecting to the leader")),
        "the stream broke and was resumed: {errs:?}"
    );
    assert!(!errs.iter().any(|l| l.starts_with("error:")), "{errs:?}");
    assert!(lines.iter().any(|l| l == "line30"), "{lines:?}");
    for n in 1..=30 {
        let want = format!("line{n}");
        assert!(
            lines.iter().filter(|l| **l == want).count() <= 1,
            "{want} printed twice: {lines:?}"
        );
    }
    Ok(())
}
