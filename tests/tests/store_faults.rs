//! Store faults, injected with a fault-injecting wrapper around the real embedded store,
//! with a real worker process: a write the store refuses fails only its own task (the rest
//! of its batch commits, nobody else notices), and a store outage ends the leader's term —
//! health says NOT_SERVING, and once the store is back a new term rebuilds from it, issues
//! fencing tokens above every earlier one, and nothing acknowledged is lost.

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::proto::{ListTasksRequest, Scope, SubmitTaskRequest, TaskState};
use scabbard_controller::store::faults::FaultyStore;
use scabbard_controller::store::{EmbeddedStore, Store};
use scabbard_tests::sec::*;
use scabbard_tests::*;
use tonic::Code;

const T: Duration = Duration::from_secs(30);
/// What a poisoned record carries; task specs spell it so that only outputs contain it.
const MARKER: &[u8] = b"POISON-RESULT";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn term(store: &FaultyStore) -> u64 {
    let kv = store.get("meta/term").await.unwrap().expect("a term");
    String::from_utf8(kv.value).unwrap().parse().unwrap()
}

async fn health(addr: &str) -> Option<i32> {
    let ch = scabbard_common::client::connect(addr).await.ok()?;
    let r = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status)
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

struct Rig {
    faulty: Arc<FaultyStore>,
    c: InProc,
    _worker: Worker,
    _dir: tempfile::TempDir,
    alpha: Tasks,
    beta: Tasks,
}

async fn rig() -> anyhow::Result<Rig> {
    let dir = tempfile::tempdir()?;
    let inner: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("state.redb"))?;
    let faulty = FaultyStore::new(inner);
    let c = InProc::start_on(faulty.clone(), |_| {}).await?;
    eventually("the controller leads", T, || async {
        (health(&c.addr()).await == Some(SERVING)).then_some(())
    })
    .await?;
    create_project(&c, "alpha", None).await?;
    create_project(&c, "beta", None).await?;
    let (_, a) = api_token(&c, "alpha", Scope::Submit, 0).await?;
    let (_, b) = api_token(&c, "beta", Scope::Submit, 0).await?;
    let worker = Worker::start(&c.addr(), &dir.path().join("w"), "w", 4)?;
    wait_agent(&c.addr(), "the worker", |a| a.name == "w").await?;
    Ok(Rig {
        alpha: tasks_as(&c, &a).await?,
        beta: tasks_as(&c, &b).await?,
        faulty,
        c,
        _worker: worker,
        _dir: dir,
    })
}

fn request(project: &str, script: &str) -> SubmitTaskRequest {
    SubmitTaskRequest {
        spec: Some(shell(script)),
        idempotency_key: String::new(),
        project: project.into(),
    }
}

async fn submit_as(c: &mut Tasks, project: &str, script: &str) -> anyhow::Result<String> {
    Ok(c.submit(request(project, script))
        .await?
        .into_inner()
        .task
        .unwrap()
        .id)
}

#[tokio::test]
async fn a_write_the_store_refuses_fails_only_its_own_task() -> anyhow::Result<()> {
    let mut r = rig().await?;
    let before = term(&r.faulty).await;
    r.faulty
        .refuse_puts(|key, value| key.starts_with("tasks/") && contains(value, MARKER));

    // Its result makes the record unstorable: the spec only spells the marker.
    let poisoned = submit_as(
        &mut r.alpha,
        "alpha",
        r#"echo "out=POISON-$(echo RESULT)" >> "$SCABBARD_OUTPUT""#,
    )
    .await?;
    let mut others = Vec::new();
    for _ in 0..10 {
        others.push(submit_as(&mut r.beta, "beta", "true").await?);
    }
    // Get reads the leader's memory, which may show the refused transition for the moment
    // before the refusal is handled: wait for the outcome that is stored.
    let t = wait_state(&mut r.alpha, &poisoned, Some(TaskState::Failed), T).await?;
    let result = t.result.clone().unwrap();
    assert!(
        result.message.contains("could not be stored") && result.message.contains("refused"),
        "{result:?}"
    );
    assert!(
        t.attempts
            .iter()
            .all(|a| a.result.as_ref().is_none_or(|r| r.outputs.is_empty())),
        "{t:?}"
    );
    for id in &others {
        let t = wait_state(&mut r.beta, id, Some(TaskState::Succeeded), T).await?;
        assert_eq!(t.attempts.len(), 1, "{t:?}");
    }
    // The term went on: no rebuild, no reset sessions.
    assert_eq!(term(&r.faulty).await, before);
    let agent = wait_agent(&r.c.addr(), "the worker", |a| a.name == "w").await?;
    assert_eq!(
        agent.status,
        scabbard_common::proto::AgentStatus::Connected as i32
    );
    assert!(r.faulty.refused() >= 1);

    // A submit whose own record is refused gets INVALID_ARGUMENT, and nothing is left.
    let err = r
        .alpha
        .submit(request("alpha", "echo POISON-RESULT"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("refused"), "{err:?}");
    let listed = r
        .alpha
        .list(ListTasksRequest {
            project: "alpha".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .tasks;
    assert_eq!(listed.len(), 1, "only the first alpha task: {listed:?}");
    // And the others still run at once.
    let id = submit_as(&mut r.beta, "beta", "true").await?;
    wait_state(&mut r.beta, &id, Some(TaskState::Succeeded), T).await?;
    assert_eq!(term(&r.faulty).await, before);
    Ok(())
}

#[tokio::test]
async fn a_store_outage_ends_the_term_and_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let mut r = rig().await?;
    let before = term(&r.faulty).await;
    let mut acked = Vec::new();
    for _ in 0..20 {
        acked.push(submit_as(&mut r.alpha, "alpha", "sleep 0.2").await?);
    }
    r.faulty.set_outage(true);
    eventually("health NOT_SERVING during the outage", T, || async {
        (health(&r.c.addr()).await == Some(NOT_SERVING)).then_some(())
    })
    .await?;
    let err = r
        .beta
        .submit(request("beta", "true"))
        .await
        .expect_err("no leader during the outage");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(r.faulty.failed() >= 1);

    r.faulty.set_outage(false);
    eventually("health SERVING again", T, || async {
        (health(&r.c.addr()).await == Some(SERVING)).then_some(())
    })
    .await?;
    let after = term(&r.faulty).await;
    assert!(after > before, "a new term: {before} -> {after}");
    for id in &acked {
        let t = wait_state(&mut r.alpha, id, Some(TaskState::Succeeded), T * 2).await?;
        // Tokens are unique across terms: the term is their high half.
        let mut tokens: Vec<u64> = t.attempts.iter().map(|a| a.fencing_token).collect();
        assert!(tokens.iter().all(|tok| (tok >> 32) >= before), "{t:?}");
        tokens.dedup();
        assert_eq!(tokens.len(), t.attempts.len(), "{t:?}");
    }
    let id = submit_as(&mut r.beta, "beta", "true").await?;
    let t = wait_state(&mut r.beta, &id, Some(TaskState::Succeeded), T).await?;
    assert_eq!(t.attempts[0].fencing_token >> 32, after);
    Ok(())
}
