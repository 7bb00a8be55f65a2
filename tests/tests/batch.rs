//! `TaskService/SubmitBatch`: one answer per entry, in order; each entry is validated,
//! authorised and deduplicated exactly as a `Submit` of its own.

use scabbard_common::proto::{
    GetTaskRequest, ProjectQuota, Scope, SubmitBatchRequest, SubmitTaskRequest, TaskSpec,
};
use scabbard_tests::sec::*;
use scabbard_tests::*;
use tonic::Code;

fn keyed(project: &str, key: &str) -> SubmitTaskRequest {
    SubmitTaskRequest {
        idempotency_key: key.into(),
        ..noop_submit(project)
    }
}

#[tokio::test]
async fn each_entry_gets_its_own_answer_in_order() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    create_project(&c, "alpha", None).await?;
    create_project(&c, "beta", None).await?;
    let (_, alpha) = api_token(&c, "alpha", Scope::Submit, 0).await?;
    let mut tasks = tasks_as(&c, &alpha).await?;
    let first = tasks.submit(keyed("alpha", "k-old")).await?.into_inner();
    let old_id = first.task.unwrap().id;

    let entries = vec![
        keyed("alpha", "k1"),
        // No spec: refused alone.
        SubmitTaskRequest {
            spec: None,
            ..noop_submit("alpha")
        },
        // A spec Submit refuses (no kind).
        SubmitTaskRequest {
            spec: Some(TaskSpec::default()),
            ..noop_submit("alpha")
        },
        // Another project than the token's.
        noop_submit("beta"),
        // The same key twice in one batch, and a key submitted before.
        keyed("alpha", "k1"),
        keyed("alpha", "k-old"),
        noop_submit(""),
        SubmitTaskRequest {
            idempotency_key: "x".repeat(300),
            ..noop_submit("alpha")
        },
    ];
    let n = entries.len();
    let r = tasks
        .submit_batch(SubmitBatchRequest { tasks: entries })
        .await?
        .into_inner()
        .results;
    assert_eq!(r.len(), n);
    let ok = |i: usize| {
        assert!(r[i].error.is_none(), "entry {i}: {:?}", r[i].error);
        r[i].task.clone().expect("a task")
    };
    let err = |i: usize| {
        assert!(r[i].task.is_none(), "entry {i} should be refused");
        let e = r[i].error.clone().expect("an error");
        (Code::from_i32(e.code), e.message)
    };
    let t0 = ok(0);
    assert!(!r[0].existing);
    assert_eq!(t0.project, "alpha");
    let (code, msg) = err(1);
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("spec is required"), "{msg}");
    assert_eq!(err(2).0, Code::InvalidArgument, "{:?}", err(2));
    assert_eq!(err(3).0, Code::PermissionDenied, "{:?}", err(3));
    // Per-entry idempotency: within the batch and across calls.
    assert_eq!(ok(4).id, t0.id);
    assert!(r[4].existing);
    assert_eq!(ok(5).id, old_id);
    assert!(r[5].existing);
    // "" is the token's project.
    assert_eq!(ok(6).project, "alpha");
    assert!(!r[6].existing);
    assert_eq!(err(7).0, Code::InvalidArgument);

    // The accepted ones exist; a batch again with the same key answers the same task.
    tasks
        .get(GetTaskRequest {
            id: ok(6).id.clone(),
        })
        .await?;
    let again = tasks
        .submit_batch(SubmitBatchRequest {
            tasks: vec![keyed("alpha", "k1")],
        })
        .await?
        .into_inner()
        .results;
    assert_eq!(again[0].task.as_ref().unwrap().id, t0.id);
    assert!(again[0].existing);
    // A single Submit with the key agrees too.
    let single = tasks.submit(keyed("alpha", "k1")).await?.into_inner();
    assert_eq!(single.task.unwrap().id, t0.id);
    assert!(single.existing);
    Ok(())
}

#[tokio::test]
async fn batches_are_bounded_and_need_the_submit_scope() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    create_project(
        &c,
        "alpha",
        Some(ProjectQuota {
            max_queued_tasks: 3,
            ..Default::default()
        }),
    )
    .await?;
    let mut admin = tasks_as(&c, ADMIN_TOKEN).await?;
    let too_many = SubmitBatchRequest {
        tasks: (0..1001).map(|_| noop_submit("default")).collect(),
    };
    let (code, msg) = code_and_message(admin.submit_batch(too_many).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("at most 1000"), "{msg}");
    // Nothing of it was submitted.
    let listed = admin
        .list(scabbard_common::proto::ListTasksRequest::default())
        .await?
        .into_inner()
        .tasks;
    assert!(listed.is_empty(), "{listed:?}");

    // The project's queue quota applies per entry, as for Submit.
    let r = admin
        .submit_batch(SubmitBatchRequest {
            tasks: (0..5).map(|_| noop_submit("alpha")).collect(),
        })
        .await?
        .into_inner()
        .results;
    let accepted = r.iter().filter(|x| x.task.is_some()).count();
    assert_eq!(accepted, 3, "{r:?}");
    for x in &r[3..] {
        assert_eq!(
            x.error.as_ref().map(|e| Code::from_i32(e.code)),
            Some(Code::ResourceExhausted),
            "{x:?}"
        );
    }

    // A read-only token may not submit, batched or not.
    let (_, reader) = api_token(&c, "alpha", Scope::Read, 0).await?;
    let mut ro = tasks_as(&c, &reader).await?;
    let (code, _) = code_and_message(
        ro.submit_batch(SubmitBatchRequest {
            tasks: vec![noop_submit("alpha")],
        })
        .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    Ok(())
}
