//! Workflows end to end: real controller and worker processes running DAGs of shell tasks.

use std::time::Duration;

use scabbard_common::proto::{
    CancelWorkflowRequest, ConcurrencyGroup, FailurePolicy, GetTaskRequest, NodeState, OutputSpec,
    SubmitWorkflowRequest, TaskState, WatchWorkflowRequest, WorkflowState, output_spec,
};
use scabbard_tests::wf::*;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_diamond_runs_in_dependency_order_and_passes_outputs_along() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0", "w1"], 2, &[])?;
    let order = c.dir.path().join("order");
    let o = order.display();
    let mut top = node(
        "top",
        &[],
        &format!("echo top >> {o}; echo version=1.2.3 >> \"$SCABBARD_OUTPUT\"; echo sha-abc"),
    );
    top.spec.as_mut().unwrap().outputs = vec![OutputSpec {
        name: "sha".into(),
        source: Some(output_spec::Source::LastStdoutLine(true)),
    }];
    let spec = workflow(
        "diamond",
        vec![
            top,
            node(
                "left",
                &["top"],
                &format!(
                    "sleep 0.3; echo left-${{{{ tasks.top.outputs.version }}}} >> {o}; echo l=L >> \"$SCABBARD_OUTPUT\""
                ),
            ),
            node(
                "right",
                &["top"],
                &format!(
                    "echo right-${{{{ tasks.top.outputs.sha }}}} >> {o}; echo r=R >> \"$SCABBARD_OUTPUT\""
                ),
            ),
            node(
                "bottom",
                &["left", "right"],
                &format!(
                    "echo bottom-${{{{ tasks.left.outputs.l }}}}${{{{ tasks.right.outputs.r }}}}-${{{{ tasks.top.outputs.version }}}} >> {o}"
                ),
            ),
        ],
    );
    let mut wfs = c.workflows().await?;
    let wf = submit_workflow(&mut wfs, spec).await?;
    assert_eq!(wf.total, 4);
    let wf = wait_workflow(&mut wfs, &wf.id, T).await?;
    assert_eq!(wf.state(), WorkflowState::Succeeded, "{wf:#?}");
    assert_eq!((wf.done, wf.total), (4, 4));
    let lines: Vec<String> = std::fs::read_to_string(&order)?
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0], "top");
    assert!(lines[1..3].contains(&"left-1.2.3".to_string()), "{lines:?}");
    assert!(
        lines[1..3].contains(&"right-sha-abc".to_string()),
        "{lines:?}"
    );
    assert_eq!(lines[3], "bottom-LR-1.2.3");
    assert_eq!(node_of(&wf, "top").outputs["version"], "1.2.3");
    // Each node's task started after its dependencies' tasks ended.
    let tasks = tasks_client(&c.addr()).await?;
    let attempt = |id: String| {
        let mut tasks = tasks.clone();
        async move {
            let t = tasks.get(GetTaskRequest { id }).await?.into_inner();
            anyhow::Ok(t.attempts.last().cloned().unwrap())
        }
    };
    let bottom = attempt(node_of(&wf, "bottom").task_id.clone()).await?;
    for dep in ["left", "right"] {
        let a = attempt(node_of(&wf, dep).task_id.clone()).await?;
        assert!(
            a.finished_at_ms <= bottom.assigned_at_ms,
            "{dep} {a:?} vs {bottom:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn fail_fast_cancels_running_siblings_and_skips_dependents() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 4, &[])?;
    let mut wfs = c.workflows().await?;
    let spec = workflow(
        "ff",
        vec![
            node("a", &[], "true"),
            node("boom", &["a"], "sleep 0.2; exit 3"),
            node("slow", &["a"], "sleep 30"),
            node("after", &["boom", "slow"], "true"),
            node("never", &["slow"], "true"),
        ],
    );
    let started = std::time::Instant::now();
    let wf = submit_workflow(&mut wfs, spec).await?;
    let wf = wait_workflow(&mut wfs, &wf.id, T).await?;
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "slow was not cancelled"
    );
    assert_eq!(wf.state(), WorkflowState::Failed, "{wf:#?}");
    assert!(wf.message.contains("boom"), "{}", wf.message);
    assert_eq!(node_of(&wf, "a").state(), NodeState::Succeeded);
    assert_eq!(node_of(&wf, "boom").state(), NodeState::Failed);
    assert_eq!(node_of(&wf, "boom").exit_code, 3);
    assert_eq!(node_of(&wf, "slow").state(), NodeState::Cancelled);
    assert_eq!(node_of(&wf, "after").state(), NodeState::Skipped);
    assert_eq!(node_of(&wf, "never").state(), NodeState::Skipped);
    assert!(node_of(&wf, "after").task_id.is_empty());
    Ok(())
}

