//! Issue 12, worker and hygiene, through real processes: a task's double-forked grandchild
//! dies with its attempt and with a worker killed by SIGKILL; a spool write failure fails
//! the attempt visibly; an output carrying a secret (or its base64) is masked in the result
//! and in the next workflow node's environment; data dirs and files are private; the CLI
//! escapes control characters that came from the server. Each test also checks that the
//! cluster goes on: a later task runs promptly.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use scabbard_common::proto::{ErrorClass, Outcome, TaskState};
use scabbard_tests::wf::{Cluster, node, node_of, submit_workflow, wait_workflow, workflow};
use scabbard_tests::*;

const T: Duration = Duration::from_secs(30);

/// Whether `pid` runs (a zombie waiting for its parent's `wait` does not).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn read_pid(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.strip_suffix('\n')?.parse().ok()
}

/// Kills a leftover so a failing test does not leave it behind.
fn kill(pid: i32) {
    // SAFETY: kill() has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// A script that starts `sleep 1000` in a new session through a double fork (it leaves
/// the task's process group and session, and is re-parented), and writes its pid to
/// `pidfile` once it runs.
fn escape_script(pidfile: &Path) -> String {
    format!(
        "setsid sh -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1000' & \
         while [ ! -s {p} ]; do sleep 0.01; done",
        p = pidfile.display()
    )
}

async fn quick_task_runs(tasks: &mut Tasks) -> anyhow::Result<()> {
    quick_task_runs_on(tasks, None).await
}

/// A task (on the worker called `on`, if given) succeeds within the usual deadline.
async fn quick_task_runs_on(tasks: &mut Tasks, on: Option<&str>) -> anyhow::Result<()> {
    let mut spec = shell("echo still-here");
    if let Some(name) = on {
        spec.requirements = Some(scabbard_common::proto::Requirements {
            labels: [("name".to_string(), name.to_string())].into(),
            ..Default::default()
        });
    }
    let id = submit(tasks, spec).await?;
    let t = wait_state(tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    Ok(())
}

#[tokio::test]
async fn a_double_forked_grandchild_dies_with_its_attempt() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 1, &[])?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let pidfile = c.dir.path().join("grandchild.pid");
    let id = submit(&mut tasks, shell(&escape_script(&pidfile))).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    let pid = read_pid(&pidfile).expect("the grandchild wrote its pid");
    let gone = eventually("the grandchild to die with its attempt", T, || async {
        (!running(pid)).then_some(())
    })
    .await;
    if gone.is_err() {
        kill(pid);
    }
    gone?;
    quick_task_runs(&mut tasks).await
}

#[tokio::test]
async fn a_double_forked_grandchild_does_not_survive_a_worker_kill() -> anyhow::Result<()> {
    let c = Cluster::start(&[], 1, &[])?;
    let addr = c.addr();
    let data = c.dir.path().join("w0");
    let mut w = Worker::start(&addr, &data, "w0", 1)?;
    let mut tasks = tasks_client(&addr).await?;
    let pidfile = c.dir.path().join("grandchild.pid");
    let once = c.dir.path().join("ran-once");
    // The first attempt leaves a grandchild and keeps running; the second one (after the
    // worker came back) just succeeds.
    let script = format!(
        "if [ -e {once} ]; then echo second; exit 0; fi; touch {once}; {}; sleep 1000",
        escape_script(&pidfile),
        once = once.display()
    );
    let id = submit(&mut tasks, shell(&script)).await?;
    let pid = eventually("the grandchild to start", T, || async {
        read_pid(&pidfile)
    })
    .await?;
    assert!(running(pid));
    // The attempt is recorded in the work dir while it runs.
    assert!(
        std::fs::read_dir(data.join("attempts"))?.count() > 0,
        "no record of the running attempt"
    );
    w.proc.kill9();
    // With cgroups the worker's sentinel kills it while the worker is dead; without, the
    // next start does.
    if cgroup_v2() {
        let gone = eventually("the grandchild to die with the worker", T, || async {
            (!running(pid)).then_some(())
        })
        .await;
        if gone.is_err() {
            kill(pid);
        }
        gone?;
    }
    let restarted = Worker::start(&addr, &data, "w0", 1)?;
    let gone = eventually("the grandchild to be gone after the restart", T, || async {
        (!running(pid)).then_some(())
    })
    .await;
    if gone.is_err() {
        kill(pid);
    }
    gone?;
    // The task ran again (an infrastructure failure, then a success) and others run too.
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    assert_eq!(t.infra_failures, 1, "{t:?}");
    quick_task_runs(&mut tasks).await?;
    drop(restarted);
    Ok(())
}

