//! A replica's background jobs, tracked: each is spawned by the module it
//! serves (the store's retention and group-commit writers, the bus
//! listener, the health reporter, the rate-limit sweep, the metrics
//! endpoint) through one [`Jobs`] value passed down from `server.rs`, and
//! stopping the replica waits for every one of them. Jobs watch
//! [`Jobs::shutdown`] and return when it is cancelled; jobs that drain work
//! (group-commit writers) return once their input closes.

use std::future::Future;

use futures_util::FutureExt;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The tracked jobs of one replica and the token that stops them.
#[derive(Debug, Clone, Default)]
pub struct Jobs {
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Jobs {
    /// No jobs yet; a fresh shutdown token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `job` on the runtime, tracked. `name` goes to the log if the
    /// job panics.
    pub fn spawn<F>(&self, name: &'static str, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // A panicking job is a bug; say which one, instead of a silent hole.
        self.tracker.spawn(async move {
            if std::panic::AssertUnwindSafe(job)
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(job = name, "background job panicked");
            }
        });
    }

    /// Cancelled when the replica starts to stop.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Waits until every job spawned so far has returned; no new job may be
    /// spawned after this is called.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Number of jobs still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }
}

/// Runs `work` at once and then every `interval` (a run that overruns
/// delays the next; none are bunched) until `shutdown`, which also
/// abandons a run in progress. For periodic jobs (retention, the
/// scheduler).
pub async fn every<F, Fut>(interval: std::time::Duration, shutdown: CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = work() => {}
        }
    }
}
