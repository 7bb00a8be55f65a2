//! The real executor against a fake engine: an HTTP server on 127.0.0.1 speaking Dagger's
//! protocol (`POST /query`, Basic auth `token:`, canned answers per query shape) and a fake
//! `dagger` CLI, a shell script that on `session` prints the handshake for that server and
//! progress on stderr, then sleeps (with a child) until killed, and on `call` prints its
//! arguments and exits with a code. Container tasks here; the session's life (timeout,
//! cancel, start-up problems), probes and `dagger_call` in [`super::fake_session`].

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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
use tokio_util::sync::CancellationToken;

use super::super::DaggerExecutor;
use super::super::session::process_gone;
use super::support::{Responder, Script};
use super::*;
use crate::config::{DaggerConfig, SecretSource, WorkerSecret};
use crate::executor::{ExecOutcome, Executor};

pub(super) const TOKEN: &str = "fake-session-token";

pub(super) struct State {
    responder: Responder,
    pub(super) queries: Mutex<Vec<String>>,
    /// Set by [`FakeEngine::go_away`]: every connection is closed unanswered.
    gone: AtomicBool,
}

/// A fake engine session endpoint.
pub(super) struct FakeEngine {
    pub(super) port: u16,
    pub(super) state: Arc<State>,
    server: JoinHandle<()>,
}

impl FakeEngine {
    pub(super) async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            responder: Responder::new(script),
            queries: Mutex::default(),
            gone: AtomicBool::new(false),
        });
        let server = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    if state.gone.load(Ordering::SeqCst) {
                        drop(stream);
                        continue;
                    }
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

    /// The engine dies behind its session: connections are accepted and closed at once.
    /// The port stays bound, so no other test's engine can take it and answer instead.
    pub(super) fn go_away(&self) {
        self.state.gone.store(true, Ordering::SeqCst);
    }

    pub(super) fn queries(&self) -> Vec<String> {
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
    if state.gone.load(Ordering::SeqCst) {
        return Ok(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"errors": [{"message": "engine gone"}]}),
        ));
    }
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
pub(super) enum Session {
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
pub(super) fn fake_cli(dir: &Path, port: u16, mode: Session) -> PathBuf {
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
  echo "$*" > "{d}/session.args"
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

pub(super) fn pid_in(dir: &Path, file: &str) -> libc::pid_t {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

pub(super) fn config(cli: PathBuf) -> DaggerConfig {
    DaggerConfig {
        cli: Some(cli),
        runner_host: Some("tcp://fake-engine:1234".into()),
        // Generous: a loaded CI host must not turn a slow start into a failed test.
        session_start_timeout_ms: 30_000,
        probe_timeout_ms: 30_000,
        kill_grace_ms: 300,
        ..Default::default()
    }
}

/// Runs `spec` through a [`DaggerExecutor`]; returns the outcome and every chunk.
pub(super) async fn run(
    cfg: DaggerConfig,
    spec: &proto::TaskSpec,
    work_root: &Path,
    cancel: CancellationToken,
) -> (ExecOutcome, Vec<OutputChunk>) {
    run_in(cfg, spec, ctx(work_root), cancel).await
}

/// Runs `spec` as the attempt `ctx`.
pub(super) async fn run_in(
    cfg: DaggerConfig,
    spec: &proto::TaskSpec,
    ctx: crate::executor::ExecContext,
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
    let outcome = exec.run(ctx, spec, tx, cancel).await;
    (outcome, collector.await.unwrap())
}

pub(super) fn assert_session_gone(dir: &Path) {
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
        .insert("api".into(), SecretSource::File(secret_file).into());
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
    // The exported output is kept (its path is in the result); nothing else is.
    let left: Vec<_> = std::fs::read_dir(work.join("task-1-7"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["outputs"]);
    assert_session_gone(dir.path());
    // The session was started with plain progress (exec output in the engine's log).
    let args = std::fs::read_to_string(dir.path().join("session.args")).unwrap();
    assert!(
        args.starts_with("session --progress plain --label"),
        "{args}"
    );
}

#[tokio::test]
async fn artifacts_land_in_the_artifact_dir_and_the_work_dir_goes() {
    let dir = tempfile::tempdir().unwrap();
    let script = Script {
        stdout: [(1, "built\n".to_string())].into(),
        output_file: "size=42\n".into(),
        paths: [("/out/dist".to_string(), true)].into(),
        ..Default::default()
    };
    let engine = FakeEngine::start(script).await;
    let cfg = config(fake_cli(dir.path(), engine.port, Session::Ready));
    let mut spec = container_spec("alpine", &[&["make", "dist"]]);
    spec.artifacts.push(proto::ArtifactSpec {
        name: "dist".into(),
        path: "/out/dist".into(),
        optional: false,
    });
    let work = dir.path().join("work");
    let c = ctx(&work);
    let artifact_dir = c.artifact_dir.clone();
    let (outcome, chunks) = run_in(cfg, &spec, c, CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    assert_eq!(text(&chunks, OutStream::Stdout), "built\n");
    assert_eq!(outcome.outputs["size"], "42");
    assert_eq!(outcome.artifacts.len(), 1);
    assert_eq!(outcome.artifacts[0].kind, proto::ArtifactKind::Directory);
    assert_eq!(
        std::fs::read_to_string(artifact_dir.join("dist/a.txt")).unwrap(),
        "exported /out/dist/a.txt"
    );
    assert!(!work.join("task-1-7").exists());
    assert_session_gone(dir.path());
}

#[tokio::test]
async fn another_projects_secret_is_refused_without_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let engine = FakeEngine::start(Script::default()).await;
    let mut cfg = config(fake_cli(dir.path(), engine.port, Session::Ready));
    // Reading this source would fail (the file does not exist): the refusal must come first.
    cfg.secrets.insert(
        "npm".into(),
        WorkerSecret::for_projects(
            SecretSource::File(dir.path().join("no-such-secret")),
            &["web"],
        ),
    );
    let mut spec = container_spec("node", &[&["npm", "publish"]]);
    container_mut(&mut spec).secrets.push(proto::SecretRef {
        env: "NPM_TOKEN".into(),
        source: "npm".into(),
    });
    let mut c = ctx(dir.path());
    c.project = "api".into();
    let (outcome, _) = run_in(cfg, &spec, c, CancellationToken::new()).await;
    assert_eq!(outcome.error_class, ErrorClass::User, "{outcome:?}");
    assert!(
        outcome.message.contains("secret source 'npm'")
            && outcome.message.contains("project 'api'"),
        "{}",
        outcome.message
    );
    assert!(engine.queries().is_empty());
    assert!(
        !dir.path().join("session.pid").exists(),
        "no session started"
    );
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
