//! `--kind failover` and `--kind chaos`: fault figures on real processes (an etcd cluster,
//! `scabbard` controller and worker processes), using the chaos harness of the test crate
//! (`scabbard_tests::chaos`). They need `etcd` on `PATH` (`scripts/setup.sh` installs it)
//! and the `scabbard` binary next to this one (`cargo build --release -p scabbard`), or
//! `SCABBARD_BIN`.
//!
//! * failover: for each of kill -9 of the leader controller, SIGSTOP of it and kill -9 of
//!   the etcd leader member, `--failover-runs` times: how long until a task submitted after
//!   the fault had succeeded (min / median / max), how many running tasks were requeued
//!   (0 expected) and whether the leader's term changed
//!   ([`scabbard_tests::chaos::failover`]).
//! * chaos: one run of the chaos suite (`--chaos-long` for the long form, `--tasks` to
//!   override the number of tasks); prints its figures and fails if anything was lost or
//!   duplicated.

use anyhow::Result;
use scabbard_tests::chaos::failover::{FailoverBench, Takeover, summary};
use scabbard_tests::chaos::{self, ChaosPlan};

/// Quiet processes unless the caller asked otherwise.
fn quiet() {
    if std::env::var_os("SCABBARD_TEST_LOG").is_none() {
        // SAFETY: called before the harness starts any process or reads the environment;
        // no other thread of ours touches it at this point.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("SCABBARD_TEST_LOG", "warn");
        }
    }
}

pub(crate) async fn failover(runs: usize) -> Result<()> {
    quiet();
    println!(
        "scabbard-bench: kind=failover etcd=3 members controllers=3 workers=2 \
         leader-lease=3s agent-lease=10s runs={runs} each"
    );
    let mut b = FailoverBench::start().await?;
    let mut samples = Vec::new();
    // Interleaved, so a slow stretch of the machine does not land on one kind.
    // SCABBARD_FAILOVER_ONLY=kill-leader|stop-leader|kill-etcd-leader measures one kind.
    let only = std::env::var("SCABBARD_FAILOVER_ONLY").ok();
    let kinds: Vec<Takeover> = Takeover::ALL
        .into_iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == t.flag()))
        .collect();
    for _ in 0..runs {
        for &t in &kinds {
            let s = b.measure(t).await?;
            println!(
                "  {:<28} work resumed after {:.2} s  requeued {}/{}  term changed: {}",
                t.name(),
                s.resumed.as_secs_f64(),
                s.requeued,
                s.running,
                s.term_changed
            );
            samples.push(s);
        }
    }
    print!("{}", summary(&samples));
    Ok(())
}

pub(crate) async fn chaos(long: bool, tasks: Option<usize>) -> Result<()> {
    quiet();
    let mut plan = if long {
        ChaosPlan::long()
    } else {
        ChaosPlan::short()
    };
    if let Some(n) = tasks {
        plan.tasks = n;
    }
    println!(
        "scabbard-bench: kind=chaos form={} tasks={} workflows={} faults={:?}",
        if long { "long" } else { "short" },
        plan.tasks,
        plan.workflows,
        plan.faults
    );
    let report = chaos::run(&plan).await?;
    println!("{report}");
    report.assert_clean()
}
