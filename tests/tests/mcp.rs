//! The MCP server driven by a real MCP client — the official Python SDK (PyPI `mcp`, in
//! `<repo>/.venv`, installed by scripts/setup.sh) running tests/mcp/driver.py — over stdio
//! (`scabbard mcp`) and streamable HTTP (`/mcp` on the controller's HTTP listener), against
//! real controller and worker processes: typed template tools and their schemas, dry-run
//! errors, run with wait and progress, logs resource, subscriptions, scopes and projects,
//! and `tools/list_changed` when a restart brings a new template.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use scabbard_common::proto::admin_service_client::AdminServiceClient;
use scabbard_common::proto::project_service_client::ProjectServiceClient;
use scabbard_common::proto::task_service_client::TaskServiceClient;
use scabbard_common::proto::template_service_client::TemplateServiceClient;
use scabbard_common::proto::{
    CreateProjectRequest, CreateTokenRequest, ListAuditRequest, Project, ProjectQuota,
    RunTemplateRequest, Scope, SubmitTaskRequest, TokenKind, WhoAmIRequest,
};
use scabbard_tests::wf::Cluster;
use scabbard_tests::*;

const GREET: &str = r#"
name: greet
version: 1
description: Say hello, then shout it.
parameters:
  - {name: who, type: string, required: true, pattern: '[a-z]+', description: Who to greet.}
  - {name: times, type: int, default: 2, min: 1, max: 5}
workflow:
  tasks:
    - name: hello
      shell: {command: [sh, -c, "echo greeting=hello-${{ params.who }} >> $SCABBARD_OUTPUT"]}
    - name: shout
      depends_on: [hello]
      shell: {command: [sh, -c, "for i in $(seq ${{ params.times }}); do echo ${{ tasks.hello.outputs.greeting }}; done"]}
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `<repo>/.venv/bin/python` with the `mcp` package; missing: fail naming the script.
fn python() -> PathBuf {
    let py = repo().join(".venv/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import mcp.client.stdio, mcp.client.streamable_http"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the MCP client (PyPI `mcp`, the official Python SDK) is missing from {}: run scripts/setup.sh",
        py.display()
    );
    py
}

