//! The everyday verbs through the real `scabbard` binary against a real controller and
//! worker process: `task rerun`, `workflow rerun`, `workflow logs`, `schedule trigger`,
//! `schedule update` and `template run --wait`; and their HTTP routes with the scope and
//! project rules.

mod support;

use anyhow::{Context, Result, ensure};
use scabbard_tests::*;
use serde_json::Value;
use support::*;

#[tokio::test]
async fn task_rerun_makes_a_new_task_with_the_same_spec() -> Result<()> {
    let env = Env::start()?;
    let out = env.run(&[
        "submit",
        "--wait",
        "--name",
        "again",
        "--label",
        "team=core",
        "--secret",
        "PASSWORD=s3cret",
        "--",
        "sh",
        "-c",
        "echo password has ${#PASSWORD} chars",
    ])?;
    ensure!(out.status.success(), "submit: {}", stderr(&out));
    let first = submitted(&out)?;

    let out = env.run(&["task", "rerun", &first, "--follow"])?;
    ensure!(out.status.success(), "rerun --follow: {}", stderr(&out));
    // The secret went along (sealed again): the rerun's task saw its 6 characters.
    let log = String::from_utf8(out.stdout.clone())?;
    ensure!(log.contains("password has 6 chars"), "rerun log: {log}");
    let second = stderr(&out)
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("rerunning {first} as "))
                .map(str::to_string)
        })
        .context("no `rerunning … as …` line")?;
    ensure!(second != first);

    let a = env.json(&["task", "get", &first])?;
    let b = env.json(&["task", "get", &second])?;
    assert_eq!(s(&b, &["rerunOf"]), first);
    assert_eq!(s(&a, &["rerunOf"]), "");
    assert_eq!(b["spec"], a["spec"], "the rerun's spec is the source's");
    assert_eq!(s(&b, &["spec", "secretEnv", "PASSWORD"]), "***");
    assert_eq!(s(&b, &["state"]), "TASK_STATE_SUCCEEDED");

    // An idempotency key: the second rerun with it is the first one.
    let k1 = env.ok(&["task", "rerun", &first, "--idempotency-key", "again-1"])?;
    let out = env.run(&["task", "rerun", &first, "--idempotency-key", "again-1"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout.clone())?.trim(), k1.trim());
    ensure!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    // Unknown ids are NOT_FOUND; the rerun is in the audit log.
    let out = env.run(&["task", "rerun", "01jzzzzzzzzzzzzzzzzzzzzzzz"])?;
    ensure!(!out.status.success());
    ensure!(stderr(&out).contains("NOT_FOUND"), "{}", stderr(&out));
    let audit = env.ok(&["audit", "-o", "json"])?;
    ensure!(
        audit.contains("task.rerun") && audit.contains(&format!("rerun of {first}")),
        "audit: {audit}"
    );
    Ok(())
}

