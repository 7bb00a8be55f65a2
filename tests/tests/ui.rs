//! The web dashboard in a real headless Chromium: tests/ui/driver.py (Playwright for
//! Python, PyPI `playwright` in `<repo>/.venv`, driving Debian's `chromium`; both installed
//! by scripts/setup.sh) runs every flow in ONE browser against a real controller and a
//! real worker, and reports one JSON line per flow; each is asserted here. Screenshots go
//! to `SCABBARD_SCREENSHOTS_DIR` (default: a temporary directory).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use scabbard_common::proto::admin_service_client::AdminServiceClient;
use scabbard_common::proto::{CreateTokenRequest, Scope, TokenKind};
use scabbard_tests::wf::Cluster;
use scabbard_tests::*;

/// A one-task template whose task prints coloured, numbered lines slowly (the log must be
/// seen growing while the task runs).
const SHELL_TASK: &str = r#"
name: shell-task
version: 1
description: Print numbered, coloured lines slowly.
parameters:
  - {name: lines, type: int, default: 6, min: 1, max: 50, description: How many lines to print.}
  - {name: message, type: string, default: hello, pattern: '[a-z ]+'}
  - {name: colour, type: enum, values: [red, green, blue], default: green}
workflow:
  tasks:
    - name: run
      shell:
        command:
          - sh
          - -c
          - 'sleep 1; for i in $(seq ${{ params.lines }}); do printf "\033[32m%s\033[0m line %s (${{ params.colour }})\n" "${{ params.message }}" $i; sleep 0.5; done'
"#;

/// Every flow the driver must report, passed.
const FLOWS: &[&str] = &[
    "csp_and_login",
    "template_form_task_live",
    "workflow_graph_live",
    "cancel_from_task_page",
    "cancel_answer_after_the_task_ended",
    "script_payloads_are_text",
    "artifacts_listed_with_download_links",
    "tasks_list_filters_and_live_rows",
    "modules_behave",
    "pages_render_and_screenshots",
    "schedule_pause_resume",
    "admin_token_create_shows_secret_once",
    "read_token_sees_no_controls",
    "drain_and_undrain_controls",
    "only_the_controller_is_contacted",
    "no_script_errors_or_csp_violations",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `<repo>/.venv/bin/python` with Playwright, and the system Chromium; missing: fail
/// naming the setup script.
fn tools() -> (PathBuf, PathBuf) {
    let py = repo().join(".venv/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import playwright.sync_api"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "Playwright for Python (PyPI `playwright`) is missing from {}: run scripts/setup.sh",
        py.display()
    );
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "Chromium is missing ({}): run scripts/setup.sh (Debian package `chromium`)",
        chromium.display()
    );
    (py, chromium)
}

#[tokio::test(flavor = "multi_thread")]
async fn web_dashboard_in_a_real_browser() -> Result<()> {
    let (py, chromium) = tools();
    let tdir = tempfile::tempdir()?;
    std::fs::write(tdir.path().join("shell-task.yaml"), SHELL_TASK)?;
    let http_port = free_port();
    let c = Cluster::start(
        &["w0"],
        4,
        &[
            "--templates-dir",
            &tdir.path().display().to_string(),
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
        ],
    )?;
    let addr = c.addr();
    let read = AdminServiceClient::new(c.channel().await?)
        .create_token(CreateTokenRequest {
            kind: TokenKind::Api as i32,
            name: "ui-reader".into(),
            scopes: vec![Scope::Read as i32],
            project: String::new(),
            ttl_ms: 0,
            max_uses: 0,
        })
        .await?
        .into_inner()
        .secret;
    wait_agent(&addr, "the worker to connect", |_| true).await?;

    let shots_tmp = tempfile::tempdir()?;
    let shots = std::env::var("SCABBARD_SCREENSHOTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| shots_tmp.path().to_path_buf());
    let out = Command::new(py)
        .arg(repo().join("tests/ui/driver.py"))
        .env("SCABBARD_URL", format!("http://127.0.0.1:{http_port}"))
        .env("SCABBARD_TOKEN", ADMIN_TOKEN)
        .env("SCABBARD_READ_TOKEN", &read)
        .env("SCABBARD_WORKER_SLOTS", "4")
        .env("SCABBARD_SCREENSHOTS_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .output()
        .context("run tests/ui/driver.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("--- driver stdout:\n{stdout}\n--- driver stderr:\n{stderr}");
    let mut got: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for line in stdout.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            got.insert(
                v["flow"].as_str().unwrap_or("").to_string(),
                (
                    v["ok"].as_bool().unwrap_or(false),
                    v["detail"].as_str().unwrap_or("").to_string(),
                ),
            );
        }
    }
    let mut failed = Vec::new();
    for flow in FLOWS {
        match got.get(*flow) {
            Some((true, _)) => {}
            Some((false, why)) => failed.push(format!("{flow}: {why}")),
            None => failed.push(format!("{flow}: not reported")),
        }
    }
    if let Some((false, why)) = got.get("driver") {
        failed.push(format!("driver: {why}"));
    }
    assert!(
        failed.is_empty(),
        "browser flows failed:\n{}\n(driver exit {}; stderr:\n{stderr})",
        failed.join("\n"),
        out.status
    );
    for name in [
        "login",
        "overview",
        "tasks",
        "task",
        "workflows",
        "workflow",
        "agents",
        "templates",
        "template-form",
        "schedules",
        "config",
    ] {
        let p = shots.join(format!("{name}.png"));
        let len = std::fs::metadata(&p)
            .with_context(|| format!("screenshot {}", p.display()))?
            .len();
        assert!(len > 1000, "screenshot {} is {len} bytes", p.display());
    }
    Ok(())
}
