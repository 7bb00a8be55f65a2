//! The real executor against a fake engine: an HTTP server on 127.0.0.1 speaking Dagger's
//! protocol (`POST /query`, Basic auth `token:`, canned answers per query shape) and a fake
//! `dagger` CLI, a shell script that on `session` prints the handshake for that server and
//! progress on stderr, then sleeps (with a child) until killed, and on `call` prints its
//! arguments and exits with a code.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use scabbard_common::proto::{self, ErrorClass, Outcome};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::DaggerExecutor;
use super::super::session::process_gone;
use super::support::{Responder, Script};
use super::*;
use crate::config::{DaggerConfig, SecretSource};
use crate::executor::{ExecOutcome, Executor};

const TOKEN: &str = "fake-session-token";

struct State {
    responder: Responder,
    queries: Mutex<Vec<String>>,
}

/// A fake engine session endpoint.
struct FakeEngine {
    port: u16,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl FakeEngine {
    async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            responder: Responder::new(script),
            queries: Mutex::default(),
        });
        let server = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| handle(req, state.clone()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Self {
            port,
            state,
            server,
        }
    }

    fn queries(&self) -> Vec<String> {
        self.state.queries.lock().unwrap().clone()
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != hyper::Method::POST || req.uri().path() != "/query" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            json!({"errors": [{"message": "not found"}]}),
        ));
    }
    let credentials = format!("{TOKEN}:");
    let accepted = [
        base64::engine::general_purpose::STANDARD.encode(&credentials),
        base64::engine::general_purpose::URL_SAFE.encode(&credentials),
    ];
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .map(str::to_string);
    if !auth.is_some_and(|a| accepted.contains(&a)) {
        return Ok(reply(
            StatusCode::UNAUTHORIZED,
            json!({"errors": [{"message": "unauthorized"}]}),
        ));
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let query = body["query"].as_str().unwrap_or_default().to_string();
    state.queries.lock().unwrap().push(query.clone());
    if let Some(delay) = state.responder.delay(&query) {
        tokio::time::sleep(delay).await;
    }
    Ok(match state.responder.answer(&query) {
        Ok(data) => reply(StatusCode::OK, json!({ "data": data })),
        Err(errors) => reply(StatusCode::OK, json!({ "data": null, "errors": errors })),
    })
}

/// How the fake `dagger session` behaves.
#[derive(Clone, Copy)]
enum Session {
    /// Prints the handshake, then waits to be killed.
    Ready,
    /// Like `Ready`, but ignores SIGTERM (and so does its child).
    Stubborn,
    /// Never prints the handshake.
    Hangs,
    /// Prints an error and exits 1.
    Dies,
    /// Prints a handshake with the wrong token.
    WrongToken,
}

/// Writes the fake CLI into `dir`; it records its pid and its child's in `dir`.
fn fake_cli(dir: &Path, port: u16, mode: Session) -> PathBuf {
    let d = dir.display();
    let handshake = |token: &str| format!(r#"echo '{{"port":{port},"session_token":"{token}"}}'"#);
    let behaviour = match mode {
        Session::Ready => handshake(TOKEN),
        Session::Stubborn => format!("trap '' TERM\n  {}", handshake(TOKEN)),
        Session::Hangs => String::new(),
        Session::Dies => {
            "echo 'error: cannot reach the engine at the runner host' >&2\n  exit 1".into()
        }
        Session::WrongToken => handshake("not-the-token"),
    };
    let script = format!(
        r#"#!/bin/sh
case "$1" in
session)
  echo $$ > "{d}/session.pid"
  echo "connecting to ${{_EXPERIMENTAL_DAGGER_RUNNER_HOST:-the default engine}}" >&2
  sleep 1000 &
  echo $! > "{d}/child.pid"
  {behaviour}
  echo "progress: session ready" >&2
  while true; do wait; done
  ;;
call)
  shift
  echo "call $*"
  echo "runner=${{_EXPERIMENTAL_DAGGER_RUNNER_HOST:-none}} home=${{HOME:+set}} worker_var=${{CARGO_MANIFEST_DIR:-unset}}"
  echo "progress of the call" >&2
  case "$*" in *fail*) exit 3;; esac
  exit 0
  ;;
