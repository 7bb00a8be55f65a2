//! Several controllers on one real etcd: leader election, redirects, and failover with
//! kill -9 of the leader while tasks run.

use std::time::{Duration, Instant};

use scabbard_common::client::{self, AdminServiceClient, TaskServiceClient};
use scabbard_common::proto::{ClusterStatusRequest, TaskState};
use scabbard_tests::etcd::EtcdCluster;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(60);

struct Cluster {
    _etcd: EtcdCluster,
    _dir: tempfile::TempDir,
    controllers: Vec<Controller>,
    workers: Vec<Worker>,
}

impl Cluster {
    fn addrs(&self) -> String {
        self.controllers
            .iter()
            .map(|c| c.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn start(controllers: usize, workers: usize) -> anyhow::Result<Cluster> {
    let etcd = EtcdCluster::start(1)?;
    let dir = tempfile::tempdir()?;
    let opts = ControllerOpts {
        lease: "4s",
        extra: vec![
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            etcd.endpoints(),
            "--logs-dir".into(),
            dir.path().join("shared-logs").display().to_string(),
            "--leader-lease-ttl".into(),
            "2s".into(),
        ],
        ..ControllerOpts::default()
    };
    let mut cs = Vec::new();
    for i in 0..controllers {
        cs.push(Controller::start(
            &dir.path().join(format!("c{i}")),
            free_port(),
            &opts,
        )?);
    }
    let addrs = cs
        .iter()
        .map(|c| c.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut ws = Vec::new();
    for i in 0..workers {
        ws.push(Worker::start(
            &addrs,
            &dir.path().join(format!("w{i}")),
            &format!("w{i}"),
            3,
        )?);
    }
    Ok(Cluster {
        _etcd: etcd,
        _dir: dir,
        controllers: cs,
        workers: ws,
    })
}

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
async fn followers_redirect_to_the_single_leader() -> anyhow::Result<()> {
    let c = start(3, 0)?;
    let addrs = c.addrs();
    let leader = eventually("a leader", T, || leader(&addrs)).await?;
    let mut redirects = 0;
    for ctl in &c.controllers {
        let s = AdminServiceClient::new(client::connect(&ctl.addr.to_string()).await?)
            .cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner();
        assert_eq!(s.leader, leader, "every controller names the same leader");
        assert_eq!(s.members.len(), 3, "{s:?}");
        if ctl.addr.to_string() != leader {
            let err = TaskServiceClient::new(client::connect(&ctl.addr.to_string()).await?)
                .submit(scabbard_common::proto::SubmitTaskRequest {
                    spec: Some(shell("true")),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unavailable);
            assert_eq!(
                scabbard_common::error::leader_hint(&err).as_deref(),
                Some(leader.as_str())
            );
            redirects += 1;
        }
    }
    assert_eq!(redirects, 2);
    Ok(())
}

#[tokio::test]
async fn killing_the_leader_loses_no_task_and_runs_none_twice() -> anyhow::Result<()> {
    let mut c = start(3, 2)?;
    let addrs = c.addrs();
    let first = eventually("a leader", T, || leader(&addrs)).await?;
    let mut tasks = TaskServiceClient::new(client::connect_leader(&addrs).await?);
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(
            submit(
                &mut tasks,
                shell(&format!("echo start-{i}; sleep 1.5; echo end-{i}")),
            )
            .await?,
        );
    }
    eventually("tasks running", T, || {
        let mut tasks = tasks.clone();
        let id = ids[0].clone();
        async move { (get(&mut tasks, &id).await.ok()?.state() == TaskState::Running).then_some(()) }
    })
    .await?;

    let idx = c
        .controllers
        .iter()
        .position(|x| x.addr.to_string() == first)
        .expect("leader is one of ours");
    let killed = Instant::now();
    c.controllers[idx].proc.kill9();
    let rest: String = c
        .controllers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .map(|(_, x)| x.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let second = eventually("a new leader", T, || leader(&rest)).await?;
    eprintln!("failover: new leader {second} after {:?}", killed.elapsed());
    assert_ne!(first, second);

    let mut tasks = TaskServiceClient::new(client::connect_leader(&rest).await?);
    for (i, id) in ids.iter().enumerate() {
        let t = wait_state(&mut tasks, id, None, T).await?;
        assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
        assert_eq!(t.attempts.len(), 1, "task {id} ran more than once: {t:?}");
        assert_eq!(
            logs(&mut tasks, id, 0, false).await?,
            format!("start-{i}\nend-{i}\n")
        );
    }
    let _ = &c.workers;
    Ok(())
}
