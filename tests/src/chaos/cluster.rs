//! The chaos cluster: an etcd cluster, controllers each behind its own TCP proxy (the proxy
//! address is what the controller advertises, so every worker and client stream to the
//! leader crosses a proxy that can cut it), and worker processes. Every process is killed
//! when the cluster drops. Faults are methods here; they wait on conditions with deadlines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_common::client::{self, AdminServiceClient};
use scabbard_common::proto::ClusterStatusRequest;

use crate::etcd::EtcdCluster;
use crate::proxy::Proxy;
use crate::{ADMIN_TOKEN, Controller, ControllerOpts, Worker, free_port, with_token};

/// Agent lease of the chaos cluster's controllers.
pub const AGENT_LEASE: Duration = Duration::from_secs(3);
/// Leader lease of the chaos cluster's controllers (see [`ChaosCluster::start_with`]).
pub const LEADER_LEASE: &str = "2s";
/// Bound of every single RPC the harness makes.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// One controller slot: its process (None while killed), its port and proxy.
pub struct ControllerSlot {
    /// The process, while running.
    pub ctl: Option<Controller>,
    /// Port it listens on.
    pub port: u16,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// The proxy in front of it (its advertised address).
    pub proxy: Proxy,
}

/// A running chaos cluster.
pub struct ChaosCluster {
    /// The etcd cluster.
    pub etcd: EtcdCluster,
    /// Controllers behind their proxies.
    pub controllers: Vec<ControllerSlot>,
    /// Worker processes (respawned on the same data dir after a kill).
    pub workers: Vec<Worker>,
    /// Holds every data dir.
    pub dir: tempfile::TempDir,
    /// The flags every controller gets.
    opts: ControllerOpts,
}

impl ChaosCluster {
    /// Starts `etcd_members` etcd members, `controllers` controllers and `workers` workers
    /// with `slots` each.
    pub async fn start(
        etcd_members: usize,
        controllers: usize,
        workers: usize,
        slots: u32,
    ) -> Result<Self> {
        Self::start_with(etcd_members, controllers, workers, slots, LEADER_LEASE).await
    }

    /// [`Self::start`] with another leader lease (e.g. the production default, `3s`).
    pub async fn start_with(
        etcd_members: usize,
        controllers: usize,
        workers: usize,
        slots: u32,
        leader_lease: &str,
    ) -> Result<Self> {
        Self::start_leases(
            etcd_members,
            controllers,
            workers,
            slots,
            leader_lease,
            "3s",
        )
        .await
    }

    /// [`Self::start_with`] with another agent lease too (the production default is `10s`).
    pub async fn start_leases(
        etcd_members: usize,
        controllers: usize,
        workers: usize,
        slots: u32,
        leader_lease: &str,
        agent_lease: &'static str,
    ) -> Result<Self> {
        let etcd = EtcdCluster::start(etcd_members)?;
        let dir = tempfile::Builder::new()
            .prefix("scabbard-chaos-")
            .tempdir()?;
        let opts = ControllerOpts {
            lease: agent_lease,
            extra: vec![
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                etcd.endpoints(),
                "--logs-dir".into(),
                dir.path().join("shared-logs").display().to_string(),
                "--leader-lease-ttl".into(),
                leader_lease.into(),
            ],
            ..ControllerOpts::default()
        };
        let mut slots_v = Vec::new();
        for i in 0..controllers {
            let port = free_port();
            let upstream: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let proxy = Proxy::start(upstream).await?;
            let mut slot = ControllerSlot {
                ctl: None,
                port,
                data_dir: dir.path().join(format!("c{i}")),
                proxy,
            };
            slot.ctl = Some(spawn_controller(&slot, &opts)?);
            slots_v.push(slot);
        }
        let mut c = Self {
            etcd,
            controllers: slots_v,
            workers: Vec::new(),
            dir,
            opts,
        };
        let addrs = c.addrs();
        for i in 0..workers {
            c.workers.push(Worker::start(
                &addrs,
                &c.dir.path().join(format!("w{i}")),
                &format!("w{i}"),
                slots,
            )?);
        }
        Ok(c)
    }

    /// Every controller's advertised (proxy) address, comma-separated.
    pub fn addrs(&self) -> String {
        self.controllers
            .iter()
            .map(|c| c.proxy.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The advertised addresses of the running controllers.
    pub fn live_addrs(&self) -> String {
        self.controllers
            .iter()
            .filter(|c| c.ctl.is_some())
            .map(|c| c.proxy.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the leading controller, as the cluster reports it (None if no leader
    /// answers with a healthy store).
    pub async fn leader(&self) -> Option<usize> {
        let addr = leader_of(&self.live_addrs()).await?;
        self.controllers
            .iter()
            .position(|c| c.proxy.addr.to_string() == addr)
    }

    /// Waits for a leader other than `not` (None: any); returns its index.
    pub async fn wait_leader(&self, not: Option<usize>, timeout: Duration) -> Result<usize> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader().await
                && Some(i) != not
            {
                return Ok(i);
            }
            if Instant::now() > end {
                bail!("no new leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9 of controller `i`.
    pub fn kill_controller(&mut self, i: usize) {
        if let Some(mut c) = self.controllers[i].ctl.take() {
            c.proc.kill9();
        }
    }

    /// Starts controller `i` again on its port and data dir.
    pub fn restart_controller(&mut self, i: usize) -> Result<()> {
        self.kill_controller(i);
        let c = spawn_controller(&self.controllers[i], &self.opts)?;
        self.controllers[i].ctl = Some(c);
        Ok(())
    }

    /// kill -9 of worker `i`, then a new process on the same data dir (same identity and
    /// spool, as a supervisor would restart it).
    pub fn kill_and_restart_worker(&mut self, i: usize, slots: u32) -> Result<()> {
        self.workers[i].proc.kill9();
        let addrs = self.addrs();
        self.workers[i] = Worker::start(
            &addrs,
            &self.dir.path().join(format!("w{i}")),
            &format!("w{i}"),
            slots,
        )?;
        Ok(())
    }

    /// The index of the etcd member that leads the etcd cluster.
    pub async fn etcd_leader(&self) -> Option<usize> {
        for (i, m) in self.etcd.members.iter().enumerate() {
            let Ok(Ok(mut c)) = tokio::time::timeout(
                Duration::from_secs(2),
                etcd_client::Client::connect([m.client_url.as_str()], None),
            )
            .await
            else {
                continue;
            };
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await
                && let Some(h) = s.header()
                && h.member_id() == s.leader()
            {
                return Some(i);
            }
        }
        None
    }
}

fn spawn_controller(slot: &ControllerSlot, opts: &ControllerOpts) -> Result<Controller> {
    let mut opts = opts.clone();
    opts.extra
        .extend(["--advertise-addr".into(), slot.proxy.addr.to_string()]);
    Controller::start(&slot.data_dir, slot.port, &opts).context("start a chaos controller")
}

/// The leader's advertised address, asked of the controllers in `addrs`, if it answers with
/// a healthy store.
pub async fn leader_of(addrs: &str) -> Option<String> {
    let ask = async {
        let ch = client::connect_leader(addrs).await.ok()?;
        let s = AdminServiceClient::new(with_token(ch, ADMIN_TOKEN))
            .cluster_status(ClusterStatusRequest {})
            .await
            .ok()?
            .into_inner();
        (s.answered_by_leader && s.store_healthy).then_some(s.leader)
    };
    tokio::time::timeout(RPC_TIMEOUT, ask).await.ok().flatten()
}