esac
exit 64
"#
    );
    let path = dir.join("dagger");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn pid_in(dir: &Path, file: &str) -> libc::pid_t {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

fn config(cli: PathBuf) -> DaggerConfig {
    DaggerConfig {
        cli: Some(cli),
        runner_host: Some("tcp://fake-engine:1234".into()),
        session_start_timeout_ms: 5_000,
        probe_timeout_ms: 5_000,
        kill_grace_ms: 300,
        ..Default::default()
    }
}

/// Runs `spec` through a [`DaggerExecutor`]; returns the outcome and every chunk.
async fn run(
    cfg: DaggerConfig,
    spec: &proto::TaskSpec,
    work_root: &Path,
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
    let exec = DaggerExecutor::new(cfg);
    let outcome = exec.run(ctx(work_root), spec, tx, cancel).await;
    (outcome, collector.await.unwrap())
}

fn assert_session_gone(dir: &Path) {
    for file in ["session.pid", "child.pid"] {
        let pid = pid_in(dir, file);
        assert!(process_gone(pid), "{file}: {pid} still runs");
    }
}

#[tokio::test]
async fn failing_step_is_a_user_failure_with_progress_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let script = Script {
        exit_codes: [(2, 3)].into(),
        stdout: [(1, "one\n".to_string()), (2, "two\n".to_string())].into(),
        stderr: [(2, "it broke\n".to_string())].into(),
        ..Default::default()
    };
    let engine = FakeEngine::start(script).await;
    let cli = fake_cli(dir.path(), engine.port, Session::Ready);
    let spec = container_spec("alpine", &[&["a"], &["b"], &["c"]]);
    let (outcome, chunks) = run(
        config(cli),
        &spec,
        &dir.path().join("work"),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Failed, "{outcome:?}");
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert_eq!(outcome.exit_code, 3);
    assert_eq!(text(&chunks, OutStream::Stdout), "one\ntwo\n");
    assert_eq!(text(&chunks, OutStream::Stderr), "it broke\n");
    let system = text(&chunks, OutStream::System);
    assert!(
        system.contains("connecting to tcp://fake-engine:1234\n"),
        "{system}"
    );
    assert!(system.contains("progress: session ready\n"), "{system}");
    assert_eq!(
        engine
            .queries()
            .iter()
            .filter(|q| q.contains("withExec"))
            .count(),
        2
    );
    assert_session_gone(dir.path());
    // Nothing exported: the working directory is gone.
    assert!(!dir.path().join("work/task-1-7").exists());
}

#[tokio::test]
async fn successful_task_exports_outputs_and_masks_worker_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "s3cret-value\n").unwrap();
    let script = Script {
        stdout: [(1, "token is s3cret-value\nv2\n".to_string())].into(),
        paths: [("/out/app".to_string(), false)].into(),
        ..Default::default()
    };
    let engine = FakeEngine::start(script).await;
    let mut cfg = config(fake_cli(dir.path(), engine.port, Session::Ready));
    cfg.secrets
        .insert("api".into(), SecretSource::File(secret_file));
    let mut spec = container_spec("alpine", &[&["sh", "-c", "echo token is $API"]]);
    container_mut(&mut spec).secrets.push(proto::SecretRef {
        env: "API".into(),
        source: "api".into(),
    });
    for (name, source) in [
        (
            "app",
            proto::output_spec::Source::ContainerPath("/out/app".into()),
        ),
        ("version", proto::output_spec::Source::LastStdoutLine(true)),
    ] {
        spec.outputs.push(proto::OutputSpec {
            name: name.into(),
            source: Some(source),
        });
    }
    let work = dir.path().join("work");
    let (outcome, chunks) = run(cfg, &spec, &work, CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    assert_eq!(text(&chunks, OutStream::Stdout), "token is ***\nv2\n");
    assert!(!format!("{chunks:?}{outcome:?}").contains("s3cret-value"));
    let app = work.join("task-1-7/outputs/app");
    assert_eq!(outcome.outputs["app"], app.display().to_string());
    assert_eq!(std::fs::read_to_string(&app).unwrap(), "exported /out/app");
    assert!(outcome.outputs["app.digest"].starts_with("sha256:"));
    assert_eq!(outcome.outputs["version"], "v2");
    assert_session_gone(dir.path());
}

#[tokio::test]
async fn engine_error_is_an_infrastructure_failure() {
    let dir = tempfile::tempdir().unwrap();
    let script = Script {
        engine_error_on: Some("ghost:latest".into()),
        ..Default::default()
    };
    let engine = FakeEngine::start(script).await;
    let cli = fake_cli(dir.path(), engine.port, Session::Ready);
    let spec = container_spec("ghost:latest", &[&["true"]]);
    let (outcome, _) = run(config(cli), &spec, dir.path(), CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(
        outcome.error_class,
        ErrorClass::Infrastructure,
        "{outcome:?}"
    );
    assert!(
        outcome.message.contains("failed to resolve image"),
        "{}",
        outcome.message
    );
    assert_session_gone(dir.path());
}

#[tokio::test]
async fn a_panic_in_the_sdk_is_an_infrastructure_failure() {
    let dir = tempfile::tempdir().unwrap();
    let script = Script {
        null_data_on: Some("exitCode".into()),
        ..Default::default()
    };
    let engine = FakeEngine::start(script).await;
    let cli = fake_cli(dir.path(), engine.port, Session::Ready);
    let spec = container_spec("alpine", &[&["true"]]);
    let (outcome, _) = run(config(cli), &spec, dir.path(), CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(
        outcome.error_class,
        ErrorClass::Infrastructure,
        "{outcome:?}"
    );
    assert!(
        outcome.message.contains("the Dagger SDK panicked"),
        "{}",
        outcome.message
    );
    assert_session_gone(dir.path());
}

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
    assert!(exec.probe().await);
    assert!(exec.available());
    assert_eq!(engine.queries(), ["query{version}"]);
    assert_session_gone(dir.path());

    // The engine goes away: the next probe withdraws the capability.
    let port = engine.port;
    drop(engine);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "the fake engine kept listening");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!exec.probe().await);
    assert!(!exec.available());

    // No CLI.
    let exec = DaggerExecutor::new(config(dir.path().join("missing")));
    assert!(!exec.probe().await);
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
