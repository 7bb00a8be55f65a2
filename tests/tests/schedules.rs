//! Schedules with an injected clock: a controller in this process whose schedule loop reads
//! a manual clock, a user template directory, and no workers (runs stay running, so the
//! overlap policies can be watched).

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::proto::schedule_service_client::ScheduleServiceClient;
use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
use scabbard_common::proto::{
    CreateScheduleRequest, GetScheduleRequest, ListWorkflowsRequest, OverlapPolicy,
    PauseScheduleRequest, ResumeScheduleRequest, Schedule, ScheduleSpec, Workflow, WorkflowState,
};
use scabbard_controller::config::ClockHandle;
use scabbard_controller::schedules::ManualClock;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(20);
/// 2030-01-01T00:00:00Z: ticks of `*/10 * * * * *` are multiples of 10 s from here.
const T0: i64 = 1_893_456_000_000;

const TEMPLATE: &str = r#"
name: nightly
version: 1
description: A long run, so overlapping ticks can be seen.
parameters:
  - name: what
    type: string
    default: hello
workflow:
  tasks:
    - name: run
      shell:
        command: [sh, -c, "echo ${{ params.what }}; sleep 600"]
"#;

struct Env {
    ctl: InProc,
    clock: Arc<ManualClock>,
    _templates: tempfile::TempDir,
    schedules: ScheduleServiceClient<scabbard_common::client::AuthedChannel>,
    workflows: WorkflowServiceClient<scabbard_common::client::AuthedChannel>,
}

async fn env() -> anyhow::Result<Env> {
    let clock = Arc::new(ManualClock::new(T0 + 1_000));
    let templates = tempfile::tempdir()?;
    std::fs::write(templates.path().join("nightly.yaml"), TEMPLATE)?;
    let dir = templates.path().to_path_buf();
    let c = clock.clone();
    let ctl = InProc::start_with(move |cfg| {
        cfg.clock = ClockHandle(c);
        cfg.templates_dir = Some(dir);
        // Ticks 10 s apart keep these tests short (the default minimum is 60 s).
        cfg.min_schedule_interval_ms = 1_000;
    })
    .await?;
    let ch = ctl.channel(ADMIN_TOKEN).await?;
    Ok(Env {
        ctl,
        clock,
        _templates: templates,
        schedules: ScheduleServiceClient::new(ch.clone()),
        workflows: WorkflowServiceClient::new(ch),
    })
}

fn spec(name: &str, overlap: OverlapPolicy) -> ScheduleSpec {
    ScheduleSpec {
        name: name.into(),
        cron: "*/10 * * * * *".into(),
        template: "nightly".into(),
        overlap: overlap as i32,
        ..Default::default()
    }
}

impl Env {
    async fn create(&mut self, spec: ScheduleSpec) -> anyhow::Result<Schedule> {
        Ok(self
            .schedules
            .create(CreateScheduleRequest {
                spec: Some(spec),
                ..Default::default()
            })
            .await?
            .into_inner())
    }

    /// Waits until the schedule has handled the tick at `tick` (fired or skipped it).
    async fn handled(&mut self, id: &str, tick: i64) -> anyhow::Result<Schedule> {
        let c = self.schedules.clone();
        eventually(&format!("schedule {id} to handle tick {tick}"), T, || {
            let mut c = c.clone();
            let id = id.to_string();
            async move {
                let s = c.get(GetScheduleRequest { id }).await.ok()?.into_inner();
                (s.last_tick_ms >= tick).then_some(s)
            }
        })
        .await
    }

