//! Retention end to end, on real controller and worker processes, on the embedded store and
//! on etcd: the sweeper deletes exactly what is past its project's retention — task
//! records, `done/` and idempotency keys, logs, artifacts, finished workflows, audit entries
//! and idempotency keys older than the window — and keeps running tasks and recent history.
//! A project's retention changed through the CLI applies without a restart.
//!
//! Until the history part of issue 14 makes the core write `done/` keys, the tests write
//! them next to the real finished records themselves (on the embedded store while the
//! controller is stopped). `finished_work_is_swept_without_seeding` needs the core to write
//! them and is ignored until then.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use scabbard_common::client::{AdminServiceClient, ProjectServiceClient};
use scabbard_common::proto::{
    ArtifactSpec, AuditEntry, ClusterStatusRequest, CreateProjectRequest, GetWorkflowRequest,
    Project, RetentionStatus, SubmitTaskRequest, TaskSpec, TaskState, UpdateProjectRequest,
    WorkflowState,
};
use scabbard_controller::store::{EmbeddedStore, EtcdConfig, EtcdStore, Op, Store, Txn};
use scabbard_tests::etcd::EtcdServer;
use scabbard_tests::wf::{Workflows, node, wait_workflow, workflow};
use scabbard_tests::{
    Controller, ControllerOpts, Tasks, Worker, admin_channel, cli, eventually, free_port, get,
    logs, shell, tasks_client, wait_state,
};
use tonic::Code;

const T: Duration = Duration::from_secs(30);
const DAY_MS: i64 = 86_400_000;

/// A controller (restartable on the same port and data dir), one worker, and the store.
struct Env {
    dir: tempfile::TempDir,
    etcd: Option<EtcdServer>,
    port: u16,
    metrics: u16,
    opts: ControllerOpts,
    controller: Option<Controller>,
    _worker: Worker,
}

impl Env {
    fn start(on_etcd: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let etcd = if on_etcd {
            Some(EtcdServer::start()?)
        } else {
            None
        };
        let metrics = free_port();
        let mut extra: Vec<String> = ["--retention-sweep-interval", "200ms"]
            .map(String::from)
            .to_vec();
        extra.extend(["--metrics-listen".into(), format!("127.0.0.1:{metrics}")]);
        if let Some(e) = &etcd {
            extra.extend(["--store".into(), "etcd".into()]);
            extra.extend(["--etcd-endpoints".into(), e.endpoints()]);
            extra.extend(["--leader-lease-ttl".into(), "2s".into()]);
        }
        let opts = ControllerOpts {
            extra,
            lease: "8s",
            ..ControllerOpts::default()
        };
        let port = free_port();
        let controller = Controller::start(&dir.path().join("controller"), port, &opts)?;
        let worker = Worker::start(
            &controller.addr.to_string(),
            &dir.path().join("w0"),
            "w0",
            4,
        )?;
        Ok(Self {
            dir,
            etcd,
            port,
            metrics,
            opts,
            controller: Some(controller),
            _worker: worker,
        })
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("controller")
    }

    /// Runs `f` on the store: on etcd beside the running controller; the embedded store
    /// only while the controller is stopped (it is restarted afterwards when `restart`).
    async fn with_store<R>(
        &mut self,
        restart: bool,
        f: impl AsyncFnOnce(Arc<dyn Store>) -> Result<R>,
    ) -> Result<R> {
        if let Some(e) = &self.etcd {
            let store = EtcdStore::connect(&EtcdConfig {
                endpoints: vec![e.endpoints()],
                ..Default::default()
            })
            .await?;
            return f(store).await;
        }
        if let Some(mut c) = self.controller.take() {
            c.proc
                .terminate(Duration::from_secs(15))
                .context("controller did not stop")?;
        }
        let store = EmbeddedStore::open(&self.data_dir().join("state.redb"))?;
        let r = f(store.clone()).await;
        store.close().await?;
        drop(store);
        if restart {
            self.controller = Some(Controller::start(&self.data_dir(), self.port, &self.opts)?);
        }
        r
    }
}

fn done_key(ms: i64, id: &str) -> String {
    format!("done/{ms:013}/{id}")
}

/// An audit entry written `age_ms` ago; returns its key and value.
fn audit_entry(age_ms: i64, id: &str) -> (String, Vec<u8>) {
    let e = AuditEntry {
        id: id.into(),
        at_ms: scabbard_common::time::now_ms() - age_ms,
        action: "test.old".into(),
        project: "default".into(),
        ..Default::default()
    };
    match scabbard_controller::audit::op(&e) {
        Op::Put { key, value, .. } => (key, value),
        other => panic!("not a put: {other:?}"),
    }
}