#[tokio::test]
async fn continue_policy_finishes_independent_branches() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 4, &[])?;
    let mut wfs = c.workflows().await?;
    let mut spec = workflow(
        "cont",
        vec![
            node("a", &[], "true"),
            node("bad", &["a"], "exit 5"),
            node("dependent", &["bad"], "true"),
            node("good", &["a"], "sleep 0.3"),
            node("good2", &["good"], "true"),
        ],
    );
    spec.failure_policy = FailurePolicy::Continue as i32;
    let wf = submit_workflow(&mut wfs, spec).await?;
    let wf = wait_workflow(&mut wfs, &wf.id, T).await?;
    assert_eq!(wf.state(), WorkflowState::Failed);
    assert_eq!(node_of(&wf, "bad").state(), NodeState::Failed);
    assert_eq!(node_of(&wf, "dependent").state(), NodeState::Skipped);
    assert!(node_of(&wf, "dependent").message.contains("bad"));
    assert_eq!(node_of(&wf, "good").state(), NodeState::Succeeded);
    assert_eq!(node_of(&wf, "good2").state(), NodeState::Succeeded);
    assert_eq!(wf.done, 5);
    Ok(())
}

#[tokio::test]
async fn cancel_stops_running_tasks_and_watch_streams_progress() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 2, &[])?;
    let mut wfs = c.workflows().await?;
    let wf = submit_workflow(
        &mut wfs,
        workflow(
            "to-cancel",
            vec![
                node("quick", &[], "true"),
                node("long", &["quick"], "sleep 60"),
                node("later", &["long"], "true"),
            ],
        ),
    )
    .await?;
    let mut stream = wfs
        .watch(WatchWorkflowRequest {
            id: wf.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    // Wait (through the stream) until `long` runs, then cancel.
    let mut seen_done = Vec::new();
    loop {
        let ev = stream
            .message()
            .await?
            .expect("stream open")
            .workflow
            .unwrap();
        seen_done.push(ev.done);
        if node_of(&ev, "long").state() == NodeState::Running {
            break;
        }
    }
    let cancelled = wfs
        .cancel(CancelWorkflowRequest {
            id: wf.id.clone(),
            reason: "test".into(),
        })
        .await?
        .into_inner();
    assert!(cancelled.cancel_requested);
    let mut last = None;
    while let Some(ev) = stream.message().await? {
        seen_done.push(ev.workflow.as_ref().unwrap().done);
        last = ev.workflow;
    }
    let last = last.expect("a final event");
    assert_eq!(last.state(), WorkflowState::Cancelled, "{last:#?}");
    assert_eq!(node_of(&last, "long").state(), NodeState::Cancelled);
    assert_eq!(node_of(&last, "later").state(), NodeState::Skipped);
    assert_eq!(last.done, 3);
    assert!(seen_done.windows(2).all(|w| w[0] <= w[1]), "{seen_done:?}");
    let again = wfs
        .cancel(CancelWorkflowRequest {
            id: wf.id.clone(),
            reason: String::new(),
        })
        .await;
    assert_eq!(code_and_message(again).0, tonic::Code::FailedPrecondition);
    Ok(())
}

#[tokio::test]
async fn bad_workflows_are_refused_naming_the_tasks() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let mut wfs = scabbard_common::proto::workflow_service_client::WorkflowServiceClient::new(
        c.channel(ADMIN_TOKEN).await?,
    );
    let cases = [
        (workflow("empty", vec![]), "no tasks"),
        (
            workflow("cyc", vec![node("a", &["b"], "x"), node("b", &["a"], "x")]),
            "cycle",
        ),
        (
            workflow("unknown", vec![node("a", &["ghost"], "x")]),
            "task a depends on unknown task(s): ghost",
        ),
        (
            workflow("dup", vec![node("x", &[], "x"), node("x", &[], "y")]),
            "duplicate task names: x",
        ),
        (
            workflow(
                "ref",
                vec![
                    node("a", &[], "x"),
                    node("b", &[], "${{ tasks.a.outputs.v }}"),
                ],
            ),
            "tasks.a.outputs.v",
        ),
    ];
    for (spec, expect) in cases {
        let r = wfs
            .submit(SubmitWorkflowRequest {
                spec: Some(spec),
                ..Default::default()
            })
            .await;
        let (code, msg) = code_and_message(r);
        assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");
        assert!(msg.contains(expect), "{expect}: {msg}");
    }
    let r = wfs.submit(SubmitWorkflowRequest::default()).await;
    assert_eq!(code_and_message(r).0, tonic::Code::InvalidArgument);
    Ok(())
}

