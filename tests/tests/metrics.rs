//! Metrics are valid: the `/metrics` of a real controller and of a real worker pass
//! `promtool check metrics`, their histograms move after traffic, the per-project queue
//! gauges and the queue age show an unplaceable task, and the alert rules in
//! `deploy/prometheus/` pass `promtool check rules` and their `promtool test rules` file.
//! `promtool` comes from Debian's `prometheus` package (scripts/setup.sh installs it); the
//! tests fail, naming that script, when it is missing.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use scabbard_common::proto::{
    AgentStatus, ArtifactInput, ArtifactSpec, Requirements, TaskSpec, TaskState,
};
use scabbard_tests::{
    Controller, ControllerOpts, Proc, TOKEN, Worker, eventually, free_port, process_log_level,
    scabbard_bin, shell, submit, tasks_client, wait_agent, wait_state,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// `promtool`, or a loud failure naming the setup script.
fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool is not installed: run scripts/setup.sh (it installs Debian's `prometheus` package, which ships promtool)"
        )
    })
}

/// Runs promtool with `args` (stdin: `input`); fails with its output unless it succeeded.
fn run_promtool(args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn promtool")?;
    {
        let mut stdin = child.stdin.take().context("stdin")?;
        if let Some(text) = input {
            stdin.write_all(text.as_bytes())?;
        }
    }
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "promtool {args:?} failed ({}):\n{text}\n--- input ---\n{}",
        out.status,
        input.unwrap_or("")
    );
    Ok(text)
}