/// Whether a cgroup v2 hierarchy is mounted (the worker then contains attempts in cgroups).
fn cgroup_v2() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| m.contains(" - cgroup2 "))
}

/// A tmpfs of `bytes` mounted at `dir`, unmounted when dropped; `None` where this process
/// may not mount (not root).
struct TinyDisk(PathBuf);

impl TinyDisk {
    fn mount(dir: &Path, bytes: usize) -> Option<Self> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0700")])
            .arg("scabbard-abuse-spool")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_spool_fails_the_attempt_with_the_reason() -> anyhow::Result<()> {
    let c = Cluster::start(&["healthy"], 1, &[])?;
    let addr = c.addr();
    let data = c.dir.path().join("full");
    let Some(disk) = TinyDisk::mount(&data.join("spool"), 64 << 10) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return Ok(());
    };
    let full = Worker::start(&addr, &data, "full", 1)?;
    wait_agent(&addr, "the worker with a tiny spool", |a| a.name == "full").await?;
    let mut tasks = tasks_client(&addr).await?;
    let mut spec = shell("head -c 400000 /dev/zero | tr '\\0' a; sleep 1000");
    spec.requirements = Some(scabbard_common::proto::Requirements {
        labels: [("name".to_string(), "full".to_string())].into(),
        ..Default::default()
    });
    let id = submit(&mut tasks, spec).await?;
    let first = eventually("the first attempt to end", T, || {
        let mut tasks = tasks.clone();
        let id = id.clone();
        async move {
            let t = get(&mut tasks, &id).await.ok()?;
            t.attempts.first().and_then(|a| a.result.clone())
        }
    })
    .await?;
    assert_eq!(first.outcome(), Outcome::Failed, "{first:?}");
    assert_eq!(first.error_class(), ErrorClass::Infrastructure, "{first:?}");
    assert!(first.message.contains("cannot spool"), "{first:?}");
    // The reason is in the attempt's log as well.
    let log = logs(&mut tasks, &id, 1, false).await?;
    assert!(
        log.contains("cannot spool"),
        "{}",
        &log[log.len().saturating_sub(500)..]
    );
    // Another task, on a healthy worker, runs promptly.
    quick_task_runs_on(&mut tasks, Some("healthy")).await?;
    drop(full);
    drop(disk);
    Ok(())
}

#[tokio::test]
async fn outputs_carrying_a_secret_are_masked_in_the_result_and_the_next_node() -> anyhow::Result<()>
{
    let secret = "hunter2-abuse-value";
    let b64 = std::process::Command::new("sh")
        .args(["-c", &format!("printf %s '{secret}' | base64")])
        .output()?;
    let b64 = String::from_utf8(b64.stdout)?.trim().to_string();
    assert!(!b64.is_empty());
    let c = Cluster::start(&["w0"], 2, &[])?;
    let seen = c.dir.path().join("seen");
    let mut first = node(
        "first",
        &[],
        "echo \"enc=$(printf %s \"$S\" | base64)\" >> \"$SCABBARD_OUTPUT\"; \
         echo \"raw=$S\" >> \"$SCABBARD_OUTPUT\"; echo plain=ok >> \"$SCABBARD_OUTPUT\"",
    );
    first
        .spec
        .as_mut()
        .unwrap()
        .secret_env
        .insert("S".into(), secret.into());
    let second = node(
        "second",
        &["first"],
        &format!(
            "echo \"${{{{ tasks.first.outputs.enc }}}} ${{{{ tasks.first.outputs.raw }}}} ${{{{ tasks.first.outputs.plain }}}}\" > {}",
            seen.display()
        ),
    );
    let mut wf = c.workflows().await?;
    let w = submit_workflow(&mut wf, workflow("masked", vec![first, second])).await?;
    let w = wait_workflow(&mut wf, &w.id, T).await?;
    let outputs = &node_of(&w, "first").outputs;
    assert_eq!(outputs["enc"], "***", "{outputs:?}");
    assert_eq!(outputs["raw"], "***", "{outputs:?}");
    assert_eq!(outputs["plain"], "ok");
    let got = std::fs::read_to_string(&seen)?;
    assert_eq!(got, "*** *** ok\n");
    assert!(!got.contains(&b64) && !got.contains(secret));
    let mut tasks = tasks_client(&c.addr()).await?;
    let first_task = &node_of(&w, "first").task_id;
    let t = get(&mut tasks, first_task).await?;
    let dump = format!("{t:?}");
    assert!(!dump.contains(&b64) && !dump.contains(secret), "{dump}");
    // The log says which outputs were masked.
    let log = logs(&mut tasks, first_task, 1, false).await?;
    for name in ["enc", "raw"] {
        assert!(
            log.contains(&format!("output \"{name}\" contained a secret")),
            "{log}"
        );
    }
    assert!(!log.contains("output \"plain\""), "{log}");
    Ok(())
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0)
}

