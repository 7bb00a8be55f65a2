//! Tests of the shell executor against real processes.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use scabbard_common::proto::{self, ErrorClass, Outcome};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ShellExecutor;
use crate::executor::{ExecContext, ExecOutcome, Executor, OutStream, OutputChunk};

pub(super) fn spec(argv: &[&str]) -> proto::TaskSpec {
    proto::TaskSpec {
        kind: Some(proto::task_spec::Kind::Shell(proto::ShellTask {
            command: argv.iter().map(|s| s.to_string()).collect(),
        })),
        ..Default::default()
    }
}

pub(super) fn ctx(work_root: &Path) -> ExecContext {
    ExecContext {
        task_id: "task-1".into(),
        fencing_token: 7,
        attempt: 2,
        agent_id: "agent-9".into(),
        agent_name: "builder-1".into(),
        work_root: work_root.to_path_buf(),
        default_timeout: Duration::from_secs(30),
        project: "default".into(),
        inputs: Vec::new(),
        artifact_dir: work_root.join("artifacts"),
        trace: None,
    }
}

/// Runs `spec` to the end and returns the outcome with every chunk the executor sent.
pub(super) async fn run(
    spec: &proto::TaskSpec,
    work_root: &Path,
    cancel: CancellationToken,
) -> (ExecOutcome, Vec<OutputChunk>) {
    let (tx, mut rx) = mpsc::channel(16);
    let collector = tokio::spawn(async move {
        let mut chunks = Vec::new();
        while let Some(chunk) = rx.recv().await {
            chunks.push(chunk);
        }
        chunks
    });
    let exec = ShellExecutor::with_kill_grace(Duration::from_millis(300));
    let outcome = exec.run(ctx(work_root), spec, tx, cancel).await;
    let chunks = collector.await.expect("collector");
    (outcome, chunks)
}

pub(super) fn text(chunks: &[OutputChunk], stream: OutStream) -> String {
    let bytes: Vec<u8> = chunks
        .iter()
        .filter(|c| c.stream == stream)
        .flat_map(|c| c.data.iter().copied())
        .collect();
    String::from_utf8(bytes).expect("utf-8 output")
}

/// Whether `pid` no longer runs (a zombie waiting for init counts as gone).
fn process_gone(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, 0) };
    if rc == -1 {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

async fn assert_gone_soon(pid: libc::pid_t) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} survived the attempt"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn read_pid(path: &Path) -> libc::pid_t {
    std::fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

