//! Riding through processes that hang instead of dying, with real processes: a leader
//! controller frozen with SIGSTOP (workers and clients move to the new leader within a
//! leader lease plus a few seconds, and no running task is requeued), a frozen worker (its
//! attempts are requeued one agent lease after it fell silent, not two), and the CLI's
//! `--timeout` against a frozen controller.

use std::time::{Duration, Instant};

use scabbard_common::client::{self, AdminServiceClient, TaskServiceClient};
use scabbard_common::proto::{ClusterStatusRequest, TaskState};
use scabbard_common::time::now_ms;
use scabbard_tests::etcd::EtcdCluster;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(60);

/// Leader lease of the test controllers.
const LEADER_LEASE: Duration = Duration::from_secs(2);

/// Sends SIGCONT to a stopped process when dropped, so a failing test never leaves a
/// frozen process behind (the `Proc` itself is killed on drop afterwards).
struct Thaw(i32);

impl Thaw {
    fn freeze(p: &Proc) -> Self {
        p.signal(libc::SIGSTOP);
        Self(p.pid())
    }
}

impl Drop for Thaw {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

struct Cluster {
    // Kept for its drop (stops etcd).
    _etcd: EtcdCluster,
    dir: tempfile::TempDir,
    controllers: Vec<Controller>,
}

impl Cluster {
    fn addrs_except(&self, skip: Option<usize>) -> String {
        self.controllers
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(_, c)| c.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `n` controllers on one etcd member, agent lease `lease`.
fn start(n: usize, lease: &'static str) -> anyhow::Result<Cluster> {
    let etcd = EtcdCluster::start(1)?;
    let dir = tempfile::tempdir()?;
    let opts = ControllerOpts {
        lease,
        heartbeat: "250ms",
        extra: vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            etcd.endpoints(),
            "--logs-dir".into(),
            dir.path().join("shared-logs").display().to_string(),
            "--leader-lease-ttl".into(),
            format!("{}s", LEADER_LEASE.as_secs()),
        ],
    };
    let mut controllers = Vec::new();
    for i in 0..n {
        controllers.push(Controller::start(
            &dir.path().join(format!("c{i}")),
            free_port(),
            &opts,
        )?);
    }
    Ok(Cluster {
        _etcd: etcd,
        dir,
        controllers,
    })
}

/// The leader's address, asked through `addrs`, once it says it leads on a healthy store.
async fn leader(addrs: &str) -> Option<String> {
    let ch = client::connect_leader(addrs).await.ok()?;
    let s = AdminServiceClient::new(ch)
        .cluster_status(ClusterStatusRequest {})
        .await
        .ok()?
        .into_inner();
    (s.answered_by_leader && s.store_healthy).then_some(s.leader)
}

#[tokio::test]
async fn frozen_leader_stalls_work_one_lease_and_requeues_nothing() -> anyhow::Result<()> {
    // An agent lease well above the time workers need to find the new leader: the new
    // leader must wait for them rather than requeue what they run.
    let c = start(3, "10s")?;
    let all = c.addrs_except(None);
    let first = eventually("a leader", T, || leader(&all)).await?;
    let idx = c
        .controllers
        .iter()
        .position(|x| x.addr.to_string() == first)
        .expect("leader is one of ours");
    let mut workers = Vec::new();
    for i in 0..2 {
        workers.push(Worker::start(
            &all,
            &c.dir.path().join(format!("w{i}")),
            &format!("w{i}"),
            3,
        )?);
    }
    let mut tasks = TaskServiceClient::new(admin_channel(&all).await?);
    let mut running = Vec::new();
    for i in 0..4 {
        running.push(
            submit(
                &mut tasks,
                shell(&format!("echo start-{i}; sleep 9; echo end-{i}")),
            )
            .await?,
        );
    }
    for id in &running {
        wait_state(&mut tasks, id, Some(TaskState::Running), T).await?;
    }

    let frozen_at = Instant::now();
    let thaw = Thaw::freeze(&c.controllers[idx].proc);
    let rest = c.addrs_except(Some(idx));
    // A task submitted after the freeze, through the surviving controllers (the client's
    // redirect to the frozen leader is bounded, so this retries instead of hanging).
    let probe = eventually("the probe to be accepted", T, || {
        let rest = rest.clone();
        async move {
            let mut t = TaskServiceClient::new(admin_channel(&rest).await.ok()?);
            submit(&mut t, shell("echo probe")).await.ok()
        }
    })
    .await?;
    // The CLI through the surviving controllers never hangs following a redirect into the
    // frozen leader: each try ends within the leader probe's bound, and one soon succeeds.
    let cfg = c.dir.path().join("cli");
    let cli_ok = eventually("a CLI submit through the survivors", T, || {
        let started = Instant::now();
        let out = cli(&cfg)
            .args(["submit", "--sh", "echo cli-probe", "--controller", &rest])
            .output()
            .expect("run scabbard");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(15),
            "`scabbard submit` took {took:?} with the leader frozen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::future::ready(out.status.success().then_some(took))
    })
    .await?;
    eprintln!(
        "frozen leader: CLI submit through the survivors succeeded {:?} after the freeze (last try {cli_ok:?})",
        frozen_at.elapsed()
    );
    let second = eventually("a new leader", T, || leader(&rest)).await?;
    assert_ne!(first, second);
    // A client given every controller, the frozen one first, does not wait for it: the
    // next address is tried alongside after a quarter of a second.
    let frozen_first = format!("{first},{rest}");
    let started = Instant::now();
    let mut t = TaskServiceClient::new(admin_channel(&frozen_first).await?);
    submit(&mut t, shell("echo frozen-first")).await?;
    let took = started.elapsed();
    eprintln!("frozen leader first in the list: connected and submitted in {took:?}");
    assert!(
        took < Duration::from_secs(4),
        "a frozen first address held the client up for {took:?} (its connect deadline is 5 s)"
    );
    let mut tasks = TaskServiceClient::new(admin_channel(&rest).await?);
    let p = wait_state(&mut tasks, &probe, None, T).await?;
    let resumed = frozen_at.elapsed();
    eprintln!("frozen leader: new leader {second}, probe done {resumed:?} after the freeze");
    assert_eq!(p.state(), TaskState::Succeeded, "{p:?}");
    let bound = LEADER_LEASE + Duration::from_secs(10);
    assert!(
        resumed < bound,
        "work resumed only {resumed:?} after the leader froze (bound {bound:?})"
    );

    for (i, id) in running.iter().enumerate() {
        let t = wait_state(&mut tasks, id, None, T).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
        assert_eq!(
            t.attempts.len(),
            1,
            "task {id}, running when the leader froze, was requeued: {t:?}"
        );
        assert_eq!(t.infra_failures, 0, "{t:?}");
        assert_eq!(
            logs(&mut tasks, id, 0, false).await?,
            format!("start-{i}\nend-{i}\n")
        );
    }
    drop(thaw);
    drop(workers);
    Ok(())
}

#[tokio::test]
async fn frozen_worker_is_requeued_after_one_agent_lease() -> anyhow::Result<()> {
    const LEASE_MS: i64 = 4_000;
    let c = start(1, "4s")?;
    let addrs = c.addrs_except(None);
    eventually("a leader", T, || leader(&addrs)).await?;
    let frozen = Worker::start(&addrs, &c.dir.path().join("frozen"), "frozen", 1)?;
    let mut tasks = TaskServiceClient::new(admin_channel(&addrs).await?);
    let id = submit(&mut tasks, shell("echo begin; sleep 30; echo done")).await?;
    let t = wait_state(&mut tasks, &id, Some(TaskState::Running), T).await?;
    assert_eq!(Some(t.agent_id.clone()), frozen.agent_id());

    let stopped_ms = now_ms();
    let thaw = Thaw::freeze(&frozen.proc);
    // Nobody else can take the task: what counts is when the frozen agent's attempt ends.
    let requeued = eventually("the frozen worker's attempt to be requeued", T, || {
        let mut tasks = tasks.clone();
        let id = id.clone();
        async move {
            let t = get(&mut tasks, &id).await.ok()?;
            let a = t.attempts.first()?;
            (a.finished_at_ms > 0).then_some(t)
        }
    })
    .await?;
    let after_ms = requeued.attempts[0].finished_at_ms - stopped_ms;
    eprintln!("frozen worker: attempt requeued {after_ms} ms after the freeze");
    assert!(
        after_ms < 2 * LEASE_MS,
        "requeued {after_ms} ms after the worker froze: more than two leases ({LEASE_MS} ms each)"
    );
    // Not early either: the heartbeat before the freeze was at most one interval earlier.
    assert!(
        after_ms >= LEASE_MS - 500,
        "requeued {after_ms} ms after the freeze, before the lease ran out: {requeued:?}"
    );
    assert_ne!(
        requeued.state(),
        TaskState::Running,
        "the frozen agent's attempt still counts as running: {requeued:?}"
    );
    drop(thaw);
    Ok(())
}

#[tokio::test]
async fn cli_timeout_against_a_frozen_controller_fails_fast_and_clearly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = Controller::start(&dir.path().join("c"), 0, &ControllerOpts::default())?;
    let addr = ctl.addr.to_string();
    let mut tasks = tasks_client(&addr).await?;
    let id = submit(&mut tasks, shell("true")).await?;

    let cfg = dir.path().join("cli");
    let run = |args: &[&str]| {
        let started = Instant::now();
        let out = cli(&cfg)
            .args(["--timeout", "2s"])
            .args(args)
            .args(["--controller", &addr])
            .output()
            .expect("run scabbard");
        (out, started.elapsed())
    };
    // Answered in time: the flag changes nothing.
    let (out, _) = run(&["task", "get", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let thaw = Thaw::freeze(&ctl.proc);
    for args in [&["task", "get", id.as_str()][..], &["task", "list"][..]] {
        let (out, took) = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "succeeded against a frozen controller"
        );
        assert!(
            err.contains("deadline exceeded") && err.contains("--timeout"),
            "unclear error: {err}"
        );
        assert!(
            took < Duration::from_secs(6),
            "`scabbard --timeout 2s {args:?}` took {took:?} against a frozen controller"
        );
    }
    drop(thaw);
    Ok(())
}
