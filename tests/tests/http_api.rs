//! The HTTP/JSON API (`--http-listen`) against a real controller and worker process:
//! submit/get/list/cancel/logs over HTTP; every route without a token, with a read-scoped
//! token and with another project's token gets the status gRPC's code maps to and a JSON
//! error; server-sent events arrive and resume after a controller restart with
//! `Last-Event-ID` with no gap; the OpenAPI document validates (openapi-spec-validator)
//! and lists every route; rate-limited calls get 429 with Retry-After; over TLS (HTTPS with
//! the controller's certificate) a follower forwards to the leader, or answers 307 to the
//! leader's HTTP API when it cannot. HTTP is spoken with `curl` (scripts/setup.sh
//! installs it).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::client::{AdminServiceClient, ProjectServiceClient, TaskServiceClient};
use scabbard_common::proto::{
    CreateProjectRequest, CreateTokenRequest, GetTaskRequest, Project, Scope, TokenKind,
};
use scabbard_tests::*;
use serde_json::{Value, json};

/// A response: status, headers (lower-cased names), JSON body (Null when empty or not JSON).
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn curl_bin() -> &'static str {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is missing: run scripts/setup.sh");
    }
    "curl"
}

/// The CA https:// calls trust (the TLS test's dev CA).
static CA_CERT: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// One HTTP call with curl.
fn http(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> Result<Resp> {
    let mut c = Command::new(curl_bin());
    c.args(["-sS", "-i", "--max-time", "30", "-X", method]);
    if url.starts_with("https:")
        && let Some(ca) = CA_CERT.lock().expect("lock").clone()
    {
        c.arg("--cacert").arg(ca);
    }
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = c.arg(url).output().context("run curl")?;
    if !out.status.success() {
        bail!(
            "curl {method} {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    event: String,
    data: Value,
}

/// A curl reading an event stream; events arrive on `rx`.
struct SseClient {
    child: Child,
    rx: mpsc::Receiver<Sse>,
}

impl SseClient {
    fn open(url: &str, token: &str, last_event_id: Option<&str>) -> Result<Self> {
        let mut c = Command::new(curl_bin());
        c.args(["-sSN", "-H", "Accept: text/event-stream"])
            .args(["-H", &format!("Authorization: Bearer {token}")]);
        if let Some(id) = last_event_id {
            c.args(["-H", &format!("Last-Event-ID: {id}")]);
        }
        let mut child = c.arg(url).stdout(Stdio::piped()).spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    if !data.is_empty() {
                        let ev = Sse {
                            id: std::mem::take(&mut id),
                            event: std::mem::take(&mut event),
                            data: serde_json::from_str(&data).unwrap_or(Value::Null),
                        };
                        data.clear();
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                    continue;
                }
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                } else if !line.starts_with(':') {
                    // Not an event stream (a JSON error): keep it for the failure message.
                    let raw = Sse {
                        id: String::new(),
                        event: "raw".into(),
                        data: Value::String(line),
                    };
                    if tx.send(raw).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Self { child, rx })
    }

    /// Events until `done` says so (or the deadline: an error).
    fn until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Sse]) -> bool,
    ) -> Result<Vec<Sse>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => got.push(e),
                Err(_) => bail!("waiting for {what}: got {got:#?}"),
            }
        }
        Ok(got)
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn task_state(e: &Sse) -> (&str, &str) {
    let t = &e.data["task"];
    (
        t["id"].as_str().unwrap_or(""),
        t["state"].as_str().unwrap_or(""),
    )
}

fn saw_state(events: &[Sse], id: &str, state: &str) -> bool {
    events.iter().any(|e| task_state(e) == (id, state))
}

fn rev(id: &str) -> i64 {
    id.split(':')
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or(-1)
}

/// A tiny standard base64 decoder (log chunk data).
fn b64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' | b'-' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, c)| {
            acc | (u32::from(val(*c)) << (18 - 6 * i))
        });
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn venv_python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let py = root.join(".venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import openapi_spec_validator"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "openapi-spec-validator is missing from .venv: run scripts/setup.sh"
    );
    py
}