    /// The runs started by a schedule, oldest first.
    async fn runs(&mut self, schedule: &str) -> anyhow::Result<Vec<Workflow>> {
        let mut all = self
            .workflows
            .list(ListWorkflowsRequest {
                template: "nightly".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .workflows;
        all.retain(|w| {
            w.template
                .as_ref()
                .is_some_and(|t| t.schedule_id == schedule)
        });
        all.reverse();
        Ok(all)
    }
}

#[tokio::test]
async fn a_schedule_fires_on_its_tick_and_skips_while_the_previous_run_goes() -> anyhow::Result<()>
{
    let mut e = env().await?;
    let s = e.create(spec("skip", OverlapPolicy::Skip)).await?;
    assert_eq!(s.next_tick_ms, T0 + 10_000);
    assert_eq!(s.fired, 0);
    e.clock.set(T0 + 10_000);
    let s = e.handled(&s.id, T0 + 10_000).await?;
    assert_eq!((s.fired, s.skipped), (1, 0), "{s:?}");
    assert_eq!(s.next_tick_ms, T0 + 20_000);
    let runs = e.runs(&s.id).await?;
    assert_eq!(runs.len(), 1);
    let t = runs[0].template.clone().unwrap();
    assert_eq!(t.scheduled_for_ms, T0 + 10_000);
    assert_eq!((t.name.as_str(), t.version), ("nightly", 1));
    assert_eq!(runs[0].state(), WorkflowState::Running);
    // The run is still going at the next tick: skipped.
    e.clock.set(T0 + 20_000);
    let s = e.handled(&s.id, T0 + 20_000).await?;
    assert_eq!((s.fired, s.skipped), (1, 1), "{s:?}");
    assert!(s.last_outcome.contains("skipped"), "{}", s.last_outcome);
    assert_eq!(e.runs(&s.id).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn queue_and_cancel_previous_overlap_policies() -> anyhow::Result<()> {
    let mut e = env().await?;
    let q = e.create(spec("queue", OverlapPolicy::Queue)).await?;
    let c = e
        .create(spec("cancel", OverlapPolicy::CancelPrevious))
        .await?;
    e.clock.set(T0 + 10_000);
    e.handled(&q.id, T0 + 10_000).await?;
    e.handled(&c.id, T0 + 10_000).await?;
    e.clock.set(T0 + 20_000);
    e.handled(&q.id, T0 + 20_000).await?;
    e.handled(&c.id, T0 + 20_000).await?;
    let queued = e.runs(&q.id).await?;
    let states: Vec<_> = queued.iter().map(|w| w.state()).collect();
    assert_eq!(states, [WorkflowState::Running, WorkflowState::Pending]);
    let mut cancel = Vec::new();
    for w in e.runs(&c.id).await? {
        cancel
            .push(wait_for_state(&mut e.workflows, &w.id, |s| s != WorkflowState::Pending).await?);
    }
    assert_eq!(cancel.len(), 2);
    let first = wait_for_state(&mut e.workflows, &cancel[0].id, |s| {
        s == WorkflowState::Cancelled
    })
    .await?;
    assert!(first.message.contains("newer run"), "{}", first.message);
    assert_eq!(cancel[1].state(), WorkflowState::Running);
    Ok(())
}

#[tokio::test]
async fn missed_ticks_inside_the_catch_up_window_run_once_and_older_ones_are_skipped()
-> anyhow::Result<()> {
    let mut e = env().await?;
    let mut sp = spec("catchup", OverlapPolicy::Queue);
    sp.catch_up_window_ms = 25_000;
    let s = e.create(sp).await?;
    // "Downtime": the clock jumps 60 s; ticks at +10 … +60, the window keeps +40, +50, +60.
    e.clock.set(T0 + 60_000);
    let s = e.handled(&s.id, T0 + 60_000).await?;
    assert_eq!((s.fired, s.skipped), (3, 3), "{s:?}");
    let ticks: Vec<i64> = e
        .runs(&s.id)
        .await?
        .iter()
        .map(|w| w.template.as_ref().unwrap().scheduled_for_ms)
        .collect();
    assert_eq!(ticks, [T0 + 40_000, T0 + 50_000, T0 + 60_000]);
    Ok(())
}

#[tokio::test]
async fn a_long_downtime_skips_every_old_tick_once_and_runs_the_recent_ones() -> anyhow::Result<()>
{
    let mut e = env().await?;
    let mut sp = spec("long-gap", OverlapPolicy::Queue);
    sp.catch_up_window_ms = 25_000;
    let s = e.create(sp).await?;
    // Two hours down: 720 ticks, of which the last three are inside the window.
    e.clock.set(T0 + 7_200_000);
    let s = e.handled(&s.id, T0 + 7_200_000).await?;
    assert_eq!((s.fired, s.skipped), (3, 717), "{s:?}");
    assert_eq!(s.next_tick_ms, T0 + 7_210_000);
    Ok(())
}

#[tokio::test]
async fn paused_schedules_do_not_fire_and_resume_from_now() -> anyhow::Result<()> {
    let mut e = env().await?;
    let s = e.create(spec("paused", OverlapPolicy::Queue)).await?;
    let p = e
        .schedules
        .pause(PauseScheduleRequest { id: s.id.clone() })
        .await?
        .into_inner();
    assert!(p.paused);
    assert_eq!(p.next_tick_ms, 0);
    e.clock.set(T0 + 35_000);
    let r = e
        .schedules
        .resume(ResumeScheduleRequest { id: s.id.clone() })
        .await?
        .into_inner();
    assert_eq!(r.next_tick_ms, T0 + 40_000);
    e.clock.set(T0 + 40_000);
    let s = e.handled(&s.id, T0 + 40_000).await?;
    assert_eq!(
        (s.fired, s.skipped),
        (1, 0),
        "ticks while paused must not run: {s:?}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_schedules_are_refused_with_the_reason() -> anyhow::Result<()> {
    let mut e = env().await?;
    let mut bad_cron = spec("c", OverlapPolicy::Skip);
    bad_cron.cron = "61 * * * *".into();
    let mut bad_zone = spec("z", OverlapPolicy::Skip);
    bad_zone.timezone = "Mars/Olympus".into();
    let mut no_template = spec("t", OverlapPolicy::Skip);
    no_template.template = "nope".into();
    let mut bad_param = spec("p", OverlapPolicy::Skip);
    bad_param.params.insert("unknown".into(), "x".into());
    for (sp, code, expect) in [
        (bad_cron, tonic::Code::InvalidArgument, "cron"),
        (bad_zone, tonic::Code::InvalidArgument, "Mars/Olympus"),
        (no_template, tonic::Code::NotFound, "nope"),
        (bad_param, tonic::Code::InvalidArgument, "unknown"),
    ] {
        let r = e
            .schedules
            .create(CreateScheduleRequest {
                spec: Some(sp),
                ..Default::default()
            })
            .await;
        let (c, msg) = code_and_message(r);
        assert_eq!(c, code, "{msg}");
        assert!(msg.contains(expect), "{expect}: {msg}");
    }
    e.create(spec("dup", OverlapPolicy::Skip)).await?;
    let r = e
        .schedules
        .create(CreateScheduleRequest {
            spec: Some(spec("dup", OverlapPolicy::Skip)),
            ..Default::default()
        })
        .await;
    assert_eq!(code_and_message(r).0, tonic::Code::AlreadyExists);
    drop(e.ctl);
    Ok(())
}

async fn wait_for_state(
    c: &mut WorkflowServiceClient<scabbard_common::client::AuthedChannel>,
    id: &str,
    ok: impl Fn(WorkflowState) -> bool,
) -> anyhow::Result<Workflow> {
    let c = c.clone();
    let ok = &ok;
    eventually(&format!("workflow {id}"), T, || {
        let mut c = c.clone();
        let id = id.to_string();
        async move {
            let w = c
                .get(scabbard_common::proto::GetWorkflowRequest { id })
                .await
                .ok()?
                .into_inner();
            ok(w.state()).then_some(w)
        }
    })
    .await
}