#[tokio::test]
async fn workflow_concurrency_group_runs_one_at_a_time() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 4, &[])?;
    let mut wfs = c.workflows().await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut spec = workflow(
            &format!("deploy-{i}"),
            vec![node("deploy", &[], "sleep 0.3")],
        );
        spec.concurrency = Some(ConcurrencyGroup {
            key: "deploy-prod".into(),
            limit: 1,
        });
        let wf = submit_workflow(&mut wfs, spec).await?;
        let expect = if i == 0 {
            WorkflowState::Running
        } else {
            WorkflowState::Pending
        };
        assert_eq!(wf.state(), expect);
        ids.push(wf.id);
    }
    let mut spans = Vec::new();
    for id in &ids {
        let wf = wait_workflow(&mut wfs, id, T).await?;
        assert_eq!(wf.state(), WorkflowState::Succeeded);
        let mut tasks = tasks_client(&c.addr()).await?;
        let t = get(&mut tasks, &wf.nodes[0].task_id).await?;
        assert_eq!(t.state(), TaskState::Succeeded);
        let a = t.attempts[0].clone();
        spans.push((a.assigned_at_ms, a.finished_at_ms));
    }
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "runs overlap: {spans:?}");
    }
    Ok(())
}

#[tokio::test]
async fn the_cli_submits_a_workflow_file_waits_and_shows_the_tree() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 2, &[])?;
    let _ = c.workflows().await?; // the controller answers
    let file = c.dir.path().join("wf.yaml");
    std::fs::write(
        &file,
        r#"
name: cli-dag
tasks:
  - {name: version, shell: {command: [sh, -c, 'echo "v=9" >> "$SCABBARD_OUTPUT"']}}
  - {name: build, depends_on: [version], shell: {command: [sh, -c, 'echo build ${{ tasks.version.outputs.v }}']}}
  - {name: test, depends_on: [version], noop: {}}
"#,
    )?;
    let cfg = tempfile::tempdir()?;
    let out = cli(cfg.path())
        .args([
            "workflow",
            "submit",
            "--controller",
            &c.addr(),
            "--wait",
            "-f",
        ])
        .arg(&file)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    // With --wait the id goes to stderr ("submitted <id>", then the outcome).
    let id = stderr
        .split_whitespace()
        .find(|w| w.len() == 26)
        .expect("a workflow id")
        .to_string();
    let out = cli(cfg.path())
        .args(["workflow", "get", &id, "--controller", &c.addr()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for name in ["version", "build", "test"] {
        assert!(text.contains(name), "{text}");
    }
    assert!(text.to_lowercase().contains("succeeded"), "{text}");
    // A broken file is refused before anything is sent, naming the field.
    std::fs::write(
        &file,
        "tasks:\n  - {name: a, shell: {command: [x]}, retry: {jitter: 2}}\n",
    )?;
    let out = cli(cfg.path())
        .args(["workflow", "submit", "--controller", &c.addr(), "-f"])
        .arg(&file)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jitter"), "{err}");
    Ok(())
}

#[tokio::test]
async fn node_secrets_are_sealed_masked_and_reach_only_the_task() -> anyhow::Result<()> {
    let c = Cluster::start(&["w0"], 2, &[])?;
    let mut wfs = c.workflows().await?;
    let mut n = node(
        "deploy",
        &[],
        "[ \"$TOKEN\" = hunter2-secret ] && echo token ok: $TOKEN",
    );
    n.spec
        .as_mut()
        .unwrap()
        .secret_env
        .insert("TOKEN".into(), "hunter2-secret".into());
    let wf = submit_workflow(&mut wfs, workflow("secret", vec![n])).await?;
    let shown = wf.spec.as_ref().unwrap().tasks[0].spec.as_ref().unwrap();
    assert_eq!(shown.secret_env["TOKEN"], "***");
    let done = wait_workflow(&mut wfs, &wf.id, T).await?;
    assert_eq!(done.state(), WorkflowState::Succeeded, "{done:#?}");
    assert_eq!(
        done.spec.as_ref().unwrap().tasks[0]
            .spec
            .as_ref()
            .unwrap()
            .secret_env["TOKEN"],
        "***"
    );
    let mut tasks = tasks_client(&c.addr()).await?;
    let log = logs(&mut tasks, &done.nodes[0].task_id, 0, false).await?;
    assert!(
        log.contains("token ok") && !log.contains("hunter2"),
        "{log}"
    );
    let t = get(&mut tasks, &done.nodes[0].task_id).await?;
    assert_eq!(t.spec.unwrap().secret_env["TOKEN"], "***");
    Ok(())
}
