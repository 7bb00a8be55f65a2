//! The HTTP/JSON API (`--http-listen`) against a real controller and worker process:
//! submit/get/list/cancel/logs over HTTP; every route without a token, with a read-scoped
//! token and with another project's token gets the status gRPC's code maps to and a JSON
//! error; server-sent events arrive and resume after a controller restart with
//! `Last-Event-ID` with no gap; the OpenAPI document validates (openapi-spec-validator)
//! and lists every route; rate-limited calls get 429 with Retry-After; over TLS (HTTPS with
//! the controller's certificate) a follower forwards to the leader, or answers 307 to the
//! leader's HTTP API when it cannot. HTTP is spoken with `curl` (scripts/setup.sh
//! installs it).

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use scabbard_common::client::{ProjectServiceClient, TaskServiceClient};
use scabbard_common::proto::{CreateProjectRequest, GetTaskRequest, Project, Scope};
use scabbard_tests::*;
use serde_json::{Value, json};

mod gaps;
mod support;
use support::*;

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
    // `/` is the web dashboard (docs/ui.md); other unknown paths are JSON 404s.
    let r = http("GET", &c.url("/"), None, None)?;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("text/html"))
            && r.header("content-security-policy")
                .is_some_and(|v| v.contains("script-src 'self'")),
        "{:?}",
        r.headers
    );
    let r = http("GET", &c.url("/nope"), None, None)?;
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
        // Writes refuse a read-scoped token (Render is a read: a dry run), and so do the
        // operator and admin reads.
        let beyond_read = ["/api/v1/config", "/api/v1/audit", "/api/v1/tokens"];
        if (method != "GET" && !path.ends_with("/render")) || beyond_read.contains(&path.as_str()) {
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
