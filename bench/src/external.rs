//! `--external`: the bench starts a `scabbard controller` process and `--workers`
//! `scabbard worker` processes (real processes, each with its own memory and sockets, as a
//! cluster runs) and acts as a client only: the same latency and throughput runs as the
//! in-process mode, so the two can be reported side by side.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use scabbard_common::client::{self, AdminServiceClient};
use scabbard_common::proto::ListAgentsRequest;

use crate::agents::{ControllerProc, rss_kib, scabbard_bin};
use crate::{ADMIN_TOKEN, Args};

/// Registration token the bench's controller process is started with.
const REG_TOKEN: &str = "bench-registration-token-0123456789";

/// Worker processes, killed on drop.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) async fn run(args: &Args) -> Result<()> {
    let bin = scabbard_bin()?;
    let dir = tempfile::tempdir()?;
    let namespace = format!("/bench-ext-{}/", std::process::id());
    let mut extra: Vec<String> = Vec::new();
    let mut listen = "127.0.0.1:0".to_string();
    if args.store == "etcd" {
        // etcd mode needs an advertised address (followers redirect to it): a free
        // loopback port, chosen before the controller binds it.
        listen = crate::free_loopback_addr()?.to_string();
        extra.extend(["--advertise-addr".into(), listen.clone()]);
        extra.extend([
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            args.etcd_endpoints.clone(),
            "--etcd-max-txn-ops".into(),
            args.etcd_max_txn_ops.to_string(),
            "--etcd-namespace".into(),
            namespace,
        ]);
    }
    extra.extend(args.controller_args.split_whitespace().map(str::to_string));
    let ctl = ControllerProc::start_on(&bin, &dir.path().join("controller"), &listen, &extra)?;
    let mut workers = Workers(Vec::new());
    for i in 0..args.workers {
        let child = Command::new(&bin)
            .args(["worker", "--controller", &ctl.addr])
            .args(["--registration-token", REG_TOKEN])
            .args(["--name", &format!("bench-ext-{i}")])
            .args(["--slots", &args.slots.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join(format!("worker-{i}")))
            .env(
                "SCABBARD_LOG",
                std::env::var("SCABBARD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        workers.0.push(child);
    }
    let channel = client::authed(client::connect(&ctl.addr).await?, Some(ADMIN_TOKEN))?;
    let mut admin = AdminServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let agents = admin.list_agents(ListAgentsRequest {}).await?.into_inner();
        if agents.agents.iter().filter(|a| a.status == 1).count() >= args.workers {
            break;
        }
        if Instant::now() > deadline {
            bail!("the worker processes did not attach");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "scabbard-bench: kind={} EXTERNAL (controller pid {} + {} worker processes) slots={} store={} batch={}",
        args.kind,
        ctl.pid(),
        args.workers,
        args.slots,
        args.store,
        args.batch
    );
    crate::measure(args, channel, None).await?;
    println!(
        "controller RSS after the run: {} KiB",
        rss_kib(ctl.pid()).unwrap_or(0)
    );
    drop(workers);
    Ok(())
}
