//! Retention: the background job that deletes stream events older than the
//! configured age, through [`Store::prune`] (which, on PostgreSQL, prunes in
//! batches by seq on one replica at a time). Streams resuming before what
//! was pruned get `resync`.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::Store;

/// Deletes events older than `retention` every `interval`, until
/// `shutdown`. A failed run is logged and retried at the next tick.
pub async fn run<S: Store>(
    store: Arc<S>,
    retention: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    crate::jobs::every(interval, shutdown, || async {
        let Some(cutoff) = std::time::SystemTime::now().checked_sub(retention) else {
            return;
        };
        match store.prune(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "retention pruned old events"),
            Err(e) => tracing::warn!(error = %e, "retention run failed"),
        }
    })
    .await;
}