#[tokio::test]
async fn output_arrives_in_order_and_streams_are_split() {
    let root = tempfile::tempdir().unwrap();
    let script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done";
    let (outcome, chunks) = run(
        &spec(&["sh", "-c", script]),
        root.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome, ExecOutcome::succeeded());
    assert_eq!(
        text(&chunks, OutStream::Stdout),
        "out1\nout2\nout3\nout4\nout5\n"
    );
    assert_eq!(
        text(&chunks, OutStream::Stderr),
        "err1\nerr2\nerr3\nerr4\nerr5\n"
    );
    assert!(chunks.iter().all(|c| c.data.len() <= 64 * 1024));
    // The working directory is gone, the root stays.
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn large_output_is_chunked_and_complete() {
    let root = tempfile::tempdir().unwrap();
    let (outcome, chunks) = run(
        &spec(&["sh", "-c", "head -c 300000 /dev/zero"]),
        root.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Succeeded);
    let total: usize = chunks.iter().map(|c| c.data.len()).sum();
    assert_eq!(total, 300_000);
    assert!(chunks.len() >= 5 && chunks.iter().all(|c| c.data.len() <= 64 * 1024));
}

#[tokio::test]
async fn partial_lines_are_sent_without_waiting_for_a_newline() {
    let root = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let spec = spec(&["sh", "-c", "printf partial; sleep 30"]);
    let ctx = ctx(root.path());
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            ShellExecutor::with_kill_grace(Duration::from_millis(300))
                .run(ctx, &spec, tx, cancel)
                .await
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("output in time");
    assert_eq!(first.expect("a chunk").data, b"partial");
    cancel.cancel();
    assert_eq!(run.await.unwrap().outcome, Outcome::Cancelled);
}

#[tokio::test]
async fn non_zero_exit_is_a_user_failure() {
    let root = tempfile::tempdir().unwrap();
    let (outcome, _) = run(
        &spec(&["sh", "-c", "exit 3"]),
        root.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.exit_code, 3);
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert_eq!(outcome.message, "exited with code 3");
}

#[tokio::test]
async fn death_by_signal_maps_to_128_plus_signal() {
    let root = tempfile::tempdir().unwrap();
    let (outcome, _) = run(
        &spec(&["sh", "-c", "kill -KILL $$"]),
        root.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.exit_code, 128 + libc::SIGKILL);
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let root = tempfile::tempdir().unwrap();
    let pid_file = root.path().join("bg.pid");
    let mut spec = spec(&["sh", "-c", "sleep 100 & echo $! > \"$PID_FILE\"; sleep 100"]);
    spec.env = HashMap::from([("PID_FILE".into(), pid_file.display().to_string())]);
    spec.timeout_ms = 500;
    let started = Instant::now();
    let (outcome, chunks) = run(&spec, root.path(), CancellationToken::new()).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(outcome.outcome, Outcome::TimedOut);
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert_eq!(outcome.exit_code, 128 + libc::SIGTERM);
    assert!(text(&chunks, OutStream::System).starts_with("timed out after 0.5s: sent SIGTERM"));
    assert_gone_soon(read_pid(&pid_file)).await;
}

#[tokio::test]
async fn a_group_ignoring_sigterm_is_killed_after_the_grace_period() {
    let root = tempfile::tempdir().unwrap();
    let mut spec = spec(&["sh", "-c", "trap '' TERM; sleep 100 & sleep 100"]);
    spec.timeout_ms = 200;
    let (outcome, chunks) = run(&spec, root.path(), CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::TimedOut);
    assert_eq!(outcome.exit_code, 128 + libc::SIGKILL);
    assert!(text(&chunks, OutStream::System).contains("sent SIGKILL"));
}

#[tokio::test]
async fn cancel_stops_the_attempt() {
    let root = tempfile::tempdir().unwrap();
    let pid_file = root.path().join("bg.pid");
    let mut spec = spec(&["sh", "-c", "sleep 100 & echo $! > \"$PID_FILE\"; wait"]);
    spec.env = HashMap::from([("PID_FILE".into(), pid_file.display().to_string())]);
    let cancel = CancellationToken::new();
    let trigger = {
        let (cancel, pid_file) = (cancel.clone(), pid_file.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::metadata(&pid_file)
                .map(|m| m.len() == 0)
                .unwrap_or(true)
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            cancel.cancel();
        }
    };
    let ((outcome, chunks), ()) = tokio::join!(run(&spec, root.path(), cancel), trigger);
    assert_eq!(outcome.outcome, Outcome::Cancelled);
    assert!(text(&chunks, OutStream::System).starts_with("cancelled: sent SIGTERM"));
    assert_gone_soon(read_pid(&pid_file)).await;
}

#[tokio::test]
async fn background_processes_left_behind_are_killed_on_exit() {
    let root = tempfile::tempdir().unwrap();
    let pid_file = root.path().join("bg.pid");
    // The background sleep inherits stdout: the executor must not wait for it.
    let mut spec = spec(&["sh", "-c", "sleep 100 & echo $! > \"$PID_FILE\"; echo done"]);
    spec.env = HashMap::from([("PID_FILE".into(), pid_file.display().to_string())]);
    let started = Instant::now();
    let (outcome, chunks) = run(&spec, root.path(), CancellationToken::new()).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(outcome.outcome, Outcome::Succeeded);
    assert_eq!(text(&chunks, OutStream::Stdout), "done\n");
    assert_gone_soon(read_pid(&pid_file)).await;
}

#[tokio::test]
async fn a_process_escaping_the_group_does_not_hang_the_executor() {
    let root = tempfile::tempdir().unwrap();
    let pid_file = root.path().join("escaped.pid");
    let mut spec = spec(&[
        "sh",
        "-c",
        "setsid sh -c 'echo $$ > \"$PID_FILE\"; exec sleep 100' & \
         while [ ! -s \"$PID_FILE\" ]; do sleep 0.01; done",
    ]);
    spec.env = HashMap::from([("PID_FILE".into(), pid_file.display().to_string())]);
    let started = Instant::now();
    let (outcome, _) = run(&spec, root.path(), CancellationToken::new()).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(outcome.outcome, Outcome::Succeeded);
    let pid = read_pid(&pid_file);
    // SAFETY: kill() has no memory-safety preconditions; we started this process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    assert_gone_soon(pid).await;
}

#[tokio::test]
async fn environment_is_cleared_except_for_the_spec_and_ours() {
    let root = tempfile::tempdir().unwrap();
    assert!(std::env::vars_os().count() > 0);
    let mut spec = spec(&["env"]);
    // Ours win over the spec's.
    spec.env = HashMap::from([
        ("GREETING".into(), "hello world".into()),
        ("SCABBARD_TASK_ID".into(), "spoofed".into()),
    ]);
    // Secret variables reach the process like the others (the runner redacts the output).
    spec.secret_env = HashMap::from([("TOKEN".into(), "s3cret".into())]);
    let (outcome, chunks) = run(&spec, root.path(), CancellationToken::new()).await;
    assert_eq!(outcome, ExecOutcome::succeeded());
    let vars: HashMap<String, String> = text(&chunks, OutStream::Stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut names: Vec<&str> = vars.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "GREETING",
            "HOME",
            "PATH",
            "SCABBARD_AGENT_ID",
            "SCABBARD_AGENT_NAME",
            "SCABBARD_ATTEMPT",
            "SCABBARD_OUTPUT",
            "SCABBARD_TASK_ID",
            "TOKEN"
        ]
    );
    assert_eq!(vars["GREETING"], "hello world");
    assert_eq!(vars["TOKEN"], "s3cret");
    assert_eq!(vars["SCABBARD_TASK_ID"], "task-1");
    assert_eq!(vars["SCABBARD_ATTEMPT"], "2");
    assert_eq!(vars["SCABBARD_AGENT_ID"], "agent-9");
    assert_eq!(vars["SCABBARD_AGENT_NAME"], "builder-1");
    let workdir = root.path().join("task-1-7");
    assert_eq!(vars["HOME"], workdir.display().to_string());
    assert_eq!(
        vars["SCABBARD_OUTPUT"],
        workdir.join(".scabbard-output").display().to_string()
    );
}

