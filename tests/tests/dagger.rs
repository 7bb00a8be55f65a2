//! The dagger executor end to end without an engine: an in-process controller, an
//! in-process worker whose `[dagger].cli` is a fake `dagger` script, and a fake engine
//! session endpoint (plain HTTP/1.1 on 127.0.0.1 answering the few queries of a one-step
//! container task). The worker advertises `dagger` only once the engine answers its probe
//! (a heartbeat says so), and then runs a container task to SUCCEEDED with the step's
//! output in the task's log.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use scabbard_common::proto::admin_service_client::AdminServiceClient;
use scabbard_common::proto::{
    ClusterStatusRequest, ContainerStep, ContainerTask, Requirements, TaskSpec, TaskState,
    task_spec::Kind,
};
use scabbard_tests::*;
use scabbard_worker::WorkerConfig;
use scabbard_worker::config::DaggerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const SESSION_TOKEN: &str = "e2e-session-token";

/// The fields of a query's chain, `query` left out (`... on Container` fragments kept).
fn fields(query: &str) -> Vec<String> {
    let body = query
        .strip_prefix("query{")
        .unwrap_or(query)
        .trim_end_matches('}');
    let (mut parts, mut current) = (Vec::new(), String::new());
    let (mut depth, mut in_str, mut escaped) = (0, false, false);
    for c in body.chars() {
        if in_str {
            in_str = c != '"' || escaped;
            escaped = c == '\\' && !escaped;
        } else if c == '"' {
            in_str = true;
        } else if c == '(' || c == '[' {
            depth += 1;
        } else if c == ')' || c == ']' {
            depth -= 1;
        } else if c == '{' && depth == 0 {
            parts.push(std::mem::take(&mut current));
            continue;
        }
        current.push(c);
    }
    parts.push(current);
    parts
}

/// The value of the string argument `name` of `field`.
fn arg(field: &str, name: &str) -> Option<String> {
    let rest = &field[field.find(&format!("{name}:\""))? + name.len() + 2..];
    Some(rest[..rest.find('"')?].to_string())
}

/// The answer to `query`, for the queries a one-step task and a probe send. The image
/// decides the outcome: `fail/…` exits 3 with output on stderr; `boom/…` gets an engine
/// (GraphQL) error; anything else succeeds. Step output files are written where the
/// worker exports them.
fn answer(query: &str) -> serde_json::Value {
    let fields = fields(query);
    let leaf = fields.last().cloned().unwrap_or_default();
    let failing = query.contains("ctr-fail");
    let value: serde_json::Value = match leaf.split('(').next().unwrap_or_default() {
        "version" => "v0.e2e".into(),
        "id" => "scratch-1".into(),
        "sync" if query.contains("boom/") => {
            return serde_json::json!({
                "data": null,
                "errors": [{ "message": "failed to resolve image: registry unreachable", "path": ["container", "from"] }]
            });
        }
        "sync" if query.contains("fail/") => "ctr-fail".into(),
        "sync" => "ctr-1".into(),
        "exitCode" => if failing { 3 } else { 0 }.into(),
        "size" => 0.into(),
        "export" => {
            let dest = arg(&leaf, "path").expect("an export path");
            let from = arg(&fields[fields.len() - 2], "path").unwrap_or_default();
            let text = match from.rsplit('.').next() {
                Some("out") => "hello from the fake engine\n",
                Some("err") if failing => "tests failed: 2 of 7\n",
                _ => "",
            };
            std::fs::write(&dest, text).expect("export");
            dest.into()
        }
        _ => panic!("unexpected query {query}"),
    };
    let data = fields
        .iter()
        .rev()
        .filter(|f| !f.starts_with("..."))
        .fold(value, |inner, f| {
            let name = f.split('(').next().unwrap_or_default().to_string();
            serde_json::json!({ name: inner })
        });
    serde_json::json!({ "data": data })
}

