//! `--kind history`: a controller on a store holding `--history-tasks` finished tasks.
//!
//! 1. **Fill**: writes N finished task records with every key of the history layout
//!    (`core::history`) straight into an embedded store, in big transactions — what N
//!    tasks leave behind, without running them.
//! 2. Starts a real `scabbard controller` process on it (first start), stops it, starts it
//!    again and reports:
//!    * restart to serving: spawn → first `Get` of an old task answered;
//!    * RSS of the controller process (`VmRSS`) once serving, and after the reads below;
//!    * `Get` of a random old task, p50/p99 (sequential);
//!    * a filtered `List` page (project + label + state, 100 per page, paging on), p50/p99;
//!    * a time-range `List` page (one hour of history, somewhere in the middle), p50/p99.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::client::{self, TaskServiceClient};
use scabbard_common::proto::{
    AttemptRecord, GetTaskRequest, ListTasksRequest, NoopTask, Outcome, Task, TaskResult, TaskSpec,
    TaskState, task_spec::Kind,
};
use scabbard_controller::store::{EmbeddedStore, Op, Store, Txn};

/// Tasks per fill transaction (each ~6 keys and ~1 KB, under the embedded store's 32 MiB).
const FILL_BATCH: usize = 20_000;
/// One simulated task finishes every this many ms (10 M tasks span ~116 days at 1 ms).
const SPACING_MS: i64 = 1;

