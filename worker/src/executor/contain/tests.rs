//! Containment against real processes: a grandchild that left the attempt's process group
//! and session dies with the attempt, and a worker that was killed finds and kills what its
//! previous life left.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Containment, alive};
use crate::executor::Executor;
use crate::executor::ShellExecutor;

/// A task that starts a grandchild in its own session (double fork), writes its pid and
/// exits at once.
const ESCAPE: &str = "setsid sh -c 'echo $$ > \"$0\"; exec sleep 1000' \"$PWD/../escaped.pid\" & \
                      while [ ! -s ../escaped.pid ]; do sleep 0.01; done";

fn spec(script: &str) -> scabbard_common::proto::TaskSpec {
    scabbard_common::proto::TaskSpec {
        kind: Some(scabbard_common::proto::task_spec::Kind::Shell(
            scabbard_common::proto::ShellTask {
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            },
        )),
        ..Default::default()
    }
}

fn read_pid(path: &Path) -> libc::pid_t {
    std::fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

async fn gone_soon(pid: libc::pid_t) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

fn kill(pid: libc::pid_t) {
    // SAFETY: kill() has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

async fn escaped_grandchild_dies_with_the_attempt(cgroups: bool) {
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let contain = Arc::new(Containment::open_with(&d.path().join("data"), cgroups).unwrap());
    assert_eq!(contain.uses_cgroups(), cgroups && contain.base.is_some());
    let exec =
        ShellExecutor::with_kill_grace(Duration::from_millis(300)).contain(Some(contain.clone()));
    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let ctx = crate::executor::ExecContext {
        task_id: format!("contain-{cgroups}"),
        fencing_token: 7,
        attempt: 2,
        agent_id: "agent-9".into(),
        agent_name: "builder-1".into(),
        work_root: work.clone(),
        default_timeout: Duration::from_secs(30),
        project: "default".into(),
        inputs: Vec::new(),
        artifact_dir: work.join("artifacts"),
        trace: None,
    };
    let outcome = exec
        .run(ctx, &spec(ESCAPE), tx, CancellationToken::new())
        .await;
    assert_eq!(
        outcome.outcome,
        scabbard_common::proto::Outcome::Succeeded,
        "{}",
        outcome.message
    );
    let pid = read_pid(&work.join("escaped.pid"));
    let ok = gone_soon(pid).await;
    if !ok {
        kill(pid);
    }
    assert!(ok, "the escaped grandchild {pid} outlived its attempt");
    // The attempt's record is gone with it.
    let records = std::fs::read_dir(d.path().join("data/attempts"))
        .unwrap()
        .count();
    assert_eq!(records, 0);
}

#[tokio::test]
async fn an_escaped_grandchild_dies_with_the_attempt_in_a_cgroup() {
    escaped_grandchild_dies_with_the_attempt(true).await;
}

#[tokio::test]
async fn an_escaped_grandchild_dies_with_the_attempt_without_cgroups() {
    escaped_grandchild_dies_with_the_attempt(false).await;
}

/// What a worker killed with SIGKILL leaves: an attempt whose cage was never dropped.
fn leave_an_escaped_process(data: &Path, cgroups: bool) -> libc::pid_t {
    let contain = Containment::open_with(data, cgroups).unwrap();
    let task = format!("left-behind-{cgroups}");
    let cage = contain.cage(&task, 3, 1).unwrap();
    let pidfile = data.join("left.pid");
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args([
        "-c",
        "setsid sh -c 'echo $$ > \"$0\"; exec sleep 1000' \"$1\" &",
        "sh",
    ])
    .arg(&pidfile)
    .env("SCABBARD_TASK_ID", &task)
    .env("SCABBARD_ATTEMPT", "1");
    cage.enter_on_exec(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    cage.note_leader(child.id() as libc::pid_t);
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&pidfile).map_or(true, |s| !s.ends_with('\n')) {
        assert!(std::time::Instant::now() < deadline, "no pid file");
        std::thread::sleep(Duration::from_millis(10));
    }
    // No cleanup runs: the worker "died" (its sentinel is left waiting, as if the worker
    // were frozen rather than dead).
    std::mem::forget(cage);
    std::mem::forget(contain);
    read_pid(&pidfile)
}

async fn the_next_life_kills_the_leftovers(cgroups: bool) {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let pid = leave_an_escaped_process(&data, cgroups);
    assert!(
        alive(pid),
        "the leftover should still run before the restart"
    );
    let _next = Containment::open_with(&data, cgroups).unwrap();
    let ok = gone_soon(pid).await;
    if !ok {
        kill(pid);
    }
    assert!(ok, "the leftover {pid} survived the worker's restart");
    assert_eq!(std::fs::read_dir(data.join("attempts")).unwrap().count(), 0);
}

#[tokio::test]
async fn a_restarted_worker_kills_what_its_previous_life_left_in_a_cgroup() {
    the_next_life_kills_the_leftovers(true).await;
}

#[tokio::test]
async fn a_restarted_worker_kills_what_its_previous_life_left_without_cgroups() {
    the_next_life_kills_the_leftovers(false).await;
}

#[test]
fn a_reused_pid_is_not_killed() {
    // Our own pid, with a start time that is not ours: left alone.
    let me = std::process::id() as libc::pid_t;
    let start = super::start_time(me).unwrap();
    assert_eq!(super::kill_old_group(me, start + 1), 0);
    assert!(alive(me));
}

#[test]
fn markers_match_whole_variables_only() {
    let m = super::Marker::new("t1", 2);
    assert!(m.matches(b"A=1\0SCABBARD_TASK_ID=t1\0SCABBARD_ATTEMPT=2\0"));
    assert!(!m.matches(b"SCABBARD_TASK_ID=t10\0SCABBARD_ATTEMPT=2\0"));
    assert!(!m.matches(b"SCABBARD_TASK_ID=t1\0"));
    assert_eq!(super::unhex(&super::hex(b"a\x01")), Some(b"a\x01".to_vec()));
}

#[test]
fn only_this_workers_cgroups_are_touched_at_start() {
    let base = Path::new("/cg/own/scabbard-00ff-42");
    assert!(super::same_worker(
        Path::new("/cg/own/scabbard-00ff-42/t-1"),
        base
    ));
    assert!(super::same_worker(
        Path::new("/cg/own/scabbard-00ff-7/t-1"),
        base
    ));
    assert!(!super::same_worker(
        Path::new("/cg/own/scabbard-00fe-7/t-1"),
        base
    ));
    assert!(!super::same_worker(
        Path::new("/cg/other/scabbard-00ff-7/t-1"),
        base
    ));
    assert!(!super::same_worker(
        Path::new("/cg/own/scabbard-00ff-7"),
        base
    ));
}