/// GET `path` on `addr` (HTTP/1.1, `accept` header if given); the body of a 200.
async fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let accept = accept
        .map(|a| format!("accept: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\n{accept}connection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    ensure!(text.starts_with("HTTP/1.1 200"), "{text}");
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

async fn scrape(addr: SocketAddr) -> Result<String> {
    http_get(addr, "/metrics", None).await
}

/// The value of the sample written exactly as `series` (name and labels), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn count(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_worker_metrics_are_valid_and_move_with_traffic() -> Result<()> {
    promtool();
    let dir = tempfile::tempdir()?;
    let cm: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let wm: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let opts = ControllerOpts {
        extra: vec!["--metrics-listen".into(), cm.to_string()],
        ..ControllerOpts::default()
    };
    let c = Controller::start(&dir.path().join("c"), 0, &opts)?;
    let addr = c.addr.to_string();
    // The worker's endpoint from its flag (`metrics_listen` in its file is the same key).
    let mut w = Proc::new(
        Command::new(scabbard_bin())
            .args([
                "worker",
                "--controller",
                &addr,
                "--registration-token",
                TOKEN,
            ])
            .args(["--name", "metrics-w", "--slots", "2", "--metrics-listen"])
            .arg(wm.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("w"))
            .env("SCABBARD_LOG", process_log_level())
            .stdout(Stdio::null())
            .spawn()
            .context("spawn worker")?,
        "metrics-w",
    );
    wait_agent(&addr, "the worker to connect", |a| {
        a.name == "metrics-w" && a.status() == AgentStatus::Connected
    })
    .await?;
    let mut tasks = tasks_client(&addr).await?;

    // Before: the endpoints answer and pass promtool.
    let before = scrape(cm).await?;
    let wbefore = eventually("the worker's /metrics", Duration::from_secs(10), || async {
        scrape(wm).await.ok()
    })
    .await?;
    run_promtool(&["check", "metrics"], Some(&before))?;
    run_promtool(&["check", "metrics"], Some(&wbefore))?;

    // Traffic: three tasks that print something.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(submit(&mut tasks, shell(&format!("echo metrics-{i}"))).await?);
    }
    for id in &ids {
        let t = wait_state(&mut tasks, id, None, Duration::from_secs(30)).await?;
        ensure!(t.state() == TaskState::Succeeded, "{t:?}");
    }
    // An artifact uploaded by one task and downloaded as the input of another.
    let producer = submit(
        &mut tasks,
        TaskSpec {
            artifacts: vec![ArtifactSpec {
                name: "a".into(),
                path: "out/a".into(),
                optional: false,
            }],
            ..shell("mkdir -p out && echo artifact-bytes > out/a")
        },
    )
    .await?;
    let t = wait_state(&mut tasks, &producer, None, Duration::from_secs(30)).await?;
    ensure!(t.state() == TaskState::Succeeded, "{t:?}");
    let consumer = submit(
        &mut tasks,
        TaskSpec {
            inputs: vec![ArtifactInput {
                from: format!("{producer}/a"),
                path: "in/a".into(),
                ..Default::default()
            }],
            ..shell("cat in/a")
        },
    )
    .await?;
    let t = wait_state(&mut tasks, &consumer, None, Duration::from_secs(30)).await?;
    ensure!(t.state() == TaskState::Succeeded, "{t:?}");

    // One task no agent can take: it stays queued, so the per-project gauges show it.
    let mut stuck = shell("true");
    stuck.requirements = Some(Requirements {
        labels: [("zone".to_string(), "nowhere".to_string())].into(),
        ..Default::default()
    });
    submit(&mut tasks, stuck).await?;

    // A call that fails: counted under its code.
    let missing = tasks
        .get(scabbard_common::proto::GetTaskRequest {
            id: "no-such-task".into(),
        })
        .await
        .expect_err("no such task");
    ensure!(missing.code() == tonic::Code::NotFound, "{missing:?}");

    let after = eventually(
        "the queue age to pass 0",
        Duration::from_secs(10),
        || async {
            let t = scrape(cm).await.ok()?;
            (count(&t, "scabbard_queue_oldest_age_seconds") > 0.0).then_some(t)
        },
    )
    .await?;
    run_promtool(&["check", "metrics"], Some(&after))?;
    for (series, at_least) in [
        (
            "scabbard_rpc_duration_seconds_count{method=\"scabbard.v1.TaskService/Submit\",code=\"OK\"}",
            4.0,
        ),
        (
            "scabbard_rpc_duration_seconds_count{method=\"scabbard.v1.TaskService/Get\",code=\"NOT_FOUND\"}",
            1.0,
        ),
        ("scabbard_task_submit_to_start_seconds_count", 3.0),
        (
            "scabbard_task_submit_to_finish_seconds_count{state=\"succeeded\"}",
            3.0,
        ),
        ("scabbard_store_commit_duration_seconds_count", 3.0),
        ("scabbard_store_commit_batch_writes_count", 3.0),
        ("scabbard_dispatch_round_duration_seconds_count", 1.0),
        (
            "scabbard_log_received_bytes_total",
            3.0 * "metrics-0\n".len() as f64,
        ),
    ] {
        let (b, a) = (count(&before, series), count(&after, series));
        ensure!(
            a - b >= at_least,
            "{series} moved from {b} to {a}, expected at least +{at_least}:\n{after}"
        );
    }
    ensure!(
        count(&after, "scabbard_task_submit_to_finish_seconds_sum") > 0.0
            || count(
                &after,
                "scabbard_task_submit_to_finish_seconds_sum{state=\"succeeded\"}"
            ) > 0.0,
        "{after}"
    );
    for line in [
        "scabbard_leader 1",
        "scabbard_store_healthy 1",
        "scabbard_agents_connected 1",
        "scabbard_project_tasks_queued{project=\"default\"} 1",
        "scabbard_project_tasks_running{project=\"default\"} 0",
        "scabbard_agent_sessions_total 1",
    ] {
        ensure!(after.lines().any(|l| l == line), "{line} missing:\n{after}");
    }

    // The worker: attempts by executor and outcome, slots, spool.
    let wafter = scrape(wm).await?;
    run_promtool(&["check", "metrics"], Some(&wafter))?;
    let series =
        "scabbard_worker_attempt_duration_seconds_count{executor=\"shell\",outcome=\"succeeded\"}";
    ensure!(
        count(&wafter, series) - count(&wbefore, series) >= 3.0,
        "{series}:\n{wafter}"
    );
    for line in [
        "scabbard_worker_slots 2",
        "scabbard_worker_slots_busy 0",
        "scabbard_worker_connected 1",
    ] {
        ensure!(
            wafter.lines().any(|l| l == line),
            "{line} missing:\n{wafter}"
        );
    }
    for direction in ["upload", "download"] {
        let series = format!("scabbard_worker_artifact_bytes_total{{direction=\"{direction}\"}}");
        ensure!(count(&wafter, &series) > 0.0, "{series}:\n{wafter}");
    }
    ensure!(
        count(&wafter, "scabbard_worker_spool_bytes") > 0.0,
        "{wafter}"
    );

    // Every metric the dashboard and the alert rules use is exported (the engine gauge only
    // by workers with the dagger executor on).
    let exported: std::collections::HashSet<&str> = after
        .lines()
        .chain(wafter.lines())
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for name in deploy_metric_names()? {
        ensure!(
            exported.contains(name.as_str()) || name == "scabbard_worker_engine_up",
            "{name} is used in deploy/ but not exported"
        );
    }

    // OpenMetrics when asked for it.
    let om = http_get(
        cm,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    )
    .await?;
    ensure!(om.ends_with("# EOF\n"), "{om}");

    // The worker dies and comes back on its data dir: a second session, counted as a
    // reconnect.
    w.kill9();
    let _w = Worker::start(&addr, &dir.path().join("w"), "metrics-w", 2)?;
    eventually(
        "the reconnect to be counted",
        Duration::from_secs(20),
        || async {
            let t = scrape(cm).await.ok()?;
            (count(&t, "scabbard_agent_reconnects_total") >= 1.0
                && count(&t, "scabbard_agent_sessions_total") >= 2.0)
                .then_some(())
        },
    )
    .await?;
    Ok(())
}

