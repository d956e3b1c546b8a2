//! Builds and runs a replica: the store (Postgres or in-memory), the hub,
//! the LISTEN loop, retention, health and metrics, and the gRPC services —
//! native gRPC and grpc-web on one port, served with the connection and
//! call bounds of [`crate::transport`] — all stopped by one
//! [`CancellationToken`].
//!
//! Stopping (SIGTERM) drains: health turns NOT_SERVING, no new connections
//! or streams are accepted, every open stream ends with `UNAVAILABLE` (the
//! client resumes on another replica), in-flight unary calls finish, and
//! whatever is still open after the grace period is closed.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use http::{HeaderName, HeaderValue, Method};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tower::util::MapResponseLayer;
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use crate::{
    api::NotificationsService,
    auth::{KeyError, Verifier},
    bus::postgres::{ListenError, Listener, listener_config},
    config::Config,
    health,
    http::{Door, DoorLayer, DoorSettings},
    hub::Hub,
    jobs::Jobs,
    limits::{self, RateLimits},
    proto::{self, notifications_server::NotificationsServer},
    store::{
        Store, StoreError,
        memory::MemoryStore,
        postgres::{self, PgSettings, PgStore},
        retention, scheduler,
    },
    subscription::StreamSettings,
    telemetry,
    transport::{self, CallBoundsLayer},
};

pub use crate::health::LIVENESS_SERVICE;

/// Request metadata carrying the caller's request id (echoed back, and
/// generated as a UUID when absent).
pub const REQUEST_ID: &str = "x-request-id";

/// Why a replica could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The verification key is unusable.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The database could not be reached or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The LISTEN connection could not be established.
    #[error("cannot LISTEN: {0}")]
    Listen(#[from] ListenError),
    /// gRPC reflection could not be built from the descriptor set.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The HTTP door's JSON codec could not be built from the descriptor set.
    #[error(transparent)]
    Descriptors(#[from] crate::http::json::DescriptorError),
}

/// A running replica.
#[derive(Debug)]
pub struct RunningServer {
    /// The address it serves gRPC and grpc-web on (the real port when 0 was
    /// asked for).
    pub addr: SocketAddr,
    /// The address it serves `/metrics` on, if any.
    pub metrics_addr: Option<SocketAddr>,
    jobs: Jobs,
    task: JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// The replica's background jobs (to check, after [`Self::stop`], that
    /// none is left running).
    pub fn jobs(&self) -> Jobs {
        self.jobs.clone()
    }

    /// A token that starts the drain when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.jobs.shutdown().clone()
    }

    /// Drains (see the module docs) and waits at most `grace` for it.
    pub async fn stop(self, grace: Duration) -> Result<(), ServerError> {
        self.jobs.shutdown().cancel();
        self.wait(grace).await
    }

    /// Waits until the replica stops; once the drain has begun, at most
    /// `grace` more for the calls in flight and every background job, then
    /// closes whatever is left.
    pub async fn wait(mut self, grace: Duration) -> Result<(), ServerError> {
        let served = tokio::select! {
            joined = &mut self.task => Some(joined),
            () = self.jobs.shutdown().cancelled() => None,
        };
        // However serving ended, the jobs stop too.
        self.jobs.shutdown().cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let served = match served {
            Some(joined) => flatten(joined),
            None => match tokio::time::timeout_at(deadline, &mut self.task).await {
                Ok(joined) => flatten(joined),
                Err(_) => {
                    tracing::warn!(?grace, "grace period over; closing remaining connections");
                    self.task.abort();
                    Ok(())
                }
            },
        };
        if tokio::time::timeout_at(deadline, self.jobs.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.jobs.running(),
                "grace period over; background jobs still running"
            );
        }
        served
    }
}

