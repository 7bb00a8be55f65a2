//! The session's life through the real executor and the fake engine of
//! [`super::fake_engine`]: a wrong token, timeout and cancel killing the session's process
//! group, start-up problems, capability probes, and `dagger_call` tasks.

use std::time::Duration;

use scabbard_common::proto::{self, ErrorClass, Outcome};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::DaggerExecutor;
use super::fake_engine::{FakeEngine, Session, assert_session_gone, config, fake_cli, run};
use super::support::Script;
use super::*;
use crate::executor::{ExecOutcome, Executor};

#[tokio::test]
async fn a_wrong_session_token_is_an_infrastructure_failure() {
    let dir = tempfile::tempdir().unwrap();
    let engine = FakeEngine::start(Script::default()).await;
    let cli = fake_cli(dir.path(), engine.port, Session::WrongToken);
    let spec = container_spec("alpine", &[&["true"]]);
    let (outcome, _) = run(config(cli), &spec, dir.path(), CancellationToken::new()).await;
    assert_eq!(
        outcome.error_class,
        ErrorClass::Infrastructure,
        "{outcome:?}"
    );
    assert!(engine.queries().is_empty());
    assert_session_gone(dir.path());
}

#[tokio::test]
async fn timeout_kills_the_session_group_even_when_it_ignores_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let script = Script {
        sync_delay: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let engine = FakeEngine::start(script).await;
    let cli = fake_cli(dir.path(), engine.port, Session::Stubborn);
    let mut spec = container_spec("alpine", &[&["sleep", "600"]]);
    spec.timeout_ms = 700;
    let started = Instant::now();
    let (outcome, chunks) = run(config(cli), &spec, dir.path(), CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::TimedOut, "{outcome:?}");
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(text(&chunks, OutStream::System).contains("timed out after 0.7s: stopping"));
    assert_session_gone(dir.path());
}

