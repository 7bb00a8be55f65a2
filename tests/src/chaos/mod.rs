//! The chaos suite's harness: runs hundreds of shell tasks and small workflows, each printing
//! numbered lines, on real processes ([`cluster`]: an etcd cluster, controllers behind
//! proxies, workers), injects faults while they run, then checks the invariants
//! ([`check`]) and reports the figures ([`Report`]). [`faulty`] does the same in one process
//! around a store whose commits fail on demand.
//!
//! The short plan ([`ChaosPlan::short`]) runs in CI (`tests/tests/chaos.rs`); the long one
//! runs with `SCABBARD_CHAOS_LONG=1` ([`ChaosPlan::from_env`]).

pub mod check;
pub mod cluster;
pub mod failover;
pub mod faulty;

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use scabbard_common::client::TaskServiceClient;
use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
use scabbard_common::proto::{
    GetWorkflowRequest, RetryPolicy, SubmitTaskRequest, SubmitWorkflowRequest, TaskSpec,
    WorkflowSpec, WorkflowState,
};
use scabbard_controller::store::{EtcdConfig, EtcdStore, Store};

use crate::{Tasks, admin_channel, shell};
use check::{Acked, numbered_script};
use cluster::{AGENT_LEASE, ChaosCluster, RPC_TIMEOUT};

/// A fault the harness injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of a worker, restarted at once on its data dir.
    KillWorker,
    /// SIGSTOP of a worker for longer than its agent lease, then SIGCONT.
    StopWorker,
    /// kill -9 of the leading controller, restarted once another leads.
    KillLeader,
    /// kill -9 of the etcd leader member, restarted once commits resumed.
    KillEtcdMember,
    /// Every stream through the leader's proxy cut.
    CutStreams,
    /// Store commits fail for a while (in-process run, [`faulty`]): the term ends.
    FailCommits,
}

/// What one run does.
#[derive(Debug, Clone)]
pub struct ChaosPlan {
    /// Shell tasks submitted.
    pub tasks: usize,
    /// Workflows (3 nodes: a → b, a → c) submitted.
    pub workflows: usize,
    /// Numbered lines each task prints.
    pub lines: u32,
    /// Pause between lines.
    pub pause_ms: u32,
    /// etcd members, controllers, workers, slots per worker.
    pub etcd_members: usize,
    /// Controllers.
    pub controllers: usize,
    /// Workers.
    pub workers: usize,
    /// Slots per worker.
    pub slots: u32,
    /// Faults, injected in order, one every `fault_every`, cycling while work remains.
    pub faults: Vec<Fault>,
    /// Pause between faults.
    pub fault_every: Duration,
    /// Bound of the whole run.
    pub deadline: Duration,
}

impl ChaosPlan {
    /// The CI form: a few hundred short tasks, every fault once.
    pub fn short() -> Self {
        Self {
            tasks: 200,
            workflows: 10,
            lines: 20,
            pause_ms: 20,
            etcd_members: 3,
            controllers: 2,
            workers: 3,
            slots: 4,
            faults: vec![
                Fault::KillEtcdMember,
                Fault::KillWorker,
                Fault::KillLeader,
                Fault::CutStreams,
                Fault::StopWorker,
            ],
            fault_every: Duration::from_secs(2),
            deadline: Duration::from_secs(150),
        }
    }

    /// The long form: more work, faults cycling until it is done.
    pub fn long() -> Self {
        Self {
            tasks: 2_000,
            workflows: 100,
            lines: 50,
            controllers: 3,
            workers: 4,
            fault_every: Duration::from_secs(3),
            deadline: Duration::from_secs(1_800),
            ..Self::short()
        }
    }

    /// [`Self::long`] with `SCABBARD_CHAOS_LONG=1`, else [`Self::short`]; `SCABBARD_CHAOS_TASKS`
    /// overrides the number of tasks.
    pub fn from_env() -> Self {
        let mut p = if std::env::var("SCABBARD_CHAOS_LONG").is_ok_and(|v| v == "1") {
            Self::long()
        } else {
            Self::short()
        };
        if let Some(n) = std::env::var("SCABBARD_CHAOS_TASKS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            p.tasks = n;
        }
        p
    }
}

/// One injected fault.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    /// What.
    pub fault: Fault,
    /// Seconds into the run.
    pub at: Duration,
    /// Until a new leader answered (controller kill) or a task record was committed again
    /// (etcd member kill), measured from the fault.
    pub recovery: Option<Duration>,
}

