//! Shell tasks with `hide` against real processes: the covered paths show nothing, the task
//! cannot uncover them, sees only its own processes, keeps the worker's user, and nothing
//! survives a timeout. They need util-linux `unshare` and `mount` and user namespaces
//! (resolving the section fails loudly without them).

use std::time::Duration;

use scabbard_common::proto::Outcome;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ShellExecutor;
use super::tests::{ctx, spec, text};
use crate::config::ShellConfig;
use crate::executor::{Executor, OutStream};

#[tokio::test]
async fn hidden_paths_stay_hidden_and_other_processes_invisible() {
    let d = tempfile::tempdir().unwrap();
    let secret_dir = d.path().join("data");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("admin.token"), "ADMIN-TOKEN-VALUE").unwrap();
    let secret_file = d.path().join("credentials.toml");
    std::fs::write(&secret_file, "token = \"CRED-VALUE\"").unwrap();
    let work = d.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let hide = ShellConfig {
        hide: vec![secret_dir.clone(), secret_file.clone()],
        ..Default::default()
    }
    .resolve_hide()
    .expect("shell.hide needs util-linux unshare and mount, and user namespaces")
    .expect("hide is set");
    let exec = ShellExecutor::with_kill_grace(Duration::from_millis(300)).hide(Some(hide));
    // A process of the worker's user outside the task, which the task must not see.
    let mut outside = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let script = format!(
        r#"
        id -u
        echo "pid=$$"
        ls /proc | grep -cE '^[0-9]+$'
        cat {dir}/admin.token 2>/dev/null || echo dir-unreadable
        echo "file=[$(cat {file})]"
        umount {dir} 2>/dev/null || echo umount-refused
        umount -l {file} 2>/dev/null || echo umount-refused
        cat /proc/{other}/environ 2>/dev/null || echo no-such-process
        echo "written" > out.txt && cat out.txt
        "#,
        dir = secret_dir.display(),
        file = secret_file.display(),
        other = outside.id(),
    );
    let (tx, mut rx) = mpsc::channel(64);
    let collector = tokio::spawn(async move {
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push(c);
        }
        chunks
    });
    let outcome = exec
        .run(
            ctx(&work),
            &spec(&["sh", "-c", &script]),
            tx,
            CancellationToken::new(),
        )
        .await;
    let chunks = collector.await.unwrap();
    let _ = outside.kill();
    let _ = outside.wait();
    let all = format!(
        "{}{}",
        text(&chunks, OutStream::Stdout),
        text(&chunks, OutStream::Stderr)
    );
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}\n{all}");
    assert!(
        !all.contains("ADMIN-TOKEN-VALUE") && !all.contains("CRED-VALUE"),
        "{all}"
    );
    let out = text(&chunks, OutStream::Stdout);
    let lines: Vec<&str> = out.lines().collect();
    // SAFETY-free: getuid has no preconditions.
    #[allow(unsafe_code)]
    let uid = unsafe { libc::getuid() };
    assert_eq!(lines[0], uid.to_string(), "the worker's own user: {out}");
    assert_eq!(lines[1], "pid=1", "{out}");
    let visible: u32 = lines[2].parse().unwrap();
    assert!(visible <= 4, "the task sees {visible} processes: {out}");
    assert_eq!(lines[3], "dir-unreadable", "{all}");
    assert_eq!(lines[4], "file=[]", "{all}");
    assert_eq!(lines[5..7], ["umount-refused", "umount-refused"], "{all}");
    assert_eq!(lines[7], "no-such-process", "{all}");
    assert_eq!(lines[8], "written", "{all}");
    // The worker itself still sees them.
    assert_eq!(
        std::fs::read_to_string(secret_dir.join("admin.token")).unwrap(),
        "ADMIN-TOKEN-VALUE"
    );
}

#[tokio::test]
async fn a_timed_out_hidden_task_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let hidden = d.path().join("private");
    std::fs::create_dir(&hidden).unwrap();
    let work = d.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let hide = ShellConfig {
        hide: vec![hidden],
        ..Default::default()
    }
    .resolve_hide()
    .unwrap()
    .unwrap();
    let exec = ShellExecutor::with_kill_grace(Duration::from_millis(300)).hide(Some(hide));
    let marker = format!("hidden-sleeper-{}", std::process::id());
    let mut s = spec(&[
        "sh",
        "-c",
        &format!("(exec -a {marker} sleep 300) & sleep 300"),
    ]);
    s.timeout_ms = 500;
    let (tx, _rx) = mpsc::channel(64);
    let outcome = exec.run(ctx(&work), &s, tx, CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::TimedOut, "{outcome:?}");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .filter(|c| c.contains(&marker))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_missing_path_or_run_as_together_is_refused() {
    let e = ShellConfig {
        hide: vec!["/nonexistent/scabbard-hide".into()],
        ..Default::default()
    }
    .resolve_hide()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("shell.hide") && e.contains("does not exist"),
        "{e}"
    );
    let e = ShellConfig {
        hide: vec!["/tmp".into()],
        run_as: Some("nobody".into()),
        ..Default::default()
    }
    .resolve_hide()
    .unwrap_err()
    .to_string();
    assert!(e.contains("run_as"), "{e}");
    let e = ShellConfig {
        hide: vec!["relative".into()],
        ..Default::default()
    }
    .resolve_hide()
    .unwrap_err()
    .to_string();
    assert!(e.contains("absolute"), "{e}");
}