#[tokio::test]
async fn cancel_stops_the_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let script = Script {
        sync_delay: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let engine = FakeEngine::start(script).await;
    let cli = fake_cli(dir.path(), engine.port, Session::Ready);
    let spec = container_spec("alpine", &[&["sleep", "600"]]);
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let state = engine.state.clone();
    tokio::spawn(async move {
        // Cancel once the step is running in the engine (its `sync` has arrived).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !state
            .queries
            .lock()
            .unwrap()
            .iter()
            .any(|q| q.contains("sync"))
        {
            assert!(
                Instant::now() < deadline,
                "the step never reached the engine"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        trigger.cancel();
    });
    let (outcome, _) = run(config(cli), &spec, dir.path(), cancel).await;
    assert_eq!(outcome.outcome, Outcome::Cancelled, "{outcome:?}");
    assert_session_gone(dir.path());
}

#[tokio::test]
async fn session_start_problems_are_infrastructure_failures() {
    // No CLI at all.
    let dir = tempfile::tempdir().unwrap();
    let spec = container_spec("alpine", &[&["true"]]);
    let cfg = config(dir.path().join("no-such-dagger"));
    let (outcome, _) = run(cfg, &spec, dir.path(), CancellationToken::new()).await;
    assert_eq!(outcome.error_class, ErrorClass::Infrastructure);
    assert!(
        outcome.message.contains("does not exist") && outcome.message.contains("dagger.cli"),
        "{}",
        outcome.message
    );

    // A session that never reports its port.
    let mut cfg = config(fake_cli(dir.path(), 1, Session::Hangs));
    cfg.session_start_timeout_ms = 500;
    let started = Instant::now();
    let (outcome, _) = run(cfg, &spec, dir.path(), CancellationToken::new()).await;
    assert_eq!(outcome.error_class, ErrorClass::Infrastructure);
    assert!(
        outcome
            .message
            .contains("did not report its port within 0.5s"),
        "{}",
        outcome.message
    );
    assert!(
        outcome
            .message
            .contains("connecting to tcp://fake-engine:1234"),
        "{}",
        outcome.message
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_session_gone(dir.path());

    // A session that gives up.
    let cfg = config(fake_cli(dir.path(), 1, Session::Dies));
    let (outcome, _) = run(cfg, &spec, dir.path(), CancellationToken::new()).await;
    assert_eq!(outcome.error_class, ErrorClass::Infrastructure);
    assert!(
        outcome.message.contains("exited before it was ready"),
        "{}",
        outcome.message
    );
    assert!(
        outcome.message.contains("cannot reach the engine"),
        "{}",
        outcome.message
    );
}

#[tokio::test]
async fn probe_says_yes_only_when_an_engine_answers() {
    let dir = tempfile::tempdir().unwrap();
    let engine = FakeEngine::start(Script::default()).await;
    let cli = fake_cli(dir.path(), engine.port, Session::Ready);
    let exec = DaggerExecutor::new(config(cli.clone()));
    assert!(!exec.available(), "unavailable before the first probe");
    assert!(
        exec.probe().await,
        "the first probe did not reach the engine"
    );
    assert!(exec.available());
    assert!(exec.extra_capabilities().is_empty(), "no GPUs configured");
    assert_eq!(engine.queries(), ["query{version}"]);
    assert_session_gone(dir.path());

    // The engine goes away: the next probe withdraws the capability.
    engine.go_away();
    assert!(
        !exec.probe().await,
        "a probe succeeded against a gone engine"
    );
    assert!(!exec.available());
    assert_eq!(
        engine.queries(),
        ["query{version}"],
        "nothing more was answered"
    );
    assert_session_gone(dir.path());

    // No CLI.
    let exec = DaggerExecutor::new(config(dir.path().join("missing")));
    assert!(!exec.probe().await, "a probe succeeded without a CLI");

    // A worker with GPUs offers `gpu` too (the runner advertises it while available).
    let mut cfg = config(dir.path().join("missing"));
    cfg.gpus = vec!["all".into()];
    assert_eq!(DaggerExecutor::new(cfg).extra_capabilities(), ["gpu"]);
}

#[tokio::test]
async fn rechecks_bring_the_capability_back() {
    let dir = tempfile::tempdir().unwrap();
    let engine = FakeEngine::start(Script::default()).await;
    let cli = dir.path().join("dagger");
    let mut cfg = config(cli.clone());
    cfg.probe_interval_ms = 1_000;
    let exec = DaggerExecutor::new(cfg);
    assert!(!exec.probe().await, "no CLI yet");
    let stop = CancellationToken::new();
    let rechecks = exec.spawn_rechecks(stop.clone()).expect("an interval");
    fake_cli(dir.path(), engine.port, Session::Ready);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exec.available() {
        assert!(
            Instant::now() < deadline,
            "the recheck never saw the engine"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    rechecks.await.unwrap();
}

fn call_spec(function: &str) -> proto::TaskSpec {
    proto::TaskSpec {
        kind: Some(proto::task_spec::Kind::DaggerCall(proto::DaggerCallTask {
            module: "./ci".into(),
            function: function.into(),
            args: vec!["--tag".into(), "v1".into()],
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn dagger_call_runs_the_cli_and_reports_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let cli = fake_cli(dir.path(), 1, Session::Ready);
    let (outcome, chunks) = run(
        config(cli.clone()),
        &call_spec("build"),
        dir.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome, ExecOutcome::succeeded());
    let stdout = text(&chunks, OutStream::Stdout);
    assert!(stdout.contains("call -m ./ci build --tag v1\n"), "{stdout}");
    // The engine is the configured one; the worker's own variables stay out.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    assert!(
        stdout.contains("runner=tcp://fake-engine:1234 home=set worker_var=unset"),
        "{stdout}"
    );
    assert_eq!(text(&chunks, OutStream::Stderr), "progress of the call\n");

    let (outcome, _) = run(
        config(cli),
        &call_spec("fail"),
        dir.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert_eq!(outcome.exit_code, 3);

    let (outcome, _) = run(
        config(dir.path().join("gone")),
        &call_spec("build"),
        dir.path(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(
        outcome.error_class,
        ErrorClass::Infrastructure,
        "{outcome:?}"
    );
}
