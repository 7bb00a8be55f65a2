//! A Dagger fleet for end-to-end tests: one real controller process and worker processes
//! whose `dagger` executor drives the fake engine (`fake-dagger`, a behavioural model of
//! the engine: execs really run in a scratch root and are cached per op chain). Each worker
//! has its own engine state (a host's engine), all share one world of fixtures (images,
//! git remotes, HTTP files, registries).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use scabbard_common::client::{self, AuthedChannel};
use scabbard_common::proto::{
    ArtifactRef, ListArtifactsRequest, Task, TaskState, Workflow, WorkflowState,
    artifact_service_client::ArtifactServiceClient, workflow_service_client::WorkflowServiceClient,
};
pub use scabbard_fake_engine::{EngineState, Fixtures, LocalRepo, fake_dagger_bin};

use crate::{
    ADMIN_TOKEN, Controller, ControllerOpts, Proc, TOKEN, Tasks, eventually, get, tasks_client,
    wait_agent,
};

/// How to start one worker of a fleet.
#[derive(Debug, Clone, Default)]
pub struct WorkerSpec {
    /// Agent name (also the label `name=<name>`).
    pub name: String,
    /// Slots (0 = 2).
    pub slots: u32,
    /// More labels.
    pub labels: Vec<(String, String)>,
    /// Top-level TOML lines of its config (before `[dagger]`, e.g. `[shell]` needs its own).
    pub top: String,
    /// Lines appended inside `[dagger]` (keys, then sub-tables such as `[dagger.secrets]`).
    pub dagger: String,
    /// A registration token other than the cluster's static one (e.g. project-bound).
    pub registration_token: Option<String>,
    /// Drive the host's real Dagger engine (the `dagger` CLI in PATH, or `DAGGER_CLI`)
    /// instead of the fake one (live tests).
    pub real_engine: bool,
}

impl WorkerSpec {
    /// A worker called `name` with 2 slots.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Adds a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }

    /// Sets the slots.
    pub fn slots(mut self, n: u32) -> Self {
        self.slots = n;
        self
    }

    /// Appends lines to `[dagger]`.
    pub fn dagger(mut self, toml: &str) -> Self {
        self.dagger.push_str(toml);
        self.dagger.push('\n');
        self
    }
}

/// A worker of a fleet.
pub struct FleetWorker {
    /// Its spec.
    pub spec: WorkerSpec,
    /// The process.
    pub proc: Proc,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Its engine's state (exec log, cache volumes).
    pub engine: EngineState,
    /// Its agent id, once attached.
    pub agent_id: String,
}

/// A controller, its workers and their fake engines' world.
pub struct Fleet {
    /// Holds every directory of the fleet.
    pub dir: tempfile::TempDir,
    /// The controller process.
    pub ctl: Controller,
    /// The world the engines see.
    pub fixtures: Fixtures,
    /// The workers, in start order.
    pub workers: Vec<FleetWorker>,
}

impl Fleet {
    /// Starts a controller with `controller_flags` and no workers.
    pub fn controller(controller_flags: Vec<String>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let fixtures = Fixtures::new(dir.path().join("world"))?;
        let ctl = Controller::start(
            &dir.path().join("controller"),
            0,
            &ControllerOpts {
                extra: controller_flags,
                ..ControllerOpts::default()
            },
        )?;
        Ok(Self {
            dir,
            ctl,
            fixtures,
            workers: Vec::new(),
        })
    }

    /// Starts a controller and `workers`, and waits until each advertises `dagger`.
    pub async fn start(controller_flags: Vec<String>, workers: Vec<WorkerSpec>) -> Result<Self> {
        let mut fleet = Self::controller(controller_flags)?;
        for w in workers {
            fleet.add(w).await?;
        }
        Ok(fleet)
    }

    /// The controller's address.
    pub fn addr(&self) -> String {
        self.ctl.addr.to_string()
    }

