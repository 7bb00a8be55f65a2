//! `scabbard dev`, `scabbard controller`, `scabbard worker`: config from file, then env and
//! flags; validated before anything starts.

use anyhow::{Context, Result};
use scabbard_controller::ControllerConfig;
use scabbard_worker::WorkerConfig;

use crate::args::{ArtifactStoreArgs, ControllerArgs, DevArgs, WorkerArgs};

pub(crate) async fn dev(a: DevArgs) -> Result<u8> {
    let (data_dir, _temp) = match a.data_dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new().prefix("scabbard-dev-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let token = format!("dev-{}", scabbard_controller::auth::new_agent_token());
    let worker_name = "dev-worker";
    let admin_token = super::security::dev_admin_token(&data_dir)?;
    let pki = if a.tls {
        Some(dev_pki(&data_dir, worker_name, a.listen)?)
    } else {
        None
    };
    let mut cfg = ControllerConfig {
        listen: a.listen,
        data_dir: data_dir.join("controller"),
        registration_token: token.clone(),
        bootstrap_token: Some(admin_token.clone()),
        heartbeat_interval_ms: 1_000,
        agent_lease_ttl_ms: 5_000,
        http_listen: Some(dev_http_listen(a.http_listen, a.listen)?),
        templates_dir: a.templates_dir.clone(),
        ..ControllerConfig::default()
    };
    let http = cfg.http_listen.unwrap_or(a.listen);
    if let Some(p) = &pki {
        cfg.tls = scabbard_controller::tls::TlsConfig {
            cert_file: Some(p.server_cert.clone()),
            key_file: Some(p.server_key.clone()),
            client_ca_file: Some(p.ca_cert.clone()),
            require_worker_client_cert: true,
            // One controller: nobody to forward to, but the same CA would verify peers.
            peer_ca_file: Some(p.ca_cert.clone()),
            peer_domain: None,
        };
    }
    let shutdown = super::shutdown_on_signals();
    let controller = scabbard_controller::spawn(cfg).await?;
    // The banner names the HTTP API once it accepts (the controller binds it after its
    // first election).
    let http_probe = if http.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], http.port()))
    } else {
        http
    };
    let ready = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(http_probe).await.is_err()
        && tokio::time::Instant::now() < ready
        && !controller.task.is_finished()
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let addr = controller.addr;
    // Reach a wildcard listener through loopback (the dev certificate names 127.0.0.1).
    let local = if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    // Tasks never see the admin token: the dev data dir (controller, worker identity,
    // admin.token) and the CLI's credentials are hidden from shell tasks, which work in a
    // directory outside them.
    let work = tempfile::Builder::new()
        .prefix("scabbard-dev-work-")
        .tempdir()?;
    let creds_dir = crate::credentials::config_dir()?;
    scabbard_common::private::private_dir(&creds_dir)
        .with_context(|| format!("creating {}", creds_dir.display()))?;
    let worker_cfg = WorkerConfig {
        controller: local.to_string(),
        registration_token: token,
        name: worker_name.into(),
        slots: a.slots,
        data_dir: data_dir.join("worker"),
        work_dir: Some(work.path().to_path_buf()),
        shutdown_grace_ms: 3_000,
        ca_cert: pki.as_ref().map(|p| p.ca_cert.clone()),
        client_cert: pki.as_ref().map(|p| p.worker_cert.clone()),
        client_key: pki.as_ref().map(|p| p.worker_key.clone()),
        shell: dev_shell(&[absolute(&data_dir)?, absolute(&creds_dir)?]),
        ..WorkerConfig::default()
    };
    let worker = tokio::spawn(scabbard_worker::run(worker_cfg, shutdown.clone()));
    say!(
        "Scabbard dev mode: controller + 1 local worker ({} slots), embedded store{}",
        a.slots,
        if pki.is_some() { ", TLS" } else { "" }
    );
    say!("  gRPC address: {addr}");
    // The HTTP API speaks TLS with the controller's certificate when it has one.
    let scheme = if pki.is_some() { "https" } else { "http" };
    say!(
        "  HTTP API:     {scheme}://{http}/api/v1 (OpenAPI: {scheme}://{http}/api/v1/openapi.json)"
    );
    say!("  data dir:     {}", data_dir.display());
    let tls_flag = match &pki {
        Some(p) => {
            say!("  TLS:          throwaway CA in {}", p.dir.display());
            say!("                CA certificate {}", p.ca_cert.display());
            say!(
                "                the worker {worker_name:?} uses mutual TLS ({})",
                p.worker_cert.display()
            );
            format!(" --ca-cert {}", p.ca_cert.display())
        }
        None => String::new(),
    };
    say!("  admin token:  {admin_token}");
    let ca = pki.as_ref().map(|p| p.ca_cert.as_path());
    match super::security::save_dev_login(&local.to_string(), &admin_token, ca) {
        Ok((path, ctx)) => {
            say!("                saved for {local} in {}", path.display());
            say!(
                "  context:      {ctx:?} (current: plain `scabbard …` commands talk to this controller)"
            );
        }
        Err(e) => esay!("warning: the admin token is not saved: {e:#}"),
    }
    say!();
    say!("Try:");
    say!("  scabbard submit --controller {local}{tls_flag} --follow -- echo hello from scabbard");
    say!("  scabbard task list --controller {local}{tls_flag}");
    say!("  scabbard agents list --controller {local}{tls_flag}");
    match &pki {
        Some(p) => say!("  grpcurl -cacert {} {local} list", p.ca_cert.display()),
        None => say!("  grpcurl -plaintext {local} list"),
    }
    say!();
    say!("Ctrl-C stops everything.");
    // The worker returns once shutdown was asked and its tasks reported (or on error).
    worker.await.context("worker task")?.context("worker")?;
    controller.shutdown.cancel();
    controller.task.await.context("controller task")??;
    Ok(0)
}

