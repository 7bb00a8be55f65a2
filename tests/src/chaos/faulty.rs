//! The chaos run in one process: a controller on a store whose commits fail on demand
//! ([`FaultyStore`] around the embedded store) with real worker processes. Store outages end
//! the leader's term while tasks flow, records the store refuses (oversized results) fail
//! only their own task; the checker then verifies the same invariants as on etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use scabbard_common::client::{AdminServiceClient, TaskServiceClient};
use scabbard_common::proto::{ClusterStatusRequest, SubmitTaskRequest, TaskState};
use scabbard_controller::store::faults::FaultyStore;
use scabbard_controller::store::{EmbeddedStore, Store};

use super::check::{self, Acked};
use super::{ChaosPlan, Fault, FaultRecord, Report, chaos_task};
use crate::{InProc, Tasks, Worker, eventually, get, shell, wait_agent};

/// What a poisoned result carries: the store refuses records holding it.
const MARKER: &[u8] = b"POISON-RESULT";

/// Store outages injected, one every `plan.fault_every`, each `outage` long.
pub async fn run(plan: &ChaosPlan, outages: usize, outage: Duration) -> Result<Report> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let inner: Arc<dyn Store> = EmbeddedStore::open(&dir.path().join("state.redb"))?;
    let faulty = FaultyStore::new(inner);
    faulty.refuse_puts(|key, value| {
        key.starts_with("tasks/") && value.windows(MARKER.len()).any(|w| w == MARKER)
    });
    let c = InProc::start_on(faulty.clone(), |_| {}).await?;
    let mut workers = Vec::new();
    for i in 0..plan.workers {
        let name = format!("w{i}");
        workers.push(Worker::start(
            &c.addr(),
            &dir.path().join(&name),
            &name,
            plan.slots,
        )?);
        wait_agent(&c.addr(), "a worker", |a| a.name == name).await?;
    }
    let tasks: Tasks = TaskServiceClient::new(c.channel(crate::ADMIN_TOKEN).await?);
    let admin = AdminServiceClient::new(c.channel(crate::ADMIN_TOKEN).await?);
    let mut report = Report::default();
    let mut acked = Vec::new();
    let mut poisoned = Vec::new();
    let deadline = started + plan.deadline;
    // Outages while the work flows, one every `fault_every`.
    let injector = {
        let (faulty, admin, plan) = (faulty.clone(), admin.clone(), plan.clone());
        tokio::spawn(async move {
            let mut records = Vec::new();
            for _ in 0..outages {
                tokio::time::sleep(plan.fault_every).await;
                let at = started.elapsed();
                faulty.set_outage(true);
                tokio::time::sleep(outage).await;
                faulty.set_outage(false);
                let back = Instant::now();
                // The controller rebuilds from the store as a new term: it leads again.
                eventually("the controller to lead again", plan.deadline, || {
                    let mut a = admin.clone();
                    async move {
                        let s = a
                            .cluster_status(ClusterStatusRequest {})
                            .await
                            .ok()?
                            .into_inner();
                        (s.answered_by_leader && s.store_healthy).then_some(())
                    }
                })
                .await?;
                records.push(FaultRecord {
                    fault: Fault::FailCommits,
                    at,
                    recovery: Some(back.elapsed()),
                });
            }
            anyhow::Ok(records)
        })
    };
    for i in 0..plan.tasks {
        let label = format!("t{i}");
        let (spec, poison) = if i % 50 == 7 {
            (
                shell(r#"echo "out=POISON-$(echo RESULT)" >> "$SCABBARD_OUTPUT""#),
                true,
            )
        } else {
            (chaos_task(&label, plan), false)
        };
        // Submissions refused during an outage are not acknowledged: retry them (the
        // idempotency key keeps a retried one single).
        let id = eventually("a submission to be acknowledged", plan.deadline, || {
            let mut t = tasks.clone();
            let spec = spec.clone();
            let key = format!("chaos-inproc-{label}");
            async move {
                t.submit(SubmitTaskRequest {
                    spec: Some(spec),
                    idempotency_key: key,
                    project: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .task
                .map(|t| t.id)
            }
        })
        .await?;
        if poison {
            poisoned.push(id);
        } else {
            acked.push(Acked {
                id,
                label,
                lines: plan.lines,
            });
        }
    }
    let mut all = acked.clone();
    all.extend(poisoned.iter().map(|id| Acked {
        id: id.clone(),
        label: String::new(),
        lines: 0,
    }));
    super::settle_tasks(&c.addr(), &all, deadline).await?;
    report.faults = injector.await??;
    report.tasks = acked.len() + poisoned.len();
    check::check_tasks(&tasks, &acked, &mut report).await?;
    // A refused record fails its own task, with a result saying why; nothing else notices.
    for id in &poisoned {
        let t = get(&mut tasks.clone(), id).await?;
        if t.state() != TaskState::Failed || t.result.is_none() {
            report.not_succeeded += 1;
            report
                .problems
                .push(format!("poisoned task {id} ended {:?}", t.state()));
        }
    }
    let store: Arc<dyn Store> = faulty.clone();
    if let Err(e) = check::check_history(&store, &mut report).await {
        report
            .problems
            .push(format!("store history not checked: {e:#}"));
    }
    report.wall = started.elapsed();
    drop(workers);
    Ok(report)
}
