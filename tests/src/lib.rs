//! Test harness: starts real `scabbard` controller and worker processes on loopback (free
//! ports, temp data dirs), a TCP proxy that can cut connections, and client helpers that
//! wait on conditions with deadlines. Every child is killed when its handle drops.

pub mod agent;
pub mod chaos;
pub mod etcd;
pub mod fleet;
pub mod moto;
pub mod otlp;
pub mod proxy;
pub mod sec;
pub mod wf;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use scabbard_common::client::{self, AuthedChannel, TaskServiceClient};
use scabbard_common::proto::{
    GetTaskRequest, ShellTask, SubmitTaskRequest, Task, TaskLogsRequest, TaskSpec, TaskState,
    task_spec::Kind,
};
use tonic::transport::Channel;

/// Registration token used by every test cluster.
pub const TOKEN: &str = "test-registration-token-0123456789";

/// Path of the `scabbard` binary built alongside the tests (or the benchmark), or
/// `SCABBARD_BIN`.
pub fn scabbard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SCABBARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> (a test) or target/<profile>/<bin> → target/<profile>/scabbard
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let bin = dir.join("scabbard");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// The log level of the controllers and workers the harness starts: `info`, or
/// `SCABBARD_TEST_LOG` (the benchmark's chaos and failover modes set `warn`).
pub fn process_log_level() -> String {
    std::env::var("SCABBARD_TEST_LOG").unwrap_or_else(|_| "info".into())
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    child: Option<Child>,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Owns `child` (killed on drop); `name` is for messages.
    pub fn new(child: Child, name: &str) -> Self {
        Self {
            child: Some(child),
            name: name.into(),
        }
    }

    /// PID of the process.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY-free: libc::kill is an FFI call; a stale pid is harmless here.
            send_signal(c.id() as i32, sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `deadline` for exit (SIGKILL after).
    pub fn terminate(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_exit(deadline)
    }

    /// Waits up to `deadline` for the process to exit by itself (SIGKILL after).
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

#[allow(unsafe_code)]
fn send_signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether a process (or group member) with `pid` exists.
#[allow(unsafe_code)]
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill(pid, 0) only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A controller process.
pub struct Controller {
    /// The process.
    pub proc: Proc,
    /// Its address.
    pub addr: SocketAddr,
    /// Its data dir.
    pub data_dir: PathBuf,
}

/// Options of a test controller.
#[derive(Clone)]
pub struct ControllerOpts {
    /// Agent lease / grace period.
    pub lease: &'static str,
    /// Heartbeat interval.
    pub heartbeat: &'static str,
    /// More flags (e.g. `--store etcd …`).
    pub extra: Vec<String>,
}

impl Default for ControllerOpts {
    fn default() -> Self {
        Self {
            lease: "2s",
            heartbeat: "200ms",
            extra: Vec::new(),
        }
    }
}

impl Controller {
    /// Starts a controller on `port` with `data_dir` (port 0: the system picks a free one,
    /// read back from the controller's first line).
    pub fn start(data_dir: &Path, port: u16, opts: &ControllerOpts) -> Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut child = Command::new(scabbard_bin())
            .args([
                "controller",
                "--listen",
                &addr.to_string(),
                "--registration-token",
                TOKEN,
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--agent-lease-ttl",
                opts.lease,
                "--heartbeat-interval",
                opts.heartbeat,
            ])
            .args(&opts.extra)
            // etcd mode needs an advertise address; tests on a fixed port give theirs.
            .args(
                (opts.extra.iter().any(|a| a == "etcd")
                    && port != 0
                    && !opts.extra.iter().any(|a| a == "--advertise-addr"))
                .then(|| ["--advertise-addr".to_string(), addr.to_string()])
                .into_iter()
                .flatten(),
            )
            .env("SCABBARD_LOG", process_log_level())
            .env("SCABBARD_BOOTSTRAP_TOKEN", ADMIN_TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn controller")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(bound) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("controller did not start: {line:?}");
        };
        let addr: SocketAddr = bound.parse().unwrap_or(addr);
        Ok(Self {
            proc: Proc {
                child: Some(child),
                name: "controller".into(),
            },
            addr,
            data_dir: data_dir.to_path_buf(),
        })
    }
}

/// A worker process.
pub struct Worker {
    /// The process.
    pub proc: Proc,
    /// Its data dir.
    pub data_dir: PathBuf,
}

impl Worker {
    /// Starts a worker connecting to `controller` with `slots`, labelled `name=<name>`.
    pub fn start(controller: &str, data_dir: &Path, name: &str, slots: u32) -> Result<Self> {
        Self::spawn(controller, data_dir, name, slots, None)
    }

    /// Like [`Worker::start`], with a configuration file holding `toml` (written with mode
    /// 0600 as `<data_dir>.toml`; flags still win over it).
    pub fn start_with_config(
        controller: &str,
        data_dir: &Path,
        name: &str,
        slots: u32,
        toml: &str,
    ) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.with_extension("toml");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut f, toml.as_bytes())?;
        Self::spawn(controller, data_dir, name, slots, Some(&path))
    }

    fn spawn(
        controller: &str,
        data_dir: &Path,
        name: &str,
        slots: u32,
        config: Option<&Path>,
    ) -> Result<Self> {
        let mut cmd = Command::new(scabbard_bin());
        cmd.arg("worker");
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        let child = cmd
            .args(["--controller", controller, "--registration-token", TOKEN])
            .args([
                "--name",
                name,
                "--label",
                &format!("name={name}"),
                "--slots",
                &slots.to_string(),
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .env("SCABBARD_LOG", process_log_level())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn worker")?;
        Ok(Self {
            proc: Proc {
                child: Some(child),
                name: name.into(),
            },
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// The agent id this worker registered as (after it registered).
    pub fn agent_id(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join("identity"))
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
    }

    /// The agent token this worker holds.
    pub fn agent_token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join("identity"))
            .ok()
            .and_then(|s| s.lines().nth(1).map(str::to_string))
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `AdminService.ListAgents` (on the leader among `addrs`) until some agent satisfies
/// `pred`; returns that agent.
pub async fn wait_agent(
    addrs: &str,
    what: &str,
    pred: impl Fn(&scabbard_common::proto::Agent) -> bool,
) -> Result<scabbard_common::proto::Agent> {
    let admin = client::AdminServiceClient::new(admin_channel(addrs).await?);
    let pred = &pred;
    eventually(what, Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let req = scabbard_common::proto::ListAgentsRequest {};
            let agents = admin.list_agents(req).await.ok()?.into_inner().agents;
            agents.into_iter().find(|a| pred(a))
        }
    })
    .await
}

/// The admin token every test controller is bootstrapped with.
pub const ADMIN_TOKEN: &str = "scbd_api_test-admin-0123456789abcdef0123456789abcdef";

/// A task client as used by the tests (admin token on every call).
pub type Tasks = TaskServiceClient<AuthedChannel>;

/// A channel to the leader among `addrs` carrying the admin token.
pub async fn admin_channel(addrs: &str) -> Result<AuthedChannel> {
    Ok(client::authed(
        client::connect_leader(addrs).await?,
        Some(ADMIN_TOKEN),
    )?)
}

/// `channel` carrying `token` on every call.
pub fn with_token(channel: Channel, token: &str) -> AuthedChannel {
    client::authed(channel, Some(token)).expect("token is valid metadata")
}

/// A task client for `addr` with the admin token, retrying the connection until the
/// controller answers.
pub async fn tasks_client(addr: &str) -> Result<Tasks> {
    let ch = eventually(
        "controller to accept connections",
        Duration::from_secs(20),
        || async { client::connect(addr).await.ok() },
    )
    .await?;
    Ok(TaskServiceClient::new(with_token(ch, ADMIN_TOKEN)))
}

/// A `scabbard` CLI command using the admin token and a private config dir.
pub fn cli(config_dir: &Path) -> Command {
    let mut c = Command::new(scabbard_bin());
    c.env("SCABBARD_TOKEN", ADMIN_TOKEN)
        .env("SCABBARD_CONFIG_DIR", config_dir)
        .env("SCABBARD_LOG", "warn");
    c
}

/// A shell task spec.
pub fn shell(script: &str) -> TaskSpec {
    TaskSpec {
        kind: Some(Kind::Shell(ShellTask {
            command: vec!["sh".into(), "-c".into(), script.into()],
        })),
        ..Default::default()
    }
}

/// Submits a spec; returns the task id.
pub async fn submit(c: &mut Tasks, spec: TaskSpec) -> Result<String> {
    let r = c
        .submit(SubmitTaskRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
            project: String::new(),
        })
        .await?
        .into_inner();
    Ok(r.task.ok_or_else(|| anyhow!("no task in response"))?.id)
}