/// The dev HTTP API address: the given one, 127.0.0.1:7480, or a free port on the gRPC
/// listener's address when that port is 0 (tests, several dev instances).
fn dev_http_listen(
    given: Option<std::net::SocketAddr>,
    grpc: std::net::SocketAddr,
) -> Result<std::net::SocketAddr> {
    if let Some(a) = given {
        return Ok(a);
    }
    if grpc.port() != 0 {
        return Ok(std::net::SocketAddr::new(grpc.ip(), 7480));
    }
    let probe = std::net::TcpListener::bind(std::net::SocketAddr::new(grpc.ip(), 0))
        .context("finding a free port for the HTTP API")?;
    Ok(probe.local_addr()?)
}

/// Shell tasks of the dev worker with `hidden` out of their sight; where this host cannot
/// give them their own namespaces, they run without, and a warning says what they can read.
fn dev_shell(hidden: &[std::path::PathBuf]) -> scabbard_worker::config::ShellConfig {
    let shell = scabbard_worker::config::ShellConfig {
        hide: hidden.to_vec(),
        ..Default::default()
    };
    match shell.resolve_hide() {
        Ok(_) => shell,
        Err(e) => {
            esay!(
                "warning: shell tasks will be able to read the admin token in {} and the CLI's credentials: {e}",
                hidden
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            );
            scabbard_worker::config::ShellConfig::default()
        }
    }
}

/// `p` made absolute against the current directory (and existing).
fn absolute(p: &std::path::Path) -> Result<std::path::PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))
}

