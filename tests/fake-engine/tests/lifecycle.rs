//! The process: its handshake and auth, its end (SIGTERM, EOF on stdin) with nothing left
//! behind, bad runner hosts, `version`, `call`, and loud refusals of what it does not model.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::*;
use tokio::time::Instant;

/// Pids of processes whose command line is `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.trim_end() == needle {
            pids.push(pid);
        }
    }
    pids
}

/// Starts a long exec (a shell with a background child) and waits until it runs; returns
/// the command line of its `sleep`s and the pending query.
async fn start_long_exec(
    session: &Session,
    seed: u32,
) -> (
    String,
    tokio::task::JoinHandle<Result<(), dagger_sdk::errors::DaggerError>>,
) {
    let marker = 900_000 + (std::process::id() * 7 + seed) % 99_999;
    let script = format!("echo ready-{seed}; sleep {marker} & sleep {marker}");
    let q = session.query();
    let pending = tokio::spawn(async move {
        q.container()
            .from("alpine")
            .with_exec(sh(&script))
            .sync()
            .await
            .map(|_| ())
    });
    session.wait_for_stderr(&format!("] ready-{seed}")).await;
    let needle = format!("sleep {marker}");
    assert!(!processes_with(&needle).is_empty(), "the exec runs");
    (needle, pending)
}

async fn wait_gone(needle: &str) {
    let deadline = Instant::now() + DEADLINE;
    while !processes_with(needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "exec processes left behind: {needle}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_the_session_and_its_execs() {
    let world = World::new();
    let mut session = world.session().await;
    let (needle, pending) = start_long_exec(&session, 1).await;
    session.terminate();
    assert_eq!(session.wait_exit().await, Some(0));
    let answer = tokio::time::timeout(DEADLINE, pending)
        .await
        .unwrap()
        .unwrap();
    let err = answer.expect_err("the exec was killed");
    assert!(
        messages(&err).contains("shutting down"),
        "{}",
        messages(&err)
    );
    wait_gone(&needle).await;
    assert!(session.stderr().contains("ended"), "{}", session.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_session_leaves_no_exec_behind() {
    let world = World::new();
    let mut session = world.session().await;
    let (needle, _pending) = start_long_exec(&session, 2).await;
    signal(session.child.id().unwrap() as i32, libc::SIGKILL);
    assert_eq!(session.wait_exit().await, None, "killed by a signal");
    wait_gone(&needle).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eof_on_stdin_ends_the_session() {
    let world = World::new();
    let mut session = world.session().await;
    assert_eq!(
        session.query().version().await.unwrap(),
        "v0.19.0-scabbard-fake"
    );
    session.close_stdin();
    assert_eq!(session.wait_exit().await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_token_is_refused() {
    let world = World::new();
    let session = world.session().await;
    let err = session
        .query_with_token("not-the-token")
        .version()
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("401") || messages(&err).contains("unauthorized"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_fields_and_arguments_are_named() {
    let world = World::new();
    let session = world.session().await;
    let q = session.query();
    let client = q.graphql_client.clone();
    for (query, want) in [
        (
            r#"query{container{from(address:"alpine"){terminal{id}}}}"#,
            "fake engine: unsupported field terminal on Container",
        ),
        (
            r#"query{container{withExec(args:["true"], useEntrypoint:true){sync}}}"#,
            "unsupported argument useEntrypoint: true of Container.withExec",
        ),
        (
            r#"query{container{withExec(args:["true"], secretSauce:1){sync}}}"#,
            "unsupported argument secretSauce of Container.withExec",
        ),
        (
            r#"query{moduleSource(refString:"x"){id}}"#,
            "unsupported field moduleSource on Query",
        ),
        (
            r#"query{node(id:"ctr-1"){... on Container{id}}}"#,
            "malformed ID",
        ),
        ("query($x: String){version}", "variables are not supported"),
    ] {
        let err = client.query(query).await.unwrap_err();
        assert!(format!("{err:?}").contains(want), "{query}: {err:?}");
    }
    let ctr = q.container().from("alpine").id().await.unwrap();
    let err = client
        .query(&format!(
            r#"query{{node(id:"{}"){{... on Directory{{entries}}}}}}"#,
            ctr.0
        ))
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("is a Container, not a Directory"),
        "{err:?}"
    );
    // An ID survives node(id:).
    let again: dagger_sdk::Container = q.load(ctr).await.unwrap();
    let out = again
        .with_exec(vec!["echo", "loaded"])
        .stdout()
        .await
        .unwrap();
    assert_eq!(out, "loaded\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_runner_hosts_are_refused_with_a_message() {
    for host in [
        None,
        Some("tcp://engine:1234"),
        Some("fake://relative/state"),
    ] {
        let out = fake_dagger(host)
            .arg("session")
            .stdin(Stdio::piped())
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{host:?}");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("fake://<"), "{host:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn version_and_call() {
    let out = fake_dagger(None).arg("version").output().await.unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("dagger v0.19.0-scabbard-fake"));
    let call = |args: &'static [&'static str]| async move {
        fake_dagger(Some("fake:///nowhere"))
            .arg("call")
            .args(args)
            .output()
            .await
            .unwrap()
    };
    let ok = call(&["-m", "./ci", "build", "--tag", "v1"]).await;
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout),
        "call -m ./ci build --tag v1\n"
    );
    let failed = call(&["-m", "./ci", "fail"]).await;
    assert_eq!(failed.status.code(), Some(3));
}