/// Runs a driver scenario to the end; its output is shown, and a failed check fails here.
fn driver(scenario: &str, controller: &str, token: &str, env: &[(&str, String)]) -> Result<String> {
    let out = Command::new(python())
        .arg(repo().join("tests/mcp/driver.py"))
        .arg(scenario)
        .env("SCABBARD_BIN", scabbard_bin())
        .env("SCABBARD_CONTROLLER", controller)
        .env("SCABBARD_TOKEN", token)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .context("run tests/mcp/driver.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("--- driver {scenario}:\n{stdout}");
    if !out.status.success() || !stdout.contains("PASS") {
        bail!(
            "driver {scenario} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

async fn token(c: &Cluster, project: &str, scope: Scope) -> Result<String> {
    let r = AdminServiceClient::new(c.channel().await?)
        .create_token(CreateTokenRequest {
            kind: TokenKind::Api as i32,
            name: format!("mcp-{project}-{}", scope.as_str_name()),
            scopes: vec![scope as i32],
            project: project.into(),
            ttl_ms: 0,
            max_uses: 0,
        })
        .await?
        .into_inner();
    Ok(r.secret)
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_tools_resources_and_scopes_over_stdio_and_http() -> Result<()> {
    python();
    let tdir = tempfile::tempdir()?;
    std::fs::write(tdir.path().join("greet.yaml"), GREET)?;
    // The controller serves MCP at /mcp on its HTTP listener.
    let http_port = free_port();
    let c = Cluster::start(
        &["w0"],
        2,
        &[
            "--templates-dir",
            &tdir.path().display().to_string(),
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
        ],
    )?;
    let addr = c.addr();
    let admin = c.channel().await?;
    wait_agent(&addr, "the worker to connect", |_| true).await?;

    // A rejected token stops `scabbard mcp` at once, saying so.
    let out = Command::new(scabbard_bin())
        .args([
            "mcp",
            "--controller",
            &addr,
            "--token",
            "scbd_api_not-a-real-token",
        ])
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refused the token") && out.stdout.is_empty(),
        "{err}"
    );

    // Typed tools, dry run, run with wait and progress, logs, subscriptions (admin token).
    driver("main", &addr, ADMIN_TOKEN, &[])?;

    // A read token: no run/submit/cancel tools, and a direct call is refused.
    let read = token(&c, "default", Scope::Read).await?;
    driver("readonly", &addr, &read, &[])?;

    // A token of project A cannot reach project B's task.
    let mut projects = ProjectServiceClient::new(admin.clone());
    for p in ["proj-a", "proj-b"] {
        projects
            .create(CreateProjectRequest {
                project: Some(Project {
                    name: p.into(),
                    ..Default::default()
                }),
            })
            .await?;
    }
    let b_task = TaskServiceClient::new(admin.clone())
        .submit(SubmitTaskRequest {
            spec: Some(shell("echo secret-of-b")),
            project: "proj-b".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .task
        .context("task")?
        .id;
    let b_workflow = TemplateServiceClient::new(admin.clone())
        .run(RunTemplateRequest {
            name: "greet".into(),
            params: [("who".to_string(), "bea".to_string())].into(),
            project: "proj-b".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workflow
        .context("workflow")?
        .id;
    let a_token = token(&c, "proj-a", Scope::Submit).await?;
    driver(
        "project",
        &addr,
        &a_token,
        &[
            ("MCP_OTHER_TASK", b_task),
            ("MCP_OTHER_WORKFLOW", b_workflow),
        ],
    )?;

    // The project's rate limit applies to MCP calls like to any other.
    projects
        .create(CreateProjectRequest {
            project: Some(Project {
                name: "proj-slow".into(),
                quota: Some(ProjectQuota {
                    requests_per_second: 1,
                    burst: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await?;
    let slow = token(&c, "proj-slow", Scope::Submit).await?;
    driver("ratelimit", &addr, &slow, &[])?;
    // Over /mcp too: an exhausted bucket is a tool error (isError), not a protocol error.
    let url = format!("http://127.0.0.1:{http_port}/mcp");
    let slow = token(&c, "proj-slow", Scope::Submit).await?;
    driver(
        "ratelimit_http",
        &addr,
        &slow,
        &[("MCP_HTTP_URL", url.clone())],
    )?;

    // Streamable HTTP, the bearer token of each request.
    driver("http", &addr, ADMIN_TOKEN, &[("MCP_HTTP_URL", url)])?;

    // Every MCP action is audited with the token as actor (task.submit and template.run
    // by the admin token above, over stdio and HTTP; cancels by the same code path).
    let mut admin_client = AdminServiceClient::new(admin.clone());
    let me = admin_client
        .who_am_i(WhoAmIRequest {})
        .await?
        .into_inner()
        .token
        .context("token")?
        .id;
    for action in ["task.submit", "template.run"] {
        let entries = admin_client
            .list_audit(ListAuditRequest {
                action: action.into(),
                limit: 100,
                ..Default::default()
            })
            .await?
            .into_inner()
            .entries;
        assert!(
            entries
                .iter()
                .any(|e| e.actor == me && e.project == "default"),
            "{action} by {me}: {entries:#?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn scabbard_mcp_over_tls() -> Result<()> {
    python();
    let dir = tempfile::tempdir()?;
    let pki = scabbard_common::tls::generate_dev_pki(&dir.path().join("tls"), "mcp-worker", &[])?;
    let ctl = Controller::start(
        &dir.path().join("controller"),
        free_port(),
        &ControllerOpts {
            extra: vec![
                "--tls-cert".into(),
                pki.server_cert.display().to_string(),
                "--tls-key".into(),
                pki.server_key.display().to_string(),
            ],
            ..ControllerOpts::default()
        },
    )?;
    let addr = ctl.addr.to_string();
    let ca = format!("--ca-cert\n{}", pki.ca_cert.display());
    driver("tls", &addr, ADMIN_TOKEN, &[("MCP_EXTRA_ARGS", ca)])?;
    // Without the CA, `scabbard mcp` stops at once saying what to pass.
    let out = Command::new(scabbard_bin())
        .args(["mcp", "--controller", &addr, "--token", ADMIN_TOKEN])
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--ca-cert") && out.stdout.is_empty(),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_template_after_a_restart_changes_the_tool_list() -> Result<()> {
    let py = python();
    let dir = tempfile::tempdir()?;
    let tdir = dir.path().join("templates");
    std::fs::create_dir_all(&tdir)?;
    let data = dir.path().join("controller");
    let port = free_port();
    let opts = ControllerOpts {
        extra: vec!["--templates-dir".into(), tdir.display().to_string()],
        ..ControllerOpts::default()
    };
    let mut ctl = Controller::start(&data, port, &opts)?;
    let addr = ctl.addr.to_string();
    let mut child = Command::new(py)
        .arg(repo().join("tests/mcp/driver.py"))
        .arg("list_changed")
        .env("SCABBARD_BIN", scabbard_bin())
        .env("SCABBARD_CONTROLLER", &addr)
        .env("SCABBARD_TOKEN", ADMIN_TOKEN)
        .env("MCP_NEW_TOOL", "run_greet")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut seen = String::new();
    // READY: the session is up and has listed the tools without the new template.
    loop {
        let Some(line) = lines.next() else {
            let _ = child.kill();
            bail!("driver ended before READY:\n{seen}");
        };
        let line = line?;
        seen.push_str(&line);
        seen.push('\n');
        if line == "READY" {
            break;
        }
    }
    std::fs::write(tdir.join("greet.yaml"), GREET)?;
    ctl.proc.terminate(Duration::from_secs(20));
    let _ctl = Controller::start(&data, port, &opts)?;
    let rest = tokio::task::spawn_blocking(move || {
        let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
        let status = child.wait();
        (rest.join("\n"), status)
    });
    let (rest, status) = tokio::time::timeout(Duration::from_secs(180), rest).await??;
    println!("--- driver list_changed:\n{seen}{rest}");
    assert!(
        status?.success() && rest.contains("PASS"),
        "driver list_changed failed:\n{seen}{rest}"
    );
    Ok(())
}
