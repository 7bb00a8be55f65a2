//! `scabbard dev`, `scabbard controller`, `scabbard worker`: config from file, then env and
//! flags; validated before anything starts.

use anyhow::{Context, Result};
use scabbard_controller::ControllerConfig;
use scabbard_worker::WorkerConfig;

use crate::args::{ControllerArgs, DevArgs, WorkerArgs};

pub(crate) async fn dev(a: DevArgs) -> Result<u8> {
    let (data_dir, _temp) = match a.data_dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new().prefix("scabbard-dev-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let token = format!("dev-{}", scabbard_controller::auth::new_agent_token());
    let cfg = ControllerConfig {
        listen: a.listen,
        data_dir: data_dir.join("controller"),
        registration_token: token.clone(),
        heartbeat_interval_ms: 1_000,
        agent_lease_ttl_ms: 5_000,
        ..ControllerConfig::default()
    };
    let shutdown = super::shutdown_on_signals();
    let controller = scabbard_controller::spawn(cfg).await?;
    let addr = controller.addr;
    let worker_cfg = WorkerConfig {
        controller: addr.to_string(),
        registration_token: token,
        name: "dev-worker".into(),
        slots: a.slots,
        data_dir: data_dir.join("worker"),
        shutdown_grace_ms: 3_000,
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(scabbard_worker::run(worker_cfg, shutdown.clone()));
    println!(
        "Scabbard dev mode: controller + 1 local worker ({} slots), embedded store",
        a.slots
    );
    println!("  gRPC address: {addr}");
    println!("  data dir:     {}", data_dir.display());
    println!();
    println!("Try:");
    println!("  scabbard submit --controller {addr} --follow -- echo hello from scabbard");
    println!("  scabbard task list --controller {addr}");
    println!("  scabbard agents list --controller {addr}");
    println!("  grpcurl -plaintext {addr} list");
    println!();
    println!("Ctrl-C stops everything.");
    // The worker returns once shutdown was asked and its tasks reported (or on error).
    worker.await.context("worker task")?.context("worker")?;
    controller.shutdown.cancel();
    controller.task.await.context("controller task")??;
    Ok(0)
}

pub(crate) async fn controller(a: ControllerArgs) -> Result<u8> {
    let mut cfg = match &a.config {
        Some(p) => ControllerConfig::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => ControllerConfig::default(),
    };
    if let Some(store) = a.store {
        cfg.store = store;
    }
    if !a.etcd_endpoints.is_empty() {
        cfg.etcd.endpoints = a.etcd_endpoints;
    }
    if a.etcd_username.is_some() {
        cfg.etcd.username = a.etcd_username;
    }
    if a.etcd_password.is_some() {
        cfg.etcd.password = a.etcd_password;
    }
    if a.etcd_ca_file.is_some() {
        cfg.etcd.ca_file = a.etcd_ca_file;
    }
    if a.etcd_cert_file.is_some() {
        cfg.etcd.cert_file = a.etcd_cert_file;
    }
    if a.etcd_key_file.is_some() {
        cfg.etcd.key_file = a.etcd_key_file;
    }
    if let Some(ns) = a.etcd_namespace {
        cfg.etcd.namespace = ns;
    }
    if a.advertise_addr.is_some() {
        cfg.advertise_addr = a.advertise_addr;
    }
    if a.logs_dir.is_some() {
        cfg.logs_dir = a.logs_dir;
    }
    if let Some(d) = a.leader_lease_ttl {
        cfg.leader_lease_ttl_ms = d.as_millis() as u64;
    }
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if let Some(t) = a.registration_token {
        cfg.registration_token = t;
    }
    if let Ok(t) = std::env::var("SCABBARD_BOOTSTRAP_TOKEN")
        && !t.trim().is_empty()
    {
        cfg.bootstrap_token = Some(t);
    }
    if let Some(d) = a.agent_lease_ttl {
        cfg.agent_lease_ttl_ms = d.as_millis() as u64;
    }
    if let Some(d) = a.heartbeat_interval {
        cfg.heartbeat_interval_ms = d.as_millis() as u64;
    }
    cfg.validate()?;
    let shutdown = super::shutdown_on_signals();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    // Tests and scripts read the bound address from this line.
    println!("listening on {}", listener.local_addr()?);
    scabbard_controller::run(cfg, listener, shutdown).await?;
    Ok(0)
}

pub(crate) async fn worker(a: WorkerArgs) -> Result<u8> {
    let mut cfg = match &a.config {
        Some(p) => WorkerConfig::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => WorkerConfig::default(),
    };
    if let Some(c) = a.controller {
        cfg.controller = c;
    }
    if let Some(t) = a.registration_token {
        cfg.registration_token = t;
    }
    if let Some(n) = a.name {
        cfg.name = n;
    }
    cfg.labels.extend(a.labels);
    if let Some(s) = a.slots {
        cfg.slots = s;
    }
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if let Some(g) = a.shutdown_grace {
        cfg.shutdown_grace_ms = g.as_millis() as u64;
    }
    cfg.validate()?;
    let shutdown = super::shutdown_on_signals();
    scabbard_worker::run(cfg, shutdown).await?;
    Ok(0)
}
