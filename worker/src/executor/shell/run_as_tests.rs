//! Shell tasks run as another user (`run_as = nobody`) against real processes: who they
//! are, what they see of other processes, and that nothing survives a timeout or a cancel.
//! These tests need root and util-linux `unshare` (resolving the section fails loudly
//! without them).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use scabbard_common::proto::{self, Outcome};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ShellExecutor;
use super::tests::{ctx, spec, text};
use crate::config::ShellConfig;
use crate::executor::{ExecOutcome, Executor, OutStream, OutputChunk};

fn nobody() -> ShellExecutor {
    let run_as = ShellConfig {
        run_as: Some("nobody".into()),
        unshare: None,
        hide: Vec::new(),
    }
    .resolve()
    .expect("run_as = nobody needs root and util-linux unshare");
    ShellExecutor::with_kill_grace(Duration::from_millis(300)).run_as(run_as)
}

/// A work root the task user may pass through (0711), like the worker makes it.
fn work_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    d
}

async fn run_as_nobody(
    spec: &proto::TaskSpec,
    root: &Path,
    cancel: CancellationToken,
) -> (ExecOutcome, Vec<OutputChunk>) {
    let (tx, mut rx) = mpsc::channel(16);
    let collector = tokio::spawn(async move {
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push(c);
        }
        chunks
    });
    let outcome = nobody().run(ctx(root), spec, tx, cancel).await;
    (outcome, collector.await.unwrap())
}

/// PIDs (in the worker's namespace) of live processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie && String::from_utf8_lossy(&cmdline).contains(marker) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn the_task_is_nobody_alone_in_its_own_pid_namespace() {
    let root = work_root();
    let script = r#"
        id -u; id -g; id -G
        echo "pid=$$"
        ls /proc | grep -cE '^[0-9]+$'
        stat -c '%u %a' .
        echo "home=$HOME"
        echo "key=value" >> "$SCABBARD_OUTPUT"
    "#;
    let (outcome, chunks) = run_as_nobody(
        &spec(&["sh", "-c", script]),
        root.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(
        outcome.outcome,
        Outcome::Succeeded,
        "{outcome:?} {chunks:?}"
    );
    let out = text(&chunks, OutStream::Stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..4], ["65534", "65534", "65534", "pid=1"], "{out}");
    let visible: u32 = lines[4].parse().unwrap();
    assert!(visible <= 4, "the task sees {visible} processes: {out}");
    assert_eq!(lines[5], "65534 700", "its work dir is its own: {out}");
    assert!(
        lines[6].starts_with("home=") && lines[6].contains("task-1-7-"),
        "{out}"
    );
    assert_eq!(
        outcome.outputs.get("key").map(String::as_str),
        Some("value")
    );
    // The work dir was removed, and it was named beyond guessing.
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    let name = lines[6].rsplit('/').next().unwrap();
    assert_eq!(name.len(), "task-1-7-".len() + 32, "{name}");
}