/// Serves `POST /query` on a free port: one request per connection.
async fn fake_engine() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, length) = loop {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body: serde_json::Value =
                    serde_json::from_slice(&buf[head_end..head_end + length]).unwrap();
                let reply = answer(body["query"].as_str().unwrap()).to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn dagger_capability_follows_the_engine_and_container_tasks_run() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let dir = tempfile::tempdir()?;
    let port = fake_engine().await;
    let cli = dir.path().join("dagger");
    let cfg = WorkerConfig {
        controller: c.addr(),
        registration_token: TOKEN.into(),
        name: "dagger-host".into(),
        slots: 2,
        data_dir: dir.path().join("worker"),
        dagger: DaggerConfig {
            cli: Some(cli.clone()),
            probe_interval_ms: 1_000,
            kill_grace_ms: 200,
            ..DaggerConfig::default()
        },
        ..WorkerConfig::default()
    };
    let stop = CancellationToken::new();
    let worker = tokio::spawn(scabbard_worker::run(cfg, stop.clone()));

    // No CLI yet: the worker attaches without the capability.
    let agent = wait_agent(&c.addr(), "the worker", |a| a.name == "dagger-host").await?;
    assert!(
        !agent.capabilities.contains(&"dagger".to_string()),
        "{agent:?}"
    );

    // The CLI appears and its sessions reach the engine: the next probe finds it.
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = session ] || exit 64\necho 'engine progress' >&2\necho '{{\"port\":{port},\"session_token\":\"{SESSION_TOKEN}\"}}'\nexec sleep 1000\n"
    );
    std::fs::write(&cli, script)?;
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755))?;
    wait_agent(&c.addr(), "the dagger capability", |a| {
        a.name == "dagger-host" && a.capabilities.contains(&"dagger".to_string())
    })
    .await?;

    let mut tasks = tasks_client(&c.addr()).await?;
    let spec = TaskSpec {
        kind: Some(Kind::Container(ContainerTask {
            image: "alpine".into(),
            steps: vec![ContainerStep {
                cache: false,
                args: vec!["echo".into(), "hello".into()],
                name: "greet".into(),
            }],
            ..Default::default()
        })),
        ..Default::default()
    };
    let id = submit(&mut tasks, spec).await?;
    let task = wait_state(&mut tasks, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(task.state(), TaskState::Succeeded, "{task:?}");
    let log = logs(&mut tasks, &id, 0, false).await?;
    assert!(log.contains("hello from the fake engine"), "{log}");
    assert!(log.contains("engine progress"), "{log}");

    stop.cancel();
    worker.await??;
    Ok(())
}