    /// Starts another worker and waits until it advertises `dagger`.
    pub async fn add(&mut self, spec: WorkerSpec) -> Result<&FleetWorker> {
        let name = spec.name.clone();
        let data_dir = self.dir.path().join(format!("worker-{name}"));
        let engine = EngineState::new(self.dir.path().join(format!("engine-{name}")))?;
        let config = self.dir.path().join(format!("worker-{name}.toml"));
        let engine_keys = if spec.real_engine {
            match std::env::var("DAGGER_CLI") {
                Ok(cli) => {
                    format!("cli = {cli:?}\nsession_start_timeout_ms = 300000\n")
                }
                Err(_) => "session_start_timeout_ms = 300000\n".to_string(),
            }
        } else {
            format!(
                "cli = {:?}\nrunner_host = {:?}\nkill_grace_ms = 500\nsession_start_timeout_ms = 20000\n",
                fake_dagger_bin().display().to_string(),
                engine.runner_host(Some(&self.fixtures)),
            )
        };
        let toml = format!(
            "{top}\n[dagger]\nprobe_interval_ms = 1000\n{engine_keys}{dagger}\n",
            top = spec.top,
            dagger = spec.dagger,
        );
        write_private(&config, &toml)?;
        let mut cmd = Command::new(crate::scabbard_bin());
        cmd.arg("worker")
            .arg("--config")
            .arg(&config)
            .args(["--controller", &self.addr()])
            .args([
                "--registration-token",
                spec.registration_token.as_deref().unwrap_or(TOKEN),
            ])
            .args(["--name", &name, "--label", &format!("name={name}")])
            .args([
                "--slots",
                &(if spec.slots == 0 { 2 } else { spec.slots }).to_string(),
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .env("SCABBARD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in &spec.labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        let child = cmd.spawn().context("spawn worker")?;
        let proc = Proc::from_child(child, &name);
        let agent = wait_agent(&self.addr(), &format!("worker {name} with dagger"), |a| {
            a.name == name && a.capabilities.iter().any(|c| c == "dagger")
        })
        .await?;
        self.workers.push(FleetWorker {
            spec,
            proc,
            data_dir,
            engine,
            agent_id: agent.id,
        });
        Ok(self.workers.last().expect("just pushed"))
    }

    /// The worker called `name`.
    pub fn worker(&self, name: &str) -> &FleetWorker {
        self.workers
            .iter()
            .find(|w| w.spec.name == name)
            .unwrap_or_else(|| panic!("no worker {name}"))
    }

    /// The name of the worker with agent id `id`.
    pub fn worker_name(&self, id: &str) -> &str {
        self.workers
            .iter()
            .find(|w| w.agent_id == id)
            .map_or("?", |w| w.spec.name.as_str())
    }

    /// A task client with the admin token.
    pub async fn tasks(&self) -> Result<Tasks> {
        tasks_client(&self.addr()).await
    }

    /// A channel with `token`.
    pub async fn channel(&self, token: &str) -> Result<AuthedChannel> {
        Ok(client::authed(
            client::connect(&self.addr()).await?,
            Some(token),
        )?)
    }

    /// A workflow client with the admin token.
    pub async fn workflows(&self) -> Result<WorkflowServiceClient<AuthedChannel>> {
        Ok(WorkflowServiceClient::new(self.channel(ADMIN_TOKEN).await?))
    }

    /// An artifact client with the admin token.
    pub async fn artifacts(&self) -> Result<ArtifactServiceClient<AuthedChannel>> {
        Ok(ArtifactServiceClient::new(self.channel(ADMIN_TOKEN).await?))
    }

    /// The artifacts of a task or workflow.
    pub async fn list_artifacts(
        &self,
        task_id: &str,
        workflow_id: &str,
    ) -> Result<Vec<ArtifactRef>> {
        Ok(self
            .artifacts()
            .await?
            .list(ListArtifactsRequest {
                task_id: task_id.into(),
                workflow_id: workflow_id.into(),
            })
            .await?
            .into_inner()
            .artifacts)
    }
}

impl Proc {
    /// Wraps a spawned child (killed on drop).
    pub fn from_child(child: std::process::Child, name: &str) -> Self {
        Self {
            child: Some(child),
            name: name.into(),
        }
    }
}

/// Writes `text` to `path` with mode 0600.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

/// Waits until the workflow `id` is final; returns it.
pub async fn wait_workflow(
    wf: &mut WorkflowServiceClient<AuthedChannel>,
    id: &str,
    timeout: Duration,
) -> Result<Workflow> {
    let end = std::time::Instant::now() + timeout;
    loop {
        let w = wf
            .get(scabbard_common::proto::GetWorkflowRequest { id: id.into() })
            .await?
            .into_inner();
        if matches!(
            w.state(),
            WorkflowState::Succeeded | WorkflowState::Failed | WorkflowState::Cancelled
        ) {
            return Ok(w);
        }
        if std::time::Instant::now() > end {
            bail!("workflow {id} is {:?} after {timeout:?}: {w:#?}", w.state());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The task of node `name` of `w`.
pub async fn node_task(tasks: &mut Tasks, w: &Workflow, name: &str) -> Result<Task> {
    let n = w
        .nodes
        .iter()
        .find(|n| n.name == name)
        .with_context(|| format!("no node {name} in {w:?}"))?;
    get(tasks, &n.task_id).await
}

/// The agent that ran a task's last attempt.
pub fn ran_on(t: &Task) -> &str {
    t.attempts.last().map_or("", |a| a.agent_id.as_str())
}

/// Waits until `task` succeeded, with its log in the failure message otherwise.
pub async fn expect_succeeded(tasks: &mut Tasks, id: &str, timeout: Duration) -> Result<Task> {
    let t = crate::wait_state(tasks, id, None, timeout).await?;
    if t.state() != TaskState::Succeeded {
        let log = crate::logs(tasks, id, 0, false).await.unwrap_or_default();
        bail!(
            "task {id} is {:?}: {:?}\n--- log ---\n{log}",
            t.state(),
            t.result
        );
    }
    Ok(t)
}

/// Polls until `f` holds (for fleets: e.g. an agent reports a warm image).
pub async fn until(what: &str, f: impl Fn() -> bool) -> Result<()> {
    eventually(what, Duration::from_secs(30), || {
        let ok = f();
        async move { ok.then_some(()) }
    })
    .await
}

/// Downloads an artifact with the admin token (digest checked) and unpacks it into `dest`
/// (the directory for a directory artifact, the file for a file artifact); returns its ref.
pub async fn fetch_artifact(
    fleet: &Fleet,
    task_id: &str,
    name: &str,
    dest: &Path,
) -> Result<ArtifactRef> {
    use scabbard_common::client::{DownloadOptions, download_artifact};
    let req = scabbard_common::proto::DownloadArtifactRequest {
        task_id: task_id.into(),
        name: name.into(),
        ..Default::default()
    };
    let mut bytes: Vec<u8> = Vec::new();
    let got = download_artifact(
        |_| async {
            Ok(ArtifactServiceClient::new(
                fleet
                    .channel(ADMIN_TOKEN)
                    .await
                    .map_err(|e| scabbard_common::Error::Unavailable(e.to_string()))?,
            ))
        },
        &req,
        None,
        &mut bytes,
        &DownloadOptions::default(),
    )
    .await?;
    let r = got.artifact.clone();
    anyhow::ensure!(
        scabbard_common::artifact::Sha256::digest(&bytes) == r.sha256,
        "downloaded bytes do not match the ref's digest"
    );
    scabbard_common::artifact::unpack_from(std::io::Cursor::new(bytes), r.kind(), dest)?;
    Ok(r)
}

/// `sha256  ./path` of every regular file under `dir`, sorted (what `find . -type f | sort
/// | xargs sha256sum` prints inside it).
pub fn tree_sums(dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() {
                files.push(e.path());
            }
        }
    }
    let mut lines: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            let rel = format!("./{}", f.strip_prefix(dir).unwrap_or(f).display());
            let sum = scabbard_common::artifact::sha256_file(f).unwrap_or_default();
            (rel, sum)
        })
        .collect();
    lines.sort();
    Ok(lines
        .into_iter()
        .map(|(rel, sum)| format!("{sum}  {rel}\n"))
        .collect())
}
