//! A traced test cluster: a controller and two workers as real processes, each with its
//! own `OTEL_SERVICE_NAME` and (optionally) exporting to a test receiver; the CLI under
//! test; and helpers to wait for and inspect the traces they produce.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{ReceivedSpan, Receiver};
use crate::fleet::{EngineState, Fixtures, fake_dagger_bin};
use crate::*;

/// How long a test waits for anything.
pub const T: Duration = Duration::from_secs(60);
/// The controller's `OTEL_SERVICE_NAME`.
pub const CONTROLLER: &str = "ctl-under-test";
/// The CLI's `OTEL_SERVICE_NAME` (workers: `worker-wa`, `worker-wb`).
pub const CLI: &str = "cli-under-test";

/// A controller and two workers, exporting to `endpoint` when given (each its own
/// `OTEL_SERVICE_NAME` either way).
pub struct Traced {
    /// Everything of the cluster lives here.
    pub dir: tempfile::TempDir,
    /// The controller process.
    pub controller: Proc,
    /// Its address (the same after a restart).
    pub addr: SocketAddr,
    /// The workers (killed on drop).
    pub workers: Vec<Proc>,
    /// Where every process exports (`None`: nowhere).
    pub endpoint: Option<String>,
    /// The workers' log lines (JSON), as they come.
    pub worker_logs: Arc<Mutex<Vec<String>>>,
}

/// The environment of a process under test.
pub fn otel_env(cmd: &mut Command, endpoint: Option<&str>, service: &str) {
    cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env("OTEL_SERVICE_NAME", service)
        // Export within 100 ms instead of 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    if let Some(ep) = endpoint {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", ep);
    }
}

/// Starts a controller on `listen` with its data in `dir`; returns it and its address.
pub fn spawn_controller(
    dir: &Path,
    listen: &str,
    endpoint: Option<&str>,
) -> Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(scabbard_bin());
    cmd.args(["controller", "--listen", listen])
        .args(["--registration-token", TOKEN])
        .arg("--data-dir")
        .arg(dir.join("controller"))
        .args(["--agent-lease-ttl", "2s", "--heartbeat-interval", "200ms"])
        .env("SCABBARD_LOG", process_log_level())
        .env("SCABBARD_BOOTSTRAP_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    otel_env(&mut cmd, endpoint, CONTROLLER);
    let mut child = cmd.spawn().context("spawn controller")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let controller = Proc::new(child, "controller");
    let Some(bound) = line.trim().strip_prefix("listening on ") else {
        bail!("controller did not start: {line:?}");
    };
    Ok((controller, bound.parse()?))
}

