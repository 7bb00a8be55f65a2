//! Task secrets (`TaskSpec.secret_env`) end to end through real processes: the task's
//! process gets the value; its log, its result, every API answer, the controller's and
//! the worker's files (and etcd's) never hold it in plain text.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use scabbard_common::client::TaskServiceClient;
use scabbard_common::proto::{
    GetTaskRequest, ListTasksRequest, ShellTask, SubmitTaskRequest, Task, TaskSpec, TaskState,
    WatchTasksRequest, task_spec::Kind,
};
use scabbard_tests::etcd::EtcdCluster;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(30);

/// A value found nowhere else (hex digits and dashes).
fn unique_secret(tag: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{tag}-{n:x}-{:x}", std::process::id())
}

/// A shell task with secret variable `S`.
fn with_secret(script: &str, value: &str) -> TaskSpec {
    let mut spec = shell(script);
    spec.secret_env.insert("S".into(), value.into());
    spec
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let needle = needle.as_bytes();
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && let Ok(bytes) = std::fs::read(e.path())
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(e.path());
            }
        }
    }
    hits
}

/// How many files there are under `dir` (to know the scan looked at something).
fn file_count(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(ft) if ft.is_dir() => stack.push(e.path()),
                Ok(_) => n += 1,
                Err(_) => {}
            }
        }
    }
    n
}

fn assert_masked(t: &Task, what: &str) {
    let spec = t.spec.as_ref().expect("spec");
    assert_eq!(
        spec.secret_env.get("S").map(String::as_str),
        Some("***"),
        "{what}: {:?}",
        spec.secret_env
    );
}

#[tokio::test]
async fn an_echoed_secret_shows_as_stars_in_logs_and_nowhere_in_plain_text() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(
        &dir.path().join("controller"),
        free_port(),
        &ControllerOpts::default(),
    )?;
    let w = Worker::start(&c.addr.to_string(), &dir.path().join("w0"), "w0", 2)?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let secret = unique_secret("pw");
    let head = &secret[..5];

    // Every event of the task, from before it exists.
    let mut events = tasks
        .watch(WatchTasksRequest {
            ids: vec![],
            send_initial: false,
            ..Default::default()
        })
        .await?
        .into_inner();

    // Echoed whole, split across two writes (two reads of the pipe), and on stderr; then
    // the task stays running a while so the files can be checked mid-attempt.
    let script = format!(
        r#"echo "token=$S"
printf %s "$S" | head -c 5
sleep 0.3
printf '%s\n' "$S" | tail -c +6
echo "err:$S" >&2
[ "${{#S}}" = "{}" ] && echo same-length
echo running
sleep 2"#,
        secret.len()
    );
    let spec = with_secret(&script, &secret);
    let resp = tasks
        .submit(SubmitTaskRequest {
            spec: Some(spec.clone()),
            idempotency_key: "secret-task".into(),
            project: String::new(),
        })
        .await?
        .into_inner();
    let submitted = resp.task.expect("task");
    assert_masked(&submitted, "Submit response");
    let id = submitted.id.clone();
    // A resubmission answers with the first task, masked too.
    let again = tasks
        .submit(SubmitTaskRequest {
            spec: Some(spec),
            idempotency_key: "secret-task".into(),
            project: String::new(),
        })
        .await?
        .into_inner();
    assert!(again.existing);
    assert_masked(
        again.task.as_ref().expect("task"),
        "idempotent Submit response",
    );

    // Mid-attempt: the worker holds the attempt (spooled), the store holds the task.
    let running = eventually("the attempt to print its secret", T, || {
        let mut tasks = tasks.clone();
        let id = id.clone();
        async move {
            let text = logs(&mut tasks, &id, 0, false).await.ok()?;
            text.contains("running").then_some(text)
        }
    })
    .await?;
    assert!(!running.contains(&secret), "{running}");
    for d in [&c.data_dir, &w.data_dir] {
        let hits = files_containing(d, &secret);
        assert!(hits.is_empty(), "secret in plain text in {hits:?}");
    }

    let text = logs(&mut tasks, &id, 0, true).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}\n{text}");
    assert!(!text.contains(&secret), "secret in the log: {text}");
    assert!(
        !text.contains(head),
        "the start of a split secret leaked: {text}"
    );
    assert!(text.contains("token=***\n"), "{text}");
    assert!(
        text.contains("\n***\n"),
        "the split echo is not masked: {text}"
    );
    assert!(text.contains("err:***\n"), "{text}");
    assert!(
        text.contains("same-length\n"),
        "the process did not get the value: {text}"
    );

    // Every way a task is read shows the mask.
    assert_masked(&t, "Get");
    let listed = tasks
        .list(ListTasksRequest::default())
        .await?
        .into_inner()
        .tasks;
    assert_masked(listed.iter().find(|l| l.id == id).expect("listed"), "List");
    let mut seen = 0;
    loop {
        let ev = tokio::time::timeout(T, events.message())
            .await??
            .expect("watch open");
        let task = ev.task.expect("task");
        if task.id != id {
            continue;
        }
        assert_masked(&task, "Watch event");
        seen += 1;
        if scabbard_common::is_final(task.state()) {
            break;
        }
    }
    assert!(
        seen >= 3,
        "queued, assigned, running, succeeded: saw {seen}"
    );
    let mut initial = tasks
        .watch(WatchTasksRequest {
            ids: vec![id.clone()],
            send_initial: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let first = initial.message().await?.expect("initial event");
    assert_masked(first.task.as_ref().expect("task"), "Watch initial");

    // At rest: the controller's store (redb file and WAL), task logs, the worker's spool.
    let controller_files = file_count(&c.data_dir);
    assert!(controller_files >= 3, "{controller_files} files");
    assert!(c.data_dir.join("secrets.key").exists());
    for d in [&c.data_dir, &w.data_dir] {
        let hits = files_containing(d, &secret);
        assert!(hits.is_empty(), "secret in plain text in {hits:?}");
    }
    Ok(())
}

#[tokio::test]
async fn the_result_message_is_redacted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(
        &dir.path().join("controller"),
        free_port(),
        &ControllerOpts::default(),
    )?;
    let _w = Worker::start(&c.addr.to_string(), &dir.path().join("w0"), "w0", 1)?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let secret = unique_secret("cmd");
    // The executor's own message names the program, here the secret itself.
    let mut spec = TaskSpec {
        kind: Some(Kind::Shell(ShellTask {
            command: vec![format!("/nonexistent/{secret}")],
        })),
        ..Default::default()
    };
    spec.secret_env.insert("S".into(), secret.clone());
    let id = submit(&mut tasks, spec).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let msg = &t.result.as_ref().expect("result").message;
    assert_eq!(msg, "command not found: /nonexistent/***");
    let attempt = t.attempts[0].result.as_ref().expect("attempt result");
    assert!(!attempt.message.contains(&secret), "{attempt:?}");
    Ok(())
}