fn flatten(
    joined: Result<Result<(), ServerError>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    match joined {
        Ok(result) => result,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    Ok((listener, local))
}

/// Starts a replica: verifies the key, binds, connects and migrates the
/// database (if any), establishes LISTEN, then serves in the background.
/// Returns once it accepts calls.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    let verifier = Arc::new(Verifier::new(&config.auth)?);
    let hub = Hub::new(config.streams);
    let jobs = Jobs::new();
    let (listener, addr) = bind(config.listen).await?;
    let metrics_addr = match config.metrics_listen {
        Some(metrics_listen) => Some(start_metrics(metrics_listen, &jobs).await?),
        None => None,
    };
    if config.dev {
        tracing::warn!(
            "DEVELOPMENT MODE: tokens are verified with the publicly known dev secret; \
             anyone who can reach {addr} can act as any user. Never use --dev in production."
        );
    }
    let replica = Replica {
        hub: hub.clone(),
        verifier,
        config: &config,
        listener,
        jobs: jobs.clone(),
    };
    let task = match &config.database_url {
        Some(url) => {
            // Migrate over the direct URL when there is one: the advisory
            // lock does not hold through a transaction-pooling PgBouncer.
            let applied =
                postgres::migrate(config.listener_database_url.as_deref().unwrap_or(url)).await?;
            if !applied.is_empty() {
                tracing::info!(?applied, "database migrated");
            }
            let store = Arc::new(
                PgStore::with_settings(
                    url,
                    PgSettings {
                        pool_size: config.pool_size,
                        wait_timeout: config.pool_timeout,
                        group_commit: config.group_commit,
                        statement_timeout: config.statement_timeout,
                    },
                    &jobs,
                )?
                .with_clock(config.clock.clone()),
            );
            store.ping().await?;
            let listen_url = config.listener_database_url.as_deref().unwrap_or(url);
            let listen_config = listener_config(listen_url)
                .map_err(|e| StoreError::internal(format!("invalid database URL: {e}")))?;
            let listening = Arc::new(AtomicBool::new(false));
            let listener_task = Listener::new(
                listen_config,
                hub,
                config.listener,
                jobs.shutdown().clone(),
                listening.clone(),
            );
            let first = listener_task.listen().await?;
            jobs.spawn("bus listener", listener_task.run(first));
            tracing::info!(%addr, "serving with PostgreSQL");
            // Half the pool at most for backlog and catch-up reads, so a
            // reconnect's catch-up storm leaves room for sends.
            replica.spawn(store, Some(listening), (config.pool_size / 2).max(1))?
        }
        None => {
            tracing::warn!(
                %addr,
                "no DATABASE_URL: using the in-memory store; notifications are lost on \
                 restart and replicas do not share them (one replica only)"
            );
            let store = Arc::new(MemoryStore::new(hub).with_clock(config.clock.clone()));
            replica.spawn(store, None, tokio::sync::Semaphore::MAX_PERMITS)?
        }
    };
    Ok(RunningServer {
        addr,
        metrics_addr,
        jobs,
        task,
    })
}

async fn start_metrics(addr: SocketAddr, jobs: &Jobs) -> Result<SocketAddr, ServerError> {
    let (listener, local) = bind(addr).await?;
    match telemetry::metrics_handle() {
        Some(handle) => {
            tracing::info!(addr = %local, "serving metrics at /metrics");
            let shutdown = jobs.shutdown().clone();
            jobs.spawn(
                "metrics endpoint",
                telemetry::serve_metrics(listener, handle, shutdown),
            );
        }
        None => tracing::warn!("metrics recorder unavailable; /metrics will not be served"),
    }
    Ok(local)
}

/// CORS for grpc-web, Connect calls and the SSE stream from the configured
/// origins (Fetch standard, "CORS protocol"): the headers their clients
/// send, the gRPC status headers grpc-web clients must read (browsers hide
/// them unless exposed), and credentials, so an `EventSource` opened with
/// `withCredentials` sends the SSE resume cookie.
fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        // The SSE door's resume cookie (EventSource `withCredentials`).
        .allow_credentials(true)
        .allow_headers([
            header("authorization"),
            header("content-type"),
            header("connect-protocol-version"),
            header("connect-timeout-ms"),
            header("last-event-id"),
            header("x-grpc-web"),
            header("x-user-agent"),
            header("grpc-timeout"),
            header(REQUEST_ID),
        ])
        .expose_headers([
            header("grpc-status"),
            header("grpc-message"),
            header("grpc-status-details-bin"),
            header(REQUEST_ID),
        ])
        .max_age(Duration::from_secs(24 * 3600))
}

/// What every replica is built from, whatever its store.
struct Replica<'a> {
    hub: Arc<Hub>,
    verifier: Arc<Verifier>,
    config: &'a Config,
    listener: TcpListener,
    jobs: Jobs,
}