/// Writes a fake `dagger` CLI whose sessions point at the fake engine on `port`.
fn fake_cli(path: &std::path::Path, port: u16) -> anyhow::Result<()> {
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = session ] || exit 64\necho 'engine progress' >&2\necho '{{\"port\":{port},\"session_token\":\"{SESSION_TOKEN}\"}}'\nexec sleep 1000\n"
    );
    std::fs::write(path, script)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn container(image: &str, host: Option<&str>) -> TaskSpec {
    TaskSpec {
        kind: Some(Kind::Container(ContainerTask {
            image: image.into(),
            steps: vec![ContainerStep {
                cache: false,
                args: vec!["echo".into(), "hello".into()],
                name: "greet".into(),
            }],
            ..Default::default()
        })),
        requirements: host.map(|h| Requirements {
            labels: [("host".to_string(), h.to_string())].into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn container_tasks_go_to_the_worker_whose_engine_has_their_image_warm() -> anyhow::Result<()>
{
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let c = InProc::start_with(|cfg| cfg.metrics_listen = Some(metrics)).await?;
    let dir = tempfile::tempdir()?;
    let cli = dir.path().join("dagger");
    fake_cli(&cli, fake_engine().await)?;
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for (name, slots) in [("warm-host", 2), ("cold-host", 4)] {
        let cfg = WorkerConfig {
            controller: c.addr(),
            registration_token: TOKEN.into(),
            name: name.into(),
            labels: [(
                "host".to_string(),
                name.trim_end_matches("-host").to_string(),
            )]
            .into(),
            slots,
            data_dir: dir.path().join(name),
            dagger: DaggerConfig {
                cli: Some(cli.clone()),
                kill_grace_ms: 200,
                ..DaggerConfig::default()
            },
            ..WorkerConfig::default()
        };
        workers.push(tokio::spawn(scabbard_worker::run(cfg, stop.clone())));
    }
    let mut ids = std::collections::HashMap::new();
    for name in ["warm-host", "cold-host"] {
        let a = wait_agent(&c.addr(), name, |a| {
            a.name == name && a.capabilities.contains(&"dagger".to_string())
        })
        .await?;
        ids.insert(name, a.id);
    }
    let mut tasks = tasks_client(&c.addr()).await?;
    // Warm one engine up with the image, then wait for its report.
    let id = submit(&mut tasks, container("golang:1.23", Some("warm"))).await?;
    let t = wait_state(&mut tasks, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    wait_agent(&c.addr(), "the warm report", |a| {
        a.name == "warm-host"
            && a.cache
                .as_ref()
                .is_some_and(|c| c.images.contains(&"golang:1.23".to_string()))
    })
    .await?;
    // Tasks for that image go to the warm engine (the cold one has more free slots).
    let mut warm_tasks = Vec::new();
    for _ in 0..8 {
        warm_tasks.push(submit(&mut tasks, container("golang:1.23", None)).await?);
    }
    for id in &warm_tasks {
        let t = wait_state(&mut tasks, id, None, Duration::from_secs(30)).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
        assert_eq!(t.attempts[0].agent_id, ids["warm-host"], "{t:?}");
    }
    // Another image is warm nowhere: the freest worker takes it.
    let id = submit(&mut tasks, container("python:3.12", None)).await?;
    let t = wait_state(&mut tasks, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.attempts[0].agent_id, ids["cold-host"], "{t:?}");
    let status = AdminServiceClient::new(c.channel(ADMIN_TOKEN).await?)
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    assert_eq!(
        (status.cache_affinity_hits, status.cache_affinity_misses),
        (8, 2),
        "{status:?}"
    );
    // The same as Prometheus metrics.
    let text = http_get(metrics, "/metrics").await?;
    for line in [
        "scabbard_leader 1",
        "scabbard_cache_affinity_hits_total 8",
        "scabbard_cache_affinity_misses_total 2",
        "scabbard_cache_affinity_hit_ratio 0.8",
        "scabbard_agents_connected 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }
    stop.cancel();
    for w in workers {
        w.await??;
    }
    Ok(())
}

#[tokio::test]
async fn a_failing_step_is_a_user_failure_and_an_engine_error_is_retried() -> anyhow::Result<()> {
    use scabbard_common::proto::{ErrorClass, RetryPolicy};
    let c = InProc::start().await?;
    let dir = tempfile::tempdir()?;
    let cli = dir.path().join("dagger");
    fake_cli(&cli, fake_engine().await)?;
    let stop = CancellationToken::new();
    let cfg = WorkerConfig {
        controller: c.addr(),
        registration_token: TOKEN.into(),
        name: "engine-host".into(),
        slots: 2,
        data_dir: dir.path().join("worker"),
        dagger: DaggerConfig {
            cli: Some(cli.clone()),
            kill_grace_ms: 200,
            ..DaggerConfig::default()
        },
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(scabbard_worker::run(cfg, stop.clone()));
    wait_agent(&c.addr(), "the dagger capability", |a| {
        a.capabilities.contains(&"dagger".to_string())
    })
    .await?;
    let mut tasks = tasks_client(&c.addr()).await?;
    // A step exiting 3: FAILED, user class, exit code and output kept.
    let id = submit(&mut tasks, container("fail/golang:1.23", None)).await?;
    let t = wait_state(&mut tasks, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let r = t.result.clone().unwrap();
    assert_eq!(
        (r.exit_code, r.error_class()),
        (3, ErrorClass::User),
        "{r:?}"
    );
    assert_eq!(t.attempts.len(), 1);
    let log = logs(&mut tasks, &id, 0, false).await?;
    assert!(log.contains("tests failed: 2 of 7"), "{log}");
    // An engine error: an infrastructure failure, retried up to the bound (1 here).
    let mut spec = container("boom/golang:1.23", None);
    spec.retry = Some(RetryPolicy {
        max_infra_retries: Some(1),
        initial_backoff_ms: 50,
        ..Default::default()
    });
    let id = submit(&mut tasks, spec).await?;
    let t = wait_state(&mut tasks, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    assert_eq!(t.attempts.len(), 2, "retried once: {t:?}");
    assert_eq!(t.infra_failures, 2);
    assert_eq!(t.user_failures, 0);
    let r = t.result.unwrap();
    assert_eq!(r.error_class(), ErrorClass::Infrastructure);
    assert!(r.message.contains("registry unreachable"), "{}", r.message);
    stop.cancel();
    worker.await??;
    Ok(())
}

/// A plain HTTP/1.1 GET on loopback; returns the body of a 200 answer.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "{text}");
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}