#[tokio::test]
async fn the_generated_key_survives_a_restart_and_a_foreign_key_fails_the_task_clearly()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("controller");
    let port = free_port();
    let opts = ControllerOpts::default();
    let mut c = Controller::start(&data, port, &opts)?;
    let addr = c.addr.to_string();
    let mut tasks = tasks_client(&addr).await?;
    // No worker yet: the task stays queued, sealed in the store.
    let secret = unique_secret("keep");
    let kept = submit(&mut tasks, with_secret(r#"echo "got $S""#, &secret)).await?;
    let key_file = data.join("secrets.key");
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&key_file)?.permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o600);
    let key = std::fs::read_to_string(&key_file)?;

    // Same data dir: the same key, the task runs with its secret.
    c.proc.kill9();
    let mut c = Controller::start(&data, port, &opts)?;
    assert_eq!(std::fs::read_to_string(&key_file)?, key);
    let mut tasks = tasks_client(&addr).await?;
    let w = Worker::start(&addr, &dir.path().join("w0"), "w0", 1)?;
    let t = wait_state(&mut tasks, &kept, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(logs(&mut tasks, &kept, 0, false).await?, "got ***\n");

    // A controller given another key cannot open what the first sealed: the task fails at
    // once, saying why, instead of running without its secret.
    drop(w);
    wait_agent(&addr, "w0 to be seen gone", |a| {
        a.name == "w0" && a.status() != scabbard_common::proto::AgentStatus::Connected
    })
    .await?;
    let queued = submit(&mut tasks, with_secret(r#"echo "got $S""#, &secret)).await?;
    c.proc.kill9();
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, format!("{}\n", "ab".repeat(32)))?;
    let other = ControllerOpts {
        extra: vec!["--secrets-key-file".into(), other_key.display().to_string()],
        ..ControllerOpts::default()
    };
    let _c = Controller::start(&data, port, &other)?;
    let mut tasks = tasks_client(&addr).await?;
    let _w = Worker::start(&addr, &dir.path().join("w1"), "w1", 1)?;
    let t = wait_state(&mut tasks, &queued, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let msg = &t.result.as_ref().expect("result").message;
    assert!(
        msg.contains("cannot be decrypted") && msg.contains("secrets_key_file"),
        "{msg}"
    );
    assert!(t.attempts.is_empty(), "never handed to a worker: {t:?}");
    assert_masked(&t, "Get of the failed task");
    Ok(())
}

#[tokio::test]
async fn on_etcd_secrets_need_a_key_file_shared_by_every_controller() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let dir = tempfile::tempdir()?;
    let base = |extra: &[String]| {
        let mut v = vec![
            "--store".to_string(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            etcd.endpoints(),
            "--logs-dir".into(),
            dir.path().join("shared-logs").display().to_string(),
            "--leader-lease-ttl".into(),
            "2s".into(),
        ];
        v.extend_from_slice(extra);
        ControllerOpts {
            lease: "8s",
            extra: v,
            ..ControllerOpts::default()
        }
    };

    // Without a key file: refused, saying what to do; plain tasks are fine.
    // (In a namespace of its own: the cluster below does not wait for its lease to expire.)
    let lone_opts = base(&["--etcd-namespace".into(), "/lone/".into()]);
    let mut lone = Controller::start(&dir.path().join("lone"), free_port(), &lone_opts)?;
    let mut tasks = TaskServiceClient::new(admin_channel(&lone.addr.to_string()).await?);
    let secret = unique_secret("etcd");
    let (code, msg) = code_and_message(
        tasks
            .submit(SubmitTaskRequest {
                spec: Some(with_secret("true", &secret)),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, tonic::Code::FailedPrecondition, "{msg}");
    assert!(
        msg.contains("secrets_key_file") && msg.contains("every controller"),
        "{msg}"
    );
    submit(&mut tasks, shell("true")).await?;
    assert!(!dir.path().join("lone").join("secrets.key").exists());
    lone.proc.kill9();

    // Two controllers with the same key file: a task sealed by one runs under the other.
    let key_file = dir.path().join("secrets.key");
    std::fs::write(&key_file, format!("{}\n", "5a".repeat(32)))?;
    let opts = base(&["--secrets-key-file".into(), key_file.display().to_string()]);
    let mut cs = [
        Controller::start(&dir.path().join("c0"), free_port(), &opts)?,
        Controller::start(&dir.path().join("c1"), free_port(), &opts)?,
    ];
    let addrs = format!("{},{}", cs[0].addr, cs[1].addr);
    let first = eventually("a leader", T, || leader(&addrs)).await?;
    let mut tasks = TaskServiceClient::new(admin_channel(&addrs).await?);
    let id = submit(&mut tasks, with_secret(r#"echo "got $S""#, &secret)).await?;
    let (dead, alive) = if first == cs[0].addr.to_string() {
        (0, 1)
    } else {
        (1, 0)
    };
    cs[dead].proc.kill9();
    let alive_addr = cs[alive].addr.to_string();
    eventually(
        "the other controller to lead",
        Duration::from_secs(60),
        || {
            let a = alive_addr.clone();
            async move { leader(&a).await.filter(|l| *l == a) }
        },
    )
    .await?;
    let w = Worker::start(&alive_addr, &dir.path().join("w0"), "w0", 1)?;
    let mut tasks = TaskServiceClient::new(admin_channel(&alive_addr).await?);
    let t = wait_state(&mut tasks, &id, None, Duration::from_secs(60)).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(logs(&mut tasks, &id, 0, false).await?, "got ***\n");
    let t = tasks
        .get(GetTaskRequest { id: id.clone() })
        .await?
        .into_inner();
    assert_masked(&t, "Get after failover");

    // etcd's files (WAL, snapshots), both controllers', the shared logs, the worker's.
    for d in [
        etcd.dir.path(),
        dir.path().join("c0").as_path(),
        dir.path().join("c1").as_path(),
        dir.path().join("shared-logs").as_path(),
        w.data_dir.as_path(),
    ] {
        let hits = files_containing(d, &secret);
        assert!(hits.is_empty(), "secret in plain text in {hits:?}");
    }
    Ok(())
}

/// The leader among `addrs`, as it says itself.
async fn leader(addrs: &str) -> Option<String> {
    use scabbard_common::proto::ClusterStatusRequest;
    let ch = admin_channel(addrs).await.ok()?;
    let s = scabbard_common::client::AdminServiceClient::new(ch)
        .cluster_status(ClusterStatusRequest {})
        .await
        .ok()?
        .into_inner();
    (s.answered_by_leader && s.store_healthy).then_some(s.leader)
}

#[test]
fn the_cli_takes_secrets_from_its_environment_and_never_echoes_them() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Checked before any connection is made (the port is closed).
    let out = cli(dir.path())
        .args(["submit", "--controller", "127.0.0.1:1"])
        .args(["--secret-env", "SCABBARD_TEST_UNSET_SECRET", "--", "true"])
        .env_remove("SCABBARD_TEST_UNSET_SECRET")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("SCABBARD_TEST_UNSET_SECRET is not set"),
        "{err}"
    );
    let out = cli(dir.path())
        .args(["submit", "--controller", "127.0.0.1:1"])
        .args(["--secret", "no-equals-hunter2", "--", "true"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("KEY=VALUE"), "{err}");
    assert!(!err.contains("hunter2"), "the value is echoed: {err}");
    Ok(())
}

#[tokio::test]
async fn the_cli_submits_secrets_from_flags_and_its_environment() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(
        &dir.path().join("controller"),
        free_port(),
        &ControllerOpts::default(),
    )?;
    let _w = Worker::start(&c.addr.to_string(), &dir.path().join("w0"), "w0", 1)?;
    let from_env = unique_secret("env");
    let from_flag = unique_secret("flag");
    let out = cli(&dir.path().join("cli"))
        .args(["submit", "--controller", &c.addr.to_string()])
        .args(["--secret-env", "FROM_ENV", "--secret"])
        .arg(format!("FROM_FLAG={from_flag}"))
        .args(["--sh", r#"echo "$FROM_ENV $FROM_FLAG""#, "--follow"])
        .env("FROM_ENV", &from_env)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("*** ***"), "{stdout}");
    for s in [&from_env, &from_flag] {
        assert!(!stdout.contains(s.as_str()) && !stderr.contains(s.as_str()));
    }
    Ok(())
}