#[tokio::test]
async fn runs_in_a_fresh_working_directory() {
    let root = tempfile::tempdir().unwrap();
    let stale = root.path().join("task-1-7");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("leftover"), b"x").unwrap();
    let (outcome, chunks) = run(
        &spec(&["sh", "-c", "pwd; ls -A; test ! -s \"$SCABBARD_OUTPUT\""]),
        root.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Succeeded);
    // Only the (empty) $SCABBARD_OUTPUT file is there.
    assert_eq!(
        text(&chunks, OutStream::Stdout),
        format!("{}\n.scabbard-output\n", stale.display())
    );
    assert!(!stale.exists());
}

#[tokio::test]
async fn unknown_command_is_a_user_failure_with_127() {
    let root = tempfile::tempdir().unwrap();
    let (outcome, _) = run(
        &spec(&["no-such-command-scabbard"]),
        root.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.exit_code, 127);
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert_eq!(
        outcome.message,
        "command not found: no-such-command-scabbard"
    );
}

#[tokio::test]
async fn empty_command_fails() {
    let root = tempfile::tempdir().unwrap();
    let (outcome, _) = run(&spec(&[]), root.path(), CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.message, "shell task has an empty command");
}

#[tokio::test]
async fn an_unusable_work_root_is_an_infrastructure_failure() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let (outcome, _) = run(&spec(&["true"]), &file, CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.error_class, ErrorClass::Infrastructure);
}

#[tokio::test]
async fn a_dropped_receiver_does_not_block_the_task() {
    let root = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let spec = spec(&["sh", "-c", "head -c 1000000 /dev/zero; echo done >&2"]);
    let exec = ShellExecutor::new();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        exec.run(ctx(root.path()), &spec, tx, CancellationToken::new()),
    )
    .await
    .expect("finished in time");
    assert_eq!(outcome, ExecOutcome::succeeded());
}

