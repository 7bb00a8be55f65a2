//! Starting the built `fake-dagger session` like the worker does (cleared environment, the
//! runner host, piped stdin) and pointing the real dagger-sdk at it.

#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dagger_sdk::core::connect_params::ConnectParams;
use dagger_sdk::core::gql_client::GraphQlExtension;
use dagger_sdk::core::graphql_client::{DefaultGraphQLClient, GraphQLError};
use dagger_sdk::errors::DaggerError;
use dagger_sdk::{Query, Selection};
use scabbard_fake_engine::{EngineState, Fixtures};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::Instant;

/// How long anything may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A scratch world: one engine and its fixtures.
pub struct World {
    pub tmp: tempfile::TempDir,
    pub engine: EngineState,
    pub fixtures: Fixtures,
}

impl World {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let engine = EngineState::new(tmp.path().join("engine")).unwrap();
        let fixtures = Fixtures::new(tmp.path().join("fixtures")).unwrap();
        Self {
            tmp,
            engine,
            fixtures,
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub async fn session(&self) -> Session {
        Session::start(&self.engine.runner_host(Some(&self.fixtures))).await
    }
}

/// A running `fake-dagger session`; SIGKILLed on drop.
pub struct Session {
    pub child: Child,
    pub port: u16,
    pub token: String,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<String>>,
}

/// `fake-dagger` with the environment the worker gives it.
pub fn fake_dagger(runner_host: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fake-dagger"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DAGGER_NO_NAG", "1");
    if let Some(host) = runner_host {
        cmd.env("_EXPERIMENTAL_DAGGER_RUNNER_HOST", host);
    }
    cmd
}

impl Session {
    pub async fn start(runner_host: &str) -> Self {
        let mut child = fake_dagger(Some(runner_host))
            .args(["session", "--label", "dagger.io/sdk.name:rust"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start fake-dagger");
        let stderr = Arc::new(Mutex::new(String::new()));
        tokio::spawn(collect(child.stderr.take().unwrap(), stderr.clone()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("handshake in time")
            .expect("read stdout")
            .unwrap_or_else(|| panic!("no handshake; stderr: {}", stderr.lock().unwrap()));
        let ready: serde_json::Value = serde_json::from_str(&line).expect("handshake JSON");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            port: ready["port"].as_u64().unwrap() as u16,
            token: ready["session_token"].as_str().unwrap().to_string(),
            stdin: child.stdin.take(),
            child,
            stderr,
        }
    }

    /// A `Query` root on this session, as the worker builds one.
    pub fn query(&self) -> Query {
        self.query_with_token(&self.token)
    }

    pub fn query_with_token(&self, token: &str) -> Query {
        let params = ConnectParams::new(u64::from(self.port), token);
        Query {
            proc: None,
            selection: Selection::default(),
            graphql_client: Arc::new(DefaultGraphQLClient::new(
                &params,
                &dagger_sdk::Config::default(),
            )),
        }
    }

    /// Everything the session wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle`.
    pub async fn wait_for_stderr(&self, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the session's stderr: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes stdin (the session's end, for the SDK).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        signal(self.child.id().expect("running") as i32, libc::SIGTERM);
    }

    /// Waits for the session to exit; returns its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the session exits in time")
            .expect("wait")
            .code()
    }
}

async fn collect(pipe: impl AsyncRead + Unpin, into: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut s = into.lock().unwrap();
        s.push_str(&line);
        s.push('\n');
    }
}

#[allow(unsafe_code)]
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid we started and a valid signal number.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The `ExecError` in an SDK error: (exit code, stdout, stderr).
pub fn exec_error(e: &DaggerError) -> Option<(i32, String, String)> {
    if let DaggerError::Query(GraphQLError::DomainError { fields, .. }) = e {
        for f in fields {
            if let Some(GraphQlExtension::ExecError {
                exit_code,
                stdout,
                stderr,
                ..
            }) = &f.extensions
            {
                return Some((*exit_code, stdout.clone(), stderr.clone()));
            }
        }
    }
    None
}

/// The engine's messages in an SDK error.
pub fn messages(e: &DaggerError) -> String {
    match e {
        DaggerError::Query(GraphQLError::DomainError { fields, message }) => {
            let all: Vec<&str> = fields.iter().map(|f| f.message.as_str()).collect();
            if all.is_empty() {
                message.clone()
            } else {
                all.join("; ")
            }
        }
        other => format!("{other:?}"),
    }
}

/// `["sh", "-c", script]`.
pub fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}
