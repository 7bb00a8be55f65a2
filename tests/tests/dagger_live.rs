//! The real thing, where a Dagger engine can run (`DAGGER_LIVE=1`; the `dagger` CLI in
//! PATH or `DAGGER_CLI`, and whatever engine it reaches): a controller and two workers run
//! a two-step container pipeline whose second step, on the other worker, receives the
//! first one's artifact byte for byte. Without `DAGGER_LIVE=1` it says why and passes: no
//! engine can run on the development machines (see docs/dagger.md).

use std::time::Duration;

use scabbard_common::proto::{SubmitWorkflowRequest, WorkflowState};
use scabbard_tests::fleet::*;
use scabbard_tests::*;

const PIPELINE: &str = r#"
name: live-artifacts
tasks:
  - name: produce
    requirements: {labels: {name: one}}
    container:
      image: alpine:3.20
      steps:
        - args: [sh, -c, 'mkdir -p /out && head -c 100000 /dev/urandom > /out/data.bin && sha256sum /out/data.bin | cut -d" " -f1']
    outputs:
      - {name: sum, last_stdout_line: true}
    artifacts:
      - {name: data, path: /out/data.bin}
  - name: consume
    depends_on: [produce]
    requirements: {labels: {name: two}}
    container:
      image: alpine:3.20
      steps:
        - args: [sh, -c, 'test "$(sha256sum /in/data.bin | cut -d" " -f1)" = "$SUM" && echo same']
    env:
      SUM: "${{ tasks.produce.outputs.sum }}"
    inputs:
      - {from: "${{ tasks.produce.artifacts.data }}", path: /in/data.bin}
"#;

#[tokio::test]
async fn a_two_step_pipeline_passes_an_artifact_on_a_real_engine() -> anyhow::Result<()> {
    if std::env::var("DAGGER_LIVE").as_deref() != Ok("1") {
        eprintln!("not run: set DAGGER_LIVE=1 on a host where a Dagger engine can run");
        return Ok(());
    }
    let live = |name: &str| WorkerSpec {
        real_engine: true,
        ..WorkerSpec::named(name)
    };
    let fleet = Fleet::start(Vec::new(), vec![live("one"), live("two")]).await?;
    let mut wf = fleet.workflows().await?;
    let spec = scabbard_common::wfdef::parse_workflow(PIPELINE, "live.yaml").expect("parses");
    let id = wf
        .submit(SubmitWorkflowRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workflow
        .expect("workflow")
        .id;
    let w = wait_workflow(&mut wf, &id, Duration::from_secs(600)).await?;
    assert_eq!(w.state(), WorkflowState::Succeeded, "{w:#?}");
    let mut tasks = fleet.tasks().await?;
    let consume = node_task(&mut tasks, &w, "consume").await?;
    let log = logs(&mut tasks, &consume.id, 0, false).await?;
    assert!(log.contains("same"), "{log}");
    Ok(())
}