/// Set in the helper process of `worker_death_kills_the_direct_child`: the pid file to use.
const HELPER_ENV: &str = "SCABBARD_TEST_PDEATHSIG_PID_FILE";

#[tokio::test]
async fn worker_death_kills_the_direct_child() {
    if let Some(pid_file) = std::env::var_os(HELPER_ENV) {
        // Helper mode: play a worker running a long task until killed.
        let root = tempfile::tempdir().unwrap();
        let mut spec = spec(&["sh", "-c", "echo $$ > \"$PID_FILE\"; exec sleep 100"]);
        spec.env = HashMap::from([("PID_FILE".into(), pid_file.to_string_lossy().into_owned())]);
        run(&spec, root.path(), CancellationToken::new()).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("child.pid");
    let name = module_path!().split_once("::").map_or("", |(_, path)| path);
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &format!("{name}::worker_death_kills_the_direct_child"),
        ])
        .env(HELPER_ENV, &pid_file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&pid_file).map_or(true, |m| m.len() == 0) {
        assert!(Instant::now() < deadline, "helper never started the task");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = read_pid(&pid_file);
    helper.kill().unwrap(); // SIGKILL: no cleanup code runs in the helper.
    helper.wait().unwrap();
    assert_gone_soon(pid).await;
}

#[tokio::test]
async fn artifacts_are_collected_only_from_a_success_and_missing_ones_fail_it() {
    let root = tempfile::tempdir().unwrap();
    let mut context = ctx(root.path());
    context.artifact_dir = root.path().join("task-1-7.artifacts");
    let declare = |task: &mut proto::TaskSpec| {
        task.artifacts = vec![proto::ArtifactSpec {
            name: "dist".into(),
            path: "dist".into(),
            optional: false,
        }];
    };
    let exec = ShellExecutor::with_kill_grace(Duration::from_millis(300));

    let mut task = spec(&["sh", "-c", "mkdir dist && echo x > dist/f"]);
    declare(&mut task);
    let (tx, _rx) = mpsc::channel(64);
    let outcome = exec
        .run(context.clone(), &task, tx, CancellationToken::new())
        .await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    assert_eq!(outcome.artifacts.len(), 1);
    assert!(context.artifact_dir.join("dist/f").is_file());
    std::fs::remove_dir_all(&context.artifact_dir).unwrap();

    // A failed command: nothing is collected.
    let mut task = spec(&["sh", "-c", "mkdir dist && echo x > dist/f && exit 3"]);
    declare(&mut task);
    let (tx, _rx) = mpsc::channel(64);
    let outcome = exec
        .run(context.clone(), &task, tx, CancellationToken::new())
        .await;
    assert_eq!(outcome.exit_code, 3);
    assert!(outcome.artifacts.is_empty());
    assert!(!context.artifact_dir.exists());

    // A success that did not produce a required artifact fails as the task's fault.
    let mut task = spec(&["true"]);
    declare(&mut task);
    let (tx, _rx) = mpsc::channel(64);
    let outcome = exec.run(context, &task, tx, CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert!(
        outcome.message.contains("required artifact dist") && outcome.message.contains("\"dist\""),
        "{}",
        outcome.message
    );
}

#[tokio::test]
async fn an_input_path_leaving_the_work_dir_fails_before_the_command_runs() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("file");
    std::fs::write(&src, "x").unwrap();
    let mut context = ctx(root.path());
    context.inputs = vec![crate::executor::StagedInput {
        from: "t/a".into(),
        path: "../outside".into(),
        local: src,
        kind: proto::ArtifactKind::File,
    }];
    let marker = root.path().join("ran");
    let task = spec(&["touch", marker.to_str().unwrap()]);
    let (tx, _rx) = mpsc::channel(64);
    let outcome = ShellExecutor::new()
        .run(context, &task, tx, CancellationToken::new())
        .await;
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert!(
        outcome.message.contains("../outside"),
        "{}",
        outcome.message
    );
    assert!(!marker.exists(), "the command must not run");
    assert!(!root.path().join("outside").exists());
}
