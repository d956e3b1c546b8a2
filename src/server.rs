//! Builds and runs a replica: the store (Postgres or in-memory), the hub,
//! the LISTEN loop, retention, and the tonic server, all stopped by one
//! [`CancellationToken`].

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::{
    api::NotificationsService,
    auth::{KeyError, Verifier},
    config::Config,
    hub::Hub,
    listener::{ListenError, Listener, listener_config},
    proto::notifications_server::NotificationsServer,
    store::{
        Store, StoreError,
        memory::MemoryStore,
        postgres::{self, PgStore},
    },
    subscription::StreamSettings,
};

/// Why a replica could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The verification key is unusable.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The listen address could not be bound.
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
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A running replica.
#[derive(Debug)]
pub struct RunningServer {
    /// The address it serves on (the real port when 0 was asked for).
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// A token that stops the replica when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, ends open streams with `UNAVAILABLE` (clients
    /// resume elsewhere), waits for in-flight calls, at most `grace`.
    pub async fn stop(self, grace: Duration) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.wait(grace).await
    }

    /// Waits until the replica stops (after its token is cancelled), at
    /// most `grace` once it has been cancelled.
    pub async fn wait(mut self, grace: Duration) -> Result<(), ServerError> {
        tokio::select! {
            joined = &mut self.task => return flatten(joined),
            () = self.shutdown.cancelled() => {}
        }
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(joined) => flatten(joined),
            Err(_) => {
                tracing::warn!(?grace, "grace period over; closing remaining connections");
                self.task.abort();
                Ok(())
            }
        }
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

/// Starts a replica: verifies the configuration's key, binds, connects and
/// migrates the database (if any), starts listening, then serves in the
/// background. Returns once it accepts calls.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    let verifier = Arc::new(Verifier::new(&config.auth)?);
    let hub = Hub::new(config.stream_queue);
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    if config.dev {
        tracing::warn!(
            "DEVELOPMENT MODE: tokens are verified with the publicly known dev secret; \
             anyone who can reach {addr} can act as any user. Never use --dev in production."
        );
    }
    let task = match &config.database_url {
        Some(url) => {
            let applied = postgres::migrate(url).await?;
            if !applied.is_empty() {
                tracing::info!(?applied, "database migrated");
            }
            let store = Arc::new(PgStore::new(url, config.pool_size, config.pool_timeout)?);
            store.ping().await?;
            let listen_url = config.listener_database_url.as_deref().unwrap_or(url);
            let listen_config = listener_config(listen_url)
                .map_err(|e| StoreError::Internal(format!("invalid database URL: {e}")))?;
            let listener_task = Listener::new(
                listen_config,
                hub.clone(),
                config.listener,
                shutdown.clone(),
            );
            let listening = listener_task.listen().await?;
            tokio::spawn(listener_task.run(listening));
            tracing::info!(%addr, "serving with PostgreSQL");
            spawn(store, hub, verifier, &config, listener, shutdown.clone())
        }
        None => {
            tracing::warn!(
                %addr,
                "no DATABASE_URL: using the in-memory store; notifications are lost on \
                 restart and replicas do not share them (one replica only)"
            );
            let store = Arc::new(MemoryStore::new(hub.clone()));
            spawn(store, hub, verifier, &config, listener, shutdown.clone())
        }
    };
    Ok(RunningServer {
        addr,
        shutdown,
        task,
    })
}

fn spawn<S: Store>(
    store: Arc<S>,
    hub: Arc<Hub>,
    verifier: Arc<Verifier>,
    config: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> JoinHandle<Result<(), ServerError>> {
    tokio::spawn(prune_loop(
        store.clone(),
        config.retention,
        config.prune_interval,
        shutdown.clone(),
    ));
    let service = NotificationsService::new(
        store,
        hub,
        verifier,
        config.limits,
        StreamSettings {
            heartbeat_interval: config.heartbeat_interval,
        },
        shutdown.clone(),
    );
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(NotificationsServer::new(service));
    tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await?;
        Ok(())
    })
}

/// Deletes events older than `retention` every `interval`.
async fn prune_loop<S: Store>(
    store: Arc<S>,
    retention: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(cutoff) = std::time::SystemTime::now().checked_sub(retention) else {
            continue;
        };
        match store.prune(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "retention pruned old events"),
            Err(e) => tracing::warn!(error = %e, "retention run failed"),
        }
    }
}