/// The PromQL queries of the Grafana dashboard, with its variables filled in.
fn dashboard_queries() -> Result<Vec<String>> {
    let path = repo_root().join("deploy/grafana/scabbard.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let mut out = Vec::new();
    for p in dash["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().context("a target without expr")?;
            out.push(
                e.replace("$__rate_interval", "5m")
                    .replace("$controller_job", "scabbard-controller")
                    .replace("$worker_job", "scabbard-worker"),
            );
        }
    }
    ensure!(
        out.len() >= 20,
        "only {} queries in {}",
        out.len(),
        path.display()
    );
    Ok(out)
}

/// Every `scabbard_…` series name the dashboard and the alert rules use.
fn deploy_metric_names() -> Result<std::collections::BTreeSet<String>> {
    let mut text = dashboard_queries()?.join("\n");
    text.push_str(&std::fs::read_to_string(
        repo_root().join("deploy/prometheus/alerts.yml"),
    )?);
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("scabbard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    Ok(names)
}

#[test]
fn dashboard_queries_are_valid_promql() -> Result<()> {
    // promtool parses PromQL when it checks rules: each query becomes a recording rule.
    let dir = tempfile::tempdir()?;
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries()?.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: scabbard:dashboard:{i}\n        expr: {}\n",
            serde_json::to_string(q)?
        ));
    }
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, rules)?;
    let out = run_promtool(&["check", "rules", &file.to_string_lossy()], None)?;
    ensure!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

#[test]
fn alert_rules_pass_promtool_and_their_tests_fire() -> Result<()> {
    let rules = "deploy/prometheus/alerts.yml";
    let tests = "deploy/prometheus/alerts_test.yml";
    let checked = run_promtool(&["check", "rules", rules], None)?;
    ensure!(checked.contains("SUCCESS"), "{checked}");
    let tested = run_promtool(&["test", "rules", tests], None)?;
    ensure!(tested.contains("SUCCESS"), "{tested}");
    // The test file shows at least the no-leader and queue-age alerts firing.
    let text = std::fs::read_to_string(repo_root().join(tests))?;
    for alert in ["ScabbardNoLeader", "ScabbardQueueAge"] {
        ensure!(
            text.contains(&format!("alertname: {alert}")),
            "{tests} has no firing case for {alert}"
        );
    }
    // Every alert has a firing case in the test file.
    let rules_text = std::fs::read_to_string(repo_root().join(rules))?;
    for name in rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        ensure!(
            text.contains(&format!("alertname: {name}")),
            "{tests} has no case for {name}"
        );
    }
    Ok(())
}