#[tokio::test]
async fn a_task_cannot_read_another_running_tasks_environment() {
    let root = work_root();
    let mut first = spec(&["sh", "-c", "sleep 987.71"]);
    first
        .secret_env
        .insert("SECRET".into(), "topsecret-of-task-a".into());
    let cancel_first = CancellationToken::new();
    let running = {
        let (root, cancel) = (root.path().to_path_buf(), cancel_first.clone());
        tokio::spawn(async move { run_as_nobody(&first, &root, cancel).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(&pid) = processes_with("987.71").first() {
            break pid;
        }
        assert!(Instant::now() < deadline, "the first task did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The worker (root, outside the namespaces) can see it is there.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("topsecret-of-task-a"));

    let script = format!(
        "cat /proc/{pid}/environ; echo \"cat=$?\"; ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '"
    );
    let (outcome, chunks) = run_as_nobody(
        &spec(&["sh", "-c", &script]),
        root.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    let out = text(&chunks, OutStream::Stdout);
    let err = text(&chunks, OutStream::Stderr);
    assert!(
        !out.contains("topsecret") && !err.contains("topsecret"),
        "{out} {err}"
    );
    assert!(out.contains("cat=1"), "{out} {err}");
    assert!(err.contains("No such file or directory"), "{err}");
    let pids: Vec<i32> = out
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1) && !pids.contains(&pid), "{pids:?}");
    assert!(pids.len() <= 4, "{pids:?}");

    cancel_first.cancel();
    let (outcome, _) = running.await.unwrap();
    assert_eq!(outcome.outcome, Outcome::Cancelled);
}

#[tokio::test]
async fn timeout_and_cancel_leave_no_process_behind() {
    let root = work_root();
    // Background processes, one of them out of the process group (setsid).
    let script = "sleep 987.81 & setsid sleep 987.82 & sleep 987.83";
    let mut timed = spec(&["sh", "-c", script]);
    timed.timeout_ms = 500;
    let (outcome, chunks) = run_as_nobody(&timed, root.path(), CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::TimedOut, "{outcome:?}");
    assert!(text(&chunks, OutStream::System).contains("timed out"));
    assert_eq!(processes_with("987.8"), Vec::<i32>::new());

    let script = "sleep 987.91 & setsid sleep 987.92 & trap '' TERM; sleep 987.93";
    let cancel = CancellationToken::new();
    let running = {
        let (root, cancel) = (root.path().to_path_buf(), cancel.clone());
        let spec = spec(&["sh", "-c", script]);
        tokio::spawn(async move { run_as_nobody(&spec, &root, cancel).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_with("987.9").len() < 3 {
        assert!(Instant::now() < deadline, "the task did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    let (outcome, _) = running.await.unwrap();
    assert_eq!(outcome.outcome, Outcome::Cancelled);
    assert_eq!(processes_with("987.9"), Vec::<i32>::new());
}

#[tokio::test]
async fn the_task_cannot_reach_the_workers_private_files() {
    // The worker's data dir as `layout` makes it: 0711 with the work root inside, identity
    // 0600, spool 0700.
    let d = work_root();
    let data = d.path().join("data");
    std::fs::create_dir_all(data.join("spool")).unwrap();
    std::fs::create_dir_all(data.join("work")).unwrap();
    std::fs::write(data.join("identity"), "agent-1\nscbd_agent_secret\n").unwrap();
    for (p, mode) in [
        ("", 0o711),
        ("spool", 0o700),
        ("work", 0o711),
        ("identity", 0o600),
    ] {
        std::fs::set_permissions(data.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let script = format!(
        "cat {0}/identity; echo \"identity=$?\"; ls {0}/spool; echo \"spool=$?\"; ls {0}; echo \"list=$?\"",
        data.display()
    );
    let (outcome, chunks) = run_as_nobody(
        &spec(&["sh", "-c", &script]),
        &data.join("work"),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    let out = text(&chunks, OutStream::Stdout);
    let err = text(&chunks, OutStream::Stderr);
    assert!(!out.contains("scbd_agent_secret"), "{out}");
    for line in ["identity=1", "spool=2", "list=2"] {
        assert!(out.contains(line), "{line}: {out} {err}");
    }
    assert_eq!(err.matches("Permission denied").count(), 3, "{err}");
}

#[tokio::test]
async fn a_command_the_task_user_cannot_find_is_named() {
    let root = work_root();
    let (outcome, _) = run_as_nobody(
        &spec(&["no-such-command-here"]),
        root.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.exit_code, 127);
    assert!(
        outcome
            .message
            .contains("command not found: no-such-command-here"),
        "{}",
        outcome.message
    );
    assert!(outcome.message.contains("nobody"), "{}", outcome.message);
}

#[tokio::test]
async fn inputs_are_the_tasks_own_copies_and_artifacts_are_collected() {
    let root = work_root();
    let cache = tempfile::tempdir().unwrap();
    let tree = cache.path().join("content");
    std::fs::create_dir_all(tree.join("lib")).unwrap();
    std::fs::write(tree.join("lib/a.txt"), "original\n").unwrap();
    std::fs::write(tree.join("lib/b.txt"), "keep me\n").unwrap();
    let script = r#"
        set -e
        echo changed > in/dist/lib/a.txt
        rm in/dist/lib/b.txt
        mkdir -p build/out && cp -r in/dist/lib build/out/ && echo done > build/out/stamp
    "#;
    let mut task = spec(&["sh", "-c", script]);
    task.artifacts = vec![proto::ArtifactSpec {
        name: "out".into(),
        path: "build/out".into(),
        optional: false,
    }];
    let mut context = ctx(root.path());
    context.inputs = vec![crate::executor::StagedInput {
        from: "${{ tasks.p.artifacts.dist }}".into(),
        path: "in/dist".into(),
        local: tree.clone(),
        kind: proto::ArtifactKind::Directory,
    }];
    let artifact_dir = cache.path().join("artifacts");
    context.artifact_dir = artifact_dir.clone();
    let (tx, _rx) = mpsc::channel(64);
    let outcome = nobody()
        .run(context, &task, tx, CancellationToken::new())
        .await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    assert_eq!(outcome.artifacts.len(), 1);
    assert_eq!(
        std::fs::read_to_string(artifact_dir.join("out/lib/a.txt")).unwrap(),
        "changed\n"
    );
    assert!(artifact_dir.join("out/stamp").is_file());
    assert_eq!(
        std::fs::metadata(artifact_dir.join("out/stamp"))
            .unwrap()
            .uid(),
        65534
    );
    // The cache entry is untouched.
    assert_eq!(
        std::fs::read_to_string(tree.join("lib/a.txt")).unwrap(),
        "original\n"
    );
    assert_eq!(
        std::fs::read_to_string(tree.join("lib/b.txt")).unwrap(),
        "keep me\n"
    );
    assert_eq!(std::fs::metadata(tree.join("lib/a.txt")).unwrap().uid(), 0);
}
