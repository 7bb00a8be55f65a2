//! Traces end to end: the CLI, a controller and two workers (real processes) export to a
//! test OTLP/gRPC receiver ([`scabbard_tests::otlp`]); a submit's spans from all three
//! form one tree in one trace, which the task's process sees as `TRACEPARENT`. And with no
//! endpoint configured nothing is exported.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use scabbard_common::proto::{
    ContainerStep, ContainerTask, GetWorkflowRequest, RetryPolicy, TaskSpec, TaskState,
    task_spec::Kind,
};
use scabbard_tests::otlp::cluster::*;
use scabbard_tests::otlp::{self, ReceivedSpan, Receiver};
use scabbard_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_cli_through_the_controller_and_a_worker_to_the_task() -> Result<()> {
    let rx = Receiver::start().await?;
    let c = Traced::start(Some(&rx.endpoint()), plain)?;
    c.ready().await?;
    let stderr = c.cli(&["submit", "--wait", "--sh", ECHO]).await?;
    let id = submitted_id(&stderr)?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let task = get(&mut tasks, &id).await?;
    assert_eq!(task.state(), TaskState::Succeeded, "{task:?}");
    // The task's process saw the trace; the controller stored the submitter's context.
    let seen = otlp::printed_traceparent(&logs(&mut tasks, &id, 0, false).await?)?;
    let trace_id = otlp::trace_id_of(&seen)?;
    assert_eq!(otlp::trace_id_of(&task.traceparent)?, trace_id);
    let spans = wait_trace(
        &rx,
        &trace_id,
        &[
            ("scabbard submit", 1),
            ("scabbard.task", 1),
            ("scabbard.attempt", 1),
            ("scabbard.worker.attempt", 1),
            ("scabbard.worker.execute", 1),
            ("scabbard.v1.TaskService/Submit", 1),
        ],
    )
    .await?;
    let t: Vec<&ReceivedSpan> = spans.iter().collect();
    let root = otlp::check_tree(&t)?;
    assert_eq!(
        (root.name.as_str(), root.service.as_str()),
        ("scabbard submit", CLI)
    );
    let svc = services(&t);
    assert!(svc.contains(CLI) && svc.contains(CONTROLLER), "{svc:?}");
    assert!(
        svc.contains("worker-wa") || svc.contains("worker-wb"),
        "{svc:?}"
    );
    // RPC semantic conventions on the server span.
    let submit = named(&t, "scabbard.v1.TaskService/Submit")[0];
    assert_eq!(submit.service, CONTROLLER);
    assert_eq!(submit.kind, 2, "server kind: {submit:?}");
    assert_eq!(submit.attr("rpc.system"), "grpc");
    assert_eq!(submit.attr("rpc.service"), "scabbard.v1.TaskService");
    assert_eq!(submit.attr("rpc.method"), "Submit");
    assert_eq!(submit.attr("rpc.grpc.status_code"), "0");
    assert_eq!(submit.parent_span_id, root.span_id);
    // task → attempt → worker attempt → execute; the process saw the execute span.
    let task_span = named(&t, "scabbard.task")[0];
    let attempt = named(&t, "scabbard.attempt")[0];
    let worker = named(&t, "scabbard.worker.attempt")[0];
    let execute = named(&t, "scabbard.worker.execute")[0];
    assert_eq!(attempt.parent_span_id, task_span.span_id);
    assert_eq!(worker.parent_span_id, attempt.span_id);
    assert_eq!(execute.parent_span_id, worker.span_id);
    assert!(seen.contains(&execute.span_id), "{seen} vs {execute:?}");
    assert!(otlp::descends_from(&t, task_span, &submit.span_id));
    // The worker's log lines about the attempt carry its trace and span ids.
    let line = c
        .worker_logs
        .lock()
        .expect("log lines")
        .iter()
        .find(|l| l.contains("attempt finished") && l.contains(&id))
        .cloned()
        .context("no \"attempt finished\" line in the workers' logs")?;
    let json: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(json["trace_id"], trace_id.as_str(), "{line}");
    assert_eq!(json["span_id"], worker.span_id.as_str(), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_task_keeps_both_attempts_in_the_submitters_trace() -> Result<()> {
    let rx = Receiver::start().await?;
    let c = Traced::start(Some(&rx.endpoint()), plain)?;
    c.ready().await?;
    // A client of our own (not traced) sends its context as gRPC metadata.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let marker = c.dir.path().join("second-time");
    let mut spec = shell(&format!(
        "{ECHO}; if [ -e {m} ]; then echo second; else touch {m}; exit 3; fi",
        m = marker.display()
    ));
    spec.retry = Some(RetryPolicy {
        max_attempts: 2,
        initial_backoff_ms: 100,
        ..Default::default()
    });
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let mut req = tonic::Request::new(scabbard_common::proto::SubmitTaskRequest {
        spec: Some(spec),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", format!("00-{trace_id}-{parent}-01").parse()?);
    let id = tasks
        .submit(req)
        .await?
        .into_inner()
        .task
        .context("task")?
        .id;
    let task = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(task.state(), TaskState::Succeeded, "{task:?}");
    assert_eq!(task.attempts.len(), 2, "{task:?}");
    for n in 1..=2 {
        let seen = otlp::printed_traceparent(&logs(&mut tasks, &id, n, false).await?)?;
        assert_eq!(otlp::trace_id_of(&seen)?, trace_id, "attempt {n}");
    }
    let spans = wait_trace(
        &rx,
        trace_id,
        &[
            ("scabbard.task", 1),
            ("scabbard.attempt", 2),
            ("scabbard.worker.attempt", 2),
            ("scabbard.worker.execute", 2),
        ],
    )
    .await?;
    let t: Vec<&ReceivedSpan> = spans.iter().collect();
    // Rooted in the client's span (not exported): only the Submit span hangs from it.
    let from_client: Vec<_> = t.iter().filter(|s| s.parent_span_id == parent).collect();
    assert_eq!(from_client.len(), 1, "{}", otlp::describe(&spans));
    assert_eq!(from_client[0].name, "scabbard.v1.TaskService/Submit");
    let task_span = named(&t, "scabbard.task")[0];
    let attempts = named(&t, "scabbard.attempt");
    assert_eq!(attempts.len(), 2, "{}", otlp::describe(&spans));
    let numbers: BTreeSet<&str> = attempts
        .iter()
        .map(|a| a.attr("scabbard.attempt"))
        .collect();
    assert_eq!(numbers, BTreeSet::from(["1", "2"]));
    for a in &attempts {
        assert_eq!(a.parent_span_id, task_span.span_id, "{a:?}");
    }
    for s in &t {
        assert!(
            s.parent_span_id == parent || otlp::descends_from(&t, s, &from_client[0].span_id),
            "{s:?} is outside the tree:\n{}",
            otlp::describe(&spans)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_is_one_trace_with_its_nodes_under_the_workflow_span() -> Result<()> {
    let rx = Receiver::start().await?;
    let c = Traced::start(Some(&rx.endpoint()), plain)?;
    c.ready().await?;
    let file = c.dir.path().join("wf.yaml");
    std::fs::write(
        &file,
        format!(
            "name: traced\ntasks:\n  - {{name: a, shell: {{command: [sh, -c, '{ECHO}']}}}}\n  - {{name: b, depends_on: [a], shell: {{command: [sh, -c, '{ECHO}']}}}}\n  - {{name: c, depends_on: [a], shell: {{command: [sh, -c, '{ECHO}']}}}}\n"
        ),
    )?;
    let stderr = c
        .cli(&[
            "workflow",
            "submit",
            "--wait",
            "-f",
            &file.to_string_lossy(),
        ])
        .await?;
    let wf_id = submitted_id(&stderr)?;
    let mut wf = scabbard_common::proto::workflow_service_client::WorkflowServiceClient::new(
        admin_channel(&c.addr.to_string()).await?,
    );
    let w = wf
        .get(GetWorkflowRequest { id: wf_id.clone() })
        .await?
        .into_inner();
    let trace_id = otlp::trace_id_of(&w.traceparent)?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    for n in &w.nodes {
        let seen = otlp::printed_traceparent(&logs(&mut tasks, &n.task_id, 0, false).await?)?;
        assert_eq!(otlp::trace_id_of(&seen)?, trace_id, "node {}", n.name);
    }
    let spans = wait_trace(
        &rx,
        &trace_id,
        &[
            ("scabbard workflow submit", 1),
            ("scabbard.workflow", 1),
            ("scabbard.workflow.node", 3),
            ("scabbard.v1.WorkflowService/Submit", 1),
            ("scabbard.attempt", 3),
            ("scabbard.worker.attempt", 3),
            ("scabbard.worker.execute", 3),
        ],
    )
    .await?;
    let t: Vec<&ReceivedSpan> = spans.iter().collect();
    let root = otlp::check_tree(&t)?;
    assert_eq!(root.service, CLI);
    let workflow = named(&t, "scabbard.workflow")[0];
    assert_eq!(workflow.service, CONTROLLER);
    let nodes = named(&t, "scabbard.workflow.node");
    let names: BTreeSet<&str> = nodes
        .iter()
        .map(|n| n.attr("scabbard.workflow.node"))
        .collect();
    assert_eq!(names, BTreeSet::from(["a", "b", "c"]));
    for n in &nodes {
        assert_eq!(n.parent_span_id, workflow.span_id, "{n:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_exported_without_an_endpoint() -> Result<()> {
    let rx = Receiver::start().await?;
    // The receiver is up and every process has a service name, but no endpoint.
    let c = Traced::start(None, plain)?;
    c.ready().await?;
    let stderr = c.cli(&["submit", "--wait", "--sh", ECHO]).await?;
    let id = submitted_id(&stderr)?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let task = get(&mut tasks, &id).await?;
    assert_eq!(task.state(), TaskState::Succeeded, "{task:?}");
    // No context anywhere: none stored, none given to the task.
    assert_eq!(task.traceparent, "");
    let text = logs(&mut tasks, &id, 0, false).await?;
    assert_eq!(text.trim(), "TRACEPARENT=", "{text:?}");
    // Absence can only be shown over a time: 20 export intervals of the processes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(rx.spans().is_empty(), "{}", otlp::describe(&rx.spans()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dagger_session_starts_with_the_tasks_traceparent_and_the_otel_variables() -> Result<()> {
    let rx = Receiver::start().await?;
    let c = Traced::start(Some(&rx.endpoint()), with_fake_engine)?;
    c.ready().await?;
    for name in ["wa", "wb"] {
        wait_agent(&c.addr.to_string(), &format!("{name} with dagger"), |a| {
            a.name == name && a.capabilities.iter().any(|c| c == "dagger")
        })
        .await?;
    }
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let spec = TaskSpec {
        kind: Some(Kind::Container(ContainerTask {
            image: "alpine:3.20".into(),
            steps: vec![ContainerStep {
                args: vec!["sh".into(), "-c".into(), "echo built".into()],
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let mut req = tonic::Request::new(scabbard_common::proto::SubmitTaskRequest {
        spec: Some(spec),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-b7ad6b7169203331-01").parse()?,
    );
    let id = tasks
        .submit(req)
        .await?
        .into_inner()
        .task
        .context("task")?
        .id;
    let task = wait_state(&mut tasks, &id, None, T).await?;
    let log = logs(&mut tasks, &id, 0, false).await?;
    assert_eq!(task.state(), TaskState::Succeeded, "{task:?}\n{log}");
    // The fake engine's session prints the environment it was started with.
    let seen = otlp::printed_traceparent(&log)?;
    assert_eq!(otlp::trace_id_of(&seen)?, trace_id, "{log}");
    assert!(
        log.contains(&format!("OTEL_EXPORTER_OTLP_ENDPOINT={}", rx.endpoint())),
        "{log}"
    );
    let spans = wait_trace(
        &rx,
        trace_id,
        &[("scabbard.worker.execute", 1), ("scabbard.worker.step", 1)],
    )
    .await?;
    let execute = spans
        .iter()
        .find(|s| s.name == "scabbard.worker.execute")
        .context("execute span")?;
    assert!(seen.contains(&execute.span_id), "{seen} vs {execute:?}");
    // The container's step has its span under the execute span.
    let step = spans
        .iter()
        .find(|s| s.name == "scabbard.worker.step")
        .context("step span")?;
    assert_eq!(step.parent_span_id, execute.span_id, "{step:?}");
    assert_eq!(step.attr("scabbard.exit_code"), "0", "{step:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_telemetry_section_of_the_config_files_configures_the_daemons() -> Result<()> {
    let rx = Receiver::start().await?;
    let dir = tempfile::tempdir()?;
    let section = |service: &str| {
        format!(
            "[telemetry]\notlp_endpoint = {:?}\nservice_name = {service:?}\nsampler = \"parentbased_always_on\"\n",
            rx.endpoint()
        )
    };
    let ctl_config = dir.path().join("controller.toml");
    std::fs::write(&ctl_config, section("ctl-from-config"))?;
    let mut cmd = Command::new(scabbard_bin());
    cmd.args(["controller", "--listen", "127.0.0.1:0"])
        .args(["--registration-token", TOKEN, "--config"])
        .arg(&ctl_config)
        .arg("--data-dir")
        .arg(dir.path().join("controller"))
        .env("SCABBARD_LOG", process_log_level())
        .env("SCABBARD_BOOTSTRAP_TOKEN", ADMIN_TOKEN)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let _ctl = Proc::new(child, "controller");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("controller did not start: {line:?}"))?
        .to_string();
    let worker_config = dir.path().join("worker.toml");
    std::fs::write(&worker_config, section("worker-from-config"))?;
    let mut cmd = Command::new(scabbard_bin());
    cmd.arg("worker")
        .arg("--config")
        .arg(&worker_config)
        .args(["--controller", &addr, "--registration-token", TOKEN])
        .args(["--name", "wc"])
        .arg("--data-dir")
        .arg(dir.path().join("wc"))
        .env("SCABBARD_LOG", process_log_level())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let _worker = Proc::new(cmd.spawn()?, "wc");
    wait_agent(&addr, "worker wc", |a| a.name == "wc").await?;
    let trace_id = "5e1e3b6f0c8d4a2b9f7e6d5c4b3a2918";
    let mut tasks = tasks_client(&addr).await?;
    let mut req = tonic::Request::new(scabbard_common::proto::SubmitTaskRequest {
        spec: Some(shell(ECHO)),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-1111111111111111-01").parse()?,
    );
    let id = tasks
        .submit(req)
        .await?
        .into_inner()
        .task
        .context("task")?
        .id;
    let task = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(task.state(), TaskState::Succeeded, "{task:?}");
    let spans = wait_trace(
        &rx,
        trace_id,
        &[("scabbard.task", 1), ("scabbard.worker.execute", 1)],
    )
    .await?;
    let t: Vec<&ReceivedSpan> = spans.iter().collect();
    assert_eq!(
        services(&t),
        BTreeSet::from(["ctl-from-config", "worker-from-config"]),
        "{}",
        otlp::describe(&spans)
    );
    // A failed call's server span carries its gRPC status code.
    let missing = "5e1e3b6f0c8d4a2b9f7e6d5c4b3a2919";
    let mut req = tonic::Request::new(scabbard_common::proto::GetTaskRequest {
        id: "01jzzzzzzzzzzzzzzzzzzzzzzz".into(),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{missing}-2222222222222222-01").parse()?,
    );
    let err = tasks.get(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let spans = wait_trace(&rx, missing, &[("scabbard.v1.TaskService/Get", 1)]).await?;
    let get = &spans[0];
    assert_eq!(get.attr("rpc.grpc.status_code"), "5", "{get:?}");
    assert_eq!(get.parent_span_id, "2222222222222222", "{get:?}");
    assert_eq!(get.kind, 2, "{get:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_stays_in_its_trace_across_a_controller_restart() -> Result<()> {
    let rx = Receiver::start().await?;
    let mut c = Traced::start(Some(&rx.endpoint()), plain)?;
    c.ready().await?;
    let trace_id = "7d3c2b1a0f9e8d7c6b5a493827161504";
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let mut req = tonic::Request::new(scabbard_common::proto::SubmitTaskRequest {
        spec: Some(shell(&format!("{ECHO}; sleep 2"))),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-3333333333333333-01").parse()?,
    );
    let id = tasks
        .submit(req)
        .await?
        .into_inner()
        .task
        .context("task")?
        .id;
    wait_state(&mut tasks, &id, Some(TaskState::Running), T).await?;
    let before = wait_trace(&rx, trace_id, &[("scabbard.v1.TaskService/Submit", 1)]).await?;
    let submit = before
        .iter()
        .find(|s| s.name == "scabbard.v1.TaskService/Submit")
        .context("submit span")?
        .clone();
    assert_eq!(submit.parent_span_id, "3333333333333333", "{submit:?}");
    // The controller that took the submit dies before the task ends; the next one reads
    // the task's trace context from the store.
    c.restart_controller()?;
    let mut tasks = tasks_client(&c.addr.to_string()).await?;
    let task = wait_state(&mut tasks, &id, None, T).await?;
    assert_eq!(task.state(), TaskState::Succeeded, "{task:?}");
    assert_eq!(otlp::trace_id_of(&task.traceparent)?, trace_id);
    let spans = wait_trace(
        &rx,
        trace_id,
        &[
            ("scabbard.task", 1),
            ("scabbard.attempt", 1),
            ("scabbard.worker.attempt", 1),
        ],
    )
    .await?;
    let t: Vec<&ReceivedSpan> = spans.iter().collect();
    let task_span = named(&t, "scabbard.task")[0];
    // Stored at submit: the Submit call's server span, on the controller that died.
    assert_eq!(task_span.parent_span_id, submit.span_id, "{task_span:?}");
    for a in named(&t, "scabbard.attempt") {
        assert_eq!(a.parent_span_id, task_span.span_id, "{a:?}");
    }
    // The worker's spans of the attempt hang under the attempt span the restarted
    // controller emitted.
    let worker = named(&t, "scabbard.worker.attempt");
    assert!(!worker.is_empty(), "{}", otlp::describe(&spans));
    for w in worker {
        assert!(
            named(&t, "scabbard.attempt")
                .iter()
                .any(|a| a.span_id == w.parent_span_id),
            "{w:?} has no attempt span parent:\n{}",
            otlp::describe(&spans)
        );
    }
    Ok(())
}