struct Cluster {
    etcd: scabbard_tests::etcd::EtcdServer,
    dir: tempfile::TempDir,
    ctl: Controller,
    _worker: Worker,
    http_port: u16,
}

impl Cluster {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// A controller on etcd (its history outlives controller restarts: the embedded store
    /// keeps no watch history across a restart).
    fn start_controller(
        dir: &std::path::Path,
        name: &str,
        etcd: &str,
        port: u16,
        http_port: u16,
    ) -> Result<Controller> {
        Controller::start(
            &dir.join(name),
            port,
            &ControllerOpts {
                extra: vec![
                    "--http-listen".into(),
                    format!("127.0.0.1:{http_port}"),
                    "--store".into(),
                    "etcd".into(),
                    "--etcd-endpoints".into(),
                    etcd.into(),
                ],
                ..ControllerOpts::default()
            },
        )
    }

    async fn start() -> Result<Self> {
        let etcd = scabbard_tests::etcd::EtcdServer::start()?;
        let dir = tempfile::tempdir()?;
        let http_port = free_port();
        let port = free_port();
        let ctl = Self::start_controller(dir.path(), "c1", &etcd.endpoints(), port, http_port)?;
        let worker = Worker::start(&ctl.addr.to_string(), &dir.path().join("w1"), "w1", 4)?;
        let c = Self {
            etcd,
            dir,
            ctl,
            _worker: worker,
            http_port,
        };
        eventually(
            "the HTTP API to answer",
            Duration::from_secs(20),
            || async {
                http("GET", &c.url("/api/v1/openapi.json"), None, None)
                    .ok()
                    .filter(|r| r.status == 200)
            },
        )
        .await?;
        Ok(c)
    }

    /// Stops the controller and starts it again on the same ports and data.
    async fn restart_controller(&mut self) -> Result<()> {
        let port = self.ctl.addr.port();
        self.ctl.proc.terminate(Duration::from_secs(15));
        self.ctl = Self::start_controller(
            self.dir.path(),
            "c1",
            &self.etcd.endpoints(),
            port,
            self.http_port,
        )?;
        eventually(
            "the HTTP API to answer again",
            Duration::from_secs(30),
            || async {
                http("GET", &self.url("/api/v1/tasks"), Some(ADMIN_TOKEN), None)
                    .ok()
                    .filter(|r| r.status == 200)
            },
        )
        .await?;
        Ok(())
    }

    fn submit(&self, token: &str, script: &str) -> Result<String> {
        let body = json!({"spec": {"name": "http", "shell": {"command": ["sh", "-c", script]}}})
            .to_string();
        let r = http("POST", &self.url("/api/v1/tasks"), Some(token), Some(&body))?;
        if r.status != 200 {
            bail!("submit: {} {}", r.status, r.body);
        }
        Ok(r.body["task"]["id"]
            .as_str()
            .context("task id")?
            .to_string())
    }

    async fn wait_state(&self, id: &str, state: &str) -> Result<Value> {
        eventually(
            &format!("task {id} {state}"),
            Duration::from_secs(60),
            || async {
                http(
                    "GET",
                    &self.url(&format!("/api/v1/tasks/{id}")),
                    Some(ADMIN_TOKEN),
                    None,
                )
                .ok()
                .filter(|r| r.body["state"] == state)
                .map(|r| r.body)
            },
        )
        .await
    }
}

