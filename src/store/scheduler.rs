//! The scheduler: the background job that delivers scheduled sends when
//! they are due ([`Store::deliver_due`]) and deletes notifications when
//! they expire ([`Store::expire`]), by the replica's clock. Every replica
//! runs it; on PostgreSQL each due send is taken by one of them (row locks,
//! `SKIP LOCKED`), and an expiry applied twice changes nothing the second
//! time.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::Store;
use crate::clock::Clock;

/// Default time between scheduler runs: how late, at most, a scheduled
/// send is delivered or an expired notification deleted (listings and
/// counts leave expired ones out at once in any case).
pub const DEFAULT_SCHEDULE_INTERVAL: Duration = Duration::from_secs(1);

/// Every `interval` until `shutdown`: delivers what is due by `clock`, then
/// deletes what has expired by it; each again at once while a run found a
/// full batch. A failed run is logged and retried at the next tick.
pub async fn run<S: Store>(
    store: Arc<S>,
    clock: Clock,
    interval: Duration,
    shutdown: CancellationToken,
) {
    crate::jobs::every(interval, shutdown, || async {
        drain("deliver scheduled sends", || store.deliver_due(clock.now())).await;
        drain("delete expired notifications", || store.expire(clock.now())).await;
    })
    .await;
}

/// Runs `batch` until it does nothing (returns 0) or fails (logged as
/// `what`).
async fn drain<F, Fut>(what: &str, mut batch: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = super::StoreResult<usize>>,
{
    loop {
        match batch().await {
            Ok(0) => return,
            Ok(n) => tracing::debug!(done = n, "{what}"),
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed");
                return;
            }
        }
    }
}