/// A task id (a lowercase ULID: 48 bits of unix ms, then 80 more) created `age_ms` ago.
fn ulid_aged(age_ms: i64) -> String {
    const CROCKFORD: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let ms = (scabbard_common::time::now_ms() - age_ms) as u64;
    let time: String = (0..10)
        .map(|i| CROCKFORD[((ms >> (45 - 5 * i)) & 31) as usize] as char)
        .collect();
    format!("{time}{}", "0".repeat(15) + "7")
}

async fn put_all(store: &Arc<dyn Store>, kvs: Vec<(String, Vec<u8>)>) -> Result<()> {
    for chunk in kvs.chunks(64) {
        store
            .txn(Txn {
                success: chunk
                    .iter()
                    .map(|(k, v)| Op::put(k.clone(), v.clone()))
                    .collect(),
                ..Default::default()
            })
            .await?;
    }
    Ok(())
}

/// Whether something under `dir` is named `name` (a task's log or artifact directory).
fn has_entry(dir: &Path, name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy() == name || (e.path().is_dir() && has_entry(&e.path(), name))
    })
}

/// The controller's Prometheus metrics.
async fn metrics(port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn status(addr: &str) -> Result<RetentionStatus> {
    let mut admin = AdminServiceClient::new(admin_channel(addr).await?);
    admin
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner()
        .retention
        .context("the leader reports no retention status")
}

async fn submit_in(c: &mut Tasks, project: &str, spec: TaskSpec, key: &str) -> Result<String> {
    Ok(c.submit(SubmitTaskRequest {
        spec: Some(spec),
        idempotency_key: key.into(),
        project: project.into(),
    })
    .await?
    .into_inner()
    .task
    .context("no task")?
    .id)
}

async fn gone(c: &mut Tasks, id: &str) -> bool {
    matches!(get(c, id).await, Err(e) if e.downcast_ref::<tonic::Status>().is_some_and(|s| s.code() == Code::NotFound))
}

/// The whole scenario on one backend.
async fn retention_deletes_exactly_what_is_expired(on_etcd: bool) -> Result<()> {
    let mut env = Env::start(on_etcd)?;
    let addr = env.addr();
    let mut tasks = tasks_client(&addr).await?;
    let ch = admin_channel(&addr).await?;
    ProjectServiceClient::new(ch.clone())
        .create(CreateProjectRequest {
            project: Some(Project {
                name: "short".into(),
                ..Default::default()
            }),
        })
        .await?;

    // History of "short" (to expire), of "default" (to keep), and a running task.
    let mut with_artifact = shell("echo expired-log-line; echo data > report.txt");
    with_artifact.artifacts = vec![ArtifactSpec {
        name: "report".into(),
        path: "report.txt".into(),
        optional: false,
    }];
    let old1 = submit_in(&mut tasks, "short", with_artifact, "k-old").await?;
    let old2 = submit_in(&mut tasks, "short", shell("echo two"), "").await?;
    let keep = submit_in(&mut tasks, "default", shell("echo keep-me"), "").await?;
    let run = submit_in(&mut tasks, "short", shell("sleep 300"), "").await?;
    let mut wfs = Workflows::new(ch.clone());
    let spec = workflow("wf", vec![node("a", &[], "echo wf")]);
    let wf = submit_workflow_in(&mut wfs, "short", spec).await?;
    let wf = wait_workflow(&mut wfs, &wf, T).await?;
    assert_eq!(wf.state(), WorkflowState::Succeeded, "{wf:?}");
    let wf_node = wf.nodes[0].task_id.clone();
    for id in [&old1, &old2, &keep] {
        let t = wait_state(&mut tasks, id, Some(TaskState::Succeeded), T).await?;
        assert!(!t.attempts.is_empty());
    }
    wait_state(&mut tasks, &run, Some(TaskState::Running), T).await?;
    let logs_dir = env.data_dir().join("logs");
    let artifacts_dir = env.data_dir().join("artifacts");
    assert!(has_entry(&logs_dir, &old1), "old1 has a log on disk");
    assert!(
        has_entry(&artifacts_dir, &old1),
        "old1 has an artifact on disk"
    );
    assert!(
        logs(&mut tasks, &old1, 0, false)
            .await?
            .contains("expired-log-line")
    );

    // What the history part's core will write: done keys (a fake one for the running task,
    // which must be kept as its record is not final), idempotency keys, and audit entries.
    let mut finished = Vec::new();
    for id in [&old1, &old2, &keep, &wf_node] {
        let t = get(&mut tasks, id).await?;
        finished.push((done_key(t.updated_at_ms, id), t.project.clone()));
    }
    let run_done = done_key(scabbard_common::time::now_ms() - 3_600_000, &run);
    let wdone = format!("wdone/{:013}/{}", wf.finished_at_ms, wf.id);
    let (old_audit, old_audit_v) = audit_entry(40 * DAY_MS, "01old");
    let (new_audit, new_audit_v) = audit_entry(DAY_MS, "01new");
    let ancient = ulid_aged(8 * DAY_MS);
    let fresh = ulid_aged(0);
    let mut seed: Vec<(String, Vec<u8>)> = finished
        .iter()
        .map(|(k, p)| (k.clone(), p.clone().into_bytes()))
        .collect();
    seed.extend([
        (run_done.clone(), b"short".to_vec()),
        (wdone.clone(), b"short".to_vec()),
        ("idem/short/k-old".into(), old1.clone().into_bytes()),
        ("idem/default/ancient".into(), ancient.into_bytes()),
        ("idem/default/fresh".into(), fresh.into_bytes()),
        (old_audit.clone(), old_audit_v),
        (new_audit.clone(), new_audit_v),
    ]);
    let seeded_at = scabbard_common::time::now_ms();
    env.with_store(true, async move |store| put_all(&store, seed).await)
        .await?;

    // With the default 30 days only the 40-day-old audit entry and the 8-day-old
    // idempotency key are past their time.
    let s = eventually("a sweep after seeding", T, || async {
        status(&addr)
            .await
            .ok()
            .filter(|s| s.last_sweep_at_ms > seeded_at && s.audit_deleted >= 1)
    })
    .await?;
    assert_eq!(s.default_retention_days, 30.0);
    assert_eq!(s.tasks_deleted, 0, "{s:?}");
    assert!(s.idempotency_keys_deleted >= 1, "{s:?}");
    assert!(s.oldest_finished_at_ms > 0, "{s:?}");
    for id in [&old1, &old2, &keep, &wf_node, &run] {
        get(&mut tasks, id)
            .await
            .with_context(|| format!("{id} is kept"))?;
    }

    // A retention that is not a positive number of days is refused, naming the setting.
    let mut projects = ProjectServiceClient::new(ch.clone());
    for bad in [-1.0, f64::NAN, 40_000.0] {
        let e = projects
            .update(UpdateProjectRequest {
                project: Some(Project {
                    name: "short".into(),
                    retention_days: bad,
                    ..Default::default()
                }),
            })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("retention_days"), "{e:?}");
    }

    // Shorten "short" to under a second, through the CLI, without a restart.
    let config = env.dir.path().join("cli");
    let out = cli(&config)
        .args(["project", "update", "short", "--retention-days", "0.00001"])
        .args(["--controller", &addr])
        .output()?;
    if !out.status.success() {
        bail!("project update: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("0.00001 days"));
    for id in [&old1, &old2, &wf_node] {
        eventually(&format!("task {id} to be swept"), T, || async {
            gone(&mut tasks.clone(), id).await.then_some(())
        })
        .await?;
    }
    eventually("the workflow to be swept", T, || async {
        let r = wfs
            .clone()
            .get(GetWorkflowRequest { id: wf.id.clone() })
            .await;
        matches!(r, Err(s) if s.code() == Code::NotFound).then_some(())
    })
    .await?;
    let s = eventually("the counters", T, || async {
        status(&addr)
            .await
            .ok()
            .filter(|s| s.tasks_deleted >= 3 && s.workflows_deleted >= 1)
    })
    .await?;
    assert_eq!(s.tasks_deleted, 3, "{s:?}");
    assert_eq!(s.workflows_deleted, 1, "{s:?}");
    assert!(s.artifacts_deleted >= 1 && s.logs_deleted >= 3, "{s:?}");
    assert!(!has_entry(&logs_dir, &old1), "old1's log is deleted");
    assert!(
        !has_entry(&artifacts_dir, &old1),
        "old1's artifact is deleted"
    );
    // Recent history of another project, and running work, are kept.
    assert!(logs(&mut tasks, &keep, 0, false).await?.contains("keep-me"));
    let r = get(&mut tasks, &run).await?;
    assert_eq!(r.state(), TaskState::Running);

    // So do the metrics.
    let text = metrics(env.metrics).await?;
    for line in [
        "scabbard_retention_deleted_total{kind=\"task\"} 3",
        "scabbard_retention_deleted_total{kind=\"workflow\"} 1",
        "scabbard_retention_backlog 0",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    for never in ["0\n", "0.0\n"] {
        assert!(!text.contains(&format!(
            "scabbard_retention_last_sweep_timestamp_seconds {never}"
        )));
    }

    // `scabbard status` shows it.
    let out = cli(&config)
        .args(["status", "--controller", &addr])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("retention:") && text.contains("3 tasks, 1 workflows"),
        "{text}"
    );

    // In the store: exactly the expired keys are gone.
    let expect_gone: Vec<String> = [&old1, &old2, &wf_node]
        .iter()
        .map(|id| format!("tasks/{id}"))
        .chain(
            finished
                .iter()
                .filter(|(k, _)| !k.ends_with(&keep))
                .map(|(k, _)| k.clone()),
        )
        .chain([
            wdone,
            format!("workflows/{}", wf.id),
            "idem/short/k-old".into(),
            "idem/default/ancient".into(),
            old_audit,
        ])
        .collect();
    let expect_kept: Vec<String> = [
        format!("tasks/{keep}"),
        done_key(get(&mut tasks, &keep).await?.updated_at_ms, &keep),
        format!("tasks/{run}"),
        run_done,
        "idem/default/fresh".into(),
        new_audit,
    ]
    .to_vec();
    let wf_id = wf.id.clone();
    env.with_store(false, async |store| {
        for k in &expect_gone {
            if store.get(k).await?.is_some() {
                bail!("{k} should have been deleted");
            }
        }
        for k in &expect_kept {
            if store.get(k).await?.is_none() {
                bail!("{k} should have been kept");
            }
        }
        let parts = store.range(&format!("workflows/{wf_id}/"), None, 0).await?;
        if !parts.kvs.is_empty() {
            bail!(
                "workflow parts left: {:?}",
                parts.kvs.iter().map(|kv| &kv.key).collect::<Vec<_>>()
            );
        }
        // Its history index keys too (it was project `short`'s only workflow).
        let index = store.range("hist/wp/short/", None, 0).await?;
        if !index.kvs.is_empty() {
            bail!("workflow index keys left: {:?}", index.kvs);
        }
        Ok(())
    })
    .await?;
    if !on_etcd {
        // The controller is stopped: the store file can be compacted, and still opens.
        let out = cli(&config)
            .args(["store", "compact", "--data-dir"])
            .arg(env.data_dir())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("compacted"),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        env.with_store(false, async |store| {
            store
                .get(&format!("tasks/{keep}"))
                .await?
                .context("kept after compaction")?;
            Ok(())
        })
        .await?;
    }
    drop(env);
    Ok(())
}

async fn submit_workflow_in(
    c: &mut Workflows,
    project: &str,
    spec: scabbard_common::proto::WorkflowSpec,
) -> Result<String> {
    let r = c
        .submit(scabbard_common::proto::SubmitWorkflowRequest {
            spec: Some(spec),
            project: project.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.workflow.context("no workflow")?.id)
}

#[tokio::test]
async fn retention_deletes_exactly_what_is_expired_on_the_embedded_store() -> Result<()> {
    retention_deletes_exactly_what_is_expired(false).await
}

#[tokio::test]
async fn retention_deletes_exactly_what_is_expired_on_etcd() -> Result<()> {
    retention_deletes_exactly_what_is_expired(true).await
}

/// Real tasks run to completion and are swept with nothing written by the test: needs the
/// core to write `done/` keys (the history part of issue 14).
#[tokio::test]
async fn finished_work_is_swept_without_seeding() -> Result<()> {
    let env = Env::start(false)?;
    let addr = env.addr();
    let mut tasks = tasks_client(&addr).await?;
    let ch = admin_channel(&addr).await?;
    ProjectServiceClient::new(ch)
        .create(CreateProjectRequest {
            project: Some(Project {
                name: "brief".into(),
                retention_days: 0.00002,
                ..Default::default()
            }),
        })
        .await?;
    let old = submit_in(&mut tasks, "brief", shell("echo bye"), "k1").await?;
    let keep = submit_in(&mut tasks, "default", shell("echo stay"), "").await?;
    wait_state(&mut tasks, &old, Some(TaskState::Succeeded), T).await?;
    wait_state(&mut tasks, &keep, Some(TaskState::Succeeded), T).await?;
    eventually("the finished task to be swept", T, || async {
        gone(&mut tasks.clone(), &old).await.then_some(())
    })
    .await?;
    assert!(!has_entry(&env.data_dir().join("logs"), &old));
    get(&mut tasks, &keep).await?;
    let s = status(&addr).await?;
    assert!(s.tasks_deleted >= 1, "{s:?}");
    Ok(())
}