impl Traced {
    /// `worker_config(name, dir)`: the worker's config file.
    pub fn start(
        endpoint: Option<&str>,
        worker_config: impl Fn(&str, &Path) -> Result<String>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // A fixed port: a restarted controller is found again by the workers.
        let listen = format!("127.0.0.1:{}", free_port());
        let (controller, addr) = spawn_controller(dir.path(), &listen, endpoint)?;
        let mut workers = Vec::new();
        let worker_logs = Arc::new(Mutex::new(Vec::new()));
        for name in ["wa", "wb"] {
            let data = dir.path().join(name);
            let config = dir.path().join(format!("{name}.toml"));
            std::fs::write(&config, worker_config(name, dir.path())?)?;
            let mut cmd = Command::new(scabbard_bin());
            cmd.arg("worker")
                .arg("--config")
                .arg(&config)
                .args(["--controller", &addr.to_string()])
                .args([
                    "--registration-token",
                    TOKEN,
                    "--name",
                    name,
                    "--slots",
                    "2",
                ])
                .arg("--data-dir")
                .arg(&data)
                .arg("--log-json")
                .env("SCABBARD_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            otel_env(&mut cmd, endpoint, &format!("worker-{name}"));
            let mut child = cmd.spawn().context("spawn worker")?;
            let stderr = child.stderr.take().context("stderr")?;
            let lines = worker_logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("{line}");
                    lines.lock().expect("log lines").push(line);
                }
            });
            workers.push(Proc::new(child, name));
        }
        Ok(Self {
            dir,
            controller,
            addr,
            workers,
            endpoint: endpoint.map(str::to_string),
            worker_logs,
        })
    }

    /// Kills the controller (SIGKILL) and starts it again on the same address and data.
    pub fn restart_controller(&mut self) -> Result<()> {
        self.controller.kill9();
        let (controller, addr) = spawn_controller(
            self.dir.path(),
            &self.addr.to_string(),
            self.endpoint.as_deref(),
        )?;
        self.controller = controller;
        self.addr = addr;
        Ok(())
    }

    /// Waits until both workers registered.
    pub async fn ready(&self) -> Result<()> {
        let admin = admin_channel(&self.addr.to_string()).await?;
        let admin = scabbard_common::client::AdminServiceClient::new(admin);
        eventually("both workers to register", T, || {
            let mut admin = admin.clone();
            async move {
                let agents = admin
                    .list_agents(scabbard_common::proto::ListAgentsRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .agents;
                (agents.len() == 2).then_some(())
            }
        })
        .await
    }

    /// Runs `scabbard <args>` as the CLI under test; returns its stderr (it must succeed).
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = cli(&self.dir.path().join("cli"));
        cmd.args(args)
            .args(["--controller", &self.addr.to_string()]);
        otel_env(&mut cmd, self.endpoint.as_deref(), CLI);
        // Not blocking: the receiver runs on this test's runtime.
        let out = tokio::process::Command::from(cmd).output().await?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            bail!(
                "scabbard {args:?} failed: {stderr}{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(stderr)
    }
}

/// The id after "submitted " in a CLI's stderr.
pub fn submitted_id(stderr: &str) -> Result<String> {
    stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("submitted "))
        .map(|s| s.trim().to_string())
        .with_context(|| format!("no \"submitted <id>\" in {stderr:?}"))
}

/// The services that sent `spans`.
pub fn services<'a>(spans: &[&'a ReceivedSpan]) -> BTreeSet<&'a str> {
    spans.iter().map(|s| s.service.as_str()).collect()
}

/// The spans called `name`.
pub fn named<'a>(spans: &[&'a ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).copied().collect()
}

/// Waits until trace `trace_id` holds spans named `names` (at least `n` of each), then
/// returns it.
pub async fn wait_trace(
    rx: &Receiver,
    trace_id: &str,
    names: &[(&str, usize)],
) -> Result<Vec<ReceivedSpan>> {
    let spans = rx
        .wait_for(&format!("trace {trace_id} to hold {names:?}"), T, |all| {
            let t = otlp::trace(all, trace_id);
            names
                .iter()
                .all(|(name, n)| t.iter().filter(|s| s.name == *name).count() >= *n)
        })
        .await?;
    Ok(otlp::trace(&spans, trace_id).into_iter().cloned().collect())
}

/// Workers with no config of their own.
pub fn plain(_: &str, _: &Path) -> Result<String> {
    Ok(String::new())
}
/// A shell script printing the `TRACEPARENT` it got.
pub const ECHO: &str = "echo TRACEPARENT=$TRACEPARENT";

/// Workers driving the fake engine (`fake-dagger`), one engine state each.
pub fn with_fake_engine(name: &str, dir: &Path) -> Result<String> {
    let fixtures = Fixtures::new(dir.join("world"))?;
    let engine = EngineState::new(dir.join(format!("engine-{name}")))?;
    Ok(format!(
        "[dagger]\nprobe_interval_ms = 1000\ncli = {:?}\nrunner_host = {:?}\nkill_grace_ms = 500\nsession_start_timeout_ms = 20000\n",
        fake_dagger_bin().display().to_string(),
        engine.runner_host(Some(&fixtures)),
    ))
}
