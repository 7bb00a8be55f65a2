//! Wiring: opens the store and the log store, starts the core, and serves every gRPC
//! service (plus health and reflection v1/v1alpha) on a listener until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scabbard_common::proto::{
    FILE_DESCRIPTOR_SET, admin_service_server::AdminServiceServer,
    agent_service_server::AgentServiceServer, task_service_server::TaskServiceServer,
};
use scabbard_common::{Error, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{AdminApi, AgentApi, TaskApi};
use crate::config::ControllerConfig;
use crate::core::{self, CoreHandle};
use crate::logstore::LogStore;
use crate::store::{EmbeddedStore, Store};

/// How long in-flight calls may take to finish after shutdown is requested.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Opens the embedded store in `cfg.data_dir` and serves on `listener` until `shutdown`
/// is cancelled.
pub async fn run(
    cfg: ControllerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        Error::invalid(format!(
            "cannot create data_dir {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    let store = EmbeddedStore::open(&cfg.data_dir.join("state.redb"))?;
    let result = serve(cfg, store.clone(), listener, shutdown).await;
    if let Err(e) = store.close().await {
        tracing::warn!(error = %e, "closing the store");
    }
    result
}

/// Serves with a given store (tests and other backends).
pub async fn serve(
    cfg: ControllerConfig,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    cfg.validate()?;
    let cfg = Arc::new(cfg);
    let logs = LogStore::open(&cfg.data_dir.join("logs"))?;
    let core_stop = CancellationToken::new();
    let (core, core_task) =
        core::start(cfg.clone(), store, logs.clone(), core_stop.clone()).await?;
    let addr = listener.local_addr()?;
    let router = router(&cfg, core, logs.clone())?;
    info!(%addr, "controller serving");
    // Nagle off on accepted sockets: small stream messages must not wait for delayed ACKs.
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let stop = shutdown.clone();
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        stop.cancelled().await;
    });
    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => r,
        _ = shutdown.cancelled() => {
            // Stop the core so long-lived streams end, then give calls a deadline.
            core_stop.cancel();
            match tokio::time::timeout(DRAIN_DEADLINE, &mut server).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    core_stop.cancel();
    let _ = core_task.await;
    logs.sync_all().await?;
    info!(%addr, "controller stopped");
    served.map_err(|e| Error::Unavailable(format!("gRPC server on {addr}: {e}")))
}

fn router(
    cfg: &Arc<ControllerConfig>,
    core: CoreHandle,
    logs: Arc<LogStore>,
) -> Result<tonic::transport::server::Router> {
    let max = cfg.max_message_bytes;
    let (health, health_svc) = tonic_health::server::health_reporter();
    // The reporter only marks services; it is cheap to keep for the lifetime of the server.
    let reporter = health.clone();
    tokio::spawn(async move {
        reporter.set_serving::<TaskServiceServer<TaskApi>>().await;
        reporter.set_serving::<AgentServiceServer<AgentApi>>().await;
        reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
    });
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(Error::internal)?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(Error::internal)?;
    let tasks = TaskServiceServer::new(TaskApi {
        core: core.clone(),
        logs: logs.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let agents = AgentServiceServer::new(AgentApi {
        core: core.clone(),
        logs,
        cfg: cfg.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let admin = AdminServiceServer::new(AdminApi { core })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    Ok(tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tasks)
        .add_service(agents)
        .add_service(admin))
}

/// A controller running in this process (tests, `scabbard dev`).
pub struct RunningController {
    /// Address it listens on.
    pub addr: SocketAddr,
    /// Cancel to stop it.
    pub shutdown: CancellationToken,
    /// Finishes when it has stopped.
    pub task: tokio::task::JoinHandle<Result<()>>,
}

/// Binds `cfg.listen` and runs a controller in the background.
pub async fn spawn(cfg: ControllerConfig) -> Result<RunningController> {
    cfg.validate()?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::invalid(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(cfg, listener, shutdown.clone()));
    Ok(RunningController {
        addr,
        shutdown,
        task,
    })
}
