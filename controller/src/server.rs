//! Wiring: opens the store and the log store, starts the core, and serves every gRPC
//! service (plus health and reflection v1/v1alpha) on a listener until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scabbard_common::proto::{
    FILE_DESCRIPTOR_SET, admin_service_server::AdminServiceServer,
    agent_service_server::AgentServiceServer, artifact_service_server::ArtifactServiceServer,
    project_service_server::ProjectServiceServer, schedule_service_server::ScheduleServiceServer,
    task_service_server::TaskServiceServer, template_service_server::TemplateServiceServer,
    workflow_service_server::WorkflowServiceServer,
};
use scabbard_common::{Error, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{
    AdminApi, AgentApi, ArtifactApi, ProjectApi, ScheduleApi, TaskApi, TemplateApi, WorkflowApi,
};
use crate::artifacts::{ArtifactStore, Artifacts};
use crate::auth::catalog::{Bootstrap, DefaultLimits};
use crate::auth::{AuthLayer, Catalog};
use crate::config::ControllerConfig;
use crate::core::persist::Fence;
use crate::core::{self, CoreRouter, Route};
use crate::forward::{ForwardLayer, LeaderChannels};
use crate::leader;
use crate::logstore::LogStore;
use crate::store::{EmbeddedStore, EtcdStore, Store};
use crate::templates::Registry;

/// How long in-flight calls may take to finish after shutdown is requested.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Opens the configured store (embedded in `cfg.data_dir`, or etcd) and serves on
/// `listener` until `shutdown` is cancelled.
pub async fn run(
    cfg: ControllerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    cfg.validate()?;
    scabbard_common::private::private_dir(&cfg.data_dir).map_err(|e| {
        Error::invalid(format!(
            "cannot create data_dir {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    if cfg.store == "etcd" {
        // etcd may not be up yet (a cluster starting together): keep trying.
        let backoff = scabbard_common::backoff::Backoff::default();
        let mut failures = 0;
        let store = loop {
            match EtcdStore::connect(&cfg.etcd).await {
                Ok(s) => break s,
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, failures, "etcd not reachable yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.delay(failures)) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        };
        return serve(cfg, store, listener, shutdown).await;
    }
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
    cfg.check_store_limits(store.max_value_bytes())?;
    // Built-in templates plus the configured directory; a broken file stops the start.
    let templates = Arc::new(Registry::load(cfg.templates_dir.as_deref())?);
    let artifacts = open_artifacts(&cfg)?;
    let cfg = Arc::new(cfg);
    let addr = listener.local_addr()?;
    let advertise = cfg
        .advertise_addr
        .clone()
        .unwrap_or_else(|| addr.to_string());
    let catalog = Catalog::open(
        store.clone(),
        Some(cfg.registration_token.as_str()),
        DefaultLimits {
            requests_per_second: cfg.rate_limit_per_second,
            burst: cfg.rate_limit_burst,
        },
        shutdown.child_token(),
    )
    .await?;
    match catalog.bootstrap(cfg.given_bootstrap_token()?).await? {
        Bootstrap::Created {
            secret,
            generated: true,
        } => {
            // Shown once: only its hash is kept.
            let ca = if cfg.tls.enabled() {
                " --ca-cert <the CA of this controller's certificate>"
            } else {
                ""
            };
            println!(
                "\nbootstrap admin token (shown once, store it now):\n  {secret}\n\nuse it with: scabbard login --controller {advertise}{ca}\n  (it prompts for the token without echoing it; or pipe it on stdin, or set SCABBARD_TOKEN)\n"
            );
            info!("cluster bootstrapped: admin token created and printed on stdout");
        }
        Bootstrap::Created { .. } => {
            info!("cluster bootstrapped with the given admin token")
        }
        Bootstrap::AlreadyDone => {}
    }
    let (route, router_handle) = CoreRouter::new(Route::Follower(None));
    let leading = tokio::spawn(lead_when_elected(
        Shared {
            cfg: cfg.clone(),
            store: store.clone(),
            catalog: catalog.clone(),
            templates: templates.clone(),
            artifacts: artifacts.clone(),
        },
        leader::Candidate {
            node_id: leader::node_id(&cfg.data_dir)?,
            advertise: advertise.clone(),
        },
        route,
        shutdown.clone(),
    ));
    // Serve once the first election settled (leading, or knowing the leader), so the first
    // calls do not bounce; give up waiting after two lease TTLs (health says NOT_SERVING).
    let mut settled = router_handle.watch();
    let _ = tokio::time::timeout(
        cfg.leader_lease_ttl() * 2,
        settled.wait_for(|r| !matches!(r, Route::Follower(None))),
    )
    .await;
    let metrics = match cfg.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|e| {
                Error::invalid(format!("cannot listen on metrics_listen {addr}: {e}"))
            })?;
            info!(addr = %l.local_addr()?, "metrics on GET /metrics");
            Some(tokio::spawn(crate::metrics::serve(
                l,
                crate::listener::ConnLimits::from_config(&cfg),
                router_handle.clone(),
                store.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let members = tokio::spawn(crate::membership::keep_membership(
        store.clone(),
        advertise.clone(),
        cfg.leader_lease_ttl(),
        shutdown.clone(),
    ));
    let (router, inner) = router(
        &cfg,
        router_handle,
        store.clone(),
        catalog,
        templates,
        artifacts,
        advertise.clone(),
    )?;
    let http = match cfg.http_listen {
        Some(http_addr) => Some(
            crate::http::spawn(&cfg, http_addr, inner, store.clone(), &advertise, &shutdown)
                .await?,
        ),
        None => None,
    };
    info!(%addr, %advertise, "controller serving");
    // Bounded accepting: a per-address cap and a handshake timeout (silent connections are
    // closed); Nagle off on accepted sockets (small stream messages must not wait for
    // delayed ACKs). Dead peers are found by HTTP/2 keepalive pings.
    let incoming = crate::listener::ConnLimits::from_config(&cfg).incoming(listener);
    let stop = shutdown.clone();
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        stop.cancelled().await;
    });
    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => r,
        _ = shutdown.cancelled() => {
            // The core stops with `shutdown`, so long-lived streams end; calls get a deadline.
            match tokio::time::timeout(DRAIN_DEADLINE, &mut server).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    shutdown.cancel();
    let fatal = leading.await.ok().flatten();
    let _ = members.await;
    if let Some(m) = metrics {
        let _ = m.await;
    }
    if let Some(h) = http {
        // Open event streams end with the core; give them the drain deadline.
        let _ = tokio::time::timeout(DRAIN_DEADLINE, h).await;
    }
    info!(%addr, "controller stopped");
    if let Some(e) = fatal {
        return Err(e);
    }
    served.map_err(|e| Error::Unavailable(format!("gRPC server on {addr}: {e}")))
}

/// Campaigns for leadership; while leading runs the core and routes requests to it, and
/// stops it (requests get redirected) as soon as leadership is lost.
/// What every leadership term's core is built from.
struct Shared {
    cfg: Arc<ControllerConfig>,
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    templates: Arc<Registry>,
    artifacts: Arc<ArtifactStore>,
}

/// Returns the store's failure when it can never be written again by this process.
async fn lead_when_elected(
    shared: Shared,
    me: leader::Candidate,
    route: watch::Sender<Route>,
    shutdown: CancellationToken,
) -> Option<Error> {
    let Shared {
        cfg,
        store,
        catalog,
        templates,
        artifacts,
    } = shared;
    let ttl = cfg.leader_lease_ttl();
    let backoff = scabbard_common::backoff::Backoff {
        max: ttl,
        ..Default::default()
    };
    let mut failures = 0u32;
    while let Some(lead) = leader::campaign(store.clone(), &me, ttl, &route, &shutdown).await {
        let core_stop = CancellationToken::new();
        let fence = Fence {
            compare: lead.fence.clone(),
            lost: lead.lost.clone(),
        };
        // A fresh log store per term: the directory may hold what this controller wrote
        // when it led before (or another's, if an operator shares it), so nothing cached
        // from an earlier term is trusted.
        let started = match LogStore::open(&cfg.logs_dir()) {
            Ok(logs) => {
                core::start(
                    cfg.clone(),
                    store.clone(),
                    core::Deps {
                        catalog: catalog.clone(),
                        templates: templates.clone(),
                        logs,
                        artifacts: Some(artifacts.clone()),
                    },
                    core_stop.clone(),
                    Some(fence),
                )
                .await
            }
            Err(e) => Err(e),
        };
        let mut term_failed = false;
        match started {
            Ok((core, mut task)) => {
                // Retention runs for this term only, under its fence.
                let sweeper = crate::retention::spawn(
                    crate::retention::Sweeper {
                        cfg: cfg.clone(),
                        store: store.clone(),
                        catalog: catalog.clone(),
                        core: core.clone(),
                        artifacts: Some(artifacts.clone()),
                        fence: Some(lead.fence.clone()),
                    },
                    core_stop.child_token(),
                );
                route.send_replace(Route::Active(core.clone()));
                let ended = tokio::select! {
                    _ = lead.lost.cancelled() => { warn!("leadership lost: stopping the core"); false }
                    why = store_fatal(store.as_ref()) => {
                        tracing::error!(error = %why, "the store failed for good: ending the term");
                        false
                    }
                    _ = &mut task => {
                        warn!("the store could not be written: this term is over; stepping down to rebuild from the store");
                        term_failed = true;
                        true
                    }
                    _ = shutdown.cancelled() => false,
                };
                route.send_replace(Route::Follower(None));
                core_stop.cancel();
                sweeper.abort();
                if !ended {
                    // The core task ends only after its persister committed or failed
                    // everything it was given.
                    let _ = task.await;
                }
                if let Err(e) = core.logs().sync_all().await {
                    warn!(error = %e, "flushing logs at the end of the term");
                }
            }
            Err(e) => {
                term_failed = true;
                warn!(error = %e, "could not start the core; resigning");
            }
        }
        lead.resign(store.as_ref()).await;
        if shutdown.is_cancelled() {
            break;
        }
        if let Some(why) = store.fatal() {
            tracing::error!(error = %why, "the store cannot be written again by this process: stopping the controller (restart it to repair the store)");
            shutdown.cancel();
            return Some(Error::Unavailable(why));
        }
        if term_failed {
            failures += 1;
            // Health says NOT_SERVING meanwhile (no leader known): wait until the store
            // answers again, and back off so a broken store is not hammered.
            wait_for_store(store.as_ref(), backoff.delay(failures), &shutdown).await;
        } else {
            failures = 0;
        }
    }
    None
}

/// Resolves when the store reports a failure it cannot recover from.
async fn store_fatal(store: &dyn Store) -> String {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Some(why) = store.fatal() {
            return why;
        }
    }
}

/// Waits at least `pause`, then until the store says it is healthy (or shutdown).
async fn wait_for_store(store: &dyn Store, pause: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(pause) => {}
        () = shutdown.cancelled() => return,
    }
    let mut logged = false;
    loop {
        match store.health().await {
            Ok(()) => return,
            Err(e) if !logged => {
                tracing::error!(error = %e, "the store cannot be written: not leading until it can (health: NOT_SERVING)");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(pause.max(Duration::from_millis(500))) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Opens the artifact store (creating the local directory) and checks in the background
/// that a remote one answers.
fn open_artifacts(cfg: &ControllerConfig) -> Result<Arc<ArtifactStore>> {
    let store = ArtifactStore::open(&cfg.artifacts, &cfg.data_dir)?;
    info!(store = %store.describe(), "artifact store");
    if cfg.artifacts.backend == "local" && cfg.store == "etcd" && cfg.artifacts.dir.is_none() {
        warn!(
            "artifacts.backend = \"local\" with store = \"etcd\": every controller must see the same artifacts directory, which also holds archived task logs (set artifacts.dir to a shared filesystem), or use artifacts.backend = \"s3\""
        );
    }
    if cfg.artifacts.backend != "local" {
        let probe = store.clone();
        tokio::spawn(async move {
            if let Err(e) = probe.probe().await {
                tracing::error!(error = %e, "the artifact store cannot be reached: uploads and downloads will fail until it can");
            }
        });
    }
    Ok(store)
}

/// A reflection builder serving every descriptor set.
///
/// Kept out of line on purpose: `router` used to pass two identical fresh
/// `Builder::configure()` values to one closure, and rustc 1.95's MIR GVN pass
/// (rust-lang/rust#155241) then reused the first, already consumed builder for the second
/// call in release builds: a use after free that crashed the controller at startup.
#[inline(never)]
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The gRPC server with its layers: trace spans (outermost), RPC metrics, forwarding, auth,
/// limits.
type ApiRouter = tonic::transport::server::Router<
    tower::layer::util::Stack<
        crate::limits::LimitsLayer,
        tower::layer::util::Stack<
            AuthLayer,
            tower::layer::util::Stack<
                ForwardLayer,
                tower::layer::util::Stack<
                    crate::metrics::RpcMetricsLayer,
                    tower::layer::util::Stack<
                        crate::rpc_trace::RpcTraceLayer,
                        tower::layer::util::Identity,
                    >,
                >,
            >,
        >,
    >,
>;

fn router(
    cfg: &Arc<ControllerConfig>,
    core: CoreRouter,
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    templates: Arc<Registry>,
    artifact_store: Arc<ArtifactStore>,
    advertise: String,
) -> Result<(ApiRouter, crate::http::Inner)> {
    let max = cfg.max_message_bytes;
    let (reporter, health_svc) = tonic_health::server::health_reporter();
    // SERVING where a call would succeed: while this controller leads, or follows a leader
    // that answers (calls are forwarded to it; checked every second). NOT_SERVING while no
    // leader is known (e.g. the store is unreachable) or the leader cannot be reached.
    // Without forwarding (TLS listeners without a peer CA), SERVING while the leader to
    // redirect to is known.
    let (forwarding, channels) = match crate::tls::peer_client_config(&cfg.tls) {
        Ok(tls) => (true, LeaderChannels::new(tls)),
        Err(why) => {
            info!("followers redirect instead of forwarding: {why} (--tls-peer-ca)");
            (false, LeaderChannels::default())
        }
    };
    let channels = Arc::new(channels);
    let forward = ForwardLayer::new(
        core.watch(),
        channels.clone(),
        advertise.clone(),
        forwarding,
    );
    let mut routes = core.watch();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = None;
        loop {
            let route = routes.borrow_and_update().clone();
            let serving = match route {
                Route::Active(_) => true,
                Route::Follower(None) => false,
                Route::Follower(Some(_)) if !forwarding => true,
                Route::Follower(Some(leader)) => {
                    crate::forward::leader_serving(&channels, &leader, Duration::from_secs(1)).await
                }
            };
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            if last == Some(status) {
                tokio::select! {
                    _ = tick.tick() => continue,
                    changed = routes.changed() => if changed.is_err() { return } else { continue },
                }
            }
            last = Some(status);
            for name in [
                "",
                "scabbard.v1.TaskService",
                "scabbard.v1.AgentService",
                "scabbard.v1.AdminService",
                "scabbard.v1.ProjectService",
                "scabbard.v1.WorkflowService",
                "scabbard.v1.TemplateService",
                "scabbard.v1.ScheduleService",
                "scabbard.v1.ArtifactService",
            ] {
                reporter.set_service_status(name, status).await;
            }
        }
    });
    let reflection_v1 = reflection().build_v1().map_err(Error::internal)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(Error::internal)?;
    let streams = crate::api::StreamLimits::from_config(cfg);
    let tasks = TaskServiceServer::new(TaskApi {
        core: core.clone(),
        catalog: catalog.clone(),
        streams: streams.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let agents = AgentServiceServer::new(AgentApi {
        core: core.clone(),
        catalog: catalog.clone(),
        require_client_cert: cfg.tls.require_worker_client_cert,
        queue_capacity: cfg.agent_queue_capacity,
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let admin = AdminServiceServer::new(AdminApi {
        core: core.clone(),
        store,
        catalog: catalog.clone(),
        config: Arc::new(crate::config_view::effective(cfg, &advertise)),
        advertise,
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let projects = ProjectServiceServer::new(ProjectApi {
        core: core.clone(),
        catalog: catalog.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let workflows = WorkflowServiceServer::new(WorkflowApi {
        core: core.clone(),
        catalog: catalog.clone(),
        cfg: cfg.clone(),
        streams,
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let template_api = TemplateServiceServer::new(TemplateApi {
        core: core.clone(),
        catalog: catalog.clone(),
        templates,
        cfg: cfg.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let schedules = ScheduleServiceServer::new(ScheduleApi {
        core: core.clone(),
        catalog: catalog.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    // Artifact data travels in 1 MiB messages whatever max_message_bytes says.
    let artifact_max = max.max(crate::artifacts::CHUNK_BYTES + 64 * 1024);
    let artifact_api = ArtifactServiceServer::new(ArtifactApi {
        artifacts: Arc::new(Artifacts::new(core, artifact_store)),
    })
    .max_decoding_message_size(artifact_max)
    .max_encoding_message_size(artifact_max);
    let auth = AuthLayer::new(catalog);
    let limits = crate::limits::LimitsLayer::new(crate::limits::Limits::from_config(cfg));
    // The HTTP API calls the same services through the same layers (and the same limit
    // buckets), in process.
    let inner = tower::util::BoxCloneSyncService::new(
        tower::ServiceBuilder::new()
            .layer(crate::rpc_trace::RpcTraceLayer)
            .layer(crate::metrics::RpcMetricsLayer)
            .layer(forward.clone())
            .layer(auth.clone())
            .layer(limits.clone())
            .service(
                tonic::service::Routes::new(tasks.clone())
                    .add_service(admin.clone())
                    .add_service(projects.clone())
                    .add_service(workflows.clone())
                    .add_service(template_api.clone())
                    .add_service(schedules.clone())
                    .add_service(artifact_api.clone())
                    .prepare(),
            ),
    );
    let grpc = crate::tls::server_builder(&cfg.tls)?
        // Outermost: a server span per call when tracing is on (a forwarded call's too).
        .layer(crate::rpc_trace::RpcTraceLayer)
        // Then every call's latency by method and code (forwarded ones included).
        .layer(crate::metrics::RpcMetricsLayer)
        // Then: a follower forwards client calls to the leader untouched (the leader
        // authenticates them).
        .layer(forward)
        .layer(auth)
        // Inside auth: rate limits per principal, concurrency limit, per-RPC deadline.
        .layer(limits)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tasks)
        .add_service(agents)
        .add_service(admin)
        .add_service(projects)
        .add_service(workflows)
        .add_service(template_api)
        .add_service(schedules)
        .add_service(artifact_api);
    Ok((grpc, inner))
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
