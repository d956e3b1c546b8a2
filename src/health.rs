//! The standard gRPC health service (`grpc.health.v1`), kept true by one
//! background job: SERVING while the store answers and the bus listens,
//! NOT_SERVING otherwise and from the moment the drain starts, so load
//! balancers stop sending new calls to a replica that cannot serve them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::NotificationsService, proto::notifications_server::NotificationsServer, store::Store,
    telemetry::names,
};

/// Health service name for liveness probes: SERVING for as long as the
/// process serves, whatever the database does, so an outage takes replicas
/// out of load balancing (readiness) without restarting them.
pub const LIVENESS_SERVICE: &str = "liveness";

/// Keeps the health service true until `shutdown`: both the overall `""`
/// and `herald.v1.Notifications` are SERVING while `store` answers a ping
/// within `interval` and `listening` (the bus listener, when there is one)
/// is established; NOT_SERVING otherwise and once `shutdown` is cancelled.
/// [`LIVENESS_SERVICE`] is SERVING throughout. Also samples pool usage for
/// metrics.
pub async fn report<S: Store>(
    store: Arc<S>,
    listening: Option<Arc<AtomicBool>>,
    reporter: HealthReporter,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let service = <NotificationsServer<NotificationsService<S>> as NamedService>::NAME;
    reporter
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    let mut last = None;
    loop {
        let status = if shutdown.is_cancelled() {
            ServingStatus::NotServing
        } else {
            let pinged = tokio::time::timeout(interval, store.ping()).await;
            let listening = listening.as_ref().is_none_or(|l| l.load(Ordering::Acquire));
            match pinged {
                Ok(Ok(())) if listening => ServingStatus::Serving,
                Ok(Ok(())) => ServingStatus::NotServing,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "health check: store unavailable");
                    ServingStatus::NotServing
                }
                Err(_) => ServingStatus::NotServing,
            }
        };
        if last != Some(status) {
            tracing::info!(?status, "health");
            reporter.set_service_status("", status).await;
            reporter.set_service_status(service, status).await;
            last = Some(status);
        }
        if let Some((in_use, idle)) = store.pool_status() {
            metrics::gauge!(names::POOL_CONNECTIONS, "state" => "in_use").set(in_use as f64);
            metrics::gauge!(names::POOL_CONNECTIONS, "state" => "idle").set(idle as f64);
        }
        if shutdown.is_cancelled() {
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
}