/// Gets a task.
pub async fn get(c: &mut Tasks, id: &str) -> Result<Task> {
    Ok(c.get(GetTaskRequest { id: id.into() }).await?.into_inner())
}

/// Waits until the task reaches `state` (or any final state when `state` is None).
pub async fn wait_state(
    c: &mut Tasks,
    id: &str,
    state: Option<TaskState>,
    timeout: Duration,
) -> Result<Task> {
    let end = Instant::now() + timeout;
    loop {
        let t = get(c, id).await?;
        let done = match state {
            Some(s) => t.state() == s,
            None => scabbard_common::is_final(t.state()),
        };
        if done {
            return Ok(t);
        }
        if Instant::now() > end {
            bail!(
                "task {id} is {:?} after {timeout:?} (wanted {state:?}): {t:?}",
                t.state()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whole log of a task's latest attempt (or `attempt`), as text.
pub async fn logs(c: &mut Tasks, id: &str, attempt: u32, follow: bool) -> Result<String> {
    let mut s = c
        .logs(TaskLogsRequest {
            task_id: id.into(),
            attempt,
            follow,
            from_seq: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    let mut expect = 0;
    while let Some(chunk) = s.message().await? {
        if chunk.seq != expect {
            bail!(
                "log chunk out of order: got seq {}, expected {expect}",
                chunk.seq
            );
        }
        expect += 1;
        out.extend_from_slice(&chunk.data);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A controller running inside the test process on the embedded store (admin token
/// [`ADMIN_TOKEN`], registration token [`TOKEN`]); stopped on drop.
pub struct InProc {
    _dir: tempfile::TempDir,
    /// The running controller.
    pub ctl: scabbard_controller::RunningController,
}

impl InProc {
    /// The test defaults (1 MiB message limit, fast heartbeats) in a fresh data dir, after
    /// `tune` adjusted them.
    fn config(
        tune: impl FnOnce(&mut scabbard_controller::ControllerConfig),
    ) -> Result<(tempfile::TempDir, scabbard_controller::ControllerConfig)> {
        let dir = tempfile::tempdir()?;
        let mut cfg = scabbard_controller::ControllerConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: dir.path().to_path_buf(),
            registration_token: TOKEN.into(),
            bootstrap_token: Some(ADMIN_TOKEN.into()),
            max_message_bytes: 1024 * 1024,
            heartbeat_interval_ms: 200,
            agent_lease_ttl_ms: 2_000,
            ..scabbard_controller::ControllerConfig::default()
        };
        tune(&mut cfg);
        Ok((dir, cfg))
    }

    /// Starts one with the test defaults (1 MiB message limit).
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts one after `tune` adjusted the config.
    pub async fn start_with(
        tune: impl FnOnce(&mut scabbard_controller::ControllerConfig),
    ) -> Result<Self> {
        let (dir, cfg) = Self::config(tune)?;
        let ctl = scabbard_controller::spawn(cfg).await?;
        Ok(Self { _dir: dir, ctl })
    }

    /// Like [`InProc::start_with`], serving on `store` (e.g. a fault-injecting wrapper
    /// around a real one) instead of opening the embedded store itself.
    pub async fn start_on(
        store: std::sync::Arc<dyn scabbard_controller::store::Store>,
        tune: impl FnOnce(&mut scabbard_controller::ControllerConfig),
    ) -> Result<Self> {
        let (dir, cfg) = Self::config(tune)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(scabbard_controller::server::serve(
            cfg,
            store,
            listener,
            shutdown.clone(),
        ));
        let ctl = scabbard_controller::RunningController {
            addr,
            shutdown,
            task,
        };
        Ok(Self { _dir: dir, ctl })
    }

    /// Its address.
    pub fn addr(&self) -> String {
        self.ctl.addr.to_string()
    }

    /// A plaintext channel to it carrying `token`.
    pub async fn channel(&self, token: &str) -> Result<AuthedChannel> {
        Ok(with_token(client::connect(&self.addr()).await?, token))
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.ctl.shutdown.cancel();
    }
}

/// The code and message of an expected error.
pub fn code_and_message<T: std::fmt::Debug>(
    r: std::result::Result<T, tonic::Status>,
) -> (tonic::Code, String) {
    let s = r.expect_err("expected an error");
    (s.code(), s.message().to_string())
}
