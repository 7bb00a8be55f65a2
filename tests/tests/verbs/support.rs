//! Helpers of the verbs tests: a controller (with the test templates, optionally the HTTP
//! API) and a worker, the CLI against it, curl calls and tokens.

use std::path::PathBuf;
use std::process::Output;

use anyhow::{Context, Result, ensure};
use scabbard_tests::*;
use serde_json::Value;

/// Two nodes that print and succeed; `test` waits for `build`.
pub(crate) const OK: &str = r#"
name: ok
version: 1
description: Two nodes that print and succeed.
parameters:
  - {name: what, type: string, default: hello}
  - {name: pause, type: string, default: "0"}
workflow:
  tasks:
    - name: build
      shell: {command: [sh, -c, "echo build says ${{ params.what }}; sleep ${{ params.pause }}; echo build done"]}
    - name: test
      depends_on: [build]
      shell: {command: [sh, -c, "echo test says ${{ params.what }}; echo test done"]}
"#;

/// A node that fails.
pub(crate) const BAD: &str = r#"
name: bad
version: 1
description: Fails.
workflow:
  tasks:
    - name: boom
      shell: {command: [sh, -c, "echo about to fail; exit 3"]}
"#;

pub(crate) struct Env {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) ctl: Controller,
    _worker: Worker,
    /// The HTTP API's port (0: no HTTP listener).
    pub(crate) http_port: u16,
}

impl Env {
    pub(crate) fn start() -> Result<Self> {
        Self::start_with(false)
    }

    pub(crate) fn start_with(http_api: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let templates = dir.path().join("templates");
        std::fs::create_dir_all(&templates)?;
        std::fs::write(templates.join("ok.yaml"), OK)?;
        std::fs::write(templates.join("bad.yaml"), BAD)?;
        let mut extra = vec!["--templates-dir".into(), templates.display().to_string()];
        let http_port = if http_api { free_port() } else { 0 };
        if http_api {
            extra.extend(["--http-listen".into(), format!("127.0.0.1:{http_port}")]);
        }
        let ctl = Controller::start(
            &dir.path().join("controller"),
            0,
            &ControllerOpts {
                extra,
                ..ControllerOpts::default()
            },
        )?;
        let worker = Worker::start(&ctl.addr.to_string(), &dir.path().join("w1"), "w1", 4)?;
        Ok(Self {
            dir,
            ctl,
            _worker: worker,
            http_port,
        })
    }

    pub(crate) fn config(&self) -> PathBuf {
        self.dir.path().join("cli-config")
    }

    pub(crate) fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = cli(&self.config());
        c.env("SCABBARD_CONTROLLER", self.ctl.addr.to_string())
            .args(args);
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Result<Output> {
        Ok(self.command(args).output()?)
    }

    /// stdout of a command that must succeed.
    pub(crate) fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        ensure!(
            out.status.success(),
            "scabbard {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout.clone())?)
    }

    /// `args -o json`, parsed.
    pub(crate) fn json(&self, args: &[&str]) -> Result<Value> {
        let mut with = args.to_vec();
        with.extend(["-o", "json"]);
        let text = self.ok(&with)?;
        serde_json::from_str(&text).with_context(|| format!("{args:?}: not JSON: {text}"))
    }
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The id in a `submitted <id>` line on stderr.
pub(crate) fn submitted(o: &Output) -> Result<String> {
    stderr(o)
        .lines()
        .find_map(|l| l.strip_prefix("submitted ").map(|s| s.trim().to_string()))
        .with_context(|| format!("no `submitted <id>` line in: {}", stderr(o)))
}

pub(crate) fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str().unwrap_or("")
}

/// One HTTP call with curl: (status, JSON body).
pub(crate) fn http(
    env: &Env,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> Result<(u16, Value)> {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("curl is missing: run scripts/setup.sh");
    }
    let url = format!("http://127.0.0.1:{}{path}", env.http_port);
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ])
        .arg(&url)
        .output()?;
    ensure!(
        out.status.success(),
        "curl {method} {url}: {}",
        stderr(&out)
    );
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("no status")?;
    Ok((
        code.trim().parse()?,
        serde_json::from_str(body).unwrap_or(Value::Null),
    ))
}

pub(crate) async fn api_token(
    env: &Env,
    project: &str,
    scope: scabbard_common::proto::Scope,
) -> Result<String> {
    use scabbard_common::client::AdminServiceClient;
    use scabbard_common::proto::{CreateTokenRequest, TokenKind};
    let mut adm = AdminServiceClient::new(admin_channel(&env.ctl.addr.to_string()).await?);
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