impl Replica<'_> {
    fn spawn<S: Store>(
        self,
        store: Arc<S>,
        listening: Option<Arc<AtomicBool>>,
        store_reads: usize,
    ) -> Result<JoinHandle<Result<(), ServerError>>, ServerError> {
        let config = self.config;
        let jobs = self.jobs;
        let shutdown = jobs.shutdown().clone();
        jobs.spawn(
            "retention",
            retention::run(
                store.clone(),
                config.retention,
                config.prune_interval,
                shutdown.clone(),
            ),
        );
        jobs.spawn(
            "scheduler",
            scheduler::run(
                store.clone(),
                config.clock.clone(),
                config.schedule_interval,
                shutdown.clone(),
            ),
        );
        let (reporter, health) = tonic_health::server::health_reporter();
        jobs.spawn(
            "health",
            health::report(
                store.clone(),
                listening,
                reporter,
                config.health_check_interval,
                shutdown.clone(),
            ),
        );
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let rates = Arc::new(RateLimits::new(config.rates));
        jobs.spawn(
            "rate-limit sweep",
            limits::forget_idle_keys(rates.clone(), shutdown.clone()),
        );
        let service = Arc::new(
            NotificationsService::new(
                store,
                self.hub,
                self.verifier.clone(),
                config.limits,
                rates,
                StreamSettings::new(config.heartbeat_interval, store_reads),
                shutdown.clone(),
            )
            .with_ticket_lifetime(config.stream_ticket_lifetime)
            .with_clock(config.clock.clone()),
        );
        let door = Door::new(
            service.clone(),
            DoorSettings {
                max_request_bytes: config.max_request_bytes,
                request_body_timeout: config.transport.request_body_timeout,
                call_timeout: config.transport.call_timeout,
                cors_origins: config.cors_origins.clone(),
            },
        )?;
        let request_id = HeaderName::from_static(REQUEST_ID);
        let routes = Routes::new(health)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(
                NotificationsServer::from_arc(service)
                    .max_decoding_message_size(config.max_request_bytes),
            )
            .prepare();
        let service = tower::ServiceBuilder::new()
            .layer(cors(&config.cors_origins))
            // One body type for CORS's own answers and the rest.
            .layer(MapResponseLayer::new(|r: http::Response<_>| {
                r.map(tonic::body::Body::new)
            }))
            .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
            .layer(
                TraceLayer::new_for_grpc()
                    .make_span_with(|req: &http::Request<_>| {
                        let id = req
                            .headers()
                            .get(REQUEST_ID)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default();
                        tracing::info_span!("grpc", method = %req.uri().path(), request_id = %id)
                    })
                    // Call outcomes are counted by method and code instead.
                    .on_failure(()),
            )
            .layer(PropagateRequestIdLayer::new(request_id))
            // Connect calls, SSE and the OpenAPI document; the rest is gRPC
            // (grpc-web's translation would refuse them as bad requests).
            .layer(DoorLayer::new(door))
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(MapResponseLayer::new(grpc_status_fixups))
            // Inside grpc-web, so its statuses reach browsers in their
            // format, and inside the request id and trace layers.
            .layer(CallBoundsLayer::new(&config.transport))
            .service(routes);
        // A connection's handshake ends with its first authenticated call.
        let verifier = self.verifier;
        let authenticates: transport::Authenticates =
            Arc::new(move |headers: &http::HeaderMap| verifier.verify_headers(headers).is_ok());
        let listener = self.listener;
        let settings = config.transport;
        Ok(tokio::spawn(async move {
            transport::serve(listener, service, authenticates, settings, shutdown).await;
            Ok(())
        }))
    }
}

/// Puts one of tonic's own statuses right, per the gRPC status-code guide
/// (answered trailers-only, the status in the response headers): a request
/// message over the size limit is OUT_OF_RANGE in tonic but
/// RESOURCE_EXHAUSTED in the guide and other gRPC implementations. (A
/// passed `grpc-timeout` is answered DEADLINE_EXCEEDED by
/// [`CallBoundsLayer`] itself.)
fn grpc_status_fixups<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default();
    let fixed = match headers.get("grpc-status").and_then(|s| s.to_str().ok()) {
        Some("11")
            if message.contains("message%20length%20too%20large")
                || message.contains("message length too large") =>
        {
            Some("8")
        }
        _ => None,
    };
    if let Some(code) = fixed {
        headers.insert("grpc-status", HeaderValue::from_static(code));
    }
    response
}