async fn token(addr: &str, project: &str, scope: Scope) -> Result<String> {
    let mut adm = AdminServiceClient::new(admin_channel(addr).await?);
    let r = adm
        .create_token(CreateTokenRequest {
            kind: TokenKind::Api as i32,
            name: format!("{project}-{}", scope.as_str_name()),
            scopes: vec![scope as i32],
            project: project.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.secret)
}

/// The (method, path) pairs the OpenAPI document lists.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for m in ["get", "post", "put", "patch", "delete"] {
            if item.get(m).is_some() {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// Every route the API must have (the issue's list).
const EXPECTED: &[(&str, &str)] = &[
    ("POST", "/api/v1/tasks"),
    ("GET", "/api/v1/tasks"),
    ("GET", "/api/v1/tasks/{id}"),
    ("POST", "/api/v1/tasks/{id}/cancel"),
    ("GET", "/api/v1/tasks/{id}/logs"),
    ("POST", "/api/v1/workflows"),
    ("GET", "/api/v1/workflows"),
    ("GET", "/api/v1/workflows/{id}"),
    ("POST", "/api/v1/workflows/{id}/cancel"),
    ("GET", "/api/v1/templates"),
    ("GET", "/api/v1/templates/{name}"),
    ("POST", "/api/v1/templates/{name}/render"),
    ("POST", "/api/v1/templates/{name}/run"),
    ("GET", "/api/v1/schedules"),
    ("POST", "/api/v1/schedules"),
    ("GET", "/api/v1/projects"),
    ("GET", "/api/v1/agents"),
    ("GET", "/api/v1/breakers"),
    ("GET", "/api/v1/tokens"),
    ("POST", "/api/v1/tokens"),
    ("GET", "/api/v1/cluster"),
    ("GET", "/api/v1/events"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_end_to_end() -> Result<()> {
    let mut c = Cluster::start().await?;
    let addr = c.ctl.addr.to_string();

    // --- OpenAPI: validates and lists every route.
    let doc = http("GET", &c.url("/api/v1/openapi.json"), None, None)?;
    assert_eq!(doc.status, 200);
    let doc_path = c.dir.path().join("openapi.json");
    std::fs::write(&doc_path, doc.body.to_string())?;
    let out = Command::new(venv_python())
        .args([
            "-c",
            "import json,sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1]))); print('valid')",
        ])
        .arg(&doc_path)
        .output()?;
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let routes = documented(&doc.body);
    for (m, p) in EXPECTED {
        assert!(
            routes.contains(&(m.to_string(), p.to_string())),
            "{m} {p} missing from the OpenAPI document: {routes:?}"
        );
    }

    // --- Unknown routes and bad JSON.
    let r = http("GET", &c.url("/api/v1/nope"), Some(ADMIN_TOKEN), None)?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{}",
        r.body
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = http(
        "PUT",
        &c.url("/api/v1/tasks"),
        Some(ADMIN_TOKEN),
        Some("{}"),
    )?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (405, Some("UNIMPLEMENTED")),
        "{}",
        r.body
    );
    let r = http("GET", &c.url("/"), None, None)?;
    assert_eq!(r.status, 404);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap_or("")
            .contains("openapi.json"),
        "{}",
        r.body
    );
    let r = http(
        "POST",
        &c.url("/api/v1/tasks"),
        Some(ADMIN_TOKEN),
        Some("{not json"),
    )?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{}",
        r.body
    );
    let r = http(
        "POST",
        &c.url("/api/v1/tasks"),
        Some(ADMIN_TOKEN),
        Some(r#"{"spec": {"shell": {"command": ["true"]}, "timeoutMs": "soon"}}"#),
    )?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap_or("")
            .contains("timeoutMs"),
        "{}",
        r.body
    );
    let r = http(
        "GET",
        &c.url("/api/v1/tasks?pageSize=lots"),
        Some(ADMIN_TOKEN),
        None,
    )?;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap_or("")
            .contains("pageSize"),
        "{}",
        r.body
    );

    // --- Live events: a client connected before the first task.
    let sse = SseClient::open(&c.url("/api/v1/events"), ADMIN_TOKEN, None)?;

    // --- Submit, get, list, logs.
    let t1 = c.submit(ADMIN_TOKEN, "echo hello over http; echo second line")?;
    let done = c.wait_state(&t1, "TASK_STATE_SUCCEEDED").await?;
    assert_eq!(done["id"], t1.as_str());
    let r = http(
        "GET",
        &c.url("/api/v1/tasks?states=TASK_STATE_SUCCEEDED&pageSize=10"),
        Some(ADMIN_TOKEN),
        None,
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    let listed: Vec<&str> = r.body["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert!(listed.contains(&t1.as_str()), "{listed:?}");
    let r = http(
        "GET",
        &c.url("/api/v1/tasks?states=TASK_STATE_RUNNING"),
        Some(ADMIN_TOKEN),
        None,
    )?;
    assert!(
        !r.body.to_string().contains(&t1),
        "state filter: {}",
        r.body
    );
    let r = http(
        "GET",
        &c.url(&format!("/api/v1/tasks/{t1}/logs")),
        Some(ADMIN_TOKEN),
        None,
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    let text: Vec<u8> = r.body["chunks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|ch| b64(ch["data"].as_str().unwrap_or("")))
        .collect();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("hello over http\nsecond line"), "{text:?}");
    // Following a finished task's log: the chunks as events, then the stream ends.
    let follow = SseClient::open(
        &c.url(&format!("/api/v1/tasks/{t1}/logs?follow=true")),
        ADMIN_TOKEN,
        None,
    )?;
    follow.until("log events", Duration::from_secs(20), |evs| {
        evs.iter().any(|e| {
            e.event == "log"
                && String::from_utf8_lossy(&b64(e.data["data"].as_str().unwrap_or("")))
                    .contains("hello")
        })
    })?;

    let first = sse.until("t1's events", Duration::from_secs(30), |evs| {
        saw_state(evs, &t1, "TASK_STATE_SUCCEEDED")
    })?;
    let first_state = first
        .iter()
        .find(|e| task_state(e).0 == t1)
        .map(|e| task_state(e).1.to_string())
        .context("t1 event")?;
    assert!(first.iter().all(|e| e.event == "task"), "{first:#?}");
    let last_id = first.last().context("events")?.id.clone();
    drop(sse);

    // --- Cancel.
    let t_long = c.submit(ADMIN_TOKEN, "sleep 60")?;
    c.wait_state(&t_long, "TASK_STATE_RUNNING").await?;
    let r = http(
        "POST",
        &c.url(&format!("/api/v1/tasks/{t_long}/cancel")),
        Some(ADMIN_TOKEN),
        Some(r#"{"reason": "from http"}"#),
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    c.wait_state(&t_long, "TASK_STATE_CANCELLED").await?;

    // --- Auth: every route × {no token, read scope, another project}.
    let read = token(&addr, "default", Scope::Read).await?;
    let mut projects = ProjectServiceClient::new(admin_channel(&addr).await?);
    projects
        .create(CreateProjectRequest {
            project: Some(Project {
                name: "other".into(),
                ..Default::default()
            }),
        })
        .await?;
    let other = token(&addr, "other", Scope::Submit).await?;
    for (method, path) in &routes {
        if path == "/api/v1/openapi.json" {
            continue;
        }
        let url = c.url(
            &path
                .replace("{id}", "x")
                .replace("{name}", "x")
                .replace("{key}", "x"),
        );
        let body = (method != "GET").then_some("{}");
        let r = http(method, &url, None, body)?;
        if path == "/api/v1/cluster" {
            // ClusterStatus needs no token (clients find the leader with it).
            assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
        } else {
            assert_eq!(
                (r.status, r.body["code"].as_str()),
                (401, Some("UNAUTHENTICATED")),
                "{method} {path} without a token: {}",
                r.body
            );
        }
        // Writes refuse a read-scoped token (Render is a read: a dry run).
        if method != "GET" && !path.ends_with("/render") {
            let r = http(method, &url, Some(&read), body)?;
            assert_eq!(
                (r.status, r.body["code"].as_str()),
                (403, Some("PERMISSION_DENIED")),
                "{method} {path} with a read token: {}",
                r.body
            );
        }
    }
    // Another project's token gets what gRPC gives it, as the matching HTTP status.
    let grpc_code = TaskServiceClient::new(with_token(
        scabbard_common::client::connect(&addr).await?,
        &other,
    ))
    .get(GetTaskRequest { id: t1.clone() })
    .await
    .expect_err("another project's task")
    .code();
    let want = match grpc_code {
        tonic::Code::NotFound => (404, "NOT_FOUND"),
        tonic::Code::PermissionDenied => (403, "PERMISSION_DENIED"),
        c => panic!("unexpected gRPC code {c:?}"),
    };
    for (method, path) in [
        ("GET", format!("/api/v1/tasks/{t1}")),
        ("POST", format!("/api/v1/tasks/{t1}/cancel")),
        ("GET", format!("/api/v1/tasks/{t1}/logs")),
        ("GET", format!("/api/v1/tasks/{t1}/logs?follow=true")),
    ] {
        let r = http(
            method,
            &c.url(&path),
            Some(&other),
            (method == "POST").then_some("{}"),
        )?;
        assert_eq!(
            (r.status, r.body["code"].as_str().unwrap_or("")),
            want,
            "{method} {path} with another project's token: {}",
            r.body
        );
    }
    let r = http(
        "GET",
        &c.url("/api/v1/tasks?project=default"),
        Some(&other),
        None,
    )?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (403, Some("PERMISSION_DENIED")),
        "{}",
        r.body
    );
    // Its own project works.
    let mine = c.submit(&other, "true")?;
    let r = http(
        "GET",
        &c.url(&format!("/api/v1/tasks/{mine}")),
        Some(&other),
        None,
    )?;
    assert_eq!(
        (r.status, r.body["project"].as_str()),
        (200, Some("other")),
        "{}",
        r.body
    );

    // --- SSE resume across a controller restart: tasks finished while the client was
    // away, then the controller restarted; Last-Event-ID replays every change after it.
    let t2 = c.submit(ADMIN_TOKEN, "echo two")?;
    let t3 = c.submit(ADMIN_TOKEN, "echo three")?;
    c.wait_state(&t2, "TASK_STATE_SUCCEEDED").await?;
    c.wait_state(&t3, "TASK_STATE_SUCCEEDED").await?;
    c.restart_controller().await?;
    let resumed = SseClient::open(&c.url("/api/v1/events"), ADMIN_TOKEN, Some(&last_id))?;
    let evs = resumed.until(
        "the replay after a restart",
        Duration::from_secs(30),
        |evs| {
            saw_state(evs, &t2, "TASK_STATE_SUCCEEDED")
                && saw_state(evs, &t3, "TASK_STATE_SUCCEEDED")
        },
    )?;
    // Nothing before the resume point comes again; revisions only grow.
    let mut prev = rev(&last_id);
    for e in &evs {
        assert!(rev(&e.id) >= prev, "out of order after {prev}: {evs:#?}");
        assert!(e.id != last_id, "the resume point came again: {evs:#?}");
        prev = rev(&e.id);
    }
    assert!(
        !saw_state(&evs, &t1, &first_state),
        "t1's first state replayed: {evs:#?}"
    );
    // No gap: each task's history starts with the state a live client saw first.
    for t in [&t2, &t3, &t_long] {
        let states: Vec<&str> = evs
            .iter()
            .filter(|e| task_state(e).0 == t.as_str())
            .map(|e| task_state(e).1)
            .collect();
        assert_eq!(
            states.first().copied(),
            Some(first_state.as_str()),
            "{t}: {states:?}"
        );
    }
    assert!(saw_state(&evs, &t_long, "TASK_STATE_CANCELLED"), "{evs:#?}");
    // A malformed Last-Event-ID is a JSON 400.
    let r = http_with_header(&c.url("/api/v1/events"), "Last-Event-ID: yesterday")?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{}",
        r.body
    );
    Ok(())
}

fn http_with_header(url: &str, header: &str) -> Result<Resp> {
    let out = Command::new(curl_bin())
        .args(["-sS", "-i", "--max-time", "10", "-H", header])
        .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .arg(url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Resp {
        status,
        headers: Vec::new(),
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    })
}

/// A TLS controller on etcd with the HTTP API (HTTPS, the same certificate) on
/// `http_port`; it forwards to the leader when `peer_ca`, else redirects.
fn tls_controller(
    dir: &std::path::Path,
    pki: &scabbard_common::tls::DevPki,
    etcd: &str,
    peer_ca: bool,
    http_port: u16,
) -> Result<Controller> {
    let mut extra = vec![
        "--tls-cert".to_string(),
        pki.server_cert.display().to_string(),
        "--tls-key".into(),
        pki.server_key.display().to_string(),
        "--store".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.into(),
        "--http-listen".into(),
        format!("127.0.0.1:{http_port}"),
    ];
    if peer_ca {
        extra.extend(["--tls-peer-ca".into(), pki.ca_cert.display().to_string()]);
    }
    Controller::start(
        dir,
        free_port(),
        &ControllerOpts {
            extra,
            ..ControllerOpts::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_followers_forward_or_redirect_to_the_leader() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = scabbard_common::tls::generate_dev_pki(&dir.path().join("tls"), "w", &[])?;
    let etcd = scabbard_tests::etcd::EtcdServer::start()?;
    *CA_CERT.lock().expect("lock") = Some(pki.ca_cert.clone());
    let ports = [free_port(), free_port(), free_port()];
    let _a = tls_controller(
        &dir.path().join("a"),
        &pki,
        &etcd.endpoints(),
        true,
        ports[0],
    )?;
    let _b = tls_controller(
        &dir.path().join("b"),
        &pki,
        &etcd.endpoints(),
        true,
        ports[1],
    )?;
    // The HTTP API speaks TLS with the controller's certificate.
    let url = |port: u16, path: &str| format!("https://127.0.0.1:{port}{path}");
    // ClusterStatus says whether the controller answering leads.
    let leads = |port: u16| {
        http("GET", &url(port, "/api/v1/cluster"), None, None)
            .ok()
            .is_some_and(|r| r.status == 200 && r.body["answeredByLeader"] == true)
    };
    let (leader, follower) = eventually("a leader", Duration::from_secs(30), || async {
        if leads(ports[0]) {
            Some((ports[0], ports[1]))
        } else if leads(ports[1]) {
            Some((ports[1], ports[0]))
        } else {
            None
        }
    })
    .await?;
    // A follower with the peer CA forwards: the submit and the get work through it.
    let body = json!({"spec": {"noop": {}}}).to_string();
    let id = eventually(
        "a submit through the follower",
        Duration::from_secs(20),
        || async {
            http(
                "POST",
                &url(follower, "/api/v1/tasks"),
                Some(ADMIN_TOKEN),
                Some(&body),
            )
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| r.body["task"]["id"].as_str().map(str::to_string))
        },
    )
    .await?;
    let r = http(
        "GET",
        &url(follower, &format!("/api/v1/tasks/{id}")),
        Some(ADMIN_TOKEN),
        None,
    )?;
    assert_eq!(
        (r.status, r.body["id"].as_str()),
        (200, Some(id.as_str())),
        "{}",
        r.body
    );
    // Auth is the leader's: no token through the follower is still 401.
    let r = http(
        "GET",
        &url(follower, &format!("/api/v1/tasks/{id}")),
        None,
        None,
    )?;
    assert_eq!(r.status, 401, "{}", r.body);

    // One without the peer CA cannot forward: 307 to the leader's HTTP API.
    let c = tls_controller(
        &dir.path().join("c"),
        &pki,
        &etcd.endpoints(),
        false,
        ports[2],
    )?;
    let path = "/api/v1/tasks?pageSize=5&states=TASK_STATE_QUEUED".to_string();
    let r = eventually(
        "a redirect from the follower without a peer CA",
        Duration::from_secs(20),
        || async {
            http("GET", &url(ports[2], &path), Some(ADMIN_TOKEN), None)
                .ok()
                .filter(|r| r.status == 307)
        },
    )
    .await
    .map_err(|e| {
        let last = http("GET", &url(ports[2], &path), Some(ADMIN_TOKEN), None);
        e.context(format!(
            "last answer: {:?}",
            last.map(|r| (r.status, r.body))
        ))
    })?;
    assert_eq!(
        r.header("location"),
        Some(url(leader, &path).as_str()),
        "{}",
        r.body
    );
    assert_eq!(r.body["code"].as_str(), Some("UNAVAILABLE"), "{}", r.body);
    drop(c);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_calls_get_429_with_retry_after() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let http_port = free_port();
    let ctl = Controller::start(
        &dir.path().join("c"),
        0,
        &ControllerOpts {
            extra: vec![
                "--http-listen".into(),
                format!("127.0.0.1:{http_port}"),
                "--rate-limit".into(),
                "1".into(),
                "--rate-burst".into(),
                "2".into(),
            ],
            ..ControllerOpts::default()
        },
    )?;
    let read = eventually("a read token", Duration::from_secs(20), || async {
        token(&ctl.addr.to_string(), "default", Scope::Read)
            .await
            .ok()
    })
    .await?;
    let url = format!("http://127.0.0.1:{http_port}/api/v1/tasks");
    let mut limited = None;
    for _ in 0..6 {
        let r = http("GET", &url, Some(&read), None)?;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = limited.context("no 429 after 6 calls at 1/s with a burst of 2")?;
    assert_eq!(
        r.body["code"].as_str(),
        Some("RESOURCE_EXHAUSTED"),
        "{}",
        r.body
    );
    let secs: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .context("Retry-After")?;
    assert!((1..=2).contains(&secs), "Retry-After {secs}");
    assert!(r.body["retryAfterMs"].as_str().is_some(), "{}", r.body);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_and_templates_over_http_with_live_events() -> Result<()> {
    let c = Cluster::start().await?;
    let sh = |s: &str| json!({"shell": {"command": ["sh", "-c", s]}});
    let body = json!({"spec": {
        "name": "http-wf",
        "failurePolicy": "FAILURE_POLICY_CONTINUE",
        "tasks": [
            {"name": "a", "spec": sh("echo a")},
            {"name": "b", "spec": sh("echo b"), "dependsOn": ["a"]},
            {"name": "c", "spec": sh("exit 3"), "dependsOn": ["a"]},
        ],
    }})
    .to_string();
    let r = http(
        "POST",
        &c.url("/api/v1/workflows"),
        Some(ADMIN_TOKEN),
        Some(&body),
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.body["workflow"]["id"]
        .as_str()
        .context("workflow id")?
        .to_string();
    let events = SseClient::open(
        &c.url(&format!("/api/v1/workflows/{id}/events")),
        ADMIN_TOKEN,
        None,
    )?;
    let evs = events.until("the workflow to fail", Duration::from_secs(60), |evs| {
        evs.iter()
            .any(|e| e.data["workflow"]["state"] == "WORKFLOW_STATE_FAILED")
    })?;
    assert!(
        evs.iter()
            .all(|e| e.event == "workflow" && e.id.parse::<i64>().is_ok()),
        "{evs:#?}"
    );
    let last = &evs.last().context("events")?.data["workflow"];
    let node = |name: &str| {
        last["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(node("b")["state"], "NODE_STATE_SUCCEEDED", "{last}");
    assert_eq!(
        (node("c")["state"].as_str(), node("c")["exitCode"].as_i64()),
        (Some("NODE_STATE_FAILED"), Some(3)),
        "{last}"
    );
    let r = http(
        "GET",
        &c.url(&format!("/api/v1/workflows/{id}")),
        Some(ADMIN_TOKEN),
        None,
    )?;
    assert_eq!(
        (r.status, r.body["state"].as_str()),
        (200, Some("WORKFLOW_STATE_FAILED")),
        "{}",
        r.body
    );
    let r = http(
        "GET",
        &c.url("/api/v1/workflows?states=WORKFLOW_STATE_FAILED"),
        Some(ADMIN_TOKEN),
        None,
    )?;
    assert!(r.body.to_string().contains(&id), "{}", r.body);
    // Another project's token gets what gRPC gives it for this workflow, as HTTP.
    let addr = c.ctl.addr.to_string();
    ProjectServiceClient::new(admin_channel(&addr).await?)
        .create(CreateProjectRequest {
            project: Some(Project {
                name: "other".into(),
                ..Default::default()
            }),
        })
        .await?;
    let other = token(&addr, "other", Scope::Submit).await?;
    let code = scabbard_common::proto::workflow_service_client::WorkflowServiceClient::new(
        with_token(scabbard_common::client::connect(&addr).await?, &other),
    )
    .get(scabbard_common::proto::GetWorkflowRequest { id: id.clone() })
    .await
    .expect_err("another project's workflow")
    .code();
    let want = match code {
        tonic::Code::NotFound => (404, "NOT_FOUND"),
        tonic::Code::PermissionDenied => (403, "PERMISSION_DENIED"),
        c => panic!("unexpected gRPC code {c:?}"),
    };
    for (method, path) in [
        ("GET", format!("/api/v1/workflows/{id}")),
        ("POST", format!("/api/v1/workflows/{id}/cancel")),
        ("GET", format!("/api/v1/workflows/{id}/events")),
    ] {
        let r = http(
            method,
            &c.url(&path),
            Some(&other),
            (method == "POST").then_some("{}"),
        )?;
        assert_eq!(
            (r.status, r.body["code"].as_str().unwrap_or("")),
            want,
            "{method} {path} with another project's token: {}",
            r.body
        );
    }
    // Templates: list, show; an unknown one is a JSON 404.
    let r = http("GET", &c.url("/api/v1/templates"), Some(ADMIN_TOKEN), None)?;
    assert_eq!(r.status, 200, "{}", r.body);
    let name = r.body["templates"][0]["name"]
        .as_str()
        .context("a built-in template")?
        .to_string();
    let r = http(
        "GET",
        &c.url(&format!("/api/v1/templates/{name}")),
        Some(ADMIN_TOKEN),
        None,
    )?;
    assert_eq!(
        (r.status, r.body["name"].as_str()),
        (200, Some(name.as_str())),
        "{}",
        r.body
    );
    let r = http(
        "POST",
        &c.url("/api/v1/templates/no-such-template/render"),
        Some(ADMIN_TOKEN),
        Some("{}"),
    )?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{}",
        r.body
    );
    // A running task's log follows live: the first line arrives while it still runs.
    let t = c.submit(ADMIN_TOKEN, "echo first-line; sleep 4; echo last-line")?;
    c.wait_state(&t, "TASK_STATE_RUNNING").await?;
    let logs = SseClient::open(
        &c.url(&format!("/api/v1/tasks/{t}/logs?follow=true")),
        ADMIN_TOKEN,
        None,
    )?;
    let text = |evs: &[Sse]| {
        evs.iter()
            .map(|e| {
                String::from_utf8_lossy(&b64(e.data["data"].as_str().unwrap_or(""))).to_string()
            })
            .collect::<String>()
    };
    logs.until("the first line", Duration::from_secs(20), |evs| {
        text(evs).contains("first-line")
    })?;
    let r = http(
        "GET",
        &c.url(&format!("/api/v1/tasks/{t}")),
        Some(ADMIN_TOKEN),
        None,
    )?;
    assert_eq!(
        r.body["state"], "TASK_STATE_RUNNING",
        "the line came live: {}",
        r.body
    );
    logs.until("the last line", Duration::from_secs(20), |evs| {
        text(evs).contains("last-line")
    })?;
    // Cluster status, agents and whoami answer JSON.
    let r = http("GET", &c.url("/api/v1/cluster"), Some(ADMIN_TOKEN), None)?;
    assert_eq!(
        (r.status, r.body["answeredByLeader"].as_bool()),
        (200, Some(true)),
        "{}",
        r.body
    );
    let r = http("GET", &c.url("/api/v1/agents"), Some(ADMIN_TOKEN), None)?;
    assert_eq!(
        r.body["agents"].as_array().map(Vec::len),
        Some(1),
        "{}",
        r.body
    );
    Ok(())
}