#[tokio::test]
async fn data_dirs_are_0700_and_their_files_0600() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 1, &[])?;
    let mut tasks = tasks_client(&c.addr()).await?;
    let id = submit(&mut tasks, shell("echo logged")).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded);
    // The attempt's log archived in the (local) blob store: the files at rest.
    eventually("the log archived", T, || {
        let mut tasks = tasks.clone();
        let id = id.clone();
        async move {
            let t = get(&mut tasks, &id).await.ok()?;
            t.attempts
                .first()
                .is_some_and(|a| !a.log_archive.is_empty())
                .then_some(())
        }
    })
    .await?;
    let ctl = c.dir.path().join("controller");
    let worker = c.dir.path().join("w0");
    assert_eq!(mode(&ctl), 0o700, "controller data dir");
    assert_eq!(mode(&worker), 0o700, "worker data dir");
    assert_eq!(mode(&worker.join("identity")), 0o600, "identity");
    assert_eq!(mode(&worker.join("spool")), 0o700, "spool");
    let store = ctl.join("state.redb");
    if store.exists() {
        assert_eq!(mode(&store), 0o600, "embedded store file");
    }
    // Every dir below the controller's data dir is 0700 and every file 0600.
    let mut bad = Vec::new();
    let mut stack = vec![ctl.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            let ft = std::fs::symlink_metadata(&p)?.file_type();
            if ft.is_dir() {
                if mode(&p) != 0o700 {
                    bad.push(format!("{:o} {}", mode(&p), p.display()));
                }
                stack.push(p);
            } else if ft.is_file() && mode(&p) != 0o600 {
                bad.push(format!("{:o} {}", mode(&p), p.display()));
            }
        }
    }
    assert!(bad.is_empty(), "not private: {bad:#?}");
    Ok(())
}

#[tokio::test]
async fn the_cli_escapes_hostile_names_labels_and_errors() -> anyhow::Result<()> {
    const HOSTILE: &str = "\x1b]0;pwned\x07";
    let dir = tempfile::tempdir()?;
    let ctl = Controller::start(&dir.path().join("c"), 0, &ControllerOpts::default())?;
    let addr = ctl.addr.to_string();
    let _w = Worker::start(&addr, &dir.path().join("w"), "w", 1)?;
    let mut tasks = tasks_client(&addr).await?;
    // A hostile name, label and error message (the command's name comes back in it).
    let mut spec = shell("true");
    spec.name = format!("build{HOSTILE}");
    spec.labels.insert("team".into(), format!("x{HOSTILE}"));
    if let Some(scabbard_common::proto::task_spec::Kind::Shell(s)) = &mut spec.kind {
        s.command = vec![format!("no-such-tool{HOSTILE}")];
    }
    let id = submit(&mut tasks, spec).await?;
    let t = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let config = dir.path().join("cli");
    let run = |args: &[&str]| {
        let out = cli(&config)
            .env("SCABBARD_CONTROLLER", &addr)
            .args(args)
            .output()
            .expect("run scabbard");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    for args in [
        vec!["task", "get", id.as_str()],
        vec!["task", "list"],
        vec!["task", "get", "task\x1b[2Jnot-there"],
    ] {
        let (_, text) = run(&args);
        assert!(
            !text.contains('\x1b') && !text.contains('\x07'),
            "{args:?} printed a raw control character: {text:?}"
        );
        assert!(text.contains("\\u{1b}"), "{args:?}: {text}");
    }
    quick_task_runs(&mut tasks).await
}