/// The figures of a run; `lost`, `duplicated` and the other counters must all be 0.
#[derive(Debug, Default)]
pub struct Report {
    /// Tasks acknowledged (workflow nodes included).
    pub tasks: usize,
    /// Workflows acknowledged.
    pub workflows: usize,
    /// Attempts over all tasks.
    pub attempts: usize,
    /// Faults injected.
    pub faults: Vec<FaultRecord>,
    /// Acknowledged tasks that never reached a final state (or cannot be read).
    pub lost: usize,
    /// Tasks that reached a second, different final state.
    pub duplicated: usize,
    /// Tasks (or workflows) that ended other than SUCCEEDED.
    pub not_succeeded: usize,
    /// Results recorded from a superseded attempt.
    pub superseded_results: usize,
    /// Attempts committed under a term that was not current (two leaders committing).
    pub stale_commits: usize,
    /// Log lines missing or out of order.
    pub log_lines_lost: usize,
    /// Log lines seen twice.
    pub log_lines_duplicated: usize,
    /// Terms claimed during the run.
    pub terms: usize,
    /// Task record writes replayed from the store's history.
    pub history_writes: usize,
    /// Whether the store history was checked.
    pub history_checked: bool,
    /// Wall time.
    pub wall: Duration,
    /// What went wrong, one line each (the first few are printed).
    pub problems: Vec<String>,
}

