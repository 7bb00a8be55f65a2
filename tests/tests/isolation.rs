//! Projects sharing workers, end to end through a real controller and workers on the fake
//! Dagger engine: a worker's secret sources and registry credentials serve only the
//! projects their allowlist names (and their values never reach another project's task),
//! cache volumes are per project unless shared, and an agent registered with a
//! project-bound registration token only ever gets that project's tasks.

use std::time::Duration;

use scabbard_common::proto::{
    CacheMount, ContainerStep, ContainerTask, CreateProjectRequest, CreateTokenRequest, ErrorClass,
    Project, Requirements, SecretRef, SubmitTaskRequest, TaskSpec, TaskState, TokenKind,
    admin_service_client::AdminServiceClient, project_service_client::ProjectServiceClient,
    task_spec::Kind,
};
use scabbard_tests::fleet::*;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(60);
const SECRET: &str = "deploy-s3cr3t-only-for-b";

fn container(steps: &[&str]) -> ContainerTask {
    ContainerTask {
        image: "alpine:3.20".into(),
        steps: steps
            .iter()
            .map(|s| ContainerStep {
                args: vec!["sh".into(), "-c".into(), s.to_string()],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn spec(c: ContainerTask) -> TaskSpec {
    TaskSpec {
        kind: Some(Kind::Container(c)),
        ..Default::default()
    }
}

async fn submit_in(tasks: &mut Tasks, project: &str, spec: TaskSpec) -> anyhow::Result<String> {
    Ok(tasks
        .submit(SubmitTaskRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
            project: project.into(),
        })
        .await?
        .into_inner()
        .task
        .expect("task")
        .id)
}

async fn projects(fleet: &Fleet, names: &[&str]) -> anyhow::Result<()> {
    let mut p = ProjectServiceClient::new(fleet.channel(ADMIN_TOKEN).await?);
    for name in names {
        p.create(CreateProjectRequest {
            project: Some(Project {
                name: name.to_string(),
                ..Default::default()
            }),
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn secrets_registries_and_caches_are_per_project() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("deploy");
    write_private(&secret_file, SECRET)?;
    let password_file = dir.path().join("registry");
    write_private(&password_file, "registry-pw")?;
    let worker = WorkerSpec::named("shared").dagger(&format!(
        r#"[dagger.secrets]
deploy = {{ file = {secret:?}, projects = ["b"] }}
[dagger.registries."registry.test"]
username = "bot"
password_file = {password:?}
projects = ["b"]
"#,
        secret = secret_file.display().to_string(),
        password = password_file.display().to_string(),
    ));
    let fleet = Fleet::start(Vec::new(), vec![worker]).await?;
    projects(&fleet, &["a", "b"]).await?;
    let mut tasks = fleet.tasks().await?;

    // The secret: refused to A as the task's own failure, without the value.
    let mut c = container(&["echo token=$TOKEN"]);
    c.secrets.push(SecretRef {
        env: "TOKEN".into(),
        source: "deploy".into(),
    });
    let a = submit_in(&mut tasks, "a", spec(c.clone())).await?;
    let t = wait_state(&mut tasks, &a, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let r = t.result.clone().unwrap();
    assert_eq!(r.error_class(), ErrorClass::User, "{r:?}");
    assert!(
        r.message.contains("secret source 'deploy'") && r.message.contains("project 'a'"),
        "the message names the source and the project: {}",
        r.message
    );
    let log = logs(&mut tasks, &a, 0, false).await?;
    assert!(
        !log.contains(SECRET) && !format!("{t:?}").contains(SECRET),
        "{log}"
    );
    // B may use it; its value reaches the container (masked in the log).
    let b = submit_in(&mut tasks, "b", spec(c)).await?;
    let t = expect_succeeded(&mut tasks, &b, T).await?;
    let log = logs(&mut tasks, &b, 0, false).await?;
    assert!(log.contains("token=***"), "{log}");
    assert!(!log.contains(SECRET) && !format!("{t:?}").contains(SECRET));

    // Registry credentials, the same way.
    let mut c = container(&["true"]);
    c.registry_auth = "registry.test".into();
    let a = submit_in(&mut tasks, "a", spec(c)).await?;
    let t = wait_state(&mut tasks, &a, None, T).await?;
    assert_eq!(t.state(), TaskState::Failed, "{t:?}");
    let r = t.result.unwrap();
    assert_eq!(r.error_class(), ErrorClass::User);
    assert!(
        r.message.contains("registry.test") && r.message.contains("project 'a'"),
        "{}",
        r.message
    );
    assert!(!r.message.contains("registry-pw"));

    // Cache volume `gomod`: one per project.
    let with_cache = |script: &str| {
        let mut c = container(&[script]);
        c.caches.push(CacheMount {
            volume: "gomod".into(),
            path: "/go/pkg/mod".into(),
            sharing: 0,
        });
        spec(c)
    };
    let a = submit_in(
        &mut tasks,
        "a",
        with_cache("echo from-a > /go/pkg/mod/owner"),
    )
    .await?;
    expect_succeeded(&mut tasks, &a, T).await?;
    let b = submit_in(
        &mut tasks,
        "b",
        with_cache("test ! -e /go/pkg/mod/owner && echo from-b > /go/pkg/mod/owner"),
    )
    .await?;
    expect_succeeded(&mut tasks, &b, T).await?;
    let again = submit_in(
        &mut tasks,
        "a",
        with_cache("test \"$(cat /go/pkg/mod/owner)\" = from-a"),
    )
    .await?;
    expect_succeeded(&mut tasks, &again, T).await?;
    let engine = &fleet.worker("shared").engine;
    let volumes = engine.cache_volumes()?;
    assert!(
        volumes.contains(&"a/gomod".to_string()) && volumes.contains(&"b/gomod".to_string()),
        "{volumes:?}"
    );
    assert!(!volumes.contains(&"gomod".to_string()), "{volumes:?}");
    Ok(())
}

#[tokio::test]
async fn a_project_bound_agent_only_gets_its_projects_tasks() -> anyhow::Result<()> {
    let mut fleet = Fleet::start(Vec::new(), vec![WorkerSpec::named("open").slots(4)]).await?;
    projects(&fleet, &["a", "b"]).await?;
    let mut admin = AdminServiceClient::new(fleet.channel(ADMIN_TOKEN).await?);
    let token = admin
        .create_token(CreateTokenRequest {
            kind: TokenKind::Registration as i32,
            name: "b-runners".into(),
            project: "b".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    let mut bound = WorkerSpec::named("b-runner").slots(4);
    bound.registration_token = Some(token);
    fleet.add(bound).await?;
    let agent = wait_agent(&fleet.addr(), "the bound agent", |a| a.name == "b-runner").await?;
    assert_eq!(agent.project, "b");

    let mut tasks = fleet.tasks().await?;
    // Many of A's tasks: none lands on the bound agent, even with its slots free.
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(submit_in(&mut tasks, "a", spec(container(&[&format!("echo a{i}")]))).await?);
    }
    for id in &ids {
        let t = expect_succeeded(&mut tasks, id, T).await?;
        assert_eq!(fleet.worker_name(ran_on(&t)), "open", "{t:?}");
    }
    // B's tasks may go there.
    let mut pinned = spec(container(&["echo b"]));
    pinned.requirements = Some(Requirements {
        labels: [("name".to_string(), "b-runner".to_string())].into(),
        ..Default::default()
    });
    let b = submit_in(&mut tasks, "b", pinned.clone()).await?;
    let t = expect_succeeded(&mut tasks, &b, T).await?;
    assert_eq!(fleet.worker_name(ran_on(&t)), "b-runner");
    // An A task that only the bound agent's labels match waits: it is never given to it.
    let a = submit_in(&mut tasks, "a", pinned).await?;
    let b2 = submit_in(&mut tasks, "b", spec(container(&["echo b2"]))).await?;
    expect_succeeded(&mut tasks, &b2, T).await?;
    let t = get(&mut tasks, &a).await?;
    assert_eq!(t.state(), TaskState::Queued, "{t:?}");
    assert!(t.attempts.is_empty());
    Ok(())
}
