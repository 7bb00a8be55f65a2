//! `shell.run_as` end to end: a real controller and a real worker (running as root, as the
//! tests do) whose shell tasks run as `nobody`, each in its own PID namespace. A task cannot
//! read the worker's identity or spool, nor another running task's environment, and the
//! worker refuses to start when its configuration file is readable by that user.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use scabbard_common::proto::{CancelTaskRequest, TaskState};
use scabbard_tests::{
    Controller, ControllerOpts, TOKEN, Worker, eventually, logs, scabbard_bin, shell, submit,
    tasks_client, wait_state,
};

const RUN_AS: &str = "[shell]\nrun_as = \"nobody\"\n";

/// PIDs (in this namespace) of live processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(marker)
        {
            found.push(pid);
        }
    }
    found
}

/// A temp dir that the task user may pass through whatever the umask (the worker's data
/// dir and work root are inside it).
fn passable_tempdir() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_tasks_cannot_read_the_worker_or_each_other() -> Result<()> {
    let dir = passable_tempdir()?;
    let ctl = Controller::start(
        &dir.path().join("controller"),
        0,
        &ControllerOpts::default(),
    )?;
    let addr = ctl.addr.to_string();
    let data = dir.path().join("w0");
    let worker = Worker::start_with_config(&addr, &data, "w0", 2, RUN_AS)?;
    let mut c = tasks_client(&addr).await?;

    // Who the task is.
    let id = submit(&mut c, shell("id -u; id -G")).await?;
    let t = wait_state(&mut c, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    let log = logs(&mut c, &id, 0, false).await?;
    assert!(log.contains("65534\n65534\n"), "{log}");
    let token = worker.agent_token().expect("the worker registered");

    // The worker's identity file and spool.
    let script = format!("cat {}/identity", data.display());
    let id = submit(&mut c, shell(&script)).await?;
    let t = wait_state(&mut c, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let log = logs(&mut c, &id, 0, false).await?;
    assert!(log.contains("Permission denied"), "{log}");
    assert!(!log.contains(&token), "the agent token leaked: {log}");

    let script = format!("ls {}/spool", data.display());
    let id = submit(&mut c, shell(&script)).await?;
    let t = wait_state(&mut c, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    assert!(
        logs(&mut c, &id, 0, false)
            .await?
            .contains("Permission denied")
    );

    // Another running task's environment: its secret is in its /proc/<pid>/environ, which
    // a task of the same user can read without a PID namespace of its own.
    let mut long = shell("sleep 987.55");
    long.secret_env
        .insert("DEPLOY_KEY".into(), "key-of-the-other-project".into());
    let long_id = submit(&mut c, long).await?;
    wait_state(
        &mut c,
        &long_id,
        Some(TaskState::Running),
        Duration::from_secs(30),
    )
    .await?;
    let pid = eventually(
        "the long task's process",
        Duration::from_secs(20),
        || async { processes_with("987.55").first().copied() },
    )
    .await?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    assert!(String::from_utf8_lossy(&environ).contains("key-of-the-other-project"));
    let script =
        format!("ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; cat /proc/{pid}/environ");
    let id = submit(&mut c, shell(&script)).await?;
    let t = wait_state(&mut c, &id, None, Duration::from_secs(30)).await?;
    let log = logs(&mut c, &id, 0, false).await?;
    assert_eq!(t.state(), TaskState::Failed, "cat must fail: {log}");
    assert!(!log.contains("key-of-the-other-project"), "{log}");
    assert!(log.contains("No such file or directory"), "{log}");
    // The pid list is the stdout line of numbers; stderr's line (from `cat`) may come
    // before it in the merged log, as the two pipes are read concurrently.
    let visible: Vec<i32> = log
        .lines()
        .find(|l| !l.trim().is_empty() && l.split_whitespace().all(|w| w.parse::<i32>().is_ok()))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(
        visible.contains(&1) && !visible.contains(&pid) && visible.len() <= 4,
        "the task sees only its own processes: {visible:?}"
    );

    c.cancel(CancelTaskRequest {
        id: long_id.clone(),
        ..Default::default()
    })
    .await?;
    let t = wait_state(&mut c, &long_id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.state(), TaskState::Cancelled);
    eventually(
        "the long task's processes to be gone",
        Duration::from_secs(10),
        || async { processes_with("987.55").is_empty().then_some(()) },
    )
    .await?;
    drop(worker);
    Ok(())
}

#[test]
fn a_config_file_the_task_user_could_read_stops_the_worker() -> Result<()> {
    let dir = passable_tempdir()?;
    let config = dir.path().join("worker.toml");
    std::fs::write(&config, RUN_AS)?;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))?;
    let out = Command::new(scabbard_bin())
        .arg("worker")
        .arg("--config")
        .arg(&config)
        .args(["--controller", "127.0.0.1:1", "--registration-token", TOKEN])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("SCABBARD_LOG", "warn")
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the configuration file") && err.contains("readable by that user"),
        "{err}"
    );
    assert!(err.contains(&config.display().to_string()), "{err}");
    Ok(())
}
