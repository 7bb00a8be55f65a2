//! Helpers of the HTTP API tests: curl calls, an SSE client, a controller and worker
//! cluster with the HTTP listener, tokens, and the routes the OpenAPI document must list.
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::client::AdminServiceClient;
use scabbard_common::proto::{CreateTokenRequest, Scope, TokenKind};
use scabbard_tests::*;
use serde_json::{Value, json};

/// A response: status, headers (lower-cased names), JSON body (Null when empty or not JSON).
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Value,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub(crate) fn curl_bin() -> &'static str {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is missing: run scripts/setup.sh");
    }
    "curl"
}

/// The CA https:// calls trust (the TLS test's dev CA).
pub(crate) static CA_CERT: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// One HTTP call with curl.
pub(crate) fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<Resp> {
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
pub(crate) struct Sse {
    pub(crate) id: String,
    pub(crate) event: String,
    pub(crate) data: Value,
}

/// A curl reading an event stream; events arrive on `rx`.
pub(crate) struct SseClient {
    pub(crate) child: Child,
    pub(crate) rx: mpsc::Receiver<Sse>,
}

impl SseClient {
    pub(crate) fn open(url: &str, token: &str, last_event_id: Option<&str>) -> Result<Self> {
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
    pub(crate) fn until(
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

pub(crate) fn task_state(e: &Sse) -> (&str, &str) {
    let t = &e.data["task"];
    (
        t["id"].as_str().unwrap_or(""),
        t["state"].as_str().unwrap_or(""),
    )
}

pub(crate) fn saw_state(events: &[Sse], id: &str, state: &str) -> bool {
    events.iter().any(|e| task_state(e) == (id, state))
}

pub(crate) fn rev(id: &str) -> i64 {
    id.split(':')
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or(-1)
}

/// A tiny standard base64 decoder (log chunk data).
pub(crate) fn b64(s: &str) -> Vec<u8> {
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

pub(crate) fn venv_python() -> PathBuf {
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

pub(crate) struct Cluster {
    pub(crate) etcd: scabbard_tests::etcd::EtcdServer,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) ctl: Controller,
    pub(crate) _worker: Worker,
    pub(crate) http_port: u16,
}

impl Cluster {
    pub(crate) fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// A controller on etcd (its history outlives controller restarts: the embedded store
    /// keeps no watch history across a restart).
    pub(crate) fn start_controller(
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

    pub(crate) async fn start() -> Result<Self> {
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
    pub(crate) async fn restart_controller(&mut self) -> Result<()> {
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

    pub(crate) fn submit(&self, token: &str, script: &str) -> Result<String> {
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

    pub(crate) async fn wait_state(&self, id: &str, state: &str) -> Result<Value> {
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

pub(crate) async fn token(addr: &str, project: &str, scope: Scope) -> Result<String> {
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
pub(crate) fn documented(doc: &Value) -> BTreeSet<(String, String)> {
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

/// Every route the API must have (the list).
pub(crate) const EXPECTED: &[(&str, &str)] = &[
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
    ("GET", "/api/v1/config"),
    ("GET", "/api/v1/artifacts/{id}/content"),
];

pub(crate) fn http_with_header(url: &str, header: &str) -> Result<Resp> {
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
pub(crate) fn tls_controller(
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