#[tokio::test]
async fn template_run_wait_exits_with_the_workflow_result() -> Result<()> {
    let env = Env::start()?;
    let out = env.run(&["template", "run", "ok", "-p", "what=hi", "--wait"])?;
    ensure!(out.status.success(), "ok --wait: {}", stderr(&out));
    let err = stderr(&out);
    // Progress while it ran, then the outcome.
    ensure!(err.contains("build") && err.contains("test"), "{err}");
    ensure!(err.contains("SUCCEEDED"), "{err}");
    let id = submitted(&out)?;
    let w = env.json(&["workflow", "get", &id])?;
    assert_eq!(s(&w, &["state"]), "WORKFLOW_STATE_SUCCEEDED");

    let out = env.run(&["template", "run", "bad", "--wait"])?;
    ensure!(!out.status.success(), "bad --wait exited 0");
    ensure!(stderr(&out).contains("FAILED"), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn workflow_logs_and_rerun() -> Result<()> {
    let env = Env::start()?;
    let out = env.run(&["template", "run", "ok", "-p", "what=hi", "--wait"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let id = submitted(&out)?;

    // Every node's lines, each prefixed by its node (padded to the longest name).
    let logs = env.ok(&["workflow", "logs", &id])?;
    for line in [
        "build | build says hi",
        "build | build done",
        "test  | test says hi",
        "test  | test done",
    ] {
        ensure!(
            logs.lines().any(|l| l == line),
            "{line:?} missing from:\n{logs}"
        );
    }
    let only = env.ok(&["workflow", "logs", &id, "--node", "test"])?;
    ensure!(only.contains("test | test done"), "{only}");
    ensure!(!only.contains("build"), "{only}");
    let out = env.run(&["workflow", "logs", &id, "--node", "nope"])?;
    ensure!(!out.status.success());
    ensure!(stderr(&out).contains("build, test"), "{}", stderr(&out));

    // --follow on a running workflow: lines of nodes that start later too, then it ends.
    let running = env.ok(&["template", "run", "ok", "-p", "what=later", "-p", "pause=1"])?;
    let running = running.trim();
    let out = env.run(&["workflow", "logs", running, "--follow"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let followed = String::from_utf8(out.stdout.clone())?;
    for line in ["build | build done", "test  | test says later"] {
        ensure!(
            followed.lines().any(|l| l == line),
            "{line:?} missing from:\n{followed}"
        );
    }
    let w = env.json(&["workflow", "get", running])?;
    assert_eq!(s(&w, &["state"]), "WORKFLOW_STATE_SUCCEEDED");

    // A rerun: a new workflow, same spec and template parameters, rerun_of set.
    let out = env.run(&["workflow", "rerun", &id, "--wait"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let again = submitted(&out)?;
    ensure!(again != id);
    let a = env.json(&["workflow", "get", &id])?;
    let b = env.json(&["workflow", "get", &again])?;
    assert_eq!(s(&b, &["rerunOf"]), id);
    assert_eq!(b["spec"], a["spec"]);
    assert_eq!(b["template"]["params"], a["template"]["params"]);
    assert_eq!(s(&b, &["state"]), "WORKFLOW_STATE_SUCCEEDED");
    let relogs = env.ok(&["workflow", "logs", &again])?;
    ensure!(relogs.contains("test  | test says hi"), "{relogs}");
    Ok(())
}

#[tokio::test]
async fn schedule_trigger_fires_once_per_idempotency_key() -> Result<()> {
    let env = Env::start()?;
    let created = env.json(&[
        "schedule",
        "create",
        "--name",
        "yearly",
        "--cron",
        "0 0 1 1 *",
        "--template",
        "ok",
        "-p",
        "what=tick",
    ])?;
    let sid = s(&created, &["id"]).to_string();

    let first = env.ok(&[
        "schedule",
        "trigger",
        &sid,
        "--idempotency-key",
        "deploy-42",
    ])?;
    let first = first.trim().to_string();
    let out = env.run(&[
        "schedule",
        "trigger",
        &sid,
        "--idempotency-key",
        "deploy-42",
    ])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout.clone())?.trim(),
        first,
        "same key, same run"
    );
    ensure!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    let sch = env.json(&["schedule", "get", &sid])?;
    assert_eq!(sch["fired"], Value::from("1"), "{sch}");
    assert_eq!(s(&sch, &["lastWorkflowId"]), first);

    // The run is the schedule's: its template, parameters and schedule id.
    let out = env.run(&["workflow", "watch", &first])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let w = env.json(&["workflow", "get", &first])?;
    assert_eq!(s(&w, &["template", "scheduleId"]), sid);
    assert_eq!(s(&w, &["template", "params", "what"]), "tick");

    // Without a key every trigger is a run; --wait follows it.
    let out = env.run(&["schedule", "trigger", &sid, "--wait"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    ensure!(submitted(&out)? != first);
    let sch = env.json(&["schedule", "get", &sid])?;
    assert_eq!(sch["fired"], Value::from("2"), "{sch}");
    let audit = env.ok(&["audit", "-o", "json"])?;
    ensure!(audit.contains("schedule.trigger"), "audit: {audit}");
    Ok(())
}

#[tokio::test]
async fn schedule_update_recomputes_the_next_tick_and_names_bad_fields() -> Result<()> {
    let env = Env::start()?;
    let created = env.json(&[
        "schedule",
        "create",
        "--name",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--template",
        "ok",
        "-p",
        "what=a",
    ])?;
    let sid = s(&created, &["id"]).to_string();
    let before: i64 = s(&created, &["nextTickMs"]).parse()?;
    ensure!(before / 1000 % 86_400 == 3 * 3600, "{created}");

    let updated = env.json(&[
        "schedule",
        "update",
        &sid,
        "--cron",
        "30 12 * * *",
        "-p",
        "pause=2",
    ])?;
    let after: i64 = s(&updated, &["nextTickMs"]).parse()?;
    ensure!(after != before, "next tick unchanged: {updated}");
    assert_eq!(after / 1000 % 86_400, 12 * 3600 + 30 * 60, "{updated}");
    assert_eq!(s(&updated, &["spec", "cron"]), "30 12 * * *");
    // Parameters merge: the old one stays, the new one is added.
    assert_eq!(s(&updated, &["spec", "params", "what"]), "a");
    assert_eq!(s(&updated, &["spec", "params", "pause"]), "2");

    // A time zone moves the tick; pausing clears it; resuming plans it again.
    let tz = env.json(&["schedule", "update", &sid, "--timezone", "Asia/Tokyo"])?;
    let tokyo: i64 = s(&tz, &["nextTickMs"]).parse()?;
    assert_eq!(tokyo / 1000 % 86_400, 3 * 3600 + 30 * 60, "{tz}");
    let paused = env.json(&["schedule", "update", &sid, "--pause", "--overlap", "queue"])?;
    assert_eq!(paused["paused"], Value::Bool(true));
    assert_eq!(s(&paused, &["nextTickMs"]), "0");
    assert_eq!(s(&paused, &["spec", "overlap"]), "OVERLAP_POLICY_QUEUE");
    let resumed = env.json(&["schedule", "update", &sid, "--resume"])?;
    assert_eq!(s(&resumed, &["nextTickMs"]), s(&tz, &["nextTickMs"]));

    // Bad input: INVALID_ARGUMENT naming the field; nothing changes.
    for (args, field) in [
        (vec!["--cron", "not a cron"], "cron"),
        (vec!["--timezone", "Mars/Olympus"], "timezone"),
        (vec!["--template", "no-such-template"], "no-such-template"),
    ] {
        let mut all = vec!["schedule", "update", sid.as_str()];
        all.extend(args.iter().copied());
        let out = env.run(&all)?;
        ensure!(!out.status.success(), "{all:?} succeeded");
        let err = stderr(&out);
        ensure!(
            err.contains(field) && (err.contains("INVALID_ARGUMENT") || err.contains("NOT_FOUND")),
            "{all:?}: {err}"
        );
    }
    let out = env.run(&["schedule", "update", &sid])?;
    ensure!(
        stderr(&out).contains("nothing to update"),
        "{}",
        stderr(&out)
    );
    let now = env.json(&["schedule", "get", &sid])?;
    assert_eq!(s(&now, &["spec", "cron"]), "30 12 * * *");
    let audit = env.ok(&["audit", "-o", "json"])?;
    ensure!(audit.contains("schedule.update"), "audit: {audit}");
    Ok(())
}

#[tokio::test]
async fn the_verbs_over_http_follow_the_scope_and_project_rules() -> Result<()> {
    use scabbard_common::proto::Scope;
    let env = Env::start_with(true)?;
    eventually(
        "the HTTP API to answer",
        std::time::Duration::from_secs(20),
        || async {
            http(&env, "GET", "/api/v1/whoami", ADMIN_TOKEN, "")
                .ok()
                .filter(|(code, _)| *code == 200)
        },
    )
    .await?;
    env.ok(&["project", "create", "other"])?;
    let out = env.run(&["submit", "--wait", "--", "sh", "-c", "echo over http"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let task = submitted(&out)?;

    // Rerun: a new task naming its source; the same key returns it.
    let path = format!("/api/v1/tasks/{task}/rerun");
    let (code, a) = http(
        &env,
        "POST",
        &path,
        ADMIN_TOKEN,
        r#"{"idempotencyKey":"h1"}"#,
    )?;
    assert_eq!(code, 200, "{a}");
    assert_eq!(s(&a, &["task", "rerunOf"]), task);
    let (_, b) = http(
        &env,
        "POST",
        &path,
        ADMIN_TOKEN,
        r#"{"idempotencyKey":"h1"}"#,
    )?;
    assert_eq!(s(&b, &["task", "id"]), s(&a, &["task", "id"]));
    assert_eq!(b["existing"], Value::Bool(true));
    // A read-only token may not rerun; another project's token does not see the source.
    let read = api_token(&env, "default", Scope::Read).await?;
    let (code, e) = http(&env, "POST", &path, &read, "{}")?;
    assert_eq!((code, s(&e, &["code"])), (403, "PERMISSION_DENIED"), "{e}");
    let other = api_token(&env, "other", Scope::Submit).await?;
    let (code, e) = http(&env, "POST", &path, &other, "{}")?;
    assert_eq!((code, s(&e, &["code"])), (404, "NOT_FOUND"), "{e}");

    // Workflow rerun.
    let out = env.run(&["template", "run", "ok", "--wait"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let wf = submitted(&out)?;
    let (code, r) = http(
        &env,
        "POST",
        &format!("/api/v1/workflows/{wf}/rerun"),
        ADMIN_TOKEN,
        "{}",
    )?;
    assert_eq!(code, 200, "{r}");
    assert_eq!(s(&r, &["workflow", "rerunOf"]), wf);

    // Schedule trigger (once per key) and update (bad input names the field).
    let created = env.json(&[
        "schedule",
        "create",
        "--name",
        "h",
        "--cron",
        "0 0 1 1 *",
        "--template",
        "ok",
    ])?;
    let sid = s(&created, &["id"]).to_string();
    let path = format!("/api/v1/schedules/{sid}/trigger");
    let (code, t1) = http(
        &env,
        "POST",
        &path,
        ADMIN_TOKEN,
        r#"{"idempotencyKey":"k"}"#,
    )?;
    assert_eq!(code, 200, "{t1}");
    let (_, t2) = http(
        &env,
        "POST",
        &path,
        ADMIN_TOKEN,
        r#"{"idempotencyKey":"k"}"#,
    )?;
    assert_eq!(s(&t2, &["workflow", "id"]), s(&t1, &["workflow", "id"]));
    assert_eq!(t2["existing"], Value::Bool(true));
    assert_eq!(s(&t2, &["schedule", "fired"]), "1");
    let path = format!("/api/v1/schedules/{sid}");
    let (code, e) = http(
        &env,
        "PATCH",
        &path,
        ADMIN_TOKEN,
        r#"{"cron":"61 * * * *"}"#,
    )?;
    assert_eq!((code, s(&e, &["code"])), (400, "INVALID_ARGUMENT"), "{e}");
    ensure!(s(&e, &["message"]).contains("cron"), "{e}");
    let (code, e) = http(
        &env,
        "PATCH",
        &path,
        ADMIN_TOKEN,
        r#"{"catchUpWindowMs":"999999999999"}"#,
    )?;
    assert_eq!(code, 400, "{e}");
    ensure!(s(&e, &["message"]).contains("catch_up_window_ms"), "{e}");
    let (code, u) = http(
        &env,
        "PATCH",
        &path,
        ADMIN_TOKEN,
        r#"{"params":{"values":{"what":"x"}},"paused":true}"#,
    )?;
    assert_eq!(code, 200, "{u}");
    assert_eq!(s(&u, &["spec", "params", "what"]), "x");
    assert_eq!(u["paused"], Value::Bool(true));
    let (code, e) = http(
        &env,
        "POST",
        &format!("/api/v1/schedules/{sid}/trigger"),
        &read,
        "{}",
    )?;
    assert_eq!(code, 403, "{e}");
    Ok(())
}

#[tokio::test]
async fn a_manual_trigger_runs_whatever_the_overlap_policy_but_queue_waits() -> Result<()> {
    let env = Env::start()?;
    let mut runs = Vec::new();
    for (name, overlap) in [("skippy", "skip"), ("queued", "queue")] {
        let created = env.json(&[
            "schedule",
            "create",
            "--name",
            name,
            "--cron",
            "0 0 1 1 *",
            "--template",
            "ok",
            "-p",
            "pause=3",
            "--overlap",
            overlap,
        ])?;
        let sid = s(&created, &["id"]).to_string();
        let a = env.ok(&["schedule", "trigger", &sid])?.trim().to_string();
        let b = env.ok(&["schedule", "trigger", &sid])?.trim().to_string();
        ensure!(a != b, "{name}: two triggers, one run");
        // The first run sleeps 3 s: it is still going when the second trigger answers.
        let wa = env.json(&["workflow", "get", &a])?;
        assert_eq!(s(&wa, &["state"]), "WORKFLOW_STATE_RUNNING", "{name}");
        let wb = env.json(&["workflow", "get", &b])?;
        let expect = if overlap == "skip" {
            "WORKFLOW_STATE_RUNNING"
        } else {
            "WORKFLOW_STATE_PENDING"
        };
        assert_eq!(s(&wb, &["state"]), expect, "{name}: {wb}");
        let sch = env.json(&["schedule", "get", &sid])?;
        assert_eq!(sch["fired"], Value::from("2"), "{sch}");
        assert_eq!(s(&sch, &["lastWorkflowId"]), b);
        runs.extend([a, b]);
    }
    for id in &runs {
        let out = env.run(&["workflow", "watch", id])?;
        ensure!(out.status.success(), "{id}: {}", stderr(&out));
    }
    Ok(())
}

#[tokio::test]
async fn mcp_tools_rerun_and_trigger() -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let env = Env::start()?;
    let out = env.run(&["submit", "--wait", "--", "sh", "-c", "echo via mcp"])?;
    ensure!(out.status.success(), "{}", stderr(&out));
    let task = submitted(&out)?;
    let created = env.json(&[
        "schedule",
        "create",
        "--name",
        "m",
        "--cron",
        "0 0 1 1 *",
        "--template",
        "ok",
    ])?;
    let sid = s(&created, &["id"]).to_string();

    let mut child = env
        .command(&["mcp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    let answer = |stdin: &mut std::process::ChildStdin, id: u64, msg: Value| -> Result<Value> {
        writeln!(stdin, "{msg}")?;
        stdin.flush()?;
        loop {
            let v = rx.recv_timeout(std::time::Duration::from_secs(30))?;
            if v["id"] == id {
                return Ok(v);
            }
        }
    };
    answer(
        &mut stdin,
        1,
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "verbs", "version": "0"}}}),
    )?;
    writeln!(
        stdin,
        r#"{{"jsonrpc":"2.0","method":"notifications/initialized"}}"#
    )?;
    let call = |id: u64, name: &str, args: Value| {
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": args}})
    };
    let r = answer(
        &mut stdin,
        2,
        call(2, "rerun_task", serde_json::json!({"id": task})),
    )?;
    let new = s(&r, &["result", "structuredContent", "task", "id"]).to_string();
    ensure!(!new.is_empty() && new != task, "{r}");
    let got = env.json(&["task", "get", &new])?;
    assert_eq!(s(&got, &["rerunOf"]), task);
    let args = serde_json::json!({"id": sid, "idempotency_key": "mcp"});
    let a = answer(&mut stdin, 3, call(3, "trigger_schedule", args.clone()))?;
    let b = answer(&mut stdin, 4, call(4, "trigger_schedule", args))?;
    let run = s(&a, &["result", "structuredContent", "workflow", "id"]).to_string();
    ensure!(!run.is_empty(), "{a}");
    assert_eq!(
        s(&b, &["result", "structuredContent", "workflow", "id"]),
        run
    );
    assert_eq!(
        b["result"]["structuredContent"]["existing"],
        Value::Bool(true)
    );
    let r = answer(
        &mut stdin,
        5,
        call(5, "rerun_workflow", serde_json::json!({"id": run})),
    )?;
    ensure!(
        !s(&r, &["result", "structuredContent", "workflow", "id"]).is_empty(),
        "{r}"
    );
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