impl Report {
    /// Fails, listing the problems, unless every invariant held.
    pub fn assert_clean(&self) -> Result<()> {
        let bad = self.lost
            + self.duplicated
            + self.not_succeeded
            + self.superseded_results
            + self.stale_commits
            + self.log_lines_lost
            + self.log_lines_duplicated;
        if bad > 0 {
            bail!(
                "chaos invariants broken:\n{self}\n{}",
                self.problems
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos: {} tasks ({} workflows), {} attempts, {} terms, {} record writes replayed, \
             {:.1} s",
            self.tasks,
            self.workflows,
            self.attempts,
            self.terms,
            self.history_writes,
            self.wall.as_secs_f64()
        )?;
        writeln!(
            f,
            "chaos: lost {} duplicated {} not-succeeded {} superseded-results {} stale-commits {} \
             log-lines lost {} duplicated {}",
            self.lost,
            self.duplicated,
            self.not_succeeded,
            self.superseded_results,
            self.stale_commits,
            self.log_lines_lost,
            self.log_lines_duplicated
        )?;
        write!(f, "chaos: {} faults:", self.faults.len())?;
        for r in &self.faults {
            write!(f, " {:?}@{:.1}s", r.fault, r.at.as_secs_f64())?;
            if let Some(d) = r.recovery {
                write!(f, "(recovered {:.2}s)", d.as_secs_f64())?;
            }
        }
        Ok(())
    }
}

/// The spec of chaos task `label`: numbered lines, infrastructure failures retried often.
pub fn chaos_task(label: &str, plan: &ChaosPlan) -> TaskSpec {
    let mut s = shell(&numbered_script(label, plan.lines, plan.pause_ms));
    s.retry = Some(RetryPolicy {
        max_attempts: 1,
        initial_backoff_ms: 100,
        max_backoff_ms: 1_000,
        max_infra_retries: Some(20),
        ..Default::default()
    });
    s
}

/// Runs `f` against a fresh leader channel until it succeeds or `deadline` passes.
async fn with_leader<T, F, Fut>(addrs: &str, deadline: Instant, mut f: F) -> Result<T>
where
    F: FnMut(scabbard_common::client::AuthedChannel) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    loop {
        let r = tokio::time::timeout(RPC_TIMEOUT, async {
            let ch = admin_channel(addrs).await?;
            f(ch).await
        })
        .await;
        match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if Instant::now() > deadline => return Err(e),
            Err(_) if Instant::now() > deadline => bail!("no answer before the deadline"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Submits the plan's tasks and workflows (idempotency keys make retries safe); returns the
/// acknowledged tasks and workflow ids.
async fn submit_all(
    addrs: String,
    plan: ChaosPlan,
    deadline: Instant,
) -> Result<(Vec<Acked>, Vec<(String, String)>)> {
    let mut acked = Vec::new();
    let mut wfs = Vec::new();
    for i in 0..plan.tasks {
        let label = format!("t{i}");
        let spec = chaos_task(&label, &plan);
        let id = with_leader(&addrs, deadline, |ch| {
            let spec = spec.clone();
            let key = format!("chaos-{label}");
            async move {
                let r = TaskServiceClient::new(ch)
                    .submit(SubmitTaskRequest {
                        spec: Some(spec),
                        idempotency_key: key,
                        project: String::new(),
                    })
                    .await?
                    .into_inner();
                Ok(r.task.map(|t| t.id).unwrap_or_default())
            }
        })
        .await?;
        acked.push(Acked {
            id,
            label,
            lines: plan.lines,
        });
        if plan.tasks >= plan.workflows.max(1) && i % (plan.tasks / plan.workflows.max(1)) == 0 {
            let w = wfs.len();
            if w < plan.workflows {
                let name = format!("wf{w}");
                let node = |n: &str, deps: &[&str]| scabbard_common::proto::WorkflowTask {
                    name: n.into(),
                    depends_on: deps.iter().map(|d| d.to_string()).collect(),
                    spec: Some(chaos_task(&format!("{name}-{n}"), &plan)),
                    when: String::new(),
                };
                let spec = WorkflowSpec {
                    name: name.clone(),
                    tasks: vec![node("a", &[]), node("b", &["a"]), node("c", &["a"])],
                    ..Default::default()
                };
                let id = with_leader(&addrs, deadline, |ch| {
                    let spec = spec.clone();
                    let key = format!("chaos-{name}");
                    async move {
                        let r = WorkflowServiceClient::new(ch)
                            .submit(SubmitWorkflowRequest {
                                spec: Some(spec),
                                idempotency_key: key,
                                ..Default::default()
                            })
                            .await?
                            .into_inner();
                        Ok(r.workflow.map(|w| w.id).unwrap_or_default())
                    }
                })
                .await?;
                wfs.push((id, name));
            }
        }
    }
    Ok((acked, wfs))
}

/// Waits until every workflow is final; returns their node tasks as [`Acked`] and counts
/// the workflows that did not succeed.
async fn settle_workflows(
    addrs: &str,
    wfs: &[(String, String)],
    plan: &ChaosPlan,
    deadline: Instant,
    report: &mut Report,
) -> Result<Vec<Acked>> {
    let mut out = Vec::new();
    for (id, name) in wfs {
        let wf = loop {
            let wf = with_leader(addrs, deadline, |ch| {
                let id = id.clone();
                async move {
                    Ok(WorkflowServiceClient::new(ch)
                        .get(GetWorkflowRequest { id })
                        .await?
                        .into_inner())
                }
            })
            .await?;
            let done = matches!(
                wf.state(),
                WorkflowState::Succeeded | WorkflowState::Failed | WorkflowState::Cancelled
            );
            if done || Instant::now() > deadline {
                break wf;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if wf.state() != WorkflowState::Succeeded {
            report.not_succeeded += 1;
            report
                .problems
                .push(format!("workflow {id} ended {:?}", wf.state()));
        }
        for n in &wf.nodes {
            if !n.task_id.is_empty() {
                out.push(Acked {
                    id: n.task_id.clone(),
                    label: format!("{name}-{}", n.name),
                    lines: plan.lines,
                });
            }
        }
    }
    Ok(out)
}

/// Waits until every acknowledged task is final (or the deadline passes).
pub(crate) async fn settle_tasks(addrs: &str, acked: &[Acked], deadline: Instant) -> Result<()> {
    let mut pending: Vec<&Acked> = acked.iter().collect();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        let tasks: Tasks = match tokio::time::timeout(RPC_TIMEOUT, admin_channel(addrs)).await {
            Ok(Ok(ch)) => TaskServiceClient::new(ch),
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        for a in pending {
            let mut c = tasks.clone();
            let done = tokio::time::timeout(RPC_TIMEOUT, crate::get(&mut c, &a.id))
                .await
                .ok()
                .and_then(|r| r.ok())
                .is_some_and(|t| scabbard_common::is_final(t.state()));
            if !done {
                still.push(a);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// When the first task record after `since` was committed, by a watch on the store.
async fn next_commit_after(
    store: &std::sync::Arc<dyn Store>,
    since: Instant,
    bound: Duration,
) -> Option<Duration> {
    let end = since + bound;
    while Instant::now() < end {
        let rev = match tokio::time::timeout(Duration::from_secs(1), store.revision()).await {
            Ok(Ok(r)) => r,
            _ => continue,
        };
        let Ok(Ok(mut w)) =
            tokio::time::timeout(Duration::from_secs(1), store.watch("tasks/", rev + 1)).await
        else {
            continue;
        };
        let left = end.saturating_duration_since(Instant::now());
        if let Ok(Some(Ok(_))) = tokio::time::timeout(left, w.recv()).await {
            return Some(since.elapsed());
        }
    }
    None
}

/// One chaos run on real processes; the report says what held.
pub async fn run(plan: &ChaosPlan) -> Result<Report> {
    let started = Instant::now();
    let deadline = started + plan.deadline;
    let mut c = ChaosCluster::start(
        plan.etcd_members,
        plan.controllers,
        plan.workers,
        plan.slots,
    )
    .await?;
    let addrs = c.addrs();
    c.wait_leader(None, Duration::from_secs(60)).await?;
    let store: std::sync::Arc<dyn Store> = EtcdStore::connect(&EtcdConfig {
        endpoints: c.etcd.endpoint_list(),
        ..Default::default()
    })
    .await?;
    let submitter = tokio::spawn(submit_all(addrs.clone(), plan.clone(), deadline));
    let mut report = Report::default();
    let mut next = 0usize;
    // Faults, one every `fault_every`, while the submissions run and at least once each.
    while (!submitter.is_finished() || next < plan.faults.len())
        && !plan.faults.is_empty()
        && Instant::now() < deadline
    {
        tokio::time::sleep(plan.fault_every).await;
        let fault = plan.faults[next % plan.faults.len()];
        let at = started.elapsed();
        let recovery = inject(&mut c, &store, fault, plan, next).await?;
        report.faults.push(FaultRecord {
            fault,
            at,
            recovery,
        });
        next += 1;
    }
    let (mut acked, wfs) = submitter.await??;
    report.workflows = wfs.len();
    let mut wf_report = Report::default();
    acked.extend(settle_workflows(&addrs, &wfs, plan, deadline, &mut wf_report).await?);
    report.not_succeeded += wf_report.not_succeeded;
    report.problems.extend(wf_report.problems);
    settle_tasks(&addrs, &acked, deadline).await?;
    report.tasks = acked.len();
    let tasks: Tasks = TaskServiceClient::new(admin_channel(&addrs).await?);
    check::check_tasks(&tasks, &acked, &mut report).await?;
    check::check_history(&store, &mut report).await?;
    report.wall = started.elapsed();
    drop(c);
    Ok(report)
}

/// Injects one fault; returns its recovery time where one is measured.
async fn inject(
    c: &mut ChaosCluster,
    store: &std::sync::Arc<dyn Store>,
    fault: Fault,
    plan: &ChaosPlan,
    n: usize,
) -> Result<Option<Duration>> {
    let w = n % c.workers.len().max(1);
    match fault {
        Fault::KillWorker => {
            c.kill_and_restart_worker(w, plan.slots)?;
            Ok(None)
        }
        Fault::StopWorker => {
            c.workers[w].proc.signal(libc::SIGSTOP);
            // Past its lease: its attempts are requeued elsewhere; then it comes back.
            tokio::time::sleep(AGENT_LEASE + Duration::from_secs(1)).await;
            c.workers[w].proc.signal(libc::SIGCONT);
            Ok(None)
        }
        Fault::CutStreams => {
            if let Some(l) = c.leader().await {
                c.controllers[l].proxy.cut(false);
            }
            Ok(None)
        }
        Fault::KillLeader => {
            let Some(l) = c.leader().await else {
                return Ok(None);
            };
            let killed = Instant::now();
            c.kill_controller(l);
            c.wait_leader(Some(l), Duration::from_secs(60)).await?;
            let took = killed.elapsed();
            c.restart_controller(l)?;
            Ok(Some(took))
        }
        Fault::FailCommits => Ok(None),
        Fault::KillEtcdMember => {
            let Some(m) = c.etcd_leader().await else {
                return Ok(None);
            };
            let killed = Instant::now();
            c.etcd.kill9(m);
            let took = next_commit_after(store, killed, Duration::from_secs(10)).await;
            c.etcd.restart(m)?;
            Ok(took)
        }
    }
}