/// The task record number `i` of the fill (its id is a ULID at its creation time).
fn task(i: usize, start_ms: i64) -> Task {
    let created = start_ms + i as i64 * SPACING_MS;
    let id = ulid::Ulid::from_parts(created as u64, (i as u128) << 16 | 0xbe)
        .to_string()
        .to_lowercase();
    let mut spec = TaskSpec {
        kind: Some(Kind::Noop(NoopTask {})),
        ..Default::default()
    };
    spec.labels.insert("batch".into(), format!("b{}", i % 100));
    Task {
        id,
        spec: Some(spec),
        state: TaskState::Succeeded as i32,
        created_at_ms: created,
        updated_at_ms: created + 5,
        project: "default".into(),
        agent_id: "agent-bench".into(),
        fencing_token: 1 << 32 | 1,
        attempts: vec![AttemptRecord {
            number: 1,
            agent_id: "agent-bench".into(),
            fencing_token: 1 << 32 | 1,
            assigned_at_ms: created + 1,
            started_at_ms: created + 2,
            finished_at_ms: created + 5,
            result: Some(TaskResult {
                outcome: Outcome::Succeeded as i32,
                ..Default::default()
            }),
            ..Default::default()
        }],
        result: Some(TaskResult {
            outcome: Outcome::Succeeded as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Writes `n` finished tasks into the embedded store at `path`; returns their time span.
async fn fill(path: &std::path::Path, n: usize) -> Result<(i64, Duration)> {
    // No write-ahead log: each big transaction is one durable redb commit.
    let store = EmbeddedStore::open_with(
        path,
        scabbard_controller::store::embedded::EmbeddedOptions {
            wal: false,
            ..Default::default()
        },
    )?;
    let start_ms = scabbard_common::time::now_ms() - n as i64 * SPACING_MS - 60_000;
    let began = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + FILL_BATCH).min(n);
        let mut ops = Vec::with_capacity((end - i) * 6 + 1);
        for j in i..end {
            for (k, v) in
                scabbard_controller::core::history::finished_task_records(&task(j, start_ms))
            {
                ops.push(Op::put(k, v));
            }
        }
        if end == n {
            let (k, v) = scabbard_controller::core::history::layout_marker();
            ops.push(Op::put(k, v));
        }
        store
            .txn(Txn {
                success: ops,
                ..Default::default()
            })
            .await?;
        i = end;
        if i % 500_000 < FILL_BATCH {
            eprintln!(
                "  filled {i}/{n} ({:.0} tasks/s)",
                i as f64 / began.elapsed().as_secs_f64()
            );
        }
    }
    store.close().await?;
    Ok((start_ms, began.elapsed()))
}

fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1e3
}

/// Starts a controller on `dir` and waits until it serves a `Get` of `probe`.
async fn start(
    dir: &std::path::Path,
    port: u16,
    probe: &str,
) -> Result<(scabbard_tests::Controller, Duration)> {
    let began = Instant::now();
    let ctl =
        scabbard_tests::Controller::start(dir, port, &scabbard_tests::ControllerOpts::default())?;
    let addr = ctl.addr.to_string();
    loop {
        if began.elapsed() > Duration::from_secs(600) {
            bail!("the controller did not serve within 10 minutes");
        }
        if let Ok(ch) = client::connect(&addr).await {
            let mut c =
                TaskServiceClient::new(scabbard_tests::with_token(ch, scabbard_tests::ADMIN_TOKEN));
            if c.get(GetTaskRequest { id: probe.into() }).await.is_ok() {
                return Ok((ctl, began.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) async fn run(n: usize, data_dir: Option<std::path::PathBuf>) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = data_dir
        .unwrap_or_else(|| temp.path().to_path_buf())
        .join("controller");
    std::fs::create_dir_all(&dir)?;
    println!(
        "scabbard-bench: kind=history tasks={n} store=embedded (a `scabbard controller` process)"
    );
    let (start_ms, took) = fill(&dir.join("state.redb"), n).await.context("fill")?;
    println!(
        "  fill: {n} finished tasks with their history keys in {:.1} s ({:.0} tasks/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    let t0 = Instant::now();
    EmbeddedStore::open(&dir.join("state.redb"))?
        .close()
        .await?;
    println!(
        "  opening the filled store (in this process): {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let old = task(0, start_ms).id;
    let (mut ctl, first) = start(&dir, 0, &old).await?;
    let port = ctl.addr.port();
    println!(
        "  first start to serving: {:.0} ms",
        first.as_secs_f64() * 1e3
    );
    ctl.proc.terminate(Duration::from_secs(30));
    let (ctl, restart) = start(&dir, port, &old).await?;
    let pid = ctl.proc.pid();
    println!(
        "  restart to serving: {:.0} ms; RSS {:.0} MiB",
        restart.as_secs_f64() * 1e3,
        rss_mib(pid)
    );
    let mut c = TaskServiceClient::new(scabbard_tests::with_token(
        client::connect(&ctl.addr.to_string()).await?,
        scabbard_tests::ADMIN_TOKEN,
    ));
    // Get of old tasks, spread over the whole history.
    let mut gets = Vec::new();
    for k in 0..500usize {
        let i = (k.wrapping_mul(2_654_435_761) % n.max(1)).min(n.saturating_sub(1));
        let id = task(i, start_ms).id;
        let t0 = Instant::now();
        let t = c.get(GetTaskRequest { id }).await?.into_inner();
        gets.push(t0.elapsed());
        anyhow::ensure!(t.state() == TaskState::Succeeded);
    }
    // A filtered List: one label value of 100 and a state; 100 per page, paging on.
    let mut pages = Vec::new();
    let mut req = ListTasksRequest {
        page_size: 100,
        states: vec![TaskState::Succeeded as i32],
        project: "default".into(),
        ..Default::default()
    };
    req.labels.insert("batch".into(), "b7".into());
    for _ in 0..100 {
        let t0 = Instant::now();
        let r = c.list(req.clone()).await?.into_inner();
        pages.push(t0.elapsed());
        if r.next_page_token.is_empty() {
            req.page_token.clear();
        } else {
            req.page_token = r.next_page_token;
        }
    }
    // A time range in the middle of the history (an hour, or what there is).
    let mid = start_ms + (n as i64 * SPACING_MS) / 2;
    let mut ranges = Vec::new();
    for k in 0..100i64 {
        let from = mid - k * 1_000;
        let t0 = Instant::now();
        let r = c
            .list(ListTasksRequest {
                page_size: 100,
                created_after_ms: from,
                created_before_ms: from + 3_600_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        ranges.push(t0.elapsed());
        anyhow::ensure!(!r.tasks.is_empty(), "an empty time-range page");
    }
    println!(
        "  Get old task: p50 {:.2} ms, p99 {:.2} ms ({} samples)",
        pct(&mut gets, 0.5),
        pct(&mut gets, 0.99),
        gets.len()
    );
    println!(
        "  List label+state page (100 of 1-in-100 tasks): p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut pages, 0.5),
        pct(&mut pages, 0.99)
    );
    println!(
        "  List time-range page (100): p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut ranges, 0.5),
        pct(&mut ranges, 0.99)
    );
    println!("  RSS after the reads: {:.0} MiB", rss_mib(pid));
    Ok(())
}
