//! The API's later routes and behaviours: `GET /api/v1/config` (effective configuration,
//! secrets hidden, operator scope), artifact download (`/api/v1/artifacts/{id}/content`),
//! the `_` cache buster, field-level OpenAPI schemas, and workflow events in
//! `/api/v1/events` resuming across a controller restart with `Last-Event-ID`, no gap.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use scabbard_common::client::ProjectServiceClient;
use scabbard_common::proto::{CreateProjectRequest, Project, Scope};
use scabbard_tests::*;
use serde_json::{Value, json};

use super::support::*;

/// `(status, headers, body bytes)` of a GET, body written to a file (binary-safe).
fn download(
    url: &str,
    token: Option<&str>,
    dir: &std::path::Path,
) -> Result<(u16, String, Vec<u8>)> {
    let head = dir.join("head.txt");
    let body = dir.join("body.bin");
    let mut c = Command::new(curl_bin());
    c.args(["-sS", "--max-time", "30", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c.arg(url).output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&head)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("status")?;
    Ok((status, head.to_ascii_lowercase(), std::fs::read(&body)?))
}

fn wf_state<'a>(e: &'a Sse, id: &str) -> Option<&'a str> {
    (e.event == "workflow" && e.data["workflow"]["id"] == id)
        .then(|| e.data["workflow"]["state"].as_str().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_downloads_cache_buster_and_workflow_events_across_a_restart() -> Result<()> {
    let mut c = Cluster::start().await?;
    let addr = c.ctl.addr.to_string();
    let read = token(&addr, "default", Scope::Read).await?;
    let operator = token(&addr, "default", Scope::Operator).await?;

    // --- Effective configuration: operator scope, secrets hidden.
    let r = http("GET", &c.url("/api/v1/config"), Some(&operator), None)?;
    assert_eq!(r.status, 200, "{}", r.body);
    let entries = r.body["entries"].as_array().context("entries")?;
    let get = |k: &str| entries.iter().find(|e| e["key"] == k).cloned();
    assert_eq!(
        get("http_listen").and_then(|e| e["value"].as_str().map(String::from)),
        Some(format!("127.0.0.1:{}", c.http_port)),
        "{}",
        r.body
    );
    assert_eq!(
        get("store").map(|e| e["value"].clone()),
        Some(json!("etcd"))
    );
    assert!(get("artifacts.s3.secret_access_key").is_some_and(|e| e["secret"] == true));
    let text = r.body.to_string();
    assert!(
        !text.contains(ADMIN_TOKEN) && !text.contains(&operator),
        "{text}"
    );
    let parsed: Value = serde_json::from_str(r.body["json"].as_str().context("json")?)?;
    assert!(parsed["etcd"]["endpoints"].is_array(), "{parsed}");
    let r = http("GET", &c.url("/api/v1/config"), Some(&read), None)?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (403, Some("PERMISSION_DENIED")),
        "{}",
        r.body
    );

    // --- Cache buster accepted; other unknown parameters refused, named.
    let r = http(
        "GET",
        &c.url("/api/v1/tasks?_=1700000000000&pageSize=1"),
        Some(&read),
        None,
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http("GET", &c.url("/api/v1/tasks?nocache=1"), Some(&read), None)?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{}",
        r.body
    );
    assert!(
        r.body["message"].as_str().unwrap_or("").contains("nocache"),
        "{}",
        r.body
    );

    // --- OpenAPI: field-level schemas.
    let doc = http("GET", &c.url("/api/v1/openapi.json"), None, None)?.body;
    let task = &doc["components"]["schemas"]["Task"]["properties"];
    assert_eq!(task["state"]["type"], "string", "{task}");
    assert!(
        task["state"]["enum"]
            .to_string()
            .contains("TASK_STATE_SUCCEEDED"),
        "{task}"
    );
    assert!(
        doc["paths"]["/api/v1/artifacts/{id}/content"]["get"].is_object()
            && doc["paths"]["/api/v1/config"]["get"].is_object(),
        "{}",
        doc["paths"]
    );

    // --- Live events: task and workflow events on one stream.
    let sse = SseClient::open(&c.url("/api/v1/events"), ADMIN_TOKEN, None)?;
    let sh = |s: &str| json!({"shell": {"command": ["sh", "-c", s]}});
    let workflow = |name: &str| {
        json!({"spec": {"name": name, "tasks": [
            {"name": "a", "spec": sh("echo a")},
            {"name": "b", "spec": sh("echo b"), "dependsOn": ["a"]},
        ]}})
        .to_string()
    };
    let submit_wf = |name: &str| -> Result<String> {
        let r = http(
            "POST",
            &c.url("/api/v1/workflows"),
            Some(ADMIN_TOKEN),
            Some(&workflow(name)),
        )?;
        anyhow::ensure!(r.status == 200, "{}", r.body);
        Ok(r.body["workflow"]["id"].as_str().context("id")?.to_string())
    };
    let wf1 = submit_wf("live")?;
    let first = sse.until(
        "wf1 to succeed on /api/v1/events",
        Duration::from_secs(60),
        |evs| {
            evs.iter()
                .any(|e| wf_state(e, &wf1) == Some("WORKFLOW_STATE_SUCCEEDED"))
        },
    )?;
    assert!(first.iter().any(|e| e.event == "task"), "{first:#?}");
    let last_id = first.last().context("events")?.id.clone();
    drop(sse);

    // --- Artifact download: a task producing one.
    let body = json!({"spec": {"name": "art", "shell": {"command": ["sh", "-c",
        "mkdir -p out && echo artifact-bytes > out/file.txt"]},
        "artifacts": [{"name": "out", "path": "out"}]}})
    .to_string();
    let r = http(
        "POST",
        &c.url("/api/v1/tasks"),
        Some(ADMIN_TOKEN),
        Some(&body),
    )?;
    assert_eq!(r.status, 200, "{}", r.body);
    let t = r.body["task"]["id"]
        .as_str()
        .context("task id")?
        .to_string();
    c.wait_state(&t, "TASK_STATE_SUCCEEDED").await?;
    let r = http(
        "GET",
        &c.url(&format!("/api/v1/artifacts?taskId={t}")),
        Some(&read),
        None,
    )?;
    let size: usize = r.body["artifacts"][0]["size"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("artifact size: {}", r.body))?;
    let url = c.url(&format!("/api/v1/artifacts/{t}:out/content"));
    let (status, head, bytes) = download(&url, Some(&read), c.dir.path())?;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("content-type: application/octet-stream"),
        "{head}"
    );
    assert!(
        head.contains("content-disposition: attachment; filename=\"out.tar.zst\""),
        "{head}"
    );
    assert!(head.contains(&format!("content-length: {size}")), "{head}");
    assert_eq!(bytes.len(), size);
    assert_eq!(&bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
    let (status, _, _) = download(
        &c.url(&format!("/api/v1/artifacts/{t}/content?name=out&_=1")),
        Some(&read),
        c.dir.path(),
    )?;
    assert_eq!(status, 200);
    let r = http("GET", &url, None, None)?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (401, Some("UNAUTHENTICATED")),
        "{}",
        r.body
    );
    let r = http(
        "GET",
        &c.url(&format!("/api/v1/artifacts/{t}:nope/content")),
        Some(&read),
        None,
    )?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{}",
        r.body
    );
    ProjectServiceClient::new(admin_channel(&addr).await?)
        .create(CreateProjectRequest {
            project: Some(Project {
                name: "other".into(),
                ..Default::default()
            }),
        })
        .await?;
    let other = token(&addr, "other", Scope::Submit).await?;
    let r = http("GET", &url, Some(&other), None)?;
    assert!(
        matches!(
            (r.status, r.body["code"].as_str()),
            (404, Some("NOT_FOUND")) | (403, Some("PERMISSION_DENIED"))
        ),
        "another project's artifact: {}",
        r.body
    );
    // Generated from the OpenAPI document (so from the route table): every GET route whose
    // request has a `project` field refuses another project's token asking for this one.
    let mut checked = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        let Some(desc) = item["get"]["description"].as_str() else {
            continue;
        };
        let Some(req) = desc
            .split("request scabbard.v1.")
            .nth(1)
            .and_then(|r| r.split(')').next())
        else {
            continue;
        };
        if doc["components"]["schemas"][req]["properties"]["project"].is_null()
            || path.contains('{')
        {
            continue;
        }
        let r = http(
            "GET",
            &c.url(&format!("{path}?project=default")),
            Some(&other),
            None,
        )?;
        assert!(
            matches!(
                (r.status, r.body["code"].as_str()),
                (403, Some("PERMISSION_DENIED")) | (404, Some("NOT_FOUND"))
            ),
            "GET {path}?project=default with another project's token: {} {}",
            r.status,
            r.body
        );
        checked.push(path.clone());
    }
    assert!(
        checked.len() >= 4 && checked.contains(&"/api/v1/tasks".to_string()),
        "{checked:?}"
    );
    // Another project's token sees no workflow events of this project.
    let foreign = SseClient::open(&c.url("/api/v1/events"), &other, Some(&last_id))?;

    // --- Away: a workflow and a task run, then the controller restarts.
    let wf2 = submit_wf("while-away")?;
    let t2 = c.submit(ADMIN_TOKEN, "echo away")?;
    c.wait_state(&t2, "TASK_STATE_SUCCEEDED").await?;
    eventually("wf2 to succeed", Duration::from_secs(60), || async {
        http(
            "GET",
            &c.url(&format!("/api/v1/workflows/{wf2}")),
            Some(ADMIN_TOKEN),
            None,
        )
        .ok()
        .filter(|r| r.body["state"] == "WORKFLOW_STATE_SUCCEEDED")
    })
    .await?;
    // The other project's own task arrives on its stream; this project's workflow never.
    let mine = c.submit(&other, "true")?;
    let evs = foreign.until("the other project's task", Duration::from_secs(30), |evs| {
        saw_state(evs, &mine, "TASK_STATE_SUCCEEDED")
    })?;
    drop(foreign);
    assert!(
        evs.iter()
            .all(|e| e.event == "task" && e.data["task"]["project"] == "other"),
        "another project's token saw: {evs:#?}"
    );
    c.restart_controller().await?;
    let resumed = SseClient::open(&c.url("/api/v1/events"), ADMIN_TOKEN, Some(&last_id))?;
    let evs = resumed.until(
        "the replay after a restart",
        Duration::from_secs(30),
        |evs| {
            evs.iter()
                .any(|e| wf_state(e, &wf2) == Some("WORKFLOW_STATE_SUCCEEDED"))
                && saw_state(evs, &t2, "TASK_STATE_SUCCEEDED")
                && saw_state(evs, &t, "TASK_STATE_SUCCEEDED")
        },
    )?;
    assert!(
        evs.iter().all(|e| e.id != last_id),
        "the resume point came again: {evs:#?}"
    );
    // Ids only move forward on both cursors.
    let mut prev = (rev(&last_id), 0_i64);
    for e in &evs {
        let w: i64 =
            e.id.rsplit(':')
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(-1);
        assert!(
            rev(&e.id) >= prev.0 && w >= prev.1,
            "{prev:?} then {}: {evs:#?}",
            e.id
        );
        prev = (rev(&e.id), w);
    }
    // The workflow's node tasks came as task events too.
    let nodes = evs
        .iter()
        .filter(|e| e.event == "task" && e.data["task"]["workflowId"] == wf2.as_str())
        .count();
    assert!(nodes >= 2, "{evs:#?}");
    Ok(())
}