/// Generates the dev PKI into `<data_dir>/tls/`: the controller's certificate names
/// localhost, 127.0.0.1, ::1, the listen address and (on a wildcard listener) this host.
fn dev_pki(
    data_dir: &std::path::Path,
    worker_name: &str,
    listen: std::net::SocketAddr,
) -> Result<scabbard_common::tls::DevPki> {
    let mut extra = Vec::new();
    if listen.ip().is_unspecified() {
        if let Ok(h) = std::fs::read_to_string("/etc/hostname")
            && !h.trim().is_empty()
        {
            extra.push(h.trim().to_string());
        }
    } else {
        extra.push(listen.ip().to_string());
    }
    let dir = data_dir.join("tls");
    scabbard_common::tls::generate_dev_pki(&dir, worker_name, &extra)
        .with_context(|| format!("generating the dev TLS certificates in {}", dir.display()))
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
    if let Some(d) = a.etcd_attempt_timeout {
        cfg.etcd.attempt_timeout = d;
    }
    if let Some(d) = a.etcd_request_timeout {
        cfg.etcd.request_timeout = d;
    }
    if let Some(n) = a.etcd_max_txn_ops {
        cfg.etcd.max_txn_ops = n;
    }
    if a.advertise_addr.is_some() {
        cfg.advertise_addr = a.advertise_addr;
    }
    if a.logs_dir.is_some() {
        cfg.logs_dir = a.logs_dir;
    }
    if a.secrets_key_file.is_some() {
        cfg.secrets_key_file = a.secrets_key_file;
    }
    if a.metrics_listen.is_some() {
        cfg.metrics_listen = a.metrics_listen;
    }
    if a.http_listen.is_some() {
        cfg.http_listen = a.http_listen;
    }
    if a.templates_dir.is_some() {
        cfg.templates_dir = a.templates_dir;
    }
    if let Some(d) = a.cache_affinity_wait {
        cfg.cache_affinity_wait_ms = d.as_millis() as u64;
    }
    if let Some(d) = a.retention_days {
        cfg.retention_days = d;
    }
    if let Some(d) = a.retention_sweep_interval {
        cfg.retention_sweep_interval_ms = d.as_millis() as u64;
    }
    if let Some(n) = a.breaker_threshold {
        cfg.breaker_threshold = n;
    }
    if let Some(d) = a.breaker_open {
        cfg.breaker_open_ms = d.as_millis() as u64;
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
    if a.bootstrap_token_file.is_some() {
        cfg.bootstrap_token_file = a.bootstrap_token_file;
    }
    if let Some(d) = a.agent_lease_ttl {
        cfg.agent_lease_ttl_ms = d.as_millis() as u64;
    }
    if let Some(d) = a.heartbeat_interval {
        cfg.heartbeat_interval_ms = d.as_millis() as u64;
    }
    if let Some(r) = a.rate_limit {
        cfg.rate_limit_per_second = r;
        // The burst defaults to the rate given (not to the default rate's burst).
        cfg.rate_limit_burst = 0;
    }
    if let Some(b) = a.rate_burst {
        cfg.rate_limit_burst = b;
    }
    if let Some(n) = a.max_concurrent_requests {
        cfg.max_concurrent_requests = n;
    }
    if let Some(d) = a.rpc_timeout {
        cfg.rpc_timeout_ms = d.as_millis() as u64;
    }
    if let Some(n) = a.max_message_bytes {
        cfg.max_message_bytes = n;
    }
    if let Some(n) = a.max_spec_bytes {
        cfg.max_spec_bytes = n;
    }
    if let Some(n) = a.max_result_bytes {
        cfg.max_result_bytes = n;
    }
    if let Some(n) = a.max_outputs_bytes {
        cfg.max_outputs_bytes = n;
    }
    if let Some(n) = a.max_workflow_bytes {
        cfg.max_workflow_bytes = n;
    }
    if let Some(d) = a.min_schedule_interval {
        cfg.min_schedule_interval_ms = d.as_millis() as u64;
    }
    if let Some(n) = a.max_schedules_per_project {
        cfg.max_schedules_per_project = n;
    }
    if let Some(n) = a.max_stream_buffer_bytes {
        cfg.max_stream_buffer_bytes = n;
    }
    if let Some(n) = a.max_streams_per_token {
        cfg.max_streams_per_token = n;
    }
    if let Some(d) = a.handshake_timeout {
        cfg.handshake_timeout_ms = d.as_millis() as u64;
    }
    if let Some(n) = a.max_connections_per_ip {
        cfg.max_connections_per_ip = n;
    }
    if let Some(n) = a.agent_queue_capacity {
        cfg.agent_queue_capacity = n;
    }
    if let Some(d) = a.assign_accept_timeout {
        cfg.assign_accept_timeout_ms = d.as_millis() as u64;
    }
    if let Some(n) = a.finished_cache_tasks {
        cfg.finished_cache_tasks = n;
    }
    if let Some(n) = a.finished_cache_workflows {
        cfg.finished_cache_workflows = n;
    }
    if let Some(d) = a.idempotency_window {
        cfg.idempotency_window_ms = d.as_millis() as u64;
    }
    if a.tls_cert.is_some() {
        cfg.tls.cert_file = a.tls_cert;
    }
    if a.tls_key.is_some() {
        cfg.tls.key_file = a.tls_key;
    }
    if a.tls_client_ca.is_some() {
        cfg.tls.client_ca_file = a.tls_client_ca;
    }
    if a.require_worker_client_cert {
        cfg.tls.require_worker_client_cert = true;
    }
    if a.tls_peer_ca.is_some() {
        cfg.tls.peer_ca_file = a.tls_peer_ca;
    }
    if a.tls_peer_domain.is_some() {
        cfg.tls.peer_domain = a.tls_peer_domain;
    }
    apply_artifact_args(&mut cfg.artifacts, a.artifacts);
    cfg.validate()?;
    let shutdown = super::shutdown_on_signals();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    // Tests and scripts read the bound address from this line.
    say!("listening on {}", listener.local_addr()?);
    scabbard_controller::run(cfg, listener, shutdown).await?;
    Ok(0)
}

/// Flags and environment over the config file's `[artifacts]`.
fn apply_artifact_args(
    cfg: &mut scabbard_controller::artifacts::ArtifactsConfig,
    a: ArtifactStoreArgs,
) {
    if let Some(b) = a.artifacts_backend {
        cfg.backend = b;
    }
    if a.artifacts_dir.is_some() {
        cfg.dir = a.artifacts_dir;
    }
    if let Some(n) = a.max_artifact_bytes {
        cfg.max_artifact_bytes = n;
    }
    if let Some(n) = a.max_task_artifact_bytes {
        cfg.max_task_artifact_bytes = n;
    }
    let s3 = &mut cfg.s3;
    if let Some(v) = a.artifacts_s3_bucket {
        s3.bucket = v;
    }
    if let Some(v) = a.artifacts_s3_prefix {
        s3.prefix = v;
    }
    if let Some(v) = a.artifacts_s3_endpoint {
        s3.endpoint = v;
    }
    if let Some(v) = a.artifacts_s3_region {
        s3.region = v;
    }
    if let Some(v) = a.artifacts_s3_access_key_id {
        s3.access_key_id = v;
    }
    if let Ok(v) = std::env::var("SCABBARD_S3_SECRET_ACCESS_KEY")
        && !v.trim().is_empty()
    {
        s3.secret_access_key = v.trim().to_string();
        s3.secret_access_key_file = None;
    }
    if let Some(f) = a.artifacts_s3_secret_access_key_file {
        s3.secret_access_key_file = Some(f);
        s3.secret_access_key.clear();
    }
    if a.artifacts_s3_allow_http {
        s3.allow_http = true;
    }
    if a.artifacts_s3_virtual_hosted_style {
        s3.virtual_hosted_style = true;
    }
}

pub(crate) async fn worker(a: WorkerArgs) -> Result<u8> {
    let mut cfg = match &a.config {
        Some(p) => WorkerConfig::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => WorkerConfig::default(),
    };
    // With `shell.run_as` the worker checks that its tasks cannot read this file.
    cfg.config_file = a.config.clone();
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
    if a.metrics_listen.is_some() {
        cfg.metrics_listen = a.metrics_listen;
    }
    if a.ca_cert.is_some() {
        cfg.ca_cert = a.ca_cert;
    }
    if a.client_cert.is_some() {
        cfg.client_cert = a.client_cert;
    }
    if a.client_key.is_some() {
        cfg.client_key = a.client_key;
    }
    if a.tls_domain.is_some() {
        cfg.tls_domain = a.tls_domain;
    }
    cfg.validate()?;
    let shutdown = super::shutdown_on_signals();
    scabbard_worker::run(cfg, shutdown).await?;
    Ok(0)
}
